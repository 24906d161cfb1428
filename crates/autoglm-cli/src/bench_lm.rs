//! `autoglm bench lm`: prefill and decode speed of a ~100M-parameter
//! Llama-layout decoder, and the end-to-end latency of one `ask` with a
//! 224×224 image (CLIP ViT-B/32-size tower), beside transformers on the same
//! random weights, inputs and threads, measured interleaved. Decode is also
//! set against the memory-bandwidth bound: every weight is read once per
//! token.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use autoglm::assistant::{Assistant, Overflow};
use autoglm::config::LlavaConfig;
use autoglm::text::generate::GenerateConfig;
use autoglm::text::llama::Positions;
use autoglm::vlm::Llava;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use serde_json::json;

use crate::bench::{interleave, time_it, TorchServer, ROUNDS};
use crate::Global;

#[derive(Args)]
pub struct LmArgs {
    /// A Python interpreter with torch and transformers; when given, PyTorch
    /// is measured on the same model in the same run.
    #[arg(long)]
    python: Option<PathBuf>,
    /// The PyTorch side's script.
    #[arg(long, default_value = "tools/reference/bench_lm.py")]
    script: PathBuf,
    /// Seconds spent timing each case (split over 3 interleaved rounds).
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
}

fn config() -> serde_json::Value {
    json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": 3,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": true,
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 512
        },
        "text_config": {
            "model_type": "llama", "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
            "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 1, "pad_token_id": 0
        }
    })
}

/// Writes the random checkpoint with a tokenizer, chat template and
/// processor config that both sides load.
fn write_model(dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir)?;
    let cfg_json = config();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg_json)?,
    )?;
    let cfg: LlavaConfig = serde_json::from_value(cfg_json)?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    Llava::new(vb, &cfg)?;
    // Small random weights keep activations finite through 12 layers.
    for v in vm.all_vars() {
        let t = (Tensor::randn(0f32, 0.02, v.shape(), &Device::Cpu)? + v.as_tensor())?;
        v.set(&t)?;
    }
    let params: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    vm.save(dir.join("model.safetensors"))?;
    std::fs::write(
        dir.join("tokenizer.json"),
        include_str!("../../../tests/fixtures/llava-tiny-llama/tokenizer.json"),
    )?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        include_str!("../../../tests/fixtures/llava-tiny-llama/tokenizer_config.json"),
    )?;
    std::fs::write(
        dir.join("chat_template.jinja"),
        include_str!("../../../tests/fixtures/llava-tiny-llama/chat_template.jinja"),
    )?;
    let mut proc: serde_json::Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/llava-tiny-llama/processor_config.json"
    ))?;
    proc["image_processor"]["size"] = json!({"shortest_edge": 224});
    proc["image_processor"]["crop_size"] = json!({"height": 224, "width": 224});
    proc["patch_size"] = json!(32);
    std::fs::write(
        dir.join("processor_config.json"),
        serde_json::to_string_pretty(&proc)?,
    )?;
    Ok(params)
}

