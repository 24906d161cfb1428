//! `autoglm serve`: the OpenAI-compatible HTTP server.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use autoglm_server::tls::TlsFiles;
use autoglm_server::{ServeConfig, Server};
use clap::Args;

use crate::Global;

#[derive(Args)]
pub struct ServeArgs {
    /// A HF LLaVA-layout model directory (default: the project's default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The model's name in requests and /v1/models (default: the directory's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Sentence-transformers directory for text embeddings (default: the
    /// installed all-MiniLM-L6-v2, when there is one); `none` to serve no
    /// text embeddings.
    #[arg(long)]
    embedding_model: Option<String>,
    /// Address to listen on; 0.0.0.0 to accept other machines.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port (0 picks a free one; the chosen address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// API keys, one per line; clients send `Authorization: Bearer KEY`.
    /// AUTOGLM_API_KEYS (comma-separated) adds more. Without keys the
    /// server is open to whoever can reach it.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates: admit only clients with a certificate they signed (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Sequences decoded together in one batch.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests that may wait for the engine; beyond, 429 at once.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 20 << 20)]
    max_body_bytes: usize,
    /// Largest encoded image, in bytes.
    #[arg(long, default_value_t = 10 << 20)]
    max_image_bytes: u64,
    /// Most images in one request.
    #[arg(long, default_value_t = 8)]
    max_images: usize,
    /// Fetch `http(s)` image URLs (off: only base64 data: URLs are accepted).
    #[arg(long)]
    allow_remote_images: bool,
    /// Seconds a chat request may take, queue included (504 beyond).
    #[arg(long, default_value_t = 120)]
    request_timeout: u64,
    /// Seconds in-flight requests may run on after SIGTERM.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
    /// Also serve a model (named after the reader's directory, `kg-reader`)
    /// whose answers about a photo are grounded in this knowledge graph
    /// (a store name such as `wordnet`, or an .nq file), as `ask --kg`.
    #[arg(long)]
    kg: Option<String>,
    /// The reader model for --kg (default: models/kg-reader).
    #[arg(long, requires = "kg")]
    kg_reader: Option<PathBuf>,
}

pub fn serve(g: &Global, a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 || a.queue == 0 {
        bail!("--max-batch and --queue must be at least 1");
    }
    let keys = autoglm_server::load_keys(
        a.api_key_file.as_deref(),
        std::env::var("AUTOGLM_API_KEYS").ok().as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let model_dir = crate::ask::model_dir(&a.model)?;
    let (embedding_model, embedding_name) = match a.embedding_model.as_deref() {
        Some("none") => (None, None),
        Some(d) => (Some(PathBuf::from(d)), None),
        None => (
            autoglm::io::assets::dir("minilm").ok(),
            Some("all-MiniLM-L6-v2".to_string()),
        ),
    };
    let mut cfg = ServeConfig::new(model_dir, SocketAddr::new(a.host, a.port));
    cfg.model_name = a.model_name;
    cfg.embedding_model = embedding_model;
    cfg.embedding_name = embedding_name;
    cfg.api_keys = keys;
    cfg.tls = a.tls_cert.zip(a.tls_key).map(|(cert, key)| TlsFiles {
        cert,
        key,
        client_ca: a.tls_client_ca,
    });
    cfg.max_batch = a.max_batch;
    cfg.queue = a.queue;
    cfg.max_body_bytes = a.max_body_bytes;
    cfg.image_limits.max_bytes = a.max_image_bytes;
    cfg.image_limits.max_pixels = g.max_pixels;
    cfg.max_images = a.max_images;
    cfg.allow_remote_images = a.allow_remote_images;
    cfg.request_timeout = Duration::from_secs(a.request_timeout.max(1));
    cfg.shutdown_grace = Duration::from_secs(a.shutdown_grace);
    if let Some(store) = a.kg {
        let path = crate::kg_cmd::store_path(&store);
        if !path.is_file() {
            anyhow::bail!(
                "--kg {store}: {} not found; import WordNet once with `autoglm kg import-wordnet`",
                path.display()
            );
        }
        cfg.kg = Some(autoglm_server::KgServe {
            store: path,
            reader: crate::ask::model_dir_named(a.kg_reader.as_ref(), crate::ask::KG_READER)?,
            name: None,
        });
    }
    if cfg.api_keys.is_empty() {
        eprintln!("warning: no API keys (--api-key-file, AUTOGLM_API_KEYS): anyone who can reach {} may use the server", cfg.addr);
    }
    if let Some(tls) = &cfg.tls {
        // Fail before loading the model when the files are bad.
        tls.server_config().context("TLS setup")?;
    }
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let addr = cfg.addr;
    let server = Server::load(cfg).context("loading the model")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(server.run(std::future::pending(), |addr| {
        // One line a supervisor (or a test) can read the port from.
        println!("listening on {scheme}://{addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }))
    .with_context(|| format!("serving on {addr}"))?;
    Ok(())
}
