//! Leases: taking a queued job, renewing, fenced reports, completion,
//! failure, and reaping leases whose worker stopped heartbeating.
//!
//! Lock order is always job row, then attempt row; the reaper takes both with
//! `SKIP LOCKED` and never waits, so these paths cannot deadlock.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ptune_core::sweep::DIVERGED_PREFIX;
use ptune_core::{JobId, JobSpec, JobState, MetricKind, WorkerId};
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use tracing::instrument;
use uuid::Uuid;

use super::checkpoints::latest_checkpoint;
use super::jobs::DbJobState;
use super::metrics::insert_metrics;
use super::{millis, to_i64, to_u32, to_u64, Result, Store};
use crate::model::{Completion, Failure, Lease, LeaseRef, ProgressReport, Release, StopSignal, WorkerOffer};
use crate::scheduler::retry::{AttemptEnd, Counters, Retry, RetryPolicy};
use super::fencing::{token_matches, Fenced};

/// What `CompleteJob` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompleteOutcome {
    Completed,
    /// This epoch already completed the job with the same adapter: a retry.
    AlreadyCompleted,
    /// This epoch already completed the job with another adapter.
    DifferentAdapter {
        stored_sha256: String,
    },
}

/// What `FailJob` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// The job is in this state now (queued again, failed or cancelled).
    Ended(JobState),
    /// This epoch had already ended the same way: a retry; the job is in this state.
    Replayed(JobState),
}

/// A lease the reaper ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaped {
    pub job_id: JobId,
    pub worker_id: WorkerId,
    pub attempt: u32,
    /// The job's state afterwards.
    pub state: JobState,
    pub reason: String,
}

#[derive(sqlx::FromRow)]
struct ExpiredLease {
    job_id: Uuid,
    attempt: i32,
    worker_id: Uuid,
    epoch: i64,
    lease_token_hash: Option<Vec<u8>>,
}

#[derive(sqlx::FromRow)]
struct LockedJob {
    state: DbJobState,
    lease_epoch: i64,
    cancel_requested: bool,
    early_stop_requested: bool,
    failures: i32,
    max_attempts: i32,
    interruptions: i32,
    total_steps: i64,
}

impl LockedJob {
    fn holds(&self, lease: LeaseRef) -> bool {
        self.state == DbJobState::Running && self.lease_epoch == to_i64(lease.epoch)
    }

    fn stale<T>(&self) -> Result<Fenced<T>> {
        Ok(Fenced::Stale { state: self.state.into(), epoch: to_u64(self.lease_epoch, "lease_epoch")? })
    }
}

async fn lock_job(tx: &mut Transaction<'static, Postgres>, id: JobId) -> Result<Option<LockedJob>> {
    let row = sqlx::query_as(
        "SELECT state, lease_epoch, cancel_requested, early_stop_requested, failures, max_attempts, interruptions, \
                total_steps \
         FROM jobs WHERE id = $1 FOR UPDATE",
    )
    .bind(id.0)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row)
}

/// Closes the open attempt of a lease and returns its worker.
async fn end_attempt(
    tx: &mut Transaction<'static, Postgres>,
    lease: LeaseRef,
    outcome: &str,
    reason: &str,
) -> Result<Option<Uuid>> {
    let worker = sqlx::query_scalar(
        "UPDATE job_attempts SET ended_at = now(), outcome = $3, reason = $4 \
         WHERE job_id = $1 AND epoch = $2 AND ended_at IS NULL RETURNING worker_id",
    )
    .bind(lease.job_id.0)
    .bind(to_i64(lease.epoch))
    .bind(outcome)
    .bind(reason)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(worker)
}

