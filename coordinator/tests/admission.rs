//! Admission by base model: a model that workers found but cannot train, or
//! a task its architecture cannot serve, is refused at submit and at sweep
//! create with the reason, through the real gRPC services on a real
//! database; models no worker has registered yet are still accepted. Labels
//! are checked from the facts kept when a dataset was uploaded.

mod common;

use std::time::Duration;

use common::{state, MODEL};
use ptune_proto::v1;
use serde_json::json;
use tonic::Code;

const T5: &str = "t5-small";
const T5_REFUSED: &str = "base_model: \"t5-small\" has model_type \"t5\", which ptune cannot train; \
                          supported model types: bert, gpt2, llama, mistral, qwen2, roberta";

/// What a worker advertises for a folder whose architecture it cannot train.
fn unsupported_t5() -> v1::BaseModel {
    v1::BaseModel {
        name: T5.into(),
        model_type: "t5".into(),
        unsupported_reason: "supported model types: bert, gpt2, llama, mistral, qwen2, roberta".into(),
        ..Default::default()
    }
}

async fn register(env: &mut common::Env, models: Vec<v1::BaseModel>) -> String {
    env.workers
        .register_worker(v1::RegisterWorkerRequest {
            hostname: "test-host".into(),
            devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 1 << 30, ..Default::default() }],
            slots: 2,
            models,
            ..Default::default()
        })
        .await
        .expect("register")
        .into_inner()
        .worker_id
}

