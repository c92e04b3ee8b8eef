//! Base models: reading a Hugging Face model folder (`config.json`,
//! `model.safetensors`, `tokenizer.json`) into a frozen encoder.

pub mod bert;
pub mod decoder;
pub mod gpt2;
pub mod hooks;
pub mod llama;
pub mod registry;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tch::{nn, Kind, Tensor};

use self::bert::{BertConfig, BertModel};
use super::data::tokenize::TextTokenizer;
use super::EngineError;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// What a worker advertises about a base model, read without building it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    pub model_type: String,
    pub max_positions: u32,
    pub hidden_size: u32,
    pub num_layers: u32,
    pub num_attention_heads: u32,
    /// Floating-point weights in `model.safetensors` (buffers such as
    /// `position_ids` excluded).
    pub parameters: u64,
    /// Hex sha256 of `model.safetensors`.
    pub sha256: String,
}

/// Reads `config.json` and the `model.safetensors` header, and hashes the
/// weights, without building the model.
pub fn inspect_model(dir: &Path) -> Result<ModelInfo, EngineError> {
    let config = BertConfig::from_dir(dir)?;
    let header = SafetensorsHeader::read(&dir.join(WEIGHTS_FILE))?;
    Ok(ModelInfo {
        model_type: config.model_type.clone(),
        max_positions: to_u32(config.max_position_embeddings),
        hidden_size: to_u32(config.hidden_size),
        num_layers: to_u32(config.num_hidden_layers),
        num_attention_heads: to_u32(config.num_attention_heads),
        parameters: header.float_parameters(),
        sha256: weights_sha256(dir)?,
    })
}

/// Hex sha256 of the folder's `model.safetensors`.
pub fn weights_sha256(dir: &Path) -> Result<String, EngineError> {
    let path = dir.join(WEIGHTS_FILE);
    let file = File::open(&path).map_err(|e| model_file_error(&path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buffer).map_err(|e| EngineError::io(&path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A frozen base model with its tokenizer, shared by every job that runs on it.
pub struct BaseModel {
    pub config: BertConfig,
    pub encoder: BertModel,
    pub tokenizer: TextTokenizer,
    pub info: ModelInfo,
    /// Owns the encoder's tensors; frozen (no gradients, no optimizer state).
    _weights: nn::VarStore,
}

impl BaseModel {
    /// Loads a BERT-family model folder (BERT, MiniLM, RoBERTa) onto
    /// `device`. Weight names may carry the encoder's module prefix (`bert.`,
    /// `roberta.`, as `*For*` checkpoints do); other heads in the checkpoint
    /// are ignored.
    pub fn load(dir: &Path, device: tch::Device) -> Result<Self, EngineError> {
        let info = inspect_model(dir)?;
        let config = BertConfig::from_dir(dir)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let header = SafetensorsHeader::read(&weights_path)?;
        let module = config.module_name();
        let module_prefix = format!("{module}.");
        let prefix = ["", module_prefix.as_str()]
            .into_iter()
            .find(|prefix| header.tensors.contains_key(&format!("{prefix}embeddings.word_embeddings.weight")))
            .ok_or_else(|| {
                EngineError::Model(format!(
                    "{} has no embeddings.word_embeddings.weight; expected a BERT checkpoint",
                    weights_path.display()
                ))
            })?;
        let with_pooler = header.tensors.contains_key(&format!("{prefix}pooler.dense.weight"));

        let mut weights = nn::VarStore::new(device);
        let root = weights.root();
        let path = if prefix.is_empty() { root } else { root / module };
        let encoder = BertModel::new(&path, &config, with_pooler);
        weights.load(&weights_path).map_err(|e| match e {
            tch::TchError::TensorNameNotFound(name, _) => {
                EngineError::Model(format!("{} has no tensor {name}", weights_path.display()))
            }
            other => EngineError::Model(format!("cannot load {}: {other}", weights_path.display())),
        })?;
        weights.freeze();

        let tokenizer = TextTokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
        Ok(Self { config, encoder, tokenizer, info, _weights: weights })
    }
}

/// The JSON header of a safetensors file: tensor names, dtypes and shapes.
struct SafetensorsHeader {
    tensors: BTreeMap<String, TensorEntry>,
}

#[derive(Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<u64>,
}

impl SafetensorsHeader {
    /// Largest header accepted, as in the safetensors crate.
    const MAX_LEN: u64 = 100_000_000;

    fn read(path: &Path) -> Result<Self, EngineError> {
        let mut file = File::open(path).map_err(|e| model_file_error(path, e))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| EngineError::io(path, e))?;
        let len = u64::from_le_bytes(len);
        if len > Self::MAX_LEN {
            return Err(EngineError::Model(format!("{} is not a safetensors file", path.display())));
        }
        let mut json = vec![0u8; len as usize];
        file.read_exact(&mut json).map_err(|e| EngineError::io(path, e))?;
        let mut entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&json)
            .map_err(|e| EngineError::Model(format!("{} has an unreadable header: {e}", path.display())))?;
        entries.remove("__metadata__");
        let tensors = entries
            .into_iter()
            .map(|(name, value)| {
                let entry = serde_json::from_value(value).map_err(|e| {
                    EngineError::Model(format!("{} has a bad entry for {name}: {e}", path.display()))
                })?;
                Ok((name, entry))
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(Self { tensors })
    }

    fn float_parameters(&self) -> u64 {
        self.tensors
            .values()
            .filter(|t| matches!(t.dtype.as_str(), "F16" | "BF16" | "F32" | "F64"))
            .map(|t| t.shape.iter().product::<u64>())
            .sum()
    }
}

/// Inverted dropout: zeroes each element with probability `p` and scales the
/// rest by `1 / (1 - p)`, in training only. The keep mask comes from 31-bit
/// random integers compared with `p * 2^31`: the same distribution as
/// `Tensor::dropout`'s Bernoulli draws, which libtorch's CPU generator
/// produces about twice as slowly, and dropout dominates the non-matmul time
/// of a training step. The mask comes from the thread's active
/// [`DropoutStream`](crate::engine::rng::DropoutStream), if any.
pub(crate) fn dropout(xs: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return xs.shallow_clone();
    }
    crate::engine::rng::before_draw();
    let threshold = (p * 2f64.powi(31)).round() as i64;
    let mut draws = Tensor::empty(xs.size(), (Kind::Int, xs.device()));
    let keep = draws.random_().ge(threshold);
    xs * keep * (1.0 / (1.0 - p))
}

fn model_file_error(path: &Path, e: std::io::Error) -> EngineError {
    EngineError::Model(format!("cannot read {}: {e}", path.display()))
}

fn to_u32(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
