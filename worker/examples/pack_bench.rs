//! The engine alone, without coordinator or worker: N jobs of batch 8 on one
//! base model trained one after another, then as one pack at each token
//! budget given, in one process, repeated ROUNDS times in alternation so
//! that drift in the machine's load hits every mode alike. Prints a markdown
//! table of training examples per second (evaluation and setup excluded:
//! each job evaluates a few dev examples once, at the end).
//!
//! `cargo run --release -p ptune-worker --example pack_bench -- [--kind KIND] [--device DEVICE] MODEL_DIR DATA_DIR [JOBS] [STEPS] [ROUNDS] [TOKENS...]`
//!
//! KIND is what the jobs train:
//! - `sst2-prompt` (the default): prompt tuning, 20 virtual tokens, SST-2
//!   sequence classification on an encoder (all-MiniLM-L6-v2);
//! - `sst2-p-tuning-v2`: P-tuning v2, 20 virtual tokens, the same task;
//! - `sst2-lora`: LoRA of rank 8 on the query and value projections, the same task;
//! - `e2e-lora`: LoRA of rank 8 on the attention's query and value
//!   projections (PEFT's default), E2E causal LM on a decoder;
//! - `e2e-prompt`: prompt tuning, 20 virtual tokens, E2E causal LM on a decoder;
//! - `e2e-p-tuning-v2`: P-tuning v2, 20 virtual tokens, E2E causal LM on a decoder.
//!
//! DEVICE is `cpu` (the default) or `cuda:N`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ptune_core::JobSpec;
use ptune_worker::engine::{Control, Engine, Event, PackJob, PackLimits, Resume, TrainJob};

/// What a benchmark's jobs train.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Sst2Prompt,
    Sst2PTuningV2,
    Sst2Lora,
    E2eLora,
    E2ePrompt,
    E2ePTuningV2,
}

impl Kind {
    fn parse(name: &str) -> Kind {
        match name {
            "sst2-prompt" => Kind::Sst2Prompt,
            "sst2-p-tuning-v2" => Kind::Sst2PTuningV2,
            "sst2-lora" => Kind::Sst2Lora,
            "e2e-lora" => Kind::E2eLora,
            "e2e-prompt" => Kind::E2ePrompt,
            "e2e-p-tuning-v2" => Kind::E2ePTuningV2,
            other => panic!(
                "unknown --kind {other:?}; one of sst2-prompt, sst2-p-tuning-v2, sst2-lora, e2e-lora, e2e-prompt, \
                 e2e-p-tuning-v2"
            ),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Sst2Prompt => "prompt-tuning jobs (20 virtual tokens, SST-2 classification)",
            Kind::Sst2PTuningV2 => "P-tuning v2 jobs (20 virtual tokens, SST-2 classification)",
            Kind::Sst2Lora => "LoRA jobs (r 8 on query and value, SST-2 classification)",
            Kind::E2eLora => "LoRA jobs (r 8 on q_proj and v_proj, E2E causal LM)",
            Kind::E2ePrompt => "prompt-tuning jobs (20 virtual tokens, E2E causal LM)",
            Kind::E2ePTuningV2 => "P-tuning v2 jobs (20 virtual tokens, E2E causal LM)",
        }
    }
}

fn job(kind: Kind, i: usize, steps: u64, data: &Path, out: &Path) -> TrainJob {
    let lrs = [3e-2, 1e-2, 3e-3, 5e-2, 2e-2, 8e-3, 4e-2, 1.5e-2];
    let lr = lrs[i % lrs.len()];
    let training = serde_json::json!({"learning_rate": lr, "head_learning_rate": 3e-2, "batch_size": 8,
                                      "max_steps": steps, "warmup_ratio": 0.0, "seed": i as u64 + 1});
    let lm_data = serde_json::json!({"train": "train.jsonl", "eval": "dev.jsonl", "text_field": "source",
                                     "label_field": "target", "max_seq_len": 64, "max_train_examples": 2000,
                                     "max_eval_examples": 4});
    let generation = serde_json::json!({"max_new_tokens": 8, "num_beams": 1});
    let sst2 = |method: &str, peft: serde_json::Value| {
        serde_json::json!({
            "name": format!("pack-{i}"), "base_model": "all-MiniLM-L6-v2", "task": "sequence_classification",
            "method": method, "peft": peft,
            "data": {"train": "train.jsonl", "eval": "dev.jsonl", "labels": [0, 1], "max_seq_len": 64,
                     "max_train_examples": 2000, "max_eval_examples": 8},
            "training": training,
        })
    };
    let spec = match kind {
        Kind::Sst2Prompt => sst2("prompt_tuning", serde_json::json!({"num_virtual_tokens": 20, "init": "vocab"})),
        Kind::Sst2PTuningV2 => sst2("p_tuning_v2", serde_json::json!({"num_virtual_tokens": 20})),
        Kind::Sst2Lora => sst2("lora", serde_json::json!({"r": 8, "lora_alpha": 16, "lora_dropout": 0.05})),
        Kind::E2eLora => serde_json::json!({
            "name": format!("pack-{i}"), "base_model": "decoder", "task": "causal_lm", "method": "lora",
            "peft": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
            "data": lm_data, "training": training, "generation": generation,
        }),
        Kind::E2ePrompt => serde_json::json!({
            "name": format!("pack-{i}"), "base_model": "decoder", "task": "causal_lm", "method": "prompt_tuning",
            "peft": {"num_virtual_tokens": 20},
            "data": lm_data, "training": training, "generation": generation,
        }),
        Kind::E2ePTuningV2 => serde_json::json!({
            "name": format!("pack-{i}"), "base_model": "decoder", "task": "causal_lm", "method": "p_tuning_v2",
            "peft": {"num_virtual_tokens": 20},
            "data": lm_data, "training": training, "generation": generation,
        }),
    };
    let spec: JobSpec = serde_json::from_value(spec).expect("spec");
    TrainJob {
        spec,
        train_file: data.join("train.jsonl"),
        eval_file: data.join("dev.jsonl"),
        train_name: "train.jsonl".into(),
        eval_name: "dev.jsonl".into(),
        out_dir: out.join(format!("pack-{i}")),
        checkpoint_dir: None,
        resume: Resume::Never,
    }
}

