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

use std::path::Path;

use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::hooks::Hooks;
use super::{dropout, CONFIG_FILE};
use crate::engine::rng::{with_stream, DropoutStream};
use crate::engine::EngineError;
use crate::engine::peft::lora::{LoraLayout, LoraModule};

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
    /// Model types whose checkpoints this encoder reads.
    pub const MODEL_TYPES: [&'static str; 2] = ["bert", "roberta"];

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
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| EngineError::Model(format!("cannot read {}: {e}", path.display())))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| EngineError::Model(format!("{} is not a BERT config: {e}", path.display())))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), EngineError> {
        if !Self::MODEL_TYPES.contains(&self.model_type.as_str()) {
            return Err(EngineError::Model(format!(
                "unsupported model_type {:?}; supported: {}",
                self.model_type,
                Self::MODEL_TYPES.join(", ")
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
}

#[derive(Clone, Copy, Debug)]
enum Activation {
    /// Exact GELU, `x * Φ(x)` with the error function (HF "gelu").
    Gelu,
    /// Tanh approximation of GELU (HF "gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self, EngineError> {
        match name {
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            other => Err(EngineError::Model(format!(
                "unsupported hidden_act {other:?}; supported: gelu, gelu_new, gelu_pytorch_tanh, relu"
            ))),
        }
    }

    fn apply(self, xs: &Tensor) -> Tensor {
        match self {
            Self::Gelu => xs.gelu("none"),
            Self::GeluTanh => xs.gelu("tanh"),
            Self::Relu => xs.relu(),
        }
    }
}

/// The real tokens of a right- or arbitrarily-padded batch, packed into rows.
struct Packing {
    batch: i64,
    seq: i64,
    /// `[tokens]` flat index `b * seq + s` of every real token, in order.
    rows: Tensor,
    /// `[batch]` row of each example's first position; valid when every
    /// example's position 0 is a real token.
    first_rows: Tensor,
    /// `[batch, 1, 1, prefix + seq]` true where a key may be attended to.
    key_mask: Tensor,
    /// `[batch, 1, 1, prefix + seq]` 0 where a key may be attended to, the
    /// lowest float elsewhere (HF's extended attention mask).
    additive_mask: Tensor,
}

impl Packing {
    fn new(attention_mask: &Tensor) -> Self {
        let (batch, seq) = attention_mask.size2().expect("attention mask is [batch, seq]");
        let mask = attention_mask.ne(0);
        let rows = mask.reshape([-1]).nonzero().squeeze_dim(1);
        let lengths = mask.sum_dim_intlist(1, false, Kind::Int64);
        let first_rows = lengths.cumsum(0, Kind::Int64) - &lengths;
        let key_mask = mask.view([batch, 1, 1, seq]);
        let additive_mask = key_mask.logical_not().to_kind(Kind::Float) * f64::from(f32::MIN);
        Self { batch, seq, rows, first_rows, key_mask, additive_mask }
    }

    /// Lets every query attend to `prefix` keys placed before the sequence's
    /// own (the attention mask extended with ones, as PEFT does).
    fn with_prefix(mut self, prefix: i64) -> Self {
        if prefix > 0 {
            let device = self.key_mask.device();
            let ones = Tensor::ones([self.batch, 1, 1, prefix], (Kind::Bool, device));
            self.key_mask = Tensor::cat(&[ones, self.key_mask], 3);
            let zeros = Tensor::zeros([self.batch, 1, 1, prefix], (self.additive_mask.kind(), device));
            self.additive_mask = Tensor::cat(&[zeros, self.additive_mask], 3);
        }
        self
    }

    /// `[batch, seq, n]` -> `[tokens, n]`.
    fn pack(&self, xs: &Tensor) -> Tensor {
        let n = xs.size()[2];
        xs.reshape([-1, n]).index_select(0, &self.rows)
    }

    /// `[tokens, n]` -> `[batch, seq, n]`, zeros at padding.
    fn unpack(&self, xs: &Tensor) -> Tensor {
        let n = xs.size()[1];
        Tensor::zeros([self.batch * self.seq, n], (xs.kind(), xs.device()))
            .index_copy(0, &self.rows, xs)
            .view([self.batch, self.seq, n])
    }
}

/// Which positions a layer computes outputs for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queries {
    /// Every real token: `[tokens, hidden]` out.
    All,
    /// Only each example's position 0: `[batch, hidden]` out. Keys and values
    /// still come from every real token.
    First,
}

struct BertEmbeddings {
    word_embeddings: nn::Embedding,
    position_embeddings: nn::Embedding,
    token_type_embeddings: nn::Embedding,
    layer_norm: nn::LayerNorm,
    dropout: f64,
    /// Position id of the first token ([`BertConfig::position_offset`]).
    position_offset: i64,
}

impl BertEmbeddings {
    fn new(p: &nn::Path, cfg: &BertConfig) -> Self {
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
    fn forward(&self, parts: &[Part<'_>], train: bool) -> Tensor {
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
                part.packing.pack(&(&member.inputs_embeds + position_embeds + token_type_embeds))
            })
            .collect();
        let packed = if packed.len() == 1 { packed[0].shallow_clone() } else { Tensor::cat(&packed, 0) };
        member_dropout(&self.layer_norm.forward(&packed), self.dropout, parts, Queries::All, train)
    }
}

struct BertSelfAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    heads: i64,
    head_dim: i64,
    dropout: f64,
}

impl BertSelfAttention {
    fn new(p: &nn::Path, cfg: &BertConfig) -> Self {
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
    fn forward(&self, hidden: &Tensor, parts: &[Part<'_>], queries: Queries, layer: &Layer, train: bool) -> Tensor {
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
            // [batch, heads, prefix + seq, head_dim]
            key = Tensor::cat(&[prefix_key, &key], 2);
            value = Tensor::cat(&[prefix_value, &value], 2);
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
            // [batch, heads, queries, prefix + seq]
            let scores = query.matmul(&key.transpose(-1, -2)) * scale + &packing.additive_mask;
            dropout(&scores.softmax(-1, scores.kind()), self.dropout, train).matmul(&value)
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
struct ResidualNorm {
    dense: nn::Linear,
    layer_norm: nn::LayerNorm,
    dropout: f64,
}

impl ResidualNorm {
    fn new(p: &nn::Path, cfg: &BertConfig, in_dim: i64) -> Self {
        let ln = nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() };
        Self {
            dense: nn::linear(p / "dense", in_dim, cfg.hidden_size, Default::default()),
            layer_norm: nn::layer_norm(p / "LayerNorm", vec![cfg.hidden_size], ln),
            dropout: cfg.hidden_dropout_prob,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
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

struct BertLayer {
    attention: BertSelfAttention,
    attention_output: ResidualNorm,
    intermediate: nn::Linear,
    activation: Activation,
    output: ResidualNorm,
}

impl BertLayer {
    fn new(p: &nn::Path, cfg: &BertConfig) -> Self {
        let attention = p / "attention";
        Self {
            attention: BertSelfAttention::new(&(&attention / "self"), cfg),
            attention_output: ResidualNorm::new(&(&attention / "output"), cfg, cfg.hidden_size),
            intermediate: nn::linear(p / "intermediate" / "dense", cfg.hidden_size, cfg.intermediate_size, Default::default()),
            activation: Activation::parse(&cfg.hidden_act).expect("config checked on load"),
            output: ResidualNorm::new(&(p / "output"), cfg, cfg.intermediate_size),
        }
    }

    fn forward(&self, hidden: &Tensor, parts: &[Part<'_>], queries: Queries, layer: &Layer, train: bool) -> Tensor {
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
    fn tensors(&self) -> Vec<&Tensor> {
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
struct Layer {
    index: usize,
    prefixes: Vec<Option<(Tensor, Tensor)>>,
    first_rows: Tensor,
}

/// One job's share of a forward pass through a shared encoder.
pub struct Member<'a> {
    /// `[batch, seq, hidden]` input embeddings, a prepended prompt included.
    pub inputs_embeds: Tensor,
    /// `[batch, seq]`: 1 at real tokens, 0 at padding.
    pub attention_mask: Tensor,
    /// `[batch, seq]` token types; all 0 when absent.
    pub token_type_ids: Option<Tensor>,
    /// The job's prefixes and linear deltas.
    pub hooks: &'a dyn Hooks,
    /// The job's dropout stream; `None` draws from the global generator.
    pub stream: Option<&'a DropoutStream>,
}

/// A member with its real-token layout.
struct Part<'a> {
    member: &'a Member<'a>,
    packing: Packing,
    /// Key/value prefix length: real tokens' positions start after it.
    past_len: i64,
    /// Real tokens of the member: its rows in the stacked `[tokens, hidden]`.
    tokens: i64,
}

impl Part<'_> {
    /// The member's rows in a stacked tensor of `queries` layout.
    fn rows(&self, queries: Queries) -> i64 {
        match queries {
            Queries::All => self.tokens,
            Queries::First => self.packing.batch,
        }
    }
}

/// Applies `f` to each member's rows of the stacked `xs` (`queries` layout)
/// with the member's dropout stream active, and stacks the results.
fn per_member(xs: &Tensor, parts: &[Part<'_>], queries: Queries, mut f: impl FnMut(&Part<'_>, &Tensor) -> Tensor) -> Tensor {
    if let [part] = parts {
        return with_stream(part.member.stream, || f(part, xs));
    }
    let mut offset = 0;
    let outs: Vec<Tensor> = parts
        .iter()
        .map(|part| {
            let rows = xs.narrow(0, offset, part.rows(queries));
            offset += part.rows(queries);
            with_stream(part.member.stream, || f(part, &rows))
        })
        .collect();
    Tensor::cat(&outs, 0)
}

/// Dropout with each member's rows masked from its own stream.
fn member_dropout(xs: &Tensor, p: f64, parts: &[Part<'_>], queries: Queries, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return xs.shallow_clone();
    }
    per_member(xs, parts, queries, |_, rows| dropout(rows, p, train))
}

/// A frozen linear over every member's rows, plus each member's delta for
/// it (LoRA) on its own rows.
fn member_linear(
    linear: &nn::Linear,
    parts: &[Part<'_>],
    queries: Queries,
    layer: usize,
    module: &str,
    xs: &Tensor,
) -> Tensor {
    let out = linear.forward(xs);
    let mut any = false;
    let mut offset = 0;
    let deltas: Vec<Option<Tensor>> = parts
        .iter()
        .map(|part| {
            let len = part.rows(queries);
            let rows = if parts.len() == 1 { xs.shallow_clone() } else { xs.narrow(0, offset, len) };
            offset += len;
            let delta = with_stream(part.member.stream, || part.member.hooks.linear_delta(layer, module, &rows));
            any |= delta.is_some();
            delta
        })
        .collect();
    if !any {
        return out;
    }
    if let [Some(delta)] = deltas.as_slice() {
        return out + delta;
    }
    let width = out.size()[1];
    let deltas: Vec<Tensor> = parts
        .iter()
        .zip(deltas)
        .map(|(part, delta)| {
            delta.unwrap_or_else(|| Tensor::zeros([part.rows(queries), width], (out.kind(), out.device())))
        })
        .collect();
    out + Tensor::cat(&deltas, 0)
}

fn linear_tensors(linear: &nn::Linear) -> impl Iterator<Item = &Tensor> {
    std::iter::once(&linear.ws).chain(linear.bs.as_ref())
}

fn layer_norm_tensors(norm: &nn::LayerNorm) -> impl Iterator<Item = &Tensor> {
    norm.ws.iter().chain(norm.bs.as_ref())
}

impl BertConfig {
    /// The linears a LoRA update can target in every layer: the names the
    /// layer passes to [`Hooks::linear_delta`] (`query` lives in
    /// `attention.self`), with their paths and sizes. PEFT's default
    /// targets for BERT and RoBERTa are `query` and `value`.
    pub fn lora_layout(&self) -> LoraLayout {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let module = |hook, path, in_dim, out_dim| LoraModule { hook, path, in_dim, out_dim };
        LoraLayout {
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
            default_targets: &["query", "value"],
            fan_in_fan_out: false,
        }
    }
}

struct BertPooler {
    dense: nn::Linear,
}

impl BertPooler {
    fn new(p: &nn::Path, cfg: &BertConfig) -> Self {
        Self { dense: nn::linear(p / "dense", cfg.hidden_size, cfg.hidden_size, Default::default()) }
    }

    fn forward(&self, first: &Tensor) -> Tensor {
        self.dense.forward(first).tanh()
    }
}

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

    /// `[vocab, hidden]` word embedding table.
    pub fn word_embeddings(&self) -> &Tensor {
        &self.embeddings.word_embeddings.ws
    }

    /// `[batch, seq]` token ids -> `[batch, seq, hidden]` word embeddings.
    pub fn embed_ids(&self, input_ids: &Tensor) -> Tensor {
        self.embeddings.word_embeddings.forward(input_ids)
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
    /// hidden state; `None` for checkpoints without a pooler.
    pub fn pool(&self, first: &Tensor) -> Option<Tensor> {
        self.pooler.as_ref().map(|pooler| pooler.forward(first))
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
