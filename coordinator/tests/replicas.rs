//! Several coordinators on one database: a job watched on coordinator A
//! shows every step, metric and state change that a worker reports through
//! coordinator B, carried by PostgreSQL notifications (migration 0011,
//! `relay.rs`), over real gRPC; one of them leads (an advisory lock), and
//! leadership moves when the leader goes; a starting coordinator extends
//! leases only when none served the workers lately.

mod common;

use std::time::{Duration, Instant};

use common::{metric, state};
use futures::StreamExt;
use ptune_coordinator::Coordinator;
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
         AND objid = ($1 & x'ffffffff'::bigint)::oid AND classid = ($1 >> 32)::oid",
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
