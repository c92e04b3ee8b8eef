//! `ptune-coordinator`: parses flags, starts the coordinator (and an embedded
//! PostgreSQL when no database URL is given), and stops on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use ptune_coordinator::config::{RetryPolicy, TlsFiles};
use ptune_coordinator::embedded_pg::EmbeddedPostgres;
use ptune_coordinator::blob;
use ptune_coordinator::limits::{FileLimits, Limits};
use ptune_coordinator::store::{BlobStore, Store};
use ptune_coordinator::tables::Retention;
use ptune_coordinator::{Config, Coordinator};
use tracing::info;
use tracing_subscriber::EnvFilter;

/// The ptune coordinator: job queue, leases and gRPC API over PostgreSQL.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
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
    /// Where files' bytes go: `postgres` (chunk rows in the database), an
    /// absolute folder, `s3://bucket/prefix` (endpoint, region and
    /// credentials from the AWS_* variables, so MinIO, Ceph and R2 work too),
    /// `gs://bucket/prefix` or `az://container/prefix`. The database keeps
    /// the metadata either way; `blobs move` moves existing files.
    #[arg(long, env = "PTUNE_BLOB_STORE", default_value = "postgres")]
    blob_store: String,
    /// Largest adapter archive (a job's result) a worker may upload, in MiB;
    /// a full fine-tuning job whose export would be larger is refused.
    #[arg(long, env = "PTUNE_MAX_ADAPTER_MIB", default_value_t = FileLimits::default().adapter >> 20,
          value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    max_adapter_mib: u64,
    /// Largest dataset a user may upload, in MiB.
    #[arg(long, env = "PTUNE_MAX_DATASET_MIB", default_value_t = FileLimits::default().dataset >> 20,
          value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    max_dataset_mib: u64,
    /// Largest resume checkpoint a worker may upload, in MiB (larger ones stay on the worker's disk).
    #[arg(long, env = "PTUNE_MAX_CHECKPOINT_MIB", default_value_t = Config::DEFAULT_MAX_CHECKPOINT_BYTES >> 20)]
    max_checkpoint_mib: u64,
    #[arg(long, env = "PTUNE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// PEM certificate (chain) for gRPC and HTTP over TLS; with --tls-key.
    #[arg(long, env = "PTUNE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PTUNE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA whose certificates clients must present (mutual TLS), e.g. for workers.
    #[arg(long, env = "PTUNE_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve /metrics without a token (otherwise Prometheus sends a viewer token).
    #[arg(long, env = "PTUNE_PUBLIC_METRICS")]
    public_metrics: bool,
    /// When the database has no admin token yet, create one and a worker token and write them to DIR/admin.token
    /// and DIR/worker.token (mode 0600). The embedded database does this in --data-dir.
    #[arg(long, env = "PTUNE_BOOTSTRAP_TOKENS", value_name = "DIR")]
    bootstrap_tokens: Option<PathBuf>,
    /// Host names the dashboard answers to, besides localhost and the bound address (comma-separated).
    #[arg(long, env = "PTUNE_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// Streams (WatchJob, the dashboard's live events) one token may hold open at once.
    #[arg(long, env = "PTUNE_MAX_STREAMS_PER_TOKEN", default_value_t = Limits::default().streams_per_token as u32,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_streams_per_token: u32,
    /// Streams open at once in all.
    #[arg(long, env = "PTUNE_MAX_STREAMS", default_value_t = Limits::default().streams as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_streams: u32,
    /// Seconds an upload (dataset, adapter, checkpoint) may go without sending before it is ended.
    #[arg(long, env = "PTUNE_UPLOAD_IDLE_TIMEOUT", default_value_t = Limits::default().upload_idle.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    upload_idle_timeout: u64,
    /// Seconds a gRPC call may take before it answers (uploads included; a stream it returns may run longer).
    #[arg(long, env = "PTUNE_REQUEST_TIMEOUT", default_value_t = Limits::default().request.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    request_timeout: u64,
    #[command(flatten)]
    retention: RetentionArgs,
}

