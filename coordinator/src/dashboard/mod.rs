//! HTTP side of the coordinator: the operator dashboard (a page and its
//! assets, all embedded in the binary), its JSON API under `/api/`, live
//! updates as server-sent events, `/healthz` and Prometheus `/metrics`.
//!
//! Every figure comes from PostgreSQL, so several coordinators on one
//! database show the same dashboard; the event stream only says when to
//! read again.

mod api;
mod assets;
mod events;
pub mod guard;

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tracing::warn;

use crate::events::EventHub;
use crate::limits::StreamLimits;
use crate::metrics;
use crate::store::Store;

/// What the HTTP handlers share. Cheap to clone.
#[derive(Clone)]
pub struct Dashboard {
    store: Store,
    hub: EventHub,
    /// A worker counts as online if it heartbeated within this window.
    online_window: Duration,
    /// Turns true when the coordinator stops; event streams end then.
    stopped: watch::Receiver<bool>,
    /// Who may see what, and the hosts it answers to.
    guard: guard::GuardSettings,
    /// Open event streams, shared with `WatchJob`.
    streams: StreamLimits,
}

impl Dashboard {
    /// `online_window` is how recent a worker's last heartbeat must be for
    /// it to count as online; event streams end when `stopped` turns true.
    pub fn new(
        store: Store,
        hub: EventHub,
        online_window: Duration,
        stopped: watch::Receiver<bool>,
        guard: guard::GuardSettings,
        streams: StreamLimits,
    ) -> Self {
        Self { store, hub, online_window, stopped, guard, streams }
    }
}

/// The HTTP routes.
pub fn router(dashboard: Dashboard) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{*path}", get(assets::asset))
        .route("/healthz", get(healthz))
        .route("/livez", get(|| async { "ok" }))
        .route("/login", get(guard::login_page).post(guard::login))
        .route("/logout", axum::routing::post(guard::logout))
        .route("/metrics", get(prometheus))
        .nest("/api", api::routes())
        .layer(axum::middleware::from_fn_with_state(dashboard.clone(), guard::guard))
        .with_state(dashboard)
}

async fn healthz(State(d): State<Dashboard>) -> Response {
    match d.store.ping().await {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(e) => {
            warn!(error = %e, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

async fn prometheus(State(d): State<Dashboard>) -> Response {
    match d.store.fleet_levels(d.online_window).await {
        Ok(levels) => {
            let text = d.store.prometheus().encode(levels);
            ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
        }
        Err(e) => {
            warn!(error = %e, "reading metrics failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}
