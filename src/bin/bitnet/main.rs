//! `bitnet`: run BitNet b1.58 models from the Hugging Face hub or a local directory.
//!
//! Errors are one line on stderr (`error: …`) and a non-zero exit status.

use anyhow::{bail, Context, Result};
use candle_bitnet::escape::escape_controls;
use candle_bitnet::generate::Generation;
use candle_bitnet::hub::DEFAULT_MODEL;
use candle_bitnet::output::write_output;
use candle_bitnet::{
    device, GenerationParams, Generator, HeadDtype, KvDtype, LoadOptions, Message,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[cfg(feature = "server")]
mod serve;

#[derive(Parser)]
#[command(name = "bitnet", version, about = "BitNet b1.58 inference on candle")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of one prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Chat interactively; the KV cache is kept across turns. `/reset` starts over, `/exit` quits.
    Chat(ChatArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat, completions, streaming).
    #[cfg(feature = "server")]
    Serve(serve::ServeArgs),
    /// Benchmark a synthetic model at real shapes (no download) against its dense baseline.
    Bench {
        /// Shape preset (2b-4t, large, 8b) or a config.json path.
        #[arg(long, default_value = "2b-4t")]
        preset: String,
        /// Run on the CPU even when a GPU is available.
        #[arg(long, conflicts_with = "device")]
        cpu: bool,
        /// Run on CUDA GPU N (needs a build with --features cuda).
        #[arg(long, value_name = "N")]
        device: Option<usize>,
        /// Prompt lengths of the prefill measurements.
        #[arg(long, value_delimiter = ',', default_value = "128,512")]
        prompt_lens: Vec<usize>,
        /// Tokens generated at batch 1 after the shortest prompt.
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        /// Skip the dense baseline.
        #[arg(long)]
        no_dense: bool,
        /// Seed of the synthetic weights and prompts.
        #[arg(long, default_value_t = candle_bitnet::synthetic::DEFAULT_SEED)]
        seed: u64,
        /// Batch sizes of a batched-decode measurement, e.g. 1,4,16,64 (sequences decoded together).
        #[arg(long, value_delimiter = ',')]
        batch: Vec<usize>,
        /// Decode steps timed at each --batch size.
        #[arg(long, default_value_t = 16)]
        batch_steps: usize,
        /// `int8`: also measure decode with the int8 LM head, beside the default head (CPU only).
        #[arg(long, value_enum, default_value_t = Head::Auto)]
        head: Head,
        /// Precision of the ternary model's KV caches.
        #[arg(long, value_enum, default_value_t = Kv::F32)]
        kv_dtype: Kv,
        /// Write the report as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

/// The LM head's precision.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Head {
    /// Exact: the checkpoint's bf16 (the CPU computes in f32), else the compute dtype.
    Auto,
    /// Quantized per row to int8 at load: half the bytes per decoded token, logits within about
    /// 1% (README). CPU only.
    Int8,
}

impl From<Head> for HeadDtype {
    fn from(head: Head) -> Self {
        match head {
            Head::Auto => HeadDtype::Auto,
            Head::Int8 => HeadDtype::Int8,
        }
    }
}

/// The KV cache's precision.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kv {
    /// Exact: f32, as the reference computes.
    F32,
    /// Rounded to f16 as cached: half the cache's memory and of the bytes attention reads per
    /// token, logits within about 3% rel-L2 on the fixture (README). CPU only.
    F16,
}

impl From<Kv> for KvDtype {
    fn from(kv: Kv) -> Self {
        match kv {
            Kv::F32 => KvDtype::F32,
            Kv::F16 => KvDtype::F16,
        }
    }
}

/// Which model, and where it runs.
#[derive(Args)]
struct ModelArgs {
    /// Hub model id, or a local directory in the hub layout (config.json, tokenizer.json, *.safetensors).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Hub revision: branch, tag or commit hash.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Run on the CPU even when a GPU is available.
    #[arg(long, conflicts_with = "device")]
    cpu: bool,
    /// Run on CUDA GPU N (needs a build with --features cuda).
    #[arg(long, value_name = "N")]
    device: Option<usize>,
    /// Precision of the LM head.
    #[arg(long, value_enum, default_value_t = Head::Auto)]
    head: Head,
    /// Precision of the KV cache.
    #[arg(long, value_enum, default_value_t = Kv::F32)]
    kv_dtype: Kv,
}

