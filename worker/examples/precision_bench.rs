//! Training throughput of a float32 base against a bf16 (or fp16) one, in
//! one process: prompt tuning (20 virtual tokens, 64-token rows), SST-2 on
//! all-MiniLM-L6-v2 (mean pooling) or, with TASK `causal_lm`, E2E on a
//! decoder (`bench/random_decoder.py`'s Llama-shaped one), one job alone at
//! batch 32 (the demo's setting) and JOBS jobs of batch 8 as one pack, each
//! precision in turn, repeated ROUNDS times in alternation so that drift in
//! the machine's load hits both alike. Prints a markdown table of training
//! examples per second (setup and evaluation excluded: each job evaluates a
//! few dev examples once, at the end) with the lower precision's ratio to
//! float32.
//!
//! `cargo run --release -p ptune-worker --example precision_bench -- MODEL_DIR DATA_DIR [STEPS] [JOBS] [ROUNDS] [PRECISION] [TASK]`

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use ptune_core::{JobSpec, Precision};
use ptune_worker::engine::{Control, Engine, Event, PackJob, PackLimits, Resume, TrainJob};

/// What the jobs train: SST-2 classification or E2E generation.
#[derive(Clone, Copy, PartialEq)]
enum Task {
    Classification,
    CausalLm,
}

/// What the runs share.
struct Setup<'a> {
    task: Task,
    model_dir: &'a Path,
    data: &'a Path,
    out: &'a Path,
    steps: u64,
}

fn job(setup: &Setup, i: usize, batch: u32, precision: Precision) -> TrainJob {
    let lrs = [3e-2, 1e-2, 3e-3, 5e-2, 2e-2, 8e-3, 4e-2, 1.5e-2];
    let training = serde_json::json!({
        "learning_rate": lrs[i % lrs.len()], "head_learning_rate": 1e-1, "batch_size": batch,
        "max_steps": setup.steps, "warmup_ratio": 0.0, "seed": i as u64 + 1, "precision": precision.as_str(),
    });
    let spec = match setup.task {
        Task::Classification => serde_json::json!({
            "name": format!("precision-{i}"), "base_model": "all-MiniLM-L6-v2", "task": "sequence_classification",
            "method": "prompt_tuning", "peft": {"num_virtual_tokens": 20, "init": "vocab"},
            "data": {"train": "train.jsonl", "eval": "dev.jsonl", "labels": [0, 1], "max_seq_len": 64,
                     "max_train_examples": 4000, "max_eval_examples": 8},
            "head": {"pooling": "mean"},
            "training": training,
        }),
        Task::CausalLm => serde_json::json!({
            "name": format!("precision-{i}"), "base_model": "bench-llama", "task": "causal_lm",
            "method": "prompt_tuning", "peft": {"num_virtual_tokens": 20, "init": "vocab"},
            "data": {"train": "train.jsonl", "eval": "dev.jsonl", "text_field": "source", "label_field": "target",
                     "references_field": "references", "max_seq_len": 64, "max_train_examples": 4000,
                     "max_eval_examples": 4},
            "generation": {"max_new_tokens": 8, "num_beams": 1},
            "training": training,
        }),
    };
    let (data, out) = (setup.data, setup.out);
    let spec: JobSpec = serde_json::from_value(spec).expect("spec");
    spec.validate(None).expect("valid spec");
    TrainJob {
        spec,
        train_file: data.join("train.jsonl"),
        eval_file: data.join("dev.jsonl"),
        train_name: "train.jsonl".into(),
        eval_name: "dev.jsonl".into(),
        out_dir: out.join(format!("precision-{i}")),
        checkpoint_dir: None,
        resume: Resume::Never,
    }
}

/// This job's share of a step's seconds: its batch over the step's
/// examples_per_second, divided among the jobs that shared the step.
fn step_share(batch: u32, event: Event<'_>) -> f64 {
    let Event::Step { metrics, .. } = event else { return 0.0 };
    let value = |name: &str| metrics.iter().find(|m| m.name == name).map(|m| m.value);
    f64::from(batch) / value("examples_per_second").expect("a step's throughput") / value("pack_jobs").unwrap_or(1.0)
}

