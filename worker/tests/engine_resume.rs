//! Resume checkpoints: a run stopped after step k and resumed from its last
//! checkpoint gives the same losses, evaluations and export as a run that
//! was never interrupted, for every method and both classification tasks
//! (on BERT, and on RoBERTa for a few);
//! a checkpoint of another spec is refused; `ptune-worker train` writes the
//! export, the checkpoint and the metrics file and resumes with `--resume`.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use ptune_core::{JobSpec, Metric, MetricKind};
use support::engine::{synthetic_data_job, train_on};
use support::paths::fixtures;
use support::synthetic::dataset;
use ptune_worker::engine::{
    EngineError, Resume, TrainJob, TrainOutcome, TrainerState, ADAPTER_WEIGHTS_FILE, MODEL_WEIGHTS_FILE,
    TRAINER_STATE_FILE,
};
use serde_json::{json, Value};
use tch::Tensor;

const STEPS: u64 = 9;
const EVAL_EVERY: u64 = 3;
/// The interrupted run stops here; its last checkpoint is at step 3.
const STOP_AT: u64 = 5;

/// A job on the tiny BERT fixture: `method` with `peft` settings, and a
/// token-classification job on WNUT-17 when `ner`.
fn spec(method: &str, peft: Value, ner: bool) -> JobSpec {
    spec_on("tiny-bert", method, peft, ner)
}

/// [`spec`] on the fixture model `model`.
fn spec_on(model: &str, method: &str, peft: Value, ner: bool) -> JobSpec {
    let data = if ner {
        json!({
            "train": "train.jsonl", "eval": "dev.jsonl", "text_field": "tokens", "label_field": "tags",
            "labels": ["O", "B-corporation", "B-creative-work", "B-group", "B-location", "B-person", "B-product",
                       "I-corporation", "I-creative-work", "I-group", "I-location", "I-person", "I-product"],
            "max_seq_len": 24, "max_train_examples": 64, "max_eval_examples": 24,
        })
    } else {
        json!({
            "train": "train.jsonl", "eval": "dev.jsonl", "labels": [0, 1], "max_seq_len": 24,
            "max_train_examples": 64, "max_eval_examples": 24,
        })
    };
    let spec = json!({
        "name": format!("resume-{method}"), "base_model": model,
        "task": if ner { "token_classification" } else { "sequence_classification" },
        "method": method, "peft": peft, "data": data,
        "training": {
            "learning_rate": 1e-2, "head_learning_rate": 5e-2, "batch_size": 16, "max_steps": STEPS,
            "warmup_ratio": 0.2, "weight_decay": 0.01, "eval_every": EVAL_EVERY, "seed": 11,
        },
    });
    let spec: JobSpec = serde_json::from_value(spec).expect("spec deserializes");
    spec.validate(None).expect("spec is valid");
    spec
}

fn job(spec: JobSpec, out: &Path, resume: Resume) -> TrainJob {
    let dataset = if spec.task == ptune_core::Task::TokenClassification { "ner" } else { "sst2" };
    synthetic_data_job(spec, dataset, out.join("adapter"), Some(out.join("checkpoint")), resume)
}

fn train(job: &TrainJob, stop_at: Option<u64>) -> (Result<TrainOutcome, EngineError>, Vec<Metric>) {
    train_on(&fixtures().join(&job.spec.base_model), job, stop_at)
}

/// The metrics a user reads: loss and learning rate of every step, every
/// evaluation metric (throughput left out: it is a timing).
fn comparable(metrics: &[Metric]) -> Vec<(u64, MetricKind, String, f64)> {
    metrics
        .iter()
        .filter(|m| m.name != "examples_per_second")
        .map(|m| (m.step, m.kind, m.name.clone(), m.value))
        .collect()
}

fn export_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    let file = [ADAPTER_WEIGHTS_FILE, MODEL_WEIGHTS_FILE].into_iter().map(|f| dir.join(f)).find(|p| p.is_file());
    let file = file.unwrap_or_else(|| panic!("no export in {}", dir.display()));
    Tensor::read_safetensors(&file).expect("export reads").into_iter().collect()
}

fn trainer_state(out: &Path) -> TrainerState {
    let text = std::fs::read_to_string(out.join("checkpoint").join(TRAINER_STATE_FILE)).expect("trainer state");
    serde_json::from_str(&text).expect("trainer state parses")
}

fn check_resume_matches(method: &str, peft: Value, ner: bool) {
    check_resume_matches_on("tiny-bert", method, peft, ner);
}

