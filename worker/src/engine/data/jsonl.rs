//! Labelled texts from JSON Lines: one object per line, with a string text
//! field and a label among the spec's `data.labels`. A bad line fails the job
//! with the file name and 1-based line number, since retrying cannot fix it.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use ptune_core::JobSpec;
use serde_json::Value;

use crate::engine::error::EngineError;

/// A text and the index of its label in `data.labels`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelledText {
    pub text: String,
    pub label: usize,
}

/// Reads up to `limit` examples (0: all) from `path`, naming the file `name`
/// in errors. Blank lines are skipped but counted in line numbers.
pub fn read_labelled_texts(
    path: &Path,
    name: &str,
    spec: &JobSpec,
    limit: u64,
) -> Result<Vec<LabelledText>, EngineError> {
    read_lines(path, name, limit, |_, line| parse_line(line, spec))
}

/// Parses up to `limit` non-blank lines (0: all) of `path` with `parse`,
/// which gets the 1-based line number and the line. Blank lines are skipped
/// but counted; a line that is not UTF-8 or that `parse` refuses fails with
/// the file named `name` and the line number.
pub fn read_lines<T>(
    path: &Path,
    name: &str,
    limit: u64,
    mut parse: impl FnMut(u64, &str) -> Result<T, String>,
) -> Result<Vec<T>, EngineError> {
    let file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut items = Vec::new();
    let mut buffer = Vec::new();
    let mut line_number = 0u64;
    while limit == 0 || (items.len() as u64) < limit {
        buffer.clear();
        if reader.read_until(b'\n', &mut buffer).map_err(|e| EngineError::io(path, e))? == 0 {
            break;
        }
        line_number += 1;
        let bad_line = |message: String| EngineError::Data { file: name.to_string(), line: line_number, message };
        let line = std::str::from_utf8(&buffer).map_err(|_| bad_line("not valid utf-8".into()))?;
        if line.trim().is_empty() {
            continue;
        }
        items.push(parse(line_number, line).map_err(bad_line)?);
    }
    Ok(items)
}

fn parse_line(line: &str, spec: &JobSpec) -> Result<LabelledText, String> {
    let data = &spec.data;
    let value: Value = serde_json::from_str(line).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Eof => "unexpected end of line",
            _ => "syntax error",
        };
        format!("invalid json at column {}: {what}", e.column())
    })?;
    let Value::Object(object) = value else {
        return Err("expected a json object".into());
    };
    let text = match object.get(&data.text_field) {
        Some(Value::String(text)) => text.clone(),
        Some(_) => return Err(format!("expected a string in field {:?}", data.text_field)),
        None => return Err(format!("missing field {:?}", data.text_field)),
    };
    let label_value = object.get(&data.label_field).ok_or_else(|| format!("missing field {:?}", data.label_field))?;
    let label = spec.label_index(label_value).ok_or_else(|| {
        format!(
            "label {label_value} in field {:?} is not one of data.labels [{}]",
            data.label_field,
            data.labels.join(", ")
        )
    })?;
    Ok(LabelledText { text, label })
}
