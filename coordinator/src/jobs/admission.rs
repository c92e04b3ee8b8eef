//! Whether a job's base model and task can run, from what workers advertise
//! about the model: a model only workers that cannot train it have
//! registered is refused, and so is a task its architecture cannot serve
//! (classification pools an encoder; causal language modelling needs a
//! decoder), and LoRA targets that name no linear of its layers. A model no
//! worker has registered is admitted: one may come.

use ptune_core::memory::mib;
use ptune_core::{JobSpec, MemoryEstimate, Method, ModelFamily, ModelLimits, Task};

use crate::error::Error;
use crate::model::ModelSupport;

/// Refuses `spec` when its base model cannot serve it, naming the field;
/// otherwise returns the model's limits, when a worker reported them.
pub(crate) fn admit(spec: &JobSpec, support: &ModelSupport) -> Result<Option<ModelLimits>, Error> {
    let base_model = &spec.base_model;
    match support {
        ModelSupport::Unknown => Ok(None),
        ModelSupport::Unsupported { model_type, reason } => Err(Error::invalid(
            "base_model",
            format!("{base_model:?} has model_type {model_type:?}, which ptune cannot train; {reason}"),
        )),
        ModelSupport::Served { max_positions, model_types } => {
            check_task(spec.task, base_model, model_types)?;
            check_lora_targets(spec, model_types)?;
            Ok(max_positions.map(|max_positions| ModelLimits { max_positions }))
        }
    }
}

/// True when the model reported its types and this coordinator knows them
/// all; otherwise (a newer worker's type, or none reported) checks that
/// depend on the architecture give the benefit of the doubt.
fn all_known(model_types: &[String]) -> bool {
    !model_types.is_empty() && model_types.iter().all(|t| ModelFamily::of(t).is_some())
}

/// Refuses a task that no architecture serving the model can run
/// ([`ptune_core::model_types::check_task`]).
fn check_task(task: Task, base_model: &str, model_types: &[String]) -> Result<(), Error> {
    let types: Vec<&str> = model_types.iter().map(String::as_str).collect();
    Ok(ptune_core::model_types::check_task(task, base_model, &types)?)
}

/// Refuses LoRA targets that match no linear of a layer of the model's
/// architecture (as PEFT matches `target_modules`), when every type serving
/// it is known.
fn check_lora_targets(spec: &JobSpec, model_types: &[String]) -> Result<(), Error> {
    let Some(targets) = spec.peft.target_modules.as_deref().filter(|_| spec.method == Method::Lora) else {
        return Ok(());
    };
    if !all_known(model_types) {
        return Ok(());
    }
    for family in model_types.iter().filter_map(|t| ModelFamily::of(t)) {
        family.check_lora_targets(targets)?;
    }
    Ok(())
}

