//! `ptune-worker eval`: an exported adapter, the engine's (a full
//! fine-tuning model folder included) or one Hugging Face PEFT saved, loads
//! onto its base model and is evaluated with the metrics training reports:
//! for the engine's export, exactly the final evaluation of its training
//! run; for PEFT's adapter, PEFT's own loss and predictions on the fixture
//! sentences.

mod support;

use std::path::Path;
use std::process::Command;

use support::engine::{shared_data_job, train_on};
use support::paths::{fixtures, shared_data};
use ptune_core::{JobSpec, MetricKind};
use ptune_worker::engine::Resume;
use serde_json::{json, Value};

/// Runs `ptune-worker --models-dir fixtures eval ARGS --json`: the metrics on
/// success, stderr on failure.
fn eval(args: &[&str]) -> Result<Value, String> {
    let output = Command::new(env!("CARGO_BIN_EXE_ptune-worker"))
        .args(["--models-dir", fixtures().to_str().unwrap(), "--threads", "1", "eval", "--json"])
        .args(args)
        .output()
        .expect("ptune-worker runs");
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).expect("json on stdout"))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a utf-8 path")
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs ../shared/data; scripts/test.sh runs it")]
fn an_export_evaluates_to_its_training_runs_final_evaluation() {
    let tags = ["O", "B-corporation", "B-creative-work", "B-group", "B-location", "B-person", "B-product",
                "I-corporation", "I-creative-work", "I-group", "I-location", "I-person", "I-product"];
    let spec: JobSpec = serde_json::from_value(json!({
        "name": "eval-ner", "base_model": "tiny-roberta", "task": "token_classification", "method": "p_tuning_v2",
        "peft": { "num_virtual_tokens": 4 },
        "data": { "train": "train.jsonl", "eval": "dev.jsonl", "text_field": "tokens", "label_field": "tags",
                  "labels": tags, "max_seq_len": 32, "max_train_examples": 64, "max_eval_examples": 40 },
        "training": { "learning_rate": 1e-2, "batch_size": 16, "max_steps": 6, "seed": 3 },
    }))
    .expect("spec deserializes");
    let out = tempfile::tempdir().expect("temp dir");
    let adapter = out.path().join("adapter");
    let job = shared_data_job(spec, "ner", adapter.clone(), None, Resume::Never);
    let (outcome, _) = train_on(&fixtures().join("tiny-roberta"), &job, None);
    let outcome = outcome.expect("trains");

    let predictions = out.path().join("predictions.jsonl");
    let dev = shared_data("ner/dev.jsonl");
    let result = eval(&["--adapter", path(&adapter), "--data", path(&dev), "--max-examples", "40",
                        "--predictions", path(&predictions)])
        .expect("eval runs");
    assert_eq!(result["examples"], 40);
    assert_eq!(result["base_model"], "tiny-roberta");
    let finals: Vec<_> = outcome.final_metrics.iter().filter(|m| m.kind == MetricKind::Eval).collect();
    assert!(finals.iter().any(|m| m.name == "f1"), "{finals:?}");
    for metric in finals {
        let ours = result["metrics"][&metric.name].as_f64().unwrap_or_else(|| panic!("no {} in {result}", metric.name));
        assert!((ours - metric.value).abs() < 1e-6, "{}: eval {ours}, training {}", metric.name, metric.value);
    }
    let written: Vec<Value> = std::fs::read_to_string(&predictions)
        .expect("predictions written")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json")["prediction"].clone())
        .collect();
    assert_eq!(written, outcome.eval_predictions, "the tags of every word, as training predicted them");

    // Without ptune.json, a token classifier's tags must be named.
    std::fs::remove_file(adapter.join("ptune.json")).expect("removed");
    let message = eval(&["--adapter", path(&adapter), "--data", path(&dev)]).expect_err("no tags");
    assert!(message.contains("--labels"), "{message}");
    let named = eval(&["--adapter", path(&adapter), "--data", path(&dev), "--max-examples", "40",
                       "--labels", &tags.join(","), "--text-field", "tokens", "--label-field", "tags",
                       "--max-seq-len", "32"])
        .expect("eval runs with the tags named");
    assert_eq!(named["metrics"], result["metrics"]);
}

