//! Token classification's evaluation: the eval loss over every labelled
//! position, each word's predicted tag, and the entity scores and tag
//! accuracy of the predictions (see `entities.rs`).

use tch::{Device, Kind, Tensor};

use super::entities::EntityScores;
use super::head::loss_sum;
use crate::engine::data::ner::{length_sorted_batches, NerBatch, NerExample, TagSet};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::data::ner::IGNORE_INDEX;
    use crate::engine::tasks::token_classification::entities::EntityCounts;
    use crate::engine::tasks::token_classification::head::token_loss;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
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
}
