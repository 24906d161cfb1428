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

/// Python `json.dumps` separators: `", "` and `": "` on one line.
struct PySpaced;

impl serde_json::ser::Formatter for PySpaced {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False,
/// indent=indent)`, keys in insertion order.
fn tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let err = |e: serde_json::Error| JinjaError::new(ErrorKind::InvalidOperation, e.to_string());
    let json: Json = serde_json::to_value(&value).map_err(err)?;
    let mut buf = Vec::new();
    match indent {
        Some(n) => {
            let ind = " ".repeat(n);
            let mut ser = serde_json::Serializer::with_formatter(
                &mut buf,
                serde_json::ser::PrettyFormatter::with_indent(ind.as_bytes()),
            );
            serde::Serialize::serialize(&json, &mut ser).map_err(err)?;
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, PySpaced);
            serde::Serialize::serialize(&json, &mut ser).map_err(err)?;
        }
    }
    Ok(Value::from_safe_string(
        String::from_utf8_lossy(&buf).into_owned(),
    ))
}

/// `strftime_now(format)`: the current UTC date, for templates that print
/// today's date (Llama 3). Supports %Y %m %d %B %b %H %M %S.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    format
        .replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", month)
        .replace("%b", &month[..3])
        .replace("%H", &format!("{:02}", rem / 3600))
        .replace("%M", &format!("{:02}", rem % 3600 / 60))
        .replace("%S", &format!("{:02}", rem % 60))
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
        env.add_function("strftime_now", strftime_now);
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

    /// Renders with an arbitrary JSON context (tests, tools).
    pub fn render_value(&self, ctx: &Json) -> Result<String> {
        let tpl = self.env.get_template("chat").expect("added in new()");
        tpl.render(Value::from(minijinja::value::Serde(ctx)))
            .map_err(|e| Error::Invalid(format!("the chat template failed: {e:#}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}", "", "").unwrap();
        // Insertion order, Python's separators, no ASCII escaping; a string
        // holding `":` is left alone.
        let x = serde_json::json!({"x": {"name": "f\":é", "args": [1, 2], "a": {}}});
        let out = t.render_value(&x).unwrap();
        assert_eq!(
            out,
            "{\"name\": \"f\\\":é\", \"args\": [1, 2], \"a\": {}}|{\n  \"name\": \"f\\\":é\",\n  \"args\": [\n    1,\n    2\n  ],\n  \"a\": {}\n}"
        );
    }

    #[test]
    fn strftime_now_formats_a_date() {
        let s = strftime_now("%d %b %Y".into());
        assert_eq!(s.len(), 11, "{s}");
        assert!(s[7..].parse::<i32>().unwrap() >= 2024);
    }
}
