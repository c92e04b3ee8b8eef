//! A simulated worker over real gRPC: it registers, heartbeats at the
//! interval the coordinator gives it (in a task of its own, naming every
//! lease it holds), and loops: LeaseJob until it holds a pack of jobs (or
//! no more come), progress for each step of the pack, and CompleteJob for
//! each job with an adapter streamed as a header and then data. Progress
//! goes as one ReportProgress call per job and step (as workers before
//! batching did), or as one ReportProgressBatch call per step carrying every
//! job of the pack. Training takes no time; when there is nothing to lease
//! it long-polls, or with no wait asks again after 250 ms, as the agent did
//! before long-polling. A worker holding no lease heartbeats only when
//! `Fleet::heartbeat_when_idle` (workers that long-poll do not, as the
//! agent). An idle worker ([`idle`]) asks for work that never comes.
//! With `Fleet::next_with_completion`, as the agent, each completion asks
//! for the worker's next job too (`CompleteJobHeader.next`), and the worker
//! calls LeaseJob only when a completion brought none. Heartbeats start at
//! a random point of the first interval, as the agent's, so a fleet
//! registered at once does not heartbeat in step.
//! Paced ([`Pacer`]), the workers together ask for at most a set number of
//! jobs per second, so latencies are measured at that load rather than at
//! whatever rate saturates the machine.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ptune_coordinator::testing::minilm_model;
use ptune_proto::client::AuthChannel;
use ptune_proto::v1::worker_service_client::WorkerServiceClient;
use ptune_proto::v1::{self, complete_job_chunk::Part};
use sha2::Digest;
use tokio::sync::watch;

use crate::measure::{Calls, Rpc};

/// The base model every worker serves and every job trains.
pub const MODEL: &str = "tiny-bert";
/// The real agent's wait before asking again when no job was leased.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// The real agent's first and longest pause after a failed lease call.
const LEASE_RETRY: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));
/// Bytes per gRPC message of an adapter upload, as the agent sends them.
const MESSAGE_BYTES: usize = 256 * 1024;
/// First error messages kept for the report.
const ERRORS_KEPT: usize = 5;

/// What the workers of one run share.
pub struct Fleet {
    pub steps: u64,
    /// Jobs a worker trains together, in one pass.
    pub pack: usize,
    /// Progress of a pack's step in one ReportProgressBatch call.
    pub batch: bool,
    /// How long a LeaseJob call may wait at the coordinator (0: answered at
    /// once, and the worker polls every 250 ms).
    pub lease_wait_ms: u32,
    /// Heartbeats also while holding no lease, as workers did before their
    /// lease calls stood for their heartbeats.
    pub heartbeat_when_idle: bool,
    pub adapter_bytes: usize,
    /// Completions the phase waits for.
    pub jobs: usize,
    pub completed: AtomicUsize,
    pub workers: usize,
    /// LeaseJob calls answered with no lease.
    pub empty_leases: AtomicU64,
    /// Of those, the ones answered while at least `workers` jobs were
    /// still queued (none had been leased yet), so one was free for each.
    pub empty_while_queued: AtomicU64,
    /// Heartbeat answers telling a worker to stop a lease.
    pub stop_directives: AtomicU64,
    /// Jobs leased so far, and leases of a job that was leased before.
    pub leased: Mutex<HashSet<String>>,
    pub duplicate_leases: AtomicU64,
    pub first_errors: Mutex<Vec<String>>,
    /// Set once every job has completed.
    pub done: watch::Sender<bool>,
    /// Spaces the fleet's requests for jobs; None: each worker asks as soon as it is free.
    pub pace: Option<Pacer>,
    /// Each completion asks for the worker's next job (`CompleteJobHeader.next`).
    pub next_with_completion: bool,
}

/// Spaces the LeaseJob calls of the whole fleet evenly at `rate` per
/// second: each call takes the next free slot and waits for it. A fleet
/// that falls behind (its workers all busy when their slots come) takes
/// fewer jobs per second than the rate, which the phase's cycles per second
/// then show; missed slots are not made up later in a burst.
pub struct Pacer {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    pub fn new(rate: u32) -> Self {
        Self { interval: Duration::from_secs_f64(1.0 / f64::from(rate.max(1))), next: Mutex::new(None) }
    }

