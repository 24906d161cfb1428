//! EfficientNet-Lite (lukemelas / `efficientnet-lite-pytorch` weight names),
//! for inference: BatchNorm folded into the convs at load time, activations
//! kept channels-last (NHWC) so that 1×1 convs are single GEMMs and depthwise
//! convs run in our own kernel ([`super::depthwise`]).
//!
//! Reference: `efficientnet_lite_pytorch/model.py` (MBConvBlock, EfficientNet)
//! and TF's `efficientnet_lite_builder.py` for the block list. The TF "SAME"
//! padding (asymmetric for stride 2) is reproduced exactly.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use image::RgbImage;

use super::depthwise::{same_padding, DepthwiseConv};
use crate::io::preprocess::{CropRounding, Preprocess, Resample};
use crate::io::weights::Safetensors;
use crate::ops::{bias_act, Act};
use crate::{Error, Result};

/// One stage of repeated MBConv blocks (TF's `r2_k3_s22_e6_i16_o24`).
#[derive(Debug, Clone, Copy)]
pub struct StageSpec {
    pub repeats: usize,
    pub kernel: usize,
    pub stride: usize,
    pub expand: usize,
    pub input: usize,
    pub output: usize,
}

#[derive(Debug, Clone)]
pub struct EfficientNetConfig {
    pub stem: usize,
    pub stages: Vec<StageSpec>,
    pub head: usize,
    pub num_classes: usize,
    pub bn_eps: f64,
    pub image_size: usize,
}

impl EfficientNetConfig {
    /// EfficientNet-Lite0: width and depth coefficients 1.0, 224×224,
    /// ReLU6, no squeeze-excite, stem and head not scaled.
    pub fn lite0() -> Self {
        let s = |repeats, kernel, stride, expand, input, output| StageSpec {
            repeats,
            kernel,
            stride,
            expand,
            input,
            output,
        };
        Self {
            stem: 32,
            stages: vec![
                s(1, 3, 1, 1, 32, 16),
                s(2, 3, 2, 6, 16, 24),
                s(2, 5, 2, 6, 24, 40),
                s(3, 3, 2, 6, 40, 80),
                s(3, 5, 1, 6, 80, 112),
                s(4, 5, 2, 6, 112, 192),
                s(1, 3, 1, 6, 192, 320),
            ],
            head: 1280,
            num_classes: 1000,
            bn_eps: 1e-3,
            image_size: 224,
        }
    }

    /// How many pixels of the image one cell of stage `stage`'s map spans
    /// (1-based; the stem's 2 times the strides of stages 1..=stage).
    pub fn stride_after(&self, stage: usize) -> usize {
        2 * self
            .stages
            .iter()
            .take(stage)
            .map(|s| s.stride)
            .product::<usize>()
    }

    /// Our preprocessing, the usual PyTorch ImageNet evaluation pipeline:
    /// torchvision `Resize(256)` (PIL bilinear) + `CenterCrop(224)`, then the
    /// Lite models' TF normalisation `(p − 127) / 128`, i.e. mean 127/255, std
    /// 128/255. (TF's own Lite evaluation crops 224/256 of the short side and
    /// resizes bicubically; the parity fixtures use this pipeline.)
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            shortest_edge: (self.image_size * 256 / 224) as u32,
            resample: Resample::Bilinear,
            crop: (self.image_size as u32, self.image_size as u32),
            crop_rounding: CropRounding::HalfEven,
            mean: [127.0 / 255.0; 3],
            std: [128.0 / 255.0; 3],
        }
    }
}

/// A conv whose BatchNorm has been folded in: `y = x·Wᵀ + b` per pixel.
struct Pointwise {
    /// (C_in, C_out), ready for `x (N, C_in) · w`.
    w: Tensor,
    b: Tensor,
    relu6: bool,
}

impl Pointwise {
    /// # Shapes
    /// `x`: (B, H, W, C_in) → (B, H, W, C_out)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let y = x.reshape((b * h * w, c))?.matmul(&self.w)?;
        let y = bias_act(&y, &self.b, if self.relu6 { Act::Relu6 } else { Act::None })?;
        Ok(y.reshape((b, h, w, self.w.dim(1)?))?)
    }
}

