//! The worker's side of the coordinator protocol: register, lease, heartbeat,
//! report, complete, release. Training itself runs on engine threads
//! ([`runner`]); this module moves messages between them and the
//! coordinators, and keeps the promises a worker makes about its work:
//!
//! - a graceful shutdown (SIGTERM) never cancels: it stops leasing,
//!   checkpoints every running job at its next step, uploads the
//!   checkpoints and hands the leases back, so the jobs resume elsewhere at
//!   once; a second signal or `--drain-timeout` hands them back without
//!   waiting for the checkpoints;
//! - what a job reports is journaled on disk and delivered in order
//!   ([`journal`]), through coordinator and database outages and restarts of
//!   the worker itself; a worker that died while training reports those
//!   attempts as failed when it starts again;
//! - a worker whose attempts keep failing for infrastructure reasons stops
//!   leasing and says why ([`health`]).

mod archive;
mod client;
mod handoff;
pub mod datasets;
pub mod devices;
mod health;
mod job;
mod journal;
mod leases;
mod models;
mod runner;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ptune_proto::v1;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use client::Coordinators;
pub use job::default_stall_timeout;
pub use leases::{Directive, StopCause};
pub use models::{scan_models, ModelScan, ServedModel, UnsupportedModel};

use client::CALL_TIMEOUT;

/// How long a lease call asks the coordinator to wait for work when none is
/// queued (`LeaseJobRequest.wait_ms`): an idle worker long-polls, and a job
/// queued meanwhile is answered at once.
const LEASE_WAIT: Duration = Duration::from_secs(5);
/// How often the worker looks for a free slot while none is, and the least
/// time between two lease calls (a coordinator that does not wait answers
/// at once).
const LEASE_POLL: Duration = Duration::from_millis(250);
/// The first and the longest pause before asking again after a lease call
/// failed.
const LEASE_RETRY: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));
use health::Health;
use handoff::Handoff;
use journal::delivery::{deliver, Courier, Delivery};
use journal::progress::ProgressSender;
use journal::{Journal, Record};
use leases::Leases;

/// Settings of one worker process.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Coordinator addresses, comma-separated; calls fail over between them.
    pub coordinator: String,
    pub models_dir: PathBuf,
    /// The devices it trains on, one engine each (`devices::resolve`).
    pub devices: Vec<devices::WorkerDevice>,
    /// Jobs each device trains at once.
    pub slots: u32,
    /// Where datasets are cached, adapters staged, checkpoints and lease
    /// journals kept.
    pub work_dir: PathBuf,
    /// Threads libtorch may use per engine (0: all cores).
    pub threads: u32,
    /// Most bytes of base-model weights to keep loaded; unused models are
    /// evicted least recently used first (`None`: no limit).
    pub model_memory: Option<u64>,
    /// Bytes of the machine's memory this worker may use, told to the
    /// coordinator (`None`: the machine's total memory). Placement goes by
    /// each device's memory (`devices`); this caps the CPU's.
    pub memory_bytes: Option<u64>,
    /// How classification jobs on one base model share steps and passes.
    pub pack: crate::engine::PackLimits,
    /// How long a graceful shutdown waits for running jobs to checkpoint
    /// and hand their leases back before it hands them back as they are.
    pub drain_timeout: Duration,
    /// Replaces the spec-sized default stall timeout of jobs that set none.
    pub stall_timeout: Option<Duration>,
    /// The worker token, and TLS settings for `https://` coordinators.
    pub client: ptune_proto::client::ClientOptions,
}

