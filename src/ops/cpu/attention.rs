//! Attention over f32 KV caches on the CPU, for every row of a batch in one parallel pass.
//!
//! Through candle ops, one sequence's attention in one layer is ~25 small ops (narrows, RoPE,
//! cache copies, two matmuls, the softmax pieces); with 16 sequences that cost more than the
//! arithmetic. Here a task is one query row and one KV head: it scores the row's `n_rep`
//! query heads against the keys it may see, takes the softmax in f32 and sums the values,
//! normalizing after the product with V as PyTorch's CPU flash attention (transformers' sdpa)
//! does. Rows of more than `KEY_CHUNK` keys are cut into parts combined afterwards (as flash
//! decoding does), so that one long sequence keeps every thread busy. A row's result depends
//! only on its own sequence, so batching never changes it.
//!
//! Dot products use 16 f32 lanes summed in one fixed order, with FMA on AVX2 and AVX-512
//! (the two give the same bits) and a separate multiply and add in the portable build.

use super::Kernel;
use rayon::prelude::*;
use std::cell::RefCell;

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

/// One sequence's part of [`attend`]: its rotated query rows `q: [t, heads · hd]`, which sit
/// at positions `keys - t .. keys`, and its cache `k`, `v: [kv_heads, capacity, hd]`, each
/// head's positions contiguous so that a task streams them.
#[derive(Clone, Copy)]
pub struct SeqAttention<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
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
    let (qw, hd, group) = (shape.q_width(), shape.head_dim, shape.group());
    // Task i: row i / kv_heads, KV head i % kv_heads; its heads' outputs are adjacent in y.
    let mut rows = Vec::new();
    for (s, seq) in seqs.iter().enumerate() {
        let t = seq.q.len() / qw;
        rows.extend((0..t).map(|i| (s, i, seq.keys - t + i + 1)));
    }
    assert_eq!(y.len(), rows.len() * qw, "attention output size");
    let scale = 1.0 / (hd as f32).sqrt();
    let width = group * hd;
    // Parts: a task's keys, KEY_CHUNK at a time; a task's parts are adjacent, from parts_of[task].
    let tasks = rows.len() * shape.kv_heads;
    let mut parts = Vec::with_capacity(tasks);
    let mut parts_of = Vec::with_capacity(tasks + 1);
    for task in 0..tasks {
        parts_of.push(parts.len());
        let visible = rows[task / shape.kv_heads].2;
        parts.extend(
            (0..visible)
                .step_by(KEY_CHUNK)
                .map(|c| (task, c..visible.min(c + KEY_CHUNK))),
        );
    }
    parts_of.push(parts.len());
    // Per part: its heads' unnormalized Σ exp(s − max)·V, then each head's (max, Σ exp).
    let stride = width + 2 * group;
    let mut partial = vec![0f32; parts.len() * stride];
    partial
        .par_chunks_mut(stride)
        .zip(&parts)
        .for_each(|(out, (task, keys))| {
            let ((s, i, _), g) = (rows[task / shape.kv_heads], task % shape.kv_heads);
            let seq = &seqs[s];
            let head = g * seq.capacity * hd;
            let span = head + keys.start * hd..head + keys.end * hd;
            let job = Job {
                hd,
                q: &seq.q[i * qw + g * width..][..width],
                k: &seq.k[span.clone()],
                v: &seq.v[span],
                scale,
            };
            SCORES.with_borrow_mut(|scores| {
                scores.resize(group * keys.len(), 0.0);
                run(kernel, &job, scores, out)
            })
        });
    // Combining is light: only many tasks are worth spreading.
    y.par_chunks_mut(width)
        .with_min_len(64)
        .enumerate()
        .for_each(|(task, y)| {
            let task_parts = &partial[parts_of[task] * stride..parts_of[task + 1] * stride];
            combine(task_parts, stride, hd, y)
        });
}

/// Keys one part of a task scores at most. A long row is cut so that one sequence's few tasks
/// (one per KV head) spread over the threads; the cut depends only on the row's own length,
/// never on the rest of the batch, and a row of at most this many keys is one part, whose
/// combination below changes no bit.
const KEY_CHUNK: usize = 256;

