//! Conversions between ptune.v1 messages and the coordinator's domain types.
//! Decoding errors name the request field at fault.

use chrono::{DateTime, SecondsFormat, Utc};
use ptune_core::{JobId, JobSpec, Metric, MetricKind, WorkerId};
use ptune_proto::convert::{method_from_wire, state_from_wire};
use ptune_proto::v1;

use crate::error::Error;
use crate::model::{
    BaseModel, Completion, DatasetInfo, DatasetRef, Device, Failure, Job, JobEvent, JobFilter, Lease, LeaseRef,
    PageToken, ProgressReport, WorkerRegistration,
};

/// Largest step or epoch the store can hold.
const MAX_COUNTER: u64 = i64::MAX as u64;

pub fn job_id(value: &str, field: &str) -> Result<JobId, Error> {
    value.parse().map_err(|e| Error::invalid(field, e))
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

pub fn metric_kind(value: &str) -> Result<Option<MetricKind>, Error> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|e| Error::invalid("kind", e))
}

pub fn metrics(values: Vec<v1::Metric>) -> Result<Vec<Metric>, Error> {
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
pub fn list_query(req: v1::ListJobsRequest) -> Result<(JobFilter, u32, Option<PageToken>), Error> {
    let states = req.states.iter().filter_map(|&s| state_from_wire(s).transpose()).collect::<Result<Vec<_>, _>>()?;
    let non_empty = |s: String| Some(s).filter(|s| !s.is_empty());
    let filter = JobFilter {
        states,
        base_model: non_empty(req.base_model),
        method: method_from_wire(req.method)?,
        name_prefix: non_empty(req.name_prefix),
        owner: non_empty(req.owner),
    };
    let after = match req.page_token.as_str() {
        "" => None,
        token => Some(token.parse().map_err(|e| Error::invalid("page_token", e))?),
    };
    Ok((filter, req.page_size, after))
}

pub fn registration(req: v1::RegisterWorkerRequest) -> Result<WorkerRegistration, Error> {
    let worker_id = match req.worker_id.as_str() {
        "" => None,
        id => Some(worker_id(id)?),
    };
    Ok(WorkerRegistration {
        worker_id,
        hostname: req.hostname,
        devices: req.devices.into_iter().map(|d| Device { name: d.name, memory_bytes: d.memory_bytes }).collect(),
        slots: req.slots,
        models: req
            .models
            .into_iter()
            .map(|m| BaseModel {
                name: m.name,
                sha256: m.sha256,
                model_type: m.model_type,
                max_positions: m.max_positions,
                hidden_size: m.hidden_size,
                num_layers: m.num_layers,
                num_attention_heads: m.num_attention_heads,
                parameters: m.parameters,
            })
            .collect(),
    })
}

pub fn lease_ref(job: &str, epoch: u64, field: &str) -> Result<LeaseRef, Error> {
    Ok(LeaseRef { job_id: job_id(job, field)?, epoch })
}

pub fn lease_refs(leases: Vec<v1::LeaseRef>) -> Result<Vec<LeaseRef>, Error> {
    leases.iter().enumerate().map(|(i, l)| lease_ref(&l.job_id, l.epoch, &format!("leases[{i}].job_id"))).collect()
}

pub fn progress(req: v1::ReportProgressRequest) -> Result<ProgressReport, Error> {
    Ok(ProgressReport {
        lease: lease_ref(&req.job_id, req.epoch, "job_id")?,
        step: counter(req.step, "step")?,
        total_steps: counter(req.total_steps, "total_steps")?,
        metrics: metrics(req.metrics)?,
    })
}

pub fn completion(header: v1::CompleteJobHeader) -> Result<Completion, Error> {
    let sha256 = header.adapter_sha256.trim().to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid("adapter_sha256", "must be the 64 hex digits of the archive's sha256"));
    }
    Ok(Completion {
        lease: lease_ref(&header.job_id, header.epoch, "job_id")?,
        adapter_sha256: sha256,
        adapter_size: header.adapter_size,
        metrics: metrics(header.metrics)?,
        step: counter(header.step, "step")?,
    })
}

pub fn failure(req: v1::FailJobRequest) -> Result<Failure, Error> {
    Ok(Failure {
        lease: lease_ref(&req.job_id, req.epoch, "job_id")?,
        error: req.error,
        cancelled: req.cancelled,
        retryable: req.retryable,
    })
}

fn timestamp(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true)).unwrap_or_default()
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
    }
}

pub fn lease_refs_to_wire(leases: &[LeaseRef]) -> Vec<v1::LeaseRef> {
    leases.iter().map(|l| v1::LeaseRef { job_id: l.job_id.to_string(), epoch: l.epoch }).collect()
}
