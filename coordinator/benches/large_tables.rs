//! The job list, the overview and `/metrics` over a large database: fills a
//! separate database (`ptune_bench_large`, dropped afterwards) with JOBS jobs
//! and METRICS metric rows in SQL, starts a coordinator on it, and times
//! over gRPC and HTTP the first page of `ListJobs`, a deep page through a
//! keyset cursor (half way down), the same two on the dashboard's job table,
//! the overview and `/metrics`; and, as the baseline, the queries these
//! replaced (the job table's OFFSET page with its count, and the counts per
//! state by `count(*)`), in the same run on the same data. Prints a Markdown
//! table for docs/benchmarks.md.
//!
//!   cargo bench -p ptune-coordinator --bench large_tables [-- JOBS METRICS ROUNDS]
//!
//! Needs the PostgreSQL server of the tests (`$PTUNE_TEST_DATABASE_URL`).

use std::net::SocketAddr;
use std::time::Instant;

use ptune_coordinator::auth::Role;
use ptune_coordinator::cursor::{JobCursor, SortKey};
use ptune_coordinator::model::JobFilter;
use ptune_coordinator::store::{admin, JobSort, JobTableQuery, Store};
use ptune_coordinator::testing::{channel, DEFAULT_TEST_SERVER_URL};
use ptune_coordinator::{Config, Coordinator};
use ptune_core::{JobId, JobSpec};
use ptune_proto::v1;
use ptune_proto::v1::job_service_client::JobServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

mod common;
use common::time;

const DATABASE: &str = "ptune_bench_large";
/// Jobs per statement while filling.
const FILL_CHUNK: i64 = 100_000;

/// The job table's page as it was read before keyset cursors: the row
/// `OFFSET $2` places down, newest first, with the latest loss of each row.
const OLD_OFFSET_PAGE: &str =
    "SELECT j.id, j.name, j.state::text AS state, j.method, j.base_model, j.owner, j.sweep_id, \
            s.name AS sweep_name, j.trial_index, j.step, j.total_steps, j.attempts, j.max_attempts, \
            j.early_stopped, j.error, j.created_at, j.started_at, j.finished_at, \
            (SELECT a.worker_id FROM job_attempts a WHERE a.job_id = j.id AND a.ended_at IS NULL) AS worker_id, \
            (SELECT m.value FROM metrics m WHERE m.job_id = j.id AND m.kind = 'train' AND m.name = 'loss' \
             ORDER BY m.step DESC LIMIT 1) AS loss \
     FROM jobs j LEFT JOIN sweeps s ON s.id = j.sweep_id \
     ORDER BY j.created_at DESC, j.id DESC LIMIT $1 OFFSET $2";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let jobs: i64 = args.first().map_or(Ok(1_000_000), |a| a.parse())?;
    let metrics: i64 = args.get(1).map_or(Ok(50_000_000), |a| a.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(50), |a| a.parse())?;
    anyhow::ensure!(jobs >= 1000, "JOBS must be at least 1000, got {jobs}");

    let server = std::env::var("PTUNE_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_SERVER_URL.to_string());
    let url = format!("{}/{DATABASE}", server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base));
    admin::drop_database(&server, DATABASE).await?;
    admin::create_database(&server, DATABASE).await?;
    let result = run(&url, jobs, metrics, rounds).await;
    admin::drop_database(&server, DATABASE).await?;
    result
}

