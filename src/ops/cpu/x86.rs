//! x86-64 kernels behind run-time detection ([`super::Kernel`]).
//!
//! BitLinear kernels walk row tiles ([`super::tiles`]): each block of codes is loaded once,
//! its bit fields masked in place and multiplied with every token's broadcast activations,
//! so lane `i` of an accumulator is one output row throughout and nothing is reduced across
//! lanes.

use super::tiles::{BLOCK_BYTES, TILE_ROWS};
use std::arch::x86_64::*;

/// Steps (blocks of 4 columns) summed in i32 before the `4^p` scale of the bit fields is
/// undone: a lane gains at most 4·128·128 per step (code 2 in field 3 reads as 128), so
/// 2¹⁴ steps stay under 2³¹.
const VNNI_FLUSH_STEPS: usize = 1 << 14;
/// How far ahead of the loads software prefetch runs, per tile stream. One token on the
/// 2-core Xeon guest (`cargo bench --bench bitlinear -- 1`, two runs each): the AVX2 kernel,
/// compute-bound there, streams 7.5–13.6 GB/s at 1 KiB and 10.2–16.7 at 4 KiB over the 2B-4T
/// shapes; AVX-512 VNNI reads at STREAM either way.
const PREFETCH_BYTES: usize = 4096;

/// BitLinear on `ng` tiles (`w`: `[ng, steps · 64]`, 64-byte aligned) against `nt` token rows
/// (`x`: `[nt, kp]`, zero-padded, `kp ≥ 4 · steps`); `dots` is `[ng][nt]`, raw `Σ code · x`.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX-512VNNI; shapes as above, with
/// `(ng, nt)` one of (4, 1), (2, 1), (1, 1), (2, 2), (1, 2), (1, 3), (1, 4).
pub(super) unsafe fn tiles_vnni(
    w: &[u8],
    steps: usize,
    ng: usize,
    x: &[i8],
    kp: usize,
    nt: usize,
    dots: &mut [[i32; TILE_ROWS]],
) {
    // SAFETY: the features and shapes are the caller's contract.
    unsafe {
        match (ng, nt) {
            (4, 1) => vnni::<4, 1>(w, steps, x, kp, dots),
            (2, 1) => vnni::<2, 1>(w, steps, x, kp, dots),
            (2, 2) => vnni::<2, 2>(w, steps, x, kp, dots),
            (_, 1) => vnni::<1, 1>(w, steps, x, kp, dots),
            (_, 2) => vnni::<1, 2>(w, steps, x, kp, dots),
            (_, 3) => vnni::<1, 3>(w, steps, x, kp, dots),
            _ => vnni::<1, 4>(w, steps, x, kp, dots),
        }
    }
}

/// Four activations `x[4s..4s + 4]` of row `t` in every i32 lane.
///
/// # Safety
/// Bytes `t·kp + 4s .. + 4` are inside `x`.
#[inline(always)]
unsafe fn broadcast4(x: &[i8], t: usize, kp: usize, s: usize) -> i32 {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::read_unaligned(x.as_ptr().add(t * kp + 4 * s).cast::<i32>()) }
}

