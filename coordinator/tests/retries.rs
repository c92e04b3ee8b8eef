//! What happens after an attempt that did not succeed, over real gRPC on
//! Postgres: errors of the job back off and use up `max_attempts`;
//! interruptions (lost, drained or failing workers) are queued again at
//! once and do not; a checkpoint a worker uploads follows the job to its
//! next attempt; a worker's health is shown to operators.

mod common;

use std::time::{Duration, Instant};

use common::{sha256, state};
use ptune_proto::v1::{self, checkpoint_chunk::Part};
use tonic::Code;

const LEASE: Duration = Duration::from_secs(10);

/// Leases a job, polling through its backoff; returns the lease and when it came.
async fn lease_when_due(env: &mut common::Env, worker: &str, within: Duration) -> (v1::Lease, Instant) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(lease) = env.lease(worker).await {
            return (lease, Instant::now());
        }
        assert!(Instant::now() < deadline, "no lease within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn release(env: &mut common::Env, lease: &v1::Lease, reason: &str) -> Result<(), tonic::Status> {
    let request = v1::ReleaseJobRequest {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        reason: reason.into(),
        lease_token: lease.lease_token.clone(),
    };
    env.workers.release_job(request).await.map(|_| ())
}

async fn attempt_outcomes(env: &common::Env, job: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let outcomes = sqlx::query_scalar("SELECT outcome FROM job_attempts WHERE job_id = $1::uuid ORDER BY attempt")
        .bind(job)
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    outcomes
}

#[tokio::test]
async fn errors_of_the_job_back_off_with_growing_gaps_and_fail_after_max_attempts() {
    let mut env = common::start_with(LEASE, |c| {
        c.retry.backoff_base = Duration::from_millis(400);
        c.retry.backoff_cap = Duration::from_secs(10);
    })
    .await;
    let mut spec = env.spec("poison").await;
    spec.max_attempts = 3;
    let job = env.submit(spec).await;
    let worker = env.register().await;

    let mut ended = Vec::new();
    let mut gaps = Vec::new();
    for attempt in 1..=3 {
        let (lease, leased_at) = lease_when_due(&mut env, &worker, Duration::from_secs(10)).await;
        assert_eq!(lease.attempt, attempt);
        if let Some(end) = ended.last() {
            gaps.push(leased_at.duration_since(*end));
        }
        env.fail(&lease, "the engine panicked while training this job: boom", false, true).await.unwrap();
        ended.push(Instant::now());
    }
    let failed = env.get(&job.id).await;
    assert_eq!(state(&failed), v1::JobState::Failed);
    assert_eq!(failed.error, "failed 3 times; last: the engine panicked while training this job: boom");
    assert_eq!((failed.failures, failed.interruptions, failed.attempts), (3, 0, 3));
    // 400 ms, then 800 ms (plus up to 10% jitter each).
    assert!(gaps[0] >= Duration::from_millis(400), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(800) && gaps[1] > gaps[0], "the gaps grow: {gaps:?}");
    assert!(env.lease(&worker).await.is_none(), "a failed job is not leased again");
    env.stop().await;
}

#[tokio::test]
async fn interruptions_and_releases_queue_the_job_at_once_without_using_up_its_attempts() {
    let mut env = common::start_with(LEASE, |c| c.retry.backoff_base = Duration::from_secs(60)).await;
    let mut spec = env.spec("drained").await;
    spec.max_attempts = 1;
    let job = env.submit(spec).await;
    let worker = env.register().await;

    let first = env.lease(&worker).await.unwrap();
    release(&mut env, &first, "the worker is draining; handed back at step 12").await.unwrap();
    release(&mut env, &first, "the worker is draining; handed back at step 12").await.expect("a retried release is harmless");
    let queued = env.get(&job.id).await;
    assert_eq!((state(&queued), queued.failures, queued.interruptions), (v1::JobState::Queued, 0, 1));
    assert_eq!(queued.error, "released: the worker is draining; handed back at step 12");
    assert!(queued.retry_at.is_empty() && queued.worker_id.is_empty());

    let second = env.lease(&worker).await.expect("a released job is leased again at once");
    let disk_full = v1::FailJobRequest {
        job_id: second.job_id.clone(),
        epoch: second.epoch,
        lease_token: second.lease_token.clone(),
        error: "checkpoint: No space left on device (os error 28)".into(),
        retryable: true,
        infrastructure: true,
        ..Default::default()
    };
    env.workers.fail_job(disk_full).await.unwrap();
    let requeued = env.get(&job.id).await;
    assert_eq!((state(&requeued), requeued.failures, requeued.interruptions), (v1::JobState::Queued, 0, 2));

    let third = env.lease(&worker).await.expect("an interrupted job is leased again at once");
    env.fail(&third, "torch: a transient error", false, true).await.unwrap();
    let failed = env.get(&job.id).await;
    assert_eq!(state(&failed), v1::JobState::Failed, "its one error used up max_attempts 1");
    assert_eq!(failed.error, "failed 1 time; last: torch: a transient error");
    assert_eq!(attempt_outcomes(&env, &job.id).await, ["released", "interrupted", "failed"]);
    env.stop().await;
}

