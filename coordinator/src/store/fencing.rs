//! Fencing: only the worker that holds a job's current lease, and can show
//! the lease token it was given, may act on the job. The outcome type of
//! such operations, and the token check shared by leases and checkpoints.

use ptune_core::{JobSpec, JobState};
use sqlx::types::Json;

use super::jobs::DbJobState;
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

/// The state, epoch and (when `with_spec`) spec of the job of `lease`,
/// read with the check of its token in one statement: `Forbidden` without
/// the token, as without the job.
pub(super) async fn read_leased<'e>(
    db: impl sqlx::PgExecutor<'e>,
    lease: LeaseRef,
    with_spec: bool,
) -> Result<Fenced<(DbJobState, i64, Option<JobSpec>)>> {
    let row: Option<(DbJobState, i64, Option<Json<JobSpec>>, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT j.state, j.lease_epoch, CASE WHEN $3 THEN j.spec END, \
                (SELECT a.lease_token_hash FROM job_attempts a WHERE a.job_id = j.id AND a.epoch = $2) \
         FROM jobs j WHERE j.id = $1",
    )
    .bind(lease.job_id.0)
    .bind(to_i64(lease.epoch))
    .bind(with_spec)
    .fetch_optional(db)
    .await?;
    Ok(match row {
        Some((state, epoch, spec, Some(hash))) if crate::auth::tokens::same(&hash, &lease.token_hash) => {
            Fenced::Valid((state, epoch, spec.map(|s| s.0)))
        }
        _ => Fenced::Forbidden,
    })
}
