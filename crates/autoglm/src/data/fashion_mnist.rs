//! Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 60,000 training and
//! 10,000 test images of 28×28 grey pixels in 10 classes, read from the
//! IDX files of the `fashion-mnist` asset (Debian `dataset-fashion-mnist`).

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// The class names, in label order, as the dataset defines them.
pub const CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Pixels per image.
pub const PIXELS: usize = 28 * 28;

/// One split: row-major 28×28 images, one byte per pixel, and their labels.
#[derive(Debug, Clone)]
pub struct FashionMnist {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl FashionMnist {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// Image `i` as an RGB picture (grey in all three channels), to save
    /// or to show.
    pub fn rgb(&self, i: usize) -> image::RgbImage {
        image::RgbImage::from_fn(28, 28, |x, y| {
            let v = self.image(i)[(y * 28 + x) as usize];
            image::Rgb([v, v, v])
        })
    }
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .map_err(|e| Error::io(path, e))?;
    Ok(out)
}

/// Parses an IDX file: big-endian magic (0, 0, type 0x08 = u8, rank),
/// then one big-endian u32 per dimension, then the data.
fn parse_idx<'a>(bytes: &'a [u8], what: &Path, rank: u8) -> Result<(Vec<usize>, &'a [u8])> {
    let bad =
        |why: String| Error::Invalid(format!("{}: not an IDX file of u8: {why}", what.display()));
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(bad("bad magic number".into()));
    }
    if bytes[3] != rank {
        return Err(bad(format!("rank {} where {rank} was expected", bytes[3])));
    }
    let head = 4 + 4 * rank as usize;
    if bytes.len() < head {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = (0..rank as usize)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let n: usize = dims.iter().product();
    if bytes.len() != head + n {
        return Err(bad(format!(
            "{} data bytes where the header says {n}",
            bytes.len() - head
        )));
    }
    Ok((dims, &bytes[head..]))
}

/// Loads `train` or `test` from `dir` (the `fashion-mnist` asset).
pub fn load(dir: &Path, split: &str) -> Result<FashionMnist> {
    let prefix = match split {
        "train" => "train",
        "test" => "t10k",
        other => {
            return Err(Error::Invalid(format!(
                "Fashion-MNIST has splits `train` and `test`, not `{other}`"
            )))
        }
    };
    let ip = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let lp = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let ib = read_gz(&ip)?;
    let lb = read_gz(&lp)?;
    let (idims, images) = parse_idx(&ib, &ip, 3)?;
    let (ldims, labels) = parse_idx(&lb, &lp, 1)?;
    if idims[1..] != [28, 28] || idims[0] != ldims[0] {
        return Err(Error::Invalid(format!(
            "{}: {idims:?} images for {} labels; expected N×28×28 and N labels",
            ip.display(),
            ldims[0]
        )));
    }
    if let Some(l) = labels.iter().find(|&&l| l as usize >= CLASSES.len()) {
        return Err(Error::Invalid(format!(
            "{}: label {l} is not a class",
            lp.display()
        )));
    }
    Ok(FashionMnist {
        images: images.to_vec(),
        labels: labels.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_headers_are_checked() {
        let p = Path::new("x");
        let mut ok = vec![0, 0, 8, 1, 0, 0, 0, 2, 7, 9];
        let (dims, data) = parse_idx(&ok, p, 1).unwrap();
        assert_eq!((dims, data), (vec![2], &[7u8, 9][..]));
        ok.push(1);
        assert!(parse_idx(&ok, p, 1)
            .unwrap_err()
            .to_string()
            .contains("3 data bytes where the header says 2"));
        assert!(parse_idx(&[0, 0, 9, 1], p, 1)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        assert!(parse_idx(&[0, 0, 8, 3], p, 1)
            .unwrap_err()
            .to_string()
            .contains("rank 3"));
    }
}
