//! Fleet load: N `ptune-coordinator` processes on one fresh database, J
//! jobs submitted over them, and W simulated workers over real gRPC, spread
//! round-robin over the coordinators, that lease, report and complete the
//! jobs until every one has succeeded (see `worker.rs` for what a worker
//! does). Measures submissions per second, how long the workers take to
//! register with the jobs queued (and the database's CPU meanwhile), lease
//! + report + complete cycles per second, p50/p95/p99 latency per RPC, and
//! what the work phase costs:
//! CPU seconds of the PostgreSQL processes serving the database, rows
//! written per job, each coordinator's CPU seconds and peak resident
//! memory. Checks (not timings) that every job was leased once and
//! completed once and that no call failed; exits non-zero otherwise.
//! Prints a Markdown table per run and, for several coordinator counts
//! (each on a fresh database), one side by side with ratios against the
//! first count.
//!
//!   bench/fleet.sh, or `cargo bench -p ptune-coordinator --bench fleet`, with
//!
//!   PTUNE_FLEET_COORDINATORS   coordinator counts, one run each (default 1; e.g. 1,2,3)
//!   PTUNE_FLEET_WORKERS        simulated workers (default 50)
//!   PTUNE_FLEET_JOBS           jobs submitted (default 2000; 0: only the idle phase)
//!   PTUNE_FLEET_STEPS          steps reported per job (default 1)
//!   PTUNE_FLEET_PACK           jobs a worker leases and trains together (default 1)
//!   PTUNE_FLEET_PROGRESS       progress modes, one run each (default single): `single` (one
//!                              ReportProgress call per job and step, as before batching), `batch`
//!                              (one ReportProgressBatch call per step of a pack); e.g. single,batch
//!   PTUNE_FLEET_NEXT_LEASE     how a worker takes its next job, one run each (default completion):
//!                              `completion` (asked for with each completion, as the agent does; LeaseJob
//!                              only when none came), `separate` (a LeaseJob call after each completion,
//!                              as before); e.g. separate,completion
//!   PTUNE_FLEET_RATE           jobs per second the whole fleet asks for, one run each (default 0: as
//!                              fast as the workers go, which saturates the machine); e.g. 0,2000 measures
//!                              the most cycles per second, then latencies with 2,000 cycles per second
//!   PTUNE_FLEET_IDLE           then idle workers, registered and asking for work that never comes
//!                              (default 0: none): coordinator and PostgreSQL CPU over
//!                              PTUNE_FLEET_IDLE_S (default 60) as workers ask now, then as they asked
//!                              before, then as they ask now with a job queued every second, counting
//!                              reads of the queue per job (see `idle.rs`)
//!   PTUNE_FLEET_ADAPTER_BYTES  adapter size per CompleteJob (default 1024)
//!   PTUNE_FLEET_LEASE_WAIT_MS  LeaseJob long-poll wait, as the worker sends it (default 5000; 0: answered
//!                              at once, and the simulated worker polls every 250 ms, as before long-polling)
//!   PTUNE_FLEET_SUBMIT_CONCURRENCY  SubmitJob calls in flight (default 8)
//!   PTUNE_FLEET_TIMEOUT_S      longest work phase before it counts as failed (default 900)
//!   PTUNE_FLEET_COORDINATOR_BIN  the coordinator binary to run (default: this build's)
//!
//! Needs the PostgreSQL server of the tests (`PTUNE_TEST_DATABASE_URL`).

mod idle;
mod measure;
mod worker;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use ptune_coordinator::auth::Role;
use ptune_coordinator::testing::{channel, create_token, fresh_database, CoordinatorProcess};
use ptune_proto::client::AuthChannel;
use ptune_proto::v1;
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;

use measure::{Calls, PgLoad, RowsWritten, Rpc};
use worker::Fleet;

