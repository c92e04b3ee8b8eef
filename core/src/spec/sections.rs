//! The sections of a spec (`[peft]`, `[data]`, `[generation]`,
//! `[training]`) with their defaults and the bounds of method settings.

use serde::{Deserialize, Serialize};

use super::defaults::{
    default_batch_size, default_epochs, default_label_field, default_max_new_tokens, default_max_seq_len,
    default_num_beams, default_seed, default_text_field, default_virtual_tokens,
};
use super::kinds::{EncoderType, Precision, PromptInit};
use super::parse::{labels_as_strings, parse_via_from_str};

/// Default LoRA rank, as in PEFT's `LoraConfig`.
pub const DEFAULT_LORA_R: u32 = 8;
/// Default LoRA scaling numerator, as in PEFT's `LoraConfig`.
pub const DEFAULT_LORA_ALPHA: f64 = 8.0;
/// Default LSTM depth of a P-tuning encoder, as in PEFT's `PromptEncoderConfig`.
pub const DEFAULT_ENCODER_NUM_LAYERS: u32 = 2;
/// Largest encoder hidden size and LoRA rank accepted.
pub const MAX_ENCODER_HIDDEN_SIZE: u32 = 65_536;
pub const MAX_LORA_R: u32 = 1024;

/// Method-specific settings. Fields that only apply to some methods are
/// optional and refused for the others, so a spec never carries a setting
/// that silently does nothing. Names follow Hugging Face PEFT's configs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeftConfig {
    /// Prompt or prefix length (every method but lora and full).
    #[serde(default = "default_virtual_tokens")]
    pub num_virtual_tokens: u32,
    /// Prompt initialisation (prompt_tuning).
    #[serde(default)]
    pub init: PromptInit,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_text: Option<String>,
    /// P-tuning's encoder; mlp when absent (p_tuning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_reparameterization_type: Option<EncoderType>,
    /// Hidden size of the P-tuning encoder or of the prefix projection; the
    /// model's hidden size when absent (p_tuning, prefix_tuning with
    /// prefix_projection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hidden_size: Option<u32>,
    /// LSTM layers of the P-tuning encoder; 2 when absent (p_tuning with lstm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_num_layers: Option<u32>,
    /// Dropout between the LSTM layers in training; 0 when absent (p_tuning with lstm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_dropout: Option<f64>,
    /// Reparameterizes the prefixes through embedding, Linear, Tanh, Linear;
    /// false when absent (prefix_tuning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_projection: Option<bool>,
    /// Dropout on the key/value prefixes in training; 0 when absent (p_tuning_v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_dropout: Option<f64>,
    /// LoRA rank; 8 when absent (lora).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<u32>,
    /// LoRA scaling numerator (the update is scaled by `lora_alpha / r`);
    /// 8 when absent (lora).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Dropout on the input of the LoRA update in training; 0 when absent (lora).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// Linear layers that get a LoRA update, matched as PEFT matches them (a
    /// module whose name is the entry or ends with `.` and the entry); PEFT's
    /// default for the architecture when absent: `query`, `value` (BERT,
    /// RoBERTa), `c_attn` (GPT-2), `q_proj`, `v_proj` (Llama, Mistral,
    /// Qwen2) (lora).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<Vec<String>>,
}

impl Default for PeftConfig {
    fn default() -> Self {
        Self {
            num_virtual_tokens: default_virtual_tokens(),
            init: PromptInit::Random,
            init_text: None,
            encoder_reparameterization_type: None,
            encoder_hidden_size: None,
            encoder_num_layers: None,
            encoder_dropout: None,
            prefix_projection: None,
            prefix_dropout: None,
            r: None,
            lora_alpha: None,
            lora_dropout: None,
            target_modules: None,
        }
    }
}

impl PeftConfig {
    pub fn encoder_type(&self) -> EncoderType {
        self.encoder_reparameterization_type.unwrap_or_default()
    }

