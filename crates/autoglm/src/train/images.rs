//! The images of a training run, decoded once: pixels for a tower that
//! trains, or the features of a frozen tower, computed once per image and
//! flip.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::vqa::ImageBatch;
use crate::data::VqaExample;
use crate::io::image::{load, ImageLimits};
use crate::io::preprocess::Preprocess;
use crate::vlm::Llava;
use crate::{Error, Result};

/// Every image of a dataset decoded and preprocessed once (in parallel):
/// easy-VQA's 5,000 images at 64² take 240 MB as f32. With a frozen vision
/// tower, its features of every image (and flip) instead.
pub(crate) struct ImageCache {
    pixels: HashMap<PathBuf, Tensor>,
    /// (path, flips) → (P, H_vision)
    features: Option<HashMap<(PathBuf, u8), Tensor>>,
    /// Blind training: batches carry no images.
    pub(crate) blind: bool,
}

/// The flip bit that asks [`ImageCache::batch`] for the features of the
/// router's light path (the image pooled to `router_light_image_size`, or
/// the tower left after `router_light_tower_stage`).
pub(crate) const LIGHT: u8 = 4;

/// The most bytes of decoded pixels the cache holds.
const MAX_CACHE_BYTES: usize = 4 << 30;

impl ImageCache {
    /// For blind training: no images at all.
    pub(crate) fn blind() -> Self {
        Self {
            pixels: HashMap::new(),
            features: None,
            blind: true,
        }
    }