pub(crate) const TRAIN: &str = "{\"text\": \"great film\", \"label\": 1}\n{\"text\": \"dull\", \"label\": 0}\n";
/// Registrations in flight at once before the work phase.
pub(crate) const REGISTRATIONS_IN_FLIGHT: usize = 32;
/// How often the PostgreSQL backends' CPU time is read during the work phase.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(250);

#[derive(Clone, Debug)]
pub(crate) struct Settings {
    coordinators: Vec<usize>,
    workers: usize,
    jobs: usize,
    steps: u64,
    pack: usize,
    /// Progress in batches, per run.
    modes: Vec<bool>,
    /// The next lease asked for with each completion, per run.
    next_modes: Vec<bool>,
    /// LeaseJob calls per second of the whole fleet, per run; 0: unpaced.
    rates: Vec<u32>,
    idle: usize,
    idle_seconds: u64,
    adapter_bytes: usize,
    lease_wait_ms: u32,
    submit_concurrency: usize,
    timeout: Duration,
    /// The coordinator binary every run starts.
    coordinator_bin: String,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
            match std::env::var(name) {
                Ok(v) => v.trim().parse().map_err(|_| anyhow::anyhow!("{name} must be a number, got {v:?}")),
                Err(_) => Ok(default),
            }
        }
        let coordinators = std::env::var("PTUNE_FLEET_COORDINATORS").unwrap_or_else(|_| "1".into());
        let coordinators = coordinators
            .split(',')
            .map(|n| n.trim().parse::<usize>().ok().filter(|n| *n > 0))
            .collect::<Option<Vec<_>>>()
            .with_context(|| {
                format!("PTUNE_FLEET_COORDINATORS must list counts above 0, e.g. 1,2,3, got {coordinators:?}")
            })?;
        /// A comma-separated list of `off` and `on` (in that order in `names`), one run each.
        fn either(name: &str, default: &str, names: [&str; 2]) -> anyhow::Result<Vec<bool>> {
            let list = std::env::var(name).unwrap_or_else(|_| default.into());
            list.split(',')
                .map(|m| names.iter().position(|n| *n == m.trim()).map(|i| i == 1))
                .collect::<Option<Vec<_>>>()
                .with_context(|| format!("{name} must list {} and/or {}, got {list:?}", names[0], names[1]))
        }
        let modes = either("PTUNE_FLEET_PROGRESS", "single", ["single", "batch"])?;
        let next_modes = either("PTUNE_FLEET_NEXT_LEASE", "completion", ["separate", "completion"])?;
        let rates = std::env::var("PTUNE_FLEET_RATE").unwrap_or_else(|_| "0".into());
        let rates = rates
            .split(',')
            .map(|r| r.trim().parse::<u32>().ok())
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("PTUNE_FLEET_RATE must list jobs per second (0: unpaced), e.g. 0,2000, got {rates:?}"))?;
        let settings = Self {
            coordinators,
            rates,
            pack: var("PTUNE_FLEET_PACK", 1)?,
            modes,
            next_modes,
            idle: var("PTUNE_FLEET_IDLE", 0)?,
            idle_seconds: var("PTUNE_FLEET_IDLE_S", 60)?,
            workers: var("PTUNE_FLEET_WORKERS", 50)?,
            jobs: var("PTUNE_FLEET_JOBS", 2000)?,
            steps: var("PTUNE_FLEET_STEPS", 1)?,
            adapter_bytes: var("PTUNE_FLEET_ADAPTER_BYTES", 1024)?,
            lease_wait_ms: var("PTUNE_FLEET_LEASE_WAIT_MS", 5000)?,
            submit_concurrency: var("PTUNE_FLEET_SUBMIT_CONCURRENCY", 8)?,
            timeout: Duration::from_secs(var("PTUNE_FLEET_TIMEOUT_S", 900)?),
            coordinator_bin: std::env::var("PTUNE_FLEET_COORDINATOR_BIN")
                .unwrap_or_else(|_| env!("CARGO_BIN_EXE_ptune-coordinator").to_string()),
        };
        anyhow::ensure!(
            settings.jobs == 0 || settings.workers > 0,
            "PTUNE_FLEET_WORKERS must be above 0 when there are jobs"
        );
        anyhow::ensure!(settings.jobs > 0 || settings.idle > 0, "nothing to run: no jobs and no idle workers");
        anyhow::ensure!(settings.pack > 0, "PTUNE_FLEET_PACK must be above 0");
        anyhow::ensure!(settings.submit_concurrency > 0, "PTUNE_FLEET_SUBMIT_CONCURRENCY must be above 0");
        Ok(settings)
    }
}

