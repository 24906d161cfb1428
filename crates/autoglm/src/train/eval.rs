//! Evaluation of a VQA model: every question asked as `autoglm ask` asks
//! it (greedy), exact match overall and per answer kind, and the confusion
//! matrix of the answers.

use std::path::Path;

use candle_core::Device;

use crate::assistant::{Assistant, Overflow};
use crate::data::VqaExample;
use crate::io::image::{load, ImageLimits};
use crate::text::generate::GenerateConfig;
use crate::Result;

/// Exact-match accuracy of a model on examples, overall and per question
/// type (the data's own, else the kind of answer: yes/no, color, shape,
/// other), with the confusion matrix of the answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub examples: usize,
    pub accuracy: f64,
    /// type → (examples, accuracy)
    pub per_type: std::collections::BTreeMap<String, (usize, f64)>,
    pub confusion: Confusion,
    pub seconds: f64,
    /// Time of each `ask` (preprocessing, vision tower, decoding).
    pub latency_ms: Latency,
    /// Examples per second over the whole run (all threads).
    pub throughput: f64,
    /// How many examples a routed model sent down each path, and its
    /// accuracy there; absent without a router (or with it off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes: Option<RouteCounts>,
}

impl EvalReport {
    /// The report of `answers` (one per example, in order) given in
    /// `seconds`, each taking `ms`.
    pub fn new(
        examples: &[VqaExample],
        answers: &[String],
        ms: &[f64],
        seconds: f64,
        routes: Option<RouteCounts>,
    ) -> Self {
        let mut per: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
        let mut correct = 0;
        for (e, ans) in examples.iter().zip(answers) {
            let ok = ans.trim() == e.answer.trim();
            correct += usize::from(ok);
            let kind = match &e.kind {
                Some(k) => k.clone(),
                None => answer_kind(e.answer.trim()).to_string(),
            };
            let entry = per.entry(kind).or_default();
            entry.0 += 1;
            entry.1 += usize::from(ok);
        }
        let truth: Vec<&str> = examples.iter().map(|e| e.answer.trim()).collect();
        Self {
            examples: examples.len(),
            accuracy: correct as f64 / examples.len().max(1) as f64,
            per_type: per
                .into_iter()
                .map(|(k, (t, c))| (k, (t, c as f64 / t.max(1) as f64)))
                .collect(),
            confusion: Confusion::from_answers(&truth, answers),
            seconds,
            latency_ms: Latency::of(ms),
            throughput: examples.len() as f64 / seconds.max(1e-9),
            routes,
        }
    }
}

/// Mean and percentiles of per-example latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
}

impl Latency {
    pub fn of(ms: &[f64]) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        let mut v = ms.to_vec();
        v.sort_by(f64::total_cmp);
        // Nearest rank.
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: at(0.5),
            p95: at(0.95),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RouteCounts {
    pub light: usize,
    pub full: usize,
    pub light_accuracy: f64,
    pub full_accuracy: f64,
}

/// How [`evaluate`] asks.
#[derive(Clone, Copy, Default)]
pub struct EvalOptions<'a> {
    /// Restricts decoding to each question's answer set.
    pub answers: Option<AnswersOf<'a>>,
    /// A routed model takes the full path for every input (router off).
    pub router_off: bool,
}

/// `counts[i][j]`: examples whose answer is `labels[i]` and that the model
/// answered `labels[j]`. The labels are the true answers in sorted order,
/// then `(other)` for any answer that is none of them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Confusion {
    pub labels: Vec<String>,
    pub counts: Vec<Vec<usize>>,
}

impl Confusion {
    pub fn from_answers(truth: &[&str], predicted: &[String]) -> Self {
        let mut labels: Vec<String> = truth.iter().map(|s| s.to_string()).collect();
        labels.sort();
        labels.dedup();
        let other = labels.len();
        labels.push("(other)".into());
        let index = |s: &str| labels.iter().position(|l| l == s).unwrap_or(other);
        let mut counts = vec![vec![0; labels.len()]; labels.len()];
        for (t, p) in truth.iter().zip(predicted) {
            counts[index(t)][index(p.trim())] += 1;
        }
        // Drop the `(other)` row: no true answer lands there.
        counts.pop();
        counts.iter_mut().for_each(|r| r.truncate(labels.len()));
        Self { labels, counts }
    }

