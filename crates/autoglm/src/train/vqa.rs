//! Training a VLM for visual question answering: a byte-level BPE
//! tokenizer trained on the questions, a vision tower (a CLIP-layout ViT
//! trained from scratch, or the pretrained EfficientNet-Lite0 kept frozen),
//! a projector and a Llama-layout decoder, trained to produce the answer
//! after a chat-template prompt. The output directory is a HF LLaVA-layout
//! model that `ask` and `eval` load.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::images::{ImageCache, LIGHT};
use super::{Metrics, TrainConfig, Trainer};
use crate::config::LlavaConfig;
use crate::data::loader::epoch_order;
use crate::data::{easy_vqa, jsonl, VqaExample};
use crate::fusion::router::{routed_loss, RouteCost};
use crate::io::preprocess::{CropRounding, Preprocess, Resample};
use crate::io::weights::Safetensors;
use crate::text::chat::ChatTemplate;
use crate::text::llama::{rotary_positions, Positions};
use crate::text::tokenizer::Tokenizer;
use crate::vision::efficientnet::{EfficientNet, EfficientNetConfig};
use crate::vlm::{Llava, VisionTower};
use crate::{Error, Result};

pub use super::eval::{answer_kind, evaluate, Confusion, EvalReport};

/// Where the examples come from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DataSource {
    /// The installed easy-VQA package (`scripts/fetch-assets.sh`).
    EasyVqa,
    /// JSON-lines files of `{"image", "question", "answer"}`.
    Jsonl {
        train: std::path::PathBuf,
        test: std::path::PathBuf,
    },
}

/// Everything a run needs; saved next to the model and every checkpoint.
/// An unknown field is an error (a misspelt option would otherwise be
/// silently ignored).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqaTrainConfig {
    pub data: DataSource,
    /// `vit`: a CLIP-layout ViT trained from scratch; `efficientnet-lite0`:
    /// the pretrained EfficientNet-Lite0 (from the assets), kept frozen;
    /// `cnn`: a small convolutional encoder trained from scratch
    /// (`vision_hidden` channels, `vision_layers` stride-2 convolutions,
    /// one token per cell of the last map, with its coordinates).
    #[serde(default = "vit")]
    pub vision: String,
    /// Train without images (the prompt has no image): what the questions
    /// alone give.
    #[serde(default)]
    pub blind: bool,
    /// Use at most this many training examples (0 = all).
    #[serde(default)]
    pub max_train_examples: usize,
    pub image_size: usize,
    #[serde(default)]
    pub patch_size: usize,
    #[serde(default)]
    pub vision_hidden: usize,
    #[serde(default)]
    pub vision_layers: usize,
    #[serde(default)]
    pub vision_heads: usize,
    pub projector: String,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub text_kv_heads: usize,
    /// The byte-level BPE tokenizer's size, trained on the questions and
    /// answers: at least the 256 bytes and 6 special tokens it starts from
    /// (262: one token per byte, no merges); every id past them is a
    /// merge, so frequent words become single tokens. Training stops
    /// early when no pair is left to merge.
    pub vocab_size: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub clip_norm: f64,
    pub seed: u64,
    #[serde(default)]
    pub eval_every: usize,
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Random horizontal flips of the training images (every easy-VQA
    /// answer stays true; triangles point up, so no vertical flips).
    #[serde(default = "yes")]
    pub augment: bool,
    /// Repeat the rarer answers of every distinct question until each of its
    /// answers is as frequent as its most frequent one: a question then
    /// tells nothing about its answer by itself (easy-VQA's "is there a red
    /// shape?" is "no" 88 % of the time), and a model that stops at that
    /// prior gains nothing.
    #[serde(default)]
    pub balance_answers: bool,
    /// The prompt puts the question before the image (the model's chat
    /// template says so, and `ask` follows it), so that the decoder reads
    /// the image knowing the question.
    #[serde(default)]
    pub image_after_question: bool,
    /// Steps at the start that train on open questions only (answers other
    /// than yes/no): a model that first learns to look at the image does
    /// not settle on what the question alone predicts.
    #[serde(default)]
    pub open_first_steps: usize,
    /// Stages at the start of training, in order, each of which draws only
    /// the questions of the types it lists (the data's `type`, as
    /// Sort-of-CLEVR's `shape`, `horizontal`, `vertical`, `closest`,
    /// `furthest`, `count`); the steps after the last stage draw every
    /// question. A lookup that a few types teach quickly ("what shape is
    /// the red object?") is then learned before the answers that need no
    /// lookup (counts, the scene's majority shape) lower the loss without
    /// it. The tokenizer reads every question, and the learning-rate
    /// schedule runs over all `steps`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curriculum: Vec<CurriculumStage>,
    /// Threads that each compute part of every batch (data parallelism);
    /// `batch_size` must divide evenly. On a small model this beats
    /// splitting each operation over threads.
    #[serde(default = "one")]
    pub workers: usize,
    /// Questions of one image trained together: each step draws
    /// `batch_size / questions_per_image` images and that many of each
    /// one's questions, and the decoder reads each image's prompt prefix
    /// (the template and the image tokens) once, the questions continuing
    /// from its cache ([`shared_image_answer_logits`]). The loss is the one
    /// the questions would give one by one; a step costs less where the
    /// image tokens outnumber the question's. Needs the image before the
    /// question (`image_after_question` false) and no router or
    /// image→text attention, whose image tokens depend on the question.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub questions_per_image: usize,
    /// Standard deviation of the initial weights.
    /// Standard deviation of the initial weights; absent: 1/√fan-in per
    /// tensor. HF's fixed 0.02 suits 4,096-wide models; at width 128 it
    /// leaves attention uniform for hundreds of steps (measured: a 3-layer
    /// decoder stays at the question-only prior on easy-VQA's yes/no
    /// questions, here and in PyTorch, while 1/√fan-in learns them).
    #[serde(default)]
    pub init_std: Option<f64>,
    /// Training images whose questions are kept out of training to measure
    /// accuracy at each evaluation (teacher-forced exact match).
    #[serde(default = "held_out")]
    pub held_out_images: usize,
    /// Start from a model saved by an earlier run (its directory): its
    /// tokenizer and weights, instead of a new tokenizer and random
    /// weights. The model this config builds must be the same shape as
    /// that one's `config.json`. For fine-tuning on new data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<std::path::PathBuf>,
    /// Heads of an image→text gated cross-attention block on the image
    /// tokens before the decoder (question-conditioned image tokens).
    /// Absent: plain prefix tokens (LLaVA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_text_attention_heads: Option<usize>,
    /// Gated self-attention blocks over each image's projected tokens
    /// before the decoder (`image_self_attention_layers` in the model's
    /// config.json), the decoder's heads each. They start as the identity,
    /// so they may be added to a model given by `init_from`. 0: none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub image_self_attention_layers: usize,
    /// With `image_self_attention_layers` and `vision_token_coords`: the
    /// blocks' heads also score keys by squared distance from the query,
    /// times a learned slope per head starting here (half the heads
    /// prefer near tokens, half far), and no token attends to itself
    /// (`image_self_attention_distance_slope` in the model's config.json).
    /// Absent: no such bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_self_attention_distance_slope: Option<f64>,
    /// Top-k sparse attention in the decoder and in a ViT tower: each query
    /// attends to its `k` highest-scoring keys. Absent: dense. Recorded in
    /// the model's `config.json` (`attention_top_k` of each tower).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_top_k: Option<usize>,
    /// With `attention_top_k`: keep the keys in whole blocks of this many
    /// (block top-k; only the kept blocks are computed). Recorded as
    /// `attention_block_size` of each tower.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_block_size: Option<usize>,
    /// `cnn` only: how its last two stages combine into the image tokens
    /// (`add`, `attention`, `gate`); absent: the last stage alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_fusion: Option<crate::fusion::gating::FusionKind>,
    /// `cnn` only: a feature pyramid with channel and spatial attention over
    /// its last two stages (the levels are added unless `feature_fusion`
    /// says otherwise).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fpn: bool,
    /// A learned router picks, per prompt, a light path (decoding with only
    /// this many decoder layers) or the full one. Both paths are trained on
    /// every batch; the router learns from their detached per-example
    /// losses plus `router_cost_weight` × each path's share of the decoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_light_layers: Option<usize>,
    /// The router's light path sees the image at this side (average-pooled
    /// pixels; a convolutional tower only), and the router chooses from
    /// the question alone, before the tower runs. With
    /// `router_light_layers` too, the light path is both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_light_image_size: Option<usize>,
    /// The router's light path leaves the frozen EfficientNet after this
    /// stage (1-based, of 7), its map pooled onto the head's grid and
    /// projected by a projector of its own; the router chooses from the
    /// question alone, before the tower runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_light_tower_stage: Option<usize>,
    /// `efficientnet-lite0` only: the image tokens are the cells of this
    /// stage's map (1-based, of 7; a finer grid, fewer channels) instead
    /// of the head's, and the later stages do not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_feature_stage: Option<usize>,
    /// `efficientnet-lite0` only: each image token carries its cell's
    /// centre (x, y) after its channels, as the `cnn` tower's do.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vision_token_coords: bool,
    /// With `vision_token_coords`: the projector also reads each token's
    /// channels times its x and times its y
    /// (`vision_config.token_coord_products`), so that a mean over the
    /// tokens says where things are. Measured on Sort-of-CLEVR's left/right
    /// questions in docs/benchmarks.md ("Left/right: a saddle").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vision_token_coord_products: bool,
    /// With `vision_token_coord_products`: the products reach the tokens
    /// through their own linear map, zero at the start and added to the
    /// projector's output (`vision_config.token_coord_products_linear`),
    /// instead of through the projector: the model starts as one without
    /// them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vision_token_coord_products_linear: bool,
    /// With `vision_token_coords`: this many frequencies of each token's
    /// (x, y), sin and cos at π/2, π, 2π, … (`vision_config.token_coord_fourier`),
    /// so that one attention score can say how near two tokens are. They
    /// go where the products go (through their linear map with
    /// `vision_token_coord_products_linear`). Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_token_coord_fourier: Option<usize>,
    /// All of an image's tokens take one rotary position in the decoder
    /// (`image_tokens_share_position` in the model's config.json): a
    /// word is matched against every image token at the same distance.
    /// Where a token sits then reaches the decoder only through its
    /// features (`vision_token_coords`, or the `cnn` tower's coordinates).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub image_tokens_share_position: bool,
    /// `efficientnet-lite0` only: each image token also carries this
    /// earlier stage's map (1-based), average-pooled onto the tokens' grid:
    /// low-level features (colour, edges) beside the high-level ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_low_level_stage: Option<usize>,
    /// A diagnostic for Sort-of-CLEVR: the frozen tower's tokens are
    /// replaced by the ground truth of this `scenes.jsonl` (each cell's
    /// one-hot colour and shape; see `ImageCache::use_scene_oracle`),
    /// so a run measures what the decoder learns from perfect tokens.
    /// Needs `efficientnet-lite0` with `vision_token_coords`, and no
    /// augmentation or router. The saved model reads the tower's features,
    /// not these: evaluate it with the run's held-out accuracy only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oracle_scenes: Option<std::path::PathBuf>,
    /// Sort-of-CLEVR, auxiliary supervision from this `scenes.jsonl`: a
    /// linear probe on what the image self-attention blocks add to each
    /// object's token (the cell that holds its centre) predicts the shapes
    /// of its nearest and its furthest other object, and its cross-entropy
    /// times `neighbour_probe_weight` joins the loss. The blocks read the
    /// projected tokens detached, so the probe's loss trains the blocks
    /// alone (`Llava::project_with_mix`); the probe is not saved. Needs
    /// `image_self_attention_layers` ≥ 1, `efficientnet-lite0` with
    /// `vision_token_coords`, `questions_per_image` > 1 and no augmentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbour_probe: Option<std::path::PathBuf>,
    /// The probe's loss weight, with `neighbour_probe`.
    #[serde(default = "one_f64", skip_serializing_if = "is_one_f64")]
    pub neighbour_probe_weight: f64,
    /// λ of the router's cost penalty: the full path is worth its extra
    /// cost where it lowers an example's loss by more than λ × the share
    /// of the cost it saves. The light path costs its share of the
    /// decoder's layers times its share of the tower: of the image's
    /// pixels, or of the tower's blocks and head (each 1 when that part is
    /// not made lighter).
    #[serde(default = "router_cost")]
    pub router_cost_weight: f64,
    /// A gated cross-attention block (Flamingo's, tanh gates at 0) before
    /// every `k`-th decoder layer, attending to the projected image tokens,
    /// in addition to the prefix tokens. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_cross_attention_every: Option<usize>,
    /// Initial value of every tanh gate of the gated cross-attention
    /// blocks (0: each block starts as the identity, as Flamingo keeps a
    /// pretrained decoder intact). At 0 nothing but the gate itself gets a
    /// gradient at first; a model trained from scratch may start them open.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gate_init: f64,
}

