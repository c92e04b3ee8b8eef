//! Hugging Face exports. Adapters are written as PEFT's `save_pretrained`
//! writes them for a BERT or RoBERTa sequence or token classifier
//! (`adapter_config.json` and `adapter_model.safetensors`, `task_type`
//! `SEQ_CLS` or `TOKEN_CLS`), so `PeftModel.from_pretrained` loads them;
//! full fine-tuning writes a `{Bert,Roberta}For{Sequence,Token}Classification`
//! model folder (`config.json` and `model.safetensors`). Key names and config fields were
//! checked against PEFT 0.21.2 (`scripts/reference/peft_methods.py` saves
//! the reference adapters and loads the engine's exports back).
//!
//! PEFT keeps no reparameterization encoder in an export: P-tuning saves its
//! encoder's output and prefix tuning its projection's output as
//! `prompt_embeddings`. [`load_adapter`] reads such an export back into the
//! engine (as inference-time tables).

use std::collections::HashMap;
use std::path::Path;

use ptune_core::spec::EncoderType;
use ptune_core::{JobSpec, Method, PromptInit};
use safetensors::Dtype;
use serde_json::json;
use tch::{nn, Kind, Tensor};

use super::models::bert::BertConfig;
use super::models::{BaseModel, TOKENIZER_FILE};
use super::peft::lora::{Lora, LoraConfig, LoraModule};
use super::peft::prefix::{PrefixShape, PrefixTuning};
use super::peft::prompt_tuning::PromptTuning;
use super::tasks::classifier::{Adapter, ClassificationHead, Classifier, Level};
use super::{EngineError, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PROVENANCE_FILE};

/// File names of a full fine-tuning export (a Hugging Face model folder).
pub const MODEL_CONFIG_FILE: &str = "config.json";
pub const MODEL_WEIGHTS_FILE: &str = "model.safetensors";

/// PEFT's key of the saved prompt or prefixes.
const PROMPT_KEY: &str = "prompt_embeddings";

/// PEFT's name for a prompt initialisation.
fn peft_init_name(init: PromptInit) -> &'static str {
    match init {
        PromptInit::Random => "RANDOM",
        PromptInit::Vocab => "SAMPLE_VOCAB",
        PromptInit::Text => "TEXT",
    }
}

/// PEFT's `peft_type` of a method's export.
pub fn peft_type(method: Method) -> Option<&'static str> {
    match method {
        Method::PromptTuning => Some("PROMPT_TUNING"),
        Method::PTuning => Some("P_TUNING"),
        Method::PrefixTuning | Method::PTuningV2 => Some("PREFIX_TUNING"),
        Method::Lora => Some("LORA"),
        Method::Full => None,
    }
}

/// Where the head's tensors go: prompt-learning models wrap the transformers
/// model directly (`base_model.classifier.*`), LoRA wraps it in a tuner
/// (`base_model.model.classifier.*`).
fn head_prefix(method: Method) -> &'static str {
    match method {
        Method::Lora => "base_model.model.",
        _ => "base_model.",
    }
}

/// PEFT's `task_type` of a classifier.
pub fn peft_task_type(level: Level) -> &'static str {
    match level {
        Level::Sequence => "SEQ_CLS",
        Level::Token => "TOKEN_CLS",
    }
}

/// What an `adapter_config.json` says about the model around the adapter.
pub struct AdapterShape {
    /// PEFT `task_type`: `SEQ_CLS`, `TOKEN_CLS` or `CAUSAL_LM`.
    pub task_type: &'static str,
    /// Width of a virtual token (of a layer's keys for prefix methods).
    pub token_dim: i64,
    pub num_layers: i64,
    /// Attention heads (key/value heads for prefix methods).
    pub num_attention_heads: i64,
    /// The trained head's module name, saved beside the adapter.
    pub head_module: Option<&'static str>,
}

