//! The LM head: `y = x · Wᵀ` with `x: [n, hidden]` f32 and `W: [vocab, hidden]` bf16, the
//! (tied) embedding matrix kept in bf16 — at 2B-4T it is 657 MB, over half of the bytes a decoded
//! token reads, so the kernel streams it once and never materializes an f32 copy.
//!
//! bf16 widens to f32 exactly (a 16-bit shift), products accumulate in f32 (fused multiply-add
//! where the CPU has it) across 32 lanes, so only the summation order differs from an f32 matmul.
//! The inner loop is plain Rust written to vectorize; the x86 variants compile the same code for
//! AVX2+FMA or AVX-512F (zmm FMA, with the VNNI BitLinear: both go with [`Kernel::Avx512Vnni`]).
//! Vocabulary rows split over rayon; up to four tokens share each widened chunk of weights.

use super::{Kernel, OutPtr};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;
use std::sync::Arc;

/// `x: [.., hidden]` f32 times `w: [vocab, hidden]` bf16, transposed: `[.., vocab]` f32. CPU
/// only: on CUDA callers use `x.to_dtype(bf16)?.matmul(&w.t()?)` (cuBLAS), so there is no
/// `cuda_fwd`.
#[derive(Debug, Clone, Copy)]
pub struct MatmulBf16Weight;

impl CustomOp2 for MatmulBf16Weight {
    fn name(&self) -> &'static str {
        "matmul_bf16_weight"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (vocab, hidden) = w_layout.shape().dims2()?;
        let dims = x_layout.shape().dims();
        if dims.last() != Some(&hidden) {
            bail!("matmul_bf16_weight: input shape {dims:?}, last dimension must be {hidden}")
        }
        let (CpuStorage::F32(x), CpuStorage::BF16(w)) = (x, w) else {
            bail!(
                "matmul_bf16_weight: needs f32 input and bf16 weight, found {:?} and {:?}",
                x.dtype(),
                w.dtype()
            )
        };
        let (Some((x0, x1)), Some((w0, w1))) =
            (x_layout.contiguous_offsets(), w_layout.contiguous_offsets())
        else {
            bail!("matmul_bf16_weight: input and weight must be contiguous")
        };
        let (x, w) = (&x[x0..x1], &w[w0..w1]);
        let mut y = vec![0f32; x.len() / hidden.max(1) * vocab];
        matmul_bf16(Kernel::best(), x, w, hidden, &mut y)?;
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = vocab;
        }
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

/// Vocabulary rows per task at least (a 2560-wide row is 5 KiB of bf16).
const MIN_TASK_ROWS: usize = 64;
/// Tasks per thread, for balance.
const TASKS_PER_THREAD: usize = 8;

/// `y[t, v] = Σ_h x[t, h] · w[v, h]` with `x: [n, hidden]`, `w: [vocab, hidden]`,
/// `y: [n, vocab]`, on the given kernel.
pub fn matmul_bf16(
    kernel: Kernel,
    x: &[f32],
    w: &[bf16],
    hidden: usize,
    y: &mut [f32],
) -> Result<()> {
    if !kernel.is_available() {
        bail!("matmul_bf16: kernel {kernel:?} is not supported by this CPU")
    }
    if hidden == 0 || !x.len().is_multiple_of(hidden) || !w.len().is_multiple_of(hidden) {
        bail!(
            "matmul_bf16: {} inputs and {} weights are not rows of {hidden}",
            x.len(),
            w.len()
        )
    }
    let (n, vocab) = (x.len() / hidden, w.len() / hidden);
    if y.len() != n * vocab {
        bail!("matmul_bf16: {} outputs for [{n}, {vocab}]", y.len())
    }
    run_tasks(kernel, x, w, None, hidden, y);
    Ok(())
}

/// An LM head `[vocab, hidden]` quantized per row to int8 (opt-in: it halves the bytes a
/// decoded token reads from the bf16 head, at a small cost in logits): `q = round(w · 127 /
/// absmax(row))` (half to even), dequantized as `q · scale` with `scale = absmax / 127`.
/// Activations stay f32: logits are `(Σ_h x[h] · q[v, h]) · scale[v]`, summed in f32 like the
/// bf16 head, so only the weights' rounding separates the two.
pub struct Int8Head {
    /// `[vocab, hidden]`.
    values: Vec<i8>,
    /// Per row, `absmax / 127`; 0 for an all-zero row.
    scales: Vec<f32>,
    hidden: usize,
}

impl std::fmt::Debug for Int8Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Int8Head([{}, {}])", self.vocab(), self.hidden)
    }
}

