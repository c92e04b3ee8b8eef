//! The config of the Llama family (`config.json` of Llama, Mistral and
//! Qwen2 checkpoints): the fields the model uses, what it refuses (a
//! `model_type` other than llama, mistral or qwen2; RoPE types other than
//! `default`, `linear` and `llama3`, e.g. `dynamic`, `yarn`, `longrope`;
//! per-layer RoPE parameters; `partial_rotary_factor` below 1; Qwen2
//! sliding-window layers (`use_sliding_window`); `pretraining_tp` above 1;
//! head counts that do not divide), and the rotary embedding settings it
//! resolves, with transformers' priorities between its 4.x and 5.x layouts.

use std::path::Path;

use ptune_core::ModelFamily;
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::engine::error::EngineError;
use crate::engine::models::config::{read_config, TokenIds};
use crate::engine::models::layers::Activation;

/// The fields of a Hugging Face Llama, Mistral or Qwen2 `config.json` the
/// model uses.
#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    /// Heads of keys and values; `num_attention_heads` when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    /// Per-head width; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// RoPE base (transformers 4 layout); `rope_parameters.rope_theta` in
    /// transformers 5 configs.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4 layout).
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// RoPE type, base and scaling (transformers 5 layout).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Biases on q/k/v/o (Llama); Qwen2 always has q/k/v biases and no o bias.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub attention_dropout: f64,
    /// Mistral's attention window; Qwen2's applies only with `use_sliding_window`.
    #[serde(default)]
    pub sliding_window: Option<i64>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub pretraining_tp: Option<i64>,
    #[serde(default)]
    pub bos_token_id: TokenIds,
    #[serde(default)]
    pub eos_token_id: TokenIds,
    #[serde(default)]
    pub pad_token_id: TokenIds,
}

fn default_hidden_act() -> String {
    "silu".into()
}
fn default_max_position_embeddings() -> i64 {
    2048
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// How rotary frequencies are derived from the base (HF `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `1 / theta^(2i / dim)`.
    Default,
    /// Default frequencies divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent interpolation.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// The resolved rotary embedding settings.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// `[dim / 2]` float32 inverse frequencies, computed as transformers does
    /// (float32 powers of the base, then the type's scaling).
    pub fn inv_freq(&self, dim: i64) -> Tensor {
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / dim as f64;
        let inv_freq = Tensor::pow_scalar(self.theta, &exponents).reciprocal();
        match self.scaling {
            RopeScaling::Default => inv_freq,
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let low_freq_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_freq_wavelen = original_max_position_embeddings / high_freq_factor;
                let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
                let low = wavelen.gt(low_freq_wavelen);
                let scaled = inv_freq.where_self(&low.logical_not(), &(&inv_freq / factor));
                let smooth = (wavelen.reciprocal() * original_max_position_embeddings - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                let smoothed: Tensor = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
                let medium = wavelen.ge(high_freq_wavelen).logical_and(&low.logical_not());
                smoothed.where_self(&medium, &scaled)
            }
        }
    }
}

impl LlamaConfig {

    /// Reads and checks `config.json` in a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self, EngineError> {
        let config: Self = read_config(dir, "a Llama-family")?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), EngineError> {
        if ModelFamily::of(&self.model_type) != Some(ModelFamily::Llama) {
            return Err(EngineError::Model(format!(
                "unsupported model_type {:?} for the Llama family; supported: {}",
                self.model_type,
                ModelFamily::Llama.type_names().join(", ")
            )));
        }
        Activation::parse(&self.hidden_act)?;
        let heads = self.num_attention_heads;
        if heads <= 0 || (self.head_dim.is_none() && self.hidden_size % heads != 0) {
            return Err(EngineError::Model(format!(
                "hidden_size {} is not a multiple of num_attention_heads {heads}",
                self.hidden_size
            )));
        }
        let kv_heads = self.num_kv_heads();
        if kv_heads <= 0 || heads % kv_heads != 0 {
            return Err(EngineError::Model(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        if self.head_dim() % 2 != 0 {
            return Err(EngineError::Model(format!("rotary embeddings need an even head_dim, got {}", self.head_dim())));
        }
        if self.pretraining_tp.unwrap_or(1) > 1 {
            return Err(EngineError::Model(format!(
                "unsupported pretraining_tp {}; supported: 1",
                self.pretraining_tp.unwrap_or(1)
            )));
        }
        if self.model_type == "qwen2" {
            let sliding_layers = self.layer_types.iter().flatten().any(|t| t == "sliding_attention");
            if self.use_sliding_window || sliding_layers {
                return Err(EngineError::Model(
                    "unsupported use_sliding_window = true for qwen2; supported: full attention in every layer".into(),
                ));
            }
        } else if let Some(types) = &self.layer_types {
            if let Some(other) = types.iter().find(|t| *t != "full_attention" && *t != "sliding_attention") {
                return Err(EngineError::Model(format!(
                    "unsupported layer type {other:?}; supported: full_attention, sliding_attention"
                )));
            }
        }
        self.rope()?;
        Ok(())
    }

    pub fn num_kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Biases of q/k/v and of o.
    pub(super) fn attention_biases(&self) -> (bool, bool) {
        if self.model_type == "qwen2" {
            (true, false)
        } else {
            (self.attention_bias, self.attention_bias)
        }
    }

    /// The attention window of every layer, if any (Mistral).
    pub(super) fn sliding_window(&self) -> Option<i64> {
        match self.model_type.as_str() {
            "mistral" => self.sliding_window,
            _ => None,
        }
    }

    /// Resolves the RoPE settings from `rope_parameters` (transformers 5),
    /// `rope_scaling` (transformers 4) and `rope_theta`, with transformers'
    /// priorities and its 10000 default base.
    pub fn rope(&self) -> Result<RopeConfig, EngineError> {
        let empty = serde_json::Map::new();
        let params = match self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()) {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(map)) => map,
            Some(other) => return Err(EngineError::Model(format!("rope_parameters must be an object, got {other}"))),
        };
        if params.values().any(Value::is_object) {
            return Err(EngineError::Model("unsupported per-layer rope_parameters; supported: one setting for every layer".into()));
        }
        let number = |key: &str| params.get(key).and_then(Value::as_f64);
        let partial = number("partial_rotary_factor").or(self.partial_rotary_factor).unwrap_or(1.0);
        if partial != 1.0 {
            return Err(EngineError::Model(format!("unsupported partial_rotary_factor {partial}; supported: 1.0")));
        }
        let theta = number("rope_theta").or(self.rope_theta).unwrap_or(10_000.0);
        let rope_type = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
        let required = |key: &str| {
            number(key).ok_or_else(|| EngineError::Model(format!("rope type {rope_type:?} needs a numeric {key}")))
        };
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: required("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")
                    .unwrap_or(self.max_position_embeddings as f64),
            },
            other => {
                return Err(EngineError::Model(format!(
                    "unsupported rope type {other:?}; supported: default, linear, llama3"
                )))
            }
        };
        Ok(RopeConfig { theta, scaling })
    }
}
