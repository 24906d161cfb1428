//! The engine: one thread owns the model and runs every chat request in a
//! single continuously batched decode loop (see STYLE.md, mistral.rs).
//!
//! Handlers validate a request and send a [`Job`] over a bounded channel;
//! the engine admits waiting jobs between decode steps (their prompts are
//! prefilled together, then their KV-cache rows join the batch), feeds one
//! token per sequence per step, and drops a sequence's rows as soon as it
//! finishes, its client goes away, or its deadline passes. Text streams
//! back on the job's own channel as [`Event`]s.
//!
//! Rows of different lengths share one cache: shorter ones are left-padded
//! and the padding is masked, positions are per row, so every sequence gets
//! the tokens it would get alone (tested against `Assistant::ask`).

use std::collections::VecDeque;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use autoglm::assistant::Assistant;
use autoglm::fusion::router::Route;
use autoglm::text::generate::{Sampler, Sampling};
use autoglm::text::kv_cache::KvCache;
use autoglm::text::llama::{rotary_positions, Positions};
use candle_core::{DType, Tensor};
use image::RgbImage;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// One chat completion to run.
pub struct Job {
    /// The rendered prompt, image placeholders expanded.
    pub prompt_ids: Vec<u32>,
    pub images: Vec<RgbImage>,
    /// `prompt_ids.len() + max_new_tokens` must fit the context.
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// OpenAI semantics: the answer ends before the first stop string,
    /// which is not part of it.
    pub stop: Vec<String>,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub events: UnboundedSender<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug)]
pub enum Event {
    /// New answer text (never split inside a UTF-8 character, never part
    /// of a stop string).
    Text(String),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(ApiError),
}

/// A sequence in the decode batch.
struct Row {
    job: Job,
    sampler: Sampler,
    /// Prompt and generated ids (the repetition penalty's view).
    seq: Vec<u32>,
    generated: Vec<u32>,
    /// The text sent so far.
    emitted: String,
    /// The last sampled token, fed at the next step, at position `pos`.
    pending: u32,
    pos: u32,
    /// Per cache column: 1 for a real key, 0 for padding.
    mask: Vec<f32>,
}

pub struct Engine {
    assistant: Arc<Assistant>,
    metrics: Arc<Metrics>,
    max_batch: usize,
    rows: Vec<Row>,
    cache: KvCache,
    /// Start of the tokens/s window and the token count then.
    window: (Instant, u64),
}

impl Engine {
    pub fn new(assistant: Arc<Assistant>, metrics: Arc<Metrics>, max_batch: usize) -> Self {
        let cache = assistant.model.lm.new_cache();
        Self {
            assistant,
            metrics,
            max_batch: max_batch.max(1),
            rows: Vec::new(),
            cache,
            window: (Instant::now(), 0),
        }
    }

    /// Sequences in the batch.
    pub fn active(&self) -> usize {
        self.rows.len()
    }

    fn context(&self) -> usize {
        self.assistant.model.lm.config.max_position_embeddings
    }

    /// One round: drop abandoned sequences, one decode step for the batch,
    /// then admit from the front of `waiting` what fits.
    pub fn step(&mut self, waiting: &mut VecDeque<Job>) {
        let now = Instant::now();
        self.keep(|row| {
            if row.job.events.is_closed() {
                return Some(Outcome::Cancelled);
            }
            (now > row.job.deadline).then_some(Outcome::TimedOut)
        });
        if !self.rows.is_empty() {
            if let Err(e) = self.decode() {
                self.fail_all(e);
            }
        }
        let mut admit = Vec::new();
        while self.rows.len() + admit.len() < self.max_batch {
            let Some(front) = waiting.front() else { break };
            let gone = if front.events.is_closed() {
                Some(Outcome::Cancelled)
            } else {
                (now > front.deadline).then_some(Outcome::TimedOut)
            };
            if let Some(outcome) = gone {
                let job = waiting.pop_front().expect("front exists");
                self.metrics.queue_depth.dec();
                self.end(&job, 0, outcome);
                continue;
            }
            if !self.fits(&admit, front) {
                break; // first come, first served: wait for rows to leave
            }
            admit.push(waiting.pop_front().expect("front exists"));
            self.metrics.queue_depth.dec();
        }
        if !admit.is_empty() {
            self.prefill(admit);
        }
        self.metrics.active_sequences.set(self.rows.len() as i64);
        let (t0, n0) = self.window;
        let dt = t0.elapsed().as_secs_f64();
        if dt >= 2.0 {
            let n = self.metrics.generated_tokens.get();
            self.metrics.tokens_per_second.set((n - n0) as f64 / dt);
            self.window = (Instant::now(), n);
        }
    }