impl ModelArgs {
    fn load(&self) -> Result<Generator> {
        let opts = LoadOptions {
            head: self.head.into(),
            kv: self.kv_dtype.into(),
            ..LoadOptions::new(&device::device(self.cpu, self.device)?)
        };
        Ok(Generator::from_pretrained_with(
            &self.model,
            &self.revision,
            &opts,
        )?)
    }
}

/// Sampling settings; each defaults to the model's generation_config.json.
#[derive(Args)]
struct SamplingArgs {
    /// New tokens at most [default: generation_config.json's max_new_tokens, else 256].
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Do not stop at EOS tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Sampling temperature; 0 is greedy decoding [default: generation_config.json, else 0].
    #[arg(long, value_name = "T")]
    temperature: Option<f64>,
    /// Sample among the K most likely tokens, 0 is off [default: generation_config.json].
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely tokens up to probability P, 1 is off [default: generation_config.json].
    #[arg(long, value_name = "P")]
    top_p: Option<f64>,
    /// Drop tokens less likely than P times the most likely one, 0 is off [default: generation_config.json].
    #[arg(long, value_name = "P")]
    min_p: Option<f64>,
    /// Penalty for tokens seen in the last --repeat-last-n tokens, 1 is off [default: generation_config.json, else 1].
    #[arg(long, value_name = "R")]
    repeat_penalty: Option<f32>,
    /// Window of the repeat penalty, in tokens.
    #[arg(long, value_name = "N", default_value_t = 64)]
    repeat_last_n: usize,
    /// Seed of the sampler, for reproducible sampling [default: from the clock].
    #[arg(long)]
    seed: Option<u64>,
    /// When prompt + --max-tokens exceeds the context, stop when it is full instead of failing.
    #[arg(long)]
    truncate: bool,
}

impl SamplingArgs {
    fn params(&self, defaults: GenerationParams) -> GenerationParams {
        let p = defaults;
        GenerationParams {
            max_tokens: self.max_tokens.unwrap_or(p.max_tokens),
            temperature: self.temperature.unwrap_or(p.temperature),
            top_k: self.top_k.map_or(p.top_k, |k| Some(k).filter(|k| *k > 0)),
            top_p: self
                .top_p
                .map_or(p.top_p, |v| Some(v).filter(|v| *v != 1.0)),
            min_p: self.min_p.map_or(p.min_p, |v| Some(v).filter(|v| *v > 0.0)),
            repeat_penalty: self.repeat_penalty.unwrap_or(p.repeat_penalty),
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
            ignore_eos: self.ignore_eos,
            truncate: self.truncate,
            prompt_logits: false,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Prompt text, tokenized with the tokenizer's special-token rules (e.g. BOS prepended).
    #[arg(
        long,
        required_unless_present = "prompt_ids",
        conflicts_with = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated, used exactly as given (nothing added).
    #[arg(long, value_name = "ID,ID,...")]
    prompt_ids: Option<String>,
    /// Wrap --prompt in the model's chat template as one user turn.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Write the prompt's logits at every position ([prompt_len, vocab] f32 `logits`) to this safetensors file.
    #[arg(long, value_name = "FILE")]
    dump_logits: Option<PathBuf>,
    /// Write ids, text, timing and device as JSON to this file.
    #[arg(long, value_name = "FILE")]
    output_json: Option<PathBuf>,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message starting every conversation.
    #[arg(long)]
    system: Option<String>,
}

/// Threads candle's CPU work may use (`RAYON_NUM_THREADS`); far above any machine's cores.
const MAX_THREADS: usize = 1024;
/// Tokens of a benchmark's prompts and decode: more than any model's context.
const MAX_BENCH_TOKENS: usize = 1 << 20;
/// A chat line longer than this is refused unread (the context bounds prompts far below it).
const MAX_CHAT_LINE: u64 = 64 << 20;

/// Starts rayon's global pool (candle's CPU threads) now, so that a bad `RAYON_NUM_THREADS` or
/// a system that cannot spawn threads is one error line instead of a panic inside candle.
fn start_thread_pool() -> Result<()> {
    let threads = match std::env::var("RAYON_NUM_THREADS") {
        Ok(v) => {
            let n = v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_THREADS).contains(n));
            n.with_context(|| {
                format!(
                    "RAYON_NUM_THREADS={v:?}: expected a number of threads from 1 to {MAX_THREADS}"
                )
            })?
        }
        Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS)),
    };
    // A thread that gets its stack but not its signal stack aborts the process (std), so a
    // pool whose stacks cannot fit the address-space limit is refused before any thread starts.
    if let Some(limit) = address_space_limit() {
        let stacks = threads as u64 * WORKER_STACK_BYTES as u64;
        if stacks > limit / 2 {
            bail!(
                "cannot start {threads} worker threads: their {} MiB of stacks exceed half the \
                 address-space limit of {} MiB",
                stacks >> 20,
                limit >> 20
            )
        }
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .stack_size(WORKER_STACK_BYTES)
        .build_global()
        .with_context(|| format!("cannot start {threads} worker threads"))
}

