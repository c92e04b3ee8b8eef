//! Hugging Face PEFT export: `adapter_config.json` and
//! `adapter_model.safetensors` as PEFT's `save_pretrained` writes them for a
//! prompt-tuned sequence classifier, so `PeftModel.from_pretrained` loads
//! them. Key names and config fields were checked against PEFT 0.21.2
//! (`scripts/reference/check_peft_adapter.py` loads an export back).

use std::collections::HashMap;
use std::path::Path;

use ptune_core::{JobSpec, PromptInit};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;
use tch::{Kind, Tensor};

use super::models::bert::BertConfig;
use super::tasks::seq_cls::PromptSeqCls;
use super::{EngineError, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PROVENANCE_FILE};

/// PEFT's name for a prompt initialisation.
fn peft_init_name(init: PromptInit) -> &'static str {
    match init {
        PromptInit::Random => "RANDOM",
        PromptInit::Vocab => "SAMPLE_VOCAB",
        PromptInit::Text => "TEXT",
    }
}

/// The `adapter_config.json` of a prompt-tuned sequence classifier.
pub fn prompt_tuning_config(spec: &JobSpec, base: &BertConfig) -> serde_json::Value {
    let init_text = match spec.peft.init {
        PromptInit::Text => spec.peft.init_text.clone(),
        _ => None,
    };
    json!({
        "auto_mapping": null,
        "base_model_name_or_path": spec.base_model,
        "inference_mode": true,
        // PEFT adds both names for SEQ_CLS; BERT's head is `classifier`.
        "modules_to_save": ["classifier", "score"],
        "num_attention_heads": base.num_attention_heads,
        "num_layers": base.num_hidden_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": spec.peft.num_virtual_tokens,
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": peft_init_name(spec.peft.init),
        "prompt_tuning_init_text": init_text,
        "revision": null,
        "task_type": "SEQ_CLS",
        "token_dim": base.hidden_size,
        "tokenizer_kwargs": null,
        // PEFT requires it for TEXT init; loading in inference mode never reads it.
        "tokenizer_name_or_path": spec.base_model,
    })
}

/// The adapter tensors under PEFT's key names: `prompt_embeddings`
/// `[nvt, hidden]` and `base_model.classifier.{weight,bias}`.
pub fn prompt_tuning_tensors(model: &PromptSeqCls) -> Vec<(String, Tensor)> {
    let head = super::tasks::seq_cls::ClassificationHead::MODULE;
    vec![
        ("prompt_embeddings".to_string(), model.prompt.embeddings().shallow_clone()),
        (format!("base_model.{head}.weight"), model.head.weight().shallow_clone()),
        (format!("base_model.{head}.bias"), model.head.bias().shallow_clone()),
    ]
}

/// Writes the PEFT export into `out_dir` (created if missing), plus
/// `ptune.json` with how it was trained. Each file is written beside its
/// final name and renamed into place, so a reader never sees half a file.
pub fn write_prompt_tuning(
    out_dir: &Path,
    spec: &JobSpec,
    base: &BertConfig,
    model: &PromptSeqCls,
    provenance: &serde_json::Value,
) -> Result<(), EngineError> {
    std::fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;
    write_safetensors(&out_dir.join(ADAPTER_WEIGHTS_FILE), &prompt_tuning_tensors(model))?;
    write_json(&out_dir.join(ADAPTER_CONFIG_FILE), &prompt_tuning_config(spec, base))?;
    write_json(&out_dir.join(PROVENANCE_FILE), provenance)
}

/// Writes float32 tensors with the `{"format": "pt"}` metadata PyTorch
/// writers use.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), EngineError> {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, tensor)| {
            let tensor = tensor.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
            let shape = tensor.size().iter().map(|&d| d as usize).collect();
            let values = Vec::<f32>::try_from(tensor.reshape([-1]))?;
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            Ok((name.clone(), shape, bytes))
        })
        .collect::<Result<_, EngineError>>()?;
    let views = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map_err(|e| EngineError::Model(format!("cannot serialize {name}: {e}")))?;
            Ok((name.as_str(), view))
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let partial = partial_path(path);
    safetensors::tensor::serialize_to_file(views, Some(metadata), &partial)
        .map_err(|e| EngineError::io(&partial, std::io::Error::other(e)))?;
    std::fs::rename(&partial, path).map_err(|e| EngineError::io(path, e))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), EngineError> {
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
