//! `POST /v1/embeddings`: text through the sentence encoder (MiniLM),
//! images through the chat model's vision tower (mean of its image tokens,
//! L2-normalised). The two live in different spaces, so one request takes
//! one kind, chosen by `model`.

use autoglm::text::bert::l2_normalize;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use crate::api::{self, EmbeddingInput, EmbeddingItem, EmbeddingRequest, Part};
use crate::error::ApiError;
use crate::{images, read_body, Shared};

/// Inputs per request.
const MAX_INPUTS: usize = 256;

enum Inputs {
    Texts(Vec<String>),
    Images(Vec<(String, String)>),
}

pub(crate) async fn embeddings(State(st): State<Shared>, body: Body) -> Result<Response, ApiError> {
    let bytes = read_body(body, st.max_body_bytes).await?;
    let req: EmbeddingRequest = api::parse(&bytes)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format must be float or base64 (got {f:?})"),
            ))
        }
    };
    let items = match req.input {
        EmbeddingInput::One(s) => vec![EmbeddingItem::Text(s)],
        EmbeddingInput::Many(v) => v,
    };
    if items.is_empty() || items.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!("input takes 1 to {MAX_INPUTS} items (got {})", items.len()),
        ));
    }
    let texts_model = st.embedding_name.as_deref() == Some(req.model.as_str());
    let images_model = req.model == st.model_name;
    let mut texts = Vec::new();
    let mut imgs = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match item {
            EmbeddingItem::Text(t) => texts.push(t),
            EmbeddingItem::Image(Part::ImageUrl { image_url }) => {
                imgs.push((image_url.url, format!("input[{i}]")))
            }
            EmbeddingItem::Image(Part::Text { text }) => texts.push(text),
            EmbeddingItem::Tokens(_) => {
                return Err(ApiError::invalid(
                    format!("input[{i}]"),
                    format!("input[{i}]: token-id input is not supported; send text"),
                ))
            }
        }
    }
    let inputs = match (texts_model, images_model) {
        (true, _) if imgs.is_empty() => Inputs::Texts(texts),
        (true, _) => {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "`{}` embeds text; for images use model `{}`",
                    req.model, st.model_name
                ),
            ))
        }
        (_, true) if texts.is_empty() => Inputs::Images(imgs),
        (_, true) => {
            let hint = match &st.embedding_name {
                Some(e) => format!("for text use model `{e}`"),
                None => "this server has no text embedding model (start it with --embedding-model)"
                    .into(),
            };
            return Err(ApiError::invalid(
                "input",
                format!(
                    "`{}` embeds images through its vision tower; {hint}",
                    req.model
                ),
            ));
        }
        _ => {
            let mut known = vec![format!("`{}` (images)", st.model_name)];
            known.extend(st.embedding_name.iter().map(|e| format!("`{e}` (text)")));
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "the model `{}` does not exist here; embedding models: {}",
                    req.model,
                    known.join(", ")
                ),
            )
            .code("model_not_found"));
        }
    };
    if let Some(d) = req.dimensions {
        let native = match &inputs {
            Inputs::Texts(_) => st.encoder.as_ref().map(|e| e.dim()).unwrap_or(0),
            Inputs::Images(_) => st.assistant.model.config.vision_config.hidden_size,
        };
        if d != native as i64 {
            return Err(ApiError::invalid(
                "dimensions",
                format!("this model's embeddings have {native} dimensions (got dimensions = {d})"),
            ));
        }
    }
    // Bounded like the chat queue: past it, 429 at once.
    let Ok(permit) = st.embed_slots.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "the server is busy with embeddings; retry shortly",
        )
        .code("queue_full"));
    };
    let st2 = st.clone();
    let (vectors, tokens) =
        tokio::task::spawn_blocking(move || -> Result<(Vec<Vec<f32>>, usize), ApiError> {
            let _permit = permit;
            match inputs {
                Inputs::Texts(texts) => {
                    let enc = st2.encoder.as_ref().ok_or_else(|| {
                        ApiError::new(StatusCode::NOT_FOUND, "no text embedding model")
                    })?;
                    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                    let tokens = texts
                        .iter()
                        .map(|t| enc.tokenizer().encode(t).map(|ids| ids.len()))
                        .sum::<autoglm::Result<usize>>()?;
                    Ok((
                        enc.embed(&refs, 32)?
                            .to_vec2::<f32>()
                            .map_err(autoglm::Error::from)?,
                        tokens,
                    ))
                }
                Inputs::Images(urls) => {
                    let imgs = urls
                        .iter()
                        .map(|(url, param)| images::load(url, param, &st2.images))
                        .collect::<Result<Vec<_>, _>>()?;
                    let a = &st2.assistant;
                    let pooled = (|| -> autoglm::Result<Vec<Vec<f32>>> {
                        let f = a.model.vision_features(&a.pixels(&imgs)?)?.mean(1)?;
                        Ok(l2_normalize(&f)?.to_vec2::<f32>()?)
                    })()?;
                    Ok((pooled, imgs.len() * a.model.image_tokens()))
                }
            }
        })
        .await
        .map_err(|e| ApiError::worker_failed("embedding", e))??;
    let data: Vec<serde_json::Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                serde_json::json!(v)
            };
            serde_json::json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(serde_json::json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}
