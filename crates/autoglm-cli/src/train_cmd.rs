//! `autoglm train` and `autoglm eval`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use autoglm::train::baseline::{
    evaluate_baseline, is_baseline, train_baseline, BaselineTrainConfig,
};
use autoglm::train::eval::EvalOptions;
use autoglm::train::vqa::{evaluate, load_data, train_vqa, DataSource, VqaTrainConfig};
use autoglm::train::Metrics;
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
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", a.config.display()))?;
    let invalid = || format!("{}: not a valid training config", a.config.display());
    let (steps, batch_size) = if value.get("model").is_some() {
        // `"model": "cnn-lstm"`: the CNN + LSTM baseline (no decoder).
        let cfg: BaselineTrainConfig = serde_json::from_value(value).with_context(invalid)?;
        let mut log = progress(cfg.steps, cfg.batch_size, g.json);
        train_baseline(&cfg, &a.out, a.resume, &mut log)?;
        (cfg.steps, cfg.batch_size)
    } else {
        let cfg: VqaTrainConfig = serde_json::from_value(value).with_context(invalid)?;
        let mut log = progress(cfg.steps, cfg.batch_size, g.json);
        train_vqa(&cfg, &a.out, a.resume, &mut log)?;
        (cfg.steps, cfg.batch_size)
    };
    if g.json {
        println!(
            "{}",
            json!({"model": a.out, "steps": steps, "batch_size": batch_size})
        );
    } else {
        println!("model written to {}", a.out.display());
    }
    Ok(())
}

/// Reports each training step: a progress bar on a terminal, a log line
/// now and then without one, nothing with `--json`.
fn progress(steps: usize, batch_size: usize, json: bool) -> impl FnMut(&Metrics) {
    let bar = progress_bar(steps as u64, json);
    // Without a terminal the bar draws nothing: log a line now and then.
    let log_every = if bar.is_hidden() && !json {
        (steps / 100).max(1)
    } else {
        usize::MAX
    };
    let mut first: Option<(usize, f64)> = None;
    move |m: &Metrics| {
        // Throughput since the first step this process ran (resume-aware).
        let (s0, t0) = *first.get_or_insert((m.step - 1, 0.0));
        let rate = ((m.step - s0) * batch_size) as f64 / (m.seconds - t0).max(1e-9);
        let eval = m
            .eval
            .as_ref()
            .and_then(|e| e["held_out_accuracy"].as_f64())
            .map(|a| format!("  held-out {:.2}%", a * 100.0))
            .unwrap_or_default();
        bar.set_position(m.step as u64);
        bar.set_message(format!("loss {:.4}  {rate:.0} samples/s", m.loss));
        if !eval.is_empty() {
            bar.println(format!("step {}{eval}", m.step));
        }
        if m.step % log_every == 0 || (!eval.is_empty() && bar.is_hidden() && !json) {
            eprintln!(
                "step {:>6}/{}  loss {:.4}  lr {:.2e}  |g| {:.3}  {rate:.0} samples/s  {:.0} s{eval}",
                m.step, steps, m.loss, m.lr, m.grad_norm, m.seconds
            );
        }
        if m.step == steps {
            bar.finish_and_clear();
        }
    }
}

fn progress_bar(steps: u64, json: bool) -> indicatif::ProgressBar {
    if json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

#[derive(Args)]
pub struct EvalArgs {
    /// The model directory (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// `easy-vqa`, or a JSON-lines file of {"image", "question", "answer"}.
    #[arg(long, default_value = "easy-vqa")]
    data: String,
    /// Split of easy-VQA.
    #[arg(long, default_value = "test")]
    split: String,
    /// Evaluate only the first N examples (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Also draw the confusion matrix of the answers into this PNG.
    #[arg(long)]
    confusion: Option<PathBuf>,
    /// Restrict answers as the knowledge-graph reader's are: yes, no, or a
    /// phrase of the prompt's Seen and Facts lines (`ask --kg` does this).
    #[arg(long)]
    kg_answers: bool,
    /// A routed model takes the full path for every input (to compare
    /// with the router on).
    #[arg(long)]
    router_off: bool,
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
    let model = crate::ask::model_dir(&a.model)?;
    let kg_answers = autoglm::kg::qa::reader_answers;
    let opts = EvalOptions {
        answers: a.kg_answers.then_some(&kg_answers as _),
        router_off: a.router_off,
    };
    let r = if is_baseline(&model) {
        if a.kg_answers || a.router_off {
            anyhow::bail!(
                "{} is the CNN + LSTM baseline: it picks from its training answers and has no router; drop --kg-answers and --router-off",
                model.display()
            );
        }
        evaluate_baseline(&model, &ex, &dev)?
    } else {
        evaluate(&model, &ex, &dev, opts)?
    };
    let plotted = a.confusion.as_ref().map(|p| (p, r.confusion.plot(p)));
    if let Some((_, Err(e))) = &plotted {
        eprintln!("warning: no confusion matrix: {e}");
    }
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
        let l = r.latency_ms;
        println!(
            "latency {:.1} ms mean, {:.1} ms p95; {:.1} examples/s",
            l.mean, l.p95, r.throughput
        );
        if let Some(c) = r.routes {
            println!(
                "router: {} light ({:.2}% right), {} full ({:.2}% right)",
                c.light,
                c.light_accuracy * 100.0,
                c.full,
                c.full_accuracy * 100.0
            );
        }
        println!("({} with {}, {:.0} s)", a.split, model.display(), r.seconds);
        if let Some((p, Ok(()))) = &plotted {
            println!("confusion matrix: {}", p.display());
        }
    }
    Ok(())
}
