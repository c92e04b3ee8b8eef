//! The one table of the Hugging Face `model_type`s ptune trains, read by the
//! coordinator's admission, the memory estimate and the engine alike: each
//! type's family of layers, whether it is an encoder or a decoder, the
//! linears of a layer LoRA can target and PEFT's default targets, and so the
//! tasks it serves.
//!
//! Adding a model type means a row in [`MODEL_TYPES`] (and, for a new family,
//! its linears here and its layers in the engine); nothing else names types.
//! A type missing from the table is not silently some other family:
//! [`ModelFamily::of`] says `None`, and callers decide (admission gives a
//! newer worker's type the benefit of the doubt; the estimate has no shape).

use serde::{Deserialize, Serialize};

use crate::bounds::SpecError;
use crate::spec::Task;

/// Whether a model reads whole sequences (an encoder: classification heads
/// pool it or label its tokens) or predicts the next token (a decoder-only
/// model: causal language modelling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Encoder,
    Decoder,
}

impl Architecture {
    /// The tasks a model of this architecture serves.
    pub fn tasks(self) -> &'static [Task] {
        match self {
            Architecture::Encoder => &[Task::SequenceClassification, Task::TokenClassification],
            Architecture::Decoder => &[Task::CausalLm],
        }
    }

    /// The architecture `task` needs.
    pub fn for_task(task: Task) -> Self {
        match task {
            Task::SequenceClassification | Task::TokenClassification => Architecture::Encoder,
            Task::CausalLm => Architecture::Decoder,
        }
    }

    /// `an encoder` or `a decoder-only`, as messages name it before "model".
    pub fn article_name(self) -> &'static str {
        match self {
            Architecture::Encoder => "an encoder",
            Architecture::Decoder => "a decoder-only",
        }
    }
}

/// A base model's family of layers: one implementation in the engine each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// BERT and RoBERTa encoders. The default only for shapes stored before
    /// the family was recorded, all of which were BERT.
    #[default]
    Bert,
    Gpt2,
    /// Llama, Mistral and Qwen2 decoders.
    Llama,
}

/// One `model_type` ptune trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelType {
    /// As `config.json` spells it.
    pub name: &'static str,
    pub family: ModelFamily,
}

/// Every `model_type` ptune trains, by name.
pub const MODEL_TYPES: [ModelType; 6] = [
    ModelType { name: "bert", family: ModelFamily::Bert },
    ModelType { name: "gpt2", family: ModelFamily::Gpt2 },
    ModelType { name: "llama", family: ModelFamily::Llama },
    ModelType { name: "mistral", family: ModelFamily::Llama },
    ModelType { name: "qwen2", family: ModelFamily::Llama },
    ModelType { name: "roberta", family: ModelFamily::Bert },
];

/// The feed-forward intermediate size of BERT and GPT-2, in hidden sizes.
pub const INTERMEDIATE: u64 = 4;

/// A linear of one layer that LoRA can target: its path inside the layer, as
/// PEFT names modules, and its input and output sizes in hidden sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerLinear {
    pub path: &'static str,
    pub inputs: u64,
    pub outputs: u64,
}

const fn linear(path: &'static str, inputs: u64, outputs: u64) -> LayerLinear {
    LayerLinear { path, inputs, outputs }
}

const BERT_LINEARS: [LayerLinear; 6] = [
    linear("attention.self.query", 1, 1),
    linear("attention.self.key", 1, 1),
    linear("attention.self.value", 1, 1),
    linear("attention.output.dense", 1, 1),
    linear("intermediate.dense", 1, INTERMEDIATE),
    linear("output.dense", INTERMEDIATE, 1),
];

const GPT2_LINEARS: [LayerLinear; 4] = [
    linear("attn.c_attn", 1, 3),
    linear("attn.c_proj", 1, 1),
    linear("mlp.c_fc", 1, INTERMEDIATE),
    linear("mlp.c_proj", INTERMEDIATE, 1),
];

