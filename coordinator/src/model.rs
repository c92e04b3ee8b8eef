//! Domain types of the coordinator: jobs as stored, sweeps and their trials,
//! workers, leases and datasets. No prost and no SQL types here;
//! `grpc::convert` and `store` translate at the edges.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ptune_core::sweep::{AlgorithmKind, AshaPlan, FailureReason, Objective, Params, SweepState, TrialState};
use ptune_core::{JobId, JobSpec, JobState, MemoryEstimate, Method, ModelFamily, Metric, ModelShape, SweepId, WorkerId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A job as the coordinator knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    /// Why the job failed, or why its last attempt ended; empty otherwise.
    pub error: String,
    pub attempts: u32,
    pub max_attempts: u32,
    pub step: u64,
    pub total_steps: u64,
    /// Latest value of every (kind, name) metric.
    pub latest_metrics: Vec<Metric>,
    /// Worker holding the open lease, if any.
    pub worker_id: Option<WorkerId>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    pub adapter: Option<BlobInfo>,
    /// The sweep and trial number, for a trial of a sweep.
    pub trial: Option<TrialRef>,
    /// The job ended before its last step because its sweep stopped it.
    pub early_stopped: bool,
    /// The memory it needs on a worker, once a worker reported its model's shape.
    pub memory_estimate: Option<MemoryEstimate>,
    /// Peak resident memory of the worker process that completed it.
    pub worker_peak_rss_bytes: Option<u64>,
    /// Attempts that failed with an error of the job (they count against `max_attempts`).
    pub failures: u32,
    /// Attempts lost to the infrastructure (they do not).
    pub interruptions: u32,
    /// A queued job backing off after an error is not leased before this time.
    pub retry_at: Option<DateTime<Utc>>,
    /// Steps of its newest stored resume checkpoint.
    pub checkpoint_step: Option<u64>,
    /// The worker's devices its latest attempt got (empty before its first
    /// lease, or on a worker that registered none).
    pub devices: Vec<String>,
}

/// A job as users see it: with why it waits, when it is queued and the
/// registered workers explain that.
#[derive(Clone, Debug, PartialEq)]
pub struct JobReport {
    pub job: Job,
    /// `None` for a queued job that simply waits for a free slot, and for
    /// every job that is not queued.
    pub waiting_reason: Option<String>,
}

/// Which trial of which sweep a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrialRef {
    pub sweep_id: SweepId,
    pub index: u32,
}

/// Hash and size of a stored blob (an adapter archive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// Lowercase hex sha256.
    pub sha256: String,
    pub size: u64,
}

/// Filters of a job listing; `None` and empty mean "any".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobFilter {
    pub states: Vec<JobState>,
    pub base_model: Option<String>,
    pub method: Option<Method>,
    pub name_prefix: Option<String>,
    pub owner: Option<String>,
    pub sweep_id: Option<SweepId>,
}

impl JobFilter {
    /// A canonical text of the filters, which a page token is bound to
    /// (see [`crate::cursor`]).
    pub fn listing(&self) -> String {
        let states: Vec<&str> = self.states.iter().map(|s| s.as_str()).collect();
        format!(
            "jobs newest first; states={states:?} base_model={:?} method={:?} name_prefix={:?} owner={:?} sweep={:?}",
            self.base_model,
            self.method.map(|m| m.as_str()),
            self.name_prefix,
            self.owner,
            self.sweep_id.map(|s| s.0)
        )
    }
}

/// Position after the last row of a page of sweeps, which are ordered by
/// `(created_at, id)` descending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageToken<I> {
    pub created_at: DateTime<Utc>,
    pub id: I,
}

impl<I: Copy + Into<Uuid>> fmt::Display for PageToken<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.created_at.timestamp_micros(), self.id.into().simple())
    }
}

impl<I: FromStr> FromStr for PageToken<I> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || "must be the next_page_token of a previous response".to_string();
        let (micros, id) = s.split_once('.').ok_or_else(bad)?;
        let created_at = micros.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(bad)?;
        let id = id.parse::<I>().map_err(|_| bad())?;
        Ok(PageToken { created_at, id })
    }
}

