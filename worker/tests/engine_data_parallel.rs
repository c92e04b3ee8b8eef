//! Data-parallel training (`training.devices`): two ranks, each on its share
//! of every batch, train the adapter one device trains on the whole batch.
//! After 20 steps every exported tensor matches the one-device run within
//! 1e-5, and so does every reported loss, for prompt tuning, P-tuning v2 and
//! LoRA on SST-2 with all-MiniLM-L6-v2, for a batch of 5 split 3 and 2, and
//! for entity tagging (a loss averaged over labelled tokens, which the
//! ranks' shares hold unevenly); and for causal LM on E2E-shaped pairs with
//! tiny GPT-2 and Llama decoders (prompt tuning, prefix tuning, P-tuning v2
//! and LoRA), whose loss is a mean over target tokens that the ranks'
//! shares also hold unevenly. The base's dropout is turned off (a copy of
//! the model folder whose config sets it to 0, and no adapter dropout):
//! with dropout on, ranks draw their own masks for their shares, so runs
//! agree in distribution only.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ptune_core::{JobSpec, Metric, MetricKind};
use ptune_worker::engine::{Control, Engine, Event, Resume, TrainJob, TrainOutcome, ADAPTER_WEIGHTS_FILE};
use serde_json::{json, Value};
use support::engine::{data_job, lm_spec, parse_device, shared_data_job, small_classification_data, SERIAL};
use support::paths::{fixtures, minilm_dir};
use support::synthetic::dataset;
use tch::{Device, Tensor};

const TOLERANCE: f64 = 1e-5;
const STEPS: u64 = 20;

/// all-MiniLM-L6-v2 with its dropout turned off, in `dir`.
fn minilm_without_dropout(dir: &Path) -> PathBuf {
    without_dropout(&minilm_dir(), dir, &["hidden_dropout_prob", "attention_probs_dropout_prob"])
}

/// The model folder `source` with the config's dropout fields `fields` set
/// to 0, in `dir`: the weights and tokenizer linked, the config rewritten.
fn without_dropout(source: &Path, dir: &Path, fields: &[&str]) -> PathBuf {
    let target = dir.join(format!("{}-no-dropout", source.file_name().unwrap().to_string_lossy()));
    std::fs::create_dir_all(&target).unwrap();
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "config.json" {
            std::os::unix::fs::symlink(entry.path(), target.join(entry.file_name())).unwrap();
        }
    }
    let mut config: Value = serde_json::from_slice(&std::fs::read(source.join("config.json")).unwrap()).unwrap();
    for field in fields {
        config[field] = json!(0.0);
    }
    std::fs::write(target.join("config.json"), config.to_string()).unwrap();
    target
}

/// A job on SST-2 (WNUT-17 entity tagging for a `ner` name) with `method`
/// and `peft`, learning rate `lr`, batch size `batch`, on `devices` devices,
/// evaluated every 8 steps on 32 dev examples.
fn job(name: &str, method: &str, peft: Value, lr: f64, batch: u32, devices: u32, out: &Path) -> TrainJob {
    let (task, dataset, data) = small_classification_data(name.starts_with("ner"));
    let spec = json!({
        "name": name, "base_model": "all-MiniLM-L6-v2", "task": task, "method": method, "peft": peft,
        "data": data,
        "training": {
            "learning_rate": lr, "head_learning_rate": 2e-2, "batch_size": batch, "max_steps": STEPS,
            "warmup_ratio": 0.1, "eval_every": 8, "seed": 7, "devices": devices,
        },
    });
    let spec: JobSpec = serde_json::from_value(spec).expect("spec deserializes");
    spec.validate(None).expect("spec is valid");
    shared_data_job(spec, dataset, out.join(format!("{name}-{devices}")), None, Resume::Never)
}

/// A causal-LM job on made-up E2E pairs with `method` and `peft` on the
/// tiny decoder `model`, learning rate `lr`, batch size 5, on `devices`
/// devices, evaluated (loss, and BLEU of greedy decoding) every 8 steps on
/// 6 inputs.
fn lm_job(name: &str, model: &str, method: &str, peft: Value, lr: f64, devices: u32, out: &Path) -> TrainJob {
    let overrides = json!({
        "data": { "max_eval_examples": 6 },
        "training": {
            "learning_rate": lr, "batch_size": 5, "max_steps": STEPS, "eval_every": 8, "seed": 7, "devices": devices,
        },
        "generation": { "max_new_tokens": 6 },
    });
    let spec = lm_spec(name, model, method, peft, overrides);
    data_job(spec, &dataset("e2e"), out.join(format!("{name}-{devices}")), None, Resume::Never)
}

/// Trains `job` over `devices` (one device: `Engine::train`); returns the
/// outcome and every reported metric.
fn train(model_dir: &Path, job: &TrainJob, devices: &[Device]) -> (TrainOutcome, Vec<Metric>) {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = Engine::new(devices[0]);
    let mut seen = Vec::new();
    let mut on_event = |event: Event<'_>| {
        match event {
            Event::Step { metrics, .. } | Event::Eval { metrics, .. } => seen.extend_from_slice(metrics),
            Event::Checkpoint { .. } => {}
        }
        Control::Continue
    };
    let outcome = match devices {
        [_] => engine.train(model_dir, job, &mut on_event),
        _ => engine.train_data_parallel(model_dir, job, devices, &mut on_event),
    };
    (outcome.expect("training succeeds"), seen)
}

