//! Sweeps through the real SweepService and WorkerService over gRPC, on a
//! real database. A scripted fake worker trains nothing: it reports synthetic
//! evaluation curves, so every decision of the algorithms can be checked
//! exactly, including across coordinator restarts.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use common::{metric, Env, EVAL, MODEL, TRAIN};
use ptune_core::sweep::{decide, Decision, Direction, RungValue, SweepDefinition};
use ptune_proto::v1::sweep_service_client::SweepServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
use ptune_proto::v1::{self, complete_job_chunk::Part};
use serde_json::{json, Value};
use sqlx::PgPool;
use ptune_proto::client::AuthChannel;
use tonic::{Code, Status};

// ---------------------------------------------------------------- helpers

async fn datasets(env: &mut Env) -> (String, String) {
    (env.upload("train.jsonl", TRAIN).await.reference, env.upload("eval.jsonl", EVAL).await.reference)
}

/// A sweep over the test model and datasets; trials run 4 steps unless ASHA says otherwise.
fn definition(name: &str, (train, eval): &(String, String), algorithm: Value, space: Value) -> Value {
    json!({
        "name": name,
        "owner": "alice",
        "max_concurrent_trials": 16,
        "objective": { "metric": "accuracy", "direction": "maximize" },
        "algorithm": algorithm,
        "template": {
            "base_model": MODEL,
            "task": "sequence_classification",
            "method": "prompt_tuning",
            "peft": { "num_virtual_tokens": 10 },
            "data": { "train": train, "eval": eval, "labels": [0, 1], "max_seq_len": 64 },
            "training": { "learning_rate": 0.01, "batch_size": 2, "max_steps": 4 },
        },
        "space": space,
    })
}

async fn create(env: &mut Env, definition: &Value) -> Result<v1::Sweep, Status> {
    let request = v1::CreateSweepRequest { definition_json: definition.to_string() };
    env.sweeps.create_sweep(request).await.map(|r| r.into_inner())
}

async fn get_sweep(client: &mut SweepServiceClient<AuthChannel>, id: &str) -> Result<v1::Sweep, Status> {
    client.get_sweep(v1::GetSweepRequest { sweep_id: id.to_string() }).await.map(|r| r.into_inner())
}

/// Polls the sweep until `done` holds, for at most `secs` seconds.
async fn wait_sweep(env: &mut Env, id: &str, secs: u64, done: impl Fn(&v1::Sweep) -> bool) -> v1::Sweep {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let sweep = get_sweep(&mut env.sweeps, id).await.expect("get sweep");
        if done(&sweep) {
            return sweep;
        }
        assert!(tokio::time::Instant::now() < deadline, "sweep did not get there within {secs} s: {sweep:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sweep_state(s: &v1::Sweep) -> v1::SweepState {
    v1::SweepState::try_from(s.state).unwrap()
}

fn trial_state(t: &v1::Trial) -> v1::TrialState {
    v1::TrialState::try_from(t.state).unwrap()
}

fn params(t: &v1::Trial) -> Value {
    serde_json::from_str(&t.params_json).unwrap()
}

fn by_index(s: &v1::Sweep) -> Vec<v1::Trial> {
    let mut trials = s.leaderboard.clone();
    trials.sort_by_key(|t| t.index);
    trials
}

/// The parameters the definition gives trials `0..n`, as the engine draws them.
fn expected_params(definition: &Value, n: u32) -> Vec<Value> {
    let def = SweepDefinition::from_json(definition).unwrap();
    let mut taken = HashSet::new();
    (0..n)
        .map(|i| {
            let p = def.params_for(i, &taken).unwrap();
            taken.insert(p.key());
            p.to_json()
        })
        .collect()
}

/// Retries a call while the coordinator is unreachable (restarting).
async fn retry<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    for _ in 0..600 {
        match call().await {
            Err(s) if !matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound) => {
                tokio::time::sleep(Duration::from_millis(25)).await
            }
            other => return other,
        }
    }
    call().await
}

// ------------------------------------------------------------ fake worker

