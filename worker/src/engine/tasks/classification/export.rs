//! A classifier's exports: for an adapter, a PEFT export of a BERT or
//! RoBERTa sequence or token classifier (`task_type` `SEQ_CLS` or
//! `TOKEN_CLS`, the trained head saved beside the adapter), so
//! `PeftModel.from_pretrained` loads it; for full fine-tuning, a
//! `{Bert,Roberta}For{Sequence,Token}Classification` model folder. Key
//! names and config fields were checked against PEFT 0.21.2
//! (`scripts/reference/peft_methods.py` saves the reference adapters and
//! loads the engine's exports back). [`load_classifier`] reads a PEFT
//! export back, as this engine or PEFT saved it.

use std::path::Path;

use ptune_core::{JobSpec, Pooling, Task};
use serde_json::{json, Value};
use tch::{nn, Tensor};

use super::head::{ClassificationHead, Level};
use super::model::Classifier;
use crate::engine::error::EngineError;
use crate::engine::export;
use crate::engine::models::bert::BertConfig;
use crate::engine::models::frozen::FrozenEncoder;
use crate::engine::peft::{adapter_config, wrapped_prefix, Adapter, SavedAdapter, Trainable};

/// PEFT's `task_type` of a classifier.
pub fn peft_task_type(level: Level) -> &'static str {
    match level {
        Level::Sequence => "SEQ_CLS",
        Level::Token => "TOKEN_CLS",
    }
}

/// The adapter tensors under PEFT's key names, and the head's as
/// `base_model[.model].classifier.*`.
pub fn adapter_tensors(adapter: &Adapter, head: &ClassificationHead) -> Vec<(String, Tensor)> {
    let mut tensors = adapter.peft_tensors();
    let prefix = format!("{}{}", wrapped_prefix(adapter), ClassificationHead::MODULE);
    tensors.extend(head.named_tensors().into_iter().map(|(name, tensor)| (format!("{prefix}.{name}"), tensor)));
    tensors
}

/// The `config.json` of a full fine-tuning export: the base's architecture as
/// `BertForSequenceClassification` (or `BertForTokenClassification`, or
/// RoBERTa's) with the job's labels.
pub fn model_config(spec: &JobSpec, base: &BertConfig) -> Value {
    let labels = &spec.data.labels;
    let family = if base.is_roberta() { "Roberta" } else { "Bert" };
    let architecture = match spec.task {
        Task::TokenClassification => format!("{family}ForTokenClassification"),
        _ => format!("{family}ForSequenceClassification"),
    };
    json!({
        "architectures": [architecture],
        "model_type": base.model_type,
        "vocab_size": base.vocab_size,
        "hidden_size": base.hidden_size,
        "num_hidden_layers": base.num_hidden_layers,
        "num_attention_heads": base.num_attention_heads,
        "intermediate_size": base.intermediate_size,
        "hidden_act": base.hidden_act,
        "hidden_dropout_prob": base.hidden_dropout_prob,
        "attention_probs_dropout_prob": base.attention_probs_dropout_prob,
        "max_position_embeddings": base.max_position_embeddings,
        "type_vocab_size": base.type_vocab_size,
        "layer_norm_eps": base.layer_norm_eps,
        "initializer_range": base.initializer_range,
        "position_embedding_type": base.position_embedding_type,
        "classifier_dropout": base.classifier_dropout,
        "pad_token_id": base.pad_token_id.unwrap_or(if base.is_roberta() { 1 } else { 0 }),
        "id2label": labels.iter().enumerate().map(|(i, l)| (i.to_string(), json!(l))).collect::<serde_json::Map<_, _>>(),
        "label2id": labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect::<serde_json::Map<_, _>>(),
    })
}

/// Writes the export of `model`, trained for `spec` on `base`, into
/// `out_dir`, plus `ptune.json` (`provenance`): a PEFT adapter with the
/// head, or for full fine-tuning a model folder with every variable of
/// `vars` (the job's own encoder under `bert.` or `roberta.` and the head
/// under `classifier.`).
pub fn write_export(
    out_dir: &Path,
    spec: &JobSpec,
    base: &FrozenEncoder,
    model: &Classifier,
    vars: &nn::VarStore,
    provenance: &Value,
) -> Result<(), EngineError> {
    match &model.adapter {
        Trainable::Full(_) => export::write_model(out_dir, vars, &model_config(spec, &base.config), None, provenance),
        Trainable::Adapter(adapter) => {
            let task_type = peft_task_type(model.level);
            let config = adapter_config(spec, &base.hook_sites(), adapter, task_type, Some(ClassificationHead::MODULE));
            export::write_adapter(out_dir, &adapter_tensors(adapter, &model.head), &config, provenance)
        }
    }
}

/// Reads a PEFT export of a BERT or RoBERTa classifier (`PROMPT_TUNING`,
/// `P_TUNING`, `PREFIX_TUNING` or `LORA`, as PEFT or this engine saves it)
/// into a classifier on `base` whose variables are declared under `p`.
/// Prompts and prefixes come back as the saved tables. PEFT's configs
/// cannot say how a sequence was pooled: the classifier pools position 0,
/// and the caller sets the pooling from `ptune.json` where there is one.
pub fn load_classifier(dir: &Path, base: &FrozenEncoder, p: &nn::Path) -> Result<Classifier, EngineError> {
    let saved = SavedAdapter::read(dir, p.device())?;
    let adapter = saved.adapter(&base.hook_sites(), p)?;
    let level = match saved.config["task_type"].as_str() {
        Some("TOKEN_CLS") => Level::Token,
        _ => Level::Sequence,
    };
    // The label count comes from the projection's weight: `classifier.weight`
    // or, for RoBERTa's sequence head, `classifier.out_proj.weight`.
    let projection = if level == Level::Sequence && base.config.is_roberta() { "out_proj.weight" } else { "weight" };
    // PEFT versions before 0.14 kept `modules_to_save` in the saved key.
    let head_key = format!("{}{}", wrapped_prefix(&adapter), ClassificationHead::MODULE);
    let head_key = [head_key.clone(), format!("{head_key}.modules_to_save")]
        .into_iter()
        .find(|key| saved.contains(&format!("{key}.{projection}")))
        .ok_or_else(|| saved.bad(format!("no tensor {head_key}.{projection}")))?;
    let labels = saved.tensor(&format!("{head_key}.{projection}"))?.size()[0];
    let head = ClassificationHead::for_model(p, &base.config, level, labels);
    tch::no_grad(|| {
        for (name, mut variable) in head.named_tensors() {
            variable.copy_(saved.tensor(&format!("{head_key}.{name}"))?);
        }
        Ok::<_, EngineError>(())
    })?;
    Ok(Classifier { adapter: Trainable::Adapter(adapter), head, level, pooling: Pooling::Cls })
}
