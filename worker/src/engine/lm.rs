//! Causal-LM jobs: a prompt (prompt tuning, P-tuning), key/value prefixes
//! (prefix tuning, P-tuning v2) or low-rank updates of the layers' linears
//! (LoRA) trained on a frozen decoder (GPT-2, the Llama family) for
//! text-to-text generation, as PEFT's `CAUSAL_LM` task.
//!
//! Data: training rows `{text_field: source, label_field: target}`;
//! evaluation rows `{text_field: source, references_field: [reference, ..]}`
//! (or one reference in `label_field`). A training example is `source +
//! " ||" + " " + target + EOS`, labelled on the target and EOS only (see
//! `data/seq2seq.rs`); `data.max_seq_len` caps it, and caps each evaluation
//! prompt. Evaluation reports the loss on each input's first reference and
//! corpus BLEU of the decoded outputs (greedy or beam search, as
//! `[generation]` sets) against all references.

use std::path::{Path, PathBuf};

use ptune_core::{JobSpec, Method, Metric, MetricKind, ModelLimits, SpecError, Task};
use serde_json::Value;
use tch::{nn, Device, Tensor};

use super::data::seq2seq::{
    read_source_references_in, read_source_targets_in, LmExample, LmTokenizer, Seq2SeqFields, Seq2SeqFormat,
    SourceReferences,
};
use super::export::{self, AdapterShape};
use super::models::decoder::{load_causal_lm, load_trainable_causal_lm, CausalDecoder};
use super::models::hooks::{Hooks, NoHooks};
use super::models::registry::inspect_any;
use super::models::{ModelInfo, TOKENIZER_FILE};
use super::peft::lora::{resolve_targets, Lora, LoraConfig, LoraHooks};
use super::peft::p_tuning::{PromptEncoder, PromptEncoderConfig};
use super::peft::prefix::{PrefixShape, PrefixTuning};
use super::peft::prompt_tuning::{PromptInit, PromptTuning};
use super::task_data::{non_empty, TaskEvaluation};
use super::peft::prefix::PrefixHooks;
use super::rng::{with_stream, DropoutStream};
use super::tasks::causal_lm::{self, evaluate_bleu, GenerationConfig, LmAdapter, LmBatch, LmMember};
use super::tasks::classifier::Adapter;
use super::pack::{backward_passes, group_passes, Layout, PassKind, SharedBase};
use super::train::{drive, eval_batch_size, PlannedStep, TaskRun};
use super::{Control, EngineError, Event, TrainJob, TrainOutcome};

/// A frozen decoder-only model and its tokenizer, shared by every job on it.
pub struct DecoderBase {
    pub model: Box<dyn CausalDecoder>,
    /// The model's folder, which full fine-tuning loads a copy of.
    pub dir: PathBuf,
    pub tokenizer: LmTokenizer,
    pub info: ModelInfo,
}

impl DecoderBase {
    /// Loads the GPT-2 or Llama-family folder `dir` onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self, EngineError> {
        let info = inspect_any(dir)?;
        let model = load_causal_lm(dir, device)?;
        let tokenizer = LmTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
        Ok(Self { model, tokenizer, info, dir: dir.to_path_buf() })
    }

    /// Id that ends every target: the config's first `eos_token_id`, else
    /// the tokenizer's `<|endoftext|>` or `</s>`.
    fn eos_id(&self) -> Result<i64, EngineError> {
        self.model
            .eos_token_ids()
            .first()
            .copied()
            .or_else(|| ["<|endoftext|>", "</s>"].iter().find_map(|t| self.tokenizer.token_to_id(t)))
            .ok_or_else(|| EngineError::Model("the model has no eos_token_id and its tokenizer no end token".into()))
    }
}