/// Keys and values at full width (grouped-query attention makes them
/// narrower) and the gated MLP at 3 hidden sizes (Llama 2 7B: 2.7, Mistral
/// 7B: 3.5): workers do not report the shape, so this is typical.
const LLAMA_LINEARS: [LayerLinear; 7] = [
    linear("self_attn.q_proj", 1, 1),
    linear("self_attn.k_proj", 1, 1),
    linear("self_attn.v_proj", 1, 1),
    linear("self_attn.o_proj", 1, 1),
    linear("mlp.gate_proj", 1, 3),
    linear("mlp.up_proj", 1, 3),
    linear("mlp.down_proj", 3, 1),
];

impl ModelType {
    /// The row of `name`, if ptune trains it.
    pub fn named(name: &str) -> Option<&'static ModelType> {
        MODEL_TYPES.iter().find(|t| t.name == name)
    }

    /// The names of the types of `architecture`, in the table's order.
    pub fn names_of(architecture: Architecture) -> Vec<&'static str> {
        MODEL_TYPES.iter().filter(|t| t.family.architecture() == architecture).map(|t| t.name).collect()
    }

    /// Every name, in the table's order: `bert, gpt2, llama, ...`.
    pub fn all_names() -> Vec<&'static str> {
        MODEL_TYPES.iter().map(|t| t.name).collect()
    }
}

impl ModelFamily {
    /// The family of `model_type`; `None` for a type ptune does not train.
    pub fn of(model_type: &str) -> Option<Self> {
        ModelType::named(model_type).map(|t| t.family)
    }

    /// The `model_type`s of this family, in the table's order.
    pub fn type_names(self) -> Vec<&'static str> {
        MODEL_TYPES.iter().filter(|t| t.family == self).map(|t| t.name).collect()
    }

    pub fn architecture(self) -> Architecture {
        match self {
            ModelFamily::Bert => Architecture::Encoder,
            ModelFamily::Gpt2 | ModelFamily::Llama => Architecture::Decoder,
        }
    }

    /// Whether a model of this family can be trained on `task`.
    pub fn serves(self, task: Task) -> bool {
        self.architecture().tasks().contains(&task)
    }

    /// Every linear of one layer that LoRA can target.
    pub fn linears(self) -> &'static [LayerLinear] {
        match self {
            ModelFamily::Bert => &BERT_LINEARS,
            ModelFamily::Gpt2 => &GPT2_LINEARS,
            ModelFamily::Llama => &LLAMA_LINEARS,
        }
    }

    /// PEFT's default LoRA targets for the family.
    pub fn default_lora_targets(self) -> &'static [&'static str] {
        match self {
            ModelFamily::Bert => &["query", "value"],
            ModelFamily::Gpt2 => &["c_attn"],
            ModelFamily::Llama => &["q_proj", "v_proj"],
        }
    }

    /// The linears `targets` select (the family's defaults when `None`).
    pub fn lora_linears(self, targets: Option<&[String]>) -> Vec<LayerLinear> {
        let selected = |path: &str| match targets {
            Some(targets) => targets.iter().any(|t| lora_target_matches(path, t)),
            None => self.default_lora_targets().iter().any(|t| lora_target_matches(path, t)),
        };
        self.linears().iter().copied().filter(|l| selected(l.path)).collect()
    }

    /// Refuses a LoRA target that matches none of the family's linears,
    /// naming the ones there are.
    pub fn check_lora_targets(self, targets: &[String]) -> Result<(), SpecError> {
        let linears = self.linears();
        match targets.iter().find(|t| !linears.iter().any(|l| lora_target_matches(l.path, t))) {
            None => Ok(()),
            Some(target) => {
                let allowed: Vec<&str> = linears.iter().map(|l| l.path).collect();
                Err(SpecError::new(
                    "peft.target_modules",
                    format!("{target:?} matches no linear layer of this model; allowed: {}", allowed.join(", ")),
                ))
            }
        }
    }
}