    /// Called before the engine waits for work: nothing is generated now.
    pub fn idle(&mut self) {
        self.metrics.tokens_per_second.set(0.0);
        self.window = (Instant::now(), self.metrics.generated_tokens.get());
    }

    /// Whether `job` can join with `admit` without the padded cache
    /// outgrowing the context before every sequence could finish.
    fn fits(&self, admit: &[Job], job: &Job) -> bool {
        let width = admit
            .iter()
            .chain(std::iter::once(job))
            .map(|j| j.prompt_ids.len())
            .chain(std::iter::once(self.cache.len()))
            .max()
            .unwrap_or(0);
        let remaining = self
            .rows
            .iter()
            .map(|r| r.job.max_new_tokens - r.generated.len())
            .chain(
                admit
                    .iter()
                    .chain(std::iter::once(job))
                    .map(|j| j.max_new_tokens.saturating_sub(1)),
            )
            .max()
            .unwrap_or(0);
        width + remaining <= self.context()
    }

    /// Prefills the admitted prompts in one left-padded batch, samples their
    /// first tokens, and merges the unfinished ones into the batch.
    fn prefill(&mut self, admit: Vec<Job>) {
        let a = &self.assistant;
        // The images of every admitted prompt go through the vision tower
        // in one batch per path: a router that chooses before the tower
        // (from the question) sends some down its light path, which sees
        // the images smaller or leaves the tower early. The decoder is the
        // same on both paths, so the rows still decode together.
        let mut jobs = Vec::with_capacity(admit.len());
        // Per path (full, light): the pixels, and per job its path.
        let mut pixels: [Vec<Tensor>; 2] = [Vec::new(), Vec::new()];
        let mut light = Vec::with_capacity(admit.len());
        for job in admit {
            if job.images.is_empty() {
                jobs.push(job);
                light.push(false);
                continue;
            }
            let routed = if routes_images(a) {
                a.model.route_question(&job.prompt_ids)
            } else {
                Ok(None)
            };
            let prepared = routed.and_then(|r| {
                Ok((
                    a.preprocess.batch(&job.images, a.device())?,
                    r == Some(Route::Light),
                ))
            });
            match prepared {
                Ok((p, is_light)) => {
                    pixels[usize::from(is_light)].push(p);
                    jobs.push(job);
                    light.push(is_light);
                }
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e.into()));
                }
            }
        }
        let features = |path: usize| -> autoglm::Result<Option<Tensor>> {
            if pixels[path].is_empty() {
                return Ok(None);
            }
            let p = Tensor::cat(&pixels[path], 0)?;
            Ok(Some(if path == 1 {
                a.model.light_image_features(&p)?
            } else {
                a.model.image_features(&p)?
            }))
        };
        let features = match features(0).and_then(|f| Ok([f, features(1)?])) {
            Ok(f) => f,
            Err(e) => return fail(&jobs, e),
        };
        let mut embeds = Vec::with_capacity(jobs.len());
        let mut ok = Vec::with_capacity(jobs.len());
        let mut first = [0usize; 2];
        for (job, is_light) in jobs.into_iter().zip(light) {
            let (n, path) = (job.images.len(), usize::from(is_light));
            let e = (|| -> autoglm::Result<Tensor> {
                let f = match (&features[path], n) {
                    (Some(f), n) if n > 0 => Some(f.narrow(0, first[path], n)?),
                    _ => None,
                };
                Ok(a.model
                    .embed_prompt_features(&job.prompt_ids, f.as_ref())?
                    .squeeze(0)?)
            })();
            first[path] += n;
            match e {
                Ok(e) => {
                    embeds.push(e);
                    ok.push(job);
                }
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e.into()));
                }
            }
        }
        let jobs = ok;
        if jobs.is_empty() {
            return;
        }
        let width = jobs.iter().map(|j| j.prompt_ids.len()).max().unwrap_or(0);
        let result = (|| -> autoglm::Result<(KvCache, Vec<Vec<f32>>)> {
            let (b, h) = (jobs.len(), embeds[0].dim(1)?);
            let dev = a.device();
            let mut rows = Vec::with_capacity(b);
            let mut mask = vec![0f32; b * width];
            let mut pos = vec![0u32; b * width];
            for (r, e) in embeds.iter().enumerate() {
                let pad = width - e.dim(0)?;
                rows.push(if pad > 0 {
                    Tensor::cat(&[&Tensor::zeros((pad, h), e.dtype(), dev)?, e], 0)?
                } else {
                    e.clone()
                });
                let row_pos = rotary_positions(
                    &jobs[r].prompt_ids,
                    0,
                    a.model.lm.config.shared_position_token,
                );
                for j in pad..width {
                    mask[r * width + j] = 1.0;
                    pos[r * width + j] = row_pos[j - pad];
                }
            }
            let mut cache = a.model.lm.new_cache();
            let hidden = a.model.lm.forward_embeds(
                &Tensor::stack(&rows, 0)?,
                &Positions {
                    positions: Tensor::from_vec(pos, (b, width), dev)?,
                    key_mask: Some(Tensor::from_vec(mask, (b, width), dev)?),
                    context: None,
                    context_mask: None,
                },
                &mut cache,
            )?;
            let logits = a
                .model
                .lm
                .logits(&hidden.narrow(1, width - 1, 1)?)?
                .squeeze(1)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            Ok((cache, logits))
        })();
        let (new_cache, logits) = match result {
            Ok(r) => r,
            Err(e) => return fail(&jobs, e),
        };
        let mut joining = Vec::new();
        let mut keep = Vec::new();
        for (r, (job, logits)) in jobs.into_iter().zip(logits).enumerate() {
            self.metrics
                .prompt_tokens
                .inc_by(job.prompt_ids.len() as u64);
            let sampler = match Sampler::new(job.sampling.clone()) {
                Ok(s) => s,
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e.into()));
                    continue;
                }
            };
            let pad = width - job.prompt_ids.len();
            let mut row = Row {
                seq: job.prompt_ids.clone(),
                pos: rotary_positions(&job.prompt_ids, 0, a.model.lm.config.shared_position_token)
                    .last()
                    .map_or(0, |l| l + 1),
                mask: (0..width)
                    .map(|j| if j < pad { 0.0 } else { 1.0 })
                    .collect(),
                job,
                sampler,
                generated: Vec::new(),
                emitted: String::new(),
                pending: 0,
            };
            match self.advance(&mut row, &logits) {
                Some(outcome) => self.end(&row.job, row.generated.len(), outcome),
                None => {
                    keep.push(r as u32);
                    joining.push(row);
                }
            }
        }
        if joining.is_empty() {
            return;
        }
        let merged = (|| -> autoglm::Result<KvCache> {
            let new_cache = new_cache.select_rows(&keep)?;
            if self.rows.is_empty() {
                return Ok(new_cache);
            }
            let len = self.cache.len().max(width);
            KvCache::cat_rows(&[
                &self.cache.pad_left(len - self.cache.len())?,
                &new_cache.pad_left(len - width)?,
            ])
        })();
        match merged {
            Ok(cache) => {
                let len = cache.len();
                for row in self.rows.iter_mut().chain(joining.iter_mut()) {
                    let pad = len - row.mask.len();
                    row.mask.splice(0..0, std::iter::repeat_n(0.0, pad));
                }
                self.cache = cache;
                self.rows.extend(joining);
            }
            Err(e) => fail(joining.iter().map(|r| &r.job), e),
        }
    }

    /// Feeds every row's pending token and samples the next.
    fn decode(&mut self) -> autoglm::Result<()> {
        let a = &self.assistant;
        let dev = a.device();
        let b = self.rows.len();
        self.metrics.batch_size.observe(b as f64);
        for row in &mut self.rows {
            row.mask.push(1.0);
        }
        let s = self.rows[0].mask.len();
        let ids: Vec<u32> = self.rows.iter().map(|r| r.pending).collect();
        let pos: Vec<u32> = self.rows.iter().map(|r| r.pos).collect();
        let mask: Vec<f32> = self
            .rows
            .iter()
            .flat_map(|r| r.mask.iter().copied())
            .collect();
        let hidden = a.model.lm.forward_embeds(
            &a.model.lm.embed(&Tensor::from_vec(ids, (b, 1), dev)?)?,
            &Positions {
                positions: Tensor::from_vec(pos, (b, 1), dev)?,
                key_mask: Some(Tensor::from_vec(mask, (b, s), dev)?),
                context: None,
                context_mask: None,
            },
            &mut self.cache,
        )?;
        let logits = a
            .model
            .lm
            .logits(&hidden)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut outcomes = Vec::with_capacity(b);
        for (row, logits) in self.rows.iter_mut().zip(&logits) {
            row.pos += 1;
            outcomes.push(Self::advance_row(a, &self.metrics, row, logits));
        }
        let mut outcomes = outcomes.into_iter();
        self.keep(|_| outcomes.next().flatten());
        Ok(())
    }

    fn advance(&self, row: &mut Row, logits: &[f32]) -> Option<Outcome> {
        Self::advance_row(&self.assistant, &self.metrics, row, logits)
    }

    /// Samples the next token of `row` and streams the text it completes;
    /// returns how the row ends, if it does.
    fn advance_row(
        a: &Assistant,
        metrics: &Metrics,
        row: &mut Row,
        logits: &[f32],
    ) -> Option<Outcome> {
        let tok = match row.sampler.sample(logits, &row.seq) {
            Ok(t) => t,
            Err(e) => return Some(Outcome::Failed(e.into())),
        };
        row.generated.push(tok);
        row.seq.push(tok);
        row.pending = tok;
        metrics.generated_tokens.inc();
        if row.generated.len() == 1 {
            metrics
                .time_to_first_token
                .observe(row.job.enqueued.elapsed().as_secs_f64());
        }
        let eos = a.eos_ids.contains(&tok);
        let n = row.generated.len() - usize::from(eos);
        let text = match a.tokenizer.decode(&row.generated[..n]) {
            Ok(t) => t,
            Err(e) => return Some(Outcome::Failed(e.into())),
        };
        let hit = row
            .job
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min();
        let (upto, finish) = if let Some(cut) = hit {
            (cut, Some(FinishReason::Stop))
        } else if eos {
            (text.len(), Some(FinishReason::Stop))
        } else if row.generated.len() >= row.job.max_new_tokens {
            (text.len(), Some(FinishReason::Length))
        } else if text.ends_with('\u{fffd}') {
            (0, None) // an incomplete UTF-8 sequence: wait for its end
        } else {
            // Hold back a tail that may be the start of a stop string.
            let held = row
                .job
                .stop
                .iter()
                .flat_map(|s| {
                    (1..s.len()).filter(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))
                })
                .max()
                .unwrap_or(0);
            (text.len() - held, None)
        };
        if upto > row.emitted.len() && text.starts_with(row.emitted.as_str()) {
            let delta = text[row.emitted.len()..upto].to_string();
            row.emitted.push_str(&delta);
            let _ = row.job.events.send(Event::Text(delta));
        }
        finish.map(Outcome::Finished)
    }

    /// Keeps the rows for which `ends` says nothing, ends the others, and
    /// trims cache columns that are padding in every remaining row.
    fn keep(&mut self, mut ends: impl FnMut(&Row) -> Option<Outcome>) {
        let mut kept = Vec::with_capacity(self.rows.len());
        let mut idx = Vec::with_capacity(self.rows.len());
        for (i, row) in std::mem::take(&mut self.rows).into_iter().enumerate() {
            match ends(&row) {
                Some(outcome) => self.end(&row.job, row.generated.len(), outcome),
                None => {
                    idx.push(i as u32);
                    kept.push(row);
                }
            }
        }
        if kept.is_empty() {
            self.cache = self.assistant.model.lm.new_cache();
            return;
        }
        let all = kept.len() == self.cache.rows();
        let lead = kept
            .iter()
            .map(|r| r.mask.iter().take_while(|&&m| m == 0.0).count())
            .min()
            .unwrap_or(0);
        let cache = (|| -> autoglm::Result<KvCache> {
            let c = if all {
                self.cache.clone()
            } else {
                self.cache.select_rows(&idx)?
            };
            if lead > 0 {
                c.trim_left(lead)
            } else {
                Ok(c)
            }
        })();
        match cache {
            Ok(c) => {
                for row in &mut kept {
                    row.mask.drain(..lead);
                }
                self.cache = c;
                self.rows = kept;
            }
            Err(e) => {
                self.rows = kept;
                self.fail_all(e);
            }
        }
    }

    fn fail_all(&mut self, e: autoglm::Error) {
        fail(self.rows.iter().map(|r| &r.job), e);
        self.rows.clear();
        self.cache = self.assistant.model.lm.new_cache();
    }

    /// Tells the client how `job` ended after `generated` tokens.
    fn end(&self, job: &Job, generated: usize, outcome: Outcome) {
        match outcome {
            Outcome::Finished(finish) => {
                let _ = job.events.send(Event::Done {
                    finish,
                    prompt_tokens: job.prompt_ids.len(),
                    completion_tokens: generated,
                });
            }
            Outcome::Cancelled => {
                self.metrics.cancelled.inc();
            }
            Outcome::TimedOut => {
                self.metrics.timed_out.inc();
                let _ = job.events.send(Event::Failed(ApiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    "the request ran past the server's time limit (--request-timeout); ask for fewer max_tokens or retry when the server is less busy",
                )));
            }
            Outcome::Failed(e) => {
                let _ = job.events.send(Event::Failed(e));
            }
        }
    }
}

