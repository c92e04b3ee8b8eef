//! BERT encoder (Devlin et al. 2019, <https://arxiv.org/abs/1810.04805>) as
//! Hugging Face `BertModel` computes it: embeddings (word + position + token
//! type, LayerNorm), post-LayerNorm transformer layers and the tanh pooler.
//! Variable names follow the checkpoint, so `model.safetensors` loads one to one.
//! RoBERTa (`RobertaModel`) is the same network with positions counted from
//! `pad_token_id + 1` ([`BertConfig::position_offset`]).
//!
//! The forward works on the batch's real tokens only: attention masks mark
//! padding, and every per-token operation (projections, feed-forward, layer
//! norms) runs on the packed `[tokens, hidden]` rows, while attention scatters
//! keys and values back into a padded `[batch, heads, seq, head_dim]` layout.
//! Outputs at real positions equal the padded computation; only work on
//! padding is skipped.
//!
//! A job's [`Hooks`] ride along with the forward: key/value prefixes are
//! placed before every layer's keys and values (as Hugging Face's
//! `past_key_values`, real tokens' positions then start after the prefix),
//! and low-rank deltas are added to the layer's linears.
//!
//! Several jobs can share one pass ([`BertModel::forward_members`]): their
//! real tokens are stacked into one set of rows, so the frozen linears and
//! layer norms run once over all of them, while each job's attention (with
//! its own padding, prompt length and prefix), its low-rank deltas and its
//! dropout (from its own stream) run on its own rows. A job's outputs are
//! then the same as when it runs alone, up to float rounding.
//!
//! The weights may be bfloat16 or float16 (a base loaded for
//! `training.precision` bf16 or fp16): the encoder then computes in that
//! kind, while everything that crosses its edges is float32. Input
//! embeddings (a job's prompt among them) and prefixes are cast to the
//! weights' kind as they enter, the inputs of low-rank deltas are cast to
//! float32 before they reach a job's parameters, attention probabilities are
//! computed in float32, and the last hidden state and the pooler's output
//! leave as float32. A job's parameters, gradients and optimizer state thus
//! stay float32 whatever the base computes in.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

pub use self::config::BertConfig;
use self::layers::{layer_norm_tensors, linear_tensors, BertEmbeddings, BertLayer, BertPooler, Layer};
pub use self::packing::Member;
use self::packing::{Packing, Part, Queries};
use super::hooks::Hooks;

mod config;
mod layers;
mod packing;

/// The BERT encoder, optionally with its pooler.
pub struct BertModel {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    pooler: Option<BertPooler>,
    hidden_size: i64,
}

impl BertModel {
    /// Declares the encoder's variables under `p` (`embeddings.*`,
    /// `encoder.layer.N.*`, and `pooler.dense.*` when `with_pooler`).
    pub fn new(p: &nn::Path, cfg: &BertConfig, with_pooler: bool) -> Self {
        let layers_path = p / "encoder" / "layer";
        Self {
            embeddings: BertEmbeddings::new(&(p / "embeddings"), cfg),
            layers: (0..cfg.num_hidden_layers).map(|i| BertLayer::new(&(&layers_path / i), cfg)).collect(),
            pooler: with_pooler.then(|| BertPooler::new(&(p / "pooler"), cfg)),
            hidden_size: cfg.hidden_size,
        }
    }

    pub fn hidden_size(&self) -> i64 {
        self.hidden_size
    }

    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// The kind the encoder's weights and inner activations have: float32,
    /// or bfloat16 or float16 for a base loaded in that precision.
    pub fn kind(&self) -> Kind {
        self.embeddings.word_embeddings.ws.kind()
    }

    /// `[vocab, hidden]` word embedding table, in the encoder's [`Self::kind`].
    pub fn word_embeddings(&self) -> &Tensor {
        &self.embeddings.word_embeddings.ws
    }

    /// `[batch, seq]` token ids -> `[batch, seq, hidden]` word embeddings,
    /// float32 whatever the encoder's kind.
    pub fn embed_ids(&self, input_ids: &Tensor) -> Tensor {
        self.embeddings.word_embeddings.forward(input_ids).to_kind(Kind::Float)
    }

    /// Last hidden state `[batch, seq, hidden]` for `inputs_embeds`
    /// `[batch, seq, hidden]` and `attention_mask` `[batch, seq]` (1 real,
    /// 0 padding); zeros at padding. Token types default to 0. `hooks` adds
    /// the job's prefixes and linear deltas.
    pub fn forward(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
        hooks: &dyn Hooks,
        train: bool,
    ) -> Tensor {
        let member = single(inputs_embeds, attention_mask, token_type_ids, hooks);
        self.forward_members(std::slice::from_ref(&member), false, train).remove(0)
    }

    /// Last hidden state at position 0 only, `[batch, hidden]`: what a
    /// pooled classifier needs. The last layer computes queries, attention
    /// output and feed-forward for that position alone. Position 0 of every
    /// example must be a real token.
    pub fn forward_first(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
        hooks: &dyn Hooks,
        train: bool,
    ) -> Tensor {
        let member = single(inputs_embeds, attention_mask, token_type_ids, hooks);
        self.forward_members(std::slice::from_ref(&member), true, train).remove(0)
    }

