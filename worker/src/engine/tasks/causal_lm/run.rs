//! Setting up a causal-LM job on a frozen decoder: the checks its spec must
//! pass, its data, its prompt, prefixes or low-rank updates (or, for full
//! fine-tuning, its own copy of the decoder) drawn from the job's seed; and
//! what the training loop and the pack ask of it.

use std::path::Path;

use ptune_core::{JobSpec, Method, Metric, MetricKind, ModelLimits, SpecError, Task};
use serde_json::{json, Value};
use tch::{nn, Device, Tensor};

use super::data::{LmBatch, LmData};
use super::evaluate::evaluate_bleu;
use super::generate::GenerationConfig;
use super::model::{evaluate_loss, LmAdapter, IGNORE_INDEX};
use super::pass::{packed_train_losses, LmMember};
use crate::engine::error::EngineError;
use crate::engine::export::{self, MODEL_CONFIG_FILE};
use crate::engine::job::TrainJob;
use crate::engine::models::decoder::CausalDecoder;
use crate::engine::models::factory::{load_causal_lm, load_trainable_causal_lm};
use crate::engine::models::frozen::FrozenDecoder;
use crate::engine::pack::{backward_alone, Layout, PassKind, SharedBase, SharedPass};
use crate::engine::peft::lora::resolve_targets;
use crate::engine::peft::{adapter_config, build_adapter, DrawnAdapter, SavedAdapter, Trainable};
use crate::engine::rng::with_stream;
use crate::engine::train::{eval_batch_size, PlannedStep, TaskEvaluation, TaskRun};

/// A causal-LM job's adapter (or, for full fine-tuning, its own copy of
/// the decoder) and data.
pub(crate) struct LmRun<'a> {
    base: &'a FrozenDecoder,
    adapter: Trainable<Box<dyn CausalDecoder>>,
    data: LmData,
    generation: GenerationConfig,
    device: Device,
    eval_batch_size: usize,
    spec: JobSpec,
}

impl SharedBase for FrozenDecoder {
    type Run<'a> = LmRun<'a>;

    fn sha256(&self) -> &str {
        &self.info.sha256
    }

    fn prepare<'a>(&'a self, device: Device, job: &TrainJob) -> Result<(nn::VarStore, LmRun<'a>), EngineError> {
        let spec = &job.spec;
        check_supported(spec, self)?;
        let data = LmData::load(job, self, true)?;
        // Initialisation draws from libtorch's generator seeded with the job's seed.
        tch::manual_seed(spec.training.seed as i64);
        let vars = nn::VarStore::new(device);
        let encode = |text: &str| self.tokenizer.encode(text, true);
        // Full fine-tuning trains its own copy of the decoder; the other
        // methods train an adapter on the shared one.
        let adapter = build_adapter(spec, &self.model.hook_sites(), &encode, &vars.root(), || {
            load_trainable_causal_lm(&self.dir, &vars)
        })?;
        Ok((vars, LmRun::new(self, adapter, data, device, spec)))
    }

    /// Prompts and prefixes come back as the saved tables (P-tuning's
    /// encoder and prefix tuning's projection are not saved, only their
    /// output), LoRA as its saved updates, full fine-tuning as the saved
    /// model.
    fn prepare_export<'a>(
        &'a self,
        device: Device,
        job: &TrainJob,
        export: &Path,
    ) -> Result<(nn::VarStore, LmRun<'a>), EngineError> {
        let spec = &job.spec;
        check_supported(spec, self)?;
        let data = LmData::load(job, self, false)?;
        let vars = nn::VarStore::new(device);
        let adapter = match spec.method {
            Method::Full => Trainable::Full(load_causal_lm(export, device)?),
            _ => Trainable::Adapter(SavedAdapter::read(export, device)?.adapter(&self.model.hook_sites(), &vars.root())?),
        };
        Ok((vars, LmRun::new(self, adapter, data, device, spec)))
    }
}

/// Refuses what this engine cannot train on a decoder, naming the field.
fn check_supported(spec: &JobSpec, base: &FrozenDecoder) -> Result<(), EngineError> {
    if spec.task != Task::CausalLm {
        return Err(SpecError::new(
            "task",
            format!("{} needs an encoder model; {} is a {} decoder", spec.task, spec.base_model, base.info.model_type),
        )
        .into());
    }
    spec.validate(Some(&ModelLimits { max_positions: base.info.max_positions }))?;
    if spec.method == Method::Lora {
        resolve_targets(base.model.model_type(), &base.model.linears(), spec.peft.target_modules.as_deref())?;
    }
    Ok(())
}

impl<'a> LmRun<'a> {
    fn new(
        base: &'a FrozenDecoder,
        adapter: Trainable<Box<dyn CausalDecoder>>,
        data: LmData,
        device: Device,
        spec: &JobSpec,
    ) -> Self {
        let generation = spec.generation();
        let generation = GenerationConfig {
            max_new_tokens: generation.max_new_tokens as usize,
            num_beams: generation.num_beams as usize,
            length_penalty: 1.0,
            eos_token_ids: base.model.eos_token_ids().to_vec(),
            pad_id: data.pad_id,
        };
        Self { base, adapter, data, generation, device, eval_batch_size: eval_batch_size(spec), spec: spec.clone() }
    }

    /// The decoder the job trains through: its own copy for full
    /// fine-tuning, else the shared frozen one.
    fn model(&self) -> &dyn CausalDecoder {
        self.adapter.own_base().map_or(self.base.model.as_ref(), |own| own.as_ref())
    }

