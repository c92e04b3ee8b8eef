//! The decoder engine against transformers and PEFT: tiny random GPT-2,
//! Llama (grouped-query attention, untied head, sharded checkpoint) and
//! Qwen2 (q/k/v biases, tied head) checkpoints with PEFT prompt-tuning,
//! prefix-tuning and LoRA adapters, written with their float32 CPU outputs
//! by `scripts/reference/tiny_decoders.py` (logits of right- and
//! left-padded batches, causal-LM losses, the prompt's gradient, greedy and
//! beam-search tokens of `generate`), plus RoPE frequencies and sacreBLEU
//! scores recorded by the same script.

mod support;

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use support::paths::{fixtures, shared_data};

use ptune_worker::engine::causal_lm::{self, GenerationConfig, LmAdapter, LmBatch};
use ptune_worker::engine::causal_lm::bleu;
use ptune_worker::engine::decoder::CausalDecoder;
use ptune_worker::engine::factory::load_causal_lm;
use ptune_worker::engine::llama::LlamaConfig;
use ptune_worker::engine::safetensors::{checkpoint_files, checkpoint_float_parameters, checkpoint_sha256};
use ptune_worker::engine::seq2seq::{self, Seq2SeqFormat, SourceReferences};
use ptune_worker::engine::{gpt2, llama, EngineError, Hooks, LmTokenizer, NoHooks};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Largest absolute difference allowed against transformers' float32 outputs.
const TOLERANCE: f64 = 1e-4;

fn reference() -> &'static Value {
    static REFERENCE: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    REFERENCE.get_or_init(|| {
        let path = fixtures().join("decoders_reference.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_str(&text).expect("fixture is json")
    })
}

fn ints(value: &Value) -> Vec<i64> {
    match value {
        Value::Array(items) => items.iter().flat_map(ints).collect(),
        Value::Number(n) => vec![n.as_i64().expect("an integer")],
        other => panic!("expected integers, got {other}"),
    }
}

/// `[rows, cols]` int64 tensor of a nested json array.
fn int_matrix(value: &Value) -> Tensor {
    let rows = value.as_array().expect("an array").len() as i64;
    Tensor::from_slice(&ints(value)).view([rows, -1])
}

/// Each row's real tokens (mask 1) of a padded `[rows, cols]` batch.
fn unpadded(ids: &Value, mask: &Value) -> Vec<Vec<i64>> {
    ids.as_array()
        .expect("rows")
        .iter()
        .zip(mask.as_array().expect("rows"))
        .map(|(ids, mask)| ints(ids).into_iter().zip(ints(mask)).filter(|&(_, m)| m == 1).map(|(id, _)| id).collect())
        .collect()
}

fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    f64::try_from((a - b).abs().max()).expect("a scalar")
}

/// Largest difference of `[batch, seq, vocab]` logits at positions where
/// `mask` `[batch, seq]` is 1.
fn diff_at_real_positions(ours: &Tensor, theirs: &Tensor, mask: &Tensor) -> f64 {
    assert_eq!(ours.size(), theirs.size(), "logit shapes differ");
    let vocab = ours.size()[2];
    let rows = mask.reshape([-1]).ne(0).nonzero().squeeze_dim(1);
    let pick = |t: &Tensor| t.reshape([-1, vocab]).index_select(0, &rows);
    max_abs_diff(&pick(ours), &pick(theirs))
}

/// PEFT prefix tuning's table `[virtual_tokens, layers * 2 * kv_heads *
/// head_dim]` served as per-layer key/value prefixes, as PEFT's
/// `get_prompt` lays it out.
struct PrefixHooks {
    /// `[layers * 2, kv_heads, virtual_tokens, head_dim]`
    kv: Tensor,
}

impl PrefixHooks {
    fn new(table: &Tensor, model: &dyn CausalDecoder) -> Self {
        let nvt = table.size()[0];
        let layers = model.num_layers() as i64;
        let kv = table.view([nvt, layers * 2, model.num_kv_heads(), model.head_dim()]).permute([1, 2, 0, 3]);
        Self { kv }
    }
}

