//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// An installed asset; the README's test command fetches them first, so a
/// missing one is a failure with instructions, never a silent skip.
pub fn asset(name: &str) -> PathBuf {
    autoglm::io::assets::dir(name).unwrap_or_else(|e| panic!("{e}"))
}

pub fn load_fixture(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Whether `grads` holds a gradient for `t` with any non-zero entry.
pub fn has_gradient(grads: &candle_core::backprop::GradStore, t: &Tensor) -> bool {
    grads.get(t).is_some_and(|g| {
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    })
}

/// Cosine similarity of two 1-D tensors.
pub fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_vec1::<f32>().unwrap();
    let b = b.to_vec1::<f32>().unwrap();
    let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Token ids stored in a fixture tensor (any integer dtype), flattened.
pub fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
}