/// Trains a causal-LM job on `base`.
pub fn run(
    base: &DecoderBase,
    device: Device,
    job: &TrainJob,
    on_event: &mut dyn FnMut(Event<'_>) -> Control,
) -> Result<TrainOutcome, EngineError> {
    let (vars, task) = prepare(base, device, job)?;
    drive(job, &base.info.sha256, &vars, &task, on_event)
}

impl SharedBase for DecoderBase {
    type Run<'a> = LmRun<'a>;

    fn sha256(&self) -> &str {
        &self.info.sha256
    }

    fn prepare<'a>(&'a self, device: Device, job: &TrainJob) -> Result<(nn::VarStore, LmRun<'a>), EngineError> {
        prepare(self, device, job)
    }

    fn backward_step(&self, runs: &[&LmRun<'_>], plans: &[&PlannedStep], max_tokens: usize) -> Vec<Tensor> {
        let inputs: Vec<(LmBatch, DrawnAdapter<'_>)> =
            runs.iter().zip(plans).map(|(run, plan)| run.train_input(&plan.indices, &plan.stream)).collect();
        // Every method on the shared decoder can share a pass; full
        // fine-tuning (its own copy) passes alone.
        let kinds: Vec<PassKind<()>> = runs
            .iter()
            .zip(&inputs)
            .map(|(run, (batch, _))| {
                let (rows, len) = run.pass_shape(batch);
                PassKind { kind: run.own_model.is_none().then_some(()), rows, len }
            })
            .collect();
        backward_passes(&group_passes(&kinds, max_tokens, Layout::Padded), runs.len(), |pass| {
            let members: Vec<LmMember<'_>> = pass
                .iter()
                .map(|&i| LmMember { adapter: inputs[i].1.as_lm(), batch: &inputs[i].0, stream: Some(&plans[i].stream) })
                .collect();
            let model = match pass {
                [only] => runs[*only].model(),
                _ => self.model.as_ref(),
            };
            causal_lm::packed_train_losses(model, &members, true)
        })
    }
}

/// Reads a causal-LM job's data and builds its prompt or prefixes.
fn prepare<'a>(base: &'a DecoderBase, device: Device, job: &TrainJob) -> Result<(nn::VarStore, LmRun<'a>), EngineError> {
    prepare_for(base, device, job, true)
}

/// [`prepare`], reading the training pairs (and building the trainable
/// adapter or copy) only when `training`.
fn prepare_for<'a>(
    base: &'a DecoderBase,
    device: Device,
    job: &TrainJob,
    training: bool,
) -> Result<(nn::VarStore, LmRun<'a>), EngineError> {
    let spec = &job.spec;
    check_supported(spec, base)?;
    let data = &spec.data;
    let fields = Seq2SeqFields {
        source: data.text_field.clone(),
        target: data.label_field.clone(),
        references: data.references_field.clone().unwrap_or_else(|| Seq2SeqFields::default().references),
    };
    let eos_id = base.eos_id()?;
    let format =
        Seq2SeqFormat { separator: Seq2SeqFormat::DEFAULT_SEPARATOR.into(), eos_id, max_len: data.max_seq_len as usize };
    let pairs = match training {
        true => non_empty(read_source_targets_in(&job.train_file, &job.train_name, data.max_train_examples, &fields)?, &job.train_name)?,
        false => Vec::new(),
    };
    let train = pairs
        .iter()
        .map(|pair| format.training_example(&base.tokenizer, &pair.source, &pair.target))
        .collect::<Result<Vec<_>, _>>()?;
    let eval_inputs = non_empty(
        read_source_references_in(&job.eval_file, &job.eval_name, data.max_eval_examples, &fields)?,
        &job.eval_name,
    )?;
    let eval_examples = eval_inputs
        .iter()
        .map(|input| format.training_example(&base.tokenizer, &input.source, &input.references[0]))
        .collect::<Result<Vec<_>, _>>()?;
    let generation = spec.generation();
    let pad_id = base.tokenizer.token_to_id("<pad>").unwrap_or(eos_id);

    // Initialisation draws from libtorch's generator seeded with the job's seed.
    tch::manual_seed(spec.training.seed as i64);
    let vars = nn::VarStore::new(device);
    // Full fine-tuning trains its own copy of the decoder; the other
    // methods train an adapter on the shared one.
    let (adapter, own_model) = match spec.method {
        Method::Full if training => (None, Some(load_trainable_causal_lm(&base.dir, &vars)?)),
        Method::Full => (None, None),
        _ => (Some(build_adapter(spec, base, &vars.root())?), None),
    };
    let task = LmRun {
        base,
        adapter,
        own_model,
        train,
        eval_examples,
        eval_inputs,
        format,
        generation: GenerationConfig {
            max_new_tokens: generation.max_new_tokens as usize,
            num_beams: generation.num_beams as usize,
            length_penalty: 1.0,
            eos_token_ids: base.model.eos_token_ids().to_vec(),
            pad_id,
        },
        pad_id,
        device,
        eval_batch_size: eval_batch_size(spec),
        spec: spec.clone(),
    };
    Ok((vars, task))
}

