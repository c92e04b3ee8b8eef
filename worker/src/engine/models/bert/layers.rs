//! The encoder's blocks, as Hugging Face's `BertEmbeddings`,
//! `BertSelfAttention`, `BertSelfOutput`/`BertOutput`, `BertLayer` and
//! `BertPooler` compute them, each over the packed rows of every member of
//! a pass (see `packing.rs`).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::config::BertConfig;
use super::packing::{member_dropout, member_linear, Part, Queries};
use crate::engine::models::layers::{dropout, Activation};
use crate::engine::rng::with_stream;

pub(super) struct BertEmbeddings {
    pub(super) word_embeddings: nn::Embedding,
    pub(super) position_embeddings: nn::Embedding,
    pub(super) token_type_embeddings: nn::Embedding,
    pub(super) layer_norm: nn::LayerNorm,
    pub(super) dropout: f64,
    /// Position id of the first token ([`BertConfig::position_offset`]).
    pub(super) position_offset: i64,
}

impl BertEmbeddings {
    pub(super) fn new(p: &nn::Path, cfg: &BertConfig) -> Self {
        let embedding = |name: &str, rows: i64| nn::embedding(p / name, rows, cfg.hidden_size, Default::default());
        let ln = nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() };
        Self {
            word_embeddings: embedding("word_embeddings", cfg.vocab_size),
            position_embeddings: embedding("position_embeddings", cfg.max_position_embeddings),
            token_type_embeddings: embedding("token_type_embeddings", cfg.type_vocab_size),
            layer_norm: nn::layer_norm(p / "LayerNorm", vec![cfg.hidden_size], ln),
            dropout: cfg.hidden_dropout_prob,
            position_offset: cfg.position_offset(),
        }
    }

    /// Packed `[tokens, hidden]` embeddings of every member. A member's
    /// positions run from its `past_len` (the key/value prefix length, as HF
    /// counts `past_key_values`) over whatever its `inputs_embeds` holds, as
    /// HF does when given `inputs_embeds`: a prepended prompt takes the
    /// first ones. RoBERTa's start `pad_token_id + 1` later (with a prefix,
    /// PEFT passes input ids, from which RoBERTa counts past the prefix
    /// too; prompts come with `past_len` 0).
    pub(super) fn forward(&self, parts: &[Part<'_>], train: bool) -> Tensor {
        let packed: Vec<Tensor> = parts
            .iter()
            .map(|part| {
                let member = part.member;
                let seq = member.inputs_embeds.size()[1];
                let device = member.inputs_embeds.device();
                let start = self.position_offset + part.past_len;
                let positions = Tensor::arange_start(start, start + seq, (Kind::Int64, device));
                // [seq, hidden], broadcast over the batch
                let position_embeds = self.position_embeddings.forward(&positions);
                let token_type_embeds = match &member.token_type_ids {
                    Some(ids) => self.token_type_embeddings.forward(ids),
                    None => self.token_type_embeddings.ws.get(0),
                };
                // Input embeddings (float32 from a prompt) take the weights' kind.
                let inputs_embeds = member.inputs_embeds.to_kind(position_embeds.kind());
                part.packing.pack(&(inputs_embeds + position_embeds + token_type_embeds))
            })
            .collect();
        let packed = if packed.len() == 1 { packed[0].shallow_clone() } else { Tensor::cat(&packed, 0) };
        member_dropout(&self.layer_norm.forward(&packed), self.dropout, parts, Queries::All, train)
    }
}

pub(super) struct BertSelfAttention {
    pub(super) query: nn::Linear,
    pub(super) key: nn::Linear,
    pub(super) value: nn::Linear,
    pub(super) heads: i64,
    pub(super) head_dim: i64,
    pub(super) dropout: f64,
}

impl BertSelfAttention {
    pub(super) fn new(p: &nn::Path, cfg: &BertConfig) -> Self {
        let h = cfg.hidden_size;
        Self {
            query: nn::linear(p / "query", h, h, Default::default()),
            key: nn::linear(p / "key", h, h, Default::default()),
            value: nn::linear(p / "value", h, h, Default::default()),
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            dropout: cfg.attention_probs_dropout_prob,
        }
    }