/// One stage of [`VqaTrainConfig::curriculum`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurriculumStage {
    /// How many steps the stage lasts.
    pub steps: usize,
    /// The question types it trains on.
    pub types: Vec<String>,
}

fn is_zero<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

fn one_f64() -> f64 {
    1.0
}

fn is_one_f64(x: &f64) -> bool {
    *x == 1.0
}

fn is_one(x: &usize) -> bool {
    *x == 1
}

fn router_cost() -> f64 {
    0.3
}

impl VqaTrainConfig {
    /// Whether the model this config builds has a router
    /// (`LlavaConfig::has_router`).
    fn has_router(&self) -> bool {
        self.router_light_layers.is_some()
            || self.router_light_image_size.is_some()
            || self.router_light_tower_stage.is_some()
    }

    /// Whether its router chooses before the vision tower runs: a light
    /// path of a smaller image or an early exit
    /// (`LlavaConfig::routes_before_tower`).
    fn routes_before_tower(&self) -> bool {
        self.router_light_image_size.is_some() || self.router_light_tower_stage.is_some()
    }

    /// Checks the choices that do not depend on the data; returns whether
    /// the vision tower is the frozen EfficientNet.
    pub fn validate(&self) -> Result<bool> {
        let bad = |field: &str, why: String| {
            Err(Error::Invalid(format!("training config: {field}: {why}")))
        };
        let (effnet, cnn) = match self.vision.as_str() {
            "vit" => (false, false),
            "efficientnet-lite0" => (true, false),
            "cnn" => (false, true),
            other => {
                return bad(
                    "vision",
                    format!("`{other}` is not known: use `vit`, `cnn` or `efficientnet-lite0`"),
                )
            }
        };
        if !cnn && (self.feature_fusion.is_some() || self.fpn) {
            let field = if self.fpn { "fpn" } else { "feature_fusion" };
            return bad(
                field,
                format!(
                    "fuses the stages of the `cnn` encoder, but vision is `{}`",
                    self.vision
                ),
            );
        }
        if cnn {
            if self.vision_hidden == 0 || self.vision_layers == 0 {
                return bad(
                    "vision_hidden/vision_layers",
                    "the `cnn` encoder needs both, positive (channels, convolutions)".into(),
                );
            }
            self.conv().check().map_err(|(field, why)| {
                let field = crate::vision::convnet::ConvNetConfig::training_field(field);
                Error::Invalid(format!("training config: {field}: {why}"))
            })?;
        }
        let bytes = 256 + SPECIAL.len();
        if self.vocab_size < bytes {
            return bad(
                "vocab_size",
                format!(
                    "{}: a byte-level tokenizer starts from 256 byte tokens and {} special ones; use {bytes} for one token per byte, or more (e.g. 512) so that frequent words become single tokens",
                    self.vocab_size,
                    SPECIAL.len()
                ),
            );
        }
        if self.steps == 0 || self.batch_size == 0 {
            return bad("steps/batch_size", "must be positive".into());
        }
        let mut staged = 0;
        for (i, stage) in self.curriculum.iter().enumerate() {
            let why = if stage.steps == 0 {
                Some("steps must be positive".to_string())
            } else if stage.types.is_empty() || stage.types.iter().any(|t| t.trim().is_empty()) {
                Some("types must name question types (the data's `type`, e.g. `shape`)".into())
            } else {
                None
            };
            if let Some(why) = why {
                return bad("curriculum", format!("stage {}: {why}", i + 1));
            }
            staged += stage.steps;
        }
        if !self.curriculum.is_empty() {
            if staged >= self.steps {
                return bad(
                    "curriculum",
                    format!(
                        "its stages last {staged} steps, not fewer than steps {}: leave steps after the last stage, which trains every question type",
                        self.steps
                    ),
                );
            }
            if self.open_first_steps > 0 {
                return bad(
                    "curriculum",
                    "open_first_steps also chooses what the first steps train; drop one of the two"
                        .into(),
                );
            }
        }
        if self.questions_per_image != 1 {
            let q = self.questions_per_image;
            let why = if q == 0 || self.batch_size % (q * self.workers.max(1)) != 0 {
                Some(format!(
                    "{q} must be positive and divide batch_size {} into equal parts for each of the {} workers",
                    self.batch_size, self.workers
                ))
            } else if self.image_after_question {
                Some("the questions share the image's prefix, so the image must come first: set image_after_question false".into())
            } else if self.blind {
                Some("a blind model has no image to share".into())
            } else if self.image_text_attention_heads.is_some() {
                Some("image→text attention makes the image tokens depend on the question; drop one of the two".into())
            } else if self.has_router() {
                Some("a router chooses each question's path; drop one of the two".into())
            } else if self.open_first_steps > 0 {
                Some("open_first_steps draws single questions; drop one of the two".into())
            } else {
                None
            };
            if let Some(why) = why {
                return bad("questions_per_image", why);
            }
        }
        if let Some(h) = self.image_text_attention_heads {
            if h == 0 || self.text_hidden % h != 0 {
                return bad(
                    "image_text_attention_heads",
                    format!(
                        "{h} must be at least 1 and divide text_hidden {}",
                        self.text_hidden
                    ),
                );
            }
            if self.blind {
                return bad(
                    "image_text_attention_heads",
                    "a blind model has no image tokens to attend from; drop one of the two".into(),
                );
            }
        }
        if self.image_self_attention_layers > 0 {
            let max = crate::config::MAX_IMAGE_SELF_ATTENTION_LAYERS;
            if self.image_self_attention_layers > max {
                return bad(
                    "image_self_attention_layers",
                    format!(
                        "{} is more than {max}; use fewer blocks",
                        self.image_self_attention_layers
                    ),
                );
            }
            if self.blind {
                return bad(
                    "image_self_attention_layers",
                    "a blind model has no image tokens to attend between; drop one of the two"
                        .into(),
                );
            }
        }
        if let Some(s) = self.image_self_attention_distance_slope {
            if !s.is_finite() {
                return bad(
                    "image_self_attention_distance_slope",
                    format!("{s} must be a finite number"),
                );
            }
            if self.image_self_attention_layers == 0 || !self.vision_token_coords {
                return bad(
                    "image_self_attention_distance_slope",
                    "it biases the image self-attention blocks by the tokens' (x, y): set image_self_attention_layers ≥ 1 and vision_token_coords, or drop it".into(),
                );
            }
        }
        if let Some(l) = self.router_light_layers {
            if l == 0 || l >= self.text_layers {
                return bad(
                    "router_light_layers",
                    format!(
                        "{l}: the light path needs at least 1 and fewer than text_layers {} decoder layers",
                        self.text_layers
                    ),
                );
            }
        }
        if let Some(l) = self.router_light_image_size {
            if !(effnet || cnn) {
                return bad(
                    "router_light_image_size",
                    "needs a convolutional tower (`efficientnet-lite0` or `cnn`): a ViT's position embeddings fix its image size".into(),
                );
            }
            let n = self.image_size;
            // The towers' token grids: image_size / 32 (EfficientNet), or
            // / 2^vision_layers (the CNN's stride-2 convolutions).
            let step = if effnet {
                32
            } else {
                1 << self.vision_layers.min(8)
            };
            if l == 0 || l >= n || n % l != 0 || l % step != 0 {
                return bad(
                    "router_light_image_size",
                    format!(
                        "{l} must be smaller than image_size {n}, divide it and be a multiple of {step} (the tower's stride)"
                    ),
                );
            }
            if self.blind {
                return bad(
                    "router_light_image_size",
                    "a blind model sees no image; drop one of the two".into(),
                );
            }
        }
        if let Some(k) = self.vision_feature_stage {
            let stages = EfficientNetConfig::lite0().stages.len();
            if !effnet || k == 0 || k > stages {
                return bad(
                    "vision_feature_stage",
                    format!("{k}: needs `efficientnet-lite0` and one of its stages 1..={stages}"),
                );
            }
            if self.routes_before_tower() {
                return bad(
                    "vision_feature_stage",
                    "the router's light image paths assume the head's tokens; drop one of the two"
                        .into(),
                );
            }
        }
        if let Some(j) = self.vision_low_level_stage {
            let last = self
                .vision_feature_stage
                .unwrap_or(EfficientNetConfig::lite0().stages.len() + 1);
            if !effnet || j == 0 || j >= last {
                return bad(
                    "vision_low_level_stage",
                    format!("{j}: needs `efficientnet-lite0` and a stage before the tokens' own (1..{last})"),
                );
            }
            if self.routes_before_tower() {
                return bad(
                    "vision_low_level_stage",
                    "the router's light image paths assume the head's tokens alone; drop one of the two"
                        .into(),
                );
            }
        }
        if self.vision_token_coords {
            if !effnet {
                return bad(
                    "vision_token_coords",
                    "appends (x, y) to `efficientnet-lite0`'s tokens; the `cnn` tower's carry them already and a ViT's have position embeddings".into(),
                );
            }
            if self.routes_before_tower() {
                return bad(
                    "vision_token_coords",
                    "the router's light image paths assume the head's tokens without coordinates; drop one of the two"
                        .into(),
                );
            }
        }
        if self.vision_token_coord_products && !self.vision_token_coords {
            return bad(
                "vision_token_coord_products",
                "multiplies the channels by the (x, y) that vision_token_coords appends; set vision_token_coords too or drop it".into(),
            );
        }
        if let Some(n) = self.vision_token_coord_fourier {
            let max = crate::config::MAX_COORD_FOURIER;
            if n == 0 || n > max || !self.vision_token_coords {
                return bad(
                    "vision_token_coord_fourier",
                    format!("{n}: takes 1 to {max} frequencies of the (x, y) that vision_token_coords appends (set vision_token_coords too); leave it out for none"),
                );
            }
        }
        if self.vision_token_coord_products_linear && !self.vision_token_coord_products {
            return bad(
                "vision_token_coord_products_linear",
                "chooses how the products of vision_token_coord_products reach the tokens; set vision_token_coord_products too or drop it".into(),
            );
        }
        if self.oracle_scenes.is_some() {
            let why = if !effnet || !self.vision_token_coords {
                Some("replaces `efficientnet-lite0`'s tokens and keeps their (x, y): needs that tower and vision_token_coords")
            } else if self.augment {
                Some("a flipped image has no scene: set augment false")
            } else if self.has_router() {
                Some("the router's light paths have no scene tokens; drop one of the two")
            } else {
                None
            };
            if let Some(why) = why {
                return bad("oracle_scenes", why.into());
            }
        }
        if self.neighbour_probe.is_some() {
            let why = if self.image_self_attention_layers == 0 {
                Some("probes what the image self-attention blocks add: set image_self_attention_layers ≥ 1")
            } else if !effnet || !self.vision_token_coords {
                Some("reads the objects' cells on the token grid: needs `efficientnet-lite0` and vision_token_coords")
            } else if self.questions_per_image < 2 {
                Some("runs with an image's questions trained together: set questions_per_image ≥ 2")
            } else if self.augment {
                Some("a flipped image's objects are elsewhere: set augment false")
            } else if self.has_router() {
                Some("the router's light paths are not probed; drop one of the two")
            } else {
                None
            };
            if let Some(why) = why {
                return bad("neighbour_probe", why.into());
            }
        }
        if !(self.neighbour_probe_weight.is_finite() && self.neighbour_probe_weight >= 0.0) {
            return bad(
                "neighbour_probe_weight",
                format!(
                    "{} must be a finite number ≥ 0",
                    self.neighbour_probe_weight
                ),
            );
        }
        if let Some(k) = self.router_light_tower_stage {
            let stages = EfficientNetConfig::lite0().stages.len();
            if !effnet || k == 0 || k > stages {
                return bad(
                    "router_light_tower_stage",
                    format!("{k}: needs `efficientnet-lite0` and one of its stages 1..={stages}"),
                );
            }
            if self.router_light_image_size.is_some() {
                return bad(
                    "router_light_tower_stage",
                    "and router_light_image_size are two light paths; keep one".into(),
                );
            }
            if self.blind {
                return bad(
                    "router_light_tower_stage",
                    "a blind model sees no image; drop one of the two".into(),
                );
            }
        }
        if !(self.router_cost_weight >= 0.0 && self.router_cost_weight.is_finite()) {
            return bad(
                "router_cost_weight",
                format!("{} must be a finite λ ≥ 0", self.router_cost_weight),
            );
        }
        if let Some(k) = self.decoder_cross_attention_every {
            if k == 0 || k > self.text_layers {
                return bad(
                    "decoder_cross_attention_every",
                    format!(
                        "{k}: use 1 to text_layers {} (a block before every k-th layer)",
                        self.text_layers
                    ),
                );
            }
            if self.blind {
                return bad(
                    "decoder_cross_attention_every",
                    "a blind model has no image to attend to; drop one of the two".into(),
                );
            }
        }
        if !self.gate_init.is_finite() {
            return bad("gate_init", format!("{} is not a number", self.gate_init));
        }
        if self.attention_top_k == Some(0) {
            return bad(
                "attention_top_k",
                "must be at least 1 (leave it out for dense attention)".into(),
            );
        }
        if let Some(why) =
            crate::config::block_size_error(self.attention_top_k, self.attention_block_size)
        {
            return bad("attention_block_size", why.into());
        }
        if self.workers == 0 || self.batch_size % self.workers != 0 {
            return bad(
                "workers",
                format!(
                    "batch_size {} must be a multiple of workers {}",
                    self.batch_size, self.workers
                ),
            );
        }
        if !effnet
            && !cnn
            && (self.patch_size == 0
                || self.vision_hidden == 0
                || self.vision_layers == 0
                || self.vision_heads == 0)
        {
            return bad(
                "patch_size/vision_hidden/vision_layers/vision_heads",
                "a ViT needs all four, positive".into(),
            );
        }
        if !effnet && !cnn && (self.image_size < self.patch_size) {
            return bad(
                "image_size",
                format!("smaller than patch_size {}", self.patch_size),
            );
        }
        // The decoder's context (256 positions) must hold the image tokens
        // and a question with its answer.
        let image_tokens = if effnet {
            let stride = self
                .vision_feature_stage
                .map_or(32, |k| EfficientNetConfig::lite0().stride_after(k));
            (self.image_size / stride).pow(2)
        } else if cnn {
            self.conv().tokens()
        } else {
            self.image_size
                .checked_div(self.patch_size)
                .map_or(0, |g| g * g + 1)
        };
        if image_tokens > CONTEXT - 64 {
            return bad(
                "image_size",
                format!(
                    "{image_tokens} image tokens leave too little of the {CONTEXT}-token context for the question; use a smaller image or larger patches"
                ),
            );
        }
        if effnet && (self.image_size == 0 || self.image_size % 32 != 0) {
            return bad(
                "image_size",
                format!(
                    "EfficientNet-Lite0 needs a positive multiple of 32, got {}",
                    self.image_size
                ),
            );
        }
        if self.projector == "none" {
            // The tokens' width as the saved model's vision config gives it.
            let vision: crate::config::ClipVisionConfig =
                serde_json::from_value(llava_config(self, 0)["vision_config"].take())
                    .map_err(|e| Error::Invalid(format!("training config: vision: {e}")))?;
            let width = vision.projector_input_width();
            if width != self.text_hidden {
                return bad(
                    "projector",
                    format!(
                        "`none` needs the vision tokens' width ({width}) to equal text_hidden {}",
                        self.text_hidden
                    ),
                );
            }
        }
        Ok(effnet)
    }