/// What one run measured.
struct Report {
    coordinators: usize,
    batch: bool,
    /// Each completion asked for the worker's next job.
    next_with_completion: bool,
    /// Jobs per second the fleet asked for; 0: unpaced.
    rate: u32,
    submit_seconds: f64,
    /// Registering every worker, `REGISTRATIONS_IN_FLIGHT` at a time, with the jobs queued.
    register_seconds: f64,
    register_pg_cpu: f64,
    work_seconds: f64,
    calls: Calls,
    empty_leases: u64,
    empty_while_queued: u64,
    stop_directives: u64,
    /// The machine's 1-minute load average at the end of the work phase.
    load_average: f64,
    pg_cpu: f64,
    pg_vanished: usize,
    rows: RowsWritten,
    coordinator_cpu: Vec<f64>,
    coordinator_peak: Vec<u64>,
    generator_cpu: f64,
    violations: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "Fleet load: {} workers training packs of {} job(s), {} jobs, {} step(s) reported per job, {}-byte adapters, \
         submissions {} at a time; {cores} CPU cores shared by the coordinators, PostgreSQL and this generator\n",
        settings.workers, settings.pack, settings.jobs, settings.steps, settings.adapter_bytes, settings.submit_concurrency
    );
    let mut reports = Vec::new();
    // PTUNE_FLEET_JOBS=0 runs the idle phase alone.
    for &n in settings.coordinators.iter().filter(|_| settings.jobs > 0) {
        for &batch in &settings.modes {
            for &next in &settings.next_modes {
                for &rate in &settings.rates {
                    let mut report = run(&settings, Mode { coordinators: n, batch, next, rate }).await?;
                    print_run(&settings, &mut report, cores);
                    reports.push(report);
                }
            }
        }
    }
    if reports.len() > 1 {
        print_side_by_side(&settings, &mut reports);
    }
    let mut failed: Vec<String> = reports.iter().flat_map(|r| r.violations.clone()).collect();
    if settings.idle > 0 {
        failed.extend(idle::run(&settings).await?);
    }
    if !failed.is_empty() {
        for violation in failed {
            eprintln!("violation: {violation}");
        }
        std::process::exit(1);
    }
    Ok(())
}

/// What sets one run apart from the others.
#[derive(Clone, Copy, Debug)]
struct Mode {
    coordinators: usize,
    /// Progress in batches.
    batch: bool,
    /// The next lease asked for with each completion.
    next: bool,
    /// Jobs per second the fleet asks for; 0: unpaced.
    rate: u32,
}

