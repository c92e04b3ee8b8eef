//! Fencing: only the worker that holds a job's current lease, and can show
//! the lease token it was given, may act on the job. The outcome type of
//! such operations, and the token check shared by leases and checkpoints.

use ptune_core::JobState;

use super::{to_i64, Result};
use crate::model::LeaseRef;

/// The result of an operation that only the current lease holder may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fenced<T> {
    Valid(T),
    /// The job is not running under this epoch any more.
    Stale {
        state: JobState,
        epoch: u64,
    },
    NotFound,
    /// The caller did not present the lease token of this lease.
    Forbidden,
}

impl<T> Fenced<T> {
    /// The value, or the refusal as one of any other value type.
    pub fn valid<U>(self) -> std::result::Result<T, Fenced<U>> {
        match self {
            Fenced::Valid(value) => Ok(value),
            Fenced::Stale { state, epoch } => Err(Fenced::Stale { state, epoch }),
            Fenced::NotFound => Err(Fenced::NotFound),
            Fenced::Forbidden => Err(Fenced::Forbidden),
        }
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Fenced<U> {
        match self {
            Fenced::Valid(value) => Fenced::Valid(f(value)),
            Fenced::Stale { state, epoch } => Fenced::Stale { state, epoch },
            Fenced::NotFound => Fenced::NotFound,
            Fenced::Forbidden => Fenced::Forbidden,
        }
    }
}

/// Whether `lease` carries the token of its attempt (only the worker that
/// took the lease was told it).
pub(super) async fn token_matches<'e>(db: impl sqlx::PgExecutor<'e>, lease: LeaseRef) -> Result<bool> {
    let stored: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT lease_token_hash FROM job_attempts WHERE job_id = $1 AND epoch = $2")
            .bind(lease.job_id.0)
            .bind(to_i64(lease.epoch))
            .fetch_optional(db)
            .await?;
    Ok(stored.flatten().is_some_and(|hash| crate::auth::tokens::same(&hash, &lease.token_hash)))
}
