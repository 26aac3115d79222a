//! The bf16 LM head stored losslessly in 12 bits a weight: the exact head, three quarters of
//! the bytes a decoded token streams from it (the head is over half of a token's bytes).
//!
//! A bf16 is a high byte (sign and the top 7 exponent bits) and a low byte (the last exponent
//! bit and the mantissa). Low bytes are near-random and stay whole; high bytes take few values
//! in a row of weights (the exponents cluster), so each row keeps a table of its 16 most
//! frequent ones and every weight a 4-bit index into it. A chunk of 64 weights holding a high
//! byte outside the table is stored raw instead (an escape: with 16 entries, the weights under
//! about 2⁻¹⁵ of the row's largest). Decoding is a table lookup (`vpshufb`) and two byte
//! interleaves per 64 weights, so the AVX-512 kernel streams 96 bytes where the plain head
//! streams 128, and gives the plain head's bits: the same bf16 values meet the same f32 lanes
//! in the same order ([`super::head`]'s lane order).
//!
//! Where a 64-weight chunk keeps its values (the kernel's interleaves decide): low byte and
//! index of weight `w` of the chunk's first half at position `16·(w / 8) + w % 8`, of its second
//! half at that plus 8; indices are the low nibbles of the 32 index bytes for positions 0..32
//! and the high nibbles for 32..64.

use super::Kernel;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;
use std::sync::Arc;

/// Weights per chunk: one 512-bit vector of low bytes.
pub const CHUNK: usize = 64;
/// High bytes a row's table holds: what a 4-bit index reaches.
const TABLE: usize = 16;

/// 64 bytes on a cache line of their own, so the kernel's loads never split one.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// An LM head `[vocab, hidden]` of bf16 weights, stored as the module docs lay out;
/// `hidden` is a multiple of [`CHUNK`].
pub struct CompactBf16Head {
    /// `[vocab, hidden]` low bytes, chunk by chunk in the kernel's order.
    low: Vec<Line>,
    /// `[vocab, hidden / 2]` index nibbles, 32 bytes a chunk.
    index: Vec<Line>,
    /// Per row, its high-byte table.
    tables: Vec<[u8; TABLE]>,
    /// Per row, where its escaped chunks start in `escaped` (`vocab + 1` entries).
    escape_start: Vec<u32>,
    /// Escaped chunks, row after row.
    escaped: Vec<RawChunk>,
    hidden: usize,
}

impl std::fmt::Debug for CompactBf16Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (v, h, e) = (self.vocab(), self.hidden, self.escaped.len());
        write!(f, "CompactBf16Head([{v}, {h}], {e} raw chunks)")
    }
}

/// A chunk stored raw: its number in its row, and its 64 weights in order.
type RawChunk = (u32, [bf16; CHUNK]);

/// Where weight `w` of a chunk keeps its low byte and index.
fn position(w: usize) -> usize {
    let (half, w) = (w / 32, w % 32);
    16 * (w / 8) + 8 * half + w % 8
}

impl CompactBf16Head {
    /// Whether a head of `hidden` columns can be stored compactly and multiplied on this CPU
    /// (the kernels need AVX2 or AVX-512).
    pub fn is_supported(hidden: usize) -> bool {
        hidden > 0 && hidden.is_multiple_of(CHUNK) && Kernel::Avx2.is_available()
    }

