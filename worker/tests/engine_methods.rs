//! Every PEFT method against Hugging Face PEFT on the tiny random BERT and
//! RoBERTa classifiers (`tests/fixtures/tiny-bert`, `tiny-roberta`): adapters saved by PEFT load into
//! the engine and give PEFT's logits; the engine's trainable forms (P-tuning
//! encoders, the prefix projection, LoRA) give PEFT's logits and gradients
//! with PEFT's weights; the engine's exports load with
//! `PeftModel.from_pretrained` (or, for full fine-tuning, as a transformers
//! model) and give the engine's logits, on the tiny model and after a few
//! steps on SST-2 with MiniLM; and a short run of each method on MiniLM lowers
//! the loss while the shared base stays as it was. The references come from
//! `scripts/reference/peft_methods.py` (versions in
//! `tests/fixtures/peft-methods*/reference.json`).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use support::engine::SERIAL;
use support::paths::{fixtures, minilm_dir, python, shared_data, workspace};
use ptune_core::{JobSpec, Metric, MetricKind};
use ptune_worker::engine::{
    build_classifier, load_classifier, write_export, Classifier, Control, Engine, Event, FrozenEncoder, Resume, TrainJob,
};
use serde_json::{json, Value};
use tch::{nn, Device, Tensor};

/// Largest absolute difference allowed against PEFT's float32 logits.
const TOLERANCE: f64 = 1e-4;


/// A tiny random classifier of one architecture and PEFT's references on it.
#[derive(Clone, Copy, Debug)]
enum Arch {
    Bert,
    Roberta,
}

const ARCHES: [Arch; 2] = [Arch::Bert, Arch::Roberta];

impl Arch {
    /// The model folder's name under the fixtures.
    fn name(self) -> &'static str {
        match self {
            Arch::Bert => "tiny-bert",
            Arch::Roberta => "tiny-roberta",
        }
    }

    fn model(self) -> PathBuf {
        fixtures().join(self.name())
    }

    /// PEFT's saved adapters and reference.json.
    fn references(self) -> PathBuf {
        fixtures().join(match self {
            Arch::Bert => "peft-methods",
            Arch::Roberta => "peft-methods-roberta",
        })
    }

    fn load(self) -> FrozenEncoder {
        FrozenEncoder::load(&self.model(), Device::Cpu).unwrap_or_else(|e| panic!("{} loads: {e}", self.name()))
    }
}

fn reference(arch: Arch) -> Value {
    let path = arch.references().join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference.json is json")
}

fn floats(value: &Value) -> Vec<f32> {
    match value {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("a number") as f32],
        other => panic!("expected numbers, got {other}"),
    }
}

fn ints(value: &Value) -> Vec<i64> {
    match value {
        Value::Array(items) => items.iter().flat_map(ints).collect(),
        Value::Number(n) => vec![n.as_i64().expect("an integer")],
        other => panic!("expected integers, got {other}"),
    }
}

fn matrix(value: &Value) -> Tensor {
    let rows = value.as_array().expect("an array").len() as i64;
    Tensor::from_slice(&floats(value)).view([rows, -1])
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    f64::try_from((a - b).abs().max()).expect("a scalar")
}

/// `[batch, seq]` ids and mask, and `[batch]` labels of the fixture.
fn inputs(reference: &Value) -> (Tensor, Tensor, Tensor) {
    let batch = reference["input_ids"].as_array().expect("input_ids").len() as i64;
    let ids = Tensor::from_slice(&ints(&reference["input_ids"])).view([batch, -1]);
    let mask = Tensor::from_slice(&ints(&reference["attention_mask"])).view([batch, -1]);
    (ids, mask, Tensor::from_slice(&ints(&reference["labels"])))
}

