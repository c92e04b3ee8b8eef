//! Errors of the domain layer ([`crate::jobs`], [`crate::sweep`],
//! [`crate::workers`]), and the one mapping of each to what a client gets:
//! a gRPC status ([`tonic::Status`]) or an HTTP status with a JSON body
//! `{"error": "..."}` (the dashboard's answer). The HTTP status of each gRPC
//! code is the one `google.rpc.Code` documents. Details of internal and
//! database errors are logged, never sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ptune_core::SpecError;
use tonic::Code;
use tracing::{error, warn};

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

/// Longest message sent (a gRPC status travels in a header, and a message
/// may quote a client's value).
const MAX_MESSAGE_CHARS: usize = 1000;

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument { field: field.into(), message: message.into() }
    }

    /// The gRPC code and HTTP status of the error, and the message a client
    /// is sent. Logs what is not sent.
    fn answer(self) -> (Code, StatusCode, String) {
        let (code, http) = match &self {
            Error::InvalidArgument { .. } => (Code::InvalidArgument, StatusCode::BAD_REQUEST),
            Error::NotFound(_) => (Code::NotFound, StatusCode::NOT_FOUND),
            Error::FailedPrecondition(_) => (Code::FailedPrecondition, StatusCode::BAD_REQUEST),
            Error::PermissionDenied(_) => (Code::PermissionDenied, StatusCode::FORBIDDEN),
            Error::AlreadyExists(_) => (Code::AlreadyExists, StatusCode::CONFLICT),
            Error::ResourceExhausted(_) => (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS),
            Error::Unavailable(_) | Error::ShuttingDown => (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            Error::Internal(_) => (Code::Internal, StatusCode::INTERNAL_SERVER_ERROR),
        };
        let message = match self {
            Error::Unavailable(detail) => {
                warn!(error = %detail, "database unavailable");
                "the coordinator cannot reach its database; retry shortly".to_string()
            }
            Error::Internal(detail) => {
                error!(error = %detail, "internal error");
                "internal error; the coordinator log has the details".to_string()
            }
            Error::NotFound(m)
            | Error::FailedPrecondition(m)
            | Error::PermissionDenied(m)
            | Error::AlreadyExists(m)
            | Error::ResourceExhausted(m) => m,
            other @ (Error::InvalidArgument { .. } | Error::ShuttingDown) => other.to_string(),
        };
        let message = match message.char_indices().nth(MAX_MESSAGE_CHARS) {
            Some((cut, _)) => format!("{}…", &message[..cut]),
            None => message,
        };
        (code, http, message)
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let (code, _, message) = e.answer();
        tonic::Status::new(code, message)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (_, status, message) = self.answer();
        (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
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
            StoreError::Objects(message) => Error::Unavailable(format!("the file store failed: {message}; retry later")),
            StoreError::Conflict(constraint) if constraint == "api_tokens_live_name_idx" => {
                Error::AlreadyExists("a live token has this name; revoke it first or choose another name".into())
            }
            other => Error::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_one_grpc_code_and_one_http_status() {
        let cases = [
            (Error::invalid("name", "must not be empty"), Code::InvalidArgument, 400, "name: must not be empty"),
            (Error::NotFound("job x not found".into()), Code::NotFound, 404, "job x not found"),
            (Error::FailedPrecondition("job x is queued".into()), Code::FailedPrecondition, 400, "job x is queued"),
            (Error::PermissionDenied("not yours".into()), Code::PermissionDenied, 403, "not yours"),
            (Error::AlreadyExists("taken".into()), Code::AlreadyExists, 409, "taken"),
            (Error::ResourceExhausted("too many".into()), Code::ResourceExhausted, 429, "too many"),
            (
                Error::Unavailable("connection refused".into()),
                Code::Unavailable,
                503,
                "the coordinator cannot reach its database; retry shortly",
            ),
            (Error::ShuttingDown, Code::Unavailable, 503, "the coordinator is shutting down; retry in a moment"),
            (Error::Internal("a bug".into()), Code::Internal, 500, "internal error; the coordinator log has the details"),
        ];
        for (error, code, http, message) in cases {
            assert_eq!(error.answer(), (code, StatusCode::from_u16(http).unwrap(), message.to_string()));
        }
    }

    #[test]
    fn long_messages_are_cut() {
        let (_, _, message) = Error::NotFound("x".repeat(5000)).answer();
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(message.ends_with('…'));
    }
}