    /// Stores `w: [vocab, hidden]`; `hidden` must be a positive multiple of [`CHUNK`].
    pub fn from_bf16(w: &[bf16], hidden: usize) -> Result<Self> {
        if hidden == 0 || !hidden.is_multiple_of(CHUNK) {
            bail!("compact bf16 head: {hidden} columns are not a multiple of {CHUNK}")
        }
        if w.is_empty() || !w.len().is_multiple_of(hidden) {
            bail!(
                "compact bf16 head: {} weights are not rows of {hidden}",
                w.len()
            )
        }
        let vocab = w.len() / hidden;
        let chunks = hidden / CHUNK;
        let mut low = vec![Line([0; 64]); vocab * chunks];
        let mut index = vec![Line([0; 64]); (vocab * chunks).div_ceil(2)];
        let index_bytes = as_bytes_mut(&mut index);
        let rows: Vec<([u8; TABLE], Vec<RawChunk>)> = low
            .par_chunks_mut(chunks)
            .zip(index_bytes[..vocab * hidden / 2].par_chunks_mut(hidden / 2))
            .zip(w.par_chunks(hidden))
            .map(|((low, index), row)| encode_row(row, low, index))
            .collect();
        let mut tables = Vec::with_capacity(vocab);
        let mut escape_start = Vec::with_capacity(vocab + 1);
        let mut escaped = Vec::new();
        for (table, row_escapes) in rows {
            tables.push(table);
            escape_start.push(escaped.len() as u32);
            escaped.extend(row_escapes);
        }
        escape_start.push(escaped.len() as u32);
        super::back_with_huge_pages(&low);
        super::back_with_huge_pages(&index);
        Ok(Self {
            low,
            index,
            tables,
            escape_start,
            escaped,
            hidden,
        })
    }

    /// Stores a contiguous bf16 CPU tensor `[vocab, hidden]`, read in place.
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (_, hidden) = w.dims2()?;
        let (storage, layout) = w.storage_and_layout();
        let (Storage::Cpu(CpuStorage::BF16(v)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            bail!(
                "compact bf16 head: needs a contiguous bf16 CPU tensor, found {:?} on {:?}",
                w.dtype(),
                w.device().location()
            )
        };
        Self::from_bf16(&v[start..end], hidden)
    }

    pub fn vocab(&self) -> usize {
        self.tables.len()
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Bytes one forward reads.
    pub fn bytes(&self) -> usize {
        let (v, h) = (self.vocab(), self.hidden);
        v * h * 3 / 2 + v * (TABLE + 4) + self.escaped.len() * (4 + 2 * CHUNK)
    }

    /// Chunks stored raw.
    pub fn escaped_chunks(&self) -> usize {
        self.escaped.len()
    }

    /// The whole matrix `[vocab, hidden]` as it was stored before.
    pub fn to_bf16(&self) -> Vec<bf16> {
        let mut w = vec![bf16::ZERO; self.vocab() * self.hidden];
        w.par_chunks_mut(self.hidden)
            .enumerate()
            .for_each(|(v, row)| self.row(v, row));
        w
    }

    /// Row `v`'s weights, as stored before (or widened): for the embedding lookup.
    pub fn row<T: From<bf16>>(&self, v: usize, out: &mut [T]) {
        let h = self.hidden;
        let chunks = h / CHUNK;
        let index = as_bytes(&self.index);
        let escapes =
            &self.escaped[self.escape_start[v] as usize..self.escape_start[v + 1] as usize];
        for (c, out) in out[..h].chunks_exact_mut(CHUNK).enumerate() {
            if let Some((_, raw)) = escapes.iter().find(|(e, _)| *e as usize == c) {
                for (out, &w) in out.iter_mut().zip(raw) {
                    *out = w.into();
                }
                continue;
            }
            let low = &self.low[v * chunks + c].0;
            let index = &index[(v * chunks + c) * CHUNK / 2..][..CHUNK / 2];
            for (w, out) in out.iter_mut().enumerate() {
                let p = position(w);
                let i = (index[p % 32] >> (4 * (p / 32))) & 0x0f;
                let high = self.tables[v][i as usize];
                *out = bf16::from_bits(u16::from_le_bytes([low[p], high])).into();
            }
        }
    }
}

/// One row: its table (the 16 most frequent high bytes, most frequent first) and, chunk by
/// chunk, the low bytes and indices, or the chunk raw when a high byte is not in the table.
fn encode_row(row: &[bf16], low: &mut [Line], index: &mut [u8]) -> ([u8; TABLE], Vec<RawChunk>) {
    let mut counts = [0u32; 256];
    for w in row {
        counts[(w.to_bits() >> 8) as usize] += 1;
    }
    let mut order: Vec<u8> = (0..=255).collect();
    // Most frequent first; ties by value, so the table depends on the weights alone.
    order.sort_by_key(|&b| (std::cmp::Reverse(counts[b as usize]), b));
    let mut table = [0u8; TABLE];
    table.copy_from_slice(&order[..TABLE]);
    let mut slot = [None; 256];
    for (i, &b) in table.iter().enumerate() {
        slot[b as usize] = Some(i as u8);
    }
    let mut escapes = Vec::new();
    for (c, ((weights, low), index)) in row
        .chunks_exact(CHUNK)
        .zip(low.iter_mut())
        .zip(index.chunks_exact_mut(CHUNK / 2))
        .enumerate()
    {
        if weights
            .iter()
            .any(|w| slot[(w.to_bits() >> 8) as usize].is_none())
        {
            let mut raw = [bf16::ZERO; CHUNK];
            raw.copy_from_slice(weights);
            escapes.push((c as u32, raw));
            continue;
        }
        for (w, &v) in weights.iter().enumerate() {
            let [lo, hi] = v.to_bits().to_le_bytes();
            let (p, i) = (position(w), slot[hi as usize].unwrap_or(0));
            low.0[p] = lo;
            index[p % 32] |= i << (4 * (p / 32));
        }
    }
    (table, escapes)
}

fn as_bytes(lines: &[Line]) -> &[u8] {
    // SAFETY: `Line` is `repr(C)` over `[u8; 64]` with no padding: the same memory as
    // `64 · len` bytes, alive as `lines`.
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 64) }
}