/// Refuses `task` on `base_model` when none of the types serving it can run
/// it (classification pools an encoder; causal LM needs a decoder), naming
/// the types that could. A type missing from the table (a newer worker's),
/// or no type at all, gets the benefit of the doubt.
pub fn check_task(task: Task, base_model: &str, model_types: &[&str]) -> Result<(), SpecError> {
    let known = !model_types.is_empty() && model_types.iter().all(|t| ModelFamily::of(t).is_some());
    if !known || model_types.iter().any(|t| ModelFamily::of(t).is_some_and(|family| family.serves(task))) {
        return Ok(());
    }
    let wanted = Architecture::for_task(task);
    Err(SpecError::new(
        "task",
        format!(
            "{task} needs {} model ({}), but base_model {base_model:?} has model_type {:?}",
            wanted.article_name(),
            ModelType::names_of(wanted).join(", "),
            model_types.join(", ")
        ),
    ))
}

/// PEFT's rule for `target_modules`: a module matches a target equal to its
/// path or ending with `.` and the target.
pub fn lora_target_matches(path: &str, target: &str) -> bool {
    path == target || path.ends_with(&format!(".{target}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_table_is_sorted_and_every_type_has_one_family() {
        let names = ModelType::all_names();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
        assert_eq!(ModelFamily::of("qwen2"), Some(ModelFamily::Llama));
        assert_eq!(ModelFamily::of("roberta"), Some(ModelFamily::Bert));
        assert_eq!(ModelFamily::of("t5"), None, "an unknown type is no family, not BERT");
        assert_eq!(ModelType::names_of(Architecture::Encoder), ["bert", "roberta"]);
        assert_eq!(ModelType::names_of(Architecture::Decoder), ["gpt2", "llama", "mistral", "qwen2"]);
        assert_eq!(ModelFamily::Llama.type_names(), ["llama", "mistral", "qwen2"]);
    }

    #[test]
    fn tasks_follow_the_architecture() {
        assert!(ModelFamily::Bert.serves(Task::TokenClassification));
        assert!(!ModelFamily::Bert.serves(Task::CausalLm));
        assert!(ModelFamily::Llama.serves(Task::CausalLm));
        assert!(!ModelFamily::Gpt2.serves(Task::SequenceClassification));
        for task in Task::ALL {
            assert!(Architecture::for_task(task).tasks().contains(&task));
        }
    }

    #[test]
    fn a_task_needs_a_type_that_serves_it_and_unknown_types_pass() {
        assert!(check_task(Task::CausalLm, "m", &["gpt2"]).is_ok());
        assert!(check_task(Task::CausalLm, "m", &["bert", "llama"]).is_ok(), "one type that serves is enough");
        assert!(check_task(Task::CausalLm, "m", &["t5"]).is_ok(), "an unknown type passes");
        assert!(check_task(Task::CausalLm, "m", &[]).is_ok(), "no type passes");
        assert_eq!(
            check_task(Task::TokenClassification, "tiny-gpt2", &["gpt2"]).unwrap_err().to_string(),
            "task: token_classification needs an encoder model (bert, roberta), but base_model \"tiny-gpt2\" has model_type \"gpt2\""
        );
    }

    #[test]
    fn lora_targets_select_by_peft_suffix_and_default_per_family() {
        let paths = |family: ModelFamily, t: Option<&[String]>| -> Vec<&str> {
            family.lora_linears(t).iter().map(|l| l.path).collect()
        };
        assert_eq!(paths(ModelFamily::Bert, None), ["attention.self.query", "attention.self.value"]);
        assert_eq!(paths(ModelFamily::Gpt2, Some(&targets(&["c_proj"]))), ["attn.c_proj", "mlp.c_proj"]);
        assert_eq!(
            paths(ModelFamily::Bert, Some(&targets(&["output.dense"]))),
            ["attention.output.dense", "output.dense"]
        );
    }

    #[test]
    fn lora_targets_must_name_a_linear_of_the_family() {
        assert!(ModelFamily::Gpt2.check_lora_targets(&targets(&["c_attn", "mlp.c_proj"])).is_ok());
        assert!(ModelFamily::Llama.check_lora_targets(&targets(&["q_proj", "down_proj"])).is_ok());
        let err = ModelFamily::Gpt2.check_lora_targets(&targets(&["c_attn", "query"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "peft.target_modules: \"query\" matches no linear layer of this model; allowed: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"
        );
        assert!(ModelFamily::Bert.check_lora_targets(&targets(&["c_attn"])).is_err());
    }
}
