//! Memory-aware placement: every job's memory estimate (from its spec and
//! the shape of its base model that workers report), taken as soon as a
//! worker has reported that shape and kept with the job; and the reason a
//! queued job gives when no online worker serving its model has room for it.
//! The lease query itself compares the estimate, added to those of the jobs
//! the worker already runs (each base model's weights once), with the
//! worker's memory (`Store::lease_next_job`).

use std::collections::HashMap;

use ptune_core::memory::{self, mib};
use ptune_core::{JobId, JobSpec, MemoryEstimate, ModelShape};

use crate::error::Error;
use crate::model::Job;
use crate::store::{Availability, Store};

/// Queued jobs estimated per call of [`estimate_queued`]; the rest wait for the next.
const ESTIMATES_PER_CALL: u32 = 100;

/// The estimate of `spec`, when a worker has reported its model's shape.
pub(crate) async fn estimate_spec(store: &Store, spec: &JobSpec) -> Result<Option<MemoryEstimate>, Error> {
    let shapes = store.model_shapes(std::slice::from_ref(&spec.base_model)).await?;
    Ok(shapes.get(&spec.base_model).map(|shape| memory::estimate(spec, shape)))
}

/// Takes the missing estimates of queued jobs on `models` (sweep trials,
/// and jobs submitted before any worker reported their model's shape).
pub(crate) async fn estimate_queued(store: &Store, models: &[String]) -> Result<(), Error> {
    if models.is_empty() {
        return Ok(());
    }
    let missing = store.queued_without_estimate(models, ESTIMATES_PER_CALL).await?;
    if missing.is_empty() {
        return Ok(());
    }
    let shapes = store.model_shapes(&model_names(missing.iter().map(|(_, spec)| spec))).await?;
    let estimates: Vec<(JobId, MemoryEstimate)> = missing
        .iter()
        .filter_map(|(id, spec)| Some((*id, memory::estimate(spec, shapes.get(&spec.base_model)?))))
        .collect();
    Ok(store.set_memory_estimates(&estimates).await?)
}

/// Gives every job of `jobs` that has no estimate one, when a worker has
/// reported its model's shape, and stores it.
pub(crate) async fn fill_estimates(store: &Store, jobs: &mut [Job]) -> Result<(), Error> {
    let names = model_names(jobs.iter().filter(|j| j.memory_estimate.is_none()).map(|j| &j.spec));
    if names.is_empty() {
        return Ok(());
    }
    let shapes: HashMap<String, ModelShape> = store.model_shapes(&names).await?;
    let mut taken = Vec::new();
    for job in jobs.iter_mut().filter(|j| j.memory_estimate.is_none()) {
        if let Some(shape) = shapes.get(&job.spec.base_model) {
            let estimate = memory::estimate(&job.spec, shape);
            job.memory_estimate = Some(estimate);
            taken.push((job.id, estimate));
        }
    }
    Ok(store.set_memory_estimates(&taken).await?)
}

/// Why `job` cannot run: it needs more memory than every online worker
/// serving its model may use (each of them reported its memory).
pub(crate) fn too_large(job: &Job, availability: &Availability) -> Option<String> {
    let largest = availability.largest_memory?;
    let estimate = job.memory_estimate.filter(|e| e.total_bytes() > largest)?;
    Some(format!(
        "unschedulable: needs {estimate}; the largest online worker serving base model {:?} has {} MiB",
        job.spec.base_model,
        mib(largest)
    ))
}

/// The distinct base models of `specs`, sorted.
pub(crate) fn model_names<'a>(specs: impl Iterator<Item = &'a JobSpec>) -> Vec<String> {
    let mut names: Vec<String> = specs.map(|s| s.base_model.clone()).collect();
    names.sort();
    names.dedup();
    names
}
