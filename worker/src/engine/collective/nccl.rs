//! The NCCL collective: one CUDA device per rank, the ranks being threads
//! of this process, each with its own NCCL communicator
//! (`ncclCommInitAll`). Built with the `nccl` feature through `cudarc`,
//! which loads `libnccl` and `libcuda` when a group is created, so the
//! worker builds, and runs without this collective, on machines without
//! CUDA.
//!
//! This is the only module of the worker that hands raw device pointers to
//! a C library. Its invariants:
//!
//! - A buffer is a contiguous float32 tensor on the rank's device; its data
//!   pointer is valid for `numel` floats while the call runs, since the
//!   call holds the tensor (`&mut Tensor`) until the collective completed.
//! - Operations are enqueued on the device's legacy default stream (the
//!   null stream), which is the stream libtorch runs a thread's kernels on
//!   unless told otherwise: the collective starts after the kernels that
//!   wrote the buffer and the kernels that read it start after it.
//! - A communicator is used by one thread at a time: the handle owns it and
//!   is moved to its rank's thread, never shared.
//! - A call waits by polling the stream, so it can give up: when another
//!   rank broke the group, NCCL reported an asynchronous error, or the
//!   timeout passed, the communicator is aborted (`ncclCommAbort`, which
//!   frees a rank stuck in a kernel waiting for a dead peer) and the call
//!   fails. An aborted communicator is never used or destroyed again.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::sys as cuda;
use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError};

/// How long a waiting rank sleeps between two looks at its stream.
const POLL: Duration = Duration::from_micros(50);

/// A communicator handle that moves to its rank's thread.
struct Comm(sys::ncclComm_t);

// SAFETY: NCCL communicators may be used from any thread, one thread at a
// time; a `Comm` is owned by one `NcclCollective`, which is `Send` but not
// shared between threads.
unsafe impl Send for Comm {}

/// Why a group broke, shared by its ranks: the rank and its reason.
type Broken = Arc<Mutex<Option<(usize, String)>>>;

/// A group of ranks, one per CUDA device, in this process.
pub struct NcclGroup;

impl NcclGroup {
    /// One handle per CUDA device ordinal in `devices`, in rank order; each
    /// call waits at most `timeout` for the other ranks. Fails when NCCL or
    /// CUDA cannot be loaded or the communicators cannot be created.
    pub fn new(devices: &[usize], timeout: Duration) -> Result<Vec<NcclCollective>, CollectiveError> {
        let ordinals: Vec<i32> = devices.iter().map(|&d| d as i32).collect();
        let mut comms: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); devices.len()];
        // cudarc panics when it cannot load the library.
        let created = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: `comms` has room for one communicator per device of
            // `ordinals`, both `devices.len()` long.
            unsafe { result::comm_init_all(comms.as_mut_ptr(), ordinals.len() as i32, ordinals.as_ptr()) }
        }));
        match created {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(CollectiveError::Backend(format!("ncclCommInitAll failed: {:?}", e.0))),
            Err(_) => return Err(CollectiveError::Backend("cannot load NCCL or CUDA on this machine".into())),
        }
        let broken: Broken = Arc::new(Mutex::new(None));
        let world = devices.len();
        Ok(comms
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(rank, (comm, &device))| NcclCollective {
                rank,
                world,
                device,
                comm: Comm(comm),
                broken: broken.clone(),
                timeout,
                aborted: false,
                left: false,
            })
            .collect())
    }
}

/// One rank's handle on an [`NcclGroup`].
pub struct NcclCollective {
    rank: usize,
    world: usize,
    device: usize,
    comm: Comm,
    broken: Broken,
    timeout: Duration,
    aborted: bool,
    left: bool,
}

impl NcclCollective {
    fn broken(&self) -> Option<CollectiveError> {
        let broken = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        broken.as_ref().map(|(rank, reason)| CollectiveError::PeerFailed { rank: *rank, reason: reason.clone() })
    }

    fn break_group(&self, reason: &str) {
        self.broken.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert((self.rank, reason.to_string()));
    }

