//! `bitnet bench`: end-to-end throughput of a synthetic model at real shapes against its dense
//! baseline and the memory bandwidth of the device, all measured in one run.
//!
//! Machines here are shared and noisy, so absolute numbers move and ratios hold: the ternary
//! model ([`crate::synthetic`]), the same model with its projections expanded to dense floats
//! ([`BitnetModel::to_dense`]: f32 on the CPU, bf16 on CUDA) and a large memory copy all
//! run in the same process. Decode at batch 1 reads every weight once per token, so its ceiling
//! is `bandwidth ÷ bytes per token`; the report prints decode as a fraction of that ceiling.

use crate::model::{BitnetModel, KvCache, Logits, SeqInput};
use crate::profile::{self, Stage};
use crate::synthetic;
use candle_core::{bail, DType, Device, Result, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// What to run; [`Default`] is the benchmark on `2b-4t`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A name from [`synthetic::PRESETS`] or a `config.json` path.
    pub preset: String,
    pub prompt_lens: Vec<usize>,
    /// Tokens generated at batch 1, after the shortest prompt.
    pub decode_tokens: usize,
    /// Also build and measure the dense baseline.
    pub dense: bool,
    pub seed: u64,
    /// Size of the buffer copied to measure bandwidth; far larger than any cache.
    pub copy_bytes: usize,
    /// Batch sizes of the batched-decode measurement (empty: skip it).
    pub batch: Vec<usize>,
    /// Decode steps timed at each batch size.
    pub batch_steps: usize,
    /// Also measure batch-1 decode with the int8 LM head ([`crate::HeadDtype::Int8`], CPU
    /// only), beside the default head.
    pub int8_head: bool,
    /// The ternary model's KV caches ([`crate::KvDtype::F16`] is CPU only).
    pub kv_dtype: crate::KvDtype,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            preset: "2b-4t".into(),
            prompt_lens: vec![128, 512],
            decode_tokens: 128,
            dense: true,
            seed: synthetic::DEFAULT_SEED,
            copy_bytes: 1 << 30,
            batch: vec![],
            batch_steps: 16,
            int8_head: false,
            kv_dtype: crate::KvDtype::F32,
        }
    }
}

/// Decode of `batch` sequences at once, each after its own prompt.
#[derive(Debug, Clone)]
pub struct BatchDecode {
    pub batch: usize,
    /// Tokens per second over all sequences.
    pub aggregate_tokens_per_s: f64,
    /// Tokens per second each sequence sees.
    pub per_sequence_tokens_per_s: f64,
    /// Bytes allocated by the batch's KV caches at the end.
    pub kv_cache_bytes: usize,
    pub step_profile: StepProfile,
}

/// Where the time of one decode step goes, averaged over the timed steps.
#[derive(Debug, Clone)]
pub struct StepProfile {
    pub step: Duration,
    /// In [`Stage::ALL`] order.
    pub stages: [Duration; 4],
}

impl StepProfile {
    /// Times `steps` calls of `step`, by stage.
    fn measure(steps: usize, mut step: impl FnMut() -> Result<()>) -> Result<Self> {
        profile::take();
        profile::enable(true);
        let start = Instant::now();
        let ran = (0..steps).try_for_each(|_| step());
        let elapsed = start.elapsed();
        profile::enable(false);
        ran?;
        let n = steps.max(1) as u32;
        Ok(Self {
            step: elapsed / n,
            stages: profile::take().map(|d| d / n),
        })
    }

    /// Times `steps` calls of `a` and of `b`, alternating, so that both see the same machine:
    /// a shared machine's load drifts within seconds, and the ratio is the number wanted.
    fn measure_alternating(
        steps: usize,
        mut a: impl FnMut() -> Result<()>,
        mut b: impl FnMut() -> Result<()>,
    ) -> Result<(Self, Self)> {
        let mut totals = [(Duration::ZERO, [Duration::ZERO; 4]); 2];
        let timed = |total: &mut (Duration, [Duration; 4]),
                     step: &mut dyn FnMut() -> Result<()>|
         -> Result<()> {
            profile::take();
            let start = Instant::now();
            step()?;
            total.0 += start.elapsed();
            for (sum, d) in total.1.iter_mut().zip(profile::take()) {
                *sum += d;
            }
            Ok(())
        };
        profile::enable(true);
        let ran = (0..steps).try_for_each(|_| {
            let [ta, tb] = &mut totals;
            timed(ta, &mut a)?;
            timed(tb, &mut b)
        });
        profile::enable(false);
        ran?;
        let n = steps.max(1) as u32;
        let [a, b] = totals.map(|(step, stages)| Self {
            step: step / n,
            stages: stages.map(|d| d / n),
        });
        Ok((a, b))
    }

