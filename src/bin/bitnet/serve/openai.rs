//! The OpenAI wire format: request bodies, their validation into an engine request, the error
//! object, and the response and chunk objects.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use candle_bitnet::engine::{
    FinishReason, Request, SamplingParams, TokenLogprob, Usage, MAX_TOP_LOGPROBS,
};
use candle_bitnet::{ErrorKind, GenerationParams, Generator, Message};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error answered with OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// A 400 naming the request field at fault.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message).param(param)
    }

    pub fn param(mut self, param: &str) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// A library error: the caller's fault is a 400, a full queue a 429, the rest a 500.
    pub fn from_engine(e: &candle_bitnet::Error) -> Self {
        let status = match e.kind() {
            ErrorKind::Input => StatusCode::BAD_REQUEST,
            ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }

    fn error_type(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.error_type(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// The body of `/v1/chat/completions` and `/v1/completions`: one struct, so that a wrong type
/// anywhere is reported with its field's name (serde's `flatten` would lose it). Fields whose
/// type differs between the endpoints, or that take several shapes, are read as JSON values.
#[derive(Debug, Default, Deserialize)]
pub struct CompletionBody {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub prompt: Option<Value>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub n: Option<u64>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    // llama-server's extras.
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<usize>,
    #[serde(default)]
    pub ignore_eos: bool,
    // Known parameters we do not implement: refused by name when set.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
    pub logit_bias: Option<Value>,
    pub suffix: Option<Value>,
    pub echo: Option<bool>,
    pub best_of: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string, or a list of `{"type": "text", "text": ...}` parts.
    pub content: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Parses a request body, naming the field of a type error.
pub fn parse_body(bytes: &[u8]) -> Result<CompletionBody, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the request body must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let param = e.path().to_string();
        ApiError::invalid(&param, format!("invalid `{param}`: {}", e.inner()))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completion => "completion",
        }
    }
}

/// What a validated request asks for, besides the engine request.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub stream: bool,
    pub include_usage: bool,
    /// Alternatives per token when log probabilities were asked for.
    pub logprobs: Option<usize>,
}

/// The served model, as requests see it.
pub struct ModelInfo<'a> {
    pub id: &'a str,
    pub generator: &'a Generator,
    pub context_len: usize,
}

/// Checks `body` against the model and turns it into an engine request.
pub fn validate(
    body: CompletionBody,
    endpoint: Endpoint,
    model: &ModelInfo,
) -> Result<(Request, Shape), ApiError> {
    check_unsupported(&body)?;
    match body.model.as_deref() {
        None => return Err(ApiError::invalid("model", "missing `model`")),
        Some(m) if m != model.id => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "the model `{m}` does not exist: this server serves `{}`",
                    model.id
                ),
            )
            .param("model")
            .code("model_not_found"))
        }
        Some(_) => {}
    }
    if let Some(n) = body.n.filter(|n| *n != 1) {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be 1: one completion per request is supported, got {n}"),
        ));
    }
    let logprobs = logprobs(&body, endpoint)?;
    let prompt_ids = match endpoint {
        Endpoint::Chat => chat_prompt(&body, model.generator)?,
        Endpoint::Completion => completion_prompt(&body, model.generator)?,
    };
    let prompt_param = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completion => "prompt",
    };
    let vocab = model.generator.model().vocab_size();
    if let Some(id) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            prompt_param,
            format!("token id {id} is out of range: the vocabulary has {vocab} tokens"),
        ));
    }
    let defaults = model.generator.default_params();
    let max_tokens =
        max_tokens(&body, &defaults, prompt_ids.len(), model.context_len).map_err(|e| {
            match e.param {
                Some(_) => e,
                None => e.param(prompt_param),
            }
        })?;
    let request = Request {
        sampling: sampling(&body, &defaults)?,
        max_tokens,
        stop_token_ids: if body.ignore_eos {
            vec![]
        } else {
            model.generator.eos_token_ids().to_vec()
        },
        stop_strings: stop_strings(body.stop.as_ref())?,
        logprobs,
        prompt_ids,
    };
    let shape = Shape {
        stream: body.stream,
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
        logprobs,
    };
    Ok((request, shape))
}

