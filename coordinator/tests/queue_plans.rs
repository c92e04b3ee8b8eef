//! How PostgreSQL reads the head of the queue for a lease, after a large
//! submission has been leased and finished in part: with the table's
//! statistics taken while every job was queued (as autovacuum takes them
//! after a large submission), a lease must still read the queue's own
//! index and pass over none of the jobs leased or finished since, whether
//! PostgreSQL plans the statement for its parameters or once for all
//! (after a few calls on a connection it may keep a generic plan). So must
//! the look a waiting lease call takes at whether anything is queued, once
//! nothing is.

use ptune_coordinator::store::{Store, QUEUE_HEADS_SQL, QUEUE_OUTLOOK_SQL};
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

#[tokio::test]
async fn a_lease_reads_only_queued_jobs_however_stale_the_statistics() {
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
    .bind(JOBS)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE jobs").execute(&mut conn).await.unwrap();
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
