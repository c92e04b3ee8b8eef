//! Local training without a coordinator: one TOML spec, one model folder, one
//! output folder. Progress goes to stderr, every metric to
//! `OUT/metrics.jsonl`, the final evaluation's predictions to
//! `OUT/eval_predictions.jsonl`, the PEFT export to `OUT/adapter/` (for
//! full fine-tuning, a Hugging Face model folder), and a resume checkpoint,
//! refreshed at every evaluation, to `OUT/checkpoint/`. With `resume`, a run
//! continues from that checkpoint: `metrics.jsonl` keeps the lines up to the
//! checkpoint's step and the run appends the rest.
//!
//! Local evaluation ([`eval_local`]) loads an exported classifier adapter,
//! this engine's or Hugging Face PEFT's, and evaluates it on labelled data.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use ptune_core::{JobSpec, Metric};

use crate::engine::{
    evaluate_export, export_info, Control, Engine, Event, FrozenBase, Resume, TaskEvaluation, TrainJob, TrainOutcome,
    TrainerState, TRAINER_STATE_FILE,
};

/// Subfolder of the output folder that receives the PEFT export.
pub const ADAPTER_DIR: &str = "adapter";
/// File of the output folder that receives one JSON metric per line.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File of the output folder that receives, per evaluation example in file
/// order, `{"index": i, "prediction": label}` (a list of tags for token
/// classification).
pub const PREDICTIONS_FILE: &str = "eval_predictions.jsonl";
/// Subfolder of the output folder that receives the resume checkpoint.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// Trains the job in the TOML file `spec_path` (data paths relative to it)
/// on the model folder `model_dir`, on the GPU when there is one, with
/// `threads` CPU threads for libtorch (0: every core); with `resume`,
/// continues from the checkpoint in `out_dir`.
pub fn train_local(
    spec_path: &Path,
    model_dir: &Path,
    out_dir: &Path,
    resume: bool,
    threads: usize,
) -> anyhow::Result<TrainOutcome> {
    let text = std::fs::read_to_string(spec_path).with_context(|| format!("cannot read {}", spec_path.display()))?;
    let spec = JobSpec::from_toml(&text).with_context(|| format!("{} is not a valid spec", spec_path.display()))?;
    spec.validate(None).with_context(|| format!("{} is not a valid spec", spec_path.display()))?;
    let spec_dir = spec_path.parent().unwrap_or(Path::new("."));
    let job = TrainJob {
        train_file: resolve(spec_dir, &spec.data.train),
        eval_file: resolve(spec_dir, &spec.data.eval),
        train_name: spec.data.train.clone(),
        eval_name: spec.data.eval.clone(),
        out_dir: out_dir.join(ADAPTER_DIR),
        checkpoint_dir: Some(out_dir.join(CHECKPOINT_DIR)),
        resume: if resume { Resume::Required } else { Resume::Never },
        spec,
    };
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let metrics_path = out_dir.join(METRICS_FILE);
    let kept = if resume { metrics_up_to_checkpoint(out_dir)? } else { String::new() };
    let mut metrics = BufWriter::new(
        File::create(&metrics_path).with_context(|| format!("cannot create {}", metrics_path.display()))?,
    );
    metrics.write_all(kept.as_bytes()).with_context(|| format!("cannot write {}", metrics_path.display()))?;

    let started = std::time::Instant::now();
    let mut engine = Engine::with_threads(tch::Device::cuda_if_available(), threads);
    let mut write_error = None;
    let mut on_event = |event: Event<'_>| {
        let metrics_of_event = match event {
            Event::Step { step, total_steps, metrics } => {
                let value = |name: &str| metrics.iter().find(|m| m.name == name).map_or(f64::NAN, |m| m.value);
                eprintln!(
                    "step {step}/{total_steps}  loss {:.4}  lr {:.3e}  {:.1} examples/s",
                    value("loss"),
                    value("learning_rate"),
                    value("examples_per_second"),
                );
                metrics
            }
            Event::Eval { step, metrics } => {
                let line: Vec<String> = metrics.iter().map(|m| format!("{} {:.4}", m.name, m.value)).collect();
                eprintln!("eval at step {step}  {}  ({:.1}s)", line.join("  "), started.elapsed().as_secs_f64());
                metrics
            }
            Event::Checkpoint { .. } => return Control::Continue,
        };
        let written = metrics_of_event.iter().try_for_each(|m| {
            serde_json::to_writer(&mut metrics, m).map_err(std::io::Error::from)?;
            metrics.write_all(b"\n")
        });
        match written.and_then(|()| metrics.flush()) {
            Ok(()) => Control::Continue,
            Err(e) => {
                write_error = Some(e);
                Control::Stop
            }
        }
    };
    let devices = rank_devices(engine.device(), job.spec.training.devices.max(1) as usize);
    let outcome = engine.train_data_parallel(model_dir, &job, &devices, &mut on_event)?;
    if let Some(e) = write_error {
        return Err(e).with_context(|| format!("cannot write {}", metrics_path.display()));
    }
    if !outcome.stopped {
        write_predictions(&out_dir.join(PREDICTIONS_FILE), &outcome.eval_predictions)?;
    }
    eprintln!(
        "trained {} steps in {:.1}s; {} in {}",
        outcome.steps,
        started.elapsed().as_secs_f64(),
        if job.spec.method == ptune_core::Method::Full { "model" } else { "adapter" },
        job.out_dir.display()
    );
    Ok(outcome)
}

