//! Classification on an encoder, at two levels:
//! - sequence, as Hugging Face `BertForSequenceClassification` computes it:
//!   the encoder's pooler output (dense + tanh over the hidden state at
//!   position 0), dropout, then a linear classifier; cross-entropy loss. With
//!   prompt tuning and P-tuning position 0 is the first virtual token, as in
//!   PEFT;
//! - token, as `BertForTokenClassification`: dropout and the same linear
//!   classifier over every real token's last hidden state (loss and
//!   evaluation in `token_cls.rs`).
//!
//! Prefixes and LoRA updates ride along as the forward's hooks.

use tch::nn::{self, Module};
use tch::{Kind, Reduction, Tensor};

use crate::engine::data::batch::{length_sorted_batches, Batch};
use crate::engine::data::Example;
use crate::engine::models::bert::BertModel;
use crate::engine::models::dropout;
use crate::engine::models::hooks::{Hooks, NoHooks};
use crate::engine::peft::lora::Lora;
use crate::engine::peft::p_tuning::PromptEncoder;
use crate::engine::peft::prefix::PrefixTuning;
use crate::engine::peft::prompt_tuning::{prepend, PromptTuning};
use super::token_cls::drop_prompt;

/// The trainable classifier, `classifier.weight` `[labels, hidden]` and
/// `classifier.bias` `[labels]`.
pub struct ClassificationHead {
    classifier: nn::Linear,
    dropout: f64,
}

impl ClassificationHead {
    /// Module name of the head in the HF model, and its key prefix (under
    /// `base_model.`) in a PEFT export.
    pub const MODULE: &'static str = "classifier";

    /// Weights N(0, `init_std`) and zero bias, as HF `_init_weights` does with
    /// `initializer_range`.
    pub fn new(p: &nn::Path, hidden: i64, num_labels: i64, init_std: f64, dropout: f64) -> Self {
        let config = nn::LinearConfig {
            ws_init: nn::Init::Randn { mean: 0.0, stdev: init_std },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        Self { classifier: nn::linear(p / Self::MODULE, hidden, num_labels, config), dropout }
    }

    pub fn weight(&self) -> &Tensor {
        &self.classifier.ws
    }

    pub fn bias(&self) -> &Tensor {
        self.classifier.bs.as_ref().expect("the classifier has a bias")
    }

    /// `[batch, hidden]` pooled -> `[batch, labels]` logits.
    pub fn forward(&self, pooled: &Tensor, train: bool) -> Tensor {
        self.classifier.forward(&dropout(pooled, self.dropout, train))
    }
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

    /// Logits for `[batch, seq]` token ids and mask: `[batch, labels]` at
    /// the sequence level (the encoder must have a pooler), `[batch, seq,
    /// tags]` at the token level (prompt positions dropped, so they line up
    /// with `input_ids`).
    pub fn logits(&self, base: &BertModel, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Tensor {
        let encoder = self.encoder(base);
        let batch = input_ids.size()[0];
        let mut embeds = encoder.embed_ids(input_ids);
        let mut mask = attention_mask.shallow_clone();
        let prompt = self.input_prompt(train);
        let prompt_len = prompt.as_ref().map_or(0, |p| p.size()[0]);
        if let Some(prompt) = prompt {
            (embeds, mask, _) = prepend(&prompt, &embeds, &mask, None);
        }
        let (prefix_hooks, lora_hooks);
        let hooks: &dyn Hooks = match &self.adapter {
            Adapter::Prefix(prefix) => {
                prefix_hooks = prefix.hooks(batch, train);
                &prefix_hooks
            }
            Adapter::Lora(lora) => {
                lora_hooks = lora.hooks(train);
                &lora_hooks
            }
            _ => &NoHooks,
        };
        match self.level {
            Level::Sequence => {
                let first = encoder.forward_first(&embeds, &mask, None, hooks, train);
                let pooled = encoder.pool(&first).expect("sequence classification needs an encoder with a pooler");
                self.head.forward(&pooled, train)
            }
            Level::Token => {
                let hidden = encoder.forward(&embeds, &mask, None, hooks, train);
                self.head.forward(&drop_prompt(&hidden, prompt_len), train)
            }
        }
    }

    /// Mean cross-entropy of a sequence-level batch, in training mode (dropout on).
    pub fn train_loss(&self, encoder: &BertModel, batch: &Batch) -> Tensor {
        self.logits(encoder, &batch.input_ids, &batch.attention_mask, true)
            .cross_entropy_loss::<Tensor>(&batch.labels, None, Reduction::Mean, -100, 0.0)
    }

    /// Loss and accuracy over `examples` in eval mode, without gradients.
    pub fn evaluate(&self, encoder: &BertModel, examples: &[Example], batch_size: usize, pad_id: i64) -> Evaluation {
        let device = self.head.weight().device();
        let mut predictions = vec![0; examples.len()];
        let loss_sum = tch::no_grad(|| {
            let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
            for indices in length_sorted_batches(examples, batch_size) {
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
