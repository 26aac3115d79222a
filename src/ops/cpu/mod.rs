//! CPU kernels: BitLinear on packed ternary codes and the bf16-weight LM head.
//!
//! BitLinear quantizes each token to int8 (exactly as [`crate::quant::quantize_activations`]),
//! then takes exact i32 dot products with the packed 2-bit codes read in place (layout in
//! [`crate::quant`]). The codes are unsigned (value + 1), so each dot product is
//! `Σ code·x_q − Σ x_q`: unsigned×signed byte products are what VNNI (`vpdpbusd`) and AVX2
//! (`vpmaddubsw`) multiply natively. One packed row yields four output features, so each 64-byte
//! chunk of codes is split into four planes (shift + mask) that all meet the same activations.
//!
//! Work is a grid of (token block × packed-row block) tasks over rayon: decode (one token) splits
//! the rows alone, prefill reuses each decoded chunk across four tokens held in registers.
//! The kernel is picked once per process ([`Kernel::best`]); [`bitlinear_with`] forces one, so
//! the tests cover every variant the CPU can run.

mod head;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use head::{matmul_bf16, MatmulBf16Weight};

use crate::quant::{dequantize_accumulator, ACT_ABSMAX_EPS};
use candle_core::{bail, Result};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Activation rows are padded with zeros to a multiple of this, so SIMD loads of activations
/// never need a tail (the packed rows are not padded: kernels mask their last chunk).
pub const K_ALIGN: usize = 64;

/// Set to `0` to keep AVX-512 CPUs on the AVX2 kernels (to compare the two, say).
pub const AVX512_ENV: &str = "CANDLE_BITNET_AVX512";

/// A kernel family; each exists for BitLinear and for the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust, written to auto-vectorize: what NEON and other CPUs run.
    Portable,
    /// x86-64 AVX2: `vpmaddubsw` + `vpmaddwd` (the head: the portable code compiled for AVX2).
    Avx2,
    /// x86-64 AVX-512 with VNNI: `vpdpbusd` on 64 bytes (the head: AVX-512F FMA).
    Avx512Vnni,
}

