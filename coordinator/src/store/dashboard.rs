//! Reads of the dashboard and of `/metrics`: fleet levels, the job table
//! (filtered, sorted, paged with keyset cursors over the indexes of
//! migrations 0003 and 0014), a job's attempts and curves, a sweep's curves and ASHA decisions,
//! and the workers. Every read is bounded: pages, one job, or one sweep.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ptune_core::{JobId, JobState, SweepId, WorkerId};
use serde::Serialize;
use sqlx::types::Json;
use tracing::instrument;
use uuid::Uuid;

use super::{millis, to_u64, Result, Store};
use crate::cursor::{JobCursor, SortKey};
use crate::model::{FleetLevels, WorkerThroughput};

/// A training step's throughput counts towards a worker's rate for this long.
const THROUGHPUT_WINDOW_MS: i64 = 30_000;
/// The window of the recent queue-wait figures.
const RECENT_WAIT_WINDOW_MS: i64 = 15 * 60_000;
/// Most metric points one read returns.
pub const MAX_SERIES_POINTS: u32 = 50_000;

/// Waits from submission to first lease of the jobs leased in the last 15 minutes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RecentWaits {
    pub leases: u64,
    pub mean_seconds: Option<f64>,
    pub p50_seconds: Option<f64>,
    pub p95_seconds: Option<f64>,
}

/// Columns the job table sorts by; ties go to the newest job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobSort {
    Created,
    State,
    Method,
    BaseModel,
    Owner,
    Name,
    /// Sweep, then trial number; jobs outside sweeps last.
    Sweep,
}

impl JobSort {
    pub const NAMES: [&'static str; 7] = ["created", "state", "method", "base_model", "owner", "name", "sweep"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "created" | "age" => JobSort::Created,
            "state" => JobSort::State,
            "method" => JobSort::Method,
            "base_model" => JobSort::BaseModel,
            "owner" => JobSort::Owner,
            "name" => JobSort::Name,
            "sweep" => JobSort::Sweep,
            _ => return None,
        })
    }
}

/// A query of the job table.
#[derive(Clone, Debug, PartialEq)]
pub struct JobTableQuery {
    pub states: Vec<JobState>,
    pub method: Option<String>,
    pub base_model: Option<String>,
    pub owner: Option<String>,
    pub sweep_id: Option<SweepId>,
    pub name_prefix: Option<String>,
    pub sort: JobSort,
    pub descending: bool,
    pub limit: u32,
    /// Where the page starts: after the last row of the page before.
    pub after: Option<JobCursor>,
}

impl JobTableQuery {
    /// A canonical text of the filters and sort, which a page token is
    /// bound to (see [`crate::cursor`]).
    pub fn listing(&self) -> String {
        let states: Vec<&str> = self.states.iter().map(|s| s.as_str()).collect();
        format!(
            "job table; states={states:?} method={:?} base_model={:?} owner={:?} sweep={:?} name={:?} \
             sort={:?} desc={}",
            self.method,
            self.base_model,
            self.owner,
            self.sweep_id.map(|s| s.0),
            self.name_prefix,
            self.sort,
            self.descending
        )
    }

    /// Whether only states filter the table, so the count comes from the
    /// counts per state.
    fn only_states(&self) -> bool {
        self.method.is_none()
            && self.base_model.is_none()
            && self.owner.is_none()
            && self.sweep_id.is_none()
            && self.name_prefix.is_none()
    }
}

/// How many jobs match a job table's filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct JobTotal {
    pub count: u64,
    /// The count stopped at [`COUNT_CAP`]: at least this many match.
    pub at_least: bool,
}

/// Most rows counted for a filtered job table's total: counting every
/// match of a broad filter would read a large part of the table.
pub const COUNT_CAP: i64 = 10_000;

/// One page of the job table.
#[derive(Clone, Debug, PartialEq)]
pub struct JobTablePage {
    pub rows: Vec<JobSummary>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<JobCursor>,
    pub total: JobTotal,
}