/// One page of a job listing.
#[derive(Clone, Debug, PartialEq)]
pub struct JobPage {
    pub jobs: Vec<JobReport>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<crate::cursor::JobCursor>,
}

/// A content-addressed dataset reference, `sha256:<64 lowercase hex>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DatasetRef {
    sha256: String,
}

impl DatasetRef {
    pub fn from_sha256(sha256: String) -> Self {
        Self { sha256 }
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

impl fmt::Display for DatasetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.sha256)
    }
}

impl FromStr for DatasetRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.trim().strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "must be a dataset reference sha256:<64 hex digits>, got {s:?}; upload the file with UploadDataset first"
            ));
        }
        Ok(Self { sha256: hex.to_ascii_lowercase() })
    }
}

/// A stored dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetInfo {
    pub reference: DatasetRef,
    pub file_name: String,
    pub size: u64,
    /// Number of non-empty lines.
    pub lines: u64,
}

/// A device of a worker: it runs one engine per device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// "cpu" or "cuda:N".
    pub name: String,
    /// Bytes jobs on it may use; 0 when unknown (every job fits).
    pub memory_bytes: u64,
    /// Bytes free when the worker registered; shown, not placed by.
    #[serde(default)]
    pub free_memory_bytes: u64,
}

/// A base model a worker serves, as it advertises it at registration (the
/// wire's `v1::BaseModel`; the engine's loaded bases are `FrozenEncoder` and
/// `FrozenDecoder`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedModel {
    pub name: String,
    pub sha256: String,
    pub model_type: String,
    /// Largest sequence length the positions allow; 0 when unknown.
    pub max_positions: u32,
    pub hidden_size: u32,
    pub num_layers: u32,
    pub num_attention_heads: u32,
    pub parameters: u64,
    /// Set when the worker found this model but cannot train it: why, and
    /// what is supported. Only `name` and `model_type` are meaningful then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsupported_reason: Option<String>,
}

impl AdvertisedModel {
    /// What the memory estimate needs of the model, when the worker reported
    /// all of it and its type is one this coordinator knows.
    pub fn shape(&self) -> Option<ModelShape> {
        let shape = ModelShape {
            parameters: self.parameters,
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            num_attention_heads: self.num_attention_heads,
            family: ModelFamily::of(&self.model_type)?,
        };
        (self.unsupported_reason.is_none() && shape.is_known()).then_some(shape)
    }
}

/// What the registered workers say about a base model, for admitting jobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSupport {
    /// No worker has registered the model (one may register it later).
    Unknown,
    /// At least one worker trains it; `max_positions` is the smallest known
    /// position limit among them, `model_types` the distinct types they
    /// reported (empty when none did).
    Served { max_positions: Option<u32>, model_types: Vec<String> },
    /// Workers have it, but none can train it.
    Unsupported { model_type: String, reason: String },
}

/// What a worker says about itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerRegistration {
    /// Kept across reconnects; `None` asks for a new id.
    pub worker_id: Option<WorkerId>,
    pub hostname: String,
    pub devices: Vec<Device>,
    pub slots: u32,
    pub models: Vec<AdvertisedModel>,
    /// Bytes it may use for training; `None` when it did not say.
    pub memory_bytes: Option<u64>,
}

/// What a worker asking for a job can take.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerOffer {
    /// Base models it trains.
    pub models: Vec<String>,
    /// Those it holds in memory now: their jobs go first.
    pub loaded: Vec<String>,
    /// The devices jobs are placed on, with the bytes each may use. A worker
    /// that registered none has one unnamed device of the memory it
    /// registered.
    pub devices: Vec<crate::placement::DeviceRoom>,
}

/// The coordinator's answer to a registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registered {
    pub worker_id: WorkerId,
    pub heartbeat_interval: std::time::Duration,
    pub lease_timeout: std::time::Duration,
    /// Largest checkpoint archive the worker may upload.
    pub max_checkpoint_bytes: u64,
}

/// A lease as named by a worker: the job and the epoch (fencing token) it was
/// leased under, and the sha256 of the lease token it presented (the proof
/// that it holds the lease).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    pub job_id: JobId,
    pub epoch: u64,
    pub token_hash: [u8; 32],
}

