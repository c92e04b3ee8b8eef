//! A job's data by task, and what the training loop asks of it: the loss of a
//! training batch and an evaluation with the task's metrics.
//!
//! - Sequence classification: `{text_field: str, label_field: label}` rows;
//!   eval loss, accuracy and macro F1.
//! - Token classification: `{text_field: [word], label_field: [tag]}` rows
//!   (one BIO tag per word, from `data.labels`); eval loss, entity
//!   precision, recall and F1 (exact span and type), and tag accuracy.

use std::path::Path;

use ptune_core::{Metric, MetricKind, Task};
use serde_json::Value;
use tch::{Device, Tensor};

use super::data::batch::Batch;
use super::data::jsonl::read_labelled_texts;
use super::data::ner::{encode_sentences, read_tagged_sentences, NerBatch, NerExample, TagSet, TaggedFields};
use super::data::Example;
use super::models::BaseModel;
use super::tasks::classifier::{macro_f1, Classifier, Evaluation};
use super::tasks::token_cls::{self, token_loss};
use super::{EngineError, TrainJob};

/// Training and evaluation examples of one job, tokenized.
pub enum TaskData {
    Sequence { train: Vec<Example>, eval: Vec<Example>, labels: Vec<String>, pad_id: i64 },
    Token { train: Vec<NerExample>, eval: Vec<NerExample>, tags: TagSet, pad_id: i64 },
}

/// A padded training batch of either level: `labels` is `[batch]` classes
/// or `[batch, seq]` tags.
pub struct TrainBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
}

/// Metrics of one evaluation, and the prediction for each evaluation example
/// in file order (a label, or a list of tags with `null` for words cut by
/// truncation).
pub struct TaskEvaluation {
    pub metrics: Vec<Metric>,
    pub predictions: Vec<Value>,
}

impl TaskData {
    /// Reads and tokenizes the job's files; an empty file is an error.
    pub fn load(job: &TrainJob, base: &BaseModel) -> Result<Self, EngineError> {
        let spec = &job.spec;
        let data = &spec.data;
        let pad_id = base.tokenizer.pad_id();
        match spec.task {
            Task::TokenClassification => {
                let tags = TagSet::new(data.labels.clone()).map_err(|message| {
                    EngineError::Spec(ptune_core::SpecError::new("data.labels", message))
                })?;
                let fields = TaggedFields { tokens: data.text_field.clone(), tags: data.label_field.clone() };
                let read = |path: &Path, name: &str, limit: u64| -> Result<Vec<NerExample>, EngineError> {
                    let sentences = non_empty(read_tagged_sentences(path, name, &fields, limit)?, name)?;
                    encode_sentences(base.tokenizer.inner(), &sentences, &tags, name, data.max_seq_len as usize)
                };
                let train = read(&job.train_file, &job.train_name, data.max_train_examples)?;
                let eval = read(&job.eval_file, &job.eval_name, data.max_eval_examples)?;
                Ok(TaskData::Token { train, eval, tags, pad_id })
            }
            _ => {
                let read = |path: &Path, name: &str, limit: u64| -> Result<Vec<Example>, EngineError> {
                    let texts = non_empty(read_labelled_texts(path, name, spec, limit)?, name)?;
                    let ids = base
                        .tokenizer
                        .encode_batch(texts.iter().map(|t| t.text.as_str()).collect(), data.max_seq_len as usize)?;
                    Ok(ids.into_iter().zip(&texts).map(|(ids, t)| Example { ids, label: t.label as i64 }).collect())
                };
                let train = read(&job.train_file, &job.train_name, data.max_train_examples)?;
                let eval = read(&job.eval_file, &job.eval_name, data.max_eval_examples)?;
                Ok(TaskData::Sequence { train, eval, labels: data.labels.clone(), pad_id })
            }
        }
    }

    pub fn train_len(&self) -> usize {
        match self {
            TaskData::Sequence { train, .. } => train.len(),
            TaskData::Token { train, .. } => train.len(),
        }
    }

    pub fn eval_len(&self) -> usize {
        match self {
            TaskData::Sequence { eval, .. } => eval.len(),
            TaskData::Token { eval, .. } => eval.len(),
        }
    }

    /// Outputs of the head: classes or tags.
    pub fn num_labels(&self) -> usize {
        match self {
            TaskData::Sequence { labels, .. } => labels.len(),
            TaskData::Token { tags, .. } => tags.len(),
        }
    }

    /// The training examples at `indices`, padded, on `device`.
    pub fn train_batch(&self, indices: &[usize], device: Device) -> TrainBatch {
        match self {
            TaskData::Sequence { train, pad_id, .. } => {
                let batch = Batch::collate(train, indices, *pad_id, device);
                TrainBatch { input_ids: batch.input_ids, attention_mask: batch.attention_mask, labels: batch.labels }
            }
            TaskData::Token { train, pad_id, .. } => {
                let batch = NerBatch::collate(train, indices, *pad_id, device);
                TrainBatch { input_ids: batch.input_ids, attention_mask: batch.attention_mask, labels: batch.labels }
            }
        }
    }

    /// Mean loss of a batch's logits: cross-entropy over the examples, or
    /// over the labelled tokens.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Tensor {
        match self {
            TaskData::Sequence { .. } => {
                logits.cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Mean, -100, 0.0)
            }
            TaskData::Token { .. } => token_loss(logits, labels),
        }
    }

    /// Evaluates every evaluation example in eval mode, without gradients.
    pub fn evaluate(
        &self,
        model: &Classifier,
        base: &BaseModel,
        batch_size: usize,
        device: Device,
        step: u64,
    ) -> TaskEvaluation {
        let eval_metric = |name: &str, value: f64| Metric::new(step, MetricKind::Eval, name, value);
        match self {
            TaskData::Sequence { eval, labels, pad_id, .. } => {
                let Evaluation { loss, accuracy, predictions } =
                    model.evaluate(&base.encoder, eval, batch_size, *pad_id);
                let truth: Vec<usize> = eval.iter().map(|e| e.label as usize).collect();
                TaskEvaluation {
                    metrics: vec![
                        eval_metric("loss", loss),
                        eval_metric("accuracy", accuracy),
                        eval_metric("macro_f1", macro_f1(&truth, &predictions)),
                    ],
                    predictions: predictions.iter().map(|&p| Value::from(labels[p].clone())).collect(),
                }
            }
            TaskData::Token { eval, tags, pad_id, .. } => {
                let evaluation = token_cls::evaluate(eval, tags, batch_size, *pad_id, device, &mut |batch| {
                    model.logits(&base.encoder, &batch.input_ids, &batch.attention_mask, false)
                });
                let scores = &evaluation.scores;
                TaskEvaluation {
                    metrics: vec![
                        eval_metric("loss", evaluation.loss),
                        eval_metric("f1", scores.f1()),
                        eval_metric("precision", scores.precision()),
                        eval_metric("recall", scores.recall()),
                        eval_metric("accuracy", scores.accuracy),
                    ],
                    predictions: evaluation
                        .predictions
                        .iter()
                        .map(|words| {
                            Value::Array(
                                words.iter().map(|tag| tag.map_or(Value::Null, |t| Value::from(tags.name(t)))).collect(),
                            )
                        })
                        .collect(),
                }
            }
        }
    }
}

/// `items`, or an error naming the file `name` when there are none.
pub(crate) fn non_empty<T>(items: Vec<T>, name: &str) -> Result<Vec<T>, EngineError> {
    if items.is_empty() {
        return Err(EngineError::Dataset { file: name.to_string(), message: "has no examples".into() });
    }
    Ok(items)
}