async fn renew_attempt(tx: &mut Transaction<'static, Postgres>, lease: LeaseRef, timeout: Duration) -> Result<()> {
    sqlx::query(
        "UPDATE job_attempts SET lease_expires_at = now() + $3 * interval '1 millisecond' \
         WHERE job_id = $1 AND epoch = $2 AND ended_at IS NULL",
    )
    .bind(lease.job_id.0)
    .bind(to_i64(lease.epoch))
    .bind(millis(timeout))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// How long a newly queued job may wait for a better placed worker (see
/// [`Store::lease_next_job`]) before any worker serving its model takes it.
pub const SPREAD_WINDOW: Duration = Duration::from_secs(2);

/// A worker that asked for a job this recently, with slots free, counts as
/// asking still (idle workers ask every 250 ms). Longer than the window, so
/// a job is held back by the window, never by a stale request alone.
pub const POLL_FRESH: Duration = Duration::from_secs(5);

impl Store {
    /// Leases a queued job on one of the offer's models to `worker`: the
    /// oldest on a model the worker holds in memory, else the oldest. When
    /// the worker's memory is known, a job is leased only if it fits next to
    /// the jobs the worker already runs: their estimates are summed, each
    /// base model's weights counted once (the worker shares them), and a job
    /// on a model none of them uses adds its weights. Activations are summed
    /// too, although packed jobs share a pass bounded by the worker's token
    /// budget: the sum is an upper bound. Jobs without an estimate count as
    /// zero.
    ///
    /// Load is spread: for [`SPREAD_WINDOW`] after it was queued, a job is
    /// left to another worker better placed for it, one that asked for work
    /// within [`POLL_FRESH`] with a slot free and serves its model, and
    /// either holds the model in memory while this worker does not, or
    /// holds it as this worker does (or not) and runs fewer jobs. After the
    /// window any worker serving the model takes it, so a worker that asked
    /// and went away delays a job by the window at most.
    ///
    /// The job becomes running under a new epoch and a new attempt is
    /// opened.
    #[instrument(skip_all, fields(worker_id = %worker))]
    pub async fn lease_next_job(
        &self,
        worker: WorkerId,
        offer: &WorkerOffer,
        timeout: Duration,
    ) -> Result<Option<Lease>> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        // A queued job's updated_at is when it was queued (submitted or requeued).
        let picked: Option<(Uuid, f64)> = sqlx::query_as(
            "WITH held AS ( \
                 SELECT j.base_model, j.memory_weights_bytes, j.memory_job_bytes + j.memory_activation_bytes AS own \
                 FROM jobs j JOIN job_attempts a ON a.job_id = j.id AND a.epoch = j.lease_epoch \
                 WHERE a.worker_id = $4 AND a.ended_at IS NULL AND j.state = 'running'), \
             used AS ( \
                 SELECT coalesce((SELECT sum(own) FROM held), 0) \
                      + coalesce((SELECT sum(w) FROM (SELECT max(memory_weights_bytes) AS w FROM held GROUP BY base_model) m), 0) \
                        AS bytes, \
                        coalesce((SELECT array_agg(DISTINCT base_model) FROM held), '{}') AS models, \
                        (SELECT count(*) FROM held) AS running), \
             others AS ( \
                 SELECT o.loaded_models, \
                        ARRAY(SELECT m->>'name' FROM jsonb_array_elements(o.models) m \
                              WHERE coalesce(m->>'unsupported_reason', '') = '') AS serves, \
                        (SELECT count(*) FROM job_attempts a JOIN jobs j ON j.id = a.job_id AND j.lease_epoch = a.epoch \
                         WHERE a.worker_id = o.id AND a.ended_at IS NULL AND j.state = 'running') AS running \
                 FROM workers o \
                 WHERE o.id <> $4 AND o.free_slots > 0 AND o.polled_at > now() - $6 * interval '1 millisecond') \
             SELECT q.id, extract(epoch FROM now() - q.updated_at)::float8 FROM jobs q, used u \
             WHERE q.state = 'queued' AND q.base_model = ANY($1) AND (q.retry_at IS NULL OR q.retry_at <= now()) \
               AND ($3::bigint IS NULL OR q.memory_estimate_bytes IS NULL \
                    OR u.bytes + q.memory_job_bytes + q.memory_activation_bytes \
                       + CASE WHEN q.base_model = ANY(u.models) THEN 0 ELSE q.memory_weights_bytes END <= $3) \
               AND (q.updated_at <= now() - $5 * interval '1 millisecond' OR NOT EXISTS ( \
                    SELECT 1 FROM others o WHERE q.base_model = ANY(o.serves) \
                      AND ((q.base_model = ANY(o.loaded_models) AND NOT q.base_model = ANY($2)) \
                           OR ((q.base_model = ANY(o.loaded_models)) = (q.base_model = ANY($2)) \
                               AND o.running < u.running)))) \
             ORDER BY q.base_model = ANY($2) DESC, q.created_at, q.id LIMIT 1 FOR UPDATE OF q SKIP LOCKED",
        )
        .bind(&offer.models)
        .bind(&offer.loaded)
        .bind(offer.memory_bytes.map(to_i64))
        .bind(worker.0)
        .bind(millis(SPREAD_WINDOW))
        .bind(millis(POLL_FRESH))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id, queued_secs)) = picked else {
            self.metrics.observe_lease(started.elapsed(), None);
            return Ok(None);
        };
        let (spec, attempts, epoch): (Json<JobSpec>, i32, i64) = sqlx::query_as(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_epoch = lease_epoch + 1, \
                 cancel_requested = false, retry_at = NULL, started_at = coalesce(started_at, now()), \
                 updated_at = now() \
             WHERE id = $1 RETURNING spec, attempts, lease_epoch",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let (lease_token, token_hash) = crate::auth::tokens::lease_token();
        sqlx::query(
            "INSERT INTO job_attempts (job_id, attempt, worker_id, epoch, lease_expires_at, lease_token_hash) \
             VALUES ($1, $2, $3, $4, now() + $5 * interval '1 millisecond', $6)",
        )
        .bind(id)
        .bind(attempts)
        .bind(worker.0)
        .bind(epoch)
        .bind(millis(timeout))
        .bind(&token_hash[..])
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE workers SET free_slots = greatest(free_slots - 1, 0) WHERE id = $1")
            .bind(worker.0)
            .execute(&mut *tx)
            .await?;
        let checkpoint = latest_checkpoint(&mut *tx, JobId(id)).await?;
        tx.commit().await?;
        let queued_for = Duration::try_from_secs_f64(queued_secs).unwrap_or_default();
        self.metrics.observe_lease(started.elapsed(), Some(queued_for));
        Ok(Some(Lease {
            job_id: JobId(id),
            epoch: to_u64(epoch, "lease_epoch")?,
            spec: spec.0,
            attempt: to_u32(attempts, "attempts")?,
            checkpoint,
            lease_token,
        }))
    }

    /// The spec of the job `lease` holds (running, with its token).
    pub async fn leased_spec(&self, lease: LeaseRef) -> Result<Fenced<JobSpec>> {
        if !token_matches(&self.pool, lease).await? {
            return Ok(Fenced::Forbidden);
        }
        let row: Option<(DbJobState, i64, Json<JobSpec>)> =
            sqlx::query_as("SELECT state, lease_epoch, spec FROM jobs WHERE id = $1")
                .bind(lease.job_id.0)
                .fetch_optional(&self.pool)
                .await?;
        Ok(match row {
            None => Fenced::NotFound,
            Some((DbJobState::Running, epoch, spec)) if epoch == to_i64(lease.epoch) => Fenced::Valid(spec.0),
            Some((state, epoch, _)) => Fenced::Stale { state: state.into(), epoch: to_u64(epoch, "lease_epoch")? },
        })
    }

    /// Whether a lease may still complete its job: the job runs under it, or
    /// it already completed the job (a retried completion). Takes no lock.
    #[instrument(skip_all, fields(job_id = %lease.job_id, epoch = lease.epoch))]
    pub async fn check_lease(&self, lease: LeaseRef) -> Result<Fenced<()>> {
        if !token_matches(&self.pool, lease).await? {
            return Ok(Fenced::Forbidden);
        }
        let row: Option<(DbJobState, i64)> = sqlx::query_as("SELECT state, lease_epoch FROM jobs WHERE id = $1")
            .bind(lease.job_id.0)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            None => Fenced::NotFound,
            Some((state, epoch))
                if epoch == to_i64(lease.epoch) && matches!(state, DbJobState::Running | DbJobState::Succeeded) =>
            {
                Fenced::Valid(())
            }
            Some((state, epoch)) => Fenced::Stale { state: state.into(), epoch: to_u64(epoch, "lease_epoch")? },
        })
    }

    /// Renews the valid leases among `leases` held by `worker` and returns
    /// those to stop (leases that are no longer valid, and cancelled jobs),
    /// then those whose sweep stopped them early.
    #[instrument(skip_all, fields(worker_id = %worker, leases = leases.len()))]
    pub async fn renew_leases(
        &self,
        worker: WorkerId,
        leases: &[LeaseRef],
        timeout: Duration,
    ) -> Result<(Vec<LeaseRef>, Vec<LeaseRef>)> {
        if leases.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let ids: Vec<Uuid> = leases.iter().map(|l| l.job_id.0).collect();
        let epochs: Vec<i64> = leases.iter().map(|l| to_i64(l.epoch)).collect();
        let hashes: Vec<Vec<u8>> = leases.iter().map(|l| l.token_hash.to_vec()).collect();
        let renewed: Vec<(Uuid, i64, bool, bool)> = sqlx::query_as(
            "UPDATE job_attempts a SET lease_expires_at = now() + $4 * interval '1 millisecond' \
             FROM jobs j, UNNEST($1::uuid[], $2::bigint[], $5::bytea[]) AS l(job_id, epoch, token_hash) \
             WHERE a.job_id = l.job_id AND a.epoch = l.epoch AND a.ended_at IS NULL AND a.worker_id = $3 \
               AND a.lease_token_hash = l.token_hash \
               AND j.id = a.job_id AND j.state = 'running' AND j.lease_epoch = a.epoch \
             RETURNING a.job_id, a.epoch, j.cancel_requested, j.early_stop_requested",
        )
        .bind(&ids)
        .bind(&epochs)
        .bind(worker.0)
        .bind(millis(timeout))
        .bind(&hashes)
        .fetch_all(&self.pool)
        .await?;
        let keep: HashSet<(Uuid, i64)> =
            renewed.iter().filter(|(_, _, cancel, _)| !cancel).map(|(id, epoch, _, _)| (*id, *epoch)).collect();
        let early: HashSet<(Uuid, i64)> = renewed
            .iter()
            .filter(|(_, _, cancel, early)| !cancel && *early)
            .map(|(id, epoch, _, _)| (*id, *epoch))
            .collect();
        let key = |l: &LeaseRef| (l.job_id.0, to_i64(l.epoch));
        let stop = leases.iter().copied().filter(|l| !keep.contains(&key(l))).collect();
        let early_stop = leases.iter().copied().filter(|l| early.contains(&key(l))).collect();
        Ok((stop, early_stop))
    }

    /// Records progress and metrics of a lease and renews it; the answer says
    /// whether the worker should stop. A training loss that is NaN or
    /// infinite fails the job as diverged in the same transaction.
    #[instrument(skip_all, fields(job_id = %report.lease.job_id, epoch = report.lease.epoch, step = report.step))]
    pub async fn report_progress(&self, report: &ProgressReport, timeout: Duration) -> Result<Fenced<StopSignal>> {
        let lease = report.lease;
        let mut tx = self.pool.begin().await?;
        let Some(job) = lock_job(&mut tx, lease.job_id).await? else { return Ok(Fenced::NotFound) };
        if !token_matches(&mut *tx, lease).await? {
            return Ok(Fenced::Forbidden);
        }
        if !job.holds(lease) {
            return job.stale();
        }
        sqlx::query(
            "UPDATE jobs SET step = $2, total_steps = CASE WHEN $3 > 0 THEN $3 ELSE total_steps END, \
                 updated_at = now() WHERE id = $1",
        )
        .bind(lease.job_id.0)
        .bind(to_i64(report.step))
        .bind(to_i64(report.total_steps))
        .execute(&mut *tx)
        .await?;
        renew_attempt(&mut tx, lease, timeout).await?;
        insert_metrics(&mut *tx, lease.job_id, &report.metrics).await?;
        let diverged = report
            .metrics
            .iter()
            .filter(|m| m.kind == MetricKind::Train && m.name == "loss" && !m.value.is_finite())
            .min_by_key(|m| m.step);
        let signal = if let Some(m) = diverged {
            let error = format!("{DIVERGED_PREFIX} loss became {} at step {}", m.value, m.step);
            end_attempt(&mut tx, lease, "failed", &error).await?;
            set_state_after_attempt(&mut tx, lease.job_id, JobState::Failed, &error, None).await?;
            StopSignal::Diverged
        } else if job.cancel_requested {
            StopSignal::Cancel
        } else if job.early_stop_requested {
            StopSignal::EarlyStop
        } else {
            StopSignal::Continue
        };
        tx.commit().await?;
        Ok(Fenced::Valid(signal))
    }

    /// Links the written adapter blob of a lease and marks the job
    /// succeeded, all at once. The blob is left unlinked on any other outcome.
    #[instrument(skip_all, fields(job_id = %done.lease.job_id, epoch = done.lease.epoch))]
    pub async fn complete_job(&self, done: &Completion, adapter: Uuid) -> Result<Fenced<CompleteOutcome>> {
        let lease = done.lease;
        let mut tx = self.pool.begin().await?;
        let Some(job) = lock_job(&mut tx, lease.job_id).await? else { return Ok(Fenced::NotFound) };
        if !token_matches(&mut *tx, lease).await? {
            return Ok(Fenced::Forbidden);
        }
        if job.state == DbJobState::Succeeded && job.lease_epoch == to_i64(lease.epoch) {
            let stored: String = sqlx::query_scalar("SELECT sha256 FROM adapters WHERE job_id = $1")
                .bind(lease.job_id.0)
                .fetch_one(&mut *tx)
                .await?;
            return Ok(Fenced::Valid(if stored == done.adapter_sha256 {
                CompleteOutcome::AlreadyCompleted
            } else {
                CompleteOutcome::DifferentAdapter { stored_sha256: stored }
            }));
        }
        if !job.holds(lease) {
            return job.stale();
        }
        sqlx::query("INSERT INTO adapters (job_id, sha256, size, blob_id) VALUES ($1, $2, $3, $4)")
            .bind(lease.job_id.0)
            .bind(&done.adapter_sha256)
            .bind(to_i64(done.adapter_size))
            .bind(adapter)
            .execute(&mut *tx)
            .await?;
        super::blobs::link_blob(&mut tx, adapter).await?;
        insert_metrics(&mut *tx, lease.job_id, &done.metrics).await?;
        // A job asked to stop early that completes before its planned last
        // step stopped early; one that got there anyway did not.
        let early_stopped = job.early_stop_requested && to_i64(done.step) < job.total_steps;
        sqlx::query(
            "UPDATE jobs SET state = 'succeeded', step = $2, error = '', cancel_requested = false, \
                 early_stopped = $3, worker_peak_rss_bytes = $4, finished_at = now(), updated_at = now() \
             WHERE id = $1",
        )
        .bind(lease.job_id.0)
        .bind(to_i64(done.step))
        .bind(early_stopped)
        .bind(done.peak_rss_bytes.map(to_i64))
        .execute(&mut *tx)
        .await?;
        end_attempt(&mut tx, lease, "succeeded", "").await?;
        tx.commit().await?;
        Ok(Fenced::Valid(CompleteOutcome::Completed))
    }

    /// Ends a lease with an error or a cancellation acknowledgement: the job
    /// is cancelled, queued again (after a backoff for an error of the job,
    /// at once for an interruption) or failed, as `policy` decides.
    #[instrument(skip_all, fields(job_id = %failure.lease.job_id, epoch = failure.lease.epoch))]
    pub async fn fail_job(&self, failure: &Failure, policy: &RetryPolicy) -> Result<Fenced<FailOutcome>> {
        let lease = failure.lease;
        let mut tx = self.pool.begin().await?;
        let Some(job) = lock_job(&mut tx, lease.job_id).await? else { return Ok(Fenced::NotFound) };
        if !token_matches(&mut *tx, lease).await? {
            return Ok(Fenced::Forbidden);
        }
        if !job.holds(lease) {
            let wanted: &[&str] = if failure.cancelled { &["cancelled"] } else { &["failed", "interrupted"] };
            return replayed(&mut tx, &job, lease, wanted).await;
        }
        let state = if job.early_stop_requested && !job.cancel_requested && (failure.cancelled || failure.retryable) {
            // The worker stopped as asked but did not upload an adapter (a
            // worker that predates early stops acknowledges them as
            // cancellations): the trial ends here, its rung results stand.
            let error = if failure.cancelled {
                EARLY_STOP_WITHOUT_ADAPTER.to_string()
            } else {
                format!("{EARLY_STOP_WITHOUT_ADAPTER}: {}", failure.error)
            };
            end_early_stopped(&mut tx, lease, "cancelled", &error).await?
        } else if failure.cancelled || job.cancel_requested {
            end_cancelled(&mut tx, lease, "cancelled", CANCELLED).await?
        } else {
            let (end, outcome) = match (failure.retryable, failure.infrastructure) {
                (false, _) => (AttemptEnd::Permanent, "failed"),
                (true, true) => (AttemptEnd::Interruption, "interrupted"),
                (true, false) => (AttemptEnd::Error, "failed"),
            };
            end_attempt_as(&mut tx, &job, lease, end, outcome, &failure.error, policy).await?
        };
        tx.commit().await?;
        Ok(Fenced::Valid(FailOutcome::Ended(state)))
    }

    /// Hands a lease back: the job is queued again at once (an
    /// interruption), or cancelled if that was asked meanwhile.
    #[instrument(skip_all, fields(job_id = %release.lease.job_id, epoch = release.lease.epoch))]
    pub async fn release_job(&self, release: &Release, policy: &RetryPolicy) -> Result<Fenced<FailOutcome>> {
        let lease = release.lease;
        let mut tx = self.pool.begin().await?;
        let Some(job) = lock_job(&mut tx, lease.job_id).await? else { return Ok(Fenced::NotFound) };
        if !token_matches(&mut *tx, lease).await? {
            return Ok(Fenced::Forbidden);
        }
        if !job.holds(lease) {
            return replayed(&mut tx, &job, lease, &["released"]).await;
        }
        let reason = format!("released: {}", release.reason);
        let state = if job.cancel_requested {
            end_cancelled(&mut tx, lease, "cancelled", CANCELLED).await?
        } else if job.early_stop_requested {
            end_early_stopped(&mut tx, lease, "released", &format!("{EARLY_STOP_WITHOUT_ADAPTER}: {reason}")).await?
        } else {
            end_attempt_as(&mut tx, &job, lease, AttemptEnd::Interruption, "released", &reason, policy).await?
        };
        tx.commit().await?;
        Ok(Fenced::Valid(FailOutcome::Ended(state)))
    }

    /// Ends up to `limit` leases that expired: each job is cancelled (if
    /// cancellation was requested), queued again (an interruption), or
    /// failed once its interruptions are used up. Rows another coordinator
    /// holds are skipped. With `grace`, every open lease is first given
    /// that long from now, in the same transaction: after an outage of the
    /// database (or of this coordinator), workers get a full lease period
    /// to check in before any lease is reaped.
    #[instrument(skip_all)]
    pub async fn reap_expired_leases(
        &self,
        limit: u32,
        grace: Option<Duration>,
        policy: &RetryPolicy,
    ) -> Result<Vec<Reaped>> {
        let mut tx = self.pool.begin().await?;
        if let Some(grace) = grace {
            let extended = extend_leases(&mut tx, grace).await?;
            tracing::info!(leases = extended, grace_ms = millis(grace), "gave open leases a full period after an outage");
        }
        let expired: Vec<ExpiredLease> = sqlx::query_as(
            "SELECT a.job_id, a.attempt, a.worker_id, a.epoch, a.lease_token_hash \
             FROM job_attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.ended_at IS NULL AND a.lease_expires_at < now() \
             ORDER BY a.lease_expires_at LIMIT $1 \
             FOR UPDATE OF a, j SKIP LOCKED",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let mut reaped = Vec::with_capacity(expired.len());
        for ExpiredLease { job_id, attempt, worker_id, epoch, lease_token_hash } in expired {
            let job = JobId(job_id);
            let token_hash = lease_token_hash.and_then(|h| <[u8; 32]>::try_from(h).ok()).unwrap_or_default();
            let lease = LeaseRef { job_id: job, epoch: to_u64(epoch, "epoch")?, token_hash };
            let reason = format!("lease expired: worker {worker_id} stopped heartbeating");
            let locked = lock_job(&mut tx, job).await?.expect("the job row was locked with its attempt");
            let next = if !locked.holds(lease) {
                // An open attempt of a job that no longer runs under it is a leftover: just close it.
                end_attempt(&mut tx, lease, "lease_expired", &reason).await?;
                locked.state.into()
            } else if locked.cancel_requested {
                end_cancelled(&mut tx, lease, "lease_expired", &reason).await?
            } else if locked.early_stop_requested {
                let error = format!("{EARLY_STOP_WITHOUT_ADAPTER}: {reason}");
                end_early_stopped(&mut tx, lease, "lease_expired", &error).await?
            } else {
                end_attempt_as(&mut tx, &locked, lease, AttemptEnd::Interruption, "lease_expired", &reason, policy)
                    .await?
            };
            reaped.push(Reaped {
                job_id: job,
                worker_id: WorkerId(worker_id),
                attempt: to_u32(attempt, "attempt")?,
                state: next,
                reason,
            });
        }
        tx.commit().await?;
        self.metrics.leases_expired(reaped.len());
        Ok(reaped)
    }

    /// Gives every open lease a full timeout from now, so workers can
    /// reconnect after a coordinator restart without losing their jobs.
    #[instrument(skip_all)]
    pub async fn extend_open_leases(&self, timeout: Duration) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let extended = extend_leases(&mut tx, timeout).await?;
        tx.commit().await?;
        Ok(extended)
    }
}

