//! The CNN + LSTM baseline of visual question answering: a convolutional
//! image encoder trained from scratch, a one-layer LSTM over the question's
//! words, and an MLP over both that picks the answer among the training
//! set's answers. It is the relation-network paper's CNN + MLP with an LSTM
//! question encoder (Santoro et al. 2017; the CNN + LSTM of Johnson et al.
//! 2017): no decoder, no attention — the reference point for the VLM's
//! fusion choices.
//!
//! With `"head": "relation"` the MLP reads, instead of the flattened image
//! and the question, a relation network over every pair of the CNN's cells
//! with the question (the paper's CNN + RN, with its LSTM; see
//! [`crate::fusion::relation`]).
//!
//! `autoglm train` takes it from a config with `"model": "cnn-lstm"`; the
//! output directory (`config.json` with `model_type` [`MODEL_TYPE`],
//! `model.safetensors`) is what `autoglm eval` loads.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{embedding, Embedding, Module, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::eval::EvalReport;
use super::images::ImageCache;
use super::vqa::{init_weights, load_data, split_by_image, DataSource};
use super::{Metrics, TrainConfig, Trainer};
use crate::data::loader::epoch_order;
use crate::data::VqaExample;
use crate::fusion::relation::RelationNetwork;
use crate::io::image::{load, ImageLimits};
use crate::io::preprocess::{CropRounding, Preprocess, Resample};
use crate::nn::{linear_b, Linear};
use crate::text::lstm::Lstm;
use crate::vision::convnet::{ConvNet, ConvNetConfig};
use crate::{Error, Result};

/// `model_type` of a saved baseline.
pub const MODEL_TYPE: &str = "cnn_lstm_vqa";

/// The value of `"model"` that selects this trainer.
pub const MODEL_NAME: &str = "cnn-lstm";

fn d128() -> usize {
    128
}

fn d256() -> usize {
    256
}

fn d4() -> usize {
    4
}

/// What reads the image and the question before the answer MLP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Head {
    /// The flattened image cells beside the question (the paper's CNN + MLP).
    #[default]
    Mlp,
    /// A relation network over every pair of cells with the question,
    /// summed (the paper's CNN + RN).
    Relation,
}

/// A training run of the baseline. An unknown field is an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineTrainConfig {
    /// Always `cnn-lstm`.
    pub model: String,
    pub data: DataSource,
    /// Side of the square input (a multiple of 2^`vision_layers`).
    pub image_size: usize,
    /// Channels of each convolution.
    pub vision_hidden: usize,
    /// Stride-2 3×3 convolutions.
    pub vision_layers: usize,
    /// Instance-norm each convolution's output (per image and channel,
    /// before the ReLU) in place of its bias.
    #[serde(default)]
    pub vision_norm: bool,
    #[serde(default = "d128")]
    pub word_dim: usize,
    #[serde(default = "d128")]
    pub lstm_hidden: usize,
    #[serde(default = "d256")]
    pub mlp_hidden: usize,
    #[serde(default)]
    pub head: Head,
    /// Width of the relation network's `g` (with `"head": "relation"`).
    #[serde(default = "d256")]
    pub relation_hidden: usize,
    /// Layers of `g` (with `"head": "relation"`).
    #[serde(default = "d4")]
    pub relation_layers: usize,
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
    /// The questions of this many images (seeded) are held out of training
    /// and measured during it.
    #[serde(default)]
    pub held_out_images: usize,
    /// Train on the first N examples only (0 = all).
    #[serde(default)]
    pub max_train_examples: usize,
}

/// The encoder that the `vision_*` fields and `image_size` describe, in
/// the training config and in the saved one alike.
fn conv_config(channels: usize, layers: usize, image_size: usize, norm: bool) -> ConvNetConfig {
    ConvNetConfig {
        norm,
        ..ConvNetConfig::plain(channels, layers, image_size)
    }
}

impl BaselineTrainConfig {
    fn conv(&self) -> ConvNetConfig {
        conv_config(
            self.vision_hidden,
            self.vision_layers,
            self.image_size,
            self.vision_norm,
        )
    }

