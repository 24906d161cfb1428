//! Vision encoders.

pub mod depthwise;
pub mod efficientnet;
pub mod pixel_mlp;
pub mod vit;
