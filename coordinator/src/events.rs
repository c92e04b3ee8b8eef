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

/// Jobs may have become leasable: one was queued, by this coordinator or
/// another (migration 0013's `ptune_work` notifications, relayed by
/// `relay.rs`). `LeaseJob` calls waiting for work look again when it
/// changes. Cheap to clone.
#[derive(Clone, Debug)]
pub struct WorkSignal(std::sync::Arc<tokio::sync::watch::Sender<u64>>);

impl Default for WorkSignal {
    fn default() -> Self {
        Self(std::sync::Arc::new(tokio::sync::watch::channel(0).0))
    }
}

impl WorkSignal {
    /// Wakes every waiting call.
    pub fn wake(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees the next [`WorkSignal::wake`].
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}
