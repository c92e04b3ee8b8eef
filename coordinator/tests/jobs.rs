//! What a user sees through JobService: submitting, validation, listing,
//! datasets, cancellation of queued jobs, and the health endpoints.

mod common;

use std::time::Duration;

use common::{http_get, state, EVAL, MODEL, TRAIN};
use ptune_proto::v1;
use ptune_proto::v1::complete_job_chunk::Part;
use tonic::Code;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

#[tokio::test]
async fn submitted_jobs_can_be_fetched_and_listed_with_filters_and_pages() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let base = env.spec("sst2-a").await;
    let a = env.submit(base.clone()).await;
    let b = env.submit(v1::JobSpec { name: "sst2-b".into(), ..base.clone() }).await;
    let c = env.submit(v1::JobSpec { name: "other".into(), owner: "bob".into(), ..base.clone() }).await;

    assert_eq!(state(&a), v1::JobState::Queued);
    assert_eq!((a.attempts, a.max_attempts), (0, 3), "max_attempts 0 takes the coordinator default");
    assert_eq!(a.total_steps, 2, "3 examples in batches of 2 for one epoch");
    let stored = a.spec.clone().unwrap();
    assert_eq!((stored.name.as_str(), stored.owner.as_str()), ("sst2-a", "alice"));
    assert_eq!(stored.data.as_ref().unwrap().train, base.data.as_ref().unwrap().train);
    assert_eq!(env.get(&a.id).await, a, "GetJob returns what SubmitJob returned");

    let list = |req: v1::ListJobsRequest| {
        let mut client = env.jobs.clone();
        async move { client.list_jobs(req).await.unwrap().into_inner() }
    };
    let names =
        |r: &v1::ListJobsResponse| r.jobs.iter().map(|j| j.spec.as_ref().unwrap().name.clone()).collect::<Vec<_>>();
    let all = list(v1::ListJobsRequest::default()).await;
    assert_eq!(names(&all), ["other", "sst2-b", "sst2-a"], "newest first");
    assert!(all.next_page_token.is_empty());
    let prefix = list(v1::ListJobsRequest { name_prefix: "sst2".into(), ..Default::default() }).await;
    assert_eq!(names(&prefix), ["sst2-b", "sst2-a"]);
    let bob = list(v1::ListJobsRequest { owner: "bob".into(), ..Default::default() }).await;
    assert_eq!(names(&bob), ["other"]);
    let running = list(v1::ListJobsRequest { states: vec![v1::JobState::Running as i32], ..Default::default() }).await;
    assert!(running.jobs.is_empty());
    let queued = list(v1::ListJobsRequest {
        states: vec![v1::JobState::Queued as i32],
        method: v1::Method::PromptTuning as i32,
        base_model: MODEL.into(),
        ..Default::default()
    })
    .await;
    assert_eq!(queued.jobs.len(), 3);

    let first = list(v1::ListJobsRequest { page_size: 2, ..Default::default() }).await;
    assert_eq!(names(&first), ["other", "sst2-b"]);
    assert!(!first.next_page_token.is_empty());
    let second =
        list(v1::ListJobsRequest { page_size: 2, page_token: first.next_page_token, ..Default::default() }).await;
    assert_eq!(names(&second), ["sst2-a"]);
    assert!(second.next_page_token.is_empty(), "the last page has no token");
    assert_eq!(
        [&first.jobs[..], &second.jobs[..]].concat().iter().map(|j| &j.id).collect::<Vec<_>>(),
        [&c.id, &b.id, &a.id]
    );

    let missing = env.jobs.get_job(v1::GetJobRequest { job_id: uuid_like() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let garbage = env.jobs.get_job(v1::GetJobRequest { job_id: "job-1".into() }).await.unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument);
    assert!(garbage.message().starts_with("job_id: "), "{}", garbage.message());
    let bad_token =
        env.jobs.list_jobs(v1::ListJobsRequest { page_token: "x".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(bad_token.code(), Code::InvalidArgument);
    assert!(bad_token.message().starts_with("page_token: "), "{}", bad_token.message());
    env.stop().await;
}

#[tokio::test]
async fn invalid_specs_are_refused_with_a_message_naming_the_field() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let good = env.spec("good").await;
    let client = env.jobs.clone();
    let submit = |spec: v1::JobSpec| {
        let mut client = client.clone();
        async move { client.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await.unwrap_err() }
    };

    let mut no_prompt = good.clone();
    no_prompt.peft.as_mut().unwrap().num_virtual_tokens = Some(0);
    let err = submit(no_prompt).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("peft.num_virtual_tokens: prompt length must be between 1 and 512"),
        "{}",
        err.message()
    );

    let mut no_rate = good.clone();
    no_rate.training.as_mut().unwrap().learning_rate = 0.0;
    let err = submit(no_rate).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("training.learning_rate: "), "{}", err.message());

    let unknown = format!("sha256:{}", "0".repeat(64));
    let mut not_uploaded = good.clone();
    not_uploaded.data.as_mut().unwrap().train = unknown.clone();
    let err = submit(not_uploaded).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        format!("data.train: dataset {unknown} is not uploaded; upload it with UploadDataset first")
    );

    let bad = env
        .upload("bad.jsonl", "{\"text\": \"a\", \"label\": 0}\nnot json at all\n{\"text\": \"b\", \"label\": 2}\n")
        .await;
    let mut bad_label = good.clone();
    bad_label.data.as_mut().unwrap().eval = bad.reference;
    let err = submit(bad_label).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        r#"data.labels: label "2" on line 3 of bad.jsonl is not one of the declared labels ["0", "1"]"#
    );

    // Once a worker says how many positions the model has, prompts must fit them.
    env.workers
        .register_worker(v1::RegisterWorkerRequest {
            hostname: "h".into(),
            slots: 1,
            models: vec![v1::BaseModel { name: MODEL.into(), max_positions: 80, ..Default::default() }],
            ..Default::default()
        })
        .await
        .unwrap();
    let err = submit(good).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("peft.num_virtual_tokens: prompt length 20 plus data.max_seq_len 64 exceeds the 80 positions"),
        "{}",
        err.message()
    );

    let jobs = env.jobs.list_jobs(v1::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert!(jobs.is_empty(), "refused specs store nothing");
    env.stop().await;
}

