//! The OpenAI request shapes we accept, and their validation. Fields that
//! would change the answer in ways we do not implement (`n` > 1, tools,
//! log-probabilities, penalties) are refused by name rather than ignored.

use serde::Deserialize;

use crate::error::ApiError;

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub logprobs: Option<bool>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub response_format: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

/// The sampling and stopping settings of a validated request.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// A conversation in the HF chat-template format, and the image URLs in
/// the order their placeholders appear.
pub struct Conversation {
    pub messages: serde_json::Value,
    pub image_urls: Vec<String>,
    /// The request field of each image (`messages[1].content[2]`).
    pub image_params: Vec<String>,
}

/// Parses a JSON body into `T`, naming the field at fault on error.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid("body", format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::invalid("body", format!("{inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("{path}: {inner}"))
        }
    })
}

impl ChatRequest {
    pub fn settings(&self) -> Result<Settings, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    "n",
                    format!("n must be 1 (got {n}); send one request per completion"),
                ));
            }
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    name,
                    format!("{name} is not supported; leave it out or send 0"),
                ));
            }
        }
        if self.logprobs == Some(true) {
            return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::invalid(
                "tools",
                "tool calls are not supported by this model",
            ));
        }
        if let Some(f) = &self.response_format {
            if f.get("type").and_then(|t| t.as_str()) != Some("text") {
                return Err(ApiError::invalid(
                    "response_format",
                    "only {\"type\": \"text\"} is supported",
                ));
            }
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        let max_tokens = match max_tokens {
            Some((name, m)) if m < 1 => {
                return Err(ApiError::invalid(
                    name,
                    format!("{name} must be at least 1 (got {m})"),
                ))
            }
            Some((_, m)) => Some(m as usize),
            None => None,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be between 0 and 2 (got {temperature})"),
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::invalid(
                    "top_p",
                    format!("top_p must be in (0, 1] (got {p})"),
                ));
            }
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "stop takes up to 4 non-empty strings",
            ));
        }
        Ok(Settings {
            max_tokens,
            temperature,
            top_p: self.top_p.filter(|&p| p < 1.0),
            // Unseeded requests draw fresh randomness, as OpenAI's do.
            seed: self.seed.map(|s| s as u64).unwrap_or_else(rand_seed),
            stop,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }

    /// The conversation for the chat template; `developer` turns become
    /// `system` turns, images may only come from the user.
    pub fn conversation(&self) -> Result<Conversation, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        let mut image_urls = Vec::new();
        let mut image_params = Vec::new();
        for (i, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                r => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!("messages[{i}].role: unsupported role {r:?}; use system, developer, user or assistant"),
                    ))
                }
            };
            let content = match &m.content {
                None => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].content"),
                        format!("messages[{i}].content is missing"),
                    ))
                }
                Some(Content::Text(t)) => serde_json::Value::String(t.clone()),
                Some(Content::Parts(parts)) => {
                    let mut v = Vec::with_capacity(parts.len());
                    for (j, p) in parts.iter().enumerate() {
                        match p {
                            Part::Text { text } => {
                                v.push(serde_json::json!({"type": "text", "text": text}))
                            }
                            Part::ImageUrl { image_url } => {
                                if role != "user" {
                                    return Err(ApiError::invalid(
                                        format!("messages[{i}].content[{j}]"),
                                        format!("messages[{i}].content[{j}]: images are only accepted in user messages"),
                                    ));
                                }
                                image_urls.push(image_url.url.clone());
                                image_params.push(format!("messages[{i}].content[{j}]"));
                                v.push(serde_json::json!({"type": "image"}));
                            }
                        }
                    }
                    serde_json::Value::Array(v)
                }
            };
            out.push(serde_json::json!({"role": role, "content": content}));
        }
        Ok(Conversation {
            messages: serde_json::Value::Array(out),
            image_urls,
            image_params,
        })
    }
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<EmbeddingItem>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingItem {
    Text(String),
    /// An image, as a chat content part: `{"type": "image_url", "image_url": {"url": …}}`.
    Image(Part),
    /// Token ids: the OpenAI API allows them, our encoders take text.
    Tokens(Vec<i64>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let e = parse::<ChatRequest>(
            br#"{"model": "m", "messages": [{"role": "user", "content": 5}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].content"),
            "{}",
            e.message
        );
        let e = parse::<ChatRequest>(br#"{"model": "m", "messages": [], "temperature": "hot"}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse::<ChatRequest>(b"{\"model\": ").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse::<ChatRequest>(br#"{"messages": []}"#).unwrap_err();
        assert!(e.message.contains("model"), "{}", e.message);
    }

    #[test]
    fn settings_and_conversation() {
        let r: ChatRequest = parse(
            br#"{"model": "m", "max_tokens": 7, "max_completion_tokens": 9, "stop": "x", "seed": 3,
                 "messages": [{"role": "developer", "content": "be brief"},
                              {"role": "user", "content": [{"type": "text", "text": "what?"},
                                                           {"type": "image_url", "image_url": {"url": "data:,"}}]}]}"#,
        )
        .unwrap();
        let s = r.settings().unwrap();
        assert_eq!(
            (s.max_tokens, s.seed, s.stop.clone()),
            (Some(9), 3, vec!["x".to_string()])
        );
        let c = r.conversation().unwrap();
        assert_eq!(c.image_urls, vec!["data:,"]);
        assert_eq!(c.messages[0]["role"], "system");
        assert_eq!(
            c.messages[1]["content"][1],
            serde_json::json!({"type": "image"})
        );

        for (body, field) in [
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "n": 2}"#,
                "n",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "temperature": 3}"#,
                "temperature",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "top_p": 0}"#,
                "top_p",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "max_tokens": 0}"#,
                "max_tokens",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "stop": ["a","b","c","d","e"]}"#,
                "stop",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "a"}], "presence_penalty": 1}"#,
                "presence_penalty",
            ),
        ] {
            let e = parse::<ChatRequest>(body.as_bytes())
                .unwrap()
                .settings()
                .unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {}", e.message);
        }
        for (body, field) in [
            (r#"{"model": "m", "messages": []}"#, "messages"),
            (
                r#"{"model": "m", "messages": [{"role": "tool", "content": "a"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}"#,
                "messages[0].content[0]",
            ),
        ] {
            let e = parse::<ChatRequest>(body.as_bytes())
                .unwrap()
                .conversation()
                .err()
                .unwrap();
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {}", e.message);
        }
    }
}
