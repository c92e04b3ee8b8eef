//! What workers do: register, heartbeat, lease jobs, report, complete and
//! fail them, upload checkpoints and read datasets; and the [`reaper`] that
//! ends the leases of workers that stopped heartbeating. Every call about a
//! job is fenced by its lease epoch, so a worker whose lease was lost and
//! re-leased can no longer change the job.

mod presence;
mod reaper;

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use ptune_core::WorkerId;
use tracing::{info, warn};

pub use presence::Presence;
pub use reaper::spawn_reaper;

use crate::auth::Identity;
use crate::blob::{self, collect_files, BlobWriter, Collected, Received};
use crate::error::Error;
use crate::events::{EventHub, HubEventKind, WorkSignal};
use crate::memory;
use crate::model::{
    CheckpointInfo, CheckpointUpload, Completion, DatasetInfo, DatasetRef, Failure, HeartbeatReply, Lease, LeaseRef,
    LeaseRequest, ProgressReport, Registered, Release, StopSignal, WorkerOffer, WorkerRegistration,
};
use crate::retry::RetryPolicy;
use crate::group::{together_or_alone, Group};
use crate::store::{
    merge_reports, AdapterFile, CheckpointStored, ChunkTarget, CompleteOutcome, Cycle, Cycled, FailOutcome, Fenced,
    LeaseAsk, Store, StoreError, WorkerOwnership,
};

/// Lease timing handed to workers, and what happens after an attempt ends.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub lease_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub retry: RetryPolicy,
    /// Largest checkpoint archive a worker may upload.
    pub max_checkpoint_bytes: u64,
    /// Largest adapter archive a worker may upload.
    pub max_adapter_bytes: u64,
}

/// The longest a `LeaseJob` call waits for work.
pub const MAX_LEASE_WAIT: Duration = Duration::from_secs(5);

/// Most progress reports one `ReportProgressBatch` call may carry.
pub const MAX_BATCH_REPORTS: usize = 1000;

/// Transactions at once that write the progress reports, and those that
/// write the completions and leases, of many workers (`group.rs`). One of
/// each: the calls that arrive while it runs go together in the next, and
/// larger groups cost less CPU per call. In the fleet benchmark, one gave
/// 1,330 cycles a second, two 1,160 and four 1,060, at the same latencies.
const GROUP_WRITERS: usize = 1;

/// Most adapter bytes held in memory for one group of completions.
const MAX_GROUP_ADAPTER_BYTES: usize = 8 << 20;

/// What a lease counts toward a group's weight: a group takes at most 128
/// (`Store::cycle`), fewer beside the adapters of its completions.
const LEASE_WEIGHT: usize = MAX_GROUP_ADAPTER_BYTES / 128;

/// What one call's progress reports got: each lease's answer.
type Recorded = Result<Vec<(ProgressReport, Fenced<StopSignal>)>, StoreError>;

/// What a completion or a lease call got (`Store::cycle`).
type CycleAnswer = Result<Cycled, StoreError>;

/// The worker-facing domain service. Cheap to clone.
#[derive(Clone)]
pub struct Workers {
    store: Store,
    hub: EventHub,
    /// Wakes `LeaseJob` calls waiting for work.
    work: WorkSignal,
    /// The workers asking this coordinator for work (`presence.rs`).
    presence: Presence,
    timing: Timing,
    /// Progress calls of many workers, written in one transaction.
    progress: Group<Vec<ProgressReport>, Recorded>,
    /// Completions and lease calls of many workers, written in one
    /// transaction: a completion's next lease commits with it.
    cycles: Group<Cycle, CycleAnswer>,
    /// Registrations estimating queued jobs take turns (`memory::estimate_queued`).
    estimating: Arc<tokio::sync::Mutex<()>>,
}

