//! What the holder of a lease does: reads its job's spec, renews its
//! leases, reports progress and completes the job, each fenced by the
//! lease's epoch and token. Taking a lease is `leasing.rs`; its ends other
//! than success are `endings.rs`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ptune_core::{JobSpec, WorkerId};
use sqlx::{Postgres, Transaction};
use tracing::instrument;
use uuid::Uuid;

use super::attempts::lock_leased_all;
use super::counts::count_moved;
use super::fencing::{read_leased, Fenced};
use super::jobs::DbJobState;
use super::metrics::{upsert_metrics, MetricColumns};
use super::{millis, to_i64, to_u64, Result, Store};
use crate::model::{Completion, LeaseRef};

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
#[derive(Clone, Debug)]
pub enum AdapterFile {
    /// A blob written as it arrived, not yet complete.
    Stored(Uuid),
    /// Less than one chunk's bytes, held in memory, written as blob `blob`
    /// with the completion.
    Small { blob: Uuid, data: Vec<u8> },
}

/// Renews the leases (job ids `$1`, epochs `$2`, token hashes `$5`) that
/// worker `$3` holds by `$4` milliseconds, and returns those still valid
/// with whether their job is cancelled or stopped early. Each job is read
/// by its key, one lease at a time: joined to the jobs table as a whole,
/// PostgreSQL hashed every running job for each heartbeat when its
/// statistics said few run (tests/hot_plans.rs), so a fleet's heartbeats
/// cost it the square of its size.
///
/// Validity is read without locks (`v`), and only the attempts no one else
/// has locked are renewed (`SKIP LOCKED`). An attempt that is locked is
/// being changed right then, nearly always by its own holder's completion
/// or progress report; the heartbeat answers it as valid from what it read,
/// unrenewed, instead of waiting for that transaction, and the next
/// heartbeat sees how it ended. Before, a heartbeat naming a lease being
/// completed waited for the whole group commit of the completion.
pub const RENEW_LEASES_SQL: &str = "WITH v AS MATERIALIZED ( \
         SELECT a.job_id, a.epoch, j.cancel_requested, j.early_stop_requested \
         FROM UNNEST($1::uuid[], $2::bigint[], $5::bytea[]) AS l(job_id, epoch, token_hash) \
         JOIN job_attempts a ON a.job_id = l.job_id AND a.epoch = l.epoch \
         CROSS JOIN LATERAL ( \
             SELECT j.state, j.lease_epoch, j.cancel_requested, j.early_stop_requested \
             FROM jobs j WHERE j.id = l.job_id OFFSET 0) j \
         WHERE a.ended_at IS NULL AND a.worker_id = $3 AND a.lease_token_hash = l.token_hash \
           AND j.state = 'running' AND j.lease_epoch = a.epoch), \
     free AS ( \
         SELECT a.job_id, a.epoch FROM v JOIN job_attempts a ON a.job_id = v.job_id AND a.epoch = v.epoch \
         WHERE a.ended_at IS NULL FOR UPDATE OF a SKIP LOCKED), \
     renewed AS ( \
         UPDATE job_attempts a SET lease_expires_at = now() + $4 * interval '1 millisecond' \
         FROM free f WHERE a.job_id = f.job_id AND a.epoch = f.epoch) \
     SELECT job_id, epoch, cancel_requested, early_stop_requested FROM v";

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
    /// then those whose sweep stopped them early ([`RENEW_LEASES_SQL`]).
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
        let renewed: Vec<(Uuid, i64, bool, bool)> = sqlx::query_as(RENEW_LEASES_SQL)
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
}