    /// One pass for several jobs' batches: each member's last hidden state,
    /// `[batch, seq, hidden]` with zeros at padding, or with `first_only`
    /// `[batch, hidden]` at position 0 (see [`BertModel::forward_first`]).
    pub fn forward_members(&self, members: &[Member<'_>], first_only: bool, train: bool) -> Vec<Tensor> {
        // Layer 0's prefixes are fetched first: their lengths shift the positions.
        let mut prefixes: Vec<Option<(Tensor, Tensor)>> = members.iter().map(|m| m.hooks.prefix(0)).collect();
        let parts: Vec<Part<'_>> = members
            .iter()
            .zip(&prefixes)
            .map(|(member, prefix)| {
                let past_len = prefix.as_ref().map_or(0, |(key, _)| key.size()[2]);
                let packing = Packing::new(&member.attention_mask).with_prefix(past_len);
                let tokens = packing.rows.size()[0];
                Part { member, packing, past_len, tokens }
            })
            .collect();
        let mut offset = 0;
        let first_rows: Vec<Tensor> = parts
            .iter()
            .map(|part| {
                let rows = &part.packing.first_rows + offset;
                offset += part.tokens;
                rows
            })
            .collect();
        let first_rows = Tensor::cat(&first_rows, 0);
        let mut hidden = self.embeddings.forward(&parts, train);
        let last = self.layers.len().saturating_sub(1);
        let mut queries = Queries::All;
        if first_only && self.layers.is_empty() {
            hidden = hidden.index_select(0, &first_rows);
            queries = Queries::First;
        }
        for (index, layer) in self.layers.iter().enumerate() {
            if index > 0 {
                prefixes = members.iter().map(|m| m.hooks.prefix(index)).collect();
            }
            for (part, prefix) in parts.iter().zip(&prefixes) {
                let len = prefix.as_ref().map_or(0, |(key, _)| key.size()[2]);
                assert_eq!(len, part.past_len, "every layer's prefix has the same length");
            }
            if first_only && index == last {
                queries = Queries::First;
            }
            let context = Layer { index, prefixes: std::mem::take(&mut prefixes), first_rows: first_rows.shallow_clone() };
            hidden = layer.forward(&hidden, &parts, queries, &context, train);
        }
        let mut offset = 0;
        parts
            .iter()
            .map(|part| {
                let len = part.rows(queries);
                let rows = if parts.len() == 1 { hidden.shallow_clone() } else { hidden.narrow(0, offset, len) };
                let rows = rows.to_kind(Kind::Float);
                offset += len;
                match queries {
                    Queries::All => part.packing.unpack(&rows),
                    Queries::First => rows,
                }
            })
            .collect()
    }

    /// Every weight of the encoder, in declaration order (embeddings, layers,
    /// pooler): what a full fine-tuning copy starts from, and what must stay
    /// unchanged in a frozen base.
    pub fn tensors(&self) -> Vec<Tensor> {
        let e = &self.embeddings;
        let mut tensors: Vec<&Tensor> =
            vec![&e.word_embeddings.ws, &e.position_embeddings.ws, &e.token_type_embeddings.ws];
        tensors.extend(layer_norm_tensors(&e.layer_norm));
        for layer in &self.layers {
            tensors.extend(layer.tensors());
        }
        if let Some(pooler) = &self.pooler {
            tensors.extend(linear_tensors(&pooler.dense));
        }
        tensors.into_iter().map(Tensor::shallow_clone).collect()
    }

    /// A trainable copy of this encoder declared under `p` (with the same
    /// variable names as [`BertModel::new`]), for full fine-tuning: the copy
    /// gets gradients and optimizer state, this encoder stays as it is.
    /// RoBERTa's copy has no pooler: its classifiers do not use one.
    pub fn trainable_copy(&self, p: &nn::Path, cfg: &BertConfig) -> BertModel {
        // The pooler comes last in `tensors()`, so the copy's may run out first.
        let copy = BertModel::new(p, cfg, self.pooler.is_some() && !cfg.is_roberta());
        tch::no_grad(|| {
            for (mut to, from) in copy.tensors().into_iter().zip(self.tensors()) {
                to.copy_(&from);
            }
        });
        copy
    }

    /// Pooler output `[batch, hidden]` (dense + tanh) of the position-0
    /// hidden state, float32; `None` for checkpoints without a pooler.
    pub fn pool(&self, first: &Tensor) -> Option<Tensor> {
        self.pooler.as_ref().map(|pooler| pooler.forward(&first.to_kind(self.kind())).to_kind(Kind::Float))
    }
}

/// A lone member drawing dropout from the global generator.
fn single<'a>(
    inputs_embeds: &Tensor,
    attention_mask: &Tensor,
    token_type_ids: Option<&Tensor>,
    hooks: &'a dyn Hooks,
) -> Member<'a> {
    Member {
        inputs_embeds: inputs_embeds.shallow_clone(),
        attention_mask: attention_mask.shallow_clone(),
        token_type_ids: token_type_ids.map(Tensor::shallow_clone),
        hooks,
        stream: None,
    }
}