/// Tells every job of `jobs` that it failed with `e`.
/// Whether the engine routes `a`'s requests: its router chooses before the
/// tower and leaves the decoder's depth alone (a router over the depth is
/// not followed: the batch decodes every row through every layer).
pub fn routes_images(a: &Assistant) -> bool {
    a.model.router.is_some()
        && a.model.config.routes_before_tower()
        && a.model.config.router_light_layers.is_none()
}

fn fail<'a>(jobs: impl IntoIterator<Item = &'a Job>, e: autoglm::Error) {
    let e: ApiError = e.into();
    for job in jobs {
        let _ = job.events.send(Event::Failed(e.clone()));
    }
}

enum Outcome {
    Finished(FinishReason),
    Cancelled,
    TimedOut,
    Failed(ApiError),
}

/// Runs the engine on its own thread until every sender of `jobs` is gone.
pub fn spawn(
    assistant: Arc<Assistant>,
    metrics: Arc<Metrics>,
    max_batch: usize,
    jobs: Receiver<Job>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("autoglm-engine".into())
        .spawn(move || {
            let mut engine = Engine::new(assistant, metrics.clone(), max_batch);
            let mut waiting = VecDeque::new();
            loop {
                if engine.active() == 0 && waiting.is_empty() {
                    engine.idle();
                    match jobs.recv() {
                        Ok(job) => waiting.push_back(job),
                        Err(_) => return,
                    }
                }
                while engine.active() + waiting.len() < engine.max_batch {
                    match jobs.try_recv() {
                        Ok(job) => waiting.push_back(job),
                        Err(_) => break,
                    }
                }
                engine.step(&mut waiting);
            }
        })
}
