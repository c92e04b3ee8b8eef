//! What the fleet benchmark measures besides wall time: call latencies per
//! RPC, CPU seconds of processes from `/proc/PID/stat`, and the load on
//! PostgreSQL of the benchmark's own database (the CPU of the server
//! processes serving it and the rows written to it). Other databases on the
//! same server, and the server's shared background processes (WAL writer,
//! checkpointer), are left out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::{Connection, PgConnection};

/// The calls whose latencies are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rpc {
    RegisterWorker,
    SubmitJob,
    LeaseJob,
    ReportProgress,
    ReportProgressBatch,
    CompleteJob,
    Heartbeat,
    /// Not an RPC: a call that brought a lease, a LeaseJob call or a
    /// completion that carried the next one (`CompleteJobHeader.next`),
    /// timed from its start to the lease in hand.
    Leased,
}

impl Rpc {
    pub const ALL: [Rpc; 8] = [
        Rpc::RegisterWorker,
        Rpc::SubmitJob,
        Rpc::LeaseJob,
        Rpc::ReportProgress,
        Rpc::ReportProgressBatch,
        Rpc::CompleteJob,
        Rpc::Heartbeat,
        Rpc::Leased,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rpc::RegisterWorker => "RegisterWorker",
            Rpc::SubmitJob => "SubmitJob",
            Rpc::LeaseJob => "LeaseJob",
            Rpc::ReportProgress => "ReportProgress",
            Rpc::ReportProgressBatch => "ReportProgressBatch",
            Rpc::CompleteJob => "CompleteJob",
            Rpc::Heartbeat => "Heartbeat",
            Rpc::Leased => "lease, any call that brought one",
        }
    }
}

/// Latencies (microseconds) and error counts per [`Rpc`]; each task keeps
/// its own and they are merged at the end, so recording takes no lock.
#[derive(Clone, Debug, Default)]
pub struct Calls {
    micros: [Vec<u32>; Rpc::ALL.len()],
    errors: [u64; Rpc::ALL.len()],
}

impl Calls {
    /// Records a call that started at `started` and ended now.
    pub fn record(&mut self, rpc: Rpc, started: Instant, ok: bool) {
        let micros = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        self.micros[rpc as usize].push(micros);
        if !ok {
            self.errors[rpc as usize] += 1;
        }
    }

    pub fn merge(&mut self, other: Calls) {
        for (mine, theirs) in self.micros.iter_mut().zip(other.micros) {
            mine.extend(theirs);
        }
        for (mine, theirs) in self.errors.iter_mut().zip(other.errors) {
            *mine += theirs;
        }
    }

    pub fn count(&self, rpc: Rpc) -> usize {
        self.micros[rpc as usize].len()
    }

    pub fn errors(&self, rpc: Rpc) -> u64 {
        self.errors[rpc as usize]
    }

    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// The `q` quantile (0 to 1) in milliseconds, nearest rank; None without calls.
    pub fn quantile_ms(&mut self, rpc: Rpc, q: f64) -> Option<f64> {
        let v = &mut self.micros[rpc as usize];
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(f64::from(v[rank - 1]) / 1000.0)
    }
}

/// User plus system CPU time of process `pid` so far; None once it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    ptune_coordinator::testing::cpu_seconds(pid).ok()
}

/// CPU seconds of this process (the load generator) so far.
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// The machine's 1-minute load average: how busy the cores were with
/// anything, this benchmark included.
pub fn load_average() -> f64 {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().next().and_then(|l| l.parse().ok()).unwrap_or(f64::NAN)
}

/// How long a PostgreSQL 15 backend may keep its counters before it
/// reports them (`PGSTAT_IDLE_INTERVAL`, 10 s), with a margin: the row
/// counts are read only after the coordinators' backends had that long.
pub const STATS_SETTLE: Duration = Duration::from_secs(11);

