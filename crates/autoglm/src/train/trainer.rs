//! The training loop, written out: forward, loss, backward, clip, step,
//! schedule — with gradient accumulation, frozen parameters by name prefix,
//! evaluation every N steps, metrics as JSON lines, and a crash-safe
//! checkpoint every N steps from which `resume` continues exactly.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use super::{
    clip_grad_norm, load_checkpoint, save_checkpoint, varmap_tensors, AdamW, AdamWConfig,
    Checkpoint, Schedule,
};
use crate::{Error, Result};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Micro-batches whose gradients are summed (averaged) per step.
    pub grad_accum: usize,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    /// Global gradient-norm limit (0 = no clipping).
    pub clip_norm: f64,
    /// Parameters whose names start with one of these are frozen.
    pub freeze: Vec<String>,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    pub seed: u64,
    /// Micro-batches computed at once, each on its own thread (data
    /// parallelism on one machine; the sum of the gradients is the same as
    /// one at a time).
    #[serde(default = "one")]
    pub workers: usize,
}

fn one() -> usize {
    1
}

impl TrainConfig {
    /// `steps` of AdamW (its defaults) with linear warmup to `peak_lr`,
    /// then cosine decay to 5 % of it; every parameter trains, one
    /// micro-batch a step, no evaluation or checkpoints until set.
    pub fn cosine(
        steps: usize,
        peak_lr: f64,
        warmup_steps: usize,
        clip_norm: f64,
        seed: u64,
    ) -> Self {
        Self {
            steps,
            grad_accum: 1,
            workers: 1,
            schedule: Schedule {
                peak_lr,
                warmup_steps,
                total_steps: steps,
                final_fraction: 0.05,
            },
            adamw: AdamWConfig::default(),
            clip_norm,
            freeze: Vec::new(),
            eval_every: 0,
            checkpoint_every: 0,
            seed,
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Metrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Evaluation results, on evaluation steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<serde_json::Value>,
    pub seconds: f64,
}

pub struct Trainer {
    pub config: TrainConfig,
    vars: Vec<(String, Var)>,
    opt: AdamW,
    out: PathBuf,
    /// The next step to run (after `resume`, the checkpoint's step).
    pub step: usize,
}

/// The checkpoint's file name in a run's directory.
const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Clears what an earlier run left in `out` before a fresh (not resumed)
/// run: its model no longer matches the files the new run writes, and a
/// `--resume` before the new run's first checkpoint would otherwise load
/// the old run's weights.
pub fn clear_previous_run(out: &Path) -> Result<()> {
    for name in ["model.safetensors", CHECKPOINT_FILE] {
        let path = out.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&path, e)),
            _ => {}
        }
    }
    Ok(())
}

impl Trainer {
    /// Trains the variables of `varmap` whose names are not frozen; writes
    /// into `out` (created): `metrics.jsonl`, `checkpoint.safetensors`.
    pub fn new(varmap: &VarMap, config: TrainConfig, out: &Path) -> Result<Self> {
        if config.grad_accum == 0 || config.steps == 0 {
            return Err(Error::Invalid(
                "steps and grad_accum must be positive".into(),
            ));
        }
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let vars = super::checkpoint::named_vars(varmap, &config.freeze)?;
        if vars.is_empty() {
            return Err(Error::Invalid(
                "every parameter is frozen: nothing to train".into(),
            ));
        }
        let opt = AdamW::new(vars.clone(), config.adamw)?;
        Ok(Self {
            config,
            vars,
            opt,
            out: out.to_path_buf(),
            step: 0,
        })
    }

    pub fn trainable(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.out.join(CHECKPOINT_FILE)
    }

    /// Continues from `out/checkpoint.safetensors` if there is one; returns
    /// whether it did.
    pub fn resume(&mut self, varmap: &VarMap) -> Result<bool> {
        let path = self.checkpoint_path();
        if !path.exists() {
            return Ok(false);
        }
        let (weights, state, meta) = load_checkpoint(&path, &candle_core::Device::Cpu)?;
        super::checkpoint::set_varmap(varmap, &weights, &format!("checkpoint {}", path.display()))?;
        self.opt.load_state(&state, meta.step)?;
        self.step = meta.step;
        Ok(true)
    }