    /// Refuses what cannot train, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: String| -> Result<()> {
            Err(Error::Invalid(format!("training config: {field}: {why}")))
        };
        if self.model != MODEL_NAME {
            return bad("model", format!("`{}` is not `{MODEL_NAME}`", self.model));
        }
        for (field, v) in [
            ("word_dim", self.word_dim),
            ("lstm_hidden", self.lstm_hidden),
            ("mlp_hidden", self.mlp_hidden),
            ("relation_hidden", self.relation_hidden),
            ("relation_layers", self.relation_layers),
            ("steps", self.steps),
            ("batch_size", self.batch_size),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if !(self.peak_lr > 0.0 && self.peak_lr.is_finite()) {
            return bad(
                "peak_lr",
                format!("{} is not a positive rate", self.peak_lr),
            );
        }
        self.conv()
            .check()
            .or_else(|(field, why)| bad(ConvNetConfig::training_field(field), why))
    }
}

/// What `config.json` records: the sizes, the words the LSTM knows and the
/// answers the classifier picks from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineConfig {
    pub model_type: String,
    pub image_size: usize,
    pub vision_hidden: usize,
    pub vision_layers: usize,
    /// Models saved before the option have no norm.
    #[serde(default)]
    pub vision_norm: bool,
    pub word_dim: usize,
    pub lstm_hidden: usize,
    pub mlp_hidden: usize,
    /// Models saved before the relation head have the MLP head.
    #[serde(default)]
    pub head: Head,
    #[serde(default = "d256")]
    pub relation_hidden: usize,
    #[serde(default = "d4")]
    pub relation_layers: usize,
    /// Word ids are indices; 0 is every word not in the list.
    pub words: Vec<String>,
    pub answers: Vec<String>,
}

impl BaselineConfig {
    fn conv(&self) -> ConvNetConfig {
        conv_config(
            self.vision_hidden,
            self.vision_layers,
            self.image_size,
            self.vision_norm,
        )
    }

    /// The images as the encoder takes them: resized (never cropped) to
    /// the input side, bicubic, in [-1, 1].
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            shortest_edge: self.image_size as u32,
            resample: Resample::Bicubic,
            crop: (self.image_size as u32, self.image_size as u32),
            crop_rounding: CropRounding::Floor,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }
}

