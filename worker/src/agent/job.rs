//! One leased job from start to finish: fetch its datasets, restore its
//! newest checkpoint (the one the coordinator stores, or this worker's own
//! if newer), train it on an engine thread, and journal its progress,
//! checkpoints and ending for delivery (`journal.rs`). Every record carries
//! the lease epoch; a refused epoch means the lease is gone and the run
//! stops without reporting anything more.
//!
//! A watchdog fails the attempt (retryably, as an error of the job) when
//! the run shows no progress for its stall timeout, and gives up the engine
//! thread it hangs on.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ptune_core::JobSpec;
use ptune_proto::v1;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::archive;
use super::client::{is_transient, Coordinators, CALL_TIMEOUT};
use super::datasets::{self, FetchError};
use super::health::{Health, Verdict};
use super::journal::delivery::{deliver, Courier, Delivery};
use super::journal::{Journal, JournalMetric, LeaseFile, Record};
use super::leases::{Directive, Leases, StopCause};
use super::models::ServedModel;
use super::devices::Engines;
use super::runner::{RunRequest, RunUpdate, NO_THREAD};
use crate::engine::checkpoint::{self, TrainerState};
use crate::engine::liveness::Liveness;
use crate::engine::{Control, FailureKind, Resume, TrainJob};

/// Everything a leased job needs from its worker. Cheap to clone.
#[derive(Clone)]
pub struct JobContext {
    pub coordinators: Coordinators,
    pub courier: Courier,
    pub engines: Engines,
    pub models: Arc<Vec<ServedModel>>,
    pub work_dir: PathBuf,
    pub leases: Leases,
    pub health: Health,
    /// Replaces the spec-sized default stall timeout (a job's own
    /// `training.stall_timeout_seconds` still wins).
    pub stall_timeout: Option<Duration>,
    /// Turns true when every lease must be handed back now, without waiting
    /// for a checkpoint (a second signal, or the drain timeout).
    pub hard_stop: watch::Receiver<bool>,
}

/// Where a job's resume checkpoint lives on this worker: one folder per job,
/// shared by its attempts, so a retry on this worker continues from the
/// newest checkpoint it wrote even when that one was never uploaded.
pub fn checkpoint_dir(work_dir: &Path, job_id: &str) -> PathBuf {
    work_dir.join("checkpoints").join(job_id)
}

/// The stall timeout a job gets unless it or the worker says otherwise:
/// five minutes, plus 30 seconds per 1,024 token positions of one step's
/// batch (slow steps of large batches on a CPU), plus the generation of
/// a causal-LM evaluation batch.
pub fn default_stall_timeout(spec: &JobSpec) -> Duration {
    let positions = u64::from(spec.training.batch_size)
        * u64::from(spec.data.max_seq_len + if spec.method.uses_virtual_tokens() { spec.peft.num_virtual_tokens } else { 0 });
    let generation = spec.generation.as_ref().map_or(0, |g| u64::from(g.max_new_tokens) * u64::from(g.num_beams));
    Duration::from_secs(300 + 30 * positions.div_ceil(1024) + generation)
}

/// Trains one leased job and delivers how it ended.
pub async fn run(ctx: JobContext, lease: v1::Lease, directive: Directive) {
    let job_id = lease.job_id.clone();
    let epoch = lease.epoch;
    let spec = JobSpec::try_from(lease.spec.clone().unwrap_or_default());
    let name = spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
    let lease_file = LeaseFile { job_id: job_id.clone(), epoch, lease_token: lease.lease_token.clone(), name };
    let journal = match Journal::create(&ctx.work_dir, lease_file) {
        Ok(journal) => journal,
        Err(e) => {
            // Nowhere to journal: the disk is failing. Hand the lease back
            // so a healthy worker takes it.
            error!(job_id, error = %format!("{e:#}"), "cannot journal the lease; handing it back");
            ctx.health.record(Verdict::Infrastructure { reason: format!("{e:#}"), disk_full: true });
            let reason = format!("the worker cannot write its work directory: {e:#}");
            release_now(&ctx.coordinators, &lease, &reason).await;
            ctx.leases.remove(&job_id, epoch);
            return;
        }
    };
    let lease_dir = journal.dir().to_path_buf();
    let (records, incoming) = mpsc::unbounded_channel();
    let delivery = tokio::spawn(deliver(ctx.courier.clone(), journal, incoming, directive.clone()));

    let (ending, verdict) = match spec {
        Ok(spec) => train(&ctx, &lease, spec, &directive, &records, &lease_dir).await,
        Err(e) => (
            Some(fail(format!("lease carried an invalid spec: {e}"), FailureKind::Permanent)),
            Verdict::Neutral,
        ),
    };
    if let Some(record) = ending {
        let _ = records.send(record);
    }
    drop(records);
    let (journal, delivered) = delivery.await.expect("delivery task does not panic");
    ctx.health.record(if delivered == Delivery::Ended { verdict } else { Verdict::Neutral });
    ctx.leases.remove(&job_id, epoch);
    // Once the job can have no later attempt, its local checkpoint has served its purpose.
    let last = delivered == Delivery::Ended && journal_final(&journal);
    journal.remove();
    if last {
        let _ = tokio::fs::remove_dir_all(checkpoint_dir(&ctx.work_dir, &job_id)).await;
    }
}