/// Stack of each worker thread: std's default, stated so the limit check above can count it.
const WORKER_STACK_BYTES: usize = 2 << 20;

/// The process's address-space limit (`RLIMIT_AS`), where one is set.
fn address_space_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0;
        (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = start_thread_pool() {
        eprintln!("error: {}", one_line(&e));
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Chat(args) => chat(args),
        #[cfg(feature = "server")]
        Command::Serve(args) => serve::run(args),
        Command::Bench {
            preset,
            cpu,
            device: gpu,
            prompt_lens,
            decode_tokens,
            no_dense,
            seed,
            batch,
            batch_steps,
            head,
            kv_dtype,
            json,
        } => (|| {
            if let Some(n) = prompt_lens
                .iter()
                .chain([&decode_tokens])
                .find(|n| **n > MAX_BENCH_TOKENS)
            {
                bail!("{n} tokens is more than any model's context (at most {MAX_BENCH_TOKENS} per prompt and for --decode-tokens)")
            }
            let opts = candle_bitnet::bench::BenchOptions {
                preset,
                prompt_lens,
                decode_tokens,
                dense: !no_dense,
                seed,
                batch,
                batch_steps,
                int8_head: matches!(head, Head::Int8),
                kv_dtype: kv_dtype.into(),
                ..Default::default()
            };
            device::device(cpu, gpu)
                .and_then(|dev| candle_bitnet::bench::run_and_print(&opts, &dev, json.as_deref()))
                .map_err(Into::into)
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error chain as one line: candle's captured backtraces (`RUST_BACKTRACE`) left out, and
/// a cause that repeats its wrapper's text (thiserror's `#[from]`) said once.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let msg = match cause.downcast_ref::<candle_core::Error>() {
            Some(c) => candle_message(c),
            None => cause.to_string(),
        };
        if !line.contains(&msg) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&msg);
        }
    }
    // Messages quote names and values from model files: escape what could rewrite the line.
    escape_controls(&line.replace('\n', " ")).into_owned()
}

fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        e => e.to_string(),
    }
}

/// The next line of `input` without its newline, `None` at the end; `Some(Err(why))` for a
/// line that is skipped: longer than [`MAX_CHAT_LINE`] (not kept in memory), or not UTF-8.
fn read_line(input: &mut impl BufRead) -> Result<Option<Result<String, String>>> {
    let mut bytes = Vec::new();
    let n = (&mut *input)
        .take(MAX_CHAT_LINE)
        .read_until(b'\n', &mut bytes)?;
    if n == 0 {
        return Ok(None);
    }
    if bytes.last() != Some(&b'\n') && n as u64 == MAX_CHAT_LINE {
        input.skip_until(b'\n')?;
        return Ok(Some(Err(format!("longer than {MAX_CHAT_LINE} bytes"))));
    }
    Ok(Some(match String::from_utf8(bytes) {
        Ok(text) => Ok(text.trim_end_matches(['\n', '\r']).to_string()),
        Err(_) => Err("not UTF-8 text".into()),
    }))
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("invalid token id {t:?} in --prompt-ids"))
        })
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() {
        bail!("the prompt is empty: --prompt-ids has no ids")
    }
    Ok(ids)
}