/// One run on a fresh database.
async fn run(settings: &Settings, mode: Mode) -> anyhow::Result<Report> {
    let Mode { coordinators: n, batch, next, rate } = mode;
    let db = fresh_database().await?;
    let binary = &settings.coordinator_bin;
    let coordinators =
        (0..n).map(|_| CoordinatorProcess::start(binary, &db.url, &[], &[])).collect::<anyhow::Result<Vec<_>>>()?;
    for c in &coordinators {
        measure::migrated_by(c).await?;
    }
    let admin = create_token(&db.url, Role::Admin, "fleet-admin").await?;
    let worker_token = create_token(&db.url, Role::Worker, "fleet-workers").await?;
    for c in &coordinators {
        c.wait_until_serving(&admin).await?;
    }
    let job_clients: Vec<_> = coordinators.iter().map(|c| JobServiceClient::new(channel(&c.url, &admin))).collect();

    let chunk = v1::DatasetChunk { file_name: "train.jsonl".into(), data: TRAIN.as_bytes().to_vec() };
    let dataset = job_clients[0].clone().upload_dataset(futures::stream::iter([chunk])).await?.into_inner().reference;
    let (mut calls, submit_seconds) = submit(settings, &job_clients, spec(&dataset, settings.steps)).await?;

    // Every worker has its own connection, to the coordinator of its turn.
    let fleet = Arc::new(Fleet {
        pack: settings.pack,
        batch,
        pace: (rate > 0).then(|| worker::Pacer::new(rate)),
        next_with_completion: next,
        ..Fleet::new(settings.workers, settings.jobs, settings.steps, settings.adapter_bytes, settings.lease_wait_ms)
    });
    // The jobs are queued when the workers register: each registration
    // estimates the queued jobs on its models whose estimate it changes.
    let mut registering = PgLoad::start(&db.url).await?;
    let registration = Instant::now();
    let registered: Vec<_> = futures::stream::iter(0..settings.workers)
        .map(|i| {
            let client = WorkerServiceClient::new(channel(&coordinators[i % n].url, &worker_token));
            async move {
                let started = Instant::now();
                (started, worker::register(client, i, settings.pack).await)
            }
        })
        .buffered(REGISTRATIONS_IN_FLIGHT)
        .collect()
        .await;
    let register_seconds = registration.elapsed().as_secs_f64();
    registering.sample().await?;
    let register_pg_cpu = registering.cpu_seconds().0;
    let (start, started) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for (at, w) in registered {
        calls.record(Rpc::RegisterWorker, at, w.is_ok());
        workers.push(tokio::spawn(worker::run(w.context("registering a worker")?, fleet.clone(), started.clone())));
    }

    // Let the submissions' statistics reach pg_stat_* before the first reading.
    tokio::time::sleep(measure::STATS_SETTLE).await;
    let mut pg = PgLoad::start(&db.url).await?;
    let rows_before = pg.rows_written().await?;
    let cpu_before: Vec<f64> = coordinators.iter().map(|c| measure::cpu_seconds(c.pid()).unwrap_or(0.0)).collect();
    for c in &coordinators {
        c.reset_peak()?;
    }
    let generator_before = measure::own_cpu_seconds();
    let phase = Instant::now();
    start.send_replace(true);

    let mut done = fleet.done.subscribe();
    let mut violations = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            _ = done.wait_for(|d| *d) => break,
        }
        pg.sample().await?;
        if phase.elapsed() > settings.timeout {
            violations.push(format!(
                "{} of {} jobs completed within {} s",
                fleet.completed.load(Ordering::Relaxed),
                settings.jobs,
                settings.timeout.as_secs()
            ));
            fleet.done.send_replace(true);
            break;
        }
    }
    let work_seconds = phase.elapsed().as_secs_f64();
    pg.sample().await?;
    let (pg_cpu, pg_vanished) = pg.cpu_seconds();
    let coordinator_cpu = coordinators
        .iter()
        .zip(&cpu_before)
        .map(|(c, before)| measure::cpu_seconds(c.pid()).unwrap_or(0.0) - before)
        .collect();
    let coordinator_peak = coordinators.iter().map(|c| c.peak()).collect::<anyhow::Result<Vec<_>>>()?;
    let generator_cpu = measure::own_cpu_seconds() - generator_before;
    let load_average = measure::load_average();
    for w in workers {
        calls.merge(w.await?);
    }
    tokio::time::sleep(measure::STATS_SETTLE).await;
    let rows = pg.rows_written().await?.since(&rows_before);

    violations.extend(check(settings, &db.url, &fleet, &calls).await?);
    drop(coordinators);
    Ok(Report {
        coordinators: n,
        batch,
        next_with_completion: next,
        rate,
        submit_seconds,
        register_seconds,
        register_pg_cpu,
        work_seconds,
        calls,
        empty_leases: fleet.empty_leases.load(Ordering::Relaxed),
        empty_while_queued: fleet.empty_while_queued.load(Ordering::Relaxed),
        load_average,
        stop_directives: fleet.stop_directives.load(Ordering::Relaxed),
        pg_cpu,
        pg_vanished,
        rows,
        coordinator_cpu,
        coordinator_peak,
        generator_cpu,
        violations,
    })
}

