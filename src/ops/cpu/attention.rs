//! Attention over f32 KV caches on the CPU, for every row of a batch in one parallel pass.
//!
//! Through candle ops, one sequence's attention in one layer is ~25 small ops (narrows, RoPE,
//! cache copies, two matmuls, the softmax pieces); with 16 sequences that cost more than the
//! arithmetic. Here a task is a block of up to `ROW_BLOCK` consecutive query rows of one
//! sequence, one KV head and a span of keys: it scores the block's query heads against the
//! keys a few at a time, as a small matrix product held in registers (each key and value row
//! loaded serves every query of the block), takes each row's softmax in f32 and sums the
//! values, normalizing after the product with V as PyTorch's CPU flash attention
//! (transformers' sdpa) does. Rows of more than `KEY_CHUNK` keys are cut into parts combined
//! afterwards (as flash decoding does), so that one long sequence keeps every thread busy.
//! Each query's arithmetic is the same whichever rows share its task, so neither the blocking
//! nor the rest of the batch changes a bit of a row's result.
//!
//! Dot products use 16 f32 lanes summed in one fixed order, with FMA on AVX2 and AVX-512
//! (the two give the same bits) and a separate multiply and add in the portable build.
//! A cache may hold f16 rows ([`KvRows::F16`]): they widen to f32 exactly as they load, so
//! the arithmetic is the f32 cache's on the rounded rows.

use super::{Kernel, OutPtr};
use half::f16;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Deref;

/// f32 lanes of the partial dot products.
const LANES: usize = 16;

/// Heads and their width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Floats of one query row: `heads · head_dim`.
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Floats of one key or value row: `kv_heads · head_dim`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Query heads per KV head (adjacent heads share one).
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Half-split ("rotate_half") RoPE of every head in `x: [n · head_dim]`, at the angles whose
/// cosines and sines are `cos`, `sin: [head_dim / 2]`; the same arithmetic as candle's `rope`.
pub fn rope_in_place(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(head_dim / 2);
        for (((a, b), &c), &s) in a.iter_mut().zip(b).zip(cos).zip(sin) {
            let (x1, x2) = (*a, *b);
            *a = x1 * c - x2 * s;
            *b = x1 * s + x2 * c;
        }
    }
}

/// Cache rows as they are held: f32, or f16 (half the bytes a decode step reads).
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> From<&'a [f32]> for KvRows<'a> {
    fn from(rows: &'a [f32]) -> Self {
        KvRows::F32(rows)
    }
}

impl<'a> From<&'a [f16]> for KvRows<'a> {
    fn from(rows: &'a [f16]) -> Self {
        KvRows::F16(rows)
    }
}

/// One sequence's part of [`attend`]: its rotated query rows `q: [t, heads · hd]`, which sit
/// at positions `keys - t .. keys`, and its cache `k`, `v: [kv_heads, capacity, hd]` (both of
/// one dtype), each head's positions contiguous so that a task streams them.
#[derive(Clone, Copy)]
pub struct SeqAttention<'a> {
    pub q: &'a [f32],
    pub k: KvRows<'a>,
    pub v: KvRows<'a>,
    /// Positions in the cache, the new rows' included.
    pub keys: usize,
    /// Positions each KV head has room for in `k` and `v` (≥ `keys`).
    pub capacity: usize,
}

/// Causal attention of every sequence's query rows over its own cache; `y: [Σ t, heads · hd]`
/// in the order of `seqs`. Query row `i` of `t` sees keys `0 ..= keys - t + i`.
pub fn attend(shape: AttentionShape, seqs: &[SeqAttention], y: &mut [f32]) {
    attend_with(Kernel::best(), shape, seqs, y)
}

/// [`attend`] with a chosen kernel (the tests compare them).
pub fn attend_with(kernel: Kernel, shape: AttentionShape, seqs: &[SeqAttention], y: &mut [f32]) {
    run_attention(kernel, shape, seqs, y, &mut AttentionWork::default(), false)
}

/// [`attend`] in buffers the caller keeps between calls: once they have grown to the calls'
/// size, attending allocates nothing (a decode step, token after token). The same bits.
pub fn attend_in(
    work: &mut AttentionWork,
    shape: AttentionShape,
    seqs: &[SeqAttention],
    y: &mut [f32],
) {
    run_attention(Kernel::best(), shape, seqs, y, work, true)
}

/// The buffers of one attention call ([`attend_in`]).
#[derive(Default)]
pub struct AttentionWork {
    /// Per output task, where its parts start (see `run_attention`).
    parts_of: Vec<usize>,
    slot_of_part: Vec<usize>,
    blocks: Vec<Block>,
    /// Per slot, the heads' unnormalized sums and (max, Σ exp).
    partial: Vec<f32>,
    /// Each block's own scores and query table, so that which thread runs it does not matter
    /// (a thread's own scratch grows on the first task it happens to get).
    scratches: Vec<Scratch>,
}

