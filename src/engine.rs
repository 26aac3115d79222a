//! Many sequences at once: a scheduler over [`BitnetModel::forward_batch`].
//!
//! Requests come in with prompt ids and their own sampling parameters. The engine admits them
//! up to `max_batch` running sequences and a KV-cache budget (a request reserves its prompt +
//! `max_tokens` positions, so an admitted request always finishes), and runs one step at a
//! time: every running decode contributes one token, and prompts are fed in chunks from a
//! per-step token budget so that running decodes are not stalled by a long prompt. Each step
//! reads the packed weights once whatever the number of rows.
//!
//! Sequences are independent: each has its own KV cache, sampler and seed, and on the CPU its
//! logits are the same bit for bit whatever else is in the batch, so a request gets the same
//! tokens in a batch as alone. Events (tokens with their text, then one `Finished` or `Failed`)
//! go to a per-request sink; a sink that returns `false` cancels its request.
//!
//! [`Engine`] is driven by hand ([`Engine::step`]) or on its own thread ([`Engine::spawn`],
//! then [`EngineHandle`]). [`crate::Generator`] runs single sequences through the same code.

use crate::generate::{argmax, Detokenizer, GenerationParams};
use crate::model::{BitnetModel, KvCache, Logits, SeqInput};
use crate::tokenizer::Tokenizer;
use crate::{Error, ErrorKind, Generator, Result};
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

/// Prompt tokens fed per step by default; prompts are cut at multiples of it.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// At most this many alternatives per token with [`Request::logprobs`].
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Per-request sampling. The default is greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Below 1e-7: greedy (the first maximum).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    /// Divides positive (multiplies negative) logits of tokens in the last `repeat_last_n`
    /// tokens of prompt + output; 1 is off.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// OpenAI's: subtracted once from the logit of every token generated so far; 0 is off.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted per occurrence in the generated tokens; 0 is off.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::input(format!("temperature must be ≥ 0, got {t}")));
        }
        if self.top_k == Some(0) {
            return Err(Error::input("top-k must be ≥ 1"));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(Error::input(format!("top-p must be in (0, 1], got {p}")));
        }
        if let Some(p) = self.min_p.filter(|p| !(0.0..=1.0).contains(p)) {
            return Err(Error::input(format!("min-p must be in [0, 1], got {p}")));
        }
        let r = self.repeat_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(Error::input(format!("repeat penalty must be > 0, got {r}")));
        }
        for (name, v) in [
            ("presence penalty", self.presence_penalty),
            ("frequency penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::input(format!("{name} must be in [-2, 2], got {v}")));
            }
        }
        Ok(())
    }

    fn sampling(&self) -> Sampling {
        let temperature = self.temperature;
        if temperature < 1e-7 {
            return Sampling::ArgMax;
        }
        match (self.top_k, self.top_p.filter(|p| *p < 1.0)) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// New tokens at most (≥ 1).
    pub max_tokens: usize,
    /// Generation ends (finish `Eos`) at any of these; the token is not emitted.
    pub stop_token_ids: Vec<u32>,
    /// Generation ends (finish `Stop`) when the text contains one of these, matched across
    /// token boundaries; the stop string and what follows it are never emitted.
    pub stop_strings: Vec<String>,
    /// `Some(n)`: every token event carries its log-probability and the `n` most likely
    /// alternatives (n ≤ [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
}