impl Hooks for PrefixHooks {
    fn prefix(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let layer = layer as i64;
        Some((self.kv.get(2 * layer).unsqueeze(0), self.kv.get(2 * layer + 1).unsqueeze(0)))
    }
}

/// A PEFT LoRA adapter served as linear deltas, keyed by layer and the
/// module's path inside the layer; remembers which modules were asked for.
struct LoraHooks {
    deltas: HashMap<(usize, String), (Tensor, Tensor)>,
    scale: f64,
    used: RefCell<BTreeSet<(usize, String)>>,
}

impl LoraHooks {
    fn load(dir: &Path) -> Self {
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).expect("adapter config"))
                .expect("json");
        let scale = config["lora_alpha"].as_f64().expect("lora_alpha") / config["r"].as_f64().expect("r");
        let mut parts: HashMap<(usize, String), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (key, tensor) in read_tensors(&dir.join("adapter_model.safetensors")) {
            // e.g. base_model.model.transformer.h.0.attn.c_attn.lora_A.weight
            let (path, which) = key.rsplit_once(".lora_").expect("a LoRA key");
            let segments: Vec<&str> = path.split('.').collect();
            let at = segments.iter().position(|s| *s == "h" || *s == "layers").expect("a layer list");
            let layer: usize = segments[at + 1].parse().expect("a layer index");
            let module = segments[at + 2..].join(".");
            let entry = parts.entry((layer, module)).or_default();
            if which.starts_with('A') {
                entry.0 = Some(tensor);
            } else {
                entry.1 = Some(tensor);
            }
        }
        let deltas = parts.into_iter().map(|(k, (a, b))| (k, (a.expect("lora_A"), b.expect("lora_B")))).collect();
        Self { deltas, scale, used: RefCell::new(BTreeSet::new()) }
    }
}

impl Hooks for LoraHooks {
    fn linear_delta(&self, layer: usize, module: &str, xs: &Tensor) -> Option<Tensor> {
        let key = (layer, module.to_string());
        let (a, b) = self.deltas.get(&key)?;
        self.used.borrow_mut().insert(key);
        Some(xs.matmul(&a.tr()).matmul(&b.tr()) * self.scale)
    }

    fn has_linear_deltas(&self) -> bool {
        true
    }
}

/// The one tensor of a prompt-learning PEFT export (`prompt_embeddings`).
fn prompt_table(dir: &Path) -> Tensor {
    let tensors = read_tensors(&dir.join("adapter_model.safetensors"));
    let (_, table) = tensors.into_iter().find(|(k, _)| k.contains("prompt_embeddings")).expect("prompt_embeddings");
    table
}

