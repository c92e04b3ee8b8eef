//! Which architecture a model folder holds, read from its config's
//! `model_type`: the family it belongs to (an encoder for the
//! classification tasks, a decoder for causal LM) and, for decoders, the
//! network to build (GPT-2, or the Llama family). The architectures know
//! nothing of one another; only this file knows them all.

use std::path::Path;

use tch::{nn, Device};

use super::bert::BertConfig;
use super::config::model_type;
use super::decoder::CausalDecoder;
use super::gpt2::{Gpt2Config, Gpt2Model};
use super::llama::{LlamaConfig, LlamaModel};
use crate::engine::error::EngineError;

/// The two kinds of architecture the engine trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// A bidirectional encoder (BERT, RoBERTa): sequence and token classification.
    Encoder,
    /// A decoder-only language model (GPT-2, Llama, Mistral, Qwen2): causal LM.
    Decoder,
}

impl Family {
    /// The family of the architecture `model_type` names, if the engine
    /// trains it.
    pub fn of(model_type: &str) -> Option<Self> {
        if BertConfig::MODEL_TYPES.contains(&model_type) {
            Some(Self::Encoder)
        } else if Gpt2Config::MODEL_TYPES.contains(&model_type) || LlamaConfig::MODEL_TYPES.contains(&model_type) {
            Some(Self::Decoder)
        } else {
            None
        }
    }
}

/// Loads the causal LM in `dir`, choosing the architecture by the config's
/// `model_type` (`gpt2`; `llama`, `mistral`, `qwen2`).
pub fn load_causal_lm(dir: &Path, device: Device) -> Result<Box<dyn CausalDecoder>, EngineError> {
    load_architecture(
        dir,
        || Ok(Box::new(Gpt2Model::load(dir, device)?)),
        || Ok(Box::new(LlamaModel::load(dir, device)?)),
    )
}

/// Loads the causal LM in `dir` into `weights` (empty until now) as a
/// trainable copy: every variable requires a gradient, and the variables are
/// named as the Hugging Face `*ForCausalLM` names its parameters (full
/// fine-tuning).
pub fn load_trainable_causal_lm(dir: &Path, weights: &nn::VarStore) -> Result<Box<dyn CausalDecoder>, EngineError> {
    let model = load_architecture(
        dir,
        || Ok(Box::new(Gpt2Model::load_into(dir, weights)?)),
        || Ok(Box::new(LlamaModel::load_into(dir, weights)?)),
    )?;
    for (_, variable) in weights.variables() {
        let _ = variable.set_requires_grad(true);
    }
    Ok(model)
}

/// Calls `gpt2` or `llama` by the config's `model_type`.
fn load_architecture(
    dir: &Path,
    gpt2: impl FnOnce() -> Result<Box<dyn CausalDecoder>, EngineError>,
    llama: impl FnOnce() -> Result<Box<dyn CausalDecoder>, EngineError>,
) -> Result<Box<dyn CausalDecoder>, EngineError> {
    let model_type = model_type(dir)?;
    if Gpt2Config::MODEL_TYPES.contains(&model_type.as_str()) {
        gpt2()
    } else if LlamaConfig::MODEL_TYPES.contains(&model_type.as_str()) {
        llama()
    } else {
        Err(EngineError::Model(format!(
            "unsupported causal lm model_type {model_type:?}; supported: {}, {}",
            Gpt2Config::MODEL_TYPES.join(", "),
            LlamaConfig::MODEL_TYPES.join(", ")
        )))
    }
}
