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
/// A job leased this recently is not forgotten for a heartbeat that does
/// not name it ([`Presence::holding`]).
const HELD_GRACE: Duration = Duration::from_secs(10);
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
    /// Jobs it leased through this coordinator that have not ended here,
    /// and when.
    leased: Vec<(ptune_core::JobId, Instant)>,
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
    seen: Arc<Mutex<Known>>,
    refresh: Duration,
}

/// The workers, and which of them leased each job that has not ended here.
#[derive(Debug, Default)]
struct Known {
    workers: HashMap<WorkerId, Seen>,
    leased_by: HashMap<ptune_core::JobId, WorkerId>,
}

impl Known {
    /// Forgets the worker and the jobs it leased.
    fn remove(&mut self, worker: WorkerId) {
        if let Some(seen) = self.workers.remove(&worker) {
            for (job, _) in seen.leased {
                self.leased_by.remove(&job);
            }
        }
    }
}

impl Presence {
    /// A worker's row is written again when older than `refresh` (half the
    /// lease timeout: a worker is online while its row is younger than the
    /// lease timeout, and the reaper's tick, 500 ms, comes well within the
    /// other half).
    pub fn new(refresh: Duration) -> Self {
        Self { seen: Arc::default(), refresh }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a call with `free_slots` and `loaded` must write the
    /// worker's row: something changed, or the row is old.
    pub fn must_write(&self, worker: WorkerId, free_slots: u32, loaded: &[String]) -> bool {
        self.lock().workers.get(&worker).is_none_or(|seen| {
            seen.written_at.elapsed() >= self.refresh
                || seen.written.as_ref().is_none_or(|(slots, models)| *slots != free_slots || models != loaded)
        })
    }

    /// The worker's row now says `free_slots` and `loaded`.
    pub fn written(&self, worker: WorkerId, free_slots: u32, loaded: Vec<String>) {
        let mut seen = self.lock();
        let entry = seen.workers.entry(worker).or_insert_with(|| Seen {
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
        self.lock().remove(worker);
    }

    /// Counts a call of the worker as waiting until the guard drops.
    pub fn waiting(&self, worker: WorkerId) -> Waiting {
        if let Some(seen) = self.lock().workers.get_mut(&worker) {
            seen.waiting += 1;
        }
        Waiting { presence: self.clone(), worker }
    }

    /// The waiting workers whose rows are old, now counted as written:
    /// mark them alive. Also forgets workers not heard of for long.
    pub fn due(&self) -> Vec<WorkerId> {
        let mut known = self.lock();
        let forgotten: Vec<WorkerId> = known
            .workers
            .iter()
            .filter(|(_, s)| s.waiting == 0 && s.written_at.elapsed() >= FORGET_AFTER)
            .map(|(worker, _)| *worker)
            .collect();
        for worker in forgotten {
            known.remove(worker);
        }
        known
            .workers
            .iter_mut()
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
        let read = seen.workers.get(&worker)?.read.as_ref()?;
        let same = read.models == models && read.free_slots == free_slots && read.loaded == loaded;
        (same && read.at.elapsed() < DRY_RECHECK).then(|| (read.counts.clone(), read.ripens))
    }

    /// The worker leased `job`.
    pub fn leased(&self, worker: WorkerId, job: ptune_core::JobId) {
        let mut known = self.lock();
        if let Some(seen) = known.workers.get_mut(&worker) {
            seen.leased.push((job, Instant::now()));
            known.leased_by.insert(job, worker);
        }
    }

    /// `job` ended: the worker that leased it has room again, so its last
    /// read no longer holds (whether or not its next call says so).
    pub fn ended(&self, job: ptune_core::JobId) {
        let mut known = self.lock();
        let Some(worker) = known.leased_by.remove(&job) else { return };
        if let Some(seen) = known.workers.get_mut(&worker) {
            seen.leased.retain(|(j, _)| *j != job);
            seen.read = None;
        }
    }

    /// The worker's heartbeat names the jobs it still holds: the others it
    /// leased here ended elsewhere (through another coordinator, or the
    /// reaper) and are forgotten, but for those leased within
    /// [`HELD_GRACE`], which a heartbeat sent meanwhile may not name yet.
    pub fn holding(&self, worker: WorkerId, jobs: &[ptune_core::JobId]) {
        let mut known = self.lock();
        let Some(seen) = known.workers.get_mut(&worker) else { return };
        let (kept, gone): (Vec<_>, Vec<_>) =
            seen.leased.drain(..).partition(|(j, at)| jobs.contains(j) || at.elapsed() < HELD_GRACE);
        seen.leased = kept;
        if !gone.is_empty() {
            seen.read = None;
        }
        for (job, _) in gone {
            known.leased_by.remove(&job);
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
        if let Some(seen) = self.lock().workers.get_mut(&worker) {
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
        if let Some(seen) = self.presence.lock().workers.get_mut(&self.worker) {
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

    #[test]
    fn a_heartbeat_forgets_the_jobs_that_ended_elsewhere() {
        let presence = Presence::new(Duration::from_secs(1));
        let (w, other) = (worker(), worker());
        let work = crate::events::WorkSignal::default();
        let models = vec!["m".to_string()];
        let job = || ptune_core::JobId(uuid::Uuid::new_v4());
        let (kept, gone, others, new) = (job(), job(), job(), job());
        presence.written(w, 1, vec![]);
        presence.written(other, 1, vec![]);
        presence.leased(w, kept);
        presence.leased(w, gone);
        presence.leased(other, others);
        let long_ago = Instant::now() - HELD_GRACE;
        presence.lock().workers.get_mut(&w).unwrap().leased.iter_mut().for_each(|(_, at)| *at = long_ago);
        presence.leased(w, new);
        presence.read(w, Some(work.counts(&models)), (&models, 1, &[]), None);
        presence.holding(w, &[kept]);
        assert_eq!(presence.last_read(w, &models, 1, &[]), None, "a job of it ended elsewhere: it has room again");
        let known = presence.lock();
        let held: Vec<_> = known.workers[&w].leased.iter().map(|(j, _)| *j).collect();
        assert_eq!(held, vec![kept, new], "a job leased just now is kept though the heartbeat does not name it");
        assert_eq!(known.leased_by.len(), 3, "{:?}", known.leased_by);
        assert!(!known.leased_by.contains_key(&gone));
        drop(known);
        presence.read(w, Some(work.counts(&models)), (&models, 1, &[]), None);
        presence.holding(w, &[kept]);
        assert!(presence.last_read(w, &models, 1, &[]).is_some(), "nothing ended: its read holds");
        presence.ended(others);
        assert!(presence.last_read(w, &models, 1, &[]).is_some(), "another worker's job ended");
        presence.forget(w);
        assert_eq!(presence.lock().leased_by.keys().collect::<Vec<_>>(), Vec::<&ptune_core::JobId>::new());
    }
}