    /// What no stage accounts for: embedding, residual adds, relu²·up, sampling, gaps.
    pub fn other(&self) -> Duration {
        self.step.saturating_sub(self.stages.iter().sum())
    }

    fn to_json(&self) -> serde_json::Value {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut map: serde_json::Map<String, serde_json::Value> = Stage::ALL
            .iter()
            .zip(self.stages)
            .map(|(s, d)| (s.name().to_string(), ms(d).into()))
            .collect();
        map.insert("other".into(), ms(self.other()).into());
        map.insert("step".into(), ms(self.step).into());
        map.into()
    }

    fn row(&self, label: &str) -> String {
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
        let stages: Vec<String> = self.stages.iter().map(|&d| ms(d)).collect();
        format!(
            "| {label} | {} | {} | {} |\n",
            stages.join(" | "),
            ms(self.other()),
            ms(self.step)
        )
    }
}

/// Batch-1 decode of the same ternary model with its head quantized per row to int8.
#[derive(Debug, Clone)]
pub struct Int8HeadDecode {
    pub decode_tokens_per_s: f64,
    pub decode_profile: StepProfile,
    /// As [`Throughput::bytes_per_decoded_token`], with the int8 head's bytes for the head's.
    pub bytes_per_decoded_token: usize,
}

/// Throughput and traffic of one model.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Prompt length → prefill tokens/s.
    pub prefill_tokens_per_s: BTreeMap<usize, f64>,
    pub decode_tokens_per_s: f64,
    pub decode_profile: StepProfile,
    /// Bytes of all weights held in memory (projections, embedding, head, norms).
    pub weight_bytes: usize,
    /// Bytes of weights one decode step reads: projections, head, norms, one embedding row.
    pub bytes_per_decoded_token: usize,
    /// The head's part of it (the compact bf16 head's, where the CPU runs it).
    pub head_bytes_per_decoded_token: usize,
}

impl Throughput {
    /// Achieved decode bandwidth as a fraction of `bandwidth` (bytes/s).
    pub fn bandwidth_fraction(&self, bandwidth: f64) -> f64 {
        self.bytes_per_decoded_token as f64 * self.decode_tokens_per_s / bandwidth
    }
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub preset: String,
    pub device: String,
    /// The CPU model, from `/proc/cpuinfo` where there is one.
    pub host: Option<String>,
    pub threads: usize,
    pub seed: u64,
    /// What the ternary model's KV caches hold.
    pub kv_dtype: crate::KvDtype,
    pub parameter_count: usize,
    /// Codes held (the CPU's tiles, padded to 64 rows) plus per-matrix scale, in bits per
    /// ternary weight.
    pub ternary_bits_per_weight: f64,
    pub decode_tokens: usize,
    pub ternary: Throughput,
    pub dense_dtype: DType,
    pub dense: Option<Throughput>,
    /// Bytes read + written per second by a large copy on the device.
    pub measured_bandwidth_bytes_per_s: f64,
    /// `VmRSS` once the ternary model is built: what it holds.
    pub rss_after_load_bytes: Option<u64>,
    /// `VmHWM` after the ternary model ran, before the copy and the dense baseline.
    pub peak_rss_bytes: Option<u64>,
    /// `VmHWM` at the end of the run.
    pub peak_rss_with_dense_bytes: Option<u64>,
    pub batch_decode: Vec<BatchDecode>,
    /// With [`BenchOptions::int8_head`].
    pub int8_head: Option<Int8HeadDecode>,
}

