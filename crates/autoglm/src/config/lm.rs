//! Configs of the decoder LMs (HF `LlamaConfig`, `Qwen2Config`) and of the
//! VLM (HF `LlavaConfig`), in both the transformers 4 (`rope_scaling`,
//! `rope_theta`) and 5 (`rope_parameters`) spellings.

use std::path::Path;

use serde::Deserialize;

use super::{check_block_size, check_heads, invalid, ClipVisionConfig};
use crate::Result;

/// `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub rope_theta: Option<f64>,
}

/// One token id or several (HF allows both for `eos_token_id`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// HF `LlamaConfig` / `Qwen2Config`: the fields a Llama-family decoder needs.
/// Missing fields take `LlamaConfig`'s defaults, as transformers does for
/// the partial `text_config` older LLaVA checkpoints save.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_layers")]
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's switch for q/k/v/o biases; Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Not in HF's config: each query attends only to its `k` highest-
    /// scoring keys (top-k sparse attention); absent = dense.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_top_k: Option<usize>,
    /// Not in HF's config: with `attention_top_k`, keep the keys in whole
    /// blocks of this many (block top-k: each block of queries attends to
    /// its ⌈k / block⌉ best key blocks, and only those are computed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_block_size: Option<usize>,
    /// Not in HF's config: a Flamingo-style gated cross-attention block
    /// (`layers.{i}.cross_attn`, tanh gates starting at 0) before every
    /// `k`-th decoder layer (0, k, 2k, …), attending to the image context
    /// given with the positions; absent = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_attention_every: Option<usize>,
    /// Heads of those blocks (default: the decoder's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_attention_heads: Option<usize>,
    /// Not read from the file: set by the VLM that owns this decoder when
    /// its config asks for `image_tokens_share_position`. Each run of this
    /// token in a prompt takes one rotary position (see
    /// [`crate::text::llama::rotary_positions`]).
    #[serde(skip)]
    pub shared_position_token: Option<u32>,
}

impl LlamaConfig {
    /// Whether layer `i` has a cross-attention block before it.
    pub fn has_cross_attention(&self, i: usize) -> bool {
        self.cross_attention_every
            .is_some_and(|k| k > 0 && i % k == 0)
    }
}