impl AdapterShape {
    /// A BERT classifier's.
    pub fn classifier(base: &BertConfig, level: Level) -> Self {
        Self {
            task_type: peft_task_type(level),
            token_dim: base.hidden_size,
            num_layers: base.num_hidden_layers,
            num_attention_heads: base.num_attention_heads,
            head_module: Some(ClassificationHead::MODULE),
        }
    }
}

/// The `adapter_config.json` of an adapter-trained classifier.
pub fn adapter_config(spec: &JobSpec, base: &BertConfig, model: &Classifier) -> serde_json::Value {
    peft_config(spec, &AdapterShape::classifier(base, model.level), &model.adapter)
}

/// The `adapter_config.json` of `adapter`, trained for `spec` on a model of `shape`.
pub fn peft_config(spec: &JobSpec, shape: &AdapterShape, adapter: &Adapter) -> serde_json::Value {
    let peft = &spec.peft;
    let mut config = json!({
        "auto_mapping": null,
        "base_model_name_or_path": spec.base_model,
        "inference_mode": true,
        "peft_type": peft_type(spec.method),
        "revision": null,
        "task_type": shape.task_type,
    });
    let fields = config.as_object_mut().expect("an object");
    let mut set = |key: &str, value: serde_json::Value| {
        fields.insert(key.to_string(), value);
    };
    // PEFT adds both names for SEQ_CLS; BERT's head is `classifier`. The
    // PEFT versions that run prefix tuning on BERT (transformers 4.x) refuse
    // the field in a PREFIX_TUNING config, and every version adds it on load.
    if let Some(head) = shape.head_module.filter(|_| !spec.method.uses_prefixes()) {
        set("modules_to_save", json!([head, "score"]));
    }
    if spec.method.uses_virtual_tokens() {
        set("num_virtual_tokens", json!(peft.num_virtual_tokens));
        set("token_dim", json!(shape.token_dim));
        set("num_layers", json!(shape.num_layers));
        set("num_attention_heads", json!(shape.num_attention_heads));
        set("num_transformer_submodules", json!(1));
    }
    match (adapter, spec.method) {
        (_, Method::PromptTuning) => {
            let init_text = match peft.init {
                PromptInit::Text => peft.init_text.clone(),
                _ => None,
            };
            set("prompt_tuning_init", json!(peft_init_name(peft.init)));
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
            set("encoder_hidden_size", json!(peft.encoder_hidden_size_for(shape.token_dim as u32)));
            set("encoder_num_layers", json!(peft.encoder_num_layers()));
            set("encoder_dropout", json!(peft.encoder_dropout()));
        }
        (Adapter::Prefix(prefix), Method::PrefixTuning | Method::PTuningV2) => {
            set("prefix_projection", json!(prefix.projection_hidden().is_some()));
            set("encoder_hidden_size", json!(prefix.projection_hidden().unwrap_or(shape.token_dim)));
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

/// The adapter tensors under PEFT's key names: the prompt or prefixes as
/// `prompt_embeddings` (an encoder's output, computed in eval mode), or the
/// LoRA updates; and `base_model[.model].classifier.{weight,bias}`.
pub fn adapter_tensors(spec: &JobSpec, model: &Classifier) -> Vec<(String, Tensor)> {
    let mut tensors = model.adapter.peft_tensors();
    let head = format!("{}{}", head_prefix(spec.method), ClassificationHead::MODULE);
    tensors.extend(model.head.named_tensors().into_iter().map(|(name, tensor)| (format!("{head}.{name}"), tensor)));
    tensors
}

impl Adapter {
    /// The adapter's tensors under PEFT's key names: the prompt or prefixes
    /// as `prompt_embeddings` (an encoder's output, computed in eval mode),
    /// or the LoRA updates; none for full fine-tuning.
    pub fn peft_tensors(&self) -> Vec<(String, Tensor)> {
        tch::no_grad(|| match self {
            Adapter::PromptTuning(prompt) => vec![(PROMPT_KEY.to_string(), prompt.embeddings().shallow_clone())],
            Adapter::PTuning(encoder) => vec![(PROMPT_KEY.to_string(), encoder.prompt(false))],
            Adapter::Prefix(prefix) => vec![(PROMPT_KEY.to_string(), prefix.prefixes())],
            Adapter::Lora(lora) => lora.named_tensors(),
            Adapter::Full(_) => Vec::new(),
        })
    }
}

/// Writes a PEFT export of `adapter` (no head) into `out_dir`, plus
/// `ptune.json`: what a causal-LM job saves.
pub fn write_adapter(
    out_dir: &Path,
    spec: &JobSpec,
    shape: &AdapterShape,
    adapter: &Adapter,
    provenance: &serde_json::Value,
) -> Result<(), EngineError> {
    std::fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;
    write_safetensors(&out_dir.join(ADAPTER_WEIGHTS_FILE), &adapter.peft_tensors())?;
    write_json(&out_dir.join(ADAPTER_CONFIG_FILE), &peft_config(spec, shape, adapter))?;
    write_json(&out_dir.join(PROVENANCE_FILE), provenance)
}

/// Writes a causal-LM full fine-tuning export into `out_dir`: the job's copy
/// of the decoder (`vars`, named as the Hugging Face `*ForCausalLM` names its
/// parameters) as a model folder that `AutoModelForCausalLM.from_pretrained`
/// loads: `model.safetensors`, the base's `config.json` (its dtype set to
/// float32, as the weights are), and the base's tokenizer and generation
/// config where it has them; plus `ptune.json`.
pub fn write_causal_lm_model(
    out_dir: &Path,
    base_dir: &Path,
    vars: &nn::VarStore,
    provenance: &serde_json::Value,
) -> Result<(), EngineError> {
    std::fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;
    write_model_weights(out_dir, vars)?;
    let config_path = base_dir.join(MODEL_CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| EngineError::io(&config_path, e))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::Model(format!("{} is not json: {e}", config_path.display())))?;
    if let Some(fields) = config.as_object_mut() {
        fields.insert("dtype".into(), json!("float32"));
        if let Some(older) = fields.get_mut("torch_dtype") {
            *older = json!("float32");
        }
    }
    write_json(&out_dir.join(MODEL_CONFIG_FILE), &config)?;
    for name in [TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
        let source = base_dir.join(name);
        if source.is_file() {
            let target = out_dir.join(name);
            let partial = partial_path(&target);
            std::fs::copy(&source, &partial).map_err(|e| EngineError::io(&source, e))?;
            std::fs::rename(&partial, &target).map_err(|e| EngineError::io(&target, e))?;
        }
    }
    write_json(&out_dir.join(PROVENANCE_FILE), provenance)
}

/// The `config.json` of a full fine-tuning export: the base's architecture as
/// `BertForSequenceClassification` (or `BertForTokenClassification`, or
/// RoBERTa's) with the job's labels.
pub fn model_config(spec: &JobSpec, base: &BertConfig) -> serde_json::Value {
    let labels = &spec.data.labels;
    let family = if base.is_roberta() { "Roberta" } else { "Bert" };
    let architecture = match spec.task {
        ptune_core::Task::TokenClassification => format!("{family}ForTokenClassification"),
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

/// Writes the job's export into `out_dir` (created if missing), plus
/// `ptune.json` with how it was trained: a PEFT adapter, or for full
/// fine-tuning a model folder with every variable of `vars` (the job's own
/// encoder under `bert.` or `roberta.` and the head under `classifier.`). Each file is
/// written beside its final name and renamed into place, so a reader never
/// sees half a file.
pub fn write(
    out_dir: &Path,
    spec: &JobSpec,
    base: &BertConfig,
    model: &Classifier,
    vars: &nn::VarStore,
    provenance: &serde_json::Value,
) -> Result<(), EngineError> {
    std::fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;
    if spec.method == Method::Full {
        write_model_weights(out_dir, vars)?;
        write_json(&out_dir.join(MODEL_CONFIG_FILE), &model_config(spec, base))?;
    } else {
        write_safetensors(&out_dir.join(ADAPTER_WEIGHTS_FILE), &adapter_tensors(spec, model))?;
        write_json(&out_dir.join(ADAPTER_CONFIG_FILE), &adapter_config(spec, base, model))?;
    }
    write_json(&out_dir.join(PROVENANCE_FILE), provenance)
}

/// Reads a PEFT export of a BERT sequence classifier (`PROMPT_TUNING`,
/// `P_TUNING`, `PREFIX_TUNING` or `LORA`, as PEFT or this engine saves it)
/// into a model whose variables are declared under `p`. Prompts and prefixes
/// come back as the saved tables.
pub fn load_adapter(dir: &Path, base: &BaseModel, p: &nn::Path) -> Result<Classifier, EngineError> {
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| EngineError::io(&config_path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::Model(format!("{} is not json: {e}", config_path.display())))?;
    let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(&weights_path)
        .map_err(|e| EngineError::Model(format!("cannot read {}: {e}", weights_path.display())))?
        .into_iter()
        .map(|(name, tensor)| (name, tensor.to_kind(Kind::Float).to_device(p.device())))
        .collect();
    let bad = |message: String| EngineError::Model(format!("{}: {message}", dir.display()));
    let tensor = |key: &str| tensors.get(key).ok_or_else(|| bad(format!("no tensor {key}")));
    let peft_type = config["peft_type"].as_str().unwrap_or_default();
    let cfg = &base.config;
    let method = match peft_type {
        "PROMPT_TUNING" | "P_TUNING" => Method::PromptTuning,
        "PREFIX_TUNING" => Method::PrefixTuning,
        "LORA" => Method::Lora,
        other => return Err(bad(format!("unsupported peft_type {other:?}"))),
    };
    let adapter = match method {
        Method::PromptTuning => Adapter::PromptTuning(PromptTuning::from_table(p, tensor(PROMPT_KEY)?)),
        Method::PrefixTuning => {
            let prefixes = tensor(PROMPT_KEY)?;
            let shape = PrefixShape {
                num_virtual_tokens: prefixes.size()[0],
                num_layers: cfg.num_hidden_layers,
                num_heads: cfg.num_attention_heads,
                token_dim: cfg.hidden_size,
            };
            if prefixes.size() != [shape.num_virtual_tokens, shape.width()] {
                return Err(bad(format!("prompt_embeddings has shape {:?}, expected [nvt, {}]", prefixes.size(), shape.width())));
            }
            let prefix = PrefixTuning::new(&(p / "prompt_encoder"), shape, None, 0.0);
            tch::no_grad(|| prefix.prefixes().copy_(prefixes));
            Adapter::Prefix(prefix)
        }
        _ => {
            let number = |key: &str| config[key].as_f64().ok_or_else(|| bad(format!("adapter_config.json has no {key}")));
            let r = number("r")? as i64;
            let layout = cfg.lora_layout();
            let layer_of = |path: &str| Lora::key(&layout.layers, 0, path, "lora_A");
            let modules: Vec<LoraModule> =
                layout.modules.iter().filter(|m| tensors.contains_key(&layer_of(m.path))).copied().collect();
            if modules.is_empty() {
                return Err(bad(format!("no LoRA weights of a {} encoder (no {})", cfg.model_type, layer_of("attention.self.query"))));
            }
            let lora_config = LoraConfig {
                r,
                alpha: number("lora_alpha")?,
                dropout: 0.0,
                modules,
                layers: layout.layers.clone(),
                fan_in_fan_out: layout.fan_in_fan_out,
            };
            let lora = Lora::new(p, lora_config, layout.num_layers);
            tch::no_grad(|| {
                for (key, mut variable) in lora.named_tensors() {
                    let saved = tensor(&key)?;
                    if saved.size() != variable.size() {
                        return Err(bad(format!("{key} has shape {:?}, expected {:?}", saved.size(), variable.size())));
                    }
                    variable.copy_(saved);
                }
                Ok::<_, EngineError>(())
            })?;
            Adapter::Lora(lora)
        }
    };
    let level = match config["task_type"].as_str() {
        Some("TOKEN_CLS") => Level::Token,
        _ => Level::Sequence,
    };
    // The label count comes from the projection's weight: `classifier.weight`
    // or, for RoBERTa's sequence head, `classifier.out_proj.weight`.
    let projection = if level == Level::Sequence && cfg.is_roberta() { "out_proj.weight" } else { "weight" };
    // PEFT versions before 0.14 kept `modules_to_save` in the saved key.
    let head_key = format!("{}{}", head_prefix(method), ClassificationHead::MODULE);
    let head_key = [head_key.clone(), format!("{head_key}.modules_to_save")]
        .into_iter()
        .find(|key| tensors.contains_key(&format!("{key}.{projection}")))
        .ok_or_else(|| bad(format!("no tensor {head_key}.{projection}")))?;
    let labels = tensor(&format!("{head_key}.{projection}"))?.size()[0];
    let head = ClassificationHead::for_model(p, cfg, level, labels);
    tch::no_grad(|| {
        for (name, mut variable) in head.named_tensors() {
            variable.copy_(tensor(&format!("{head_key}.{name}"))?);
        }
        Ok::<_, EngineError>(())
    })?;
    // PEFT's configs cannot say how the sequence was pooled: the caller
    // sets it from `ptune.json` where there is one.
    Ok(Classifier { adapter, head, level, pooling: ptune_core::Pooling::Cls })
}

/// Writes every variable of `vars`, by name, as the folder's `model.safetensors`.
fn write_model_weights(out_dir: &Path, vars: &nn::VarStore) -> Result<(), EngineError> {
    let mut tensors: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors(&out_dir.join(MODEL_WEIGHTS_FILE), &tensors)
}

/// Writes float32 tensors with the `{"format": "pt"}` metadata PyTorch
/// writers use.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), EngineError> {
    let views: Vec<(&str, FloatView)> = tensors
        .iter()
        .map(|(name, tensor)| {
            // For a float32 CPU tensor, the same storage: nothing is copied yet.
            let tensor = tensor.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
            let shape = tensor.size().iter().map(|&d| d as usize).collect();
            (name.as_str(), FloatView { tensor, shape })
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let partial = partial_path(path);
    crate::faults::check_write().map_err(|e| EngineError::io(&partial, e))?;
    safetensors::tensor::serialize_to_file(views, Some(metadata), &partial).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        let source = match e {
            safetensors::SafeTensorError::IoError(io) => io,
            other => std::io::Error::other(other),
        };
        EngineError::io(&partial, source)
    })?;
    crate::durable::sync_file(&partial).map_err(|e| EngineError::io(&partial, e))?;
    crate::durable::rename(&partial, path).map_err(|e| EngineError::io(path, e))
}

#[cfg(target_endian = "big")]
compile_error!("safetensors files are little-endian; FloatView writes a tensor's native bytes");

/// A contiguous float32 CPU tensor that yields its bytes only when the
/// writer reaches it, so that writing a file holds one tensor's bytes at a
/// time rather than a copy of all of them (for a full fine-tuning
/// checkpoint, three copies of the model).
struct FloatView {
    tensor: Tensor,
    shape: Vec<usize>,
}

impl safetensors::View for FloatView {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let mut bytes = vec![0u8; self.data_len()];
        self.tensor.copy_data_u8(&mut bytes, self.tensor.numel());
        std::borrow::Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.tensor.numel() * std::mem::size_of::<f32>()
    }
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
