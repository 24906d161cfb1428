//! Safetensors weights, memory-mapped, with errors that name the file, the
//! tensor, and the expected and found shapes.
//!
//! The backend plugs into candle's `VarBuilder`, so models are written the
//! usual way (`vb.pp("encoder").get(..)`) and a bad checkpoint fails with a
//! message a user can act on instead of a panic deep inside a layer.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// One or more safetensors files, memory-mapped and validated.
pub struct Safetensors {
    paths: Vec<PathBuf>,
    inner: MmapedSafetensors,
}

impl Safetensors {
    /// Opens and validates the headers of `paths` (several for a sharded
    /// checkpoint). The safetensors crate checks that every tensor's offsets
    /// lie inside the file, do not overlap, and match its dtype and shape.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::Invalid("no weight files given".into()));
        }
        for p in paths {
            if !p.is_file() {
                return Err(Error::Missing {
                    path: p.clone(),
                    hint: "the model directory must hold its weights as .safetensors".into(),
                });
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader
        // we rely on nobody truncating them while the model is alive.
        let inner = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| Error::Weights {
            path: paths.first().cloned().unwrap_or_default(),
            msg: format!(
                "not a valid safetensors file ({}); re-download or re-convert it",
                root_cause(&e)
            ),
        })?;
        Ok(Self {
            paths: paths.to_vec(),
            inner,
        })
    }

    /// Opens `dir/model.safetensors`, or the shards listed in
    /// `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open(&[single]);
        }
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: std::collections::BTreeMap<String, String>,
            }
            let idx: Index = super::read_json(&index)?;
            let mut files: Vec<String> = idx.weight_map.into_values().collect();
            files.sort();
            files.dedup();
            if files.is_empty() {
                return Err(Error::Weights {
                    path: index,
                    msg: "weight_map is empty; re-export the checkpoint".into(),
                });
            }
            if let Some(bad) = files.iter().find(|f| {
                Path::new(f)
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            }) {
                return Err(Error::Weights {
                    path: index,
                    msg: format!("shard `{bad}` is not a plain file name in the model directory"),
                });
            }
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            return Self::open(&paths);
        }
        Err(Error::Missing {
            path: single,
            hint: "expected model.safetensors or model.safetensors.index.json".into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.paths[0]
    }

    /// Names of all tensors in the checkpoint.
    pub fn names(&self) -> Vec<String> {
        self.inner.tensors().into_iter().map(|(n, _)| n).collect()
    }

    /// Loads one tensor by name, whatever its shape.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.inner
            .load(name, device)
            .map_err(|_| self.missing(name))
    }

    fn missing(&self, name: &str) -> Error {
        Error::Weights {
            path: self.paths[0].clone(),
            msg: format!(
                "tensor `{name}` is missing ({} tensors present); is this checkpoint for the model its config.json names?",
                self.inner.tensors().len()
            ),
        }
    }

    /// A `VarBuilder` reading from these files, converting to `dtype`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

fn root_cause(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithPath { inner, .. } => root_cause(inner),
        candle_core::Error::WithBacktrace { inner, .. } => root_cause(inner),
        other => other.to_string(),
    }
}

impl SimpleBackend for Safetensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let view = self
            .inner
            .get(name)
            .map_err(|_| candle_core::Error::Msg(self.missing(name).to_string()))?;
        if view.shape() != s.dims() {
            let e = Error::TensorShape {
                path: self.paths[0].clone(),
                name: name.to_string(),
                expected: s.dims().to_vec(),
                found: format!("{:?}", view.shape()),
            };
            return Err(candle_core::Error::Msg(format!(
                "{e}; the checkpoint does not match its config.json"
            )));
        }
        self.inner.load(name, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner
            .load(name, dev)
            .map_err(|_| candle_core::Error::Msg(self.missing(name).to_string()))?
            .to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.get(name).is_ok()
    }
}
