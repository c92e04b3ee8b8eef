//! How much memory a job needs on a worker, estimated from its spec and the
//! shape of its base model, so that the scheduler can leave a job to a
//! worker that has room for it and say when no worker ever will.
//!
//! Everything is float32 (4 bytes per number) except, with
//! `training.precision` bf16 or fp16, the frozen base and the activations
//! flowing through it (2 bytes per number, `P` below). The estimate has
//! three parts:
//!
//! - **weights**: the frozen base model, `parameters * P`. A worker holds one
//!   copy per model and precision whatever the number of jobs on it.
//! - **job**: the job's trainable parameters times 4 bytes times 4 copies:
//!   the weights, their gradients and AdamW's two moments. Full fine-tuning
//!   trains a copy of the whole model; the other methods train their prompt,
//!   prefixes, prompt encoder or low-rank updates. Classification jobs add
//!   their head (`hidden * labels + labels`).
//! - **activations**: what one training step keeps for the backward pass,
//!   `batch * S * layers * (P * 18 * hidden + 4 * 3 * heads * S)` bytes, with `S`
//!   the longest sequence a step sees (`max_seq_len`, plus the virtual
//!   tokens, plus `generation.max_new_tokens` for causal LM). Per token and
//!   layer, autograd keeps (after Korthikanti et al. 2022, section 4.1,
//!   <https://arxiv.org/abs/2205.05198>, counted in float32 numbers with
//!   dropout masks kept as float32 noise, as libtorch does on the CPU):
//!   - attention, `7 * hidden`: the layer's input, queries and keys, values,
//!     the context entering the output projection, its dropout noise, and
//!     the LayerNorm's input;
//!   - attention scores, `3 * heads * S`: the softmax output, its dropout
//!     noise and the dropped probabilities (float32 in every precision: the
//!     engine computes the softmax in float32);
//!   - feed-forward, `11 * hidden` (an intermediate of `4 * hidden`): its
//!     input, the intermediate before and after the activation, the dropout
//!     noise and the LayerNorm's input.
//!
//! - LoRA adds, per token and layer, the input and output sizes of every
//!   target linear: the input its `A` needs for its gradient, and the
//!   low-rank path's output beside the frozen one's (float32: the low-rank
//!   path computes in the precision of its parameters).
//! - Full fine-tuning adds two temporaries of the size of its largest
//!   trainable tensor, the embedding tables (what the layers' `12 *
//!   hidden^2` weights leave of the parameters): the fresh gradient the
//!   backward pass computes before adding it to the kept one, and the one
//!   temporary AdamW's in-place step works through.
//!
//! - **evaluation**: an evaluation runs without gradients, one batch of
//!   [`JobSpec::eval_batch_size`] examples at a time (at least 64, however
//!   small the training batch; no more than `max_eval_examples`), so what
//!   it needs does not grow with the layers: measured on MiniLM, about
//!   `eval_batch * S * (P * 20 * hidden + 4 * heads * S)` bytes above the
//!   process's footprint, a layer's working set and the free memory the
//!   allocator keeps around it. The activation part of the estimate is the
//!   larger of a training step's and an evaluation batch's, which never
//!   coincide; the evaluation's is the larger for small training batches
//!   (up to 8 at 64 tokens on MiniLM).
//!
//! Encoders pack real tokens without padding, so shorter examples need less.
//! The estimate leaves out the process's own footprint (the libtorch
//! runtime, the tokenizer, the datasets) and, for causal LM, the logits over
//! the vocabulary. That footprint is about 230 MiB with MiniLM loaded, 87
//! of it the weights the estimate counts, and 645 MiB with the 56M-parameter
//! Llama-shaped decoder of the benchmarks; loading a model peaks about 145
//! MiB higher for MiniLM (its weights file is read while the tensors are
//! copied). A worker's `--memory-mib` is what training may use on top of
//! it. The datasets the process keeps are token ids, 8 bytes a token: 2 MiB
//! for 4,000 examples of 64 tokens. Against measured peaks (`docs/benchmarks.md`, "Memory
//! estimate against measured peak") it is 3-11% above what training adds
//! for the larger MiniLM jobs of the methods that train nothing inside the
//! model (up to 29% above on a Llama-shaped decoder, whose gated MLP is
//! narrower than the 4 hidden sizes counted), and 8-16% below it for LoRA
//! and full fine-tuning; the process's own run-to-run spread (about 40 MiB)
//! bounds the precision of small jobs.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model_types::ModelFamily;
use crate::spec::{EncoderType, JobSpec, Method, Task};