fn as_bytes_mut(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`, borrowed mutably only through the returned slice.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), lines.len() * 64) }
}

/// `x: [.., hidden]` f32 through a [`CompactBf16Head`]: `[.., vocab]` f32. CPU only.
#[derive(Debug, Clone)]
pub struct MatmulCompactHead(pub Arc<CompactBf16Head>);

impl CustomOp1 for MatmulCompactHead {
    fn name(&self) -> &'static str {
        "matmul_compact_head"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (hidden, vocab) = (self.0.hidden, self.0.vocab());
        let dims = layout.shape().dims();
        if dims.last() != Some(&hidden) {
            bail!("matmul_compact_head: input shape {dims:?}, last dimension must be {hidden}")
        }
        let (CpuStorage::F32(x), Some((x0, x1))) = (x, layout.contiguous_offsets()) else {
            bail!(
                "matmul_compact_head: needs a contiguous f32 input, found {:?}",
                x.dtype()
            )
        };
        let x = &x[x0..x1];
        let mut y = vec![0f32; x.len() / hidden * vocab];
        matmul_compact(Kernel::best(), x, &self.0, &mut y)?;
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = vocab;
        }
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

/// `y[t, v] = Σ_h x[t, h] · w[v, h]` with `x: [n, hidden]` f32 and `y: [n, vocab]` on `kernel`
/// (AVX2 or AVX-512): the bits of [`super::matmul_bf16`] with that kernel on the weights `head`
/// was made from.
pub fn matmul_compact(
    kernel: Kernel,
    x: &[f32],
    head: &CompactBf16Head,
    y: &mut [f32],
) -> Result<()> {
    matmul_compact_in(kernel, x, head, y, &mut Vec::new())
}

/// [`matmul_compact`] laying the token rows out for the kernel in `rows`, which a caller keeps
/// between calls so that a decoded token allocates nothing.
pub fn matmul_compact_in(
    kernel: Kernel,
    x: &[f32],
    head: &CompactBf16Head,
    y: &mut [f32],
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))] rows: &mut Vec<f32>,
) -> Result<()> {
    if kernel == Kernel::Portable || !kernel.is_available() {
        bail!("matmul_compact: the compact bf16 head runs on AVX2 or AVX-512, not {kernel:?} on this CPU")
    }
    let (hidden, vocab) = (head.hidden, head.vocab());
    if !x.len().is_multiple_of(hidden) || y.len() != x.len() / hidden * vocab {
        bail!(
            "matmul_compact: {} inputs and {} outputs for a [{vocab}, {hidden}] head",
            x.len(),
            y.len()
        )
    }
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = kernel == Kernel::Avx512Vnni;
        let group = if avx512 { super::head::LANES } else { 16 };
        let xd = super::head::deinterleave(x, hidden, group, rows);
        let task_rows = super::head::task_rows(vocab);
        let out = super::OutPtr(y.as_mut_ptr());
        (0..vocab.div_ceil(task_rows))
            .into_par_iter()
            .for_each(|task| {
                let v = task * task_rows..((task + 1) * task_rows).min(vocab);
                // SAFETY: the kernel's instruction set is available (checked above); `xd` is
                // `x` laid out for it; tasks own disjoint rows of `y`, which outlives the loop.
                unsafe {
                    if avx512 {
                        x86::run_task(head, xd, v, out)
                    } else {
                        x86::run_task_avx2(head, xd, v, out)
                    }
                }
            });
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::head::{finish_dot, L2_ROWS, LANES, PREFETCH_BYTES};
    use super::super::OutPtr;
    use super::{as_bytes, CompactBf16Head, CHUNK};
    use half::bf16;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Asks for the low and index planes of chunk `line` `PREFETCH_BYTES` ahead.
    #[inline(always)]
    fn prefetch_planes_ahead(low: *const u8, index: *const u8, line: usize) {
        super::super::prefetch(low.wrapping_add(64 * line + PREFETCH_BYTES), false);
        super::super::prefetch(index.wrapping_add(32 * line + PREFETCH_BYTES / 2), false);
    }

    /// Rows `rows` against every token of `xd` (`[n, hidden]`, deinterleaved per 32 as the
    /// bf16 head's AVX-512 kernel reads it): slices of [`L2_ROWS`] rows, in each every group of
    /// up to four tokens against two rows at a time.
    ///
    /// # Safety
    /// The CPU supports AVX-512F, AVX-512BW and FMA; `rows` are rows of `head`; no other
    /// thread writes their outputs in `out` (`[n, vocab]`) meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,fma")]
    pub(super) unsafe fn run_task(
        head: &CompactBf16Head,
        xd: &[f32],
        rows: Range<usize>,
        out: OutPtr,
    ) {
        let n = xd.len() / head.hidden;
        for s0 in rows.clone().step_by(L2_ROWS) {
            let s1 = (s0 + L2_ROWS).min(rows.end);
            for t0 in (0..n).step_by(4) {
                let mut r = s0;
                while r < s1 {
                    // SAFETY: rows r.. and tokens t0.. exist; the caller vouches for the rest.
                    r += unsafe {
                        match ((s1 - r).min(2), (n - t0).min(4)) {
                            (1, 1) => block::<1, 1>(head, xd, r, t0, out),
                            (1, 2) => block::<1, 2>(head, xd, r, t0, out),
                            (1, 3) => block::<1, 3>(head, xd, r, t0, out),
                            (1, _) => block::<1, 4>(head, xd, r, t0, out),
                            (_, 1) => block::<2, 1>(head, xd, r, t0, out),
                            (_, 2) => block::<2, 2>(head, xd, r, t0, out),
                            (_, 3) => block::<2, 3>(head, xd, r, t0, out),
                            (_, _) => block::<2, 4>(head, xd, r, t0, out),
                        }
                    };
                }
            }
        }
    }

    /// Rows `r..r + R` against tokens `t0..t0 + T`, stored in `out`; returns `R`. Each chunk
    /// of 64 weights becomes four vectors of 16 f32 — the even and odd weights of its first
    /// half, then of its second — exactly the vectors the bf16 kernel widens from the raw
    /// weights, so each accumulator sums the same products in the same order.
    ///
    /// # Safety
    /// As [`run_task`]; those rows and tokens exist.
    // Indices name the register tile (row i, token t, vector) more plainly than iterators.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,fma")]
    #[inline]
    unsafe fn block<const R: usize, const T: usize>(
        head: &CompactBf16Head,
        xd: &[f32],
        r: usize,
        t0: usize,
        out: OutPtr,
    ) -> usize {
        let h = head.hidden;
        let chunks = h / CHUNK;
        let low = as_bytes(&head.low).as_ptr();
        let index = as_bytes(&head.index).as_ptr();
        let xp = xd.as_ptr().add(t0 * h);
        let (nibble, odd) = (
            _mm512_set1_epi8(0x0f),
            _mm512_set1_epi32(0xffff_0000u32 as i32),
        );
        let mut tables = [_mm512_setzero_si512(); R];
        // Per row, its next escaped chunk in `head.escaped` and where its escapes end.
        let (mut escape, mut escapes_end) = ([0; R], [0; R]);
        for i in 0..R {
            // SAFETY: row r + i exists, so its table and escape range do.
            let table = _mm_loadu_si128(head.tables[r + i].as_ptr().cast());
            tables[i] = _mm512_broadcast_i32x4(table);
            escape[i] = head.escape_start[r + i] as usize;
            escapes_end[i] = head.escape_start[r + i + 1] as usize;
        }
        let chunk_of = |e: usize, end: usize| (e < end).then(|| head.escaped[e].0 as usize);
        let mut next: [Option<usize>; R] =
            std::array::from_fn(|i| chunk_of(escape[i], escapes_end[i]));
        let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
        for c in 0..chunks {
            let mut wf = [[_mm512_setzero_ps(); 4]; R];
            for i in 0..R {
                let line = (r + i) * chunks + c;
                let words = if next[i] == Some(c) {
                    let raw: &[bf16; CHUNK] = &head.escaped[escape[i]].1;
                    escape[i] += 1;
                    next[i] = chunk_of(escape[i], escapes_end[i]);
                    // SAFETY: 64 bf16, two vectors of 32.
                    [
                        _mm512_loadu_si512(raw.as_ptr().cast()),
                        _mm512_loadu_si512(raw.as_ptr().add(32).cast()),
                    ]
                } else {
                    prefetch_planes_ahead(low, index, line);
                    // SAFETY: chunk c of row r + i: 64 aligned low bytes, 32 index bytes.
                    let lo = _mm512_load_si512(low.add(64 * line).cast());
                    let ix = _mm256_load_si256(index.add(32 * line).cast());
                    let ix = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(ix),
                        _mm256_srli_epi16::<4>(ix),
                    );
                    let hi = _mm512_shuffle_epi8(tables[i], _mm512_and_si512(ix, nibble));
                    [_mm512_unpacklo_epi8(lo, hi), _mm512_unpackhi_epi8(lo, hi)]
                };
                for (half, w) in words.into_iter().enumerate() {
                    wf[i][2 * half] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w));
                    wf[i][2 * half + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, odd));
                }
            }
            for t in 0..T {
                for k in 0..4 {
                    // SAFETY: 16 f32 at 64c + 16k of token t0 + t, inside its row.
                    let x = _mm512_loadu_ps(xp.add(t * h + CHUNK * c + 16 * k));
                    for i in 0..R {
                        acc[i][t][k % 2] = _mm512_fmadd_ps(wf[i][k], x, acc[i][t][k % 2]);
                    }
                }
            }
        }
        let vocab = head.vocab();
        for i in 0..R {
            for t in 0..T {
                let (mut even, mut odd) = ([0f32; 16], [0f32; 16]);
                _mm512_storeu_ps(even.as_mut_ptr(), acc[i][t][0]);
                _mm512_storeu_ps(odd.as_mut_ptr(), acc[i][t][1]);
                let lanes: [f32; LANES] =
                    std::array::from_fn(|l| if l % 2 == 0 { even[l / 2] } else { odd[l / 2] });
                let dot = finish_dot::<bf16>(&lanes, &[], &[]);
                // SAFETY: token t0 + t and row r + i exist; the caller owns these outputs.
                unsafe { out.write((t0 + t) * vocab + r + i, dot) };
            }
        }
        R
    }

    /// [`run_task`] on AVX2: one row (two for a lone token) against up to two tokens at a
    /// time, `xd` deinterleaved per 16 as the bf16 head's AVX2 kernel reads it.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; otherwise as [`run_task`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run_task_avx2(
        head: &CompactBf16Head,
        xd: &[f32],
        rows: Range<usize>,
        out: OutPtr,
    ) {
        let n = xd.len() / head.hidden;
        for s0 in rows.clone().step_by(L2_ROWS) {
            let s1 = (s0 + L2_ROWS).min(rows.end);
            for t0 in (0..n).step_by(2) {
                let mut r = s0;
                while r < s1 {
                    // SAFETY: rows r.. and tokens t0.. exist; the caller vouches for the rest.
                    r += unsafe {
                        match ((s1 - r).min(2), (n - t0).min(2)) {
                            (2, 1) => block_avx2::<2, 1>(head, xd, r, t0, out),
                            (_, 1) => block_avx2::<1, 1>(head, xd, r, t0, out),
                            (_, _) => block_avx2::<1, 2>(head, xd, r, t0, out),
                        }
                    };
                }
            }
        }
    }

    /// [`block`] on AVX2: each chunk becomes eight vectors of 8 f32 — the even and odd weights
    /// of each 16 of its first half, then of its second — the vectors the bf16 head's AVX2
    /// kernel widens, summed in its order.
    ///
    /// # Safety
    /// As [`run_task_avx2`]; those rows and tokens exist.
    // Indices name the register tile (row i, token t, quarter q) more plainly than iterators.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block_avx2<const R: usize, const T: usize>(
        head: &CompactBf16Head,
        xd: &[f32],
        r: usize,
        t0: usize,
        out: OutPtr,
    ) -> usize {
        let h = head.hidden;
        let chunks = h / CHUNK;
        let low = as_bytes(&head.low).as_ptr();
        let index = as_bytes(&head.index).as_ptr();
        let xp = xd.as_ptr().add(t0 * h);
        let (nibble, odd) = (
            _mm256_set1_epi8(0x0f),
            _mm256_set1_epi32(0xffff_0000u32 as i32),
        );
        let mut tables = [_mm256_setzero_si256(); R];
        let (mut escape, mut escapes_end) = ([0; R], [0; R]);
        for i in 0..R {
            // SAFETY: row r + i exists, so its table and escape range do.
            let table = _mm_loadu_si128(head.tables[r + i].as_ptr().cast());
            tables[i] = _mm256_broadcastsi128_si256(table);
            escape[i] = head.escape_start[r + i] as usize;
            escapes_end[i] = head.escape_start[r + i + 1] as usize;
        }
        let chunk_of = |e: usize, end: usize| (e < end).then(|| head.escaped[e].0 as usize);
        let mut next: [Option<usize>; R] =
            std::array::from_fn(|i| chunk_of(escape[i], escapes_end[i]));
        let mut acc = [[[_mm256_setzero_ps(); 4]; T]; R];
        for c in 0..chunks {
            for i in 0..R {
                let line = (r + i) * chunks + c;
                // The chunk's four runs of 16 words: first half 0..16, 16..32, then the
                // second half's.
                let words = if next[i] == Some(c) {
                    let raw = head.escaped[escape[i]].1.as_ptr();
                    escape[i] += 1;
                    next[i] = chunk_of(escape[i], escapes_end[i]);
                    // SAFETY: 64 bf16, four runs of 16.
                    std::array::from_fn::<_, 4, _>(|k| _mm256_loadu_si256(raw.add(16 * k).cast()))
                } else {
                    prefetch_planes_ahead(low, index, line);
                    // SAFETY: chunk c of row r + i: 64 aligned low bytes, 32 index bytes.
                    let lo0 = _mm256_load_si256(low.add(64 * line).cast());
                    let lo1 = _mm256_load_si256(low.add(64 * line + 32).cast());
                    let ix = _mm256_load_si256(index.add(32 * line).cast());
                    let hi0 = _mm256_shuffle_epi8(tables[i], _mm256_and_si256(ix, nibble));
                    let ix1 = _mm256_and_si256(_mm256_srli_epi16::<4>(ix), nibble);
                    let hi1 = _mm256_shuffle_epi8(tables[i], ix1);
                    [
                        _mm256_unpacklo_epi8(lo0, hi0),
                        _mm256_unpacklo_epi8(lo1, hi1),
                        _mm256_unpackhi_epi8(lo0, hi0),
                        _mm256_unpackhi_epi8(lo1, hi1),
                    ]
                };
                for (run, w) in words.into_iter().enumerate() {
                    let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
                    let odd = _mm256_castsi256_ps(_mm256_and_si256(w, odd));
                    // Runs 0, 1 are the first half's quarters 0-1 and 2-3, runs 2, 3 the
                    // second half's.
                    let (q, half) = (2 * (run % 2), run / 2);
                    for t in 0..T {
                        // SAFETY: 8 f32 at 64c + 32·half + 8q of token t0 + t, inside its row.
                        let x = xp.add(t * h + CHUNK * c + 32 * half + 8 * q);
                        let (xe, xo) = (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)));
                        acc[i][t][q] = _mm256_fmadd_ps(even, xe, acc[i][t][q]);
                        acc[i][t][q + 1] = _mm256_fmadd_ps(odd, xo, acc[i][t][q + 1]);
                    }
                }
            }
        }
        let vocab = head.vocab();
        for i in 0..R {
            for t in 0..T {
                let mut quarters = [[0f32; 8]; 4];
                for q in 0..4 {
                    _mm256_storeu_ps(quarters[q].as_mut_ptr(), acc[i][t][q]);
                }
                let lanes: [f32; LANES] = std::array::from_fn(|l| {
                    let (half, k) = (l / 16, l % 16);
                    quarters[2 * half + k % 2][k / 2]
                });
                let dot = finish_dot::<bf16>(&lanes, &[], &[]);
                // SAFETY: token t0 + t and row r + i exist; the caller owns these outputs.
                unsafe { out.write((t0 + t) * vocab + r + i, dot) };
            }
        }
        R
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::random_floats;

    /// Rows of every kind: uniform weights (few escapes), weights spanning 2⁶⁰ (most chunks
    /// escape), a zero row, special values, and rows mixing both kinds chunk by chunk.
    fn weights(vocab: usize, hidden: usize) -> Vec<bf16> {
        let uniform = random_floats(vocab * hidden, vocab as u64 + 7, 0.1);
        let wide = random_floats(vocab * hidden, vocab as u64 + 8, 2.0);
        (0..vocab * hidden)
            .map(|i| {
                let (v, c) = (i / hidden, i % hidden);
                let value = match v % 5 {
                    0 | 3 => uniform[i],
                    1 => wide[i] * 2f32.powi((c % 61) as i32 - 30),
                    2 => 0.0,
                    _ if (c / CHUNK).is_multiple_of(3) => wide[i] * 2f32.powi((c % 40) as i32 - 20),
                    _ => uniform[i],
                };
                bf16::from_f32(value)
            })
            .collect()
    }

    #[test]
    fn rows_read_back_as_stored() -> Result<()> {
        let (vocab, hidden) = (23, 3 * CHUNK);
        let mut w = weights(vocab, hidden);
        w[4 * hidden + 5] = bf16::INFINITY;
        w[4 * hidden + 6] = bf16::NAN;
        w[4 * hidden + 7] = bf16::from_bits(1); // the smallest subnormal
        let head = CompactBf16Head::from_bf16(&w, hidden)?;
        let escaped = head.escaped_chunks();
        assert!(escaped > 0 && escaped < vocab * hidden / CHUNK, "{head:?}");
        let mut row = vec![bf16::ZERO; hidden];
        for v in 0..vocab {
            head.row(v, &mut row);
            let (got, want): (Vec<u16>, Vec<u16>) = (
                row.iter().map(|w| w.to_bits()).collect(),
                w[v * hidden..(v + 1) * hidden]
                    .iter()
                    .map(|w| w.to_bits())
                    .collect(),
            );
            assert_eq!(got, want, "row {v}");
        }
        Ok(())
    }

    #[test]
    fn refuses_shapes_it_cannot_store() {
        let err = |r: Result<CompactBf16Head>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let w = vec![bf16::ONE; 96];
        assert!(err(CompactBf16Head::from_bf16(&w, 96)).contains("not a multiple of 64"));
        assert!(err(CompactBf16Head::from_bf16(&w, 0)).contains("not a multiple"));
        assert!(err(CompactBf16Head::from_bf16(&w[..64], 128)).contains("not rows of 128"));
    }
}