    /// The `cnn` encoder this config describes.
    fn conv(&self) -> crate::vision::convnet::ConvNetConfig {
        crate::vision::convnet::ConvNetConfig {
            fusion: self.feature_fusion,
            fpn: self.fpn,
            ..crate::vision::convnet::ConvNetConfig::plain(
                self.vision_hidden,
                self.vision_layers,
                self.image_size,
            )
        }
    }
}

/// Positions of the trained decoder.
const CONTEXT: usize = 256;

fn vit() -> String {
    "vit".into()
}

fn yes() -> bool {
    true
}

fn one() -> usize {
    1
}

fn held_out() -> usize {
    100
}

/// A resumed run must replay the same data, model and schedule shape as the
/// run that wrote the checkpoint: only the length of the run and how often
/// it evaluates and checkpoints may change. The saved config is read as
/// this version reads it, so a field added since (at its default) is no
/// change.
pub(super) fn check_resume_config<C>(saved: &Path, c: &C) -> Result<()>
where
    C: serde::Serialize + serde::de::DeserializeOwned,
{
    let old: C = crate::io::read_json(saved)?;
    let mut old = serde_json::to_value(old).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut new = serde_json::to_value(c).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut changed = Vec::new();
    if let (Some(o), Some(n)) = (old.as_object_mut(), new.as_object_mut()) {
        for free in ["steps", "eval_every", "checkpoint_every"] {
            o.remove(free);
            n.remove(free);
        }
        for (k, v) in n.iter() {
            if o.get(k) != Some(v) {
                changed.push(k.clone());
            }
        }
    }
    if changed.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "cannot resume: {} differ(s) from the run in {} (only steps, eval_every and checkpoint_every may change); start a new --out or restore the config",
            changed.join(", "),
            saved.display()
        )))
    }
}

