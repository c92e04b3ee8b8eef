//! The dashboard's JSON API. Every list is paged and every read is bounded
//! (a page, one job, one sweep); errors are `{"error": "..."}` with a 400,
//! 404 or 503, and database details stay in the log.

use std::collections::BTreeMap;
use std::str::FromStr;

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use ptune_core::sweep::SweepState;
use ptune_core::{JobId, JobState, Method, SweepId};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::error;

use super::{events, Dashboard};
use crate::auth::Identity;
use crate::blob;
use crate::model::{Job, PageToken, Sweep, Trial};
use crate::store::{JobSort, JobTableQuery, StoreError};

/// Rows per page unless asked otherwise, and the most a page may hold.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

pub(super) fn routes() -> Router<Dashboard> {
    Router::new()
        .route("/overview", get(overview))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/jobs/{id}/metrics", get(job_metrics))
        .route("/jobs/{id}/adapter", get(adapter))
        .route("/sweeps", get(sweeps))
        .route("/sweeps/{id}", get(sweep))
        .route("/sweeps/{id}/curves", get(sweep_curves))
        .route("/workers", get(workers))
        .route("/events", get(events::events))
}

/// What an API call can fail with.
pub(super) enum ApiError {
    BadRequest(String),
    NotFound(String),
    Unavailable,
    Internal,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => ApiError::Unavailable,
            other => {
                error!(error = %other, "dashboard read failed");
                ApiError::Internal
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Unavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "the coordinator cannot reach its database; retry shortly".into())
            }
            ApiError::Internal => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error; the coordinator log has the details".into())
            }
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn parse<T: FromStr>(field: &str, value: &str) -> Result<T, ApiError>
where
    T::Err: std::fmt::Display,
{
    value.trim().parse().map_err(|e| ApiError::BadRequest(format!("{field}: {e}")))
}

fn page_size(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok(n),
        n => Err(ApiError::BadRequest(format!("limit: must be between 1 and {MAX_PAGE}, got {n}"))),
    }
}

/// An empty query parameter means "any".
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

async fn overview(State(d): State<Dashboard>) -> ApiResult {
    let levels = d.store.fleet_levels(d.online_window).await?;
    let waits = d.store.recent_queue_waits().await?;
    let jobs: BTreeMap<&str, u64> = levels.jobs.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    let sweeps: BTreeMap<&str, u64> = levels.sweeps.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    Ok(Json(json!({
        "now": Utc::now(),
        "jobs": jobs,
        "sweeps": sweeps,
        "queue": {
            "depth": levels.count(JobState::Queued),
            "oldest_wait_seconds": levels.oldest_queued.map(|d| d.as_secs_f64()),
            "recent": waits,
        },
        "workers": { "online": levels.workers_online, "slots": levels.slots, "slots_busy": levels.slots_busy },
        "examples_per_second": levels.examples_per_second(),
    })))
}

#[derive(Debug, Deserialize)]
struct JobsParams {
    /// Comma-separated states.
    state: Option<String>,
    method: Option<String>,
    base_model: Option<String>,
    owner: Option<String>,
    sweep: Option<String>,
    /// Name prefix.
    name: Option<String>,
    sort: Option<String>,
    /// `asc` or `desc` (the default).
    order: Option<String>,
    limit: Option<u32>,
    offset: Option<u32>,
}

async fn jobs(State(d): State<Dashboard>, Query(p): Query<JobsParams>) -> ApiResult {
    let states = match given(&p.state) {
        Some(s) => s.split(',').map(|v| parse::<JobState>("state", v)).collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let method = given(&p.method).map(|m| parse::<Method>("method", m)).transpose()?;
    let sort = match given(&p.sort) {
        None => JobSort::Created,
        Some(s) => JobSort::parse(s).ok_or_else(|| {
            ApiError::BadRequest(format!("sort: must be one of {}, got {s:?}", JobSort::NAMES.join(", ")))
        })?,
    };
    let descending = match given(&p.order) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(o) => return Err(ApiError::BadRequest(format!("order: must be asc or desc, got {o:?}"))),
    };
    let query = JobTableQuery {
        states,
        method: method.map(|m| m.as_str().to_string()),
        base_model: given(&p.base_model).map(String::from),
        owner: given(&p.owner).map(String::from),
        sweep_id: given(&p.sweep).map(|s| parse::<SweepId>("sweep", s)).transpose()?,
        name_prefix: given(&p.name).map(String::from),
        sort,
        descending,
        limit: page_size(p.limit)?,
        offset: p.offset.unwrap_or(0),
    };
    let (rows, total) = d.store.job_table(&query).await?;
    Ok(Json(json!({ "jobs": rows, "total": total, "limit": query.limit, "offset": query.offset })))
}

