//! What the holder of a lease does: reads its job's spec, renews its
//! leases, reports progress and completes the job, each fenced by the
//! lease's epoch and token. Taking a lease is `leasing.rs`; its ends other
//! than success are `endings.rs`.

use std::collections::HashSet;
use std::time::Duration;

use ptune_core::sweep::DIVERGED_PREFIX;
use ptune_core::{JobSpec, JobState, MetricKind, WorkerId};
use tracing::instrument;
use uuid::Uuid;

use super::attempts::{end_attempt, lock_leased, renew_attempt, set_state_after_attempt};
use super::fencing::{read_leased, Fenced};
use super::jobs::DbJobState;
use super::metrics::insert_metrics;
use super::{millis, to_i64, to_u64, Result, Store};
use crate::model::{Completion, LeaseRef, ProgressReport, StopSignal};

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

/// The adapter a completion links.
#[derive(Clone, Copy, Debug)]
pub enum AdapterFile<'a> {
    /// A blob written as it arrived, not yet complete.
    Stored(Uuid),
    /// Less than one chunk's bytes, held in memory, written as blob `blob`
    /// with the completion.
    Small { blob: Uuid, data: &'a [u8] },
}

impl Store {
    /// The spec of the job `lease` holds (running, with its token).
    pub async fn leased_spec(&self, lease: LeaseRef) -> Result<Fenced<JobSpec>> {
        Ok(match read_leased(&self.pool, lease, true).await?.valid() {
            Ok((DbJobState::Running, epoch, Some(spec))) if epoch == to_i64(lease.epoch) => Fenced::Valid(spec),
            Ok((state, epoch, _)) => Fenced::Stale { state: state.into(), epoch: to_u64(epoch, "lease_epoch")? },
            Err(refused) => refused,
        })
    }

    /// Whether a lease may still complete its job: the job runs under it, or
    /// it already completed the job (a retried completion), and the lease
    /// carries its token. Takes no lock.
    #[instrument(skip_all, fields(job_id = %lease.job_id, epoch = lease.epoch))]
    pub async fn check_lease(&self, lease: LeaseRef) -> Result<Fenced<()>> {
        Ok(match read_leased(&self.pool, lease, false).await?.valid() {
            Ok((state, epoch, _))
                if epoch == to_i64(lease.epoch) && matches!(state, DbJobState::Running | DbJobState::Succeeded) =>
            {
                Fenced::Valid(())
            }
            Ok((state, epoch, _)) => Fenced::Stale { state: state.into(), epoch: to_u64(epoch, "lease_epoch")? },
            Err(refused) => refused,
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
        let job = match lock_leased(&mut tx, lease).await?.valid() {
            Ok(job) => job,
            Err(refused) => return Ok(refused),
        };
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
    pub async fn complete_job(&self, done: &Completion, adapter: AdapterFile<'_>) -> Result<Fenced<CompleteOutcome>> {
        let lease = done.lease;
        let mut tx = self.pool.begin().await?;
        let job = match lock_leased(&mut tx, lease).await?.valid() {
            Ok(job) => job,
            Err(refused) => return Ok(refused),
        };
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
        let (size, sha256) = (done.adapter_size, &done.adapter_sha256);
        match adapter {
            AdapterFile::Stored(blob) => {
                sqlx::query("INSERT INTO adapters (job_id, sha256, size, blob_id) VALUES ($1, $2, $3, $4)")
                    .bind(lease.job_id.0)
                    .bind(sha256)
                    .bind(to_i64(size))
                    .bind(blob)
                    .execute(&mut *tx)
                    .await?;
                super::blobs::link_blob(&mut tx, blob, size, sha256).await?;
            }
            AdapterFile::Small { blob, data } => {
                super::blobs::insert_small_adapter(&mut tx, lease.job_id, blob, data, size, sha256).await?;
            }
        }
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
}
