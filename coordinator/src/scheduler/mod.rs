//! What workers do: register, heartbeat, lease jobs, report, complete and
//! fail them. Every call about a job is fenced by its lease epoch, so a
//! worker whose lease was lost and re-leased can no longer change the job.

pub(crate) mod memory;
mod reaper;
pub mod retry;

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
    CheckpointInfo, CheckpointUpload, Completion, DatasetInfo, DatasetRef, Failure, HeartbeatReply, Lease, LeaseRef,
    ProgressReport, Registered, Release, StopSignal, WorkerRegistration,
};
use crate::auth::Identity;
use crate::store::{CheckpointStored, CompleteOutcome, FailOutcome, Fenced, Store, WorkerOwnership};
use retry::RetryPolicy;

/// Largest adapter archive accepted.
pub const MAX_ADAPTER_BYTES: u64 = 1_000_000_000;

/// Lease timing handed to workers, and what happens after an attempt ends.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub lease_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub retry: RetryPolicy,
    /// Largest checkpoint archive a worker may upload.
    pub max_checkpoint_bytes: u64,
}

/// Rows of a stored checkpoint: uploads are cut into chunks of this size.
const CHECKPOINT_CHUNK: usize = 1 << 20;

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

    /// Registers (or re-registers) a worker for the token `caller` and
    /// tells it the lease timing. A worker id that a live other token
    /// registered is refused.
    pub async fn register(&self, reg: WorkerRegistration, caller: &Identity) -> Result<Registered, Error> {
        let worker_id = reg.worker_id.unwrap_or_default();
        if !self.store.upsert_worker(worker_id, &reg, caller.token_id).await? {
            return Err(Error::PermissionDenied(format!(
                "worker {worker_id} was registered with another token; use that token or a new worker id"
            )));
        }
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
            max_checkpoint_bytes: self.timing.max_checkpoint_bytes,
        })
    }

    /// Renews the worker's valid leases, records its health and names the
    /// leases it must stop.
    pub async fn heartbeat(
        &self,
        worker: WorkerId,
        leases: &[LeaseRef],
        unhealthy_reason: &str,
        caller: &Identity,
    ) -> Result<HeartbeatReply, Error> {
        self.check_worker(worker, caller).await?;
        let known = self.store.touch_worker(worker, unhealthy_reason).await?;
        let (stop, early_stop) = self.store.renew_leases(worker, leases, self.timing.lease_timeout).await?;
        if !known {
            warn!(worker_id = %worker, "heartbeat from an unregistered worker; it should register again");
        }
        Ok(HeartbeatReply { stop, early_stop, known })
    }

    /// Leases a queued job on a model the worker serves and that fits its
    /// memory, if any: the oldest on one of the `loaded` models it holds in
    /// memory, else the oldest.
    pub async fn lease(
        &self,
        worker: WorkerId,
        free_slots: u32,
        loaded: Vec<String>,
        caller: &Identity,
    ) -> Result<Option<Lease>, Error> {
        self.check_worker(worker, caller).await?;
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
        match fenced(lease, self.store.fail_job(&failure, &self.timing.retry).await?)? {
            FailOutcome::Ended(state) => {
                info!(job_id = %lease.job_id, epoch = lease.epoch, %state, error = %failure.error,
                      infrastructure = failure.infrastructure, "attempt ended");
                self.hub.publish(lease.job_id, HubEventKind::Changed);
            }
            FailOutcome::Replayed(_) => {}
        }
        Ok(())
    }

    /// Takes a lease back from a draining worker: the job is queued again at once.
    pub async fn release(&self, release: Release) -> Result<(), Error> {
        let lease = release.lease;
        match fenced(lease, self.store.release_job(&release, &self.timing.retry).await?)? {
            FailOutcome::Ended(state) => {
                info!(job_id = %lease.job_id, epoch = lease.epoch, %state, reason = %release.reason, "lease released");
                self.hub.publish(lease.job_id, HubEventKind::Changed);
            }
            FailOutcome::Replayed(_) => {}
        }
        Ok(())
    }

    /// Starts receiving a checkpoint of a running lease.
    pub async fn begin_checkpoint(&self, upload: CheckpointUpload) -> Result<CheckpointSink, Error> {
        let max = self.timing.max_checkpoint_bytes;
        if upload.info.size == 0 || upload.info.size > max {
            return Err(Error::invalid(
                "size",
                format!("a checkpoint must be between 1 and {max} bytes (--max-checkpoint-mib), got {}", upload.info.size),
            ));
        }
        let id = fenced(upload.lease, self.store.begin_checkpoint(&upload).await?)?;
        Ok(CheckpointSink {
            store: self.store.clone(),
            id,
            upload,
            pending: Vec::with_capacity(CHECKPOINT_CHUNK),
            received: 0,
            next_seq: 0,
            hasher: Sha256::new(),
            finished: false,
        })
    }

    /// The checkpoint a running lease resumes from, in chunks.
    pub async fn checkpoint(
        &self,
        lease: LeaseRef,
    ) -> Result<(CheckpointInfo, impl Stream<Item = Result<Vec<u8>, Error>> + Send + 'static), Error> {
        let Some((id, info)) = fenced(lease, self.store.checkpoint_for(lease).await?)? else {
            return Err(Error::NotFound(format!("job {} has no stored checkpoint", lease.job_id)));
        };
        let store = self.store.clone();
        let chunks = futures::stream::try_unfold(0u32, move |seq| {
            let store = store.clone();
            async move {
                let chunk = store.checkpoint_chunk(id, seq).await?;
                Ok::<_, Error>(chunk.map(|data| (data, seq + 1)))
            }
        });
        Ok((info, chunks))
    }

    /// Refuses a caller that speaks for a worker another token registered.
    async fn check_worker(&self, worker: WorkerId, caller: &Identity) -> Result<(), Error> {
        match self.store.worker_token(worker, caller.token_id).await? {
            WorkerOwnership::Other => Err(Error::PermissionDenied(format!(
                "worker {worker} was registered with another token; only that token may speak for it"
            ))),
            WorkerOwnership::Mine | WorkerOwnership::Unknown => Ok(()),
        }
    }

    /// A dataset of a job `lease` holds: its record and its bytes in chunks.
    pub async fn dataset(
        &self,
        reference: DatasetRef,
        lease: LeaseRef,
    ) -> Result<(DatasetInfo, impl Stream<Item = Result<Vec<u8>, Error>> + Send + 'static), Error> {
        let spec = fenced(lease, self.store.leased_spec(lease).await?)?;
        let wanted = reference.to_string();
        if spec.data.train != wanted && spec.data.eval != wanted {
            return Err(Error::PermissionDenied(format!(
                "dataset {reference} is not one of job {}'s datasets",
                lease.job_id
            )));
        }
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

    /// Ends leases whose worker stopped heartbeating, after giving every
    /// open lease a full period when `after_outage`; see [`spawn_reaper`].
    pub async fn reap_expired(&self, after_outage: bool) -> Result<usize, Error> {
        let grace = after_outage.then_some(self.timing.lease_timeout);
        let reaped = self.store.reap_expired_leases(100, grace, &self.timing.retry).await?;
        for r in &reaped {
            warn!(job_id = %r.job_id, worker_id = %r.worker_id, attempt = r.attempt, state = %r.state, reason = %r.reason, "lease lost");
            self.hub.publish(r.job_id, HubEventKind::Changed);
        }
        Ok(reaped.len())
    }
}

