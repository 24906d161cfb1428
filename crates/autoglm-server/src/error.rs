//! Errors as the OpenAI API shapes them: a status code and
//! `{"error": {"message", "type", "param", "code"}}`, so that the official
//! clients raise their matching exception (`AuthenticationError` for 401,
//! `RateLimitError` for 429, …) with our message in it.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when there is one (`messages[0].content`).
    pub param: Option<String>,
    /// A machine-readable code (`context_length_exceeded`, `model_not_found`).
    pub code: Option<&'static str>,
    /// Close the connection after this answer (sent before the body was read).
    pub close: bool,
}

impl ApiError {
    /// A blocking task that panicked or was cancelled: a 500 naming it.
    pub(crate) fn worker_failed(what: &str, e: tokio::task::JoinError) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what} worker failed: {e}"),
        )
    }

    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
            close: false,
        }
    }

    /// 400 about one field of the request.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// Marks an answer sent without reading the request body.
    pub fn unread_body(mut self) -> Self {
        self.close = true;
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The OpenAI error `type` for a status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.close {
            // The request body was not read: the connection cannot carry
            // another request reliably, so say so instead of racing the
            // client's next request on it.
            r.headers_mut()
                .insert("connection", HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        r
    }
}

/// A library error met while serving a request: the user's input was at
/// fault unless it is a tensor failure.
impl From<autoglm::Error> for ApiError {
    fn from(e: autoglm::Error) -> Self {
        match e {
            autoglm::Error::Candle(e) => {
                tracing::error!("model failure: {e}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the model failed on this request: {e}"),
                )
            }
            e => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
}