impl Request {
    /// Greedy, 256 new tokens at most, no stops.
    pub fn new(prompt_ids: Vec<u32>) -> Self {
        Self {
            prompt_ids,
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop_token_ids: vec![],
            stop_strings: vec![],
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (EOS).
    Eos,
    /// A stop string.
    Stop,
    /// `max_tokens` new tokens.
    Length,
    Cancelled,
}

/// Log-softmax of the model's raw logits (before penalties and temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug)]
pub enum Event {
    /// One generated token. `text` is the new text it completes; it may be empty while an
    /// incomplete UTF-8 character or a possible stop-string prefix is held back.
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The last event of a request; `text` is what was held back until the end.
    Finished {
        reason: FinishReason,
        text: String,
        usage: Usage,
    },
    /// The last event of a failed request.
    Failed(Error),
}

/// Where a request's events go, on the engine's thread: it must not block. `false` means
/// nobody listens any more: the request is cancelled.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

pub type RequestId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Sequences advanced together in one step.
    pub max_batch: usize,
    /// Requests waiting for a slot; beyond it `submit` fails with [`ErrorKind::Overloaded`].
    pub max_queue: usize,
    /// KV-cache positions reserved by running requests (prompt + max_tokens each), at most.
    pub kv_budget_tokens: usize,
    /// Prompt tokens fed per step, over all prefilling sequences.
    pub prefill_chunk: usize,
}

impl EngineOptions {
    /// `max_batch` 16, `max_queue` 64, a KV budget of `max_batch` full contexts, 256-token
    /// prefill chunks.
    pub fn for_context(context: usize) -> Self {
        Self {
            max_batch: 16,
            max_queue: 64,
            kv_budget_tokens: 16 * context,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineStats {
    pub queued: usize,
    pub running: usize,
    /// KV-cache positions reserved by running requests.
    pub kv_tokens: usize,
    /// Bytes of KV cache allocated by running requests.
    pub kv_bytes: usize,
    pub steps: u64,
}

/// What a request costs the engine, known before it runs.
struct Plan {
    prompt_len: usize,
    reserved: usize,
}

/// A request in flight; `S` is where its events go.
struct Sequence<S> {
    id: RequestId,
    request: Request,
    sink: S,
    cache: KvCache,
    /// Prompt + generated tokens (the repeat-penalty window reads it).
    tokens: Vec<u32>,
    /// Sampled and emitted, not yet fed to the model.
    pending: Option<u32>,
    generated: usize,
    sampler: Sampler,
    text: TextStream,
    reserved: usize,
    /// The logits of every prompt position, when asked for ([`run_single`]).
    prompt_logits: Option<Vec<Tensor>>,
    finished: Option<FinishReason>,
    /// Forwards after the one that ended the prompt.
    decode_steps: usize,
    first_token_at: Option<Instant>,
}

impl<S: FnMut(Event) -> bool> Sequence<S> {
    fn prompt_len(&self) -> usize {
        self.request.prompt_ids.len()
    }

    fn prefilling(&self) -> bool {
        self.cache.len() < self.prompt_len()
    }

    /// Sends an event; a listener gone cancels the sequence.
    fn send(&mut self, event: Event) {
        if self.finished.is_none() && !(self.sink)(event) {
            self.finished = Some(FinishReason::Cancelled);
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len(),
            completion_tokens: self.generated,
        }
    }

    /// Samples from the logits of the last fed position and emits the token.
    fn advance(&mut self, logits: &Tensor) -> Result<()> {
        let logits = logits.to_vec1::<f32>()?;
        let (id, logprob) = self.sampler.sample(&logits, &self.tokens)?;
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
        }
        if self.request.stop_token_ids.contains(&id) {
            return self.finish(FinishReason::Eos);
        }
        self.generated += 1;
        self.tokens.push(id);
        self.sampler.count(id);
        let logprob = self
            .request
            .logprobs
            .map(|n| logprob_of(&logits, id, n.min(MAX_TOP_LOGPROBS)))
            .or(logprob);
        let (text, stopped) = self.text.push(id)?;
        self.send(Event::Token { id, text, logprob });
        if stopped {
            return self.finish(FinishReason::Stop);
        }
        if self.generated >= self.request.max_tokens {
            return self.finish(FinishReason::Length);
        }
        self.pending = Some(id);
        Ok(())
    }

    fn finish(&mut self, reason: FinishReason) -> Result<()> {
        let text = match reason {
            FinishReason::Stop | FinishReason::Cancelled => String::new(),
            FinishReason::Eos | FinishReason::Length => self.text.flush()?,
        };
        let usage = self.usage();
        self.send(Event::Finished {
            reason,
            text,
            usage,
        });
        self.finished = Some(reason);
        Ok(())
    }

    fn fail(&mut self, error: Error) {
        self.send(Event::Failed(error));
        self.finished.get_or_insert(FinishReason::Cancelled);
    }
}

/// One step over `seqs`: decodes first, then prompt chunks of at most `prefill_budget` tokens
/// in all, each ending at a multiple of `prefill_budget`.
/// Returns the number of rows run.
fn step_sequences<S: FnMut(Event) -> bool>(
    model: &BitnetModel,
    seqs: &mut [Sequence<S>],
    prefill_budget: usize,
) -> Result<usize> {
    let chunk = prefill_budget.max(1);
    let mut budget = chunk;
    // (index, ids, logits) of each participating sequence.
    let mut plan: Vec<(usize, Vec<u32>, Logits)> = vec![];
    for (i, s) in seqs.iter().enumerate() {
        if let (Some(token), None) = (s.pending, s.finished) {
            plan.push((i, vec![token], Logits::Last));
        }
    }
    for (i, s) in seqs.iter().enumerate() {
        if s.finished.is_some() || !s.prefilling() || budget == 0 {
            continue;
        }
        // Chunks end at multiples of the chunk size whatever else runs, so a prompt is cut
        // (and its logits rounded) the same way in any batch.
        let start = s.cache.len();
        let end = s
            .prompt_len()
            .min((start / chunk + 1).saturating_mul(chunk));
        if end - start > budget {
            continue;
        }
        budget -= end - start;
        let logits = if s.prompt_logits.is_some() {
            Logits::All
        } else if end == s.prompt_len() {
            Logits::Last
        } else {
            Logits::None
        };
        plan.push((i, s.request.prompt_ids[start..end].to_vec(), logits));
    }
    if plan.is_empty() {
        return Ok(0);
    }
    let rows = plan.iter().map(|(_, ids, _)| ids.len()).sum();
    let outputs = {
        let mut caches: Vec<Option<&mut KvCache>> =
            seqs.iter_mut().map(|s| Some(&mut s.cache)).collect();
        let mut inputs = Vec::with_capacity(plan.len());
        for (i, ids, logits) in &plan {
            let Some(cache) = caches[*i].take() else {
                return Err(Error::internal("a sequence was planned twice in one step"));
            };
            inputs.push(SeqInput {
                ids,
                cache,
                logits: *logits,
            });
        }
        model.forward_batch(&mut inputs)?
    };
    for ((i, _, wanted), logits) in plan.into_iter().zip(outputs) {
        let s = &mut seqs[i];
        if s.pending.take().is_some() {
            s.decode_steps += 1;
        }
        let Some(logits) = logits else { continue };
        let last = match wanted {
            Logits::All => {
                let last = logits.get(logits.dim(0)? - 1)?;
                if let Some(all) = &mut s.prompt_logits {
                    all.push(logits);
                }
                if s.prefilling() {
                    continue;
                }
                last
            }
            _ => logits,
        };
        if let Err(e) = s.advance(&last) {
            s.fail(e);
        }
    }
    Ok(rows)
}

/// The result of [`run_single`].
pub(crate) struct SingleRun {
    pub cache: KvCache,
    pub finish: FinishReason,
    pub generated: Vec<u32>,
    pub prompt_logits: Option<Tensor>,
    /// Prompt tokens fed (those not already in the cache).
    pub prefill_tokens: usize,
    pub decode_steps: usize,
    /// From the start to the first sampled token.
    pub prefill_secs: f64,
    /// From the first sampled token to the end.
    pub decode_secs: f64,
}

/// Runs one request to its end on the calling thread, starting from `cache`, which must hold
/// a prefix of the prompt (the caller checks it). The cache comes back holding every fed token.
pub(crate) fn run_single(
    model: &BitnetModel,
    tokenizer: &Arc<Tokenizer>,
    request: Request,
    cache: KvCache,
    prompt_logits: bool,
    sink: impl FnMut(Event) -> bool,
) -> Result<SingleRun> {
    check_request(
        &request,
        model.vocab_size(),
        model.max_position_embeddings(),
        usize::MAX,
    )?;
    let prefill_tokens = request.prompt_ids.len().saturating_sub(cache.len());
    let mut seq = new_sequence(0, request, sink, cache, tokenizer);
    if prompt_logits {
        seq.prompt_logits = Some(vec![]);
    }
    let start = Instant::now();
    let mut seqs = [seq];
    while seqs[0].finished.is_none() {
        step_sequences(model, &mut seqs, DEFAULT_PREFILL_CHUNK)?;
    }
    let [seq] = seqs;
    let first = seq.first_token_at.unwrap_or_else(Instant::now);
    let prompt_logits = match seq.prompt_logits {
        Some(all) if !all.is_empty() => Some(Tensor::cat(&all, 0)?),
        _ => None,
    };
    let generated = seq.tokens[seq.request.prompt_ids.len()..].to_vec();
    Ok(SingleRun {
        finish: seq.finished.unwrap_or(FinishReason::Cancelled),
        generated,
        prompt_logits,
        prefill_tokens,
        decode_steps: seq.decode_steps,
        prefill_secs: (first - start).as_secs_f64(),
        decode_secs: first.elapsed().as_secs_f64(),
        cache: seq.cache,
    })
}

fn new_sequence<S>(
    id: RequestId,
    request: Request,
    sink: S,
    cache: KvCache,
    tokenizer: &Arc<Tokenizer>,
) -> Sequence<S> {
    let sampler = Sampler::new(&request.sampling);
    let text = TextStream::new(tokenizer.clone(), request.stop_strings.clone());
    Sequence {
        id,
        tokens: request.prompt_ids.clone(),
        reserved: request.prompt_ids.len() + request.max_tokens,
        request,
        sink,
        cache,
        pending: None,
        generated: 0,
        sampler,
        text,
        prompt_logits: None,
        finished: None,
        decode_steps: 0,
        first_token_at: None,
    }
}

/// Checks a request against the model before it is queued.
fn check_request(req: &Request, vocab: usize, context: usize, kv_budget: usize) -> Result<Plan> {
    let n = req.prompt_ids.len();
    if n == 0 {
        return Err(Error::input("the prompt is empty"));
    }
    if let Some(id) = req.prompt_ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::input(format!(
            "prompt token id {id} is out of range: the vocabulary has {vocab} tokens (0..{vocab})"
        )));
    }
    if req.max_tokens == 0 {
        return Err(Error::input("max_tokens must be ≥ 1"));
    }
    let reserved = n.saturating_add(req.max_tokens);
    if reserved > context {
        return Err(Error::input(format!(
            "the prompt ({n} tokens) + max_tokens ({}) exceeds the model's context of {context} positions",
            req.max_tokens
        )));
    }
    if reserved > kv_budget {
        return Err(Error::input(format!(
            "the prompt ({n} tokens) + max_tokens ({}) exceeds the engine's KV-cache budget of {kv_budget} positions",
            req.max_tokens
        )));
    }
    if let Some(n) = req.logprobs.filter(|n| *n > MAX_TOP_LOGPROBS) {
        return Err(Error::input(format!(
            "top logprobs must be ≤ {MAX_TOP_LOGPROBS}, got {n}"
        )));
    }
    if req.stop_strings.iter().any(String::is_empty) {
        return Err(Error::input("stop strings must not be empty"));
    }
    req.sampling.validate()?;
    Ok(Plan {
        prompt_len: n,
        reserved,
    })
}

struct Waiting {
    id: RequestId,
    request: Request,
    sink: Sink,
    plan: Plan,
}

/// The scheduler: a queue, the running sequences, the model they share.
pub struct Engine {
    model: Arc<BitnetModel>,
    tokenizer: Arc<Tokenizer>,
    opts: EngineOptions,
    waiting: VecDeque<Waiting>,
    running: Vec<Sequence<Sink>>,
    next_id: RequestId,
    steps: u64,
}

impl Engine {
    /// An engine over a loaded generator's model and tokenizer (the weights are shared).
    pub fn new(generator: &Generator, opts: EngineOptions) -> Self {
        Self::with_model(
            generator.model().clone(),
            generator.shared_tokenizer(),
            opts,
        )
    }