/// What happens to the metrics of finished jobs as they age; without these
/// flags every metric is kept. The leader applies them every 5 minutes.
#[derive(clap::Args, Debug)]
struct RetentionArgs {
    /// Days after a job finished when its metrics are removed, but for the last point of each series
    /// (its final metrics) and the evaluation series of sweep trials (1 to 36500).
    #[arg(long, env = "PTUNE_METRICS_RETENTION_DAYS")]
    metrics_retention_days: Option<u32>,
    /// Days after a job finished when its training series are thinned to one point in
    /// --metrics-downsample-every and the last (1 to 36500, less than --metrics-retention-days).
    #[arg(long, env = "PTUNE_METRICS_DOWNSAMPLE_AFTER_DAYS")]
    metrics_downsample_after_days: Option<u32>,
    /// Thinned training series keep one point in this many (2 to 10000).
    #[arg(long, env = "PTUNE_METRICS_DOWNSAMPLE_EVERY", default_value_t = Retention::default().downsample_every)]
    metrics_downsample_every: u32,
    /// Jobs whose metrics one transaction of retention handles (1 to 10000).
    #[arg(long, env = "PTUNE_METRICS_RETENTION_BATCH", default_value_t = Retention::default().batch_jobs)]
    metrics_retention_batch: u32,
}

impl RetentionArgs {
    fn settings(&self) -> anyhow::Result<Retention> {
        Retention::new(
            self.metrics_retention_days,
            self.metrics_downsample_after_days,
            self.metrics_downsample_every,
            self.metrics_retention_batch,
        )
        .map_err(|e| anyhow::anyhow!(e))
    }
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// API tokens, straight in the database (to bootstrap the first admin;
    /// afterwards admins use `ptune token ...`).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Files (datasets, adapters, checkpoints) in the blob stores.
    #[command(subcommand)]
    Blobs(BlobsCommand),
    /// Metrics of finished jobs.
    #[command(subcommand)]
    Metrics(MetricsCommand),
}

#[derive(Debug, clap::Subcommand)]
enum MetricsCommand {
    /// Applies the retention flags (--metrics-retention-days,
    /// --metrics-downsample-after-days) now, to every finished job they
    /// cover, a batch at a time, as the leader does every 5 minutes.
    Prune,
}

#[derive(Debug, clap::Subcommand)]
enum BlobsCommand {
    /// Moves every file into another store, verifying each by its sha256;
    /// coordinators may keep serving meanwhile, and a stopped move resumes
    /// when run again.
    Move {
        /// `postgres`, a folder, or an s3://, gs:// or az:// URL (as --blob-store).
        #[arg(long)]
        to: String,
    },
    /// Removes now what the leader removes every minute: checkpoints of
    /// finished jobs, unlinked blobs, and the objects of rows that went.
    Collect {
        /// Uploads untouched this long count as abandoned.
        #[arg(long, default_value_t = 3600)]
        abandoned_after_secs: u64,
        /// Objects whose row went this recently are kept (a download may
        /// still be reading them).
        #[arg(long, default_value_t = 60)]
        grace_secs: u64,
    },
}

#[derive(Debug, clap::Subcommand)]
enum TokenCommand {
    /// Creates a token and prints it (it is not shown again).
    Create {
        /// admin, submitter, viewer or worker.
        #[arg(long)]
        role: String,
        /// The token's name: the identity that owns what it submits.
        #[arg(long)]
        name: String,
        /// Days until it expires (0: never).
        #[arg(long, default_value_t = 0)]
        expires_in_days: u32,
    },
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
    let metrics_retention = args.retention.settings()?;

    match args.command {
        Some(Command::Token(command)) => return token_command(args.database_url, &args.data_dir, command).await,
        Some(Command::Blobs(command)) => return blobs_command(args.database_url, &args.data_dir, command).await,
        Some(Command::Metrics(MetricsCommand::Prune)) => {
            return prune_metrics(args.database_url, &args.data_dir, metrics_retention).await
        }
        None => {}
    }
    let blob_store = BlobStore::parse(&args.blob_store).map_err(|e| anyhow::anyhow!("{e}"))?;
    let bootstrap_dir = args.bootstrap_tokens.clone().or_else(|| args.database_url.is_none().then(|| args.data_dir.clone()));
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
        files: FileLimits { adapter: args.max_adapter_mib << 20, dataset: args.max_dataset_mib << 20 },
        blob_store,
        bootstrap_dir,
        tls: args.tls_cert.zip(args.tls_key).map(|(cert, key)| TlsFiles { cert, key, client_ca: args.tls_client_ca }),
        public_metrics: args.public_metrics,
        allowed_hosts: args.allowed_hosts,
        limits: Limits {
            streams_per_token: args.max_streams_per_token as usize,
            streams: args.max_streams as usize,
            upload_idle: Duration::from_secs(args.upload_idle_timeout),
            request: Duration::from_secs(args.request_timeout),
        },
        metrics_retention,
    };
    let result = run(config).await;
    if let Some(pg) = embedded {
        pg.stop().await;
        info!("embedded postgres stopped");
    }
    result
}

