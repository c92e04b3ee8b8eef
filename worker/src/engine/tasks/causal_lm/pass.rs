//! A training pass that several causal-LM jobs share on the frozen
//! decoder: the members' batches (their prompts in front) stacked and
//! padded on the right to the longest, their prefixes padded on the left,
//! and each member's dropout and linear deltas over its own rows only.

use tch::Tensor;

use super::model::{prompt_labels, shifted_loss_sum, LmAdapter};
use super::data::LmBatch;
use crate::engine::models::decoder::{expand_rows, CausalDecoder, PassLayout, Span};
use crate::engine::models::hooks::Hooks;
use crate::engine::rng::{with_stream, DropoutStream};

/// One job's batch in a training pass that several jobs share.
pub struct LmMember<'a> {
    pub adapter: LmAdapter<'a>,
    pub batch: &'a LmBatch,
    /// The job's dropout stream; `None` draws from the generator as it stands.
    pub stream: Option<&'a DropoutStream>,
}

impl LmMember<'_> {
    /// Length of the job's key/value prefix (0 without one).
    fn prefix_len(&self) -> i64 {
        self.adapter.hooks.prefix(0).map_or(0, |(key, _)| key.size()[2])
    }
}

/// Every member's prefixes in one pass: each expanded to its member's rows
/// and padded on the left to the longest (the pass's layout masks the
/// padding); and each member's linear deltas (LoRA) on its own rows and
/// positions, drawn with its own stream, zero over the pass's padding.
struct PackedHooks<'a> {
    members: &'a [LmMember<'a>],
    spans: &'a [Span],
    prefix_len: i64,
}

impl Hooks for PackedHooks<'_> {
    fn prefix(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let prefixes: Vec<Option<(Tensor, Tensor)>> = self
            .members
            .iter()
            .zip(self.spans)
            .map(|(member, span)| {
                member.adapter.hooks.prefix(layer).map(|(key, value)| (expand_rows(&key, span.rows), expand_rows(&value, span.rows)))
            })
            .collect();
        let (key, _) = prefixes.iter().flatten().next()?;
        let (_, heads, _, head_dim) = key.size4().expect("prefixes are [batch, heads, len, head_dim]");
        let (kind, device) = (key.kind(), key.device());
        let (keys, values): (Vec<Tensor>, Vec<Tensor>) = prefixes
            .into_iter()
            .zip(self.spans)
            .map(|(prefix, span)| match prefix {
                Some((key, value)) => {
                    let pad = [0, 0, self.prefix_len - key.size()[2], 0];
                    (key.constant_pad_nd(pad), value.constant_pad_nd(pad))
                }
                None => {
                    let zeros = || Tensor::zeros([span.rows, heads, self.prefix_len, head_dim], (kind, device));
                    (zeros(), zeros())
                }
            })
            .unzip();
        Some((Tensor::cat(&keys, 0), Tensor::cat(&values, 0)))
    }

    fn has_linear_deltas(&self) -> bool {
        self.members.iter().any(|member| member.adapter.hooks.has_linear_deltas())
    }

    fn linear_delta(&self, layer: usize, module: &str, xs: &Tensor) -> Option<Tensor> {
        // Each member sees its batch alone: its rows, up to its own longest
        // position, so that its dropout draws the masks it draws alone.
        if !self.has_linear_deltas() {
            return None;
        }
        let longest = xs.size()[1];
        let deltas: Vec<Option<Tensor>> = self
            .members
            .iter()
            .zip(self.spans)
            .map(|(member, span)| {
                if !member.adapter.hooks.has_linear_deltas() {
                    return None;
                }
                let own = xs.narrow(0, span.offset, span.rows).narrow(1, 0, span.seq);
                with_stream(member.stream, || member.adapter.hooks.linear_delta(layer, module, &own))
                    .map(|delta| delta.constant_pad_nd([0, 0, 0, longest - span.seq]))
            })
            .collect();
        let width = deltas.iter().flatten().next()?.size()[2];
        let deltas: Vec<Tensor> = deltas
            .into_iter()
            .zip(self.spans)
            .map(|(delta, span)| {
                delta.unwrap_or_else(|| Tensor::zeros([span.rows, longest, width], (xs.kind(), xs.device())))
            })
            .collect();
        Some(Tensor::cat(&deltas, 0))
    }
}

/// Each member's mean training loss from one forward pass through the
/// shared frozen decoder: the members' batches (their prompts in front) are
/// stacked and padded on the right to the longest, their prefixes padded on
/// the left, and each member's dropout comes from its own stream over its
/// own batch's shape. A member's loss is the one [`train_loss`](super::model::train_loss) gives for
/// its batch alone with the same stream (up to float rounding).
pub fn packed_train_losses(model: &dyn CausalDecoder, members: &[LmMember<'_>], train: bool) -> Vec<Tensor> {
    // Each member's input embeddings and mask, its prompt (drawn already,
    // with the member's stream) in front.
    let inputs: Vec<(Tensor, Tensor)> = members
        .iter()
        .map(|m| m.adapter.prepend(model.embed_ids(&m.batch.input_ids), &m.batch.attention_mask))
        .collect();
    let longest = inputs.iter().map(|(embeds, _)| embeds.size()[1]).max().expect("a pass has members");
    let mut offset = 0;
    let spans: Vec<Span> = members
        .iter()
        .zip(&inputs)
        .map(|(member, (embeds, _))| {
            let rows = embeds.size()[0];
            let span = Span {
                offset,
                rows,
                seq: embeds.size()[1],
                past: member.prefix_len(),
                stream: member.stream.cloned(),
            };
            offset += rows;
            span
        })
        .collect();
    let (embeds, masks): (Vec<Tensor>, Vec<Tensor>) = inputs
        .into_iter()
        .map(|(embeds, mask)| {
            let pad = longest - embeds.size()[1];
            (embeds.constant_pad_nd([0, 0, 0, pad]), mask.constant_pad_nd([0, pad]))
        })
        .unzip();
    let prefix_len = spans.iter().map(|span| span.past).max().unwrap_or(0);
    let layout = PassLayout { spans };
    let hooks = PackedHooks { members, spans: &layout.spans, prefix_len };
    let (embeds, mask) = (Tensor::cat(&embeds, 0), Tensor::cat(&masks, 0));
    let hidden = model.forward_pass(&embeds, &mask, &hooks, None, &layout, train).0;
    members
        .iter()
        .zip(&layout.spans)
        .map(|(member, span)| {
            let own = hidden.narrow(0, span.offset, span.rows).narrow(1, 0, span.seq);
            let (sum, count) = shifted_loss_sum(model, &own, &prompt_labels(&member.adapter, member.batch));
            sum / count.max(1) as f64
        })
        .collect()
}