impl Workers {
    pub fn new(store: Store, hub: EventHub, work: WorkSignal, timing: Timing) -> Self {
        let presence = Presence::new(timing.lease_timeout / 2);
        let progress = Group::new(GROUP_WRITERS, MAX_BATCH_REPORTS, {
            let store = store.clone();
            Arc::new(move |calls: Vec<Vec<ProgressReport>>| {
                let store = store.clone();
                Box::pin(async move { write_progress(&store, &calls, timing.lease_timeout).await })
            })
        });
        let cycles = Group::new(GROUP_WRITERS, MAX_GROUP_ADAPTER_BYTES, {
            let store = store.clone();
            Arc::new(move |cycles: Vec<Cycle>| {
                let store = store.clone();
                Box::pin(async move { write_cycles(&store, &cycles, timing.lease_timeout).await })
            })
        });
        Self { store, hub, work, presence, timing, progress, cycles, estimating: Arc::default() }
    }

    /// Registers (or re-registers) a worker for the token `caller` and
    /// tells it the lease timing. A worker id that a live other token
    /// registered is refused. The queued jobs on the models whose shape it
    /// reports get their memory estimates from the shapes now known.
    pub async fn register(&self, reg: WorkerRegistration, caller: &Identity) -> Result<Registered, Error> {
        let worker_id = reg.worker_id.unwrap_or_default();
        let shaped: Vec<String> = reg.models.iter().filter(|m| m.shape().is_some()).map(|m| m.name.clone()).collect();
        if !self.store.upsert_worker(worker_id, &reg, caller.token_id).await? {
            return Err(Error::PermissionDenied(format!(
                "worker {worker_id} was registered with another token; use that token or a new worker id"
            )));
        }
        let models: Vec<&str> = reg.models.iter().map(|m| m.name.as_str()).collect();
        let devices: Vec<&str> = reg.devices.iter().map(|d| d.name.as_str()).collect();
        info!(worker_id = %worker_id, hostname = %reg.hostname, slots = reg.slots, ?models, ?devices,
              memory_bytes = reg.memory_bytes, "worker registered");
        self.presence.forget(worker_id);
        // In a task of its own: a caller that gives up (a deep queue takes
        // seconds) does not cut the estimate short, so its retry finds it done.
        let (store, estimating) = (self.store.clone(), self.estimating.clone());
        let estimated = tokio::spawn(async move {
            let _turn = estimating.lock().await;
            memory::estimate_queued(&store, &shaped).await
        });
        estimated.await.map_err(|e| Error::Internal(format!("estimating the queued jobs stopped: {e}")))??;
        Ok(Registered {
            worker_id,
            heartbeat_interval: self.timing.heartbeat_interval,
            lease_timeout: self.timing.lease_timeout,
            max_checkpoint_bytes: self.timing.max_checkpoint_bytes,
        })
    }

    /// Renews the worker's valid leases, records its health and names the
    /// leases it must stop. What this coordinator keeps of the jobs the
    /// worker leased here is pruned to those it names.
    pub async fn heartbeat(
        &self,
        worker: WorkerId,
        leases: &[LeaseRef],
        unhealthy_reason: &str,
        caller: &Identity,
    ) -> Result<HeartbeatReply, Error> {
        self.check_worker(worker, caller).await?;
        let known = self.store.touch_worker(worker, unhealthy_reason).await?;
        if !unhealthy_reason.is_empty() {
            // Its next lease call says it is healthy again.
            self.presence.forget(worker);
        }
        let (stop, early_stop) = self.store.renew_leases(worker, leases, self.timing.lease_timeout).await?;
        self.presence.holding(worker, &leases.iter().map(|l| l.job_id).collect::<Vec<_>>());
        if !known {
            warn!(worker_id = %worker, "heartbeat from an unregistered worker; it should register again");
        }
        Ok(HeartbeatReply { stop, early_stop, known })
    }

