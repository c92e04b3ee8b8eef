//! Causal language modelling on a frozen decoder: the training loss over
//! target tokens only, as Hugging Face `*ForCausalLM` computes it (labels
//! -100 over source, prompt and padding; position `t` predicts label
//! `t + 1`), and decoding by greedy search or beam search as Hugging Face
//! `generate` does (`num_beams`, `length_penalty`, `early_stopping = False`),
//! batch-wise, with the job's prompt and hooks applied.

use tch::{Device, Kind, Reduction, Tensor};

use super::bleu::corpus_bleu;
use crate::engine::data::batch::pad_labelled_rows;
use crate::engine::data::seq2seq::{LmExample, LmTokenizer, Seq2SeqFormat, SourceReferences};
use crate::engine::models::decoder::{expand_rows, CausalDecoder, KvCache, PassLayout, Span};
use crate::engine::models::hooks::{Hooks, NoHooks};
use crate::engine::rng::{with_stream, DropoutStream};
use crate::engine::EngineError;

/// Label value that the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// What one job adds to the shared frozen decoder.
#[derive(Clone, Copy)]
pub struct LmAdapter<'a> {
    /// Prompt embeddings prepended to every example's input embeddings
    /// (prompt tuning, P-tuning v1): `[virtual_tokens, hidden]`, or
    /// `[batch, virtual_tokens, hidden]` with a prompt per example.
    pub prompt: Option<&'a Tensor>,
    /// Per-layer key/value prefixes and linear deltas.
    pub hooks: &'a dyn Hooks,
}

impl LmAdapter<'static> {
    /// The plain base model.
    pub fn none() -> Self {
        LmAdapter { prompt: None, hooks: &NoHooks }
    }
}

impl<'a> LmAdapter<'a> {
    /// Virtual tokens the prompt adds in front of each example.
    pub fn prompt_len(&self) -> i64 {
        self.prompt.map_or(0, |prompt| prompt.size()[prompt.dim() - 2])
    }

    /// Input embeddings and mask with the prompt in front (mask ones over it).
    fn prepend(&self, embeds: Tensor, attention_mask: &Tensor) -> (Tensor, Tensor) {
        let Some(prompt) = self.prompt else {
            return (embeds, attention_mask.shallow_clone());
        };
        let batch = embeds.size()[0];
        let prompt = match prompt.dim() {
            2 => prompt.unsqueeze(0).expand([batch, -1, -1], false),
            _ => prompt.shallow_clone(),
        };
        let nvt = prompt.size()[1];
        let ones = Tensor::ones([batch, nvt], (attention_mask.kind(), attention_mask.device()));
        (Tensor::cat(&[prompt.to_kind(embeds.kind()), embeds], 1), Tensor::cat(&[ones, attention_mask.shallow_clone()], 1))
    }
}

/// A right-padded training or evaluation batch.
pub struct LmBatch {
    /// `[batch, longest]` token ids, `pad_id` after each example's end.
    pub input_ids: Tensor,
    /// `[batch, longest]` 1 at real tokens, 0 at padding.
    pub attention_mask: Tensor,
    /// `[batch, longest]` target ids, [`IGNORE_INDEX`] where nothing is predicted.
    pub labels: Tensor,
    pub len: usize,
}

impl LmBatch {
    pub fn collate(examples: &[LmExample], indices: &[usize], pad_id: i64, device: Device) -> Self {
        let rows: Vec<(&[i64], &[i64])> =
            indices.iter().map(|&i| (examples[i].ids.as_slice(), examples[i].labels.as_slice())).collect();
        let (input_ids, attention_mask, labels) = pad_labelled_rows(&rows, pad_id, device);
        Self { input_ids, attention_mask, labels, len: indices.len() }
    }
}

/// Last hidden states `[batch, prompt + seq, hidden]` of `[batch, seq]` ids
/// with the adapter's prompt in front and its hooks applied.
pub fn hidden_states(
    model: &dyn CausalDecoder,
    adapter: &LmAdapter<'_>,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    train: bool,
) -> Tensor {
    let (embeds, mask) = adapter.prepend(model.embed_ids(input_ids), attention_mask);
    model.forward(&embeds, &mask, adapter.hooks, train)
}