/// [`attend_with`], its buffers in `work`; each task's scratch is the work's own when
/// `own_scratch`, else the running thread's.
fn run_attention(
    kernel: Kernel,
    shape: AttentionShape,
    seqs: &[SeqAttention],
    y: &mut [f32],
    work: &mut AttentionWork,
    own_scratch: bool,
) {
    let (qw, hd, group, kv_heads) = (
        shape.q_width(),
        shape.head_dim,
        shape.group(),
        shape.kv_heads,
    );
    let width = group * hd;
    let rows: usize = seqs.iter().map(|seq| seq.q.len() / qw).sum();
    assert_eq!(y.len(), rows * qw, "attention output size");
    let AttentionWork {
        parts_of,
        slot_of_part,
        blocks,
        partial,
        scratches,
    } = work;
    // Output task i is row i / kv_heads and KV head i % kv_heads, its heads adjacent in y. Its
    // parts (KEY_CHUNK keys each, in order) are parts_of[i] .. parts_of[i + 1].
    parts_of.clear();
    parts_of.push(0);
    for seq in seqs {
        let t = seq.q.len() / qw;
        assert!(
            matches!(
                (seq.k, seq.v),
                (KvRows::F32(_), KvRows::F32(_)) | (KvRows::F16(_), KvRows::F16(_))
            ),
            "attention: keys and values of different dtypes"
        );
        assert!(
            t <= seq.keys && seq.keys <= seq.capacity,
            "attention: {t} new rows, {} keys, room for {}",
            seq.keys,
            seq.capacity
        );
        for i in 0..t {
            let parts = (seq.keys - t + i + 1).div_ceil(KEY_CHUNK);
            for _ in 0..kv_heads {
                parts_of.push(parts_of[parts_of.len() - 1] + parts);
            }
        }
    }
    // Blocks of rows × a KV head × a chunk of keys; a block's parts take adjacent slots.
    slot_of_part.clear();
    slot_of_part.resize(parts_of[parts_of.len() - 1], 0);
    blocks.clear();
    let (mut slots, mut seq_row) = (0, 0);
    for (s, seq) in seqs.iter().enumerate() {
        let t = seq.q.len() / qw;
        for start in (0..t).step_by(ROW_BLOCK) {
            let end = t.min(start + ROW_BLOCK);
            // Keys the block's last row sees.
            let visible = seq.keys - t + end;
            for g in 0..kv_heads {
                for chunk in (0..visible).step_by(KEY_CHUNK) {
                    // The rows that see the chunk's first key.
                    let from = start.max((chunk + t).saturating_sub(seq.keys));
                    for i in from..end {
                        let part = parts_of[(seq_row + i) * kv_heads + g] + chunk / KEY_CHUNK;
                        slot_of_part[part] = slots + i - from;
                    }
                    blocks.push(Block {
                        seq: s,
                        rows: from..end,
                        kv_head: g,
                        keys: chunk..visible.min(chunk + KEY_CHUNK),
                        slot: slots,
                    });
                    slots += end - from;
                }
            }
        }
        seq_row += t;
    }
    // Per slot (a row's part): its heads' unnormalized Σ exp(s − max)·V, then each head's
    // (max, Σ exp).
    let stride = width + 2 * group;
    partial.clear();
    partial.resize(slots * stride, 0.0);
    let partial_ptr = OutPtr(partial.as_mut_ptr());
    let scale = 1.0 / (hd as f32).sqrt();
    let task = |block: &Block, scratch: &mut Scratch| {
        let seq = &seqs[block.seq];
        let t = seq.q.len() / qw;
        let head = block.kv_head * seq.capacity * hd;
        let span = head + block.keys.start * hd..head + block.keys.end * hd;
        let first_sees = seq.keys - t + block.rows.start + 1;
        let queries = QueryBlock {
            hd,
            group,
            scale,
            q: &seq.q[block.rows.start * qw..block.rows.end * qw],
            q_stride: qw,
            q_offset: block.kv_head * width,
            first_keys: first_sees.min(block.keys.end) - block.keys.start,
        };
        // SAFETY: a block's slots `slot .. slot + rows` are its own (`slots` above advances
        // past them), inside `partial`, which outlives the parallel loop.
        let out = unsafe { partial_ptr.slice(block.slot * stride, block.rows.len() * stride) };
        match (seq.k, seq.v) {
            (KvRows::F32(k), KvRows::F32(v)) => {
                let (k, v) = (&k[span.clone()], &v[span]);
                run(kernel, &Job { queries, k, v }, scratch, out)
            }
            (KvRows::F16(k), KvRows::F16(v)) => {
                let (k, v) = (&k[span.clone()], &v[span]);
                run(kernel, &Job { queries, k, v }, scratch, out)
            }
            _ => unreachable!("checked above: keys and values of one dtype"),
        }
    };
    if own_scratch {
        if scratches.len() < blocks.len() {
            scratches.resize_with(blocks.len(), Scratch::default);
        }
        (blocks.par_iter())
            .zip(&mut scratches[..blocks.len()])
            .for_each(|(block, scratch)| task(block, scratch));
    } else {
        blocks
            .par_iter()
            .for_each(|block| SCRATCH.with_borrow_mut(|scratch| task(block, scratch)));
    }
    let (parts_of, slot_of_part, partial) = (&*parts_of, &*slot_of_part, &*partial);
    // Combining is light: only many tasks are worth spreading.
    y.par_chunks_mut(width)
        .with_min_len(64)
        .enumerate()
        .for_each(|(task, y)| {
            let parts = slot_of_part[parts_of[task]..parts_of[task + 1]]
                .iter()
                .map(|&slot| &partial[slot * stride..][..stride]);
            combine(parts, hd, y)
        });
}

/// Keys one part of a row scores at most. A long row is cut so that one sequence's few tasks
/// spread over the threads; the cut depends only on the row's own length, never on the rest
/// of the batch, and a row of at most this many keys is one part, whose combination below
/// changes no bit.
const KEY_CHUNK: usize = 256;

/// Query rows of one sequence a task takes together: each key and value row it loads serves
/// the query heads of this many rows.
const ROW_BLOCK: usize = 8;

/// One task: rows of a sequence against one KV head's keys in `keys` (a chunk: rows that see
/// none of it are left out).
struct Block {
    seq: usize,
    rows: std::ops::Range<usize>,
    kv_head: usize,
    keys: std::ops::Range<usize>,
    /// The first of its slots in the partial results, one a row.
    slot: usize,
}

/// A row's output from its parts (`[acc of every head, (max, Σ exp) of every head]` each):
/// every part rescaled to the largest max, summed in order, then normalized.
fn combine<'a>(parts: impl Iterator<Item = &'a [f32]> + Clone, hd: usize, y: &mut [f32]) {
    let width = y.len();
    for (r, y) in y.chunks_exact_mut(hd).enumerate() {
        let stat = |p: &[f32], k: usize| p[width + 2 * r + k];
        let max = parts
            .clone()
            .map(|p| stat(p, 0))
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        y.fill(0.0);
        for p in parts.clone() {
            let w = (stat(p, 0) - max).exp();
            sum += stat(p, 1) * w;
            for (y, &a) in y.iter_mut().zip(&p[r * hd..][..hd]) {
                *y += a * w;
            }
        }
        let inv_sum = sum.recip();
        for y in y.iter_mut() {
            *y *= inv_sum;
        }
    }
}

thread_local! {
    /// A task's scores and query table, kept between tasks.
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch {
            scores: Vec::new(),
            queries: Vec::new(),
        })
    };
}

#[derive(Default)]
struct Scratch {
    /// `[queries, span]`: the scores, then their exponentials.
    scores: Vec<f32>,
    queries: Vec<Query>,
}

/// One query head of a task: where its vector and its sum over the values start (in the
/// job's `q` and the task's output), and how many keys of the span it sees.
#[derive(Clone, Copy)]
struct Query {
    q: usize,
    acc: usize,
    seen: usize,
}

/// A block of one sequence's query rows, with the query heads of one KV head. Query `i` is
/// row `i / group`'s head `i % group` of the KV head; a row's output is its heads' sums over
/// the values, then each head's (max, Σ exp).
#[derive(Clone, Copy)]
struct QueryBlock<'a> {
    hd: usize,
    group: usize,
    scale: f32,
    /// The block's rows, `[rows, q_stride]`; the KV head's query heads start at `q_offset`.
    q: &'a [f32],
    q_stride: usize,
    q_offset: usize,
    /// Keys of the span the first row sees; each later row sees one more, up to the span.
    first_keys: usize,
}