/// `ptune-coordinator token create`: on `--database-url`, or on the
/// embedded cluster under the data directory (the running coordinator's,
/// or started for the command and stopped after it).
async fn token_command(database_url: Option<String>, data_dir: &std::path::Path, command: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Create { role, name, expires_in_days } = command;
    let role: ptune_coordinator::auth::Role = role.parse().map_err(|e: String| anyhow::anyhow!("--role: {e}"))?;
    ptune_coordinator::grpc::token_name(&name).map_err(|e| anyhow::anyhow!("--{e}"))?;
    let token = with_database(database_url, data_dir, |store| async move {
        let expires_at = (expires_in_days > 0).then(|| chrono::Utc::now() + chrono::Duration::days(i64::from(expires_in_days)));
        let (record, token) = store
            .create_token(&name, role, expires_at, "ptune-coordinator token create")
            .await
            .map_err(|e| anyhow::anyhow!("{}", ptune_coordinator::Error::from(e)))?;
        store.audit(&ptune_coordinator::auth::system(), "token.create", &record.id.to_string(), serde_json::json!({ "name": name, "role": role.as_str() })).await?;
        anyhow::Ok(token)
    })
    .await?;
    println!("{token}");
    Ok(())
}

/// `ptune-coordinator blobs ...`: on `--database-url` or the embedded cluster.
async fn blobs_command(database_url: Option<String>, data_dir: &std::path::Path, command: BlobsCommand) -> anyhow::Result<()> {
    let report = with_database(database_url, data_dir, |store| async move {
        match command {
            BlobsCommand::Move { to } => {
                let to = BlobStore::parse(&to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
                let started = std::time::Instant::now();
                let moved = blob::move_files(&store, &to).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                let secs = started.elapsed().as_secs_f64();
                Ok(format!(
                    "| moved to | files | bytes | skipped | seconds |\n|---|---|---|---|---|\n| {} | {} | {} | {} | {secs:.1} |",
                    to.location().unwrap_or("postgres"),
                    moved.moved,
                    moved.bytes,
                    moved.skipped
                ))
            }
            BlobsCommand::Collect { abandoned_after_secs, grace_secs } => {
                let done = blob::collect_files(
                    &store,
                    Duration::from_secs(abandoned_after_secs),
                    Duration::from_secs(grace_secs),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(format!(
                    "removed {} checkpoints, {} blobs and {} objects",
                    done.checkpoints, done.blobs, done.objects
                ))
            }
        }
    })
    .await?;
    println!("{report}");
    Ok(())
}

/// `ptune-coordinator metrics prune`: on `--database-url` or the embedded cluster.
async fn prune_metrics(
    database_url: Option<String>,
    data_dir: &std::path::Path,
    retention: Retention,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        retention.enabled(),
        "nothing to do: give --metrics-retention-days or --metrics-downsample-after-days (or their PTUNE_ variables)"
    );
    let done = with_database(database_url, data_dir, |store| async move {
        retention.apply(&store, u32::MAX).await.map_err(|e| anyhow::anyhow!("{}", ptune_coordinator::Error::from(e)))
    })
    .await?;
    println!(
        "pruned the metrics of {} jobs and downsampled those of {}: removed {} rows",
        done.jobs_pruned, done.jobs_downsampled, done.rows_removed
    );
    Ok(())
}

/// Runs `work` on a migrated store of `--database-url`, or of the embedded
/// cluster under the data directory (the running coordinator's, or started
/// for the command and stopped after it).
async fn with_database<F, Fut, T>(database_url: Option<String>, data_dir: &std::path::Path, work: F) -> anyhow::Result<T>
where
    F: FnOnce(Store) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let (url, started) = match database_url {
        Some(url) => (url, None),
        None if EmbeddedPostgres::running(data_dir) => (EmbeddedPostgres::url_for(data_dir)?, None),
        None => {
            let pg = EmbeddedPostgres::start(data_dir).await?;
            (pg.url(), Some(pg))
        }
    };
    let result = async {
        let store = Store::connect(&url).await.context("connecting to the database")?;
        store.migrate().await?;
        let result = work(store.clone()).await;
        store.close().await;
        result
    }
    .await;
    if let Some(pg) = started {
        pg.stop().await;
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
