//! The engine against the reference libraries: all-MiniLM-L6-v2 hidden
//! states, pooler output and tokenizer ids, PEFT prompt-tuning logits and
//! gradients, and torch AdamW steps, recorded by
//! `scripts/reference/minilm_hidden_states.py` into
//! `tests/fixtures/minilm_hidden_states.json`; and a tiny random BERT
//! classifier checkpoint written by `scripts/reference/tiny_bert.py`.

mod support;


use ptune_core::Pooling;
use ptune_worker::engine::registry::inspect_any;
use ptune_worker::engine::{
    prepend, AdamW, Adapter, ClassificationHead, Classifier, FrozenEncoder, LinearSchedule, Level, NoHooks,
    PromptInit, PromptTuning, Trainable,
};
use serde_json::Value;
use support::paths::{fixtures, minilm_dir};
use tch::{nn, Device, Kind, Tensor};

/// Largest absolute difference allowed against transformers' float32 outputs.
const TOLERANCE: f64 = 1e-4;

fn fixture(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is json")
}

fn floats(value: &Value) -> Vec<f32> {
    match value {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("a number") as f32],
        other => panic!("expected numbers, got {other}"),
    }
}

fn ints(value: &Value) -> Vec<i64> {
    match value {
        Value::Array(items) => items.iter().flat_map(ints).collect(),
        Value::Number(n) => vec![n.as_i64().expect("an integer")],
        other => panic!("expected integers, got {other}"),
    }
}

/// `[rows, cols]` tensor of a nested json array.
fn matrix(value: &Value) -> Tensor {
    let rows = value.as_array().expect("an array").len() as i64;
    Tensor::from_slice(&floats(value)).view([rows, -1])
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    f64::try_from((a - b).abs().max()).expect("a scalar")
}

/// `[batch, seq]` padded ids and mask of the fixture sentences.
fn fixture_batch(fixture: &Value) -> (Tensor, Tensor) {
    let batch = fixture["input_ids"].as_array().expect("input_ids").len() as i64;
    let ids = Tensor::from_slice(&ints(&fixture["input_ids"])).view([batch, -1]);
    let mask = Tensor::from_slice(&ints(&fixture["attention_mask"])).view([batch, -1]);
    (ids, mask)
}

