//! Real processes for the fault-injection suite: the `ptune-coordinator`
//! and `ptune-worker` binaries (the worker built with the
//! `fault-injection` feature), a private PostgreSQL cluster that can be
//! stopped without touching the machine's shared one, a TCP proxy that
//! can cut a worker off, and a watcher that checks the database's
//! invariants throughout a scenario.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ptune_proto::client::AuthChannel;
use ptune_proto::v1::{self, job_service_client::JobServiceClient};

pub use super::cluster::{get, minilm_dir, sst2, state, upload, without_colours, MODEL};

/// The coordinator binary, built beside the worker's (`cargo build --bins`).
pub fn coordinator_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_ptune-worker")).with_file_name("ptune-coordinator");
    assert!(bin.exists(), "{} is missing; run cargo build --bins first", bin.display());
    bin
}

/// Where a scenario's coordinators write the tokens they bootstrap.
pub fn tokens_dir(dir: &Path) -> PathBuf {
    dir.join("tokens")
}

/// The `admin` or `worker` token bootstrapped under `dir`, once written.
pub fn read_token(dir: &Path, role: &str) -> Option<String> {
    let text = std::fs::read_to_string(tokens_dir(dir).join(format!("{role}.token"))).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A log file's text without colour codes.
pub fn read_log(path: &Path) -> String {
    without_colours(&std::fs::read_to_string(path).unwrap_or_default())
}

/// Sends `signal` to a child process.
pub fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, signal);
}

// ------------------------------------------------------------ coordinator

