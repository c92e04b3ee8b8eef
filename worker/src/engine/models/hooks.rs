//! What a job adds to a shared frozen base model's forward pass besides its
//! input embeddings: per-layer key/value prefixes (prefix tuning, P-tuning
//! v2) and low-rank deltas on linear layers (LoRA). Every architecture's
//! forward takes a `&dyn Hooks`, so the frozen weights stay shared while each
//! job's trainable tensors ride along with its batch.
//!
//! A model also says where such additions fit ([`HookSites`]): the width of
//! its input embeddings, the shape of every layer's keys and values, and the
//! linears it passes to [`Hooks::linear_delta`] ([`Linears`]). The adapters
//! are built to those shapes; the model knows no adapter.

use tch::Tensor;

/// Per-job additions to a base model's forward pass. Both methods default to
/// "nothing", so a method only implements what it injects.
pub trait Hooks {
    /// Key and value prefixes for decoder or encoder layer `layer`, each
    /// `[batch, kv_heads, prefix_len, head_dim]`, placed before the
    /// sequence's own keys and values (as Hugging Face's `past_key_values`).
    /// Keys are used as given: architectures with rotary positions do not
    /// rotate them. Every query may attend to every prefix position.
    fn prefix(&self, _layer: usize) -> Option<(Tensor, Tensor)> {
        None
    }

    /// Extra output added to linear `module` of layer `layer` given that
    /// module's input `xs` (`[..., in]` -> `[..., out]`). Module names are
    /// the checkpoint's own, e.g. `query`/`value` (BERT), `c_attn` (GPT-2),
    /// `q_proj`/`v_proj` (Llama).
    fn linear_delta(&self, _layer: usize, _module: &str, _xs: &Tensor) -> Option<Tensor> {
        None
    }

    /// True when [`Self::linear_delta`] may return a delta: models ask for
    /// deltas only then (a bf16 base casts a linear's input to float32 for
    /// them), and a pass shared by several jobs routes linears only to the
    /// jobs that change them.
    fn has_linear_deltas(&self) -> bool {
        false
    }
}

/// A forward pass with nothing added: the plain base model, prompt tuning
/// and P-tuning v1 (which only change the input embeddings).
pub struct NoHooks;

impl Hooks for NoHooks {}

/// Applies a frozen linear layer plus the hooks' delta for it.
pub fn linear_with_delta(
    linear: &tch::nn::Linear,
    hooks: &dyn Hooks,
    layer: usize,
    module: &str,
    xs: &Tensor,
) -> Tensor {
    add_delta(tch::nn::Module::forward(linear, xs), hooks, layer, module, xs)
}

/// `out`, a frozen linear's output for `xs`, plus the hooks' delta for
/// `module` of `layer`, if [`Hooks::has_linear_deltas`]. The delta sees
/// `xs` as float32, the kind of a job's parameters, and is added in `out`'s
/// kind (that of a bf16 or fp16 base's weights).
pub fn add_delta(out: Tensor, hooks: &dyn Hooks, layer: usize, module: &str, xs: &Tensor) -> Tensor {
    if !hooks.has_linear_deltas() {
        return out;
    }
    match hooks.linear_delta(layer, module, &xs.to_kind(tch::Kind::Float)) {
        Some(delta) => {
            let delta = delta.to_kind(out.kind());
            out + delta
        }
        None => out,
    }
}

/// A linear layer of one model layer that [`Hooks::linear_delta`] may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookedLinear {
    /// The name the model's forward passes to [`Hooks::linear_delta`].
    pub hook: &'static str,
    /// The module's path inside a layer, as Hugging Face names it
    /// (`attention.self.query`, `attn.c_attn`, `self_attn.q_proj`).
    pub path: &'static str,
    pub in_dim: i64,
    pub out_dim: i64,
}

/// The linears of a model's layers that hooks may change.
#[derive(Clone, Debug)]
pub struct Linears {
    /// Path of the model's list of layers in the Hugging Face model
    /// (`bert.encoder.layer`, `transformer.h`, `model.layers`).
    pub layers: String,
    pub num_layers: i64,
    /// Every such linear of a layer, in the model's order.
    pub modules: Vec<HookedLinear>,
    /// True where the linears store `[in, out]` weights (GPT-2's `Conv1D`).
    pub transposed: bool,
}

impl Linears {
    /// The module's full name in layer 0 (`transformer.h.0.attn.c_attn`).
    pub fn full_name(&self, module: &HookedLinear) -> String {
        format!("{}.0.{}", self.layers, module.path)
    }
}

/// Where a job's additions fit a base model.
pub struct HookSites<'a> {
    /// Hugging Face `model_type` of the checkpoint.
    pub model_type: &'a str,
    /// `[vocab, hidden]` word embeddings: a prompt is rows of this width
    /// prepended to the input embeddings, and may start as copies of some.
    pub word_embeddings: &'a Tensor,
    pub vocab_size: i64,
    pub hidden_size: i64,
    /// Layers whose keys and values a prefix goes before.
    pub num_layers: i64,
    pub num_attention_heads: i64,
    /// Heads of the keys and values (fewer than the query heads with
    /// grouped-query attention), each `head_dim` wide: a prefix's shape.
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub linears: Linears,
}
