//! The Llama family of decoders (Touvron et al. 2023,
//! <https://arxiv.org/abs/2302.13971>) as Hugging Face `LlamaForCausalLM`,
//! `MistralForCausalLM` and `Qwen2ForCausalLM` compute them: rotary position
//! embeddings (Su et al. 2021, <https://arxiv.org/abs/2104.09864>, with HF's
//! `rotate_half` layout), RMSNorm before attention and feed-forward, a SwiGLU
//! feed-forward, grouped-query attention (`num_key_value_heads`), biases on
//! q/k/v for Qwen2, and an LM head that is tied to the embeddings or not.
//! Variable names follow the checkpoint (`model.layers.N.self_attn.q_proj`,
//! `lm_head`).
//!
//! Hooks see the linears as `self_attn.q_proj`, `self_attn.k_proj`,
//! `self_attn.v_proj`, `self_attn.o_proj`, `mlp.gate_proj`, `mlp.up_proj` and
//! `mlp.down_proj` (their path inside a layer). Prefix keys are used as
//! given (not rotated), as Hugging Face treats `past_key_values`.
//!
//! The config, and what of it this model refuses with
//! [`EngineError::Model`], is in `config.rs`.

use std::path::Path;

use ptune_core::Precision;
use tch::nn;
use tch::{Device, Kind, Tensor};

pub use self::config::{LlamaConfig, RopeConfig, RopeScaling};
use super::decoder::{
    attend, extend_kv, head_logits, layer_prefixes, load_frozen, prefixed, AttentionContext, CausalDecoder, KvCache,
    PassLayout,
};
use super::hooks::{linear_with_delta, HookedLinear, Hooks, Linears};
use super::layers::Activation;
use super::safetensors::{checkpoint_tensor_names, load_checkpoint};
use crate::engine::error::EngineError;

mod config;

/// `weight * x / sqrt(mean(x^2) + eps)` over the last dimension, computed
/// in float32 and cast back to the input's kind before the weight, as Hugging
/// Face's `LlamaRMSNorm` does.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: &nn::Path, size: i64, eps: f64) -> Self {
        Self { weight: p.ones_no_train("weight", &[size]), eps }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let float = xs.to_kind(Kind::Float);
        let variance = float.square().mean_dim(-1, true, Kind::Float);
        (float * (variance + self.eps).rsqrt()).to_kind(xs.kind()) * &self.weight
    }
}

/// Rotary position embeddings for given positions.
struct Rotary {
    /// `[head_dim / 2]` float32.
    inv_freq: Tensor,
}

impl Rotary {
    /// `cos` and `sin`, each `[batch, 1, seq, head_dim]`, for `[batch, seq]`
    /// positions: computed in float32, then cast to `kind` (the weights'),
    /// as Hugging Face's rotary embedding returns them.
    fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let inv_freq = self.inv_freq.to_device(positions.device());
        // [batch, seq, head_dim / 2]
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }

    /// Rotates `[batch, heads, seq, head_dim]` queries or keys.
    fn apply(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = xs.size()[3] / 2;
        let rotated = Tensor::cat(&[-xs.narrow(3, half, half), xs.narrow(3, 0, half)], 3);
        xs * cos + rotated * sin
    }
}

struct LlamaAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    dropout: f64,
}

impl LlamaAttention {
    fn new(p: &nn::Path, cfg: &LlamaConfig) -> Self {
        let (qkv_bias, o_bias) = cfg.attention_biases();
        let linear = |name: &str, in_dim: i64, out_dim: i64, bias: bool| {
            nn::linear(p / name, in_dim, out_dim, nn::LinearConfig { bias, ..Default::default() })
        };
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        Self {
            q_proj: linear("q_proj", h, cfg.num_attention_heads * d, qkv_bias),
            k_proj: linear("k_proj", h, cfg.num_kv_heads() * d, qkv_bias),
            v_proj: linear("v_proj", h, cfg.num_kv_heads() * d, qkv_bias),
            o_proj: linear("o_proj", cfg.num_attention_heads * d, h, o_bias),
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_kv_heads(),
            head_dim: d,
            dropout: cfg.attention_dropout,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        xs: &Tensor,
        ctx: &AttentionContext,
        rope: &(Tensor, Tensor),
        past: Option<&(Tensor, Tensor)>,
        hooks: &dyn Hooks,
        layer: usize,
        train: bool,
    ) -> (Tensor, (Tensor, Tensor)) {
        let (batch, seq, _) = xs.size3().expect("hidden states are [batch, seq, hidden]");
        // [batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]
        let split = |t: Tensor, heads: i64| t.view([batch, seq, heads, self.head_dim]).transpose(1, 2);
        let query = split(linear_with_delta(&self.q_proj, hooks, layer, "self_attn.q_proj", xs), self.heads);
        let key = split(linear_with_delta(&self.k_proj, hooks, layer, "self_attn.k_proj", xs), self.kv_heads);
        let value = split(linear_with_delta(&self.v_proj, hooks, layer, "self_attn.v_proj", xs), self.kv_heads);
        let (cos, sin) = rope;
        let query = Rotary::apply(&query, cos, sin);
        let key = Rotary::apply(&key, cos, sin);
        let (key, value) = extend_kv(past, key, value);
        let scale = (self.head_dim as f64).powf(-0.5);
        let context = attend(&query, &key, &value, ctx, scale, self.dropout, train);
        (linear_with_delta(&self.o_proj, hooks, layer, "self_attn.o_proj", &context), (key, value))
    }
}

struct LlamaMlp {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
    activation: Activation,
}

impl LlamaMlp {
    fn new(p: &nn::Path, cfg: &LlamaConfig) -> Self {
        let config = nn::LinearConfig { bias: cfg.mlp_bias, ..Default::default() };
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Self {
            gate_proj: nn::linear(p / "gate_proj", h, i, config),
            up_proj: nn::linear(p / "up_proj", h, i, config),
            down_proj: nn::linear(p / "down_proj", i, h, config),
            activation: Activation::parse(&cfg.hidden_act).expect("config checked on load"),
        }
    }