/// Lower-case words of a question: runs of letters and digits.
pub fn words(question: &str) -> Vec<String> {
    question
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

pub struct CnnLstm {
    cnn: ConvNet,
    embed: Embedding,
    lstm: Lstm,
    relation: Option<RelationNetwork>,
    fc1: Linear,
    fc2: Linear,
    out: Linear,
    vocab: HashMap<String, u32>,
    pub config: BaselineConfig,
}

impl CnnLstm {
    pub fn new(vb: VarBuilder, config: BaselineConfig) -> Result<Self> {
        if config.model_type != MODEL_TYPE {
            return Err(Error::Invalid(format!(
                "model_type `{}` is not the CNN + LSTM baseline (`{MODEL_TYPE}`)",
                config.model_type
            )));
        }
        if config.answers.is_empty() || config.words.is_empty() {
            return Err(Error::Invalid(
                "the baseline's config lists no answers or no words; retrain it".into(),
            ));
        }
        let conv = config.conv();
        let relation = match config.head {
            Head::Mlp => None,
            Head::Relation => Some(RelationNetwork::new(
                vb.pp("relation"),
                conv.token_width(),
                config.lstm_hidden,
                config.relation_hidden,
                config.relation_layers,
            )?),
        };
        let joint = match config.head {
            Head::Mlp => conv.tokens() * conv.token_width() + config.lstm_hidden,
            Head::Relation => config.relation_hidden,
        };
        let vocab = config
            .words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.clone(), i as u32))
            .collect();
        Ok(Self {
            cnn: ConvNet::new(vb.pp("cnn"), &conv)?,
            embed: embedding(config.words.len(), config.word_dim, vb.pp("words"))?,
            lstm: Lstm::new(vb.pp("lstm"), config.word_dim, config.lstm_hidden)?,
            relation,
            fc1: linear_b(joint, config.mlp_hidden, true, vb.pp("fc1"))?,
            fc2: linear_b(config.mlp_hidden, config.mlp_hidden, true, vb.pp("fc2"))?,
            out: linear_b(config.mlp_hidden, config.answers.len(), true, vb.pp("out"))?,
            vocab,
            config,
        })
    }

    /// Loads a directory written by the baseline's trainer.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config: BaselineConfig = crate::io::read_json(&dir.join("config.json"))?;
        let path = dir.join("model.safetensors");
        let weights = candle_core::safetensors::load(&path, device).map_err(|e| {
            Error::Invalid(format!(
                "{}: {e}; the baseline's weights are missing or damaged, retrain it",
                path.display()
            ))
        })?;
        Self::new(
            VarBuilder::from_tensors(weights, DType::F32, device),
            config,
        )
    }

    /// Word ids of a question (unknown words → 0; an empty question → [0]).
    pub fn encode(&self, question: &str) -> Vec<u32> {
        let ids: Vec<u32> = words(question)
            .iter()
            .map(|w| self.vocab.get(w).copied().unwrap_or(0))
            .collect();
        if ids.is_empty() {
            vec![0]
        } else {
            ids
        }
    }

    /// Answer logits.
    ///
    /// # Shapes
    /// `pixels`: (B, 3, S, S), B questions → (B, answers)
    pub fn logits(&self, pixels: &Tensor, questions: &[Vec<u32>]) -> Result<Tensor> {
        let b = questions.len();
        if b == 0 || pixels.dim(0)? != b || questions.iter().any(Vec::is_empty) {
            return Err(Error::Invalid(format!(
                "the baseline needs one image per question and a word in each question, got {} images and {b} questions",
                pixels.dim(0)?
            )));
        }
        let t = questions.iter().map(Vec::len).max().unwrap_or(1);
        let mut ids = vec![0u32; b * t];
        for (row, q) in questions.iter().enumerate() {
            ids[row * t..row * t + q.len()].copy_from_slice(q);
        }
        let dev = pixels.device();
        let ids = Tensor::from_vec(ids, (b, t), dev)?;
        let lengths: Vec<usize> = questions.iter().map(Vec::len).collect();
        let (_, question) = self.lstm.forward(&self.embed.forward(&ids)?, &lengths)?;
        let cells = self.cnn.forward(pixels)?; // (B, g², C + 2)
        let x = match &self.relation {
            Some(rn) => rn.forward(&cells, &question)?,
            None => Tensor::cat(&[&cells.flatten_from(1)?, &question], 1)?,
        };
        let x = self.fc1.forward(&x)?.relu()?;
        let x = self.fc2.forward(&x)?.relu()?;
        self.out.forward(&x)
    }

    /// The most likely answer to each question about its image.
    pub fn answer(&self, pixels: &Tensor, questions: &[&str]) -> Result<Vec<String>> {
        let ids: Vec<Vec<u32>> = questions.iter().map(|q| self.encode(q)).collect();
        let best = self.logits(pixels, &ids)?.argmax(1)?.to_vec1::<u32>()?;
        Ok(best
            .into_iter()
            .map(|i| self.config.answers[i as usize].clone())
            .collect())
    }
}

