//! Classification on an encoder, at two levels:
//! - sequence, as Hugging Face `BertForSequenceClassification` computes it:
//!   the encoder's pooler output (dense + tanh over the hidden state at
//!   position 0), dropout, then a linear classifier; cross-entropy loss. With
//!   prompt tuning and P-tuning position 0 is the first virtual token, as in
//!   PEFT. RoBERTa, as `RobertaForSequenceClassification`, has no pooler:
//!   its head brings its own dense layer ([`ClassificationHead::roberta`]).
//!   With [`Pooling::Mean`](ptune_core::Pooling::Mean) the head reads the
//!   mean of the input's own tokens' hidden states instead, as
//!   sentence-transformers pools;
//! - token, as `BertForTokenClassification`: dropout and the same linear
//!   classifier over every real token's last hidden state (its data, loss
//!   and evaluation in `token_classification/`).
//!
//! Both levels train the same [`Classifier`] (`model.rs`): the job's adapter
//! or own copy of the encoder, and its head (`head.rs`). `data.rs` reads a
//! job's data and evaluates it, `run.rs` sets a job up for the training
//! loop and the pack, `export.rs` writes and reads its exports.

mod data;
mod evaluate;
mod export;
mod head;
mod model;
mod run;

pub use self::data::{ClassifierData, SequenceData, TrainBatch};
pub use self::evaluate::{evaluate, macro_f1, SequenceEvaluation};
pub use self::export::{adapter_tensors, load_classifier, model_config, peft_task_type, write_export};
pub use self::head::{ClassificationHead, Level};
pub use self::model::{Classifier, ClassifierInput};
pub use self::run::build_classifier;