impl Int8Head {
    /// Quantizes a bf16 head `w: [vocab, hidden]`.
    pub fn from_bf16(w: &[bf16], hidden: usize) -> Result<Self> {
        Self::quantize(w, hidden, |v| v.to_f32())
    }

    /// Quantizes an f32 head `w: [vocab, hidden]`.
    pub fn from_f32(w: &[f32], hidden: usize) -> Result<Self> {
        Self::quantize(w, hidden, |v| v)
    }

    /// Quantizes a head tensor `[vocab, hidden]` (bf16, f16 or f32, on any device).
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (_, hidden) = w.dims2()?;
        let w = w.to_device(&candle_core::Device::Cpu)?.flatten_all()?;
        match w.dtype() {
            DType::BF16 => Self::from_bf16(&w.to_vec1::<bf16>()?, hidden),
            _ => Self::from_f32(&w.to_dtype(DType::F32)?.to_vec1::<f32>()?, hidden),
        }
    }

    fn quantize<W: Copy + Sync>(w: &[W], hidden: usize, widen: fn(W) -> f32) -> Result<Self> {
        if hidden == 0 || w.is_empty() || !w.len().is_multiple_of(hidden) {
            bail!("int8 head: {} weights are not rows of {hidden}", w.len())
        }
        let mut values = vec![0i8; w.len()];
        let mut scales = vec![0f32; w.len() / hidden];
        values
            .par_chunks_mut(hidden)
            .zip(w.par_chunks(hidden))
            .zip(scales.par_iter_mut())
            .for_each(|((q, w), scale)| {
                let absmax = w.iter().fold(0f32, |m, &v| m.max(widen(v).abs()));
                if !w.iter().all(|&v| widen(v).is_finite()) {
                    *scale = f32::NAN;
                } else if absmax > 0.0 {
                    let s = 127.0 / absmax;
                    for (q, &v) in q.iter_mut().zip(w) {
                        *q = (widen(v) * s).round_ties_even().clamp(-127.0, 127.0) as i8;
                    }
                    *scale = absmax / 127.0;
                }
            });
        if let Some(v) = scales.iter().position(|s| !s.is_finite()) {
            bail!("int8 head: row {v} holds a non-finite weight")
        }
        Ok(Self {
            values,
            scales,
            hidden,
        })
    }

    pub fn vocab(&self) -> usize {
        self.scales.len()
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// `[vocab, hidden]` int8 values.
    pub fn values(&self) -> &[i8] {
        &self.values
    }

    /// Per-row dequantization scales, `[vocab]`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Bytes one forward reads.
    pub fn bytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len()
    }
}

/// `x: [.., hidden]` (f32/bf16/f16) through an [`Int8Head`]: `[.., vocab]` f32. CPU only.
#[derive(Debug, Clone)]
pub struct MatmulInt8Head(pub Arc<Int8Head>);

impl CustomOp1 for MatmulInt8Head {
    fn name(&self) -> &'static str {
        "matmul_int8_head"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (hidden, vocab) = (self.0.hidden, self.0.vocab());
        let dims = layout.shape().dims();
        if dims.last() != Some(&hidden) {
            bail!("matmul_int8_head: input shape {dims:?}, last dimension must be {hidden}")
        }
        let x = super::super::to_f32(x, layout)?;
        let mut y = vec![0f32; x.len() / hidden * vocab];
        matmul_int8(Kernel::best(), &x, &self.0, &mut y)?;
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = vocab;
        }
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

/// `y[t, v] = (Σ_h x[t, h] · q[v, h]) · scale[v]` with `x: [n, hidden]` f32 and `y: [n, vocab]`,
/// on the given kernel.
pub fn matmul_int8(kernel: Kernel, x: &[f32], head: &Int8Head, y: &mut [f32]) -> Result<()> {
    if !kernel.is_available() {
        bail!("matmul_int8: kernel {kernel:?} is not supported by this CPU")
    }
    let (hidden, vocab) = (head.hidden, head.vocab());
    if !x.len().is_multiple_of(hidden) || y.len() != x.len() / hidden * vocab {
        bail!(
            "matmul_int8: {} inputs and {} outputs for a [{vocab}, {hidden}] head",
            x.len(),
            y.len()
        )
    }
    run_tasks(kernel, x, &head.values, Some(&head.scales), hidden, y);
    Ok(())
}

