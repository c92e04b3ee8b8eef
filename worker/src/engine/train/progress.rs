//! A job's place in the training loop, kept between its steps, whether it
//! trains alone or in a pack: its optimizer and schedule, its data order,
//! its step and last evaluation; resuming from its checkpoint, each step's
//! plan (examples, learning-rate factor, dropout stream), applying and
//! reporting a step, evaluating and checkpointing when due, and the export
//! at the end.

use std::path::Path;

use ptune_core::{JobSpec, Metric, MetricKind, Precision};
use tch::{nn, Tensor};

use super::loss_scale::{LossScaler, ScaledStep, MAX_SKIPPED_IN_A_ROW};
use super::task::{PlannedStep, TaskRun};
use crate::engine::checkpoint::{self, TrainerState};
use crate::engine::data::batch::EpochBatches;
use crate::engine::error::EngineError;
use crate::engine::job::{Control, Event, Resume, TrainJob, TrainOutcome};
use crate::engine::optim::{AdamW, LinearSchedule};
use crate::engine::rng::DropoutStream;

/// Steps between two trims of the allocator's free memory
/// (`allocator.rs`): the step after a trim faults its pages in again, so
/// trimming before every step made them a fifth slower.
const TRIM_EVERY: u64 = 8;

/// What the loop does after a step.
pub(crate) enum Flow {
    Continue,
    /// Finish like a completed run (export) at this step.
    Finish,
    /// Stopped on request, without an export.
    Stopped(TrainOutcome),
}

/// A job's place in the loop, kept between steps: its optimizer, schedule,
/// data order, step and last evaluation.
pub(crate) struct Progress {
    job: TrainJob,
    optimizer: AdamW,
    schedule: LinearSchedule,
    batches: EpochBatches,
    step: u64,
    total_steps: u64,
    last_eval: Vec<Metric>,
    eval_predictions: Vec<serde_json::Value>,
    /// Dynamic loss scaling, for a job on a float16 base only.
    scaler: Option<LossScaler>,
}

impl Progress {
    /// Sets up the optimizer and schedule, and resumes from the job's
    /// checkpoint as `job.resume` asks.
    pub(crate) fn start(job: &TrainJob, vars: &nn::VarStore, task: &dyn TaskRun) -> Result<Self, EngineError> {
        let spec = &job.spec;
        let t = &spec.training;
        let total_steps = spec.total_steps(task.train_len() as u64);
        tracing::info!(
            job = %spec.name,
            task = %spec.task,
            train_examples = task.train_len(),
            eval_examples = task.eval_len(),
            total_steps,
            "training started"
        );
        let mut optimizer = optimizer_for(vars, spec);
        let resumed = resume_state(job, vars, &mut optimizer)?;
        let mut batches = EpochBatches::new(task.train_len(), t.batch_size as usize, t.seed);
        let mut scaler = (t.precision == Precision::Fp16).then(LossScaler::default);
        let (step, last_eval) = match resumed {
            Some(state) => {
                let step = state.step.min(total_steps);
                batches.skip(step);
                if let (Some(scaler), Some(saved)) = (scaler.as_mut(), state.loss_scale) {
                    *scaler = saved;
                }
                tracing::info!(job = %spec.name, step, total_steps, "resumed from checkpoint");
                (step, state.last_eval)
            }
            None => (0, Vec::new()),
        };
        Ok(Self {
            job: job.clone(),
            optimizer,
            schedule: LinearSchedule::new(total_steps, t.warmup_ratio),
            batches,
            step,
            total_steps,
            last_eval,
            eval_predictions: Vec::new(),
            scaler,
        })
    }

    pub(crate) fn done(&self) -> bool {
        self.step >= self.total_steps
    }

    pub(crate) fn name(&self) -> &str {
        &self.job.spec.name
    }

    /// Clears the gradients and picks the next step's examples.
    pub(crate) fn begin_step(&mut self) -> PlannedStep {
        crate::engine::liveness::beat();
        if self.step.is_multiple_of(TRIM_EVERY) {
            // The last step's tensors are freed: hand what the allocator keeps back.
            crate::engine::allocator::release_free_memory();
        }
        let seed = step_seed(self.job.spec.training.seed, self.step);
        tch::manual_seed(seed);
        self.optimizer.zero_grad();
        let indices = self.batches.next_batch().to_vec();
        PlannedStep {
            indices,
            lr_factor: self.schedule.factor(self.step),
            stream: DropoutStream::new(seed),
            loss_scale: self.scaler.as_ref().map_or(1.0, LossScaler::scale),
        }
    }

