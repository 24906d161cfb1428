//! The commands that load a model and print results.

use std::path::PathBuf;

use anyhow::{Context, Result};
use autoglm::dual::ClipPipeline;
use autoglm::io::assets;
use autoglm::io::image::{load, ImageLimits};
use autoglm::text::bert::SentenceEncoder;
use autoglm::vision::efficientnet::{EfficientNet, ImageClassifier};
use clap::Args;
use image::RgbImage;
use serde_json::json;

use crate::Global;

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn limits(g: &Global) -> ImageLimits {
    ImageLimits {
        max_pixels: g.max_pixels,
        ..ImageLimits::default()
    }
}

pub fn load_images(g: &Global, paths: &[PathBuf]) -> Result<Vec<RgbImage>> {
    if paths.is_empty() {
        anyhow::bail!("no images given; pass one or more image files");
    }
    paths.iter().map(|p| Ok(load(p, limits(g))?)).collect()
}

fn model_dir(given: &Option<PathBuf>, asset: &str) -> Result<PathBuf> {
    match given {
        Some(d) => Ok(d.clone()),
        None => Ok(assets::dir(asset)?),
    }
}

fn fmt_vec(v: &[f32]) -> String {
    let head: Vec<String> = v.iter().take(4).map(|x| format!("{x:+.4}")).collect();
    format!("[{}, …] ({} dims)", head.join(", "), v.len())
}

pub fn assets_list(g: &Global) -> Result<()> {
    let list = assets::list();
    if g.json {
        return print_json(&json!({ "home": assets::home(), "assets": list }));
    }
    println!("AUTOGLM_HOME = {}", assets::home().display());
    for a in &list {
        let state = if a.installed {
            format!("{:>7.1} MB", a.bytes as f64 / 1e6)
        } else {
            "  missing".into()
        };
        println!("{:<20} {state}  {:<45} {}", a.name, a.description, a.source);
    }
    if list.iter().any(|a| !a.installed) {
        println!("\nmissing assets are installed by scripts/fetch-assets.sh");
    }
    Ok(())
}

#[derive(Args)]
pub struct EmbedTextArgs {
    /// Texts to embed.
    #[arg(required = true)]
    texts: Vec<String>,
    /// A sentence-transformers BERT directory (default: the installed all-MiniLM-L6-v2).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
}

pub fn embed_text(g: &Global, a: EmbedTextArgs) -> Result<()> {
    let dir = model_dir(&a.model, "minilm")?;
    let dev = autoglm::default_device()?;
    let enc = SentenceEncoder::load(&dir, &dev)?;
    let texts: Vec<&str> = a.texts.iter().map(String::as_str).collect();
    let emb = enc.embed(&texts, a.batch_size)?.to_vec2::<f32>()?;
    if g.json {
        let items: Vec<_> = texts
            .iter()
            .zip(&emb)
            .map(|(t, e)| json!({"text": t, "embedding": e}))
            .collect();
        return print_json(&json!({"model": dir, "dim": enc.dim(), "embeddings": items}));
    }
    for (t, e) in texts.iter().zip(&emb) {
        println!("{:?} → {}", t, fmt_vec(e));
    }
    Ok(())
}

#[derive(Args)]
pub struct EmbedImageArgs {
    /// Image files (PNG, JPEG, WebP, GIF).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// A HF CLIPModel directory; without it, EfficientNet-Lite0's pooled
    /// 1280-d features are used.
    #[arg(long)]
    model: Option<PathBuf>,
}

pub fn embed_image(g: &Global, a: EmbedImageArgs) -> Result<()> {
    let dev = autoglm::default_device()?;
    let (name, emb) = match &a.model {
        Some(dir) => {
            let p = ClipPipeline::load(dir, &dev)?;
            let imgs = load_images(g, &a.images)?;
            (dir.display().to_string(), p.embed_images(&imgs)?)
        }
        None => {
            let dir = assets::dir("efficientnet-lite0")?;
            let m = EfficientNet::load(&dir, &dev)?;
            let imgs = load_images(g, &a.images)?;
            let x = m.config.preprocess().batch(&imgs, &dev)?;
            let f = m.forward_features(&x)?.pooled;
            (
                "efficientnet-lite0".to_string(),
                autoglm::text::bert::l2_normalize(&f)?,
            )
        }
    };
    let emb = emb.to_vec2::<f32>()?;
    if g.json {
        let items: Vec<_> = a
            .images
            .iter()
            .zip(&emb)
            .map(|(p, e)| json!({"image": p, "embedding": e}))
            .collect();
        return print_json(&json!({"model": name, "dim": emb[0].len(), "embeddings": items}));
    }
    for (p, e) in a.images.iter().zip(&emb) {
        println!("{} → {}", p.display(), fmt_vec(e));
    }
    Ok(())
}

#[derive(Args)]
pub struct ClassifyArgs {
    /// Image files (PNG, JPEG, WebP, GIF).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// EfficientNet-Lite0 directory with model.safetensors (default: the installed one).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Class names, one per line in class order (default: the installed ImageNet labels).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
}

pub fn classify(g: &Global, a: ClassifyArgs) -> Result<()> {
    let dir = model_dir(&a.model, "efficientnet-lite0")?;
    let labels = match &a.labels {
        Some(l) => l.clone(),
        None => assets::dir("imagenet")?.join("labels.txt"),
    };
    let dev = autoglm::default_device()?;
    let clf = ImageClassifier::load(&dir, &labels, &dev)?;
    let imgs = load_images(g, &a.images)?;
    let top = clf.top_k(&imgs, a.top_k.max(1))?;
    if g.json {
        let items: Vec<_> = a
            .images
            .iter()
            .zip(&top)
            .map(|(p, t)| json!({"image": p, "top": t}))
            .collect();
        return print_json(&json!({"model": "efficientnet-lite0", "results": items}));
    }
    for (p, t) in a.images.iter().zip(&top) {
        println!("{}", p.display());
        for pred in t {
            println!("  {:>6.2}%  {}", pred.probability * 100.0, pred.label);
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct ZeroShotArgs {
    /// Image files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// A HF CLIPModel directory (config.json, model.safetensors,
    /// preprocessor_config.json, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated label prompts, e.g. "a photo of a cat,a photo of a dog".
    #[arg(long, required = true)]
    labels: String,
}

pub fn zero_shot(g: &Global, a: ZeroShotArgs) -> Result<()> {
    let labels: Vec<&str> = a
        .labels
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if labels.is_empty() {
        anyhow::bail!("--labels is empty; pass comma-separated label prompts");
    }
    let dev = autoglm::default_device()?;
    let p = ClipPipeline::load(&a.model, &dev)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let imgs = load_images(g, &a.images)?;
    let probs = p.zero_shot(&imgs, &labels)?.to_vec2::<f32>()?;
    if g.json {
        let items: Vec<_> = a
            .images
            .iter()
            .zip(&probs)
            .map(|(img, pr)| {
                let per: Vec<_> = labels
                    .iter()
                    .zip(pr)
                    .map(|(l, v)| json!({"label": l, "probability": v}))
                    .collect();
                json!({"image": img, "labels": per})
            })
            .collect();
        return print_json(&json!({"model": a.model, "results": items}));
    }
    for (img, pr) in a.images.iter().zip(&probs) {
        println!("{}", img.display());
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.sort_by(|&x, &y| pr[y].total_cmp(&pr[x]));
        for i in order {
            println!("  {:>6.2}%  {}", pr[i] * 100.0, labels[i]);
        }
    }
    Ok(())
}
