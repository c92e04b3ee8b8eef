//! Key/value prefixes at every layer: prefix tuning (Li & Liang 2021,
//! <https://arxiv.org/abs/2101.00190>) as Hugging Face PEFT's `PREFIX_TUNING`
//! (`PrefixEncoder`), with or without its MLP reparameterization (embedding,
//! Linear, Tanh, Linear), and P-tuning v2 (Liu et al. 2022,
//! <https://arxiv.org/abs/2110.07602>): the same prefixes learned directly,
//! with dropout on them in training, exported as `PREFIX_TUNING`.
//!
//! The prefixes of all layers form one `[num_virtual_tokens, num_layers * 2 *
//! hidden]` tensor, indexed `((layer * 2 + kv) * heads + head) * head_dim + i`
//! as PEFT lays out `past_key_values`.

use tch::nn::{self, Module};
use tch::Tensor;

use super::p_tuning::torch_linear;
use crate::engine::models::layers::dropout;
use crate::engine::models::hooks::Hooks;

/// Shape of the prefixes: the model's layers, heads and hidden size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixShape {
    pub num_virtual_tokens: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub token_dim: i64,
}

impl PrefixShape {
    /// Width of one virtual token's prefixes over every layer.
    pub fn width(&self) -> i64 {
        self.num_layers * 2 * self.token_dim
    }
}

enum Source {
    /// The prefixes themselves (PEFT without `prefix_projection`, P-tuning v2,
    /// and any export loaded back).
    Direct(Tensor),
    /// A `[nvt, hidden]` table through Linear, Tanh, Linear (`transform.0`, `transform.2`).
    Projected { embedding: Tensor, first: nn::Linear, second: nn::Linear },
}

/// The trainable prefixes of one job.
pub struct PrefixTuning {
    source: Source,
    shape: PrefixShape,
    /// Dropout on the prefixes in training (P-tuning v2).
    dropout: f64,
    /// Hidden size of the projection, when there is one.
    projection_hidden: Option<i64>,
}

impl PrefixTuning {
    /// Declares the prefixes under `p` (PEFT's `prompt_encoder.<adapter>`):
    /// `embedding.weight` N(0, 1) as `nn.Embedding`, plus `transform.*` as
    /// PyTorch initialises linears when `projection_hidden` is set.
    pub fn new(p: &nn::Path, shape: PrefixShape, projection_hidden: Option<i64>, dropout: f64) -> Self {
        let nvt = shape.num_virtual_tokens;
        let source = match projection_hidden {
            None => Source::Direct((p / "embedding").randn_standard("weight", &[nvt, shape.width()])),
            Some(hidden) => {
                let transform = p / "transform";
                Source::Projected {
                    embedding: (p / "embedding").randn_standard("weight", &[nvt, shape.token_dim]),
                    first: torch_linear(&transform / 0, shape.token_dim, hidden),
                    second: torch_linear(&transform / 2, hidden, shape.width()),
                }
            }
        };
        Self { source, shape, dropout, projection_hidden }
    }

    pub fn shape(&self) -> PrefixShape {
        self.shape
    }

    pub fn projection_hidden(&self) -> Option<i64> {
        self.projection_hidden
    }

    /// `[num_virtual_tokens, num_layers * 2 * hidden]` prefixes: what PEFT
    /// saves as `prompt_embeddings` (the projection's output when there is one).
    pub fn prefixes(&self) -> Tensor {
        match &self.source {
            Source::Direct(table) => table.shallow_clone(),
            Source::Projected { embedding, first, second } => second.forward(&first.forward(embedding).tanh()),
        }
    }

    /// The per-layer keys and values for a batch of `batch` examples.
    pub fn hooks(&self, batch: i64, train: bool) -> PrefixHooks {
        let PrefixShape { num_virtual_tokens: nvt, num_layers, num_heads, token_dim } = self.shape;
        let head_dim = token_dim / num_heads;
        // [nvt, layers * 2, heads, head_dim] -> [layers * 2, heads, nvt, head_dim]
        let kv = self.prefixes().view([nvt, num_layers * 2, num_heads, head_dim]).permute([1, 2, 0, 3]);
        let kv = if train && self.dropout > 0.0 {
            // Each example draws its own mask, as dropout over PEFT's
            // batch-expanded `past_key_values` does. [layers * 2, batch, heads, nvt, head_dim]
            let expanded = kv.unsqueeze(1).expand([num_layers * 2, batch, num_heads, nvt, head_dim], false);
            dropout(&expanded, self.dropout, true)
        } else {
            kv.unsqueeze(1).expand([num_layers * 2, batch, num_heads, nvt, head_dim], false)
        };
        PrefixHooks { kv }
    }
}

/// Prefixes of every layer for one batch.
pub struct PrefixHooks {
    /// `[layers * 2, batch, heads, nvt, head_dim]`: keys at `2 * layer`,
    /// values at `2 * layer + 1`.
    kv: Tensor,
}

impl Hooks for PrefixHooks {
    fn prefix(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let layer = layer as i64;
        Some((self.kv.get(2 * layer), self.kv.get(2 * layer + 1)))
    }
}
