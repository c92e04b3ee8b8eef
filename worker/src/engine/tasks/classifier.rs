//! Classification on an encoder, at two levels:
//! - sequence, as Hugging Face `BertForSequenceClassification` computes it:
//!   the encoder's pooler output (dense + tanh over the hidden state at
//!   position 0), dropout, then a linear classifier; cross-entropy loss. With
//!   prompt tuning and P-tuning position 0 is the first virtual token, as in
//!   PEFT. RoBERTa, as `RobertaForSequenceClassification`, has no pooler:
//!   its head brings its own dense layer ([`ClassificationHead::roberta`]).
//!   With [`Pooling::Mean`] the head reads the mean of the input's own
//!   tokens' hidden states instead, as sentence-transformers pools;
//! - token, as `BertForTokenClassification`: dropout and the same linear
//!   classifier over every real token's last hidden state (loss and
//!   evaluation in `token_cls.rs`).
//!
//! Prefixes and LoRA updates ride along as the forward's hooks. Several
//! jobs' batches can share one pass through the frozen encoder
//! ([`Classifier::packed_logits`]).

use ptune_core::Pooling;
use tch::nn::{self, Module};
use tch::{Kind, Reduction, Tensor};

use crate::engine::data::batch::{length_sorted_batches, Batch};
use crate::engine::data::Example;
use crate::engine::models::bert::{BertConfig, BertModel, Member};
use crate::engine::models::dropout;
use crate::engine::models::hooks::Hooks;
use crate::engine::peft::lora::{Lora, LoraHooks};
use crate::engine::peft::p_tuning::PromptEncoder;
use crate::engine::peft::prefix::{PrefixHooks, PrefixTuning};
use crate::engine::peft::prompt_tuning::{prepend, PromptTuning};
use crate::engine::rng::{with_stream, DropoutStream};
use super::token_cls::drop_prompt;

/// The trainable classification head, under `classifier`:
/// - BERT (both levels) and RoBERTa's token level: one linear,
///   `classifier.weight` `[labels, hidden]` and `classifier.bias`, after
///   dropout, over the pooler output (sequence) or every token (token);
/// - RoBERTa's sequence level, as `RobertaClassificationHead`: dropout,
///   `classifier.dense` `[hidden, hidden]`, tanh, dropout, then
///   `classifier.out_proj` `[labels, hidden]`, over position 0 (RoBERTa's
///   sequence classifiers have no pooler).
pub struct ClassificationHead {
    /// RoBERTa's `classifier.dense`; `None` for a single linear.
    dense: Option<nn::Linear>,
    /// The projection to labels: `classifier` or `classifier.out_proj`.
    classifier: nn::Linear,
    dropout: f64,
}

impl ClassificationHead {
    /// Module name of the head in the HF model, and its key prefix (under
    /// `base_model.`) in a PEFT export.
    pub const MODULE: &'static str = "classifier";

    /// A single linear head. Weights N(0, `init_std`) and zero bias, as HF
    /// `_init_weights` does with `initializer_range`.
    pub fn new(p: &nn::Path, hidden: i64, num_labels: i64, init_std: f64, dropout: f64) -> Self {
        Self { dense: None, classifier: head_linear(&(p / Self::MODULE), hidden, num_labels, init_std), dropout }
    }

    /// RoBERTa's sequence classification head, initialised as [`Self::new`].
    pub fn roberta(p: &nn::Path, hidden: i64, num_labels: i64, init_std: f64, dropout: f64) -> Self {
        let path = p / Self::MODULE;
        Self {
            dense: Some(head_linear(&(&path / "dense"), hidden, hidden, init_std)),
            classifier: head_linear(&(&path / "out_proj"), hidden, num_labels, init_std),
            dropout,
        }
    }

