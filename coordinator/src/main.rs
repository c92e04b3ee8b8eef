//! `ptune-coordinator`: parses flags, starts the coordinator (and an embedded
//! PostgreSQL when no database URL is given), and stops on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use ptune_coordinator::embedded_pg::EmbeddedPostgres;
use ptune_coordinator::config::RetryPolicy;
use ptune_coordinator::{Config, Coordinator};
use tracing::info;
use tracing_subscriber::EnvFilter;

/// The ptune coordinator: job queue, leases and gRPC API over PostgreSQL.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// PostgreSQL URL; without it an embedded server runs under --data-dir.
    #[arg(long, env = "PTUNE_DATABASE_URL")]
    database_url: Option<String>,
    /// Data directory of the embedded PostgreSQL.
    #[arg(long, env = "PTUNE_DATA_DIR", default_value = ".ptune/coordinator")]
    data_dir: PathBuf,
    #[arg(long, env = "PTUNE_GRPC_ADDR", default_value = Config::DEFAULT_GRPC_ADDR)]
    grpc_addr: SocketAddr,
    #[arg(long, env = "PTUNE_HTTP_ADDR", default_value = Config::DEFAULT_HTTP_ADDR)]
    http_addr: SocketAddr,
    /// How long a lease lasts without a heartbeat.
    #[arg(long, env = "PTUNE_LEASE_TIMEOUT_MS", default_value_t = 10_000)]
    lease_timeout_ms: u64,
    /// How often workers heartbeat.
    #[arg(long, env = "PTUNE_HEARTBEAT_INTERVAL_MS", default_value_t = 1_000)]
    heartbeat_interval_ms: u64,
    /// Attempts that may fail with an error of the job, for jobs that do not set max_attempts.
    #[arg(long, env = "PTUNE_MAX_ATTEMPTS", default_value_t = ptune_core::spec::DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,
    /// Interruptions a job survives (workers lost, drained or failing); they do not count against max_attempts.
    #[arg(long, env = "PTUNE_MAX_INTERRUPTIONS", default_value_t = RetryPolicy::default().max_interruptions)]
    max_interruptions: u32,
    /// Wait before retrying a job after its first error; doubled after each further error.
    #[arg(long, env = "PTUNE_RETRY_BACKOFF_MS", default_value_t = RetryPolicy::default().backoff_base.as_millis() as u64)]
    retry_backoff_ms: u64,
    /// Longest wait between attempts.
    #[arg(long, env = "PTUNE_RETRY_BACKOFF_CAP_MS", default_value_t = RetryPolicy::default().backoff_cap.as_millis() as u64)]
    retry_backoff_cap_ms: u64,
    /// Largest resume checkpoint a worker may upload, in MiB (larger ones stay on the worker's disk).
    #[arg(long, env = "PTUNE_MAX_CHECKPOINT_MIB", default_value_t = Config::DEFAULT_MAX_CHECKPOINT_BYTES >> 20)]
    max_checkpoint_mib: u64,
    #[arg(long, env = "PTUNE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    anyhow::ensure!(args.max_attempts >= 1, "--max-attempts must be at least 1");
    anyhow::ensure!(args.lease_timeout_ms > 0, "--lease-timeout-ms must be greater than 0");

    let (database_url, embedded) = match args.database_url {
        Some(url) => (url, None),
        None => {
            let pg = EmbeddedPostgres::start(&args.data_dir)
                .await
                .with_context(|| format!("starting embedded postgres under {}", args.data_dir.display()))?;
            info!(data_dir = %args.data_dir.display(), "no database url given; started embedded postgres");
            (pg.url(), Some(pg))
        }
    };
    let config = Config {
        database_url,
        grpc_addr: args.grpc_addr,
        http_addr: args.http_addr,
        lease_timeout: Duration::from_millis(args.lease_timeout_ms),
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
        default_max_attempts: args.max_attempts,
        retry: RetryPolicy {
            backoff_base: Duration::from_millis(args.retry_backoff_ms),
            backoff_cap: Duration::from_millis(args.retry_backoff_cap_ms.max(args.retry_backoff_ms)),
            max_interruptions: args.max_interruptions,
        },
        max_checkpoint_bytes: args.max_checkpoint_mib.max(1) << 20,
    };
    let result = run(config).await;
    if let Some(pg) = embedded {
        pg.stop().await;
        info!("embedded postgres stopped");
    }
    result
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Starting waits for the database as long as it takes; a signal meanwhile stops it.
    let handle = tokio::select! {
        handle = Coordinator::start(config) => handle?,
        signal = shutdown_signal() => return signal,
    };
    shutdown_signal().await?;
    handle.shutdown().await
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "stopping"),
        result = tokio::signal::ctrl_c() => {
            result?;
            info!(signal = "SIGINT", "stopping");
        }
    }
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
