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

/// Row surgery for continuous batching: sequences join a running batch
/// (caches of different lengths are left-padded to one length, the padding
/// masked by the caller) and leave it (their rows are dropped).
impl KvCache {
    fn map(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((f(k)?, f(v)?))),
                None => Ok(None),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Number of rows (sequences) cached; 0 when empty.
    pub fn rows(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(0).unwrap_or(0),
            _ => 0,
        }
    }

    /// The cache with `n` zero positions before every row's keys and values.
    pub fn pad_left(&self, n: usize) -> Result<Self> {
        if n == 0 {
            return Ok(self.clone());
        }
        self.map(|t| {
            let (b, h, _, d) = t.dims4()?;
            let z = Tensor::zeros((b, h, n, d), t.dtype(), t.device())?;
            Tensor::cat(&[&z, t], 2)
        })
    }

    /// The cache without its first `n` positions.
    pub fn trim_left(&self, n: usize) -> Result<Self> {
        let len = self.len();
        if n > len {
            return Err(crate::Error::Invalid(format!(
                "cannot trim {n} positions from a cache of {len}"
            )));
        }
        self.map(|t| t.narrow(2, n, len - n))
    }

    /// Only the rows `rows`, in that order.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        let dev = match self.layers.first() {
            Some(Some((k, _))) => k.device().clone(),
            _ => return Ok(self.clone()),
        };
        let idx = Tensor::from_slice(rows, rows.len(), &dev)?;
        self.map(|t| t.index_select(&idx, 0))
    }

    /// The rows of `caches` stacked, in order; all must hold the same number
    /// of positions and layers (pad the shorter first).
    pub fn cat_rows(caches: &[&KvCache]) -> Result<Self> {
        let Some(first) = caches.first() else {
            return Err(crate::Error::Invalid("cat_rows: no caches".into()));
        };
        let n = first.layers.len();
        let mut layers = Vec::with_capacity(n);
        for i in 0..n {
            let mut ks = Vec::with_capacity(caches.len());
            let mut vs = Vec::with_capacity(caches.len());
            for c in caches {
                match c.layers.get(i) {
                    Some(Some((k, v))) => {
                        ks.push(k);
                        vs.push(v);
                    }
                    _ => {
                        return Err(crate::Error::Invalid(
                            "cat_rows: caches of different depth, or an empty one".into(),
                        ))
                    }
                }
            }
            let (k, v) = (Tensor::cat(&ks, 0), Tensor::cat(&vs, 0));
            match (k, v) {
                (Ok(k), Ok(v)) => layers.push(Some((k, v))),
                _ => {
                    return Err(crate::Error::Invalid(format!(
                        "cat_rows: caches of different lengths ({:?}); pad the shorter first",
                        caches.iter().map(|c| c.len()).collect::<Vec<_>>()
                    )))
                }
            }
        }
        Ok(Self { layers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cache(rows: &[f32], len: usize) -> KvCache {
        let mut c = KvCache::new(2);
        for l in 0..2 {
            let data: Vec<f32> = rows
                .iter()
                .flat_map(|r| (0..len * 3).map(move |i| r * 100.0 + i as f32 + l as f32))
                .collect();
            let k = Tensor::from_vec(data, (rows.len(), 1, len, 3), &Device::Cpu).unwrap();
            let v = (k.clone() * -1.0).unwrap();
            c.append(l, &k, &v).unwrap();
        }
        c
    }

    fn keys(c: &KvCache, layer: usize) -> Vec<Vec<Vec<f32>>> {
        let (k, _) = c.layers[layer].as_ref().unwrap();
        k.squeeze(1).unwrap().to_vec3().unwrap()
    }

    #[test]
    fn rows_join_padded_and_leave() {
        let a = cache(&[1.0, 2.0], 3);
        let b = cache(&[7.0], 1);
        let joined = KvCache::cat_rows(&[&a, &b.pad_left(2).unwrap()]).unwrap();
        assert_eq!((joined.rows(), joined.len()), (3, 3));
        let k = keys(&joined, 1);
        assert_eq!(k[0], keys(&a, 1)[0]);
        assert_eq!(k[2][0], vec![0.0; 3], "padding is zeros");
        assert_eq!(k[2][2], keys(&b, 1)[0][0], "the short row ends aligned");
        // Unequal lengths must be padded first.
        assert!(KvCache::cat_rows(&[&a, &b]).is_err());

        let left = joined.select_rows(&[2, 0]).unwrap();
        assert_eq!(
            keys(&left, 0),
            vec![keys(&joined, 0)[2].clone(), keys(&a, 0)[0].clone()]
        );
        let trimmed = left.trim_left(2).unwrap();
        assert_eq!(trimmed.len(), 1);
        assert_eq!(keys(&trimmed, 0)[0][0], keys(&b, 0)[0][0]);
        assert!(trimmed.trim_left(2).is_err());
        // Values travel with their keys.
        let (k, v) = trimmed.layers[1].as_ref().unwrap();
        let neg_k = (k * -1.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(neg_k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}