    /// The head a `level` classifier on an encoder of `cfg` has.
    pub fn for_model(p: &nn::Path, cfg: &BertConfig, level: Level, num_labels: i64) -> Self {
        let dropout = cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob);
        match level {
            Level::Sequence if cfg.is_roberta() => {
                Self::roberta(p, cfg.hidden_size, num_labels, cfg.initializer_range, dropout)
            }
            _ => Self::new(p, cfg.hidden_size, num_labels, cfg.initializer_range, dropout),
        }
    }

    /// The projection's weight, `[labels, hidden]`.
    pub fn weight(&self) -> &Tensor {
        &self.classifier.ws
    }

    /// The projection's bias, `[labels]`.
    pub fn bias(&self) -> &Tensor {
        self.classifier.bs.as_ref().expect("the classifier has a bias")
    }

    /// Every tensor of the head, named relative to [`Self::MODULE`] as
    /// Hugging Face names them (`weight`, `bias`; or `dense.weight`, ...,
    /// `out_proj.bias`).
    pub fn named_tensors(&self) -> Vec<(&'static str, Tensor)> {
        let mut tensors = Vec::new();
        let (weight, bias) = match &self.dense {
            Some(dense) => {
                tensors.push(("dense.weight", dense.ws.shallow_clone()));
                tensors.push(("dense.bias", dense.bs.as_ref().expect("a bias").shallow_clone()));
                ("out_proj.weight", "out_proj.bias")
            }
            None => ("weight", "bias"),
        };
        tensors.push((weight, self.weight().shallow_clone()));
        tensors.push((bias, self.bias().shallow_clone()));
        tensors
    }

    /// `[.., hidden]` -> `[.., labels]` logits: the projection after dropout.
    /// For a sequence, the input is the pooler output (BERT) or, with
    /// RoBERTa's head, the last hidden state at position 0 (see
    /// [`Self::forward_sequence`]).
    pub fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let xs = match &self.dense {
            Some(dense) => dense.forward(&dropout(xs, self.dropout, train)).tanh(),
            None => xs.shallow_clone(),
        };
        self.classifier.forward(&dropout(&xs, self.dropout, train))
    }

    /// `[batch, labels]` logits from `encoder`'s last hidden state at
    /// position 0, `[batch, hidden]`: through the encoder's pooler, or
    /// RoBERTa's dense layer.
    pub fn forward_sequence(&self, encoder: &BertModel, first: &Tensor, train: bool) -> Tensor {
        match &self.dense {
            Some(_) => self.forward(first, train),
            None => {
                let pooled = encoder.pool(first).expect("a BERT sequence classifier needs an encoder with a pooler");
                self.forward(&pooled, train)
            }
        }
    }
}

fn head_linear(p: &nn::Path, in_dim: i64, out_dim: i64, init_std: f64) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: init_std },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(p, in_dim, out_dim, config)
}

/// What a job trains besides the head.
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
    /// The job's own trainable copy of the whole encoder.
    Full(BertModel),
}

/// One job's batch for a (possibly shared) forward pass.
pub struct ClassifierInput<'a> {
    pub model: &'a Classifier,
    /// `[batch, seq]` token ids.
    pub input_ids: Tensor,
    /// `[batch, seq]`: 1 at real tokens, 0 at padding.
    pub attention_mask: Tensor,
    /// The job's dropout stream for this step; `None` draws from the global generator.
    pub stream: Option<&'a DropoutStream>,
}

/// A job's hooks for one forward pass.
enum JobHooks<'a> {
    None,
    Prefix(PrefixHooks),
    Lora(LoraHooks<'a>),
}

impl Hooks for JobHooks<'_> {
    fn prefix(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        match self {
            JobHooks::Prefix(hooks) => hooks.prefix(layer),
            _ => None,
        }
    }

    fn linear_delta(&self, layer: usize, module: &str, xs: &Tensor) -> Option<Tensor> {
        match self {
            JobHooks::Lora(hooks) => hooks.linear_delta(layer, module, xs),
            _ => None,
        }
    }

    fn has_linear_deltas(&self) -> bool {
        matches!(self, JobHooks::Lora(_))
    }
}

/// What a classifier labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// One label per sequence, from the pooled first position.
    Sequence,
    /// One tag per token, from each real token's hidden state.
    Token,
}

/// A classifier of one job: its adapter and head, run on a shared frozen
/// encoder (or, for full fine-tuning, on its own copy).
pub struct Classifier {
    pub adapter: Adapter,
    pub head: ClassificationHead,
    pub level: Level,
    /// How a sequence is pooled for the head (sequence level only).
    pub pooling: Pooling,
}

/// `[batch, hidden]` mean of `hidden` `[batch, seq, hidden]` over the
/// positions where `attention_mask` `[batch, seq]` is 1.
fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Tensor {
    let mask = attention_mask.to_kind(hidden.kind()).unsqueeze(-1);
    let sum = (hidden * &mask).sum_dim_intlist(1, false, hidden.kind());
    sum / mask.sum_dim_intlist(1, false, hidden.kind()).clamp_min(1.0)
}

/// Eval loss (mean cross-entropy), accuracy and predictions over a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    /// Predicted label index of each example, in dataset order.
    pub predictions: Vec<usize>,
}

impl Classifier {
    /// The encoder the forward runs through: the shared base, or the job's
    /// own copy for full fine-tuning.
    pub fn encoder<'a>(&'a self, base: &'a BertModel) -> &'a BertModel {
        match &self.adapter {
            Adapter::Full(own) => own,
            _ => base,
        }
    }

    /// The virtual tokens prepended at the input, `[nvt, hidden]`, if the
    /// method has them.
    pub fn input_prompt(&self, train: bool) -> Option<Tensor> {
        match &self.adapter {
            Adapter::PromptTuning(prompt) => Some(prompt.embeddings().shallow_clone()),
            Adapter::PTuning(encoder) => Some(encoder.prompt(train)),
            _ => None,
        }
    }

    /// How many virtual tokens [`Classifier::input_prompt`] prepends.
    pub fn input_prompt_len(&self) -> i64 {
        match &self.adapter {
            Adapter::PromptTuning(prompt) => prompt.embeddings().size()[0],
            Adapter::PTuning(encoder) => encoder.num_virtual_tokens(),
            _ => 0,
        }
    }

