//! Input/output: weights, images, preprocessing, the asset cache.

pub mod assets;
pub mod image;
pub mod preprocess;
pub mod weights;

use std::path::Path;

use crate::{Error, Result};

/// Reads a JSON file into a typed config, with errors that name the file and
/// the field that is wrong.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    if !path.exists() {
        return Err(Error::Missing {
            path: path.to_path_buf(),
            hint: "is this a model directory? it must hold config.json and the weights".into(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: format!("{e}; fix the file or re-export the model"),
    })
}
