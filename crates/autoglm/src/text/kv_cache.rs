//! The key/value cache of a decoder, as an explicit value: the caller owns
//! it, passes it to every forward call, and can inspect, clear or drop it.

use candle_core::Tensor;

use crate::Result;

/// Per layer, the keys and values seen so far, `(B, kv_heads, S, head_dim)`.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
        }
    }

    /// Number of cached positions (0 when empty).
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// Appends `k`, `v` (new positions) to layer `i` and returns all keys and
    /// values of that layer.
    pub fn append(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = self.layers.len();
        let slot = self.layers.get_mut(i).ok_or_else(|| {
            crate::Error::Invalid(format!(
                "KV cache has {n} layers, layer {i} asked for: a cache of another model?"
            ))
        })?;
        let entry = match slot {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[&*pk, k], 2)?, Tensor::cat(&[&*pv, v], 2)?),
        };
        *slot = Some(entry.clone());
        Ok(entry)
    }
}