fn check_unsupported(body: &CompletionBody) -> Result<(), ApiError> {
    let set = |v: &Option<Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    let refused = [
        ("tools", set(&body.tools)),
        (
            "tool_choice",
            set(&body.tool_choice) && body.tool_choice != Some(json!("none")),
        ),
        ("functions", set(&body.functions)),
        (
            "function_call",
            set(&body.function_call) && body.function_call != Some(json!("none")),
        ),
        (
            "response_format",
            set(&body.response_format)
                && body.response_format.as_ref().map(|f| &f["type"]) != Some(&json!("text")),
        ),
        ("logit_bias", set(&body.logit_bias)),
        ("suffix", set(&body.suffix)),
        ("echo", body.echo == Some(true)),
        ("best_of", body.best_of.is_some_and(|b| b != 1)),
    ];
    match refused.iter().find(|(_, on)| *on) {
        Some((name, _)) => Err(ApiError::invalid(
            name,
            format!("the parameter `{name}` is not supported by this server"),
        )),
        None => Ok(()),
    }
}

/// Chat: `logprobs` a boolean, `top_logprobs` 0..=20 alternatives. Completions: `logprobs` the
/// number of alternatives.
fn logprobs(body: &CompletionBody, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
    let top = match (endpoint, &body.logprobs) {
        (_, None | Some(Value::Null)) => None,
        (Endpoint::Chat, Some(Value::Bool(on))) => on.then_some(body.top_logprobs.unwrap_or(0)),
        (Endpoint::Chat, Some(_)) => {
            return Err(ApiError::invalid(
                "logprobs",
                "`logprobs` must be a boolean",
            ))
        }
        (Endpoint::Completion, Some(v)) => Some(v.as_u64().ok_or_else(|| {
            ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be an integer in 0..={MAX_TOP_LOGPROBS}"),
            )
        })?),
    };
    if endpoint == Endpoint::Chat && top.is_none() && body.top_logprobs.is_some() {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    match top {
        Some(n) if n > MAX_TOP_LOGPROBS as u64 => Err(ApiError::invalid(
            if endpoint == Endpoint::Chat {
                "top_logprobs"
            } else {
                "logprobs"
            },
            format!("at most {MAX_TOP_LOGPROBS} log probabilities per token, got {n}"),
        )),
        top => Ok(top.map(|n| n as usize)),
    }
}

fn chat_prompt(body: &CompletionBody, gen: &Generator) -> Result<Vec<u32>, ApiError> {
    let messages = match &body.messages {
        None => return Err(ApiError::invalid("messages", "missing `messages`")),
        Some(m) if m.is_empty() => {
            return Err(ApiError::invalid("messages", "`messages` is empty"))
        }
        Some(m) => m,
    };
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    gen.chat_prompt_ids(&messages)
        .map_err(|e| ApiError::invalid("messages", format!("{e}")))
}

fn message(i: usize, m: &ChatMessage) -> Result<Message, ApiError> {
    let param = format!("messages[{i}]");
    let role = match m.role.as_str() {
        // OpenAI's newer name for the system role.
        "developer" => "system",
        r @ ("system" | "user" | "assistant") => r,
        r => {
            return Err(ApiError::invalid(
                &format!("{param}.role"),
                format!("unsupported role `{r}` in {param}: expected system, user or assistant"),
            ))
        }
    };
    let content = match &m.content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match (&p["type"], &p["text"]) {
                (Value::String(t), Value::String(text)) if t == "text" => Ok(text.as_str()),
                _ => Err(ApiError::invalid(
                    &format!("{param}.content"),
                    format!("{param}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"),
                )),
            })
            .collect::<Result<String, _>>()?,
        _ => {
            return Err(ApiError::invalid(
                &format!("{param}.content"),
                format!("{param}.content must be a string or a list of text parts"),
            ))
        }
    };
    Ok(Message::new(role, &content))
}