/// Runs the benchmark on `device`, drawing a progress bar on stderr.
pub fn run(opts: &BenchOptions, device: &Device) -> Result<BenchReport> {
    if opts.prompt_lens.is_empty() || opts.prompt_lens.contains(&0) {
        bail!(
            "prompt lengths must be positive, got {:?}",
            opts.prompt_lens
        )
    }
    let cfg = synthetic::preset(&opts.preset)?;
    let shortest = opts.prompt_lens.iter().copied().min().unwrap_or(1);
    let longest = opts.prompt_lens.iter().copied().max().unwrap_or(1);
    if longest.max(shortest.saturating_add(opts.decode_tokens)) > cfg.max_position_embeddings {
        bail!(
            "prompts of {longest} tokens and {} decoded after {shortest} exceed max_position_embeddings {}",
            opts.decode_tokens,
            cfg.max_position_embeddings
        )
    }
    if opts.batch.contains(&0) || (!opts.batch.is_empty() && opts.batch_steps == 0) {
        bail!(
            "batch sizes and batch steps must be positive, got {:?} and {}",
            opts.batch,
            opts.batch_steps
        )
    }
    if shortest.saturating_add(opts.batch_steps).saturating_add(1) > cfg.max_position_embeddings {
        bail!(
            "{} batched decode steps after {shortest} prompt tokens exceed max_position_embeddings {}",
            opts.batch_steps,
            cfg.max_position_embeddings
        )
    }
    if opts.int8_head {
        crate::HeadDtype::Int8
            .check_device(&device.location())
            .map_err(candle_core::Error::wrap)?;
    }
    (opts.kv_dtype)
        .check_device(&device.location())
        .map_err(candle_core::Error::wrap)?;
    let dtype = crate::device::compute_dtype(device);
    let tokens_per_model = opts.prompt_lens.iter().sum::<usize>() + opts.decode_tokens;
    let int8_tokens = opts.int8_head as usize * (shortest + opts.decode_tokens);
    let bar = progress_bar((tokens_per_model * (1 + opts.dense as usize) + int8_tokens) as u64)?;

    bar.set_message("building ternary model");
    let model = synthetic::build(&cfg, opts.seed, dtype, device)?.with_kv_dtype(opts.kv_dtype)?;
    let rss_after_load_bytes = proc_status_bytes("VmRSS");
    let (ternary_weights, code_bytes) = model.bitlinears().iter().fold((0, 0), |(n, b), l| {
        (n + l.in_features() * l.out_features(), b + l.weight_bytes())
    });
    // Every projection also keeps its f32 scale.
    let ternary_bits_per_weight =
        8.0 * (code_bytes + 4 * model.bitlinears().len()) as f64 / ternary_weights as f64;
    let float_bytes = FloatBytes::new(&model, &cfg, ternary_weights);
    let int8_model = if opts.int8_head {
        bar.set_message("quantizing the head to int8");
        Some(model.clone().with_int8_head()?)
    } else {
        None
    };
    let (ternary, int8_profile) = measure(
        &model,
        int8_model.as_ref(),
        opts,
        &float_bytes,
        &bar,
        "ternary",
    )?;
    let int8_head = match (&int8_model, int8_profile) {
        (Some(m), Some(decode_profile)) => Some(Int8HeadDecode {
            decode_tokens_per_s: 1.0 / decode_profile.step.as_secs_f64(),
            decode_profile,
            bytes_per_decoded_token: ternary.bytes_per_decoded_token - float_bytes.head
                + m.int8_head().map_or(0, |h| h.bytes()),
        }),
        _ => None,
    };
    drop(int8_model);
    let batch_decode = opts
        .batch
        .iter()
        .map(|&b| measure_batch(&model, b, opts, &bar))
        .collect::<Result<Vec<_>>>()?;
    let peak_rss_bytes = peak_rss();

    bar.set_message("measuring copy bandwidth");
    let measured_bandwidth_bytes_per_s = copy_bandwidth(device, opts.copy_bytes)?;

    let dense = if opts.dense {
        bar.set_message(format!("building dense {dtype:?} model"));
        let dense = model.to_dense(dtype)?;
        drop(model);
        Some(measure(&dense, None, opts, &float_bytes, &bar, "dense")?.0)
    } else {
        None
    };
    bar.finish_and_clear();
    Ok(BenchReport {
        preset: opts.preset.clone(),
        device: crate::device::describe(device),
        host: cpu_model(),
        threads: candle_core::utils::get_num_threads(),
        seed: opts.seed,
        kv_dtype: opts.kv_dtype,
        parameter_count: synthetic::parameter_count(&cfg),
        ternary_bits_per_weight,
        decode_tokens: opts.decode_tokens,
        ternary,
        dense_dtype: dtype,
        dense,
        measured_bandwidth_bytes_per_s,
        rss_after_load_bytes,
        peak_rss_bytes,
        peak_rss_with_dense_bytes: peak_rss(),
        batch_decode,
        int8_head,
    })
}

