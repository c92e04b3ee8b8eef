//! Job specifications: what a user writes in a TOML file and what a worker
//! trains. Validation names the offending field and the allowed values, so a
//! bad spec is refused at submit time rather than failing on a worker.
//!
//! Here: the spec itself and every field default ([`defaults`]); in
//! `kinds.rs` what a spec chooses from (method, task, pooling, ...), in
//! `sections.rs` its `[peft]`, `[data]`, `[generation]` and `[training]`
//! tables, in `validate.rs` the checks that refuse a bad one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::bounds;
pub use crate::bounds::SpecError;

/// Hard cap on virtual tokens and sequence length, whatever the model.
pub const MAX_TOKENS: u32 = 512;
/// Hard cap on examples per step.
pub const MAX_BATCH_SIZE: u32 = 4096;
/// Most optimizer steps a job may plan (and the most between evaluations or checkpoints).
pub const MAX_STEPS: u64 = 10_000_000;
/// Most declared labels.
pub const MAX_LABELS: usize = 10_000;
/// Most examples a job may cap its data at.
pub const MAX_EXAMPLES: u64 = 1_000_000_000;
/// Default attempts that may fail with an error of the job before it fails.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Bounds of `training.stall_timeout_seconds` when set: ten seconds to a week.
pub const STALL_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 10..=604_800;

mod kinds;
mod sections;
#[cfg(test)]
mod tests;
mod validate;

pub use kinds::*;
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

    /// Index of a label value from the data, if it is one of the declared labels.
    pub fn label_index(&self, value: &serde_json::Value) -> Option<usize> {
        let text = label_text(value)?;
        self.data.labels.iter().position(|l| *l == text)
    }
}

/// The text a JSON label value is matched by: strings as they are, integers
/// and booleans in their JSON spelling.
pub fn label_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `a`, `a or b`, `a, b or c`.
fn join_or<T: fmt::Display>(items: &[T]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", join(rest)),
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn parse_via_from_str<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn labels_as_strings<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let values = Vec::<toml_or_json::Scalar>::deserialize(deserializer)?;
    Ok(values.into_iter().map(|v| v.0).collect())
}

mod toml_or_json {
    use serde::{Deserialize, Deserializer};

    /// A label written as a string, an integer or a boolean.
    pub struct Scalar(pub String);

    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            #[derive(Deserialize)]
            #[serde(untagged)]
            enum Raw {
                S(String),
                I(i64),
                B(bool),
            }
            Ok(Scalar(match Raw::deserialize(deserializer)? {
                Raw::S(s) => s,
                Raw::I(i) => i.to_string(),
                Raw::B(b) => b.to_string(),
            }))
        }
    }
}

/// Every default of a spec field, in one place: the TOML and JSON readers
/// (serde) and the gRPC conversion (`ptune-proto`) both take them from
/// here, so a field left out gets the same value whichever way it came.
pub mod defaults {
    pub const NUM_VIRTUAL_TOKENS: u32 = 20;
    pub const TEXT_FIELD: &str = "text";
    pub const LABEL_FIELD: &str = "label";
    pub const MAX_SEQ_LEN: u32 = 128;
    pub const MAX_NEW_TOKENS: u32 = 64;
    pub const NUM_BEAMS: u32 = 1;
    pub const BATCH_SIZE: u32 = 32;
    pub const EPOCHS: f64 = 1.0;
    pub const SEED: u64 = 42;
    pub const MAX_ATTEMPTS: u32 = super::DEFAULT_MAX_ATTEMPTS;
}

fn default_virtual_tokens() -> u32 {
    defaults::NUM_VIRTUAL_TOKENS
}
fn default_text_field() -> String {
    defaults::TEXT_FIELD.into()
}
fn default_label_field() -> String {
    defaults::LABEL_FIELD.into()
}
fn default_max_new_tokens() -> u32 {
    defaults::MAX_NEW_TOKENS
}
fn default_num_beams() -> u32 {
    defaults::NUM_BEAMS
}
fn default_max_seq_len() -> u32 {
    defaults::MAX_SEQ_LEN
}
fn default_batch_size() -> u32 {
    defaults::BATCH_SIZE
}
fn default_epochs() -> f64 {
    defaults::EPOCHS
}
fn default_seed() -> u64 {
    defaults::SEED
}
fn default_max_attempts() -> u32 {
    defaults::MAX_ATTEMPTS
}
