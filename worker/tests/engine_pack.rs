//! Packed training: jobs that share steps and forward passes on one frozen
//! base train exactly as they do alone. With the same seeds, every step's
//! loss matches the job's unpacked run within 1e-5, and so do the
//! evaluations and the exported adapter, for jobs with different methods,
//! prompt lengths, poolings, learning rates and batch sizes, a job that
//! leaves early and one that joins late, while others in the pack are
//! cancelled or stopped early (as ASHA does); also when a step's jobs are
//! split over several passes by the token budget. Classification jobs pack
//! on all-MiniLM-L6-v2, at both levels; causal-LM jobs pack on tiny GPT-2
//! (dropout everywhere, so each job's masks must come from its own stream
//! over its own batch's shape) and on a tiny Llama with grouped-query
//! attention, with prompts, prefixes of different lengths and LoRA side by
//! side.

mod support;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use support::engine::{lm_spec, shared_data_job, small_classification_data, synthetic_data_job, train_on, SERIAL};
use support::paths::minilm_dir;
use ptune_core::{JobSpec, Metric, MetricKind, Pooling};
use ptune_worker::engine::{
    Control, Engine, EngineError, Event, PackJob, PackLimits, Resume, TrainJob, TrainOutcome, ADAPTER_WEIGHTS_FILE,
};
use serde_json::{json, Value};
use tch::Tensor;

const TOLERANCE: f64 = 1e-5;

/// A job on SST-2 (or WNUT-17 entity tagging when `name` starts with
/// `ner`): `method` with `peft`, learning rate `lr`, batch size `batch`,
/// `steps` steps, evaluated every 4 steps on 32 dev examples.
fn job(name: &str, method: &str, peft: Value, lr: f64, batch: u32, steps: u64, out: &Path) -> TrainJob {
    let (task, dataset, data) = small_classification_data(name.starts_with("ner"));
    let spec = json!({
        "name": name, "base_model": "all-MiniLM-L6-v2", "task": task,
        "method": method, "peft": peft,
        "data": data,
        "training": {
            "learning_rate": lr, "head_learning_rate": 2e-2, "batch_size": batch, "max_steps": steps,
            "warmup_ratio": 0.1, "eval_every": 4, "seed": 5,
        },
    });
    let spec: JobSpec = serde_json::from_value(spec).expect("spec deserializes");
    spec.validate(None).expect("spec is valid");
    shared_data_job(spec, dataset, out.join(name), None, Resume::Never)
}

/// The pack's jobs: soft prompts of 4, 12 and 20 tokens, a P-tuning
/// encoder, P-tuning v2 prefixes (one of them tagging entities, so a step
/// has passes at both levels) and LoRA, at different rates and batch sizes.
/// `prompt-4` mean-pools its sequences, so its passes run every position
/// through the last layer for the others too. `prompt-12` stops after 6
/// steps; `lora` joins at the fourth step.
fn jobs(out: &Path) -> Vec<TrainJob> {
    let mut mean_pooled = job("prompt-4", "prompt_tuning", json!({"num_virtual_tokens": 4}), 3e-2, 8, 10, out);
    mean_pooled.spec.head.pooling = Pooling::Mean;
    vec![
        mean_pooled,
        job("prompt-12", "prompt_tuning", json!({"num_virtual_tokens": 12, "init": "vocab"}), 1e-2, 4, 6, out),
        job("prompt-20", "prompt_tuning", json!({"num_virtual_tokens": 20}), 5e-2, 6, 10, out),
        job("p-tuning", "p_tuning", json!({"num_virtual_tokens": 8, "encoder_reparameterization_type": "mlp"}), 1e-3, 8, 10, out),
        job("p-tuning-v2", "p_tuning_v2", json!({"num_virtual_tokens": 10}), 1e-2, 8, 10, out),
        job("ner-p-tuning-v2", "p_tuning_v2", json!({"num_virtual_tokens": 6}), 2e-2, 8, 10, out),
        job("lora", "lora", json!({"r": 4}), 1e-3, 8, 10, out),
    ]
}

/// A causal-LM job on E2E pairs on the tiny decoder `model` (a test
/// fixture), evaluated every 4 steps on 4 dev inputs (loss, and BLEU of
/// beam-searched outputs).
#[allow(clippy::too_many_arguments)]
fn lm_job(model: &str, name: &str, method: &str, peft: Value, lr: f64, batch: u32, steps: u64, out: &Path) -> TrainJob {
    let overrides = json!({
        "data": { "max_train_examples": 64 },
        "training": { "learning_rate": lr, "batch_size": batch, "max_steps": steps, "eval_every": 4 },
        "generation": { "max_new_tokens": 5, "num_beams": 2 },
    });
    synthetic_data_job(lm_spec(name, model, method, peft, overrides), "e2e", out.join(name), None, Resume::Never)
}

fn fixture(model: &str) -> PathBuf {
    support::paths::fixtures().join(model)
}

