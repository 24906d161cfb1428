//! Training: AdamW with weight decay only on matrices, linear warmup +
//! cosine schedule, global-norm gradient clipping, gradient accumulation,
//! and checkpoints that survive a crash.
//!
//! The randomness of step `s` is derived from `(seed, s)` and the data order
//! of an epoch from `(seed, epoch)` (see [`crate::data::loader`]), so a
//! checkpoint needs no generator state: resuming at step `s` replays exactly
//! what an uninterrupted run would have done.

pub mod baseline;
pub mod checkpoint;
pub mod draw;
pub mod eval;
mod images;
pub mod optim;
pub mod plot;
pub mod recall;
pub mod schedule;
pub mod trainer;
pub mod vqa;

pub use checkpoint::{
    load_checkpoint, named_vars, save_checkpoint, save_safetensors_atomic, varmap_tensors,
    write_atomic, Checkpoint,
};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig};
pub use schedule::Schedule;
pub use trainer::{Metrics, TrainConfig, Trainer};
