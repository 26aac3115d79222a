//! CPU kernels: BitLinear on ternary row tiles, and the LM head on bf16 or (opt-in) int8 weights.
//!
//! BitLinear quantizes each token to int8 (exactly as [`crate::quant::quantize_activations`]),
//! then takes exact i32 dot products with the 2-bit codes of [`TernaryTiles`], the layout the
//! kernels want, converted once from the canonical one of [`crate::quant`]. The codes are
//! unsigned (value + 1), so each dot product is `Σ code·x_q − Σ x_q`: unsigned×signed byte
//! products are what VNNI (`vpdpbusd`) and AVX2 (`vpmaddubsw`) multiply natively. In a tile each
//! i32 lane is one output row, so a kernel streams codes against broadcast activations and
//! never reduces across lanes; decode streams four tiles at once (16 accumulators, prefetch).
//!
//! Work is a grid of (token block × tile block) tasks over rayon; a projection too small to pay
//! for waking the pool runs on the calling thread. Waking costs most when the caller is not a
//! rayon worker: it sleeps on every op (~4 voluntary context switches per call); running the
//! whole decode step inside the pool (`rayon::scope`) keeps the workers awake between ops.
//! The kernel is picked once per process ([`Kernel::best`]); [`bitlinear_with`] forces one, so
//! the tests cover every variant the CPU can run.
//!
//! On CPUs with Intel AMX, tasks of [`AMX_MIN_TOKENS`] tokens or more multiply on AMX tiles
//! instead (`amx.rs`), beside the AVX-512 kernel rather than as a [`Kernel`] of its own: it
//! has no LM head and no one-token path, which stay on [`Kernel::Avx512Vnni`] (AMX implies it).
//! [`bitlinear_amx`] forces it for every token count, for the tests.

mod activation;
#[cfg(target_arch = "x86_64")]
mod amx;
mod attention;
mod compact_head;
mod head;
mod huge_pages;
mod tiles;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use activation::Relu2Product;
pub use attention::{
    attend, attend_in, attend_with, rope_in_place, AttentionShape, AttentionWork, KvRows,
    SeqAttention,
};
pub use compact_head::{matmul_compact, matmul_compact_in, CompactBf16Head, MatmulCompactHead};
pub use head::{
    matmul_bf16, matmul_bf16_in, matmul_int8, Int8Head, MatmulBf16Weight, MatmulInt8Head,
};
#[cfg(target_os = "linux")]
pub(crate) use huge_pages::whole_pages;
pub use huge_pages::{back_with_huge_pages, wait_for_huge_pages};
use tiles::BLOCK_BYTES;
pub use tiles::{TernaryTiles, TILE_ROWS};

/// Hands the allocator's free pages back to the system (glibc's `malloc_trim`). Loading frees
/// the packed codes each layer is converted from between the tiles it keeps, and glibc keeps
/// such holes resident: at 2B-4T, `bitnet serve` held 1.48 GB after load, 1.04 GB of it live.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only returns whole free pages of the allocator's own arenas.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Hints the cache line holding `at` into L1 (or, `to_l2`, into L2 only). A prefetch never
/// faults, so `at` may lie past the end of its buffer: build it with `wrapping_add`.
/// Streams prefetch ahead because the hardware prefetcher stops at each 4 KiB page.
#[inline(always)]
pub(super) fn prefetch<T>(at: *const T, to_l2: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        // SAFETY: SSE, which x86-64 always has; a prefetch reads nothing.
        unsafe {
            if to_l2 {
                _mm_prefetch::<_MM_HINT_T1>(at.cast());
            } else {
                _mm_prefetch::<_MM_HINT_T0>(at.cast());
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, to_l2);
}

use crate::quant::{dequantize_accumulator, ACT_ABSMAX_EPS};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

/// Activation rows are padded with zeros to a multiple of this, so SIMD loads of activations
/// never need a tail (the packed rows are not padded: kernels mask their last chunk).
pub const K_ALIGN: usize = 64;

/// Set to `0` to keep AVX-512 CPUs on the AVX2 kernels (to compare the two, say); it turns
/// AMX off too.
pub const AVX512_ENV: &str = "CANDLE_BITNET_AVX512";

/// Set to `0` to keep AVX-VNNI CPUs (Intel since Alder Lake, AMD since Zen 5) on the AVX2
/// BitLinear kernel, as a CPU without it runs; with `CANDLE_BITNET_AVX512=0` too, an AVX-512
/// machine runs what Zen 3 or Skylake would.
pub const AVX_VNNI_ENV: &str = "CANDLE_BITNET_AVX_VNNI";

/// Set to `0` to keep AMX CPUs on the AVX-512 kernel for every token count.
pub const AMX_ENV: &str = "CANDLE_BITNET_AMX";

/// Tasks of at least this many tokens run on AMX where the CPU has it: below, decoding the
/// codes to bytes costs more than the tile multiply saves over `vpdpbusd` (2560 → 2560 on a
/// Xeon with AMX: 0.8–0.95× the AVX-512 kernel's speed at 4 tokens, 1.2× at 5, 2.5× at 16).
pub const AMX_MIN_TOKENS: usize = 5;

/// Whether BitLinear can use Intel AMX tiles in this process, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmxSupport {
    /// BitLinear uses AMX from [`AMX_MIN_TOKENS`] tokens.
    Ready,
    /// The CPU lacks AMX-TILE, AMX-INT8 or AVX-512 (or `CANDLE_BITNET_AVX512=0`).
    NotInCpu,
    /// `CANDLE_BITNET_AMX=0`.
    TurnedOff,
    /// The OS refused the tile state (Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM)`, or not Linux).
    RefusedByOs,
}

