//! Our resize + crop against PIL/torchvision and HF's CLIPImageProcessor on
//! the real sample photos (fixtures made by
//! tools/reference/preprocess_and_efficientnet.py): within 1/255 per pixel.

mod common;

use autoglm::io::image::{load, ImageLimits};
use autoglm::io::preprocess::{CropRounding, Preprocess, Resample};
use autoglm::vision::efficientnet::EfficientNetConfig;
use common::*;

/// Compares with the fixtures ending in `suffix`; `tol` in 8-bit levels.
fn compare(p: &Preprocess, suffix: &str, tol: i32) {
    let photos = asset("photos");
    let mut n = 0;
    for entry in std::fs::read_dir(fixtures().join("preprocess")).unwrap() {
        let path = entry.unwrap().path();
        let fname = path.file_name().unwrap().to_str().unwrap().to_string();
        let Some(stem) = fname.strip_suffix(suffix) else {
            continue;
        };
        let src = ["png", "jpg", "gif"]
            .iter()
            .map(|e| photos.join(format!("{stem}.{e}")))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("no photo for {fname}"));
        let want = image::open(&path).unwrap().into_rgb8();
        let got = p
            .resize_crop(&load(&src, ImageLimits::default()).unwrap())
            .unwrap();
        assert_eq!(got.dimensions(), want.dimensions(), "{fname}");
        let worst = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        eprintln!("{fname}: max pixel difference {worst}/255");
        assert!(worst <= tol, "{fname}: pixels differ by {worst}/255");
        n += 1;
    }
    assert!(n >= 10, "only {n} fixtures found");
}

#[test]
fn torchvision_resize_256_crop_224_bilinear() {
    // PIL's own resampler, ported: bit-exact.
    compare(&EfficientNetConfig::lite0().preprocess(), ".effnet.png", 0);
}

#[test]
fn hf_clip_processor_bicubic_224() {
    let p = Preprocess {
        shortest_edge: 224,
        resample: Resample::Bicubic,
        crop: (224, 224),
        crop_rounding: CropRounding::Floor,
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    // transformers 5 resizes with torchvision on tensors, not PIL: one level.
    compare(&p, ".clip.png", 1);
}
