//! Large tables as a user meets them: job listings paged by keyset cursors
//! (over gRPC and on the dashboard) while jobs keep arriving, counts per
//! state that stay exact without counting, and metrics retention that
//! thins and prunes old finished jobs while keeping what sweeps and
//! listings read.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::sweeps;
use ptune_coordinator::store::Store;
use ptune_coordinator::tables::{Applied, Retention};
use ptune_proto::v1;
use serde_json::{json, Value};
use tonic::Code;

/// Status and JSON body of a dashboard API call.
async fn api(env: &common::Env, path: &str) -> (u16, Value) {
    let addr = env.coordinator.as_ref().unwrap().http_addr;
    let response = common::http_get(addr, path, Some(&env.tokens.viewer)).await;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("an http status");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Submits `n` jobs named `{prefix}-{i}` owned by `owner`; their ids.
async fn submit_many(env: &mut common::Env, prefix: &str, owner: &str, n: usize) -> Vec<String> {
    let base = env.spec(prefix).await;
    let mut ids = Vec::new();
    for i in 0..n {
        let spec = v1::JobSpec { name: format!("{prefix}-{i}"), owner: owner.into(), ..base.clone() };
        ids.push(env.submit(spec).await.id);
    }
    ids
}

#[tokio::test]
async fn keyset_pages_return_every_job_once_while_jobs_arrive_and_keep_their_filters() {
    let mut env = common::start(Duration::from_secs(60)).await;
    let alice = submit_many(&mut env, "a", "alice", 14).await;
    let bob = submit_many(&mut env, "b", "bob", 9).await;

    // Page through everything, 4 at a time, submitting a job between pages.
    let (mut seen, mut arrived, mut token, mut pages) = (Vec::new(), Vec::new(), String::new(), 0);
    let base = env.spec("late").await;
    loop {
        let page = env
            .jobs
            .list_jobs(v1::ListJobsRequest { page_size: 4, page_token: token.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.jobs.len() <= 4);
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        pages += 1;
        let spec = v1::JobSpec { name: format!("late-{pages}"), ..base.clone() };
        arrived.push(env.submit(spec).await.id);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no job twice: {seen:?}");
    for id in alice.iter().chain(&bob) {
        assert!(unique.contains(id), "job {id} that existed before paging started was skipped");
    }
    assert!(arrived.iter().all(|id| !unique.contains(id)), "jobs submitted meanwhile land before the cursor");
    assert_eq!(pages, 6, "23 jobs in pages of 4");

    // A filtered walk holds its filter on every page.
    let (mut bobs, mut token, mut first_token) = (Vec::new(), String::new(), None);
    loop {
        let request =
            v1::ListJobsRequest { owner: "bob".into(), page_size: 2, page_token: token, ..Default::default() };
        let page = env.jobs.list_jobs(request).await.unwrap().into_inner();
        bobs.extend(page.jobs.iter().map(|j| (j.id.clone(), j.spec.as_ref().unwrap().owner.clone())));
        if page.next_page_token.is_empty() {
            break;
        }
        first_token.get_or_insert_with(|| page.next_page_token.clone());
        token = page.next_page_token;
    }
    let first_bob_token: String = first_token.expect("bob's jobs take several pages");
    assert!(bobs.iter().all(|(_, owner)| owner == "bob"), "{bobs:?}");
    let mut got: Vec<&String> = bobs.iter().map(|(id, _)| id).collect();
    let mut want: Vec<&String> = bob.iter().collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "every job of bob, once");

    // A token is bound to its listing and cannot be forged.
    let other = v1::ListJobsRequest { owner: "alice".into(), page_token: first_bob_token, ..Default::default() };
    let refused = env.jobs.list_jobs(other).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let message = refused.message();
    assert!(message.starts_with("page_token: belongs to a listing with other filters"), "{message}");
    for bad in ["x", "1700000000123456.0123456789abcdef0123456789abcdef"] {
        let request = v1::ListJobsRequest { page_token: bad.into(), ..Default::default() };
        let refused = env.jobs.list_jobs(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().starts_with("page_token: must be the next page token"), "{}", refused.message());
    }
    env.stop().await;
}

#[tokio::test]
async fn the_dashboard_job_table_pages_by_cursor_in_every_sort() {
    let mut env = common::start(Duration::from_secs(60)).await;
    let mut ids = submit_many(&mut env, "x", "alice", 5).await;
    ids.extend(submit_many(&mut env, "y", "bob", 6).await);
    let all: HashSet<String> = ids.iter().cloned().collect();

    let sorts = [("created", "desc"), ("created", "asc"), ("name", "asc"), ("owner", "desc"), ("state", "asc")];
    for (sort, order) in sorts {
        let (mut seen, mut names, mut after) = (Vec::new(), Vec::new(), None::<String>);
        loop {
            let cursor = after.as_deref().map(|a| format!("&after={a}")).unwrap_or_default();
            let (status, page) = api(&env, &format!("/api/jobs?sort={sort}&order={order}&limit=3{cursor}")).await;
            assert_eq!(status, 200, "{page}");
            assert_eq!(page["total"], 11);
            for job in page["jobs"].as_array().unwrap() {
                seen.push(job["id"].as_str().unwrap().to_string());
                names.push(job["name"].as_str().unwrap().to_string());
            }
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => break,
            }
        }
        assert_eq!(seen.len(), 11, "{sort} {order}: {names:?}");
        assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), all, "{sort} {order}");
        if sort == "name" {
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted, "ascending by name across pages");
        }
    }

    let (_, filtered) = api(&env, "/api/jobs?owner=bob&limit=4").await;
    assert_eq!((filtered["total"].clone(), filtered["total_at_least"].clone()), (json!(6), json!(false)));
    let after = filtered["next"].as_str().unwrap();
    let (status, refused) = api(&env, &format!("/api/jobs?owner=alice&limit=4&after={after}")).await;
    assert_eq!(status, 400);
    assert!(refused["error"].as_str().unwrap().starts_with("after: belongs to a listing"), "{refused}");
    let (status, refused) = api(&env, "/api/jobs?after=zz").await;
    assert_eq!(status, 400);
    assert!(refused["error"].as_str().unwrap().starts_with("after: must be the next page token"), "{refused}");
    let (status, refused) = api(&env, "/api/jobs?offset=3").await;
    assert_eq!(status, 400);
    assert!(refused["error"].as_str().unwrap().starts_with("offset: "), "{refused}");
    env.stop().await;
}

