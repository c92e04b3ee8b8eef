//! Reading an adapter back from a PEFT export (`adapter_config.json` and
//! `adapter_model.safetensors`, as PEFT's `save_pretrained` or this engine
//! writes them) onto a base that [`HookSites`] describes. PEFT keeps no
//! reparameterization encoder in an export: P-tuning's prompt and prefix
//! tuning's prefixes come back as the saved tables, for inference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::{nn, Device, Tensor};

use super::build::prefix_shape;
use super::lora::{Lora, LoraConfig};
use super::prefix::PrefixTuning;
use super::prompt_tuning::PromptTuning;
use super::adapter::Adapter;
use super::config::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use crate::engine::error::EngineError;
use crate::engine::models::hooks::{HookSites, HookedLinear};
use crate::engine::models::safetensors::read_tensors;

/// The two files of a PEFT export, read.
pub struct SavedAdapter {
    dir: PathBuf,
    /// `adapter_config.json`.
    pub config: Value,
    /// `adapter_model.safetensors`, float32, by key.
    tensors: HashMap<String, Tensor>,
}

impl SavedAdapter {
    /// Reads the export in `dir`, its tensors onto `device`.
    pub fn read(dir: &Path, device: Device) -> Result<Self, EngineError> {
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| EngineError::io(&config_path, e))?;
        let config = serde_json::from_str(&text)
            .map_err(|e| EngineError::Model(format!("{} is not json: {e}", config_path.display())))?;
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        let tensors = read_tensors(&weights_path, device)
            .map_err(|e| EngineError::Model(format!("cannot read {}: {e}", weights_path.display())))?;
        Ok(Self { dir: dir.to_path_buf(), config, tensors })
    }

    /// An error about this export.
    pub fn bad(&self, message: String) -> EngineError {
        EngineError::Model(format!("{}: {message}", self.dir.display()))
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// The saved tensor `key`.
    pub fn tensor(&self, key: &str) -> Result<&Tensor, EngineError> {
        self.tensors.get(key).ok_or_else(|| self.bad(format!("no tensor {key}")))
    }

    /// The saved tensor `key`, which must have the shape `expected`.
    fn tensor_shaped(&self, key: &str, expected: &[i64]) -> Result<&Tensor, EngineError> {
        let tensor = self.tensor(key)?;
        match tensor.size() == expected {
            true => Ok(tensor),
            false => Err(self.bad(format!("{key} has shape {:?}, expected {expected:?}", tensor.size()))),
        }
    }

    /// The adapter (`PROMPT_TUNING`, `P_TUNING`, `PREFIX_TUNING` or `LORA`)
    /// on a base that `sites` describes, its variables declared under `p`.
    pub fn adapter(&self, sites: &HookSites<'_>, p: &nn::Path) -> Result<Adapter, EngineError> {
        let key = PromptTuning::WEIGHTS_KEY;
        match self.config["peft_type"].as_str().unwrap_or_default() {
            "PROMPT_TUNING" | "P_TUNING" => {
                let nvt = self.tensor(key)?.size()[0];
                let table = self.tensor_shaped(key, &[nvt, sites.hidden_size])?;
                Ok(Adapter::PromptTuning(PromptTuning::from_table(p, table)))
            }
            "PREFIX_TUNING" => {
                let shape = prefix_shape(sites, self.tensor(key)?.size()[0]);
                let table = self.tensor_shaped(key, &[shape.num_virtual_tokens, shape.width()])?;
                let prefix = PrefixTuning::new(&(p / "prompt_encoder"), shape, None, 0.0);
                tch::no_grad(|| prefix.prefixes().copy_(table));
                Ok(Adapter::Prefix(prefix))
            }
            "LORA" => self.lora(sites, p),
            other => Err(self.bad(format!("unsupported peft_type {other:?}"))),
        }
    }

    /// The LoRA updates of the linears the export has weights for, with its
    /// rank and scaling.
    fn lora(&self, sites: &HookSites<'_>, p: &nn::Path) -> Result<Adapter, EngineError> {
        let number = |key: &str| {
            self.config[key].as_f64().ok_or_else(|| self.bad(format!("{ADAPTER_CONFIG_FILE} has no {key}")))
        };
        let linears = &sites.linears;
        let layer_of = |path: &str| Lora::key(&linears.layers, 0, path, "lora_A");
        let modules: Vec<HookedLinear> =
            linears.modules.iter().filter(|m| self.contains(&layer_of(m.path))).copied().collect();
        if modules.is_empty() {
            let first = linears.modules.first().map_or_else(String::new, |m| layer_of(m.path));
            return Err(self.bad(format!("no LoRA weights of a {} model (no {first})", sites.model_type)));
        }
        let config = LoraConfig {
            r: number("r")? as i64,
            alpha: number("lora_alpha")?,
            dropout: 0.0,
            modules,
            layers: linears.layers.clone(),
            fan_in_fan_out: linears.transposed,
        };
        let lora = Lora::new(p, config, linears.num_layers);
        for (key, mut variable) in lora.named_tensors() {
            let saved = self.tensor_shaped(&key, &variable.size())?;
            tch::no_grad(|| variable.copy_(saved));
        }
        Ok(Adapter::Lora(lora))
    }
}
