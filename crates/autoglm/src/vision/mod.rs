//! Vision encoders.

pub mod convnet;
pub mod depthwise;
pub mod efficientnet;
pub mod pixel_mlp;
pub mod vit;
