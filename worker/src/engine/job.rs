//! One job as the engine sees it, and what passes between the engine and
//! its caller while the job trains: events out, controls back, and how the
//! run ended.

use std::path::{Path, PathBuf};

use ptune_core::{JobSpec, Metric};

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

/// What the caller of `Engine::train` wants after an event.
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

/// Progress reported to the caller of `Engine::train`.
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

