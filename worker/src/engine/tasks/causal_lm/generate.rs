//! Decoding by greedy search or beam search as Hugging Face `generate`
//! does (`num_beams`, `length_penalty`, `early_stopping = False`),
//! batch-wise, with the job's prompt and hooks applied.

use tch::{Device, Kind, Tensor};

use super::model::LmAdapter;
use crate::engine::models::decoder::{CausalDecoder, KvCache};

/// How to decode.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens generated per example (EOS included).
    pub max_new_tokens: usize,
    /// 1: greedy search; more: beam search with this many beams.
    pub num_beams: usize,
    /// Exponent of the generated length that divides a finished beam's
    /// log-probability (Hugging Face `length_penalty`, default 1.0).
    pub length_penalty: f64,
    /// Tokens that end a sequence; usually the model's `eos_token_ids()`.
    pub eos_token_ids: Vec<i64>,
    /// Id that fills the left padding of the prompts (masked out).
    pub pad_id: i64,
}

impl GenerationConfig {
    pub fn greedy(max_new_tokens: usize, eos_token_ids: Vec<i64>, pad_id: i64) -> Self {
        Self { max_new_tokens, num_beams: 1, length_penalty: 1.0, eos_token_ids, pad_id }
    }
}

/// Generated token ids for each prompt (token ids, special tokens
/// included, not padded), without the prompt and without the final EOS.
/// Prompts are left-padded into one batch, as Hugging Face decodes
/// decoder-only models; positions follow the real tokens.
pub fn generate(
    model: &dyn CausalDecoder,
    adapter: &LmAdapter<'_>,
    prompts: &[Vec<i64>],
    config: &GenerationConfig,
    device: Device,
) -> Vec<Vec<i64>> {
    if prompts.is_empty() || config.max_new_tokens == 0 {
        return vec![Vec::new(); prompts.len()];
    }
    tch::no_grad(|| {
        let (ids, mask) = left_padded(prompts, config.pad_id, device);
        if config.num_beams <= 1 {
            greedy_search(model, adapter, &ids, &mask, config)
        } else {
            beam_search(model, adapter, &ids, &mask, config)
        }
    })
}

/// `[batch, longest]` ids and mask, padding on the left.
fn left_padded(prompts: &[Vec<i64>], pad_id: i64, device: Device) -> (Tensor, Tensor) {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * longest);
    let mut mask = Vec::with_capacity(prompts.len() * longest);
    for prompt in prompts {
        let padding = longest - prompt.len();
        ids.extend(std::iter::repeat_n(pad_id, padding));
        ids.extend_from_slice(prompt);
        mask.extend(std::iter::repeat_n(0i64, padding));
        mask.extend(std::iter::repeat_n(1i64, prompt.len()));
    }
    let shape = [prompts.len() as i64, longest as i64];
    (Tensor::from_slice(&ids).view(shape).to_device(device), Tensor::from_slice(&mask).view(shape).to_device(device))
}

/// Runs the prompts and returns `[batch, vocab]` float32 logits of the next
/// token and the cache.
fn prefill(model: &dyn CausalDecoder, adapter: &LmAdapter<'_>, ids: &Tensor, mask: &Tensor) -> (Tensor, KvCache) {
    let (embeds, mask) = adapter.prepend(model.embed_ids(ids), mask);
    let (hidden, cache) = model.forward_with_cache(&embeds, &mask, adapter.hooks, None, false);
    (last_logits(model, &hidden), cache)
}

/// Feeds one new token per row (`[rows]` ids) after `cache`.
fn step(model: &dyn CausalDecoder, adapter: &LmAdapter<'_>, tokens: &Tensor, cache: &KvCache) -> (Tensor, KvCache) {
    let rows = tokens.size()[0];
    let embeds = model.embed_ids(&tokens.view([rows, 1]));
    let mask = Tensor::ones([rows, 1], (Kind::Int64, tokens.device()));
    let (hidden, cache) = model.forward_with_cache(&embeds, &mask, adapter.hooks, Some(cache), false);
    (last_logits(model, &hidden), cache)
}