/// Checks one tiny checkpoint against every recorded output.
fn check_decoder(kind: &str) {
    let summary = &reference()["models"][kind];
    let folder = fixtures().join(format!("tiny-{kind}"));
    let model = load_causal_lm(&folder, Device::Cpu).expect("the tiny checkpoint loads");
    assert_eq!(model.model_type(), kind);
    let checkpoint = &summary["checkpoint"];
    let files: Vec<String> = checkpoint_files(&folder)
        .expect("files")
        .iter()
        .map(|f| f.file_name().expect("a name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, checkpoint["files"].as_array().expect("files").iter().map(|f| f.as_str().unwrap()).collect::<Vec<_>>());
    assert_eq!(checkpoint_float_parameters(&folder).expect("headers"), checkpoint["parameters"].as_u64().unwrap());
    assert_eq!(checkpoint_sha256(&folder).expect("hashes"), checkpoint["sha256"].as_str().unwrap());
    let expected = read_tensors(&folder.join("reference.safetensors"));
    let adapters = folder.join("adapters");

    let prompt = prompt_table(&adapters.join("prompt"));
    let prefix = PrefixHooks::new(&prompt_table(&adapters.join("prefix")), model.as_ref());
    let lora = LoraHooks::load(&adapters.join("lora"));
    let adapter_of = |method: &str| match method {
        "base" => LmAdapter::none(),
        "prompt" => LmAdapter { prompt: Some(&prompt), hooks: &NoHooks },
        "prefix" => LmAdapter { prompt: None, hooks: &prefix },
        "lora" => LmAdapter { prompt: None, hooks: &lora },
        other => panic!("unknown method {other}"),
    };

    for side in ["right", "left"] {
        let ids = int_matrix(&summary[side]["input_ids"]);
        let mask = int_matrix(&summary[side]["attention_mask"]);
        for method in ["base", "prompt", "prefix", "lora"] {
            let Some(theirs) = expected.get(&format!("{method}.{side}_logits")) else { continue };
            let adapter = adapter_of(method);
            let ours = tch::no_grad(|| causal_lm::logits(model.as_ref(), &adapter, &ids, &mask, false));
            let nvt = adapter.prompt_len();
            let full_mask = Tensor::cat(&[Tensor::ones([mask.size()[0], nvt], (Kind::Int64, Device::Cpu)), mask.shallow_clone()], 1);
            let diff = diff_at_real_positions(&ours, theirs, &full_mask);
            assert!(diff < TOLERANCE, "{kind} {method} {side}-padded logits differ by {diff}");
        }
    }
    let used = lora.used.borrow().len();
    assert_eq!(used, lora.deltas.len(), "{kind}: only {used} of {} LoRA modules were applied", lora.deltas.len());

    // Causal-LM loss over the targets, and the prompt's gradient.
    let train = &summary["train"];
    let batch = LmBatch {
        input_ids: int_matrix(&train["input_ids"]),
        attention_mask: int_matrix(&train["attention_mask"]),
        labels: int_matrix(&train["labels"]),
        len: 3,
    };
    let loss = tch::no_grad(|| causal_lm::train_loss(model.as_ref(), &LmAdapter::none(), &batch, false));
    let diff = max_abs_diff(&loss.reshape([1]), &expected["base.train_loss"]);
    assert!(diff < TOLERANCE, "{kind}: causal-LM loss differs by {diff}");
    let trainable = prompt.copy().set_requires_grad(true);
    let adapter = LmAdapter { prompt: Some(&trainable), hooks: &NoHooks };
    let loss = causal_lm::train_loss(model.as_ref(), &adapter, &batch, false);
    loss.backward();
    let diff = max_abs_diff(&loss.reshape([1]), &expected["prompt.train_loss"]);
    assert!(diff < TOLERANCE, "{kind}: prompt-tuning loss differs by {diff}");
    let diff = max_abs_diff(&trainable.grad(), &expected["prompt.train_loss_grad"]);
    assert!(diff < TOLERANCE, "{kind}: prompt gradient differs by {diff}");

    // Greedy and beam-search decoding, token for token.
    let generation = &summary["generation"];
    let eos = generation["eos_token_id"].as_i64().expect("eos");
    let pad = generation["pad_token_id"].as_i64().expect("pad");
    let max_new = generation["max_new_tokens"].as_u64().expect("max_new_tokens") as usize;
    let beams = generation["num_beams"].as_u64().expect("num_beams") as usize;
    let padded_prompts = unpadded(&summary["left"]["input_ids"], &summary["left"]["attention_mask"]);
    let even_prompts: Vec<Vec<i64>> =
        generation["even_input_ids"].as_array().expect("rows").iter().map(ints).collect();
    for (name, tokens) in summary["generated"].as_object().expect("generated") {
        let (method, search) = name.split_once('.').expect("method.search");
        let prompts = if method == "prompt" { &even_prompts } else { &padded_prompts };
        let config = GenerationConfig {
            num_beams: if search == "beam" { beams } else { 1 },
            ..GenerationConfig::greedy(max_new, vec![eos], pad)
        };
        let ours = causal_lm::generate(model.as_ref(), &adapter_of(method), prompts, &config, Device::Cpu);
        let theirs: Vec<Vec<i64>> = tokens.as_array().expect("rows").iter().map(ints).collect();
        assert_eq!(ours, theirs, "{kind}: {name} tokens differ from the reference");
    }

    // Greedy outputs decoded to text and scored, in batches of two.
    let e2e = &summary["e2e_bleu"];
    let inputs: Vec<SourceReferences> = e2e["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .zip(e2e["references"].as_array().expect("references"))
        .map(|(source, references)| SourceReferences {
            source: source.as_str().expect("text").to_string(),
            references: references.as_array().expect("list").iter().map(|r| r.as_str().expect("text").to_string()).collect(),
        })
        .collect();
    let tokenizer = LmTokenizer::from_file(&folder.join("tokenizer.json")).expect("tokenizer");
    let format = Seq2SeqFormat { separator: Seq2SeqFormat::DEFAULT_SEPARATOR.into(), eos_id: eos, max_len: 64 };
    let config = GenerationConfig::greedy(max_new, vec![eos], pad);
    let evaluation = causal_lm::evaluate_bleu(model.as_ref(), &LmAdapter::none(), &tokenizer, &format, &inputs, 2, &config, Device::Cpu)
        .expect("evaluates");
    let hypotheses: Vec<&str> = e2e["hypotheses"].as_array().expect("hypotheses").iter().map(|h| h.as_str().expect("text")).collect();
    assert_eq!(evaluation.hypotheses, hypotheses, "{kind}: decoded outputs");
    let theirs = e2e["score"].as_f64().expect("score");
    assert!((evaluation.bleu - theirs).abs() < 1e-9, "{kind}: BLEU {} differs from sacreBLEU's {theirs}", evaluation.bleu);
}

#[test]
fn tiny_gpt2_matches_transformers_and_peft() {
    check_decoder("gpt2");
}

#[test]
fn tiny_llama_with_gqa_and_a_sharded_checkpoint_matches_transformers_and_peft() {
    let folder = fixtures().join("tiny-llama");
    assert!(checkpoint_files(&folder).expect("shards").len() > 1, "the llama fixture should be sharded");
    check_decoder("llama");
}

#[test]
fn tiny_qwen2_with_biases_and_a_tied_head_matches_transformers_and_peft() {
    check_decoder("qwen2");
}

/// A GPT-2 checkpoint saved from `GPT2Model` (names without `transformer.`)
/// gives the same logits as the `GPT2LMHeadModel` one.
#[test]
fn gpt2_weights_without_the_transformer_prefix_load() {
    let source = fixtures().join("tiny-gpt2");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).expect("copy config");
    let renamed: Vec<(String, Tensor)> = read_tensors(&source.join("model.safetensors"))
        .into_iter()
        .map(|(name, tensor)| (name.strip_prefix("transformer.").unwrap_or(&name).to_string(), tensor))
        .collect();
    Tensor::write_safetensors(&renamed, dir.path().join("model.safetensors")).expect("write");

    let prefixed = gpt2::Gpt2Model::load(&source, Device::Cpu).expect("prefixed loads");
    let bare = gpt2::Gpt2Model::load(dir.path(), Device::Cpu).expect("bare loads");
    let summary = &reference()["models"]["gpt2"]["right"];
    let ids = int_matrix(&summary["input_ids"]);
    let mask = int_matrix(&summary["attention_mask"]);
    let logits = |m: &dyn CausalDecoder| tch::no_grad(|| causal_lm::logits(m, &LmAdapter::none(), &ids, &mask, false));
    assert_eq!(max_abs_diff(&logits(&prefixed), &logits(&bare)), 0.0);
}

#[test]
fn rope_frequencies_match_transformers() {
    for (name, case) in reference()["rope"].as_object().expect("rope cases") {
        let config: LlamaConfig = serde_json::from_value(case["config"].clone()).expect("a llama config");
        let rope = config.rope().unwrap_or_else(|e| panic!("{name}: {e}"));
        let ours = rope.inv_freq(config.head_dim());
        let theirs = Tensor::from_slice(&case["inv_freq"].as_array().expect("list").iter().map(|v| v.as_f64().unwrap() as f32).collect::<Vec<_>>());
        let relative = f64::try_from(((&ours - &theirs).abs() / theirs.abs()).max()).expect("a scalar");
        assert!(relative < 1e-5, "{name}: inverse frequencies differ by a factor of {relative}");
    }
}

/// Configs the engine cannot run are refused on load with a message that
/// names the setting.
#[test]
fn unsupported_decoder_configs_are_refused_with_the_setting_named() {
    let base: Value = reference()["models"]["llama"]["config"].clone();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("yarn", serde_json::json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}), "unsupported rope type \"yarn\""),
        ("qwen2 sliding window", serde_json::json!({"model_type": "qwen2", "use_sliding_window": true}), "use_sliding_window"),
        ("partial rotary", serde_json::json!({"partial_rotary_factor": 0.5}), "partial_rotary_factor"),
        ("heads", serde_json::json!({"num_key_value_heads": 3}), "num_key_value_heads 3"),
        ("model type", serde_json::json!({"model_type": "gemma"}), "unsupported model_type \"gemma\""),
    ];
    for (name, overrides, message) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = base.clone();
        for (key, value) in overrides.as_object().expect("object") {
            config[key] = value.clone();
        }
        std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write config");
        let error = match llama::LlamaModel::load(dir.path(), Device::Cpu) {
            Err(EngineError::Model(error)) => error,
            Err(other) => panic!("{name}: expected a model error, got {other}"),
            Ok(_) => panic!("{name}: the config was accepted"),
        };
        assert!(error.contains(message), "{name}: {error:?} does not mention {message:?}");
    }

    // A checkpoint that lacks a weight the config needs.
    let dir = tempfile::tempdir().expect("tempdir");
    let source = fixtures().join("tiny-qwen2");
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).expect("copy config");
    let kept: Vec<(String, Tensor)> = read_tensors(&source.join("model.safetensors"))
        .into_iter()
        .filter(|(name, _)| !name.ends_with("layers.1.mlp.up_proj.weight"))
        .collect();
    Tensor::write_safetensors(&kept, dir.path().join("model.safetensors")).expect("write");
    match load_causal_lm(dir.path(), Device::Cpu) {
        Err(EngineError::Model(error)) => {
            assert!(error.contains("model.layers.1.mlp.up_proj.weight"), "{error:?} does not name the missing tensor")
        }
        Err(other) => panic!("expected a model error, got {other}"),
        Ok(_) => panic!("a checkpoint with a missing tensor loaded"),
    }
}

