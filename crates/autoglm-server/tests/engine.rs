//! The engine against `Assistant::ask`: sequences that join a running batch,
//! wait for a free slot and leave it at different times get exactly the
//! answer they get alone (greedy and seeded sampling), and stop strings,
//! cancellation and deadlines end a sequence without disturbing the rest.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use autoglm::assistant::{Assistant, Overflow};
use autoglm::text::generate::{Finish, GenerateConfig, Sampling};
use autoglm_server::engine::{Engine, Event, FinishReason, Job};
use autoglm_server::metrics::Metrics;
use candle_core::Device;
use image::RgbImage;
use tokio::sync::mpsc::UnboundedReceiver;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava-tiny-llama")
}

fn picture(seed: u8) -> RgbImage {
    RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([
            (x as u8).wrapping_mul(seed),
            (y as u8).wrapping_mul(7),
            seed,
        ])
    })
}

struct Ask {
    question: &'static str,
    images: Vec<RgbImage>,
    max_new: usize,
    sampling: Sampling,
    stop: Vec<String>,
}

fn job(a: &Assistant, q: &Ask) -> (Job, UnboundedReceiver<Event>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let now = Instant::now();
    let job = Job {
        prompt_ids: a
            .prompt_ids(q.question, q.images.len(), Overflow::Error, q.max_new)
            .unwrap(),
        images: q.images.clone(),
        max_new_tokens: q.max_new,
        sampling: q.sampling.clone(),
        stop: q.stop.clone(),
        enqueued: now,
        deadline: now + Duration::from_secs(600),
        events: tx,
    };
    (job, rx)
}

#[derive(Debug, Default)]
struct Outcome {
    pieces: Vec<String>,
    done: Option<(FinishReason, usize)>,
    failed: Option<String>,
}

fn drain(rx: &mut UnboundedReceiver<Event>, out: &mut Outcome) {
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Text(t) => out.pieces.push(t),
            Event::Done {
                finish,
                completion_tokens,
                ..
            } => out.done = Some((finish, completion_tokens)),
            Event::Failed(e) => out.failed = Some(e.to_string()),
        }
    }
}

fn alone(a: &Assistant, q: &Ask) -> autoglm::assistant::Answer {
    let cfg = GenerateConfig {
        max_new_tokens: q.max_new,
        sampling: q.sampling.clone(),
        ..GenerateConfig::default()
    };
    a.ask(&q.images, q.question, &cfg, Overflow::Error, &mut |_| true)
        .unwrap()
}

fn asks() -> Vec<Ask> {
    let sampled = |seed, top_p| Sampling {
        temperature: 0.9,
        top_p,
        seed,
        ..Sampling::default()
    };
    vec![
        Ask {
            question: "What is in the picture?",
            images: vec![picture(3)],
            max_new: 30,
            sampling: Sampling::default(),
            stop: vec![],
        },
        Ask {
            question: "Say something.",
            images: vec![],
            max_new: 12,
            sampling: sampled(5, None),
            stop: vec![],
        },
        Ask {
            question: "Compare these two pictures in as many words as you like, please.",
            images: vec![picture(5), picture(9)],
            max_new: 25,
            sampling: sampled(9, Some(0.9)),
            stop: vec![],
        },
        Ask {
            question: "Short?",
            images: vec![picture(1)],
            max_new: 4,
            sampling: Sampling::default(),
            stop: vec![],
        },
    ]
}

#[test]
fn sequences_joining_and_leaving_get_the_answers_they_get_alone() {
    let plain = joining_and_leaving(&fixture());
    // The same model with each image's tokens at one rotary position.
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["image_tokens_share_position"] = true.into();
    std::fs::write(&path, c.to_string()).unwrap();
    let shared = joining_and_leaving(dir.path());
    assert_ne!(plain, shared, "sharing positions changed no answer");
}