/// Trains the baseline into `out`: `config.json`, `model.safetensors`,
/// `train_config.json`, `metrics.jsonl`, a checkpoint that `resume`
/// continues from, and the plots.
pub fn train_baseline(
    c: &BaselineTrainConfig,
    out: &Path,
    resume: bool,
    on_step: &mut dyn FnMut(&Metrics),
) -> Result<()> {
    c.validate()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut train = load_data(&c.data, "train")?;
    if c.max_train_examples > 0 {
        train.truncate(c.max_train_examples);
    }
    let (held_out, train) = split_by_image(train, c.held_out_images, c.seed);
    if train.is_empty() {
        return Err(Error::Invalid("no training examples".into()));
    }
    // Words and answers in sorted order: the same data gives the same ids.
    let mut vocab: Vec<String> = train.iter().flat_map(|e| words(&e.question)).collect();
    vocab.sort();
    vocab.dedup();
    vocab.insert(0, "<unk>".into());
    let mut answers: Vec<String> = train.iter().map(|e| e.answer.trim().to_string()).collect();
    answers.sort();
    answers.dedup();
    let config = BaselineConfig {
        model_type: MODEL_TYPE.into(),
        image_size: c.image_size,
        vision_hidden: c.vision_hidden,
        vision_layers: c.vision_layers,
        vision_norm: c.vision_norm,
        word_dim: c.word_dim,
        lstm_hidden: c.lstm_hidden,
        mlp_hidden: c.mlp_hidden,
        head: c.head,
        relation_hidden: c.relation_hidden,
        relation_layers: c.relation_layers,
        words: vocab,
        answers,
    };
    if !resume {
        super::trainer::clear_previous_run(out)?;
    }
    let cfg_path = out.join("config.json");
    let train_cfg_path = out.join("train_config.json");
    if resume && train_cfg_path.exists() {
        // More steps continue a finished run (the schedule stretches).
        super::vqa::check_resume_config(&train_cfg_path, c)?;
    }
    let pretty = |v: serde_json::Result<String>| v.map_err(|e| Error::Invalid(e.to_string()));
    super::write_atomic(
        &train_cfg_path,
        pretty(serde_json::to_string_pretty(c))?.as_bytes(),
    )?;
    super::write_atomic(
        &cfg_path,
        pretty(serde_json::to_string_pretty(&config))?.as_bytes(),
    )?;

    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let model = CnnLstm::new(vb, config)?;
    init_weights(&vm, c.seed, None)?;
    let pre = model.config.preprocess();
    let images = ImageCache::build(train.iter().chain(&held_out), &pre)?;
    let target = |e: &VqaExample| -> u32 {
        model
            .config
            .answers
            .binary_search(&e.answer.trim().to_string())
            .map_or(0, |i| i as u32)
    };
    let train_q: Vec<Vec<u32>> = train.iter().map(|e| model.encode(&e.question)).collect();
    let train_y: Vec<u32> = train.iter().map(target).collect();
    let tc = TrainConfig {
        eval_every: c.eval_every,
        checkpoint_every: c.checkpoint_every,
        ..TrainConfig::cosine(c.steps, c.peak_lr, c.warmup_steps, c.clip_norm, c.seed)
    };
    let mut trainer = Trainer::new(&vm, tc, out)?;
    if resume && trainer.resume(&vm)? {
        tracing::info!("resumed at step {}", trainer.step);
    }
    let t_start = std::time::Instant::now();
    let n = train.len();
    let per_epoch = (n / c.batch_size).max(1);
    let loss = |step: usize, _micro: usize| -> Result<Tensor> {
        let order = epoch_order(n, c.seed, (step / per_epoch) as u64, true);
        let start = (step % per_epoch) * c.batch_size;
        let idx = &order[start..(start + c.batch_size).min(n)];
        let px = pixels(&images, idx.iter().map(|&i| &train[i].image), idx.len())?;
        let qs: Vec<Vec<u32>> = idx.iter().map(|&i| train_q[i].clone()).collect();
        let y: Vec<u32> = idx.iter().map(|&i| train_y[i]).collect();
        let logits = model.logits(&px, &qs)?;
        let y = Tensor::from_vec(y, idx.len(), &Device::Cpu)?;
        Ok(candle_nn::loss::cross_entropy(&logits, &y)?)
    };
    let mut eval = |_step: usize| -> Result<serde_json::Value> {
        let mut correct = 0;
        for chunk in held_out.chunks(64) {
            let px = pixels(&images, chunk.iter().map(|e| &e.image), chunk.len())?;
            let qs: Vec<&str> = chunk.iter().map(|e| e.question.as_str()).collect();
            for (e, a) in chunk.iter().zip(model.answer(&px, &qs)?) {
                correct += usize::from(a == e.answer.trim());
            }
        }
        Ok(serde_json::json!({
            "held_out_accuracy": correct as f64 / held_out.len().max(1) as f64,
            "examples": held_out.len(),
        }))
    };
    trainer.run(&vm, &loss, &mut eval, on_step)?;
    if let Err(e) = super::plot::plot_metrics(out) {
        tracing::warn!("no plots: {e}");
    }
    super::save_safetensors_atomic(&out.join("model.safetensors"), &super::varmap_tensors(&vm)?)?;
    let summary = serde_json::json!({
        "trainable_params": trainer.trainable(),
        "steps": c.steps,
        "batch_size": c.batch_size,
        "train_seconds": t_start.elapsed().as_secs_f64(),
        "train_examples": train.len(),
        "held_out_examples": held_out.len(),
    });
    super::write_atomic(
        &out.join("train_summary.json"),
        summary.to_string().as_bytes(),
    )?;
    Ok(())
}

