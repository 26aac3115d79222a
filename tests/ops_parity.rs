//! CPU kernels against the pure-Rust reference in `quant.rs`: BitLinear must agree bit for bit
//! (every kernel variant this CPU runs, odd shapes, every input dtype); the bf16-weight head
//! within float-reordering tolerance of candle's matmul.

mod common;

use candle_bitnet::ops::cpu::{bitlinear_with, matmul_bf16, Kernel, QuantizedRows};
use candle_bitnet::ops::{bitlinear, matmul_bf16_weight};
use candle_bitnet::quant::{bitlinear_reference, pack_ternary};
use candle_core::{DType, Device, Result, Tensor};
use common::{random_activations, random_packed};
use rand::{rngs::StdRng, Rng, SeedableRng};

const IN: [usize; 8] = [1, 3, 63, 64, 65, 127, 130, 2568];
const OUT: [usize; 5] = [4, 8, 12, 44, 132];
const ROWS: [usize; 10] = [1, 2, 3, 4, 5, 7, 8, 9, 33, 128];

struct Case {
    x: Vec<f32>,
    packed: Vec<u8>,
    n: usize,
    out: usize,
    w_div: f32,
}

impl Case {
    fn random(rng: &mut StdRng, n: usize, k: usize, out: usize) -> Result<Self> {
        Ok(Self {
            x: random_activations(rng, n, k),
            packed: random_packed(rng, out, k)?,
            n,
            out,
            w_div: rng.random_range(0.5..4.0),
        })
    }

