//! HTTP side of the coordinator: `/healthz` and Prometheus `/metrics`. A
//! richer dashboard comes later, here.

use std::fmt::Write;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tracing::warn;

use crate::store::Store;

#[derive(Clone)]
struct Dashboard {
    store: Store,
    /// A worker counts as online if it heartbeated within this window.
    online_window: Duration,
}

/// The HTTP routes; `online_window` is how recent a worker's last heartbeat
/// must be for it to count as online.
pub fn router(store: Store, online_window: Duration) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(Dashboard { store, online_window })
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

async fn metrics(State(d): State<Dashboard>) -> Response {
    let counts = d.store.job_counts().await;
    let online = d.store.workers_online(d.online_window).await;
    let sweeps = d.store.sweep_counts().await;
    let (counts, online, sweeps) = match (counts, online, sweeps) {
        (Ok(c), Ok(o), Ok(s)) => (c, o, s),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            warn!(error = %e, "reading metrics failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response();
        }
    };
    let mut text = String::new();
    text.push_str("# HELP ptune_jobs Jobs by state.\n# TYPE ptune_jobs gauge\n");
    for (state, n) in counts {
        let _ = writeln!(text, "ptune_jobs{{state=\"{state}\"}} {n}");
    }
    text.push_str("# HELP ptune_workers_online Workers that heartbeated within the lease timeout.\n");
    text.push_str("# TYPE ptune_workers_online gauge\n");
    let _ = writeln!(text, "ptune_workers_online {online}");
    text.push_str("# HELP ptune_sweeps Sweeps by state.\n# TYPE ptune_sweeps gauge\n");
    for (state, n) in sweeps {
        let _ = writeln!(text, "ptune_sweeps{{state=\"{state}\"}} {n}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}