/// A spec for a fixture case: its method and `[peft]` settings on the tiny model.
fn case_spec(arch: Arch, case: &Value) -> JobSpec {
    let method = case["method"].as_str().expect("method");
    let mut spec = json!({
        "name": "tiny", "base_model": arch.name(), "task": "sequence_classification", "method": method,
        "peft": case["peft"],
        "data": { "train": "train.jsonl", "eval": "dev.jsonl", "labels": [0, 1], "max_seq_len": 24 },
        "training": { "learning_rate": 1e-2 },
    });
    if method != "prompt_tuning" && method != "p_tuning" && method != "prefix_tuning" && method != "p_tuning_v2" {
        spec["peft"].as_object_mut().expect("peft").remove("num_virtual_tokens");
    }
    let spec: JobSpec = serde_json::from_value(spec).expect("case spec deserializes");
    spec.validate(None).expect("case spec is valid");
    spec
}

/// Copies every tensor of a safetensors file into the variable of the same name.
fn load_variables(vars: &nn::VarStore, path: &Path) {
    let file: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(path).expect("readable safetensors").into_iter().collect();
    let variables = vars.variables();
    let ours: Vec<&String> = { let mut names: Vec<&String> = variables.keys().collect(); names.sort(); names };
    let theirs: Vec<&String> = file.keys().collect();
    assert_eq!(ours, theirs, "{}: the engine's variables are not PEFT's trainable parameters", path.display());
    tch::no_grad(|| {
        for (name, tensor) in &file {
            variables[name].shallow_clone().copy_(tensor);
        }
    });
}

/// The tiny checkpoint's own classifier, copied into the model's head.
fn load_checkpoint_head(arch: Arch, model: &Classifier) {
    let weights: HashMap<String, Tensor> =
        Tensor::read_safetensors(arch.model().join("model.safetensors")).expect("readable").into_iter().collect();
    tch::no_grad(|| {
        for (name, mut variable) in model.head.named_tensors() {
            variable.copy_(&weights[&format!("classifier.{name}")]);
        }
    });
}

/// The engine's model of a case as PEFT had it before saving: the trainable
/// form with PEFT's weights (full: the checkpoint with its classifier).
fn trainable_model(arch: Arch, base: &FrozenEncoder, name: &str, case: &Value) -> (nn::VarStore, Classifier) {
    let vars = nn::VarStore::new(Device::Cpu);
    let model = build_classifier(&case_spec(arch, case), base, &vars.root(), 2).expect("the case builds");
    if name == "full" {
        load_checkpoint_head(arch, &model);
    } else {
        load_variables(&vars, &arch.references().join(name).join("trainable.safetensors"));
    }
    (vars, model)
}

fn cases(reference: &Value) -> Vec<(String, Value)> {
    let cases: Vec<(String, Value)> =
        reference["cases"].as_object().expect("cases").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let methods: Vec<&str> = cases.iter().map(|(_, c)| c["method"].as_str().expect("method")).collect();
    for method in ["prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "lora", "full"] {
        assert!(methods.contains(&method), "reference.json has no case for {method}");
    }
    cases
}

#[test]
fn adapters_saved_by_peft_give_peft_logits() {
    for arch in ARCHES {
        let reference = reference(arch);
        let base = arch.load();
        let (ids, mask, _) = inputs(&reference);
        for (name, case) in cases(&reference) {
            if name == "full" {
                continue;
            }
            let vars = nn::VarStore::new(Device::Cpu);
            let dir = arch.references().join(&name);
            let model = load_classifier(&dir, &base, &vars.root()).unwrap_or_else(|e| panic!("{arch:?} {name}: {e}"));
            let logits = tch::no_grad(|| model.logits(&base.encoder, &ids, &mask, false));
            let diff = max_abs_diff(&logits, &matrix(&case["logits"]));
            assert!(diff < TOLERANCE, "{arch:?} {name}: logits differ from PEFT ({}) by {diff}", case["versions"]);
        }
    }
}

