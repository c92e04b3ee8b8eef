//! What the causal (decoder-only) language models share: the
//! [`CausalDecoder`] interface the causal-LM task drives, the key/value cache
//! used while decoding, the attention mask and position ids derived from a
//! padding mask, attention itself, and how a pass shared by several jobs'
//! batches divides its rows ([`PassLayout`]). `gpt2.rs` and `llama.rs` build
//! on it; `factory.rs` picks between them.
//!
//! Positions and masks follow what Hugging Face computes for a given
//! attention mask: the position of a real token is the number of real
//! tokens before it (prefix and prompt included), as `generate` derives them
//! from the mask; for batches without left padding this equals the
//! `arange` that a plain forward uses. A query sees every earlier real key
//! and every prefix position.
//!
//! A frozen decoder's weights may be bfloat16 or float16 (a base loaded
//! for `training.precision` bf16 or fp16, [`CausalDecoder::kind`]): it then
//! computes in that kind, while everything that crosses its edges is
//! float32, as in the encoder. Input embeddings (a job's prompt among them)
//! and prefixes are cast to the weights' kind as they enter, the inputs of
//! low-rank deltas are cast to float32 before they reach a job's parameters
//! ([`super::hooks::add_delta`]), attention probabilities in training and
//! RMSNorm's statistics are computed in float32 (LayerNorm's are, inside
//! libtorch's kernel), the last hidden state leaves as float32, and the
//! logits over the vocabulary come out of the head as float32, so that the
//! log-softmax of the loss and of decoding is float32 (as Hugging Face
//! upcasts them). A job's parameters, gradients and optimizer state thus
//! stay float32 whatever the base computes in.

use ptune_core::Precision;
use tch::{nn, Device, Kind, Tensor};

use super::convert_frozen;
use super::hooks::{HookSites, Hooks, Linears};
use super::layers::dropout;
use crate::engine::error::EngineError;
use crate::engine::rng::{with_stream, DropoutStream};

/// A frozen causal language model: a stack of decoder layers over input
/// embeddings, with a language-modelling head.
pub trait CausalDecoder: Send {
    /// Hugging Face `model_type` of the checkpoint, e.g. `gpt2`, `llama`.
    fn model_type(&self) -> &str;
    fn hidden_size(&self) -> i64;
    fn vocab_size(&self) -> i64;
    fn num_layers(&self) -> usize;
    fn num_attention_heads(&self) -> i64;
    /// Heads of keys and values (fewer than query heads with grouped-query
    /// attention); prefixes from [`Hooks::prefix`] have this many heads.
    fn num_kv_heads(&self) -> i64;
    fn head_dim(&self) -> i64;
    /// Largest position the model has embeddings for (GPT-2), or was
    /// trained with (rotary models), plus one.
    fn max_positions(&self) -> i64;
    /// Token ids that end a generated sequence (`eos_token_id` of the config).
    fn eos_token_ids(&self) -> &[i64];

    /// `[vocab, hidden]` word embedding table, in the decoder's [`Self::kind`].
    fn word_embeddings(&self) -> &Tensor;

    /// The kind the decoder's weights and inner activations have: float32,
    /// or bfloat16 or float16 for a base loaded in that precision.
    fn kind(&self) -> Kind {
        self.word_embeddings().kind()
    }

    /// The linears of every layer, as the layer passes them to
    /// [`Hooks::linear_delta`].
    fn linears(&self) -> Linears;

