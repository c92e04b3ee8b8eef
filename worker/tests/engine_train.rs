//! Training behaviour a user notices: a seed reproduces a run exactly, a bad
//! data line is reported by file and line, a stop writes nothing, and a short
//! run on SST-2 learns and exports an adapter PEFT can load.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ptune_core::{JobSpec, Metric, MetricKind};
use ptune_worker::engine::{Control, Engine, EngineError, Event, Resume, TrainJob, TrainOutcome};
use support::paths::{minilm_dir, shared_data};
use tch::Device;

/// Training uses libtorch's process-wide generator and every core: tests
/// take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn sst2() -> PathBuf {
    shared_data("sst2")
}

/// A prompt-tuning spec on SST-2 with `training` lines added.
fn spec(training: &str) -> JobSpec {
    let text = format!(
        r#"
        name = "engine-test"
        base_model = "all-MiniLM-L6-v2"
        task = "sequence_classification"
        method = "prompt_tuning"
        [peft]
        num_virtual_tokens = 8
        init = "vocab"
        [data]
        train = "train.jsonl"
        eval = "dev.jsonl"
        labels = [0, 1]
        max_seq_len = 48
        [training]
        {training}
        "#
    );
    JobSpec::from_toml(&text).expect("test spec parses")
}

fn job(spec: JobSpec, train_file: PathBuf, eval_file: PathBuf, out_dir: &Path) -> TrainJob {
    TrainJob {
        spec,
        train_file,
        eval_file,
        train_name: "train.jsonl".into(),
        eval_name: "dev.jsonl".into(),
        out_dir: out_dir.to_path_buf(),
        checkpoint_dir: None,
        resume: Resume::Never,
    }
}

/// Trains and returns the outcome with every step's and evaluation's
/// metrics; `at_step` is answered to the step event of that step.
fn train(job: &TrainJob, at_step: Option<(u64, Control)>) -> (Result<TrainOutcome, EngineError>, Vec<Metric>) {
    let mut engine = Engine::new(Device::Cpu);
    let mut seen = Vec::new();
    let mut on_event = |event: Event<'_>| match event {
        Event::Step { step, metrics, .. } => {
            seen.extend_from_slice(metrics);
            match at_step {
                Some((at, control)) if at == step => control,
                _ => Control::Continue,
            }
        }
        Event::Eval { metrics, .. } => {
            seen.extend_from_slice(metrics);
            Control::Continue
        }
        Event::Checkpoint { .. } => Control::Continue,
    };
    let outcome = engine.train(&minilm_dir(), job, &mut on_event);
    (outcome, seen)
}

fn values(metrics: &[Metric], kind: MetricKind, name: &str) -> Vec<f64> {
    metrics.iter().filter(|m| m.kind == kind && m.name == name).map(|m| m.value).collect()
}

#[test]
fn the_same_seed_gives_the_same_losses() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().expect("temp dir");
    let training = "learning_rate = 3e-2\nbatch_size = 16\nmax_steps = 5\nwarmup_ratio = 0.2\nseed = 7";
    let mut spec = spec(training);
    spec.data.max_train_examples = 96;
    spec.data.max_eval_examples = 32;
    let run = |spec: JobSpec| {
        let job = job(spec, sst2().join("train.jsonl"), sst2().join("dev.jsonl"), out.path());
        let (outcome, metrics) = train(&job, None);
        assert_eq!(outcome.expect("training succeeds").steps, 5);
        values(&metrics, MetricKind::Train, "loss")
    };

    let first = run(spec.clone());
    let second = run(spec.clone());
    assert_eq!(first.len(), 5);
    assert_eq!(first, second, "a second run with the same seed gave other losses");

    spec.training.seed = 8;
    assert_ne!(run(spec), first, "another seed gave the same losses");
}

#[test]
fn a_malformed_line_names_the_file_and_line() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("temp dir");
    let good = "{\"text\": \"a fine film\", \"label\": 1}\n";
    let cases = [
        ("{\"text\": 3, \"label\": 1}", "expected a string in field \"text\""),
        ("{\"label\": 1}", "missing field \"text\""),
        ("{\"text\": \"dull\", \"label\": 2}", "label 2 in field \"label\" is not one of data.labels [0, 1]"),
        ("{\"text\": \"dull\", \"label\": 1", "invalid json"),
    ];
    for (bad, message) in cases {
        // Line 3 is blank and still counted: the bad line is line 4.
        let train_file = dir.path().join("train.jsonl");
        std::fs::write(&train_file, format!("{good}{good}\n{bad}\n{good}")).expect("writes");
        let job = job(spec("learning_rate = 1e-2"), train_file, sst2().join("dev.jsonl"), dir.path());
        let (outcome, metrics) = train(&job, None);
        let error = outcome.expect_err("a malformed line fails the job");
        let text = error.to_string();
        assert!(
            matches!(&error, EngineError::Data { file, line: 4, .. } if file == "train.jsonl"),
            "unexpected error: {text}"
        );
        assert!(text.starts_with("train.jsonl line 4: ") && text.contains(message), "unexpected message: {text}");
        assert!(!error.is_retryable(), "bad data must not be retried");
        assert!(metrics.is_empty(), "no step should run on bad data");
    }
}

