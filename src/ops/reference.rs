//! The arithmetic of the decode kernels (`kernels/rms_norm_quantize.cu`, `rope_kv.cu`,
//! `attention.cu`, `argmax.cu`) in plain Rust, on slices: what their CPU ops run and what the
//! kernels are tested against. Every function but [`decode_attention`] is bit-exact with its
//! kernel.

use super::launch_constants::RMS_NORM_THREADS;
use crate::quant::quantize_activations;
use half::{bf16, f16};

/// An activation dtype: read as f32, rounded back to nearest even.
pub trait Float: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn round(v: f32) -> Self;
}

impl Float for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn round(v: f32) -> Self {
        v
    }
}

impl Float for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn round(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Float for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn round(v: f32) -> Self {
        f16::from_f32(v)
    }
}

const WARP: usize = 32;

/// The butterfly of `warp_reduce_sum` on 32 lanes: `v[l] + v[l + off]` for `off = 16 .. 1`.
fn warp_sum(v: &mut [f32; WARP]) -> f32 {
    let mut off = WARP / 2;
    while off > 0 {
        for l in 0..off {
            v[l] += v[l + off];
        }
        off /= 2;
    }
    v[0]
}

/// The sum of one value per thread as `block_reduce_sum(float)` adds them: each warp's
/// butterfly, then a butterfly over the warps' sums padded with +0.
pub fn block_sum(lanes: &[f32]) -> f32 {
    let mut warp_sums = [0f32; WARP];
    for (sum, warp) in warp_sums.iter_mut().zip(lanes.chunks(WARP)) {
        let mut v = [0f32; WARP];
        v[..warp.len()].copy_from_slice(warp);
        *sum = warp_sum(&mut v);
    }
    warp_sum(&mut warp_sums)
}

/// `Σ x²` in `rms_norm_quantize`'s order: `RMS_NORM_THREADS` strided partial sums (lane `p`
/// adds `x[p]²`, `x[p + RMS_NORM_THREADS]²`, … in turn), then [`block_sum`]: an order a block
/// reduction can follow, and the CPU's RMSNorm (`norm.rs`) sums in it too, so both devices
/// round alike.
pub fn sum_of_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; RMS_NORM_THREADS];
    for chunk in x.chunks(RMS_NORM_THREADS) {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v * v;
        }
    }
    block_sum(&lanes)
}

/// RMSNorm of one row as transformers computes it (`T(w · T(x · inv))`, `inv = 1 / sqrt(Σx²/k
/// + eps)`, the sum by [`sum_of_squares`]) and its per-token int8 quantization
/// ([`quantize_activations`]): writes the codes, returns the scale.
pub fn rms_norm_quantize<T: Float>(x: &[f32], weight: &[T], eps: f32, codes: &mut [i8]) -> f32 {
    let inv = 1.0 / (sum_of_squares(x) / x.len() as f32 + eps).sqrt();
    let y: Vec<f32> = x
        .iter()
        .zip(weight)
        .map(|(&x, &w)| T::round(w.to_f32() * T::round(x * inv).to_f32()).to_f32())
        .collect();
    quantize_activations(&y, codes)
}

/// `relu²(gate)·up` as candle computes it in T: `T(T(relu(g)²) · u)`.
pub fn relu2_mul<T: Float>(gate: T, up: T) -> f32 {
    let g = gate.to_f32().max(0.0);
    T::round(T::round(g * g).to_f32() * up.to_f32()).to_f32()
}

/// Elements `d` and `d + hd/2` of a head rotated by `(c, s)` (candle's `rope`, rotate_half, on
/// the CPU): `x1·c − x2·s`, `x1·s + x2·c`, every product and sum rounded to T.
pub fn rope_pair<T: Float>(x1: T, x2: T, c: T, s: T) -> (T, T) {
    let mul = |a: T, b: T| T::round(a.to_f32() * b.to_f32()).to_f32();
    (
        T::round(mul(x1, c) - mul(x2, s)),
        T::round(mul(x1, s) + mul(x2, c)),
    )
}

/// One head `x: [hd]` rotated at the position whose `[cos | sin]` row is `cs: [hd]`.
pub fn rope_head<T: Float>(x: &[T], cs: &[T]) -> Vec<T> {
    let half = x.len() / 2;
    let mut out = x.to_vec();
    for d in 0..half {
        let (a, b) = rope_pair(x[d], x[d + half], cs[d], cs[half + d]);
        out[d] = a;
        out[d + half] = b;
    }
    out
}

/// The shapes of a decode-attention problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Cache capacity in positions.
    pub capacity: usize,
    /// Positions in use, the new token's included (it sits at `len - 1`).
    pub len: usize,
}

/// Decode attention of one token, in f64: each query head of `qkv: [(n_h + 2 n_kv)·hd]`,
/// rotated at `len - 1` ([`rope_head`], as the kernel does), against keys and values
/// `cache: [2, n_kv, cap, hd]` of its KV head (`h / (n_h / n_kv)`), softmax of `q·k · scale`
/// over the first `len` positions. `rope: [max_pos, hd]` holds `cos | sin` per position.
/// Returns `[n_h·hd]`, not rounded: the kernels are held to it within a tolerance.
pub fn decode_attention<T: Float>(
    qkv: &[T],
    cache: &[T],
    rope: &[T],
    shape: AttentionShape,
    scale: f32,
) -> Vec<f64> {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: hd,
        capacity,
        len,
    } = shape;
    let group = n_heads / n_kv_heads;
    let cs = &rope[(len - 1) * hd..len * hd];
    let mut y = Vec::with_capacity(n_heads * hd);
    for h in 0..n_heads {
        let q: Vec<f64> = rope_head(&qkv[h * hd..(h + 1) * hd], cs)
            .iter()
            .map(|v| v.to_f32() as f64)
            .collect();
        let row = |plane: usize, p: usize| {
            let at = ((plane * n_kv_heads + h / group) * capacity + p) * hd;
            &cache[at..at + hd]
        };
        let scores: Vec<f64> = (0..len)
            .map(|p| {
                let dot: f64 = q
                    .iter()
                    .zip(row(0, p))
                    .map(|(q, k)| q * k.to_f32() as f64)
                    .sum();
                dot * scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        for d in 0..hd {
            let v: f64 = (0..len)
                .map(|p| weights[p] * row(1, p)[d].to_f32() as f64)
                .sum();
            y.push(v / total);
        }
    }
    y
}

/// The first index of the largest value; NaN never wins, a row of NaN gives 0.
pub fn argmax_first(row: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in row.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) && !v.is_nan() {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}