    pub fn with_model(
        model: Arc<BitnetModel>,
        tokenizer: Arc<Tokenizer>,
        opts: EngineOptions,
    ) -> Self {
        let opts = EngineOptions {
            max_batch: opts.max_batch.max(1),
            prefill_chunk: opts.prefill_chunk.max(1),
            ..opts
        };
        Self {
            model,
            tokenizer,
            opts,
            waiting: VecDeque::new(),
            running: vec![],
            next_id: 0,
            steps: 0,
        }
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// Queues a request; it runs as [`Self::step`] is called.
    pub fn submit(&mut self, request: Request, sink: Sink) -> Result<RequestId> {
        let plan = self.check(&request)?;
        if self.waiting.len() >= self.opts.max_queue {
            return Err(Error::new(
                ErrorKind::Overloaded,
                format!(
                    "the queue is full ({} requests waiting)",
                    self.waiting.len()
                ),
            ));
        }
        self.next_id += 1;
        let id = self.next_id;
        self.enqueue(id, request, sink, plan);
        Ok(id)
    }

    fn check(&self, request: &Request) -> Result<Plan> {
        check_request(
            request,
            self.model.vocab_size(),
            self.model.max_position_embeddings(),
            self.opts.kv_budget_tokens,
        )
    }

    fn enqueue(&mut self, id: RequestId, request: Request, sink: Sink, plan: Plan) {
        self.waiting.push_back(Waiting {
            id,
            request,
            sink,
            plan,
        });
    }

    /// Cancels a queued or running request: its sink gets `Finished { Cancelled }` and its
    /// cache is freed at once.
    pub fn cancel(&mut self, id: RequestId) {
        if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            if let Some(mut w) = self.waiting.remove(i) {
                (w.sink)(Event::Finished {
                    reason: FinishReason::Cancelled,
                    text: String::new(),
                    usage: Usage {
                        prompt_tokens: w.plan.prompt_len,
                        completion_tokens: 0,
                    },
                });
            }
        }
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            // Errors only come from flushing text, which cancelling does not do.
            let _ = s.finish(FinishReason::Cancelled);
        }
        self.retire();
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            queued: self.waiting.len(),
            running: self.running.len(),
            kv_tokens: self.running.iter().map(|s| s.reserved).sum(),
            kv_bytes: self.running.iter().map(|s| s.cache.bytes()).sum(),
            steps: self.steps,
        }
    }

    /// Admits what fits, runs one batched step, retires what finished. Returns the rows run.
    /// A failing step fails the requests that were in it, not the engine.
    pub fn step(&mut self) -> usize {
        self.admit();
        if self.running.is_empty() {
            return 0;
        }
        let (model, budget) = (&self.model, self.opts.prefill_chunk);
        let running = &mut self.running;
        let outcome = catch_unwind(AssertUnwindSafe(|| step_sequences(model, running, budget)));
        let rows = match outcome {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                self.fail_running(&e.to_string(), e.kind());
                0
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                self.fail_running(&format!("internal error: {what}"), ErrorKind::Internal);
                0
            }
        };
        self.steps += 1;
        self.retire();
        rows
    }

    fn fail_running(&mut self, message: &str, kind: ErrorKind) {
        for s in &mut self.running {
            s.fail(Error::new(kind, message));
        }
    }

    fn admit(&mut self) {
        let mut reserved: usize = self.running.iter().map(|s| s.reserved).sum();
        while self.running.len() < self.opts.max_batch {
            let Some(w) = self.waiting.front() else { break };
            if reserved + w.plan.reserved > self.opts.kv_budget_tokens {
                break;
            }
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            reserved += w.plan.reserved;
            let cache = self.model.new_kv_cache();
            self.running.push(new_sequence(
                w.id,
                w.request,
                w.sink,
                cache,
                &self.tokenizer,
            ));
        }
    }

    fn retire(&mut self) {
        self.running.retain(|s| s.finished.is_none());
    }

    /// Runs the engine on its own thread until [`EngineHandle::shutdown`] or until every
    /// handle is dropped.
    pub fn spawn(self) -> EngineHandle {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            vocab: self.model.vocab_size(),
            context: self.model.max_position_embeddings(),
            opts: self.opts.clone(),
            next_id: AtomicU64::new(1),
            queued: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            kv_tokens: AtomicUsize::new(0),
            kv_bytes: AtomicUsize::new(0),
            steps: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bitnet-engine".into())
            .spawn(move || self.serve(rx, &thread_shared));
        EngineHandle {
            tx,
            shared,
            spawned: thread.is_ok(),
        }
    }

    fn serve(mut self, rx: mpsc::Receiver<Command>, shared: &Shared) {
        // Waiting requests the handles' counter includes: handles count a request up when
        // they send it, the engine counts it down when it leaves the queue. (Storing the
        // queue's length instead would undo the count of a request still in the channel.)
        let mut counted = 0;
        loop {
            let command = if self.is_idle() {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.cancel_all();
                        return;
                    }
                }
            };
            match command {
                Some(Command::Submit(id, request, sink, plan)) => {
                    self.enqueue(id, *request, sink, plan);
                    counted += 1;
                    continue;
                }
                Some(Command::Cancel(id)) => self.cancel(id),
                Some(Command::Shutdown) => {
                    self.cancel_all();
                    shared.queued.fetch_sub(counted, Ordering::Relaxed);
                    shared.publish(&self.stats());
                    return;
                }
                None => {
                    self.step();
                }
            }
            let left = counted - self.waiting.len().min(counted);
            shared.queued.fetch_sub(left, Ordering::Relaxed);
            counted -= left;
            shared.publish(&self.stats());
        }
    }

    fn cancel_all(&mut self) {
        let ids: Vec<_> = self
            .waiting
            .iter()
            .map(|w| w.id)
            .chain(self.running.iter().map(|s| s.id))
            .collect();
        for id in ids {
            self.cancel(id);
        }
    }
}

