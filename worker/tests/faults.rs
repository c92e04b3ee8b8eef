//! The fault-injection suite: real coordinator and worker processes, real
//! PostgreSQL, MiniLM training SST-2, and real faults (kill -9, SIGTERM,
//! a private PostgreSQL stopped in immediate mode, a TCP proxy that cuts a
//! worker off, fault hooks that panic, abort, hang or fill the disk).
//!
//! Needs the worker built with `--features fault-injection` (the hooks
//! exist only then): `cargo test -p ptune-worker --features fault-injection
//! --test faults`, which `scripts/test.sh` runs. Each scenario prints a
//! `RELIABILITY |` row for `docs/reliability.md`.

#![cfg(feature = "fault-injection")]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::faults::*;
use ptune_coordinator::testing::fresh_database;
use ptune_proto::v1::{self, JobState};
use rand::{Rng, SeedableRng};

const LEASE_MS: u64 = 3000;
/// Checkpoints (uploaded) every 5 steps besides those of the evaluations.
const EVERY_5: &str = "checkpoint_every = 5";

/// The worker id a worker process registered under.
fn worker_id(worker: &WorkerProcess) -> String {
    std::fs::read_to_string(worker.work_dir.join("worker_id")).unwrap_or_default().trim().to_string()
}

/// The job a worker holds an open attempt of, if any.
async fn held_job(database_url: &str, worker: &str) -> Option<String> {
    if worker.is_empty() {
        return None;
    }
    let sql = "SELECT job_id::text FROM job_attempts WHERE ended_at IS NULL AND worker_id = $1::uuid";
    query_texts(database_url, sql, worker).await.into_iter().next()
}

/// The step of a job's stored checkpoint (0: none).
async fn stored_step(database_url: &str, job: &str) -> u64 {
    let sql = "SELECT coalesce(max(step), 0)::text FROM job_checkpoints WHERE job_id = $1::uuid AND complete";
    query_texts(database_url, sql, job).await[0].parse().unwrap()
}

/// Trains one job of the suite's spec without any fault and returns its
/// training losses and final eval loss: what every interrupted job must
/// reproduce.
async fn reference_run(
    dir: &std::path::Path,
    models: &std::path::Path,
    coordinator: &CoordinatorProcess,
    spec: v1::JobSpec,
) -> (Vec<(u64, f64)>, f64) {
    let mut client = coordinator.client().await;
    let job = submit(&mut client, spec).await;
    let _clean = WorkerProcess::start(dir, "reference-worker", models, &coordinator.url(), 1, "");
    let done = wait_for(&mut client, &job.id, Duration::from_secs(300), "finished", |j| state(j) as i32 >= 3).await;
    assert_eq!(state(&done), JobState::Succeeded, "the reference job failed: {}", done.error);
    (train_losses(&mut client, &job.id).await, final_eval_loss(&done))
}