/// `[batch, prompt + seq, vocab]` next-token logits, as `PeftModelForCausalLM`
/// returns them (the prompt's positions included).
pub fn logits(
    model: &dyn CausalDecoder,
    adapter: &LmAdapter<'_>,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    train: bool,
) -> Tensor {
    model.logits(&hidden_states(model, adapter, input_ids, attention_mask, train))
}

/// Sum of the token cross-entropies and the number of target tokens, with
/// Hugging Face's shift: the hidden state at `t` (`[batch, seq, hidden]`)
/// predicts `labels[t + 1]` (`[batch, seq]`). The head runs on target
/// positions only.
pub fn shifted_loss_sum(model: &dyn CausalDecoder, hidden: &Tensor, labels: &Tensor) -> (Tensor, i64) {
    let (_, seq, width) = hidden.size3().expect("hidden states are [batch, seq, hidden]");
    if seq < 2 {
        return (hidden.sum(Kind::Float) * 0.0, 0);
    }
    let targets = labels.narrow(1, 1, seq - 1).reshape([-1]);
    let rows = targets.ne(IGNORE_INDEX).nonzero().squeeze_dim(1);
    let count = rows.size()[0];
    if count == 0 {
        return (hidden.sum(Kind::Float) * 0.0, 0);
    }
    let predicting = hidden.narrow(1, 0, seq - 1).reshape([-1, width]).index_select(0, &rows);
    let logits = model.logits(&predicting).to_kind(Kind::Float);
    let loss = logits.cross_entropy_loss::<Tensor>(&targets.index_select(0, &rows), None, Reduction::Sum, IGNORE_INDEX, 0.0);
    (loss, count)
}

/// Loss sum and target count of a batch: the labels get -100 over the
/// prompt's positions, as PEFT gives them.
fn batch_loss_sum(model: &dyn CausalDecoder, adapter: &LmAdapter<'_>, batch: &LmBatch, train: bool) -> (Tensor, i64) {
    let hidden = hidden_states(model, adapter, &batch.input_ids, &batch.attention_mask, train);
    shifted_loss_sum(model, &hidden, &prompt_labels(adapter, batch))
}

/// The batch's labels with -100 over the prompt's positions, as PEFT gives them.
fn prompt_labels(adapter: &LmAdapter<'_>, batch: &LmBatch) -> Tensor {
    let nvt = adapter.prompt_len();
    if nvt == 0 {
        return batch.labels.shallow_clone();
    }
    let ignored = Tensor::full([batch.labels.size()[0], nvt], IGNORE_INDEX, (Kind::Int64, batch.labels.device()));
    Tensor::cat(&[ignored, batch.labels.shallow_clone()], 1)
}

/// One job's batch in a training pass that several jobs share.
pub struct LmMember<'a> {
    pub adapter: LmAdapter<'a>,
    pub batch: &'a LmBatch,
    /// The job's dropout stream; `None` draws from the generator as it stands.
    pub stream: Option<&'a DropoutStream>,
}

impl LmMember<'_> {
    /// Length of the job's key/value prefix (0 without one).
    fn prefix_len(&self) -> i64 {
        self.adapter.hooks.prefix(0).map_or(0, |(key, _)| key.size()[2])
    }
}

/// Every member's prefixes in one pass: each expanded to its member's rows
/// and padded on the left to the longest (the pass's layout masks the
/// padding); and each member's linear deltas (LoRA) on its own rows and
/// positions, drawn with its own stream, zero over the pass's padding.
struct PackedHooks<'a> {
    members: &'a [LmMember<'a>],
    spans: &'a [Span],
    prefix_len: i64,
}