/// `bitnet bench`: [`run`], print the table on stdout, write the JSON report to `json` if given.
pub fn run_and_print(opts: &BenchOptions, device: &Device, json: Option<&Path>) -> Result<()> {
    let report = run(opts, device)?;
    print!("{}", report.table());
    match json {
        Some(path) => report.write_json(path),
        None => Ok(()),
    }
}

/// Bytes of the float (non-ternary) weights, for the traffic accounting.
struct FloatBytes {
    /// Embedding, untied head and norms.
    held: usize,
    /// Head, norms and one embedding row: what a decode step reads besides the projections.
    read_per_token: usize,
    /// The head's part of `read_per_token`.
    head: usize,
}

impl FloatBytes {
    fn new(model: &BitnetModel, cfg: &crate::Config, ternary_weights: usize) -> Self {
        let floats = synthetic::parameter_count(cfg) - ternary_weights;
        let embedding = cfg.vocab_size * cfg.hidden_size;
        let norms = floats - embedding - (!cfg.tie_word_embeddings as usize) * embedding;
        let (size, embed_size) = (
            model.dtype().size_in_bytes(),
            model.embedding_dtype().size_in_bytes(),
        );
        // A tied head is the embedding matrix (or holds it, compact), read once per token.
        let head = model.head_bytes();
        let untied_embedding = (!cfg.tie_word_embeddings as usize) * embedding * embed_size;
        Self {
            held: untied_embedding + head + norms * size,
            read_per_token: head + cfg.hidden_size * embed_size + norms * size,
            head,
        }
    }
}

fn progress_bar(len: u64) -> Result<ProgressBar> {
    let style = ProgressStyle::with_template(
        "{spinner} {msg:<32} [{bar:30}] {pos}/{len} tokens, {elapsed}",
    )
    .map_err(candle_core::Error::wrap)?
    .progress_chars("=> ");
    let bar = ProgressBar::new(len).with_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    Ok(bar)
}

/// Prefill at every prompt length (longest first), then decode after the shortest prompt;
/// with `int8` (the same model with the int8 head) also its decode after the same prompt, step
/// for step alternating with `model`'s.
fn measure(
    model: &BitnetModel,
    int8: Option<&BitnetModel>,
    opts: &BenchOptions,
    float_bytes: &FloatBytes,
    bar: &ProgressBar,
    label: &str,
) -> Result<(Throughput, Option<StepProfile>)> {
    let vocab = model.vocab_size();
    let prompt = |len: usize| synthetic::token_ids(len, vocab, opts.seed ^ len as u64);
    let mut cache = model.new_kv_cache();
    // Warm-up: thread pools, first-touch page faults, kernel loading.
    bar.set_message(format!("{label}: warm-up"));
    let mut token = next_token(&model.forward(&prompt(8), &mut cache, Logits::Last)?)?;
    next_token(&model.forward(&[token], &mut cache, Logits::Last)?)?;

    let mut lens = opts.prompt_lens.clone();
    lens.sort_unstable_by(|a, b| b.cmp(a));
    lens.dedup();
    let mut prefill_tokens_per_s = BTreeMap::new();
    for &len in &lens {
        bar.set_message(format!("{label}: prefill {len}"));
        cache.clear();
        let ids = prompt(len);
        let start = Instant::now();
        token = next_token(&model.forward(&ids, &mut cache, Logits::Last)?)?;
        prefill_tokens_per_s.insert(len, len as f64 / start.elapsed().as_secs_f64());
        bar.inc(len as u64);
    }

    // The cache now holds the shortest prompt.
    let step = |model: &BitnetModel, cache: &mut KvCache, token: &mut u32| -> Result<()> {
        *token = next_token(&model.forward(&[*token], cache, Logits::Last)?)?;
        bar.inc(1);
        Ok(())
    };
    let (decode_profile, int8_profile) = match int8 {
        None => {
            bar.set_message(format!("{label}: decode"));
            let decode = || step(model, &mut cache, &mut token);
            (StepProfile::measure(opts.decode_tokens, decode)?, None)
        }
        Some(int8) => {
            let shortest = lens.last().copied().unwrap_or(1);
            bar.set_message(format!("{label}, int8 head: prefill {shortest}"));
            let mut cache8 = int8.new_kv_cache();
            let mut token8 =
                next_token(&int8.forward(&prompt(shortest), &mut cache8, Logits::Last)?)?;
            bar.inc(shortest as u64);
            bar.set_message(format!("{label}: decode, default and int8 heads"));
            let (a, b) = StepProfile::measure_alternating(
                opts.decode_tokens,
                || step(model, &mut cache, &mut token),
                || step(int8, &mut cache8, &mut token8),
            )?;
            (a, Some(b))
        }
    };
    let decode_tokens_per_s = 1.0 / decode_profile.step.as_secs_f64();

    let linear_bytes: usize = model.bitlinears().iter().map(|l| l.weight_bytes()).sum();
    let throughput = Throughput {
        prefill_tokens_per_s,
        decode_tokens_per_s,
        decode_profile,
        weight_bytes: linear_bytes + float_bytes.held,
        bytes_per_decoded_token: linear_bytes + float_bytes.read_per_token,
        head_bytes_per_decoded_token: float_bytes.head,
    };
    Ok((throughput, int8_profile))
}

