//! Which network a model folder holds, from its config's `model_type` and
//! the model-type table (`ptune_core::model_types`: each type's family, and
//! whether it is an encoder or a decoder): for decoders, the network to
//! build (GPT-2, or the Llama family). The architectures know nothing of one
//! another; only this file builds them.

use std::path::Path;

use tch::{nn, Device};

use ptune_core::{Architecture, ModelFamily, ModelType, Precision};

use super::config::model_type;
use super::decoder::CausalDecoder;
use super::gpt2::Gpt2Model;
use super::llama::LlamaModel;
use crate::engine::error::EngineError;

/// Whether `model_type` is an encoder or a decoder, if the engine trains it.
pub fn architecture_of(model_type: &str) -> Option<Architecture> {
    ModelFamily::of(model_type).map(ModelFamily::architecture)
}

/// Loads the causal LM in `dir` as float32, frozen, choosing the
/// architecture by the config's `model_type` (`gpt2`; `llama`, `mistral`,
/// `qwen2`).
pub fn load_causal_lm(dir: &Path, device: Device) -> Result<Box<dyn CausalDecoder>, EngineError> {
    load_causal_lm_in(dir, device, Precision::Fp32)
}

/// Loads the causal LM in `dir` as [`load_causal_lm`] does, with its frozen
/// weights converted to `precision`'s kind ([`super::base_kind`]).
pub fn load_causal_lm_in(dir: &Path, device: Device, precision: Precision) -> Result<Box<dyn CausalDecoder>, EngineError> {
    load_architecture(
        dir,
        || Ok(Box::new(Gpt2Model::load_in(dir, device, precision)?)),
        || Ok(Box::new(LlamaModel::load_in(dir, device, precision)?)),
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
    match ModelFamily::of(&model_type) {
        Some(ModelFamily::Gpt2) => gpt2(),
        Some(ModelFamily::Llama) => llama(),
        _ => Err(EngineError::Model(format!(
            "unsupported causal lm model_type {model_type:?}; supported: {}",
            ModelType::names_of(Architecture::Decoder).join(", ")
        ))),
    }
}
