//! `autoglm ask` and `autoglm caption`: answer a question about images with a
//! VLM, streaming the answer to the terminal.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use autoglm::assistant::{Assistant, Overflow};
use autoglm::text::generate::{GenerateConfig, Sampling};
use clap::Args;
use serde_json::json;

use crate::Global;

/// The project's default model, relative to the repository root.
const DEFAULT_MODEL: &str = "models/autoglm-tiny";
/// The model that answers from knowledge-graph facts (`ask --kg`).
pub(crate) const KG_READER: &str = "models/kg-reader";

#[derive(Args)]
pub struct GenArgs {
    /// A HF LLaVA-layout model directory (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long)]
    top_p: Option<f64>,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Penalise tokens already in the text (> 1 discourages repeats).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed of the sampler: the same seed gives the same answer.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the answer ends with this text (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Cut the end of the question instead of failing when the prompt is longer than the context.
    #[arg(long)]
    truncate: bool,
}

#[derive(Args)]
pub struct AskArgs {
    /// The question.
    question: String,
    /// An image to ask about (repeat for several; each is placed before the question).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    gen: GenArgs,
    /// Ground the answer in a knowledge graph (a store name such as
    /// `wordnet`, or an .nq file): the photo's ImageNet class is linked to
    /// the graph, the chain for the question retrieved, and a reader model
    /// (default models/kg-reader) answers from it.
    #[arg(long)]
    kg: Option<String>,
    /// With --kg: a WordNet id (n02123045) instead of a photo.
    #[arg(long, requires = "kg")]
    entity: Option<String>,
    /// With --kg: also print the linked words, the SPARQL, every chain's
    /// score, the rule-based answer and the reader's prompt.
    #[arg(long, requires = "kg")]
    explain: bool,
    /// With --kg: steps shown before a long is-a run is summarised.
    #[arg(long, default_value_t = 5)]
    keep: usize,
}

#[derive(Args)]
pub struct CaptionArgs {
    /// The image to describe.
    image: PathBuf,
    /// The instruction given with the image.
    #[arg(long, default_value = "Describe the image.")]
    prompt: String,
    #[command(flatten)]
    gen: GenArgs,
}

/// The model to use: the one given, else `$AUTOGLM_MODEL`, else the default
/// model of the repository this binary was built from (found from the
/// binary's own path, so the working directory does not matter).
pub(crate) fn model_dir(given: &Option<PathBuf>) -> Result<PathBuf> {
    model_dir_named(given.as_ref(), DEFAULT_MODEL)
}

/// As [`model_dir`], for the repository's model at `default` (relative to
/// the repository root); `$AUTOGLM_MODEL` counts only for the default model.
pub(crate) fn model_dir_named(given: Option<&PathBuf>, default: &str) -> Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d.clone());
    }
    if default == DEFAULT_MODEL {
        if let Some(d) = std::env::var_os("AUTOGLM_MODEL") {
            return Ok(PathBuf::from(d));
        }
    }
    let mut tried = Vec::new();
    // target/{release,debug}/autoglm → the repository root is two levels up.
    if let Ok(exe) = std::env::current_exe() {
        for root in exe.ancestors().skip(1).take(4) {
            tried.push(root.join(default));
        }
    }
    tried.push(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(default),
    );
    if let Some(d) = tried.iter().find(|d| d.join("config.json").is_file()) {
        return Ok(d.clone());
    }
    let how = if default == DEFAULT_MODEL {
        "set AUTOGLM_MODEL, or train it: autoglm train --config configs/autoglm-tiny.json --out models/autoglm-tiny"
    } else {
        "or train it as docs/benchmarks.md says"
    };
    bail!(
        "no {default} was found beside this binary ({}); pass --model DIR, {how}",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

pub fn ask(g: &Global, a: AskArgs) -> Result<()> {
    if let Some(store) = a.kg {
        if a.images.len() > 1 {
            bail!("--kg answers about one photo: pass one --image (or --entity WNID)");
        }
        if a.images.is_empty() && a.entity.is_none() {
            bail!("--kg needs the thing asked about: --image PHOTO or --entity WNID");
        }
        let reader = match &a.gen.model {
            Some(m) => m.clone(),
            None => model_dir_named(None, KG_READER)?,
        };
        return crate::kg_cmd::ask_kg(
            g,
            crate::kg_cmd::KgAsk {
                question: a.question,
                image: a.images.into_iter().next(),
                entity: a.entity,
                store,
                reader,
                keep: a.keep,
                explain: a.explain,
            },
        );
    }
    run(g, &a.gen, &a.images, &a.question)
}

pub fn caption(g: &Global, a: CaptionArgs) -> Result<()> {
    run(g, &a.gen, std::slice::from_ref(&a.image), &a.prompt)
}

fn run(g: &Global, a: &GenArgs, images: &[PathBuf], question: &str) -> Result<()> {
    let dir = model_dir(&a.model)?;
    let dev = autoglm::default_device()?;
    let t0 = Instant::now();
    let assistant = Assistant::load(&dir, &dev)?;
    let imgs = if images.is_empty() {
        Vec::new()
    } else {
        crate::commands::load_images(g, images)?
    };
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        sampling: Sampling {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
        },
        stop_token_ids: Vec::new(),
        stop_strings: a.stop.clone(),
        answer_space: None,
        layers: None,
    };
    let overflow = if a.truncate {
        Overflow::TruncateQuestion
    } else {
        Overflow::Error
    };
    let loaded = t0.elapsed();
    let t1 = Instant::now();
    let mut stdout = std::io::stdout();
    let answer = assistant.ask(&imgs, question, &cfg, overflow, &mut |piece| {
        if !g.json {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
        true
    })?;
    let secs = t1.elapsed().as_secs_f64();
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": dir,
                "answer": answer.text,
                "tokens": answer.tokens,
                "finish_reason": answer.finish,
                "route": answer.route,
                "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.tokens.len()},
                "seconds": {"load": loaded.as_secs_f64(), "generate": secs},
            }))?
        );
    } else {
        println!();
        let route = answer
            .route
            .map(|r| format!("; {r:?} path"))
            .unwrap_or_default();
        eprintln!(
            "[{} prompt + {} new tokens in {:.2} s; {:?}{route}]",
            answer.prompt_tokens,
            answer.tokens.len(),
            secs,
            answer.finish
        );
    }
    Ok(())
}
