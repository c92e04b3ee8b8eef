//! The worker's side of the coordinator protocol: register, lease, heartbeat,
//! report, complete. Training itself runs on engine threads ([`runner`]); this
//! module only moves messages between them and the coordinator.

pub mod datasets;
mod job;
mod models;
mod runner;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use ptune_proto::v1::{self, worker_service_client::WorkerServiceClient};
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{info, warn};

pub use models::{scan_models, ModelScan, ServedModel, UnsupportedModel};

/// Settings of one worker process.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub coordinator: String,
    pub models_dir: PathBuf,
    pub slots: u32,
    /// Where datasets are cached and adapters are staged.
    pub work_dir: PathBuf,
    /// Threads libtorch may use per engine (0: all cores).
    pub threads: u32,
    /// Most bytes of base-model weights to keep loaded; unused models are
    /// evicted least recently used first (`None`: no limit).
    pub model_memory: Option<u64>,
    /// Bytes this worker may use for training, told to the coordinator,
    /// which leases it no job estimated to need more (`None`: the machine's
    /// total memory).
    pub memory_bytes: Option<u64>,
    /// How classification jobs on one base model share steps and passes.
    pub pack: crate::engine::PackLimits,
}

/// What the coordinator wants a running job to do next.
#[derive(Clone, Debug, Default)]
pub struct Directive(Arc<AtomicU8>);

impl Directive {
    const CONTINUE: u8 = 0;
    const FINISH: u8 = 1;
    const STOP: u8 = 2;

