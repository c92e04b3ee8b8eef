//! Keeping the large tables in bounds, on the leader: the rows of change
//! behind the counts per job state are folded every [`FOLD_INTERVAL`], and
//! the metrics of finished jobs are thinned and then pruned every
//! [`RETENTION_INTERVAL`] as [`Retention`] says.
//!
//! Retention works in batches of [`Retention::batch_jobs`] jobs, one short
//! transaction each, so it never holds locks for long; a pass stops after
//! [`MAX_BATCHES_PER_PASS`] batches and the next pass goes on. What it
//! keeps is described in `store/retention.rs`.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::store::{Result, RetentionBatch, Store};

/// How often the leader folds the counts per job state.
pub const FOLD_INTERVAL: Duration = Duration::from_secs(5);
/// How often the leader applies metrics retention.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(300);
/// Batches one retention pass runs at most.
pub const MAX_BATCHES_PER_PASS: u32 = 200;
/// Longest retention a flag accepts, in days (100 years).
pub const MAX_DAYS: u32 = 36_500;
/// Bounds of [`Retention::downsample_every`].
pub const DOWNSAMPLE_EVERY: std::ops::RangeInclusive<u32> = 2..=10_000;
/// Bounds of [`Retention::batch_jobs`].
pub const BATCH_JOBS: std::ops::RangeInclusive<u32> = 1..=10_000;

/// What happens to the metrics of finished jobs as they age. The default
/// keeps everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Days after a job finished when its training series are thinned to
    /// one point in [`Retention::downsample_every`] (and the last).
    pub downsample_after_days: Option<u32>,
    pub downsample_every: u32,
    /// Days after a job finished when its metrics are removed, but for the
    /// last point of each series and the evaluation series of sweep trials.
    pub retention_days: Option<u32>,
    /// Jobs per transaction.
    pub batch_jobs: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Self { downsample_after_days: None, downsample_every: 10, retention_days: None, batch_jobs: 50 }
    }
}

/// What one retention pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub jobs_downsampled: u64,
    pub jobs_pruned: u64,
    pub rows_removed: u64,
}

impl Retention {
    /// Settings from the coordinator's flags, checked: each error names the
    /// flag and its range.
    pub fn new(
        retention_days: Option<u32>,
        downsample_after_days: Option<u32>,
        downsample_every: u32,
        batch_jobs: u32,
    ) -> std::result::Result<Self, String> {
        let days = |flag: &str, value: Option<u32>| match value {
            Some(n) if !(1..=MAX_DAYS).contains(&n) => {
                Err(format!("--{flag} must be between 1 and {MAX_DAYS}, got {n}; leave it out to keep metrics forever"))
            }
            _ => Ok(value),
        };
        let retention_days = days("metrics-retention-days", retention_days)?;
        let downsample_after_days = days("metrics-downsample-after-days", downsample_after_days)?;
        if !DOWNSAMPLE_EVERY.contains(&downsample_every) {
            return Err(format!(
                "--metrics-downsample-every must be between {} and {}, got {downsample_every}",
                DOWNSAMPLE_EVERY.start(),
                DOWNSAMPLE_EVERY.end()
            ));
        }
        if !BATCH_JOBS.contains(&batch_jobs) {
            return Err(format!(
                "--metrics-retention-batch must be between {} and {}, got {batch_jobs}",
                BATCH_JOBS.start(),
                BATCH_JOBS.end()
            ));
        }
        if let (Some(thin), Some(keep)) = (downsample_after_days, retention_days) {
            if thin >= keep {
                return Err(format!(
                    "--metrics-downsample-after-days ({thin}) must be less than --metrics-retention-days ({keep})"
                ));
            }
        }
        Ok(Self { downsample_after_days, downsample_every, retention_days, batch_jobs })
    }

    /// Whether retention removes anything at all.
    pub fn enabled(&self) -> bool {
        self.retention_days.is_some() || self.downsample_after_days.is_some()
    }

    /// Applies the settings, a batch at a time, until no finished job has
    /// work left or `max_batches` batches ran.
    pub async fn apply(&self, store: &Store, max_batches: u32) -> Result<Applied> {
        let mut applied = Applied::default();
        let mut batches = 0;
        if let Some(days) = self.retention_days {
            while batches < max_batches {
                batches += 1;
                let RetentionBatch { jobs, rows_removed } = store.prune_metrics(days, self.batch_jobs).await?;
                applied.jobs_pruned += jobs;
                applied.rows_removed += rows_removed;
                if jobs < u64::from(self.batch_jobs) {
                    break;
                }
            }
        }
        if let Some(days) = self.downsample_after_days {
            while batches < max_batches {
                batches += 1;
                let batch = store.downsample_metrics(days, self.downsample_every, self.batch_jobs).await?;
                applied.jobs_downsampled += batch.jobs;
                applied.rows_removed += batch.rows_removed;
                if batch.jobs < u64::from(self.batch_jobs) {
                    break;
                }
            }
        }
        Ok(applied)
    }
}

/// Runs the folding and retention while this coordinator leads, until `stop`.
pub fn spawn(
    store: Store,
    retention: Retention,
    leader: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FOLD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first pass runs once this coordinator has led for a fold interval.
        let mut last_retention: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => break,
                _ = tick.tick() => {}
            }
            if !*leader.borrow() {
                continue;
            }
            match store.fold_job_counts().await {
                Ok(rows) => debug!(rows, "folded the counts per job state"),
                Err(e) => warn!(error = %e, "folding the counts per job state failed; retrying"),
            }
            if !retention.enabled() || last_retention.is_some_and(|t| t.elapsed() < RETENTION_INTERVAL) {
                continue;
            }
            last_retention = Some(tokio::time::Instant::now());
            match retention.apply(&store, MAX_BATCHES_PER_PASS).await {
                Ok(done) if done == Applied::default() => {}
                Ok(Applied { jobs_downsampled, jobs_pruned, rows_removed }) => {
                    info!(jobs_downsampled, jobs_pruned, rows_removed, "applied metrics retention")
                }
                Err(e) => warn!(error = %e, "metrics retention failed; retrying later"),
            }
        }
        debug!("table maintenance stopped");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_out_of_range_name_the_flag_and_the_range() {
        let cases = [
            (Retention::new(Some(0), None, 10, 50), "--metrics-retention-days must be between 1 and 36500, got 0"),
            (Retention::new(None, Some(40_000), 10, 50), "--metrics-downsample-after-days must be between 1 and 36500"),
            (Retention::new(None, Some(7), 1, 50), "--metrics-downsample-every must be between 2 and 10000, got 1"),
            (Retention::new(Some(30), None, 10, 0), "--metrics-retention-batch must be between 1 and 10000, got 0"),
            (
                Retention::new(Some(30), Some(30), 10, 50),
                "--metrics-downsample-after-days (30) must be less than --metrics-retention-days (30)",
            ),
        ];
        for (result, expected) in cases {
            let error = result.expect_err(expected);
            assert!(error.starts_with(expected), "{error}");
        }
    }

    #[test]
    fn valid_settings_are_kept_and_none_keeps_everything() {
        let retention = Retention::new(Some(90), Some(7), 20, 100).unwrap();
        assert_eq!(
            retention,
            Retention {
                downsample_after_days: Some(7),
                downsample_every: 20,
                retention_days: Some(90),
                batch_jobs: 100
            }
        );
        assert!(retention.enabled());
        assert!(!Retention::new(None, None, 10, 50).unwrap().enabled());
        assert_eq!(Retention::new(None, None, 10, 50).unwrap(), Retention::default());
    }
}