fn checkpoint_upload(lease: &v1::Lease, step: u64, archive: &[u8]) -> Vec<v1::CheckpointChunk> {
    let header = v1::CheckpointHeader {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        step,
        sha256: sha256(archive),
        size: archive.len() as u64,
        lease_token: lease.lease_token.clone(),
    };
    let mut parts = vec![v1::CheckpointChunk { part: Some(Part::Header(header)) }];
    parts.extend(archive.chunks(256 << 10).map(|c| v1::CheckpointChunk { part: Some(Part::Data(c.to_vec())) }));
    parts
}

async fn upload(env: &mut common::Env, parts: Vec<v1::CheckpointChunk>) -> Result<bool, tonic::Status> {
    env.workers.upload_checkpoint(futures::stream::iter(parts)).await.map(|r| r.into_inner().stored)
}

async fn download(env: &mut common::Env, lease: &v1::Lease) -> Result<(v1::CheckpointHeader, Vec<u8>), tonic::Status> {
    use futures::StreamExt;
    let request = v1::DownloadCheckpointRequest {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        lease_token: lease.lease_token.clone(),
    };
    let mut stream = env.workers.download_checkpoint(request).await?.into_inner();
    let (mut header, mut bytes) = (None, Vec::new());
    while let Some(chunk) = stream.next().await {
        match chunk?.part {
            Some(Part::Header(h)) => header = Some(h),
            Some(Part::Data(data)) => bytes.extend_from_slice(&data),
            None => {}
        }
    }
    Ok((header.expect("a header first"), bytes))
}

#[tokio::test]
async fn a_stored_checkpoint_follows_the_job_to_its_next_attempt_and_goes_when_the_job_ends() {
    let mut env = common::start(LEASE).await;
    let spec = env.spec("resumable").await;
    let job = env.submit(spec).await;
    let worker = env.register().await;
    let first = env.lease(&worker).await.unwrap();
    assert!(first.checkpoint.is_none());

    // 3 MiB: stored as several chunks, streamed both ways.
    let at_ten: Vec<u8> = (0..3u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
    assert!(upload(&mut env, checkpoint_upload(&first, 10, &at_ten)).await.unwrap());
    let older = vec![7u8; 1000];
    assert!(!upload(&mut env, checkpoint_upload(&first, 5, &older)).await.unwrap(), "an older checkpoint is dropped");
    let mut corrupt = checkpoint_upload(&first, 12, &older);
    corrupt.truncate(1);
    corrupt.push(v1::CheckpointChunk { part: Some(Part::Data(vec![8u8; 1000])) });
    let refused = upload(&mut env, corrupt).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("sha256:"), "{}", refused.message());
    assert_eq!(env.get(&job.id).await.checkpoint_step, 10);

    release(&mut env, &first, "draining").await.unwrap();
    let stale = upload(&mut env, checkpoint_upload(&first, 20, &older)).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "a lease handed back cannot store checkpoints");
    assert_eq!(download(&mut env, &first).await.unwrap_err().code(), Code::FailedPrecondition);

    let second = env.lease(&worker).await.unwrap();
    let stored = second.checkpoint.clone().expect("the next attempt learns of the checkpoint");
    assert_eq!((stored.step, stored.sha256.as_str(), stored.size), (10, sha256(&at_ten).as_str(), at_ten.len() as u64));
    let (header, bytes) = download(&mut env, &second).await.unwrap();
    assert_eq!((header.step, header.sha256), (10, sha256(&at_ten)));
    assert!(bytes == at_ten, "the checkpoint came back changed");

    env.complete(&second, b"adapter").await.unwrap();
    let store = ptune_coordinator::store::Store::connect(&env.db.url).await.unwrap();
    assert_eq!(store.collect_checkpoints(Duration::from_secs(3600), 100).await.unwrap(), 1);
    assert_eq!(env.get(&job.id).await.checkpoint_step, 0, "a finished job keeps no checkpoint");
    store.close().await;
    env.stop().await;
}

#[tokio::test]
async fn a_worker_that_reports_itself_unhealthy_is_listed_with_its_reason_and_counted() {
    let mut env = common::start(LEASE).await;
    let worker = env.register().await;
    let reason = "disk full: No space left on device (os error 28); free space in the work directory";
    let beat = v1::HeartbeatRequest { worker_id: worker.clone(), unhealthy_reason: reason.into(), ..Default::default() };
    env.workers.heartbeat(beat).await.unwrap();
    let listed = env.jobs.list_workers(v1::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].worker_id.as_str(), listed[0].unhealthy_reason.as_str()), (worker.as_str(), reason));
    assert!(listed[0].online);

    let http = env.coordinator.as_ref().unwrap().http_addr;
    let metrics = common::http_get(http, "/metrics", Some(&env.tokens.viewer)).await;
    assert!(metrics.contains("ptune_workers_unhealthy 1"), "{metrics}");

    let healthy = v1::HeartbeatRequest { worker_id: worker.clone(), ..Default::default() };
    env.workers.heartbeat(healthy).await.unwrap();
    let listed = env.jobs.list_workers(v1::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert_eq!(listed[0].unhealthy_reason, "", "a heartbeat without a reason clears it");
    env.stop().await;
}