    /// Aborts the communicator, once.
    fn abort_comm(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: the communicator is live (never aborted or destroyed)
            // and owned by this handle.
            let _ = unsafe { result::comm_abort(self.comm.0) };
        }
    }

    /// The data pointer and length of `buffer`, checked to be a flat
    /// contiguous float32 tensor on this rank's device.
    fn pointer(&self, buffer: &Tensor) -> Result<(*mut c_void, usize), CollectiveError> {
        if self.aborted {
            return Err(self.broken().unwrap_or(CollectiveError::Backend("the communicator was aborted".into())));
        }
        if let Some(error) = self.broken() {
            return Err(error);
        }
        if buffer.kind() != Kind::Float || buffer.dim() != 1 || !buffer.is_contiguous() {
            return Err(CollectiveError::Mismatch(format!("a buffer is one flat float32 tensor, got {:?} {:?}", buffer.kind(), buffer.size())));
        }
        if buffer.device() != Device::Cuda(self.device) {
            return Err(CollectiveError::Mismatch(format!("rank {} is on cuda:{}, its buffer on {:?}", self.rank, self.device, buffer.device())));
        }
        Ok((buffer.data_ptr(), buffer.numel()))
    }

    /// Waits for the collective just enqueued on the null stream; gives up
    /// (aborting the communicator) when the group breaks, NCCL reports an
    /// error, or the timeout passes.
    fn wait(&mut self) -> Result<(), CollectiveError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: the null stream of the thread's current context, which
            // libtorch made current when it last ran a kernel on the device.
            match unsafe { cuda::cuStreamQuery(std::ptr::null_mut()) } {
                cuda::CUresult::CUDA_SUCCESS => return Ok(()),
                cuda::CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    self.break_group(&format!("cuda error {other:?}"));
                    self.abort_comm();
                    return Err(CollectiveError::Backend(format!("cuda error {other:?} on cuda:{}", self.device)));
                }
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: the communicator is live; `state` is a valid out pointer.
            let _ = unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut state) };
            if !matches!(state, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
                let error = CollectiveError::Backend(format!("nccl error {state:?} on cuda:{}", self.device));
                self.break_group(&error.to_string());
                self.abort_comm();
                return Err(error);
            }
            if let Some(error) = self.broken() {
                self.abort_comm();
                return Err(error);
            }
            if Instant::now() >= deadline {
                let error = CollectiveError::Timeout { rank: self.rank, seconds: self.timeout.as_secs() };
                self.break_group(&error.to_string());
                self.abort_comm();
                return Err(error);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Enqueues a collective with `launch` and waits for it.
    fn run(&mut self, launch: impl FnOnce() -> Result<result::NcclStatus, result::NcclError>) -> Result<(), CollectiveError> {
        if let Err(e) = launch() {
            let error = CollectiveError::Backend(format!("nccl error {:?} on cuda:{}", e.0, self.device));
            self.break_group(&error.to_string());
            self.abort_comm();
            return Err(error);
        }
        self.wait()
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buffer: &mut Tensor) -> Result<(), CollectiveError> {
        let (data, count) = self.pointer(buffer)?;
        let comm = self.comm.0;
        // SAFETY: `data` holds `count` floats on this rank's device and stays
        // alive (borrowed) until `run` waited for the collective; in place
        // (send and receive buffers equal) is allowed by NCCL.
        self.run(|| unsafe {
            result::all_reduce(data, data, count, sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum, comm, std::ptr::null_mut())
        })
    }

    fn broadcast(&mut self, buffer: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        if root >= self.world {
            return Err(CollectiveError::Mismatch(format!("broadcast from rank {root} in a group of {}", self.world)));
        }
        let (data, count) = self.pointer(buffer)?;
        let comm = self.comm.0;
        // SAFETY: as in `all_reduce_sum`.
        self.run(|| unsafe {
            result::broadcast(data, data, count, sys::ncclDataType_t::ncclFloat32, root as i32, comm, std::ptr::null_mut())
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut token = Tensor::zeros([1], (Kind::Float, Device::Cuda(self.device)));
        self.all_reduce_sum(&mut token)
    }

    fn abort(&mut self, reason: &str) {
        self.break_group(reason);
        self.abort_comm();
    }

    fn leave(mut self: Box<Self>) {
        self.left = true;
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if self.aborted {
            return;
        }
        if self.left {
            // SAFETY: the communicator is live, owned by this handle, and
            // no collective of it is pending (every call waited for its own).
            let _ = unsafe { result::comm_destroy(self.comm.0) };
        } else {
            let reason = if std::thread::panicking() { "it panicked" } else { "it stopped before the others" };
            self.break_group(reason);
            self.abort_comm();
        }
    }
}