#[test]
fn corpus_bleu_matches_sacrebleu() {
    let bleu_reference = &reference()["bleu"];
    for case in bleu_reference["tokenize_13a"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(bleu::tokenize_13a(text), case["tokens"].as_str().expect("tokens"), "13a tokens of {text:?}");
    }
    for (i, case) in bleu_reference["cases"].as_array().expect("cases").iter().enumerate() {
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().expect("list").iter().map(|s| s.as_str().expect("text").to_string()).collect()
        };
        let hypotheses = strings(&case["hypotheses"]);
        let references: Vec<Vec<String>> = case["references"].as_array().expect("lists").iter().map(strings).collect();
        let ours = bleu::corpus_bleu(&hypotheses, &references);
        let theirs = case["score"].as_f64().expect("score");
        assert!((ours - theirs).abs() < 1e-9, "case {i}: BLEU {ours} differs from sacreBLEU's {theirs}");
    }
}

/// Source + separator + target tokenizes to the reference's training ids,
/// labelled on the target and EOS only; the generation prompt is the
/// source part; the real E2E files read.
#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs ../shared/data; scripts/test.sh runs it")]
fn e2e_pairs_become_labelled_training_examples() {
    for kind in ["gpt2", "llama"] {
        let summary = &reference()["models"][kind];
        let tokenizer = LmTokenizer::from_file(&fixtures().join(format!("tiny-{kind}/tokenizer.json"))).expect("tokenizer");
        let format = Seq2SeqFormat {
            separator: Seq2SeqFormat::DEFAULT_SEPARATOR.into(),
            eos_id: summary["generation"]["pad_token_id"].as_i64().expect("eos"),
            max_len: 64,
        };
        let source = "name [ The Eagle ] , food [ French ]";
        let example = format.training_example(&tokenizer, source, "The Eagle serves French food .").expect("encodes");
        let train = &summary["train"];
        let ids = &unpadded(&train["input_ids"], &train["attention_mask"])[0];
        let labels: Vec<i64> = ints(&train["labels"][0]).into_iter().take(ids.len()).collect();
        assert_eq!(&example.ids, ids, "{kind}: training ids");
        assert_eq!(example.labels, labels, "{kind}: training labels");
        let prompt = format.prompt_ids(&tokenizer, source).expect("encodes");
        assert_eq!(prompt, unpadded(&summary["right"]["input_ids"], &summary["right"]["attention_mask"])[0], "{kind}: prompt ids");
        assert_eq!(tokenizer.decode(&example.ids[prompt.len()..example.ids.len() - 1]).expect("decodes"), "The Eagle serves French food .");
    }

    let data = shared_data("e2e");
    let train = seq2seq::read_source_targets(&data.join("train.jsonl"), "train.jsonl", 3).expect("train reads");
    assert_eq!(train.len(), 3);
    assert!(train[0].source.starts_with("name[The Vaults]"), "first source: {:?}", train[0].source);
    assert!(train[0].target.starts_with("The Vaults pub"), "first target: {:?}", train[0].target);
    let dev = seq2seq::read_source_references(&data.join("dev.jsonl"), "dev.jsonl", 2).expect("dev reads");
    assert_eq!(dev.len(), 2);
    assert!(dev.iter().all(|d| d.references.len() >= 2), "dev inputs carry several references");

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"source\": \"a\", \"target\": \"b\"}\n\n{\"source\": \"a\"}\n").expect("write");
    match seq2seq::read_source_targets(&bad, "bad.jsonl", 0) {
        Err(EngineError::Data { file, line, message }) => {
            assert_eq!((file.as_str(), line, message.as_str()), ("bad.jsonl", 3, "missing field \"target\""))
        }
        other => panic!("expected a data error, got {:?}", other.map(|v| v.len())),
    }
}