#[tokio::test]
async fn a_model_no_worker_can_train_is_refused_with_its_type_and_what_is_supported() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("on-bert").await;
    let on_t5 = v1::JobSpec { name: "on-t5".into(), base_model: T5.into(), ..spec.clone() };

    // Before any worker knows the name, a job on it waits for one.
    let early = env.submit(v1::JobSpec { name: "early-t5".into(), ..on_t5.clone() }).await;
    assert_eq!(state(&early), v1::JobState::Queued);
    env.jobs.cancel_job(v1::CancelJobRequest { job_id: early.id.clone() }).await.expect("cancel");

    let bert = v1::BaseModel {
        name: MODEL.into(),
        model_type: "bert".into(),
        max_positions: 512,
        sha256: "ab".repeat(32),
        ..Default::default()
    };
    let gpt2 =
        v1::BaseModel { name: "tiny-gpt2".into(), model_type: "gpt2".into(), max_positions: 48, ..Default::default() };
    let worker = register(&mut env, vec![bert, gpt2, unsupported_t5()]).await;

    let err = env.jobs.submit_job(v1::SubmitJobRequest { spec: Some(on_t5.clone()) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), T5_REFUSED);

    // A served decoder cannot take a classification job: it has no pooler.
    let on_gpt2 = v1::JobSpec { name: "on-gpt2".into(), base_model: "tiny-gpt2".into(), ..spec.clone() };
    let err = env.jobs.submit_job(v1::SubmitJobRequest { spec: Some(on_gpt2) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "task: sequence_classification needs an encoder model (bert, roberta), \
         but base_model \"tiny-gpt2\" has model_type \"gpt2\""
    );

    let train = spec.data.as_ref().unwrap().train.clone();
    let eval = spec.data.as_ref().unwrap().eval.clone();
    let sweep = json!({
        "name": "t5-sweep",
        "objective": { "metric": "accuracy", "direction": "maximize" },
        "algorithm": { "type": "grid" },
        "template": {
            "base_model": T5,
            "task": "sequence_classification",
            "method": "prompt_tuning",
            "peft": { "num_virtual_tokens": 10 },
            "data": { "train": train, "eval": eval, "labels": [0, 1], "max_seq_len": 64 },
            "training": { "batch_size": 2, "max_steps": 4 },
        },
        "space": { "training": { "learning_rate": { "values": [0.01, 0.1] } } },
    });
    let err = env
        .sweeps
        .create_sweep(v1::CreateSweepRequest { definition_json: sweep.to_string() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().starts_with("template.base_model: \"t5-small\" has model_type \"t5\", which ptune cannot train"),
        "{}",
        err.message()
    );

    // The model the worker trains is accepted, and is the only one it is leased.
    let job = env.submit(spec).await;
    assert_eq!(state(&job), v1::JobState::Queued);
    let lease = env.lease(&worker).await.expect("the bert job is leased");
    assert_eq!(lease.job_id, job.id);

    // A worker that can train the name makes it admissible again.
    register(&mut env, vec![v1::BaseModel { name: T5.into(), model_type: "t5".into(), ..Default::default() }]).await;
    let accepted = env.submit(on_t5).await;
    assert_eq!(state(&accepted), v1::JobState::Queued);

    let jobs = env.jobs.list_jobs(v1::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 3, "the refused job and sweep stored nothing: {jobs:?}");
    env.stop().await;
}

#[tokio::test]
async fn a_queued_job_says_why_no_worker_takes_it() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("on-bert").await;
    let reason = |env: &mut common::Env, id: String| {
        let mut jobs = env.jobs.clone();
        async move { jobs.get_job(v1::GetJobRequest { job_id: id }).await.unwrap().into_inner().waiting_reason }
    };

    // Queued before any worker knows its model: unschedulable, with the reason.
    let early = env.submit(v1::JobSpec { name: "early-t5".into(), base_model: T5.into(), ..spec.clone() }).await;
    let on_bert = env.submit(spec.clone()).await;
    assert_eq!(
        reason(&mut env, early.id.clone()).await,
        "unschedulable: no registered worker serves base model \"t5-small\"; it waits until one does"
    );
    let listed = env.jobs.list_jobs(v1::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert!(listed.iter().all(|j| j.waiting_reason.starts_with("unschedulable: no registered worker")), "{listed:?}");

    // A worker that finds the model but cannot train it: the reason says so.
    let bert = v1::BaseModel { name: MODEL.into(), model_type: "bert".into(), max_positions: 512, ..Default::default() };
    register(&mut env, vec![bert, unsupported_t5()]).await;
    assert_eq!(
        reason(&mut env, early.id.clone()).await,
        "unschedulable: base model \"t5-small\" has model_type \"t5\", which ptune cannot train; \
         supported model types: bert, gpt2, llama, mistral, qwen2, roberta"
    );
    // The job on the served model only waits for a slot: no reason.
    assert_eq!(reason(&mut env, on_bert.id.clone()).await, "");
    env.stop().await;
}

#[tokio::test]
async fn lora_targets_that_name_no_linear_of_the_model_are_refused_at_submit() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("lora").await;
    let gpt2 =
        v1::BaseModel { name: "tiny-gpt2".into(), model_type: "gpt2".into(), max_positions: 48, ..Default::default() };
    let bert = v1::BaseModel { name: MODEL.into(), model_type: "bert".into(), max_positions: 512, ..Default::default() };
    register(&mut env, vec![bert, gpt2]).await;

    // A causal-LM LoRA job on GPT-2, targeting `targets`.
    let lora_on_gpt2 = |targets: &[&str]| {
        let mut core = ptune_core::JobSpec::try_from(spec.clone()).expect("a valid spec");
        core.base_model = "tiny-gpt2".into();
        core.task = ptune_core::Task::CausalLm;
        core.method = ptune_core::Method::Lora;
        core.peft = ptune_core::PeftConfig {
            target_modules: Some(targets.iter().map(|t| t.to_string()).collect()),
            ..Default::default()
        };
        core.data.labels.clear();
        core.data.max_seq_len = 32;
        core.generation = Some(ptune_core::GenerationConfig { max_new_tokens: 8, num_beams: 1 });
        v1::JobSpec::from(&core)
    };
    let err = env.jobs.submit_job(v1::SubmitJobRequest { spec: Some(lora_on_gpt2(&["query", "value"])) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "peft.target_modules: \"query\" matches no linear layer of this model; \
         allowed: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"
    );
    let accepted = env.submit(lora_on_gpt2(&["c_attn", "mlp.c_fc"])).await;
    assert_eq!(state(&accepted), v1::JobState::Queued);
    env.stop().await;
}

#[tokio::test]
async fn full_fine_tuning_of_a_model_too_large_to_export_is_refused_at_submit_and_sweep_create() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let spec = env.spec("full").await;
    // A 500M-parameter decoder: 2 GB in float32, over the 1 GB a result may take.
    let big = v1::BaseModel {
        name: "big-llama".into(),
        model_type: "llama".into(),
        max_positions: 2048,
        hidden_size: 1024,
        num_layers: 24,
        num_attention_heads: 16,
        parameters: 500_000_000,
        ..Default::default()
    };
    register(&mut env, vec![big]).await;
    let mut core = ptune_core::JobSpec::try_from(spec.clone()).expect("a valid spec");
    core.base_model = "big-llama".into();
    core.task = ptune_core::Task::CausalLm;
    core.method = ptune_core::Method::Full;
    core.peft = ptune_core::PeftConfig::default();
    core.data.labels.clear();
    let err = env.jobs.submit_job(v1::SubmitJobRequest { spec: Some(v1::JobSpec::from(&core)) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("method: full fine-tuning of \"big-llama\" exports the whole model, about 1,907 MiB"),
        "{}",
        err.message()
    );

    let mut template = serde_json::to_value(&core).unwrap();
    template.as_object_mut().unwrap().remove("name");
    let sweep = json!({
        "name": "full-sweep",
        "objective": { "metric": "loss", "direction": "minimize" },
        "algorithm": { "type": "grid" },
        "template": template,
        "space": { "training.learning_rate": { "values": [1e-5, 1e-4] } },
    });
    let err = env.sweeps.create_sweep(v1::CreateSweepRequest { definition_json: sweep.to_string() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("full fine-tuning of \"big-llama\" exports the whole model"), "{}", err.message());

    // LoRA on the same model is small to export.
    core.method = ptune_core::Method::Lora;
    let accepted = env.submit(v1::JobSpec::from(&core)).await;
    assert_eq!(state(&accepted), v1::JobState::Queued);
    env.stop().await;
}

/// The label check at submit reads the facts gathered when the dataset was
/// uploaded, not the file: with the stored bytes of both datasets gone, a
/// job is still admitted, and one declaring other labels is still refused
/// with the line of the first undeclared label. A dataset stored without
/// facts (before they were kept) is read as before.
#[tokio::test]
async fn labels_are_checked_from_the_facts_kept_at_upload_without_reading_the_file() {
    let mut env = common::start(Duration::from_secs(30)).await;
    let spec = env.spec("facts").await;
    let pool = sqlx::PgPool::connect(&env.db.url).await.unwrap();
    let dropped = sqlx::query("DELETE FROM blob_chunks WHERE blob_id IN (SELECT blob_id FROM datasets)")
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert!(dropped >= 2, "both datasets had stored chunks");

    env.submit(spec.clone()).await;
    let mut undeclared = spec.clone();
    undeclared.data.as_mut().unwrap().labels = vec!["1".into(), "2".into()];
    let err = env.jobs.submit_job(v1::SubmitJobRequest { spec: Some(undeclared.clone()) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "data.labels: label \"0\" on line 2 of train.jsonl is not one of the declared labels [\"1\", \"2\"]"
    );

    // Without facts the file is read, and its missing bytes show.
    sqlx::query("UPDATE datasets SET facts = NULL").execute(&pool).await.unwrap();
    let err = env.jobs.submit_job(v1::SubmitJobRequest { spec: Some(spec) }).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    env.stop().await;
}