/// Splits the vocabulary over rayon and runs `kernel`'s build of [`Task::run`] on each block;
/// shapes are checked by the callers.
fn run_tasks<W: HeadWeight>(
    kernel: Kernel,
    x: &[f32],
    w: &[W],
    row_scales: Option<&[f32]>,
    hidden: usize,
    y: &mut [f32],
) {
    let vocab = w.len() / hidden;
    let threads = rayon::current_num_threads();
    let block = vocab
        .div_ceil(threads * TASKS_PER_THREAD)
        .max(MIN_TASK_ROWS);
    let out = OutPtr(y.as_mut_ptr());
    w.par_chunks(block * hidden).enumerate().for_each(|(b, w)| {
        let v0 = b * block;
        let task = Task {
            x,
            w,
            row_scales: row_scales.map(|s| &s[v0..v0 + w.len() / hidden]),
            hidden,
            v0,
            vocab,
            out,
        };
        match kernel {
            // SAFETY (both arms): `kernel` is available (checked by the callers).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { super::x86::head_avx512(task) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { super::x86::head_avx2(task) },
            _ => task.run::<1, false>(),
        }
    });
}

/// A weight element the head widens exactly to f32.
pub(super) trait HeadWeight: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl HeadWeight for bf16 {
    /// bf16 is the top half of an f32: widening is exact.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl HeadWeight for i8 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self as f32
    }
}

/// A block of vocabulary rows `w: [rows, hidden]` starting at row `v0`, against all tokens;
/// each dot product is multiplied by its row's scale when there are scales.
pub(super) struct Task<'a, W> {
    x: &'a [f32],
    w: &'a [W],
    row_scales: Option<&'a [f32]>,
    hidden: usize,
    v0: usize,
    vocab: usize,
    out: OutPtr,
}

/// f32 lanes per accumulator: several independent FMA chains hide the add latency.
const LANES: usize = 32;

impl<W: HeadWeight> Task<'_, W> {
    /// Groups of `T` tokens (outer: they stay in L1) against every row of the block. `FMA`
    /// selects `mul_add`, which is one instruction where the caller enabled FMA and a slow
    /// library call otherwise.
    #[inline(always)]
    pub(super) fn run<const T: usize, const FMA: bool>(&self) {
        let h = self.hidden;
        for (g, xs) in self.x.chunks(T * h).enumerate() {
            let nt = xs.len() / h;
            for (i, w) in self.w.chunks_exact(h).enumerate() {
                let dots = if nt == T {
                    dot_rows::<T, FMA, W>(w, xs)
                } else {
                    let mut dots = [0f32; T];
                    for (d, x) in dots.iter_mut().zip(xs.chunks_exact(h)) {
                        *d = dot_rows::<1, FMA, W>(w, x)[0];
                    }
                    dots
                };
                // Times 1 (the bf16 head) is exact.
                let scale = self.row_scales.map_or(1.0, |s| s[i]);
                for (t, &d) in dots.iter().enumerate().take(nt) {
                    let d = d * scale;
                    // SAFETY: t < n and v0 + i < vocab, so the index is inside `y`; tasks own
                    // disjoint vocabulary rows, and `y` outlives the parallel loop.
                    unsafe { self.out.write((g * T + t) * self.vocab + self.v0 + i, d) };
                }
            }
        }
    }
}

/// Dot products of one weight row with `T` f32 rows (`xs: [T, w.len()]`).
#[inline(always)]
fn dot_rows<const T: usize, const FMA: bool, W: HeadWeight>(w: &[W], xs: &[f32]) -> [f32; T] {
    let h = w.len();
    let mut acc = [[0f32; LANES]; T];
    let (w_chunks, w_tail) = w.as_chunks::<LANES>();
    let full = w_chunks.len() * LANES;
    for (c, wc) in w_chunks.iter().enumerate() {
        // A plain loop, not `array::map`: that stays an out-of-line call without the caller's
        // target features.
        let mut wf = [0f32; LANES];
        for (f, &w) in wf.iter_mut().zip(wc) {
            *f = w.widen();
        }
        for (t, acc) in acc.iter_mut().enumerate() {
            let xc = &xs[t * h + c * LANES..t * h + (c + 1) * LANES];
            for ((a, &w), &x) in acc.iter_mut().zip(&wf).zip(xc) {
                *a = if FMA { w.mul_add(x, *a) } else { *a + w * x };
            }
        }
    }
    let mut dots = [0f32; T];
    for (t, (d, acc)) in dots.iter_mut().zip(&acc).enumerate() {
        let tail = w_tail
            .iter()
            .zip(&xs[t * h + full..(t + 1) * h])
            .map(|(&w, &x)| w.widen() * x);
        *d = acc.iter().copied().chain(tail).sum();
    }
    dots
}
