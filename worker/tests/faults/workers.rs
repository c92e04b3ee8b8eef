//! Worker processes killed at twenty points of a run, signalled to drain,
//! signalled before they ever reach a coordinator, and cut off from the
//! coordinator by a partition.

use super::*;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_as_a_completion_brings_its_next_lease_loses_neither_job() {
    let Scene { dir, db, coordinator, mut client, train, eval, models } = Scene::start(LEASE_MS, &[]).await;
    let first = submit(&mut client, spec("handoff-first", &train, &eval, 6, "")).await.id;
    let second = submit(&mut client, spec("handoff-second", &train, &eval, 6, "")).await.id;
    // One slot: the completion of the first job brings the second, and the
    // worker dies holding that lease before it starts the job.
    let mut victim = WorkerProcess::start(dir.path(), "victim", &models, &coordinator.url(), 1, "pause@handoff,ms=120000");
    victim.wait_log(&["fault injected", "Handoff"], Duration::from_secs(240)).await;
    assert_eq!(held_job(&db.url, &worker_id(&victim)).await.as_deref(), Some(second.as_str()));
    victim.kill9();
    let killed = Instant::now();

    let rescuer = WorkerProcess::start(dir.path(), "rescuer", &models, &coordinator.url(), 1, "");
    let done = wait_for(&mut client, &first, Duration::from_secs(60), "finished", |j| state(j) as i32 >= 3).await;
    assert_eq!((state(&done), done.attempts, done.interruptions), (JobState::Succeeded, 1, 0), "{}", done.error);
    let done = wait_for(&mut client, &second, Duration::from_secs(300), "finished", |j| state(j) as i32 >= 3).await;
    let recovered = killed.elapsed();
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.error);
    assert_eq!((done.attempts, done.failures, done.interruptions), (2, 0, 1), "the lost lease is an interruption");
    assert_eq!(completed_by(&db.url, &second).await, [worker_id(&rescuer)]);
    let steps_seen: Vec<u64> = train_losses(&mut client, &second).await.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps_seen, (1..=6).collect::<Vec<_>>(), "every step's loss, once");
    report(
        "kill -9 a worker holding the lease its last completion brought",
        1,
        2,
        0,
        0,
        "0 failures, 1 interruption (the lease expired)",
        &format!("the second job succeeded on another worker {:.1} s after the kill", recovered.as_secs_f64()),
    );
}
