//! Packed training: several classification jobs on one frozen encoder take
//! their steps together. Each step, every job picks its batch; the batches
//! go through the shared encoder in as few passes as the token budget
//! allows (each job's prompt, prefix or LoRA weights and dropout stream ride
//! with its own rows); one backward pass per pass fills every job's
//! gradients; then each job applies its own AdamW step, reports, evaluates,
//! checkpoints and stops on its own schedule, exactly as [`super::train`]'s
//! loop does for a job alone. Jobs join between steps and leave when they
//! finish, fail or are stopped, without disturbing the others.
//!
//! A job's losses are those of the same job trained alone (the same
//! computation, up to float rounding): it draws the same batches and the
//! same dropout masks, and the gradient of a sum of per-job losses with
//! respect to one job's variables is that job's own gradient.

use std::time::Instant;

use ptune_core::Pooling;
use tch::{nn, Device, Tensor};

use super::models::BaseModel;
use super::task_data::TrainBatch;
use super::tasks::classifier::{Classifier, Level};
use super::train::{prepare_classifier, ClassifierRun, Flow, PlannedStep, Progress};
use super::{Control, EngineError, Event, TrainJob, TrainOutcome};

/// A job handed to a pack, with who hears about it.
pub struct PackJob {
    pub job: TrainJob,
    /// Called after every step and evaluation, as [`super::Engine::train`] does.
    pub on_event: Box<dyn FnMut(Event<'_>) -> Control>,
    /// Called once with how the job ended.
    pub on_done: Box<dyn FnOnce(Result<TrainOutcome, EngineError>)>,
}

/// How much a pack takes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackLimits {
    /// Most jobs training in the pack at once.
    pub max_jobs: usize,
    /// Most token positions (prompt and padding included) in one forward
    /// pass. Activation memory grows with it; a step whose jobs hold more
    /// runs as several passes.
    pub max_tokens: usize,
}

impl Default for PackLimits {
    fn default() -> Self {
        Self { max_jobs: 16, max_tokens: 1024 }
    }
}

/// A job in the pack.
struct Member<'a> {
    vars: nn::VarStore,
    task: ClassifierRun<'a>,
    progress: Progress,
    on_event: Box<dyn FnMut(Event<'_>) -> Control>,
    on_done: Box<dyn FnOnce(Result<TrainOutcome, EngineError>)>,
}

/// Trains jobs on `base` in packed steps until no job is left. Before every
/// step `admit(room)` hands over up to `room` new jobs.
pub fn run_pack(base: &BaseModel, device: Device, limits: PackLimits, admit: &mut dyn FnMut(usize) -> Vec<PackJob>) {
    let mut members: Vec<Member<'_>> = Vec::new();
    loop {
        let room = limits.max_jobs.saturating_sub(members.len());
        if room > 0 {
            for job in admit(room) {
                if let Some(member) = start(base, device, job) {
                    members.push(member);
                }
            }
        }
        if members.is_empty() {
            return;
        }
        members = step(base, device, limits, members);
    }
}

/// Sets a job up, or reports why it cannot run (or that it is already done).
fn start(base: &BaseModel, device: Device, job: PackJob) -> Option<Member<'_>> {
    let PackJob { job, on_event, on_done } = job;
    let started = prepare_classifier(base, device, &job)
        .and_then(|(vars, task)| Progress::start(&job, &vars, &task).map(|progress| (vars, task, progress)));
    match started {
        Ok((vars, task, progress)) if progress.done() => {
            // Resumed from a checkpoint at the last step: only the export is left.
            on_done(progress.finish(&base.info.sha256, &vars, &task));
            None
        }
        Ok((vars, task, progress)) => {
            tracing::info!(job = %progress.name(), "joined the pack");
            Some(Member { vars, task, progress, on_event, on_done })
        }
        Err(err) => {
            on_done(Err(err));
            None
        }
    }
}

