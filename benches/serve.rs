//! `bitnet serve` under load, over HTTP: aggregate generated tokens/s and time to first token
//! at 1, 4, 16 and 64 concurrent streaming clients, in one run, on a synthetic model (no
//! download).
//!
//! The synthetic checkpoint (seeded random weights at the preset's real shapes, a word-level
//! tokenizer with one word per id so every token has text) lives under
//! `$CARGO_TARGET_TMPDIR/serve-bench/`, its weights written once; prompts are seeded random ids.
//!
//! ```text
//! cargo bench --bench serve -- [--preset 2b-4t] [--clients 1,4,16,64] [--prompt-len 16]
//!     [--max-tokens 32] [--rounds 1] [--cpu | --device N] [--json FILE]
//! ```

use anyhow::{bail, Context, Result};
use candle_bitnet::config::{Config, EosTokenId};
use candle_bitnet::synthetic;
use candle_core::{DType, Device};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Options {
    preset: String,
    clients: Vec<usize>,
    prompt_len: usize,
    max_tokens: usize,
    /// Requests each client sends one after the other.
    rounds: usize,
    device_args: Vec<String>,
    json: Option<PathBuf>,
}

fn options() -> Result<Options> {
    let mut o = Options {
        preset: "2b-4t".into(),
        clients: vec![1, 4, 16, 64],
        prompt_len: 16,
        max_tokens: 32,
        rounds: 1,
        device_args: vec!["--cpu".into()],
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--preset" => o.preset = value()?,
            "--clients" => {
                o.clients = value()?
                    .split(',')
                    .map(|c| c.trim().parse().context("--clients: a list of numbers"))
                    .collect::<Result<_>>()?
            }
            "--prompt-len" => o.prompt_len = value()?.parse()?,
            "--max-tokens" => o.max_tokens = value()?.parse()?,
            "--rounds" => o.rounds = value()?.parse()?,
            "--cpu" => o.device_args = vec!["--cpu".into()],
            "--device" => o.device_args = vec!["--device".into(), value()?],
            "--json" => o.json = Some(value()?.into()),
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    if o.clients.contains(&0) || o.prompt_len == 0 || o.max_tokens == 0 || o.rounds == 0 {
        bail!("--clients, --prompt-len, --max-tokens and --rounds must be at least 1")
    }
    Ok(o)
}

/// `config.json` of `cfg` (the fields the loader reads).
fn config_json(cfg: &Config) -> Value {
    let q = cfg.quantization_config.as_ref();
    json!({
        "model_type": cfg.model_type.to_string(),
        "architectures": cfg.architectures,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "hidden_act": serde_name(cfg.hidden_act),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos_ids(cfg),
        "quantization_config": q.map(|q| json!({
            "quant_method": serde_name(q.quant_method),
            "linear_class": q.linear_class.map(serde_name),
            "use_rms_norm": q.use_rms_norm,
            "rms_norm_eps": q.rms_norm_eps,
            "modules_to_not_convert": q.modules_to_not_convert,
        })),
    })
}

/// The config.json spelling of a config enum: its variant name in lowercase, as its
/// `#[serde(rename_all = "lowercase")]` reads it.
fn serde_name(v: impl std::fmt::Debug) -> String {
    format!("{v:?}").to_lowercase()
}

fn eos_ids(cfg: &Config) -> Vec<u32> {
    cfg.eos_token_id
        .as_ref()
        .map_or_else(Vec::new, EosTokenId::ids)
}

/// A word-level tokenizer with the word `t<id>` for every id: each token decodes to text.
fn tokenizer_json(vocab: usize) -> Value {
    let words: serde_json::Map<String, Value> =
        (0..vocab).map(|id| (format!("t{id}"), json!(id))).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "t0"},
    })
}

