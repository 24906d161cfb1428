//! Depthwise 2-D convolution over channels-last (NHWC) tensors, with the
//! folded BatchNorm bias and ReLU6 fused in.
//!
//! candle's grouped `conv2d` runs a depthwise 3×3/5×5 conv 7–40× slower than
//! PyTorch on CPU (DESIGN.md §2, measured). EfficientNet is mostly depthwise
//! convs, so this kernel does them directly: for each output pixel, each
//! kernel tap is a multiply-add over a contiguous run of channels, which the
//! compiler vectorises. Rows are spread over rayon's threads. On other
//! devices the same maths runs through candle's grouped conv.
//!
//! Inference only: there is no backward pass (training code must not use it).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

/// TF "SAME" padding for one spatial dim: (before, after).
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(input);
    (total / 2, total - total / 2)
}

/// A depthwise conv with its weights, `k`×`k`, stride `s`, TF "SAME" padding.
#[derive(Debug, Clone)]
pub struct DepthwiseConv {
    /// `(k, k, C)`: tap-major so that a tap's weights over channels are
    /// contiguous.
    weight_khwc: Vec<f32>,
    /// `(C, 1, k, k)`, for the non-CPU path.
    weight_oihw: Tensor,
    bias: Vec<f32>,
    bias_t: Tensor,
    pub channels: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Clamp the output to [0, 6] (ReLU6).
    pub relu6: bool,
}

impl DepthwiseConv {
    /// `weight`: (C, 1, k, k); `bias`: (C).
    pub fn new(weight: &Tensor, bias: &Tensor, stride: usize, relu6: bool) -> Result<Self> {
        let (c, one, k, k2) = weight.dims4()?;
        debug_assert!(one == 1 && k == k2);
        let weight_khwc = weight
            .squeeze(1)?
            .permute((1, 2, 0))?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            weight_khwc,
            weight_oihw: weight.clone(),
            bias: bias.to_vec1::<f32>()?,
            bias_t: bias.clone(),
            channels: c,
            kernel: k,
            stride,
            relu6,
        })
    }

    /// # Shapes
    /// `x`: (B, H, W, C) → (B, ⌈H/s⌉, ⌈W/s⌉, C)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() {
            return Ok(x.contiguous()?.apply_op1_no_bwd(self)?);
        }
        // Other devices: pad, grouped conv in NCHW, bias, activation.
        let (_b, h, w, c) = x.dims4()?;
        let (pt, pb) = same_padding(h, self.kernel, self.stride);
        let (pl, pr) = same_padding(w, self.kernel, self.stride);
        let y = x
            .permute((0, 3, 1, 2))?
            .pad_with_zeros(2, pt, pb)?
            .pad_with_zeros(3, pl, pr)?
            .contiguous()?
            .conv2d(&self.weight_oihw, 0, self.stride, 1, c)?
            .broadcast_add(&self.bias_t.reshape((1, c, 1, 1))?)?;
        let y = if self.relu6 { y.clamp(0f32, 6f32)? } else { y };
        Ok(y.permute((0, 2, 3, 1))?.contiguous()?)
    }
}

/// Sizes of one depthwise conv call.
struct Geometry {
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    s: usize,
    pt: usize,
    pl: usize,
    ow: usize,
}

/// Whether the AVX2+FMA row kernel can run on this CPU.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(
    g: &Geometry,
    img: &[f32],
    oy: usize,
    weight: &[f32],
    bias: &[f32],
    relu6: bool,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    row_kernel::<true>(g, img, oy, weight, bias, relu6, out)
}

/// One output row: for each pixel, each kernel tap is a multiply-add over a
/// contiguous run of channels. Compiled twice: with FMA (inside
/// [`row_avx2`], where `mul_add` is one instruction) and without (where
/// `mul_add` would be a slow libm call).
#[inline(always)]
fn row_kernel<const FMA: bool>(
    g: &Geometry,
    img: &[f32],
    oy: usize,
    weight: &[f32],
    bias: &[f32],
    relu6: bool,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let c = g.c;
    let mut acc = vec![0f32; c];
    for ox in 0..g.ow {
        acc.copy_from_slice(bias);
        for ky in 0..g.k {
            let iy = (oy * g.s + ky) as isize - g.pt as isize;
            if iy < 0 || iy >= g.h as isize {
                continue;
            }
            for kx in 0..g.k {
                let ix = (ox * g.s + kx) as isize - g.pl as isize;
                if ix < 0 || ix >= g.w as isize {
                    continue;
                }
                let px = &img[(iy as usize * g.w + ix as usize) * c..][..c];
                let wt = &weight[(ky * g.k + kx) * c..][..c];
                for ((a, &x), &wv) in acc.iter_mut().zip(px).zip(wt) {
                    *a = if FMA { x.mul_add(wv, *a) } else { *a + x * wv };
                }
            }
        }
        for (o, &a) in out[ox * c..(ox + 1) * c].iter_mut().zip(&acc) {
            o.write(if relu6 { a.clamp(0.0, 6.0) } else { a });
        }
    }
}

