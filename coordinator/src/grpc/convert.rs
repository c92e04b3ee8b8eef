//! Conversions between ptune.v1 messages and the coordinator's domain types.
//! Decoding errors name the request field at fault.

use chrono::{DateTime, SecondsFormat, Utc};
use ptune_core::sweep::SweepState;
use ptune_core::{bounds, JobId, JobSpec, Metric, MetricKind, SweepId, WorkerId};
use ptune_proto::convert::{method_from_wire, state_from_wire, sweep_state_from_wire};
use ptune_proto::v1;

use crate::cursor::JobCursor;
use crate::error::Error;
use crate::model::{
    AdvertisedModel, CheckpointInfo, CheckpointUpload, Completion, DatasetInfo, DatasetRef, Device, Failure, Job, JobEvent,
    JobFilter, JobReport, Lease, LeaseRef, LeaseRequest, PageToken, ProgressReport, Release, StopSignal, Sweep,
    SweepReport, Trial, TrialCounts, WorkerRegistration,
};
use crate::store::WorkerView;

/// Largest step or epoch the store can hold.
const MAX_COUNTER: u64 = i64::MAX as u64;

pub fn job_id(value: &str, field: &str) -> Result<JobId, Error> {
    value.parse().map_err(|e| Error::invalid(field, e))
}

pub fn sweep_id(value: &str) -> Result<SweepId, Error> {
    value.parse().map_err(|e| Error::invalid("sweep_id", e))
}

pub fn worker_id(value: &str) -> Result<WorkerId, Error> {
    value.parse().map_err(|e| Error::invalid("worker_id", e))
}

pub fn dataset_ref(value: &str) -> Result<DatasetRef, Error> {
    value.parse().map_err(|e| Error::invalid("reference", e))
}

fn counter(value: u64, field: &str) -> Result<u64, Error> {
    if value > MAX_COUNTER {
        return Err(Error::invalid(field, format!("must be at most {MAX_COUNTER}, got {value}")));
    }
    Ok(value)
}

/// A spec and whether it asked for the coordinator's default attempts
/// (proto3 cannot tell 0 from unset).
pub fn job_spec(spec: Option<v1::JobSpec>) -> Result<(JobSpec, bool), Error> {
    let spec = spec.ok_or_else(|| Error::invalid("spec", "must be set"))?;
    let default_attempts = spec.max_attempts == 0;
    Ok((JobSpec::try_from(spec)?, default_attempts))
}

/// One item of a `SubmitJobs` answer: the stored job's id, or the error a
/// single `SubmitJob` would have failed with.
pub fn submit_result(result: Result<JobId, Error>) -> v1::SubmitJobsResult {
    match result {
        Ok(id) => v1::SubmitJobsResult { job_id: id.to_string(), error: None },
        Err(e) => {
            let field = match &e {
                Error::InvalidArgument { field, .. } => field.clone(),
                _ => String::new(),
            };
            let status = tonic::Status::from(e);
            let message = match status.message().split_once(": ") {
                Some((prefix, rest)) if !field.is_empty() && prefix == field => rest.to_string(),
                _ => status.message().to_string(),
            };
            let code = code_name(status.code()).to_string();
            v1::SubmitJobsResult { job_id: String::new(), error: Some(v1::ItemError { code, field, message }) }
        }
    }
}

/// The canonical name of a gRPC status code.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

pub fn metric_kind(value: &str) -> Result<Option<MetricKind>, Error> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|e| Error::invalid("kind", e))
}

/// Most metrics one report may carry.
const MAX_METRICS_PER_CALL: usize = 100_000;

pub fn metrics(values: Vec<v1::Metric>) -> Result<Vec<Metric>, Error> {
    if values.len() > MAX_METRICS_PER_CALL {
        return Err(Error::invalid("metrics", format!("at most {MAX_METRICS_PER_CALL} per call, got {}", values.len())));
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let step = counter(m.step, &format!("metrics[{i}].step"))?;
            let metric = Metric::try_from(m)
                .map_err(|e| Error::invalid(e.field.replacen("metrics", &format!("metrics[{i}]"), 1), e.message))?;
            Ok(Metric { step, ..metric })
        })
        .collect()
}

