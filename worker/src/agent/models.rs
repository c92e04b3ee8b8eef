//! Base models a worker finds under `--models-dir`: every folder that holds a
//! Hugging Face model (`config.json`, weights, `tokenizer.json`). Models of an
//! architecture the engine trains are served; models it cannot train are
//! still advertised, with the reason, so that the coordinator refuses jobs on
//! them at submit instead of queueing them forever.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ptune_core::{ModelFamily, ModelShape};
use ptune_proto::v1;
use tracing::{info, warn};

use crate::engine::registry::{inspect_any, InspectError};
use crate::engine::ModelInfo;

/// A model this worker can train on.
#[derive(Clone, Debug)]
pub struct ServedModel {
    pub name: String,
    pub dir: PathBuf,
    pub info: ModelInfo,
}

impl ServedModel {
    /// What a job's memory estimate needs of the model; `None` only for a
    /// type missing from the model-type table, which inspection refuses.
    pub fn shape(&self) -> Option<ModelShape> {
        Some(ModelShape {
            parameters: self.info.parameters,
            hidden_size: self.info.hidden_size,
            num_layers: self.info.num_layers,
            num_attention_heads: self.info.num_attention_heads,
            family: ModelFamily::of(&self.info.model_type)?,
        })
    }

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
            unsupported_reason: String::new(),
        }
    }
}

/// A model folder whose architecture (or one of its settings) the engine
/// does not support.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsupportedModel {
    pub name: String,
    pub model_type: String,
    pub reason: String,
}

impl UnsupportedModel {
    pub fn to_wire(&self) -> v1::BaseModel {
        v1::BaseModel {
            name: self.name.clone(),
            model_type: self.model_type.clone(),
            unsupported_reason: self.reason.clone(),
            ..Default::default()
        }
    }
}

/// What a scan of the models directory found, sorted by name.
#[derive(Clone, Debug, Default)]
pub struct ModelScan {
    pub served: Vec<ServedModel>,
    pub unsupported: Vec<UnsupportedModel>,
}

impl ModelScan {
    /// Every model to advertise at registration, the unsupported ones included.
    pub fn to_wire(&self) -> Vec<v1::BaseModel> {
        self.served
            .iter()
            .map(ServedModel::to_wire)
            .chain(self.unsupported.iter().map(UnsupportedModel::to_wire))
            .collect()
    }
}

/// Finds the models under `dir` (symlinked folders included). Folders that do
/// not look like a model are skipped with a warning; models the engine cannot
/// train are kept apart with the reason.
pub fn scan_models(dir: &Path) -> anyhow::Result<ModelScan> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read models dir {}", dir.display()))?;
    let mut scan = ModelScan::default();
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.join("config.json").is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().to_string();
        match inspect_any(&path) {
            Ok(info) => {
                info!(model = %name, model_type = %info.model_type, sha256 = %info.sha256, "serving base model");
                scan.served.push(ServedModel { name, dir: path, info });
            }
            Err(InspectError::Unsupported { model_type, reason }) => {
                warn!(
                    model = %name,
                    model_type = %model_type,
                    reason = %reason,
                    "cannot train this model; advertising it as unsupported"
                );
                scan.unsupported.push(UnsupportedModel { name, model_type, reason });
            }
            Err(InspectError::NotAModel(err)) => {
                warn!(model = %name, error = %err, "skipping folder that is not a usable model")
            }
        }
    }
    scan.served.sort_by(|a, b| a.name.cmp(&b.name));
    scan.unsupported.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(scan)
}
