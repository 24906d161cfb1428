//! `POST /v1/chat/completions`: validate, render the prompt, hand a job to
//! the engine, then answer at once (JSON) or as server-sent events.

use std::convert::Infallible;
use std::sync::mpsc::TrySendError;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use autoglm::text::generate::Sampling;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{self, ChatRequest, Settings};
use crate::engine::{Event, FinishReason, Job};
use crate::error::ApiError;
use crate::{images, read_body, Shared};

pub(crate) async fn completions(
    State(st): State<Shared>,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, st.max_body_bytes).await?;
    let req: ChatRequest = api::parse(&bytes)?;
    if let Some((name, grounder)) = &st.kg {
        if req.model == *name {
            let (name, grounder) = (name.clone(), grounder.clone());
            return crate::kg::complete(st, grounder, name, req).await;
        }
    }
    if req.model != st.model_name {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the model `{}` does not exist here; this server serves `{}`{} (GET /v1/models)",
                req.model,
                st.model_name,
                st.kg
                    .as_ref()
                    .map(|(k, _)| format!(" and `{k}`"))
                    .unwrap_or_default()
            ),
        )
        .code("model_not_found"));
    }
    let settings = req.settings()?;
    let conv = req.conversation()?;
    if conv.image_urls.len() > st.max_images {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "{} images in one request, over the server's limit of {} (--max-images)",
                conv.image_urls.len(),
                st.max_images
            ),
        ));
    }
    // Decoding images and tokenizing are blocking work.
    let st2 = st.clone();
    let (imgs, prompt_ids) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let imgs = conv
            .image_urls
            .iter()
            .zip(&conv.image_params)
            .map(|(url, param)| images::load(url, param, &st2.images))
            .collect::<Result<Vec<_>, _>>()?;
        let ids = st2.assistant.chat_prompt_ids(&conv.messages, imgs.len())?;
        Ok((imgs, ids))
    })
    .await
    .map_err(|e| ApiError::worker_failed("request", e))??;

    let ctx = st.assistant.model.lm.config.max_position_embeddings;
    let room = ctx.saturating_sub(prompt_ids.len());
    let over = |asked: usize| {
        ApiError::invalid(
            "messages",
            format!(
                "this model's context is {ctx} tokens; the prompt is {} tokens{}; shorten the messages, send fewer images{}",
                prompt_ids.len(),
                if asked > 0 { format!(" and {asked} completion tokens were asked for") } else { String::new() },
                if asked > 0 { " or lower max_tokens" } else { "" },
            ),
        )
        .code("context_length_exceeded")
    };
    let max_new_tokens = match settings.max_tokens {
        _ if room == 0 => return Err(over(0)),
        Some(m) if m > room => return Err(over(m)),
        Some(m) => m,
        None => room,
    };

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let now = Instant::now();
    let job = Job {
        prompt_ids,
        images: imgs,
        max_new_tokens,
        sampling: Sampling {
            temperature: settings.temperature,
            top_p: settings.top_p,
            seed: settings.seed,
            ..Sampling::default()
        },
        stop: settings.stop.clone(),
        enqueued: now,
        deadline: now + st.request_timeout,
        events: tx,
    };
    match st.jobs.try_send(job) {
        Ok(()) => {
            st.metrics.queue_depth.inc();
        }
        Err(TrySendError::Full(_)) => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the server is busy: its queue of {} requests is full; retry shortly",
                    st.queue
                ),
            )
            .code("queue_full"))
        }
        Err(TrySendError::Disconnected(_)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the engine has stopped; the server is shutting down",
            ))
        }
    }
    let id = completion_id();
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if settings.stream {
        return Ok(
            stream_response(rx, id, created, st.model_name.clone(), settings).into_response(),
        );
    }
    let (text, finish, usage) = collect(rx).await?;
    Ok(axum::Json(serde_json::json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": st.model_name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish.as_str(),
            "logprobs": null,
        }],
        "usage": usage,
    }))
    .into_response())
}

fn usage(prompt: usize, completion: usize) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

fn completion_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    format!(
        "chatcmpl-{:016x}",
        RandomState::new().hash_one(Instant::now())
    )
}

fn engine_gone() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the engine stopped before answering; the server is shutting down",
    )
}

async fn collect(
    mut rx: UnboundedReceiver<Event>,
) -> Result<(String, FinishReason, serde_json::Value), ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => return Ok((text, finish, usage(prompt_tokens, completion_tokens))),
            Event::Failed(e) => return Err(e),
        }
    }
    Err(engine_gone())
}

/// Chunks as OpenAI sends them: the role first, then content deltas, then
/// an empty delta with the finish reason, the usage (when asked for) and
/// `[DONE]`. An error after the head is sent as an `{"error": …}` event.
fn stream_response(
    rx: UnboundedReceiver<Event>,
    id: String,
    created: u64,
    model: String,
    settings: Settings,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let chunk = move |delta: serde_json::Value, finish: Option<&str>| {
        serde_json::json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    };
    let head = chunk(
        serde_json::json!({"role": "assistant", "content": ""}),
        None,
    );
    let include_usage = settings.include_usage;
    let body = stream::unfold(Some(rx), move |rx| {
        let chunk = chunk.clone();
        async move {
            let mut rx = rx?;
            let out: Vec<serde_json::Value> = match rx.recv().await {
                Some(Event::Text(t)) => {
                    return Some((
                        vec![data(chunk(serde_json::json!({"content": t}), None))],
                        Some(rx),
                    ))
                }
                Some(Event::Done {
                    finish,
                    prompt_tokens: p,
                    completion_tokens: c,
                }) => {
                    let mut v = vec![chunk(serde_json::json!({}), Some(finish.as_str()))];
                    if include_usage {
                        let mut u = chunk(serde_json::json!({}), None);
                        u["choices"] = serde_json::json!([]);
                        u["usage"] = usage(p, c);
                        v.push(u);
                    }
                    v
                }
                Some(Event::Failed(e)) => vec![e.body()],
                None => vec![engine_gone().body()],
            };
            let mut events: Vec<_> = out.into_iter().map(data).collect();
            events.push(Ok(SseEvent::default().data("[DONE]")));
            Some((events, None))
        }
    })
    .flat_map(stream::iter);
    Sse::new(stream::once(async move { data(head) }).chain(body)).keep_alive(KeepAlive::default())
}

fn data(v: serde_json::Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}