    /// Leases the worker a queued job on a model it serves, if
    /// [`crate::placement`] gives it one (a job that fits its memory, the
    /// oldest on one of the `loaded` models it holds in memory first).
    /// When no job fits now, waits up to `wait` (at most
    /// [`MAX_LEASE_WAIT`]) for one to be queued on any coordinator, looking
    /// again each time one is ([`WorkSignal`]) and when a queued job's retry
    /// time or spread window ends (which nothing notifies); `None` if none
    /// came. The call stands for the worker's heartbeat while it waits, and
    /// an idle worker's calls cost the database next to nothing
    /// (`presence.rs`).
    pub async fn lease(&self, ask: LeaseRequest, caller: &Identity) -> Result<Option<Lease>, Error> {
        let LeaseRequest { worker, free_slots, wait, .. } = ask;
        // Subscribed before the first look, so a job queued in between wakes it.
        let mut woken = self.work.subscribe();
        let deadline = tokio::time::Instant::now() + wait.min(MAX_LEASE_WAIT);
        let Some(offer) = self.offer(ask, caller).await? else { return Ok(None) };
        let _waiting = self.presence.waiting(worker);
        // The work counts of the worker's models at its last read (by this
        // call or, its offer unchanged, an earlier one), and when a queued
        // job's retry time or spread window ends.
        let prior = self.presence.last_read(worker, &offer.models, free_slots, &offer.loaded);
        // A time after this call's wait is the next call's to read at.
        let mut ripens =
            prior.as_ref().and_then(|(_, at)| *at).map(tokio::time::Instant::from_std).filter(|at| *at < deadline);
        let mut read_at = prior.map(|(counts, _)| counts);
        loop {
            woken.borrow_and_update();
            let counts = self.work.counts(&offer.models);
            let ripe = ripens.is_some_and(|at| tokio::time::Instant::now() >= at);
            if ripe {
                ripens = None;
            }
            // A first read, a job ripe and lost notifications read at once; a
            // job queued reads only with a look to take (`WorkSignal`).
            let look = match &read_at {
                Some(then) if !ripe => self.work.take_look(&offer.models, then, &counts),
                _ => Some(None),
            };
            if let Some(look) = look {
                read_at = Some(counts.clone());
                let ask = LeaseAsk { worker, offer: offer.clone() };
                let cycle = Cycle::Lease(ask);
                let Cycled::Lease(leased) =
                    self.cycles.write(cycle, vec![worker.0], LEASE_WEIGHT).await.map_err(lost)??
                else {
                    return Err(Error::Internal("a lease call was answered as a completion".into()));
                };
                let (lease, seen) = leased?;
                if let Some(lease) = self.took(worker, &offer, lease, seen, look) {
                    return Ok(Some(lease));
                }
                let outlook = self.store.queue_outlook(&offer.models).await?;
                let now = tokio::time::Instant::now();
                ripens = outlook.changes_in.map(|after| now + after.max(Duration::from_millis(5)));
                // Only an empty queue holds for the worker's next calls: what it
                // saw but could not take may be its to take once others change.
                let offered = (&offer.models[..], free_slots, &offer.loaded[..]);
                self.presence.read(worker, (seen == 0).then_some(counts), offered, ripens.map(tokio::time::Instant::into_std));
                if now >= deadline {
                    return Ok(None);
                }
                ripens = ripens.filter(|at| *at < deadline);
            }
            tokio::select! {
                changed = woken.changed() => if changed.is_err() { return Ok(None) },
                () = tokio::time::sleep_until(ripens.unwrap_or(deadline)) => if ripens.is_none() { return Ok(None) },
            }
        }
    }

