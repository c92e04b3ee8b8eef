//! The trainable head of a classifier on an encoder, as Hugging Face's
//! `*ForSequenceClassification` and `*ForTokenClassification` build it, at
//! either [`Level`]: where its weights live (`classifier.*`, as PEFT saves
//! them beside an adapter), how they start, and the logits it computes.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::engine::models::bert::{BertConfig, BertModel};
use crate::engine::models::layers::dropout;

/// What a classifier labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// One label per sequence, from the pooled first position.
    Sequence,
    /// One tag per token, from each real token's hidden state.
    Token,
}

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
