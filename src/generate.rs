//! Text generation around [`crate::BitnetModel`]: tokenizer, chat template, generation
//! defaults, streaming detokenization and timing; one sequence at a time ([`Generator`]),
//! through the same stepping code as the batching [`crate::engine`].
//!
//! - Raw prompts are tokenized with the tokenizer's own special-token rules (the Llama 3
//!   post-processor of 2B-4T prepends `<|begin_of_text|>`); chat prompts are rendered from
//!   `tokenizer_config.json`'s `chat_template` with minijinja and tokenized without added
//!   specials, as `transformers`' `apply_chat_template` does (the template writes the BOS).
//! - Sampling (in [`crate::engine`]) reuses candle-transformers' `LogitsProcessor` (temperature,
//!   top-k, top-p) plus greedy first-maximum, min-p and penalties; defaults come from
//!   `generation_config.json`.
//! - Generation stops on every EOS id of `generation_config.json` (2B-4T: 128001, 128009).

use crate::engine::{run_single, Event, FinishReason, Request};
use crate::generation_config::GenerationConfig;
use crate::hub::ModelFiles;
use crate::model::{BitnetModel, KvCache};
pub use crate::template::{ChatTemplate, Message};
use crate::tokenizer::{decode, Tokenizer};
use crate::{fail, Error, ErrorKind, LoadOptions, Result};
use crate::{weights, Config};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// Sampling and stopping settings of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// New tokens at most.
    pub max_tokens: usize,
    /// Softmax temperature; below 1e-7 is greedy (argmax).
    pub temperature: f64,
    /// Sample among the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f64>,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: Option<f64>,
    /// Divides positive (multiplies negative) logits of tokens seen in the window; 1 is off.
    pub repeat_penalty: f32,
    /// The repeat-penalty window: the last `n` tokens of prompt + output.
    pub repeat_last_n: usize,
    /// RNG seed; `None` seeds from the clock.
    pub seed: Option<u64>,
    /// Keep going past EOS tokens.
    pub ignore_eos: bool,
    /// When prompt + `max_tokens` exceeds the context, stop when it is full instead of failing.
    pub truncate: bool,
    /// Also return the logits of every prompt position ([`Generation::prompt_logits`]).
    pub prompt_logits: bool,
}

/// `transformers`' defaults without a `generation_config.json`: greedy.
impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
            ignore_eos: false,
            truncate: false,
            prompt_logits: false,
        }
    }
}

impl GenerationParams {
    pub fn validate(&self) -> Result<()> {
        self.sampling_params(0).validate()
    }
}

/// Incremental detokenizer: text pieces for a growing list of token ids that never end inside
/// a multi-byte character. A character split across tokens decodes to U+FFFD until its last
/// byte arrives, so pieces ending in U+FFFD wait (for at most 3 more tokens: a UTF-8 character
/// has at most 4 bytes; longer runs are invalid bytes and are let through as U+FFFD).
pub struct TokenOutputStream<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    state: Detokenizer,
}

impl<'a> TokenOutputStream<'a> {
    pub fn new(tokenizer: &'a tokenizers::Tokenizer) -> Self {
        Self {
            tokenizer,
            state: Detokenizer::default(),
        }
    }

    /// The text `id` completes, if any.
    pub fn next_token(&mut self, id: u32) -> Result<Option<String>> {
        self.state.next_token(self.tokenizer, id)
    }

    /// Whatever is still held back (an incomplete character at the end of the output).
    pub fn flush(&mut self) -> Result<Option<String>> {
        self.state.flush(self.tokenizer)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        decode(self.tokenizer, ids)
    }
}

/// [`TokenOutputStream`]'s state, for owners that keep the tokenizer elsewhere.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    tokens: Vec<u32>,
    /// `tokens[prev..current]` were emitted and are kept as decoding context for the next piece.
    prev: usize,
    current: usize,
}

impl Detokenizer {
    pub fn next_token(
        &mut self,
        tokenizer: &tokenizers::Tokenizer,
        id: u32,
    ) -> Result<Option<String>> {
        self.tokens.push(id);
        let pending = self.tokens.len() - self.current;
        let text = decode(tokenizer, &self.tokens[self.prev..])?;
        if text.ends_with(char::REPLACEMENT_CHARACTER) && pending < 4 {
            return Ok(None);
        }
        self.advance(tokenizer, &text)
    }

