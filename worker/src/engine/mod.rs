//! The libtorch training engine: trains a PEFT adapter (prompt tuning,
//! P-tuning, prefix tuning, P-tuning v2, LoRA) on a frozen base model, or a
//! job's own copy of it (full fine-tuning), and writes a Hugging Face export.
//! No networking: the agent drives it from one dedicated thread (a tch
//! `Tensor` is `Send`, not `Sync`).
//!
//! Layout: `models/` holds the base architectures, `peft/` the trainable
//! adapters, `tasks/` the heads and losses, `data/` reading, tokenizing and
//! batching, `optim.rs` AdamW with its schedule, `export.rs` the exports and
//! `train.rs` the loop that ties them together.

mod cache;
pub mod checkpoint;
mod data;
mod evaluate;
mod export;
pub mod liveness;
mod lm;
mod models;
mod optim;
mod pack;
mod peft;
pub mod rng;
mod task_data;
mod tasks;
mod train;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ptune_core::{JobSpec, Metric, SpecError};

pub use data::{ner, seq2seq};
pub use data::tokenize::TextTokenizer;
pub use evaluate::{evaluate_export, export_info, ExportInfo};
pub use export::{load_adapter, write as write_export, MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE};
pub use task_data::TaskEvaluation;
pub use models::bert::{BertConfig, BertModel};
pub use models::hooks::{Hooks, NoHooks};
pub use models::{decoder, gpt2, llama};
pub use models::registry;
pub use lm::{evaluate_export as evaluate_lm_export, DecoderBase};
pub use models::{inspect_model, BaseModel, ModelInfo};
pub use optim::{AdamW, LinearSchedule};
pub use peft::lora::{Lora, LoraConfig};
pub use peft::p_tuning::{PromptEncoder, PromptEncoderConfig};
pub use peft::prefix::{PrefixShape, PrefixTuning};
pub use peft::prompt_tuning::{prepend, PromptInit, PromptTuning};
pub use cache::{CacheStats, LoadedModel, ModelCache, SharedModel};
pub use checkpoint::{TrainerState, STATE_FILE as CHECKPOINT_STATE_FILE, TRAINER_STATE_FILE};
pub use tasks::classifier::{macro_f1, Adapter, ClassificationHead, Classifier, Level};
pub use tasks::{bleu, causal_lm, token_cls};
pub use train::{build_model, optimizer_for, step_seed};
pub use pack::{PackJob, PackLimits};

/// File names of a Hugging Face PEFT export, written into `TrainJob::out_dir`
/// (full fine-tuning writes a model folder instead: [`MODEL_CONFIG_FILE`]
/// and [`MODEL_WEIGHTS_FILE`]).
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Training provenance written beside the PEFT files (PEFT warns about unknown
/// keys in `adapter_config.json`, so it is kept out of that file).
pub const PROVENANCE_FILE: &str = "ptune.json";

/// One job for the engine: the spec and where its data and export live.
#[derive(Clone, Debug)]
pub struct TrainJob {
    pub spec: JobSpec,
    /// Local JSON Lines file with the training examples.
    pub train_file: PathBuf,
    /// Local JSON Lines file with the evaluation examples.
    pub eval_file: PathBuf,
    /// How the training file is named in errors, e.g. the spec's `data.train`.
    pub train_name: String,
    /// How the evaluation file is named in errors.
    pub eval_name: String,
    /// Folder that receives `adapter_config.json` and `adapter_model.safetensors`.
    pub out_dir: PathBuf,
    /// Folder that receives a resume checkpoint at every evaluation (see
    /// `checkpoint.rs`); none is written when absent.
    pub checkpoint_dir: Option<PathBuf>,
    /// Whether to continue from the checkpoint in `checkpoint_dir`.
    pub resume: Resume,
}

/// Whether a run continues from a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Start from step 0 (an existing checkpoint is replaced).
    Never,
    /// Continue from the checkpoint when there is one that fits the spec;
    /// start from step 0, with a warning, when there is none or it does not
    /// fit (a worker retrying a job it may or may not have started).
    IfPossible,
    /// Continue from the checkpoint; fail when there is none or it does not
    /// fit (a user asking to resume).
    Required,
}

/// What the caller of [`Engine::train`] wants after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop now without an export (cancellation).
    Stop,
    /// Stop at this step boundary but finish like a completed run: evaluate
    /// (unless the last evaluation is at this step) and export (an early stop).
    Finish,
    /// Stop at this step boundary after writing a checkpoint of it (unless
    /// one was just written), without an export: the run is handed back and
    /// another attempt resumes there (a draining worker). Ignored at the
    /// last step, which completes as usual.
    Suspend,
}