/// Causal-LM jobs on tiny GPT-2: soft prompts of 3 and 9 tokens, a P-tuning
/// encoder, projected prefixes, P-tuning v2 prefixes with dropout and LoRA
/// with dropout on the attention's and the MLP's input linears, at
/// different rates and batch sizes. `lm-p-tuning` is cancelled after step 3
/// and `lm-prompt-9` stopped at step 5; `lm-prefix` joins at the fourth step.
fn gpt2_jobs(out: &Path) -> Vec<TrainJob> {
    let job = |name, method, peft, lr, batch| lm_job("tiny-gpt2", name, method, peft, lr, batch, 10, out);
    vec![
        job("lm-prompt-3", "prompt_tuning", json!({"num_virtual_tokens": 3}), 5e-2, 8),
        job("lm-lora", "lora", json!({"r": 4, "lora_dropout": 0.1, "target_modules": ["c_attn", "mlp.c_fc"]}), 2e-2, 6),
        job("lm-prompt-9", "prompt_tuning", json!({"num_virtual_tokens": 9, "init": "vocab"}), 2e-2, 4),
        job("lm-p-tuning", "p_tuning", json!({"num_virtual_tokens": 5, "encoder_reparameterization_type": "lstm"}), 1e-2, 6),
        job("lm-p-tuning-v2", "p_tuning_v2", json!({"num_virtual_tokens": 6, "prefix_dropout": 0.1}), 3e-2, 8),
        job("lm-prefix", "prefix_tuning", json!({"num_virtual_tokens": 2, "prefix_projection": true}), 1e-2, 8),
    ]
}

/// Causal-LM jobs on a tiny Llama (grouped-query attention, rotary
/// positions that a prefix shifts): prefixes of 2 and 7 positions beside a
/// soft prompt and LoRA on the query and value projections.
fn llama_jobs(out: &Path) -> Vec<TrainJob> {
    let job = |name, method, peft, lr, batch| lm_job("tiny-llama", name, method, peft, lr, batch, 8, out);
    vec![
        job("llama-lora", "lora", json!({"r": 2, "lora_alpha": 4, "lora_dropout": 0.1}), 2e-2, 4),
        job("llama-p-tuning-v2-7", "p_tuning_v2", json!({"num_virtual_tokens": 7, "prefix_dropout": 0.1}), 3e-2, 8),
        job("llama-prompt-5", "prompt_tuning", json!({"num_virtual_tokens": 5}), 5e-2, 6),
        job("llama-prefix-2", "prefix_tuning", json!({"num_virtual_tokens": 2}), 2e-2, 8),
    ]
}

/// The metrics a user reads, without timings and pack sizes.
fn comparable(metrics: &[Metric]) -> Vec<(u64, MetricKind, String, f64)> {
    metrics
        .iter()
        .filter(|m| m.name != "examples_per_second" && m.name != "pack_jobs")
        .map(|m| (m.step, m.kind, m.name.clone(), m.value))
        .collect()
}

type Ending = Rc<RefCell<Option<Result<TrainOutcome, EngineError>>>>;

/// What the caller tells a job after a step, as the worker does for a
/// cancellation (`Stop`) or an ASHA early stop (`Finish`): `(job, step, control)`.
const CONTROLS: [(&str, u64, Control); 4] = [
    ("p-tuning", 3, Control::Stop),
    ("prompt-20", 5, Control::Finish),
    ("lm-p-tuning", 3, Control::Stop),
    ("lm-prompt-9", 5, Control::Finish),
];

fn control_of(name: &str) -> Option<(u64, Control)> {
    CONTROLS.iter().find(|(job, _, _)| *job == name).map(|&(_, step, control)| (step, control))
}

/// Trains `jobs` as one pack: all but the last start together, the last joins
/// once the pack has taken three steps; [`CONTROLS`] stop two of them
/// early. Returns each job's metrics and ending.
fn train_packed(model_dir: &Path, jobs: &[TrainJob], limits: PackLimits) -> Vec<(Vec<Metric>, Ending)> {
    let records: Vec<(Rc<RefCell<Vec<Metric>>>, Ending)> =
        jobs.iter().map(|_| (Rc::default(), Rc::default())).collect();
    let pack_job = |i: usize| {
        let (seen, ending) = (records[i].0.clone(), records[i].1.clone());
        let control = control_of(&jobs[i].spec.name);
        PackJob {
            job: jobs[i].clone(),
            on_event: Box::new(move |event: Event<'_>| match event {
                Event::Step { step, metrics, .. } => {
                    seen.borrow_mut().extend_from_slice(metrics);
                    match control {
                        Some((at, control)) if at == step => control,
                        _ => Control::Continue,
                    }
                }
                Event::Eval { metrics, .. } => {
                    seen.borrow_mut().extend_from_slice(metrics);
                    Control::Continue
                }
                Event::Checkpoint { .. } => Control::Continue,
            }),
            on_done: Box::new(move |result| *ending.borrow_mut() = Some(result)),
        }
    };
    let late = jobs.len() - 1;
    let mut waiting: Vec<PackJob> = (1..late).map(pack_job).collect();
    let mut calls = 0;
    let mut admit = |room: usize| {
        calls += 1;
        assert!(room >= 1, "the pack always has room for these jobs");
        match calls {
            1 => std::mem::take(&mut waiting),
            4 => vec![pack_job(late)],
            _ => Vec::new(),
        }
    };
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = Engine::new(support::engine::device());
    engine.train_pack(model_dir, limits, pack_job(0), &mut admit);
    records.into_iter().map(|(seen, ending)| (Rc::try_unwrap(seen).unwrap().into_inner(), ending)).collect()
}

