//! GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
//! Learners") as Hugging Face `GPT2LMHeadModel` computes it: learned
//! position embeddings, pre-LayerNorm blocks whose linears are stored as
//! `Conv1D` (`weight` `[in, out]`), the tanh GELU, a final LayerNorm and an
//! LM head tied to the word embeddings. Variable names follow the checkpoint
//! (`wte`, `h.N.attn.c_attn`, ...), with or without the `transformer.`
//! prefix that `GPT2LMHeadModel` checkpoints carry.
//!
//! Hooks see the linears as `attn.c_attn`, `attn.c_proj`, `mlp.c_fc` and
//! `mlp.c_proj` (their path inside a block), so that the two `c_proj` stay
//! apart; PEFT's `target_modules = ["c_proj"]` names both.

use std::path::Path;

use ptune_core::{ModelFamily, Precision};
use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use super::config::{read_config, TokenIds};
use super::decoder::{
    attend, extend_kv, head_logits, layer_prefixes, load_frozen, prefixed, AttentionContext, CausalDecoder, KvCache,
    PassLayout,
};
use super::hooks::{add_delta, HookedLinear, Hooks, Linears};
use super::layers::Activation;
use super::safetensors::{checkpoint_tensor_names, load_checkpoint};
use crate::engine::error::EngineError;

/// The fields of a Hugging Face GPT-2 `config.json` the model uses.
#[derive(Clone, Debug, Deserialize)]
pub struct Gpt2Config {
    pub model_type: String,
    pub vocab_size: i64,
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// Feed-forward width; `4 * n_embd` when absent.
    #[serde(default)]
    pub n_inner: Option<i64>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_dropout")]
    pub resid_pdrop: f64,
    #[serde(default = "default_dropout")]
    pub embd_pdrop: f64,
    #[serde(default = "default_dropout")]
    pub attn_pdrop: f64,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub add_cross_attention: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: TokenIds,
    #[serde(default)]
    pub eos_token_id: TokenIds,
    #[serde(default)]
    pub pad_token_id: TokenIds,
}

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

impl Gpt2Config {

