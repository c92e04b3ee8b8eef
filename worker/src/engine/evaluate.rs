//! Evaluating an export on labelled data, for every task: the import side
//! of the exports. The export may come from this engine (its `ptune.json`
//! holds the spec it was trained with: task, fields, labels, sequence
//! length; a full fine-tuning export is a model folder) or, for a
//! classifier, from Hugging Face PEFT's `save_pretrained` (its
//! `adapter_config.json` gives the task; the caller names what PEFT does not
//! save, such as the labels' names). The job's task loads the export onto
//! the frozen base ([`SharedBase::prepare_export`]) and evaluates it as
//! training does, so its metrics are the ones a job reports on the same
//! file.

use std::path::Path;

use ptune_core::JobSpec;
use serde_json::{json, Value};
use tch::Device;

use super::error::EngineError;
use super::export::PROVENANCE_FILE;
use super::job::{Resume, TrainJob};
use super::models::frozen::FrozenBase;
use super::models::safetensors::read_header;
use super::pack::SharedBase;
use super::peft::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use super::tasks::check_architecture_of;
use super::train::{TaskEvaluation, TaskRun};

/// What an adapter folder says about how to evaluate it.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    /// The spec the adapter was trained with (`ptune.json`), or one derived
    /// from `adapter_config.json`: its task, method and base model, default
    /// fields (`text`, `label`), numbered labels and 128 tokens.
    pub spec: JobSpec,
    /// True when the spec came from `ptune.json`.
    pub trained_here: bool,
}

/// Reads `dir`'s `ptune.json`, or else derives the spec from its
/// `adapter_config.json`, with a sequence classifier's labels numbered
/// `0..n` for the `n` outputs of its saved head (a token classifier's tags
/// are left for the caller to name).
pub fn export_info(dir: &Path) -> Result<ExportInfo, EngineError> {
    let bad = |message: String| EngineError::Model(format!("{}: {message}", dir.display()));
    let provenance = dir.join(PROVENANCE_FILE);
    if provenance.is_file() {
        let text = std::fs::read_to_string(&provenance).map_err(|e| EngineError::io(&provenance, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| bad(format!("{PROVENANCE_FILE} is not json: {e}")))?;
        let spec: JobSpec = serde_json::from_value(value["spec"].clone())
            .map_err(|e| bad(format!("{PROVENANCE_FILE} has no valid spec: {e}")))?;
        return Ok(ExportInfo { spec, trained_here: true });
    }
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            bad(format!(
                "no {ADAPTER_CONFIG_FILE}, and no {PROVENANCE_FILE}: a model folder is read only as ptune's full fine-tuning export"
            ))
        } else {
            EngineError::io(&config_path, e)
        }
    })?;
    let config: Value = serde_json::from_str(&text).map_err(|e| bad(format!("{ADAPTER_CONFIG_FILE} is not json: {e}")))?;
    let task = match config["task_type"].as_str() {
        Some("SEQ_CLS") => "sequence_classification",
        Some("TOKEN_CLS") => "token_classification",
        other => {
            return Err(bad(format!(
                "task_type {} cannot be evaluated without the {PROVENANCE_FILE} ptune writes beside its exports; \
                 SEQ_CLS and TOKEN_CLS adapters saved by PEFT can",
                other.map_or("(none)".to_string(), |t| format!("{t:?}"))
            )))
        }
    };
    let (method, peft) = match config["peft_type"].as_str() {
        Some("PROMPT_TUNING") => ("prompt_tuning", json!({ "num_virtual_tokens": config["num_virtual_tokens"] })),
        Some("P_TUNING") => ("p_tuning", json!({ "num_virtual_tokens": config["num_virtual_tokens"] })),
        Some("PREFIX_TUNING") => ("prefix_tuning", json!({ "num_virtual_tokens": config["num_virtual_tokens"] })),
        Some("LORA") => ("lora", json!({})),
        other => return Err(bad(format!("unsupported peft_type {other:?}"))),
    };
    // PEFT records the base model as loaded: a hub id or a path; its last part names the folder.
    let base_model = config["base_model_name_or_path"].as_str().unwrap_or_default();
    let base_model = base_model.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    let labels: Vec<String> = match task {
        "sequence_classification" => (0..head_outputs(dir)?).map(|i| i.to_string()).collect(),
        _ => Vec::new(),
    };
    let spec = json!({
        "name": dir.file_name().map_or("adapter".into(), |n| n.to_string_lossy().into_owned()),
        "base_model": base_model, "task": task, "method": method, "peft": peft,
        "data": { "train": "", "eval": "", "labels": labels, "max_seq_len": 128 },
        "training": { "learning_rate": 1e-3 },
    });
    let spec = serde_json::from_value(spec).map_err(|e| bad(format!("{ADAPTER_CONFIG_FILE}: {e}")))?;
    Ok(ExportInfo { spec, trained_here: false })
}

/// Rows of the saved head's projection: `*classifier.weight` or, for
/// RoBERTa's sequence head, `*classifier.out_proj.weight`, read from the
/// weights' header.
fn head_outputs(dir: &Path) -> Result<usize, EngineError> {
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    read_header(&path)?
        .iter()
        .find(|(name, _)| {
            let name = name.replace(".modules_to_save", "");
            name.ends_with("classifier.weight") || name.ends_with("classifier.out_proj.weight")
        })
        .map(|(_, entry)| entry.shape.first().copied().unwrap_or(0) as usize)
        .ok_or_else(|| EngineError::Model(format!("{} has no classification head", path.display())))
}

/// Evaluates the export in `dir`, trained for `spec` (its task, method,
/// data fields and labels), on `base` over the labelled JSON Lines file
/// `data_file` (named `data_name` in errors), reading it as `spec.data`
/// says (fields, labels, sequence length, `max_eval_examples`). The
/// predictions are in file order.
pub fn evaluate_export(
    base: &FrozenBase,
    dir: &Path,
    spec: &JobSpec,
    data_file: &Path,
    data_name: &str,
    device: Device,
) -> Result<TaskEvaluation, EngineError> {
    check_architecture_of(spec, &base.info().model_type)?;
    let job = TrainJob {
        spec: spec.clone(),
        train_file: data_file.to_path_buf(),
        eval_file: data_file.to_path_buf(),
        train_name: data_name.to_string(),
        eval_name: data_name.to_string(),
        out_dir: dir.to_path_buf(),
        checkpoint_dir: None,
        resume: Resume::Never,
    };
    match base {
        FrozenBase::Encoder(base) => evaluate_on(base, device, &job, dir),
        FrozenBase::Decoder(base) => evaluate_on(base, device, &job, dir),
    }
}

/// Loads the export in `dir` onto `base` as the job's task does, and evaluates it.
fn evaluate_on<B: SharedBase>(base: &B, device: Device, job: &TrainJob, dir: &Path) -> Result<TaskEvaluation, EngineError> {
    let (_vars, run) = base.prepare_export(device, job, dir)?;
    tch::no_grad(|| run.evaluate(0))
}
