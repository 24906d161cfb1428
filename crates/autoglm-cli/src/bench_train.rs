//! `autoglm bench train`: training throughput (samples/s) of a model's
//! architecture on real easy-VQA batches — forward, backward, gradient
//! clipping and an AdamW step — beside the same architecture in
//! transformers (`LlavaForConditionalGeneration`) on the same batch and
//! threads, measured interleaved.

use std::path::PathBuf;

use anyhow::{Context, Result};
use autoglm::assistant::{Assistant, Overflow};
use autoglm::train::vqa::{answer_logits, init_weights, load_data, DataSource, Encoded, Images};
use autoglm::train::{clip_grad_norm, named_vars, AdamW, AdamWConfig};
use autoglm::vlm::Llava;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use serde_json::json;

use crate::bench::{interleave, time_it, TorchServer, ROUNDS};
use crate::Global;

#[derive(Args)]
pub struct TrainBenchArgs {
    /// The model whose architecture is trained (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Examples per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// A Python interpreter with torch and transformers; when given, PyTorch
    /// is measured on the same batch in the same run.
    #[arg(long)]
    python: Option<PathBuf>,
    /// The PyTorch side's script.
    #[arg(long, default_value = "tools/reference/bench_train.py")]
    script: PathBuf,
    /// Seconds spent timing (split over 3 interleaved rounds).
    #[arg(long, default_value_t = 15.0)]
    seconds: f64,
}

pub fn train(g: &Global, a: TrainBenchArgs) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let dir = crate::ask::model_dir(&a.model)?;
    let dev = Device::Cpu;
    // The tokenizer, template and preprocessing of the model; fresh weights.
    let asst = Assistant::load(&dir, &dev).context("loading the model")?;
    let cfg = asst.model.config.clone();
    if cfg.vision_config.is_efficientnet() {
        anyhow::bail!(
            "{}: bench train measures a ViT model (its EfficientNet tower is frozen, and transformers has no LLaVA with it); train a ViT variant, e.g. `\"vision\": \"vit\"` in the training config",
            dir.display()
        );
    }
    if a.python.is_some() && cfg.projector_type != "mlp" {
        anyhow::bail!(
            "{}: projector `{}`; transformers' LLaVA has only the `mlp` projector, so the PyTorch side would train another model",
            dir.display(),
            cfg.projector_type
        );
    }
    let vm = VarMap::new();
    let model = Llava::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg)?;
    init_weights(&vm, 0, None)?;
    let vars = named_vars(&vm, &[])?;
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let plain: Vec<_> = vars.iter().map(|(_, v)| v.clone()).collect();

    // The first `batch` training examples of easy-VQA.
    let examples: Vec<_> = load_data(&DataSource::EasyVqa, "train")?
        .into_iter()
        .take(a.batch)
        .collect();
    let end = asst
        .tokenizer
        .token_id("<|im_end|>")
        .or_else(|| asst.eos_ids.first().copied())
        .context("the model's tokenizer has no end token")?;
    let rows = examples
        .iter()
        .map(|e| {
            let mut answer = asst.tokenizer.encode_plain(&e.answer)?;
            answer.push(end);
            Ok(Encoded {
                prompt: asst.prompt_ids(&e.question, 1, Overflow::Error, 8)?,
                answer,
            })
        })
        .collect::<autoglm::Result<Vec<_>>>()?;
    let images = examples
        .iter()
        .map(|e| autoglm::io::image::load(&e.image, autoglm::io::image::ImageLimits::default()))
        .collect::<autoglm::Result<Vec<_>>>()?;
    let pixels = asst.pixels(&images)?;
    let refs: Vec<&Encoded> = rows.iter().collect();
    let step = std::cell::RefCell::new(|| -> Result<()> {
        let (logits, targets) = answer_logits(&model, &refs, Images::Pixels(&pixels))?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        let mut grads = loss.backward()?;
        clip_grad_norm(&mut grads, &plain, 1.0)?;
        opt.step(&grads, 1e-3)?;
        Ok(())
    });

    let mut torch = match &a.python {
        None => None,
        Some(py) => {
            let tmp =
                std::env::temp_dir().join(format!("autoglm-bench-train-{}", std::process::id()));
            std::fs::create_dir_all(&tmp)?;
            write_batch(&tmp, &rows, &pixels)?;
            let args = vec![
                "--model".to_string(),
                dir.to_string_lossy().into_owned(),
                "--batch".into(),
                tmp.join("batch.safetensors").to_string_lossy().into_owned(),
                "--threads".into(),
                threads.to_string(),
            ];
            Some(TorchServer::spawn(py, &a.script, &args, tmp)?)
        }
    };
    let timed = interleave(
        &["step"],
        a.seconds,
        |_, secs| time_it(secs, || (step.borrow_mut())()),
        torch.as_mut(),
    )?;
    let info = torch.as_ref().map(|t| t.info.clone());
    drop(torch);
    let ours = a.batch as f64 / timed.ours[0];
    let theirs = timed.torch[0].map(|t| a.batch as f64 / t);
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": dir, "threads": threads, "params": params, "batch": a.batch,
                "samples_per_s": {"ours": ours, "torch": theirs}, "ratio": timed.ratio[0],
                "torch": info,
            }))?
        );
        return Ok(());
    }
    println!(
        "{} ({:.2}M parameters), batch {}, {threads} threads",
        dir.display(),
        params as f64 / 1e6,
        a.batch
    );
    if let Some(t) = &info {
        println!(
            "PyTorch {} on {} threads",
            t["torch"].as_str().unwrap_or("?"),
            t["threads"]
        );
    }
    println!("training samples/s: ours {ours:.1}");
    if let (Some(t), Some(r)) = (theirs, timed.ratio[0]) {
        println!("                    PyTorch {t:.1}; ours / PyTorch {r:.2}× (median of {ROUNDS} interleaved rounds)");
    }
    Ok(())
}

/// The batch as PyTorch's `LlavaForConditionalGeneration` takes it: ids
/// (prompt + answer, right-padded with 0), labels (-100 but on the answer,
/// which transformers shifts), and the pixels.
fn write_batch(dir: &std::path::Path, rows: &[Encoded], pixels: &Tensor) -> Result<()> {
    let t = rows
        .iter()
        .map(|r| r.prompt.len() + r.answer.len())
        .max()
        .unwrap_or(0);
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    for r in rows {
        let n = r.prompt.len() + r.answer.len();
        ids.extend(r.prompt.iter().chain(&r.answer).map(|&i| i as i64));
        ids.extend(std::iter::repeat_n(0i64, t - n));
        labels.extend(std::iter::repeat_n(-100i64, r.prompt.len()));
        labels.extend(r.answer.iter().map(|&i| i as i64));
        labels.extend(std::iter::repeat_n(-100i64, t - n));
    }
    let b = rows.len();
    let tensors = std::collections::HashMap::from([
        (
            "input_ids".to_string(),
            Tensor::from_vec(ids, (b, t), &Device::Cpu)?,
        ),
        (
            "labels".to_string(),
            Tensor::from_vec(labels, (b, t), &Device::Cpu)?,
        ),
        ("pixel_values".to_string(), pixels.clone()),
    ]);
    candle_core::safetensors::save(&tensors, dir.join("batch.safetensors"))?;
    Ok(())
}
