//! A job's classifier on the frozen encoder: its adapter (or, for full
//! fine-tuning, its own copy of the encoder) and its head, at either level.
//! Prefixes and LoRA updates ride along as the forward's hooks. Several
//! jobs' batches can share one pass through the frozen encoder
//! ([`Classifier::packed_logits`]).

use ptune_core::Pooling;
use tch::Tensor;

use super::head::{ClassificationHead, Level};
use crate::engine::models::bert::{BertModel, Member};
use crate::engine::peft::prompt_tuning::prepend;
use crate::engine::peft::{DrawnAdapter, Trainable};
use crate::engine::rng::{with_stream, DropoutStream};
use crate::engine::tasks::token_classification::drop_prompt;

/// A classifier of one job: its adapter and head, run on a shared frozen
/// encoder (or, for full fine-tuning, on its own copy).
pub struct Classifier {
    pub adapter: Trainable<BertModel>,
    pub head: ClassificationHead,
    pub level: Level,
    /// How a sequence is pooled for the head (sequence level only).
    pub pooling: Pooling,
}

/// One job's batch for a (possibly shared) forward pass.
pub struct ClassifierInput<'a> {
    pub model: &'a Classifier,
    /// `[batch, seq]` token ids.
    pub input_ids: Tensor,
    /// `[batch, seq]`: 1 at real tokens, 0 at padding.
    pub attention_mask: Tensor,
    /// The job's dropout stream; `None` draws from the global generator.
    pub stream: Option<&'a DropoutStream>,
}

/// `[batch, hidden]` mean of `hidden` `[batch, seq, hidden]` over the
/// positions where `attention_mask` `[batch, seq]` is 1.
fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Tensor {
    let mask = attention_mask.to_kind(hidden.kind()).unsqueeze(-1);
    let sum = (hidden * &mask).sum_dim_intlist(1, false, hidden.kind());
    sum / mask.sum_dim_intlist(1, false, hidden.kind()).clamp_min(1.0)
}

impl Classifier {
    /// The encoder the forward runs through: the shared base, or the job's
    /// own copy for full fine-tuning.
    pub fn encoder<'a>(&'a self, base: &'a BertModel) -> &'a BertModel {
        self.adapter.own_base().unwrap_or(base)
    }

    /// How many virtual tokens the adapter prepends at the input.
    pub fn input_prompt_len(&self) -> i64 {
        self.adapter.prompt_len()
    }

    /// True when the job runs on the shared encoder, so its batches can
    /// share a pass with other jobs' (every method but full fine-tuning).
    pub fn shares_base(&self) -> bool {
        self.adapter.own_base().is_none()
    }

    /// Logits for `[batch, seq]` token ids and mask:
    /// `[batch, labels]` at the sequence level (the encoder must have a
    /// pooler), `[batch, seq, tags]` at the token level (prompt positions
    /// dropped, so they line up with `input_ids`). Dropout draws from the
    /// global generator.
    pub fn logits(&self, base: &BertModel, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Tensor {
        let input = ClassifierInput {
            model: self,
            input_ids: input_ids.shallow_clone(),
            attention_mask: attention_mask.shallow_clone(),
            stream: None,
        };
        Self::packed_logits(base, std::slice::from_ref(&input), train).remove(0)
    }

    /// Logits of several jobs' batches from one pass through the shared
    /// encoder `base`: each job's prompt, prefix or LoRA rides with its own
    /// rows, and each job's dropout comes from its own stream, so a job's
    /// logits are those of [`Classifier::logits`] on its batch alone (up to
    /// float rounding). Every input must have the same level, and a job with
    /// its own encoder (full fine-tuning) must come alone.
    pub fn packed_logits(base: &BertModel, inputs: &[ClassifierInput<'_>], train: bool) -> Vec<Tensor> {
        let level = inputs[0].model.level;
        assert!(inputs.iter().all(|i| i.model.level == level), "one pass serves one classification level");
        let encoder = match inputs {
            [input] => input.model.encoder(base),
            _ => {
                assert!(inputs.iter().all(|i| i.model.shares_base()), "full fine-tuning cannot share a pass");
                base
            }
        };
        // Each job's input embeddings, prompt and hooks, drawn from its stream.
        let prepared: Vec<(Tensor, Tensor, i64, DrawnAdapter<'_>)> = inputs
            .iter()
            .map(|input| {
                with_stream(input.stream, || {
                    let batch = input.input_ids.size()[0];
                    let mut embeds = encoder.embed_ids(&input.input_ids);
                    let mut mask = input.attention_mask.shallow_clone();
                    let drawn = input.model.adapter.draw(batch, train);
                    let prompt_len = drawn.prompt.as_ref().map_or(0, |p| p.size()[0]);
                    if let Some(prompt) = &drawn.prompt {
                        (embeds, mask, _) = prepend(prompt, &embeds, &mask, None);
                    }
                    (embeds, mask, prompt_len, drawn)
                })
            })
            .collect();
        let members: Vec<Member<'_>> = prepared
            .iter()
            .zip(inputs)
            .map(|((embeds, mask, _, drawn), input)| Member {
                inputs_embeds: embeds.shallow_clone(),
                attention_mask: mask.shallow_clone(),
                token_type_ids: None,
                hooks: &drawn.hooks,
                stream: input.stream,
            })
            .collect();
        // The last layer computes position 0 alone unless a member pools every
        // token. Then position-0 members draw that layer's dropout over every
        // position, unlike alone: packs keep poolings in separate passes.
        let first_only = level == Level::Sequence && inputs.iter().all(|i| i.model.pooling == Pooling::Cls);
        let outputs = encoder.forward_members(&members, first_only, train);
        outputs
            .iter()
            .zip(inputs)
            .zip(&prepared)
            .map(|((output, input), (_, _, prompt_len, _))| {
                with_stream(input.stream, || match level {
                    Level::Sequence => {
                        input.model.sequence_logits(encoder, output, &input.attention_mask, *prompt_len, train)
                    }
                    Level::Token => input.model.head.forward(&drop_prompt(output, *prompt_len), train),
                })
            })
            .collect()
    }

    /// `[batch, labels]` logits from the encoder's output: `[batch, hidden]`
    /// at position 0, or the whole `[batch, prompt + seq, hidden]` sequence
    /// (zeros at padding) when some member of the pass needed it.
    fn sequence_logits(
        &self,
        encoder: &BertModel,
        output: &Tensor,
        attention_mask: &Tensor,
        prompt_len: i64,
        train: bool,
    ) -> Tensor {
        match self.pooling {
            Pooling::Cls => {
                let first = if output.dim() == 3 { output.select(1, 0) } else { output.shallow_clone() };
                self.head.forward_sequence(encoder, &first, train)
            }
            Pooling::Mean => self.head.forward(&mean_pool(&drop_prompt(output, prompt_len), attention_mask), train),
        }
    }
}
