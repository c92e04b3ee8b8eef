//! What the engine tests share: training a job on a model folder, runs
//! taking turns with libtorch's process-wide generator, every metric
//! recorded, and where the workspace and all-MiniLM-L6-v2 are.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ptune_core::Metric;
use ptune_core::JobSpec;
use ptune_worker::engine::{Control, Engine, EngineError, Event, Resume, TrainJob, TrainOutcome};
use tch::Device;

/// Training seeds libtorch's process-wide generator: runs take turns.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// The device the engine tests train on: `PTUNE_TEST_DEVICE` (`cpu`, the
/// default, or `cuda:N`, as `scripts/gpu-check.sh` sets it).
pub fn device() -> Device {
    match std::env::var("PTUNE_TEST_DEVICE").unwrap_or_default().trim() {
        "" => Device::Cpu,
        name => parse_device(name),
    }
}

/// `cpu` or `cuda:N` as the worker's `--devices` reads it; panics on another name.
pub fn parse_device(name: &str) -> Device {
    ptune_worker::agent::devices::parse(name).unwrap_or_else(|e| panic!("{e}"))
}

pub use super::paths::{minilm_dir, workspace};

/// A job on `../shared/data/<dataset>` (`train.jsonl`, `dev.jsonl`) that
/// exports into `out_dir`.
pub fn shared_data_job(spec: JobSpec, dataset: &str, out_dir: PathBuf, checkpoint_dir: Option<PathBuf>, resume: Resume) -> TrainJob {
    data_job(spec, &super::paths::shared_data(dataset), out_dir, checkpoint_dir, resume)
}

/// A job on a made-up dataset shaped like `dataset` (see [`super::synthetic`]).
pub fn synthetic_data_job(spec: JobSpec, dataset: &str, out_dir: PathBuf, checkpoint_dir: Option<PathBuf>, resume: Resume) -> TrainJob {
    data_job(spec, &super::synthetic::dataset(dataset), out_dir, checkpoint_dir, resume)
}

/// The task, `../shared/data` folder and `data` section of a small job:
/// SST-2 sentiment, or WNUT-17 entity tagging when `ner`; 96 training and
/// 32 dev examples of at most 48 tokens.
pub fn small_classification_data(ner: bool) -> (&'static str, &'static str, serde_json::Value) {
    use serde_json::json;
    if ner {
        let labels = ["O", "B-corporation", "B-creative-work", "B-group", "B-location", "B-person", "B-product",
                      "I-corporation", "I-creative-work", "I-group", "I-location", "I-person", "I-product"];
        let data = json!({
            "train": "train.jsonl", "eval": "dev.jsonl", "text_field": "tokens", "label_field": "tags",
            "labels": labels, "max_seq_len": 48, "max_train_examples": 96, "max_eval_examples": 32,
        });
        ("token_classification", "ner", data)
    } else {
        let data = json!({
            "train": "train.jsonl", "eval": "dev.jsonl", "labels": [0, 1], "max_seq_len": 48,
            "max_train_examples": 96, "max_eval_examples": 32,
        });
        ("sequence_classification", "sst2", data)
    }
}

/// A job on `data/train.jsonl` and `data/dev.jsonl`.
pub fn data_job(spec: JobSpec, data: &Path, out_dir: PathBuf, checkpoint_dir: Option<PathBuf>, resume: Resume) -> TrainJob {
    TrainJob {
        spec,
        train_file: data.join("train.jsonl"),
        eval_file: data.join("dev.jsonl"),
        train_name: "train.jsonl".into(),
        eval_name: "dev.jsonl".into(),
        out_dir,
        checkpoint_dir,
        resume,
    }
}

/// Trains `job` on the model in `model_dir`, stopping (as a crash would: no
/// export) after step `stop_at`; returns the outcome and every step's and
/// evaluation's metrics.
pub fn train_on(model_dir: &Path, job: &TrainJob, stop_at: Option<u64>) -> (Result<TrainOutcome, EngineError>, Vec<Metric>) {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = Engine::new(device());
    let mut seen = Vec::new();
    let mut on_event = |event: Event<'_>| match event {
        Event::Step { step, metrics, .. } => {
            seen.extend_from_slice(metrics);
            if stop_at == Some(step) {
                Control::Stop
            } else {
                Control::Continue
            }
        }
        Event::Eval { metrics, .. } => {
            seen.extend_from_slice(metrics);
            Control::Continue
        }
        Event::Checkpoint { .. } => Control::Continue,
    };
    let outcome = engine.train(model_dir, job, &mut on_event);
    (outcome, seen)
}

/// A causal-LM spec named `name` on E2E-shaped pairs (`source` ->
/// `target`, at most 24 tokens, 48 training and 4 evaluation examples) for
/// the decoder `model` with `method` and `peft`: learning rate 5e-2, batch
/// 8, warmup 0.1, seed 5, greedy decoding of 4 tokens. `overrides` sets
/// fields of its `data`, `training` and `generation` sections.
pub fn lm_spec(name: &str, model: &str, method: &str, peft: serde_json::Value, overrides: serde_json::Value) -> JobSpec {
    let mut spec = serde_json::json!({
        "name": name, "base_model": model, "task": "causal_lm", "method": method, "peft": peft,
        "data": {
            "train": "train.jsonl", "eval": "dev.jsonl", "text_field": "source", "label_field": "target",
            "max_seq_len": 24, "max_train_examples": 48, "max_eval_examples": 4,
        },
        "training": { "learning_rate": 5e-2, "batch_size": 8, "warmup_ratio": 0.1, "seed": 5 },
        "generation": { "max_new_tokens": 4, "num_beams": 1 },
    });
    for (section, fields) in overrides.as_object().expect("overrides are sections") {
        for (field, value) in fields.as_object().expect("a section's fields") {
            spec[section][field] = value.clone();
        }
    }
    let spec: JobSpec = serde_json::from_value(spec).expect("spec deserializes");
    spec.validate(None).unwrap_or_else(|e| panic!("{name}: {e}"));
    spec
}