#[tokio::test]
async fn counts_per_state_stay_exact_through_changes_deletes_and_folds() {
    let mut env = common::start(Duration::from_secs(60)).await;
    let ids = submit_many(&mut env, "c", "alice", 5).await;
    env.jobs.cancel_job(v1::CancelJobRequest { job_id: ids[0].clone() }).await.unwrap();
    let store = Store::connect(&env.db.url).await.unwrap();
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let pool = &pool;
    sqlx::query("UPDATE jobs SET state = 'succeeded', finished_at = now() WHERE id = $1::uuid")
        .bind(&ids[1])
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM jobs WHERE id = $1::uuid").bind(&ids[2]).execute(pool).await.unwrap();

    let expected = json!({ "queued": 2, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 1 });
    let (_, overview) = api(&env, "/api/overview").await;
    assert_eq!(overview["jobs"], expected);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM job_state_counts").fetch_one(pool).await.unwrap();
    assert!(rows > 3, "changes are appended, not counted: {rows} rows");
    store.fold_job_counts().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM job_state_counts").fetch_one(pool).await.unwrap();
    assert_eq!(rows, 3, "one row per state with jobs after a fold");
    let (_, overview) = api(&env, "/api/overview").await;
    assert_eq!(overview["jobs"], expected, "a fold keeps the counts");
    let http = env.coordinator.as_ref().unwrap().http_addr;
    let metrics = common::http_get(http, "/metrics", Some(&env.tokens.viewer)).await;
    assert!(metrics.contains("ptune_jobs{state=\"queued\"} 2"), "{metrics}");
    store.close().await;
    env.stop().await;
}

/// Records `train/loss` and `train/lr` at steps 0..=99 and `eval/accuracy`
/// at steps 10, 20, ..., 100 (its value is the step / 1000).
async fn record_metrics(pool: &sqlx::PgPool, job: &str) {
    sqlx::query(
        "INSERT INTO metrics (job_id, step, kind, name, value) \
         SELECT $1::uuid, s, 'train', n, s::float8 FROM generate_series(0, 99) s, unnest(ARRAY['loss', 'lr']) n \
         UNION ALL SELECT $1::uuid, s, 'eval', 'accuracy', s / 1000.0 FROM generate_series(10, 100, 10) s",
    )
    .bind(job)
    .execute(pool)
    .await
    .unwrap();
}

