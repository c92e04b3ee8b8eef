//! What a spec chooses from: the method, the task, the prompt's
//! initialisation, the P-tuning encoder, the pooling of the classification
//! head. Each parses from its TOML spelling and says what the others are.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::parse::{join, parse_via_from_str};

/// Parameter-efficient fine-tuning method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    PromptTuning,
    PTuning,
    PrefixTuning,
    PTuningV2,
    Lora,
    Full,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::PromptTuning,
        Method::PTuning,
        Method::PrefixTuning,
        Method::PTuningV2,
        Method::Lora,
        Method::Full,
    ];

    /// Methods the engine trains today.
    pub const SUPPORTED: [Method; 6] = Method::ALL;

    pub fn as_str(self) -> &'static str {
        match self {
            Method::PromptTuning => "prompt_tuning",
            Method::PTuning => "p_tuning",
            Method::PrefixTuning => "prefix_tuning",
            Method::PTuningV2 => "p_tuning_v2",
            Method::Lora => "lora",
            Method::Full => "full",
        }
    }

    /// Methods the engine trains for causal language modelling.
    pub const CAUSAL_LM: [Method; 6] =
        [Method::PromptTuning, Method::PTuning, Method::PrefixTuning, Method::PTuningV2, Method::Lora, Method::Full];

    /// True for methods whose length is set by `peft.num_virtual_tokens`.
    pub fn uses_virtual_tokens(self) -> bool {
        !matches!(self, Method::Lora | Method::Full)
    }

    /// True for methods that add key/value prefixes at every layer rather
    /// than virtual tokens at the input.
    pub fn uses_prefixes(self) -> bool {
        matches!(self, Method::PrefixTuning | Method::PTuningV2)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('-', "_");
        Method::ALL
            .into_iter()
            .find(|m| m.as_str() == wanted)
            .ok_or_else(|| format!("unknown method {s:?}; allowed: {}", join(&Method::ALL)))
    }
}

/// What the model learns to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    SequenceClassification,
    TokenClassification,
    CausalLm,
}

impl Task {
    pub const ALL: [Task; 3] = [Task::SequenceClassification, Task::TokenClassification, Task::CausalLm];

    /// Tasks the engine trains today.
    pub const SUPPORTED: [Task; 3] = Task::ALL;

    pub fn as_str(self) -> &'static str {
        match self {
            Task::SequenceClassification => "sequence_classification",
            Task::TokenClassification => "token_classification",
            Task::CausalLm => "causal_lm",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Task {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('-', "_");
        Task::ALL
            .into_iter()
            .find(|t| t.as_str() == wanted)
            .ok_or_else(|| format!("unknown task {s:?}; allowed: {}", join(&Task::ALL)))
    }
}

/// How a soft prompt is initialised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptInit {
    #[default]
    Random,
    Vocab,
    Text,
}

impl PromptInit {
    pub fn as_str(self) -> &'static str {
        match self {
            PromptInit::Random => "random",
            PromptInit::Vocab => "vocab",
            PromptInit::Text => "text",
        }
    }
}

/// The network that produces P-tuning's virtual tokens from a learned table
/// (PEFT `encoder_reparameterization_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderType {
    /// Linear, ReLU, Linear, ReLU, Linear.
    #[default]
    Mlp,
    /// A bidirectional LSTM followed by Linear, ReLU, Linear.
    Lstm,
}

impl EncoderType {
    pub fn as_str(self) -> &'static str {
        match self {
            EncoderType::Mlp => "mlp",
            EncoderType::Lstm => "lstm",
        }
    }
}

/// How a sequence classifier turns the encoder's last hidden state into one
/// vector for its head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Position 0, through the model's pooler (dense + tanh) when it has one,
    /// as Hugging Face's `BertForSequenceClassification` and
    /// `RobertaForSequenceClassification` do. With prompt tuning and P-tuning
    /// position 0 is the first virtual token, as in PEFT.
    #[default]
    Cls,
    /// The mean over the input's own tokens (virtual tokens excluded), as
    /// sentence-transformers pools models such as all-MiniLM-L6-v2; no
    /// pooler. Hugging Face's classes cannot express it, so an adapter
    /// trained this way evaluates as trained only in ptune.
    Mean,
}

impl Pooling {
    pub const ALL: [Pooling; 2] = [Pooling::Cls, Pooling::Mean];

    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
        }
    }
}

impl fmt::Display for Pooling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Pooling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Pooling::ALL
            .into_iter()
            .find(|p| p.as_str() == wanted)
            .ok_or_else(|| format!("unknown pooling {s:?}; allowed: {}", join(&Pooling::ALL)))
    }
}

/// The number format the frozen base model computes in. Trainable
/// parameters, their gradients and the optimizer state stay float32 in
/// every case; only the shared weights and the activations flowing through
/// them take the lower precision, and float16 adds dynamic loss scaling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Fp32,
    /// bfloat16: float32's range with 8 bits of mantissa; needs no loss scaling.
    Bf16,
    /// IEEE float16: 11 bits of mantissa but a range up to 65504, so the
    /// loss is scaled to keep small gradients from flushing to zero.
    Fp16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Bf16, Precision::Fp16];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    pub fn is_default(&self) -> bool {
        *self == Precision::Fp32
    }

    /// Bytes of one number of the frozen weights and their activations.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::Fp32 => 4,
            Precision::Bf16 | Precision::Fp16 => 2,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Precision::ALL
            .into_iter()
            .find(|p| p.as_str() == wanted)
            .ok_or_else(|| format!("unknown precision {s:?}; allowed: {}", join(&Precision::ALL)))
    }
}

/// Settings of the trained classification head.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// sequence_classification only: how the sequence is pooled.
    #[serde(default, deserialize_with = "parse_via_from_str")]
    pub pooling: Pooling,
}

impl HeadConfig {
    pub fn is_default(&self) -> bool {
        *self == HeadConfig::default()
    }
}
