//! The config of BERT and RoBERTa (`config.json`): the fields the encoder
//! uses, with Hugging Face's defaults, what it refuses, and the linears of
//! a layer that hooks may change.

use std::path::Path;

use ptune_core::ModelFamily;
use serde::Deserialize;

use crate::engine::error::EngineError;
use crate::engine::models::config::read_config;
use crate::engine::models::hooks::{HookedLinear, Linears};
use crate::engine::models::layers::Activation;

/// The fields of a Hugging Face BERT `config.json` the encoder uses.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: i64,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: i64,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// Dropout before a classification head; `hidden_dropout_prob` when absent.
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// Id of the padding token; RoBERTa's position ids start after it.
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab_size() -> i64 {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}

impl BertConfig {

    /// RoBERTa (Liu et al. 2019): BERT's layers, with positions counted from
    /// `pad_token_id + 1` and a sequence classification head of its own
    /// (dense, tanh, projection) instead of the pooler.
    pub fn is_roberta(&self) -> bool {
        self.model_type == "roberta"
    }

    /// The encoder's module name in a Hugging Face `*For*` model (`bert`,
    /// `roberta`): its weights' prefix in such checkpoints and in exports.
    pub fn module_name(&self) -> &'static str {
        if self.is_roberta() { "roberta" } else { "bert" }
    }

    /// Position id of a sequence's first token: 0 for BERT; for RoBERTa
    /// `pad_token_id + 1`, as `create_position_ids_from_input_ids` counts.
    pub fn position_offset(&self) -> i64 {
        if self.is_roberta() { self.pad_token_id.unwrap_or(1) + 1 } else { 0 }
    }

    /// Longest sequence (virtual tokens included) the position table covers.
    pub fn max_positions(&self) -> i64 {
        self.max_position_embeddings - self.position_offset()
    }

    /// Reads and checks `config.json` in a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self, EngineError> {
        let config: Self = read_config(dir, "a BERT")?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), EngineError> {
        if ModelFamily::of(&self.model_type) != Some(ModelFamily::Bert) {
            return Err(EngineError::Model(format!(
                "unsupported model_type {:?}; supported: {}",
                self.model_type,
                ModelFamily::Bert.type_names().join(", ")
            )));
        }
        if self.position_embedding_type != "absolute" {
            return Err(EngineError::Model(format!(
                "unsupported position_embedding_type {:?}; supported: absolute",
                self.position_embedding_type
            )));
        }
        Activation::parse(&self.hidden_act)?;
        if self.max_positions() <= 0 {
            return Err(EngineError::Model(format!(
                "max_position_embeddings {} leaves no position after the padding offset {}",
                self.max_position_embeddings,
                self.position_offset()
            )));
        }
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(EngineError::Model(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }

    /// The linears of every layer: the names the layer passes to
    /// [`Hooks::linear_delta`](crate::engine::models::hooks::Hooks::linear_delta) (`query` lives in `attention.self`), with
    /// their paths and sizes.
    pub fn linears(&self) -> Linears {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let module = |hook, path, in_dim, out_dim| HookedLinear { hook, path, in_dim, out_dim };
        Linears {
            layers: format!("{}.encoder.layer", self.module_name()),
            num_layers: self.num_hidden_layers,
            modules: vec![
                module("query", "attention.self.query", h, h),
                module("key", "attention.self.key", h, h),
                module("value", "attention.self.value", h, h),
                module("attention.output.dense", "attention.output.dense", h, h),
                module("intermediate.dense", "intermediate.dense", h, i),
                module("output.dense", "output.dense", i, h),
            ],
            transposed: false,
        }
    }
}
