//! The leases a worker holds, and what each job's engine run is told to do
//! next.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use ptune_proto::v1;

use crate::engine::Control;

/// What the coordinator (or the worker itself) wants a running job to do
/// next, and why it stops. Cheap to clone; clones share the state.
#[derive(Clone, Debug, Default)]
pub struct Directive(Arc<AtomicU8>);

/// Why a run was told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// The user cancelled the job.
    Cancelled,
    /// The lease is gone (refused as stale, or the coordinator failed the job).
    LeaseLost,
    /// The worker is shutting down past its drain: hand the lease back as it is.
    Drain,
    /// The watchdog saw no progress.
    Stalled,
}

impl Directive {
    const CONTINUE: u8 = 0;
    const FINISH: u8 = 1;
    const SUSPEND: u8 = 2;
    const STOP_CANCELLED: u8 = 10;
    const STOP_LOST: u8 = 11;
    const STOP_DRAIN: u8 = 12;
    const STOP_STALLED: u8 = 13;

    /// Stop at the next step and export what was trained (an early stop).
    pub fn finish(&self) {
        let _ = self.0.compare_exchange(Self::CONTINUE, Self::FINISH, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Stop at the next step after a checkpoint, to hand the lease back (a
    /// drain). An early stop already asked for goes on: it completes the job.
    pub fn suspend(&self) {
        let _ = self.0.compare_exchange(Self::CONTINUE, Self::SUSPEND, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Stop at the next step without an export. The first cause given stays.
    pub fn stop(&self, cause: StopCause) {
        let value = match cause {
            StopCause::Cancelled => Self::STOP_CANCELLED,
            StopCause::LeaseLost => Self::STOP_LOST,
            StopCause::Drain => Self::STOP_DRAIN,
            StopCause::Stalled => Self::STOP_STALLED,
        };
        let _ = self.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| (v < Self::STOP_CANCELLED).then_some(value));
    }

    /// Why the run was told to stop, if it was.
    pub fn stop_cause(&self) -> Option<StopCause> {
        match self.0.load(Ordering::SeqCst) {
            Self::STOP_CANCELLED => Some(StopCause::Cancelled),
            Self::STOP_LOST => Some(StopCause::LeaseLost),
            Self::STOP_DRAIN => Some(StopCause::Drain),
            Self::STOP_STALLED => Some(StopCause::Stalled),
            _ => None,
        }
    }

    pub fn control(&self) -> Control {
        match self.0.load(Ordering::SeqCst) {
            Self::CONTINUE => Control::Continue,
            Self::FINISH => Control::Finish,
            Self::SUSPEND => Control::Suspend,
            _ => Control::Stop,
        }
    }
}

/// A lease as the worker names it.
pub type LeaseKey = (String, u64);

/// Leases this worker holds, with the directive each job's engine run
/// obeys and the lease token that proves it. A lease stays here until its
/// ending (completion, failure or release) was delivered, so heartbeats
/// keep renewing it meanwhile.
#[derive(Clone, Default)]
pub struct Leases(Arc<Mutex<HashMap<LeaseKey, (Directive, String)>>>);

impl Leases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseKey, (Directive, String)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, job_id: &str, epoch: u64, lease_token: &str) -> Directive {
        let flag = Directive::default();
        self.lock().insert((job_id.to_string(), epoch), (flag.clone(), lease_token.to_string()));
        flag
    }

    pub fn remove(&self, job_id: &str, epoch: u64) {
        self.lock().remove(&(job_id.to_string(), epoch));
    }

    pub fn refs(&self) -> Vec<v1::LeaseRef> {
        self.lock()
            .iter()
            .map(|((job_id, epoch), (_, token))| v1::LeaseRef {
                job_id: job_id.clone(),
                epoch: *epoch,
                lease_token: token.clone(),
            })
            .collect()
    }

    pub fn get(&self, job_id: &str, epoch: u64) -> Option<Directive> {
        self.lock().get(&(job_id.to_string(), epoch)).map(|(d, _)| d.clone())
    }

    /// Every lease's directive.
    pub fn all(&self) -> Vec<Directive> {
        self.lock().values().map(|(d, _)| d.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}
