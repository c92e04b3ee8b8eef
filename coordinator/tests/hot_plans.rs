//! How PostgreSQL runs the statements of every lease and heartbeat, with
//! the table's statistics taken while every job was queued (as autovacuum
//! takes them after a large submission), whether it plans a statement for
//! its parameters or once for all (after a few calls on a connection it
//! may keep a generic plan). Once much of a large submission has been
//! leased and finished, a lease still reads the queue's own index and
//! passes over none of the jobs leased or finished since; so does the look
//! a waiting lease call takes at whether anything is queued, once nothing
//! is; and a worker's heartbeat reads its own leases only, however many
//! jobs the fleet runs.

use ptune_coordinator::store::{Store, QUEUE_HEADS_SQL, QUEUE_OUTLOOK_SQL, RENEW_LEASES_SQL};
use ptune_coordinator::testing::fresh_database;
use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

const MODEL: &str = "tiny-bert";
const JOBS: i64 = 20_000;
const LEASED: i64 = 10_000;
const FINISHED: i64 = 8_000;
/// Jobs a lease reads from the head of each model's queue.
const PAGE: i64 = 130;

/// The plan nodes of `plan` and all below it.
fn nodes(plan: &Value) -> Vec<&Value> {
    let mut all = vec![plan];
    for child in plan["Plans"].as_array().into_iter().flatten() {
        all.extend(nodes(child));
    }
    all
}

/// The plans, generic then custom, with which PostgreSQL runs `statement`
/// (whose parameters have `types`), prepared as `name`, for the parameters
/// `args`, each with its plan mode.
async fn plans(
    conn: &mut PgConnection,
    name: &str,
    statement: &str,
    types: &str,
    args: &str,
) -> Vec<(&'static str, Value)> {
    sqlx::query(AssertSqlSafe(format!("PREPARE {name} ({types}) AS {statement}"))).execute(&mut *conn).await.unwrap();
    let mut plans = Vec::new();
    for mode in ["force_generic_plan", "force_custom_plan"] {
        sqlx::query(AssertSqlSafe(format!("SET plan_cache_mode = {mode}"))).execute(&mut *conn).await.unwrap();
        let explained: Value =
            sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name} ({args})")))
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        plans.push((mode, explained[0]["Plan"].clone()));
    }
    sqlx::query("SET plan_cache_mode = auto").execute(&mut *conn).await.unwrap();
    plans
}

/// Rows of jobs a plan node read and passed over (not queued).
fn passed_over(read: &Value) -> f64 {
    read["Rows Removed by Filter"].as_f64().unwrap_or(0.0)
}

/// A fresh migrated database with `jobs` queued jobs on [`MODEL`], its
/// statistics taken while they are all queued, and a connection to it.
async fn queued(jobs: i64) -> (ptune_coordinator::testing::TestDatabase, PgConnection) {
    let db = fresh_database().await.unwrap();
    Store::connect(&db.url).await.unwrap().migrate().await.unwrap();
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    // The coordinator's own sessions announce their events; so does this one (no notifications).
    sqlx::query("SET ptune.announces = 'on'").execute(&mut conn).await.unwrap();
    sqlx::query(
        "INSERT INTO jobs (id, name, base_model, method, spec, max_attempts, created_at) \
         SELECT gen_random_uuid(), 'job-' || g, $1, 'prompt_tuning', '{}', 3, \
                now() - interval '1 hour' + g * interval '1 millisecond' \
         FROM generate_series(1, $2) g",
    )
    .bind(MODEL)
    .bind(jobs)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE jobs").execute(&mut conn).await.unwrap();
    (db, conn)
}