/// Runs the worker until `signals` counts a shutdown signal: then it stops
/// leasing, checkpoints its running jobs and hands them back (a second
/// signal, or the drain timeout, hands them back at once), and returns.
pub async fn run(config: AgentConfig, mut signals: watch::Receiver<u32>) -> anyhow::Result<()> {
    let scan = scan_models(&config.models_dir)?;
    let advertised = scan.to_wire();
    let models = scan.served;
    if models.is_empty() {
        warn!(models_dir = %config.models_dir.display(), "no base models found; this worker will never get a job");
    }
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("cannot create work dir {}", config.work_dir.display()))?;
    let coordinators = Coordinators::new(&config.coordinator, config.client.clone()).await?;
    let worker_id = load_or_create_worker_id(&config)?;
    let registration = tokio::select! {
        registration = register(&coordinators, &worker_id, &config, &advertised) => registration?,
        _ = signals.wait_for(|n| *n > 0) => {
            info!("shutdown signal before the coordinator answered; nothing to hand back");
            return Ok(());
        }
    };
    let heartbeat_every = Duration::from_millis(u64::from(registration.heartbeat_interval_ms.max(100)));
    let slots = total_slots(&config);
    info!(worker_id = %worker_id, slots, devices = config.devices.len(), models = models.len(), "worker registered");

    let slots_per_device = config.slots as usize;
    let engines = devices::Engines::start(&config.devices, slots_per_device, config.threads, config.model_memory, config.pack);
    let leases = Leases::default();
    let health = Health::default();
    let (hard_stop, hard_stopped) = watch::channel(false);
    let (handoff, mut handed) = {
        let (worker_id, held, engines, models) = (worker_id.clone(), leases.clone(), engines.clone(), models.clone());
        let (health, work_dir, signals) = (health.clone(), config.work_dir.clone(), signals.clone());
        Handoff::new(
            move || {
                if *signals.borrow() > 0 || health.unhealthy_reason(&work_dir).is_some() {
                    return None;
                }
                Some(v1::LeaseJobRequest {
                    worker_id: worker_id.clone(),
                    // The completion's own slot, and any other free one.
                    free_slots: slots.saturating_sub(held.len() as u32).saturating_add(1).min(slots),
                    loaded_models: loaded_models(&engines, &models),
                    wait_ms: 0,
                })
            },
            leases.clone(),
        )
    };
    let context = job::JobContext {
        coordinators: coordinators.clone(),
        courier: Courier {
            coordinators: coordinators.clone(),
            max_checkpoint_bytes: registration.max_checkpoint_bytes,
            progress: ProgressSender::start(coordinators.clone()),
            handoff: Some(handoff),
        },
        engines: engines.clone(),
        models: Arc::new(models.clone()),
        work_dir: config.work_dir.clone(),
        leases: leases.clone(),
        health: health.clone(),
        stall_timeout: config.stall_timeout,
        hard_stop: hard_stopped,
    };
    let heartbeats = tokio::spawn(heartbeat_loop(
        coordinators.clone(),
        worker_id.clone(),
        config.clone(),
        advertised.clone(),
        leases.clone(),
        health.clone(),
        heartbeat_every,
    ));
    let mut running = tokio::task::JoinSet::new();
    for journal in recover_journals(&config.work_dir) {
        leases.insert(&journal.lease.job_id, journal.lease.epoch, &journal.lease.lease_token);
        running.spawn(deliver_recovered(context.clone(), journal));
    }
    // Runs a lease a completion brought (`handoff.rs`).
    let start = |running: &mut tokio::task::JoinSet<()>, (lease, directive): handoff::Handed| {
        running.spawn(job::run(context.clone(), lease, directive));
    };
    let mut retry_in = LEASE_RETRY.0;
    'leasing: loop {
        while running.try_join_next().is_some() {}
        while let Ok(lease) = handed.try_recv() {
            start(&mut running, lease);
        }
        if *signals.borrow() > 0 {
            break;
        }
        let free = slots.saturating_sub(leases.len() as u32);
        // How long to pause before looking again: a lease came, or the call waited already.
        let mut pause = LEASE_POLL;
        if free > 0 && health.unhealthy_reason(&config.work_dir).is_none() {
            let request = v1::LeaseJobRequest {
                worker_id: worker_id.clone(),
                free_slots: free,
                loaded_models: loaded_models(&engines, &models),
                wait_ms: LEASE_WAIT.as_millis() as u32,
            };
            let asked = tokio::time::Instant::now();
            let call = coordinators.call(CALL_TIMEOUT + LEASE_WAIT, move |mut c| {
                let request = request.clone();
                async move { c.lease_job(request).await.map(|r| r.into_inner().lease) }
            });
            // A shutdown signal ends the wait at once (a lease granted in that instant
            // is never heard of; it expires and its job is queued again). Leases
            // completions bring meanwhile start at once.
            tokio::pin!(call);
            let leased_now = loop {
                tokio::select! {
                    answer = &mut call => break answer,
                    Ok(()) = signals.changed() => continue 'leasing,
                    Some(lease) = handed.recv() => start(&mut running, lease),
                }
            };
            pause = LEASE_POLL.saturating_sub(asked.elapsed());
            if leased_now.is_ok() {
                retry_in = LEASE_RETRY.0;
            }
            match leased_now {
                Ok(Some(lease)) if uuid::Uuid::parse_str(&lease.job_id).is_err() => {
                    warn!(job_id = %lease.job_id, "lease names a job id that is not a UUID; ignoring it");
                }
                Ok(Some(lease)) => {
                    info!(job_id = %lease.job_id, epoch = lease.epoch, attempt = lease.attempt,
                          devices = ?lease.devices, checkpoint_step = lease.checkpoint.as_ref().map(|c| c.step),
                          "job leased");
                    let directive = leases.insert(&lease.job_id, lease.epoch, &lease.lease_token);
                    running.spawn(job::run(context.clone(), lease, directive));
                    pause = Duration::ZERO;
                }
                Ok(None) => {}
                Err(status) if status.code() == tonic::Code::NotFound => {
                    // The idle worker's heartbeat is its lease calls, so they say it is unknown.
                    warn!(error = %status.message(), "coordinator does not know this worker; registering again");
                    let _ = register(&coordinators, &worker_id, &config, &advertised).await;
                    pause = retry_in;
                    retry_in = (retry_in * 2).min(LEASE_RETRY.1);
                }
                Err(status) => {
                    warn!(error = %status.message(), code = ?status.code(), retry_in_ms = retry_in.as_millis() as u64,
                          "lease request failed");
                    pause = retry_in;
                    retry_in = (retry_in * 2).min(LEASE_RETRY.1);
                }
            }
        }
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = signals.changed() => {}
                Some(lease) = handed.recv() => start(&mut running, lease),
            }
        }
    }

    info!(running = leases.len(), drain_timeout_s = config.drain_timeout.as_secs(),
          "draining: checkpointing running jobs and handing their leases back");
    for directive in leases.all() {
        directive.suspend();
    }
    // A completion on its way when the signal came may still bring a lease:
    // it is run, to be handed back at its first step.
    let drain = async {
        loop {
            tokio::select! {
                joined = running.join_next() => if joined.is_none() { break },
                Some(lease) = handed.recv() => {
                    lease.1.suspend();
                    start(&mut running, lease);
                }
            }
        }
    };
    let drained = tokio::select! {
        _ = drain => true,
        _ = tokio::time::sleep(config.drain_timeout) => {
            warn!("drain timeout: handing the remaining leases back without a checkpoint");
            false
        }
        _ = signals.wait_for(|n| *n > 1) => {
            warn!("second signal: handing the remaining leases back without a checkpoint");
            false
        }
    };
    if !drained {
        let _ = hard_stop.send(true);
        for directive in leases.all() {
            directive.stop(StopCause::Drain);
        }
        let handed_back = tokio::time::timeout(Duration::from_secs(5), async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if handed_back.is_err() {
            warn!(leases = leases.len(), "could not tell the coordinator about every lease; they are journaled and go on the next start");
        }
    }
    heartbeats.abort();
    engines.shutdown();
    info!("worker stopped");
    Ok(())
}