    /// True when the job runs on the shared encoder, so its batches can
    /// share a pass with other jobs' (every method but full fine-tuning).
    pub fn shares_base(&self) -> bool {
        !matches!(self.adapter, Adapter::Full(_))
    }

    /// The job's additions to one forward pass over `batch` examples.
    fn hooks(&self, batch: i64, train: bool) -> JobHooks<'_> {
        match &self.adapter {
            Adapter::Prefix(prefix) => JobHooks::Prefix(prefix.hooks(batch, train)),
            Adapter::Lora(lora) => JobHooks::Lora(lora.hooks(train)),
            _ => JobHooks::None,
        }
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
        let prepared: Vec<(Tensor, Tensor, i64, JobHooks<'_>)> = inputs
            .iter()
            .map(|input| {
                with_stream(input.stream, || {
                    let model = input.model;
                    let batch = input.input_ids.size()[0];
                    let mut embeds = encoder.embed_ids(&input.input_ids);
                    let mut mask = input.attention_mask.shallow_clone();
                    let prompt = model.input_prompt(train);
                    let prompt_len = prompt.as_ref().map_or(0, |p| p.size()[0]);
                    if let Some(prompt) = prompt {
                        (embeds, mask, _) = prepend(&prompt, &embeds, &mask, None);
                    }
                    (embeds, mask, prompt_len, model.hooks(batch, train))
                })
            })
            .collect();
        let members: Vec<Member<'_>> = prepared
            .iter()
            .zip(inputs)
            .map(|((embeds, mask, _, hooks), input)| Member {
                inputs_embeds: embeds.shallow_clone(),
                attention_mask: mask.shallow_clone(),
                token_type_ids: None,
                hooks,
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

    /// Loss and accuracy over `examples` in eval mode, without gradients.
    pub fn evaluate(&self, encoder: &BertModel, examples: &[Example], batch_size: usize, pad_id: i64) -> Evaluation {
        let device = self.head.weight().device();
        let mut predictions = vec![0; examples.len()];
        let loss_sum = tch::no_grad(|| {
            let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
            for indices in length_sorted_batches(examples, batch_size) {
                crate::engine::liveness::beat();
                let batch = Batch::collate(examples, &indices, pad_id, device);
                let logits = self.logits(encoder, &batch.input_ids, &batch.attention_mask, false);
                let loss = logits.cross_entropy_loss::<Tensor>(&batch.labels, None, Reduction::Sum, -100, 0.0);
                loss_sum += loss.to_kind(Kind::Double);
                let predicted = Vec::<i64>::try_from(logits.argmax(-1, false)).expect("label indices");
                for (&i, p) in indices.iter().zip(predicted) {
                    predictions[i] = p as usize;
                }
            }
            f64::try_from(loss_sum).expect("a scalar loss")
        });
        let correct = predictions.iter().zip(examples).filter(|(&p, e)| p as i64 == e.label).count();
        let n = examples.len() as f64;
        Evaluation { loss: loss_sum / n, accuracy: correct as f64 / n, predictions }
    }
}

/// Macro-averaged F1 of predicted class indices against true ones: the mean
/// over every class that occurs in either of per-class F1 (`2 TP / (2 TP +
/// FP + FN)`), as scikit-learn's `f1_score(average="macro")` computes it.
pub fn macro_f1(truth: &[usize], predicted: &[usize]) -> f64 {
    let classes = truth.iter().chain(predicted).copied().max().map_or(0, |m| m + 1);
    let (mut tp, mut fp, mut fn_) = (vec![0usize; classes], vec![0usize; classes], vec![0usize; classes]);
    let mut present = vec![false; classes];
    for (&t, &p) in truth.iter().zip(predicted) {
        present[t] = true;
        present[p] = true;
        if t == p {
            tp[t] += 1;
        } else {
            fp[p] += 1;
            fn_[t] += 1;
        }
    }
    let f1s: Vec<f64> = (0..classes)
        .filter(|&c| present[c])
        .map(|c| {
            let denominator = 2 * tp[c] + fp[c] + fn_[c];
            if denominator == 0 { 0.0 } else { 2.0 * tp[c] as f64 / denominator as f64 }
        })
        .collect();
    if f1s.is_empty() { 0.0 } else { f1s.iter().sum::<f64>() / f1s.len() as f64 }
}

#[cfg(test)]
mod tests {
    use super::macro_f1;

    #[test]
    fn macro_f1_matches_scikit_learn() {
        // sklearn.metrics.f1_score([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1], average="macro") == 0.26666...
        let f1 = macro_f1(&[0, 1, 2, 0, 1, 2], &[0, 2, 1, 0, 0, 1]);
        assert!((f1 - 0.266_666_666_666_666_66).abs() < 1e-12, "{f1}");
        // One class always predicted: the other's F1 is 0.
        assert!((macro_f1(&[0, 1, 1, 1], &[1, 1, 1, 1]) - 0.428_571_428_571_428_5).abs() < 1e-12);
        assert_eq!(macro_f1(&[0, 1], &[0, 1]), 1.0);
    }
}