impl AmxSupport {
    /// Detected once per process (the first call asks the OS for the tile state).
    pub fn get() -> AmxSupport {
        static SUPPORT: OnceLock<AmxSupport> = OnceLock::new();
        *SUPPORT.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let enabled = std::env::var_os(AMX_ENV).is_none_or(|v| v != "0");
                amx::detect(enabled, Kernel::Avx512Vnni.is_available())
            }
            #[cfg(not(target_arch = "x86_64"))]
            AmxSupport::NotInCpu
        })
    }

    pub fn is_ready() -> bool {
        AmxSupport::get() == AmxSupport::Ready
    }
}

/// A kernel family; each exists for BitLinear and for the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust, written to auto-vectorize: what NEON and other CPUs run.
    Portable,
    /// x86-64 AVX2: `vpmaddubsw` + `vpmaddwd` (the head: the portable code compiled for AVX2).
    Avx2,
    /// x86-64 AVX2 with AVX-VNNI: BitLinear on 256-bit `vpdpbusd`; the head and attention as
    /// [`Kernel::Avx2`].
    AvxVnni,
    /// x86-64 AVX-512 with VNNI: `vpdpbusd` on 64 bytes (the head: AVX-512F FMA).
    Avx512Vnni,
}

impl Kernel {
    /// The variants this CPU can run, slowest first.
    pub fn available() -> &'static [Kernel] {
        static AVAILABLE: OnceLock<Vec<Kernel>> = OnceLock::new();
        AVAILABLE.get_or_init(|| {
            [
                Kernel::Portable,
                Kernel::Avx2,
                Kernel::AvxVnni,
                Kernel::Avx512Vnni,
            ]
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
            // F16C (every AVX2 CPU has it) widens f16 KV caches.
            Kernel::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            Kernel::AvxVnni => {
                std::env::var_os(AVX_VNNI_ENV).is_none_or(|v| v != "0")
                    && Kernel::Avx2.detect()
                    && is_x86_feature_detected!("avxvnni")
            }
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

    /// Tokens one BitLinear call of the kernel handles (32 zmm hold 4 tokens × 4 bit fields of
    /// accumulators; 16 ymm hold 2 tokens × 4 fields of half a tile).
    fn max_tokens(self) -> usize {
        match self {
            Kernel::Portable => 1,
            Kernel::Avx2 | Kernel::AvxVnni => 2,
            Kernel::Avx512Vnni => 4,
        }
    }

    /// Tiles one call walks side by side for `nt` tokens, at most `left`: the AVX-512 kernel
    /// keeps 16 accumulators busy, so a lone token streams four tiles at once.
    fn tiles_in_flight(self, nt: usize, left: usize) -> usize {
        match (self, nt) {
            (Kernel::Avx512Vnni, 1) if left >= 4 => 4,
            (Kernel::Avx512Vnni, 1 | 2) if left >= 2 => 2,
            _ => 1,
        }
    }
}

/// 64 activations on a cache line of their own: rows start aligned, so AMX tile loads (a line
/// per row) never split one.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; K_ALIGN]);

/// Int8 activations of a batch, quantized once and shared by every weight row.
#[derive(Default)]
pub struct QuantizedRows {
    /// `[n_rows, k_padded]`, zero-padded past `in_features`.
    values: Vec<Line>,
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
        Self::build(x, n_rows, in_features, quantize_row)
    }

    /// RMSNorm by `norm_weight` (`[in_features]`, the f32 arithmetic of [`crate::norm`]),
    /// then quantization, row by row: the same int8 values and scales as quantizing the
    /// normalized tensor, without it.
    pub fn from_rms_norm(x: &[f32], n_rows: usize, norm_weight: &[f32], eps: f32) -> Result<Self> {
        let in_features = norm_weight.len();
        if in_features == 0 || x.len() != n_rows * in_features {
            bail!(
                "rms_norm + quantize: {} inputs for {n_rows} rows of {in_features}",
                x.len()
            )
        }
        Ok(Self::build(x, n_rows, in_features, |row, q| {
            let mut normed = vec![0f32; row.len()];
            crate::norm::rms_norm_row(row, norm_weight, eps, &mut normed);
            quantize_row(&normed, q)
        }))
    }

    /// Rows quantized elsewhere: `codes` `[n_rows, stride]` (`stride ≥ in_features`), with
    /// each row's scale `s_x` and `Σ x_q`.
    pub fn from_parts(
        codes: &[i8],
        stride: usize,
        in_features: usize,
        scales: Vec<f32>,
        sums: Vec<i32>,
    ) -> Result<Self> {
        let n_rows = scales.len();
        if stride < in_features || codes.len() != n_rows * stride || sums.len() != n_rows {
            bail!(
                "quantized rows: {} codes, {} scales and {} sums for rows of {in_features} in {stride}",
                codes.len(),
                n_rows,
                sums.len()
            )
        }
        let k_padded = in_features.next_multiple_of(K_ALIGN);
        let mut values = vec![Line([0; K_ALIGN]); n_rows * k_padded / K_ALIGN];
        for (line, row) in values
            .chunks_exact_mut(k_padded / K_ALIGN)
            .zip(codes.chunks_exact(stride))
        {
            for (c, &q) in row[..in_features].iter().enumerate() {
                line[c / K_ALIGN].0[c % K_ALIGN] = q;
            }
        }
        Ok(Self {
            values,
            in_features,
            k_padded,
            scales,
            sums,
        })
    }

    /// Quantizes `x` like [`Self::new`], into these rows' buffers: once they have held as many
    /// rows of as many features, nothing is allocated (a decode step, token after token).
    pub fn requantize(&mut self, x: &[f32], n_rows: usize, in_features: usize) {
        self.fill(x, n_rows, in_features, quantize_row)
    }

    /// Runs `quantize(row, q)` on each row, in parallel for large batches.
    fn build(
        x: &[f32],
        n_rows: usize,
        in_features: usize,
        quantize: impl Fn(&[f32], &mut [i8]) -> (f32, i32) + Sync,
    ) -> Self {
        let mut rows = Self::default();
        rows.fill(x, n_rows, in_features, quantize);
        rows
    }

    /// [`Self::build`] into `self`'s buffers.
    fn fill(
        &mut self,
        x: &[f32],
        n_rows: usize,
        in_features: usize,
        quantize: impl Fn(&[f32], &mut [i8]) -> (f32, i32) + Sync,
    ) {
        let k_padded = in_features.next_multiple_of(K_ALIGN);
        let Self {
            values,
            scales,
            sums,
            ..
        } = self;
        // Cleared first: the padding must be zeros whatever the last call left there.
        values.clear();
        values.resize(n_rows * k_padded / K_ALIGN, Line([0; K_ALIGN]));
        // SAFETY: `Line` is `repr(C)` over `[i8; 64]` with no padding, so the lines are the
        // same memory as `64 · len` bytes, borrowed mutably only through this slice.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<i8>(), values.len() * K_ALIGN)
        };
        scales.clear();
        scales.resize(n_rows, 0.0);
        sums.clear();
        sums.resize(n_rows, 0);
        let quantize = |((row, q), (s, sum)): (QuantizeIo, (&mut f32, &mut i32))| {
            (*s, *sum) = quantize(row, &mut q[..in_features]);
        };
        let rows = x.chunks_exact(in_features.max(1)).take(n_rows);
        if n_rows >= PAR_QUANTIZE_ROWS {
            rows.collect::<Vec<_>>()
                .into_par_iter()
                .zip(bytes.par_chunks_exact_mut(k_padded))
                .zip(scales.par_iter_mut().zip(sums))
                .for_each(quantize);
        } else {
            rows.zip(bytes.chunks_exact_mut(k_padded))
                .zip(scales.iter_mut().zip(sums))
                .for_each(quantize);
        }
        self.in_features = in_features;
        self.k_padded = k_padded;
    }