impl JobSummary {
    /// The cursor after this row in a table sorted by `sort`.
    fn cursor(&self, sort: JobSort) -> JobCursor {
        let key = match sort {
            JobSort::Created => SortKey::Created,
            JobSort::State => SortKey::Text(self.state.clone()),
            JobSort::Method => SortKey::Text(self.method.clone()),
            JobSort::BaseModel => SortKey::Text(self.base_model.clone()),
            JobSort::Owner => SortKey::Text(self.owner.clone()),
            JobSort::Name => SortKey::Text(self.name.clone()),
            JobSort::Sweep => SortKey::Sweep(self.sweep_id.zip(self.trial_index)),
        };
        JobCursor { key, created_at: self.created_at, id: JobId(self.id) }
    }
}

/// A row of the job table.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct JobSummary {
    pub id: Uuid,
    pub name: String,
    pub state: String,
    pub method: String,
    pub base_model: String,
    pub owner: String,
    pub sweep_id: Option<Uuid>,
    pub sweep_name: Option<String>,
    pub trial_index: Option<i32>,
    pub step: i64,
    pub total_steps: i64,
    pub attempts: i32,
    pub max_attempts: i32,
    pub early_stopped: bool,
    pub error: String,
    pub worker_id: Option<Uuid>,
    /// Latest training loss.
    pub loss: Option<f64>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One lease of a job.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct AttemptView {
    pub attempt: i32,
    pub worker_id: Uuid,
    pub hostname: Option<String>,
    pub epoch: i64,
    pub leased_at: DateTime<Utc>,
    pub lease_expires_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// `succeeded`, `failed`, `cancelled` or `lease_expired`; `None` while open.
    pub outcome: Option<String>,
    pub reason: String,
    /// The worker's devices the attempt ran on (empty: not recorded).
    pub devices: Vec<String>,
}

/// A recorded metric value.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct SeriesPoint {
    pub kind: String,
    pub name: String,
    pub step: i64,
    pub value: f64,
}

/// One point of a sweep trial's objective curve.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct TrialPoint {
    pub trial_index: i32,
    pub step: i64,
    pub value: f64,
}

/// An ASHA decision of a sweep.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct AshaDecisionView {
    pub trial_index: i32,
    pub rung: i32,
    pub rung_step: i64,
    pub decision: String,
    pub value: f64,
}

/// A worker as the dashboard shows it.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct WorkerView {
    pub id: Uuid,
    pub hostname: String,
    pub devices: Json<serde_json::Value>,
    pub slots: i32,
    pub models: Json<serde_json::Value>,
    pub registered_at: DateTime<Utc>,
    pub last_heartbeat: DateTime<Utc>,
    pub heartbeat_age_seconds: f64,
    pub online: bool,
    pub slots_busy: i64,
    pub running_jobs: Vec<Uuid>,
    pub examples_per_second: f64,
    /// Packs its running jobs form: each running job whose latest step
    /// shared its passes with others (`pack_jobs` >= 2) counts
    /// `1 / pack_jobs`, so a pack of n counts once.
    pub packs_running: i64,
    /// Running jobs that train in a pack.
    pub packed_jobs: i64,
    /// Memory it may use, as it registered it (0: unknown).
    pub memory_bytes: i64,
    /// Base models it held in memory at its last lease request.
    pub loaded_models: Vec<String>,
    /// Why it takes no new jobs; empty while healthy.
    pub unhealthy_reason: String,
}

