//! Prometheus metrics (`GET /metrics`) through the `metrics` facade.

use candle_bitnet::engine::EngineStats;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "bitnet_http_requests_total";
pub const REQUESTS_FINISHED: &str = "bitnet_requests_finished_total";
pub const PROMPT_TOKENS: &str = "bitnet_prompt_tokens_total";
pub const GENERATED_TOKENS: &str = "bitnet_generated_tokens_total";
pub const QUEUE_DEPTH: &str = "bitnet_queue_depth";
pub const RUNNING: &str = "bitnet_running_requests";
pub const KV_TOKENS: &str = "bitnet_kv_cache_tokens";
pub const TIME_TO_FIRST_TOKEN: &str = "bitnet_time_to_first_token_seconds";
pub const TIME_PER_OUTPUT_TOKEN: &str = "bitnet_time_per_output_token_seconds";
pub const REQUEST_DURATION: &str = "bitnet_request_duration_seconds";

/// Latency buckets from 1 ms to 2 min.
const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Installs the process-wide recorder; the handle renders the text format.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)?
        .install_recorder()?;
    for (name, help) in [
        (HTTP_REQUESTS, "HTTP requests answered, by route and status"),
        (
            REQUESTS_FINISHED,
            "Completions ended, by reason (stop, length, cancelled, error)",
        ),
        (PROMPT_TOKENS, "Prompt tokens of the completions run"),
        (GENERATED_TOKENS, "Tokens generated"),
    ] {
        metrics::describe_counter!(name, help);
    }
    for (name, help) in [
        (QUEUE_DEPTH, "Requests waiting for a slot in the batch"),
        (RUNNING, "Requests in the running batch"),
        (KV_TOKENS, "Tokens held in the KV cache"),
    ] {
        metrics::describe_gauge!(name, help);
    }
    for (name, help) in [
        (TIME_TO_FIRST_TOKEN, "From the request to its first token"),
        (
            TIME_PER_OUTPUT_TOKEN,
            "Between consecutive tokens of a request",
        ),
        (REQUEST_DURATION, "From the request to its last token"),
    ] {
        metrics::describe_histogram!(name, metrics::Unit::Seconds, help);
    }
    Ok(handle)
}

/// The engine's gauges, read when scraped.
pub fn record_engine(stats: &EngineStats) {
    metrics::gauge!(QUEUE_DEPTH).set(stats.queued as f64);
    metrics::gauge!(RUNNING).set(stats.running as f64);
    metrics::gauge!(KV_TOKENS).set(stats.kv_tokens as f64);
}
