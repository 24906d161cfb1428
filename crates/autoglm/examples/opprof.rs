use candle_core::{Device, Tensor};
use std::time::Instant;
fn t(name: &str, n: usize, mut f: impl FnMut()) {
    f();
    let s = Instant::now();
    for _ in 0..n { f(); }
    println!("{name}: {:.3} ms", s.elapsed().as_secs_f64() * 1e3 / n as f64);
}
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (64 * 22, 1536), &d)?;
    let h = Tensor::randn(0f32, 1.0, (64 * 22, 384), &d)?;
    let w = Tensor::randn(0f32, 1.0, (384, 1536), &d)?;
    let wt = Tensor::randn(0f32, 1.0, (1536, 384), &d)?.t()?;
    let b = Tensor::randn(0f32, 1.0, (1536,), &d)?;
    t("gelu_erf 2.1M", 5, || { x.gelu_erf().unwrap(); });
    t("bias_act gelu 2.1M", 5, || { autoglm::ops::bias_act(&x, &b, autoglm::ops::Act::GeluErf).unwrap(); });
    t("bias_act relu6 2.1M", 5, || { autoglm::ops::bias_act(&x, &b, autoglm::ops::Act::Relu6).unwrap(); });
    t("gelu tanh 2.1M", 5, || { x.gelu().unwrap(); });
    t("broadcast_add bias 2.1M", 5, || { x.broadcast_add(&b).unwrap(); });
    t("clamp 2.1M", 5, || { x.clamp(0f32, 6f32).unwrap(); });
    t("matmul 1408x384x1536", 5, || { h.matmul(&w).unwrap(); });
    t("matmul (transposed w) 1408x384x1536", 5, || { h.matmul(&wt).unwrap(); });
    let h3 = h.reshape((64, 22, 384))?;
    let ln = candle_nn::LayerNorm::new(Tensor::ones(384, candle_core::DType::F32, &d)?, Tensor::zeros(384, candle_core::DType::F32, &d)?, 1e-12);
    t("layernorm 64x22x384", 5, || { candle_nn::Module::forward(&ln, &h3).unwrap(); });
    let q = Tensor::randn(0f32, 1.0, (64, 12, 22, 32), &d)?;
    let k = Tensor::randn(0f32, 1.0, (64, 12, 22, 32), &d)?;
    t("qk^T batched 768x22x32x22", 5, || { q.matmul(&k.t().unwrap()).unwrap(); });
    let s = q.matmul(&k.t()?)?;
    t("softmax 768x22x22", 5, || { candle_nn::ops::softmax_last_dim(&s).unwrap(); });
    t("transpose contiguous 64x22x12x32", 5, || { h3.reshape((64, 22, 12, 32)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap(); });
    // efficientnet-ish
    let a = Tensor::randn(0f32, 1.0, (112 * 112, 16), &d)?;
    let w2 = Tensor::randn(0f32, 1.0, (16, 96), &d)?;
    let b2 = Tensor::randn(0f32, 1.0, (96,), &d)?;
    t("pw matmul 12544x16x96", 10, || { a.matmul(&w2).unwrap(); });
    let y = a.matmul(&w2)?;
    t("bias add 12544x96", 10, || { y.broadcast_add(&b2).unwrap(); });
    t("clamp 12544x96", 10, || { y.clamp(0f32, 6f32).unwrap(); });
    Ok(())
}
#[allow(dead_code)]
fn unused() {}