async fn run(url: &str, jobs: i64, metrics: i64, rounds: usize) -> anyhow::Result<()> {
    let store = Store::connect(url).await?;
    store.migrate().await?;
    let pool = sqlx::PgPool::connect(url).await?;
    let started = Instant::now();
    fill(&pool, jobs, metrics).await?;
    let filled = started.elapsed();
    let size: String =
        sqlx::query_scalar("SELECT pg_size_pretty(pg_database_size(current_database()))").fetch_one(&pool).await?;

    let coordinator = Coordinator::start(Config::new(url)).await?;
    let (_, viewer_token) = store.create_token("bench-viewer", Role::Viewer, None, "bench").await?;
    let (_, admin_token) = store.create_token("bench-admin", Role::Admin, None, "bench").await?;
    let grpc = JobServiceClient::new(channel(&format!("http://{}", coordinator.grpc_addr), &admin_token));

    // The row half way down the newest-first order: where the deep pages start.
    let depth = jobs / 2;
    let (created_at, id): (chrono::DateTime<chrono::Utc>, Uuid) =
        sqlx::query_as("SELECT created_at, id FROM jobs ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1")
            .bind(depth)
            .fetch_one(&pool)
            .await?;
    let cursor = JobCursor { key: SortKey::Created, created_at, id: JobId(id) };
    let grpc_token = cursor.encode(&JobFilter::default().listing());
    let table = JobTableQuery {
        states: Vec::new(),
        method: None,
        base_model: None,
        owner: None,
        sweep_id: None,
        name_prefix: None,
        sort: JobSort::Created,
        descending: true,
        limit: 50,
        after: None,
    };
    let table_token = cursor.encode(&table.listing());

    let http = coordinator.http_addr;
    let mut rows = Vec::new();
    let list = |page_token: String| v1::ListJobsRequest { page_size: 50, page_token, ..Default::default() };
    for (name, token) in [
        ("ListJobs, first page (gRPC)".to_string(), String::new()),
        (format!("ListJobs, page at depth {depth} by cursor (gRPC)"), grpc_token),
    ] {
        let stats = time(rounds, || {
            let (mut client, token) = (grpc.clone(), token.clone());
            async move { client.list_jobs(list(token)).await.map(|_| ()).map_err(anyhow::Error::from) }
        })
        .await?;
        rows.push((name, stats));
    }
    for (name, path) in [
        ("dashboard job table, first page".to_string(), "/api/jobs?limit=50".to_string()),
        (
            format!("dashboard job table, page at depth {depth} by cursor"),
            format!("/api/jobs?limit=50&after={table_token}"),
        ),
        ("dashboard overview".to_string(), "/api/overview".to_string()),
        ("/metrics".to_string(), "/metrics".to_string()),
    ] {
        let token = viewer_token.clone();
        let stats = time(rounds, || {
            let (path, token) = (path.clone(), token.clone());
            async move { get(http, &path, &token).await }
        })
        .await?;
        rows.push((name, stats));
    }

    // The baseline: the reads these replaced, straight on the database.
    let baseline_rounds = rounds.clamp(1, 5);
    let pool_ref = &pool;
    rows.push((format!("before: job table page at OFFSET {depth} and its count(*) (SQL only)"), {
        time(baseline_rounds, || async move {
            sqlx::query(OLD_OFFSET_PAGE).bind(50_i64).bind(depth).fetch_all(pool_ref).await?;
            sqlx::query("SELECT count(*) FROM jobs j").fetch_one(pool_ref).await?;
            Ok(())
        })
        .await?
    }));
    rows.push(("before: counts per state by count(*) (SQL only)".to_string(), {
        time(baseline_rounds, || async move {
            sqlx::query("SELECT state, count(*) FROM jobs GROUP BY state").fetch_all(pool_ref).await?;
            Ok(())
        })
        .await?
    }));

    println!(
        "{jobs} jobs and {metrics} metric rows filled in {:.0} s ({size} on disk); {rounds} rounds per call \
         ({baseline_rounds} for the baseline)\n",
        filled.as_secs_f64()
    );
    println!("| read | p50 ms | p95 ms | max ms |");
    println!("|---|---:|---:|---:|");
    for (name, s) in &rows {
        println!("| {name} | {:.1} | {:.1} | {:.1} |", s.p50, s.p95, s.max);
    }
    coordinator.shutdown().await?;
    store.close().await;
    pool.close().await;
    Ok(())
}