/// Seconds in training steps of one job of batch 32 alone.
fn alone(engine: &mut Engine, setup: &Setup, precision: Precision) -> f64 {
    let mut seconds = 0.0;
    let mut record = |event: Event<'_>| {
        seconds += step_share(32, event);
        Control::Continue
    };
    engine.train(setup.model_dir, &job(setup, 0, 32, precision), &mut record).expect("trains");
    seconds
}

/// Seconds in training steps of `jobs` jobs of batch 8 in one pack.
fn packed(engine: &mut Engine, setup: &Setup, jobs: usize, precision: Precision) -> f64 {
    let total = Rc::new(Cell::new(0.0));
    let pack_job = |i: usize| {
        let total = total.clone();
        PackJob {
            job: job(setup, i, 8, precision),
            on_event: Box::new(move |event: Event<'_>| {
                total.set(total.get() + step_share(8, event));
                Control::Continue
            }),
            on_done: Box::new(|result| {
                result.expect("trains");
            }),
        }
    };
    let mut rest: Vec<PackJob> = (1..jobs).map(pack_job).collect();
    let mut admit = |_room: usize| std::mem::take(&mut rest);
    engine.train_pack(setup.model_dir, PackLimits { max_jobs: jobs, max_tokens: 4096 }, pack_job(0), &mut admit);
    total.get()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model_dir = PathBuf::from(args.first().expect("MODEL_DIR"));
    let data = PathBuf::from(args.get(1).expect("DATA_DIR"));
    let steps: u64 = args.get(2).map_or(30, |s| s.parse().unwrap());
    let jobs: usize = args.get(3).map_or(8, |s| s.parse().unwrap());
    let rounds: usize = args.get(4).map_or(2, |s| s.parse().unwrap());
    let lower: Precision = args.get(5).map_or(Ok(Precision::Bf16), |s| s.parse()).map_err(anyhow::Error::msg)?;
    let task = match args.get(6).map_or("sequence_classification", String::as_str) {
        "sequence_classification" => Task::Classification,
        "causal_lm" => Task::CausalLm,
        other => anyhow::bail!("TASK must be sequence_classification or causal_lm, got {other:?}"),
    };
    let out = tempfile::tempdir()?;
    let setup = Setup { task, model_dir: &model_dir, data: &data, out: out.path(), steps };
    let mut engine = Engine::new(tch::Device::Cpu);
    let precisions = [Precision::Fp32, lower];
    // [mode][precision] -> seconds of each round
    let mut seconds = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for round in 0..rounds {
        for (p, &precision) in precisions.iter().enumerate() {
            let s = alone(&mut engine, &setup, precision);
            eprintln!("round {round} {precision} alone: {s:.1} s in steps");
            seconds[0][p].push(s);
            let s = packed(&mut engine, &setup, jobs, precision);
            eprintln!("round {round} {precision} packed: {s:.1} s in steps");
            seconds[1][p].push(s);
        }
    }
    let median = |xs: &[f64]| {
        let mut xs = xs.to_vec();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let rows = [
        (format!("one job alone, batch 32, {steps} steps"), (steps * 32) as f64),
        (format!("{jobs} jobs in one pack, batch 8 each, {steps} steps"), (jobs as u64 * steps * 8) as f64),
    ];
    let what = match task {
        Task::Classification => "SST-2 prompt tuning (20 virtual tokens, 64-token rows, mean pooling)",
        Task::CausalLm => "E2E causal-LM prompt tuning (20 virtual tokens, 64-token rows)",
    };
    println!(
        "{what} on {}, {} CPU threads; median of {rounds} alternating rounds.",
        model_dir.display(),
        tch::get_num_threads()
    );
    println!();
    println!("| run | fp32 train examples/s | {lower} train examples/s | {lower} vs fp32 |");
    println!("|---|---|---|---|");
    for ((name, examples), mode) in rows.iter().zip(&seconds) {
        let fp32 = examples / median(&mode[0]);
        let low = examples / median(&mode[1]);
        println!("| {name} | {fp32:.1} | {low:.1} | {:.2}x |", low / fp32);
    }
    Ok(())
}
