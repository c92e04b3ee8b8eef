//! Job events from the other coordinators on the database: a listening
//! connection receives what they announce (`announce.rs`) or, for writers
//! that do not, what the triggers of migration 0011 send with `pg_notify`
//! (a job's progress, its lifecycle, the metrics a report records), skips
//! what this coordinator sent (it published those in process already), and
//! hands the rest to the local [`EventHub`], so `WatchJob` and the
//! dashboard on any replica see work reported to any other.
//!
//! It also wakes the `LeaseJob` calls waiting for work when a job becomes
//! leasable (`ptune_work`), and drops cached rows that changed
//! (`ptune_cache`, `store/cache.rs`).
//!
//! Notifications are not replayed. When the listening connection drops, the
//! hub is told to resync ([`HubEventKind::Resync`]): every watcher re-reads
//! its job; the store's cache is emptied and read through; and the relay
//! listens again once the database answers.

use std::time::Duration;

use ptune_core::{JobId, Metric, MetricKind};
use serde::Deserialize;
use sqlx::postgres::{PgListener, PgNotification};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::events::{EventHub, HubEventKind, WorkSignal};
use crate::store::Store;

/// The channel the triggers notify on.
pub const CHANNEL: &str = "ptune_events";
/// The channel of jobs becoming leasable (migration 0013).
pub const WORK_CHANNEL: &str = "ptune_work";
/// The channel of cached rows that changed (migration 0017, `store/cache.rs`).
pub const CACHE_CHANNEL: &str = "ptune_cache";
/// Wait before listening again after the connection failed.
const RETRY: Duration = Duration::from_secs(1);

/// Starts relaying other coordinators' events to `hub` until `stop`.
pub fn spawn(store: Store, hub: EventHub, work: WorkSignal, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => return,
                () = listen(&store, &hub, &work) => {}
            }
            hub.resync();
            store.distrust_cache();
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => return,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    })
}

/// Listens until the connection fails.
async fn listen(store: &Store, hub: &EventHub, work: &WorkSignal) {
    let mut listener = match PgListener::connect_with(store.pool()).await {
        Ok(listener) => listener,
        Err(e) => {
            debug!(error = %e, "cannot open the event listener's connection; retrying");
            return;
        }
    };
    if let Err(e) = listener.listen_all([CHANNEL, WORK_CHANNEL, CACHE_CHANNEL]).await {
        warn!(error = %e, "cannot listen for other coordinators' events; retrying");
        return;
    }
    info!(channel = CHANNEL, "listening for other coordinators' job events");
    // Whatever happened while nobody listened is read again.
    hub.resync();
    store.trust_cache();
    work.wake_all();
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) if notification.channel() == WORK_CHANNEL => work.queued(notification.payload()),
            Ok(Some(notification)) if notification.channel() == CACHE_CHANNEL => {
                if !store.forget_cached(notification.payload()) {
                    warn!(payload = notification.payload(), "unreadable cache notification; emptying the cache");
                    store.trust_cache();
                }
            }
            Ok(Some(notification)) => relay(store, hub, &notification).await,
            Ok(None) => {
                warn!("the event listener's connection dropped; watchers re-read their jobs");
                return;
            }
            Err(e) => {
                warn!(error = %e, "the event listener failed; watchers re-read their jobs");
                return;
            }
        }
    }
}

/// A notification as the triggers write it.
#[derive(Debug, Deserialize)]
struct Payload {
    /// The writing connection's `application_name`.
    #[serde(rename = "o", default)]
    origin: Option<String>,
    /// Absent from a `resync`.
    #[serde(rename = "j", default)]
    job: uuid::Uuid,
    #[serde(rename = "k")]
    kind: String,
    #[serde(rename = "s", default)]
    step: u64,
    #[serde(rename = "t", default)]
    total_steps: u64,
    /// Metrics as `[step, kind, name, value]`.
    #[serde(rename = "m", default)]
    metrics: Option<Vec<(u64, String, String, f64)>>,
    /// Steps of metrics too many for one notification.
    #[serde(default)]
    from: u64,
    #[serde(default)]
    to: u64,
}

async fn relay(store: &Store, hub: &EventHub, notification: &PgNotification) {
    let payload: Payload = match serde_json::from_str(notification.payload()) {
        Ok(payload) => payload,
        Err(e) => {
            warn!(error = %e, payload = notification.payload(), "unreadable job event; ignored");
            return;
        }
    };
    if payload.origin.as_deref() == Some(store.origin()) {
        return;
    }
    let job = JobId(payload.job);
    let kind = match payload.kind.as_str() {
        // The sender may have lost events (`announce.rs`).
        "resync" => HubEventKind::Resync,
        "changed" => HubEventKind::Changed,
        "progress" => HubEventKind::Progress { step: payload.step, total_steps: payload.total_steps },
        "metrics" => match payload.metrics {
            Some(rows) => HubEventKind::Metrics(
                rows.into_iter()
                    .filter_map(|(step, kind, name, value)| {
                        Some(Metric::new(step, kind.parse::<MetricKind>().ok()?, &name, value))
                    })
                    .collect(),
            ),
            None => match store.metrics(job, None).await {
                Ok(all) => HubEventKind::Metrics(
                    all.into_iter().filter(|m| (payload.from..=payload.to).contains(&m.step)).collect(),
                ),
                Err(e) => {
                    debug!(error = %e, job_id = %job, "cannot read relayed metrics; watchers re-read the job");
                    HubEventKind::Changed
                }
            },
        },
        other => {
            warn!(kind = other, "unknown job event kind; ignored");
            return;
        }
    };
    hub.deliver(job, kind);
}
