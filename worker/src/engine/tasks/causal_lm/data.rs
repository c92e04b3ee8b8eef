//! A causal-LM job's data: training rows `{text_field: source, label_field:
//! target}`; evaluation rows `{text_field: source, references_field:
//! [reference, ..]}` (or one reference in `label_field`). A training example
//! is `source + " ||" + " " + target + EOS`, labelled on the target and EOS
//! only (see `data/seq2seq.rs`); `data.max_seq_len` caps it, and caps each
//! evaluation prompt. Batches are padded on the right.

use tch::{Device, Tensor};

use crate::engine::data::batch::pad_labelled_rows;
use crate::engine::data::non_empty;
use crate::engine::data::seq2seq::{
    read_source_references_in, read_source_targets_in, LmExample, Seq2SeqFields, Seq2SeqFormat, SourceReferences,
};
use crate::engine::error::EngineError;
use crate::engine::job::TrainJob;
use crate::engine::models::frozen::FrozenDecoder;

/// The examples of one job, tokenized.
pub struct LmData {
    pub train: Vec<LmExample>,
    /// Each evaluation input with its first reference as the target, for the loss.
    pub eval_examples: Vec<LmExample>,
    pub eval_inputs: Vec<SourceReferences>,
    pub format: Seq2SeqFormat,
    /// Id that fills padding: the tokenizer's `<pad>`, else EOS.
    pub pad_id: i64,
}

impl LmData {
    /// Reads and tokenizes the job's files for `base` (the training file
    /// only when `training`); an empty file is an error.
    pub fn load(job: &TrainJob, base: &FrozenDecoder, training: bool) -> Result<Self, EngineError> {
        let data = &job.spec.data;
        let fields = Seq2SeqFields {
            source: data.text_field.clone(),
            target: data.label_field.clone(),
            references: data.references_field.clone().unwrap_or_else(|| Seq2SeqFields::default().references),
        };
        let eos_id = eos_id(base)?;
        let format =
            Seq2SeqFormat { separator: Seq2SeqFormat::DEFAULT_SEPARATOR.into(), eos_id, max_len: data.max_seq_len as usize };
        let pairs = match training {
            true => non_empty(
                read_source_targets_in(&job.train_file, &job.train_name, data.max_train_examples, &fields)?,
                &job.train_name,
            )?,
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
        let pad_id = base.tokenizer.token_to_id("<pad>").unwrap_or(eos_id);
        Ok(Self { train, eval_examples, eval_inputs, format, pad_id })
    }
}

/// Id that ends every target: the config's first `eos_token_id`, else
/// the tokenizer's `<|endoftext|>` or `</s>`.
fn eos_id(base: &FrozenDecoder) -> Result<i64, EngineError> {
    base.model
        .eos_token_ids()
        .first()
        .copied()
        .or_else(|| ["<|endoftext|>", "</s>"].iter().find_map(|t| base.tokenizer.token_to_id(t)))
        .ok_or_else(|| EngineError::Model("the model has no eos_token_id and its tokenizer no end token".into()))
}

/// A right-padded training or evaluation batch.
pub struct LmBatch {
    /// `[batch, longest]` token ids, `pad_id` after each example's end.
    pub input_ids: Tensor,
    /// `[batch, longest]` 1 at real tokens, 0 at padding.
    pub attention_mask: Tensor,
    /// `[batch, longest]` target ids, `-100` where nothing is predicted.
    pub labels: Tensor,
    pub len: usize,
}

impl LmBatch {
    pub fn collate(examples: &[LmExample], indices: &[usize], pad_id: i64, device: Device) -> Self {
        let rows: Vec<(&[i64], &[i64])> =
            indices.iter().map(|&i| (examples[i].ids.as_slice(), examples[i].labels.as_slice())).collect();
        let (input_ids, attention_mask, labels) = pad_labelled_rows(&rows, pad_id, device);
        Self { input_ids, attention_mask, labels, len: indices.len() }
    }
}