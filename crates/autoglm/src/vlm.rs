//! The Open-AutoGLM vision-language model in the HF
//! `LlavaForConditionalGeneration` layout: CLIP vision tower → hidden state
//! of `vision_feature_layer` (class token dropped with strategy `default`)
//! → projector → one LM embedding per image token, spliced into the prompt
//! where the `<image>` placeholders are → Llama-family decoder.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::LlavaConfig;
use crate::fusion::attention::{DistanceBias, GatedCrossAttention};
use crate::fusion::projector::Projector;
use crate::fusion::router::{Route, Router};
use crate::io::weights::Safetensors;
use crate::text::kv_cache::KvCache;
use crate::text::llama::{Llama, Positions};
use crate::vision::convnet::ConvNet;
use crate::vision::efficientnet::{EfficientNet, EfficientNetConfig};
use crate::vision::vit::ClipVision;
use crate::{Error, Result};

/// The image encoder: a CLIP-layout ViT, or the pretrained EfficientNet-Lite0
/// (inference kernels only: it is kept frozen).
pub enum VisionTower {
    Clip(ClipVision),
    EfficientNet(EfficientNet),
    Conv(ConvNet),
}

/// The name (under `multi_modal_projector`) of the linear map that
/// `token_coord_products_linear` adds; it starts at 0.
pub const COORD_PRODUCTS: &str = "coord_products";

/// One self-attention block over an image's projected tokens
/// (`image_self_attention.{i}`).
pub struct ImageSelfBlock {
    pub attn: GatedCrossAttention,
    /// The bias from how far apart two tokens sit
    /// (`image_self_attention.{i}.distance_slope`), with
    /// `image_self_attention_distance_slope`.
    pub distance: Option<DistanceBias>,
}

pub struct Llava {
    pub vision: VisionTower,
    pub projector: Projector,
    /// The tokens' channels times x and times y (and their Fourier
    /// coordinates, with `token_coord_fourier`), mapped to the decoder's
    /// width and added to the projector's output
    /// (`multi_modal_projector.coord_products`), with
    /// `token_coord_products_linear`.
    pub coord_products: Option<crate::nn::Linear>,
    /// Image→text attention on the projected image tokens
    /// (`image_text_attention.*`), when the config asks for it.
    pub image_text: Option<GatedCrossAttention>,
    /// Self-attention over each image's projected tokens
    /// (`image_self_attention.{i}`), with `image_self_attention_layers`.
    pub image_self: Vec<ImageSelfBlock>,
    /// Chooses each prompt's path (`router.*`), when the config asks for
    /// it.
    pub router: Option<Router>,
    /// Projects the light path's early-exit tower features
    /// (`light_projector.*`, with `router_light_tower_stage`).
    pub light_projector: Option<Projector>,
    pub lm: Llama,
    pub config: LlavaConfig,
}

impl Llava {
    /// Accepts both checkpoint layouts: transformers 4 / 5 `save_pretrained`
    /// (`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
    /// `language_model.lm_head`) and the refactored one (`model.vision_tower`,
    /// `model.multi_modal_projector`, `model.language_model`, `lm_head`).
    pub fn new(vb: VarBuilder, cfg: &LlavaConfig) -> Result<Self> {
        let root = if vb.contains_tensor("model.language_model.embed_tokens.weight") {
            vb.pp("model")
        } else {
            vb.clone()
        };
        let tower = root.pp("vision_tower");
        let vision = if cfg.vision_config.is_efficientnet() {
            let mut ec = EfficientNetConfig::lite0();
            ec.image_size = cfg.vision_config.image_size;
            VisionTower::EfficientNet(EfficientNet::new(tower, &ec)?)
        } else if cfg.vision_config.is_conv() {
            VisionTower::Conv(ConvNet::new(tower, &cfg.vision_config.conv())?)
        } else if tower.contains_tensor("vision_model.embeddings.class_embedding") {
            // CLIPVisionModel keeps the transformer under `vision_model`.
            VisionTower::Clip(ClipVision::new(
                tower.pp("vision_model"),
                &cfg.vision_config,
            )?)
        } else {
            VisionTower::Clip(ClipVision::new(tower, &cfg.vision_config)?)
        };
        Self::with_vision(vision, vb, cfg)
    }