/// Bytes of one float32.
const FLOAT: u64 = 4;
/// Copies of every trainable number: weights, gradients, AdamW's two moments.
const TRAINABLE_COPIES: u64 = 4;
/// Float32 numbers kept per token and layer, in hidden sizes (see the module docs).
const HIDDEN_ACTIVATIONS: u64 = 18;
/// Float32 numbers kept per attention score (see the module docs).
const SCORE_ACTIVATIONS: u64 = 3;

/// Bytes per token of an evaluation batch, in hidden sizes of the base's
/// precision, and float32 numbers per attention score (see the module docs).
const EVAL_HIDDEN_ACTIVATIONS: u64 = 20;
const EVAL_SCORE_ACTIVATIONS: u64 = 1;

/// Temporaries of the largest trainable tensor alive at a step's peak: the
/// backward's fresh gradient and the optimizer step's (see the module docs).
const TENSOR_TEMPORARIES: u64 = 2;

/// What the estimate needs to know of a base model: what workers report of
/// it when they register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub parameters: u64,
    pub hidden_size: u32,
    pub num_layers: u32,
    pub num_attention_heads: u32,
    /// Which linears a layer has, for LoRA's targets.
    #[serde(default)]
    pub family: ModelFamily,
}

impl ModelShape {
    /// A shape with every number known; workers that could not inspect a
    /// model report zeros.
    pub fn is_known(&self) -> bool {
        self.parameters > 0 && self.hidden_size > 0 && self.num_layers > 0 && self.num_attention_heads > 0
    }
}

/// The memory a job needs on a worker, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// The frozen base model (shared by every job on it).
    pub weights_bytes: u64,
    /// The job's trainable parameters, gradients and optimizer moments.
    pub job_bytes: u64,
    /// What one training step keeps for the backward pass, or one
    /// evaluation batch needs when that is more.
    pub activation_bytes: u64,
}

impl MemoryEstimate {
    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes.saturating_add(self.job_bytes).saturating_add(self.activation_bytes)
    }
}

/// `about 5,120 MiB (weights 420, job 80, activations 4,620)`.
impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "about {} MiB (weights {}, job {}, activations {})",
            mib(self.total_bytes()),
            mib(self.weights_bytes),
            mib(self.job_bytes),
            mib(self.activation_bytes)
        )
    }
}

/// The memory `spec` needs on a base model of shape `model`.
pub fn estimate(spec: &JobSpec, model: &ModelShape) -> MemoryEstimate {
    let trainable = trainable_parameters(spec, model);
    MemoryEstimate {
        weights_bytes: model.parameters.saturating_mul(spec.training.precision.bytes()),
        job_bytes: trainable.saturating_mul(FLOAT * TRAINABLE_COPIES),
        activation_bytes: activation_bytes(spec, model),
    }
}

/// Numbers the job trains: its method's parameters and its head.
pub fn trainable_parameters(spec: &JobSpec, model: &ModelShape) -> u64 {
    let h = u64::from(model.hidden_size);
    let layers = u64::from(model.num_layers);
    let nvt = u64::from(spec.peft.num_virtual_tokens);
    let peft = &spec.peft;
    let linear = |inputs: u64, outputs: u64| inputs * outputs + outputs;
    let method = match spec.method {
        Method::PromptTuning => nvt * h,
        Method::PTuning => {
            let e = u64::from(peft.encoder_hidden_size_for(model.hidden_size));
            let encoder = match peft.encoder_type() {
                EncoderType::Mlp => linear(h, e) + linear(e, e) + linear(e, h),
                EncoderType::Lstm => {
                    // A bidirectional LSTM (per layer and direction: input and
                    // hidden weights of four gates, two biases), then two linears.
                    let lstm: u64 = (0..u64::from(peft.encoder_num_layers()))
                        .map(|layer| {
                            let input = if layer == 0 { h } else { 2 * e };
                            2 * (4 * e * input + 4 * e * e + 8 * e)
                        })
                        .sum();
                    lstm + linear(2 * e, 2 * e) + linear(2 * e, h)
                }
            };
            nvt * h + encoder
        }
        Method::PrefixTuning if peft.prefix_projection() => {
            let e = u64::from(peft.encoder_hidden_size_for(model.hidden_size));
            nvt * h + linear(h, e) + linear(e, layers * 2 * h)
        }
        Method::PrefixTuning | Method::PTuningV2 => nvt * layers * 2 * h,
        Method::Lora => {
            let per_layer: u64 = lora_modules(spec, model.family).iter().map(|&(inputs, outputs)| inputs + outputs).sum();
            u64::from(peft.lora_r()) * per_layer * h * layers
        }
        Method::Full => model.parameters,
    };
    let head = match spec.task {
        Task::SequenceClassification | Task::TokenClassification => linear(h, spec.data.labels.len() as u64),
        Task::CausalLm => 0,
    };
    method + head
}

