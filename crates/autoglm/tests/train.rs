//! The trainer's parts: AdamW against torch.optim.AdamW, resume equivalence
//! (N steps + checkpoint + resume + N steps = 2N steps), and a checkpoint
//! that survives SIGKILL in the middle of writing.

mod common;

use std::collections::HashMap;

use autoglm::config::LlavaConfig;
use autoglm::train::{
    clip_grad_norm, load_checkpoint, save_checkpoint, AdamW, AdamWConfig, Checkpoint, Schedule,
};
use autoglm::vlm::Llava;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::fixtures;
use rand::{Rng, SeedableRng};

#[test]
fn adamw_matches_torch() {
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("adamw.json")).unwrap())
            .unwrap();
    let mat = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| match r {
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect::<Vec<_>>(),
                x => vec![x.as_f64().unwrap() as f32],
            })
            .collect()
    };
    let dev = Device::Cpu;
    let w =
        Var::from_tensor(&Tensor::from_vec(mat(&f["start"]["w"]), (3, 4), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::from_vec(mat(&f["start"]["b"]), 4, &dev).unwrap()).unwrap();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], cfg).unwrap();
    assert_eq!(opt.decayed(), vec!["w"], "only matrices are decayed");
    for s in f["steps"].as_array().unwrap() {
        // A loss whose gradients are exactly the given ones: Σ g·p.
        let gw = Tensor::from_vec(mat(&s["gw"]), (3, 4), &dev).unwrap();
        let gb = Tensor::from_vec(mat(&s["gb"]), 4, &dev).unwrap();
        let loss = ((w.as_tensor() * &gw).unwrap().sum_all().unwrap()
            + (b.as_tensor() * &gb).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads, s["lr"].as_f64().unwrap()).unwrap();
        let dw: f32 = w
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(mat(&s["w"]))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let db: f32 = b
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(mat(&s["b"]))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(dw < 1e-6 && db < 1e-6, "step {}: {dw} {db}", opt.step);
    }
}

fn tiny() -> LlavaConfig {
    serde_json::from_value(serde_json::json!({
        "image_token_index": 3, "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        "text_config": {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "max_position_embeddings": 64}
    }))
    .unwrap()
}