/// True when the journal's ending leaves the job nothing to resume: it
/// succeeded, was cancelled, or failed for good.
pub fn journal_final(journal: &Journal) -> bool {
    journal.ending().is_some_and(|r| match r {
        Record::Complete { .. } => true,
        Record::Fail { cancelled, retryable, .. } => *cancelled || !*retryable,
        _ => false,
    })
}

fn fail(error: String, kind: FailureKind) -> Record {
    Record::Fail {
        error,
        retryable: kind != FailureKind::Permanent,
        infrastructure: kind == FailureKind::Infrastructure,
        cancelled: false,
    }
}

/// Hands a lease back without a journal, trying for a few seconds.
async fn release_now(coordinators: &Coordinators, lease: &v1::Lease, reason: &str) {
    let request = v1::ReleaseJobRequest {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        reason: reason.to_string(),
        lease_token: lease.lease_token.clone(),
    };
    let _ = coordinators
        .call(CALL_TIMEOUT, move |mut c| {
            let request = request.clone();
            async move { c.release_job(request).await.map(|_| ()) }
        })
        .await;
}

/// Trains the job and returns the record that ends its attempt (`None`
/// when the lease was lost: nothing more may be said), and what the ending
/// says about the worker's health.
async fn train(
    ctx: &JobContext,
    lease: &v1::Lease,
    spec: JobSpec,
    directive: &Directive,
    records: &mpsc::UnboundedSender<Record>,
    lease_dir: &Path,
) -> (Option<Record>, Verdict) {
    let Some(model) = ctx.models.iter().find(|m| m.name == spec.base_model) else {
        let error = format!("this worker does not serve base model {:?}", spec.base_model);
        return (Some(fail(error.clone(), FailureKind::Infrastructure)), Verdict::Neutral);
    };
    let mut hard_stop = ctx.hard_stop.clone();
    let fetched = async {
        let train = datasets::fetch(&ctx.coordinators, &spec.data.train, lease, &ctx.work_dir, directive).await?;
        let eval = datasets::fetch(&ctx.coordinators, &spec.data.eval, lease, &ctx.work_dir, directive).await?;
        Ok::<_, FetchError>((train, eval))
    };
    let fetched = tokio::select! {
        fetched = fetched => fetched,
        _ = hard_stop.wait_for(|stop| *stop) => return (Some(drained()), Verdict::Neutral),
    };
    let (train_file, eval_file) = match fetched {
        Ok(files) => files,
        Err(FetchError::Disk { reference, source }) => {
            let reason = format!("cannot store dataset {reference}: {source}");
            let disk_full = crate::engine::is_disk_failure(&source);
            return (Some(fail(reason.clone(), FailureKind::Infrastructure)), Verdict::Infrastructure { reason, disk_full });
        }
        Err(FetchError::Missing(reason)) => return (Some(fail(reason, FailureKind::Permanent)), Verdict::Fine),
        Err(FetchError::Failed(reason)) => return (Some(fail(reason, FailureKind::Job)), Verdict::Fine),
        Err(FetchError::Stopped(_)) => return (stopped_ending(directive), Verdict::Neutral),
    };
    let checkpoint = checkpoint_dir(&ctx.work_dir, &lease.job_id);
    restore_checkpoint(ctx, lease, &spec, &checkpoint, lease_dir).await;

    let stall_timeout = match spec.training.stall_timeout_seconds {
        0 => ctx.stall_timeout.unwrap_or_else(|| default_stall_timeout(&spec)),
        seconds => Duration::from_secs(seconds),
    };
    let job = TrainJob {
        train_name: train_file.file_name,
        eval_name: eval_file.file_name,
        spec,
        train_file: train_file.path,
        eval_file: eval_file.path,
        out_dir: lease_dir.join("adapter"),
        checkpoint_dir: Some(checkpoint),
        resume: Resume::IfPossible,
    };
    let (engine, devices) = match ctx.engines.for_lease(&lease.devices) {
        Ok(chosen) => chosen,
        Err(error) => return (Some(fail(error, FailureKind::Infrastructure)), Verdict::Neutral),
    };
    let liveness = Liveness::default();
    let thread = Arc::new(AtomicUsize::new(NO_THREAD));
    let (updates, mut receiver) = mpsc::unbounded_channel();
    engine.pool.submit(RunRequest {
        model_dir: model.dir.clone(),
        job,
        devices,
        directive: directive.clone(),
        updates,
        liveness: liveness.clone(),
        archive_dir: lease_dir.to_path_buf(),
        thread: thread.clone(),
    });

    let mut watchdog = tokio::time::interval(Duration::from_secs(1));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut step = 0;
    loop {
        tokio::select! {
            update = receiver.recv() => match update {
                Some(RunUpdate::Step { step: s, total_steps, metrics }) => {
                    step = s;
                    let metrics = metrics.iter().map(JournalMetric::from).collect();
                    let _ = records.send(Record::Progress { step: s, total_steps, metrics });
                }
                Some(RunUpdate::Eval { step: s, metrics }) => {
                    let metrics = metrics.iter().map(JournalMetric::from).collect();
                    let _ = records.send(Record::Progress { step: s, total_steps: 0, metrics });
                }
                Some(RunUpdate::Checkpoint { step, archive }) => {
                    let _ = records.send(Record::Checkpoint { step, archive });
                }
                Some(RunUpdate::Done(result)) => return ending_of(result, directive, lease_dir),
                None => {
                    let reason = "the engine thread ended without a result".to_string();
                    return (Some(fail(reason, FailureKind::Job)), Verdict::Fine);
                }
            },
            _ = watchdog.tick() => {
                if liveness.silent_for_ms().is_some_and(|ms| ms > stall_timeout.as_millis() as u64) {
                    directive.stop(StopCause::Stalled);
                    let abandoned = engine.pool.abandon(thread.load(Ordering::SeqCst));
                    ctx.health.engine_threads_stuck(ctx.engines.abandoned());
                    let error = format!(
                        "stalled: no progress for {} s after step {step} (training.stall_timeout_seconds); \
                         retried from the last checkpoint{}",
                        stall_timeout.as_secs(),
                        if abandoned { "; the engine thread was replaced" } else { "" }
                    );
                    error!(job_id = %lease.job_id, step, "{error}");
                    return (Some(fail(error, FailureKind::Job)), Verdict::Fine);
                }
            },
            _ = hard_stop.wait_for(|stop| *stop) => {
                directive.stop(StopCause::Drain);
                return (Some(drained()), Verdict::Neutral);
            },
        }
    }
}

