//! Bad input gets a clear error that says what is wrong — never a panic.

mod common;

use std::path::Path;

use autoglm::dual::ClipPipeline;
use autoglm::io::image::{decode, load, ImageLimits};
use autoglm::io::weights::Safetensors;
use autoglm::text::bert::SentenceEncoder;
use autoglm::vision::efficientnet::EfficientNet;
use autoglm::Error;
use candle_core::Device;
use common::*;

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG signature and an IHDR chunk (valid CRC) claiming `w`×`h` RGB8,
/// followed by `rest`.
fn png_header(w: u32, h: u32, rest: &[u8]) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = b"IHDR".to_vec();
    chunk.extend_from_slice(&w.to_be_bytes());
    chunk.extend_from_slice(&h.to_be_bytes());
    chunk.extend_from_slice(&[8, 2, 0, 0, 0]);
    v.extend_from_slice(&13u32.to_be_bytes());
    v.extend_from_slice(&chunk);
    v.extend_from_slice(&crc32(&chunk).to_be_bytes());
    // A first IDAT chunk (decoders read up to it before reporting the size).
    let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
    v.extend_from_slice(&((idat.len() - 4) as u32).to_be_bytes());
    v.extend_from_slice(idat);
    v.extend_from_slice(&crc32(idat).to_be_bytes());
    v.extend_from_slice(rest);
    v
}

fn image_err(bytes: &[u8]) -> String {
    image_err_named(bytes, "input")
}

fn image_err_named(bytes: &[u8], name: &str) -> String {
    match decode(bytes, name, ImageLimits::default()) {
        Err(e @ Error::Image { .. }) => e.to_string(),
        Err(e) => panic!("wrong error kind: {e}"),
        Ok(_) => panic!("bad image {name} accepted"),
    }
}

#[test]
fn huge_claimed_dimensions_are_refused_before_allocating() {
    let e = image_err(&png_header(50_000, 50_000, &[]));
    assert!(
        e.contains("50000×50000") && e.contains("--max-pixels"),
        "{e}"
    );
    // Raising the limit lets the header through; the missing data is then the error.
    let big = ImageLimits {
        max_pixels: u64::MAX,
        ..ImageLimits::default()
    };
    let e = decode(&png_header(50_000, 50_000, &[]), "input", big)
        .unwrap_err()
        .to_string();
    assert!(e.contains("corrupt or truncated"), "{e}");
}

#[test]
fn zero_size_image() {
    // PNG forbids zero sizes: the decoder refuses the header.
    let e = image_err(&png_header(0, 10, &[]));
    assert!(e.contains("corrupt or truncated Png header"), "{e}");
    // GIF allows a 0×0 screen: our own check refuses it.
    let mut gif = b"GIF89a\x00\x00\x00\x00\x00\x00\x00".to_vec();
    gif.extend_from_slice(b"\x2c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x02\x44\x01\x00\x3b");
    let e = image_err(&gif);
    assert!(e.contains("has zero size (0×0)"), "{e}");
}

#[test]
fn truncated_and_corrupt_images() {
    let photos = asset("photos");
    for name in ["chelsea.png", "rocket.jpg", "no_time_for_that_tiny.gif"] {
        let bytes = std::fs::read(photos.join(name)).unwrap();
        // Cut inside the first (for GIF: the only decoded) frame.
        let cut = if name.ends_with(".gif") {
            830
        } else {
            bytes.len() / 3
        };
        let e = image_err_named(&bytes[..cut], &format!("truncated {name}"));
        assert!(
            e.contains("corrupt or truncated") || e.contains("JPEG"),
            "{name}: {e}"
        );
        // Garbage after a valid signature.
        let mut garbage = bytes[..16].to_vec();
        garbage.extend((0..4000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8));
        let e = image_err_named(&garbage, &format!("garbage {name}"));
        assert!(!e.is_empty(), "{name}");
    }
}