/// Submits the jobs, `submit_concurrency` at a time, spread over the
/// coordinators. Returns the calls and the seconds it took.
async fn submit(
    settings: &Settings,
    clients: &[JobServiceClient<AuthChannel>],
    spec: v1::JobSpec,
) -> anyhow::Result<(Calls, f64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..settings.submit_concurrency)
        .map(|_| {
            let (clients, spec, next, jobs) = (clients.to_vec(), spec.clone(), next.clone(), settings.jobs);
            tokio::spawn(async move {
                let mut calls = Calls::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= jobs {
                        return Ok::<_, anyhow::Error>(calls);
                    }
                    let spec = v1::JobSpec { name: format!("fleet-{i}"), ..spec.clone() };
                    let call = Instant::now();
                    let reply =
                        clients[i % clients.len()].clone().submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await;
                    calls.record(Rpc::SubmitJob, call, reply.is_ok());
                    reply.context("submitting a job")?;
                }
            })
        })
        .collect();
    let mut calls = Calls::default();
    for task in tasks {
        calls.merge(task.await??);
    }
    Ok((calls, started.elapsed().as_secs_f64()))
}

/// A prompt-tuning job on [`worker::MODEL`] that trains `steps` steps.
pub(crate) fn spec(dataset: &str, steps: u64) -> v1::JobSpec {
    let mut spec = ptune_coordinator::testing::tiny_spec("", dataset, v1::Method::PromptTuning);
    spec.base_model = worker::MODEL.into();
    if let Some(training) = spec.training.as_mut() {
        training.max_steps = steps;
    }
    spec
}

/// What went wrong, from the database and the workers' own counts: every
/// job succeeded, with one attempt, an adapter, and no failed call.
async fn check(settings: &Settings, url: &str, fleet: &Fleet, calls: &Calls) -> anyhow::Result<Vec<String>> {
    let pool = sqlx::PgPool::connect(url).await?;
    let jobs = settings.jobs as i64;
    let mut violations = Vec::new();
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state::text, count(*) FROM jobs GROUP BY 1 ORDER BY 1").fetch_all(&pool).await?;
    if states != [("succeeded".to_string(), jobs)] {
        violations.push(format!("job states {states:?}, expected {jobs} succeeded"));
    }
    let (attempts, not_once, not_succeeded): (i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(n), 0)::bigint, count(*) FILTER (WHERE n <> 1), coalesce(sum(bad), 0)::bigint \
         FROM (SELECT job_id, count(*) AS n, count(*) FILTER (WHERE outcome IS DISTINCT FROM 'succeeded') AS bad \
               FROM job_attempts GROUP BY job_id) t",
    )
    .fetch_one(&pool)
    .await?;
    if attempts != jobs || not_once != 0 || not_succeeded != 0 {
        violations.push(format!(
            "{attempts} attempts for {jobs} jobs: {not_once} jobs not leased exactly once, {not_succeeded} attempts not succeeded"
        ));
    }
    let adapters: i64 = sqlx::query_scalar("SELECT count(*) FROM adapters").fetch_one(&pool).await?;
    if adapters != jobs {
        violations.push(format!("{adapters} adapters stored for {jobs} jobs"));
    }
    pool.close().await;
    let duplicates = fleet.duplicate_leases.load(Ordering::Relaxed);
    if duplicates != 0 {
        violations.push(format!("{duplicates} leases of a job that a worker had leased before"));
    }
    if calls.total_errors() != 0 {
        let first = fleet.first_errors.lock().unwrap().join("; ");
        violations.push(format!("{} calls failed, the first: {first}", calls.total_errors()));
    }
    Ok(violations)
}

