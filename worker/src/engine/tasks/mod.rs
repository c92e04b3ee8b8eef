//! Tasks: the head on top of the encoder, its loss and its evaluation.

pub mod bleu;
pub mod causal_lm;
pub mod classifier;
pub mod token_cls;
