//! Which Hugging Face architectures the engine trains, and reading what a
//! worker advertises about a model folder without building the model: the
//! config's `model_type` picks the family in the model-type table
//! (`ptune_core::model_types`: BERT; GPT-2; Llama, Mistral, Qwen2), whose
//! config parser checks the settings it supports.
//!
//! A folder is one of three things: a model the engine trains
//! ([`ModelInfo`]), a model it cannot train ([`InspectError::Unsupported`],
//! with a reason the coordinator shows to users who submit jobs on it), or
//! not a usable model folder at all ([`InspectError::NotAModel`]).

use std::path::Path;

use ptune_core::{ModelFamily, ModelType};
use serde::Deserialize;

use super::bert::BertConfig;
use super::config::read_config;
use super::gpt2::Gpt2Config;
use super::llama::LlamaConfig;
use super::safetensors::{checkpoint_float_parameters, checkpoint_sha256, WEIGHTS_FILE};
use super::ModelInfo;
use crate::engine::error::EngineError;

/// Why a folder cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// A model whose architecture, or one of whose settings, the engine does
    /// not support. `reason` is meant for users and says what is supported.
    #[error("unsupported model_type {model_type:?}: {reason}")]
    Unsupported { model_type: String, reason: String },
    /// Not a readable model folder: no or a broken `config.json` (or no
    /// `model_type` in it), or weights that are missing or unreadable.
    #[error("{0}")]
    NotAModel(EngineError),
}

impl From<InspectError> for EngineError {
    fn from(e: InspectError) -> Self {
        match e {
            InspectError::NotAModel(inner) => inner,
            unsupported => EngineError::Model(unsupported.to_string()),
        }
    }
}

