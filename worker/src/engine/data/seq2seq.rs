//! Text-to-text data for causal language models, as the E2E NLG set comes:
//! training pairs `{"source", "target"}` and evaluation inputs
//! `{"source", "references": [..]}` in JSON Lines. A training example is
//! the tokenization of `source + separator + " " + target` followed by EOS,
//! labelled on the target (and EOS) only; a generation prompt is the
//! tokenization of `source + separator`, which is the same token prefix,
//! since the space before the target starts a new pre-token.

use std::path::Path;

use serde_json::{Map, Value};

use super::jsonl::read_lines;
use super::tokenize::LmTokenizer;
use crate::engine::error::EngineError;

/// A source text and its one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceTarget {
    pub source: String,
    pub target: String,
}

/// A source text and every reference output for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceReferences {
    pub source: String,
    pub references: Vec<String>,
}

/// One causal-LM example: token ids and, per position, the id the model
/// should produce there or -100 where nothing is predicted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LmExample {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
}

/// The JSON fields of text-to-text rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seq2SeqFields {
    pub source: String,
    pub target: String,
    /// An evaluation row's list of reference outputs.
    pub references: String,
}

impl Default for Seq2SeqFields {
    /// E2E's names: `source`, `target`, `references`.
    fn default() -> Self {
        Self { source: "source".into(), target: "target".into(), references: "references".into() }
    }
}

/// Reads up to `limit` (0: all) `{"source", "target"}` pairs from `path`,
/// naming the file `name` in errors.
pub fn read_source_targets(path: &Path, name: &str, limit: u64) -> Result<Vec<SourceTarget>, EngineError> {
    read_source_targets_in(path, name, limit, &Seq2SeqFields::default())
}

/// [`read_source_targets`] with the fields named by `fields`.
pub fn read_source_targets_in(
    path: &Path,
    name: &str,
    limit: u64,
    fields: &Seq2SeqFields,
) -> Result<Vec<SourceTarget>, EngineError> {
    read_objects(path, name, limit, |object| {
        Ok(SourceTarget { source: string_field(object, &fields.source)?, target: string_field(object, &fields.target)? })
    })
}

/// Reads up to `limit` (0: all) `{"source", "references": [..]}` inputs
/// from `path`; a line with a single `"target"` instead counts as one reference.
pub fn read_source_references(path: &Path, name: &str, limit: u64) -> Result<Vec<SourceReferences>, EngineError> {
    read_source_references_in(path, name, limit, &Seq2SeqFields::default())
}

/// [`read_source_references`] with the fields named by `fields`.
pub fn read_source_references_in(
    path: &Path,
    name: &str,
    limit: u64,
    fields: &Seq2SeqFields,
) -> Result<Vec<SourceReferences>, EngineError> {
    let (references_field, target_field) = (fields.references.as_str(), fields.target.as_str());
    read_objects(path, name, limit, |object| {
        let source = string_field(object, &fields.source)?;
        let references = match (object.get(references_field), object.get(target_field)) {
            (Some(Value::Array(items)), _) => items
                .iter()
                .map(|item| item.as_str().map(str::to_string).ok_or(format!("expected strings in field {references_field:?}")))
                .collect::<Result<Vec<_>, _>>()?,
            (Some(_), _) => return Err(format!("expected a list of strings in field {references_field:?}")),
            (None, Some(Value::String(target))) => vec![target.clone()],
            (None, _) => return Err(format!("missing field {references_field:?} (or {target_field:?})")),
        };
        if references.is_empty() {
            return Err(format!("field {references_field:?} is empty"));
        }
        Ok(SourceReferences { source, references })
    })
}

fn string_field(object: &Map<String, Value>, field: &str) -> Result<String, String> {
    match object.get(field) {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(_) => Err(format!("expected a string in field {field:?}")),
        None => Err(format!("missing field {field:?}")),
    }
}

/// One JSON object per line; blank lines are skipped but counted, and a
/// bad line fails with the file name and 1-based line number.
fn read_objects<T>(
    path: &Path,
    name: &str,
    limit: u64,
    parse: impl Fn(&Map<String, Value>) -> Result<T, String>,
) -> Result<Vec<T>, EngineError> {
    read_lines(path, name, limit, |_, line| {
        let value: Value = serde_json::from_str(line)
            .map_err(|e| format!("invalid json at column {}: {}", e.column(), category(&e)))?;
        let Value::Object(object) = value else {
            return Err("expected a json object".into());
        };
        parse(&object)
    })
}

fn category(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Eof => "unexpected end of line",
        _ => "syntax error",
    }
}

/// How source and target become one token sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seq2SeqFormat {
    /// Appended to the source; the target follows after one space.
    pub separator: String,
    /// Ends every target, so that the model learns to stop.
    pub eos_id: i64,
    /// Longest example in tokens (EOS included); longer ones lose their end.
    pub max_len: usize,
}

impl Seq2SeqFormat {
    /// Separator used by default: ` ||` as in the prefix-tuning paper's E2E format.
    pub const DEFAULT_SEPARATOR: &'static str = " ||";

    /// Ids of `source + separator`, with the template's leading special
    /// tokens (e.g. a BOS) and without any it appends (e.g. an EOS).
    pub fn prompt_ids(&self, tokenizer: &LmTokenizer, source: &str) -> Result<Vec<i64>, EngineError> {
        leading_specials_only(tokenizer, &format!("{source}{}", self.separator))
    }

    /// The training example of one pair: labels are -100 over the prompt
    /// tokens and the ids themselves over the target and the final EOS.
    pub fn training_example(&self, tokenizer: &LmTokenizer, source: &str, target: &str) -> Result<LmExample, EngineError> {
        let prompt = self.prompt_ids(tokenizer, source)?;
        let mut ids = leading_specials_only(tokenizer, &format!("{source}{} {target}", self.separator))?;
        ids.push(self.eos_id);
        let shared = prompt.iter().zip(&ids).take_while(|(a, b)| a == b).count();
        let mut labels = vec![-100; shared];
        labels.extend_from_slice(&ids[shared..]);
        ids.truncate(self.max_len);
        labels.truncate(self.max_len);
        Ok(LmExample { ids, labels })
    }
}

/// Ids of `text` with the special tokens the template puts before it but
/// none of those it puts after it.
fn leading_specials_only(tokenizer: &LmTokenizer, text: &str) -> Result<Vec<i64>, EngineError> {
    let mut full = tokenizer.encode(text, true)?;
    let plain = tokenizer.encode(text, false)?;
    if !plain.is_empty() && plain.len() <= full.len() {
        if let Some(start) = (0..=full.len() - plain.len()).find(|&k| full[k..k + plain.len()] == plain[..]) {
            full.truncate(start + plain.len());
        }
    }
    Ok(full)
}
