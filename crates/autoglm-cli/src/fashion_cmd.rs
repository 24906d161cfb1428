//! `autoglm fashion train|eval`: the small Fashion-MNIST classifier that
//! recognises clothes for the knowledge-graph evaluation.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use autoglm::data::fashion_mnist::{self, CLASSES};
use autoglm::io::assets;
use autoglm::vision::pixel_mlp::{PixelMlp, PixelMlpConfig, PixelMlpTraining};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::Global;

#[derive(Subcommand)]
pub enum FashionCommand {
    /// Train the classifier on the 60,000 training images.
    Train(TrainArgs),
    /// Accuracy on the 10,000 test images.
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// Output directory (model.safetensors, config.json, train_summary.json).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Width of the hidden layer.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long, default_value = "models/fashion-mlp")]
    model: PathBuf,
}

pub fn fashion(g: &Global, cmd: FashionCommand) -> Result<()> {
    match cmd {
        FashionCommand::Train(a) => train(g, a),
        FashionCommand::Eval(a) => eval(g, a),
    }
}

fn train(g: &Global, a: TrainArgs) -> Result<()> {
    let dir = assets::dir("fashion-mnist")?;
    let data = fashion_mnist::load(&dir, "train")?;
    let test = fashion_mnist::load(&dir, "test")?;
    let t0 = Instant::now();
    let cfg = PixelMlpConfig {
        hidden: a.hidden,
        classes: CLASSES.iter().map(|c| c.to_string()).collect(),
    };
    let t = PixelMlpTraining {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
    };
    let json = g.json;
    let (model, vm) = PixelMlp::train(&data, cfg, t, &mut |epoch, loss| {
        if !json {
            eprintln!("epoch {epoch:>3}/{}  loss {loss:.4}", a.epochs);
        }
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    model.save(&vm, &a.out)?;
    let acc = model.accuracy(&test)?;
    let summary = json!({"test_accuracy": acc, "train_seconds": seconds, "training": t,
                         "train_images": data.len(), "test_images": test.len()});
    autoglm::train::write_atomic(
        &a.out.join("train_summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    if json {
        println!("{summary}");
    } else {
        println!(
            "trained in {seconds:.1} s; test accuracy {:.2} % on {} images; saved to {}",
            acc * 100.0,
            test.len(),
            a.out.display()
        );
    }
    Ok(())
}

fn eval(g: &Global, a: EvalArgs) -> Result<()> {
    let model = PixelMlp::load(&a.model, &autoglm::default_device()?)?;
    let test = fashion_mnist::load(&assets::dir("fashion-mnist")?, "test")?;
    let acc = model.accuracy(&test)?;
    if g.json {
        println!(
            "{}",
            json!({"model": a.model, "test_accuracy": acc, "images": test.len()})
        );
    } else {
        println!(
            "test accuracy {:.2} % on {} images",
            acc * 100.0,
            test.len()
        );
    }
    Ok(())
}
