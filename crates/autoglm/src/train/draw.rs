//! Which training questions each step of a VQA run reads.
//!
//! A step draws `batch_size` questions from a seeded shuffle of its pool,
//! a new shuffle each epoch over the pool, or, with `questions_per_image`
//! q > 1, `batch_size / q` images and q of each one's questions. The first
//! steps may draw from smaller pools: easy-VQA's open questions
//! (`open_first_steps`), or the stages of a `curriculum`, each of which
//! trains only the question types it lists. Everything is a function of
//! the step, so a resumed run draws what an uninterrupted one would have.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::vqa::VqaTrainConfig;
use crate::data::loader::epoch_order;
use crate::data::VqaExample;
use crate::{Error, Result};

/// The draws of a run over one training set.
pub struct Draws {
    batch_size: usize,
    questions_per_image: usize,
    /// Pools that the first steps draw from, each with the step it ends at.
    first: Vec<(usize, Pool)>,
    /// The whole training set, for every step after those.
    rest: Pool,
}

struct Pool {
    seed: u64,
    /// Indices into the training set.
    questions: Vec<usize>,
    /// With q > 1: the same questions grouped by image (in path order).
    images: Vec<Vec<usize>>,
}

impl Pool {
    fn new(train: &[VqaExample], seed: u64, q: usize, keep: impl Fn(&VqaExample) -> bool) -> Self {
        let questions: Vec<usize> = (0..train.len()).filter(|&i| keep(&train[i])).collect();
        let images = if q > 1 {
            let mut by: BTreeMap<&Path, Vec<usize>> = BTreeMap::new();
            for &i in &questions {
                by.entry(train[i].image.as_path()).or_default().push(i);
            }
            by.into_values().collect()
        } else {
            Vec::new()
        };
        Self {
            seed,
            questions,
            images,
        }
    }
}

impl Draws {
    /// The pools of `c` over `train`. A curriculum stage that names a type
    /// no training question has is an error that lists the data's types.
    pub fn new(train: &[VqaExample], c: &VqaTrainConfig) -> Result<Self> {
        let q = c.questions_per_image;
        let mut first = Vec::new();
        let mut end = 0;
        if c.open_first_steps > 0 {
            let open = Pool::new(train, c.seed ^ 0x0BE7, q, |e| {
                !matches!(e.answer.trim(), "yes" | "no")
            });
            // A set without open questions trains on all of them from the start.
            if !open.questions.is_empty() {
                end = c.open_first_steps;
                first.push((end, open));
            }
        }
        let known: BTreeSet<&str> = train.iter().filter_map(|e| e.kind.as_deref()).collect();
        for (s, stage) in c.curriculum.iter().enumerate() {
            if let Some(t) = stage.types.iter().find(|t| !known.contains(t.as_str())) {
                let listed = if known.is_empty() {
                    "none: its rows have no `type`".to_string()
                } else {
                    known.iter().copied().collect::<Vec<_>>().join(", ")
                };
                return Err(Error::Invalid(format!(
                    "training config: curriculum: stage {}: no training question has type `{t}`; the data's types: {listed}",
                    s + 1
                )));
            }
            let seed = c.seed ^ (0xC0_5EED ^ s as u64).wrapping_mul(0x9E37_79B9);
            let pool = Pool::new(train, seed, q, |e| {
                e.kind
                    .as_deref()
                    .is_some_and(|k| stage.types.iter().any(|t| t == k))
            });
            end += stage.steps;
            first.push((end, pool));
        }
        Ok(Self {
            batch_size: c.batch_size,
            questions_per_image: q,
            first,
            rest: Pool::new(train, c.seed, q, |_| true),
        })
    }

    fn pool(&self, step: usize) -> &Pool {
        self.first
            .iter()
            .find(|(end, _)| step < *end)
            .map_or(&self.rest, |(_, p)| p)
    }

    /// The curriculum stage (0-based) or open-questions pool that `step`
    /// draws from, counted as in `first`; `None` after them.
    pub fn stage(&self, step: usize) -> Option<usize> {
        self.first.iter().position(|(end, _)| step < *end)
    }

    /// Step `step`'s questions, one at a time (q = 1): full batches only,
    /// so every part of every step is equal (the few questions left over
    /// at an epoch's end differ from epoch to epoch).
    pub fn batch(&self, step: usize) -> Vec<usize> {
        let p = self.pool(step);
        let (_, window) = window(p.questions.len(), self.batch_size, p.seed, step);
        window.into_iter().map(|j| p.questions[j]).collect()
    }

    /// Step `step`'s images, each as the questions of it that the step
    /// trains (q > 1): a different window of each image's questions in
    /// each epoch over the images.
    pub fn groups(&self, step: usize) -> Vec<Vec<usize>> {
        let p = self.pool(step);
        let q = self.questions_per_image;
        let (epoch, window) = window(p.images.len(), self.batch_size / q, p.seed, step);
        window
            .into_iter()
            .map(|i| {
                let qs = &p.images[i];
                let own = epoch_order(qs.len(), p.seed ^ (i as u64).wrapping_add(1), 0, true);
                (0..q.min(qs.len()))
                    .map(|k| qs[own[(epoch * q + k) % qs.len()]])
                    .collect()
            })
            .collect()
    }
}

