//! Vision transformer in the HF CLIP layout, and the pre-LN transformer
//! encoder it shares with the CLIP text tower.
//!
//! Reference: transformers `models/clip/modeling_clip.py`
//! (`CLIPVisionEmbeddings`, `CLIPAttention`, `CLIPEncoderLayer`,
//! `CLIPVisionTransformer`).

use candle_core::Tensor;
use candle_nn::{Module, VarBuilder};

use crate::nn::{layer_norm, LayerNorm};

use crate::config::{Activation, ClipVisionConfig};
use crate::fusion::attention::{attend_with, KeySelection};
use crate::nn::{linear, Linear};
use crate::ops::Act;
use crate::{Error, Result};

/// Multi-head self-attention with biased q/k/v/out projections.
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    keys: KeySelection,
}

impl SelfAttention {
    fn new(vb: VarBuilder, hidden: usize, heads: usize, keys: KeySelection) -> Result<Self> {
        Ok(Self {
            q: linear(hidden, hidden, vb.pp("q_proj"))?,
            k: linear(hidden, hidden, vb.pp("k_proj"))?,
            v: linear(hidden, hidden, vb.pp("v_proj"))?,
            out: linear(hidden, hidden, vb.pp("out_proj"))?,
            heads,
            keys,
        })
    }

    /// # Shapes
    /// `x`: (B, T, H); `bias`: additive mask broadcastable to (B, nh, T, T).
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let hd = h / self.heads;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?) // (B, nh, T, hd)
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let ctx = attend_with(&q, &k, &v, bias, self.keys, 0)? // (B, nh, T, hd)
            .transpose(1, 2)?
            .reshape((b, t, h))?;
        self.out.forward(&ctx)
    }
}

/// `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
struct EncoderLayer {
    ln1: LayerNorm,
    attn: SelfAttention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, s: &EncoderSpec) -> Result<Self> {
        Ok(Self {
            ln1: layer_norm(s.hidden, s.eps, vb.pp("layer_norm1"))?,
            attn: SelfAttention::new(vb.pp("self_attn"), s.hidden, s.heads, s.keys)?,
            ln2: layer_norm(s.hidden, s.eps, vb.pp("layer_norm2"))?,
            fc1: linear(s.hidden, s.intermediate, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(s.intermediate, s.hidden, vb.pp("mlp").pp("fc2"))?,
            act: s.act,
        })
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, bias)?)?;
        let h = self.ln2.forward(&x)?;
        let h = match self.act {
            Activation::Gelu => self.fc1.forward_act(&h, Act::GeluErf)?,
            other => other.forward(&self.fc1.forward(&h)?)?,
        };
        let y = self.fc2.forward(&h)?;
        Ok((x + y)?)
    }
}

/// The sizes of a pre-LN encoder stack.
pub struct EncoderSpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub eps: f64,
    pub act: Activation,
    /// Which keys each patch attends to.
    pub keys: KeySelection,
}

/// HF `CLIPEncoder`: a stack of pre-LN layers under `layers.{i}`.
pub struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    pub fn new(vb: VarBuilder, s: &EncoderSpec) -> Result<Self> {
        let layers = (0..s.layers)
            .map(|i| EncoderLayer::new(vb.pp("layers").pp(i), s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Hidden states: the input, then the output of every layer
    /// (`output_hidden_states=True` in HF; length `layers + 1`).
    pub fn forward_all(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Vec<Tensor>> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        states.push(x.clone());
        for layer in &self.layers {
            let next = layer.forward(states.last().expect("non-empty"), bias)?;
            states.push(next);
        }
        Ok(states)
    }

    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, bias)?;
        }
        Ok(x)
    }
}

/// The CLIP vision transformer (`CLIPVisionTransformer`).
pub struct ClipVision {
    patch_weight: Tensor, // (hidden, C·p·p): the patch conv as a matrix
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    encoder: Encoder,
    post_norm: LayerNorm,
    pub config: ClipVisionConfig,
}

/// Output of the vision tower.
pub struct VisionOutput {
    /// Every hidden state, `(B, 1 + N, H)` each; index 0 is the embedding
    /// output after `pre_layrnorm`.
    pub hidden_states: Vec<Tensor>,
    /// `post_layernorm` of the class token, `(B, H)`.
    pub pooled: Tensor,
}

impl ClipVision {
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let (h, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let n = (cfg.image_size / p).pow(2) + 1;
        let e = vb.pp("embeddings");
        let patch_weight = e
            .get((h, c, p, p), "patch_embedding.weight")?
            .reshape((h, c * p * p))?;
        Ok(Self {
            patch_weight,
            class_embedding: e.get(h, "class_embedding")?,
            position_embedding: e.get((n, h), "position_embedding.weight")?,
            // "pre_layrnorm" is HF's spelling.
            pre_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            encoder: Encoder::new(
                vb.pp("encoder"),
                &EncoderSpec {
                    hidden: h,
                    intermediate: cfg.intermediate_size,
                    heads: cfg.num_attention_heads,
                    layers: cfg.num_hidden_layers,
                    eps: cfg.layer_norm_eps,
                    act: cfg.hidden_act,
                    keys: KeySelection::from_config(cfg.attention_top_k, cfg.attention_block_size),
                },
            )?,
            post_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
            config: cfg.clone(),
        })
    }

    /// # Shapes
    /// `pixels`: (B, C, S, S) with S = `image_size` → (B, 1 + (S/p)², H)
    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, c, hh, ww) = pixels.dims4()?;
        if c != cfg.num_channels || hh != cfg.image_size || ww != cfg.image_size {
            return Err(Error::Invalid(format!(
                "the vision tower takes {}×{}×{} images, got {c}×{hh}×{ww}; preprocess with the model's preprocessor_config.json",
                cfg.num_channels, cfg.image_size, cfg.image_size
            )));
        }
        let p = cfg.patch_size;
        let g = cfg.image_size / p;
        // A stride-p, kernel-p conv is a matmul over flattened patches.
        let patches = pixels
            .narrow(2, 0, g * p)?
            .narrow(3, 0, g * p)?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))? // (B, g, g, C, p, p)
            .contiguous()?
            .reshape((b * g * g, c * p * p))?;
        let x = patches
            .matmul(&self.patch_weight.t()?)?
            .reshape((b, g * g, cfg.hidden_size))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, cfg.hidden_size))?
            .repeat((b, 1, 1))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let x = x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        Ok(self.pre_norm.forward(&x)?)
    }

    pub fn forward(&self, pixels: &Tensor) -> Result<VisionOutput> {
        let x = self.embed(pixels)?;
        let hidden_states = self.encoder.forward_all(&x, None)?;
        let last = hidden_states.last().expect("non-empty");
        let pooled = self.post_norm.forward(&last.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(VisionOutput {
            hidden_states,
            pooled,
        })
    }

    /// Only the pooled output (skips keeping every hidden state).
    pub fn pooled(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.encoder.forward(&self.embed(pixels)?, None)?;
        Ok(self.post_norm.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?)
    }
}