/// The (input, output) sizes, in hidden sizes, of every linear of a layer
/// that gets a LoRA update (the family's default targets when the spec names
/// none), from the model-type table.
fn lora_modules(spec: &JobSpec, family: ModelFamily) -> Vec<(u64, u64)> {
    family.lora_linears(spec.peft.target_modules.as_deref()).iter().map(|l| (l.inputs, l.outputs)).collect()
}

/// What a method adds to one step's activations, in float32 numbers per token
/// and layer (see the module docs): LoRA, the input and output sizes of every
/// target linear.
fn method_activations(spec: &JobSpec, model: &ModelShape) -> u64 {
    match spec.method {
        Method::Lora => {
            let per_hidden: u64 = lora_modules(spec, model.family).iter().map(|&(inputs, outputs)| inputs + outputs).sum();
            per_hidden * u64::from(model.hidden_size)
        }
        _ => 0,
    }
}

/// The largest tensor the optimizer updates in one go, in numbers: for full
/// fine-tuning the embedding tables (what the layers' `12 * hidden^2`
/// weights leave of the model's parameters); soft prompts and low-rank
/// updates are small enough to leave out.
fn largest_trainable_tensor(spec: &JobSpec, model: &ModelShape) -> u64 {
    match spec.method {
        Method::Full => {
            let h = u64::from(model.hidden_size);
            model.parameters.saturating_sub(12 * h * h * u64::from(model.num_layers))
        }
        _ => 0,
    }
}

/// The longest sequence a step or an evaluation sees: `max_seq_len`, plus
/// the virtual tokens, plus the generated tokens for causal LM.
fn longest_sequence(spec: &JobSpec) -> u64 {
    let mut seq = u64::from(spec.data.max_seq_len);
    if spec.method.uses_virtual_tokens() {
        seq += u64::from(spec.peft.num_virtual_tokens);
    }
    if spec.task == Task::CausalLm {
        seq += u64::from(spec.generation().max_new_tokens);
    }
    seq
}

/// What one training step keeps for the backward pass, plus the optimizer
/// step's temporary, or what one evaluation batch needs when that is more
/// (see the module docs).
fn activation_bytes(spec: &JobSpec, model: &ModelShape) -> u64 {
    training_activation_bytes(spec, model).max(evaluation_bytes(spec, model))
}

/// What one training step keeps for the backward pass, plus the optimizer
/// step's temporary.
fn training_activation_bytes(spec: &JobSpec, model: &ModelShape) -> u64 {
    let seq = longest_sequence(spec);
    let base = spec.training.precision.bytes();
    let per_token_layer = base * HIDDEN_ACTIVATIONS * u64::from(model.hidden_size)
        + FLOAT * (SCORE_ACTIVATIONS * u64::from(model.num_attention_heads) * seq + method_activations(spec, model));
    u64::from(spec.training.batch_size)
        .saturating_mul(seq)
        .saturating_mul(u64::from(model.num_layers))
        .saturating_mul(per_token_layer)
        .saturating_add(TENSOR_TEMPORARIES * FLOAT * largest_trainable_tensor(spec, model))
}

