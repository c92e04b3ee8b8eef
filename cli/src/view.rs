//! What the CLI shows of coordinator messages, in JSON and as text.

use ptune_core::sweep::TrialState;
use ptune_core::JobState;
use ptune_proto::convert::{
    algorithm_name, direction_from_wire, method_from_wire, state_from_wire, sweep_state_from_wire, trial_state_from_wire,
};
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
    /// Attempts that failed with an error of the job (at most `max_attempts`).
    pub failures: u32,
    /// Attempts lost to the infrastructure (lost, drained or failing workers).
    pub interruptions: u32,
    /// A queued job backing off after an error is not leased before this time.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub retry_at: String,
    /// Steps of the newest stored checkpoint, where the next attempt resumes.
    pub checkpoint_step: u64,
    pub error: String,
    pub worker_id: String,
    /// The worker's devices the latest attempt got, e.g. `["cuda:1"]`.
    pub devices: Vec<String>,
    pub cancel_requested: bool,
    pub created_at: String,
    pub started_at: String,
    pub finished_at: String,
    pub adapter_sha256: String,
    pub adapter_size_bytes: u64,
    /// The sweep this job is a trial of, and its trial number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trial_index: Option<u32>,
    pub early_stopped: bool,
    /// Why a queued job is not being trained (empty when it merely waits for a slot).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub waiting_reason: String,
    /// The coordinator's estimate of the memory the job needs, once known.
    pub memory_estimate_bytes: Option<u64>,
    /// Peak resident memory of the worker process that completed the job.
    pub worker_peak_rss_bytes: Option<u64>,
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
            failures: job.failures,
            interruptions: job.interruptions,
            retry_at: job.retry_at.clone(),
            checkpoint_step: job.checkpoint_step,
            error: job.error.clone(),
            worker_id: job.worker_id.clone(),
            devices: job.devices.clone(),
            cancel_requested: job.cancel_requested,
            created_at: job.created_at.clone(),
            started_at: job.started_at.clone(),
            finished_at: job.finished_at.clone(),
            adapter_sha256: job.adapter_sha256.clone(),
            adapter_size_bytes: job.adapter_size_bytes,
            sweep_id: Some(job.sweep_id.clone()).filter(|s| !s.is_empty()),
            trial_index: (!job.sweep_id.is_empty()).then_some(job.trial_index),
            early_stopped: job.early_stopped,
            waiting_reason: job.waiting_reason.clone(),
            memory_estimate_bytes: Some(job.memory_estimate_bytes).filter(|&b| b > 0),
            worker_peak_rss_bytes: Some(job.worker_peak_rss_bytes).filter(|&b| b > 0),
            metrics: job.latest_metrics.iter().map(MetricView::from).collect(),
            spec: domain_spec,
        }
    }
}