/// A [`QueryBlock`] against a span of its KV head's keys and values, `[span, hd]`.
struct Job<'a, E> {
    queries: QueryBlock<'a>,
    k: &'a [E],
    v: &'a [E],
}

impl<'a, E> Deref for Job<'a, E> {
    type Target = QueryBlock<'a>;

    fn deref(&self) -> &QueryBlock<'a> {
        &self.queries
    }
}

/// An element of a cache row: how it widens to f32.
trait KvElement: Copy {
    fn to_f32(self) -> f32;
    /// 16 elements at `p` as lanes.
    ///
    /// # Safety
    /// As [`Lanes::load`].
    unsafe fn load<L: Lanes>(p: *const Self) -> L;
}

impl KvElement for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    unsafe fn load<L: Lanes>(p: *const f32) -> L {
        // SAFETY: the caller's contract.
        unsafe { L::load(p) }
    }
}

impl KvElement for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[inline(always)]
    unsafe fn load<L: Lanes>(p: *const f16) -> L {
        // SAFETY: the caller's contract.
        unsafe { L::load_f16(p) }
    }
}

impl<E> Job<'_, E> {
    fn span(&self) -> usize {
        self.k.len() / self.hd
    }

    /// Every query head, in order.
    fn queries(&self) -> impl Iterator<Item = Query> + '_ {
        (0..self.rows()).flat_map(move |row| {
            (0..self.group).map(move |head| Query {
                q: row * self.q_stride + self.q_offset + head * self.hd,
                acc: row * self.out_stride() + head * self.hd,
                seen: (self.first_keys + row).min(self.span()),
            })
        })
    }
}

impl QueryBlock<'_> {
    fn rows(&self) -> usize {
        self.q.len() / self.q_stride
    }

    fn out_stride(&self) -> usize {
        self.group * (self.hd + 2)
    }

    /// Where query `i`'s (max, Σ exp) sit in the task's output.
    fn stats_at(&self, i: usize) -> usize {
        let (row, head) = (i / self.group, i % self.group);
        row * self.out_stride() + self.group * self.hd + 2 * head
    }
}

fn run<E: KvElement>(kernel: Kernel, job: &Job<E>, scratch: &mut Scratch, out: &mut [f32]) {
    match kernel {
        // SAFETY: the kernel is only picked when the CPU has its features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => unsafe { run_avx512(job, scratch, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 | Kernel::AvxVnni => unsafe { run_avx2(job, scratch, out) },
        // SAFETY: the portable lanes need no feature.
        _ => unsafe { job_body::<Portable, E, 2, 2, 4, 1>(job, scratch, out) },
    }
}

/// # Safety
/// The CPU must support AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn run_avx512<E: KvElement>(job: &Job<E>, scratch: &mut Scratch, out: &mut [f32]) {
    // SAFETY: the features are this function's own. 16 score accumulators fold at once
    // (`fold16`); 16 value accumulators: 4 query heads × 64 floats.
    unsafe { job_body::<std::arch::x86_64::__m512, E, 4, 4, 4, 4>(job, scratch, out) }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2<E: KvElement>(job: &Job<E>, scratch: &mut Scratch, out: &mut [f32]) {
    // SAFETY: the features are this function's own. Each accumulator takes two of the 16
    // registers.
    unsafe { job_body::<x86_lanes::Avx2Lanes, E, 2, 2, 4, 1>(job, scratch, out) }
}

/// 16 f32 lanes of partial sums in a kernel's registers. A dot product's lane `l` sums the
/// products of elements `l`, `l + 16`, … in order; the lanes are then folded in halves
/// (`fold`), and the elements past the last 16 added one by one.
///
/// # Safety
/// Every method but `mul_add_scalar` needs the CPU features of its kernel; `load` and `store`
/// need 16 floats at the pointer.
trait Lanes: Copy {
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// 16 f16 at `p`, widened (exactly).
    unsafe fn load_f16(p: *const f16) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn splat(x: f32) -> Self;
    /// `acc + a·b`, rounded once with FMA (the SIMD kernels), twice without.
    unsafe fn mul_add(a: Self, b: Self, acc: Self) -> Self;
    fn mul_add_scalar(a: f32, b: f32, acc: f32) -> f32;
    /// [`exp_minus`] of every lane.
    unsafe fn exp_minus(self, max: f32) -> Self;
    /// [`exp_minus`] as the lanes compute it.
    #[inline(always)]
    fn exp_minus_scalar(x: f32, max: f32) -> f32 {
        exp_minus(x, max, Self::mul_add_scalar)
    }
    /// `sums[i]`: the lanes of `acc[i]` folded in halves (16 → 8 → 4 → 2 → 1).
    unsafe fn fold(acc: &[Self], sums: &mut [f32]);
}

/// The portable build's lanes: products rounded, then added.
#[derive(Clone, Copy)]
struct Portable([f32; LANES]);

impl Lanes for Portable {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; LANES])
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's 16 floats.
        Portable(unsafe { p.cast::<[f32; LANES]>().read_unaligned() })
    }

    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> Self {
        // SAFETY: the caller's 16 elements.
        let halves = unsafe { p.cast::<[f16; LANES]>().read_unaligned() };
        Portable(halves.map(f16::to_f32))
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: as above.
        unsafe { p.cast::<[f32; LANES]>().write_unaligned(self.0) }
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Portable([x; LANES])
    }

    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, mut acc: Self) -> Self {
        for l in 0..LANES {
            acc.0[l] += a.0[l] * b.0[l];
        }
        acc
    }

    #[inline(always)]
    fn mul_add_scalar(a: f32, b: f32, acc: f32) -> f32 {
        acc + a * b
    }

    #[inline(always)]
    unsafe fn exp_minus(self, max: f32) -> Self {
        Portable(self.0.map(|x| Self::exp_minus_scalar(x, max)))
    }

    #[inline(always)]
    unsafe fn fold(acc: &[Self], sums: &mut [f32]) {
        for (Portable(mut acc), sum) in acc.iter().copied().zip(sums) {
            let mut width = LANES / 2;
            while width > 0 {
                for l in 0..width {
                    acc[l] += acc[l + width];
                }
                width /= 2;
            }
            *sum = acc[0];
        }
    }
}

