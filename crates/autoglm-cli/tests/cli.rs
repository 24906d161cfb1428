//! The `autoglm` binary: JSON output that scripts can read, and bad input
//! that ends in a one-line error and a non-zero exit, never a panic.

use std::path::PathBuf;
use std::process::{Command, Output};

fn autoglm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_autoglm"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("run autoglm")
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn photo(name: &str) -> String {
    autoglm::io::assets::dir("photos")
        .unwrap_or_else(|e| panic!("{e}"))
        .join(name)
        .display()
        .to_string()
}

fn json_ok(args: &[&str]) -> serde_json::Value {
    let out = autoglm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON document: {e}"))
}

/// Fails with exit code 1 and one line on stderr that starts with `error:`.
fn fails(args: &[&str]) -> String {
    let out = autoglm(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.trim_end().lines().count() == 1,
        "{args:?}: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{args:?} printed to stdout on failure"
    );
    stderr
}

#[test]
fn classify_json_has_top5_with_probabilities() {
    let v = json_ok(&[
        "classify",
        "--json",
        &photo("coffee.png"),
        &photo("chelsea.png"),
    ]);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    let top = results[0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    assert_eq!(top[0]["label"], "espresso");
    let p: f64 = top.iter().map(|t| t["probability"].as_f64().unwrap()).sum();
    assert!(p > 0.9 && p <= 1.0 + 1e-6);
}

#[test]
fn embed_text_json_gives_unit_vectors() {
    let v = json_ok(&["embed", "text", "--json", "a cat", "ein Hund", ""]);
    assert_eq!(v["dim"], 384);
    for e in v["embeddings"].as_array().unwrap() {
        let n: f64 = e["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap().powi(2))
            .sum();
        assert!((n - 1.0).abs() < 1e-4);
    }
}

#[test]
fn embed_image_and_zero_shot_with_a_clip_directory() {
    let model = fixtures().join("clip-tiny-b").display().to_string();
    let v = json_ok(&[
        "embed",
        "image",
        "--json",
        "--model",
        &model,
        &photo("chelsea.png"),
    ]);
    assert_eq!(v["dim"], 40);
    let v = json_ok(&[
        "zero-shot",
        "--json",
        "--model",
        &model,
        &photo("chelsea.png"),
        "--labels",
        "a cat, a dog,a car",
    ]);
    let labels = v["results"][0]["labels"].as_array().unwrap();
    assert_eq!(labels.len(), 3);
    let s: f64 = labels
        .iter()
        .map(|l| l["probability"].as_f64().unwrap())
        .sum();
    assert!((s - 1.0).abs() < 1e-5);
    // Without --model: EfficientNet-Lite0 features.
    let v = json_ok(&["embed", "image", "--json", &photo("coffee.png")]);
    assert_eq!(v["dim"], 1280);
}

#[test]
fn assets_list_json() {
    let v = json_ok(&["assets", "list", "--json"]);
    let names: Vec<&str> = v["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for n in [
        "minilm",
        "efficientnet-lite0",
        "easy-vqa",
        "fashion-mnist",
        "wordnet",
        "photos",
        "imagenet",
    ] {
        assert!(names.contains(&n), "{n} not listed");
    }
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "just text").unwrap();
    let text = text.display().to_string();
    let e = fails(&["classify", &text]);
    assert!(e.contains("not a PNG, JPEG, WebP or GIF"), "{e}");

    let truncated = dir.path().join("cut.jpg");
    let bytes = std::fs::read(photo("rocket.jpg")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["classify", &truncated.display().to_string()]);
    assert!(e.contains("truncated"), "{e}");

    let e = fails(&["classify", "--max-pixels", "1000", &photo("coffee.png")]);
    assert!(
        e.contains("over the limit") && e.contains("--max-pixels"),
        "{e}"
    );

    let e = fails(&["embed", "text", "--model", "/nonexistent/dir", "hi"]);
    assert!(e.contains("/nonexistent/dir"), "{e}");
    let e = fails(&[
        "zero-shot",
        "--model",
        "/nonexistent/dir",
        &photo("coffee.png"),
        "--labels",
        "a",
    ]);
    assert!(e.contains("/nonexistent/dir"), "{e}");
    fails(&[
        "zero-shot",
        "--model",
        &fixtures().join("clip-tiny-a").display().to_string(),
        &photo("coffee.png"),
        "--labels",
        " , ",
    ]);

    // A model directory whose config.json has a wrong type.
    let model = dir.path().join("clip");
    std::fs::create_dir(&model).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
    ] {
        std::fs::copy(fixtures().join("clip-tiny-a").join(f), model.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap();
    std::fs::write(
        model.join("config.json"),
        cfg.replace("\"patch_size\": 8", "\"patch_size\": [8]"),
    )
    .unwrap();
    let e = fails(&[
        "embed",
        "image",
        "--model",
        &model.display().to_string(),
        &photo("coffee.png"),
    ]);
    assert!(
        e.contains("config.json") && e.contains("invalid type"),
        "{e}"
    );

    // Weights whose header lies.
    std::fs::write(model.join("config.json"), cfg).unwrap();
    let mut st = std::fs::read(model.join("model.safetensors")).unwrap();
    st.truncate(st.len() - 100);
    std::fs::write(model.join("model.safetensors"), st).unwrap();
    let e = fails(&[
        "embed",
        "image",
        "--model",
        &model.display().to_string(),
        &photo("coffee.png"),
    ]);
    assert!(e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn usage_errors_exit_non_zero_with_help() {
    let out = autoglm(&["classify"]);
    assert_eq!(out.status.code(), Some(2));
    let out = autoglm(&["classify", "--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--top-k"));
}

#[test]
fn ask_streams_and_reports_json() {
    let model = fixtures().join("llava-tiny-llama").display().to_string();
    let out = autoglm(&[
        "ask",
        "--model",
        &model,
        "--image",
        &photo("chelsea.png"),
        "what color is the shape?",
        "--max-new-tokens",
        "8",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());
    let sampled = [
        "ask",
        "--json",
        "--model",
        &model,
        "--image",
        &photo("chelsea.png"),
        "what?",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.9",
        "--seed",
        "4",
    ];
    let v = json_ok(&sampled);
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        v["tokens"].as_array().unwrap().len()
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 16);
    // Same seed, same answer.
    let again = json_ok(&sampled);
    assert_eq!(v["tokens"], again["tokens"]);
    let v = json_ok(&[
        "caption",
        "--json",
        "--model",
        &model,
        &photo("coffee.png"),
        "--max-new-tokens",
        "3",
    ]);
    assert!(v["answer"].is_string());
}

#[test]
fn ask_bad_inputs() {
    let e = fails(&[
        "ask",
        "--model",
        "/nonexistent/model",
        "--image",
        &photo("chelsea.png"),
        "what?",
    ]);
    assert!(e.contains("/nonexistent/model"), "{e}");
    let model = fixtures().join("llava-tiny-llama").display().to_string();
    let e = fails(&[
        "ask",
        "--model",
        &model,
        "--image",
        &photo("chelsea.png"),
        &"is it red? ".repeat(80),
    ]);
    assert!(e.contains("context of 256"), "{e}");
    let e = fails(&[
        "ask",
        "--model",
        &model,
        "--image",
        &photo("chelsea.png"),
        "q",
        "--top-p",
        "0",
    ]);
    assert!(e.contains("top_p"), "{e}");
}

#[test]
fn train_and_eval_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.json");
    std::fs::write(
        &cfg,
        r#"{"data": {"kind": "easy-vqa"}, "image_size": "big"}"#,
    )
    .unwrap();
    let e = fails(&[
        "train",
        "--config",
        &cfg.display().to_string(),
        "--out",
        &dir.path().join("m").display().to_string(),
    ]);
    assert!(e.contains("not a valid training config"), "{e}");
    let e = fails(&["eval", "--model", "/nonexistent/model", "--limit", "1"]);
    assert!(e.contains("/nonexistent/model"), "{e}");
    // Data whose every row is unusable is an error, not a 0 % over nothing:
    // here the image is not beside the file, and an empty file.
    let rows = dir.path().join("rows.jsonl");
    std::fs::write(
        &rows,
        r#"{"image":"images/00001.png","question":"What is the shape of the red object?","answer":"square"}"#,
    )
    .unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    for (data, why) in [
        (&rows, "no usable examples (1 rows, 1 bad; line 1: image"),
        (&empty, "no rows; write one JSON object per line"),
    ] {
        let e = fails(&["eval", "--data", data.to_str().unwrap()]);
        assert!(e.contains(data.to_str().unwrap()) && e.contains(why), "{e}");
    }
}

fn samples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/samples/easy-vqa")
}

/// The shipped default model answers without `--model`, from any working
/// directory.
#[test]
fn default_model_answers_sample_questions() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_autoglm"))
        .current_dir(dir.path())
        .env("RAYON_NUM_THREADS", "2")
        .env_remove("AUTOGLM_MODEL")
        .args(["ask", "--json", "--image"])
        .arg(samples().join("0.png"))
        .arg("what color is the shape?")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["answer"], "red");
    assert_eq!(v["finish_reason"], "stop");
}

