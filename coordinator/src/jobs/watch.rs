//! `WatchJob`: a snapshot, then progress, metrics and state changes until
//! the job finishes.
//!
//! The watcher subscribes to the hub before it reads the snapshot, so no
//! event between the two is lost. Events of other coordinators reach the
//! hub through PostgreSQL (`relay.rs`). The hub is only a cache: on a lag, a
//! resync (the relay lost its connection), and every few seconds, the job is
//! re-read from the database.

use std::time::Duration;

use futures::Stream;
use ptune_core::JobId;
use tokio::sync::{broadcast, mpsc, watch as signal};
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use crate::error::Error;
use crate::events::{EventHub, HubEventKind};
use crate::model::{Job, JobEvent};
use crate::store::Store;

/// How often a watcher re-reads the job from the database.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

pub(super) async fn watch(
    store: Store,
    hub: &EventHub,
    shutdown: signal::Receiver<bool>,
    id: JobId,
) -> Result<impl Stream<Item = Result<JobEvent, Error>> + Send + 'static, Error> {
    let events = hub.subscribe();
    let job = store.get_job(id).await?.ok_or_else(|| super::not_found(id))?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(Watcher { store, id, tx, last: job.clone() }.run(job, events, shutdown));
    Ok(ReceiverStream::new(rx))
}

struct Watcher {
    store: Store,
    id: JobId,
    tx: mpsc::Sender<Result<JobEvent, Error>>,
    /// The last snapshot sent.
    last: Job,
}

impl Watcher {
    async fn run(
        mut self,
        first: Job,
        mut events: broadcast::Receiver<crate::events::HubEvent>,
        mut shutdown: signal::Receiver<bool>,
    ) {
        if !self.send_snapshot(first).await {
            return;
        }
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.tick().await;
        loop {
            let more = tokio::select! {
                () = self.tx.closed() => false,
                () = stopping(&mut shutdown) => {
                    let _ = self.tx.send(Err(Error::ShuttingDown)).await;
                    false
                }
                event = events.recv() => match event {
                    Ok(event) if event.kind == HubEventKind::Resync => self.refresh(true).await,
                    Ok(event) if event.job_id != self.id => true,
                    Ok(event) => match event.kind {
                        HubEventKind::Changed => self.refresh(false).await,
                        HubEventKind::Progress { step, total_steps } => self.send(JobEvent::Progress { step, total_steps }).await,
                        HubEventKind::Metrics(metrics) => self.send(JobEvent::Metrics(metrics)).await,
                        HubEventKind::Resync => self.refresh(true).await,
                    },
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        debug!(job_id = %self.id, missed, "watcher lagged; re-reading the job");
                        self.refresh(true).await
                    }
                    Err(broadcast::error::RecvError::Closed) => false,
                },
                _ = poll.tick() => self.refresh(false).await,
            };
            if !more {
                return;
            }
        }
    }

    /// Re-reads the job and sends it if `always`, or if its lifecycle changed
    /// since the last snapshot (a hub event and a poll may both notice one
    /// change: it is sent once). False once the stream should end.
    async fn refresh(&mut self, always: bool) -> bool {
        match self.store.get_job(self.id).await {
            Ok(Some(job)) => {
                if always || lifecycle(&job) != lifecycle(&self.last) {
                    self.send_snapshot(job).await
                } else {
                    true
                }
            }
            Ok(None) => {
                let _ = self.tx.send(Err(super::not_found(self.id))).await;
                false
            }
            Err(e) => {
                let _ = self.tx.send(Err(e.into())).await;
                false
            }
        }
    }

    /// Sends a snapshot; false once the job is finished or the client left.
    async fn send_snapshot(&mut self, job: Job) -> bool {
        let finished = job.state.is_terminal();
        self.last = job.clone();
        self.send(JobEvent::Snapshot(Box::new(job))).await && !finished
    }

    async fn send(&self, event: JobEvent) -> bool {
        self.tx.send(Ok(event)).await.is_ok()
    }
}

/// The parts of a job whose change makes a new snapshot worth sending.
fn lifecycle(job: &Job) -> (ptune_core::JobState, bool, u32, Option<ptune_core::WorkerId>, &str) {
    (job.state, job.cancel_requested, job.attempts, job.worker_id, &job.error)
}

/// Resolves once shutdown starts (or its sender is gone).
async fn stopping(shutdown: &mut signal::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
