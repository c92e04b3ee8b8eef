//! The dashboard's page, script, styles and the vendored charting library,
//! compiled into the binary: the dashboard works on machines without
//! internet access.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

struct Asset {
    path: &'static str,
    content_type: &'static str,
    /// Vendored files never change within a build; the app's own are revalidated.
    immutable: bool,
    bytes: &'static [u8],
}

const INDEX: &[u8] = include_bytes!("../../assets/index.html");

const ASSETS: &[Asset] = &[
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        immutable: false,
        bytes: include_bytes!("../../assets/app.js"),
    },
    Asset {
        path: "app.css",
        content_type: "text/css; charset=utf-8",
        immutable: false,
        bytes: include_bytes!("../../assets/app.css"),
    },
    Asset {
        path: "vendor/chart.umd.min.js",
        content_type: "text/javascript; charset=utf-8",
        immutable: true,
        bytes: include_bytes!("../../assets/vendor/chart.umd.min.js"),
    },
    Asset {
        path: "vendor/chartjs-chart-matrix.min.js",
        content_type: "text/javascript; charset=utf-8",
        immutable: true,
        bytes: include_bytes!("../../assets/vendor/chartjs-chart-matrix.min.js"),
    },
    Asset {
        path: "vendor/LICENSE-chart.js.md",
        content_type: "text/plain; charset=utf-8",
        immutable: true,
        bytes: include_bytes!("../../assets/vendor/LICENSE-chart.js.md"),
    },
    Asset {
        path: "vendor/LICENSE-chartjs-chart-matrix.md",
        content_type: "text/plain; charset=utf-8",
        immutable: true,
        bytes: include_bytes!("../../assets/vendor/LICENSE-chartjs-chart-matrix.md"),
    },
];

pub(super) async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX).into_response()
}

pub(super) async fn asset(Path(path): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.path == path) {
        Some(a) => {
            let cache = if a.immutable { "public, max-age=86400" } else { "no-cache" };
            ([(header::CONTENT_TYPE, a.content_type), (header::CACHE_CONTROL, cache)], a.bytes).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