#[tokio::test]
async fn datasets_are_stored_once_per_content_and_served_back_to_workers() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let first = env.upload("train.jsonl", TRAIN).await;
    let again = env.upload("copy.jsonl", TRAIN).await;
    let other = env.upload("eval.jsonl", EVAL).await;
    assert_eq!(first.reference, format!("sha256:{}", common::sha256(TRAIN.as_bytes())));
    assert_eq!(again, first, "the same bytes give the same reference and record");
    assert_eq!((first.lines, first.size_bytes, first.file_name.as_str()), (3, TRAIN.len() as u64, "train.jsonl"));
    assert_ne!(other.reference, first.reference);

    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM datasets").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 2);
    pool.close().await;

    // A worker downloads the datasets of a job it holds the lease of, and no others.
    let job = env.submit(common::spec("uses-data", &first.reference, &other.reference)).await;
    let worker = env.register().await;
    let lease = env.lease(&worker).await.expect("the job is leased");
    let request = |reference: &str, token: &str| v1::DownloadDatasetRequest {
        reference: reference.to_string(),
        job_id: job.id.clone(),
        epoch: lease.epoch,
        lease_token: token.to_string(),
    };
    let mut stream = env.workers.download_dataset(request(&first.reference, &lease.lease_token)).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        bytes.extend(chunk.data);
    }
    assert_eq!(bytes, TRAIN.as_bytes());

    let unknown = format!("sha256:{}", "1".repeat(64));
    let err = env.workers.download_dataset(request(&unknown, &lease.lease_token)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("is not one of job"), "{}", err.message());
    let err = env.workers.download_dataset(request(&first.reference, "plt_guessed")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "without the lease token: {err:?}");
    let empty = env.jobs.upload_dataset(futures::stream::iter(Vec::<v1::DatasetChunk>::new())).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    env.stop().await;
}

