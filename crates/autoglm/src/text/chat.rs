//! Chat templates rendered as HF tokenizers render them: Jinja with
//! `trim_blocks` and `lstrip_blocks` on, Python string methods (`strip`,
//! `split`, …), `raise_exception`, and the tokenizer's special tokens in the
//! context. The template comes from `chat_template.jinja`,
//! `chat_template.json`, or the `chat_template` field of
//! `tokenizer_config.json`.
//!
//! Reference: transformers `utils/chat_template_utils.py`
//! (`_compile_jinja_template`, `render_jinja_template`).

use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde_json::Value as Json;

use crate::{Error, Result};

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers defines it: no ASCII escaping, optional indent.
fn tojson(value: Value, indent: Option<usize>) -> std::result::Result<Value, JinjaError> {
    let json: Json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = match indent {
        Some(n) => {
            let mut buf = Vec::new();
            let ind = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(ind.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            serde::Serialize::serialize(&json, &mut ser)
                .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
            String::from_utf8_lossy(&buf).into_owned()
        }
        None => serde_json::to_string(&json)
            .unwrap_or_default()
            .replace("\":", "\": ")
            .replace(",\"", ", \""),
    };
    Ok(Value::from_safe_string(text))
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are put in the context as
    /// HF does with the tokenizer's special tokens.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Invalid(format!("the chat template does not compile: {e:#}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Finds the model's template (see the module docs); `None` when the
    /// directory has none.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let tk_path = dir.join("tokenizer_config.json");
        let tk: Json = if tk_path.is_file() {
            crate::io::read_json(&tk_path)?
        } else {
            Json::Null
        };
        let token = |name: &str| -> String {
            match &tk[name] {
                Json::String(s) => s.clone(),
                Json::Object(o) => o
                    .get("content")
                    .and_then(Json::as_str)
                    .unwrap_or("")
                    .to_string(),
                _ => String::new(),
            }
        };
        let (bos, eos) = (token("bos_token"), token("eos_token"));
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
        } else if dir.join("chat_template.json").is_file() {
            let j: Json = crate::io::read_json(&dir.join("chat_template.json"))?;
            j["chat_template"].as_str().map(str::to_string)
        } else {
            match &tk["chat_template"] {
                Json::String(s) => Some(s.clone()),
                // A list of named templates: use "default".
                Json::Array(list) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        source.map(|s| Self::new(&s, &bos, &eos)).transpose()
    }

    /// Renders `messages` (a JSON array of `{role, content}`, where content
    /// is a string or a list of `{"type": "image"}` / `{"type": "text",
    /// "text": …}` parts).
    pub fn render(&self, messages: &Json, add_generation_prompt: bool) -> Result<String> {
        if !messages.is_array() {
            return Err(Error::Invalid("messages must be a JSON array".into()));
        }
        let tpl = self.env.get_template("chat").expect("added in new()");
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        tpl.render(ctx).map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => Error::Invalid(format!(
                "the chat template refused the conversation: {}",
                e.detail().unwrap_or("")
            )),
            _ => Error::Invalid(format!("the chat template failed: {e:#}")),
        })
    }
}
