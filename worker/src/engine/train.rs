//! The training loop: reads and tokenizes the data, builds the job's adapter
//! on the shared frozen model, runs AdamW steps with periodic evaluation and
//! checkpoints, reports every step and evaluation to the caller, and writes
//! the export. [`drive`] is the loop every task shares; [`run`] sets up a
//! classification job for it (`lm.rs` sets up causal-LM jobs).
//!
//! Only the job's own variables (adapter, head, and for full fine-tuning its
//! copy of the encoder) get gradients and optimizer state; the shared base's
//! tensors are frozen and never handed to the optimizer.

use std::path::Path;
use std::time::Instant;

use ptune_core::model_types::lora_target_matches;
use ptune_core::{JobSpec, Method, Metric, MetricKind, ModelLimits, SpecError, Task};
use tch::{nn, Device, Tensor};

use super::checkpoint::{self, TrainerState};
use super::data::batch::EpochBatches;
use super::models::bert::BertConfig;
use super::models::BaseModel;
use super::optim::{AdamW, LinearSchedule};
use super::peft::lora::{resolve_targets, Lora, LoraConfig, LoraModule};
use super::peft::p_tuning::{PromptEncoder, PromptEncoderConfig};
use super::peft::prefix::{PrefixShape, PrefixTuning};
use super::peft::prompt_tuning::{PromptInit, PromptTuning};
use super::rng::DropoutStream;
use super::task_data::{TaskData, TaskEvaluation, TrainBatch};
use super::tasks::classifier::{Adapter, ClassificationHead, Classifier, ClassifierInput, Level};
use super::{export, Control, EngineError, Event, Resume, TrainJob, TrainOutcome};

/// Smallest evaluation batch: evaluation keeps no activations for a
/// backward pass, so it can take larger batches than training.
const MIN_EVAL_BATCH_SIZE: usize = 64;

/// Trains a classification job (sequence or token level) on an encoder.
pub fn run(
    base: &BaseModel,
    device: Device,
    job: &TrainJob,
    on_event: &mut dyn FnMut(Event<'_>) -> Control,
) -> Result<TrainOutcome, EngineError> {
    let (vars, task) = prepare_classifier(base, device, job)?;
    drive(job, &base.info.sha256, &vars, &task, on_event)
}

/// Reads a classification job's data and builds its adapter and head.
pub(crate) fn prepare_classifier<'a>(
    base: &'a BaseModel,
    device: Device,
    job: &TrainJob,
) -> Result<(nn::VarStore, ClassifierRun<'a>), EngineError> {
    let spec = &job.spec;
    check_supported(spec, base)?;
    let data = TaskData::load(job, base)?;
    // Initialisation draws from libtorch's generator seeded with the job's seed.
    tch::manual_seed(spec.training.seed as i64);
    let vars = nn::VarStore::new(device);
    let model = build_model(spec, base, &vars.root(), data.num_labels())?;
    let eval_batch_size = eval_batch_size(spec);
    Ok((vars, ClassifierRun { base, model, data, device, eval_batch_size, spec: spec.clone() }))
}

/// Batch size of evaluations: at least [`MIN_EVAL_BATCH_SIZE`].
pub(crate) fn eval_batch_size(spec: &JobSpec) -> usize {
    (spec.training.batch_size as usize).max(MIN_EVAL_BATCH_SIZE)
}

/// What the training loop needs of a job's model and data, whatever the task.
pub(crate) trait TaskRun {
    fn train_len(&self) -> usize;
    fn eval_len(&self) -> usize;
    /// Mean loss of the training examples at `indices`, in training mode,
    /// with dropout drawn from `stream` where the task supports it.
    fn train_loss(&self, indices: &[usize], stream: &DropoutStream) -> Tensor;
    /// Evaluates every evaluation example, without gradients.
    fn evaluate(&self, step: u64) -> Result<TaskEvaluation, EngineError>;
    /// Writes the export of the job's variables `vars` into `out_dir`.
    fn export(&self, out_dir: &Path, vars: &nn::VarStore, provenance: &serde_json::Value) -> Result<(), EngineError>;
}

/// A classifier and its data.
pub(crate) struct ClassifierRun<'a> {
    base: &'a BaseModel,
    pub(crate) model: Classifier,
    pub(crate) data: TaskData,
    device: Device,
    eval_batch_size: usize,
    spec: JobSpec,
}

impl ClassifierRun<'_> {
    pub(crate) fn device(&self) -> Device {
        self.device
    }

    /// One batch of the job, with its stream, for a shared pass.
    pub(crate) fn input<'s>(&'s self, batch: &TrainBatch, stream: &'s DropoutStream) -> ClassifierInput<'s> {
        ClassifierInput {
            model: &self.model,
            input_ids: batch.input_ids.shallow_clone(),
            attention_mask: batch.attention_mask.shallow_clone(),
            stream: Some(stream),
        }
    }
}

