//! How several jobs' batches share one pass through the encoder: each
//! batch's real tokens packed into rows ([`Packing`]), the members stacked
//! into one set of rows ([`Part`]), and the per-token operations that run
//! on every member's rows at once while each member's own deltas and
//! dropout (drawn from its own stream) apply to its rows alone.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::engine::models::hooks::Hooks;
use crate::engine::models::layers::dropout;
use crate::engine::rng::{with_stream, DropoutStream};

/// The real tokens of a right- or arbitrarily-padded batch, packed into rows.
pub(super) struct Packing {
    pub(super) batch: i64,
    pub(super) seq: i64,
    /// `[tokens]` flat index `b * seq + s` of every real token, in order.
    pub(super) rows: Tensor,
    /// `[batch]` row of each example's first position; valid when every
    /// example's position 0 is a real token.
    pub(super) first_rows: Tensor,
    /// `[batch, 1, 1, prefix + seq]` true where a key may be attended to.
    pub(super) key_mask: Tensor,
    /// `[batch, 1, 1, prefix + seq]` 0 where a key may be attended to, the
    /// lowest float elsewhere (HF's extended attention mask).
    pub(super) additive_mask: Tensor,
}

impl Packing {
    pub(super) fn new(attention_mask: &Tensor) -> Self {
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
    pub(super) fn with_prefix(mut self, prefix: i64) -> Self {
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
    pub(super) fn pack(&self, xs: &Tensor) -> Tensor {
        let n = xs.size()[2];
        xs.reshape([-1, n]).index_select(0, &self.rows)
    }

    /// `[tokens, n]` -> `[batch, seq, n]`, zeros at padding.
    pub(super) fn unpack(&self, xs: &Tensor) -> Tensor {
        let n = xs.size()[1];
        Tensor::zeros([self.batch * self.seq, n], (xs.kind(), xs.device()))
            .index_copy(0, &self.rows, xs)
            .view([self.batch, self.seq, n])
    }
}

/// Which positions a layer computes outputs for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Queries {
    /// Every real token: `[tokens, hidden]` out.
    All,
    /// Only each example's position 0: `[batch, hidden]` out. Keys and values
    /// still come from every real token.
    First,
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
pub(super) struct Part<'a> {
    pub(super) member: &'a Member<'a>,
    pub(super) packing: Packing,
    /// Key/value prefix length: real tokens' positions start after it.
    pub(super) past_len: i64,
    /// Real tokens of the member: its rows in the stacked `[tokens, hidden]`.
    pub(super) tokens: i64,
}

impl Part<'_> {
    /// The member's rows in a stacked tensor of `queries` layout.
    pub(super) fn rows(&self, queries: Queries) -> i64 {
        match queries {
            Queries::All => self.tokens,
            Queries::First => self.packing.batch,
        }
    }
}

/// Applies `f` to each member's rows of the stacked `xs` (`queries` layout)
/// with the member's dropout stream active, and stacks the results.
pub(super) fn per_member(xs: &Tensor, parts: &[Part<'_>], queries: Queries, mut f: impl FnMut(&Part<'_>, &Tensor) -> Tensor) -> Tensor {
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
pub(super) fn member_dropout(xs: &Tensor, p: f64, parts: &[Part<'_>], queries: Queries, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return xs.shallow_clone();
    }
    per_member(xs, parts, queries, |_, rows| dropout(rows, p, train))
}

/// A frozen linear over every member's rows, plus each member's delta for
/// it (LoRA) on its own rows. A delta sees its rows as float32 (the kind of
/// the job's parameters) and is added in the linear's kind.
pub(super) fn member_linear(
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
            let hooks = part.member.hooks;
            // The stream is entered whether or not the job has deltas: entering
            // it counts a draw, and a job's later dropout masks depend on the count.
            let delta = with_stream(part.member.stream, || {
                hooks.has_linear_deltas().then(|| hooks.linear_delta(layer, module, &rows.to_kind(Kind::Float))).flatten()
            })
            .map(|delta| delta.to_kind(out.kind()));
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
