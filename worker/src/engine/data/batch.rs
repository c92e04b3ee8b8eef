//! Batching: seeded per-epoch shuffles for training, length-sorted batches
//! for evaluation, and collation with padding to the longest example of the
//! batch (dynamic padding).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Tensor};

use super::Example;

/// A padded batch on the training device.
pub struct Batch {
    /// `[batch, longest]` token ids, `pad_id` after each example's end.
    pub input_ids: Tensor,
    /// `[batch, longest]` 1 at real tokens, 0 at padding.
    pub attention_mask: Tensor,
    /// `[batch]` label indices.
    pub labels: Tensor,
}

impl Batch {
    pub fn collate(examples: &[Example], indices: &[usize], pad_id: i64, device: Device) -> Self {
        let longest = indices.iter().map(|&i| examples[i].ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(indices.len() * longest);
        let mut mask = Vec::with_capacity(indices.len() * longest);
        for &i in indices {
            let example = &examples[i].ids;
            ids.extend_from_slice(example);
            ids.extend(std::iter::repeat_n(pad_id, longest - example.len()));
            mask.extend(std::iter::repeat_n(1i64, example.len()));
            mask.extend(std::iter::repeat_n(0i64, longest - example.len()));
        }
        let shape = [indices.len() as i64, longest as i64];
        let labels: Vec<i64> = indices.iter().map(|&i| examples[i].label).collect();
        Self {
            input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
            labels: Tensor::from_slice(&labels).to_device(device),
        }
    }
}

/// Training batches: each epoch visits every example once in an order drawn
/// from a generator seeded by the job's seed; the last batch of an epoch may
/// be smaller, as with a PyTorch `DataLoader` that keeps it.
pub struct EpochBatches {
    examples: usize,
    batch_size: usize,
    rng: StdRng,
    order: Vec<usize>,
    cursor: usize,
    epoch: u64,
}

impl EpochBatches {
    pub fn new(examples: usize, batch_size: usize, seed: u64) -> Self {
        Self {
            examples,
            batch_size: batch_size.max(1),
            rng: StdRng::seed_from_u64(seed),
            order: Vec::new(),
            cursor: 0,
            epoch: 0,
        }
    }

    /// Indices of the next batch, starting a new epoch when one ends.
    pub fn next_batch(&mut self) -> &[usize] {
        if self.cursor >= self.order.len() {
            self.order = (0..self.examples).collect();
            self.order.shuffle(&mut self.rng);
            self.cursor = 0;
            self.epoch += 1;
        }
        let start = self.cursor;
        self.cursor = (start + self.batch_size).min(self.order.len());
        &self.order[start..self.cursor]
    }

    /// Moves past the first `batches` batches, as if they had been taken:
    /// a resumed run continues with the batch an uninterrupted one would take.
    pub fn skip(&mut self, batches: u64) {
        for _ in 0..batches {
            self.next_batch();
        }
    }

    /// 1-based epoch of the last batch returned.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Evaluation batches: examples sorted by length so that each batch pads
/// little; the order does not change the metrics.
pub fn length_sorted_batches(examples: &[Example], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].ids.len()));
    order.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect()
}

/// Right-padded `[rows, longest]` token ids (`pad_id` after each row's end),
/// attention mask (1 at real tokens) and labels (-100, the loss's ignore
/// index, after each row's end) of rows given as `(ids, labels)` of equal
/// lengths: what token classification and causal LM batches hold.
pub fn pad_labelled_rows(rows: &[(&[i64], &[i64])], pad_id: i64, device: Device) -> (Tensor, Tensor, Tensor) {
    const IGNORE_INDEX: i64 = -100;
    let longest = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let size = rows.len() * longest;
    let (mut ids, mut mask, mut labels) = (Vec::with_capacity(size), Vec::with_capacity(size), Vec::with_capacity(size));
    for (row_ids, row_labels) in rows {
        let padding = longest - row_ids.len();
        ids.extend_from_slice(row_ids);
        ids.extend(std::iter::repeat_n(pad_id, padding));
        mask.extend(std::iter::repeat_n(1i64, row_ids.len()));
        mask.extend(std::iter::repeat_n(0i64, padding));
        labels.extend_from_slice(row_labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, padding));
    }
    let shape = [rows.len() as i64, longest as i64];
    let tensor = |values: &[i64]| Tensor::from_slice(values).view(shape).to_device(device);
    (tensor(&ids), tensor(&mask), tensor(&labels))
}