/// Completes several leases in `tx` (of [`Store::begin_counting`]: it
/// counts its own moves between states), which the caller commits: links each
/// adapter (a stored blob, or writes a small one), records the final
/// metrics, marks each job succeeded and ends its attempt, and answers each
/// in their order. Each lease is fenced on its own: a refused one changes nothing
/// and leaves its blob unlinked, while the others complete. Nothing is
/// written when none completes.
pub(super) async fn complete_in(
    tx: &mut Transaction<'static, Postgres>,
    done: &[(&Completion, &AdapterFile)],
) -> Result<Vec<Fenced<CompleteOutcome>>> {
    let leases: Vec<LeaseRef> = done.iter().map(|(c, _)| c.lease).collect();
    let locked = lock_leased_all(tx, &leases).await?;
    let mut answers = Vec::with_capacity(done.len());
    // Leases that completed their job before (a retried completion), and those that complete it now.
    let (mut again, mut now) = (Vec::new(), Vec::new());
    for (i, ((completion, _), lock)) in done.iter().zip(locked).enumerate() {
        let lease = completion.lease;
        answers.push(match lock.valid() {
            Err(refused) => refused,
            Ok(job) if job.state == DbJobState::Succeeded && job.lease_epoch == to_i64(lease.epoch) => {
                again.push(i);
                Fenced::Valid(CompleteOutcome::AlreadyCompleted)
            }
            Ok(job) if !job.holds(lease) => job.stale()?,
            Ok(job) => {
                // A job asked to stop early that completes before its
                // planned last step stopped early; one that got there anyway did not.
                now.push((i, job.early_stop_requested && to_i64(completion.step) < job.total_steps));
                Fenced::Valid(CompleteOutcome::Completed)
            }
        });
    }
    if !again.is_empty() {
        let ids: Vec<Uuid> = again.iter().map(|&i| leases[i].job_id.0).collect();
        let stored: HashMap<Uuid, String> =
            sqlx::query_as("SELECT job_id, sha256 FROM adapters WHERE job_id = ANY($1)")
                .bind(&ids)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .collect();
        for &i in &again {
            let stored = stored.get(&leases[i].job_id.0).cloned().unwrap_or_default();
            if stored != done[i].0.adapter_sha256 {
                answers[i] = Fenced::Valid(CompleteOutcome::DifferentAdapter { stored_sha256: stored });
            }
        }
    }
    if now.is_empty() {
        return Ok(answers);
    }
    let mut small = SmallAdapters::default();
    for &(i, _) in &now {
        let (completion, adapter) = &done[i];
        let (size, sha256) = (completion.adapter_size, &completion.adapter_sha256);
        match adapter {
            AdapterFile::Stored(blob) => {
                sqlx::query("INSERT INTO adapters (job_id, sha256, size, blob_id) VALUES ($1, $2, $3, $4)")
                    .bind(completion.lease.job_id.0)
                    .bind(sha256)
                    .bind(to_i64(size))
                    .bind(blob)
                    .execute(&mut **tx)
                    .await?;
                super::blobs::link_blob(tx, *blob, size, sha256).await?;
            }
            AdapterFile::Small { blob, data } => small.push(completion, *blob, data),
        }
    }
    let metrics = MetricColumns::of(now.iter().flat_map(|&(i, _)| {
        let completion = done[i].0;
        completion.metrics.iter().map(move |m| (completion.lease.job_id, m))
    }));
    let ids: Vec<Uuid> = now.iter().map(|&(i, _)| leases[i].job_id.0).collect();
    let epochs: Vec<i64> = now.iter().map(|&(i, _)| to_i64(leases[i].epoch)).collect();
    let steps: Vec<i64> = now.iter().map(|&(i, _)| to_i64(done[i].0.step)).collect();
    let early: Vec<bool> = now.iter().map(|&(_, early)| early).collect();
    let peaks: Vec<Option<i64>> = now.iter().map(|&(i, _)| done[i].0.peak_rss_bytes.map(to_i64)).collect();
    // The small adapters, the final metrics, the jobs, their count per state and their attempts, in one statement.
    let query = sqlx::query(concat!(
        "WITH b AS (INSERT INTO blobs (id, complete, size, sha256) \
                    SELECT id, true, size, sha256 FROM UNNEST($6::uuid[], $8::bigint[], $9::text[]) \
                        AS s(id, size, sha256)), \
              c AS (INSERT INTO blob_chunks (blob_id, seq, data) \
                    SELECT id, 0, data FROM UNNEST($6::uuid[], $7::bytea[]) AS s(id, data)), \
              a AS (INSERT INTO adapters (job_id, sha256, size, blob_id) \
                    SELECT job_id, sha256, size, id \
                    FROM UNNEST($10::uuid[], $6::uuid[], $8::bigint[], $9::text[]) AS s(job_id, id, size, sha256)), \
              j AS (UPDATE jobs j SET state = 'succeeded', step = d.step, error = '', cancel_requested = false, \
                        early_stopped = d.early, worker_peak_rss_bytes = d.peak, finished_at = now(), \
                        updated_at = now() \
                    FROM UNNEST($1::uuid[], $3::bigint[], $4::bool[], $5::bigint[]) AS d(id, step, early, peak) \
                    WHERE j.id = d.id AND j.state = 'running' RETURNING j.id), ",
        count_moved!("j", "running", "succeeded"),
        ", ",
        upsert_metrics!("11", "12", "13", "14", "15"),
        " UPDATE job_attempts a SET ended_at = now(), outcome = 'succeeded', reason = '' \
         FROM UNNEST($1::uuid[], $2::bigint[]) AS l(job_id, epoch) \
         WHERE a.job_id = l.job_id AND a.epoch = l.epoch AND a.ended_at IS NULL"
    ))
    .bind(&ids)
    .bind(&epochs)
    .bind(&steps)
    .bind(&early)
    .bind(&peaks)
    .bind(&small.blobs)
    .bind(&small.data)
    .bind(&small.sizes)
    .bind(&small.sha256)
    .bind(&small.jobs);
    metrics.bind(query).execute(&mut **tx).await?;
    Ok(answers)
}

/// The small adapters of a group of completions, as columns.
#[derive(Default)]
struct SmallAdapters<'a> {
    jobs: Vec<Uuid>,
    blobs: Vec<Uuid>,
    data: Vec<&'a [u8]>,
    sizes: Vec<i64>,
    sha256: Vec<&'a str>,
}

impl<'a> SmallAdapters<'a> {
    fn push(&mut self, completion: &'a Completion, blob: Uuid, data: &'a [u8]) {
        self.jobs.push(completion.lease.job_id.0);
        self.blobs.push(blob);
        self.data.push(data);
        self.sizes.push(to_i64(completion.adapter_size));
        self.sha256.push(&completion.adapter_sha256);
    }
}
