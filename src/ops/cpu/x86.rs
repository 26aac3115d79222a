//! x86-64 kernels behind run-time detection ([`super::Kernel`]).
//!
//! BitLinear micro-tiles take `P` packed rows (`[P, k]` codes) and `T` token rows (`[T, kp]`
//! int8, zero-padded to `kp`, a multiple of 64 ≥ k) and return the four raw code-plane dot
//! products of every (row, token) pair. Each loaded chunk of codes is split into its four planes
//! once and multiplied with every token, so prefill pays the decode once per `T` tokens.

use std::arch::x86_64::*;

/// BitLinear tile with AVX-512 VNNI; `dots` is `[np][nt]`, `np == 2` only with `nt == 1`.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX-512VNNI. `w` is `[np, k]`, `x` is
/// `[nt, kp]` with `kp.is_multiple_of(64)`, `kp >= k`, `nt <= 4`, `dots.len() == np·nt`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_vnni(
    w: &[u8],
    k: usize,
    np: usize,
    x: &[i8],
    kp: usize,
    nt: usize,
    dots: &mut [[i32; 4]],
) {
    // SAFETY: the features and shapes are the caller's contract.
    unsafe {
        match (np, nt) {
            (2, _) => vnni::<2, 1>(w, k, x, kp, dots),
            (_, 1) => vnni::<1, 1>(w, k, x, kp, dots),
            (_, 2) => vnni::<1, 2>(w, k, x, kp, dots),
            (_, 3) => vnni::<1, 3>(w, k, x, kp, dots),
            _ => vnni::<1, 4>(w, k, x, kp, dots),
        }
    }
}

/// BitLinear tile with AVX2; `np == 2` only with `nt == 1`, `nt <= 2`.
///
/// # Safety
/// The CPU must support AVX2; shapes as in [`tile_vnni`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_avx2(
    w: &[u8],
    k: usize,
    np: usize,
    x: &[i8],
    kp: usize,
    nt: usize,
    dots: &mut [[i32; 4]],
) {
    // SAFETY: the features and shapes are the caller's contract.
    unsafe {
        match (np, nt) {
            (2, _) => avx2::<2, 1>(w, k, x, kp, dots),
            (_, 1) => avx2::<1, 1>(w, k, x, kp, dots),
            _ => avx2::<1, 2>(w, k, x, kp, dots),
        }
    }
}

/// The four code planes of 64 packed bytes: `(v >> 2k) & 3`. The 16-bit shift drags bits across
/// byte boundaries, and the mask drops them.
#[inline(always)]
fn planes512(v: __m512i) -> [__m512i; 4] {
    // SAFETY: only inlined into functions that enable AVX-512F/BW.
    unsafe {
        let m = _mm512_set1_epi8(3);
        [
            _mm512_and_si512(v, m),
            _mm512_and_si512(_mm512_srli_epi16::<2>(v), m),
            _mm512_and_si512(_mm512_srli_epi16::<4>(v), m),
            _mm512_and_si512(_mm512_srli_epi16::<6>(v), m),
        ]
    }
}

// The loops index the register tile `acc[p][t][plane]` directly, as the hardware sees it.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni<const P: usize, const T: usize>(
    w: &[u8],
    k: usize,
    x: &[i8],
    kp: usize,
    dots: &mut [[i32; 4]],
) {
    debug_assert!(w.len() == P * k && x.len() == T * kp && kp.is_multiple_of(64) && kp >= k);
    debug_assert!(dots.len() == P * T);
    let mut acc = [[[_mm512_setzero_si512(); 4]; T]; P];
    let mut c = 0;
    while c < k {
        // The last chunk of a row whose length is not a multiple of 64 loads only its own
        // bytes; the masked-off lanes read as zero codes and the activations there are padding.
        let mask = if c + 64 <= k {
            u64::MAX
        } else {
            u64::MAX >> (64 - (k - c))
        };
        let mut planes = [[_mm512_setzero_si512(); 4]; P];
        for (p, planes) in planes.iter_mut().enumerate() {
            // SAFETY: the lanes selected by `mask` are bytes p·k + c .. min(p·k + c + 64, (p+1)·k)
            // of `w`; masked-off lanes are not read.
            let v = unsafe { _mm512_maskz_loadu_epi8(mask, w.as_ptr().add(p * k + c).cast()) };
            *planes = planes512(v);
        }
        for t in 0..T {
            // SAFETY: c < k ≤ kp and both c and kp are multiples of 64, so the 64 bytes at
            // t·kp + c lie inside row t of `x`.
            let xv = unsafe { _mm512_loadu_si512(x.as_ptr().add(t * kp + c).cast()) };
            for p in 0..P {
                for (a, &q) in acc[p][t].iter_mut().zip(&planes[p]) {
                    *a = _mm512_dpbusd_epi32(*a, q, xv);
                }
            }
        }
        c += 64;
    }
    for p in 0..P {
        for t in 0..T {
            let [a, b, c, d] = acc[p][t];
            let half = |v: __m512i| {
                _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
            };
            let s = hsum4_256(half(a), half(b), half(c), half(d));
            // SAFETY: `dots[p·T + t]` is 16 writable bytes.
            unsafe { _mm_storeu_si128(dots[p * T + t].as_mut_ptr().cast(), s) };
        }
    }
}

