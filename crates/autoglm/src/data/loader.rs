//! Batches of decoded, preprocessed images with their questions and answers.
//!
//! Worker threads decode ahead of the consumer (bounded prefetch); batch `i`
//! always comes from worker `i % workers`, so the order — and therefore
//! training — is the same whatever the threads' timing. The order of an
//! epoch is a Fisher-Yates shuffle seeded by `(seed, epoch)`.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{BadRow, VqaExample};
use crate::io::image::{load, ImageLimits};
use crate::io::preprocess::Preprocess;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Decoding threads (at least 1).
    pub workers: usize,
    /// Batches each worker may have ready ahead of the consumer.
    pub prefetch: usize,
    /// Skip a last batch smaller than `batch_size`.
    pub drop_last: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            shuffle: true,
            seed: 0,
            workers: 2,
            prefetch: 2,
            drop_last: false,
        }
    }
}

/// A batch: `pixels` (B, 3, H, W) and the examples they came from.
pub struct Batch {
    pub pixels: Tensor,
    pub examples: Vec<VqaExample>,
    /// Dataset indices of the examples.
    pub indices: Vec<usize>,
}

/// The order of `n` examples in `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        // Distinct, reproducible streams per epoch.
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch);
        for i in (1..n).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
    }
    order
}

pub struct Loader {
    examples: Arc<Vec<VqaExample>>,
    preprocess: Arc<Preprocess>,
    cfg: LoaderConfig,
    limits: ImageLimits,
    /// Images that failed to decode, across epochs (deduplicated).
    bad: Arc<Mutex<Vec<BadRow>>>,
}

impl Loader {
    pub fn new(
        examples: Vec<VqaExample>,
        preprocess: Preprocess,
        cfg: LoaderConfig,
    ) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.workers == 0 || cfg.prefetch == 0 {
            return Err(Error::Invalid(
                "batch_size, workers and prefetch must be positive".into(),
            ));
        }
        if examples.is_empty() {
            return Err(Error::Invalid("the dataset is empty".into()));
        }
        Ok(Self {
            examples: Arc::new(examples),
            preprocess: Arc::new(preprocess),
            cfg,
            limits: ImageLimits::default(),
            bad: Arc::default(),
        })
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Batches per epoch.
    pub fn batches(&self) -> usize {
        let (n, b) = (self.examples.len(), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Images that could not be decoded so far (their examples were left
    /// out of their batches), with 1-based dataset positions.
    pub fn bad_images(&self) -> Vec<BadRow> {
        let mut v = self.bad.lock().map(|b| b.clone()).unwrap_or_default();
        v.sort_by_key(|b| b.line);
        v.dedup();
        v
    }

    /// The batches of one epoch, decoded ahead by the workers.
    pub fn epoch(&self, epoch: u64) -> Batches {
        let order = Arc::new(epoch_order(
            self.examples.len(),
            self.cfg.seed,
            epoch,
            self.cfg.shuffle,
        ));
        let n_batches = self.batches();
        let workers = self.cfg.workers.min(n_batches.max(1));
        let mut receivers = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = sync_channel::<Result<Batch>>(self.cfg.prefetch);
            let (order, examples, pre, bad) = (
                order.clone(),
                self.examples.clone(),
                self.preprocess.clone(),
                self.bad.clone(),
            );
            let (bs, limits) = (self.cfg.batch_size, self.limits);
            std::thread::spawn(move || {
                for bi in (w..n_batches).step_by(workers) {
                    let idx = &order[bi * bs..((bi + 1) * bs).min(order.len())];
                    let batch = make_batch(idx, &examples, &pre, limits, &bad);
                    // The consumer went away: stop quietly.
                    if tx.send(batch).is_err() {
                        return;
                    }
                }
            });
            receivers.push(rx);
        }
        Batches {
            receivers,
            next: 0,
            total: n_batches,
        }
    }
}

fn make_batch(
    idx: &[usize],
    examples: &[VqaExample],
    pre: &Preprocess,
    limits: ImageLimits,
    bad: &Mutex<Vec<BadRow>>,
) -> Result<Batch> {
    let mut pixels = Vec::with_capacity(idx.len());
    let mut kept = Vec::with_capacity(idx.len());
    for &i in idx {
        let ex = &examples[i];
        let img = load(&ex.image, limits)
            .and_then(|im| pre.normalize(&pre.resize_crop(&im)?, &Device::Cpu));
        match img {
            Ok(t) => {
                pixels.push(t);
                kept.push(i);
            }
            Err(e) => {
                if let Ok(mut b) = bad.lock() {
                    b.push(BadRow {
                        line: i + 1,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    if pixels.is_empty() {
        return Err(Error::Invalid(
            "every image of a batch failed to decode; see the bad-row report".into(),
        ));
    }
    Ok(Batch {
        pixels: Tensor::stack(&pixels, 0)?,
        examples: kept.iter().map(|&i| examples[i].clone()).collect(),
        indices: kept,
    })
}

/// Iterator over an epoch's batches, in order.
pub struct Batches {
    receivers: Vec<Receiver<Result<Batch>>>,
    next: usize,
    total: usize,
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let w = self.next % self.receivers.len();
        self.next += 1;
        Some(
            self.receivers[w].recv().unwrap_or_else(|_| {
                Err(Error::Invalid("a data worker stopped unexpectedly".into()))
            }),
        )
    }
}
