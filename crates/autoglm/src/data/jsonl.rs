//! The JSON-lines VQA format users train on: one object per line,
//! `{"image": path, "question": …, "answer": …}` (and optionally `"type"`,
//! the question's type), image paths relative to the file's directory
//! unless absolute. Bad rows are counted and reported
//! with their line numbers; they are fatal only when the caller asks.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use super::{BadRow, LoadReport, VqaExample};
use crate::{Error, Result};

#[derive(serde::Deserialize)]
struct Row {
    image: Option<String>,
    question: Option<String>,
    answer: Option<serde_json::Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// Reads `path`. With `strict`, the first bad row is an error. Each image
/// is checked to exist and to start like an image file (its header is
/// read, not the pixels).
pub fn load(path: &Path, strict: bool) -> Result<(Vec<VqaExample>, LoadReport)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut report = LoadReport::default();
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        report.rows += 1;
        match parse(&line, &base) {
            Ok(ex) => out.push(ex),
            Err(reason) => {
                if strict {
                    return Err(Error::Invalid(format!(
                        "{}:{line_no}: {reason}",
                        path.display()
                    )));
                }
                report.bad.push(BadRow {
                    line: line_no,
                    reason,
                });
            }
        }
    }
    Ok((out, report))
}

fn parse(line: &str, base: &Path) -> std::result::Result<VqaExample, String> {
    let row: Row = serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let image = row
        .image
        .filter(|s| !s.is_empty())
        .ok_or("missing \"image\"")?;
    let question = row.question.ok_or("missing \"question\"")?;
    let answer = match row.answer {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(serde_json::Value::Bool(b)) => if b { "yes" } else { "no" }.to_string(),
        _ => return Err("missing or non-text \"answer\"".into()),
    };
    if answer.trim().is_empty() {
        return Err("empty answer".into());
    }
    let path = PathBuf::from(&image);
    let path = if path.is_absolute() {
        path
    } else {
        base.join(path)
    };
    // The file's first bytes, not its extension, say whether it is an image.
    let mut head = [0u8; 32];
    let n = std::fs::File::open(&path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| format!("image {}: {e}", path.display()))?;
    if image::guess_format(&head[..n]).is_err() {
        return Err(format!("{} is not an image file", path.display()));
    }
    Ok(VqaExample {
        image: path,
        question,
        answer,
        kind: row.kind.filter(|k| !k.trim().is_empty()),
    })
}

/// Writes examples as JSON lines (image paths as given), atomically.
pub fn save(path: &Path, examples: &[VqaExample]) -> Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
        for ex in examples {
            let mut line = serde_json::json!({"image": ex.image, "question": ex.question, "answer": ex.answer});
            if let Some(kind) = &ex.kind {
                line["type"] = kind.as_str().into();
            }
            writeln!(f, "{line}").map_err(|e| Error::io(&tmp, e))?;
        }
        let f = f
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