#[test]
fn trainable_adapters_give_peft_logits_and_gradients() {
    for arch in ARCHES {
        let reference = reference(arch);
        let base = arch.load();
        let (ids, mask, labels) = inputs(&reference);
        for (name, case) in cases(&reference) {
            let (vars, model) = trainable_model(arch, &base, &name, &case);
            let logits = model.logits(&base.encoder, &ids, &mask, false);
            let diff = max_abs_diff(&logits, &matrix(&case["logits"]));
            assert!(diff < TOLERANCE, "{arch:?} {name}: logits differ from PEFT ({}) by {diff}", case["versions"]);
            let Some(grads) = case["grads"].as_object() else { continue };
            let loss = logits.cross_entropy_for_logits(&labels);
            let loss_diff = (f64::try_from(&loss).expect("a scalar") - case["loss"].as_f64().expect("loss")).abs();
            assert!(loss_diff < TOLERANCE, "{arch:?} {name}: loss differs from PEFT by {loss_diff}");
            loss.backward();
            let variables = vars.variables();
            for (var, expected) in grads {
                let ours = variables[var].grad().reshape([-1]);
                let expected = Tensor::from_slice(&floats(expected));
                let scale = f64::try_from(expected.abs().max()).expect("a scalar").max(1e-6);
                let diff = max_abs_diff(&ours, &expected);
                assert!(
                    diff <= 1e-3 * scale,
                    "{arch:?} {name}: gradient of {var} differs from PEFT by {diff} (largest {scale})"
                );
            }
            // The frozen base gets no gradient.
            assert!(
                base.encoder.tensors().iter().all(|t| !t.requires_grad() && !t.grad().defined()),
                "{arch:?} {name}"
            );
        }
    }
}

/// The Python that loads an export of `method`: prefix tuning on BERT needs
/// the transformers 4.x environment; `None` when it is not installed.
fn python_for(method: &str) -> Option<PathBuf> {
    let venv = if method == "prefix_tuning" || method == "p_tuning_v2" { ".venv-ref4" } else { ".venv" };
    let python = python(venv);
    python.exists().then_some(python)
}