/// `estimate 125 MiB, worker peak 321 MiB`, each part when known.
pub fn memory_line(view: &JobView) -> Option<String> {
    let parts: Vec<String> = [("estimate", view.memory_estimate_bytes), ("worker peak", view.worker_peak_rss_bytes)]
        .into_iter()
        .filter_map(|(what, bytes)| Some(format!("{what} {} MiB", ptune_core::memory::mib(bytes?))))
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// `3 (1 failed of at most 3, 1 interrupted)`: leases so far and why they ended.
pub fn attempts_line(view: &JobView) -> String {
    let mut line = format!("{} ({} failed of at most {}", view.attempts, view.failures, view.max_attempts);
    if view.interruptions > 0 {
        line.push_str(&format!(", {} interrupted", view.interruptions));
    }
    line.push(')');
    if view.checkpoint_step > 0 {
        line.push_str(&format!("; next attempt resumes at step {}", view.checkpoint_step));
    }
    line
}

/// A worker as the CLI prints it with `--output json`.
#[derive(Debug, Serialize)]
pub struct WorkerView {
    pub worker_id: String,
    pub hostname: String,
    pub online: bool,
    pub slots: u32,
    pub running: u32,
    pub models: Vec<String>,
    /// Its devices with their memory, as it registered them.
    pub devices: Vec<DeviceView>,
    pub heartbeat_age_seconds: f64,
    /// Why it takes no new jobs; empty while healthy.
    pub unhealthy_reason: String,
    pub registered_at: String,
}

impl From<&v1::WorkerInfo> for WorkerView {
    fn from(w: &v1::WorkerInfo) -> Self {
        WorkerView {
            worker_id: w.worker_id.clone(),
            hostname: w.hostname.clone(),
            online: w.online,
            slots: w.slots,
            running: w.running,
            models: w.models.clone(),
            devices: w
                .devices
                .iter()
                .map(|d| DeviceView {
                    name: d.name.clone(),
                    memory_bytes: d.memory_bytes,
                    free_memory_bytes: d.free_memory_bytes,
                })
                .collect(),
            heartbeat_age_seconds: w.heartbeat_age_seconds,
            unhealthy_reason: w.unhealthy_reason.clone(),
            registered_at: w.registered_at.clone(),
        }
    }
}

/// A worker's device as the CLI prints it with `--output json`.
#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub name: String,
    /// Bytes jobs on it may use (0: unknown).
    pub memory_bytes: u64,
    /// Bytes free when the worker registered (0: unknown).
    pub free_memory_bytes: u64,
}

impl std::fmt::Display for DeviceView {
    /// `cuda:0 (80.0 GiB)`, or the name alone when the memory is unknown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.memory_bytes {
            0 => write!(f, "{}", self.name),
            bytes => write!(f, "{} ({:.1} GiB)", self.name, bytes as f64 / f64::from(1u32 << 30)),
        }
    }
}

/// Latest value of a metric of a kind, if reported.
pub fn latest(job: &v1::Job, kind: &str, name: &str) -> Option<f64> {
    job.latest_metrics.iter().find(|m| m.kind == kind && m.name == name).map(|m| m.value)
}

/// The evaluation metric a job's task is judged by, and how to label it:
/// accuracy for sequence classification, entity F1 for token
/// classification, BLEU for causal LM.
pub fn headline_metric(job: &v1::Job) -> (&'static str, &'static str) {
    let task = job.spec.as_ref().map_or(0, |spec| spec.task);
    match v1::Task::try_from(task) {
        Ok(v1::Task::TokenClassification) => ("f1", "f1"),
        Ok(v1::Task::CausalLm) => ("bleu", "bleu"),
        _ => ("accuracy", "acc"),
    }
}

/// The latest value of the job's headline eval metric, labelled, e.g. `acc 0.8125`.
pub fn headline(job: &v1::Job) -> Option<String> {
    let (name, label) = headline_metric(job);
    latest(job, "eval", name).map(|value| format!("{label} {value:.4}"))
}

/// A sweep as the CLI prints it with `--output json`.
#[derive(Debug, Serialize)]
pub struct SweepView {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub description: String,
    pub state: String,
    pub algorithm: String,
    pub objective_metric: String,
    pub objective_direction: String,
    pub max_concurrent_trials: u32,
    pub max_failed_trials: Option<u32>,
    pub trial_budget: u32,
    pub trials_created: u32,
    pub counts: CountsView,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rung_steps: Vec<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    pub error: String,
    pub created_at: String,
    pub finished_at: String,
    pub best_trial: Option<TrialView>,
    /// Every trial, best first (`sweep status`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leaderboard: Vec<TrialView>,
}

#[derive(Debug, Default, Serialize)]
pub struct CountsView {
    pub queued: u32,
    pub running: u32,
    pub succeeded: u32,
    pub early_stopped: u32,
    pub failed: u32,
    pub cancelled: u32,
    pub diverged: u32,
}

