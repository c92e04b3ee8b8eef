//! One rank's training loop in a data-parallel run (`training.devices`
//! above 1): every rank holds the job's variables and optimizer, and each
//! step
//!
//! 1. draws the same global batch (the data order depends only on the
//!    seed) and takes its share of it ([`share`]: contiguous slices, the
//!    first `len % world` ranks one example more);
//! 2. runs its share's forward and backward pass with the loss scaled by its
//!    share of the batch's loss terms (examples, or labelled tokens for a
//!    per-token loss), so that the sum over ranks of the gradients is the
//!    gradient of the whole batch's mean loss;
//! 3. flattens the gradients of the trainable tensors, one flag per tensor
//!    saying whether it has a gradient, its weighted loss and whether it
//!    goes on into ONE float32 buffer, and all-reduces it (sum);
//! 4. writes the summed gradients back and takes the same AdamW step.
//!
//! Every rank then holds the same variables, those of one device training
//! on the whole batch (up to float rounding). Rank 0 leads: it alone reports
//! steps, evaluates, checkpoints and exports; when it stops early it tells
//! the others through the next step's buffer. The variables are broadcast
//! from rank 0 before the first step, and a final barrier before the
//! export makes sure no rank failed: a run exports only when every rank
//! finished every step.

use std::time::Instant;

use tch::{nn, Kind, Tensor};

use super::progress::{Flow, Progress};
use super::task::{PlannedStep, TaskRun};
use crate::engine::collective::Collective;
use crate::engine::error::EngineError;
use crate::engine::job::{Control, Event, TrainJob, TrainOutcome};

/// Rank `rank`'s share of a batch's examples among `world` ranks:
/// contiguous slices in batch order, the first `len % world` ranks taking
/// one example more (empty for the last ranks of a batch smaller than the
/// group).
pub(crate) fn share(indices: &[usize], rank: usize, world: usize) -> &[usize] {
    let (base, extra) = (indices.len() / world, indices.len() % world);
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    &indices[start..start + len]
}

/// What the ranks summed after a step.
struct StepSum {
    /// The whole batch's mean loss.
    loss: f64,
    /// Whether the leading rank goes on with this step.
    go: bool,
}

/// Trains `task` (the job's variables `vars`) as rank `comm.rank()` of a
/// data-parallel group. Rank 0 passes `on_event` and gets the outcome;
/// the other ranks pass `None` and get `None`.
pub(crate) fn drive_rank(
    job: &TrainJob,
    base_sha256: &str,
    vars: &nn::VarStore,
    task: &dyn TaskRun,
    comm: &mut dyn Collective,
    mut on_event: Option<&mut dyn FnMut(Event<'_>) -> Control>,
) -> Result<Option<TrainOutcome>, EngineError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    // Every rank resumes from the same checkpoint, if any.
    let mut progress = Progress::start(job, vars, task)?;
    let params = progress.params();
    broadcast_params(comm, &params)?;
    // Whether the other ranks were told to stop: they then need no barrier.
    let mut told_to_stop = false;
    while !progress.done() {
        let started = Instant::now();
        let planned = progress.begin_step();
        let mine = share(&planned.indices, rank, world);
        // The whole batch's loss is a mean over its loss terms T (examples,
        // or the labelled tokens of a per-token loss: a causal LM's target
        // tokens): L = (S_0 + ... + S_{n-1}) / T, S_r the sum of rank r's
        // terms. Each rank's task gives its own mean S_r / t_r, so weighting
        // it by t_r / T makes the ranks' weighted losses, and their gradients,
        // add up to L and its gradient exactly, however unevenly the shares
        // hold the terms (a plain average of the ranks' means would weigh a
        // rank's tokens by how few its share holds).
        let (terms, total) = (task.loss_terms(mine), task.loss_terms(&planned.indices));
        let weight = if total == 0 { 0.0 } else { terms as f64 / total as f64 };
        let loss = if mine.is_empty() {
            0.0
        } else {
            let plan = PlannedStep {
                indices: mine.to_vec(),
                lr_factor: planned.lr_factor,
                stream: planned.stream.for_rank(rank),
                loss_scale: planned.loss_scale * weight,
            };
            f64::try_from(&task.backward(&plan))?
        };
        let sum = all_reduce_step(comm, &params, loss * weight, true)?;
        if !sum.go {
            // The leading rank stopped after the previous step.
            return Ok(None);
        }
        let Some(on_event) = on_event.as_deref_mut() else {
            progress.advance(&planned, sum.loss, rank)?;
            continue;
        };
        let seconds = started.elapsed().as_secs_f64();
        let flow = progress.end_step(&planned, &Tensor::from(sum.loss), seconds, 1, vars, task, on_event)?;
        let stopped = match flow {
            Flow::Continue => continue,
            Flow::Finish => None,
            Flow::Stopped(outcome) => Some(outcome),
        };
        if !progress.done() {
            // The others are into the next step, which proves they took
            // this one: tell them to stop.
            all_reduce_step(comm, &params, 0.0, false)?;
            told_to_stop = true;
        }
        if let Some(outcome) = stopped {
            return Ok(Some(outcome));
        }
        break;
    }
    if !told_to_stop {
        // No export unless every rank took every step.
        comm.barrier()?;
    }
    match on_event {
        Some(_) => progress.finish(base_sha256, vars, task).map(Some),
        None => Ok(None),
    }
}

