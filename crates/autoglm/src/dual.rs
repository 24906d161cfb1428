//! The dual-tower image/text model in the HF `CLIPModel` layout: a vision
//! tower and a text tower projected into one embedding space, compared by
//! cosine similarity scaled by `exp(logit_scale)`. Zero-shot classification
//! is a softmax over the similarities of an image to label prompts.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use crate::config::{ClipConfig, ImageProcessorConfig};
use crate::io::preprocess::Preprocess;
use crate::io::weights::Safetensors;
use crate::nn::{linear_no_bias, Linear};
use crate::text::bert::l2_normalize;
use crate::text::clip_text::ClipText;
use crate::text::tokenizer::Tokenizer;
use crate::vision::vit::ClipVision;
use crate::{Error, Result};

pub struct Clip {
    pub vision: ClipVision,
    pub text: ClipText,
    visual_projection: Linear,
    text_projection: Linear,
    logit_scale: Tensor,
    pub config: ClipConfig,
}

/// Outputs of a joint forward pass, as `CLIPModel.forward` returns them.
pub struct ClipOutput {
    /// Unit-length image embeddings, (I, P).
    pub image_embeds: Tensor,
    /// Unit-length text embeddings, (T, P).
    pub text_embeds: Tensor,
    /// `exp(logit_scale) · image_embeds · text_embedsᵀ`, (I, T).
    pub logits_per_image: Tensor,
}

impl Clip {
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let p = cfg.projection_dim;
        Ok(Self {
            vision: ClipVision::new(vb.pp("vision_model"), &cfg.vision_config)?,
            text: ClipText::new(vb.pp("text_model"), &cfg.text_config)?,
            visual_projection: linear_no_bias(
                cfg.vision_config.hidden_size,
                p,
                vb.pp("visual_projection"),
            )?,
            text_projection: linear_no_bias(
                cfg.text_config.hidden_size,
                p,
                vb.pp("text_projection"),
            )?,
            logit_scale: vb.get((), "logit_scale")?,
            config: cfg.clone(),
        })
    }

    /// Unit-length image embeddings. `pixels`: (B, 3, S, S) → (B, P)
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        l2_normalize(
            &self
                .visual_projection
                .forward(&self.vision.pooled(pixels)?)?,
        )
    }

    /// Unit-length text embeddings. `ids`, `mask`: (B, T) → (B, P)
    pub fn text_embeds(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        l2_normalize(
            &self
                .text_projection
                .forward(&self.text.pooled(ids, mask)?)?,
        )
    }

    pub fn forward(&self, pixels: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<ClipOutput> {
        let image_embeds = self.image_embeds(pixels)?;
        let text_embeds = self.text_embeds(ids, mask)?;
        let scale = self.logit_scale.exp()?;
        let logits_per_image = image_embeds
            .matmul(&text_embeds.t()?)?
            .broadcast_mul(&scale)?;
        Ok(ClipOutput {
            image_embeds,
            text_embeds,
            logits_per_image,
        })
    }
}

/// A CLIP model directory loaded with its preprocessor and tokenizer: what
/// `autoglm embed image` and `autoglm zero-shot` use.
pub struct ClipPipeline {
    pub model: Clip,
    pub preprocess: Preprocess,
    pub tokenizer: Tokenizer,
    pad_id: u32,
    device: Device,
}

impl ClipPipeline {
    /// Loads `config.json`, `model.safetensors`, `preprocessor_config.json`
    /// and `tokenizer.json` from a HF CLIP directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                hint: "no such model directory; pass a HF CLIPModel directory with --model".into(),
            });
        }
        let cfg_path = dir.join("config.json");
        let cfg: ClipConfig = crate::io::read_json(&cfg_path)?;
        cfg.validate(&cfg_path)?;
        let pp_path = dir.join("preprocessor_config.json");
        let preprocess =
            crate::io::read_json::<ImageProcessorConfig>(&pp_path)?.to_preprocess(&pp_path)?;
        let tokenizer = Tokenizer::from_file(
            &dir.join("tokenizer.json"),
            cfg.text_config.max_position_embeddings,
        )?;
        let vb = Safetensors::open_dir(dir)?.var_builder(DType::F32, device);
        let model = Clip::new(vb, &cfg)?;
        let pad_id = cfg.text_config.pad_token_id;
        Ok(Self {
            model,
            preprocess,
            tokenizer,
            pad_id,
            device: device.clone(),
        })
    }

    pub fn pixels(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.preprocess.batch(images, &self.device)
    }

    pub fn embed_images(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.model.image_embeds(&self.pixels(images)?)
    }

    pub fn embed_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let b = self.tokenizer.batch(texts, self.pad_id, &self.device)?;
        self.model.text_embeds(&b.ids, &b.mask)
    }

    /// Zero-shot probabilities `(I, L)`: softmax over the labels of the
    /// scaled similarities.
    pub fn zero_shot(&self, images: &[RgbImage], labels: &[&str]) -> Result<Tensor> {
        if labels.is_empty() {
            return Err(Error::Invalid("zero-shot needs at least one label".into()));
        }
        let b = self.tokenizer.batch(labels, self.pad_id, &self.device)?;
        let out = self.model.forward(&self.pixels(images)?, &b.ids, &b.mask)?;
        Ok(candle_nn::ops::softmax_last_dim(&out.logits_per_image)?)
    }
}
