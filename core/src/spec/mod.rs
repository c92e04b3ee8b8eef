//! Job specifications: what a user writes in a TOML file and what a worker
//! trains. Validation names the offending field and the allowed values, so a
//! bad spec is refused at submit time rather than failing on a worker.
//!
//! Here: the spec itself. Below it, each importing only what lies under it:
//! `limits.rs` (the bounds), `defaults.rs` (every field default),
//! `parse.rs` (reading labels and names), `kinds.rs` (what a spec chooses
//! from: method, task, pooling, ...), `sections.rs` (its `[peft]`, `[data]`,
//! `[generation]` and `[training]` tables), and `validate.rs` (the checks
//! that refuse a bad spec).

use serde::{Deserialize, Serialize};

pub use crate::bounds::SpecError;
use defaults::default_max_attempts;
use parse::parse_via_from_str;

/// Default attempts that may fail with an error of the job before it fails.
pub const DEFAULT_MAX_ATTEMPTS: u32 = defaults::MAX_ATTEMPTS;

pub mod defaults;
mod kinds;
mod limits;
mod parse;
mod sections;
#[cfg(test)]
mod tests;
mod validate;

pub use kinds::*;
pub use limits::*;
pub use parse::label_text;
pub use sections::*;

/// A complete, self-contained description of one training job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    pub base_model: String,
    #[serde(deserialize_with = "parse_via_from_str")]
    pub task: Task,
    #[serde(deserialize_with = "parse_via_from_str")]
    pub method: Method,
    #[serde(default)]
    pub peft: PeftConfig,
    pub data: DataConfig,
    pub training: TrainingConfig,
    /// The classification head (classifier tasks); defaults when absent.
    #[serde(default, skip_serializing_if = "HeadConfig::is_default")]
    pub head: HeadConfig,
    /// Decoding settings (causal_lm only); defaults when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationConfig>,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub owner: String,
}

/// What the coordinator knows about a base model from the workers serving it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLimits {
    /// Largest sequence length the model's position embeddings allow.
    pub max_positions: u32,
}

/// Smallest batch of an evaluation ([`JobSpec::eval_batch_size`]).
pub const MIN_EVAL_BATCH_SIZE: u32 = 64;

impl JobSpec {
    /// Parses a TOML spec. Errors name the field serde stopped at.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            SpecError::new("spec", message)
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("job spec serializes to json")
    }

    /// The job's decoding settings (defaults when the spec has none).
    pub fn generation(&self) -> GenerationConfig {
        self.generation.clone().unwrap_or_default()
    }

    /// Optimizer steps the job will run for `train_examples` training examples.
    pub fn total_steps(&self, train_examples: u64) -> u64 {
        if self.training.max_steps > 0 {
            return self.training.max_steps;
        }
        let per_epoch = train_examples.div_ceil(u64::from(self.training.batch_size.max(1)));
        ((per_epoch as f64) * self.training.epochs).ceil().max(1.0) as u64
    }

    /// Batch size of the job's evaluations: the training batch size, at
    /// least [`MIN_EVAL_BATCH_SIZE`] (an evaluation keeps no activations
    /// for a backward pass, so it can take larger batches than training).
    pub fn eval_batch_size(&self) -> u32 {
        self.training.batch_size.max(MIN_EVAL_BATCH_SIZE)
    }

    /// Index of a label value from the data, if it is one of the declared labels.
    pub fn label_index(&self, value: &serde_json::Value) -> Option<usize> {
        let text = label_text(value)?;
        self.data.labels.iter().position(|l| *l == text)
    }
}
