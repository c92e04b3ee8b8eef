//! A lease call that finds nothing its worker can take asks when the queue
//! next changes by time alone (`Store::queue_outlook`). Fills a separate
//! database (`ptune_bench_outlook`, dropped afterwards) with QUEUED queued
//! jobs and times that question, and as the baseline the statement it
//! replaced (an aggregate over every queued job of the models), in the same
//! run on the same data: first on a freshly vacuumed queue, then after half
//! of it was leased (their index entries stay until the next vacuum, as
//! after a burst of leases). Prints a Markdown table for docs/benchmarks.md.
//!
//!   cargo bench -p ptune-coordinator --bench queue_outlook [-- QUEUED ROUNDS]
//!
//! Needs the PostgreSQL server of the tests (`$PTUNE_TEST_DATABASE_URL`).

use ptune_coordinator::store::{admin, Store};
use ptune_coordinator::testing::DEFAULT_TEST_SERVER_URL;
use ptune_core::JobSpec;

mod common;
use common::time;

const DATABASE: &str = "ptune_bench_outlook";
const MODEL: &str = "tiny-bert";

/// The statement `queue_outlook` ran before: every queued job of the models.
const OLD_OUTLOOK: &str = "SELECT bool_or(true), extract(epoch FROM min(least( \
         CASE WHEN retry_at > now() THEN retry_at END, \
         CASE WHEN updated_at > now() - $2 * interval '1 millisecond' \
              THEN updated_at + $2 * interval '1 millisecond' END)) - now())::float8 \
     FROM jobs WHERE state = 'queued' AND base_model = ANY($1)";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let queued: i64 = args.first().map_or(Ok(100_000), |a| a.parse())?;
    let rounds: usize = args.get(1).map_or(Ok(50), |a| a.parse())?;
    anyhow::ensure!(queued >= 2, "QUEUED must be at least 2, got {queued}");
    anyhow::ensure!(rounds >= 1, "ROUNDS must be at least 1, got {rounds}");

    let server = std::env::var("PTUNE_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_SERVER_URL.to_string());
    let url = format!("{}/{DATABASE}", server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base));
    admin::drop_database(&server, DATABASE).await?;
    admin::create_database(&server, DATABASE).await?;
    let result = run(&url, queued, rounds).await;
    admin::drop_database(&server, DATABASE).await?;
    result
}

async fn run(url: &str, queued: i64, rounds: usize) -> anyhow::Result<()> {
    let store = Store::connect(url).await?;
    store.migrate().await?;
    let pool = sqlx::PgPool::connect(url).await?;
    let spec = JobSpec::from_toml(include_str!("../../examples/jobs/sst2-prompt-tuning.toml"))
        .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
    // Queued an hour ago, one a millisecond apart: settled, none waiting out a retry.
    sqlx::query(
        "INSERT INTO jobs (id, name, owner, base_model, method, spec, state, max_attempts, total_steps, \
                           created_at, updated_at) \
         SELECT gen_random_uuid(), 'queued-' || i, 'bench', $2, 'prompt_tuning', $3::jsonb, 'queued', 3, 100, t, t \
         FROM generate_series(1, $1::bigint) i, LATERAL (SELECT now() - interval '1 hour' + i * interval '1 ms' AS t) c",
    )
    .bind(queued)
    .bind(MODEL)
    .bind(serde_json::to_string(&spec)?)
    .execute(&pool)
    .await?;
    sqlx::raw_sql("VACUUM ANALYZE jobs").execute(&pool).await?;

    let models = vec![MODEL.to_string()];
    let window_ms = i64::try_from(ptune_coordinator::placement::SPREAD_WINDOW.as_millis())?;
    let mut rows = Vec::new();
    for moment in ["vacuumed", "half leased since the last vacuum"] {
        if moment != "vacuumed" {
            sqlx::query(
                "UPDATE jobs SET state = 'running', updated_at = now() \
                 WHERE id IN (SELECT id FROM jobs ORDER BY created_at LIMIT $1)",
            )
            .bind(queued / 2)
            .execute(&pool)
            .await?;
        }
        let now = time(rounds, || async { Ok(store.queue_outlook(&models).await.map(|_| ())?) }).await?;
        let before = time(rounds, || async {
            sqlx::query(OLD_OUTLOOK).bind(&models).bind(window_ms).execute(&pool).await?;
            Ok(())
        })
        .await?;
        rows.push((moment, before, now));
    }

    println!("\n### When the queue next changes: {queued} jobs queued, {rounds} rounds each\n");
    println!("| queue | before p50 (ms) | before p95 (ms) | now p50 (ms) | now p95 (ms) | p50 ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (moment, before, now) in rows {
        println!(
            "| {moment} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}x |",
            before.p50,
            before.p95,
            now.p50,
            now.p95,
            before.p50 / now.p50
        );
    }
    Ok(())
}
