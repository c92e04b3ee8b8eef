//! What workers and users see of the lease lifecycle: training a job to
//! success, concurrent leasing, fencing, lost leases, failures, cancellation
//! of running jobs, watching, and coordinator restarts.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{metric, sha256, state};
use futures::StreamExt;
use ptune_proto::v1::{self, job_event::Event};
use tonic::Code;

const SHORT_LEASE: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_leased_job_reports_progress_completes_and_its_adapter_downloads_intact() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("train-me").await;
    let job = env.submit(spec.clone()).await;
    let worker = env.register().await;

    let lease = env.lease(&worker).await.expect("the queued job is leased");
    assert_eq!((lease.job_id.as_str(), lease.epoch, lease.attempt), (job.id.as_str(), 1, 1));
    assert_eq!(lease.spec.as_ref().unwrap().name, "train-me");
    let running = env.get(&job.id).await;
    assert_eq!((state(&running), running.worker_id.as_str()), (v1::JobState::Running, worker.as_str()));
    assert!(!running.started_at.is_empty());
    assert!(env.lease(&worker).await.is_none(), "one job, one lease");

    let step5 = vec![metric(5, "train", "loss", 0.7), metric(5, "train", "learning_rate", 0.03)];
    assert!(!env.report(&lease, 5, step5.clone()).await.unwrap(), "no stop for a healthy job");
    assert!(!env.report(&lease, 5, step5).await.unwrap(), "a repeated report is harmless");
    assert!(!env.report(&lease, 8, vec![metric(8, "train", "loss", 0.4)]).await.unwrap());
    let progressed = env.get(&job.id).await;
    assert_eq!((progressed.step, progressed.total_steps), (8, 10));
    let latest_loss = progressed.latest_metrics.iter().find(|m| m.name == "loss").unwrap();
    assert_eq!((latest_loss.step, latest_loss.value), (8, 0.4));

    let adapter: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let premature = env.jobs.download_adapter(v1::DownloadAdapterRequest { job_id: job.id.clone() }).await.unwrap_err();
    assert_eq!(premature.code(), Code::FailedPrecondition);
    env.complete(&lease, &adapter).await.unwrap();
    env.complete(&lease, &adapter).await.expect("a retried completion of the same lease succeeds");

    let done = env.get(&job.id).await;
    assert_eq!(state(&done), v1::JobState::Succeeded);
    assert_eq!((done.adapter_sha256.clone(), done.adapter_size_bytes), (sha256(&adapter), adapter.len() as u64));
    assert!(!done.finished_at.is_empty());
    assert!(done.worker_id.is_empty(), "no lease is open any more");

    let metrics = env
        .jobs
        .get_metrics(v1::GetMetricsRequest { job_id: job.id.clone(), kind: String::new() })
        .await
        .unwrap()
        .into_inner()
        .metrics;
    let keys: Vec<(u64, &str, &str)> = metrics.iter().map(|m| (m.step, m.kind.as_str(), m.name.as_str())).collect();
    assert_eq!(
        keys,
        [(5, "train", "learning_rate"), (5, "train", "loss"), (8, "train", "loss"), (10, "eval", "accuracy")]
    );
    let eval = env
        .jobs
        .get_metrics(v1::GetMetricsRequest { job_id: job.id.clone(), kind: "eval".into() })
        .await
        .unwrap()
        .into_inner()
        .metrics;
    assert_eq!(eval, [metric(10, "eval", "accuracy", 0.9)]);

    let mut chunks =
        env.jobs.download_adapter(v1::DownloadAdapterRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
    let first = chunks.message().await.unwrap().unwrap();
    assert_eq!((first.sha256.as_str(), first.total_size), (sha256(&adapter).as_str(), adapter.len() as u64));
    let mut bytes = first.data;
    let mut count = 1;
    while let Some(chunk) = chunks.message().await.unwrap() {
        assert!(chunk.sha256.is_empty(), "only the first chunk carries the hash");
        bytes.extend(chunk.data);
        count += 1;
    }
    assert_eq!(sha256(&bytes), sha256(&adapter));
    assert!(count > 1, "300 kB arrive in several chunks");

    let wrong = b"not the announced bytes";
    let second = env.submit(spec).await;
    let lease2 = env.lease(&worker).await.unwrap();
    assert_eq!(lease2.job_id, second.id);
    let mut header = v1::CompleteJobHeader {
        job_id: lease2.job_id.clone(),
        epoch: lease2.epoch,
        adapter_sha256: sha256(&adapter),
        adapter_size: wrong.len() as u64,
        lease_token: lease2.lease_token.clone(),
        ..Default::default()
    };
    header.step = 1;
    let parts = vec![
        v1::CompleteJobChunk { part: Some(v1::complete_job_chunk::Part::Header(header)) },
        v1::CompleteJobChunk { part: Some(v1::complete_job_chunk::Part::Data(wrong.to_vec())) },
    ];
    let err = env.workers.complete_job(futures::stream::iter(parts)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("adapter_sha256: "), "{}", err.message());
    assert_eq!(state(&env.get(&second.id).await), v1::JobState::Running, "a corrupt upload changes nothing");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lease_calls_never_hand_out_the_same_job() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("many").await;
    let mut submitted = HashSet::new();
    for _ in 0..6 {
        submitted.insert(env.submit(spec.clone()).await.id);
    }
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(env.register().await);
    }
    // Rounds of 12 concurrent calls until every job is out: a call may come
    // back empty while a less busy worker that asked at the same moment is
    // preferred (see the spread window), but no job may go out twice.
    let mut leases: Vec<v1::Lease> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while leases.len() < submitted.len() && tokio::time::Instant::now() < deadline {
        let calls = (0..12).map(|i| {
            let mut client = env.workers.clone();
            let worker_id = workers[i % 3].clone();
            tokio::spawn(async move {
                let request = v1::LeaseJobRequest { worker_id, free_slots: 1, ..Default::default() };
                client.lease_job(request).await.unwrap().into_inner().lease
            })
        });
        leases.extend(futures::future::join_all(calls).await.into_iter().filter_map(|r| r.unwrap()));
    }
    let leased: HashSet<String> = leases.iter().map(|l| l.job_id.clone()).collect();
    assert_eq!(leases.len(), leased.len(), "no job is leased twice: {:?}", leases.iter().map(|l| &l.job_id).collect::<Vec<_>>());
    assert_eq!(leased, submitted);
    env.stop().await;
}