/// Marks a job finished `days` ago (or running with `None`).
async fn finish(pool: &sqlx::PgPool, job: &str, days: Option<i32>) {
    let sql = match days {
        Some(_) => {
            "UPDATE jobs SET state = 'succeeded', finished_at = now() - $2 * interval '1 day' WHERE id = $1::uuid"
        }
        None => "UPDATE jobs SET state = 'running', started_at = now() - $2 * interval '1 day' WHERE id = $1::uuid",
    };
    sqlx::query(sql).bind(job).bind(f64::from(days.unwrap_or(40))).execute(pool).await.unwrap();
}

/// (kind, name, step) of a job's metrics, ordered.
async fn points(pool: &sqlx::PgPool, job: &str) -> Vec<(String, String, i64)> {
    sqlx::query_as("SELECT kind, name, step FROM metrics WHERE job_id = $1::uuid ORDER BY kind, name, step")
        .bind(job)
        .fetch_all(pool)
        .await
        .unwrap()
}

fn series(points: &[(String, String, i64)], kind: &str, name: &str) -> Vec<i64> {
    points.iter().filter(|(k, n, _)| k == kind && n == name).map(|(_, _, s)| *s).collect()
}

#[tokio::test]
async fn retention_thins_then_prunes_finished_jobs_and_keeps_final_and_sweep_metrics() {
    let mut env = common::start(Duration::from_secs(60)).await;
    let store = Store::connect(&env.db.url).await.unwrap();
    let data = sweeps::datasets(&mut env).await;
    let space = json!({ "training.learning_rate": { "values": [0.01] } });
    let definition = sweeps::definition("kept", &data, json!({ "type": "grid" }), space);
    let sweep = sweeps::create(&mut env, &definition).await.unwrap();
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let trial = loop {
        let row: Option<String> = sqlx::query_scalar("SELECT id::text FROM jobs WHERE sweep_id = $1::uuid")
            .bind(&sweep.id)
            .fetch_optional(&pool)
            .await
            .unwrap();
        match row {
            Some(id) => break id,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let ids = submit_many(&mut env, "r", "alice", 3).await;
    let (old, recent, running) = (&ids[0], &ids[1], &ids[2]);
    for job in [&trial, old, recent, running] {
        record_metrics(&pool, job).await;
    }
    finish(&pool, &trial, Some(40)).await;
    finish(&pool, old, Some(40)).await;
    finish(&pool, recent, Some(2)).await;
    finish(&pool, running, None).await;

    let retention = Retention::new(Some(30), Some(1), 10, 1).unwrap();
    let applied = retention.apply(&store, u32::MAX).await.unwrap();
    assert_eq!((applied.jobs_pruned, applied.jobs_downsampled), (2, 1), "{applied:?}");

    let all_eval: Vec<i64> = (1..=10).map(|i| i * 10).collect();
    let kept = points(&pool, old).await;
    assert_eq!(series(&kept, "train", "loss"), [99], "only the final training loss of an old job");
    assert_eq!(series(&kept, "train", "lr"), [99]);
    assert_eq!(series(&kept, "eval", "accuracy"), [100], "only the final evaluation of an old job");
    let kept = points(&pool, &trial).await;
    assert_eq!(series(&kept, "train", "loss"), [99]);
    assert_eq!(series(&kept, "eval", "accuracy"), all_eval, "every evaluation of a sweep trial");
    let kept = points(&pool, recent).await;
    let thinned: Vec<i64> = (0..10).map(|i| i * 10).chain([99]).collect();
    assert_eq!(series(&kept, "train", "loss"), thinned, "one point in 10 and the last");
    assert_eq!(series(&kept, "train", "lr"), thinned);
    assert_eq!(series(&kept, "eval", "accuracy"), all_eval, "thinning leaves evaluations whole");
    assert_eq!(points(&pool, running).await.len(), 210, "a running job keeps everything");

    // What users read still reads the same.
    let job = env.get(old).await;
    let loss = job.latest_metrics.iter().find(|m| m.kind == "train" && m.name == "loss").unwrap();
    assert_eq!((loss.step, loss.value), (99, 99.0));
    let report = sweeps::get_sweep(&mut env.sweeps, &sweep.id).await.unwrap();
    let best = &report.leaderboard[0];
    assert_eq!((best.objective, best.objective_step), (Some(0.1), 100), "{best:?}");

    assert_eq!(retention.apply(&store, u32::MAX).await.unwrap(), Applied::default(), "nothing is done twice");
    store.close().await;
    env.stop().await;
}
