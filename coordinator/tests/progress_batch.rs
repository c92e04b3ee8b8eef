//! Batched progress and heartbeats over real gRPC: one `ReportProgressBatch`
//! call carries several steps of several jobs, records every metric once and
//! in order (a batch sent again after a lost answer adds nothing), answers
//! each lease on its own (a cancelled job is told to stop, a lost lease is
//! refused, the others are recorded), and its events reach watchers on
//! another coordinator through the database; one heartbeat renews every
//! lease a worker holds.

mod common;

use std::time::Duration;

use common::{metric, state};
use futures::StreamExt;
use ptune_coordinator::Coordinator;
use ptune_proto::v1::{self, job_event::Event};
use tonic::Code;

fn report(lease: &v1::Lease, step: u64) -> v1::ReportProgressRequest {
    v1::ReportProgressRequest {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        step,
        total_steps: 10,
        metrics: vec![metric(step, "train", "loss", 1.0 / step as f64)],
        lease_token: lease.lease_token.clone(),
    }
}

/// The steps of a job's recorded train losses, in the order the store reads them.
async fn loss_steps(env: &mut common::Env, job: &str) -> Vec<u64> {
    let request = v1::GetMetricsRequest { job_id: job.to_string(), kind: "train".into() };
    env.jobs.get_metrics(request).await.unwrap().into_inner().metrics.iter().map(|m| m.step).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_records_several_steps_of_several_jobs_once_and_answers_each_lease_on_its_own() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let b = Coordinator::start(env.config.clone()).await.expect("a second coordinator on the same database");
    let (mut jobs_b, _, _) = common::clients(&b, &env.tokens);
    let spec = env.spec("packed").await;
    let worker = env.register().await;
    let mut leases = Vec::new();
    for name in ["a", "b", "cancelled", "lost"] {
        let job = env.submit(v1::JobSpec { name: name.into(), ..spec.clone() }).await;
        let lease = env.lease(&worker).await.expect("a lease");
        assert_eq!(lease.job_id, job.id);
        leases.push(lease);
    }
    let [a, b_lease, cancelled, lost] = &leases[..] else { unreachable!() };
    env.jobs.cancel_job(v1::CancelJobRequest { job_id: cancelled.job_id.clone() }).await.unwrap();
    env.fail(lost, "injected error", false, false).await.unwrap();
    let mut watched = jobs_b.watch_job(v1::WatchJobRequest { job_id: b_lease.job_id.clone() }).await.unwrap().into_inner();
    let Some(Ok(v1::JobEvent { event: Some(Event::Job(_)) })) = next(&mut watched).await else { panic!("snapshot first") };

    // Steps of a pack, interleaved as the pass reported them.
    let batch = v1::ReportProgressBatchRequest {
        reports: vec![
            report(a, 1),
            report(b_lease, 1),
            report(cancelled, 1),
            report(lost, 1),
            report(a, 2),
            report(b_lease, 2),
            report(a, 3),
        ],
    };
    let first = env.workers.report_progress_batch(batch.clone()).await.unwrap().into_inner().answers;
    let answers: Vec<(&str, Option<v1::StopReason>, Code)> = first
        .iter()
        .map(|r| (r.job_id.as_str(), r.recorded.map(|s| s.stop_reason()), Code::from(r.error_code)))
        .collect();
    assert_eq!(
        answers,
        [
            (a.job_id.as_str(), Some(v1::StopReason::Unspecified), Code::Ok),
            (b_lease.job_id.as_str(), Some(v1::StopReason::Unspecified), Code::Ok),
            (cancelled.job_id.as_str(), Some(v1::StopReason::Cancelled), Code::Ok),
            (lost.job_id.as_str(), None, Code::FailedPrecondition),
        ],
        "each lease gets its own answer: {first:?}"
    );
    assert!(first[2].recorded.unwrap().stop, "a worker reading only `stop` stops the cancelled job too");

    let expected: [(&v1::Lease, &[u64]); 4] =
        [(a, &[1, 2, 3]), (b_lease, &[1, 2]), (cancelled, &[1]), (lost, &[])];
    for (lease, steps) in expected {
        assert_eq!(loss_steps(&mut env, &lease.job_id).await, steps, "metrics of job {}", lease.job_id);
    }
    let progressed = env.get(&a.job_id).await;
    assert_eq!((progressed.step, progressed.total_steps), (3, 10));
    assert_eq!(state(&env.get(&lost.job_id).await), v1::JobState::Failed, "a refused lease changes nothing");

    // The watcher on the other coordinator sees job b's progress and metrics.
    let mut seen_step = 0;
    let mut seen_metrics = Vec::new();
    while seen_step < 2 || seen_metrics.len() < 2 {
        match next(&mut watched).await {
            Some(Ok(v1::JobEvent { event: Some(Event::Progress(p)) })) => seen_step = seen_step.max(p.step),
            Some(Ok(v1::JobEvent { event: Some(Event::Metrics(m)) })) => seen_metrics.extend(m.metrics),
            Some(Ok(_)) => {}
            other => panic!("the watch ended: {other:?}"),
        }
    }
    assert_eq!(seen_metrics, [metric(1, "train", "loss", 1.0), metric(2, "train", "loss", 0.5)]);

    // The answer was lost and the worker sends the batch again: nothing is recorded twice.
    let again = env.workers.report_progress_batch(batch).await.unwrap().into_inner().answers;
    assert_eq!(again, first, "a replayed batch gets the same answers");
    for (lease, steps) in expected {
        assert_eq!(loss_steps(&mut env, &lease.job_id).await, steps, "metrics of job {} after a replay", lease.job_id);
    }
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_heartbeat_renews_every_lease_of_a_worker() {
    // Leases expire after 3 s unless renewed; reports are never sent.
    let mut env = common::start(Duration::from_secs(3)).await;
    let spec = env.spec("held").await;
    let worker = env.register().await;
    let mut leases = Vec::new();
    for name in ["one", "two", "three"] {
        env.submit(v1::JobSpec { name: name.into(), ..spec.clone() }).await;
        leases.push(env.lease(&worker).await.expect("a lease"));
    }
    let before = lease_expiries(&env.db.url, &leases).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refs: Vec<&v1::Lease> = leases.iter().collect();
    let answer = env.heartbeat(&worker, &refs).await;
    assert!(answer.stop.is_empty(), "every lease holds: {answer:?}");
    let after = lease_expiries(&env.db.url, &leases).await;
    for (lease, (was, is)) in leases.iter().zip(before.iter().zip(&after)) {
        assert!(is > was, "the lease of job {} was renewed: {was} -> {is}", lease.job_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_renews_its_lease_once_half_of_it_is_gone() {
    let timeout = Duration::from_secs(20);
    let mut env = common::start(timeout).await;
    let spec = env.spec("renewed").await;
    let worker = env.register().await;
    env.submit(spec).await;
    let lease = env.lease(&worker).await.expect("a lease");
    let leased = lease_expiries(&env.db.url, std::slice::from_ref(&lease)).await[0];

    // Most of the lease left: the report leaves it as it is (no rewrite of the attempt).
    env.report(&lease, 1, vec![metric(1, "train", "loss", 1.0)]).await.unwrap();
    assert_eq!(lease_expiries(&env.db.url, std::slice::from_ref(&lease)).await[0], leased);

    // Less than half left: the next report renews it for a whole period.
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    sqlx::query("UPDATE job_attempts SET lease_expires_at = now() + interval '8 seconds' WHERE ended_at IS NULL")
        .execute(&pool)
        .await
        .unwrap();
    let waning = lease_expiries(&env.db.url, std::slice::from_ref(&lease)).await[0];
    env.report(&lease, 2, vec![metric(2, "train", "loss", 0.5)]).await.unwrap();
    let renewed = lease_expiries(&env.db.url, std::slice::from_ref(&lease)).await[0];
    assert!(
        renewed >= waning + 11_000_000,
        "renewed to a whole period from now: {waning} -> {renewed} (microseconds)"
    );
    assert_eq!(loss_steps(&mut env, &lease.job_id).await, [1, 2], "both reports recorded");
}

/// When each lease expires, in microseconds since the epoch.
async fn lease_expiries(database_url: &str, leases: &[v1::Lease]) -> Vec<i64> {
    let pool = sqlx::PgPool::connect(database_url).await.unwrap();
    let mut expiries = Vec::new();
    for lease in leases {
        let at: i64 = sqlx::query_scalar(
            "SELECT (extract(epoch FROM lease_expires_at) * 1000000)::bigint FROM job_attempts \
             WHERE job_id = $1::uuid AND epoch = $2 AND ended_at IS NULL",
        )
        .bind(&lease.job_id)
        .bind(lease.epoch as i64)
        .fetch_one(&pool)
        .await
        .unwrap();
        expiries.push(at);
    }
    expiries
}

async fn next(events: &mut tonic::Streaming<v1::JobEvent>) -> Option<Result<v1::JobEvent, tonic::Status>> {
    tokio::time::timeout(Duration::from_secs(10), events.next()).await.expect("an event within 10 s")
}
