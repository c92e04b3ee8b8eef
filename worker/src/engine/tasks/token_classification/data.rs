//! A token classification job's data: `{text_field: [word], label_field:
//! [tag]}` rows (one BIO tag per word, from `data.labels`), tokenized once
//! with each word's first sub-token labelled (see `data/ner.rs`), and its
//! evaluation: loss, entity precision, recall and F1 (exact span and type),
//! tag accuracy, and every word's predicted tag.

use std::path::Path;

use ptune_core::{Metric, MetricKind, SpecError};
use serde_json::Value;
use tch::{Device, Tensor};

use super::evaluate::evaluate;
use crate::engine::data::ner::{encode_sentences, read_tagged_sentences, NerBatch, NerExample, TagSet, TaggedFields};
use crate::engine::data::non_empty;
use crate::engine::data::tokenize::TextTokenizer;
use crate::engine::error::EngineError;
use crate::engine::job::TrainJob;
use crate::engine::train::TaskEvaluation;

/// Training and evaluation sentences of one job, tokenized.
pub struct TokenData {
    pub train: Vec<NerExample>,
    pub eval: Vec<NerExample>,
    pub tags: TagSet,
    pub pad_id: i64,
}

impl TokenData {
    /// Reads and tokenizes the job's files (the training file only when
    /// `training`); an empty file is an error.
    pub fn load(job: &TrainJob, tokenizer: &TextTokenizer, training: bool) -> Result<Self, EngineError> {
        let data = &job.spec.data;
        let tags = TagSet::new(data.labels.clone()).map_err(|message| SpecError::new("data.labels", message))?;
        let fields = TaggedFields { tokens: data.text_field.clone(), tags: data.label_field.clone() };
        let read = |path: &Path, name: &str, limit: u64| -> Result<Vec<NerExample>, EngineError> {
            let sentences = non_empty(read_tagged_sentences(path, name, &fields, limit)?, name)?;
            encode_sentences(tokenizer.inner(), &sentences, &tags, name, data.max_seq_len as usize)
        };
        let train = match training {
            true => read(&job.train_file, &job.train_name, data.max_train_examples)?,
            false => Vec::new(),
        };
        let eval = read(&job.eval_file, &job.eval_name, data.max_eval_examples)?;
        Ok(Self { train, eval, tags, pad_id: tokenizer.pad_id() })
    }

    /// The training examples at `indices`, padded, on `device`.
    pub fn train_batch(&self, indices: &[usize], device: Device) -> NerBatch {
        NerBatch::collate(&self.train, indices, self.pad_id, device)
    }

    /// Evaluates every evaluation sentence in batches of `batch_size`;
    /// `logits` runs the model in eval mode on a batch (see [`evaluate`]).
    pub fn evaluate(
        &self,
        logits: &mut dyn FnMut(&NerBatch) -> Tensor,
        batch_size: usize,
        device: Device,
        step: u64,
    ) -> TaskEvaluation {
        let evaluation = evaluate(&self.eval, &self.tags, batch_size, self.pad_id, device, logits);
        let scores = &evaluation.scores;
        let metric = |name: &str, value: f64| Metric::new(step, MetricKind::Eval, name, value);
        TaskEvaluation {
            metrics: vec![
                metric("loss", evaluation.loss),
                metric("f1", scores.f1()),
                metric("precision", scores.precision()),
                metric("recall", scores.recall()),
                metric("accuracy", scores.accuracy),
            ],
            predictions: evaluation
                .predictions
                .iter()
                .map(|words| {
                    Value::Array(words.iter().map(|tag| tag.map_or(Value::Null, |t| Value::from(self.tags.name(t)))).collect())
                })
                .collect(),
        }
    }
}
