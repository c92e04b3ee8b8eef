//! Causal-LM jobs end to end in the engine: prompt, prefix and LoRA methods and full fine-tuning train
//! on E2E pairs on tiny GPT-2 and Llama checkpoints, evaluate with loss and
//! corpus BLEU of decoded outputs, export in PEFT's `CAUSAL_LM` format that
//! `PeftModel.from_pretrained` loads with the same logits as the engine, and
//! resume exactly from a checkpoint. Bad specs are refused with the field.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ptune_core::{JobSpec, Metric, MetricKind};
use ptune_worker::engine::causal_lm::{self, LmAdapter};
use ptune_worker::engine::decoder::CausalDecoder;
use ptune_worker::engine::factory::load_causal_lm;
use ptune_worker::engine::{EngineError, Hooks, NoHooks, Resume, TrainJob, TrainOutcome};
use serde_json::{json, Value};
use support::engine::train_on;
use support::paths::{fixtures, python, workspace};
use support::synthetic::dataset;
use tch::{Device, Kind, Tensor};

const STEPS: u64 = 12;
const EVAL_INPUTS: u64 = 6;

fn spec(model: &str, method: &str, peft: Value) -> JobSpec {
    let spec = json!({
        "name": format!("e2e-{model}-{method}"), "base_model": model, "task": "causal_lm", "method": method,
        "peft": peft,
        "data": {
            "train": "train.jsonl", "eval": "dev.jsonl", "text_field": "source", "label_field": "target",
            "max_seq_len": 24, "max_train_examples": 48, "max_eval_examples": EVAL_INPUTS,
        },
        "training": {
            "learning_rate": 5e-2, "batch_size": 8, "max_steps": STEPS, "warmup_ratio": 0.1, "eval_every": 4, "seed": 5,
        },
        "generation": { "max_new_tokens": 6, "num_beams": 2 },
    });
    let spec: JobSpec = serde_json::from_value(spec).expect("spec deserializes");
    spec.validate(None).unwrap_or_else(|e| panic!("{e}"));
    spec
}

fn job(spec: JobSpec, out: &Path, resume: Resume) -> TrainJob {
    TrainJob {
        spec,
        train_file: dataset("e2e").join("train.jsonl"),
        eval_file: dataset("e2e").join("dev.jsonl"),
        train_name: "train.jsonl".into(),
        eval_name: "dev.jsonl".into(),
        out_dir: out.join("adapter"),
        checkpoint_dir: Some(out.join("checkpoint")),
        resume,
    }
}

fn train(job: &TrainJob, stop_at: Option<u64>) -> (Result<TrainOutcome, EngineError>, Vec<Metric>) {
    train_on(&fixtures().join(&job.spec.base_model), job, stop_at)
}

fn values(metrics: &[Metric], kind: MetricKind, name: &str) -> Vec<f64> {
    metrics.iter().filter(|m| m.kind == kind && m.name == name).map(|m| m.value).collect()
}

/// Prefixes of an export as per-layer keys and values, as PEFT lays them out.
struct ExportedPrefix {
    kv: Tensor,
}

impl Hooks for ExportedPrefix {
    fn prefix(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let layer = layer as i64;
        Some((self.kv.get(2 * layer).unsqueeze(0), self.kv.get(2 * layer + 1).unsqueeze(0)))
    }
}

/// LoRA updates of an export, applied as PEFT applies them.
struct ExportedLora {
    tensors: HashMap<String, Tensor>,
    scaling: f64,
}

impl Hooks for ExportedLora {
    fn linear_delta(&self, layer: usize, module: &str, xs: &Tensor) -> Option<Tensor> {
        let find = |which: &str| {
            let suffix = format!(".{layer}.{module}.{which}.weight");
            self.tensors.iter().find(|(key, _)| key.ends_with(&suffix)).map(|(_, t)| t.to_kind(Kind::Float))
        };
        let (a, b) = (find("lora_A")?, find("lora_B")?);
        Some(xs.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None) * self.scaling)
    }

    fn has_linear_deltas(&self) -> bool {
        true
    }
}