/// `[Σa, Σb, Σc, Σd]` of four 8-lane vectors.
#[inline(always)]
fn hsum4_256(a: __m256i, b: __m256i, c: __m256i, d: __m256i) -> __m128i {
    // SAFETY: only inlined into functions that enable AVX2.
    unsafe {
        // Per 128-bit lane: [a01, a23, b01, b23], then [a0123, b0123, c0123, d0123].
        let abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
        _mm_add_epi32(
            _mm256_castsi256_si128(abcd),
            _mm256_extracti128_si256::<1>(abcd),
        )
    }
}

/// 32-byte chunks summed in i16 before widening: 32 · 768 < 2¹⁵ (768 with a corrupt code 3).
const I16_CHUNKS: usize = 32;

#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2")]
unsafe fn avx2<const P: usize, const T: usize>(
    w: &[u8],
    k: usize,
    x: &[i8],
    kp: usize,
    dots: &mut [[i32; 4]],
) {
    debug_assert!(w.len() == P * k && x.len() == T * kp && kp.is_multiple_of(64) && kp >= k);
    debug_assert!(dots.len() == P * T);
    let m = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[[_mm256_setzero_si256(); 4]; T]; P];
    let mut c = 0;
    while c < k {
        // `vpmaddubsw` pairs are at most 2·2·128 = 512 in magnitude (768 if a code were 3), so
        // 32 of them fit an i16 lane: widen to i32 (`vpmaddwd`) once per 32 chunks, not per chunk.
        let block_end = k.min(c + 32 * I16_CHUNKS);
        let mut acc16 = [[[_mm256_setzero_si256(); 4]; T]; P];
        while c < block_end {
            let mut planes = [[_mm256_setzero_si256(); 4]; P];
            for (p, planes) in planes.iter_mut().enumerate() {
                let row = &w[p * k..(p + 1) * k];
                let v = if c + 32 <= k {
                    // SAFETY: bytes c..c + 32 of `row`.
                    unsafe { _mm256_loadu_si256(row.as_ptr().add(c).cast()) }
                } else {
                    // No byte-masked loads in AVX2: the row's tail goes through a zeroed buffer.
                    let mut tail = [0u8; 32];
                    tail[..k - c].copy_from_slice(&row[c..]);
                    // SAFETY: `tail` is 32 bytes.
                    unsafe { _mm256_loadu_si256(tail.as_ptr().cast()) }
                };
                *planes = [
                    _mm256_and_si256(v, m),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(v), m),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v), m),
                    _mm256_and_si256(_mm256_srli_epi16::<6>(v), m),
                ];
            }
            for t in 0..T {
                // SAFETY: c < k ≤ kp, c % 32 == 0 and kp.is_multiple_of(64), so bytes t·kp + c .. + 32
                // are inside row t of `x`.
                let xv = unsafe { _mm256_loadu_si256(x.as_ptr().add(t * kp + c).cast()) };
                for p in 0..P {
                    for (a, &q) in acc16[p][t].iter_mut().zip(&planes[p]) {
                        *a = _mm256_add_epi16(*a, _mm256_maddubs_epi16(q, xv));
                    }
                }
            }
            c += 32;
        }
        for p in 0..P {
            for t in 0..T {
                for (a, &a16) in acc[p][t].iter_mut().zip(&acc16[p][t]) {
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(a16, ones));
                }
            }
        }
    }
    for p in 0..P {
        for t in 0..T {
            let [a, b, c, d] = acc[p][t];
            let s = hsum4_256(a, b, c, d);
            // SAFETY: `dots[p·T + t]` is 16 writable bytes.
            unsafe { _mm_storeu_si128(dots[p * T + t].as_mut_ptr().cast(), s) };
        }
    }
}

/// The LM head block compiled for AVX2 + FMA, two tokens per pass (16 ymm registers).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn head_avx2(task: super::head::Task) {
    task.run::<2, true>()
}

/// The LM head block with AVX-512F intrinsics: zmm FMA, eight tokens per pass (16 of 32 zmm).
///
/// # Safety
/// The CPU must support AVX-512F and FMA.
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn head_avx512(task: super::head::Task) {
    // SAFETY: AVX-512F and FMA are enabled here, as the caller guarantees.
    task.run_with::<8>(
        |w, xs| unsafe { super::head::dot_rows_avx512::<8>(w, xs) },
        |w, xs| unsafe { super::head::dot_rows_avx512::<1>(w, xs) },
    )
}

/// Activation quantization compiled for AVX2 (vector `roundps`, `maxps`).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn quantize_row_avx2(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    super::quantize_row_body(x, q)
}
