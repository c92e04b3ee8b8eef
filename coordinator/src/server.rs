//! Wiring: binds the ports, waits for the database (answering `UNAVAILABLE`
//! meanwhile), applies migrations, starts the reaper, the event relay (other
//! coordinators' job events from PostgreSQL), the sweep engine, the database
//! monitor, the gRPC server (with health, reflection and a metrics layer on
//! every call) and the HTTP dashboard, and stops them all gracefully.
//!
//! The coordinator never exits because its database went away: the monitor
//! turns health to `NOT_SERVING` and calls are refused with `UNAVAILABLE`
//! until the database answers again.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ptune_proto::v1::admin_service_server::AdminServiceServer;
use ptune_proto::v1::job_service_server::JobServiceServer;
use ptune_proto::v1::sweep_service_server::SweepServiceServer;
use ptune_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use crate::announce::AnnouncerTask;
use crate::limits::StreamLimits;
use crate::config::Config;
use crate::dashboard::{self, Dashboard};
use crate::events::{EventHub, WorkSignal};
use crate::auth::layer::AuthLayer;
use crate::auth::Role;
use crate::grpc::{AdminApi, JobApi, SweepApi, WorkerApi};
use crate::jobs::Jobs;
use crate::metrics::GrpcMetricsLayer;
use crate::readiness::{Readiness, ReadinessLayer, State};
use crate::workers::{spawn_reaper, Timing, Workers};
use crate::store::{Store, StoreError};
use crate::sweep::{spawn_engine, SweepEngine, Sweeps};

/// Largest gRPC message accepted (streamed uploads send many small ones).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// How long shutdown waits for in-flight calls before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Starts coordinators.
pub struct Coordinator;

/// A running coordinator. Call [`CoordinatorHandle::shutdown`] to stop it;
/// dropping the handle instead leaves it serving until the runtime ends.
pub struct CoordinatorHandle {
    /// The bound gRPC address (port 0 resolved).
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address (port 0 resolved).
    pub http_addr: SocketAddr,
    store: Store,
    stop: watch::Sender<bool>,
    health: tonic_health::server::HealthReporter,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
    reaper: JoinHandle<()>,
    /// Other coordinators' job events, from PostgreSQL to the hub.
    relay: JoinHandle<()>,
    /// This coordinator's job events, from the hub to the others.
    announcing: AnnouncerTask,
    /// Whether this coordinator leads (`leader.rs`), and the election.
    leader: watch::Receiver<bool>,
    election: JoinHandle<()>,
    engine: JoinHandle<()>,
    monitor: JoinHandle<()>,
    /// Counts folded and metrics retention, on the leader.
    tables: JoinHandle<()>,
}

/// How often the database monitor checks the database.
const MONITOR_INTERVAL: Duration = Duration::from_secs(1);
/// How long a database check may take before the database counts as down.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

