//! Pure-Rust reference of the BitNet b1.58 arithmetic: the oracle every kernel is tested against.
//!
//! Paper: "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits" (Ma et al., 2024).
//! Reference implementation: transformers `integrations/bitnet.py` (`pack_weights`,
//! `unpack_weights`, `BitLinear.activation_quant`, `BitLinear.post_quant_process`,
//! `WeightQuant.forward`).
//!
//! # Packed layout (the only one in this crate, on every device)
//! A ternary matrix `W` of shape `[out, in]` is stored as `P: [out/4, in]` bytes, the checkpoint's
//! own layout. With `R = out/4`, byte `P[j, c]` holds four codes in bit fields `2k..2k+1`,
//! `k = 0..4`, for the rows `W[k·R + j, c]` (four contiguous row blocks, not adjacent rows);
//! code = value + 1, so `0 → -1`, `1 → 0`, `2 → +1` (3 never occurs). One packed row therefore
//! yields four output features, `j`, `R + j`, `2R + j`, `3R + j`, from a single pass over the
//! activations: the kernels use exactly that.
//!
//! # BitLinear
//! Per token: `s_x = 127 / max(absmax(x), 1e-5)`, `x_q = clamp(round_half_even(x·s_x), -128, 127)`,
//! `acc = Σ x_q·W` in i32 (exact), `y = acc / (w_div · s_x)`, where `w_div` is `weight_scale`
//! (`bitlinear`), `1 / weight_scale` (`autobitlinear`) or `1 / mean|W|` (latent weights).

use candle_core::{bail, Result};

/// Smallest activation absmax used when computing the per-token scale (transformers' clamp).
pub const ACT_ABSMAX_EPS: f32 = 1e-5;
/// Smallest weight absmean used when ternarizing latent weights (transformers' clamp).
pub const WEIGHT_ABSMEAN_EPS: f32 = 1e-5;

/// Checks that `out` rows can be packed four to a byte.
pub fn check_packable(out_features: usize) -> Result<()> {
    if out_features == 0 || !out_features.is_multiple_of(4) {
        bail!("out_features {out_features} is not a positive multiple of 4: ternary weights pack four output rows per byte")
    }
    Ok(())
}

/// Packs ternary `values` (`[out, in]` row-major, each in {-1, 0, 1}) into `[out/4, in]` bytes.
pub fn pack_ternary(values: &[i8], out_features: usize, in_features: usize) -> Result<Vec<u8>> {
    check_packable(out_features)?;
    if values.len() != out_features * in_features {
        bail!(
            "pack_ternary: {} values for a [{out_features}, {in_features}] matrix",
            values.len()
        )
    }
    let rows = out_features / 4;
    let mut packed = vec![0u8; rows * in_features];
    for (r, row) in values.chunks_exact(in_features).enumerate() {
        let (block, j) = (r / rows, r % rows);
        for (c, &v) in row.iter().enumerate() {
            if !(-1..=1).contains(&v) {
                bail!("pack_ternary: value {v} at [{r}, {c}] is not in {{-1, 0, 1}}")
            }
            packed[j * in_features + c] |= ((v + 1) as u8) << (2 * block);
        }
    }
    Ok(packed)
}

/// Inverse of [`pack_ternary`]: `[out/4, in]` bytes to `[out, in]` values in {-1, 0, 1}.
/// A code of 3 (never written by a packer) decodes to +2 so that corrupt data stays visible.
pub fn unpack_ternary(packed: &[u8], out_features: usize, in_features: usize) -> Vec<i8> {
    let rows = out_features / 4;
    let mut values = vec![0i8; out_features * in_features];
    for (r, row) in values.chunks_exact_mut(in_features).enumerate() {
        let (block, j) = (r / rows, r % rows);
        for (c, v) in row.iter_mut().enumerate() {
            *v = ((packed[j * in_features + c] >> (2 * block)) & 3) as i8 - 1;
        }
    }
    values
}

/// Per-tensor absmean ternarization of latent weights (`WeightQuant.forward`):
/// `s = 1 / max(mean|W|, 1e-5)`, `W_t = clamp(round(W·s), -1, 1)`. Returns `(W_t, s)`; the
/// effective weight is `W_t / s`, so `s` is the BitLinear `w_div`.
pub fn ternarize_absmean(weights: &[f32]) -> (Vec<i8>, f32) {
    // f64 accumulation: the mean of millions of values in f32 drifts.
    let mean = weights.iter().map(|w| w.abs() as f64).sum::<f64>() / weights.len().max(1) as f64;
    let scale = 1.0 / (mean as f32).max(WEIGHT_ABSMEAN_EPS);
    let values = weights
        .iter()
        .map(|&w| (w * scale).round_ties_even().clamp(-1.0, 1.0) as i8)
        .collect();
    (values, scale)
}