/// AVX-512 (one register) and AVX2 (two) lanes, with FMA; the same bits either way.
#[cfg(target_arch = "x86_64")]
mod x86_lanes {
    use super::{Lanes, EXP_MIN, EXP_POLY, LANES, LN2_HI, LN2_LO};
    use half::f16;
    use std::arch::x86_64::*;
    use std::f32::consts::LOG2_E;

    // SAFETY (every method): AVX-512F and FMA, the trait's contract; loads and stores stay in
    // the caller's 16 floats.
    impl Lanes for __m512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { _mm512_setzero_ps() }
        }

        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm512_loadu_ps(p) }
        }

        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self {
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
        }

        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self) }
        }

        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { _mm512_set1_ps(x) }
        }

        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, acc: Self) -> Self {
            unsafe { _mm512_fmadd_ps(a, b, acc) }
        }

        #[inline(always)]
        fn mul_add_scalar(a: f32, b: f32, acc: f32) -> f32 {
            a.mul_add(b, acc)
        }

        #[inline(always)]
        unsafe fn exp_minus(self, max: f32) -> Self {
            unsafe {
                let y = _mm512_max_ps(
                    _mm512_sub_ps(self, _mm512_set1_ps(max)),
                    _mm512_set1_ps(EXP_MIN),
                );
                let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_mul_ps(y, _mm512_set1_ps(LOG2_E)),
                );
                let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_HI), y);
                let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_LO), r);
                let mut p = _mm512_set1_ps(EXP_POLY[0]);
                for &c in &EXP_POLY[1..] {
                    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
                }
                let e = _mm512_add_ps(
                    _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
                    _mm512_set1_ps(1.0),
                );
                let k = _mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127));
                _mm512_mul_ps(e, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(k)))
            }
        }

        #[inline(always)]
        unsafe fn fold(acc: &[Self], sums: &mut [f32]) {
            if acc.len() == 16 {
                // SAFETY: as above; 16 accumulators and sums.
                return unsafe { fold16(acc.try_into().unwrap(), sums) };
            }
            for (&acc, sum) in acc.iter().zip(sums) {
                unsafe {
                    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
                    *sum = fold8(_mm256_add_ps(_mm512_castps512_ps256(acc), hi));
                }
            }
        }
    }

    /// The fold of 16 registers at once, each step adding the same lanes as the fold of one
    /// (16 → 8 → 4 → 2 → 1) but for two to eight registers per instruction.
    #[inline(always)]
    unsafe fn fold16(acc: &[__m512; 16], sums: &mut [f32]) {
        // SAFETY: register arithmetic; the store writes the 16 sums.
        unsafe {
            // 8 registers: [lanes 0..8 + lanes 8..16 of acc 2i, the same of acc 2i + 1].
            let mut halves = [_mm512_setzero_ps(); 8];
            for (i, h) in halves.iter_mut().enumerate() {
                let (a, b) = (acc[2 * i], acc[2 * i + 1]);
                *h = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x44>(a, b),
                    _mm512_shuffle_f32x4::<0xEE>(a, b),
                );
            }
            // 4 registers: 128-bit block b of register m holds 4 lanes of acc 4m + b.
            let mut quarters = [_mm512_setzero_ps(); 4];
            for (m, q) in quarters.iter_mut().enumerate() {
                let (a, b) = (halves[2 * m], halves[2 * m + 1]);
                *q = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x88>(a, b),
                    _mm512_shuffle_f32x4::<0xDD>(a, b),
                );
            }
            // 2 registers: block b of register n holds 2 lanes of acc 8n + b, then of 8n + 4 + b.
            let mut eighths = [_mm512_setzero_ps(); 2];
            for (n, e) in eighths.iter_mut().enumerate() {
                let (a, b) = (
                    _mm512_castps_pd(quarters[2 * n]),
                    _mm512_castps_pd(quarters[2 * n + 1]),
                );
                *e = _mm512_add_ps(
                    _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                    _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
                );
            }
            let (a, b) = (eighths[0], eighths[1]);
            // Lane 4b + k: acc 4k + b.
            let folded = _mm512_add_ps(
                _mm512_shuffle_ps::<0x88>(a, b),
                _mm512_shuffle_ps::<0xDD>(a, b),
            );
            let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            _mm512_storeu_ps(sums.as_mut_ptr(), _mm512_permutexvar_ps(order, folded));
        }
    }

    /// Lanes 0..8 of `acc` in halves of 8, as two AVX2 registers.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2Lanes(__m256, __m256);

    // SAFETY (every method): AVX2, FMA and F16C, the trait's contract; loads and stores stay in the
    // caller's 16 floats.
    impl Lanes for Avx2Lanes {
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Avx2Lanes(_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }

        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Avx2Lanes(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(LANES / 2))) }
        }

        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self {
            unsafe {
                Avx2Lanes(
                    _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(p.add(LANES / 2).cast())),
                )
            }
        }

        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe {
                _mm256_storeu_ps(p, self.0);
                _mm256_storeu_ps(p.add(LANES / 2), self.1);
            }
        }

        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            unsafe { Avx2Lanes(_mm256_set1_ps(x), _mm256_set1_ps(x)) }
        }

        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, acc: Self) -> Self {
            unsafe {
                Avx2Lanes(
                    _mm256_fmadd_ps(a.0, b.0, acc.0),
                    _mm256_fmadd_ps(a.1, b.1, acc.1),
                )
            }
        }

        #[inline(always)]
        fn mul_add_scalar(a: f32, b: f32, acc: f32) -> f32 {
            a.mul_add(b, acc)
        }

        #[inline(always)]
        unsafe fn exp_minus(self, max: f32) -> Self {
            unsafe { Avx2Lanes(exp_minus8(self.0, max), exp_minus8(self.1, max)) }
        }

        #[inline(always)]
        unsafe fn fold(acc: &[Self], sums: &mut [f32]) {
            for (&Avx2Lanes(lo, hi), sum) in acc.iter().zip(sums) {
                *sum = unsafe { fold8(_mm256_add_ps(lo, hi)) };
            }
        }
    }

    /// [`exp_minus`](super::exp_minus) of 8 lanes, in the AVX-512 lanes' steps.
    #[inline(always)]
    unsafe fn exp_minus8(x: __m256, max: f32) -> __m256 {
        // SAFETY: register arithmetic; AVX2 and FMA are the caller's.
        unsafe {
            let y = _mm256_max_ps(
                _mm256_sub_ps(x, _mm256_set1_ps(max)),
                _mm256_set1_ps(EXP_MIN),
            );
            let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(y, _mm256_set1_ps(LOG2_E)),
            );
            let r = _mm256_fmadd_ps(k, _mm256_set1_ps(-LN2_HI), y);
            let r = _mm256_fmadd_ps(k, _mm256_set1_ps(-LN2_LO), r);
            let mut p = _mm256_set1_ps(EXP_POLY[0]);
            for &c in &EXP_POLY[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let e = _mm256_add_ps(
                _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
                _mm256_set1_ps(1.0),
            );
            let k = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
            _mm256_mul_ps(e, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(k)))
        }
    }

    /// 8 lanes folded in halves to one.
    #[inline(always)]
    unsafe fn fold8(lanes8: __m256) -> f32 {
        // SAFETY: register arithmetic only; AVX is implied by either kernel's features.
        unsafe {
            let l4 = _mm_add_ps(
                _mm256_castps256_ps128(lanes8),
                _mm256_extractf128_ps::<1>(lanes8),
            );
            let l2 = _mm_add_ps(l4, _mm_movehl_ps(l4, l4));
            _mm_cvtss_f32(_mm_add_ss(l2, _mm_shuffle_ps::<1>(l2, l2)))
        }
    }
}

