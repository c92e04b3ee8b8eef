//! What happens to a job after an attempt that did not succeed: a pure
//! decision over the job's counters, taken inside the transaction that
//! holds its row locked (see `store/endings.rs`).
//!
//! Attempts end for one of two kinds of reasons, counted apart as
//! Kubernetes' pod failure policy and the PostgreSQL job queues (River,
//! Graphile Worker) do:
//! - an error of the job (a panic, a stall, an error that may not repeat):
//!   it counts against the spec's `max_attempts`, and the next attempt
//!   waits an exponentially growing backoff;
//! - an interruption (the worker was lost, drained, preempted or partitioned
//!   away; its disk filled up): it does not count against `max_attempts`,
//!   the job is queued again at once, and only the coordinator's larger
//!   `max_interruptions` bounds how often that may happen.
//!
//! Errors that cannot succeed on a retry (bad data, a spec the model cannot
//! take, out of memory for the spec) fail the job at once.

use std::time::Duration;

/// The retry settings of a coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the attempt after a job's first error; doubled after each
    /// further error.
    pub backoff_base: Duration,
    /// Longest wait between attempts.
    pub backoff_cap: Duration,
    /// Interruptions a job survives; the next one fails it.
    pub max_interruptions: u32,
}

impl Default for RetryPolicy {
    /// Kubernetes Jobs' backoff (10 s doubling up to 6 minutes), and room for
    /// twenty lost or drained workers per job.
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(360),
            max_interruptions: 20,
        }
    }
}

/// Why an attempt ended without success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptEnd {
    /// An error of the job that another attempt may not repeat.
    Error,
    /// An error no attempt can avoid (bad data, the spec, out of memory).
    Permanent,
    /// The infrastructure: a lost, drained or unhealthy worker.
    Interruption,
}

/// What to do with the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Queue it again, to be leased no sooner than after this wait.
    After(Duration),
    /// Fail it: its budget for this kind of ending is spent (or the error is permanent).
    Fail,
}

/// A job's counters after the ending attempt was counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Attempts that failed with an error of the job, this one included.
    pub failures: u32,
    pub max_attempts: u32,
    /// Interruptions, this one included.
    pub interruptions: u32,
}

impl RetryPolicy {
    /// The decision for an attempt that ended as `end`; `jitter` in [0, 1)
    /// spreads the backoffs of jobs that failed together by up to 10%.
    pub fn decide(&self, end: AttemptEnd, counters: Counters, jitter: f64) -> Retry {
        match end {
            AttemptEnd::Permanent => Retry::Fail,
            AttemptEnd::Error if counters.failures >= counters.max_attempts => Retry::Fail,
            AttemptEnd::Error => Retry::After(self.backoff(counters.failures, jitter)),
            AttemptEnd::Interruption if counters.interruptions > self.max_interruptions => Retry::Fail,
            AttemptEnd::Interruption => Retry::After(Duration::ZERO),
        }
    }

    /// The wait after the `failures`-th error: base × 2^(failures − 1), at
    /// most the cap, plus up to 10% of jitter.
    pub fn backoff(&self, failures: u32, jitter: f64) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        let wait = self.backoff_base.saturating_mul(1 << doublings).min(self.backoff_cap);
        wait.mul_f64(1.0 + 0.1 * jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(failures: u32, interruptions: u32) -> Counters {
        Counters { failures, max_attempts: 3, interruptions }
    }

    #[test]
    fn errors_back_off_exponentially_up_to_the_cap_and_fail_after_max_attempts() {
        let policy = RetryPolicy {
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(25),
            max_interruptions: 2,
        };
        assert_eq!(policy.decide(AttemptEnd::Error, counters(1, 0), 0.0), Retry::After(Duration::from_secs(10)));
        assert_eq!(policy.decide(AttemptEnd::Error, counters(2, 0), 0.0), Retry::After(Duration::from_secs(20)));
        assert_eq!(policy.decide(AttemptEnd::Error, counters(3, 0), 0.0), Retry::Fail);
        assert_eq!(policy.backoff(3, 0.0), Duration::from_secs(25), "capped");
        assert_eq!(policy.backoff(40, 0.0), Duration::from_secs(25), "no overflow");
        assert_eq!(policy.backoff(1, 0.999), Duration::from_secs_f64(10.0 * 1.0999));
    }

    #[test]
    fn interruptions_requeue_at_once_and_have_their_own_budget() {
        let policy = RetryPolicy { max_interruptions: 2, ..RetryPolicy::default() };
        // Two errors already: an interruption still does not fail the job.
        let retry = policy.decide(AttemptEnd::Interruption, Counters { failures: 2, max_attempts: 3, interruptions: 2 }, 0.5);
        assert_eq!(retry, Retry::After(Duration::ZERO));
        assert_eq!(policy.decide(AttemptEnd::Interruption, counters(0, 3), 0.5), Retry::Fail);
        assert_eq!(policy.decide(AttemptEnd::Permanent, counters(0, 0), 0.5), Retry::Fail);
    }
}
