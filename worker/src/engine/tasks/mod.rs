//! Tasks: the head on top of the encoder, its loss and its evaluation.

pub mod seq_cls;