/// Fills the jobs (the newest 200 queued, 100 running, the rest finished:
/// 90% succeeded, 7% failed, 3% cancelled, one a second back from now) and
/// the metric rows (training loss, an equal number of steps per job).
async fn fill(pool: &sqlx::PgPool, jobs: i64, metrics: i64) -> anyhow::Result<()> {
    let spec = JobSpec::from_toml(include_str!("../../examples/jobs/sst2-prompt-tuning.toml"))
        .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
    let spec = serde_json::to_string(&spec)?;
    let mut from = 1;
    while from <= jobs {
        let to = (from + FILL_CHUNK - 1).min(jobs);
        sqlx::query(
            "INSERT INTO jobs (id, name, owner, base_model, method, spec, state, max_attempts, step, total_steps, \
                               created_at, updated_at, started_at, finished_at) \
             SELECT gen_random_uuid(), 'bench-' || i, (ARRAY['alice', 'bob', 'carol', 'dave', 'erin'])[i % 5 + 1], \
                    (ARRAY['all-MiniLM-L6-v2', 'tiny-bert', 'gpt2-small'])[i % 3 + 1], \
                    (ARRAY['prompt_tuning', 'prefix_tuning', 'lora'])[i % 3 + 1], $3::jsonb, \
                    (CASE WHEN i > $4 - 200 THEN 'queued' WHEN i > $4 - 300 THEN 'running' \
                          WHEN i % 100 < 7 THEN 'failed' WHEN i % 100 < 10 THEN 'cancelled' \
                          ELSE 'succeeded' END)::job_state, \
                    3, 100, 100, t, t, t, CASE WHEN i <= $4 - 300 THEN t + interval '10 minutes' END \
             FROM generate_series($1::bigint, $2::bigint) i, \
                  LATERAL (SELECT now() - ($4 - i) * interval '1 second' AS t) c",
        )
        .bind(from)
        .bind(to)
        .bind(&spec)
        .bind(jobs)
        .execute(pool)
        .await?;
        eprintln!("jobs: {to} of {jobs}");
        from = to + 1;
    }
    // Metric rows load without the primary key and the foreign key check,
    // then the key is built once: far faster than row by row.
    let per_job = (metrics / jobs).max(1);
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql(
        "SET maintenance_work_mem = '512MB'; SET session_replication_role = replica; \
         ALTER TABLE metrics DROP CONSTRAINT metrics_pkey",
    )
    .execute(&mut *conn)
    .await?;
    let mut from = 1;
    while from <= jobs {
        let to = (from + FILL_CHUNK - 1).min(jobs);
        sqlx::query(
            "INSERT INTO metrics (job_id, step, kind, name, value, recorded_at) \
             SELECT j.id, s, 'train', 'loss', 1.0 / s, j.created_at FROM \
                 (SELECT id, created_at FROM jobs \
                  WHERE name IN (SELECT 'bench-' || i FROM generate_series($1::bigint, $2::bigint) i)) j, \
                 generate_series(1, $3::bigint) s",
        )
        .bind(from)
        .bind(to)
        .bind(per_job)
        .execute(&mut *conn)
        .await?;
        eprintln!("metrics: {} of {}", to * per_job, jobs * per_job);
        from = to + 1;
    }
    eprintln!("building the metrics primary key");
    // One statement each: VACUUM cannot run inside the implicit transaction of several.
    for statement in [
        "ALTER TABLE metrics ADD PRIMARY KEY (job_id, kind, name, step)",
        "SET session_replication_role = origin",
        "VACUUM ANALYZE jobs",
        "VACUUM ANALYZE metrics",
    ] {
        sqlx::raw_sql(statement).execute(&mut *conn).await?;
    }
    Ok(())
}

/// A GET with a bearer token over a fresh connection; an error unless 200.
async fn get(addr: SocketAddr, path: &str, token: &str) -> anyhow::Result<()> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let head = String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned();
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{path} answered {head}");
    Ok(())
}