/// A model whose initial weights depend only on `seed`.
fn model(seed: u64) -> (VarMap, Llava) {
    let vm = VarMap::new();
    let m = Llava::new(
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        &tiny(),
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for n in names {
        let v = &data[n];
        // Replace candle's random init (drawn from a global generator);
        // norm gains around 1.
        let center = if n.contains("norm") { 1.0 } else { 0.0 };
        let noise: Vec<f32> = (0..v.elem_count())
            .map(|_| center + rng.random::<f32>() * 0.4 - 0.2)
            .collect();
        v.set(&Tensor::from_vec(noise, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    drop(data);
    (vm, m)
}

/// Questions that share an image, trained from one pass over the image's
/// prefix, give the loss and gradients of each question with its own copy
/// of the image: with plain prefix tokens, with the decoder's
/// cross-attention blocks reading the image too, and with the image's
/// tokens sharing one position.
#[test]
fn questions_sharing_an_image_train_as_they_would_one_by_one() {
    use autoglm::train::vqa::{answer_logits, shared_image_answer_logits, Encoded, Images};
    // Plain prefix tokens; with cross-attention blocks; with the image's
    // tokens sharing one position.
    for (cross, one_position) in [(false, false), (true, false), (false, true)] {
        let mut cfg = tiny();
        if cross {
            cfg.text_config.cross_attention_every = Some(1);
        }
        cfg.image_tokens_share_position = one_position;
        let vm = VarMap::new();
        let m = Llava::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for v in vm.all_vars() {
            // Gates open, so that the cross-attention blocks matter.
            let noise: Vec<f32> = (0..v.elem_count())
                .map(|_| rng.random::<f32>() * 0.6 - 0.3)
                .collect();
            v.set(&Tensor::from_vec(noise, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        // Image first: BOS, the image, then a question of 2..6 ids; an
        // answer of 1..3 ids.
        let row = |rng: &mut rand::rngs::StdRng| {
            let mut ids = vec![1u32, 3];
            let n = rng.random_range(2..7);
            ids.extend((0..n).map(|_| rng.random_range(4..30u32)));
            let n = rng.random_range(1..4);
            Encoded {
                prompt: m.expand_image_tokens(&ids, 1).unwrap(),
                answer: (0..n).map(|_| rng.random_range(4..30u32)).collect(),
            }
        };
        let groups: Vec<Vec<Encoded>> = vec![
            (0..3).map(|_| row(&mut rng)).collect(),
            (0..2).map(|_| row(&mut rng)).collect(),
        ];
        let px: Vec<f32> = (0..2 * 3 * 16 * 16).map(|_| rng.random::<f32>()).collect();
        let px = Tensor::from_vec(px, (2, 3, 16, 16), &Device::Cpu).unwrap();

        let shared: Vec<Vec<&Encoded>> = groups.iter().map(|g| g.iter().collect()).collect();
        let (ls, ts) = shared_image_answer_logits(&m, &shared, Images::Pixels(&px)).unwrap();
        let rows: Vec<&Encoded> = groups.iter().flatten().collect();
        let each = Tensor::new(&[0u32, 0, 0, 1, 1], &Device::Cpu).unwrap();
        let px_each = px.index_select(&each, 0).unwrap();
        let (lo, to) = answer_logits(&m, &rows, Images::Pixels(&px_each)).unwrap();
        assert_eq!(ts.to_vec1::<u32>().unwrap(), to.to_vec1::<u32>().unwrap());
        let d = common::max_abs_diff(&ls, &lo);
        assert!(
            d < 1e-5,
            "cross {cross}, one position {one_position}: logits differ by {d}"
        );

        let grads = |l: &Tensor, t: &Tensor| {
            candle_nn::loss::cross_entropy(l, t)
                .unwrap()
                .backward()
                .unwrap()
        };
        let (gs, go) = (grads(&ls, &ts), grads(&lo, &to));
        let mut compared = Vec::new();
        for (name, v) in named_vars(&vm) {
            let (a, b) = (gs.get(&v), go.get(&v));
            match (a, b) {
                (Some(a), Some(b)) => {
                    let d = common::max_abs_diff(a, b);
                    assert!(d < 1e-5, "cross {cross}, one position {one_position}: {name}'s gradients differ by {d}");
                    compared.push(name);
                }
                (None, None) => {}
                _ => panic!("cross {cross}, one position {one_position}: {name} has a gradient on one side only"),
            }
        }
        // The gradients reach back through the shared prefix's cache into
        // the projector and the tower.
        for part in ["vision_tower.", "multi_modal_projector.", "language_model."] {
            assert!(
                compared.iter().any(|n| n.starts_with(part)),
                "cross {cross}, one position {one_position}: no gradient reached {part}*"
            );
        }
        // The image must come first: a question before it is no shared prefix.
        let mut late = groups[0][1].prompt.clone();
        late.retain(|&i| i != 3);
        late.extend(m.expand_image_tokens(&[3], 1).unwrap());
        let odd = Encoded {
            prompt: late,
            answer: vec![5],
        };
        let bad = vec![vec![&groups[0][0], &odd]];
        let e = shared_image_answer_logits(&m, &bad, Images::Pixels(&px.narrow(0, 0, 1).unwrap()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("image before the question"), "{e}");
    }
}

fn named_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Training steps `from..to`: the batch of step `s` depends only on `s`.
fn run(m: &Llava, vm: &VarMap, opt: &mut AdamW, sched: &Schedule, from: usize, to: usize) {
    let vars: Vec<Var> = named_vars(vm).into_iter().map(|(_, v)| v).collect();
    for s in from..to {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + s as u64);
        let mut ids = vec![1u32, 3];
        ids.extend((0..6).map(|_| rng.random_range(4..30u32)));
        let ids = m.expand_image_tokens(&ids, 1).unwrap();
        let px: Vec<f32> = (0..3 * 16 * 16).map(|_| rng.random::<f32>()).collect();
        let pixels = Tensor::from_vec(px, (1, 3, 16, 16), &Device::Cpu).unwrap();
        let logits = m
            .forward(&ids, Some(&pixels), &mut m.lm.new_cache())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let t = ids.len();
        let targets = Tensor::new(&ids[1..], &Device::Cpu).unwrap();
        let loss =
            candle_nn::loss::cross_entropy(&logits.narrow(0, 0, t - 1).unwrap(), &targets).unwrap();
        let mut grads = loss.backward().unwrap();
        clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        opt.step(&grads, sched.lr(s)).unwrap();
    }
}

fn weights(vm: &VarMap) -> HashMap<String, Tensor> {
    named_vars(vm)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect()
}

#[test]
fn resume_continues_exactly() {
    let sched = Schedule {
        peak_lr: 3e-3,
        warmup_steps: 2,
        total_steps: 8,
        final_fraction: 0.1,
    };
    let (vm_a, a) = model(5);
    let mut opt_a = AdamW::new(named_vars(&vm_a), AdamWConfig::default()).unwrap();
    run(&a, &vm_a, &mut opt_a, &sched, 0, 8);

    let (vm_b, b) = model(5);
    let mut opt_b = AdamW::new(named_vars(&vm_b), AdamWConfig::default()).unwrap();
    run(&b, &vm_b, &mut opt_b, &sched, 0, 4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let meta = Checkpoint {
        step: 4,
        config: serde_json::json!({"schedule": sched}),
    };
    save_checkpoint(&path, &weights(&vm_b), &opt_b.state(), &meta).unwrap();

    // A fresh process would start from other weights: resume overwrites them.
    let (vm_c, c) = model(99);
    let (w, state, got) = load_checkpoint(&path, &Device::Cpu).unwrap();
    assert_eq!(got, meta);
    for (name, var) in named_vars(&vm_c) {
        var.set(&w[&name]).unwrap();
    }
    let mut opt_c = AdamW::new(named_vars(&vm_c), AdamWConfig::default()).unwrap();
    opt_c.load_state(&state, got.step).unwrap();
    run(&c, &vm_c, &mut opt_c, &sched, 4, 8);

    let (wa, wc) = (weights(&vm_a), weights(&vm_c));
    let mut worst = 0f32;
    for (k, ta) in &wa {
        let d = (ta - &wc[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(d);
    }
    assert!(
        worst < 1e-6,
        "resumed weights differ from the straight run by {worst}"
    );
    // And training did change the weights.
    let (vm0, _) = model(5);
    let moved = (&wa["language_model.lm_head.weight"]
        - &weights(&vm0)["language_model.lm_head.weight"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 1e-4);
}

/// Run by `checkpoint_survives_sigkill` in a child process: writes
/// checkpoints of growing step in a loop until killed.
#[test]
#[ignore = "helper process for checkpoint_survives_sigkill"]
fn checkpoint_writer_helper() {
    let Ok(path) = std::env::var("AUTOGLM_CKPT_PATH") else {
        return;
    };
    let big = Tensor::ones((1024, 1024), DType::F32, &Device::Cpu).unwrap();
    for step in 1.. {
        let w = HashMap::from([("w".to_string(), (&big * step as f64).unwrap())]);
        let meta = Checkpoint {
            step,
            config: serde_json::json!({}),
        };
        save_checkpoint(std::path::Path::new(&path), &w, &Default::default(), &meta).unwrap();
    }
}

#[test]
fn checkpoint_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    // Kill at growing delays (a slow machine may need a while for the first
    // complete write) until the checkpoint has been verified three times.
    let mut verified = 0;
    for delay_ms in [150u64, 300, 600, 1200, 2400, 4800] {
        if verified == 3 {
            break;
        }
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "checkpoint_writer_helper",
                "--ignored",
                "--nocapture",
            ])
            .env("AUTOGLM_CKPT_PATH", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        if !path.exists() {
            continue; // killed before the first rename
        }
        let (w, _, meta) = load_checkpoint(&path, &Device::Cpu).unwrap();
        let v = w["w"].max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(v, meta.step as f32, "weights and step from the same write");
        verified += 1;
    }
    assert!(verified > 0, "the writer never completed a checkpoint");
    // A torn file is refused with a clear error, not loaded.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_checkpoint(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("checkpoint") || e.contains("safetensors"), "{e}");
}

/// The written-out loop on real easy-VQA examples: a tiny VLM learns to
/// answer (loss falls), metrics are logged every step, and a run extended
/// from its checkpoint continues from where it stopped.
#[test]
fn trainer_smoke_on_easy_vqa() {
    use autoglm::data::easy_vqa;
    use autoglm::io::image::{load, ImageLimits};
    use autoglm::io::preprocess::{CropRounding, Preprocess, Resample};
    use autoglm::train::{TrainConfig, Trainer};

    let (train, _) = easy_vqa::load(&common::asset("easy-vqa"), "train").unwrap();
    let examples: Vec<_> = train.into_iter().take(24).collect();
    // Word-level vocabulary: 0 pad, 1 bos, 3 image, words from 4.
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for e in &examples {
        for w in e.question.split_whitespace().chain([e.answer.as_str()]) {
            let n = vocab.len() as u32 + 4;
            vocab.entry(w.to_string()).or_insert(n);
        }
    }
    assert!(
        vocab.len() + 4 <= 64,
        "tiny() has 64 tokens, need {}",
        vocab.len() + 4
    );
    let pre = Preprocess {
        shortest_edge: 16,
        resample: Resample::Bilinear,
        crop: (16, 16),
        crop_rounding: CropRounding::HalfEven,
        mean: [0.5; 3],
        std: [0.5; 3],
    };
    let (vm, m) = model(7);
    let data: Vec<(Vec<u32>, Tensor, u32)> = examples
        .iter()
        .map(|e| {
            let mut ids = vec![1, 3];
            ids.extend(e.question.split_whitespace().map(|w| vocab[w]));
            let ids = m.expand_image_tokens(&ids, 1).unwrap();
            let img = load(&e.image, ImageLimits::default()).unwrap();
            let px = pre
                .normalize(&pre.resize_crop(&img).unwrap(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            (ids, px, vocab[&e.answer])
        })
        .collect();
    // Loss of example i: the answer predicted after the question.
    let example_loss = |m: &Llava, i: usize| -> autoglm::Result<Tensor> {
        let (ids, px, ans) = &data[i % data.len()];
        let logits = m
            .forward(ids, Some(px), &mut m.lm.new_cache())?
            .squeeze(0)?;
        let last = logits.narrow(0, ids.len() - 1, 1)?;
        Ok(candle_nn::loss::cross_entropy(
            &last,
            &Tensor::new(&[*ans], &Device::Cpu)?,
        )?)
    };
    let mean_loss = |m: &Llava| -> f64 {
        (0..data.len())
            .map(|i| example_loss(m, i).unwrap().to_scalar::<f32>().unwrap() as f64)
            .sum::<f64>()
            / data.len() as f64
    };
    let before = mean_loss(&m);
    let config = |steps| TrainConfig {
        steps,
        grad_accum: 2,
        schedule: Schedule {
            peak_lr: 1e-2,
            warmup_steps: 3,
            total_steps: 40,
            final_fraction: 0.1,
        },
        adamw: AdamWConfig::default(),
        clip_norm: 1.0,
        freeze: vec!["vision_tower.".into()],
        eval_every: 10,
        checkpoint_every: 10,
        seed: 0,
        workers: 2,
    };
    let dir = tempfile::tempdir().unwrap();
    let frozen_before = weights(&vm)["vision_tower.encoder.layers.0.mlp.fc1.weight"].clone();
    let mut t = Trainer::new(&vm, config(20), dir.path()).unwrap();
    assert!(t.trainable() < vm.all_vars().iter().map(|v| v.elem_count()).sum::<usize>());
    let run = |t: &mut Trainer| {
        t.run(
            &vm,
            &|step, micro| example_loss(&m, step * 2 + micro),
            &mut |_| Ok(serde_json::json!({"loss": mean_loss(&m)})),
            &mut |_| {},
        )
        .unwrap()
    };
    run(&mut t);
    // Extend the run to 40 steps from the checkpoint, in a "new process".
    let mut t2 = Trainer::new(&vm, config(40), dir.path()).unwrap();
    assert!(t2.resume(&vm).unwrap());
    assert_eq!(t2.step, 20);
    run(&mut t2);
    let after = mean_loss(&m);
    eprintln!("easy-VQA smoke: mean loss {before:.3} → {after:.3}");
    assert!(after < 0.5 * before, "loss {before} → {after}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 40);
    assert_eq!(lines.iter().filter(|l| l.get("eval").is_some()).count(), 4);
    let frozen_after = &weights(&vm)["vision_tower.encoder.layers.0.mlp.fc1.weight"];
    assert_eq!(
        common::max_abs_diff(&frozen_before, frozen_after),
        0.0,
        "frozen weights moved"
    );
}

/// `train_vqa` end to end on a few real easy-VQA examples: the output
/// directory is a model `ask` and `evaluate` load, the loss falls, and the
/// run resumes from its checkpoint.
#[test]
fn vqa_training_writes_a_usable_model() {
    use autoglm::train::vqa::{evaluate, load_data, train_vqa, DataSource, VqaTrainConfig};
    // Two workers, the open-questions-first curriculum and flips: the
    // paths the default model's training takes, on a tiny ViT.
    let cfg = |steps: usize| -> VqaTrainConfig {
        serde_json::from_value(serde_json::json!({
            "data": {"kind": "easy-vqa"}, "vision": "vit", "max_train_examples": 64,
            "image_size": 16, "patch_size": 8, "vision_hidden": 16, "vision_layers": 1,
            "vision_heads": 2, "projector": "mlp", "text_hidden": 32, "text_layers": 1,
            "text_heads": 2, "text_kv_heads": 1, "vocab_size": 262, "steps": steps,
            "batch_size": 4, "peak_lr": 3e-3, "warmup_steps": 2, "clip_norm": 1.0, "seed": 1,
            "checkpoint_every": 10, "open_first_steps": 3, "workers": 2, "held_out_images": 0,
            "balance_answers": true
        }))
        .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut losses = Vec::new();
    train_vqa(&cfg(10), dir.path(), false, &mut |m| losses.push(m.loss)).unwrap();
    train_vqa(&cfg(30), dir.path(), true, &mut |m| losses.push(m.loss)).unwrap();
    assert_eq!(losses.len(), 30, "the resumed run continued at step 10");
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[25..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.7 * first, "loss {first:.3} → {last:.3}");
    let test: Vec<_> = load_data(&DataSource::EasyVqa, "test")
        .unwrap()
        .into_iter()
        .take(12)
        .collect();
    let r = evaluate(dir.path(), &test, &Device::Cpu, Default::default()).unwrap();
    assert_eq!(r.examples, 12);
    assert!((0.0..=1.0).contains(&r.accuracy));
    assert_eq!(r.per_type.values().map(|(n, _)| n).sum::<usize>(), 12);

    // Fine-tuning from the saved model: one step at a vanishing rate keeps
    // its weights and its tokenizer; a differently shaped model is refused.
    let ft = tempfile::tempdir().unwrap();
    let mut c = cfg(1);
    c.peak_lr = 1e-12;
    c.init_from = Some(dir.path().to_path_buf());
    train_vqa(&c, ft.path(), false, &mut |_| {}).unwrap();
    let load = |d: &std::path::Path| {
        candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap()
    };
    let (before, after) = (load(dir.path()), load(ft.path()));
    assert_eq!(before.len(), after.len());
    for (name, t) in &before {
        let d = common::max_abs_diff(t, &after[name]);
        assert!(d < 1e-6, "{name} moved by {d}");
    }
    assert_eq!(
        std::fs::read(dir.path().join("tokenizer.json")).unwrap(),
        std::fs::read(ft.path().join("tokenizer.json")).unwrap()
    );
    let mut wider = c.clone();
    wider.text_hidden = 48;
    let e = train_vqa(
        &wider,
        tempfile::tempdir().unwrap().path(),
        false,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("init_from") && e.contains("different model"),
        "{e}"
    );
}

/// A model with image→text attention and block top-k attention trains (the
/// gates, which start at 0, move), records the choices in its config and
/// loads for `ask`/`eval`.
#[test]
fn image_text_attention_trains_and_reloads() {
    use autoglm::train::vqa::{evaluate, load_data, train_vqa, DataSource, VqaTrainConfig};
    let cfg: VqaTrainConfig = serde_json::from_value(serde_json::json!({
        "data": {"kind": "easy-vqa"}, "vision": "vit", "max_train_examples": 32,
        "image_size": 16, "patch_size": 8, "vision_hidden": 16, "vision_layers": 1,
        "vision_heads": 2, "projector": "mlp", "text_hidden": 32, "text_layers": 1,
        "text_heads": 2, "text_kv_heads": 1, "vocab_size": 262, "steps": 6,
        "batch_size": 4, "peak_lr": 3e-3, "warmup_steps": 1, "clip_norm": 1.0, "seed": 2,
        "held_out_images": 0, "image_text_attention_heads": 2, "attention_top_k": 4,
        "attention_block_size": 2
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    train_vqa(&cfg, dir.path(), false, &mut |_| {}).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["image_text_attention_heads"], 2);
    assert_eq!(saved["text_config"]["attention_top_k"], 4);
    assert_eq!(saved["vision_config"]["attention_top_k"], 4);
    assert_eq!(saved["text_config"]["attention_block_size"], 2);
    assert_eq!(saved["vision_config"]["attention_block_size"], 2);
    let w =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    for g in [
        "image_text_attention.attn_gate",
        "image_text_attention.ff_gate",
    ] {
        let v = w[g].to_vec1::<f32>().unwrap()[0];
        assert!(v != 0.0, "{g} did not train");
    }
    let test: Vec<_> = load_data(&DataSource::EasyVqa, "test")
        .unwrap()
        .into_iter()
        .take(4)
        .collect();
    let r = evaluate(dir.path(), &test, &Device::Cpu, Default::default()).unwrap();
    assert_eq!(r.examples, 4);
}

/// Image self-attention blocks added to a trained model (`init_from`)
/// start as the identity: the new model answers exactly as the old one
/// until it trains. Training then opens their gates, and the saved model
/// records the blocks and reloads for `eval`.
#[test]
fn image_self_attention_joins_a_trained_model_and_reloads() {
    use autoglm::train::vqa::{evaluate, load_data, train_vqa, DataSource, VqaTrainConfig};
    let base = serde_json::json!({
        "data": {"kind": "easy-vqa"}, "vision": "vit", "max_train_examples": 32,
        "image_size": 16, "patch_size": 8, "vision_hidden": 16, "vision_layers": 1,
        "vision_heads": 2, "projector": "mlp", "text_hidden": 32, "text_layers": 1,
        "text_heads": 2, "text_kv_heads": 1, "vocab_size": 262, "steps": 4,
        "batch_size": 4, "peak_lr": 3e-3, "warmup_steps": 1, "clip_norm": 1.0, "seed": 2,
        "held_out_images": 0
    });
    let first = tempfile::tempdir().unwrap();
    let cfg: VqaTrainConfig = serde_json::from_value(base.clone()).unwrap();
    train_vqa(&cfg, first.path(), false, &mut |_| {}).unwrap();
    let mut more = base.clone();
    more["init_from"] = first.path().to_str().unwrap().into();
    more["image_self_attention_layers"] = 2.into();
    let test: Vec<_> = load_data(&DataSource::EasyVqa, "test")
        .unwrap()
        .into_iter()
        .take(8)
        .collect();
    // The old weights in a model with the blocks: the blocks' own
    // weights are all that is new, and the features are the old ones.
    let old = Llava::load(first.path(), &Device::Cpu).unwrap();
    let mut with: LlavaConfig = autoglm::io::read_json(&first.path().join("config.json")).unwrap();
    with.image_self_attention_layers = 2;
    let vm = VarMap::new();
    let new = Llava::new(
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        &with,
    )
    .unwrap();
    let saved =
        candle_core::safetensors::load(first.path().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    for (name, var) in vm.data().lock().unwrap().iter() {
        match saved.get(name) {
            Some(t) => var.set(t).unwrap(),
            None => assert!(name.starts_with("image_self_attention."), "{name}"),
        }
    }
    assert_eq!(new.image_self.len(), 2);
    let pixels: Vec<f32> = (0..2 * 3 * 16 * 16)
        .map(|i| (i * 37 % 101) as f32 / 50.0 - 1.0)
        .collect();
    let pixels = Tensor::from_vec(pixels, (2, 3, 16, 16), &Device::Cpu).unwrap();
    // (Not bit-exact: the two load paths differ in float rounding.)
    let d = common::max_abs_diff(
        &old.image_features(&pixels).unwrap(),
        &new.image_features(&pixels).unwrap(),
    );
    assert!(d < 1e-5, "closed blocks changed the features by {d}");
    let trained = tempfile::tempdir().unwrap();
    let cfg: VqaTrainConfig = serde_json::from_value(more).unwrap();
    train_vqa(&cfg, trained.path(), false, &mut |_| {}).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trained.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["image_self_attention_layers"], 2);
    let w = candle_core::safetensors::load(trained.path().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    for g in [
        "image_self_attention.0.attn_gate",
        "image_self_attention.1.ff_gate",
    ] {
        let v = w[g].to_vec1::<f32>().unwrap()[0];
        assert!(v != 0.0, "{g} did not train");
    }
    let moved = Llava::load(trained.path(), &Device::Cpu).unwrap();
    let d = common::max_abs_diff(
        &old.image_features(&pixels).unwrap(),
        &moved.image_features(&pixels).unwrap(),
    );
    assert!(d > 1e-4, "training moved the features by only {d}");
    let r = evaluate(trained.path(), &test, &Device::Cpu, Default::default()).unwrap();
    assert_eq!(r.examples, 8);
}

/// The confusion matrix counts true answer × given answer, with `(other)`
/// for answers outside the label set, and draws as a PNG.
#[test]
fn confusion_matrix_counts_and_draws() {
    use autoglm::train::vqa::Confusion;
    let truth = ["yes", "no", "red", "red"];
    let given: Vec<String> = ["yes", "yes", "red", "purple"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let c = Confusion::from_answers(&truth, &given);
    assert_eq!(c.labels, ["no", "red", "yes", "(other)"]);
    assert_eq!(
        c.counts,
        vec![vec![0, 0, 1, 0], vec![0, 1, 0, 1], vec![0, 0, 1, 0]]
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("confusion.png");
    c.plot(&path).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    assert!(img.width() > 200 && img.height() > 200);
    // The diagonal cells are green, the wrong ones red.
    let green = img.pixels().filter(|p| p[1] == 255 && p[0] < 100).count();
    let red = img.pixels().filter(|p| p[0] == 255 && p[1] < 100).count();
    assert!(green > 1000 && red > 1000, "green {green}, red {red}");
}

/// `metrics.jsonl` becomes loss.png and accuracy.png.
#[test]
fn metrics_plot_to_png() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (1..=40)
        .map(|s| {
            let eval = if s % 10 == 0 {
                format!(r#","eval":{{"held_out_accuracy":{}}}"#, s as f64 / 50.0)
            } else {
                String::new()
            };
            format!(
                r#"{{"step":{s},"loss":{},"lr":0.001,"grad_norm":1.0,"seconds":{s}{eval}}}"#,
                3.0 / s as f64
            )
        })
        .collect();
    std::fs::write(dir.path().join("metrics.jsonl"), lines.join("\n")).unwrap();
    autoglm::train::plot::plot_metrics(dir.path()).unwrap();
    for f in ["loss.png", "accuracy.png"] {
        let img = image::open(dir.path().join(f)).unwrap();
        assert_eq!((img.width(), img.height()), (800, 480), "{f}");
    }
}

/// `vision_config.feature_stage`: EfficientNet's tokens are that stage's
/// cells (stride 16 after stage 4: 8 × 8 at 128²; stride 4 after stage 2),
/// as wide as its channels.
#[test]
fn a_feature_stage_sets_the_token_grid() {
    let cfg = |stage: Option<usize>| -> LlavaConfig {
        let mut v = serde_json::json!({
            "image_token_index": 3, "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "vision_config": {"model_type": "efficientnet_lite0", "hidden_size": 1280,
                              "image_size": 128},
            "text_config": {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                            "num_hidden_layers": 2, "num_attention_heads": 2,
                            "max_position_embeddings": 256}
        });
        if let Some(k) = stage {
            v["vision_config"]["feature_stage"] = k.into();
        }
        serde_json::from_value(v).unwrap()
    };
    let grid = |c: &LlavaConfig| (c.image_tokens(), c.vision_config.feature_width());
    assert_eq!(grid(&cfg(None)), (16, 1280));
    assert_eq!(grid(&cfg(Some(4))), (64, 80));
    assert_eq!(grid(&cfg(Some(2))), (32 * 32, 24));
    assert_eq!(grid(&cfg(Some(7))), (16, 320));
    let path = std::path::Path::new("config.json");
    assert!(cfg(Some(4)).validate(path).is_ok());
    let e = cfg(Some(8)).validate(path).unwrap_err().to_string();
    assert!(e.contains("feature_stage 8"), "{e}");

    // token_coords: each token gains its cell's centre after its channels,
    // and the channels are the same as without.
    let with_coords = |stage| {
        let mut c = cfg(stage);
        c.vision_config.token_coords = true;
        c
    };
    assert_eq!(grid(&with_coords(Some(4))), (64, 82));
    assert_eq!(grid(&with_coords(None)), (16, 1282));
    let build = |vm: &VarMap, c: &LlavaConfig| {
        Llava::new(VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu), c).unwrap()
    };
    let (vm, vm_coords) = (VarMap::new(), VarMap::new());
    let plain = build(&vm, &cfg(Some(4)));
    let coords = build(&vm_coords, &with_coords(Some(4)));
    // The same tower weights in every model (the projectors differ in width).
    let same_tower = |other: &VarMap| {
        let theirs = vm.data().lock().unwrap();
        for (name, var) in other.data().lock().unwrap().iter() {
            if name.starts_with("vision_tower") {
                var.set(theirs[name].as_tensor()).unwrap();
            }
        }
    };
    same_tower(&vm_coords);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let px: Vec<f32> = (0..2 * 3 * 128 * 128)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let px = Tensor::from_vec(px, (2, 3, 128, 128), &Device::Cpu).unwrap();
    let a = plain.vision_features(&px).unwrap();
    let b = coords.vision_features(&px).unwrap();
    assert_eq!(b.dims(), &[2, 64, 82]);
    assert_eq!(common::max_abs_diff(&b.narrow(2, 0, 80).unwrap(), &a), 0.0);
    // Row-major 8 × 8 cells: token 8·r + c has x = (2c + 1)/8 − 1 and
    // y = (2r + 1)/8 − 1.
    let xy = b.narrow(2, 80, 2).unwrap().to_vec3::<f32>().unwrap();
    for (i, p) in xy[1].iter().enumerate() {
        let at = |k: usize| (2 * k + 1) as f32 / 8.0 - 1.0;
        assert_eq!(p, &vec![at(i % 8), at(i / 8)], "token {i}");
    }
    // image_self_attention_distance_slope: the blocks read the tokens'
    // (x, y). Its slopes start at the config's value, and once the
    // attention gate is open they change the projected tokens.
    let mut dist = with_coords(Some(4));
    dist.image_self_attention_layers = 1;
    dist.image_self_attention_distance_slope = Some(3.0);
    assert!(dist.validate(path).is_ok());
    let vm_dist = VarMap::new();
    let biased = build(&vm_dist, &dist);
    let slope = vm_dist.data().lock().unwrap()["image_self_attention.0.distance_slope"]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(slope, vec![3.0, 3.0]);
    let closed = biased.project(&b).unwrap();
    let set = |name: &str, v: &[f32]| {
        vm_dist.data().lock().unwrap()[name]
            .set(&Tensor::new(v, &Device::Cpu).unwrap())
            .unwrap()
    };
    set("image_self_attention.0.attn_gate", &[0.5]);
    let open = biased.project(&b).unwrap();
    assert!(common::max_abs_diff(&open, &closed) > 1e-4);
    set("image_self_attention.0.distance_slope", &[0.0, 0.0]);
    let flat = biased.project(&b).unwrap();
    let d = common::max_abs_diff(&open, &flat);
    assert!(d > 1e-4, "the distance bias changed nothing: {d}");
    // project_with_mix: project's tokens, split into the projected tokens
    // and what the blocks add, computed from the tokens detached: a loss
    // on that part reaches the blocks and not the projector.
    let (sum, delta) = biased.project_with_mix(&b).unwrap();
    assert!(common::max_abs_diff(&sum, &flat) < 1e-6);
    assert!(common::max_abs_diff(&delta, &delta.zeros_like().unwrap()) > 1e-4);
    let var = |name: &str| vm_dist.data().lock().unwrap()[name].as_tensor().clone();
    let projector = "multi_modal_projector.linear_1.weight";
    let reaches = |t: &Tensor, name: &str| {
        let g = t.sum_all().unwrap().backward().unwrap();
        common::has_gradient(&g, &var(name))
    };
    assert!(reaches(&delta, "image_self_attention.0.attn_gate"));
    assert!(!reaches(&delta, projector));
    assert!(reaches(&sum, projector) && reaches(&flat, projector));
    dist.vision_config.token_coords = false;
    let e = dist.validate(path).unwrap_err().to_string();
    assert!(e.contains("image_self_attention_distance_slope"), "{e}");
    // low_level_stage: stage 2's 32 × 32 map pooled onto the 8 × 8 grid
    // sits between the channels and the coordinates.
    let mut low = with_coords(Some(4));
    low.vision_config.low_level_stage = Some(2);
    assert_eq!(grid(&low), (64, 80 + 24 + 2));
    let vm_low = VarMap::new();
    let with_low = build(&vm_low, &low);
    same_tower(&vm_low);
    let c = with_low.vision_features(&px).unwrap();
    assert_eq!(c.dims(), &[2, 64, 106]);
    assert_eq!(common::max_abs_diff(&c.narrow(2, 0, 80).unwrap(), &a), 0.0);
    assert_eq!(
        common::max_abs_diff(&c.narrow(2, 104, 2).unwrap(), &b.narrow(2, 80, 2).unwrap()),
        0.0
    );
    let autoglm::vlm::VisionTower::EfficientNet(tower) = &plain.vision else {
        panic!("an EfficientNet tower")
    };
    let stage2 = tower.stage_map_tokens(&px, 2).unwrap(); // (2, 32·32, 24)
    let by_hand = stage2
        .reshape((2, 8, 4, 8, 4, 24))
        .unwrap()
        .mean(4)
        .unwrap()
        .mean(2)
        .unwrap()
        .reshape((2, 64, 24))
        .unwrap();
    let d = common::max_abs_diff(&c.narrow(2, 80, 24).unwrap(), &by_hand);
    assert!(d < 1e-5, "pooled stage 2 off by {d}");
    for bad in [0, 4] {
        let mut c = cfg(Some(4));
        c.vision_config.low_level_stage = Some(bad);
        let e = c.validate(path).unwrap_err().to_string();
        assert!(e.contains("low_level_stage"), "{e}");
    }
    // token_coord_products: the tower's features are unchanged (the
    // training cache holds them); a linear projector reads 80 + 2 + 2 × 80
    // inputs, the last 160 being each channel times x, then times y.
    let mut prod = with_coords(Some(4));
    prod.vision_config.token_coord_products = true;
    prod.projector_type = "linear".into();
    assert_eq!(grid(&prod), (64, 82));
    assert_eq!(prod.vision_config.projector_input_width(), 242);
    let vm_prod = VarMap::new();
    let with_prod = build(&vm_prod, &prod);
    same_tower(&vm_prod);
    let f = with_prod.vision_features(&px).unwrap();
    assert_eq!(common::max_abs_diff(&f, &b), 0.0);
    let w = vm_prod.data().lock().unwrap()["multi_modal_projector.linear_1.weight"]
        .as_tensor()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!((w.len(), w[0].len()), (16, 242));
    let bias = vm_prod.data().lock().unwrap()["multi_modal_projector.linear_1.bias"]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    let got = with_prod.project(&f).unwrap().to_vec3::<f32>().unwrap();
    let feats = f.to_vec3::<f32>().unwrap();
    for (n, t) in [(0, 0), (1, 9), (1, 63)] {
        let v = &feats[n][t];
        let (x, y) = (v[80], v[81]);
        for (o, row) in w.iter().enumerate() {
            let mut want = bias[o] as f64;
            for k in 0..82 {
                want += (row[k] * v[k]) as f64;
            }
            for k in 0..80 {
                want += (row[82 + k] * v[k] * x) as f64 + (row[162 + k] * v[k] * y) as f64;
            }
            let d = (got[n][t][o] as f64 - want).abs();
            assert!(
                d < 1e-4,
                "image {n} token {t} output {o}: {} vs {want}",
                got[n][t][o]
            );
        }
    }
    // token_coord_products_linear: the projector reads the 82 features,
    // and a linear map of the 160 products, zero after init_weights, is
    // added to its output.
    let mut lin = prod.clone();
    lin.vision_config.token_coord_products_linear = true;
    assert_eq!(lin.vision_config.projector_input_width(), 82);
    assert_eq!(lin.vision_config.coord_extra_width(), 160);
    assert!(lin.validate(path).is_ok());
    let vm_lin = VarMap::new();
    let with_lin = build(&vm_lin, &lin);
    autoglm::train::vqa::init_weights(&vm_lin, 3, None).unwrap();
    let var = |name: &str| vm_lin.data().lock().unwrap()[name].clone();
    let map = var("multi_modal_projector.coord_products.weight");
    assert_eq!(map.as_tensor().dims(), &[16, 160]);
    assert_eq!(
        map.as_tensor()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let plain = with_lin.projector.forward(&f).unwrap();
    assert_eq!(
        common::max_abs_diff(&with_lin.project(&f).unwrap(), &plain),
        0.0
    );
    let m: Vec<f32> = (0..16 * 160)
        .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
        .collect();
    map.set(&Tensor::from_vec(m.clone(), (16, 160), &Device::Cpu).unwrap())
        .unwrap();
    let got = with_lin.project(&f).unwrap().to_vec3::<f32>().unwrap();
    let plain = plain.to_vec3::<f32>().unwrap();
    for (n, t) in [(0, 0), (1, 9), (1, 63)] {
        let v = &feats[n][t];
        let (x, y) = (v[80], v[81]);
        for o in 0..16 {
            let row = &m[o * 160..(o + 1) * 160];
            let mut want = plain[n][t][o] as f64;
            for k in 0..80 {
                want += (row[k] * v[k] * x) as f64 + (row[80 + k] * v[k] * y) as f64;
            }
            let d = (got[n][t][o] as f64 - want).abs();
            assert!(
                d < 1e-4,
                "linear: image {n} token {t} output {o}: {} vs {want}",
                got[n][t][o]
            );
        }
    }
    // token_coord_fourier: 2 frequencies add 8 inputs after the products
    // to the linear map: sin, cos of x then of y at π/2, then at π.
    let mut four = lin.clone();
    four.vision_config.token_coord_fourier = 2;
    assert_eq!(four.vision_config.projector_input_width(), 82);
    assert_eq!(four.vision_config.coord_extra_width(), 168);
    assert!(four.validate(path).is_ok());
    let vm_four = VarMap::new();
    let with_four = build(&vm_four, &four);
    same_tower(&vm_four);
    for (name, var) in vm_four.data().lock().unwrap().iter() {
        if name.starts_with("multi_modal_projector.linear") {
            var.set(vm_lin.data().lock().unwrap()[name].as_tensor())
                .unwrap();
        }
    }
    // Only the Fourier columns non-zero: the output is the plain one plus
    // the map of the 8 features.
    let m4: Vec<f32> = (0..16 * 168)
        .map(|i| {
            if i % 168 >= 160 {
                ((i % 7) as f32 - 3.0) * 0.1
            } else {
                0.0
            }
        })
        .collect();
    vm_four.data().lock().unwrap()["multi_modal_projector.coord_products.weight"]
        .set(&Tensor::from_vec(m4.clone(), (16, 168), &Device::Cpu).unwrap())
        .unwrap();
    let got = with_four.project(&f).unwrap().to_vec3::<f32>().unwrap();
    for (n, t) in [(0, 0), (1, 9), (1, 63)] {
        let (x, y) = (feats[n][t][80] as f64, feats[n][t][81] as f64);
        let h = std::f64::consts::FRAC_PI_2;
        let four_feats = [
            (h * x).sin(),
            (h * x).cos(),
            (h * y).sin(),
            (h * y).cos(),
            (2.0 * h * x).sin(),
            (2.0 * h * x).cos(),
            (2.0 * h * y).sin(),
            (2.0 * h * y).cos(),
        ];
        for o in 0..16 {
            let mut want = plain[n][t][o] as f64;
            for (k, v) in four_feats.iter().enumerate() {
                want += m4[o * 168 + 160 + k] as f64 * v;
            }
            let d = (got[n][t][o] as f64 - want).abs();
            assert!(
                d < 1e-4,
                "fourier: image {n} token {t} output {o}: {} vs {want}",
                got[n][t][o]
            );
        }
    }
    let mut no_coords = cfg(Some(4));
    no_coords.vision_config.token_coord_fourier = 2;
    let e = no_coords.validate(path).unwrap_err().to_string();
    assert!(e.contains("token_coord_fourier"), "{e}");
    let mut alone = with_coords(Some(4));
    alone.vision_config.token_coord_products_linear = true;
    let e = alone.validate(path).unwrap_err().to_string();
    assert!(e.contains("token_coord_products_linear"), "{e}");
    let mut bare = cfg(Some(4));
    bare.vision_config.token_coord_products = true;
    let e = bare.validate(path).unwrap_err().to_string();
    assert!(e.contains("token_coord_products"), "{e}");
    let mut vit = cfg(None);
    vit.vision_config.model_type = None;
    vit.vision_config.token_coords = true;
    let e = vit.validate(path).unwrap_err().to_string();
    assert!(e.contains("token_coords"), "{e}");
}

/// Impossible training configs are refused before any work, naming the field.
#[test]
fn bad_training_configs_name_the_field() {
    use autoglm::train::vqa::VqaTrainConfig;
    let base = serde_json::json!({"data": {"kind": "easy-vqa"}, "image_size": 64, "patch_size": 16,
        "vision_hidden": 96, "vision_layers": 1, "vision_heads": 2, "projector": "mlp",
        "text_hidden": 64, "text_layers": 1, "text_heads": 2, "text_kv_heads": 1, "vocab_size": 300,
        "steps": 10, "batch_size": 8, "peak_lr": 1e-3, "warmup_steps": 1, "clip_norm": 1.0, "seed": 0});
    let check = |patch: serde_json::Value, field: &str| {
        let mut v = base.clone();
        for (k, x) in patch.as_object().unwrap() {
            v[k] = x.clone();
        }
        let c: VqaTrainConfig = serde_json::from_value(v).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    };
    let ok: VqaTrainConfig = serde_json::from_value(base.clone()).unwrap();
    assert!(!ok.validate().unwrap(), "a ViT config is valid");
    check(serde_json::json!({"vision": "resnet"}), "vision");
    check(serde_json::json!({"workers": 3}), "workers");
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "image_size": 100}),
        "image_size",
    );
    check(serde_json::json!({"projector": "none"}), "projector");
    // A curriculum stage must last and name types; the stages must leave
    // steps for every type, and not compete with open_first_steps.
    for bad in [
        serde_json::json!([{"steps": 0, "types": ["shape"]}]),
        serde_json::json!([{"steps": 2, "types": []}]),
        serde_json::json!([{"steps": 2, "types": [" "]}]),
        serde_json::json!([{"steps": 4, "types": ["shape"]}, {"steps": 6, "types": ["count"]}]),
    ] {
        check(serde_json::json!({"curriculum": bad}), "curriculum");
    }
    check(
        serde_json::json!({"curriculum": [{"steps": 2, "types": ["shape"]}], "open_first_steps": 2}),
        "curriculum",
    );
    let mut typo = base.clone();
    typo["curriculum"] = serde_json::json!([{"steps": 2, "type": ["shape"]}]);
    let e = serde_json::from_value::<VqaTrainConfig>(typo)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `type`"), "{e}");
    check(
        serde_json::json!({"questions_per_image": 3}),
        "questions_per_image",
    );
    check(
        serde_json::json!({"questions_per_image": 4, "image_after_question": true}),
        "questions_per_image",
    );
    check(
        serde_json::json!({"questions_per_image": 4, "image_text_attention_heads": 2}),
        "questions_per_image",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "vision_feature_stage": 4,
                           "vision_low_level_stage": 4}),
        "vision_low_level_stage",
    );
    check(
        serde_json::json!({"vision_token_coords": true}),
        "vision_token_coords",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "vision_token_coords": true,
                           "router_light_tower_stage": 4}),
        "vision_token_coords",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "vision_feature_stage": 4,
                           "vision_token_coords": true, "projector": "none", "text_hidden": 80}),
        "projector",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "vision_feature_stage": 4,
                           "vision_token_coord_products": true}),
        "vision_token_coord_products",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "vision_feature_stage": 4,
                           "vision_token_coords": true, "vision_token_coord_products": true,
                           "projector": "none", "text_hidden": 82}),
        "projector",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "vision_feature_stage": 4,
                           "vision_token_coords": true, "vision_token_coord_products_linear": true}),
        "vision_token_coord_products_linear",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "vision_feature_stage": 4,
                           "vision_token_coords": true, "vision_token_coord_fourier": 0}),
        "vision_token_coord_fourier",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "vision_feature_stage": 4,
                           "vision_token_coord_fourier": 4}),
        "vision_token_coord_fourier",
    );
    check(
        serde_json::json!({"oracle_scenes": "scenes.jsonl"}),
        "oracle_scenes",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "vision_token_coords": true,
                           "oracle_scenes": "scenes.jsonl", "augment": true}),
        "oracle_scenes",
    );
    check(serde_json::json!({"vocab_size": 261}), "vocab_size");
    check(serde_json::json!({"steps": 0}), "steps");
    check(serde_json::json!({"attention_top_k": 0}), "attention_top_k");
    check(
        serde_json::json!({"attention_block_size": 64}),
        "attention_block_size",
    );
    check(
        serde_json::json!({"attention_top_k": 8, "attention_block_size": 0}),
        "attention_block_size",
    );
    check(
        serde_json::json!({"router_light_layers": 1}),
        "router_light_layers",
    );
    check(
        serde_json::json!({"router_light_image_size": 32}),
        "router_light_image_size",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "router_light_image_size": 48}),
        "router_light_image_size",
    );
    check(
        serde_json::json!({"router_light_tower_stage": 5}),
        "router_light_tower_stage",
    );
    check(
        serde_json::json!({"vision_feature_stage": 4}),
        "vision_feature_stage",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "vision_feature_stage": 0}),
        "vision_feature_stage",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "vision_feature_stage": 4,
            "router_light_tower_stage": 4}),
        "vision_feature_stage",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "router_light_tower_stage": 8}),
        "router_light_tower_stage",
    );
    check(
        serde_json::json!({"vision": "efficientnet-lite0", "router_light_tower_stage": 5,
            "router_light_image_size": 32}),
        "router_light_tower_stage",
    );
    check(
        serde_json::json!({"decoder_cross_attention_every": 0}),
        "decoder_cross_attention_every",
    );
    check(
        serde_json::json!({"decoder_cross_attention_every": 1, "blind": true}),
        "decoder_cross_attention_every",
    );
    check(
        serde_json::json!({"router_cost_weight": -1.0}),
        "router_cost_weight",
    );
    check(
        serde_json::json!({"feature_fusion": "gate"}),
        "feature_fusion",
    );
    check(serde_json::json!({"fpn": true}), "fpn");
    let cnn = |more: serde_json::Value| {
        let mut v = serde_json::json!({"vision": "cnn", "image_size": 80, "vision_layers": 4});
        for (k, x) in more.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    check(cnn(serde_json::json!({"image_size": 75})), "image_size");
    check(
        cnn(serde_json::json!({"vision_layers": 1, "image_size": 64, "feature_fusion": "gate"})),
        "feature_fusion",
    );
    check(
        cnn(serde_json::json!({"vision_layers": 1, "image_size": 64, "fpn": true})),
        "fpn",
    );
    check(
        cnn(serde_json::json!({"vision_hidden": 0})),
        "vision_hidden",
    );
    let e = serde_json::from_value::<VqaTrainConfig>({
        let mut v = base.clone();
        v["feature_fusion"] = "mean".into();
        v
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("`add`, `attention`, `gate`"), "{e}");
    // A misspelt option is an error, not silently ignored.
    let mut typo = base.clone();
    typo["image_text_heads"] = 4.into();
    let e = serde_json::from_value::<VqaTrainConfig>(typo)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `image_text_heads`"), "{e}");
    // Every shipped config parses and validates (a `"model"` field picks
    // the CNN + LSTM baseline, as `autoglm train` does).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    for f in std::fs::read_dir(&dir).unwrap() {
        let p = f.unwrap().path();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let checked = if v.get("model").is_some() {
            serde_json::from_value::<autoglm::train::baseline::BaselineTrainConfig>(v)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
        } else {
            serde_json::from_value::<VqaTrainConfig>(v)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map(|_| ()).map_err(|e| e.to_string()))
        };
        checked.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    check(
        serde_json::json!({"image_text_attention_heads": 3}),
        "image_text_attention_heads",
    );
    check(
        serde_json::json!({"image_text_attention_heads": 2, "blind": true}),
        "image_text_attention_heads",
    );
    check(
        serde_json::json!({"image_self_attention_layers": 17}),
        "image_self_attention_layers",
    );
    check(
        serde_json::json!({"image_self_attention_layers": 1, "blind": true}),
        "image_self_attention_layers",
    );
    check(
        serde_json::json!({"image_self_attention_distance_slope": 4.0}),
        "image_self_attention_distance_slope",
    );
    check(
        serde_json::json!({"image_self_attention_layers": 1, "image_self_attention_distance_slope": 4.0, "vision_token_coords": false}),
        "image_self_attention_distance_slope",
    );
    check(
        serde_json::json!({"neighbour_probe": "scenes.jsonl"}),
        "neighbour_probe",
    );
    check(
        serde_json::json!({"neighbour_probe": "scenes.jsonl", "image_self_attention_layers": 1}),
        "neighbour_probe",
    );
    check(
        serde_json::json!({"neighbour_probe_weight": -1.0}),
        "neighbour_probe_weight",
    );
}

