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
//! When a worker's call last found no queued job on its models, that read
//! is kept too ([`Presence::last_read`]): the
//! [`WorkSignal`](crate::events::WorkSignal) counts of its models then,
//! what it offered (free slots, loaded models), and when a queued job
//! becomes leasable by time alone. A worker's next call, while none of that
//! changed and none of its jobs ended, reads the queue only with a look
//! the signal gives it (a job was queued on one of its models since, and no
//! other waiting call took that read), so a worker renewing its wait every
//! few seconds reads nothing while the jobs queued meanwhile went to others.
//! [`DRY_RECHECK`] bounds how long a read is trusted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ptune_core::WorkerId;

use crate::events::WorkCounts;

/// How long a read of the queue is trusted without reading again, even if
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
    /// What its calls last read of the queue.
    read: Option<Read>,
    /// Jobs it leased through this coordinator that have not ended here.
    leased: Vec<ptune_core::JobId>,
}

/// A worker's last read of the queue; see [`Presence::last_read`].
#[derive(Debug)]
struct Read {
    counts: WorkCounts,
    models: Vec<String>,
    free_slots: u32,
    loaded: Vec<String>,
    at: Instant,
    ripens: Option<Instant>,
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
            read: None,
            leased: Vec::new(),
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

    /// The work counts at the worker's last read of the queue, and when a
    /// job it saw then becomes leasable by time alone; `None` when its
    /// offer (`models`, `free_slots`, `loaded`) differs from that read's,
    /// or the read is [`DRY_RECHECK`] old.
    pub fn last_read(
        &self,
        worker: WorkerId,
        models: &[String],
        free_slots: u32,
        loaded: &[String],
    ) -> Option<(WorkCounts, Option<Instant>)> {
        let seen = self.lock();
        let read = seen.get(&worker)?.read.as_ref()?;
        let same = read.models == models && read.free_slots == free_slots && read.loaded == loaded;
        (same && read.at.elapsed() < DRY_RECHECK).then(|| (read.counts.clone(), read.ripens))
    }

    /// The worker leased `job`.
    pub fn leased(&self, worker: WorkerId, job: ptune_core::JobId) {
        if let Some(seen) = self.lock().get_mut(&worker) {
            seen.leased.push(job);
        }
    }

    /// `job` ended: the worker that leased it has room again, so its last
    /// read no longer holds (whether or not its next call says so).
    pub fn ended(&self, job: ptune_core::JobId) {
        for seen in self.lock().values_mut() {
            if let Some(i) = seen.leased.iter().position(|j| *j == job) {
                seen.leased.swap_remove(i);
                seen.read = None;
                return;
            }
        }
    }

    /// The worker read the queue at `counts` (`None`: it found jobs it
    /// could not take, so the read does not hold for its next calls),
    /// offering `models`, `free_slots` and `loaded`; a job it saw becomes
    /// leasable at `ripens`.
    pub fn read(
        &self,
        worker: WorkerId,
        counts: Option<WorkCounts>,
        (models, free_slots, loaded): (&[String], u32, &[String]),
        ripens: Option<Instant>,
    ) {
        if let Some(seen) = self.lock().get_mut(&worker) {
            seen.read = counts.map(|counts| Read {
                counts,
                models: models.to_vec(),
                free_slots,
                loaded: loaded.to_vec(),
                at: Instant::now(),
                ripens,
            });
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
    fn a_read_holds_for_the_next_call_while_the_offer_is_the_same() {
        let presence = Presence::new(Duration::from_secs(1));
        let w = worker();
        let work = crate::events::WorkSignal::default();
        let models = vec!["m".to_string()];
        let counts = work.counts(&models);
        presence.read(w, Some(counts.clone()), (&models, 1, &[]), None);
        assert_eq!(presence.last_read(w, &models, 1, &[]), None, "an unknown worker has read nothing");
        presence.written(w, 1, vec![]);
        presence.read(w, Some(counts.clone()), (&models, 1, &[]), None);
        assert_eq!(presence.last_read(w, &models, 1, &[]), Some((counts, None)));
        assert_eq!(presence.last_read(w, &models, 2, &[]), None, "a slot came free");
        assert_eq!(presence.last_read(w, &models, 1, &models), None, "it loaded a model");
        assert_eq!(presence.last_read(w, &[], 1, &[]), None, "it serves other models");
        presence.read(w, None, (&models, 1, &[]), None);
        assert_eq!(presence.last_read(w, &models, 1, &[]), None, "it saw jobs it could not take");
        let job = ptune_core::JobId(uuid::Uuid::new_v4());
        presence.leased(w, job);
        presence.read(w, Some(work.counts(&models)), (&models, 1, &[]), None);
        presence.ended(job);
        assert_eq!(presence.last_read(w, &models, 1, &[]), None, "a job of it ended: it has room again");
    }
}
