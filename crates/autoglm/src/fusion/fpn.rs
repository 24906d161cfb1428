//! A feature pyramid (Lin et al. 2017) over a vision encoder's stages, with
//! channel attention (squeeze-and-excitation, Hu et al. 2018) and spatial
//! attention (CBAM's, Woo et al. 2018) on each output level.
//!
//! Top-down: every stage goes through a 1×1 lateral convolution to the
//! common width; from the coarsest up, each level adds the level above,
//! upsampled (nearest) to its size; a 3×3 convolution smooths it; then
//! `x ← x·σ(W₂·relu(W₁·avgpool(x)))` per channel and
//! `x ← x·σ(conv₇ₓ₇([mean_c(x); max_c(x)]))` per position.

use candle_core::{Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, Module, VarBuilder};

use crate::nn::{linear_b, Linear};
use crate::{Error, Result};

/// Squeeze-and-excitation: one gate per channel from the pooled map.
pub struct ChannelAttention {
    fc1: Linear,
    fc2: Linear,
}

impl ChannelAttention {
    pub fn new(vb: VarBuilder, channels: usize, reduction: usize) -> Result<Self> {
        let hidden = (channels / reduction.max(1)).max(1);
        Ok(Self {
            fc1: linear_b(channels, hidden, true, vb.pp("fc1"))?,
            fc2: linear_b(hidden, channels, true, vb.pp("fc2"))?,
        })
    }

    /// The gated map and the gates (B, C).
    ///
    /// # Shapes
    /// `x`: (B, C, H, W) → ((B, C, H, W), (B, C))
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let pooled = x.mean(D::Minus1)?.mean(D::Minus1)?; // (B, C)
        let h = self.fc1.forward(&pooled)?.relu()?;
        let g = candle_nn::ops::sigmoid(&self.fc2.forward(&h)?)?;
        let (b, c) = g.dims2()?;
        Ok((x.broadcast_mul(&g.reshape((b, c, 1, 1))?)?, g))
    }
}

/// CBAM's spatial attention: one gate per position from the channel mean
/// and maximum.
pub struct SpatialAttention {
    conv: Conv2d,
}

impl SpatialAttention {
    pub fn new(vb: VarBuilder, kernel: usize) -> Result<Self> {
        if kernel % 2 == 0 {
            return Err(Error::Invalid(format!(
                "spatial attention needs an odd kernel (it keeps the map's size), got {kernel}"
            )));
        }
        let cfg = Conv2dConfig {
            padding: kernel / 2,
            ..Default::default()
        };
        Ok(Self {
            conv: candle_nn::conv2d(2, 1, kernel, cfg, vb.pp("conv"))?,
        })
    }

    /// The gated map and the gates (B, 1, H, W).
    ///
    /// # Shapes
    /// `x`: (B, C, H, W) → ((B, C, H, W), (B, 1, H, W))
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let stats = Tensor::cat(&[x.mean_keepdim(1)?, x.max_keepdim(1)?], 1)?;
        let g = candle_nn::ops::sigmoid(&self.conv.forward(&stats)?)?;
        Ok((x.broadcast_mul(&g)?, g))
    }
}

/// Nearest-neighbour upsampling by whole factors, from differentiable
/// broadcasts.
///
/// # Shapes
/// `x`: (B, C, H, W) → (B, C, H·fh, W·fw)
pub fn upsample_nearest(x: &Tensor, fh: usize, fw: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, fh, w, fw))?
        .contiguous()?
        .reshape((b, c, h * fh, w * fw))?)
}

/// Weight names: `lateral.{i}`, `smooth.{i}`, `channel.{i}`, `spatial.{i}`
/// for stage i (finest first).
pub struct Fpn {
    lateral: Vec<Conv2d>,
    smooth: Vec<Conv2d>,
    channel: Vec<ChannelAttention>,
    spatial: Vec<SpatialAttention>,
    dim: usize,
}