/// The two ranks' devices: `PTUNE_TEST_DEVICES` (`cuda:0,cuda:1` on a
/// machine with two GPUs, as `scripts/gpu-check.sh` sets it), else both on
/// the CPU. The one-device run trains on the first.
fn rank_devices() -> Vec<Device> {
    let names = std::env::var("PTUNE_TEST_DEVICES").unwrap_or_else(|_| "cpu,cpu".into());
    let devices: Vec<Device> = names.split(',').map(|name| parse_device(name.trim())).collect();
    assert_eq!(devices.len(), 2, "PTUNE_TEST_DEVICES names two devices, got {names:?}");
    devices
}

fn export_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap().into_iter().collect()
}

/// Each classification job on all-MiniLM-L6-v2 over two ranks against the
/// same job on one device (see [`check_job_on_two_ranks`]).
fn check_two_ranks_match_one_device(jobs: &[(&str, &str, Value, f64, u32)]) {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = minilm_without_dropout(dir.path());
    for (name, method, peft, lr, batch) in jobs {
        let [alone, parallel] = [1, 2].map(|devices| job(name, method, peft.clone(), *lr, *batch, devices, dir.path()));
        check_job_on_two_ranks(name, &model_dir, &alone, &parallel);
    }
}

/// The data-parallel run `parallel` over two ranks against the same job
/// `alone` on one device: the same steps reported once each, the same
/// losses and evaluations, and the same exported tensors.
fn check_job_on_two_ranks(name: &str, model_dir: &Path, alone: &TrainJob, parallel: &TrainJob) {
    let ranks = rank_devices();
    let (alone_outcome, alone_metrics) = train(model_dir, alone, &ranks[..1]);
    let (parallel_outcome, parallel_metrics) = train(model_dir, parallel, &ranks);
    assert_eq!((parallel_outcome.steps, parallel_outcome.stopped), (STEPS, false), "{name}");

    let losses = |metrics: &[Metric]| -> Vec<(u64, MetricKind, String, f64)> {
        metrics
            .iter()
            .filter(|m| ["loss", "accuracy", "f1", "bleu"].contains(&m.name.as_str()))
            .map(|m| (m.step, m.kind, m.name.clone(), m.value))
            .collect()
    };
    let (expected, got) = (losses(&alone_metrics), losses(&parallel_metrics));
    assert_eq!(got.len(), expected.len(), "{name}: every step and evaluation is reported once");
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!((e.0, e.1, &e.2), (g.0, g.1, &g.2), "{name}");
        assert!((e.3 - g.3).abs() <= TOLERANCE, "{name}: {} at step {}: {} alone, {} over two ranks", e.2, e.0, e.3, g.3);
    }
    assert_eq!(parallel_outcome.eval_predictions, alone_outcome.eval_predictions, "{name}");

    let (expected, got) = (export_tensors(&alone.out_dir), export_tensors(&parallel.out_dir));
    assert_eq!(expected.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>(), "{name}");
    for (tensor, e) in &expected {
        let diff = (e - &got[tensor]).abs().max().double_value(&[]);
        assert!(diff <= TOLERANCE, "{name}: {tensor} differs by {diff}");
    }
    // The runs learned: the comparison is not between two initialisations.
    let train_losses: Vec<f64> =
        alone_metrics.iter().filter(|m| m.kind == MetricKind::Train && m.name == "loss").map(|m| m.value).collect();
    assert_ne!(train_losses.first(), train_losses.last(), "{name}");
}

#[test]
fn two_ranks_train_prompts_prefixes_and_lora_as_one_device() {
    check_two_ranks_match_one_device(&[
        ("prompt", "prompt_tuning", json!({"num_virtual_tokens": 8}), 1e-2, 8),
        ("p-tuning-v2", "p_tuning_v2", json!({"num_virtual_tokens": 6}), 1e-2, 8),
        ("lora", "lora", json!({"r": 4}), 1e-3, 8),
    ]);
}

/// Batches of 5 split 3 and 2 weigh each rank's mean loss by its share:
/// of the examples, and of the labelled tokens for entity tagging.
#[test]
fn uneven_shares_train_as_one_device() {
    check_two_ranks_match_one_device(&[
        ("lora-uneven", "lora", json!({"r": 4}), 1e-3, 5),
        ("ner-uneven", "p_tuning_v2", json!({"num_virtual_tokens": 6}), 1e-2, 5),
    ]);
}

/// Causal LM on tiny decoders: the loss is the mean over the batch's target
/// tokens, and the two ranks' shares (3 and 2 examples of different
/// lengths) hold different numbers of them, so each rank's mean must be
/// weighted by its share of the tokens, not of the examples.
#[test]
fn two_ranks_train_causal_lm_prompts_prefixes_and_lora_as_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let gpt2 = without_dropout(&fixtures().join("tiny-gpt2"), dir.path(), &["attn_pdrop", "embd_pdrop", "resid_pdrop"]);
    let llama = without_dropout(&fixtures().join("tiny-llama"), dir.path(), &["attention_dropout"]);
    let cases = [
        ("lm-prompt", &gpt2, "prompt_tuning", json!({"num_virtual_tokens": 4, "init": "vocab"}), 5e-2),
        ("lm-prefix", &gpt2, "prefix_tuning", json!({"num_virtual_tokens": 4, "prefix_projection": true, "encoder_hidden_size": 16}), 1e-2),
        ("lm-p-tuning-v2", &llama, "p_tuning_v2", json!({"num_virtual_tokens": 4}), 5e-2),
        ("lm-lora", &gpt2, "lora", json!({"r": 4, "lora_dropout": 0.0, "target_modules": ["c_attn", "c_fc"]}), 1e-2),
    ];
    for (name, model_dir, method, peft, lr) in cases {
        let model = model_dir.file_name().unwrap().to_string_lossy().into_owned();
        let [alone, parallel] = [1, 2].map(|devices| lm_job(name, &model, method, peft.clone(), lr, devices, dir.path()));
        check_job_on_two_ranks(name, model_dir, &alone, &parallel);
    }
}