    pub fn n_rows(&self) -> usize {
        self.scales.len()
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Rows `t..t + n`, `[n, k_padded]`, 64-byte aligned.
    fn rows(&self, t: usize, n: usize) -> &[i8] {
        let lines = &self.values[t * self.k_padded / K_ALIGN..(t + n) * self.k_padded / K_ALIGN];
        // SAFETY: as in `build`: the lines are `64 · len` initialized bytes, alive as `self`.
        unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * K_ALIGN) }
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

/// BitLinear with weights held in the tile layout: `x: [.., in]` (f32/bf16/f16) to
/// `[.., out]` in x's dtype. CPU only: devices keep the canonical layout.
#[derive(Debug, Clone)]
pub struct BitLinearTilesOp {
    pub w: Arc<TernaryTiles>,
    /// Per segment of `w`, the divisor of the i32 accumulator besides the activation scale
    /// (see [`crate::quant`]).
    pub w_divs: Vec<f32>,
}

impl CustomOp1 for BitLinearTilesOp {
    fn name(&self) -> &'static str {
        "bitlinear-tiles"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let k = self.w.in_features();
        let dims = layout.shape().dims();
        if dims.last() != Some(&k) {
            bail!("bitlinear: input shape {dims:?}, last dimension must be {k}")
        }
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = self.w.out_features();
        }
        let n_rows = layout.shape().elem_count() / k;
        let y = bitlinear_storage(x, layout, n_rows, &self.w, &self.w_divs)?;
        Ok((y, Shape::from(out)))
    }
}