    /// The projector and decoder from `vb` (either layout, as [`Self::new`])
    /// around a vision tower built elsewhere — e.g. a frozen pretrained one
    /// whose weights are not in `vb`.
    pub fn with_vision(vision: VisionTower, vb: VarBuilder, cfg: &LlavaConfig) -> Result<Self> {
        let (root, lm_model, lm_head) =
            if vb.contains_tensor("model.language_model.embed_tokens.weight") {
                (
                    vb.pp("model"),
                    vb.pp("model").pp("language_model"),
                    vb.pp("lm_head"),
                )
            } else {
                (
                    vb.clone(),
                    vb.pp("language_model").pp("model"),
                    vb.pp("language_model").pp("lm_head"),
                )
            };
        let kind = cfg.projector().map_err(Error::Invalid)?;
        let mut t = cfg.text_config.clone();
        t.shared_position_token = cfg
            .image_tokens_share_position
            .then_some(cfg.image_token_index);
        let t = &t;
        Ok(Self {
            vision,
            projector: Projector::new(
                root.pp("multi_modal_projector"),
                kind,
                cfg.vision_config.projector_input_width(),
                t.hidden_size,
                cfg.multimodal_projector_bias,
                cfg.adapter_dim.unwrap_or(t.hidden_size / 4),
            )?,
            coord_products: cfg
                .vision_config
                .token_coord_products_linear
                .then(|| {
                    crate::nn::linear_no_bias(
                        cfg.vision_config.coord_extra_width(),
                        t.hidden_size,
                        root.pp("multi_modal_projector").pp(COORD_PRODUCTS),
                    )
                })
                .transpose()?,
            image_text: cfg
                .image_text_attention_heads
                .map(|heads| {
                    GatedCrossAttention::new(
                        root.pp("image_text_attention"),
                        t.hidden_size,
                        t.hidden_size,
                        heads,
                        None,
                    )
                })
                .transpose()?,
            image_self: (0..cfg.image_self_attention_layers)
                .map(|i| {
                    let vb = root.pp("image_self_attention").pp(i);
                    Ok(ImageSelfBlock {
                        attn: GatedCrossAttention::new(
                            vb.clone(),
                            t.hidden_size,
                            t.hidden_size,
                            t.num_attention_heads,
                            None,
                        )?,
                        distance: cfg
                            .image_self_attention_distance_slope
                            .map(|init| DistanceBias::new(vb, t.num_attention_heads, init, true))
                            .transpose()?,
                    })
                })
                .collect::<Result<_>>()?,
            // A router that chooses before the tower reads the question's
            // mean embedding; one that chooses after it, the image's too.
            router: cfg
                .has_router()
                .then(|| {
                    let width = if cfg.routes_before_tower() { 1 } else { 2 } * t.hidden_size;
                    Router::new(root.pp("router"), width, cfg.router_threshold)
                })
                .transpose()?,
            light_projector: cfg
                .router_light_tower_stage
                .map(|k| {
                    let width = EfficientNet::stage_width(&EfficientNetConfig::lite0(), k)
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "router_light_tower_stage {k} is not a stage of EfficientNet-Lite0"
                            ))
                        })?;
                    Projector::new(
                        root.pp("light_projector"),
                        kind,
                        width,
                        t.hidden_size,
                        cfg.multimodal_projector_bias,
                        cfg.adapter_dim.unwrap_or(t.hidden_size / 4),
                    )
                })
                .transpose()?,
            lm: Llama::new(lm_model, lm_head, t)?,
            config: cfg.clone(),
        })
    }

    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: LlavaConfig = crate::io::read_json(&cfg_path)?;
        cfg.validate(&cfg_path)?;
        let vb = Safetensors::open_dir(dir)?.var_builder(DType::F32, device);
        Self::new(vb, &cfg)
    }

    /// Image tokens per image.
    pub fn image_tokens(&self) -> usize {
        self.config.image_tokens()
    }

    /// Projected image features.
    ///
    /// # Shapes
    /// `pixels`: (N, 3, S, S) → (N, image_tokens, H_lm)
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        self.project(&self.vision_features(pixels)?)
    }

    /// The projector on the tower's features ([`Self::vision_features`]),
    /// with `token_coord_products` after their products by x and by y and
    /// with `token_coord_fourier` after their (x, y)'s sines and cosines;
    /// with `token_coord_products_linear` these go through their own linear
    /// map instead, added to the projector's output.
    ///
    /// # Shapes
    /// `features`: (N, T, H_vision) → (N, T, H_lm)
    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        let tokens = self.project_tokens(features)?;
        self.mix_image_tokens(tokens, self.distance_coords(features)?.as_ref())
    }

    /// [`Self::project`] as two parts: the projected tokens plus `delta`,
    /// what the image self-attention blocks add to them, computed from
    /// the tokens detached. The sum is `project`'s output; a loss on
    /// `delta` alone trains the blocks and leaves the projector to the
    /// loss on the answers (the trainer's `neighbour_probe`).
    ///
    /// # Shapes
    /// `features`: (N, T, H_vision) → (N, T, H_lm) twice: (tokens, delta)
    pub fn project_with_mix(&self, features: &Tensor) -> Result<(Tensor, Tensor)> {
        let tokens = self.project_tokens(features)?;
        let base = tokens.detach();
        let mixed =
            self.mix_image_tokens(base.clone(), self.distance_coords(features)?.as_ref())?;
        let delta = (mixed - base)?;
        Ok(((tokens + &delta)?, delta))
    }

    /// The tokens' (x, y), the features' last two columns, when the image
    /// self-attention blocks are biased by distance.
    fn distance_coords(&self, features: &Tensor) -> Result<Option<Tensor>> {
        if self.image_self.iter().all(|b| b.distance.is_none()) {
            return Ok(None);
        }
        let w = features.dim(D::Minus1)?;
        if w < 2 {
            return Err(Error::Invalid(format!(
                "image_self_attention_distance_slope needs each token's (x, y) last, got {w} features per token"
            )));
        }
        Ok(Some(features.narrow(D::Minus1, w - 2, 2)?))
    }

    /// The `image_self_attention` blocks on one batch of images' projected
    /// tokens, each token attending to all of its own image's tokens;
    /// with `image_self_attention_distance_slope`, biased by how far apart
    /// the tokens sit (`coords`) and not to itself.
    ///
    /// # Shapes
    /// `tokens`: (N, T, H_lm), `coords`: (N, T, 2) → (N, T, H_lm)
    pub fn mix_image_tokens(&self, tokens: Tensor, coords: Option<&Tensor>) -> Result<Tensor> {
        let mut x = tokens;
        for block in &self.image_self {
            let bias = match (&block.distance, coords) {
                (Some(d), Some(c)) => Some(d.forward(c)?),
                (Some(_), None) => {
                    return Err(Error::Invalid(
                        "image_self_attention_distance_slope needs the tokens' (x, y); this path has none (vision_config.token_coords)".into(),
                    ))
                }
                (None, _) => None,
            };
            x = block.attn.forward_self(&x, bias.as_ref())?;
        }
        Ok(x)
    }

    fn project_tokens(&self, features: &Tensor) -> Result<Tensor> {
        let v = &self.config.vision_config;
        if !v.token_coord_products && v.token_coord_fourier == 0 {
            return self.projector.forward(features);
        }
        let w = features.dim(D::Minus1)?;
        if w < 3 {
            return Err(Error::Invalid(format!(
                "token_coord_products and token_coord_fourier need channels and (x, y) last, got {w} features per token"
            )));
        }
        let x = features.narrow(D::Minus1, w - 2, 1)?;
        let y = features.narrow(D::Minus1, w - 1, 1)?;
        let mut extra = Vec::with_capacity(3);
        if v.token_coord_products {
            let channels = features.narrow(D::Minus1, 0, w - 2)?;
            extra.push(channels.broadcast_mul(&x)?);
            extra.push(channels.broadcast_mul(&y)?);
        }
        if v.token_coord_fourier > 0 {
            extra.push(crate::vision::convnet::fourier_coords(
                &x,
                &y,
                v.token_coord_fourier,
            )?);
        }
        let extra = Tensor::cat(&extra, D::Minus1)?;
        if let Some(map) = &self.coord_products {
            return Ok((self.projector.forward(features)? + map.forward(&extra)?)?);
        }
        self.projector
            .forward(&Tensor::cat(&[features, &extra], D::Minus1)?)
    }

    /// The vision tower's selected features, before the projector.
    ///
    /// # Shapes
    /// `pixels`: (N, 3, S, S) → (N, image_tokens, H_vision)
    pub fn vision_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let vit = match &self.vision {
            VisionTower::EfficientNet(e) => {
                let v = &self.config.vision_config;
                let tokens = match v.feature_stage {
                    Some(k) => e.stage_map_tokens(pixels, k)?,
                    None => e.head_tokens(pixels)?,
                };
                if !v.token_coords && v.low_level_stage.is_none() {
                    return Ok(tokens);
                }
                let (n, t, _) = tokens.dims3()?;
                let g = (t as f64).sqrt().round() as usize;
                if g * g != t {
                    return Err(Error::Invalid(format!(
                        "token_coords and low_level_stage need a square grid of tokens, got {t}; use a square image"
                    )));
                }
                let mut parts = vec![tokens];
                if let Some(j) = v.low_level_stage {
                    parts.push(e.stage_tokens_on(pixels, j, (g, g))?);
                }
                if v.token_coords {
                    let coords = crate::vision::convnet::grid_coords(g, pixels.device())?;
                    parts.push(coords.unsqueeze(0)?.expand((n, t, 2))?);
                }
                return Ok(Tensor::cat(&parts, D::Minus1)?);
            }
            VisionTower::Conv(c) => return c.forward(pixels),
            VisionTower::Clip(v) => v,
        };
        let out = vit.forward(pixels)?;
        let n = out.hidden_states.len() as i64;
        let l = self.config.vision_feature_layer;
        let idx = if l < 0 { n + l } else { l };
        let h = usize::try_from(idx)
            .ok()
            .and_then(|i| out.hidden_states.get(i))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "vision_feature_layer {l} is outside the tower's {n} hidden states"
                ))
            })?;
        Ok(if self.config.vision_feature_select_strategy == "default" {
            h.narrow(1, 1, h.dim(1)? - 1)?
        } else {
            h.clone()
        })
    }

    /// Projected features of the router's light path, as many tokens as
    /// the full path's (the prompt is the same on both paths):
    /// - `router_light_image_size`: the tower on the pixels average-pooled
    ///   to that side, each of the full grid's tokens taking the small
    ///   grid's token at its place (nearest);
    /// - `router_light_tower_stage`: the EfficientNet's map after that
    ///   stage, pooled onto the head's grid, through `light_projector`.
    ///
    /// # Shapes
    /// `pixels`: (N, 3, S, S) → (N, image_tokens, H_lm)
    pub fn light_image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        self.project_light(&self.light_vision_features(pixels)?)
    }

    /// The light path's projector on its tower features.
    pub fn project_light(&self, features: &Tensor) -> Result<Tensor> {
        match &self.light_projector {
            Some(p) => self.mix_image_tokens(p.forward(features)?, None),
            None => self.project(features),
        }
    }

    /// [`Self::light_image_features`] before the projector.
    ///
    /// # Shapes
    /// `pixels`: (N, 3, S, S) → (N, image_tokens, H_vision or C_stage)
    pub fn light_vision_features(&self, pixels: &Tensor) -> Result<Tensor> {
        if let Some(k) = self.config.router_light_tower_stage {
            let VisionTower::EfficientNet(e) = &self.vision else {
                return Err(Error::Invalid(
                    "router_light_tower_stage needs the EfficientNet tower".into(),
                ));
            };
            return e.stage_tokens(pixels, k);
        }
        let Some(light) = self.config.router_light_image_size else {
            return Err(Error::Invalid(
                "light_vision_features: the model's router has no light image path (router_light_image_size or router_light_tower_stage)".into(),
            ));
        };
        let side = pixels.dim(3)?;
        if light == 0 || side % light != 0 || pixels.dim(2)? != side {
            return Err(Error::Invalid(format!(
                "light image features: {side}×{} pixels do not pool to router_light_image_size {light}",
                pixels.dim(2)?
            )));
        }
        let small = self.vision_features(&pixels.avg_pool2d(side / light)?)?;
        let grid = |n: usize| (1..=n).find(|g| g * g >= n).filter(|g| g * g == n);
        let (full, part) = (self.image_tokens(), small.dim(1)?);
        let (Some(g), Some(gl)) = (grid(full), grid(part)) else {
            return Err(Error::Invalid(format!(
                "light image features: {part} light and {full} full tokens are not both square grids"
            )));
        };
        let at: Vec<u32> = (0..full)
            .map(|i| ((i / g) * gl / g * gl + (i % g) * gl / g) as u32)
            .collect();
        Ok(small
            .contiguous()?
            .index_select(&Tensor::new(at.as_slice(), pixels.device())?, 1)?)
    }

    /// Expands each `<image>` placeholder into `image_tokens` copies (unless
    /// the ids are already expanded) and checks there is one per image.
    pub fn expand_image_tokens(&self, ids: &[u32], n_images: usize) -> Result<Vec<u32>> {
        let tok = self.config.image_token_index;
        let per = self.image_tokens();
        let count = ids.iter().filter(|&&i| i == tok).count();
        if count == n_images * per {
            return Ok(ids.to_vec()); // already expanded (or no images)
        }
        if count != n_images {
            return Err(Error::Invalid(format!(
                "the prompt has {count} image placeholders but {n_images} image(s) were given; put one <image> in the prompt per image"
            )));
        }
        let mut out = Vec::with_capacity(ids.len() + count * (per - 1));
        for &i in ids {
            if i == tok {
                out.extend(std::iter::repeat_n(tok, per));
            } else {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// Prompt embeddings with the image features in place of the image
    /// tokens. `ids` must be expanded ([`Self::expand_image_tokens`]).
    ///
    /// # Shapes
    /// `ids`: T ids; `pixels`: (N, 3, S, S) → (1, T, H_lm)
    pub fn embed_prompt(&self, ids: &[u32], pixels: Option<&Tensor>) -> Result<Tensor> {
        let feats = pixels.map(|p| self.image_features(p)).transpose()?;
        self.embed_prompt_features(ids, feats.as_ref())
    }

    /// As [`Self::embed_prompt`], with the projected image features already
    /// computed (so that a server can run the vision tower once for the
    /// images of many prompts).
    ///
    /// # Shapes
    /// `ids`: T ids; `features`: (N, P, H_lm) → (1, T, H_lm)
    pub fn embed_prompt_features(&self, ids: &[u32], features: Option<&Tensor>) -> Result<Tensor> {
        let tok = self.config.image_token_index;
        let dev = self.lm.embed_tokens_device();
        let n_img_tokens = ids.iter().filter(|&&i| i == tok).count();
        // The placeholder id may lie outside the vocabulary: embed 0 there.
        let safe: Vec<u32> = ids.iter().map(|&i| if i == tok { 0 } else { i }).collect();
        let text = self
            .lm
            .embed(&Tensor::new(safe.as_slice(), dev)?.unsqueeze(0)?)?
            .squeeze(0)?; // (T, H)
        let feats = match features {
            None if n_img_tokens == 0 => return Ok(text.unsqueeze(0)?),
            None => {
                return Err(Error::Invalid(format!(
                    "the prompt has {n_img_tokens} image tokens but no image was given"
                )))
            }
            Some(f) => {
                let (n, per, h) = f.dims3()?;
                if n * per != n_img_tokens {
                    return Err(Error::Invalid(format!(
                        "the prompt has {n_img_tokens} image tokens but {n} image(s) give {}",
                        n * per
                    )));
                }
                match &self.image_text {
                    None => f.reshape((n * per, h))?,
                    Some(block) => {
                        // Each image attends to the prompt's text tokens.
                        let at: Vec<u32> = (0..ids.len() as u32)
                            .filter(|&i| ids[i as usize] != tok)
                            .collect();
                        let words = text.index_select(&Tensor::new(at.as_slice(), dev)?, 0)?;
                        let ctx = words.unsqueeze(0)?.repeat((n, 1, 1))?;
                        block.forward(f, &ctx, None)?.reshape((n * per, h))?
                    }
                }
            }
        };
        Ok(splice(ids, tok, &text, &feats)?.unsqueeze(0)?)
    }

    /// Embeddings of a training batch: one image per row, rows right-padded
    /// with id 0 to the longest (causal attention keeps the padding after
    /// every real token invisible to it). Each row must hold exactly one
    /// expanded image ([`Self::expand_image_tokens`]).
    ///
    /// `prompt_lens[b]` is where row b's prompt ends (the answer tokens of
    /// teacher forcing follow): image→text attention reads only the prompt,
    /// as it does at inference.
    ///
    /// # Shapes
    /// `rows`: B rows of T ids; `image_embeds`: (B, P, H_lm), the projected
    /// features ([`Self::image_features`]) → (B, T, H_lm)
    pub fn embed_batch(
        &self,
        rows: &[Vec<u32>],
        prompt_lens: &[usize],
        image_embeds: &Tensor,
    ) -> Result<Tensor> {
        if prompt_lens.len() != rows.len()
            || rows.iter().zip(prompt_lens).any(|(r, &p)| p > r.len())
        {
            return Err(Error::Invalid(format!(
                "embed_batch: {} prompt lengths for {} rows, each at most its row's length",
                prompt_lens.len(),
                rows.len()
            )));
        }
        let tok = self.config.image_token_index;
        let dev = self.lm.embed_tokens_device();
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        let padded: Vec<u32> = rows
            .iter()
            .flat_map(|r| {
                r.iter()
                    .map(|&i| if i == tok { 0 } else { i })
                    .chain(std::iter::repeat_n(0, t - r.len()))
            })
            .collect();
        let text = self
            .lm
            .embed(&Tensor::from_vec(padded, (rows.len(), t), dev)?)?;
        let feats = image_embeds;
        if feats.dim(0)? != rows.len() {
            return Err(Error::Invalid(format!(
                "{} rows but {} images: give one image per row",
                rows.len(),
                feats.dim(0)?
            )));
        }
        let per = feats.dim(1)?;
        let attended;
        let feats = match &self.image_text {
            None => feats,
            Some(block) => {
                // Each row's image attends to that row's prompt text (not
                // its image tokens, not the answer, not the padding).
                let mask: Vec<f32> = rows
                    .iter()
                    .zip(prompt_lens)
                    .flat_map(|(r, &p)| (0..t).map(move |j| f32::from(j < p && r[j] != tok)))
                    .collect();
                let mask = Tensor::from_vec(mask, (rows.len(), t), dev)?;
                attended = block.forward(feats, &text, Some(&mask))?;
                &attended
            }
        };
        let out = rows
            .iter()
            .enumerate()
            .map(|(b, r)| {
                let n = r.iter().filter(|&&i| i == tok).count();
                if n != per {
                    return Err(Error::Invalid(format!(
                        "row {b} has {n} image tokens; one image needs {per}"
                    )));
                }
                let mut ids = r.clone();
                ids.resize(t, 0);
                splice(&ids, tok, &text.get(b)?, &feats.get(b)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&out, 0)?)
    }

    /// What the decoder's cross-attention blocks attend to for one prompt:
    /// all its images' projected tokens, or `None` when the decoder has no
    /// such blocks or there is no image.
    ///
    /// # Shapes
    /// `features`: (N, P, H_lm) → (1, N·P, H_lm)
    pub fn decoder_context(&self, features: Option<&Tensor>) -> Result<Option<Tensor>> {
        match features {
            Some(f) if self.lm.config.cross_attention_every.is_some() => {
                let (n, p, h) = f.dims3()?;
                Ok(Some(f.reshape((1, n * p, h))?))
            }
            _ => Ok(None),
        }
    }

    /// The router's input: the mean of each prompt's image-token embeddings
    /// beside the mean of its text-token embeddings (zeros for a part the
    /// prompt lacks); the text's mean alone when the router chooses before
    /// the tower (the image is not yet seen).
    ///
    /// Two means, not one: in a single mean over the prompt, the question's
    /// few words are outweighed by dozens of image tokens, and a router
    /// trained on it made one decision for every input.
    ///
    /// # Shapes
    /// `embeds`: (B, T, H), `prompts`: B prompts' ids, each of 1..=T ids
    /// (row b's first positions) → (B, 2·H)
    pub fn router_input(&self, embeds: &Tensor, prompts: &[&[u32]]) -> Result<Tensor> {
        let (b, t, h) = embeds.dims3()?;
        if prompts.len() != b || prompts.iter().any(|p| p.is_empty() || p.len() > t) {
            return Err(Error::Invalid(format!(
                "router: {} prompts for {b} rows of {t} positions, each of 1..={t} ids",
                prompts.len()
            )));
        }
        let tok = self.config.image_token_index;
        let mut w = vec![0f32; b * 2 * t];
        for (row, p) in prompts.iter().enumerate() {
            let images = p.iter().filter(|&&i| i == tok).count();
            for (j, &id) in p.iter().enumerate() {
                let (part, n) = if id == tok {
                    (0, images)
                } else {
                    (1, p.len() - images)
                };
                w[(row * 2 + part) * t + j] = 1.0 / n as f32;
            }
        }
        let w = Tensor::from_vec(w, (b, 2, t), embeds.device())?;
        let means = w.matmul(embeds)?;
        Ok(if self.config.routes_before_tower() {
            means.narrow(1, 1, 1)?.reshape((b, h))?
        } else {
            means.reshape((b, 2 * h))?
        })
    }

    /// What the light path costs against the full one, in the tower: its
    /// share of the pixels (`router_light_image_size`), or of the tower's
    /// blocks and head (`router_light_tower_stage`); 1 when it runs the
    /// whole tower.
    pub fn light_tower_share(&self) -> f64 {
        if let Some(l) = self.config.router_light_image_size {
            return (l as f64 / self.config.vision_config.image_size as f64).powi(2);
        }
        if let Some(k) = self.config.router_light_tower_stage {
            let stages = EfficientNetConfig::lite0().stages;
            let blocks = |n: usize| stages.iter().take(n).map(|s| s.repeats).sum::<usize>();
            return blocks(k) as f64 / (blocks(stages.len()) + 1) as f64;
        }
        1.0
    }

    /// Decoder layers of the light path.
    pub fn light_depth(&self) -> usize {
        self.config
            .router_light_layers
            .unwrap_or_else(|| self.lm.depth())
    }

    /// The path for one prompt (`ids`, image tokens expanded) when the
    /// router chooses before the tower, from the question's embeddings
    /// alone: `None` for any other model.
    pub fn route_question(&self, ids: &[u32]) -> Result<Option<Route>> {
        let Some(router) = self
            .router
            .as_ref()
            .filter(|_| self.config.routes_before_tower())
        else {
            return Ok(None);
        };
        let dev = self.lm.embed_tokens_device();
        let e = self.lm.embed(&Tensor::new(ids, dev)?.unsqueeze(0)?)?;
        Ok(Some(router.route(&self.router_input(&e, &[ids])?)?[0]))
    }

    /// The path and decoder depth for one prompt (`ids`, embedded as
    /// `embeds` (1, T, H)): `None` without a router.
    /// A router that chooses before the tower answers in
    /// [`Self::route_question`] instead: `None` here.
    pub fn route(&self, embeds: &Tensor, ids: &[u32]) -> Result<Option<(Route, usize)>> {
        let Some(router) = self
            .router
            .as_ref()
            .filter(|_| !self.config.routes_before_tower())
        else {
            return Ok(None);
        };
        let route = router.route(&self.router_input(embeds, &[ids])?)?[0];
        let depth = match route {
            Route::Light => self.light_depth(),
            Route::Full => self.lm.depth(),
        };
        Ok(Some((route, depth)))
    }

    /// Logits of every prompt position (for parity tests and scoring).
    pub fn forward(
        &self,
        ids: &[u32],
        pixels: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let feats = pixels.map(|p| self.image_features(p)).transpose()?;
        let e = self.embed_prompt_features(ids, feats.as_ref())?;
        if self.lm.config.shared_position_token.is_some() && !cache.is_empty() {
            return Err(Error::Invalid(
                "forward: a model whose image tokens share a position runs each prompt from an empty cache".into(),
            ));
        }
        let pos = Positions::of_ids(
            &[ids.to_vec()],
            ids.len(),
            self.lm.config.shared_position_token,
            e.device(),
        )?
        .with_context(self.decoder_context(feats.as_ref())?, None);
        self.lm.logits(&self.lm.forward_embeds(&e, &pos, cache)?)
    }
}

/// Rows of `text` (T, H) with the rows of `feats` (K, H) in place of the K
/// positions of `ids` that hold the image token, in order.
fn splice(ids: &[u32], tok: u32, text: &Tensor, feats: &Tensor) -> Result<Tensor> {
    let mut parts = Vec::new();
    let (mut i, mut next_feat) = (0, 0);
    while i < ids.len() {
        let is_img = ids[i] == tok;
        let start = i;
        while i < ids.len() && (ids[i] == tok) == is_img {
            i += 1;
        }
        let len = i - start;
        if is_img {
            parts.push(feats.narrow(0, next_feat, len)?);
            next_feat += len;
        } else {
            parts.push(text.narrow(0, start, len)?);
        }
    }
    Ok(Tensor::cat(&parts, 0)?)
}