    /// What `worker` offers to lease on, once its token is checked and its
    /// free slots and loaded models are recorded where they changed; `None`
    /// when it has no slot free or serves no model.
    async fn offer(&self, ask: LeaseRequest, caller: &Identity) -> Result<Option<WorkerOffer>, Error> {
        let LeaseRequest { worker, free_slots, loaded, .. } = ask;
        let not_registered =
            || Error::NotFound(format!("worker {worker} is not registered; call RegisterWorker first"));
        let (mut offer, ownership) =
            self.store.worker_offer(worker, caller.token_id).await?.ok_or_else(not_registered)?;
        if ownership == WorkerOwnership::Other {
            return Err(other_token(worker));
        }
        if self.presence.must_write(worker, free_slots, &loaded) {
            if !self.store.record_poll(worker, free_slots, &loaded).await? {
                return Err(not_registered());
            }
            self.presence.written(worker, free_slots, loaded.clone());
        }
        if free_slots == 0 || offer.models.is_empty() {
            return Ok(None);
        }
        offer.loaded = loaded;
        Ok(Some(offer))
    }

    /// Hands on what a lease call of `worker` saw (`WorkSignal`), and
    /// records the lease it took, if any. `look` is the model whose new
    /// work the call looked for; `None`, all its models.
    fn took(
        &self,
        worker: WorkerId,
        offer: &WorkerOffer,
        lease: Option<Lease>,
        seen: usize,
        look: Option<String>,
    ) -> Option<Lease> {
        // Jobs behind the one leased go to two more; jobs it could not take, to one more.
        let more = if lease.is_some() { seen.saturating_sub(1).min(2) } else { seen.min(1) } as u32;
        match (&lease, look) {
            (Some(lease), _) => self.work.hand_on(&lease.spec.base_model, more),
            (None, Some(model)) => self.work.hand_on(&model, more),
            (None, None) => offer.models.iter().for_each(|model| self.work.hand_on(model, more)),
        }
        let lease = lease?;
        self.presence.leased(worker, lease.job_id);
        info!(job_id = %lease.job_id, worker_id = %worker, epoch = lease.epoch, attempt = lease.attempt, "job leased");
        self.hub.publish(lease.job_id, HubEventKind::Changed);
        Some(lease)
    }

    /// The ask of a completion's next lease (`CompleteJobHeader.next`),
    /// which never waits. The completion stands however the ask ends, so a
    /// refusal or an error is logged and the completion asks for nothing:
    /// the worker then asks with LeaseJob, which says what is wrong.
    async fn next_ask(&self, next: LeaseRequest, caller: &Identity) -> Option<LeaseAsk> {
        let worker = next.worker;
        match self.offer(next, caller).await {
            Ok(offer) => offer.map(|offer| LeaseAsk { worker, offer }),
            Err(e) => {
                warn!(worker_id = %worker, error = %e, "no next lease with the completion");
                None
            }
        }
    }

    /// Marks the workers waiting in `LeaseJob` calls alive where their rows
    /// grew old, in one statement (the reaper's tick).
    pub async fn refresh_waiting(&self) -> Result<(), Error> {
        let due = self.presence.due();
        if !due.is_empty() {
            let ids: Vec<uuid::Uuid> = due.iter().map(|w| w.0).collect();
            self.store.refresh_pollers(&ids).await?;
        }
        Ok(())
    }

    /// Records progress; the answer says whether and why the job should stop.
    pub async fn report_progress(&self, report: ProgressReport) -> Result<StopSignal, Error> {
        let (report, outcome) = self.record(vec![report]).await?.swap_remove(0);
        let signal = fenced(report.lease, outcome)?;
        self.published(report, signal);
        Ok(signal)
    }

    /// Records the progress of several leases in one transaction
    /// ([`Store::report_progress_batch`]); answers for each lease, in the
    /// order each first appears, whether and why its job should stop, or why
    /// its reports were refused.
    pub async fn report_progress_batch(
        &self,
        reports: Vec<ProgressReport>,
    ) -> Result<Vec<(LeaseRef, Result<StopSignal, Error>)>, Error> {
        if reports.len() > MAX_BATCH_REPORTS {
            return Err(Error::invalid(
                "reports",
                format!("at most {MAX_BATCH_REPORTS} reports per call, got {}; send them in several", reports.len()),
            ));
        }
        let recorded = self.record(reports).await?;
        Ok(recorded
            .into_iter()
            .map(|(report, outcome)| {
                let lease = report.lease;
                let signal = fenced(lease, outcome);
                if let Ok(signal) = &signal {
                    self.published(report, *signal);
                }
                (lease, signal)
            })
            .collect())
    }

