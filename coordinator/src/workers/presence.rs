//! What this coordinator knows of the workers asking it for work, so that
//! an idle fleet costs the database next to nothing.
//!
//! A worker that holds no lease does not heartbeat: its `LeaseJob` calls
//! say it is alive. Each call used to write the worker's row; now a call
//! writes only what changed (its free slots or loaded models) or what has
//! grown old ([`Presence::refresh`]). While a call waits for work, the
//! reaper's tick marks its worker alive in one statement for every waiting
//! worker whose row is that old ([`Presence::due`]), so a worker stays
//! online for as long as it waits, however long that is.
//!
//! A call that found no queued job at all on its worker's models remembers
//! the [`WorkSignal`](crate::events::WorkSignal) count of its models it
//! looked at ([`Presence::dry`]). Every job that becomes queued on one of
//! them, on any coordinator, changes that count, so the worker's next call,
//! until it changes, waits without reading the queue; [`DRY_RECHECK`]
//! bounds how long that trust lasts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ptune_core::WorkerId;

/// How long a queue found empty is trusted without looking again, even if
/// no notification came.
pub const DRY_RECHECK: Duration = Duration::from_secs(30);
/// A worker not heard of for this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Seen {
    /// Free slots and loaded models last written for it, and when.
    written: Option<(u32, Vec<String>)>,
    written_at: Instant,
    /// Its calls waiting now.
    waiting: u32,
    /// The work count at which its models had no queued job, and when.
    dry: Option<(u64, Instant)>,
}

/// See the module docs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Presence {
    seen: Arc<Mutex<HashMap<WorkerId, Seen>>>,
    refresh: Duration,
}

impl Presence {
    /// A worker's row is written again when older than `refresh` (half the
    /// lease timeout: a worker is online while its row is younger than the
    /// lease timeout, and the reaper's tick, 500 ms, comes well within the
    /// other half).
    pub fn new(refresh: Duration) -> Self {
        Self { seen: Arc::default(), refresh }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, Seen>> {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a call with `free_slots` and `loaded` must write the
    /// worker's row: something changed, or the row is old.
    pub fn must_write(&self, worker: WorkerId, free_slots: u32, loaded: &[String]) -> bool {
        self.lock().get(&worker).is_none_or(|seen| {
            seen.written_at.elapsed() >= self.refresh
                || seen.written.as_ref().is_none_or(|(slots, models)| *slots != free_slots || models != loaded)
        })
    }

    /// The worker's row now says `free_slots` and `loaded`.
    pub fn written(&self, worker: WorkerId, free_slots: u32, loaded: Vec<String>) {
        let mut seen = self.lock();
        let entry = seen.entry(worker).or_insert_with(|| Seen {
            written: None,
            written_at: Instant::now(),
            waiting: 0,
            dry: None,
        });
        entry.written = Some((free_slots, loaded));
        entry.written_at = Instant::now();
    }

    /// Forgets what was written for the worker: its next call writes. For
    /// a worker that registered again or heartbeat another state.
    pub fn forget(&self, worker: WorkerId) {
        self.lock().remove(&worker);
    }

    /// Counts a call of the worker as waiting until the guard drops.
    pub fn waiting(&self, worker: WorkerId) -> Waiting {
        if let Some(seen) = self.lock().get_mut(&worker) {
            seen.waiting += 1;
        }
        Waiting { presence: self.clone(), worker }
    }

    /// The waiting workers whose rows are old, now counted as written:
    /// mark them alive. Also forgets workers not heard of for long.
    pub fn due(&self) -> Vec<WorkerId> {
        let mut seen = self.lock();
        seen.retain(|_, s| s.waiting > 0 || s.written_at.elapsed() < FORGET_AFTER);
        seen.iter_mut()
            .filter(|(_, s)| s.waiting > 0 && s.written_at.elapsed() >= self.refresh)
            .map(|(worker, s)| {
                s.written_at = Instant::now();
                *worker
            })
            .collect()
    }

    /// Whether the worker's models had no queued job at work count
    /// `count`, looked at less than [`DRY_RECHECK`] ago.
    pub fn dry(&self, worker: WorkerId, count: u64) -> bool {
        self.lock()
            .get(&worker)
            .and_then(|s| s.dry)
            .is_some_and(|(at_count, at)| at_count == count && at.elapsed() < DRY_RECHECK)
    }

    /// Records whether the worker's models had no queued job at work count
    /// `count`.
    pub fn set_dry(&self, worker: WorkerId, count: u64, dry: bool) {
        if let Some(seen) = self.lock().get_mut(&worker) {
            seen.dry = dry.then(|| (count, Instant::now()));
        }
    }
}

/// A waiting call; see [`Presence::waiting`].
pub struct Waiting {
    presence: Presence,
    worker: WorkerId,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(seen) = self.presence.lock().get_mut(&self.worker) {
            seen.waiting = seen.waiting.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> WorkerId {
        WorkerId(uuid::Uuid::new_v4())
    }

    #[test]
    fn a_call_writes_only_what_changed_or_grew_old() {
        let presence = Presence::new(Duration::from_millis(50));
        let w = worker();
        assert!(presence.must_write(w, 2, &[]), "never written");
        presence.written(w, 2, vec![]);
        assert!(!presence.must_write(w, 2, &[]));
        assert!(presence.must_write(w, 1, &[]), "free slots changed");
        assert!(presence.must_write(w, 2, &["m".into()]), "loaded models changed");
        std::thread::sleep(Duration::from_millis(60));
        assert!(presence.must_write(w, 2, &[]), "old");
        presence.written(w, 2, vec![]);
        presence.forget(w);
        assert!(presence.must_write(w, 2, &[]), "forgotten");
    }

    #[test]
    fn only_waiting_workers_with_old_rows_are_due_and_then_not_again_at_once() {
        let presence = Presence::new(Duration::from_millis(30));
        let (waits, left) = (worker(), worker());
        presence.written(waits, 1, vec![]);
        presence.written(left, 1, vec![]);
        let guard = presence.waiting(waits);
        assert!(presence.due().is_empty(), "rows are fresh");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(presence.due(), vec![waits], "only the waiting worker");
        assert!(presence.due().is_empty(), "just marked");
        drop(guard);
        std::thread::sleep(Duration::from_millis(40));
        assert!(presence.due().is_empty(), "no longer waiting");
    }

    #[test]
    fn an_empty_queue_is_trusted_only_at_the_work_count_it_was_seen_at() {
        let presence = Presence::new(Duration::from_secs(1));
        let w = worker();
        presence.set_dry(w, 7, true);
        assert!(!presence.dry(w, 7), "an unknown worker is never dry");
        presence.written(w, 1, vec![]);
        presence.set_dry(w, 7, true);
        assert!(presence.dry(w, 7));
        assert!(!presence.dry(w, 8), "a job was queued since");
        presence.set_dry(w, 8, false);
        assert!(!presence.dry(w, 8));
    }
}
