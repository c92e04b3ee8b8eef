//! Causal LM's evaluation: the decoded output of every input and their
//! corpus BLEU against the references.

use tch::Device;

use super::bleu::corpus_bleu;
use super::generate::{generate, GenerationConfig};
use super::model::LmAdapter;
use crate::engine::data::seq2seq::{Seq2SeqFormat, SourceReferences};
use crate::engine::data::tokenize::LmTokenizer;
use crate::engine::error::EngineError;
use crate::engine::models::decoder::CausalDecoder;

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
