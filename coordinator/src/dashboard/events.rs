//! `/api/events`: server-sent events that tell an open dashboard when to
//! read again. Job events from the hub are coalesced into one `jobs` event
//! per half second (the ids that changed, progressed or got metrics); a
//! `tick` every few seconds refreshes what changes without events
//! (heartbeat ages, changes made by another coordinator). The data itself
//! always comes from the JSON API, so a missed event costs nothing.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::Dashboard;
use crate::auth::Identity;
use crate::events::{HubEvent, HubEventKind};

/// How often pending job events are sent.
const COALESCE: Duration = Duration::from_millis(500);
/// How often a `tick` is sent.
const TICK: Duration = Duration::from_secs(3);
/// Most job ids in one `jobs` event; beyond, `more` is set and clients re-read everything.
const MAX_IDS: usize = 200;

/// Opens an event stream, within the caller's share of open streams
/// (`ResourceExhausted`, a 429, beyond it).
pub(super) async fn events(State(d): State<Dashboard>, Extension(caller): Extension<Identity>) -> Response {
    let permit = match d.live.streams.acquire(&caller, "dashboard events") {
        Ok(permit) => permit,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        forward(d, tx).await;
        drop(permit);
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
}

#[derive(Default)]
struct Pending {
    changed: BTreeSet<String>,
    progressed: BTreeSet<String>,
    more: bool,
}

impl Pending {
    fn add(&mut self, event: HubEvent) {
        if self.changed.len() + self.progressed.len() >= MAX_IDS {
            self.more = true;
            return;
        }
        let set = match event.kind {
            // Something may have been missed: the page reloads what it shows.
            HubEventKind::Resync => {
                self.more = true;
                return;
            }
            HubEventKind::Changed => &mut self.changed,
            HubEventKind::Progress { .. } | HubEventKind::Metrics(_) => &mut self.progressed,
        };
        set.insert(event.job_id.to_string());
    }

    fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.progressed.is_empty() && !self.more
    }
}

/// Feeds one client until it goes away or the coordinator stops.
async fn forward(d: Dashboard, tx: mpsc::Sender<Result<Event, Infallible>>) {
    let mut hub = d.live.hub.subscribe();
    let mut stopped = d.live.stopped.clone();
    let mut flush = tokio::time::interval(COALESCE);
    let mut tick = tokio::time::interval(TICK);
    let mut pending = Pending::default();
    if tx.send(Ok(Event::default().event("hello").data("{}"))).await.is_err() {
        return;
    }
    loop {
        let event = tokio::select! {
            () = tx.closed() => return,
            _ = stopped.wait_for(|stop| *stop) => return,
            received = hub.recv() => {
                match received {
                    Ok(event) => pending.add(event),
                    Err(broadcast::error::RecvError::Lagged(_)) => pending.more = true,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                continue;
            }
            _ = flush.tick() => {
                if pending.is_empty() {
                    continue;
                }
                let p = std::mem::take(&mut pending);
                Event::default()
                    .event("jobs")
                    .data(json!({ "changed": p.changed, "progressed": p.progressed, "more": p.more }).to_string())
            }
            _ = tick.tick() => Event::default().event("tick").data("{}"),
        };
        if tx.send(Ok(event)).await.is_err() {
            return;
        }
    }
}
