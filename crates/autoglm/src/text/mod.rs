//! Text: tokenizers and text encoders.

pub mod bert;
pub mod chat;
pub mod clip_text;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod lstm;
pub mod tokenizer;
pub mod train_tokenizer;