    /// Writes one call's reports with those of other calls waiting at the
    /// same time; answers each lease of [`merge_reports`]`(reports)`.
    async fn record(&self, reports: Vec<ProgressReport>) -> Result<Vec<(ProgressReport, Fenced<StopSignal>)>, Error> {
        let merged = merge_reports(&reports);
        let jobs = merged.iter().map(|r| r.lease.job_id.0).collect();
        let weight = merged.len();
        Ok(self.progress.write(merged, jobs, weight).await.map_err(lost)??)
    }

    /// Publishes what a recorded report changed.
    fn published(&self, report: ProgressReport, signal: StopSignal) {
        let lease = report.lease;
        self.hub.publish(lease.job_id, HubEventKind::Progress { step: report.step, total_steps: report.total_steps });
        if !report.metrics.is_empty() {
            self.hub.publish(lease.job_id, HubEventKind::Metrics(report.metrics));
        }
        if signal == StopSignal::Diverged {
            warn!(job_id = %lease.job_id, epoch = lease.epoch, step = report.step, "training loss diverged; job failed");
            self.hub.publish(lease.job_id, HubEventKind::Changed);
        }
    }

    /// Starts receiving the adapter of a completed lease. Refuses a large
    /// adapter early when the lease is already stale, so the worker does not
    /// upload it in vain.
    pub async fn begin_completion(&self, completion: Completion) -> Result<AdapterUpload, Error> {
        let max = self.timing.max_adapter_bytes;
        if completion.adapter_size == 0 || completion.adapter_size > max {
            return Err(Error::invalid(
                "adapter_size",
                format!(
                    "must be between 1 and {max} bytes (the coordinator's --max-adapter-mib), got {}",
                    completion.adapter_size
                ),
            ));
        }
        // An adapter smaller than one chunk is held in memory until it is
        // whole, and the transaction that completes the job checks its lease
        // then; a larger one is checked before any of its bytes are stored.
        if !BlobWriter::stays_in_memory(&self.store, completion.adapter_size) {
            fenced(completion.lease, self.store.check_lease(completion.lease).await?)?;
        }
        let (writer, blob) = BlobWriter::new_blob(self.store.clone(), completion.adapter_size, "adapter_size").await?;
        Ok(AdapterUpload { completion, writer, blob })
    }