/// A string, token ids, or a list holding one of those (one prompt per request).
fn completion_prompt(body: &CompletionBody, gen: &Generator) -> Result<Vec<u32>, ApiError> {
    let bad = |msg: &str| ApiError::invalid("prompt", msg);
    let encode = |text: &str| {
        if text.is_empty() {
            return Err(bad("`prompt` is empty"));
        }
        gen.encode(text).map_err(|e| bad(&format!("{e}")))
    };
    let ids = |list: &[Value]| -> Result<Vec<u32>, ApiError> {
        list.iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| bad(&format!("`prompt`: {v} is not a token id")))
            })
            .collect()
    };
    let ids = match &body.prompt {
        None | Some(Value::Null) => return Err(bad("missing `prompt`")),
        Some(Value::String(s)) => encode(s)?,
        Some(Value::Array(list)) => match list.as_slice() {
            [] => return Err(bad("`prompt` is empty")),
            [Value::String(s)] => encode(s)?,
            [Value::Array(inner)] => ids(inner)?,
            [Value::Number(_), ..] => ids(list)?,
            _ => {
                return Err(bad(
                    "`prompt` must be a string or a list of token ids; several prompts per request are not supported",
                ))
            }
        },
        Some(_) => return Err(bad("`prompt` must be a string or a list of token ids")),
    };
    if ids.is_empty() {
        return Err(bad("`prompt` is empty"));
    }
    Ok(ids)
}

/// `max_completion_tokens` (chat's newer name) or `max_tokens`; unset, the model's default cut
/// to what the context has room for.
fn max_tokens(
    body: &CompletionBody,
    defaults: &GenerationParams,
    prompt_len: usize,
    context: usize,
) -> Result<usize, ApiError> {
    let room = context.saturating_sub(prompt_len);
    if room == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the prompt ({prompt_len} tokens) fills the model's context of {context} tokens"
            ),
        ));
    }
    let (param, asked) = match (body.max_completion_tokens, body.max_tokens) {
        (Some(n), _) => ("max_completion_tokens", n),
        (None, Some(n)) => ("max_tokens", n),
        (None, None) => return Ok(defaults.max_tokens.min(room)),
    };
    if asked == 0 {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be at least 1"),
        ));
    }
    if asked > room as u64 {
        return Err(ApiError::invalid(
            param,
            format!(
                "the prompt ({prompt_len} tokens) + `{param}` ({asked}) exceeds the model's context of {context} tokens"
            ),
        ));
    }
    Ok(asked as usize)
}

fn sampling(body: &CompletionBody, d: &GenerationParams) -> Result<SamplingParams, ApiError> {
    let in_range = |name: &str, v: Option<f64>, lo: f64, hi: f64, what: &str| match v {
        Some(x) if !(x.is_finite() && x >= lo && x <= hi) => Err(ApiError::invalid(
            name,
            format!("`{name}` must be {what}, got {x}"),
        )),
        v => Ok(v),
    };
    let temperature = in_range("temperature", body.temperature, 0.0, 2.0, "in [0, 2]")?;
    let top_p = in_range("top_p", body.top_p, f64::MIN_POSITIVE, 1.0, "in (0, 1]")?;
    let min_p = in_range("min_p", body.min_p, 0.0, 1.0, "in [0, 1]")?;
    let penalty = |name: &str, v: Option<f32>| {
        in_range(name, v.map(f64::from), -2.0, 2.0, "in [-2, 2]").map(|v| v.unwrap_or(0.0) as f32)
    };
    let presence_penalty = penalty("presence_penalty", body.presence_penalty)?;
    let frequency_penalty = penalty("frequency_penalty", body.frequency_penalty)?;
    let repeat_penalty = match body.repeat_penalty {
        Some(r) if !(r.is_finite() && r > 0.0) => {
            return Err(ApiError::invalid(
                "repeat_penalty",
                format!("`repeat_penalty` must be > 0, got {r}"),
            ))
        }
        r => r.unwrap_or(d.repeat_penalty),
    };
    let mut sampling = d.sampling_params(body.seed.map_or_else(random_seed, |s| s as u64));
    if let Some(t) = temperature {
        sampling.temperature = t;
    }
    // llama-server: top_k <= 0 is off.
    if let Some(k) = body.top_k {
        sampling.top_k = usize::try_from(k).ok().filter(|k| *k > 0);
    }
    if let Some(p) = top_p {
        sampling.top_p = Some(p).filter(|p| *p < 1.0);
    }
    if let Some(p) = min_p {
        sampling.min_p = Some(p).filter(|p| *p > 0.0);
    }
    if let Some(n) = body.repeat_last_n {
        sampling.repeat_last_n = n;
    }
    sampling.repeat_penalty = repeat_penalty;
    sampling.presence_penalty = presence_penalty;
    sampling.frequency_penalty = frequency_penalty;
    Ok(sampling)
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded per process from the OS; the clock varies it per request.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn stop_strings(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "stop",
            "`stop` must be a non-empty string or a list of them",
        )
    };
    let list = match stop {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if list.iter().any(String::is_empty) {
        return Err(bad());
    }
    Ok(list)
}

pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// The text of one token as logprobs show it (special tokens included).
pub fn token_text(gen: &Generator, id: u32) -> String {
    gen.tokenizer().decode(&[id], false).unwrap_or_default()
}

/// Log probabilities of one or more tokens, in each endpoint's format.
#[derive(Default)]
pub struct Logprobs {
    /// Chat: `content`, one entry per token.
    content: Vec<Value>,
    /// Completions: parallel lists.
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl Logprobs {
    pub fn push(&mut self, gen: &Generator, id: u32, lp: &TokenLogprob, text_offset: usize) {
        let token = token_text(gen, id);
        let top: Vec<(String, f32)> = lp
            .top
            .iter()
            .map(|(id, l)| (token_text(gen, *id), *l))
            .collect();
        self.content.push(json!({
            "token": token,
            "logprob": lp.logprob,
            "bytes": token.as_bytes(),
            "top_logprobs": top.iter().map(|(t, l)| json!({"token": t, "logprob": l, "bytes": t.as_bytes()})).collect::<Vec<_>>(),
        }));
        // Keyed by text: of tokens that decode alike (U+FFFD), the most likely one stays.
        let mut by_text = serde_json::Map::new();
        for (t, l) in top {
            by_text.entry(t).or_insert(json!(l));
        }
        self.top_logprobs.push(Value::Object(by_text));
        self.tokens.push(token);
        self.token_logprobs.push(lp.logprob);
        self.text_offset.push(text_offset);
    }

    pub fn extend(&mut self, other: Logprobs) {
        self.content.extend(other.content);
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }

    pub fn to_json(&self, endpoint: Endpoint) -> Value {
        match endpoint {
            Endpoint::Chat => json!({"content": self.content, "refusal": null}),
            Endpoint::Completion => json!({
                "tokens": self.tokens,
                "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset,
            }),
        }
    }
}

/// The identity of one response: its id, creation time and model, shared by all its chunks.
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl ResponseMeta {
    /// One streamed chunk. `role` only in chat's first chunk.
    pub fn chunk(
        &self,
        role: bool,
        text: &str,
        logprobs: Option<Value>,
        finish: Option<&str>,
        with_usage_field: bool,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (role, finish) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, Some(_)) if text.is_empty() => json!({}),
                    _ => json!({"content": text}),
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Endpoint::Completion => {
                json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        let mut chunk = self.object(true);
        chunk["choices"] = json!([choice]);
        if with_usage_field {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// The last chunk of `stream_options.include_usage`: no choices.
    pub fn usage_chunk(&self, usage: &Usage) -> Value {
        let mut chunk = self.object(true);
        chunk["choices"] = json!([]);
        chunk["usage"] = usage_json(usage);
        chunk
    }

    /// The whole response of a request that did not stream.
    pub fn response(
        &self,
        text: &str,
        logprobs: Option<Value>,
        finish: &str,
        usage: &Usage,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Endpoint::Completion => {
                json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        let mut response = self.object(false);
        response["choices"] = json!([choice]);
        response["usage"] = usage_json(usage);
        response
    }

    fn object(&self, chunk: bool) -> Value {
        let object = match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
        })
    }
}
