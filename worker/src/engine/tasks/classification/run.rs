//! Setting up a classification job (sequence or token level) on a frozen
//! encoder: the checks its spec must pass, its data, its adapter (or own
//! copy of the encoder) and head, drawn from the job's seed; and what the
//! training loop and the pack ask of it.

use std::path::Path;

use ptune_core::model_types::lora_target_matches;
use ptune_core::{JobSpec, Method, ModelLimits, Pooling, SpecError, Task};
use serde_json::Value;
use tch::{nn, Device, Tensor};

use super::data::{ClassifierData, TrainBatch};
use super::export::{load_classifier, write_export};
use super::head::{ClassificationHead, Level};
use super::model::{Classifier, ClassifierInput};
use crate::engine::error::EngineError;
use crate::engine::export::MODEL_WEIGHTS_FILE;
use crate::engine::job::TrainJob;
use crate::engine::models::frozen::FrozenEncoder;
use crate::engine::pack::{backward_alone, Layout, PassKind, SharedBase, SharedPass};
use crate::engine::peft::build_adapter;
use crate::engine::peft::lora::resolve_targets;
use crate::engine::train::{eval_batch_size, PlannedStep, TaskEvaluation, TaskRun};

/// A classifier job's model and data on the shared encoder.
pub(crate) struct ClassifierRun<'a> {
    base: &'a FrozenEncoder,
    model: Classifier,
    data: ClassifierData,
    device: Device,
    eval_batch_size: usize,
    spec: JobSpec,
}

impl SharedBase for FrozenEncoder {
    type Run<'a> = ClassifierRun<'a>;

    fn sha256(&self) -> &str {
        &self.info.sha256
    }

    fn prepare<'a>(&'a self, device: Device, job: &TrainJob) -> Result<(nn::VarStore, ClassifierRun<'a>), EngineError> {
        let spec = &job.spec;
        check_supported(spec, self)?;
        let data = ClassifierData::load(job, &self.tokenizer, true)?;
        // Initialisation draws from libtorch's generator seeded with the job's seed.
        tch::manual_seed(spec.training.seed as i64);
        let vars = nn::VarStore::new(device);
        let model = build_classifier(spec, self, &vars.root(), data.num_labels())?;
        Ok((vars, ClassifierRun::new(self, model, data, device, spec)))
    }

    fn prepare_export<'a>(
        &'a self,
        device: Device,
        job: &TrainJob,
        export: &Path,
    ) -> Result<(nn::VarStore, ClassifierRun<'a>), EngineError> {
        let spec = &job.spec;
        let data = ClassifierData::load(job, &self.tokenizer, false)?;
        let mut vars = nn::VarStore::new(device);
        let model = if spec.method == Method::Full {
            // A full fine-tuning export is the job's whole model: the same
            // variables as training declares, read back from the folder.
            let model = build_classifier(spec, self, &vars.root(), data.num_labels())?;
            let weights = export.join(MODEL_WEIGHTS_FILE);
            vars.load(&weights).map_err(|e| EngineError::Model(format!("cannot load {}: {e}", weights.display())))?;
            model
        } else {
            let mut model = load_classifier(export, self, &vars.root())?;
            model.pooling = spec.head.pooling;
            model
        };
        let outputs = model.head.weight().size()[0] as usize;
        if data.num_labels() != outputs {
            return Err(SpecError::new(
                "data.labels",
                format!("names {} labels, but the adapter's head has {outputs} outputs", data.num_labels()),
            )
            .into());
        }
        Ok((vars, ClassifierRun::new(self, model, data, device, spec)))
    }
}

/// Refuses specs this engine cannot train on this encoder, naming the field.
fn check_supported(spec: &JobSpec, base: &FrozenEncoder) -> Result<(), EngineError> {
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
        // A target that would also match the pooler is refused: PEFT would
        // put an update on it, and a sequence classifier keeps it frozen.
        let targets = spec.peft.target_modules.as_deref();
        let pooler = format!("{}.pooler.dense", base.config.module_name());
        if let Some(target) = targets.into_iter().flatten().find(|target| lora_target_matches(&pooler, target)) {
            return Err(SpecError::new(
                "peft.target_modules",
                format!("{target:?} would also match the pooler, which a sequence classifier keeps frozen; name the layer's linears, e.g. \"attention.output.dense\""),
            )
            .into());
        }
        resolve_targets(&base.config.model_type, &base.config.linears(), targets)?;
    }
    Ok(())
}