/// Filters, page size and page position of a listing.
pub fn list_query(req: v1::ListJobsRequest) -> Result<(JobFilter, u32, Option<JobCursor>), Error> {
    let states = req.states.iter().filter_map(|&s| state_from_wire(s).transpose()).collect::<Result<Vec<_>, _>>()?;
    if !req.base_model.is_empty() {
        bounds::folder_name("base_model", &req.base_model)?;
    }
    bounds::line("name_prefix", &req.name_prefix, 128)?;
    bounds::line("owner", &req.owner, 64)?;
    let non_empty = |s: String| Some(s).filter(|s| !s.is_empty());
    let filter = JobFilter {
        states,
        base_model: non_empty(req.base_model),
        method: method_from_wire(req.method)?,
        name_prefix: non_empty(req.name_prefix),
        owner: non_empty(req.owner),
        sweep_id: match req.sweep_id.as_str() {
            "" => None,
            id => Some(sweep_id(id)?),
        },
    };
    let after = match req.page_token.as_str() {
        "" => None,
        token => {
            Some(JobCursor::decode(token, &filter.listing()).map_err(|e| Error::invalid("page_token", e.message()))?)
        }
    };
    Ok((filter, req.page_size, after))
}

pub fn registration(req: v1::RegisterWorkerRequest) -> Result<WorkerRegistration, Error> {
    let worker_id = match req.worker_id.as_str() {
        "" => None,
        id => Some(worker_id(id)?),
    };
    bounds::line("hostname", &req.hostname, 253)?;
    if req.devices.len() > 64 {
        return Err(Error::invalid("devices", format!("at most 64 devices, got {}", req.devices.len())));
    }
    for (i, d) in req.devices.iter().enumerate() {
        bounds::line(&format!("devices[{i}].name"), &d.name, 64)?;
        if d.name.trim().is_empty() {
            return Err(Error::invalid(format!("devices[{i}].name"), "must not be empty, e.g. \"cuda:0\""));
        }
        if req.devices[..i].iter().any(|other| other.name == d.name) {
            return Err(Error::invalid(format!("devices[{i}].name"), format!("{:?} is listed twice", d.name)));
        }
        counter(d.memory_bytes, &format!("devices[{i}].memory_bytes"))?;
        counter(d.free_memory_bytes, &format!("devices[{i}].free_memory_bytes"))?;
    }
    if req.slots > 1024 {
        return Err(Error::invalid("slots", format!("must be at most 1024, got {}", req.slots)));
    }
    if req.models.len() > 1000 {
        return Err(Error::invalid("models", format!("at most 1000 models, got {}", req.models.len())));
    }
    for (i, m) in req.models.iter().enumerate() {
        bounds::folder_name(&format!("models[{i}].name"), &m.name)?;
        bounds::line(&format!("models[{i}].model_type"), &m.model_type, 64)?;
        bounds::line(&format!("models[{i}].sha256"), &m.sha256, 64)?;
        bounds::line(&format!("models[{i}].unsupported_reason"), &m.unsupported_reason, 1000)?;
    }
    Ok(WorkerRegistration {
        worker_id,
        hostname: req.hostname,
        devices: req
            .devices
            .into_iter()
            .map(|d| Device { name: d.name, memory_bytes: d.memory_bytes, free_memory_bytes: d.free_memory_bytes })
            .collect(),
        slots: req.slots,
        models: req
            .models
            .into_iter()
            .map(|m| AdvertisedModel {
                name: m.name,
                sha256: m.sha256,
                model_type: m.model_type,
                max_positions: m.max_positions,
                hidden_size: m.hidden_size,
                num_layers: m.num_layers,
                num_attention_heads: m.num_attention_heads,
                parameters: m.parameters,
                unsupported_reason: Some(m.unsupported_reason).filter(|r| !r.trim().is_empty()),
            })
            .collect(),
        memory_bytes: known(counter(req.memory_bytes, "memory_bytes")?),
    })
}

