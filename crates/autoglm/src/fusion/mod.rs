//! Fusion of vision features into the language model.

pub mod attention;
pub mod fpn;
pub mod gating;
pub mod projector;
pub mod router;
