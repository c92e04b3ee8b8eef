//! Several coordinators on one database: a job watched on coordinator A
//! shows every step, metric and state change that a worker reports through
//! coordinator B, carried by PostgreSQL notifications (migration 0011,
//! `relay.rs`), over real gRPC; one of them leads (an advisory lock), and
//! leadership moves when the leader goes; a starting coordinator extends
//! leases only when none served the workers lately. A coordinator announces
//! its job events itself after they commit, once each, and a resync when it
//! starts (`announce.rs`); other writers' changes still notify from the
//! triggers (migration 0019).

mod common;

use std::time::{Duration, Instant};

use common::{metric, state};
use futures::StreamExt;
use ptune_coordinator::Coordinator;
use serde_json::Value;
use sqlx::postgres::PgListener;
use ptune_proto::v1::{self, job_event::Event};

async fn next(events: &mut tonic::Streaming<v1::JobEvent>) -> Option<v1::JobEvent> {
    let event = tokio::time::timeout(Duration::from_secs(10), events.next()).await.expect("an event within 10 s");
    event.map(|e| e.expect("a stream without errors"))
}

#[tokio::test]
async fn a_watch_on_one_coordinator_sees_every_step_reported_through_another() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let b = Coordinator::start(env.config.clone()).await.expect("a second coordinator on the same database");
    let (_, workers_b, _) = common::clients(&b, &env.tokens);
    // The worker talks to B only; the watch stays on A.
    env.workers = workers_b;

    let spec = env.spec("replicated").await;
    let job = env.submit(spec).await;
    let mut events = env.jobs.watch_job(v1::WatchJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
    let Some(v1::JobEvent { event: Some(Event::Job(snapshot)) }) = next(&mut events).await else {
        panic!("a snapshot first")
    };
    assert_eq!(state(&snapshot), v1::JobState::Queued);

    let worker = env.register().await;
    let lease = env.lease(&worker).await.expect("B leases the job");
    let mut reported = Vec::new();
    for step in 1..=5 {
        env.report(&lease, step, vec![metric(step, "train", "loss", 1.0 / step as f64)]).await.unwrap();
        reported.push(Instant::now());
    }
    env.complete(&lease, b"adapter").await.unwrap();

    let (mut steps, mut metric_steps, mut states, mut delays) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    while let Some(event) = next(&mut events).await {
        match event.event.expect("an event") {
            Event::Job(job) => states.push(state(&job)),
            Event::Progress(p) => {
                assert_eq!(p.total_steps, 10);
                delays.push(reported[p.step as usize - 1].elapsed());
                steps.push(p.step);
            }
            Event::Metrics(batch) => metric_steps.extend(batch.metrics.iter().map(|m| m.step)),
        }
    }
    assert_eq!(steps, [1, 2, 3, 4, 5], "every step reported through B, in order");
    assert!(metric_steps.starts_with(&[1, 2, 3, 4, 5]), "every step's metrics: {metric_steps:?}");
    assert!(states.contains(&v1::JobState::Running), "the lease taken on B: {states:?}");
    assert_eq!(states.last(), Some(&v1::JobState::Succeeded), "the completion on B ends the stream");
    println!("progress seen on A, after the report to B returned: {delays:?}");
    b.shutdown().await.unwrap();
    env.stop().await;
}

/// The `ptune_events` notifications that arrive until none has for `quiet`.
async fn heard(listener: &mut PgListener, quiet: Duration) -> Vec<Value> {
    let mut payloads = Vec::new();
    while let Ok(notification) = tokio::time::timeout(quiet, listener.recv()).await {
        payloads.push(serde_json::from_str(notification.expect("a notification").payload()).expect("JSON"));
    }
    payloads
}

#[tokio::test]
async fn a_coordinator_announces_each_event_of_its_own_once_after_commit_and_a_resync_when_it_starts() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let mut listener = PgListener::connect(&env.db.url).await.unwrap();
    listener.listen("ptune_events").await.unwrap();
    let b = Coordinator::start(env.config.clone()).await.expect("a second coordinator on the same database");
    let started = heard(&mut listener, Duration::from_secs(2)).await;
    assert!(
        started.iter().any(|p| p["k"] == "resync"),
        "a starting coordinator tells the others to re-read what they watch: {started:?}"
    );

    let (_, workers_b, _) = common::clients(&b, &env.tokens);
    env.workers = workers_b;
    let spec = env.spec("announced").await;
    let job = env.submit(spec).await;
    let worker = env.register().await;
    let lease = env.lease(&worker).await.expect("B leases the job");
    for step in 1..=3 {
        env.report(&lease, step, vec![metric(step, "train", "loss", 1.0 / step as f64)]).await.unwrap();
    }
    env.complete(&lease, b"adapter").await.unwrap();

    let of_job: Vec<Value> = heard(&mut listener, Duration::from_secs(2))
        .await
        .into_iter()
        .filter(|p| p["j"] == job.id.as_str())
        .collect();
    let count = |kind: &str| of_job.iter().filter(|p| p["k"] == kind).count();
    // With the triggers also sending from the writing transactions, each would come twice.
    assert_eq!(count("progress"), 3, "one progress event per report: {of_job:?}");
    assert_eq!(count("metrics"), 4, "one metrics event per report, one for the completion's: {of_job:?}");
    assert_eq!(count("changed"), 2, "leased and succeeded, once each: {of_job:?}");
    let steps: Vec<&Value> = of_job.iter().filter(|p| p["k"] == "progress").map(|p| &p["s"]).collect();
    assert_eq!(steps, [1, 2, 3], "in the order reported");
    let metrics: Vec<&Value> = of_job.iter().filter(|p| p["k"] == "metrics").map(|p| &p["m"][0]).collect();
    let losses: Vec<&Value> = metrics.iter().filter(|m| m[2] == "loss").map(|m| &m[3]).collect();
    assert_eq!(losses, [1.0, 0.5, 1.0 / 3.0], "the metrics themselves, in the order reported");
    b.shutdown().await.unwrap();
    env.stop().await;
}

