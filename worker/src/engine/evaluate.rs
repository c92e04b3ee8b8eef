//! Evaluating an exported classifier adapter on labelled data: the import
//! side of the exports. The adapter may come from this engine (its
//! `ptune.json` holds the spec it was trained with: task, fields, labels,
//! sequence length; a full fine-tuning export, a model folder, is read back
//! into the variables training declares) or from Hugging Face PEFT's
//! `save_pretrained` (its `adapter_config.json` gives the task; the caller
//! names what PEFT does not save, such as the labels' names). The prompt, prefixes or LoRA updates
//! and the trained head are loaded by [`load_adapter`] onto the frozen base
//! model; the evaluation is the one training runs, so its metrics are the
//! ones a job reports on the same file.

use std::path::Path;

use ptune_core::{JobSpec, Method, Task};
use serde_json::{json, Value};
use tch::{nn, Device};

use super::export::{load_adapter, MODEL_WEIGHTS_FILE};
use super::models::BaseModel;
use super::task_data::{TaskData, TaskEvaluation};
use super::train::{build_model, eval_batch_size};
use super::{EngineError, TrainJob, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PROVENANCE_FILE};

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
/// RoBERTa's sequence head, `*classifier.out_proj.weight`.
fn head_outputs(dir: &Path) -> Result<usize, EngineError> {
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let tensors = tch::Tensor::read_safetensors(&path)
        .map_err(|e| EngineError::Model(format!("cannot read {}: {e}", path.display())))?;
    tensors
        .iter()
        .find(|(name, _)| {
            let name = name.replace(".modules_to_save", "");
            name.ends_with("classifier.weight") || name.ends_with("classifier.out_proj.weight")
        })
        .map(|(_, tensor)| tensor.size()[0] as usize)
        .ok_or_else(|| EngineError::Model(format!("{} has no classification head", path.display())))
}

/// Evaluates the adapter in `dir` on `base` over the labelled JSON Lines file
/// `data_file` (named `data_name` in errors), reading it as `spec.data`
/// says (fields, labels, sequence length, `max_eval_examples`). The
/// predictions are in file order.
pub fn evaluate_export(
    dir: &Path,
    base: &BaseModel,
    spec: &JobSpec,
    data_file: &Path,
    data_name: &str,
    device: Device,
) -> Result<TaskEvaluation, EngineError> {
    if !matches!(spec.task, Task::SequenceClassification | Task::TokenClassification) {
        return Err(EngineError::Model(format!("{}: only classifier adapters can be evaluated", dir.display())));
    }
    let mut vars = nn::VarStore::new(device);
    let model = if spec.method == Method::Full {
        // A full fine-tuning export is the job's whole model: the same
        // variables as training declares, read back from the folder.
        let model = build_model(spec, base, &vars.root(), spec.data.labels.len())?;
        let weights = dir.join(MODEL_WEIGHTS_FILE);
        vars.load(&weights).map_err(|e| EngineError::Model(format!("cannot load {}: {e}", weights.display())))?;
        model
    } else {
        let mut model = load_adapter(dir, base, &vars.root())?;
        model.pooling = spec.head.pooling;
        model
    };
    // The data reader needs a training file: the same file, read for one example.
    let mut spec = spec.clone();
    spec.data.max_train_examples = 1;
    let job = TrainJob {
        spec,
        train_file: data_file.to_path_buf(),
        eval_file: data_file.to_path_buf(),
        train_name: data_name.to_string(),
        eval_name: data_name.to_string(),
        out_dir: dir.to_path_buf(),
        checkpoint_dir: None,
        resume: super::Resume::Never,
    };
    let data = TaskData::load(&job, base)?;
    let outputs = model.head.weight().size()[0] as usize;
    if data.num_labels() != outputs {
        return Err(EngineError::Spec(ptune_core::SpecError::new(
            "data.labels",
            format!("names {} labels, but the adapter's head has {outputs} outputs", data.num_labels()),
        )));
    }
    Ok(tch::no_grad(|| data.evaluate(&model, base, eval_batch_size(&job.spec), device, 0)))
}
