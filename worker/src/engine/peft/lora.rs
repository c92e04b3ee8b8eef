//! LoRA (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>) as Hugging Face
//! PEFT's `LORA`: each targeted frozen linear `W` gets a trainable update
//! `B A x * lora_alpha / r`, with `A` `[r, in]` initialised as PyTorch
//! initialises linears and `B` `[out, r]` zero, so training starts from the
//! base model. Dropout applies to the update's input in training.
//!
//! The same update serves every architecture: a model lists the linears of
//! one layer that hooks may change ([`HookedLinear`]) and where its layers
//! live in the Hugging Face model (`bert.encoder.layer`, `transformer.h`,
//! `model.layers`), as [`Linears`]; PEFT's default targets come from the
//! model-type table in `ptune_core::model_types` ([`default_targets`]). Variables are named as PEFT saves them, e.g.
//! `base_model.model.bert.encoder.layer.N.attention.self.query.lora_A.weight`
//! or `base_model.model.transformer.h.N.attn.c_attn.lora_A.weight`.
//! GPT-2's `Conv1D` linears store their weight transposed, which changes
//! nothing here (PEFT's `fan_in_fan_out` only matters when merging).

use std::collections::BTreeMap;

use ptune_core::model_types::lora_target_matches as target_matches;
use ptune_core::spec::PeftConfig;
use ptune_core::{ModelFamily, SpecError};
use tch::nn;
use tch::Tensor;

use crate::engine::models::hooks::{HookedLinear, Hooks, Linears};
use crate::engine::models::layers::dropout;

/// PEFT's default targets of a model type
/// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, the attention's
/// query and value projections), as the model-type table gives them; none
/// for a type missing from it.
pub fn default_targets(model_type: &str) -> &'static [&'static str] {
    ModelFamily::of(model_type).map_or(&[], ModelFamily::default_lora_targets)
}

/// Resolves `targets` (PEFT's defaults for `model_type` when `None`) to the
/// model's `linears` with PEFT's matching rule. A target that matches none
/// of them is refused with the ones that exist.
pub fn resolve_targets(
    model_type: &str,
    linears: &Linears,
    targets: Option<&[String]>,
) -> Result<Vec<HookedLinear>, SpecError> {
    let defaults: Vec<String> = default_targets(model_type).iter().map(|t| t.to_string()).collect();
    if targets.is_none() && defaults.is_empty() {
        return Err(SpecError::new(
            "peft.target_modules",
            format!("PEFT has no default targets for model_type {model_type:?}; name the linears to adapt"),
        ));
    }
    let targets = targets.unwrap_or(&defaults);
    let mut chosen = Vec::new();
    for target in targets {
        let found: Vec<&HookedLinear> =
            linears.modules.iter().filter(|m| target_matches(&linears.full_name(m), target)).collect();
        if found.is_empty() {
            let allowed: Vec<&str> = linears.modules.iter().map(|m| m.path).collect();
            return Err(SpecError::new(
                "peft.target_modules",
                format!("{target:?} matches no linear layer of this model; allowed: {}", allowed.join(", ")),
            ));
        }
        chosen.extend(found.into_iter().map(|m| m.hook));
    }
    Ok(linears.modules.iter().filter(|m| chosen.contains(&m.hook)).copied().collect())
}

/// Settings of a LoRA adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// The linears that get an update, in every layer.
    pub modules: Vec<HookedLinear>,
    /// Path of the model's list of layers, part of every PEFT key.
    pub layers: String,
    /// PEFT's `fan_in_fan_out`, written into the export's config.
    pub fan_in_fan_out: bool,
}

impl LoraConfig {
    /// The spec's rank, scaling and dropout, on `modules` of `linears`.
    pub fn for_spec(peft: &PeftConfig, modules: Vec<HookedLinear>, linears: &Linears) -> Self {
        Self {
            r: i64::from(peft.lora_r()),
            alpha: peft.lora_alpha(),
            dropout: peft.lora_dropout(),
            modules,
            layers: linears.layers.clone(),
            fan_in_fan_out: linears.transposed,
        }
    }
}

/// One low-rank update: `A` `[r, in]` and `B` `[out, r]`.
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// The LoRA updates of one job.
pub struct Lora {
    config: LoraConfig,
    /// Per layer, per module hook name.
    layers: Vec<BTreeMap<&'static str, LoraPair>>,
}

