//! Dataset uploads (hashed and counted while they arrive) and the label
//! check a submitted job runs over its datasets.

use ptune_core::{spec::label_text, JobSpec, SpecError};
use uuid::Uuid;

use super::facts::{DatasetFacts, FactsCollector};
use crate::blob::{BlobWriter, Unlinked};
use crate::error::Error;
use crate::model::{DatasetInfo, DatasetRef};
use crate::store::{ChunkTarget, Store};

/// A dataset being received: written to the database a chunk at a time,
/// hashed, its lines counted and its facts gathered on the way.
pub struct DatasetUpload {
    file_name: Option<String>,
    writer: BlobWriter,
    blob: Uuid,
    max: u64,
    lines: LineCounter,
    facts: FactsCollector,
}

impl DatasetUpload {
    /// Writes into `blob`, refusing more than `max` bytes.
    pub(crate) fn new(store: Store, blob: Uuid, max: u64) -> Self {
        let writer = BlobWriter::new(store, ChunkTarget::Blob(blob), max, "data");
        Self { file_name: None, writer, blob, max, lines: LineCounter::default(), facts: FactsCollector::default() }
    }

    /// Adds a chunk; the file name counts when it is the first one given.
    pub async fn push(&mut self, file_name: &str, data: &[u8]) -> Result<(), Error> {
        if self.file_name.is_none() && !file_name.is_empty() {
            self.file_name = Some(checked_file_name(file_name)?);
        }
        let max = self.max;
        self.writer.push(data).await.map_err(|e| match e {
            Error::InvalidArgument { .. } => Error::invalid(
                "data",
                format!(
                    "datasets must be at most {max} bytes (the coordinator's --max-dataset-mib); split or sample the file"
                ),
            ),
            other => other,
        })?;
        self.lines.feed(data);
        self.facts.feed(data);
        Ok(())
    }

    /// The finished upload's record, its facts, the blob holding its bytes,
    /// and the guard that removes the blob unless it is linked first.
    pub(crate) async fn finish(self) -> Result<(DatasetInfo, DatasetFacts, Uuid, Unlinked), Error> {
        if self.writer.received() == 0 {
            return Err(Error::invalid(
                "data",
                "the dataset is empty; upload a JSON Lines file with at least one example",
            ));
        }
        let (written, unlinked) = self.writer.finish().await?;
        let info = DatasetInfo {
            reference: DatasetRef::from_sha256(written.sha256),
            file_name: self.file_name.unwrap_or_else(|| "dataset.jsonl".to_string()),
            size: written.size,
            lines: self.lines.finish(),
        };
        Ok((info, self.facts.finish(), self.blob, unlinked))
    }
}

fn checked_file_name(file_name: &str) -> Result<String, Error> {
    ptune_core::bounds::line("file_name", file_name, 255)?;
    if file_name.contains('/') {
        return Err(Error::invalid("file_name", "must be a file name, without '/'"));
    }
    Ok(file_name.to_string())
}

/// Counts lines with something other than whitespace on them.
#[derive(Default)]
struct LineCounter {
    lines: u64,
    current_has_content: bool,
}

impl LineCounter {
    fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if b == b'\n' {
                self.lines += u64::from(self.current_has_content);
                self.current_has_content = false;
            } else if !b.is_ascii_whitespace() {
                self.current_has_content = true;
            }
        }
    }

    fn finish(self) -> u64 {
        self.lines + u64::from(self.current_has_content)
    }
}

/// Checks, line by line, that every example of a dataset carries a declared
/// label. Lines that are not JSON objects are left for the worker, which
/// fails the job with their line number.
pub struct LabelCheck<'a> {
    spec: &'a JobSpec,
    file_name: &'a str,
    line_no: u64,
    partial: Vec<u8>,
}

impl<'a> LabelCheck<'a> {
    pub fn new(spec: &'a JobSpec, file_name: &'a str) -> Self {
        Self { spec, file_name, line_no: 0, partial: Vec::new() }
    }

    /// Checks the complete lines of the next window of the file.
    pub fn feed(&mut self, window: &[u8]) -> Result<(), SpecError> {
        let mut rest = window;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let line = if self.partial.is_empty() {
                &rest[..end]
            } else {
                self.partial.extend_from_slice(&rest[..end]);
                &self.partial[..]
            };
            self.line_no += 1;
            let result = check_line(self.spec, self.file_name, self.line_no, line);
            self.partial.clear();
            result?;
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
        Ok(())
    }

    /// Checks the last line when the file does not end with a newline.
    pub fn finish(mut self) -> Result<(), SpecError> {
        if self.partial.is_empty() {
            return Ok(());
        }
        self.line_no += 1;
        check_line(self.spec, self.file_name, self.line_no, &self.partial)
    }
}

fn check_line(spec: &JobSpec, file_name: &str, line_no: u64, line: &[u8]) -> Result<(), SpecError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let Ok(serde_json::Value::Object(example)) = serde_json::from_slice::<serde_json::Value>(line) else {
        return Ok(());
    };
    let field = &spec.data.label_field;
    let Some(value) = example.get(field) else {
        return Err(SpecError::new(
            "data.label_field",
            format!("line {line_no} of {file_name} has no {field:?} field; set data.label_field to the field holding the label"),
        ));
    };
    if spec.label_index(value).is_none() {
        let shown = label_text(value).unwrap_or_else(|| value.to_string());
        return Err(SpecError::new(
            "data.labels",
            format!(
                "label {shown:?} on line {line_no} of {file_name} is not one of the declared labels {:?}",
                spec.data.labels
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A classification spec declaring labels 0 and 1.
    pub(crate) fn spec() -> JobSpec {
        JobSpec::from_toml(
            r#"
            name = "t"
            base_model = "m"
            task = "sequence_classification"
            method = "prompt_tuning"
            [data]
            train = "a"
            eval = "b"
            labels = [0, 1]
            [training]
            learning_rate = 0.1
        "#,
        )
        .unwrap()
    }

    #[test]
    fn a_label_outside_the_declared_ones_is_reported_with_its_line_even_across_windows() {
        let spec = spec();
        let data = b"{\"text\": \"a\", \"label\": 0}\nnot json\n\n{\"text\": \"b\", \"label\": 1}\n{\"text\": \"c\", \"label\": 2}\n";
        let mut check = LabelCheck::new(&spec, "train.jsonl");
        let err = data.chunks(7).try_for_each(|w| check.feed(w)).unwrap_err();
        assert_eq!(err.field, "data.labels");
        assert_eq!(err.message, r#"label "2" on line 5 of train.jsonl is not one of the declared labels ["0", "1"]"#);
    }

    #[test]
    fn the_last_line_without_a_newline_is_checked_and_lines_are_counted() {
        let spec = spec();
        let mut check = LabelCheck::new(&spec, "eval.jsonl");
        check.feed(b"{\"label\": 1}\n{\"label\": \"x\"}").unwrap();
        assert!(check.finish().unwrap_err().message.contains("label \"x\" on line 2"));

        let mut lines = LineCounter::default();
        lines.feed(b"{\"a\":1}\n\n  \n{\"a\"");
        lines.feed(b":2}");
        assert_eq!(lines.finish(), 2);
    }
}
