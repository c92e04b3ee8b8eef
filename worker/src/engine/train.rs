//! The training loop: reads and tokenizes the data, builds the job's adapter
//! on the shared frozen encoder, runs AdamW steps with periodic evaluation,
//! reports every step and evaluation to the caller, and writes the export.

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
use super::peft::prompt_tuning::{PromptInit, PromptTuning};
use super::tasks::seq_cls::{ClassificationHead, Evaluation, PromptSeqCls};
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

    let mut optimizer = AdamW::default();
    let head_lr = t.head_learning_rate.unwrap_or(t.learning_rate);
    optimizer.add_group(vec![model.prompt.embeddings().shallow_clone()], t.learning_rate, t.weight_decay);
    optimizer.add_group(vec![model.head.weight().shallow_clone()], head_lr, t.weight_decay);
    // Biases get no weight decay, as in the HF Trainer.
    optimizer.add_group(vec![model.head.bias().shallow_clone()], head_lr, 0.0);

    let total_steps = spec.total_steps(train.len() as u64);
    let schedule = LinearSchedule::new(total_steps, t.warmup_ratio);
    let mut batches = EpochBatches::new(train.len(), t.batch_size as usize, t.seed);
    let pad_id = base.tokenizer.pad_id();
    let eval_batch_size = (t.batch_size as usize).max(MIN_EVAL_BATCH_SIZE);
    let evaluate = |model: &PromptSeqCls, step: u64| {
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
        let _ = f64::try_from(&loss)?;
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
        let mut control = on_event(Event::Step { step, total_steps, metrics: &metrics });
        if control == Control::Stop {
            return Ok(stopped(step, total_steps, last_eval));
        }
        let periodic = t.eval_every > 0 && step.is_multiple_of(t.eval_every);
        if periodic || step == total_steps || control == Control::Finish {
            (last_eval, eval_predictions) = evaluate(&model, step);
            tracing::info!(step, loss = last_eval[0].value, accuracy = last_eval[1].value, "evaluated");
            control = on_event(Event::Eval { step, metrics: &last_eval });
            if control == Control::Stop {
                return Ok(stopped(step, total_steps, last_eval));
            }
        }
        if control == Control::Finish {
            if last_eval.first().is_none_or(|m| m.step != step) {
                (last_eval, eval_predictions) = evaluate(&model, step);
                let _ = on_event(Event::Eval { step, metrics: &last_eval });
            }
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
        "final_metrics": last_eval.iter().map(|m| (m.name.clone(), serde_json::Value::from(m.value))).collect::<serde_json::Map<_, _>>(),
        "spec": spec.to_json(),
    });
    export::write_prompt_tuning(&job.out_dir, spec, &base.config, &model, &provenance)?;
    tracing::info!(job = %spec.name, out_dir = %job.out_dir.display(), "adapter exported");
    Ok(TrainOutcome { steps: step, total_steps, final_metrics: last_eval, eval_predictions, stopped: false })
}

/// Refuses specs this engine cannot train on this model, naming the field.
fn check_supported(spec: &JobSpec, base: &BaseModel) -> Result<(), EngineError> {
    spec.validate(Some(&ModelLimits { max_positions: base.info.max_positions }))?;
    if spec.method != Method::PromptTuning {
        return Err(SpecError::new("method", format!("{} is not supported by this engine yet", spec.method)).into());
    }
    if spec.task != Task::SequenceClassification {
        return Err(SpecError::new("task", format!("{} is not supported by this engine yet", spec.task)).into());
    }
    if !base.encoder.has_pooler() {
        return Err(EngineError::Model(
            "the checkpoint has no pooler.dense weights, which sequence classification pools through".into(),
        ));
    }
    Ok(())
}

/// The job's prompt and classification head, under `p`, drawn from the
/// already seeded generator.
pub fn build_model(spec: &JobSpec, base: &BaseModel, p: &nn::Path) -> Result<PromptSeqCls, EngineError> {
    let config = &base.config;
    let init = PromptInit::from_spec(&spec.peft, &base.tokenizer, config.vocab_size)?;
    let nvt = i64::from(spec.peft.num_virtual_tokens);
    let prompt = PromptTuning::new(p, nvt, &init, base.encoder.word_embeddings());
    let dropout = config.classifier_dropout.unwrap_or(config.hidden_dropout_prob);
    let labels = spec.data.labels.len() as i64;
    let head = ClassificationHead::new(p, config.hidden_size, labels, config.initializer_range, dropout);
    Ok(PromptSeqCls { prompt, head })
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
