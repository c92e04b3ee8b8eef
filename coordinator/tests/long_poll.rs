//! Long-poll leasing over real gRPC: a worker's `LeaseJob` that finds no
//! job waits at its coordinator, and is answered with a job submitted
//! meanwhile through another coordinator on the same database (woken by
//! migration 0013's notification, relayed by `relay.rs`); one that no job
//! comes for answers empty once its wait is over; a call with no wait
//! answers at once, as before. Time alone makes a job leasable too (its
//! retry backoff ends, or its spread window for a better placed worker),
//! which nothing notifies: a waiting call looks again then, so the job is
//! leased within the one call. Jobs queued on models the worker does not
//! serve wake its call without making it read the queue, and of the calls
//! waiting on a model only as many read as can take what was queued, while
//! a batch still reaches every waiting worker.

mod common;

use std::time::{Duration, Instant};

use ptune_coordinator::Coordinator;
use ptune_proto::v1;

fn ask(worker: &str, wait_ms: u32) -> v1::LeaseJobRequest {
    v1::LeaseJobRequest { worker_id: worker.into(), free_slots: 1, wait_ms, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lease_call_gets_a_job_queued_through_another_coordinator() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let b = Coordinator::start(env.config.clone()).await.expect("a second coordinator on the same database");
    let (mut jobs_b, _, _) = common::clients(&b, &env.tokens);
    let worker = env.register().await;
    let spec = env.spec("long-poll").await;

    // Nothing queued, no wait: answered at once, empty.
    let started = Instant::now();
    assert!(env.workers.lease_job(ask(&worker, 0)).await.unwrap().into_inner().lease.is_none());
    let at_once = started.elapsed();

    // Nothing queued, a wait of 1 s that nothing ends: empty, after it.
    let started = Instant::now();
    assert!(env.workers.lease_job(ask(&worker, 1000)).await.unwrap().into_inner().lease.is_none());
    assert!(started.elapsed() >= Duration::from_millis(900), "it waited: {:?} (at once: {at_once:?})", started.elapsed());

    // A wait on A, a job submitted through B meanwhile: A answers with it.
    let mut workers_a = env.workers.clone();
    let waiting = tokio::spawn(async move { workers_a.lease_job(ask(&worker, 5000)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let job = jobs_b.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await.unwrap().into_inner().job.unwrap();
    let lease = waiting.await.unwrap().unwrap().into_inner().lease;
    assert_eq!(lease.map(|l| l.job_id), Some(job.id), "the waiting call got the job queued through B");
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lease_call_gets_a_job_whose_retry_backoff_ends_meanwhile() {
    let mut env = common::start_with(Duration::from_secs(30), |c| c.retry.backoff_base = Duration::from_secs(1)).await;
    let worker = env.register().await;
    let spec = env.spec("backoff").await;
    let job = env.submit(spec).await;
    let first = env.lease(&worker).await.expect("the job is leased");
    env.fail(&first, "injected error", false, true).await.unwrap();
    assert_eq!(common::state(&env.get(&job.id).await), v1::JobState::Queued, "queued again after a backoff");

    // Nothing is notified when the backoff ends; the one waiting call still gets the job.
    let lease = env.workers.lease_job(ask(&worker, 5000)).await.unwrap().into_inner().lease;
    let lease = lease.expect("the call waiting through the backoff got the job");
    assert_eq!((lease.job_id.as_str(), lease.attempt), (job.id.as_str(), 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lease_call_gets_a_job_held_for_a_better_placed_worker_once_its_window_ends() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let spec = env.spec("spread").await;
    // A worker holding the model asks and goes away: a fresh job is left to it for the spread window.
    let rival = env.register().await;
    let asked = v1::LeaseJobRequest { loaded_models: vec![common::MODEL.into()], ..ask(&rival, 0) };
    assert!(env.workers.lease_job(asked).await.unwrap().into_inner().lease.is_none());
    let worker = env.register().await;

    let mut workers = env.workers.clone();
    let waiting = tokio::spawn(async move { workers.lease_job(ask(&worker, 5000)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let job = env.submit(spec).await;
    let lease = waiting.await.unwrap().unwrap().into_inner().lease;
    assert_eq!(lease.map(|l| l.job_id), Some(job.id), "the waiting call got the job when its window ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_queued_on_another_model_do_not_make_a_waiting_call_read_the_queue() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let worker = env.register().await;
    let mut other = env.spec("other-model").await;
    other.base_model = "other-model".into();

    let mut workers = env.workers.clone();
    let asking = worker.clone();
    let waiting = tokio::spawn(async move { workers.lease_job(ask(&asking, 3000)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        env.submit(v1::JobSpec { name: format!("other-{i}"), ..other.clone() }).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(waiting.await.unwrap().unwrap().into_inner().lease.is_none(), "nothing on the worker's model came");
    assert_eq!(reads(&env, "empty").await, 1.0, "the call read once, when it began, not once per job on another model");

    // A job on its own model still wakes it.
    let mut workers = env.workers.clone();
    let waiting = tokio::spawn(async move { workers.lease_job(ask(&worker, 5000)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let own = env.spec("own-model").await;
    let job = env.submit(own).await;
    let lease = waiting.await.unwrap().unwrap().into_inner().lease;
    assert_eq!(lease.map(|l| l.job_id), Some(job.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_for_several_waiting_workers_makes_one_of_them_read_the_queue() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let (workers, waiting) = wait_on(&mut env, 4, 3000).await;
    let spec = env.spec("one").await;
    let job = env.submit(spec).await;
    let leases: Vec<Option<String>> = futures::future::join_all(waiting).await.into_iter().map(|l| l.unwrap()).collect();
    assert_eq!(leases.iter().flatten().collect::<Vec<_>>(), vec![&job.id], "one of the four got the job");
    assert_eq!(reads(&env, "leased").await, 1.0);
    assert_eq!(reads(&env, "empty").await, 4.0, "each worker read once before it waited; for the job, only the one that took it");
    // The others wait again, as workers do when their wait ends: the job was taken, nothing to read.
    for (worker, _) in workers.iter().zip(&leases).filter(|(_, lease)| lease.is_none()) {
        assert!(env.workers.lease_job(ask(worker, 200)).await.unwrap().into_inner().lease.is_none());
    }
    assert_eq!(reads(&env, "empty").await, 4.0, "a worker waiting again reads nothing that others took");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_queued_for_waiting_workers_reaches_every_one_of_them() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let (_, waiting) = wait_on(&mut env, 4, 5000).await;
    let spec = env.spec("batch").await;
    let specs = (0..6).map(|i| v1::JobSpec { name: format!("batch-{i}"), ..spec.clone() }).collect();
    // One transaction, one notification, for six jobs.
    env.jobs.submit_jobs(v1::SubmitJobsRequest { specs, all_or_nothing: true }).await.unwrap();
    let leases: Vec<Option<String>> = futures::future::join_all(waiting).await.into_iter().map(|l| l.unwrap()).collect();
    assert!(leases.iter().all(Option::is_some), "every waiting worker got a job: {leases:?}");
}

/// `n` registered workers, each waiting in a `LeaseJob` call of `wait_ms`
/// on an empty queue, as a worker does: its earlier call found the queue
/// empty, so this one waits without reading it. Each handle ends with the
/// leased job's id, if any; and the workers' ids.
async fn wait_on(env: &mut common::Env, n: usize, wait_ms: u32) -> (Vec<String>, Vec<tokio::task::JoinHandle<Option<String>>>) {
    let (mut workers, mut waiting) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let worker = env.register().await;
        workers.push(worker.clone());
        assert!(env.workers.lease_job(ask(&worker, 100)).await.unwrap().into_inner().lease.is_none());
        let mut workers = env.workers.clone();
        waiting.push(tokio::spawn(async move {
            let reply = workers.lease_job(ask(&worker, wait_ms)).await.unwrap().into_inner();
            reply.lease.map(|l| l.job_id)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reads(env, "empty").await, n as f64, "one read per worker, by its first call");
    (workers, waiting)
}

/// Reads of the queue by lease calls so far, by outcome (`leased`,
/// `empty`), from the coordinator's `/metrics`.
async fn reads(env: &common::Env, outcome: &str) -> f64 {
    let http = env.coordinator.as_ref().unwrap().http_addr;
    let response = common::http_get(http, "/metrics", Some(&env.tokens.viewer)).await;
    let prefix = format!("ptune_lease_duration_seconds_count{{outcome=\"{outcome}\"}} ");
    response.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map_or(0.0, |v| v.trim().parse().unwrap())
}
