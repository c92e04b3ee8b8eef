//! Metrics: idempotent batch inserts and reads.

use std::collections::HashMap;

use ptune_core::{JobId, Metric, MetricKind};
use sqlx::PgExecutor;
use tracing::instrument;
use uuid::Uuid;

use super::{to_i64, to_u64, Result, Store, StoreError};

#[derive(sqlx::FromRow)]
pub(super) struct MetricRow {
    pub job_id: Uuid,
    pub step: i64,
    pub kind: String,
    pub name: String,
    pub value: f64,
}

impl MetricRow {
    pub fn into_metric(self) -> Result<Metric> {
        let kind: MetricKind = self.kind.parse().map_err(StoreError::Corrupt)?;
        Ok(Metric { step: to_u64(self.step, "metric step")?, kind, name: self.name, value: self.value })
    }
}

/// Inserts the metrics of several jobs in one statement; a value reported
/// again for the same (job, kind, name, step) replaces the earlier one, so
/// retried reports have no double effect.
pub(super) async fn insert_metrics_of<'e>(db: impl PgExecutor<'e>, metrics: &[(JobId, &Metric)]) -> Result<()> {
    if metrics.is_empty() {
        return Ok(());
    }
    // One statement cannot update a row twice: keep the last value of each key.
    let mut unique: HashMap<(JobId, MetricKind, &str, u64), f64> = HashMap::new();
    for (job, m) in metrics {
        unique.insert((*job, m.kind, m.name.as_str(), m.step), m.value);
    }
    let mut jobs = Vec::with_capacity(unique.len());
    let mut steps = Vec::with_capacity(unique.len());
    let mut kinds = Vec::with_capacity(unique.len());
    let mut names = Vec::with_capacity(unique.len());
    let mut values = Vec::with_capacity(unique.len());
    for ((job, kind, name, step), value) in unique {
        jobs.push(job.0);
        steps.push(to_i64(step));
        kinds.push(kind.as_str());
        names.push(name);
        values.push(value);
    }
    sqlx::query(
        "INSERT INTO metrics (job_id, step, kind, name, value) \
         SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::float8[]) \
         ON CONFLICT (job_id, kind, name, step) DO UPDATE SET value = EXCLUDED.value, recorded_at = now()",
    )
    .bind(&jobs)
    .bind(&steps)
    .bind(&kinds)
    .bind(&names)
    .bind(&values)
    .execute(db)
    .await?;
    Ok(())
}

impl Store {
    /// Every metric of a job (of one kind if given), ordered by step.
    #[instrument(skip_all, fields(job_id = %job))]
    pub async fn metrics(&self, job: JobId, kind: Option<MetricKind>) -> Result<Vec<Metric>> {
        let rows: Vec<MetricRow> = sqlx::query_as(
            "SELECT job_id, step, kind, name, value FROM metrics \
             WHERE job_id = $1 AND ($2::text IS NULL OR kind = $2) ORDER BY step, kind, name",
        )
        .bind(job.0)
        .bind(kind.map(MetricKind::as_str))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(MetricRow::into_metric).collect()
    }
}
