//! Who may see the dashboard, and what protects its users' browsers.
//!
//! - Every route but `/healthz`, `/livez`, `/login` and (when the operator
//!   chose `--public-metrics`) `/metrics` needs a viewer or admin token:
//!   as `Authorization: Bearer ...` (scripts, Prometheus) or as the session
//!   cookie the login page sets (HttpOnly, SameSite=Strict, Secure under
//!   TLS). A browser without one is sent to the login page; an API call gets
//!   401 or 403 naming what was missing. Submitters follow their own jobs
//!   with `ptune`.
//! - A request whose Host header is not one the coordinator answers to
//!   (localhost, its bound address, `--allowed-hosts`) is refused: a page of
//!   another site cannot reach the dashboard through DNS rebinding.
//! - Every answer carries a Content-Security-Policy that allows scripts,
//!   styles and connections to the coordinator itself only.
//! - A request must start its answer within [`REQUEST_TIMEOUT`] (a body
//!   that streams, such as events or an adapter, may run longer).

use std::time::Duration;

use axum::extract::{Form, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::json;
use tracing::warn;

use super::Dashboard;
use crate::auth::layer::bearer;
use crate::auth::{Identity, Permission};
use crate::store::Refusal;

/// How long a request may take to start its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "ptune_session";
/// How long a dashboard login lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// What the guard needs to know of the coordinator.
#[derive(Clone, Debug, Default)]
pub struct GuardSettings {
    /// Host names (without port) the dashboard answers to.
    pub allowed_hosts: Vec<String>,
    /// `/metrics` without a token.
    pub public_metrics: bool,
    /// Served over TLS: cookies are `Secure`.
    pub tls: bool,
}

/// What a path needs.
fn permission(path: &str, settings: &GuardSettings) -> Permission {
    match path {
        "/healthz" | "/livez" | "/login" | "/logout" => Permission::Public,
        "/metrics" if settings.public_metrics => Permission::Public,
        _ => Permission::ReadFleet,
    }
}

/// The host of a Host header, without its port.
fn host_name(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    value.rsplit_once(':').map_or(value, |(host, port)| if port.bytes().all(|b| b.is_ascii_digit()) { host } else { value })
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

fn refuse(status: StatusCode, message: String, wants_page: bool) -> Response {
    if wants_page && status == StatusCode::UNAUTHORIZED {
        return Redirect::to("/login").into_response();
    }
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// The middleware: Host check, authentication, permission, security headers.
pub async fn guard(State(d): State<Dashboard>, mut req: Request, next: Next) -> Response {
    let settings = &d.guard;
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(host_name).unwrap_or_default();
    if !settings.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        let message = format!("host {host:?} is not one this coordinator answers to; add it with --allowed-hosts");
        return with_headers(refuse(StatusCode::MISDIRECTED_REQUEST, message, false));
    }
    let path = req.uri().path().to_string();
    let needed = permission(&path, settings);
    if needed != Permission::Public {
        let wants_page = !path.starts_with("/api/") && path != "/metrics";
        let identity = match authenticate(&d, req.headers()).await {
            Ok(identity) => identity,
            Err((status, message)) => return with_headers(refuse(status, message, wants_page)),
        };
        if !identity.role.allows(needed) {
            let message = format!(
                "token {:?} has role {}; the dashboard needs role {} (submitters follow their jobs with `ptune`)",
                identity.name,
                identity.role,
                needed.roles()
            );
            return with_headers(refuse(StatusCode::FORBIDDEN, message, wants_page));
        }
        req.extensions_mut().insert(identity);
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(response) => with_headers(response),
        Err(_) => {
            warn!(path = %path, "request took longer than the limit");
            let message = format!("the request took longer than {} s; retry", REQUEST_TIMEOUT.as_secs());
            with_headers(refuse(StatusCode::SERVICE_UNAVAILABLE, message, false))
        }
    }
}

/// The identity of a bearer token or session cookie.
async fn authenticate(d: &Dashboard, headers: &HeaderMap) -> Result<Identity, (StatusCode, String)> {
    let unavailable = |_| (StatusCode::SERVICE_UNAVAILABLE, "database unavailable; retry shortly".to_string());
    if let Some(token) = bearer(headers) {
        return match d.store.authenticate(token).await.map_err(unavailable)? {
            Ok(identity) => Ok(identity),
            Err(Refusal::Unknown) => Err((StatusCode::UNAUTHORIZED, "invalid token".into())),
            Err(Refusal::Revoked(at)) => Err((StatusCode::UNAUTHORIZED, format!("token revoked at {}", at.to_rfc3339()))),
            Err(Refusal::Expired(at)) => Err((StatusCode::UNAUTHORIZED, format!("token expired at {}", at.to_rfc3339()))),
        };
    }
    if let Some(cookie) = session_cookie(headers) {
        if let Some(identity) = d.store.session_identity(cookie).await.map_err(unavailable)? {
            return Ok(identity);
        }
        return Err((StatusCode::UNAUTHORIZED, "session expired; log in again".into()));
    }
    Err((
        StatusCode::UNAUTHORIZED,
        "missing token: send Authorization: Bearer <token of role viewer or admin>, or log in at /login".into(),
    ))
}

fn with_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

const LOGIN_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ptune: log in</title>
<link rel="stylesheet" href="/assets/app.css"></head>
<body><main><h1>ptune</h1>
<form method="post" action="/login">
<p><label>Token (role viewer or admin)<br><input type="password" name="token" autocomplete="off" size="80" required></label></p>
<p><button type="submit">Log in</button></p>
</form>
<p class="muted">Ask an admin for a token: <code>ptune token create --role viewer --name NAME</code>.</p>
MESSAGE</main></body></html>"#;

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

#[derive(Deserialize)]
pub struct LoginLink {
    token: Option<String>,
}

/// The login page; `/login?token=...` logs in at once (a link an admin
/// hands out, as Jupyter's are: the token then sits in the browser's
/// history, so prefer the form on shared machines).
pub async fn login_page(state: State<Dashboard>, headers: HeaderMap, Query(link): Query<LoginLink>) -> Response {
    match link.token {
        Some(token) => login(state, headers, Form(LoginForm { token })).await,
        None => Html(LOGIN_PAGE.replace("MESSAGE", "")).into_response(),
    }
}

/// Checks the token, opens a session, and sets its cookie.
pub async fn login(State(d): State<Dashboard>, headers: HeaderMap, Form(form): Form<LoginForm>) -> Response {
    // A form posted from another site is refused.
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if !d.guard.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host_name(origin_host))) {
            return (StatusCode::FORBIDDEN, "login from another site refused").into_response();
        }
    }
    let failed = |message: &str| {
        let page = LOGIN_PAGE.replace("MESSAGE", &format!("<p class=\"error\">{message}</p>"));
        (StatusCode::UNAUTHORIZED, Html(page)).into_response()
    };
    let identity = match d.store.authenticate(form.token.trim()).await {
        Ok(Ok(identity)) => identity,
        Ok(Err(_)) => return failed("That token is not valid (unknown, revoked or expired)."),
        Err(e) => {
            warn!(error = %e, "login failed: database unavailable");
            return (StatusCode::SERVICE_UNAVAILABLE, "database unavailable; retry shortly").into_response();
        }
    };
    if !identity.role.allows(Permission::ReadFleet) {
        return failed("The dashboard needs a token of role viewer or admin.");
    }
    let cookie = match d.store.create_session(identity.token_id, SESSION_TTL).await {
        Ok(cookie) => cookie,
        Err(_) => return (StatusCode::SERVICE_UNAVAILABLE, "database unavailable; retry shortly").into_response(),
    };
    let secure = if d.guard.tls { "; Secure" } else { "" };
    let set = format!(
        "{SESSION_COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = HeaderValue::from_str(&set) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// Ends the session.
pub async fn logout(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    if let Some(cookie) = session_cookie(&headers) {
        let _ = d.store.end_session(cookie).await;
    }
    let mut response = Redirect::to("/login").into_response();
    let clear = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(value) = HeaderValue::from_str(&clear) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers_lose_their_port_and_brackets() {
        assert_eq!(host_name("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_name("[::1]:8080"), "::1");
        assert_eq!(host_name("localhost"), "localhost");
        assert_eq!(host_name("evil.example:80"), "evil.example");
    }
}