/// `neighbour_probe` end to end on a few Sort-of-CLEVR scenes: the run
/// trains, each eval line scores the probe on every object of the held-out
/// images, and the saved model leaves the probe out.
#[test]
fn neighbour_probe_trains_and_scores_the_held_out_objects() {
    use autoglm::data::sort_of_clevr::{render, scene, COLORS};
    use autoglm::train::vqa::{train_vqa, VqaTrainConfig};
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir(data.path().join("images")).unwrap();
    let (mut rows, mut scenes) = (String::new(), String::new());
    // 20 images: held_out_images takes at most a tenth.
    for i in 0..20 {
        let s = scene(7, i);
        let image = format!("images/{i:05}.png");
        render(&s.objects).save(data.path().join(&image)).unwrap();
        for q in &s.questions {
            rows += &(serde_json::json!({"image": image, "question": q.text, "answer": q.answer,
                "type": q.kind.name()})
            .to_string()
                + "\n");
        }
        let objects: Vec<_> = s
            .objects
            .iter()
            .map(|o| serde_json::json!({"color": COLORS[o.color].0, "x": o.x, "y": o.y, "shape": o.shape.name()}))
            .collect();
        scenes += &(serde_json::json!({"image": image, "split": "train", "objects": objects})
            .to_string()
            + "\n");
    }
    for f in ["train.jsonl", "test.jsonl"] {
        std::fs::write(data.path().join(f), &rows).unwrap();
    }
    std::fs::write(data.path().join("scenes.jsonl"), &scenes).unwrap();
    let at = |f: &str| data.path().join(f).to_str().unwrap().to_string();
    let cfg: VqaTrainConfig = serde_json::from_value(serde_json::json!({
        "data": {"kind": "jsonl", "train": at("train.jsonl"), "test": at("test.jsonl")},
        "vision": "efficientnet-lite0", "image_size": 64, "vision_feature_stage": 4,
        "vision_token_coords": true, "projector": "mlp", "text_hidden": 32, "text_layers": 1,
        "text_heads": 2, "text_kv_heads": 1, "vocab_size": 262, "steps": 2, "batch_size": 4,
        "peak_lr": 1e-3, "warmup_steps": 1, "clip_norm": 1.0, "seed": 0, "eval_every": 2,
        "held_out_images": 2, "augment": false, "questions_per_image": 2, "image_self_attention_layers": 1,
        "neighbour_probe": at("scenes.jsonl")
    }))
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    train_vqa(&cfg, out.path(), false, &mut |_| {}).unwrap();
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(out.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|l| l.get("eval").cloned())
        .collect();
    assert_eq!(evals.len(), 1);
    let p = &evals[0]["neighbour_probe"];
    // Two held-out images of six objects, each scored once.
    assert_eq!(p["objects"], 12, "{p}");
    for k in ["nearest", "furthest"] {
        let v = p[k].as_f64().unwrap();
        let hits = v * 12.0;
        assert!(
            (0.0..=1.0).contains(&v) && (hits - hits.round()).abs() < 1e-6,
            "{k}: {v} is not a share of 12 objects"
        );
    }
    let w =
        candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(w.keys().any(|k| k.starts_with("image_self_attention.")));
    assert!(!w.keys().any(|k| k.starts_with("neighbour_probe")));
}