/// Every distinct question with each of its answers equally often: the
/// examples of rarer answers repeated (a seeded choice) up to the count of
/// the question's most frequent answer. Order: the originals, then the
/// repeats.
fn balance_answers(ex: Vec<VqaExample>, seed: u64) -> Vec<VqaExample> {
    use rand::{Rng, SeedableRng};
    let mut by_q: std::collections::BTreeMap<&str, std::collections::BTreeMap<&str, Vec<usize>>> =
        Default::default();
    for (i, e) in ex.iter().enumerate() {
        by_q.entry(e.question.trim())
            .or_default()
            .entry(e.answer.trim())
            .or_default()
            .push(i);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xBA1A);
    let mut extra = Vec::new();
    for answers in by_q.values() {
        let most = answers.values().map(Vec::len).max().unwrap_or(0);
        for idx in answers.values() {
            for _ in idx.len()..most {
                extra.push(idx[rng.random_range(0..idx.len())]);
            }
        }
    }
    let mut out = ex.clone();
    out.extend(extra.into_iter().map(|i| ex[i].clone()));
    out
}

/// (held out, rest): the examples of `n` images chosen by `seed` (at most a
/// tenth of the images), and the others, each in dataset order.
pub(crate) fn split_by_image(
    ex: Vec<VqaExample>,
    n: usize,
    seed: u64,
) -> (Vec<VqaExample>, Vec<VqaExample>) {
    let mut images: Vec<&std::path::Path> = ex.iter().map(|e| e.image.as_path()).collect();
    images.sort();
    images.dedup();
    let n = n.min(images.len() / 10);
    let order = epoch_order(images.len(), seed ^ 0x5EED, 0, true);
    let held: std::collections::HashSet<std::path::PathBuf> = order[..n]
        .iter()
        .map(|&i| images[i].to_path_buf())
        .collect();
    ex.into_iter().partition(|e| held.contains(&e.image))
}

