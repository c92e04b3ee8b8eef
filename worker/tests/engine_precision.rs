//! Training precision (`training.precision`): a bf16 or fp16 base computes in
//! the lower precision while a job's parameters, gradients and AdamW state
//! stay float32, its logits come out float32 and close to the float32
//! base's, and an fp16 job scales its loss.

mod support;

use ptune_core::{JobSpec, Precision};
use ptune_worker::engine::{build_classifier, optimizer_for, Engine, FrozenEncoder, NoHooks, Resume, TRAINER_STATE_FILE};
use support::engine::{device, synthetic_data_job, SERIAL};
use support::paths::{fixtures, minilm_dir, sst2};
use tch::{nn, Kind, Tensor};

fn spec(method: &str, peft: &str, training: &str) -> JobSpec {
    JobSpec::from_toml(&format!(
        r#"
        name = "precision"
        base_model = "tiny-bert"
        task = "sequence_classification"
        method = "{method}"
        [peft]
        {peft}
        [data]
        train = "train.jsonl"
        eval = "dev.jsonl"
        labels = [0, 1]
        max_seq_len = 32
        [training]
        learning_rate = 1e-2
        batch_size = 8
        {training}
        "#
    ))
    .expect("test spec parses")
}

/// `[batch, seq]` ids and mask of `sentences`, right-padded.
fn batch(base: &FrozenEncoder, sentences: &[&str], max_len: usize) -> (Tensor, Tensor) {
    let encoded = base.tokenizer.encode_batch(sentences.to_vec(), max_len).expect("tokenizes");
    let longest = encoded.iter().map(Vec::len).max().unwrap_or(1);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for row in &encoded {
        ids.extend(row.iter().copied().chain(std::iter::repeat(0).take(longest - row.len())));
        mask.extend(std::iter::repeat(1i64).take(row.len()).chain(std::iter::repeat(0).take(longest - row.len())));
    }
    let rows = encoded.len() as i64;
    (Tensor::from_slice(&ids).view([rows, -1]), Tensor::from_slice(&mask).view([rows, -1]))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).expect("a scalar")
}

const SENTENCES: [&str; 4] =
    ["a warm , funny film", "the script is dull and the cast is tired", "clever", "an ending that is moving and bright"];

#[test]
fn under_bf16_a_jobs_parameters_gradients_and_adamw_state_stay_float32() {
    let dir = fixtures().join("tiny-bert");
    let fp32 = FrozenEncoder::load(&dir, device()).expect("tiny-bert loads");
    for precision in [Precision::Bf16, Precision::Fp16] {
        let base = FrozenEncoder::load_in(&dir, device(), precision).expect("tiny-bert loads in the lower precision");
        let base_kind = ptune_worker::engine::base_kind(precision);
        let before: Vec<Tensor> = base.encoder.tensors().iter().map(Tensor::copy).collect();
        assert!(before.iter().all(|t| t.kind() == base_kind), "{precision}: the frozen weights are {base_kind:?}");
        let (ids, mask) = batch(&base, &SENTENCES, 32);
        let labels = Tensor::from_slice(&[1i64, 0, 1, 1]);
        for (method, peft) in [
            ("prompt_tuning", "num_virtual_tokens = 4"),
            ("p_tuning", "num_virtual_tokens = 4"),
            ("prefix_tuning", "num_virtual_tokens = 4"),
            ("p_tuning_v2", "num_virtual_tokens = 4"),
            ("lora", "r = 4"),
        ] {
            let mut spec = spec(method, peft, "");
            spec.training.precision = precision;
            spec.validate(None).expect("valid spec");
            tch::manual_seed(7);
            let vars = nn::VarStore::new(device());
            let classifier = build_classifier(&spec, &base, &vars.root(), 2).expect("classifier");
            let logits = classifier.logits(&base.encoder, &ids, &mask, true);
            assert_eq!(logits.kind(), Kind::Float, "{method}: logits are float32");
            logits.cross_entropy_for_logits(&labels).backward();
            let mut optimizer = optimizer_for(&vars, &spec);
            for (name, var) in vars.variables() {
                assert_eq!(var.kind(), Kind::Float, "{method} {precision}: {name} is float32");
                let grad = var.grad();
                assert!(grad.defined(), "{method}: {name} got a gradient through the {precision} base");
                assert_eq!(grad.kind(), Kind::Float, "{method} {precision}: the gradient of {name} is float32");
                assert!(bool::try_from(grad.isfinite().all()).unwrap(), "{method}: the gradient of {name} is finite");
            }
            optimizer.step(1.0);
            for (name, moment) in optimizer.state_tensors() {
                assert_eq!(moment.kind(), Kind::Float, "{method} {precision}: {name} is float32");
            }
            // The same adapter on the float32 base gives nearly the same logits.
            let (ours, reference) = tch::no_grad(|| {
                (classifier.logits(&base.encoder, &ids, &mask, false), classifier.logits(&fp32.encoder, &ids, &mask, false))
            });
            let diff = max_abs_diff(&ours, &reference);
            assert!(diff < 0.05, "{method} {precision}: logits differ from the float32 base's by {diff}");
        }
        for (before, after) in before.iter().zip(base.encoder.tensors()) {
            assert!(before.equal(&after), "{precision}: the frozen base is unchanged");
        }
    }
}

