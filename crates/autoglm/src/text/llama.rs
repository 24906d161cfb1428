//! The Llama-family causal decoder (HF `LlamaForCausalLM`,
//! `Qwen2ForCausalLM`): RMSNorm, rotary position embeddings (default or
//! linear scaling), SwiGLU MLP, grouped-query attention, optional q/k/v
//! biases, tied or untied LM head.
//!
//! The VLM seam is `embed(ids)` + `forward_embeds(embeds, …, cache)`: image
//! features are spliced into the embeddings by the caller; the decoder never
//! knows. Reference: transformers `models/llama/modeling_llama.py`.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{embedding, Embedding, Module, VarBuilder};

use crate::nn::{rms_norm, RmsNorm};

use crate::config::LlamaConfig;
use crate::fusion::attention::{attend_with, GatedCrossAttention, KeySelection};
use crate::io::weights::Safetensors;
use crate::nn::{linear_b, Linear};
use crate::text::kv_cache::KvCache;
use crate::{Error, Result};

/// Rotary embedding tables for arbitrary positions.
#[derive(Debug, Clone)]
struct Rope {
    /// (1, 1, D/2): `1 / (θ^(2i/D) · factor)`.
    inv_freq: Tensor,
}

impl Rope {
    fn new(cfg: &LlamaConfig, dev: &Device) -> Result<Self> {
        let d = cfg.head_dim();
        let theta = cfg.rope_theta();
        let factor = cfg.rope_linear_factor();
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| (1.0 / (theta.powf(2.0 * i as f64 / d as f64) * factor)) as f32)
            .collect();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, (1, 1, d / 2), dev)?,
        })
    }

    /// `cos`, `sin` of shape (B, T, D/2) for `positions` (B, T) u32.
    fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let freqs = positions
            .to_dtype(DType::F32)?
            .unsqueeze(D::Minus1)?
            .broadcast_mul(&self.inv_freq)?
            .contiguous()?;
        Ok((freqs.cos()?, freqs.sin()?))
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    keys: KeySelection,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
        let bias = cfg.qkv_bias();
        Ok(Self {
            q: linear_b(h, nh * hd, bias, vb.pp("q_proj"))?,
            k: linear_b(h, nkv * hd, bias, vb.pp("k_proj"))?,
            v: linear_b(h, nkv * hd, bias, vb.pp("v_proj"))?,
            o: linear_b(nh * hd, h, cfg.attention_bias, vb.pp("o_proj"))?,
            heads: nh,
            keys: KeySelection::from_config(cfg.attention_top_k, cfg.attention_block_size),
            kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// # Shapes
    /// `x`: (B, T, H); `cos`/`sin`: (B, T, hd/2); `bias`: (B, 1, T, S) with
    /// S = cached + T → (B, T, H)
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        let split = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) // (B, n, T, hd)
        };
        let q = split(self.q.forward(x)?, self.heads)?;
        let k = split(self.k.forward(x)?, self.kv_heads)?;
        let v = split(self.v.forward(x)?, self.kv_heads)?;
        let q = crate::ops::rope(&q, cos, sin)?;
        let k = crate::ops::rope(&k, cos, sin)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        let s = k.dim(2)?;
        // Grouped-query attention: each kv head serves heads / kv_heads queries.
        let rep = self.heads / self.kv_heads;
        let expand = |y: &Tensor| -> Result<Tensor> {
            if rep == 1 {
                return Ok(y.clone());
            }
            Ok(y.unsqueeze(2)?
                .expand((b, self.kv_heads, rep, s, hd))?
                .reshape((b, self.heads, s, hd))?)
        };
        let (k, v) = (expand(&k)?, expand(&v)?);
        // Masked keys (−1e9) sort last, so top-k never picks them while k
        // visible keys remain.
        let ctx = attend_with(&q, &k, &v, Some(bias), self.keys, s - t)? // (B, nh, T, hd)
            .transpose(1, 2)?
            .reshape((b, t, self.heads * hd))?;
        self.o.forward(&ctx)
    }
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = crate::ops::silu_mul(&self.gate.forward(x)?, &self.up.forward(x)?)?;
        self.down.forward(&h)
    }
}

