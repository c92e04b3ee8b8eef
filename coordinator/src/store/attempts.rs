//! The rows every lease operation works on: the job row, locked with what
//! decides how an attempt ends, and its open attempt. Shared by the lease
//! holder's calls (`leases.rs`) and the ends of attempts (`endings.rs`).
//!
//! Lock order is always job row, then attempt row; the reaper takes both with
//! `SKIP LOCKED` and never waits, so these paths cannot deadlock.

use std::collections::HashMap;
use std::time::Duration;

use ptune_core::{JobId, JobState};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::fencing::Fenced;
use super::jobs::DbJobState;
use super::{millis, to_i64, to_u64, Result};
use crate::model::LeaseRef;

/// A job row locked for a change of one of its leases: what decides whether
/// the lease still holds the job and how its attempt ends.
#[derive(Clone, Copy, sqlx::FromRow)]
pub(super) struct LockedJob {
    pub(super) state: DbJobState,
    pub(super) lease_epoch: i64,
    pub(super) cancel_requested: bool,
    pub(super) early_stop_requested: bool,
    pub(super) failures: i32,
    pub(super) max_attempts: i32,
    pub(super) interruptions: i32,
    pub(super) total_steps: i64,
}

impl LockedJob {
    pub(super) fn holds(&self, lease: LeaseRef) -> bool {
        self.state == DbJobState::Running && self.lease_epoch == to_i64(lease.epoch)
    }

    pub(super) fn stale<T>(&self) -> Result<Fenced<T>> {
        Ok(Fenced::Stale { state: self.state.into(), epoch: to_u64(self.lease_epoch, "lease_epoch")? })
    }
}

/// The columns of a [`LockedJob`] (`jobs` columns; also used by `progress.rs`).
macro_rules! locked_job_columns {
    () => {
        "state, lease_epoch, cancel_requested, early_stop_requested, failures, max_attempts, interruptions, total_steps"
    };
}

pub(super) async fn lock_job(tx: &mut Transaction<'static, Postgres>, id: JobId) -> Result<Option<LockedJob>> {
    let row = sqlx::query_as(concat!("SELECT ", locked_job_columns!(), " FROM jobs WHERE id = $1 FOR UPDATE"))
    .bind(id.0)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row)
}

/// Locks the job of `lease` for a call of its holder, checking in the same
/// statement that the lease carries its attempt's token: `NotFound` without
/// the job, `Forbidden` without the token. Whether the lease still holds
/// the job is the caller's to judge ([`LockedJob::holds`]).
pub(super) async fn lock_leased(tx: &mut Transaction<'static, Postgres>, lease: LeaseRef) -> Result<Fenced<LockedJob>> {
    let mut locked = lock_leased_all(tx, &[lease]).await?;
    Ok(locked.pop().unwrap_or(Fenced::NotFound))
}

/// [`lock_leased`] for several leases in one statement, answering each in
/// their order. Job rows are locked in id order, so two calls naming the
/// same jobs cannot deadlock.
pub(super) async fn lock_leased_all(
    tx: &mut Transaction<'static, Postgres>,
    leases: &[LeaseRef],
) -> Result<Vec<Fenced<LockedJob>>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: Uuid,
        epoch: i64,
        #[sqlx(flatten)]
        job: LockedJob,
        token_hash: Option<Vec<u8>>,
    }
    let ids: Vec<Uuid> = leases.iter().map(|l| l.job_id.0).collect();
    let epochs: Vec<i64> = leases.iter().map(|l| to_i64(l.epoch)).collect();
    let rows: Vec<Row> = sqlx::query_as(concat!(
        "SELECT j.id, l.epoch, ",
        locked_job_columns!(),
        ", (SELECT a.lease_token_hash FROM job_attempts a WHERE a.job_id = j.id AND a.epoch = l.epoch) \
             AS token_hash \
         FROM jobs j JOIN UNNEST($1::uuid[], $2::bigint[]) AS l(job_id, epoch) ON j.id = l.job_id \
         ORDER BY j.id FOR UPDATE OF j"
    ))
    .bind(&ids)
    .bind(&epochs)
    .fetch_all(&mut **tx)
    .await?;
    let found: HashMap<(Uuid, i64), (LockedJob, Option<Vec<u8>>)> =
        rows.into_iter().map(|r| ((r.id, r.epoch), (r.job, r.token_hash))).collect();
    Ok(leases
        .iter()
        .map(|lease| match found.get(&(lease.job_id.0, to_i64(lease.epoch))) {
            None => Fenced::NotFound,
            Some((job, Some(hash))) if crate::auth::tokens::same(hash, &lease.token_hash) => Fenced::Valid(*job),
            Some(_) => Fenced::Forbidden,
        })
        .collect())
}

/// Closes the open attempt of a lease and returns its worker.
pub(super) async fn end_attempt(
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

/// Moves a job out of `running` after its attempt ended; a job queued
/// again waits `retry_in` before it may be leased.
pub(super) async fn set_state_after_attempt(
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
