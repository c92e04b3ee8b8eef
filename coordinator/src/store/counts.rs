//! Jobs per state without counting them: migration 0014's triggers append
//! a row of change for every insert, state change and delete, and the sum of
//! those rows is the count. The leader folds them into one row per state
//! ([`Store::fold_job_counts`]) so a read sums a handful of rows, however
//! many jobs there are. The statements of the hot path that lease and
//! complete jobs append their own change instead, one pair of rows for all
//! the jobs a statement moves ([`count_moved`], migration 0023).

use std::collections::HashMap;

use ptune_core::JobState;
use tracing::instrument;

use super::jobs::DbJobState;
use super::{to_u64, Result, Store};

/// A common table expression `n` that appends to `job_state_counts` the
/// move of every row the data-modifying expression named returns from the
/// state `from` to the state `to`: two rows, or none when it returns none.
/// For statements in a transaction of [`Store::begin_counting`], whose rows
/// the counting trigger skips; the statement must change only jobs in state
/// `from`.
macro_rules! count_moved {
    ($moved:literal, $from:literal, $to:literal) => {
        concat!(
            "n AS (INSERT INTO job_state_counts (state, n) SELECT v.state, v.n \
             FROM (SELECT count(*) AS c FROM ",
            $moved,
            ") k CROSS JOIN LATERAL (VALUES ('",
            $from,
            "'::job_state, -k.c), ('",
            $to,
            "'::job_state, k.c)) AS v (state, n) WHERE k.c > 0)"
        )
    };
}
pub(super) use count_moved;

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