    /// Waits for this call's slot.
    async fn slot(&self) {
        let at = {
            let mut next = self.next.lock().unwrap();
            let now = Instant::now();
            let at = next.map_or(now, |n| n.max(now));
            *next = Some(at + self.interval);
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

impl Fleet {
    pub fn new(workers: usize, jobs: usize, steps: u64, adapter_bytes: usize, lease_wait_ms: u32) -> Self {
        Self {
            steps,
            pack: 1,
            batch: false,
            lease_wait_ms,
            // Workers that long-poll no longer heartbeat while idle; those that polled did.
            heartbeat_when_idle: lease_wait_ms == 0,
            adapter_bytes,
            jobs,
            workers,
            completed: AtomicUsize::new(0),
            empty_leases: AtomicU64::new(0),
            empty_while_queued: AtomicU64::new(0),
            stop_directives: AtomicU64::new(0),
            leased: Mutex::new(HashSet::new()),
            duplicate_leases: AtomicU64::new(0),
            first_errors: Mutex::new(Vec::new()),
            done: watch::channel(false).0,
            pace: None,
            next_with_completion: false,
        }
    }

    fn error(&self, rpc: Rpc, status: &tonic::Status) {
        let mut errors = self.first_errors.lock().unwrap();
        if errors.len() < ERRORS_KEPT {
            errors.push(format!("{}: {:?} {}", rpc.name(), status.code(), status.message()));
        }
    }
}

/// A registered worker, not yet working.
pub struct Registered {
    client: WorkerServiceClient<AuthChannel>,
    id: String,
    heartbeat_interval: Duration,
}

/// Registers worker `index` serving [`MODEL`] with `slots` slots.
pub async fn register(
    mut client: WorkerServiceClient<AuthChannel>,
    index: usize,
    slots: usize,
) -> anyhow::Result<Registered> {
    let reply = client
        .register_worker(v1::RegisterWorkerRequest {
            hostname: format!("fleet-{index}"),
            devices: vec![v1::Device { name: "cpu".into(), memory_bytes: 8 << 30, ..Default::default() }],
            slots: slots as u32,
            models: vec![minilm_model(MODEL)],
            ..Default::default()
        })
        .await?
        .into_inner();
    let heartbeat_interval = Duration::from_millis(u64::from(reply.heartbeat_interval_ms.max(1)));
    Ok(Registered { client, id: reply.worker_id, heartbeat_interval })
}

/// Heartbeats from now on, and works once `start` turns true, until every
/// job has completed. Returns the calls of both tasks.
pub async fn run(worker: Registered, fleet: Arc<Fleet>, mut start: watch::Receiver<bool>) -> Calls {
    let holding: Arc<Mutex<Vec<v1::LeaseRef>>> = Arc::default();
    let heartbeats = tokio::spawn(heartbeat(
        worker.client.clone(),
        worker.id.clone(),
        worker.heartbeat_interval,
        holding.clone(),
        fleet.clone(),
    ));
    let _ = start.wait_for(|s| *s).await;
    let mut calls = work(worker.client, &worker.id, &holding, &fleet).await;
    calls.merge(heartbeats.await.unwrap_or_default());
    calls
}

/// Heartbeats and asks for work (none is queued) until `fleet.done`.
pub async fn idle(worker: Registered, fleet: Arc<Fleet>) -> Calls {
    let heartbeats = tokio::spawn(heartbeat(
        worker.client.clone(),
        worker.id.clone(),
        worker.heartbeat_interval,
        Arc::default(),
        fleet.clone(),
    ));
    let mut calls = work(worker.client, &worker.id, &Mutex::default(), &fleet).await;
    calls.merge(heartbeats.await.unwrap_or_default());
    calls
}

async fn work(
    mut client: WorkerServiceClient<AuthChannel>,
    id: &str,
    holding: &Mutex<Vec<v1::LeaseRef>>,
    fleet: &Fleet,
) -> Calls {
    let mut calls = Calls::default();
    let mut done = fleet.done.subscribe();
    // As the real agent, it tells which models it holds: none until its first job.
    let mut loaded_models = Vec::new();
    let mut pack: Vec<v1::Lease> = Vec::new();
    let mut retry_in = LEASE_RETRY.0;
    while !*done.borrow() {
        if pack.len() == fleet.pack {
            // Its completions brought a whole pack.
            train_pack(&mut client, id, &mut pack, holding, &mut loaded_models, fleet, &mut calls).await;
            continue;
        }
        let request = v1::LeaseJobRequest {
            worker_id: id.to_string(),
            free_slots: (fleet.pack - pack.len()) as u32,
            loaded_models: loaded_models.clone(),
            // A worker that holds jobs trains them rather than wait for more.
            wait_ms: if pack.is_empty() { fleet.lease_wait_ms } else { 0 },
        };
        if let Some(pace) = &fleet.pace {
            tokio::select! {
                () = pace.slot() => {}
                _ = done.wait_for(|d| *d) => break,
            }
        }
        let started = Instant::now();
        let reply = tokio::select! {
            reply = client.lease_job(request) => reply,
            _ = done.wait_for(|d| *d) => break,
        };
        calls.record(Rpc::LeaseJob, started, reply.is_ok());
        if reply.as_ref().is_ok_and(|r| r.get_ref().lease.is_some()) {
            calls.record(Rpc::Leased, started, true);
        }
        let lease = match reply {
            Ok(reply) => {
                retry_in = LEASE_RETRY.0;
                reply.into_inner().lease
            }
            Err(status) => {
                fleet.error(Rpc::LeaseJob, &status);
                // As the agent, it waits before asking again after an error, longer each time.
                tokio::time::sleep(retry_in).await;
                retry_in = (retry_in * 2).min(LEASE_RETRY.1);
                None
            }
        };
        if let Some(lease) = lease {
            took(lease, &mut pack, holding, &mut loaded_models, fleet);
            if pack.len() < fleet.pack {
                continue;
            }
        } else if pack.is_empty() {
            fleet.empty_leases.fetch_add(1, Ordering::Relaxed);
            if fleet.leased.lock().unwrap().len() + fleet.workers * fleet.pack <= fleet.jobs {
                fleet.empty_while_queued.fetch_add(1, Ordering::Relaxed);
            }
            // A long-poll that waited its time out asks again at once.
            if fleet.lease_wait_ms == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = done.wait_for(|d| *d) => {}
                }
            }
            continue;
        }
        train_pack(&mut client, id, &mut pack, holding, &mut loaded_models, fleet, &mut calls).await;
    }
    calls
}

/// Holds `lease` from now on, in the pack and in the heartbeats.
fn took(
    lease: v1::Lease,
    pack: &mut Vec<v1::Lease>,
    holding: &Mutex<Vec<v1::LeaseRef>>,
    loaded_models: &mut Vec<String>,
    fleet: &Fleet,
) {
    *loaded_models = vec![MODEL.to_string()];
    if !fleet.leased.lock().unwrap().insert(lease.job_id.clone()) {
        fleet.duplicate_leases.fetch_add(1, Ordering::Relaxed);
    }
    holding.lock().unwrap().push(v1::LeaseRef {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        lease_token: lease.lease_token.clone(),
    });
    pack.push(lease);
}

/// Trains and completes the pack; the pack is then the leases its
/// completions brought.
async fn train_pack(
    client: &mut WorkerServiceClient<AuthChannel>,
    id: &str,
    pack: &mut Vec<v1::Lease>,
    holding: &Mutex<Vec<v1::LeaseRef>>,
    loaded_models: &mut Vec<String>,
    fleet: &Fleet,
    calls: &mut Calls,
) {
    let (completed, next) = train(client, id, pack, fleet, calls).await;
    let completed = fleet.completed.fetch_add(completed, Ordering::AcqRel) + completed;
    if completed == fleet.jobs {
        fleet.done.send_replace(true);
    }
    pack.clear();
    holding.lock().unwrap().clear();
    for lease in next {
        took(lease, pack, holding, loaded_models, fleet);
    }
}

fn progress(lease: &v1::Lease, step: u64, fleet: &Fleet) -> v1::ReportProgressRequest {
    v1::ReportProgressRequest {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        step,
        total_steps: fleet.steps,
        metrics: vec![v1::Metric { step, kind: "train".into(), name: "loss".into(), value: 1.0 / step as f64 }],
        lease_token: lease.lease_token.clone(),
    }
}

/// Reports every step of the pack and completes its jobs; returns how many
/// completed, and the leases their completions brought.
async fn train(
    client: &mut WorkerServiceClient<AuthChannel>,
    id: &str,
    pack: &[v1::Lease],
    fleet: &Fleet,
    calls: &mut Calls,
) -> (usize, Vec<v1::Lease>) {
    let mut stopped = vec![false; pack.len()];
    for step in 1..=fleet.steps {
        if fleet.batch {
            let reports = pack.iter().map(|lease| progress(lease, step, fleet)).collect();
            let started = Instant::now();
            let reply = client.report_progress_batch(v1::ReportProgressBatchRequest { reports }).await;
            let answers = match reply {
                Ok(reply) => reply.into_inner().answers,
                Err(status) => {
                    calls.record(Rpc::ReportProgressBatch, started, false);
                    fleet.error(Rpc::ReportProgressBatch, &status);
                    return (0, Vec::new());
                }
            };
            let refused = answers.iter().any(|a| a.error_code != 0 || a.recorded.is_none_or(|r| r.stop));
            calls.record(Rpc::ReportProgressBatch, started, !refused && answers.len() == pack.len());
            if refused || answers.len() != pack.len() {
                let status = tonic::Status::aborted(format!("told to stop or refused: {answers:?}"));
                fleet.error(Rpc::ReportProgressBatch, &status);
                return (0, Vec::new());
            }
            continue;
        }
        for (lease, stopped) in pack.iter().zip(stopped.iter_mut()) {
            if *stopped {
                continue;
            }
            let started = Instant::now();
            let reply = client.report_progress(progress(lease, step, fleet)).await;
            calls.record(Rpc::ReportProgress, started, reply.as_ref().is_ok_and(|r| !r.get_ref().stop));
            match reply {
                Ok(reply) if reply.get_ref().stop => {
                    let status = tonic::Status::aborted(format!("told to stop: reason {}", reply.get_ref().stop_reason));
                    fleet.error(Rpc::ReportProgress, &status);
                    *stopped = true;
                }
                Ok(_) => {}
                Err(status) => {
                    fleet.error(Rpc::ReportProgress, &status);
                    *stopped = true;
                }
            }
        }
    }
    let mut completed = 0;
    let mut next = Vec::new();
    let mut done = fleet.done.subscribe();
    for (lease, stopped) in pack.iter().zip(stopped) {
        if stopped {
            continue;
        }
        // As the agent: each completion asks for the slot it frees to be filled.
        let ask = fleet.next_with_completion.then(|| v1::LeaseJobRequest {
            worker_id: id.to_string(),
            free_slots: 1,
            loaded_models: vec![MODEL.to_string()],
            wait_ms: 0,
        });
        if let (Some(pace), Some(_)) = (&fleet.pace, &ask) {
            tokio::select! {
                () = pace.slot() => {}
                _ = done.wait_for(|d| *d) => {}
            }
        }
        let started = Instant::now();
        let reply = client.complete_job(futures::stream::iter(complete_parts(lease, fleet, ask))).await;
        calls.record(Rpc::CompleteJob, started, reply.is_ok());
        match reply {
            Ok(reply) => {
                completed += 1;
                if let Some(lease) = reply.into_inner().next {
                    calls.record(Rpc::Leased, started, true);
                    next.push(lease);
                }
            }
            Err(status) => fleet.error(Rpc::CompleteJob, &status),
        }
    }
    (completed, next)
}

/// A header (asking for the next lease with `next`), then an adapter of
/// `fleet.adapter_bytes` that differs per job.
fn complete_parts(lease: &v1::Lease, fleet: &Fleet, next: Option<v1::LeaseJobRequest>) -> Vec<v1::CompleteJobChunk> {
    let mut adapter = vec![0x5a; fleet.adapter_bytes.max(1)];
    let id = lease.job_id.as_bytes();
    let n = id.len().min(adapter.len());
    adapter[..n].copy_from_slice(&id[..n]);
    let header = v1::CompleteJobHeader {
        job_id: lease.job_id.clone(),
        epoch: lease.epoch,
        adapter_sha256: hex::encode(sha2::Sha256::digest(&adapter)),
        adapter_size: adapter.len() as u64,
        step: fleet.steps,
        lease_token: lease.lease_token.clone(),
        next,
        ..Default::default()
    };
    let mut parts = vec![v1::CompleteJobChunk { part: Some(Part::Header(header)) }];
    parts.extend(adapter.chunks(MESSAGE_BYTES).map(|c| v1::CompleteJobChunk { part: Some(Part::Data(c.to_vec())) }));
    parts
}

/// Heartbeats every `interval` with the leases held, until every job has completed.
async fn heartbeat(
    mut client: WorkerServiceClient<AuthChannel>,
    id: String,
    interval: Duration,
    holding: Arc<Mutex<Vec<v1::LeaseRef>>>,
    fleet: Arc<Fleet>,
) -> Calls {
    let mut calls = Calls::default();
    let mut done = fleet.done.subscribe();
    // As the agent: at the same point of each interval, a random one for each worker.
    let first = tokio::time::Instant::now() + interval.mul_f64(rand::random::<f64>());
    let mut ticker = tokio::time::interval_at(first, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = done.wait_for(|d| *d) => return calls,
        }
        let leases = holding.lock().unwrap().clone();
        if leases.is_empty() && !fleet.heartbeat_when_idle {
            continue;
        }
        let request = v1::HeartbeatRequest { worker_id: id.clone(), leases, ..Default::default() };
        let started = Instant::now();
        let reply = client.heartbeat(request).await;
        calls.record(Rpc::Heartbeat, started, reply.as_ref().is_ok_and(|r| r.get_ref().known));
        match reply {
            Ok(reply) if !reply.get_ref().known => {
                fleet.error(Rpc::Heartbeat, &tonic::Status::not_found("the coordinator does not know the worker"));
            }
            // A lease completed while its heartbeat was on the way is told
            // to stop too; a real problem shows in the lease's own calls.
            Ok(reply) => {
                fleet.stop_directives.fetch_add(reply.get_ref().stop.len() as u64, Ordering::Relaxed);
            }
            Err(status) => fleet.error(Rpc::Heartbeat, &status),
        }
    }
}
