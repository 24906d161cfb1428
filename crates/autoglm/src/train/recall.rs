//! Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology") over
//! long inputs: the task behind the long-input accuracy table in
//! `docs/benchmarks.md`.
//!
//! A sequence opens with `pairs` key–value pairs (distinct keys), like the
//! examples of a few-shot prompt; the rest is filler, and each key is asked
//! once more at a random place in it, followed by its value. The reader
//! must predict the value at each asked key. Every answer lies in the
//! prompt, up to thousands of tokens back, and each question needs only the
//! one pair it names: attention that keeps a few keys per query can answer
//! as well as dense attention, while an LSTM must carry every pair in its
//! state.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{embedding, Embedding, Module, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::nn::{linear_b, Linear};
use crate::text::llama::{Llama, Positions};
use crate::text::lstm::Lstm;
use crate::train::{clip_grad_norm, named_vars, AdamW, AdamWConfig, Schedule};
use crate::{Error, Result};

/// The filler token; keys are `1..=keys`, values follow them.
pub const FILLER: u32 = 0;

/// The shape of the task's sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RecallTask {
    /// Positions per sequence.
    pub tokens: usize,
    /// Key–value pairs at its start; each is asked once.
    pub pairs: usize,
    /// Distinct key tokens (`pairs` of them are drawn per sequence).
    pub keys: usize,
    /// Distinct value tokens.
    pub values: usize,
    /// Each pair of the prompt as one token (one of keys × values), so a
    /// question is answered by one attention lookup; otherwise `k v`, and
    /// the reader must first tie each value to the key before it (the
    /// two-step "induction head" of Olsson et al. 2022).
    pub fused: bool,
}

/// One sequence and its questions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecallExample {
    pub ids: Vec<u32>,
    /// (position of an asked key, the value that must be predicted there).
    pub questions: Vec<(usize, u32)>,
}

impl RecallTask {
    /// The filler, the keys, the values (and the fused pairs).
    pub fn vocab(&self) -> usize {
        1 + self.keys
            + self.values
            + if self.fused {
                self.keys * self.values
            } else {
                0
            }
    }

    fn key_token(&self, k: usize) -> u32 {
        1 + k as u32
    }

    fn value_token(&self, v: usize) -> u32 {
        (1 + self.keys + v) as u32
    }

    fn pair_token(&self, k: usize, v: usize) -> u32 {
        (1 + self.keys + self.values + k * self.values + v) as u32
    }

    pub fn validate(&self) -> Result<()> {
        if self.pairs == 0 || self.values < 2 {
            return Err(Error::Invalid(format!(
                "recall task: pairs ({}) must be ≥ 1 and values ({}) ≥ 2",
                self.pairs, self.values
            )));
        }
        if self.keys < self.pairs {
            return Err(Error::Invalid(format!(
                "recall task: {} pairs need at least as many distinct keys, got keys = {}",
                self.pairs, self.keys
            )));
        }
        if self.tokens < 4 * self.pairs {
            return Err(Error::Invalid(format!(
                "recall task: {} pairs and their {} questions need tokens ≥ {}, got {}",
                self.pairs,
                self.pairs,
                4 * self.pairs,
                self.tokens
            )));
        }
        if self.keys.saturating_mul(self.values) > u32::MAX as usize / 2
            || self.vocab() > u32::MAX as usize
        {
            return Err(Error::Invalid(
                "recall task: too many keys and values".into(),
            ));
        }
        Ok(())
    }

    /// Positions the prompt's pairs take.
    pub fn prompt_len(&self) -> usize {
        if self.fused {
            self.pairs
        } else {
            2 * self.pairs
        }
    }