impl Hooks for PackedHooks<'_> {
    fn prefix(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let prefixes: Vec<Option<(Tensor, Tensor)>> = self
            .members
            .iter()
            .zip(self.spans)
            .map(|(member, span)| {
                member.adapter.hooks.prefix(layer).map(|(key, value)| (expand_rows(&key, span.rows), expand_rows(&value, span.rows)))
            })
            .collect();
        let (key, _) = prefixes.iter().flatten().next()?;
        let (_, heads, _, head_dim) = key.size4().expect("prefixes are [batch, heads, len, head_dim]");
        let (kind, device) = (key.kind(), key.device());
        let (keys, values): (Vec<Tensor>, Vec<Tensor>) = prefixes
            .into_iter()
            .zip(self.spans)
            .map(|(prefix, span)| match prefix {
                Some((key, value)) => {
                    let pad = [0, 0, self.prefix_len - key.size()[2], 0];
                    (key.constant_pad_nd(pad), value.constant_pad_nd(pad))
                }
                None => {
                    let zeros = || Tensor::zeros([span.rows, heads, self.prefix_len, head_dim], (kind, device));
                    (zeros(), zeros())
                }
            })
            .unzip();
        Some((Tensor::cat(&keys, 0), Tensor::cat(&values, 0)))
    }

    fn has_linear_deltas(&self) -> bool {
        self.members.iter().any(|member| member.adapter.hooks.has_linear_deltas())
    }

    fn linear_delta(&self, layer: usize, module: &str, xs: &Tensor) -> Option<Tensor> {
        // Each member sees its batch alone: its rows, up to its own longest
        // position, so that its dropout draws the masks it draws alone.
        if !self.has_linear_deltas() {
            return None;
        }
        let longest = xs.size()[1];
        let deltas: Vec<Option<Tensor>> = self
            .members
            .iter()
            .zip(self.spans)
            .map(|(member, span)| {
                if !member.adapter.hooks.has_linear_deltas() {
                    return None;
                }
                let own = xs.narrow(0, span.offset, span.rows).narrow(1, 0, span.seq);
                with_stream(member.stream, || member.adapter.hooks.linear_delta(layer, module, &own))
                    .map(|delta| delta.constant_pad_nd([0, 0, 0, longest - span.seq]))
            })
            .collect();
        let width = deltas.iter().flatten().next()?.size()[2];
        let deltas: Vec<Tensor> = deltas
            .into_iter()
            .zip(self.spans)
            .map(|(delta, span)| {
                delta.unwrap_or_else(|| Tensor::zeros([span.rows, longest, width], (xs.kind(), xs.device())))
            })
            .collect();
        Some(Tensor::cat(&deltas, 0))
    }
}

