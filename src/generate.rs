//! Text generation around [`BitnetForCausalLM`]: tokenizer, chat template, sampling, the
//! prefill + decode loop, streaming detokenization and timing.
//!
//! - Raw prompts are tokenized with the tokenizer's own special-token rules (the Llama 3
//!   post-processor of 2B-4T prepends `<|begin_of_text|>`); chat prompts are rendered from
//!   `tokenizer_config.json`'s `chat_template` with minijinja and tokenized without added
//!   specials, as `transformers`' `apply_chat_template` does (the template writes the BOS).
//! - Sampling reuses candle-transformers' [`LogitsProcessor`] (greedy, temperature, top-k, top-p)
//!   plus min-p and a windowed repeat penalty; defaults come from `generation_config.json`.
//! - Generation stops on every EOS id of `generation_config.json` (2B-4T: 128001, 128009).

use crate::generation_config::GenerationConfig;
use crate::hub::ModelFiles;
pub use crate::template::{ChatTemplate, Message};
use crate::{device, tokenizer, weights, BitnetForCausalLM, Config};
use candle_core::{bail, Device, Result, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::utils::apply_repeat_penalty;
use std::time::Instant;
use tokenizers::Tokenizer;

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
        let Self {
            temperature: t,
            top_k,
            top_p,
            min_p,
            repeat_penalty: r,
            ..
        } = self;
        if !(t.is_finite() && *t >= 0.0) {
            bail!("temperature must be ≥ 0, got {t}")
        }
        if *top_k == Some(0) {
            bail!("top-k must be ≥ 1")
        }
        if let Some(p) = top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            bail!("top-p must be in (0, 1], got {p}")
        }
        if let Some(p) = min_p.filter(|p| !(0.0..=1.0).contains(p)) {
            bail!("min-p must be in [0, 1], got {p}")
        }
        if !(r.is_finite() && *r > 0.0) {
            bail!("repeat penalty must be > 0, got {r}")
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

/// Incremental detokenizer: text pieces for a growing list of token ids that never end inside
/// a multi-byte character. A character split across tokens decodes to U+FFFD until its last
/// byte arrives, so pieces ending in U+FFFD wait (for at most 3 more tokens: a UTF-8 character
/// has at most 4 bytes; longer runs are invalid bytes and are let through as U+FFFD).
pub struct TokenOutputStream<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    /// `tokens[prev..current]` were emitted and are kept as decoding context for the next piece.
    prev: usize,
    current: usize,
}

