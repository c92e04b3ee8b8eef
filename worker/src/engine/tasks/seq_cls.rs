//! Sequence classification as Hugging Face `BertForSequenceClassification`
//! computes it: the encoder's pooler output (dense + tanh over the hidden
//! state at position 0), dropout, then a linear classifier; cross-entropy loss.
//! With prompt tuning and P-tuning position 0 is the first virtual token, as
//! in PEFT; prefixes and LoRA updates ride along as the forward's hooks.

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

/// A classifier of one job: its adapter and head, run on a shared frozen
/// encoder (or, for full fine-tuning, on its own copy).
pub struct SeqClsModel {
    pub adapter: Adapter,
    pub head: ClassificationHead,
}
/// Eval loss (mean cross-entropy), accuracy and predictions over a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    /// Predicted label index of each example, in dataset order.
    pub predictions: Vec<usize>,
}

impl SeqClsModel {
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

    /// `[batch, labels]` logits for `[batch, seq]` token ids and mask.
    /// The encoder must have a pooler.
    pub fn logits(&self, base: &BertModel, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Tensor {
        let encoder = self.encoder(base);
        let batch = input_ids.size()[0];
        let mut embeds = encoder.embed_ids(input_ids);
        let mut mask = attention_mask.shallow_clone();
        if let Some(prompt) = self.input_prompt(train) {
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
        let first = encoder.forward_first(&embeds, &mask, None, hooks, train);
        let pooled = encoder.pool(&first).expect("sequence classification needs an encoder with a pooler");
        self.head.forward(&pooled, train)
    }

    /// Mean cross-entropy of a batch, in training mode (dropout on).
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
