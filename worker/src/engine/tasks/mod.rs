//! Tasks, one folder each: its data, the head or loss on top of the base
//! model, the setup of a job for the training loop (`train/`) and the pack
//! (`pack.rs`), its evaluation and its exports.
//!
//! - `classification/`: sequence classification on an encoder, and the
//!   classifier both classification tasks train;
//! - `token_classification/`: the token level of that classifier (named
//!   entities), scored by entity;
//! - `causal_lm/`: text-to-text generation on a decoder.

pub mod causal_lm;
pub mod classification;
pub mod token_classification;

use std::path::Path;

use ptune_core::JobSpec;

use crate::engine::error::EngineError;
use crate::engine::models::config::model_type;

/// Refuses a task the model's architecture cannot serve (classification
/// pools an encoder, causal LM needs a decoder), naming the task, before
/// anything is loaded. A model type the engine does not know is left for
/// loading to refuse.
pub(crate) fn check_architecture(spec: &JobSpec, model_dir: &Path) -> Result<(), EngineError> {
    check_architecture_of(spec, &model_type(model_dir)?)
}

/// [`check_architecture`] for a model of `model_type`.
pub(crate) fn check_architecture_of(spec: &JobSpec, model_type: &str) -> Result<(), EngineError> {
    Ok(ptune_core::model_types::check_task(spec.task, &spec.base_model, &[model_type])?)
}
