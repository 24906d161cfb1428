//! Serde mirrors of HF `config.json` files, with HF's defaults, and the
//! checks that turn them into configs the models can trust.
//!
//! A field with the wrong type is a load error that names the field (serde
//! reports it with line and column); a value that parses but cannot describe
//! a model (zero heads, a width not divisible by the head count) is refused by
//! `validate` with the same clarity.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// Activation functions named by HF configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// The exact, erf-based GELU.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    pub fn forward(self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
        }
    }
}

/// `attention_block_size`: at least 1, and only beside `attention_top_k`
/// (the keys kept, which it groups into blocks).
pub(crate) fn check_block_size(
    path: &Path,
    tower: &str,
    top_k: Option<usize>,
    block: Option<usize>,
) -> Result<()> {
    match block_size_error(top_k, block) {
        Some(why) => Err(invalid(path, format!("{tower}.attention_block_size {why}"))),
        None => Ok(()),
    }
}

/// What is wrong with `attention_block_size` beside `attention_top_k`, if
/// anything (the model configs and the training config share the rule).
pub fn block_size_error(top_k: Option<usize>, block: Option<usize>) -> Option<&'static str> {
    match (top_k, block) {
        (_, Some(0)) => Some("must be at least 1 (leave it out for token top-k)"),
        (None, Some(_)) => {
            Some("needs attention_top_k (the keys each query keeps, taken in blocks of this size)")
        }
        _ => None,
    }
}

fn invalid(path: &Path, msg: String) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg,
    }
}

/// Checks the head layout of one transformer stack.
fn check_heads(path: &Path, what: &str, hidden: usize, heads: usize, layers: usize) -> Result<()> {
    if hidden == 0 || heads == 0 || layers == 0 {
        return Err(invalid(
            path,
            format!(
                "{what}: hidden_size, num_attention_heads and num_hidden_layers must be positive"
            ),
        ));
    }
    if hidden % heads != 0 {
        return Err(invalid(
            path,
            format!("{what}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"),
        ));
    }
    Ok(())
}

/// HF `BertConfig` (the fields an encoder needs).
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_bert_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_512")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_2")]
    pub type_vocab_size: usize,
    #[serde(default = "default_ln_eps_bert")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "default_abs")]
    pub position_embedding_type: String,
}

fn default_bert_act() -> Activation {
    Activation::Gelu
}
fn default_512() -> usize {
    512
}
fn default_2() -> usize {
    2
}
fn default_ln_eps_bert() -> f64 {
    1e-12
}
fn default_abs() -> String {
    "absolute".into()
}

impl BertConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_heads(
            path,
            "bert",
            self.hidden_size,
            self.num_attention_heads,
            self.num_hidden_layers,
        )?;
        if self.position_embedding_type != "absolute" {
            return Err(invalid(
                path,
                format!(
                    "position_embedding_type `{}` is not supported (only `absolute`)",
                    self.position_embedding_type
                ),
            ));
        }
        Ok(())
    }
}

/// HF `CLIPTextConfig`, with HF's defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
            pad_token_id: 1,
        }
    }
}

/// `vision_config.model_type` of the EfficientNet-Lite0 tower.
pub const EFFICIENTNET_LITE0: &str = "efficientnet_lite0";

/// `vision_config.model_type` of the small convolutional encoder trained
/// from scratch ([`crate::vision::convnet`]): `hidden_size` channels,
/// `num_hidden_layers` stride-2 convolutions.
pub const CONV_VISION: &str = "conv_vision";

/// The most frequencies `token_coord_fourier` takes: the 8th is 64π, past
/// what a grid of image tokens can tell apart.
pub const MAX_COORD_FOURIER: usize = 8;

