//! `cargo bench --bench bitlinear`: the ternary BitLinear op at BitNet 2B-4T shapes beside
//! candle's dense f32 matmul on the same shapes, and the bf16 LM head beside candle's f32 matmul.
//!
//! Weights rotate through copies larger than the last-level cache, so decode (1 row) reads DRAM
//! as it does in a model; each shape starts with a STREAM-like parallel read of a buffer as
//! large, and each kernel line prints its GB/s as a share of it (`% read`) and, under `hot`, the
//! GB/s with one copy of the weights left in cache (what the kernel computes at, memory aside).
//! GB/s counts weight bytes only: packed (1/4 byte per weight) for ternary, 4 bytes per weight
//! for dense f32, 2 for bf16. `ctx/call` counts the voluntary context switches (sleeps and
//! wake-ups, not preemption) of all threads per call of the op, called from outside rayon's
//! pool; the kernel lines run from a pool thread, as the model's decode step does. Threads: rayon's default (all
//! cores) unless RAYON_NUM_THREADS says otherwise.
//! On CPUs with AMX, an `Amx` line follows the SIMD kernels (AMX forced at every row count;
//! the op uses it from `AMX_MIN_TOKENS` rows) with its speed-up over the AVX-512 kernel's hot
//! time. Arguments narrow the run: row counts (`-- 1 8`) and/or `head`.

use candle_bitnet::ops::cpu::{
    bitlinear_amx, bitlinear_with, matmul_bf16, matmul_compact, matmul_int8, AmxSupport,
    CompactBf16Head, Int8Head, Kernel, QuantizedRows, TernaryTiles,
};
use candle_bitnet::ops::{bitlinear_tiles, matmul_bf16_weight, matmul_int8_head};
use candle_bitnet::synthetic::{ternary_codes, uniform_f32};
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;

/// (in, out, what): the 2B-4T projections.
const SHAPES: [(usize, usize, &str); 5] = [
    (2560, 3840, "qkv fused"),
    (2560, 2560, "q / o"),
    (2560, 640, "k / v"),
    (2560, 6912, "gate / up"),
    (6912, 2560, "down"),
];
const ROWS: [usize; 4] = [1, 8, 128, 512];
const VOCAB: usize = 128256;
const HIDDEN: usize = 2560;
/// Rotating weight copies add up to at least this (more than the L3 of a guest), and the
/// STREAM-like read reads this much.
const COLD_BYTES: usize = 1 << 30;
/// Each measurement runs at least this long (and at least `MIN_RUNS` times) after a warm-up.
const MIN_SECONDS: f64 = 0.3;
const MIN_RUNS: usize = 3;
const MAX_RUNS: usize = 200;
/// The portable kernel is the fallback, not a prefill engine: larger batches only take time.
const PORTABLE_MAX_ROWS: usize = 128;