    /// Verifies the received adapter and marks the job succeeded. An
    /// adapter smaller than one chunk (1 MiB) is written in the transaction that
    /// completes the job, so a completion commits once; completions of many
    /// workers arriving together share that transaction. Where the worker
    /// asks for its `next` lease, that transaction takes it too once the
    /// completion is recorded, as a `LeaseJob` call that does not wait
    /// would; the completion stands however the lease ends.
    pub async fn complete(
        &self,
        upload: AdapterUpload,
        next: Option<LeaseRequest>,
        caller: &Identity,
    ) -> Result<Option<Lease>, Error> {
        let AdapterUpload { completion, writer, blob } = upload;
        let lease = completion.lease;
        // A stored blob's guard removes its row if this call is cancelled before it is linked.
        let (written, adapter, unlinked) = match writer.finish_small().await? {
            Received::Stored(written, unlinked) => (written, AdapterFile::Stored(blob), Some(unlinked)),
            Received::Small { data, written } => (written, AdapterFile::Small { blob, data }, None),
        };
        let weight = match &adapter {
            AdapterFile::Small { data, .. } => data.len(),
            AdapterFile::Stored(_) => 1,
        };
        let (outcome, next) = match written.matches(completion.adapter_size, &completion.adapter_sha256, "adapter") {
            Ok(()) => {
                let next = match next {
                    Some(next) => self.next_ask(next, caller).await,
                    None => None,
                };
                let mut keys = vec![lease.job_id.0];
                keys.extend(next.as_ref().map(|ask| ask.worker.0));
                let weight = weight + if next.is_some() { LEASE_WEIGHT } else { 0 };
                let cycle = Cycle::Complete { completion: completion.clone(), adapter, next: next.clone() };
                match self.cycles.write(cycle, keys, weight).await {
                    Ok(Ok(Cycled::Complete(outcome, leased))) => (Ok(outcome), next.zip(leased)),
                    Ok(Ok(Cycled::Lease(_))) => {
                        (Err(Error::Internal("a completion was answered as a lease call".into())), None)
                    }
                    Ok(Err(e)) => (Err(Error::from(e)), None),
                    Err(lost) => (Err(self::lost(lost)), None),
                }
            }
            Err(e) => (Err(e), None),
        };
        let linked = matches!(outcome, Ok(Fenced::Valid(CompleteOutcome::Completed)));
        if unlinked.is_some() && !linked {
            self.store.abandon_upload(ChunkTarget::Blob(blob)).await?;
        }
        drop(unlinked);
        match fenced(lease, outcome?)? {
            CompleteOutcome::Completed => {
                info!(job_id = %lease.job_id, epoch = lease.epoch, adapter_sha256 = %completion.adapter_sha256,
                      size = completion.adapter_size, "job succeeded");
                self.presence.ended(lease.job_id);
                if !completion.metrics.is_empty() {
                    self.hub.publish(lease.job_id, HubEventKind::Metrics(completion.metrics));
                }
                self.hub.publish(lease.job_id, HubEventKind::Changed);
            }
            CompleteOutcome::AlreadyCompleted => {}
            CompleteOutcome::DifferentAdapter { stored_sha256 } => {
                return Err(Error::FailedPrecondition(format!(
                    "lease {lease} already completed the job with adapter sha256 {stored_sha256}; a job has one adapter"
                )))
            }
        }
        Ok(match next {
            Some((ask, Ok((lease, seen)))) => self.took(ask.worker, &ask.offer, lease, seen, None),
            Some((ask, Err(e))) => {
                warn!(worker_id = %ask.worker, error = %e, "no next lease with the completion");
                None
            }
            None => None,
        })
    }

