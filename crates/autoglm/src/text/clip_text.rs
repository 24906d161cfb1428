//! The CLIP text tower (`CLIPTextTransformer`): token + position embeddings,
//! a causal pre-LN encoder, a final LayerNorm and EOS pooling.

use candle_core::{DType, Device, Tensor};
use candle_nn::{embedding, Embedding, Module, VarBuilder};

use crate::nn::{layer_norm, LayerNorm};

use crate::config::ClipTextConfig;
use crate::vision::vit::{Encoder, EncoderSpec};
use crate::{Error, Result};

pub struct ClipText {
    token_embedding: Embedding,
    position_embedding: Embedding,
    encoder: Encoder,
    final_norm: LayerNorm,
    pub config: ClipTextConfig,
}

impl ClipText {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        Ok(Self {
            token_embedding: embedding(cfg.vocab_size, h, e.pp("token_embedding"))?,
            position_embedding: embedding(
                cfg.max_position_embeddings,
                h,
                e.pp("position_embedding"),
            )?,
            encoder: Encoder::new(
                vb.pp("encoder"),
                &EncoderSpec {
                    hidden: h,
                    intermediate: cfg.intermediate_size,
                    heads: cfg.num_attention_heads,
                    layers: cfg.num_hidden_layers,
                    eps: cfg.layer_norm_eps,
                    act: cfg.hidden_act,
                    keys: crate::fusion::attention::KeySelection::Dense,
                },
            )?,
            final_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            config: cfg.clone(),
        })
    }

    /// Pooled output: the final hidden state at each row's EOS token.
    ///
    /// Rows are right-padded; `mask` marks real tokens. With the causal mask
    /// nothing after EOS can change it, so padding never alters the result.
    ///
    /// # Shapes
    /// `ids`, `mask`: (B, T) u32 → (B, H)
    pub fn pooled(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "text of {t} tokens exceeds the text tower's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let dev = ids.device();
        let pos = Tensor::arange(0u32, t as u32, dev)?;
        let x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&pos)?)?;
        let bias = causal_and_padding_bias(mask, dev)?;
        let x = self
            .final_norm
            .forward(&self.encoder.forward(&x, Some(&bias))?)?;
        let eos = self.eos_positions(ids)?;
        let rows = (0..b)
            .map(|i| x.get(i)?.get(eos[i]))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// HF: with the legacy `eos_token_id == 2` the EOS is the largest id in
    /// the row; otherwise the first occurrence of `eos_token_id`.
    fn eos_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        Ok(eos_positions(
            &ids.to_vec2::<u32>()?,
            self.config.eos_token_id,
        ))
    }
}

/// EOS position of each row, as HF's `CLIPTextTransformer` finds it.
fn eos_positions(rows: &[Vec<u32>], eos_token_id: u32) -> Vec<usize> {
    rows.iter()
        .map(|r| {
            if eos_token_id == 2 {
                // Legacy configs (OpenAI CLIP's): the largest id, first if tied.
                let max = r.iter().copied().max().unwrap_or(0);
                r.iter().position(|&id| id == max).unwrap_or(0)
            } else {
                r.iter().position(|&id| id == eos_token_id).unwrap_or(0)
            }
        })
        .collect()
}

/// Additive mask `(B, 1, T, T)`: −∞-like above the diagonal and at padding.
fn causal_and_padding_bias(mask: &Tensor, dev: &Device) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let causal: Vec<f32> = (0..t * t)
        .map(|i| if i % t > i / t { -1e9 } else { 0.0 })
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, t, t), dev)?;
    let pad = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, t))?;
    Ok(causal.broadcast_add(&pad)?)
}

#[cfg(test)]
mod tests {
    use super::eos_positions;

    #[test]
    fn eos_follows_hf_for_legacy_and_new_configs() {
        // Legacy (eos_token_id == 2): argmax of the ids, whatever the EOS id.
        let rows = vec![
            vec![49406, 320, 1929, 49407, 0, 0],
            vec![49406, 49407, 49407, 49407, 49407, 49407],
        ];
        assert_eq!(eos_positions(&rows, 2), vec![3, 1]);
        // New configs: first occurrence of the EOS id, even when a larger id comes first.
        let rows = vec![vec![7, 900, 5, 3, 3], vec![7, 3, 900, 3, 3]];
        assert_eq!(eos_positions(&rows, 3), vec![3, 1]);
        assert_eq!(eos_positions(&rows, 2), vec![1, 2]);
    }
}
