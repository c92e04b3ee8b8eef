//! Writing Hugging Face exports: a PEFT adapter folder (`adapter_config.json`
//! and `adapter_model.safetensors`, as PEFT's `save_pretrained` writes
//! them, so `PeftModel.from_pretrained` loads them) or, for full
//! fine-tuning, a model folder (`config.json` and `model.safetensors`, as
//! transformers' `save_pretrained` writes them); each with `ptune.json`,
//! how it was trained. What goes into the files is the task's (its head,
//! its model config) and PEFT's (`peft/config.rs`); how they are written is
//! here: each file beside its final name, then renamed into place, so a
//! reader never sees half a file.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use serde_json::Value;
use tch::{nn, Kind, Tensor};

use super::error::EngineError;
use super::models::config::{CONFIG_FILE, TOKENIZER_FILE};
use super::models::safetensors::WEIGHTS_FILE;
use super::peft::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};

/// File names of a full fine-tuning export (a Hugging Face model folder).
pub const MODEL_CONFIG_FILE: &str = CONFIG_FILE;
pub const MODEL_WEIGHTS_FILE: &str = WEIGHTS_FILE;
/// Training provenance written beside the PEFT files (PEFT warns about unknown
/// keys in `adapter_config.json`, so it is kept out of that file).
pub const PROVENANCE_FILE: &str = "ptune.json";

/// Files of a model folder besides its config and weights that a model
/// folder export takes over from the base's folder, where it has them.
const BASE_FILES: [&str; 4] = [TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];

/// Writes a PEFT export into `out_dir` (created if missing): `tensors`
/// (under PEFT's key names) as `adapter_model.safetensors`, `config` as
/// `adapter_config.json`, and `provenance` as `ptune.json`.
pub fn write_adapter(
    out_dir: &Path,
    tensors: &[(String, Tensor)],
    config: &Value,
    provenance: &Value,
) -> Result<(), EngineError> {
    std::fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;
    write_safetensors(&out_dir.join(ADAPTER_WEIGHTS_FILE), tensors)?;
    write_json(&out_dir.join(ADAPTER_CONFIG_FILE), config)?;
    write_json(&out_dir.join(PROVENANCE_FILE), provenance)
}

/// Writes a model folder into `out_dir` (created if missing): every
/// variable of `vars` (named as the Hugging Face model names its
/// parameters) as `model.safetensors`, `config` as `config.json`, the
/// tokenizer and generation files of `base_dir` where it has them, and
/// `provenance` as `ptune.json`.
pub fn write_model(
    out_dir: &Path,
    vars: &nn::VarStore,
    config: &Value,
    base_dir: Option<&Path>,
    provenance: &Value,
) -> Result<(), EngineError> {
    std::fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;
    write_model_weights(out_dir, vars)?;
    write_json(&out_dir.join(MODEL_CONFIG_FILE), config)?;
    for name in base_dir.into_iter().flat_map(|dir| BASE_FILES.map(|name| dir.join(name))) {
        if name.is_file() {
            let target = out_dir.join(name.file_name().expect("a file name"));
            let partial = partial_path(&target);
            std::fs::copy(&name, &partial).map_err(|e| EngineError::io(&name, e))?;
            std::fs::rename(&partial, &target).map_err(|e| EngineError::io(&target, e))?;
        }
    }
    write_json(&out_dir.join(PROVENANCE_FILE), provenance)
}

/// Writes every variable of `vars`, by name, as the folder's `model.safetensors`.
fn write_model_weights(out_dir: &Path, vars: &nn::VarStore) -> Result<(), EngineError> {
    let mut tensors: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors(&out_dir.join(MODEL_WEIGHTS_FILE), &tensors)
}

/// Writes float32 tensors with the `{"format": "pt"}` metadata PyTorch
/// writers use.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), EngineError> {
    let views: Vec<(&str, FloatView)> = tensors
        .iter()
        .map(|(name, tensor)| {
            // For a float32 CPU tensor, the same storage: nothing is copied yet.
            let tensor = tensor.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
            let shape = tensor.size().iter().map(|&d| d as usize).collect();
            (name.as_str(), FloatView { tensor, shape })
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let partial = partial_path(path);
    crate::faults::check_write().map_err(|e| EngineError::io(&partial, e))?;
    safetensors::tensor::serialize_to_file(views, Some(metadata), &partial).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        let source = match e {
            safetensors::SafeTensorError::IoError(io) => io,
            other => std::io::Error::other(other),
        };
        EngineError::io(&partial, source)
    })?;
    crate::durable::sync_file(&partial).map_err(|e| EngineError::io(&partial, e))?;
    crate::durable::rename(&partial, path).map_err(|e| EngineError::io(path, e))
}

#[cfg(target_endian = "big")]
compile_error!("safetensors files are little-endian; FloatView writes a tensor's native bytes");

/// A contiguous float32 CPU tensor that yields its bytes only when the
/// writer reaches it, so that writing a file holds one tensor's bytes at a
/// time rather than a copy of all of them (for a full fine-tuning
/// checkpoint, three copies of the model).
struct FloatView {
    tensor: Tensor,
    shape: Vec<usize>,
}

impl safetensors::View for FloatView {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut bytes = vec![0u8; self.data_len()];
        self.tensor.copy_data_u8(&mut bytes, self.tensor.numel());
        std::borrow::Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.tensor.numel() * std::mem::size_of::<f32>()
    }
}

fn write_json(path: &Path, value: &Value) -> Result<(), EngineError> {
    let text = serde_json::to_string_pretty(value).expect("json values serialize");
    let partial = partial_path(path);
    std::fs::write(&partial, text + "\n").map_err(|e| EngineError::io(&partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| EngineError::io(path, e))
}

fn partial_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}
