//! The causal-LM forward on a frozen decoder with one job's adapter: the
//! training loss over target tokens only, as Hugging Face `*ForCausalLM`
//! computes it (labels -100 over source, prompt and padding; position `t`
//! predicts label `t + 1`), and the loss of an evaluation set.

use tch::{Device, Kind, Reduction, Tensor};

use super::data::LmBatch;
use crate::engine::data::seq2seq::LmExample;
use crate::engine::models::decoder::CausalDecoder;
use crate::engine::models::hooks::{Hooks, NoHooks};
use crate::engine::peft::DrawnAdapter;

/// Label value that the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// What one job adds to the shared frozen decoder.
#[derive(Clone, Copy)]
pub struct LmAdapter<'a> {
    /// Prompt embeddings prepended to every example's input embeddings
    /// (prompt tuning, P-tuning v1): `[virtual_tokens, hidden]`, or
    /// `[batch, virtual_tokens, hidden]` with a prompt per example.
    pub prompt: Option<&'a Tensor>,
    /// Per-layer key/value prefixes and linear deltas.
    pub hooks: &'a dyn Hooks,
}

impl LmAdapter<'static> {
    /// The plain base model.
    pub fn none() -> Self {
        LmAdapter { prompt: None, hooks: &NoHooks }
    }
}

impl<'a> LmAdapter<'a> {
    /// Virtual tokens the prompt adds in front of each example.
    pub fn prompt_len(&self) -> i64 {
        self.prompt.map_or(0, |prompt| prompt.size()[prompt.dim() - 2])
    }

    /// Input embeddings and mask with the prompt in front (mask ones over it).
    pub(super) fn prepend(&self, embeds: Tensor, attention_mask: &Tensor) -> (Tensor, Tensor) {
        let Some(prompt) = self.prompt else {
            return (embeds, attention_mask.shallow_clone());
        };
        let batch = embeds.size()[0];
        let prompt = match prompt.dim() {
            2 => prompt.unsqueeze(0).expand([batch, -1, -1], false),
            _ => prompt.shallow_clone(),
        };
        let nvt = prompt.size()[1];
        let ones = Tensor::ones([batch, nvt], (attention_mask.kind(), attention_mask.device()));
        (Tensor::cat(&[prompt.to_kind(embeds.kind()), embeds], 1), Tensor::cat(&[ones, attention_mask.shallow_clone()], 1))
    }
}

impl<'a> From<&'a DrawnAdapter<'a>> for LmAdapter<'a> {
    /// A job's adapter as drawn for a pass.
    fn from(drawn: &'a DrawnAdapter<'a>) -> Self {
        LmAdapter { prompt: drawn.prompt.as_ref(), hooks: &drawn.hooks }
    }
}

/// Last hidden states `[batch, prompt + seq, hidden]` of `[batch, seq]` ids
/// with the adapter's prompt in front and its hooks applied.
pub fn hidden_states(
    model: &dyn CausalDecoder,
    adapter: &LmAdapter<'_>,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    train: bool,
) -> Tensor {
    let (embeds, mask) = adapter.prepend(model.embed_ids(input_ids), attention_mask);
    model.forward(&embeds, &mask, adapter.hooks, train)
}

/// `[batch, prompt + seq, vocab]` next-token logits, as `PeftModelForCausalLM`
/// returns them (the prompt's positions included).
pub fn logits(
    model: &dyn CausalDecoder,
    adapter: &LmAdapter<'_>,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    train: bool,
) -> Tensor {
    model.logits(&hidden_states(model, adapter, input_ids, attention_mask, train))
}

/// Sum of the token cross-entropies and the number of target tokens, with
/// Hugging Face's shift: the hidden state at `t` (`[batch, seq, hidden]`)
/// predicts `labels[t + 1]` (`[batch, seq]`). The head runs on target
/// positions only.
pub fn shifted_loss_sum(model: &dyn CausalDecoder, hidden: &Tensor, labels: &Tensor) -> (Tensor, i64) {
    let (_, seq, width) = hidden.size3().expect("hidden states are [batch, seq, hidden]");
    if seq < 2 {
        return (hidden.sum(Kind::Float) * 0.0, 0);
    }
    let targets = labels.narrow(1, 1, seq - 1).reshape([-1]);
    let rows = targets.ne(IGNORE_INDEX).nonzero().squeeze_dim(1);
    let count = rows.size()[0];
    if count == 0 {
        return (hidden.sum(Kind::Float) * 0.0, 0);
    }
    let predicting = hidden.narrow(1, 0, seq - 1).reshape([-1, width]).index_select(0, &rows);
    let logits = model.logits(&predicting).to_kind(Kind::Float);
    let loss = logits.cross_entropy_loss::<Tensor>(&targets.index_select(0, &rows), None, Reduction::Sum, IGNORE_INDEX, 0.0);
    (loss, count)
}

/// Loss sum and target count of a batch: the labels get -100 over the
/// prompt's positions, as PEFT gives them.
fn batch_loss_sum(model: &dyn CausalDecoder, adapter: &LmAdapter<'_>, batch: &LmBatch, train: bool) -> (Tensor, i64) {
    let hidden = hidden_states(model, adapter, &batch.input_ids, &batch.attention_mask, train);
    shifted_loss_sum(model, &hidden, &prompt_labels(adapter, batch))
}

/// The batch's labels with -100 over the prompt's positions, as PEFT gives them.
pub(super) fn prompt_labels(adapter: &LmAdapter<'_>, batch: &LmBatch) -> Tensor {
    let nvt = adapter.prompt_len();
    if nvt == 0 {
        return batch.labels.shallow_clone();
    }
    let ignored = Tensor::full([batch.labels.size()[0], nvt], IGNORE_INDEX, (Kind::Int64, batch.labels.device()));
    Tensor::cat(&[ignored, batch.labels.shallow_clone()], 1)
}

/// Mean cross-entropy over the batch's target tokens: the loss of Hugging
/// Face's `*ForCausalLM` (and of `PeftModelForCausalLM` with a prompt) for
/// the same labels.
pub fn train_loss(model: &dyn CausalDecoder, adapter: &LmAdapter<'_>, batch: &LmBatch, train: bool) -> Tensor {
    let (sum, count) = batch_loss_sum(model, adapter, batch, train);
    sum / count.max(1) as f64
}

/// Token-weighted mean loss over `examples` in eval mode, without gradients.
pub fn evaluate_loss(
    model: &dyn CausalDecoder,
    adapter: &LmAdapter<'_>,
    examples: &[LmExample],
    batch_size: usize,
    pad_id: i64,
    device: Device,
) -> f64 {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].ids.len()));
    tch::no_grad(|| {
        let (mut sum, mut count) = (0.0, 0i64);
        for indices in order.chunks(batch_size.max(1)) {
            crate::engine::liveness::beat();
            let batch = LmBatch::collate(examples, indices, pad_id, device);
            let (loss, n) = batch_loss_sum(model, adapter, &batch, false);
            sum += f64::try_from(loss).expect("a scalar loss");
            count += n;
        }
        if count == 0 {
            0.0
        } else {
            sum / count as f64
        }
    })
}
