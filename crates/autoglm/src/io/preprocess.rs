//! Image preprocessing that reproduces the reference pipelines exactly:
//! resize of the shortest edge with PIL's resampling (the fixed-point
//! convolution of Pillow's `Resample.c`, which both HF image processors and
//! torchvision call for PIL images), center crop, rescale to [0, 1] and
//! per-channel normalisation.
//!
//! Matching PIL bit for bit matters: an encoder fed slightly different pixels
//! gives slightly different logits, and parity tests could not tell a model
//! bug from a resize bug.

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::{Error, Result};

/// Resampling filters, as PIL defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resample {
    Bilinear,
    Bicubic,
}

impl Resample {
    /// From PIL's integer codes, as HF `preprocessor_config.json` stores them.
    pub fn from_pil_code(code: u32) -> Result<Self> {
        match code {
            2 => Ok(Resample::Bilinear),
            3 => Ok(Resample::Bicubic),
            other => Err(Error::Invalid(format!(
                "resample filter {other} is not supported (2 = bilinear and 3 = bicubic are)"
            ))),
        }
    }

    fn support(self) -> f64 {
        match self {
            Resample::Bilinear => 1.0,
            Resample::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Resample::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            // Keys' cubic with a = -0.5, as in Pillow.
            Resample::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// How the center crop rounds an odd margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropRounding {
    /// `(h - crop) // 2`: HF `image_transforms.center_crop`.
    Floor,
    /// `int(round((h - crop) / 2))` with Python's half-to-even rounding:
    /// torchvision `CenterCrop`.
    HalfEven,
}

/// A resolved preprocessing pipeline.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocess {
    /// The shortest edge is resized to this, keeping the aspect ratio.
    pub shortest_edge: u32,
    pub resample: Resample,
    /// Center crop (height, width).
    pub crop: (u32, u32),
    pub crop_rounding: CropRounding,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Largest intermediate (resized, before cropping) image, in pixels.
const MAX_RESIZED_PIXELS: u64 = 64 * 1024 * 1024;

/// Fixed-point precision of Pillow's 8-bit resampler.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index and the fixed-point weights.
struct Coeffs {
    starts: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Port of Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`.
fn coeffs(in_size: usize, out_size: usize, filter: Resample) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let mut starts = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let mut k: Vec<f64> = (xmin..xmax)
            .map(|x| filter.weight((x as f64 - center + 0.5) / filterscale))
            .collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|w| *w /= ww);
        }
        let one = (1u32 << PRECISION_BITS) as f64;
        let k = k
            .into_iter()
            .map(|w| {
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect();
        starts.push(xmin);
        weights.push(k);
    }
    Coeffs { starts, weights }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB image to `width`×`height` exactly as Pillow's
/// `Image.resize((width, height), filter)` does.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Resample) -> RgbImage {
    let (w0, h0) = img.dimensions();
    let (w0, h0, w1, h1) = (w0 as usize, h0 as usize, width as usize, height as usize);
    let src = img.as_raw();
    // Horizontal pass (skipped, as in Pillow, when the width is unchanged).
    let tmp: Vec<u8> = if w1 != w0 {
        let c = coeffs(w0, w1, filter);
        let mut out = vec![0u8; h0 * w1 * 3];
        for y in 0..h0 {
            let row = &src[y * w0 * 3..(y + 1) * w0 * 3];
            for x in 0..w1 {
                let (s, k) = (c.starts[x], &c.weights[x]);
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (i, &kw) in k.iter().enumerate() {
                    let p = &row[(s + i) * 3..(s + i) * 3 + 3];
                    for ch in 0..3 {
                        acc[ch] += p[ch] as i32 * kw;
                    }
                }
                for ch in 0..3 {
                    out[(y * w1 + x) * 3 + ch] = clip8(acc[ch]);
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    // Vertical pass.
    let out: Vec<u8> = if h1 != h0 {
        let c = coeffs(h0, h1, filter);
        let mut out = vec![0u8; h1 * w1 * 3];
        for y in 0..h1 {
            let (s, k) = (c.starts[y], &c.weights[y]);
            for x in 0..w1 * 3 {
                let mut acc = 1i32 << (PRECISION_BITS - 1);
                for (i, &kw) in k.iter().enumerate() {
                    acc += tmp[(s + i) * w1 * 3 + x] as i32 * kw;
                }
                out[y * w1 * 3 + x] = clip8(acc);
            }
        }
        out
    } else {
        tmp
    };
    RgbImage::from_raw(width, height, out).expect("buffer sized from the dimensions")
}

impl Preprocess {
    /// The output size (height, width) of resizing the shortest edge of a
    /// `h`×`w` image to `s`, as HF's `get_resize_output_image_size` and
    /// torchvision's `Resize(int)` compute it: `int(s * long / short)`.
    pub fn resized_size(&self, h: u32, w: u32) -> (u32, u32) {
        let s = self.shortest_edge as u64;
        let (short, long) = if w <= h {
            (w as u64, h as u64)
        } else {
            (h as u64, w as u64)
        };
        let new_long = ((s * long) as f64 / short as f64) as u32;
        if w <= h {
            (new_long, s as u32)
        } else {
            (s as u32, new_long)
        }
    }

    /// Resize and center crop, still as 8-bit RGB (what PIL hands to
    /// `ToTensor`).
    pub fn resize_crop(&self, img: &RgbImage) -> Result<RgbImage> {
        let (w, h) = img.dimensions();
        // An extreme aspect ratio (1×67,000,000 passes the decoder's pixel
        // limit) would make the resized long side explode.
        let long = (self.shortest_edge as u64 * w.max(h) as u64) / (w.min(h).max(1) as u64);
        if long * self.shortest_edge as u64 > MAX_RESIZED_PIXELS {
            return Err(Error::Invalid(format!(
                "a {w}×{h} image resized to a shortest edge of {} would be {}×{long} pixels; crop it to a less extreme aspect ratio first",
                self.shortest_edge, self.shortest_edge
            )));
        }
        let (rh, rw) = self.resized_size(h, w);
        let resized = if (rh, rw) == (h, w) {
            img.clone()
        } else {
            resize(img, rw, rh, self.resample)
        };
        let (ch, cw) = self.crop;
        if ch > rh || cw > rw {
            return Err(Error::Invalid(format!(
                "crop {ch}×{cw} is larger than the resized image {rh}×{rw}; check the preprocessor config"
            )));
        }
        let offset = |full: u32, crop: u32| -> u32 {
            let d = full - crop;
            match self.crop_rounding {
                CropRounding::Floor => d / 2,
                // round(d / 2) with ties to even: d odd → (d ± 1) / 2, whichever is even.
                CropRounding::HalfEven => {
                    if d % 2 == 0 {
                        d / 2
                    } else {
                        let lo = d / 2;
                        if lo % 2 == 0 {
                            lo
                        } else {
                            lo + 1
                        }
                    }
                }
            }
        };
        let (top, left) = (offset(rh, ch), offset(rw, cw));
        Ok(image::imageops::crop_imm(&resized, left, top, cw, ch).to_image())
    }

    /// Normalised `(3, H, W)` f32 values of an already resized and cropped
    /// image: `(p / 255 - mean) / std`.
    pub fn normalize(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = img.dimensions();
        let (w, h) = (w as usize, h as usize);
        let mut data = vec![0f32; 3 * h * w];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                data[c * h * w + i] = (p[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Ok(Tensor::from_vec(data, (3, h, w), device)?)
    }

    /// `(B, 3, H, W)` model input for a batch of images.
    pub fn batch(&self, imgs: &[RgbImage], device: &Device) -> Result<Tensor> {
        if imgs.is_empty() {
            return Err(Error::Invalid("no images to preprocess".into()));
        }
        let ts = imgs
            .iter()
            .map(|im| self.normalize(&self.resize_crop(im)?, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&ts, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_resize_is_exact() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9]));
        for f in [Resample::Bilinear, Resample::Bicubic] {
            assert_eq!(resize(&img, 7, 5, f), img);
        }
    }

    #[test]
    fn uniform_image_stays_uniform() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 13, 77]));
        for f in [Resample::Bilinear, Resample::Bicubic] {
            for (w, h) in [(10, 6), (80, 50), (37, 11)] {
                let out = resize(&img, w, h, f);
                assert!(out.pixels().all(|p| p.0 == [200, 13, 77]), "{f:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn crop_rounding_follows_each_reference() {
        let p = |r| Preprocess {
            shortest_edge: 4,
            resample: Resample::Bilinear,
            crop: (4, 4),
            crop_rounding: r,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        // 4×7 image (h=4, w=7): margin 3. floor → 1, half-even round(1.5) → 2.
        let img = RgbImage::from_fn(7, 4, |x, _| image::Rgb([x as u8, 0, 0]));
        let a = p(CropRounding::Floor).resize_crop(&img).unwrap();
        let b = p(CropRounding::HalfEven).resize_crop(&img).unwrap();
        assert_eq!(a.get_pixel(0, 0)[0], 1);
        assert_eq!(b.get_pixel(0, 0)[0], 2);
    }

    #[test]
    fn extreme_aspect_ratio_is_refused_not_allocated() {
        let p = Preprocess {
            shortest_edge: 256,
            resample: Resample::Bilinear,
            crop: (224, 224),
            crop_rounding: CropRounding::HalfEven,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let img = RgbImage::new(1, 1_000_000);
        let e = p.resize_crop(&img).unwrap_err().to_string();
        assert!(e.contains("aspect ratio"), "{e}");
    }

    #[test]
    fn resized_size_matches_python_int_division() {
        let p = Preprocess {
            shortest_edge: 224,
            resample: Resample::Bicubic,
            crop: (224, 224),
            crop_rounding: CropRounding::Floor,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        // int(224 * 512 / 300) = 382; portrait keeps the width short.
        assert_eq!(p.resized_size(300, 512), (224, 382));
        assert_eq!(p.resized_size(512, 300), (382, 224));
    }
}
