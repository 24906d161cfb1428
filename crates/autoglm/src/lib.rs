//! Open-AutoGLM: vision-language understanding in Rust.
//!
//! The library is laid out by concern (see `DESIGN.md` in the shared docs and
//! the README's architecture section):
//! - [`io`]: safetensors weights, image decoding with limits, preprocessing
//!   that matches PIL/torchvision pixel for pixel, the asset cache.
//! - [`text`]: tokenizers and text encoders (BERT/MiniLM, CLIP text tower).
//! - [`vision`]: vision encoders (EfficientNet-Lite0, CLIP ViT).
//! - [`dual`]: the dual-tower image/text model (CLIP layout), zero-shot.

pub mod assistant;
pub mod config;
pub mod data;
pub mod dual;
pub mod error;
pub mod fusion;
pub mod io;
pub mod kg;
pub mod nn;
pub mod ops;
pub mod text;
pub mod train;
pub mod vision;
pub mod vlm;

pub use error::{Error, Result};

/// The device the library runs on: with the `cuda` feature, GPU 0 unless
/// `AUTOGLM_DEVICE=cpu` or no GPU can be opened (then a warning and the CPU);
/// otherwise the CPU.
pub fn default_device() -> Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        if std::env::var("AUTOGLM_DEVICE").as_deref() != Ok("cpu") {
            match candle_core::Device::new_cuda(0) {
                Ok(d) => return Ok(d),
                Err(e) => {
                    let msg = e.to_string();
                    let first = msg.lines().next().unwrap_or("");
                    tracing::warn!("no usable CUDA device ({first}); running on the CPU");
                }
            }
        }
    }
    Ok(candle_core::Device::Cpu)
}