/// `None` for a size the sender left at 0 (unknown).
fn known(bytes: u64) -> Option<u64> {
    (bytes > 0).then_some(bytes)
}

/// The worker, its free slots and the models it holds in memory.
pub fn lease_request(req: v1::LeaseJobRequest) -> Result<LeaseRequest, Error> {
    lease_ask(req, "")
}

/// What a worker asks for in a lease request, its fields named after `prefix`.
fn lease_ask(req: v1::LeaseJobRequest, prefix: &str) -> Result<LeaseRequest, Error> {
    let worker = req.worker_id.parse().map_err(|e| Error::invalid(format!("{prefix}worker_id"), e))?;
    if req.loaded_models.len() > 1000 {
        return Err(Error::invalid(
            format!("{prefix}loaded_models"),
            format!("at most 1000, got {}", req.loaded_models.len()),
        ));
    }
    for (i, m) in req.loaded_models.iter().enumerate() {
        bounds::folder_name(&format!("{prefix}loaded_models[{i}]"), m)?;
    }
    Ok(LeaseRequest {
        worker,
        free_slots: req.free_slots,
        loaded: req.loaded_models,
        wait: std::time::Duration::from_millis(u64::from(req.wait_ms)),
    })
}

/// The next lease a completion asks for (`CompleteJobHeader.next`), which
/// never waits.
pub fn next_lease(next: Option<v1::LeaseJobRequest>) -> Result<Option<LeaseRequest>, Error> {
    let Some(next) = next else { return Ok(None) };
    if next.wait_ms != 0 {
        return Err(Error::invalid(
            "next.wait_ms",
            format!("must be 0 (a completion answers at once; call LeaseJob to wait for work), got {}", next.wait_ms),
        ));
    }
    lease_ask(next, "next.").map(Some)
}

/// A lease named by a worker, with the hash of the lease token it presents.
pub fn lease_ref(job: &str, epoch: u64, token: &str, field: &str) -> Result<LeaseRef, Error> {
    if token.len() > 128 {
        return Err(Error::invalid("lease_token", "must be the lease_token of the Lease, at most 128 characters"));
    }
    Ok(LeaseRef { job_id: job_id(job, field)?, epoch, token_hash: crate::auth::tokens::lease_token_hash(token) })
}

pub fn lease_refs(leases: Vec<v1::LeaseRef>) -> Result<Vec<LeaseRef>, Error> {
    if leases.len() > 10_000 {
        return Err(Error::invalid("leases", format!("at most 10000 leases, got {}", leases.len())));
    }
    leases
        .iter()
        .enumerate()
        .map(|(i, l)| lease_ref(&l.job_id, l.epoch, &l.lease_token, &format!("leases[{i}].job_id")))
        .collect()
}

pub fn progress(req: v1::ReportProgressRequest) -> Result<ProgressReport, Error> {
    Ok(ProgressReport {
        lease: lease_ref(&req.job_id, req.epoch, &req.lease_token, "job_id")?,
        step: counter(req.step, "step")?,
        total_steps: counter(req.total_steps, "total_steps")?,
        metrics: metrics(req.metrics)?,
    })
}

pub fn completion(header: v1::CompleteJobHeader) -> Result<Completion, Error> {
    let sha256 = sha256_hex(&header.adapter_sha256, "adapter_sha256")?;
    Ok(Completion {
        lease: lease_ref(&header.job_id, header.epoch, &header.lease_token, "job_id")?,
        adapter_sha256: sha256,
        adapter_size: header.adapter_size,
        metrics: metrics(header.metrics)?,
        step: counter(header.step, "step")?,
        peak_rss_bytes: known(counter(header.peak_rss_bytes, "peak_rss_bytes")?),
    })
}

