//! Memory-aware scheduling through the real gRPC services on a real
//! database: a job's memory estimate, the waiting reason of a job too large
//! for every worker serving its model (which is never leased to them),
//! workers getting jobs on the models they hold first, and the peak memory a
//! worker reports at completion.

mod common;

use std::time::Duration;

use common::{metric, sha256, state, MODEL};
use ptune_coordinator::testing::minilm_model;
use ptune_proto::v1::{self, complete_job_chunk::Part};
use tonic::Code;

const MIB: u64 = 1 << 20;
const OTHER_MODEL: &str = "other-bert";

async fn register(env: &mut common::Env, models: Vec<v1::BaseModel>, memory_bytes: u64) -> String {
    env.workers
        .register_worker(v1::RegisterWorkerRequest {
            hostname: "test-host".into(),
            slots: 1,
            models,
            memory_bytes,
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner()
        .worker_id
}

async fn lease(env: &mut common::Env, worker: &str, loaded: &[&str]) -> Option<v1::Lease> {
    let request = v1::LeaseJobRequest {
        worker_id: worker.into(),
        free_slots: 1,
        loaded_models: loaded.iter().map(|m| m.to_string()).collect(),
        wait_ms: 0,
    };
    env.workers.lease_job(request).await.expect("lease").into_inner().lease
}

#[tokio::test]
async fn a_job_larger_than_every_worker_serving_its_model_says_so_and_is_never_leased_to_them() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("big").await;
    // Submitted before any worker reported the model's shape: no estimate yet.
    let big = env.submit(spec.clone()).await;
    assert_eq!(big.memory_estimate_bytes, 0);

    let small = register(&mut env, vec![minilm_model(MODEL)], 100 * MIB).await;
    // Prompt tuning, 20 virtual tokens, batch 2 of 64 tokens (hand-checked
    // in ptune-core's memory tests): weights 90,852,864 bytes, job 135,200,
    // activations 2 * 84 * 6 * 4 * (18 * 384 + 3 * 12 * 84) = 40,061,952.
    let job = env.get(&big.id).await;
    assert_eq!(job.memory_estimate_bytes, 90_852_864 + 135_200 + 40_061_952);
    assert_eq!(
        job.waiting_reason,
        "unschedulable: needs about 125 MiB (weights 87, job 0, activations 38); \
         the largest device of an online worker serving base model \"tiny-bert\" has 100 MiB"
    );
    assert_eq!(lease(&mut env, &small, &[MODEL]).await, None, "too large for this worker");

    // A smaller job, submitted later, is leased to it meanwhile.
    let mut fits = spec.clone();
    fits.name = "fits".into();
    fits.peft.as_mut().unwrap().num_virtual_tokens = Some(4);
    fits.data.as_mut().unwrap().max_seq_len = 8;
    let fits = env.submit(fits).await;
    assert!(fits.memory_estimate_bytes > 0 && fits.memory_estimate_bytes < 100 * MIB, "{fits:?}");
    assert_eq!(lease(&mut env, &small, &[]).await.map(|l| l.job_id), Some(fits.id.clone()));

    // A worker that does not say how much memory it has might fit it: the
    // job no longer says it cannot run, and that worker gets it.
    let unknown = register(&mut env, vec![minilm_model(MODEL)], 0).await;
    assert_eq!(env.get(&big.id).await.waiting_reason, "");
    assert_eq!(lease(&mut env, &unknown, &[]).await.map(|l| l.job_id), Some(big.id.clone()));
    env.stop().await;
}

#[tokio::test]
async fn a_worker_gets_jobs_on_the_model_it_holds_first_and_its_peak_memory_is_kept() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let worker = register(&mut env, vec![minilm_model(MODEL), minilm_model(OTHER_MODEL)], 1 << 30).await;
    let spec = env.spec("on-other").await;
    let older = env.submit(v1::JobSpec { base_model: OTHER_MODEL.into(), ..spec.clone() }).await;
    let newer = env.submit(v1::JobSpec { name: "on-tiny-bert".into(), ..spec }).await;
    assert_eq!(newer.memory_estimate_bytes, 90_852_864 + 135_200 + 40_061_952, "estimated at submit");

    let request = v1::LeaseJobRequest { worker_id: worker.clone(), free_slots: 1, loaded_models: vec![" ".into()], wait_ms: 0 };
    let err = env.workers.lease_job(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("loaded_models[0]: must be a folder name"), "{}", err.message());

    // The worker holds tiny-bert: its job goes first, though it is newer.
    let first = lease(&mut env, &worker, &[MODEL]).await.expect("a lease");
    assert_eq!(first.job_id, newer.id);
    let second = lease(&mut env, &worker, &[MODEL]).await.expect("a lease");
    assert_eq!(second.job_id, older.id, "then the others, oldest first");

    let adapter = b"adapter".to_vec();
    let header = v1::CompleteJobHeader {
        job_id: first.job_id.clone(),
        epoch: first.epoch,
        adapter_sha256: sha256(&adapter),
        adapter_size: adapter.len() as u64,
        metrics: vec![metric(10, "eval", "accuracy", 0.9)],
        step: 10,
        peak_rss_bytes: 321 * MIB,
        lease_token: first.lease_token.clone(),
        next: None,
    };
    let parts = vec![
        v1::CompleteJobChunk { part: Some(Part::Header(header)) },
        v1::CompleteJobChunk { part: Some(Part::Data(adapter)) },
    ];
    env.workers.complete_job(futures::stream::iter(parts)).await.expect("complete");
    let done = env.get(&first.job_id).await;
    assert_eq!(state(&done), v1::JobState::Succeeded);
    assert_eq!((done.memory_estimate_bytes, done.worker_peak_rss_bytes), (newer.memory_estimate_bytes, 321 * MIB));
    env.stop().await;
}

