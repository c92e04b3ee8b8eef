//! The libtorch training engine: trains a PEFT adapter (prompt tuning,
//! P-tuning, prefix tuning, P-tuning v2, LoRA) on a frozen base model, or a
//! job's own copy of it (full fine-tuning), and writes a Hugging Face export.
//! No networking: the agent drives it from one dedicated thread (a tch
//! `Tensor` is `Send`, not `Sync`).
//!
//! Layout, from the bottom up: `data/` reads, tokenizes and batches
//! examples; `models/` holds the base architectures and loads them frozen
//! (`cache.rs` keeps them, one copy per process); `peft/` the adapters,
//! built and read back the same way for every task; `train/` the one
//! training loop, with `optim.rs` (AdamW and its schedule), `checkpoint.rs`
//! and `rng.rs`; `pack.rs` several jobs' steps through one base; `tasks/`
//! one folder per task (classification, token classification, causal LM),
//! each with its data, head, job setup and evaluation; `export.rs` writes
//! exports and `evaluate.rs` reads and evaluates them; `parallel.rs` trains
//! one job over several devices, its ranks meeting in a `collective/`.
//! Dependencies point down that list: tasks and methods know the models,
//! never the reverse.

mod allocator;
mod cache;
pub mod checkpoint;
pub mod collective;
mod data;
mod error;
mod evaluate;
mod export;
mod job;
pub mod liveness;
mod models;
mod optim;
mod pack;
mod parallel;
mod peft;
pub mod rng;
mod tasks;
mod train;

use std::path::Path;
use std::sync::Arc;

pub use cache::{CacheStats, ModelCache, SharedModel};
pub use checkpoint::{TrainerState, STATE_FILE as CHECKPOINT_STATE_FILE, TRAINER_STATE_FILE};
pub use data::tokenize::{LmTokenizer, TextTokenizer};
pub use data::{ner, seq2seq};
pub use error::{is_disk_failure, panic_message, EngineError, FailureKind};
pub use evaluate::{evaluate_export, export_info, ExportInfo};
pub use export::{MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, PROVENANCE_FILE};
pub use job::{Control, Event, Resume, TrainJob, TrainOutcome};
pub use models::bert::{BertConfig, BertModel};
pub use models::frozen::{FrozenBase, FrozenDecoder, FrozenEncoder};
pub use models::hooks::{HookSites, Hooks, NoHooks};
pub use models::{base_kind, decoder, factory, gpt2, llama, registry, safetensors, ModelInfo};
pub use optim::{AdamW, LinearSchedule};
pub use pack::{PackJob, PackLimits};
pub use peft::lora::{Lora, LoraConfig};
pub use peft::p_tuning::{PromptEncoder, PromptEncoderConfig};
pub use peft::prefix::{PrefixShape, PrefixTuning};
pub use peft::prompt_tuning::{prepend, PromptInit, PromptTuning};
pub use peft::{build_adapter, Adapter, SavedAdapter, Trainable, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
pub use tasks::classification::{
    build_classifier, load_classifier, macro_f1, write_export, ClassificationHead, Classifier, Level,
};
pub use tasks::{causal_lm, classification, token_classification};
pub use train::loss_scale::{LossScaler, ScaledStep};
pub use train::{optimizer_for, step_seed, TaskEvaluation};

use pack::{run_pack, SharedBase};
use tasks::check_architecture;
use train::drive;

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
        allocator::configure();
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

    /// The base model in `model_dir`, loaded once per cache.
    pub fn base_model(&self, model_dir: &Path) -> Result<Arc<SharedModel>, EngineError> {
        self.cache.get(model_dir)
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
        check_architecture(&job.spec, model_dir)?;
        let model = self.cache.get_in(model_dir, job.spec.training.precision)?;
        match &model.model {
            FrozenBase::Encoder(base) => train_alone(base, self.device, job, on_event),
            FrozenBase::Decoder(base) => train_alone(base, self.device, job, on_event),
        }
    }

    /// Trains `job` data parallel over `devices`, one rank per device, each
    /// on its own thread (this one for rank 0) with its share of every batch
    /// (see `train/parallel.rs`): the outcome, the reported metrics and the
    /// export are those of one device training on the whole batch (up to
    /// float rounding; dropout masks aside). Ranks on this engine's device
    /// share its model cache; ranks on other devices get one each. Each
    /// rank's libtorch work takes an equal part of this engine's threads.
    /// One device trains as [`Engine::train`] does.
    pub fn train_data_parallel(
        &mut self,
        model_dir: &Path,
        job: &TrainJob,
        devices: &[tch::Device],
        on_event: &mut dyn FnMut(Event<'_>) -> Control,
    ) -> Result<TrainOutcome, EngineError> {
        if devices.len() <= 1 && devices.iter().all(|&d| d == self.device) {
            return self.train(model_dir, job, on_event);
        }
        let mut caches: Vec<Arc<ModelCache>> = vec![self.cache.clone()];
        let ranks = parallel::group(devices)?
            .into_iter()
            .zip(devices)
            .map(|(comm, &device)| {
                let cache = match caches.iter().find(|c| c.device() == device) {
                    Some(cache) => cache.clone(),
                    None => {
                        let cache = Arc::new(ModelCache::new(device, None));
                        caches.push(cache.clone());
                        cache
                    }
                };
                parallel::Rank { cache, comm }
            })
            .collect();
        let threads = (self.threads / devices.len() as i32).max(1);
        parallel::train_ranks(ranks, threads, model_dir, job, on_event)
    }

    /// Trains jobs on the base model in `model_dir` in packed steps (see
    /// `pack.rs`; classification on an encoder, causal LM on a decoder; the
    /// jobs' task decides which the cache loads, in the jobs' precision, which
    /// they all share): `first`, then whatever `admit(room)` hands over
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
        let precision = first.job.spec.training.precision;
        let loaded = check_architecture(&first.job.spec, model_dir).and_then(|()| self.cache.get_in(model_dir, precision));
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
            FrozenBase::Encoder(base) => run_pack(base, self.device, limits, &mut admit_all),
            FrozenBase::Decoder(base) => run_pack(base, self.device, limits, &mut admit_all),
        }
    }
}

/// Trains `job` alone on `base`: its task's setup, then the training loop.
fn train_alone<B: SharedBase>(
    base: &B,
    device: tch::Device,
    job: &TrainJob,
    on_event: &mut dyn FnMut(Event<'_>) -> Control,
) -> Result<TrainOutcome, EngineError> {
    let (vars, run) = base.prepare(device, job)?;
    drive(job, base.sha256(), &vars, &run, on_event)
}
