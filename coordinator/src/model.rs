//! Domain types of the coordinator: jobs as stored, workers, leases and
//! datasets. No prost and no SQL types here; `grpc::convert` and `store`
//! translate at the edges.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use ptune_core::{JobId, JobSpec, JobState, Method, Metric, WorkerId};
use serde::{Deserialize, Serialize};

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
}

/// Position after the last job of a page: listings are ordered by
/// `(created_at, id)` descending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageToken {
    pub created_at: DateTime<Utc>,
    pub id: JobId,
}

impl fmt::Display for PageToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.created_at.timestamp_micros(), self.id.0.simple())
    }
}

impl FromStr for PageToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || "must be the next_page_token of a previous response".to_string();
        let (micros, id) = s.split_once('.').ok_or_else(bad)?;
        let created_at = micros.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(bad)?;
        let id = id.parse::<JobId>().map_err(|_| bad())?;
        Ok(PageToken { created_at, id })
    }
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageToken>,
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

/// A device of a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub name: String,
    pub memory_bytes: u64,
}

/// A base model a worker serves, as it describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModel {
    pub name: String,
    pub sha256: String,
    pub model_type: String,
    /// Largest sequence length the positions allow; 0 when unknown.
    pub max_positions: u32,
    pub hidden_size: u32,
    pub num_layers: u32,
    pub num_attention_heads: u32,
    pub parameters: u64,
}

/// What a worker says about itself when it registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerRegistration {
    /// Kept across reconnects; `None` asks for a new id.
    pub worker_id: Option<WorkerId>,
    pub hostname: String,
    pub devices: Vec<Device>,
    pub slots: u32,
    pub models: Vec<BaseModel>,
}

/// The coordinator's answer to a registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registered {
    pub worker_id: WorkerId,
    pub heartbeat_interval: std::time::Duration,
    pub lease_timeout: std::time::Duration,
}

/// A lease as named by a worker: the job and the epoch (fencing token) it was
/// leased under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    pub job_id: JobId,
    pub epoch: u64,
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
}

/// The answer to a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// Leases to stop: cancelled jobs and leases that are no longer valid.
    pub stop: Vec<LeaseRef>,
    /// False when the worker is not registered (it should register again).
    pub known: bool,
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

/// The end of a successful attempt, before its adapter bytes arrive.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub lease: LeaseRef,
    /// Lowercase hex sha256 the adapter bytes must hash to.
    pub adapter_sha256: String,
    pub adapter_size: u64,
    pub metrics: Vec<Metric>,
    pub step: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let token =
            PageToken { created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(), id: JobId::new() };
        assert_eq!(token.to_string().parse::<PageToken>(), Ok(token));
        assert!("nonsense".parse::<PageToken>().is_err());
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