    /// Keeps the lines of `metrics.jsonl` up to the current step, and drops
    /// a line torn by a kill: a fresh run starts an empty log, a resumed
    /// one drops what a killed run logged after its checkpoint (those
    /// steps run again).
    fn truncate_metrics(&self) -> Result<()> {
        let path = self.out.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= self.step)
            })
            .collect();
        if kept.len() == text.lines().count() {
            return Ok(());
        }
        let mut out = kept.join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        super::checkpoint::write_atomic(&path, out.as_bytes())
    }

    fn save(&self, varmap: &VarMap) -> Result<()> {
        let weights = varmap_tensors(varmap)?;
        let meta = Checkpoint {
            step: self.step,
            config: serde_json::to_value(&self.config).unwrap_or_default(),
        };
        save_checkpoint(&self.checkpoint_path(), &weights, &self.opt.state(), &meta)
    }

    /// Runs until `config.steps`. `loss(step, micro)` returns the loss of
    /// micro-batch `micro` of `step` (its data must depend only on those, so
    /// that resuming replays the same batches); up to `config.workers`
    /// micro-batches run at once on their own threads. `eval(step)` runs
    /// every `eval_every` steps and at the end.
    pub fn run(
        &mut self,
        varmap: &VarMap,
        loss: &(dyn Fn(usize, usize) -> Result<Tensor> + Sync),
        eval: &mut dyn FnMut(usize) -> Result<serde_json::Value>,
        on_step: &mut dyn FnMut(&Metrics),
    ) -> Result<()> {
        self.truncate_metrics()?;
        let path = self.out.join("metrics.jsonl");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let start = std::time::Instant::now();
        let vars: Vec<Var> = self.vars.iter().map(|(_, v)| v.clone()).collect();
        let accum = self.config.grad_accum;
        let workers = self.config.workers.clamp(1, accum);
        while self.step < self.config.steps {
            let s = self.step;
            // Forward and backward of one micro-batch: (loss, gradients).
            let micro_grads = |micro: usize| -> Result<(f64, GradStore)> {
                let l = loss(s, micro)?;
                let value = l.to_scalar::<f32>()? as f64;
                Ok((value, (l / accum as f64)?.backward()?))
            };
            let mut results = Vec::with_capacity(accum);
            for first in (0..accum).step_by(workers) {
                let group: Vec<usize> = (first..(first + workers).min(accum)).collect();
                if group.len() == 1 {
                    results.push(micro_grads(group[0])?);
                    continue;
                }
                let out: Vec<Result<(f64, GradStore)>> = std::thread::scope(|scope| {
                    let handles: Vec<_> = group
                        .iter()
                        .map(|&m| scope.spawn(move || micro_grads(m)))
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| {
                            h.join().unwrap_or_else(|_| {
                                Err(Error::Invalid("a training worker panicked".into()))
                            })
                        })
                        .collect()
                });
                for r in out {
                    results.push(r?);
                }
            }
            // Sum in micro-batch order: the same result whatever the threads did.
            let mut loss_sum = 0.0;
            let mut total: Option<GradStore> = None;
            for (l, g) in results {
                loss_sum += l;
                total = Some(match total {
                    None => g,
                    Some(mut acc) => {
                        for v in &vars {
                            if let Some(gv) = g.get(v.as_tensor()) {
                                let sum = match acc.get(v.as_tensor()) {
                                    Some(a) => (a + gv)?,
                                    None => gv.clone(),
                                };
                                acc.insert(v.as_tensor(), sum);
                            }
                        }
                        acc
                    }
                });
            }
            let mut grads = total.expect("grad_accum ≥ 1");
            let grad_norm = if self.config.clip_norm > 0.0 {
                clip_grad_norm(&mut grads, &vars, self.config.clip_norm)?
            } else {
                0.0
            };
            let lr = self.config.schedule.lr(s);
            self.opt.step(&grads, lr)?;
            self.step += 1;
            let done = self.step == self.config.steps;
            let eval_now =
                done || (self.config.eval_every > 0 && self.step % self.config.eval_every == 0);
            let m = Metrics {
                step: self.step,
                loss: loss_sum / accum as f64,
                lr,
                grad_norm,
                eval: if eval_now {
                    Some(eval(self.step)?)
                } else {
                    None
                },
                seconds: start.elapsed().as_secs_f64(),
            };
            writeln!(log, "{}", serde_json::to_string(&m).unwrap_or_default())
                .map_err(|e| Error::io(&path, e))?;
            on_step(&m);
            if done
                || (self.config.checkpoint_every > 0
                    && self.step % self.config.checkpoint_every == 0)
            {
                log.flush().map_err(|e| Error::io(&path, e))?;
                self.save(varmap)?;
            }
        }
        Ok(())
    }
}