/// BatchNorm parameters → (scale, shift) with `bn(x) = x·scale + shift`.
fn bn_fold(vb: &VarBuilder, c: usize, eps: f64) -> Result<(Tensor, Tensor)> {
    let gamma = vb.get(c, "weight")?;
    let beta = vb.get(c, "bias")?;
    let mean = vb.get(c, "running_mean")?;
    let var = vb.get(c, "running_var")?;
    let scale = gamma.broadcast_div(&(var + eps)?.sqrt()?)?;
    let shift = (beta - mean.broadcast_mul(&scale)?)?;
    Ok((scale, shift))
}

/// A 1×1 conv (no bias) followed by BatchNorm, folded.
fn pointwise(
    conv: VarBuilder,
    bn: VarBuilder,
    cin: usize,
    cout: usize,
    eps: f64,
    relu6: bool,
) -> Result<Pointwise> {
    let w = conv
        .get((cout, cin, 1, 1), "weight")?
        .reshape((cout, cin))?;
    let (scale, shift) = bn_fold(&bn, cout, eps)?;
    let w = w.broadcast_mul(&scale.unsqueeze(1)?)?.t()?.contiguous()?;
    Ok(Pointwise { w, b: shift, relu6 })
}

struct MbConv {
    expand: Option<Pointwise>,
    depthwise: DepthwiseConv,
    project: Pointwise,
    residual: bool,
}

