//! BERT encoder (HF `BertModel` layout) and the sentence-transformers
//! embedding pipeline around it: mean pooling over real tokens, then L2
//! normalisation, as all-MiniLM-L6-v2's `modules.json` prescribes.
//!
//! Reference: transformers `models/bert/modeling_bert.py` (post-LN encoder),
//! sentence-transformers `models/Pooling.py` and `models/Normalize.py`.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{embedding, Embedding, Module, VarBuilder};

use crate::nn::{layer_norm, LayerNorm};

use crate::config::{Activation, BertConfig};
use crate::io::weights::Safetensors;
use crate::nn::{linear, Linear};
use crate::ops::Act;
use crate::text::tokenizer::Tokenizer;
use crate::{Error, Result};

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

impl Embeddings {
    fn new(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        Ok(Self {
            word: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            token_type: embedding(
                cfg.type_vocab_size,
                cfg.hidden_size,
                vb.pp("token_type_embeddings"),
            )?,
            norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// # Shapes
    /// `ids`: (B, T) u32 → (B, T, H)
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, ids.device())?;
        let x = self.word.forward(ids)?;
        let x = x.broadcast_add(&self.position.forward(&pos)?)?;
        // Single-segment input: token type 0 everywhere.
        let tt = self.token_type.embeddings().get(0)?;
        let x = x.broadcast_add(&tt)?;
        Ok(self.norm.forward(&x)?)
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
    heads: usize,
    act: Activation,
}

impl Layer {
    /// The up projection and its activation; bias and exact GELU are fused
    /// on the CPU (see [`crate::ops`]).
    fn intermediate(&self, x: &Tensor) -> Result<Tensor> {
        match self.act {
            Activation::Gelu => self.up.forward_act(x, Act::GeluErf),
            other => Ok(other.forward(&self.up.forward(x)?)?),
        }
    }

    fn new(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let a = vb.pp("attention");
        Ok(Self {
            q: linear(h, h, a.pp("self").pp("query"))?,
            k: linear(h, h, a.pp("self").pp("key"))?,
            v: linear(h, h, a.pp("self").pp("value"))?,
            attn_out: linear(h, h, a.pp("output").pp("dense"))?,
            attn_norm: layer_norm(h, cfg.layer_norm_eps, a.pp("output").pp("LayerNorm"))?,
            up: linear(h, cfg.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            down: linear(cfg.intermediate_size, h, vb.pp("output").pp("dense"))?,
            out_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
        })
    }

    /// # Shapes
    /// `x`: (B, T, H); `bias`: (B, 1, 1, T) additive mask → (B, T, H)
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let hd = h / self.heads;
        let split = |y: Tensor| -> Result<Tensor> {
            // (B, T, H) → (B, nh, T, hd)
            Ok(y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split((self.q.forward(x)? * (1.0 / (hd as f64).sqrt()))?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?; // (B, nh, T, T)
        let probs = crate::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        let x = self
            .attn_norm
            .forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let y = self.down.forward(&self.intermediate(&x)?)?;
        Ok(self.out_norm.forward(&(y + x)?)?)
    }

    /// The same layer over packed, unpadded sequences: the dense parts run
    /// on all real tokens at once, attention runs per group of equal-length
    /// sequences (so it needs no mask).
    ///
    /// # Shapes
    /// `x`: (N, H) with N = Σ mᵢ·Lᵢ, rows ordered by `groups` of
    /// (first row, m sequences, length L) → (N, H)
    fn forward_packed(&self, x: &Tensor, groups: &[(usize, usize, usize)]) -> Result<Tensor> {
        let h = x.dim(1)?;
        let hd = h / self.heads;
        let q = (self.q.forward(x)? * (1.0 / (hd as f64).sqrt()))?;
        let k = self.k.forward(x)?;
        let v = self.v.forward(x)?;
        let mut ctx = Vec::with_capacity(groups.len());
        for &(start, m, l) in groups {
            let split = |y: &Tensor| -> Result<Tensor> {
                // (m·L, H) → (m, nh, L, hd)
                Ok(y.narrow(0, start, m * l)?
                    .reshape((m, l, self.heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (q, k, v) = (split(&q)?, split(&k)?, split(&v)?);
            let probs = crate::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?; // (m, nh, L, L)
            ctx.push(probs.matmul(&v)?.transpose(1, 2)?.reshape((m * l, h))?);
        }
        let ctx = Tensor::cat(&ctx, 0)?;
        let x = self
            .attn_norm
            .forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let y = self.down.forward(&self.intermediate(&x)?)?;
        Ok(self.out_norm.forward(&(y + x)?)?)
    }
}

/// The BERT encoder: embeddings and the post-LN transformer layers.
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pub config: BertConfig,
}

impl Bert {
    pub fn new(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        // Checkpoints saved from `BertForX` carry a `bert.` prefix.
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(vb.pp("encoder").pp("layer").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::new(vb.pp("embeddings"), cfg)?,
            layers,
            config: cfg.clone(),
        })
    }

    /// Last hidden states.
    ///
    /// # Shapes
    /// `ids`, `mask`: (B, T) u32 → (B, T, H)
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "input of {t} tokens exceeds the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        // 0 where attended, a large negative number at padding (HF uses the
        // dtype's minimum; any value that underflows exp() gives the same).
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, t))?;
        let mut x = self.embeddings.forward(ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias)?;
        }
        Ok(x)
    }
}

impl Bert {
    /// Mean-pooled last hidden states of unpadded sequences, `(S, H)` in
    /// input order.
    ///
    /// Padding a batch to its longest sentence wastes the compute of every
    /// pad token (half of it for typical mixed-length batches). Here the
    /// sequences are packed: linears, norms and the MLP run on real tokens
    /// only, and attention runs per group of equal length. The result equals
    /// the padded, masked forward (tested).
    pub fn pooled_unpadded(&self, seqs: &[Vec<u32>]) -> Result<Tensor> {
        if seqs.is_empty() {
            return Err(Error::Invalid("no sequences to encode".into()));
        }
        let max = self.config.max_position_embeddings;
        if let Some(s) = seqs.iter().find(|s| s.is_empty() || s.len() > max) {
            return Err(Error::Invalid(format!(
                "a sequence of {} tokens is outside 1..={max}",
                s.len()
            )));
        }
        // Group by length; rows are laid out group by group.
        let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, s) in seqs.iter().enumerate() {
            by_len.entry(s.len()).or_default().push(i);
        }
        let (mut ids, mut pos, mut groups, mut order) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (&l, members) in &by_len {
            groups.push((ids.len(), members.len(), l));
            for &i in members {
                ids.extend_from_slice(&seqs[i]);
                pos.extend(0..l as u32);
                order.push(i);
            }
        }
        let dev = self.embeddings.word.embeddings().device();
        let n = ids.len();
        let ids = Tensor::from_vec(ids, n, dev)?;
        let pos = Tensor::from_vec(pos, n, dev)?;
        let e = &self.embeddings;
        let x = e.word.forward(&ids)?.add(&e.position.forward(&pos)?)?;
        let x = x.broadcast_add(&e.token_type.embeddings().get(0)?)?;
        let mut x = e.norm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward_packed(&x, &groups)?;
        }
        // Mean over each sequence's rows, then back to input order.
        let mut pooled: Vec<Option<Tensor>> = vec![None; seqs.len()];
        let mut g_rows = Vec::with_capacity(groups.len());
        for &(start, m, l) in &groups {
            g_rows.push(x.narrow(0, start, m * l)?.reshape((m, l, ()))?.mean(1)?);
        }
        let mut k = 0;
        for (gi, &(_, m, _)) in groups.iter().enumerate() {
            for r in 0..m {
                pooled[order[k]] = Some(g_rows[gi].get(r)?);
                k += 1;
            }
        }
        let rows: Vec<Tensor> = pooled
            .into_iter()
            .map(|t| t.expect("every sequence pooled"))
            .collect();
        Ok(Tensor::stack(&rows, 0)?)
    }
}

/// Mean of the token vectors where `mask` is 1.
///
/// # Shapes
/// `hidden`: (B, T, H), `mask`: (B, T) → (B, H)
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?; // (B, T, 1)
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    // sentence-transformers clamps the count at 1e-9.
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    Ok(sum.broadcast_div(&count)?)
}