/// Writes the synthetic checkpoint once; later runs reuse it.
fn checkpoint(preset: &str) -> Result<(PathBuf, Config)> {
    let cfg = synthetic::packed_config(synthetic::preset(preset)?);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("serve-bench")
        .join(format!("{preset}-{:x}", synthetic::DEFAULT_SEED));
    std::fs::create_dir_all(&dir)?;
    // The small files are rewritten every run, so they follow this code.
    let write_json = |name: &str, v: &Value| {
        std::fs::write(dir.join(name), serde_json::to_string(v)?)
            .with_context(|| format!("cannot write {name}"))
    };
    write_json("config.json", &config_json(&cfg))?;
    write_json("tokenizer.json", &tokenizer_json(cfg.vocab_size))?;
    write_json(
        "generation_config.json",
        &json!({"eos_token_id": eos_ids(&cfg), "do_sample": false}),
    )?;
    let weights = dir.join("model.safetensors");
    if weights.is_file() {
        return Ok((dir, cfg));
    }
    eprintln!(
        "writing the synthetic {preset} weights to {}",
        dir.display()
    );
    let tensors = synthetic::tensors(&cfg, synthetic::DEFAULT_SEED, DType::BF16, &Device::Cpu)?;
    // Written last, under a temporary name: its presence marks a complete checkpoint.
    let partial = dir.join("model.safetensors.partial");
    candle_core::safetensors::save(&tensors, &partial)?;
    std::fs::rename(partial, weights)?;
    Ok((dir, cfg))
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(model: &Path, opts: &Options, max_batch: usize) -> Result<Server> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(&opts.device_args)
            .args(["--port", "0", "--served-model-name", "bench"])
            .args(["--max-batch", &max_batch.to_string()])
            .args(["--max-queue", &(max_batch * 4).to_string()])
            .env("RUST_LOG", "warn,bitnet::serve=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start bitnet serve")?;
        let stderr = child.stderr.take().context("piped stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                match line.split_once("listening on http://") {
                    Some((_, url)) => {
                        let _ = tx.send(url.trim().to_string());
                    }
                    None if line.contains("ERROR") || line.starts_with("error") => {
                        eprintln!("{line}")
                    }
                    None => {}
                }
            }
        });
        let addr = rx.recv().context("the server did not start")?;
        let mut server = Server { child, addr };
        while health(&server.addr)? != 200 {
            if let Some(status) = server.child.try_wait()? {
                bail!("the server exited while loading the model: {status}")
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(server)
    }
}

