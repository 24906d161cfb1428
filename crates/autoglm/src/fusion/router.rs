//! A learned router that sends each input down a light path (fewer decoder
//! layers, or pooled image tokens) or the full one.
//!
//! Training runs both paths and mixes their per-example losses by the
//! router's probability `p` of the full path, plus a cost penalty:
//! `L = mean(p·L_full + (1 − p)·L_light) + λ·mean(p·c_full + (1 − p)·c_light)`,
//! so `p` rises where the full path's loss is lower by more than λ times its
//! extra cost. At inference the router decides alone (`p ≥ threshold` →
//! full) and reports the path each input took.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use crate::nn::{linear_b, Linear};
use crate::{Error, Result};

/// The two paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    Light,
    Full,
}

/// What each path costs (any unit: FLOPs, measured ms), for the penalty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteCost {
    pub light: f64,
    pub full: f64,
}

/// Weight names: `score.weight`, `score.bias`.
pub struct Router {
    score: Linear,
    threshold: f64,
}

impl Router {
    /// `dim`: the width of the pooled features the router reads.
    pub fn new(vb: VarBuilder, dim: usize, threshold: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&threshold) {
            return Err(Error::Invalid(format!(
                "router threshold must be in [0, 1], got {threshold}"
            )));
        }
        Ok(Self {
            score: linear_b(dim, 1, true, vb.pp("score"))?,
            threshold,
        })
    }

    /// The probability that each input needs the full path.
    ///
    /// # Shapes
    /// `pooled`: (B, dim) → (B)
    pub fn probability(&self, pooled: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::sigmoid(&self.score.forward(pooled)?)?.squeeze(D::Minus1)?)
    }

    /// The path each input takes at inference.
    pub fn route(&self, pooled: &Tensor) -> Result<Vec<Route>> {
        Ok(self
            .probability(pooled)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|p| {
                if f64::from(p) >= self.threshold {
                    Route::Full
                } else {
                    Route::Light
                }
            })
            .collect())
    }
}

/// The router's training loss (see the module docs).
///
/// # Shapes
/// `p`, `loss_full`, `loss_light`: (B) → scalar
pub fn routed_loss(
    p: &Tensor,
    loss_full: &Tensor,
    loss_light: &Tensor,
    cost: RouteCost,
    lambda: f64,
) -> Result<Tensor> {
    if lambda < 0.0 || cost.light < 0.0 || cost.full < cost.light {
        return Err(Error::Invalid(format!(
            "router: need λ ≥ 0 and 0 ≤ light cost ≤ full cost, got λ = {lambda}, costs {} and {}",
            cost.light, cost.full
        )));
    }
    let q = (1.0 - p)?;
    let task = ((p * loss_full)? + (&q * loss_light)?)?.mean_all()?;
    let spend = ((p * cost.full)? + (q * cost.light)?)?.mean_all()?;
    Ok((task + (spend * lambda)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn the_penalty_trades_loss_against_cost() {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[0.5f32, 0.2, 0.9], &dev).unwrap()).unwrap();
        let full = Tensor::new(&[0.1f32, 1.0, 0.3], &dev).unwrap();
        let light = Tensor::new(&[0.9f32, 1.1, 0.2], &dev).unwrap();
        let cost = RouteCost {
            light: 1.0,
            full: 3.0,
        };
        let lambda = 0.1;
        let l = routed_loss(p.as_tensor(), &full, &light, cost, lambda).unwrap();
        // By hand: mean of p·L_full + (1−p)·L_light, plus λ·mean(p·3 + (1−p)·1).
        let ps = [0.5f64, 0.2, 0.9];
        let (lf, ll) = ([0.1f64, 1.0, 0.3], [0.9f64, 1.1, 0.2]);
        let want: f64 = (0..3)
            .map(|i| ps[i] * lf[i] + (1.0 - ps[i]) * ll[i] + lambda * (ps[i] * 3.0 + (1.0 - ps[i])))
            .sum::<f64>()
            / 3.0;
        assert!((f64::from(l.to_scalar::<f32>().unwrap()) - want).abs() < 1e-6);
        // dL/dp_i = (L_full − L_light + λ·(c_full − c_light)) / B: the
        // first input gains from the full path (p should rise: negative
        // gradient), the second barely does and pays the cost, the third
        // loses.
        let g = l.backward().unwrap();
        let gp = g.get(p.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for i in 0..3 {
            let want = (lf[i] - ll[i] + lambda * 2.0) / 3.0;
            assert!(
                (f64::from(gp[i]) - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                gp[i]
            );
        }
        assert!(gp[0] < 0.0 && gp[1] > 0.0 && gp[2] > 0.0);
        let bad = RouteCost {
            light: 2.0,
            full: 1.0,
        };
        assert!(routed_loss(p.as_tensor(), &full, &light, bad, lambda).is_err());
    }

    #[test]
    fn routes_follow_the_threshold() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let r = Router::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), 2, 0.5).unwrap();
        {
            let vars = vm.data().lock().unwrap();
            vars["score.weight"]
                .set(&Tensor::new(&[[4f32, 0.]], &dev).unwrap())
                .unwrap();
            vars["score.bias"]
                .set(&Tensor::new(&[0f32], &dev).unwrap())
                .unwrap();
        }
        let x = Tensor::new(&[[1f32, 9.], [-1., 9.], [0., -3.]], &dev).unwrap();
        let p = r.probability(&x).unwrap().to_vec1::<f32>().unwrap();
        assert!((p[0] - 0.98201376).abs() < 1e-6 && (p[2] - 0.5).abs() < 1e-7);
        assert_eq!(
            r.route(&x).unwrap(),
            [Route::Full, Route::Light, Route::Full]
        );
        assert!(Router::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), 2, 1.5).is_err());
    }
}
