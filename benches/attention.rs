//! `cargo bench --bench attention`: CPU attention (`ops::cpu::attend`) at BitNet 2B-4T's heads
//! (20 query heads, 5 KV heads of 128), for a prefill of 128 and of 512 tokens in one
//! sequence and for decode (one row per sequence). Each line prints the median time per call
//! and GFLOP/s (2 multiply-adds per query head, key and dimension: q·k and p·v); the "30
//! layers" cases rotate through 30 caches, one per layer of the model, so their keys and
//! values come from DRAM as in a decode step (GB/s: cache bytes read per call). Each kernel
//! runs over an f32 cache and over an f16 one (`KvDtype::F16`, opt-in). Threads:
//! rayon's default unless RAYON_NUM_THREADS says otherwise. Arguments narrow the run to the
//! cases whose name contains one of them (`-- prefill`).

use candle_bitnet::ops::cpu::{attend_with, AttentionShape, Kernel, SeqAttention};
use candle_bitnet::synthetic::uniform_f32;
use half::f16;
use std::time::Instant;

const SHAPE: AttentionShape = AttentionShape {
    heads: 20,
    kv_heads: 5,
    head_dim: 128,
};
/// Each measurement runs at least this long (and at least `MIN_RUNS` times) after a warm-up.
const MIN_SECONDS: f64 = 0.5;
const MIN_RUNS: usize = 3;

/// (name, sequences, new rows per sequence, positions cached before them, caches rotated)
const CASES: [(&str, usize, usize, usize, usize); 7] = [
    ("prefill 128", 1, 128, 0, 1),
    ("prefill 512", 1, 512, 0, 1),
    ("decode 1 seq at 140", 1, 1, 139, 1),
    ("decode 16 seqs at 512", 16, 1, 511, 1),
    ("decode 1 seq at 1024", 1, 1, 1023, 1),
    ("decode at 512, 30 layers", 1, 1, 511, 30),
    ("decode at 2048, 30 layers", 1, 1, 2047, 30),
];

/// Median seconds of `f` over repeated runs.
fn median_secs(mut f: impl FnMut(usize)) -> f64 {
    f(0);
    let (start, mut times) = (Instant::now(), Vec::new());
    while times.len() < MIN_RUNS || start.elapsed().as_secs_f64() < MIN_SECONDS {
        let t = Instant::now();
        f(times.len() + 1);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    println!(
        "threads: {} (rayon), kernels: {:?}; {SHAPE:?}",
        rayon::current_num_threads(),
        Kernel::available()
    );
    for (name, n_seqs, rows, before, copies) in CASES {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let keys = before + rows;
        let data: Vec<_> = (0..(n_seqs * copies) as u64)
            .map(|s| {
                let kv = keys * SHAPE.kv_width();
                (
                    uniform_f32(rows * SHAPE.q_width(), 3 * s + 1, 1.0),
                    uniform_f32(kv, 3 * s + 2, 1.0),
                    uniform_f32(kv, 3 * s + 3, 1.0),
                )
            })
            .collect();
        let data16: Vec<_> = (data.iter())
            .map(|(_, k, v)| [k, v].map(|rows| rows.iter().map(|&x| f16::from_f32(x)).collect()))
            .collect::<Vec<[Vec<f16>; 2]>>();
        let f32_seqs: Vec<SeqAttention> = data
            .iter()
            .map(|(q, k, v)| SeqAttention {
                q,
                k: k.as_slice().into(),
                v: v.as_slice().into(),
                keys,
                capacity: keys,
            })
            .collect();
        let f16_seqs: Vec<SeqAttention> = (f32_seqs.iter().zip(&data16))
            .map(|(seq, [k, v])| SeqAttention {
                k: k.as_slice().into(),
                v: v.as_slice().into(),
                ..*seq
            })
            .collect();
        let caches = [
            ("f32", f32_seqs.chunks(n_seqs).collect::<Vec<_>>(), 4),
            ("f16", f16_seqs.chunks(n_seqs).collect::<Vec<_>>(), 2),
        ];
        let visible: usize = (0..rows).map(|i| before + i + 1).sum::<usize>() * n_seqs;
        let flops = 4.0 * (visible * SHAPE.heads * SHAPE.head_dim) as f64;
        let mut y = vec![0f32; n_seqs * rows * SHAPE.q_width()];
        for &kernel in Kernel::available() {
            // The portable fallback is not what prefill runs on x86; its long case only takes time.
            if kernel == Kernel::Portable && visible > 128 * 129 / 2 {
                continue;
            }
            for (dtype, copies, element_bytes) in &caches {
                let cache_bytes = 2 * keys * SHAPE.kv_width() * n_seqs * element_bytes;
                let secs =
                    median_secs(|i| attend_with(kernel, SHAPE, copies[i % copies.len()], &mut y));
                println!(
                    "  {name:<26} {:<16} {:>9.3} ms {:>7.1} GFLOP/s {:>7.1} GB/s",
                    format!("{kernel:?} {dtype}"),
                    secs * 1e3,
                    flops / secs / 1e9,
                    cache_bytes as f64 / secs / 1e9
                );
            }
        }
    }
}