#[tokio::test]
async fn a_worker_takes_jobs_while_they_fit_next_to_the_ones_it_runs_sharing_their_base_weights() {
    let mut env = common::start(Duration::from_secs(10)).await;
    // Each job alone: weights 90,852,864 + job 135,200 + activations
    // 40,061,952 (as above). Two on the same model share the weights:
    // 90,852,864 + 2 * 40,197,152 = 171,247,168 bytes fit in 172,000,000;
    // a third, or a job on another model (its own weights), does not.
    let worker = register(&mut env, vec![minilm_model(MODEL), minilm_model(OTHER_MODEL)], 172_000_000).await;
    let spec = env.spec("packed").await;
    let mut jobs = Vec::new();
    for name in ["first", "second", "third"] {
        jobs.push(env.submit(v1::JobSpec { name: name.into(), ..spec.clone() }).await.id);
    }
    let other = env.submit(v1::JobSpec { name: "other".into(), base_model: OTHER_MODEL.into(), ..spec }).await.id;

    let first = lease(&mut env, &worker, &[MODEL]).await.expect("the first job fits");
    let second = lease(&mut env, &worker, &[MODEL]).await.expect("the second fits next to it, sharing its weights");
    assert_eq!((first.job_id.as_str(), second.job_id.as_str()), (jobs[0].as_str(), jobs[1].as_str()));
    assert_eq!(lease(&mut env, &worker, &[MODEL]).await, None, "a third would need 211 MB, another model 302 MB");
    // They wait for memory on the worker, which they would fit alone: that is no reason to call them unschedulable.
    assert_eq!(env.get(&jobs[2]).await.waiting_reason, "");
    assert_eq!(env.get(&other).await.waiting_reason, "");

    env.complete(&first, b"adapter").await.expect("complete");
    let third = lease(&mut env, &worker, &[MODEL]).await.expect("the first job's share is free again");
    assert_eq!(third.job_id, jobs[2]);
    env.complete(&second, b"adapter").await.expect("complete");
    env.complete(&third, b"adapter").await.expect("complete");
    let last = lease(&mut env, &worker, &[MODEL]).await.expect("alone, the other model's job fits");
    assert_eq!(last.job_id, other);
    env.stop().await;
}

#[tokio::test]
async fn a_job_that_fits_is_leased_behind_more_than_a_page_of_jobs_that_do_not() {
    // Each too large for the worker, each of its own size: none stands for
    // another among the candidates, so they fill more than a page of classes
    // (and two pages of the queue's head).
    leased_behind_jobs_too_large(|i| 20 + i % (ptune_coordinator::placement::CANDIDATES_PER_PAGE + 1)).await;
}

#[tokio::test]
async fn a_job_that_fits_is_leased_behind_two_pages_of_one_class_that_does_not() {
    // All of one size: one class, but two pages of the queue's head.
    leased_behind_jobs_too_large(|_| 20).await;
}

