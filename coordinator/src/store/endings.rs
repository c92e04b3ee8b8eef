//! How attempts end without success: a worker fails or releases its lease,
//! or the reaper ends a lease whose worker stopped heartbeating. Each ends
//! the attempt and cancels, queues again (after a backoff for an error of
//! the job, at once for an interruption) or fails the job, as the retry
//! policy decides (`crate::retry`).

use std::time::Duration;

use ptune_core::{JobId, JobState, WorkerId};
use sqlx::{Postgres, Transaction};
use tracing::instrument;
use uuid::Uuid;

use super::attempts::{end_attempt, lock_job, lock_leased, set_state_after_attempt, LockedJob};
use super::fencing::Fenced;
use super::{millis, to_i64, to_u32, to_u64, Result, Store};
use crate::model::{Failure, LeaseRef, Release};
use crate::retry::{AttemptEnd, Counters, Retry, RetryPolicy};

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

impl Store {
    /// Ends a lease with an error or a cancellation acknowledgement: the job
    /// is cancelled, queued again (after a backoff for an error of the job,
    /// at once for an interruption) or failed, as `policy` decides.
    #[instrument(skip_all, fields(job_id = %failure.lease.job_id, epoch = failure.lease.epoch))]
    pub async fn fail_job(&self, failure: &Failure, policy: &RetryPolicy) -> Result<Fenced<FailOutcome>> {
        let lease = failure.lease;
        let mut tx = self.pool.begin().await?;
        let job = match lock_leased(&mut tx, lease).await?.valid() {
            Ok(job) => job,
            Err(refused) => return Ok(refused),
        };
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
        let job = match lock_leased(&mut tx, lease).await?.valid() {
            Ok(job) => job,
            Err(refused) => return Ok(refused),
        };
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