    pub(crate) fn build<'a>(
        examples: impl Iterator<Item = &'a VqaExample>,
        pre: &Preprocess,
    ) -> Result<Self> {
        use rayon::prelude::*;
        let mut paths: Vec<&PathBuf> = examples.map(|e| &e.image).collect();
        paths.sort();
        paths.dedup();
        let bytes = paths.len() * 3 * pre.crop.0 as usize * pre.crop.1 as usize * 4;
        if bytes > MAX_CACHE_BYTES {
            return Err(Error::Invalid(format!(
                "{} images at {}×{} need {} MB decoded, more than the trainer keeps in memory ({} MB); use a smaller image_size or fewer images",
                paths.len(), pre.crop.0, pre.crop.1, bytes >> 20, MAX_CACHE_BYTES >> 20
            )));
        }
        let pixels = paths
            .par_iter()
            .map(|p| {
                let img = load(p, ImageLimits::default())?;
                Ok((
                    (*p).clone(),
                    pre.normalize(&pre.resize_crop(&img)?, &Device::Cpu)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            pixels,
            features: None,
            blind: false,
        })
    }

    /// Runs the (frozen) vision tower once over every image with each of
    /// `flips`, keeping the features and dropping the pixels. A model
    /// whose router chooses before the tower gets its light path's
    /// features too, under each flip with the [`LIGHT`] bit.
    pub(crate) fn precompute_features(&mut self, model: &Llava, flips: &[u8]) -> Result<()> {
        let mut paths: Vec<PathBuf> = self.pixels.keys().cloned().collect();
        paths.sort();
        let mut features = HashMap::new();
        let t0 = std::time::Instant::now();
        for &f in flips {
            for chunk in paths.chunks(64) {
                let px = self.pixel_batch(chunk.iter(), &vec![f; chunk.len()])?;
                let feats = model.vision_features(&px)?;
                for (i, p) in chunk.iter().enumerate() {
                    features.insert((p.clone(), f), feats.get(i)?);
                }
                if model.config.routes_before_tower() {
                    let light = model.light_vision_features(&px)?;
                    for (i, p) in chunk.iter().enumerate() {
                        features.insert((p.clone(), f | LIGHT), light.get(i)?);
                    }
                }
            }
        }
        tracing::info!(
            "vision features of {} images × {} flips in {:.0} s",
            paths.len(),
            flips.len(),
            t0.elapsed().as_secs_f64()
        );
        self.features = Some(features);
        self.pixels.clear();
        Ok(())
    }

    /// A diagnostic (`VqaTrainConfig::oracle_scenes`): replaces each
    /// image's precomputed tokens by its Sort-of-CLEVR scene's ground
    /// truth. A token's first 6 channels become the one-hot colour and the
    /// next 2 the one-hot shape of the object whose centre lies in its cell
    /// (summed if two do; zeros where none does), the rest zeros but the
    /// last two, the cell's (x, y), which stay. The grid is square, over
    /// the whole image.
    pub(crate) fn use_scene_oracle(
        &mut self,
        scenes: &HashMap<PathBuf, Vec<crate::data::sort_of_clevr::Object>>,
    ) -> Result<()> {
        use crate::data::sort_of_clevr::{Shape, OBJECTS, SIZE};
        let Some(features) = &mut self.features else {
            return Err(Error::Invalid(
                "oracle_scenes replaces a frozen tower's features; there are none".into(),
            ));
        };
        for ((path, flip), f) in features.iter_mut() {
            let objects = scenes.get(path).ok_or_else(|| {
                Error::Invalid(format!(
                    "oracle_scenes: no scene for {}; use the scenes.jsonl written beside the questions",
                    path.display()
                ))
            })?;
            if *flip != 0 {
                return Err(Error::Invalid(
                    "oracle_scenes: flipped images have no scene; set augment false".into(),
                ));
            }
            let (p, w) = f.dims2()?;
            let g = (p as f64).sqrt().round() as usize;
            if p == 0 || g * g != p || w < OBJECTS + 4 {
                return Err(Error::Invalid(format!(
                    "oracle_scenes: needs a square grid of tokens at least {} wide with (x, y) last; these are {p} × {w}",
                    OBJECTS + 4
                )));
            }
            let mut truth = vec![0f32; p * (w - 2)];
            for o in objects {
                let cell =
                    (o.y as usize * g / SIZE as usize) * g + o.x as usize * g / SIZE as usize;
                let shape = OBJECTS + usize::from(o.shape == Shape::Circle);
                truth[cell * (w - 2) + o.color] += 1.0;
                truth[cell * (w - 2) + shape] += 1.0;
            }
            let truth = Tensor::from_vec(truth, (p, w - 2), f.device())?;
            *f = Tensor::cat(&[&truth, &f.narrow(1, w - 2, 2)?], 1)?;
        }
        Ok(())
    }

    /// The batch's images, each flipped horizontally when bit 0 of its
    /// `flips` entry is set and vertically when bit 1 is.
    pub(crate) fn batch<'a>(
        &self,
        paths: impl Iterator<Item = &'a PathBuf>,
        flips: &[u8],
    ) -> Result<ImageBatch> {
        if self.blind {
            return Ok(ImageBatch::None);
        }
        let Some(features) = &self.features else {
            return Ok(ImageBatch::Pixels(self.pixel_batch(paths, flips)?));
        };
        let rows = paths
            .zip(flips)
            .map(|(p, &f)| {
                features.get(&(p.clone(), f)).cloned().ok_or_else(|| {
                    Error::Invalid(format!("no features of {} (flip {f})", p.display()))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ImageBatch::VisionFeatures(Tensor::stack(&rows, 0)?))
    }

    /// (B, 3, S, S)
    fn pixel_batch<'a>(
        &self,
        paths: impl Iterator<Item = &'a PathBuf>,
        flips: &[u8],
    ) -> Result<Tensor> {
        let mut out = Vec::with_capacity(flips.len());
        for (p, &f) in paths.zip(flips) {
            let mut x = self
                .pixels
                .get(p)
                .ok_or_else(|| Error::Invalid(format!("{} was not decoded", p.display())))?
                .clone();
            for (bit, dim) in [(1u8, 2usize), (2, 1)] {
                if f & bit != 0 {
                    let n = x.dim(dim)?;
                    let rev: Vec<u32> = (0..n as u32).rev().collect();
                    x = x.index_select(&Tensor::new(rev.as_slice(), x.device())?, dim)?;
                }
            }
            out.push(x);
        }
        Ok(Tensor::stack(&out, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sort_of_clevr::{Object, Shape};

    /// Each cell gets the one-hot colour and shape of the object centred
    /// in it (summed when two are), zeros elsewhere; (x, y) stays.
    #[test]
    fn scene_oracle_writes_each_cell_its_object() {
        let (p, w) = (4usize, 12usize); // a 2 × 2 grid
        let coords: Vec<f32> = (0..p * w).map(|i| i as f32).collect();
        let path = PathBuf::from("images/00000.png");
        let mut cache = ImageCache {
            pixels: HashMap::new(),
            features: Some(HashMap::from([(
                (path.clone(), 0),
                Tensor::from_vec(coords.clone(), (p, w), &Device::Cpu).unwrap(),
            )])),
            blind: false,
        };
        let object = |color, x, y, shape| Object { color, x, y, shape };
        let scenes = HashMap::from([(
            path.clone(),
            vec![
                object(0, 10, 10, Shape::Square), // top left
                object(3, 60, 20, Shape::Circle), // top right
                object(5, 40, 70, Shape::Square), // bottom right
                object(1, 50, 50, Shape::Circle), // bottom right too
            ],
        )]);
        cache.use_scene_oracle(&scenes).unwrap();
        let got = cache.features.as_ref().unwrap()[&(path.clone(), 0)]
            .to_vec2::<f32>()
            .unwrap();
        let mut want = vec![vec![0f32; w]; p];
        for (cell, color, shape) in [(0, 0, 6), (1, 3, 7), (3, 5, 6), (3, 1, 7)] {
            want[cell][color] += 1.0;
            want[cell][shape] += 1.0;
        }
        for (k, row) in want.iter_mut().enumerate() {
            row[w - 2] = coords[k * w + w - 2];
            row[w - 1] = coords[k * w + w - 1];
        }
        assert_eq!(got, want);

        // An image the scenes lack, or tokens too narrow, are refused.
        let e = cache
            .use_scene_oracle(&HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no scene for images/00000.png"), "{e}");
        cache.features = Some(HashMap::from([(
            (path, 0),
            Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )]));
        let e = cache.use_scene_oracle(&scenes).unwrap_err().to_string();
        assert!(e.contains("at least 10 wide"), "{e}");
    }
}
