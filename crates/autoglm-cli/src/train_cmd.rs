//! `autoglm train` and `autoglm eval`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use autoglm::train::vqa::{evaluate, load_data, train_vqa, DataSource, VqaTrainConfig};
use clap::Args;
use serde_json::json;

use crate::Global;

#[derive(Args)]
pub struct TrainArgs {
    /// Training configuration (JSON; see `autoglm::train::vqa::VqaTrainConfig`).
    #[arg(long)]
    config: PathBuf,
    /// Output model directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Continue from OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
}

pub fn train(g: &Global, a: TrainArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let cfg: VqaTrainConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid training config", a.config.display()))?;
    let json = g.json;
    train_vqa(&cfg, &a.out, a.resume, &mut |m| {
        if !json {
            eprintln!(
                "step {:>6}/{}  loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} s",
                m.step, cfg.steps, m.loss, m.lr, m.grad_norm, m.seconds
            );
        }
    })?;
    if json {
        println!("{}", json!({"model": a.out, "steps": cfg.steps}));
    } else {
        println!("model written to {}", a.out.display());
    }
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// The model directory.
    #[arg(long)]
    model: PathBuf,
    /// `easy-vqa`, or a JSON-lines file of {"image", "question", "answer"}.
    #[arg(long, default_value = "easy-vqa")]
    data: String,
    /// Split of easy-VQA.
    #[arg(long, default_value = "test")]
    split: String,
    /// Evaluate only the first N examples (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
}

pub fn eval(g: &Global, a: EvalArgs) -> Result<()> {
    let mut ex = if a.data == "easy-vqa" {
        load_data(&DataSource::EasyVqa, &a.split)?
    } else {
        let p = PathBuf::from(&a.data);
        load_data(
            &DataSource::Jsonl {
                train: p.clone(),
                test: p,
            },
            "test",
        )?
    };
    if a.limit > 0 {
        ex.truncate(a.limit);
    }
    let dev = autoglm::default_device()?;
    let r = evaluate(&a.model, &ex, &dev)?;
    if g.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "exact match: {:.2}% on {} examples",
            r.accuracy * 100.0,
            r.examples
        );
        for (k, (n, acc)) in &r.per_type {
            println!("  {k:<8} {:>6.2}%  ({n})", acc * 100.0);
        }
    }
    Ok(())
}