/// What a scripted trial reports.
#[derive(Clone, Copy, Debug)]
enum Script {
    /// Eval accuracy `final_accuracy * step / max_steps` at every evaluation.
    Learn { final_accuracy: f64 },
    /// Its training loss is NaN at this step; the coordinator notices.
    NanLossAt(u64),
    /// It fails itself at this step as diverged, as a worker reports it.
    FailsDivergedAt(u64),
    /// Eval accuracy stuck at the majority class (0.52) at every evaluation,
    /// with this eval loss.
    Plateau { eval_loss: f64 },
}

impl Script {
    fn accuracy(self, step: u64, max: u64) -> f64 {
        let last = match self {
            Script::Learn { final_accuracy } => final_accuracy,
            Script::NanLossAt(_) | Script::FailsDivergedAt(_) => 0.5,
            Script::Plateau { .. } => return 0.52,
        };
        last * step as f64 / max as f64
    }

    /// The eval loss it reports beside the accuracy, if any.
    fn eval_loss(self) -> Option<f64> {
        match self {
            Script::Plateau { eval_loss } => Some(eval_loss),
            _ => None,
        }
    }
}

/// How a trial ended, as the fake worker saw it.
#[derive(Clone, Debug, PartialEq)]
enum Ended {
    Completed,
    EarlyStopped { step: u64 },
    Cancelled,
    Diverged,
}

/// A worker that speaks the real WorkerService but trains nothing.
#[derive(Clone)]
struct FakeWorker {
    client: WorkerServiceClient<AuthChannel>,
    sweeps: SweepServiceClient<AuthChannel>,
    id: String,
    db: PgPool,
    /// Steps at which it waits for the sweep's decision before going on (ASHA rungs).
    rungs: Vec<u64>,
    /// Trials whose early stop it acknowledges as workers that predate early
    /// stops do: FailJob{cancelled: true}, no adapter.
    legacy_ack: HashSet<u32>,
    step_delay: Duration,
}

impl FakeWorker {
    async fn register(env: &mut Env) -> Self {
        let id = env.register().await;
        let db = PgPool::connect(&env.db.url).await.unwrap();
        FakeWorker {
            client: env.workers.clone(),
            sweeps: env.sweeps.clone(),
            id,
            db,
            rungs: Vec::new(),
            legacy_ack: HashSet::new(),
            step_delay: Duration::ZERO,
        }
    }

