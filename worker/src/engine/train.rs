//! The training loop: reads and tokenizes the data, builds the job's adapter
//! on the shared frozen encoder, runs AdamW steps with periodic evaluation,
//! reports every step and evaluation to the caller, and writes the export.
//!
//! Only the job's own variables (adapter, head, and for full fine-tuning its
//! copy of the encoder) get gradients and optimizer state; the shared base's
//! tensors are frozen and never handed to the optimizer.

use std::path::Path;
use std::time::Instant;

use ptune_core::{JobSpec, Method, Metric, MetricKind, ModelLimits, SpecError, Task};
use tch::{nn, Device};

use super::data::batch::{Batch, EpochBatches};
use super::data::jsonl::read_labelled_texts;
use super::data::tokenize::TextTokenizer;
use super::data::Example;
use super::models::BaseModel;
use super::optim::{AdamW, LinearSchedule};
use super::peft::lora::{resolve_targets, Lora, LoraConfig, DEFAULT_TARGETS};
use super::peft::p_tuning::{PromptEncoder, PromptEncoderConfig};
use super::peft::prefix::{PrefixShape, PrefixTuning};
use super::peft::prompt_tuning::{PromptInit, PromptTuning};
use super::tasks::seq_cls::{Adapter, ClassificationHead, Evaluation, SeqClsModel};
use super::{export, Control, EngineError, Event, TrainJob, TrainOutcome};

/// Smallest evaluation batch: evaluation keeps no activations for a
/// backward pass, so it can take larger batches than training.
const MIN_EVAL_BATCH_SIZE: usize = 64;