#[tokio::test]
async fn a_stale_lease_is_fenced_off_after_the_job_was_leased_again() {
    let mut env = common::start(SHORT_LEASE).await;
    let spec = env.spec("fenced").await;
    let job = env.submit(spec).await;
    let slow = env.register().await;
    let fast = env.register().await;

    let old = env.lease(&slow).await.unwrap();
    env.wait_for(&job.id, 10, |j| state(j) == v1::JobState::Queued).await;
    let new = env.lease(&fast).await.unwrap();
    assert_eq!((new.job_id.as_str(), new.epoch, new.attempt), (old.job_id.as_str(), 2, 2));

    let err = env.report(&old, 3, vec![metric(3, "train", "loss", 1.0)]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("is no longer valid"), "{}", err.message());
    let err = env.complete(&old, b"late adapter").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = env.fail(&old, "late failure", false, true).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let beat = env.heartbeat(&slow, &[&old]).await;
    assert_eq!(beat.stop, [v1::LeaseRef { job_id: old.job_id.clone(), epoch: 1, ..Default::default() }], "the stale worker is told to stop");

    assert!(!env.report(&new, 3, vec![metric(3, "train", "loss", 0.5)]).await.unwrap());
    let current = env.get(&job.id).await;
    assert_eq!((state(&current), current.worker_id.as_str(), current.step), (v1::JobState::Running, fast.as_str(), 3));
    env.stop().await;
}

#[tokio::test]
async fn lost_leases_requeue_the_job_as_interruptions_and_fail_it_after_max_interruptions_with_the_reason() {
    let mut env = common::start_with(SHORT_LEASE, |c| c.retry.max_interruptions = 1).await;
    let mut spec = env.spec("flaky-worker").await;
    spec.max_attempts = 1;
    let job = env.submit(spec).await;
    let worker = env.register().await;

    env.lease(&worker).await.unwrap();
    let requeued = env.wait_for(&job.id, 10, |j| state(j) == v1::JobState::Queued).await;
    let reason = format!("lease expired: worker {worker} stopped heartbeating");
    assert_eq!((requeued.attempts, requeued.error.as_str()), (1, reason.as_str()));
    assert_eq!((requeued.failures, requeued.interruptions), (0, 1), "a lost worker is not an error of the job");
    assert!(requeued.retry_at.is_empty(), "an interrupted job may be leased again at once");

    env.lease(&worker).await.expect("leased again at once, although max_attempts is 1");
    let failed = env.wait_for(&job.id, 10, |j| state(j) == v1::JobState::Failed).await;
    assert_eq!(failed.error, format!("interrupted 2 times (workers lost, drained or failing); last: {reason}"));
    assert!(!failed.finished_at.is_empty());
    assert!(env.lease(&worker).await.is_none(), "a failed job is not leased again");

    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let attempts: Vec<(i32, Option<String>, String)> =
        sqlx::query_as("SELECT attempt, outcome, reason FROM job_attempts WHERE job_id = $1::uuid ORDER BY attempt")
            .bind(&job.id)
            .fetch_all(&pool)
            .await
            .unwrap();
    let lost = Some("lease_expired".to_string());
    assert_eq!(attempts, [(1, lost.clone(), reason.clone()), (2, lost, reason)], "why each lease ended stays recorded");
    pool.close().await;
    env.stop().await;
}

