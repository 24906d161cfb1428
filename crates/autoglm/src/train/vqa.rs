//! Training a VLM for visual question answering from scratch: a byte-level
//! BPE tokenizer trained on the questions, a CLIP-layout ViT, a projector and
//! a Llama-layout decoder, trained to produce the answer after a chat-template
//! prompt with the image before the question. The output directory is a HF
//! LLaVA-layout model that `ask` and `eval` load.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::{AdamWConfig, Metrics, Schedule, TrainConfig, Trainer};
use crate::assistant::{Assistant, Overflow};
use crate::config::LlavaConfig;
use crate::data::loader::epoch_order;
use crate::data::{easy_vqa, jsonl, VqaExample};
use crate::io::image::{load, ImageLimits};
use crate::io::preprocess::{CropRounding, Preprocess, Resample};
use crate::text::chat::ChatTemplate;
use crate::text::generate::GenerateConfig;
use crate::text::tokenizer::Tokenizer;
use crate::vlm::Llava;
use crate::{Error, Result};

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
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VqaTrainConfig {
    pub data: DataSource,
    /// Use at most this many training examples (0 = all).
    #[serde(default)]
    pub max_train_examples: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub projector: String,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub text_kv_heads: usize,
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
}

const SPECIAL: [&str; 6] = [
    "<pad>",
    "<s>",
    "</s>",
    "<image>",
    "<|im_start|>",
    "<|im_end|>",
];
const TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub fn load_data(src: &DataSource, split: &str) -> Result<Vec<VqaExample>> {
    let (ex, report) = match src {
        DataSource::EasyVqa => easy_vqa::load(&crate::io::assets::dir("easy-vqa")?, split)?,
        DataSource::Jsonl { train, test } => {
            jsonl::load(if split == "train" { train } else { test }, false)?
        }
    };
    if !report.bad.is_empty() {
        tracing::warn!("{split}: {}", report.summary());
    }
    Ok(ex)
}