#[tokio::test]
async fn a_lease_reads_only_queued_jobs_however_stale_the_statistics() {
    let (_db, mut conn) = queued(JOBS).await;
    // What happens to a large submission next: its jobs get their memory
    // estimates, and the oldest are leased and many of those finish.
    sqlx::query("UPDATE jobs SET memory_weights_bytes = 1, memory_job_bytes = 1, memory_activation_bytes = 1")
        .execute(&mut conn)
        .await
        .unwrap();
    for (state, n) in [("running", LEASED), ("succeeded", FINISHED)] {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET state = '{state}' WHERE id IN (SELECT id FROM jobs ORDER BY created_at LIMIT $1)"
        )))
        .bind(n)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let oldest_queued: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at, id LIMIT $1")
            .bind(PAGE)
            .fetch_all(&mut conn)
            .await
            .unwrap();

    let args = format!("'{{{MODEL}}}', 30000, '{{}}', {PAGE}");
    for (mode, plan) in plans(&mut conn, "head", QUEUE_HEADS_SQL, "text[], bigint, uuid[], bigint", &args).await {
        let reads: Vec<&Value> = nodes(&plan).into_iter().filter(|n| n["Relation Name"] == "jobs").collect();
        assert_eq!(reads.len(), 1, "{mode}: one read of jobs: {plan:#}");
        let read = reads[0];
        assert_eq!(read["Index Name"], "jobs_queue_idx", "{mode}: the queue's own index: {plan:#}");
        let passed = passed_over(read);
        assert!(passed < 100.0, "{mode}: passed over {passed} jobs that are not queued: {plan:#}");
        assert_eq!(read["Actual Rows"].as_f64(), Some(PAGE as f64), "{mode}: a page of the queue: {plan:#}");
    }
    let head: Vec<uuid::Uuid> = sqlx::query_scalar(AssertSqlSafe(format!("SELECT id FROM ({QUEUE_HEADS_SQL}) h")))
        .bind(vec![MODEL.to_string()])
        .bind(30_000i64)
        .bind(Vec::<uuid::Uuid>::new())
        .bind(PAGE)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(head, oldest_queued, "the oldest queued jobs, oldest first");

    // Every job leased: a waiting lease call asks whether anything is queued.
    sqlx::query("UPDATE jobs SET state = 'running' WHERE state = 'queued'").execute(&mut conn).await.unwrap();
    let args = format!("'{{{MODEL}}}', 30000");
    for (mode, plan) in plans(&mut conn, "outlook", QUEUE_OUTLOOK_SQL, "text[], bigint", &args).await {
        for read in nodes(&plan).into_iter().filter(|n| n["Relation Name"] == "jobs") {
            assert_ne!(read["Node Type"], "Seq Scan", "{mode}: the outlook reads indexes only: {plan:#}");
            let passed = passed_over(read);
            assert!(passed < 100.0, "{mode}: passed over {passed} jobs that are not queued: {plan:#}");
        }
    }
    let (queued, changes_in): (bool, Option<f64>) = sqlx::query_as(QUEUE_OUTLOOK_SQL)
        .bind(vec![MODEL.to_string()])
        .bind(30_000i64)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(!queued && changes_in.is_none(), "nothing queued, nothing to wait for: {queued} {changes_in:?}");
}

#[tokio::test]
async fn a_heartbeat_reads_only_its_own_leases_however_stale_the_statistics() {
    const WORKERS: i64 = 500;
    const EACH: i64 = 20;
    let (_db, mut conn) = queued(WORKERS * EACH).await;
    // Every job leased, `EACH` to each worker.
    sqlx::query(
        "INSERT INTO workers (id, hostname, slots) \
         SELECT ('00000000-0000-0000-0000-' || lpad(w::text, 12, '0'))::uuid, 'w' || w, $1 \
         FROM generate_series(0, $2 - 1) w",
    )
    .bind(EACH as i32)
    .bind(WORKERS)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "WITH leased AS (UPDATE jobs SET state = 'running', lease_epoch = 1 RETURNING id), \
              numbered AS (SELECT id, row_number() OVER (ORDER BY id) % $1 AS w FROM leased) \
         INSERT INTO job_attempts (job_id, attempt, epoch, worker_id, lease_token_hash, lease_expires_at) \
         SELECT id, 1, 1, ('00000000-0000-0000-0000-' || lpad(w::text, 12, '0'))::uuid, \
                sha256(id::text::bytea), now() + interval '1 minute' \
         FROM numbered",
    )
    .bind(WORKERS)
    .execute(&mut conn)
    .await
    .unwrap();
    let worker = "00000000-0000-0000-0000-000000000000";
    let leases: Vec<(String, String)> = sqlx::query_as(
        "SELECT job_id::text, encode(lease_token_hash, 'hex') FROM job_attempts WHERE worker_id = $1::uuid",
    )
    .bind(worker)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(leases.len() as i64, EACH);
    let ids: Vec<&str> = leases.iter().map(|(id, _)| id.as_str()).collect();
    let hashes: Vec<String> = leases.iter().map(|(_, hash)| format!("decode('{hash}', 'hex')")).collect();
    let args = format!(
        "'{{{}}}', '{{{}}}', '{worker}', 60000, ARRAY[{}]",
        ids.join(","),
        vec!["1"; ids.len()].join(","),
        hashes.join(", ")
    );
    for (mode, plan) in
        plans(&mut conn, "renew", RENEW_LEASES_SQL, "uuid[], bigint[], uuid, bigint, bytea[]", &args).await
    {
        assert_eq!(plan["Actual Rows"].as_f64(), Some(EACH as f64), "{mode}: every lease renewed: {plan:#}");
        for read in nodes(&plan).into_iter().filter(|n| n["Relation Name"] == "jobs") {
            let rows = (read["Actual Rows"].as_f64().unwrap_or(0.0) + passed_over(read))
                * read["Actual Loops"].as_f64().unwrap_or(1.0);
            assert!(
                rows <= EACH as f64,
                "{mode}: a heartbeat of {EACH} leases read {rows} jobs of the {} running: {plan:#}",
                WORKERS * EACH
            );
        }
    }
}