/// With `image_tokens_share_position`, `ask`'s path (the prompt's prefill,
/// then one token at a time from the KV cache) and training's (the whole
/// row at once) give the same logits: greedy decoding's tokens are the
/// argmax of the teacher-forced logits over them. The shared positions
/// change what the model computes (the same weights without them differ).
#[test]
fn shared_image_positions_decode_as_they_train() {
    use autoglm::text::generate::{generate, GenerateConfig};
    use autoglm::train::vqa::{answer_logits, Encoded, Images};
    let (vm, plain) = model(5);
    let mut cfg = tiny();
    cfg.image_tokens_share_position = true;
    let one = Llava::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let px: Vec<f32> = (0..3 * 16 * 16).map(|_| rng.random::<f32>()).collect();
    let px = Tensor::from_vec(px, (1, 3, 16, 16), &Device::Cpu).unwrap();
    // The question before the image and after it.
    let ids = one.expand_image_tokens(&[1, 7, 9, 3, 12, 30], 1).unwrap();
    let first = |m: &Llava| -> (Vec<u32>, Tensor) {
        let e = m.embed_prompt(&ids, Some(&px)).unwrap();
        let cfg = GenerateConfig {
            max_new_tokens: 6,
            ..GenerateConfig::default()
        };
        let tokens = generate(&m.lm, &e.squeeze(0).unwrap(), &ids, &cfg, None, &mut |_| {
            true
        })
        .unwrap()
        .tokens;
        let row = Encoded {
            prompt: ids.clone(),
            answer: tokens.clone(),
        };
        let (logits, _) = answer_logits(m, &[&row], Images::Pixels(&px)).unwrap();
        assert_eq!(
            logits.argmax(1).unwrap().to_vec1::<u32>().unwrap(),
            tokens,
            "greedy tokens are not the teacher-forced argmax"
        );
        // The prefill's last logits (`Llava::forward`) are the first
        // answer token's.
        let all = m.forward(&ids, Some(&px), &mut m.lm.new_cache()).unwrap();
        let last = all.get(0).unwrap().get(ids.len() - 1).unwrap();
        let d = common::max_abs_diff(&last, &logits.get(0).unwrap());
        assert!(d < 1e-5, "prefill and teacher forcing differ by {d}");
        (tokens, logits)
    };
    let (_, shared) = first(&one);
    let (_, sequential) = first(&plain);
    let d = common::max_abs_diff(&shared.get(0).unwrap(), &sequential.get(0).unwrap());
    assert!(d > 1e-3, "sharing positions changed the logits by only {d}");
    // Continuing from a cache is refused: the positions of what it holds
    // are not known.
    let mut cache = one.lm.new_cache();
    one.forward(&ids, Some(&px), &mut cache).unwrap();
    let e = one.forward(&[5], None, &mut cache).unwrap_err().to_string();
    assert!(e.contains("empty cache"), "{e}");
}