/// Writes `piece` to stdout at once, so text streams.
fn print_piece(out: &mut impl Write, piece: &str) -> candle_bitnet::Result<()> {
    out.write_all(piece.as_bytes())?;
    Ok(out.flush()?)
}

fn report(g: &Generation, device: &str) {
    eprintln!(
        "{} prompt tokens: {:.1} tokens/s prefill | {} tokens: {:.1} tokens/s decode | device {device}",
        g.prefill_tokens,
        g.prefill_tokens_per_s(),
        g.decode_tokens,
        g.decode_tokens_per_s(),
    );
}

fn generate(args: GenerateArgs) -> Result<()> {
    // Cheap checks before the model loads.
    if args.prompt.as_deref() == Some("") {
        bail!("the prompt is empty")
    }
    let given_ids = args.prompt_ids.as_deref().map(parse_ids).transpose()?;
    let mut gen = args.model.load()?;
    let mut params = args.sampling.params(gen.default_params());
    params.prompt_logits = args.dump_logits.is_some();
    let ids = match (&args.prompt, given_ids) {
        (_, Some(ids)) => ids,
        (Some(p), None) if args.chat => gen.chat_prompt_ids(&[Message::user(p)])?,
        (Some(p), None) => gen.encode(p)?,
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let mut out = std::io::stdout().lock();
    let g = gen.generate_ids(&ids, &params, |piece| print_piece(&mut out, piece))?;
    writeln!(out)?;
    let device = device::describe(gen.device());
    if let (Some(path), Some(logits)) = (&args.dump_logits, &g.prompt_logits) {
        let logits = logits.to_device(&candle_core::Device::Cpu)?;
        let bytes = safetensors::serialize([("logits", logits)], None)
            .with_context(|| format!("cannot write {}", path.display()))?;
        write_output(path, &bytes)?;
    }
    if let Some(path) = &args.output_json {
        let json = serde_json::json!({
            "model": gen.name(),
            "prompt_ids": g.prompt_ids,
            "generated_ids": g.generated_ids,
            "text": g.text,
            "prefill_tokens": g.prefill_tokens,
            "prefill_tokens_per_s": g.prefill_tokens_per_s(),
            "decode_tokens": g.decode_tokens,
            "decode_tokens_per_s": g.decode_tokens_per_s(),
            "device": device,
        });
        write_output(
            path,
            (serde_json::to_string_pretty(&json)? + "\n").as_bytes(),
        )?;
    }
    report(&g, &device);
    Ok(())
}

fn chat(args: ChatArgs) -> Result<()> {
    let mut gen = args.model.load()?;
    let params = args.sampling.params(gen.default_params());
    let device = device::describe(gen.device());
    let first: Vec<Message> = args.system.iter().map(|s| Message::system(s)).collect();
    let mut messages = first.clone();
    let mut out = std::io::stdout().lock();
    eprintln!(
        "chatting with {} on {device}; /reset starts over, /exit quits",
        gen.name()
    );
    let mut stdin = std::io::stdin().lock();
    for turn in 0u64.. {
        let Some(line) = read_line(&mut stdin)? else {
            break;
        };
        let line = match line {
            Ok(line) => line,
            Err(why) => {
                eprintln!("error: the line is {why}; it was skipped");
                continue;
            }
        };
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.clone_from(&first);
                gen.reset();
                eprintln!("(new conversation)");
                continue;
            }
            text => messages.push(Message::user(text)),
        }
        // Each turn samples with its own stream of the seed.
        let params = GenerationParams {
            seed: params.seed.map(|s| s.wrapping_add(turn)),
            ..params.clone()
        };
        match gen.chat(&messages, &params, |piece| print_piece(&mut out, piece)) {
            Ok(g) => {
                writeln!(out)?;
                messages.push(Message::assistant(&g.text));
                report(&g, &device);
            }
            // The conversation goes on; the user can /reset when the context is full.
            Err(e) => {
                messages.pop();
                eprintln!("error: {}", one_line(&e.into()));
            }
        }
    }
    Ok(())
}
