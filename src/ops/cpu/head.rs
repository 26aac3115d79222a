//! The LM head: `y = x · Wᵀ` with `x: [n, hidden]` f32 and `W: [vocab, hidden]` bf16, the
//! (tied) embedding matrix kept in bf16 — at 2B-4T it is 657 MB, over half of the bytes a decoded
//! token reads, so the kernel streams it once and never materializes an f32 copy.
//!
//! bf16 widens to f32 exactly (a 16-bit shift), products accumulate in f32 (fused multiply-add
//! where the CPU has it) across 32 lanes, so only the summation order differs from an f32 matmul.
//! The portable loop is plain Rust; the x86 variants (AVX2+FMA, and AVX-512F with the VNNI
//! BitLinear: both go with [`Kernel::Avx512Vnni`]) are register-blocked intrinsics that keep its
//! lane order, for bf16 and for the opt-in int8 head alike. Vocabulary rows split over rayon; up
//! to four tokens share each widened chunk of weights.

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
    matmul_bf16_in(kernel, x, w, hidden, y, &mut Vec::new())
}

/// [`matmul_bf16`] laying the token rows out for the kernel in `rows`, which a caller keeps
/// between calls so that a decoded token allocates nothing.
pub fn matmul_bf16_in(
    kernel: Kernel,
    x: &[f32],
    w: &[bf16],
    hidden: usize,
    y: &mut [f32],
    rows: &mut Vec<f32>,
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
    let xd = match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => deinterleave(x, hidden, LANES, rows),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 | Kernel::AvxVnni => deinterleave(x, hidden, 16, rows),
        _ => x,
    };
    run_tasks(kernel, x, xd, w, None, hidden, y);
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

    /// Quantizes a head tensor `[vocab, hidden]` (bf16, f16 or f32, on any device). A
    /// contiguous bf16 or f32 tensor on the CPU is read in place: no copy of the matrix.
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (_, hidden) = w.dims2()?;
        let w = match w.dtype() {
            DType::BF16 | DType::F32 => w.to_device(&candle_core::Device::Cpu)?,
            _ => w
                .to_device(&candle_core::Device::Cpu)?
                .to_dtype(DType::F32)?,
        }
        .contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let (candle_core::Storage::Cpu(storage), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            bail!("int8 head: the weights did not arrive contiguous on the CPU")
        };
        match storage {
            CpuStorage::BF16(v) => Self::from_bf16(&v[start..end], hidden),
            CpuStorage::F32(v) => Self::from_f32(&v[start..end], hidden),
            other => bail!("int8 head: {:?} weights after conversion", other.dtype()),
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
        super::back_with_huge_pages(&values);
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
    // The int8 kernels read the tokens as they are.
    run_tasks(kernel, x, x, &head.values, Some(&head.scales), hidden, y);
    Ok(())
}

/// Vocabulary rows per task of a head with `vocab` rows.
pub(super) fn task_rows(vocab: usize) -> usize {
    let threads = rayon::current_num_threads();
    vocab
        .div_ceil(threads * TASKS_PER_THREAD)
        .max(MIN_TASK_ROWS)
}

/// Splits the vocabulary over rayon and runs `kernel`'s build of [`Task::run`] on each block,
/// the SIMD kernels on `xd` (`x` laid out as they load it); shapes are checked by the callers.
fn run_tasks<W: HeadWeight>(
    kernel: Kernel,
    x: &[f32],
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] xd: &[f32],
    w: &[W],
    row_scales: Option<&[f32]>,
    hidden: usize,
    y: &mut [f32],
) {
    let vocab = w.len() / hidden;
    let block = task_rows(vocab);
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
            Kernel::Avx512Vnni => unsafe { W::run_avx512(task, xd) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::AvxVnni => unsafe { W::run_avx2(task, xd) },
            _ => task.run::<1, false>(),
        }
    });
}

/// A weight element the head widens exactly to f32.
pub(super) trait HeadWeight: Copy + Send + Sync {
    fn widen(self) -> f32;

    /// [`Task::run`] with FMA, as fast as AVX-512 makes it for this element type.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and FMA.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_avx512(task: Task<Self>, xd: &[f32]);