const SPECIAL: [&str; 6] = [
    "<pad>",
    "<s>",
    "</s>",
    "<image>",
    "<|im_start|>",
    "<|im_end|>",
];
/// The chat template: parts in the order given (images first, as LLaVA).
const TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
/// The same, but a turn's text before its images: the decoder then runs the
/// image tokens after the question, so they can attend to it.
const TEMPLATE_TEXT_FIRST: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + '\\n' }}{% endif %}{% endfor %}{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The examples of one split; an error, naming the source and its bad rows,
/// when none of its rows can be used (a run or an evaluation over nothing
/// would report a meaningless 0 %).
pub fn load_data(src: &DataSource, split: &str) -> Result<Vec<VqaExample>> {
    let (ex, report, from, fix) = match src {
        DataSource::EasyVqa => {
            let (ex, r) = easy_vqa::load(&crate::io::assets::dir("easy-vqa")?, split)?;
            let fix = "fetch it again with scripts/fetch-assets.sh";
            (ex, r, format!("easy-VQA's {split} split"), fix)
        }
        DataSource::Jsonl { train, test } => {
            let path = if split == "train" { train } else { test };
            let (ex, r) = jsonl::load(path, false)?;
            let fix = if r.rows == 0 {
                "write one JSON object per line ({\"image\", \"question\", \"answer\"}) or point at another file"
            } else {
                "fix the rows named (an image path is relative to the file's folder) or point at another file"
            };
            (ex, r, path.display().to_string(), fix)
        }
    };
    if report.rows == 0 {
        return Err(Error::Invalid(format!("{from}: no rows; {fix}")));
    }
    if ex.is_empty() {
        return Err(Error::Invalid(format!(
            "{from}: no usable examples ({}); {fix}",
            report.summary()
        )));
    }
    if !report.bad.is_empty() {
        tracing::warn!("{split}: {}", report.summary());
    }
    Ok(ex)
}

fn llava_config(c: &VqaTrainConfig, vocab: usize) -> serde_json::Value {
    let vision = if c.vision == "efficientnet-lite0" {
        let mut v = serde_json::json!({"model_type": crate::config::EFFICIENTNET_LITE0,
            "hidden_size": 1280, "image_size": c.image_size});
        if let Some(k) = c.vision_feature_stage {
            v["feature_stage"] = k.into();
        }
        if c.vision_token_coords {
            v["token_coords"] = true.into();
        }
        if c.vision_token_coord_products {
            v["token_coord_products"] = true.into();
        }
        if c.vision_token_coord_products_linear {
            v["token_coord_products_linear"] = true.into();
        }
        if let Some(n) = c.vision_token_coord_fourier {
            v["token_coord_fourier"] = n.into();
        }
        if let Some(j) = c.vision_low_level_stage {
            v["low_level_stage"] = j.into();
        }
        v
    } else if c.vision == "cnn" {
        let mut v = serde_json::json!({"model_type": crate::config::CONV_VISION,
            "hidden_size": c.vision_hidden, "num_hidden_layers": c.vision_layers,
            "image_size": c.image_size});
        if let Some(f) = c.feature_fusion {
            v["feature_fusion"] = serde_json::to_value(f).unwrap_or_default();
        }
        if c.fpn {
            v["fpn"] = true.into();
        }
        v
    } else {
        serde_json::json!({"model_type": "clip_vision_model", "hidden_size": c.vision_hidden,
            "intermediate_size": 4 * c.vision_hidden, "num_hidden_layers": c.vision_layers,
            "num_attention_heads": c.vision_heads, "image_size": c.image_size, "patch_size": c.patch_size,
            "hidden_act": "gelu"})
    };
    let mut cfg = serde_json::json!({
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": 3, "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu", "projector_type": c.projector, "tie_word_embeddings": true,
        "vision_config": vision,
        "text_config": {"model_type": "llama", "vocab_size": vocab, "hidden_size": c.text_hidden,
            "intermediate_size": 4 * c.text_hidden, "num_hidden_layers": c.text_layers,
            "num_attention_heads": c.text_heads, "num_key_value_heads": c.text_kv_heads,
            "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 5, "pad_token_id": 0}
    });
    if let Some(h) = c.image_text_attention_heads {
        cfg["image_text_attention_heads"] = h.into();
    }
    if c.image_self_attention_layers > 0 {
        cfg["image_self_attention_layers"] = c.image_self_attention_layers.into();
    }
    if let Some(s) = c.image_self_attention_distance_slope {
        cfg["image_self_attention_distance_slope"] = s.into();
    }
    if c.image_tokens_share_position {
        cfg["image_tokens_share_position"] = true.into();
    }
    if let Some(l) = c.router_light_layers {
        cfg["router_light_layers"] = l.into();
    }
    if let Some(l) = c.router_light_image_size {
        cfg["router_light_image_size"] = l.into();
    }
    if let Some(k) = c.router_light_tower_stage {
        cfg["router_light_tower_stage"] = k.into();
    }
    if let Some(k) = c.decoder_cross_attention_every {
        cfg["text_config"]["cross_attention_every"] = k.into();
    }
    if let Some(k) = c.attention_top_k {
        cfg["text_config"]["attention_top_k"] = k.into();
        if c.vision == "vit" {
            cfg["vision_config"]["attention_top_k"] = k.into();
        }
    }
    if let Some(b) = c.attention_block_size {
        cfg["text_config"]["attention_block_size"] = b.into();
        if c.vision == "vit" {
            cfg["vision_config"]["attention_block_size"] = b.into();
        }
    }
    cfg
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Trains into `out` (config, tokenizer, template, processor config,
/// checkpoints, metrics, then `model.safetensors`). With `resume`, continues
/// from `out/checkpoint.safetensors`.
pub fn train_vqa(
    c: &VqaTrainConfig,
    out: &Path,
    resume: bool,
    on_step: &mut dyn FnMut(&Metrics),
) -> Result<()> {
    let effnet = c.validate()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut train = load_data(&c.data, "train")?;
    if c.max_train_examples > 0 {
        train.truncate(c.max_train_examples);
    }
    // The questions of `held_out_images` images (a seeded choice, at most
    // a tenth) are never trained on: evaluation measures unseen images.
    let (held_out, train) = split_by_image(train, c.held_out_images, c.seed);
    let train = if c.balance_answers {
        balance_answers(train, c.seed)
    } else {
        train
    };
    if train.is_empty() {
        return Err(Error::Invalid("no training examples".into()));
    }
    // What each step reads: easy-VQA's open questions first
    // (`open_first_steps`: they cannot be guessed from the question alone),
    // or a curriculum's question types, then everything.
    let draws = super::draw::Draws::new(&train, c)?;
    let cfg_path = out.join("train_config.json");
    if resume && cfg_path.exists() {
        check_resume_config(&cfg_path, c)?;
    }
    if !resume {
        super::trainer::clear_previous_run(out)?;
    }
    write(
        &cfg_path,
        &serde_json::to_string_pretty(c).unwrap_or_default(),
    )?;
    // Tokenizer, template and processor: what `ask` loads.
    let tok_path = out.join("tokenizer.json");
    if let (Some(src), false) = (&c.init_from, resume && tok_path.exists()) {
        let from = src.join("tokenizer.json");
        let bytes = std::fs::read(&from).map_err(|e| {
            Error::Invalid(format!(
                "training config: init_from: cannot read {}: {e}; point it at a model directory written by `autoglm train`",
                from.display()
            ))
        })?;
        super::write_atomic(&tok_path, &bytes)?;
    } else if !(resume && tok_path.exists()) {
        let texts: Vec<String> = train
            .iter()
            .flat_map(|e| [e.question.clone(), e.answer.clone()])
            .collect();
        crate::text::train_tokenizer::train_bpe(
            texts.iter().map(String::as_str),
            c.vocab_size,
            &SPECIAL,
            &tok_path,
        )?;
    }
    let tokenizer = Tokenizer::from_file(&tok_path, 1 << 20)?;
    let vocab = tokenizer.vocab_size();
    let template_text = if c.image_after_question {
        TEMPLATE_TEXT_FIRST
    } else {
        TEMPLATE
    };
    write(&out.join("chat_template.jinja"), template_text)?;
    write(
        &out.join("tokenizer_config.json"),
        &serde_json::json!({"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>"})
            .to_string(),
    )?;
    // The ViT's inputs in [-1, 1]; EfficientNet-Lite's TF normalisation.
    // Whole images, resized, never cropped: easy-VQA shapes touch the edges.
    let (mean, std, resample, code) = if effnet {
        (
            [127.0 / 255.0; 3],
            [128.0 / 255.0; 3],
            Resample::Bilinear,
            2,
        )
    } else {
        ([0.5; 3], [0.5; 3], Resample::Bicubic, 3)
    };
    let pre = Preprocess {
        shortest_edge: c.image_size as u32,
        resample,
        crop: (c.image_size as u32, c.image_size as u32),
        crop_rounding: CropRounding::Floor,
        mean,
        std,
    };
    write(
        &out.join("preprocessor_config.json"),
        &serde_json::json!({"size": {"shortest_edge": c.image_size}, "crop_size": {"height": c.image_size, "width": c.image_size},
            "resample": code, "image_mean": mean, "image_std": std})
        .to_string(),
    )?;
    let cfg_json = llava_config(c, vocab);
    write(
        &out.join("config.json"),
        &serde_json::to_string_pretty(&cfg_json).unwrap_or_default(),
    )?;
    if let Some(src) = &c.init_from {
        // A router (and a light path's projector) and image
        // self-attention blocks may be added to a trained model: they
        // start fresh (the blocks as the identity).
        let mut theirs: serde_json::Value = crate::io::read_json(&src.join("config.json"))?;
        let mut ours = cfg_json.clone();
        for v in [&mut theirs, &mut ours] {
            if let Some(o) = v.as_object_mut() {
                o.remove("router_light_layers");
                o.remove("router_light_image_size");
                o.remove("router_light_tower_stage");
                o.remove("image_self_attention_layers");
                o.remove("image_self_attention_distance_slope");
            }
        }
        if theirs != ours {
            return Err(Error::Invalid(format!(
                "training config: init_from: {} is a different model from the one this config builds (compare its config.json with {}); match the sizes, vision and projector",
                src.display(),
                out.join("config.json").display()
            )));
        }
    }
    let cfg: LlavaConfig =
        serde_json::from_value(cfg_json).map_err(|e| Error::Invalid(e.to_string()))?;
    cfg.validate(&out.join("config.json"))?;

    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    // The frozen EfficientNet's weights stay out of the VarMap: nothing
    // trains them, and they are added to the saved model at the end.
    let (model, frozen_dir) = build_model(vb.clone(), &cfg, effnet, c.image_size)?;
    let probe = match &c.neighbour_probe {
        Some(_) => Some(crate::nn::linear_b(
            cfg.text_config.hidden_size,
            4,
            true,
            vb.pp(NEIGHBOUR_PROBE),
        )?),
        None => None,
    };
    init_weights(&vm, c.seed, c.init_std)?;
    if c.gate_init != 0.0 {
        set_gates(&vm, c.gate_init)?;
    }
    if let Some(src) = &c.init_from {
        let path = src.join("model.safetensors");
        let mut saved = candle_core::safetensors::load(&path, &Device::Cpu)?;
        for (name, var) in vm
            .data()
            .lock()
            .map_err(|_| Error::Invalid("variable map poisoned".into()))?
            .iter()
        {
            let fresh = name.starts_with("router.")
                || name.starts_with("light_projector.")
                || name.starts_with("image_self_attention.")
                || name.starts_with(NEIGHBOUR_PROBE);
            if fresh && !saved.contains_key(name) {
                saved.insert(name.clone(), var.as_tensor().copy()?);
            }
        }
        super::checkpoint::set_varmap(
            &vm,
            &saved,
            &format!("training config: init_from: {}", path.display()),
        )?;
    }
    let template = ChatTemplate::new(template_text, "<s>", "<|im_end|>")?;
    let end = tokenizer
        .token_id("<|im_end|>")
        .ok_or_else(|| Error::Invalid("tokenizer lacks <|im_end|>".into()))?;
    let encode = |e: &VqaExample| -> Result<Encoded> {
        let mut content = vec![serde_json::json!({"type": "text", "text": e.question})];
        if !c.blind {
            content.insert(0, serde_json::json!({"type": "image"}));
        }
        let msgs = serde_json::json!([{"role": "user", "content": content}]);
        let prompt = model.expand_image_tokens(
            &tokenizer.encode_plain(&template.render(&msgs, true)?)?,
            usize::from(!c.blind),
        )?;
        let mut answer = tokenizer.encode_plain(&e.answer)?;
        answer.push(end);
        Ok(Encoded { prompt, answer })
    };
    let mut images = if c.blind {
        ImageCache::blind()
    } else {
        ImageCache::build(train.iter().chain(&held_out), &pre)?
    };
    if effnet && !c.blind {
        let flips: &[u8] = if c.augment { &[0, 1] } else { &[0] };
        images.precompute_features(&model, flips)?;
    }
    if let Some(path) = &c.oracle_scenes {
        images.use_scene_oracle(&crate::data::sort_of_clevr::read_scenes(path)?)?;
        tracing::warn!(
            "oracle_scenes: the tokens are {}'s ground truth; the saved model reads the tower's features, not these",
            path.display()
        );
    }
    // Each training and held-out image's objects: (cell, nearest's shape,
    // furthest's).
    let neighbours: HashMap<&Path, Vec<(u32, u32, u32)>> = match &c.neighbour_probe {
        Some(path) => {
            let scenes = crate::data::sort_of_clevr::read_scenes(path)?;
            let g = (model.image_tokens() as f64).sqrt().round() as usize;
            let mut out = HashMap::new();
            for e in train.iter().chain(&held_out) {
                let objects = scenes.get(&e.image).ok_or_else(|| {
                    Error::Invalid(format!(
                        "training config: neighbour_probe: {} has no scene for {}; use the scenes.jsonl written beside the questions",
                        path.display(),
                        e.image.display()
                    ))
                })?;
                let circle = |s: crate::data::sort_of_clevr::Shape| {
                    u32::from(s == crate::data::sort_of_clevr::Shape::Circle)
                };
                out.insert(
                    e.image.as_path(),
                    crate::data::sort_of_clevr::neighbour_targets(objects, g)
                        .into_iter()
                        .map(|(cell, near, far)| (cell as u32, circle(near), circle(far)))
                        .collect(),
                );
            }
            out
        }
        None => HashMap::new(),
    };
    let train_ids = train.iter().map(encode).collect::<Result<Vec<_>>>()?;
    let held_ids = held_out.iter().map(encode).collect::<Result<Vec<_>>>()?;
    let micro = c.batch_size / c.workers;
    let tc = TrainConfig {
        grad_accum: c.workers,
        workers: c.workers,
        eval_every: c.eval_every,
        checkpoint_every: c.checkpoint_every,
        ..TrainConfig::cosine(c.steps, c.peak_lr, c.warmup_steps, c.clip_norm, c.seed)
    };
    let mut trainer = Trainer::new(&vm, tc, out)?;
    let trainable = trainer.trainable();
    let all_params: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    let t_start = std::time::Instant::now();
    if resume && trainer.resume(&vm)? {
        tracing::info!("resumed at step {}", trainer.step);
    }
    let q = c.questions_per_image;
    let grouped_loss = |step: usize, part: usize| -> Result<Tensor> {
        let groups = draws.groups(step);
        let per_part = c.batch_size / q / c.workers;
        let lo = (part * per_part).min(groups.len());
        let groups = &groups[lo..(lo + per_part).min(groups.len())];
        let flips: Vec<u8> = (0..groups.len())
            .map(|k| {
                if c.augment {
                    (mix(c.seed, step as u64, (lo + k) as u64) & 1) as u8
                } else {
                    0
                }
            })
            .collect();
        let px = images.batch(groups.iter().map(|g| &train[g[0]].image), &flips)?;
        let rows: Vec<Vec<&Encoded>> = groups
            .iter()
            .map(|g| g.iter().map(|&i| &train_ids[i]).collect())
            .collect();
        let Some(probe) = &probe else {
            let (logits, targets) = shared_image_answer_logits(&model, &rows, px.as_ref())?;
            return Ok(candle_nn::loss::cross_entropy(&logits, &targets)?);
        };
        let Images::VisionFeatures(f) = px.as_ref() else {
            return Err(Error::Invalid(
                "neighbour_probe needs the frozen tower's features".into(),
            ));
        };
        let (tokens, delta) = model.project_with_mix(f)?;
        let (logits, targets) =
            shared_image_answer_logits(&model, &rows, Images::Projected(&tokens))?;
        let answers = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let objects: Vec<&[(u32, u32, u32)]> = groups
            .iter()
            .map(|g| neighbours[train[g[0]].image.as_path()].as_slice())
            .collect();
        let (aux, right) = neighbour_probe_loss(probe, &delta, &objects)?;
        if part == 0 && c.eval_every > 0 && (step + 1) % c.eval_every == 0 {
            tracing::info!(
                "step {}: neighbour probe loss {:.4}, nearest {:.1} %, furthest {:.1} % on this batch",
                step + 1,
                aux.to_scalar::<f32>()?,
                100.0 * right.0,
                100.0 * right.1
            );
        }
        Ok((answers + (aux * c.neighbour_probe_weight)?)?)
    };
    let loss = |step: usize, part: usize| -> Result<Tensor> {
        if q > 1 {
            return grouped_loss(step, part);
        }
        let batch = &draws.batch(step)[..];
        let lo = (part * micro).min(batch.len());
        let idx = &batch[lo..(lo + micro).min(batch.len())];
        if idx.is_empty() {
            // A short last batch left this part nothing: no contribution.
            let any = model
                .lm
                .embed(&Tensor::zeros((1, 1), DType::U32, &Device::Cpu)?)?;
            return Ok((any.sum_all()? * 0.0)?);
        }
        let flips: Vec<u8> = idx
            .iter()
            .enumerate()
            .map(|(k, _)| {
                if c.augment {
                    (mix(c.seed, step as u64, (lo + k) as u64) & 1) as u8
                } else {
                    0
                }
            })
            .collect();
        let px = images.batch(idx.iter().map(|&i| &train[i].image), &flips)?;
        let rows: Vec<&Encoded> = idx.iter().map(|&i| &train_ids[i]).collect();
        if model.router.is_some() {
            // The light path's image: the same pixels (its features are
            // computed in the loss), or the frozen tower's light-path
            // features, computed beforehand.
            let light = if model.config.routes_before_tower() {
                let small: Vec<u8> = flips.iter().map(|f| f | LIGHT).collect();
                Some(images.batch(idx.iter().map(|&i| &train[i].image), &small)?)
            } else {
                None
            };
            return routed_answer_loss(
                &model,
                &rows,
                px.as_ref(),
                light.as_ref().map(ImageBatch::as_ref),
                c.router_cost_weight,
            );
        }
        let (logits, targets) = answer_logits(&model, &rows, px.as_ref())?;
        Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
    };
    // The probe on the held-out images (each once): what the blocks learned
    // of the neighbours, beside the answers' held-out accuracy.
    let held_out_probe = |probe: &crate::nn::Linear| -> Result<serde_json::Value> {
        let mut seen = std::collections::HashSet::new();
        let distinct: Vec<&std::path::PathBuf> = held_out
            .iter()
            .map(|e| &e.image)
            .filter(|p| seen.insert(*p))
            .collect();
        let (mut objects, mut near, mut far) = (0usize, 0.0, 0.0);
        for chunk in distinct.chunks(32) {
            let px = images.batch(chunk.iter().copied(), &vec![0; chunk.len()])?;
            let Images::VisionFeatures(f) = px.as_ref() else {
                return Err(Error::Invalid(
                    "neighbour_probe needs the frozen tower's features".into(),
                ));
            };
            let (_, delta) = model.project_with_mix(f)?;
            let objs: Vec<&[(u32, u32, u32)]> = chunk
                .iter()
                .map(|p| neighbours[p.as_path()].as_slice())
                .collect();
            let n = objs.iter().map(|o| o.len()).sum::<usize>();
            let (_, right) = neighbour_probe_loss(probe, &delta, &objs)?;
            objects += n;
            near += right.0 * n as f64;
            far += right.1 * n as f64;
        }
        let m = objects.max(1) as f64;
        Ok(serde_json::json!({"nearest": near / m, "furthest": far / m, "objects": objects}))
    };
    let mut eval = |_step: usize| -> Result<serde_json::Value> {
        let mut correct = 0;
        // kind → (examples, correct)
        let mut kinds: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
        for (chunk_i, chunk) in held_ids.chunks(64).enumerate() {
            let base = chunk_i * 64;
            let px = images.batch(
                (base..base + chunk.len()).map(|i| &held_out[i].image),
                &vec![0; chunk.len()],
            )?;
            let rows: Vec<&Encoded> = chunk.iter().collect();
            let (logits, targets) = answer_logits(&model, &rows, px.as_ref())?;
            let pred = logits.argmax(1)?.to_vec1::<u32>()?;
            let targets = targets.to_vec1::<u32>()?;
            let mut at = 0;
            for (k, r) in rows.iter().enumerate() {
                let n = r.answer.len();
                let ok = pred[at..at + n] == targets[at..at + n];
                correct += usize::from(ok);
                // The data's question type where it names one (as
                // `autoglm eval` reports), else the answer's kind.
                let ex = &held_out[base + k];
                let e = kinds
                    .entry(ex.kind.as_deref().unwrap_or(answer_kind(&ex.answer)))
                    .or_default();
                e.0 += 1;
                e.1 += usize::from(ok);
                at += n;
            }
        }
        let per_kind: serde_json::Map<String, serde_json::Value> = kinds
            .iter()
            .map(|(k, (n, c))| (k.to_string(), (*c as f64 / *n as f64).into()))
            .collect();
        let mut v = serde_json::json!({
            "held_out_accuracy": correct as f64 / held_ids.len().max(1) as f64,
            "examples": held_ids.len(),
            "per_kind": per_kind,
        });
        match &probe {
            Some(probe) if !held_out.is_empty() => v["neighbour_probe"] = held_out_probe(probe)?,
            _ => {}
        }
        Ok(v)
    };
    trainer.run(&vm, &loss, &mut eval, on_step)?;
    if let Err(e) = super::plot::plot_metrics(out) {
        tracing::warn!("no plots: {e}");
    }
    let all = save_weights(&vm, frozen_dir.as_deref(), out)?;
    let frozen_params = all.values().map(Tensor::elem_count).sum::<usize>() - all_params;
    let summary = serde_json::json!({
        "trainable_params": trainable,
        "frozen_params": frozen_params,
        "steps": c.steps,
        "batch_size": c.batch_size,
        "train_seconds": t_start.elapsed().as_secs_f64(),
        "train_examples": train.len(),
        "held_out_examples": held_out.len(),
    });
    super::write_atomic(
        &out.join("train_summary.json"),
        serde_json::to_string_pretty(&summary)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(())
}

/// The model to train: projector and decoder in `vb` (the VarMap), around
/// a ViT in `vb` too, or the frozen EfficientNet-Lite0 loaded from the
/// assets (returned with its directory, whose weights join the saved model).
fn build_model(
    vb: VarBuilder,
    cfg: &LlavaConfig,
    effnet: bool,
    image_size: usize,
) -> Result<(Llava, Option<std::path::PathBuf>)> {
    if !effnet {
        return Ok((Llava::new(vb, cfg)?, None));
    }
    let dir = crate::io::assets::dir("efficientnet-lite0")?;
    let mut ec = EfficientNetConfig::lite0();
    ec.image_size = image_size;
    let evb = Safetensors::open_dir(&dir)?.var_builder(DType::F32, &Device::Cpu);
    let tower = VisionTower::EfficientNet(EfficientNet::new(evb, &ec)?);
    Ok((Llava::with_vision(tower, vb, cfg)?, Some(dir)))
}

/// Writes `out/model.safetensors` atomically: the trained variables, plus
/// a frozen tower's weights under `vision_tower.` (without the ImageNet
/// classifier, which the VLM does not use: 5 MB). Returns what it wrote.
fn save_weights(
    vm: &VarMap,
    frozen_dir: Option<&Path>,
    out: &Path,
) -> Result<HashMap<String, Tensor>> {
    let mut all = super::varmap_tensors(vm)?;
    all.retain(|n, _| !n.starts_with(NEIGHBOUR_PROBE));
    if let Some(dir) = frozen_dir {
        let path = dir.join("model.safetensors");
        for (n, t) in candle_core::safetensors::load(path, &Device::Cpu)? {
            if !n.starts_with("_fc.") {
                all.insert(format!("vision_tower.{n}"), t);
            }
        }
    }
    super::save_safetensors_atomic(&out.join("model.safetensors"), &all)?;
    Ok(all)
}

/// Weight names of the trainer's neighbour probe (not saved with the model).
const NEIGHBOUR_PROBE: &str = "neighbour_probe";

/// The neighbour probe's loss: at each object's cell, `probe` reads what
/// the image self-attention blocks added (`delta`) and predicts whether its
/// nearest other object is a circle (outputs 0, 1) and whether its furthest
/// is (2, 3); the two cross-entropies are summed. Also each's accuracy.
///
/// # Shapes
/// `delta`: (N, T, H); `objects[n]`: image n's (cell, nearest, furthest),
/// each shape 1 for a circle
pub fn neighbour_probe_loss(
    probe: &crate::nn::Linear,
    delta: &Tensor,
    objects: &[&[(u32, u32, u32)]],
) -> Result<(Tensor, (f64, f64))> {
    let (n, t, h) = delta.dims3()?;
    if objects.len() != n
        || objects
            .iter()
            .flat_map(|o| o.iter())
            .any(|o| o.0 as usize >= t)
    {
        return Err(Error::Invalid(format!(
            "neighbour probe: {n} images of {t} tokens, got objects for {} images (or a cell past the grid)",
            objects.len()
        )));
    }
    let mut cells = Vec::new();
    let (mut near, mut far) = (Vec::new(), Vec::new());
    for (i, objs) in objects.iter().enumerate() {
        for &(cell, a, b) in *objs {
            cells.push(i as u32 * t as u32 + cell);
            near.push(a);
            far.push(b);
        }
    }
    let dev = delta.device();
    let rows = delta
        .reshape((n * t, h))?
        .index_select(&Tensor::new(cells.as_slice(), dev)?, 0)?;
    let out = probe.forward(&rows)?;
    let mut loss = None;
    let mut right = [0.0; 2];
    for (k, want) in [near, far].into_iter().enumerate() {
        let logits = out.narrow(1, 2 * k, 2)?;
        let want = Tensor::new(want.as_slice(), dev)?;
        let ce = candle_nn::loss::cross_entropy(&logits, &want)?;
        let hits = logits
            .argmax(1)?
            .eq(&want)?
            .to_dtype(DType::F32)?
            .mean_all()?;
        right[k] = f64::from(hits.to_scalar::<f32>()?);
        loss = Some(match loss {
            None => ce,
            Some(l) => (l + ce)?,
        });
    }
    let loss = loss.ok_or_else(|| Error::Invalid("neighbour probe: no objects".into()))?;
    Ok((loss, (right[0], right[1])))
}

/// The prompt ids (image expanded) and the answer ids (ending with the end
/// token) of one example.
pub struct Encoded {
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
}

/// What a batch brings of its images.
pub enum Images<'a> {
    /// (B, 3, S, S) preprocessed pixels: the vision tower runs.
    Pixels(&'a Tensor),
    /// (B, P, H_vision) features of a frozen tower, computed beforehand.
    VisionFeatures(&'a Tensor),
    /// (B, P, H_lm) projected image tokens.
    Projected(&'a Tensor),
    /// No images: blind rows (their prompts hold no image tokens).
    None,
}

impl Images<'_> {
    /// (B, P, H_lm) the image tokens as the decoder reads them: the tower
    /// and projector run as far as the batch has not run them. `None`
    /// for blind rows.
    fn projected(&self, model: &Llava) -> Result<Option<Tensor>> {
        Ok(match self {
            Images::Pixels(px) => Some(model.image_features(px)?),
            Images::VisionFeatures(f) => Some(model.project(f)?),
            Images::Projected(f) => Some((*f).clone()),
            Images::None => None,
        })
    }
}

/// Teacher forcing over a batch: each row reads its prompt from token
/// `skip` on (0: all of it), then its answer but the last token; position
/// p predicts token p + 1.
struct TeacherForcing {
    /// Each row's ids, unpadded.
    ids: Vec<Vec<u32>>,
    /// The longest row.
    t: usize,
    /// Where each answer token is predicted in the flattened (B·T)
    /// sequence: the k-th at `b·T + prompt.len() − skip − 1 + k`.
    at: Vec<u32>,
    /// The ids they should predict.
    targets: Vec<u32>,
    /// The row of each answer token.
    row_of: Vec<usize>,
}

impl TeacherForcing {
    fn new(rows: &[&Encoded], skip: usize) -> Self {
        let ids: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                let mut v = r.prompt[skip..].to_vec();
                v.extend(&r.answer[..r.answer.len() - 1]);
                v
            })
            .collect();
        let t = ids.iter().map(Vec::len).max().unwrap_or(0);
        let (mut at, mut targets, mut row_of) = (Vec::new(), Vec::new(), Vec::new());
        for (b, r) in rows.iter().enumerate() {
            for (k, &a) in r.answer.iter().enumerate() {
                at.push((b * t + r.prompt.len() - skip - 1 + k) as u32);
                targets.push(a);
                row_of.push(b);
            }
        }
        Self {
            ids,
            t,
            at,
            targets,
            row_of,
        }
    }

    /// (B, T) the rows' ids, padded on the right with 0.
    fn padded(&self, dev: &Device) -> Result<Tensor> {
        let flat: Vec<u32> = self
            .ids
            .iter()
            .flat_map(|r| {
                r.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, self.t - r.len()))
            })
            .collect();
        Ok(Tensor::from_vec(flat, (self.ids.len(), self.t), dev)?)
    }

    /// (A, H) the states of `h` (B, T, H) where the answer tokens are
    /// predicted.
    fn at_answers(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, width) = h.dims3()?;
        let at = Tensor::new(self.at.as_slice(), h.device())?;
        Ok(h.reshape((b * t, width))?.index_select(&at, 0)?)
    }

    /// (A) the ids the answer positions should predict.
    fn targets(&self, dev: &Device) -> Result<Tensor> {
        Ok(Tensor::new(self.targets.as_slice(), dev)?)
    }
}

/// Owned [`Images`].
pub enum ImageBatch {
    Pixels(Tensor),
    VisionFeatures(Tensor),
    None,
}

impl ImageBatch {
    pub fn as_ref(&self) -> Images<'_> {
        match self {
            ImageBatch::Pixels(t) => Images::Pixels(t),
            ImageBatch::VisionFeatures(t) => Images::VisionFeatures(t),
            ImageBatch::None => Images::None,
        }
    }
}

