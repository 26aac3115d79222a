//! `bitnet serve`: an OpenAI-compatible HTTP server (axum on tokio) over the batching engine.
//!
//! The model runs on the engine's own thread; handlers validate a request, queue it, and relay
//! the engine's events (through an unbounded channel: the engine never waits on a client). The
//! server listens before the model loads, so `/health` can say "loading".

mod completions;
mod metrics;
mod openai;

use anyhow::{Context, Result};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_bitnet::engine::{Engine, EngineHandle, EngineOptions};
use candle_bitnet::Generator;
use clap::Args;
use metrics_exporter_prometheus::PrometheusHandle;
use openai::{ApiError, ModelInfo};
use serde_json::json;
use std::future::IntoFuture;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Request bodies larger than this are refused with 413: a full-context prompt is ~100 KB.
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: super::ModelArgs,
    /// Address to listen on; the default takes connections from this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one (logged at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model id clients send as `model` [default: --model as given].
    #[arg(long, value_name = "NAME")]
    served_model_name: Option<String>,
    /// Requests decoded together at most.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    max_batch: u64,
    /// Requests waiting for a batch slot at most; beyond, requests are answered 429 at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_queue: u64,
    /// KV-cache positions the running requests may reserve together (prompt + max_tokens
    /// each) [default: --max-batch full contexts].
    #[arg(long, value_name = "TOKENS")]
    kv_budget: Option<usize>,
    /// Require `Authorization: Bearer KEY` on /v1 routes [default: $BITNET_API_KEY].
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
}

/// The loaded model and its engine.
pub struct Ready {
    id: String,
    generator: Generator,
    engine: EngineHandle,
    context_len: usize,
    created: u64,
}

impl Ready {
    fn model_info(&self) -> ModelInfo<'_> {
        ModelInfo {
            id: &self.id,
            generator: &self.generator,
            context_len: self.context_len,
        }
    }
}

/// What every handler shares.
pub struct App {
    ready: OnceLock<Arc<Ready>>,
    shutting_down: AtomicBool,
    api_key: Option<String>,
    metrics: PrometheusHandle,
}

impl App {
    fn ready(&self) -> Result<&Arc<Ready>, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ));
        }
        self.ready.get().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model is still loading; GET /health answers 200 once it is ready",
            )
        })
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<()> {
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("BITNET_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let app = Arc::new(App {
        ready: OnceLock::new(),
        shutting_down: AtomicBool::new(false),
        api_key,
        metrics: metrics::install()?,
    });
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        })
        .into_future();
    let server = tokio::spawn(server);

    let loading = tokio::task::spawn_blocking(move || load(&args));
    tokio::select! {
        loaded = loading => {
            let ready = loaded.context("the model loader panicked")??;
            tracing::info!(model = %ready.id, "model loaded: ready");
            let _ = app.ready.set(ready);
        }
        () = shutdown_signal() => {}
    }
    if !app.shutting_down.load(Ordering::SeqCst) {
        shutdown_signal().await;
    }
    tracing::info!("shutting down: no new connections, cancelling the running requests");
    app.shutting_down.store(true, Ordering::SeqCst);
    if let Some(ready) = app.ready.get() {
        ready.engine.shutdown();
    }
    let _ = stop_tx.send(true);
    server.await.context("the HTTP server panicked")??;
    tracing::info!("stopped");
    Ok(())
}

fn load(args: &ServeArgs) -> Result<Arc<Ready>> {
    let started = Instant::now();
    let generator = args.model.load()?;
    let context_len = generator.context_len();
    let max_batch = args.max_batch as usize;
    let opts = EngineOptions {
        max_batch,
        max_queue: args.max_queue as usize,
        kv_budget_tokens: args.kv_budget.unwrap_or(max_batch * context_len),
        ..EngineOptions::for_context(context_len)
    };
    let engine = Engine::new(&generator, opts).spawn();
    tracing::info!(
        secs = started.elapsed().as_secs_f64(),
        context_len,
        "loaded {}",
        generator.name()
    );
    Ok(Arc::new(Ready {
        id: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| args.model.model.clone()),
        generator,
        engine,
        context_len,
        created: completions::unix_time(),
    }))
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completion))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route_layer(middleware::from_fn_with_state(app.clone(), authorize));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(log_request))
        .with_state(app)
}

async fn authorize(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(key) = &app.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), key.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key")
            .code("invalid_api_key")
            .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing API key: send the header `Authorization: Bearer <key>`",
        )
        .code("invalid_api_key")
        .into_response(),
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn log_request(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status();
    ::metrics::counter!(metrics::HTTP_REQUESTS, "route" => route.clone(), "status" => status.as_str().to_string())
        .increment(1);
    let ms = started.elapsed().as_millis() as u64;
    let status = status.as_u16();
    // Probes and scrapes come every few seconds: below the default level.
    if route == "/health" || route == "/metrics" {
        tracing::debug!(%method, path, status, ms, "request");
    } else {
        tracing::info!(%method, path, status, ms, "request");
    }
    response
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let (status, text) = if app.shutting_down.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if app.ready.get().is_some() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    };
    (status, Json(json!({ "status": text }))).into_response()
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    if let Some(ready) = app.ready.get() {
        metrics::record_engine(&ready.engine.stats());
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

fn model_object(ready: &Ready) -> serde_json::Value {
    json!({
        "id": ready.id,
        "object": "model",
        "created": ready.created,
        "owned_by": "candle-bitnet",
        "max_model_len": ready.context_len,
    })
}

async fn models(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let ready = app.ready()?;
    Ok(Json(json!({"object": "list", "data": [model_object(ready)]})).into_response())
}

async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let ready = app.ready()?;
    if id != ready.id {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "the model `{id}` does not exist: this server serves `{}`",
                ready.id
            ),
        )
        .code("model_not_found"));
    }
    Ok(Json(model_object(ready)).into_response())
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