/// Early exit: the states after the first layer of a 2-layer decoder are
/// those of the same weights built as a 1-layer decoder, and decoding with
/// `GenerateConfig::layers = 1` gives the 1-layer model's tokens (the KV
/// cache continued at that depth).
#[test]
fn early_exit_is_the_shallower_decoder() {
    use autoglm::text::generate::{generate, GenerateConfig};
    use autoglm::text::llama::Positions;
    let (vm, deep) = model(11);
    let mut cfg = tiny();
    cfg.text_config.num_hidden_layers = 1;
    let shallow = Llava::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg).unwrap();
    let ids: Vec<u32> = vec![1, 7, 9, 12, 30, 2];
    let e = deep.embed_prompt(&ids, None).unwrap();
    let pos = Positions::contiguous(1, ids.len(), 0, &Device::Cpu).unwrap();
    let exits = deep
        .lm
        .forward_embeds_exits(&e, &pos, &mut deep.lm.new_cache(), &[1, 2])
        .unwrap();
    let full = deep
        .lm
        .forward_embeds(&e, &pos, &mut deep.lm.new_cache())
        .unwrap();
    assert_eq!(common::max_abs_diff(&exits[1], &full), 0.0);
    let one = shallow
        .lm
        .forward_embeds(&e, &pos, &mut shallow.lm.new_cache())
        .unwrap();
    assert_eq!(common::max_abs_diff(&exits[0], &one), 0.0);
    assert!(common::max_abs_diff(&exits[0], &exits[1]) > 1e-3);
    let gen = |m: &Llava, layers| {
        let cfg = GenerateConfig {
            max_new_tokens: 6,
            layers,
            ..GenerateConfig::default()
        };
        generate(&m.lm, &e.squeeze(0).unwrap(), &ids, &cfg, None, &mut |_| {
            true
        })
        .unwrap()
        .tokens
    };
    assert_eq!(gen(&deep, Some(1)), gen(&shallow, None));
    assert_eq!(gen(&deep, Some(2)), gen(&deep, None));
    for bad in [&[][..], &[0], &[2, 1], &[3]] {
        let err = deep
            .lm
            .forward_embeds_exits(&e, &pos, &mut deep.lm.new_cache(), bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exits"), "{bad:?}: {err}");
    }
}

