//! LoRA (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>) as Hugging Face
//! PEFT's `LORA`: each targeted frozen linear `W` gets a trainable update
//! `B A x * lora_alpha / r`, with `A` `[r, in]` initialised as PyTorch
//! initialises linears and `B` `[out, r]` zero, so training starts from the
//! base model. Dropout applies to the update's input in training.
//!
//! Variables are named as PEFT saves them for a BERT sequence classifier:
//! `base_model.model.bert.encoder.layer.N.attention.self.query.lora_A.weight`
//! (`roberta` in place of `bert` for RoBERTa).

use std::collections::BTreeMap;

use ptune_core::SpecError;
use tch::nn;
use tch::Tensor;

use crate::engine::models::bert::{module_path, LINEAR_MODULES};
use crate::engine::models::dropout;
use crate::engine::models::hooks::Hooks;

/// Where the layers of an encoder whose module is `encoder` (`bert`,
/// `roberta`) live in a PEFT-wrapped classifier.
fn layers_prefix(encoder: &str) -> String {
    format!("base_model.model.{encoder}.encoder.layer")
}

/// Default targets for BERT, as PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`.
pub const DEFAULT_TARGETS: [&str; 2] = ["query", "value"];

/// Resolves `peft.target_modules` to BERT's per-layer linears with PEFT's
/// rule (a module matches a target equal to its name or ending in `.target`).
/// A target that matches nothing, or the pooler, is refused.
pub fn resolve_targets(targets: &[String]) -> Result<Vec<&'static str>, SpecError> {
    let matches = |path: &str, target: &str| path == target || path.ends_with(&format!(".{target}"));
    let mut modules = Vec::new();
    for target in targets {
        if matches("bert.pooler.dense", target) {
            return Err(SpecError::new(
                "peft.target_modules",
                format!("{target:?} would also match the pooler, which a sequence classifier keeps frozen; name the layer's linears, e.g. \"attention.output.dense\""),
            ));
        }
        let found: Vec<&'static str> =
            LINEAR_MODULES.into_iter().filter(|m| matches(&module_path(m), target)).collect();
        if found.is_empty() {
            return Err(SpecError::new(
                "peft.target_modules",
                format!(
                    "{target:?} matches no linear layer of this BERT model; allowed: query, key, value, attention.output.dense, intermediate.dense, output.dense"
                ),
            ));
        }
        modules.extend(found);
    }
    Ok(LINEAR_MODULES.into_iter().filter(|m| modules.contains(m)).collect())
}

/// Settings of a LoRA adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// Modules of [`LINEAR_MODULES`] that get an update.
    pub modules: Vec<&'static str>,
    /// The encoder's module name in the classifier (`bert`, `roberta`),
    /// part of every PEFT key.
    pub encoder: &'static str,
}

/// One low-rank update: `A` `[r, in]` and `B` `[out, r]`.
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// The LoRA updates of one job.
pub struct Lora {
    config: LoraConfig,
    /// Per layer, per module name.
    layers: Vec<BTreeMap<&'static str, LoraPair>>,
}

impl Lora {
    /// Declares the updates for `num_layers` layers under `p` (the root of
    /// the job's variables). `dims(module)` gives the module's (in, out).
    pub fn new(p: &nn::Path, config: LoraConfig, num_layers: i64, dims: impl Fn(&str) -> (i64, i64)) -> Self {
        let layers = (0..num_layers)
            .map(|layer| {
                config
                    .modules
                    .iter()
                    .map(|&module| {
                        let (in_dim, out_dim) = dims(module);
                        let path = module_var_path(p, config.encoder, layer, module);
                        let bound = 1.0 / (in_dim as f64).sqrt();
                        let a = (&path / "lora_A").uniform("weight", &[config.r, in_dim], -bound, bound);
                        let b = (&path / "lora_B").zeros("weight", &[out_dim, config.r]);
                        (module, LoraPair { a, b })
                    })
                    .collect()
            })
            .collect();
        Self { config, layers }
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The update of `module` in `layer`, if it has one.
    pub fn pair(&self, layer: usize, module: &str) -> Option<&LoraPair> {
        self.layers.get(layer)?.get(module)
    }

    /// PEFT's key of a module's `lora_A` or `lora_B` weight in an encoder
    /// whose module is `encoder`.
    pub fn key(encoder: &str, layer: usize, module: &str, which: &str) -> String {
        format!("{}.{layer}.{}.{which}.weight", layers_prefix(encoder), module_path(module))
    }

    /// Every update with its PEFT keys.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::new();
        for (layer, modules) in self.layers.iter().enumerate() {
            for (module, pair) in modules {
                let encoder = self.config.encoder;
                tensors.push((Self::key(encoder, layer, module, "lora_A"), pair.a.shallow_clone()));
                tensors.push((Self::key(encoder, layer, module, "lora_B"), pair.b.shallow_clone()));
            }
        }
        tensors
    }

    pub fn hooks(&self, train: bool) -> LoraHooks<'_> {
        LoraHooks { lora: self, train }
    }
}

/// The variable path of a module's updates: PEFT's key without `.lora_A.weight`.
fn module_var_path<'a>(p: &nn::Path<'a>, encoder: &str, layer: i64, module: &str) -> nn::Path<'a> {
    let mut path = p.clone();
    for part in layers_prefix(encoder).split('.') {
        path = path / part;
    }
    path = path / layer;
    for part in module_path(module).split('.') {
        path = path / part;
    }
    path
}

/// LoRA's additions to one forward pass.
pub struct LoraHooks<'a> {
    lora: &'a Lora,
    train: bool,
}

impl Hooks for LoraHooks<'_> {
    fn linear_delta(&self, layer: usize, module: &str, xs: &Tensor) -> Option<Tensor> {
        let pair = self.lora.pair(layer, module)?;
        let config = &self.lora.config;
        let xs = dropout(xs, config.dropout, self.train);
        let scaling = config.alpha / config.r as f64;
        Some(xs.linear::<Tensor>(&pair.a, None).linear::<Tensor>(&pair.b, None) * scaling)
    }
}
