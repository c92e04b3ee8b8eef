//! Causal-LM jobs: a prompt (prompt tuning, P-tuning) or key/value prefixes
//! (prefix tuning, P-tuning v2) trained on a frozen decoder (GPT-2, the
//! Llama family) for text-to-text generation, as PEFT's `CAUSAL_LM` task.
//!
//! Data: training rows `{text_field: source, label_field: target}`;
//! evaluation rows `{text_field: source, references_field: [reference, ..]}`
//! (or one reference in `label_field`). A training example is `source +
//! " ||" + " " + target + EOS`, labelled on the target and EOS only (see
//! `data/seq2seq.rs`); `data.max_seq_len` caps it, and caps each evaluation
//! prompt. Evaluation reports the loss on each input's first reference and
//! corpus BLEU of the decoded outputs (greedy or beam search, as
//! `[generation]` sets) against all references.

use std::path::Path;

use ptune_core::{JobSpec, Method, MetricKind, ModelLimits, SpecError, Task};
use serde_json::Value;
use tch::{nn, Device, Tensor};

use super::data::seq2seq::{
    read_source_references_in, read_source_targets_in, LmExample, LmTokenizer, Seq2SeqFields, Seq2SeqFormat,
    SourceReferences,
};
use super::export::{self, AdapterShape};
use super::models::decoder::{load_causal_lm, CausalDecoder};
use super::models::hooks::{Hooks, NoHooks};
use super::models::registry::inspect_any;
use super::models::{ModelInfo, TOKENIZER_FILE};
use super::peft::p_tuning::{PromptEncoder, PromptEncoderConfig};
use super::peft::prefix::{PrefixShape, PrefixTuning};
use super::peft::prompt_tuning::{PromptInit, PromptTuning};
use super::task_data::{non_empty, TaskEvaluation};
use super::tasks::causal_lm::{self, evaluate_bleu, GenerationConfig, LmAdapter, LmBatch};
use super::tasks::classifier::Adapter;
use super::train::{drive, eval_batch_size, metric, TaskRun};
use super::{Control, EngineError, Event, TrainJob, TrainOutcome};

/// A frozen decoder-only model and its tokenizer, shared by every job on it.
pub struct DecoderBase {
    pub model: Box<dyn CausalDecoder>,
    pub tokenizer: LmTokenizer,
    pub info: ModelInfo,
}

impl DecoderBase {
    /// Loads the GPT-2 or Llama-family folder `dir` onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self, EngineError> {
        let info = inspect_any(dir)?;
        let model = load_causal_lm(dir, device)?;
        let tokenizer = LmTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
        Ok(Self { model, tokenizer, info })
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
    let pairs = non_empty(read_source_targets_in(&job.train_file, &job.train_name, data.max_train_examples, &fields)?, &job.train_name)?;
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
    let adapter = build_adapter(spec, base, &vars.root())?;
    let task = LmRun {
        base,
        adapter,
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
        spec,
    };
    drive(job, &base.info.sha256, &vars, &task, on_event)
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
    Ok(())
}

/// The job's prompt or prefixes for `base`, under `p`.
fn build_adapter(spec: &JobSpec, base: &DecoderBase, p: &nn::Path) -> Result<Adapter, EngineError> {
    let model = &base.model;
    let peft = &spec.peft;
    let nvt = i64::from(peft.num_virtual_tokens);
    let hidden = model.hidden_size();
    // Prefixes have the keys' shape: key/value heads times head size.
    let prefix_shape = PrefixShape {
        num_virtual_tokens: nvt,
        num_layers: model.num_layers() as i64,
        num_heads: model.num_kv_heads(),
        token_dim: model.num_kv_heads() * model.head_dim(),
    };
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
        other => {
            return Err(SpecError::new("method", format!("{other} is not supported for causal_lm yet")).into());
        }
    })
}

/// A causal-LM job's adapter and data.
struct LmRun<'a> {
    base: &'a DecoderBase,
    adapter: Adapter,
    train: Vec<LmExample>,
    /// Each evaluation input with its first reference as the target, for the loss.
    eval_examples: Vec<LmExample>,
    eval_inputs: Vec<SourceReferences>,
    format: Seq2SeqFormat,
    generation: GenerationConfig,
    pad_id: i64,
    device: Device,
    eval_batch_size: usize,
    spec: &'a JobSpec,
}

impl LmRun<'_> {
    /// Calls `f` with the adapter as the decoder takes it, for batches of
    /// `batch` examples (prefix dropout draws per example in training).
    fn with_adapter<R>(&self, batch: i64, train: bool, f: impl FnOnce(&LmAdapter<'_>) -> R) -> R {
        let prompt = match &self.adapter {
            Adapter::PromptTuning(prompt) => Some(prompt.embeddings().shallow_clone()),
            Adapter::PTuning(encoder) => Some(encoder.prompt(train)),
            _ => None,
        };
        let prefix_hooks;
        let hooks: &dyn Hooks = match &self.adapter {
            Adapter::Prefix(prefix) => {
                prefix_hooks = prefix.hooks(if train { batch } else { 1 }, train);
                &prefix_hooks
            }
            _ => &NoHooks,
        };
        f(&LmAdapter { prompt: prompt.as_ref(), hooks })
    }

    fn shape(&self) -> AdapterShape {
        let model = &self.base.model;
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

    fn train_loss(&self, indices: &[usize], _stream: &crate::engine::rng::DropoutStream) -> Tensor {
        let batch = LmBatch::collate(&self.train, indices, self.pad_id, self.device);
        self.with_adapter(batch.len as i64, true, |adapter| {
            causal_lm::train_loss(self.base.model.as_ref(), adapter, &batch, true)
        })
    }

    fn evaluate(&self, step: u64) -> Result<TaskEvaluation, EngineError> {
        let model = self.base.model.as_ref();
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
            metrics: vec![metric(step, MetricKind::Eval, "loss", loss), metric(step, MetricKind::Eval, "bleu", bleu.bleu)],
            predictions: bleu.hypotheses.into_iter().map(Value::from).collect(),
        })
    }

    fn export(&self, out_dir: &Path, _vars: &nn::VarStore, provenance: &Value) -> Result<(), EngineError> {
        export::write_adapter(out_dir, self.spec, &self.shape(), &self.adapter, provenance)
    }
}