    /// Stop at the next step and export what was trained (an early stop).
    pub fn finish(&self) {
        let _ = self.0.compare_exchange(Self::CONTINUE, Self::FINISH, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Stop at the next step without an export (cancellation, lost lease, shutdown).
    pub fn stop(&self) {
        self.0.store(Self::STOP, Ordering::SeqCst);
    }

    pub fn control(&self) -> crate::engine::Control {
        match self.0.load(Ordering::SeqCst) {
            Self::CONTINUE => crate::engine::Control::Continue,
            Self::FINISH => crate::engine::Control::Finish,
            _ => crate::engine::Control::Stop,
        }
    }
}

/// Leases this worker holds, with the directive each job's engine run obeys.
#[derive(Clone, Default)]
struct Leases(Arc<Mutex<HashMap<(String, u64), Directive>>>);

impl Leases {
    fn insert(&self, job_id: &str, epoch: u64) -> Directive {
        let flag = Directive::default();
        self.0.lock().expect("leases lock").insert((job_id.to_string(), epoch), flag.clone());
        flag
    }

    fn remove(&self, job_id: &str, epoch: u64) {
        self.0.lock().expect("leases lock").remove(&(job_id.to_string(), epoch));
    }

    fn refs(&self) -> Vec<v1::LeaseRef> {
        let leases = self.0.lock().expect("leases lock");
        leases.keys().map(|(job_id, epoch)| v1::LeaseRef { job_id: job_id.clone(), epoch: *epoch }).collect()
    }

    fn get(&self, job_id: &str, epoch: u64) -> Option<Directive> {
        self.0.lock().expect("leases lock").get(&(job_id.to_string(), epoch)).cloned()
    }

    fn stop_all(&self) {
        for flag in self.0.lock().expect("leases lock").values() {
            flag.stop();
        }
    }

    fn len(&self) -> usize {
        self.0.lock().expect("leases lock").len()
    }
}

/// Runs the worker until `shutdown` turns true: then it stops leasing, stops
/// its running jobs at their next step and hands them back for a retry.
pub async fn run(config: AgentConfig, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let scan = scan_models(&config.models_dir)?;
    let advertised = scan.to_wire();
    let models = scan.served;
    if models.is_empty() {
        warn!(models_dir = %config.models_dir.display(), "no base models found; this worker will never get a job");
    }
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("cannot create work dir {}", config.work_dir.display()))?;
    let channel = connect(&config.coordinator).await?;
    let mut client = WorkerServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let worker_id = load_or_create_worker_id(&config)?;
    let registration = register(&mut client, &worker_id, &config, &advertised).await?;
    let heartbeat_every = Duration::from_millis(u64::from(registration.heartbeat_interval_ms.max(100)));
    info!(worker_id = %worker_id, slots = config.slots, models = models.len(), "worker registered");

    let cache = Arc::new(crate::engine::ModelCache::new(tch::Device::Cpu, config.model_memory));
    let engines = runner::EnginePool::start(config.slots as usize, config.threads, cache.clone(), config.pack);
    let leases = Leases::default();
    let context = job::JobContext {
        client: client.clone(),
        engines: engines.clone(),
        models: Arc::new(models.clone()),
        work_dir: config.work_dir.clone(),
        leases: leases.clone(),
    };
    let heartbeats = tokio::spawn(heartbeat_loop(
        client.clone(),
        worker_id.clone(),
        config.clone(),
        advertised,
        leases.clone(),
        heartbeat_every,
    ));
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.try_join_next().is_some() {}
        if *shutdown.borrow() {
            break;
        }
        let free = config.slots.saturating_sub(leases.len() as u32);
        let mut leased = false;
        if free > 0 {
            let request = v1::LeaseJobRequest {
                worker_id: worker_id.clone(),
                free_slots: free,
                loaded_models: loaded_models(&cache, &models),
            };
            match client.lease_job(request).await {
                Ok(response) => {
                    if let Some(lease) = response.into_inner().lease {
                        info!(job_id = %lease.job_id, epoch = lease.epoch, attempt = lease.attempt, "job leased");
                        let stop = leases.insert(&lease.job_id, lease.epoch);
                        running.spawn(job::run(context.clone(), lease, stop));
                        leased = true;
                    }
                }
                Err(status) => warn!(error = %status.message(), code = ?status.code(), "lease request failed"),
            }
        }
        if !leased {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
    info!(running = leases.len(), "worker shutting down; handing running jobs back");
    leases.stop_all();
    while running.join_next().await.is_some() {}
    heartbeats.abort();
    engines.shutdown();
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<Channel> {
    let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    let endpoint = Channel::from_shared(url.clone()).with_context(|| format!("invalid coordinator address {url:?}"))?;
    // Connect lazily: a coordinator that restarts is reconnected to on the next call.
    Ok(endpoint.connect_timeout(Duration::from_secs(5)).connect_lazy())
}

fn load_or_create_worker_id(config: &AgentConfig) -> anyhow::Result<String> {
    let path = config.work_dir.join("worker_id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        if !id.trim().is_empty() {
            return Ok(id.trim().to_string());
        }
    }
    let id = ptune_core::WorkerId::new().to_string();
    std::fs::write(&path, &id).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

async fn register(
    client: &mut WorkerServiceClient<Channel>,
    worker_id: &str,
    config: &AgentConfig,
    models: &[v1::BaseModel],
) -> anyhow::Result<v1::RegisterWorkerResponse> {
    let request = v1::RegisterWorkerRequest {
        worker_id: worker_id.to_string(),
        hostname: hostname(),
        devices: vec![v1::Device { name: "cpu".into(), memory_bytes: total_memory_bytes() }],
        slots: config.slots,
        models: models.to_vec(),
        memory_bytes: config.memory_bytes.unwrap_or_else(total_memory_bytes),
    };
    let mut delay = Duration::from_millis(200);
    loop {
        match client.register_worker(request.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
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

async fn heartbeat_loop(
    mut client: WorkerServiceClient<Channel>,
    worker_id: String,
    config: AgentConfig,
    models: Vec<v1::BaseModel>,
    leases: Leases,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let request = v1::HeartbeatRequest { worker_id: worker_id.clone(), leases: leases.refs() };
        match client.heartbeat(request).await {
            Ok(response) => {
                let response = response.into_inner();
                for stop in response.stop {
                    info!(job_id = %stop.job_id, epoch = stop.epoch, "coordinator asked to stop job");
                    if let Some(directive) = leases.get(&stop.job_id, stop.epoch) {
                        directive.stop();
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
                    let _ = register(&mut client, &worker_id, &config, &models).await;
                }
            }
            Err(status) => warn!(error = %status.message(), "heartbeat failed"),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Names of the served models the engines hold in memory now.
fn loaded_models(cache: &crate::engine::ModelCache, models: &[ServedModel]) -> Vec<String> {
    let loaded = cache.loaded_dirs();
    models.iter().filter(|m| loaded.contains(&m.dir)).map(|m| m.name.clone()).collect()
}

fn total_memory_bytes() -> u64 {
    proc_bytes("/proc/meminfo", "MemTotal:")
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
