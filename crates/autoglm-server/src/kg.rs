//! `--kg`: a second model, named after the reader, whose answers are
//! grounded in a knowledge graph as `autoglm ask --kg` grounds them. The
//! request's one photo is recognised, the last user message is the
//! question, and the reader answers from the retrieved chain. The
//! response is a normal chat completion; its `grounding` field carries the
//! recognised entity, the facts and the rule-based answer.

use std::time::{SystemTime, UNIX_EPOCH};

use autoglm::kg::ground::Grounder;
use axum::response::{IntoResponse, Response};

use crate::api::{ChatRequest, Conversation};
use crate::error::ApiError;
use crate::{images, Shared};

/// The text of the last user message: the question.
fn question(conv: &Conversation) -> Option<String> {
    let last = conv
        .messages
        .as_array()?
        .iter()
        .rev()
        .find(|m| m["role"] == "user")?;
    let text = match &last["content"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => return None,
    };
    (!text.trim().is_empty()).then_some(text)
}

pub(crate) async fn complete(
    st: Shared,
    grounder: std::sync::Arc<Grounder>,
    name: String,
    req: ChatRequest,
) -> Result<Response, ApiError> {
    let settings = req.settings()?;
    if settings.stream {
        return Err(ApiError::invalid(
            "stream",
            format!("the `{name}` model answers in one piece: send stream=false"),
        ));
    }
    let conv = req.conversation()?;
    if conv.image_urls.len() != 1 {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the `{name}` model answers about one photo: send exactly one image_url part ({} were sent)",
                conv.image_urls.len()
            ),
        ));
    }
    let q = question(&conv).ok_or_else(|| {
        ApiError::invalid("messages", "the last user message has no question text")
    })?;
    let st2 = st.clone();
    let (seen, res) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let img = images::load(&conv.image_urls[0], &conv.image_params[0], &st2.images)?;
        let seen = grounder.recognise(&img)?;
        let (res, _) = grounder.answer(&seen.wnid, &q)?;
        Ok((seen, res))
    })
    .await
    .map_err(|e| ApiError::worker_failed("request", e))??;
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(axum::Json(serde_json::json!({
        "id": format!("chatcmpl-kg-{created:x}{:08x}", rand_suffix()),
        "object": "chat.completion",
        "created": created,
        "model": name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": res.answer},
            "finish_reason": "stop",
            "logprobs": null,
        }],
        "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                  "total_tokens": res.prompt_tokens + res.completion_tokens},
        "grounding": {
            "seen_as": seen,
            "entity": res.entity,
            "facts": res.facts.steps,
            "chain_reaches_question": res.facts.chain.is_some(),
            "rule_answer": res.rule_answer,
            "retrieval_ms": res.retrieval_ms,
        },
    }))
    .into_response())
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now()) as u32
}