impl Kernel {
    /// The variants this CPU can run, slowest first.
    pub fn available() -> &'static [Kernel] {
        static AVAILABLE: OnceLock<Vec<Kernel>> = OnceLock::new();
        AVAILABLE.get_or_init(|| {
            [Kernel::Portable, Kernel::Avx2, Kernel::Avx512Vnni]
                .into_iter()
                .filter(|k| k.detect())
                .collect()
        })
    }

    /// The fastest available variant, detected once.
    pub fn best() -> Kernel {
        Kernel::available()
            .last()
            .copied()
            .unwrap_or(Kernel::Portable)
    }

    pub fn is_available(self) -> bool {
        Kernel::available().contains(&self)
    }

    #[cfg(target_arch = "x86_64")]
    fn detect(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            // Verified bit-exact by the parity tests under emulation (bochs's Tiger Lake model,
            // dev/avx512-emulated.sh), then on AVX-512 hardware (docs/status.md).
            Kernel::Avx512Vnni => {
                std::env::var_os(AVX512_ENV).is_none_or(|v| v != "0")
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("avx512vnni")
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn detect(self) -> bool {
        self == Kernel::Portable
    }

    /// Tokens one BitLinear micro-tile handles (32 zmm fit 4 tokens × 4 planes; with 16 ymm the
    /// 2-token AVX2 tile already spills some accumulators, measured still faster than 1).
    fn max_tokens(self) -> usize {
        match self {
            Kernel::Portable => 1,
            Kernel::Avx2 => 2,
            Kernel::Avx512Vnni => 4,
        }
    }
}

/// Int8 activations of a batch, quantized once and shared by every weight row.
pub struct QuantizedRows {
    /// `[n_rows, k_padded]`, zero-padded past `in_features`.
    values: Vec<i8>,
    in_features: usize,
    k_padded: usize,
    /// Per-row `s_x = 127 / absmax`.
    scales: Vec<f32>,
    /// Per-row `Σ x_q`, subtracted to turn `Σ code·x_q` into `Σ (code − 1)·x_q`.
    sums: Vec<i32>,
}

/// One row's input and int8 output.
type QuantizeIo<'a> = (&'a [f32], &'a mut [i8]);

/// Below this many rows quantization stays on the calling thread (a rayon hop costs more).
const PAR_QUANTIZE_ROWS: usize = 8;

impl QuantizedRows {
    /// Quantizes `x`: `[n_rows, in_features]` f32.
    pub fn new(x: &[f32], n_rows: usize, in_features: usize) -> Self {
        let k_padded = in_features.next_multiple_of(K_ALIGN);
        let mut values = vec![0i8; n_rows * k_padded];
        let mut scales = vec![0f32; n_rows];
        let mut sums = vec![0i32; n_rows];
        let quantize = |((row, q), (s, sum)): (QuantizeIo, (&mut f32, &mut i32))| {
            (*s, *sum) = quantize_row(row, &mut q[..in_features]);
        };
        let rows = x.chunks_exact(in_features.max(1)).take(n_rows);
        if n_rows >= PAR_QUANTIZE_ROWS {
            rows.collect::<Vec<_>>()
                .into_par_iter()
                .zip(values.par_chunks_exact_mut(k_padded))
                .zip(scales.par_iter_mut().zip(&mut sums))
                .for_each(quantize);
        } else {
            rows.zip(values.chunks_exact_mut(k_padded))
                .zip(scales.iter_mut().zip(&mut sums))
                .for_each(quantize);
        }
        Self {
            values,
            in_features,
            k_padded,
            scales,
            sums,
        }
    }

    pub fn n_rows(&self) -> usize {
        self.scales.len()
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Rows `t..t + n`, `[n, k_padded]`.
    fn rows(&self, t: usize, n: usize) -> &[i8] {
        &self.values[t * self.k_padded..(t + n) * self.k_padded]
    }
}

/// [`crate::quant::quantize_activations`] plus `Σ x_q`, through the fastest build of
/// [`quantize_row_body`]: on x86 the SSE4.1 `roundps` instead of a libm `roundevenf` call per
/// value (x86-64's baseline lacks it), which otherwise costs as much as a prefill matmul.
fn quantize_row(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if Kernel::Avx2.is_available() {
        // SAFETY: AVX2 is available.
        return unsafe { x86::quantize_row_avx2(x, q) };
    }
    quantize_row_body(x, q)
}

/// The same IEEE operations as [`crate::quant::quantize_activations`], so the same results
/// (the parity tests compare every bit).
#[inline(always)]
fn quantize_row_body(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = 127.0 / absmax.max(ACT_ABSMAX_EPS);
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8;
        sum += *q as i32;
    }
    (scale, sum)
}

/// `y[t, k·R + j] = (Σ_c W[k·R + j, c]·x_q[t, c]) / (w_div · s_x[t])` for all rows `t`, with the
/// best kernel. `packed` is `[R, in_features]` with `R = out_features / 4`; `y` is
/// `[n_rows, out_features]`.
pub fn bitlinear(
    acts: &QuantizedRows,
    packed: &[u8],
    in_features: usize,
    out_features: usize,
    w_div: f32,
    y: &mut [f32],
) -> Result<()> {
    bitlinear_with(
        Kernel::best(),
        acts,
        packed,
        in_features,
        out_features,
        w_div,
        y,
    )
}

/// [`bitlinear`] with a chosen kernel; fails if the CPU lacks it or the shapes disagree.
pub fn bitlinear_with(
    kernel: Kernel,
    acts: &QuantizedRows,
    packed: &[u8],
    in_features: usize,
    out_features: usize,
    w_div: f32,
    y: &mut [f32],
) -> Result<()> {
    if !kernel.is_available() {
        bail!("bitlinear: kernel {kernel:?} is not supported by this CPU")
    }
    let (n_rows, r) = (acts.n_rows(), out_features / 4);
    if !out_features.is_multiple_of(4)
        || acts.in_features != in_features
        || packed.len() != r * in_features
        || y.len() != n_rows * out_features
    {
        bail!(
            "bitlinear: {n_rows}×{} activations, {} packed bytes and {} outputs for a \
             [{out_features}, {in_features}] weight",
            acts.in_features,
            packed.len(),
            y.len()
        )
    }
    if n_rows == 0 || r == 0 {
        return Ok(());
    }
    let grid = Grid::new(n_rows, r, in_features, rayon::current_num_threads());
    let out = OutPtr(y.as_mut_ptr());
    (0..grid.tasks()).into_par_iter().for_each(|task| {
        let (tokens, rows) = grid.task(task);
        let store = |t: usize, j: usize, dots: [i32; 4]| {
            let (s, sum) = (acts.scales[t], acts.sums[t]);
            for (k, d) in dots.into_iter().enumerate() {
                let v = dequantize_accumulator(d - sum, s, w_div);
                // SAFETY: t < n_rows, j < r, so the index is inside `y`; tasks own disjoint
                // (token, packed-row) ranges and (t, k, j) ↦ t·out + k·r + j is injective, so
                // no two threads write the same element, and `y` outlives the parallel loop.
                unsafe { out.write(t * out_features + k * r + j, v) };
            }
        };
        run_task(kernel, acts, packed, in_features, tokens, rows, store);
    });
    Ok(())
}

/// The output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

impl OutPtr {
    /// # Safety
    /// `i` is in bounds of the slice the pointer came from, which is alive, and no other
    /// thread accesses element `i` concurrently.
    unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: the caller's contract.
        unsafe { *self.0.add(i) = v }
    }
}