fn check_resume_matches_on(model: &str, method: &str, peft: Value, ner: bool) {
    let spec = spec_on(model, method, peft, ner);
    let whole = tempfile::tempdir().expect("temp dir");
    let (outcome, uninterrupted) = train(&job(spec.clone(), whole.path(), Resume::Never), None);
    let outcome = outcome.unwrap_or_else(|e| panic!("{method}: {e}"));
    assert_eq!(outcome.steps, STEPS);

    let broken = tempfile::tempdir().expect("temp dir");
    let (stopped, before) = train(&job(spec.clone(), broken.path(), Resume::Never), Some(STOP_AT));
    assert!(stopped.expect("the first part runs").stopped);
    assert_eq!(trainer_state(broken.path()).step, 3, "{method}: the last checkpoint is the evaluation at step 3");
    let (resumed, after) = train(&job(spec, broken.path(), Resume::Required), None);
    let resumed = resumed.unwrap_or_else(|e| panic!("{method}: resume: {e}"));
    assert_eq!(resumed.steps, STEPS);
    assert!(after.iter().all(|m| m.step > 3), "{method}: the resumed run starts after the checkpoint's step");

    // Steps 1-3 from the first part, 4-9 from the resumed run: exactly the
    // uninterrupted run's values.
    let mut stitched: Vec<Metric> = before.into_iter().filter(|m| m.step <= 3).collect();
    stitched.extend(after);
    assert_eq!(comparable(&stitched), comparable(&uninterrupted), "{method}: resumed run differs");
    assert_eq!(resumed.final_metrics, outcome.final_metrics);
    assert_eq!(resumed.eval_predictions, outcome.eval_predictions);
    let (a, b) = (export_tensors(&whole.path().join("adapter")), export_tensors(&broken.path().join("adapter")));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, tensor) in &a {
        assert!(tensor.equal(&b[name]), "{method}: exported {name} differs after resuming");
    }
    assert_eq!(trainer_state(broken.path()).step, STEPS);
}

#[test]
fn prompt_tuning_resumes_exactly() {
    check_resume_matches("prompt_tuning", json!({"num_virtual_tokens": 6, "init": "vocab"}), false);
}

#[test]
fn p_tuning_with_an_lstm_encoder_resumes_exactly() {
    let peft = json!({"num_virtual_tokens": 6, "encoder_reparameterization_type": "lstm", "encoder_hidden_size": 16,
                      "encoder_num_layers": 2, "encoder_dropout": 0.1});
    check_resume_matches("p_tuning", peft, false);
}

#[test]
fn prefix_tuning_with_a_projection_resumes_exactly() {
    check_resume_matches("prefix_tuning", json!({"num_virtual_tokens": 6, "prefix_projection": true, "encoder_hidden_size": 16}), false);
}

