//! In-process fan-out of job events to `WatchJob` streams and the
//! dashboard. What this coordinator changes is published here directly,
//! and announced to the other coordinators after it committed
//! (`announce.rs`); what other coordinators on the database change arrives
//! through PostgreSQL (`relay.rs`). The hub is a cache: a watcher that
//! falls behind, or is told to resync because the relay lost its
//! connection, re-reads the job from the database.

use ptune_core::{JobId, Metric};
use tokio::sync::broadcast;

use crate::announce::Announcer;

/// Something that happened to a job.
#[derive(Clone, Debug, PartialEq)]
pub struct HubEvent {
    pub job_id: JobId,
    pub kind: HubEventKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum HubEventKind {
    /// The job's row changed (state, cancellation): re-read it.
    Changed,
    Progress {
        step: u64,
        total_steps: u64,
    },
    Metrics(Vec<Metric>),
    /// Events may have been missed (for every job, whatever `job_id` says):
    /// re-read what is being watched.
    Resync,
}

/// A broadcast channel shared by every publisher and watcher.
#[derive(Clone, Debug)]
pub struct EventHub {
    tx: broadcast::Sender<HubEvent>,
    /// Where this coordinator's own events go to the other coordinators,
    /// when it announces them itself (`announce.rs`).
    announcer: Option<Announcer>,
}

impl EventHub {
    pub fn new(capacity: usize) -> Self {
        Self { tx: broadcast::channel(capacity).0, announcer: None }
    }

    /// A hub whose published events also go to the other coordinators
    /// through `announcer`.
    pub fn announcing(announcer: Announcer) -> Self {
        Self { announcer: Some(announcer), ..Self::default() }
    }

    /// Publishes an event of this coordinator's to the current subscribers
    /// (nobody listening is fine) and, when it announces, to the other
    /// coordinators. Call it once the change is committed.
    pub fn publish(&self, job_id: JobId, kind: HubEventKind) {
        let event = HubEvent { job_id, kind };
        if let Some(announcer) = &self.announcer {
            announcer.announce(&event);
        }
        let _ = self.tx.send(event);
    }

    /// Hands another coordinator's event to the current subscribers only.
    pub fn deliver(&self, job_id: JobId, kind: HubEventKind) {
        let _ = self.tx.send(HubEvent { job_id, kind });
    }

    /// Tells every subscriber that events may have been missed.
    pub fn resync(&self) {
        self.deliver(JobId(uuid::Uuid::nil()), HubEventKind::Resync);
    }

    /// Events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.tx.subscribe()
    }
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new(1024)
    }
}

/// Jobs may have become leasable: one was queued on a base model, by this
/// coordinator or another (migration 0013's `ptune_work` notifications,
/// whose payload is the model, relayed by `relay.rs`). Cheap to clone.
///
/// Every `LeaseJob` call waiting for work wakes on any change, but reads the
/// queue only when it may find something: a job on one model costs the
/// workers waiting on others no read ([`WorkSignal::counts`]), and of those
/// waiting on the model, only as many read as can take what was queued.
/// Each notification adds one look ([`WorkSignal::take_look`]) for the
/// model; the call that takes it hands more on after it read the queue
/// ([`WorkSignal::hand_on`]): two when it leased a job and saw others
/// queued behind it (so a batch of jobs reaches waiting workers in a
/// doubling wave), one when it could take none of the jobs it saw (another
/// worker may fit them). A call takes a look only when its models' counts
/// moved since it last read, so a look handed on never returns to it.
#[derive(Clone, Debug, Default)]
pub struct WorkSignal(std::sync::Arc<WorkState>);

#[derive(Debug)]
struct WorkState {
    /// Every change, for waking.
    changes: tokio::sync::watch::Sender<u64>,
    models: std::sync::Mutex<std::collections::HashMap<String, ModelWork>>,
    /// Wakes of every waiting call, each to read (notifications may have
    /// been missed).
    everything: std::sync::atomic::AtomicU64,
}

/// What was notified of one model.
#[derive(Debug, Default)]
struct ModelWork {
    /// Notifications so far.
    queued: u64,
    /// Reads of the queue that waiting calls may still make.
    looks: u32,
}

/// Looks a model may hold at most: more than this many waiting calls
/// reading at once gain nothing.
const MAX_LOOKS: u32 = 256;

/// Where the work of some models stands ([`WorkSignal::counts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkCounts {
    everything: u64,
    queued: Vec<u64>,
}