/// Refuses what this engine cannot train on a decoder, naming the field.
fn check_supported(spec: &JobSpec, base: &DecoderBase) -> Result<(), EngineError> {
    if spec.task != Task::CausalLm {
        return Err(SpecError::new(
            "task",
            format!("{} needs an encoder model; {} is a {} decoder", spec.task, spec.base_model, base.info.model_type),
        )
        .into());
    }
    spec.validate(Some(&ModelLimits { max_positions: base.info.max_positions }))?;
    if spec.method == Method::Lora {
        resolve_targets(&base.model.lora_layout(), spec.peft.target_modules.as_deref())?;
    }
    Ok(())
}

/// The job's prompt, prefixes or low-rank updates for `base`, under `p`.
fn build_adapter(spec: &JobSpec, base: &DecoderBase, p: &nn::Path) -> Result<Adapter, EngineError> {
    let model = &base.model;
    let peft = &spec.peft;
    let nvt = i64::from(peft.num_virtual_tokens);
    let hidden = model.hidden_size();
    let prefix_shape = prefix_shape(model.as_ref(), nvt);
    Ok(match spec.method {
        Method::PromptTuning => {
            let encode = |text: &str| base.tokenizer.encode(text, true);
            let init = PromptInit::from_spec(peft, &encode, model.vocab_size())?;
            Adapter::PromptTuning(PromptTuning::new(p, nvt, &init, model.word_embeddings()))
        }
        Method::PTuning => Adapter::PTuning(PromptEncoder::new(
            &(p / "prompt_encoder"),
            &PromptEncoderConfig {
                num_virtual_tokens: nvt,
                token_dim: hidden,
                encoder_type: peft.encoder_type(),
                hidden_size: i64::from(peft.encoder_hidden_size_for(hidden as u32)),
                num_layers: i64::from(peft.encoder_num_layers()),
                dropout: peft.encoder_dropout(),
            },
        )),
        Method::PrefixTuning => {
            let projection = peft.prefix_projection().then(|| i64::from(peft.encoder_hidden_size_for(hidden as u32)));
            Adapter::Prefix(PrefixTuning::new(&(p / "prompt_encoder"), prefix_shape, projection, 0.0))
        }
        Method::PTuningV2 => {
            Adapter::Prefix(PrefixTuning::new(&(p / "prompt_encoder"), prefix_shape, None, peft.prefix_dropout()))
        }
        Method::Lora => {
            let layout = model.lora_layout();
            let modules = resolve_targets(&layout, peft.target_modules.as_deref())?;
            Adapter::Lora(Lora::new(p, LoraConfig::for_spec(peft, modules, &layout), layout.num_layers))
        }
        other => {
            return Err(SpecError::new("method", format!("{other} is not supported for causal_lm yet")).into());
        }
    })
}

/// Prefixes of `nvt` positions have the keys' shape: key/value heads times
/// head size, at every layer.
fn prefix_shape(model: &dyn CausalDecoder, nvt: i64) -> PrefixShape {
    PrefixShape {
        num_virtual_tokens: nvt,
        num_layers: model.num_layers() as i64,
        num_heads: model.num_kv_heads(),
        token_dim: model.num_kv_heads() * model.head_dim(),
    }
}

