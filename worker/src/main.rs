//! `ptune-worker`: trains PEFT jobs leased from a ptune coordinator, or one
//! spec locally with `ptune-worker train`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ptune_worker::agent::{self, AgentConfig};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "ptune-worker", version, about)]
struct Args {
    /// Coordinator gRPC address; several, comma-separated, to fail over between them (a name that resolves to
    /// several addresses counts as one per address).
    #[arg(long, env = "PTUNE_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// Folder of base models, one Hugging Face folder each (config.json, model.safetensors, tokenizer.json).
    #[arg(long, env = "PTUNE_MODELS_DIR", default_value = "models")]
    models_dir: PathBuf,
    /// Devices to train on, one engine each: auto (every GPU libtorch sees, else the CPU), cpu, or a
    /// comma-separated list of GPUs (cuda:0,cuda:1). The coordinator places each job on a device whose memory
    /// holds it beside the jobs already there.
    #[arg(long, env = "PTUNE_DEVICES", default_value = "auto")]
    devices: String,
    /// Jobs trained at once on each device.
    #[arg(long, env = "PTUNE_SLOTS", default_value_t = 1)]
    slots: u32,
    /// Dataset cache and adapter staging area; also keeps the worker's id across restarts.
    #[arg(long, env = "PTUNE_WORK_DIR", default_value = ".ptune/worker")]
    work_dir: PathBuf,
    /// Threads libtorch uses (0: all cores).
    #[arg(long, env = "PTUNE_THREADS", default_value_t = 0)]
    threads: u32,
    /// Most MiB of base-model weights kept loaded; models no running job uses are evicted least recently used
    /// first (0: no limit). Every slot shares one copy of each model either way.
    #[arg(long, env = "PTUNE_MODEL_MEMORY_MIB", default_value_t = 0)]
    model_memory_mib: u64,
    /// Most classification jobs on one base model that train in one pack, sharing every step's forward and
    /// backward passes through the frozen model (0: as many as there are slots; 1: every job alone).
    #[arg(long, env = "PTUNE_PACK_JOBS", default_value_t = 0)]
    pack_jobs: u32,
    /// Most token positions (virtual tokens and padding included) in one packed forward pass; a step whose jobs
    /// hold more runs as several passes. Bounds the activation memory of a pack.
    #[arg(long, env = "PTUNE_PACK_TOKENS", default_value_t = 1024)]
    pack_tokens: u32,
    /// MiB of the machine's memory this worker may use for training on the CPU, told to the coordinator, which
    /// places no job on the CPU beside jobs estimated to need more in all (0: the machine's total memory). GPUs
    /// count their own memory.
    #[arg(long, env = "PTUNE_MEMORY_MIB", default_value_t = 0)]
    memory_mib: u64,
    /// Seconds a graceful shutdown (SIGTERM) waits for running jobs to checkpoint and hand their leases back; then,
    /// or at a second signal, they are handed back as they are. Keep it below Kubernetes'
    /// terminationGracePeriodSeconds.
    #[arg(long, env = "PTUNE_DRAIN_TIMEOUT", default_value_t = 25)]
    drain_timeout: u64,
    /// Seconds without progress after which a job's attempt is failed and retried (0: sized from each job's spec;
    /// a job's training.stall_timeout_seconds wins).
    #[arg(long, env = "PTUNE_STALL_TIMEOUT", default_value_t = 0)]
    stall_timeout: u64,
    /// The worker's token (role worker). Prefer PTUNE_TOKEN or --token-file: a flag shows in `ps`.
    #[arg(long, env = "PTUNE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the worker's token (e.g. a mounted Kubernetes Secret); wins over PTUNE_TOKEN.
    #[arg(long, env = "PTUNE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM of the CA that signed the coordinator's certificate, for https:// coordinators.
    #[arg(long, env = "PTUNE_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate for a coordinator that requires one (mTLS); with --tls-key.
    #[arg(long, env = "PTUNE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM key of --tls-cert.
    #[arg(long, env = "PTUNE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "PTUNE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train one job spec locally, without a coordinator.
    Train {
        /// Job spec (TOML); dataset paths are relative to it.
        #[arg(long)]
        spec: PathBuf,
        /// Output folder: adapter/ (Hugging Face PEFT export), checkpoint/ (resume state), metrics.jsonl
        /// and eval_predictions.jsonl.
        #[arg(long)]
        out: PathBuf,
        /// Continue from OUT/checkpoint (written at every evaluation of an earlier run of the same spec).
        #[arg(long)]
        resume: bool,
    },
    /// Evaluate an export (this engine's, of any task and method, or a classifier adapter Hugging Face
    /// PEFT saved) on JSON Lines: loads it onto its base model under --models-dir and prints the metrics
    /// training reports (for causal LM: loss and BLEU of the decoded outputs).
    Eval {
        #[command(flatten)]
        options: ptune_worker::local::EvalOptions,
        /// Print the metrics as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the memory a job spec needs on its base model under --models-dir, as the coordinator estimates it.
    Estimate {
        /// Job spec (TOML).
        #[arg(long)]
        spec: PathBuf,
        /// Print the estimate as JSON, in bytes.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format);
    match args.command {
        Some(Command::Train { spec, out, resume }) => {
            let base_model = read_spec(&spec)?.base_model;
            let model_dir = args.models_dir.join(&base_model);
            let outcome = ptune_worker::local::train_local(&spec, &model_dir, &out, resume, args.threads as usize)?;
            for metric in &outcome.final_metrics {
                println!("{} {} = {:.4} (step {})", metric.kind.as_str(), metric.name, metric.value, metric.step);
            }
            println!("adapter written to {}", out.join("adapter").display());
            Ok(())
        }
        Some(Command::Eval { mut options, json }) => {
            options.models_dir = args.models_dir;
            options.threads = args.threads as usize;
            let (spec, evaluation) = ptune_worker::local::eval_local(&options)?;
            if json {
                let metrics: serde_json::Map<String, serde_json::Value> =
                    evaluation.metrics.iter().map(|m| (m.name.clone(), m.value.into())).collect();
                let value = serde_json::json!({
                    "base_model": spec.base_model, "task": spec.task, "examples": evaluation.predictions.len(),
                    "metrics": metrics,
                });
                println!("{value}");
            } else {
                println!("{} examples on {} ({})", evaluation.predictions.len(), spec.base_model, spec.task);
                for metric in &evaluation.metrics {
                    println!("eval {} = {:.4}", metric.name, metric.value);
                }
            }
            Ok(())
        }
        Some(Command::Estimate { spec, json }) => {
            let spec = read_spec(&spec)?;
            let scan = agent::scan_models(&args.models_dir)?;
            let Some(model) = scan.served.iter().find(|m| m.name == spec.base_model) else {
                anyhow::bail!("base_model {:?} is not a model this worker trains under {}", spec.base_model, args.models_dir.display());
            };
            let Some(shape) = model.shape() else {
                anyhow::bail!("base_model {:?} has model_type {:?}, which has no memory estimate", spec.base_model, model.info.model_type);
            };
            let estimate = ptune_core::memory::estimate(&spec, &shape);
            if json {
                let mut value = serde_json::to_value(estimate)?;
                value["total_bytes"] = estimate.total_bytes().into();
                value["base_model"] = spec.base_model.into();
                println!("{value}");
            } else {
                println!("{}: {estimate}", spec.base_model);
            }
            Ok(())
        }
        None => {
            log_libtorch();
            let memory_bytes = (args.memory_mib > 0).then(|| args.memory_mib << 20);
            let devices = agent::devices::resolve(&args.devices, memory_bytes)?;
            for device in &devices {
                tracing::info!(device = %device.name, memory_bytes = device.memory_bytes,
                               free_memory_bytes = device.free_memory_bytes, "training device");
            }
            let config = AgentConfig {
                coordinator: args.coordinator,
                models_dir: args.models_dir,
                devices,
                slots: args.slots.max(1),
                work_dir: args.work_dir,
                threads: args.threads,
                model_memory: (args.model_memory_mib > 0).then(|| args.model_memory_mib << 20),
                memory_bytes,
                pack: ptune_worker::engine::PackLimits {
                    max_jobs: match args.pack_jobs {
                        0 => args.slots.max(1) as usize,
                        n => n as usize,
                    },
                    max_tokens: args.pack_tokens.max(1) as usize,
                },
                drain_timeout: std::time::Duration::from_secs(args.drain_timeout),
                stall_timeout: (args.stall_timeout > 0).then(|| std::time::Duration::from_secs(args.stall_timeout)),
                client: ptune_proto::client::ClientOptions {
                    // A token file, when given, wins over PTUNE_TOKEN, which
                    // a shell may hold for the CLI.
                    token: match (&args.token_file, args.token) {
                        (Some(file), _) => Some(
                            std::fs::read_to_string(file)
                                .with_context(|| format!("cannot read the token file {}", file.display()))?
                                .trim()
                                .to_string(),
                        ),
                        (None, token) => token,
                    },
                    ca_cert: args.ca_cert,
                    client_cert: args.tls_cert.zip(args.tls_key),
                },
            };
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let (tx, rx) = tokio::sync::watch::channel(0u32);
                tokio::spawn(async move {
                    for count in 1.. {
                        shutdown_signal().await;
                        tracing::info!(count, "shutdown signal received");
                        let _ = tx.send(count);
                    }
                });
                agent::run(config, rx).await
            })
        }
    }
}

/// What the worker can train on, once at start: the libtorch it was built
/// against (and that wheel's CUDA), whether libtorch's CUDA half is linked
/// (the `cuda` feature), whether CUDA and cuDNN are available, and how many
/// GPUs libtorch sees.
fn log_libtorch() {
    tracing::info!(
        libtorch = env!("PTUNE_LIBTORCH_VERSION"),
        cuda = env!("PTUNE_TORCH_CUDA_VERSION"),
        cuda_linked = cfg!(feature = "cuda"),
        cuda_available = tch::Cuda::is_available(),
        cudnn_available = tch::Cuda::cudnn_is_available(),
        gpus = tch::Cuda::device_count(),
        "libtorch"
    );
}

fn read_spec(path: &std::path::Path) -> anyhow::Result<ptune_core::JobSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    ptune_core::JobSpec::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
    }
}

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
