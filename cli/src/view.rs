//! What the CLI shows of coordinator messages, in JSON and as text.

use ptune_core::JobState;
use ptune_proto::convert::{method_from_wire, state_from_wire};
use ptune_proto::v1;
use serde::Serialize;

/// A job as the CLI prints it with `--output json`.
#[derive(Debug, Serialize)]
pub struct JobView {
    pub id: String,
    pub name: String,
    pub state: String,
    pub method: String,
    pub base_model: String,
    pub owner: String,
    pub step: u64,
    pub total_steps: u64,
    pub attempts: u32,
    pub max_attempts: u32,
    pub error: String,
    pub worker_id: String,
    pub cancel_requested: bool,
    pub created_at: String,
    pub started_at: String,
    pub finished_at: String,
    pub adapter_sha256: String,
    pub adapter_size_bytes: u64,
    pub metrics: Vec<MetricView>,
    pub spec: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct MetricView {
    pub step: u64,
    pub kind: String,
    pub name: String,
    pub value: f64,
}

impl From<&v1::Metric> for MetricView {
    fn from(m: &v1::Metric) -> Self {
        MetricView { step: m.step, kind: m.kind.clone(), name: m.name.clone(), value: m.value }
    }
}

pub fn state_name(state: i32) -> String {
    match state_from_wire(state) {
        Ok(Some(s)) => s.to_string(),
        _ => "unknown".into(),
    }
}

pub fn job_state(job: &v1::Job) -> Option<JobState> {
    state_from_wire(job.state).ok().flatten()
}

impl JobView {
    pub fn new(job: &v1::Job, with_spec: bool) -> Self {
        let spec = job.spec.clone().unwrap_or_default();
        let method = method_from_wire(spec.method).ok().flatten().map(|m| m.to_string()).unwrap_or_default();
        let domain_spec = if with_spec { ptune_core::JobSpec::try_from(spec.clone()).ok().map(|s| s.to_json()) } else { None };
        JobView {
            id: job.id.clone(),
            name: spec.name.clone(),
            state: state_name(job.state),
            method,
            base_model: spec.base_model.clone(),
            owner: spec.owner.clone(),
            step: job.step,
            total_steps: job.total_steps,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            error: job.error.clone(),
            worker_id: job.worker_id.clone(),
            cancel_requested: job.cancel_requested,
            created_at: job.created_at.clone(),
            started_at: job.started_at.clone(),
            finished_at: job.finished_at.clone(),
            adapter_sha256: job.adapter_sha256.clone(),
            adapter_size_bytes: job.adapter_size_bytes,
            metrics: job.latest_metrics.iter().map(MetricView::from).collect(),
            spec: domain_spec,
        }
    }
}

/// Latest value of a metric of a kind, if reported.
pub fn latest(job: &v1::Job, kind: &str, name: &str) -> Option<f64> {
    job.latest_metrics.iter().find(|m| m.kind == kind && m.name == name).map(|m| m.value)
}