/// Gives every rank rank 0's variables.
fn broadcast_params(comm: &mut dyn Collective, params: &[Tensor]) -> Result<(), EngineError> {
    let Some(first) = params.first() else { return Ok(()) };
    let flat: Vec<Tensor> = params.iter().map(|p| p.detach().to_kind(Kind::Float).reshape([-1])).collect();
    let mut buffer = Tensor::cat(&flat, 0).to_device(first.device());
    comm.broadcast(&mut buffer, 0)?;
    let mut offset = 0;
    tch::no_grad(|| {
        for param in params {
            let n = param.numel() as i64;
            let mut param = param.shallow_clone();
            param.copy_(&buffer.narrow(0, offset, n).view_as(&param));
            offset += n;
        }
    });
    Ok(())
}

/// All-reduces this rank's step: the gradients of `params` (zeros where a
/// tensor has none), a flag per tensor that has one, `loss` (this rank's
/// weighted loss) and `go`; writes the summed gradients back (giving a
/// tensor a gradient when any rank's share reached it) and returns the
/// summed loss and whether rank 0 goes on.
fn all_reduce_step(comm: &mut dyn Collective, params: &[Tensor], loss: f64, go: bool) -> Result<StepSum, EngineError> {
    let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
    let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
    let defined: Vec<f32> = grads.iter().map(|g| if g.defined() { 1.0 } else { 0.0 }).collect();
    let go = if go && comm.rank() == 0 { 1.0 } else { 0.0 };
    let mut parts: Vec<Tensor> = grads
        .iter()
        .zip(params)
        .map(|(grad, param)| {
            let grad = if grad.defined() { grad.detach() } else { param.zeros_like() };
            grad.to_kind(Kind::Float).reshape([-1])
        })
        .collect();
    parts.push(Tensor::from_slice(&defined).to_device(device));
    parts.push(Tensor::from_slice(&[loss as f32, go]).to_device(device));
    let mut buffer = Tensor::cat(&parts, 0);
    comm.all_reduce_sum(&mut buffer)?;
    let sizes: Vec<i64> = params.iter().map(|p| p.numel() as i64).collect();
    let grads_len: i64 = sizes.iter().sum();
    let n = params.len() as i64;
    let flags = Vec::<f32>::try_from(buffer.narrow(0, grads_len, n).to_device(tch::Device::Cpu)).map_err(EngineError::Torch)?;
    let tail = Vec::<f32>::try_from(buffer.narrow(0, grads_len + n, 2).to_device(tch::Device::Cpu)).map_err(EngineError::Torch)?;
    if tail[1] == 0.0 {
        return Ok(StepSum { loss: f64::from(tail[0]), go: false });
    }
    // Tensors some rank's share reached and this one's did not get a zero
    // gradient here first, as they have on a device running the whole batch.
    let missing: Vec<Tensor> = params
        .iter()
        .zip(&grads)
        .zip(&flags)
        .filter(|((_, grad), &flag)| flag > 0.0 && !grad.defined())
        .map(|((param, _), _)| param.sum(Kind::Float) * 0.0)
        .collect();
    if !missing.is_empty() {
        Tensor::stack(&missing, 0).sum(Kind::Float).backward();
    }
    let mut offset = 0;
    tch::no_grad(|| {
        for ((param, size), flag) in params.iter().zip(&sizes).zip(&flags) {
            if *flag > 0.0 {
                let mut grad = param.grad();
                grad.copy_(&buffer.narrow(0, offset, *size).view_as(&grad));
            }
            offset += size;
        }
    });
    Ok(StepSum { loss: f64::from(tail[0]), go: true })
}

#[cfg(test)]
mod tests {
    use super::share;

    /// Shares are contiguous, cover the batch once, in order, and differ by
    /// at most one example.
    #[test]
    fn shares_split_a_batch_in_order() {
        let batch: Vec<usize> = (10..15).collect();
        let shares: Vec<&[usize]> = (0..2).map(|r| share(&batch, r, 2)).collect();
        assert_eq!(shares, vec![&[10, 11, 12][..], &[13, 14][..]]);
        let small: Vec<&[usize]> = (0..4).map(|r| share(&batch[..2], r, 4)).collect();
        assert_eq!(small, vec![&[10][..], &[11][..], &[][..], &[][..]]);
    }
}