async fn extend_leases(tx: &mut Transaction<'static, Postgres>, timeout: Duration) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE job_attempts SET lease_expires_at = greatest(lease_expires_at, now() + $1 * interval '1 millisecond') \
         WHERE ended_at IS NULL",
    )
    .bind(millis(timeout))
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

/// The answer to an ending call (fail, release) whose lease no longer
/// holds the job: a replay when the attempt already ended with one of
/// `outcomes`, stale otherwise.
async fn replayed(
    tx: &mut Transaction<'static, Postgres>,
    job: &LockedJob,
    lease: LeaseRef,
    outcomes: &[&str],
) -> Result<Fenced<FailOutcome>> {
    let ended: Option<Option<String>> =
        sqlx::query_scalar("SELECT outcome FROM job_attempts WHERE job_id = $1 AND epoch = $2")
            .bind(lease.job_id.0)
            .bind(to_i64(lease.epoch))
            .fetch_optional(&mut **tx)
            .await?;
    match ended.flatten() {
        Some(outcome) if outcomes.contains(&outcome.as_str()) => Ok(Fenced::Valid(FailOutcome::Replayed(job.state.into()))),
        _ => job.stale(),
    }
}

/// Ends a lease whose job was cancelled; the attempt records `outcome` and `reason`.
async fn end_cancelled(
    tx: &mut Transaction<'static, Postgres>,
    lease: LeaseRef,
    outcome: &str,
    reason: &str,
) -> Result<JobState> {
    end_attempt(tx, lease, outcome, reason).await?;
    set_state_after_attempt(tx, lease.job_id, JobState::Cancelled, CANCELLED, None).await?;
    Ok(JobState::Cancelled)
}

