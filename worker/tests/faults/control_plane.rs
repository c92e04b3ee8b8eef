//! The control plane going away under running jobs: a worker failing over
//! to another coordinator, a coordinator killed during an ASHA sweep, and
//! PostgreSQL stopped for 5 and 30 seconds.

use super::*;

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
