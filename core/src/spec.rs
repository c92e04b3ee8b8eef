//! Job specifications: what a user writes in a TOML file and what a worker
//! trains. Validation names the offending field and the allowed values, so a
//! bad spec is refused at submit time rather than failing on a worker.

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
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

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

    /// Checks every field that can be checked without reading the data.
    /// `limits` adds the model-dependent checks when the model is known.
    pub fn validate(&self, limits: Option<&ModelLimits>) -> Result<(), SpecError> {
        let name_len = self.name.chars().count();
        if name_len == 0 || name_len > 128 {
            return Err(SpecError::new("name", format!("must be 1 to 128 characters, got {name_len}")));
        }
        if self.base_model.trim().is_empty() {
            return Err(SpecError::new("base_model", "must name a base model served by a worker"));
        }
        self.validate_bounds()?;
        if !Task::SUPPORTED.contains(&self.task) {
            return Err(SpecError::new(
                "task",
                format!("{} is not supported yet; supported: {}", self.task, join(&Task::SUPPORTED)),
            ));
        }
        if !Method::SUPPORTED.contains(&self.method) {
            return Err(SpecError::new(
                "method",
                format!("{} is not supported yet; supported: {}", self.method, join(&Method::SUPPORTED)),
            ));
        }
        if self.task == Task::CausalLm && !Method::CAUSAL_LM.contains(&self.method) {
            return Err(SpecError::new(
                "method",
                format!(
                    "{} is not supported for causal_lm yet; supported: {}",
                    self.method,
                    join(&Method::CAUSAL_LM)
                ),
            ));
        }
        self.validate_generation()?;
        if self.head.pooling != Pooling::Cls && self.task != Task::SequenceClassification {
            return Err(SpecError::new(
                "head.pooling",
                format!("only applies to task sequence_classification; this job's task is {}", self.task),
            ));
        }
        self.validate_peft()?;
        self.validate_data(limits)?;
        self.validate_training()?;
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return Err(SpecError::new(
                "max_attempts",
                format!("must be between 1 and 100, got {}", self.max_attempts),
            ));
        }
        Ok(())
    }

    /// The length and character set of every text, and the range of every
    /// count, so that no request can store a value the rest cannot handle.
    fn validate_bounds(&self) -> Result<(), SpecError> {
        bounds::line("name", &self.name, 128)?;
        bounds::folder_name("base_model", &self.base_model)?;
        if !self.owner.is_empty() {
            bounds::line("owner", &self.owner, 64)?;
        }
        let data = &self.data;
        bounds::line("data.train", &data.train, 4096)?;
        bounds::line("data.eval", &data.eval, 4096)?;
        bounds::line("data.text_field", &data.text_field, 128)?;
        bounds::line("data.label_field", &data.label_field, 128)?;
        if let Some(field) = &data.references_field {
            bounds::line("data.references_field", field, 128)?;
        }
        if data.labels.len() > MAX_LABELS {
            return Err(SpecError::new("data.labels", format!("at most {MAX_LABELS} labels, got {}", data.labels.len())));
        }
        for (i, label) in data.labels.iter().enumerate() {
            bounds::line(&format!("data.labels[{i}]"), label, 256)?;
        }
        for (field, examples) in [("data.max_train_examples", data.max_train_examples), ("data.max_eval_examples", data.max_eval_examples)] {
            if examples > MAX_EXAMPLES {
                return Err(SpecError::new(field, format!("must be at most {MAX_EXAMPLES} (0: all), got {examples}")));
            }
        }
        if let Some(text) = &self.peft.init_text {
            bounds::paragraph("peft.init_text", text, 4096)?;
        }
        let t = &self.training;
        for (field, steps) in
            [("training.max_steps", t.max_steps), ("training.eval_every", t.eval_every), ("training.checkpoint_every", t.checkpoint_every)]
        {
            if steps > MAX_STEPS {
                return Err(SpecError::new(field, format!("must be at most {MAX_STEPS}, got {steps}")));
            }
        }
        if !(t.epochs.is_finite() && (0.0..=1000.0).contains(&t.epochs)) {
            return Err(SpecError::new("training.epochs", format!("must be between 0 and 1000, got {}", t.epochs)));
        }
        Ok(())
    }

    fn validate_generation(&self) -> Result<(), SpecError> {
        let Some(generation) = &self.generation else { return Ok(()) };
        if self.task != Task::CausalLm {
            return Err(SpecError::new("generation", format!("only applies to task causal_lm; this job's task is {}", self.task)));
        }
        check_range("generation.max_new_tokens", generation.max_new_tokens, 1, MAX_TOKENS)?;
        check_range("generation.num_beams", generation.num_beams, 1, MAX_BEAMS)
    }

    /// The job's decoding settings (defaults when the spec has none).
    pub fn generation(&self) -> GenerationConfig {
        self.generation.clone().unwrap_or_default()
    }

    fn validate_peft(&self) -> Result<(), SpecError> {
        let peft = &self.peft;
        let method = self.method;
        let nvt = peft.num_virtual_tokens;
        if method.uses_virtual_tokens() && !(1..=MAX_TOKENS).contains(&nvt) {
            return Err(SpecError::new(
                "peft.num_virtual_tokens",
                format!("prompt length must be between 1 and {MAX_TOKENS}, got {nvt}"),
            ));
        }
        let only_for = |field: &str, set: bool, methods: &[Method]| {
            if set && !methods.contains(&method) {
                return Err(SpecError::new(
                    format!("peft.{field}"),
                    format!("only applies to method {}; this job's method is {method}", join_or(methods)),
                ));
            }
            Ok(())
        };
        only_for("init", peft.init != PromptInit::Random, &[Method::PromptTuning])?;
        only_for("init_text", peft.init_text.is_some(), &[Method::PromptTuning])?;
        if peft.init == PromptInit::Text && peft.init_text.as_deref().is_none_or(|t| t.trim().is_empty()) {
            return Err(SpecError::new("peft.init_text", "must be a non-empty text when peft.init is \"text\""));
        }

        only_for("encoder_reparameterization_type", peft.encoder_reparameterization_type.is_some(), &[Method::PTuning])?;
        only_for("encoder_hidden_size", peft.encoder_hidden_size.is_some(), &[Method::PTuning, Method::PrefixTuning])?;
        only_for("prefix_projection", peft.prefix_projection.is_some(), &[Method::PrefixTuning])?;
        if method == Method::PrefixTuning && peft.encoder_hidden_size.is_some() && !peft.prefix_projection() {
            return Err(SpecError::new(
                "peft.encoder_hidden_size",
                "only applies with peft.prefix_projection = true; without it the prefixes are learned directly",
            ));
        }
        if let Some(size) = peft.encoder_hidden_size {
            check_range("peft.encoder_hidden_size", size, 1, MAX_ENCODER_HIDDEN_SIZE)?;
        }
        for (field, set) in [
            ("encoder_num_layers", peft.encoder_num_layers.is_some()),
            ("encoder_dropout", peft.encoder_dropout.is_some()),
        ] {
            only_for(field, set, &[Method::PTuning])?;
            if set && peft.encoder_type() != EncoderType::Lstm {
                return Err(SpecError::new(
                    format!("peft.{field}"),
                    "only applies with peft.encoder_reparameterization_type = \"lstm\"",
                ));
            }
        }
        if let Some(layers) = peft.encoder_num_layers {
            check_range("peft.encoder_num_layers", layers, 1, 8)?;
        }
        if let Some(p) = peft.encoder_dropout {
            check_probability("peft.encoder_dropout", p)?;
        }

        only_for("prefix_dropout", peft.prefix_dropout.is_some(), &[Method::PTuningV2])?;
        if let Some(p) = peft.prefix_dropout {
            check_probability("peft.prefix_dropout", p)?;
        }

        only_for("r", peft.r.is_some(), &[Method::Lora])?;
        only_for("lora_alpha", peft.lora_alpha.is_some(), &[Method::Lora])?;
        only_for("lora_dropout", peft.lora_dropout.is_some(), &[Method::Lora])?;
        only_for("target_modules", peft.target_modules.is_some(), &[Method::Lora])?;
        if let Some(r) = peft.r {
            check_range("peft.r", r, 1, MAX_LORA_R)?;
        }
        if let Some(alpha) = peft.lora_alpha {
            if !(alpha.is_finite() && alpha > 0.0 && alpha <= 1e5) {
                return Err(SpecError::new("peft.lora_alpha", format!("must be greater than 0 and at most 100000, got {alpha}")));
            }
        }
        if let Some(p) = peft.lora_dropout {
            check_probability("peft.lora_dropout", p)?;
        }
        if let Some(targets) = &peft.target_modules {
            if targets.is_empty() || targets.len() > 32 {
                return Err(SpecError::new(
                    "peft.target_modules",
                    format!("must list 1 to 32 module names, got {}", targets.len()),
                ));
            }
            for (i, target) in targets.iter().enumerate() {
                let valid = !target.is_empty()
                    && target.split('.').all(|part| {
                        !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    });
                if !valid {
                    return Err(SpecError::new(
                        "peft.target_modules",
                        format!("{target:?} is not a module name such as \"query\" or \"attention.output.dense\""),
                    ));
                }
                if targets[..i].contains(target) {
                    return Err(SpecError::new("peft.target_modules", format!("{target:?} is listed twice")));
                }
            }
        }
        Ok(())
    }

    fn validate_data(&self, limits: Option<&ModelLimits>) -> Result<(), SpecError> {
        let data = &self.data;
        if data.train.trim().is_empty() {
            return Err(SpecError::new("data.train", "must name the training file"));
        }
        if data.eval.trim().is_empty() {
            return Err(SpecError::new("data.eval", "must name the evaluation file"));
        }
        if self.task == Task::CausalLm {
            if !data.labels.is_empty() {
                return Err(SpecError::new(
                    "data.labels",
                    "causal_lm jobs have no labels (the target text is what is learned); remove data.labels",
                ));
            }
        } else if data.labels.len() < 2 {
            return Err(SpecError::new(
                "data.labels",
                format!("must list at least 2 labels, got {}", data.labels.len()),
            ));
        }
        if self.task != Task::CausalLm && data.references_field.is_some() {
            return Err(SpecError::new("data.references_field", format!("only applies to task causal_lm; this job's task is {}", self.task)));
        }
        if let Some(field) = &data.references_field {
            if field.trim().is_empty() {
                return Err(SpecError::new("data.references_field", "must name a field"));
            }
        }
        if let Some(dup) = data.labels.iter().enumerate().find(|(i, l)| data.labels[..*i].contains(l)) {
            return Err(SpecError::new("data.labels", format!("label {:?} is listed twice", dup.1)));
        }
        if self.task == Task::TokenClassification {
            let is_tag = |tag: &str| {
                tag == "O"
                    || ["B-", "I-", "E-", "S-"]
                        .iter()
                        .any(|scheme| tag.strip_prefix(scheme).is_some_and(|kind| !kind.trim().is_empty()))
            };
            if let Some(bad) = data.labels.iter().find(|tag| !is_tag(tag)) {
                return Err(SpecError::new(
                    "data.labels",
                    format!(
                        "token_classification tags are O or B-, I-, E-, S- and an entity type (e.g. \"B-person\"); got {bad:?}"
                    ),
                ));
            }
        }
        if !(1..=MAX_TOKENS).contains(&data.max_seq_len) {
            return Err(SpecError::new(
                "data.max_seq_len",
                format!("must be between 1 and {MAX_TOKENS}, got {}", data.max_seq_len),
            ));
        }
        if let Some(limits) = limits {
            // Virtual tokens take positions (prefixes too: the real tokens'
            // positions start after them, as in transformers), and so do the
            // tokens a causal LM generates after its input.
            let prompt = if self.method.uses_virtual_tokens() { self.peft.num_virtual_tokens } else { 0 };
            let generated = if self.task == Task::CausalLm { self.generation().max_new_tokens } else { 0 };
            let total = prompt + data.max_seq_len + generated;
            if total > limits.max_positions {
                let allowed = limits.max_positions.saturating_sub(data.max_seq_len + generated);
                let and_generated = if generated > 0 {
                    format!(" plus generation.max_new_tokens {generated}")
                } else {
                    String::new()
                };
                if prompt > 0 {
                    return Err(SpecError::new(
                        "peft.num_virtual_tokens",
                        format!(
                            "prompt length {prompt} plus data.max_seq_len {}{and_generated} exceeds the {} positions of {}; \
                             use at most {allowed} virtual tokens or a shorter max_seq_len",
                            data.max_seq_len, limits.max_positions, self.base_model
                        ),
                    ));
                }
                // No virtual tokens (LoRA, full fine-tuning): the sequence
                // and the generated tokens must share the positions.
                let shorter = match limits.max_positions.saturating_sub(generated) {
                    0 => format!("generate fewer than {} tokens", limits.max_positions),
                    room if generated > 0 => format!("use a max_seq_len of at most {room} or generate fewer tokens"),
                    room => format!("use a max_seq_len of at most {room}"),
                };
                return Err(SpecError::new(
                    "data.max_seq_len",
                    format!(
                        "data.max_seq_len {}{and_generated} exceeds the {} positions of {}; {shorter}",
                        data.max_seq_len, limits.max_positions, self.base_model
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_training(&self) -> Result<(), SpecError> {
        let t = &self.training;
        let lr_ok = |lr: f64| lr.is_finite() && lr > 0.0 && lr <= 10.0;
        if !lr_ok(t.learning_rate) {
            return Err(SpecError::new(
                "training.learning_rate",
                format!("must be greater than 0 and at most 10, got {}", t.learning_rate),
            ));
        }
        if let Some(head_lr) = t.head_learning_rate {
            if !lr_ok(head_lr) {
                return Err(SpecError::new(
                    "training.head_learning_rate",
                    format!("must be greater than 0 and at most 10, got {head_lr}"),
                ));
            }
        }
        if !(1..=MAX_BATCH_SIZE).contains(&t.batch_size) {
            return Err(SpecError::new(
                "training.batch_size",
                format!("must be between 1 and {MAX_BATCH_SIZE}, got {}", t.batch_size),
            ));
        }
        if t.max_steps == 0 && !(t.epochs.is_finite() && t.epochs > 0.0 && t.epochs <= 1000.0) {
            return Err(SpecError::new(
                "training.epochs",
                format!("must be greater than 0 and at most 1000 when max_steps is 0, got {}", t.epochs),
            ));
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return Err(SpecError::new(
                "training.warmup_ratio",
                format!("must be between 0 and 1, got {}", t.warmup_ratio),
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(SpecError::new(
                "training.weight_decay",
                format!("must be 0 or more, got {}", t.weight_decay),
            ));
        }
        if t.stall_timeout_seconds != 0 && !STALL_TIMEOUT_SECONDS.contains(&t.stall_timeout_seconds) {
            return Err(SpecError::new(
                "training.stall_timeout_seconds",
                format!(
                    "must be 0 (the worker's default) or between {} and {}, got {}",
                    STALL_TIMEOUT_SECONDS.start(),
                    STALL_TIMEOUT_SECONDS.end(),
                    t.stall_timeout_seconds
                ),
            ));
        }
        Ok(())
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

fn check_range(field: &str, value: u32, min: u32, max: u32) -> Result<(), SpecError> {
    if !(min..=max).contains(&value) {
        return Err(SpecError::new(field, format!("must be between {min} and {max}, got {value}")));
    }
    Ok(())
}

fn check_probability(field: &str, p: f64) -> Result<(), SpecError> {
    if !(p.is_finite() && (0.0..1.0).contains(&p)) {
        return Err(SpecError::new(field, format!("must be at least 0 and less than 1, got {p}")));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
        name = "sst2"
        base_model = "all-MiniLM-L6-v2"
        task = "sequence_classification"
        method = "prompt_tuning"
        [peft]
        num_virtual_tokens = 20
        [data]
        train = "train.jsonl"
        eval = "dev.jsonl"
        labels = [0, 1]
        max_seq_len = 64
        [training]
        learning_rate = 3e-2
    "#;

    fn field_of(spec: &JobSpec, limits: Option<&ModelLimits>) -> String {
        spec.validate(limits).unwrap_err().field
    }

    #[test]
    fn a_valid_spec_parses_with_defaults_and_numeric_labels() {
        let spec = JobSpec::from_toml(SPEC).unwrap();
        assert_eq!(spec.data.labels, ["0", "1"]);
        assert_eq!(spec.training.batch_size, 32);
        assert_eq!(spec.max_attempts, DEFAULT_MAX_ATTEMPTS);
        spec.validate(Some(&ModelLimits { max_positions: 512 })).unwrap();
        assert_eq!(spec.label_index(&serde_json::json!(1)), Some(1));
        assert_eq!(spec.label_index(&serde_json::json!(2)), None);
    }

    #[test]
    fn bad_fields_are_named_with_the_allowed_range() {
        let mut spec = JobSpec::from_toml(SPEC).unwrap();
        spec.peft.num_virtual_tokens = 0;
        let err = spec.validate(None).unwrap_err();
        assert_eq!(err.field, "peft.num_virtual_tokens");
        assert!(err.message.contains("between 1 and 512, got 0"), "{err}");

        let mut spec = JobSpec::from_toml(SPEC).unwrap();
        spec.peft.num_virtual_tokens = 500;
        assert_eq!(field_of(&spec, Some(&ModelLimits { max_positions: 512 })), "peft.num_virtual_tokens");

        let mut spec = JobSpec::from_toml(SPEC).unwrap();
        spec.training.learning_rate = 0.0;
        assert_eq!(field_of(&spec, None), "training.learning_rate");
    }

    #[test]
    fn unknown_methods_are_refused_with_the_allowed_list() {
        let text = SPEC.replace("\"prompt_tuning\"", "\"adapterfusion\"");
        let err = JobSpec::from_toml(&text).unwrap_err();
        assert!(err.message.contains("unknown method \"adapterfusion\""), "{err}");
        assert!(err.message.contains("prompt_tuning, p_tuning, prefix_tuning"), "{err}");
    }

    fn with_method(method: &str, peft: &str) -> Result<JobSpec, SpecError> {
        let text = SPEC.replace("\"prompt_tuning\"", &format!("{method:?}")).replace(
            "[peft]\n        num_virtual_tokens = 20",
            &format!("[peft]\n        num_virtual_tokens = 20\n{peft}"),
        );
        let spec = JobSpec::from_toml(&text)?;
        spec.validate(Some(&ModelLimits { max_positions: 512 }))?;
        Ok(spec)
    }

    #[test]
    fn method_settings_are_accepted_only_where_they_apply() {
        let spec = with_method("p_tuning", "encoder_reparameterization_type = \"lstm\"\nencoder_hidden_size = 64").unwrap();
        assert_eq!((spec.peft.encoder_type(), spec.peft.encoder_hidden_size_for(384)), (EncoderType::Lstm, 64));
        assert_eq!(spec.peft.encoder_num_layers(), DEFAULT_ENCODER_NUM_LAYERS);
        let spec = with_method("prefix_tuning", "prefix_projection = true\nencoder_hidden_size = 128").unwrap();
        assert!(spec.peft.prefix_projection());
        let spec = with_method("lora", "r = 4\nlora_alpha = 16\ntarget_modules = [\"query\", \"attention.output.dense\"]").unwrap();
        assert_eq!((spec.peft.lora_r(), spec.peft.lora_alpha()), (4, 16.0));
        with_method("p_tuning_v2", "prefix_dropout = 0.1").unwrap();
        with_method("full", "").unwrap();

        let refused = |method: &str, peft: &str| with_method(method, peft).unwrap_err();
        let err = refused("prompt_tuning", "encoder_hidden_size = 64");
        assert_eq!(err.to_string(), "peft.encoder_hidden_size: only applies to method p_tuning or prefix_tuning; this job's method is prompt_tuning");
        let err = refused("prefix_tuning", "encoder_hidden_size = 64");
        assert_eq!(err.field, "peft.encoder_hidden_size");
        assert!(err.message.contains("prefix_projection = true"), "{err}");
        assert_eq!(refused("p_tuning", "encoder_num_layers = 3").field, "peft.encoder_num_layers");
        assert_eq!(refused("lora", "prefix_dropout = 0.1").field, "peft.prefix_dropout");
        assert_eq!(refused("p_tuning", "init = \"vocab\"").field, "peft.init");
        let err = refused("lora", "r = 0");
        assert_eq!(err.to_string(), "peft.r: must be between 1 and 1024, got 0");
        let err = refused("lora", "lora_dropout = 1.0");
        assert_eq!(err.to_string(), "peft.lora_dropout: must be at least 0 and less than 1, got 1");
        assert_eq!(refused("lora", "target_modules = []").field, "peft.target_modules");
        assert_eq!(refused("lora", "target_modules = [\"query\", \"query\"]").field, "peft.target_modules");
        let err = refused("p_tuning", "encoder_reparameterization_type = \"gru\"");
        assert_eq!(err.field, "spec");
        assert!(err.message.contains("mlp") && err.message.contains("lstm"), "{err}");
    }

    /// Every example job in `examples/jobs/` parses and validates as written.
    #[test]
    fn every_example_job_is_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
        let (mut methods, mut tasks) = (Vec::new(), Vec::new());
        for entry in std::fs::read_dir(&dir).expect("examples/jobs exists") {
            let path = entry.expect("a directory entry").path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable");
            let spec = JobSpec::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            spec.validate(Some(&ModelLimits { max_positions: 512 }))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            methods.push(spec.method);
            tasks.push(spec.task);
        }
        for method in Method::ALL {
            assert!(methods.contains(&method), "no example job in {} uses method {method}", dir.display());
        }
        for task in Task::ALL {
            assert!(tasks.contains(&task), "no example job in {} has task {task}", dir.display());
        }
    }

    /// The spec with `task`, its `labels` line replaced by `lines`; a
    /// `[generation]` section in `lines` moves to the end.
    fn with_task(task: &str, lines: &str) -> Result<JobSpec, SpecError> {
        let (data, generation) = lines.split_once("[generation]").map_or((lines, ""), |(d, g)| (d, g));
        let mut text = SPEC.replace("\"sequence_classification\"", &format!("{task:?}")).replace("labels = [0, 1]\n", data);
        if !generation.is_empty() {
            text.push_str(&format!("[generation]{generation}"));
        }
        let spec = JobSpec::from_toml(&text)?;
        spec.validate(Some(&ModelLimits { max_positions: 512 }))?;
        Ok(spec)
    }

    #[test]
    fn token_classification_takes_bio_tags() {
        let spec = with_task("token_classification", "labels = [\"O\", \"B-person\", \"I-person\"]\n").unwrap();
        assert_eq!(spec.data.labels.len(), 3);
        let err = with_task("token_classification", "labels = [\"O\", \"person\"]\n").unwrap_err();
        assert_eq!(err.field, "data.labels");
        assert!(err.message.contains("\"person\""), "{err}");
        assert_eq!(with_task("token_classification", "labels = [\"O\"]\n").unwrap_err().field, "data.labels");
    }

    #[test]
    fn pooling_is_named_and_only_for_sequence_classification() {
        let spec = JobSpec::from_toml(&format!("{SPEC}[head]\npooling = \"mean\"\n")).unwrap();
        assert_eq!(spec.head.pooling, Pooling::Mean);
        assert_eq!(spec.to_json()["head"]["pooling"], "mean");
        let back: JobSpec = serde_json::from_value(spec.to_json()).unwrap();
        assert_eq!(back, spec);
        // The default is left out of the stored spec, and read back when absent.
        let plain = JobSpec::from_toml(SPEC).unwrap();
        assert_eq!(plain.head.pooling, Pooling::Cls);
        assert!(plain.to_json().get("head").is_none());

        let err = JobSpec::from_toml(&format!("{SPEC}[head]\npooling = \"max\"\n")).unwrap_err();
        assert!(err.message.contains("unknown pooling \"max\"; allowed: cls, mean"), "{err}");
        let mut tagger = with_task("token_classification", "labels = [\"O\", \"B-person\"]\n").unwrap();
        tagger.head.pooling = Pooling::Mean;
        let err = tagger.validate(None).unwrap_err();
        assert_eq!(err.to_string(), "head.pooling: only applies to task sequence_classification; this job's task is token_classification");
    }

    #[test]
    fn causal_lm_has_no_labels_and_counts_generated_tokens() {
        let spec = with_task("causal_lm", "\n[generation]\nmax_new_tokens = 32\nnum_beams = 4\n").unwrap();
        assert_eq!(spec.generation().num_beams, 4);
        assert!(spec.data.labels.is_empty());
        assert_eq!(with_task("sequence_classification", "").unwrap_err().field, "data.labels");
        let err = with_task("causal_lm", "labels = [0, 1]\n").unwrap_err();
        assert_eq!(err.field, "data.labels");
        assert_eq!(with_task("causal_lm", "\n[generation]\nnum_beams = 0\n").unwrap_err().field, "generation.num_beams");
        let err = with_task("sequence_classification", "labels = [0, 1]\n[generation]\nnum_beams = 2\n").unwrap_err();
        assert_eq!(err.to_string(), "generation: only applies to task causal_lm; this job's task is sequence_classification");
        let err = with_task("sequence_classification", "labels = [0, 1]\nreferences_field = \"refs\"\n").unwrap_err();
        assert_eq!(err.field, "data.references_field");

        // 20 virtual tokens + 64 + 64 generated = 148 positions.
        let spec = with_task("causal_lm", "\n[generation]\nmax_new_tokens = 64\n").unwrap();
        spec.validate(Some(&ModelLimits { max_positions: 148 })).unwrap();
        let err = spec.validate(Some(&ModelLimits { max_positions: 147 })).unwrap_err();
        assert_eq!(err.field, "peft.num_virtual_tokens");
        assert!(err.message.contains("plus generation.max_new_tokens 64 exceeds the 147 positions"), "{err}");

        let causal = |method: &str| {
            let text = SPEC.replace("\"prompt_tuning\"", &format!("{method:?}")).replace("\"sequence_classification\"", "\"causal_lm\"")
                .replace("num_virtual_tokens = 20", "").replace("labels = [0, 1]\n", "");
            JobSpec::from_toml(&text)?.validate(None)
        };
        causal("lora").expect("LoRA trains causal LMs");
        causal("full").expect("full fine-tuning trains causal LMs");

        // Without virtual tokens, the sequence and the generated tokens share the positions.
        let mut lora = JobSpec::from_toml(&SPEC.replace("\"prompt_tuning\"", "\"lora\"").replace("\"sequence_classification\"", "\"causal_lm\"")
            .replace("num_virtual_tokens = 20", "").replace("labels = [0, 1]\n", "")).unwrap();
        lora.data.max_seq_len = 32;
        let err = lora.validate(Some(&ModelLimits { max_positions: 48 })).unwrap_err();
        assert_eq!(
            err.to_string(),
            "data.max_seq_len: data.max_seq_len 32 plus generation.max_new_tokens 64 exceeds the 48 positions of all-MiniLM-L6-v2; \
             generate fewer than 48 tokens"
        );
        lora.generation = Some(GenerationConfig { max_new_tokens: 20, num_beams: 1 });
        let err = lora.validate(Some(&ModelLimits { max_positions: 48 })).unwrap_err();
        assert!(err.message.ends_with("use a max_seq_len of at most 28 or generate fewer tokens"), "{err}");
    }
}