    /// The encoder's hidden size for a model of hidden size `token_dim`.
    pub fn encoder_hidden_size_for(&self, token_dim: u32) -> u32 {
        self.encoder_hidden_size.unwrap_or(token_dim)
    }

    pub fn encoder_num_layers(&self) -> u32 {
        self.encoder_num_layers.unwrap_or(DEFAULT_ENCODER_NUM_LAYERS)
    }

    pub fn encoder_dropout(&self) -> f64 {
        self.encoder_dropout.unwrap_or(0.0)
    }

    pub fn prefix_projection(&self) -> bool {
        self.prefix_projection.unwrap_or(false)
    }

    pub fn prefix_dropout(&self) -> f64 {
        self.prefix_dropout.unwrap_or(0.0)
    }

    pub fn lora_r(&self) -> u32 {
        self.r.unwrap_or(DEFAULT_LORA_R)
    }

    pub fn lora_alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(DEFAULT_LORA_ALPHA)
    }

    pub fn lora_dropout(&self) -> f64 {
        self.lora_dropout.unwrap_or(0.0)
    }
}

/// Where the examples come from. `train` and `eval` are file paths in a spec
/// file (relative to it) and `sha256:<hex>` dataset references once uploaded.
///
/// The fields name the JSON Lines fields by task:
/// - sequence classification: `text_field` a string, `label_field` one of `labels`;
/// - token classification: `text_field` a list of words, `label_field` one
///   tag per word, every tag among `labels`;
/// - causal LM: `text_field` the source (prompt) text, `label_field` the
///   target text; evaluation rows carry their reference outputs as a list in
///   `references_field` (or one in `label_field`); no `labels`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub train: String,
    pub eval: String,
    #[serde(default = "default_text_field")]
    pub text_field: String,
    #[serde(default = "default_label_field")]
    pub label_field: String,
    #[serde(default, deserialize_with = "labels_as_strings")]
    pub labels: Vec<String>,
    /// Causal LM: the evaluation rows' field with a list of references;
    /// `references` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub references_field: Option<String>,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: u32,
    #[serde(default)]
    pub max_train_examples: u64,
    #[serde(default)]
    pub max_eval_examples: u64,
}

/// How a causal-LM job decodes its evaluation inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    /// Most tokens generated per input (EOS included), 1 to 512.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: u32,
    /// 1: greedy search; 2 to 16: beam search with this many beams.
    #[serde(default = "default_num_beams")]
    pub num_beams: u32,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self { max_new_tokens: default_max_new_tokens(), num_beams: default_num_beams() }
    }
}

/// Largest `generation.num_beams`.
pub const MAX_BEAMS: u32 = 16;

/// Optimisation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub learning_rate: f64,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default = "default_epochs")]
    pub epochs: f64,
    #[serde(default)]
    pub max_steps: u64,
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Learning rate of the classification head; the main rate when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_learning_rate: Option<f64>,
    /// Steps between resume checkpoints besides those written at every
    /// evaluation (0: only at evaluations). Each is uploaded to the
    /// coordinator, so a retried job resumes from it on any worker.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub checkpoint_every: u64,
    /// Seconds without progress after which the worker fails the attempt
    /// retryably (0: the worker's default, sized from the spec).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stall_timeout_seconds: u64,
    /// The number format of the frozen base model (`fp32`, `bf16`, `fp16`);
    /// the job's trainable parameters, gradients and optimizer state stay
    /// float32 whatever it is.
    #[serde(default, skip_serializing_if = "Precision::is_default", deserialize_with = "parse_via_from_str")]
    pub precision: Precision,
    /// Devices one attempt trains on together, data parallel (1: one
    /// device). Each takes a fixed share of every batch; the gradients of
    /// the trainable parameters are summed across them before each step,
    /// so the result is that of one device running the whole batch.
    #[serde(default = "default_devices", skip_serializing_if = "is_one")]
    pub devices: u32,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn default_devices() -> u32 {
    1
}

fn is_one(value: &u32) -> bool {
    *value == 1
}