/// Step `step`'s `width` items of a pool of `n`, and the epoch it is in:
/// a window of that epoch's seeded shuffle (whole windows only, or all
/// `n` where `n < width`).
fn window(n: usize, width: usize, seed: u64, step: usize) -> (usize, Vec<usize>) {
    let per_epoch = (n / width).max(1);
    let epoch = step / per_epoch;
    let mut order = epoch_order(n, seed, epoch as u64, true);
    let start = (step % per_epoch) * width;
    order.truncate((start + width).min(n));
    order.drain(..start);
    (epoch, order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// 40 images with 10 questions each, of the types a, b, c, d in turn.
    fn set() -> Vec<VqaExample> {
        (0..400)
            .map(|i| VqaExample {
                image: PathBuf::from(format!("{}.png", i / 10)),
                question: format!("q{i}"),
                answer: if i % 5 == 0 {
                    "yes".into()
                } else {
                    format!("a{i}")
                },
                kind: Some(["a", "b", "c", "d"][i % 4].into()),
            })
            .collect()
    }

    fn config(extra: serde_json::Value) -> VqaTrainConfig {
        let mut v = serde_json::json!({
            "data": {"kind": "jsonl", "train": "t.jsonl", "test": "e.jsonl"},
            "image_size": 64, "patch_size": 16, "vision_hidden": 96, "vision_layers": 1,
            "vision_heads": 2, "projector": "mlp", "text_hidden": 64, "text_layers": 1,
            "text_heads": 2, "text_kv_heads": 1, "vocab_size": 300, "steps": 100,
            "batch_size": 8, "peak_lr": 1e-3, "warmup_steps": 1, "clip_norm": 1.0, "seed": 3,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let c: VqaTrainConfig = serde_json::from_value(v).unwrap();
        c.validate().unwrap();
        c
    }

    fn types(train: &[VqaExample], idx: &[usize]) -> BTreeSet<String> {
        idx.iter()
            .map(|&i| train[i].kind.clone().unwrap())
            .collect()
    }

    #[test]
    fn an_epoch_of_single_questions_reads_each_once() {
        let train = set();
        let d = Draws::new(&train, &config(serde_json::json!({}))).unwrap();
        let mut seen: Vec<usize> = (50..100).flat_map(|s| d.batch(s)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..400).collect::<Vec<_>>());
        assert_ne!(d.batch(0), d.batch(50), "each epoch has its own order");
        assert_eq!(d.stage(0), None);
    }

    #[test]
    fn curriculum_stages_draw_only_their_types_then_all() {
        let train = set();
        let c = config(serde_json::json!({"curriculum": [
            {"steps": 10, "types": ["a"]},
            {"steps": 20, "types": ["b", "c"]},
        ]}));
        let d = Draws::new(&train, &c).unwrap();
        let over = |r: std::ops::Range<usize>| -> BTreeSet<String> {
            r.flat_map(|s| types(&train, &d.batch(s))).collect()
        };
        let set_of = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(over(0..10), set_of(&["a"]));
        assert_eq!(over(10..30), set_of(&["b", "c"]));
        assert_eq!(over(30..80), set_of(&["a", "b", "c", "d"]));
        assert_eq!(
            (d.stage(9), d.stage(10), d.stage(29), d.stage(30)),
            (Some(0), Some(1), Some(1), None)
        );
        // The 100 questions of type a, each once in the stage's first
        // 12 full batches of 8 (4 left over).
        let mut firsts: Vec<usize> = (0..12).flat_map(|s| d.batch(s)).collect();
        firsts.sort_unstable();
        firsts.dedup();
        assert_eq!(firsts.len(), 96);
        assert_eq!(d.batch(0).len(), 8);
    }

    #[test]
    fn curriculum_groups_keep_one_image_and_the_stage_types() {
        let train = set();
        let c = config(serde_json::json!({
            "questions_per_image": 2,
            "curriculum": [{"steps": 10, "types": ["d"]}],
        }));
        let d = Draws::new(&train, &c).unwrap();
        for step in 0..40 {
            let groups = d.groups(step);
            assert_eq!(groups.len(), 4, "batch 8 = 4 images × 2");
            for g in &groups {
                assert_eq!(g.len(), 2);
                assert!(g.iter().all(|&i| train[i].image == train[g[0]].image));
                assert_ne!(g[0], g[1]);
                if step < 10 {
                    assert!(g.iter().all(|&i| i % 4 == 3), "step {step}: {g:?}");
                }
            }
        }
        let later: BTreeSet<String> = (10..40)
            .flat_map(|s| d.groups(s).concat())
            .map(|i| train[i].kind.clone().unwrap())
            .collect();
        assert_eq!(later.len(), 4);
    }

    #[test]
    fn open_first_steps_draw_open_questions() {
        let train = set();
        let d = Draws::new(&train, &config(serde_json::json!({"open_first_steps": 5}))).unwrap();
        for s in 0..5 {
            assert!(d.batch(s).iter().all(|&i| train[i].answer != "yes"));
        }
        assert!((5..30)
            .flat_map(|s| d.batch(s))
            .any(|i| train[i].answer == "yes"));
    }

    #[test]
    fn a_curriculum_type_the_data_lacks_is_named() {
        let train = set();
        let c = config(serde_json::json!({"curriculum": [{"steps": 10, "types": ["a", "shape"]}]}));
        let e = Draws::new(&train, &c).err().unwrap().to_string();
        assert!(
            e.contains("curriculum: stage 1") && e.contains("`shape`"),
            "{e}"
        );
        assert!(e.contains("a, b, c, d"), "{e}");
    }
}