/// `1 time`, `3 times`.
fn times(n: u32) -> String {
    if n == 1 {
        "1 time".into()
    } else {
        format!("{n} times")
    }
}

/// The error of a job cancelled on request.
const CANCELLED: &str = "cancelled on request";

/// Ends a lease whose sweep stopped the job early without an adapter: the
/// trial ends cancelled, its rung results stand.
async fn end_early_stopped(
    tx: &mut Transaction<'static, Postgres>,
    lease: LeaseRef,
    outcome: &str,
    error: &str,
) -> Result<JobState> {
    end_attempt(tx, lease, outcome, error).await?;
    set_state_after_attempt(tx, lease.job_id, JobState::Cancelled, error, None).await?;
    mark_early_stopped(tx, lease.job_id).await?;
    Ok(JobState::Cancelled)
}

/// Ends a lease that did not succeed: counts it as an error of the job or
/// an interruption, and queues the job again or fails it as `policy`
/// decides. The attempt records `outcome` and `reason`.
async fn end_attempt_as(
    tx: &mut Transaction<'static, Postgres>,
    job: &LockedJob,
    lease: LeaseRef,
    end: AttemptEnd,
    outcome: &str,
    reason: &str,
    policy: &RetryPolicy,
) -> Result<JobState> {
    let to_count = |v: i32| u32::try_from(v).unwrap_or(0);
    let mut counters = Counters {
        failures: to_count(job.failures),
        max_attempts: to_count(job.max_attempts),
        interruptions: to_count(job.interruptions),
    };
    match end {
        AttemptEnd::Error | AttemptEnd::Permanent => counters.failures += 1,
        AttemptEnd::Interruption => counters.interruptions += 1,
    }
    let decision = policy.decide(end, counters, rand::random::<f64>());
    let (state, error, retry_in) = match decision {
        Retry::After(wait) => (JobState::Queued, reason.to_string(), Some(wait)),
        Retry::Fail => {
            let error = match end {
                AttemptEnd::Permanent => reason.to_string(),
                AttemptEnd::Error => format!("failed {}; last: {reason}", times(counters.failures)),
                AttemptEnd::Interruption => format!(
                    "interrupted {} (workers lost, drained or failing); last: {reason}",
                    times(counters.interruptions)
                ),
            };
            (JobState::Failed, error, None)
        }
    };
    end_attempt(tx, lease, outcome, reason).await?;
    sqlx::query("UPDATE jobs SET failures = $2, interruptions = $3 WHERE id = $1")
        .bind(lease.job_id.0)
        .bind(i32::try_from(counters.failures).unwrap_or(i32::MAX))
        .bind(i32::try_from(counters.interruptions).unwrap_or(i32::MAX))
        .execute(&mut **tx)
        .await?;
    set_state_after_attempt(tx, lease.job_id, state, &error, retry_in.filter(|w| !w.is_zero())).await?;
    Ok(state)
}