    /// [`Task::run`] with FMA, as fast as AVX2 makes it for this element type.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_avx2(task: Task<Self>, xd: &[f32]);
}

impl HeadWeight for bf16 {
    /// bf16 is the top half of an f32: widening is exact.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn run_avx512(task: Task<Self>, xd: &[f32]) {
        // SAFETY: the caller's guarantees are this function's; `xd` is laid out for `Avx512`.
        unsafe { run_blocks::<Avx512, _>(&task, xd) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(task: Task<Self>, xd: &[f32]) {
        // SAFETY: the caller's guarantees are this function's; `xd` is laid out for `Avx2`.
        unsafe { run_blocks::<Avx2, _>(&task, xd) }
    }
}

impl HeadWeight for i8 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self as f32
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn run_avx512(task: Task<Self>, xd: &[f32]) {
        // SAFETY: the caller's guarantees are this function's; int8 blocks read the tokens
        // as they are, which `xd` is.
        unsafe { run_blocks::<Avx512, _>(&task, xd) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(task: Task<Self>, xd: &[f32]) {
        // SAFETY: as above.
        unsafe { run_blocks::<Avx2, _>(&task, xd) }
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

/// Vocabulary rows revisited by every token group while they sit in L2 (64 rows of 2560 bf16
/// are 320 KiB).
pub(super) const L2_ROWS: usize = 64;

/// How far ahead of its loads the int8 and compact heads prefetch each row's streams. One
/// token on the 2-core Xeon guest (`cargo bench --bench bitlinear -- 1 head`): int8 AVX-512
/// 63% of STREAM read without, 82–95% at 1–8 KiB; int8 AVX2 71–74% at 1 KiB, 83–90% at
/// 4 KiB (four A/B pairs); compact head 22.6 ms at 1 KiB, 18.2 at 4 KiB, the same at 8 KiB.
#[cfg(target_arch = "x86_64")]
pub(super) const PREFETCH_BYTES: usize = 4096;

/// Asks for the int8 row at `row` `PREFETCH_BYTES` past column `c`, once per cache line.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_int8_ahead(row: *const i8, c: usize) {
    if c.is_multiple_of(64) {
        super::prefetch(row.wrapping_add(c + PREFETCH_BYTES), false);
    }
}

/// f32 lanes per accumulator: several independent FMA chains hide the add latency.
pub(super) const LANES: usize = 32;

impl<W: HeadWeight> Task<'_, W> {
    /// Groups of `T` tokens (they stay in L1) against every row of an L2-sized slice of the
    /// block, slice after slice: with many tokens (batched decode) the weights still come from
    /// memory once. `FMA` selects `mul_add`, which is one instruction where the caller enabled
    /// FMA and a slow library call otherwise.
    #[inline(always)]
    fn run<const T: usize, const FMA: bool>(&self) {
        let h = self.hidden;
        for (s, ws) in self.w.chunks(L2_ROWS * h).enumerate() {
            for (g, xs) in self.x.chunks(T * h).enumerate() {
                self.run_slice::<T>(
                    ws,
                    s * L2_ROWS,
                    g,
                    xs,
                    dot_rows::<T, FMA, W>,
                    dot_rows::<1, FMA, W>,
                );
            }
        }
    }

    /// Token group `g` (`xs`) against the rows `ws`, which start at row `r0` of the block.
    #[inline(always)]
    fn run_slice<const T: usize>(
        &self,
        ws: &[W],
        r0: usize,
        g: usize,
        xs: &[f32],
        dot: impl Fn(&[W], &[f32]) -> [f32; T],
        dot1: impl Fn(&[W], &[f32]) -> [f32; 1],
    ) {
        let h = self.hidden;
        let nt = xs.len() / h;
        for (i, w) in ws.chunks_exact(h).enumerate() {
            let dots = if nt == T {
                dot(w, xs)
            } else {
                let mut dots = [0f32; T];
                for (d, x) in dots.iter_mut().zip(xs.chunks_exact(h)) {
                    *d = dot1(w, x)[0];
                }
                dots
            };
            let v = r0 + i;
            // Times 1 (the bf16 head) is exact.
            let scale = self.row_scales.map_or(1.0, |s| s[v]);
            for (t, &d) in dots.iter().enumerate().take(nt) {
                // SAFETY: t < n and v0 + v < vocab, so the index is inside `y`; tasks own
                // disjoint vocabulary rows, and `y` outlives the parallel loop.
                unsafe {
                    self.out
                        .write((g * T + t) * self.vocab + self.v0 + v, d * scale)
                };
            }
        }
    }
}

/// Dot products of one weight row with `T` f32 rows (`xs: [T, w.len()]`). Every token's lanes
/// accumulate in the same order whatever `T` is, so a token's result does not depend on the
/// others.
#[inline(always)]
fn dot_rows<const T: usize, const FMA: bool, W: HeadWeight>(w: &[W], xs: &[f32]) -> [f32; T] {
    let h = w.len();
    let mut acc = [[0f32; LANES]; T];
    let (w_chunks, w_tail) = w.as_chunks::<LANES>();
    let full = w_chunks.len() * LANES;
    let x_chunks: [&[[f32; LANES]]; T] =
        std::array::from_fn(|t| xs[t * h..t * h + full].as_chunks::<LANES>().0);
    for (c, wc) in w_chunks.iter().enumerate() {
        // A plain loop, not `array::map`: that stays an out-of-line call without the caller's
        // target features.
        let mut wf = [0f32; LANES];
        for (f, &w) in wf.iter_mut().zip(wc) {
            *f = w.widen();
        }
        for (acc, x) in acc.iter_mut().zip(&x_chunks) {
            let xc = &x[c];
            for l in 0..LANES {
                acc[l] = if FMA {
                    wf[l].mul_add(xc[l], acc[l])
                } else {
                    acc[l] + wf[l] * xc[l]
                };
            }
        }
    }
    let mut dots = [0f32; T];
    for (t, (d, acc)) in dots.iter_mut().zip(&acc).enumerate() {
        *d = finish_dot(acc, w_tail, &xs[t * h + full..(t + 1) * h]);
    }
    dots
}

/// A dot product from its 32 lane sums and the products past the last full chunk, added in the
/// one order every head kernel shares.
#[inline(always)]
pub(super) fn finish_dot<W: HeadWeight>(lanes: &[f32; LANES], w_tail: &[W], x_tail: &[f32]) -> f32 {
    let tail = w_tail.iter().zip(x_tail).map(|(&w, &x)| w.widen() * x);
    lanes.iter().copied().chain(tail).sum()
}

/// The x86 instruction sets with register-blocked head kernels ([`RegisterBlocks`]): AVX-512F
/// and AVX2, both with FMA.
#[cfg(target_arch = "x86_64")]
struct Avx512;
#[cfg(target_arch = "x86_64")]
struct Avx2;

/// One instruction set's register-blocked head kernel for weights `W`: the block shapes it
/// takes and the block itself, which [`run_blocks`] walks over a task.
#[cfg(target_arch = "x86_64")]
trait RegisterBlocks<W> {
    /// Tokens in a block, at most 4.
    const TOKENS: usize;
    /// Rows in a block for one token, 1 or 2.
    const ROWS_ONE_TOKEN: usize;
    /// Rows in a block for several tokens, 1 or 2.
    const ROWS: usize;
    /// Rows every token group sweeps before the next group starts: [`L2_ROWS`] (the rows stay
    /// in L2 for all groups) or 1 (each row stays in L1 for all groups).
    const SLICE_ROWS: usize;

    /// Rows `r..r + R` of the task's block against tokens `t0..t0 + T`, unscaled; `xd` holds
    /// the tokens laid out as the block loads them (the tails are read from the task).
    ///
    /// # Safety
    /// The CPU must support the instruction set; those rows and tokens exist.
    unsafe fn block<const R: usize, const T: usize>(
        task: &Task<W>,
        xd: &[f32],
        r: usize,
        t0: usize,
    ) -> [[f32; T]; R];
}

/// Runs a task in `K`'s register blocks: slices of `K::SLICE_ROWS` rows, and in each, every
/// group of `K::TOKENS` tokens against the slice's rows, as many rows at a time as `K` takes.
/// Inlined into each instruction set's entry point, so every block is inlined with its
/// features.
///
/// # Safety
/// The CPU must support `K`'s instruction set; `xd` holds the task's tokens as `K` loads them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn run_blocks<K: RegisterBlocks<W>, W: HeadWeight>(task: &Task<W>, xd: &[f32]) {
    const {
        assert!(K::TOKENS >= 1 && K::TOKENS <= 4);
        assert!(K::ROWS_ONE_TOKEN >= 1 && K::ROWS_ONE_TOKEN <= 2);
        assert!(K::ROWS >= 1 && K::ROWS <= 2);
        assert!(K::SLICE_ROWS >= 1);
    }
    // Constants: in the guards below they keep the shapes `K` never takes from being built.
    let (two_rows_one_token, two_rows) = (K::ROWS_ONE_TOKEN == 2, K::ROWS == 2);
    let (two_tokens, three_tokens, four_tokens) = (K::TOKENS >= 2, K::TOKENS >= 3, K::TOKENS == 4);
    let h = task.hidden;
    let n = task.x.len() / h;
    let rows = task.w.len() / h;
    for s0 in (0..rows).step_by(K::SLICE_ROWS) {
        let s1 = (s0 + K::SLICE_ROWS).min(rows);
        for t0 in (0..n).step_by(K::TOKENS) {
            let tokens = (n - t0).min(K::TOKENS);
            let most_rows = if tokens == 1 {
                K::ROWS_ONE_TOKEN
            } else {
                K::ROWS
            };
            let mut r = s0;
            while r < s1 {
                // SAFETY: rows r.. and tokens t0.. exist (counts bounded above); the caller
                // vouches for the instruction set and `xd`.
                r += unsafe {
                    match ((s1 - r).min(most_rows), tokens) {
                        (1, 1) => task.run_block::<K, 1, 1>(xd, r, t0),
                        (1, 2) if two_tokens => task.run_block::<K, 1, 2>(xd, r, t0),
                        (1, 3) if three_tokens => task.run_block::<K, 1, 3>(xd, r, t0),
                        (1, 4) if four_tokens => task.run_block::<K, 1, 4>(xd, r, t0),
                        (2, 1) if two_rows_one_token => task.run_block::<K, 2, 1>(xd, r, t0),
                        (2, 2) if two_rows && two_tokens => task.run_block::<K, 2, 2>(xd, r, t0),
                        (2, 3) if two_rows && three_tokens => task.run_block::<K, 2, 3>(xd, r, t0),
                        (2, 4) if two_rows && four_tokens => task.run_block::<K, 2, 4>(xd, r, t0),
                        shape => unreachable!("head block {shape:?} is not one of the kernel's"),
                    }
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl<W: HeadWeight> Task<'_, W> {
    /// Rows `r..r + R` of this block against tokens `t0..t0 + T` on `K`, stored, each times its
    /// row's scale as in [`Self::run`]; returns `R`.
    ///
    /// # Safety
    /// The CPU must support `K`'s instruction set; `xd` holds the tokens as `K` loads them;
    /// those rows and tokens exist.
    #[inline(always)]
    unsafe fn run_block<K: RegisterBlocks<W>, const R: usize, const T: usize>(
        &self,
        xd: &[f32],
        r: usize,
        t0: usize,
    ) -> usize {
        // SAFETY: the caller's guarantees are the block's.
        let dots = unsafe { K::block::<R, T>(self, xd, r, t0) };
        for (i, dots) in dots.iter().enumerate() {
            // Times 1 (the bf16 head) is exact.
            let scale = self.row_scales.map_or(1.0, |s| s[r + i]);
            for (t, &d) in dots.iter().enumerate() {
                // SAFETY: as in `run_slice`: the token and row exist, tasks own disjoint rows.
                unsafe {
                    self.out
                        .write((t0 + t) * self.vocab + self.v0 + r + i, d * scale)
                };
            }
        }
        R
    }

    /// The dot products of rows `r..r + R` with tokens `t0..t0 + T` from their accumulators'
    /// 32 lane sums (`lanes(i, t)` for row `r + i` and token `t0 + t`, in [`dot_rows`]'s lane
    /// order) and the products past the last full chunk.
    #[inline(always)]
    fn finish_block<const R: usize, const T: usize>(
        &self,
        r: usize,
        t0: usize,
        lanes: impl Fn(usize, usize) -> [f32; LANES],
    ) -> [[f32; T]; R] {
        let h = self.hidden;
        let full = h / LANES * LANES;
        let mut dots = [[0f32; T]; R];
        for (i, dots) in dots.iter_mut().enumerate() {
            let w_tail = &self.w[(r + i) * h + full..(r + i + 1) * h];
            for (t, d) in dots.iter_mut().enumerate() {
                let x_tail = &self.x[(t0 + t) * h + full..(t0 + t + 1) * h];
                *d = finish_dot(&lanes(i, t), w_tail, x_tail);
            }
        }
        dots
    }
}

/// The token rows `x` laid out in `xd` with every `group` elements of their full 32-wide chunks
/// stored as [even elements, odd elements], the order a shift and a mask widen bf16 pairs in;
/// tails as they are.
#[cfg(target_arch = "x86_64")]
pub(super) fn deinterleave<'a>(
    x: &[f32],
    h: usize,
    group: usize,
    xd: &'a mut Vec<f32>,
) -> &'a [f32] {
    let full = h / LANES * LANES;
    xd.clear();
    xd.extend_from_slice(x);
    for (xd, x) in xd.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
        for (d, c) in xd[..full]
            .chunks_exact_mut(group)
            .zip(x[..full].chunks_exact(group))
        {
            for j in 0..group / 2 {
                d[j] = c[2 * j];
                d[group / 2 + j] = c[2 * j + 1];
            }
        }
    }
    xd
}

/// The bf16 head with AVX-512 intrinsics: two vocabulary rows times four tokens (16 zmm
/// accumulators) per pass over `hidden`, so each weight vector is widened once for four tokens
/// and each token vector serves two rows. A 64-byte load holds 32 bf16; a shift and a mask
/// widen its even and odd elements, and the tokens are stored the same way (deinterleaved per
/// 32), so every accumulator lane sums exactly the products of the portable lane it stands
/// for, in the same order: the results are [`dot_rows`]'s bits with FMA.
#[cfg(target_arch = "x86_64")]
impl RegisterBlocks<bf16> for Avx512 {
    const TOKENS: usize = 4;
    const ROWS_ONE_TOKEN: usize = 2;
    const ROWS: usize = 2;
    const SLICE_ROWS: usize = L2_ROWS;

    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    // Indices name the register tile (row i, token t, half) more plainly than zipped iterators.
    #[allow(clippy::needless_range_loop)]
    unsafe fn block<const R: usize, const T: usize>(
        task: &Task<bf16>,
        xd: &[f32],
        r: usize,
        t0: usize,
    ) -> [[f32; T]; R] {
        use std::arch::x86_64::*;
        let h = task.hidden;
        let full = h / LANES * LANES;
        let wp = task.w.as_ptr().add(r * h) as *const u16;
        let xp = xd.as_ptr().add(t0 * h);
        let odd = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
        for c in (0..full).step_by(LANES) {
            let mut wf = [[_mm512_setzero_ps(); 2]; R];
            for (i, wf) in wf.iter_mut().enumerate() {
                // SAFETY: 32 bf16 at c of row r + i, inside its full chunks.
                let v = _mm512_loadu_si512(wp.add(i * h + c) as *const _);
                wf[0] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                wf[1] = _mm512_castsi512_ps(_mm512_and_si512(v, odd));
            }
            for t in 0..T {
                for half in 0..2 {
                    // SAFETY: 16 f32 at c + 16·half of token t0 + t, inside its full chunks.
                    let x = _mm512_loadu_ps(xp.add(t * h + c + half * 16));
                    for i in 0..R {
                        acc[i][t][half] = _mm512_fmadd_ps(wf[i][half], x, acc[i][t][half]);
                    }
                }
            }
        }
        task.finish_block(r, t0, |i, t| {
            let (mut even, mut odd) = ([0f32; 16], [0f32; 16]);
            _mm512_storeu_ps(even.as_mut_ptr(), acc[i][t][0]);
            _mm512_storeu_ps(odd.as_mut_ptr(), acc[i][t][1]);
            std::array::from_fn(|l| if l % 2 == 0 { even[l / 2] } else { odd[l / 2] })
        })
    }
}

/// The bf16 head with AVX2 intrinsics: one vocabulary row times two tokens (8 ymm
/// accumulators of the 16) per pass, each row against every token pair while it sits in L1
/// (measured: faster than L2 slices at 4 tokens, slower at 16), widened like the AVX-512
/// kernel 16 bf16 at a time (the tokens deinterleaved per 16 to match), so the results are
/// again [`dot_rows`]'s bits with FMA.
#[cfg(target_arch = "x86_64")]
impl RegisterBlocks<bf16> for Avx2 {
    const TOKENS: usize = 2;
    const ROWS_ONE_TOKEN: usize = 1;
    const ROWS: usize = 1;
    const SLICE_ROWS: usize = 1;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    // Indices name the register tile (row i, token t, quarter q) more plainly than zipped
    // iterators.
    #[allow(clippy::needless_range_loop)]
    unsafe fn block<const R: usize, const T: usize>(
        task: &Task<bf16>,
        xd: &[f32],
        r: usize,
        t0: usize,
    ) -> [[f32; T]; R] {
        use std::arch::x86_64::*;
        let h = task.hidden;
        let full = h / LANES * LANES;
        let wp = task.w.as_ptr().add(r * h) as *const u16;
        let xp = xd.as_ptr().add(t0 * h);
        let odd = _mm256_set1_epi32(0xffff_0000u32 as i32);
        // Quarter q of a chunk: q / 2 picks its 16-element half, q % 2 even or odd elements.
        let mut acc = [[[_mm256_setzero_ps(); 4]; T]; R];
        for c in (0..full).step_by(LANES) {
            let mut wf = [[_mm256_setzero_ps(); 4]; R];
            for i in 0..R {
                for g in 0..2 {
                    // SAFETY: 16 bf16 at c + 16g of row r + i, inside its full chunks.
                    let v = _mm256_loadu_si256(wp.add(i * h + c + 16 * g) as *const __m256i);
                    wf[i][2 * g] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                    wf[i][2 * g + 1] = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
                }
            }
            for t in 0..T {
                for q in 0..4 {
                    // SAFETY: 8 f32 at c + 8q of token t0 + t, inside its full chunks.
                    let x = _mm256_loadu_ps(xp.add(t * h + c + 8 * q));
                    for i in 0..R {
                        acc[i][t][q] = _mm256_fmadd_ps(wf[i][q], x, acc[i][t][q]);
                    }
                }
            }
        }
        task.finish_block(r, t0, |i, t| {
            let mut quarters = [[0f32; 8]; 4];
            for q in 0..4 {
                _mm256_storeu_ps(quarters[q].as_mut_ptr(), acc[i][t][q]);
            }
            std::array::from_fn(|l| {
                let (half, k) = (l / 16, l % 16);
                quarters[2 * half + k % 2][k / 2]
            })
        })
    }
}

/// The int8 head with AVX-512 intrinsics: one vocabulary row for one token (one sequential
/// stream, software-prefetched: measured faster than two rows at once), or two rows times up
/// to four tokens (16 zmm accumulators). 16 int8 sign-extend to i32 and convert to f32
/// exactly, in order, so zmm `half` of an accumulator is lanes `16·half..` of [`dot_rows`]:
/// the results are its bits with FMA, the row scale applied after as in [`Task::run`].
#[cfg(target_arch = "x86_64")]
impl RegisterBlocks<i8> for Avx512 {
    const TOKENS: usize = 4;
    const ROWS_ONE_TOKEN: usize = 1;
    const ROWS: usize = 2;
    const SLICE_ROWS: usize = L2_ROWS;

    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    // Indices name the register tile (row i, token t, half) more plainly than zipped iterators.
    #[allow(clippy::needless_range_loop)]
    unsafe fn block<const R: usize, const T: usize>(
        task: &Task<i8>,
        xd: &[f32],
        r: usize,
        t0: usize,
    ) -> [[f32; T]; R] {
        use std::arch::x86_64::*;
        let h = task.hidden;
        let full = h / LANES * LANES;
        let wp = task.w.as_ptr().add(r * h);
        let xp = xd.as_ptr().add(t0 * h);
        let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
        for c in (0..full).step_by(LANES) {
            let mut wf = [[_mm512_setzero_ps(); 2]; R];
            for i in 0..R {
                prefetch_int8_ahead(wp.wrapping_add(i * h), c);
                for half in 0..2 {
                    // SAFETY: 16 int8 at c + 16·half of row r + i, inside its full chunks.
                    let v = _mm_loadu_si128(wp.add(i * h + c + 16 * half) as *const __m128i);
                    wf[i][half] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
                }
            }
            for t in 0..T {
                for half in 0..2 {
                    // SAFETY: 16 f32 at c + 16·half of token t0 + t, inside its full chunks.
                    let x = _mm512_loadu_ps(xp.add(t * h + c + 16 * half));
                    for i in 0..R {
                        acc[i][t][half] = _mm512_fmadd_ps(wf[i][half], x, acc[i][t][half]);
                    }
                }
            }
        }
        task.finish_block(r, t0, |i, t| {
            let mut lanes = [0f32; LANES];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[i][t][0]);
            _mm512_storeu_ps(lanes.as_mut_ptr().add(16), acc[i][t][1]);
            lanes
        })
    }
}

/// The int8 head with AVX2 intrinsics: two vocabulary rows for one token, or one row times two
/// tokens (8 ymm accumulators of the 16), widened 8 int8 at a time in order, so the results
/// are again [`dot_rows`]'s bits with FMA.
#[cfg(target_arch = "x86_64")]
impl RegisterBlocks<i8> for Avx2 {
    const TOKENS: usize = 2;
    const ROWS_ONE_TOKEN: usize = 2;
    const ROWS: usize = 1;
    const SLICE_ROWS: usize = L2_ROWS;

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    // Indices name the register tile (row i, token t, quarter q) more plainly than zipped
    // iterators.
    #[allow(clippy::needless_range_loop)]
    unsafe fn block<const R: usize, const T: usize>(
        task: &Task<i8>,
        xd: &[f32],
        r: usize,
        t0: usize,
    ) -> [[f32; T]; R] {
        use std::arch::x86_64::*;
        let h = task.hidden;
        let full = h / LANES * LANES;
        let wp = task.w.as_ptr().add(r * h);
        let xp = xd.as_ptr().add(t0 * h);
        let mut acc = [[[_mm256_setzero_ps(); 4]; T]; R];
        for c in (0..full).step_by(LANES) {
            let mut wf = [[_mm256_setzero_ps(); 4]; R];
            for i in 0..R {
                prefetch_int8_ahead(wp.wrapping_add(i * h), c);
                for q in 0..4 {
                    // SAFETY: 8 int8 at c + 8q of row r + i, inside its full chunks.
                    let v = _mm_loadl_epi64(wp.add(i * h + c + 8 * q) as *const __m128i);
                    wf[i][q] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                }
            }
            for t in 0..T {
                for q in 0..4 {
                    // SAFETY: 8 f32 at c + 8q of token t0 + t, inside its full chunks.
                    let x = _mm256_loadu_ps(xp.add(t * h + c + 8 * q));
                    for i in 0..R {
                        acc[i][t][q] = _mm256_fmadd_ps(wf[i][q], x, acc[i][t][q]);
                    }
                }
            }
        }
        task.finish_block(r, t0, |i, t| {
            let mut lanes = [0f32; LANES];
            for q in 0..4 {
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * q), acc[i][t][q]);
            }
            lanes
        })
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::random_floats;
    use candle_core::Device;