    pub fn flush(&mut self, tokenizer: &tokenizers::Tokenizer) -> Result<Option<String>> {
        let text = decode(tokenizer, &self.tokens[self.prev..])?;
        self.advance(tokenizer, &text)
    }

    /// The part of `text` (the decoding of `tokens[prev..]`) not emitted yet.
    fn advance(&mut self, tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Option<String>> {
        let emitted = decode(tokenizer, &self.tokens[self.prev..self.current])?;
        let start = emitted.len();
        self.prev = self.current;
        self.current = self.tokens.len();
        Ok((text.len() > start && text.is_char_boundary(start)).then(|| text[start..].to_string()))
    }
}

/// The index of the first maximum (greedy decoding picks the first of equal logits, as torch
/// does), or `None` when empty.
pub fn argmax(values: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    /// The context was full (only with [`GenerationParams::truncate`]).
    ContextFull,
}

/// The result of one generation, with its timing.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// New tokens, without the EOS that stopped them.
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    /// Prompt tokens run through the model (fewer than the prompt when the KV cache of the
    /// previous chat turn covered the rest).
    pub prefill_tokens: usize,
    /// The prefill forward pass and the first sample.
    pub prefill_secs: f64,
    /// Single-token forward passes after the prefill, each followed by one sample.
    pub decode_tokens: usize,
    pub decode_secs: f64,
    /// `[prompt_len, vocab]` f32, when asked for with [`GenerationParams::prompt_logits`].
    pub prompt_logits: Option<Tensor>,
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_secs)
    }
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_tokens, self.decode_secs)
    }
}

fn rate(tokens: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        tokens as f64 / secs
    } else {
        0.0
    }
}

/// A loaded model with its tokenizer, chat template and generation defaults.
pub struct Generator {
    model: Arc<BitnetModel>,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    eos_token_ids: Vec<u32>,
    defaults: GenerationParams,
    name: String,
    /// Keys and values of `cached`, kept across calls (chat turns).
    cache: KvCache,
    /// The tokens whose keys and values are in `cache`, in order.
    cached: Vec<u32>,
    /// The last chat turn, to continue from the tokens the model produced.
    last_turn: Option<Turn>,
}

struct Turn {
    /// Messages of the conversation once the reply is appended.
    messages: usize,
    reply: String,
    prompt_ids: Vec<u32>,
    reply_ids: Vec<u32>,
}

/// Stands for the last reply when rendering a conversation to find the text after it.
const REPLY_MARKER: &str = "\u{1}bitnet-reply\u{1}";

impl Generator {
    /// Loads `model` (a hub id, fetched at `revision`, or a directory) onto `device`.
    pub fn from_pretrained(model: &str, revision: &str, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(model, revision, &LoadOptions::new(device))
    }

    /// Like [`Self::from_pretrained`], loaded as `opts` says (device, dtype, head).
    pub fn from_pretrained_with(model: &str, revision: &str, opts: &LoadOptions) -> Result<Self> {
        // Before a download that could only end in this error.
        opts.head.check_device(&opts.device.location())?;
        let files = ModelFiles::resolve(model, revision).map_err(model_fault)?;
        Self::load_with(&files, opts)
    }

    /// Loads resolved files onto `device`, in [`crate::device::compute_dtype`].
    pub fn load(files: &ModelFiles, device: &Device) -> Result<Self> {
        Self::load_with(files, &LoadOptions::new(device))
    }

    /// Loads resolved files as `opts` says. Failures are the model's ([`ErrorKind::Model`])
    /// unless they are the device's.
    pub fn load_with(files: &ModelFiles, opts: &LoadOptions) -> Result<Self> {
        Self::load_files(files, opts).map_err(model_fault)
    }