async fn load_job(d: &Dashboard, id: &str) -> Result<Job, ApiError> {
    let id: JobId = parse("job id", id)?;
    d.store.get_job(id).await?.ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))
}

async fn job(State(d): State<Dashboard>, Path(id): Path<String>) -> ApiResult {
    let job = load_job(&d, &id).await?;
    let attempts = d.store.job_attempts(job.id).await?;
    let sweep = match job.trial {
        Some(trial) => d.store.get_sweep(trial.sweep_id).await?.map(
            |s| json!({ "id": s.id, "name": s.name, "trial_index": trial.index, "objective": s.objective.metric }),
        ),
        None => None,
    };
    Ok(Json(json!({
        "id": job.id,
        "name": job.spec.name,
        "owner": job.spec.owner,
        "base_model": job.spec.base_model,
        "method": job.spec.method.as_str(),
        "state": job.state.as_str(),
        "error": job.error,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "failures": job.failures,
        "interruptions": job.interruptions,
        "retry_at": job.retry_at.filter(|_| job.state == ptune_core::JobState::Queued),
        "checkpoint_step": job.checkpoint_step,
        "step": job.step,
        "total_steps": job.total_steps,
        "worker_id": job.worker_id,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "cancel_requested": job.cancel_requested,
        "early_stopped": job.early_stopped,
        "adapter": job.adapter.as_ref().map(|a| json!({ "sha256": a.sha256, "size": a.size })),
        "sweep": sweep,
        "latest_metrics": job.latest_metrics,
        "spec": job.spec,
        "attempt_history": attempts,
    })))
}

#[derive(Debug, Deserialize)]
struct SeriesParams {
    /// Only points after this step (for growing curves).
    after_step: Option<u64>,
}

async fn job_metrics(State(d): State<Dashboard>, Path(id): Path<String>, Query(p): Query<SeriesParams>) -> ApiResult {
    let id: JobId = parse("job id", &id)?;
    let points = d.store.job_series(id, p.after_step).await?;
    let mut series: BTreeMap<(String, String), Vec<(i64, f64)>> = BTreeMap::new();
    for point in points {
        series.entry((point.kind, point.name)).or_default().push((point.step, point.value));
    }
    let series: Vec<Value> = series
        .into_iter()
        .map(|((kind, name), points)| json!({ "kind": kind, "name": name, "points": points }))
        .collect();
    Ok(Json(json!({ "job_id": id, "series": series })))
}

/// Streams the adapter archive from the database a window at a time; the
/// download is recorded in the audit trail, as `ptune adapter get` is.
async fn adapter(
    State(d): State<Dashboard>,
    Extension(caller): Extension<Identity>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = load_job(&d, &id).await?;
    let Some(info) = job.adapter else {
        return Err(ApiError::NotFound(format!(
            "job {} has no adapter (it is {}); adapters exist once a job succeeds",
            job.id,
            job.state.as_str()
        )));
    };
    let job_id = job.id;
    let stored = d.store.adapter_blob(job_id).await?;
    let blob = stored.ok_or_else(|| ApiError::NotFound(format!("job {job_id} has no stored adapter")))?;
    let detail = json!({ "sha256": info.sha256, "via": "dashboard" });
    if let Err(e) = d.store.audit(&caller, "adapter.download", &job_id.to_string(), detail).await {
        error!(error = %e, job_id = %job_id, actor = %caller.name, "cannot record an audit entry");
    }
    let chunks = blob::read(d.store.clone(), blob, info.size);
    let disposition = format!("attachment; filename=\"ptune-adapter-{job_id}.tar\"");
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_string()),
            (header::CONTENT_LENGTH, info.size.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::ETAG, format!("\"sha256:{}\"", info.sha256)),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct SweepsParams {
    state: Option<String>,
    limit: Option<u32>,
    /// The `next` of the previous page.
    after: Option<String>,
}

