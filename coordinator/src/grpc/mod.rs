//! gRPC adapters: each handler decodes the request (see [`convert`]), calls
//! the domain in [`crate::jobs`], [`crate::sweep`] or [`crate::workers`],
//! and encodes the answer. Domain errors become statuses in `crate::error`.

mod admin_service;
pub mod convert;
mod job_service;
mod sweep_service;
mod worker_service;

use tonic::Status;

pub use admin_service::{token_name, AdminApi};
pub use job_service::JobApi;
pub use sweep_service::SweepApi;
pub use worker_service::WorkerApi;

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
