//! Metrics retention of finished jobs, one bounded batch of jobs per
//! transaction (see `crate::tables` for the settings and the schedule).
//!
//! What is always kept: the last point of every series of a job (its final
//! metrics, which listings show), and every evaluation point of a sweep
//! trial (the leaderboard, the curves and ASHA's rung decisions read them).
//! Jobs still queued or running are never touched. Each job records what
//! was done to it (`jobs.metrics_retention`), so a pass reads only the jobs
//! with work left, through `jobs_metrics_retention_idx`.

use tracing::instrument;

use super::{to_u64, Result, Store};

/// The finished jobs of a batch: finished `$1` days ago or more, whose
/// metrics are not yet at the level `$2` or past it, oldest first, skipping
/// rows another transaction holds.
macro_rules! picked {
    () => {
        "picked AS ( \
             SELECT id, sweep_id IS NOT NULL AS trial FROM jobs \
             WHERE metrics_retention <> 'pruned' AND state IN ('succeeded', 'failed', 'cancelled') \
               AND metrics_retention <> ALL($2::text[]) \
               AND finished_at < now() - $1 * interval '1 day' \
             ORDER BY finished_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) "
    };
}

/// What one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionBatch {
    pub jobs: u64,
    pub rows_removed: u64,
}

impl Store {
    /// Thins the training series of up to `limit` jobs finished `days` ago
    /// or more to one point in `every` (the first, then every `every`-th by
    /// step) and the last point. Evaluation series are left whole.
    #[instrument(skip_all, fields(days, every, limit))]
    pub async fn downsample_metrics(&self, days: u32, every: u32, limit: u32) -> Result<RetentionBatch> {
        let (jobs, rows): (i64, i64) = sqlx::query_as(concat!(
            "WITH ",
            picked!(),
            ", ranked AS ( \
                 SELECT m.job_id, m.kind, m.name, m.step, \
                        row_number() OVER (PARTITION BY m.job_id, m.kind, m.name ORDER BY m.step) AS i, \
                        count(*) OVER (PARTITION BY m.job_id, m.kind, m.name) AS n \
                 FROM metrics m JOIN picked p ON p.id = m.job_id WHERE m.kind = 'train'), \
             removed AS ( \
                 DELETE FROM metrics m USING ranked r \
                 WHERE m.job_id = r.job_id AND m.kind = r.kind AND m.name = r.name AND m.step = r.step \
                   AND (r.i - 1) % $4 <> 0 AND r.i <> r.n \
                 RETURNING 1), \
             marked AS ( \
                 UPDATE jobs j SET metrics_retention = 'downsampled' FROM picked p WHERE j.id = p.id RETURNING 1) \
             SELECT (SELECT count(*) FROM marked), (SELECT count(*) FROM removed)"
        ))
        .bind(f64::from(days))
        .bind(["downsampled"])
        .bind(i64::from(limit))
        .bind(i64::from(every))
        .fetch_one(&self.pool)
        .await?;
        Ok(RetentionBatch { jobs: to_u64(jobs, "jobs")?, rows_removed: to_u64(rows, "rows")? })
    }

    /// Removes the metrics of up to `limit` jobs finished `days` ago or more,
    /// but for the last point of each series and the evaluation series of
    /// sweep trials.
    #[instrument(skip_all, fields(days, limit))]
    pub async fn prune_metrics(&self, days: u32, limit: u32) -> Result<RetentionBatch> {
        let (jobs, rows): (i64, i64) = sqlx::query_as(concat!(
            "WITH ",
            picked!(),
            ", removed AS ( \
                 DELETE FROM metrics m USING picked p \
                 WHERE m.job_id = p.id AND NOT (m.kind = 'eval' AND p.trial) \
                   AND m.step < (SELECT max(l.step) FROM metrics l \
                                 WHERE l.job_id = m.job_id AND l.kind = m.kind AND l.name = m.name) \
                 RETURNING 1), \
             marked AS ( \
                 UPDATE jobs j SET metrics_retention = 'pruned' FROM picked p WHERE j.id = p.id RETURNING 1) \
             SELECT (SELECT count(*) FROM marked), (SELECT count(*) FROM removed)"
        ))
        .bind(f64::from(days))
        .bind(Vec::<String>::new())
        .bind(i64::from(limit))
        .fetch_one(&self.pool)
        .await?;
        Ok(RetentionBatch { jobs: to_u64(jobs, "jobs")?, rows_removed: to_u64(rows, "rows")? })
    }
}