/// Journals of leases a previous run of this worker left undelivered.
fn recover_journals(work_dir: &std::path::Path) -> Vec<Journal> {
    let Ok(entries) = std::fs::read_dir(journal::leases_dir(work_dir)) else { return Vec::new() };
    let mut journals = Vec::new();
    for entry in entries.flatten() {
        match Journal::open(&entry.path()) {
            Ok(journal) => journals.push(journal),
            Err(e) => {
                warn!(dir = %entry.path().display(), error = %format!("{e:#}"), "unreadable lease journal; removing it");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    journals
}

/// Delivers what a previous run of this worker left in a lease's journal.
/// A lease without an ending was running when that process died: the
/// attempt is reported as failed (an error of the job, as Kubernetes
/// counts a crashed container), and resumes from its last checkpoint.
async fn deliver_recovered(ctx: job::JobContext, mut journal: Journal) {
    let (job_id, epoch) = (journal.lease.job_id.clone(), journal.lease.epoch);
    if !journal.has_ending() {
        let step = journal.last_step();
        warn!(job_id, epoch, step, "this worker stopped while training the job; reporting the attempt as failed");
        journal.append(Record::Fail {
            error: format!(
                "the worker process stopped while training this job (after step {step}): killed, crashed or out of \
                 memory; retried from its last checkpoint"
            ),
            retryable: true,
            infrastructure: false,
            cancelled: false,
        });
    } else {
        info!(job_id, epoch, "delivering what the last run of this worker journaled");
    }
    let directive = ctx.leases.get(&job_id, epoch).unwrap_or_default();
    let (_, incoming) = mpsc::unbounded_channel();
    let (journal, delivered) = deliver(ctx.courier.clone(), journal, incoming, directive).await;
    let last = delivered == Delivery::Ended && job::journal_final(&journal);
    journal.remove();
    if last {
        let _ = std::fs::remove_dir_all(job::checkpoint_dir(&ctx.work_dir, &job_id));
    }
    ctx.leases.remove(&job_id, epoch);
}

fn load_or_create_worker_id(config: &AgentConfig) -> anyhow::Result<String> {
    let path = config.work_dir.join("worker_id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        if !id.trim().is_empty() {
            return Ok(id.trim().to_string());
        }
    }
    let id = ptune_core::WorkerId::new().to_string();
    crate::durable::write(&path, id.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

async fn register(
    coordinators: &Coordinators,
    worker_id: &str,
    config: &AgentConfig,
    models: &[v1::BaseModel],
) -> anyhow::Result<v1::RegisterWorkerResponse> {
    let request = v1::RegisterWorkerRequest {
        worker_id: worker_id.to_string(),
        hostname: hostname(),
        devices: config.devices.iter().map(devices::WorkerDevice::to_wire).collect(),
        slots: total_slots(config),
        models: models.to_vec(),
        memory_bytes: config.memory_bytes.unwrap_or_else(devices::total_memory_bytes),
    };
    let mut delay = Duration::from_millis(200);
    loop {
        let request = request.clone();
        let answer = coordinators
            .call(CALL_TIMEOUT, move |mut c| {
                let request = request.clone();
                async move { c.register_worker(request).await.map(|r| r.into_inner()) }
            })
            .await;
        match answer {
            Ok(response) => return Ok(response),
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                anyhow::bail!("coordinator refused registration: {}", status.message())
            }
            Err(status) => {
                warn!(error = %status.message(), "coordinator not reachable; retrying registration");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Heartbeats every `every` while the worker holds a lease or is unhealthy,
/// naming its leases and why it takes no work; stops the leases the
/// coordinator names and registers again when it does not know the worker.
async fn heartbeat_loop(
    coordinators: Coordinators,
    worker_id: String,
    config: AgentConfig,
    models: Vec<v1::BaseModel>,
    leases: Leases,
    health: Health,
    every: Duration,
) {
    // Each worker at its own random point of the interval: workers started
    // together (a rollout, a node pool scaled up) do not heartbeat in step.
    let first = tokio::time::Instant::now() + every.mul_f64(rand::random::<f64>());
    let mut ticker = tokio::time::interval_at(first, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let unhealthy_reason = health.unhealthy_reason(&config.work_dir).unwrap_or_default();
        if leases.is_empty() && unhealthy_reason.is_empty() {
            // A healthy worker without leases asks for work, and its lease
            // calls keep it alive: idle workers cost the coordinator little.
            continue;
        }
        let request = v1::HeartbeatRequest { worker_id: worker_id.clone(), leases: leases.refs(), unhealthy_reason };
        let answer = coordinators
            .call(CALL_TIMEOUT, move |mut c| {
                let request = request.clone();
                async move { c.heartbeat(request).await.map(|r| r.into_inner()) }
            })
            .await;
        match answer {
            Ok(response) => {
                for stop in response.stop {
                    info!(job_id = %stop.job_id, epoch = stop.epoch, "coordinator asked to stop job");
                    if let Some(directive) = leases.get(&stop.job_id, stop.epoch) {
                        directive.stop(StopCause::Cancelled);
                    }
                }
                for early in response.early_stop {
                    info!(job_id = %early.job_id, epoch = early.epoch, "sweep stopped job early");
                    if let Some(directive) = leases.get(&early.job_id, early.epoch) {
                        directive.finish();
                    }
                }
                if !response.known {
                    warn!("coordinator does not know this worker; registering again");
                    let _ = register(&coordinators, &worker_id, &config, &models).await;
                }
            }
            Err(status) => warn!(error = %status.message(), "heartbeat failed; jobs go on training and their reports wait"),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Jobs the worker trains at once: `slots` on each device.
fn total_slots(config: &AgentConfig) -> u32 {
    config.slots.saturating_mul(config.devices.len().max(1) as u32)
}

/// Names of the served models some device's engine holds in memory now.
fn loaded_models(engines: &devices::Engines, models: &[ServedModel]) -> Vec<String> {
    let loaded = engines.loaded_dirs();
    models.iter().filter(|m| loaded.contains(&m.dir)).map(|m| m.name.clone()).collect()
}

/// This process's peak resident memory so far (VmHWM); 0 when unknown.
fn peak_rss_bytes() -> u64 {
    proc_bytes("/proc/self/status", "VmHWM:")
}

/// A `key   N kB` line of a /proc file, in bytes; 0 when missing.
fn proc_bytes(path: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
