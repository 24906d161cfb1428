//! `autoglm bench encoders`: our encoders' throughput beside PyTorch's on the
//! same inputs and thread count, in one run, plus the fraction of the
//! machine's measured f32 GEMM peak each reaches.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use autoglm::io::assets;
use autoglm::text::bert::SentenceEncoder;
use autoglm::vision::efficientnet::EfficientNet;
use candle_core::{Device, Tensor};
use clap::Args;
use serde_json::json;

use crate::Global;

#[derive(Args)]
pub struct EncodersArgs {
    /// A Python interpreter with torch, efficientnet-lite-pytorch and
    /// sentence-transformers (e.g. a virtualenv's bin/python); when given,
    /// PyTorch is measured on the same inputs in the same run.
    #[arg(long)]
    python: Option<PathBuf>,
    /// The PyTorch side's script.
    #[arg(long, default_value = "tools/reference/bench_encoders.py")]
    script: PathBuf,
    /// Seconds spent timing each case (after one warm-up run).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

/// Median seconds per call of `f`.
pub fn time_it(seconds: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Timing rounds per case; each round times our side, then PyTorch's.
pub const ROUNDS: usize = 3;

/// Medians over [`ROUNDS`] interleaved rounds, per case: seconds per call of
/// ours and PyTorch's, and the median of the rounds' ratios (PyTorch's time
/// over ours) — robust to a machine whose speed drifts between rounds.
pub struct Interleaved {
    pub ours: Vec<f64>,
    pub torch: Vec<Option<f64>>,
    pub ratio: Vec<Option<f64>>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times case `i` of `keys` with `run_ours(i, seconds)` and, when given,
/// `torch.time(keys[i], seconds)`, splitting `seconds` over the rounds.
pub fn interleave(
    keys: &[&str],
    seconds: f64,
    run_ours: impl Fn(usize, f64) -> Result<f64>,
    mut torch: Option<&mut TorchServer>,
) -> Result<Interleaved> {
    let slice = seconds / ROUNDS as f64;
    let mut ours = vec![[0f64; ROUNDS]; keys.len()];
    let mut theirs = vec![[0f64; ROUNDS]; keys.len()];
    for r in 0..ROUNDS {
        for (i, key) in keys.iter().enumerate() {
            ours[i][r] = run_ours(i, slice)?;
            if let Some(t) = torch.as_deref_mut() {
                theirs[i][r] = t.time(key, slice)?;
            }
        }
    }
    let has_torch = torch.is_some();
    Ok(Interleaved {
        ours: ours.iter().map(|r| median(r.to_vec())).collect(),
        torch: theirs
            .iter()
            .map(|r| has_torch.then(|| median(r.to_vec())))
            .collect(),
        ratio: (0..keys.len())
            .map(|i| {
                has_torch.then(|| median((0..ROUNDS).map(|r| theirs[i][r] / ours[i][r]).collect()))
            })
            .collect(),
    })
}

/// f32 GEMM GFLOP/s of candle on this machine (1024³, median).
pub fn gemm_peak(seconds: f64) -> Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let s = time_it(seconds.min(2.0), || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n * n * n) as f64 / s / 1e9)
}

/// The PyTorch side: a child process answering timing requests.
pub struct TorchServer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    pub info: serde_json::Value,
    dir: PathBuf,
}

