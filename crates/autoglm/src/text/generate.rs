//! Token generation: sampling (greedy, temperature, top-k, top-p,
//! repetition penalty, seeded), stop tokens and strings, a streaming
//! callback, and batched generation of prompts of different lengths (left
//! padding + attention mask) that gives the same tokens as one by one.
//!
//! The order of the logits processors follows transformers' `generate`:
//! repetition penalty, then temperature, top-k, top-p.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::text::kv_cache::KvCache;
use crate::text::llama::{Llama, Positions};
use crate::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1 means none; > 1 discourages tokens already in the sequence.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// What to generate and when to stop.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops after any of these (it is kept in the output).
    pub stop_token_ids: Vec<u32>,
    /// Generation stops once the decoded text ends with one of these.
    pub stop_strings: Vec<String>,
    /// A closed set of answers: each step may only choose a token that
    /// continues one of them (a stop token once one is complete).
    pub answer_space: Option<std::sync::Arc<AnswerSpace>>,
    /// Decode with the first `n` decoder layers only (early exit: the light
    /// path of a routed model); `None`: all of them.
    pub layers: Option<usize>,
}

/// A closed set of answers as token sequences (a trie), for constrained
/// decoding: the model still picks every token, among those that keep the
/// text on one of the answers.
#[derive(Debug, Clone)]
pub struct AnswerSpace {
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Clone, Default)]
struct TrieNode {
    next: std::collections::BTreeMap<u32, usize>,
    end: bool,
}

impl Default for AnswerSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl AnswerSpace {
    pub fn new() -> Self {
        Self {
            nodes: vec![TrieNode::default()],
        }
    }

    /// Adds one answer (its tokens, without a stop token); empty ones are
    /// ignored.
    pub fn insert(&mut self, tokens: &[u32]) {
        if tokens.is_empty() {
            return;
        }
        let mut at = 0;
        for &t in tokens {
            at = match self.nodes[at].next.get(&t) {
                Some(&n) => n,
                None => {
                    self.nodes.push(TrieNode::default());
                    let n = self.nodes.len() - 1;
                    self.nodes[at].next.insert(t, n);
                    n
                }
            };
        }
        self.nodes[at].end = true;
    }

    /// Whether no answer was added.
    pub fn is_empty(&self) -> bool {
        self.nodes[0].next.is_empty()
    }

    /// The tokens that may follow `prefix`, and whether `prefix` is itself
    /// an answer; `None` when no answer starts with `prefix`.
    pub fn after(&self, prefix: &[u32]) -> Option<(Vec<u32>, bool)> {
        let mut at = 0;
        for t in prefix {
            at = *self.nodes[at].next.get(t)?;
        }
        let n = &self.nodes[at];
        Some((n.next.keys().copied().collect(), n.end))
    }

    /// Leaves in `logits` only the tokens that continue an answer after
    /// `prefix`, and `stop` tokens where `prefix` is a whole answer (or has
    /// left the space); the rest get a large negative (finite) logit.
    pub fn restrict(&self, logits: &mut [f32], prefix: &[u32], stop: &[u32]) {
        let (mut allowed, end) = self.after(prefix).unwrap_or((Vec::new(), true));
        if end || allowed.is_empty() {
            allowed.extend(stop);
        }
        let mut keep = vec![false; logits.len()];
        for &t in &allowed {
            if let Some(k) = keep.get_mut(t as usize) {
                *k = true;
            }
        }
        if !keep.iter().any(|&k| k) {
            return;
        }
        for (l, k) in logits.iter_mut().zip(keep) {
            if !k {
                *l = -1e30;
            }
        }
    }
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: Sampling::default(),
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            answer_space: None,
            layers: None,
        }
    }
}