/// Runs `asks()` through an engine of 2 slots, sequences joining mid-way,
/// and checks each gets what it gets alone; returns the answers.
fn joining_and_leaving(model: &std::path::Path) -> Vec<String> {
    let a = Arc::new(Assistant::load(model, &Device::Cpu).unwrap());
    let metrics = Arc::new(Metrics::new());
    let mut engine = Engine::new(a.clone(), metrics.clone(), 2);
    let asks = asks();
    let mut rxs = Vec::new();
    let mut outs: Vec<Outcome> = asks.iter().map(|_| Outcome::default()).collect();
    let mut waiting = VecDeque::new();
    let mut most = 0;
    for (i, q) in asks.iter().enumerate() {
        let (j, rx) = job(&a, q);
        rxs.push(rx);
        waiting.push_back(j);
        // The first runs alone for a few steps; the others join mid-way,
        // one has to wait for a slot (the batch holds 2).
        let steps = if i == 0 { 3 } else { 1 };
        for _ in 0..steps {
            engine.step(&mut waiting);
            most = most.max(engine.active());
        }
    }
    for _ in 0..200 {
        if engine.active() == 0 && waiting.is_empty() {
            break;
        }
        engine.step(&mut waiting);
        most = most.max(engine.active());
    }
    assert_eq!(
        (engine.active(), waiting.len()),
        (0, 0),
        "every sequence ends"
    );
    assert_eq!(most, 2, "sequences shared the batch");
    for (i, q) in asks.iter().enumerate() {
        drain(&mut rxs[i], &mut outs[i]);
        let want = alone(&a, q);
        let o = &outs[i];
        assert!(o.failed.is_none(), "ask {i}: {:?}", o.failed);
        let (finish, n) = o.done.expect("done");
        assert_eq!(o.pieces.concat(), want.text, "ask {i}: the same text");
        assert_eq!(n, want.tokens.len(), "ask {i}: the same number of tokens");
        let want_finish = match want.finish {
            Finish::Length => FinishReason::Length,
            _ => FinishReason::Stop,
        };
        assert_eq!(finish, want_finish, "ask {i}");
    }
    assert_eq!(
        metrics.generated_tokens.get() as usize,
        outs.iter().map(|o| o.done.unwrap().1).sum::<usize>()
    );
    outs.iter().map(|o| o.pieces.concat()).collect()
}

#[test]
fn stop_strings_cut_the_answer_and_are_never_streamed() {
    let a = Arc::new(Assistant::load(&fixture(), &Device::Cpu).unwrap());
    let mut q = asks().remove(0);
    let full = alone(&a, &q).text;
    // A stop string from the middle of the greedy answer.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "{full:?}");
    let stop: String = chars[8..11].iter().collect();
    let cut = full.find(&stop).unwrap();
    q.stop = vec![stop.clone(), "\u{0}never".into()];
    let mut engine = Engine::new(a.clone(), Arc::new(Metrics::new()), 4);
    let (j, mut rx) = job(&a, &q);
    let mut waiting = VecDeque::from([j]);
    let mut out = Outcome::default();
    while engine.active() > 0 || !waiting.is_empty() {
        engine.step(&mut waiting);
    }
    drain(&mut rx, &mut out);
    assert_eq!(
        out.pieces.concat(),
        &full[..cut],
        "stop {stop:?} in {full:?}"
    );
    assert_eq!(out.done.unwrap().0, FinishReason::Stop);
    assert!(out
        .pieces
        .iter()
        .all(|p| !p.is_empty() && !p.contains(&stop)));
}