/// Refuses full fine-tuning of a model whose export (the whole model, in
/// float32: the estimate's weights) is larger than the coordinator keeps for
/// a job's result, which would otherwise train to the end and then be
/// refused.
pub(crate) fn check_export_size(spec: &JobSpec, estimate: &MemoryEstimate, max_adapter_bytes: u64) -> Result<(), Error> {
    if spec.method != Method::Full || estimate.weights_bytes <= max_adapter_bytes {
        return Ok(());
    }
    Err(Error::invalid(
        "method",
        format!(
            "full fine-tuning of {:?} exports the whole model, about {} MiB in float32, over the {} MiB a job's \
             result may take (the coordinator's --max-adapter-mib); use lora or a prompt method, or a smaller model",
            spec.base_model,
            mib(estimate.weights_bytes),
            mib(max_adapter_bytes)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(base_model: &str, task: Task) -> JobSpec {
        let mut spec = JobSpec::from_toml(
            r#"
            name = "j"
            base_model = "m"
            task = "sequence_classification"
            method = "prompt_tuning"
            [peft]
            num_virtual_tokens = 8
            [data]
            train = "train.jsonl"
            eval = "eval.jsonl"
            labels = [0, 1]
            [training]
            learning_rate = 3e-2
            "#,
        )
        .unwrap();
        spec.base_model = base_model.into();
        spec.task = task;
        spec
    }

    fn served(types: &[&str]) -> ModelSupport {
        ModelSupport::Served { max_positions: Some(512), model_types: types.iter().map(|t| t.to_string()).collect() }
    }

    fn message(result: Result<Option<ModelLimits>, Error>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn unknown_models_wait_and_served_ones_carry_their_limits() {
        let s = spec("future-model", Task::SequenceClassification);
        assert_eq!(admit(&s, &ModelSupport::Unknown).unwrap(), None);
        assert_eq!(admit(&s, &served(&["bert"])).unwrap(), Some(ModelLimits { max_positions: 512 }));
        assert_eq!(admit(&s, &served(&[])).unwrap(), Some(ModelLimits { max_positions: 512 }), "no type: no check");
        assert!(admit(&s, &served(&["roberta"])).is_ok(), "RoBERTa classifies");
        assert!(admit(&s, &served(&["deberta-v2"])).is_ok(), "a type this coordinator does not know");
    }

    #[test]
    fn an_unsupported_model_names_its_type_and_the_reason() {
        let support = ModelSupport::Unsupported {
            model_type: "t5".into(),
            reason: "supported model types: bert, gpt2, llama, mistral, qwen2, roberta".into(),
        };
        assert_eq!(
            message(admit(&spec("t5-small", Task::SequenceClassification), &support)),
            "base_model: \"t5-small\" has model_type \"t5\", which ptune cannot train; \
             supported model types: bert, gpt2, llama, mistral, qwen2, roberta"
        );
    }

    #[test]
    fn tasks_need_an_architecture_that_serves_them() {
        assert_eq!(
            message(admit(&spec("tiny-gpt2", Task::SequenceClassification), &served(&["gpt2"]))),
            "task: sequence_classification needs an encoder model (bert, roberta), \
             but base_model \"tiny-gpt2\" has model_type \"gpt2\""
        );
        assert_eq!(
            message(admit(&spec("tiny-bert", Task::CausalLm), &served(&["bert"]))),
            "task: causal_lm needs a decoder-only model (gpt2, llama, mistral, qwen2), \
             but base_model \"tiny-bert\" has model_type \"bert\""
        );
        assert!(admit(&spec("tiny-llama", Task::CausalLm), &served(&["llama"])).is_ok());
    }

    #[test]
    fn lora_targets_must_name_linears_of_the_models_layers() {
        let lora = |targets: &[&str]| {
            let mut s = spec("tiny-gpt2", Task::CausalLm);
            s.method = Method::Lora;
            s.peft.target_modules = Some(targets.iter().map(|t| t.to_string()).collect());
            s
        };
        assert!(admit(&lora(&["c_attn", "mlp.c_fc"]), &served(&["gpt2"])).is_ok());
        assert_eq!(
            message(admit(&lora(&["q_proj"]), &served(&["gpt2"]))),
            "peft.target_modules: \"q_proj\" matches no linear layer of this model; \
             allowed: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"
        );
        assert!(admit(&lora(&["q_proj"]), &served(&["llama", "qwen2"])).is_ok());
        assert!(admit(&lora(&["q_proj"]), &ModelSupport::Unknown).is_ok(), "no worker yet: no check");
    }

    #[test]
    fn full_fine_tuning_must_export_within_the_result_limit() {
        let mut full = spec("qwen2-0.5b", Task::CausalLm);
        full.method = Method::Full;
        let weights = |bytes: u64| MemoryEstimate { weights_bytes: bytes, ..Default::default() };
        const CAP: u64 = 1_000_000_000;
        assert!(check_export_size(&full, &weights(CAP), CAP).is_ok());
        assert_eq!(
            check_export_size(&full, &weights(1_976_000_000), CAP).unwrap_err().to_string(),
            "method: full fine-tuning of \"qwen2-0.5b\" exports the whole model, about 1,884 MiB \
             in float32, over the 954 MiB a job's result may take (the coordinator's --max-adapter-mib); use lora or a prompt method, or a smaller model"
        );
        assert!(check_export_size(&full, &weights(1_976_000_000), 2 * CAP).is_ok(), "a raised limit lets it through");
        full.method = Method::Lora;
        assert!(check_export_size(&full, &weights(1_976_000_000), CAP).is_ok(), "an adapter is small");
    }
}
