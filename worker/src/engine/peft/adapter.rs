//! A job's adapter, whatever its method: what it adds to a forward pass
//! (drawn once per pass) and what it saves.

use tch::Tensor;

use super::lora::{Lora, LoraHooks};
use super::p_tuning::PromptEncoder;
use super::prefix::{PrefixHooks, PrefixTuning};
use super::prompt_tuning::PromptTuning;
use crate::engine::models::hooks::Hooks;

/// A job's adapter on the shared frozen base.
pub enum Adapter {
    /// A prompt table prepended at the input: prompt tuning, or a P-tuning
    /// prompt loaded from an export.
    PromptTuning(PromptTuning),
    /// P-tuning's encoder, whose output is prepended at the input.
    PTuning(PromptEncoder),
    /// Key/value prefixes at every layer: prefix tuning and P-tuning v2.
    Prefix(PrefixTuning),
    /// Low-rank updates of the frozen linears.
    Lora(Lora),
}

/// What a job trains: an adapter on the shared frozen base, or (full
/// fine-tuning) its own trainable copy `M` of the base.
pub enum Trainable<M> {
    Adapter(Adapter),
    Full(M),
}

impl<M> Trainable<M> {
    /// The adapter, unless the job trains its own copy of the base.
    pub fn adapter(&self) -> Option<&Adapter> {
        match self {
            Trainable::Adapter(adapter) => Some(adapter),
            Trainable::Full(_) => None,
        }
    }

    /// The job's own copy of the base (full fine-tuning).
    pub fn own_base(&self) -> Option<&M> {
        match self {
            Trainable::Full(own) => Some(own),
            Trainable::Adapter(_) => None,
        }
    }

    /// The adapter drawn for a forward pass of `rows` examples; nothing for
    /// full fine-tuning.
    pub fn draw(&self, rows: i64, train: bool) -> DrawnAdapter<'_> {
        match self {
            Trainable::Adapter(adapter) => adapter.draw(rows, train),
            Trainable::Full(_) => DrawnAdapter { prompt: None, hooks: AdapterHooks::None },
        }
    }

    /// Virtual tokens the adapter prepends at the input (0 without a prompt).
    pub fn prompt_len(&self) -> i64 {
        self.adapter().map_or(0, Adapter::prompt_len)
    }
}

impl Adapter {
    /// Virtual tokens prepended at the input: prompt tuning's and P-tuning's
    /// (0 for prefixes and LoRA).
    pub fn prompt_len(&self) -> i64 {
        match self {
            Adapter::PromptTuning(prompt) => prompt.num_virtual_tokens(),
            Adapter::PTuning(encoder) => encoder.num_virtual_tokens(),
            Adapter::Prefix(_) | Adapter::Lora(_) => 0,
        }
    }

    /// The adapter for one forward pass over `rows` examples: its prompt
    /// `[nvt, hidden]` and its hooks. P-tuning's encoder dropout and prefix
    /// dropout draw here in training (from the active stream); LoRA's
    /// dropout draws in the pass.
    pub fn draw(&self, rows: i64, train: bool) -> DrawnAdapter<'_> {
        let prompt = match self {
            Adapter::PromptTuning(prompt) => Some(prompt.embeddings().shallow_clone()),
            Adapter::PTuning(encoder) => Some(encoder.prompt(train)),
            _ => None,
        };
        let hooks = match self {
            Adapter::Prefix(prefix) => AdapterHooks::Prefix(prefix.hooks(rows, train)),
            Adapter::Lora(lora) => AdapterHooks::Lora(lora.hooks(train)),
            _ => AdapterHooks::None,
        };
        DrawnAdapter { prompt, hooks }
    }

    /// The adapter's tensors under PEFT's key names: the prompt or prefixes
    /// as `prompt_embeddings` (an encoder's output, computed in eval mode),
    /// or the LoRA updates.
    pub fn peft_tensors(&self) -> Vec<(String, Tensor)> {
        let key = PromptTuning::WEIGHTS_KEY.to_string();
        tch::no_grad(|| match self {
            Adapter::PromptTuning(prompt) => vec![(key, prompt.embeddings().shallow_clone())],
            Adapter::PTuning(encoder) => vec![(key, encoder.prompt(false))],
            Adapter::Prefix(prefix) => vec![(key, prefix.prefixes())],
            Adapter::Lora(lora) => lora.named_tensors(),
        })
    }
}

/// A job's adapter drawn for one forward pass.
pub struct DrawnAdapter<'a> {
    /// `[nvt, hidden]` virtual tokens to prepend at the input.
    pub prompt: Option<Tensor>,
    /// Prefixes or linear deltas for the forward.
    pub hooks: AdapterHooks<'a>,
}

/// The hooks of a drawn adapter.
pub enum AdapterHooks<'a> {
    None,
    Prefix(PrefixHooks),
    Lora(LoraHooks<'a>),
}

impl Hooks for AdapterHooks<'_> {
    fn prefix(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        match self {
            AdapterHooks::Prefix(hooks) => hooks.prefix(layer),
            _ => None,
        }
    }

    fn linear_delta(&self, layer: usize, module: &str, xs: &Tensor) -> Option<Tensor> {
        match self {
            AdapterHooks::Lora(hooks) => hooks.linear_delta(layer, module, xs),
            _ => None,
        }
    }

    fn has_linear_deltas(&self) -> bool {
        matches!(self, AdapterHooks::Lora(_))
    }
}
