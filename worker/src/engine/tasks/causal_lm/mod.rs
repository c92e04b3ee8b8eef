//! Causal language modelling on a frozen decoder (GPT-2, the Llama family),
//! as PEFT's `CAUSAL_LM` task: a prompt (prompt tuning, P-tuning), key/value
//! prefixes (prefix tuning, P-tuning v2), low-rank updates of the layers'
//! linears (LoRA) or the job's own copy of the decoder (full fine-tuning),
//! trained for text-to-text generation.
//!
//! - `data.rs`: the job's source/target pairs and evaluation inputs, as
//!   token sequences labelled on the target only.
//! - `model.rs`: the forward with a job's adapter and the training loss, as
//!   Hugging Face `*ForCausalLM` computes it; `pass.rs`: a training pass
//!   several jobs share.
//! - `generate.rs`: greedy and beam search as Hugging Face `generate`;
//!   `evaluate.rs` and `bleu.rs`: evaluation by the loss on each input's
//!   first reference and corpus BLEU of the decoded outputs (greedy or beam
//!   search, as `[generation]` sets) against all references.
//! - `run.rs`: a job's setup for the training loop and the pack, and its
//!   exports.

pub mod bleu;
mod data;
mod evaluate;
mod generate;
mod model;
mod pass;
mod run;

pub use self::data::{LmBatch, LmData};
pub use self::evaluate::{evaluate_bleu, BleuEvaluation};
pub use self::generate::{generate, GenerationConfig};
pub use self::model::{evaluate_loss, hidden_states, logits, shifted_loss_sum, train_loss, LmAdapter, IGNORE_INDEX};
pub use self::pass::{packed_train_losses, LmMember};
