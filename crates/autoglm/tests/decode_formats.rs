//! Decoding of every accepted format and mode against PIL's
//! `Image.open(f).convert("RGB")` (fixtures made by
//! tools/reference/decode_formats.py).

mod common;

use autoglm::io::image::{load, ImageLimits};
use common::fixtures;

#[test]
fn formats_and_modes_match_pil() {
    let dir = fixtures().join("decode");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".pil.png") {
            continue;
        }
        let got = load(&path, ImageLimits::default()).unwrap_or_else(|e| panic!("{e}"));
        let want = image::open(dir.join(format!("{name}.pil.png")))
            .unwrap()
            .into_rgb8();
        assert_eq!(got.dimensions(), want.dimensions(), "{name}");
        let worst = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        eprintln!("{name}: max difference {worst}/255");
        assert_eq!(worst, 0, "{name}: differs from PIL by {worst}/255");
        n += 1;
    }
    assert_eq!(n, 10);
}
