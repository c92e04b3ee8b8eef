//! Sweeps through the real SweepService and WorkerService over gRPC, on a
//! real database, trained by the scripted fake worker of
//! `common::sweeps`: grid and random search, diverged trials, extensions,
//! concurrency, and refused definitions. ASHA is `asha.rs`.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::sweeps::*;
use common::MODEL;
use ptune_proto::v1;
use serde_json::{json, Value};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grid_sweep_runs_exactly_the_product_and_ranks_its_trials() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    let space = json!({
        "peft": { "num_virtual_tokens": { "values": [5, 10, 20, 50] } },
        "training": { "learning_rate": { "values": [1e-3, 3e-3, 1e-2, 3e-2] } },
    });
    let created = create(&mut env, &definition("grid", &data, json!({ "type": "grid" }), space)).await.unwrap();
    assert_eq!((sweep_state(&created), created.trial_budget), (v1::SweepState::Running, 16));
    assert_eq!(created.algorithm, v1::SweepAlgorithm::Grid as i32);

    let all = wait_sweep(&mut env, &created.id, 10, |s| s.trials_created == 16).await;
    let trials = by_index(&all);
    let configs: Vec<(u64, f64)> = trials
        .iter()
        .map(|t| {
            let p = params(t);
            (p["peft.num_virtual_tokens"].as_u64().unwrap(), p["training.learning_rate"].as_f64().unwrap())
        })
        .collect();
    let mut product = Vec::new();
    for nvt in [5, 10, 20, 50] {
        for lr in [1e-3, 3e-3, 1e-2, 3e-2] {
            product.push((nvt, lr));
        }
    }
    assert_eq!(configs, product, "trial i is grid configuration i: the product, each once");
    assert_eq!(trials.iter().map(|t| t.index).collect::<Vec<_>>(), (0..16).collect::<Vec<_>>());

    let jobs = env
        .jobs
        .list_jobs(v1::ListJobsRequest { sweep_id: created.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 16);
    for job in &jobs {
        let trial = &trials[job.trial_index as usize];
        assert_eq!((job.sweep_id.as_str(), job.id.as_str()), (created.id.as_str(), trial.job_id.as_str()));
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.name, format!("grid-t{}", job.trial_index));
        assert_eq!(u64::from(prompt_length(spec)), configs[job.trial_index as usize].0, "the spec carries the values");
    }

    let mut worker = FakeWorker::register(&mut env).await;
    let accuracy = |spec: &v1::JobSpec| 0.5 + f64::from(prompt_length(spec)) / 200.0 + learning_rate(spec);
    let log = worker.work(&created.id, |spec| Script::Learn { final_accuracy: accuracy(spec) }).await;
    assert_eq!(log.len(), 16);
    assert!(log.iter().all(|(_, e)| *e == Ended::Completed));

    let done = wait_sweep(&mut env, &created.id, 10, |s| sweep_state(s) == v1::SweepState::Completed).await;
    assert_eq!(done.counts.as_ref().unwrap().succeeded, 16);
    assert!(!done.finished_at.is_empty());
    let ranks: Vec<u32> = done.leaderboard.iter().map(|t| t.rank).collect();
    assert_eq!(ranks, (1..=16).collect::<Vec<_>>(), "the leaderboard comes best first");
    let objectives: Vec<f64> = done.leaderboard.iter().map(|t| t.objective.unwrap()).collect();
    assert!(objectives.windows(2).all(|w| w[0] >= w[1]), "{objectives:?}");
    let best = done.best_trial.as_ref().unwrap();
    assert_eq!((best.index, params(best)), (15, json!({ "peft.num_virtual_tokens": 50, "training.learning_rate": 0.03 })));
    assert!(!best.adapter_sha256.is_empty());
    assert!((best.objective.unwrap() - 0.78).abs() < 1e-9);
    env.stop().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sweeps_are_reproducible_from_their_seed() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    let space = json!({
        "peft.num_virtual_tokens": { "type": "int_range", "min": 5, "max": 50, "step": 5 },
        "peft.init": { "values": ["random", "vocab"] },
        "training.learning_rate": { "type": "log_uniform", "min": 1e-3, "max": 1e-1 },
    });
    let random = |seed: u64| definition("random", &data, json!({ "type": "random", "num_trials": 5, "seed": seed }), space.clone());
    let mut runs = Vec::new();
    for seed in [7, 7, 8] {
        let sweep = create(&mut env, &random(seed)).await.unwrap();
        let all = wait_sweep(&mut env, &sweep.id, 10, |s| s.trials_created == 5).await;
        runs.push((sweep.id, by_index(&all).iter().map(params).collect::<Vec<_>>()));
    }
    assert_eq!(runs[0].1, runs[1].1, "the same seed draws the same trials");
    assert_ne!(runs[0].1, runs[2].1, "another seed draws others");
    assert_eq!(runs[0].1, expected_params(&random(7), 5), "trial i is drawn from (seed, i)");
    let lrs: HashSet<String> = runs[0].1.iter().map(|p| p["training.learning_rate"].to_string()).collect();
    assert_eq!(lrs.len(), 5);

    let first = get_sweep(&mut env.sweeps, &runs[0].0).await.unwrap();
    let job = env.get(&by_index(&first)[3].job_id).await;
    let spec = job.spec.unwrap();
    assert_eq!(u64::from(prompt_length(&spec)), runs[0].1[3]["peft.num_virtual_tokens"].as_u64().unwrap());
    assert_eq!(learning_rate(&spec), runs[0].1[3]["training.learning_rate"].as_f64().unwrap());

    let page = env
        .sweeps
        .list_sweeps(v1::ListSweepsRequest { page_size: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.sweeps.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), [runs[2].0.as_str(), runs[1].0.as_str()]);
    assert!(page.sweeps.iter().all(|s| s.leaderboard.is_empty()), "listings carry no leaderboards");
    let rest = env
        .sweeps
        .list_sweeps(v1::ListSweepsRequest { page_size: 2, page_token: page.next_page_token, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.sweeps.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), [runs[0].0.as_str()]);
    assert!(rest.next_page_token.is_empty());
    env.stop().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diverged_trials_fail_and_the_sweep_completes_unless_too_many_fail() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    let script = |spec: &v1::JobSpec| {
        let lr = learning_rate(spec);
        if lr == 0.5 {
            Script::NanLossAt(3)
        } else if lr == 0.9 {
            Script::FailsDivergedAt(2)
        } else {
            Script::Learn { final_accuracy: 0.6 + lr }
        }
    };
    let mut def = definition(
        "diverging",
        &data,
        json!({ "type": "grid" }),
        json!({ "training.learning_rate": { "values": [0.01, 0.5, 0.02, 0.9] } }),
    );
    def["max_failed_trials"] = json!(2);
    let sweep = create(&mut env, &def).await.unwrap();
    let mut worker = FakeWorker::register(&mut env).await;
    let log = worker.work(&sweep.id, script).await;
    assert_eq!(log.iter().filter(|(_, e)| *e == Ended::Diverged).count(), 2);

    let done = wait_sweep(&mut env, &sweep.id, 10, |s| sweep_state(s) != v1::SweepState::Running).await;
    assert_eq!(sweep_state(&done), v1::SweepState::Completed, "{}", done.error);
    let counts = done.counts.unwrap();
    assert_eq!((counts.succeeded, counts.failed, counts.diverged), (2, 2, 2));
    let trials = by_index(&done);
    for i in [1, 3] {
        assert_eq!((trial_state(&trials[i]), trials[i].failure_reason.as_str()), (v1::TrialState::Failed, "diverged"));
        assert_eq!(trials[i].rank, 0, "a diverged trial is not ranked");
    }
    assert_eq!(trials[1].error, "diverged: loss became NaN at step 3", "the coordinator failed the NaN loss itself");
    assert_eq!(trials[3].error, "diverged: loss became NaN at step 2");
    assert_eq!(common::state(&env.get(&trials[1].job_id).await), v1::JobState::Failed);
    assert_eq!(done.best_trial.unwrap().index, 2);

    // With no failure allowed, the first divergence fails the sweep and nothing more starts.
    def["max_failed_trials"] = json!(0);
    def["max_concurrent_trials"] = json!(1);
    def["space"] = json!({ "training.learning_rate": { "values": [0.9, 0.01, 0.02] } });
    let strict = create(&mut env, &def).await.unwrap();
    worker.work(&strict.id, script).await;
    let failed = wait_sweep(&mut env, &strict.id, 10, |s| sweep_state(s) != v1::SweepState::Running).await;
    assert_eq!(sweep_state(&failed), v1::SweepState::Failed);
    assert!(failed.error.starts_with("1 trials failed, more than max_failed_trials 0; last error: diverged:"), "{}", failed.error);
    assert_eq!(failed.trials_created, 1);
    env.stop().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_add_unseen_configurations_until_the_space_runs_out() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    let def = definition(
        "extend",
        &data,
        json!({ "type": "random", "num_trials": 3, "seed": 5 }),
        json!({
            "peft.num_virtual_tokens": { "values": [5, 10, 20] },
            "training.learning_rate": { "values": [0.01, 0.03] },
        }),
    );
    let sweep = create(&mut env, &def).await.unwrap();
    let mut worker = FakeWorker::register(&mut env).await;
    let script = |spec: &v1::JobSpec| Script::Learn { final_accuracy: 0.5 + learning_rate(spec) };
    worker.work(&sweep.id, script).await;
    wait_sweep(&mut env, &sweep.id, 10, |s| sweep_state(s) == v1::SweepState::Completed).await;

    let sweeps = env.sweeps.clone();
    let extend = |n: u32| {
        let (mut client, id) = (sweeps.clone(), sweep.id.clone());
        async move { client.extend_sweep(v1::ExtendSweepRequest { sweep_id: id, trials: n }).await.map(|r| r.into_inner()) }
    };
    let err = extend(4).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("can take only 3 more trials"), "{}", err.message());
    let extended = extend(2).await.unwrap();
    assert_eq!((sweep_state(&extended), extended.trial_budget), (v1::SweepState::Running, 5));
    worker.work(&sweep.id, script).await;
    extend(1).await.unwrap();
    worker.work(&sweep.id, script).await;
    let done = wait_sweep(&mut env, &sweep.id, 10, |s| sweep_state(s) == v1::SweepState::Completed).await;
    let trials = by_index(&done);
    assert_eq!(trials.len(), 6);
    let configs: Vec<Value> = trials.iter().map(params).collect();
    assert_eq!(configs.iter().map(Value::to_string).collect::<HashSet<_>>().len(), 6, "no configuration repeats");
    assert_eq!(configs, expected_params(&def, 6), "extensions continue the seeded sequence");
    assert_eq!(extend(1).await.unwrap_err().code(), Code::FailedPrecondition, "all 6 configurations are used");
    assert_eq!(extend(0).await.unwrap_err().code(), Code::InvalidArgument);

    let grid = create(&mut env, &definition("g", &data, json!({ "type": "grid" }), json!({ "peft.num_virtual_tokens": { "values": [5] } })))
        .await
        .unwrap();
    let err = env.sweeps.extend_sweep(v1::ExtendSweepRequest { sweep_id: grid.id, trials: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("grid search"), "{}", err.message());
    env.stop().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_trials_limits_unfinished_trials_and_can_change_while_running() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    let mut def = definition(
        "concurrency",
        &data,
        json!({ "type": "random", "num_trials": 6 }),
        json!({ "training.learning_rate": { "type": "log_uniform", "min": 1e-3, "max": 1e-1 } }),
    );
    def["max_concurrent_trials"] = json!(1);
    let sweep = create(&mut env, &def).await.unwrap();
    let sweeps = env.sweeps.clone();
    let settled = |n: u32| {
        let (mut client, id) = (sweeps.clone(), sweep.id.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            assert_eq!(get_sweep(&mut client, &id).await.unwrap().trials_created, n, "still {n} trials after several passes");
        }
    };
    wait_sweep(&mut env, &sweep.id, 10, |s| s.trials_created == 1).await;
    settled(1).await;

    let update = |n: u32| {
        let (mut client, id) = (sweeps.clone(), sweep.id.clone());
        async move {
            client
                .update_sweep(v1::UpdateSweepRequest { sweep_id: id, max_concurrent_trials: n })
                .await
                .map(|r| r.into_inner())
        }
    };
    assert_eq!(update(3).await.unwrap().max_concurrent_trials, 3);
    wait_sweep(&mut env, &sweep.id, 10, |s| s.trials_created == 3).await;
    settled(3).await;
    let err = update(0).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "max_concurrent_trials: must be between 1 and 1000, got 0"));

    // Lowered to 1 with 3 queued: finishing one leaves 2 unfinished, so none is added.
    update(1).await.unwrap();
    let worker = env.register().await;
    let lease = env.lease(&worker).await.unwrap();
    env.complete(&lease, b"adapter").await.unwrap();
    settled(3).await;

    let cancelled = env.sweeps.cancel_sweep(v1::CancelSweepRequest { sweep_id: sweep.id.clone() }).await.unwrap().into_inner();
    assert_eq!(sweep_state(&cancelled), v1::SweepState::Cancelled);
    let counts = cancelled.counts.unwrap();
    assert_eq!((counts.succeeded, counts.cancelled, counts.queued), (1, 2, 0), "queued trials are cancelled with the sweep");
    let again = env.sweeps.cancel_sweep(v1::CancelSweepRequest { sweep_id: sweep.id.clone() }).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert_eq!(update(2).await.unwrap_err().code(), Code::FailedPrecondition);
    settled(3).await;
    env.stop().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_definitions_are_refused_naming_the_field_and_store_nothing() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    let grid = json!({ "type": "grid" });
    let sweeps = env.sweeps.clone();
    let refused = |definition: Value| {
        let mut client = sweeps.clone();
        async move {
            let err = client
                .create_sweep(v1::CreateSweepRequest { definition_json: definition.to_string() })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
            err.message().to_string()
        }
    };

    assert!(refused(definition("x", &data, grid.clone(), json!({}))).await.starts_with("space: must define at least one parameter"));
    assert_eq!(
        refused(definition(
            "x",
            &data,
            json!({ "type": "random", "num_trials": 3 }),
            json!({ "training": { "learning_rate": { "type": "log_uniform", "min": 0, "max": 0.1 } } })
        ))
        .await,
        "space.training.learning_rate: log-uniform bounds must be > 0, got 0"
    );
    let big = json!({
        "peft.num_virtual_tokens": { "type": "int_range", "min": 1, "max": 100 },
        "training.learning_rate": { "values": [0.01, 0.02, 0.03] },
    });
    let message = refused(definition("x", &data, json!({ "type": "grid", "max_trials": 200 }), big)).await;
    assert!(message.starts_with("space: the grid has 300 or more configurations, more than the cap of 200"), "{message}");
    assert_eq!(
        refused(definition("x", &data, grid.clone(), json!({ "peft.num_virtual_tokens": { "values": [5, 600] } }))).await,
        "space.peft.num_virtual_tokens: prompt length must be between 1 and 512, got 600"
    );
    let missing = (format!("sha256:{}", "0".repeat(64)), data.1.clone());
    assert_eq!(
        refused(definition("x", &missing, grid.clone(), json!({ "peft.num_virtual_tokens": { "values": [5] } }))).await,
        format!("template.data.train: dataset {} is not uploaded; upload it with UploadDataset first", missing.0)
    );
    assert!(refused(json!({ "name": "x" })).await.starts_with("definition: missing field"));
    let err = env.sweeps.create_sweep(v1::CreateSweepRequest { definition_json: "{not json".into() }).await.unwrap_err();
    assert!(err.message().starts_with("definition_json: is not valid JSON"), "{}", err.message());

    // Once a worker says how many positions the model has, every trial's prompt must fit.
    env.workers
        .register_worker(v1::RegisterWorkerRequest {
            hostname: "h".into(),
            slots: 1,
            models: vec![v1::BaseModel { name: MODEL.into(), max_positions: 80, ..Default::default() }],
            ..Default::default()
        })
        .await
        .unwrap();
    let message = refused(definition("x", &data, grid, json!({ "peft.num_virtual_tokens": { "values": [5, 20] } }))).await;
    assert!(
        message.starts_with("space.peft.num_virtual_tokens: prompt length 20 plus data.max_seq_len 64 exceeds the 80 positions"),
        "{message}"
    );

    let listed = env.sweeps.list_sweeps(v1::ListSweepsRequest::default()).await.unwrap().into_inner();
    assert!(listed.sweeps.is_empty(), "refused definitions store nothing");
    let jobs = env.jobs.list_jobs(v1::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert!(jobs.is_empty());
    env.stop().await;
}