impl WorkCounts {
    /// One number that moves whenever any of these counts does.
    pub fn total(&self) -> u64 {
        self.queued.iter().fold(self.everything, |sum, n| sum.wrapping_add(*n))
    }
}

impl Default for WorkState {
    fn default() -> Self {
        Self {
            changes: tokio::sync::watch::channel(0).0,
            models: Default::default(),
            everything: Default::default(),
        }
    }
}

impl WorkSignal {
    fn models(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, ModelWork>> {
        self.0.models.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        self.0.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A job on `model` may have become leasable.
    pub fn queued(&self, model: &str) {
        let mut models = self.models();
        let work = models.entry(model.to_string()).or_default();
        work.queued += 1;
        work.looks = (work.looks + 1).min(MAX_LOOKS);
        drop(models);
        self.wake();
    }

    /// Any job may have become leasable (notifications may have been lost):
    /// every waiting call reads.
    pub fn wake_all(&self) {
        self.0.everything.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.wake();
    }

    /// The counts of `models`, in their order.
    pub fn counts(&self, models: &[String]) -> WorkCounts {
        let work = self.models();
        WorkCounts {
            everything: self.0.everything.load(std::sync::atomic::Ordering::SeqCst),
            queued: models.iter().map(|m| work.get(m).map_or(0, |w| w.queued)).collect(),
        }
    }

    /// Whether a call that last read at `then` reads now: when every call
    /// was woken to read, or a look is left on one of `models` whose count
    /// moved since (taking it). The model it took a look of, if any.
    pub fn take_look(&self, models: &[String], then: &WorkCounts, now: &WorkCounts) -> Option<Option<String>> {
        if now.everything != then.everything {
            return Some(None);
        }
        let mut work = self.models();
        for (i, model) in models.iter().enumerate() {
            if then.queued.get(i) == now.queued.get(i) {
                continue;
            }
            if let Some(w) = work.get_mut(model).filter(|w| w.looks > 0) {
                w.looks -= 1;
                return Some(Some(model.clone()));
            }
        }
        None
    }

    /// Hands `n` looks at `model` on to other waiting calls.
    pub fn hand_on(&self, model: &str, n: u32) {
        if n == 0 {
            return;
        }
        let mut models = self.models();
        let work = models.entry(model.to_string()).or_default();
        work.looks = (work.looks + n).min(MAX_LOOKS);
        drop(models);
        self.wake();
    }

    /// A receiver that sees the next change, for any model.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::WorkSignal;

    fn models(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_job_queued_on_one_model_lets_one_of_its_waiters_read() {
        let work = WorkSignal::default();
        let (a, b) = (models(&["a"]), models(&["b"]));
        let mut woken = work.subscribe();
        let (then_a, then_b) = (work.counts(&a), work.counts(&b));
        work.queued("a");
        assert!(woken.has_changed().unwrap(), "every waiting call wakes");
        woken.borrow_and_update();
        let (now_a, now_b) = (work.counts(&a), work.counts(&b));
        assert_eq!(then_b, now_b, "nothing new for a worker serving b alone");
        assert_eq!(work.take_look(&b, &then_b, &now_b), None);
        assert_ne!(then_a.total(), now_a.total());
        assert_eq!(work.take_look(&a, &then_a, &now_a), Some(Some("a".to_string())), "the first reads");
        assert_eq!(work.take_look(&a, &then_a, &now_a), None, "the second waits: one job, one look");

        work.hand_on("a", 2);
        assert!(woken.has_changed().unwrap(), "handing on wakes the others");
        assert_eq!(work.take_look(&a, &then_a, &now_a), Some(Some("a".to_string())));
        assert_eq!(work.take_look(&a, &now_a, &now_a), None, "a call that read at these counts takes no look");
        assert_eq!(work.take_look(&a, &then_a, &now_a), Some(Some("a".to_string())));
        assert_eq!(work.take_look(&a, &then_a, &now_a), None);
    }

    #[test]
    fn after_lost_notifications_every_waiting_call_reads() {
        let work = WorkSignal::default();
        let (a, b) = (models(&["a"]), models(&["b"]));
        let (then_a, then_b) = (work.counts(&a), work.counts(&b));
        work.wake_all();
        assert_eq!(work.take_look(&a, &then_a, &work.counts(&a)), Some(None));
        assert_eq!(work.take_look(&b, &then_b, &work.counts(&b)), Some(None));
        assert_ne!(then_b.total(), work.counts(&b).total());
    }
}