    /// One sequence: the pairs (`k v`, or fused) at its start, then filler
    /// with each key asked again (`k v`, in random order) in a random free
    /// slot of two positions. A [`Self::validate`]d task only.
    fn sample(&self, rng: &mut StdRng) -> RecallExample {
        let n = self.pairs;
        let keys = rand::seq::index::sample(rng, self.keys, n).into_vec();
        let values: Vec<usize> = (0..n).map(|_| rng.random_range(0..self.values)).collect();
        let mut ids = vec![FILLER; self.tokens];
        for (i, (&k, &v)) in keys.iter().zip(&values).enumerate() {
            if self.fused {
                ids[i] = self.pair_token(k, v);
            } else {
                ids[2 * i] = self.key_token(k);
                ids[2 * i + 1] = self.value_token(v);
            }
        }
        // Free slots of two positions after the pairs; n of them, by index.
        let start = self.prompt_len();
        let slots = (self.tokens - start) / 2;
        let mut chosen = rand::seq::index::sample(rng, slots, n).into_vec();
        chosen.sort_unstable();
        let order = rand::seq::index::sample(rng, n, n).into_vec();
        let mut questions = Vec::with_capacity(n);
        for (slot, pair) in chosen.into_iter().zip(order) {
            let p = start + 2 * slot;
            let answer = self.value_token(values[pair]);
            ids[p] = self.key_token(keys[pair]);
            ids[p + 1] = answer;
            questions.push((p, answer));
        }
        RecallExample { ids, questions }
    }

    /// `count` sequences from a generator seeded by `seed`.
    pub fn examples(&self, count: usize, seed: u64) -> Result<Vec<RecallExample>> {
        self.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        Ok((0..count).map(|_| self.sample(&mut rng)).collect())
    }
}

/// A model that reads a sequence causally and predicts a token at chosen
/// positions.
pub enum Reader {
    Decoder(Box<Llama>),
    Lstm {
        embed: Embedding,
        lstm: Lstm,
        head: Linear,
    },
}

impl Reader {
    /// An LSTM reader: embeddings of `width`, one LSTM layer of `width`, a
    /// linear head over the vocabulary. Names: `embed`, `lstm.*`, `head`.
    pub fn lstm(vb: VarBuilder, vocab: usize, width: usize) -> Result<Self> {
        Ok(Self::Lstm {
            embed: embedding(vocab, width, vb.pp("embed"))?,
            lstm: Lstm::new(vb.pp("lstm"), width, width)?,
            head: linear_b(width, vocab, true, vb.pp("head"))?,
        })
    }

    /// Logits at `at` (indices into the flattened (B·T) positions of
    /// `ids`).
    ///
    /// # Shapes
    /// `ids`: (B, T) u32, `at`: (N) u32 → (N, V)
    pub fn logits_at(&self, ids: &Tensor, at: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        match self {
            Self::Decoder(m) => {
                let pos = Positions::contiguous(b, t, 0, ids.device())?;
                let h = m.forward_embeds(&m.embed(ids)?, &pos, &mut m.new_cache())?;
                let h = h.reshape((b * t, h.dim(2)?))?.index_select(at, 0)?;
                m.logits(&h)
            }
            Self::Lstm { embed, lstm, head } => {
                let (h, _) = lstm.forward(&embed.forward(ids)?, &vec![t; b])?;
                let h = h.reshape((b * t, lstm.hidden()))?.index_select(at, 0)?;
                head.forward(&h)
            }
        }
    }
}

/// Stacks examples of one length into (B, T) ids, the flat positions of
/// their questions and the answers.
fn batch(examples: &[&RecallExample], dev: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let t = examples[0].ids.len();
    if examples.iter().any(|e| e.ids.len() != t) {
        return Err(Error::Invalid(
            "recall batch: sequences of different lengths".into(),
        ));
    }
    let ids: Vec<u32> = examples.iter().flat_map(|e| e.ids.clone()).collect();
    let (mut at, mut answers) = (Vec::new(), Vec::new());
    for (row, e) in examples.iter().enumerate() {
        for &(p, v) in &e.questions {
            at.push((row * t + p) as u32);
            answers.push(v);
        }
    }
    let n = at.len();
    Ok((
        Tensor::from_vec(ids, (examples.len(), t), dev)?,
        Tensor::from_vec(at, n, dev)?,
        Tensor::from_vec(answers, n, dev)?,
    ))
}

/// How a reader is trained.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RecallTraining {
    pub steps: usize,
    pub batch_size: usize,
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub clip_norm: f64,
    /// Seeds the generator of the training sequences (one stream for the
    /// run: a seed of its own never repeats another's sequences, as a seed
    /// per step could).
    pub seed: u64,
}

