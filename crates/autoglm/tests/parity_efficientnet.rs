//! EfficientNet-Lite0 against the PyTorch reference (fixtures made by
//! tools/reference/preprocess_and_efficientnet.py).

mod common;

use autoglm::io::image::{load, ImageLimits};
use autoglm::vision::efficientnet::ImageClassifier;
use candle_core::Device;
use common::*;

#[derive(serde::Deserialize)]
struct Reference {
    photos: Vec<String>,
    top5: std::collections::HashMap<String, Vec<(usize, String, f32)>>,
}

fn classifier(dev: &Device) -> ImageClassifier {
    ImageClassifier::load(
        &asset("efficientnet-lite0"),
        &asset("imagenet").join("labels.txt"),
        dev,
    )
    .unwrap()
}

#[test]
fn logits_and_top5_match_pytorch_on_every_photo() {
    let dev = Device::Cpu;
    let clf = classifier(&dev);
    let r: Reference = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("efficientnet/reference.json")).unwrap(),
    )
    .unwrap();
    let want = &load_fixture(&fixtures().join("efficientnet/logits.safetensors"))["logits"];
    let photos = asset("photos");
    let images: Vec<_> = r
        .photos
        .iter()
        .map(|p| load(&photos.join(p), ImageLimits::default()).unwrap())
        .collect();
    let got = clf.logits(&images).unwrap();
    for (i, name) in r.photos.iter().enumerate() {
        let d = max_abs_diff(&got.get(i).unwrap(), &want.get(i).unwrap());
        eprintln!("{name}: max |Δlogit| = {d:.2e}");
        assert!(d < 1e-3, "{name}: logits differ by {d}");
    }
    let top = clf.top_k(&images, 5).unwrap();
    for (name, preds) in r.photos.iter().zip(&top) {
        let ours: Vec<usize> = preds.iter().map(|p| p.index).collect();
        let theirs: Vec<usize> = r.top5[name].iter().map(|t| t.0).collect();
        assert_eq!(ours, theirs, "{name}: top-5 differs");
    }
    // A sanity anchor beyond parity: the cat photo is a cat, the coffee is espresso.
    assert!(top[0][0].label.contains("cat"), "{:?}", top[0][0]);
    assert_eq!(top[1][0].label, "espresso");
}

#[test]
fn stage_and_pooled_features_match_pytorch() {
    let dev = Device::Cpu;
    let clf = classifier(&dev);
    let r: Reference = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("efficientnet/reference.json")).unwrap(),
    )
    .unwrap();
    let want = load_fixture(&fixtures().join("efficientnet/features.safetensors"));
    let photos = asset("photos");
    let images: Vec<_> = r
        .photos
        .iter()
        .map(|p| load(&photos.join(p), ImageLimits::default()).unwrap())
        .collect();
    let f = clf
        .model
        .forward_features(&clf.preprocess.batch(&images, &dev).unwrap())
        .unwrap();
    let d = max_abs_diff(&f.pooled, &want["pooled"]);
    assert!(d < 1e-4, "pooled features differ by {d}");
    for (i, stage) in f.stages.iter().enumerate() {
        let first = stage.get(0).unwrap(); // (C, H, W) of the first photo
                                           // The reference keeps per-channel means of the three large early stages.
        let got = if i < 3 {
            first.mean((1, 2)).unwrap()
        } else {
            first
        };
        let d = max_abs_diff(&got, &want[&format!("stage{i}")]);
        eprintln!("stage {i}: max abs diff {d:.2e}");
        assert!(d < 1e-3, "stage {i} differs by {d}");
    }
}

#[test]
fn stage_features_have_the_documented_shapes() {
    let dev = Device::Cpu;
    let clf = classifier(&dev);
    let img = load(&asset("photos").join("chelsea.png"), ImageLimits::default()).unwrap();
    let x = clf.preprocess.batch(&[img], &dev).unwrap();
    let f = clf.model.forward_features(&x).unwrap();
    let shapes: Vec<Vec<usize>> = f.stages.iter().map(|t| t.dims().to_vec()).collect();
    assert_eq!(
        shapes,
        vec![
            vec![1, 16, 112, 112],
            vec![1, 24, 56, 56],
            vec![1, 40, 28, 28],
            vec![1, 80, 14, 14],
            vec![1, 112, 14, 14],
            vec![1, 192, 7, 7],
            vec![1, 320, 7, 7]
        ]
    );
    assert_eq!(f.pooled.dims(), &[1, 1280]);
}

/// The router's early exit: the map after a stage (checked against
/// PyTorch above), averaged by hand over the cells that fall in each cell
/// of the head's 7 × 7 grid, is what `stage_tokens` gives, row-major.
#[test]
fn an_early_exit_pools_a_stage_onto_the_head_grid() {
    let dev = Device::Cpu;
    let clf = classifier(&dev);
    let img = load(&asset("photos").join("chelsea.png"), ImageLimits::default()).unwrap();
    let x = clf.preprocess.batch(&[img], &dev).unwrap();
    let f = clf.model.forward_features(&x).unwrap();
    // Onto the head's 7 × 7 grid (the early exit), and stage 1's map onto
    // stage 4's 14 × 14 grid (`low_level_stage`).
    for (stage, grid) in [(1usize, 7usize), (5, 7), (1, 14)] {
        let map = f.stages[stage - 1]
            .squeeze(0)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let (c, side) = (map.len(), map[0].len());
        let k = side / grid;
        let got = if grid == 7 {
            clf.model.stage_tokens(&x, stage)
        } else {
            clf.model.stage_tokens_on(&x, stage, (grid, grid))
        };
        let got = got.unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!((got.len(), got[0].len()), (grid * grid, c), "stage {stage}");
        let mut worst = 0f32;
        for (t, token) in got.iter().enumerate() {
            let (gy, gx) = (t / grid, t % grid);
            for (ch, &v) in token.iter().enumerate() {
                let sum: f32 = map[ch][gy * k..(gy + 1) * k]
                    .iter()
                    .map(|row| row[gx * k..(gx + 1) * k].iter().sum::<f32>())
                    .sum();
                worst = worst.max((v - sum / (k * k) as f32).abs());
            }
        }
        assert!(worst < 1e-4, "stage {stage}: off by {worst}");
    }
    // Without pooling (`vision_feature_stage`): one token per cell of the
    // map, row-major, every channel.
    let tokens = clf.model.stage_map_tokens(&x, 4).unwrap();
    let want = f.stages[3]
        .flatten_from(2)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    assert_eq!(tokens.dims(), &[1, 14 * 14, 80]);
    let d = max_abs_diff(&tokens, &want);
    assert!(d < 1e-5, "stage 4 map tokens off by {d}");
    // Stage 4's 14 × 14 map does not pool onto 8 × 8.
    let e = clf
        .model
        .stage_tokens_on(&x, 4, (8, 8))
        .unwrap_err()
        .to_string();
    assert!(e.contains("8×8 grid"), "{e}");
    for bad in [0, 8] {
        let e = clf.model.stage_tokens(&x, bad).unwrap_err().to_string();
        assert!(e.contains(&format!("stage {bad}")), "{e}");
    }
}