/// `batch` sequences prefilled with prompts of the shortest prompt length, then
/// `opts.batch_steps` steps that each advance all of them by one token.
fn measure_batch(
    model: &BitnetModel,
    batch: usize,
    opts: &BenchOptions,
    bar: &ProgressBar,
) -> Result<BatchDecode> {
    bar.set_message(format!("batch {batch}: prefill"));
    let prompt_len = opts.prompt_lens.iter().copied().min().unwrap_or(1);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| synthetic::token_ids(prompt_len, model.vocab_size(), opts.seed ^ (i as u64 + 1)))
        .collect();
    let mut caches: Vec<KvCache> = (0..batch).map(|_| model.new_kv_cache()).collect();
    let step = |ids: &[Vec<u32>], caches: &mut [KvCache]| -> Result<Vec<Vec<u32>>> {
        let mut seqs: Vec<SeqInput> = ids
            .iter()
            .zip(caches.iter_mut())
            .map(|(ids, cache)| SeqInput {
                ids,
                cache,
                logits: Logits::Last,
            })
            .collect();
        model
            .forward_batch(&mut seqs)?
            .into_iter()
            .map(|l| match l {
                Some(l) => Ok(vec![next_token(&l)?]),
                None => bail!("no logits"),
            })
            .collect()
    };
    let mut tokens = step(&prompts, &mut caches)?;
    bar.set_message(format!("batch {batch}: decode"));
    let step_profile = StepProfile::measure(opts.batch_steps, || {
        tokens = step(&tokens, &mut caches)?;
        Ok(())
    })?;
    let per_sequence_tokens_per_s = 1.0 / step_profile.step.as_secs_f64();
    Ok(BatchDecode {
        batch,
        aggregate_tokens_per_s: batch as f64 * per_sequence_tokens_per_s,
        per_sequence_tokens_per_s,
        kv_cache_bytes: caches.iter().map(KvCache::bytes).sum(),
        step_profile,
    })
}

/// Greedy next token from `(vocab,)` logits; reading them back also waits for the device.
fn next_token(logits: &Tensor) -> Result<u32> {
    crate::generate::argmax(&logits.to_vec1::<f32>()?)
        .ok_or_else(|| candle_core::Error::Msg("empty logits".into()))
}

