//! CPU BitLinear: per-token int8 quantization, then exact i32 dot products of the int8
//! activations with the packed 2-bit codes, read in place (no float copy of the matrix).
//!
//! The codes are unsigned (value + 1), so each dot product is computed as
//! `Σ code·x_q − Σ x_q`: the unsigned×signed byte products are what VNNI (`vpdpbusd`) and AVX2
//! (`vpmaddubsw`) multiply natively, and the portable loop vectorizes the same way.
//! Work is split over packed rows with rayon; each packed row gives four output features.

use crate::quant::{dequantize_accumulator, quantize_activations};
use rayon::prelude::*;

/// Activation rows padded with zeros to a multiple of this, so SIMD loops need no tail.
pub const K_ALIGN: usize = 64;

/// Int8 activations of a batch, quantized once and shared by every weight row.
pub struct QuantizedRows {
    /// `[n_rows, k_padded]`, zero-padded past `in_features`.
    pub values: Vec<i8>,
    pub k_padded: usize,
    /// Per-row `s_x = 127 / absmax`.
    pub scales: Vec<f32>,
    /// Per-row `Σ x_q`, subtracted to turn `Σ code·x_q` into `Σ (code − 1)·x_q`.
    pub sums: Vec<i32>,
}

impl QuantizedRows {
    pub fn new(x: &[f32], n_rows: usize, in_features: usize) -> Self {
        let k_padded = in_features.next_multiple_of(K_ALIGN);
        let mut values = vec![0i8; n_rows * k_padded];
        let mut scales = vec![0f32; n_rows];
        let mut sums = vec![0i32; n_rows];
        for (((row, q), s), sum) in x
            .chunks_exact(in_features)
            .zip(values.chunks_exact_mut(k_padded))
            .zip(&mut scales)
            .zip(&mut sums)
        {
            *s = quantize_activations(row, &mut q[..in_features]);
            *sum = q.iter().map(|&v| v as i32).sum();
        }
        Self {
            values,
            k_padded,
            scales,
            sums,
        }
    }

    pub fn n_rows(&self) -> usize {
        self.scales.len()
    }

    pub fn row(&self, i: usize) -> &[i8] {
        &self.values[i * self.k_padded..(i + 1) * self.k_padded]
    }
}

/// `Σ_c ((packed[c] >> 2k) & 3) · x[c]` for k = 0..4: one packed row against one activation row.
/// `x` may be longer than `packed` (padding); only `packed.len()` columns are used.
fn code_dots_portable(packed: &[u8], x: &[i8]) -> [i32; 4] {
    let mut acc = [0i32; 4];
    for (&p, &x) in packed.iter().zip(x) {
        let x = x as i32;
        acc[0] += (p & 3) as i32 * x;
        acc[1] += ((p >> 2) & 3) as i32 * x;
        acc[2] += ((p >> 4) & 3) as i32 * x;
        acc[3] += (p >> 6) as i32 * x;
    }
    acc
}

/// Raw `Σ code·x_q` of every (packed row, activation row) pair, written to `acc`
/// `[packed_rows, n_rows, 4]`. Dispatches to the best kernel this CPU supports.
fn code_dots(packed: &[u8], in_features: usize, acts: &QuantizedRows, acc: &mut [[i32; 4]]) {
    for (p, acc) in packed
        .chunks_exact(in_features)
        .zip(acc.chunks_exact_mut(acts.n_rows()))
    {
        for (t, a) in acc.iter_mut().enumerate() {
            *a = code_dots_portable(p, acts.row(t));
        }
    }
}

/// Packed rows handled by one rayon task: large enough to amortize the task, small enough to
/// balance two to many threads.
const ROWS_PER_TASK: usize = 16;

/// `y[t, k·R + j] = (Σ_c W[k·R + j, c]·x_q[t, c]) / (w_div · s_x[t])` for all rows `t`.
/// `packed` is `[R, in_features]` with `R = out_features / 4`; `y` is `[n_rows, out_features]`.
pub fn bitlinear(
    acts: &QuantizedRows,
    packed: &[u8],
    in_features: usize,
    out_features: usize,
    w_div: f32,
    y: &mut [f32],
) {
    let n_rows = acts.n_rows();
    let r = out_features / 4;
    let mut acc = vec![[0i32; 4]; r * n_rows];
    acc.par_chunks_mut(ROWS_PER_TASK * n_rows)
        .zip(packed.par_chunks(ROWS_PER_TASK * in_features))
        .for_each(|(acc, packed)| code_dots(packed, in_features, acts, acc));
    for (t, y) in y.chunks_exact_mut(out_features).enumerate() {
        let (s, sum) = (acts.scales[t], acts.sums[t]);
        for j in 0..r {
            let a = acc[j * n_rows + t];
            for k in 0..4 {
                y[k * r + j] = dequantize_accumulator(a[k] - sum, s, w_div);
            }
        }
    }
}
