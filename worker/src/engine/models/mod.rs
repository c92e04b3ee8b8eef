//! Base models: reading a Hugging Face model folder (`config.json`, the
//! safetensors weights, `tokenizer.json`) into a frozen network that every
//! job on it shares.
//!
//! - The toolkit the architectures build on: `safetensors.rs` (the one
//!   reader of checkpoints), `config.rs` (`config.json`), `layers.rs`
//!   (dropout, activations), `hooks.rs` (what a job may add to a forward
//!   pass, and where it fits), `decoder.rs` (what decoders share).
//! - The architectures: `bert/` (BERT, RoBERTa), `gpt2.rs`, `llama/`
//!   (Llama, Mistral, Qwen2). None knows another, nor any task or adapter.
//! - `factory.rs` picks the architecture of a folder, `frozen.rs` loads it
//!   with its tokenizer as a shared base, `registry.rs` says what a worker
//!   advertises about a folder.

pub mod bert;
pub mod config;
pub mod decoder;
pub mod factory;
pub mod frozen;
pub mod gpt2;
pub mod hooks;
pub mod layers;
pub mod llama;
pub mod registry;
pub mod safetensors;

/// The kind a frozen base's weights and inner activations take for
/// `training.precision`; a job's own parameters are float32 in every case.
pub fn base_kind(precision: ptune_core::Precision) -> tch::Kind {
    match precision {
        ptune_core::Precision::Fp32 => tch::Kind::Float,
        ptune_core::Precision::Bf16 => tch::Kind::BFloat16,
        ptune_core::Precision::Fp16 => tch::Kind::Half,
    }
}

/// Converts a frozen base's weights to `precision`'s kind ([`base_kind`]),
/// in place: the network built on `weights` holds these very tensors.
pub(crate) fn convert_frozen(weights: &mut tch::nn::VarStore, precision: ptune_core::Precision) {
    match precision {
        ptune_core::Precision::Fp32 => {}
        ptune_core::Precision::Bf16 => weights.bfloat16(),
        ptune_core::Precision::Fp16 => weights.half(),
    }
}

/// What a worker advertises about a base model, read without building it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    pub model_type: String,
    pub max_positions: u32,
    pub hidden_size: u32,
    pub num_layers: u32,
    pub num_attention_heads: u32,
    /// Floating-point weights in the checkpoint (buffers such as
    /// `position_ids` excluded).
    pub parameters: u64,
    /// Hex sha256 of the checkpoint's weights.
    pub sha256: String,
}
