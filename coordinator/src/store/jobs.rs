//! Jobs: insert, read, list and cancel.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ptune_core::{JobId, JobSpec, JobState, MemoryEstimate, Metric, ModelShape, SweepId, WorkerId};
use sqlx::types::Json;
use sqlx::{PgExecutor, Postgres, Transaction};
use tracing::instrument;
use uuid::Uuid;

use super::{to_i64, to_u32, to_u64, Result, Store, StoreError};
use crate::cursor::{JobCursor, SortKey};
use crate::model::{BlobInfo, Job, JobFilter, TrialRef};

/// The `job_state` Postgres enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "job_state", rename_all = "lowercase")]
pub(super) enum DbJobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<DbJobState> for JobState {
    fn from(s: DbJobState) -> Self {
        match s {
            DbJobState::Queued => JobState::Queued,
            DbJobState::Running => JobState::Running,
            DbJobState::Succeeded => JobState::Succeeded,
            DbJobState::Failed => JobState::Failed,
            DbJobState::Cancelled => JobState::Cancelled,
        }
    }
}

impl From<JobState> for DbJobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => DbJobState::Queued,
            JobState::Running => DbJobState::Running,
            JobState::Succeeded => DbJobState::Succeeded,
            JobState::Failed => DbJobState::Failed,
            JobState::Cancelled => DbJobState::Cancelled,
        }
    }
}

/// The columns every job read selects; `WHERE`/`ORDER BY` are appended with `concat!`.
macro_rules! job_select {
    () => {
        "SELECT j.id, j.spec, j.state, j.error, j.attempts, j.max_attempts, j.step, j.total_steps, \
                j.cancel_requested, j.created_at, j.started_at, j.finished_at, \
                j.sweep_id, j.trial_index, j.early_stopped, j.memory_weights_bytes, j.memory_job_bytes, \
                j.memory_activation_bytes, j.worker_peak_rss_bytes, j.failures, j.interruptions, j.retry_at, j.devices, \
                (SELECT max(c.step) FROM job_checkpoints c WHERE c.job_id = j.id AND c.complete) AS checkpoint_step, \
                (SELECT a.worker_id FROM job_attempts a WHERE a.job_id = j.id AND a.ended_at IS NULL) AS worker_id, \
                ad.sha256 AS adapter_sha256, ad.size AS adapter_size \
         FROM jobs j LEFT JOIN adapters ad ON ad.job_id = j.id "
    };
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    spec: Json<JobSpec>,
    state: DbJobState,
    error: String,
    attempts: i32,
    max_attempts: i32,
    step: i64,
    total_steps: i64,
    cancel_requested: bool,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    worker_id: Option<Uuid>,
    adapter_sha256: Option<String>,
    adapter_size: Option<i64>,
    sweep_id: Option<Uuid>,
    trial_index: Option<i32>,
    early_stopped: bool,
    memory_weights_bytes: Option<i64>,
    memory_job_bytes: Option<i64>,
    memory_activation_bytes: Option<i64>,
    worker_peak_rss_bytes: Option<i64>,
    failures: i32,
    interruptions: i32,
    retry_at: Option<DateTime<Utc>>,
    checkpoint_step: Option<i64>,
    devices: Vec<String>,
}

impl JobRow {
    fn into_job(self, latest_metrics: Vec<Metric>) -> Result<Job> {
        let adapter = match (self.adapter_sha256, self.adapter_size) {
            (Some(sha256), Some(size)) => Some(BlobInfo { sha256, size: to_u64(size, "adapter size")? }),
            _ => None,
        };
        Ok(Job {
            id: JobId(self.id),
            spec: self.spec.0,
            state: self.state.into(),
            error: self.error,
            attempts: to_u32(self.attempts, "attempts")?,
            max_attempts: to_u32(self.max_attempts, "max_attempts")?,
            step: to_u64(self.step, "step")?,
            total_steps: to_u64(self.total_steps, "total_steps")?,
            latest_metrics,
            worker_id: self.worker_id.map(WorkerId),
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            cancel_requested: self.cancel_requested,
            adapter,
            trial: match (self.sweep_id, self.trial_index) {
                (Some(sweep), Some(index)) => {
                    Some(TrialRef { sweep_id: SweepId(sweep), index: to_u32(index, "trial_index")? })
                }
                _ => None,
            },
            early_stopped: self.early_stopped,
            memory_estimate: memory_estimate(
                self.memory_weights_bytes,
                self.memory_job_bytes,
                self.memory_activation_bytes,
            )?,
            worker_peak_rss_bytes: self.worker_peak_rss_bytes.map(|b| to_u64(b, "worker_peak_rss_bytes")).transpose()?,
            failures: to_u32(self.failures, "failures")?,
            interruptions: to_u32(self.interruptions, "interruptions")?,
            retry_at: self.retry_at,
            checkpoint_step: self.checkpoint_step.map(|s| to_u64(s, "checkpoint step")).transpose()?,
            devices: self.devices,
        })
    }
}

