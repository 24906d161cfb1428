//! The library's error type. Every variant says what was wrong and, where
//! there is one, what the user can do about it.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A model directory lacks a file the model needs.
    #[error("{path} not found: {hint}")]
    Missing { path: PathBuf, hint: String },

    /// An image could not be decoded or is outside the allowed limits.
    #[error("image {path}: {msg}")]
    Image { path: String, msg: String },

    /// A configuration file is malformed or describes an unsupported model.
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },

    /// A weight file is malformed or does not match the model.
    #[error("weights {path}: {msg}")]
    Weights { path: PathBuf, msg: String },

    /// A tensor that the model needs is absent or has the wrong shape.
    #[error("weights {path}: tensor `{name}`: expected shape {expected:?}, found {found}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: String,
    },

    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The caller passed an argument the model cannot take.
    #[error("{0}")]
    Invalid(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