/// Best of four copies of `bytes` on `device`, in bytes read + written per second. On the CPU
/// the copy is split over the rayon pool, as the kernels are; one thread cannot saturate memory.
pub fn copy_bandwidth(device: &Device, bytes: usize) -> Result<f64> {
    let elems = bytes / 4;
    let traffic = 2.0 * (elems * 4) as f64;
    let mut best = f64::INFINITY;
    if device.is_cpu() {
        use rayon::prelude::*;
        // Written, not just allocated: zero pages would all alias one cached page.
        let src = vec![1f32; elems];
        let mut dst = vec![0f32; elems];
        for _ in 0..4 {
            let start = Instant::now();
            dst.par_chunks_mut(1 << 20)
                .zip(src.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
            best = best.min(start.elapsed().as_secs_f64());
        }
        std::hint::black_box(&dst);
    } else {
        let src = Tensor::ones(elems, DType::F32, device)?;
        for _ in 0..4 {
            device.synchronize()?;
            let start = Instant::now();
            let dst = src.copy()?;
            device.synchronize()?;
            best = best.min(start.elapsed().as_secs_f64());
            drop(dst);
        }
    }
    // The first of the four runs pays page faults or allocation; `min` discards it.
    Ok(traffic / best)
}

/// `VmHWM` (peak resident set) of this process; `None` where `/proc` does not exist.
pub fn peak_rss() -> Option<u64> {
    proc_status_bytes("VmHWM")
}

/// A `kB` line of `/proc/self/status`, in bytes.
fn proc_status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

fn gb(bytes: f64) -> String {
    format!("{:.2} GB", bytes / 1e9)
}

impl BenchReport {
    /// Ternary decode as a fraction of the bandwidth limit.
    pub fn bandwidth_fraction(&self) -> f64 {
        self.ternary
            .bandwidth_fraction(self.measured_bandwidth_bytes_per_s)
    }

    /// The keys `--json` writes (see issue 5); missing measurements are `null`.
    pub fn to_json(&self) -> serde_json::Value {
        let by_len = |t: &Throughput| -> serde_json::Value {
            t.prefill_tokens_per_s
                .iter()
                .map(|(len, v)| (len.to_string(), serde_json::Value::from(*v)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let dense = self.dense.as_ref();
        let int8 = self.int8_head.as_ref();
        let bw = self.measured_bandwidth_bytes_per_s;
        serde_json::json!({
            "preset": self.preset,
            "device": self.device,
            "host": self.host,
            "threads": self.threads,
            "seed": self.seed,
            "kv_dtype": format!("{:?}", self.kv_dtype).to_lowercase(),
            "parameter_count": self.parameter_count,
            "decode_tokens": self.decode_tokens,
            "decode_tokens_per_s": self.ternary.decode_tokens_per_s,
            "decode_profile_ms": self.ternary.decode_profile.to_json(),
            "dense_decode_tokens_per_s": dense.map(|d| d.decode_tokens_per_s),
            "int8_head_decode_tokens_per_s": int8.map(|i| i.decode_tokens_per_s),
            "int8_head_decode_profile_ms": int8.map(|i| i.decode_profile.to_json()),
            "int8_head_bytes_per_decoded_token": int8.map(|i| i.bytes_per_decoded_token),
            "prefill_tokens_per_s": by_len(&self.ternary),
            "dense_prefill_tokens_per_s": dense.map(by_len),
            "dense_dtype": format!("{:?}", self.dense_dtype).to_lowercase(),
            "ternary_bits_per_weight": self.ternary_bits_per_weight,
            "weight_bytes": self.ternary.weight_bytes,
            "dense_weight_bytes": dense.map(|d| d.weight_bytes),
            "bytes_per_decoded_token": self.ternary.bytes_per_decoded_token,
            "head_bytes_per_decoded_token": self.ternary.head_bytes_per_decoded_token,
            "dense_bytes_per_decoded_token": dense.map(|d| d.bytes_per_decoded_token),
            "measured_bandwidth_bytes_per_s": bw,
            "bandwidth_fraction": self.bandwidth_fraction(),
            "dense_bandwidth_fraction": dense.map(|d| d.bandwidth_fraction(bw)),
            "rss_after_load_bytes": self.rss_after_load_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rss_with_dense_bytes": self.peak_rss_with_dense_bytes,
            "batch_decode": self.batch_decode.iter().map(|b| serde_json::json!({
                "batch": b.batch,
                "aggregate_tokens_per_s": b.aggregate_tokens_per_s,
                "per_sequence_tokens_per_s": b.per_sequence_tokens_per_s,
                "kv_cache_bytes": b.kv_cache_bytes,
                "step_profile_ms": b.step_profile.to_json(),
            })).collect::<Vec<_>>(),
        })
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(&self.to_json()).map_err(candle_core::Error::wrap)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| candle_core::Error::Msg(format!("cannot write {}: {e}", path.display())))
    }

    /// The report as a Markdown table (it goes into docs/benchmarks.md as printed).
    pub fn table(&self) -> String {
        let dense_name = format!("dense {}", format!("{:?}", self.dense_dtype).to_lowercase());
        let bw = self.measured_bandwidth_bytes_per_s;
        let mut rows: Vec<(String, String, Option<String>, Option<f64>)> = Vec::new();
        let d = self.dense.as_ref();
        for (len, t) in &self.ternary.prefill_tokens_per_s {
            let dt = d.and_then(|d| d.prefill_tokens_per_s.get(len).copied());
            rows.push((
                format!("prefill, {len}-token prompt (tok/s)"),
                format!("{t:.1}"),
                dt.map(|v| format!("{v:.1}")),
                dt.map(|v| t / v),
            ));
        }
        let t = &self.ternary;
        rows.push((
            "decode, batch 1 (tok/s)".into(),
            format!("{:.2}", t.decode_tokens_per_s),
            d.map(|d| format!("{:.2}", d.decode_tokens_per_s)),
            d.map(|d| t.decode_tokens_per_s / d.decode_tokens_per_s),
        ));
        if let Some(i) = &self.int8_head {
            rows.push((
                format!(
                    "decode, batch 1, int8 head (tok/s; {:.2}× the default head)",
                    i.decode_tokens_per_s / t.decode_tokens_per_s
                ),
                format!("{:.2}", i.decode_tokens_per_s),
                None,
                None,
            ));
        }
        rows.push((
            "weight bytes in memory".into(),
            gb(t.weight_bytes as f64),
            d.map(|d| gb(d.weight_bytes as f64)),
            d.map(|d| t.weight_bytes as f64 / d.weight_bytes as f64),
        ));
        rows.push((
            "weight bytes read per decoded token".into(),
            gb(t.bytes_per_decoded_token as f64),
            d.map(|d| gb(d.bytes_per_decoded_token as f64)),
            d.map(|d| t.bytes_per_decoded_token as f64 / d.bytes_per_decoded_token as f64),
        ));
        if let Some(i) = &self.int8_head {
            rows.push((
                "weight bytes read per decoded token, int8 head".into(),
                gb(i.bytes_per_decoded_token as f64),
                None,
                None,
            ));
        }
        rows.push((
            "decode ÷ bandwidth limit".into(),
            format!("{:.1}%", 100.0 * t.bandwidth_fraction(bw)),
            d.map(|d| format!("{:.1}%", 100.0 * d.bandwidth_fraction(bw))),
            None,
        ));
        let mut out = format!(
            "preset {} ({} parameters), {}{}, {} threads, seed {:#x}, {} KV cache\n\n",
            self.preset,
            self.parameter_count,
            self.device,
            self.host
                .as_ref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default(),
            self.threads,
            self.seed,
            format!("{:?}", self.kv_dtype).to_lowercase()
        );
        out += &format!("| | ternary | {dense_name} | ternary ÷ dense |\n|---|---:|---:|---:|\n");
        for (name, t, d, ratio) in rows {
            let d = d.unwrap_or_else(|| "–".into());
            let ratio = ratio
                .map(|r| format!("{r:.2}×"))
                .unwrap_or_else(|| "–".into());
            out += &format!("| {name} | {t} | {d} | {ratio} |\n");
        }
        let rss = |r: Option<u64>| r.map(|r| gb(r as f64)).unwrap_or_else(|| "n/a".into());
        out += &format!(
            "\nternary bits per weight in memory: {:.3}; measured copy bandwidth: {:.1} GB/s \
             (read + write); RSS {} after load, peak {} ternary, {} at the end; decode: {} \
             tokens after the shortest prompt\n",
            self.ternary_bits_per_weight,
            bw / 1e9,
            rss(self.rss_after_load_bytes),
            rss(self.peak_rss_bytes),
            rss(self.peak_rss_with_dense_bytes),
            self.decode_tokens,
        );
        out += "\n| where a decode step goes (ms) | projections | attention | norms | head | other | step |\n|---|---:|---:|---:|---:|---:|---:|\n";
        out += &self.ternary.decode_profile.row("batch 1, ternary");
        if let Some(i) = &self.int8_head {
            out += &i.decode_profile.row("batch 1, ternary, int8 head");
        }
        for b in &self.batch_decode {
            out += &b.step_profile.row(&format!("batch {} step", b.batch));
        }
        if !self.batch_decode.is_empty() {
            out += "\n| batch | aggregate decode (tok/s) | per sequence (tok/s) | × batch 1 | KV caches |\n|---:|---:|---:|---:|---:|\n";
            let base = self.batch_decode[0].aggregate_tokens_per_s;
            for b in &self.batch_decode {
                out += &format!(
                    "| {} | {:.1} | {:.2} | {:.2}× | {} |\n",
                    b.batch,
                    b.aggregate_tokens_per_s,
                    b.per_sequence_tokens_per_s,
                    b.aggregate_tokens_per_s / base,
                    gb(b.kv_cache_bytes as f64)
                );
            }
        }
        out
    }
}