/// The measures compared across runs: a name, a value, and its decimals.
fn measures(settings: &Settings, r: &mut Report) -> Vec<(String, Option<f64>, usize)> {
    let jobs = settings.jobs as f64;
    let mut rows = vec![
        ("submissions/s".to_string(), Some(jobs / r.submit_seconds), 0),
        (format!("registering {} workers, {REGISTRATIONS_IN_FLIGHT} at a time (s)", settings.workers), Some(r.register_seconds), 2),
        ("PostgreSQL CPU while they register (s)".to_string(), Some(r.register_pg_cpu), 2),
        ("work phase (s)".to_string(), Some(r.work_seconds), 1),
        (format!("cycles/s (jobs leased, {} step(s) reported, completed)", settings.steps), Some(jobs / r.work_seconds), 0),
    ];
    for rpc in Rpc::ALL {
        if r.calls.count(rpc) == 0 {
            continue;
        }
        for (label, q) in [("p50", 0.50), ("p95", 0.95), ("p99", 0.99)] {
            rows.push((format!("{} {label} (ms)", rpc.name()), r.calls.quantile_ms(rpc, q), 1));
        }
    }
    let cpu: f64 = r.coordinator_cpu.iter().sum();
    let peak = r.coordinator_peak.iter().copied().max().unwrap_or(0);
    rows.extend([
        ("LeaseJob calls per job".to_string(), Some(r.calls.count(Rpc::LeaseJob) as f64 / jobs), 2),
        (
            "progress calls per job".to_string(),
            Some((r.calls.count(Rpc::ReportProgress) + r.calls.count(Rpc::ReportProgressBatch)) as f64 / jobs),
            2,
        ),
        (
            format!("LeaseJob answered empty with >= {} jobs queued (%)", settings.workers),
            Some(100.0 * r.empty_while_queued as f64 / r.calls.count(Rpc::LeaseJob).max(1) as f64),
            0,
        ),
        ("PostgreSQL CPU per job (ms)".to_string(), Some(r.pg_cpu * 1000.0 / jobs), 2),
        ("coordinators' CPU per job, all (ms)".to_string(), Some(cpu * 1000.0 / jobs), 2),
        ("generator CPU per job (ms)".to_string(), Some(r.generator_cpu * 1000.0 / jobs), 2),
        ("rows written per job".to_string(), Some(r.rows.total as f64 / jobs), 1),
        ("largest coordinator peak RSS (MB)".to_string(), Some(peak as f64 / 1e6), 0),
    ]);
    rows
}

