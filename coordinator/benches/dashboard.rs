//! Dashboard timings over 10,000 jobs: inserts 10,000 jobs through the
//! store (200 of them leased to 20 workers, each with 20 reported steps of
//! metrics), starts a coordinator, and times the main page and the API
//! calls the pages make. Prints a Markdown table for docs/benchmarks.md.
//!
//!   cargo bench -p ptune-coordinator --bench dashboard [-- JOBS ROUNDS]
//!
//! Needs the PostgreSQL server of the tests (`$PTUNE_TEST_DATABASE_URL`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ptune_coordinator::auth::tokens::lease_token_hash;
use ptune_coordinator::auth::Role;
use ptune_coordinator::model::{AdvertisedModel, Device, LeaseRef, ProgressReport, WorkerOffer, WorkerRegistration};
use ptune_coordinator::store::Store;
use ptune_coordinator::testing::fresh_database;
use ptune_coordinator::{Config, Coordinator};
use ptune_core::{JobId, JobSpec, Metric, MetricKind, WorkerId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MODELS: [&str; 3] = ["all-MiniLM-L6-v2", "tiny-bert", "gpt2-small"];
const METHODS: [&str; 3] = ["prompt_tuning", "prefix_tuning", "lora"];
const OWNERS: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let jobs: usize = args.first().map_or(Ok(10_000), |a| a.parse())?;
    let rounds: usize = args.get(1).map_or(Ok(30), |a| a.parse())?;
    let db = fresh_database().await?;
    let config = Config::new(db.url.clone());
    let coordinator = Coordinator::start(config.clone()).await?;
    let store = Store::connect(&db.url).await?;

    let started = Instant::now();
    let template = JobSpec::from_toml(include_str!("../../examples/jobs/sst2-prompt-tuning.toml"))
        .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
    for i in 0..jobs {
        let mut spec = template.clone();
        spec.name = format!("bench-{i:05}");
        spec.owner = OWNERS[i % OWNERS.len()].to_string();
        spec.base_model = MODELS[i % MODELS.len()].to_string();
        spec.method = METHODS[i % METHODS.len()].parse().map_err(anyhow::Error::msg)?;
        store.insert_job(JobId::new(), &spec, 100, None).await?;
    }
    let inserted = started.elapsed();

    let (worker_token, _) = store.create_token("bench-workers", Role::Worker, None, "bench").await?;
    let started = Instant::now();
    let mut leases = Vec::new();
    for w in 0..20 {
        let worker = WorkerId::new();
        let registration = WorkerRegistration {
            worker_id: Some(worker),
            hostname: format!("gpu-{w:02}"),
            devices: vec![Device { name: "cuda:0".into(), memory_bytes: 80 << 30, free_memory_bytes: 0 }],
            slots: 16,
            models: MODELS.iter().map(|m| AdvertisedModel { name: m.to_string(), ..Default::default() }).collect(),
            memory_bytes: None,
        };
        store.upsert_worker(worker, &registration, worker_token.id).await?;
        let offer = WorkerOffer { models: MODELS.iter().map(|m| m.to_string()).collect(), ..Default::default() };
        for _ in 0..10 {
            if let Some(lease) = store.lease_next_job(worker, &offer, Duration::from_secs(600)).await? {
                leases.push(LeaseRef {
                    job_id: lease.job_id,
                    epoch: lease.epoch,
                    token_hash: lease_token_hash(&lease.lease_token),
                });
            }
        }
    }
    for lease in &leases {
        for step in 1..=20u64 {
            let metric = |name: &str, value: f64| Metric { step, kind: MetricKind::Train, name: name.into(), value };
            let report = ProgressReport {
                lease: *lease,
                step,
                total_steps: 100,
                metrics: vec![metric("loss", 1.0 / step as f64), metric("examples_per_second", 180.0)],
            };
            store.report_progress_batch(&[report], Duration::from_secs(600)).await?;
        }
    }
    let reported = started.elapsed();
    let some_job = leases.first().map(|l| l.job_id).expect("a leased job");

    let http = coordinator.http_addr;
    let calls: Vec<(&str, String)> = vec![
        ("main page", "/".into()),
        ("app script", "/assets/app.js".into()),
        ("overview", "/api/overview".into()),
        ("jobs, newest first (page 1)", "/api/jobs?limit=50".into()),
        ("jobs, by name", "/api/jobs?sort=name&order=asc&limit=50".into()),
        ("jobs, state = running, by age", "/api/jobs?state=running&limit=50".into()),
        ("jobs, owner = carol, by base model", "/api/jobs?owner=carol&sort=base_model&limit=50".into()),
        ("jobs, by state descending", "/api/jobs?sort=state&order=desc&limit=50".into()),
        ("job detail", format!("/api/jobs/{some_job}")),
        ("job curves", format!("/api/jobs/{some_job}/metrics")),
        ("workers", "/api/workers".into()),
        ("/metrics", "/metrics".into()),
    ];
    println!(
        "{jobs} jobs inserted in {:.1} s; {} leased and 20 steps reported each in {:.1} s; {rounds} rounds per call\n",
        inserted.as_secs_f64(),
        leases.len(),
        reported.as_secs_f64()
    );
    println!("| call | path | bytes | median ms | p95 ms | max ms |");
    println!("|---|---|---:|---:|---:|---:|");
    for (name, path) in &calls {
        // One warm-up call, then the timed rounds.
        let (status, _) = get(http, path).await?;
        anyhow::ensure!(status == 200, "{path} answered {status}");
        let mut times = Vec::with_capacity(rounds);
        let mut size = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            let (_, bytes) = get(http, path).await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            size = bytes;
        }
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        let shown = path.replace('|', "\\|").replace(&some_job.to_string(), "ID");
        println!("| {name} | `{shown}` | {size} | {:.1} | {:.1} | {:.1} |", at(0.5), at(0.95), at(1.0));
    }
    coordinator.shutdown().await?;
    store.close().await;
    Ok(())
}

/// The status and body size of a GET, over a fresh connection as a browser's first request.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, usize)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow::anyhow!("no http response"))?;
    let status = String::from_utf8_lossy(&raw[..split]).split(' ').nth(1).unwrap_or("0").parse()?;
    Ok((status, raw.len() - split - 4))
}
