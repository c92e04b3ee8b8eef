//! Sweeps through the real services: builders of definitions, polling, and
//! a scripted fake worker that speaks the real WorkerService but trains
//! nothing (it reports synthetic evaluation curves, so every decision of
//! the algorithms can be checked exactly).

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use ptune_core::sweep::SweepDefinition;
use ptune_proto::client::AuthChannel;
use ptune_proto::v1::sweep_service_client::SweepServiceClient;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
use ptune_proto::v1::{self, complete_job_chunk::Part};
use serde_json::{json, Value};
use sqlx::PgPool;
use tonic::{Code, Status};

use super::{metric, Env, EVAL, MODEL, TRAIN};

// ---------------------------------------------------------------- helpers

pub async fn datasets(env: &mut Env) -> (String, String) {
    (env.upload("train.jsonl", TRAIN).await.reference, env.upload("eval.jsonl", EVAL).await.reference)
}

/// A sweep over the test model and datasets; trials run 4 steps unless ASHA says otherwise.
pub fn definition(name: &str, (train, eval): &(String, String), algorithm: Value, space: Value) -> Value {
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

pub async fn create(env: &mut Env, definition: &Value) -> Result<v1::Sweep, Status> {
    let request = v1::CreateSweepRequest { definition_json: definition.to_string() };
    env.sweeps.create_sweep(request).await.map(|r| r.into_inner())
}

pub async fn get_sweep(client: &mut SweepServiceClient<AuthChannel>, id: &str) -> Result<v1::Sweep, Status> {
    client.get_sweep(v1::GetSweepRequest { sweep_id: id.to_string() }).await.map(|r| r.into_inner())
}

/// Polls the sweep until `done` holds, for at most `secs` seconds.
pub async fn wait_sweep(env: &mut Env, id: &str, secs: u64, done: impl Fn(&v1::Sweep) -> bool) -> v1::Sweep {
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

pub fn sweep_state(s: &v1::Sweep) -> v1::SweepState {
    v1::SweepState::try_from(s.state).unwrap()
}

pub fn trial_state(t: &v1::Trial) -> v1::TrialState {
    v1::TrialState::try_from(t.state).unwrap()
}

pub fn params(t: &v1::Trial) -> Value {
    serde_json::from_str(&t.params_json).unwrap()
}

pub fn by_index(s: &v1::Sweep) -> Vec<v1::Trial> {
    let mut trials = s.leaderboard.clone();
    trials.sort_by_key(|t| t.index);
    trials
}

/// The parameters the definition gives trials `0..n`, as the engine draws them.
pub fn expected_params(definition: &Value, n: u32) -> Vec<Value> {
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
pub async fn retry<T, F, Fut>(mut call: F) -> Result<T, Status>
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
pub enum Script {
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
    pub fn accuracy(self, step: u64, max: u64) -> f64 {
        let last = match self {
            Script::Learn { final_accuracy } => final_accuracy,
            Script::NanLossAt(_) | Script::FailsDivergedAt(_) => 0.5,
            Script::Plateau { .. } => return 0.52,
        };
        last * step as f64 / max as f64
    }

    /// The eval loss it reports beside the accuracy, if any.
    pub fn eval_loss(self) -> Option<f64> {
        match self {
            Script::Plateau { eval_loss } => Some(eval_loss),
            _ => None,
        }
    }
}

/// How a trial ended, as the fake worker saw it.
#[derive(Clone, Debug, PartialEq)]
pub enum Ended {
    Completed,
    EarlyStopped { step: u64 },
    Cancelled,
    Diverged,
}

/// A worker that speaks the real WorkerService but trains nothing.
#[derive(Clone)]
pub struct FakeWorker {
    pub client: WorkerServiceClient<AuthChannel>,
    pub sweeps: SweepServiceClient<AuthChannel>,
    pub id: String,
    pub db: PgPool,
    /// Steps at which it waits for the sweep's decision before going on (ASHA rungs).
    pub rungs: Vec<u64>,
    /// Trials whose early stop it acknowledges as workers that predate early
    /// stops do: FailJob{cancelled: true}, no adapter.
    pub legacy_ack: HashSet<u32>,
    pub step_delay: Duration,
}

impl FakeWorker {
    pub async fn register(env: &mut Env) -> Self {
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
    pub async fn work(&mut self, sweep_id: &str, script: impl Fn(&v1::JobSpec) -> Script) -> Vec<(u32, Ended)> {
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

    pub async fn run(&mut self, lease: &v1::Lease, index: u32, script: Script) -> Ended {
        let training = lease.spec.as_ref().unwrap().training.clone().unwrap();
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

    pub async fn ack_early_stop(&mut self, lease: &v1::Lease, index: u32, step: u64, script: Script, max: u64) -> Ended {
        if self.legacy_ack.contains(&index) {
            self.fail(lease, "stopped on request", true).await;
        } else {
            self.complete(lease, step, script.accuracy(step, max)).await;
        }
        Ended::EarlyStopped { step }
    }

    /// Waits until the sweep has decided about this job at this rung step.
    pub async fn decision(&self, job_id: &str, step: u64) -> String {
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

    pub async fn report(&self, lease: &v1::Lease, step: u64, total: u64, metrics: Vec<v1::Metric>) -> v1::ReportProgressResponse {
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

    pub async fn heartbeat(&self, lease: &v1::Lease) -> v1::HeartbeatResponse {
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

    pub async fn complete(&self, lease: &v1::Lease, step: u64, accuracy: f64) {
        let adapter = format!("adapter of {} at step {step}", lease.job_id).into_bytes();
        let header = v1::CompleteJobHeader {
            job_id: lease.job_id.clone(),
            epoch: lease.epoch,
            adapter_sha256: super::sha256(&adapter),
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

    pub async fn fail(&self, lease: &v1::Lease, error: &str, cancelled: bool) {
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

pub fn learning_rate(spec: &v1::JobSpec) -> f64 {
    spec.training.as_ref().unwrap().learning_rate
}

pub fn prompt_length(spec: &v1::JobSpec) -> u32 {
    spec.peft.as_ref().unwrap().num_virtual_tokens.expect("the coordinator sends the prompt length")
}