/// A job's memory estimate from its three columns (all set or none).
pub(super) fn memory_estimate(
    weights: Option<i64>,
    job: Option<i64>,
    activations: Option<i64>,
) -> Result<Option<MemoryEstimate>> {
    let (Some(weights), Some(job), Some(activations)) = (weights, job, activations) else { return Ok(None) };
    Ok(Some(MemoryEstimate {
        weights_bytes: to_u64(weights, "memory_weights_bytes")?,
        job_bytes: to_u64(job, "memory_job_bytes")?,
        activation_bytes: to_u64(activations, "memory_activation_bytes")?,
    }))
}

/// What a cancellation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was queued and is now cancelled.
    Cancelled,
    /// The job is running; its worker will be told to stop.
    Requested,
    /// The job had already finished in this state.
    AlreadyFinished(JobState),
    NotFound,
}

impl Store {
    /// Stores a new queued job, with its memory estimate when there is one.
    #[instrument(skip_all, fields(job_id = %id))]
    pub async fn insert_job(
        &self,
        id: JobId,
        spec: &JobSpec,
        total_steps: u64,
        estimate: Option<&MemoryEstimate>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO jobs (id, name, owner, base_model, method, spec, state, max_attempts, total_steps, \
                 memory_weights_bytes, memory_job_bytes, memory_activation_bytes) \
             VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, $10, $11)",
        )
        .bind(id.0)
        .bind(&spec.name)
        .bind(&spec.owner)
        .bind(&spec.base_model)
        .bind(spec.method.as_str())
        .bind(Json(spec))
        .bind(i32::try_from(spec.max_attempts).unwrap_or(i32::MAX))
        .bind(to_i64(total_steps))
        .bind(estimate.map(|e| to_i64(e.weights_bytes)))
        .bind(estimate.map(|e| to_i64(e.job_bytes)))
        .bind(estimate.map(|e| to_i64(e.activation_bytes)))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores many new queued jobs in one transaction, a thousand rows per
    /// statement: (id, spec, total steps, memory estimate) each.
    #[instrument(skip_all, fields(jobs = jobs.len()))]
    pub async fn insert_jobs(&self, jobs: &[(JobId, &JobSpec, u64, Option<&MemoryEstimate>)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for rows in jobs.chunks(1000) {
            let column = |f: fn(&(JobId, &JobSpec, u64, Option<&MemoryEstimate>)) -> Option<i64>| -> Vec<Option<i64>> {
                rows.iter().map(f).collect()
            };
            sqlx::query(
                "INSERT INTO jobs (id, name, owner, base_model, method, spec, state, max_attempts, total_steps, \
                     memory_weights_bytes, memory_job_bytes, memory_activation_bytes) \
                 SELECT id, name, owner, base_model, method, spec::jsonb, 'queued', max_attempts, total_steps, w, j, a \
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[], \
                             $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[]) \
                      AS r (id, name, owner, base_model, method, spec, max_attempts, total_steps, w, j, a)",
            )
            .bind(rows.iter().map(|r| r.0 .0).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.1.name.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.1.owner.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.1.base_model.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.1.method.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| serde_json::to_string(r.1)).collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| StoreError::Corrupt(format!("a job spec does not serialize: {e}")))?)
            .bind(rows.iter().map(|r| i32::try_from(r.1.max_attempts).unwrap_or(i32::MAX)).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| to_i64(r.2)).collect::<Vec<_>>())
            .bind(column(|r| r.3.map(|e| to_i64(e.weights_bytes))))
            .bind(column(|r| r.3.map(|e| to_i64(e.job_bytes))))
            .bind(column(|r| r.3.map(|e| to_i64(e.activation_bytes))))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Takes the lock on `model`'s estimate marker, waiting while another
    /// registration (on any coordinator) estimates the model's queue, and
    /// reads the shape its queued jobs were last estimated with. The lock is
    /// held until [`EstimateLock::done`] or until it is dropped.
    #[instrument(skip_all, fields(model))]
    pub async fn lock_estimates(&self, model: &str) -> Result<EstimateLock> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO model_estimates (model) VALUES ($1) ON CONFLICT (model) DO NOTHING")
            .bind(model)
            .execute(&mut *tx)
            .await?;
        let shape: Option<Json<ModelShape>> =
            sqlx::query_scalar("SELECT shape FROM model_estimates WHERE model = $1 FOR UPDATE")
                .bind(model)
                .fetch_one(&mut *tx)
                .await?;
        Ok(EstimateLock { tx, model: model.to_string(), estimated_with: shape.map(|s| s.0) })
    }

    /// Up to `limit` queued jobs on `model` after `after`, in queue order
    /// (an index range each): all of them, or only those without a memory
    /// estimate.
    #[instrument(skip_all, fields(model))]
    pub async fn queued_on(
        &self,
        model: &str,
        all: bool,
        after: Option<QueuePosition>,
        limit: u32,
    ) -> Result<Vec<(QueuePosition, JobSpec)>> {
        // Before every job: the start of 1970 (PostgreSQL stores no time as early as chrono's least).
        let after = after.unwrap_or(QueuePosition { created_at: DateTime::<Utc>::UNIX_EPOCH, id: JobId(Uuid::nil()) });
        // Two statements, so that the one for jobs without an estimate reads `jobs_unestimated_idx`.
        let statement = if all {
            "SELECT id, created_at, spec FROM jobs \
             WHERE state = 'queued' AND base_model = $1 AND (created_at, id) > ($2, $3) \
             ORDER BY created_at, id LIMIT $4"
        } else {
            "SELECT id, created_at, spec FROM jobs \
             WHERE state = 'queued' AND base_model = $1 AND memory_weights_bytes IS NULL \
               AND (created_at, id) > ($2, $3) \
             ORDER BY created_at, id LIMIT $4"
        };
        let rows: Vec<(Uuid, DateTime<Utc>, Json<JobSpec>)> = sqlx::query_as(statement)
            .bind(model)
            .bind(after.created_at)
            .bind(after.id.0)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, created_at, spec)| (QueuePosition { created_at, id: JobId(id) }, spec.0))
            .collect())
    }

    /// Records the memory estimates of jobs that are still queued (a job
    /// keeps the estimate it was leased with).
    #[instrument(skip_all, fields(jobs = estimates.len()))]
    pub async fn set_memory_estimates(&self, estimates: &[(JobId, MemoryEstimate)]) -> Result<()> {
        if estimates.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = estimates.iter().map(|(id, _)| id.0).collect();
        let column = |part: fn(&MemoryEstimate) -> u64| -> Vec<i64> {
            estimates.iter().map(|(_, e)| to_i64(part(e))).collect()
        };
        sqlx::query(
            "UPDATE jobs j SET memory_weights_bytes = e.weights, memory_job_bytes = e.job, \
                 memory_activation_bytes = e.activations \
             FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[]) AS e(id, weights, job, activations) \
             WHERE j.id = e.id AND j.state = 'queued' \
               AND (j.memory_weights_bytes, j.memory_job_bytes, j.memory_activation_bytes) \
                   IS DISTINCT FROM (e.weights, e.job, e.activations)",
        )
        .bind(&ids)
        .bind(column(|e| e.weights_bytes))
        .bind(column(|e| e.job_bytes))
        .bind(column(|e| e.activation_bytes))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One job with its latest metrics, or `None`.
    #[instrument(skip_all, fields(job_id = %id))]
    pub async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        let row: Option<JobRow> =
            sqlx::query_as(concat!(job_select!(), "WHERE j.id = $1")).bind(id.0).fetch_optional(&self.pool).await?;
        let Some(row) = row else { return Ok(None) };
        let mut metrics = latest_metrics(&self.pool, &[id.0]).await?;
        row.into_job(metrics.remove(&id.0).unwrap_or_default()).map(Some)
    }

    /// Jobs matching `filter`, newest first, at most `limit`, after `after`;
    /// and where the next page starts, if there is one.
    ///
    /// The statement is planned for each call's values
    /// ([`Store::begin_custom_plans`]), so a deep page costs what the first does.
    #[instrument(skip_all, fields(limit))]
    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        limit: u32,
        after: Option<&JobCursor>,
    ) -> Result<(Vec<Job>, Option<JobCursor>)> {
        let states: Vec<String> = filter.states.iter().map(|s| s.as_str().to_string()).collect();
        let mut tx = self.begin_custom_plans().await?;
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            job_select!(),
            "WHERE (cardinality($1::text[]) = 0 OR j.state = ANY($1::text[]::job_state[])) \
               AND ($2::text IS NULL OR j.base_model = $2) \
               AND ($3::text IS NULL OR j.method = $3) \
               AND ($4::text IS NULL OR starts_with(j.name, $4)) \
               AND ($5::text IS NULL OR j.owner = $5) \
               AND ($6::timestamptz IS NULL OR (j.created_at, j.id) < ($6, $7::uuid)) \
               AND ($9::uuid IS NULL OR j.sweep_id = $9) \
             ORDER BY j.created_at DESC, j.id DESC \
             LIMIT $8"
        ))
        .bind(&states)
        .bind(filter.base_model.as_deref())
        .bind(filter.method.map(|m| m.as_str()))
        .bind(filter.name_prefix.as_deref())
        .bind(filter.owner.as_deref())
        .bind(after.map(|t| t.created_at))
        .bind(after.map(|t| t.id.0))
        .bind(i64::from(limit) + 1)
        .bind(filter.sweep_id.map(|s| s.0))
        .fetch_all(&mut *tx)
        .await?;

        let more = rows.len() > limit as usize;
        let ids: Vec<Uuid> = rows.iter().take(limit as usize).map(|r| r.id).collect();
        let mut metrics = latest_metrics(&mut *tx, &ids).await?;
        tx.commit().await?;
        let jobs = rows
            .into_iter()
            .take(limit as usize)
            .map(|row| {
                let latest = metrics.remove(&row.id).unwrap_or_default();
                row.into_job(latest)
            })
            .collect::<Result<Vec<_>>>()?;
        let next = match jobs.last() {
            Some(last) if more => Some(JobCursor { key: SortKey::Created, created_at: last.created_at, id: last.id }),
            _ => None,
        };
        Ok((jobs, next))
    }

    /// Cancels a queued job at once, or flags a running one for its worker.
    #[instrument(skip_all, fields(job_id = %id))]
    pub async fn cancel_job(&self, id: JobId) -> Result<CancelOutcome> {
        let mut tx = self.pool.begin().await?;
        let Some(state) = lock_job_state(&mut tx, id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        let outcome = match JobState::from(state) {
            JobState::Queued => {
                sqlx::query(
                    "UPDATE jobs SET state = 'cancelled', error = 'cancelled on request', \
                     finished_at = now(), updated_at = now() WHERE id = $1",
                )
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
                CancelOutcome::Cancelled
            }
            JobState::Running => {
                sqlx::query("UPDATE jobs SET cancel_requested = true, updated_at = now() WHERE id = $1")
                    .bind(id.0)
                    .execute(&mut *tx)
                    .await?;
                CancelOutcome::Requested
            }
            finished => CancelOutcome::AlreadyFinished(finished),
        };
        tx.commit().await?;
        Ok(outcome)
    }
}