impl Coordinator {
    /// Binds the ports, waits for the database (however long it takes;
    /// calls are answered `UNAVAILABLE` meanwhile), applies migrations,
    /// extends open leases (so workers survive a coordinator restart) and
    /// starts serving.
    pub async fn start(config: Config) -> anyhow::Result<CoordinatorHandle> {
        let store = Store::connect_lazy_announcing(&config.database_url)
            .context("reading the database url")?
            .with_blob_store(config.blob_store.clone());
        let readiness = Readiness::default();

        let (stop, stopped) = watch::channel(false);
        let (announcer, announcing) = crate::announce::spawn(store.clone());
        let hub = EventHub::announcing(announcer);
        let timing = Timing {
            lease_timeout: config.lease_timeout,
            heartbeat_interval: config.heartbeat_interval,
            retry: config.retry,
            max_checkpoint_bytes: config.max_checkpoint_bytes,
            max_adapter_bytes: config.files.adapter,
        };
        let work = WorkSignal::default();
        let workers = Workers::new(store.clone(), hub.clone(), work.clone(), timing);
        let jobs = Jobs::new(
            store.clone(),
            hub.clone(),
            config.default_max_attempts,
            config.lease_timeout,
            config.files,
            stopped.clone(),
        );
        let nudge = Arc::new(Notify::new());
        let sweeps = Sweeps::new(store.clone(), jobs.clone(), hub.clone(), nudge.clone(), config.default_max_attempts);

        let grpc_listener = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("binding the grpc address {}", config.grpc_addr))?;
        let http_listener = TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding the http address {}", config.http_addr))?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;

        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, false).await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ptune_proto::v1::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building the reflection service")?;
        let streams = StreamLimits::new(config.limits);
        let job_api = JobApi::new(jobs.clone(), streams.clone(), config.limits.upload_idle);
        let job_service = JobServiceServer::new(job_api).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let worker_service = WorkerServiceServer::new(WorkerApi::new(workers.clone(), config.limits.upload_idle))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let sweep_service =
            SweepServiceServer::new(SweepApi::new(sweeps.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let admin_service = AdminServiceServer::new(AdminApi::new(store.clone()));
        let mut server = tonic::transport::Server::builder().timeout(config.limits.request);
        if let Some(files) = &config.tls {
            server = server.tls_config(crate::tls::grpc(files)?).context("gRPC TLS settings")?;
        }
        let grpc = tokio::spawn(
            server
                .layer(GrpcMetricsLayer::new(store.prometheus().clone()))
                .layer(ReadinessLayer::new(readiness.clone()))
                .layer(AuthLayer::new(store.clone()))
                .add_service(health_service)
                .add_service(reflection)
                .add_service(job_service)
                .add_service(worker_service)
                .add_service(sweep_service)
                .add_service(admin_service)
                .serve_with_incoming_shutdown(without_delay(grpc_listener), stop_signal(stopped.clone())),
        );
        let guard = dashboard::guard::GuardSettings {
            allowed_hosts: allowed_hosts(&config, http_addr),
            public_metrics: config.public_metrics,
            tls: config.tls.is_some(),
        };
        let live = dashboard::Live { hub: hub.clone(), stopped: stopped.clone(), streams };
        let dashboard = Dashboard::new(store.clone(), jobs, sweeps, config.lease_timeout, live, guard);
        let router = dashboard::router(dashboard);
        let http = match &config.tls {
            Some(files) => {
                let listener = crate::tls::TlsListener::new(http_listener, crate::tls::acceptor(files)?)?;
                tokio::spawn(axum::serve(listener, router).with_graceful_shutdown(stop_signal(stopped.clone())).into_future())
            }
            None => tokio::spawn(
                axum::serve(http_listener, router).with_graceful_shutdown(stop_signal(stopped.clone())).into_future(),
            ),
        };
        info!(addr = %grpc_addr, "grpc listening");
        info!(addr = %http_addr, "http listening");

        wait_for_database(&store).await.context("applying the database migrations")?;
        if let Some(dir) = &config.bootstrap_dir {
            bootstrap_tokens(&store, dir).await?;
        }
        // Leases are extended only when no coordinator served the fleet
        // lately (store/takeover.rs): twice the heartbeat interval.
        let extended = store.extend_leases_if_unserved(config.lease_timeout, 2 * config.heartbeat_interval).await?;
        if extended > 0 {
            info!(leases = extended, "no coordinator served the workers lately: extended open leases so they can reconnect");
        }
        let (leader, election) = crate::leader::spawn(store.clone(), stopped.clone());
        let reaper = spawn_reaper(workers, leader.clone(), stopped.clone());
        let tables = crate::tables::spawn(store.clone(), config.metrics_retention, leader.clone(), stopped.clone());
        let relay = crate::relay::spawn(store.clone(), hub.clone(), work, stopped.clone());
        let engine = spawn_engine(SweepEngine::new(store.clone(), hub), nudge, stopped.clone());
        readiness.set(State::Ready);
        set_health(&health, true).await;
        let monitor = tokio::spawn(monitor_database(store.clone(), readiness, health.clone(), stopped));
        Ok(CoordinatorHandle {
            grpc_addr,
            http_addr,
            store,
            stop,
            health,
            grpc,
            http,
            reaper,
            relay,
            announcing,
            leader,
            election,
            engine,
            monitor,
            tables,
        })
    }
}

/// The host names the dashboard answers to: localhost, the bound address
/// (and the machine's name when bound to all interfaces), and the operator's.
fn allowed_hosts(config: &Config, http: SocketAddr) -> Vec<String> {
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into(), http.ip().to_string()];
    if http.ip().is_unspecified() {
        if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            hosts.push(name.trim().to_string());
        }
    }
    hosts.extend(config.allowed_hosts.iter().map(|h| h.trim().to_ascii_lowercase()));
    hosts
}

/// The single-machine setup: when the database has no admin token, creates
/// an admin token and a worker token and writes them to
/// `<dir>/admin.token` and `<dir>/worker.token` (mode 0600), so the CLI and a
/// local worker can authenticate without further steps.
async fn bootstrap_tokens(store: &Store, dir: &std::path::Path) -> anyhow::Result<()> {
    if store.has_admin_token().await? {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, role, file) in [("admin", Role::Admin, "admin.token"), ("local-worker", Role::Worker, "worker.token")] {
        // A live token of that name without an admin (revoked admin) is left alone.
        let Ok((record, token)) = store.create_token(name, role, None, "bootstrap").await else { continue };
        let path = dir.join(file);
        write_secret(&path, &token).with_context(|| format!("cannot write {}", path.display()))?;
        store.audit(&crate::auth::system(), "token.create", &record.id.to_string(), serde_json::json!({ "name": name, "role": role.as_str() })).await?;
        info!(token = name, role = %role, file = %path.display(), "created a token for this machine; keep the file private");
    }
    Ok(())
}