/// Scores, softmax and the sums over the values of one task. Tiles: `SQ` query heads × `SK`
/// keys of scores, `VQ` query heads × `VD` 16-float strips of the sums over the values.
///
/// # Safety
/// The CPU has `L`'s features.
#[inline(always)]
unsafe fn job_body<
    L: Lanes,
    E: KvElement,
    const SQ: usize,
    const SK: usize,
    const VQ: usize,
    const VD: usize,
>(
    job: &Job<E>,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let Scratch { scores, queries } = scratch;
    queries.clear();
    queries.extend(job.queries());
    let span = job.span();
    // Room for the longest span at once: a decode step's span grows a key a step, and growing
    // the scores to fit would reallocate now and then.
    let most = queries.len() * KEY_CHUNK.max(span);
    if scores.capacity() < most {
        scores.reserve_exact(most - scores.len());
    }
    scores.resize(queries.len() * span, 0.0);
    // SAFETY: the caller's features.
    unsafe { score_all::<L, E, SQ, SK>(job, queries, scores) };
    for (i, query) in queries.iter().enumerate() {
        let p = &mut scores[i * span..][..query.seen];
        let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut chunks = p.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            // SAFETY: the caller's features; 16 floats in and out.
            unsafe {
                L::load(chunk.as_ptr())
                    .exp_minus(max)
                    .store(chunk.as_mut_ptr())
            };
        }
        for s in chunks.into_remainder() {
            *s = L::exp_minus_scalar(*s, max);
        }
        out[job.stats_at(i)] = max;
    }
    // Each Σ exp is a chain of adds in key order: a few run side by side.
    let mut i = 0;
    for rows in scores.chunks_exact(SUMS * span).take(queries.len() / SUMS) {
        let mut p = [&[][..]; SUMS];
        for (a, p) in p.iter_mut().enumerate() {
            *p = &rows[a * span..][..queries[i + a].seen];
        }
        for (a, sum) in sums_in_order(p).into_iter().enumerate() {
            out[job.stats_at(i + a) + 1] = sum;
        }
        i += SUMS;
    }
    for (i, query) in queries.iter().enumerate().skip(i) {
        let [sum] = sums_in_order([&scores[i * span..][..query.seen]]);
        out[job.stats_at(i) + 1] = sum;
    }
    // SAFETY: as above.
    unsafe { weigh_all::<L, E, VQ, VD>(job, queries, scores, out) };
}

/// [`exp_minus`] clamps its argument here, where `2ᵏ` is still a normal f32: a weight below
/// it reads as e⁻⁸⁷ ≈ 1.6·10⁻³⁸, nothing next to the row's largest weight, 1.
const EXP_MIN: f32 = -87.0;
/// ln 2 in two parts: `k · LN2_HI` is exact for the `|k| ≤ 126` used.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' `expf` polynomial: `exp(r) ≈ 1 + r + r² · P(r)` for `|r| ≤ ln 2 / 2`.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `exp(x − max)` for `x ≤ max`, within 2 ulp of `exp` (tested): `k = round(y / ln 2)`,
/// `exp(y) = 2ᵏ · exp(y − k ln 2)`. The SIMD lanes run these steps in this order with FMA
/// (`mul_add` = fma), the portable build with a separate multiply and add, so each kernel's
/// lanes and its scalar tail agree bit for bit. libm's `expf`, one call per weight, took a
/// third of a decode step's attention.
#[inline(always)]
fn exp_minus(x: f32, max: f32, mul_add: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let y = (x - max).max(EXP_MIN);
    let k = (y * std::f32::consts::LOG2_E).round_ties_even();
    let r = mul_add(k, -LN2_LO, mul_add(k, -LN2_HI, y));
    let p = EXP_POLY[1..]
        .iter()
        .fold(EXP_POLY[0], |p, &c| mul_add(p, r, c));
    let e = mul_add(p, r * r, r) + 1.0;
    e * f32::from_bits(((k as i32 + 127) << 23) as u32)
}

/// Rows of exponentials summed side by side.
const SUMS: usize = 4;

/// Each row's sum, left to right from 0.
#[inline(always)]
fn sums_in_order<const N: usize>(rows: [&[f32]; N]) -> [f32; N] {
    let mut sums = [0f32; N];
    let common = rows.iter().map(|r| r.len()).min().unwrap_or(0);
    for j in 0..common {
        for (sum, row) in sums.iter_mut().zip(&rows) {
            *sum += row[j];
        }
    }
    for (sum, row) in sums.iter_mut().zip(&rows) {
        *sum = row[common..].iter().fold(*sum, |s, &x| s + x);
    }
    sums
}

/// `scores[i · span + j] = q_i · k_j · scale` for every key `j` that query `i` sees (and a few
/// past the diagonal, never read).
///
/// # Safety
/// The CPU has `L`'s features.
#[inline(always)]
unsafe fn score_all<L: Lanes, E: KvElement, const QT: usize, const KT: usize>(
    job: &Job<E>,
    queries: &[Query],
    scores: &mut [f32],
) {
    let (n, span, hd) = (queries.len(), job.span(), job.hd);
    let mut j = 0;
    while j < span {
        let keys = if span - j >= KT { KT } else { 1 };
        // A task reads its span once, from DRAM in a decode step, and the hardware prefetcher
        // stops at each 4 KiB page: keys further on go to L1 now, and the values of these
        // keys to L2 for `weigh_all`.
        prefetch_rows(
            job.k,
            (j + PREFETCH_KEYS) * hd..(j + PREFETCH_KEYS + keys) * hd,
            false,
        );
        prefetch_rows(job.v, j * hd..(j + keys) * hd, true);
        let mut i = 0;
        while i < n {
            let tile = if n - i >= QT { QT } else { 1 };
            // Tiles wholly past the diagonal are skipped.
            if j < queries[i + tile - 1].seen {
                let queries = &queries[i..i + tile];
                let scores = &mut scores[i * span + j..];
                // SAFETY: the caller's features.
                unsafe {
                    match (tile == QT, keys == KT) {
                        (true, true) => score_tile::<L, E, QT, KT>(job, queries, j, scores),
                        (true, false) => score_tile::<L, E, QT, 1>(job, queries, j, scores),
                        (false, true) => score_tile::<L, E, 1, KT>(job, queries, j, scores),
                        (false, false) => score_tile::<L, E, 1, 1>(job, queries, j, scores),
                    }
                }
            }
            i += tile;
        }
        j += keys;
    }
}