/// The job table's select list and filters, the keyset condition of its
/// sort (`$13` says whether there is a cursor), its order and its limit.
macro_rules! job_table {
    ($after:expr, $order:expr) => {
        concat!(
            "SELECT j.id, j.name, j.state::text AS state, j.method, j.base_model, j.owner, j.sweep_id, \
                    s.name AS sweep_name, j.trial_index, j.step, j.total_steps, j.attempts, j.max_attempts, \
                    j.early_stopped, j.error, j.created_at, j.started_at, j.finished_at, \
                    (SELECT a.worker_id FROM job_attempts a WHERE a.job_id = j.id AND a.ended_at IS NULL) AS worker_id, \
                    (SELECT m.value FROM metrics m WHERE m.job_id = j.id AND m.kind = 'train' AND m.name = 'loss' \
                     ORDER BY m.step DESC LIMIT 1) AS loss \
             FROM jobs j LEFT JOIN sweeps s ON s.id = j.sweep_id ",
            job_filter!(),
            "AND (NOT $12::bool OR ",
            $after,
            ") ORDER BY ",
            $order,
            " LIMIT $7"
        )
    };
}

macro_rules! job_filter {
    () => {
        "WHERE (cardinality($1::text[]) = 0 OR j.state = ANY($1::text[]::job_state[])) \
           AND ($2::text IS NULL OR j.method = $2) \
           AND ($3::text IS NULL OR j.base_model = $3) \
           AND ($4::text IS NULL OR j.owner = $4) \
           AND ($5::uuid IS NULL OR j.sweep_id = $5) \
           AND ($6::text IS NULL OR starts_with(j.name, $6)) "
    };
}

/// Rows after the cursor of a text sort key `$8` (ties newest first). The
/// first comparison bounds the index scan; the rest drops the ties already shown.
macro_rules! after_text {
    ($column:expr, $cmp:literal, $key:expr) => {
        concat!(
            $column, " ", $cmp, "= ", $key, " AND (",
            $column, " ", $cmp, " ", $key, " OR (j.created_at, j.id) < ($9, $10))"
        )
    };
}

/// The statement of a sort by a text column, each way; ties newest first.
macro_rules! by_text {
    ($descending:expr, $column:literal, $key:literal) => {
        if $descending {
            job_table!(after_text!($column, "<", $key), concat!($column, " DESC, j.created_at DESC, j.id DESC"))
        } else {
            job_table!(after_text!($column, ">", $key), concat!($column, " ASC, j.created_at DESC, j.id DESC"))
        }
    };
}

/// Rows after the cursor of the sweep sort: `$11` is the cursor's sweep
/// and trial (`NULL` among the jobs outside sweeps, which come last).
macro_rules! after_sweep {
    ($cmp:literal) => {
        concat!(
            "CASE WHEN $11::uuid IS NULL THEN j.sweep_id IS NULL AND (j.created_at, j.id) < ($9, $10) \
                  ELSE j.sweep_id IS NULL OR (j.sweep_id, j.trial_index) ",
            $cmp,
            " ($11, $13::int) END"
        )
    };
}

type PgQueryAs<'q, O> = sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>;

/// Binds the job table's filters, `$1` to `$6` of [`job_filter!`].
fn bind_filters<'q, O>(query: PgQueryAs<'q, O>, q: &'q JobTableQuery, states: &'q [&'q str]) -> PgQueryAs<'q, O> {
    query
        .bind(states)
        .bind(q.method.as_deref())
        .bind(q.base_model.as_deref())
        .bind(q.owner.as_deref())
        .bind(q.sweep_id.map(|s| s.0))
        .bind(q.name_prefix.as_deref())
}

/// The statement of each sort; all are fixed strings, so no SQL is built at
/// run time. Each sort has its index (migrations 0001, 0002, 0003 and 0014).
fn job_table_sql(sort: JobSort, descending: bool) -> &'static str {
    match (sort, descending) {
        (JobSort::Created, true) => job_table!("(j.created_at, j.id) < ($9, $10)", "j.created_at DESC, j.id DESC"),
        (JobSort::Created, false) => job_table!("(j.created_at, j.id) > ($9, $10)", "j.created_at ASC, j.id ASC"),
        (JobSort::State, descending) => by_text!(descending, "j.state", "$8::text::job_state"),
        (JobSort::Method, descending) => by_text!(descending, "j.method", "$8::text"),
        (JobSort::BaseModel, descending) => by_text!(descending, "j.base_model", "$8::text"),
        (JobSort::Owner, descending) => by_text!(descending, "j.owner", "$8::text"),
        (JobSort::Name, descending) => by_text!(descending, "j.name", "$8::text"),
        (JobSort::Sweep, false) => job_table!(
            after_sweep!(">"),
            "j.sweep_id ASC NULLS LAST, j.trial_index ASC, j.created_at DESC, j.id DESC"
        ),
        (JobSort::Sweep, true) => job_table!(
            after_sweep!("<"),
            "j.sweep_id DESC NULLS LAST, j.trial_index DESC, j.created_at DESC, j.id DESC"
        ),
    }
}

