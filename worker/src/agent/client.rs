//! The coordinators a worker talks to. `--coordinator` takes several
//! addresses (`http://a:50051,http://b:50051`), and a name that resolves to
//! several addresses (a Kubernetes headless Service) counts as one per
//! address. Calls go to the current one; a call that fails for a transport
//! reason (refused, timed out, the coordinator unavailable) moves to the
//! next and is tried there, so a worker fails over within one call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ptune_proto::client::{endpoint_named, AuthChannel, BearerToken, ClientOptions};
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Status};
use tracing::{info, warn};

/// How long a unary call may take before it counts as failed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message the worker accepts (dataset and checkpoint chunks).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The coordinators, with the one calls go to now. Cheap to clone.
#[derive(Clone)]
pub struct Coordinators {
    urls: Arc<Vec<String>>,
    options: Arc<ClientOptions>,
    channels: Arc<Mutex<Vec<(String, AuthChannel)>>>,
    current: Arc<AtomicUsize>,
}

impl Coordinators {
    /// Parses a comma-separated list of coordinator addresses (`host:port`
    /// or `http://host:port`) and resolves each; connections are made on
    /// first use, so coordinators that are not up yet are fine. Every call
    /// carries `options`' token; `https://` addresses use its CA and client
    /// certificate.
    pub async fn new(spec: &str, options: ClientOptions) -> anyhow::Result<Self> {
        let urls: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|u| if u.contains("://") { u.to_string() } else { format!("http://{u}") })
            .collect();
        anyhow::ensure!(!urls.is_empty(), "--coordinator: give at least one address, e.g. http://127.0.0.1:50051");
        let this = Self { urls: Arc::new(urls), options: Arc::new(options), channels: Arc::default(), current: Arc::default() };
        this.resolve().await?;
        Ok(this)
    }

    /// (Re)builds the channels: one per address each name resolves to.
    async fn resolve(&self) -> anyhow::Result<()> {
        let mut channels = Vec::new();
        let bearer = BearerToken::new(self.options.token.as_deref())?;
        for url in self.urls.iter() {
            let host = host_of(url);
            for target in expand(url).await {
                // An address a name resolved to still presents the name's certificate.
                let domain = (target != *url).then_some(host.as_str());
                let endpoint = endpoint_named(&target, &self.options, domain)?
                    .connect_timeout(Duration::from_secs(3))
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .keep_alive_while_idle(true);
                channels.push((target, InterceptedService::new(endpoint.connect_lazy(), bearer.clone())));
            }
        }
        anyhow::ensure!(!channels.is_empty(), "no coordinator address resolved from {:?}", self.urls);
        *self.channels.lock().unwrap_or_else(|e| e.into_inner()) = channels;
        Ok(())
    }

    /// How many coordinator addresses there are.
    fn count(&self) -> usize {
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A client for coordinator `index` (modulo their number), and its address.
    fn client_at(&self, index: usize) -> (String, WorkerServiceClient<AuthChannel>) {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let (url, channel) = &channels[index % channels.len()];
        (
            url.clone(),
            WorkerServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// A client for the current coordinator.
    pub fn client(&self) -> WorkerServiceClient<AuthChannel> {
        self.client_at(self.current.load(Ordering::SeqCst)).1
    }

    /// Calls `f` on the current coordinator, and on the next ones in turn
    /// while the failure is a transport one; each try may take `timeout`.
    /// Returns the last failure when every coordinator failed.
    /// The returned future owns what it needs (it borrows nothing), so it
    /// can be held across awaits of spawned tasks.
    pub fn call<T, F, Fut>(
        &self,
        timeout: Duration,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, Status>> + Send + 'static
    where
        F: FnMut(WorkerServiceClient<AuthChannel>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, Status>> + Send,
        T: Send + 'static,
    {
        let this = self.clone();
        async move { this.call_owned(timeout, f).await }
    }

    async fn call_owned<T, F, Fut>(self, timeout: Duration, mut f: F) -> Result<T, Status>
    where
        F: FnMut(WorkerServiceClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let start = self.current.load(Ordering::SeqCst);
        let tries = self.count();
        let mut last = Status::unavailable("no coordinator reachable");
        for offset in 0..tries {
            let index = start + offset;
            let (url, client) = self.client_at(index);
            let result = match tokio::time::timeout(timeout, f(client)).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!("no answer from {url} within {timeout:?}"))),
            };
            match result {
                Err(status) if is_transient(&status) => {
                    if tries > 1 {
                        let next = self.client_at(index + 1).0;
                        warn!(coordinator = %url, next = %next, error = %status.message(), "coordinator unreachable; failing over");
                        let _ = self.current.compare_exchange(index % tries, (index + 1) % tries, Ordering::SeqCst, Ordering::SeqCst);
                    }
                    last = status;
                }
                other => {
                    if offset > 0 {
                        info!(coordinator = %url, "talking to this coordinator now");
                    }
                    return other;
                }
            }
        }
        // All failed: names may resolve to other addresses now.
        if let Err(e) = self.resolve().await {
            warn!(error = %format!("{e:#}"), "cannot resolve the coordinator addresses");
        }
        Err(last)
    }
}

/// The host of a URL (no port).
fn host_of(url: &str) -> String {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest).split('/').next().unwrap_or_default();
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host.trim_matches(['[', ']']).to_string(),
        _ => authority.to_string(),
    }
}

/// The URLs a coordinator URL stands for: one per address its host
/// resolves to when that is several, else the URL itself.
async fn expand(url: &str) -> Vec<String> {
    let Some((scheme, rest)) = url.split_once("://") else { return vec![url.to_string()] };
    let authority = rest.split('/').next().unwrap_or(rest);
    let Ok(addrs) = tokio::net::lookup_host(authority).await else { return vec![url.to_string()] };
    let mut addrs: Vec<_> = addrs.collect();
    addrs.sort();
    addrs.dedup();
    if addrs.len() <= 1 {
        return vec![url.to_string()];
    }
    addrs.into_iter().map(|a| format!("{scheme}://{a}")).collect()
}

/// True for failures that say nothing about the request: the coordinator
/// could not be reached, timed out, or is without its database. Worth
/// retrying later or on another coordinator.
pub fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Internal
    )
}
