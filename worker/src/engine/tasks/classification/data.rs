//! A classifier's data, at either level, and what the training loop asks
//! of it: the padded batch of a step, the loss of its logits, and an
//! evaluation with the level's metrics.
//!
//! - Sequence classification: `{text_field: str, label_field: label}` rows;
//!   eval loss, accuracy and macro F1.
//! - Token classification: see `token_classification/`.

use std::path::Path;

use ptune_core::{Metric, MetricKind, Task};
use serde_json::Value;
use tch::{Device, Tensor};

use super::evaluate::{evaluate, macro_f1, SequenceEvaluation};
use super::model::Classifier;
use crate::engine::data::batch::Batch;
use crate::engine::data::jsonl::read_labelled_texts;
use crate::engine::data::tokenize::TextTokenizer;
use crate::engine::data::{non_empty, Example};
use crate::engine::error::EngineError;
use crate::engine::job::TrainJob;
use crate::engine::models::bert::BertModel;
use crate::engine::tasks::token_classification::{token_loss, TokenData};
use crate::engine::train::TaskEvaluation;

/// Labelled texts of a sequence classification job, tokenized.
pub struct SequenceData {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub labels: Vec<String>,
    pub pad_id: i64,
}

impl SequenceData {
    /// Reads and tokenizes the job's files (the training file only when
    /// `training`); an empty file is an error.
    pub fn load(job: &TrainJob, tokenizer: &TextTokenizer, training: bool) -> Result<Self, EngineError> {
        let spec = &job.spec;
        let data = &spec.data;
        let read = |path: &Path, name: &str, limit: u64| -> Result<Vec<Example>, EngineError> {
            let texts = non_empty(read_labelled_texts(path, name, spec, limit)?, name)?;
            let ids = tokenizer.encode_batch(texts.iter().map(|t| t.text.as_str()).collect(), data.max_seq_len as usize)?;
            Ok(ids.into_iter().zip(&texts).map(|(ids, t)| Example { ids, label: t.label as i64 }).collect())
        };
        let train = match training {
            true => read(&job.train_file, &job.train_name, data.max_train_examples)?,
            false => Vec::new(),
        };
        let eval = read(&job.eval_file, &job.eval_name, data.max_eval_examples)?;
        Ok(Self { train, eval, labels: data.labels.clone(), pad_id: tokenizer.pad_id() })
    }

    /// Evaluates every evaluation example in batches of `batch_size`;
    /// `logits` runs the model in eval mode on a batch.
    fn evaluate(&self, logits: &mut dyn FnMut(&Batch) -> Tensor, batch_size: usize, device: Device, step: u64) -> TaskEvaluation {
        let SequenceEvaluation { loss, accuracy, predictions } = evaluate(&self.eval, batch_size, self.pad_id, device, logits);
        let truth: Vec<usize> = self.eval.iter().map(|e| e.label as usize).collect();
        let metric = |name: &str, value: f64| Metric::new(step, MetricKind::Eval, name, value);
        TaskEvaluation {
            metrics: vec![
                metric("loss", loss),
                metric("accuracy", accuracy),
                metric("macro_f1", macro_f1(&truth, &predictions)),
            ],
            predictions: predictions.iter().map(|&p| Value::from(self.labels[p].clone())).collect(),
        }
    }
}

/// Training and evaluation examples of one classifier job.
pub enum ClassifierData {
    Sequence(SequenceData),
    Token(TokenData),
}

/// A padded training batch of either level: `labels` is `[batch]` classes
/// or `[batch, seq]` tags.
pub struct TrainBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
}

impl ClassifierData {
    /// Reads and tokenizes the job's files as its task says (the training
    /// file only when `training`); an empty file is an error.
    pub fn load(job: &TrainJob, tokenizer: &TextTokenizer, training: bool) -> Result<Self, EngineError> {
        Ok(match job.spec.task {
            Task::TokenClassification => Self::Token(TokenData::load(job, tokenizer, training)?),
            _ => Self::Sequence(SequenceData::load(job, tokenizer, training)?),
        })
    }

    pub fn train_len(&self) -> usize {
        match self {
            Self::Sequence(data) => data.train.len(),
            Self::Token(data) => data.train.len(),
        }
    }

    pub fn eval_len(&self) -> usize {
        match self {
            Self::Sequence(data) => data.eval.len(),
            Self::Token(data) => data.eval.len(),
        }
    }

    /// Outputs of the head: classes or tags.
    pub fn num_labels(&self) -> usize {
        match self {
            Self::Sequence(data) => data.labels.len(),
            Self::Token(data) => data.tags.len(),
        }
    }

    /// The training examples at `indices`, padded, on `device`.
    pub fn train_batch(&self, indices: &[usize], device: Device) -> TrainBatch {
        match self {
            Self::Sequence(data) => {
                let batch = Batch::collate(&data.train, indices, data.pad_id, device);
                TrainBatch { input_ids: batch.input_ids, attention_mask: batch.attention_mask, labels: batch.labels }
            }
            Self::Token(data) => {
                let batch = data.train_batch(indices, device);
                TrainBatch { input_ids: batch.input_ids, attention_mask: batch.attention_mask, labels: batch.labels }
            }
        }
    }

    /// How many terms the mean loss of the training examples `indices`
    /// averages: the examples, or their labelled tokens.
    pub fn loss_terms(&self, indices: &[usize]) -> usize {
        match self {
            Self::Sequence(_) => indices.len(),
            Self::Token(data) => {
                let labels = data.train_batch(indices, Device::Cpu).labels;
                i64::try_from(labels.ne(-100).sum(tch::Kind::Int64)).map_or(0, |n| n as usize)
            }
        }
    }

    /// Mean loss of a batch's logits: cross-entropy over the examples, or
    /// over the labelled tokens.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Tensor {
        match self {
            Self::Sequence(_) => logits.cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Mean, -100, 0.0),
            Self::Token(_) => token_loss(logits, labels),
        }
    }

    /// Evaluates `model` on the shared `encoder` over every evaluation
    /// example, in eval mode, without gradients.
    pub fn evaluate(
        &self,
        model: &Classifier,
        encoder: &BertModel,
        batch_size: usize,
        device: Device,
        step: u64,
    ) -> TaskEvaluation {
        match self {
            Self::Sequence(data) => data.evaluate(
                &mut |batch| model.logits(encoder, &batch.input_ids, &batch.attention_mask, false),
                batch_size,
                device,
                step,
            ),
            Self::Token(data) => data.evaluate(
                &mut |batch| model.logits(encoder, &batch.input_ids, &batch.attention_mask, false),
                batch_size,
                device,
                step,
            ),
        }
    }
}