impl fmt::Display for LeaseRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.job_id, self.epoch)
    }
}

/// A job leased to a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    pub job_id: JobId,
    pub epoch: u64,
    pub spec: JobSpec,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The job's newest stored checkpoint, where the attempt resumes.
    pub checkpoint: Option<CheckpointInfo>,
    /// Proves the lease: only the worker that took it is told.
    pub lease_token: String,
    /// The worker's devices the attempt runs on (`training.devices` of
    /// them); empty for a worker that registered none.
    pub devices: Vec<String>,
}

/// A stored resume checkpoint of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Optimizer steps it holds.
    pub step: u64,
    /// Lowercase hex sha256 of its archive.
    pub sha256: String,
    pub size: u64,
}

/// A checkpoint a lease holder is about to upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointUpload {
    pub lease: LeaseRef,
    pub info: CheckpointInfo,
}

/// A lease handed back by a draining worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub lease: LeaseRef,
    pub reason: String,
}

/// The answer to a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// Leases to stop: cancelled jobs and leases that are no longer valid.
    pub stop: Vec<LeaseRef>,
    /// Leases whose job its sweep stopped early: finish them with their adapter.
    pub early_stop: Vec<LeaseRef>,
    /// False when the worker is not registered (it should register again).
    pub known: bool,
}

/// What a worker is told about a job it reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    /// Keep training.
    Continue,
    /// Cancelled: stop and acknowledge.
    Cancel,
    /// Stopped early by its sweep: stop and complete with the adapter so far.
    EarlyStop,
    /// The coordinator failed the job because its loss diverged: stop at once.
    Diverged,
}

/// A progress report of a leased job.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressReport {
    pub lease: LeaseRef,
    pub step: u64,
    /// 0 keeps the stored plan.
    pub total_steps: u64,
    pub metrics: Vec<Metric>,
}

/// A worker asking for a job (`LeaseJobRequest`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRequest {
    pub worker: WorkerId,
    /// Jobs it has room for now.
    pub free_slots: u32,
    /// Base models it holds in memory now.
    pub loaded: Vec<String>,
    /// How long the call may wait for a job to be queued.
    pub wait: std::time::Duration,
}

/// The end of a successful attempt, before its adapter bytes arrive.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub lease: LeaseRef,
    /// Lowercase hex sha256 the adapter bytes must hash to.
    pub adapter_sha256: String,
    pub adapter_size: u64,
    pub metrics: Vec<Metric>,
    pub step: u64,
    /// The worker process's peak resident memory, when it reported one.
    pub peak_rss_bytes: Option<u64>,
}

/// The end of an unsuccessful attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub lease: LeaseRef,
    pub error: String,
    /// The worker stopped because the job was cancelled.
    pub cancelled: bool,
    /// Another attempt might succeed (false for bad data).
    pub retryable: bool,
    /// The worker, not the job, failed (a full disk, a device error): an interruption.
    pub infrastructure: bool,
}

/// One update of a watched job.
#[derive(Clone, Debug, PartialEq)]
pub enum JobEvent {
    /// Full state: first, and after every state change.
    Snapshot(Box<Job>),
    Progress {
        step: u64,
        total_steps: u64,
    },
    Metrics(Vec<Metric>),
}

/// A sweep as the coordinator knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sweep {
    pub id: SweepId,
    pub name: String,
    pub owner: String,
    pub description: String,
    pub state: SweepState,
    pub algorithm: AlgorithmKind,
    pub objective: Objective,
    pub max_concurrent_trials: u32,
    pub max_failed_trials: Option<u32>,
    /// Trials it creates in all, extensions included.
    pub trial_budget: u32,
    pub trials_created: u32,
    pub counts: TrialCounts,
    /// ASHA's rungs and full length, in steps.
    pub plan: Option<AshaPlan>,
    /// Why it failed; empty otherwise.
    pub error: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The definition as created (JSON of the sweep file).
    pub definition: serde_json::Value,
}

/// Number of trials in each state; `diverged` counts the failed trials whose loss diverged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrialCounts {
    pub queued: u32,
    pub running: u32,
    pub succeeded: u32,
    pub early_stopped: u32,
    pub failed: u32,
    pub cancelled: u32,
    pub diverged: u32,
}