/// The lines of `OUT/metrics.jsonl` up to the step of the checkpoint a run
/// resumes from: later ones are written again as the run repeats those steps.
fn metrics_up_to_checkpoint(out_dir: &Path) -> anyhow::Result<String> {
    let state_path = out_dir.join(CHECKPOINT_DIR).join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("no checkpoint to resume from: cannot read {}", state_path.display()))?;
    let state: TrainerState =
        serde_json::from_str(&text).with_context(|| format!("{} is not a trainer state", state_path.display()))?;
    let metrics_path = out_dir.join(METRICS_FILE);
    let text = match std::fs::read_to_string(&metrics_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", metrics_path.display())),
    };
    Ok(text
        .lines()
        .filter(|line| serde_json::from_str::<Metric>(line).is_ok_and(|m| m.step <= state.step))
        .map(|line| format!("{line}\n"))
        .collect())
}

/// A spec's data path: as written when absolute, else relative to the spec.
fn resolve(spec_dir: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        spec_dir.join(path)
    }
}

/// What `ptune-worker eval` evaluates, and how (its command-line flags).
#[derive(Clone, Debug, clap::Args)]
pub struct EvalOptions {
    /// Adapter folder (adapter_config.json, adapter_model.safetensors; ptune.json when ptune trained it).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Labelled JSON Lines to evaluate on.
    #[arg(long)]
    pub data: PathBuf,
    /// Where the base model's folder is (the worker's --models-dir).
    #[arg(skip)]
    pub models_dir: PathBuf,
    /// Base model folder name under --models-dir (default: the one the adapter names).
    #[arg(long)]
    pub base_model: Option<String>,
    /// Labels (tags, for token classification) in the head's order, comma-separated (default: the
    /// adapter's spec, or 0..n-1 for a sequence classifier saved by PEFT).
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// JSON field of the text (words, for token classification) (default: the adapter's spec, or "text").
    #[arg(long)]
    pub text_field: Option<String>,
    /// JSON field of the label (tags) (default: the adapter's spec, or "label").
    #[arg(long)]
    pub label_field: Option<String>,
    /// Tokens kept per example (default: the adapter's spec, or 128 within the model's positions).
    #[arg(long)]
    pub max_seq_len: Option<u32>,
    /// Most examples evaluated (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_examples: u64,
    /// Write {"index": i, "prediction": label} per example, in file order, to this file.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// CPU threads for libtorch (0: every core; the worker's --threads).
    #[arg(skip)]
    pub threads: usize,
}

/// Loads the adapter in `options.adapter` onto its base model and evaluates it
/// on `options.data` with the metrics training reports. Returns the spec
/// used and the evaluation.
pub fn eval_local(options: &EvalOptions) -> anyhow::Result<(JobSpec, TaskEvaluation)> {
    let info = export_info(&options.adapter)?;
    let mut spec = info.spec.clone();
    let data = &mut spec.data;
    if let Some(base_model) = &options.base_model {
        spec.base_model = base_model.clone();
    }
    if let Some(labels) = &options.labels {
        data.labels = labels.clone();
    }
    if let Some(field) = &options.text_field {
        data.text_field = field.clone();
    }
    if let Some(field) = &options.label_field {
        data.label_field = field.clone();
    }
    if let Some(len) = options.max_seq_len {
        data.max_seq_len = len;
    }
    data.max_eval_examples = options.max_examples;
    let data_name = options.data.display().to_string();
    data.train = data_name.clone();
    data.eval = data_name.clone();
    let causal_lm = spec.task == ptune_core::Task::CausalLm;
    if data.labels.is_empty() && !causal_lm {
        anyhow::bail!(
            "--labels: {} has no ptune.json naming its tags; give them in the order the adapter was trained with",
            options.adapter.display()
        );
    }
    if spec.base_model.is_empty() {
        anyhow::bail!("--base-model: {} does not name its base model", options.adapter.display());
    }
    let model_dir = options.models_dir.join(&spec.base_model);
    if !model_dir.is_dir() {
        anyhow::bail!(
            "--base-model: no folder {:?} under {}; the adapter names base model {:?}",
            spec.base_model,
            options.models_dir.display(),
            spec.base_model
        );
    }
    if options.threads > 0 {
        tch::set_num_threads(options.threads as i32);
    }
    let device = tch::Device::cuda_if_available();
    let base = FrozenBase::load(&model_dir, device)?;
    let max_positions = base.info().max_positions;
    if !info.trained_here && options.max_seq_len.is_none() {
        // 128 tokens, or what the model's positions leave beside the virtual tokens.
        let virtual_tokens = if spec.method.uses_virtual_tokens() { spec.peft.num_virtual_tokens } else { 0 };
        spec.data.max_seq_len = 128.min(max_positions.saturating_sub(virtual_tokens)).max(1);
    }
    spec.validate(Some(&ptune_core::ModelLimits { max_positions }))?;
    let evaluation = evaluate_export(&base, &options.adapter, &spec, &options.data, &data_name, device)?;
    if let Some(path) = &options.predictions {
        write_predictions(path, &evaluation.predictions)?;
    }
    Ok((spec, evaluation))
}

/// Writes `{"index": i, "prediction": p}` per prediction, one per line.
fn write_predictions(path: &Path, predictions: &[serde_json::Value]) -> anyhow::Result<()> {
    let lines: String = predictions
        .iter()
        .enumerate()
        .map(|(index, prediction)| serde_json::json!({"index": index, "prediction": prediction}).to_string() + "\n")
        .collect();
    std::fs::write(path, lines).with_context(|| format!("cannot write {}", path.display()))
}

/// The devices of a job's `ranks` data-parallel ranks: one GPU each when the
/// machine has enough, else every rank on `device`.
fn rank_devices(device: tch::Device, ranks: usize) -> Vec<tch::Device> {
    match device {
        tch::Device::Cuda(_) if tch::Cuda::device_count() as usize >= ranks => (0..ranks).map(tch::Device::Cuda).collect(),
        _ => vec![device; ranks],
    }
}