/// Per-token absmax int8 quantization (`BitLinear.activation_quant`). Writes `x_q` and returns
/// `s_x = 127 / max(absmax, 1e-5)`.
pub fn quantize_activations(x: &[f32], x_q: &mut [i8]) -> f32 {
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = 127.0 / absmax.max(ACT_ABSMAX_EPS);
    for (q, &v) in x_q.iter_mut().zip(x) {
        *q = (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
    scale
}

/// The epilogue shared by every kernel, so that all of them round identically.
#[inline(always)]
pub fn dequantize_accumulator(acc: i32, act_scale: f32, w_div: f32) -> f32 {
    acc as f32 / (w_div * act_scale)
}

/// Exact i32 dot products of one int8 activation row with all `out` ternary rows.
pub fn ternary_accumulate(x_q: &[i8], packed: &[u8], out_features: usize) -> Vec<i32> {
    let in_features = x_q.len();
    let values = unpack_ternary(packed, out_features, in_features);
    values
        .chunks_exact(in_features)
        .map(|w| w.iter().zip(x_q).map(|(&w, &x)| w as i32 * x as i32).sum())
        .collect()
}

/// BitLinear on `n_rows` rows of `x` (`[n_rows, in]`, f32) with packed weights: `[n_rows, out]`.
pub fn bitlinear_reference(
    x: &[f32],
    n_rows: usize,
    packed: &[u8],
    out_features: usize,
    w_div: f32,
) -> Vec<f32> {
    let in_features = x.len() / n_rows.max(1);
    let mut y = Vec::with_capacity(n_rows * out_features);
    let mut x_q = vec![0i8; in_features];
    for row in x.chunks_exact(in_features) {
        let s = quantize_activations(row, &mut x_q);
        let acc = ternary_accumulate(&x_q, packed, out_features);
        y.extend(acc.into_iter().map(|a| dequantize_accumulator(a, s, w_div)));
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn pack_matches_the_hf_layout_by_hand() -> Result<()> {
        // out = 4, in = 2: rows 0..4 each land in bit field 2·row of packed row 0.
        let values = [-1i8, 0, 0, 1, 1, -1, 0, 0];
        let packed = pack_ternary(&values, 4, 2)?;
        // column 0: rows (-1, 0, 1, 0) → codes (0, 1, 2, 1) → 0b01_10_01_00
        // column 1: rows (0, 1, -1, 0) → codes (1, 2, 0, 1) → 0b01_00_10_01
        assert_eq!(packed, vec![0b01_10_01_00, 0b01_00_10_01]);
        Ok(())
    }

    #[test]
    fn pack_unpack_round_trip_random() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(7);
        for &(out, inp) in &[(4, 1), (8, 3), (12, 33), (44, 129), (260, 70)] {
            let values: Vec<i8> = (0..out * inp).map(|_| rng.random_range(-1..=1)).collect();
            let packed = pack_ternary(&values, out, inp)?;
            assert_eq!(packed.len(), out / 4 * inp);
            assert!(packed
                .iter()
                .all(|b| (0..4).all(|k| (b >> (2 * k)) & 3 != 3)));
            assert_eq!(unpack_ternary(&packed, out, inp), values);
        }
        Ok(())
    }

    #[test]
    fn pack_refuses_bad_input() {
        assert!(pack_ternary(&[0; 6], 6, 1)
            .unwrap_err()
            .to_string()
            .contains("multiple of 4"));
        assert!(pack_ternary(&[2, 0, 0, 0], 4, 1)
            .unwrap_err()
            .to_string()
            .contains("value 2"));
        assert!(pack_ternary(&[0; 5], 4, 1).is_err());
    }

    #[test]
    fn ternarize_absmean_matches_weight_quant() {
        let w = [0.3f32, -0.1, 0.05, -0.6, 0.0, 0.2];
        // mean|W| = 1.25 / 6; s = 4.8: w·s = 1.44, -0.48, 0.24, -2.88, 0, 0.96
        let (t, s) = ternarize_absmean(&w);
        assert!((s - 4.8).abs() < 1e-5, "{s}");
        assert_eq!(t, vec![1, 0, 0, -1, 0, 1]);
        // All-zero weights take the clamp, not a division by zero.
        let (t, s) = ternarize_absmean(&[0.0; 8]);
        assert_eq!(s, 1.0 / WEIGHT_ABSMEAN_EPS);
        assert!(t.iter().all(|&v| v == 0));
    }

    #[test]
    fn activation_quant_edge_cases() {
        let mut q = [0i8; 4];
        // All-zero row: the clamp gives scale 127/1e-5 and every value stays 0.
        let s = quantize_activations(&[0.0; 4], &mut q);
        assert_eq!(s, 127.0 / 1e-5);
        assert_eq!(q, [0; 4]);
        // ±max map to ±127: -128 is only reached through rounding, never by the absmax itself.
        let s = quantize_activations(&[-2.0, 2.0, 1.0, -1.0], &mut q);
        assert_eq!(s, 63.5);
        assert_eq!(q, [-127, 127, 64, -64]); // 63.5 rounds half to even → 64
                                             // Ties at .5 round half to even: with absmax 127 the scale is 1.
        let s = quantize_activations(&[127.0, 0.5, 1.5, -2.5], &mut q);
        assert_eq!(s, 1.0);
        assert_eq!(q, [127, 0, 2, -2]);
    }

    #[test]
    fn bitlinear_reference_by_hand() -> Result<()> {
        // W = [[1, -1], [0, 1], [1, 1], [-1, 0]], x = [127, -63.5] → x_q = [127, -64] (s = 1)
        let packed = pack_ternary(&[1, -1, 0, 1, 1, 1, -1, 0], 4, 2)?;
        let y = bitlinear_reference(&[127.0, -63.5], 1, &packed, 4, 2.0);
        assert_eq!(y, vec![191.0 / 2.0, -64.0 / 2.0, 63.0 / 2.0, -127.0 / 2.0]);
        Ok(())
    }
}
