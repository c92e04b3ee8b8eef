//! Hyperparameter sweeps, as pure domain logic: the definition a user writes
//! (a job template, a search space, an algorithm, an objective), its
//! validation, the enumeration and sampling of trial configurations, and the
//! rung arithmetic of ASHA. Storage and scheduling live in the coordinator.

mod asha;
mod definition;
mod rng;
mod space;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use asha::{decide, AshaConfig, AshaPlan, Decision, ResourceUnit, RungValue, MAX_REDUCTION_FACTOR};
pub use definition::{
    trial_error, Algorithm, AlgorithmKind, Objective, Sampler, SweepDefinition, DEFAULT_CONCURRENT_TRIALS,
    DEFAULT_GRID_CAP, MAX_CONCURRENT_TRIALS, MAX_TRIALS,
};
pub use rng::SplitMix64;
pub use space::{same_value, Condition, Domain, GridError, Parameter, Params, SearchSpace};

use crate::JobState;

/// The error prefix of a trial that failed because its loss stopped being a
/// finite number. Workers and the coordinator both write it.
pub const DIVERGED_PREFIX: &str = "diverged:";

/// Whether larger or smaller objective values are better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[serde(alias = "max")]
    Maximize,
    #[serde(alias = "min")]
    Minimize,
}

impl Direction {
    /// True when `a` is strictly better than `b`. A NaN is never better, and
    /// every number is better than a NaN.
    pub fn better(self, a: f64, b: f64) -> bool {
        if a.is_nan() {
            return false;
        }
        if b.is_nan() {
            return true;
        }
        match self {
            Direction::Maximize => a > b,
            Direction::Minimize => a < b,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Maximize => "maximize",
            Direction::Minimize => "minimize",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Direction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "maximize" | "max" => Ok(Direction::Maximize),
            "minimize" | "min" => Ok(Direction::Minimize),
            other => Err(format!("direction must be maximize or minimize, got {other:?}")),
        }
    }
}

/// Lifecycle of a sweep: `Running -> Completed | Cancelled | Failed`, and
/// `Completed -> Running` again when it is extended with more trials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepState {
    /// Creating and running trials.
    Running,
    /// Every trial it planned has finished.
    Completed,
    /// Stopped on request; its running trials were cancelled.
    Cancelled,
    /// More trials failed than `max_failed_trials` allows; the rest were cancelled.
    Failed,
}

impl SweepState {
    pub const ALL: [SweepState; 4] = [SweepState::Running, SweepState::Completed, SweepState::Cancelled, SweepState::Failed];

    pub fn is_terminal(self) -> bool {
        self != SweepState::Running
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SweepState::Running => "running",
            SweepState::Completed => "completed",
            SweepState::Cancelled => "cancelled",
            SweepState::Failed => "failed",
        }
    }
}

impl fmt::Display for SweepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SweepState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        SweepState::ALL
            .into_iter()
            .find(|state| state.as_str() == wanted)
            .ok_or_else(|| format!("sweep state must be one of running, completed, cancelled, failed, got {s:?}"))
    }
}

/// A trial as a sweep sees it, derived from its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialState {
    Queued,
    Running,
    /// Trained to its last step; its adapter is stored.
    Succeeded,
    /// Stopped at a rung by ASHA (with its adapter, when the worker uploaded one).
    EarlyStopped,
    /// Failed (see [`FailureReason`]); counts against `max_failed_trials`.
    Failed,
    /// Cancelled on request, or because its sweep was cancelled or failed.
    Cancelled,
}

impl TrialState {
    /// The trial state of a job in `state` that was (or was not) stopped early.
    pub fn of(state: JobState, early_stopped: bool) -> Self {
        match state {
            JobState::Queued => TrialState::Queued,
            JobState::Running => TrialState::Running,
            JobState::Succeeded | JobState::Cancelled if early_stopped => TrialState::EarlyStopped,
            JobState::Succeeded => TrialState::Succeeded,
            JobState::Failed => TrialState::Failed,
            JobState::Cancelled => TrialState::Cancelled,
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, TrialState::Queued | TrialState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TrialState::Queued => "queued",
            TrialState::Running => "running",
            TrialState::Succeeded => "succeeded",
            TrialState::EarlyStopped => "early_stopped",
            TrialState::Failed => "failed",
            TrialState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TrialState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a trial failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// Its training loss became NaN or infinite.
    Diverged,
    /// Anything else: the job's error says what.
    Error,
}

impl FailureReason {
    /// The reason behind a failed job's error message.
    pub fn of(error: &str) -> Self {
        if error.starts_with(DIVERGED_PREFIX) {
            FailureReason::Diverged
        } else {
            FailureReason::Error
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Diverged => "diverged",
            FailureReason::Error => "error",
        }
    }
}
