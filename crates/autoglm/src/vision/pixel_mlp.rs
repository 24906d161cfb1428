//! A small classifier of 28×28 grey images (Fashion-MNIST): pixels →
//! hidden ReLU layer → classes. Trained here with AdamW; saved as
//! `model.safetensors` + `config.json` (the class names, the width).

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::fashion_mnist::{FashionMnist, PIXELS};
use crate::nn::Linear;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::{Error, Result};

/// Fashion-MNIST's pixel mean and standard deviation (of the training
/// split, in [0, 1]).
const MEAN: f32 = 0.2860;
const STD: f32 = 0.3530;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PixelMlpConfig {
    pub hidden: usize,
    pub classes: Vec<String>,
}

/// How to train.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PixelMlpTraining {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
}

impl Default for PixelMlpTraining {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 128,
            lr: 1e-3,
            seed: 0,
        }
    }
}

pub struct PixelMlp {
    pub config: PixelMlpConfig,
    hidden: Linear,
    out: Linear,
    device: Device,
}

/// `n` images' pixels (n × 784 bytes) as normalised f32 rows.
fn inputs(pixels: &[u8], device: &Device) -> Result<Tensor> {
    if pixels.len() % PIXELS != 0 {
        return Err(Error::Invalid(format!(
            "{} bytes of pixels is not a whole number of 28×28 images",
            pixels.len()
        )));
    }
    let x: Vec<f32> = pixels
        .iter()
        .map(|&p| (p as f32 / 255.0 - MEAN) / STD)
        .collect();
    Ok(Tensor::from_vec(
        x,
        (pixels.len() / PIXELS, PIXELS),
        device,
    )?)
}

impl PixelMlp {
    fn new(vb: VarBuilder, config: PixelMlpConfig) -> Result<Self> {
        let device = vb.device().clone();
        Ok(Self {
            hidden: Linear::new(vb.pp("hidden"), PIXELS, config.hidden)?,
            out: Linear::new(vb.pp("out"), config.hidden, config.classes.len())?,
            config,
            device,
        })
    }

    /// # Shapes
    /// `x`: (n, 784) normalised → logits (n, classes)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.hidden.forward(x)?.relu()?)
    }

    /// Trains on `data`; `on_epoch(epoch, mean loss)` after each epoch.
    /// Deterministic for a seed.
    pub fn train(
        data: &FashionMnist,
        config: PixelMlpConfig,
        t: PixelMlpTraining,
        on_epoch: &mut dyn FnMut(usize, f32),
    ) -> Result<(Self, VarMap)> {
        if data.is_empty() || t.batch_size == 0 || t.epochs == 0 {
            return Err(Error::Invalid(
                "training needs images, a batch size and epochs".into(),
            ));
        }
        let device = Device::Cpu;
        let vm = VarMap::new();
        let model = Self::new(VarBuilder::from_varmap(&vm, DType::F32, &device), config)?;
        crate::train::vqa::init_weights(&vm, t.seed, None)?;
        let vars = vm
            .data()
            .lock()
            .map_err(|_| Error::Invalid("poisoned var map".into()))?;
        let named: Vec<_> = vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        drop(vars);
        let mut opt = AdamW::new(named, AdamWConfig::default())?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(t.seed);
        let mut order: Vec<usize> = (0..data.len()).collect();
        for epoch in 0..t.epochs {
            order.shuffle(&mut rng);
            let mut total = 0f32;
            let mut batches = 0;
            for chunk in order.chunks(t.batch_size) {
                let mut px = Vec::with_capacity(chunk.len() * PIXELS);
                for &i in chunk {
                    px.extend_from_slice(data.image(i));
                }
                let y: Vec<u32> = chunk.iter().map(|&i| data.labels[i] as u32).collect();
                let x = inputs(&px, &device)?;
                let y = Tensor::new(y.as_slice(), &device)?;
                let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
                let grads = loss.backward()?;
                // Cosine decay over all steps.
                let progress = (epoch as f64
                    + batches as f64 * t.batch_size as f64 / data.len() as f64)
                    / t.epochs as f64;
                let lr = t.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                opt.step(&grads, lr)?;
                total += loss.to_scalar::<f32>()?;
                batches += 1;
            }
            on_epoch(epoch + 1, total / batches as f32);
        }
        Ok((model, vm))
    }

    /// Saves into `dir` (created), each file written atomically.
    pub fn save(&self, vm: &VarMap, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::train::save_safetensors_atomic(
            &dir.join("model.safetensors"),
            &crate::train::varmap_tensors(vm)?,
        )?;
        crate::train::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&self.config)
                .unwrap_or_default()
                .as_bytes(),
        )
    }

    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cp = dir.join("config.json");
        let text = std::fs::read_to_string(&cp).map_err(|e| Error::io(&cp, e))?;
        let config: PixelMlpConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", cp.display())))?;
        let wp = dir.join("model.safetensors");
        // SAFETY: the file is not modified while mapped (saved atomically).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&wp], DType::F32, device)? };
        Self::new(vb, config)
    }

    /// The most likely class of each image and its probability.
    pub fn predict(&self, pixels: &[u8]) -> Result<Vec<(usize, f32)>> {
        let logits = self.forward(&inputs(pixels, &self.device)?)?;
        let p = candle_nn::ops::softmax_last_dim(&logits)?;
        let best = p.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let p = p.to_vec2::<f32>()?;
        Ok(best
            .iter()
            .zip(&p)
            .map(|(&b, row)| (b as usize, row[b as usize]))
            .collect())
    }

    /// Accuracy on `data`, in batches.
    pub fn accuracy(&self, data: &FashionMnist) -> Result<f64> {
        let mut right = 0usize;
        for start in (0..data.len()).step_by(1000) {
            let end = (start + 1000).min(data.len());
            let pred = self.predict(&data.images[start * PIXELS..end * PIXELS])?;
            right += pred
                .iter()
                .zip(&data.labels[start..end])
                .filter(|((c, _), &l)| *c == l as usize)
                .count();
        }
        Ok(right as f64 / data.len().max(1) as f64)
    }
}
