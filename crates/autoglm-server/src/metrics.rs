//! Prometheus metrics (`GET /metrics`, text exposition format).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub errors: Family<RequestLabels, Counter>,
    pub latency: Family<EndpointLabel, Histogram>,
    pub queue_depth: Gauge,
    pub active_sequences: Gauge,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub tokens_per_second: Gauge<f64, AtomicU64>,
    pub time_to_first_token: Histogram,
    pub batch_size: Histogram,
    pub cancelled: Counter,
    pub timed_out: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("autoglm");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        let errors = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_errors",
            "HTTP responses with status ≥ 400",
            errors.clone(),
        );
        let latency = Family::<EndpointLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to the response head (streams: to the first byte)",
            latency.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Chat requests waiting for the engine",
            queue_depth.clone(),
        );
        let active_sequences = Gauge::default();
        registry.register(
            "active_sequences",
            "Sequences in the decode batch",
            active_sequences.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens prefilled",
            prompt_tokens.clone(),
        );
        let generated_tokens = Counter::default();
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        let tokens_per_second = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "tokens_per_second",
            "Generated tokens per second over the last few seconds",
            tokens_per_second.clone(),
        );
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "time_to_first_token_seconds",
            "From enqueue to the first generated token",
            time_to_first_token.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register(
            "decode_batch_size",
            "Sequences per decode step",
            batch_size.clone(),
        );
        let cancelled = Counter::default();
        registry.register(
            "cancelled_sequences",
            "Sequences whose client went away",
            cancelled.clone(),
        );
        let timed_out = Counter::default();
        registry.register(
            "timed_out_sequences",
            "Sequences past the request timeout",
            timed_out.clone(),
        );
        Self {
            registry,
            requests,
            errors,
            latency,
            queue_depth,
            active_sequences,
            prompt_tokens,
            generated_tokens,
            tokens_per_second,
            time_to_first_token,
            batch_size,
            cancelled,
            timed_out,
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
