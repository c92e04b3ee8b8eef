//! What the classifier's head computes at the token level, as Hugging Face
//! `BertForTokenClassification` computes it: the head (dropout and the
//! linear `classifier`, see `classification/head.rs`) over every real
//! token's last hidden state, the prompt's positions dropped, and
//! cross-entropy over the labelled positions, which are the first sub-token
//! of each word (see `data/ner.rs`).

use tch::{Kind, Reduction, Tensor};

use crate::engine::data::ner::IGNORE_INDEX;

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
pub(super) fn loss_sum(logits: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
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

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

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

    #[test]
    fn drop_prompt_keeps_the_real_positions() {
        let output = Tensor::arange(2 * 5, (Kind::Float, Device::Cpu)).view([1, 5, 2]);
        let real = drop_prompt(&output, 3);
        assert_eq!(real.size(), [1, 2, 2]);
        assert_eq!(Vec::<f32>::try_from(real.reshape([-1])).expect("floats"), [6.0, 7.0, 8.0, 9.0]);
    }
}