enum Command {
    Submit(RequestId, Box<Request>, Sink, Plan),
    Cancel(RequestId),
    Shutdown,
}

/// What handles read without asking the engine thread.
struct Shared {
    vocab: usize,
    context: usize,
    opts: EngineOptions,
    next_id: AtomicU64,
    /// Submitted and not yet admitted (handles count up, the engine counts down).
    queued: AtomicUsize,
    running: AtomicUsize,
    kv_tokens: AtomicUsize,
    kv_bytes: AtomicUsize,
    steps: AtomicU64,
}

impl Shared {
    fn publish(&self, s: &EngineStats) {
        self.running.store(s.running, Ordering::Relaxed);
        self.kv_tokens.store(s.kv_tokens, Ordering::Relaxed);
        self.kv_bytes.store(s.kv_bytes, Ordering::Relaxed);
        self.steps.store(s.steps, Ordering::Relaxed);
    }
}

/// A handle on an engine running on its own thread; cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    spawned: bool,
}

impl EngineHandle {
    /// Queues a request; `sink` gets its events on the engine thread. Fails at once, queueing
    /// nothing, on a bad request ([`ErrorKind::Input`]) or a full queue
    /// ([`ErrorKind::Overloaded`]).
    pub fn submit(
        &self,
        request: Request,
        sink: impl FnMut(Event) -> bool + Send + 'static,
    ) -> Result<RequestId> {
        let s = &self.shared;
        let plan = check_request(&request, s.vocab, s.context, s.opts.kv_budget_tokens)?;
        let queued = s.queued.fetch_add(1, Ordering::Relaxed);
        if queued >= s.opts.max_queue {
            s.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::new(
                ErrorKind::Overloaded,
                format!("the queue is full ({queued} requests waiting)"),
            ));
        }
        let id = s.next_id.fetch_add(1, Ordering::Relaxed);
        let command = Command::Submit(id, Box::new(request), Box::new(sink), plan);
        if !self.spawned || self.tx.send(command).is_err() {
            return Err(Error::internal("the engine is not running"));
        }
        Ok(id)
    }

    /// Cancels a request; its sink then receives `Finished { Cancelled }`.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    pub fn stats(&self) -> EngineStats {
        let s = &self.shared;
        EngineStats {
            queued: s.queued.load(Ordering::Relaxed),
            running: s.running.load(Ordering::Relaxed),
            kv_tokens: s.kv_tokens.load(Ordering::Relaxed),
            kv_bytes: s.kv_bytes.load(Ordering::Relaxed),
            steps: s.steps.load(Ordering::Relaxed),
        }
    }

    /// Cancels everything and stops the engine thread.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