#[test]
fn a_stop_ends_training_without_an_export_and_a_finish_exports_early() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().expect("temp dir");
    let mut spec = spec("learning_rate = 3e-2\nbatch_size = 8\nmax_steps = 10");
    spec.data.max_train_examples = 80;
    spec.data.max_eval_examples = 16;
    let adapter = out.path().join("adapter");
    let job = job(spec, sst2().join("train.jsonl"), sst2().join("dev.jsonl"), &adapter);
    let (outcome, metrics) = train(&job, Some((3, Control::Stop)));
    let outcome = outcome.expect("a stopped run is not an error");
    assert!(outcome.stopped);
    assert_eq!((outcome.steps, outcome.total_steps), (3, 10));
    assert_eq!(values(&metrics, MetricKind::Train, "loss").len(), 3);
    assert!(values(&metrics, MetricKind::Eval, "accuracy").is_empty(), "a stopped run does not evaluate");
    assert!(!adapter.exists(), "a stopped run must not write an export");

    // An early finish (a sweep cutting a trial) evaluates and exports instead.
    let (outcome, metrics) = train(&job, Some((3, Control::Finish)));
    let outcome = outcome.expect("an early finish is not an error");
    assert!(!outcome.stopped);
    assert_eq!((outcome.steps, outcome.total_steps), (3, 10));
    assert_eq!(values(&metrics, MetricKind::Eval, "accuracy").len(), 1);
    assert!(outcome.final_metrics.iter().all(|m| m.step == 3 && m.kind == MetricKind::Eval));
    assert!(adapter.join("adapter_model.safetensors").is_file(), "an early finish writes the export");
}

/// About 50 s on two cores in a debug build (the engine's heavy lifting is
/// libtorch's either way).
#[test]
fn a_short_run_on_sst2_learns_and_exports_a_peft_adapter() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().expect("temp dir");
    // The demo's setting: the head from scratch at a faster rate, 10% warmup,
    // over the mean of the sentence's tokens.
    let training = "learning_rate = 3e-2\nhead_learning_rate = 1e-1\nwarmup_ratio = 0.1\nbatch_size = 32\nmax_steps = 120\neval_every = 60\nseed = 42";
    let mut spec = spec(training);
    spec.head.pooling = ptune_core::Pooling::Mean;
    spec.peft.num_virtual_tokens = 20;
    spec.data.max_seq_len = 64;
    spec.data.max_train_examples = 4000;
    spec.data.max_eval_examples = 400;
    let job = job(spec, sst2().join("train.jsonl"), sst2().join("dev.jsonl"), out.path());
    let (outcome, metrics) = train(&job, None);
    let outcome = outcome.expect("training succeeds");

    let accuracy = values(&metrics, MetricKind::Eval, "accuracy");
    assert_eq!(accuracy.len(), 2, "evaluates at step 60 and at the end");
    let final_accuracy = *accuracy.last().expect("an evaluation");
    // The majority class is about 0.5; position-0 pooling reaches about 0.71.
    assert!(final_accuracy > 0.75, "eval accuracy {final_accuracy} after 120 steps");
    let losses = values(&metrics, MetricKind::Train, "loss");
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    assert!(mean(&losses[110..]) < mean(&losses[..10]), "training loss did not go down: {losses:?}");
    assert!(outcome.final_metrics.iter().any(|m| m.name == "accuracy" && m.value == final_accuracy));

    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).expect("adapter_config.json written"),
    )
    .expect("config is json");
    assert_eq!(config["peft_type"], "PROMPT_TUNING");
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["num_virtual_tokens"], 20);
    assert_eq!(config["token_dim"], 384);
    let weights = std::fs::read(out.path().join("adapter_model.safetensors")).expect("weights written");
    let weights = safetensors::SafeTensors::deserialize(&weights).expect("valid safetensors");
    let mut shapes: Vec<(String, Vec<usize>)> =
        weights.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect();
    shapes.sort();
    assert_eq!(
        shapes,
        [
            ("base_model.classifier.bias".to_string(), vec![2]),
            ("base_model.classifier.weight".to_string(), vec![2, 384]),
            ("prompt_embeddings".to_string(), vec![20, 384]),
        ]
    );
}
