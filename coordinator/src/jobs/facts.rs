//! What admission needs to know of a dataset, gathered once while it is
//! uploaded and stored beside it, so that submitting a job checks its labels
//! without reading the file again.
//!
//! For every top-level field of the file's JSON-object lines the facts keep
//! the first line that lacks it and the first line of each distinct scalar
//! value (as [`label_text`] spells it), plus the first value that is not a
//! scalar; with them [`DatasetFacts::check_labels`] reaches the verdict, and
//! the exact message, of reading the file line by line ([`LabelCheck`]).
//! Lines that are not JSON objects are skipped by both.
//!
//! Memory is bounded whatever the file: at most [`MAX_FIELDS`] fields are
//! followed (a file with more is marked incomplete), and a field whose
//! distinct values pass [`MAX_VALUES`] or [`MAX_VALUE_BYTES`] keeps none (a
//! free-text field). A check that needs what was not kept returns `None`,
//! and the caller reads the file as before.
//!
//! [`LabelCheck`]: super::LabelCheck

use std::collections::BTreeMap;

use ptune_core::spec::{label_text, MAX_LABELS};
use ptune_core::{JobSpec, SpecError};
use serde::{Deserialize, Serialize};

/// Most fields followed per file.
pub const MAX_FIELDS: usize = 64;
/// Most distinct values kept per field: as many as a spec may declare labels.
pub const MAX_VALUES: usize = MAX_LABELS;
/// Most bytes of distinct values kept per field.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;
/// Longest non-scalar value kept for a message.
pub const MAX_OTHER_BYTES: usize = 4 * 1024;
/// Longest line read into the facts (give or take one upload chunk); a
/// longer one marks them incomplete.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// The facts of one dataset, as stored in `datasets.facts`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetFacts {
    /// False when a limit was passed: only the fields listed can be checked.
    pub complete: bool,
    /// Lines that are JSON objects.
    pub objects: u64,
    /// The line of the first of them.
    pub first_object: Option<u64>,
    pub fields: BTreeMap<String, FieldFacts>,
}

/// What is known of one top-level field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldFacts {
    /// The first JSON-object line without the field.
    pub first_missing: Option<u64>,
    /// The first line of every distinct scalar value; `None` when there were
    /// too many to keep.
    pub values: Option<BTreeMap<String, u64>>,
    /// The first value that is not a scalar (a list, an object, null), with
    /// its line, as JSON (`None` when longer than [`MAX_OTHER_BYTES`]).
    pub first_other: Option<(u64, Option<String>)>,
    #[serde(skip)]
    value_bytes: usize,
}

impl DatasetFacts {
    /// The verdict of reading `file_name` line by line for `spec`'s labels,
    /// or `None` when the facts do not hold what it needs.
    pub fn check_labels(&self, spec: &JobSpec, file_name: &str) -> Option<Result<(), SpecError>> {
        let field = &spec.data.label_field;
        let facts = match self.fields.get(field) {
            Some(facts) => facts,
            // A complete record without the field: no object line has it.
            None if self.complete => return Some(self.first_object.map_or(Ok(()), |line| Err(missing(field, line, file_name)))),
            None => return None,
        };
        let values = facts.values.as_ref()?;
        let undeclared = values
            .iter()
            .filter(|(text, _)| !spec.data.labels.iter().any(|l| l == *text))
            .map(|(text, &line)| (line, format!("{text:?}")));
        let other = facts.first_other.iter().map(|(line, json)| (*line, json.as_ref().map(|json| format!("{json:?}"))));
        let first_bad = undeclared.map(|(line, shown)| (line, Some(shown))).chain(other).min_by_key(|(line, _)| *line);
        // The first bad value was too long to keep: read the file for its message.
        let first_bad = match first_bad {
            Some((line, Some(shown))) => Some((line, shown)),
            Some((_, None)) => return None,
            None => None,
        };
        Some(match (facts.first_missing, first_bad) {
            (Some(m), Some((b, _))) if m < b => Err(missing(field, m, file_name)),
            (Some(m), None) => Err(missing(field, m, file_name)),
            (_, Some((line, shown))) => Err(SpecError::new(
                "data.labels",
                format!(
                    "label {shown} on line {line} of {file_name} is not one of the declared labels {:?}",
                    spec.data.labels
                ),
            )),
            (None, None) => Ok(()),
        })
    }
}