#[tokio::test]
async fn a_writer_that_does_not_announce_still_notifies_from_the_triggers() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let spec = env.spec("written by hand").await;
    let job = env.submit(spec).await;
    let mut listener = PgListener::connect(&env.db.url).await.unwrap();
    listener.listen("ptune_events").await.unwrap();
    let mut events = env.jobs.watch_job(v1::WatchJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
    assert!(matches!(next(&mut events).await, Some(v1::JobEvent { event: Some(Event::Job(_)) })), "a snapshot first");

    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    sqlx::query("UPDATE jobs SET state = 'cancelled', error = 'cancelled by hand', finished_at = now() WHERE id = $1::uuid")
        .bind(&job.id)
        .execute(&pool)
        .await
        .unwrap();
    let notified = heard(&mut listener, Duration::from_secs(2)).await;
    assert!(
        notified.iter().any(|p| p["j"] == job.id.as_str() && p["k"] == "changed"),
        "the trigger sent the change: {notified:?}"
    );
    let Some(v1::JobEvent { event: Some(Event::Job(seen)) }) = next(&mut events).await else {
        panic!("the watch re-reads the job")
    };
    assert_eq!(state(&seen), v1::JobState::Cancelled, "the watcher sees the change made outside any coordinator");
    pool.close().await;
    env.stop().await;
}

/// Polls `done` every 100 ms for at most `secs` seconds.
async fn eventually(secs: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}

fn leader_gauge(metrics: &str) -> &str {
    metrics.lines().find(|l| l.starts_with("ptune_coordinator_leader ")).map_or("missing", |l| &l[25..])
}

/// One coordinator leads (the advisory lock, `ptune_coordinator_leader`);
/// when its database session is cut, one leads again, and when the leader
/// stops, the other takes over.
#[tokio::test]
async fn exactly_one_coordinator_leads_and_leadership_moves_when_the_leader_goes() {
    let env = common::start(Duration::from_secs(30)).await;
    let a = env.coordinator.as_ref().unwrap();
    let b = Coordinator::start(env.config.clone()).await.expect("a second coordinator");
    assert!(eventually(10, || a.is_leader() || b.is_leader()).await, "someone leads");
    assert!(!(a.is_leader() && b.is_leader()), "never both");
    let gauges = [
        leader_gauge(&common::http_get(a.http_addr, "/metrics", Some(&env.tokens.viewer)).await).to_string(),
        leader_gauge(&common::http_get(b.http_addr, "/metrics", Some(&env.tokens.viewer)).await).to_string(),
    ];
    let expected = if a.is_leader() { ["1", "0"] } else { ["0", "1"] };
    assert_eq!(gauges, expected.map(String::from));

    // Cut the leader's session, as a network partition or a killed backend would.
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND objid = ($1 & x'ffffffff'::bigint)::oid AND classid = ($1 >> 32)::oid \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(ptune_coordinator::leader::LOCK_KEY)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(cut, [true], "one session held the lock");
    assert!(eventually(10, || a.is_leader() != b.is_leader()).await, "one leads again");

    // The leader stops; the other takes over.
    let (leader, follower) = if a.is_leader() {
        let Some(a) = env.coordinator else { unreachable!() };
        (a, b)
    } else {
        (b, env.coordinator.unwrap())
    };
    leader.shutdown().await.unwrap();
    assert!(eventually(10, || follower.is_leader()).await, "the follower takes over");
    follower.shutdown().await.unwrap();
}

/// A coordinator that starts while another serves the workers leaves their
/// leases alone (a rolling restart does not keep dead workers' jobs
/// leased); one that starts when no worker was served lately gives every
/// open lease a full period, so live workers can reconnect.
#[tokio::test]
async fn a_starting_coordinator_extends_leases_only_when_no_coordinator_served_the_workers() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let spec = env.spec("leased").await;
    env.submit(spec).await;
    let worker = env.register().await;
    let lease = env.lease(&worker).await.expect("a lease");
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let expiry = || async {
        sqlx::query_scalar::<_, f64>("SELECT extract(epoch FROM lease_expires_at)::float8 FROM job_attempts WHERE ended_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // Shorten the lease to 20 s from now: a start that extends sets 30 s.
    sqlx::query("UPDATE job_attempts SET lease_expires_at = now() + interval '20 seconds'").execute(&pool).await.unwrap();
    let before = expiry().await;

    let b = Coordinator::start(env.config.clone()).await.expect("a second coordinator while the first serves");
    assert_eq!(expiry().await, before, "the worker was served a moment ago: no extension");
    b.shutdown().await.unwrap();

    sqlx::query("UPDATE workers SET last_heartbeat = now() - interval '1 hour', polled_at = now() - interval '1 hour'")
        .execute(&pool)
        .await
        .unwrap();
    let c = Coordinator::start(env.config.clone()).await.expect("a coordinator after nobody served");
    assert!(expiry().await >= before + 9.0, "a full lease period from now");
    c.shutdown().await.unwrap();
    env.heartbeat(&worker, &[&lease]).await;
    env.stop().await;
}