/// Checks tokenization, the last hidden state at real tokens, the position-0
/// shortcut and the pooler against a transformers fixture.
fn assert_encoder_matches(base: &FrozenEncoder, fixture: &Value, tolerance: f64) {
    let sentences: Vec<&str> =
        fixture["sentences"].as_array().expect("sentences").iter().map(|s| s.as_str().expect("text")).collect();
    let ours = base.tokenizer.encode_batch(sentences, 512).expect("tokenizes");
    let (ids, mask) = fixture_batch(fixture);
    for (i, ours) in ours.iter().enumerate() {
        let length = i64::try_from(mask.get(i as i64).sum(Kind::Int64)).expect("a length");
        let theirs = Vec::<i64>::try_from(ids.get(i as i64).narrow(0, 0, length)).expect("ids");
        assert_eq!(ours, &theirs, "sentence {i}: token ids differ from the Hugging Face tokenizer");
    }

    let encoder = &base.encoder;
    let (hidden, first) = tch::no_grad(|| {
        let embeds = encoder.embed_ids(&ids);
        (
            encoder.forward(&embeds, &mask, None, &NoHooks, false),
            encoder.forward_first(&embeds, &mask, None, &NoHooks, false),
        )
    });
    for (i, expected) in fixture["last_hidden_state"].as_array().expect("last_hidden_state").iter().enumerate() {
        let expected = matrix(expected);
        let ours = hidden.get(i as i64).narrow(0, 0, expected.size()[0]);
        let diff = max_abs_diff(&ours, &expected);
        assert!(diff < tolerance, "sentence {i}: last hidden state differs by {diff}");
    }
    let shortcut = max_abs_diff(&first, &hidden.select(1, 0));
    assert!(shortcut < 1e-5, "the position-0 shortcut differs from the full forward by {shortcut}");
    let pooled = encoder.pool(&first).expect("the checkpoint has a pooler");
    let diff = max_abs_diff(&pooled, &matrix(&fixture["pooler_output"]));
    assert!(diff < tolerance, "pooler output differs by {diff}");
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs all-MiniLM-L6-v2; scripts/test.sh runs it")]
fn minilm_tokens_hidden_states_and_pooler_match_transformers() {
    let fixture = fixture("minilm_hidden_states.json");
    let dir = minilm_dir();
    let base = FrozenEncoder::load(&dir, Device::Cpu).expect("MiniLM loads");
    assert_encoder_matches(&base, &fixture, TOLERANCE);

    let truncation = &fixture["truncation"];
    let text = truncation["text"].as_str().expect("text");
    let max_length = truncation["max_length"].as_u64().expect("max_length") as usize;
    let ours = base.tokenizer.encode_batch(vec![text], max_length).expect("tokenizes");
    assert_eq!(ours[0], ints(&truncation["input_ids"]), "truncation differs from the Hugging Face tokenizer");

    let info = inspect_any(&dir).expect("MiniLM inspects");
    let expected = &fixture["model_info"];
    assert_eq!((info.model_type.as_str(), info.max_positions, info.hidden_size), ("bert", 512, 384));
    assert_eq!((info.num_layers, info.num_attention_heads), (6, 12));
    assert_eq!(info.parameters, expected["parameters"].as_u64().expect("parameters"));
    assert_eq!(info.sha256, expected["sha256"].as_str().expect("sha256"));
}

/// A `BertForSequenceClassification` checkpoint (weights under `bert.`, a
/// classifier to ignore, tanh GELU, a tokenizer with fixed padding) of other
/// dimensions than MiniLM's.
#[test]
fn a_tiny_bert_classifier_checkpoint_loads_and_matches_transformers() {
    let fixture = fixture("tiny_bert_outputs.json");
    let dir = fixtures().join("tiny-bert");
    let base = FrozenEncoder::load(&dir, Device::Cpu).expect("the tiny checkpoint loads");
    assert_encoder_matches(&base, &fixture, 1e-5);

    let info = inspect_any(&dir).expect("the tiny checkpoint inspects");
    assert_eq!((info.hidden_size, info.num_layers, info.num_attention_heads, info.max_positions), (32, 2, 4, 40));
    assert_eq!(info.parameters, fixture["parameters"].as_u64().expect("parameters"));
    assert_eq!(info.sha256, fixture["sha256"].as_str().expect("sha256"));
}

/// The fixture's prompt-tuned classifier: PEFT's random prompt and head,
/// and the prompt table.
fn fixture_model(base: &FrozenEncoder, reference: &Value) -> (nn::VarStore, Classifier, Tensor) {
    let nvt = reference["num_virtual_tokens"].as_i64().expect("num_virtual_tokens");
    let labels = reference["num_labels"].as_i64().expect("num_labels");
    let adapter = nn::VarStore::new(Device::Cpu);
    let prompt = PromptTuning::new(&adapter.root(), nvt, &PromptInit::Random, base.encoder.word_embeddings());
    let table = prompt.embeddings().shallow_clone();
    let model = Classifier {
        adapter: Trainable::Adapter(Adapter::PromptTuning(prompt)),
        head: ClassificationHead::new(&adapter.root(), base.config.hidden_size, labels, 0.02, 0.1),
        level: Level::Sequence,
        pooling: Pooling::Cls,
    };
    tch::no_grad(|| {
        table.shallow_clone().copy_(&matrix(&reference["prompt_embeddings"]));
        model.head.weight().shallow_clone().copy_(&matrix(&reference["classifier_weight"]));
        model.head.bias().shallow_clone().copy_(&Tensor::from_slice(&floats(&reference["classifier_bias"])));
    });
    (adapter, model, table)
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs all-MiniLM-L6-v2; scripts/test.sh runs it")]
fn prompt_tuning_logits_and_gradients_match_peft() {
    let fixture = fixture("minilm_hidden_states.json");
    let reference = &fixture["prompt_tuning"];
    let base = FrozenEncoder::load(&minilm_dir(), Device::Cpu).expect("MiniLM loads");
    let (_adapter, model, table) = fixture_model(&base, reference);

    let (ids, mask) = fixture_batch(&fixture);
    let logits = model.logits(&base.encoder, &ids, &mask, false);
    let expected = matrix(&reference["logits"]);
    let diff = max_abs_diff(&logits.to_kind(Kind::Float), &expected);
    assert!(diff < TOLERANCE, "prompt-tuning logits differ from PEFT by {diff}:\n{logits}\nvs\n{expected}");

    // Gradients reach the prompt through the frozen encoder as in PyTorch.
    let labels = Tensor::from_slice(&ints(&reference["labels"]));
    let loss = logits.cross_entropy_for_logits(&labels);
    let loss_diff = (f64::try_from(&loss).expect("a scalar") - reference["loss"].as_f64().expect("loss")).abs();
    assert!(loss_diff < TOLERANCE, "loss differs from PEFT by {loss_diff}");
    loss.backward();
    let grads = [
        ("prompt_embeddings_grad", table.grad()),
        ("classifier_weight_grad", model.head.weight().grad()),
        ("classifier_bias_grad", model.head.bias().grad()),
    ];
    for (name, ours) in grads {
        let ours = ours.reshape([-1]);
        let expected = Tensor::from_slice(&floats(&reference[name]));
        let scale = f64::try_from(expected.abs().max()).expect("a scalar");
        let diff = max_abs_diff(&ours, &expected);
        assert!(diff <= 1e-3 * scale, "{name} differs from PyTorch by {diff} (largest entry {scale})");
    }
}

/// Mean pooling: the head reads the average of the input's own tokens'
/// last hidden states, the virtual tokens and the padding left out, as
/// sentence-transformers pools MiniLM. Checked against the full forward
/// (itself checked against transformers above) on a prompt-prepended batch.
#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs all-MiniLM-L6-v2; scripts/test.sh runs it")]
fn mean_pooling_averages_the_inputs_own_tokens() {
    let fixture = fixture("minilm_hidden_states.json");
    let reference = &fixture["prompt_tuning"];
    let base = FrozenEncoder::load(&minilm_dir(), Device::Cpu).expect("MiniLM loads");
    let (_adapter, mut model, table) = fixture_model(&base, reference);
    model.pooling = Pooling::Mean;
    let (ids, mask) = fixture_batch(&fixture);
    let lengths = mask.sum_dim_intlist(1, false, Kind::Int64);
    assert!(i64::try_from(lengths.min()).unwrap() < ids.size()[1], "the batch must hold padding");

    let (logits, expected) = tch::no_grad(|| {
        let logits = model.logits(&base.encoder, &ids, &mask, false);
        let embeds = base.encoder.embed_ids(&ids);
        let (embeds, full_mask, _) = prepend(&table, &embeds, &mask, None);
        let hidden = base.encoder.forward(&embeds, &full_mask, None, &NoHooks, false);
        let nvt = table.size()[0];
        let batch = ids.size()[0];
        let pooled: Vec<Tensor> = (0..batch)
            .map(|i| {
                let length = i64::try_from(lengths.get(i)).unwrap();
                hidden.get(i).narrow(0, nvt, length).mean_dim(0, false, Kind::Float)
            })
            .collect();
        let pooled = Tensor::stack(&pooled, 0);
        (logits, pooled.matmul(&model.head.weight().tr()) + model.head.bias())
    });
    let diff = max_abs_diff(&logits, &expected);
    assert!(diff < 1e-5, "mean-pooled logits differ from the mean of the real tokens by {diff}");
    let cls = tch::no_grad(|| {
        model.pooling = Pooling::Cls;
        model.logits(&base.encoder, &ids, &mask, false)
    });
    assert!(max_abs_diff(&cls, &expected) > 1e-2, "the pooling setting changes nothing");
}

#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs all-MiniLM-L6-v2; scripts/test.sh runs it")]
fn adamw_steps_with_warmup_and_decay_follow_torch() {
    let fixture = fixture("minilm_hidden_states.json");
    let reference = &fixture["prompt_tuning"];
    let training = &reference["training"];
    let number = |key: &str| training[key].as_f64().unwrap_or_else(|| panic!("training.{key}"));
    let base = FrozenEncoder::load(&minilm_dir(), Device::Cpu).expect("MiniLM loads");
    let (_adapter, model, table) = fixture_model(&base, reference);

    let (lr, head_lr, weight_decay) = (number("lr"), number("head_lr"), number("weight_decay"));
    let mut optimizer = AdamW::default();
    optimizer.add_group(vec![table.shallow_clone()], lr, weight_decay);
    optimizer.add_group(vec![model.head.weight().shallow_clone()], head_lr, weight_decay);
    optimizer.add_group(vec![model.head.bias().shallow_clone()], head_lr, 0.0);
    let steps = number("steps") as u64;
    let schedule = LinearSchedule::new(steps, number("warmup_steps") / steps as f64);

    let (ids, mask) = fixture_batch(&fixture);
    let labels = Tensor::from_slice(&ints(&reference["labels"]));
    let mut losses = Vec::new();
    for step in 0..steps {
        optimizer.zero_grad();
        let loss = model.logits(&base.encoder, &ids, &mask, false).cross_entropy_for_logits(&labels);
        losses.push(f64::try_from(&loss).expect("a scalar"));
        loss.backward();
        optimizer.step(schedule.factor(step));
    }
    let expected: Vec<f64> = floats(&training["losses"]).into_iter().map(f64::from).collect();
    let worst = losses.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < TOLERANCE, "losses {losses:?} differ from torch's {expected:?} by up to {worst}");
}