/// Watches the server processes that serve one database: their CPU time is
/// read when first seen and again at every sample, so connections that the
/// pools open during the phase count from their start, and ones that close
/// count up to their last sample (and are reported as vanished).
pub struct PgLoad {
    monitor: PgConnection,
    /// pid: (CPU seconds at the phase's start, 0 for a process started
    /// during it; CPU seconds at its last sample).
    backends: HashMap<i32, (f64, f64)>,
    vanished: usize,
}

/// Rows inserted, updated and deleted, in all and per table.
#[derive(Clone, Debug, Default)]
pub struct RowsWritten {
    pub total: i64,
    pub tables: Vec<(String, i64)>,
}

impl PgLoad {
    /// Connects to the database at `url` and takes the first reading.
    pub async fn start(url: &str) -> anyhow::Result<Self> {
        let monitor = PgConnection::connect(url).await.context("connecting to the benchmark database")?;
        let mut load = Self { monitor, backends: HashMap::new(), vanished: 0 };
        for pid in load.pids().await? {
            if let Some(cpu) = cpu_seconds(pid as u32) {
                load.backends.insert(pid, (cpu, cpu));
            }
        }
        Ok(load)
    }

    /// Reads the CPU time of every backend of the database, new ones included.
    pub async fn sample(&mut self) -> anyhow::Result<()> {
        let pids = self.pids().await?;
        for pid in &pids {
            if let Some(cpu) = cpu_seconds(*pid as u32) {
                self.backends.entry(*pid).or_insert((0.0, cpu)).1 = cpu;
            }
        }
        self.vanished = self.backends.keys().filter(|pid| !pids.contains(pid)).count();
        Ok(())
    }

    /// CPU seconds the backends used since [`PgLoad::start`], and how many
    /// of them were gone at the last sample (their CPU counts up to the
    /// sample before).
    pub fn cpu_seconds(&self) -> (f64, usize) {
        (self.backends.values().map(|(first, last)| last - first).sum(), self.vanished)
    }

    /// Backends of the database other than the monitor's own.
    async fn pids(&mut self) -> anyhow::Result<Vec<i32>> {
        Ok(sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(&mut self.monitor)
        .await?)
    }

    /// Rows written to the database so far, as the statistics report them.
    pub async fn rows_written(&mut self) -> anyhow::Result<RowsWritten> {
        let total: i64 = sqlx::query_scalar(
            "SELECT (tup_inserted + tup_updated + tup_deleted)::bigint FROM pg_stat_database \
             WHERE datname = current_database()",
        )
        .fetch_one(&mut self.monitor)
        .await?;
        let tables = sqlx::query_as(
            "SELECT relname::text, (n_tup_ins + n_tup_upd + n_tup_del)::bigint FROM pg_stat_user_tables ORDER BY 1",
        )
        .fetch_all(&mut self.monitor)
        .await?;
        Ok(RowsWritten { total, tables })
    }
}

impl RowsWritten {
    /// What was written between `before` and `self`, tables by rows written, most first.
    pub fn since(&self, before: &RowsWritten) -> RowsWritten {
        let earlier: HashMap<&str, i64> = before.tables.iter().map(|(t, n)| (t.as_str(), *n)).collect();
        let mut tables: Vec<(String, i64)> = self
            .tables
            .iter()
            .map(|(t, n)| (t.clone(), n - earlier.get(t.as_str()).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        tables.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        RowsWritten { total: self.total - before.total, tables }
    }
}

/// A plain HTTP/1.1 GET of `path` at `addr`, with `token` as a bearer token
/// when given: the whole response, headers included.
pub async fn http_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// Waits until `coordinator` has migrated its database (`/healthz` answers
/// once it has), so that one built from an earlier commit runs on its own
/// migrations before this build's tokens are made.
pub async fn migrated_by(coordinator: &ptune_coordinator::testing::CoordinatorProcess) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    while !http_get(coordinator.http, "/healthz", None).await.unwrap_or_default().starts_with("HTTP/1.1 200") {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(20), "ptune-coordinator did not migrate its database");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