fn assert_same_run(name: &str, losses: &[(u64, f64)], eval_loss: f64, reference: &(Vec<(u64, f64)>, f64)) {
    assert_eq!(losses.len(), reference.0.len(), "{name}: one loss per step, none lost or doubled: {losses:?}");
    for ((step, loss), (ref_step, ref_loss)) in losses.iter().zip(&reference.0) {
        assert_eq!(step, ref_step, "{name}");
        assert!((loss - ref_loss).abs() <= 1e-6, "{name}: loss at step {step} is {loss}, uninterrupted {ref_loss}");
    }
    assert!((eval_loss - reference.1).abs() <= 1e-6, "{name}: final eval loss {eval_loss}, uninterrupted {}", reference.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_at_twenty_points_lose_no_job_and_each_resumes_from_its_last_checkpoint() {
    let Scene { dir, db, coordinator, mut client, train, eval, models } = Scene::start(LEASE_MS, &[]).await;
    let steps = 40;
    let reference = reference_run(dir.path(), &models, &coordinator, spec("reference", &train, &eval, steps, EVERY_5)).await;

    let watcher = Watcher::start(&db.url);
    let mut jobs = Vec::new();
    for i in 0..20 {
        jobs.push(submit(&mut client, spec(&format!("kill-{i:02}"), &train, &eval, steps, EVERY_5)).await.id);
    }
    // A worker that is never killed takes what the victims leave.
    let _rescuer = WorkerProcess::start(dir.path(), "rescuer", &models, &coordinator.url(), 1, "");
    let mut rng = rand::rngs::StdRng::seed_from_u64(20);
    let kinds = ["mid-step", "mid-checkpoint", "mid-dataset-download", "mid-adapter-upload"];
    let mut kills = Vec::new();
    for i in 0..20 {
        let kind = kinds[i % 4];
        let faults = match kind {
            "mid-checkpoint" => format!("pause@checkpoint,step={},ms=120000", 5 * rng.gen_range(1..8)),
            "mid-dataset-download" => "pause@download,ms=120000".to_string(),
            "mid-adapter-upload" => "pause@upload,ms=120000".to_string(),
            _ => String::new(),
        };
        let mut victim = WorkerProcess::start(dir.path(), &format!("victim-{i:02}"), &models, &coordinator.url(), 1, &faults);
        let kill_after_step = rng.gen_range(3..35);
        let deadline = Instant::now() + Duration::from_secs(240);
        let held = loop {
            assert!(Instant::now() < deadline, "victim {i} ({kind}) never reached its point; log:\n{}", victim.log());
            let held = held_job(&db.url, &worker_id(&victim)).await;
            let reached = match (kind, &held) {
                (_, None) => false,
                ("mid-step", Some(job)) => get(&mut client, job).await.step >= kill_after_step,
                _ => victim.log().contains("fault injected"),
            };
            if reached {
                break held.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(20..120))).await;
        };
        let checkpoint = stored_step(&db.url, &held).await;
        victim.kill9();
        kills.push((held, kind, checkpoint, Instant::now()));
    }

    let mut succeeded = 0;
    let mut finished = HashMap::new();
    for id in &jobs {
        let done = wait_for(&mut client, id, Duration::from_secs(600), "finished", |j| state(j) as i32 >= 3).await;
        if state(&done) == JobState::Succeeded {
            succeeded += 1;
        }
        finished.insert(id.clone(), done);
    }
    let (violations, checks) = watcher.finish().await;
    assert!(checks > 100, "the watcher ran {checks} checks");
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(succeeded, 20, "every job succeeds: {:?}", finished.values().map(|j| &j.error).collect::<Vec<_>>());

    // Each killed attempt's job went on from the checkpoint stored when it died.
    let logs: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| read_log(&e.path()))
        .collect();
    for (job, kind, checkpoint, _) in &kills {
        if *checkpoint == 0 {
            continue;
        }
        let resumed = logs.iter().flat_map(|l| l.lines()).any(|line| {
            line.contains(job.as_str())
                && (line.contains("resuming from the stored checkpoint") || line.contains("as new as the stored one"))
                && line.split("step=").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse::<u64>().ok())
                    >= Some(*checkpoint)
        });
        assert!(resumed, "job {job} killed {kind} with checkpoint {checkpoint} stored did not resume from it");
    }
    // And trained exactly as if it had never been interrupted.
    let mut adapters = 0;
    for id in &jobs {
        let done = &finished[id];
        let losses = train_losses(&mut client, id).await;
        assert_same_run(&done.spec.as_ref().unwrap().name, &losses, final_eval_loss(done), &reference);
        adapters += usize::from(!done.adapter_sha256.is_empty());
    }
    let with_checkpoint = kills.iter().filter(|k| k.2 > 0).count();
    assert!(with_checkpoint >= 5, "kills came after a checkpoint was stored: {with_checkpoint}");
    let interruptions: u32 = finished.values().map(|j| j.interruptions).sum();
    let failures: u32 = finished.values().map(|j| j.failures).sum();
    assert_eq!(failures, 0, "a killed worker is an interruption, not an error of the job");
    assert!(interruptions >= 20, "every kill interrupted an attempt: {interruptions}");
    let recover = recovery_times(&db.url, &kills).await;
    report(
        "kill -9 a worker at 20 points (5 each mid-step, mid-checkpoint, mid-dataset-download, mid-adapter-upload)",
        20,
        jobs.len(),
        jobs.len() - succeeded,
        adapters.saturating_sub(jobs.len()) + violations.len(),
        &format!("{failures} failures, {interruptions} interruptions; {with_checkpoint} resumed from a stored checkpoint"),
        &recover,
    );
}

/// From each kill to the next lease of its job: median and max.
async fn recovery_times(database_url: &str, kills: &[(String, &str, u64, Instant)]) -> String {
    let mut seconds = Vec::new();
    for (job, _, _, at) in kills {
        // The attempt after the killed one was leased `ago` seconds before now.
        let sql = "SELECT extract(epoch FROM now() - leased_at)::text FROM job_attempts WHERE job_id = $1::uuid \
                   ORDER BY attempt";
        let ages: Vec<f64> = query_texts(database_url, sql, job).await.iter().map(|s| s.parse().unwrap()).collect();
        let since_kill = at.elapsed().as_secs_f64();
        if let Some(next) = ages.iter().filter(|&&age| age < since_kill).copied().reduce(f64::max) {
            seconds.push(since_kill - next);
        }
    }
    seconds.sort_by(f64::total_cmp);
    match (seconds.get(seconds.len() / 2), seconds.last()) {
        (Some(median), Some(max)) => format!("next lease {median:.1} s after the kill (median), {max:.1} s (max)"),
        _ => "n/a".into(),
    }
}