#[test]
fn a_bf16_and_an_fp16_job_train_on_their_own_copy_and_save_float32_state() {
    let dir = fixtures().join("tiny-bert");
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut engine = Engine::new(device());
    let mut losses = Vec::new();
    for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
        let out = tempfile::tempdir().unwrap();
        let checkpoints = tempfile::tempdir().unwrap();
        let mut spec = spec("prompt_tuning", "num_virtual_tokens = 4", "max_steps = 6\nseed = 3");
        spec.training.precision = precision;
        let job = synthetic_data_job(spec, "sst2", out.path().join("export"), Some(checkpoints.path().to_path_buf()), Resume::Never);
        let mut seen = Vec::new();
        let mut on_event = |event: ptune_worker::engine::Event<'_>| {
            if let ptune_worker::engine::Event::Step { metrics, .. } = event {
                seen.extend(metrics.iter().filter(|m| m.name == "loss").map(|m| m.value));
            }
            ptune_worker::engine::Control::Continue
        };
        let outcome = engine.train(&dir, &job, &mut on_event).expect("trains");
        assert_eq!(outcome.steps, 6);
        let state = Tensor::read_safetensors(checkpoints.path().join(ptune_worker::engine::CHECKPOINT_STATE_FILE))
            .expect("checkpoint state");
        assert!(state.iter().any(|(name, _)| name.starts_with("optimizer.")), "the checkpoint holds AdamW's moments");
        for (name, tensor) in &state {
            assert_eq!(tensor.kind(), Kind::Float, "{precision}: checkpointed {name} is float32");
        }
        let trainer: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(checkpoints.path().join(TRAINER_STATE_FILE)).unwrap()).unwrap();
        match precision {
            // No step overflows at the first scale: 6 good steps, 2^16 still.
            Precision::Fp16 => assert_eq!(trainer["loss_scale"]["scale"], 65_536.0, "{trainer}"),
            _ => assert!(trainer.get("loss_scale").is_none(), "{trainer}"),
        }
        losses.push(seen);
    }
    let stats = engine.cache().stats();
    let fp32_bytes = engine.base_model(&dir).unwrap().bytes;
    assert_eq!(stats.models, 3, "one copy of the base per precision");
    assert_eq!(stats.bytes, fp32_bytes + fp32_bytes / 2 + fp32_bytes / 2);
    // The lower precisions follow the float32 run closely.
    for (precision, run) in [(Precision::Bf16, &losses[1]), (Precision::Fp16, &losses[2])] {
        let diff = run.iter().zip(&losses[0]).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(diff < 0.05, "{precision} losses {run:?} stray from fp32's {:?} by {diff}", losses[0]);
    }
}

