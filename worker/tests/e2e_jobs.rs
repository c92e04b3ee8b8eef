//! End to end: a real coordinator on real Postgres, real `ptune-worker`
//! processes training MiniLM with libtorch, everything over gRPC on TCP.

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use support::cluster::*;
use futures::StreamExt;
use ptune_proto::v1::job_service_client::JobServiceClient;
use ptune_proto::v1::{self, JobState};
use sha2::{Digest, Sha256};
use ptune_worker::agent::Directive;
use ptune_proto::client::AuthChannel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_goes_queued_running_succeeded_with_metrics_and_a_verifiable_adapter() {
    let cluster = Cluster::start(Duration::from_secs(5)).await;
    let mut client = cluster.client().await;
    let train = upload(&mut client, &sst2("train.jsonl")).await;
    let eval = upload(&mut client, &sst2("dev.jsonl")).await;
    let job = client
        .submit_job(v1::SubmitJobRequest { spec: Some(sst2_spec(&train, &eval, 20)) })
        .await
        .expect("valid spec is accepted")
        .into_inner()
        .job
        .unwrap();
    assert_eq!(state(&job), JobState::Queued);

    // Watch from before any worker exists, so every transition is seen.
    let mut watcher = cluster.client().await;
    let id = job.id.clone();
    let watching = tokio::spawn(async move { watched_states(&mut watcher, &id).await });
    let _worker = cluster.spawn_worker("w1");
    let (states, metric_events) = tokio::time::timeout(Duration::from_secs(240), watching)
        .await
        .expect("job finishes in time")
        .unwrap();
    assert_eq!(
        states,
        [JobState::Queued, JobState::Running, JobState::Succeeded],
        "worker log:\n{}",
        cluster.worker_log("w1")
    );
    assert!(metric_events > 0, "the watch stream carried no metrics");

    let done = get(&mut client, &job.id).await;
    assert_eq!(done.step, 20);
    assert_eq!(done.attempts, 1);
    // The worker registered MiniLM's shape, so the job has an estimate; its
    // measured peak holds at least MiniLM's 90.9 MB of weights.
    assert!(done.memory_estimate_bytes > 90_852_864, "{}", done.memory_estimate_bytes);
    assert!(done.worker_peak_rss_bytes > 90_852_864, "{}", done.worker_peak_rss_bytes);
    let metrics = client
        .get_metrics(v1::GetMetricsRequest { job_id: job.id.clone(), kind: String::new() })
        .await
        .unwrap()
        .into_inner()
        .metrics;
    let train_losses: Vec<_> = metrics.iter().filter(|m| m.kind == "train" && m.name == "loss").collect();
    assert_eq!(train_losses.len(), 20, "one loss row per step");
    assert!(train_losses.iter().all(|m| m.value.is_finite() && m.value > 0.0));
    let accuracy = metrics.iter().filter(|m| m.kind == "eval" && m.name == "accuracy").last().expect("eval accuracy");
    assert!((0.0..=1.0).contains(&accuracy.value));
    assert_eq!(accuracy.step, 20);

    // The adapter downloads intact and is a PEFT prompt-tuning folder.
    let mut stream = client
        .download_adapter(v1::DownloadAdapterRequest { job_id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    let mut announced = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if !chunk.sha256.is_empty() {
            announced = chunk.sha256;
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let sha = hex::encode(Sha256::digest(&bytes));
    assert_eq!(sha, done.adapter_sha256);
    assert_eq!(sha, announced);
    let worker_log = cluster.worker_log("w1");
    assert!(worker_log.contains(&sha), "the worker logged a different adapter sha256:\n{worker_log}");
    let mut files = std::collections::BTreeMap::new();
    for entry in tar::Archive::new(bytes.as_slice()).entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        files.insert(entry.path().unwrap().display().to_string(), content);
    }
    let config: serde_json::Value = serde_json::from_slice(&files["adapter_config.json"]).unwrap();
    assert_eq!(config["peft_type"], "PROMPT_TUNING");
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["num_virtual_tokens"], 8);
    let tensors = safetensors::SafeTensors::deserialize(&files["adapter_model.safetensors"]).unwrap();
    assert_eq!(tensors.tensor("prompt_embeddings").unwrap().shape(), [8, 384]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_running_job_stops_and_the_worker_takes_the_next_one() {
    let cluster = Cluster::start(Duration::from_secs(5)).await;
    let mut client = cluster.client().await;
    let train = upload(&mut client, &sst2("train.jsonl")).await;
    let eval = upload(&mut client, &sst2("dev.jsonl")).await;
    let submit = |steps| v1::SubmitJobRequest { spec: Some(sst2_spec(&train, &eval, steps)) };
    let long = client.submit_job(submit(100_000)).await.unwrap().into_inner().job.unwrap();
    let _worker = cluster.spawn_worker("w1");
    wait_for(&mut client, &long.id, Duration::from_secs(120), "running with progress", |j| {
        state(j) == JobState::Running && j.step >= 2
    })
    .await;

    let requested = Instant::now();
    let answer = client.cancel_job(v1::CancelJobRequest { job_id: long.id.clone() }).await.unwrap().into_inner();
    assert!(answer.cancel_requested);
    let cancelled =
        wait_for(&mut client, &long.id, Duration::from_secs(20), "cancelled", |j| state(j) == JobState::Cancelled)
            .await;
    eprintln!("cancellation took {:?}", requested.elapsed());
    assert!(cancelled.step < 100_000);
    let stopped_at = cancelled.step;

    // The slot is free again: a short job runs to completion on the same worker.
    let next = client.submit_job(submit(3)).await.unwrap().into_inner().job.unwrap();
    wait_for(&mut client, &next.id, Duration::from_secs(120), "succeeded", |j| state(j) == JobState::Succeeded).await;
    assert_eq!(get(&mut client, &long.id).await.step, stopped_at, "a cancelled job kept training");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_loses_its_lease_and_another_worker_completes_the_job() {
    let cluster = Cluster::start(Duration::from_secs(2)).await;
    let mut client = cluster.client().await;
    let job = submit_sst2(&mut client, 40).await;
    let mut first = cluster.spawn_worker("doomed");
    let running = wait_for(&mut client, &job.id, Duration::from_secs(120), "running with progress", |j| {
        state(j) == JobState::Running && j.step >= 2
    })
    .await;
    let doomed_worker = running.worker_id.clone();
    first.kill();

    let requeued =
        wait_for(&mut client, &job.id, Duration::from_secs(30), "requeued", |j| state(j) == JobState::Queued).await;
    assert!(requeued.error.contains("lease"), "requeue reason should name the lost lease: {:?}", requeued.error);

    let _second = cluster.spawn_worker("rescuer");
    let done =
        wait_for(&mut client, &job.id, Duration::from_secs(180), "succeeded", |j| state(j).is_terminal()).await;
    assert_eq!(state(&done), JobState::Succeeded, "rescuer log:\n{}", cluster.worker_log("rescuer"));
    assert_eq!(done.attempts, 2);
    assert_ne!(done.worker_id, doomed_worker, "the dead worker cannot have finished it");
    assert_eq!(done.step, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_after_a_crash_resumes_its_job_from_the_last_checkpoint() {
    let cluster = Cluster::start(Duration::from_secs(2)).await;
    let mut client = cluster.client().await;
    let job = submit_sst2(&mut client, 40).await;
    let mut worker = cluster.spawn_worker("crashing");
    // Evaluations (and checkpoints) come every 10 steps.
    wait_for(&mut client, &job.id, Duration::from_secs(180), "past the first checkpoint", |j| {
        state(j) == JobState::Running && j.step >= 12
    })
    .await;
    worker.kill();
    wait_for(&mut client, &job.id, Duration::from_secs(30), "requeued", |j| state(j) == JobState::Queued).await;

    // The same worker (same work directory) comes back and leases the job again.
    let _back = cluster.spawn_worker("crashing");
    let done =
        wait_for(&mut client, &job.id, Duration::from_secs(180), "succeeded", |j| state(j).is_terminal()).await;
    let log = cluster.worker_log("crashing");
    assert_eq!(state(&done), JobState::Succeeded, "worker log:\n{log}");
    assert_eq!((done.attempts, done.step), (2, 40));
    assert!(
        log.lines().map(without_colours).any(|line| line.contains("resumed from checkpoint") && line.contains("step=10")),
        "the second attempt starts from the checkpoint at step 10:\n{log}"
    );
    // The worker removes the checkpoint once the coordinator has the result,
    // so it may still be there the moment the job reads as succeeded.
    let checkpoints = cluster.worker_dir("crashing").join("checkpoints");
    let empty = || std::fs::read_dir(&checkpoints).map_or(true, |mut entries| entries.next().is_none());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(empty(), "a finished job's checkpoint is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_in_every_slot_of_a_worker_train_as_one_pack_on_one_copy_of_the_base_model() {
    let cluster = Cluster::start(Duration::from_secs(2)).await;
    let mut client = cluster.client().await;
    let first = submit_sst2(&mut client, 30).await;
    let second = submit_sst2(&mut client, 30).await;
    let _worker = cluster.spawn_worker_with_slots("shared", 2);
    let mut done = Vec::new();
    for job in [&first, &second] {
        let finished =
            wait_for(&mut client, &job.id, Duration::from_secs(240), "finished", |j| state(j).is_terminal()).await;
        assert_eq!(state(&finished), JobState::Succeeded);
        done.push(finished);
    }
    // RFC 3339 UTC times of one format compare as text.
    assert!(
        done[1].started_at < done[0].finished_at && done[0].started_at < done[1].finished_at,
        "the two slots trained at the same time: {:?}",
        done.iter().map(|j| (&j.started_at, &j.finished_at)).collect::<Vec<_>>()
    );
    let log = cluster.worker_log("shared");
    let loads = log.lines().map(without_colours).filter(|line| line.contains("base model loaded")).count();
    assert_eq!(loads, 1, "two jobs, one copy of MiniLM:\n{log}");
    // Both were queued before the worker started: they share their steps.
    for job in &done {
        let metrics = client
            .get_metrics(v1::GetMetricsRequest { job_id: job.id.clone(), kind: "train".into() })
            .await
            .unwrap()
            .into_inner()
            .metrics;
        let packed = metrics.iter().filter(|m| m.name == "pack_jobs" && m.value == 2.0).count();
        assert!(packed >= 20, "job {} shared only {packed} of 30 steps:\n{log}", job.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_takes_each_next_job_with_the_completion_of_the_last() {
    let cluster = Cluster::start(Duration::from_secs(5)).await;
    let mut client = cluster.client().await;
    let mut jobs = Vec::new();
    for _ in 0..3 {
        jobs.push(submit_sst2(&mut client, 3).await);
    }
    let _worker = cluster.spawn_worker_with_slots("busy", 1);
    for job in &jobs {
        let finished =
            wait_for(&mut client, &job.id, Duration::from_secs(240), "finished", |j| state(j).is_terminal()).await;
        assert_eq!((state(&finished), finished.attempts), (JobState::Succeeded, 1));
    }
    // One slot: the first job came from LeaseJob, each later one with the
    // completion of the job before it, with no call in between.
    let log = cluster.worker_log("busy");
    let handed = log.lines().map(without_colours).filter(|l| l.contains("job leased with the last completion")).count();
    assert_eq!(handed, 2, "worker log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_in_a_pack_leaves_it_and_the_others_train_to_the_end() {
    let cluster = Cluster::start(Duration::from_secs(5)).await;
    let mut client = cluster.client().await;
    let long = submit_sst2(&mut client, 100_000).await;
    let short = submit_sst2(&mut client, 40).await;
    let _worker = cluster.spawn_worker_with_slots("pack", 2);
    wait_for(&mut client, &short.id, Duration::from_secs(120), "running with progress", |j| {
        state(j) == JobState::Running && j.step >= 2
    })
    .await;

    let answer = client.cancel_job(v1::CancelJobRequest { job_id: long.id.clone() }).await.unwrap().into_inner();
    assert!(answer.cancel_requested);
    wait_for(&mut client, &long.id, Duration::from_secs(20), "cancelled", |j| state(j) == JobState::Cancelled).await;
    let done =
        wait_for(&mut client, &short.id, Duration::from_secs(120), "finished", |j| !j.finished_at.is_empty()).await;
    assert_eq!(state(&done), JobState::Succeeded, "{}\n{}", done.error, cluster.worker_log("pack"));
    assert_eq!(done.step, 40);

    let metrics = client
        .get_metrics(v1::GetMetricsRequest { job_id: short.id.clone(), kind: "train".into() })
        .await
        .unwrap()
        .into_inner()
        .metrics;
    let pack_jobs = |step: u64| metrics.iter().find(|m| m.name == "pack_jobs" && m.step == step).map(|m| m.value);
    let losses: Vec<u64> = metrics.iter().filter(|m| m.name == "loss").map(|m| m.step).collect();
    assert_eq!(losses, (1..=40).collect::<Vec<_>>(), "every step of the remaining job, once");
    // It shared its early steps with the cancelled job and trained on alone after.
    assert_eq!(pack_jobs(2), Some(2.0), "{}", cluster.worker_log("pack"));
    assert_eq!(pack_jobs(40), Some(1.0), "the cancelled job left the pack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_dataset_line_fails_the_job_with_the_file_and_line_number() {
    let cluster = Cluster::start(Duration::from_secs(5)).await;
    let mut client = cluster.client().await;
    let bad = cluster.dir.path().join("broken.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"a fine film\", \"label\": 1}\n{\"text\": \"dull\", \"label\": 0}\n{\"text\": \"oops\", \"label\": \n",
    )
    .unwrap();
    let train = upload(&mut client, &bad).await;
    let eval = upload(&mut client, &sst2("dev.jsonl")).await;
    let job = client
        .submit_job(v1::SubmitJobRequest { spec: Some(sst2_spec(&train, &eval, 5)) })
        .await
        .expect("lines that are not JSON are left to the worker")
        .into_inner()
        .job
        .unwrap();
    let _worker = cluster.spawn_worker("w1");
    let failed = wait_for(&mut client, &job.id, Duration::from_secs(120), "finished", |j| state(j).is_terminal()).await;
    assert_eq!(state(&failed), JobState::Failed);
    assert!(failed.error.contains("line 3"), "error should name the line: {:?}", failed.error);
    assert!(failed.error.contains("broken.jsonl"), "error should name the file: {:?}", failed.error);
    assert_eq!(failed.attempts, 1, "bad data is not retried");
}

trait Terminal {
    fn is_terminal(self) -> bool;
}

impl Terminal for JobState {
    fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// Starts worker "w1" and waits until it has asked for work.
async fn asking_worker(cluster: &Cluster, pool: &sqlx::PgPool) -> WorkerProcess {
    let worker = cluster.spawn_worker("w1");
    let asked = "SELECT count(*) FROM workers WHERE polled_at IS NOT NULL";
    let deadline = Instant::now() + Duration::from_secs(60);
    while sqlx::query_scalar::<_, i64>(asked).fetch_one(pool).await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "the worker never asked for work:\n{}", cluster.worker_log("w1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_long_polls_and_the_call_waiting_when_a_job_is_submitted_leases_it() {
    let cluster = Cluster::start(Duration::from_secs(5)).await;
    let mut client = cluster.client().await;
    let pool = sqlx::PgPool::connect(&cluster.db.url).await.unwrap();
    let _worker = asking_worker(&cluster, &pool).await;

    let job = submit_sst2(&mut client, 40).await;
    wait_for(&mut client, &job.id, Duration::from_secs(60), "running", |j| state(j) != JobState::Queued).await;
    // A worker records when it asks for work; the job leases while the worker
    // trains it, without asking again. A worker polling would have asked
    // after the job was queued; the long-poll waiting then got it.
    let (before, asked_at, queued_at): (bool, String, String) = sqlx::query_as(
        "SELECT w.polled_at < j.created_at, w.polled_at::text, j.created_at::text FROM workers w, jobs j \
         WHERE j.id = $1::uuid",
    )
    .bind(&job.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(before, "the call that leased the job asked at {asked_at}, after it was queued at {queued_at}");
    let done = wait_for(&mut client, &job.id, Duration::from_secs(240), "finished", |j| state(j).is_terminal()).await;
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.error);
}

/// Heartbeat calls the coordinator has answered, from its `/metrics`.
async fn heartbeats_answered(cluster: &Cluster) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = cluster.coordinator.as_ref().unwrap().http_addr;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        cluster.tokens.admin
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .lines()
        .filter(|l| l.starts_with("ptune_grpc_requests_total{") && l.contains("method=\"Heartbeat\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_sends_no_heartbeats_stays_online_and_registers_again_when_forgotten() {
    let cluster = Cluster::start(Duration::from_secs(2)).await;
    let mut client = cluster.client().await;
    let pool = sqlx::PgPool::connect(&cluster.db.url).await.unwrap();
    let _worker = asking_worker(&cluster, &pool).await;

    // 4 s idle: heartbeats were due every 300 ms, its lease calls keep it online instead.
    let before = heartbeats_answered(&cluster).await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let workers = client.list_workers(v1::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
        assert!(workers.iter().all(|w| w.online), "an idle worker went offline (lease timeout 2 s): {workers:?}");
    }
    assert_eq!(heartbeats_answered(&cluster).await - before, 0, "an idle worker heartbeat");

    // The coordinator forgets it (say, a database restored from a backup): its next lease call registers it again.
    sqlx::query("DELETE FROM workers").execute(&pool).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM workers").fetch_one(&pool).await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "the forgotten worker never registered again:\n{}", cluster.worker_log("w1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Uploads SST-2 and submits a prompt-tuning job of `max_steps` on it.
async fn submit_sst2(client: &mut JobServiceClient<AuthChannel>, max_steps: u64) -> v1::Job {
    let train = upload(client, &sst2("train.jsonl")).await;
    let eval = upload(client, &sst2("dev.jsonl")).await;
    client
        .submit_job(v1::SubmitJobRequest { spec: Some(sst2_spec(&train, &eval, max_steps)) })
        .await
        .expect("valid spec is accepted")
        .into_inner()
        .job
        .unwrap()
}

/// A log line without its ANSI colour codes (`ESC [ ... m`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_starting_together_on_one_dataset_all_get_it_whole_a_damaged_cache_is_fetched_again_and_failed_downloads_leave_nothing() {
    let cluster = Cluster::start(Duration::from_secs(5)).await;
    let mut client = cluster.client().await;
    let source = sst2("train.jsonl");
    let reference = upload(&mut client, &source).await;
    let work_dir = cluster.dir.path().join("fetcher");
    // Datasets go to the holder of a lease of a job that uses them.
    let job = client
        .submit_job(v1::SubmitJobRequest { spec: Some(sst2_spec(&reference, &reference, 10)) })
        .await
        .expect("valid spec")
        .into_inner()
        .job
        .unwrap();
    let options = ptune_proto::client::ClientOptions { token: Some(cluster.tokens.worker.clone()), ..Default::default() };
    let mut workers = v1::worker_service_client::WorkerServiceClient::new(ptune_proto::client::channel(&cluster.url(), &options).unwrap());
    let registration = v1::RegisterWorkerRequest {
        hostname: "fetcher".into(),
        slots: 1,
        models: vec![v1::BaseModel { name: MODEL.into(), max_positions: 512, ..Default::default() }],
        ..Default::default()
    };
    let worker_id = workers.register_worker(registration).await.expect("register").into_inner().worker_id;
    let lease = workers
        .lease_job(v1::LeaseJobRequest { worker_id, free_slots: 1, ..Default::default() })
        .await
        .expect("lease")
        .into_inner()
        .lease
        .expect("the job is leased");
    assert_eq!(lease.job_id, job.id);
    let fetches = (0..4).map(|_| {
        let (url, reference, work_dir, lease, options) =
            (cluster.url(), reference.clone(), work_dir.clone(), lease.clone(), options.clone());
        tokio::spawn(async move {
            let coordinators = ptune_worker::agent::Coordinators::new(&url, options).await.expect("coordinator address");
            ptune_worker::agent::datasets::fetch(&coordinators, &reference, &lease, &work_dir, &Directive::default()).await
        })
    });
    let expected = std::fs::read(&source).unwrap();
    for fetched in futures::future::join_all(fetches).await {
        let dataset = fetched.unwrap().expect("every job gets the dataset");
        assert_eq!(std::fs::read(&dataset.path).unwrap(), expected);
        assert_eq!(dataset.file_name, "train.jsonl");
    }
    // A cached copy that no longer hashes to its reference is fetched again.
    let coordinators = ptune_worker::agent::Coordinators::new(&cluster.url(), options).await.expect("coordinator address");
    let cached = work_dir.join("datasets").join(format!("{}.jsonl", reference.trim_start_matches("sha256:")));
    let mut damaged = expected.clone();
    damaged[10] ^= 0x20;
    std::fs::write(&cached, &damaged).unwrap();
    let again = ptune_worker::agent::datasets::fetch(&coordinators, &reference, &lease, &work_dir, &Directive::default())
        .await
        .expect("a damaged cache is fetched again");
    assert_eq!(std::fs::read(&again.path).unwrap(), expected, "the damaged copy was used");
    // A dataset the lease does not cover fails, and leaves nothing behind.
    let unknown = format!("sha256:{}", "0".repeat(64));
    let refused = ptune_worker::agent::datasets::fetch(&coordinators, &unknown, &lease, &work_dir, &Directive::default()).await;
    assert!(refused.is_err());
    let left: Vec<_> = std::fs::read_dir(work_dir.join("datasets"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".partial"))
        .collect();
    assert!(left.is_empty(), "partial downloads left behind: {left:?}");
}
