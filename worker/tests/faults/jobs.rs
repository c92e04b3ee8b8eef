//! Jobs that fail by themselves: poison jobs that panic, abort or hang, and
//! a disk that fills up under a run.

use super::*;

/// Seconds between one attempt's end and the next one's lease, per gap.
async fn attempt_gaps(database_url: &str, job: &str) -> Vec<f64> {
    let sql = "SELECT extract(epoch FROM a.leased_at - p.ended_at)::text FROM job_attempts a \
               JOIN job_attempts p ON p.job_id = a.job_id AND p.attempt = a.attempt - 1 \
               WHERE a.job_id = $1::uuid ORDER BY a.attempt";
    query_texts(database_url, sql, job).await.iter().map(|s| s.parse().unwrap()).collect()
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
