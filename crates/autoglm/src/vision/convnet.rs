//! A small convolutional image encoder trained from scratch, after the
//! relation network's (Santoro et al. 2017, §4: four 3×3 stride-2
//! convolutions with ReLU, whose last map's cells are the "objects").
//!
//! Each cell of the last map becomes one image token: its channels,
//! layer-normed, then its (x, y) centre in [-1, 1] — the decoder's 1-D
//! positions do not say where a cell lies in the image, and Sort-of-CLEVR
//! asks left/right, top/bottom and nearest/furthest.
//!
//! Two optional fusions of the last two stages, both kept on the last
//! stage's grid (the stage before is average-pooled 2×2 onto it), so that
//! every variant gives the decoder the same tokens:
//! - `fpn`: a feature pyramid with channel and spatial attention over the
//!   two stages ([`Fpn`]); its levels replace the raw stages;
//! - `fusion`: how the two levels combine ([`LevelFusion`]: add, attention
//!   weighted, or a dynamic per-channel gate). With `fpn` and no `fusion`,
//!   the levels are added; with neither, the last stage alone is used.

use candle_core::{Tensor, D};
use candle_nn::{Module, VarBuilder};

use crate::fusion::fpn::Fpn;
use crate::fusion::gating::{FusionKind, LevelFusion};
use crate::nn::{layer_norm, LayerNorm};
use crate::ops::Act;
use crate::{Error, Result};

/// The resolved shape of a [`ConvNet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvNetConfig {
    /// Channels of every convolution (and of the fused features).
    pub channels: usize,
    /// Stride-2 convolutions.
    pub layers: usize,
    /// Side of the square input; a multiple of 2^layers, so that every
    /// stage halves the one before exactly.
    pub image_size: usize,
    pub fusion: Option<FusionKind>,
    pub fpn: bool,
    /// Normalise each convolution's output per image and channel over its
    /// cells (instance norm, with a learned gain and shift in place of the
    /// bias) before the ReLU.
    pub norm: bool,
}

impl ConvNetConfig {
    /// `layers` convolutions of `channels` on `image_size`², the last
    /// stage alone (no fusion, no FPN).
    pub fn plain(channels: usize, layers: usize, image_size: usize) -> Self {
        Self {
            channels,
            layers,
            image_size,
            fusion: None,
            fpn: false,
            norm: false,
        }
    }

    /// The training-config field behind a field [`Self::check`] names
    /// (its `vision_config` name).
    pub fn training_field(field: &str) -> &str {
        match field {
            "hidden_size" => "vision_hidden",
            "num_hidden_layers" => "vision_layers",
            other => other,
        }
    }

    /// Side of the token grid.
    pub fn grid(&self) -> usize {
        self.image_size >> self.layers
    }

    /// Image tokens per image.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Width of each token: the channels and the two coordinates.
    pub fn token_width(&self) -> usize {
        self.channels + 2
    }

    /// What cannot describe an encoder, as `(field, why)`.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.channels == 0 {
            return Err(("hidden_size", "the convolutions need channels".into()));
        }
        if self.layers == 0 || self.layers > 8 {
            return Err((
                "num_hidden_layers",
                format!("{} stride-2 convolutions: use 1 to 8", self.layers),
            ));
        }
        let step = 1usize << self.layers;
        if self.image_size == 0 || self.image_size % step != 0 {
            return Err((
                "image_size",
                format!(
                    "{} is not a positive multiple of 2^{} = {step}: each convolution halves the map, and the fusions pool one stage exactly onto the next",
                    self.image_size, self.layers
                ),
            ));
        }
        if (self.fusion.is_some() || self.fpn) && self.layers < 2 {
            let field = if self.fpn { "fpn" } else { "feature_fusion" };
            return Err((
                field,
                format!(
                    "fusing feature levels needs two stages, but the encoder has {} convolution",
                    self.layers
                ),
            ));
        }
        Ok(())
    }
}

