//! Text: tokenizers and text encoders.

pub mod bert;
pub mod clip_text;
pub mod tokenizer;