/// How far ahead of the scores the key rows are prefetched: 4 KiB at 128 dimensions.
const PREFETCH_KEYS: usize = 8;

/// Hints the cache lines of `rows[range]` in (see [`super::prefetch`]); past the end of
/// `rows` is harmless.
#[inline(always)]
fn prefetch_rows<E>(rows: &[E], range: std::ops::Range<usize>, to_l2: bool) {
    for at in range.step_by(64 / size_of::<E>()) {
        super::prefetch(rows.as_ptr().wrapping_add(at), to_l2);
    }
}

/// Scores of `QT` queries against keys `j .. j + KT`, into `scores[a · span + b]`.
///
/// # Safety
/// The CPU has `L`'s features.
#[inline(always)]
unsafe fn score_tile<L: Lanes, E: KvElement, const QT: usize, const KT: usize>(
    job: &Job<E>,
    queries: &[Query],
    j: usize,
    scores: &mut [f32],
) {
    let (hd, span) = (job.hd, job.span());
    let full = hd / LANES * LANES;
    let mut q: [&[f32]; QT] = [&[]; QT];
    for (q, query) in q.iter_mut().zip(queries) {
        *q = &job.q[query.q..][..hd];
    }
    let k = &job.k[j * hd..(j + KT) * hd];
    let mut sums = [[0f32; KT]; QT];
    // SAFETY: the caller's features; every load reads 16 floats below `full` ≤ hd of a query
    // or a key row of hd floats.
    unsafe {
        let mut acc = [[L::zero(); KT]; QT];
        let (mut queries, mut keys) = ([L::zero(); QT], [L::zero(); KT]);
        for c in (0..full).step_by(LANES) {
            for (lanes, q) in queries.iter_mut().zip(&q) {
                *lanes = L::load(q.as_ptr().add(c));
            }
            for (b, lanes) in keys.iter_mut().enumerate() {
                *lanes = E::load(k.as_ptr().add(b * hd + c));
            }
            for (acc, &q) in acc.iter_mut().zip(&queries) {
                for (acc, &k) in acc.iter_mut().zip(&keys) {
                    *acc = L::mul_add(q, k, *acc);
                }
            }
        }
        L::fold(acc.as_flattened(), sums.as_flattened_mut());
    }
    for (a, sums) in sums.iter_mut().enumerate() {
        for (b, sum) in sums.iter_mut().enumerate().filter(|_| full < hd) {
            let tail = q[a][full..].iter().zip(&k[b * hd + full..][..hd - full]);
            *sum = tail.fold(*sum, |s, (&x, &y)| s + x * y.to_f32());
        }
        for (score, &sum) in scores[a * span..][..KT].iter_mut().zip(sums.iter()) {
            *score = sum * job.scale;
        }
    }
}

/// Each query's `Σ_j p[j] · V[j]` over the keys it sees, in key order, into its place in `out`.
///
/// # Safety
/// The CPU has `L`'s features.
#[inline(always)]
unsafe fn weigh_all<L: Lanes, E: KvElement, const QT: usize, const DT: usize>(
    job: &Job<E>,
    queries: &[Query],
    p: &[f32],
    out: &mut [f32],
) {
    let (hd, n, span) = (job.hd, queries.len(), job.span());
    let full = hd / LANES * LANES;
    // The bounds the tiles rely on.
    assert!(
        job.v.len() == span * hd
            && p.len() >= n * span
            && out.len() >= job.rows() * job.out_stride()
            && queries.iter().all(|q| q.seen <= span)
    );
    // Keys every query sees, as tiles, a block of keys at a time so that its values stay in
    // L1 for every tile; then those of the later rows only, one query at a time.
    let common = queries.first().map_or(0, |q| q.seen);
    for start in (0..common.max(1)).step_by(VALUE_KEYS) {
        let keys = start..common.min(start + VALUE_KEYS);
        let mut i = 0;
        while i < n {
            let tile = if n - i >= QT { QT } else { 1 };
            let (queries, p) = (&queries[i..i + tile], &p[i * span..]);
            let mut d = 0;
            while d < full {
                let strips = if full - d >= DT * LANES { DT } else { 1 };
                let keys = keys.clone();
                // SAFETY: the caller's features; keys, queries and strips within the bounds
                // above.
                unsafe {
                    match (tile == QT, strips == DT) {
                        (true, true) => weigh_tile::<L, E, QT, DT>(job, queries, p, d, keys, out),
                        (true, false) => weigh_tile::<L, E, QT, 1>(job, queries, p, d, keys, out),
                        (false, true) => weigh_tile::<L, E, 1, DT>(job, queries, p, d, keys, out),
                        (false, false) => weigh_tile::<L, E, 1, 1>(job, queries, p, d, keys, out),
                    }
                }
                d += strips * LANES;
            }
            i += tile;
        }
    }
    for (i, query) in queries.iter().enumerate().filter(|(_, q)| q.seen > common) {
        let (query, p) = (std::slice::from_ref(query), &p[i * span..]);
        for d in (0..full).step_by(LANES) {
            // SAFETY: as above.
            unsafe { weigh_tile::<L, E, 1, 1>(job, query, p, d, common..query[0].seen, out) };
        }
    }
    // Elements past the last 16.
    for (i, query) in queries.iter().enumerate().filter(|_| full < hd) {
        let acc = &mut out[query.acc..][..hd];
        acc[full..].fill(0.0);
        let p = &p[i * span..][..query.seen];
        for (&p, v) in p.iter().zip(job.v.chunks_exact(hd)) {
            for (a, &v) in acc[full..].iter_mut().zip(&v[full..]) {
                *a = L::mul_add_scalar(p, v.to_f32(), *a);
            }
        }
    }
}

/// Keys of a block of the sums over the values: their value rows, 16 KiB at 128 floats.
const VALUE_KEYS: usize = 32;