/// HF `CLIPVisionConfig`, with HF's defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    /// `clip_vision_model` (or absent) for a ViT; `efficientnet_lite0` for
    /// the pretrained EfficientNet-Lite0 tower (hidden_size 1280, one token
    /// per cell of its stride-32 head map).
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// Not in HF's config: top-k sparse attention in the encoder (each
    /// patch attends to its `k` highest-scoring patches); absent = dense.
    pub attention_top_k: Option<usize>,
    /// Not in HF's config: with `attention_top_k`, keep the patches in
    /// whole blocks of this many (block top-k sparse attention).
    pub attention_block_size: Option<usize>,
    /// Not in HF's config, [`CONV_VISION`] only: how the last two stages
    /// combine (add, attention, gate); absent = the last stage alone.
    pub feature_fusion: Option<crate::fusion::gating::FusionKind>,
    /// Not in HF's config, [`CONV_VISION`] only: a feature pyramid with
    /// channel and spatial attention over the last two stages.
    pub fpn: bool,
    /// Not in HF's config, [`EFFICIENTNET_LITE0`] only: the image tokens
    /// are the cells of this stage's map (1-based, of 7; the later stages
    /// and the head do not run), not of the head's.
    pub feature_stage: Option<usize>,
    /// Not in HF's config, [`EFFICIENTNET_LITE0`] only: each image token
    /// carries its cell's centre (x, y) in [-1, 1] after its channels, as
    /// the [`CONV_VISION`] encoder's tokens always do. A decoder reads a
    /// token's place from its position in the prompt otherwise.
    pub token_coords: bool,
    /// Not in HF's config, with `token_coords` only: the projector also
    /// reads each token's channels times its x and times its y. Where a
    /// feature sits is then part of the feature, so that a mean over all
    /// tokens tells where things are; the plain (x, y) of a full grid
    /// average to the centre in every image, which leaves a decoder whose
    /// attention does not yet pick one token nothing to learn the reading
    /// of a place from (docs/benchmarks.md, "Left/right: a saddle").
    pub token_coord_products: bool,
    /// Not in HF's config, with `token_coord_products` only: the products
    /// reach the image tokens through their own linear map
    /// (`multi_modal_projector.coord_products`), zero at the start and
    /// added to the projector's output, instead of through the projector.
    /// A new model then starts as one without the products, and the map
    /// grows from their gradient (docs/benchmarks.md, "Left/right: a
    /// saddle").
    pub token_coord_products_linear: bool,
    /// Not in HF's config, with `token_coords` only: the projector also
    /// reads this many frequencies of each token's (x, y), sin and cos of
    /// x and of y at π/2, π, 2π, … ([`crate::vision::convnet::fourier_coords`]).
    /// The dot product of two tokens' features is then a sum of
    /// cos(ω Δx) + cos(ω Δy), a function of how far apart they are, which
    /// one attention score can read (docs/benchmarks.md, "A chain of
    /// runs"). They go where the products go: through
    /// `coord_products` with `token_coord_products_linear`, else through
    /// the projector. 0: none.
    pub token_coord_fourier: usize,
    /// Not in HF's config, [`EFFICIENTNET_LITE0`] only: each image token
    /// also carries this earlier stage's map (1-based), average-pooled onto
    /// the tokens' grid, after its channels: low-level features (colour,
    /// edges) beside the high-level ones.
    pub low_level_stage: Option<usize>,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            model_type: None,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            attention_top_k: None,
            attention_block_size: None,
            feature_fusion: None,
            fpn: false,
            feature_stage: None,
            token_coords: false,
            token_coord_products: false,
            token_coord_products_linear: false,
            token_coord_fourier: 0,
            low_level_stage: None,
        }
    }
}

impl ClipVisionConfig {
    /// Whether this is the EfficientNet-Lite0 tower rather than a ViT.
    pub fn is_efficientnet(&self) -> bool {
        self.model_type.as_deref() == Some(EFFICIENTNET_LITE0)
    }

    /// Whether this is the convolutional encoder trained from scratch.
    pub fn is_conv(&self) -> bool {
        self.model_type.as_deref() == Some(CONV_VISION)
    }

    /// The convolutional encoder this config describes.
    pub fn conv(&self) -> crate::vision::convnet::ConvNetConfig {
        crate::vision::convnet::ConvNetConfig {
            channels: self.hidden_size,
            layers: self.num_hidden_layers,
            image_size: self.image_size,
            fusion: self.feature_fusion,
            fpn: self.fpn,
            norm: false,
        }
    }

    /// Width of the features the tower hands the projector.
    pub fn feature_width(&self) -> usize {
        if self.is_conv() {
            return self.conv().token_width();
        }
        let lite0 = crate::vision::efficientnet::EfficientNetConfig::lite0();
        let coords = if self.token_coords { 2 } else { 0 };
        let low = self
            .low_level_stage
            .filter(|_| self.is_efficientnet())
            .and_then(|j| crate::vision::efficientnet::EfficientNet::stage_width(&lite0, j))
            .unwrap_or(0);
        coords
            + low
            + match self.feature_stage.filter(|_| self.is_efficientnet()) {
                Some(k) => {
                    crate::vision::efficientnet::EfficientNet::stage_width(&lite0, k).unwrap_or(0)
                }
                None => self.hidden_size,
            }
    }

