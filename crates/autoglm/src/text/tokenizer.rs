//! A thin wrapper over HF `tokenizers` that owns truncation and padding, so
//! every model truncates exactly as its reference does (a `tokenizer.json`
//! often carries settings the reference library overrides: all-MiniLM-L6-v2's
//! says "truncate at 128, pad to 128", while sentence-transformers truncates at
//! 256 and pads to the longest sentence).

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    max_len: usize,
}

/// A padded batch: `ids` and `mask` are `(B, T)` u32, `lengths` the number of
/// real tokens of each row.
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub lengths: Vec<usize>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`; inputs are truncated to `max_len` tokens,
    /// special tokens included.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Missing {
                path: path.to_path_buf(),
                hint: "the model directory must hold a tokenizer.json".into(),
            });
        }
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                strategy: tokenizers::TruncationStrategy::LongestFirst,
                stride: 0,
                direction: tokenizers::TruncationDirection::Right,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        Ok(Self { inner, max_len })
    }

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of one text, with the model's special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of text that already holds its special tokens (a rendered
    /// chat template): nothing is added.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes and right-pads a batch with `pad_id` to its longest row.
    pub fn batch(&self, texts: &[&str], pad_id: u32, device: &Device) -> Result<Batch> {
        if texts.is_empty() {
            return Err(Error::Invalid("no texts to encode".into()));
        }
        let seqs = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<Vec<_>>>()?;
        Self::pad(&seqs, pad_id, device)
    }

    /// Right-pads already encoded sequences.
    pub fn pad(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Batch> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let b = seqs.len();
        let mut ids = vec![pad_id; b * t];
        let mut mask = vec![0u32; b * t];
        for (i, s) in seqs.iter().enumerate() {
            ids[i * t..i * t + s.len()].copy_from_slice(s);
            mask[i * t..i * t + s.len()].iter_mut().for_each(|m| *m = 1);
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, t), device)?,
            lengths: seqs.iter().map(Vec::len).collect(),
        })
    }
}