// The loops index the register tile `acc[g][t][p]` directly, as the hardware sees it.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni<const G: usize, const T: usize>(
    w: &[u8],
    steps: usize,
    x: &[i8],
    kp: usize,
    dots: &mut [[i32; TILE_ROWS]],
) {
    let stride = steps * BLOCK_BYTES;
    debug_assert!(w.len() == G * stride && x.len() == T * kp && kp >= 4 * steps);
    debug_assert!(dots.len() == G * T && w.as_ptr().align_offset(64) == 0);
    let fields = [
        _mm512_set1_epi8(0x03),
        _mm512_set1_epi8(0x0c),
        _mm512_set1_epi8(0x30),
        _mm512_set1_epi8(0xc0u8 as i8),
    ];
    dots.fill([0; TILE_ROWS]);
    let mut s0 = 0;
    while s0 < steps {
        let end = steps.min(s0 + VNNI_FLUSH_STEPS);
        let mut acc = [[[_mm512_setzero_si512(); 4]; T]; G];
        for s in s0..end {
            let mut xb = [_mm512_setzero_si512(); T];
            for t in 0..T {
                // SAFETY: 4s + 4 ≤ 4·steps ≤ kp.
                xb[t] = _mm512_set1_epi32(unsafe { broadcast4(x, t, kp, s) });
            }
            for g in 0..G {
                // SAFETY: g < G and s < steps, so the block's 64 bytes are inside `w`
                // (`[G, steps · 64]`, 64-byte aligned).
                let block = unsafe { w.as_ptr().add(g * stride + s * BLOCK_BYTES) };
                super::prefetch(block.wrapping_add(PREFETCH_BYTES), false);
                // SAFETY: as above.
                let v = unsafe { _mm512_load_si512(block.cast()) };
                for p in 0..4 {
                    let codes = _mm512_and_si512(v, fields[p]);
                    for t in 0..T {
                        acc[g][t][p] = _mm512_dpbusd_epi32(acc[g][t][p], codes, xb[t]);
                    }
                }
            }
        }
        for g in 0..G {
            for t in 0..T {
                for p in 0..4 {
                    let dst = dots[g * T + t][16 * p..].as_mut_ptr();
                    // SAFETY: 16 i32 at 16p of a 64-element row.
                    unsafe {
                        let sum = _mm512_add_epi32(
                            _mm512_loadu_si512(dst.cast()),
                            unscale512(acc[g][t][p], p),
                        );
                        _mm512_storeu_si512(dst.cast(), sum);
                    }
                }
            }
        }
        s0 = end;
    }
}

/// Divides the sums of bit field `p` (read in place, so `4^p` times the code) by `4^p`:
/// they are exact multiples, so the arithmetic shift is exact.
#[inline(always)]
fn unscale512(v: __m512i, p: usize) -> __m512i {
    // SAFETY: only inlined into functions that enable AVX-512F.
    unsafe {
        match p {
            0 => v,
            1 => _mm512_srai_epi32::<2>(v),
            2 => _mm512_srai_epi32::<4>(v),
            _ => _mm512_srai_epi32::<6>(v),
        }
    }
}

/// Steps summed in i16 before widening: a `vpmaddubsw` pair is at most 2·8·128 = 2048 in
/// magnitude (field 1 read in place is 4 × code ≤ 8), and 15 · 2048 < 2¹⁵.
const I16_STEPS: usize = 15;

/// How a 256-bit kernel sums one 32-byte half block against each token's broadcast
/// activations: per bit field `p`, into `acc[t][p]`, and how such a sum becomes the i32
/// `Σ code · x` once per flush of [`Self::FLUSH_STEPS`] steps.
pub(super) trait HalfBlock {
    const FLUSH_STEPS: usize;
    /// # Safety
    /// The CPU has the kernel's features; only inlined into functions that enable them.
    unsafe fn accumulate<const T: usize>(
        v: __m256i,
        xb: &[__m256i; T],
        acc: &mut [[__m256i; 4]; T],
    );
    /// # Safety
    /// As for [`Self::accumulate`].
    unsafe fn fold(sum: __m256i, p: usize) -> __m256i;
    /// [`halves`] compiled for the kernel's features.
    ///
    /// # Safety
    /// As for [`halves`], on a CPU with the kernel's features.
    unsafe fn halves<const H: usize, const T: usize>(
        w: &[u8],
        steps: usize,
        h0: usize,
        x: &[i8],
        kp: usize,
        dots: &mut [[i32; TILE_ROWS]],
    );
}

/// AVX2: the bit fields come from `v` and `v >> 4` masked with 0x03 and 0x0c (fields 1 and 3
/// read as 4 × code), `vpmaddubsw` pairs sum in i16 and widen with `vpmaddwd` per flush.
pub(super) struct Avx2Fields;

