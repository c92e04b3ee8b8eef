//! PEFT's `adapter_config.json`: what an export says about its adapter and
//! the model around it, written as PEFT 0.21.2 writes it (checked by
//! `scripts/reference/peft_methods.py`, which loads the engine's exports
//! back), and PEFT's conventions for the keys beside the adapter's own.

use ptune_core::spec::EncoderType;
use ptune_core::{JobSpec, Method, PromptInit};
use serde_json::{json, Value};

use super::adapter::Adapter;
use crate::engine::models::hooks::HookSites;

/// File names of a PEFT export (`save_pretrained`).
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's `peft_type` of a method's export; none for full fine-tuning.
fn peft_type(method: Method) -> Option<&'static str> {
    match method {
        Method::PromptTuning => Some("PROMPT_TUNING"),
        Method::PTuning => Some("P_TUNING"),
        Method::PrefixTuning | Method::PTuningV2 => Some("PREFIX_TUNING"),
        Method::Lora => Some("LORA"),
        Method::Full => None,
    }
}

/// Where PEFT keeps the base model's own trained modules (a classifier's
/// head) beside `adapter` in an export's keys: prompt-learning models wrap
/// the transformers model directly (`base_model.classifier.*`), LoRA wraps
/// it in a tuner (`base_model.model.classifier.*`).
pub fn wrapped_prefix(adapter: &Adapter) -> &'static str {
    match adapter {
        Adapter::Lora(_) => "base_model.model.",
        _ => "base_model.",
    }
}

/// PEFT's name for a prompt initialisation.
fn init_name(init: PromptInit) -> &'static str {
    match init {
        PromptInit::Random => "RANDOM",
        PromptInit::Vocab => "SAMPLE_VOCAB",
        PromptInit::Text => "TEXT",
    }
}

/// The `adapter_config.json` of `adapter`, trained for `spec` on a base that
/// `sites` describes. `task_type` is PEFT's (`SEQ_CLS`, `TOKEN_CLS`,
/// `CAUSAL_LM`); `head_module` names a trained head saved beside the adapter.
pub fn adapter_config(
    spec: &JobSpec,
    sites: &HookSites<'_>,
    adapter: &Adapter,
    task_type: &str,
    head_module: Option<&str>,
) -> Value {
    let peft = &spec.peft;
    // A virtual token is as wide as the model's input embeddings; a prefix
    // as a layer's keys, whose heads are the key/value heads.
    let prefixes = spec.method.uses_prefixes();
    let token_dim = if prefixes { sites.num_kv_heads * sites.head_dim } else { sites.hidden_size };
    let num_attention_heads = if prefixes { sites.num_kv_heads } else { sites.num_attention_heads };
    let mut config = json!({
        "auto_mapping": null,
        "base_model_name_or_path": spec.base_model,
        "inference_mode": true,
        "peft_type": peft_type(spec.method),
        "revision": null,
        "task_type": task_type,
    });
    let fields = config.as_object_mut().expect("an object");
    let mut set = |key: &str, value: Value| {
        fields.insert(key.to_string(), value);
    };
    // PEFT adds both names for SEQ_CLS; BERT's head is `classifier`. The
    // PEFT versions that run prefix tuning on BERT (transformers 4.x) refuse
    // the field in a PREFIX_TUNING config, and every version adds it on load.
    if let Some(head) = head_module.filter(|_| !prefixes) {
        set("modules_to_save", json!([head, "score"]));
    }
    if spec.method.uses_virtual_tokens() {
        set("num_virtual_tokens", json!(peft.num_virtual_tokens));
        set("token_dim", json!(token_dim));
        set("num_layers", json!(sites.num_layers));
        set("num_attention_heads", json!(num_attention_heads));
        set("num_transformer_submodules", json!(1));
    }
    match (adapter, spec.method) {
        (_, Method::PromptTuning) => {
            let init_text = match peft.init {
                PromptInit::Text => peft.init_text.clone(),
                _ => None,
            };
            set("prompt_tuning_init", json!(init_name(peft.init)));
            set("prompt_tuning_init_text", json!(init_text));
            set("tokenizer_kwargs", json!(null));
            // PEFT requires it for TEXT init; loading in inference mode never reads it.
            set("tokenizer_name_or_path", json!(spec.base_model));
        }
        (_, Method::PTuning) => {
            let encoder_type = match peft.encoder_type() {
                EncoderType::Mlp => "MLP",
                EncoderType::Lstm => "LSTM",
            };
            set("encoder_reparameterization_type", json!(encoder_type));
            set("encoder_hidden_size", json!(peft.encoder_hidden_size_for(token_dim as u32)));
            set("encoder_num_layers", json!(peft.encoder_num_layers()));
            set("encoder_dropout", json!(peft.encoder_dropout()));
        }
        (Adapter::Prefix(prefix), Method::PrefixTuning | Method::PTuningV2) => {
            set("prefix_projection", json!(prefix.projection_hidden().is_some()));
            set("encoder_hidden_size", json!(prefix.projection_hidden().unwrap_or(token_dim)));
        }
        (Adapter::Lora(lora), Method::Lora) => {
            let c = lora.config();
            set("r", json!(c.r));
            set("lora_alpha", json!(c.alpha));
            set("lora_dropout", json!(c.dropout));
            set("target_modules", json!(c.modules.iter().map(|m| m.path).collect::<Vec<_>>()));
            set("bias", json!("none"));
            set("fan_in_fan_out", json!(c.fan_in_fan_out));
            set("use_rslora", json!(false));
            set("use_dora", json!(false));
            set("init_lora_weights", json!(true));
            set("layers_to_transform", json!(null));
            set("layers_pattern", json!(null));
            set("rank_pattern", json!({}));
            set("alpha_pattern", json!({}));
        }
        _ => {}
    }
    config
}