impl TaskRun for ClassifierRun<'_> {
    fn train_len(&self) -> usize {
        self.data.train_len()
    }

    fn eval_len(&self) -> usize {
        self.data.eval_len()
    }

    fn train_loss(&self, indices: &[usize], stream: &DropoutStream) -> Tensor {
        // Alone, the job takes the same path as in a pack: a pass of one.
        let batch = self.data.train_batch(indices, self.device);
        let logits = Classifier::packed_logits(&self.base.encoder, &[self.input(&batch, stream)], true);
        self.data.loss(&logits[0], &batch.labels)
    }

    fn evaluate(&self, step: u64) -> Result<TaskEvaluation, EngineError> {
        Ok(self.data.evaluate(&self.model, self.base, self.eval_batch_size, self.device, step))
    }

    fn export(&self, out_dir: &Path, vars: &nn::VarStore, provenance: &serde_json::Value) -> Result<(), EngineError> {
        export::write(out_dir, &self.spec, &self.base.config, &self.model, vars, provenance)
    }
}

/// The training loop shared by every task: resumes from the job's
/// checkpoint when asked, runs AdamW steps on `vars` (the job's variables
/// only) with the spec's schedule, evaluates every `eval_every` steps and at
/// the end, writes a checkpoint after every evaluation, reports every step
/// and evaluation to `on_event`, and exports at the end.
///
/// Every step reseeds libtorch's generator from (seed, step), and draws
/// dropout from a stream seeded the same way, so the dropout of a step
/// depends neither on whether the run was resumed before it nor on which
/// jobs share its pass. The data order has its own generator.
pub(crate) fn drive(
    job: &TrainJob,
    base_sha256: &str,
    vars: &nn::VarStore,
    task: &dyn TaskRun,
    on_event: &mut dyn FnMut(Event<'_>) -> Control,
) -> Result<TrainOutcome, EngineError> {
    let mut progress = Progress::start(job, vars, task)?;
    while !progress.done() {
        let started = Instant::now();
        let planned = progress.begin_step();
        let loss = task.train_loss(&planned.indices, &planned.stream);
        loss.backward();
        let seconds = started.elapsed().as_secs_f64();
        match progress.end_step(&planned, &loss, seconds, 1, vars, task, on_event)? {
            Flow::Continue => {}
            Flow::Finish => break,
            Flow::Stopped(outcome) => return Ok(outcome),
        }
    }
    progress.finish(base_sha256, vars, task)
}

/// What the loop does after a step.
pub(crate) enum Flow {
    Continue,
    /// Finish like a completed run (export) at this step.
    Finish,
    /// Stopped on request, without an export.
    Stopped(TrainOutcome),
}

/// One step's plan: its examples, learning-rate factor and dropout stream.
pub(crate) struct PlannedStep {
    pub indices: Vec<usize>,
    lr_factor: f64,
    pub stream: DropoutStream,
}

/// A job's place in the loop, kept between steps: its optimizer, schedule,
/// data order, step and last evaluation.
pub(crate) struct Progress {
    job: TrainJob,
    optimizer: AdamW,
    schedule: LinearSchedule,
    batches: EpochBatches,
    step: u64,
    total_steps: u64,
    last_eval: Vec<Metric>,
    eval_predictions: Vec<serde_json::Value>,
}

impl Progress {
    /// Sets up the optimizer and schedule, and resumes from the job's
    /// checkpoint as `job.resume` asks.
    pub(crate) fn start(job: &TrainJob, vars: &nn::VarStore, task: &dyn TaskRun) -> Result<Self, EngineError> {
        let spec = &job.spec;
        let t = &spec.training;
        let total_steps = spec.total_steps(task.train_len() as u64);
        tracing::info!(
            job = %spec.name,
            task = %spec.task,
            train_examples = task.train_len(),
            eval_examples = task.eval_len(),
            total_steps,
            "training started"
        );
        let mut optimizer = optimizer_for(vars, spec);
        let resumed = resume_state(job, vars, &mut optimizer)?;
        let mut batches = EpochBatches::new(task.train_len(), t.batch_size as usize, t.seed);
        let (step, last_eval) = match resumed {
            Some(state) => {
                let step = state.step.min(total_steps);
                batches.skip(step);
                tracing::info!(job = %spec.name, step, total_steps, "resumed from checkpoint");
                (step, state.last_eval)
            }
            None => (0, Vec::new()),
        };
        Ok(Self {
            job: job.clone(),
            optimizer,
            schedule: LinearSchedule::new(total_steps, t.warmup_ratio),
            batches,
            step,
            total_steps,
            last_eval,
            eval_predictions: Vec::new(),
        })
    }

    pub(crate) fn done(&self) -> bool {
        self.step >= self.total_steps
    }

    pub(crate) fn name(&self) -> &str {
        &self.job.spec.name
    }

    /// Clears the gradients and picks the next step's examples.
    pub(crate) fn begin_step(&mut self) -> PlannedStep {
        super::liveness::beat();
        let seed = step_seed(self.job.spec.training.seed, self.step);
        tch::manual_seed(seed);
        self.optimizer.zero_grad();
        let indices = self.batches.next_batch().to_vec();
        PlannedStep { indices, lr_factor: self.schedule.factor(self.step), stream: DropoutStream::new(seed) }
    }

    /// Applies the step whose `loss` has been backpropagated, reports it
    /// (`pack_jobs`: how many jobs shared its passes), and evaluates and
    /// checkpoints when due.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn end_step(
        &mut self,
        planned: &PlannedStep,
        loss: &Tensor,
        seconds: f64,
        pack_jobs: usize,
        vars: &nn::VarStore,
        task: &dyn TaskRun,
        on_event: &mut dyn FnMut(Event<'_>) -> Control,
    ) -> Result<Flow, EngineError> {
        let t = &self.job.spec.training;
        self.optimizer.step(planned.lr_factor);
        self.step += 1;
        super::liveness::beat();
        let (step, total_steps) = (self.step, self.total_steps);
        crate::faults::at(crate::faults::Point::Step, &self.job.spec.name, step).map_err(|e| EngineError::io(Path::new("fault"), e))?;
        let loss = f64::try_from(loss)?;
        let metrics = [
            Metric::new(step, MetricKind::Train, "loss", loss),
            Metric::new(step, MetricKind::Train, "learning_rate", t.learning_rate * planned.lr_factor),
            Metric::new(step, MetricKind::Train, "examples_per_second", planned.indices.len() as f64 / seconds.max(1e-9)),
            Metric::new(step, MetricKind::Train, "pack_jobs", pack_jobs as f64),
        ];
        tracing::debug!(step, total_steps, loss, epoch = self.batches.epoch(), "step");
        if !loss.is_finite() {
            return Err(EngineError::Diverged { step, loss });
        }
        let mut control = on_event(Event::Step { step, total_steps, metrics: &metrics });
        if control == Control::Stop {
            return Ok(Flow::Stopped(self.stopped(false)));
        }
        let periodic = t.eval_every > 0 && step.is_multiple_of(t.eval_every);
        let mut checkpointed = false;
        if periodic || step == total_steps || control == Control::Finish {
            let evaluation = task.evaluate(step)?;
            (self.last_eval, self.eval_predictions) = (evaluation.metrics, evaluation.predictions);
            tracing::info!(job = %self.job.spec.name, step, metrics = %summary(&self.last_eval), "evaluated");
            self.save_checkpoint(vars, on_event)?;
            checkpointed = true;
            control = match (control, on_event(Event::Eval { step, metrics: &self.last_eval })) {
                (_, Control::Stop) => return Ok(Flow::Stopped(self.stopped(false))),
                (Control::Finish, _) | (_, Control::Finish) => Control::Finish,
                (Control::Suspend, _) | (_, Control::Suspend) => Control::Suspend,
                _ => Control::Continue,
            };
        }
        if control == Control::Finish {
            tracing::info!(step, total_steps, "stopping early on request; exporting");
            return Ok(Flow::Finish);
        }
        let suspend = control == Control::Suspend && step < total_steps;
        let due = t.checkpoint_every > 0 && step.is_multiple_of(t.checkpoint_every);
        if !checkpointed && (due || suspend) {
            self.save_checkpoint(vars, on_event)?;
        }
        if suspend {
            tracing::info!(job = %self.job.spec.name, step, total_steps, "suspended at a checkpoint");
            return Ok(Flow::Stopped(self.stopped(true)));
        }
        Ok(Flow::Continue)
    }

    /// The outcome of a run stopped (or suspended) after the current step.
    fn stopped(&self, suspended: bool) -> TrainOutcome {
        TrainOutcome {
            steps: self.step,
            total_steps: self.total_steps,
            final_metrics: self.last_eval.clone(),
            eval_predictions: Vec::new(),
            stopped: true,
            suspended,
        }
    }

    /// Writes a checkpoint of the current step, when the job has a
    /// checkpoint folder, and tells `on_event`.
    fn save_checkpoint(
        &self,
        vars: &nn::VarStore,
        on_event: &mut dyn FnMut(Event<'_>) -> Control,
    ) -> Result<(), EngineError> {
        let Some(dir) = &self.job.checkpoint_dir else { return Ok(()) };
        let state = TrainerState {
            format: checkpoint::FORMAT,
            step: self.step,
            total_steps: self.total_steps,
            spec_sha256: checkpoint::spec_digest(&self.job.spec),
            last_eval: self.last_eval.clone(),
        };
        checkpoint::save(dir, &state, vars, &self.optimizer, &self.job.spec.name)?;
        on_event(Event::Checkpoint { step: self.step, dir });
        Ok(())
    }

    /// Evaluates if the predictions of the end are missing, and exports.
    pub(crate) fn finish(
        mut self,
        base_sha256: &str,
        vars: &nn::VarStore,
        task: &dyn TaskRun,
    ) -> Result<TrainOutcome, EngineError> {
        let (job, step) = (&self.job, self.step);
        if self.eval_predictions.is_empty() {
            // Resumed from a checkpoint taken at the end: the predictions were not saved.
            let evaluation = task.evaluate(step)?;
            (self.last_eval, self.eval_predictions) = (evaluation.metrics, evaluation.predictions);
        }
        let provenance = serde_json::json!({
            "engine": concat!("ptune-worker ", env!("CARGO_PKG_VERSION")),
            "base_model_sha256": base_sha256,
            "steps": step,
            "train_examples": task.train_len(),
            "eval_examples": task.eval_len(),
            "final_metrics": self.last_eval
                .iter()
                .map(|m| (m.name.clone(), serde_json::Value::from(m.value)))
                .collect::<serde_json::Map<_, _>>(),
            "spec": job.spec.to_json(),
        });
        task.export(&job.out_dir, vars, &provenance)?;
        tracing::info!(job = %job.spec.name, out_dir = %job.out_dir.display(), "adapter exported");
        Ok(TrainOutcome {
            steps: step,
            total_steps: self.total_steps,
            final_metrics: self.last_eval,
            eval_predictions: self.eval_predictions,
            stopped: false,
            suspended: false,
        })
    }
}

/// Loads the job's checkpoint into `vars` and `optimizer` as `job.resume`
/// asks; `None` when the run starts from step 0.
fn resume_state(job: &TrainJob, vars: &nn::VarStore, optimizer: &mut AdamW) -> Result<Option<TrainerState>, EngineError> {
    let dir = match (&job.checkpoint_dir, job.resume) {
        (_, Resume::Never) => return Ok(None),
        (Some(dir), _) => dir,
        (None, _) => return Err(EngineError::Model("resuming needs a checkpoint folder".into())),
    };
    if !checkpoint::exists(dir) {
        if job.resume == Resume::Required {
            return Err(EngineError::Model(format!("no checkpoint to resume from in {}", dir.display())));
        }
        return Ok(None);
    }
    match checkpoint::load(dir, &job.spec, vars, optimizer) {
        Ok(state) => Ok(Some(state)),
        Err(e) if job.resume == Resume::IfPossible => {
            tracing::warn!(error = %e, "checkpoint not usable; starting from step 0");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The seed of libtorch's generator for the step after `completed` steps:
/// SplitMix64 of the job's seed and the step, so neighbouring steps and
/// seeds get unrelated streams.
pub fn step_seed(seed: u64, completed: u64) -> i64 {
    super::rng::mix(seed, completed)
}

/// `name value` pairs of a metric list, for the log.
fn summary(metrics: &[Metric]) -> String {
    metrics.iter().map(|m| format!("{} {:.4}", m.name, m.value)).collect::<Vec<_>>().join(" ")
}

/// Refuses specs this engine cannot train on this model, naming the field.
fn check_supported(spec: &JobSpec, base: &BaseModel) -> Result<(), EngineError> {
    spec.validate(Some(&ModelLimits { max_positions: base.info.max_positions }))?;
    if spec.task == Task::CausalLm {
        return Err(SpecError::new(
            "task",
            format!("causal_lm needs a decoder-only model; {} is a {} encoder", spec.base_model, base.info.model_type),
        )
        .into());
    }
    if spec.task == Task::SequenceClassification && !base.config.is_roberta() && !base.encoder.has_pooler() {
        return Err(EngineError::Model(
            "the checkpoint has no pooler.dense weights, which sequence classification pools through".into(),
        ));
    }
    if spec.method == Method::Lora {
        lora_targets(spec, &base.config)?;
    }
    Ok(())
}

/// The BERT linears `peft.target_modules` names (query and value when it
/// names none). A target that would also match the pooler is refused: PEFT
/// would put an update on it, and a sequence classifier keeps it frozen.
fn lora_targets(spec: &JobSpec, config: &BertConfig) -> Result<Vec<LoraModule>, SpecError> {
    let targets = spec.peft.target_modules.as_deref();
    let pooler = format!("{}.pooler.dense", config.module_name());
    if let Some(target) = targets.into_iter().flatten().find(|target| lora_target_matches(&pooler, target)) {
        return Err(SpecError::new(
            "peft.target_modules",
            format!("{target:?} would also match the pooler, which a sequence classifier keeps frozen; name the layer's linears, e.g. \"attention.output.dense\""),
        ));
    }
    resolve_targets(&config.lora_layout(), targets)
}

/// AdamW over the job's variables in `vars`: the adapter at the main rate,
/// the head (`classifier.*`) at the head rate; biases and LayerNorm weights
/// without weight decay, as in the HF Trainer.
pub fn optimizer_for(vars: &nn::VarStore, spec: &JobSpec) -> AdamW {
    let t = &spec.training;
    let head_lr = t.head_learning_rate.unwrap_or(t.learning_rate);
    let mut variables: Vec<(String, tch::Tensor)> = vars.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    // (lr, weight decay) -> tensors, in a fixed order
    let mut groups: Vec<((f64, f64), Vec<tch::Tensor>)> = Vec::new();
    for (name, tensor) in variables {
        let lr = if name.starts_with("classifier.") { head_lr } else { t.learning_rate };
        let no_decay = name.ends_with("bias") || name.contains("LayerNorm");
        let key = (lr, if no_decay { 0.0 } else { t.weight_decay });
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, tensors)) => tensors.push(tensor),
            None => groups.push((key, vec![tensor])),
        }
    }
    let mut optimizer = AdamW::default();
    for ((lr, weight_decay), tensors) in groups {
        optimizer.add_group(tensors, lr, weight_decay);
    }
    optimizer
}

/// The job's adapter and classification head, under `p`, drawn from the
/// already seeded generator.
/// `num_labels` is the number of classes (sequence classification) or tags
/// (token classification).
pub fn build_model(spec: &JobSpec, base: &BaseModel, p: &nn::Path, num_labels: usize) -> Result<Classifier, EngineError> {
    let config = &base.config;
    let peft = &spec.peft;
    let nvt = i64::from(peft.num_virtual_tokens);
    let hidden = config.hidden_size;
    let encoder_hidden = i64::from(peft.encoder_hidden_size_for(hidden as u32));
    let prefix_shape = PrefixShape {
        num_virtual_tokens: nvt,
        num_layers: config.num_hidden_layers,
        num_heads: config.num_attention_heads,
        token_dim: hidden,
    };
    let adapter = match spec.method {
        Method::PromptTuning => {
            let encode = |text: &str| base.tokenizer.encode(text);
            let init = PromptInit::from_spec(peft, &encode, config.vocab_size)?;
            Adapter::PromptTuning(PromptTuning::new(p, nvt, &init, base.encoder.word_embeddings()))
        }
        Method::PTuning => Adapter::PTuning(PromptEncoder::new(
            &(p / "prompt_encoder"),
            &PromptEncoderConfig {
                num_virtual_tokens: nvt,
                token_dim: hidden,
                encoder_type: peft.encoder_type(),
                hidden_size: encoder_hidden,
                num_layers: i64::from(peft.encoder_num_layers()),
                dropout: peft.encoder_dropout(),
            },
        )),
        Method::PrefixTuning => {
            let projection = peft.prefix_projection().then_some(encoder_hidden);
            Adapter::Prefix(PrefixTuning::new(&(p / "prompt_encoder"), prefix_shape, projection, 0.0))
        }
        Method::PTuningV2 => {
            Adapter::Prefix(PrefixTuning::new(&(p / "prompt_encoder"), prefix_shape, None, peft.prefix_dropout()))
        }
        Method::Lora => {
            let layout = config.lora_layout();
            let lora_config = LoraConfig::for_spec(peft, lora_targets(spec, config)?, &layout);
            Adapter::Lora(Lora::new(p, lora_config, layout.num_layers))
        }
        Method::Full => Adapter::Full(base.encoder.trainable_copy(&(p / config.module_name()), config)),
    };
    let level = match spec.task {
        Task::TokenClassification => Level::Token,
        _ => Level::Sequence,
    };
    let head = ClassificationHead::for_model(p, config, level, num_labels as i64);
    Ok(Classifier { adapter, head, level, pooling: spec.head.pooling })
}