/// One trial of a sweep.
#[derive(Clone, Debug, Serialize)]
pub struct TrialView {
    /// 1 for the best; `null` without an objective.
    pub rank: Option<u32>,
    pub trial: u32,
    pub job_id: String,
    pub params: serde_json::Value,
    pub state: String,
    /// The state as the leaderboard shows it: `stopped@rung 1`, `failed (diverged)`.
    pub status: String,
    pub failure_reason: Option<String>,
    pub stopped_rung: Option<u32>,
    pub objective: Option<f64>,
    pub objective_step: Option<u64>,
    pub step: u64,
    pub total_steps: u64,
    pub error: String,
    pub adapter_sha256: String,
    pub created_at: String,
    pub finished_at: String,
}

impl TrialView {
    pub fn new(t: &v1::Trial) -> Self {
        let state = trial_state_from_wire(t.state);
        let status = match state {
            Some(TrialState::EarlyStopped) => match t.stopped_rung {
                Some(rung) => format!("stopped@rung {rung}"),
                None => "stopped early".to_string(),
            },
            Some(TrialState::Failed) if !t.failure_reason.is_empty() => format!("failed ({})", t.failure_reason),
            Some(s) => s.to_string(),
            None => "unknown".to_string(),
        };
        TrialView {
            rank: (t.rank > 0).then_some(t.rank),
            trial: t.index,
            job_id: t.job_id.clone(),
            params: serde_json::from_str(&t.params_json).unwrap_or(serde_json::Value::Null),
            state: state.map_or_else(|| "unknown".to_string(), |s| s.to_string()),
            status,
            failure_reason: Some(t.failure_reason.clone()).filter(|r| !r.is_empty()),
            stopped_rung: t.stopped_rung,
            objective: t.objective,
            objective_step: t.objective.map(|_| t.objective_step),
            step: t.step,
            total_steps: t.total_steps,
            error: t.error.clone(),
            adapter_sha256: t.adapter_sha256.clone(),
            created_at: t.created_at.clone(),
            finished_at: t.finished_at.clone(),
        }
    }

    /// Parameters as `path=value` pairs, for tables.
    pub fn params_text(&self) -> String {
        match &self.params {
            serde_json::Value::Object(map) => {
                map.iter().map(|(k, v)| format!("{}={}", short_path(k), value_text(v))).collect::<Vec<_>>().join(" ")
            }
            other => other.to_string(),
        }
    }
}

/// The last segment of a spec path (`training.learning_rate` -> `learning_rate`).
fn short_path(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// A parameter value without JSON quotes around strings.
pub fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl SweepView {
    pub fn new(s: &v1::Sweep) -> Self {
        let counts = s.counts.unwrap_or_default();
        let state = match sweep_state_from_wire(s.state) {
            Ok(Some(state)) => state.to_string(),
            _ => "unknown".into(),
        };
        SweepView {
            id: s.id.clone(),
            name: s.name.clone(),
            owner: s.owner.clone(),
            description: s.description.clone(),
            state,
            algorithm: algorithm_name(s.algorithm).to_string(),
            objective_metric: s.objective_metric.clone(),
            objective_direction: direction_from_wire(s.objective_direction).map(|d| d.to_string()).unwrap_or_default(),
            max_concurrent_trials: s.max_concurrent_trials,
            max_failed_trials: s.max_failed_trials,
            trial_budget: s.trial_budget,
            trials_created: s.trials_created,
            counts: CountsView {
                queued: counts.queued,
                running: counts.running,
                succeeded: counts.succeeded,
                early_stopped: counts.early_stopped,
                failed: counts.failed,
                cancelled: counts.cancelled,
                diverged: counts.diverged,
            },
            rung_steps: s.rung_steps.clone(),
            max_steps: (s.max_steps > 0).then_some(s.max_steps),
            error: s.error.clone(),
            created_at: s.created_at.clone(),
            finished_at: s.finished_at.clone(),
            best_trial: s.best_trial.as_ref().map(TrialView::new),
            leaderboard: s.leaderboard.iter().map(TrialView::new).collect(),
        }
    }

    /// Finished trials (any way) out of the budget.
    pub fn finished(&self) -> u32 {
        let c = &self.counts;
        c.succeeded + c.early_stopped + c.failed + c.cancelled
    }
}
