//! Prompt tuning (Lester et al. 2021, <https://arxiv.org/abs/2104.08691>) as
//! Hugging Face PEFT's `PROMPT_TUNING`: `num_virtual_tokens` learned
//! embeddings are prepended to the input embeddings, the attention mask is
//! extended with ones and token-type ids are zero over the prompt.

use ptune_core::PeftConfig;
use tch::{nn, Kind, Tensor};

use crate::engine::error::EngineError;

/// How the prompt table starts, resolved to what it is copied from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptInit {
    /// N(0, 1), the default of PyTorch's `nn.Embedding` (PEFT `RANDOM`).
    Random,
    /// Copies of these tokens' word embeddings (PEFT `SAMPLE_VOCAB`, `TEXT`).
    Tokens(Vec<i64>),
}

impl PromptInit {
    /// Resolves the spec's init. `vocab` draws token ids uniformly from the
    /// `vocab_size` word embeddings with libtorch's generator (seeded by the
    /// job), as PEFT's `torch.randint` does; `text` takes the ids `encode`
    /// gives the init text (with the tokenizer's special tokens, as PEFT's
    /// `tokenizer(init_text)`), repeated or cut to the prompt length, as
    /// PEFT's `TEXT` init does.
    pub fn from_spec(
        peft: &PeftConfig,
        encode: &dyn Fn(&str) -> Result<Vec<i64>, EngineError>,
        vocab_size: i64,
    ) -> Result<Self, EngineError> {
        let nvt = i64::from(peft.num_virtual_tokens);
        match peft.init {
            ptune_core::PromptInit::Random => Ok(Self::Random),
            ptune_core::PromptInit::Vocab => {
                let ids = Tensor::randint(vocab_size, [nvt], (Kind::Int64, tch::Device::Cpu));
                Ok(Self::Tokens(Vec::<i64>::try_from(&ids)?))
            }
            ptune_core::PromptInit::Text => {
                let text = peft.init_text.as_deref().unwrap_or_default();
                let ids = encode(text)?;
                if ids.is_empty() {
                    return Err(ptune_core::SpecError::new("peft.init_text", "tokenizes to no tokens").into());
                }
                Ok(Self::Tokens(ids.iter().copied().cycle().take(nvt as usize).collect()))
            }
        }
    }
}

/// The trainable prompt table, `[num_virtual_tokens, hidden]`.
pub struct PromptTuning {
    embeddings: Tensor,
}

impl PromptTuning {
    /// Name of the prompt table in PEFT's `adapter_model.safetensors`, and of
    /// its variable here.
    pub const WEIGHTS_KEY: &'static str = "prompt_embeddings";

    pub fn new(p: &nn::Path, num_virtual_tokens: i64, init: &PromptInit, word_embeddings: &Tensor) -> Self {
        let hidden = word_embeddings.size()[1];
        let embeddings = match init {
            PromptInit::Random => p.randn_standard(Self::WEIGHTS_KEY, &[num_virtual_tokens, hidden]),
            PromptInit::Tokens(ids) => {
                let ids = Tensor::from_slice(ids).to_device(word_embeddings.device());
                let rows = tch::no_grad(|| word_embeddings.index_select(0, &ids));
                p.var_copy(Self::WEIGHTS_KEY, &rows)
            }
        };
        Self { embeddings }
    }

    /// A prompt whose table is a copy of `table` `[num_virtual_tokens,
    /// hidden]`: an exported prompt (PEFT's `prompt_embeddings`) loaded back.
    pub fn from_table(p: &nn::Path, table: &Tensor) -> Self {
        Self { embeddings: p.var_copy(Self::WEIGHTS_KEY, table) }
    }

    pub fn num_virtual_tokens(&self) -> i64 {
        self.embeddings.size()[0]
    }

    /// `[num_virtual_tokens, hidden]` prompt table.
    pub fn embeddings(&self) -> &Tensor {
        &self.embeddings
    }

    /// Prepends the prompt; see [`prepend`].
    pub fn prepend(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> (Tensor, Tensor, Option<Tensor>) {
        prepend(&self.embeddings, inputs_embeds, attention_mask, token_type_ids)
    }
}

/// Prepends `prompt` `[nvt, hidden]` to every example, as PEFT does for
/// prompt tuning and P-tuning: `[batch, seq, hidden]` embeddings and `[batch,
/// seq]` attention mask become `[batch, nvt + seq, ...]`, the mask with ones
/// over the prompt. Token types, when given, get zeros over the prompt.
pub fn prepend(
    prompt: &Tensor,
    inputs_embeds: &Tensor,
    attention_mask: &Tensor,
    token_type_ids: Option<&Tensor>,
) -> (Tensor, Tensor, Option<Tensor>) {
    let batch = inputs_embeds.size()[0];
    let nvt = prompt.size()[0];
    let prompt = prompt.unsqueeze(0).expand([batch, nvt, -1], false);
    let embeds = Tensor::cat(&[prompt, inputs_embeds.shallow_clone()], 1);
    let ones = Tensor::ones([batch, nvt], (attention_mask.kind(), attention_mask.device()));
    let mask = Tensor::cat(&[ones, attention_mask.shallow_clone()], 1);
    let token_types = token_type_ids.map(|types| {
        let zeros = Tensor::zeros([batch, nvt], (types.kind(), types.device()));
        Tensor::cat(&[zeros, types.shallow_clone()], 1)
    });
    (embeds, mask, token_types)
}
