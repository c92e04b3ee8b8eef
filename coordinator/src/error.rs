//! Errors of the domain layer ([`crate::jobs`], [`crate::scheduler`]). The gRPC
//! layer maps each variant to one status code in `grpc::status`.

use ptune_core::SpecError;

use crate::store::StoreError;

/// What went wrong, in terms a client can act on. Messages are lowercase and
/// say what to do; `Internal` details are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or out of range.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but the job is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this (another worker's lease, another owner's name).
    #[error("{0}")]
    PermissionDenied(String),
    /// What the request would create exists already (a token's name).
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller holds too much at once (open streams).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The database cannot be reached; retrying later may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The coordinator is stopping; the client should retry against it or another one.
    #[error("the coordinator is shutting down; retry in a moment")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument { field: field.into(), message: message.into() }
    }
}

impl From<SpecError> for Error {
    fn from(e: SpecError) -> Self {
        Error::InvalidArgument { field: e.field, message: e.message }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(source) => Error::Unavailable(source.to_string()),
            StoreError::Conflict(constraint) if constraint == "api_tokens_live_name_idx" => {
                Error::AlreadyExists("a live token has this name; revoke it first or choose another name".into())
            }
            other => Error::Internal(other.to_string()),
        }
    }
}