fn export_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(dir.join(ADAPTER_WEIGHTS_FILE)).expect("export reads").into_iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn check_packed_matches_alone(model_dir: &Path, jobs: fn(&Path) -> Vec<TrainJob>, limits: PackLimits) {
    let alone_dir = tempfile::tempdir().expect("temp dir");
    let packed_dir = tempfile::tempdir().expect("temp dir");
    let packed = train_packed(model_dir, &jobs(packed_dir.path()), limits);
    for (job, (packed_metrics, ending)) in jobs(alone_dir.path()).iter().zip(packed) {
        let name = &job.spec.name;
        let (alone, alone_metrics) = train_on(model_dir, job, None);
        let alone = alone.unwrap_or_else(|e| panic!("{name} alone: {e}"));
        let packed = ending.borrow_mut().take().expect("every packed job ends");
        let packed = packed.unwrap_or_else(|e| panic!("{name} packed: {e}"));
        if let Some((at, control)) = control_of(name) {
            // Left the pack early: it matches the run alone up to there.
            assert_eq!(packed.steps, at, "{name}");
            assert_eq!(packed.stopped, control == Control::Stop, "{name}");
            let upto = |metrics: &[Metric]| {
                comparable(metrics).into_iter().filter(|m| m.0 < at || (m.0 == at && m.1 == MetricKind::Train)).collect::<Vec<_>>()
            };
            let (a, b) = (upto(&alone_metrics), upto(&packed_metrics));
            assert_eq!(a.len(), b.len(), "{name}");
            for (x, y) in a.iter().zip(&b) {
                assert!((x.3 - y.3).abs() <= TOLERANCE, "{name}: step {} {}: alone {} packed {}", x.0, x.2, x.3, y.3);
            }
            if control == Control::Finish {
                assert!(packed.final_metrics.iter().all(|m| m.step == at), "{name}: evaluated where it stopped");
                assert!(packed_dir.path().join(name).join(ADAPTER_WEIGHTS_FILE).is_file(), "{name}: exported");
            }
            continue;
        }
        assert_eq!(packed.steps, job.spec.training.max_steps, "{name}");
        assert_eq!(packed.eval_predictions, alone.eval_predictions, "{name}: predictions differ");

        let (a, b) = (comparable(&alone_metrics), comparable(&packed_metrics));
        assert_eq!(a.len(), b.len(), "{name}: the same steps and evaluations are reported");
        let losses = a.iter().filter(|m| m.1 == MetricKind::Train && m.2 == "loss").count();
        assert_eq!(losses as u64, job.spec.training.max_steps, "{name}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((x.0, x.1, &x.2), (y.0, y.1, &y.2), "{name}: metrics in a different order");
            assert!((x.3 - y.3).abs() <= TOLERANCE, "{name}: step {} {} {:?}: alone {} packed {}", x.0, x.2, x.1, x.3, y.3);
        }

        let (a, b) = (export_tensors(&alone_dir.path().join(name)), export_tensors(&packed_dir.path().join(name)));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{name}");
        for (key, tensor) in &a {
            let diff = max_abs_diff(tensor, &b[key]);
            assert!(diff <= 1e-4, "{name}: exported {key} differs by {diff}");
        }
    }
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs all-MiniLM-L6-v2; scripts/test.sh runs it")]
fn packed_jobs_train_exactly_as_alone() {
    check_packed_matches_alone(&minilm_dir(), jobs, PackLimits { max_jobs: 8, max_tokens: 100_000 });
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs all-MiniLM-L6-v2; scripts/test.sh runs it")]
fn a_step_split_over_several_passes_trains_exactly_as_alone() {
    // About two jobs' batches per pass.
    check_packed_matches_alone(&minilm_dir(), jobs, PackLimits { max_jobs: 8, max_tokens: 900 });
}

#[test]
fn causal_lm_jobs_on_gpt2_pack_exactly_as_alone() {
    check_packed_matches_alone(&fixture("tiny-gpt2"), gpt2_jobs, PackLimits { max_jobs: 8, max_tokens: 100_000 });
}

#[test]
fn causal_lm_jobs_split_over_several_passes_train_exactly_as_alone() {
    // About two jobs' batches per pass.
    check_packed_matches_alone(&fixture("tiny-gpt2"), gpt2_jobs, PackLimits { max_jobs: 8, max_tokens: 500 });
}

#[test]
fn causal_lm_jobs_on_llama_with_different_prefix_lengths_pack_exactly_as_alone() {
    check_packed_matches_alone(&fixture("tiny-llama"), llama_jobs, PackLimits { max_jobs: 8, max_tokens: 100_000 });
}