/// Reads `config.json` and the checkpoint's headers (one `model.safetensors`
/// or the shards of `model.safetensors.index.json`), and hashes the weights.
pub fn inspect_any(dir: &Path) -> Result<ModelInfo, InspectError> {
    #[derive(Deserialize)]
    struct TypeOnly {
        model_type: String,
    }
    let TypeOnly { model_type } = read_config(dir, "a Hugging Face model").map_err(InspectError::NotAModel)?;
    let unsupported_config = |e: EngineError| InspectError::Unsupported {
        model_type: model_type.clone(),
        reason: format!("its config is not supported: {}", without_prefix(&e)),
    };
    let Some(family) = ModelFamily::of(&model_type) else {
        return Err(InspectError::Unsupported {
            model_type,
            reason: format!("supported model types: {}", ModelType::all_names().join(", ")),
        });
    };
    let (max_positions, hidden_size, num_layers, num_attention_heads) = match family {
        ModelFamily::Bert => {
            let config = BertConfig::from_dir(dir).map_err(unsupported_config)?;
            if !dir.join(WEIGHTS_FILE).is_file() {
                // BERT models load from one file; a sharded one is still a model.
                return Err(InspectError::Unsupported {
                    model_type,
                    reason: format!("BERT checkpoints must be a single {WEIGHTS_FILE}, not shards"),
                });
            }
            (config.max_positions(), config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
        }
        ModelFamily::Gpt2 => {
            let config = Gpt2Config::from_dir(dir).map_err(unsupported_config)?;
            (config.n_positions, config.n_embd, config.n_layer, config.n_head)
        }
        ModelFamily::Llama => {
            let config = LlamaConfig::from_dir(dir).map_err(unsupported_config)?;
            (config.max_position_embeddings, config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
        }
    };
    Ok(ModelInfo {
        model_type,
        max_positions: to_u32(max_positions),
        hidden_size: to_u32(hidden_size),
        num_layers: to_u32(num_layers),
        num_attention_heads: to_u32(num_attention_heads),
        parameters: checkpoint_float_parameters(dir).map_err(InspectError::NotAModel)?,
        sha256: checkpoint_sha256(dir).map_err(InspectError::NotAModel)?,
    })
}

/// The message of an engine error without its `model: ` category.
fn without_prefix(e: &EngineError) -> String {
    match e {
        EngineError::Model(message) => message.clone(),
        other => other.to_string(),
    }
}

fn to_u32(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::engine::models::safetensors::checkpoint_files;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    /// The linears each architecture lets LoRA target are the ones the
    /// model-type table lists for its family (which admission checks
    /// targets against and the memory estimate counts), path for path, in
    /// the same order. (The table's sizes are typical ones, for estimates;
    /// the tiny fixtures have narrower feed-forwards.)
    #[test]
    fn each_architecture_exposes_the_linears_the_table_lists() {
        use crate::engine::models::frozen::FrozenBase;
        for (name, family) in
            [("tiny-bert", ModelFamily::Bert), ("tiny-gpt2", ModelFamily::Gpt2), ("tiny-llama", ModelFamily::Llama)]
        {
            let base = FrozenBase::load(&fixture(name), tch::Device::Cpu).unwrap();
            let linears = match &base {
                FrozenBase::Encoder(e) => e.config.linears(),
                FrozenBase::Decoder(d) => d.model.linears(),
            };
            let engine: Vec<&str> = linears.modules.iter().map(|m| m.path).collect();
            let table: Vec<&str> = family.linears().iter().map(|l| l.path).collect();
            assert_eq!(engine, table, "{name}");
        }
    }

    /// Each family's config parser accepts exactly the types the model-type
    /// table gives its family, and names them when it refuses another.
    #[test]
    fn each_familys_config_takes_the_types_the_table_gives_it() {
        type Parse = fn(&Path) -> Result<(), EngineError>;
        let families: [(&str, ModelFamily, Parse); 3] = [
            ("tiny-bert", ModelFamily::Bert, |d| BertConfig::from_dir(d).map(|_| ())),
            ("tiny-gpt2", ModelFamily::Gpt2, |d| Gpt2Config::from_dir(d).map(|_| ())),
            ("tiny-llama", ModelFamily::Llama, |d| LlamaConfig::from_dir(d).map(|_| ())),
        ];
        for (name, family, parse) in families {
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(fixture(name).join("config.json")).unwrap()).unwrap();
            for t in ptune_core::model_types::MODEL_TYPES {
                let dir = tempfile::tempdir().unwrap();
                config["model_type"] = t.name.into();
                std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
                let refused = match parse(dir.path()) {
                    Err(e) => e.to_string().contains("unsupported model_type"),
                    Ok(()) => false,
                };
                assert_eq!(refused, t.family != family, "{name} with model_type {}", t.name);
                if refused {
                    let e = parse(dir.path()).unwrap_err().to_string();
                    assert!(e.contains(&family.type_names().join(", ")), "{e}");
                }
            }
        }
    }

    #[test]
    fn reads_bert_roberta_gpt2_and_sharded_llama_fixtures() {
        let bert = inspect_any(&fixture("tiny-bert")).unwrap();
        // A single-file checkpoint: its parameters and hash as recorded beside it.
        let recorded: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("tiny_bert_outputs.json")).unwrap()).unwrap();
        assert_eq!(bert.parameters, recorded["parameters"].as_u64().unwrap());
        assert_eq!(bert.sha256, recorded["sha256"].as_str().unwrap());
        assert_eq!((bert.model_type.as_str(), bert.max_positions, bert.hidden_size), ("bert", 40, 32));

        // RoBERTa's 42 position rows hold pad_token_id + 1 = 2 it never uses.
        let roberta = inspect_any(&fixture("tiny-roberta")).unwrap();
        assert_eq!((roberta.model_type.as_str(), roberta.max_positions, roberta.hidden_size), ("roberta", 40, 32));

        let gpt2 = inspect_any(&fixture("tiny-gpt2")).unwrap();
        assert_eq!(
            (gpt2.model_type.as_str(), gpt2.max_positions, gpt2.hidden_size, gpt2.num_layers, gpt2.num_attention_heads),
            ("gpt2", 48, 32, 2, 4)
        );
        // wte 64x32 + wpe 48x32 + per layer (ln 2x2x32, c_attn 32x96+96,
        // c_proj 32x32+32, c_fc 32x128+128, mlp c_proj 128x32+32) + ln_f 2x32
        let per_layer = 4 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32);
        assert_eq!(gpt2.parameters, 64 * 32 + 48 * 32 + 2 * per_layer + 2 * 32);

        let llama_dir = fixture("tiny-llama");
        assert_eq!(checkpoint_files(&llama_dir).unwrap().len(), 2, "the llama fixture is sharded");
        let llama = inspect_any(&llama_dir).unwrap();
        assert_eq!(
            (llama.model_type.as_str(), llama.max_positions, llama.hidden_size, llama.num_layers, llama.num_attention_heads),
            ("llama", 48, 32, 2, 4)
        );
        // The index's own count of the checkpoint's parameters.
        assert_eq!(llama.parameters, 19_680);
        // Hash of the shards' bytes in file-name order.
        let mut bytes = std::fs::read(llama_dir.join("model-00001-of-00002.safetensors")).unwrap();
        bytes.extend(std::fs::read(llama_dir.join("model-00002-of-00002.safetensors")).unwrap());
        use sha2::{Digest, Sha256};
        assert_eq!(llama.sha256, hex::encode(Sha256::digest(&bytes)));
    }

    #[test]
    fn another_architecture_is_unsupported_and_a_folder_without_config_is_not_a_model() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "t5"}"#).unwrap();
        match inspect_any(dir.path()) {
            Err(InspectError::Unsupported { model_type, reason }) => {
                assert_eq!(model_type, "t5");
                assert_eq!(reason, "supported model types: bert, gpt2, llama, mistral, qwen2, roberta");
            }
            other => panic!("expected an unsupported model, got {other:?}"),
        }

        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(inspect_any(empty.path()), Err(InspectError::NotAModel(_))));
    }

    #[test]
    fn a_supported_type_with_an_unsupported_setting_names_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama").join("config.json")).unwrap()).unwrap();
        config["rope_parameters"]["rope_type"] = "yarn".into();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        match inspect_any(dir.path()) {
            Err(InspectError::Unsupported { model_type, reason }) => {
                assert_eq!(model_type, "llama");
                assert!(reason.starts_with("its config is not supported: ") && reason.contains("yarn"), "{reason}");
            }
            other => panic!("expected an unsupported model, got {other:?}"),
        }
    }
}