    fn weights(vocab: usize, hidden: usize) -> Vec<f32> {
        // Distinct magnitudes per row, both signs, a zero row.
        (0..vocab * hidden)
            .map(|i| {
                let (v, h) = (i / hidden, i % hidden);
                if v == 2 {
                    0.0
                } else {
                    ((h * 7 + v * 3) % 23) as f32 * 0.01 * (v + 1) as f32 - 0.1
                }
            })
            .collect()
    }

    fn same(a: &Int8Head, b: &Int8Head) {
        assert_eq!((a.vocab(), a.hidden()), (b.vocab(), b.hidden()));
        assert_eq!(a.values(), b.values());
        assert_eq!(a.scales(), b.scales());
    }

    #[test]
    fn from_tensor_quantizes_what_the_slices_hold() -> Result<()> {
        let (vocab, hidden) = (5, 40);
        let w = weights(vocab, hidden);
        let from_f32 = Int8Head::from_f32(&w, hidden)?;
        assert!(from_f32.values().iter().any(|&q| q == 127 || q == -127));
        let t = Tensor::from_vec(w.clone(), (vocab, hidden), &Device::Cpu)?;
        same(&Int8Head::from_tensor(&t)?, &from_f32);
        // A transposed view is made contiguous first.
        let t_t = Tensor::from_vec(w.clone(), (vocab, hidden), &Device::Cpu)?
            .t()?
            .contiguous()?
            .t()?;
        same(&Int8Head::from_tensor(&t_t)?, &from_f32);
        let bf: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let t_bf = Tensor::from_vec(bf.clone(), (vocab, hidden), &Device::Cpu)?;
        same(
            &Int8Head::from_tensor(&t_bf)?,
            &Int8Head::from_bf16(&bf, hidden)?,
        );
        let t_f16 = t.to_dtype(DType::F16)?;
        let f16_values = t_f16
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        same(
            &Int8Head::from_tensor(&t_f16)?,
            &Int8Head::from_f32(&f16_values, hidden)?,
        );
        Ok(())
    }