impl TrialCounts {
    pub fn add(&mut self, state: TrialState, reason: Option<FailureReason>) {
        match state {
            TrialState::Queued => self.queued += 1,
            TrialState::Running => self.running += 1,
            TrialState::Succeeded => self.succeeded += 1,
            TrialState::EarlyStopped => self.early_stopped += 1,
            TrialState::Failed => self.failed += 1,
            TrialState::Cancelled => self.cancelled += 1,
        }
        if reason == Some(FailureReason::Diverged) {
            self.diverged += 1;
        }
    }

    pub fn total(&self) -> u32 {
        self.queued + self.running + self.succeeded + self.early_stopped + self.failed + self.cancelled
    }
}

/// One trial of a sweep, as its leaderboard shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Trial {
    pub index: u32,
    pub job_id: JobId,
    pub params: Params,
    pub state: TrialState,
    /// Why a failed trial failed.
    pub failure_reason: Option<FailureReason>,
    /// The rung an early-stopped trial stopped at.
    pub stopped_rung: Option<u32>,
    /// Latest value of the objective metric; for a trial stopped early, its
    /// value at the rung it stopped at. `None` until evaluated.
    pub objective: Option<f64>,
    pub objective_step: Option<u64>,
    pub step: u64,
    pub total_steps: u64,
    /// 1 for the best trial; `None` without an objective.
    pub rank: Option<u32>,
    pub error: String,
    pub adapter: Option<BlobInfo>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A sweep with every trial, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepReport {
    pub sweep: Sweep,
    pub leaderboard: Vec<Trial>,
}

impl SweepReport {
    /// The best ranked trial that has an adapter.
    pub fn best(&self) -> Option<&Trial> {
        best_trial(&self.leaderboard)
    }
}

/// The best ranked trial with an adapter in a leaderboard (best first).
pub fn best_trial(leaderboard: &[Trial]) -> Option<&Trial> {
    leaderboard.iter().find(|t| t.rank.is_some() && t.adapter.is_some())
}

/// One page of a sweep listing, each with its best trial.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepPage {
    pub sweeps: Vec<(Sweep, Option<Trial>)>,
    pub next: Option<PageToken<SweepId>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let token = PageToken {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: SweepId(Uuid::new_v4()),
        };
        assert_eq!(token.to_string().parse::<PageToken<SweepId>>(), Ok(token));
        assert!("nonsense".parse::<PageToken<SweepId>>().is_err());
    }

    #[test]
    fn dataset_references_need_the_sha256_prefix_and_64_hex_digits() {
        let hex = "AB".repeat(32);
        let parsed: DatasetRef = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(parsed.sha256(), "ab".repeat(32));
        assert!(hex.parse::<DatasetRef>().unwrap_err().contains("upload the file with UploadDataset"));
        assert!("sha256:abc".parse::<DatasetRef>().is_err());
    }
}

/// Levels read from the database at a scrape or an overview.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetLevels {
    pub jobs: Vec<(JobState, u64)>,
    pub sweeps: Vec<(SweepState, u64)>,
    /// How long the job queued longest has waited (since submission or requeue).
    pub oldest_queued: Option<Duration>,
    pub workers_online: u64,
    /// Workers online that take no new jobs (a full disk, device errors).
    pub workers_unhealthy: u64,
    /// Slots of the workers online.
    pub slots: u64,
    /// Open leases.
    pub slots_busy: u64,
    /// Every online worker's training throughput.
    pub workers: Vec<WorkerThroughput>,
}

impl FleetLevels {
    pub fn count(&self, state: JobState) -> u64 {
        self.jobs.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n)
    }

    /// Examples per second across the fleet.
    pub fn examples_per_second(&self) -> f64 {
        self.workers.iter().map(|w| w.examples_per_second).sum()
    }
}

/// An online worker's training throughput.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerThroughput {
    pub worker_id: WorkerId,
    pub hostname: String,
    /// Sum over its running jobs of their latest `examples_per_second`, if
    /// reported within the last 30 seconds.
    pub examples_per_second: f64,
}