/// Rows divided by their L2 norm (`F.normalize(x, p=2, dim=1)`, eps 1e-12).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&n)?)
}

/// A sentence-transformers model: BERT + mean pooling + L2 normalisation,
/// loaded from a sentence-transformers directory (all-MiniLM-L6-v2).
pub struct SentenceEncoder {
    bert: Bert,
    tokenizer: Tokenizer,
    pad_id: u32,
    /// Whether a `Normalize` module ends the pipeline.
    normalize: bool,
}

#[derive(serde::Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

#[derive(serde::Deserialize)]
struct StModule {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(serde::Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
}

impl SentenceEncoder {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                hint: "no such model directory (the default MiniLM comes from scripts/fetch-assets.sh --only minilm)".into(),
            });
        }
        let cfg_path = dir.join("config.json");
        let cfg: BertConfig = crate::io::read_json(&cfg_path)?;
        cfg.validate(&cfg_path)?;
        let st_path = dir.join("sentence_bert_config.json");
        let max_seq = if st_path.is_file() {
            crate::io::read_json::<SentenceBertConfig>(&st_path)?.max_seq_length
        } else {
            cfg.max_position_embeddings
        }
        .min(cfg.max_position_embeddings);
        // modules.json says which stages follow the transformer; we support
        // mean pooling optionally followed by L2 normalisation.
        let modules_path = dir.join("modules.json");
        let normalize = if modules_path.is_file() {
            let modules: Vec<StModule> = crate::io::read_json(&modules_path)?;
            let mut normalize = false;
            for m in &modules {
                match m.kind.rsplit('.').next().unwrap_or("") {
                    "Transformer" | "Pooling" => {}
                    "Normalize" => normalize = true,
                    other => {
                        return Err(Error::Config {
                            path: modules_path,
                            msg: format!("sentence-transformers module `{other}` is not supported (Transformer, mean Pooling and Normalize are)"),
                        })
                    }
                }
            }
            normalize
        } else {
            // A plain BERT directory: mean pooling, normalised like MiniLM.
            true
        };
        let pool_path = dir.join("1_Pooling").join("config.json");
        if pool_path.is_file()
            && !crate::io::read_json::<PoolingConfig>(&pool_path)?.pooling_mode_mean_tokens
        {
            return Err(Error::Config {
                path: pool_path,
                msg: "only mean pooling is supported".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), max_seq)?;
        let vb = Safetensors::open_dir(dir)?.var_builder(DType::F32, device);
        let bert = Bert::new(vb, &cfg)?;
        let pad_id = cfg.pad_token_id as u32;
        Ok(Self {
            bert,
            tokenizer,
            pad_id,
            normalize,
        })
    }

    pub fn dim(&self) -> usize {
        self.bert.config.hidden_size
    }

    /// The encoder, e.g. for its padded, masked [`Bert::forward`].
    pub fn bert(&self) -> &Bert {
        &self.bert
    }

    /// The id padded batches use.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn config(&self) -> &BertConfig {
        &self.bert.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Embeddings of `texts`, `(N, H)`: mean-pooled, and unit length when the
    /// model's `modules.json` ends with `Normalize` (all-MiniLM-L6-v2 does).
    ///
    /// Texts are encoded `batch_size` at a time, packed without padding
    /// ([`Bert::pooled_unpadded`]).
    pub fn embed(&self, texts: &[&str], batch_size: usize) -> Result<Tensor> {
        if texts.is_empty() {
            return Err(Error::Invalid("no texts to embed".into()));
        }
        let seqs = texts
            .iter()
            .map(|t| self.tokenizer.encode(t))
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::new();
        for chunk in seqs.chunks(batch_size.max(1)) {
            let pooled = self.bert.pooled_unpadded(chunk)?;
            out.push(if self.normalize {
                l2_normalize(&pooled)?
            } else {
                pooled
            });
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}