/// Teacher-forced logits of every answer token of a batch, flattened in row
/// order, and the ids they should predict: position p predicts token p + 1,
/// so the answer's k-th token is predicted at `prompt.len() - 1 + k`.
///
/// # Shapes
/// → logits (A, V), targets (A) with A the total answer tokens.
pub fn answer_logits(model: &Llava, rows: &[&Encoded], images: Images) -> Result<(Tensor, Tensor)> {
    let a = answer_hidden(model, rows, images, &[model.lm.depth()])?;
    Ok((model.lm.logits(&a.hidden[0])?, a.targets))
}

/// [`answer_logits`] for rows that come in groups sharing one image, the
/// image before the question: each group's prompt up to its last image
/// token (the same for all its rows) runs through the decoder once, and
/// its rows continue from that cache, each with its own question and
/// answer. The logits are those of [`answer_logits`] on the same rows,
/// each with its group's image; the image prefix is computed once per
/// image instead of once per row.
///
/// `groups[g]`: the rows of image g; `images`: one image per group.
///
/// # Shapes
/// → logits (A, V), targets (A), rows in group order.
pub fn shared_image_answer_logits(
    model: &Llava,
    groups: &[Vec<&Encoded>],
    images: Images,
) -> Result<(Tensor, Tensor)> {
    let tok = model.config.image_token_index;
    let bad = |why: String| Err(Error::Invalid(format!("shared-image batch: {why}")));
    let Some(first) = groups.first().and_then(|g| g.first()) else {
        return bad("no rows".into());
    };
    // The shared prefix: through the last image token.
    let Some(p) = first.prompt.iter().rposition(|&i| i == tok).map(|i| i + 1) else {
        return bad("the prompt holds no image token".into());
    };
    let mut prefix = Vec::with_capacity(groups.len());
    let mut row_group = Vec::new();
    for (g, rows) in groups.iter().enumerate() {
        let Some(head) = rows.first() else {
            return bad(format!("group {g} has no rows"));
        };
        let same = head.prompt.len() > p && head.prompt[..p] == first.prompt[..p];
        for r in rows {
            if !same || r.prompt.len() <= p || r.prompt[..p] != head.prompt[..p] {
                return bad(format!(
                    "the rows of group {g} do not all share the {p}-token prompt prefix through the image; put the image before the question"
                ));
            }
            row_group.push(g as u32);
        }
        prefix.push(head.prompt[..p].to_vec());
    }
    let dev = model.lm.embed_tokens_device().clone();
    let Some(feats) = images.projected(model)? else {
        return bad("no images".into());
    };
    let depth = model.lm.depth();
    let context = model.lm.config.cross_attention_every.map(|_| feats.clone());
    let e = model.embed_batch(&prefix, &vec![p; groups.len()], &feats)?;
    let shared = model.lm.config.shared_position_token;
    let pos = Positions::of_ids(&prefix, p, shared, &dev)?.with_context(context.clone(), None);
    // Every group's prefix has the same layout: the rows continue from
    // the position after it.
    let next = rotary_positions(&prefix[0], 0, shared)
        .last()
        .map_or(0, |l| l + 1);
    let mut cache = model.lm.new_cache();
    model
        .lm
        .forward_embeds_exits(&e, &pos, &mut cache, &[depth])?;
    let mut cache = cache.select_rows(&row_group)?;
    let row_group = Tensor::new(row_group.as_slice(), &dev)?;

    // Each row's question and answer, after the shared prefix.
    let rows: Vec<&Encoded> = groups.iter().flatten().copied().collect();
    let tf = TeacherForcing::new(&rows, p);
    let e = model.lm.embed(&tf.padded(&dev)?)?;
    let context = match context {
        Some(c) => Some(c.index_select(&row_group, 0)?),
        None => None,
    };
    let pos =
        Positions::contiguous(rows.len(), tf.t, next as usize, &dev)?.with_context(context, None);
    let h = model
        .lm
        .forward_embeds_exits(&e, &pos, &mut cache, &[depth])?
        .remove(0);
    Ok((model.lm.logits(&tf.at_answers(&h)?)?, tf.targets(&dev)?))
}