fn last_logits(model: &dyn CausalDecoder, hidden: &Tensor) -> Tensor {
    let seq = hidden.size()[1];
    model.logits(&hidden.select(1, seq - 1)).to_kind(Kind::Float)
}

fn greedy_search(
    model: &dyn CausalDecoder,
    adapter: &LmAdapter<'_>,
    ids: &Tensor,
    mask: &Tensor,
    config: &GenerationConfig,
) -> Vec<Vec<i64>> {
    let batch = ids.size()[0] as usize;
    let (mut logits, mut cache) = prefill(model, adapter, ids, mask);
    let mut outputs = vec![Vec::new(); batch];
    let mut finished = vec![false; batch];
    for generated in 1..=config.max_new_tokens {
        crate::engine::liveness::beat();
        let next = logits.argmax(-1, false);
        let tokens = Vec::<i64>::try_from(&next).expect("token ids");
        for (i, &token) in tokens.iter().enumerate() {
            if finished[i] {
                continue;
            }
            if config.eos_token_ids.contains(&token) {
                finished[i] = true;
            } else {
                outputs[i].push(token);
            }
        }
        if generated == config.max_new_tokens || finished.iter().all(|&f| f) {
            break;
        }
        // Finished rows keep decoding (their tokens are dropped), so that
        // per-row hooks still see the batch they were built for.
        (logits, cache) = step(model, adapter, &next, &cache);
    }
    outputs
}