#[tokio::test]
async fn large_files_are_stored_in_chunks_and_come_back_byte_for_byte() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let blobs = |pool: sqlx::PgPool| async move {
        let counts: (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE complete), (SELECT count(*) FROM blob_chunks) FROM blobs",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        counts
    };

    // 3.4 MB of examples, sent in pieces that do not line up with the stored chunks.
    let line = |i: usize| format!("{{\"text\": \"example number {i} with some words\", \"label\": {}}}\n", i % 2);
    let train: String = (0..60_000).map(line).collect();
    let chunks: Vec<v1::DatasetChunk> = train
        .as_bytes()
        .chunks(100_003)
        .enumerate()
        .map(|(i, data)| v1::DatasetChunk {
            file_name: if i == 0 { "big.jsonl".to_string() } else { String::new() },
            data: data.to_vec(),
        })
        .collect();
    let stored = env.jobs.upload_dataset(futures::stream::iter(chunks.clone())).await.unwrap().into_inner();
    assert_eq!((stored.size_bytes, stored.lines), (train.len() as u64, 60_000));
    assert_eq!(stored.reference, format!("sha256:{}", common::sha256(train.as_bytes())));
    let again = env.jobs.upload_dataset(futures::stream::iter(chunks)).await.unwrap().into_inner();
    assert_eq!(again, stored);
    let chunk_count = train.len().div_ceil(1 << 20) as i64;
    assert_eq!(blobs(pool.clone()).await, (1, 1, chunk_count), "the second upload of the same bytes leaves nothing behind");

    // A worker streams the dataset back; the adapter goes up and comes back whole.
    let eval = env.upload("eval.jsonl", EVAL).await;
    let job = env.submit(common::spec("big", &stored.reference, &eval.reference)).await;
    let worker = env.register().await;
    let lease = env.lease(&worker).await.expect("leased");
    let request = v1::DownloadDatasetRequest {
        reference: stored.reference.clone(),
        job_id: job.id.clone(),
        epoch: lease.epoch,
        lease_token: lease.lease_token.clone(),
    };
    let mut stream = env.workers.download_dataset(request).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        bytes.extend(chunk.data);
    }
    assert!(bytes == train.as_bytes(), "the downloaded dataset differs from the upload");

    let adapter: Vec<u8> = (0..2_500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let mut wrong = adapter.clone();
    wrong[1_234_567] ^= 1;
    let mut header_for_wrong = env.complete_parts(&lease, &adapter);
    header_for_wrong.truncate(1);
    header_for_wrong.extend(wrong.chunks(100_000).map(|c| v1::CompleteJobChunk { part: Some(Part::Data(c.to_vec())) }));
    let refused = env.workers.complete_job(futures::stream::iter(header_for_wrong)).await.unwrap_err();
    assert!(refused.message().starts_with("adapter_sha256:"), "{refused:?}");
    env.complete(&lease, &adapter).await.unwrap();
    assert!(download_adapter(&mut env, &job.id).await == adapter, "the downloaded adapter differs from the upload");
    let adapter_chunks = adapter.len().div_ceil(1 << 20) as i64;
    assert_eq!(
        blobs(pool.clone()).await,
        (3, 3, chunk_count + 1 + adapter_chunks),
        "the refused adapter left no blob behind"
    );

    // Chunks reach the database while the upload is still arriving, and an
    // upload refused part-way leaves nothing behind.
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::DatasetChunk>(4);
    let mut jobs = env.jobs.clone();
    let call = tokio::spawn(async move { jobs.upload_dataset(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    for _ in 0..3 {
        tx.send(v1::DatasetChunk { file_name: String::new(), data: vec![b'{'; 1 << 20] }).await.unwrap();
    }
    let before = chunk_count + 1 + adapter_chunks;
    common::wait_until(10, || async { blobs(pool.clone()).await == (4, 3, before + 3) }).await;
    tx.send(v1::DatasetChunk { file_name: "no/slashes".into(), data: vec![b'}'] }).await.unwrap();
    let refused = call.await.unwrap().unwrap_err();
    assert!(refused.message().starts_with("file_name:"), "{refused:?}");
    common::wait_until(10, || async { blobs(pool.clone()).await == (3, 3, before) }).await;
    pool.close().await;
    env.stop().await;
}

#[tokio::test]
async fn adapters_at_the_edges_of_a_chunk_are_stored_whole_and_refused_ones_leave_nothing() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let blobs = |pool: sqlx::PgPool| async move {
        let counts: (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE complete AND size IS NOT NULL AND sha256 IS NOT NULL), \
                    (SELECT count(*) FROM blob_chunks WHERE blob_id NOT IN (SELECT blob_id FROM datasets)) \
             FROM blobs WHERE id NOT IN (SELECT blob_id FROM datasets)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        counts
    };
    let spec = env.spec("edges").await;
    let worker = env.register().await;
    let chunk = 1usize << 20;
    // An adapter smaller than one chunk is written with the completion; a
    // larger one as it arrives. Both come back byte for byte.
    let mut stored = (0, 0, 0);
    for (i, size) in [1, chunk - 1, chunk, chunk + 1].into_iter().enumerate() {
        let job = env.submit(v1::JobSpec { name: format!("edge-{i}"), ..spec.clone() }).await;
        let lease = env.lease(&worker).await.expect("leased");
        assert_eq!(lease.job_id, job.id);
        let adapter: Vec<u8> = (0..size as u32).map(|b| (b.wrapping_mul(2_654_435_761) >> 24) as u8).collect();

        // Refused before the job completes: a wrong hash, and an upload cut off.
        let mut wrong = env.complete_parts(&lease, &adapter);
        if let Some(Part::Header(h)) = &mut wrong[0].part {
            h.adapter_sha256 = "0".repeat(64);
        }
        let refused = env.workers.complete_job(futures::stream::iter(wrong)).await.unwrap_err();
        assert!(refused.message().starts_with("adapter_sha256:"), "{size} bytes: {refused:?}");
        let mut cut = env.complete_parts(&lease, &adapter);
        cut.pop();
        let refused = env.workers.complete_job(futures::stream::iter(cut)).await.unwrap_err();
        assert!(refused.message().starts_with("adapter_size:"), "{size} bytes: {refused:?}");
        common::wait_until(10, || async { blobs(pool.clone()).await == stored }).await;

        env.complete(&lease, &adapter).await.unwrap();
        env.complete(&lease, &adapter).await.expect("a retried completion is accepted");
        stored = (stored.0 + 1, stored.1 + 1, stored.2 + size.div_ceil(chunk) as i64);
        assert_eq!(blobs(pool.clone()).await, stored, "{size} bytes: one complete blob, and a retry stores nothing");
        let bytes = download_adapter(&mut env, &job.id).await;
        assert!(bytes == adapter, "the downloaded adapter of {size} bytes differs from the upload");
        let got = env.jobs.get_job(v1::GetJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
        assert_eq!(state(&got), v1::JobState::Succeeded);
    }

    // A completion under a lease that is no longer the job's stores nothing.
    let job = env.submit(v1::JobSpec { name: "stale".into(), ..spec.clone() }).await;
    let lease = env.lease(&worker).await.expect("leased");
    assert_eq!(lease.job_id, job.id);
    env.fail(&lease, "lost", false, true).await.unwrap();
    let refused = env.complete(&lease, b"late").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(blobs(pool.clone()).await, stored, "the stale completion left no blob");
    pool.close().await;
    env.stop().await;
}

/// The adapter of job `id`, downloaded whole.
async fn download_adapter(env: &mut common::Env, id: &str) -> Vec<u8> {
    let request = v1::DownloadAdapterRequest { job_id: id.to_string() };
    let mut stream = env.jobs.download_adapter(request).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    while let Some(part) = stream.message().await.unwrap() {
        bytes.extend(part.data);
    }
    bytes
}

#[tokio::test]
async fn a_queued_job_is_cancelled_at_once_and_never_leased() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("to-cancel").await;
    let job = env.submit(spec).await;
    let cancelled = env.jobs.cancel_job(v1::CancelJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
    assert_eq!(state(&cancelled), v1::JobState::Cancelled);
    assert!(!cancelled.finished_at.is_empty());

    let worker = env.register().await;
    assert!(env.lease(&worker).await.is_none(), "a cancelled job is not leased");
    let again = env.jobs.cancel_job(v1::CancelJobRequest { job_id: job.id.clone() }).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert!(again.message().contains("already cancelled"), "{}", again.message());
    env.stop().await;
}

#[tokio::test]
async fn health_reflection_and_prometheus_metrics_are_served() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("counted").await;
    env.submit(spec).await;
    env.register().await;
    let coordinator = env.coordinator.as_ref().unwrap();

    let channel = ptune_coordinator::testing::channel(&format!("http://{}", coordinator.grpc_addr), &env.tokens.viewer);
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let reply =
        reflection.server_reflection_info(futures::stream::iter([list])).await.unwrap().into_inner().message().await;
    let Some(MessageResponse::ListServicesResponse(services)) = reply.unwrap().unwrap().message_response else {
        panic!("reflection did not list services");
    };
    let services: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    assert!(services.contains(&"ptune.v1.JobService".to_string()), "{services:?}");
    assert!(services.contains(&"ptune.v1.WorkerService".to_string()), "{services:?}");

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["ptune.v1.JobService", "ptune.v1.WorkerService"] {
        let reply =
            health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(reply.status(), tonic_health::pb::health_check_response::ServingStatus::Serving, "{service}");
    }

    let healthz = http_get(coordinator.http_addr, "/healthz", None).await;
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    assert!(healthz.ends_with("ok"), "{healthz}");
    let metrics = http_get(coordinator.http_addr, "/metrics", Some(&env.tokens.viewer)).await;
    assert!(metrics.contains("ptune_jobs{state=\"queued\"} 1\n"), "{metrics}");
    assert!(metrics.contains("ptune_jobs{state=\"running\"} 0\n"), "{metrics}");
    assert!(metrics.contains("ptune_workers_online 1\n"), "{metrics}");
    assert!(metrics.contains("ptune_sweeps{state=\"running\"} 0\n"), "{metrics}");
    env.stop().await;
}

fn uuid_like() -> String {
    "00000000-0000-4000-8000-000000000000".into()
}