#[tokio::test]
async fn a_renewed_lease_survives_and_worker_errors_retry_or_fail() {
    let mut env = common::start_with(SHORT_LEASE, |c| c.retry.backoff_base = Duration::from_millis(300)).await;
    let spec = env.spec("errors").await;
    let job = env.submit(spec).await;
    let worker = env.register().await;

    let first = env.lease(&worker).await.unwrap();
    for _ in 0..12 {
        let beat = env.heartbeat(&worker, &[&first]).await;
        assert!(beat.known && beat.stop.is_empty(), "{beat:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(state(&env.get(&job.id).await), v1::JobState::Running, "heartbeats keep the lease for 3 lease timeouts");

    env.fail(&first, "torch: a transient error", false, true).await.unwrap();
    env.fail(&first, "torch: a transient error", false, true).await.expect("a retried FailJob is harmless");
    let retried = env.get(&job.id).await;
    assert_eq!(
        (state(&retried), retried.error.as_str(), retried.attempts, retried.failures),
        (v1::JobState::Queued, "torch: a transient error", 1, 1)
    );
    assert!(!retried.retry_at.is_empty(), "the retry backs off");
    assert!(retried.waiting_reason.starts_with("backing off"), "{}", retried.waiting_reason);
    assert!(env.lease(&worker).await.is_none(), "not leased during its backoff");

    let second = loop {
        if let Some(lease) = env.lease(&worker).await {
            break lease;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    env.fail(&second, "line 7 of train.jsonl is not valid json", false, false).await.unwrap();
    let failed = env.get(&job.id).await;
    assert_eq!(
        (state(&failed), failed.error.as_str()),
        (v1::JobState::Failed, "line 7 of train.jsonl is not valid json")
    );

    let stranger = env
        .workers
        .heartbeat(v1::HeartbeatRequest { worker_id: uuid::Uuid::new_v4().to_string(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(!stranger.known, "an unknown worker is asked to register again");
    env.stop().await;
}

#[tokio::test]
async fn a_running_job_is_cancelled_through_its_worker() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("cancel-me").await;
    let job = env.submit(spec).await;
    let worker = env.register().await;
    let lease = env.lease(&worker).await.unwrap();

    let requested = env.jobs.cancel_job(v1::CancelJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
    assert_eq!((state(&requested), requested.cancel_requested), (v1::JobState::Running, true));
    let beat = env.heartbeat(&worker, &[&lease]).await;
    assert_eq!(beat.stop, [v1::LeaseRef { job_id: job.id.clone(), epoch: lease.epoch, ..Default::default() }]);
    assert!(env.report(&lease, 2, vec![]).await.unwrap(), "progress reports say stop too");

    env.fail(&lease, "cancelled", true, false).await.unwrap();
    let cancelled = env.get(&job.id).await;
    assert_eq!((state(&cancelled), cancelled.cancel_requested), (v1::JobState::Cancelled, false));
    assert!(env.lease(&worker).await.is_none());
    env.stop().await;
}

/// A heartbeat that arrives while the group commit of its worker's
/// completion and next lease holds the lease's attempt and the worker's row
/// answers at once, and keeps the lease without renewing it; once that
/// transaction has ended the attempt, the next heartbeat says stop.
#[tokio::test]
async fn a_heartbeat_does_not_wait_for_its_workers_completion_and_next_lease() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("completing").await;
    let job = env.submit(spec).await;
    let worker = env.register().await;
    let lease = env.lease(&worker).await.unwrap();
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let expires = "SELECT lease_expires_at::text FROM job_attempts WHERE job_id = $1::uuid";
    let before: String = sqlx::query_scalar(expires).bind(&job.id).fetch_one(&pool).await.unwrap();

    let mut completing = pool.begin().await.unwrap();
    // The completion and the worker's next lease, as one cycle turn writes them.
    sqlx::query(
        "WITH j AS (UPDATE jobs SET state = 'succeeded', finished_at = now() WHERE id = $1::uuid), \
              a AS (UPDATE job_attempts SET ended_at = now(), outcome = 'succeeded' WHERE job_id = $1::uuid) \
         UPDATE workers SET free_slots = greatest(free_slots - 1, 0) WHERE id = $2::uuid",
    )
    .bind(&job.id)
    .bind(&worker)
    .execute(&mut *completing)
    .await
    .unwrap();
    let beat = tokio::time::timeout(Duration::from_secs(3), env.heartbeat(&worker, &[&lease]))
        .await
        .expect("the heartbeat answers while the attempt and the worker are locked");
    assert!(beat.known && beat.stop.is_empty(), "kept, as last committed: {beat:?}");
    let after: String = sqlx::query_scalar(expires).bind(&job.id).fetch_one(&pool).await.unwrap();
    assert_eq!(after, before, "a locked attempt is not renewed");

    completing.commit().await.unwrap();
    let beat = env.heartbeat(&worker, &[&lease]).await;
    assert_eq!(beat.stop, [v1::LeaseRef { job_id: job.id.clone(), epoch: lease.epoch, ..Default::default() }]);
    pool.close().await;
    env.stop().await;
}

#[tokio::test]
async fn watching_a_job_shows_its_snapshot_progress_metrics_and_end() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("watched").await;
    let job = env.submit(spec).await;
    let mut events = env.jobs.watch_job(v1::WatchJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();

    let Some(Ok(v1::JobEvent { event: Some(Event::Job(snapshot)) })) = next(&mut events).await else {
        panic!("snapshot first")
    };
    assert_eq!((snapshot.id.as_str(), state(&snapshot)), (job.id.as_str(), v1::JobState::Queued));

    let worker = env.register().await;
    let lease = env.lease(&worker).await.unwrap();
    let Some(Ok(v1::JobEvent { event: Some(Event::Job(running)) })) = next(&mut events).await else {
        panic!("state change")
    };
    assert_eq!(state(&running), v1::JobState::Running);

    env.report(&lease, 4, vec![metric(4, "train", "loss", 0.6)]).await.unwrap();
    let Some(Ok(v1::JobEvent { event: Some(Event::Progress(progress)) })) = next(&mut events).await else {
        panic!("progress")
    };
    assert_eq!((progress.step, progress.total_steps), (4, 10));
    let Some(Ok(v1::JobEvent { event: Some(Event::Metrics(batch)) })) = next(&mut events).await else {
        panic!("metrics")
    };
    assert_eq!(batch.metrics, [metric(4, "train", "loss", 0.6)]);

    env.complete(&lease, b"adapter").await.unwrap();
    let mut last = None;
    while let Some(event) = next(&mut events).await {
        if let Event::Job(j) = event.unwrap().event.unwrap() {
            last = Some(j);
        }
    }
    let last = last.expect("a final snapshot");
    assert_eq!(state(&last), v1::JobState::Succeeded, "the stream ends after the terminal state");
    env.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_jobs_and_the_leases_of_workers_that_keep_heartbeating() {
    let mut env = common::start(SHORT_LEASE).await;
    let spec = env.spec("survivor").await;
    let running = env.submit(spec.clone()).await;
    let queued = env.submit(v1::JobSpec { base_model: "not-served".into(), ..spec }).await;
    let worker = env.register().await;
    let lease = env.lease(&worker).await.unwrap();
    env.report(&lease, 2, vec![metric(2, "train", "loss", 0.9)]).await.unwrap();

    env.restart().await;
    for _ in 0..12 {
        let beat = env.heartbeat(&worker, &[&lease]).await;
        assert!(beat.known && beat.stop.is_empty(), "{beat:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = env.get(&running.id).await;
    assert_eq!((state(&after), after.step, after.attempts), (v1::JobState::Running, 2, 1));
    assert_eq!(state(&env.get(&queued.id).await), v1::JobState::Queued);
    env.complete(&lease, b"adapter after restart").await.expect("the lease is still valid");
    assert_eq!(state(&env.get(&running.id).await), v1::JobState::Succeeded);
    env.stop().await;
}

async fn next(events: &mut tonic::Streaming<v1::JobEvent>) -> Option<Result<v1::JobEvent, tonic::Status>> {
    tokio::time::timeout(Duration::from_secs(10), events.next()).await.expect("an event within 10 s")
}
