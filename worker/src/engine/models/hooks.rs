//! What a job adds to a shared frozen base model's forward pass besides its
//! input embeddings: per-layer key/value prefixes (prefix tuning, P-tuning
//! v2) and low-rank deltas on linear layers (LoRA). Every architecture's
//! forward takes a `&dyn Hooks`, so the frozen weights stay shared while each
//! job's trainable tensors ride along with its batch.

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

    /// True when [`Self::linear_delta`] may return a delta, so that a pass
    /// shared by several jobs routes linears only to the jobs that change them.
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
    let out = tch::nn::Module::forward(linear, xs);
    match hooks.linear_delta(layer, module, xs) {
        Some(delta) => out + delta,
        None => out,
    }
}