// SAFETY: only used for writes to disjoint elements, see the call sites.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Per-task bytes of packed rows: the block is re-read once per 4-token group, so it should
/// stay in L2 (512 KiB and up on current x86 and ARM cores).
const TASK_WEIGHT_BYTES: usize = 256 << 10;
/// Tokens per task: bounds the activations a task walks (64 rows of 2560 = 160 KiB).
const TASK_TOKENS: usize = 64;
/// Tasks per thread, so that uneven cores or a busy thread still balance.
const TASKS_PER_THREAD: usize = 4;

/// A split of `[n_rows tokens] × [r packed rows]` into equal rectangles.
struct Grid {
    n_rows: usize,
    r: usize,
    token_block: usize,
    row_block: usize,
    row_blocks: usize,
}

impl Grid {
    fn new(n_rows: usize, r: usize, in_features: usize, threads: usize) -> Self {
        let token_block = n_rows.min(TASK_TOKENS);
        let token_blocks = n_rows.div_ceil(token_block);
        let for_balance = (threads * TASKS_PER_THREAD).div_ceil(token_blocks);
        let for_cache = (r * in_features).div_ceil(TASK_WEIGHT_BYTES);
        // Even blocks let the single-token path pair rows throughout.
        let row_block = r
            .div_ceil(for_balance.max(for_cache).clamp(1, r))
            .next_multiple_of(2);
        Self {
            n_rows,
            r,
            token_block,
            row_block,
            row_blocks: r.div_ceil(row_block),
        }
    }

    fn tasks(&self) -> usize {
        self.n_rows.div_ceil(self.token_block) * self.row_blocks
    }

    fn task(&self, i: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let (tb, rb) = (i / self.row_blocks, i % self.row_blocks);
        let t0 = tb * self.token_block;
        let j0 = rb * self.row_block;
        (
            t0..(t0 + self.token_block).min(self.n_rows),
            j0..(j0 + self.row_block).min(self.r),
        )
    }
}

/// One task: groups of up to `max_tokens` tokens (outer, so they stay in L1) against the packed
/// rows (inner, from L2); a single token takes rows in pairs for more independent accumulators.
fn run_task(
    kernel: Kernel,
    acts: &QuantizedRows,
    packed: &[u8],
    k: usize,
    tokens: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    mut store: impl FnMut(usize, usize, [i32; 4]),
) {
    let mut dots = [[0i32; 4]; 4];
    let mut t = tokens.start;
    while t < tokens.end {
        let nt = kernel.max_tokens().min(tokens.end - t);
        let x = acts.rows(t, nt);
        let mut j = rows.start;
        while j < rows.end {
            let np = if nt == 1 && j + 2 <= rows.end { 2 } else { 1 };
            let w = &packed[j * k..(j + np) * k];
            let dots = &mut dots[..np * nt];
            tile(kernel, w, k, np, x, acts.k_padded, nt, dots);
            for (i, d) in dots.iter().enumerate() {
                // `dots` is [np][nt]
                store(t + i % nt, j + i / nt, *d);
            }
            j += np;
        }
        t += nt;
    }
}

/// Raw `Σ_c code_k(w[p, c])·x[t, c]` for `np` packed rows `w` (`[np, k]`) and `nt` token rows `x`
/// (`[nt, kp]`, zero-padded), into `dots` `[np][nt]`.
#[allow(clippy::too_many_arguments)]
fn tile(
    kernel: Kernel,
    w: &[u8],
    k: usize,
    np: usize,
    x: &[i8],
    kp: usize,
    nt: usize,
    dots: &mut [[i32; 4]],
) {
    match kernel {
        // SAFETY (both arms): `bitlinear_with` runs only kernels from `Kernel::available()`,
        // and `run_task` passes whole rows: `w` is [np, k], `x` is [nt, kp] with kp = k rounded
        // up to 64, nt ≤ max_tokens, np = 2 only for one token.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => unsafe { x86::tile_vnni(w, k, np, x, kp, nt, dots) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::tile_avx2(w, k, np, x, kp, nt, dots) },
        _ => {
            for (i, d) in dots.iter_mut().enumerate() {
                let (p, t) = (i / nt, i % nt);
                *d = code_dots_portable(&w[p * k..(p + 1) * k], &x[t * kp..(t + 1) * kp]);
            }
        }
    }
}

/// `Σ_c ((packed[c] >> 2k) & 3) · x[c]` for k = 0..4: one packed row against one activation row.
/// `x` may be longer than `packed` (padding); only `packed.len()` columns are used.
fn code_dots_portable(packed: &[u8], x: &[i8]) -> [i32; 4] {
    let mut acc = [0i32; 4];
    for (&p, &x) in packed.iter().zip(x) {
        let x = x as i32;
        acc[0] += (p & 3) as i32 * x;
        acc[1] += ((p >> 2) & 3) as i32 * x;
        acc[2] += ((p >> 4) & 3) as i32 * x;
        acc[3] += (p >> 6) as i32 * x;
    }
    acc
}