impl<'a> TokenOutputStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            tokens: vec![],
            prev: 0,
            current: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(tokenizer::decode(self.tokenizer, ids)?)
    }

    /// The text `id` completes, if any.
    pub fn next_token(&mut self, id: u32) -> Result<Option<String>> {
        self.tokens.push(id);
        let pending = self.tokens.len() - self.current;
        let text = self.decode(&self.tokens[self.prev..])?;
        if text.ends_with(char::REPLACEMENT_CHARACTER) && pending < 4 {
            return Ok(None);
        }
        let piece = self.piece(&text)?;
        self.prev = self.current;
        self.current = self.tokens.len();
        Ok(piece)
    }

    /// Whatever is still held back (an incomplete character at the end of the output).
    pub fn flush(&mut self) -> Result<Option<String>> {
        let text = self.decode(&self.tokens[self.prev..])?;
        let piece = self.piece(&text)?;
        self.prev = self.current;
        self.current = self.tokens.len();
        Ok(piece)
    }

    fn piece(&self, text: &str) -> Result<Option<String>> {
        let emitted = self.decode(&self.tokens[self.prev..self.current])?;
        let start = emitted.len();
        Ok((text.len() > start && text.is_char_boundary(start)).then(|| text[start..].to_string()))
    }
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
    model: BitnetForCausalLM,
    tokenizer: tokenizer::Tokenizer,
    template: Option<ChatTemplate>,
    eos_token_ids: Vec<u32>,
    defaults: GenerationParams,
    name: String,
    /// The tokens whose keys and values are in the model's KV cache, in order.
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
    pub fn from_pretrained(model: &str, revision: &str, device: &Device) -> crate::Result<Self> {
        Self::load(&ModelFiles::resolve(model, revision)?, device)
    }

    /// Loads resolved files onto `device`, in [`device::compute_dtype`].
    pub fn load(files: &ModelFiles, device: &Device) -> crate::Result<Self> {
        let cfg = Config::from_file(&files.config)?;
        // Tokenizer first: a broken one should fail before gigabytes of weights are mapped.
        let tokenizer = tokenizer::Tokenizer::from_file(&files.tokenizer)?;
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
        let dtype = device::compute_dtype(device);
        let model = weights::load_model(&cfg, &files.weights, dtype, device)?;
        Ok(Self {
            model,
            tokenizer,
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
    pub fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer.inner()
    }
    pub fn model(&self) -> &BitnetForCausalLM {
        &self.model
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
            bail!("the prompt is empty")
        }
        let ctx = self.model.max_position_embeddings();
        Ok(self.tokenizer.encode(text, add_special_tokens, ctx)?)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        TokenOutputStream::new(self.tokenizer.inner()).decode(ids)
    }

    /// The chat template applied to `messages`, ending with the assistant's turn, tokenized
    /// without added special tokens (the template writes them).
    pub fn chat_prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let Some(template) = &self.template else {
            bail!(
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
        self.model.clear_kv_cache();
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
            bail!("the prompt is empty")
        }
        let vocab = self.model.vocab_size();
        if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("prompt token id {id} is out of range: the vocabulary has {vocab} tokens (0..{vocab})")
        }
        let ctx = self.model.max_position_embeddings();
        let (n, max) = (ids.len(), params.max_tokens);
        if n.checked_add(max).is_some_and(|total| total <= ctx) {
            Ok(max)
        } else if params.truncate && n < ctx {
            Ok(ctx - n)
        } else {
            bail!(
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
        let reused = self.cached.len();
        let start = if !params.prompt_logits && reused < ids.len() && ids.starts_with(&self.cached)
        {
            reused
        } else {
            self.reset();
            0
        };
        let device = self.model.device().clone();
        let t0 = Instant::now();
        let input = Tensor::new(&ids[start..], &device)?.unsqueeze(0)?;
        let (mut logits, prompt_logits) = if params.prompt_logits {
            let all = self.model.forward_all(&input, start)?.squeeze(0)?; // (seq, vocab)
            (all.get(all.dim(0)? - 1)?, Some(all))
        } else {
            (self.model.forward(&input, start)?.squeeze(0)?, None) // (vocab)
        };
        self.cached.extend_from_slice(&ids[start..]);
        device.synchronize()?;
        let mut prefill_secs = t0.elapsed().as_secs_f64();

        let seed = params.seed.unwrap_or_else(clock_seed);
        let mut sampler = LogitsProcessor::from_sampling(seed, params.sampling());
        let mut stream = TokenOutputStream::new(self.tokenizer.inner());
        let mut history = ids.to_vec();
        let mut generated = vec![];
        let mut stop = if max_new < params.max_tokens {
            StopReason::ContextFull
        } else {
            StopReason::MaxTokens
        };
        let mut t_decode = Instant::now();
        let mut decode_tokens = 0;
        while generated.len() < max_new {
            let next = sample(&mut sampler, &logits, params, &history)?;
            if generated.is_empty() {
                // The first token comes from the prefill's logits.
                prefill_secs += t_decode.elapsed().as_secs_f64();
                t_decode = Instant::now();
            }
            if !params.ignore_eos && self.eos_token_ids.contains(&next) {
                stop = StopReason::Eos;
                break;
            }
            generated.push(next);
            history.push(next);
            if let Some(piece) = stream.next_token(next)? {
                on_text(&piece)?;
            }
            // The last token is never fed: nothing would read its logits.
            if generated.len() == max_new {
                break;
            }
            let pos = self.cached.len();
            let input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
            logits = self.model.forward(&input, pos)?.squeeze(0)?;
            self.cached.push(next);
            decode_tokens += 1;
        }
        if let Some(piece) = stream.flush()? {
            on_text(&piece)?;
        }
        let decode_secs = if decode_tokens > 0 {
            t_decode.elapsed().as_secs_f64()
        } else {
            0.0
        };
        Ok(Generation {
            prompt_ids: ids.to_vec(),
            text: self.decode(&generated)?,
            generated_ids: generated,
            stop,
            prefill_tokens: ids.len() - start,
            prefill_secs,
            decode_tokens,
            decode_secs,
            prompt_logits,
        })
    }
}

/// One token from `logits` (vocab,) f32: repeat penalty over the window, then min-p and the
/// sampler's temperature / top-k / top-p.
fn sample(
    sampler: &mut LogitsProcessor,
    logits: &Tensor,
    params: &GenerationParams,
    history: &[u32],
) -> Result<u32> {
    check_finite(logits, "the model produced")?;
    let logits = if params.repeat_penalty != 1.0 {
        let window = &history[history.len().saturating_sub(params.repeat_last_n)..];
        let penalized = apply_repeat_penalty(logits, params.repeat_penalty, window)?;
        let cause = format!("the repeat penalty {} produced", params.repeat_penalty);
        check_finite(&penalized, &cause)?;
        penalized
    } else {
        logits.clone()
    };
    match params.min_p.filter(|p| *p > 0.0) {
        // Probabilities after temperature; relative to the maximum, so the order with top-k /
        // top-p (which keep the most likely tokens) does not matter.
        Some(min_p) => sampler.sample_f(&logits, |prs| {
            let max = prs.iter().copied().fold(0f32, f32::max);
            let floor = min_p as f32 * max;
            prs.iter_mut()
                .filter(|p| **p < floor)
                .for_each(|p| *p = 0.0);
        }),
        None => sampler.sample(&logits),
    }
}

/// Refuses logits holding NaN or infinity, which sample as garbage (argmax) or fail inside the
/// sampler with a message about weights. One reduction: NaN and ±inf survive a sum.
fn check_finite(logits: &Tensor, cause: &str) -> Result<()> {
    let sum = logits
        .sum_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_scalar::<f32>()?;
    if sum.is_finite() {
        return Ok(());
    }
    bail!(
        "{cause} non-finite logits (NaN or infinity): the weights are corrupt or a generation parameter is out of range"
    )
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