/// Two pages of jobs too large for the worker, on the model it holds (which
/// placement reads first), `tokens(i)` virtual tokens each, then one that
/// fits on another model: the worker gets that one, then nothing.
async fn leased_behind_jobs_too_large(tokens: fn(u32) -> u32) {
    let mut env = common::start(Duration::from_secs(10)).await;
    let worker = register(&mut env, vec![minilm_model(MODEL), minilm_model(OTHER_MODEL)], 100 * MIB).await;
    let spec = env.spec("too-large").await;
    let jobs = 2 * ptune_coordinator::placement::CANDIDATES_PER_PAGE + 1;
    for i in 0..jobs {
        let mut large = spec.clone();
        large.name = format!("too-large-{i}");
        large.peft.as_mut().unwrap().num_virtual_tokens = Some(tokens(i));
        assert!(env.submit(large).await.memory_estimate_bytes > 100 * MIB);
    }
    let mut small = spec.clone();
    small.name = "fits".into();
    small.base_model = OTHER_MODEL.into();
    small.peft.as_mut().unwrap().num_virtual_tokens = Some(4);
    small.data.as_mut().unwrap().max_seq_len = 8;
    let small = env.submit(small).await;
    assert_eq!(lease(&mut env, &worker, &[MODEL]).await.map(|l| l.job_id), Some(small.id));
    assert_eq!(lease(&mut env, &worker, &[MODEL]).await, None);
    env.stop().await;
}

/// Jobs queued before any worker reported their model, then a fleet
/// registering at once: the first registration estimates the queue (more
/// than one page of it), the others wait for it and find it done, whichever
/// of them gets there first. A larger model under the same name estimates
/// the whole queue again; the smaller one registering again does not.
#[tokio::test]
async fn a_fleet_registering_at_once_estimates_the_queue_once_and_a_larger_model_estimates_it_again() {
    const QUEUED: usize = 1200;
    const REGISTERING: usize = 24;
    // Prompt tuning, 20 virtual tokens, batch 2 of 64 tokens (the first test's numbers).
    const ESTIMATE: u64 = 90_852_864 + 135_200 + 40_061_952;
    let all = "ptune_memory_estimates_total{scope=\"all\"}";
    let without = "ptune_memory_estimates_total{scope=\"without\"}";
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("queued").await;
    let first = env.submit(spec.clone()).await;
    let specs = (2..QUEUED).map(|i| v1::JobSpec { name: format!("queued-{i}"), ..spec.clone() }).collect();
    let batch = env.jobs.submit_jobs(v1::SubmitJobsRequest { specs, all_or_nothing: true }).await.expect("submit");
    assert_eq!(batch.into_inner().submitted as usize, QUEUED - 2);
    let last = env.submit(v1::JobSpec { name: "queued-last".into(), ..spec.clone() }).await;
    assert_eq!((first.memory_estimate_bytes, last.memory_estimate_bytes), (0, 0), "no shape reported yet");

    let registrations = (0..REGISTERING).map(|i| {
        let mut workers = env.workers.clone();
        async move {
            let request = v1::RegisterWorkerRequest {
                hostname: format!("fleet-{i}"),
                slots: 1,
                models: vec![minilm_model(MODEL)],
                ..Default::default()
            };
            workers.register_worker(request).await
        }
    });
    for registered in futures::future::join_all(registrations).await {
        registered.expect("every registration is answered");
    }
    for job in [&first, &last] {
        assert_eq!(env.get(&job.id).await.memory_estimate_bytes, ESTIMATE, "{}", job.spec.as_ref().unwrap().name);
    }
    assert_eq!(env.metric_value(all).await, QUEUED as f64, "the queue was estimated once");
    assert_eq!(env.metric_value(without).await, 0.0, "the others found nothing left to estimate");

    // A model twice as large under the name: the weights (4 bytes a parameter) of every queued job double.
    let larger = v1::BaseModel { parameters: 2 * 22_713_216, ..minilm_model(MODEL) };
    register(&mut env, vec![larger], 0).await;
    assert_eq!(env.metric_value(all).await, 2.0 * QUEUED as f64);
    for job in [&first, &last] {
        assert_eq!(env.get(&job.id).await.memory_estimate_bytes, ESTIMATE + 90_852_864);
    }
    // The largest reported counts: the smaller one again changes nothing.
    register(&mut env, vec![minilm_model(MODEL)], 0).await;
    assert_eq!(env.metric_value(all).await, 2.0 * QUEUED as f64);
    assert_eq!(env.get(&first.id).await.memory_estimate_bytes, ESTIMATE + 90_852_864);
    env.stop().await;
}
