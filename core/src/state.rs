//! Job lifecycle states and recorded metrics.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Lifecycle of a job: `Queued -> Running -> Succeeded | Failed | Cancelled`,
/// and `Running -> Queued` when a lease is lost and attempts remain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// True for states a job never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                format!("job state must be one of queued, running, succeeded, failed, cancelled, got {s:?}")
            })
    }
}

/// Whether a metric was measured on training steps or on the evaluation set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    Train,
    Eval,
}

impl MetricKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Train => "train",
            MetricKind::Eval => "eval",
        }
    }
}

impl FromStr for MetricKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(MetricKind::Train),
            "eval" => Ok(MetricKind::Eval),
            other => Err(format!("metric kind must be train or eval, got {other:?}")),
        }
    }
}

/// One measurement at an optimizer step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub step: u64,
    pub kind: MetricKind,
    pub name: String,
    pub value: f64,
}

impl Metric {
    pub fn new(step: u64, kind: MetricKind, name: &str, value: f64) -> Self {
        Self { step, kind, name: name.to_string(), value }
    }
}
