//! Packed training: several jobs on one frozen base model take their steps
//! together. Each step, every job picks its batch; the batches go through
//! the shared model in as few passes as the token budget allows (each job's
//! prompt, prefix or LoRA weights and dropout stream ride with its own rows);
//! one backward pass per pass fills every job's gradients; then each job
//! applies its own AdamW step, reports, evaluates, checkpoints and stops on
//! its own schedule, exactly as the training loop (`train/`) does for a job
//! alone. Jobs join between steps and leave when they finish, fail or are
//! stopped, without disturbing the others. Classification jobs pack on an
//! encoder, causal-LM jobs on a decoder: each task says how its jobs share a
//! pass ([`SharedPass`]), and [`backward_step`] builds the passes for every
//! task, a job alone being a pass of one.
//!
//! A job's losses are those of the same job trained alone (the same
//! computation, up to float rounding): it draws the same batches and the
//! same dropout masks, and the gradient of a sum of per-job losses with
//! respect to one job's variables is that job's own gradient.

use std::path::Path;
use std::time::Instant;

use tch::{nn, Device, Tensor};

use super::error::EngineError;
use super::job::{Control, Event, TrainJob, TrainOutcome};
use super::train::{Flow, PlannedStep, Progress, TaskRun};

/// A frozen base model that jobs share, and how its task sets a job up on it.
pub(crate) trait SharedBase {
    /// A job's model and data on this base.
    type Run<'a>: SharedPass
    where
        Self: 'a;

    /// Content hash of the base's weights, recorded in every export.
    fn sha256(&self) -> &str;

    /// Reads a job's data and builds its trainable variables.
    fn prepare<'a>(&'a self, device: Device, job: &TrainJob) -> Result<(nn::VarStore, Self::Run<'a>), EngineError>;

    /// Reads a job's evaluation data and loads its model from the export in
    /// `export` (as the job's training wrote it, or as PEFT saves it): what
    /// evaluating an export takes.
    fn prepare_export<'a>(
        &'a self,
        device: Device,
        job: &TrainJob,
        export: &Path,
    ) -> Result<(nn::VarStore, Self::Run<'a>), EngineError>;
}

/// A job's run whose batches can share forward passes through the frozen
/// base with other jobs' runs of the same task.
pub(crate) trait SharedPass: TaskRun + Sized {
    /// A job's step ready for a pass: its batch, and its adapter drawn from
    /// the step's stream.
    type Input<'s>
    where
        Self: 's;
    /// What jobs must have in common to share a pass.
    type Kind: PartialEq + Copy;
    /// How a pass lays its jobs' batches out.
    const LAYOUT: Layout;

    /// The job's input for the step `plan`.
    fn input<'s>(&'s self, plan: &'s PlannedStep) -> Self::Input<'s>;

    /// What decides the pass of the job's `input`.
    fn pass_kind<'s>(&'s self, input: &Self::Input<'s>) -> PassKind<Self::Kind>;

    /// Each member's mean training loss from one forward pass over the
    /// members' inputs (one job alone, or jobs of one kind).
    fn forward<'s>(members: &[(&'s Self, &Self::Input<'s>)]) -> Vec<Tensor>;
}