#[test]
fn gone_clients_and_deadlines_end_their_sequences_only() {
    let a = Arc::new(Assistant::load(&fixture(), &Device::Cpu).unwrap());
    let metrics = Arc::new(Metrics::new());
    let mut engine = Engine::new(a.clone(), metrics.clone(), 4);
    let qs = asks();
    let (keep, mut keep_rx) = job(&a, &qs[0]);
    let (leave, leave_rx) = job(&a, &qs[2]);
    let (mut late, mut late_rx) = job(&a, &qs[1]);
    let mut waiting = VecDeque::from([keep, leave]);
    engine.step(&mut waiting);
    assert_eq!(engine.active(), 2);
    drop(leave_rx); // the client went away
    engine.step(&mut waiting);
    assert_eq!(engine.active(), 1);
    assert_eq!(metrics.cancelled.get(), 1);
    late.deadline = Instant::now() - Duration::from_millis(1);
    waiting.push_back(late);
    engine.step(&mut waiting);
    let mut out = Outcome::default();
    drain(&mut late_rx, &mut out);
    assert!(
        out.failed.as_deref().unwrap_or("").starts_with("504"),
        "{out:?}"
    );
    assert_eq!(metrics.timed_out.get(), 1);
    while engine.active() > 0 {
        engine.step(&mut waiting);
    }
    let mut out = Outcome::default();
    drain(&mut keep_rx, &mut out);
    assert_eq!(
        out.pieces.concat(),
        alone(&a, &qs[0]).text,
        "the survivor is undisturbed"
    );
}

/// A router that chooses the image's path from the question, before the
/// tower, is followed: with threshold 1 every row takes the light path (a
/// smaller image) and gets the answer `ask` gives, not the full path's.
#[test]
fn a_router_before_the_tower_is_followed() {
    use autoglm::fusion::router::Route;
    use autoglm::train::vqa::{train_vqa, VqaTrainConfig};
    let cfg: VqaTrainConfig = serde_json::from_value(serde_json::json!({
        "data": {"kind": "easy-vqa"}, "vision": "cnn", "max_train_examples": 32,
        "image_size": 16, "vision_hidden": 8, "vision_layers": 2,
        "router_light_image_size": 8, "projector": "mlp", "text_hidden": 32,
        "text_layers": 2, "text_heads": 2, "text_kv_heads": 1, "vocab_size": 262, "steps": 6,
        "batch_size": 4, "peak_lr": 3e-3, "warmup_steps": 1, "clip_norm": 1.0, "seed": 3,
        "held_out_images": 0
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    train_vqa(&cfg, dir.path(), false, &mut |_| {}).unwrap();
    let path = dir.path().join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c["router_threshold"] = 1.0.into();
    std::fs::write(&path, c.to_string()).unwrap();
    let a = Arc::new(Assistant::load(dir.path(), &Device::Cpu).unwrap());
    assert!(autoglm_server::engine::routes_images(&a));

    let asks: Vec<Ask> = [
        ("what color is the shape?", 3),
        ("is there a circle?", 5),
        ("what shape is in the image?", 9),
        ("is the triangle red?", 11),
    ]
    .into_iter()
    .map(|(question, seed)| Ask {
        question,
        images: vec![picture(seed)],
        max_new: 6,
        sampling: Sampling::default(),
        stop: vec![],
    })
    .collect();
    let mut engine = Engine::new(a.clone(), Arc::new(Metrics::new()), 4);
    let mut rxs = Vec::new();
    let mut waiting = VecDeque::new();
    for q in &asks {
        let (j, rx) = job(&a, q);
        rxs.push(rx);
        waiting.push_back(j);
    }
    for _ in 0..50 {
        if engine.active() == 0 && waiting.is_empty() {
            break;
        }
        engine.step(&mut waiting);
    }
    let mut differs = 0;
    for (q, rx) in asks.iter().zip(&mut rxs) {
        let mut out = Outcome::default();
        drain(rx, &mut out);
        assert!(out.failed.is_none(), "{:?}", out.failed);
        let want = alone(&a, q);
        assert_eq!(want.route, Some(Route::Light));
        assert_eq!(out.pieces.concat(), want.text, "{}", q.question);
        let full = GenerateConfig {
            max_new_tokens: q.max_new,
            layers: Some(2),
            ..GenerateConfig::default()
        };
        let full = a
            .ask(&q.images, q.question, &full, Overflow::Error, &mut |_| true)
            .unwrap();
        differs += usize::from(full.tokens != want.tokens);
    }
    assert!(
        differs > 0,
        "the light path answered as the full one: no check"
    );
}