    /// `[tokens, hidden]` rows of every member in; `[tokens, hidden]` or
    /// `[batch, hidden]` out. Each member attends over its own keys, with
    /// its `prefix` keys and values (`[batch, heads, prefix, head_dim]`)
    /// before the sequence's own.
    pub(super) fn forward(&self, hidden: &Tensor, parts: &[Part<'_>], queries: Queries, layer: &Layer, train: bool) -> Tensor {
        let key = member_linear(&self.key, parts, Queries::All, layer.index, "key", hidden);
        let value = member_linear(&self.value, parts, Queries::All, layer.index, "value", hidden);
        let query = match queries {
            Queries::All => member_linear(&self.query, parts, queries, layer.index, "query", hidden),
            Queries::First => {
                let first = hidden.index_select(0, &layer.first_rows);
                member_linear(&self.query, parts, queries, layer.index, "query", &first)
            }
        };
        let (mut token_offset, mut query_offset) = (0, 0);
        let contexts: Vec<Tensor> = parts
            .iter()
            .zip(&layer.prefixes)
            .map(|(part, prefix)| {
                let rows = |xs: &Tensor| xs.narrow(0, token_offset, part.tokens);
                let key = rows(&key);
                let value = rows(&value);
                let query_rows = part.rows(queries);
                let query = query.narrow(0, query_offset, query_rows);
                token_offset += part.tokens;
                query_offset += query_rows;
                with_stream(part.member.stream, || self.attend(&query, &key, &value, part, prefix.as_ref(), queries, train))
            })
            .collect();
        if contexts.len() == 1 { contexts[0].shallow_clone() } else { Tensor::cat(&contexts, 0) }
    }

    /// One member's attention: packed query, key and value rows in, packed
    /// context rows out.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        part: &Part<'_>,
        prefix: Option<&(Tensor, Tensor)>,
        queries: Queries,
        train: bool,
    ) -> Tensor {
        let packing = &part.packing;
        let (b, s) = (packing.batch, packing.seq);
        // [batch, seq, hidden] -> [batch, heads, seq, head_dim]
        let split = |xs: Tensor, len: i64| xs.view([b, len, self.heads, self.head_dim]).transpose(1, 2);
        let mut key = split(packing.unpack(key), s);
        let mut value = split(packing.unpack(value), s);
        if let Some((prefix_key, prefix_value)) = prefix {
            // [batch, heads, prefix + seq, head_dim], the job's float32
            // prefixes cast to the weights' kind.
            key = Tensor::cat(&[prefix_key.to_kind(key.kind()), key], 2);
            value = Tensor::cat(&[prefix_value.to_kind(value.kind()), value], 2);
        }
        let query = match queries {
            Queries::All => split(packing.unpack(query), s),
            Queries::First => split(query.shallow_clone(), 1),
        };
        // [batch, heads, queries, head_dim]
        let context = if train && self.dropout > 0.0 {
            // Written out so that attention-probability dropout uses the fast
            // mask; libtorch's fused attention draws Bernoulli samples.
            let scale = 1.0 / (self.head_dim as f64).sqrt();
            // [batch, heads, queries, prefix + seq], float32 whatever the
            // weights' kind: the softmax of bfloat16 or float16 scores loses
            // the small probabilities.
            let scores = query.matmul(&key.transpose(-1, -2)).to_kind(Kind::Float) * scale + &packing.additive_mask;
            dropout(&scores.softmax(-1, Kind::Float), self.dropout, train).to_kind(value.kind()).matmul(&value)
        } else {
            let mask = Some(&packing.key_mask);
            Tensor::scaled_dot_product_attention(&query, &key, &value, mask, 0.0, false, None, false)
        };
        let hidden_size = self.heads * self.head_dim;
        match queries {
            Queries::All => packing.pack(&context.transpose(1, 2).reshape([b, s, hidden_size])),
            Queries::First => context.reshape([b, hidden_size]),
        }
    }
}

/// A dense layer, dropout, residual and LayerNorm (`BertSelfOutput`, `BertOutput`).
pub(super) struct ResidualNorm {
    pub(super) dense: nn::Linear,
    pub(super) layer_norm: nn::LayerNorm,
    pub(super) dropout: f64,
}

