//! Reading and writing a spec's text: labels as JSON spells them, fields
//! parsed through their own `FromStr` (so an unknown value names the ones
//! there are), labels written as strings, integers or booleans, and lists
//! joined for messages.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// The text a JSON label value is matched by: strings as they are, integers
/// and booleans in their JSON spelling.
pub fn label_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `a`, `a or b`, `a, b or c`.
pub(super) fn join_or<T: fmt::Display>(items: &[T]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", join(rest)),
    }
}

pub(super) fn join<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

pub(super) fn parse_via_from_str<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

pub(super) fn labels_as_strings<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let values = Vec::<toml_or_json::Scalar>::deserialize(deserializer)?;
    Ok(values.into_iter().map(|v| v.0).collect())
}

mod toml_or_json {
    use serde::{Deserialize, Deserializer};

    /// A label written as a string, an integer or a boolean.
    pub struct Scalar(pub String);

    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            #[derive(Deserialize)]
            #[serde(untagged)]
            enum Raw {
                S(String),
                I(i64),
                B(bool),
            }
            Ok(Scalar(match Raw::deserialize(deserializer)? {
                Raw::S(s) => s,
                Raw::I(i) => i.to_string(),
                Raw::B(b) => b.to_string(),
            }))
        }
    }
}