/// Weight names: `conv.{i}`, `fpn.*`, `level_fusion.*`, `post_norm`.
pub struct ConvNet {
    convs: Vec<StridedConv>,
    fpn: Option<Fpn>,
    fusion: Option<LevelFusion>,
    norm: LayerNorm,
    cfg: ConvNetConfig,
}

impl ConvNet {
    pub fn new(vb: VarBuilder, cfg: &ConvNetConfig) -> Result<Self> {
        cfg.check()
            .map_err(|(field, why)| Error::Invalid(format!("vision_config.{field}: {why}")))?;
        let c = cfg.channels;
        let convs = (0..cfg.layers)
            .map(|i| {
                let cin = if i == 0 { 3 } else { c };
                StridedConv::new(vb.pp(format!("conv.{i}")), cin, c, cfg.norm)
            })
            .collect::<Result<Vec<_>>>()?;
        let fpn = cfg
            .fpn
            .then(|| Fpn::new(vb.pp("fpn"), &[c, c], c))
            .transpose()?;
        // FPN levels without a chosen fusion are added.
        let kind = cfg.fusion.or(cfg.fpn.then_some(FusionKind::Add));
        let fusion = kind
            .map(|k| LevelFusion::new(vb.pp("level_fusion"), k, c, c, c))
            .transpose()?;
        Ok(Self {
            convs,
            fpn,
            fusion,
            norm: layer_norm(c, 1e-5, vb.pp("post_norm"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ConvNetConfig {
        &self.cfg
    }

    /// Every stage's map, first to last.
    ///
    /// # Shapes
    /// `pixels`: (B, 3, S, S) → [(B, C, S/2, S/2), …, (B, C, S/2^L, S/2^L)]
    pub fn stages(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let (_, ch, h, w) = pixels.dims4()?;
        // Trained at image_size; a router's light path feeds a smaller
        // image whose side the strides also divide (a smaller grid).
        let (s, step) = (self.cfg.image_size, 1usize << self.cfg.layers);
        if ch != 3 || h != w || h == 0 || h % step != 0 {
            return Err(Error::Invalid(format!(
                "the convolutional encoder takes 3×{s}×{s} images (or square ones whose side is a multiple of {step}), got {ch}×{h}×{w}; resize with the model's preprocessor"
            )));
        }
        let mut x = pixels.clone();
        let mut out = Vec::with_capacity(self.convs.len());
        for conv in &self.convs {
            x = conv.forward(&x)?.relu()?;
            out.push(x.clone());
        }
        Ok(out)
    }

    /// The image tokens, with the fusion gate when the fusion is a gate.
    ///
    /// # Shapes
    /// `pixels`: (B, 3, S, S) → (B, g², C + 2) with g = S/2^L, and (B, C)
    pub fn forward_with_gate(&self, pixels: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let stages = self.stages(pixels)?;
        let last = &stages[stages.len() - 1];
        let (b, c, g, _) = last.dims4()?;
        let as_tokens = |m: &Tensor| -> Result<Tensor> {
            Ok(m.flatten_from(2)?.transpose(1, 2)?) // (B, g², C)
        };
        let (feats, gate) = match &self.fusion {
            None => (as_tokens(last)?, None),
            Some(fusion) => {
                let pair = &stages[stages.len() - 2..];
                let levels = match &self.fpn {
                    Some(fpn) => fpn.forward(pair)?,
                    None => pair.to_vec(),
                };
                let low = as_tokens(&levels[0].avg_pool2d(2)?)?;
                let high = as_tokens(&levels[1])?;
                fusion.forward(&low, &high)?
            }
        };
        let feats = self.norm.forward(&feats)?;
        let coords = grid_coords(g, feats.device())?
            .unsqueeze(0)?
            .broadcast_as((b, g * g, 2))?;
        debug_assert_eq!(c, self.cfg.channels);
        Ok((Tensor::cat(&[&feats, &coords], D::Minus1)?, gate))
    }

    /// The image tokens.
    ///
    /// # Shapes
    /// `pixels`: (B, 3, S, S) → (B, g², C + 2)
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_gate(pixels)?.0)
    }
}

/// A 3×3 convolution of stride 2 and padding 1 (`weight` (out, in, 3, 3),
/// `bias` (out), as `candle_nn::Conv2d`), computed as one gather of the
/// nine taps of every output cell and one matrix product.
///
/// The result is candle's `conv2d`, but the backward pass is the product's
/// and the gather's (a scatter-add), not candle's CPU `conv_transpose2d`.
/// On the Sort-of-CLEVR encoder (64 images of 80², four layers of 24
/// channels, one thread, beside a training run) the backward pass took
/// 0.40 s against 0.72–0.83 s with candle's `conv2d`; the forward pass is
/// as fast.
///
/// With `norm`, the bias is replaced by an instance norm (`norm.weight`,
/// `norm.bias`): each image's channel is normalised over its cells.
struct StridedConv {
    weight: Tensor,
    after: AfterConv,
}

/// What follows the product, before the activation.
enum AfterConv {
    Bias(Tensor),
    /// Instance norm: normalised per image and channel, then `· gain + shift`.
    Norm {
        gain: Tensor,
        shift: Tensor,
    },
}

impl StridedConv {
    fn new(vb: VarBuilder, cin: usize, cout: usize, norm: bool) -> Result<Self> {
        let bound = 1.0 / ((cin * 9) as f64).sqrt();
        let weight = vb.get_with_hints(
            (cout, cin, 3, 3),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        if norm {
            let n = vb.pp("norm");
            return Ok(Self {
                weight,
                after: AfterConv::Norm {
                    gain: n.get_with_hints(cout, "weight", candle_nn::Init::Const(1.0))?,
                    shift: n.get_with_hints(cout, "bias", candle_nn::Init::Const(0.0))?,
                },
            });
        }
        let bias = vb.get_with_hints(
            cout,
            "bias",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Self {
            weight,
            after: AfterConv::Bias(bias),
        })
    }

    /// # Shapes
    /// `x`: (B, C, H, W) → (B, out, ⌈H/2⌉, ⌈W/2⌉)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
        let (hp, wp) = (h + 2, w + 2);
        // Tap (ky, kx) of image i's output (y, x) reads its padded
        // (2y + ky, 2x + kx); columns in (tap, image, cell) order.
        let idx: Vec<u32> = (0..9 * b * ho * wo)
            .map(|k| {
                let (t, i, p) = (k / (b * ho * wo), k / (ho * wo) % b, k % (ho * wo));
                let (y, x) = (2 * (p / wo) + t / 3, 2 * (p % wo) + t % 3);
                (i * hp * wp + y * wp + x) as u32
            })
            .collect();
        let idx = Tensor::from_vec(idx, 9 * b * ho * wo, x.device())?;
        // (C·9, B·ho·wo): rows in the weight's (c, ky, kx) order.
        let patches = x
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .transpose(0, 1)?
            .reshape((c, b * hp * wp))?
            .index_select(&idx, 1)?
            .reshape((c * 9, b * ho * wo))?;
        let cout = self.weight.dim(0)?;
        // (B·ho·wo, out): the bias on the last dim, where its gradient is
        // one matrix-vector product (`ops::bias_act`).
        let y = patches
            .t()?
            .matmul(&self.weight.reshape((cout, c * 9))?.t()?)?;
        let y = match &self.after {
            AfterConv::Norm { gain, shift } => {
                // Over each image's cells: (B, cells, out).
                let y = y.reshape((b, ho * wo, cout))?;
                let mean = y.mean_keepdim(1)?;
                let centred = y.broadcast_sub(&mean)?;
                let var = centred.sqr()?.mean_keepdim(1)?;
                let normed = centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
                crate::ops::bias_act(&normed.broadcast_mul(gain)?, shift, Act::None)?
            }
            AfterConv::Bias(bias) => crate::ops::bias_act(&y, bias, Act::None)?,
        };
        Ok(y.reshape((b, ho, wo, cout))?.permute((0, 3, 1, 2))?)
    }
}

/// The centre of each cell of a g×g grid, row-major, as (x, y) in [-1, 1]
/// (x grows to the right, y downwards, as in the image).
///
/// # Shapes
/// → (g², 2)
pub fn grid_coords(g: usize, device: &candle_core::Device) -> Result<Tensor> {
    let at = |i: usize| ((2 * i + 1) as f32 / g as f32) - 1.0;
    let v: Vec<f32> = (0..g * g).flat_map(|k| [at(k % g), at(k / g)]).collect();
    Ok(Tensor::from_vec(v, (g * g, 2), device)?)
}

/// Sines and cosines of coordinates at `n` frequencies ω = π/2, π, 2π, …:
/// for each ω in turn, sin(ω x), cos(ω x), sin(ω y), cos(ω y). Two points'
/// features have the dot product Σ cos(ω Δx) + cos(ω Δy), which depends
/// only on how far apart they are (and is largest at 0).
///
/// # Shapes
/// `x`, `y`: (…, 1) → (…, 4n)
pub fn fourier_coords(x: &Tensor, y: &Tensor, n: usize) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(4 * n);
    for k in 0..n {
        let w = std::f64::consts::FRAC_PI_2 * (1u64 << k) as f64;
        for c in [x, y] {
            let a = (c * w)?;
            parts.push(a.sin()?);
            parts.push(a.cos()?);
        }
    }
    Ok(Tensor::cat(&parts, D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::test_util::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn cfg(fusion: Option<FusionKind>, fpn: bool) -> ConvNetConfig {
        ConvNetConfig {
            channels: 8,
            layers: 3,
            image_size: 32,
            fusion,
            fpn,
            norm: false,
        }
    }

    fn build(c: &ConvNetConfig, seed: u64) -> (VarMap, ConvNet) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let net = ConvNet::new(vb, c).unwrap();
        crate::train::vqa::init_weights(&vm, seed, None).unwrap();
        (vm, net)
    }

    /// The strided convolution is candle's `conv2d` (stride 2, padding 1):
    /// forward on even, odd and non-square sides, backward on square ones.
    #[test]
    fn strided_conv_equals_candle_conv2d() {
        use candle_core::Var;
        for (h, w) in [(8, 8), (7, 7), (7, 10), (5, 3)] {
            let x = Var::from_tensor(&rand(&[2, 3, h, w], 1)).unwrap();
            let weight = Var::from_tensor(&rand(&[4, 3, 3, 3], 2)).unwrap();
            let bias = Var::from_tensor(&rand(&[4], 3)).unwrap();
            let ours = StridedConv {
                weight: weight.as_tensor().clone(),
                after: AfterConv::Bias(bias.as_tensor().clone()),
            }
            .forward(x.as_tensor())
            .unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(weight.as_tensor(), 1, 2, 1, 1) // padding, stride, dilation, groups
                .unwrap()
                .broadcast_add(&bias.as_tensor().reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "{h}×{w}");
            assert!(max_diff(&ours, &theirs) < 1e-5, "{h}×{w}");
            // The same loss through each: the same gradients.
            let probe = rand(ours.dims(), 4);
            let grads = |y: &Tensor| {
                y.mul(&probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            if h != w {
                // candle's conv2d backward fails on some (7×10: a shape error).
                continue;
            }
            let (g1, g2) = (grads(&ours), grads(&theirs));
            for v in [&x, &weight, &bias] {
                let (a, b) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(max_diff(a, b) < 1e-4, "{h}×{w}: {}", max_diff(a, b));
            }
        }
    }

    /// With the norm, each image's channel is candle's convolution
    /// normalised over its cells (by hand), times the gain, plus the shift.
    #[test]
    fn instance_norm_normalises_each_image_and_channel() {
        let x = rand(&[2, 3, 9, 7], 1);
        let weight = rand(&[4, 3, 3, 3], 2);
        let (gain, shift) = ([1f32, 2.0, 0.5, -1.0], [0f32, 1.0, -2.0, 0.5]);
        let conv = StridedConv {
            weight: weight.clone(),
            after: AfterConv::Norm {
                gain: Tensor::new(&gain, &Device::Cpu).unwrap(),
                shift: Tensor::new(&shift, &Device::Cpu).unwrap(),
            },
        };
        // (B·C, cells): row img·4 + c is image img's channel c.
        let rows = |t: Tensor| -> Vec<Vec<f32>> {
            t.flatten_from(2)
                .unwrap()
                .flatten_to(1)
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        let ours = rows(conv.forward(&x).unwrap());
        let plain = rows(x.conv2d(&weight, 1, 2, 1, 1).unwrap());
        assert_eq!(ours.len(), 8);
        for (r, (got, cells)) in ours.iter().zip(&plain).enumerate() {
            let c = r % 4;
            let n = cells.len() as f32;
            let mean = cells.iter().sum::<f32>() / n;
            let var = cells.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
            for (g, v) in got.iter().zip(cells) {
                let want = (v - mean) / (var + 1e-5).sqrt() * gain[c] + shift[c];
                assert!((g - want).abs() < 1e-4, "row {r}: {g} vs {want}");
            }
        }
    }

    #[test]
    fn coordinates_follow_the_image_axes() {
        let c = grid_coords(2, &Device::Cpu).unwrap();
        assert_eq!(
            c.to_vec2::<f32>().unwrap(),
            vec![
                vec![-0.5, -0.5],
                vec![0.5, -0.5],
                vec![-0.5, 0.5],
                vec![0.5, 0.5]
            ]
        );
    }

    #[test]
    fn fourier_coordinates_are_sines_and_cosines_whose_dot_product_is_the_distance_kernel() {
        let x = Tensor::new(&[[0.5f32], [-0.25]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[-1.0f32], [0.75]], &Device::Cpu).unwrap();
        let f = fourier_coords(&x, &y, 2).unwrap().to_vec2::<f32>().unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        // ω = π/2: sin, cos of x = 0.5, then of y = -1; ω = π: the same.
        let first = [h, h, -1.0, 0.0, 1.0, 0.0, 0.0, -1.0];
        assert_eq!(f[0].len(), 8);
        for (got, want) in f[0].iter().zip(first) {
            assert!((got - want).abs() < 1e-6, "{:?}", f[0]);
        }
        // Σ_ω cos(ω Δx) + cos(ω Δy) for Δ = (0.75, -1.75).
        let dot: f32 = f[0].iter().zip(&f[1]).map(|(a, b)| a * b).sum();
        let want: f32 = [std::f32::consts::FRAC_PI_2, std::f32::consts::PI]
            .iter()
            .map(|w| (w * 0.75).cos() + (w * -1.75).cos())
            .sum();
        assert!((dot - want).abs() < 1e-5, "{dot} vs {want}");
    }

    #[test]
    fn every_variant_gives_the_last_grid_with_coordinates() {
        let px = rand(&[2, 3, 32, 32], 1);
        for (fusion, fpn) in [
            (None, false),
            (Some(FusionKind::Add), false),
            (Some(FusionKind::Attention), false),
            (Some(FusionKind::Gate), false),
            (None, true),
            (Some(FusionKind::Gate), true),
        ] {
            let c = cfg(fusion, fpn);
            let (_, net) = build(&c, 3);
            let (t, gate) = net.forward_with_gate(&px).unwrap();
            assert_eq!(t.dims(), &[2, 16, 10], "{fusion:?} fpn={fpn}");
            assert_eq!(gate.is_some(), fusion == Some(FusionKind::Gate));
            // The last two channels are the cell centres, per image.
            let coords = t.narrow(2, 8, 2).unwrap();
            let want = grid_coords(4, &Device::Cpu).unwrap();
            for b in 0..2 {
                assert_eq!(max_diff(&coords.get(b).unwrap(), &want), 0.0);
            }
        }
    }

    /// With no fusion, the tokens are the last stage's cells, layer-normed:
    /// checked by reading one cell out of the map by hand.
    #[test]
    fn plain_tokens_are_the_last_stage_cells() {
        let c = cfg(None, false);
        let (_, net) = build(&c, 5);
        let px = rand(&[1, 3, 32, 32], 2);
        let stages = net.stages(&px).unwrap();
        assert_eq!(
            stages.iter().map(|s| s.dims()[2]).collect::<Vec<_>>(),
            vec![16, 8, 4]
        );
        let t = net.forward(&px).unwrap();
        // Cell (row 2, column 1) is token 2·4 + 1.
        let cell: Vec<f32> = stages[2]
            .get(0)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap()
            .iter()
            .map(|ch| ch[2][1])
            .collect();
        let mean = cell.iter().sum::<f32>() / 8.0;
        let var = cell.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 8.0;
        let normed: Vec<f32> = cell
            .iter()
            .map(|v| (v - mean) / (var + 1e-5).sqrt())
            .collect();
        let got = t.get(0).unwrap().get(9).unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in got[..8].iter().zip(&normed) {
            assert!((a - b).abs() < 1e-4, "{got:?} vs {normed:?}");
        }
        assert_eq!(&got[8..], &[-0.25, 0.25]);
    }

    /// The fusion sees the earlier stage: changing only that stage's
    /// weights changes the fused tokens, but not the plain ones.
    #[test]
    fn fusion_reads_the_earlier_stage() {
        let px = rand(&[1, 3, 32, 32], 4);
        for fpn in [false, true] {
            let c = cfg(Some(FusionKind::Add), fpn);
            let (vm, net) = build(&c, 6);
            let before = net.forward(&px).unwrap();
            // Scaling the last conv's weights changes only the last stage;
            // the earlier stage and its contribution stay.
            let w = vm.data().lock().unwrap()["conv.2.weight"]
                .as_tensor()
                .clone();
            set(&vm, "conv.2.weight", (w * 0.0).unwrap());
            let after = net.forward(&px).unwrap();
            assert!(max_diff(&before, &after) > 1e-3);
            // The last stage is now 0 (ReLU of a zero conv): the tokens come
            // from the earlier stage alone and still vary over the grid.
            let f = after.narrow(2, 0, 8).unwrap().squeeze(0).unwrap();
            let spread = f
                .var(0)
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(spread > 1e-3, "fpn={fpn}: tokens are constant");
        }
    }

    #[test]
    fn gradients_reach_the_first_convolution() {
        let c = cfg(Some(FusionKind::Gate), true);
        let (vm, net) = build(&c, 7);
        let px = rand(&[2, 3, 32, 32], 8);
        let loss = net.forward(&px).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        for name in [
            "conv.0.weight",
            "fpn.lateral.0.weight",
            "level_fusion.gate.weight",
            "post_norm.weight",
        ] {
            let v = vm.data().lock().unwrap()[name].as_tensor().clone();
            let n = grad_mass(&grads, &v).unwrap_or_else(|| panic!("no gradient for {name}"));
            assert!(n > 0.0, "{name}: zero gradient");
        }
    }

    #[test]
    fn impossible_shapes_are_refused_naming_the_field() {
        let mut c = cfg(Some(FusionKind::Gate), false);
        c.layers = 1;
        c.image_size = 16;
        let (field, why) = c.check().unwrap_err();
        assert_eq!(field, "feature_fusion");
        assert!(why.contains("two stages"), "{why}");
        let mut c = cfg(None, true);
        c.layers = 1;
        c.image_size = 16;
        assert_eq!(c.check().unwrap_err().0, "fpn");
        let mut c = cfg(None, false);
        c.image_size = 75;
        let (field, why) = c.check().unwrap_err();
        assert_eq!(field, "image_size");
        assert!(why.contains("2^3 = 8"), "{why}");
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let net = ConvNet::new(vb, &cfg(None, false)).unwrap();
        let err = net
            .forward(&rand(&[1, 3, 30, 30], 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("3×32×32") && err.contains("30×30"), "{err}");
    }
}