/// Trains every variable of `vm` on fresh sequences of `task`; calls
/// `log(step, loss)` after each step. Returns the last step's loss.
pub fn train(
    reader: &Reader,
    vm: &VarMap,
    task: &RecallTask,
    cfg: &RecallTraining,
    mut log: impl FnMut(usize, f64),
) -> Result<f64> {
    task.validate()?;
    if cfg.steps == 0 || cfg.batch_size == 0 {
        return Err(Error::Invalid(
            "recall training: steps and batch_size must be ≥ 1".into(),
        ));
    }
    let dev = Device::Cpu;
    let named = named_vars(vm, &[])?;
    let vars: Vec<candle_core::Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(named, AdamWConfig::default())?;
    let schedule = Schedule {
        peak_lr: cfg.peak_lr,
        warmup_steps: cfg.warmup_steps,
        total_steps: cfg.steps,
        final_fraction: 0.1,
    };
    let mut last = f64::NAN;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    for step in 0..cfg.steps {
        let examples: Vec<RecallExample> =
            (0..cfg.batch_size).map(|_| task.sample(&mut rng)).collect();
        let refs: Vec<&RecallExample> = examples.iter().collect();
        let (ids, at, answers) = batch(&refs, &dev)?;
        let loss = candle_nn::loss::cross_entropy(&reader.logits_at(&ids, &at)?, &answers)?;
        last = loss.to_scalar::<f32>()? as f64;
        if !last.is_finite() {
            return Err(Error::Invalid(format!(
                "recall training diverged at step {step} (loss {last}): lower the learning rate"
            )));
        }
        let mut grads = loss.backward()?;
        clip_grad_norm(&mut grads, &vars, cfg.clip_norm)?;
        opt.step(&grads, schedule.lr(step))?;
        log(step, last);
    }
    Ok(last)
}

/// Accuracy and speed of a reader on held-out sequences.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecallScore {
    pub correct: usize,
    pub questions: usize,
    /// Median seconds to read one sequence (its logits at the questions).
    pub median_seconds: f64,
}

impl RecallScore {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.questions.max(1) as f64
    }
}

/// Reads each example alone (batch 1, as a prompt is served) and counts
/// the questions whose most likely token is the answer.
pub fn evaluate(reader: &Reader, examples: &[RecallExample]) -> Result<RecallScore> {
    let dev = Device::Cpu;
    let (mut correct, mut questions, mut times) = (0, 0, Vec::new());
    for e in examples {
        let (ids, at, answers) = batch(&[e], &dev)?;
        let start = Instant::now();
        let logits = reader.logits_at(&ids, &at)?;
        times.push(start.elapsed().as_secs_f64());
        let guess = logits.argmax(1)?.to_vec1::<u32>()?;
        let answers = answers.to_vec1::<u32>()?;
        correct += guess.iter().zip(&answers).filter(|(g, a)| g == a).count();
        questions += answers.len();
    }
    times.sort_by(f64::total_cmp);
    Ok(RecallScore {
        correct,
        questions,
        median_seconds: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
    })
}