/// A checkpoint being received: hashed and written in chunks as it
/// arrives, never held whole. Dropped unfinished, its rows are removed.
pub struct CheckpointSink {
    store: Store,
    id: uuid::Uuid,
    upload: CheckpointUpload,
    pending: Vec<u8>,
    received: u64,
    next_seq: u32,
    hasher: Sha256,
    finished: bool,
}

impl CheckpointSink {
    pub async fn push(&mut self, data: &[u8]) -> Result<(), Error> {
        self.received += data.len() as u64;
        if self.received > self.upload.info.size {
            return Err(Error::invalid(
                "size",
                format!("more than the announced {} bytes arrived; announce the archive's real size", self.upload.info.size),
            ));
        }
        self.hasher.update(data);
        let mut data = data;
        while !data.is_empty() {
            let take = (CHECKPOINT_CHUNK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == CHECKPOINT_CHUNK {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Error> {
        if !self.pending.is_empty() {
            self.store.put_checkpoint_chunk(self.id, self.next_seq, &self.pending).await?;
            self.next_seq += 1;
            self.pending.clear();
        }
        Ok(())
    }

    /// Verifies size and hash and makes the checkpoint the job's; false
    /// when the job already had one of as many steps.
    pub async fn finish(mut self) -> Result<bool, Error> {
        if self.received != self.upload.info.size {
            return Err(Error::invalid(
                "size",
                format!("announced {} bytes but {} arrived; upload the whole archive again", self.upload.info.size, self.received),
            ));
        }
        let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if sha256 != self.upload.info.sha256 {
            return Err(Error::invalid(
                "sha256",
                format!("the received bytes hash to {sha256}, not {}; upload the archive again", self.upload.info.sha256),
            ));
        }
        self.flush().await?;
        let stored = fenced(self.upload.lease, self.store.finish_checkpoint(self.id, &self.upload).await?)?;
        self.finished = true;
        Ok(stored == CheckpointStored::Stored)
    }
}

impl Drop for CheckpointSink {
    fn drop(&mut self) {
        if !self.finished {
            let (store, id) = (self.store.clone(), self.id);
            tokio::spawn(async move {
                if let Err(e) = store.abandon_checkpoint(id).await {
                    warn!(checkpoint = %id, error = %e, "cannot remove an unfinished checkpoint upload; it is collected later");
                }
            });
        }
    }
}

impl Scheduler {
    /// Removes checkpoints of finished jobs and uploads abandoned for `abandoned_after`.
    pub async fn collect_checkpoints(&self, abandoned_after: Duration) -> Result<u64, Error> {
        Ok(self.store.collect_checkpoints(abandoned_after, 1000).await?)
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
        Fenced::Forbidden => Err(Error::PermissionDenied(format!(
            "lease {lease} was not given to this caller: send the lease_token of the Lease"
        ))),
        Fenced::Stale { state, epoch } => {
            warn!(job_id = %lease.job_id, epoch = lease.epoch, current_epoch = epoch, %state, "stale lease refused");
            Err(stale_lease(lease))
        }
    }
}

fn stale_lease(lease: LeaseRef) -> Error {
    Error::FailedPrecondition(format!("lease {lease} is no longer valid; stop working on this job"))
}