/// Writes a secret to a file only its owner may read.
fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// Waits until the database answers and the migrations are applied,
/// logging every few seconds while it does not. A migration the database
/// refuses (or a database migrated by a newer coordinator) is fatal.
async fn wait_for_database(store: &Store) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(100);
    let mut last_log: Option<tokio::time::Instant> = None;
    loop {
        let error = match tokio::time::timeout(PING_TIMEOUT, store.ping()).await {
            Err(_) => "no answer".to_string(),
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(())) => match store.migrate().await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_unavailable() => e.to_string(),
                Err(fatal) => return Err(fatal),
            },
        };
        if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            warn!(%error, "waiting for the database; calls are answered UNAVAILABLE meanwhile");
            last_log = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Checks the database every [`MONITOR_INTERVAL`]: while it does not
/// answer, health says `NOT_SERVING` and calls get `UNAVAILABLE`.
async fn monitor_database(
    store: Store,
    readiness: Readiness,
    health: tonic_health::server::HealthReporter,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(MONITOR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => break,
            _ = tick.tick() => {}
        }
        let up = matches!(tokio::time::timeout(PING_TIMEOUT, store.ping()).await, Ok(Ok(())));
        match (readiness.state(), up) {
            (State::Ready, false) => {
                warn!("database unavailable: health NOT_SERVING, calls answered UNAVAILABLE until it is back");
                readiness.set(State::DatabaseDown);
                set_health(&health, false).await;
            }
            (State::DatabaseDown, true) => {
                info!("database available again: serving");
                readiness.set(State::Ready);
                set_health(&health, true).await;
            }
            _ => {}
        }
    }
}

/// Sets the health of the server (`""`) and of every ptune service.
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
    health.set_service_status("", status).await;
    health.set_service_status(<JobServiceServer<JobApi> as tonic::server::NamedService>::NAME, status).await;
    health.set_service_status(<WorkerServiceServer<WorkerApi> as tonic::server::NamedService>::NAME, status).await;
    health.set_service_status(<SweepServiceServer<SweepApi> as tonic::server::NamedService>::NAME, status).await;
    health.set_service_status(<AdminServiceServer<AdminApi> as tonic::server::NamedService>::NAME, status).await;
}

impl CoordinatorHandle {
    /// Whether this coordinator holds the leader lock now.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Stops accepting calls, lets in-flight calls finish (watch streams end
    /// with UNAVAILABLE), stops the reaper and the sweep engine, and closes
    /// the database pool.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        info!("shutting down");
        set_health(&self.health, false).await;
        let _ = self.stop.send(true);
        let grpc = finish("grpc server", self.grpc).await.map(|r| r.context("grpc server failed"));
        let http = finish("http server", self.http).await.map(|r| r.context("http server failed"));
        let _ = finish("reaper", self.reaper).await;
        let _ = finish("event relay", self.relay).await;
        let _ = finish("leader election", self.election).await;
        let _ = finish("sweep engine", self.engine).await;
        // Nothing publishes any more: what is left goes to the other coordinators.
        if tokio::time::timeout(SHUTDOWN_GRACE, self.announcing.finish()).await.is_err() {
            warn!("the event announcer did not finish in time; the other coordinators resync");
        }
        let _ = finish("database monitor", self.monitor).await;
        let _ = finish("table maintenance", self.tables).await;
        self.store.close().await;
        info!("shut down");
        grpc.transpose()?;
        http.transpose()?;
        Ok(())
    }
}

/// Waits for a task for [`SHUTDOWN_GRACE`], then aborts it; `None` if it had to be aborted.
async fn finish<T>(what: &str, mut task: JoinHandle<T>) -> Option<T> {
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            warn!(task = what, error = %e, "task panicked during shutdown");
            None
        }
        Err(_) => {
            warn!(task = what, grace_secs = SHUTDOWN_GRACE.as_secs(), "task did not stop in time; aborting it");
            task.abort();
            None
        }
    }
}

async fn stop_signal(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// The gRPC connections `listener` accepts, each with Nagle's algorithm off
/// (TCP_NODELAY), as tonic sets it on listeners it binds itself but not on
/// an incoming stream handed to it. With it on, an answer written in more
/// than one piece waits for the client's delayed acknowledgement: about
/// 40 ms added to calls such as a page of ListJobs.
fn without_delay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| accepted.and_then(|stream| stream.set_nodelay(true).map(|()| stream)))
}