/// The release of a lease handed back without a fresh checkpoint.
fn drained() -> Record {
    Record::Release { reason: "the worker is shutting down".into() }
}

/// The ending of a run that was stopped, by why it was.
fn stopped_ending(directive: &Directive) -> Option<Record> {
    match directive.stop_cause() {
        Some(StopCause::LeaseLost) | Some(StopCause::Stalled) => None,
        Some(StopCause::Drain) => Some(drained()),
        Some(StopCause::Cancelled) | None if directive.control() == Control::Suspend => {
            Some(Record::Release { reason: "the worker is draining".into() })
        }
        Some(StopCause::Cancelled) | None => {
            Some(Record::Fail { error: "stopped on request".into(), retryable: false, infrastructure: false, cancelled: true })
        }
    }
}

/// The record that ends an attempt whose run finished with `result`.
fn ending_of(
    result: Result<crate::engine::TrainOutcome, crate::engine::EngineError>,
    directive: &Directive,
    lease_dir: &Path,
) -> (Option<Record>, Verdict) {
    match result {
        Ok(outcome) if outcome.suspended => {
            let reason = format!("the worker is draining; handed back at step {}", outcome.steps);
            (Some(Record::Release { reason }), Verdict::Neutral)
        }
        Ok(outcome) if outcome.stopped => (stopped_ending(directive), Verdict::Neutral),
        Ok(outcome) => match archive::pack(&lease_dir.join("adapter"), &lease_dir.join("adapter.tar")) {
            Ok(archive) => (
                Some(Record::Complete {
                    step: outcome.steps,
                    metrics: outcome.final_metrics.iter().map(JournalMetric::from).collect(),
                    archive,
                    peak_rss_bytes: super::peak_rss_bytes(),
                }),
                Verdict::Fine,
            ),
            Err(e) => {
                let reason = format!("cannot package the adapter: {e:#}");
                let disk_full = e.chain().filter_map(|c| c.downcast_ref::<std::io::Error>()).any(crate::engine::is_disk_failure);
                let verdict = if disk_full { Verdict::Infrastructure { reason: reason.clone(), disk_full } } else { Verdict::Fine };
                let kind = if disk_full { FailureKind::Infrastructure } else { FailureKind::Job };
                (Some(fail(reason, kind)), verdict)
            }
        },
        Err(err) => {
            let kind = err.kind();
            error!(error = %err, ?kind, "job failed");
            let verdict = match (&err, kind) {
                (crate::engine::EngineError::Io { source, .. }, FailureKind::Infrastructure) => Verdict::Infrastructure {
                    reason: err.to_string(),
                    disk_full: crate::engine::is_disk_failure(source),
                },
                (_, FailureKind::Infrastructure) => Verdict::Infrastructure { reason: err.to_string(), disk_full: false },
                _ => Verdict::Fine,
            };
            (Some(fail(err.to_string(), kind)), verdict)
        }
    }
}