/// Evaluates an export this engine wrote for `job.spec` (its `ptune.json`
/// spec) on `job.eval_file`, as training evaluates: the loss on each
/// input's first reference, corpus BLEU of the decoded outputs, and the
/// outputs. Prompts and prefixes come back as the saved tables (P-tuning's
/// encoder and prefix tuning's projection are not saved, only their
/// output), LoRA as its saved updates, full fine-tuning as the saved model.
pub fn evaluate_export(base: &DecoderBase, device: Device, export: &Path, job: &TrainJob) -> Result<TaskEvaluation, EngineError> {
    let (_vars, mut run) = prepare_for(base, device, job, false)?;
    let bad = |message: String| EngineError::Model(format!("{}: {message}", export.display()));
    if job.spec.method == Method::Full {
        run.own_model = Some(load_causal_lm(export, device)?);
        return run.evaluate(0);
    }
    let weights = export.join(super::ADAPTER_WEIGHTS_FILE);
    let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&weights)
        .map_err(|e| bad(format!("cannot read {}: {e}", weights.display())))?
        .into_iter()
        .map(|(name, tensor)| (name, tensor.to_kind(tch::Kind::Float).to_device(device)))
        .collect();
    let tensor = |key: &str| tensors.get(key).ok_or_else(|| bad(format!("no tensor {key}")));
    let same_shape = |key: &str, saved: &Tensor, expected: &[i64]| match saved.size() == expected {
        true => Ok(()),
        false => Err(bad(format!("{key} has shape {:?}, expected {expected:?}", saved.size()))),
    };
    let loaded = nn::VarStore::new(device);
    let root = loaded.root();
    let nvt = i64::from(job.spec.peft.num_virtual_tokens);
    run.adapter = Some(match run.adapter.take() {
        Some(Adapter::PromptTuning(_) | Adapter::PTuning(_)) => {
            let table = tensor("prompt_embeddings")?;
            same_shape("prompt_embeddings", table, &[nvt, run.model().hidden_size()])?;
            Adapter::PromptTuning(PromptTuning::from_table(&root, table))
        }
        Some(Adapter::Prefix(_)) => {
            let shape = prefix_shape(run.model(), nvt);
            let table = tensor("prompt_embeddings")?;
            same_shape("prompt_embeddings", table, &[nvt, shape.width()])?;
            let prefix = PrefixTuning::new(&(&root / "prompt_encoder"), shape, None, 0.0);
            tch::no_grad(|| prefix.prefixes().copy_(table));
            Adapter::Prefix(prefix)
        }
        Some(Adapter::Lora(lora)) => {
            for (key, mut variable) in lora.named_tensors() {
                let saved = tensor(&key)?;
                same_shape(&key, saved, &variable.size())?;
                tch::no_grad(|| variable.copy_(saved));
            }
            Adapter::Lora(lora)
        }
        _ => return Err(bad(format!("{} exports cannot be evaluated on a decoder", job.spec.method))),
    });
    run.evaluate(0)
}

/// A causal-LM job's adapter (or, for full fine-tuning, its own copy of
/// the decoder) and data.
pub(crate) struct LmRun<'a> {
    base: &'a DecoderBase,
    /// `None` for full fine-tuning.
    adapter: Option<Adapter>,
    /// The job's trainable copy of the decoder (full fine-tuning).
    own_model: Option<Box<dyn CausalDecoder>>,
    train: Vec<LmExample>,
    /// Each evaluation input with its first reference as the target, for the loss.
    eval_examples: Vec<LmExample>,
    eval_inputs: Vec<SourceReferences>,
    format: Seq2SeqFormat,
    generation: GenerationConfig,
    pad_id: i64,
    device: Device,
    eval_batch_size: usize,
    spec: JobSpec,
}

/// A job's prompt, prefixes or low-rank updates drawn for one forward pass.
pub(crate) struct DrawnAdapter<'a> {
    prompt: Option<Tensor>,
    prefix: Option<PrefixHooks>,
    lora: Option<LoraHooks<'a>>,
}

impl DrawnAdapter<'_> {
    /// The adapter as the decoder takes it.
    pub(crate) fn as_lm(&self) -> LmAdapter<'_> {
        let hooks: &dyn Hooks = match (&self.prefix, &self.lora) {
            (Some(prefix), _) => prefix,
            (None, Some(lora)) => lora,
            (None, None) => &NoHooks,
        };
        LmAdapter { prompt: self.prompt.as_ref(), hooks }
    }
}

