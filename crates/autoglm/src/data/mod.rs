//! Datasets: visual question answering examples from easy-VQA's package
//! files or from a user's JSON-lines file, and a loader that decodes images
//! in worker threads with prefetch and shuffles deterministically by seed.

pub mod easy_vqa;
pub mod fashion_mnist;
pub mod jsonl;
pub mod loader;
pub mod sort_of_clevr;

use std::path::PathBuf;

/// One question about one image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VqaExample {
    pub image: PathBuf,
    pub question: String,
    pub answer: String,
    /// The question's type, where the data names one (the JSON lines'
    /// `type`, as Sort-of-CLEVR's have): evaluation reports accuracy per
    /// type, and by the kind of answer without one.
    pub kind: Option<String>,
}

/// A row that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BadRow {
    /// 1-based line (JSON lines) or entry index (easy-VQA).
    pub line: usize,
    pub reason: String,
}

/// What loading a dataset found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    pub rows: usize,
    pub bad: Vec<BadRow>,
}

impl LoadReport {
    /// One line for logs: "38575 rows, 0 bad".
    pub fn summary(&self) -> String {
        let mut s = format!("{} rows, {} bad", self.rows, self.bad.len());
        for b in self.bad.iter().take(5) {
            s.push_str(&format!("; line {}: {}", b.line, b.reason));
        }
        if self.bad.len() > 5 {
            s.push_str(&format!("; … {} more", self.bad.len() - 5));
        }
        s
    }
}
