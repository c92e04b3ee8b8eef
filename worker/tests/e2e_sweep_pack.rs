//! End to end: a sweep's trials on one worker train as one pack. A real
//! coordinator on real Postgres creates four trials with different prompt
//! lengths and learning rates; a `ptune-worker` with four slots trains them
//! over gRPC, and every trial reports steps shared by all four. Both kinds
//! of pack are covered: classification on all-MiniLM-L6-v2, and causal LM
//! on a tiny GPT-2 (prompt tuning, and LoRA over its rank).

mod support;

use std::time::Duration;

use support::cluster::*;
use ptune_proto::v1::{self, JobState, SweepState};
use serde_json::{json, Value};

const STEPS: usize = 30;
/// The tiny GPT-2 trains a step in milliseconds, faster than a worker leases
/// a job, so its trials run longer for the four to overlap most of their steps.
const GPT2_STEPS: usize = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trials_of_a_sweep_train_as_one_pack() {
    let cluster = Cluster::start(Duration::from_secs(5)).await;
    let mut client = cluster.client().await;
    let train = upload(&mut client, &sst2("train.jsonl")).await;
    let eval = upload(&mut client, &sst2("dev.jsonl")).await;
    let template = json!({
        "base_model": MODEL,
        "task": "sequence_classification",
        "method": "prompt_tuning",
        "data": { "train": train, "eval": eval, "labels": [0, 1], "max_seq_len": 32,
                  "max_train_examples": 320, "max_eval_examples": 64 },
        "training": { "batch_size": 8, "max_steps": STEPS, "eval_every": 10, "seed": 3 },
    });
    check_trials_pack(&cluster, template, prompt_space(), "accuracy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_causal_lm_trials_of_a_sweep_train_as_one_pack() {
    let (cluster, template) = gpt2_cluster("prompt_tuning").await;
    check_trials_pack(&cluster, template, prompt_space(), "bleu").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_causal_lm_lora_trials_of_a_sweep_train_as_one_pack() {
    let (cluster, template) = gpt2_cluster("lora").await;
    let space = json!({
        "peft.r": { "values": [2, 8] },
        "training.learning_rate": { "values": [1e-2, 3e-2] },
    });
    check_trials_pack(&cluster, template, space, "bleu").await;
}

/// Prompt length x learning rate.
fn prompt_space() -> Value {
    json!({
        "peft.num_virtual_tokens": { "values": [4, 16] },
        "training.learning_rate": { "values": [1e-2, 3e-2] },
    })
}

/// A cluster whose worker will serve a tiny GPT-2, and a causal-LM template
/// for `method` on E2E pairs uploaded to it.
async fn gpt2_cluster(method: &str) -> (Cluster, Value) {
    let cluster = Cluster::start(Duration::from_secs(5)).await;
    let gpt2 = workspace_root().join("worker/tests/fixtures/tiny-gpt2");
    std::os::unix::fs::symlink(gpt2, cluster.models_dir.join("tiny-gpt2")).unwrap();
    let mut client = cluster.client().await;
    let e2e = support::paths::shared_data("e2e");
    let train = upload(&mut client, &e2e.join("train.jsonl")).await;
    let eval = upload(&mut client, &e2e.join("dev.jsonl")).await;
    let template = json!({
        "base_model": "tiny-gpt2",
        "task": "causal_lm",
        "method": method,
        "data": { "train": train, "eval": eval, "text_field": "source", "label_field": "target",
                  "max_seq_len": 24, "max_train_examples": 160, "max_eval_examples": 8 },
        "training": { "batch_size": 8, "max_steps": GPT2_STEPS, "eval_every": 40, "seed": 3 },
        "generation": { "max_new_tokens": 4, "num_beams": 1 },
    });
    (cluster, template)
}

/// Runs a grid of four trials (`space`, two values of two fields) of
/// `template` on a worker with four slots, started once all four are
/// queued; checks that every trial succeeds, trains every step, and shares
/// most of its steps with all four.
async fn check_trials_pack(cluster: &Cluster, template: Value, space: Value, metric: &str) {
    let planned = template["training"]["max_steps"].as_u64().unwrap() as usize;
    let mut client = cluster.client().await;
    let definition = json!({
        "name": "packed-sweep",
        "max_concurrent_trials": 4,
        "objective": { "metric": metric, "direction": "maximize" },
        "algorithm": { "type": "grid" },
        "template": template,
        "space": space,
    });
    let mut sweeps = cluster.sweeps();
    let sweep = sweeps
        .create_sweep(v1::CreateSweepRequest { definition_json: definition.to_string() })
        .await
        .expect("the sweep is valid")
        .into_inner();

    // All four trials are queued before the worker starts.
    let list = v1::ListJobsRequest { sweep_id: sweep.id.clone(), page_size: 10, ..Default::default() };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client.list_jobs(list.clone()).await.unwrap().into_inner().jobs.len() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "the sweep did not queue its four trials");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _worker = cluster.spawn_worker_with_slots("packer", 4);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let state = sweeps
            .get_sweep(v1::GetSweepRequest { sweep_id: sweep.id.clone() })
            .await
            .unwrap()
            .into_inner()
            .state();
        if state != SweepState::Running {
            assert_eq!(state, SweepState::Completed, "worker log:\n{}", cluster.worker_log("packer"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "sweep still running:\n{}", cluster.worker_log("packer"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let trials = client.list_jobs(list).await.unwrap().into_inner().jobs;
    assert_eq!(trials.len(), 4);
    for trial in &trials {
        assert_eq!(trial.state(), JobState::Succeeded, "{}: {}", trial.id, trial.error);
        let metrics = client
            .get_metrics(v1::GetMetricsRequest { job_id: trial.id.clone(), kind: "train".into() })
            .await
            .unwrap()
            .into_inner()
            .metrics;
        let steps = metrics.iter().filter(|m| m.name == "loss").count();
        assert_eq!(steps, planned, "{}", trial.id);
        let shared = metrics.iter().filter(|m| m.name == "pack_jobs" && m.value == 4.0).count();
        assert!(
            shared >= planned / 2,
            "trial {} shared only {shared} of {planned} steps with all four:\n{}",
            trial.id,
            cluster.worker_log("packer")
        );
    }
}
