//! Announcing this coordinator's job events to the other coordinators on the
//! database, after the writes that made them commit.
//!
//! Every event this coordinator publishes to its [`EventHub`] (a job's
//! lifecycle changed, its progress, the metrics a report recorded) is queued
//! here, and one task sends what is queued as `ptune_events` notifications,
//! as many as are waiting in one statement, in the payload format of
//! migration 0011's triggers, which `relay.rs` reads on the other side.
//!
//! Why not from the triggers, in the writing transaction: a transaction that
//! notifies holds PostgreSQL's notification-queue lock from its commit until
//! the commit is flushed to disk, so notifying transactions commit one after
//! the other, each waiting out its own flush. Leases, progress reports and
//! completions all notified, and that lock capped the fleet at about one job
//! cycle per three flushes. The writing transactions now notify nothing
//! (this coordinator's connections set `ptune.announces`, migration 0019),
//! and the notifying statement here carries no data, so it commits without
//! waiting for a flush (`synchronous_commit` off for its transaction) and
//! holds the lock for an instant, however many events it carries.
//!
//! An event is announced after its change committed, never before, so a
//! peer that hears it reads the change. What the notifications cannot give
//! is delivery when this process dies between the commit and the announce
//! (a few milliseconds at most): its peers then miss those events. So a
//! coordinator announces a resync when it starts, and every peer's watchers
//! re-read their jobs, as they do when their own listening connection drops.
//! The same happens when events come faster than the database takes them
//! and the queue overflows. The job rows themselves are never at stake:
//! only a watcher's live view of another replica's work is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ptune_core::Metric;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::events::{HubEvent, HubEventKind};
use crate::relay::CHANNEL;
use crate::store::Store;

/// Events queued for announcement at most; past it they are dropped and the
/// peers are told to resync.
const QUEUE: usize = 65_536;
/// Notifications one statement sends at most.
const BATCH: usize = 1_000;
/// The longest payload sent whole; pg_notify refuses 8,000 bytes or more.
/// Metrics that do not fit are announced as the steps they span, which the
/// peers read from the database.
const MAX_PAYLOAD: usize = 7_000;

/// The sending side, held by the [`EventHub`](crate::events::EventHub).
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Announcer {
    tx: mpsc::Sender<HubEvent>,
    /// An event was dropped since the last announcement.
    dropped: Arc<AtomicBool>,
}

impl Announcer {
    /// Queues `event` for the peers; never waits.
    pub fn announce(&self, event: &HubEvent) {
        if matches!(event.kind, HubEventKind::Resync) {
            return;
        }
        if self.tx.try_send(event.clone()).is_err() {
            self.dropped.store(true, Ordering::Relaxed);
        }
    }
}

/// The announcing task; [`AnnouncerTask::finish`] sends what is queued and
/// ends it.
pub struct AnnouncerTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl AnnouncerTask {
    /// Sends what was queued until now and ends the task: called once
    /// nothing publishes any more.
    pub async fn finish(self) -> Result<(), tokio::task::JoinError> {
        let _ = self.stop.send(true);
        self.task.await
    }
}

/// Starts announcing on `store`'s database; the first announcement tells
/// the peers to resync (see the module's documentation).
pub fn spawn(store: Store) -> (Announcer, AnnouncerTask) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let dropped = Arc::new(AtomicBool::new(true));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run(store, rx, dropped.clone(), stopped));
    (Announcer { tx, dropped }, AnnouncerTask { stop, task })
}

async fn run(store: Store, mut rx: mpsc::Receiver<HubEvent>, dropped: Arc<AtomicBool>, mut stop: watch::Receiver<bool>) {
    let origin = store.origin().to_string();
    let mut events = Vec::with_capacity(BATCH);
    // The resync of a coordinator starting goes out at once, not with its
    // first event; if the database is not there yet, with the first event.
    let mut starting = true;
    loop {
        let stopping = if std::mem::take(&mut starting) {
            false
        } else {
            tokio::select! {
                received = rx.recv_many(&mut events, BATCH) => received == 0,
                _ = stop.wait_for(|stopped| *stopped) => true,
            }
        };
        if stopping {
            while let Ok(event) = rx.try_recv() {
                events.push(event);
            }
        }
        let mut payloads = Vec::with_capacity(events.len() + 1);
        if dropped.swap(false, Ordering::Relaxed) {
            payloads.push(resync(&origin));
        }
        payloads.extend(events.drain(..).map(|event| payload(&origin, &event)));
        for chunk in payloads.chunks(BATCH) {
            if let Err(e) = store.notify_all(CHANNEL, chunk).await {
                // The peers' listening connections fail as well when the
                // database is down, and they resync when they listen again.
                debug!(error = %e, events = chunk.len(), "cannot announce job events; the peers resync");
                dropped.store(true, Ordering::Relaxed);
            }
        }
        if stopping {
            return;
        }
    }
}