    /// `y[t, v]` in [`dot_rows`]'s lane order with FMA, times the row's scale if any: what the
    /// SIMD kernels must give bit for bit.
    fn fma_order<W: HeadWeight>(x: &[f32], w: &[W], scales: Option<&[f32]>, h: usize) -> Vec<u32> {
        let vocab = w.len() / h;
        x.chunks_exact(h)
            .flat_map(|x| {
                (0..vocab).map(move |v| {
                    let dot = dot_rows::<1, true, W>(&w[v * h..(v + 1) * h], x)[0];
                    (dot * scales.map_or(1.0, |s| s[v])).to_bits()
                })
            })
            .collect()
    }

    /// Every SIMD kernel, bf16 and int8, against [`fma_order`]: token counts that fill a
    /// register block and leave some over, hidden sizes with and without tails, vocabularies
    /// that leave rows over from every row block and span several L2 slices of a task.
    #[test]
    fn simd_kernels_give_the_bits_of_the_fma_lane_order() -> Result<()> {
        let simd = Kernel::available()
            .iter()
            .filter(|&&k| k != Kernel::Portable);
        for &(vocab, hidden) in &[
            (1, 32),
            (7, 2560 + 7),
            (67, 33),
            (130, 96),
            (5, 31),
            (2000, 40),
        ] {
            let w = random_floats(vocab * hidden, vocab as u64, 0.2);
            let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let head = Int8Head::from_f32(&w, hidden)?;
            for n in [1, 2, 3, 4, 5, 9] {
                let x = random_floats(n * hidden, 100 + n as u64, 4.0);
                let want_bf16 = fma_order(&x, &w_bf16, None, hidden);
                let want_int8 = fma_order(&x, head.values(), Some(head.scales()), hidden);
                assert!(want_int8.iter().any(|&b| f32::from_bits(b) != 0.0));
                for &kernel in simd.clone() {
                    let what = format!("{kernel:?} {n}×{hidden}→{vocab}");
                    let mut y = vec![f32::NAN; n * vocab];
                    matmul_bf16(kernel, &x, &w_bf16, hidden, &mut y)?;
                    let bits: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                    assert!(bits == want_bf16, "bf16 {what}");
                    y.fill(f32::NAN);
                    matmul_int8(kernel, &x, &head, &mut y)?;
                    let bits: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                    assert!(bits == want_int8, "int8 {what}");
                }
            }
        }
        Ok(())
    }
}
