//! The BitLinear cases every kernel test checks, and the one harness that checks them: one table
//! of shapes ([`ROWS`] × ([`SHAPES`] and the CPU's [`GRID_IN`] × [`GRID_OUT`])), one input
//! generator with edge rows, the arithmetic of `quant.rs` as the expected result, and the device
//! as the parameter ([`Backend`]: the CPU kernels in `ops_parity.rs`, the CUDA kernels in
//! `cuda.rs`, their emulation in `cuda_emulated.rs`). Every element is compared bit for bit, and
//! each backend poisons its outputs before a kernel writes them.

use super::{random_activations, random_packed};
use candle_bitnet::quant::{dequantize_accumulator, quantize_activations, unpack_ternary};
use candle_core::{bail, DType, Device, Result, Tensor};
use half::{bf16, f16};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::fmt::Debug;

/// Activation rows: one token, the GPU mat-vec range (up to 8) and one past it; the CPU
/// kernels' row groups and remainders (3, 4, 5, 33); a 64-row gemm tile and one row more (65),
/// two tiles (128), and nine, the last a single row (513).
pub const ROWS: [usize; 12] = [1, 2, 3, 4, 5, 7, 8, 9, 33, 65, 128, 513];

/// (in, out) on every device. `in`: below 16, tails of 1, 2 and 8 bytes past a 16-byte chunk,
/// multiples of 16 (the GPU's 16-byte weight loads) with more chunks than a warp has lanes (592)
/// and a tail past the gemm's 64-byte steps (592 = 9·64 + 16), the fixture's 2568 and the 2B
/// model's 2560. `out / 4` packed rows: partial gemv blocks (4 rows) and gemm tiles (32 rows),
/// two gemm column tiles (33), the 2B model's 640.
pub const SHAPES: [(usize, usize); 11] = [
    (1, 4),
    (3, 12),
    (17, 44),
    (64, 8),
    (130, 132),
    (256, 44),
    (344, 128),
    (128, 344),
    (592, 20),
    (2568, 20),
    (2560, 640),
];

/// The CPU kernels' grid, every `in` with every `out`: rows around the 64-column steps and a
/// long one; one to five 64-row weight tiles, partial or whole (decode walks 4 tiles at once,
/// then the rest).
pub const GRID_IN: [usize; 8] = [1, 3, 63, 64, 65, 127, 130, 2568];
pub const GRID_OUT: [usize; 7] = [4, 8, 12, 44, 132, 256, 324];

/// The emulation runs every CUDA thread as a host thread, so it takes part of the table: the
/// GPU's rows (not the CPU's row groups) up to two gemm tiles, on [`SHAPES`] up to this many
/// weights, and nine gemm row tiles on one shape ([`EMULATED_BIG`]).
pub const EMULATED_ROWS: [usize; 7] = [1, 2, 7, 8, 9, 65, 128];
pub const EMULATED_WEIGHTS: usize = 60_000;
pub const EMULATED_BIG: Shape = Shape {
    rows: 513,
    k: 130,
    out: 132,
};

/// The float dtypes of activations and outputs.
pub const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub rows: usize,
    pub k: usize,
    pub out: usize,
}

/// Which part of the table a backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// [`ROWS`] on [`SHAPES`] and on the grid.
    All,
    /// [`EMULATED_ROWS`] on [`SHAPES`] up to [`EMULATED_WEIGHTS`], and [`EMULATED_BIG`].
    Emulated,
}

pub fn shapes(coverage: Coverage) -> Vec<Shape> {
    let (rows, mut pairs) = match coverage {
        Coverage::All => (&ROWS[..], SHAPES.to_vec()),
        Coverage::Emulated => (&EMULATED_ROWS[..], SHAPES.to_vec()),
    };
    match coverage {
        Coverage::All => {
            let grid = GRID_IN
                .iter()
                .flat_map(|&k| GRID_OUT.iter().map(move |&out| (k, out)));
            pairs.extend(grid.filter(|p| !SHAPES.contains(p)));
        }
        Coverage::Emulated => pairs.retain(|&(k, out)| k * out <= EMULATED_WEIGHTS),
    }
    let mut shapes: Vec<Shape> = pairs
        .into_iter()
        .flat_map(|(k, out)| rows.iter().map(move |&rows| Shape { rows, k, out }))
        .collect();
    if coverage == Coverage::Emulated {
        shapes.push(EMULATED_BIG);
    }
    shapes
}