/// Progress reported to the caller of [`Engine::train`].
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// After each optimizer step: train metrics of that step (loss,
    /// learning_rate, examples_per_second, and pack_jobs: how many jobs
    /// shared the step's passes through the base model, 1 alone).
    Step { step: u64, total_steps: u64, metrics: &'a [Metric] },
    /// After each evaluation (every eval_every steps and at the end): the
    /// task's eval metrics (loss, accuracy, macro_f1; or loss, f1, precision,
    /// recall, accuracy for token classification). A checkpoint of this step
    /// is on disk by then when the job has a checkpoint folder.
    Eval { step: u64, metrics: &'a [Metric] },
    /// A resume checkpoint of this step was written into `dir` (at every
    /// evaluation, every `training.checkpoint_every` steps, and when
    /// suspended). It stays there until the next one replaces it. The
    /// answer is ignored.
    Checkpoint { step: u64, dir: &'a Path },
}

/// How a training run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Optimizer steps the job would take if it ran to the end.
    pub total_steps: u64,
    /// Metrics of the last evaluation (empty if stopped before any).
    pub final_metrics: Vec<Metric>,
    /// Prediction for each evaluation example, in file order, from the final
    /// evaluation (empty when stopped): the label (sequence classification)
    /// or the tag of each word, `null` for words cut by truncation (token
    /// classification).
    pub eval_predictions: Vec<serde_json::Value>,
    /// True when the caller stopped training; no export was written then.
    pub stopped: bool,
    /// True when the stop was a [`Control::Suspend`]: a checkpoint of
    /// `steps` was written (when the job has a checkpoint folder).
    pub suspended: bool,
}

/// Why the engine could not train a job.
#[derive(thiserror::Error, Debug)]
pub enum EngineError {
    /// Bad data: never retried.
    #[error("{file} line {line}: {message}")]
    Data { file: String, line: u64, message: String },
    /// A data file that parses but cannot be trained on as a whole.
    #[error("{file}: {message}")]
    Dataset { file: String, message: String },
    /// The spec asks for something this engine or model cannot do.
    #[error("job spec cannot run: {0}")]
    Spec(#[from] SpecError),
    /// The model folder is unreadable or holds an unsupported model.
    #[error("model: {0}")]
    Model(String),
    /// The training loss became NaN or infinite: the run cannot recover.
    #[error("diverged: loss became {loss} at step {step}")]
    Diverged { step: u64, loss: f64 },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// The engine panicked while training (a bug, or a poison input); the
    /// engine thread survived.
    #[error("the engine panicked while training this job: {0}")]
    Panicked(String),
}

/// Whose fault a failed run is, which decides how it is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The same error on every attempt: bad data, a spec the model cannot
    /// take, a diverged loss, out of memory for the spec. Fail at once.
    Permanent,
    /// An error of the job that another attempt may not repeat (a panic, a
    /// transient libtorch error): retried after a backoff, counted against
    /// `max_attempts`.
    Job,
    /// The worker failed, not the job (a full disk, a device error):
    /// retried at once elsewhere, not counted against `max_attempts`.
    Infrastructure,
}

impl EngineError {
    /// True for failures another attempt (perhaps on another worker) may not
    /// repeat; bad data, specs and models fail the same way every time.
    pub fn is_retryable(&self) -> bool {
        self.kind() != FailureKind::Permanent
    }

    /// Whose fault the error is; see [`FailureKind`].
    pub fn kind(&self) -> FailureKind {
        match self {
            EngineError::Data { .. }
            | EngineError::Dataset { .. }
            | EngineError::Spec(_)
            | EngineError::Model(_)
            | EngineError::Diverged { .. } => FailureKind::Permanent,
            EngineError::Io { source, .. } if is_disk_failure(source) => FailureKind::Infrastructure,
            EngineError::Io { .. } | EngineError::Panicked(_) => FailureKind::Job,
            EngineError::Torch(tch::TchError::Shape(_)) => FailureKind::Permanent,
            EngineError::Torch(error) => torch_failure_kind(&error.to_string()),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        EngineError::Io { path: path.display().to_string(), source }
    }
}

/// True for an I/O error that says the disk, not the data, is at fault:
/// no space, over quota, read-only, or a device error.
pub fn is_disk_failure(error: &std::io::Error) -> bool {
    // ENOSPC, EDQUOT, EROFS, EIO
    matches!(error.raw_os_error(), Some(28 | 122 | 30 | 5))
}

/// How a libtorch error message is retried: out of memory fails at once
/// (the spec needs more than the device has), device errors are the
/// worker's, anything else may be transient.
fn torch_failure_kind(message: &str) -> FailureKind {
    let lower = message.to_ascii_lowercase();
    if lower.contains("out of memory") || lower.contains("can't allocate memory") {
        FailureKind::Permanent
    } else if lower.contains("cuda error") || lower.contains("cudnn") || lower.contains("nccl") || lower.contains("cublas") {
        FailureKind::Infrastructure
    } else {
        FailureKind::Job
    }
}

/// Trains jobs on base models from a [`ModelCache`], which may be shared
/// with other engines (one per engine thread of a worker): every job on the
/// same model, on any thread, reads one frozen copy.
pub struct Engine {
    device: tch::Device,
    threads: i32,
    cache: Arc<ModelCache>,
}

impl Engine {
    /// Creates an engine that trains on `device` with its own unbounded
    /// model cache, using every CPU core for libtorch's intra-op parallelism.
    pub fn new(device: tch::Device) -> Self {
        Self::with_threads(device, 0)
    }

    /// Creates an engine whose libtorch work uses `threads` CPU threads
    /// (0: every core), with its own unbounded model cache.
    pub fn with_threads(device: tch::Device, threads: usize) -> Self {
        Self::with_cache(Arc::new(ModelCache::new(device, None)), threads)
    }

    /// Creates an engine on `cache`'s device and models. The thread setting
    /// is applied on the thread that trains, since OpenMP keeps it per thread.
    pub fn with_cache(cache: Arc<ModelCache>, threads: usize) -> Self {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Self { device: cache.device(), threads: i32::try_from(threads).unwrap_or(i32::MAX), cache }
    }

    pub fn device(&self) -> tch::Device {
        self.device
    }

    pub fn cache(&self) -> &Arc<ModelCache> {
        &self.cache
    }

    /// The encoder in `model_dir`, loaded once per cache.
    pub fn base_model(&self, model_dir: &Path) -> Result<Arc<SharedModel>, EngineError> {
        self.cache.get(model_dir, ptune_core::Task::SequenceClassification)
    }

    /// Trains `job` on the base model in `model_dir`. Calls `on_event` after
    /// every step and evaluation; when it returns [`Control::Stop`], training
    /// stops at that step boundary, no export is written, and the outcome has
    /// `stopped = true`.
    pub fn train(
        &mut self,
        model_dir: &Path,
        job: &TrainJob,
        on_event: &mut dyn FnMut(Event<'_>) -> Control,
    ) -> Result<TrainOutcome, EngineError> {
        tch::set_num_threads(self.threads);
        let device = self.device;
        check_architecture(&job.spec, model_dir)?;
        let model = self.cache.get(model_dir, job.spec.task)?;
        match &model.model {
            LoadedModel::Decoder(base) => lm::run(base, device, job, on_event),
            LoadedModel::Encoder(base) => train::run(base, device, job, on_event),
        }
    }

    /// Trains jobs on the base model in `model_dir` in packed steps (see
    /// `pack.rs`; classification on an encoder, causal LM on a decoder; the
    /// jobs' task decides which the cache loads): `first`, then whatever `admit(room)` hands over
    /// between steps, until none is left. Each job hears of its steps,
    /// evaluations and ending through its own callbacks, as with
    /// [`Engine::train`].
    pub fn train_pack(
        &mut self,
        model_dir: &Path,
        limits: PackLimits,
        first: PackJob,
        admit: &mut dyn FnMut(usize) -> Vec<PackJob>,
    ) {
        tch::set_num_threads(self.threads);
        let loaded = check_architecture(&first.job.spec, model_dir)
            .and_then(|()| self.cache.get(model_dir, first.job.spec.task));
        let model = match loaded {
            Ok(model) => model,
            Err(err) => return (first.on_done)(Err(err)),
        };
        let mut first = Some(first);
        let mut admit_all = |room: usize| -> Vec<PackJob> {
            match first.take() {
                Some(job) if room > 1 => std::iter::once(job).chain(admit(room - 1)).collect(),
                Some(job) => vec![job],
                None => admit(room),
            }
        };
        match &model.model {
            LoadedModel::Encoder(base) => pack::run_pack(base, self.device, limits, &mut admit_all),
            LoadedModel::Decoder(base) => pack::run_pack(base, self.device, limits, &mut admit_all),
        }
    }
}

/// Refuses a task the model's architecture cannot serve (classification
/// pools an encoder, causal LM needs a decoder), naming the task, before
/// anything is loaded.
fn check_architecture(spec: &JobSpec, model_dir: &Path) -> Result<(), EngineError> {
    #[derive(serde::Deserialize)]
    struct ModelType {
        model_type: String,
    }
    let ModelType { model_type } = models::decoder::read_config(model_dir, "a Hugging Face model")?;
    let decoder = models::gpt2::Gpt2Config::MODEL_TYPES.contains(&model_type.as_str())
        || models::llama::LlamaConfig::MODEL_TYPES.contains(&model_type.as_str());
    let encoder = models::bert::BertConfig::MODEL_TYPES.contains(&model_type.as_str());
    let wanted = match spec.task {
        ptune_core::Task::CausalLm if encoder => "a decoder-only model (gpt2, llama, mistral, qwen2)",
        ptune_core::Task::SequenceClassification | ptune_core::Task::TokenClassification if decoder => {
            "an encoder model (bert)"
        }
        _ => return Ok(()),
    };
    Err(SpecError::new(
        "task",
        format!("{} needs {wanted}, but base_model {:?} has model_type {model_type:?}", spec.task, spec.base_model),
    )
    .into())
}
