//! Checkpoints: weights, optimizer moments, step and the training config in
//! one safetensors file, with a format tag and version in its metadata.
//! Written to a temporary file, fsynced, then renamed over the previous
//! checkpoint: a crash or a kill at any moment leaves either the old or the
//! new checkpoint, never a torn one.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

const FORMAT: &str = "open-autoglm-checkpoint";
const VERSION: &str = "1";

/// What a checkpoint holds besides the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub step: usize,
    /// The training configuration (JSON), saved next to every checkpoint.
    pub config: serde_json::Value,
}

/// Writes `weights` (names kept), the optimizer `state` and `meta` to `path`.
pub fn save_checkpoint(
    path: &Path,
    weights: &HashMap<String, Tensor>,
    state: &std::collections::BTreeMap<String, Tensor>,
    meta: &Checkpoint,
) -> Result<()> {
    // Everything is stored as f32 (training runs in f32).
    let mut all: Vec<(String, Tensor)> = Vec::new();
    for (k, v) in weights {
        all.push((format!("model.{k}"), v.to_dtype(candle_core::DType::F32)?));
    }
    for (k, v) in state {
        all.push((k.clone(), v.to_dtype(candle_core::DType::F32)?));
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata: HashMap<String, String> = HashMap::from([
        ("format".into(), FORMAT.into()),
        ("version".into(), VERSION.into()),
        ("step".into(), meta.step.to_string()),
        ("config".into(), meta.config.to_string()),
    ]);
    let views: Vec<(String, Tensor)> = all;
    let bytes = safetensors::serialize(
        views.iter().map(|(k, t)| (k.as_str(), TensorView(t))),
        Some(metadata),
    )
    .map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        msg: format!("cannot serialise the checkpoint: {e}"),
    })?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` so that a crash at any moment leaves either the
/// old file or the new one: a temporary file beside it, fsynced, renamed
/// over it, and the directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    // Make the rename itself durable.
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Saves named tensors as an f32 safetensors file, atomically.
pub fn save_safetensors_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut all: Vec<(&String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k, t.to_dtype(candle_core::DType::F32)?)))
        .collect::<Result<_>>()?;
    all.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = safetensors::serialize(all.iter().map(|(k, t)| (k.as_str(), TensorView(t))), None)
        .map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            msg: format!("cannot serialise the weights: {e}"),
        })?;
    write_atomic(path, &bytes)
}

/// The current values of every variable of `vm`, by name.
pub fn varmap_tensors(vm: &candle_nn::VarMap) -> Result<HashMap<String, Tensor>> {
    Ok(vm
        .data()
        .lock()
        .map_err(|_| Error::Invalid("variable map poisoned".into()))?
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect())
}

/// The variables of `vm` to train, sorted by name (the order fixes the
/// optimiser's state layout and a seeded run's updates): all but those
/// whose names start with one of `frozen`.
pub fn named_vars(
    vm: &candle_nn::VarMap,
    frozen: &[String],
) -> Result<Vec<(String, candle_core::Var)>> {
    let mut vars: Vec<(String, candle_core::Var)> = vm
        .data()
        .lock()
        .map_err(|_| Error::Invalid("variable map poisoned".into()))?
        .iter()
        .filter(|(n, _)| !frozen.iter().any(|p| n.starts_with(p.as_str())))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// Named tensors.
pub type Tensors = HashMap<String, Tensor>;

/// Sets every variable of `vm` from the tensor of the same name in
/// `tensors` (moved to the variable's device); `source` names where they
/// came from in the error about a missing or differently shaped tensor.
pub fn set_varmap(vm: &candle_nn::VarMap, tensors: &Tensors, source: &str) -> Result<()> {
    let vars = vm
        .data()
        .lock()
        .map_err(|_| Error::Invalid("variable map poisoned".into()))?;
    for (name, var) in vars.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| Error::Invalid(format!("{source} lacks `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(Error::Invalid(format!(
                "`{name}` is {:?} in {source} but {:?} here",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_device(var.device())?)?;
    }
    Ok(())
}

/// Reads a checkpoint: (model weights without the `model.` prefix, optimizer
/// state, metadata).
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<(Tensors, Tensors, Checkpoint)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Weights {
        path: path.to_path_buf(),
        msg,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        bad(format!(
            "not a checkpoint ({e}); it may be from an interrupted write"
        ))
    })?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad("not an Open-AutoGLM checkpoint (no format tag)".into()));
    }
    if meta.get("version").map(String::as_str) != Some(VERSION) {
        return Err(bad(format!(
            "checkpoint version {:?}, this build reads {VERSION}; use the release that wrote it",
            meta.get("version")
        )));
    }
    let step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("checkpoint metadata lacks `step`".into()))?;
    let config = meta
        .get("config")
        .map(|c| serde_json::from_str(c))
        .transpose()
        .map_err(|e| bad(format!("checkpoint config is not JSON: {e}")))?
        .unwrap_or(serde_json::Value::Null);
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
    let (mut weights, mut state) = (HashMap::new(), HashMap::new());
    for (k, v) in tensors {
        match k.strip_prefix("model.") {
            Some(w) => {
                weights.insert(w.to_string(), v);
            }
            None => {
                state.insert(k, v);
            }
        }
    }
    Ok((weights, state, Checkpoint { step, config }))
}

/// An f32 candle tensor as a safetensors view.
struct TensorView<'a>(&'a Tensor);

impl safetensors::View for TensorView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.0.dims()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let v = self
            .0
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_default();
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.elem_count() * 4
    }
}