/// Elements `d .. d + 16 · DT` of `QT` queries' sums over the values, for the keys in `keys`:
/// from 0 when they start at key 0, else from what `out` holds; `p[a · span + j]`: query
/// `a`'s weight of key `j`.
///
/// # Safety
/// The CPU has `L`'s features; keys within the span and elements within each query's sum.
#[inline(always)]
unsafe fn weigh_tile<L: Lanes, E: KvElement, const QT: usize, const DT: usize>(
    job: &Job<E>,
    queries: &[Query],
    p: &[f32],
    d: usize,
    keys: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let (hd, span) = (job.hd, job.span());
    let out = out.as_mut_ptr();
    // SAFETY: the caller's features and bounds.
    unsafe {
        let mut at = [out; QT];
        let mut acc = [[L::zero(); DT]; QT];
        for (a, acc) in acc.iter_mut().enumerate() {
            at[a] = out.add(queries[a].acc + d);
            for (s, acc) in acc.iter_mut().enumerate().filter(|_| keys.start > 0) {
                *acc = L::load(at[a].add(s * LANES));
            }
        }
        let p = p.as_ptr();
        let mut v = [L::zero(); DT];
        for j in keys {
            let row = job.v.as_ptr().add(j * hd + d);
            for (s, v) in v.iter_mut().enumerate() {
                *v = E::load(row.add(s * LANES));
            }
            for (a, acc) in acc.iter_mut().enumerate() {
                let p = L::splat(*p.add(a * span + j));
                for (acc, &v) in acc.iter_mut().zip(&v) {
                    *acc = L::mul_add(p, v, *acc);
                }
            }
        }
        for (a, acc) in acc.iter().enumerate() {
            for (s, acc) in acc.iter().enumerate() {
                acc.store(at[a].add(s * LANES));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
    }

    /// The rows of an f32 cache.
    fn f32_rows(rows: KvRows<'_>) -> &[f32] {
        match rows {
            KvRows::F32(rows) => rows,
            KvRows::F16(_) => panic!("an f32 cache was expected"),
        }
    }

    /// Plain f64 attention of one row's head over an f32 cache.
    fn reference(shape: AttentionShape, seq: &SeqAttention, row: usize, head: usize) -> Vec<f64> {
        let (hd, cap, qw) = (shape.head_dim, seq.capacity, shape.q_width());
        let (k, v) = (f32_rows(seq.k), f32_rows(seq.v));
        let t = seq.q.len() / qw;
        let visible = seq.keys - t + row + 1;
        let g = head / shape.group();
        let q = &seq.q[row * qw + head * hd..][..hd];
        let scores: Vec<f64> = (0..visible)
            .map(|j| {
                let k = &k[(g * cap + j) * hd..][..hd];
                q.iter()
                    .zip(k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    / (hd as f64).sqrt()
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..hd)
            .map(|d| {
                (0..visible)
                    .map(|j| e[j] * v[(g * cap + j) * hd + d] as f64)
                    .sum::<f64>()
                    / sum
            })
            .collect()
    }

    /// Every kernel's softmax weights on `xs` (all ≤ `max`), through its lanes and its tail.
    fn exps(kernel: Kernel, xs: &[f32], max: f32) -> Vec<f32> {
        fn run<L: Lanes>(xs: &[f32], max: f32) -> Vec<f32> {
            let mut out = xs.to_vec();
            let mut chunks = out.chunks_exact_mut(LANES);
            for chunk in &mut chunks {
                // SAFETY: the caller checked the kernel's features; 16 floats.
                unsafe {
                    L::load(chunk.as_ptr())
                        .exp_minus(max)
                        .store(chunk.as_mut_ptr())
                };
            }
            for x in chunks.into_remainder() {
                *x = L::exp_minus_scalar(*x, max);
            }
            out
        }
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => run::<std::arch::x86_64::__m512>(xs, max),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::AvxVnni => run::<x86_lanes::Avx2Lanes>(xs, max),
            _ => run::<Portable>(xs, max),
        }
    }

    #[test]
    fn softmax_exp_is_within_two_ulp_and_each_kernel_agrees_with_its_tail() {
        let mut rng = StdRng::seed_from_u64(9);
        let max = 3.25f32;
        // Every magnitude down to the clamp, the exact max, and a tail of 5 past the lanes.
        let mut xs: Vec<f32> = (0..4091)
            .map(|_| max - rng.random_range(0f32..1.0).powi(2) * 87.0)
            .collect();
        xs.extend([
            max,
            max - 1e-7,
            max - 0.5 * std::f32::consts::LN_2,
            max - 86.9,
            max - 100.0,
        ]);
        let mut lanes_of_kernels = vec![];
        for &kernel in Kernel::available() {
            let e = exps(kernel, &xs, max);
            for (&x, &e) in xs.iter().zip(&e) {
                let exact = ((x - max) as f64).exp();
                if x - max < EXP_MIN {
                    assert!(
                        (0.0..=1.7e-38).contains(&e),
                        "{kernel:?}: exp({}) = {e}",
                        x - max
                    );
                    continue;
                }
                let ulp = f32::EPSILON as f64 * (exact as f32).abs() as f64;
                assert!(
                    (e as f64 - exact).abs() <= 2.0 * ulp,
                    "{kernel:?}: exp({}) = {e}, exactly {exact}",
                    x - max
                );
            }
            // The tail runs the lanes' steps: shifting the values by one lane moves which of
            // them take the tail.
            assert_eq!(e[1..], exps(kernel, &xs[1..], max)[..], "{kernel:?}");
            assert_eq!(e[xs.len() - 5], 1.0, "the row's largest weighs exactly 1");
            if kernel != Kernel::Portable {
                lanes_of_kernels.push(e);
            }
        }
        assert!(
            lanes_of_kernels.windows(2).all(|w| w[0] == w[1]),
            "SIMD kernels differ"
        );
    }

    #[test]
    fn every_kernel_matches_f64_attention_and_simd_kernels_agree() {
        let mut rng = StdRng::seed_from_u64(5);
        for shape in [
            AttentionShape {
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
            },
            AttentionShape {
                heads: 3,
                kv_heads: 3,
                head_dim: 20,
            },
            AttentionShape {
                heads: 8,
                kv_heads: 1,
                head_dim: 40,
            },
        ] {
            // (new rows, positions cached before them)
            let lens = [(1, 0), (1, 37), (5, 0), (3, 11), (1, 300)];
            let data: Vec<_> = lens
                .iter()
                .map(|&(t, before)| {
                    let keys = before + t;
                    let q = random(&mut rng, t * shape.q_width());
                    // Room for 3 positions more than held, as a growing cache has.
                    let k = random(&mut rng, (keys + 3) * shape.kv_width());
                    let v = random(&mut rng, (keys + 3) * shape.kv_width());
                    (q, k, v, keys)
                })
                .collect();
            let seqs: Vec<SeqAttention> = data
                .iter()
                .map(|(q, k, v, keys)| SeqAttention {
                    q,
                    k: KvRows::F32(k),
                    v: KvRows::F32(v),
                    keys: *keys,
                    capacity: keys + 3,
                })
                .collect();
            let rows: usize = lens.iter().map(|l| l.0).sum();
            let mut outputs = vec![];
            for &kernel in Kernel::available() {
                let mut y = vec![f32::NAN; rows * shape.q_width()];
                attend_with(kernel, shape, &seqs, &mut y);
                let mut at = 0;
                for seq in &seqs {
                    for row in 0..seq.q.len() / shape.q_width() {
                        for head in 0..shape.heads {
                            let want = reference(shape, seq, row, head);
                            let got = &y[at + head * shape.head_dim..][..shape.head_dim];
                            for (g, w) in got.iter().zip(&want) {
                                assert!(
                                    (*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                                    "{kernel:?} {shape:?}: {g} vs {w}"
                                );
                            }
                        }
                        at += shape.q_width();
                    }
                }
                if kernel != Kernel::Portable {
                    outputs.push((kernel, y));
                }
            }
            for pair in outputs.windows(2) {
                let same = pair[0]
                    .1
                    .iter()
                    .zip(&pair[1].1)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{:?} and {:?} differ", pair[0].0, pair[1].0);
            }
        }
    }

    /// f16 rows widen exactly as they load: every kernel gives an f16 cache the bits of the
    /// f32 cache holding the same rounded values (scores, the value sums and the tails past
    /// the last 16 elements all read the rows).
    #[test]
    fn an_f16_cache_is_the_f32_cache_of_its_rounded_rows() {
        let mut rng = StdRng::seed_from_u64(8);
        // Widths with and without a tail; 300 keys cross KEY_CHUNK; 5 rows take the
        // prefill tiles.
        for (heads, kv_heads, head_dim, t) in [(4, 2, 16, 1), (6, 2, 40, 5), (8, 1, 128, 1)] {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim,
            };
            let (keys, capacity) = (300, 320);
            let q = random(&mut rng, t * shape.q_width());
            let half: Vec<f16> = random(&mut rng, 2 * capacity * shape.kv_width())
                .into_iter()
                .map(f16::from_f32)
                .collect();
            let widened: Vec<f32> = half.iter().map(|x| x.to_f32()).collect();
            let (k16, v16) = half.split_at(half.len() / 2);
            let (k32, v32) = widened.split_at(widened.len() / 2);
            let seq32 = SeqAttention {
                q: &q,
                k: k32.into(),
                v: v32.into(),
                keys,
                capacity,
            };
            let seq16 = SeqAttention {
                k: k16.into(),
                v: v16.into(),
                ..seq32
            };
            for &kernel in Kernel::available() {
                let mut y32 = vec![f32::NAN; q.len()];
                attend_with(kernel, shape, &[seq32], &mut y32);
                let mut y16 = vec![f32::NAN; q.len()];
                attend_with(kernel, shape, &[seq16], &mut y16);
                assert!(y32.iter().all(|y| y.is_finite() && *y != 0.0), "{kernel:?}");
                let same = y16
                    .iter()
                    .zip(&y32)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{kernel:?} {shape:?}: f16 rows differ from their f32 widening"
                );
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_other_sequences() {
        let mut rng = StdRng::seed_from_u64(6);
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 1,
            head_dim: 32,
        };
        let (q, k, v) = (
            random(&mut rng, 128),
            random(&mut rng, 64 * 32),
            random(&mut rng, 64 * 32),
        );
        let (q2, k2) = (random(&mut rng, 3 * 128), random(&mut rng, 64 * 32));
        let alone = SeqAttention {
            q: &q,
            k: KvRows::F32(&k),
            v: KvRows::F32(&v),
            keys: 50,
            capacity: 64,
        };
        let other = SeqAttention {
            q: &q2,
            k: KvRows::F32(&k2),
            v: KvRows::F32(&v),
            keys: 9,
            capacity: 64,
        };
        let mut y1 = vec![0f32; 128];
        attend(shape, &[alone], &mut y1);
        let mut y2 = vec![0f32; 4 * 128];
        attend(shape, &[other, alone], &mut y2);
        assert_eq!(y1, y2[3 * 128..]);
    }

    /// Rows prefilled together, in blocks, give each row the bits it gets as the only row
    /// of a step (decoding one token at a time over the same cache), on every kernel.
    #[test]
    fn a_prefilled_row_matches_the_row_attended_alone() {
        let mut rng = StdRng::seed_from_u64(7);
        // Query heads per KV head of 1, 3 and 4; widths with and without a tail past 16.
        for (heads, kv_heads, head_dim) in [(4, 4, 32), (6, 2, 20), (8, 2, 64)] {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim,
            };
            // 19 new rows after 250 cached: blocks that cross the first KEY_CHUNK.
            let (t, keys, capacity) = (19, 269, 272);
            let q = random(&mut rng, t * shape.q_width());
            let k = random(&mut rng, capacity * shape.kv_width());
            let v = random(&mut rng, capacity * shape.kv_width());
            let prefill = SeqAttention {
                q: &q,
                k: KvRows::F32(&k),
                v: KvRows::F32(&v),
                keys,
                capacity,
            };
            for &kernel in Kernel::available() {
                let mut together = vec![f32::NAN; q.len()];
                attend_with(kernel, shape, &[prefill], &mut together);
                assert!(
                    together.iter().all(|y| y.is_finite()),
                    "{kernel:?}: unwritten"
                );
                for (i, (q, together)) in q
                    .chunks_exact(shape.q_width())
                    .zip(together.chunks_exact(shape.q_width()))
                    .enumerate()
                {
                    let alone = SeqAttention {
                        q,
                        keys: keys - t + i + 1,
                        ..prefill
                    };
                    let mut y = vec![f32::NAN; q.len()];
                    attend_with(kernel, shape, &[alone], &mut y);
                    let same = y
                        .iter()
                        .zip(together)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{kernel:?} {shape:?}: row {i}");
                }
            }
        }
    }

    #[test]
    fn rope_matches_the_rotation() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        let (c, s) = (0.6f32, 0.8f32);
        rope_in_place(&mut x, 4, &[c, 1.0], &[s, 0.0]);
        assert_eq!(x, vec![1.0 * c - 3.0 * s, 2.0, 1.0 * s + 3.0 * c, 4.0]);
    }
}