/// Each member's mean training loss from one forward pass through the
/// shared frozen decoder: the members' batches (their prompts in front) are
/// stacked and padded on the right to the longest, their prefixes padded on
/// the left, and each member's dropout comes from its own stream over its
/// own batch's shape. A member's loss is the one [`train_loss`] gives for
/// its batch alone with the same stream (up to float rounding).
pub fn packed_train_losses(model: &dyn CausalDecoder, members: &[LmMember<'_>], train: bool) -> Vec<Tensor> {
    // Each member's input embeddings and mask, its prompt (drawn already,
    // with the member's stream) in front.
    let inputs: Vec<(Tensor, Tensor)> = members
        .iter()
        .map(|m| m.adapter.prepend(model.embed_ids(&m.batch.input_ids), &m.batch.attention_mask))
        .collect();
    let longest = inputs.iter().map(|(embeds, _)| embeds.size()[1]).max().expect("a pass has members");
    let mut offset = 0;
    let spans: Vec<Span> = members
        .iter()
        .zip(&inputs)
        .map(|(member, (embeds, _))| {
            let rows = embeds.size()[0];
            let span = Span {
                offset,
                rows,
                seq: embeds.size()[1],
                past: member.prefix_len(),
                stream: member.stream.cloned(),
            };
            offset += rows;
            span
        })
        .collect();
    let (embeds, masks): (Vec<Tensor>, Vec<Tensor>) = inputs
        .into_iter()
        .map(|(embeds, mask)| {
            let pad = longest - embeds.size()[1];
            (embeds.constant_pad_nd([0, 0, 0, pad]), mask.constant_pad_nd([0, pad]))
        })
        .unzip();
    let prefix_len = spans.iter().map(|span| span.past).max().unwrap_or(0);
    let layout = PassLayout { spans };
    let hooks = PackedHooks { members, spans: &layout.spans, prefix_len };
    let (embeds, mask) = (Tensor::cat(&embeds, 0), Tensor::cat(&masks, 0));
    let hidden = model.forward_pass(&embeds, &mask, &hooks, None, &layout, train).0;
    members
        .iter()
        .zip(&layout.spans)
        .map(|(member, span)| {
            let own = hidden.narrow(0, span.offset, span.rows).narrow(1, 0, span.seq);
            let (sum, count) = shifted_loss_sum(model, &own, &prompt_labels(&member.adapter, member.batch));
            sum / count.max(1) as f64
        })
        .collect()
}

/// Mean cross-entropy over the batch's target tokens: the loss of Hugging
/// Face's `*ForCausalLM` (and of `PeftModelForCausalLM` with a prompt) for
/// the same labels.
pub fn train_loss(model: &dyn CausalDecoder, adapter: &LmAdapter<'_>, batch: &LmBatch, train: bool) -> Tensor {
    let (sum, count) = batch_loss_sum(model, adapter, batch, train);
    sum / count.max(1) as f64
}

/// Token-weighted mean loss over `examples` in eval mode, without gradients.
pub fn evaluate_loss(
    model: &dyn CausalDecoder,
    adapter: &LmAdapter<'_>,
    examples: &[LmExample],
    batch_size: usize,
    pad_id: i64,
    device: Device,
) -> f64 {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].ids.len()));
    tch::no_grad(|| {
        let (mut sum, mut count) = (0.0, 0i64);
        for indices in order.chunks(batch_size.max(1)) {
            crate::engine::liveness::beat();
            let batch = LmBatch::collate(examples, indices, pad_id, device);
            let (loss, n) = batch_loss_sum(model, adapter, &batch, false);
            sum += f64::try_from(loss).expect("a scalar loss");
            count += n;
        }
        if count == 0 {
            0.0
        } else {
            sum / count as f64
        }
    })
}

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

/// Generated texts and their corpus BLEU.
#[derive(Clone, Debug, PartialEq)]
pub struct BleuEvaluation {
    /// Corpus BLEU (0 to 100) against every input's references.
    pub bleu: f64,
    /// Decoded output of each input, in input order.
    pub hypotheses: Vec<String>,
}

/// Decodes every input's `source + separator` prompt (at most
/// `format.max_len` tokens) in batches of
/// `batch_size` (inputs of similar length together) and scores the texts
/// with corpus BLEU against the references.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_bleu(
    model: &dyn CausalDecoder,
    adapter: &LmAdapter<'_>,
    tokenizer: &LmTokenizer,
    format: &Seq2SeqFormat,
    inputs: &[SourceReferences],
    batch_size: usize,
    config: &GenerationConfig,
    device: Device,
) -> Result<BleuEvaluation, EngineError> {
    // A prompt longer than the format's limit keeps its first tokens, as a
    // training example does.
    let prompts = inputs
        .iter()
        .map(|input| {
            let mut ids = format.prompt_ids(tokenizer, &input.source)?;
            ids.truncate(format.max_len);
            Ok(ids)
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut hypotheses = vec![String::new(); inputs.len()];
    for indices in order.chunks(batch_size.max(1)) {
        let batch: Vec<Vec<i64>> = indices.iter().map(|&i| prompts[i].clone()).collect();
        for (&i, tokens) in indices.iter().zip(generate(model, adapter, &batch, config, device)) {
            hypotheses[i] = tokenizer.decode(&tokens)?;
        }
    }
    let references: Vec<Vec<String>> = inputs.iter().map(|input| input.references.clone()).collect();
    Ok(BleuEvaluation { bleu: corpus_bleu(&hypotheses, &references), hypotheses })
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