impl LmRun<'_> {
    /// The decoder the job trains through: its own copy for full
    /// fine-tuning, else the shared frozen one.
    fn model(&self) -> &dyn CausalDecoder {
        self.own_model.as_deref().unwrap_or(self.base.model.as_ref())
    }

    /// The job's prompt, prefixes or low-rank updates for batches of
    /// `batch` examples (P-tuning's encoder dropout and prefix dropout draw
    /// here in training; LoRA's dropout draws in the pass).
    fn draw_adapter(&self, batch: i64, train: bool) -> DrawnAdapter<'_> {
        let prompt = match &self.adapter {
            Some(Adapter::PromptTuning(prompt)) => Some(prompt.embeddings().shallow_clone()),
            Some(Adapter::PTuning(encoder)) => Some(encoder.prompt(train)),
            _ => None,
        };
        let prefix = match &self.adapter {
            Some(Adapter::Prefix(prefix)) => Some(prefix.hooks(if train { batch } else { 1 }, train)),
            _ => None,
        };
        let lora = match &self.adapter {
            Some(Adapter::Lora(lora)) => Some(lora.hooks(train)),
            _ => None,
        };
        DrawnAdapter { prompt, prefix, lora }
    }

    /// Calls `f` with the adapter as the decoder takes it, for batches of
    /// `batch` examples.
    fn with_adapter<R>(&self, batch: i64, train: bool, f: impl FnOnce(&LmAdapter<'_>) -> R) -> R {
        f(&self.draw_adapter(batch, train).as_lm())
    }

    /// The job's training batch at `indices` and its adapter, drawn from
    /// `stream`, for a pass alone or shared with other jobs.
    pub(crate) fn train_input(&self, indices: &[usize], stream: &DropoutStream) -> (LmBatch, DrawnAdapter<'_>) {
        let batch = LmBatch::collate(&self.train, indices, self.pad_id, self.device);
        let adapter = with_stream(Some(stream), || self.draw_adapter(batch.len as i64, true));
        (batch, adapter)
    }

    /// Rows of a training batch and the positions each takes in a pass:
    /// the prompt or prefix and the batch's longest example.
    pub(crate) fn pass_shape(&self, batch: &LmBatch) -> (usize, usize) {
        let (rows, seq) = batch.input_ids.size2().expect("input ids are [batch, seq]");
        let virtual_tokens =
            if self.spec.method.uses_virtual_tokens() { i64::from(self.spec.peft.num_virtual_tokens) } else { 0 };
        (rows as usize, (seq + virtual_tokens) as usize)
    }

    fn shape(&self) -> AdapterShape {
        let model = self.model();
        let prefixes = self.spec.method.uses_prefixes();
        AdapterShape {
            task_type: "CAUSAL_LM",
            token_dim: if prefixes { model.num_kv_heads() * model.head_dim() } else { model.hidden_size() },
            num_layers: model.num_layers() as i64,
            num_attention_heads: if prefixes { model.num_kv_heads() } else { model.num_attention_heads() },
            head_module: None,
        }
    }
}

impl TaskRun for LmRun<'_> {
    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn eval_len(&self) -> usize {
        self.eval_inputs.len()
    }

    fn train_loss(&self, indices: &[usize], stream: &DropoutStream) -> Tensor {
        // Alone, the job takes the same path as in a pack: a pass of one.
        let (batch, adapter) = self.train_input(indices, stream);
        let member = LmMember { adapter: adapter.as_lm(), batch: &batch, stream: Some(stream) };
        causal_lm::packed_train_losses(self.model(), &[member], true).remove(0)
    }

    fn evaluate(&self, step: u64) -> Result<TaskEvaluation, EngineError> {
        let model = self.model();
        let (loss, bleu) = self.with_adapter(1, false, |adapter| {
            let loss = causal_lm::evaluate_loss(model, adapter, &self.eval_examples, self.eval_batch_size, self.pad_id, self.device);
            let bleu = evaluate_bleu(
                model,
                adapter,
                &self.base.tokenizer,
                &self.format,
                &self.eval_inputs,
                self.eval_batch_size,
                &self.generation,
                self.device,
            );
            (loss, bleu)
        });
        let bleu = bleu?;
        Ok(TaskEvaluation {
            metrics: vec![Metric::new(step, MetricKind::Eval, "loss", loss), Metric::new(step, MetricKind::Eval, "bleu", bleu.bleu)],
            predictions: bleu.hypotheses.into_iter().map(Value::from).collect(),
        })
    }

    fn export(&self, out_dir: &Path, vars: &nn::VarStore, provenance: &Value) -> Result<(), EngineError> {
        match &self.adapter {
            Some(adapter) => export::write_adapter(out_dir, &self.spec, &self.shape(), adapter, provenance),
            None => export::write_causal_lm_model(out_dir, &self.base.dir, vars, provenance),
        }
    }
}