/// One step of every job (`runs[i]` on `plans[i]`): forward passes over the
/// jobs' batches, grouped within `max_tokens` positions, each followed by
/// its backward pass; returns each job's loss, detached.
pub(crate) fn backward_step<'a, R: SharedPass>(
    runs: &[&'a R],
    plans: &[&'a PlannedStep],
    max_tokens: usize,
) -> Vec<Tensor> {
    let inputs: Vec<R::Input<'a>> = runs.iter().zip(plans).map(|(run, plan)| run.input(plan)).collect();
    let kinds: Vec<PassKind<R::Kind>> = runs.iter().zip(&inputs).map(|(run, input)| run.pass_kind(input)).collect();
    let scales: Vec<f64> = plans.iter().map(|plan| plan.loss_scale).collect();
    backward_passes(&group_passes(&kinds, max_tokens, R::LAYOUT), &scales, |pass| {
        let members: Vec<(&'a R, &R::Input<'a>)> = pass.iter().map(|&i| (runs[i], &inputs[i])).collect();
        R::forward(&members)
    })
}

/// The forward and backward pass of one job's step alone: a pass of one.
pub(crate) fn backward_alone<R: SharedPass>(run: &R, plan: &PlannedStep) -> Tensor {
    backward_step(&[run], &[plan], usize::MAX).remove(0)
}

/// A job handed to a pack, with who hears about it.
pub struct PackJob {
    pub job: TrainJob,
    /// Called after every step and evaluation, as `Engine::train` does.
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
struct Member<'a, B: SharedBase + 'a> {
    vars: nn::VarStore,
    task: B::Run<'a>,
    progress: Progress,
    on_event: Box<dyn FnMut(Event<'_>) -> Control>,
    on_done: Box<dyn FnOnce(Result<TrainOutcome, EngineError>)>,
}

/// Trains jobs on `base` in packed steps until no job is left. Before every
/// step `admit(room)` hands over up to `room` new jobs.
pub(crate) fn run_pack<B: SharedBase>(
    base: &B,
    device: Device,
    limits: PackLimits,
    admit: &mut dyn FnMut(usize) -> Vec<PackJob>,
) {
    let mut members: Vec<Member<'_, B>> = Vec::new();
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
        members = step(base, limits, members);
    }
}

/// Sets a job up, or reports why it cannot run (or that it is already done).
fn start<B: SharedBase>(base: &B, device: Device, job: PackJob) -> Option<Member<'_, B>> {
    let PackJob { job, on_event, on_done } = job;
    let started = base
        .prepare(device, &job)
        .and_then(|(vars, task)| Progress::start(&job, &vars, &task).map(|progress| (vars, task, progress)));
    match started {
        Ok((vars, task, progress)) if progress.done() => {
            // Resumed from a checkpoint at the last step: only the export is left.
            on_done(progress.finish(base.sha256(), &vars, &task));
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
fn step<'a, B: SharedBase>(base: &'a B, limits: PackLimits, mut members: Vec<Member<'a, B>>) -> Vec<Member<'a, B>> {
    let started = Instant::now();
    let plans: Vec<PlannedStep> = members.iter_mut().map(|m| m.progress.begin_step()).collect();
    let losses = {
        let runs: Vec<&B::Run<'a>> = members.iter().map(|m| &m.task).collect();
        backward_step(&runs, &plans.iter().collect::<Vec<_>>(), limits.max_tokens)
    };
    let seconds = started.elapsed().as_secs_f64();

    let pack_jobs = members.len();
    let mut training = Vec::with_capacity(pack_jobs);
    for ((mut member, plan), loss) in members.drain(..).zip(&plans).zip(losses) {
        let progress = &mut member.progress;
        let flow = progress.end_step(plan, &loss, seconds, pack_jobs, &member.vars, &member.task, &mut member.on_event);
        match flow {
            Ok(Flow::Continue) if !member.progress.done() => training.push(member),
            Ok(Flow::Continue | Flow::Finish) => {
                let Member { vars, task, progress, on_done, .. } = member;
                tracing::info!(job = %progress.name(), "left the pack");
                on_done(progress.finish(base.sha256(), &vars, &task));
            }
            Ok(Flow::Stopped(outcome)) => (member.on_done)(Ok(outcome)),
            Err(err) => (member.on_done)(Err(err)),
        }
    }
    training
}

/// What decides a job's pass: the kind of pass it may share (`None`: it
/// passes alone, as full fine-tuning on its own encoder copy does), and its
/// batch's rows and positions per row (prompt and prefix included).
pub(crate) struct PassKind<K> {
    pub kind: Option<K>,
    pub rows: usize,
    pub len: usize,
}

/// How a pass lays its jobs' batches out, which decides the positions it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Each job's rows at its own length: the sum of the jobs' positions.
    Stacked,
    /// Every row padded to the pass's longest: all rows times the longest.
    Padded,
}

/// Groups jobs into forward passes: jobs of one kind, in order, up to
/// `max_tokens` token positions per pass as `layout` counts them (a job
/// larger than that gets a pass of its own).
pub(crate) fn group_passes<K: PartialEq + Copy>(jobs: &[PassKind<K>], max_tokens: usize, layout: Layout) -> Vec<Vec<usize>> {
    /// The pass open for a kind: its index in `passes`, rows, longest row
    /// and positions of its jobs' own rows so far.
    struct Open<K> {
        kind: K,
        pass: usize,
        rows: usize,
        longest: usize,
        positions: usize,
    }
    impl<K> Open<K> {
        fn tokens_with(&self, job: &PassKind<K>, layout: Layout) -> usize {
            match layout {
                Layout::Stacked => self.positions + job.rows * job.len,
                Layout::Padded => (self.rows + job.rows) * self.longest.max(job.len),
            }
        }
    }
    let mut passes: Vec<Vec<usize>> = Vec::new();
    let mut open: Vec<Open<K>> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let Some(kind) = job.kind else {
            passes.push(vec![i]);
            continue;
        };
        let fresh = Open { kind, pass: passes.len(), rows: job.rows, longest: job.len, positions: job.rows * job.len };
        match open.iter_mut().find(|o| o.kind == kind) {
            Some(o) if o.tokens_with(job, layout) <= max_tokens => {
                passes[o.pass].push(i);
                o.rows += job.rows;
                o.longest = o.longest.max(job.len);
                o.positions += job.rows * job.len;
            }
            Some(o) => {
                *o = fresh;
                passes.push(vec![i]);
            }
            None => {
                open.push(fresh);
                passes.push(vec![i]);
            }
        }
    }
    passes
}

/// Runs `forward` on every pass and backpropagates the sum of its jobs'
/// losses, each multiplied by its job's loss scale (`scales`, one per job:
/// 1, or a float16 job's dynamic scale); returns each job's loss, detached
/// and unscaled. The gradient of the sum with respect to one job's
/// variables is that job's own (scaled) gradient: no job's loss depends on
/// another's.
pub(crate) fn backward_passes(
    passes: &[Vec<usize>],
    scales: &[f64],
    mut forward: impl FnMut(&[usize]) -> Vec<Tensor>,
) -> Vec<Tensor> {
    let mut losses: Vec<Option<Tensor>> = scales.iter().map(|_| None).collect();
    for pass in passes {
        let pass_losses = forward(pass);
        let scaled: Vec<Tensor> = pass
            .iter()
            .zip(&pass_losses)
            .map(|(&i, loss)| if scales[i] == 1.0 { loss.shallow_clone() } else { loss * scales[i] })
            .collect();
        Tensor::stack(&scaled, 0).sum(tch::Kind::Float).backward();
        for (&i, loss) in pass.iter().zip(pass_losses) {
            losses[i] = Some(loss.detach());
        }
    }
    losses.into_iter().map(|loss| loss.expect("every job is in one pass")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job<K>(kind: Option<K>, rows: usize, len: usize) -> PassKind<K> {
        PassKind { kind, rows, len }
    }

    #[test]
    fn passes_group_jobs_of_one_kind_within_the_budget() {
        // 320 positions each; a budget of 700 takes two.
        let jobs = [job(Some(0), 8, 40), job(Some(1), 8, 40), job(Some(0), 8, 40), job(None, 8, 40), job(Some(0), 8, 40)];
        assert_eq!(group_passes(&jobs, 700, Layout::Stacked), vec![vec![0, 2], vec![1], vec![3], vec![4]]);
        // A job over the budget still gets a pass of its own.
        assert_eq!(group_passes(&jobs, 100, Layout::Stacked), vec![vec![0], vec![1], vec![2], vec![3], vec![4]]);
    }

    #[test]
    fn a_padded_pass_counts_every_row_at_the_longest() {
        let jobs = [job(Some(()), 8, 10), job(Some(()), 2, 60), job(Some(()), 2, 10)];
        // Stacked: 80 + 120 + 20 positions. Padded: 10 rows of 60 would be 600.
        assert_eq!(group_passes(&jobs, 300, Layout::Stacked), vec![vec![0, 1, 2]]);
        assert_eq!(group_passes(&jobs, 300, Layout::Padded), vec![vec![0], vec![1, 2]]);
    }
}
