//! Vision encoders.

pub mod depthwise;
pub mod efficientnet;
pub mod vit;