/// RMSNorm (f32, weight `[in]`) fused with BitLinear through tiles: `x: [.., in]` f32 to
/// `[.., Σ out]` f32, the same bits as the norm followed by [`BitLinearTilesOp`].
#[derive(Debug, Clone)]
pub struct RmsNormBitLinearOp {
    pub eps: f32,
    pub w: Arc<TernaryTiles>,
    /// Per segment of `w` (see [`BitLinearTilesOp`]).
    pub w_divs: Vec<f32>,
}

impl CustomOp2 for RmsNormBitLinearOp {
    fn name(&self) -> &'static str {
        "rms-norm-bitlinear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        layout: &Layout,
        norm_weight: &CpuStorage,
        norm_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(nw)) = (x, norm_weight) else {
            bail!(
                "rms-norm-bitlinear: needs f32 input and norm weight, found {:?} and {:?}",
                x.dtype(),
                norm_weight.dtype()
            )
        };
        let k = self.w.in_features();
        let dims = layout.shape().dims();
        if dims.last() != Some(&k) || norm_layout.shape().elem_count() != k {
            bail!(
                "rms-norm-bitlinear: input shape {dims:?} and norm weight {:?} for {k} features",
                norm_layout.shape().dims()
            )
        }
        let (x, nw) = (
            super::contiguous(x, layout)?,
            super::contiguous(nw, norm_layout)?,
        );
        let n_rows = x.len() / k;
        let acts = QuantizedRows::from_rms_norm(x, n_rows, nw, self.eps)?;
        let mut y = vec![0f32; n_rows * self.w.out_features()];
        bitlinear_segments(&acts, &self.w, &self.w_divs, &mut y)?;
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = self.w.out_features();
        }
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