    /// Reads and checks `config.json` in a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self, EngineError> {
        let config: Self = read_config(dir, "a GPT-2")?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), EngineError> {
        if ModelFamily::of(&self.model_type) != Some(ModelFamily::Gpt2) {
            return Err(EngineError::Model(format!(
                "unsupported model_type {:?} for GPT-2; supported: {}",
                self.model_type,
                ModelFamily::Gpt2.type_names().join(", ")
            )));
        }
        if self.add_cross_attention {
            return Err(EngineError::Model("unsupported add_cross_attention = true: only decoder-only GPT-2".into()));
        }
        Activation::parse(&self.activation_function)?;
        if self.n_head <= 0 || self.n_embd % self.n_head != 0 {
            return Err(EngineError::Model(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            )));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> i64 {
        self.n_embd / self.n_head
    }

    pub fn inner_dim(&self) -> i64 {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

/// A linear layer stored as Hugging Face `Conv1D` (GPT-2): `weight`
/// `[in, out]`, `bias` `[out]`.
struct Conv1d {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1d {
    fn new(p: &nn::Path, in_dim: i64, out_dim: i64) -> Self {
        Self { weight: p.zeros_no_train("weight", &[in_dim, out_dim]), bias: p.zeros_no_train("bias", &[out_dim]) }
    }

    /// `[..., in]` -> `[..., out]`, plus the hooks' delta for `module` of `layer`.
    fn forward(&self, hooks: &dyn Hooks, layer: usize, module: &str, xs: &Tensor) -> Tensor {
        add_delta(xs.matmul(&self.weight) + &self.bias, hooks, layer, module, xs)
    }
}

struct Gpt2Attention {
    c_attn: Conv1d,
    c_proj: Conv1d,
    heads: i64,
    head_dim: i64,
    scale: f64,
    attn_dropout: f64,
    resid_dropout: f64,
}

impl Gpt2Attention {
    fn new(p: &nn::Path, cfg: &Gpt2Config, layer: usize) -> Self {
        let h = cfg.n_embd;
        let mut scale = if cfg.scale_attn_weights { (cfg.head_dim() as f64).powf(-0.5) } else { 1.0 };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Self {
            c_attn: Conv1d::new(&(p / "c_attn"), h, 3 * h),
            c_proj: Conv1d::new(&(p / "c_proj"), h, h),
            heads: cfg.n_head,
            head_dim: cfg.head_dim(),
            scale,
            attn_dropout: cfg.attn_pdrop,
            resid_dropout: cfg.resid_pdrop,
        }
    }

    /// `[batch, seq, hidden]` in and out; also the layer's keys and values
    /// after the past ones, `[batch, heads, keys, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        xs: &Tensor,
        ctx: &AttentionContext,
        past: Option<&(Tensor, Tensor)>,
        hooks: &dyn Hooks,
        layer: usize,
        train: bool,
    ) -> (Tensor, (Tensor, Tensor)) {
        let (batch, seq, hidden) = xs.size3().expect("hidden states are [batch, seq, hidden]");
        let qkv = self.c_attn.forward(hooks, layer, "attn.c_attn", xs);
        // [batch, seq, hidden] -> [batch, heads, seq, head_dim]
        let split = |t: &Tensor| t.view([batch, seq, self.heads, self.head_dim]).transpose(1, 2);
        let parts = qkv.split(hidden, 2);
        let (query, key, value) = (split(&parts[0]), split(&parts[1]), split(&parts[2]));
        let (key, value) = extend_kv(past, key, value);
        let context = attend(&query, &key, &value, ctx, self.scale, self.attn_dropout, train);
        let out = self.c_proj.forward(hooks, layer, "attn.c_proj", &context);
        (ctx.dropout(&out, self.resid_dropout, train), (key, value))
    }
}

struct Gpt2Mlp {
    c_fc: Conv1d,
    c_proj: Conv1d,
    activation: Activation,
    dropout: f64,
}

impl Gpt2Mlp {
    fn new(p: &nn::Path, cfg: &Gpt2Config) -> Self {
        Self {
            c_fc: Conv1d::new(&(p / "c_fc"), cfg.n_embd, cfg.inner_dim()),
            c_proj: Conv1d::new(&(p / "c_proj"), cfg.inner_dim(), cfg.n_embd),
            activation: Activation::parse(&cfg.activation_function).expect("config checked on load"),
            dropout: cfg.resid_pdrop,
        }
    }

    fn forward(&self, xs: &Tensor, ctx: &AttentionContext, hooks: &dyn Hooks, layer: usize, train: bool) -> Tensor {
        let inner = self.activation.apply(&self.c_fc.forward(hooks, layer, "mlp.c_fc", xs));
        ctx.dropout(&self.c_proj.forward(hooks, layer, "mlp.c_proj", &inner), self.dropout, train)
    }
}

struct Gpt2Block {
    ln_1: nn::LayerNorm,
    attn: Gpt2Attention,
    ln_2: nn::LayerNorm,
    mlp: Gpt2Mlp,
}

impl Gpt2Block {
    fn new(p: &nn::Path, cfg: &Gpt2Config, layer: usize) -> Self {
        let ln = nn::LayerNormConfig { eps: cfg.layer_norm_epsilon, ..Default::default() };
        Self {
            ln_1: nn::layer_norm(p / "ln_1", vec![cfg.n_embd], ln),
            attn: Gpt2Attention::new(&(p / "attn"), cfg, layer),
            ln_2: nn::layer_norm(p / "ln_2", vec![cfg.n_embd], ln),
            mlp: Gpt2Mlp::new(&(p / "mlp"), cfg),
        }
    }

    fn forward(
        &self,
        xs: &Tensor,
        ctx: &AttentionContext,
        past: Option<&(Tensor, Tensor)>,
        hooks: &dyn Hooks,
        layer: usize,
        train: bool,
    ) -> (Tensor, (Tensor, Tensor)) {
        let (attended, kv) = self.attn.forward(&self.ln_1.forward(xs), ctx, past, hooks, layer, train);
        let xs = xs + attended;
        let out = &xs + self.mlp.forward(&self.ln_2.forward(&xs), ctx, hooks, layer, train);
        (out, kv)
    }
}

/// The GPT-2 body (`GPT2Model`): embeddings, blocks and the final norm.
struct Gpt2Transformer {
    wte: nn::Embedding,
    wpe: nn::Embedding,
    blocks: Vec<Gpt2Block>,
    ln_f: nn::LayerNorm,
}

impl Gpt2Transformer {
    /// Declares `wte`, `wpe`, `h.N.*` and `ln_f` under `p`.
    fn new(p: &nn::Path, cfg: &Gpt2Config) -> Self {
        let embedding = |name: &str, rows: i64| nn::embedding(p / name, rows, cfg.n_embd, Default::default());
        let blocks_path = p / "h";
        let ln = nn::LayerNormConfig { eps: cfg.layer_norm_epsilon, ..Default::default() };
        Self {
            wte: embedding("wte", cfg.vocab_size),
            wpe: embedding("wpe", cfg.n_positions),
            blocks: (0..cfg.n_layer as usize).map(|i| Gpt2Block::new(&(&blocks_path / i), cfg, i)).collect(),
            ln_f: nn::layer_norm(p / "ln_f", vec![cfg.n_embd], ln),
        }
    }
}

/// GPT-2 with its language-modelling head, frozen.
pub struct Gpt2Model {
    config: Gpt2Config,
    transformer: Gpt2Transformer,
    /// `[vocab, hidden]` untied head (`lm_head.weight`); `None` when tied to `wte`.
    lm_head: Option<Tensor>,
    /// Owns the tensors above when they are frozen (no gradients, no
    /// optimizer state); `None` for a trainable copy, whose job owns them.
    _weights: Option<nn::VarStore>,
}

impl Gpt2Model {
    /// Loads a GPT-2 folder (`config.json` and `model.safetensors`, or a
    /// sharded checkpoint) onto `device` as float32, frozen. Weight names may
    /// carry the `transformer.` prefix; other heads are ignored.
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
    /// are then named as `GPT2LMHeadModel` names its parameters.
    pub fn load_into(dir: &Path, weights: &nn::VarStore) -> Result<Self, EngineError> {
        let config = Gpt2Config::from_dir(dir)?;
        let names = checkpoint_tensor_names(dir)?;
        let prefix = ["", "transformer."]
            .into_iter()
            .find(|prefix| names.contains(&prefixed(prefix, "wte.weight")))
            .ok_or_else(|| {
                EngineError::Model(format!("{} has no wte.weight; expected a GPT-2 checkpoint", dir.display()))
            })?;
        let root = weights.root();
        let transformer = Gpt2Transformer::new(&(&root / "transformer"), &config);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| (&root / "lm_head").zeros_no_train("weight", &[config.vocab_size, config.n_embd]));
        load_checkpoint(weights, dir, &|name: &str| match name.strip_prefix("transformer.") {
            Some(rest) => prefixed(prefix, rest),
            None => name.to_string(),
        })?;
        Ok(Self { config, transformer, lm_head, _weights: None })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }
}

impl CausalDecoder for Gpt2Model {
    fn model_type(&self) -> &str {
        &self.config.model_type
    }

    fn hidden_size(&self) -> i64 {
        self.config.n_embd
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn num_layers(&self) -> usize {
        self.transformer.blocks.len()
    }

    fn num_attention_heads(&self) -> i64 {
        self.config.n_head
    }

    fn num_kv_heads(&self) -> i64 {
        self.config.n_head
    }

    fn head_dim(&self) -> i64 {
        self.config.head_dim()
    }

    fn max_positions(&self) -> i64 {
        self.config.n_positions
    }

    fn eos_token_ids(&self) -> &[i64] {
        &self.config.eos_token_id.0
    }

    fn word_embeddings(&self) -> &Tensor {
        &self.transformer.wte.ws
    }

    /// Every linear of a block, each a `Conv1D`.
    fn linears(&self) -> Linears {
        let (h, inner) = (self.config.n_embd, self.config.inner_dim());
        let module = |path, in_dim, out_dim| HookedLinear { hook: path, path, in_dim, out_dim };
        Linears {
            layers: "transformer.h".into(),
            num_layers: self.transformer.blocks.len() as i64,
            modules: vec![
                module("attn.c_attn", h, 3 * h),
                module("attn.c_proj", h, h),
                module("mlp.c_fc", h, inner),
                module("mlp.c_proj", inner, h),
            ],
            transposed: true,
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
        let prefixes = layer_prefixes(hooks, self.transformer.blocks.len(), batch, past, kind);
        let past_mask = layout.past_mask(&prefixes, past, batch, inputs_embeds.device());
        let ctx = AttentionContext::new(attention_mask, past_mask.as_ref(), None).with_layout(layout);
        // [batch, seq, hidden], in the weights' kind
        let embeds = inputs_embeds.to_kind(kind) + self.transformer.wpe.forward(&ctx.positions);
        let mut hidden = ctx.dropout(&embeds, self.config.embd_pdrop, train);
        let mut layers = Vec::with_capacity(self.transformer.blocks.len());
        for (layer, block) in self.transformer.blocks.iter().enumerate() {
            let layer_past = match past {
                Some(cache) => cache.layers[layer].as_ref(),
                None => prefixes[layer].as_ref(),
            };
            let (out, kv) = block.forward(&hidden, &ctx, layer_past, hooks, layer, train);
            hidden = out;
            layers.push(Some(kv));
        }
        let hidden = self.transformer.ln_f.forward(&hidden).to_kind(Kind::Float);
        (hidden, KvCache { layers, mask: ctx.key_mask })
    }

    fn logits(&self, hidden: &Tensor) -> Tensor {
        head_logits(hidden, self.lm_head.as_ref().unwrap_or(&self.transformer.wte.ws))
    }
}