/// Read bandwidth of this machine, GB/s: summing a 512 MB buffer on every
/// thread, 8 independent lanes per thread so that the adds vectorise and the
/// memory, not the arithmetic, is the limit.
fn memory_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 128 * 1024 * 1024;
    let buf: Vec<f32> = (0..n).map(|i| (i % 1024) as f32).collect();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let s: f32 = buf
            .par_chunks(1 << 20)
            .map(|c| {
                let mut acc = [0f32; 8];
                for x in c.chunks_exact(8) {
                    for (a, v) in acc.iter_mut().zip(x) {
                        *a += v;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best / 1e9
}

pub fn lm(g: &Global, a: LmArgs) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let dir = std::env::temp_dir().join(format!("autoglm-bench-lm-{}", std::process::id()));
    eprintln!(
        "writing a random ~190M-parameter LLaVA (ViT-B/32 tower + 100M Llama) to {}…",
        dir.display()
    );
    let params = write_model(&dir)?;
    let image = autoglm::io::assets::dir("photos")?.join("chelsea.png");
    let dev = Device::Cpu;
    let assistant = Assistant::load(&dir, &dev).context("loading the benchmark model")?;
    let lm = &assistant.model.lm;
    let lm_params = {
        let c = &lm.config;
        let (h, i, l) = (c.hidden_size, c.intermediate_size, c.num_hidden_layers);
        let kv = c.kv_heads() * c.head_dim();
        c.vocab_size * h + l * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    };
    let img = autoglm::io::image::load(&image, autoglm::io::image::ImageLimits::default())?;
    let long: Vec<u32> = (0..128u32).map(|i| (5 + i) % 300 + 5).collect();
    let short = long[..16].to_vec();
    let run_ours = |case: usize, secs: f64| -> Result<f64> {
        match case {
            0 => time_it(secs, || {
                let ids = Tensor::new(long.as_slice(), &dev)?.unsqueeze(0)?;
                lm.forward(&ids, &mut lm.new_cache())?;
                Ok(())
            }),
            1 => {
                // Per token: 64 greedy steps after a 16-token prompt.
                let mut per_token = Vec::new();
                time_it(secs, || {
                    let mut cache = lm.new_cache();
                    let ids = Tensor::new(short.as_slice(), &dev)?.unsqueeze(0)?;
                    let logits = lm.forward(&ids, &mut cache)?;
                    let mut next = logits.narrow(1, 15, 1)?.argmax(D::Minus1)?;
                    let t = Instant::now();
                    for step in 0..64 {
                        let pos = Positions::contiguous(1, 1, 16 + step, &dev)?;
                        let h = lm.forward_embeds(&lm.embed(&next)?, &pos, &mut cache)?;
                        next = lm.logits(&h)?.argmax(D::Minus1)?;
                    }
                    per_token.push(t.elapsed().as_secs_f64() / 64.0);
                    Ok(())
                })?;
                per_token.sort_by(f64::total_cmp);
                Ok(per_token[per_token.len() / 2])
            }
            _ => time_it(secs, || {
                let cfg = GenerateConfig {
                    max_new_tokens: 16,
                    ..GenerateConfig::default()
                };
                assistant.ask(
                    std::slice::from_ref(&img),
                    "what color is the shape?",
                    &cfg,
                    Overflow::Error,
                    &mut |_| true,
                )?;
                Ok(())
            }),
        }
    };
    let mut torch = match &a.python {
        None => None,
        Some(py) => {
            let args = vec![
                "--dir".to_string(),
                dir.to_string_lossy().into_owned(),
                "--image".into(),
                image.to_string_lossy().into_owned(),
                "--threads".into(),
                threads.to_string(),
            ];
            Some(TorchServer::spawn(py, &a.script, &args, dir.clone())?)
        }
    };
    let keys = ["prefill", "decode", "ask"];
    let timed = interleave(&keys, a.seconds, run_ours, torch.as_mut())?;
    let info = torch.as_ref().map(|t| t.info.clone());
    drop(torch);
    let _ = std::fs::remove_dir_all(&dir);
    let bw = memory_bandwidth();
    let weight_bytes = (lm_params * 4) as f64;
    let bound = bw * 1e9 / weight_bytes; // tokens/s if decode only streamed the weights
    let rows: Vec<_> = (0..3)
        .map(|i| {
            let (o, t, ratio) = (timed.ours[i], timed.torch[i], timed.ratio[i]);
            let (ours_v, torch_v, unit) = match i {
                0 => (128.0 / o, t.map(|t| 128.0 / t), "prefill tokens/s"),
                1 => (1.0 / o, t.map(|t| 1.0 / t), "decode tokens/s"),
                _ => (
                    o * 1e3,
                    t.map(|t| t * 1e3),
                    "ask latency ms (224² image, 16 new tokens)",
                ),
            };
            json!({"case": keys[i], "unit": unit, "ours": ours_v, "torch": torch_v, "ratio": ratio})
        })
        .collect();
    let decode_frac = rows[1]["ours"].as_f64().unwrap_or(0.0) / bound;
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "threads": threads, "params_total": params, "params_lm": lm_params,
                "memory_bandwidth_gbs": bw, "decode_bound_tokens_per_s": bound,
                "decode_fraction_of_bound": decode_frac, "torch": info, "results": rows
            }))?
        );
        return Ok(());
    }
    println!(
        "threads: {threads}; model: {:.0}M parameters ({:.0}M in the LM); read bandwidth {bw:.1} GB/s",
        params as f64 / 1e6,
        lm_params as f64 / 1e6
    );
    if let Some(t) = &info {
        println!(
            "PyTorch {} on {} threads",
            t["torch"].as_str().unwrap_or("?"),
            t["threads"]
        );
    }
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "case", "ours", "PyTorch", "ratio"
    );
    for r in &rows {
        let f = |v: &serde_json::Value| {
            v.as_f64()
                .map(|x| format!("{x:.1}"))
                .unwrap_or_else(|| "—".into())
        };
        println!(
            "{:<44} {:>10} {:>10} {:>8}",
            r["unit"].as_str().unwrap_or(""),
            f(&r["ours"]),
            f(&r["torch"]),
            r["ratio"]
                .as_f64()
                .map(|x| format!("{x:.2}×"))
                .unwrap_or_else(|| "—".into())
        );
    }
    println!(
        "decode bound (f32 weights {:.0} MB read per token at {bw:.1} GB/s): {bound:.1} tokens/s; ours reaches {:.0} %",
        weight_bytes / 1e6,
        decode_frac * 100.0
    );
    println!("ratio: ours faster when > 1 (latency: PyTorch's / ours); median of {ROUNDS} interleaved rounds");
    Ok(())
}