    /// Applies the step whose `loss` has been backpropagated, reports it
    /// (`pack_jobs`: how many jobs shared its passes), and evaluates and
    /// checkpoints when due.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn end_step(
        &mut self,
        planned: &PlannedStep,
        loss: &Tensor,
        seconds: f64,
        pack_jobs: usize,
        vars: &nn::VarStore,
        task: &dyn TaskRun,
        on_event: &mut dyn FnMut(Event<'_>) -> Control,
    ) -> Result<Flow, EngineError> {
        let loss = f64::try_from(loss)?;
        self.advance(planned, loss, 0)?;
        let t = &self.job.spec.training;
        let (step, total_steps) = (self.step, self.total_steps);
        let metrics = [
            Metric::new(step, MetricKind::Train, "loss", loss),
            Metric::new(step, MetricKind::Train, "learning_rate", t.learning_rate * planned.lr_factor),
            Metric::new(step, MetricKind::Train, "examples_per_second", planned.indices.len() as f64 / seconds.max(1e-9)),
            Metric::new(step, MetricKind::Train, "pack_jobs", pack_jobs as f64),
        ];
        tracing::debug!(step, total_steps, loss, epoch = self.batches.epoch(), "step");
        let mut control = on_event(Event::Step { step, total_steps, metrics: &metrics });
        if control == Control::Stop {
            return Ok(Flow::Stopped(self.stopped(false)));
        }
        let periodic = t.eval_every > 0 && step.is_multiple_of(t.eval_every);
        let mut checkpointed = false;
        if periodic || step == total_steps || control == Control::Finish {
            let evaluation = task.evaluate(step)?;
            crate::engine::allocator::release_free_memory();
            (self.last_eval, self.eval_predictions) = (evaluation.metrics, evaluation.predictions);
            tracing::info!(job = %self.job.spec.name, step, metrics = %summary(&self.last_eval), "evaluated");
            self.save_checkpoint(vars, on_event)?;
            checkpointed = true;
            control = match (control, on_event(Event::Eval { step, metrics: &self.last_eval })) {
                (_, Control::Stop) => return Ok(Flow::Stopped(self.stopped(false))),
                (Control::Finish, _) | (_, Control::Finish) => Control::Finish,
                (Control::Suspend, _) | (_, Control::Suspend) => Control::Suspend,
                _ => Control::Continue,
            };
        }
        if control == Control::Finish {
            tracing::info!(step, total_steps, "stopping early on request; exporting");
            return Ok(Flow::Finish);
        }
        let suspend = control == Control::Suspend && step < total_steps;
        let due = t.checkpoint_every > 0 && step.is_multiple_of(t.checkpoint_every);
        if !checkpointed && (due || suspend) {
            self.save_checkpoint(vars, on_event)?;
        }
        if suspend {
            tracing::info!(job = %self.job.spec.name, step, total_steps, "suspended at a checkpoint");
            return Ok(Flow::Stopped(self.stopped(true)));
        }
        Ok(Flow::Continue)
    }

    /// Applies the step whose gradients are in place (unscaled first on a
    /// float16 base, where an overflow skips the update), counts it, and
    /// fails when the step's `loss` diverged. `rank` is the data-parallel
    /// rank taking the step (0 alone), for the fault hooks.
    pub(crate) fn advance(&mut self, planned: &PlannedStep, loss: f64, rank: usize) -> Result<(), EngineError> {
        let apply = match self.scaler.as_mut() {
            Some(scaler) => scaler.unscale(&mut self.optimizer.grads()) == ScaledStep::Apply,
            None => true,
        };
        if apply {
            self.optimizer.step(planned.lr_factor);
        }
        self.step += 1;
        crate::engine::liveness::beat();
        let step = self.step;
        crate::faults::at_rank(crate::faults::Point::Step, &self.job.spec.name, step, rank)
            .map_err(|e| EngineError::io(Path::new("fault"), e))?;
        match &self.scaler {
            // A float16 overflow skips the step; only a run of them is divergence.
            Some(scaler) if !apply => {
                tracing::debug!(job = %self.job.spec.name, step, loss_scale = scaler.scale(), "gradients overflowed; step skipped");
                if scaler.skipped_in_a_row() >= MAX_SKIPPED_IN_A_ROW {
                    return Err(EngineError::Diverged { step, loss });
                }
            }
            _ if !loss.is_finite() => return Err(EngineError::Diverged { step, loss }),
            _ => {}
        }
        Ok(())
    }

    /// The tensors the optimizer updates, in a fixed order (the same on
    /// every rank of a data-parallel run).
    pub(crate) fn params(&self) -> Vec<Tensor> {
        self.optimizer.params()
    }

    /// The outcome of a run stopped (or suspended) after the current step.
    fn stopped(&self, suspended: bool) -> TrainOutcome {
        TrainOutcome {
            steps: self.step,
            total_steps: self.total_steps,
            final_metrics: self.last_eval.clone(),
            eval_predictions: Vec::new(),
            stopped: true,
            suspended,
        }
    }