/// The latest `examples_per_second` of every open lease, if recent.
/// `$window` names the parameter holding the window in milliseconds.
macro_rules! open_lease_throughput {
    ($window:literal) => {
        concat!(
            "SELECT a.worker_id, m.value FROM job_attempts a \
             JOIN LATERAL (SELECT mm.value, mm.recorded_at FROM metrics mm \
                           WHERE mm.job_id = a.job_id AND mm.kind = 'train' AND mm.name = 'examples_per_second' \
                           ORDER BY mm.step DESC LIMIT 1) m \
               ON m.recorded_at > now() - ",
            $window,
            " * interval '1 millisecond' \
             WHERE a.ended_at IS NULL"
        )
    };
}

impl Store {
    /// Jobs and sweeps by state, the queue, workers online, slots and throughput.
    #[instrument(skip_all)]
    pub async fn fleet_levels(&self, online_window: Duration) -> Result<FleetLevels> {
        let jobs = self.job_counts().await?;
        let sweeps = self.sweep_counts().await?;
        let oldest: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - min(updated_at))::float8 FROM jobs WHERE state = 'queued'",
        )
        .fetch_one(&self.pool)
        .await?;
        let (workers_online, workers_unhealthy, slots): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE unhealthy_reason <> ''), coalesce(sum(slots), 0)::bigint \
             FROM workers \
             WHERE last_heartbeat > now() - $1 * interval '1 millisecond'",
        )
        .bind(millis(online_window))
        .fetch_one(&self.pool)
        .await?;
        let busy: i64 = sqlx::query_scalar("SELECT count(*) FROM job_attempts WHERE ended_at IS NULL")
            .fetch_one(&self.pool)
            .await?;
        let rows: Vec<(Uuid, String, f64)> = sqlx::query_as(concat!(
            "SELECT w.id, w.hostname, coalesce(sum(t.value), 0)::float8 FROM workers w \
             LEFT JOIN (",
            open_lease_throughput!("$2"),
            ") t ON t.worker_id = w.id \
             WHERE w.last_heartbeat > now() - $1 * interval '1 millisecond' \
             GROUP BY w.id, w.hostname ORDER BY w.hostname, w.id"
        ))
        .bind(millis(online_window))
        .bind(THROUGHPUT_WINDOW_MS)
        .fetch_all(&self.pool)
        .await?;
        Ok(FleetLevels {
            jobs,
            sweeps,
            oldest_queued: oldest.map(|s| Duration::try_from_secs_f64(s).unwrap_or_default()),
            workers_online: to_u64(workers_online, "worker count")?,
            workers_unhealthy: to_u64(workers_unhealthy, "worker count")?,
            slots: to_u64(slots, "slot count")?,
            slots_busy: to_u64(busy, "open lease count")?,
            workers: rows
                .into_iter()
                .map(|(id, hostname, eps)| WorkerThroughput {
                    worker_id: WorkerId(id),
                    hostname,
                    examples_per_second: eps,
                })
                .collect(),
        })
    }

    /// Waits from submission to first lease over the last 15 minutes.
    #[instrument(skip_all)]
    pub async fn recent_queue_waits(&self) -> Result<RecentWaits> {
        let (leases, mean, p50, p95): (i64, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
            "SELECT count(*), avg(w), percentile_cont(0.5) WITHIN GROUP (ORDER BY w), \
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY w) \
             FROM (SELECT extract(epoch FROM a.leased_at - j.created_at)::float8 AS w \
                   FROM job_attempts a JOIN jobs j ON j.id = a.job_id \
                   WHERE a.attempt = 1 AND a.leased_at > now() - $1 * interval '1 millisecond') t",
        )
        .bind(RECENT_WAIT_WINDOW_MS)
        .fetch_one(&self.pool)
        .await?;
        Ok(RecentWaits {
            leases: to_u64(leases, "lease count")?,
            mean_seconds: mean,
            p50_seconds: p50,
            p95_seconds: p95,
        })
    }

    /// One page of the job table, where the next starts, and the number of
    /// jobs matching its filters. The page is read after its cursor through
    /// the sort's index, planned for this call's values
    /// ([`Store::begin_custom_plans`]), so a deep page costs what the first does.
    #[instrument(skip_all, fields(limit = q.limit))]
    pub async fn job_table(&self, q: &JobTableQuery) -> Result<JobTablePage> {
        let states: Vec<&str> = q.states.iter().map(|s| s.as_str()).collect();
        let (text_key, sweep_key) = match q.after.as_ref().map(|c| &c.key) {
            Some(SortKey::Text(text)) => (Some(text.as_str()), None),
            Some(SortKey::Sweep(sweep)) => (None, *sweep),
            _ => (None, None),
        };
        let mut tx = self.begin_custom_plans().await?;
        let mut rows: Vec<JobSummary> = bind_filters(sqlx::query_as(job_table_sql(q.sort, q.descending)), q, &states)
            .bind(i64::from(q.limit) + 1)
            .bind(text_key)
            .bind(q.after.as_ref().map(|c| c.created_at))
            .bind(q.after.as_ref().map(|c| c.id.0))
            .bind(sweep_key.map(|(sweep, _)| sweep))
            .bind(q.after.is_some())
            .bind(sweep_key.map(|(_, trial)| trial))
            .fetch_all(&mut *tx)
            .await?;
        let more = rows.len() > q.limit as usize;
        rows.truncate(q.limit as usize);
        let next = rows.last().filter(|_| more).map(|last| last.cursor(q.sort));
        let total = if q.only_states() {
            let counts = self.job_counts().await?;
            let matching = counts.iter().filter(|(s, _)| q.states.is_empty() || q.states.contains(s));
            let count = matching.map(|(_, n)| n).sum();
            JobTotal { count, at_least: false }
        } else {
            let count =
                sqlx::query_as(concat!("SELECT count(*) FROM (SELECT 1 FROM jobs j ", job_filter!(), "LIMIT $7) t"));
            let (n,): (i64,) = bind_filters(count, q, &states).bind(COUNT_CAP + 1).fetch_one(&mut *tx).await?;
            JobTotal { count: to_u64(n.min(COUNT_CAP), "job count")?, at_least: n > COUNT_CAP }
        };
        tx.commit().await?;
        Ok(JobTablePage { rows, next, total })
    }

    /// Every lease a job had, first first, with the worker's hostname.
    #[instrument(skip_all, fields(job_id = %id))]
    pub async fn job_attempts(&self, id: JobId) -> Result<Vec<AttemptView>> {
        let rows = sqlx::query_as(
            "SELECT a.attempt, a.worker_id, w.hostname, a.epoch, a.leased_at, a.lease_expires_at, a.ended_at, \
                    a.outcome, a.reason, a.devices \
             FROM job_attempts a LEFT JOIN workers w ON w.id = a.worker_id \
             WHERE a.job_id = $1 ORDER BY a.attempt",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// A job's metric points after `after_step` (all with `None`), by kind,
    /// name and step, at most [`MAX_SERIES_POINTS`].
    #[instrument(skip_all, fields(job_id = %id))]
    pub async fn job_series(&self, id: JobId, after_step: Option<u64>) -> Result<Vec<SeriesPoint>> {
        let rows = sqlx::query_as(
            "SELECT kind, name, step, value FROM metrics \
             WHERE job_id = $1 AND ($2::bigint IS NULL OR step > $2) \
             ORDER BY kind, name, step LIMIT $3",
        )
        .bind(id.0)
        .bind(after_step.map(super::to_i64))
        .bind(i64::from(MAX_SERIES_POINTS))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The evaluation curve of `metric` of every trial of a sweep, at most
    /// [`MAX_SERIES_POINTS`] points in all.
    #[instrument(skip_all, fields(sweep_id = %id))]
    pub async fn sweep_curves(&self, id: SweepId, metric: &str) -> Result<Vec<TrialPoint>> {
        let rows = sqlx::query_as(
            "SELECT j.trial_index, m.step, m.value FROM jobs j \
             JOIN metrics m ON m.job_id = j.id AND m.kind = 'eval' AND m.name = $2 \
             WHERE j.sweep_id = $1 ORDER BY j.trial_index, m.step LIMIT $3",
        )
        .bind(id.0)
        .bind(metric)
        .bind(i64::from(MAX_SERIES_POINTS))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Every ASHA decision of a sweep, by trial and rung.
    #[instrument(skip_all, fields(sweep_id = %id))]
    pub async fn asha_decisions(&self, id: SweepId) -> Result<Vec<AshaDecisionView>> {
        let rows = sqlx::query_as(
            "SELECT trial_index, rung, rung_step, decision, value FROM asha_decisions \
             WHERE sweep_id = $1 ORDER BY trial_index, rung",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// One page of workers, online ones first, and the number of workers.
    #[instrument(skip_all, fields(limit, offset))]
    pub async fn worker_table(
        &self,
        online_window: Duration,
        limit: u32,
        offset: u32,
    ) -> Result<(Vec<WorkerView>, u64)> {
        let rows = sqlx::query_as(concat!(
            "SELECT w.id, w.hostname, w.devices, w.slots, w.models, w.registered_at, w.last_heartbeat, \
                    extract(epoch FROM now() - w.last_heartbeat)::float8 AS heartbeat_age_seconds, \
                    w.last_heartbeat > now() - $1 * interval '1 millisecond' AS online, \
                    (SELECT count(*) FROM job_attempts a WHERE a.worker_id = w.id AND a.ended_at IS NULL) AS slots_busy, \
                    array(SELECT a.job_id FROM job_attempts a WHERE a.worker_id = w.id AND a.ended_at IS NULL \
                          ORDER BY a.leased_at) AS running_jobs, \
                    coalesce((SELECT sum(t.value) FROM (",
            open_lease_throughput!("$4"),
            ") t WHERE t.worker_id = w.id), 0)::float8 AS examples_per_second, \
                    packs.packs_running, packs.packed_jobs, w.memory_bytes, w.loaded_models, w.unhealthy_reason \
             FROM workers w \
             CROSS JOIN LATERAL ( \
                 SELECT round(coalesce(sum(1.0 / p.value), 0))::bigint AS packs_running, count(*) AS packed_jobs \
                 FROM job_attempts a \
                 JOIN LATERAL (SELECT mm.value FROM metrics mm \
                               WHERE mm.job_id = a.job_id AND mm.kind = 'train' AND mm.name = 'pack_jobs' \
                               ORDER BY mm.step DESC LIMIT 1) p ON p.value >= 2 \
                 WHERE a.worker_id = w.id AND a.ended_at IS NULL) packs \
             ORDER BY (w.last_heartbeat > now() - $1 * interval '1 millisecond') DESC, w.hostname, w.id \
             LIMIT $2 OFFSET $3"
        ))
        .bind(millis(online_window))
        .bind(i64::from(limit))
        .bind(i64::from(offset))
        .bind(THROUGHPUT_WINDOW_MS)
        .fetch_all(&self.pool)
        .await?;
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM workers").fetch_one(&self.pool).await?;
        Ok((rows, to_u64(total, "worker count")?))
    }
}
