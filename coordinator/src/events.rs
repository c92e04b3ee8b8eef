//! In-process fan-out of job events to `WatchJob` streams and the
//! dashboard. What this coordinator changes is published here directly;
//! what other coordinators on the database change arrives through
//! PostgreSQL (`relay.rs`). The hub is a cache: a watcher that falls behind,
//! or is told to resync because the relay lost its connection, re-reads the
//! job from the database.

use ptune_core::{JobId, Metric};
use tokio::sync::broadcast;

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
}

impl EventHub {
    pub fn new(capacity: usize) -> Self {
        Self { tx: broadcast::channel(capacity).0 }
    }

    /// Publishes to the current subscribers; nobody listening is fine.
    pub fn publish(&self, job_id: JobId, kind: HubEventKind) {
        let _ = self.tx.send(HubEvent { job_id, kind });
    }

    /// Tells every subscriber that events may have been missed.
    pub fn resync(&self) {
        self.publish(JobId(uuid::Uuid::nil()), HubEventKind::Resync);
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
/// whose payload is the model, relayed by `relay.rs`). `LeaseJob` calls
/// waiting for work wake when it changes and look at the queue again only
/// when [`WorkSignal::count_for`] their models moved: a job queued on one
/// model costs the workers waiting on others no read. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct WorkSignal(std::sync::Arc<WorkState>);

#[derive(Debug)]
struct WorkState {
    /// Every change, for waking.
    changes: tokio::sync::watch::Sender<u64>,
    /// Jobs queued per model, as notified.
    per_model: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Wakes of every waiting call (the notifications may have been missed).
    everything: std::sync::atomic::AtomicU64,
}

impl Default for WorkState {
    fn default() -> Self {
        Self {
            changes: tokio::sync::watch::channel(0).0,
            per_model: Default::default(),
            everything: Default::default(),
        }
    }
}

impl WorkSignal {
    /// A job on `model` may have become leasable.
    pub fn queued(&self, model: &str) {
        *self.0.per_model.lock().unwrap_or_else(|e| e.into_inner()).entry(model.to_string()).or_default() += 1;
        self.0.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Any job may have become leasable (notifications may have been lost).
    pub fn wake_all(&self) {
        self.0.everything.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A count that moves whenever a job on one of `models` may have become
    /// leasable: equal counts mean nothing new for them.
    pub fn count_for(&self, models: &[String]) -> u64 {
        let per_model = self.0.per_model.lock().unwrap_or_else(|e| e.into_inner());
        models
            .iter()
            .filter_map(|m| per_model.get(m))
            .fold(self.0.everything.load(std::sync::atomic::Ordering::SeqCst), |sum, n| sum.wrapping_add(*n))
    }

    /// A receiver that sees the next change, for any model.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::WorkSignal;

    #[test]
    fn a_job_queued_on_one_model_moves_the_count_of_its_waiters_only() {
        let work = WorkSignal::default();
        let (a, b, both) = (vec!["a".to_string()], vec!["b".to_string()], vec!["a".to_string(), "b".to_string()]);
        let mut woken = work.subscribe();
        let before = (work.count_for(&a), work.count_for(&b), work.count_for(&both));
        work.queued("a");
        assert!(woken.has_changed().unwrap(), "every waiting call wakes");
        woken.borrow_and_update();
        assert_ne!(work.count_for(&a), before.0);
        assert_eq!(work.count_for(&b), before.1, "nothing new for a worker serving b alone");
        assert_ne!(work.count_for(&both), before.2);
        let before = (work.count_for(&a), work.count_for(&b));
        work.wake_all();
        assert!(woken.has_changed().unwrap());
        assert_ne!(work.count_for(&a), before.0);
        assert_ne!(work.count_for(&b), before.1, "after lost notifications every worker looks again");
    }
}
