//! Entity-level scores of predicted tags, as seqeval's default mode computes
//! them, which follows the CoNLL `conlleval` script
//! (<https://www.clips.uantwerpen.be/conll2000/chunking/conlleval.txt>): an
//! entity counts as found only with its exact span and type; an `I-X` that
//! follows `O` or a tag of another type starts a new entity rather than being
//! dropped.

use std::collections::{BTreeMap, BTreeSet};

/// An entity: its type and the first and last word of its span (inclusive,
/// as seqeval's `get_entities` reports them).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entity {
    pub kind: String,
    pub start: usize,
    pub end: usize,
}

/// The entities of one sentence's tags, by seqeval's default (conlleval)
/// rules: `B-X` and `S-X` always start an entity; `I-X` or `E-X` start one
/// after `O`, after an entity's end, or after a tag of another type; a change
/// of type always ends the running entity. Tags are read as seqeval reads
/// them: the first character is the chunk tag, the text after the first
/// dash that follows it the type (`_` when empty).
pub fn entities<S: AsRef<str>>(tags: &[S]) -> Vec<Entity> {
    let mut found = Vec::new();
    let (mut prev_tag, mut prev_kind) = ("O", "");
    let mut begin = 0;
    // A trailing O closes an entity that runs to the end of the sentence.
    for (i, tag) in tags.iter().map(AsRef::<str>::as_ref).chain(std::iter::once("O")).enumerate() {
        let (tag, kind) = chunk_parts(tag);
        if ends_chunk(prev_tag, tag, prev_kind, kind) {
            found.push(Entity { kind: prev_kind.to_string(), start: begin, end: i - 1 });
        }
        if starts_chunk(prev_tag, tag, prev_kind, kind) {
            begin = i;
        }
        (prev_tag, prev_kind) = (tag, kind);
    }
    found
}

/// `("B", "person")` for `B-person`, `("O", "_")` for `O`.
fn chunk_parts(tag: &str) -> (&str, &str) {
    let split = tag.chars().next().map_or(0, char::len_utf8);
    let (prefix, rest) = tag.split_at(split);
    let kind = rest.split_once('-').map_or(rest, |(_, kind)| kind);
    (prefix, if kind.is_empty() { "_" } else { kind })
}

/// seqeval's `end_of_chunk`: whether the chunk before this tag ended.
fn ends_chunk(prev_tag: &str, tag: &str, prev_kind: &str, kind: &str) -> bool {
    matches!(prev_tag, "E" | "S")
        || (matches!(prev_tag, "B" | "I") && matches!(tag, "B" | "S" | "O"))
        || (prev_tag != "O" && prev_tag != "." && prev_kind != kind)
}

/// seqeval's `start_of_chunk`: whether a chunk starts at this tag.
fn starts_chunk(prev_tag: &str, tag: &str, prev_kind: &str, kind: &str) -> bool {
    matches!(tag, "B" | "S")
        || (matches!(prev_tag, "E" | "S" | "O") && matches!(tag, "E" | "I"))
        || (tag != "O" && tag != "." && prev_kind != kind)
}

/// Counts of entities in the truth and the predictions, and of predicted
/// entities that match a true one exactly (span and type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntityCounts {
    pub truth: usize,
    pub predicted: usize,
    pub correct: usize,
}

impl EntityCounts {
    /// Correct over predicted; 0 without predictions (seqeval's
    /// `zero_division` default).
    pub fn precision(&self) -> f64 {
        ratio(self.correct, self.predicted)
    }

    /// Correct over true entities; 0 without true entities.
    pub fn recall(&self) -> f64 {
        ratio(self.correct, self.truth)
    }

    /// Harmonic mean of precision and recall; 0 when both are 0.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

fn ratio(numerator: usize, denominator: usize) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

/// Entity-level scores over a dataset: micro-averaged over every entity
/// (seqeval's `precision_score`, `recall_score`, `f1_score`), per type (its
/// `classification_report`), and tag accuracy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EntityScores {
    pub overall: EntityCounts,
    /// Per entity type found in the truth or the predictions.
    pub by_type: BTreeMap<String, EntityCounts>,
    /// Fraction of tags predicted exactly, over every word (0 without words).
    pub accuracy: f64,
}

