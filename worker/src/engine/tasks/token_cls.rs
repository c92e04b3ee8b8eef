//! Token classification (named-entity recognition) as Hugging Face
//! `BertForTokenClassification` computes it: dropout over every token's last
//! hidden state, then the linear `classifier`; cross-entropy over the labelled
//! positions, which are the first sub-token of each word (see `data/ner.rs`).
//!
//! Evaluation scores entities as seqeval's default mode does, which follows
//! the CoNLL `conlleval` script
//! (<https://www.clips.uantwerpen.be/conll2000/chunking/conlleval.txt>): an
//! entity counts as found only with its exact span and type; an `I-X` that
//! follows `O` or a tag of another type starts a new entity rather than being
//! dropped.
//!
//! Everything here takes the encoder's sequence output `[batch, seq, hidden]`
//! (or the logits) rather than running the encoder, so any PEFT method's
//! forward can feed it. With prompt tuning or P-tuning the output carries the
//! prompt first; [`drop_prompt`] removes it.

use std::collections::{BTreeMap, BTreeSet};

use tch::nn;
use tch::{Device, Kind, Reduction, Tensor};

use super::classifier::ClassificationHead;
use crate::engine::data::ner::{length_sorted_batches, NerBatch, NerExample, TagSet, IGNORE_INDEX};

/// The trainable per-token classifier, `classifier.weight` `[tags, hidden]`
/// and `classifier.bias` `[tags]`, after dropout (`classifier_dropout`, or
/// `hidden_dropout_prob` when the config has none, as in transformers).
pub struct TokenClassificationHead {
    head: ClassificationHead,
}

impl TokenClassificationHead {
    /// Module name of the head in the HF model, and its key prefix (under
    /// `base_model.`) in a PEFT export.
    pub const MODULE: &'static str = ClassificationHead::MODULE;

    /// Weights N(0, `init_std`) and zero bias, as HF `_init_weights` does with
    /// `initializer_range`.
    pub fn new(p: &nn::Path, hidden: i64, num_tags: i64, init_std: f64, dropout: f64) -> Self {
        Self { head: ClassificationHead::new(p, hidden, num_tags, init_std, dropout) }
    }

    pub fn weight(&self) -> &Tensor {
        self.head.weight()
    }

    pub fn bias(&self) -> &Tensor {
        self.head.bias()
    }

    /// `[batch, seq, hidden]` sequence output -> `[batch, seq, tags]` logits.
    pub fn forward(&self, sequence_output: &Tensor, train: bool) -> Tensor {
        self.head.forward(sequence_output, train)
    }
}

/// The sequence output at the real tokens: drops the first
/// `num_virtual_tokens` positions, where an input-level prompt (prompt
/// tuning, P-tuning) sits, so that `[batch, nvt + seq, n]` becomes
/// `[batch, seq, n]` and lines up with the labels. Prefix tuning and P-tuning
/// v2 add no positions (their prompt lives in the keys and values): pass 0.
///
/// PEFT's `PeftModelForTokenClassification` returns logits over all `nvt +
/// seq` positions and leaves it to the caller to pad the labels with -100
/// over the prompt; since the classifier acts on each position alone,
/// dropping the prompt positions gives the same logits at real tokens and
/// the same loss.
pub fn drop_prompt(sequence_output: &Tensor, num_virtual_tokens: i64) -> Tensor {
    let total = sequence_output.size()[1];
    sequence_output.narrow(1, num_virtual_tokens, total - num_virtual_tokens)
}

/// Mean cross-entropy over the labelled positions of `[batch, seq, tags]`
/// logits and `[batch, seq]` labels ([`IGNORE_INDEX`] elsewhere), as
/// `CrossEntropyLoss()` in `BertForTokenClassification`. A batch without a
/// labelled position has loss 0 (where PyTorch's mean would be NaN).
pub fn token_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let (sum, count) = loss_sum(logits, labels);
    sum / count.clamp_min(1.0)
}

/// Summed cross-entropy and the number of labelled positions.
fn loss_sum(logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let tags = *logits.size().last().expect("logits are [batch, seq, tags]");
    let sum = logits.reshape([-1, tags]).cross_entropy_loss::<Tensor>(
        &labels.reshape([-1]),
        None,
        Reduction::Sum,
        IGNORE_INDEX,
        0.0,
    );
    let count = labels.ne(IGNORE_INDEX).sum(Kind::Float);
    (sum, count)
}

/// Eval loss, tag accuracy, entity scores and predictions over a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvaluation {
    /// Mean cross-entropy over every labelled position of the dataset (the
    /// same whatever the batching).
    pub loss: f64,
    /// Entity precision, recall and F1, and the fraction of labelled words
    /// tagged right (seqeval's `accuracy_score`, which HF reports as
    /// `overall_accuracy`).
    pub scores: EntityScores,
    /// Per example, per word: the predicted tag index, or `None` for a word
    /// without a labelled position (cut by truncation, or tokenized to
    /// nothing). Such words are left out of the scores on both sides, as in
    /// the HF recipe, which scores only positions whose label is not -100.
    pub predictions: Vec<Vec<Option<usize>>>,
}