/// The convolutional tower with FPN and gated level fusion, and a router
/// over the decoder's depth: trains end to end, records its choices in
/// `config.json`, reloads for `ask`/`eval`, and routes by its threshold.
#[test]
fn cnn_fusion_and_router_train_and_reload() {
    use autoglm::fusion::router::Route;
    use autoglm::train::eval::EvalOptions;
    use autoglm::train::vqa::{evaluate, load_data, train_vqa, DataSource, VqaTrainConfig};
    let cfg: VqaTrainConfig = serde_json::from_value(serde_json::json!({
        "data": {"kind": "easy-vqa"}, "vision": "cnn", "max_train_examples": 32,
        "image_size": 16, "vision_hidden": 8, "vision_layers": 2, "feature_fusion": "gate",
        "fpn": true, "router_light_layers": 1, "projector": "mlp", "text_hidden": 32,
        "text_layers": 2, "text_heads": 2, "text_kv_heads": 1, "vocab_size": 262, "steps": 6,
        "batch_size": 4, "peak_lr": 3e-3, "warmup_steps": 1, "clip_norm": 1.0, "seed": 3,
        "held_out_images": 0
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut losses = Vec::new();
    train_vqa(&cfg, dir.path(), false, &mut |m| losses.push(m.loss)).unwrap();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let read_cfg = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    let saved = read_cfg(dir.path());
    assert_eq!(saved["vision_config"]["model_type"], "conv_vision");
    assert_eq!(saved["vision_config"]["feature_fusion"], "gate");
    assert_eq!(saved["vision_config"]["fpn"], true);
    assert_eq!(saved["router_light_layers"], 1);
    let w =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    // Biases start at 0: these moved, so gradients reached them.
    for name in [
        "router.score.bias",
        "vision_tower.conv.0.bias",
        "vision_tower.fpn.lateral.0.bias",
        "vision_tower.level_fusion.gate.bias",
    ] {
        let moved = w[name]
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(moved > 0.0, "{name} did not train");
    }
    let test: Vec<_> = load_data(&DataSource::EasyVqa, "test")
        .unwrap()
        .into_iter()
        .take(6)
        .collect();
    let r = evaluate(dir.path(), &test, &Device::Cpu, Default::default()).unwrap();
    let c = r.routes.expect("a routed model reports its routes");
    assert_eq!(c.light + c.full, 6);
    assert!(r.latency_ms.p95 >= r.latency_ms.p50 && r.latency_ms.mean > 0.0);
    let off = EvalOptions {
        router_off: true,
        ..Default::default()
    };
    assert!(evaluate(dir.path(), &test, &Device::Cpu, off)
        .unwrap()
        .routes
        .is_none());
    // The threshold decides: 0 sends everything to the full path, 1 to the
    // light one (p < 1); the light path's answers are those of the same
    // weights decoding with one layer.
    let mut c = saved.clone();
    c["router_threshold"] = 0.0.into();
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    let r = evaluate(dir.path(), &test, &Device::Cpu, Default::default()).unwrap();
    assert_eq!(r.routes.unwrap().full, 6);
    c["router_threshold"] = 1.0.into();
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    let a = autoglm::assistant::Assistant::load(dir.path(), &Device::Cpu).unwrap();
    let img = autoglm::io::image::load(&test[0].image, Default::default()).unwrap();
    let gcfg = autoglm::text::generate::GenerateConfig {
        max_new_tokens: 4,
        ..Default::default()
    };
    let ask = |cfg: &autoglm::text::generate::GenerateConfig| {
        a.ask(
            std::slice::from_ref(&img),
            &test[0].question,
            cfg,
            autoglm::assistant::Overflow::Error,
            &mut |_| true,
        )
        .unwrap()
    };
    let routed = ask(&gcfg);
    assert_eq!(routed.route, Some(Route::Light));
    let one = ask(&autoglm::text::generate::GenerateConfig {
        layers: Some(1),
        ..gcfg.clone()
    });
    assert_eq!(routed.tokens, one.tokens);
    assert_eq!(one.route, None, "a fixed depth is not a routing decision");

    // The router reads the image tokens' mean beside the text tokens':
    // row 0 is two image tokens and two words (and a padding position the
    // means skip); row 1 has no image, so its image half is 0.
    let img_tok = a.model.config.image_token_index;
    let word = img_tok + 1;
    let e = Tensor::arange(0f32, 2.0 * 5.0 * 32.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 5, 32))
        .unwrap();
    let input = a
        .model
        .router_input(&e, &[&[img_tok, word, img_tok, word], &[word; 3]])
        .unwrap();
    let mean = |row: usize, at: &[usize]| -> Vec<f32> {
        let rows: Vec<Tensor> = at
            .iter()
            .map(|&j| e.get(row).unwrap().get(j).unwrap())
            .collect();
        (Tensor::stack(&rows, 0).unwrap().sum(0).unwrap() / at.len() as f64)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let want0 = [mean(0, &[0, 2]), mean(0, &[1, 3])].concat();
    let want1 = [vec![0f32; 32], mean(1, &[0, 1, 2])].concat();
    let got = input.to_vec2::<f32>().unwrap();
    for (g, w) in got.iter().flatten().zip(want0.iter().chain(&want1)) {
        assert!((g - w).abs() < 1e-3, "{got:?}");
    }
    assert_eq!(got.iter().flatten().count(), 2 * 64);
    let err = a.model.router_input(&e, &[&[1]]).unwrap_err().to_string();
    assert!(err.contains("1 prompts for 2 rows"), "{err}");
}

/// A router whose light path sees a smaller image: it trains (the light
/// path's features are those of the pooled image), reads the question
/// alone, chooses before the tower, and its light answers are the decoder's
/// on the small image's tokens spread over the full grid.
#[test]
fn small_image_router_chooses_before_the_tower() {
    use autoglm::fusion::router::Route;
    use autoglm::text::generate::{generate_with_context, GenerateConfig};
    use autoglm::train::vqa::{load_data, train_vqa, DataSource, VqaTrainConfig};
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
    let mut losses = Vec::new();
    train_vqa(&cfg, dir.path(), false, &mut |m| losses.push(m.loss)).unwrap();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["router_light_image_size"], 8);
    let w =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    // The router reads the question's mean embedding alone (width 32).
    assert_eq!(w["router.score.weight"].dims(), &[1, 32]);
    assert!(
        w["router.score.bias"]
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0,
        "the router did not train"
    );

    let write_threshold = |t: f64| {
        let mut c = saved.clone();
        c["router_threshold"] = t.into();
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        autoglm::assistant::Assistant::load(dir.path(), &Device::Cpu).unwrap()
    };
    let a = write_threshold(1.0);
    let m = &a.model;
    let test = load_data(&DataSource::EasyVqa, "test").unwrap();
    let img = autoglm::io::image::load(&test[0].image, Default::default()).unwrap();
    let px = a.pixels(std::slice::from_ref(&img)).unwrap(); // (1, 3, 16, 16)

    // The light tokens, by hand: 2 × 2 means of the pixels, the tower on
    // the 8 × 8 image (a 2 × 2 grid), each of the 4 × 4 full grid's tokens
    // taking the small grid's token at (row / 2, column / 2).
    let full = m.vision_features(&px).unwrap();
    let (n, g) = (full.dim(1).unwrap(), 4);
    assert_eq!(n, g * g);
    let p = px.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
    let mut pooled = vec![0f32; 3 * 8 * 8];
    for (c, plane) in p.iter().enumerate() {
        for y in 0..8 {
            for x in 0..8 {
                pooled[(c * 8 + y) * 8 + x] = (plane[2 * y][2 * x]
                    + plane[2 * y][2 * x + 1]
                    + plane[2 * y + 1][2 * x]
                    + plane[2 * y + 1][2 * x + 1])
                    / 4.0;
            }
        }
    }
    let small = m
        .vision_features(&Tensor::from_vec(pooled, (1, 3, 8, 8), &Device::Cpu).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(small.len(), 4);
    let light = m
        .light_vision_features(&px)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, tok) in light.iter().enumerate() {
        let want = &small[(i / g / 2) * 2 + (i % g) / 2];
        for (x, y) in tok.iter().zip(want) {
            assert!((x - y).abs() < 1e-4, "token {i}: {x} vs {y}");
        }
    }

    // Threshold 1 sends the question down the light path (p < 1): the
    // answer is the full decoder's on the light tokens. Threshold 0 sends
    // it down the full path: the answer with the depth fixed.
    let gcfg = GenerateConfig {
        max_new_tokens: 4,
        ..Default::default()
    };
    let ask = |a: &autoglm::assistant::Assistant, cfg: &GenerateConfig| {
        a.ask(
            std::slice::from_ref(&img),
            &test[0].question,
            cfg,
            autoglm::assistant::Overflow::Error,
            &mut |_| true,
        )
        .unwrap()
    };
    let routed = ask(&a, &gcfg);
    assert_eq!(routed.route, Some(Route::Light));
    let ids = a
        .prompt_ids(&test[0].question, 1, autoglm::assistant::Overflow::Error, 4)
        .unwrap();
    assert_eq!(m.route_question(&ids).unwrap(), Some(Route::Light));
    let e = m
        .embed_prompt_features(&ids, Some(&m.light_image_features(&px).unwrap()))
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut want = gcfg.clone();
    want.stop_token_ids.extend(&a.eos_ids);
    let by_hand = generate_with_context(&m.lm, &e, &ids, None, &want, None, &mut |_| true)
        .unwrap()
        .tokens;
    assert_eq!(routed.tokens, by_hand);

    let a = write_threshold(0.0);
    let routed = ask(&a, &gcfg);
    assert_eq!(routed.route, Some(Route::Full));
    let fixed = ask(
        &a,
        &GenerateConfig {
            layers: Some(2),
            ..gcfg.clone()
        },
    );
    assert_eq!((routed.tokens, fixed.route), (fixed.tokens, None));
}

/// Gated cross-attention blocks inside the decoder: with their gates at 0
/// the decoder is exactly the one without them; opened, the image context
/// changes the states; greedy decoding passes the context at every step
/// (its tokens are the argmax of a full forward over prompt + tokens).
#[test]
fn decoder_cross_attention_reads_the_image_context() {
    use autoglm::text::generate::{generate_with_context, GenerateConfig};
    use autoglm::text::llama::Positions;
    let mut cfg = tiny();
    cfg.text_config.cross_attention_every = Some(1);
    let build = |cfg: &LlavaConfig, vm: &VarMap| {
        Llava::new(VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu), cfg).unwrap()
    };
    let vm = VarMap::new();
    let m = build(&cfg, &vm);
    autoglm::train::vqa::init_weights(&vm, 5, None).unwrap();
    let plain = build(&tiny(), &vm); // the same weights, no blocks
    let ids: Vec<u32> = vec![1, 7, 9, 12, 30, 2];
    let e = m.embed_prompt(&ids, None).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, 5, 16), &Device::Cpu).unwrap();
    let run = |m: &Llava, ctx: Option<&Tensor>| {
        let pos = Positions::contiguous(1, ids.len(), 0, &Device::Cpu)
            .unwrap()
            .with_context(ctx.cloned(), None);
        m.lm.forward_embeds(&e, &pos, &mut m.lm.new_cache())
            .unwrap()
    };
    let base = run(&plain, None);
    assert_eq!(common::max_abs_diff(&run(&m, Some(&ctx)), &base), 0.0);
    {
        let data = vm.data().lock().unwrap();
        let mut gates = 0;
        for (n, v) in data.iter() {
            if n.ends_with("_gate") && n.contains("cross_attn") {
                v.set(&Tensor::new(&[0.7f32], &Device::Cpu).unwrap())
                    .unwrap();
                gates += 1;
            }
        }
        assert_eq!(gates, 4, "two blocks, two gates each");
    }
    let with = run(&m, Some(&ctx));
    assert!(common::max_abs_diff(&with, &base) > 1e-3);
    assert_eq!(
        common::max_abs_diff(&run(&m, None), &base),
        0.0,
        "no image: no effect"
    );
    let ctx2 = (&ctx * -1.0).unwrap();
    assert!(common::max_abs_diff(&run(&m, Some(&ctx2)), &with) > 1e-3);
    let g = generate_with_context(
        &m.lm,
        &e.squeeze(0).unwrap(),
        &ids,
        Some(&ctx),
        &GenerateConfig {
            max_new_tokens: 5,
            ..GenerateConfig::default()
        },
        None,
        &mut |_| true,
    )
    .unwrap()
    .tokens;
    let mut all = ids.clone();
    all.extend(&g[..g.len() - 1]);
    let e_all = m.embed_prompt(&all, None).unwrap();
    let pos = Positions::contiguous(1, all.len(), 0, &Device::Cpu)
        .unwrap()
        .with_context(Some(ctx.clone()), None);
    let h =
        m.lm.forward_embeds(&e_all, &pos, &mut m.lm.new_cache())
            .unwrap();
    let argmax =
        m.lm.logits(&h)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
    assert_eq!(&argmax[ids.len() - 1..], &g[..]);
}