struct Layer {
    /// Gated cross-attention to the image context, before the layer.
    cross: Option<GatedCrossAttention>,
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

/// Inputs of one forward call beyond the embeddings.
pub struct Positions {
    /// (B, T) u32: the rotary position of each new token.
    pub positions: Tensor,
    /// (B, S) f32 with S = cached + T: 1 where a key is real, 0 at padding.
    pub key_mask: Option<Tensor>,
    /// (B, P, H) what the decoder's cross-attention blocks attend to (the
    /// projected image tokens), the same at every step; and its (B, P)
    /// key mask. Ignored by a decoder without such blocks.
    pub context: Option<Tensor>,
    pub context_mask: Option<Tensor>,
}

impl Positions {
    /// `start..start + t` for every row, no padding.
    pub fn contiguous(b: usize, t: usize, start: usize, dev: &Device) -> Result<Self> {
        let row = Tensor::arange(start as u32, (start + t) as u32, dev)?;
        Ok(Self {
            positions: row.unsqueeze(0)?.repeat((b, 1))?,
            key_mask: None,
            context: None,
            context_mask: None,
        })
    }

    /// Each row's positions from its ids ([`rotary_positions`] from 0),
    /// the rows padded to `t`: padding after a row continues its count.
    pub fn of_ids(rows: &[Vec<u32>], t: usize, shared: Option<u32>, dev: &Device) -> Result<Self> {
        let flat: Vec<u32> = rows
            .iter()
            .flat_map(|r| {
                let mut p = rotary_positions(r, 0, shared);
                let next = p.last().map_or(0, |l| l + 1);
                p.extend((0..t.saturating_sub(r.len()) as u32).map(|k| next + k));
                p
            })
            .collect();
        Ok(Self {
            positions: Tensor::from_vec(flat, (rows.len(), t), dev)?,
            key_mask: None,
            context: None,
            context_mask: None,
        })
    }

    /// The same positions with an image context for cross-attention.
    pub fn with_context(mut self, context: Option<Tensor>, mask: Option<Tensor>) -> Self {
        self.context = context;
        self.context_mask = mask;
        self
    }
}

/// The rotary position of each of `ids`, counting up from `start`, except
/// that the tokens of a run of `shared` (one image's tokens) all take the
/// run's first position. `shared: None`: `start, start + 1, …`.
pub fn rotary_positions(ids: &[u32], start: u32, shared: Option<u32>) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len());
    let mut p = start;
    for (j, &id) in ids.iter().enumerate() {
        if j > 0 && !(shared == Some(id) && ids[j - 1] == id) {
            p += 1;
        }
        out.push(p);
    }
    out
}

pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    pub config: LlamaConfig,
}

impl Llama {
    /// `model` holds `embed_tokens`, `layers.*` and `norm`; `lm_head` the
    /// head (ignored when the embeddings are tied).
    pub fn new(model: VarBuilder, lm_head: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed_tokens = embedding(cfg.vocab_size, h, model.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = model.pp("layers").pp(i);
                let m = vb.pp("mlp");
                let cross = cfg
                    .has_cross_attention(i)
                    .then(|| {
                        GatedCrossAttention::new(
                            vb.pp("cross_attn"),
                            h,
                            h,
                            cfg.cross_attention_heads.unwrap_or(cfg.num_attention_heads),
                            None,
                        )
                    })
                    .transpose()?;
                Ok(Layer {
                    cross,
                    attn_norm: rms_norm(h, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
                    attn: Attention::new(vb.pp("self_attn"), cfg)?,
                    mlp_norm: rms_norm(h, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
                    mlp: Mlp {
                        gate: linear_b(h, cfg.intermediate_size, false, m.pp("gate_proj"))?,
                        up: linear_b(h, cfg.intermediate_size, false, m.pp("up_proj"))?,
                        down: linear_b(cfg.intermediate_size, h, false, m.pp("down_proj"))?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::from_weights(embed_tokens.embeddings().clone(), None)
        } else {
            linear_b(h, cfg.vocab_size, false, lm_head)?
        };
        Ok(Self {
            rope: Rope::new(cfg, model.device())?,
            embed_tokens,
            layers,
            norm: rms_norm(h, cfg.rms_norm_eps, model.pp("norm"))?,
            lm_head,
            config: cfg.clone(),
        })
    }

    /// Loads a HF `LlamaForCausalLM` / `Qwen2ForCausalLM` directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                hint: "no such model directory".into(),
            });
        }
        let cfg_path = dir.join("config.json");
        let cfg: LlamaConfig = crate::io::read_json(&cfg_path)?;
        cfg.validate(&cfg_path)?;
        let vb = Safetensors::open_dir(dir)?.var_builder(DType::F32, device);
        Self::new(vb.pp("model"), vb.pp("lm_head"), &cfg)
    }

    pub fn embed_tokens_device(&self) -> &Device {
        self.embed_tokens.embeddings().device()
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Token embeddings. `ids`: (B, T) u32 → (B, T, H)
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.forward(ids)?)
    }