/// Locks a job row for the rest of the transaction and returns its state.
pub(super) async fn lock_job_state(tx: &mut Transaction<'static, Postgres>, id: JobId) -> Result<Option<DbJobState>> {
    let state: Option<DbJobState> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(id.0)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(state)
}

/// Latest value of every (kind, name) metric of each job.
async fn latest_metrics<'e>(db: impl PgExecutor<'e>, ids: &[Uuid]) -> Result<HashMap<Uuid, Vec<Metric>>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<super::metrics::MetricRow> = sqlx::query_as(
        "SELECT DISTINCT ON (job_id, kind, name) job_id, step, kind, name, value FROM metrics \
         WHERE job_id = ANY($1) ORDER BY job_id, kind, name, step DESC",
    )
    .bind(ids)
    .fetch_all(db)
    .await?;
    let mut by_job: HashMap<Uuid, Vec<Metric>> = HashMap::new();
    for row in rows {
        let job_id = row.job_id;
        by_job.entry(job_id).or_default().push(row.into_metric()?);
    }
    Ok(by_job)
}

/// Where a queued job stands in its model's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueuePosition {
    pub created_at: DateTime<Utc>,
    pub id: JobId,
}

/// The lock on one model's estimate marker ([`Store::lock_estimates`]):
/// one transaction, open while the model's queued jobs are estimated
/// through other connections.
pub struct EstimateLock {
    tx: Transaction<'static, Postgres>,
    model: String,
    /// The shape the model's queued jobs were last estimated with.
    pub estimated_with: Option<ModelShape>,
}

impl EstimateLock {
    /// Records that the model's queued jobs are now estimated with `shape`,
    /// and lets the next registration of the model go on.
    pub async fn done(mut self, shape: &ModelShape) -> Result<()> {
        sqlx::query("UPDATE model_estimates SET shape = $2 WHERE model = $1")
            .bind(&self.model)
            .bind(Json(shape))
            .execute(&mut *self.tx)
            .await?;
        self.tx.commit().await?;
        Ok(())
    }
}
