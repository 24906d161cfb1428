//! An OpenAI-compatible HTTP server for Open-AutoGLM models.
//!
//! Handlers only parse and validate; chat requests go over a bounded
//! channel to one engine thread that batches them ([`engine`]), and their
//! answers come back on a per-request channel. A full queue answers 429 at
//! once. Embeddings run on the blocking pool, bounded the same way.
//!
//! Endpoints: `POST /v1/chat/completions` (text and `image_url` parts,
//! streaming as server-sent events), `POST /v1/embeddings` (text through
//! MiniLM, images through the model's vision tower), `GET /v1/models`,
//! `GET /health`, `GET /metrics` (Prometheus text).

pub mod api;
mod auth;
pub use auth::load_keys;
mod chat;
mod embeddings;
pub mod engine;
pub mod error;
pub mod images;
mod kg;
pub mod metrics;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use autoglm::assistant::Assistant;
use autoglm::io::image::ImageLimits;
use autoglm::text::bert::SentenceEncoder;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use axum_server::accept::NoDelayAcceptor;
use candle_core::Device;

use crate::error::ApiError;
use crate::images::ImagePolicy;
use crate::metrics::{EndpointLabel, Metrics, RequestLabels};

/// Everything `autoglm serve` can be told.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model_dir: PathBuf,
    /// The name clients pass as `model` (default: the directory's name).
    pub model_name: Option<String>,
    /// A sentence-transformers MiniLM directory for text embeddings.
    pub embedding_model: Option<PathBuf>,
    /// Its name in requests (default: the directory's name).
    pub embedding_name: Option<String>,
    pub addr: SocketAddr,
    /// Bearer keys; empty means no authentication.
    pub api_keys: Vec<String>,
    pub tls: Option<tls::TlsFiles>,
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Requests that may wait for the engine before 429.
    pub queue: usize,
    pub max_body_bytes: usize,
    pub image_limits: ImageLimits,
    pub max_images: usize,
    pub allow_remote_images: bool,
    pub request_timeout: Duration,
    /// How long in-flight requests may run on after SIGTERM.
    pub shutdown_grace: Duration,
    /// A second model whose answers are grounded in a knowledge graph.
    pub kg: Option<KgServe>,
}

/// `--kg`: the store and the reader model that answers from its facts.
#[derive(Debug, Clone)]
pub struct KgServe {
    pub store: PathBuf,
    pub reader: PathBuf,
    /// The name clients pass as `model` (default: the reader's directory
    /// name).
    pub name: Option<String>,
}

impl ServeConfig {
    pub fn new(model_dir: PathBuf, addr: SocketAddr) -> Self {
        Self {
            model_dir,
            model_name: None,
            embedding_model: None,
            embedding_name: None,
            addr,
            api_keys: Vec::new(),
            tls: None,
            max_batch: 16,
            queue: 64,
            max_body_bytes: 20 << 20,
            image_limits: ImageLimits {
                max_pixels: 4096 * 4096,
                max_bytes: 10 << 20,
            },
            max_images: 8,
            allow_remote_images: false,
            request_timeout: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(10),
            kg: None,
        }
    }
}

/// What every handler shares.
pub(crate) struct AppState {
    pub model_name: String,
    pub embedding_name: Option<String>,
    pub assistant: Arc<Assistant>,
    pub encoder: Option<Arc<SentenceEncoder>>,
    pub jobs: SyncSender<engine::Job>,
    pub metrics: Arc<Metrics>,
    pub embed_slots: Arc<tokio::sync::Semaphore>,
    pub api_keys: Vec<String>,
    pub images: ImagePolicy,
    pub max_body_bytes: usize,
    pub max_images: usize,
    pub queue: usize,
    pub request_timeout: Duration,
    pub kg: Option<(String, Arc<autoglm::kg::ground::Grounder>)>,
}

pub(crate) type Shared = Arc<AppState>;

/// A loaded server, not yet listening.
pub struct Server {
    app: Router,
    cfg: ServeConfig,
    engine: std::thread::JoinHandle<()>,
}

