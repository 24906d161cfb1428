//! Image decoding with limits checked before any pixel buffer is allocated.
//!
//! PNG, JPEG, WebP and GIF (first frame) are accepted; grayscale and alpha
//! images become RGB the way PIL's `Image.convert("RGB")` does it (gray is
//! replicated, alpha is dropped), because that is what the reference
//! preprocessors of our models do.
//!
//! JPEG goes through libjpeg-turbo's decoder (as built by the `mozjpeg`
//! crate, statically, without SIMD), the decoder PIL uses: the pure-Rust
//! decoders differ from it by up to 4/255 per pixel on the sample photos
//! (their IDCT and chroma upsampling differ), which would break pixel parity
//! with the reference preprocessors.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, ImageReader, RgbImage};

use crate::{Error, Result};

/// Limits on what an image may cost to decode.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    /// Largest width × height accepted.
    pub max_pixels: u64,
    /// Largest encoded file accepted, in bytes.
    pub max_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        // 64 megapixels (an 8192×8192 image) and 256 MiB of encoded data are
        // far above any encoder's input size and far below what would exhaust
        // memory.
        Self {
            max_pixels: 64 * 1024 * 1024,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Reads and decodes the image file at `path`.
pub fn load(path: &Path, limits: ImageLimits) -> Result<RgbImage> {
    let name = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| Error::Image {
        path: name.clone(),
        msg: format!("cannot read: {e}"),
    })?;
    if meta.is_dir() {
        return Err(Error::Image {
            path: name,
            msg: "is a directory, not an image file".into(),
        });
    }
    if meta.len() > limits.max_bytes {
        return Err(Error::Image {
            path: name,
            msg: format!(
                "file is {} bytes, over the limit of {} bytes",
                meta.len(),
                limits.max_bytes
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::Image {
        path: name.clone(),
        msg: format!("cannot read: {e}"),
    })?;
    decode(&bytes, &name, limits)
}

/// Decodes an encoded image held in memory. `name` is used in errors.
pub fn decode(bytes: &[u8], name: &str, limits: ImageLimits) -> Result<RgbImage> {
    let err = |msg: String| Error::Image {
        path: name.to_string(),
        msg,
    };
    if bytes.is_empty() {
        return Err(err("file is empty".into()));
    }
    if bytes.len() as u64 > limits.max_bytes {
        return Err(err(format!(
            "{} bytes, over the limit of {} bytes",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(format!("cannot read: {e}")))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif)) => f,
        Some(f) => {
            return Err(err(format!(
                "{f:?} images are not supported; convert it to PNG, JPEG, WebP or GIF"
            )))
        }
        None => {
            return Err(err(
                "not a PNG, JPEG, WebP or GIF image (unrecognised file signature); is it an image file?"
                    .into(),
            ))
        }
    };
    // Read only the header first, so a file that claims 50,000×50,000 pixels
    // is refused before a 7.5 GB buffer is allocated.
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| err(format!("corrupt or truncated {format:?} header ({e}); the file is damaged: re-download or re-save it")))?;
    if w == 0 || h == 0 {
        return Err(err(format!(
            "has zero size ({w}×{h}); the file is damaged: re-save it"
        )));
    }
    let pixels = w as u64 * h as u64;
    if pixels > limits.max_pixels {
        return Err(err(format!(
            "{w}×{h} = {pixels} pixels is over the limit of {} pixels; raise it with --max-pixels if the image is trusted",
            limits.max_pixels
        )));
    }
    if format == ImageFormat::Jpeg {
        return decode_jpeg(bytes, w, h).map_err(|m| err(format!("{m}; the file is damaged or unusual: re-download it, or re-save it as a baseline RGB JPEG or PNG")));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(w);
    lim.max_image_height = Some(h);
    // Room for a 16-bit RGBA frame plus the decoder's own buffers.
    lim.max_alloc = Some(pixels * 8 + (64 << 20));
    reader.limits(lim);
    let img = reader
        .decode()
        .map_err(|e| err(format!("corrupt or truncated {format:?} data ({e}); the file is damaged: re-download or re-save it")))?;
    Ok(img.into_rgb8())
}

/// libjpeg's error manager, set so that fatal errors unwind with their
/// message, and so that a truncated file is fatal too (libjpeg only warns and
/// pads the image with gray; PIL refuses such files). Other warnings, such as
/// extraneous bytes between markers, are ignored as PIL ignores them.
fn jpeg_error_mgr() -> mozjpeg_sys::jpeg_error_mgr {
    use mozjpeg_sys::{jpeg_common_struct, jpeg_std_error, JWRN_JPEG_EOF};
    use std::os::raw::c_int;

    fn message(cinfo: &mut jpeg_common_struct) -> String {
        // SAFETY: libjpeg calls our hooks with a valid `cinfo` whose `err`
        // points at this error manager; `format_message` writes at most 80
        // bytes (JMSG_LENGTH_MAX) into the buffer.
        unsafe {
            let err = &*cinfo.err;
            match err.format_message {
                Some(f) => {
                    let f: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 80]) =
                        std::mem::transmute(f);
                    let mut buf = [0u8; 80];
                    f(cinfo, &mut buf);
                    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
                    String::from_utf8_lossy(&buf[..end]).into_owned()
                }
                None => format!("libjpeg error {}", err.msg_code),
            }
        }
    }
    extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
        // resume_unwind does not run the panic hook: nothing is printed.
        std::panic::resume_unwind(Box::new(message(cinfo)));
    }
    extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
        // SAFETY: as above.
        let code = unsafe { (*cinfo.err).msg_code };
        if level < 0 && code == JWRN_JPEG_EOF as c_int {
            std::panic::resume_unwind(Box::new(
                "premature end of data (the file is truncated)".to_string(),
            ));
        }
    }
    // SAFETY: jpeg_std_error fills every field of the zeroed struct.
    unsafe {
        let mut err: mozjpeg_sys::jpeg_error_mgr = std::mem::zeroed();
        jpeg_std_error(&mut err);
        err.error_exit = Some(error_exit);
        err.emit_message = Some(emit_message);
        err
    }
}

/// Decodes a JPEG to RGB with libjpeg's ISLOW IDCT and fancy upsampling
/// (PIL's defaults). libjpeg reports fatal errors by unwinding (without
/// running the panic hook); they are caught here and become errors.
fn decode_jpeg(bytes: &[u8], w: u32, h: u32) -> std::result::Result<RgbImage, String> {
    let run = || -> std::io::Result<Vec<[u8; 3]>> {
        let d = mozjpeg::Decompress::builder()
            .with_err(jpeg_error_mgr())
            .from_mem(bytes)?;
        // libjpeg parses the header itself: hold it to the size we checked.
        if d.size() != (w as usize, h as usize) {
            return Err(std::io::Error::other(format!(
                "libjpeg reads the size as {:?}, the header check as {w}×{h}",
                d.size()
            )));
        }
        let mut s = d.rgb()?;
        let px: Vec<[u8; 3]> = s.read_scanlines()?;
        s.finish()?;
        Ok(px)
    };
    let px = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(px)) => px,
        Ok(Err(e)) => return Err(format!("corrupt or truncated JPEG data: {e}")),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "decoder error".into());
            return Err(format!("corrupt or truncated JPEG: {msg}"));
        }
    };
    if px.len() != w as usize * h as usize {
        return Err(format!(
            "corrupt or truncated JPEG data: decoded {} pixels, the header says {w}×{h}",
            px.len()
        ));
    }
    RgbImage::from_raw(w, h, px.concat()).ok_or_else(|| "JPEG size mismatch".to_string())
}
