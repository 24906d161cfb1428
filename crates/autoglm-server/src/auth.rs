//! API keys: `Authorization: Bearer KEY` on every endpoint but `/health`
//! and `/metrics` (probes and scrapers carry no key), when keys are set.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::Shared;

pub(crate) async fn require_key(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), "/health" | "/metrics");
    if st.api_keys.is_empty() || open {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    match given {
        Some(k)
            if st
                .api_keys
                .iter()
                .any(|key| same(key.as_bytes(), k.as_bytes())) =>
        {
            next.run(req).await
        }
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "incorrect API key")
            .code("invalid_api_key")
            .unread_body()
            .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "an API key is required: send `Authorization: Bearer KEY` (OpenAI clients: api_key=…)",
        )
        .code("invalid_api_key")
        .unread_body()
        .into_response(),
    }
}

/// Compares in time independent of where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Keys from a file (one per line; blank lines and `#` comments skipped)
/// and from `AUTOGLM_API_KEYS` (comma- or space-separated).
pub fn load_keys(file: Option<&std::path::Path>, env: Option<&str>) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--api-key-file {}: {e}", path.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
        if keys.is_empty() {
            return Err(format!(
                "--api-key-file {} holds no key (one per line)",
                path.display()
            ));
        }
    }
    if let Some(env) = env {
        keys.extend(
            env.split([',', ' ', '\n'])
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(String::from),
        );
    }
    if let Some(k) = keys
        .iter()
        .find(|k| k.len() < 8 || k.chars().any(|c| c.is_control()))
    {
        return Err(format!(
            "an API key of {} characters (or with control characters) is too weak; use at least 8 printable characters",
            k.chars().count()
        ));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keys");
        std::fs::write(&f, "# ours\nsk-aaaaaaaa\n\n  sk-bbbbbbbb  \n").unwrap();
        let keys = load_keys(Some(&f), Some("sk-cccccccc, sk-dddddddd")).unwrap();
        assert_eq!(
            keys,
            ["sk-aaaaaaaa", "sk-bbbbbbbb", "sk-cccccccc", "sk-dddddddd"]
        );
        std::fs::write(&f, "# none\n").unwrap();
        assert!(load_keys(Some(&f), None).unwrap_err().contains("no key"));
        assert!(load_keys(None, Some("short"))
            .unwrap_err()
            .contains("too weak"));
        assert!(load_keys(Some(&dir.path().join("missing")), None).is_err());
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"abc", b"ab"));
    }
}