async fn sweeps(State(d): State<Dashboard>, Query(p): Query<SweepsParams>) -> ApiResult {
    let states = match given(&p.state) {
        Some(s) => s.split(',').map(|v| parse::<SweepState>("state", v)).collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let after = given(&p.after).map(|t| parse::<PageToken<SweepId>>("after", t)).transpose()?;
    let page = d.store.list_sweeps(&states, page_size(p.limit)?, after, None).await?;
    let sweeps: Vec<Value> = page
        .sweeps
        .iter()
        .map(|(s, best)| {
            let mut v = sweep_json(s);
            v["best"] = best.as_ref().map_or(Value::Null, trial_json);
            v
        })
        .collect();
    Ok(Json(json!({ "sweeps": sweeps, "next": page.next.map(|t| t.to_string()) })))
}

async fn load_sweep(d: &Dashboard, id: &str) -> Result<Sweep, ApiError> {
    let id: SweepId = parse("sweep id", id)?;
    d.store.get_sweep(id).await?.ok_or_else(|| ApiError::NotFound(format!("sweep {id} not found")))
}

async fn sweep(State(d): State<Dashboard>, Path(id): Path<String>) -> ApiResult {
    let sweep = load_sweep(&d, &id).await?;
    let board = d.store.leaderboard(sweep.id, &sweep.objective).await?;
    let decisions = d.store.asha_decisions(sweep.id).await?;
    let best = crate::model::best_trial(&board).map(|t| t.index);
    let mut v = sweep_json(&sweep);
    v["leaderboard"] = board.iter().map(trial_json).collect();
    v["best_trial"] = json!(best);
    v["asha_decisions"] = json!(decisions);
    v["definition"] = sweep.definition.clone();
    Ok(Json(v))
}

async fn sweep_curves(State(d): State<Dashboard>, Path(id): Path<String>) -> ApiResult {
    let sweep = load_sweep(&d, &id).await?;
    let points = d.store.sweep_curves(sweep.id, &sweep.objective.metric).await?;
    let mut trials: BTreeMap<i32, Vec<(i64, f64)>> = BTreeMap::new();
    for p in points {
        trials.entry(p.trial_index).or_default().push((p.step, p.value));
    }
    let trials: Vec<Value> =
        trials.into_iter().map(|(index, points)| json!({ "index": index, "points": points })).collect();
    Ok(Json(json!({ "metric": sweep.objective.metric, "trials": trials })))
}

#[derive(Debug, Deserialize)]
struct PageParams {
    limit: Option<u32>,
    offset: Option<u32>,
}

async fn workers(State(d): State<Dashboard>, Query(p): Query<PageParams>) -> ApiResult {
    let limit = page_size(p.limit)?;
    let offset = p.offset.unwrap_or(0);
    let (rows, total) = d.store.worker_table(d.online_window, limit, offset).await?;
    let workers: Vec<Value> = rows.into_iter().map(|w| json!(w)).collect();
    Ok(Json(json!({
        "workers": workers,
        "total": total,
        "limit": limit,
        "offset": offset,
        "online_window_seconds": d.online_window.as_secs_f64(),
    })))
}

fn sweep_json(s: &Sweep) -> Value {
    let c = &s.counts;
    json!({
        "id": s.id,
        "name": s.name,
        "owner": s.owner,
        "description": s.description,
        "state": s.state.as_str(),
        "algorithm": s.algorithm.as_str(),
        "objective": { "metric": s.objective.metric, "direction": s.objective.direction.as_str() },
        "trial_budget": s.trial_budget,
        "trials_created": s.trials_created,
        "max_concurrent_trials": s.max_concurrent_trials,
        "counts": {
            "queued": c.queued, "running": c.running, "succeeded": c.succeeded,
            "early_stopped": c.early_stopped, "failed": c.failed, "cancelled": c.cancelled, "diverged": c.diverged,
        },
        "plan": s.plan,
        "error": s.error,
        "created_at": s.created_at,
        "finished_at": s.finished_at,
    })
}

fn trial_json(t: &Trial) -> Value {
    json!({
        "index": t.index,
        "job_id": t.job_id,
        "params": t.params,
        "state": t.state.as_str(),
        "failure_reason": t.failure_reason.map(|r| r.as_str()),
        "stopped_rung": t.stopped_rung,
        "objective": t.objective,
        "objective_step": t.objective_step,
        "step": t.step,
        "total_steps": t.total_steps,
        "rank": t.rank,
        "error": t.error,
        "adapter": t.adapter.is_some(),
        "created_at": t.created_at,
        "finished_at": t.finished_at,
    })
}