/// The issue's gate: the shipped model on the whole easy-VQA test split
/// (9,673 questions, asked one by one as `ask` does) scores at least 98.5 %.
#[test]
fn default_model_scores_on_the_easy_vqa_test_split() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("confusion.png");
    let v = json_ok(&[
        "eval",
        "--json",
        "--split",
        "test",
        "--confusion",
        png.to_str().unwrap(),
    ]);
    assert_eq!(v["examples"], 9673);
    let acc = v["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.985, "easy-VQA test exact match {acc}");
    assert!(png.is_file());
}

/// `data sort-of-clevr` writes JSON lines `train` reads as they are, the
/// same bytes for a seed, and images that show the scenes it describes.
#[test]
fn sort_of_clevr_is_written_readable_and_repeatable() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for d in &dirs {
        let out = d.path().to_str().unwrap();
        let r = json_ok(&[
            "--json",
            "data",
            "sort-of-clevr",
            "--out",
            out,
            "--train-images",
            "20",
            "--test-images",
            "5",
            "--seed",
            "3",
        ]);
        assert_eq!(r["images"], 25);
        assert_eq!(r["questions"]["train"]["relational"], 200);
        assert_eq!(r["questions"]["test"]["non_relational"], 50);
    }
    for f in [
        "train.jsonl",
        "test.jsonl",
        "scenes.jsonl",
        "images/00007.png",
    ] {
        let read = |d: &tempfile::TempDir| std::fs::read(d.path().join(f)).unwrap();
        assert_eq!(
            read(&dirs[0]),
            read(&dirs[1]),
            "{f} differs for the same seed"
        );
    }
    let dir = dirs[0].path();
    let (train, report) = autoglm::data::jsonl::load(&dir.join("train.jsonl"), true).unwrap();
    assert_eq!((train.len(), report.bad.len()), (400, 0));
    let rel = std::fs::read_to_string(dir.join("test-relational.jsonl")).unwrap();
    assert_eq!(rel.lines().count(), 50);
    assert!(rel.lines().all(|l| l.contains("\"relational\":true")));
    let answers: std::collections::BTreeSet<&str> =
        train.iter().map(|e| e.answer.as_str()).collect();
    for a in &answers {
        assert!(
            ["square", "circle", "left", "right", "top", "bottom", "1", "2", "3", "4", "5", "6"]
                .contains(a),
            "answer {a}"
        );
    }
    // Each object is drawn at its centre in its colour; the answers to
    // the position questions agree with the scene.
    let colours = autoglm::data::sort_of_clevr::COLORS;
    let scenes = std::fs::read_to_string(dir.join("scenes.jsonl")).unwrap();
    let rows = std::fs::read_to_string(dir.join("train.jsonl")).unwrap();
    for line in scenes.lines().take(20) {
        let s: serde_json::Value = serde_json::from_str(line).unwrap();
        let img = image::open(dir.join(s["image"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(img.dimensions(), (75, 75));
        for o in s["objects"].as_array().unwrap() {
            let (x, y) = (o["x"].as_u64().unwrap(), o["y"].as_u64().unwrap());
            let rgb = colours.iter().find(|c| c.0 == o["color"]).unwrap().1;
            assert_eq!(img.get_pixel(x as u32, y as u32).0, rgb, "{o}");
            let q = format!(
                "Is the {} object on the left or right of the image?",
                o["color"].as_str().unwrap()
            );
            for r in rows
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            {
                if r["image"] == s["image"] && r["question"] == q.as_str() {
                    assert_eq!(r["answer"], if x < 37 { "left" } else { "right" });
                }
            }
        }
    }
    let e = fails(&[
        "data",
        "sort-of-clevr",
        "--out",
        dir.to_str().unwrap(),
        "--train-images",
        "0",
        "--test-images",
        "0",
    ]);
    assert!(e.contains("nothing to write"), "{e}");
}

/// A model with a router and cross-attention in its decoder, trained from
/// the command line: `eval` reports the routes (none with `--router-off`),
/// latency and throughput; `serve` refuses it with the reason.
#[test]
fn routed_cross_attention_model_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "data": {"kind": "easy-vqa"}, "vision": "cnn", "max_train_examples": 16,
            "image_size": 16, "vision_hidden": 8, "vision_layers": 2, "feature_fusion": "add",
            "projector": "mlp", "text_hidden": 32, "text_layers": 2, "text_heads": 2,
            "text_kv_heads": 1, "vocab_size": 262, "steps": 3, "batch_size": 4,
            "peak_lr": 3e-3, "warmup_steps": 1, "clip_norm": 1.0, "seed": 5,
            "held_out_images": 0, "router_light_layers": 1,
            "decoder_cross_attention_every": 1
        })
        .to_string(),
    )
    .unwrap();
    let m = dir.path().join("m").display().to_string();
    let c = cfg.display().to_string();
    json_ok(&["--json", "train", "--config", &c, "--out", &m]);
    let r = json_ok(&["--json", "eval", "--model", &m, "--limit", "4"]);
    assert_eq!(r["examples"], 4);
    let routes = r["routes"]["light"].as_u64().unwrap() + r["routes"]["full"].as_u64().unwrap();
    assert_eq!(routes, 4);
    assert!(r["latency_ms"]["p95"].as_f64().unwrap() > 0.0);
    assert!(r["throughput"].as_f64().unwrap() > 0.0);
    let a = json_ok(&[
        "--json",
        "ask",
        "--model",
        &m,
        "--image",
        &samples().join("0.png").display().to_string(),
        "What color is the shape?",
    ]);
    assert!(matches!(a["route"].as_str(), Some("light" | "full")), "{a}");
    let off = json_ok(&[
        "--json",
        "eval",
        "--model",
        &m,
        "--limit",
        "4",
        "--router-off",
    ]);
    assert!(off.get("routes").is_none(), "{off}");
    let out = Command::new(env!("CARGO_BIN_EXE_autoglm"))
        .args(["serve", "--model", &m, "--port", "0"])
        .env("AUTOGLM_API_KEYS", "a-long-enough-key")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("cross-attention") && e.contains("autoglm ask") && !e.contains("panicked"),
        "{e}"
    );
}

/// `bench long-input` times the three readers of a long input and refuses
/// sizes that describe no model.
#[test]
fn bench_long_input_reports_three_times() {
    let r = json_ok(&[
        "--json",
        "bench",
        "long-input",
        "--tokens",
        "64",
        "--top-k",
        "8",
        "--hidden",
        "32",
        "--seconds",
        "0.05",
    ]);
    assert_eq!(r["tokens"], 64);
    for k in ["dense", "top_k", "lstm"] {
        assert!(r["seconds"][k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    let e = fails(&["bench", "long-input", "--hidden", "30"]);
    assert!(e.contains("--hidden"), "{e}");
}
