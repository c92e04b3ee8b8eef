//! Why the engine could not train a job, and whose fault that is: what
//! decides whether a failed attempt is retried, where, and how soon.

use std::path::Path;

use ptune_core::SpecError;

/// Why the engine could not train a job.
#[derive(thiserror::Error, Debug)]
pub enum EngineError {
    /// Bad data: never retried.
    #[error("{file} line {line}: {message}")]
    Data { file: String, line: u64, message: String },
    /// A data file that parses but cannot be trained on as a whole.
    #[error("{file}: {message}")]
    Dataset { file: String, message: String },
    /// The spec asks for something this engine or model cannot do.
    #[error("job spec cannot run: {0}")]
    Spec(#[from] SpecError),
    /// The model folder is unreadable or holds an unsupported model.
    #[error("model: {0}")]
    Model(String),
    /// The training loss became NaN or infinite: the run cannot recover.
    #[error("diverged: loss became {loss} at step {step}")]
    Diverged { step: u64, loss: f64 },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// A rank of a data-parallel run could not reach the others: one of
    /// them died without an error of its own, hung, or the link failed.
    #[error("data-parallel training: {0}")]
    Collective(#[from] crate::engine::collective::CollectiveError),
    /// The engine panicked while training (a bug, or a poison input); the
    /// engine thread survived.
    #[error("the engine panicked while training this job: {0}")]
    Panicked(String),
}

/// Whose fault a failed run is, which decides how it is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The same error on every attempt: bad data, a spec the model cannot
    /// take, a diverged loss, out of memory for the spec. Fail at once.
    Permanent,
    /// An error of the job that another attempt may not repeat (a panic, a
    /// transient libtorch error, a data-parallel rank that died without an
    /// error of its own): retried after a backoff, counted against
    /// `max_attempts`.
    Job,
    /// The worker failed, not the job (a full disk, a device error):
    /// retried at once elsewhere, not counted against `max_attempts`.
    Infrastructure,
}

impl EngineError {
    /// True for failures another attempt (perhaps on another worker) may not
    /// repeat; bad data, specs and models fail the same way every time.
    pub fn is_retryable(&self) -> bool {
        self.kind() != FailureKind::Permanent
    }

    /// Whose fault the error is; see [`FailureKind`].
    pub fn kind(&self) -> FailureKind {
        match self {
            EngineError::Data { .. }
            | EngineError::Dataset { .. }
            | EngineError::Spec(_)
            | EngineError::Model(_)
            | EngineError::Diverged { .. } => FailureKind::Permanent,
            EngineError::Io { source, .. } if is_disk_failure(source) => FailureKind::Infrastructure,
            EngineError::Io { .. } | EngineError::Panicked(_) | EngineError::Collective(_) => FailureKind::Job,
            EngineError::Torch(tch::TchError::Shape(_)) => FailureKind::Permanent,
            EngineError::Torch(error) => torch_failure_kind(&error.to_string()),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        EngineError::Io { path: path.display().to_string(), source }
    }
}

/// The message of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// True for an I/O error that says the disk, not the data, is at fault:
/// no space, over quota, read-only, or a device error.
pub fn is_disk_failure(error: &std::io::Error) -> bool {
    // ENOSPC, EDQUOT, EROFS, EIO
    matches!(error.raw_os_error(), Some(28 | 122 | 30 | 5))
}

/// How a libtorch error message is retried: out of memory fails at once
/// (the spec needs more than the device has), device errors are the
/// worker's, anything else may be transient.
fn torch_failure_kind(message: &str) -> FailureKind {
    let lower = message.to_ascii_lowercase();
    if lower.contains("out of memory") || lower.contains("can't allocate memory") {
        FailureKind::Permanent
    } else if lower.contains("cuda error") || lower.contains("cudnn") || lower.contains("nccl") || lower.contains("cublas") {
        FailureKind::Infrastructure
    } else {
        FailureKind::Job
    }
}