/// (B, 3, S, S) decoded pixels of a batch's images.
fn pixels<'a>(
    images: &ImageCache,
    paths: impl Iterator<Item = &'a std::path::PathBuf>,
    n: usize,
) -> Result<Tensor> {
    match images.batch(paths, &vec![0; n])? {
        super::vqa::ImageBatch::Pixels(t) => Ok(t),
        _ => Err(Error::Invalid(
            "the baseline's image cache holds no pixels".into(),
        )),
    }
}

/// Asks the baseline every question (one image decoded, preprocessed and
/// classified at a time, as a request would be), over the rayon threads.
pub fn evaluate_baseline(
    model_dir: &Path,
    examples: &[VqaExample],
    device: &Device,
) -> Result<EvalReport> {
    use rayon::prelude::*;
    let t0 = std::time::Instant::now();
    let model = CnnLstm::load(model_dir, device)?;
    let pre = model.config.preprocess();
    let asked = examples
        .par_iter()
        .map(|e| {
            let t = std::time::Instant::now();
            let img = load(&e.image, ImageLimits::default())?;
            let px = pre
                .normalize(&pre.resize_crop(&img)?, device)?
                .unsqueeze(0)?;
            let answer = model.answer(&px, &[e.question.as_str()])?.remove(0);
            Ok((answer, t.elapsed().as_secs_f64() * 1e3))
        })
        .collect::<Result<Vec<_>>>()?;
    let answers: Vec<String> = asked.iter().map(|(a, _)| a.clone()).collect();
    let ms: Vec<f64> = asked.iter().map(|(_, ms)| *ms).collect();
    Ok(EvalReport::new(
        examples,
        &answers,
        &ms,
        t0.elapsed().as_secs_f64(),
        None,
    ))
}

/// Whether `dir` holds a saved baseline (its `config.json` says so).
pub fn is_baseline(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["model_type"] == MODEL_TYPE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::test_util::grad_mass;

    /// With either head, one cross-entropy step reaches every weight:
    /// the convolutions, the word embeddings, the LSTM, the relation
    /// network and the answer MLP.
    #[test]
    fn every_weight_receives_a_gradient() {
        for head in [Head::Mlp, Head::Relation] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let config = BaselineConfig {
                model_type: MODEL_TYPE.into(),
                image_size: 16,
                vision_hidden: 4,
                vision_layers: 2,
                vision_norm: head == Head::Relation,
                word_dim: 6,
                lstm_hidden: 5,
                mlp_hidden: 7,
                head,
                relation_hidden: 8,
                relation_layers: 2,
                words: ["<unk>", "what", "colour", "shape"]
                    .map(String::from)
                    .to_vec(),
                answers: ["a", "b", "c"].map(String::from).to_vec(),
            };
            let model = CnnLstm::new(vb, config).unwrap();
            init_weights(&vm, 3, None).unwrap();
            // Nonzero biases, so that no ReLU starts dead by symmetry.
            for var in vm.all_vars() {
                if var.rank() == 1 {
                    let noise = Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu).unwrap();
                    var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
                }
            }
            let px = Tensor::randn(0f32, 1.0, (3, 3, 16, 16), &Device::Cpu).unwrap();
            let qs = vec![vec![1, 2], vec![1, 3, 0], vec![3]];
            let y = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
            let loss =
                candle_nn::loss::cross_entropy(&model.logits(&px, &qs).unwrap(), &y).unwrap();
            let grads = loss.backward().unwrap();
            let data = vm.data().lock().unwrap();
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            assert!(
                names.iter().any(|n| n.starts_with("relation.")) == (head == Head::Relation),
                "{names:?}"
            );
            for name in names {
                let size = grad_mass(&grads, data[name].as_tensor())
                    .unwrap_or_else(|| panic!("{head:?}: no gradient for {name}"));
                assert!(size > 0.0, "{head:?}: a zero gradient for {name}");
            }
        }
    }
}
