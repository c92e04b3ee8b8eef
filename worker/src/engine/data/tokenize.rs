//! Tokenization with the model's `tokenizer.json` (Hugging Face `tokenizers`):
//! [`TextTokenizer`] for an encoder's classification inputs, [`LmTokenizer`]
//! for a decoder's prompts and generated text. The file's own padding
//! setting is switched off: batches are padded to their longest example
//! instead (see `batch.rs`).

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::engine::error::EngineError;

/// Texts [`TextTokenizer::encode_batch`] encodes at a time, in parallel.
const ENCODE_CHUNK: usize = 1024;

/// A model's tokenizer, producing ids with special tokens and no padding.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pad_id: i64,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| EngineError::Model(format!("cannot read tokenizer {}: {e}", path.display())))?;
        let pad_id = inner
            .get_padding()
            .map(|padding| padding.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .unwrap_or(0);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| EngineError::Model(format!("tokenizer {}: {e}", path.display())))?;
        Ok(Self { inner, pad_id: i64::from(pad_id) })
    }

    /// The underlying tokenizer (padding and truncation off).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Id that fills padding positions.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Ids of `text` with special tokens, not truncated.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, EngineError> {
        let encoding = self.inner.encode(text, true).map_err(|e| EngineError::Model(format!("tokenizer: {e}")))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// Ids of each text with special tokens, truncated to `max_len` tokens in
    /// all (special tokens included), as `tokenizer(text, truncation=True,
    /// max_length=max_len)` does in Python. Texts are encoded
    /// [`ENCODE_CHUNK`] at a time: an encoding holds far more than its ids
    /// (tokens, offsets, masks): all of SST-2's training sentences encoded
    /// at once took about 175 MiB for a moment.
    pub fn encode_batch(&self, texts: Vec<&str>, max_len: usize) -> Result<Vec<Vec<i64>>, EngineError> {
        let mut tokenizer = self.inner.clone();
        let truncation = TruncationParams {
            direction: TruncationDirection::Right,
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        };
        tokenizer
            .with_truncation(Some(truncation))
            .map_err(|e| EngineError::Model(format!("tokenizer: {e}")))?;
        let mut ids = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(ENCODE_CHUNK) {
            let encodings = tokenizer
                .encode_batch(chunk.to_vec(), true)
                .map_err(|e| EngineError::Model(format!("tokenizer: {e}")))?;
            ids.extend(encodings.iter().map(|encoding| encoding.get_ids().iter().map(|&id| i64::from(id)).collect()));
        }
        Ok(ids)
    }
}

/// A model's `tokenizer.json` for generation: encodes with or without the
/// template's special tokens (padding and truncation off) and decodes ids
/// back to text.
#[derive(Clone)]
pub struct LmTokenizer {
    inner: Tokenizer,
}

impl LmTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| EngineError::Model(format!("cannot read tokenizer {}: {e}", path.display())))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| EngineError::Model(format!("tokenizer {}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Ids of `text`, with the template's special tokens (e.g. a BOS) when
    /// `special_tokens`.
    pub fn encode(&self, text: &str, special_tokens: bool) -> Result<Vec<i64>, EngineError> {
        let encoding =
            self.inner.encode(text, special_tokens).map_err(|e| EngineError::Model(format!("tokenizer: {e}")))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[i64]) -> Result<String, EngineError> {
        let ids: Vec<u32> = ids.iter().filter_map(|&id| u32::try_from(id).ok()).collect();
        self.inner.decode(&ids, true).map_err(|e| EngineError::Model(format!("tokenizer: {e}")))
    }

    /// Id of a token of the vocabulary, e.g. `<|endoftext|>` or `</s>`.
    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }
}