/// `event` as migration 0011's triggers write it.
fn payload(origin: &str, event: &HubEvent) -> String {
    let job = event.job_id.0;
    match &event.kind {
        HubEventKind::Changed => json!({ "o": origin, "j": job, "k": "changed" }),
        HubEventKind::Progress { step, total_steps } => {
            json!({ "o": origin, "j": job, "k": "progress", "s": step, "t": total_steps })
        }
        HubEventKind::Metrics(metrics) => return metrics_payload(origin, job, metrics),
        HubEventKind::Resync => return resync(origin),
    }
    .to_string()
}

/// Tells the peers to re-read what they watch: events of `origin` may be lost.
fn resync(origin: &str) -> String {
    json!({ "o": origin, "k": "resync" }).to_string()
}

/// Metrics inline when they fit and JSON can carry every value (not NaN or
/// infinite), else the steps they span.
fn metrics_payload(origin: &str, job: uuid::Uuid, metrics: &[Metric]) -> String {
    if metrics.iter().all(|m| m.value.is_finite()) {
        let rows: Vec<_> = metrics.iter().map(|m| json!([m.step, m.kind.as_str(), m.name, m.value])).collect();
        let whole = json!({ "o": origin, "j": job, "k": "metrics", "m": rows }).to_string();
        if whole.len() <= MAX_PAYLOAD {
            return whole;
        }
    }
    let from = metrics.iter().map(|m| m.step).min().unwrap_or(0);
    let to = metrics.iter().map(|m| m.step).max().unwrap_or(0);
    json!({ "o": origin, "j": job, "k": "metrics", "from": from, "to": to }).to_string()
}

#[cfg(test)]
mod tests {
    use ptune_core::{JobId, MetricKind};

    use super::*;

    fn parsed(text: &str) -> serde_json::Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn events_are_written_as_the_triggers_write_them() {
        let job = JobId(uuid::Uuid::new_v4());
        let changed = payload("me", &HubEvent { job_id: job, kind: HubEventKind::Changed });
        assert_eq!(parsed(&changed), json!({ "o": "me", "j": job.0, "k": "changed" }));
        let progress = payload("me", &HubEvent { job_id: job, kind: HubEventKind::Progress { step: 3, total_steps: 9 } });
        assert_eq!(parsed(&progress), json!({ "o": "me", "j": job.0, "k": "progress", "s": 3, "t": 9 }));
        let metrics = vec![Metric::new(2, MetricKind::Train, "loss", 0.5), Metric::new(2, MetricKind::Eval, "accuracy", 0.75)];
        let sent = payload("me", &HubEvent { job_id: job, kind: HubEventKind::Metrics(metrics) });
        assert_eq!(
            parsed(&sent),
            json!({ "o": "me", "j": job.0, "k": "metrics", "m": [[2, "train", "loss", 0.5], [2, "eval", "accuracy", 0.75]] })
        );
    }

    #[test]
    fn metrics_that_do_not_fit_or_are_not_finite_name_their_steps() {
        let job = uuid::Uuid::new_v4();
        let many: Vec<Metric> = (10..1_000).map(|step| Metric::new(step, MetricKind::Train, "loss", 0.25)).collect();
        let sent = metrics_payload("me", job, &many);
        assert!(sent.len() <= MAX_PAYLOAD);
        assert_eq!(parsed(&sent), json!({ "o": "me", "j": job, "k": "metrics", "from": 10, "to": 999 }));
        let diverged = [Metric::new(4, MetricKind::Train, "loss", f64::NAN)];
        assert_eq!(parsed(&metrics_payload("me", job, &diverged)), json!({ "o": "me", "j": job, "k": "metrics", "from": 4, "to": 4 }));
    }
}
