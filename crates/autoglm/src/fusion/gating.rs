//! Fusion of two levels of visual features (an early, low-level stage and
//! the last, high-level one) into one set of tokens, three ways, for the
//! comparison the seed draws: a plain sum, an attention-weighted sum (each
//! token weighs the two levels by a learned score), and dynamic gating (a
//! per-channel sigmoid gate computed from both levels' pooled features, so
//! each image chooses how much of each level every channel takes).

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use crate::nn::{linear_b, Linear};
use crate::{Error, Result};

/// How the two levels combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FusionKind {
    /// `low + high`.
    Add,
    /// `a₀·low + a₁·high`, `a = softmax(w·low, w·high)` per token.
    Attention,
    /// `g ⊙ low + (1 − g) ⊙ high`, `g = σ(W·[mean(low); mean(high)] + b)`
    /// per image and channel.
    Gate,
}

/// Weight names: `low_proj`/`high_proj` (each level to the common width),
/// then `score` (attention) or `gate` (gating).
pub struct LevelFusion {
    kind: FusionKind,
    low_proj: Linear,
    high_proj: Linear,
    score: Option<Linear>,
    gate: Option<Linear>,
}

impl LevelFusion {
    /// `low_dim` and `high_dim` are the two levels' widths, `dim` the
    /// fused width.
    pub fn new(
        vb: VarBuilder,
        kind: FusionKind,
        low_dim: usize,
        high_dim: usize,
        dim: usize,
    ) -> Result<Self> {
        if low_dim == 0 || high_dim == 0 || dim == 0 {
            return Err(Error::Invalid(format!(
                "feature fusion needs two feature levels of positive width, got low {low_dim}, high {high_dim}, fused {dim}"
            )));
        }
        Ok(Self {
            kind,
            low_proj: linear_b(low_dim, dim, true, vb.pp("low_proj"))?,
            high_proj: linear_b(high_dim, dim, true, vb.pp("high_proj"))?,
            score: (kind == FusionKind::Attention)
                .then(|| linear_b(dim, 1, false, vb.pp("score")))
                .transpose()?,
            gate: (kind == FusionKind::Gate)
                .then(|| linear_b(2 * dim, dim, true, vb.pp("gate")))
                .transpose()?,
        })
    }

    pub fn kind(&self) -> FusionKind {
        self.kind
    }

    /// The fused tokens and, for gating, the gate (B, dim) it applied.
    ///
    /// # Shapes
    /// `low`: (B, N, low_dim), `high`: (B, N, high_dim) on the same N
    /// tokens (resample one level to the other's grid first) → (B, N, dim)
    pub fn forward(&self, low: &Tensor, high: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let (b, n, _) = low.dims3()?;
        let (bh, nh, _) = high.dims3()?;
        if (b, n) != (bh, nh) {
            return Err(Error::Invalid(format!(
                "feature fusion: the levels must cover the same tokens, got {b}×{n} low and {bh}×{nh} high"
            )));
        }
        let l = self.low_proj.forward(low)?;
        let h = self.high_proj.forward(high)?;
        Ok(match self.kind {
            FusionKind::Add => ((l + h)?, None),
            FusionKind::Attention => {
                let score = self.score.as_ref().expect("built with a score layer");
                let s = Tensor::cat(&[score.forward(&l)?, score.forward(&h)?], D::Minus1)?; // (B, N, 2)
                let a = crate::ops::softmax_last_dim(&s)?;
                let fused = (l.broadcast_mul(&a.narrow(D::Minus1, 0, 1)?)?
                    + h.broadcast_mul(&a.narrow(D::Minus1, 1, 1)?)?)?;
                (fused, None)
            }
            FusionKind::Gate => {
                let gate = self.gate.as_ref().expect("built with a gate layer");
                let pooled = Tensor::cat(&[l.mean(1)?, h.mean(1)?], D::Minus1)?; // (B, 2·dim)
                let g = candle_nn::ops::sigmoid(&gate.forward(&pooled)?)?; // (B, dim)
                let gu = g.unsqueeze(1)?;
                let fused = (l.broadcast_mul(&gu)? + h.broadcast_mul(&(1.0 - &gu)?)?)?;
                (fused, Some(g))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::test_util::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn build(kind: FusionKind) -> (VarMap, LevelFusion) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let f = LevelFusion::new(vb, kind, 3, 5, 4).unwrap();
        (vm, f)
    }

    #[test]
    fn the_three_fusions_on_known_cases() {
        let low = rand(&[2, 6, 3], 1);
        let high = rand(&[2, 6, 5], 2);
        let (vm, add) = build(FusionKind::Add);
        let (sum, g) = add.forward(&low, &high).unwrap();
        assert!(g.is_none());
        let l = add.low_proj.forward(&low).unwrap();
        let h = add.high_proj.forward(&high).unwrap();
        assert_eq!(max_diff(&sum, &(&l + &h).unwrap()), 0.0);
        drop(vm);

        // Attention with a zero score layer weighs both levels ½.
        let (vm, att) = build(FusionKind::Attention);
        set(
            &vm,
            "score.weight",
            Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap(),
        );
        let (y, _) = att.forward(&low, &high).unwrap();
        let l = att.low_proj.forward(&low).unwrap();
        let h = att.high_proj.forward(&high).unwrap();
        assert!(max_diff(&y, &((&l + &h).unwrap() * 0.5).unwrap()) < 1e-6);

        // A gate with zero weights is σ(b): b = 0 halves, b ≫ 0 keeps low,
        // b ≪ 0 keeps high.
        let (vm, gate) = build(FusionKind::Gate);
        let l = gate.low_proj.forward(&low).unwrap();
        let h = gate.high_proj.forward(&high).unwrap();
        set(
            &vm,
            "gate.weight",
            Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap(),
        );
        for (bias, want) in [
            (0f32, ((&l + &h).unwrap() * 0.5).unwrap()),
            (30.0, l.clone()),
            (-30.0, h.clone()),
        ] {
            set(
                &vm,
                "gate.bias",
                Tensor::full(bias, 4, &Device::Cpu).unwrap(),
            );
            let (y, g) = gate.forward(&low, &high).unwrap();
            assert_eq!(g.unwrap().dims(), &[2, 4]);
            assert!(max_diff(&y, &want) < 1e-5, "bias {bias}");
        }
    }

    #[test]
    fn the_gate_depends_on_the_image_and_channel() {
        let (_vm, gate) = build(FusionKind::Gate);
        let low = rand(&[2, 6, 3], 3);
        let high = rand(&[2, 6, 5], 4);
        let (_, g) = gate.forward(&low, &high).unwrap();
        let g = g.unwrap().to_vec2::<f32>().unwrap();
        assert!(g.iter().flatten().all(|&x| x > 0.0 && x < 1.0));
        assert_ne!(g[0], g[1], "two images, two gates");
        assert!(
            g[0].windows(2).any(|w| w[0] != w[1]),
            "one gate per channel"
        );
    }

    #[test]
    fn levels_on_different_tokens_are_refused() {
        let (_vm, f) = build(FusionKind::Gate);
        let e = f
            .forward(&rand(&[2, 6, 3], 1), &rand(&[2, 4, 5], 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("same tokens"), "{e}");
        let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
        assert!(LevelFusion::new(vb, FusionKind::Gate, 0, 5, 4).is_err());
    }
}