/// The status of `GET /health`.
fn health(addr: &str) -> Result<u16> {
    let mut conn = TcpStream::connect(addr)?;
    write!(conn, "GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut status = String::new();
    BufReader::new(conn).read_line(&mut status)?;
    status
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status:?}"))
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// One streamed completion, timed from `since`.
struct Timing {
    sent: Duration,
    first_token: Duration,
    done: Duration,
    tokens: usize,
}

fn stream_request(addr: &str, prompt: &[u32], max_tokens: usize, since: Instant) -> Result<Timing> {
    let body = json!({
        "model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    })
    .to_string();
    let sent = since.elapsed();
    let mut conn = TcpStream::connect(addr)?;
    // HTTP/1.0: the body ends when the connection closes, no chunked framing to parse.
    write!(
        conn,
        "POST /v1/completions HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut lines = BufReader::new(conn).lines();
    let status = lines.next().context("no response")??;
    if !status.contains(" 200 ") {
        bail!(
            "{status}: {}",
            lines.map_while(Result::ok).collect::<Vec<_>>().join(" ")
        )
    }
    let (mut first, mut tokens) = (None, None);
    for line in lines {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data)?;
        if chunk.get("error").is_some() {
            bail!("{data}")
        }
        if first.is_none()
            && chunk["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        {
            first = Some(since.elapsed());
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n as usize);
        }
    }
    match (first, tokens) {
        (Some(first_token), Some(tokens)) => Ok(Timing {
            sent,
            first_token,
            done: since.elapsed(),
            tokens,
        }),
        _ => bail!("the stream ended without tokens or usage"),
    }
}

struct Level {
    clients: usize,
    requests: usize,
    tokens: usize,
    secs: f64,
    ttft: Vec<f64>,
    /// From the first first token to the last token: the decode phase.
    decode_secs: f64,
}

impl Level {
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.secs
    }
    /// Tokens after each request's first, over the decode phase.
    fn decode_tokens_per_s(&self) -> f64 {
        (self.tokens - self.requests) as f64 / self.decode_secs
    }
    fn ttft_quantile(&self, q: f64) -> f64 {
        let mut t = self.ttft.clone();
        t.sort_by(f64::total_cmp);
        t[((t.len() - 1) as f64 * q).round() as usize]
    }
}

fn run_level(addr: &str, opts: &Options, cfg: &Config, clients: usize) -> Result<Level> {
    let started = Instant::now();
    let results: Vec<Result<Vec<Timing>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    (0..opts.rounds)
                        .map(|r| {
                            let seed = (clients * 1000 + c * opts.rounds + r) as u64;
                            let prompt =
                                synthetic::token_ids(opts.prompt_len, cfg.vocab_size, seed);
                            stream_request(addr, &prompt, opts.max_tokens, started)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let timings: Vec<Timing> = results
        .into_iter()
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    if let Some(t) = timings.iter().find(|t| t.tokens != opts.max_tokens) {
        bail!(
            "a request generated {} tokens, asked {}",
            t.tokens,
            opts.max_tokens
        )
    }
    let first = timings.iter().map(|t| t.first_token).min();
    let last = timings.iter().map(|t| t.done).max();
    Ok(Level {
        clients,
        requests: timings.len(),
        tokens: timings.iter().map(|t| t.tokens).sum(),
        secs,
        ttft: timings
            .iter()
            .map(|t| (t.first_token - t.sent).as_secs_f64())
            .collect(),
        decode_secs: last.zip(first).map_or(0.0, |(l, f)| (l - f).as_secs_f64()),
    })
}

fn main() -> Result<()> {
    let opts = options()?;
    let (model, cfg) = checkpoint(&opts.preset)?;
    let max_batch = *opts.clients.iter().max().expect("--clients is not empty");
    let server = Server::start(&model, &opts, max_batch)?;
    eprintln!(
        "{} over HTTP: prompts of {} ids, {} tokens each, {} rounds per client, --max-batch {max_batch} ({})",
        opts.preset,
        opts.prompt_len,
        opts.max_tokens,
        opts.rounds,
        opts.device_args.join(" ")
    );
    // Warm-up: first-touch of the mapped weights and the allocator.
    stream_request(&server.addr, &[1, 2, 3], 4, Instant::now())?;
    let mut levels = vec![];
    println!("| clients | requests | tokens | seconds | aggregate tokens/s | decode-phase tokens/s | per-client tokens/s | TTFT p50 ms | TTFT p90 ms |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &clients in &opts.clients {
        let l = run_level(&server.addr, &opts, &cfg, clients)?;
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} |",
            l.clients,
            l.requests,
            l.tokens,
            l.secs,
            l.tokens_per_s(),
            l.decode_tokens_per_s(),
            l.tokens_per_s() / l.clients as f64,
            l.ttft_quantile(0.5) * 1e3,
            l.ttft_quantile(0.9) * 1e3
        );
        levels.push(l);
    }
    if let (Some(one), Some(sixteen)) = (
        levels.iter().find(|l| l.clients == 1),
        levels.iter().find(|l| l.clients == 16),
    ) {
        println!(
            "aggregate at 16 clients / 1 client: {:.2}x",
            sixteen.tokens_per_s() / one.tokens_per_s()
        );
    }
    if let Some(path) = &opts.json {
        let report = json!({
            "preset": opts.preset,
            "device": opts.device_args.join(" "),
            "prompt_len": opts.prompt_len,
            "max_tokens": opts.max_tokens,
            "rounds": opts.rounds,
            "levels": levels.iter().map(|l| json!({
                "clients": l.clients,
                "requests": l.requests,
                "generated_tokens": l.tokens,
                "seconds": l.secs,
                "aggregate_tokens_per_s": l.tokens_per_s(),
                "decode_phase_tokens_per_s": l.decode_tokens_per_s(),
                "ttft_p50_s": l.ttft_quantile(0.5),
                "ttft_p90_s": l.ttft_quantile(0.9),
            })).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