    /// Where a job's prompt, prefixes and linear deltas fit this model.
    fn hook_sites(&self) -> HookSites<'_> {
        HookSites {
            model_type: self.model_type(),
            word_embeddings: self.word_embeddings(),
            vocab_size: self.vocab_size(),
            hidden_size: self.hidden_size(),
            num_layers: self.num_layers() as i64,
            num_attention_heads: self.num_attention_heads(),
            num_kv_heads: self.num_kv_heads(),
            head_dim: self.head_dim(),
            linears: self.linears(),
        }
    }

    /// `[batch, seq]` token ids -> `[batch, seq, hidden]` word embeddings,
    /// float32 whatever the decoder's kind.
    fn embed_ids(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(self.word_embeddings(), input_ids, -1, false, false).to_kind(Kind::Float)
    }

    /// Last hidden state (after the final norm), float32, `[batch, seq,
    /// hidden]` for `inputs_embeds` `[batch, seq, hidden]` (of any floating
    /// kind; cast to the decoder's) and `attention_mask` `[batch,
    /// seq]` (1 real, 0 padding, on either side), after the keys and values
    /// of `past` (or, without `past`, of the hooks' prefixes). Also returns
    /// the cache extended by this call's keys and values.
    fn forward_with_cache(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        hooks: &dyn Hooks,
        past: Option<&KvCache>,
        train: bool,
    ) -> (Tensor, KvCache) {
        self.forward_pass(inputs_embeds, attention_mask, hooks, past, &PassLayout::default(), train)
    }

    /// [`Self::forward_with_cache`] for a pass whose rows `layout` divides
    /// among jobs: each job's dropout is drawn from its own stream over its
    /// own batch's shape, and its prefix (padded on the left to the
    /// longest, as `hooks` returns them) is masked to its own length.
    fn forward_pass(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        hooks: &dyn Hooks,
        past: Option<&KvCache>,
        layout: &PassLayout,
        train: bool,
    ) -> (Tensor, KvCache);

    /// Last hidden state `[batch, seq, hidden]`; see [`Self::forward_with_cache`].
    fn forward(&self, inputs_embeds: &Tensor, attention_mask: &Tensor, hooks: &dyn Hooks, train: bool) -> Tensor {
        self.forward_with_cache(inputs_embeds, attention_mask, hooks, None, train).0
    }

    /// `[..., hidden]` hidden states -> `[..., vocab]` next-token logits,
    /// float32 (see [`head_logits`]).
    fn logits(&self, hidden: &Tensor) -> Tensor;
}

/// `[..., hidden]` hidden states through the `[vocab, hidden]` LM head:
/// the product in the head's kind (a bfloat16 head is not copied to
/// float32, which for a large vocabulary would be most of a step's
/// memory), the `[..., vocab]` logits then float32, as Hugging Face's
/// `*ForCausalLM` upcasts them before the loss.
pub(crate) fn head_logits(hidden: &Tensor, head: &Tensor) -> Tensor {
    hidden.to_kind(head.kind()).matmul(&head.tr()).to_kind(Kind::Float)
}

/// Runs `load_into` on a store of its own, freezes it and converts its
/// weights to `precision`'s kind: the model and the store that owns its
/// tensors.
pub(crate) fn load_frozen<M>(
    device: Device,
    precision: Precision,
    load_into: impl FnOnce(&nn::VarStore) -> Result<M, EngineError>,
) -> Result<(M, nn::VarStore), EngineError> {
    let mut weights = nn::VarStore::new(device);
    let model = load_into(&weights)?;
    weights.freeze();
    convert_frozen(&mut weights, precision);
    Ok((model, weights))
}

/// Keys and values of the positions seen so far, per layer, for decoding
/// one token at a time.
pub struct KvCache {
    /// Per layer `[batch, kv_heads, past, head_dim]` keys (rotated, for
    /// rotary models) and values; `None` for a layer that has seen nothing.
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    /// `[batch, past]` true at real positions (prefix positions included).
    pub(crate) mask: Tensor,
}