impl CustomOp1 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-nhwc"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = layout.shape().dims4()?;
        if c != self.channels {
            candle_core::bail!(
                "depthwise conv: input has {c} channels, the kernel {}",
                self.channels
            )
        }
        let src = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(data), Some((start, end))) => &data[start..end],
            (CpuStorage::F32(_), None) => {
                candle_core::bail!("depthwise conv: input must be contiguous")
            }
            _ => candle_core::bail!("depthwise conv: only f32 is supported"),
        };
        let (k, s) = (self.kernel, self.stride);
        let (pt, _) = same_padding(h, k, s);
        let (pl, _) = same_padding(w, k, s);
        let (oh, ow) = (h.div_ceil(s), w.div_ceil(s));
        let n = b * oh * ow * c;
        // Every output is written exactly once below, so skip zero-filling.
        let mut dst: Vec<f32> = Vec::with_capacity(n);
        let geo = Geometry {
            h,
            w,
            c,
            k,
            s,
            pt,
            pl,
            ow,
        };
        let avx2 = simd_available();
        // One task per output row.
        dst.spare_capacity_mut()[..n]
            .par_chunks_mut(ow * c)
            .enumerate()
            .for_each(|(row, out)| {
                let (bi, oy) = (row / oh, row % oh);
                let img = &src[bi * h * w * c..(bi + 1) * h * w * c];
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    unsafe {
                        row_avx2(
                            &geo,
                            img,
                            oy,
                            &self.weight_khwc,
                            &self.bias,
                            self.relu6,
                            out,
                        )
                    };
                    return;
                }
                let _ = avx2;
                row_kernel::<false>(
                    &geo,
                    img,
                    oy,
                    &self.weight_khwc,
                    &self.bias,
                    self.relu6,
                    out,
                );
            });
        // SAFETY: the loop above initialised all n values.
        unsafe { dst.set_len(n) };
        Ok((CpuStorage::F32(dst), Shape::from((b, oh, ow, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The kernel against candle's grouped conv with explicit padding.
    #[test]
    fn matches_grouped_conv() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w, c, k, s) in [
            (9, 7, 5, 3, 1),
            (10, 10, 8, 3, 2),
            (11, 8, 3, 5, 2),
            (6, 6, 4, 5, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, c, &dev)?;
            let (pt, pb) = same_padding(h, k, s);
            let (pl, pr) = same_padding(w, k, s);
            let want = x
                .pad_with_zeros(2, pt, pb)?
                .pad_with_zeros(3, pl, pr)?
                .conv2d(&wt, 0, s, 1, c)?
                .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
            let op = DepthwiseConv::new(&wt, &bias, s, false)?;
            let got = op
                .forward(&x.permute((0, 2, 3, 1))?.contiguous()?)?
                .permute((0, 3, 1, 2))?;
            assert_eq!(got.dims(), want.dims());
            let err = (got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-4, "h={h} w={w} c={c} k={k} s={s}: max err {err}");
            let op6 = DepthwiseConv::new(&wt, &bias, s, true)?;
            let got6 = op6
                .forward(&x.permute((0, 2, 3, 1))?.contiguous()?)?
                .permute((0, 3, 1, 2))?;
            let err6 = (got6 - want.clamp(0f32, 6f32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err6 < 1e-4);
        }
        Ok(())
    }

    #[test]
    fn same_padding_matches_tf() {
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(56, 5, 2), (1, 2));
        assert_eq!(same_padding(14, 5, 1), (2, 2));
        assert_eq!(same_padding(7, 3, 1), (1, 1));
    }
}