/// Quantizes `n_rows` rows of a float `x`, runs [`bitlinear`] and returns the output in x's
/// dtype: the body of both CPU BitLinear ops.
pub(super) fn bitlinear_storage(
    x: &CpuStorage,
    layout: &Layout,
    n_rows: usize,
    w: &TernaryTiles,
    w_divs: &[f32],
) -> Result<CpuStorage> {
    let x_f32 = super::to_f32(x, layout)?;
    let acts = QuantizedRows::new(&x_f32, n_rows, w.in_features());
    let mut y = vec![0f32; n_rows * w.out_features()];
    bitlinear_segments(&acts, w, w_divs, &mut y)?;
    super::from_f32(y, x.dtype())
}

/// `y[t, o] = (Σ_c W[o, c]·x_q[t, c]) / (w_div · s_x[t])` for all rows `t`, with the best
/// kernel (AMX from [`AMX_MIN_TOKENS`] tokens, where ready); `y` is `[n_rows, out_features]`.
pub fn bitlinear(acts: &QuantizedRows, w: &TernaryTiles, w_div: f32, y: &mut [f32]) -> Result<()> {
    bitlinear_segments(acts, w, std::slice::from_ref(&w_div), y)
}

/// [`bitlinear`] with a chosen kernel and no AMX; fails if the CPU lacks it or the shapes
/// disagree.
pub fn bitlinear_with(
    kernel: Kernel,
    acts: &QuantizedRows,
    w: &TernaryTiles,
    w_div: f32,
    y: &mut [f32],
) -> Result<()> {
    bitlinear_segments_with(kernel, acts, w, std::slice::from_ref(&w_div), y)
}

/// [`bitlinear`] on AMX tiles for every token count (the tests check it on all of them; rows
/// of 2²³ columns or more stay on the AVX-512 kernel); fails unless [`AmxSupport::is_ready`].
pub fn bitlinear_amx(
    acts: &QuantizedRows,
    w: &TernaryTiles,
    w_div: f32,
    y: &mut [f32],
) -> Result<()> {
    bitlinear_segments_amx(acts, w, std::slice::from_ref(&w_div), y)
}

/// BitLinear through tiles of several projections ([`TernaryTiles::from_segments`]), one
/// `w_div` each, with the best kernel: one quantization of `acts` and one parallel pass for
/// all of them. `y` is `[n_rows, Σ out]`, segments side by side.
pub fn bitlinear_segments(
    acts: &QuantizedRows,
    w: &TernaryTiles,
    w_divs: &[f32],
    y: &mut [f32],
) -> Result<()> {
    let amx_from = AmxSupport::is_ready().then_some(AMX_MIN_TOKENS);
    run_bitlinear(Kernel::best(), amx_from, acts, w, w_divs, y)
}

/// [`bitlinear_segments`] with a chosen kernel and no AMX.
pub fn bitlinear_segments_with(
    kernel: Kernel,
    acts: &QuantizedRows,
    w: &TernaryTiles,
    w_divs: &[f32],
    y: &mut [f32],
) -> Result<()> {
    run_bitlinear(kernel, None, acts, w, w_divs, y)
}

/// [`bitlinear_segments`] on AMX tiles for every token count.
pub fn bitlinear_segments_amx(
    acts: &QuantizedRows,
    w: &TernaryTiles,
    w_divs: &[f32],
    y: &mut [f32],
) -> Result<()> {
    match AmxSupport::get() {
        AmxSupport::Ready => run_bitlinear(Kernel::best(), Some(1), acts, w, w_divs, y),
        why => bail!("bitlinear: AMX is not available ({why:?})"),
    }
}

