//! Examples for training and evaluation: JSON Lines files read into labelled
//! texts, tokenized once, and batched with per-batch padding.

pub mod batch;
pub mod jsonl;
pub mod ner;
pub mod seq2seq;
pub mod tokenize;

use crate::engine::error::EngineError;

/// One tokenized example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids with special tokens, truncated to `data.max_seq_len`.
    pub ids: Vec<i64>,
    /// Index into the spec's `data.labels`.
    pub label: i64,
}

/// `items`, or an error naming the file `name` when there are none.
pub(crate) fn non_empty<T>(items: Vec<T>, name: &str) -> Result<Vec<T>, EngineError> {
    if items.is_empty() {
        return Err(EngineError::Dataset { file: name.to_string(), message: "has no examples".into() });
    }
    Ok(items)
}
