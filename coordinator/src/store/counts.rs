//! Jobs per state without counting them: migration 0014's triggers append
//! a row of change for every insert, state change and delete, and the sum of
//! those rows is the count. The leader folds them into one row per state
//! ([`Store::fold_job_counts`]) so a read sums a handful of rows, however
//! many jobs there are.

use std::collections::HashMap;

use ptune_core::JobState;
use tracing::instrument;

use super::jobs::DbJobState;
use super::{to_u64, Result, Store};

impl Store {
    /// Number of jobs in every state (zero included), exact as of the read.
    #[instrument(skip_all)]
    pub async fn job_counts(&self) -> Result<Vec<(JobState, u64)>> {
        let rows: Vec<(DbJobState, i64)> =
            sqlx::query_as("SELECT state, sum(n)::bigint FROM job_state_counts GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        let counts: HashMap<JobState, i64> = rows.into_iter().map(|(s, n)| (s.into(), n)).collect();
        JobState::ALL.into_iter().map(|s| Ok((s, to_u64(counts.get(&s).copied().unwrap_or(0), "job count")?))).collect()
    }

    /// Folds the rows of change into one row per state; returns how many
    /// rows it folded. Rows appended meanwhile are left for the next fold,
    /// so the sums stay exact.
    #[instrument(skip_all)]
    pub async fn fold_job_counts(&self) -> Result<u64> {
        let folded: i64 = sqlx::query_scalar(
            "WITH gone AS (DELETE FROM job_state_counts RETURNING state, n), \
                  kept AS (INSERT INTO job_state_counts (state, n) \
                           SELECT state, sum(n) FROM gone GROUP BY state HAVING sum(n) <> 0) \
             SELECT count(*) FROM gone",
        )
        .fetch_one(&self.pool)
        .await?;
        to_u64(folded, "folded rows")
    }
}
