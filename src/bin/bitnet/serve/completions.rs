//! `POST /v1/chat/completions` and `POST /v1/completions`: validate, queue on the engine, relay
//! its events as one response or as server-sent events.

use super::metrics as m;
use super::openai::{self, ApiError, Endpoint, Logprobs, ResponseMeta, Shape};
use super::{App, Ready};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use candle_bitnet::engine::{EngineHandle, Event, FinishReason, RequestId};
use serde_json::Value;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

pub async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    complete(&app, Endpoint::Chat, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub async fn completion(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    complete(&app, Endpoint::Completion, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn complete(
    app: &App,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let ready = app.ready()?;
    let bytes = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body exceeds the limit of {} bytes",
                super::MAX_BODY_BYTES
            ),
        ),
        status => ApiError::new(status, e.body_text()),
    })?;
    let body = openai::parse_body(&bytes)?;
    let (request, shape) = openai::validate(body, endpoint, &ready.model_info())?;
    let prompt_tokens = request.prompt_ids.len();
    let (tx, rx) = mpsc::unbounded_channel();
    // On the engine thread: never blocks; a closed channel (the client left) cancels.
    let id = ready
        .engine
        .submit(request, move |event| tx.send(event).is_ok())
        .map_err(|e| ApiError::from_engine(&e))?;
    metrics::counter!(m::PROMPT_TOKENS).increment(prompt_tokens as u64);
    let relay = Relay {
        ready: ready.clone(),
        meta: ResponseMeta {
            id: response_id(endpoint),
            created: unix_time(),
            model: ready.id.clone(),
            endpoint,
        },
        shape,
        started,
        last_token: None,
        tokens: 0,
        chars: 0,
        running: Running {
            engine: ready.engine.clone(),
            id,
            finished: false,
        },
    };
    if shape.stream {
        Ok(stream(relay, rx))
    } else {
        collect(relay, rx).await
    }
}

fn response_id(endpoint: Endpoint) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    format!(
        "{prefix}-{:x}{:04x}",
        unix_time(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Cancels the engine request when dropped before it finished: the client went away.
struct Running {
    engine: EngineHandle,
    id: RequestId,
    finished: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.finished {
            self.engine.cancel(self.id);
        }
    }
}

/// An engine event, as the response sees it.
enum Step {
    Token {
        text: String,
        logprobs: Option<Logprobs>,
    },
    Finished {
        text: String,
        reason: FinishReason,
        usage: candle_bitnet::engine::Usage,
    },
    Failed(ApiError),
}

/// One request's relay from engine events to the response, with its metrics and log line.
struct Relay {
    ready: Arc<Ready>,
    meta: ResponseMeta,
    shape: Shape,
    started: Instant,
    last_token: Option<Instant>,
    tokens: usize,
    /// Characters of text so far: completions' `text_offset`.
    chars: usize,
    running: Running,
}

/// A relay dropped before its last event: the client went away, `running` cancels.
impl Drop for Relay {
    fn drop(&mut self) {
        if !self.running.finished {
            self.log_end("cancelled", self.tokens);
        }
    }
}

impl Relay {
    fn step(&mut self, event: Option<Event>) -> Step {
        match event {
            Some(Event::Token { id, text, logprob }) => {
                let now = Instant::now();
                match self.last_token {
                    None => metrics::histogram!(m::TIME_TO_FIRST_TOKEN)
                        .record(now.duration_since(self.started)),
                    Some(last) => metrics::histogram!(m::TIME_PER_OUTPUT_TOKEN)
                        .record(now.duration_since(last)),
                }
                self.last_token = Some(now);
                self.tokens += 1;
                metrics::counter!(m::GENERATED_TOKENS).increment(1);
                let logprobs = logprob.filter(|_| self.shape.logprobs.is_some()).map(|lp| {
                    let mut l = Logprobs::default();
                    l.push(&self.ready.generator, id, &lp, self.chars);
                    l
                });
                self.chars += text.chars().count();
                Step::Token { text, logprobs }
            }
            Some(Event::Finished {
                reason,
                text,
                usage,
            }) => {
                self.running.finished = true;
                self.chars += text.chars().count();
                self.log_end(openai::finish_reason(reason), usage.completion_tokens);
                Step::Finished {
                    text,
                    reason,
                    usage,
                }
            }
            Some(Event::Failed(e)) => {
                self.running.finished = true;
                self.log_end("error", 0);
                tracing::warn!(id = %self.meta.id, error = %e, "completion failed");
                Step::Failed(ApiError::from_engine(&e))
            }
            // The engine dropped the sink without a last event: it stopped.
            None => {
                self.running.finished = true;
                self.log_end("error", 0);
                Step::Failed(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the engine stopped before the request finished",
                ))
            }
        }
    }

    fn log_end(&self, reason: &'static str, completion_tokens: usize) {
        let elapsed = self.started.elapsed();
        metrics::histogram!(m::REQUEST_DURATION).record(elapsed);
        metrics::counter!(m::REQUESTS_FINISHED, "endpoint" => self.meta.endpoint.label(), "reason" => reason)
            .increment(1);
        tracing::info!(
            id = %self.meta.id,
            stream = self.shape.stream,
            completion_tokens,
            finish = reason,
            ttft_ms = self.last_token.map(|t| t.duration_since(self.started).as_millis() as u64),
            ms = elapsed.as_millis() as u64,
            "completion"
        );
    }
}