/// A text a worker reports (an error, a reason): control characters other
/// than newlines and tabs become spaces, and it is cut to `max_chars`.
fn reported_text(text: &str, max_chars: usize) -> String {
    text.chars()
        .take(max_chars)
        .map(|c| if (c.is_control() && c != '\n' && c != '\t') || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}') { ' ' } else { c })
        .collect()
}

pub fn failure(req: v1::FailJobRequest) -> Result<Failure, Error> {
    Ok(Failure {
        lease: lease_ref(&req.job_id, req.epoch, &req.lease_token, "job_id")?,
        error: reported_text(&req.error, 10_000),
        cancelled: req.cancelled,
        retryable: req.retryable,
        infrastructure: req.infrastructure,
    })
}

/// Longest `unhealthy_reason` a heartbeat may carry.
const MAX_REASON_CHARS: usize = 1000;

pub fn unhealthy_reason(reason: &str) -> Result<String, Error> {
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(Error::invalid("unhealthy_reason", format!("must be at most {MAX_REASON_CHARS} characters")));
    }
    Ok(reported_text(reason, MAX_REASON_CHARS))
}

pub fn release(req: v1::ReleaseJobRequest) -> Result<Release, Error> {
    Ok(Release { lease: lease_ref(&req.job_id, req.epoch, &req.lease_token, "job_id")?, reason: reported_text(&req.reason, 1000) })
}

fn sha256_hex(value: &str, field: &str) -> Result<String, Error> {
    let sha256 = value.trim().to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(field, "must be the 64 hex digits of the archive's sha256"));
    }
    Ok(sha256)
}

pub fn checkpoint_upload(header: v1::CheckpointHeader) -> Result<CheckpointUpload, Error> {
    Ok(CheckpointUpload {
        lease: lease_ref(&header.job_id, header.epoch, &header.lease_token, "job_id")?,
        info: CheckpointInfo {
            step: counter(header.step, "step")?,
            sha256: sha256_hex(&header.sha256, "sha256")?,
            size: header.size,
        },
    })
}

pub fn checkpoint_info(info: &CheckpointInfo) -> v1::CheckpointInfo {
    v1::CheckpointInfo { step: info.step, sha256: info.sha256.clone(), size: info.size }
}

fn timestamp(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)).unwrap_or_default()
}

/// A job with why it waits.
pub fn job_report(report: &JobReport) -> v1::Job {
    v1::Job { waiting_reason: report.waiting_reason.clone().unwrap_or_default(), ..job(&report.job) }
}

pub fn job(job: &Job) -> v1::Job {
    v1::Job {
        id: job.id.to_string(),
        spec: Some(v1::JobSpec::from(&job.spec)),
        state: v1::JobState::from(job.state) as i32,
        error: job.error.clone(),
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        step: job.step,
        total_steps: job.total_steps,
        latest_metrics: job.latest_metrics.iter().map(v1::Metric::from).collect(),
        worker_id: job.worker_id.map(|w| w.to_string()).unwrap_or_default(),
        created_at: timestamp(Some(job.created_at)),
        started_at: timestamp(job.started_at),
        finished_at: timestamp(job.finished_at),
        cancel_requested: job.cancel_requested,
        adapter_sha256: job.adapter.as_ref().map(|a| a.sha256.clone()).unwrap_or_default(),
        adapter_size_bytes: job.adapter.as_ref().map_or(0, |a| a.size),
        sweep_id: job.trial.map(|t| t.sweep_id.to_string()).unwrap_or_default(),
        trial_index: job.trial.map_or(0, |t| t.index),
        early_stopped: job.early_stopped,
        waiting_reason: String::new(),
        memory_estimate_bytes: job.memory_estimate.map_or(0, |e| e.total_bytes()),
        worker_peak_rss_bytes: job.worker_peak_rss_bytes.unwrap_or(0),
        failures: job.failures,
        interruptions: job.interruptions,
        retry_at: timestamp(job.retry_at.filter(|_| job.state == ptune_core::JobState::Queued)),
        checkpoint_step: job.checkpoint_step.unwrap_or(0),
        devices: job.devices.clone(),
    }
}