    /// Trains leased trials until the sweep stops running; returns what
    /// happened to each trial it ran, in order.
    async fn work(&mut self, sweep_id: &str, script: impl Fn(&v1::JobSpec) -> Script) -> Vec<(u32, Ended)> {
        let mut log = Vec::new();
        loop {
            let request = v1::LeaseJobRequest { worker_id: self.id.clone(), free_slots: 1, ..Default::default() };
            let client = self.client.clone();
            let lease = retry(|| {
                let (mut client, request) = (client.clone(), request.clone());
                async move { client.lease_job(request).await.map(|r| r.into_inner().lease) }
            })
            .await
            .expect("lease");
            if let Some(lease) = lease {
                let spec = lease.spec.clone().unwrap();
                let index: u32 = spec.name.rsplit("-t").next().unwrap().parse().unwrap();
                let ended = self.run(&lease, index, script(&spec)).await;
                log.push((index, ended));
                continue;
            }
            let sweeps = self.sweeps.clone();
            let sweep = retry(|| {
                let mut sweeps = sweeps.clone();
                async move { get_sweep(&mut sweeps, sweep_id).await }
            })
            .await
            .expect("get sweep");
            if sweep_state(&sweep) != v1::SweepState::Running {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn run(&mut self, lease: &v1::Lease, index: u32, script: Script) -> Ended {
        let training = lease.spec.as_ref().unwrap().training.unwrap();
        let (max, every) = (training.max_steps, training.eval_every);
        for step in 1..=max {
            tokio::time::sleep(self.step_delay).await;
            if matches!(script, Script::FailsDivergedAt(s) if s == step) {
                self.fail(lease, &format!("diverged: loss became NaN at step {step}"), false).await;
                return Ended::Diverged;
            }
            let loss = if matches!(script, Script::NanLossAt(s) if s == step) { f64::NAN } else { 1.0 / step as f64 };
            let mut metrics = vec![metric(step, "train", "loss", loss)];
            let evaluated = (every > 0 && step % every == 0) || step == max;
            if evaluated {
                metrics.push(metric(step, "eval", "accuracy", script.accuracy(step, max)));
                metrics.extend(script.eval_loss().map(|loss| metric(step, "eval", "loss", loss)));
            }
            let reply = self.report(lease, step, max, metrics).await;
            match v1::StopReason::try_from(reply.stop_reason).unwrap() {
                v1::StopReason::Unspecified => assert!(!reply.stop),
                v1::StopReason::Diverged => {
                    assert!(reply.stop, "every stop reason comes with stop = true");
                    return Ended::Diverged;
                }
                v1::StopReason::Cancelled => {
                    self.fail(lease, "stopped on request", true).await;
                    return Ended::Cancelled;
                }
                v1::StopReason::EarlyStopped => return self.ack_early_stop(lease, index, step, script, max).await,
            }
            if evaluated && self.rungs.contains(&step) && self.decision(&lease.job_id, step).await == "stop" {
                let beat = self.heartbeat(lease).await;
                let this = v1::LeaseRef { job_id: lease.job_id.clone(), epoch: lease.epoch, ..Default::default() };
                assert_eq!((beat.early_stop, beat.stop), (vec![this], vec![]), "heartbeats name early stops apart");
                let reply = self.report(lease, step, max, Vec::new()).await;
                assert!(reply.stop);
                assert_eq!(reply.stop_reason, v1::StopReason::EarlyStopped as i32);
                return self.ack_early_stop(lease, index, step, script, max).await;
            }
        }
        self.complete(lease, max, script.accuracy(max, max)).await;
        Ended::Completed
    }

    async fn ack_early_stop(&mut self, lease: &v1::Lease, index: u32, step: u64, script: Script, max: u64) -> Ended {
        if self.legacy_ack.contains(&index) {
            self.fail(lease, "stopped on request", true).await;
        } else {
            self.complete(lease, step, script.accuracy(step, max)).await;
        }
        Ended::EarlyStopped { step }
    }

    /// Waits until the sweep has decided about this job at this rung step.
    async fn decision(&self, job_id: &str, step: u64) -> String {
        for _ in 0..1000 {
            let decision: Option<String> = sqlx::query_scalar(
                "SELECT d.decision FROM asha_decisions d \
                 JOIN jobs j ON j.sweep_id = d.sweep_id AND j.trial_index = d.trial_index \
                 WHERE j.id = $1::uuid AND d.rung_step = $2",
            )
            .bind(job_id)
            .bind(step as i64)
            .fetch_optional(&self.db)
            .await
            .unwrap();
            if let Some(decision) = decision {
                return decision;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no decision for job {job_id} at step {step}");
    }

    async fn report(&self, lease: &v1::Lease, step: u64, total: u64, metrics: Vec<v1::Metric>) -> v1::ReportProgressResponse {
        let request =
            v1::ReportProgressRequest {
                job_id: lease.job_id.clone(),
                epoch: lease.epoch,
                step,
                total_steps: total,
                metrics,
                lease_token: lease.lease_token.clone(),
            };
        let client = self.client.clone();
        retry(|| {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.report_progress(request).await.map(|r| r.into_inner()) }
        })
        .await
        .expect("progress report")
    }

    async fn heartbeat(&self, lease: &v1::Lease) -> v1::HeartbeatResponse {
        let request = v1::HeartbeatRequest {
            worker_id: self.id.clone(),
            leases: vec![v1::LeaseRef {
                job_id: lease.job_id.clone(),
                epoch: lease.epoch,
                lease_token: lease.lease_token.clone(),
            }],
            ..Default::default()
        };
        let client = self.client.clone();
        retry(|| {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.heartbeat(request).await.map(|r| r.into_inner()) }
        })
        .await
        .expect("heartbeat")
    }

    async fn complete(&self, lease: &v1::Lease, step: u64, accuracy: f64) {
        let adapter = format!("adapter of {} at step {step}", lease.job_id).into_bytes();
        let header = v1::CompleteJobHeader {
            job_id: lease.job_id.clone(),
            epoch: lease.epoch,
            adapter_sha256: common::sha256(&adapter),
            adapter_size: adapter.len() as u64,
            metrics: vec![metric(step, "eval", "accuracy", accuracy)],
            step,
            lease_token: lease.lease_token.clone(),
            ..Default::default()
        };
        let client = self.client.clone();
        retry(|| {
            let mut client = client.clone();
            let parts = vec![
                v1::CompleteJobChunk { part: Some(Part::Header(header.clone())) },
                v1::CompleteJobChunk { part: Some(Part::Data(adapter.clone())) },
            ];
            async move { client.complete_job(futures::stream::iter(parts)).await.map(|_| ()) }
        })
        .await
        .expect("completion");
    }

    async fn fail(&self, lease: &v1::Lease, error: &str, cancelled: bool) {
        let request = v1::FailJobRequest {
            job_id: lease.job_id.clone(),
            epoch: lease.epoch,
            error: error.into(),
            cancelled,
            retryable: false,
            infrastructure: false,
            lease_token: lease.lease_token.clone(),
        };
        let client = self.client.clone();
        retry(|| {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.fail_job(request).await.map(|_| ()) }
        })
        .await
        .expect("failure report");
    }
}

fn learning_rate(spec: &v1::JobSpec) -> f64 {
    spec.training.as_ref().unwrap().learning_rate
}

fn prompt_length(spec: &v1::JobSpec) -> u32 {
    spec.peft.as_ref().unwrap().num_virtual_tokens.expect("the coordinator sends the prompt length")
}

// ------------------------------------------------------------------ tests

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

/// Nine trials in grid order, one at a time, final accuracies
/// 0.5 0.7 0.7 0.9 0.4 0.8 0.3 0.95 0.65, reported as `final * step / 18`.
/// Rungs at steps 2 and 6 (η = 3, maximum 18). With n values at a rung, the
/// top max(1, ⌊n/3⌋) continue, earlier values winning ties:
///   rung 0: t0 t1 go on (first, best of 2); t2 stops (it only ties t1); t3 goes on;
///           t4 stops; t5 goes on (2nd of 6, top 2); t6 stops; t7 goes on;
///           t8 stops (5th of 9, top 3).
///   rung 1: t0 t1 t3 go on (each best so far); t5 stops (2nd of 4, top 1); t7 goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asha_stops_and_promotes_trials_by_the_rule_on_synthetic_curves() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    let finals = [0.5, 0.7, 0.7, 0.9, 0.4, 0.8, 0.3, 0.95, 0.65];
    let lrs: Vec<f64> = (1..=9).map(|i| f64::from(i) / 100.0).collect();
    let mut def = definition(
        "asha",
        &data,
        json!({ "type": "asha", "sampler": "grid", "min_resource": 2, "max_resource": 18, "reduction_factor": 3 }),
        json!({ "training.learning_rate": { "values": lrs } }),
    );
    def["max_concurrent_trials"] = json!(1);
    let created = create(&mut env, &def).await.unwrap();
    assert_eq!((created.rung_steps.as_slice(), created.max_steps, created.trial_budget), (&[2, 6][..], 18, 9));

    let mut worker = FakeWorker::register(&mut env).await;
    worker.rungs = vec![2, 6];
    worker.legacy_ack = HashSet::from([8]);
    let log = worker
        .work(&created.id, |spec| {
            let training = spec.training.as_ref().unwrap();
            assert_eq!((training.max_steps, training.eval_every), (18, 2), "trials run to the maximum, evaluating on every rung");
            Script::Learn { final_accuracy: finals[(learning_rate(spec) * 100.0).round() as usize - 1] }
        })
        .await;
    let stopped_at: HashMap<u32, u64> =
        log.iter().filter_map(|(i, e)| if let Ended::EarlyStopped { step } = e { Some((*i, *step)) } else { None }).collect();
    assert_eq!(stopped_at, HashMap::from([(2, 2), (4, 2), (6, 2), (8, 2), (5, 6)]));

    let done = wait_sweep(&mut env, &created.id, 10, |s| sweep_state(s) == v1::SweepState::Completed).await;
    let decisions: BTreeSet<(i32, i32, String)> =
        sqlx::query_as("SELECT trial_index, rung, decision FROM asha_decisions WHERE sweep_id = $1::uuid")
            .bind(&created.id)
            .fetch_all(&worker.db)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let expected: BTreeSet<(i32, i32, String)> = [
        (0, 0, "promote"), (1, 0, "promote"), (2, 0, "stop"), (3, 0, "promote"), (4, 0, "stop"),
        (5, 0, "promote"), (6, 0, "stop"), (7, 0, "promote"), (8, 0, "stop"),
        (0, 1, "promote"), (1, 1, "promote"), (3, 1, "promote"), (5, 1, "stop"), (7, 1, "promote"),
    ]
    .into_iter()
    .map(|(t, r, d)| (t, r, d.to_string()))
    .collect();
    assert_eq!(decisions, expected);

    let trials = by_index(&done);
    let states: Vec<(v1::TrialState, Option<u32>)> = trials.iter().map(|t| (trial_state(t), t.stopped_rung)).collect();
    use v1::TrialState::{EarlyStopped as E, Succeeded as S};
    assert_eq!(
        states,
        [(S, None), (S, None), (E, Some(0)), (S, None), (E, Some(0)), (E, Some(1)), (E, Some(0)), (S, None), (E, Some(0))]
    );
    let steps: u64 = trials.iter().map(|t| t.step).sum();
    assert_eq!(steps, 4 * 18 + 6 + 4 * 2, "trial-steps spent: 86 against 162 for the full grid");
    assert!((trials[5].objective.unwrap() - 0.8 * 6.0 / 18.0).abs() < 1e-9, "a stopped trial keeps its rung value");
    assert_eq!(trials[5].objective_step, 6);
    assert!(!trials[5].adapter_sha256.is_empty(), "a trial stopped with a new worker keeps its adapter");
    assert!(trials[8].adapter_sha256.is_empty(), "a legacy acknowledgement leaves no adapter");
    let legacy = env.get(&trials[8].job_id).await;
    assert_eq!((common::state(&legacy), legacy.early_stopped), (v1::JobState::Cancelled, true));
    let stopped = env.get(&trials[5].job_id).await;
    assert_eq!((common::state(&stopped), stopped.early_stopped, stopped.step), (v1::JobState::Succeeded, true, 6));
    assert!(!env.get(&trials[7].job_id).await.early_stopped);

    let counts = done.counts.unwrap();
    assert_eq!((counts.succeeded, counts.early_stopped, counts.failed), (4, 5, 0));
    let best = done.best_trial.unwrap();
    assert_eq!(best.index, 7);
    assert!((best.objective.unwrap() - 0.95).abs() < 1e-9);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asha_breaks_ties_on_a_plateau_with_the_eval_loss() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    // Every trial's accuracy is the majority class at the rung; only the
    // eval loss tells them apart.
    let losses = [0.70, 0.69, 0.60, 0.71, 0.50, 0.65];
    let lrs: Vec<f64> = (1..=6).map(|i| f64::from(i) / 100.0).collect();
    let mut def = definition(
        "plateau",
        &data,
        json!({ "type": "asha", "sampler": "grid", "min_resource": 2, "max_resource": 6, "reduction_factor": 3 }),
        json!({ "training.learning_rate": { "values": lrs } }),
    );
    def["max_concurrent_trials"] = json!(1);
    let created = create(&mut env, &def).await.unwrap();
    assert_eq!(created.rung_steps, [2]);
    let mut worker = FakeWorker::register(&mut env).await;
    worker.rungs = vec![2];
    worker
        .work(&created.id, |spec| Script::Plateau { eval_loss: losses[(learning_rate(spec) * 100.0).round() as usize - 1] })
        .await;
    wait_sweep(&mut env, &created.id, 10, |s| sweep_state(s) == v1::SweepState::Completed).await;
    let decisions: Vec<(i32, String, Option<f64>)> = sqlx::query_as(
        "SELECT trial_index, decision, tiebreak FROM asha_decisions WHERE sweep_id = $1::uuid ORDER BY trial_index",
    )
    .bind(&created.id)
    .fetch_all(&worker.db)
    .await
    .unwrap();
    // A lower loss than every value ahead promotes (0, 1, 2, 4); without the
    // tie-breaker the first trial alone would have gone on.
    let expected: Vec<(i32, String, Option<f64>)> = ["promote", "promote", "promote", "stop", "promote", "stop"]
        .iter()
        .enumerate()
        .map(|(i, d)| (i as i32, d.to_string(), Some(losses[i])))
        .collect();
    assert_eq!(decisions, expected);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restart_mid_sweep_loses_and_duplicates_nothing() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    let mut def = definition(
        "restart",
        &data,
        json!({ "type": "asha", "num_trials": 8, "seed": 11, "min_resource": 2, "max_resource": 12, "reduction_factor": 2 }),
        json!({
            "peft.num_virtual_tokens": { "values": [5, 10] },
            "training.learning_rate": { "type": "log_uniform", "min": 1e-3, "max": 1e-1 },
        }),
    );
    def["max_concurrent_trials"] = json!(2);
    let created = create(&mut env, &def).await.unwrap();
    assert_eq!(created.rung_steps, [2, 4, 8]);

    let mut worker = FakeWorker::register(&mut env).await;
    worker.rungs = vec![2, 4, 8];
    worker.step_delay = Duration::from_millis(15);
    let id = created.id.clone();
    let working = tokio::spawn(async move {
        worker
            .work(&id, |spec| {
                let lr = learning_rate(spec);
                Script::Learn { final_accuracy: 0.9 - (lr.log10() + 2.0).abs() * 0.3 + f64::from(prompt_length(spec)) / 1000.0 }
            })
            .await
    });

    let terminal = |s: &v1::Sweep| {
        let c = s.counts.as_ref().unwrap();
        c.succeeded + c.early_stopped + c.failed + c.cancelled
    };
    wait_sweep(&mut env, &created.id, 30, |s| terminal(s) >= 2 && s.counts.as_ref().unwrap().running >= 1).await;
    env.restart_in_place().await;
    wait_sweep(&mut env, &created.id, 30, |s| terminal(s) >= 5 && s.counts.as_ref().unwrap().running >= 1).await;
    env.restart_in_place().await;
    let done = wait_sweep(&mut env, &created.id, 60, |s| sweep_state(s) == v1::SweepState::Completed).await;
    let log = working.await.unwrap();

    let trials = by_index(&done);
    assert_eq!(trials.iter().map(|t| t.index).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>(), "no trial lost or doubled");
    assert_eq!(trials.iter().map(|t| t.job_id.clone()).collect::<HashSet<_>>().len(), 8);
    assert_eq!(trials.iter().map(params).collect::<Vec<_>>(), expected_params(&def, 8));
    let mut ran: Vec<u32> = log.iter().map(|(i, _)| *i).collect();
    ran.sort();
    assert_eq!(ran, (0..8).collect::<Vec<_>>(), "every trial was leased and run exactly once");
    assert!(trials.iter().all(|t| matches!(trial_state(t), v1::TrialState::Succeeded | v1::TrialState::EarlyStopped)));

    // Every decision, replayed in the order taken, follows the rule; each
    // (trial, rung) has exactly one, and none follows a stop.
    let rows: Vec<(i32, i32, String, f64, Option<f64>)> = sqlx::query_as(
        "SELECT trial_index, rung, decision, value, tiebreak FROM asha_decisions WHERE sweep_id = $1::uuid ORDER BY decided_at",
    )
    .bind(&created.id)
    .fetch_all(&PgPool::connect(&env.db.url).await.unwrap())
    .await
    .unwrap();
    let mut at_rung: Vec<Vec<RungValue>> = vec![Vec::new(); 3];
    let mut per_trial: HashMap<i32, Vec<(i32, String)>> = HashMap::new();
    for (trial, rung, decision, value, tiebreak) in &rows {
        let value = RungValue::new(*value, *tiebreak);
        let expected = decide(&at_rung[*rung as usize], value, 2, Direction::Maximize);
        assert_eq!(decision, if expected == Decision::Stop { "stop" } else { "promote" }, "trial {trial} rung {rung}");
        at_rung[*rung as usize].push(value);
        per_trial.entry(*trial).or_default().push((*rung, decision.clone()));
    }
    for t in &trials {
        let decisions = &per_trial[&(t.index as i32)];
        let rungs: Vec<i32> = decisions.iter().map(|(r, _)| *r).collect();
        assert_eq!(rungs, (0..decisions.len() as i32).collect::<Vec<_>>(), "trial {}: one decision per rung, in order", t.index);
        let stops = decisions.iter().filter(|(_, d)| d == "stop").count();
        match trial_state(t) {
            v1::TrialState::EarlyStopped => {
                assert_eq!((stops, decisions.last().unwrap().1.as_str()), (1, "stop"));
                assert_eq!(t.stopped_rung, Some(decisions.len() as u32 - 1));
            }
            _ => assert_eq!((stops, decisions.len()), (0, 3), "trial {} ran to the end past every rung", t.index),
        }
    }
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