/// Beam search as Hugging Face's vectorised `_beam_search` with
/// `do_sample = False`, `early_stopping = False`: every step keeps the
/// `max(2, 1 + eos) * beams` best continuations, finished ones (EOS or the
/// length limit) enter a pool scored by `logprob / generated_len^length_penalty`,
/// and the search ends when no running beam can beat the pool's worst.
fn beam_search(
    model: &dyn CausalDecoder,
    adapter: &LmAdapter<'_>,
    ids: &Tensor,
    mask: &Tensor,
    config: &GenerationConfig,
) -> Vec<Vec<i64>> {
    const NEG: f64 = -1.0e9;
    let device = ids.device();
    let batch = ids.size()[0];
    let beams = config.num_beams as i64;
    let max_new = config.max_new_tokens as i64;
    let keep = (2.max(1 + config.eos_token_ids.len()) as i64) * beams;
    let eos = Tensor::from_slice(&config.eos_token_ids).to_device(device);
    let float = (Kind::Float, device);

    // Every beam of an example starts from the example's prompt.
    let (logits, cache) = prefill(model, adapter, ids, mask);
    let expand = Tensor::arange(batch, (Kind::Int64, device)).repeat_interleave_self_int(beams, 0, None);
    let mut logits = logits.index_select(0, &expand);
    let mut cache = cache.select(&expand);

    let fill = config.eos_token_ids.first().copied().unwrap_or(config.pad_id);
    // [batch, beams, max_new] generated tokens of the running and finished beams
    let mut running = Tensor::full([batch, beams, max_new], fill, (Kind::Int64, device));
    let mut finished = running.copy();
    let mut running_scores = Tensor::zeros([batch, beams], float);
    let _ = running_scores.narrow(1, 1, beams - 1).fill_(NEG);
    let mut finished_scores = Tensor::full([batch, beams], NEG, float);
    let mut is_finished = Tensor::zeros([batch, beams], (Kind::Bool, device));
    let mut improvable = Tensor::ones([batch, 1], (Kind::Bool, device));
    let top_beams = Tensor::arange(keep, (Kind::Int64, device)).lt(beams);
    let batch_offset = (Tensor::arange(batch, (Kind::Int64, device)) * beams).unsqueeze(1);
    let mut generated = 0i64;

    loop {
        crate::engine::liveness::beat();
        let vocab = logits.size()[1];
        // [batch, beams * vocab] accumulated log-probabilities
        let log_probs = (logits.log_softmax(-1, Kind::Float).view([batch, beams, vocab]) + running_scores.unsqueeze(2))
            .view([batch, beams * vocab]);
        let (topk_scores, topk_indices) = log_probs.topk(keep, 1, true, true);
        let source_beams = topk_indices.divide_scalar_mode(vocab, "floor");
        let tokens = topk_indices.remainder(vocab);
        // [batch, keep, max_new]
        let candidates = gather_beams(&running, &source_beams);
        let _ = candidates.select(2, generated).copy_(&tokens);
        let hits_eos = if config.eos_token_ids.is_empty() {
            Tensor::zeros([batch, keep], (Kind::Bool, device))
        } else {
            tokens.unsqueeze(2).eq_tensor(&eos.view([1, 1, -1])).any_dim(2, false)
        };
        let stops = if generated + 1 >= max_new { Tensor::ones_like(&hits_eos) } else { hits_eos };

        // The best candidates that go on.
        let running_candidates = &topk_scores + stops.to_kind(Kind::Float) * NEG;
        let next = running_candidates.topk(beams, 1, true, true).1;
        running = gather_beams(&candidates, &next);
        running_scores = running_candidates.gather(1, &next, false);
        let running_sources = source_beams.gather(1, &next, false);

        // Candidates that just finished, among the top `beams`, join the pool.
        let just_finished = stops.logical_and(&top_beams.unsqueeze(0));
        let mut scores = &topk_scores / ((generated + 1) as f64).powf(config.length_penalty);
        scores += improvable.logical_not().to_kind(Kind::Float) * NEG;
        scores += just_finished.logical_not().to_kind(Kind::Float) * NEG;
        let merged_scores = Tensor::cat(&[&finished_scores, &scores], 1);
        let best = merged_scores.topk(beams, 1, true, true).1;
        finished = gather_beams(&Tensor::cat(&[&finished, &candidates], 1), &best);
        finished_scores = merged_scores.gather(1, &best, false);
        is_finished = Tensor::cat(&[&is_finished, &just_finished], 1).gather(1, &best, false);

        generated += 1;
        let best_running = running_scores.narrow(1, 0, 1) / (generated as f64).powf(config.length_penalty);
        let worst_finished = finished_scores.amin(1, true).expand([batch, beams], false).where_self(
            &is_finished,
            &Tensor::full([batch, beams], NEG, float),
        );
        improvable = improvable.logical_and(&best_running.gt_tensor(&worst_finished).any_dim(1, true));
        let any_improvable = bool::try_from(improvable.any()).expect("a flag");
        let all_stopped = bool::try_from(stops.all()).expect("a flag");
        if !any_improvable || all_stopped {
            break;
        }
        // Follow the kept beams and feed their last tokens.
        let rows = (running_sources + &batch_offset).view([-1]);
        cache = cache.select(&rows);
        let last = running.select(2, generated - 1).reshape([-1]);
        (logits, cache) = step(model, adapter, &last, &cache);
    }

    let best = finished.select(1, 0);
    (0..batch)
        .map(|b| {
            let tokens = Vec::<i64>::try_from(best.get(b).narrow(0, 0, generated)).expect("token ids");
            tokens.into_iter().take_while(|t| !config.eos_token_ids.contains(t)).collect()
        })
        .collect()
}

/// `[batch, beams, ...]` rows picked per example by `indices` `[batch, k]`.
fn gather_beams(xs: &Tensor, indices: &Tensor) -> Tensor {
    let mut shape = indices.size();
    shape.extend_from_slice(&xs.size()[2..]);
    let mut index = indices.shallow_clone();
    for _ in 2..xs.dim() {
        index = index.unsqueeze(-1);
    }
    xs.gather(1, &index.expand(shape.as_slice(), false), false)
}