/// The decoder's states at the answer positions of a batch.
struct AnswerHidden {
    /// (A, H) after each requested number of layers.
    hidden: Vec<Tensor>,
    /// (A) the ids they should predict.
    targets: Tensor,
    /// The row of each answer token.
    row_of: Vec<usize>,
    /// (B, T, H) the input embeddings.
    embeds: Tensor,
}

fn answer_hidden(
    model: &Llava,
    rows: &[&Encoded],
    images: Images,
    exits: &[usize],
) -> Result<AnswerHidden> {
    let tf = TeacherForcing::new(rows, 0);
    let dev = model.lm.embed_tokens_device().clone();
    let prompt_lens: Vec<usize> = rows.iter().map(|r| r.prompt.len()).collect();
    let feats = images.projected(model)?;
    let e = match &feats {
        Some(f) => model.embed_batch(&tf.ids, &prompt_lens, f)?,
        None => model.lm.embed(&tf.padded(&dev)?)?,
    };
    // Each row's image is its decoder context (one image per row).
    let context = feats.filter(|_| model.lm.config.cross_attention_every.is_some());
    let pos = Positions::of_ids(&tf.ids, tf.t, model.lm.config.shared_position_token, &dev)?
        .with_context(context, None);
    let hidden = model
        .lm
        .forward_embeds_exits(&e, &pos, &mut model.lm.new_cache(), exits)?
        .iter()
        .map(|h| tf.at_answers(h))
        .collect::<Result<Vec<_>>>()?;
    Ok(AnswerHidden {
        hidden,
        targets: tf.targets(&dev)?,
        row_of: tf.row_of,
        embeds: e,
    })
}