fn llava_config(c: &VqaTrainConfig, vocab: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": 3, "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu", "projector_type": c.projector, "tie_word_embeddings": true,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": c.vision_hidden,
            "intermediate_size": 4 * c.vision_hidden, "num_hidden_layers": c.vision_layers,
            "num_attention_heads": c.vision_heads, "image_size": c.image_size, "patch_size": c.patch_size,
            "hidden_act": "gelu"},
        "text_config": {"model_type": "llama", "vocab_size": vocab, "hidden_size": c.text_hidden,
            "intermediate_size": 4 * c.text_hidden, "num_hidden_layers": c.text_layers,
            "num_attention_heads": c.text_heads, "num_key_value_heads": c.text_kv_heads,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 5, "pad_token_id": 0}
    })
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
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut train = load_data(&c.data, "train")?;
    if c.max_train_examples > 0 {
        train.truncate(c.max_train_examples);
    }
    if train.is_empty() {
        return Err(Error::Invalid("no training examples".into()));
    }
    write(
        &out.join("train_config.json"),
        &serde_json::to_string_pretty(c).unwrap_or_default(),
    )?;
    // Tokenizer, template and processor: what `ask` loads.
    let tok_path = out.join("tokenizer.json");
    if !(resume && tok_path.exists()) {
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
    write(&out.join("chat_template.jinja"), TEMPLATE)?;
    write(
        &out.join("tokenizer_config.json"),
        &serde_json::json!({"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>"})
            .to_string(),
    )?;
    let pre = Preprocess {
        shortest_edge: c.image_size as u32,
        resample: Resample::Bicubic,
        crop: (c.image_size as u32, c.image_size as u32),
        crop_rounding: CropRounding::Floor,
        mean: [0.5; 3],
        std: [0.5; 3],
    };
    write(
        &out.join("preprocessor_config.json"),
        &serde_json::json!({"size": {"shortest_edge": c.image_size}, "crop_size": {"height": c.image_size, "width": c.image_size},
            "resample": 3, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
        .to_string(),
    )?;
    let cfg_json = llava_config(c, vocab);
    write(
        &out.join("config.json"),
        &serde_json::to_string_pretty(&cfg_json).unwrap_or_default(),
    )?;
    let cfg: LlavaConfig =
        serde_json::from_value(cfg_json).map_err(|e| Error::Invalid(e.to_string()))?;
    cfg.validate(&out.join("config.json"))?;

    let vm = VarMap::new();
    let model = Llava::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg)?;
    let template = ChatTemplate::new(TEMPLATE, "<s>", "<|im_end|>")?;
    let end = tokenizer
        .token_id("<|im_end|>")
        .ok_or_else(|| Error::Invalid("tokenizer lacks <|im_end|>".into()))?;
    // Prompt and target ids of one example.
    let encode = |e: &VqaExample| -> Result<(Vec<u32>, Vec<u32>)> {
        let msgs = serde_json::json!([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e.question}]}]);
        let prompt = model
            .expand_image_tokens(&tokenizer.encode_plain(&template.render(&msgs, true)?)?, 1)?;
        let mut answer = tokenizer.encode_plain(&e.answer)?;
        answer.push(end);
        Ok((prompt, answer))
    };
    let loss_of = |e: &VqaExample| -> Result<Tensor> {
        let (prompt, answer) = encode(e)?;
        let img = load(&e.image, ImageLimits::default())?;
        let px = pre
            .normalize(&pre.resize_crop(&img)?, &Device::Cpu)?
            .unsqueeze(0)?;
        let mut ids = prompt.clone();
        ids.extend(&answer[..answer.len() - 1]);
        let logits = model
            .forward(&ids, Some(&px), &mut model.lm.new_cache())?
            .squeeze(0)?;
        // Teacher forcing: position p predicts ids[p + 1]; score the answer.
        let first = prompt.len() - 1;
        let pred = logits.narrow(0, first, answer.len())?;
        Ok(candle_nn::loss::cross_entropy(
            &pred,
            &Tensor::new(answer.as_slice(), &Device::Cpu)?,
        )?)
    };
    let tc = TrainConfig {
        steps: c.steps,
        grad_accum: 1,
        schedule: Schedule {
            peak_lr: c.peak_lr,
            warmup_steps: c.warmup_steps,
            total_steps: c.steps,
            final_fraction: 0.05,
        },
        adamw: AdamWConfig::default(),
        clip_norm: c.clip_norm,
        freeze: Vec::new(),
        eval_every: c.eval_every,
        checkpoint_every: c.checkpoint_every,
        seed: c.seed,
    };
    let mut trainer = Trainer::new(&vm, tc, out)?;
    if resume && trainer.resume(&vm)? {
        tracing::info!("resumed at step {}", trainer.step);
    }
    let per_epoch = train.len().div_ceil(c.batch_size).max(1);
    let mut loss = |step: usize, _micro: usize| -> Result<Tensor> {
        let order = epoch_order(train.len(), c.seed, (step / per_epoch) as u64, true);
        let start = (step % per_epoch) * c.batch_size;
        let idx = &order[start..(start + c.batch_size).min(order.len())];
        let losses = idx
            .iter()
            .map(|&i| loss_of(&train[i]))
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::stack(&losses, 0)?.sum_all()? / losses.len() as f64)?)
    };
    trainer.run(
        &vm,
        &mut loss,
        &mut |_| Ok(serde_json::Value::Null),
        on_step,
    )?;
    let tmp = out.join("model.safetensors.tmp");
    vm.save(&tmp)?;
    std::fs::rename(&tmp, out.join("model.safetensors")).map_err(|e| Error::io(out, e))?;
    Ok(())
}

/// Exact-match accuracy of a model on examples, overall and per answer kind
/// (yes/no, color, shape, other).
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub examples: usize,
    pub accuracy: f64,
    pub per_type: std::collections::BTreeMap<String, (usize, f64)>,
}

pub fn answer_kind(answer: &str) -> &'static str {
    match answer {
        "yes" | "no" => "yes/no",
        "red" | "green" | "blue" | "black" | "gray" | "teal" | "brown" | "yellow" => "color",
        "circle" | "rectangle" | "triangle" => "shape",
        _ => "other",
    }
}

pub fn evaluate(model_dir: &Path, examples: &[VqaExample], device: &Device) -> Result<EvalReport> {
    let a = Assistant::load(model_dir, device)?;
    let cfg = GenerateConfig {
        max_new_tokens: 8,
        ..GenerateConfig::default()
    };
    let mut per: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let mut correct = 0;
    for e in examples {
        let img = load(&e.image, ImageLimits::default())?;
        let ans = a.ask(&[img], &e.question, &cfg, Overflow::Error, &mut |_| true)?;
        let ok = ans.text.trim() == e.answer.trim();
        correct += usize::from(ok);
        let entry = per.entry(answer_kind(&e.answer).to_string()).or_default();
        entry.0 += 1;
        entry.1 += usize::from(ok);
    }
    let n = examples.len().max(1);
    Ok(EvalReport {
        examples: examples.len(),
        accuracy: correct as f64 / n as f64,
        per_type: per
            .into_iter()
            .map(|(k, (t, c))| (k, (t, c as f64 / t.max(1) as f64)))
            .collect(),
    })
}
