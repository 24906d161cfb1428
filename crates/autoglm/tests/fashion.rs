//! Fashion-MNIST from the asset's IDX files, and the classifier shipped
//! in models/fashion-mlp.

mod common;

use autoglm::data::fashion_mnist::{load, CLASSES};

/// The published split sizes, with 6,000 and 1,000 images per class.
#[test]
fn splits_have_the_published_sizes() {
    let dir = common::asset("fashion-mnist");
    for (split, n) in [("train", 60_000), ("test", 10_000)] {
        let d = load(&dir, split).unwrap();
        assert_eq!(d.len(), n);
        assert_eq!(d.images.len(), n * 784);
        let mut per = [0usize; 10];
        for &l in &d.labels {
            per[l as usize] += 1;
        }
        assert_eq!(per, [n / 10; 10], "{split}");
    }
    // The first test image is an ankle boot (the dataset's README figure).
    let test = load(&dir, "test").unwrap();
    assert_eq!(CLASSES[test.labels[0] as usize], "Ankle boot");
    let err = load(&dir, "validation").unwrap_err().to_string();
    assert!(err.contains("`train` and `test`"), "{err}");
}

/// The shipped classifier (`autoglm fashion train --out
/// models/fashion-mlp`, 89.1 % when trained) on all 10,000 test images;
/// the benchmark's published MLP scores 87–88 %.
#[test]
fn shipped_classifier_scores_on_the_test_split() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fashion-mlp");
    let mlp =
        autoglm::vision::pixel_mlp::PixelMlp::load(&model, &candle_core::Device::Cpu).unwrap();
    assert_eq!(mlp.config.classes, CLASSES);
    let test = load(&common::asset("fashion-mnist"), "test").unwrap();
    let acc = mlp.accuracy(&test).unwrap();
    assert!(acc >= 0.885, "test accuracy {acc}");
}