/// The training loss of a routed model: both paths' mean answer loss,
/// plus the router's cost-penalised loss ([`routed_loss`]) on their
/// detached per-example losses (the router learns where the light path
/// suffices; it does not change what the paths compute).
///
/// `light_images`: the light path's images when its router chooses before
/// the tower (a smaller image, or an early exit from the tower): the same
/// pixels (the light features are computed here), or the frozen tower's
/// light-path features; `None` otherwise.
pub fn routed_answer_loss(
    model: &Llava,
    rows: &[&Encoded],
    images: Images,
    light_images: Option<Images>,
    lambda: f64,
) -> Result<Tensor> {
    let Some(router) = &model.router else {
        return Err(Error::Invalid(
            "routed_answer_loss: the model has no router".into(),
        ));
    };
    let (depth, light) = (model.lm.depth(), model.light_depth());
    let per_row = |a: &AnswerHidden, h: &Tensor| -> Result<Tensor> {
        per_example_loss(&model.lm.logits(h)?, &a.targets, &a.row_of, rows.len())
    };
    let before_tower = model.config.routes_before_tower();
    let (l_light, l_full, embeds) = match (before_tower, light_images) {
        (false, _) => {
            let a = answer_hidden(model, rows, images, &[light, depth])?;
            let l = (per_row(&a, &a.hidden[0])?, per_row(&a, &a.hidden[1])?);
            (l.0, l.1, a.embeds)
        }
        (true, Some(small)) => {
            let projected = match small {
                Images::Pixels(p) => model.light_image_features(p)?,
                Images::VisionFeatures(f) => model.project_light(f)?,
                Images::Projected(f) => f.clone(),
                Images::None => {
                    return Err(Error::Invalid(
                        "routed_answer_loss: the light path's image is missing".into(),
                    ))
                }
            };
            let a = answer_hidden(model, rows, Images::Projected(&projected), &[light])?;
            let f = answer_hidden(model, rows, images, &[depth])?;
            (
                per_row(&a, &a.hidden[0])?,
                per_row(&f, &f.hidden[0])?,
                f.embeds,
            )
        }
        (true, None) => {
            return Err(Error::Invalid(
                "routed_answer_loss: the light path sees a smaller image, and none was given"
                    .into(),
            ))
        }
    };
    let prompts: Vec<&[u32]> = rows.iter().map(|r| r.prompt.as_slice()).collect();
    let p = router.probability(&model.router_input(&embeds, &prompts)?.detach())?;
    let cost = RouteCost {
        light: light as f64 / depth as f64 * model.light_tower_share(),
        full: 1.0,
    };
    let route = routed_loss(&p, &l_full.detach(), &l_light.detach(), cost, lambda)?;
    Ok(((l_full.mean_all()? + l_light.mean_all()?)? + route)?)
}

/// Each row's mean token cross-entropy.
///
/// # Shapes
/// `logits`: (A, V), `targets`: (A), `row_of`: A rows in 0..B → (B)
fn per_example_loss(
    logits: &Tensor,
    targets: &Tensor,
    row_of: &[usize],
    b: usize,
) -> Result<Tensor> {
    let a = row_of.len();
    let lsm = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
    let nll = lsm.gather(&targets.unsqueeze(1)?, 1)?.neg()?; // (A, 1)
    let mut count = vec![0f32; b];
    row_of.iter().for_each(|&r| count[r] += 1.0);
    let mut w = vec![0f32; b * a];
    for (j, &r) in row_of.iter().enumerate() {
        w[r * a + j] = 1.0 / count[r];
    }
    let w = Tensor::from_vec(w, (b, a), logits.device())?;
    Ok(w.matmul(&nll)?.squeeze(1)?)
}

/// A hash of `(seed, step, k)`: the augmentation of the k-th example of a
/// step, the same on every run and after a resume.
fn mix(seed: u64, step: u64, k: u64) -> u64 {
    let mut z =
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Sets every tanh gate (a variable whose name ends in `_gate`) to `value`;
/// returns how many there were.
pub fn set_gates(vm: &VarMap, value: f64) -> Result<usize> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| Error::Invalid("variable map poisoned".into()))?;
    let mut n = 0;
    for (name, v) in data.iter() {
        if name.ends_with("_gate") {
            v.set(&(v.as_tensor().ones_like()? * value)?)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Initialises every variable: biases 0, norm scales 1, everything else
/// N(0, σ²) with σ = `std`, or 1/√fan-in when `std` is `None` (fan-in: the
/// product of all dimensions but the first — a Linear's input width, an
/// embedding's width, a conv's C·k·k). Variables are visited in name order
/// from a generator seeded by `seed`: the same seed gives the same model.
pub fn init_weights(vm: &VarMap, seed: u64, std: Option<f64>) -> Result<()> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    let data = vm
        .data()
        .lock()
        .map_err(|_| Error::Invalid("variable map poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for name in names {
        let v = &data[name];
        let t = v.as_tensor();
        let is_norm = t.rank() == 1
            && (name.contains("norm") || name.contains("layrnorm"))
            && name.ends_with("weight");
        // Biases (`*.bias`, and the LSTM's `bias_ih_l0`), the tanh gates
        // of gated cross-attention (a gated block starts as the identity)
        // and the coordinate products' linear map start at 0; the LSTM's
        // forget gate starts open.
        let is_bias = name
            .rsplit('.')
            .next()
            .is_some_and(|s| s.starts_with("bias"));
        // A distance bias's slopes keep the start its config chose.
        if name.ends_with(crate::fusion::attention::DISTANCE_SLOPE) {
            continue;
        }
        let value = if name.ends_with(crate::text::lstm::FORGET_BIAS_NAME) {
            crate::text::lstm::forget_bias(t)?
        } else if is_bias || name.ends_with("_gate") || name.contains(crate::vlm::COORD_PRODUCTS) {
            t.zeros_like()?
        } else if is_norm {
            t.ones_like()?
        } else {
            let n = t.elem_count();
            let fan_in = t.dims().iter().skip(1).product::<usize>().max(1);
            let sigma = std.unwrap_or(1.0 / (fan_in as f64).sqrt());
            let normal =
                Normal::new(0.0f32, sigma as f32).map_err(|e| Error::Invalid(e.to_string()))?;
            let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
            Tensor::from_vec(data, t.shape(), t.device())?
        };
        v.set(&value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row's mean token cross-entropy, by hand: row 0 has two answer
    /// tokens, row 1 one; the mean over rows of one token each is candle's
    /// cross-entropy.
    /// The probe reads each object's own cell: two images of 4 tokens,
    /// a probe whose outputs are (a, −a, b, −b) for a cell holding (a, b),
    /// and the cross-entropies worked out by hand.
    #[test]
    fn neighbour_probe_loss_reads_each_objects_cell() {
        use candle_nn::VarBuilder;
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let probe = crate::nn::linear_b(2, 4, true, VarBuilder::from_varmap(&vm, DType::F32, &dev))
            .unwrap();
        let w = [1.0f32, 0.0, -1.0, 0.0, 0.0, 1.0, 0.0, -1.0];
        vm.data().lock().unwrap()["weight"]
            .set(&Tensor::from_slice(&w, (4, 2), &dev).unwrap())
            .unwrap();
        vm.data().lock().unwrap()["bias"]
            .set(&Tensor::zeros(4, DType::F32, &dev).unwrap())
            .unwrap();
        let mut d = vec![0f32; 2 * 4 * 2];
        // Image 1, cell 2 holds (a, b) = (1, −2); image 0, cell 3 (0.5, 0).
        d[(4 + 2) * 2] = 1.0;
        d[(4 + 2) * 2 + 1] = -2.0;
        d[3 * 2] = 0.5;
        let delta = Tensor::from_vec(d, (2, 4, 2), &dev).unwrap();
        // Image 0's object: nearest a circle (1), furthest a square (0);
        // image 1's: nearest a square, furthest a circle.
        let objects: [&[(u32, u32, u32)]; 2] = [&[(3, 1, 0)], &[(2, 0, 1)]];
        let (loss, right) = neighbour_probe_loss(&probe, &delta, &objects).unwrap();
        // Outputs (x, −x): −log softmax is log(1 + e^{∓2x}) for class 0 / 1.
        let ce = |x: f64, class: u32| (1.0 + (if class == 0 { -2.0 } else { 2.0 } * x).exp()).ln();
        let near = (ce(0.5, 1) + ce(1.0, 0)) / 2.0;
        let far = (ce(0.0, 0) + ce(-2.0, 1)) / 2.0;
        let got = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!((got - (near + far)).abs() < 1e-5, "{got} vs {}", near + far);
        // Nearest: image 0 says 0 (wrong), image 1 says 0 (right); furthest:
        // image 0 ties (argmax 0, right), image 1 says 1 (right).
        assert_eq!(right, (0.5, 1.0));
        let e = neighbour_probe_loss(&probe, &delta, &[&[(4, 0, 0)], &[]]).unwrap_err();
        assert!(e.to_string().contains("past the grid"), "{e}");
    }

    #[test]
    fn per_example_loss_averages_each_rows_tokens() {
        let dev = Device::Cpu;
        let logits = Tensor::new(
            &[[2.0f32, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 3.0, 1.0]],
            &dev,
        )
        .unwrap();
        let targets = Tensor::new(&[0u32, 2, 1], &dev).unwrap();
        let got = per_example_loss(&logits, &targets, &[0, 0, 1], 2)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let nll = |row: [f32; 3], t: usize| {
            let lse = row.iter().map(|x| x.exp()).sum::<f32>().ln();
            lse - row[t]
        };
        let want = [
            (nll([2.0, 0.0, -1.0], 0) + nll([0.5, 0.5, 0.0], 2)) / 2.0,
            nll([-1.0, 3.0, 1.0], 1),
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        let each = per_example_loss(&logits, &targets, &[0, 1, 2], 3).unwrap();
        let ce = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        let d = (each.mean_all().unwrap() - ce).unwrap().abs().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
