//! Devices end to end: real `ptune-worker` processes register the devices
//! `--devices` names with their memory, and a worker pretending to have two
//! devices (test builds: `cpu:0,cpu:1` with `PTUNE_TEST_DEVICE_MEMORY`)
//! trains two jobs that do not fit together on one device on different
//! devices, each on its own engine, and a data-parallel job on both.

mod support;

use std::time::{Duration, Instant};

use ptune_proto::v1::{self, JobState};
use support::cluster::*;

/// The machine's memory, as the worker reads it for the CPU device.
fn mem_total() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("MemTotal:")).unwrap();
    line.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

/// The id a worker spawned as `name` registered under, once it did.
async fn registered(cluster: &Cluster, name: &str) -> v1::WorkerInfo {
    let started = Instant::now();
    loop {
        let id = std::fs::read_to_string(cluster.worker_dir(name).join("worker_id")).unwrap_or_default();
        let mut client = cluster.client().await;
        let workers = client.list_workers(v1::ListWorkersRequest::default()).await.expect("list").into_inner().workers;
        if let Some(worker) = workers.into_iter().find(|w| !id.is_empty() && w.worker_id == id.trim()) {
            return worker;
        }
        let log = cluster.worker_log(name);
        assert!(started.elapsed() < Duration::from_secs(120), "{name} never registered; log:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn devices(worker: &v1::WorkerInfo) -> Vec<(String, u64)> {
    worker.devices.iter().map(|d| (d.name.clone(), d.memory_bytes)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_the_devices_they_are_given() {
    let cluster = Cluster::start(Duration::from_secs(5)).await;
    let _cpu = cluster.spawn_worker_with("cpu", &["--devices", "cpu"], &[]);
    let _auto = cluster.spawn_worker_with("auto", &["--devices", "auto", "--slots", "2"], &[]);
    let _pair = cluster.spawn_worker_with(
        "pair",
        &["--devices", "cpu:0,cpu:1", "--slots", "2"],
        &[("PTUNE_TEST_DEVICE_MEMORY", "3GiB,512MiB")],
    );

    let cpu = registered(&cluster, "cpu").await;
    assert_eq!(devices(&cpu), [("cpu".to_string(), mem_total())]);
    assert!(cpu.devices[0].free_memory_bytes > 0 && cpu.devices[0].free_memory_bytes <= mem_total(), "{cpu:?}");
    assert_eq!(cpu.slots, 1);

    // This machine has no GPU: auto takes the CPU, and the worker says why.
    let auto = registered(&cluster, "auto").await;
    assert_eq!(devices(&auto), [("cpu".to_string(), mem_total())]);
    assert_eq!(auto.slots, 2);
    let log = without_colours(&cluster.worker_log("auto"));
    let libtorch = log.lines().find(|l| l.contains(" libtorch "));
    let libtorch = libtorch.unwrap_or_else(|| panic!("no libtorch line in:\n{log}"));
    for field in ["cuda_available=false", "gpus=0", "libtorch=\"2.13.0"] {
        assert!(libtorch.contains(field), "{field} missing in {libtorch}");
    }

    // Test devices: one engine each, slots on each, the declared memory.
    let pair = registered(&cluster, "pair").await;
    assert_eq!(devices(&pair), [("cpu:0".to_string(), 3 << 30), ("cpu:1".to_string(), 512 << 20)]);
    assert_eq!(pair.slots, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_too_large_together_for_a_device_train_on_different_devices() {
    let cluster = Cluster::start(Duration::from_secs(5)).await;
    let mut client = cluster.client().await;
    let train = upload(&mut client, &sst2("train.jsonl")).await;
    let eval = upload(&mut client, &sst2("dev.jsonl")).await;
    let spec = sst2_job("on-a-device", &train, &eval, 6, 6, "");

    // Each device holds one job, not two: two share the weights but need
    // the job's own share twice.
    let scan = ptune_worker::agent::scan_models(&cluster.models_dir).unwrap();
    let shape = scan.served[0].shape().expect("MiniLM's shape");
    let estimate = ptune_core::memory::estimate(&ptune_core::JobSpec::try_from(spec.clone()).unwrap(), &shape);
    let own = estimate.job_bytes + estimate.activation_bytes;
    let device = estimate.weights_bytes + own + own / 2;
    let memory = format!("{device},{device}");
    let _pair = cluster.spawn_worker_with(
        "pair",
        &["--devices", "cpu:0,cpu:1", "--slots", "2"],
        &[("PTUNE_TEST_DEVICE_MEMORY", memory.as_str())],
    );
    registered(&cluster, "pair").await;

    let mut ids = Vec::new();
    for name in ["first", "second"] {
        let spec = v1::JobSpec { name: name.into(), ..spec.clone() };
        let job = client.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await.unwrap().into_inner().job;
        ids.push(job.unwrap().id);
    }
    let mut ran_on = Vec::new();
    for id in &ids {
        let done = wait_for(&mut client, id, Duration::from_secs(300), "finished", |j| {
            matches!(state(j), JobState::Succeeded | JobState::Failed)
        })
        .await;
        assert_eq!(state(&done), JobState::Succeeded, "{done:?}\nworker log:\n{}", cluster.worker_log("pair"));
        assert_eq!(done.memory_estimate_bytes, estimate.total_bytes());
        ran_on.extend(done.devices);
    }
    ran_on.sort();
    assert_eq!(ran_on, ["cpu:0", "cpu:1"], "worker log:\n{}", cluster.worker_log("pair"));

    // A data-parallel job gets both devices of the worker, now free, and trains.
    let mut wide = v1::JobSpec { name: "wide".into(), ..spec };
    wide.training.as_mut().unwrap().devices = 2;
    let wide = client.submit_job(v1::SubmitJobRequest { spec: Some(wide) }).await.unwrap().into_inner().job.unwrap();
    let done = wait_for(&mut client, &wide.id, Duration::from_secs(300), "finished", |j| {
        matches!(state(j), JobState::Succeeded | JobState::Failed)
    })
    .await;
    assert_eq!(state(&done), JobState::Succeeded, "{done:?}\nworker log:\n{}", cluster.worker_log("pair"));
    assert_eq!(done.devices, ["cpu:0", "cpu:1"]);
}