    fn load_files(files: &ModelFiles, opts: &LoadOptions) -> Result<Self> {
        let cfg = Config::from_file(&files.config)?;
        // Tokenizer first: a broken one should fail before gigabytes of weights are mapped.
        let tokenizer = Tokenizer::from_file(&files.tokenizer)?;
        let template = match &files.tokenizer_config {
            Some(p) => ChatTemplate::from_tokenizer_config(p)?,
            None => None,
        };
        let gen_cfg = match &files.generation_config {
            Some(p) => GenerationConfig::from_file(p)?,
            None => GenerationConfig::default(),
        };
        let eos_token_ids = gen_cfg
            .eos_token_ids()
            .unwrap_or_else(|| cfg.eos_token_ids());
        let model = weights::load_model(&cfg, &files.weights, opts)?;
        Ok(Self {
            cache: model.new_kv_cache(),
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            template,
            eos_token_ids,
            defaults: gen_cfg.params(),
            name: files.name.clone(),
            cached: vec![],
            last_turn: None,
        })
    }

    /// The hub id or directory the model came from.
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn device(&self) -> &Device {
        self.model.device()
    }
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        self.tokenizer.inner()
    }
    pub fn shared_tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }
    /// The shared weights.
    pub fn model(&self) -> &Arc<BitnetModel> {
        &self.model
    }
    /// Positions the model can hold: prompt + generated tokens.
    pub fn context_len(&self) -> usize {
        self.model.max_position_embeddings()
    }
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }
    /// The defaults of `generation_config.json`.
    pub fn default_params(&self) -> GenerationParams {
        self.defaults.clone()
    }

    /// Tokenizes a raw prompt with the tokenizer's special-token rules (e.g. a BOS in front).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenize(prompt, true)
    }

    fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        if text.is_empty() {
            fail!(Input, "the prompt is empty")
        }
        let ctx = self.model.max_position_embeddings();
        self.tokenizer.encode(text, add_special_tokens, ctx)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids)
    }

    /// The chat template applied to `messages`, ending with the assistant's turn, tokenized
    /// without added special tokens (the template writes them).
    pub fn chat_prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let Some(template) = &self.template else {
            fail!(
                Input,
                "{} has no chat_template in tokenizer_config.json",
                self.name
            )
        };
        self.tokenize(&template.render(messages, true)?, false)
    }

    /// Raw completion of `prompt`; returns the new text.
    pub fn generate(&mut self, prompt: &str, params: &GenerationParams) -> Result<String> {
        Ok(self.generate_stream(prompt, params, |_| Ok(()))?.text)
    }

    /// Raw completion of `prompt`, calling `on_text` with each new piece of text as it is decoded.
    pub fn generate_stream(
        &mut self,
        prompt: &str,
        params: &GenerationParams,
        on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        let ids = self.encode(prompt)?;
        self.generate_ids(&ids, params, on_text)
    }

    /// Generates after exactly `prompt_ids`, from an empty KV cache.
    pub fn generate_ids(
        &mut self,
        prompt_ids: &[u32],
        params: &GenerationParams,
        on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        self.reset();
        self.run(prompt_ids, params, on_text)
    }

    /// The assistant's reply to `messages`. When they extend the previous call's conversation
    /// by its reply and new messages, the KV cache is kept and only the new messages are
    /// prefilled.
    pub fn chat(
        &mut self,
        messages: &[Message],
        params: &GenerationParams,
        on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        let ids = match self.continuation(messages)? {
            Some(ids) => ids,
            None => self.chat_prompt_ids(messages)?,
        };
        let out = self.run(&ids, params, on_text)?;
        self.last_turn = Some(Turn {
            messages: messages.len() + 1,
            reply: out.text.clone(),
            prompt_ids: out.prompt_ids.clone(),
            reply_ids: out.generated_ids.clone(),
        });
        Ok(out)
    }

    /// The last turn's prompt and reply ids as the model produced them, followed by the tokens
    /// of what the template renders after the reply. Re-tokenizing the reply instead would
    /// often differ (templates trim it; sampled tokens need not be the canonical BPE) and
    /// force a full prefill.
    fn continuation(&self, messages: &[Message]) -> Result<Option<Vec<u32>>> {
        let (Some(turn), Some(template)) = (&self.last_turn, &self.template) else {
            return Ok(None);
        };
        let n = turn.messages;
        if messages.len() <= n || messages[n - 1] != Message::assistant(&turn.reply) {
            return Ok(None);
        }
        let mut marked = messages.to_vec();
        marked[n - 1].content = REPLY_MARKER.into();
        let rendered = template.render(&marked, true)?;
        let Some((before, after)) = rendered.split_once(REPLY_MARKER) else {
            return Ok(None);
        };
        if before.is_empty() || after.is_empty() || self.tokenize(before, false)? != turn.prompt_ids
        {
            return Ok(None);
        }
        let after = self.tokenize(after, false)?;
        Ok(Some(
            [&turn.prompt_ids[..], &turn.reply_ids, &after].concat(),
        ))
    }

    /// Forgets the KV cache (a new conversation).
    pub fn reset(&mut self) {
        self.cache.clear();
        self.cached.clear();
        self.last_turn = None;
    }

    fn run(
        &mut self,
        ids: &[u32],
        params: &GenerationParams,
        on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        let out = self.run_inner(ids, params, on_text);
        // An error may leave the cache out of step with `cached`.
        if out.is_err() {
            self.reset();
        }
        out
    }

    fn check_prompt(&self, ids: &[u32], params: &GenerationParams) -> Result<usize> {
        if ids.is_empty() {
            fail!(Input, "the prompt is empty")
        }
        let vocab = self.model.vocab_size();
        if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
            fail!(Input, "prompt token id {id} is out of range: the vocabulary has {vocab} tokens (0..{vocab})")
        }
        let ctx = self.model.max_position_embeddings();
        let (n, max) = (ids.len(), params.max_tokens);
        if n.checked_add(max).is_some_and(|total| total <= ctx) {
            Ok(max)
        } else if params.truncate && n < ctx {
            Ok(ctx - n)
        } else {
            fail!(
                Input,
                "the prompt ({n} tokens) + max-tokens ({max}) exceeds the model's context of {ctx} positions; lower --max-tokens, shorten the prompt, or pass --truncate to stop when the context is full"
            )
        }
    }

    fn run_inner(
        &mut self,
        ids: &[u32],
        params: &GenerationParams,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        params.validate()?;
        let max_new = self.check_prompt(ids, params)?;
        // Reuse the cache only when it is a strict prefix of the new prompt: it cannot be cut.
        if params.prompt_logits || self.cached.len() >= ids.len() || !ids.starts_with(&self.cached)
        {
            self.reset();
        }
        let request = Request {
            prompt_ids: ids.to_vec(),
            sampling: params.sampling_params(params.seed.unwrap_or_else(clock_seed)),
            max_tokens: max_new,
            stop_token_ids: match params.ignore_eos {
                true => vec![],
                false => self.eos_token_ids.clone(),
            },
            stop_strings: vec![],
            logprobs: None,
        };
        let mut failure = None;
        let sink = |event: Event| {
            let (text, error) = match event {
                Event::Token { text, .. } | Event::Finished { text, .. } => (text, None),
                Event::Failed(e) => (String::new(), Some(e)),
            };
            let error = error.or_else(|| {
                (!text.is_empty())
                    .then(|| on_text(&text))
                    .and_then(Result::err)
            });
            let ok = error.is_none();
            failure = failure.take().or(error);
            ok
        };
        let cache = std::mem::replace(&mut self.cache, self.model.new_kv_cache());
        let run = run_single(
            &self.model,
            &self.tokenizer,
            request,
            cache,
            params.prompt_logits,
            sink,
        )?;
        if let Some(e) = failure {
            return Err(e);
        }
        self.cached = [ids, &run.generated].concat();
        self.cached.truncate(run.cache.len());
        self.cache = run.cache;
        let stop = match run.finish {
            FinishReason::Eos => StopReason::Eos,
            _ if max_new < params.max_tokens => StopReason::ContextFull,
            _ => StopReason::MaxTokens,
        };
        Ok(Generation {
            prompt_ids: ids.to_vec(),
            text: self.decode(&run.generated)?,
            generated_ids: run.generated,
            stop,
            prefill_tokens: run.prefill_tokens,
            prefill_secs: run.prefill_secs,
            decode_tokens: run.decode_steps,
            decode_secs: run.decode_secs,
            prompt_logits: run.prompt_logits,
        })
    }
}

/// A failure while finding or loading a model is the model's, unless a kind says otherwise.
fn model_fault(e: impl Into<Error>) -> Error {
    let e = e.into();
    match e.kind() {
        ErrorKind::Internal => e.with_kind(ErrorKind::Model),
        _ => e,
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