/// What one evaluation batch needs: the spec's evaluation batch size, or
/// `max_eval_examples` when fewer, of the longest sequences.
fn evaluation_bytes(spec: &JobSpec, model: &ModelShape) -> u64 {
    let seq = longest_sequence(spec);
    let mut batch = u64::from(spec.eval_batch_size());
    if spec.data.max_eval_examples > 0 {
        batch = batch.min(spec.data.max_eval_examples);
    }
    let per_token = spec.training.precision.bytes() * EVAL_HIDDEN_ACTIVATIONS * u64::from(model.hidden_size)
        + FLOAT * EVAL_SCORE_ACTIVATIONS * u64::from(model.num_attention_heads) * seq;
    batch.saturating_mul(seq).saturating_mul(per_token)
}

/// Bytes as whole MiB (rounded to the nearest) with thousands separators: `5,120`.
pub fn mib(bytes: u64) -> String {
    let whole = (bytes + (1 << 19)) >> 20;
    let digits = whole.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// all-MiniLM-L6-v2 as its worker reports it.
    const MINILM: ModelShape =
        ModelShape { parameters: 22_713_216, hidden_size: 384, num_layers: 6, num_attention_heads: 12, family: ModelFamily::Bert };

    fn spec(method: &str, peft: &str, batch: u32, seq: u32) -> JobSpec {
        JobSpec::from_toml(&format!(
            r#"
            name = "j"
            base_model = "all-MiniLM-L6-v2"
            task = "sequence_classification"
            method = "{method}"
            [peft]
            {peft}
            [data]
            train = "train.jsonl"
            eval = "eval.jsonl"
            labels = [0, 1]
            max_seq_len = {seq}
            [training]
            learning_rate = 3e-2
            batch_size = {batch}
            "#
        ))
        .unwrap()
    }

    const HEAD: u64 = 384 * 2 + 2;

    #[test]
    fn prompt_tuning_counts_the_prompt_the_head_and_the_longer_sequence() {
        let spec = spec("prompt_tuning", "num_virtual_tokens = 20", 8, 64);
        let estimate = estimate(&spec, &MINILM);
        assert_eq!(estimate.weights_bytes, 90_852_864);
        // 20 * 384 prompt numbers and the 770 of the head, 16 bytes each.
        assert_eq!(estimate.job_bytes, (7_680 + HEAD) * 16);
        // 8 sequences of 64 + 20 tokens, 6 layers, 4 * (18 * 384 + 3 * 12 * 84) bytes each.
        assert_eq!(training_activation_bytes(&spec, &MINILM), 8 * 84 * 6 * 4 * (6_912 + 3_024));
        assert_eq!(training_activation_bytes(&spec, &MINILM), 160_247_808);
        // An evaluation batch of 64 of them needs more.
        assert_eq!(estimate.activation_bytes, 186_826_752);
        assert_eq!(estimate.total_bytes(), 90_852_864 + 135_200 + 186_826_752);
        assert_eq!(estimate.to_string(), "about 265 MiB (weights 87, job 0, activations 178)");
    }

    #[test]
    fn an_evaluation_batch_larger_than_the_training_batch_can_need_the_most() {
        // Training batch 1: evaluations still take 64 examples at a time, 64
        // + 20 tokens each, 4 * (20 * 384 + 12 * 84) bytes per token.
        let one = spec("prompt_tuning", "num_virtual_tokens = 20", 1, 64);
        assert_eq!(estimate(&one, &MINILM).activation_bytes, 64 * 84 * 4 * (7_680 + 1_008));
        assert_eq!(estimate(&one, &MINILM).activation_bytes, 186_826_752);
        // A training step of 1 example keeps much less.
        assert_eq!(training_activation_bytes(&one, &MINILM), 84 * 6 * 4 * (6_912 + 3_024));
        // An evaluation of 16 examples never takes a larger batch.
        let mut few = one.clone();
        few.data.max_eval_examples = 16;
        assert_eq!(estimate(&few, &MINILM).activation_bytes, 16 * 84 * 4 * (7_680 + 1_008));
        // Batch 8 at 64 tokens (the benchmarks' smallest job): the evaluation's 178 MiB over the step's 153.
        let eight = spec("prompt_tuning", "num_virtual_tokens = 20", 8, 64);
        assert_eq!(estimate(&eight, &MINILM).activation_bytes, 186_826_752);
        assert_eq!(training_activation_bytes(&eight, &MINILM), 160_247_808);
        // Batch 32: the training step's, the evaluation taking 64 then.
        let demo = spec("prompt_tuning", "num_virtual_tokens = 20", 32, 64);
        assert_eq!(estimate(&demo, &MINILM).activation_bytes, 4 * 160_247_808);
    }

    #[test]
    fn bf16_and_fp16_count_the_frozen_weights_and_their_activations_at_two_bytes() {
        let fp32 = spec("prompt_tuning", "num_virtual_tokens = 20", 8, 64);
        for precision in [crate::spec::Precision::Bf16, crate::spec::Precision::Fp16] {
            let mut half = fp32.clone();
            half.training.precision = precision;
            let estimate = estimate(&half, &MINILM);
            assert_eq!(estimate.weights_bytes, 22_713_216 * 2);
            // The prompt, the head, their gradients and AdamW's moments stay float32.
            assert_eq!(estimate.job_bytes, super::estimate(&fp32, &MINILM).job_bytes);
            // 8 sequences of 84 tokens, 6 layers: 2 * 18 * 384 bytes of hidden
            // activations and 4 * 3 * 12 * 84 of float32 attention scores.
            assert_eq!(estimate.activation_bytes, 8 * 84 * 6 * (2 * 6_912 + 4 * 3_024));
            assert_eq!(estimate.to_string(), "about 143 MiB (weights 43, job 0, activations 100)");
        }
    }

    #[test]
    fn every_method_counts_what_it_trains() {
        let count = |method: &str, peft: &str| trainable_parameters(&spec(method, peft, 8, 64), &MINILM) - HEAD;
        // Two per-layer key/value prefixes of 384 per virtual token.
        assert_eq!(count("p_tuning_v2", "num_virtual_tokens = 10"), 10 * 6 * 2 * 384);
        assert_eq!(count("prefix_tuning", "num_virtual_tokens = 10"), 46_080);
        // The table, then 384 -> 128 -> 4,608 with biases.
        assert_eq!(
            count("prefix_tuning", "num_virtual_tokens = 10\nprefix_projection = true\nencoder_hidden_size = 128"),
            3_840 + (384 * 128 + 128) + (128 * 4_608 + 4_608)
        );
        // The table, then 384 -> 384 -> 384 -> 384 with biases.
        assert_eq!(count("p_tuning", "num_virtual_tokens = 10"), 3_840 + 3 * (384 * 384 + 384));
        // Two bidirectional layers of 16 (input 384, then 32), then 32 -> 32 -> 384.
        let lstm = 2 * (4 * 16 * 384 + 4 * 16 * 16 + 8 * 16) + 2 * (4 * 16 * 32 + 4 * 16 * 16 + 8 * 16);
        assert_eq!(
            count("p_tuning", "num_virtual_tokens = 10\nencoder_reparameterization_type = \"lstm\"\nencoder_hidden_size = 16"),
            3_840 + lstm + (32 * 32 + 32) + (32 * 384 + 384)
        );
        // Rank 8 on query and value: A [8, 384] and B [384, 8] each, 6 layers.
        assert_eq!(count("lora", ""), 6 * 2 * (8 * 384 + 384 * 8));
        // "dense" is three linears; "output.dense" two of them (PEFT's suffix rule).
        assert_eq!(count("lora", "r = 4\ntarget_modules = [\"dense\"]"), 6 * 4 * (2 * 384 + 5 * 384 + 5 * 384));
        assert_eq!(count("lora", "r = 4\ntarget_modules = [\"output.dense\"]"), 6 * 4 * (2 * 384 + 5 * 384));
        assert_eq!(count("full", ""), 22_713_216);
    }

    #[test]
    fn lora_and_full_sequences_have_no_virtual_tokens() {
        let estimate = estimate(&spec("full", "", 16, 64), &MINILM);
        assert_eq!(estimate.job_bytes, (22_713_216 + HEAD) * 16);
        // Plus two temporaries of the embedding tables: what 6 layers of 12 * 384^2 leave.
        let embeddings = 22_713_216 - 6 * 12 * 384 * 384;
        assert_eq!(estimate.activation_bytes, 16 * 64 * 6 * 4 * (6_912 + 3 * 12 * 64) + 2 * 4 * embeddings);
        assert_eq!(estimate.to_string(), "about 742 MiB (weights 87, job 347, activations 308)");

        // LoRA keeps, per token and layer, the input and output sizes of each target.
        let estimate = super::estimate(&spec("lora", "", 16, 128), &MINILM);
        assert_eq!(estimate.activation_bytes, 16 * 128 * 6 * 4 * (6_912 + 3 * 12 * 128 + 4 * 384));
        let all = super::estimate(&spec("lora", "target_modules = [\"query\", \"key\", \"value\", \"dense\"]", 16, 128), &MINILM);
        assert_eq!(all.activation_bytes, 16 * 128 * 6 * 4 * (6_912 + 3 * 12 * 128 + 18 * 384));
    }

    #[test]
    fn causal_lm_sequences_include_the_generated_tokens() {
        let spec = causal_lm(spec("prefix_tuning", "num_virtual_tokens = 10", 4, 100), 30);
        let estimate = estimate(&spec, &GPT2);
        assert_eq!(estimate.job_bytes, 10 * 12 * 2 * 768 * 16, "no head");
        // 100 + 10 + 30 tokens.
        assert_eq!(training_activation_bytes(&spec, &GPT2), 4 * 140 * 12 * 4 * (18 * 768 + 3 * 12 * 140));
        // Evaluation batches of 64 of them.
        assert_eq!(estimate.activation_bytes, 64 * 140 * 4 * (20 * 768 + 12 * 140));
    }

    const GPT2: ModelShape =
        ModelShape { parameters: 124_439_808, hidden_size: 768, num_layers: 12, num_attention_heads: 12, family: ModelFamily::Gpt2 };

    /// `spec` as a causal-LM job generating up to `max_new_tokens`.
    fn causal_lm(mut spec: JobSpec, max_new_tokens: u32) -> JobSpec {
        spec.task = Task::CausalLm;
        spec.data.labels.clear();
        spec.generation = Some(crate::spec::GenerationConfig { max_new_tokens, num_beams: 1 });
        spec
    }

    #[test]
    fn a_bf16_decoder_counts_its_weights_and_their_activations_at_two_bytes() {
        let fp32 = causal_lm(spec("lora", "", 4, 100), 28);
        let mut bf16 = fp32.clone();
        bf16.training.precision = crate::spec::Precision::Bf16;
        let (full, half) = (estimate(&fp32, &GPT2), estimate(&bf16, &GPT2));
        assert_eq!(half.weights_bytes, 124_439_808 * 2);
        assert_eq!(full.weights_bytes, 2 * half.weights_bytes);
        // The LoRA matrices, their gradients and AdamW's moments stay float32.
        assert_eq!(half.job_bytes, full.job_bytes);
        // 128 tokens: hidden activations at 2 bytes, attention scores and the
        // low-rank path (c_attn: 768 in, 2,304 out) at 4.
        let per_token_layer = 2 * 18 * 768 + 4 * (3 * 12 * 128 + 768 + 2_304);
        assert_eq!(training_activation_bytes(&bf16, &GPT2), 4 * 128 * 12 * per_token_layer);
    }

    #[test]
    fn lora_on_decoders_counts_the_familys_own_linears() {
        let lora = |peft: &str, model: &ModelShape| {
            let mut spec = spec("lora", peft, 4, 100);
            spec.task = Task::CausalLm;
            spec.data.labels.clear();
            trainable_parameters(&spec, model)
        };
        // GPT-2's default is c_attn: A [8, 768], B [2304, 8] in each of 12 layers.
        assert_eq!(lora("", &GPT2), 12 * (8 * 768 + 2_304 * 8));
        // "c_proj" is the attention's and the MLP's output projection.
        assert_eq!(lora("r = 2\ntarget_modules = [\"c_proj\"]", &GPT2), 12 * 2 * ((768 + 768) + (3_072 + 768)));
        let llama = ModelShape { parameters: 1_100_048_384, hidden_size: 2_048, num_layers: 22, num_attention_heads: 32, family: ModelFamily::Llama };
        // q_proj and v_proj by default.
        assert_eq!(lora("", &llama), 22 * 2 * 8 * (2_048 + 2_048));
    }

    #[test]
    fn mebibytes_round_to_the_nearest_and_group_thousands() {
        assert_eq!(mib(0), "0");
        assert_eq!(mib((1 << 20) / 2 - 1), "0");
        assert_eq!(mib((1 << 20) / 2), "1");
        assert_eq!(mib(4_096 << 20), "4,096");
        assert_eq!(mib(1_234_567 << 20), "1,234,567");
    }
}
