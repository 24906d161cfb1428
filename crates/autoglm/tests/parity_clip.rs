//! CLIP towers against transformers' `CLIPModel` on two random tiny
//! checkpoints (fixtures made by tools/reference/clip_tiny.py).

mod common;

use autoglm::dual::ClipPipeline;
use autoglm::io::image::{load, ImageLimits};
use candle_core::{DType, Device};
use common::*;

const TOL: f32 = 1e-4;

#[derive(serde::Deserialize)]
struct Reference {
    photos: Vec<String>,
    texts: Vec<String>,
}

fn check(name: &str) {
    let dev = Device::Cpu;
    let dir = fixtures().join(name);
    let p = ClipPipeline::load(&dir, &dev).unwrap();
    let want = load_fixture(&dir.join("reference.safetensors"));
    let r: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();

    // Tokenisation, including truncation of the over-long text to 77.
    let texts: Vec<&str> = r.texts.iter().map(String::as_str).collect();
    let batch = p.tokenizer.batch(&texts, 0, &dev).unwrap();
    let want_mask = want["attention_mask"].to_dtype(DType::U32).unwrap();
    let want_ids = want["input_ids"].to_dtype(DType::U32).unwrap();
    let ids = want_ids.broadcast_mul(&want_mask).unwrap();
    let ours = batch.ids.broadcast_mul(&batch.mask).unwrap();
    assert_eq!(
        ours.to_vec2::<u32>().unwrap(),
        ids.to_vec2::<u32>().unwrap(),
        "{name}: token ids"
    );

    // Model alone, on the reference's own pixels and ids.
    let out = p
        .model
        .forward(&want["pixel_values"], &want_ids, &want_mask)
        .unwrap();
    for (k, got) in [
        ("image_embeds", &out.image_embeds),
        ("text_embeds", &out.text_embeds),
        ("logits_per_image", &out.logits_per_image),
    ] {
        let d = max_abs_diff(got, &want[k]);
        eprintln!("{name} {k}: max abs diff {d:.2e}");
        assert!(d < TOL, "{name} {k}: {d}");
    }
    let hidden = p.model.vision.forward(&want["pixel_values"]).unwrap();
    let d = max_abs_diff(
        hidden.hidden_states.last().unwrap(),
        &want["vision_last_hidden_state"],
    );
    assert!(d < TOL, "{name} vision hidden: {d}");

    // End to end: our preprocessing of the real photos and our tokenizer.
    let photos = asset("photos");
    let images: Vec<_> = r
        .photos
        .iter()
        .map(|f| load(&photos.join(f), ImageLimits::default()).unwrap())
        .collect();
    let pixels = p.pixels(&images).unwrap();
    let dp = max_abs_diff(&pixels, &want["pixel_values"]);
    // One 8-bit level is 1/255/std ≈ 0.015 after normalisation.
    assert!(dp < 0.016, "{name}: pixel values differ by {dp}");
    let img = p.embed_images(&images).unwrap();
    let txt = p.embed_texts(&texts).unwrap();
    for i in 0..images.len() {
        assert!(cosine(&img.get(i).unwrap(), &want["image_embeds"].get(i).unwrap()) > 0.9999);
    }
    assert!(max_abs_diff(&txt, &want["text_embeds"]) < TOL);

    // Zero-shot probabilities: the softmax of the reference's logits.
    let probs = p.zero_shot(&images, &texts).unwrap();
    let want_probs = candle_nn::ops::softmax_last_dim(&want["logits_per_image"]).unwrap();
    let d = max_abs_diff(&probs, &want_probs);
    assert!(d < 1e-4, "{name}: zero-shot probabilities differ by {d}");
}

#[test]
fn tiny_clip_a_matches_transformers() {
    check("clip-tiny-a");
}

#[test]
fn tiny_clip_b_matches_transformers() {
    check("clip-tiny-b");
}