    fn reference(&self) -> Vec<f32> {
        bitlinear_reference(&self.x, self.n, &self.packed, self.out, self.w_div)
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn every_kernel_matches_the_reference_bit_for_bit() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    println!("kernels: {:?}", Kernel::available());
    for &k in &IN {
        for &out in &OUT {
            for &n in &ROWS {
                let case = Case::random(&mut rng, n, k, out)?;
                let want = bits(&case.reference());
                let acts = QuantizedRows::new(&case.x, n, k);
                for &kernel in Kernel::available() {
                    let mut y = vec![f32::NAN; n * out];
                    bitlinear_with(kernel, &acts, &case.packed, k, out, case.w_div, &mut y)?;
                    assert_eq!(bits(&y), want, "{kernel:?} rows {n}, {k} → {out}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn the_op_matches_the_reference_in_every_dtype() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    let dev = Device::Cpu;
    for &(n, k, out) in &[(1, 2568, 132), (5, 65, 44), (33, 130, 12), (3, 1, 4)] {
        let case = Case::random(&mut rng, n, k, out)?;
        let w = Tensor::from_vec(case.packed.clone(), (out / 4, k), &dev)?;
        let x = Tensor::from_vec(case.x.clone(), (1, n, k), &dev)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = x.to_dtype(dtype)?;
            // The op widens to f32 first, so the reference sees the rounded inputs.
            let x_f32 = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let want = bitlinear_reference(&x_f32, n, &case.packed, out, case.w_div);
            let want = Tensor::from_vec(want, (1, n, out), &dev)?.to_dtype(dtype)?;
            let got = bitlinear(&x, &w, case.w_div)?;
            assert_eq!(got.dims(), &[1, n, out]);
            assert_eq!(got.dtype(), dtype);
            let (got, want) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
            assert_eq!(
                bits(&got.flatten_all()?.to_vec1()?),
                bits(&want.flatten_all()?.to_vec1()?),
                "{dtype:?} rows {n}, {k} → {out}"
            );
        }
    }
    Ok(())
}

#[test]
fn bitlinear_with_refuses_mismatched_shapes() {
    let acts = QuantizedRows::new(&[1.0; 6], 2, 3);
    let mut y = vec![0f32; 8];
    assert!(bitlinear_with(Kernel::Portable, &acts, &[0; 3], 3, 4, 1.0, &mut y).is_ok());
    assert!(bitlinear_with(Kernel::Portable, &acts, &[0; 4], 3, 4, 1.0, &mut y).is_err());
    assert!(bitlinear_with(Kernel::Portable, &acts, &[0; 3], 3, 4, 1.0, &mut y[..7]).is_err());
    assert!(bitlinear_with(Kernel::Portable, &acts, &[0; 6], 6, 4, 1.0, &mut y).is_err());
}

/// `|got − want| ≤ tol · Σ|x·w|` per element: f32 sums in another order drift by a few ulps of
/// the magnitudes summed, not of the result.
fn assert_head_close(got: &[f32], x: &[f32], w: &[f32], hidden: usize, what: &str) {
    let vocab = w.len() / hidden;
    for (i, &g) in got.iter().enumerate() {
        let (xr, wr) = (
            &x[i / vocab * hidden..][..hidden],
            &w[i % vocab * hidden..][..hidden],
        );
        let want: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
        let scale: f64 = xr
            .iter()
            .zip(wr)
            .map(|(&a, &b)| (a as f64 * b as f64).abs())
            .sum();
        assert!(
            (g as f64 - want).abs() <= 1e-6 * scale + 1e-30,
            "{what}: y[{i}] = {g}, want {want} (scale {scale})"
        );
    }
}

#[test]
fn head_kernels_match_an_f32_matmul() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let dev = Device::Cpu;
    for &(n, vocab, hidden) in &[
        (1, 300, 2560),
        (3, 70, 33),
        (4, 129, 64),
        (9, 65, 100),
        (1, 5, 1),
    ] {
        let x: Vec<f32> = (0..n * hidden)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let w: Vec<f32> = (0..vocab * hidden)
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        let w_bf16 = Tensor::from_vec(w, (vocab, hidden), &dev)?.to_dtype(DType::BF16)?;
        // The exact widening of the bf16 weights is the reference's input.
        let w_f32 = w_bf16.to_dtype(DType::F32)?;
        let w_exact = w_f32.flatten_all()?.to_vec1::<f32>()?;
        let w_raw = w_bf16.flatten_all()?.to_vec1::<half::bf16>()?;
        for &kernel in Kernel::available() {
            let mut y = vec![f32::NAN; n * vocab];
            matmul_bf16(kernel, &x, &w_raw, hidden, &mut y)?;
            assert_head_close(
                &y,
                &x,
                &w_exact,
                hidden,
                &format!("{kernel:?} {n}×{hidden}→{vocab}"),
            );
        }
        let xt = Tensor::from_vec(x.clone(), (1, n, hidden), &dev)?;
        let got = matmul_bf16_weight(&xt, &w_bf16)?;
        assert_eq!(got.dims(), &[1, n, vocab]);
        let candle = xt.broadcast_matmul(&w_f32.t()?)?;
        let (got, candle) = (
            got.flatten_all()?.to_vec1::<f32>()?,
            candle.flatten_all()?.to_vec1::<f32>()?,
        );
        assert_head_close(&got, &x, &w_exact, hidden, "op");
        assert_head_close(&candle, &x, &w_exact, hidden, "candle");
    }
    Ok(())
}

#[test]
fn activation_quantization_edge_rows_match_the_reference() -> Result<()> {
    // Rows the quantizer must get exactly right in every kernel: all zero (scale clamp), ties at
    // .5 (half to even: absmax 127 gives scale 1), ±max, a denormal-sized row, and -0.0.
    let k = 70;
    let tie_row: Vec<f32> = (0..k)
        .map(|i| {
            if i == 0 {
                127.0
            } else {
                (i as f32 - 35.0) + 0.5
            }
        })
        .collect();
    let max_row: Vec<f32> = (0..k)
        .map(|i| if i % 2 == 0 { 3.0 } else { -3.0 })
        .collect();
    let tiny_row: Vec<f32> = (0..k).map(|i| (i as f32 - 30.0) * 1e-38).collect();
    let neg_zero_row = vec![-0.0f32; k];
    let zero_row = vec![0.0f32; k];
    let rows = [zero_row, tie_row, max_row, tiny_row, neg_zero_row];
    let x: Vec<f32> = rows.concat();
    let mut rng = StdRng::seed_from_u64(5);
    let out = 12;
    let values: Vec<i8> = (0..out * k).map(|_| rng.random_range(-1..=1)).collect();
    let packed = pack_ternary(&values, out, k)?;
    let want = bits(&bitlinear_reference(&x, rows.len(), &packed, out, 1.5));
    let acts = QuantizedRows::new(&x, rows.len(), k);
    for &kernel in Kernel::available() {
        let mut y = vec![f32::NAN; rows.len() * out];
        bitlinear_with(kernel, &acts, &packed, k, out, 1.5, &mut y)?;
        assert_eq!(bits(&y), want, "{kernel:?}");
    }
    // The tie row really holds ties, and they round to even, not away from zero.
    let mut q = vec![0i8; k];
    assert_eq!(
        candle_bitnet::quant::quantize_activations(&rows[1], &mut q),
        1.0
    );
    assert_eq!((q[1], q[34], q[35], q[36]), (-34, 0, 0, 2));
    Ok(())
}

/// Batched decode gives a sequence the same logits as alone: each token's head result is the
/// same bits whatever else is in the call (every kernel, groups and leftovers of any size).
#[test]
fn head_results_do_not_depend_on_the_other_tokens() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    let (vocab, hidden) = (150, 2560 + 7);
    let w: Vec<half::bf16> = (0..vocab * hidden)
        .map(|_| half::bf16::from_f32(rng.random_range(-0.1..0.1)))
        .collect();
    let x: Vec<f32> = (0..17 * hidden)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    for &kernel in Kernel::available() {
        let mut alone = vec![f32::NAN; 17 * vocab];
        for (x, y) in x.chunks(hidden).zip(alone.chunks_mut(vocab)) {
            matmul_bf16(kernel, x, &w, hidden, y)?;
        }
        for n in [2, 5, 8, 9, 17] {
            let mut y = vec![f32::NAN; n * vocab];
            matmul_bf16(kernel, &x[..n * hidden], &w, hidden, &mut y)?;
            let same = y
                .iter()
                .zip(&alone)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{kernel:?}: {n} tokens together differ from each alone"
            );
        }
    }
    Ok(())
}