/// all-MiniLM-L6-v2 in bf16 against float32 on 64 SST-2 dev sentences: the
/// last hidden state, the pooler output and the logits of a fixed head over
/// the mean-pooled sentence embedding (what a `pooling = "mean"` classifier
/// computes), scaled so the logits spread over several units as a trained
/// head's do. Measured here: last hidden state 0.059, pooler 0.003, logits
/// 0.9% of the largest, every argmax the same.
#[test]
#[cfg_attr(not(feature = "integration"), ignore = "needs all-MiniLM-L6-v2 and ../shared/data; scripts/test.sh runs it")]
fn minilm_bf16_logits_stay_within_tolerance_of_fp32_on_sst2_sentences() {
    /// Largest logit difference allowed, relative to the largest |logit|.
    const LOGIT_TOLERANCE: f64 = 0.015;
    /// Largest absolute difference of the last hidden state (values up to
    /// about 10) and of the pooler output (tanh, up to 1).
    const HIDDEN_TOLERANCE: f64 = 0.1;
    const POOLER_TOLERANCE: f64 = 0.01;
    /// Fewest examples whose predicted class must agree.
    const AGREEMENT: f64 = 0.98;
    let dir = minilm_dir();
    let fp32 = FrozenEncoder::load(&dir, device()).expect("MiniLM loads");
    let bf16 = FrozenEncoder::load_in(&dir, device(), Precision::Bf16).expect("MiniLM loads in bf16");
    let text = std::fs::read_to_string(sst2("dev.jsonl")).expect("SST-2 dev");
    let rows: Vec<serde_json::Value> = text.lines().take(64).map(|l| serde_json::from_str(l).unwrap()).collect();
    let sentences: Vec<&str> = rows.iter().map(|r| r["text"].as_str().unwrap()).collect();
    let (ids, mask) = batch(&fp32, &sentences, 128);
    tch::manual_seed(0);
    let head = Tensor::randn([2, 384], (Kind::Float, device())) * 0.5;
    let run = |base: &FrozenEncoder| {
        tch::no_grad(|| {
            let encoder = &base.encoder;
            let hidden = encoder.forward(&encoder.embed_ids(&ids), &mask, None, &NoHooks, false);
            let weights = mask.unsqueeze(-1).to_kind(Kind::Float);
            let mean = (&hidden * &weights).sum_dim_intlist(1, false, Kind::Float) / weights.sum_dim_intlist(1, false, Kind::Float);
            let pooled = encoder.pool(&hidden.select(1, 0)).unwrap();
            (hidden, pooled, mean.matmul(&head.transpose(0, 1)))
        })
    };
    let (hidden32, pooled32, logits32) = run(&fp32);
    let (hidden16, pooled16, logits16) = run(&bf16);
    assert_eq!((hidden16.kind(), logits16.kind()), (Kind::Float, Kind::Float), "what leaves the bf16 encoder is float32");
    let hidden = max_abs_diff(&hidden16, &hidden32);
    let pooled = max_abs_diff(&pooled16, &pooled32);
    let logits = max_abs_diff(&logits16, &logits32);
    let spread = f64::try_from(logits32.abs().max()).unwrap();
    let agree = f64::try_from(logits16.argmax(-1, false).eq_tensor(&logits32.argmax(-1, false)).to_kind(Kind::Float).mean(Kind::Float)).unwrap();
    println!("bf16 against fp32 on 64 SST-2 dev sentences: last hidden state {hidden:.4}, pooler {pooled:.4}, logits {logits:.4} (largest |logit| {spread:.2}), argmax agreement {agree:.3}");
    assert!(hidden < HIDDEN_TOLERANCE, "last hidden state differs by {hidden}");
    assert!(pooled < POOLER_TOLERANCE, "pooler output differs by {pooled}");
    assert!(spread > 2.0, "the head spreads the logits ({spread})");
    assert!(logits < LOGIT_TOLERANCE * spread, "logits differ by {logits} (largest |logit| {spread})");
    assert!(agree >= AGREEMENT, "only {agree} of the predictions agree");
}