/// The state of the checkpoint in `dir`, if it is one of `spec`.
fn local_state(dir: &Path, spec: &JobSpec) -> Option<TrainerState> {
    if !checkpoint::exists(dir) {
        return None;
    }
    let text = std::fs::read_to_string(dir.join(checkpoint::TRAINER_STATE_FILE)).ok()?;
    let state: TrainerState = serde_json::from_str(&text).ok()?;
    (state.spec_sha256 == checkpoint::spec_digest(spec)).then_some(state)
}

/// Puts the job's newest checkpoint in `dir`: the coordinator's, unless
/// this worker holds one of as many steps. A download that fails leaves
/// the local one (or none: the run starts at step 0) and says so.
async fn restore_checkpoint(ctx: &JobContext, lease: &v1::Lease, spec: &JobSpec, dir: &Path, lease_dir: &Path) {
    let local = local_state(dir, spec).map(|s| s.step);
    let Some(remote) = lease.checkpoint.as_ref() else {
        if let Some(step) = local {
            info!(job_id = %lease.job_id, step, "resuming from this worker's own checkpoint");
        }
        return;
    };
    if local.is_some_and(|step| step >= remote.step) {
        info!(job_id = %lease.job_id, step = local, stored = remote.step, "this worker's checkpoint is as new as the stored one");
        return;
    }
    match download_checkpoint(&ctx.coordinators, lease, remote, dir, lease_dir).await {
        Ok(()) => info!(job_id = %lease.job_id, step = remote.step, "resuming from the stored checkpoint"),
        Err(e) => warn!(job_id = %lease.job_id, step = remote.step, local = ?local, error = %format!("{e:#}"),
                        "cannot fetch the stored checkpoint; resuming from what this worker has"),
    }
}

async fn download_checkpoint(
    coordinators: &Coordinators,
    lease: &v1::Lease,
    remote: &v1::CheckpointInfo,
    dir: &Path,
    lease_dir: &Path,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let target = lease_dir.join("restore.tar");
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=5 {
        let request = v1::DownloadCheckpointRequest {
            job_id: lease.job_id.clone(),
            epoch: lease.epoch,
            lease_token: lease.lease_token.clone(),
        };
        let streamed = async {
            let mut stream = coordinators
                .call(CALL_TIMEOUT, move |mut c| {
                    let request = request.clone();
                    async move { c.download_checkpoint(request).await.map(|r| r.into_inner()) }
                })
                .await?;
            crate::faults::check_write().map_err(|e| tonic::Status::internal(e.to_string()))?;
            let mut file = tokio::fs::File::create(&target).await.map_err(|e| tonic::Status::internal(e.to_string()))?;
            while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await
                .map_err(|_| tonic::Status::deadline_exceeded("checkpoint download stalled"))?
            {
                if let Some(v1::checkpoint_chunk::Part::Data(data)) = chunk?.part {
                    file.write_all(&data).await.map_err(|e| tonic::Status::internal(e.to_string()))?;
                }
            }
            file.sync_all().await.map_err(|e| tonic::Status::internal(e.to_string()))?;
            Ok::<_, tonic::Status>(())
        };
        match streamed.await {
            Ok(()) => break,
            Err(status) if is_transient(&status) && attempt < 5 => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(status) => anyhow::bail!("download refused: {}", status.message()),
        }
    }
    let (sha256, size) = archive::digest(&target)?;
    anyhow::ensure!(sha256 == remote.sha256 && size == remote.size, "the checkpoint arrived corrupt (sha256 {sha256})");
    let fresh = dir.with_file_name(format!(".{}.restoring", lease.job_id));
    let _ = std::fs::remove_dir_all(&fresh);
    if let Some(parent) = fresh.parent() {
        std::fs::create_dir_all(parent)?;
    }
    archive::unpack(&target, &fresh, remote.size.saturating_mul(2).max(1 << 20))?;
    let _ = std::fs::remove_file(&target);
    let old = dir.with_file_name(format!(".{}.replaced", lease.job_id));
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        crate::durable::rename(dir, &old)?;
    }
    crate::durable::rename(&fresh, dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}
