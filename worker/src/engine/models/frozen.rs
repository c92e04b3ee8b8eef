//! A frozen base model as jobs share it: the network, its tokenizer and
//! what the registry says of the folder. Its tensors never get gradients
//! or optimizer state; each job trains its own variables beside them.
//!
//! A base is loaded for one precision (`training.precision`): its weights
//! are read as float32 and converted once, so a bf16 base holds half the
//! bytes and every job on it computes the shared layers in bf16.

use std::path::{Path, PathBuf};

use ptune_core::{Architecture, Precision};
use tch::{nn, Device};

use super::bert::{BertConfig, BertModel};
use super::config::{model_type, TOKENIZER_FILE};
use super::decoder::CausalDecoder;
use super::factory::{architecture_of, load_causal_lm_in};
use super::hooks::HookSites;
use super::registry::inspect_any;
use super::safetensors::{checkpoint_tensor_names, load_checkpoint, WEIGHTS_FILE};
use super::{convert_frozen, ModelInfo};
use crate::engine::data::tokenize::{LmTokenizer, TextTokenizer};
use crate::engine::error::EngineError;

/// A frozen encoder (BERT, RoBERTa) with its tokenizer: the base of the
/// classification tasks.
pub struct FrozenEncoder {
    pub config: BertConfig,
    pub encoder: BertModel,
    pub tokenizer: TextTokenizer,
    pub info: ModelInfo,
    /// Owns the encoder's tensors; frozen (no gradients, no optimizer state).
    _weights: nn::VarStore,
}

impl FrozenEncoder {
    /// Loads a BERT-family model folder (BERT, MiniLM, RoBERTa) onto
    /// `device`. Weight names may carry the encoder's module prefix (`bert.`,
    /// `roberta.`, as `*For*` checkpoints do); other heads in the checkpoint
    /// are ignored.
    pub fn load(dir: &Path, device: Device) -> Result<Self, EngineError> {
        Self::load_in(dir, device, Precision::Fp32)
    }

    /// Loads the folder as [`Self::load`] does, with the weights converted
    /// to `precision`'s kind (see [`super::base_kind`]).
    pub fn load_in(dir: &Path, device: Device, precision: Precision) -> Result<Self, EngineError> {
        let info = inspect_any(dir)?;
        let config = BertConfig::from_dir(dir)?;
        let names = checkpoint_tensor_names(dir)?;
        let module = config.module_name();
        let module_prefix = format!("{module}.");
        let prefix = ["", module_prefix.as_str()]
            .into_iter()
            .find(|prefix| names.contains(&format!("{prefix}embeddings.word_embeddings.weight")))
            .ok_or_else(|| {
                EngineError::Model(format!(
                    "{} has no embeddings.word_embeddings.weight; expected a BERT checkpoint",
                    dir.join(WEIGHTS_FILE).display()
                ))
            })?;
        let with_pooler = names.contains(&format!("{prefix}pooler.dense.weight"));

        let mut weights = nn::VarStore::new(device);
        let root = weights.root();
        let path = if prefix.is_empty() { root } else { root / module };
        let encoder = BertModel::new(&path, &config, with_pooler);
        load_checkpoint(&weights, dir, &|name: &str| name.to_string())?;
        weights.freeze();
        convert_frozen(&mut weights, precision);

        let tokenizer = TextTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
        Ok(Self { config, encoder, tokenizer, info, _weights: weights })
    }

    /// Where a job's prompt, prefixes and linear deltas fit the encoder.
    pub fn hook_sites(&self) -> HookSites<'_> {
        let config = &self.config;
        HookSites {
            model_type: &config.model_type,
            word_embeddings: self.encoder.word_embeddings(),
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            num_layers: config.num_hidden_layers,
            num_attention_heads: config.num_attention_heads,
            num_kv_heads: config.num_attention_heads,
            head_dim: config.hidden_size / config.num_attention_heads,
            linears: config.linears(),
        }
    }
}

/// A frozen decoder-only model (GPT-2, the Llama family) with its
/// tokenizer: the base of causal LM.
pub struct FrozenDecoder {
    pub model: Box<dyn CausalDecoder>,
    /// The model's folder, which full fine-tuning loads a copy of.
    pub dir: PathBuf,
    pub tokenizer: LmTokenizer,
    pub info: ModelInfo,
}

impl FrozenDecoder {
    /// Loads the GPT-2 or Llama-family folder `dir` onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self, EngineError> {
        Self::load_in(dir, device, Precision::Fp32)
    }

    /// Loads the folder as [`Self::load`] does, with the weights converted
    /// to `precision`'s kind (see [`super::base_kind`] and `decoder.rs`).
    pub fn load_in(dir: &Path, device: Device, precision: Precision) -> Result<Self, EngineError> {
        let info = inspect_any(dir)?;
        let model = load_causal_lm_in(dir, device, precision)?;
        let tokenizer = LmTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
        Ok(Self { model, tokenizer, info, dir: dir.to_path_buf() })
    }
}

/// A frozen base of either family.
// One per loaded model, behind an `Arc`: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum FrozenBase {
    Encoder(FrozenEncoder),
    Decoder(FrozenDecoder),
}

impl FrozenBase {
    /// Loads the model folder `dir` onto `device` as its config's
    /// `model_type` says: an encoder or a decoder.
    pub fn load(dir: &Path, device: Device) -> Result<Self, EngineError> {
        Self::load_in(dir, device, Precision::Fp32)
    }

    /// Loads the folder as [`Self::load`] does, in `precision`.
    pub fn load_in(dir: &Path, device: Device, precision: Precision) -> Result<Self, EngineError> {
        let model_type = model_type(dir)?;
        match architecture_of(&model_type) {
            Some(Architecture::Encoder) => Ok(Self::Encoder(FrozenEncoder::load_in(dir, device, precision)?)),
            Some(Architecture::Decoder) => Ok(Self::Decoder(FrozenDecoder::load_in(dir, device, precision)?)),
            None => Err(EngineError::Model(format!(
                "unsupported model_type {model_type:?}; supported: {}",
                ptune_core::ModelType::all_names().join(", ")
            ))),
        }
    }

    pub fn architecture(&self) -> Architecture {
        match self {
            Self::Encoder(_) => Architecture::Encoder,
            Self::Decoder(_) => Architecture::Decoder,
        }
    }

    pub fn info(&self) -> &ModelInfo {
        match self {
            Self::Encoder(base) => &base.info,
            Self::Decoder(base) => &base.info,
        }
    }

    /// The encoder, if this is one.
    pub fn encoder(&self) -> Option<&FrozenEncoder> {
        match self {
            Self::Encoder(base) => Some(base),
            Self::Decoder(_) => None,
        }
    }

    /// The decoder, if this is one.
    pub fn decoder(&self) -> Option<&FrozenDecoder> {
        match self {
            Self::Decoder(base) => Some(base),
            Self::Encoder(_) => None,
        }
    }
}
