//! Several coordinators on one database: a job watched on coordinator A
//! shows every step, metric and state change that a worker reports through
//! coordinator B, carried by PostgreSQL notifications (migration 0011,
//! `relay.rs`), over real gRPC.

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
