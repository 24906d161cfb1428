//! Fusion of vision features into the language model.

pub mod projector;
