//! Memory estimates of jobs (`ptune_core::memory::estimate`, from a job's
//! spec and the shape of its base model that workers report), and the
//! reason a queued job gives when no online worker serving its model has
//! room for it. Placement compares the estimates with the memory of a
//! worker's devices (`crate::placement`).
//!
//! An estimate is written at two moments, never when a job is read:
//! - when the job is created (submitted, or a sweep's new trial), if a
//!   worker has reported its model's shape. The shapes are looked at again
//!   once the job is stored ([`estimate_new`]), so a worker that registered
//!   in between, and found no such job yet, is not missed;
//! - when a worker registers reporting a model's shape ([`estimate_queued`]):
//!   the queued jobs on the model that have no estimate get one, and all of
//!   them are estimated again when the shape known for the model differs
//!   from the one they were last estimated with (kept in `model_estimates`:
//!   the first one reported, or a larger model under the name: the largest
//!   reported counts). Registrations of a model take turns, so a fleet
//!   starting at once estimates a deep queue once, not once per worker.
//!
//! A job keeps the estimate it was leased with.

use ptune_core::memory::{self, mib};
use ptune_core::{JobId, JobSpec, MemoryEstimate};
use tracing::warn;

use crate::error::Error;
use crate::model::Job;
use crate::store::{Availability, Store};

/// Queued jobs read at once when estimating them again.
const ESTIMATES_PER_READ: u32 = 500;

/// The estimate of `spec`, when a worker has reported its model's shape.
pub(crate) async fn estimate_spec(store: &Store, spec: &JobSpec) -> Result<Option<MemoryEstimate>, Error> {
    let shapes = store.model_shapes(std::slice::from_ref(&spec.base_model)).await?;
    Ok(shapes.get(&spec.base_model).map(|shape| memory::estimate(spec, shape)))
}

/// Estimates jobs just stored without an estimate, if a worker has
/// reported their model's shape by now. A failure is logged: the jobs are
/// stored, and the next worker to register their model estimates them.
pub(crate) async fn estimate_new(store: &Store, jobs: &[(JobId, &JobSpec)]) {
    if jobs.is_empty() {
        return;
    }
    let estimated = async {
        let shapes = store.model_shapes(&model_names(jobs.iter().map(|(_, spec)| *spec))).await?;
        let estimates: Vec<(JobId, MemoryEstimate)> = jobs
            .iter()
            .filter_map(|(id, spec)| Some((*id, memory::estimate(spec, shapes.get(&spec.base_model)?))))
            .collect();
        store.set_memory_estimates(&estimates).await
    };
    if let Err(e) = estimated.await {
        warn!(error = %e, jobs = jobs.len(), "cannot estimate new jobs; a worker registering their model will");
    }
}

/// After a worker registered reporting the shapes of `models`: estimates
/// the queued jobs on each model again when the shape known for it now (the
/// largest reported) differs from the one they were last estimated with,
/// and otherwise only those without an estimate. The model's marker is
/// locked meanwhile ([`Store::lock_estimates`]), so registrations of one
/// model on every coordinator take turns, and when a fleet registers at once
/// the first estimates the queue and the others find it done. Callers on
/// one coordinator take turns too (`Workers::register`): each turn holds a
/// connection while it waits for the lock.
pub(crate) async fn estimate_queued(store: &Store, models: &[String]) -> Result<(), Error> {
    for model in models {
        let lock = store.lock_estimates(model).await?;
        // Read under the lock, so it includes the registrations that held it before.
        let Some(shape) = store.model_shapes(std::slice::from_ref(model)).await?.remove(model) else { continue };
        let all = lock.estimated_with != Some(shape);
        let mut after = None;
        loop {
            let jobs = store.queued_on(model, all, after, ESTIMATES_PER_READ).await?;
            let estimates: Vec<(JobId, MemoryEstimate)> =
                jobs.iter().map(|(at, spec)| (at.id, memory::estimate(spec, &shape))).collect();
            store.set_memory_estimates(&estimates).await?;
            store.prometheus().estimated(all, estimates.len());
            if jobs.len() < ESTIMATES_PER_READ as usize {
                break;
            }
            after = jobs.last().map(|(at, _)| *at);
        }
        lock.done(&shape).await?;
    }
    Ok(())
}

/// Why `job` cannot run on the online workers serving its model: none of
/// them has `training.devices` devices (a job trains on devices of one
/// worker), or it needs more memory than each of that many devices of any
/// of them has (every such device reported its memory).
pub(crate) fn too_large(job: &Job, availability: &Availability) -> Option<String> {
    let model = &job.spec.base_model;
    let wanted = job.spec.training.devices.max(1) as usize;
    let most = availability.workers.iter().map(Vec::len).max()?;
    if most < wanted {
        return Some(format!(
            "unschedulable: training.devices is {wanted}, but the online workers serving base model {model:?} have \
             at most {most} device(s); a job trains on devices of one worker (not across workers)"
        ));
    }
    let estimate = job.memory_estimate?;
    // Per worker, the memory of its `wanted`-th roomiest device (unknown: room for anything).
    let mut largest = 0;
    for rooms in availability.workers.iter().filter(|rooms| rooms.len() >= wanted) {
        let mut memory: Vec<Option<u64>> = rooms.iter().map(|d| d.memory_bytes).collect();
        memory.sort_by_key(|m| std::cmp::Reverse(m.unwrap_or(u64::MAX)));
        largest = largest.max(memory[wanted - 1]?);
    }
    if estimate.total_bytes() <= largest {
        return None;
    }
    Some(if wanted == 1 {
        format!(
            "unschedulable: needs {estimate}; the largest device of an online worker serving base model {model:?} \
             has {} MiB",
            mib(largest)
        )
    } else {
        format!(
            "unschedulable: needs {estimate} on each of {wanted} devices of one worker; the online workers serving \
             base model {model:?} have at most {} MiB on each of {wanted} devices",
            mib(largest)
        )
    })
}

/// The distinct base models of `specs`, sorted.
pub(crate) fn model_names<'a>(specs: impl Iterator<Item = &'a JobSpec>) -> Vec<String> {
    let mut names: Vec<String> = specs.map(|s| s.base_model.clone()).collect();
    names.sort();
    names.dedup();
    names
}
