//! Token classification end to end on real data: WNUT-17 sentences read,
//! tokenized word by word with all-MiniLM-L6-v2's tokenizer and labelled at
//! each word's first sub-token, a per-token classifier head trained on the
//! frozen encoder, and entity-level scores on dev sentences.

mod support;

use std::path::PathBuf;

use ptune_worker::engine::ner::{encode_sentences, read_tagged_sentences, NerBatch, TagSet, TaggedFields};
use ptune_worker::engine::token_classification::{self, EntityScores};
use ptune_worker::engine::{AdamW, ClassificationHead, FrozenEncoder, NoHooks};
use support::paths::{minilm_dir, shared_data};
use tch::{nn, Device, Tensor};

const TRAIN_SENTENCES: usize = 200;
const DEV_SENTENCES: u64 = 100;
const MAX_SEQ_LEN: usize = 48;
const BATCH_SIZE: usize = 8;
const STEPS: usize = 50;
const HEAD_LEARNING_RATE: f64 = 1e-2;
const SEED: i64 = 17;

fn ner_data(file: &str) -> PathBuf {
    shared_data("ner").join(file)
}

/// `[batch, seq, tags]` logits of the head on the frozen encoder's last
/// hidden state.
fn logits(base: &FrozenEncoder, head: &ClassificationHead, batch: &NerBatch, train: bool) -> Tensor {
    let embeds = base.encoder.embed_ids(&batch.input_ids);
    let hidden = base.encoder.forward(&embeds, &batch.attention_mask, None, &NoHooks, train);
    head.forward(&hidden, train)
}

#[test]
fn a_head_on_frozen_minilm_learns_wnut_tags_and_is_scored_by_entity() {
    let device = Device::Cpu;
    let dir = minilm_dir();
    let base = FrozenEncoder::load(&dir, device).expect("MiniLM loads");
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer loads");
    let pad_id = base.tokenizer.pad_id();

    let fields = TaggedFields::default();
    let all_train = read_tagged_sentences(&ner_data("train.jsonl"), "train.jsonl", &fields, 0).expect("train reads");
    let tags = TagSet::derive(&all_train);
    assert_eq!(tags.len(), 13, "O and B-/I- for six entity types: {:?}", tags.tags());
    assert_eq!(tags.name(0), "O");
    let dev_sentences =
        read_tagged_sentences(&ner_data("dev.jsonl"), "dev.jsonl", &fields, DEV_SENTENCES).expect("dev reads");
    let train = encode_sentences(&tokenizer, &all_train[..TRAIN_SENTENCES], &tags, "train.jsonl", MAX_SEQ_LEN)
        .expect("train encodes");
    let dev = encode_sentences(&tokenizer, &dev_sentences, &tags, "dev.jsonl", MAX_SEQ_LEN).expect("dev encodes");

    tch::manual_seed(SEED);
    let adapter = nn::VarStore::new(device);
    let config = &base.config;
    let dropout = config.classifier_dropout.unwrap_or(config.hidden_dropout_prob);
    let head = ClassificationHead::new(
        &adapter.root(),
        config.hidden_size,
        tags.len() as i64,
        config.initializer_range,
        dropout,
    );
    let mut optimizer = AdamW::default();
    optimizer.add_group(vec![head.weight().shallow_clone()], HEAD_LEARNING_RATE, 0.01);
    optimizer.add_group(vec![head.bias().shallow_clone()], HEAD_LEARNING_RATE, 0.0);

    let evaluate = |head: &ClassificationHead| {
        token_classification::evaluate(&dev, &tags, 64, pad_id, device, &mut |batch| logits(&base, head, batch, false))
    };
    let mut losses = Vec::with_capacity(STEPS);
    let order: Vec<usize> = (0..train.len()).collect();
    for step in 0..STEPS {
        let start = step * BATCH_SIZE % train.len();
        let batch = NerBatch::collate(&train, &order[start..start + BATCH_SIZE], pad_id, device);
        optimizer.zero_grad();
        let loss = token_classification::token_loss(&logits(&base, &head, &batch, true), &batch.labels);
        loss.backward();
        optimizer.step(1.0);
        losses.push(f64::try_from(&loss).expect("a scalar loss"));
    }
    let after = evaluate(&head);
    let dev_tags: Vec<&str> = dev_sentences.iter().flat_map(|s| s.tags.iter().map(String::as_str)).collect();
    let outside = dev_tags.iter().filter(|&&t| t == "O").count() as f64 / dev_tags.len() as f64;
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[STEPS - 5..]));
    let scores = &after.scores;
    eprintln!(
        "train loss {first:.3} -> {last:.3}; dev loss {:.3}, accuracy {:.3} (all O: {outside:.3}), entities {:?}, f1 {:.3}",
        after.loss,
        scores.accuracy,
        scores.overall,
        scores.f1()
    );
    // An untrained head scores about ln(13) = 2.56 on 13 tags.
    assert!(first > 1.5, "an untrained head starts near ln(13): {losses:?}");
    assert!(last < 0.5 * first, "the training loss goes down: {losses:?}");
    assert!(after.loss < 1.0, "dev loss {}", after.loss);
    assert!(scores.accuracy > 0.8, "accuracy {} (all O: {outside})", scores.accuracy);

    // The scores equal seqeval's rules applied to the predictions mapped back
    // onto the words of the file: every word that kept a sub-token in
    // MAX_SEQ_LEN tokens is predicted, and only those are scored.
    let (mut truth, mut predicted) = (Vec::new(), Vec::new());
    for (sentence, words) in dev_sentences.iter().zip(&after.predictions) {
        assert_eq!(words.len(), sentence.words.len());
        let kept: Vec<(String, String)> = sentence
            .tags
            .iter()
            .zip(words)
            .filter_map(|(tag, p)| p.map(|p| (tag.clone(), tags.name(p).to_string())))
            .collect();
        truth.push(kept.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>());
        predicted.push(kept.into_iter().map(|(_, p)| p).collect::<Vec<_>>());
    }
    assert_eq!(&EntityScores::compute(&truth, &predicted), scores);
    assert!(scores.overall.truth > 20, "dev sentences hold entities: {:?}", scores.overall);
}