impl TorchServer {
    /// Starts `py script ARGS…`; `dir` (removed on drop) holds its inputs.
    pub fn spawn(
        py: &std::path::Path,
        script: &std::path::Path,
        args: &[String],
        dir: PathBuf,
    ) -> Result<Self> {
        use std::io::BufRead;
        use std::process::Stdio;
        if !script.is_file() {
            anyhow::bail!(
                "{} not found; run from the repository root or pass --script",
                script.display()
            );
        }
        eprintln!("starting PyTorch with {}…", py.display());
        let mut child = Command::new(py)
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("running {}", py.display()))?;
        let stdin = child.stdin.take().context("child stdin")?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().context("child stdout")?);
        // Libraries print to stdout too ("Loaded pretrained weights…"):
        // the protocol's lines are the JSON ones.
        let mut line = String::new();
        while stdout.read_line(&mut line)? > 0 && !line.starts_with('{') {
            line.clear();
        }
        let info: serde_json::Value = serde_json::from_str(line.trim()).with_context(|| {
            format!(
                "the PyTorch side did not start ({}); does {} have torch, transformers and the script's other imports?",
                line.trim(),
                py.display()
            )
        })?;
        Ok(Self {
            child,
            stdin,
            stdout,
            info,
            dir,
        })
    }

    fn start(
        py: &std::path::Path,
        script: &std::path::Path,
        pixels: &Tensor,
        sentences: &[String],
        threads: usize,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("autoglm-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("pixels".to_string(), pixels.clone())]),
            dir.join("pixels_b32.safetensors"),
        )?;
        std::fs::write(
            dir.join("sentences.json"),
            serde_json::to_string(sentences)?,
        )?;
        let args = vec![
            "--dir".to_string(),
            dir.to_string_lossy().into_owned(),
            "--threads".into(),
            threads.to_string(),
        ];
        Self::spawn(py, script, &args, dir)
    }

    pub fn time(&mut self, case: &str, seconds: f64) -> Result<f64> {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{case} {seconds}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        while self.stdout.read_line(&mut line)? > 0 && !line.starts_with('{') {
            line.clear();
        }
        let v: serde_json::Value =
            serde_json::from_str(line.trim()).with_context(|| format!("PyTorch side: {line:?}"))?;
        v["seconds_per_call"]
            .as_f64()
            .context("PyTorch side: no seconds_per_call")
    }
}

impl Drop for TorchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// MiniLM multiply-accumulates for one padded batch.
fn bert_macs(cfg: &autoglm::config::BertConfig, batch: usize, t: usize) -> f64 {
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let t = t as f64;
    let per_layer = 4.0 * t * h * h + 2.0 * t * h * i + 2.0 * t * t * h;
    batch as f64 * cfg.num_hidden_layers as f64 * per_layer
}

