use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> autoglm::Result<()> {
    let m = autoglm::vision::efficientnet::EfficientNet::load(&autoglm::io::assets::dir("efficientnet-lite0")?, &Device::Cpu)?;
    let x = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &Device::Cpu)?;
    for _ in 0..3 { m.forward(&x)?; }
    let s = Instant::now();
    for _ in 0..20 { m.forward(&x)?; }
    println!("b1: {:.2} ms", s.elapsed().as_secs_f64() * 1e3 / 20.0);
    // stem alone
    let w = Tensor::randn(0f32, 1.0, (32, 3, 3, 3), &Device::Cpu)?;
    let s = Instant::now();
    for _ in 0..20 { x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?.conv2d(&w, 0, 2, 1, 1)?.permute((0, 2, 3, 1))?.contiguous()?; }
    println!("stem conv: {:.2} ms", s.elapsed().as_secs_f64() * 1e3 / 20.0);
    Ok(())
}
