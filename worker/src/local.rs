//! Local training without a coordinator: one TOML spec, one model folder, one
//! output folder. Progress goes to stderr, every metric to
//! `OUT/metrics.jsonl`, the final evaluation's predictions to
//! `OUT/eval_predictions.jsonl`, the PEFT export to `OUT/adapter/` (for
//! full fine-tuning, a Hugging Face model folder), and a resume checkpoint,
//! refreshed at every evaluation, to `OUT/checkpoint/`. With `resume`, a run
//! continues from that checkpoint: `metrics.jsonl` keeps the lines up to the
//! checkpoint's step and the run appends the rest.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use ptune_core::{JobSpec, Metric};

use crate::engine::{Control, Engine, Event, Resume, TrainJob, TrainOutcome, TrainerState, TRAINER_STATE_FILE};

/// Subfolder of the output folder that receives the PEFT export.
pub const ADAPTER_DIR: &str = "adapter";
/// File of the output folder that receives one JSON metric per line.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File of the output folder that receives, per evaluation example in file
/// order, `{"index": i, "prediction": label}` (a list of tags for token
/// classification).
pub const PREDICTIONS_FILE: &str = "eval_predictions.jsonl";
/// Subfolder of the output folder that receives the resume checkpoint.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// Trains the job in the TOML file `spec_path` (data paths relative to it)
/// on the model folder `model_dir`, on the GPU when there is one, with
/// `threads` CPU threads for libtorch (0: every core); with `resume`,
/// continues from the checkpoint in `out_dir`.
pub fn train_local(
    spec_path: &Path,
    model_dir: &Path,
    out_dir: &Path,
    resume: bool,
    threads: usize,
) -> anyhow::Result<TrainOutcome> {
    let text = std::fs::read_to_string(spec_path).with_context(|| format!("cannot read {}", spec_path.display()))?;
    let spec = JobSpec::from_toml(&text).with_context(|| format!("{} is not a valid spec", spec_path.display()))?;
    spec.validate(None).with_context(|| format!("{} is not a valid spec", spec_path.display()))?;
    let spec_dir = spec_path.parent().unwrap_or(Path::new("."));
    let job = TrainJob {
        train_file: resolve(spec_dir, &spec.data.train),
        eval_file: resolve(spec_dir, &spec.data.eval),
        train_name: spec.data.train.clone(),
        eval_name: spec.data.eval.clone(),
        out_dir: out_dir.join(ADAPTER_DIR),
        checkpoint_dir: Some(out_dir.join(CHECKPOINT_DIR)),
        resume: if resume { Resume::Required } else { Resume::Never },
        spec,
    };
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let metrics_path = out_dir.join(METRICS_FILE);
    let kept = if resume { metrics_up_to_checkpoint(out_dir)? } else { String::new() };
    let mut metrics = BufWriter::new(
        File::create(&metrics_path).with_context(|| format!("cannot create {}", metrics_path.display()))?,
    );
    metrics.write_all(kept.as_bytes()).with_context(|| format!("cannot write {}", metrics_path.display()))?;

    let started = std::time::Instant::now();
    let mut engine = Engine::with_threads(tch::Device::cuda_if_available(), threads);
    let mut write_error = None;
    let mut on_event = |event: Event<'_>| {
        let metrics_of_event = match event {
            Event::Step { step, total_steps, metrics } => {
                let value = |name: &str| metrics.iter().find(|m| m.name == name).map_or(f64::NAN, |m| m.value);
                eprintln!(
                    "step {step}/{total_steps}  loss {:.4}  lr {:.3e}  {:.1} examples/s",
                    value("loss"),
                    value("learning_rate"),
                    value("examples_per_second"),
                );
                metrics
            }
            Event::Eval { step, metrics } => {
                let line: Vec<String> = metrics.iter().map(|m| format!("{} {:.4}", m.name, m.value)).collect();
                eprintln!("eval at step {step}  {}  ({:.1}s)", line.join("  "), started.elapsed().as_secs_f64());
                metrics
            }
        };
        let written = metrics_of_event.iter().try_for_each(|m| {
            serde_json::to_writer(&mut metrics, m).map_err(std::io::Error::from)?;
            metrics.write_all(b"\n")
        });
        match written.and_then(|()| metrics.flush()) {
            Ok(()) => Control::Continue,
            Err(e) => {
                write_error = Some(e);
                Control::Stop
            }
        }
    };
    let outcome = engine.train(model_dir, &job, &mut on_event)?;
    if let Some(e) = write_error {
        return Err(e).with_context(|| format!("cannot write {}", metrics_path.display()));
    }
    if !outcome.stopped {
        let lines: String = outcome
            .eval_predictions
            .iter()
            .enumerate()
            .map(|(index, prediction)| serde_json::json!({"index": index, "prediction": prediction}).to_string() + "\n")
            .collect();
        let path = out_dir.join(PREDICTIONS_FILE);
        std::fs::write(&path, lines).with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!(
        "trained {} steps in {:.1}s; {} in {}",
        outcome.steps,
        started.elapsed().as_secs_f64(),
        if job.spec.method == ptune_core::Method::Full { "model" } else { "adapter" },
        job.out_dir.display()
    );
    Ok(outcome)
}

/// The lines of `OUT/metrics.jsonl` up to the step of the checkpoint a run
/// resumes from: later ones are written again as the run repeats those steps.
fn metrics_up_to_checkpoint(out_dir: &Path) -> anyhow::Result<String> {
    let state_path = out_dir.join(CHECKPOINT_DIR).join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("no checkpoint to resume from: cannot read {}", state_path.display()))?;
    let state: TrainerState =
        serde_json::from_str(&text).with_context(|| format!("{} is not a trainer state", state_path.display()))?;
    let metrics_path = out_dir.join(METRICS_FILE);
    let text = match std::fs::read_to_string(&metrics_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", metrics_path.display())),
    };
    Ok(text
        .lines()
        .filter(|line| serde_json::from_str::<Metric>(line).is_ok_and(|m| m.step <= state.step))
        .map(|line| format!("{line}\n"))
        .collect())
}

/// A spec's data path: as written when absolute, else relative to the spec.
fn resolve(spec_dir: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        spec_dir.join(path)
    }
}