impl HalfBlock for Avx2Fields {
    const FLUSH_STEPS: usize = I16_STEPS;

    #[inline(always)]
    unsafe fn accumulate<const T: usize>(
        v: __m256i,
        xb: &[__m256i; T],
        acc: &mut [[__m256i; 4]; T],
    ) {
        // SAFETY: the caller enables AVX2.
        unsafe {
            let (lo, hi) = (_mm256_set1_epi8(0x03), _mm256_set1_epi8(0x0c));
            let v4 = _mm256_srli_epi16::<4>(v);
            let fields = [
                _mm256_and_si256(v, lo),
                _mm256_and_si256(v, hi),
                _mm256_and_si256(v4, lo),
                _mm256_and_si256(v4, hi),
            ];
            for (acc, xb) in acc.iter_mut().zip(xb) {
                for (acc, field) in acc.iter_mut().zip(fields) {
                    *acc = _mm256_add_epi16(*acc, _mm256_maddubs_epi16(field, *xb));
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn fold(sum: __m256i, p: usize) -> __m256i {
        // SAFETY: the caller enables AVX2.
        unsafe {
            let wide = _mm256_madd_epi16(sum, _mm256_set1_epi16(1));
            if p % 2 == 1 {
                _mm256_srai_epi32::<2>(wide)
            } else {
                wide
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn halves<const H: usize, const T: usize>(
        w: &[u8],
        steps: usize,
        h0: usize,
        x: &[i8],
        kp: usize,
        dots: &mut [[i32; TILE_ROWS]],
    ) {
        // SAFETY: the caller's contract.
        unsafe { halves::<Self, H, T>(w, steps, h0, x, kp, dots) }
    }
}

/// AVX-VNNI: the fields masked in place as in [`tiles_vnni`] (field `p` reads as `4^p` ×
/// code), the products summed straight into i32 by `vpdpbusd`: 8 vector ops per 32 bytes of
/// codes where AVX2 needs 13.
pub(super) struct AvxVnniFields;

impl HalfBlock for AvxVnniFields {
    const FLUSH_STEPS: usize = VNNI_FLUSH_STEPS;

    #[inline(always)]
    unsafe fn accumulate<const T: usize>(
        v: __m256i,
        xb: &[__m256i; T],
        acc: &mut [[__m256i; 4]; T],
    ) {
        // SAFETY: the caller enables AVX2 and AVX-VNNI.
        unsafe {
            for p in 0..4 {
                let codes = _mm256_and_si256(v, _mm256_set1_epi8((0x03u8 << (2 * p)) as i8));
                for (acc, xb) in acc.iter_mut().zip(xb) {
                    acc[p] = _mm256_dpbusd_avx_epi32(acc[p], codes, *xb);
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn fold(sum: __m256i, p: usize) -> __m256i {
        // SAFETY: the caller enables AVX2; the sums are exact multiples of 4^p.
        unsafe {
            match p {
                0 => sum,
                1 => _mm256_srai_epi32::<2>(sum),
                2 => _mm256_srai_epi32::<4>(sum),
                _ => _mm256_srai_epi32::<6>(sum),
            }
        }
    }

    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn halves<const H: usize, const T: usize>(
        w: &[u8],
        steps: usize,
        h0: usize,
        x: &[i8],
        kp: usize,
        dots: &mut [[i32; TILE_ROWS]],
    ) {
        // SAFETY: the caller's contract.
        unsafe { halves::<Self, H, T>(w, steps, h0, x, kp, dots) }
    }
}

/// BitLinear on one tile with a 256-bit kernel `K`: `nt == 1` takes both 32-byte halves of
/// each block in one pass; `nt == 2` runs twice, one half (rows `16p + 8h + lane`) per pass,
/// so that its 8 accumulators fit the 16 ymm registers. `dots` is `[nt]`.
///
/// # Safety
/// The CPU must support AVX2, and AVX-VNNI for [`AvxVnniFields`]; `w` is one tile
/// (`[steps · 64]`, 64-byte aligned), `x` is `[nt, kp]`, `kp ≥ 4 · steps`, `nt ≤ 2`,
/// `dots.len() == nt`.
pub(super) unsafe fn tile_256<K: HalfBlock>(
    w: &[u8],
    steps: usize,
    x: &[i8],
    kp: usize,
    nt: usize,
    dots: &mut [[i32; TILE_ROWS]],
) {
    // SAFETY: the features and shapes are the caller's contract.
    unsafe {
        if nt == 1 {
            K::halves::<2, 1>(w, steps, 0, x, kp, dots)
        } else {
            K::halves::<1, 2>(w, steps, 0, x, kp, dots);
            K::halves::<1, 2>(w, steps, 1, x, kp, dots);
        }
    }
}

/// Halves `h0..h0 + H` of every block of one tile against `T` tokens, summed by `K` and
/// folded into i32 once per flush.
///
/// # Safety
/// The caller enables `K`'s features; `w` is `[steps · 64]`, 64-byte aligned, `x` is
/// `[T, kp]`, `kp ≥ 4 · steps`, `h0 + H ≤ 2`, `dots.len() == T`.
#[inline(always)]
unsafe fn halves<K: HalfBlock, const H: usize, const T: usize>(
    w: &[u8],
    steps: usize,
    h0: usize,
    x: &[i8],
    kp: usize,
    dots: &mut [[i32; TILE_ROWS]],
) {
    debug_assert!(w.len() == steps * BLOCK_BYTES && x.len() == T * kp && kp >= 4 * steps);
    debug_assert!(dots.len() == T && h0 + H <= 2 && w.as_ptr().align_offset(64) == 0);
    // SAFETY: the caller enables AVX2 (and K's features) and guarantees the shapes.
    unsafe {
        let mut total = [[[_mm256_setzero_si256(); 4]; T]; H];
        let mut s0 = 0;
        while s0 < steps {
            let end = steps.min(s0 + K::FLUSH_STEPS);
            let mut acc = [[[_mm256_setzero_si256(); 4]; T]; H];
            for s in s0..end {
                let mut xb = [_mm256_setzero_si256(); T];
                for (t, xb) in xb.iter_mut().enumerate() {
                    // 4s + 4 ≤ 4·steps ≤ kp.
                    *xb = _mm256_set1_epi32(broadcast4(x, t, kp, s));
                }
                // s < steps, so the block is inside `w`.
                let block = w.as_ptr().add(s * BLOCK_BYTES);
                super::prefetch(block.wrapping_add(PREFETCH_BYTES), false);
                for (h, acc) in acc.iter_mut().enumerate() {
                    // Bytes 32(h0 + h) .. + 32 of the block (h0 + h < 2), 32-byte aligned.
                    let v = _mm256_load_si256(block.add(32 * (h0 + h)).cast());
                    K::accumulate(v, &xb, acc);
                }
            }
            for (total, acc) in total.iter_mut().zip(&acc) {
                for (total, acc) in total.iter_mut().zip(acc) {
                    for p in 0..4 {
                        total[p] = _mm256_add_epi32(total[p], K::fold(acc[p], p));
                    }
                }
            }
            s0 = end;
        }
        for (h, total) in total.iter().enumerate() {
            for (dots, total) in dots.iter_mut().zip(total) {
                for (p, total) in total.iter().enumerate() {
                    // 8 i32 at 16p + 8h of a 64-element row.
                    let dst = dots[16 * p + 8 * (h0 + h)..].as_mut_ptr();
                    _mm256_storeu_si256(dst.cast(), *total);
                }
            }
        }
    }
}

/// Activation quantization compiled for AVX2 (vector `roundps`, `maxps`).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    super::quantize_row_body(x, q)
}