/// The engine's logits with the exported adapter, on a right-padded batch.
fn engine_logits(model: &dyn CausalDecoder, export: &Path, ids: &Tensor, mask: &Tensor) -> Tensor {
    let tensors: HashMap<String, Tensor> =
        Tensor::read_safetensors(export.join("adapter_model.safetensors")).expect("export reads").into_iter().collect();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("adapter_config.json")).unwrap()).unwrap();
    if config["peft_type"] == "LORA" {
        let scaling = config["lora_alpha"].as_f64().unwrap() / config["r"].as_f64().unwrap();
        let lora = ExportedLora { tensors, scaling };
        return tch::no_grad(|| causal_lm::logits(model, &LmAdapter { prompt: None, hooks: &lora }, ids, mask, false));
    }
    let table = tensors["prompt_embeddings"].to_kind(Kind::Float);
    tch::no_grad(|| match config["peft_type"].as_str() {
        Some("PREFIX_TUNING") => {
            let nvt = table.size()[0];
            let kv = table
                .view([nvt, model.num_layers() as i64 * 2, model.num_kv_heads(), model.head_dim()])
                .permute([1, 2, 0, 3]);
            causal_lm::logits(model, &LmAdapter { prompt: None, hooks: &ExportedPrefix { kv } }, ids, mask, false)
        }
        _ => causal_lm::logits(model, &LmAdapter { prompt: Some(&table), hooks: &NoHooks }, ids, mask, false),
    })
}

fn peft_logits(model_dir: &Path, export: &Path, inputs: &Path) -> Tensor {
    let python = python(".venv");
    let output = Command::new(&python)
        .arg(workspace().join("scripts/reference/lm_export_check.py"))
        .arg("--model")
        .arg(model_dir)
        .arg("--inputs")
        .arg(inputs)
        .arg(export)
        .output()
        .unwrap_or_else(|e| panic!("{} runs: {e}", python.display()));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let result: Value = serde_json::from_slice(&output.stdout).expect("json on stdout");
    let rows: Vec<Vec<Vec<f64>>> = serde_json::from_value(result["logits"].clone()).expect("logits");
    let (b, s, v) = (rows.len() as i64, rows[0].len() as i64, rows[0][0].len() as i64);
    let flat: Vec<f64> = rows.into_iter().flatten().flatten().collect();
    Tensor::from_slice(&flat).view([b, s, v]).to_kind(Kind::Float)
}

/// A right-padded batch of two to compare logits on, and the json file
/// that hands it to the reference script.
fn check_inputs(dir: &Path) -> (Tensor, Tensor, PathBuf) {
    let ids = Tensor::from_slice(&[5i64, 9, 12, 7, 3, 6, 11, 4, 0, 0]).view([2, 5]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0]).view([2, 5]);
    let inputs = dir.join("inputs.json");
    let inputs_json = json!({
        "input_ids": Vec::<Vec<i64>>::try_from(&ids).unwrap(),
        "attention_mask": Vec::<Vec<i64>>::try_from(&mask).unwrap(),
    });
    std::fs::write(&inputs, inputs_json.to_string()).unwrap();
    (ids, mask, inputs)
}

