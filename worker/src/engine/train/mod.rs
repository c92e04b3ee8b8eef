//! The training loop every task shares. A task sets a job up (its data, its
//! adapter or own copy of the base, its head) as a [`TaskRun`]; the loop
//! resumes from the job's checkpoint when asked, runs AdamW steps on the
//! job's variables with the spec's schedule, evaluates every `eval_every`
//! steps and at the end, writes checkpoints, reports every step and
//! evaluation to the caller, and exports at the end. [`drive`] runs a job
//! alone; `pack.rs` runs several on one base, each job's [`Progress`] the
//! same as alone.
//!
//! Only the job's own variables (adapter, head, and for full fine-tuning its
//! copy of the base) get gradients and optimizer state; the shared base's
//! tensors are frozen and never handed to the optimizer.

pub mod loss_scale;
mod parallel;
mod progress;
mod task;

use std::time::Instant;

use tch::nn;

pub(crate) use self::parallel::drive_rank;
pub(crate) use self::progress::{Flow, Progress};
pub use self::progress::{optimizer_for, step_seed};
pub(crate) use self::task::{eval_batch_size, PlannedStep, TaskRun};
pub use self::task::TaskEvaluation;
use crate::engine::error::EngineError;
use crate::engine::job::{Control, Event, TrainJob, TrainOutcome};

/// The training loop shared by every task: resumes from the job's
/// checkpoint when asked, runs AdamW steps on `vars` (the job's variables
/// only) with the spec's schedule, evaluates every `eval_every` steps and at
/// the end, writes a checkpoint after every evaluation, reports every step
/// and evaluation to `on_event`, and exports at the end.
///
/// Every step reseeds libtorch's generator from (seed, step), and draws
/// dropout from a stream seeded the same way, so the dropout of a step
/// depends neither on whether the run was resumed before it nor on which
/// jobs share its pass. The data order has its own generator.
pub(crate) fn drive(
    job: &TrainJob,
    base_sha256: &str,
    vars: &nn::VarStore,
    task: &dyn TaskRun,
    on_event: &mut dyn FnMut(Event<'_>) -> Control,
) -> Result<TrainOutcome, EngineError> {
    let mut progress = Progress::start(job, vars, task)?;
    while !progress.done() {
        let started = Instant::now();
        let planned = progress.begin_step();
        let loss = task.backward(&planned);
        let seconds = started.elapsed().as_secs_f64();
        match progress.end_step(&planned, &loss, seconds, 1, vars, task, on_event)? {
            Flow::Continue => {}
            Flow::Finish => break,
            Flow::Stopped(outcome) => return Ok(outcome),
        }
    }
    progress.finish(base_sha256, vars, task)
}