/// A task's output from its parts (`[acc of every head, (max, Σ exp) of every head]` each):
/// every part rescaled to the largest max, summed in order, then normalized.
fn combine(parts: &[f32], stride: usize, hd: usize, y: &mut [f32]) {
    let width = y.len();
    for (r, y) in y.chunks_exact_mut(hd).enumerate() {
        let stat = |p: &[f32], k: usize| p[width + 2 * r + k];
        let max = parts
            .chunks_exact(stride)
            .map(|p| stat(p, 0))
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        y.fill(0.0);
        for p in parts.chunks_exact(stride) {
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
    /// One row's attention scores, kept between tasks.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One query row's heads of one KV head against a span of the keys it sees, `[span, hd]`.
struct Job<'a> {
    hd: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    scale: f32,
}

fn run(kernel: Kernel, job: &Job, scores: &mut [f32], out: &mut [f32]) {
    match kernel {
        // SAFETY: the kernel is only picked when the CPU has its features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => unsafe { run_avx512(job, scores, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { run_avx2(job, scores, out) },
        _ => job_body::<false>(job, scores, out, dot),
    }
}

/// # Safety
/// The CPU must support AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn run_avx512(job: &Job, scores: &mut [f32], out: &mut [f32]) {
    // SAFETY: the features are this function's own.
    job_body::<true>(job, scores, out, |a, b| unsafe {
        x86_dot::dot_avx512(a, b)
    })
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(job: &Job, scores: &mut [f32], out: &mut [f32]) {
    // SAFETY: the features are this function's own.
    job_body::<true>(job, scores, out, |a, b| unsafe { x86_dot::dot_avx2(a, b) })
}

/// [`dot`] with FMA in registers of 16 (AVX-512) or 8 (AVX2) lanes: left to itself the
/// compiler keeps the 16 lanes in four 128-bit registers.
#[cfg(target_arch = "x86_64")]
mod x86_dot {
    use super::LANES;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F and FMA; `b` at least as long as `a`.
    #[inline(always)]
    pub(super) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let full = a.len() / LANES * LANES;
        debug_assert!(b.len() >= a.len());
        // SAFETY: every load reads 16 floats below `full` of both slices; features: the caller.
        unsafe {
            let mut acc = _mm512_setzero_ps();
            for c in (0..full).step_by(LANES) {
                let (x, y) = (
                    _mm512_loadu_ps(a.as_ptr().add(c)),
                    _mm512_loadu_ps(b.as_ptr().add(c)),
                );
                acc = _mm512_fmadd_ps(x, y, acc);
            }
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
            let lanes8 = _mm256_add_ps(_mm512_castps512_ps256(acc), hi);
            finish(lanes8, &a[full..], &b[full..a.len()])
        }
    }

    /// # Safety
    /// AVX2 and FMA; `b` at least as long as `a`.
    #[inline(always)]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let full = a.len() / LANES * LANES;
        debug_assert!(b.len() >= a.len());
        // SAFETY: as above, in halves of 8 floats.
        unsafe {
            let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for c in (0..full).step_by(LANES) {
                let (pa, pb) = (a.as_ptr().add(c), b.as_ptr().add(c));
                lo = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), lo);
                hi = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), hi);
            }
            finish(_mm256_add_ps(lo, hi), &a[full..], &b[full..a.len()])
        }
    }

    /// The fold of [`super::dot`] from 8 lanes on, then the tail.
    #[inline(always)]
    unsafe fn finish(lanes8: __m256, a_tail: &[f32], b_tail: &[f32]) -> f32 {
        // SAFETY: register arithmetic only; AVX is implied by either caller's features.
        let sum = unsafe {
            let l4 = _mm_add_ps(
                _mm256_castps256_ps128(lanes8),
                _mm256_extractf128_ps::<1>(lanes8),
            );
            let l2 = _mm_add_ps(l4, _mm_movehl_ps(l4, l4));
            _mm_cvtss_f32(_mm_add_ss(l2, _mm_shuffle_ps::<1>(l2, l2)))
        };
        a_tail.iter().zip(b_tail).fold(sum, |s, (&a, &b)| s + a * b)
    }
}