/// The jobs' states, by id.
async fn states(client: &mut ptune_proto::v1::job_service_client::JobServiceClient<ptune_proto::client::AuthChannel>, ids: &[String]) -> Vec<v1::Job> {
    let mut jobs = Vec::new();
    for id in ids {
        jobs.push(get(client, id).await);
    }
    jobs
}

/// How each attempt of a job ended, in order.
async fn outcomes(database_url: &str, job: &str) -> Vec<String> {
    let sql = "SELECT coalesce(outcome, 'open') FROM job_attempts WHERE job_id = $1::uuid ORDER BY attempt";
    query_texts(database_url, sql, job).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_four_packed_jobs_back_at_once_and_they_resume_elsewhere_from_the_drain_checkpoint() {
    let Scene { dir, db, coordinator, mut client, train, eval, models } = Scene::start(LEASE_MS, &[]).await;
    let steps = 60;
    let mut ids = Vec::new();
    for i in 0..4 {
        // Checkpoints only at evaluations (20, 40, 60): the drain writes its own.
        ids.push(submit(&mut client, spec(&format!("drain-{i}"), &train, &eval, steps, "")).await.id);
    }
    let mut first = WorkerProcess::start(dir.path(), "drained", &models, &coordinator.url(), 4, "");
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let jobs = states(&mut client, &ids).await;
        if jobs.iter().all(|j| state(j) == JobState::Running && (5..15).contains(&j.step)) {
            break;
        }
        assert!(jobs.iter().all(|j| j.step < 15), "the jobs ran past the drain point before all four ran: {jobs:?}");
        assert!(Instant::now() < deadline, "the four jobs never ran together; log:\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let packed = first.log().lines().any(|l| l.contains("joined the pack"));
    assert!(packed, "the four jobs share one pack:\n{}", first.log());

    let signalled = Instant::now();
    first.sigterm();
    let requeued = loop {
        let jobs = states(&mut client, &ids).await;
        if jobs.iter().all(|j| state(j) == JobState::Queued) {
            break jobs;
        }
        assert!(signalled.elapsed() < Duration::from_secs(10), "not every job was handed back: {jobs:?}\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let handed_back = signalled.elapsed();
    assert!(handed_back < Duration::from_secs(2), "handing back took {handed_back:?}");
    for job in &requeued {
        assert_eq!((job.attempts, job.failures, job.interruptions), (1, 0, 1), "{job:?}");
        assert!(job.checkpoint_step >= 5 && job.checkpoint_step % 20 != 0, "the drain checkpoint is stored: {job:?}");
        assert!(job.retry_at.is_empty(), "queued at once");
        assert_eq!(outcomes(&db.url, &job.id).await, ["released"]);
    }
    assert_eq!(first.wait_exit(Duration::from_secs(20)).await, Some(0), "the drained worker exits cleanly:\n{}", first.log());

    let second = WorkerProcess::start(dir.path(), "second", &models, &coordinator.url(), 4, "");
    for job in &requeued {
        let done = wait_for(&mut client, &job.id, Duration::from_secs(300), "finished", |j| state(j) as i32 >= 3).await;
        assert_eq!(state(&done), JobState::Succeeded, "{}", done.error);
        assert_eq!((done.attempts, done.failures, done.interruptions), (2, 0, 1));
        let steps_seen: Vec<u64> = train_losses(&mut client, &job.id).await.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps_seen, (1..=steps).collect::<Vec<_>>(), "every step's loss, once");
        let resumed = format!("step={}", job.checkpoint_step);
        second.wait_log(&["resuming from the stored checkpoint", &job.id, &resumed], Duration::from_secs(1)).await;
    }
    report(
        "SIGTERM a worker running 4 packed jobs",
        1,
        4,
        0,
        0,
        "0 failures, 4 interruptions (released)",
        &format!("all 4 queued {:.2} s after the signal, drain checkpoint stored", handed_back.as_secs_f64()),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_signalled_before_it_reaches_a_coordinator_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let models = models_dir(dir.path());
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let mut worker = WorkerProcess::start(dir.path(), "lonely", &models, &nowhere, 1, "");
    worker.wait_log(&["retrying registration"], Duration::from_secs(30)).await;
    let signalled = Instant::now();
    worker.sigterm();
    assert_eq!(worker.wait_exit(Duration::from_secs(5)).await, Some(0), "log:\n{}", worker.log());
    assert!(signalled.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_fails_over_to_another_coordinator_without_losing_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await.unwrap();
    let mut a = CoordinatorProcess::start(dir.path(), "coordinator-a", &db.url, LEASE_MS, &[]);
    let b = CoordinatorProcess::start(dir.path(), "coordinator-b", &db.url, LEASE_MS, &[]);
    let mut client = b.client().await;
    let (train, eval) = upload_sst2(&mut client).await;
    let models = models_dir(dir.path());
    let job = submit(&mut client, spec("failover", &train, &eval, 60, EVERY_5)).await;
    let worker = WorkerProcess::start(dir.path(), "worker", &models, &format!("{},{}", a.url(), b.url()), 1, "");
    wait_for(&mut client, &job.id, Duration::from_secs(120), "running", |j| j.step >= 5).await;
    a.kill9();
    let done = wait_for(&mut client, &job.id, Duration::from_secs(240), "finished", |j| state(j) as i32 >= 3).await;
    assert_eq!(state(&done), JobState::Succeeded, "{}\n{}", done.error, worker.log());
    assert_eq!((done.attempts, done.interruptions), (1, 0), "the lease survived the coordinator's death");
    worker.wait_log(&["failing over"], Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_coordinator_during_an_asha_sweep_loses_nothing_and_takes_no_decision_twice() {
    use ptune_proto::v1::sweep_service_client::SweepServiceClient;
    let Scene { dir, db, mut coordinator, mut client, train, eval, models } = Scene::start(LEASE_MS, &[]).await;
    let definition = serde_json::json!({
        "name": "asha-under-fire",
        "max_concurrent_trials": 4,
        "objective": { "metric": "accuracy", "direction": "maximize" },
        "algorithm": { "type": "asha", "sampler": "grid", "num_trials": 6, "seed": 1, "resource": "steps",
                       "min_resource": 10, "max_resource": 90, "reduction_factor": 3 },
        "template": {
            "base_model": MODEL, "task": "sequence_classification", "method": "prompt_tuning",
            "data": { "train": train, "eval": eval, "labels": [0, 1], "max_seq_len": 32,
                      "max_train_examples": 640, "max_eval_examples": 64 },
            "training": { "batch_size": 16, "seed": 3, "checkpoint_every": 5 },
        },
        "space": {
            "peft.num_virtual_tokens": { "values": [4, 8, 16] },
            "training.learning_rate": { "values": [1e-2, 3e-2] },
        },
    });
    let mut sweeps = SweepServiceClient::new(ptune_coordinator::testing::channel(
        &coordinator.url(),
        &read_token(dir.path(), "admin").expect("the admin token"),
    ));
    let sweep = sweeps
        .create_sweep(v1::CreateSweepRequest { definition_json: definition.to_string() })
        .await
        .expect("a valid sweep")
        .into_inner();
    let _w1 = WorkerProcess::start(dir.path(), "w1", &models, &coordinator.url(), 2, "");
    let _w2 = WorkerProcess::start(dir.path(), "w2", &models, &coordinator.url(), 2, "");
    let trials = v1::ListJobsRequest { sweep_id: sweep.id.clone(), page_size: 100, ..Default::default() };
    let mut downtimes = Vec::new();
    for downtime in [0u64, 20, 60] {
        // Kill while trials train.
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let jobs = client.list_jobs(trials.clone()).await.unwrap().into_inner().jobs;
            if jobs.iter().filter(|j| state(j) == JobState::Running && j.step >= 3).count() >= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "no trials running before the kill: {jobs:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        coordinator.kill9();
        tokio::time::sleep(Duration::from_secs(downtime)).await;
        coordinator.restart();
        client = coordinator.client().await;
        downtimes.push(downtime);
    }
    let mut sweeps = SweepServiceClient::new(ptune_coordinator::testing::channel(
        &coordinator.url(),
        &read_token(dir.path(), "admin").expect("the admin token"),
    ));
    let deadline = Instant::now() + Duration::from_secs(600);
    let finished = loop {
        let now = sweeps.get_sweep(v1::GetSweepRequest { sweep_id: sweep.id.clone() }).await.unwrap().into_inner();
        if now.state() != v1::SweepState::Running {
            break now;
        }
        assert!(Instant::now() < deadline, "the sweep never finished: {now:?}\n{}", coordinator.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(finished.state(), v1::SweepState::Completed, "{}", finished.error);
    let jobs = client.list_jobs(trials).await.unwrap().into_inner().jobs;
    let mut indexes: Vec<u32> = jobs.iter().map(|j| j.trial_index).collect();
    indexes.sort();
    assert_eq!(indexes, (0..6).collect::<Vec<_>>(), "every trial index exactly once");
    for job in &jobs {
        assert_eq!(job.attempts, 1, "trial {} kept its first attempt: {job:?}", job.trial_index);
        assert!(matches!(state(job), JobState::Succeeded | JobState::Cancelled), "{job:?}");
    }
    let per_rung = query_texts(
        &db.url,
        "SELECT count(*)::text FROM asha_decisions WHERE sweep_id = $1::uuid GROUP BY trial_index, rung HAVING count(*) > 1",
        &sweep.id,
    )
    .await;
    assert!(per_rung.is_empty(), "a (trial, rung) decision was taken twice");
    let decisions = query_texts(&db.url, "SELECT count(*)::text FROM asha_decisions WHERE sweep_id = $1::uuid", &sweep.id).await;
    let expired = query_texts(
        &db.url,
        "SELECT count(*)::text FROM job_attempts a JOIN jobs j ON j.id = a.job_id \
         WHERE j.sweep_id = $1::uuid AND a.outcome = 'lease_expired'",
        &sweep.id,
    )
    .await;
    assert_eq!(expired, ["0"], "no lease was lost to the coordinator's absence");
    report(
        "kill -9 the coordinator during an ASHA sweep (0, 20 and 60 s down)",
        3,
        jobs.len(),
        0,
        0,
        &format!("0 failures, 0 interruptions; {} rung decisions, each once", decisions[0]),
        "running trials kept attempt 1; the sweep completed",
    );
}

/// What a client saw while probing the coordinator.
#[derive(Default, Debug)]
struct Probe {
    /// Status codes of failed calls, with how many.
    codes: HashMap<String, u32>,
    /// Health answers seen, in order of change.
    health: Vec<String>,
}

/// Calls GetJob and the health check every 100 ms until `stop` is set.
fn probe_calls(
    url: String,
    token: String,
    job: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Probe> {
    use tonic_health::pb::health_client::HealthClient;
    tokio::spawn(async move {
        let mut probe = Probe::default();
        let channel = ptune_coordinator::testing::channel(&url, &token);
        let mut jobs = v1::job_service_client::JobServiceClient::new(channel.clone());
        let mut health = HealthClient::new(channel);
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let call = tokio::time::timeout(Duration::from_secs(10), jobs.get_job(v1::GetJobRequest { job_id: job.clone() }));
            match call.await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => *probe.codes.entry(format!("{:?}", status.code())).or_default() += 1,
                Err(_) => *probe.codes.entry("no answer in 10 s".into()).or_default() += 1,
            }
            let check = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
            let answer = match check {
                Ok(r) => format!("{:?}", r.into_inner().status()),
                Err(status) => format!("error {:?}", status.code()),
            };
            if probe.health.last() != Some(&answer) {
                probe.health.push(answer);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        probe
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_5_and_30_seconds_requeues_nothing_and_loses_no_metric() {
    let dir = tempfile::tempdir().unwrap();
    let postgres = PrivatePostgres::start(dir.path());
    // A coordinator started before its database waits for it, answering UNAVAILABLE.
    postgres.down_immediate();
    let mut coordinator = CoordinatorProcess::start(dir.path(), "coordinator", &postgres.url(), LEASE_MS, &[]);
    // No token exists yet: the call is refused for the database before it is checked.
    let channel = ptune_coordinator::testing::channel(&coordinator.url(), "none yet");
    let mut early = v1::job_service_client::JobServiceClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        match early.list_jobs(v1::ListJobsRequest::default()).await {
            Err(status) if status.code() == tonic::Code::Unavailable && status.message().contains("waiting for its database") => {
                break status;
            }
            other => assert!(Instant::now() < deadline, "no UNAVAILABLE while waiting for the database: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(coordinator.alive(), "the coordinator exited without its database:\n{}", coordinator.log());
    postgres.up();
    let mut client = coordinator.client().await;
    drop(waiting);
    let (train, eval) = upload_sst2(&mut client).await;
    let models = models_dir(dir.path());
    let steps = 300;
    let mut ids = Vec::new();
    for i in 0..2 {
        ids.push(submit(&mut client, spec(&format!("outage-{i}"), &train, &eval, steps, EVERY_5)).await.id);
    }
    let worker = WorkerProcess::start(dir.path(), "worker", &models, &coordinator.url(), 2, "");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !states(&mut client, &ids).await.iter().all(|j| state(j) == JobState::Running && j.step >= 5) {
        assert!(Instant::now() < deadline, "the jobs never ran; log:\n{}", worker.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut outages = Vec::new();
    for seconds in [5u64, 30] {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let admin = read_token(dir.path(), "admin").expect("the admin token");
        let probe = probe_calls(coordinator.url(), admin, ids[0].clone(), stop.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        postgres.down_immediate();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        assert!(coordinator.alive(), "the coordinator exited during the outage:\n{}", coordinator.log());
        let running = states_during(&mut client).await;
        postgres.up();
        let back = Instant::now();
        // Wait for the coordinator to serve again.
        while client.get_job(v1::GetJobRequest { job_id: ids[0].clone() }).await.is_err() {
            assert!(back.elapsed() < Duration::from_secs(30), "the coordinator did not come back:\n{}", coordinator.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let serving_again = back.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let probe = probe.await.unwrap();
        assert!(probe.codes.keys().all(|code| code == "Unavailable"), "during a {seconds} s outage: {probe:?}");
        assert!(probe.codes.get("Unavailable").copied().unwrap_or(0) > 0, "calls during the outage failed: {probe:?}");
        assert_eq!(probe.health, ["Serving", "NotServing", "Serving"], "health during a {seconds} s outage");
        assert!(running.is_err(), "the outage was visible to clients");
        for job in states(&mut client, &ids).await {
            assert_eq!(job.attempts, 1, "no job was requeued by a {seconds} s outage: {job:?}");
        }
        outages.push((seconds, serving_again));
    }
    for id in &ids {
        let done = wait_for(&mut client, id, Duration::from_secs(600), "finished", |j| state(j) as i32 >= 3).await;
        assert_eq!(state(&done), JobState::Succeeded, "{}", done.error);
        assert_eq!((done.attempts, done.interruptions, done.failures), (1, 0, 0));
        assert_eq!(outcomes(&postgres.url(), id).await, ["succeeded"]);
        let steps_seen: Vec<u64> = train_losses(&mut client, id).await.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps_seen, (1..=steps).collect::<Vec<_>>(), "every step's metrics, recorded once");
    }
    coordinator.kill9();
    report(
        "PostgreSQL stopped (immediate) for 5 s and for 30 s while 2 jobs train",
        2,
        ids.len(),
        0,
        0,
        "0 failures, 0 interruptions: both jobs kept attempt 1",
        &format!(
            "serving {:.1} s and {:.1} s after PostgreSQL came back; calls during the outages got UNAVAILABLE",
            outages[0].1.as_secs_f64(),
            outages[1].1.as_secs_f64()
        ),
    );
}

/// A call made while the database is down.
async fn states_during(
    client: &mut ptune_proto::v1::job_service_client::JobServiceClient<ptune_proto::client::AuthChannel>,
) -> Result<(), tonic::Status> {
    client.list_jobs(v1::ListJobsRequest::default()).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_worker_loses_its_job_to_another_and_is_refused_when_the_link_heals() {
    let Scene { dir, db, coordinator, mut client, train, eval, models } = Scene::start(LEASE_MS, &[]).await;
    let job = submit(&mut client, spec("partitioned", &train, &eval, 80, EVERY_5)).await;
    let proxy = TcpProxy::start(coordinator.grpc).await;
    let cut_off = WorkerProcess::start(dir.path(), "cut-off", &models, &proxy.url(), 1, "");
    wait_for(&mut client, &job.id, Duration::from_secs(120), "past a stored checkpoint", |j| j.checkpoint_step >= 5).await;
    let rescuer = WorkerProcess::start(dir.path(), "rescuer", &models, &coordinator.url(), 1, "");

    proxy.cut();
    let cut_at = Instant::now();
    let moved = wait_for(&mut client, &job.id, Duration::from_secs(60), "leased to the rescuer", |j| j.attempts == 2).await;
    let recovered = cut_at.elapsed();
    // Three lease periods apart.
    tokio::time::sleep(Duration::from_millis(3 * LEASE_MS).saturating_sub(cut_at.elapsed())).await;
    proxy.heal();
    let healed = Instant::now();
    // Told by its first heartbeat (or its first refused report), whichever comes first.
    while !cut_off.log().lines().any(|l| {
        l.contains(&job.id) && (l.contains("coordinator asked to stop job") || l.contains("lease lost; stopping the job"))
    }) {
        assert!(healed.elapsed() < Duration::from_secs(30), "the cut-off worker never stopped:\n{}", cut_off.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped_after = healed.elapsed();

    let done = wait_for(&mut client, &job.id, Duration::from_secs(240), "finished", |j| state(j) as i32 >= 3).await;
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.error);
    assert_eq!(outcomes(&db.url, &job.id).await, ["lease_expired", "succeeded"]);
    let uploaded = rescuer.wait_log(&["uploading adapter", &job.id], Duration::from_secs(1)).await;
    assert!(uploaded.contains(&done.adapter_sha256), "the stored adapter is the rescuer's: {uploaded}");
    let completed_by = query_texts(
        &db.url,
        "SELECT worker_id::text FROM job_attempts WHERE job_id = $1::uuid AND outcome = 'succeeded'",
        &job.id,
    )
    .await;
    assert_eq!(completed_by, [worker_id(&rescuer)], "the attempt that stored the adapter is the rescuer's");
    assert!(stopped_after < Duration::from_secs(2), "the cut-off worker stopped {stopped_after:?} after the link healed");
    assert_eq!(moved.interruptions, 1);
    report(
        "partition a worker from the coordinator for 3 lease periods",
        1,
        1,
        0,
        0,
        "0 failures, 1 interruption",
        &format!(
            "leased to another worker {:.1} s after the cut; the cut-off worker stopped {:.1} s after the link healed",
            recovered.as_secs_f64(),
            stopped_after.as_secs_f64()
        ),
    );
}

/// Seconds between one attempt's end and the next one's lease, per gap.
async fn attempt_gaps(database_url: &str, job: &str) -> Vec<f64> {
    let sql = "SELECT extract(epoch FROM a.leased_at - p.ended_at)::text FROM job_attempts a \
               JOIN job_attempts p ON p.job_id = a.job_id AND p.attempt = a.attempt - 1 \
               WHERE a.job_id = $1::uuid ORDER BY a.attempt";
    query_texts(database_url, sql, job).await.iter().map(|s| s.parse().unwrap()).collect()
}

/// The worker that ended a job's last attempt successfully.
async fn completed_by(database_url: &str, job: &str) -> Vec<String> {
    let sql = "SELECT worker_id::text FROM job_attempts WHERE job_id = $1::uuid AND outcome = 'succeeded'";
    query_texts(database_url, sql, job).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_jobs_fail_after_max_attempts_with_growing_gaps_and_the_worker_goes_on() {
    // A longer lease, so a worker restarted after an abort reports it before the lease expires.
    let Scene { dir, db, coordinator, mut client, train, eval, models } = Scene::start(10_000, &["--retry-backoff-ms=1000"]).await;
    let mut rows = Vec::new();

    for (fault, name) in [("panic", "poison-panic"), ("abort", "poison-abort")] {
        let faults = format!("{fault}@step,job={name},step=3");
        let mut worker = WorkerProcess::start(dir.path(), &format!("{fault}-worker"), &models, &coordinator.url(), 1, &faults);
        let poison = submit(&mut client, spec(name, &train, &eval, 20, "")).await;
        let started = Instant::now();
        let mut restarts = 0;
        let failed = loop {
            let job = get(&mut client, &poison.id).await;
            if state(&job) as i32 >= 3 {
                break job;
            }
            if !worker.alive() {
                // A supervisor (Kubernetes, systemd) starts the same worker again.
                worker.restart();
                restarts += 1;
            }
            assert!(started.elapsed() < Duration::from_secs(240), "{name} never failed: {job:?}\n{}", worker.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(state(&failed), JobState::Failed);
        assert_eq!((failed.attempts, failed.failures, failed.interruptions), (3, 3, 0), "{failed:?}");
        let expected = match fault {
            "panic" => "the engine panicked while training this job: injected fault",
            _ => "the worker process stopped while training this job (after step 2)",
        };
        assert!(failed.error.starts_with("failed 3 times; last: ") && failed.error.contains(expected), "{}", failed.error);
        let gaps = attempt_gaps(&db.url, &poison.id).await;
        assert!(gaps[0] >= 1.0 && gaps[1] >= 2.0 && gaps[1] > gaps[0], "{name}: gaps between attempts grow: {gaps:?}");
        if fault == "abort" {
            assert_eq!(restarts, 3, "the worker died at each attempt");
        }

        // The same worker then trains a healthy job.
        let healthy = submit(&mut client, spec(&format!("after-{name}"), &train, &eval, 20, "")).await;
        let done = wait_for(&mut client, &healthy.id, Duration::from_secs(180), "finished", |j| state(j) as i32 >= 3).await;
        assert_eq!(state(&done), JobState::Succeeded, "{}", done.error);
        assert_eq!(completed_by(&db.url, &healthy.id).await, [worker_id(&worker)]);
        rows.push((fault, gaps));
    }

    // A job that hangs is caught by the watchdog, and its engine thread replaced.
    let worker = WorkerProcess::start(dir.path(), "hang-worker", &models, &coordinator.url(), 1, "hang@step,job=stuck,step=3");
    let mut stuck_spec = spec("stuck", &train, &eval, 20, "stall_timeout_seconds = 10");
    stuck_spec.max_attempts = 1;
    let stuck = submit(&mut client, stuck_spec).await;
    let failed = wait_for(&mut client, &stuck.id, Duration::from_secs(120), "finished", |j| state(j) as i32 >= 3).await;
    assert_eq!(state(&failed), JobState::Failed);
    assert!(failed.error.contains("stalled: no progress for 10 s after step 2"), "{}", failed.error);
    let healthy = submit(&mut client, spec("after-stuck", &train, &eval, 20, "")).await;
    let done = wait_for(&mut client, &healthy.id, Duration::from_secs(180), "finished", |j| state(j) as i32 >= 3).await;
    assert_eq!(state(&done), JobState::Succeeded, "{}\n{}", done.error, worker.log());
    assert_eq!(completed_by(&db.url, &healthy.id).await, [worker_id(&worker)]);
    worker.wait_log(&["engine thread stopped making progress"], Duration::from_secs(1)).await;

    for (fault, gaps) in rows {
        report(
            &format!("a poison job that {fault}s at step 3 (max_attempts 3, backoff 1 s)"),
            1,
            1,
            0,
            0,
            "3 failures, then failed",
            &format!("gaps between attempts {:.1} s and {:.1} s; the same worker then completed a job", gaps[0], gaps[1]),
        );
    }
    report("a job that hangs at step 3 (stall timeout 10 s)", 1, 1, 0, 0, "1 failure, then failed", "caught by the watchdog; the same worker then completed a job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_spends_one_interruption_keeps_the_checkpoint_and_stops_the_worker_leasing() {
    let Scene { dir, db, coordinator, mut client, train, eval, models } = Scene::start(LEASE_MS, &[]).await;
    let job = submit(&mut client, spec("full-disk", &train, &eval, 40, EVERY_5)).await;
    // The disk fills up once the job passed step 12: the checkpoint at step 15 cannot be written.
    let full = WorkerProcess::start(dir.path(), "full", &models, &coordinator.url(), 1, "enospc@write,step=12");
    let requeued = wait_for(&mut client, &job.id, Duration::from_secs(120), "requeued", |j| {
        state(j) == JobState::Queued && j.attempts == 1
    })
    .await;
    assert_eq!((requeued.failures, requeued.interruptions), (0, 1), "a full disk is the worker's fault: {requeued:?}");
    assert!(requeued.error.contains("No space left on device"), "{}", requeued.error);
    assert_eq!(requeued.checkpoint_step, 10, "the checkpoint before the disk filled up is stored");
    let local = std::fs::read_to_string(full.work_dir.join("checkpoints").join(&job.id).join("trainer_state.json"))
        .expect("the previous local checkpoint is intact");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&local).unwrap()["step"], 10);

    // The worker says why it takes nothing more, and takes nothing more.
    let deadline = Instant::now() + Duration::from_secs(10);
    let unhealthy = loop {
        let workers = client.list_workers(v1::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
        if let Some(w) = workers.into_iter().find(|w| !w.unhealthy_reason.is_empty()) {
            break w;
        }
        assert!(Instant::now() < deadline, "the worker never reported itself unhealthy:\n{}", full.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(unhealthy.unhealthy_reason.starts_with("disk full"), "{}", unhealthy.unhealthy_reason);
    let other = submit(&mut client, spec("after-full-disk", &train, &eval, 20, EVERY_5)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(state(&get(&mut client, &other.id).await), JobState::Queued, "the unhealthy worker leases nothing");
    assert_eq!(state(&get(&mut client, &job.id).await), JobState::Queued);

    let healthy = WorkerProcess::start(dir.path(), "healthy", &models, &coordinator.url(), 1, "");
    for id in [&job.id, &other.id] {
        let done = wait_for(&mut client, id, Duration::from_secs(240), "finished", |j| state(j) as i32 >= 3).await;
        assert_eq!(state(&done), JobState::Succeeded, "{}", done.error);
        assert_eq!(completed_by(&db.url, id).await, [worker_id(&healthy)]);
    }
    healthy.wait_log(&["resuming from the stored checkpoint", &job.id, "step=10"], Duration::from_secs(1)).await;
    let done = get(&mut client, &job.id).await;
    assert_eq!((done.attempts, done.failures, done.interruptions), (2, 0, 1));
    report(
        "a full disk on a worker (write error injected from step 12)",
        1,
        2,
        0,
        0,
        "0 failures, 1 interruption",
        "the worker stopped leasing and reported `disk full`; the job resumed elsewhere from step 10",
    );
}