impl Lora {
    /// Declares the updates for `num_layers` layers under `p` (the root of
    /// the job's variables), drawing `A` from the generator as it stands.
    pub fn new(p: &nn::Path, config: LoraConfig, num_layers: i64) -> Self {
        let layers = (0..num_layers)
            .map(|layer| {
                config
                    .modules
                    .iter()
                    .map(|module| {
                        let path = var_path(p, &config.layers, layer, module.path);
                        let bound = 1.0 / (module.in_dim as f64).sqrt();
                        let a = (&path / "lora_A").uniform("weight", &[config.r, module.in_dim], -bound, bound);
                        let b = (&path / "lora_B").zeros("weight", &[module.out_dim, config.r]);
                        (module.hook, LoraPair { a, b })
                    })
                    .collect()
            })
            .collect();
        Self { config, layers }
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The update of the module `hook` names in `layer`, if it has one.
    pub fn pair(&self, layer: usize, hook: &str) -> Option<&LoraPair> {
        self.layers.get(layer)?.get(hook)
    }

    /// PEFT's key of a module's `lora_A` or `lora_B` weight.
    pub fn key(layers: &str, layer: usize, path: &str, which: &str) -> String {
        format!("base_model.model.{layers}.{layer}.{path}.{which}.weight")
    }

    /// Every update with its PEFT keys.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::new();
        for (layer, pairs) in self.layers.iter().enumerate() {
            for module in &self.config.modules {
                let pair = &pairs[module.hook];
                let key = |which| Self::key(&self.config.layers, layer, module.path, which);
                tensors.push((key("lora_A"), pair.a.shallow_clone()));
                tensors.push((key("lora_B"), pair.b.shallow_clone()));
            }
        }
        tensors
    }

    pub fn hooks(&self, train: bool) -> LoraHooks<'_> {
        LoraHooks { lora: self, train }
    }
}

/// The variable path of a module's updates: PEFT's key without `.lora_A.weight`.
fn var_path<'a>(p: &nn::Path<'a>, layers: &str, layer: i64, module_path: &str) -> nn::Path<'a> {
    let mut path = p / "base_model" / "model";
    for part in layers.split('.') {
        path = path / part;
    }
    path = path / layer;
    for part in module_path.split('.') {
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

    fn has_linear_deltas(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2_layout() -> Linears {
        let module = |path: &'static str, in_dim, out_dim| HookedLinear { hook: path, path, in_dim, out_dim };
        Linears {
            layers: "transformer.h".into(),
            num_layers: 2,
            modules: vec![
                module("attn.c_attn", 8, 24),
                module("attn.c_proj", 8, 8),
                module("mlp.c_fc", 8, 32),
                module("mlp.c_proj", 32, 8),
            ],
            transposed: true,
        }
    }

    fn paths(modules: &[HookedLinear]) -> Vec<&str> {
        modules.iter().map(|m| m.path).collect()
    }

    #[test]
    fn targets_match_as_peft_matches_them() {
        let layout = gpt2_layout();
        assert_eq!(paths(&resolve_targets("gpt2", &layout, None).unwrap()), ["attn.c_attn"]);
        let targets = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        // `c_proj` ends both the attention's and the MLP's output projection.
        let both = resolve_targets("gpt2", &layout, Some(&targets(&["c_proj"]))).unwrap();
        assert_eq!(paths(&both), ["attn.c_proj", "mlp.c_proj"]);
        let one = resolve_targets("gpt2", &layout, Some(&targets(&["mlp.c_proj", "c_attn"]))).unwrap();
        assert_eq!(paths(&one), ["attn.c_attn", "mlp.c_proj"], "in the model's order");
        let err = resolve_targets("gpt2", &layout, Some(&targets(&["q_proj"]))).unwrap_err().to_string();
        assert_eq!(
            err,
            "peft.target_modules: \"q_proj\" matches no linear layer of this model; allowed: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"
        );
        // A target must match whole names, not any suffix of one.
        assert!(resolve_targets("gpt2", &layout, Some(&targets(&["proj"]))).is_err());
    }

    #[test]
    fn updates_are_named_as_peft_saves_them() {
        let layout = gpt2_layout();
        let vars = nn::VarStore::new(tch::Device::Cpu);
        let config = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            modules: resolve_targets("gpt2", &layout, None).unwrap(),
            layers: layout.layers.clone(),
            fan_in_fan_out: true,
        };
        let lora = Lora::new(&vars.root(), config, layout.num_layers);
        let names: Vec<(String, Vec<i64>)> = lora.named_tensors().into_iter().map(|(k, t)| (k, t.size())).collect();
        assert_eq!(
            names,
            [
                ("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight".to_string(), vec![4, 8]),
                ("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight".to_string(), vec![24, 4]),
                ("base_model.model.transformer.h.1.attn.c_attn.lora_A.weight".to_string(), vec![4, 8]),
                ("base_model.model.transformer.h.1.attn.c_attn.lora_B.weight".to_string(), vec![24, 4]),
            ]
        );
        // The job's variables carry the same names, so checkpoints and exports agree.
        let mut variables: Vec<String> = vars.variables().into_keys().collect();
        variables.sort();
        assert_eq!(variables, names.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>());
    }
}
