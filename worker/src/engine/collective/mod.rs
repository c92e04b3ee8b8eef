//! Collective operations between the ranks of one data-parallel run: every
//! rank calls the same operations in the same order, and each call returns
//! once every rank has made it. Two implementations: [`host`] (ranks are
//! threads of this process sharing CPU memory; on CPUs and in tests) and,
//! with the `nccl` feature, [`nccl`] (one CUDA device per rank, through
//! NCCL).
//!
//! Failure is all or nothing: a rank that fails, panics or drops its handle
//! breaks the group, and every call any rank makes on a broken group, or is
//! waiting in, fails with a [`CollectiveError`] instead of hanging; so does
//! a call that waits longer than the group's timeout for the others. A
//! broken group stays broken.

pub mod host;
#[cfg(feature = "nccl")]
pub mod nccl;

use std::time::Duration;

use tch::Tensor;

pub use host::HostGroup;

/// How long a rank waits in a collective call for the others by default:
/// longer than any evaluation the leading rank runs between two steps.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Why a collective call failed. Every rank of a broken group gets one.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum CollectiveError {
    /// Another rank failed, panicked or left while the group still needed it.
    #[error("rank {rank} of the data-parallel group failed: {reason}")]
    PeerFailed { rank: usize, reason: String },
    /// The other ranks did not arrive within the timeout (a hung device).
    #[error("rank {rank} waited more than {seconds} s for the other ranks of the data-parallel group")]
    Timeout { rank: usize, seconds: u64 },
    /// The ranks disagree on a call (buffer lengths): a bug, not the job's data.
    #[error("ranks of the data-parallel group disagree: {0}")]
    Mismatch(String),
    /// The communication library failed (NCCL, CUDA).
    #[error("collective backend: {0}")]
    Backend(String),
}

/// One rank's handle on its group. Buffers are one flat, contiguous float32
/// tensor on the rank's device, the same length on every rank.
pub trait Collective: Send {
    /// This rank, 0 to `world_size() - 1`. Rank 0 leads: it alone reports,
    /// evaluates, checkpoints and exports.
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// Replaces `buffer` on every rank with the element-wise sum of every
    /// rank's `buffer`, the same bits on every rank.
    fn all_reduce_sum(&mut self, buffer: &mut Tensor) -> Result<(), CollectiveError>;

    /// Replaces `buffer` on every rank with rank `root`'s.
    fn broadcast(&mut self, buffer: &mut Tensor, root: usize) -> Result<(), CollectiveError>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;

    /// Breaks the group because this rank failed (`reason`): every other
    /// rank's current and next calls fail. Dropping a handle without
    /// [`Collective::leave`] does the same.
    fn abort(&mut self, reason: &str);

    /// Leaves the group after its last call; the group is not broken by it.
    fn leave(self: Box<Self>);
}