    /// Runs the decoder on new embeddings after what `cache` holds and
    /// returns the final-normed hidden states (B, T, H); the cache grows by T.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        pos: &Positions,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let mut out = self.forward_embeds_exits(embeds, pos, cache, &[self.layers.len()])?;
        Ok(out.remove(0))
    }

    /// Number of decoder layers.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// As [`Self::forward_embeds`], stopping after the first `exits.last()`
    /// layers (early exit): the final-normed hidden states after each of
    /// `exits` layers (increasing, each in 1..=depth). Only the layers run
    /// fill the cache, so a cache must be continued at the same depth.
    pub fn forward_embeds_exits(
        &self,
        embeds: &Tensor,
        pos: &Positions,
        cache: &mut KvCache,
        exits: &[usize],
    ) -> Result<Vec<Tensor>> {
        let n = self.layers.len();
        if exits.is_empty()
            || exits[0] == 0
            || exits.windows(2).any(|w| w[0] >= w[1])
            || exits[exits.len() - 1] > n
        {
            return Err(Error::Invalid(format!(
                "decoder exits {exits:?} must increase within 1..={n} (the decoder's layers)"
            )));
        }
        let (b, t, _) = embeds.dims3()?;
        let past = cache.len();
        let s = past + t;
        if s > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "{s} tokens exceed the model's context of {} positions",
                self.config.max_position_embeddings
            )));
        }
        let dev = embeds.device();
        // Causal: query i (absolute past + i) sees keys j ≤ past + i.
        let causal: Vec<f32> = (0..t * s)
            .map(|n| if n % s > past + n / s { -1e9 } else { 0.0 })
            .collect();
        let mut bias = Tensor::from_vec(causal, (1, 1, t, s), dev)?;
        if let Some(m) = &pos.key_mask {
            let pad = ((m.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, s))?;
            bias = bias.broadcast_add(&pad)?;
        }
        let (cos, sin) = self.rope.tables(&pos.positions)?;
        let mut x = embeds.clone();
        let mut out = Vec::with_capacity(exits.len());
        for (i, layer) in self.layers[..exits[exits.len() - 1]].iter().enumerate() {
            // No image context (a text-only prompt): nothing to attend to.
            if let (Some(cross), Some(ctx)) = (&layer.cross, &pos.context) {
                x = cross.forward(&x, ctx, pos.context_mask.as_ref())?;
            }
            let h =
                layer
                    .attn
                    .forward(&layer.attn_norm.forward(&x)?, &cos, &sin, &bias, cache, i)?;
            let x1 = (x + h)?;
            let h = layer.mlp.forward(&layer.mlp_norm.forward(&x1)?)?;
            x = (x1 + h)?;
            if exits.contains(&(i + 1)) {
                out.push(self.norm.forward(&x)?);
            }
        }
        Ok(out)
    }

    /// Vocabulary logits of hidden states: (…, H) → (…, V)
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// Logits of every position of `ids` (B, T), fed after `cache`.
    pub fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let pos = Positions::contiguous(b, t, cache.len(), ids.device())?;
        self.logits(&self.forward_embeds(&self.embed(ids)?, &pos, cache)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BOS, an image of 3 tokens, a word, an image of 2 tokens, a word.
    #[test]
    fn each_image_takes_one_position() {
        let ids = [1, 3, 3, 3, 7, 3, 3, 9];
        assert_eq!(rotary_positions(&ids, 0, Some(3)), [0, 1, 1, 1, 2, 3, 3, 4]);
        assert_eq!(rotary_positions(&ids, 5, Some(3)), [5, 6, 6, 6, 7, 8, 8, 9]);
        assert_eq!(rotary_positions(&ids, 0, None), [0, 1, 2, 3, 4, 5, 6, 7]);
        // A prompt that starts with its image.
        assert_eq!(rotary_positions(&[3, 3, 8], 0, Some(3)), [0, 0, 1]);
        assert!(rotary_positions(&[], 0, Some(3)).is_empty());
        // Padded rows continue counting after their last position.
        let p = Positions::of_ids(&[vec![1, 3, 3, 7], vec![3, 3]], 5, Some(3), &Device::Cpu)
            .unwrap()
            .positions
            .to_vec2::<u32>()
            .unwrap();
        assert_eq!(p, [[0, 1, 1, 2, 3], [0, 0, 1, 2, 3]]);
    }
}