fn missing(field: &str, line: u64, file_name: &str) -> SpecError {
    SpecError::new(
        "data.label_field",
        format!("line {line} of {file_name} has no {field:?} field; set data.label_field to the field holding the label"),
    )
}

/// Gathers [`DatasetFacts`] from the chunks of an upload.
#[derive(Debug)]
pub struct FactsCollector {
    facts: DatasetFacts,
    /// Lines seen (every line, as [`LabelCheck`](super::LabelCheck) counts them).
    line_no: u64,
    partial: Vec<u8>,
    overflowed: bool,
    /// A line was too long to read: fields first seen after it cannot know
    /// what it held, so they keep no values either.
    blind: bool,
}

impl Default for FactsCollector {
    fn default() -> Self {
        Self {
            facts: DatasetFacts { complete: true, ..Default::default() },
            line_no: 0,
            partial: Vec::new(),
            overflowed: false,
            blind: false,
        }
    }
}

impl FactsCollector {
    /// Reads the complete lines of the next chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                self.line(&rest[..end]);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&rest[..end]);
                self.line(&line);
            }
            rest = &rest[end + 1..];
        }
        if self.partial.len() + rest.len() > MAX_LINE_BYTES {
            self.overflowed = true;
            self.partial.clear();
        } else if !self.overflowed {
            self.partial.extend_from_slice(rest);
        }
    }

    /// The facts, after the last line (one without a newline included).
    pub fn finish(mut self) -> DatasetFacts {
        if !self.partial.is_empty() || self.overflowed {
            let last = std::mem::take(&mut self.partial);
            self.line(&last);
        }
        self.facts
    }

    fn line(&mut self, line: &[u8]) {
        self.line_no += 1;
        if std::mem::take(&mut self.overflowed) {
            // A line too long to read: its facts are unknown.
            self.facts.complete = false;
            self.blind = true;
            for facts in self.facts.fields.values_mut() {
                facts.values = None;
            }
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let Ok(serde_json::Value::Object(example)) = serde_json::from_slice::<serde_json::Value>(line) else {
            return;
        };
        let line_no = self.line_no;
        self.facts.objects += 1;
        let first_object = *self.facts.first_object.get_or_insert(line_no);
        for (name, facts) in self.facts.fields.iter_mut() {
            if facts.first_missing.is_none() && !example.contains_key(name) {
                facts.first_missing = Some(line_no);
            }
        }
        for (name, value) in &example {
            if let Some(facts) = self.facts.fields.get_mut(name) {
                facts.record(line_no, value);
                continue;
            }
            if self.facts.fields.len() >= MAX_FIELDS {
                self.facts.complete = false;
                continue;
            }
            let mut facts = FieldFacts {
                first_missing: (first_object < line_no).then_some(first_object),
                values: (!self.blind).then(BTreeMap::new),
                ..Default::default()
            };
            facts.record(line_no, value);
            self.facts.fields.insert(name.clone(), facts);
        }
    }
}