/// A VLM with cross-attention in its decoder trains (the gates open),
/// records the choice, and answers through `evaluate`.
#[test]
fn decoder_cross_attention_trains_and_reloads() {
    use autoglm::train::vqa::{evaluate, load_data, train_vqa, DataSource, VqaTrainConfig};
    let cfg: VqaTrainConfig = serde_json::from_value(serde_json::json!({
        "data": {"kind": "easy-vqa"}, "vision": "cnn", "max_train_examples": 32,
        "image_size": 16, "vision_hidden": 8, "vision_layers": 2, "projector": "mlp",
        "text_hidden": 32, "text_layers": 2, "text_heads": 2, "text_kv_heads": 1,
        "vocab_size": 262, "steps": 6, "batch_size": 4, "peak_lr": 3e-3, "warmup_steps": 1,
        "clip_norm": 1.0, "seed": 4, "held_out_images": 0, "decoder_cross_attention_every": 2
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    train_vqa(&cfg, dir.path(), false, &mut |_| {}).unwrap();
    // Gates started open move from where they started; at a vanishing rate
    // they stay there.
    let mut open = cfg.clone();
    open.gate_init = 1.0;
    open.peak_lr = 1e-12;
    let od = tempfile::tempdir().unwrap();
    train_vqa(&open, od.path(), false, &mut |_| {}).unwrap();
    let ow =
        candle_core::safetensors::load(od.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let g = ow["language_model.model.layers.0.cross_attn.ff_gate"]
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!((g - 1.0).abs() < 1e-6, "ff_gate {g}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["text_config"]["cross_attention_every"], 2);
    let w =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let gate = "language_model.model.layers.0.cross_attn.attn_gate";
    assert!(
        w[gate].to_vec1::<f32>().unwrap()[0] != 0.0,
        "{gate} did not train"
    );
    assert!(
        !w.contains_key("language_model.model.layers.1.cross_attn.attn_gate"),
        "every 2nd layer only"
    );
    let test: Vec<_> = load_data(&DataSource::EasyVqa, "test")
        .unwrap()
        .into_iter()
        .take(3)
        .collect();
    assert_eq!(
        evaluate(dir.path(), &test, &Device::Cpu, Default::default())
            .unwrap()
            .examples,
        3
    );
}

/// The CNN + LSTM baseline, with either head (the MLP, the relation
/// network), learns a task that needs both the image and the question (the
/// colour of the picture; whether it is red; whether it is blue), saves a
/// model that `evaluate_baseline` reloads and gets right, continues a
/// finished run with more steps, and refuses configs that cannot train,
/// naming the field.
#[test]
fn cnn_lstm_baseline_learns_image_and_question() {
    use autoglm::train::baseline::{
        evaluate_baseline, is_baseline, train_baseline, BaselineTrainConfig,
    };
    use autoglm::train::vqa::{load_data, DataSource};
    let data = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut lines = Vec::new();
    for i in 0..8 {
        let red = i % 2 == 0;
        let img = image::RgbImage::from_fn(16, 16, |_, _| {
            let n = rng.random_range(0..40u8);
            if red {
                image::Rgb([200 + n, n, n])
            } else {
                image::Rgb([n, n, 200 + n])
            }
        });
        let path = data.path().join(format!("{i}.png"));
        img.save(&path).unwrap();
        let colour = if red { "red" } else { "blue" };
        let yes = |b: bool| if b { "yes" } else { "no" };
        for (q, a) in [
            ("What color is the picture?", colour),
            ("Is the picture red?", yes(red)),
            ("Is the picture blue?", yes(!red)),
        ] {
            lines.push(serde_json::json!({"image": path, "question": q, "answer": a}).to_string());
        }
    }
    let file = data.path().join("qa.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let base = serde_json::json!({
        "model": "cnn-lstm", "data": {"kind": "jsonl", "train": file, "test": file},
        "image_size": 16, "vision_hidden": 8, "vision_layers": 2, "word_dim": 16,
        "lstm_hidden": 16, "mlp_hidden": 32, "steps": 400, "batch_size": 8,
        "peak_lr": 3e-3, "warmup_steps": 5, "clip_norm": 1.0, "seed": 1
    });
    let out = tempfile::tempdir().unwrap();
    let ex = load_data(
        &DataSource::Jsonl {
            train: file.clone(),
            test: file.clone(),
        },
        "test",
    )
    .unwrap();
    for head in ["mlp", "relation"] {
        let mut v = base.clone();
        v["head"] = head.into();
        v["relation_hidden"] = 32.into();
        // The relation head with the instance-normed encoder.
        v["vision_norm"] = (head == "relation").into();
        let cfg: BaselineTrainConfig = serde_json::from_value(v).unwrap();
        let mut losses = Vec::new();
        // The relation run starts fresh where the MLP run finished: the
        // MLP's model and checkpoint are gone before its first step, so a
        // `--resume` after a kill cannot load them.
        let stale = ["model.safetensors", "checkpoint.safetensors"].map(|f| out.path().join(f));
        let mut left = Vec::new();
        train_baseline(&cfg, out.path(), false, &mut |m| {
            if m.step == 1 {
                left.extend(stale.iter().filter(|p| p.exists()).cloned());
            }
            losses.push(m.loss)
        })
        .unwrap();
        assert!(
            left.is_empty(),
            "{head}: an earlier run's files at step 1: {left:?}"
        );
        assert!(
            losses[losses.len() - 1] < 0.1 * losses[0],
            "{head}: the loss did not fall: {:?} → {:?}",
            losses[0],
            losses[losses.len() - 1]
        );
        assert!(is_baseline(out.path()));
        let saved = std::fs::read_to_string(out.path().join("config.json")).unwrap();
        assert!(saved.contains(&format!("\"head\": \"{head}\"")), "{saved}");
        let e = autoglm::assistant::Assistant::load(out.path(), &Device::Cpu)
            .err()
            .expect("a baseline is not a VLM")
            .to_string();
        assert!(e.contains("baseline") && e.contains("autoglm eval"), "{e}");
        let r = evaluate_baseline(out.path(), &ex, &Device::Cpu).unwrap();
        assert_eq!(r.examples, 24);
        assert_eq!(r.accuracy, 1.0, "{head}: {:?}", r.per_type);
    }
    // The relation run finished at step 400: more steps continue it; any
    // other change is refused, naming the field.
    let mut v = base.clone();
    v["head"] = "relation".into();
    v["relation_hidden"] = 32.into();
    v["vision_norm"] = true.into();
    v["steps"] = 420.into();
    let cfg: BaselineTrainConfig = serde_json::from_value(v.clone()).unwrap();
    // As if a run had been killed after logging steps past its checkpoint,
    // mid-line: those lines go, and the steps run again.
    let metrics = out.path().join("metrics.jsonl");
    // A run saved before a field existed: absent is its default, no change.
    let saved = out.path().join("train_config.json");
    let mut old: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert!(old
        .as_object_mut()
        .unwrap()
        .remove("max_train_examples")
        .is_some());
    std::fs::write(&saved, old.to_string()).unwrap();
    let mut log = std::fs::read_to_string(&metrics).unwrap();
    log.push_str("{\"step\":401,\"loss\":9.0}\n{\"step\":402,\"lo");
    std::fs::write(&metrics, log).unwrap();
    let mut steps = Vec::new();
    train_baseline(&cfg, out.path(), true, &mut |m| steps.push(m.step)).unwrap();
    assert_eq!(steps, (401..=420).collect::<Vec<_>>());
    let logged: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(logged, (1..=420).collect::<Vec<u64>>());
    assert_eq!(
        evaluate_baseline(out.path(), &ex, &Device::Cpu)
            .unwrap()
            .accuracy,
        1.0
    );
    v["peak_lr"] = 1e-2.into();
    let cfg: BaselineTrainConfig = serde_json::from_value(v).unwrap();
    let e = train_baseline(&cfg, out.path(), true, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot resume") && e.contains("peak_lr"), "{e}");

    let check = |patch: serde_json::Value, field: &str| {
        let mut v = base.clone();
        for (k, x) in patch.as_object().unwrap() {
            v[k] = x.clone();
        }
        let e = match serde_json::from_value::<BaselineTrainConfig>(v) {
            Ok(c) => train_baseline(&c, out.path(), false, &mut |_| {})
                .unwrap_err()
                .to_string(),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(field), "{field}: {e}");
    };
    check(serde_json::json!({"model": "cnn-gru"}), "model");
    check(serde_json::json!({"vision_layers": 9}), "vision_layers");
    check(serde_json::json!({"image_size": 18}), "image_size");
    check(serde_json::json!({"lstm_hidden": 0}), "lstm_hidden");
    check(serde_json::json!({"lstm_layers": 2}), "lstm_layers");
    check(
        serde_json::json!({"head": "attention"}),
        "expected `mlp` or `relation`",
    );
    check(
        serde_json::json!({"head": "relation", "relation_layers": 0}),
        "relation_layers",
    );
}

/// The binding Sort-of-CLEVR needs, at its simplest: four image tokens,
/// each a colour's vector plus one of two attributes' vectors, then a
/// colour word; the answer is the attribute of that colour's token. A
/// one-layer decoder must learn it (the colour word's query finds its
/// token): always answering one attribute gives 50 %.
#[test]
fn a_decoder_learns_to_look_up_a_token_by_a_word() {
    let right = lookup_accuracy(16, 1, false, false, false);
    assert!(right >= 380, "{right} of 400 attributes right");
}

/// The same lookup with the four objects anywhere among 65 image tokens
/// (a 64-cell grid and CLS), as Sort-of-CLEVR's objects are, the colour
/// word before the image and the image's tokens sharing one position
/// (`image_tokens_share_position`): two layers, one to mark the named
/// object's token and one to read it, learn it in the same 400 steps.
#[test]
fn a_word_finds_its_token_anywhere_when_image_tokens_share_a_position() {
    let right = lookup_accuracy(64, 2, true, true, true);
    assert!(right >= 380, "{right} of 400 attributes right");
}

/// Held-out answers right (of 400) after 400 steps of 32 on the lookup:
/// a ViT of `image_size` (patches of 8, and CLS) gives the token count;
/// `scatter`: the objects sit at random tokens, else at the first four;
/// `question_first`: the colour word comes before the image (and a filler
/// token after it), else after it.
fn lookup_accuracy(
    image_size: usize,
    layers: usize,
    scatter: bool,
    question_first: bool,
    one_position: bool,
) -> usize {
    use autoglm::train::vqa::{answer_logits, init_weights, Encoded, Images};
    let mut cfg = tiny();
    cfg.text_config.num_hidden_layers = layers;
    cfg.text_config.max_position_embeddings = 128;
    cfg.vision_config.image_size = image_size;
    cfg.image_tokens_share_position = one_position;
    let vm = VarMap::new();
    let m = Llava::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg).unwrap();
    init_weights(&vm, 0, None).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let h = cfg.text_config.hidden_size;
    let mut vector = || -> Vec<f32> { (0..h).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect() };
    let colours: Vec<Vec<f32>> = (0..4).map(|_| vector()).collect();
    let attrs: Vec<Vec<f32>> = (0..2).map(|_| vector()).collect();
    // The tower's token count (its patches and CLS); those without an
    // object are empty.
    let p = m.expand_image_tokens(&[3], 1).unwrap().len();
    // A batch: rows (BOS, the image tokens, a colour word 10..14; answer
    // 20 or 21, then end 5) and their (B, P, H) image tokens.
    let batch = |rng: &mut rand::rngs::StdRng, n: usize| {
        let (mut rows, mut feats) = (Vec::new(), Vec::new());
        for _ in 0..n {
            // Which token holds each colour.
            let mut cells: Vec<usize> = (0..p).collect();
            let places = if scatter { p } else { 4 };
            for i in 0..4 {
                cells.swap(i, rng.random_range(i..places));
            }
            let attr: Vec<usize> = (0..4).map(|_| rng.random_range(0..2)).collect();
            let mut image = vec![0f32; p * h];
            for c in 0..4 {
                for (k, x) in image[cells[c] * h..(cells[c] + 1) * h]
                    .iter_mut()
                    .enumerate()
                {
                    *x = colours[c][k] + attrs[attr[c]][k];
                }
            }
            feats.extend(image);
            let asked = rng.random_range(0..4);
            rows.push(Encoded {
                prompt: m
                    .expand_image_tokens(
                        &if question_first {
                            vec![1, 10 + asked as u32, 3, 15]
                        } else {
                            vec![1, 3, 10 + asked as u32]
                        },
                        1,
                    )
                    .unwrap(),
                answer: vec![20 + attr[asked] as u32, 5],
            });
        }
        let feats = Tensor::from_vec(feats, (n, p, h), &Device::Cpu).unwrap();
        (rows, feats)
    };
    let mut opt = AdamW::new(named_vars(&vm), AdamWConfig::default()).unwrap();
    for _ in 0..400 {
        let (rows, feats) = batch(&mut rng, 32);
        let rows: Vec<&Encoded> = rows.iter().collect();
        let (logits, targets) = answer_logits(&m, &rows, Images::Projected(&feats)).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        opt.step(&loss.backward().unwrap(), 3e-3).unwrap();
    }
    let (rows, feats) = batch(&mut rng, 400);
    let rows: Vec<&Encoded> = rows.iter().collect();
    let (logits, targets) = answer_logits(&m, &rows, Images::Projected(&feats)).unwrap();
    let (pred, targets) = (
        logits.argmax(1).unwrap().to_vec1::<u32>().unwrap(),
        targets.to_vec1::<u32>().unwrap(),
    );
    // Every other answer token is the attribute.
    (0..rows.len())
        .filter(|&i| pred[2 * i] == targets[2 * i])
        .count()
}