#[test]
fn text_and_empty_files_are_not_images() {
    let e = image_err(b"this is a text file, not an image\n");
    assert!(e.contains("not a PNG, JPEG, WebP or GIF"), "{e}");
    let e = image_err(b"");
    assert!(e.contains("empty"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = load(dir.path(), ImageLimits::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("directory"), "{e}");
    let e = load(&dir.path().join("nope.png"), ImageLimits::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot read"), "{e}");
}

#[test]
fn missing_model_directories() {
    let d = Path::new("/nonexistent/model");
    for e in [
        SentenceEncoder::load(d, &Device::Cpu).err().unwrap(),
        ClipPipeline::load(d, &Device::Cpu).err().unwrap(),
        EfficientNet::load(d, &Device::Cpu).err().unwrap(),
    ] {
        let msg = e.to_string();
        assert!(
            matches!(e, Error::Missing { .. }) && msg.contains("/nonexistent/model"),
            "{msg}"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn config_with_wrong_types_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("clip-tiny-a"), dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let bad = cfg.replacen("\"hidden_size\": 48", "\"hidden_size\": \"forty-eight\"", 1);
    assert_ne!(cfg, bad);
    std::fs::write(dir.path().join("config.json"), bad).unwrap();
    let e = ClipPipeline::load(dir.path(), &Device::Cpu).err().unwrap();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Config { .. })
            && msg.contains("config.json")
            && msg.contains("invalid type"),
        "{msg}"
    );

    // Well-typed but impossible: heads that do not divide the width.
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replacen(
            "\"num_attention_heads\": 4",
            "\"num_attention_heads\": 5",
            1,
        ),
    )
    .unwrap();
    let msg = ClipPipeline::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("not divisible"), "{msg}");
}

#[test]
fn checkpoint_disagreeing_with_its_config_names_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("clip-tiny-a"), dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    // Consistent config (64/4 heads → 128/4), wrong for these weights.
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replacen("\"intermediate_size\": 96", "\"intermediate_size\": 100", 1),
    )
    .unwrap();
    let msg = ClipPipeline::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("text_model.encoder.layers.0.mlp.fc1.weight")
            && msg.contains("[100, 48]")
            && msg.contains("[96, 48]"),
        "{msg}"
    );
}

/// Writes a safetensors file with the given JSON header and data bytes.
fn raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    std::fs::write(path, v).unwrap();
}

#[test]
fn lying_safetensors_headers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    let cases = [
        // Offsets beyond the data.
        (
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,1000]}}"#,
            16,
        ),
        // Dtype that does not match the byte length (4 elements of F64 = 32 bytes).
        (
            r#"{"w":{"dtype":"F64","shape":[4],"data_offsets":[0,16]}}"#,
            16,
        ),
        // Overlapping tensors.
        (
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
            24,
        ),
        // Unknown dtype and malformed JSON.
        (
            r#"{"w":{"dtype":"F33","shape":[4],"data_offsets":[0,16]}}"#,
            16,
        ),
        (r#"{"w":{"dtype":"F32""#, 16),
    ];
    for (header, n) in cases {
        raw_safetensors(&p, header, &vec![0u8; n]);
        let e = Safetensors::open(std::slice::from_ref(&p))
            .err()
            .unwrap_or_else(|| panic!("accepted: {header}"));
        let msg = e.to_string();
        assert!(
            matches!(e, Error::Weights { .. }) && msg.contains("not a valid safetensors file"),
            "{msg}"
        );
    }
    // A header length larger than the file.
    let mut v = u64::MAX.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    std::fs::write(&p, v).unwrap();
    assert!(Safetensors::open(std::slice::from_ref(&p)).is_err());
    // Too short to hold a header at all.
    std::fs::write(&p, b"abc").unwrap();
    assert!(Safetensors::open(&[p]).is_err());
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    raw_safetensors(
        &p,
        r#"{"_conv_stem.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    let msg = EfficientNet::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("_conv_stem.weight") && msg.contains("expected shape [32, 3, 3, 3]"),
        "{msg}"
    );
    raw_safetensors(
        &p,
        r#"{"other":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    let msg = EfficientNet::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("`_conv_stem.weight` is missing"), "{msg}");
}

#[test]
fn wrong_image_size_for_the_vision_tower() {
    let p = ClipPipeline::load(&fixtures().join("clip-tiny-a"), &Device::Cpu).unwrap();
    let x =
        candle_core::Tensor::zeros((1, 3, 40, 40), candle_core::DType::F32, &Device::Cpu).unwrap();
    let msg = p.model.image_embeds(&x).err().unwrap().to_string();
    assert!(msg.contains("3×32×32") && msg.contains("3×40×40"), "{msg}");
}