pub fn run(
    base: &BaseModel,
    device: Device,
    job: &TrainJob,
    on_event: &mut dyn FnMut(Event<'_>) -> Control,
) -> Result<TrainOutcome, EngineError> {
    let spec = &job.spec;
    check_supported(spec, base)?;
    let data = &spec.data;
    let train = load_examples(&job.train_file, &job.train_name, spec, data.max_train_examples, &base.tokenizer)?;
    let eval = load_examples(&job.eval_file, &job.eval_name, spec, data.max_eval_examples, &base.tokenizer)?;
    let t = &spec.training;
    tracing::info!(
        job = %spec.name,
        train_examples = train.len(),
        eval_examples = eval.len(),
        total_steps = spec.total_steps(train.len() as u64),
        "training started"
    );

    // Every random draw of the job (prompt init, head init, dropout) comes
    // from libtorch's generator seeded here; the data order has its own.
    tch::manual_seed(t.seed as i64);
    let adapter = nn::VarStore::new(device);
    let model = build_model(spec, base, &adapter.root())?;

    let optimizer = &mut optimizer_for(&adapter, spec);

    let total_steps = spec.total_steps(train.len() as u64);
    let schedule = LinearSchedule::new(total_steps, t.warmup_ratio);
    let mut batches = EpochBatches::new(train.len(), t.batch_size as usize, t.seed);
    let pad_id = base.tokenizer.pad_id();
    let eval_batch_size = (t.batch_size as usize).max(MIN_EVAL_BATCH_SIZE);
    let evaluate = |model: &SeqClsModel, step: u64| {
        let Evaluation { loss, accuracy, predictions } =
            model.evaluate(&base.encoder, &eval, eval_batch_size, pad_id);
        let metrics =
            vec![metric(step, MetricKind::Eval, "loss", loss), metric(step, MetricKind::Eval, "accuracy", accuracy)];
        (metrics, predictions)
    };

    let mut last_eval = Vec::new();
    let mut eval_predictions = Vec::new();
    let mut step = 0u64;
    while step < total_steps {
        let started = Instant::now();
        let batch = Batch::collate(&train, batches.next_batch(), pad_id, device);
        let lr_factor = schedule.factor(step);
        optimizer.zero_grad();
        let loss = model.train_loss(&base.encoder, &batch);
        loss.backward();
        optimizer.step(lr_factor);
        step += 1;

        let loss = f64::try_from(&loss)?;
        let seconds = started.elapsed().as_secs_f64();
        let metrics = [
            metric(step, MetricKind::Train, "loss", loss),
            metric(step, MetricKind::Train, "learning_rate", t.learning_rate * lr_factor),
            metric(step, MetricKind::Train, "examples_per_second", batch.len as f64 / seconds.max(1e-9)),
        ];
        tracing::debug!(step, total_steps, loss, epoch = batches.epoch(), "step");
        if !loss.is_finite() {
            return Err(EngineError::Diverged { step, loss });
        }
        let mut finish = match on_event(Event::Step { step, total_steps, metrics: &metrics }) {
            Control::Stop => return Ok(stopped(step, total_steps, last_eval)),
            control => control == Control::Finish,
        };
        let periodic = t.eval_every > 0 && step.is_multiple_of(t.eval_every);
        if periodic || step == total_steps || finish {
            (last_eval, eval_predictions) = evaluate(&model, step);
            tracing::info!(step, loss = last_eval[0].value, accuracy = last_eval[1].value, "evaluated");
            match on_event(Event::Eval { step, metrics: &last_eval }) {
                Control::Stop => return Ok(stopped(step, total_steps, last_eval)),
                control => finish |= control == Control::Finish,
            }
        }
        if finish {
            tracing::info!(step, total_steps, "stopping early on request; exporting");
            break;
        }
    }

    let provenance = serde_json::json!({
        "engine": concat!("ptune-worker ", env!("CARGO_PKG_VERSION")),
        "base_model_sha256": base.info.sha256,
        "steps": step,
        "train_examples": train.len(),
        "eval_examples": eval.len(),
        "final_metrics": last_eval
            .iter()
            .map(|m| (m.name.clone(), serde_json::Value::from(m.value)))
            .collect::<serde_json::Map<_, _>>(),
        "spec": spec.to_json(),
    });
    export::write(&job.out_dir, spec, &base.config, &model, &adapter, &provenance)?;
    tracing::info!(job = %spec.name, out_dir = %job.out_dir.display(), "adapter exported");
    Ok(TrainOutcome { steps: step, total_steps, final_metrics: last_eval, eval_predictions, stopped: false })
}

/// Refuses specs this engine cannot train on this model, naming the field.
fn check_supported(spec: &JobSpec, base: &BaseModel) -> Result<(), EngineError> {
    spec.validate(Some(&ModelLimits { max_positions: base.info.max_positions }))?;
    if spec.task != Task::SequenceClassification {
        return Err(SpecError::new("task", format!("{} is not supported by this engine yet", spec.task)).into());
    }
    if !base.encoder.has_pooler() {
        return Err(EngineError::Model(
            "the checkpoint has no pooler.dense weights, which sequence classification pools through".into(),
        ));
    }
    if let Some(targets) = &spec.peft.target_modules {
        resolve_targets(targets)?;
    }
    Ok(())
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
pub fn build_model(spec: &JobSpec, base: &BaseModel, p: &nn::Path) -> Result<SeqClsModel, EngineError> {
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
            let init = PromptInit::from_spec(peft, &base.tokenizer, config.vocab_size)?;
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
            let targets = match &peft.target_modules {
                Some(targets) => resolve_targets(targets)?,
                None => resolve_targets(&DEFAULT_TARGETS.map(String::from))?,
            };
            let lora_config = LoraConfig {
                r: i64::from(peft.lora_r()),
                alpha: peft.lora_alpha(),
                dropout: peft.lora_dropout(),
                modules: targets,
            };
            let dims = |module: &str| match module {
                "intermediate.dense" => (hidden, config.intermediate_size),
                "output.dense" => (config.intermediate_size, hidden),
                _ => (hidden, hidden),
            };
            Adapter::Lora(Lora::new(p, lora_config, config.num_hidden_layers, dims))
        }
        Method::Full => Adapter::Full(base.encoder.trainable_copy(&(p / "bert"), config)),
    };
    let dropout = config.classifier_dropout.unwrap_or(config.hidden_dropout_prob);
    let labels = spec.data.labels.len() as i64;
    let head = ClassificationHead::new(p, hidden, labels, config.initializer_range, dropout);
    Ok(SeqClsModel { adapter, head })
}

/// Reads and tokenizes one data file; an empty file is an error.
fn load_examples(
    path: &Path,
    name: &str,
    spec: &JobSpec,
    limit: u64,
    tokenizer: &TextTokenizer,
) -> Result<Vec<Example>, EngineError> {
    let texts = read_labelled_texts(path, name, spec, limit)?;
    if texts.is_empty() {
        return Err(EngineError::Dataset { file: name.to_string(), message: "has no examples".into() });
    }
    let ids = tokenizer.encode_batch(texts.iter().map(|t| t.text.as_str()).collect(), spec.data.max_seq_len as usize)?;
    Ok(ids.into_iter().zip(&texts).map(|(ids, t)| Example { ids, label: t.label as i64 }).collect())
}

fn metric(step: u64, kind: MetricKind, name: &str, value: f64) -> Metric {
    Metric { step, kind, name: name.to_string(), value }
}

fn stopped(steps: u64, total_steps: u64, final_metrics: Vec<Metric>) -> TrainOutcome {
    TrainOutcome { steps, total_steps, final_metrics, eval_predictions: Vec::new(), stopped: true }
}
