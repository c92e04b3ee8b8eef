//! What workers do: register, heartbeat, lease jobs, report, complete and
//! fail them. Every call about a job is fenced by its lease epoch, so a
//! worker whose lease was lost and re-leased can no longer change the job.

pub(crate) mod memory;
mod reaper;

use std::time::Duration;

use futures::Stream;
use ptune_core::WorkerId;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

pub use reaper::spawn_reaper;

use crate::blob;
use crate::error::Error;
use crate::events::{EventHub, HubEventKind};
use crate::model::{
    Completion, DatasetInfo, DatasetRef, Failure, HeartbeatReply, Lease, LeaseRef, ProgressReport, Registered,
    StopSignal, WorkerRegistration,
};
use crate::store::{CompleteOutcome, FailOutcome, Fenced, Store};

/// Largest adapter archive accepted.
pub const MAX_ADAPTER_BYTES: u64 = 1_000_000_000;

/// Lease timing handed to workers.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub lease_timeout: Duration,
    pub heartbeat_interval: Duration,
}

/// The worker-facing domain service. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    store: Store,
    hub: EventHub,
    timing: Timing,
}

impl Scheduler {
    pub fn new(store: Store, hub: EventHub, timing: Timing) -> Self {
        Self { store, hub, timing }
    }

    /// Registers (or re-registers) a worker and tells it the lease timing.
    pub async fn register(&self, reg: WorkerRegistration) -> Result<Registered, Error> {
        if let Some(i) = reg.models.iter().position(|m| m.name.trim().is_empty()) {
            return Err(Error::invalid(format!("models[{i}].name"), "must name the model folder"));
        }
        let worker_id = reg.worker_id.unwrap_or_default();
        self.store.upsert_worker(worker_id, &reg).await?;
        let models: Vec<&str> = reg.models.iter().map(|m| m.name.as_str()).collect();
        info!(worker_id = %worker_id, hostname = %reg.hostname, slots = reg.slots, ?models,
              memory_bytes = reg.memory_bytes, "worker registered");
        // Jobs that waited for a worker to report their model's shape get their estimate now.
        let shaped: Vec<String> = reg.models.iter().filter(|m| m.shape().is_some()).map(|m| m.name.clone()).collect();
        memory::estimate_queued(&self.store, &shaped).await?;
        Ok(Registered {
            worker_id,
            heartbeat_interval: self.timing.heartbeat_interval,
            lease_timeout: self.timing.lease_timeout,
        })
    }

    /// Renews the worker's valid leases and names those it must stop.
    pub async fn heartbeat(&self, worker: WorkerId, leases: &[LeaseRef]) -> Result<HeartbeatReply, Error> {
        let known = self.store.touch_worker(worker).await?;
        let (stop, early_stop) = self.store.renew_leases(worker, leases, self.timing.lease_timeout).await?;
        if !known {
            warn!(worker_id = %worker, "heartbeat from an unregistered worker; it should register again");
        }
        Ok(HeartbeatReply { stop, early_stop, known })
    }

    /// Leases a queued job on a model the worker serves and that fits its
    /// memory, if any: the oldest on one of the `loaded` models it holds in
    /// memory, else the oldest.
    pub async fn lease(&self, worker: WorkerId, free_slots: u32, loaded: Vec<String>) -> Result<Option<Lease>, Error> {
        let mut offer =
            self.store.worker_offer(worker).await?.ok_or_else(|| {
                Error::NotFound(format!("worker {worker} is not registered; call RegisterWorker first"))
            })?;
        self.store.record_poll(worker, free_slots, &loaded).await?;
        if free_slots == 0 || offer.models.is_empty() {
            return Ok(None);
        }
        offer.loaded = loaded;
        memory::estimate_queued(&self.store, &offer.models).await?;
        let lease = self.store.lease_next_job(worker, &offer, self.timing.lease_timeout).await?;
        if let Some(lease) = &lease {
            info!(job_id = %lease.job_id, worker_id = %worker, epoch = lease.epoch, attempt = lease.attempt, "job leased");
            self.hub.publish(lease.job_id, HubEventKind::Changed);
        }
        Ok(lease)
    }

    /// Records progress; the answer says whether and why the job should stop.
    pub async fn report_progress(&self, report: ProgressReport) -> Result<StopSignal, Error> {
        let lease = report.lease;
        let signal = fenced(lease, self.store.report_progress(&report, self.timing.lease_timeout).await?)?;
        self.hub.publish(lease.job_id, HubEventKind::Progress { step: report.step, total_steps: report.total_steps });
        if !report.metrics.is_empty() {
            self.hub.publish(lease.job_id, HubEventKind::Metrics(report.metrics));
        }
        if signal == StopSignal::Diverged {
            warn!(job_id = %lease.job_id, epoch = lease.epoch, step = report.step, "training loss diverged; job failed");
            self.hub.publish(lease.job_id, HubEventKind::Changed);
        }
        Ok(signal)
    }

