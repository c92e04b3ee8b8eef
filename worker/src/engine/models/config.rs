//! Reading a Hugging Face model folder's `config.json`: the whole config as
//! an architecture's serde type, or only its `model_type`, and the field
//! types the architectures' configs share.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::engine::error::EngineError;

/// A model folder's config.
pub const CONFIG_FILE: &str = "config.json";
/// A model folder's tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Reads `config.json` of a model folder as `T`; `what` names the expected
/// kind of config in errors.
pub fn read_config<T: DeserializeOwned>(dir: &Path, what: &str) -> Result<T, EngineError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| EngineError::Model(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| EngineError::Model(format!("{} is not {what} config: {e}", path.display())))
}

/// The `model_type` of a model folder's config, which names its architecture.
pub fn model_type(dir: &Path) -> Result<String, EngineError> {
    #[derive(Deserialize)]
    struct ModelType {
        model_type: String,
    }
    let ModelType { model_type } = read_config(dir, "a Hugging Face model")?;
    Ok(model_type)
}

/// Ids in a config field that holds one id, a list, or null.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenIds(pub Vec<i64>);

impl<'de> Deserialize<'de> for TokenIds {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(i64),
            Many(Vec<i64>),
        }
        Ok(TokenIds(match Option::<OneOrMany>::deserialize(deserializer)? {
            None => Vec::new(),
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
        }))
    }
}