impl KvCache {
    /// Positions cached, prefix included.
    pub fn len(&self) -> i64 {
        self.mask.size()[1]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[batch, past]` true at real positions.
    pub fn mask(&self) -> &Tensor {
        &self.mask
    }

    /// The cache of the batch rows `indices` (`[rows]` int64), in that
    /// order: how beam search follows the beams it keeps.
    pub fn select(&self, indices: &Tensor) -> KvCache {
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|kv| kv.as_ref().map(|(k, v)| (k.index_select(0, indices), v.index_select(0, indices))))
                .collect(),
            mask: self.mask.index_select(0, indices),
        }
    }
}
/// One job's rows in a forward pass that several jobs' batches share.
#[derive(Clone, Debug)]
pub struct Span {
    /// First row of the job's batch in the pass.
    pub offset: i64,
    /// Examples in the job's batch.
    pub rows: i64,
    /// Positions of the job's own batch, its prompt included; the pass pads
    /// every batch on the right to the longest.
    pub seq: i64,
    /// Length of the job's key/value prefix (0 without one); the pass pads
    /// every prefix on the left to the longest.
    pub past: i64,
    /// The job's dropout stream; `None` draws from the generator as it stands.
    pub stream: Option<DropoutStream>,
}

/// How the rows of a forward pass divide among jobs. Empty: one batch,
/// dropout drawn from the generator as it stands.
#[derive(Clone, Debug, Default)]
pub struct PassLayout {
    pub spans: Vec<Span>,
}

impl PassLayout {
    /// Mask of what comes before the new tokens: the cache's; or, over the
    /// longest prefix, ones where each job's own prefix lies (the right end
    /// of the padded prefix region); `None` when there is neither.
    pub(crate) fn past_mask(
        &self,
        prefixes: &[Option<(Tensor, Tensor)>],
        past: Option<&KvCache>,
        batch: i64,
        device: Device,
    ) -> Option<Tensor> {
        if let Some(past) = past {
            return Some(past.mask.shallow_clone());
        }
        let prefix_len = prefixes.iter().flatten().map(|(k, _)| k.size()[2]).max()?;
        if self.spans.iter().all(|span| span.past == prefix_len) {
            return Some(Tensor::ones([batch, prefix_len], (Kind::Bool, device)));
        }
        let rows: Vec<Tensor> = self
            .spans
            .iter()
            .map(|span| {
                let own = Tensor::arange(prefix_len, (Kind::Int64, device)).ge(prefix_len - span.past);
                own.unsqueeze(0).expand([span.rows, prefix_len], false)
            })
            .collect();
        Some(Tensor::cat(&rows, 0))
    }
}

/// Applies `f` to each span's rows of `xs` cut to the span's own `[seq,
/// keys)` window (dims 1 and 3 of attention probabilities, dim 1 of hidden
/// states), with the span's stream active, and pads the results back with
/// zeros. The zeros only ever land on padding: positions past a batch's own
/// end, and prefix slots of a shorter prefix, which no real query attends to.
fn per_span(xs: &Tensor, spans: &[Span], window: impl Fn(&Span) -> Vec<(i64, i64, i64)>, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let outs: Vec<Tensor> = spans
        .iter()
        .map(|span| {
            let mut own = xs.narrow(0, span.offset, span.rows);
            let mut pads = vec![0i64; 2 * (xs.dim() - 1)];
            for (dim, start, len) in window(span) {
                let size = own.size()[dim as usize];
                own = own.narrow(dim, start, len);
                // constant_pad_nd takes (before, after) pairs from the last dim back.
                let pair = 2 * (xs.dim() as i64 - 1 - dim) as usize;
                (pads[pair], pads[pair + 1]) = (start, size - start - len);
            }
            let out = with_stream(span.stream.as_ref(), || f(&own));
            if pads.iter().all(|&p| p == 0) {
                out
            } else {
                out.constant_pad_nd(pads.as_slice())
            }
        })
        .collect();
    Tensor::cat(&outs, 0)
}

/// What every layer of one forward shares: positions of the new tokens and
/// which keys each of them may attend to.
pub(crate) struct AttentionContext {
    /// `[batch, seq]` int64 position of each new token (0 at padding).
    pub positions: Tensor,
    /// `[batch, 1, seq, total]` true where a query may attend to a key;
    /// keys are the cached (or prefix) positions followed by the new ones.
    pub allowed: Tensor,
    /// `[batch, total]` true at real keys: the mask of the extended cache.
    pub key_mask: Tensor,
    pub total: i64,
    /// How the rows divide among jobs (empty: one batch).
    spans: Vec<Span>,
}

impl AttentionContext {
    /// Context for `attention_mask` `[batch, seq]` after `past_mask`
    /// `[batch, past]` (the cache's, or ones over a prefix). With a
    /// `sliding_window`, a query sees only the last `window` key indices,
    /// as Hugging Face's sliding-window mask.
    pub fn new(attention_mask: &Tensor, past_mask: Option<&Tensor>, sliding_window: Option<i64>) -> Self {
        let seq = attention_mask.size()[1];
        let device = attention_mask.device();
        let mask = attention_mask.ne(0);
        let key_mask = match past_mask {
            Some(past) => Tensor::cat(&[past.ne(0), mask.shallow_clone()], 1),
            None => mask.shallow_clone(),
        };
        let total = key_mask.size()[1];
        let past = total - seq;
        let counts = key_mask.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1;
        let positions = counts.narrow(1, past, seq).masked_fill(&mask.logical_not(), 0);

        // [seq, 1] and [1, total] indices in the full key sequence
        let query_index = (Tensor::arange(seq, (Kind::Int64, device)) + past).unsqueeze(1);
        let key_index = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
        let mut visible = key_index.le_tensor(&query_index);
        if let Some(window) = sliding_window {
            visible = visible.logical_and(&key_index.gt_tensor(&(&query_index - window)));
        }
        // [batch, seq, total]
        let mut allowed = visible.unsqueeze(0).logical_and(&key_mask.unsqueeze(1));
        // A padding query always sees itself, so that no row is fully masked
        // (attention kernels differ in what they make of an empty row, and a
        // NaN there would reach real rows through later layers); real
        // queries never see padding keys.
        allowed = allowed.logical_or(&key_index.eq_tensor(&query_index).unsqueeze(0));
        Self { positions, allowed: allowed.unsqueeze(1), key_mask, total, spans: Vec::new() }
    }

    /// The context for a pass that `layout` divides among jobs.
    pub fn with_layout(mut self, layout: &PassLayout) -> Self {
        self.spans = layout.spans.clone();
        self
    }

    /// Dropout on `[batch, seq, ...]` activations, each job's rows masked
    /// from its own stream over its own batch's positions.
    pub fn dropout(&self, xs: &Tensor, p: f64, train: bool) -> Tensor {
        if !train || p <= 0.0 || self.spans.is_empty() {
            return dropout(xs, p, train);
        }
        per_span(xs, &self.spans, |span| vec![(1, 0, span.seq)], |own| dropout(own, p, train))
    }

    /// Dropout on `[batch, heads, queries, keys]` attention probabilities,
    /// each job's over its own queries and keys (its prefix, right-aligned
    /// in the prefix region, then its own positions).
    fn attention_dropout(&self, probs: &Tensor, p: f64, train: bool) -> Tensor {
        if !train || p <= 0.0 || self.spans.is_empty() {
            return dropout(probs, p, train);
        }
        let (_, _, queries, keys) = probs.size4().expect("attention probabilities are [batch, heads, queries, keys]");
        let prefix = keys - queries;
        let window = |span: &Span| {
            let past = if prefix > 0 { span.past } else { 0 };
            vec![(2, 0, span.seq), (3, prefix - past, past + span.seq)]
        };
        per_span(probs, &self.spans, window, |own| dropout(own, p, train))
    }

    /// `[batch, 1, seq, keys]` mask for a layer whose keys are the last
    /// `keys` of the full key sequence (a layer without the prefix others have).
    pub fn allowed_for(&self, keys: i64) -> Tensor {
        if keys == self.total {
            self.allowed.shallow_clone()
        } else {
            self.allowed.narrow(3, self.total - keys, keys)
        }
    }
}

/// Prefixes of every layer, each expanded to `batch` rows and cast to
/// `kind` (the decoder's; a job's prefixes are float32), or nothing when
/// decoding continues from a cache (which holds them already).
pub(crate) fn layer_prefixes(
    hooks: &dyn Hooks,
    num_layers: usize,
    batch: i64,
    past: Option<&KvCache>,
    kind: Kind,
) -> Vec<Option<(Tensor, Tensor)>> {
    if past.is_some() {
        return (0..num_layers).map(|_| None).collect();
    }
    let enter = |xs: &Tensor| expand_rows(xs, batch).to_kind(kind);
    (0..num_layers).map(|layer| hooks.prefix(layer).map(|(k, v)| (enter(&k), enter(&v)))).collect()
}

/// `[rows, ...]` -> `[batch, ...]`: as is, broadcast from one row, or each row
/// repeated `batch / rows` times in place (the layout beam search uses).
pub(crate) fn expand_rows(xs: &Tensor, batch: i64) -> Tensor {
    let rows = xs.size()[0];
    if rows == batch {
        xs.shallow_clone()
    } else if rows == 1 {
        let mut shape = xs.size();
        shape[0] = batch;
        xs.expand(shape.as_slice(), false)
    } else {
        assert!(batch % rows == 0, "a prefix for {rows} examples cannot serve a batch of {batch}");
        xs.repeat_interleave_self_int(batch / rows, 0, None)
    }
}

/// Scaled dot-product attention of `query` `[batch, heads, seq, head_dim]`
/// over `key`/`value` `[batch, kv_heads, keys, head_dim]` (each key/value head
/// serves `heads / kv_heads` query heads, as Hugging Face's `repeat_kv`),
/// masked as `ctx` allows (the last `keys` of its key sequence);
/// `[batch, seq, heads * head_dim]` out.
pub(crate) fn attend(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    ctx: &AttentionContext,
    scale: f64,
    dropout_p: f64,
    train: bool,
) -> Tensor {
    let (batch, heads, seq, head_dim) = query.size4().expect("query is [batch, heads, seq, head_dim]");
    let allowed = ctx.allowed_for(key.size()[2]);
    let key = repeat_kv(key, heads);
    let value = repeat_kv(value, heads);
    let context = if train && dropout_p > 0.0 {
        // Written out so that attention-probability dropout uses the fast
        // mask. The scores are float32 whatever the weights' kind: the
        // softmax of bfloat16 or float16 scores loses the small probabilities.
        let scores = query.matmul(&key.transpose(-1, -2)).to_kind(Kind::Float) * scale;
        let scores = scores.masked_fill(&allowed.logical_not(), f64::from(f32::MIN));
        let probs = ctx.attention_dropout(&scores.softmax(-1, Kind::Float), dropout_p, train);
        probs.to_kind(value.kind()).matmul(&value)
    } else {
        Tensor::scaled_dot_product_attention(query, &key, &value, Some(&allowed), 0.0, false, scale, false)
    };
    // [batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]
    context.transpose(1, 2).reshape([batch, seq, heads * head_dim])
}

fn repeat_kv(xs: &Tensor, heads: i64) -> Tensor {
    let (batch, kv_heads, len, head_dim) = xs.size4().expect("keys are [batch, kv_heads, len, head_dim]");
    if kv_heads == heads {
        return xs.shallow_clone();
    }
    xs.unsqueeze(2).expand([batch, kv_heads, heads / kv_heads, len, head_dim], false).reshape([batch, heads, len, head_dim])
}

/// Concatenates cached (or prefix) keys/values before the new ones.
pub(crate) fn extend_kv(past: Option<&(Tensor, Tensor)>, key: Tensor, value: Tensor) -> (Tensor, Tensor) {
    match past {
        Some((past_key, past_value)) => (Tensor::cat(&[past_key, &key], 2), Tensor::cat(&[past_value, &value], 2)),
        None => (key, value),
    }
}
/// Joins a checkpoint prefix (`""`, `"transformer."`, `"model."`) and a name.
pub(crate) fn prefixed(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}