    /// The job's training batch at `indices` and its adapter, drawn from
    /// `plan`'s stream, for a pass alone or shared with other jobs.
    fn train_input(&self, plan: &PlannedStep) -> (LmBatch, DrawnAdapter<'_>) {
        let batch = LmBatch::collate(&self.data.train, &plan.indices, self.data.pad_id, self.device);
        let adapter = with_stream(Some(&plan.stream), || self.adapter.draw(batch.len as i64, true));
        (batch, adapter)
    }

    /// The `config.json` of a full fine-tuning export: the base's, its dtype
    /// set to float32, as the saved weights are.
    fn model_config(&self) -> Result<Value, EngineError> {
        let path = self.base.dir.join(MODEL_CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let mut config: Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::Model(format!("{} is not json: {e}", path.display())))?;
        if let Some(fields) = config.as_object_mut() {
            fields.insert("dtype".into(), json!("float32"));
            if let Some(older) = fields.get_mut("torch_dtype") {
                *older = json!("float32");
            }
        }
        Ok(config)
    }
}

impl TaskRun for LmRun<'_> {
    fn train_len(&self) -> usize {
        self.data.train.len()
    }

    fn eval_len(&self) -> usize {
        self.data.eval_inputs.len()
    }

    fn backward(&self, plan: &PlannedStep) -> Tensor {
        backward_alone(self, plan)
    }

    /// The target tokens: every labelled position but a sequence's first,
    /// which nothing predicts unless a prompt stands in front of it. This is
    /// the count [`train_loss`](super::model::train_loss) divides by, so a
    /// data-parallel rank's mean weighted by its share of these is its part
    /// of the whole batch's mean over target tokens.
    fn loss_terms(&self, indices: &[usize]) -> usize {
        let prompted = tch::no_grad(|| LmAdapter::from(&self.adapter.draw(1, false)).prompt_len() > 0);
        let skip = usize::from(!prompted);
        let targets = |labels: &[i64]| labels.iter().skip(skip).filter(|&&l| l != IGNORE_INDEX).count();
        indices.iter().map(|&i| targets(&self.data.train[i].labels)).sum()
    }

    /// The loss on each input's first reference, corpus BLEU of the decoded
    /// outputs against all references, and the outputs.
    fn evaluate(&self, step: u64) -> Result<TaskEvaluation, EngineError> {
        let model = self.model();
        let drawn = self.adapter.draw(1, false);
        let adapter = LmAdapter::from(&drawn);
        let data = &self.data;
        let loss = evaluate_loss(model, &adapter, &data.eval_examples, self.eval_batch_size, data.pad_id, self.device);
        let bleu = evaluate_bleu(
            model,
            &adapter,
            &self.base.tokenizer,
            &data.format,
            &data.eval_inputs,
            self.eval_batch_size,
            &self.generation,
            self.device,
        )?;
        Ok(TaskEvaluation {
            metrics: vec![Metric::new(step, MetricKind::Eval, "loss", loss), Metric::new(step, MetricKind::Eval, "bleu", bleu.bleu)],
            predictions: bleu.hypotheses.into_iter().map(Value::from).collect(),
        })
    }

    /// A PEFT export of the adapter (no head), or for full fine-tuning a
    /// model folder that `AutoModelForCausalLM.from_pretrained` loads: the
    /// job's copy of the decoder (`vars`, named as the Hugging Face
    /// `*ForCausalLM` names its parameters), the base's config and its
    /// tokenizer and generation config where it has them.
    fn export(&self, out_dir: &Path, vars: &nn::VarStore, provenance: &Value) -> Result<(), EngineError> {
        match &self.adapter {
            Trainable::Adapter(adapter) => {
                let config = adapter_config(&self.spec, &self.base.model.hook_sites(), adapter, "CAUSAL_LM", None);
                export::write_adapter(out_dir, &adapter.peft_tensors(), &config, provenance)
            }
            Trainable::Full(_) => export::write_model(out_dir, vars, &self.model_config()?, Some(&self.base.dir), provenance),
        }
    }
}

impl SharedPass for LmRun<'_> {
    type Input<'s>
        = (LmBatch, DrawnAdapter<'s>, &'s PlannedStep)
    where
        Self: 's;
    /// Every method on the shared decoder can share a pass.
    type Kind = ();
    /// The decoder pads every row of a pass to its longest.
    const LAYOUT: Layout = Layout::Padded;

    fn input<'s>(&'s self, plan: &'s PlannedStep) -> Self::Input<'s> {
        let (batch, adapter) = self.train_input(plan);
        (batch, adapter, plan)
    }

    /// Rows of a training batch and the positions each takes in a pass:
    /// the prompt or prefix and the batch's longest example. Full
    /// fine-tuning (its own copy) passes alone.
    fn pass_kind<'s>(&'s self, (batch, _, _): &Self::Input<'s>) -> PassKind<()> {
        let (rows, seq) = batch.input_ids.size2().expect("input ids are [batch, seq]");
        let virtual_tokens =
            if self.spec.method.uses_virtual_tokens() { i64::from(self.spec.peft.num_virtual_tokens) } else { 0 };
        let kind = self.adapter.own_base().is_none().then_some(());
        PassKind { kind, rows: rows as usize, len: (seq + virtual_tokens) as usize }
    }

    fn forward<'s>(members: &[(&'s Self, &Self::Input<'s>)]) -> Vec<Tensor> {
        let lm_members: Vec<LmMember<'_>> = members
            .iter()
            .map(|(_, (batch, adapter, plan))| LmMember { adapter: LmAdapter::from(adapter), batch, stream: Some(&plan.stream) })
            .collect();
        let model = match members {
            [(only, _)] => only.model(),
            _ => members[0].0.base.model.as_ref(),
        };
        packed_train_losses(model, &lm_members, true)
    }
}
