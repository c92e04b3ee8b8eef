//! Token classification (named-entity recognition): one tag per word, from
//! the classifier's head over every real token (see `head.rs`), scored by
//! entity as seqeval scores it (see `entities.rs`).
//!
//! A job runs as a classifier at the token level: the classifier, its
//! setup and its exports are those of `classification/`, which reads this
//! task's data (`data.rs`), loss (`head.rs`) and evaluation
//! (`evaluate.rs`). Everything here takes the encoder's sequence output
//! `[batch, seq, hidden]` (or the logits) rather than running the encoder,
//! so any PEFT method's forward can feed it. With prompt tuning or P-tuning
//! the output carries the prompt first; [`drop_prompt`] removes it.

mod data;
mod entities;
mod evaluate;
mod head;

pub use self::data::TokenData;
pub use self::entities::{entities, Entity, EntityCounts, EntityScores};
pub use self::evaluate::{evaluate, TokenEvaluation};
pub use self::head::{drop_prompt, token_loss};
