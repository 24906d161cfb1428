//! `autoglm bench serve`: a load test of `autoglm serve` on a model.
//!
//! Starts the server as a child process (so its resident memory can be
//! read from /proc), then:
//! 1. `--clients` concurrent clients ask chat questions with images for
//!    `--seconds` (after a warm-up), against the batching engine;
//! 2. the same clients send a mix of good and bad requests (chat, streams,
//!    embeddings; malformed JSON, unknown model, wrong key, oversized body,
//!    broken image, prompt over the context) for `--mixed-seconds`; every
//!    answer must carry the status its kind expects, with no 5xx and no
//!    dropped connection;
//! 3. phase 1 again against a server with `--max-batch 1`: the throughput
//!    gain of batching.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use clap::Args;
use serde_json::json;

use crate::Global;

#[derive(Args)]
pub struct ServeBenchArgs {
    /// The model served (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of chat load, per server (batching on, then off).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds of mixed good and bad requests.
    #[arg(long, default_value_t = 300)]
    mixed_seconds: u64,
    /// Sequences per batch of the batching server.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// A directory with images and questions.jsonl (default: the easy-VQA samples).
    #[arg(long)]
    samples: Option<PathBuf>,
}

const KEY: &str = "sk-bench-serve-key";
const MAX_BODY: usize = 1 << 20;

struct Child_ {
    child: Child,
    base: String,
}

impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(model: &std::path::Path, max_batch: usize) -> Result<Child_> {
    let exe = std::env::current_exe().context("locating autoglm")?;
    let mut child = Command::new(exe)
        .args(["serve", "--port", "0", "--queue", "256"])
        .arg("--model")
        .arg(model)
        // The requests name the model `autoglm-tiny`, whichever is served.
        .args(["--model-name", "autoglm-tiny"])
        .args(["--max-batch", &max_batch.to_string()])
        .args(["--max-body-bytes", &MAX_BODY.to_string()])
        .env("AUTOGLM_API_KEYS", KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting autoglm serve")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
    let Some(base) = line.trim().strip_prefix("listening on ") else {
        bail!("the server did not start: {line:?}");
    };
    Ok(Child_ {
        base: base.to_string(),
        child,
    })
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// One kind of request and the status it must get.
#[derive(Clone)]
struct Kind {
    name: &'static str,
    path: &'static str,
    key: &'static str,
    body: Arc<Vec<u8>>,
    expect: u16,
    stream: bool,
}

#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    tokens: u64,
    by_kind: std::collections::BTreeMap<String, (u64, u64)>, // (as expected, other)
    server_errors: u64,
    dropped: u64,
    unexpected: Vec<String>,
}

fn run_load(base: &str, kinds: &[Kind], clients: usize, secs: u64) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let end = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for c in 0..clients {
            let tally = tally.clone();
            let stop = stop.clone();
            s.spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(120)))
                    .build()
                    .into();
                let mut i = c;
                while Instant::now() < end && !stop.load(Ordering::Relaxed) {
                    let k = &kinds[i % kinds.len()];
                    i += clients;
                    let t0 = Instant::now();
                    let r = agent
                        .post(format!("{base}{}", k.path))
                        .header("authorization", format!("Bearer {}", k.key))
                        .header("content-type", "application/json")
                        .send(k.body.as_slice());
                    // Read the whole answer before taking the lock.
                    let r = r.map(|resp| {
                        let status = resp.status().as_u16();
                        let mut text = String::new();
                        let read = resp.into_body().into_reader().read_to_string(&mut text);
                        (status, text, read.is_ok(), t0.elapsed().as_secs_f64())
                    });
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Err(e) => {
                            t.dropped += 1;
                            t.unexpected.push(format!("{}: {e}", k.name));
                        }
                        Ok((status, text, read_ok, dt)) => {
                            if !read_ok
                                || (k.stream
                                    && status == 200
                                    && !text.trim_end().ends_with("data: [DONE]"))
                            {
                                t.dropped += 1;
                                t.unexpected
                                    .push(format!("{}: the body was cut short", k.name));
                                continue;
                            }
                            if status >= 500 {
                                t.server_errors += 1;
                            }
                            let e = t.by_kind.entry(k.name.to_string()).or_default();
                            if status == k.expect {
                                e.0 += 1;
                            } else {
                                e.1 += 1;
                                let msg = format!(
                                    "{}: {status} {}",
                                    k.name,
                                    text.chars().take(200).collect::<String>()
                                );
                                t.unexpected.push(msg);
                            }
                            if status == 200 && k.path.ends_with("completions") {
                                t.latencies.push(dt);
                                if !k.stream {
                                    t.tokens += serde_json::from_str::<serde_json::Value>(&text)
                                        .ok()
                                        .and_then(|v| v["usage"]["completion_tokens"].as_u64())
                                        .unwrap_or(0);
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    Arc::try_unwrap(tally)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .unwrap_or_default()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn chat_body(image: &str, question: &str, stream: bool) -> Vec<u8> {
    json!({
        "model": "autoglm-tiny", "temperature": 0, "stream": stream,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": image}},
        ]}],
    })
    .to_string()
    .into_bytes()
}

pub fn serve(g: &Global, a: ServeBenchArgs) -> Result<()> {
    let model = crate::ask::model_dir(&a.model)?;
    let samples = a.samples.clone().unwrap_or_else(|| {
        model
            .parent()
            .and_then(|p| p.parent())
            .map(|root| root.join("assets/samples/easy-vqa"))
            .unwrap_or_default()
    });
    let questions =
        std::fs::read_to_string(samples.join("questions.jsonl")).with_context(|| {
            format!(
                "{}: no questions.jsonl; pass --samples DIR",
                samples.display()
            )
        })?;
    let mut good = Vec::new();
    for line in questions.lines().filter(|l| !l.trim().is_empty()) {
        let q: serde_json::Value = serde_json::from_str(line)?;
        let img = std::fs::read(samples.join(q["image"].as_str().unwrap_or_default()))?;
        let url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(img)
        );
        good.push((url, q["question"].as_str().unwrap_or_default().to_string()));
    }
    if good.is_empty() {
        bail!("{}: questions.jsonl holds no question", samples.display());
    }
    let chat_kinds: Vec<Kind> = good
        .iter()
        .map(|(u, q)| Kind {
            name: "chat",
            path: "/v1/chat/completions",
            key: KEY,
            body: Arc::new(chat_body(u, q, false)),
            expect: 200,
            stream: false,
        })
        .collect();
    let kind = |name, path, key, body: Vec<u8>, expect, stream| Kind {
        name,
        path,
        key,
        body: Arc::new(body),
        expect,
        stream,
    };
    let (u0, q0) = &good[0];
    let mut mixed = chat_kinds.iter().take(3).cloned().collect::<Vec<_>>();
    mixed.extend([
        kind("chat-stream", "/v1/chat/completions", KEY, chat_body(u0, q0, true), 200, true),
        kind("embed-text", "/v1/embeddings", KEY, json!({"model": "all-MiniLM-L6-v2", "input": ["a red triangle", "a blue circle"]}).to_string().into_bytes(), 200, false),
        kind("embed-image", "/v1/embeddings", KEY, json!({"model": "autoglm-tiny", "input": [{"type": "image_url", "image_url": {"url": u0}}]}).to_string().into_bytes(), 200, false),
        kind("malformed-json", "/v1/chat/completions", KEY, b"{\"model\": \"autoglm-tiny\", \"messages\": [".to_vec(), 400, false),
        kind("unknown-model", "/v1/chat/completions", KEY, json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).to_string().into_bytes(), 404, false),
        kind("wrong-key", "/v1/chat/completions", "sk-not-this-one", chat_body(u0, q0, false), 401, false),
        kind("oversized", "/v1/chat/completions", KEY, chat_body(&format!("data:image/png;base64,{}", "A".repeat(MAX_BODY)), q0, false), 413, false),
        kind("broken-image", "/v1/chat/completions", KEY, chat_body("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA", q0, false), 400, false),
        kind("over-context", "/v1/chat/completions", KEY, json!({"model": "autoglm-tiny", "messages": [{"role": "user", "content": "word ".repeat(600)}]}).to_string().into_bytes(), 400, false),
    ]);

    let summarize = |t: &mut Tally, secs: f64| {
        let n = t.latencies.len();
        json!({
            "requests_per_s": n as f64 / secs,
            "tokens_per_s": t.tokens as f64 / secs,
            "p50_ms": percentile(&mut t.latencies, 0.5) * 1e3,
            "p99_ms": percentile(&mut t.latencies, 0.99) * 1e3,
            "chat_ok": n,
            "server_errors": t.server_errors,
            "dropped": t.dropped,
            "by_kind": t.by_kind.iter().map(|(k, (ok, other))| (k.clone(), json!({"as_expected": ok, "other": other}))).collect::<serde_json::Map<_, _>>(),
            "unexpected": t.unexpected.iter().take(10).collect::<Vec<_>>(),
        })
    };

    eprintln!(
        "bench serve: batching server (--max-batch {}), {} clients",
        a.max_batch, a.clients
    );
    let srv = start(&model, a.max_batch)?;
    let pid = srv.child.id();
    let warm = run_load(&srv.base, &chat_kinds, a.clients, 5);
    if warm.latencies.is_empty() {
        bail!(
            "no chat request succeeded in the 5 s warm-up against {}: {}",
            model.display(),
            warm.unexpected
                .first()
                .map_or("no answer at all", String::as_str)
        );
    }
    let rss_warm = rss_mib(pid);
    let mut batched = run_load(&srv.base, &chat_kinds, a.clients, a.seconds);
    let rss_after_load = rss_mib(pid);
    eprintln!(
        "bench serve: mixed good and bad requests for {} s",
        a.mixed_seconds
    );
    let rss_samples = Arc::new(Mutex::new(Vec::new()));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (r, s) = (rss_samples.clone(), sampling.clone());
        std::thread::spawn(move || {
            while s.load(Ordering::Relaxed) {
                r.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(rss_mib(pid));
                std::thread::sleep(Duration::from_secs(5));
            }
        })
    };
    let mut mixed_t = run_load(&srv.base, &mixed, a.clients, a.mixed_seconds);
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let rss_end = rss_mib(pid);
    drop(srv);

    eprintln!("bench serve: server without batching (--max-batch 1)");
    let srv1 = start(&model, 1)?;
    run_load(&srv1.base, &chat_kinds, a.clients, 5);
    let mut single = run_load(&srv1.base, &chat_kinds, a.clients, a.seconds);
    drop(srv1);

    let secs = a.seconds as f64;
    let b = summarize(&mut batched, secs);
    let s1 = summarize(&mut single, secs);
    let m = summarize(&mut mixed_t, a.mixed_seconds as f64);
    let rss: Vec<f64> = rss_samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let rss_max = rss.iter().copied().fold(rss_end, f64::max);
    let gain = b["requests_per_s"].as_f64().unwrap_or(0.0)
        / s1["requests_per_s"].as_f64().unwrap_or(f64::NAN);
    let report = json!({
        "model": model, "clients": a.clients, "seconds": a.seconds, "mixed_seconds": a.mixed_seconds,
        "threads": candle_core::utils::get_num_threads(),
        "batched": b, "batch_1": s1, "mixed": m, "batching_gain": gain,
        "rss_mib": {"after_warmup": rss_warm, "after_load": rss_after_load, "max_during_mixed": rss_max, "end": rss_end, "mixed_every_5s": rss},
    });
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let row = |name: &str, v: &serde_json::Value| {
            println!(
                "{name:<22} {:>8.1} req/s {:>8.1} tok/s   p50 {:>7.1} ms   p99 {:>7.1} ms   5xx {}   dropped {}",
                v["requests_per_s"].as_f64().unwrap_or(0.0),
                v["tokens_per_s"].as_f64().unwrap_or(0.0),
                v["p50_ms"].as_f64().unwrap_or(0.0),
                v["p99_ms"].as_f64().unwrap_or(0.0),
                v["server_errors"],
                v["dropped"],
            )
        };
        println!(
            "{} clients, {} s per phase, {} threads",
            a.clients, a.seconds, report["threads"]
        );
        row(&format!("batched (max {})", a.max_batch), &b);
        row("batch size 1", &s1);
        println!("batching gain: {gain:.2}×");
        row("mixed (good chats)", &m);
        for (k, v) in m["by_kind"].as_object().into_iter().flatten() {
            println!(
                "  {k:<16} as expected {:>6}   other {}",
                v["as_expected"], v["other"]
            );
        }
        println!(
            "resident memory: {rss_warm:.0} MiB after warm-up, {rss_after_load:.0} after load, at most {rss_max:.0} during the mix, {rss_end:.0} at the end"
        );
        let series: Vec<String> = rss.iter().step_by(6).map(|m| format!("{m:.0}")).collect();
        println!("  during the mix, every 30 s (MiB): {}", series.join(" "));
        for u in m["unexpected"].as_array().into_iter().flatten() {
            println!("  unexpected: {u}");
        }
    }
    let bad = |v: &serde_json::Value| {
        v["server_errors"].as_u64() != Some(0) || v["dropped"].as_u64() != Some(0)
    };
    let off_kind = m["by_kind"]
        .as_object()
        .into_iter()
        .flatten()
        .any(|(_, v)| v["other"].as_u64() != Some(0));
    if bad(&b) || bad(&s1) || bad(&m) || off_kind {
        bail!("the load test saw 5xx answers, dropped connections or unexpected statuses (above)");
    }
    Ok(())
}