/// This job's share of a step's seconds: its batch over the step's
/// examples_per_second, divided among the jobs that shared the step.
fn step_share(event: Event<'_>) -> f64 {
    let Event::Step { metrics, .. } = event else { return 0.0 };
    let value = |name: &str| metrics.iter().find(|m| m.name == name).map(|m| m.value);
    8.0 / value("examples_per_second").expect("a step's throughput") / value("pack_jobs").unwrap_or(1.0)
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut kind = Kind::Sst2Prompt;
    let mut device = tch::Device::Cpu;
    while let Some(flag) = args.first().filter(|a| a.starts_with("--")).cloned() {
        let value = args.get(1).unwrap_or_else(|| panic!("{flag} needs a value")).clone();
        match flag.as_str() {
            "--kind" => kind = Kind::parse(&value),
            "--device" => device = ptune_worker::agent::devices::parse(&value).unwrap_or_else(|e| panic!("--device: {e}")),
            other => panic!("unknown flag {other}; --kind KIND or --device DEVICE"),
        }
        args.drain(..2);
    }
    let model_dir = PathBuf::from(args.first().expect("MODEL_DIR"));
    let data = PathBuf::from(args.get(1).expect("DATA_DIR"));
    let jobs: usize = args.get(2).map_or(8, |s| s.parse().unwrap());
    let steps: u64 = args.get(3).map_or(30, |s| s.parse().unwrap());
    let rounds: usize = args.get(4).map_or(2, |s| s.parse().unwrap());
    let budgets: Vec<usize> = if args.len() > 5 { args[5..].iter().map(|s| s.parse().unwrap()).collect() } else { vec![4096, 1024] };
    let out = tempfile::tempdir()?;
    let mut engine = Engine::new(device);
    let examples = (jobs as u64 * steps * 8) as f64;
    let mut rows: Vec<(String, Vec<f64>)> = vec![("one after another".into(), Vec::new())];
    rows.extend(budgets.iter().map(|b| (format!("one pack, {b} tokens per pass"), Vec::new())));
    for _ in 0..rounds {
        let started = Instant::now();
        let seconds: f64 = (0..jobs)
            .map(|i| {
                let mut seconds = 0.0;
                let mut record = |event: Event<'_>| {
                    seconds += step_share(event);
                    Control::Continue
                };
                engine.train(&model_dir, &job(kind, i, steps, &data, out.path()), &mut record).expect("trains");
                seconds
            })
            .sum();
        eprintln!("sequential: {seconds:.1} s in steps, {:.1} s in all", started.elapsed().as_secs_f64());
        rows[0].1.push(seconds);
        for (b, &max_tokens) in budgets.iter().enumerate() {
            let started = Instant::now();
            let total = std::rc::Rc::new(std::cell::Cell::new(0.0));
            let pack_job = |i: usize| {
                let total = total.clone();
                PackJob {
                    job: job(kind, i, steps, &data, out.path()),
                    on_event: Box::new(move |event: Event<'_>| {
                        total.set(total.get() + step_share(event));
                        Control::Continue
                    }),
                    on_done: Box::new(|result| {
                        result.expect("trains");
                    }),
                }
            };
            let mut rest: Vec<PackJob> = (1..jobs).map(pack_job).collect();
            let mut admit = |_room: usize| std::mem::take(&mut rest);
            engine.train_pack(&model_dir, PackLimits { max_jobs: jobs, max_tokens }, pack_job(0), &mut admit);
            eprintln!("packed {max_tokens}: {:.1} s in steps, {:.1} s in all", total.get(), started.elapsed().as_secs_f64());
            rows[b + 1].1.push(total.get());
        }
    }
    let median = |xs: &[f64]| {
        let mut xs = xs.to_vec();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let base = median(&rows[0].1);
    println!(
        "{jobs} {}, batch 8, {steps} steps, on {} ({device:?}); median of {rounds} alternating rounds.",
        kind.describe(),
        model_dir.display()
    );
    println!();
    println!("| run | seconds in steps (each round) | train examples/s | vs one after another |");
    println!("|---|---|---|---|");
    for (name, seconds) in &rows {
        let m = median(seconds);
        let each = seconds.iter().map(|s| format!("{s:.1}")).collect::<Vec<_>>().join(", ");
        println!("| {name} | {each} | {:.1} | {:.2}x |", examples / m, base / m);
    }
    Ok(())
}
