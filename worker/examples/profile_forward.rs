//! Temporary: times forward/backward pieces of prompt-tuned MiniLM on SST-2-sized batches.
use std::time::Instant;
use ptune_worker::engine::*;
use tch::{nn, Device, Kind, Tensor};

fn main() {
    let dir = std::env::var("PTUNE_MINILM_DIR").unwrap();
    let base = BaseModel::load(std::path::Path::new(&dir), Device::Cpu).unwrap();
    let mut cfg = base.config.clone();
    let mode = std::env::args().nth(1).unwrap_or_default();
    if mode.contains("nohd") { cfg.hidden_dropout_prob = 0.0; }
    if mode.contains("noad") { cfg.attention_probs_dropout_prob = 0.0; }
    let mut wvs = nn::VarStore::new(Device::Cpu);
    let encoder = BertModel::new(&wvs.root(), &cfg, true);
    wvs.load(format!("{dir}/model.safetensors")).unwrap();
    wvs.freeze();
    tch::set_num_threads(2);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = PromptSeqCls {
        prompt: PromptTuning::new(&vs.root(), 20, &PromptInit::Random, base.encoder.word_embeddings()),
        head: ClassificationHead::new(&vs.root(), 384, 2, 0.02, 0.1),
    };
    // 32 examples, lengths like SST-2 (mean 13, max 40)
    let lens: Vec<i64> = (0..32).map(|i| 5 + (i * 7) % 36).collect();
    let maxl = *lens.iter().max().unwrap();
    let ids = Tensor::randint(29000, [32, maxl], (Kind::Int64, Device::Cpu)) + 1000;
    let mask = Tensor::from_slice(&lens.iter().flat_map(|&l| (0..maxl).map(move |j| (j < l) as i64)).collect::<Vec<_>>()).view([32, maxl]);
    let labels = Tensor::from_slice(&(0..32).map(|i| i % 2).collect::<Vec<i64>>());
    let real: i64 = lens.iter().sum::<i64>() + 32 * 20;
    println!("real tokens {real}, padded {}", 32 * (maxl + 20));
    for train in [true, false] {
        for _ in 0..2 {
            let t0 = Instant::now();
            let loss = model.logits(&encoder, &ids, &mask, train).cross_entropy_for_logits(&labels);
            let _ = f64::try_from(&loss).unwrap();
            let t1 = Instant::now();
            loss.backward();
            let t2 = Instant::now();
            println!("{mode} train={train} fwd {:.3} bwd {:.3}", (t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
        }
        let t0 = Instant::now();
        let _ = tch::no_grad(|| model.logits(&encoder, &ids, &mask, train));
        println!("{mode} train={train} no_grad fwd {:.3}", t0.elapsed().as_secs_f64());
    }
    // matmul throughput
    let a = Tensor::randn([1066, 384], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([1536, 384], (Kind::Float, Device::Cpu));
    let _ = a.matmul(&w.tr());
    let t0 = Instant::now();
    for _ in 0..20 { let _ = a.linear::<Tensor>(&w, None); }
    let dt = t0.elapsed().as_secs_f64() / 20.0;
    println!("linear 1066x384x1536: {:.4}s = {:.1} GFLOP/s", dt, 2.0 * 1066.0 * 384.0 * 1536.0 / dt / 1e9);
}