/// One request's sampler: its own RNG, penalties, min-p.
struct Sampler {
    processor: LogitsProcessor,
    params: SamplingParams,
    greedy: bool,
    /// Generated tokens and their counts, for the presence and frequency penalties.
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// `params` were validated with the request.
    fn new(params: &SamplingParams) -> Self {
        let sampling = params.sampling();
        Self {
            greedy: matches!(sampling, Sampling::ArgMax),
            processor: LogitsProcessor::from_sampling(params.seed, sampling),
            params: params.clone(),
            counts: HashMap::new(),
        }
    }

    fn count(&mut self, id: u32) {
        *self.counts.entry(id).or_default() += 1;
    }

    /// The next token from raw logits, after penalties, min-p, temperature, top-k/p.
    fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<(u32, Option<TokenLogprob>)> {
        if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
            return Err(Error::model(format!(
                "the model produced non-finite logits ({} for token {i}): the weights are corrupt",
                logits[i]
            )));
        }
        let p = &self.params;
        // Copied only when a penalty changes them.
        let mut logits = std::borrow::Cow::Borrowed(logits);
        if p.repeat_penalty != 1.0 {
            let logits = logits.to_mut();
            let window = &history[history.len().saturating_sub(p.repeat_last_n)..];
            let mut seen = std::collections::HashSet::new();
            for &id in window {
                if let Some(l) = logits.get_mut(id as usize).filter(|_| seen.insert(id)) {
                    *l = if *l >= 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let logits = logits.to_mut();
            for (&id, &n) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(Error::input(format!(
                "the repeat penalty {} (presence {}, frequency {}) produced non-finite logits: a generation parameter is out of range",
                p.repeat_penalty, p.presence_penalty, p.frequency_penalty
            )));
        }
        if self.greedy {
            let id = argmax(&logits).ok_or_else(|| Error::internal("empty logits"))?;
            return Ok((id, None));
        }
        let n = logits.len();
        let logits = Tensor::from_vec(logits.into_owned(), n, &Device::Cpu)?;
        let id = match p.min_p.filter(|p| *p > 0.0) {
            // Relative to the most likely token after temperature, so its order with top-k /
            // top-p (which keep the most likely tokens) does not matter.
            Some(min_p) => self.processor.sample_f(&logits, |prs| {
                let max = prs.iter().copied().fold(0f32, f32::max);
                let floor = min_p as f32 * max;
                prs.iter_mut()
                    .filter(|p| **p < floor)
                    .for_each(|p| *p = 0.0);
            })?,
            None => self.processor.sample(&logits)?,
        };
        Ok((id, None))
    }
}

/// `log_softmax(logits)[id]` and the `n` most likely tokens.
fn logprob_of(logits: &[f32], id: u32, n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
    let mut top: Vec<(u32, f32)> = vec![];
    if n > 0 {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let n = n.min(order.len());
        order.select_nth_unstable_by(n.saturating_sub(1), |a, b| {
            logits[*b as usize].total_cmp(&logits[*a as usize])
        });
        order.truncate(n);
        order.sort_by(|a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        top = order
            .into_iter()
            .map(|i| (i, logits[i as usize] - log_sum))
            .collect();
    }
    TokenLogprob {
        logprob: logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |v| v - log_sum),
        top,
    }
}

/// A sequence's text: incremental detokenization, with stop strings matched across token
/// boundaries and never emitted.
struct TextStream {
    tokenizer: Arc<Tokenizer>,
    detokenizer: Detokenizer,
    stop_strings: Vec<String>,
    /// Decoded, not yet emitted: it may be the start of a stop string.
    held: String,
}

impl TextStream {
    fn new(tokenizer: Arc<Tokenizer>, stop_strings: Vec<String>) -> Self {
        Self {
            tokenizer,
            detokenizer: Detokenizer::default(),
            stop_strings,
            held: String::new(),
        }
    }