/// Evaluates `examples` in batches of `batch_size`, without gradients.
/// `logits` runs the model in eval mode (no dropout) on a batch and returns
/// `[batch, seq, tags]` logits lined up with the batch's `input_ids` (prompt
/// positions dropped).
pub fn evaluate(
    examples: &[NerExample],
    tags: &TagSet,
    batch_size: usize,
    pad_id: i64,
    device: Device,
    logits: &mut dyn FnMut(&NerBatch) -> Tensor,
) -> TokenEvaluation {
    let mut predictions: Vec<Vec<Option<usize>>> = examples.iter().map(|e| vec![None; e.num_words]).collect();
    let (total_loss, labelled) = tch::no_grad(|| {
        let mut total_loss = Tensor::zeros([], (Kind::Double, device));
        let mut labelled = Tensor::zeros([], (Kind::Double, device));
        for indices in length_sorted_batches(examples, batch_size) {
            crate::engine::liveness::beat();
            let batch = NerBatch::collate(examples, &indices, pad_id, device);
            let batch_logits = logits(&batch);
            let (sum, count) = loss_sum(&batch_logits, &batch.labels);
            total_loss += sum.to_kind(Kind::Double);
            labelled += count.to_kind(Kind::Double);
            let seq = batch_logits.size()[1] as usize;
            let predicted = Vec::<i64>::try_from(batch_logits.argmax(-1, false).reshape([-1])).expect("tag indices");
            for (row, &i) in indices.iter().enumerate() {
                for (position, word) in examples[i].labelled() {
                    predictions[i][word] = Some(predicted[row * seq + position] as usize);
                }
            }
        }
        let scalar = |t: Tensor| f64::try_from(t).expect("a scalar");
        (scalar(total_loss), scalar(labelled))
    });

    let mut truth = Vec::with_capacity(examples.len());
    let mut predicted = Vec::with_capacity(examples.len());
    for (example, words) in examples.iter().zip(&predictions) {
        let (t, p): (Vec<&str>, Vec<&str>) = example
            .labelled()
            .map(|(position, word)| {
                let label = usize::try_from(example.labels[position]).expect("a labelled position has a tag");
                (tags.name(label), tags.name(words[word].expect("every labelled word is predicted")))
            })
            .unzip();
        truth.push(t);
        predicted.push(p);
    }
    TokenEvaluation {
        loss: if labelled > 0.0 { total_loss / labelled } else { 0.0 },
        scores: EntityScores::compute(&truth, &predicted),
        predictions,
    }
}

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

    /// The loss is the mean negative log-softmax at labelled positions only.
    #[test]
    fn loss_ignores_unlabelled_positions() {
        let values: Vec<f32> = (0..2 * 3 * 4).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let logits = Tensor::from_slice(&values).view([2, 3, 4]);
        let labels = Tensor::from_slice(&[2i64, IGNORE_INDEX, 0, IGNORE_INDEX, 3, IGNORE_INDEX]).view([2, 3]);
        let expected = [(0usize, 2usize), (2, 0), (4, 3)]
            .iter()
            .map(|&(row, tag)| {
                let row = &values[row * 4..row * 4 + 4];
                let log_sum = row.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
                log_sum - f64::from(row[tag])
            })
            .sum::<f64>()
            / 3.0;
        let loss = f64::try_from(token_loss(&logits, &labels)).expect("a scalar");
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
        let none = Tensor::full([2, 3], IGNORE_INDEX, (Kind::Int64, Device::Cpu));
        assert_eq!(f64::try_from(token_loss(&logits, &none)).expect("a scalar"), 0.0);
    }

    /// Predictions map back to words through the first sub-token; words cut
    /// by truncation stay unpredicted and out of the scores.
    #[test]
    fn evaluation_maps_predictions_to_words() {
        let tags = TagSet::new(["O", "B-person", "I-person", "B-location"].map(String::from).to_vec()).expect("tags");
        // [CLS] w0 w0' w1 w2 [SEP]: four words, the fourth cut by truncation.
        let first = NerExample {
            ids: vec![101, 10, 11, 14, 13, 102],
            labels: vec![IGNORE_INDEX, 1, IGNORE_INDEX, 2, 0, IGNORE_INDEX],
            word_index: vec![-1, 0, -1, 1, 2, -1],
            num_words: 4,
        };
        // [CLS] w0 w1 [SEP]
        let second = NerExample {
            ids: vec![101, 23, 20, 102],
            labels: vec![IGNORE_INDEX, 3, 0, IGNORE_INDEX],
            word_index: vec![-1, 0, 1, -1],
            num_words: 2,
        };
        let examples = [first, second];
        // Each token predicts tag `id % 4`.
        let model = |batch: &NerBatch| batch.input_ids.remainder(4).one_hot(4).to_kind(Kind::Float) * 5.0;
        let evaluation = evaluate(&examples, &tags, 1, 0, Device::Cpu, &mut |batch| model(batch));
        assert_eq!(evaluation.predictions, [vec![Some(2), Some(2), Some(1), None], vec![Some(3), Some(0)]]);
        // Truth: B-person I-person O | B-location O. Predicted: I-person
        // I-person B-person | B-location O, whose leading I- starts the
        // person entity at words 0..=1, so two of three predicted entities
        // are exact and three of five tags right.
        let scores = &evaluation.scores;
        assert_eq!(scores.overall, EntityCounts { truth: 2, predicted: 3, correct: 2 });
        assert!(close(scores.accuracy, 3.0 / 5.0), "accuracy {}", scores.accuracy);
        let all = NerBatch::collate(&examples, &[0, 1], 0, Device::Cpu);
        let expected_loss = f64::try_from(token_loss(&model(&all), &all.labels)).expect("a scalar");
        assert!((evaluation.loss - expected_loss).abs() < 1e-6, "{} vs {expected_loss}", evaluation.loss);
    }

    #[test]
    fn drop_prompt_keeps_the_real_positions() {
        let output = Tensor::arange(2 * 5, (Kind::Float, Device::Cpu)).view([1, 5, 2]);
        let real = drop_prompt(&output, 3);
        assert_eq!(real.size(), [1, 2, 2]);
        assert_eq!(Vec::<f32>::try_from(real.reshape([-1])).expect("floats"), [6.0, 7.0, 8.0, 9.0]);
    }
}