fn d_vocab() -> usize {
    32000
}
fn d_hidden() -> usize {
    4096
}
fn d_inter() -> usize {
    11008
}
fn d_layers() -> usize {
    32
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_silu() -> String {
    "silu".into()
}

impl LlamaConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_heads(
            path,
            "text_config",
            self.num_attention_heads * self.head_dim(),
            self.num_attention_heads,
            self.num_hidden_layers,
        )?;
        let kv = self.kv_heads();
        if kv == 0 || self.num_attention_heads % kv != 0 {
            return Err(invalid(
                path,
                format!(
                    "num_key_value_heads {kv} must divide num_attention_heads {}",
                    self.num_attention_heads
                ),
            ));
        }
        if self.vocab_size == 0 {
            return Err(invalid(path, "vocab_size must be positive".into()));
        }
        if self.attention_top_k == Some(0) {
            return Err(invalid(
                path,
                "text_config.attention_top_k must be at least 1 (leave it out for dense attention)"
                    .into(),
            ));
        }
        check_block_size(
            path,
            "text_config",
            self.attention_top_k,
            self.attention_block_size,
        )?;
        if self.mlp_bias {
            return Err(invalid(path, "mlp_bias = true is not supported".into()));
        }
        if let Some(k) = self.cross_attention_every {
            let heads = self
                .cross_attention_heads
                .unwrap_or(self.num_attention_heads);
            if k == 0 || heads == 0 || self.hidden_size % heads != 0 {
                return Err(invalid(
                    path,
                    format!(
                        "text_config.cross_attention_every {k} must be at least 1, and cross_attention_heads {heads} must divide hidden_size {}",
                        self.hidden_size
                    ),
                ));
            }
        }
        if self.use_sliding_window {
            return Err(invalid(
                path,
                "use_sliding_window = true (Qwen2 sliding-window attention) is not supported"
                    .into(),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(invalid(
                path,
                format!(
                    "hidden_act `{}` is not supported (Llama-family models use `silu`)",
                    self.hidden_act
                ),
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(invalid(
                path,
                format!("head_dim {} must be even for RoPE", self.head_dim()),
            ));
        }
        match self.rope().rope_type.as_deref() {
            None | Some("default") | Some("linear") => Ok(()),
            Some(other) => Err(invalid(
                path,
                format!("rope type `{other}` is not supported (`default` and `linear` are)"),
            )),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v carry biases: always for Qwen2, on request for Llama.
    pub fn qkv_bias(&self) -> bool {
        self.model_type.as_deref() == Some("qwen2") || self.attention_bias
    }

    /// The RoPE parameters, from whichever spelling the file uses.
    pub fn rope(&self) -> RopeScaling {
        self.rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default()
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope()
            .rope_theta
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// Positions are divided by this (`linear` scaling), 1 otherwise.
    pub fn rope_linear_factor(&self) -> f64 {
        let r = self.rope();
        match r.rope_type.as_deref() {
            Some("linear") => r.factor.unwrap_or(1.0),
            _ => 1.0,
        }
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }
}

/// How vision features are mapped into the LM's embedding space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectorKind {
    /// Identity: only when the vision and LM widths match.
    None,
    /// One linear layer.
    Linear,
    /// LLaVA-1.5 `mlp2x_gelu`: linear, GELU, linear.
    Mlp,
    /// Linear to the LM width, then a residual bottleneck MLP.
    Adapter,
}

impl ProjectorKind {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" | "identity" => Ok(Self::None),
            "linear" => Ok(Self::Linear),
            "mlp" | "mlp2x_gelu" => Ok(Self::Mlp),
            "adapter" => Ok(Self::Adapter),
            other => Err(format!(
                "unknown projector type `{other}` (expected none, linear, mlp / mlp2x_gelu or adapter)"
            )),
        }
    }
}

/// HF `LlavaConfig`, plus our `projector_type` (HF's LLaVA is always `mlp`).
#[derive(Debug, Clone, Deserialize)]
pub struct LlavaConfig {
    pub vision_config: ClipVisionConfig,
    pub text_config: LlamaConfig,
    #[serde(alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "default_layer")]
    pub vision_feature_layer: i64,
    #[serde(default = "default_strategy")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "default_gelu")]
    pub projector_hidden_act: String,
    #[serde(default = "default_true")]
    pub multimodal_projector_bias: bool,
    #[serde(default = "default_projector")]
    pub projector_type: String,
    /// Bottleneck width of the `adapter` projector.
    #[serde(default)]
    pub adapter_dim: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Not in HF's config: the image tokens pass a gated cross-attention
    /// block that attends to the prompt's text (image→text) with this many
    /// heads before they enter the decoder, so that what they carry depends
    /// on the question. Absent: plain prefix tokens.
    #[serde(default)]
    pub image_text_attention_heads: Option<usize>,
    /// Not in HF's config: the projected image tokens pass this many gated
    /// self-attention blocks (`image_self_attention.{i}`, the decoder's
    /// heads, every token attending to every other of its image, tanh
    /// gates starting at 0) before they enter the decoder. A token can
    /// then carry what it holds relative to the others (e.g. its nearest
    /// object's shape) before any question reads it. 0: none.
    #[serde(default)]
    pub image_self_attention_layers: usize,
    /// Not in HF's config, with `image_self_attention_layers` and
    /// `vision_config.token_coords`: each block's heads also score keys by
    /// how far they sit from the query (`|p_i − p_j|²` times a learned
    /// slope per head, `image_self_attention.{i}.distance_slope`, this its
    /// start; half the heads prefer near tokens, half far ones), and a
    /// token does not attend to itself. Absent: no such bias.
    #[serde(default)]
    pub image_self_attention_distance_slope: Option<f64>,
    /// Not in HF's config: a learned router (`router.*`) sends each prompt
    /// down a light path, decoding with only this many decoder layers
    /// (early exit), or the full one. Absent: always the full path.
    #[serde(default)]
    pub router_light_layers: Option<usize>,
    /// Not in HF's config: the router's light path sees the image at this
    /// side (the preprocessed pixels average-pooled by `image_size / this`),
    /// its tokens spread over the full path's grid, so the prompt is the
    /// same on both paths. The router then reads the question alone and
    /// chooses before the vision tower runs. Absent: the full image on
    /// both paths.
    #[serde(default)]
    pub router_light_image_size: Option<usize>,
    /// Not in HF's config: the router's light path leaves the EfficientNet
    /// after this stage (1-based; the later stages and the head do not
    /// run), its map average-pooled onto the head's grid and projected by a
    /// projector of its own (`light_projector.*`). The router then reads
    /// the question alone and chooses before the tower runs.
    #[serde(default)]
    pub router_light_tower_stage: Option<usize>,
    /// The router's probability of needing the full path at or above
    /// which a prompt takes it.
    #[serde(default = "default_half")]
    pub router_threshold: f64,
    /// Not in HF's config: all the tokens of one image take one rotary
    /// position (that of its first token), and the text after it continues
    /// from the next. A text token then attends to every image token at
    /// the same distance, so matching a word against the image's tokens
    /// does not depend on where in the grid a token sits; where it sits
    /// must come from the features (e.g. `vision_config.token_coords`).
    /// Absent or false: one position per token, as in HF's LLaVA.
    #[serde(default)]
    pub image_tokens_share_position: bool,
}

fn default_half() -> f64 {
    0.5
}

/// The most `image_self_attention_layers` a config may ask for.
pub const MAX_IMAGE_SELF_ATTENTION_LAYERS: usize = 16;

fn default_layer() -> i64 {
    -2
}
fn default_strategy() -> String {
    "default".into()
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}
fn default_projector() -> String {
    "mlp".into()
}

impl LlavaConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        self.text_config.validate(path)?;
        if let Some(h) = self.image_text_attention_heads {
            let width = self.text_config.hidden_size;
            if h == 0 || width % h != 0 {
                return Err(invalid(
                    path,
                    format!("image_text_attention_heads {h} must be at least 1 and divide the decoder width {width}"),
                ));
            }
        }
        if self.image_self_attention_layers > MAX_IMAGE_SELF_ATTENTION_LAYERS {
            return Err(invalid(
                path,
                format!(
                    "image_self_attention_layers {} is more than {MAX_IMAGE_SELF_ATTENTION_LAYERS}; use fewer blocks",
                    self.image_self_attention_layers
                ),
            ));
        }
        if let Some(s) = self.image_self_attention_distance_slope {
            if !s.is_finite() {
                return Err(invalid(
                    path,
                    format!("image_self_attention_distance_slope {s} must be a finite number"),
                ));
            }
            if self.image_self_attention_layers == 0 || !self.vision_config.token_coords {
                return Err(invalid(
                    path,
                    "image_self_attention_distance_slope biases the image self-attention blocks by the tokens' (x, y): it needs image_self_attention_layers ≥ 1 and vision_config.token_coords".into(),
                ));
            }
        }
        if let Some(l) = self.router_light_layers {
            let n = self.text_config.num_hidden_layers;
            if l == 0 || l >= n {
                return Err(invalid(
                    path,
                    format!("router_light_layers {l} must be at least 1 and fewer than the decoder's {n} layers"),
                ));
            }
        }
        if let Some(l) = self.router_light_image_size {
            let v = &self.vision_config;
            let n = v.image_size;
            if !(v.is_efficientnet() || v.is_conv()) {
                return Err(invalid(
                    path,
                    "router_light_image_size needs a convolutional tower (EfficientNet or the CNN): a ViT's position embeddings fix its image size".into(),
                ));
            }
            let step = if v.is_efficientnet() {
                32
            } else {
                1 << v.conv().layers.min(8)
            };
            if l == 0 || l >= n || n % l != 0 || l % step != 0 {
                return Err(invalid(
                    path,
                    format!("router_light_image_size {l} must be smaller than image_size {n}, divide it and be a multiple of {step} (the tower's stride)"),
                ));
            }
        }
        if (self.vision_config.feature_stage.is_some()
            || self.vision_config.token_coords
            || self.vision_config.low_level_stage.is_some())
            && (self.router_light_tower_stage.is_some() || self.router_light_image_size.is_some())
        {
            return Err(invalid(
                path,
                "vision_config.feature_stage, token_coords or low_level_stage with a router's light image path (router_light_tower_stage, router_light_image_size): the light paths assume the head's tokens; drop one".into(),
            ));
        }
        if let Some(k) = self.router_light_tower_stage {
            let stages = crate::vision::efficientnet::EfficientNetConfig::lite0()
                .stages
                .len();
            if !self.vision_config.is_efficientnet() || k == 0 || k > stages {
                return Err(invalid(
                    path,
                    format!("router_light_tower_stage {k} must name one of the EfficientNet tower's stages 1..={stages}"),
                ));
            }
            if self.router_light_image_size.is_some() {
                return Err(invalid(
                    path,
                    "router_light_tower_stage and router_light_image_size are two light paths; keep one".into(),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.router_threshold) {
            return Err(invalid(
                path,
                format!(
                    "router_threshold {} must be in [0, 1]",
                    self.router_threshold
                ),
            ));
        }
        let v = &self.vision_config;
        v.validate(path)?;
        let layers = v.num_hidden_layers as i64;
        if !v.is_efficientnet()
            && !v.is_conv()
            && (self.vision_feature_layer < -(layers + 1) || self.vision_feature_layer > layers)
        {
            return Err(invalid(
                path,
                format!(
                    "vision_feature_layer {} is outside the vision tower's {} hidden states",
                    self.vision_feature_layer,
                    layers + 1
                ),
            ));
        }
        if !matches!(
            self.vision_feature_select_strategy.as_str(),
            "default" | "full"
        ) {
            return Err(invalid(
                path,
                format!(
                    "vision_feature_select_strategy `{}` is not supported (`default` or `full`)",
                    self.vision_feature_select_strategy
                ),
            ));
        }
        if self.projector_hidden_act != "gelu" {
            return Err(invalid(
                path,
                format!(
                    "projector_hidden_act `{}` is not supported (`gelu`)",
                    self.projector_hidden_act
                ),
            ));
        }
        let kind = self.projector().map_err(|m| invalid(path, m))?;
        if kind == ProjectorKind::None && v.projector_input_width() != self.text_config.hidden_size
        {
            return Err(invalid(
                path,
                format!(
                    "projector `none` needs equal widths, but the vision tower has {} and the LM {}; use linear, mlp or adapter",
                    v.projector_input_width(), self.text_config.hidden_size
                ),
            ));
        }
        Ok(())
    }

    pub fn projector(&self) -> std::result::Result<ProjectorKind, String> {
        ProjectorKind::parse(&self.projector_type)
    }

    /// Whether the model has a router (a light path of fewer decoder
    /// layers, a smaller image or an early exit from the tower, or fewer
    /// layers with one of the two).
    pub fn has_router(&self) -> bool {
        self.router_light_layers.is_some()
            || self.router_light_image_size.is_some()
            || self.router_light_tower_stage.is_some()
    }

    /// Whether the router chooses before the vision tower runs (its light
    /// path sees a smaller image, or leaves the tower early), reading the
    /// question alone.
    pub fn routes_before_tower(&self) -> bool {
        self.router_light_image_size.is_some() || self.router_light_tower_stage.is_some()
    }

    /// Image tokens per image: patches, plus the class token with `full`
    /// (EfficientNet: the cells of its stride-32 head map, or of the map
    /// after `feature_stage`; the `cnn` encoder: the cells of its last map).
    pub fn image_tokens(&self) -> usize {
        if self.vision_config.is_efficientnet() {
            let stride = self.vision_config.feature_stage.map_or(32, |k| {
                crate::vision::efficientnet::EfficientNetConfig::lite0().stride_after(k)
            });
            let g = self.vision_config.image_size / stride;
            return g * g;
        }
        if self.vision_config.is_conv() {
            return self.vision_config.conv().tokens();
        }
        let g = self.vision_config.image_size / self.vision_config.patch_size;
        g * g + usize::from(self.vision_feature_select_strategy == "full")
    }
}