#[inline(always)]
fn job_body<const FMA: bool>(
    job: &Job,
    scores: &mut [f32],
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let hd = job.hd;
    let visible = job.k.len() / hd;
    // Each key row is read once for all the heads that share it.
    for (j, k) in job.k.chunks_exact(hd).enumerate() {
        for (r, q) in job.q.chunks_exact(hd).enumerate() {
            scores[r * visible + j] = dot(q, k) * job.scale;
        }
    }
    let (acc, stats) = out.split_at_mut(job.q.len());
    let heads = scores
        .chunks_exact_mut(visible)
        .zip(acc.chunks_exact_mut(hd));
    for ((p, acc), stat) in heads.zip(stats.chunks_exact_mut(2)) {
        let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in p.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        match hd {
            128 => weigh_values::<FMA, 128>(p, job.v, acc),
            64 => weigh_values::<FMA, 64>(p, job.v, acc),
            _ => weigh_values::<FMA, 0>(p, job.v, acc),
        }
        stat.copy_from_slice(&[max, sum]);
    }
}

/// `y = Σ_j p[j] · V[j]` over value rows `v: [.., y.len()]`. A known width (`HD > 0`) keeps
/// the sums in registers across the keys.
#[inline(always)]
fn weigh_values<const FMA: bool, const HD: usize>(p: &[f32], v: &[f32], y: &mut [f32]) {
    let fma = |a: f32, p: f32, v: f32| if FMA { p.mul_add(v, a) } else { a + p * v };
    if HD == 0 {
        return weigh_into(p, v, y, fma);
    }
    let mut acc = [0f32; HD];
    weigh_into(p, v, &mut acc, fma);
    y.copy_from_slice(&acc);
}

#[inline(always)]
fn weigh_into(p: &[f32], v: &[f32], acc: &mut [f32], fma: impl Fn(f32, f32, f32) -> f32) {
    acc.fill(0.0);
    for (&p, v) in p.iter().zip(v.chunks_exact(acc.len())) {
        for (a, &v) in acc.iter_mut().zip(v) {
            *a = fma(*a, p, v);
        }
    }
}

/// `Σ a·b` over 16 lanes, the lanes folded in halves, then the tail in order (the portable
/// build; the SIMD builds sum the same lanes with FMA, `x86_dot`).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_chunks, a_tail) = a.as_chunks::<LANES>();
    let (b_chunks, b_tail) = b.as_chunks::<LANES>();
    for (ac, bc) in a_chunks.iter().zip(b_chunks) {
        for l in 0..LANES {
            acc[l] += ac[l] * bc[l];
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    a_tail
        .iter()
        .zip(b_tail)
        .fold(acc[0], |s, (&a, &b)| s + a * b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
    }

    /// Plain f64 attention of one row's head.
    fn reference(shape: AttentionShape, seq: &SeqAttention, row: usize, head: usize) -> Vec<f64> {
        let (hd, cap, qw) = (shape.head_dim, seq.capacity, shape.q_width());
        let t = seq.q.len() / qw;
        let visible = seq.keys - t + row + 1;
        let g = head / shape.group();
        let q = &seq.q[row * qw + head * hd..][..hd];
        let scores: Vec<f64> = (0..visible)
            .map(|j| {
                let k = &seq.k[(g * cap + j) * hd..][..hd];
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
                    .map(|j| e[j] * seq.v[(g * cap + j) * hd + d] as f64)
                    .sum::<f64>()
                    / sum
            })
            .collect()
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
                    k,
                    v,
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
            k: &k,
            v: &v,
            keys: 50,
            capacity: 64,
        };
        let other = SeqAttention {
            q: &q2,
            k: &k2,
            v: &v,
            keys: 9,
            capacity: 64,
        };
        let mut y1 = vec![0f32; 128];
        attend(shape, &[alone], &mut y1);
        let mut y2 = vec![0f32; 4 * 128];
        attend(shape, &[other, alone], &mut y2);
        assert_eq!(y1, y2[3 * 128..]);
    }

    #[test]
    fn rope_matches_the_rotation() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        let (c, s) = (0.6f32, 0.8f32);
        rope_in_place(&mut x, 4, &[c, 1.0], &[s, 0.0]);
        assert_eq!(x, vec![1.0 * c - 3.0 * s, 2.0, 1.0 * s + 3.0 * c, 4.0]);
    }
}
