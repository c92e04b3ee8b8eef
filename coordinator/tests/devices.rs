//! Placement by device memory through the real gRPC services on a real
//! database: a worker registers its devices with their memory, each lease
//! says which devices its job got (and the job shows it), jobs that do not
//! fit together on a device go to different devices, a job larger than
//! every device is unschedulable with the numbers, and a data-parallel job
//! gets all the devices it asks for on one worker, or none.

mod common;

use std::time::Duration;

use common::MODEL;
use ptune_coordinator::testing::minilm_model;
use ptune_proto::v1;

const MIB: u64 = 1 << 20;

/// Each job of `env.spec` alone: weights 90,852,864 + job 135,200 +
/// activations 40,061,952 bytes (hand-checked in memory.rs); two on one
/// device share the weights: 171,247,168 bytes.
const JOB_BYTES: u64 = 90_852_864 + 135_200 + 40_061_952;

/// Registers a worker with devices `cpu:0`, `cpu:1`, ... of `memory_mib` each.
async fn register(env: &mut common::Env, memory_mib: &[u64]) -> String {
    let devices = memory_mib
        .iter()
        .enumerate()
        .map(|(i, m)| v1::Device { name: format!("cpu:{i}"), memory_bytes: m * MIB, free_memory_bytes: m * MIB / 2 })
        .collect();
    let request = v1::RegisterWorkerRequest {
        hostname: "gpu-host".into(),
        devices,
        slots: 4,
        models: vec![minilm_model(MODEL)],
        memory_bytes: 64 << 30,
        ..Default::default()
    };
    env.workers.register_worker(request).await.expect("register").into_inner().worker_id
}

async fn lease(env: &mut common::Env, worker: &str) -> Option<v1::Lease> {
    let request = v1::LeaseJobRequest { worker_id: worker.into(), free_slots: 4, loaded_models: vec![], wait_ms: 0 };
    env.workers.lease_job(request).await.expect("lease").into_inner().lease
}

async fn submit_on(env: &mut common::Env, name: &str, devices: u32) -> v1::Job {
    let mut spec = env.spec(name).await;
    spec.training.as_mut().unwrap().devices = devices;
    env.submit(spec).await
}

#[tokio::test]
async fn jobs_too_large_together_for_a_device_go_to_different_devices_and_show_where_they_run() {
    let mut env = common::start(Duration::from_secs(10)).await;
    // 150 MiB each: one job fits on a device (125 MiB), two do not (163 MiB).
    let worker = register(&mut env, &[150, 150]).await;
    let mut ids = Vec::new();
    for name in ["first", "second", "third"] {
        ids.push(submit_on(&mut env, name, 1).await.id);
    }
    let first = lease(&mut env, &worker).await.expect("the first job fits");
    let second = lease(&mut env, &worker).await.expect("the second fits on the other device");
    assert_eq!((first.job_id.as_str(), second.job_id.as_str()), (ids[0].as_str(), ids[1].as_str()));
    assert_eq!(first.devices, ["cpu:0"]);
    assert_eq!(second.devices, ["cpu:1"]);
    assert_eq!(lease(&mut env, &worker).await, None, "both devices are full, though the worker has slots and RAM");
    assert_eq!(env.get(&ids[2]).await.waiting_reason, "", "it fits alone on a device: it waits, not unschedulable");

    // The job and the worker list say which device is which.
    assert_eq!(env.get(&ids[1]).await.devices, ["cpu:1"]);
    let workers = env.jobs.list_workers(v1::ListWorkersRequest::default()).await.expect("list").into_inner().workers;
    let listed: Vec<(String, u64, u64)> =
        workers[0].devices.iter().map(|d| (d.name.clone(), d.memory_bytes, d.free_memory_bytes)).collect();
    assert_eq!(listed, [("cpu:0".into(), 150 * MIB, 75 * MIB), ("cpu:1".into(), 150 * MIB, 75 * MIB)]);

    // A device whose job ended has room again, and the next job goes there.
    env.complete(&second, b"adapter").await.expect("complete");
    let third = lease(&mut env, &worker).await.expect("cpu:1 is free again");
    assert_eq!(third.job_id, ids[2]);
    assert_eq!(third.devices, ["cpu:1"]);
    assert_eq!(env.get(&ids[1]).await.devices, ["cpu:1"], "a finished job still shows where it ran");
    env.stop().await;
}

#[tokio::test]
async fn a_job_larger_than_every_device_is_unschedulable_with_the_numbers() {
    let mut env = common::start(Duration::from_secs(10)).await;
    // 2 x 100 MiB: together they would hold the job's 125 MiB, but a job runs on one device.
    let worker = register(&mut env, &[100, 100]).await;
    let big = submit_on(&mut env, "big", 1).await;
    assert_eq!(big.memory_estimate_bytes, JOB_BYTES);
    assert_eq!(
        env.get(&big.id).await.waiting_reason,
        "unschedulable: needs about 125 MiB (weights 87, job 0, activations 38); \
         the largest device of an online worker serving base model \"tiny-bert\" has 100 MiB"
    );
    assert_eq!(lease(&mut env, &worker).await, None);

    // A worker with a device large enough takes it.
    let roomy = register(&mut env, &[50, 200]).await;
    assert_eq!(env.get(&big.id).await.waiting_reason, "");
    let leased = lease(&mut env, &roomy).await.expect("the 200 MiB device holds it");
    assert_eq!((leased.job_id, leased.devices), (big.id, vec!["cpu:1".to_string()]));
    env.stop().await;
}

#[tokio::test]
async fn a_data_parallel_job_gets_all_its_devices_on_one_worker_or_none() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let single = register(&mut env, &[1024]).await;
    let wide = submit_on(&mut env, "wide", 2).await;
    assert_eq!(
        env.get(&wide.id).await.waiting_reason,
        "unschedulable: training.devices is 2, but the online workers serving base model \"tiny-bert\" have at \
         most 1 device(s); a job trains on devices of one worker (not across workers)"
    );
    assert_eq!(lease(&mut env, &single).await, None, "one device is not two");

    // Two devices, one too small for it: neither is leased.
    let lopsided = register(&mut env, &[4096, 100]).await;
    assert_eq!(
        env.get(&wide.id).await.waiting_reason,
        "unschedulable: needs about 125 MiB (weights 87, job 0, activations 38) on each of 2 devices of one worker; \
         the online workers serving base model \"tiny-bert\" have at most 100 MiB on each of 2 devices"
    );
    assert_eq!(lease(&mut env, &lopsided).await, None, "all or nothing");

    // Two devices with room: the lease lists both, and so does the job.
    let pair = register(&mut env, &[150, 150]).await;
    assert_eq!(env.get(&wide.id).await.waiting_reason, "");
    let both = lease(&mut env, &pair).await.expect("both devices hold it");
    assert_eq!(both.job_id, wide.id);
    assert_eq!(both.devices, ["cpu:0", "cpu:1"]);
    assert_eq!(env.get(&wide.id).await.devices, ["cpu:0", "cpu:1"]);

    // It holds its share on each device: neither has room for another job beside it.
    let next_wide = submit_on(&mut env, "wide-too", 2).await;
    let narrow = submit_on(&mut env, "narrow", 1).await;
    assert_eq!(lease(&mut env, &pair).await, None);
    env.complete(&both, b"adapter").await.expect("complete");
    let again = lease(&mut env, &pair).await.expect("both devices are free again");
    assert_eq!((again.job_id.as_str(), again.devices.len()), (next_wide.id.as_str(), 2));
    assert_eq!(lease(&mut env, &pair).await, None, "{} waits for a device", narrow.id);
    env.stop().await;
}