/// Logits of an export as PEFT (or transformers, for a model folder) computes them.
fn logits_in_python(python: &Path, model_dir: &Path, export: &Path, inputs_file: &Path) -> Tensor {
    let output = Command::new(python)
        .arg(workspace().join("scripts/reference/peft_methods.py"))
        .args(["check", "--model"])
        .arg(model_dir)
        .arg("--inputs")
        .arg(inputs_file)
        .arg(export)
        .output()
        .expect("python runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let result: Value = serde_json::from_slice(&output.stdout).expect("json on stdout");
    matrix(&result["logits"])
}

fn safetensors_shapes(path: &Path) -> BTreeMap<String, Vec<i64>> {
    Tensor::read_safetensors(path).expect("readable").into_iter().map(|(name, t)| (name, t.size())).collect()
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs the reference Python environment (transformers, peft); scripts/test.sh runs it")]
fn exports_load_in_peft_with_the_engine_logits() {
    for arch in ARCHES {
        exports_of_arch_load_in_peft_with_the_engine_logits(arch);
    }
}

fn exports_of_arch_load_in_peft_with_the_engine_logits(arch: Arch) {
    let reference = reference(arch);
    let base = arch.load();
    let (ids, mask, _) = inputs(&reference);
    let out = tempfile::tempdir().expect("temp dir");
    let inputs_file = out.path().join("inputs.json");
    let inputs_json = json!({ "input_ids": reference["input_ids"], "attention_mask": reference["attention_mask"] });
    std::fs::write(&inputs_file, inputs_json.to_string()).expect("writes");
    let mut checked_in_python = Vec::new();
    for (name, case) in cases(&reference) {
        let (vars, model) = trainable_model(arch, &base, &name, &case);
        let spec = case_spec(arch, &case);
        let export = out.path().join(&name);
        let provenance = json!({ "spec": spec.to_json() });
        write_export(&export, &spec, &base, &model, &vars, &provenance).expect("export written");
        let ours = tch::no_grad(|| model.logits(&base.encoder, &ids, &mask, false));

        if name != "full" {
            // The same files, names and shapes as PEFT's own save of this adapter.
            let peft_dir = arch.references().join(&name);
            // PEFT before 0.14 (the prefix references) kept `modules_to_save`
            // in the head's key; 0.21.2 and the engine do not.
            let peft_shapes: BTreeMap<String, Vec<i64>> = safetensors_shapes(&peft_dir.join("adapter_model.safetensors"))
                .into_iter()
                .map(|(key, shape)| (key.replace(".modules_to_save", ""), shape))
                .collect();
            assert_eq!(
                safetensors_shapes(&export.join("adapter_model.safetensors")),
                peft_shapes,
                "{arch:?} {name}: exported tensors differ from PEFT's"
            );
            let config: Value =
                serde_json::from_str(&std::fs::read_to_string(export.join("adapter_config.json")).expect("config"))
                    .expect("json");
            let peft_config: Value =
                serde_json::from_str(&std::fs::read_to_string(peft_dir.join("adapter_config.json")).expect("config"))
                    .expect("json");
            for key in [
                "peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                "encoder_reparameterization_type", "encoder_hidden_size", "prefix_projection", "r", "lora_alpha",
            ] {
                let (a, b) = (&config[key], &peft_config[key]);
                let same = a == b || (a.as_f64().is_some() && a.as_f64() == b.as_f64());
                assert!(same, "{arch:?} {name}: adapter_config.json {key} is {a}, PEFT wrote {b}");
            }
            assert_eq!(config["task_type"], "SEQ_CLS");
            // And it loads back into the engine unchanged.
            let reloaded_vars = nn::VarStore::new(Device::Cpu);
            let reloaded = load_classifier(&export, &base, &reloaded_vars.root()).expect("the export loads back");
            let again = tch::no_grad(|| reloaded.logits(&base.encoder, &ids, &mask, false));
            assert!(max_abs_diff(&again, &ours) < 1e-5, "{arch:?} {name}: the export loaded back gives other logits");
        }

        let method = case["method"].as_str().expect("method");
        let Some(python) = python_for(method) else {
            eprintln!("{name}: no Python environment for {method} exports; checked the files against PEFT's only");
            continue;
        };
        let theirs = logits_in_python(&python, &arch.model(), &export, &inputs_file);
        let diff = max_abs_diff(&ours, &theirs);
        assert!(
            diff < TOLERANCE,
            "{arch:?} {name}: the export loaded in Python gives logits {diff} away from the engine's"
        );
        checked_in_python.push(name);
    }
    for name in ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "lora", "full"] {
        assert!(
            checked_in_python.iter().any(|n| n == name),
            "{arch:?} {name} was not checked with PEFT; is .venv set up?"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs all-MiniLM-L6-v2; scripts/test.sh runs it")]
fn every_method_lowers_the_loss_and_leaves_the_shared_base_unchanged() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("temp dir");
    let sst2 = shared_data("sst2");
    let (train_file, eval_file) = (sst2.join("train.jsonl"), sst2.join("dev.jsonl"));
    // MiniLM: a random tiny model gives too little signal to see a loss fall
    // in a few steps.
    let model_dir = minilm_dir();
    let mut engine = Engine::new(Device::Cpu);
    let before: Vec<Tensor> =
        engine.base_model(&model_dir).expect("MiniLM loads").encoder().unwrap().encoder.tensors().iter().map(Tensor::copy).collect();
    let methods = [
        ("prompt_tuning", json!({ "num_virtual_tokens": 4 }), 3e-2),
        ("p_tuning", json!({ "num_virtual_tokens": 4, "encoder_hidden_size": 16 }), 1e-2),
        ("p_tuning", json!({ "num_virtual_tokens": 4, "encoder_reparameterization_type": "lstm" }), 1e-2),
        ("prefix_tuning", json!({ "num_virtual_tokens": 4 }), 1e-1),
        ("prefix_tuning", json!({ "num_virtual_tokens": 4, "prefix_projection": true, "encoder_hidden_size": 16 }), 1e-2),
        ("p_tuning_v2", json!({ "num_virtual_tokens": 4, "prefix_dropout": 0.1 }), 1e-1),
        ("lora", json!({ "r": 4, "lora_alpha": 8, "lora_dropout": 0.1 }), 1e-2),
        ("full", json!({}), 1e-3),
    ];
    for (i, (method, peft, lr)) in methods.into_iter().enumerate() {
        let spec = json!({
            "name": format!("sst2-{method}"), "base_model": "all-MiniLM-L6-v2", "task": "sequence_classification",
            "method": method, "peft": peft,
            // One batch of twelve examples, seen every step: the loss on it must fall.
            "data": { "train": "train.jsonl", "eval": "dev.jsonl", "labels": [0, 1], "max_seq_len": 48,
                      "max_train_examples": 12, "max_eval_examples": 8 },
            "training": { "learning_rate": lr, "head_learning_rate": 5e-2, "batch_size": 12, "max_steps": 15, "seed": 3 },
        });
        let spec: JobSpec = serde_json::from_value(spec).expect("spec deserializes");
        let out_dir = dir.path().join(format!("out-{i}"));
        let job = TrainJob {
            spec,
            train_file: train_file.clone(),
            eval_file: eval_file.clone(),
            train_name: "train.jsonl".into(),
            eval_name: "dev.jsonl".into(),
            out_dir: out_dir.clone(),
            checkpoint_dir: None,
            resume: Resume::Never,
        };
        let mut metrics: Vec<Metric> = Vec::new();
        let mut on_event = |event: Event<'_>| {
            if let Event::Step { metrics: m, .. } = event {
                metrics.extend_from_slice(m);
            }
            Control::Continue
        };
        let outcome = engine.train(&model_dir, &job, &mut on_event).unwrap_or_else(|e| panic!("{method}: {e}"));
        assert_eq!(outcome.steps, 15);
        let losses: Vec<f64> =
            metrics.iter().filter(|m| m.kind == MetricKind::Train && m.name == "loss").map(|m| m.value).collect();
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
        let (first, last) = (mean(&losses[..3]), mean(&losses[12..]));
        assert!(last < first - 0.05, "{method} {i}: loss did not go down: {first:.4} -> {last:.4}: {losses:?}");

        let after = engine.base_model(&model_dir).expect("still loaded").encoder().unwrap().encoder.tensors();
        for (a, b) in before.iter().zip(&after) {
            assert!(!b.requires_grad() && !b.grad().defined(), "{method}: the shared base got a gradient");
            assert_eq!(max_abs_diff(a, b), 0.0, "{method}: the shared base changed");
        }
        let written = if method == "full" { "model.safetensors" } else { "adapter_model.safetensors" };
        assert!(out_dir.join(written).is_file(), "{method}: no {written} written");
        if method == "full" {
            // The export is the job's own, trained copy.
            let exported: HashMap<String, Tensor> =
                Tensor::read_safetensors(out_dir.join("model.safetensors")).expect("readable").into_iter().collect();
            let query = &exported["bert.encoder.layer.0.attention.self.query.weight"];
            assert!(max_abs_diff(query, &before[5]) > 0.0, "full fine-tuning did not change its copy");
            assert_eq!(exported.len(), before.len() + 2, "every encoder weight and the head are exported");
        }
    }
}

/// A few steps of every method on SST-2 with the real MiniLM: the export,
/// loaded with PEFT (or transformers), predicts the engine's labels on dev
/// sentences.
#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs all-MiniLM-L6-v2; scripts/test.sh runs it")]
fn minilm_exports_predict_like_the_engine_on_sst2_dev() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let sst2 = shared_data("sst2");
    let dir = tempfile::tempdir().expect("temp dir");
    let dev_text = std::fs::read_to_string(sst2.join("dev.jsonl")).expect("SST-2 dev set");
    let dev_lines: Vec<&str> = dev_text.lines().filter(|l| !l.trim().is_empty()).take(24).collect();
    let dev_file = dir.path().join("dev.jsonl");
    std::fs::write(&dev_file, dev_lines.join("\n") + "\n").expect("writes");
    let max_seq_len = 48;

    let minilm = minilm_dir();
    let mut engine = Engine::new(Device::Cpu);
    let shared = engine.base_model(&minilm).expect("MiniLM loads");
    let base = shared.encoder().expect("an encoder");
    let texts: Vec<String> = dev_lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).expect("json")["text"].as_str().expect("text").to_string())
        .collect();
    let ids = base.tokenizer.encode_batch(texts.iter().map(String::as_str).collect(), max_seq_len).expect("tokenizes");
    let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
    let pad = base.tokenizer.pad_id();
    let padded: Vec<Vec<i64>> =
        ids.iter().map(|e| e.iter().copied().chain(std::iter::repeat(pad)).take(longest).collect()).collect();
    let mask: Vec<Vec<i64>> = ids.iter().map(|e| (0..longest).map(|i| i64::from(i < e.len())).collect()).collect();
    let inputs_file = dir.path().join("inputs.json");
    std::fs::write(&inputs_file, json!({ "input_ids": padded, "attention_mask": mask }).to_string()).expect("writes");

    let methods = [
        ("prompt_tuning", json!({ "num_virtual_tokens": 8, "init": "vocab" }), 3e-2),
        ("p_tuning", json!({ "num_virtual_tokens": 8, "encoder_hidden_size": 64 }), 1e-3),
        ("p_tuning", json!({ "num_virtual_tokens": 8, "encoder_reparameterization_type": "lstm", "encoder_hidden_size": 32 }), 1e-3),
        ("prefix_tuning", json!({ "num_virtual_tokens": 8, "prefix_projection": true, "encoder_hidden_size": 64 }), 1e-3),
        ("p_tuning_v2", json!({ "num_virtual_tokens": 8, "prefix_dropout": 0.1 }), 1e-2),
        ("lora", json!({ "r": 4, "lora_alpha": 16, "target_modules": ["query", "value", "intermediate.dense"] }), 1e-3),
        ("full", json!({}), 5e-5),
    ];
    let mut checked = Vec::new();
    for (i, (method, peft, lr)) in methods.into_iter().enumerate() {
        let spec = json!({
            "name": format!("minilm-{method}"), "base_model": "all-MiniLM-L6-v2", "task": "sequence_classification",
            "method": method, "peft": peft,
            "data": { "train": "train.jsonl", "eval": "dev.jsonl", "labels": [0, 1], "max_seq_len": max_seq_len,
                      "max_train_examples": 64 },
            "training": { "learning_rate": lr, "head_learning_rate": 1e-2, "batch_size": 16, "max_steps": 4, "seed": 5 },
        });
        let out_dir = dir.path().join(format!("out-{i}"));
        let job = TrainJob {
            spec: serde_json::from_value(spec).expect("spec deserializes"),
            train_file: sst2.join("train.jsonl"),
            eval_file: dev_file.clone(),
            train_name: "train.jsonl".into(),
            eval_name: "dev.jsonl".into(),
            out_dir: out_dir.clone(),
            checkpoint_dir: None,
            resume: Resume::Never,
        };
        let outcome =
            engine.train(&minilm, &job, &mut |_| Control::Continue).unwrap_or_else(|e| panic!("{method}: {e}"));
        let Some(python) = python_for(method) else {
            eprintln!("{method}: no Python environment for its exports; not checked with PEFT");
            continue;
        };
        let logits = logits_in_python(&python, &minilm, &out_dir, &inputs_file);
        let theirs: Vec<i64> = Vec::try_from(logits.argmax(-1, false)).expect("labels");
        let ours: Vec<i64> = outcome
            .eval_predictions
            .iter()
            .map(|p| p.as_str().and_then(|label| label.parse().ok()).expect("a label of [0, 1]"))
            .collect();
        assert_eq!(ours, theirs, "{method} {i}: PEFT's predictions of the export differ from the engine's");
        checked.push(method);
    }
    for method in ["prompt_tuning", "p_tuning", "lora", "full"] {
        assert!(checked.contains(&method), "{method} was not checked with PEFT; is .venv set up?");
    }
}