/// A `ptune-coordinator` process, restartable on the same ports.
pub struct CoordinatorProcess {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    dir: PathBuf,
    database_url: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl CoordinatorProcess {
    /// Starts a coordinator on `database_url` with a lease of `lease_ms`;
    /// `extra` flags are appended (e.g. `--retry-backoff-ms`).
    pub fn start(dir: &Path, name: &str, database_url: &str, lease_ms: u64, extra: &[&str]) -> Self {
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args = vec![
            format!("--lease-timeout-ms={lease_ms}"),
            format!("--heartbeat-interval-ms={}", (lease_ms / 6).max(100)),
            // The first coordinator of a database writes an admin and a worker token here.
            format!("--bootstrap-tokens={}", tokens_dir(dir).display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut this = Self {
            grpc,
            http,
            dir: dir.to_path_buf(),
            database_url: database_url.to_string(),
            args,
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        this.restart();
        this
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Starts the process again on the same ports (after a kill).
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(coordinator_bin())
            .arg("--database-url")
            .arg(&self.database_url)
            .arg(format!("--grpc-addr={}", self.grpc))
            .arg(format!("--http-addr={}", self.http))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("coordinator starts");
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown, nothing flushed.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// A job-service client with the admin token; waits until the coordinator answers.
    pub async fn client(&self) -> JobServiceClient<AuthChannel> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(token) = read_token(&self.dir, "admin") {
                let channel = ptune_coordinator::testing::channel(&self.url(), &token);
                let mut client = JobServiceClient::new(channel).max_decoding_message_size(64 << 20);
                if client.list_workers(v1::ListWorkersRequest::default()).await.is_ok() {
                    return client;
                }
            }
            assert!(Instant::now() < deadline, "coordinator never answered; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ------------------------------------------------------------ workers

/// A `ptune-worker` process.
pub struct WorkerProcess {
    pub name: String,
    pub work_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    faults: String,
    child: Option<Child>,
}

impl WorkerProcess {
    /// Starts a worker serving MiniLM from `models_dir` with `slots`,
    /// connected to `coordinator` (one or several addresses), its work
    /// directory `dir/name`, and `faults` as `PTUNE_FAULTS`.
    pub fn start(dir: &Path, name: &str, models_dir: &Path, coordinator: &str, slots: u32, faults: &str) -> Self {
        let mut args = vec![
            format!("--coordinator={coordinator}"),
            format!("--models-dir={}", models_dir.display()),
            format!("--work-dir={}", dir.join(name).display()),
            format!("--slots={slots}"),
            "--threads=1".into(),
            "--drain-timeout=20".into(),
        ];
        // The worker token the scenario's coordinator bootstrapped, if one did.
        if read_token(dir, "worker").is_some() {
            args.push(format!("--token-file={}", tokens_dir(dir).join("worker.token").display()));
        }
        let mut this = Self {
            name: name.to_string(),
            work_dir: dir.join(name),
            log: dir.join(format!("{name}.log")),
            args,
            faults: faults.to_string(),
            child: None,
        };
        this.restart();
        this
    }

    /// Starts the process again with the same work directory (the same worker).
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ptune-worker"))
            .args(&self.args)
            .env("PTUNE_FAULTS", &self.faults)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("worker starts");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn sigterm(&self) {
        if let Some(child) = &self.child {
            signal(child, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// Waits up to `timeout` for the process to exit; its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Some(status.code().unwrap_or(-1));
                }
            } else {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Waits until the log has a line containing every one of `needles`; returns it.
    pub async fn wait_log(&self, needles: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
            assert!(Instant::now() < deadline, "worker {} never logged {needles:?}; log:\n{}", self.name, self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A models folder serving MiniLM.
pub fn models_dir(dir: &Path) -> PathBuf {
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(minilm_dir(), models.join(MODEL)).unwrap();
    models
}

// ------------------------------------------------------------ jobs

/// Uploads SST-2's training and dev sets; their references.
pub async fn upload_sst2(client: &mut JobServiceClient<AuthChannel>) -> (String, String) {
    (upload(client, &sst2("train.jsonl")).await, upload(client, &sst2("dev.jsonl")).await)
}

/// What most scenarios start from: a fresh database on the shared server,
/// a coordinator process on it, SST-2 uploaded, and a models folder
/// serving MiniLM, all under one temporary folder.
pub struct Scene {
    pub dir: tempfile::TempDir,
    pub db: ptune_coordinator::testing::TestDatabase,
    pub coordinator: CoordinatorProcess,
    pub client: JobServiceClient<AuthChannel>,
    pub train: String,
    pub eval: String,
    pub models: PathBuf,
}

impl Scene {
    /// A coordinator with a lease of `lease_ms` and `extra` flags.
    pub async fn start(lease_ms: u64, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = ptune_coordinator::testing::fresh_database().await.unwrap();
        let coordinator = CoordinatorProcess::start(dir.path(), "coordinator", &db.url, lease_ms, extra);
        let mut client = coordinator.client().await;
        let (train, eval) = upload_sst2(&mut client).await;
        let models = models_dir(dir.path());
        Self { dir, db, coordinator, client, train, eval, models }
    }
}

/// The suite's job (see [`super::cluster::sst2_job`]): an evaluation and a
/// checkpoint every 20 steps; `extra` adds `[training]` keys.
pub fn spec(name: &str, train: &str, eval: &str, steps: u64, extra: &str) -> v1::JobSpec {
    super::cluster::sst2_job(name, train, eval, steps, 20, extra)
}

pub async fn submit(client: &mut JobServiceClient<AuthChannel>, spec: v1::JobSpec) -> v1::Job {
    client.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await.expect("submit").into_inner().job.unwrap()
}

/// Polls until `pred` holds for the job, or panics after `timeout`;
/// calls that fail (a coordinator restarting) are retried.
pub async fn wait_for(
    client: &mut JobServiceClient<AuthChannel>,
    id: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&v1::Job) -> bool,
) -> v1::Job {
    let start = Instant::now();
    loop {
        if let Ok(job) = client.get_job(v1::GetJobRequest { job_id: id.into() }).await {
            let job = job.into_inner();
            if pred(&job) {
                return job;
            }
            assert!(start.elapsed() < timeout, "job never became {what} within {timeout:?}; last: {job:?}");
        } else {
            assert!(start.elapsed() < timeout, "job never became {what} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every training loss of a job by step, as recorded.
pub async fn train_losses(client: &mut JobServiceClient<AuthChannel>, id: &str) -> Vec<(u64, f64)> {
    let metrics = client
        .get_metrics(v1::GetMetricsRequest { job_id: id.into(), kind: "train".into() })
        .await
        .expect("metrics")
        .into_inner()
        .metrics;
    let mut losses: Vec<(u64, f64)> = metrics.iter().filter(|m| m.name == "loss").map(|m| (m.step, m.value)).collect();
    losses.sort_by_key(|(step, _)| *step);
    losses
}

/// The final evaluation loss of a succeeded job.
pub fn final_eval_loss(job: &v1::Job) -> f64 {
    job.latest_metrics.iter().find(|m| m.kind == "eval" && m.name == "loss").expect("an eval loss").value
}

// ------------------------------------------------------------ database

/// Checks the database's invariants every 50 ms until stopped: never two
/// open attempts of one job, never two adapters of one job. Violations
/// are collected, not panicked on, so the scenario can report them.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    violations: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<u64>,
}

impl Watcher {
    pub fn start(database_url: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let (url, flag, found) = (database_url.to_string(), stop.clone(), violations.clone());
        let task = tokio::spawn(async move {
            let mut checks = 0u64;
            let mut pool = None;
            while !flag.load(Ordering::SeqCst) {
                if pool.is_none() {
                    pool = sqlx::PgPool::connect(&url).await.ok();
                }
                if let Some(db) = &pool {
                    let doubled: Result<Vec<(String, i64)>, _> = sqlx::query_as(
                        "SELECT job_id::text, count(*) FROM job_attempts WHERE ended_at IS NULL \
                         GROUP BY job_id HAVING count(*) > 1",
                    )
                    .fetch_all(db)
                    .await;
                    match doubled {
                        Ok(rows) => {
                            checks += 1;
                            for (job, n) in rows {
                                found.lock().unwrap().push(format!("job {job} had {n} open attempts"));
                            }
                        }
                        // The database may be down on purpose; reconnect.
                        Err(_) => pool = None,
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            checks
        });
        Self { stop, violations, task }
    }

    /// Stops watching; the violations seen and how many checks ran.
    pub async fn finish(self) -> (Vec<String>, u64) {
        self.stop.store(true, Ordering::SeqCst);
        let checks = self.task.await.unwrap();
        let violations = self.violations.lock().unwrap().clone();
        (violations, checks)
    }
}

/// Rows of `sql` (one text column, `$1` bound to `arg` as text) on `database_url`.
pub async fn query_texts(database_url: &str, sql: &'static str, arg: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(database_url).await.unwrap();
    let rows = sqlx::query_scalar(sql).bind(arg).fetch_all(&pool).await.unwrap();
    pool.close().await;
    rows
}

pub use ptune_coordinator::testing::PrivatePostgres;

// ------------------------------------------------------------ tcp proxy

/// A TCP proxy from a local port to `upstream` that can cut every
/// connection and refuse new ones (a partition), then heal.
pub struct TcpProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(generation);
        let (flag, cuts) = (cut.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut_signal = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_signal.changed() => {}
                    }
                });
            }
        });
        Self { addr, cut, generation, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One row of the results table in docs/reliability.md, printed by each scenario.
pub fn report(scenario: &str, runs: u32, jobs: usize, lost: usize, duplicated: usize, attempts: &str, recover: &str) {
    println!("RELIABILITY | {scenario} | {runs} | {jobs} | {lost} | {duplicated} | {attempts} | {recover} |");
}
