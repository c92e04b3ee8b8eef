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
use crate::jobs::Jobs;
use crate::limits::StreamLimits;
use crate::metrics;
use crate::store::Store;
use crate::sweep::Sweeps;

/// What the HTTP handlers share. Cheap to clone.
#[derive(Clone)]
pub struct Dashboard {
    /// The dashboard's own figures (tables, curves, workers, the overview).
    store: Store,
    /// Single jobs and sweeps, read as gRPC reads them.
    jobs: Jobs,
    sweeps: Sweeps,
    /// A worker counts as online if it heartbeated within this window.
    online_window: Duration,
    live: Live,
    /// Who may see what, and the hosts it answers to.
    guard: guard::GuardSettings,
}

/// What the live event stream needs.
#[derive(Clone)]
pub struct Live {
    pub hub: EventHub,
    /// Turns true when the coordinator stops; event streams end then.
    pub stopped: watch::Receiver<bool>,
    /// Open event streams, shared with `WatchJob`.
    pub streams: StreamLimits,
}

impl Dashboard {
    /// `online_window` is how recent a worker's last heartbeat must be for
    /// it to count as online.
    pub fn new(
        store: Store,
        jobs: Jobs,
        sweeps: Sweeps,
        online_window: Duration,
        live: Live,
        guard: guard::GuardSettings,
    ) -> Self {
        Self { store, jobs, sweeps, online_window, live, guard }
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