impl MbConv {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        expand: usize,
        eps: f64,
    ) -> Result<Self> {
        let mid = cin * expand;
        let expand_conv = if expand != 1 {
            Some(pointwise(
                vb.pp("_expand_conv"),
                vb.pp("_bn0"),
                cin,
                mid,
                eps,
                true,
            )?)
        } else {
            None
        };
        let dw = vb
            .pp("_depthwise_conv")
            .get((mid, 1, kernel, kernel), "weight")?;
        let (scale, shift) = bn_fold(&vb.pp("_bn1"), mid, eps)?;
        let dw = dw.broadcast_mul(&scale.reshape((mid, 1, 1, 1))?)?;
        Ok(Self {
            expand: expand_conv,
            depthwise: DepthwiseConv::new(&dw, &shift, stride, true)?,
            project: pointwise(vb.pp("_project_conv"), vb.pp("_bn2"), mid, cout, eps, false)?,
            residual: stride == 1 && cin == cout,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.expand {
            Some(e) => e.forward(x)?,
            None => x.clone(),
        };
        let y = self.project.forward(&self.depthwise.forward(&y)?)?;
        Ok(if self.residual { (y + x)? } else { y })
    }
}

/// Outputs of [`EfficientNet::forward_features`].
pub struct Features {
    /// Output of each stage, NCHW: for Lite0 at 224² these are
    /// 16×112², 24×56², 40×28², 80×14², 112×14², 192×7², 320×7².
    pub stages: Vec<Tensor>,
    /// Pooled head features, (B, 1280).
    pub pooled: Tensor,
}

pub struct EfficientNet {
    stem_w: Tensor,      // (32, 3, 3, 3), BN folded
    stem_w_cols: Tensor, // (27, 32): the same, for im2col rows ordered (c, ky, kx)
    stem_b: Tensor,
    /// Blocks grouped by stage.
    stages: Vec<Vec<MbConv>>,
    head: Pointwise,
    /// The ImageNet classifier (weight transposed, bias); absent in a VLM's
    /// tower, which uses the head features only.
    fc: Option<(Tensor, Tensor)>,
    pub config: EfficientNetConfig,
}

impl EfficientNet {
    pub fn new(vb: VarBuilder, cfg: &EfficientNetConfig) -> Result<Self> {
        let eps = cfg.bn_eps;
        let stem_w = vb.get((cfg.stem, 3, 3, 3), "_conv_stem.weight")?;
        let (scale, stem_b) = bn_fold(&vb.pp("_bn0"), cfg.stem, eps)?;
        let stem_w = stem_w.broadcast_mul(&scale.reshape((cfg.stem, 1, 1, 1))?)?;
        let mut idx = 0;
        let mut stages = Vec::new();
        for st in &cfg.stages {
            let mut blocks = Vec::new();
            for r in 0..st.repeats {
                let (cin, stride) = if r == 0 {
                    (st.input, st.stride)
                } else {
                    (st.output, 1)
                };
                blocks.push(MbConv::new(
                    vb.pp("_blocks").pp(idx),
                    cin,
                    st.output,
                    st.kernel,
                    stride,
                    st.expand,
                    eps,
                )?);
                idx += 1;
            }
            stages.push(blocks);
        }
        let last = cfg.stages.last().map(|s| s.output).unwrap_or(cfg.stem);
        Ok(Self {
            stem_w_cols: stem_w.reshape((cfg.stem, 27))?.t()?.contiguous()?,
            stem_w,
            stem_b,
            stages,
            head: pointwise(
                vb.pp("_conv_head"),
                vb.pp("_bn1"),
                last,
                cfg.head,
                eps,
                true,
            )?,
            fc: if vb.contains_tensor("_fc.weight") {
                Some((
                    vb.get((cfg.num_classes, cfg.head), "_fc.weight")?
                        .t()?
                        .contiguous()?,
                    vb.get(cfg.num_classes, "_fc.bias")?,
                ))
            } else {
                None
            },
            config: cfg.clone(),
        })
    }

    /// Loads `dir/model.safetensors` (converted from the lukemelas `.pth`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                hint: "no such model directory (EfficientNet-Lite0 comes from scripts/fetch-assets.sh --only efficientnet-lite0)".into(),
            });
        }
        let vb = Safetensors::open_dir(dir)?.var_builder(DType::F32, device);
        Self::new(vb, &EfficientNetConfig::lite0())
    }

    /// Stem: 3×3 stride-2 conv with TF "SAME" padding, BN, ReLU6.
    ///
    /// # Shapes
    /// `x`: (B, 3, H, W) NCHW → (B, H/2, W/2, 32) NHWC
    fn stem(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != 3 {
            return Err(Error::Invalid(format!(
                "EfficientNet takes 3-channel images, got {c} channels"
            )));
        }
        let (pt, pb) = same_padding(h, 3, 2);
        let (pl, pr) = same_padding(w, 3, 2);
        if !x.device().is_cpu() {
            let y = x
                .pad_with_zeros(2, pt, pb)?
                .pad_with_zeros(3, pl, pr)?
                .conv2d(&self.stem_w, 0, 2, 1, 1)?
                .permute((0, 2, 3, 1))?;
            return bias_act(&y, &self.stem_b, Act::Relu6);
        }
        // On the CPU: im2col straight into NHWC order, then one GEMM. candle's
        // conv2d (pad + im2col + layout copies) took 2.2 ms of a 19 ms image.
        let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
        let src = x.flatten_all()?.to_vec1::<f32>()?;
        let mut cols = vec![0f32; b * oh * ow * 27];
        for bi in 0..b {
            for oy in 0..oh {
                for ox in 0..ow {
                    let col = &mut cols[((bi * oh + oy) * ow + ox) * 27..][..27];
                    for ci in 0..3 {
                        for ky in 0..3 {
                            let iy = (oy * 2 + ky) as isize - pt as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..3 {
                                let ix = (ox * 2 + kx) as isize - pl as isize;
                                if ix >= 0 && ix < w as isize {
                                    col[ci * 9 + ky * 3 + kx] =
                                        src[((bi * 3 + ci) * h + iy as usize) * w + ix as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
        let cols = Tensor::from_vec(cols, (b * oh * ow, 27), x.device())?;
        let y = cols.matmul(&self.stem_w_cols)?; // (B·OH·OW, 32)
        Ok(bias_act(&y, &self.stem_b, Act::Relu6)?.reshape((b, oh, ow, ()))?)
    }

    /// Stage feature maps and pooled features.
    ///
    /// # Shapes
    /// `x`: (B, 3, H, W), normalised → stages NCHW, pooled (B, 1280)
    pub fn forward_features(&self, x: &Tensor) -> Result<Features> {
        let mut h = self.stem(x)?;
        let mut stages = Vec::with_capacity(self.stages.len());
        for blocks in &self.stages {
            for block in blocks {
                h = block.forward(&h)?;
            }
            stages.push(h.permute((0, 3, 1, 2))?);
        }
        let h = self.head.forward(&h)?; // (B, h, w, 1280)
        let pooled = h.flatten(1, 2)?.mean(1)?;
        Ok(Features { stages, pooled })
    }

    /// ImageNet logits, (B, 1000).
    ///
    /// On the CPU a large batch runs 8 images at a time: the NHWC
    /// activations of 32 images at 112² (150 MB per tensor) overflow every
    /// cache, and measured throughput drops from 55 to 45 images/s.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        const CPU_CHUNK: usize = 8;
        let b = x.dim(0)?;
        if !x.device().is_cpu() || b <= CPU_CHUNK {
            return self.forward_chunk(x);
        }
        let parts = (0..b)
            .step_by(CPU_CHUNK)
            .map(|i| self.forward_chunk(&x.narrow(0, i, CPU_CHUNK.min(b - i))?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The head's feature map as tokens, row-major: one 1280-wide token per
    /// cell of the stride-32 map (4×4 = 16 at 128²). Run in chunks of 8 on
    /// the CPU like [`Self::forward`].
    ///
    /// # Shapes
    /// `x`: (B, 3, H, W), normalised → (B, ⌈H/32⌉·⌈W/32⌉, 1280)
    pub fn head_tokens(&self, x: &Tensor) -> Result<Tensor> {
        const CPU_CHUNK: usize = 8;
        let one = |x: &Tensor| -> Result<Tensor> {
            let mut h = self.stem(x)?;
            for block in self.stages.iter().flatten() {
                h = block.forward(&h)?;
            }
            Ok(self.head.forward(&h)?.flatten(1, 2)?) // NHWC → (B, h·w, C)
        };
        let b = x.dim(0)?;
        if !x.device().is_cpu() || b <= CPU_CHUNK {
            return one(x);
        }
        let parts = (0..b)
            .step_by(CPU_CHUNK)
            .map(|i| one(&x.narrow(0, i, CPU_CHUNK.min(b - i))?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// An early exit: the map after stage `stage` (1-based; the later
    /// stages and the head do not run), average-pooled onto the head's
    /// grid, as tokens row-major — as many as [`Self::head_tokens`] gives.
    ///
    /// # Shapes
    /// `x`: (B, 3, H, W), normalised, H and W multiples of 32 →
    /// (B, (H/32)·(W/32), C_stage)
    pub fn stage_tokens(&self, x: &Tensor, stage: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.stage_tokens_on(x, stage, (h / 32, w / 32))
    }

    /// The map after stage `stage` average-pooled onto a `(gh, gw)` grid
    /// whose cells each cover whole cells of the map, as tokens row-major.
    ///
    /// # Shapes
    /// `x`: (B, 3, H, W), normalised, H and W multiples of 32 →
    /// (B, gh·gw, C_stage)
    pub fn stage_tokens_on(
        &self,
        x: &Tensor,
        stage: usize,
        (gh, gw): (usize, usize),
    ) -> Result<Tensor> {
        let m = self.stage_map(x, stage)?;
        let (_, mh, mw, _) = m.dims4()?; // NHWC
        if gh == 0 || gw == 0 || mh % gh != 0 || mw % gw != 0 {
            return Err(Error::Invalid(format!(
                "EfficientNet stage tokens: stage {stage}'s {mh}×{mw} map does not pool onto a {gh}×{gw} grid; use an earlier stage or a coarser grid"
            )));
        }
        let nchw = m.permute((0, 3, 1, 2))?;
        let pooled = nchw.avg_pool2d((mh / gh, mw / gw))?;
        Ok(pooled.flatten_from(2)?.transpose(1, 2)?.contiguous()?)
    }

    /// The map after stage `stage` (1-based) as tokens, one per cell,
    /// row-major: a finer grid than the head's, with fewer channels.
    ///
    /// # Shapes
    /// `x`: (B, 3, H, W), normalised, H and W multiples of 32 →
    /// (B, (H/s)·(W/s), C_stage) with s = [`EfficientNetConfig::stride_after`]
    pub fn stage_map_tokens(&self, x: &Tensor, stage: usize) -> Result<Tensor> {
        Ok(self.stage_map(x, stage)?.flatten(1, 2)?)
    }

    /// NHWC (B, H/s, W/s, C_stage)
    fn stage_map(&self, x: &Tensor, stage: usize) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if stage == 0 || stage > self.stages.len() || h % 32 != 0 || w % 32 != 0 {
            return Err(Error::Invalid(format!(
                "EfficientNet stage tokens: stage {stage} of 1..={} on a {h}×{w} image (sides multiples of 32)",
                self.stages.len()
            )));
        }
        let mut m = self.stem(x)?;
        for block in self.stages[..stage].iter().flatten() {
            m = block.forward(&m)?;
        }
        Ok(m)
    }

    /// Channels of stage `stage`'s map (1-based).
    pub fn stage_width(cfg: &EfficientNetConfig, stage: usize) -> Option<usize> {
        stage
            .checked_sub(1)
            .and_then(|i| cfg.stages.get(i))
            .map(|s| s.output)
    }

    fn forward_chunk(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.stem(x)?;
        for block in self.stages.iter().flatten() {
            h = block.forward(&h)?;
        }
        let pooled = self.head.forward(&h)?.flatten(1, 2)?.mean(1)?;
        let (w, b) = self.fc.as_ref().ok_or_else(|| {
            Error::Invalid(
                "this EfficientNet has no classifier (`_fc.weight`): it is a feature tower".into(),
            )
        })?;
        Ok(pooled.matmul(w)?.broadcast_add(b)?)
    }
}

/// One class with its probability.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    pub index: usize,
    pub label: String,
    pub probability: f32,
}

/// The classifier with its preprocessing and label names.
pub struct ImageClassifier {
    pub model: EfficientNet,
    pub preprocess: Preprocess,
    pub labels: Vec<String>,
    device: Device,
}

impl ImageClassifier {
    /// Loads EfficientNet-Lite0 from `model_dir` and the ImageNet labels from
    /// `labels` (one per line, in class order).
    pub fn load(model_dir: &Path, labels: &Path, device: &Device) -> Result<Self> {
        let model = EfficientNet::load(model_dir, device)?;
        let text = std::fs::read_to_string(labels).map_err(|e| Error::io(labels, e))?;
        let names: Vec<String> = text.lines().map(str::to_string).collect();
        if names.len() != model.config.num_classes {
            return Err(Error::Invalid(format!(
                "{} has {} labels but the model has {} classes; pass a labels file with one name per class, in class order",
                labels.display(),
                names.len(),
                model.config.num_classes
            )));
        }
        let labels = names;
        Ok(Self {
            preprocess: model.config.preprocess(),
            model,
            labels,
            device: device.clone(),
        })
    }

    pub fn logits(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.model
            .forward(&self.preprocess.batch(images, &self.device)?)
    }

    /// The `k` most probable classes of each image.
    pub fn top_k(&self, images: &[RgbImage], k: usize) -> Result<Vec<Vec<Prediction>>> {
        let probs = candle_nn::ops::softmax(&self.logits(images)?, D::Minus1)?.to_vec2::<f32>()?;
        Ok(probs
            .into_iter()
            .map(|p| {
                let mut idx: Vec<usize> = (0..p.len()).collect();
                idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
                idx.into_iter()
                    .take(k)
                    .map(|i| Prediction {
                        index: i,
                        label: self.labels[i].clone(),
                        probability: p[i],
                    })
                    .collect()
            })
            .collect())
    }
}

impl EfficientNetConfig {
    /// Multiply-accumulates of one forward pass at `image_size`² (convs and
    /// the classifier; BN is folded away), for GFLOP/s figures.
    pub fn macs(&self) -> u64 {
        let mut hw = self.image_size.div_ceil(2); // after the stride-2 stem
        let mut total = (hw * hw * self.stem * 27) as u64;
        for st in &self.stages {
            for r in 0..st.repeats {
                let (cin, stride) = if r == 0 {
                    (st.input, st.stride)
                } else {
                    (st.output, 1)
                };
                let mid = cin * st.expand;
                if st.expand != 1 {
                    total += (hw * hw * cin * mid) as u64;
                }
                let out = hw.div_ceil(stride);
                total += (out * out * mid * st.kernel * st.kernel) as u64;
                total += (out * out * mid * st.output) as u64;
                hw = out;
            }
        }
        let last = self.stages.last().map(|s| s.output).unwrap_or(self.stem);
        total + (hw * hw * last * self.head) as u64 + (self.head * self.num_classes) as u64
    }
}