/// Vars of a fresh map in the dtype every reader here uses.
pub fn var_builder(vm: &VarMap) -> VarBuilder<'_> {
    VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LlamaConfig;
    use crate::train::vqa::init_weights;

    fn task() -> RecallTask {
        RecallTask {
            tokens: 40,
            pairs: 4,
            keys: 8,
            values: 6,
            fused: false,
        }
    }

    /// The prompt's (key, value) tokens, either layout.
    fn prompt(t: &RecallTask, ids: &[u32]) -> Vec<(u32, u32)> {
        if t.fused {
            let base = (1 + t.keys + t.values) as u32;
            ids[..t.pairs]
                .iter()
                .map(|&x| {
                    assert!(x >= base, "{x} is not a pair token");
                    let (k, v) = (
                        (x - base) as usize / t.values,
                        (x - base) as usize % t.values,
                    );
                    (t.key_token(k), t.value_token(v))
                })
                .collect()
        } else {
            ids[..2 * t.pairs].chunks(2).map(|c| (c[0], c[1])).collect()
        }
    }

    #[test]
    fn every_question_asks_a_key_of_the_prompt_and_its_value_follows() {
        for fused in [false, true] {
            questions_ask_the_prompt(RecallTask { fused, ..task() });
        }
    }

    fn questions_ask_the_prompt(t: RecallTask) {
        let examples = t.examples(50, 7).unwrap();
        assert_eq!(
            examples,
            t.examples(50, 7).unwrap(),
            "not deterministic by seed"
        );
        assert_ne!(examples, t.examples(50, 8).unwrap());
        for e in &examples {
            assert_eq!(e.ids.len(), t.tokens);
            assert_eq!(e.questions.len(), t.pairs);
            let prompt = prompt(&t, &e.ids);
            let mut keys: Vec<u32> = prompt.iter().map(|p| p.0).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), t.pairs, "keys repeat in the prompt");
            assert!(prompt
                .iter()
                .all(|&(k, v)| (1..=8).contains(&k) && (9..15).contains(&v)));
            let mut asked = Vec::new();
            for &(p, v) in &e.questions {
                assert!(p >= t.prompt_len() && p + 1 < t.tokens);
                let pair = prompt.iter().find(|x| x.0 == e.ids[p]).unwrap();
                assert_eq!(pair.1, v, "the answer is not the key's value");
                assert_eq!(e.ids[p + 1], v, "the value does not follow the question");
                asked.push(e.ids[p]);
            }
            asked.sort_unstable();
            assert_eq!(asked, keys, "each key is asked exactly once");
            // Everything else after the prompt is filler.
            let filled = e.ids[t.prompt_len()..]
                .iter()
                .filter(|&&x| x != FILLER)
                .count();
            assert_eq!(filled, 2 * t.pairs);
        }
    }

    #[test]
    fn impossible_tasks_are_refused_naming_the_field() {
        let short = RecallTask {
            tokens: 15,
            ..task()
        };
        let e = short.examples(1, 0).unwrap_err().to_string();
        assert!(e.contains("tokens ≥ 16"), "{e}");
        let few_keys = RecallTask { keys: 3, ..task() };
        let e = few_keys.validate().unwrap_err().to_string();
        assert!(e.contains("keys = 3"), "{e}");
        assert!(RecallTask { pairs: 0, ..task() }.validate().is_err());
        assert!(task().validate().is_ok());
    }

    /// Both readers learn the task far above chance (1 in 4 values) at a
    /// small size, so the trainer and the gathered logits are wired right.
    /// (Measured: the decoder 1.0, the LSTM 0.61.)
    #[test]
    fn both_readers_learn_short_recall() {
        let t = RecallTask {
            tokens: 24,
            pairs: 2,
            keys: 4,
            values: 4,
            fused: false,
        };
        let held_out = t.examples(100, 99).unwrap();
        let training = RecallTraining {
            steps: 300,
            batch_size: 16,
            peak_lr: 3e-3,
            warmup_steps: 20,
            clip_norm: 1.0,
            seed: 1,
        };
        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": t.vocab(), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": t.tokens, "tie_word_embeddings": true
        }))
        .unwrap();
        let vm = VarMap::new();
        let vb = var_builder(&vm);
        let dec = Reader::Decoder(Box::new(
            Llama::new(vb.pp("model"), vb.pp("lm_head"), &cfg).unwrap(),
        ));
        init_weights(&vm, 0, None).unwrap();
        let before = evaluate(&dec, &held_out).unwrap().accuracy();
        train(&dec, &vm, &t, &training, |_, _| {}).unwrap();
        let after = evaluate(&dec, &held_out).unwrap().accuracy();
        assert!(after > 0.9, "decoder: {before} → {after}");

        let vm = VarMap::new();
        let lstm = Reader::lstm(var_builder(&vm), t.vocab(), 32).unwrap();
        init_weights(&vm, 0, None).unwrap();
        train(&lstm, &vm, &t, &training, |_, _| {}).unwrap();
        let after = evaluate(&lstm, &held_out).unwrap().accuracy();
        assert!(after > 0.45, "LSTM: {after}");
    }
}
