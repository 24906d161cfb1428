//! easy-VQA and JSON-lines datasets, the loader, and tokenizer training, on
//! the real easy-VQA package files.

mod common;

use std::collections::HashSet;

use autoglm::data::loader::{epoch_order, Loader, LoaderConfig};
use autoglm::data::{easy_vqa, jsonl, VqaExample};
use autoglm::io::preprocess::{CropRounding, Preprocess, Resample};
use common::asset;

fn pre64() -> Preprocess {
    Preprocess {
        shortest_edge: 64,
        resample: Resample::Bilinear,
        crop: (64, 64),
        crop_rounding: CropRounding::HalfEven,
        mean: [0.5; 3],
        std: [0.5; 3],
    }
}

#[test]
fn easy_vqa_counts_match_the_published_ones() {
    let dir = asset("easy-vqa");
    let (train, r) = easy_vqa::load(&dir, "train").unwrap();
    assert_eq!((train.len(), r.rows, r.bad.len()), (38_575, 38_575, 0));
    let (test, _) = easy_vqa::load(&dir, "test").unwrap();
    assert_eq!(test.len(), 9_673);
    let images: HashSet<_> = train.iter().map(|e| e.image.clone()).collect();
    assert_eq!(images.len(), 4_000);
    let images: HashSet<_> = test.iter().map(|e| e.image.clone()).collect();
    assert_eq!(images.len(), 1_000);
    let answers = easy_vqa::answers(&dir).unwrap();
    assert_eq!(answers.len(), 13);
    assert!(train
        .iter()
        .chain(&test)
        .all(|e| answers.contains(&e.answer)));
    assert!(easy_vqa::load(&dir, "validation").is_err());
}

#[test]
fn jsonl_reports_bad_rows_with_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let photo = asset("easy-vqa").join("test/images/0.png");
    std::fs::copy(&photo, dir.path().join("ok.png")).unwrap();
    std::fs::write(dir.path().join("text.png"), "not an image").unwrap();
    let lines = [
        r#"{"image": "ok.png", "question": "what shape?", "answer": "circle"}"#,
        r#"{"image": "missing.png", "question": "q", "answer": "a"}"#,
        r#"{"image": "ok.png", "question": "q", "answer": "  "}"#,
        "",
        r#"{"image": "text.png", "question": "q", "answer": "a"}"#,
        r#"not json"#,
        r#"{"question": "q", "answer": "a"}"#,
        r#"{"image": "ok.png", "question": "is it?", "answer": true}"#,
    ];
    let path = dir.path().join("data.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let (ok, report) = jsonl::load(&path, false).unwrap();
    assert_eq!(ok.len(), 2);
    assert_eq!(ok[1].answer, "yes");
    assert_eq!(ok[0].image, dir.path().join("ok.png"));
    assert_eq!(report.rows, 7);
    let lines: Vec<usize> = report.bad.iter().map(|b| b.line).collect();
    assert_eq!(lines, vec![2, 3, 5, 6, 7]);
    assert!(
        report.bad[1].reason.contains("empty answer"),
        "{:?}",
        report.bad
    );
    assert!(
        report.summary().starts_with("7 rows, 5 bad; line 2:"),
        "{}",
        report.summary()
    );
    let e = jsonl::load(&path, true).unwrap_err().to_string();
    assert!(e.contains("data.jsonl:2:"), "{e}");
    // Round trip through save.
    let out = dir.path().join("out.jsonl");
    jsonl::save(&out, &ok).unwrap();
    assert_eq!(jsonl::load(&out, true).unwrap().0, ok);
}

#[test]
fn shuffling_is_deterministic_by_seed_and_epoch() {
    let a = epoch_order(1000, 7, 0, true);
    assert_eq!(a, epoch_order(1000, 7, 0, true));
    assert_ne!(a, epoch_order(1000, 7, 1, true));
    assert_ne!(a, epoch_order(1000, 8, 0, true));
    let mut s = a.clone();
    s.sort();
    assert_eq!(s, (0..1000).collect::<Vec<_>>());
    assert_eq!(epoch_order(5, 7, 0, false), vec![0, 1, 2, 3, 4]);
}

#[test]
fn loader_batches_in_order_whatever_the_worker_count() {
    let (test, _) = easy_vqa::load(&asset("easy-vqa"), "test").unwrap();
    let subset: Vec<VqaExample> = test.into_iter().take(70).collect();
    let run = |workers| {
        let cfg = LoaderConfig {
            batch_size: 16,
            seed: 3,
            workers,
            ..LoaderConfig::default()
        };
        let l = Loader::new(subset.clone(), pre64(), cfg).unwrap();
        assert_eq!(l.batches(), 5);
        l.epoch(1)
            .map(|b| {
                let b = b.unwrap();
                assert_eq!(b.pixels.dims()[1..], [3, 64, 64]);
                (
                    b.indices,
                    b.pixels.sum_all().unwrap().to_scalar::<f32>().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    let one = run(1);
    assert_eq!(one, run(3));
    let idx: Vec<usize> = one.iter().flat_map(|(i, _)| i.clone()).collect();
    assert_eq!(idx, epoch_order(70, 3, 1, true));
    assert_eq!(one.last().unwrap().0.len(), 70 - 64);
}

#[test]
fn loader_reports_unreadable_images_and_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.png");
    let bytes = std::fs::read(asset("easy-vqa").join("test/images/1.png")).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    let good = asset("easy-vqa").join("test/images/0.png");
    let ex = |image: &std::path::Path| VqaExample {
        image: image.to_path_buf(),
        question: "q".into(),
        answer: "a".into(),
        kind: None,
    };
    let data = vec![ex(&good), ex(&broken), ex(&good)];
    let l = Loader::new(
        data,
        pre64(),
        LoaderConfig {
            batch_size: 3,
            shuffle: false,
            ..LoaderConfig::default()
        },
    )
    .unwrap();
    let batches: Vec<_> = l.epoch(0).map(|b| b.unwrap()).collect();
    assert_eq!(batches[0].indices, vec![0, 2]);
    let bad = l.bad_images();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].line, 2);
    assert!(bad[0].reason.contains("truncated"), "{}", bad[0].reason);
}

#[test]
fn trains_a_bpe_tokenizer_on_the_questions() {
    use autoglm::text::tokenizer::Tokenizer;
    let (train, _) = easy_vqa::load(&asset("easy-vqa"), "train").unwrap();
    let texts: Vec<String> = train
        .iter()
        .take(5000)
        .flat_map(|e| [e.question.clone(), e.answer.clone()])
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let n = autoglm::text::train_tokenizer::train_bpe(
        texts.iter().map(String::as_str),
        600,
        &["<pad>", "<s>", "</s>", "<image>"],
        &path,
    )
    .unwrap();
    assert!(n > 300 && n <= 600, "{n}");
    let tok = Tokenizer::from_file(&path, 512).unwrap();
    assert_eq!(tok.token_id("<image>"), Some(3));
    for t in [
        "what color is the shape?",
        "is there a blue circle?",
        "Ünïcode 🐱",
    ] {
        let ids = tok.encode(t).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), t, "round trip");
    }
    // The training text compresses: common words are single tokens.
    assert!(tok.encode("what color is the shape?").unwrap().len() <= 8);
}
