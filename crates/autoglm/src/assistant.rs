//! `ask`: a VLM directory loaded with its tokenizer, chat template and image
//! preprocessor, answering a question about images, streaming the text.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::config::ImageProcessorConfig;
use crate::fusion::router::Route;
use crate::io::preprocess::Preprocess;
use crate::text::chat::ChatTemplate;
use crate::text::generate::{generate_with_context, Finish, GenerateConfig};
use crate::text::tokenizer::Tokenizer;
use crate::vlm::Llava;
use crate::{Error, Result};

pub struct Assistant {
    pub model: Llava,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub preprocess: Preprocess,
    /// End-of-sequence ids from config.json and generation_config.json.
    pub eos_ids: Vec<u32>,
    device: Device,
}

/// An answer and how it came about.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Answer {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: Finish,
    pub prompt_tokens: usize,
    /// The path a routed model took (`None`: no router, or the caller fixed
    /// the depth with [`GenerateConfig::layers`]).
    pub route: Option<crate::fusion::router::Route>,
}

/// What to do with a prompt longer than the context window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Error,
    /// Cut the end of the question until the prompt fits.
    TruncateQuestion,
}

impl Assistant {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                hint: "no such model directory; pass a HF LLaVA-layout directory with --model"
                    .into(),
            });
        }
        if crate::train::baseline::is_baseline(dir) {
            return Err(Error::Invalid(format!(
                "{} is the CNN + LSTM baseline, which picks an answer class and writes no text: measure it with `autoglm eval --model {}`; `ask` and `serve` need a VLM",
                dir.display(),
                dir.display()
            )));
        }
        let model = Llava::load(dir, device)?;
        // Never truncate silently: the context check below decides.
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), 1 << 24)?;
        let template = ChatTemplate::load(dir)?.ok_or_else(|| Error::Missing {
            path: dir.join("chat_template.jinja"),
            hint: "the model has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)".into(),
        })?;
        let pp = dir.join("preprocessor_config.json");
        let preprocess = if pp.is_file() {
            crate::io::read_json::<ImageProcessorConfig>(&pp)?.to_preprocess(&pp)?
        } else {
            let proc_path = dir.join("processor_config.json");
            let v: serde_json::Value = crate::io::read_json(&proc_path)?;
            let ip: ImageProcessorConfig = serde_json::from_value(v["image_processor"].clone())
                .map_err(|e| Error::Config {
                    path: proc_path.clone(),
                    msg: format!("image_processor: {e}"),
                })?;
            ip.to_preprocess(&proc_path)?
        };
        let mut eos_ids = model.config.text_config.eos_ids();
        let gen = dir.join("generation_config.json");
        if gen.is_file() {
            let g: serde_json::Value = crate::io::read_json(&gen)?;
            match &g["eos_token_id"] {
                serde_json::Value::Number(n) => eos_ids.extend(n.as_u64().map(|n| n as u32)),
                serde_json::Value::Array(a) => {
                    eos_ids.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
                }
                _ => {}
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Ok(Self {
            model,
            tokenizer,
            template,
            preprocess,
            eos_ids,
            device: device.clone(),
        })
    }

    /// The prompt's token ids (image placeholders expanded) for a user
    /// turn with `n_images` images before `question`.
    pub fn prompt_ids(
        &self,
        question: &str,
        n_images: usize,
        overflow: Overflow,
        max_new_tokens: usize,
    ) -> Result<Vec<u32>> {
        let ctx = self.model.lm.config.max_position_embeddings;
        let budget = ctx.saturating_sub(max_new_tokens);
        let mut question = question.to_string();
        // BPE merges across the cut can shift a token or two: a few rounds.
        for _ in 0..4 {
            let ids = self.render(&question, n_images)?;
            if ids.len() <= budget {
                return Ok(ids);
            }
            if overflow == Overflow::Error {
                return Err(Error::Invalid(format!(
                    "the prompt is {} tokens and {max_new_tokens} new tokens are asked for, over the model's context of {ctx}; shorten the question, lower --max-new-tokens, or pass --truncate",
                    ids.len()
                )));
            }
            let q = self.tokenizer.encode_plain(&question)?;
            let excess = ids.len() - budget;
            if excess >= q.len() {
                return Err(Error::Invalid(format!(
                    "the prompt is {} tokens, over the context budget of {budget} even without the question; use fewer images or lower --max-new-tokens",
                    ids.len()
                )));
            }
            question = self.tokenizer.decode(&q[..q.len() - excess])?;
        }
        Err(Error::Invalid(
            "could not truncate the question to fit the context".into(),
        ))
    }

    fn render(&self, question: &str, n_images: usize) -> Result<Vec<u32>> {
        let mut content: Vec<serde_json::Value> = (0..n_images)
            .map(|_| serde_json::json!({"type": "image"}))
            .collect();
        content.push(serde_json::json!({"type": "text", "text": question}));
        let messages = serde_json::json!([{"role": "user", "content": content}]);
        self.chat_prompt_ids(&messages, n_images)
    }

    /// The token ids (image placeholders expanded) of a whole conversation
    /// in the HF message format — `content` a string or a list of
    /// `{"type": "text", "text": …}` / `{"type": "image"}` parts — followed
    /// by the generation prompt. `n_images` must equal the image parts.
    pub fn chat_prompt_ids(
        &self,
        messages: &serde_json::Value,
        n_images: usize,
    ) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        // As `apply_chat_template(tokenize=True)`: the template already
        // writes the special tokens it wants (a BOS would otherwise double).
        let ids = self.tokenizer.encode_plain(&text)?;
        self.model.expand_image_tokens(&ids, n_images)
    }

    /// The closed answer set `answers` (texts) as this model's tokens, for
    /// [`GenerateConfig::answer_space`].
    pub fn answer_space(&self, answers: &[String]) -> Result<crate::text::generate::AnswerSpace> {
        let mut space = crate::text::generate::AnswerSpace::new();
        for a in answers {
            space.insert(&self.tokenizer.encode_plain(a)?);
        }
        Ok(space)
    }

    /// Answers `question` about `images`; `on_text` receives the answer as
    /// it grows (new text only) and returns false to stop.
    pub fn ask(
        &self,
        images: &[RgbImage],
        question: &str,
        cfg: &GenerateConfig,
        overflow: Overflow,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Answer> {
        let ids = self.prompt_ids(question, images.len(), overflow, cfg.max_new_tokens)?;
        let pixels = if images.is_empty() {
            None
        } else {
            Some(self.preprocess.batch(images, &self.device)?)
        };
        let mut cfg = cfg.clone();
        // A routed model picks its path, unless the caller fixed the depth:
        // from the question before the tower runs (the light path then
        // sees a smaller image or leaves the tower early), or from the
        // prompt's embeddings after it.
        let mut route = None;
        if cfg.layers.is_none() {
            if let Some(r) = self.model.route_question(&ids)? {
                route = Some(r);
                cfg.layers = Some(match r {
                    Route::Light => self.model.light_depth(),
                    Route::Full => self.model.lm.depth(),
                });
            }
        }
        let feats = pixels
            .as_ref()
            .map(|p| match route {
                Some(Route::Light) => self.model.light_image_features(p),
                _ => self.model.image_features(p),
            })
            .transpose()?;
        let embeds = self.model.embed_prompt_features(&ids, feats.as_ref())?;
        let context = self.model.decoder_context(feats.as_ref())?;
        if cfg.layers.is_none() {
            if let Some((r, depth)) = self.model.route(&embeds, &ids)? {
                route = Some(r);
                cfg.layers = Some(depth);
            }
        }
        let embeds = embeds.squeeze(0)?;
        cfg.stop_token_ids.extend(&self.eos_ids);
        let decode = |t: &[u32]| self.tokenizer.decode(t);
        let mut generated: Vec<u32> = Vec::new();
        let mut shown = String::new();
        let mut error = None;
        let g = generate_with_context(
            &self.model.lm,
            &embeds,
            &ids,
            context.as_ref(),
            &cfg,
            Some(&decode),
            &mut |tok| {
                generated.push(tok);
                match self.tokenizer.decode(&generated) {
                    // Emit only growth of what was shown; hold back an
                    // incomplete UTF-8 sequence, or a re-decoding that
                    // changed earlier text.
                    Ok(text)
                        if !text.ends_with('\u{fffd}')
                            && text.len() > shown.len()
                            && text.starts_with(&shown) =>
                    {
                        let more = on_text(&text[shown.len()..]);
                        shown = text;
                        more
                    }
                    Ok(_) => true,
                    Err(e) => {
                        error = Some(e);
                        false
                    }
                }
            },
        )?;
        if let Some(e) = error {
            return Err(e);
        }
        let text = self.tokenizer.decode(&g.tokens)?;
        Ok(Answer {
            text,
            tokens: g.tokens,
            finish: g.finish,
            prompt_tokens: ids.len(),
            route,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Pixels for `images`, as the model's preprocessor makes them.
    pub fn pixels(&self, images: &[RgbImage]) -> Result<Tensor> {
        Ok(self
            .preprocess
            .batch(images, &self.device)?
            .to_dtype(DType::F32)?)
    }
}