/// In training mode dropout is applied (the loss moves with the seed and
/// repeats with it), and training a LoRA adapter on a left-padded batch
/// gives finite, non-zero gradients on every LoRA matrix of every layer.
#[test]
fn training_mode_uses_dropout_and_keeps_gradients_finite() {
    let summary = &reference()["models"]["gpt2"];
    let folder = fixtures().join("tiny-gpt2");
    let model = gpt2::Gpt2Model::load(&folder, Device::Cpu).expect("loads");
    let ids = int_matrix(&summary["left"]["input_ids"]);
    let mask = int_matrix(&summary["left"]["attention_mask"]);
    let batch = LmBatch { labels: ids.masked_fill(&mask.eq(0), -100), input_ids: ids, attention_mask: mask, len: 3 };
    let prompt = prompt_table(&folder.join("adapters/prompt")).set_requires_grad(true);
    let table = prompt_table(&folder.join("adapters/prefix")).set_requires_grad(true);
    let prefix = PrefixHooks::new(&table, &model);
    let adapter = LmAdapter { prompt: Some(&prompt), hooks: &prefix };

    let loss_with_seed = |seed: i64| {
        tch::manual_seed(seed);
        f64::try_from(tch::no_grad(|| causal_lm::train_loss(&model, &adapter, &batch, true))).expect("a scalar")
    };
    let eval = f64::try_from(tch::no_grad(|| causal_lm::train_loss(&model, &adapter, &batch, false))).expect("a scalar");
    let (first, again, other) = (loss_with_seed(1), loss_with_seed(1), loss_with_seed(2));
    assert_eq!(first, again, "the same seed gives the same training loss");
    assert!(first != eval && first != other, "dropout changes the loss: eval {eval}, seed 1 {first}, seed 2 {other}");

    let lora = LoraHooks::load(&folder.join("adapters/lora"));
    for (a, b) in lora.deltas.values() {
        let _ = a.set_requires_grad(true);
        let _ = b.set_requires_grad(true);
    }
    tch::manual_seed(3);
    let loss = causal_lm::train_loss(&model, &LmAdapter { prompt: None, hooks: &lora }, &batch, true);
    loss.backward();
    for ((layer, module), (a, b)) in &lora.deltas {
        for (name, grad) in [("A", a.grad()), ("B", b.grad())] {
            let finite = bool::try_from(grad.isfinite().all()).expect("a flag");
            let norm = f64::try_from(grad.norm()).expect("a scalar");
            assert!(finite && norm > 0.0, "layer {layer} {module} lora_{name} gradient is not finite and non-zero (norm {norm})");
        }
    }
}
