//! Metrics: idempotent batch inserts and reads.

use std::collections::HashMap;

use ptune_core::{JobId, Metric, MetricKind};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::Postgres;
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

/// The metrics of several jobs as the columns of one insert, bound by
/// [`MetricColumns::bind`] at the parameters a statement's
/// `upsert_metrics!` names. A value reported again for the same (job, kind,
/// name, step) replaces the earlier one, so retried reports have no double
/// effect; the callers write them in the statement that records their
/// progress or completion, which saves each a round trip.
#[derive(Default)]
pub(super) struct MetricColumns<'a> {
    jobs: Vec<Uuid>,
    steps: Vec<i64>,
    kinds: Vec<&'static str>,
    names: Vec<&'a str>,
    values: Vec<f64>,
}

impl<'a> MetricColumns<'a> {
    pub(super) fn of(metrics: impl IntoIterator<Item = (JobId, &'a Metric)>) -> Self {
        // One statement cannot update a row twice: keep the last value of each key.
        let mut unique: HashMap<(JobId, MetricKind, &str, u64), f64> = HashMap::new();
        for (job, m) in metrics {
            unique.insert((job, m.kind, m.name.as_str(), m.step), m.value);
        }
        let mut columns = Self::default();
        for ((job, kind, name, step), value) in unique {
            columns.jobs.push(job.0);
            columns.steps.push(to_i64(step));
            columns.kinds.push(kind.as_str());
            columns.names.push(name);
            columns.values.push(value);
        }
        columns
    }

    /// Binds the columns as the next five parameters of `query`.
    pub(super) fn bind<'q>(&'q self, query: Query<'q, Postgres, PgArguments>) -> Query<'q, Postgres, PgArguments> {
        query.bind(&self.jobs).bind(&self.steps).bind(&self.kinds).bind(&self.names).bind(&self.values)
    }
}

/// A common table expression `m` that upserts [`MetricColumns`] bound at
/// the five parameters named (jobs, steps, kinds, names, values).
macro_rules! upsert_metrics {
    ($jobs:literal, $steps:literal, $kinds:literal, $names:literal, $values:literal) => {
        concat!(
            "m AS (INSERT INTO metrics (job_id, step, kind, name, value) SELECT * FROM UNNEST($",
            $jobs,
            "::uuid[], $",
            $steps,
            "::bigint[], $",
            $kinds,
            "::text[], $",
            $names,
            "::text[], $",
            $values,
            "::float8[]) ON CONFLICT (job_id, kind, name, step) DO UPDATE SET value = EXCLUDED.value, \
             recorded_at = now())"
        )
    };
}
pub(super) use upsert_metrics;

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