    /// The text to emit after `id`, and whether a stop string was reached.
    fn push(&mut self, id: u32) -> Result<(String, bool)> {
        let piece = self.detokenizer.next_token(self.tokenizer.inner(), id)?;
        self.held.push_str(&piece.unwrap_or_default());
        if let Some(at) = self
            .stop_strings
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(at);
            return Ok((std::mem::take(&mut self.held), true));
        }
        // Hold back the longest suffix that could still grow into a stop string.
        let keep = self
            .stop_strings
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let emit = self.held.len() - keep;
        let rest = self.held.split_off(emit);
        Ok((std::mem::replace(&mut self.held, rest), false))
    }

    /// Everything still held back, at the end of the generation.
    fn flush(&mut self) -> Result<String> {
        let tail = self.detokenizer.flush(self.tokenizer.inner())?;
        self.held.push_str(&tail.unwrap_or_default());
        Ok(std::mem::take(&mut self.held))
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`, on a char
/// boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

impl GenerationParams {
    /// The engine's sampling settings for these parameters, with `seed` for the RNG.
    pub fn sampling_params(&self, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_prefix_holds_back_only_what_can_grow_into_a_stop() {
        assert_eq!(longest_suffix_prefix("hello wor", "world"), 3);
        assert_eq!(longest_suffix_prefix("hello", "world"), 0);
        assert_eq!(longest_suffix_prefix("abcab", "abc"), 2);
        // A complete match is found by `find`, not held back here.
        assert_eq!(longest_suffix_prefix("xabc", "abc"), 0);
        assert_eq!(longest_suffix_prefix("é", "éa"), "é".len());
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_most_likely_first() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lp = logprob_of(&logits, 2, 3);
        let z: f32 = logits.iter().map(|v| v.exp()).sum();
        assert!((lp.logprob - (2f32.exp() / z).ln()).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2]);
    }
}
