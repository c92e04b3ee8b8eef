//! Base models a worker serves: every folder under `--models-dir` that holds a
//! Hugging Face model (`config.json`, weights, `tokenizer.json`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use ptune_proto::v1;
use tracing::{info, warn};

use crate::engine::{inspect_model, ModelInfo};

/// A model this worker can train on.
#[derive(Clone, Debug)]
pub struct ServedModel {
    pub name: String,
    pub dir: PathBuf,
    pub info: ModelInfo,
}

impl ServedModel {
    pub fn to_wire(&self) -> v1::BaseModel {
        v1::BaseModel {
            name: self.name.clone(),
            sha256: self.info.sha256.clone(),
            model_type: self.info.model_type.clone(),
            max_positions: self.info.max_positions,
            hidden_size: self.info.hidden_size,
            num_layers: self.info.num_layers,
            num_attention_heads: self.info.num_attention_heads,
            parameters: self.info.parameters,
        }
    }
}

/// Finds the models under `dir` (symlinked folders included). Folders that do
/// not look like a model are skipped with a warning.
pub fn scan_models(dir: &Path) -> anyhow::Result<Vec<ServedModel>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read models dir {}", dir.display()))?;
    let mut models = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.join("config.json").is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().to_string();
        match inspect_model(&path) {
            Ok(info) => {
                info!(model = %name, model_type = %info.model_type, sha256 = %info.sha256, "serving base model");
                models.push(ServedModel { name, dir: path, info });
            }
            Err(err) => warn!(model = %name, error = %err, "skipping folder that is not a usable model"),
        }
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(models)
}
