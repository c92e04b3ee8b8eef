pub mod adapter;
pub mod admin;
pub mod jobs;
pub mod submit;
pub mod sweep;
pub mod workers;

/// A gRPC error as a user reads it: the server's message, not the transport's debug dump.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::Unavailable => "coordinator unavailable",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::PermissionDenied => "permission denied",
        _ => "error",
    }
}