/// The error of a trial stopped early whose worker uploaded no adapter.
const EARLY_STOP_WITHOUT_ADAPTER: &str = "stopped early by its sweep; the worker uploaded no adapter";

async fn mark_early_stopped(tx: &mut Transaction<'static, Postgres>, job: JobId) -> Result<()> {
    sqlx::query("UPDATE jobs SET early_stopped = true WHERE id = $1").bind(job.0).execute(&mut **tx).await?;
    Ok(())
}

/// Moves a job out of `running` after its attempt ended; a job queued
/// again waits `retry_in` before it may be leased.
async fn set_state_after_attempt(
    tx: &mut Transaction<'static, Postgres>,
    job: JobId,
    state: JobState,
    error: &str,
    retry_in: Option<Duration>,
) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET state = $2, error = $3, cancel_requested = false, updated_at = now(), \
             finished_at = CASE WHEN $2 = 'queued'::job_state THEN NULL ELSE now() END, \
             retry_at = CASE WHEN $4::bigint IS NULL THEN NULL ELSE now() + $4 * interval '1 millisecond' END \
         WHERE id = $1",
    )
    .bind(job.0)
    .bind(DbJobState::from(state))
    .bind(error)
    .bind(retry_in.map(millis))
    .execute(&mut **tx)
    .await?;
    Ok(())
}