impl FieldFacts {
    fn record(&mut self, line_no: u64, value: &serde_json::Value) {
        let Some(text) = label_text(value) else {
            if self.first_other.is_none() {
                let json = value.to_string();
                self.first_other = Some((line_no, (json.len() <= MAX_OTHER_BYTES).then_some(json)));
            }
            return;
        };
        let Some(values) = &mut self.values else { return };
        if values.contains_key(&text) {
            return;
        }
        self.value_bytes += text.len();
        if values.len() >= MAX_VALUES || self.value_bytes > MAX_VALUE_BYTES {
            self.values = None;
            return;
        }
        values.insert(text, line_no);
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::jobs::LabelCheck;

    fn spec(labels: &[&str], label_field: &str) -> JobSpec {
        let mut spec = crate::jobs::datasets::tests::spec();
        spec.data.labels = labels.iter().map(|l| l.to_string()).collect();
        spec.data.label_field = label_field.into();
        spec
    }

    fn read_line_by_line(spec: &JobSpec, data: &[u8], chunk: usize) -> Result<(), SpecError> {
        let mut check = LabelCheck::new(spec, "train.jsonl");
        data.chunks(chunk).try_for_each(|w| check.feed(w))?;
        check.finish()
    }

    fn facts(data: &[u8], chunk: usize) -> DatasetFacts {
        let mut collector = FactsCollector::default();
        data.chunks(chunk).for_each(|c| collector.feed(c));
        let facts = collector.finish();
        // What the database stores and gives back.
        serde_json::from_value(serde_json::to_value(&facts).unwrap()).unwrap()
    }

    const LINES: [&str; 12] = [
        r#"{"text": "a", "label": 0}"#,
        r#"{"text": "b", "label": 1}"#,
        r#"{"text": "c", "label": "pos"}"#,
        r#"{"text": "d", "label": true}"#,
        r#"{"text": "e", "label": [1, 2]}"#,
        r#"{"text": "f", "label": null}"#,
        r#"{"text": "g"}"#,
        r#"{"text": "h", "label": 2, "tag": "x"}"#,
        r#"{"tag": "y", "label": 0}"#,
        "not json",
        "   ",
        "[1, 2, 3]",
    ];

    /// Random files of every kind of line, checked for random declared
    /// labels and label fields: the facts give what reading gives, message
    /// and all, however the upload was chunked.
    #[test]
    fn facts_reach_the_verdict_of_reading_every_line() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut checked = 0;
        for _ in 0..3_000 {
            let n = rng.gen_range(0..8);
            let mut text: Vec<&str> = (0..n).map(|_| LINES[rng.gen_range(0..LINES.len())]).collect();
            if rng.gen_bool(0.2) {
                text.insert(0, "");
            }
            let mut data = text.join("\n");
            if rng.gen_bool(0.5) {
                data.push('\n');
            }
            let labels: Vec<&str> = ["0", "1", "2", "pos", "true"].into_iter().filter(|_| rng.gen_bool(0.7)).collect();
            let field = ["label", "tag", "text", "none"][rng.gen_range(0..4)];
            let spec = spec(&labels, field);
            let chunk = rng.gen_range(1..40);
            let expected = read_line_by_line(&spec, data.as_bytes(), chunk);
            let got = facts(data.as_bytes(), rng.gen_range(1..40)).check_labels(&spec, "train.jsonl");
            let got = got.expect("small files keep every fact");
            assert_eq!(got, expected, "file {data:?}, labels {labels:?}, field {field:?}");
            checked += usize::from(expected.is_err());
        }
        assert!(checked > 500, "the files must exercise refusals too: {checked}");
    }

    #[test]
    fn a_free_text_field_keeps_no_values_and_sends_the_check_back_to_the_file() {
        let data: String = (0..MAX_VALUES + 1).map(|i| format!("{{\"text\": \"sentence {i}\", \"label\": {}}}\n", i % 2)).collect();
        let got = facts(data.as_bytes(), 64 * 1024);
        let facts = got;
        assert!(facts.complete);
        assert_eq!(facts.objects, (MAX_VALUES + 1) as u64);
        assert_eq!(facts.fields["text"].values, None);
        assert_eq!(facts.check_labels(&spec(&["0", "1"], "text"), "t.jsonl"), None);
        assert_eq!(facts.check_labels(&spec(&["0", "1"], "label"), "t.jsonl"), Some(Ok(())));
        let err = facts.check_labels(&spec(&["0"], "label"), "t.jsonl").unwrap().unwrap_err();
        assert_eq!(err.message, r#"label "1" on line 2 of t.jsonl is not one of the declared labels ["0"]"#);
    }

    #[test]
    fn fields_past_the_limit_and_overlong_lines_make_the_facts_incomplete() {
        let wide: String = (0..MAX_FIELDS + 3).map(|i| format!("\"f{i}\": 1")).collect::<Vec<_>>().join(", ");
        let many = facts(format!("{{{wide}}}\n").as_bytes(), 1000);
        assert!(!many.complete);
        assert_eq!(many.fields.len(), MAX_FIELDS);
        assert_eq!(many.check_labels(&spec(&["1"], "unknown"), "t.jsonl"), None, "an unfollowed field is unknown");

        let long = format!("{{\"label\": 0, \"text\": \"{}\"}}\n{{\"label\": 0, \"tag\": 1}}\n", "x".repeat(MAX_LINE_BYTES + (2 << 20)));
        let blind = facts(long.as_bytes(), 1 << 20);
        assert!(!blind.complete);
        assert_eq!(blind.check_labels(&spec(&["0"], "label"), "t.jsonl"), None);
        assert_eq!(blind.check_labels(&spec(&["1"], "tag"), "t.jsonl"), None, "a field first seen after the long line");
    }
}
