//! A tower layer on the tonic server that counts and times every gRPC call
//! by service, method and status code, and runs each call in a `grpc` span
//! carrying the method, so the handlers' logs say which call they belong to.
//!
//! A call's status arrives either in the response headers (a trailers-only
//! answer: tonic's errors) or in the trailers after the last message, so the
//! response body is wrapped and the call is recorded when the status passes.
//! A body dropped before its status (the client went away) counts as
//! `Cancelled`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use super::{GrpcLabels, Metrics};

/// Adds [`GrpcMetricsService`] around the tonic routes.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner, metrics: self.metrics.clone() }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcMetricsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Body,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (service, method) = call_name(req.uri().path());
        let span = tracing::info_span!("grpc", service = %service, method = %method);
        let mut recorder =
            Recorder { metrics: self.metrics.clone(), service, method, start: Instant::now(), code: None };
        let call = self.inner.call(req);
        Box::pin(
            async move {
                let response = call.await?;
                if let Some(code) = status_code(response.headers()) {
                    recorder.code = Some(code);
                }
                Ok(response.map(|inner| MeteredBody { inner, recorder: Some(recorder) }))
            }
            .instrument(span),
        )
    }
}

/// The service and method of a gRPC path `/package.Service/Method`. Paths
/// that are no method of the server (see [`crate::auth::permission`]) are
/// labelled `other`, so callers cannot grow the label sets without bound.
fn call_name(path: &str) -> (String, String) {
    match path.trim_start_matches('/').split_once('/') {
        Some((service, method)) if crate::auth::permission(path).is_some() => (service.to_string(), method.to_string()),
        _ => ("other".to_string(), "other".to_string()),
    }
}

/// The `grpc-status` in headers or trailers, as a code name.
fn status_code(headers: &HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    Some(code_name(tonic::Code::from_bytes(value.as_bytes())))
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "Cancelled",
        C::Unknown => "Unknown",
        C::InvalidArgument => "InvalidArgument",
        C::DeadlineExceeded => "DeadlineExceeded",
        C::NotFound => "NotFound",
        C::AlreadyExists => "AlreadyExists",
        C::PermissionDenied => "PermissionDenied",
        C::ResourceExhausted => "ResourceExhausted",
        C::FailedPrecondition => "FailedPrecondition",
        C::Aborted => "Aborted",
        C::OutOfRange => "OutOfRange",
        C::Unimplemented => "Unimplemented",
        C::Internal => "Internal",
        C::Unavailable => "Unavailable",
        C::DataLoss => "DataLoss",
        C::Unauthenticated => "Unauthenticated",
    }
}

/// Records its call once, when dropped.
struct Recorder {
    metrics: Arc<Metrics>,
    service: String,
    method: String,
    start: Instant,
    code: Option<&'static str>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let labels = GrpcLabels {
            service: std::mem::take(&mut self.service),
            method: std::mem::take(&mut self.method),
            code: self.code.unwrap_or("Cancelled").to_string(),
        };
        self.metrics.observe_grpc(&labels, self.start.elapsed());
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call when the status passes or the body is dropped.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_code) {
                    if let Some(mut recorder) = this.recorder.take() {
                        recorder.code = Some(code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut recorder) = this.recorder.take() {
                    recorder.code.get_or_insert("Unknown");
                }
            }
            // The end of a body without trailers: a trailers-only answer whose
            // status was in the headers, or nothing better known.
            Poll::Ready(None) => {
                if let Some(mut recorder) = this.recorder.take() {
                    recorder.code.get_or_insert("Unknown");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::call_name;

    #[test]
    fn call_names_keep_known_services_and_fold_the_rest() {
        let name = |p: &str| call_name(p);
        assert_eq!(name("/ptune.v1.JobService/SubmitJob"), ("ptune.v1.JobService".into(), "SubmitJob".into()));
        assert_eq!(name("/grpc.health.v1.Health/Check"), ("grpc.health.v1.Health".into(), "Check".into()));
        assert_eq!(name("/evil.Service/x"), ("other".into(), "other".into()));
        assert_eq!(name("/ptune.v1.JobService/a/b"), ("other".into(), "other".into()));
        assert_eq!(name("/ptune.v1.JobService/Probe1"), ("other".into(), "other".into()), "unknown methods of known services too");
        assert_eq!(name("/"), ("other".into(), "other".into()));
    }
}
