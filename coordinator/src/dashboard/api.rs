//! The dashboard's JSON API. Every list is paged and every read is bounded
//! (a page, one job, one sweep). A single job, a single sweep, the sweep
//! list and adapters are read through the same services as gRPC
//! ([`crate::jobs::Jobs`], [`crate::sweep::Sweeps`]), so they say what
//! `GetJob` and `GetSweep` say; the job table, curves, attempts, workers and
//! the overview are the dashboard's own reads of the store. Errors are the
//! domain's ([`crate::error`] maps each to its HTTP status and
//! `{"error": "..."}`); database details stay in the log.

use std::collections::BTreeMap;
use std::str::FromStr;

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use ptune_core::sweep::SweepState;
use ptune_core::{JobId, JobState, Method, SweepId};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{events, Dashboard};
use crate::auth::Identity;
use crate::cursor::JobCursor;
use crate::error::Error;
use crate::limits::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use crate::model::{JobReport, PageToken, Sweep, Trial};
use crate::store::{JobSort, JobTableQuery};

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

type ApiResult = Result<Json<Value>, Error>;

fn parse<T: FromStr>(field: &str, value: &str) -> Result<T, Error>
where
    T::Err: std::fmt::Display,
{
    value.trim().parse().map_err(|e: T::Err| Error::invalid(field, e.to_string()))
}

/// The rows a page asks for; unlike gRPC listings, a size out of range is refused.
fn page_size(limit: Option<u32>) -> Result<u32, Error> {
    match limit.unwrap_or(DEFAULT_PAGE_SIZE) {
        n @ 1..=MAX_PAGE_SIZE => Ok(n),
        n => Err(Error::invalid("limit", format!("must be between 1 and {MAX_PAGE_SIZE}, got {n}"))),
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
    /// The `next` of the previous page.
    after: Option<String>,
    /// Refused: pages are read after a cursor (`after`), never by offset.
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
            Error::invalid("sort", format!("must be one of {}, got {s:?}", JobSort::NAMES.join(", ")))
        })?,
    };
    let descending = match given(&p.order) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(o) => return Err(Error::invalid("order", format!("must be asc or desc, got {o:?}"))),
    };
    if p.offset.is_some_and(|o| o > 0) {
        return Err(Error::invalid("offset", "is not supported; pass the next of the previous page as after"));
    }
    let mut query = JobTableQuery {
        states,
        method: method.map(|m| m.as_str().to_string()),
        base_model: given(&p.base_model).map(String::from),
        owner: given(&p.owner).map(String::from),
        sweep_id: given(&p.sweep).map(|s| parse::<SweepId>("sweep", s)).transpose()?,
        name_prefix: given(&p.name).map(String::from),
        sort,
        descending,
        limit: page_size(p.limit)?,
        after: None,
    };
    let listing = query.listing();
    query.after = given(&p.after)
        .map(|t| JobCursor::decode(t, &listing).map_err(|e| Error::invalid("after", e.message())))
        .transpose()?;
    let page = d.store.job_table(&query).await?;
    Ok(Json(json!({
        "jobs": page.rows,
        "total": page.total.count,
        "total_at_least": page.total.at_least,
        "limit": query.limit,
        "next": page.next.map(|c| c.encode(&listing)),
    })))
}

/// One job, read as `GetJob` reads it (with why it waits), with its
/// attempts and its sweep.
async fn job(State(d): State<Dashboard>, Extension(caller): Extension<Identity>, Path(id): Path<String>) -> ApiResult {
    let id: JobId = parse("job id", &id)?;
    let JobReport { job, waiting_reason } = d.jobs.get(id, &caller.scope()).await?;
    let attempts = d.store.job_attempts(job.id).await?;
    let sweep = match job.trial {
        Some(trial) => {
            let s = d.sweeps.find(trial.sweep_id, &caller.scope()).await?;
            json!({ "id": s.id, "name": s.name, "trial_index": trial.index, "objective": s.objective.metric })
        }
        None => Value::Null,
    };
    let memory_estimate = job.memory_estimate.map(|e| {
        json!({
            "weights_bytes": e.weights_bytes,
            "job_bytes": e.job_bytes,
            "activation_bytes": e.activation_bytes,
            "total_bytes": e.total_bytes(),
        })
    });
    Ok(Json(json!({
        "id": job.id,
        "name": job.spec.name,
        "owner": job.spec.owner,
        "base_model": job.spec.base_model,
        "method": job.spec.method.as_str(),
        "state": job.state.as_str(),
        "waiting_reason": waiting_reason,
        "error": job.error,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "failures": job.failures,
        "interruptions": job.interruptions,
        "retry_at": job.retry_at.filter(|_| job.state == JobState::Queued),
        "checkpoint_step": job.checkpoint_step,
        "step": job.step,
        "total_steps": job.total_steps,
        "worker_id": job.worker_id,
        "devices": job.devices,
        "memory_estimate": memory_estimate,
        "worker_peak_rss_bytes": job.worker_peak_rss_bytes,
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

/// Streams the adapter archive from the database a window at a time, as
/// `DownloadAdapter` does (and recorded in the audit trail as it is); a job
/// without one is not found here.
async fn adapter(
    State(d): State<Dashboard>,
    Extension(caller): Extension<Identity>,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let job = d.jobs.find(parse("job id", &id)?, &caller.scope()).await?;
    if job.adapter.is_none() {
        return Err(Error::NotFound(format!(
            "job {} has no adapter (it is {}); adapters exist once a job succeeds",
            job.id,
            job.state.as_str()
        )));
    }
    let id = job.id;
    let (info, chunks) = d.jobs.adapter(id, &caller, Some("dashboard")).await?;
    let disposition = format!("attachment; filename=\"ptune-adapter-{id}.tar\"");
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

/// A page of sweeps, read as `ListSweeps` reads them.
async fn sweeps(State(d): State<Dashboard>, Extension(caller): Extension<Identity>, Query(p): Query<SweepsParams>) -> ApiResult {
    let states = match given(&p.state) {
        Some(s) => s.split(',').map(|v| parse::<SweepState>("state", v)).collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let after = given(&p.after).map(|t| parse::<PageToken<SweepId>>("after", t)).transpose()?;
    let page = d.sweeps.list(&states, page_size(p.limit)?, after, &caller.scope()).await?;
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

/// One sweep, read as `GetSweep` reads it (with its leaderboard), with its
/// ASHA decisions and definition.
async fn sweep(State(d): State<Dashboard>, Extension(caller): Extension<Identity>, Path(id): Path<String>) -> ApiResult {
    let id: SweepId = parse("sweep id", &id)?;
    let report = d.sweeps.get(id, &caller.scope()).await?;
    let decisions = d.store.asha_decisions(id).await?;
    let best = report.best().map(|t| t.index);
    let mut v = sweep_json(&report.sweep);
    v["leaderboard"] = report.leaderboard.iter().map(trial_json).collect();
    v["best_trial"] = json!(best);
    v["asha_decisions"] = json!(decisions);
    v["definition"] = report.sweep.definition.clone();
    Ok(Json(v))
}

async fn sweep_curves(
    State(d): State<Dashboard>,
    Extension(caller): Extension<Identity>,
    Path(id): Path<String>,
) -> ApiResult {
    let sweep = d.sweeps.find(parse("sweep id", &id)?, &caller.scope()).await?;
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