    /// Writes a checkpoint of the current step, when the job has a
    /// checkpoint folder, and tells `on_event`.
    fn save_checkpoint(
        &self,
        vars: &nn::VarStore,
        on_event: &mut dyn FnMut(Event<'_>) -> Control,
    ) -> Result<(), EngineError> {
        let Some(dir) = &self.job.checkpoint_dir else { return Ok(()) };
        let state = TrainerState {
            format: checkpoint::FORMAT,
            step: self.step,
            total_steps: self.total_steps,
            spec_sha256: checkpoint::spec_digest(&self.job.spec),
            last_eval: self.last_eval.clone(),
            loss_scale: self.scaler,
        };
        checkpoint::save(dir, &state, vars, &self.optimizer, &self.job.spec.name)?;
        on_event(Event::Checkpoint { step: self.step, dir });
        Ok(())
    }

    /// Evaluates if the predictions of the end are missing, and exports.
    pub(crate) fn finish(
        mut self,
        base_sha256: &str,
        vars: &nn::VarStore,
        task: &dyn TaskRun,
    ) -> Result<TrainOutcome, EngineError> {
        let (job, step) = (&self.job, self.step);
        if self.eval_predictions.is_empty() {
            // Resumed from a checkpoint taken at the end: the predictions were not saved.
            let evaluation = task.evaluate(step)?;
            (self.last_eval, self.eval_predictions) = (evaluation.metrics, evaluation.predictions);
        }
        let provenance = serde_json::json!({
            "engine": concat!("ptune-worker ", env!("CARGO_PKG_VERSION")),
            "base_model_sha256": base_sha256,
            "steps": step,
            "train_examples": task.train_len(),
            "eval_examples": task.eval_len(),
            "final_metrics": self.last_eval
                .iter()
                .map(|m| (m.name.clone(), serde_json::Value::from(m.value)))
                .collect::<serde_json::Map<_, _>>(),
            "spec": job.spec.to_json(),
        });
        task.export(&job.out_dir, vars, &provenance)?;
        tracing::info!(job = %job.spec.name, out_dir = %job.out_dir.display(), "adapter exported");
        Ok(TrainOutcome {
            steps: step,
            total_steps: self.total_steps,
            final_metrics: self.last_eval,
            eval_predictions: self.eval_predictions,
            stopped: false,
            suspended: false,
        })
    }
}

/// Loads the job's checkpoint into `vars` and `optimizer` as `job.resume`
/// asks; `None` when the run starts from step 0.
fn resume_state(job: &TrainJob, vars: &nn::VarStore, optimizer: &mut AdamW) -> Result<Option<TrainerState>, EngineError> {
    let dir = match (&job.checkpoint_dir, job.resume) {
        (_, Resume::Never) => return Ok(None),
        (Some(dir), _) => dir,
        (None, _) => return Err(EngineError::Model("resuming needs a checkpoint folder".into())),
    };
    if !checkpoint::exists(dir) {
        if job.resume == Resume::Required {
            return Err(EngineError::Model(format!("no checkpoint to resume from in {}", dir.display())));
        }
        return Ok(None);
    }
    match checkpoint::load(dir, &job.spec, vars, optimizer) {
        Ok(state) => Ok(Some(state)),
        Err(e) if job.resume == Resume::IfPossible => {
            tracing::warn!(error = %e, "checkpoint not usable; starting from step 0");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}


/// `name value` pairs of a metric list, for the log.
fn summary(metrics: &[Metric]) -> String {
    metrics.iter().map(|m| format!("{} {:.4}", m.name, m.value)).collect::<Vec<_>>().join(" ")
}

/// The seed of libtorch's generator for the step after `completed` steps:
/// SplitMix64 of the job's seed and the step, so neighbouring steps and
/// seeds get unrelated streams.
pub fn step_seed(seed: u64, completed: u64) -> i64 {
    crate::engine::rng::mix(seed, completed)
}

/// AdamW over the job's variables in `vars`: the adapter at the main rate,
/// the head (`classifier.*`) at the head rate; biases and LayerNorm weights
/// without weight decay, as in the HF Trainer.
pub fn optimizer_for(vars: &nn::VarStore, spec: &JobSpec) -> AdamW {
    let t = &spec.training;
    let head_lr = t.head_learning_rate.unwrap_or(t.learning_rate);
    let mut variables: Vec<(String, tch::Tensor)> = vars.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    // (lr, weight decay) -> tensors, in a fixed order
    let mut groups: Vec<((f64, f64), Vec<tch::Tensor>)> = Vec::new();
    for (name, tensor) in variables {
        let lr = if name.starts_with("classifier.") { head_lr } else { t.learning_rate };
        let no_decay = name.ends_with("bias") || name.contains("LayerNorm");
        let key = (lr, if no_decay { 0.0 } else { t.weight_decay });
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, tensors)) => tensors.push(tensor),
            None => groups.push((key, vec![tensor])),
        }
    }
    let mut optimizer = AdamW::default();
    for ((lr, weight_decay), tensors) in groups {
        optimizer.add_group(tensors, lr, weight_decay);
    }
    optimizer
}
