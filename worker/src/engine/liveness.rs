//! Signs of life from engine threads, for the agent's stall watchdog.
//!
//! Each run the agent hands an engine thread carries a [`Liveness`] cell;
//! while the run is on a thread, every [`beat`] on that thread (each
//! optimizer step, each evaluation batch, each generated token) stamps the
//! time into the cells of every run the thread holds. A pack's runs share
//! their thread, so a pack that stops making progress stalls them all.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// When a run last showed progress, in milliseconds since the Unix epoch;
/// 0 until it started on an engine thread. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Liveness(Arc<AtomicU64>);

impl Liveness {
    /// Milliseconds since the run last showed progress; `None` before it started.
    pub fn silent_for_ms(&self) -> Option<u64> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            last => Some(now_ms().saturating_sub(last)),
        }
    }

    fn stamp(&self, now: u64) {
        self.0.store(now, Ordering::SeqCst);
    }
}

thread_local! {
    static HELD: RefCell<Vec<Liveness>> = const { RefCell::new(Vec::new()) };
}

/// Makes `run` one of the runs this thread holds, and stamps it.
pub fn attach(run: &Liveness) {
    run.stamp(now_ms());
    HELD.with(|held| held.borrow_mut().push(run.clone()));
}

/// Stops stamping `run` from this thread.
pub fn detach(run: &Liveness) {
    HELD.with(|held| held.borrow_mut().retain(|r| !Arc::ptr_eq(&r.0, &run.0)));
}

/// Stamps every run this thread holds: it is making progress.
pub fn beat() {
    let now = now_ms();
    HELD.with(|held| held.borrow().iter().for_each(|run| run.stamp(now)));
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