/// Median seconds of `f(i)` over repeated runs; `i` counts calls, to rotate weight copies.
fn median_secs(mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    f(0)?;
    let (start, mut times) = (Instant::now(), Vec::new());
    while times.len() < MIN_RUNS
        || (start.elapsed().as_secs_f64() < MIN_SECONDS && times.len() < MAX_RUNS)
    {
        let t = Instant::now();
        f(times.len() + 1)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Runs `f` on a pool thread, as the model's decode step runs its ops: no wake-up per call.
fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

fn copies(bytes_each: usize) -> usize {
    COLD_BYTES.div_ceil(bytes_each).max(1)
}

fn line(what: &str, secs: f64, weight_bytes: usize, ops: f64, dense_secs: Option<f64>) {
    let speedup = dense_secs.map_or(String::new(), |d| format!("{:>8.2}x", d / secs));
    println!(
        "  {what:<22} {:>10.3} ms {:>9.3} GB/s {:>9.1} GOPS {speedup}",
        secs * 1e3,
        weight_bytes as f64 / secs / 1e9,
        ops / secs / 1e9,
    );
}

/// A kernel line: cold GB/s, its share of a STREAM-like read measured right after it, and
/// GB/s with the weights in cache.
fn kernel_line(what: &str, cold: f64, hot: Option<f64>, bytes: usize, stream: &StreamRead) {
    let read = stream.gbs();
    let gbs = |secs: f64| bytes as f64 / secs / 1e9;
    let hot = hot.map_or(String::new(), |h| format!("{:>9.3} GB/s hot", gbs(h)));
    println!(
        "  {what:<22} {:>10.3} ms {:>9.3} GB/s {:>5.0}% of {read:>5.2} read {hot}",
        cold * 1e3,
        gbs(cold),
        100.0 * gbs(cold) / read,
    );
}

/// STREAM's "read" kernel (one sequential stream per thread) over `COLD_BYTES`.
struct StreamRead(Vec<u64>);

impl StreamRead {
    fn new() -> Self {
        Self(
            (0..COLD_BYTES / 8)
                .into_par_iter()
                .map(|i| i as u64)
                .collect(),
        )
    }

    /// A parallel sum over the buffer, best of a few passes, in GB/s.
    fn gbs(&self) -> f64 {
        let chunk = self.0.len().div_ceil(4 * rayon::current_num_threads());
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let sum: u64 = self
                .0
                .par_chunks(chunk)
                .map(|c| {
                    // Eight independent sums, so the adds vectorize and never wait on each other.
                    let mut acc = [0u64; 8];
                    for c in c.chunks_exact(8) {
                        for (a, &v) in acc.iter_mut().zip(c) {
                            *a = a.wrapping_add(v);
                        }
                    }
                    acc.iter().fold(0u64, |s, &a| s.wrapping_add(a))
                })
                .reduce(|| 0, u64::wrapping_add);
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(sum);
        }
        COLD_BYTES as f64 / best / 1e9
    }
}

/// Voluntary context switches so far, summed over the threads of this process.
fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

fn bench_bitlinear(dev: &Device, rows: &[usize], stream: &StreamRead) -> Result<()> {
    for &(k, out, what) in &SHAPES {
        let packed = ternary_codes(out / 4 * k, out as u64 + k as u64);
        let tiles0 = TernaryTiles::from_packed(&packed, k, out)?;
        let bytes = tiles0.bytes();
        let tiles: Vec<Arc<TernaryTiles>> = (0..copies(bytes))
            .map(|_| {
                let tiles = TernaryTiles::from_packed(&packed, k, out)?;
                // As the model keeps its tiles.
                tiles.back_with_huge_pages();
                Ok(Arc::new(tiles))
            })
            .collect::<Result<_>>()?;
        let w_dense0 = Tensor::from_vec(uniform_f32(out * k, 5, 0.05), (out, k), dev)?;
        let w_dense: Vec<Tensor> = (0..copies(out * k * 4))
            .map(|_| w_dense0.copy())
            .collect::<Result<_>>()?;
        for &n in rows {
            println!("{k} → {out} ({what}), {n} rows");
            let x_vec = uniform_f32(n * k, n as u64, 2.0);
            let x = Tensor::from_vec(x_vec.clone(), (n, k), dev)?;
            let ops = 2.0 * (n * out * k) as f64;
            let dense = median_secs(|i| {
                x.matmul(&w_dense[i % w_dense.len()].t()?)?;
                Ok(())
            })?;
            line("dense f32 (candle)", dense, out * k * 4, ops, None);
            let (mut calls, switches) = (0, context_switches());
            let op = median_secs(|i| {
                calls += 1;
                bitlinear_tiles(&x, &tiles[i % tiles.len()], 1.0)?;
                Ok(())
            })?;
            let per_call = (context_switches() - switches) as f64 / calls as f64;
            let amx = if AmxSupport::is_ready() { " + Amx" } else { "" };
            line(
                &format!("op ({:?}{amx})", Kernel::best()),
                op,
                bytes,
                ops,
                Some(dense),
            );
            println!("  {:<22} {per_call:>10.2} ctx/call", "");
            let mut y = vec![0f32; n * out];
            let mut avx512_hot = None;
            for &kernel in Kernel::available() {
                if kernel == Kernel::Portable && n > PORTABLE_MAX_ROWS {
                    continue;
                }
                let mut run = |w: &TernaryTiles| {
                    let acts = QuantizedRows::new(&x_vec, n, k);
                    bitlinear_with(kernel, &acts, w, 1.0, &mut y)
                };
                let cold = in_pool(|| median_secs(|i| run(&tiles[i % tiles.len()])))?;
                let hot = in_pool(|| median_secs(|_| run(&tiles0)))?;
                kernel_line(&format!("{kernel:?}"), cold, Some(hot), bytes, stream);
                if kernel == Kernel::Avx512Vnni {
                    avx512_hot = Some(hot);
                }
            }
            if AmxSupport::is_ready() {
                let mut run = |w: &TernaryTiles| {
                    let acts = QuantizedRows::new(&x_vec, n, k);
                    bitlinear_amx(&acts, w, 1.0, &mut y)
                };
                let cold = in_pool(|| median_secs(|i| run(&tiles[i % tiles.len()])))?;
                let hot = in_pool(|| median_secs(|_| run(&tiles0)))?;
                kernel_line("Amx", cold, Some(hot), bytes, stream);
                if let Some(vnni) = avx512_hot {
                    println!("  {:<22} {:>10.2}x Avx512Vnni's hot time", "", vnni / hot);
                }
            }
        }
    }
    Ok(())
}

fn bench_head(dev: &Device, stream: &StreamRead) -> Result<()> {
    println!("LM head {HIDDEN} → {VOCAB}, 1 row");
    let x_vec = uniform_f32(HIDDEN, 9, 2.0);
    let x = Tensor::from_vec(x_vec.clone(), (1, HIDDEN), dev)?;
    let w_f32 = Tensor::from_vec(uniform_f32(VOCAB * HIDDEN, 11, 0.05), (VOCAB, HIDDEN), dev)?;
    let w_bf16 = w_f32.to_dtype(DType::BF16)?;
    let ops = 2.0 * (VOCAB * HIDDEN) as f64;
    let dense = median_secs(|_| {
        x.matmul(&w_f32.t()?)?;
        Ok(())
    })?;
    line("dense f32 (candle)", dense, VOCAB * HIDDEN * 4, ops, None);
    drop(w_f32);
    let bf16_bytes = VOCAB * HIDDEN * 2;
    let candle_bf16 = median_secs(|_| {
        x.to_dtype(DType::BF16)?.matmul(&w_bf16.t()?)?;
        Ok(())
    })?;
    line(
        "bf16 matmul (candle)",
        candle_bf16,
        bf16_bytes,
        ops,
        Some(dense),
    );
    let op = median_secs(|_| {
        matmul_bf16_weight(&x, &w_bf16)?;
        Ok(())
    })?;
    line(
        &format!("op ({:?})", Kernel::best()),
        op,
        bf16_bytes,
        ops,
        Some(dense),
    );
    let w_raw = w_bf16.flatten_all()?.to_vec1::<half::bf16>()?;
    let int8: Vec<Arc<Int8Head>> = (0..copies(VOCAB * HIDDEN))
        .map(|_| Int8Head::from_bf16(&w_raw, HIDDEN).map(Arc::new))
        .collect::<Result<_>>()?;
    let w_raw: Vec<Vec<half::bf16>> = (0..copies(bf16_bytes)).map(|_| w_raw.clone()).collect();
    let mut y = vec![0f32; VOCAB];
    let mut one_row = Vec::new();
    for &kernel in Kernel::available() {
        let secs = in_pool(|| {
            median_secs(|i| {
                let w = &w_raw[i % w_raw.len()];
                matmul_bf16(kernel, &x_vec, w, HIDDEN, &mut y)
            })
        })?;
        kernel_line(&format!("{kernel:?}"), secs, None, bf16_bytes, stream);
        one_row.push(secs);
    }
    if CompactBf16Head::is_supported(HIDDEN) {
        let compact: Vec<CompactBf16Head> = (0..copies(bf16_bytes * 3 / 4))
            .map(|_| CompactBf16Head::from_bf16(&w_raw[0], HIDDEN))
            .collect::<Result<_>>()?;
        let bytes = compact[0].bytes();
        let secs = in_pool(|| {
            median_secs(|i| {
                let head = &compact[i % compact.len()];
                matmul_compact(Kernel::best(), &x_vec, head, &mut y)
            })
        })?;
        kernel_line("compact bf16 (exact)", secs, None, bytes, stream);
        let plain = one_row.last().copied().unwrap_or(secs);
        println!(
            "  {:<22} {:>10.2}x the plain head's speed, {:.1}% of its bytes, {} raw chunks",
            "",
            plain / secs,
            100.0 * bytes as f64 / bf16_bytes as f64,
            compact[0].escaped_chunks()
        );
    }
    // Batched decode: the weights are read once for all rows, so time should grow far slower
    // than the rows (the last column: time ÷ the same kernel's one-row time).
    for n in [4, 16] {
        println!("LM head {HIDDEN} → {VOCAB}, {n} rows");
        let xs = uniform_f32(n * HIDDEN, 9 + n as u64, 2.0);
        let mut y = vec![0f32; n * VOCAB];
        for (&kernel, &one) in Kernel::available().iter().zip(&one_row) {
            if kernel == Kernel::Portable {
                continue;
            }
            let secs = median_secs(|i| {
                let w = &w_raw[i % w_raw.len()];
                matmul_bf16(kernel, &xs, w, HIDDEN, &mut y)
            })?;
            line(
                &format!("{kernel:?}"),
                secs,
                bf16_bytes,
                n as f64 * ops,
                None,
            );
            println!("  {:<22} {:>10.2}x one row's time", "", secs / one);
        }
    }
    drop(w_raw);
    let int8_bytes = int8[0].bytes();
    let op = median_secs(|i| {
        matmul_int8_head(&x, &int8[i % int8.len()])?;
        Ok(())
    })?;
    line("int8 op (opt-in)", op, int8_bytes, ops, Some(dense));
    for &kernel in Kernel::available() {
        let secs = in_pool(|| {
            median_secs(|i| matmul_int8(kernel, &x_vec, &int8[i % int8.len()], &mut y))
        })?;
        kernel_line(&format!("int8 {kernel:?}"), secs, None, int8_bytes, stream);
    }
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    println!(
        "threads: {} (rayon), kernels: {:?}, AMX: {:?}; columns: median time per call, \
         weight GB/s, GOPS (2·rows·in·out), speed-up over candle's dense f32",
        rayon::current_num_threads(),
        Kernel::available(),
        AmxSupport::get()
    );
    let stream = StreamRead::new();
    println!(
        "STREAM-like read, {} MiB: {:.2} GB/s (again after each kernel line)",
        COLD_BYTES >> 20,
        stream.gbs()
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut rows: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let head = args.iter().any(|a| a == "head");
    if rows.is_empty() && !head {
        rows = ROWS.to_vec();
    }
    bench_bitlinear(&dev, &rows, &stream)?;
    if head || args.iter().all(|a| a.starts_with('-')) {
        bench_head(&dev, &stream)?;
    }
    Ok(())
}