    /// Ends a lease with an error or acknowledges its cancellation.
    pub async fn fail(&self, failure: Failure) -> Result<(), Error> {
        let lease = failure.lease;
        match fenced(lease, self.store.fail_job(&failure, &self.timing.retry).await?)? {
            FailOutcome::Ended(state) => {
                self.presence.ended(lease.job_id);
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
                self.presence.ended(lease.job_id);
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
        let writer = BlobWriter::new(self.store.clone(), ChunkTarget::Checkpoint(id), upload.info.size, "size");
        Ok(CheckpointSink { store: self.store.clone(), id, upload, writer })
    }

    /// The checkpoint a running lease resumes from, in chunks.
    pub async fn checkpoint(
        &self,
        lease: LeaseRef,
    ) -> Result<(CheckpointInfo, impl Stream<Item = Result<Vec<u8>, Error>> + Send + 'static), Error> {
        let Some((file, info)) = fenced(lease, self.store.checkpoint_for(lease).await?)? else {
            return Err(Error::NotFound(format!("job {} has no stored checkpoint", lease.job_id)));
        };
        let chunks = blob::read(self.store.clone(), file, info.size);
        Ok((info, chunks))
    }

    /// Refuses a caller that speaks for a worker another token registered.
    async fn check_worker(&self, worker: WorkerId, caller: &Identity) -> Result<(), Error> {
        match self.store.worker_token(worker, caller.token_id).await? {
            WorkerOwnership::Other => Err(other_token(worker)),
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
        let not_found = || Error::NotFound(format!("dataset {reference} not found; upload it with UploadDataset"));
        let info = self.store.dataset(&reference).await?.ok_or_else(not_found)?;
        let blob = self.store.dataset_blob(&reference).await?.ok_or_else(not_found)?;
        let chunks = blob::read(self.store.clone(), blob, info.size);
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

    /// Removes checkpoints of finished jobs, blobs nothing links, uploads
    /// abandoned for `abandoned_after`, and then the objects of all those.
    pub async fn collect_files(&self, abandoned_after: Duration) -> Result<Collected, Error> {
        collect_files(&self.store, abandoned_after, blob::DROPPED_OBJECT_GRACE).await
    }
}

/// A checkpoint being received, written in chunks as it arrives. Dropped
/// unfinished, its rows are removed.
pub struct CheckpointSink {
    store: Store,
    id: uuid::Uuid,
    upload: CheckpointUpload,
    writer: BlobWriter,
}

impl CheckpointSink {
    pub async fn push(&mut self, data: &[u8]) -> Result<(), Error> {
        self.writer.push(data).await
    }

    /// Verifies size and hash and makes the checkpoint the job's; false
    /// when the job already had one of as many steps.
    pub async fn finish(self) -> Result<bool, Error> {
        let CheckpointSink { store, id, upload, writer } = self;
        let (written, _unlinked) = writer.finish().await?;
        let stored = match written.matches(upload.info.size, &upload.info.sha256, "") {
            Ok(()) => fenced(upload.lease, store.finish_checkpoint(id, &upload).await?),
            Err(e) => Err(e),
        };
        if !matches!(stored, Ok(CheckpointStored::Stored)) {
            store.abandon_upload(ChunkTarget::Checkpoint(id)).await?;
        }
        Ok(stored? == CheckpointStored::Stored)
    }
}

/// An adapter archive being received for a completion, written in chunks
/// as it arrives; nothing is reserved by the size the header announces.
pub struct AdapterUpload {
    completion: Completion,
    writer: BlobWriter,
    blob: uuid::Uuid,
}

impl AdapterUpload {
    pub async fn push(&mut self, data: &[u8]) -> Result<(), Error> {
        self.writer.push(data).await
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

/// The refusal of a call about a worker that another token registered.
fn other_token(worker: WorkerId) -> Error {
    Error::PermissionDenied(format!(
        "worker {worker} was registered with another token; only that token may speak for it"
    ))
}

/// Writes the progress calls of a group, all in one transaction where they
/// can be; answers each call with its leases' answers.
async fn write_progress(store: &Store, calls: &[Vec<ProgressReport>], timeout: Duration) -> Vec<Recorded> {
    store.prometheus().observe_group("progress", calls.len());
    together_or_alone(calls, |calls: &[Vec<ProgressReport>]| async move {
        // Each call's reports are merged already and name jobs no other call
        // of the group names, so the answers come call after call.
        let mut answers = store.report_progress_batch(&calls.concat(), timeout).await?.into_iter();
        Ok(calls.iter().map(|call| answers.by_ref().take(call.len()).collect()).collect())
    })
    .await
}

/// Writes the completions and lease calls of a group, all in one
/// transaction where they can be (`Store::cycle`).
async fn write_cycles(store: &Store, cycles: &[Cycle], timeout: Duration) -> Vec<CycleAnswer> {
    let completions = cycles.iter().filter(|c| matches!(c, Cycle::Complete { .. })).count();
    if completions > 0 {
        store.prometheus().observe_group("completion", completions);
    }
    if cycles.len() > completions {
        store.prometheus().observe_group("lease", cycles.len() - completions);
    }
    together_or_alone(cycles, |cycles: &[Cycle]| store.cycle(cycles, timeout)).await
}

/// A group write that answered no one: it panicked.
fn lost(_: crate::group::Lost) -> Error {
    Error::Internal("the write of this call's group failed; retry".into())
}