fn check_trains_and_exports(model_name: &str, method: &str, peft: Value, peft_type: &str) -> Value {
    let model_dir = fixtures().join(model_name);
    let out = tempfile::tempdir().expect("temp dir");
    let spec = spec(model_name, method, peft);
    let (outcome, metrics) = train(&job(spec, out.path(), Resume::Never), None);
    let outcome = outcome.unwrap_or_else(|e| panic!("{model_name} {method}: {e}"));
    assert_eq!(outcome.steps, STEPS);

    let losses = values(&metrics, MetricKind::Train, "loss");
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    assert!(
        mean(&losses[losses.len() - 3..]) < mean(&losses[..3]),
        "{model_name} {method}: the target loss goes down: {losses:?}"
    );
    let bleu = values(&metrics, MetricKind::Eval, "bleu");
    assert_eq!(bleu.len(), 3, "evaluations at steps 4, 8, 12");
    assert!(bleu.iter().all(|b| (0.0..=100.0).contains(b)), "{bleu:?}");
    assert!(values(&metrics, MetricKind::Eval, "loss").iter().all(|l| l.is_finite() && *l > 0.0));
    assert_eq!(outcome.eval_predictions.len(), EVAL_INPUTS as usize);
    assert!(outcome.eval_predictions.iter().all(Value::is_string), "{:?}", outcome.eval_predictions);

    let export = out.path().join("adapter");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["peft_type"], peft_type);

    // PEFT loads the export and computes the engine's logits.
    let (ids, mask, inputs) = check_inputs(out.path());
    let model = load_causal_lm(&model_dir, Device::Cpu).expect("model loads");
    let ours = engine_logits(model.as_ref(), &export, &ids, &mask);
    let theirs = peft_logits(&model_dir, &export, &inputs);
    assert_eq!(ours.size(), theirs.size(), "{model_name} {method}: logit shapes");
    // Compare real positions only (padding rows differ by convention).
    let nvt = ours.size()[1] - 5;
    let real = Tensor::cat(&[Tensor::ones([2, nvt], (Kind::Int64, Device::Cpu)), mask.shallow_clone()], 1);
    let rows = real.reshape([-1]).ne(0).nonzero().squeeze_dim(1);
    let vocab = ours.size()[2];
    let pick = |t: &Tensor| t.reshape([-1, vocab]).index_select(0, &rows);
    let diff = f64::try_from((pick(&ours) - pick(&theirs)).abs().max()).unwrap();
    eprintln!(
        "{model_name} {method}: train loss {:.3} -> {:.3}, bleu {bleu:?}, logits {:?}, PEFT max diff {diff:.2e}, outputs {:?}",
        losses[0],
        losses[losses.len() - 1],
        ours.size(),
        &outcome.eval_predictions[..2]
    );
    assert!(diff < 1e-4, "{model_name} {method}: PEFT's logits of the export differ by {diff}");
    // And the adapter matters: the plain model's logits at the real tokens differ.
    let plain = tch::no_grad(|| causal_lm::logits(model.as_ref(), &LmAdapter::none(), &ids, &mask, false));
    let at_tokens = ours.narrow(1, nvt, 5);
    let moved = f64::try_from((at_tokens.get(0) - plain.get(0)).abs().max()).unwrap();
    assert!(moved > 1e-3, "{model_name} {method}: the adapter leaves the logits unchanged ({moved})");
    config
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs the reference Python environment (transformers, peft); scripts/test.sh runs it")]
fn prompt_tuning_on_gpt2_trains_decodes_and_exports_for_peft() {
    check_trains_and_exports("tiny-gpt2", "prompt_tuning", json!({"num_virtual_tokens": 4, "init": "vocab"}), "PROMPT_TUNING");
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs the reference Python environment (transformers, peft); scripts/test.sh runs it")]
fn p_tuning_on_gpt2_exports_its_encoders_prompt() {
    let peft = json!({"num_virtual_tokens": 4, "encoder_reparameterization_type": "mlp", "encoder_hidden_size": 16});
    check_trains_and_exports("tiny-gpt2", "p_tuning", peft, "P_TUNING");
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs the reference Python environment (transformers, peft); scripts/test.sh runs it")]
fn prefix_tuning_with_a_projection_on_gpt2() {
    let peft = json!({"num_virtual_tokens": 4, "prefix_projection": true, "encoder_hidden_size": 16});
    check_trains_and_exports("tiny-gpt2", "prefix_tuning", peft, "PREFIX_TUNING");
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs the reference Python environment (transformers, peft); scripts/test.sh runs it")]
fn p_tuning_v2_on_llama_with_grouped_query_attention() {
    check_trains_and_exports("tiny-llama", "p_tuning_v2", json!({"num_virtual_tokens": 4, "prefix_dropout": 0.1}), "PREFIX_TUNING");
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs the reference Python environment (transformers, peft); scripts/test.sh runs it")]
fn lora_on_gpt2_trains_its_conv1d_linears_and_exports_for_peft() {
    let peft = json!({"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["c_attn", "c_proj"]});
    let config = check_trains_and_exports("tiny-gpt2", "lora", peft, "LORA");
    // "c_proj" is both the attention's and the MLP's output projection.
    assert_eq!(config["target_modules"], json!(["attn.c_attn", "attn.c_proj", "mlp.c_proj"]));
    assert_eq!(config["fan_in_fan_out"], true, "GPT-2's Conv1D stores its weight as [in, out]");
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs the reference Python environment (transformers, peft); scripts/test.sh runs it")]
fn lora_on_llama_defaults_to_the_query_and_value_projections() {
    let config = check_trains_and_exports("tiny-llama", "lora", json!({"r": 2, "lora_alpha": 4}), "LORA");
    assert_eq!(config["target_modules"], json!(["self_attn.q_proj", "self_attn.v_proj"]));
    assert_eq!(config["fan_in_fan_out"], false);
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs the reference Python environment (transformers, peft); scripts/test.sh runs it")]
fn lora_on_qwen2_trains_every_projection_with_biased_attention() {
    let every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let config = check_trains_and_exports("tiny-qwen2", "lora", json!({"r": 2, "target_modules": every}), "LORA");
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs the reference Python environment (transformers, peft); scripts/test.sh runs it")]
fn full_fine_tuning_on_gpt2_exports_a_model_folder_with_its_tied_head() {
    check_full_fine_tuning("tiny-gpt2");
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs the reference Python environment (transformers, peft); scripts/test.sh runs it")]
fn full_fine_tuning_on_llama_exports_a_model_folder_with_its_own_head() {
    check_full_fine_tuning("tiny-llama");
}

/// Full fine-tuning trains the job's own copy of the decoder and exports it
/// as a model folder that transformers loads with the engine's logits, which
/// differ from the base model's.
fn check_full_fine_tuning(model_name: &str) {
    let model_dir = fixtures().join(model_name);
    let out = tempfile::tempdir().expect("temp dir");
    let mut spec = spec(model_name, "full", json!({}));
    spec.training.learning_rate = 1e-3;
    let (outcome, metrics) = train(&job(spec, out.path(), Resume::Never), None);
    let outcome = outcome.unwrap_or_else(|e| panic!("{model_name} full: {e}"));
    assert_eq!(outcome.steps, STEPS);
    let losses = values(&metrics, MetricKind::Train, "loss");
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    assert!(mean(&losses[losses.len() - 3..]) < mean(&losses[..3]), "{model_name} full: {losses:?}");

    let export = out.path().join("adapter");
    for file in ["model.safetensors", "config.json", "tokenizer.json", "ptune.json"] {
        assert!(export.join(file).is_file(), "{model_name} full: no {file} in the export");
    }
    assert!(!export.join("adapter_config.json").exists(), "a model folder, not an adapter");

    let (ids, mask, inputs) = check_inputs(out.path());
    let trained = load_causal_lm(&export, Device::Cpu).expect("the export loads as a model");
    let ours = tch::no_grad(|| causal_lm::logits(trained.as_ref(), &LmAdapter::none(), &ids, &mask, false));
    let theirs = peft_logits(&model_dir, &export, &inputs);
    let real = mask.reshape([-1]).ne(0).nonzero().squeeze_dim(1);
    let vocab = ours.size()[2];
    let pick = |t: &Tensor| t.reshape([-1, vocab]).index_select(0, &real);
    let diff = f64::try_from((pick(&ours) - pick(&theirs)).abs().max()).unwrap();
    assert!(diff < 1e-4, "{model_name} full: transformers' logits of the export differ by {diff}");
    let base = load_causal_lm(&model_dir, Device::Cpu).expect("base loads");
    let plain = tch::no_grad(|| causal_lm::logits(base.as_ref(), &LmAdapter::none(), &ids, &mask, false));
    let moved = f64::try_from((pick(&ours) - pick(&plain)).abs().max()).unwrap();
    eprintln!("{model_name} full: loss {:.3} -> {:.3}, transformers max diff {diff:.2e}, moved {moved:.3}", losses[0], losses[losses.len() - 1]);
    assert!(moved > 1e-3, "{model_name} full: training left the model unchanged ({moved})");
}

#[test]
fn an_export_of_every_method_evaluates_as_training_last_evaluated_it() {
    let cases = [
        ("tiny-gpt2", "prompt_tuning", json!({"num_virtual_tokens": 4, "init": "vocab"})),
        ("tiny-gpt2", "p_tuning", json!({"num_virtual_tokens": 4, "encoder_hidden_size": 16})),
        ("tiny-gpt2", "prefix_tuning", json!({"num_virtual_tokens": 4, "prefix_projection": true, "encoder_hidden_size": 16})),
        ("tiny-llama", "p_tuning_v2", json!({"num_virtual_tokens": 4, "prefix_dropout": 0.1})),
        ("tiny-gpt2", "lora", json!({"r": 4, "lora_dropout": 0.1})),
        ("tiny-llama", "full", json!({})),
    ];
    for (model, method, peft) in cases {
        let out = tempfile::tempdir().expect("temp dir");
        let mut spec = spec(model, method, peft);
        if method == "full" {
            spec.training.learning_rate = 1e-3;
        }
        let (outcome, _) = train(&job(spec, out.path(), Resume::Never), None);
        let outcome = outcome.unwrap_or_else(|e| panic!("{model} {method}: {e}"));
        let options = ptune_worker::local::EvalOptions {
            adapter: out.path().join("adapter"),
            data: dataset("e2e").join("dev.jsonl"),
            models_dir: fixtures(),
            base_model: None,
            labels: None,
            text_field: None,
            label_field: None,
            max_seq_len: None,
            max_examples: EVAL_INPUTS,
            predictions: None,
            threads: 0,
        };
        let (_, evaluation) = ptune_worker::local::eval_local(&options).unwrap_or_else(|e| panic!("{model} {method}: {e:#}"));
        let value = |metrics: &[Metric], name: &str| metrics.iter().find(|m| m.name == name).map(|m| m.value);
        for name in ["loss", "bleu"] {
            let (trained, evaluated) = (value(&outcome.final_metrics, name).unwrap(), value(&evaluation.metrics, name).unwrap());
            assert!((trained - evaluated).abs() < 1e-5, "{model} {method}: {name} {evaluated} against {trained} in training");
        }
        assert_eq!(evaluation.predictions, outcome.eval_predictions, "{model} {method}: the decoded outputs");
    }
}

#[test]
fn a_causal_lm_run_resumes_exactly() {
    check_resumes_exactly(spec("tiny-qwen2", "p_tuning_v2", json!({"num_virtual_tokens": 4, "prefix_dropout": 0.1})));
}

#[test]
fn a_causal_lm_lora_run_resumes_exactly() {
    check_resumes_exactly(spec("tiny-gpt2", "lora", json!({"r": 4, "lora_dropout": 0.1, "target_modules": ["c_attn", "c_fc"]})));
}

#[test]
fn a_causal_lm_full_fine_tuning_run_resumes_exactly() {
    let mut spec = spec("tiny-llama", "full", json!({}));
    spec.training.learning_rate = 1e-3;
    check_resumes_exactly(spec);
}

/// Stopped at step 6 and resumed from the checkpoint of step 4, the run
/// reports what the uninterrupted run reports, and decodes the same.
fn check_resumes_exactly(spec: JobSpec) {
    let whole = tempfile::tempdir().expect("temp dir");
    let (outcome, uninterrupted) = train(&job(spec.clone(), whole.path(), Resume::Never), None);
    let outcome = outcome.expect("trains");
    let broken = tempfile::tempdir().expect("temp dir");
    let (stopped, before) = train(&job(spec.clone(), broken.path(), Resume::Never), Some(6));
    assert!(stopped.expect("runs").stopped);
    let (resumed, after) = train(&job(spec, broken.path(), Resume::Required), None);
    let resumed = resumed.expect("resumes");
    let timing = |m: &Metric| m.name != "examples_per_second";
    let mut stitched: Vec<Metric> = before.into_iter().filter(|m| m.step <= 4 && timing(m)).collect();
    stitched.extend(after.into_iter().filter(timing));
    let whole_run: Vec<Metric> = uninterrupted.into_iter().filter(timing).collect();
    assert_eq!(stitched, whole_run, "the resumed run differs from the uninterrupted one");
    assert_eq!(resumed.eval_predictions, outcome.eval_predictions);
}

#[test]
fn causal_lm_specs_are_checked_against_the_decoder() {
    let out = tempfile::tempdir().expect("temp dir");
    // 40 virtual tokens + 24 + 6 generated exceed GPT-2's 48 positions.
    let long = spec("tiny-gpt2", "prompt_tuning", json!({"num_virtual_tokens": 40}));
    let message = train(&job(long, out.path(), Resume::Never), None).0.expect_err("too long").to_string();
    assert!(message.contains("peft.num_virtual_tokens") && message.contains("generation.max_new_tokens 6"), "{message}");

    // A classification task on a decoder is refused before any data is read.
    let mut classify = spec("tiny-gpt2", "prompt_tuning", json!({"num_virtual_tokens": 4}));
    classify.task = ptune_core::Task::SequenceClassification;
    classify.data.labels = vec!["0".into(), "1".into()];
    classify.generation = None;
    let message = train(&job(classify, out.path(), Resume::Never), None).0.expect_err("refused").to_string();
    assert!(message.contains("task"), "{message}");

    // LoRA targets are the decoder's own linears, named as PEFT names them.
    let bert_names = spec("tiny-gpt2", "lora", json!({"target_modules": ["query", "value"]}));
    let message = train(&job(bert_names, out.path(), Resume::Never), None).0.expect_err("refused").to_string();
    assert_eq!(
        message,
        "job spec cannot run: peft.target_modules: \"query\" matches no linear layer of this model; allowed: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"
    );


}