    /// Writes the matrix as a PNG heat map (the `(other)` column kept only
    /// when some answer fell there).
    pub fn plot(&self, path: &Path) -> Result<()> {
        let n = self.counts.len();
        let other_used = self.counts.iter().any(|r| r[n] > 0);
        let (labels, counts): (Vec<String>, Vec<Vec<usize>>) = if other_used {
            let mut c = self.counts.clone();
            c.push(vec![0; n + 1]);
            (self.labels.clone(), c)
        } else {
            (
                self.labels[..n].to_vec(),
                self.counts.iter().map(|r| r[..n].to_vec()).collect(),
            )
        };
        super::plot::confusion_matrix(path, &labels, &counts)
    }
}

pub fn answer_kind(answer: &str) -> &'static str {
    match answer {
        "yes" | "no" => "yes/no",
        "red" | "green" | "blue" | "black" | "gray" | "teal" | "brown" | "yellow" => "color",
        "circle" | "rectangle" | "triangle" => "shape",
        _ => "other",
    }
}

/// The closed answer set of each question (its text in, answers out).
pub type AnswersOf<'a> = &'a (dyn Fn(&str) -> Vec<String> + Sync);

/// Asks the model every question (greedy, as `autoglm ask` does), the
/// examples spread over the rayon threads (one thread for latencies that
/// mean what they say).
pub fn evaluate(
    model_dir: &Path,
    examples: &[VqaExample],
    device: &Device,
    opts: EvalOptions,
) -> Result<EvalReport> {
    use rayon::prelude::*;
    let t0 = std::time::Instant::now();
    let a = Assistant::load(model_dir, device)?;
    let cfg = GenerateConfig {
        max_new_tokens: 8,
        layers: opts.router_off.then(|| a.model.lm.depth()),
        ..GenerateConfig::default()
    };
    // A model trained blind (the ablation's baseline) is asked without images.
    let blind = std::fs::read_to_string(model_dir.join("train_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["blind"] == true);
    let asked = examples
        .par_iter()
        .map(|e| {
            let imgs = if blind {
                Vec::new()
            } else {
                vec![load(&e.image, ImageLimits::default())?]
            };
            let mut cfg = cfg.clone();
            if let Some(of) = opts.answers {
                cfg.answer_space = Some(std::sync::Arc::new(a.answer_space(&of(&e.question))?));
            }
            let t = std::time::Instant::now();
            let answer = a.ask(&imgs, &e.question, &cfg, Overflow::Error, &mut |_| true)?;
            Ok((answer.text, answer.route, t.elapsed().as_secs_f64() * 1e3))
        })
        .collect::<Result<Vec<_>>>()?;
    let answers: Vec<String> = asked.iter().map(|(t, _, _)| t.clone()).collect();
    let ms: Vec<f64> = asked.iter().map(|(_, _, ms)| *ms).collect();
    let routes = asked.iter().any(|(_, r, _)| r.is_some()).then(|| {
        use crate::fusion::router::Route;
        let mut c = RouteCounts::default();
        let (mut ok_light, mut ok_full) = (0, 0);
        for ((ans, r, _), e) in asked.iter().zip(examples) {
            let ok = usize::from(ans.trim() == e.answer.trim());
            if *r == Some(Route::Light) {
                c.light += 1;
                ok_light += ok;
            } else {
                c.full += 1;
                ok_full += ok;
            }
        }
        c.light_accuracy = ok_light as f64 / c.light.max(1) as f64;
        c.full_accuracy = ok_full as f64 / c.full.max(1) as f64;
        c
    });
    Ok(EvalReport::new(
        examples,
        &answers,
        &ms,
        t0.elapsed().as_secs_f64(),
        routes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accuracy per the data's question type where it names one, per the
    /// kind of answer where it does not.
    #[test]
    fn per_type_uses_the_question_type_when_given() {
        let ex = |answer: &str, kind: Option<&str>| VqaExample {
            image: "x.png".into(),
            question: "q".into(),
            answer: answer.into(),
            kind: kind.map(String::from),
        };
        let examples = [
            ex("circle", Some("closest")),
            ex("square", Some("closest")),
            ex("3", Some("count")),
            ex("yes", None),
        ];
        let answers = ["circle", "circle", "3", "no"].map(String::from);
        let r = EvalReport::new(&examples, &answers, &[1.0; 4], 1.0, None);
        let want: std::collections::BTreeMap<String, (usize, f64)> = [
            ("closest".to_string(), (2, 0.5)),
            ("count".to_string(), (1, 1.0)),
            ("yes/no".to_string(), (1, 0.0)),
        ]
        .into();
        assert_eq!(r.per_type, want);
        assert_eq!(r.accuracy, 0.5);
    }
}