fn print_run(settings: &Settings, r: &mut Report, cores: usize) {
    println!("### {}, {} workers, {} jobs\n", label(r), settings.workers, settings.jobs);
    println!("| measure | value |");
    println!("|---|---:|");
    for (name, value, decimals) in measures(settings, r) {
        println!("| {name} | {} |", show(value, decimals));
    }
    let each = |v: &[f64]| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(" / ");
    let peaks: Vec<String> = r.coordinator_peak.iter().map(|p| format!("{:.0}", *p as f64 / 1e6)).collect();
    let used = r.pg_cpu + r.coordinator_cpu.iter().sum::<f64>() + r.generator_cpu;
    println!("| PostgreSQL CPU (s) | {:.1} |", r.pg_cpu);
    println!("| each coordinator's CPU (s) | {} |", each(&r.coordinator_cpu));
    println!("| each coordinator's peak RSS (MB) | {} |", peaks.join(" / "));
    println!("| generator CPU (s) | {:.1} |", r.generator_cpu);
    println!(
        "| CPU busy, all three (% of {cores} cores x work phase) | {:.0} |",
        100.0 * used / (cores as f64 * r.work_seconds)
    );
    println!("| machine load average (1 min) at the phase's end | {:.1} |", r.load_average);
    println!();
    println!("| RPC | calls | errors | p50 (ms) | p95 (ms) | p99 (ms) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for rpc in Rpc::ALL {
        if r.calls.count(rpc) == 0 {
            continue;
        }
        let q = |c: &mut Calls, at| show(c.quantile_ms(rpc, at), 1);
        let (p50, p95, p99) = (q(&mut r.calls, 0.50), q(&mut r.calls, 0.95), q(&mut r.calls, 0.99));
        println!("| {} | {} | {} | {p50} | {p95} | {p99} |", rpc.name(), r.calls.count(rpc), r.calls.errors(rpc));
    }
    let jobs = settings.jobs as f64;
    let tables: Vec<String> = r.rows.tables.iter().map(|(t, rows)| format!("{t} {:.2}", *rows as f64 / jobs)).collect();
    println!("\nRows written per job by table: {}.", tables.join(", "));
    println!(
        "LeaseJob calls answered with no job: {}, {} of them while at least {} jobs were queued. Heartbeat answers naming a lease to stop (one completed while its heartbeat was on the way): {}.",
        r.empty_leases, r.empty_while_queued, settings.workers, r.stop_directives
    );
    if r.pg_vanished > 0 {
        println!(
            "{} PostgreSQL backend(s) ended during the phase; their CPU counts up to the last 250 ms sample.",
            r.pg_vanished
        );
    }
    match r.violations.as_slice() {
        [] => println!(
            "Checked: {0} jobs succeeded, each with one attempt (leased once, completed once), no failed call.\n",
            settings.jobs
        ),
        v => println!("FAILED: {}\n", v.join("; ")),
    }
}

/// What a run was: its coordinators, how it reported progress, its pace.
fn label(r: &Report) -> String {
    let n = r.coordinators;
    let paced = if r.rate > 0 { format!(", paced at {} jobs/s", r.rate) } else { String::new() };
    let progress = if r.batch { "batched" } else { "single" };
    let next = if r.next_with_completion { "next lease with the completion" } else { "next lease by LeaseJob" };
    format!("{n} coordinator{}, progress {progress}, {next}{paced}", if n == 1 { "" } else { "s" })
}

fn print_side_by_side(settings: &Settings, reports: &mut [Report]) {
    let columns: Vec<String> = reports.iter().map(label).collect();
    let tables: Vec<Vec<(String, Option<f64>, usize)>> = reports.iter_mut().map(|r| measures(settings, r)).collect();
    println!("### Side by side, ratios against {}\n", columns[0]);
    let ratios: Vec<String> = (2..=columns.len()).map(|i| format!("{i} / 1")).collect();
    let header: Vec<String> = columns.iter().enumerate().map(|(i, c)| format!("{}: {c}", i + 1)).collect();
    println!("| measure | {} | {} |", header.join(" | "), ratios.join(" | "));
    println!("|---|{}", "---:|".repeat(columns.len() * 2 - 1));
    // Measures by name: a run without calls of an RPC has no rows for it.
    let names: Vec<(String, usize)> = tables.iter().flatten().fold(Vec::new(), |mut names, (name, _, decimals)| {
        if !names.iter().any(|(n, _)| n == name) {
            names.push((name.clone(), *decimals));
        }
        names
    });
    let value = |t: &[(String, Option<f64>, usize)], name: &str| t.iter().find(|m| m.0 == name).and_then(|m| m.1);
    for (name, decimals) in names {
        let base = value(&tables[0], &name);
        let values: Vec<String> = tables.iter().map(|t| show(value(t, &name), decimals)).collect();
        let ratios: Vec<String> = tables[1..]
            .iter()
            .map(|t| match (value(t, &name), base) {
                (Some(v), Some(b)) if b > 0.0 => format!("{:.2}x", v / b),
                _ => "-".into(),
            })
            .collect();
        println!("| {name} | {} | {} |", values.join(" | "), ratios.join(" | "));
    }
    println!();
}

fn show(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}
