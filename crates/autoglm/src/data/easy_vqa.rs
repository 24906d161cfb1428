//! easy-VQA from its PyPI package files (installed by
//! `scripts/fetch-assets.sh --only easy-vqa`): `{split}/questions.json` holds
//! `[question, answer, image_id]` triples; images are `{split}/images/{id}.png`.

use std::path::Path;

use super::{BadRow, LoadReport, VqaExample};
use crate::{Error, Result};

/// The 13 answers, in the package's order (`answers.txt`).
pub fn answers(dir: &Path) -> Result<Vec<String>> {
    let p = dir.join("answers.txt");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Loads one split (`train` or `test`). Entries whose image file is missing
/// or whose answer is empty are reported, not returned.
pub fn load(dir: &Path, split: &str) -> Result<(Vec<VqaExample>, LoadReport)> {
    if split != "train" && split != "test" {
        return Err(Error::Invalid(format!(
            "easy-VQA has splits `train` and `test`, not `{split}`"
        )));
    }
    let qpath = dir.join(split).join("questions.json");
    let text = std::fs::read_to_string(&qpath).map_err(|e| Error::io(&qpath, e))?;
    let rows: Vec<(String, String, u64)> =
        serde_json::from_str(&text).map_err(|e| Error::Config {
            path: qpath.clone(),
            msg: format!("expected [question, answer, image_id] triples: {e}"),
        })?;
    let images = dir.join(split).join("images");
    let mut report = LoadReport {
        rows: rows.len(),
        bad: Vec::new(),
    };
    let mut out = Vec::with_capacity(rows.len());
    for (i, (question, answer, id)) in rows.into_iter().enumerate() {
        let image = images.join(format!("{id}.png"));
        let reason = if answer.trim().is_empty() {
            Some("empty answer".to_string())
        } else if !image.is_file() {
            Some(format!("image {} is missing", image.display()))
        } else {
            None
        };
        match reason {
            Some(reason) => report.bad.push(BadRow {
                line: i + 1,
                reason,
            }),
            None => out.push(VqaExample {
                image,
                question,
                answer,
                kind: None,
            }),
        }
    }
    Ok((out, report))
}