    /// Starts receiving the adapter of a completed lease. Refuses early when
    /// the lease is already stale, so the worker does not upload in vain.
    pub async fn begin_completion(&self, completion: Completion) -> Result<AdapterUpload, Error> {
        if completion.adapter_size == 0 || completion.adapter_size > MAX_ADAPTER_BYTES {
            return Err(Error::invalid(
                "adapter_size",
                format!("must be between 1 and {MAX_ADAPTER_BYTES} bytes, got {}", completion.adapter_size),
            ));
        }
        fenced(completion.lease, self.store.check_lease(completion.lease).await?)?;
        let capacity = usize::try_from(completion.adapter_size).unwrap_or(0);
        Ok(AdapterUpload { completion, content: Vec::with_capacity(capacity), hasher: Sha256::new() })
    }

    /// Verifies the received adapter and marks the job succeeded.
    pub async fn complete(&self, upload: AdapterUpload) -> Result<(), Error> {
        let (completion, content) = upload.finish()?;
        let lease = completion.lease;
        match fenced(lease, self.store.complete_job(&completion, &content).await?)? {
            CompleteOutcome::Completed => {
                info!(job_id = %lease.job_id, epoch = lease.epoch, adapter_sha256 = %completion.adapter_sha256,
                      size = completion.adapter_size, "job succeeded");
                if !completion.metrics.is_empty() {
                    self.hub.publish(lease.job_id, HubEventKind::Metrics(completion.metrics));
                }
                self.hub.publish(lease.job_id, HubEventKind::Changed);
                Ok(())
            }
            CompleteOutcome::AlreadyCompleted => Ok(()),
            CompleteOutcome::DifferentAdapter { stored_sha256 } => Err(Error::FailedPrecondition(format!(
                "lease {lease} already completed the job with adapter sha256 {stored_sha256}; a job has one adapter"
            ))),
        }
    }

    /// Ends a lease with an error or acknowledges its cancellation.
    pub async fn fail(&self, failure: Failure) -> Result<(), Error> {
        let lease = failure.lease;
        match fenced(lease, self.store.fail_job(&failure).await?)? {
            FailOutcome::Ended(state) => {
                info!(job_id = %lease.job_id, epoch = lease.epoch, %state, error = %failure.error, "attempt ended");
                self.hub.publish(lease.job_id, HubEventKind::Changed);
            }
            FailOutcome::Replayed(_) => {}
        }
        Ok(())
    }

    /// A dataset's record and its bytes in chunks.
    pub async fn dataset(
        &self,
        reference: DatasetRef,
    ) -> Result<(DatasetInfo, impl Stream<Item = Result<Vec<u8>, Error>> + Send + 'static), Error> {
        let info =
            self.store.dataset(&reference).await?.ok_or_else(|| {
                Error::NotFound(format!("dataset {reference} not found; upload it with UploadDataset"))
            })?;
        let store = self.store.clone();
        let chunks = blob::chunks(info.size, move |offset, len| {
            let (store, reference) = (store.clone(), reference.clone());
            async move { Ok(store.dataset_window(&reference, offset, len).await?) }
        });
        Ok((info, chunks))
    }

    /// Ends leases whose worker stopped heartbeating; see [`spawn_reaper`].
    pub async fn reap_expired(&self) -> Result<usize, Error> {
        let reaped = self.store.reap_expired_leases(100).await?;
        for r in &reaped {
            warn!(job_id = %r.job_id, worker_id = %r.worker_id, attempt = r.attempt, state = %r.state, reason = %r.reason, "lease lost");
            self.hub.publish(r.job_id, HubEventKind::Changed);
        }
        Ok(reaped.len())
    }
}

/// An adapter archive being received for a completion.
pub struct AdapterUpload {
    completion: Completion,
    content: Vec<u8>,
    hasher: Sha256,
}

impl AdapterUpload {
    pub fn push(&mut self, data: &[u8]) -> Result<(), Error> {
        if (self.content.len() + data.len()) as u64 > self.completion.adapter_size {
            return Err(Error::invalid(
                "adapter_size",
                format!(
                    "more than the announced {} bytes arrived; announce the archive's real size",
                    self.completion.adapter_size
                ),
            ));
        }
        self.hasher.update(data);
        self.content.extend_from_slice(data);
        Ok(())
    }

    fn finish(self) -> Result<(Completion, Vec<u8>), Error> {
        let size = self.content.len() as u64;
        if size != self.completion.adapter_size {
            return Err(Error::invalid(
                "adapter_size",
                format!(
                    "announced {} bytes but {size} arrived; upload the whole archive again",
                    self.completion.adapter_size
                ),
            ));
        }
        let sha256 = hex::encode(self.hasher.finalize());
        if sha256 != self.completion.adapter_sha256 {
            return Err(Error::invalid(
                "adapter_sha256",
                format!(
                    "the received bytes hash to {sha256}, not {}; upload the archive again",
                    self.completion.adapter_sha256
                ),
            ));
        }
        Ok((self.completion, self.content))
    }
}

fn fenced<T>(lease: LeaseRef, result: Fenced<T>) -> Result<T, Error> {
    match result {
        Fenced::Valid(value) => Ok(value),
        Fenced::NotFound => Err(Error::NotFound(format!("job {} not found", lease.job_id))),
        Fenced::Stale { state, epoch } => {
            warn!(job_id = %lease.job_id, epoch = lease.epoch, current_epoch = epoch, %state, "stale lease refused");
            Err(stale_lease(lease))
        }
    }
}

fn stale_lease(lease: LeaseRef) -> Error {
    Error::FailedPrecondition(format!("lease {lease} is no longer valid; stop working on this job"))
}
