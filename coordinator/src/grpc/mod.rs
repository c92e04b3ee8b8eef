//! gRPC adapters: each handler decodes the request (see [`convert`]), calls
//! the domain in [`crate::jobs`], [`crate::sweep`] or [`crate::scheduler`],
//! and encodes the answer. Domain errors become statuses in one place, below.

mod admin_service;
pub mod convert;
mod job_service;
mod sweep_service;
mod worker_service;

use tonic::Status;
use tracing::{error, warn};

pub use admin_service::{token_name, AdminApi};
pub use job_service::JobApi;
pub use sweep_service::SweepApi;
pub use worker_service::WorkerApi;

use crate::error::Error;

/// The next message of an upload, or `DEADLINE_EXCEEDED` when none came
/// within `idle`: a client that stops sending does not hold the call open.
pub(crate) async fn next_message<T>(
    stream: &mut tonic::Streaming<T>,
    idle: std::time::Duration,
) -> Result<Option<T>, Status> {
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(message) => message,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the upload sent nothing for {} s (--upload-idle-timeout); send it again",
            idle.as_secs()
        ))),
    }
}

/// The one mapping from domain errors to gRPC statuses. Details of internal
/// and database errors are logged, never sent.
impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let status = status_of(e);
        // A message quoting a client's value must not outgrow a header.
        if status.message().len() > MAX_MESSAGE_CHARS {
            let cut: String = status.message().chars().take(MAX_MESSAGE_CHARS).collect();
            return Status::new(status.code(), format!("{cut}…"));
        }
        status
    }
}

/// Longest status message sent (it travels in a header).
const MAX_MESSAGE_CHARS: usize = 1000;

fn status_of(e: Error) -> Status {
    {
        match e {
            Error::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            Error::NotFound(message) => Status::not_found(message),
            Error::FailedPrecondition(message) => Status::failed_precondition(message),
            Error::PermissionDenied(message) => Status::permission_denied(message),
            Error::AlreadyExists(message) => Status::already_exists(message),
            Error::ResourceExhausted(message) => Status::resource_exhausted(message),
            Error::ShuttingDown => Status::unavailable(e.to_string()),
            Error::Unavailable(detail) => {
                warn!(error = %detail, "database unavailable");
                Status::unavailable("the coordinator cannot reach its database; retry shortly")
            }
            Error::Internal(detail) => {
                error!(error = %detail, "internal error");
                Status::internal("internal error; the coordinator log has the details")
            }
        }
    }
}