    /// Width of what the projector reads: [`Self::feature_width`], and
    /// without `token_coord_products_linear` the features made from (x, y)
    /// after it ([`Self::coord_extra_width`]).
    pub fn projector_input_width(&self) -> usize {
        let w = self.feature_width();
        if self.token_coord_products_linear {
            w
        } else {
            w + self.coord_extra_width()
        }
    }

    /// How many features a token gets from its (x, y) beyond them: its
    /// channels times x and times y with `token_coord_products` (twice its
    /// channels), then 4 per `token_coord_fourier` frequency. With
    /// `token_coord_products_linear` they all go through the projector's
    /// `coord_products` map (the name kept from before the Fourier
    /// columns, so saved models still load).
    pub fn coord_extra_width(&self) -> usize {
        let products = if self.token_coord_products {
            2 * self.feature_width().saturating_sub(2)
        } else {
            0
        };
        products + 4 * self.token_coord_fourier
    }

    /// Checks the head layout and that the image holds at least one patch.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if (self.feature_fusion.is_some() || self.fpn) && !self.is_conv() {
            return Err(invalid(
                path,
                format!("vision_config: feature_fusion and fpn fuse the stages of the convolutional encoder; set model_type `{CONV_VISION}` or drop them"),
            ));
        }
        if let Some(j) = self.low_level_stage {
            let last = self.feature_stage.unwrap_or(
                crate::vision::efficientnet::EfficientNetConfig::lite0()
                    .stages
                    .len()
                    + 1,
            );
            if !self.is_efficientnet() || j == 0 || j >= last {
                return Err(invalid(
                    path,
                    format!("vision_config: low_level_stage {j} must be an {EFFICIENTNET_LITE0} stage before the tokens' own (1..{last})"),
                ));
            }
        }
        if self.token_coords && !self.is_efficientnet() {
            return Err(invalid(
                path,
                format!("vision_config: token_coords appends (x, y) to the {EFFICIENTNET_LITE0} tower's tokens; the `{CONV_VISION}` encoder's carry them already and a ViT's have position embeddings. Drop it"),
            ));
        }
        if self.token_coord_products && !self.token_coords {
            return Err(invalid(
                path,
                "vision_config: token_coord_products multiplies the channels by the (x, y) that token_coords appends; set token_coords too or drop it".into(),
            ));
        }
        if self.token_coord_fourier > MAX_COORD_FOURIER
            || (self.token_coord_fourier > 0 && !self.token_coords)
        {
            return Err(invalid(
                path,
                format!("vision_config: token_coord_fourier {} must be 0 (none) or up to {MAX_COORD_FOURIER} frequencies of the (x, y) that token_coords appends (set token_coords too)", self.token_coord_fourier),
            ));
        }
        if self.token_coord_products_linear && !self.token_coord_products {
            return Err(invalid(
                path,
                "vision_config: token_coord_products_linear chooses how the products of token_coord_products reach the tokens; set token_coord_products too or drop it".into(),
            ));
        }
        if self.is_conv() {
            return self
                .conv()
                .check()
                .map_err(|(field, why)| invalid(path, format!("vision_config.{field}: {why}")));
        }
        if let Some(k) = self.feature_stage {
            let stages = crate::vision::efficientnet::EfficientNetConfig::lite0()
                .stages
                .len();
            if !self.is_efficientnet() || k == 0 || k > stages {
                return Err(invalid(
                    path,
                    format!("vision_config: feature_stage {k} must name one of the {EFFICIENTNET_LITE0} tower's stages 1..={stages}"),
                ));
            }
        }
        if self.is_efficientnet() {
            if self.hidden_size != 1280 || self.image_size == 0 || self.image_size % 32 != 0 {
                return Err(invalid(
                    path,
                    format!(
                        "vision_config: {EFFICIENTNET_LITE0} needs hidden_size 1280 and an image_size that is a positive multiple of 32, got {} and {}",
                        self.hidden_size, self.image_size
                    ),
                ));
            }
            return Ok(());
        }
        if let Some(t) = self.model_type.as_deref() {
            if !matches!(t, "clip_vision_model" | "siglip_vision_model") {
                return Err(invalid(
                    path,
                    format!("vision_config.model_type `{t}` is not supported (clip_vision_model, siglip_vision_model, {EFFICIENTNET_LITE0} or {CONV_VISION})"),
                ));
            }
        }
        if self.attention_top_k == Some(0) {
            return Err(invalid(
                path,
                "vision_config.attention_top_k must be at least 1 (leave it out for dense attention)"
                    .into(),
            ));
        }
        check_block_size(
            path,
            "vision_config",
            self.attention_top_k,
            self.attention_block_size,
        )?;
        check_heads(
            path,
            "vision_config",
            self.hidden_size,
            self.num_attention_heads,
            self.num_hidden_layers,
        )?;
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return Err(invalid(
                path,
                format!(
                    "vision_config: image_size {} must be at least patch_size {} (and patch_size positive)",
                    self.image_size, self.patch_size
                ),
            ));
        }
        Ok(())
    }
}

