//! Images of a request: `data:` URLs (base64 PNG, JPEG, WebP, GIF) always;
//! `http(s)` URLs only when the operator allows remote fetches; local paths
//! and `file:` URLs never (a request must not read the server's disk).

use std::io::Read;
use std::time::Duration;

use autoglm::io::image::{decode, ImageLimits};
use base64::Engine as _;
use image::RgbImage;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy)]
pub struct ImagePolicy {
    pub limits: ImageLimits,
    pub allow_remote: bool,
}

/// Decodes the image at `url`; `param` names the request field for errors.
/// Blocking (decoding, and fetching when allowed): call it off the async
/// threads.
pub fn load(url: &str, param: &str, policy: &ImagePolicy) -> Result<RgbImage, ApiError> {
    let bad = |msg: String| ApiError::invalid(param, format!("{param}: {msg}"));
    let max = policy.limits.max_bytes;
    let bytes = if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| bad("a data URL needs a comma before its payload".into()))?;
        let Some(mime) = meta.strip_suffix(";base64") else {
            return Err(bad(
                "only base64 data URLs are accepted (data:image/png;base64,…)".into(),
            ));
        };
        if !matches!(
            mime,
            "image/png" | "image/jpeg" | "image/jpg" | "image/webp" | "image/gif"
        ) {
            return Err(bad(format!("unsupported media type {mime:?}; send image/png, image/jpeg, image/webp or image/gif")));
        }
        // 4 base64 characters carry 3 bytes: refuse before decoding.
        if (data.len() as u64 / 4) * 3 > max + 3 {
            return Err(bad(format!("the image is over the limit of {max} bytes")));
        }
        base64::engine::general_purpose::STANDARD
            .decode(data.trim_end())
            .map_err(|e| bad(format!("the base64 payload is malformed: {e}")))?
    } else if url.starts_with("https://") || url.starts_with("http://") {
        if !policy.allow_remote {
            return Err(ApiError::invalid(
                param,
                format!("{param}: remote image URLs are disabled on this server; send the image as a base64 data: URL (or start the server with --allow-remote-images)"),
            ));
        }
        fetch(url, max).map_err(bad)?
    } else {
        return Err(bad("only data: URLs (and http(s) URLs where the server allows them) are accepted; local paths and file: URLs are not".into()));
    };
    decode(&bytes, param, policy.limits).map_err(|e| bad(e.to_string()))
}

fn fetch(url: &str, max_bytes: u64) -> Result<Vec<u8>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .max_redirects(3)
        .build()
        .into();
    let resp = agent
        .get(url)
        .call()
        .map_err(|e| format!("cannot fetch {url}: {e}"))?;
    let mut bytes = Vec::new();
    resp.into_body()
        .into_reader()
        .take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {url}: {e}"))?;
    if bytes.len() as u64 > max_bytes {
        return Err(format!(
            "the image at {url} is over the limit of {max_bytes} bytes"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ImagePolicy {
        ImagePolicy {
            limits: ImageLimits {
                max_pixels: 64 * 64,
                max_bytes: 10_000,
            },
            allow_remote: false,
        }
    }

    fn png(w: u32, h: u32) -> String {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
        )
    }

    #[test]
    fn data_urls_decode_and_limits_hold() {
        let img = load(&png(8, 5), "p", &policy()).unwrap();
        assert_eq!(
            (img.width(), img.height(), img.get_pixel(3, 2).0),
            (8, 5, [3, 2, 7])
        );
        let e = load(&png(65, 64), "messages[0].content[1]", &policy()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[1]"));
        assert!(
            e.message.contains("pixels") || e.message.contains("limit"),
            "{}",
            e.message
        );
        for (url, says) in [
            ("data:image/png;base64,!!!!", "malformed"),
            ("data:image/png,abc", "base64"),
            ("data:text/plain;base64,aGVsbG8=", "media type"),
            ("https://example.com/cat.png", "disabled"),
            ("/etc/passwd", "local paths"),
            ("file:///etc/passwd", "local paths"),
            ("data:image/png;base64,aGVsbG8=", "p:"),
        ] {
            let e = load(url, "p", &policy()).unwrap_err();
            assert!(e.message.contains(says), "{url}: {}", e.message);
            assert_eq!(e.status, 400);
        }
        let big = format!("data:image/png;base64,{}", "A".repeat(20_000));
        assert!(load(&big, "p", &policy())
            .unwrap_err()
            .message
            .contains("over the limit"));
    }
}