/// Full fine-tuning model folders and mean-pooled sequence classifiers
/// (whose pooling only `ptune.json` records) evaluate as they trained.
#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs ../shared/data; scripts/test.sh runs it")]
fn sequence_classifier_exports_evaluate_to_their_training_runs_final_evaluation() {
    let cases = [("tiny-bert", "full", "cls"), ("tiny-roberta", "full", "mean"), ("tiny-bert", "prompt_tuning", "mean")];
    for (model, method, pooling) in cases {
        let peft = if method == "full" { json!({}) } else { json!({ "num_virtual_tokens": 4 }) };
        let spec: JobSpec = serde_json::from_value(json!({
            "name": "eval-seq", "base_model": model, "task": "sequence_classification", "method": method,
            "peft": peft, "head": { "pooling": pooling },
            "data": { "train": "train.jsonl", "eval": "dev.jsonl", "labels": [0, 1], "max_seq_len": 32,
                      "max_train_examples": 64, "max_eval_examples": 40 },
            "training": { "learning_rate": 1e-3, "head_learning_rate": 5e-2, "batch_size": 16, "max_steps": 4, "seed": 3 },
        }))
        .expect("spec deserializes");
        let out = tempfile::tempdir().expect("temp dir");
        let export = out.path().join("model");
        let job = shared_data_job(spec, "sst2", export.clone(), None, Resume::Never);
        let (outcome, _) = train_on(&fixtures().join(model), &job, None);
        let outcome = outcome.expect("trains");
        let dev = shared_data("sst2/dev.jsonl");
        let result = eval(&["--adapter", path(&export), "--data", path(&dev), "--max-examples", "40"]).expect("eval runs");
        for metric in outcome.final_metrics.iter().filter(|m| m.kind == MetricKind::Eval) {
            let ours = result["metrics"][&metric.name].as_f64().unwrap_or_else(|| panic!("no {} in {result}", metric.name));
            let case = format!("{model} {method} {pooling} pooling");
            assert!((ours - metric.value).abs() < 1e-6, "{case} {}: eval {ours}, training {}", metric.name, metric.value);
        }
    }
}

#[test]
fn an_adapter_saved_by_peft_evaluates_to_peft_loss_and_predictions() {
    for (arch, case) in [("peft-methods", "prompt_tuning"), ("peft-methods-roberta", "lora"), ("peft-methods-roberta", "p_tuning_v2")] {
        let references = fixtures().join(arch);
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(references.join("reference.json")).expect("reference"))
                .expect("json");
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("sentences.jsonl");
        let lines: Vec<String> = reference["sentences"]
            .as_array()
            .expect("sentences")
            .iter()
            .zip(reference["labels"].as_array().expect("labels"))
            .map(|(text, label)| json!({ "text": text, "label": label }).to_string())
            .collect();
        std::fs::write(&data, lines.join("\n") + "\n").expect("written");

        let result = eval(&["--adapter", path(&references.join(case)), "--data", path(&data)])
            .unwrap_or_else(|e| panic!("{arch} {case}: {e}"));
        let expected = &reference["cases"][case];
        let loss = result["metrics"]["loss"].as_f64().expect("loss");
        assert!((loss - expected["loss"].as_f64().expect("loss")).abs() < 1e-4, "{arch} {case}: loss {loss} vs {expected}");
        let logits = expected["logits"].as_array().expect("logits");
        let correct = logits
            .iter()
            .zip(reference["labels"].as_array().expect("labels"))
            .filter(|(row, label)| {
                let row: Vec<f64> = row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                let predicted = if row[1] > row[0] { 1 } else { 0 };
                predicted == label.as_i64().unwrap()
            })
            .count();
        let accuracy = result["metrics"]["accuracy"].as_f64().expect("accuracy");
        assert_eq!(accuracy, correct as f64 / logits.len() as f64, "{arch} {case}");
    }

    // A model that is not there is named with the flag that fixes it.
    let adapter = fixtures().join("peft-methods/lora");
    let message = eval(&["--adapter", path(&adapter), "--data", "x.jsonl", "--base-model", "nowhere"]).expect_err("no model");
    assert!(message.contains("--base-model") && message.contains("nowhere"), "{message}");
}