/// HF `CLIPConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: ClipTextConfig,
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    #[serde(default = "default_proj")]
    pub projection_dim: usize,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_proj() -> usize {
    512
}

impl ClipConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        if let Some(t) = &self.model_type {
            if t != "clip" {
                return Err(invalid(
                    path,
                    format!("model_type is `{t}`, expected `clip` (a HF CLIPModel directory)"),
                ));
            }
        }
        let t = &self.text_config;
        check_heads(
            path,
            "text_config",
            t.hidden_size,
            t.num_attention_heads,
            t.num_hidden_layers,
        )?;
        self.vision_config.validate(path)?;
        if self.projection_dim == 0 || t.max_position_embeddings == 0 {
            return Err(invalid(
                path,
                "projection_dim and max_position_embeddings must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// HF image-processor config (`preprocessor_config.json`) of CLIP-style
/// processors.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default)]
    pub size: Option<SizeSpec>,
    #[serde(default)]
    pub crop_size: Option<SizeSpec>,
    #[serde(default = "default_resample")]
    pub resample: u32,
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    #[serde(default = "default_true")]
    pub do_resize: bool,
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default)]
    pub image_mean: Option<[f32; 3]>,
    #[serde(default)]
    pub image_std: Option<[f32; 3]>,
}

/// `size` / `crop_size` are a number in older files and a dict in newer ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    Int(u32),
    Dict {
        shortest_edge: Option<u32>,
        height: Option<u32>,
        width: Option<u32>,
    },
}

fn default_resample() -> u32 {
    3
}
fn default_true() -> bool {
    true
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}

/// OpenAI CLIP's normalisation constants (HF `OPENAI_CLIP_MEAN/STD`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_55, 0.261_302_6, 0.275_777_1];

impl ImageProcessorConfig {
    /// The resolved pipeline for a CLIP image processor.
    pub fn to_preprocess(&self, path: &Path) -> Result<crate::io::preprocess::Preprocess> {
        use crate::io::preprocess::{CropRounding, Preprocess, Resample};
        if !self.do_resize || !self.do_center_crop || !self.do_rescale || !self.do_normalize {
            return Err(invalid(
                path,
                "only processors that resize, center-crop, rescale and normalise are supported"
                    .into(),
            ));
        }
        if (self.rescale_factor - 1.0 / 255.0).abs() > 1e-9 {
            return Err(invalid(
                path,
                format!("rescale_factor {} is not 1/255", self.rescale_factor),
            ));
        }
        let shortest = match &self.size {
            Some(SizeSpec::Int(s)) => *s,
            Some(SizeSpec::Dict {
                shortest_edge: Some(s),
                ..
            }) => *s,
            _ => {
                return Err(invalid(
                    path,
                    "`size` must be a number or {\"shortest_edge\": N}".into(),
                ))
            }
        };
        let crop = match &self.crop_size {
            Some(SizeSpec::Int(s)) => (*s, *s),
            Some(SizeSpec::Dict {
                height: Some(h),
                width: Some(w),
                ..
            }) => (*h, *w),
            None => (shortest, shortest),
            _ => {
                return Err(invalid(
                    path,
                    "`crop_size` must be a number or {\"height\", \"width\"}".into(),
                ))
            }
        };
        if shortest == 0 || crop.0 == 0 || crop.1 == 0 {
            return Err(invalid(path, "size and crop_size must be positive".into()));
        }
        let resample =
            Resample::from_pil_code(self.resample).map_err(|e| invalid(path, e.to_string()))?;
        Ok(Preprocess {
            shortest_edge: shortest,
            resample,
            crop,
            crop_rounding: CropRounding::Floor,
            mean: self.image_mean.unwrap_or(CLIP_MEAN),
            std: self.image_std.unwrap_or(CLIP_STD),
        })
    }
}

mod lm;
pub use lm::{
    LlamaConfig, LlavaConfig, ProjectorKind, RopeScaling, MAX_IMAGE_SELF_ATTENTION_LAYERS,
};
