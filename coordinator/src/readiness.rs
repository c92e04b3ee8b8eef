//! Whether the coordinator can serve calls now, and the tower layer that
//! answers `UNAVAILABLE` at once while it cannot.
//!
//! The coordinator binds its ports before its database is reachable (so
//! probes get an answer while it waits) and keeps running through database
//! outages. While it is starting or the database is down, every `ptune.*`
//! call is refused with `UNAVAILABLE` and a message saying why, without
//! waiting on the database; health and reflection keep answering. A call
//! that reaches the database in the moment before an outage is noticed
//! fails with `UNAVAILABLE` too (see `store::StoreError::Unavailable`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

/// What the coordinator can do now. Cheap to clone; clones share the state.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicU8>);

/// The states of [`Readiness`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting for the database, or applying migrations.
    Starting,
    Ready,
    /// The database stopped answering; calls resume when it is back.
    DatabaseDown,
}

impl Readiness {
    pub fn state(&self) -> State {
        match self.0.load(Ordering::SeqCst) {
            0 => State::Starting,
            1 => State::Ready,
            _ => State::DatabaseDown,
        }
    }

    pub fn set(&self, state: State) {
        let value = match state {
            State::Starting => 0,
            State::Ready => 1,
            State::DatabaseDown => 2,
        };
        self.0.store(value, Ordering::SeqCst);
    }

    /// Why calls are refused now; `None` when ready.
    pub fn refusal(&self) -> Option<&'static str> {
        match self.state() {
            State::Ready => None,
            State::Starting => Some("the coordinator is starting: waiting for its database; retry in a moment"),
            State::DatabaseDown => Some("database unavailable: the coordinator keeps running and retries; retry in a moment"),
        }
    }
}

/// Refuses `ptune.*` calls with `UNAVAILABLE` while [`Readiness`] says so.
#[derive(Clone, Debug)]
pub struct ReadinessLayer {
    readiness: Readiness,
}

impl ReadinessLayer {
    pub fn new(readiness: Readiness) -> Self {
        Self { readiness }
    }
}

impl<S> Layer<S> for ReadinessLayer {
    type Service = ReadinessService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadinessService { inner, readiness: self.readiness.clone() }
    }
}

/// See [`ReadinessLayer`].
#[derive(Clone, Debug)]
pub struct ReadinessService<S> {
    inner: S,
    readiness: Readiness,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody> Service<Request<ReqBody>> for ReadinessService<S>
where
    S: Service<Request<ReqBody>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if req.uri().path().starts_with("/ptune.") {
            if let Some(why) = self.readiness.refusal() {
                let response = tonic::Status::unavailable(why).into_http();
                return Box::pin(async move { Ok(response) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}