/// One step of every member; returns the members still training.
fn step<'a>(base: &'a BaseModel, device: Device, limits: PackLimits, mut members: Vec<Member<'a>>) -> Vec<Member<'a>> {
    let started = Instant::now();
    let plans: Vec<PlannedStep> = members.iter_mut().map(|m| m.progress.begin_step()).collect();
    let batches: Vec<TrainBatch> =
        members.iter().zip(&plans).map(|(m, plan)| m.task.data.train_batch(&plan.indices, device)).collect();
    let mut losses: Vec<Option<Tensor>> = (0..members.len()).map(|_| None).collect();
    for pass in passes(&members, &batches, limits.max_tokens) {
        let inputs: Vec<_> = pass.iter().map(|&i| members[i].task.input(&batches[i], &plans[i].stream)).collect();
        let logits = Classifier::packed_logits(&base.encoder, &inputs, true);
        let pass_losses: Vec<Tensor> =
            pass.iter().zip(&logits).map(|(&i, logits)| members[i].task.data.loss(logits, &batches[i].labels)).collect();
        // The gradient of the sum with respect to one job's variables is
        // that job's own gradient: no job's loss depends on another's.
        Tensor::stack(&pass_losses, 0).sum(tch::Kind::Float).backward();
        for (&i, loss) in pass.iter().zip(pass_losses) {
            losses[i] = Some(loss.detach());
        }
    }
    let seconds = started.elapsed().as_secs_f64();

    let pack_jobs = members.len();
    let mut training = Vec::with_capacity(pack_jobs);
    for ((mut member, plan), loss) in members.drain(..).zip(&plans).zip(losses) {
        let loss = loss.expect("every member is in one pass");
        let progress = &mut member.progress;
        let flow = progress.end_step(plan, &loss, seconds, pack_jobs, &member.vars, &member.task, &mut member.on_event);
        match flow {
            Ok(Flow::Continue) if !member.progress.done() => training.push(member),
            Ok(Flow::Continue | Flow::Finish) => {
                let Member { vars, task, progress, on_done, .. } = member;
                tracing::info!(job = %progress.name(), "left the pack");
                on_done(progress.finish(&base.info.sha256, &vars, &task));
            }
            Ok(Flow::Stopped(outcome)) => (member.on_done)(Ok(outcome)),
            Err(err) => (member.on_done)(Err(err)),
        }
    }
    training
}

/// Groups members into forward passes: members of one classification level
/// and pooling on the shared encoder, in order, up to `max_tokens` token
/// positions per pass (a member larger than that gets a pass of its own); a
/// member with its own encoder (full fine-tuning) always passes alone.
/// Poolings pass apart because a pass with a mean-pooled member runs every
/// position through the last layer, which would change the dropout masks a
/// position-0 member draws there from what it draws alone.
fn passes(members: &[Member<'_>], batches: &[TrainBatch], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut passes: Vec<Vec<usize>> = Vec::new();
    // (kind, index into `passes`, tokens so far) of the pass open for each kind
    let mut open: Vec<((Level, Pooling), usize, usize)> = Vec::new();
    for (i, (member, batch)) in members.iter().zip(batches).enumerate() {
        let model = &member.task.model;
        let (rows, seq) = batch.input_ids.size2().expect("input ids are [batch, seq]");
        let prompt = model.input_prompt_len();
        let tokens = (rows * (seq + prompt)) as usize;
        if !model.shares_base() {
            passes.push(vec![i]);
            continue;
        }
        let kind = (model.level, model.pooling);
        match open.iter_mut().find(|(open_kind, _, _)| *open_kind == kind) {
            Some((_, pass, used)) if *used + tokens <= max_tokens => {
                passes[*pass].push(i);
                *used += tokens;
            }
            Some(slot) => {
                passes.push(vec![i]);
                *slot = (kind, passes.len() - 1, tokens);
            }
            None => {
                passes.push(vec![i]);
                open.push((kind, passes.len() - 1, tokens));
            }
        }
    }
    passes
}