impl Fpn {
    /// `stage_channels`: each stage's channels, finest (largest map) first.
    pub fn new(vb: VarBuilder, stage_channels: &[usize], dim: usize) -> Result<Self> {
        if stage_channels.len() < 2 {
            return Err(Error::Invalid(format!(
                "an FPN needs at least two encoder stages, got {}",
                stage_channels.len()
            )));
        }
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut fpn = Self {
            lateral: Vec::new(),
            smooth: Vec::new(),
            channel: Vec::new(),
            spatial: Vec::new(),
            dim,
        };
        for (i, &c) in stage_channels.iter().enumerate() {
            fpn.lateral.push(candle_nn::conv2d(
                c,
                dim,
                1,
                Default::default(),
                vb.pp(format!("lateral.{i}")),
            )?);
            fpn.smooth.push(candle_nn::conv2d(
                dim,
                dim,
                3,
                pad1,
                vb.pp(format!("smooth.{i}")),
            )?);
            fpn.channel.push(ChannelAttention::new(
                vb.pp(format!("channel.{i}")),
                dim,
                4,
            )?);
            fpn.spatial
                .push(SpatialAttention::new(vb.pp(format!("spatial.{i}")), 7)?);
        }
        Ok(fpn)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The pyramid's levels, finest first, each (B, dim, Hᵢ, Wᵢ). Each
    /// stage's size must be a whole multiple of the next one's.
    pub fn forward(&self, stages: &[Tensor]) -> Result<Vec<Tensor>> {
        if stages.len() != self.lateral.len() {
            return Err(Error::Invalid(format!(
                "the FPN was built for {} stages, got {}",
                self.lateral.len(),
                stages.len()
            )));
        }
        let mut levels: Vec<Tensor> = Vec::with_capacity(stages.len());
        let mut above: Option<Tensor> = None;
        for i in (0..stages.len()).rev() {
            let mut p = self.lateral[i].forward(&stages[i])?;
            if let Some(up) = &above {
                let (_, _, h, w) = p.dims4()?;
                let (_, _, uh, uw) = up.dims4()?;
                if uh == 0 || uw == 0 || h % uh != 0 || w % uw != 0 {
                    return Err(Error::Invalid(format!(
                        "FPN stage {i} is {h}×{w}, not a whole multiple of stage {} ({uh}×{uw})",
                        i + 1
                    )));
                }
                p = (p + upsample_nearest(up, h / uh, w / uw)?)?;
            }
            above = Some(p.clone());
            let s = self.smooth[i].forward(&p)?;
            let (s, _) = self.channel[i].forward(&s)?;
            let (s, _) = self.spatial[i].forward(&s)?;
            levels.push(s);
        }
        levels.reverse();
        Ok(levels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::test_util::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn upsampling_repeats_each_cell() {
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let y = upsample_nearest(&x, 2, 3).unwrap();
        assert_eq!(
            y.squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            [
                [1., 1., 1., 2., 2., 2.],
                [1., 1., 1., 2., 2., 2.],
                [3., 3., 3., 4., 4., 4.],
                [3., 3., 3., 4., 4., 4.]
            ]
        );
    }

    #[test]
    fn attention_gates_on_known_cases() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let ca = ChannelAttention::new(vb.pp("c"), 4, 2).unwrap();
        let sa = SpatialAttention::new(vb.pp("s"), 3).unwrap();
        let x = Tensor::rand(-1f32, 1f32, (2, 4, 5, 5), &dev).unwrap();
        // Zero weights: the gates are σ(bias).
        set(
            &vm,
            "c.fc2.weight",
            Tensor::zeros((4, 2), DType::F32, &dev).unwrap(),
        );
        set(
            &vm,
            "c.fc2.bias",
            Tensor::new(&[0f32, 30., -30., 0.], &dev).unwrap(),
        );
        let (y, g) = ca.forward(&x).unwrap();
        let g = g.to_vec2::<f32>().unwrap();
        assert!((g[1][0] - 0.5).abs() < 1e-6 && g[1][1] > 0.999 && g[1][2] < 1e-6);
        assert!(max_diff(&y.narrow(1, 1, 1).unwrap(), &x.narrow(1, 1, 1).unwrap()) < 1e-5);
        set(
            &vm,
            "s.conv.weight",
            Tensor::zeros((1, 2, 3, 3), DType::F32, &dev).unwrap(),
        );
        set(
            &vm,
            "s.conv.bias",
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
        );
        let (y, g) = sa.forward(&x).unwrap();
        assert_eq!(g.dims(), &[2, 1, 5, 5]);
        assert!(max_diff(&y, &(&x * 0.5).unwrap()) < 1e-6);
        // A kernel that reads only the channel max at the centre: the gate
        // is σ(max_c x) at each position.
        let mut k = vec![0f32; 18];
        k[9 + 4] = 1.0;
        set(
            &vm,
            "s.conv.weight",
            Tensor::from_vec(k, (1, 2, 3, 3), &dev).unwrap(),
        );
        let (_, g) = sa.forward(&x).unwrap();
        let want = candle_nn::ops::sigmoid(&x.max_keepdim(1).unwrap()).unwrap();
        assert!(max_diff(&g, &want) < 1e-6);
        assert!(SpatialAttention::new(vb.pp("bad"), 4).is_err());
    }

    #[test]
    fn top_down_pathway_adds_the_coarser_level() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let fpn = Fpn::new(vb, &[2, 2], 2).unwrap();
        // Identity laterals and smoothing, gates wide open.
        let eye1 = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)
            .unwrap()
            .reshape((2, 2, 1, 1))
            .unwrap();
        let mut k = vec![0f32; 2 * 2 * 9];
        k[4] = 1.0; // out 0 ← in 0, centre
        k[18 + 9 + 4] = 1.0; // out 1 ← in 1, centre
        let eye3 = Tensor::from_vec(k, (2, 2, 3, 3), &dev).unwrap();
        for i in 0..2 {
            set(&vm, &format!("lateral.{i}.weight"), eye1.clone());
            set(
                &vm,
                &format!("lateral.{i}.bias"),
                Tensor::zeros(2, DType::F32, &dev).unwrap(),
            );
            set(&vm, &format!("smooth.{i}.weight"), eye3.clone());
            set(
                &vm,
                &format!("smooth.{i}.bias"),
                Tensor::zeros(2, DType::F32, &dev).unwrap(),
            );
            set(
                &vm,
                &format!("channel.{i}.fc2.weight"),
                Tensor::zeros((2, 1), DType::F32, &dev).unwrap(),
            );
            set(
                &vm,
                &format!("channel.{i}.fc2.bias"),
                Tensor::full(40f32, 2, &dev).unwrap(),
            );
            set(
                &vm,
                &format!("spatial.{i}.conv.weight"),
                Tensor::zeros((1, 2, 7, 7), DType::F32, &dev).unwrap(),
            );
            set(
                &vm,
                &format!("spatial.{i}.conv.bias"),
                Tensor::full(40f32, 1, &dev).unwrap(),
            );
        }
        let fine = Tensor::rand(-1f32, 1f32, (1, 2, 4, 4), &dev).unwrap();
        let coarse = Tensor::rand(-1f32, 1f32, (1, 2, 2, 2), &dev).unwrap();
        let levels = fpn.forward(&[fine.clone(), coarse.clone()]).unwrap();
        assert_eq!(levels[0].dims(), &[1, 2, 4, 4]);
        assert_eq!(levels[1].dims(), &[1, 2, 2, 2]);
        assert!(max_diff(&levels[1], &coarse) < 1e-5);
        let want = (&fine + upsample_nearest(&coarse, 2, 2).unwrap()).unwrap();
        assert!(max_diff(&levels[0], &want) < 1e-5);
        let e = fpn
            .forward(&[
                fine.clone(),
                Tensor::zeros((1, 2, 3, 3), DType::F32, &dev).unwrap(),
            ])
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole multiple"), "{e}");
        assert!(fpn.forward(&[fine]).is_err());
        let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev);
        assert!(Fpn::new(vb, &[8], 4).is_err());
    }
}