impl ResidualNorm {
    pub(super) fn new(p: &nn::Path, cfg: &BertConfig, in_dim: i64) -> Self {
        let ln = nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() };
        Self {
            dense: nn::linear(p / "dense", in_dim, cfg.hidden_size, Default::default()),
            layer_norm: nn::layer_norm(p / "LayerNorm", vec![cfg.hidden_size], ln),
            dropout: cfg.hidden_dropout_prob,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &self,
        xs: &Tensor,
        residual: &Tensor,
        parts: &[Part<'_>],
        queries: Queries,
        layer: &Layer,
        module: &str,
        train: bool,
    ) -> Tensor {
        let xs = member_linear(&self.dense, parts, queries, layer.index, module, xs);
        let xs = member_dropout(&xs, self.dropout, parts, queries, train);
        self.layer_norm.forward(&(xs + residual))
    }
}

pub(super) struct BertLayer {
    pub(super) attention: BertSelfAttention,
    pub(super) attention_output: ResidualNorm,
    pub(super) intermediate: nn::Linear,
    pub(super) activation: Activation,
    pub(super) output: ResidualNorm,
}

impl BertLayer {
    pub(super) fn new(p: &nn::Path, cfg: &BertConfig) -> Self {
        let attention = p / "attention";
        Self {
            attention: BertSelfAttention::new(&(&attention / "self"), cfg),
            attention_output: ResidualNorm::new(&(&attention / "output"), cfg, cfg.hidden_size),
            intermediate: nn::linear(p / "intermediate" / "dense", cfg.hidden_size, cfg.intermediate_size, Default::default()),
            activation: Activation::parse(&cfg.hidden_act).expect("config checked on load"),
            output: ResidualNorm::new(&(p / "output"), cfg, cfg.intermediate_size),
        }
    }

    pub(super) fn forward(&self, hidden: &Tensor, parts: &[Part<'_>], queries: Queries, layer: &Layer, train: bool) -> Tensor {
        let context = self.attention.forward(hidden, parts, queries, layer, train);
        let residual = match queries {
            Queries::All => hidden.shallow_clone(),
            Queries::First => hidden.index_select(0, &layer.first_rows),
        };
        let attended =
            self.attention_output.forward(&context, &residual, parts, queries, layer, "attention.output.dense", train);
        let intermediate =
            member_linear(&self.intermediate, parts, queries, layer.index, "intermediate.dense", &attended);
        let intermediate = self.activation.apply(&intermediate);
        self.output.forward(&intermediate, &attended, parts, queries, layer, "output.dense", train)
    }

    /// The layer's tensors in declaration order.
    pub(super) fn tensors(&self) -> Vec<&Tensor> {
        let a = &self.attention;
        let mut tensors = Vec::new();
        for linear in [&a.query, &a.key, &a.value, &self.attention_output.dense] {
            tensors.extend(linear_tensors(linear));
        }
        tensors.extend(layer_norm_tensors(&self.attention_output.layer_norm));
        tensors.extend(linear_tensors(&self.intermediate));
        tensors.extend(linear_tensors(&self.output.dense));
        tensors.extend(layer_norm_tensors(&self.output.layer_norm));
        tensors
    }
}

/// What one layer's forward needs besides its input: its index, each
/// member's key/value prefix for it, and (for [`Queries::First`]) the row
/// of every member's position 0.
pub(super) struct Layer {
    pub(super) index: usize,
    pub(super) prefixes: Vec<Option<(Tensor, Tensor)>>,
    pub(super) first_rows: Tensor,
}

pub(super) fn linear_tensors(linear: &nn::Linear) -> impl Iterator<Item = &Tensor> {
    std::iter::once(&linear.ws).chain(linear.bs.as_ref())
}

pub(super) fn layer_norm_tensors(norm: &nn::LayerNorm) -> impl Iterator<Item = &Tensor> {
    norm.ws.iter().chain(norm.bs.as_ref())
}

pub(super) struct BertPooler {
    pub(super) dense: nn::Linear,
}

impl BertPooler {
    pub(super) fn new(p: &nn::Path, cfg: &BertConfig) -> Self {
        Self { dense: nn::linear(p / "dense", cfg.hidden_size, cfg.hidden_size, Default::default()) }
    }

    pub(super) fn forward(&self, first: &Tensor) -> Tensor {
        self.dense.forward(first).tanh()
    }
}