/// BitLinear with `kernel`, and AMX for tasks of at least `amx_from` tokens.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn run_bitlinear(
    kernel: Kernel,
    amx_from: Option<usize>,
    acts: &QuantizedRows,
    w: &TernaryTiles,
    w_divs: &[f32],
    y: &mut [f32],
) -> Result<()> {
    if !kernel.is_available() {
        bail!("bitlinear: kernel {kernel:?} is not supported by this CPU")
    }
    let (n_rows, out) = (acts.n_rows(), w.out_features());
    if acts.in_features != w.in_features() || y.len() != n_rows * out {
        bail!(
            "bitlinear: {n_rows}×{} activations and {} outputs for a [{out}, {}] weight",
            acts.in_features,
            y.len(),
            w.in_features()
        )
    }
    if w_divs.len() != w.segments().len() {
        bail!(
            "bitlinear: {} weight scales for {} projections",
            w_divs.len(),
            w.segments().len()
        )
    }
    if n_rows == 0 {
        return Ok(());
    }
    let grid = Grid::new(n_rows, w, rayon::current_num_threads(), kernel);
    let out_ptr = OutPtr(y.as_mut_ptr());
    let task = |task: usize| {
        let (tokens, tiles) = grid.task(task);
        let store = |t: usize, tile: usize, dots: &[i32; TILE_ROWS]| {
            let (s, sum) = (acts.scales[t], acts.sums[t]);
            let (segment, o0, len) = w.tile_output(tile);
            let w_div = w_divs[segment];
            // SAFETY: t < n_rows and o0 + len ≤ out, so the range is inside `y`; tasks own
            // disjoint (token, tile) ranges, so no two threads write the same element, and
            // `y` outlives the parallel loop.
            let y = unsafe { out_ptr.slice(t * out + o0, len) };
            for (y, &d) in y.iter_mut().zip(dots) {
                *y = dequantize_accumulator(d - sum, s, w_div);
            }
        };
        #[cfg(target_arch = "x86_64")]
        if amx_from.is_some_and(|from| tokens.len() >= from) && acts.k_padded <= amx::MAX_COLS {
            let (t0, n) = (tokens.start, tokens.len());
            // SAFETY: `amx_from` is set only when AMX is ready; the rows are whole padded
            // activation rows (64-byte aligned, kp a multiple of 64 ≥ 4·steps, ≤ MAX_COLS),
            // at most TASK_TOKENS = 16·MAX_GROUPS of them, and `tiles` comes from the grid
            // over `w`.
            unsafe {
                amx::run_task(
                    w,
                    tiles,
                    acts.rows(t0, n),
                    acts.k_padded,
                    n,
                    |t, tile, d| store(t0 + t, tile, d),
                )
            };
            return;
        }
        run_task(kernel, acts, w, tokens, tiles, store);
    };
    if grid.tasks() == 1 {
        task(0);
    } else {
        (0..grid.tasks()).into_par_iter().for_each(task);
    }
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

    /// # Safety
    /// `start..start + len` is in bounds of the slice the pointer came from, which is alive,
    /// and no other thread accesses that range while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

// SAFETY: only used for writes to disjoint elements, see the call sites.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Per-task bytes of tiles: the block is re-read once per token group, so it should stay in
/// L2 (512 KiB and up on current x86 and ARM cores).
const TASK_WEIGHT_BYTES: usize = 256 << 10;
/// Tokens per task: bounds the activations a task walks (64 rows of 2560 = 160 KiB).
const TASK_TOKENS: usize = 64;
// An AMX task holds all its token groups' sums at once.
#[cfg(target_arch = "x86_64")]
const _: () = assert!(TASK_TOKENS <= amx::GROUP_TOKENS * amx::MAX_GROUPS);
/// Tasks per thread, so that uneven cores or a busy thread still balance.
const TASKS_PER_THREAD: usize = 4;
/// Below this many bytes of weights per token row, one thread does the whole op: waking the
/// pool costs more than it saves.
const SERIAL_BYTES: usize = 96 << 10;

/// A split of `[n_rows tokens] × [tiles]` into equal rectangles.
struct Grid {
    n_rows: usize,
    tiles: usize,
    token_block: usize,
    tile_block: usize,
    tile_blocks: usize,
}

impl Grid {
    fn new(n_rows: usize, w: &TernaryTiles, threads: usize, kernel: Kernel) -> Self {
        let tiles = w.tiles();
        // Near-equal blocks (65 rows: 33 + 32, not 64 + 1), so no task is left with a sliver.
        let token_blocks = n_rows.div_ceil(TASK_TOKENS);
        let token_block = n_rows.div_ceil(token_blocks);
        let tasks = if n_rows * w.bytes() < SERIAL_BYTES {
            1
        } else {
            (threads * TASKS_PER_THREAD).div_ceil(token_blocks)
        };
        let for_cache = w.bytes().div_ceil(TASK_WEIGHT_BYTES);
        let mut tile_block = tiles.div_ceil(tasks.max(for_cache).clamp(1, tiles));
        if n_rows == 1 && tasks > 1 {
            // A lone token streams several tiles at once: whole groups of them per task, or
            // a task ends on a single stream (2B-4T down_proj: blocks of 3 tiles ran as 2 + 1).
            let in_flight = kernel.tiles_in_flight(1, usize::MAX);
            tile_block = (tile_block / in_flight * in_flight)
                .max(in_flight)
                .min(tiles);
        }
        Self {
            n_rows,
            tiles,
            token_block,
            tile_block,
            tile_blocks: tiles.div_ceil(tile_block),
        }
    }

    fn tasks(&self) -> usize {
        self.n_rows.div_ceil(self.token_block) * self.tile_blocks
    }

    fn task(&self, i: usize) -> (Range<usize>, Range<usize>) {
        let (tb, rb) = (i / self.tile_blocks, i % self.tile_blocks);
        let t0 = tb * self.token_block;
        let j0 = rb * self.tile_block;
        (
            t0..(t0 + self.token_block).min(self.n_rows),
            j0..(j0 + self.tile_block).min(self.tiles),
        )
    }
}

/// One task: groups of up to `max_tokens` tokens (outer, so they stay in L1) against the tiles
/// (inner, from L2); a single token walks several tiles at once, for more loads in flight.
fn run_task(
    kernel: Kernel,
    acts: &QuantizedRows,
    w: &TernaryTiles,
    tokens: Range<usize>,
    tiles: Range<usize>,
    mut store: impl FnMut(usize, usize, &[i32; TILE_ROWS]),
) {
    let mut dots = [[0i32; TILE_ROWS]; 4];
    let mut t = tokens.start;
    while t < tokens.end {
        let nt = kernel.max_tokens().min(tokens.end - t);
        let x = acts.rows(t, nt);
        let mut j = tiles.start;
        while j < tiles.end {
            let ng = kernel.tiles_in_flight(nt, tiles.end - j);
            let dots = &mut dots[..ng * nt];
            tile(kernel, w, j..j + ng, x, acts.k_padded, nt, dots);
            for (i, d) in dots.iter().enumerate() {
                // `dots` is [ng][nt]
                store(t + i % nt, j + i / nt, d);
            }
            j += ng;
        }
        t += nt;
    }
}

/// Raw `Σ_c code(W[o, c])·x[t, c]` of every row `o` of `tiles` and each of the `nt` token rows
/// `x` (`[nt, kp]`, zero-padded), into `dots` `[tiles][nt]`.
fn tile(
    kernel: Kernel,
    w: &TernaryTiles,
    tiles: Range<usize>,
    x: &[i8],
    kp: usize,
    nt: usize,
    dots: &mut [[i32; TILE_ROWS]],
) {
    let (steps, ng) = (w.steps(), tiles.len());
    let w = w.tile_bytes(tiles);
    match kernel {
        // SAFETY (all arms): `bitlinear_with` runs only kernels from `Kernel::available()`;
        // `run_task` passes whole tiles and token rows of kp ≥ in_features rounded up to 64
        // (≥ 4·steps), with (ng, nt) from `tiles_in_flight`.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => unsafe { x86::tiles_vnni(w, steps, ng, x, kp, nt, dots) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::tile_256::<x86::Avx2Fields>(w, steps, x, kp, nt, dots) },
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => unsafe {
            x86::tile_256::<x86::AvxVnniFields>(w, steps, x, kp, nt, dots)
        },
        _ => {
            for (i, d) in dots.iter_mut().enumerate() {
                let (g, t) = (i / nt, i % nt);
                let tile = &w[g * steps * BLOCK_BYTES..(g + 1) * steps * BLOCK_BYTES];
                tiles::tile_dots_portable(tile, &x[t * kp..(t + 1) * kp], d);
            }
        }
    }
}