#[test]
fn lora_and_full_fine_tuning_resume_exactly() {
    check_resume_matches("lora", json!({"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}), false);
    check_resume_matches("full", json!({}), false);
}

#[test]
fn p_tuning_v2_for_token_classification_resumes_exactly() {
    check_resume_matches("p_tuning_v2", json!({"num_virtual_tokens": 6, "prefix_dropout": 0.1}), true);
}

/// RoBERTa trains end to end: its own sequence head (and, for full
/// fine-tuning, its own encoder copy) and the token-level head.
#[test]
fn roberta_classifiers_resume_exactly() {
    check_resume_matches_on("tiny-roberta", "prompt_tuning", json!({"num_virtual_tokens": 6, "init": "vocab"}), false);
    check_resume_matches_on("tiny-roberta", "full", json!({}), false);
    check_resume_matches_on("tiny-roberta", "p_tuning_v2", json!({"num_virtual_tokens": 6, "prefix_dropout": 0.1}), true);
}

#[test]
fn a_checkpoint_save_cut_off_between_its_renames_is_recovered_and_the_run_resumes_exactly() {
    let spec = spec("prompt_tuning", json!({"num_virtual_tokens": 6, "init": "vocab"}), false);
    let whole = tempfile::tempdir().expect("temp dir");
    let (outcome, _) = train(&job(spec.clone(), whole.path(), Resume::Never), None);
    let outcome = outcome.expect("the uninterrupted run");

    let broken = tempfile::tempdir().expect("temp dir");
    let (stopped, _) = train(&job(spec.clone(), broken.path(), Resume::Never), Some(STOP_AT));
    assert!(stopped.expect("the first part runs").stopped);
    let dir = broken.path().join("checkpoint");
    let (saving, previous) = (broken.path().join(".checkpoint.saving"), broken.path().join(".checkpoint.previous"));
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap().flatten() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    };

    // Killed after the new checkpoint was written but before its trainer state:
    // the old one, renamed aside, is put back.
    copy(&dir, &saving);
    std::fs::remove_file(saving.join(TRAINER_STATE_FILE)).unwrap();
    std::fs::rename(&dir, &previous).unwrap();
    assert!(ptune_worker::engine::checkpoint::exists(&dir), "the previous checkpoint is recovered");
    assert_eq!(trainer_state(broken.path()).step, 3);

    // Killed between the two renames with the new checkpoint whole: it is used.
    std::fs::remove_dir_all(&saving).unwrap();
    copy(&dir, &saving);
    std::fs::rename(&dir, &previous).unwrap();
    let (resumed, _) = train(&job(spec, broken.path(), Resume::Required), None);
    let resumed = resumed.expect("resumes from the recovered checkpoint");
    assert_eq!(resumed.final_metrics, outcome.final_metrics, "the recovered run differs from the uninterrupted one");
    assert!(!saving.exists(), "the recovered folder took its place");
}

#[test]
fn a_checkpoint_of_another_spec_is_refused() {
    let spec = spec("prompt_tuning", json!({"num_virtual_tokens": 6}), false);
    let out = tempfile::tempdir().expect("temp dir");
    let (stopped, _) = train(&job(spec.clone(), out.path(), Resume::Never), Some(STOP_AT));
    assert!(stopped.expect("runs").stopped);

    let mut other = spec.clone();
    other.training.learning_rate = 3e-2;
    let (refused, _) = train(&job(other.clone(), out.path(), Resume::Required), None);
    let message = refused.expect_err("another spec's checkpoint is refused").to_string();
    assert!(message.contains("different job spec"), "{message}");

    // A worker retrying a job it may not have started falls back to step 0.
    let (fresh, metrics) = train(&job(other, out.path(), Resume::IfPossible), None);
    assert_eq!(fresh.expect("starts over").steps, STEPS);
    assert_eq!(metrics.iter().map(|m| m.step).min(), Some(1));

    let empty = tempfile::tempdir().expect("temp dir");
    let (missing, _) = train(&job(spec, empty.path(), Resume::Required), None);
    let message = missing.expect_err("nothing to resume").to_string();
    assert!(message.contains("no checkpoint to resume from"), "{message}");
}

#[test]
fn the_cli_writes_export_checkpoint_and_metrics_and_resumes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut spec = spec("p_tuning_v2", json!({"num_virtual_tokens": 6}), true);
    spec.data.train = dataset("ner").join("train.jsonl").display().to_string();
    spec.data.eval = dataset("ner").join("dev.jsonl").display().to_string();
    let spec_path = dir.path().join("job.toml");
    std::fs::write(&spec_path, toml::to_string(&spec).expect("spec serializes")).expect("spec written");
    let out = dir.path().join("out");
    let run = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_ptune-worker"))
            .args(["--models-dir", fixtures().to_str().unwrap(), "train", "--spec"])
            .arg(&spec_path)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .expect("ptune-worker runs");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "ptune-worker train failed: {stderr}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let stdout = run(&[]);
    assert!(stdout.contains("eval f1 = "), "{stdout}");
    assert!(out.join("adapter/adapter_config.json").is_file());
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["task_type"], "TOKEN_CLS");
    assert_eq!(config["peft_type"], "PREFIX_TUNING");
    assert_eq!(trainer_state(&out).step, STEPS);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics file");
    let lines = metrics.lines().count();
    assert_eq!(lines, STEPS as usize * 4 + 3 * 5, "4 train metrics per step, 5 eval metrics per evaluation");
    let predictions = std::fs::read_to_string(out.join("eval_predictions.jsonl")).expect("predictions");
    let first: Value = serde_json::from_str(predictions.lines().next().unwrap()).unwrap();
    assert!(first["prediction"].as_array().is_some_and(|tags| !tags.is_empty()), "{first}");

    // Resuming a finished run takes no step: it re-evaluates and re-exports,
    // and the metrics file keeps its lines.
    std::fs::remove_dir_all(out.join("adapter")).expect("export removed");
    run(&["--resume"]);
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics file"), metrics);
}