/// Activations `[n, k]`: random, a few large values per row, and, before the last row, up to
/// five edge rows: all ties (absmax 127, so x·s_x lands on .5 and rounding half to even
/// decides), all zeros (the absmax clamp), ±absmax with ties, values below the clamp, and -0
/// with NaNs (quantized to 0).
pub fn activations(rng: &mut StdRng, n: usize, k: usize) -> Vec<f32> {
    let mut x = random_activations(rng, n, k);
    for t in 0..n.saturating_sub(1).min(5) {
        let row = &mut x[t * k..(t + 1) * k];
        for (c, v) in row.iter_mut().enumerate() {
            *v = match t {
                0 if c == 0 => 127.0,
                0 => (c % 254) as f32 - 126.5,
                1 => 0.0,
                // absmax 2 with both signs: s_x = 63.5, and ±1 lands on ±63.5.
                2 => [2.0, -2.0, 1.0, -1.0][c % 4] * if c % 8 < 4 { 1.0 } else { 0.5 },
                3 => ((c % 16) as f32 - 7.5) * 1e-7,
                _ if c % 5 == 2 => f32::NAN,
                _ => [-0.0, 0.25, -0.75][c % 3],
            };
        }
    }
    x
}

/// `v` rounded to `dtype` (round to nearest even, as candle and the kernels do) and widened
/// back to f32, which is exact.
pub fn round_to(v: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(v).to_f32(),
        DType::F16 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// One BitLinear problem: activations `[rows, k]`, packed ternary weights `[out/4, k]`, w_div.
pub struct Case {
    pub shape: Shape,
    pub x: Vec<f32>,
    pub packed: Vec<u8>,
    pub w_div: f32,
}

impl Case {
    pub fn random(rng: &mut StdRng, shape: Shape) -> Result<Self> {
        Ok(Self {
            x: activations(rng, shape.rows, shape.k),
            packed: random_packed(rng, shape.out, shape.k)?,
            w_div: rng.random_range(0.5..4.0),
            shape,
        })
    }

    /// The activations as a device holding them in `dtype` sees them.
    pub fn x_in(&self, dtype: DType) -> Vec<f32> {
        self.x.iter().map(|&v| round_to(v, dtype)).collect()
    }

    /// `x` in `dtype` on `dev`, `[1, rows, k]` (the op flattens leading dimensions).
    pub fn x_tensor(&self, dtype: DType, dev: &Device) -> Result<Tensor> {
        let Shape { rows, k, .. } = self.shape;
        Tensor::from_vec(self.x.clone(), (1, rows, k), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    /// The packed weights `[out/4, k]` on `dev`.
    pub fn w_tensor(&self, dev: &Device) -> Result<Tensor> {
        let Shape { k, out, .. } = self.shape;
        Tensor::from_vec(self.packed.clone(), (out / 4, k), dev)
    }
}

/// What a backend computes, compared with the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The exact i32 accumulators `Σ W·x_q` of f32 activations, before any scale.
    Accumulators,
    /// BitLinear's result, activations and result in this dtype.
    Scaled(DType),
}

/// A device's BitLinear, the harness's parameter.
pub trait Backend {
    /// One way the backend computes BitLinear (a kernel, an entry point), named in failures.
    type Kernel: Debug;
    /// The kernels and outputs it checks on `case`.
    fn runs(&self, case: &Case) -> Vec<(Self::Kernel, Output)>;
    /// `output` of `kernel` on `case`, as bits: the i32 accumulators, or the result in its
    /// dtype widened to f32 (see [`tensor_bits`]).
    fn run(&self, kernel: &Self::Kernel, case: &Case, output: Output) -> Result<Vec<u32>>;
}

/// The reference quantization of `x: [n, k]`, in the GPU kernels' layout: `xq [n, k_pad]`
/// zero-padded, the scales `s_x`, the row sums of `xq`.
pub struct Quantized {
    pub xq: Vec<i8>,
    pub scale: Vec<f32>,
    pub sum: Vec<i32>,
}

impl Quantized {
    pub fn of(x: &[f32], n: usize, k: usize, k_pad: usize) -> Self {
        let mut q = Self {
            xq: vec![0; n * k_pad],
            scale: vec![],
            sum: vec![],
        };
        for (t, row) in x.chunks_exact(k).enumerate() {
            let xq = &mut q.xq[t * k_pad..t * k_pad + k];
            q.scale.push(quantize_activations(row, xq));
            q.sum.push(xq.iter().map(|&v| v as i32).sum());
        }
        q
    }
}

/// `output` of `case` by `quant.rs`'s arithmetic (quantization, exact ternary sums, the shared
/// epilogue), as bits. The weights are unpacked once, not once per row as
/// `quant::ternary_accumulate` does.
pub fn reference(case: &Case, weights: &[i8], output: Output) -> Vec<u32> {
    let Shape { rows, k, out } = case.shape;
    let dtype = match output {
        Output::Accumulators => DType::F32,
        Output::Scaled(dtype) => dtype,
    };
    let q = Quantized::of(&case.x_in(dtype), rows, k, k);
    let mut bits = Vec::with_capacity(rows * out);
    for (xq, &s_x) in q.xq.chunks_exact(k).zip(&q.scale) {
        for w in weights.chunks_exact(k) {
            let acc: i32 = w.iter().zip(xq).map(|(&w, &x)| w as i32 * x as i32).sum();
            bits.push(match output {
                Output::Accumulators => acc as u32,
                Output::Scaled(dtype) => {
                    round_to(dequantize_accumulator(acc, s_x, case.w_div), dtype).to_bits()
                }
            });
        }
    }
    bits
}

/// Every case of `coverage` through every kernel and output `backend` checks (see
/// [`check_case`]).
pub fn check_bitlinear<B: Backend>(backend: &B, coverage: Coverage, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    for shape in shapes(coverage) {
        check_case(backend, &Case::random(&mut rng, shape)?)?;
    }
    Ok(())
}

/// `case` through every kernel and output `backend` checks, each element equal to the
/// reference's, bit for bit.
pub fn check_case<B: Backend>(backend: &B, case: &Case) -> Result<()> {
    let Shape { rows, k, out } = case.shape;
    let weights = unpack_ternary(&case.packed, out, k);
    let mut wants: Vec<(Output, Vec<u32>)> = vec![];
    for (kernel, output) in backend.runs(case) {
        let i = match wants.iter().position(|(o, _)| *o == output) {
            Some(i) => i,
            None => {
                wants.push((output, reference(case, &weights, output)));
                wants.len() - 1
            }
        };
        let got = backend.run(&kernel, case, output)?;
        let what = format!("{kernel:?} {output:?} rows {rows}, {k} → {out}");
        assert_same_bits(&got, &wants[i].1, &what);
    }
    Ok(())
}

/// Bit patterns of a float tensor (widened to f32, exact for bf16/f16), or the values of an
/// integer tensor, on the CPU.
pub fn tensor_bits(t: &Tensor) -> Result<Vec<u32>> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match t.dtype() {
        DType::I32 => t.to_vec1::<i32>()?.into_iter().map(|v| v as u32).collect(),
        DType::F32 | DType::BF16 | DType::F16 => t
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f32::to_bits)
            .collect(),
        dtype => bail!("no bits for {dtype:?}"),
    })
}

/// `got` and `want` the same length and equal element by element.
pub fn assert_same_bits(got: &[u32], want: &[u32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: element count");
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        let n = (0..want.len()).filter(|&i| got[i] != want[i]).count();
        panic!(
            "{what}: {n} of {} elements differ, first at {i}: got {:#010x}, want {:#010x}",
            want.len(),
            got[i],
            want[i]
        );
    }
}