fn cancelled_error() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the request was cancelled: the server is shutting down",
    )
}

/// Waits for the whole completion; dropped (the client left), `Running` cancels it.
async fn collect(
    mut relay: Relay,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut logprobs = Logprobs::default();
    loop {
        match relay.step(rx.recv().await) {
            Step::Token {
                text: piece,
                logprobs: lp,
            } => {
                text.push_str(&piece);
                if let Some(lp) = lp {
                    logprobs.extend(lp);
                }
            }
            Step::Finished {
                reason: FinishReason::Cancelled,
                ..
            } => return Err(cancelled_error()),
            Step::Finished {
                text: rest,
                reason,
                usage,
            } => {
                text.push_str(&rest);
                let logprobs = relay
                    .shape
                    .logprobs
                    .map(|_| logprobs.to_json(relay.meta.endpoint));
                let body =
                    relay
                        .meta
                        .response(&text, logprobs, openai::finish_reason(reason), &usage);
                return Ok(Json(body).into_response());
            }
            Step::Failed(e) => return Err(e),
        }
    }
}

/// Server-sent events: chat's role chunk first, one chunk per piece of text, the chunk with the
/// finish reason, the usage chunk when asked for, then `[DONE]`. A failure mid-stream is sent
/// as an `{"error": ...}` event, which OpenAI's clients raise.
fn stream(mut relay: Relay, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let (out, body) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let usage_field = relay.shape.include_usage;
        if relay.meta.endpoint == Endpoint::Chat {
            let _ = out.send(
                relay
                    .meta
                    .chunk(true, "", None, None, usage_field)
                    .to_string(),
            );
        }
        loop {
            let event = tokio::select! {
                event = rx.recv() => event,
                // The client went away: dropping `relay` cancels the request.
                () = out.closed() => return,
            };
            let mut done = false;
            let chunks = match relay.step(event) {
                Step::Token { text, logprobs } => match logprobs {
                    Some(lp) => vec![relay.meta.chunk(
                        false,
                        &text,
                        Some(lp.to_json(relay.meta.endpoint)),
                        None,
                        usage_field,
                    )],
                    None if text.is_empty() => vec![],
                    None => vec![relay.meta.chunk(false, &text, None, None, usage_field)],
                },
                Step::Finished {
                    reason: FinishReason::Cancelled,
                    ..
                } => {
                    vec![cancelled_error().body()]
                }
                Step::Finished {
                    text,
                    reason,
                    usage,
                } => {
                    let mut chunks = vec![];
                    if !text.is_empty() {
                        chunks.push(relay.meta.chunk(false, &text, None, None, usage_field));
                    }
                    let finish = openai::finish_reason(reason);
                    chunks.push(relay.meta.chunk(false, "", None, Some(finish), usage_field));
                    if relay.shape.include_usage {
                        chunks.push(relay.meta.usage_chunk(&usage));
                    }
                    done = true;
                    chunks
                }
                Step::Failed(e) => vec![e.body()],
            };
            let data = chunks.iter().map(Value::to_string);
            for chunk in data.chain(done.then(|| "[DONE]".to_string())) {
                if out.send(chunk).is_err() {
                    return;
                }
            }
            if relay.running.finished {
                return;
            }
        }
    });
    let events = UnboundedReceiverStream::new(body)
        .map(|data| Ok::<_, Infallible>(axum::response::sse::Event::default().data(data)));
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
