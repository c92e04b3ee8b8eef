//! Settings of a coordinator instance.

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::retry::RetryPolicy;

/// Everything a coordinator needs to start. The binary fills it from flags
/// and environment variables; tests build it with [`Config::new`].
#[derive(Clone, Debug)]
pub struct Config {
    /// `postgres://` URL of the database holding all durable state.
    pub database_url: String,
    /// Address of the gRPC server; port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// Address of the dashboard, `/healthz` and `/metrics`; port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// How long a lease lasts without a heartbeat or progress report.
    pub lease_timeout: Duration,
    /// How often workers are asked to heartbeat.
    pub heartbeat_interval: Duration,
    /// Attempts of a job whose spec leaves `max_attempts` at 0.
    pub default_max_attempts: u32,
    /// When failed attempts are retried, and how many interruptions a job survives.
    pub retry: RetryPolicy,
    /// Largest resume checkpoint a worker may upload.
    pub max_checkpoint_bytes: u64,
    /// Largest adapter and dataset accepted.
    pub files: crate::limits::FileLimits,
    /// Where files' bytes go: the database's chunk tables or an object store.
    pub blob_store: crate::store::BlobStore,
    /// Where to write the first tokens (`admin.token`, `worker.token`) when
    /// the database has no admin token yet: the single-machine setup.
    pub bootstrap_dir: Option<std::path::PathBuf>,
    /// TLS for gRPC and HTTP; plaintext when `None`.
    pub tls: Option<TlsFiles>,
    /// Serve `/metrics` without a token (for a Prometheus without one).
    pub public_metrics: bool,
    /// Host names the dashboard answers to besides the bound address and
    /// localhost (a guard against DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// Open streams, upload pauses and request time.
    pub limits: crate::limits::Limits,
    /// What happens to the metrics of finished jobs as they age (the
    /// default keeps them all).
    pub metrics_retention: crate::tables::Retention,
}

/// PEM files of the coordinator's TLS identity.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// When set, clients must present a certificate this CA signed (mTLS).
    pub client_ca: Option<std::path::PathBuf>,
}

impl Config {
    pub const DEFAULT_GRPC_ADDR: &'static str = "127.0.0.1:50051";
    pub const DEFAULT_HTTP_ADDR: &'static str = "127.0.0.1:8080";
    pub const DEFAULT_LEASE_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
    pub const DEFAULT_MAX_CHECKPOINT_BYTES: u64 = 1 << 30;

    /// Defaults for everything but the database, listening on free local
    /// ports (the bound addresses are in the [`crate::CoordinatorHandle`]).
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            lease_timeout: Self::DEFAULT_LEASE_TIMEOUT,
            heartbeat_interval: Self::DEFAULT_HEARTBEAT_INTERVAL,
            default_max_attempts: ptune_core::spec::DEFAULT_MAX_ATTEMPTS,
            retry: RetryPolicy::default(),
            max_checkpoint_bytes: Self::DEFAULT_MAX_CHECKPOINT_BYTES,
            files: crate::limits::FileLimits::default(),
            blob_store: crate::store::BlobStore::Database,
            bootstrap_dir: None,
            tls: None,
            public_metrics: false,
            allowed_hosts: Vec::new(),
            limits: crate::limits::Limits::default(),
            metrics_retention: crate::tables::Retention::default(),
        }
    }
}
