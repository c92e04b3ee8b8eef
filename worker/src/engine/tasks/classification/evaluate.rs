//! Sequence classification's evaluation: the eval loss (mean cross-entropy),
//! accuracy, macro F1 and the predicted label of every example.

use tch::{Device, Kind, Reduction, Tensor};

use crate::engine::data::batch::{length_sorted_batches, Batch};
use crate::engine::data::Example;

/// Eval loss (mean cross-entropy), accuracy and predictions over a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceEvaluation {
    pub loss: f64,
    pub accuracy: f64,
    /// Predicted label index of each example, in dataset order.
    pub predictions: Vec<usize>,
}

/// Loss and accuracy over `examples` in batches of `batch_size`, without
/// gradients. `logits` runs the model in eval mode (no dropout) on a batch
/// and returns its `[batch, labels]` logits.
pub fn evaluate(
    examples: &[Example],
    batch_size: usize,
    pad_id: i64,
    device: Device,
    logits: &mut dyn FnMut(&Batch) -> Tensor,
) -> SequenceEvaluation {
    let mut predictions = vec![0; examples.len()];
    let loss_sum = tch::no_grad(|| {
        let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
        for indices in length_sorted_batches(examples, batch_size) {
            crate::engine::liveness::beat();
            let batch = Batch::collate(examples, &indices, pad_id, device);
            let logits = logits(&batch);
            let loss = logits.cross_entropy_loss::<Tensor>(&batch.labels, None, Reduction::Sum, -100, 0.0);
            loss_sum += loss.to_kind(Kind::Double);
            let predicted = Vec::<i64>::try_from(logits.argmax(-1, false)).expect("label indices");
            for (&i, p) in indices.iter().zip(predicted) {
                predictions[i] = p as usize;
            }
        }
        f64::try_from(loss_sum).expect("a scalar loss")
    });
    let correct = predictions.iter().zip(examples).filter(|(&p, e)| p as i64 == e.label).count();
    let n = examples.len() as f64;
    SequenceEvaluation { loss: loss_sum / n, accuracy: correct as f64 / n, predictions }
}

/// Macro-averaged F1 of predicted class indices against true ones: the mean
/// over every class that occurs in either of per-class F1 (`2 TP / (2 TP +
/// FP + FN)`), as scikit-learn's `f1_score(average="macro")` computes it.
pub fn macro_f1(truth: &[usize], predicted: &[usize]) -> f64 {
    let classes = truth.iter().chain(predicted).copied().max().map_or(0, |m| m + 1);
    let (mut tp, mut fp, mut fn_) = (vec![0usize; classes], vec![0usize; classes], vec![0usize; classes]);
    let mut present = vec![false; classes];
    for (&t, &p) in truth.iter().zip(predicted) {
        present[t] = true;
        present[p] = true;
        if t == p {
            tp[t] += 1;
        } else {
            fp[p] += 1;
            fn_[t] += 1;
        }
    }
    let f1s: Vec<f64> = (0..classes)
        .filter(|&c| present[c])
        .map(|c| {
            let denominator = 2 * tp[c] + fp[c] + fn_[c];
            if denominator == 0 { 0.0 } else { 2.0 * tp[c] as f64 / denominator as f64 }
        })
        .collect();
    if f1s.is_empty() { 0.0 } else { f1s.iter().sum::<f64>() / f1s.len() as f64 }
}

#[cfg(test)]
mod tests {
    use super::macro_f1;

    #[test]
    fn macro_f1_matches_scikit_learn() {
        // sklearn.metrics.f1_score([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1], average="macro") == 0.26666...
        let f1 = macro_f1(&[0, 1, 2, 0, 1, 2], &[0, 2, 1, 0, 0, 1]);
        assert!((f1 - 0.266_666_666_666_666_66).abs() < 1e-12, "{f1}");
        // One class always predicted: the other's F1 is 0.
        assert!((macro_f1(&[0, 1, 1, 1], &[1, 1, 1, 1]) - 0.428_571_428_571_428_5).abs() < 1e-12);
        assert_eq!(macro_f1(&[0, 1], &[0, 1]), 1.0);
    }
}