pub fn worker_info(w: &WorkerView) -> v1::WorkerInfo {
    let models = w.models.0.as_array().into_iter().flatten();
    v1::WorkerInfo {
        worker_id: w.id.to_string(),
        hostname: w.hostname.clone(),
        online: w.online,
        slots: u32::try_from(w.slots).unwrap_or(0),
        running: u32::try_from(w.slots_busy).unwrap_or(0),
        models: models.filter_map(|m| m.get("name").and_then(|n| n.as_str()).map(str::to_string)).collect(),
        heartbeat_age_seconds: w.heartbeat_age_seconds,
        unhealthy_reason: w.unhealthy_reason.clone(),
        registered_at: timestamp(Some(w.registered_at)),
        devices: serde_json::from_value::<Vec<Device>>(w.devices.0.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|d| v1::Device { name: d.name, memory_bytes: d.memory_bytes, free_memory_bytes: d.free_memory_bytes })
            .collect(),
    }
}

pub fn job_event(event: JobEvent) -> v1::JobEvent {
    use v1::job_event::Event;
    let event = match event {
        JobEvent::Snapshot(j) => Event::Job(job(&j)),
        JobEvent::Progress { step, total_steps } => Event::Progress(v1::Progress { step, total_steps }),
        JobEvent::Metrics(metrics) => {
            Event::Metrics(v1::MetricBatch { metrics: metrics.iter().map(v1::Metric::from).collect() })
        }
    };
    v1::JobEvent { event: Some(event) }
}

pub fn dataset_info(info: &DatasetInfo) -> v1::DatasetInfo {
    v1::DatasetInfo {
        reference: info.reference.to_string(),
        size_bytes: info.size,
        lines: info.lines,
        file_name: info.file_name.clone(),
    }
}

pub fn lease(lease: &Lease) -> v1::Lease {
    v1::Lease {
        job_id: lease.job_id.to_string(),
        epoch: lease.epoch,
        spec: Some(v1::JobSpec::from(&lease.spec)),
        attempt: lease.attempt,
        checkpoint: lease.checkpoint.as_ref().map(checkpoint_info),
        lease_token: lease.lease_token.clone(),
        devices: lease.devices.clone(),
    }
}

/// Leases as the worker named them (the lease token is not sent back).
pub fn lease_refs_to_wire(leases: &[LeaseRef]) -> Vec<v1::LeaseRef> {
    leases.iter().map(|l| v1::LeaseRef { job_id: l.job_id.to_string(), epoch: l.epoch, ..Default::default() }).collect()
}

pub fn stop_signal(signal: StopSignal) -> v1::ReportProgressResponse {
    let reason = match signal {
        StopSignal::Continue => v1::StopReason::Unspecified,
        StopSignal::Cancel => v1::StopReason::Cancelled,
        StopSignal::EarlyStop => v1::StopReason::EarlyStopped,
        StopSignal::Diverged => v1::StopReason::Diverged,
    };
    v1::ReportProgressResponse { stop: signal != StopSignal::Continue, stop_reason: reason as i32 }
}

/// One lease's answer in a progress batch: its stop signal, or the status
/// a single report would have failed with.
pub fn progress_answer(lease: LeaseRef, outcome: Result<StopSignal, Error>) -> v1::ProgressAnswer {
    let (job_id, epoch) = (lease.job_id.to_string(), lease.epoch);
    match outcome {
        Ok(signal) => v1::ProgressAnswer { job_id, epoch, recorded: Some(stop_signal(signal)), ..Default::default() },
        Err(e) => {
            let status = tonic::Status::from(e);
            v1::ProgressAnswer {
                job_id,
                epoch,
                recorded: None,
                error_code: status.code() as i32,
                error_message: status.message().to_string(),
            }
        }
    }
}

/// The definition JSON of a CreateSweep request.
/// Largest sweep definition accepted.
const MAX_DEFINITION_BYTES: usize = 1 << 20;