pub fn encoders(g: &Global, a: EncodersArgs) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let dev = Device::Cpu;
    eprintln!("measuring on {threads} threads (set with --threads or RAYON_NUM_THREADS)…");

    // Inputs: the sample photos cycled to 32, the fixture sentences cycled to 64.
    let photos = assets::dir("photos")?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&photos)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    let imgs = crate::commands::load_images(g, &files)?;
    let eff = EfficientNet::load(&assets::dir("efficientnet-lite0")?, &dev)?;
    let pre = eff.config.preprocess();
    let cycled: Vec<_> = (0..32).map(|i| imgs[i % imgs.len()].clone()).collect();
    let pixels = pre.batch(&cycled, &dev)?;
    let sentences: Vec<String> = {
        // Built in, so the benchmark runs the same wherever the binary is.
        let all: Vec<String> = serde_json::from_str(include_str!(
            "../../../tests/fixtures/minilm/sentences.json"
        ))?;
        // Everyday sentences only (the fixture's last one is a 256-token stress case).
        let short: Vec<String> = all.into_iter().filter(|s| s.len() < 200).collect();
        (0..64).map(|i| short[i % short.len()].clone()).collect()
    };
    let enc = SentenceEncoder::load(&assets::dir("minilm")?, &dev)?;
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();

    let peak = gemm_peak(a.seconds)?;
    let p1 = pixels.narrow(0, 0, 1)?;
    let keys = ["effnet_b1", "effnet_b32", "minilm_b1", "minilm_b64"];
    let run_ours = |i: usize, secs: f64| -> Result<f64> {
        match i {
            0 => time_it(secs, || {
                eff.forward(&p1)?;
                Ok(())
            }),
            1 => time_it(secs, || {
                eff.forward(&pixels)?;
                Ok(())
            }),
            2 => time_it(secs, || {
                enc.embed(&refs[..1], 1)?;
                Ok(())
            }),
            _ => time_it(secs, || {
                enc.embed(&refs, 64)?;
                Ok(())
            }),
        }
    };

    // PyTorch serves timing requests from a child process, so each round
    // measures both sides back to back and the ratio is the median of the
    // rounds' ratios: robust to a machine whose speed drifts.
    let mut torch_proc = match &a.python {
        None => None,
        Some(py) => {
            if !a.script.is_file() {
                anyhow::bail!(
                    "{} not found; run from the repository root or pass --script PATH/tools/reference/bench_encoders.py",
                    a.script.display()
                );
            }
            Some(TorchServer::start(
                py, &a.script, &pixels, &sentences, threads,
            )?)
        }
    };
    let timed = interleave(&keys, a.seconds, run_ours, torch_proc.as_mut())?;
    let torch = torch_proc.as_ref().map(|t| t.info.clone());
    let (ours_s, torch_s, ratios) = (timed.ours, timed.torch, timed.ratio);

    let eff_gflop = 2.0 * eff.config.macs() as f64 / 1e9;
    let cfg = enc.config();
    // Useful work: each sentence at its own length (we do not pad; PyTorch
    // pads each batch to its longest sentence and does more).
    let lens: Vec<usize> = refs
        .iter()
        .map(|s| enc.tokenizer().encode(s).map(|t| t.len()))
        .collect::<autoglm::Result<_>>()?;
    let minilm_gflop = |n: usize| {
        lens[..n]
            .iter()
            .map(|&l| 2.0 * bert_macs(cfg, 1, l))
            .sum::<f64>()
            / 1e9
    };
    let cases = [
        ("EfficientNet-Lite0", "images/s", 1usize, eff_gflop),
        ("EfficientNet-Lite0", "images/s", 32, 32.0 * eff_gflop),
        ("MiniLM-L6", "sentences/s", 1, minilm_gflop(1)),
        ("MiniLM-L6", "sentences/s", 64, minilm_gflop(64)),
    ];
    let rows: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, (model, unit, batch, gflop))| {
            json!({
                "model": model, "unit": unit, "batch": batch,
                "ours_per_s": *batch as f64 / ours_s[i],
                "torch_per_s": torch_s[i].map(|s| *batch as f64 / s),
                "ratio": ratios[i],
                "gemm_fraction": gflop / ours_s[i] / peak,
            })
        })
        .collect();
    if g.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "threads": threads, "gemm_peak_gflops": peak, "torch": torch, "results": rows
            }))?
        );
        return Ok(());
    }
    println!("threads: {threads}; candle f32 GEMM (1024³): {peak:.1} GFLOP/s");
    if let Some(t) = &torch {
        println!(
            "PyTorch {} on {} threads",
            t["torch"].as_str().unwrap_or("?"),
            t["threads"]
        );
    }
    println!(
        "{:<20} {:>5} {:>14} {:>14} {:>8} {:>10}",
        "model", "batch", "ours", "PyTorch", "ratio", "GEMM peak"
    );
    for r in &rows {
        let f = |v: &serde_json::Value| {
            v.as_f64()
                .map(|x| format!("{x:.1}"))
                .unwrap_or_else(|| "—".into())
        };
        println!(
            "{:<20} {:>5} {:>14} {:>14} {:>8} {:>9.0}%",
            r["model"].as_str().unwrap_or(""),
            r["batch"],
            format!(
                "{} {}",
                f(&r["ours_per_s"]),
                if r["unit"] == "images/s" {
                    "img/s"
                } else {
                    "sent/s"
                }
            ),
            f(&r["torch_per_s"]),
            r["ratio"]
                .as_f64()
                .map(|x| format!("{x:.2}×"))
                .unwrap_or_else(|| "—".into()),
            r["gemm_fraction"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    println!("ratio = our throughput / PyTorch's (>1: we are faster), median of {ROUNDS} interleaved rounds");
    Ok(())
}
