//! Reading safetensors checkpoints, the one place that does: a model
//! folder's weights as one `model.safetensors` or as the shards that
//! `model.safetensors.index.json` names, their headers (tensor names,
//! dtypes and shapes, read without loading any weights), their content hash,
//! and their tensors, copied into a model's variables or handed over by name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tch::{nn, Device, Kind, Tensor};

use crate::engine::error::EngineError;

/// The weights of a model folder in one file.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of a sharded checkpoint, naming the shard of every tensor.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// The safetensors files of a checkpoint: the shards named by
/// `model.safetensors.index.json` when present, else `model.safetensors`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        let files: BTreeSet<String> = read_weight_map(&index)?.into_values().collect();
        return Ok(files.into_iter().map(|file| dir.join(file)).collect());
    }
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(EngineError::Model(format!("{} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}", dir.display())))
}

/// Names of every tensor in the checkpoint, read from the index or the
/// file header without loading weights.
pub fn checkpoint_tensor_names(dir: &Path) -> Result<BTreeSet<String>, EngineError> {
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        return Ok(read_weight_map(&index)?.into_keys().collect());
    }
    let mut names = BTreeSet::new();
    for file in checkpoint_files(dir)? {
        names.extend(read_header(&file)?.into_keys());
    }
    Ok(names)
}

/// Floating-point weights across the checkpoint's files, from their headers.
pub fn checkpoint_float_parameters(dir: &Path) -> Result<u64, EngineError> {
    let mut total = 0;
    for file in checkpoint_files(dir)? {
        for entry in read_header(&file)?.values() {
            if matches!(entry.dtype.as_str(), "F16" | "BF16" | "F32" | "F64") {
                total += entry.shape.iter().product::<u64>();
            }
        }
    }
    Ok(total)
}

/// Hex sha256 of the checkpoint's weights: of `model.safetensors`, or of
/// the shards' bytes one after the other in file-name order.
pub fn checkpoint_sha256(dir: &Path) -> Result<String, EngineError> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    for path in checkpoint_files(dir)? {
        let mut file = File::open(&path).map_err(|e| EngineError::Model(format!("cannot read {}: {e}", path.display())))?;
        loop {
            let n = file.read(&mut buffer).map_err(|e| EngineError::io(&path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

fn read_weight_map(index: &Path) -> Result<BTreeMap<String, String>, EngineError> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index)
        .map_err(|e| EngineError::Model(format!("cannot read {}: {e}", index.display())))?;
    let index_file: Index = serde_json::from_str(&text)
        .map_err(|e| EngineError::Model(format!("{} is not a safetensors index: {e}", index.display())))?;
    for file in index_file.weight_map.values() {
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(EngineError::Model(format!("{} names a shard outside its folder: {file}", index.display())));
        }
    }
    Ok(index_file.weight_map)
}

/// What a safetensors header says of one tensor.
#[derive(Clone, Debug, Deserialize)]
pub struct HeaderEntry {
    /// `F32`, `BF16`, `I64`, ...
    pub dtype: String,
    pub shape: Vec<u64>,
}

/// The tensors a safetensors file declares, from its JSON header.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, HeaderEntry>, EngineError> {
    const MAX_HEADER: u64 = 100_000_000;
    let mut file = File::open(path).map_err(|e| EngineError::Model(format!("cannot read {}: {e}", path.display())))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| EngineError::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(EngineError::Model(format!("{} is not a safetensors file", path.display())));
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json).map_err(|e| EngineError::io(path, e))?;
    let mut header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&json)
        .map_err(|e| EngineError::Model(format!("{} has an unreadable header: {e}", path.display())))?;
    header.remove("__metadata__");
    header
        .into_iter()
        .map(|(name, value)| {
            let entry = serde_json::from_value(value)
                .map_err(|e| EngineError::Model(format!("{} has a bad entry for {name}: {e}", path.display())))?;
            Ok((name, entry))
        })
        .collect()
}

/// Every tensor of the safetensors file `path` by name, as float32 on
/// `device`.
pub fn read_tensors(path: &Path, device: Device) -> Result<HashMap<String, Tensor>, tch::TchError> {
    Ok(Tensor::read_safetensors(path)?
        .into_iter()
        .map(|(name, tensor)| (name, tensor.to_kind(Kind::Float).to_device(device)))
        .collect())
}

/// Copies every variable of `weights` from the checkpoint in `dir`, where
/// the variable named `v` is stored as `checkpoint_name(v)`, converting
/// dtypes (e.g. bf16 shards into f32 variables). Shards are read one at a
/// time; tensors the model does not use are ignored.
pub(crate) fn load_checkpoint(
    weights: &nn::VarStore,
    dir: &Path,
    checkpoint_name: &dyn Fn(&str) -> String,
) -> Result<(), EngineError> {
    let variables = weights.variables();
    let mut wanted: HashMap<String, String> =
        variables.keys().map(|name| (checkpoint_name(name), name.clone())).collect();
    for file in checkpoint_files(dir)? {
        let tensors = Tensor::read_safetensors(&file)
            .map_err(|e| EngineError::Model(format!("cannot load {}: {e}", file.display())))?;
        for (stored, tensor) in tensors {
            let Some(name) = wanted.remove(&stored) else { continue };
            let mut variable = variables[&name].shallow_clone();
            if variable.size() != tensor.size() {
                return Err(EngineError::Model(format!(
                    "{} holds {stored} with shape {:?}, expected {:?}",
                    file.display(),
                    tensor.size(),
                    variable.size()
                )));
            }
            tch::no_grad(|| variable.f_copy_(&tensor))?;
        }
    }
    if let Some(missing) = wanted.keys().min() {
        return Err(EngineError::Model(format!(
            "the checkpoint in {} has no tensor {missing} ({} missing in all)",
            dir.display(),
            wanted.len()
        )));
    }
    Ok(())
}
