//! An idle fleet: workers registered and asking for work that never comes,
//! against one coordinator on a fresh database. Measures what they cost
//! while nothing happens (the coordinator's and PostgreSQL's CPU as a
//! fraction of one core) in three modes, one after the other in the same
//! run, after the floor (the same coordinator with no worker at all): as
//! workers ask now (long-poll, `LeaseJob` waiting up to 5 s, and no
//! heartbeat while holding no lease), long-polling with a heartbeat every
//! interval (workers before), and polling every 250 ms with heartbeats
//! (workers before long-polling). Then the workers as they ask now while a
//! job is queued every second, which each one of them serves: every job
//! wakes the waiting calls, and the table counts how many read the queue
//! for it (the coordinator's `ptune_lease_duration_seconds` counts, one per
//! read). `PTUNE_FLEET_COORDINATOR_BIN` runs another coordinator binary,
//! such as one built from an earlier commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ptune_coordinator::auth::Role;
use ptune_coordinator::testing::{channel, create_token, fresh_database, CoordinatorProcess};
use ptune_proto::v1;
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;

use crate::measure::{self, Calls, PgLoad, Rpc};
use crate::worker::{self, Fleet};
use crate::{Settings, REGISTRATIONS_IN_FLIGHT, SAMPLE_EVERY};

/// Time the workers have to make their first calls before the measurement.
const WARM_UP: Duration = Duration::from_secs(10);
/// How often the trickle mode queues a job.
const TRICKLE_EVERY: Duration = Duration::from_secs(1);

/// What one mode cost.
struct IdleRun {
    mode: &'static str,
    /// The measured window.
    seconds: f64,
    /// The calls of the whole run, warm-up included, and its length.
    calls: Calls,
    call_seconds: f64,
    coordinator_cpu: f64,
    pg_cpu: f64,
    /// Jobs queued in the measured window, and reads of the queue by lease
    /// calls in it.
    queued: usize,
    reads: f64,
}

/// Runs both modes and prints their table; returns what went wrong.
pub async fn run(settings: &Settings) -> anyhow::Result<Vec<String>> {
    let mut runs = Vec::new();
    let mut violations = Vec::new();
    let modes = [
        ("no workers: the coordinator's own background work (the floor)", 0, 5000, false, false),
        ("long-poll, no heartbeat while idle (workers now)", settings.idle, 5000, false, false),
        ("long-poll, heartbeat every interval", settings.idle, 5000, true, false),
        ("poll every 250 ms, heartbeat every interval", settings.idle, 0, true, false),
        ("workers now, a job queued every second", settings.idle, 5000, false, true),
    ];
    for (mode, workers, wait_ms, heartbeats, trickle) in modes {
        let (run, failed) = measure_mode(settings, mode, workers, wait_ms, heartbeats, trickle).await?;
        runs.push(run);
        violations.extend(failed);
    }
    println!("### {} idle workers, {} s measured\n", settings.idle, settings.idle_seconds);
    println!("| mode | LeaseJob calls/s | Heartbeat calls/s | coordinator CPU (% of a core) | PostgreSQL CPU (% of a core) | both (% of a core) | jobs queued | queue reads per job |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        let per_s = |rpc| r.calls.count(rpc) as f64 / r.call_seconds;
        let core = |cpu: f64| 100.0 * cpu / r.seconds;
        println!(
            "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} |",
            r.mode,
            per_s(Rpc::LeaseJob),
            per_s(Rpc::Heartbeat),
            core(r.coordinator_cpu),
            core(r.pg_cpu),
            core(r.coordinator_cpu + r.pg_cpu),
            r.queued,
            if r.queued == 0 { "".to_string() } else { format!("{:.1}", r.reads / r.queued as f64) }
        );
    }
    println!();
    Ok(violations)
}

async fn measure_mode(
    settings: &Settings,
    mode: &'static str,
    idle: usize,
    wait_ms: u32,
    heartbeat_when_idle: bool,
    trickle: bool,
) -> anyhow::Result<(IdleRun, Vec<String>)> {
    let db = fresh_database().await?;
    let coordinator = CoordinatorProcess::start(&settings.coordinator_bin, &db.url, &[], &[])?;
    measure::migrated_by(&coordinator).await?;
    let admin = create_token(&db.url, Role::Admin, "fleet-admin").await?;
    let worker_token = create_token(&db.url, Role::Worker, "fleet-workers").await?;
    coordinator.wait_until_serving(&admin).await?;
    let fleet = Arc::new(Fleet { heartbeat_when_idle, ..Fleet::new(idle, 0, 1, 1, wait_ms) });
    let registered: Vec<_> = futures::stream::iter(0..idle)
        .map(|i| worker::register(WorkerServiceClient::new(channel(&coordinator.url, &worker_token)), i, 1))
        .buffered(REGISTRATIONS_IN_FLIGHT)
        .collect()
        .await;
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in registered {
        workers.push(tokio::spawn(worker::idle(w?, fleet.clone())));
    }
    tokio::time::sleep(WARM_UP).await;

    let mut jobs = JobServiceClient::new(channel(&coordinator.url, &admin));
    let spec = if trickle {
        let chunk = v1::DatasetChunk { file_name: "train.jsonl".into(), data: crate::TRAIN.as_bytes().to_vec() };
        let dataset = jobs.upload_dataset(futures::stream::iter([chunk])).await?.into_inner().reference;
        Some(crate::spec(&dataset, 1))
    } else {
        None
    };

    // Calls are counted over the whole run, CPU and reads over the measured window.
    let mut pg = PgLoad::start(&db.url).await?;
    let cpu_before = measure::cpu_seconds(coordinator.pid()).unwrap_or(0.0);
    let reads_before = lease_reads(coordinator.http, &admin).await?;
    let window = Instant::now();
    let mut queued = 0;
    let mut next_job = Instant::now();
    while window.elapsed() < Duration::from_secs(settings.idle_seconds) {
        if let Some(spec) = spec.as_ref().filter(|_| Instant::now() >= next_job) {
            let spec = v1::JobSpec { name: format!("trickle-{queued}"), ..spec.clone() };
            jobs.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await?;
            queued += 1;
            next_job += TRICKLE_EVERY;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
        pg.sample().await?;
    }
    let seconds = window.elapsed().as_secs_f64();
    let coordinator_cpu = measure::cpu_seconds(coordinator.pid()).unwrap_or(0.0) - cpu_before;
    let reads = lease_reads(coordinator.http, &admin).await? - reads_before;
    let (pg_cpu, _) = pg.cpu_seconds();
    fleet.done.send_replace(true);
    let call_end = Instant::now();
    let mut calls = Calls::default();
    for w in workers {
        calls.merge(w.await?);
    }
    let call_seconds = (call_end - started).as_secs_f64();
    let mut violations = Vec::new();
    if calls.total_errors() != 0 {
        let first = fleet.first_errors.lock().unwrap().join("; ");
        violations.push(format!("idle fleet, {mode}: {} calls failed, the first: {first}", calls.total_errors()));
    }
    Ok((IdleRun { mode, seconds, calls, call_seconds, coordinator_cpu, pg_cpu, queued, reads }, violations))
}

/// Reads of the queue by lease calls so far: the counts of the
/// coordinator's `ptune_lease_duration_seconds` histogram, every outcome.
async fn lease_reads(http: std::net::SocketAddr, token: &str) -> anyhow::Result<f64> {
    Ok(crate::measure::http_get(http, "/metrics", Some(token))
        .await?
        .lines()
        .filter(|l| l.starts_with("ptune_lease_duration_seconds_count{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum())
}