    fn forward(&self, xs: &Tensor, hooks: &dyn Hooks, layer: usize) -> Tensor {
        let gate = self.activation.apply(&linear_with_delta(&self.gate_proj, hooks, layer, "mlp.gate_proj", xs));
        let up = linear_with_delta(&self.up_proj, hooks, layer, "mlp.up_proj", xs);
        linear_with_delta(&self.down_proj, hooks, layer, "mlp.down_proj", &(gate * up))
    }
}

struct LlamaLayer {
    input_layernorm: RmsNorm,
    self_attn: LlamaAttention,
    post_attention_layernorm: RmsNorm,
    mlp: LlamaMlp,
}

impl LlamaLayer {
    fn new(p: &nn::Path, cfg: &LlamaConfig) -> Self {
        Self {
            input_layernorm: RmsNorm::new(&(p / "input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps),
            self_attn: LlamaAttention::new(&(p / "self_attn"), cfg),
            post_attention_layernorm: RmsNorm::new(&(p / "post_attention_layernorm"), cfg.hidden_size, cfg.rms_norm_eps),
            mlp: LlamaMlp::new(&(p / "mlp"), cfg),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        xs: &Tensor,
        ctx: &AttentionContext,
        rope: &(Tensor, Tensor),
        past: Option<&(Tensor, Tensor)>,
        hooks: &dyn Hooks,
        layer: usize,
        train: bool,
    ) -> (Tensor, (Tensor, Tensor)) {
        let (attended, kv) =
            self.self_attn.forward(&self.input_layernorm.forward(xs), ctx, rope, past, hooks, layer, train);
        let xs = xs + attended;
        let out = &xs + self.mlp.forward(&self.post_attention_layernorm.forward(&xs), hooks, layer);
        (out, kv)
    }
}

/// The decoder body (`LlamaModel`): embeddings, layers and the final norm.
struct LlamaBody {
    embed_tokens: nn::Embedding,
    layers: Vec<LlamaLayer>,
    norm: RmsNorm,
}

impl LlamaBody {
    /// Declares `embed_tokens`, `layers.N.*` and `norm` under `p`.
    fn new(p: &nn::Path, cfg: &LlamaConfig) -> Self {
        let layers_path = p / "layers";
        Self {
            embed_tokens: nn::embedding(p / "embed_tokens", cfg.vocab_size, cfg.hidden_size, Default::default()),
            layers: (0..cfg.num_hidden_layers).map(|i| LlamaLayer::new(&(&layers_path / i), cfg)).collect(),
            norm: RmsNorm::new(&(p / "norm"), cfg.hidden_size, cfg.rms_norm_eps),
        }
    }
}

/// A Llama-family causal LM, frozen.
pub struct LlamaModel {
    config: LlamaConfig,
    model: LlamaBody,
    rotary: Rotary,
    /// `[vocab, hidden]` untied head (`lm_head.weight`); `None` when tied.
    lm_head: Option<Tensor>,
    /// Owns the tensors above when they are frozen; `None` for a trainable
    /// copy, whose job owns them.
    _weights: Option<nn::VarStore>,
}

impl LlamaModel {
    /// Loads a Llama, Mistral or Qwen2 folder (`config.json` and
    /// `model.safetensors` or a sharded checkpoint with
    /// `model.safetensors.index.json`) onto `device` as float32, frozen.
    /// Weights may be stored under `model.` (`*ForCausalLM`) or bare
    /// (`LlamaModel`); bf16 and f16 checkpoints are converted.
    pub fn load(dir: &Path, device: Device) -> Result<Self, EngineError> {
        Self::load_in(dir, device, Precision::Fp32)
    }

    /// Loads the folder as [`Self::load`] does, the frozen weights then
    /// converted to `precision`'s kind (see `decoder.rs`).
    pub fn load_in(dir: &Path, device: Device, precision: Precision) -> Result<Self, EngineError> {
        let (mut model, weights) = load_frozen(device, precision, |weights| Self::load_into(dir, weights))?;
        model._weights = Some(weights);
        Ok(model)
    }

    /// Loads the folder into `weights` (empty until now), whose variables
    /// are then named as `LlamaForCausalLM` names its parameters.
    pub fn load_into(dir: &Path, weights: &nn::VarStore) -> Result<Self, EngineError> {
        let config = LlamaConfig::from_dir(dir)?;
        let rope = config.rope()?;
        let names = checkpoint_tensor_names(dir)?;
        let prefix = ["model.", ""]
            .into_iter()
            .find(|prefix| names.contains(&prefixed(prefix, "embed_tokens.weight")))
            .ok_or_else(|| {
                EngineError::Model(format!(
                    "{} has no model.embed_tokens.weight; expected a Llama-family checkpoint",
                    dir.display()
                ))
            })?;
        let root = weights.root();
        let model = LlamaBody::new(&(&root / "model"), &config);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| (&root / "lm_head").zeros_no_train("weight", &[config.vocab_size, config.hidden_size]));
        load_checkpoint(weights, dir, &|name: &str| match name.strip_prefix("model.") {
            Some(rest) => prefixed(prefix, rest),
            None => name.to_string(),
        })?;
        let rotary = Rotary { inv_freq: rope.inv_freq(config.head_dim()).to_device(weights.device()) };
        Ok(Self { config, model, rotary, lm_head, _weights: None })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
}

impl CausalDecoder for LlamaModel {
    fn model_type(&self) -> &str {
        &self.config.model_type
    }

    fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    fn num_attention_heads(&self) -> i64 {
        self.config.num_attention_heads
    }

    fn num_kv_heads(&self) -> i64 {
        self.config.num_kv_heads()
    }

    fn head_dim(&self) -> i64 {
        self.config.head_dim()
    }

    fn max_positions(&self) -> i64 {
        self.config.max_position_embeddings
    }

    fn eos_token_ids(&self) -> &[i64] {
        &self.config.eos_token_id.0
    }

    fn word_embeddings(&self) -> &Tensor {
        &self.model.embed_tokens.ws
    }

    /// Attention and gated MLP projections.
    fn linears(&self) -> Linears {
        let cfg = &self.config;
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (q, kv) = (cfg.num_attention_heads * d, cfg.num_kv_heads() * d);
        let module = |path, in_dim, out_dim| HookedLinear { hook: path, path, in_dim, out_dim };
        Linears {
            layers: "model.layers".into(),
            num_layers: self.model.layers.len() as i64,
            modules: vec![
                module("self_attn.q_proj", h, q),
                module("self_attn.k_proj", h, kv),
                module("self_attn.v_proj", h, kv),
                module("self_attn.o_proj", q, h),
                module("mlp.gate_proj", h, i),
                module("mlp.up_proj", h, i),
                module("mlp.down_proj", i, h),
            ],
            transposed: false,
        }
    }

    fn forward_pass(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        hooks: &dyn Hooks,
        past: Option<&KvCache>,
        layout: &PassLayout,
        train: bool,
    ) -> (Tensor, KvCache) {
        let batch = inputs_embeds.size()[0];
        let kind = self.kind();
        let prefixes = layer_prefixes(hooks, self.model.layers.len(), batch, past, kind);
        let past_mask = layout.past_mask(&prefixes, past, batch, inputs_embeds.device());
        let ctx = AttentionContext::new(attention_mask, past_mask.as_ref(), self.config.sliding_window())
            .with_layout(layout);
        let rope = self.rotary.cos_sin(&ctx.positions, kind);
        // [batch, seq, hidden], in the weights' kind
        let mut hidden = inputs_embeds.to_kind(kind);
        let mut layers = Vec::with_capacity(self.model.layers.len());
        for (index, layer) in self.model.layers.iter().enumerate() {
            let layer_past = match past {
                Some(cache) => cache.layers[index].as_ref(),
                None => prefixes[index].as_ref(),
            };
            let (out, kv) = layer.forward(&hidden, &ctx, &rope, layer_past, hooks, index, train);
            hidden = out;
            layers.push(Some(kv));
        }
        (self.model.norm.forward(&hidden).to_kind(Kind::Float), KvCache { layers, mask: ctx.key_mask })
    }

    fn logits(&self, hidden: &Tensor) -> Tensor {
        head_logits(hidden, self.lm_head.as_ref().unwrap_or(&self.model.embed_tokens.ws))
    }
}