/// Picks tokens from logits; owns the seeded random generator.
pub struct Sampler {
    cfg: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Result<Self> {
        if cfg.temperature.is_nan() || cfg.temperature < 0.0 || cfg.repetition_penalty <= 0.0 {
            return Err(Error::Invalid(format!(
                "temperature must be ≥ 0 and repetition penalty > 0 (got {} and {})",
                cfg.temperature, cfg.repetition_penalty
            )));
        }
        if !cfg.repetition_penalty.is_finite() {
            return Err(Error::Invalid("repetition penalty must be finite".into()));
        }
        if let Some(p) = cfg.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Invalid(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        let rng = StdRng::seed_from_u64(cfg.seed);
        Ok(Self { cfg, rng })
    }

    /// The next token given the logits of the last position and the
    /// sequence so far (prompt and generated).
    pub fn sample(&mut self, logits: &[f32], previous: &[u32]) -> Result<u32> {
        if logits.is_empty() || logits.iter().any(|v| !v.is_finite()) {
            return Err(Error::Invalid(
                "the model produced empty or non-finite logits (NaN/inf); the checkpoint is broken or its weights overflow".into(),
            ));
        }
        let mut l = logits.to_vec();
        if self.cfg.repetition_penalty != 1.0 {
            let p = self.cfg.repetition_penalty;
            let mut seen = std::collections::HashSet::new();
            for &t in previous {
                if seen.insert(t) {
                    if let Some(v) = l.get_mut(t as usize) {
                        *v = if *v < 0.0 { *v * p } else { *v / p };
                    }
                }
            }
        }
        // A temperature this small is greedy (and would overflow below).
        if self.cfg.temperature < 1e-5 {
            return Ok(argmax(&l));
        }
        let t = self.cfg.temperature;
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        // As in transformers, top_k = 0 disables the filter.
        if let Some(k) = self.cfg.top_k.filter(|&k| k > 0) {
            idx.truncate(k);
        }
        let max = l[idx[0]] as f64 / t;
        let mut probs: Vec<f64> = idx.iter().map(|&i| (l[i] as f64 / t - max).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if let Some(top_p) = self.cfg.top_p {
            // Keep the smallest prefix whose mass reaches top_p (at least one).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= top_p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let r: f64 = self.rng.random();
        let mut acc = 0.0;
        for (n, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return Ok(idx[n] as u32);
            }
        }
        Ok(idx[probs.len() - 1] as u32)
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Stop,
    Length,
    Cancelled,
}

/// Generated tokens of one sequence.
#[derive(Debug, Clone)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

/// Decodes tokens to text, for stop strings and streaming.
pub type Decode<'a> = &'a dyn Fn(&[u32]) -> Result<String>;

/// Generates after each prompt, all prompts in one batch.
///
/// `prompts[i]` are the prompt embeddings (T_i, H) — from `Llama::embed` or
/// with image features spliced in — and `prompt_ids[i]` their token ids (for
/// the repetition penalty). Prompts are left-padded to the longest; the
/// padding is masked and positions restart at 0 in every row, so each row
/// gets the tokens it would get alone. `on_token(row, token)` streams each
/// token as it is chosen and returns false to cancel that row.
pub fn generate_batch(
    lm: &Llama,
    prompts: &[Tensor],
    prompt_ids: &[Vec<u32>],
    cfg: &GenerateConfig,
    decode: Option<Decode>,
    on_token: &mut dyn FnMut(usize, u32) -> bool,
) -> Result<Vec<Generated>> {
    generate_batch_with_context(lm, prompts, prompt_ids, None, cfg, decode, on_token)
}

/// As [`generate_batch`], with the image context (B, P, H) that a decoder
/// with cross-attention blocks attends to at every step.
pub fn generate_batch_with_context(
    lm: &Llama,
    prompts: &[Tensor],
    prompt_ids: &[Vec<u32>],
    context: Option<&Tensor>,
    cfg: &GenerateConfig,
    decode: Option<Decode>,
    on_token: &mut dyn FnMut(usize, u32) -> bool,
) -> Result<Vec<Generated>> {
    let b = prompts.len();
    if let Some(c) = context {
        if c.dim(0)? != b {
            return Err(Error::Invalid(format!(
                "generate: {} image contexts for {b} prompts",
                c.dim(0)?
            )));
        }
    }
    if b == 0 || prompt_ids.len() != b {
        return Err(Error::Invalid(
            "generate: need one id list per prompt".into(),
        ));
    }
    if cfg.stop_strings.iter().any(String::is_empty) {
        return Err(Error::Invalid("stop strings must not be empty".into()));
    }
    if !cfg.stop_strings.is_empty() && decode.is_none() {
        return Err(Error::Invalid(
            "stop strings need a tokenizer to decode with".into(),
        ));
    }
    let lens: Vec<usize> = prompts
        .iter()
        .map(|p| p.dim(0))
        .collect::<candle_core::Result<_>>()?;
    if lens.contains(&0) {
        return Err(Error::Invalid(
            "cannot generate after an empty prompt".into(),
        ));
    }
    let t_max = *lens.iter().max().expect("non-empty");
    let max_ctx = lm.config.max_position_embeddings;
    if t_max + cfg.max_new_tokens > max_ctx {
        return Err(Error::Invalid(format!(
            "prompt of {t_max} tokens + {} new tokens exceeds the context of {max_ctx}; shorten the prompt or lower max_new_tokens",
            cfg.max_new_tokens
        )));
    }
    let dev = prompts[0].device().clone();
    let h = prompts[0].dim(1)?;
    // Left padding: zeros before each prompt, masked out.
    let mut rows = Vec::with_capacity(b);
    let mut mask = vec![0f32; b * t_max];
    let mut pos = vec![0u32; b * t_max];
    // Each row's first new token's position.
    let mut next_pos = Vec::with_capacity(b);
    let shared = lm.config.shared_position_token;
    for (r, p) in prompts.iter().enumerate() {
        let pad = t_max - lens[r];
        let row_pos = match shared {
            Some(_) if prompt_ids[r].len() != lens[r] => {
                return Err(Error::Invalid(format!(
                    "generate: prompt {r} has {} embeddings but {} ids; a model whose image tokens share a position needs every prompt position's id",
                    lens[r],
                    prompt_ids[r].len()
                )));
            }
            Some(_) => crate::text::llama::rotary_positions(&prompt_ids[r], 0, shared),
            None => (0..lens[r] as u32).collect(),
        };
        next_pos.push(row_pos.last().map_or(0, |l| l + 1));
        rows.push(if pad > 0 {
            Tensor::cat(&[&Tensor::zeros((pad, h), p.dtype(), &dev)?, p], 0)?
        } else {
            p.clone()
        });
        for j in pad..t_max {
            mask[r * t_max + j] = 1.0;
            pos[r * t_max + j] = row_pos[j - pad];
        }
    }
    let mut key_mask = Tensor::from_vec(mask, (b, t_max), &dev)?;
    let positions = Tensor::from_vec(pos, (b, t_max), &dev)?;
    let embeds = Tensor::stack(&rows, 0)?;
    let mut cache = lm.new_cache();
    let depth = [cfg.layers.unwrap_or(lm.depth())];
    // One decoder call at the chosen depth, with the image context.
    let run = |embeds: &Tensor, positions, key_mask: &Tensor, cache: &mut KvCache| {
        let pos = Positions {
            positions,
            key_mask: Some(key_mask.clone()),
            context: context.cloned(),
            context_mask: None,
        };
        Ok::<_, Error>(
            lm.forward_embeds_exits(embeds, &pos, cache, &depth)?
                .remove(0),
        )
    };
    let hidden = run(&embeds, positions, &key_mask, &mut cache)?;
    let mut last = hidden.narrow(1, t_max - 1, 1)?; // (B, 1, H)

    let mut samplers = (0..b)
        .map(|_| Sampler::new(cfg.sampling.clone()))
        .collect::<Result<Vec<_>>>()?;
    let mut seqs: Vec<Vec<u32>> = prompt_ids.to_vec();
    let mut out: Vec<Generated> = (0..b)
        .map(|_| Generated {
            tokens: Vec::new(),
            finish: Finish::Length,
        })
        .collect();
    let mut done = vec![false; b];
    for step in 0..cfg.max_new_tokens {
        let mut logits = lm
            .logits(&last)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut next = vec![0u32; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            if let Some(space) = &cfg.answer_space {
                space.restrict(&mut logits[r], &out[r].tokens, &cfg.stop_token_ids);
            }
            let tok = samplers[r].sample(&logits[r], &seqs[r])?;
            next[r] = tok;
            seqs[r].push(tok);
            out[r].tokens.push(tok);
            if !on_token(r, tok) {
                done[r] = true;
                out[r].finish = Finish::Cancelled;
            } else if cfg.stop_token_ids.contains(&tok) {
                done[r] = true;
                out[r].finish = Finish::Stop;
            } else if let Some(dec) = decode {
                if !cfg.stop_strings.is_empty() {
                    // A stop string may end inside the last token (HF's
                    // StopStringCriteria): search the text that token could
                    // have completed.
                    let n = out[r].tokens.len();
                    let before = dec(&out[r].tokens[..n - 1])?.len();
                    let text = dec(&out[r].tokens)?;
                    let hit = cfg.stop_strings.iter().any(|s| {
                        let from = before.saturating_sub(s.len() - 1);
                        text.get(from..).is_some_and(|t| t.contains(s.as_str()))
                    });
                    if hit {
                        done[r] = true;
                        out[r].finish = Finish::Stop;
                    }
                }
            }
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        // Feed the chosen tokens (finished rows feed theirs too; ignored).
        let ids = Tensor::from_vec(next, (b, 1), &dev)?;
        let step_pos: Vec<u32> = (0..b).map(|r| next_pos[r] + step as u32).collect();
        key_mask = Tensor::cat(&[&key_mask, &Tensor::ones((b, 1), DType::F32, &dev)?], 1)?;
        let step_pos = Tensor::from_vec(step_pos, (b, 1), &dev)?;
        let hidden = run(&lm.embed(&ids)?, step_pos, &key_mask, &mut cache)?;
        last = hidden;
    }
    Ok(out)
}

/// Generates after one prompt; see [`generate_batch`].
pub fn generate(
    lm: &Llama,
    prompt: &Tensor,
    prompt_ids: &[u32],
    cfg: &GenerateConfig,
    decode: Option<Decode>,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generated> {
    generate_with_context(lm, prompt, prompt_ids, None, cfg, decode, on_token)
}

/// As [`generate`], with the image context (1, P, H) of a decoder with
/// cross-attention blocks.
pub fn generate_with_context(
    lm: &Llama,
    prompt: &Tensor,
    prompt_ids: &[u32],
    context: Option<&Tensor>,
    cfg: &GenerateConfig,
    decode: Option<Decode>,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generated> {
    let mut g = generate_batch_with_context(
        lm,
        std::slice::from_ref(prompt),
        &[prompt_ids.to_vec()],
        context,
        cfg,
        decode,
        &mut |_, t| on_token(t),
    )?;
    Ok(g.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_after_repetition_penalty() {
        let mut s = Sampler::new(Sampling::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 2.0, 1.9], &[]).unwrap(), 1);
        let mut s = Sampler::new(Sampling {
            repetition_penalty: 1.5,
            ..Sampling::default()
        })
        .unwrap();
        // 2.0 / 1.5 < 1.9: the repeated token loses; negative logits are multiplied.
        assert_eq!(s.sample(&[0.1, 2.0, 1.9], &[1]).unwrap(), 2);
        assert_eq!(s.sample(&[-1.0, -1.2, -3.0], &[0]).unwrap(), 1);
        assert!(s.sample(&[0.0, f32::NAN], &[]).is_err());
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k_top_p() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let cfg = Sampling {
            temperature: 1.0,
            top_k: Some(5),
            seed: 7,
            ..Sampling::default()
        };
        let draw = |cfg: Sampling| {
            let mut s = Sampler::new(cfg).unwrap();
            (0..200)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(cfg.clone());
        assert_eq!(a, draw(cfg.clone()), "same seed, same tokens");
        assert_ne!(
            a,
            draw(Sampling {
                seed: 8,
                ..cfg.clone()
            })
        );
        let mut order: Vec<usize> = (0..50).collect();
        order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
        assert!(
            a.iter().all(|t| order[..5].contains(&(*t as usize))),
            "top-k = 5"
        );
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 1);
        // A tiny top_p keeps only the most likely token.
        let p = draw(Sampling {
            top_k: None,
            top_p: Some(1e-6),
            ..cfg
        });
        assert!(p.iter().all(|&t| t as usize == order[0]));
    }

    #[test]
    fn bad_sampling_settings_are_refused() {
        assert!(Sampler::new(Sampling {
            temperature: -1.0,
            ..Sampling::default()
        })
        .is_err());
        assert!(Sampler::new(Sampling {
            top_p: Some(0.0),
            ..Sampling::default()
        })
        .is_err());
        assert!(Sampler::new(Sampling {
            temperature: f64::NAN,
            ..Sampling::default()
        })
        .is_err());
    }
}
