//! A data-parallel run (`training.devices = 2`) whose rank 1 dies at step 3
//! (an injected panic, see src/faults.rs) fails as a whole: rank 0 stops at
//! its next collective call instead of waiting for the dead rank, the job
//! fails with an error that is retried, and no adapter is exported.

mod support;

use ptune_core::JobSpec;
use ptune_worker::engine::{Control, Engine, Event, Resume, ADAPTER_WEIGHTS_FILE};
use serde_json::json;
use support::engine::shared_data_job;
use support::paths::minilm_dir;
use tch::Device;

#[test]
fn a_rank_that_dies_fails_the_whole_job_for_a_retry() {
    // The only test of this binary: the rules are read once, at the first hook.
    std::env::set_var("PTUNE_FAULTS", "panic@step,job=dp-dies,rank=1,step=3");
    let dir = tempfile::tempdir().unwrap();
    let spec = json!({
        "name": "dp-dies", "base_model": "all-MiniLM-L6-v2", "task": "sequence_classification",
        "method": "lora", "peft": {"r": 4},
        "data": {
            "train": "train.jsonl", "eval": "dev.jsonl", "labels": [0, 1], "max_seq_len": 48,
            "max_train_examples": 64, "max_eval_examples": 16,
        },
        "training": { "learning_rate": 1e-3, "batch_size": 8, "max_steps": 20, "eval_every": 10, "seed": 3, "devices": 2 },
    });
    let spec: JobSpec = serde_json::from_value(spec).unwrap();
    spec.validate(None).unwrap();
    let out_dir = dir.path().join("out");
    let job = shared_data_job(spec, "sst2", out_dir.clone(), Some(dir.path().join("checkpoint")), Resume::Never);

    let mut engine = Engine::new(Device::Cpu);
    let mut steps = Vec::new();
    let mut on_event = |event: Event<'_>| {
        if let Event::Step { step, .. } = event {
            steps.push(step);
        }
        Control::Continue
    };
    let error = engine
        .train_data_parallel(&minilm_dir(), &job, &[Device::Cpu, Device::Cpu], &mut on_event)
        .expect_err("a dead rank fails the job");

    assert!(error.is_retryable(), "{error}");
    let message = error.to_string();
    assert!(message.contains("rank 1") && message.contains("injected fault"), "the dead rank's panic is the error: {message}");
    // Rank 0 stopped at the step after the death instead of training on.
    assert_eq!(steps, vec![1, 2, 3]);
    assert!(!out_dir.join(ADAPTER_WEIGHTS_FILE).exists(), "no adapter is exported");
}