/// The job's adapter (or own copy of the encoder) and classification head,
/// under `p`, drawn from the already seeded generator in that order.
/// `num_labels` is the number of classes (sequence classification) or tags
/// (token classification).
pub fn build_classifier(
    spec: &JobSpec,
    base: &FrozenEncoder,
    p: &nn::Path,
    num_labels: usize,
) -> Result<Classifier, EngineError> {
    let config = &base.config;
    let encode = |text: &str| base.tokenizer.encode(text);
    let adapter = build_adapter(spec, &base.hook_sites(), &encode, p, || {
        Ok(base.encoder.trainable_copy(&(p / config.module_name()), config))
    })?;
    let level = match spec.task {
        Task::TokenClassification => Level::Token,
        _ => Level::Sequence,
    };
    let head = ClassificationHead::for_model(p, config, level, num_labels as i64);
    Ok(Classifier { adapter, head, level, pooling: spec.head.pooling })
}

impl<'a> ClassifierRun<'a> {
    fn new(base: &'a FrozenEncoder, model: Classifier, data: ClassifierData, device: Device, spec: &JobSpec) -> Self {
        Self { base, model, data, device, eval_batch_size: eval_batch_size(spec), spec: spec.clone() }
    }
}

impl TaskRun for ClassifierRun<'_> {
    fn train_len(&self) -> usize {
        self.data.train_len()
    }

    fn eval_len(&self) -> usize {
        self.data.eval_len()
    }

    fn backward(&self, plan: &PlannedStep) -> Tensor {
        backward_alone(self, plan)
    }

    fn loss_terms(&self, indices: &[usize]) -> usize {
        self.data.loss_terms(indices)
    }

    fn evaluate(&self, step: u64) -> Result<TaskEvaluation, EngineError> {
        Ok(self.data.evaluate(&self.model, &self.base.encoder, self.eval_batch_size, self.device, step))
    }

    fn export(&self, out_dir: &Path, vars: &nn::VarStore, provenance: &Value) -> Result<(), EngineError> {
        write_export(out_dir, &self.spec, self.base, &self.model, vars, provenance)
    }
}

impl SharedPass for ClassifierRun<'_> {
    type Input<'s>
        = (TrainBatch, &'s PlannedStep)
    where
        Self: 's;
    /// Jobs of one level and pooling share a pass. Poolings pass apart
    /// because a pass with a mean-pooled member runs every position through
    /// the last layer, which would change the dropout masks a position-0
    /// member draws there from what it draws alone.
    type Kind = (Level, Pooling);
    /// The encoder stacks each job's rows at its own length.
    const LAYOUT: Layout = Layout::Stacked;

    fn input<'s>(&'s self, plan: &'s PlannedStep) -> Self::Input<'s> {
        (self.data.train_batch(&plan.indices, self.device), plan)
    }

    fn pass_kind<'s>(&'s self, (batch, _): &Self::Input<'s>) -> PassKind<Self::Kind> {
        let model = &self.model;
        let (rows, seq) = batch.input_ids.size2().expect("input ids are [batch, seq]");
        let len = (seq + model.input_prompt_len()) as usize;
        // Full fine-tuning trains its own encoder: it passes alone.
        let kind = model.shares_base().then_some((model.level, model.pooling));
        PassKind { kind, rows: rows as usize, len }
    }

    fn forward<'s>(members: &[(&'s Self, &Self::Input<'s>)]) -> Vec<Tensor> {
        let inputs: Vec<ClassifierInput<'_>> = members
            .iter()
            .map(|(run, (batch, plan))| ClassifierInput {
                model: &run.model,
                input_ids: batch.input_ids.shallow_clone(),
                attention_mask: batch.attention_mask.shallow_clone(),
                stream: Some(&plan.stream),
            })
            .collect();
        let logits = Classifier::packed_logits(&members[0].0.base.encoder, &inputs, true);
        members.iter().zip(&logits).map(|((run, (batch, _)), logits)| run.data.loss(logits, &batch.labels)).collect()
    }
}