pub fn sweep_definition(json: &str) -> Result<serde_json::Value, Error> {
    if json.len() > MAX_DEFINITION_BYTES {
        return Err(Error::invalid("definition_json", format!("must be at most {MAX_DEFINITION_BYTES} bytes, got {}", json.len())));
    }
    match serde_json::from_str(json) {
        Ok(value @ serde_json::Value::Object(_)) => {
            bounds::json_strings("definition_json", &value, 10_000)?;
            Ok(value)
        }
        Ok(_) => Err(Error::invalid("definition_json", "must be a JSON object (the sweep file as JSON)")),
        Err(e) => Err(Error::invalid("definition_json", format!("is not valid JSON: {e}"))),
    }
}

/// States, page size and page position of a sweep listing.
pub type SweepListQuery = (Vec<SweepState>, u32, Option<PageToken<SweepId>>);

pub fn sweep_list_query(req: v1::ListSweepsRequest) -> Result<SweepListQuery, Error> {
    let states =
        req.states.iter().filter_map(|&s| sweep_state_from_wire(s).transpose()).collect::<Result<Vec<_>, _>>()?;
    let after = match req.page_token.as_str() {
        "" => None,
        token => Some(token.parse().map_err(|e| Error::invalid("page_token", e))?),
    };
    Ok((states, req.page_size, after))
}

fn trial_counts(c: &TrialCounts) -> v1::TrialCounts {
    v1::TrialCounts {
        queued: c.queued,
        running: c.running,
        succeeded: c.succeeded,
        early_stopped: c.early_stopped,
        failed: c.failed,
        cancelled: c.cancelled,
        diverged: c.diverged,
    }
}

pub fn trial(t: &Trial) -> v1::Trial {
    v1::Trial {
        index: t.index,
        job_id: t.job_id.to_string(),
        params_json: t.params.to_json().to_string(),
        state: v1::TrialState::from(t.state) as i32,
        failure_reason: t.failure_reason.map(|r| r.as_str().to_string()).unwrap_or_default(),
        stopped_rung: t.stopped_rung,
        objective: t.objective,
        objective_step: t.objective_step.unwrap_or(0),
        step: t.step,
        total_steps: t.total_steps,
        rank: t.rank.unwrap_or(0),
        error: t.error.clone(),
        adapter_sha256: t.adapter.as_ref().map(|a| a.sha256.clone()).unwrap_or_default(),
        created_at: timestamp(Some(t.created_at)),
        finished_at: timestamp(t.finished_at),
    }
}

/// A sweep without its leaderboard, with its best trial.
pub fn sweep_summary(s: &Sweep, best: Option<&Trial>) -> v1::Sweep {
    v1::Sweep {
        id: s.id.to_string(),
        name: s.name.clone(),
        owner: s.owner.clone(),
        description: s.description.clone(),
        state: v1::SweepState::from(s.state) as i32,
        algorithm: v1::SweepAlgorithm::from(s.algorithm) as i32,
        objective_metric: s.objective.metric.clone(),
        objective_direction: v1::ObjectiveDirection::from(s.objective.direction) as i32,
        max_concurrent_trials: s.max_concurrent_trials,
        max_failed_trials: s.max_failed_trials,
        trial_budget: s.trial_budget,
        trials_created: s.trials_created,
        counts: Some(trial_counts(&s.counts)),
        rung_steps: s.plan.as_ref().map(|p| p.rungs.clone()).unwrap_or_default(),
        max_steps: s.plan.as_ref().map_or(0, |p| p.max_steps),
        error: s.error.clone(),
        created_at: timestamp(Some(s.created_at)),
        finished_at: timestamp(s.finished_at),
        definition_json: s.definition.to_string(),
        best_trial: best.map(trial),
        leaderboard: Vec::new(),
    }
}

/// A sweep with its best trial, and its leaderboard when `with_leaderboard`.
pub fn sweep(report: &SweepReport, with_leaderboard: bool) -> v1::Sweep {
    let mut wire = sweep_summary(&report.sweep, report.best());
    if with_leaderboard {
        wire.leaderboard = report.leaderboard.iter().map(trial).collect();
    }
    wire
}