impl EntityScores {
    /// Scores predicted tag sequences against true ones, sentence by
    /// sentence. Each predicted sentence must have its true sentence's length.
    pub fn compute<S: AsRef<str>>(truth: &[Vec<S>], predicted: &[Vec<S>]) -> Self {
        assert_eq!(truth.len(), predicted.len(), "one predicted sentence per true sentence");
        let mut scores = Self::default();
        let (mut words, mut right) = (0usize, 0usize);
        for (sentence, (t, p)) in truth.iter().zip(predicted).enumerate() {
            assert_eq!(t.len(), p.len(), "sentence {sentence}: one predicted tag per word");
            words += t.len();
            right += t.iter().zip(p).filter(|(a, b)| AsRef::<str>::as_ref(*a) == AsRef::<str>::as_ref(*b)).count();
            let true_entities: BTreeSet<Entity> = entities(t).into_iter().collect();
            for entity in &true_entities {
                scores.by_type.entry(entity.kind.clone()).or_default().truth += 1;
            }
            for entity in entities(p).into_iter().collect::<BTreeSet<_>>() {
                let counts = scores.by_type.entry(entity.kind.clone()).or_default();
                counts.predicted += 1;
                counts.correct += usize::from(true_entities.contains(&entity));
            }
        }
        for counts in scores.by_type.values() {
            scores.overall.truth += counts.truth;
            scores.overall.predicted += counts.predicted;
            scores.overall.correct += counts.correct;
        }
        scores.accuracy = ratio(right, words);
        scores
    }

    pub fn precision(&self) -> f64 {
        self.overall.precision()
    }

    pub fn recall(&self) -> f64 {
        self.overall.recall()
    }

    pub fn f1(&self) -> f64 {
        self.overall.f1()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::Value;

    use super::*;

    fn fixture(name: &str) -> Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_str(&text).expect("fixture is json")
    }

    fn sentences(value: &Value) -> Vec<Vec<String>> {
        value
            .as_array()
            .expect("sentences")
            .iter()
            .map(|s| s.as_array().expect("tags").iter().map(|t| t.as_str().expect("a tag").to_string()).collect())
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Entities, micro precision/recall/F1, accuracy and per-type scores equal
    /// seqeval's on hand-made sequences covering the conlleval edge cases.
    #[test]
    fn entity_scores_match_seqeval() {
        let fixture = fixture("ner_scores.json");
        let cases = fixture["cases"].as_object().expect("cases");
        assert!(cases.len() >= 10);
        for (name, case) in cases {
            let truth = sentences(&case["truth"]);
            let predicted = sentences(&case["predicted"]);
            for (side, tags, expected) in
                [("truth", &truth, &case["truth_entities"]), ("predicted", &predicted, &case["predicted_entities"])]
            {
                for (sentence, expected) in tags.iter().zip(expected.as_array().expect("entities")) {
                    let expected: Vec<Entity> = expected
                        .as_array()
                        .expect("entities")
                        .iter()
                        .map(|e| Entity {
                            kind: e[0].as_str().expect("type").to_string(),
                            start: e[1].as_u64().expect("start") as usize,
                            end: e[2].as_u64().expect("end") as usize,
                        })
                        .collect();
                    assert_eq!(entities(sentence), expected, "{name}: {side} entities of {sentence:?}");
                }
            }
            let scores = EntityScores::compute(&truth, &predicted);
            let number = |key: &str| case[key].as_f64().expect("a number");
            assert!(close(scores.precision(), number("precision")), "{name}: precision {}", scores.precision());
            assert!(close(scores.recall(), number("recall")), "{name}: recall {}", scores.recall());
            assert!(close(scores.f1(), number("f1")), "{name}: f1 {}", scores.f1());
            assert!(close(scores.accuracy, number("accuracy")), "{name}: accuracy {}", scores.accuracy);
            let by_type = case["by_type"].as_object().expect("by_type");
            let kinds: Vec<&String> = scores.by_type.keys().collect();
            assert_eq!(kinds, by_type.keys().collect::<Vec<_>>(), "{name}: entity types");
            for (kind, expected) in by_type {
                let counts = scores.by_type[kind];
                assert!(close(counts.precision(), expected["precision"].as_f64().unwrap()), "{name}: {kind} precision");
                assert!(close(counts.recall(), expected["recall"].as_f64().unwrap()), "{name}: {kind} recall");
                assert!(close(counts.f1(), expected["f1-score"].as_f64().unwrap()), "{name}: {kind} f1");
                assert_eq!(counts.truth as f64, expected["support"].as_f64().unwrap(), "{name}: {kind} support");
            }
        }
    }
}