impl Server {
    /// Loads the model (and the embedding model) and starts the engine.
    pub fn load(cfg: ServeConfig) -> Result<Self, autoglm::Error> {
        let dev = Device::Cpu;
        let assistant = Arc::new(Assistant::load(&cfg.model_dir, &dev)?);
        // The engine batches prompts through the decoder alone; a decoder
        // that reads the image through cross-attention would answer blind.
        if assistant.model.lm.config.cross_attention_every.is_some() {
            return Err(autoglm::Error::Invalid(format!(
                "{}: this model's decoder reads images through cross-attention (text_config.cross_attention_every), which the server does not batch yet; use `autoglm ask` or `autoglm eval` with it",
                cfg.model_dir.display()
            )));
        }
        // The batched decode runs every row at the same depth: a router
        // over the decoder's depth is not followed here, every request
        // gets the full path (the answers `--router-off` gives in
        // `autoglm eval`). A router that only chooses the image's path
        // (before the tower) is followed.
        if assistant.model.router.is_some() && !engine::routes_images(&assistant) {
            tracing::warn!(
                "{}: this model's router chooses the decoder's depth, which the server does not follow; every request takes the full path",
                cfg.model_dir.display()
            );
        }
        let encoder = match &cfg.embedding_model {
            Some(dir) => Some(Arc::new(SentenceEncoder::load(dir, &dev)?)),
            None => None,
        };
        let embedding_name = cfg
            .embedding_model
            .as_ref()
            .map(|d| cfg.embedding_name.clone().unwrap_or_else(|| dir_name(d)));
        let model_name = cfg
            .model_name
            .clone()
            .unwrap_or_else(|| dir_name(&cfg.model_dir));
        let kg = match &cfg.kg {
            Some(k) => Some((
                k.name.clone().unwrap_or_else(|| dir_name(&k.reader)),
                Arc::new(autoglm::kg::ground::Grounder::load(
                    &k.store, &k.reader, &dev,
                )?),
            )),
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue);
        let engine = engine::spawn(assistant.clone(), metrics.clone(), cfg.max_batch, rx)
            .map_err(|e| autoglm::Error::Invalid(format!("cannot start the engine thread: {e}")))?;
        let state = Arc::new(AppState {
            model_name,
            embedding_name,
            assistant,
            encoder,
            jobs: tx,
            metrics,
            embed_slots: Arc::new(tokio::sync::Semaphore::new(cfg.queue.max(1))),
            api_keys: cfg.api_keys.clone(),
            images: ImagePolicy {
                limits: cfg.image_limits,
                allow_remote: cfg.allow_remote_images,
            },
            max_body_bytes: cfg.max_body_bytes,
            max_images: cfg.max_images,
            queue: cfg.queue,
            request_timeout: cfg.request_timeout,
            kg,
        });
        Ok(Self {
            app: router(state),
            cfg,
            engine,
        })
    }

    /// Serves until SIGTERM or Ctrl-C (or until `stop` resolves), then stops
    /// accepting and gives in-flight requests `shutdown_grace` to finish.
    /// `on_listen` is told the bound address (the port may have been 0).
    pub async fn run(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
        on_listen: impl FnOnce(SocketAddr),
    ) -> std::io::Result<()> {
        let handle = axum_server::Handle::new();
        let grace = self.cfg.shutdown_grace;
        let h = handle.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop => {}
                _ = terminate() => {}
            }
            tracing::info!(
                "shutting down: no new connections, {grace:?} for the requests in flight"
            );
            h.graceful_shutdown(Some(grace));
        });
        let app = self.app.into_make_service();
        let serve = async {
            // TCP_NODELAY: answers are small writes that must not wait for
            // the client's delayed ACK.
            let server = axum_server::bind(self.cfg.addr).handle(handle.clone());
            match &self.cfg.tls {
                Some(files) => {
                    let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(
                        files.server_config()?,
                    ));
                    let acceptor =
                        axum_server::tls_rustls::RustlsAcceptor::new(tls).acceptor(NoDelayAcceptor);
                    server.acceptor(acceptor).serve(app).await
                }
                None => server.acceptor(NoDelayAcceptor).serve(app).await,
            }
        };
        let announce = async {
            if let Some(addr) = handle.listening().await {
                on_listen(addr);
            }
            std::future::pending::<()>().await
        };
        let result = tokio::select! {
            r = serve => r,
            _ = announce => unreachable!("announce never ends"),
        };
        // The router (and with it every sender) is gone: the engine ends.
        let _ = self.engine.join();
        result
    }
}

fn dir_name(p: &std::path::Path) -> String {
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

async fn terminate() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such endpoint; see GET /v1/models, POST /v1/chat/completions, POST /v1/embeddings").unread_body()
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "wrong method for this endpoint: chat completions and embeddings take POST, the others GET").unread_body()
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key))
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn models(State(st): State<Shared>) -> impl IntoResponse {
    let mut data = vec![serde_json::json!({
        "id": st.model_name, "object": "model", "created": 0, "owned_by": "open-autoglm",
    })];
    if let Some((k, _)) = &st.kg {
        data.push(serde_json::json!({"id": k, "object": "model", "created": 0, "owned_by": "open-autoglm"}));
    }
    if let Some(e) = &st.embedding_name {
        data.push(serde_json::json!({"id": e, "object": "model", "created": 0, "owned_by": "open-autoglm"}));
    }
    axum::Json(serde_json::json!({"object": "list", "data": data}))
}

async fn metrics_text(State(st): State<Shared>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
}

/// Counts every response by endpoint and status, and times it.
async fn track(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let t0 = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let labels = RequestLabels {
        endpoint: endpoint.clone(),
        status,
    };
    st.metrics.requests.get_or_create(&labels).inc();
    if status >= 400 {
        st.metrics.errors.get_or_create(&labels).inc();
    }
    st.metrics
        .latency
        .get_or_create(&EndpointLabel { endpoint })
        .observe(t0.elapsed().as_secs_f64());
    resp
}

/// The body, or 413 past `limit` bytes. An oversized body is still read
/// (and dropped) up to a bound, so that the client, still sending, gets the
/// 413 instead of a connection reset.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    use http_body_util::BodyExt;
    let drain_bound = limit.saturating_mul(4).max(64 << 20);
    let mut body = body;
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::invalid("body", format!("cannot read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen <= limit {
                buf.extend_from_slice(&data);
            } else if seen > drain_bound {
                break;
            }
        }
    }
    if seen > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the server's limit of {limit} bytes (--max-body-bytes); send smaller or fewer images"),
        ));
    }
    Ok(buf.into())
}
