//! CPU kernels against the pure-Rust reference in `quant.rs`: BitLinear must agree bit for bit
//! (every kernel variant this CPU runs, AMX tiles where the CPU has them, the shared table of
//! shapes in `common/kernels.rs`, every input dtype); the bf16-weight head within
//! float-reordering tolerance of candle's matmul, its compact storage bit for bit.

mod common;

use candle_bitnet::ops::cpu::{
    bitlinear_amx, bitlinear_segments_amx, bitlinear_segments_with, bitlinear_with, matmul_bf16,
    matmul_compact, matmul_int8, AmxSupport, CompactBf16Head, Int8Head, Kernel, QuantizedRows,
    TernaryTiles,
};
use candle_bitnet::ops::{
    bitlinear, bitlinear_segments, matmul_bf16_weight, matmul_int8_head, rms_norm_bitlinear,
};
use candle_bitnet::quant::{bitlinear_reference, pack_ternary};
use candle_core::{bail, DType, Device, Result, Tensor};
use common::kernels::{
    check_bitlinear, check_case, reference, tensor_bits, Backend, Case, Coverage, Output, Shape,
    DTYPES,
};
use common::{random_activations, random_packed};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The CPU as a [`Backend`]: every SIMD kernel this machine runs (f32, through
/// [`bitlinear_with`] into a NaN-poisoned output), AMX for every token count if ready, and the
/// op on tensors in every dtype.
struct Cpu;

#[derive(Debug, Clone, Copy)]
enum CpuRun {
    Kernel(Kernel),
    Amx,
    Op,
}

/// Whether the AMX path is checked here; if not, says why on the test's output.
fn amx_checked() -> bool {
    let support = AmxSupport::get();
    if support != AmxSupport::Ready {
        println!("AMX NOT CHECKED on this machine: {support:?}");
    }
    support == AmxSupport::Ready
}

impl Backend for Cpu {
    type Kernel = CpuRun;

    fn runs(&self, _: &Case) -> Vec<(CpuRun, Output)> {
        let kernels = Kernel::available()
            .iter()
            .map(|&k| (CpuRun::Kernel(k), Output::Scaled(DType::F32)));
        let amx = AmxSupport::is_ready().then_some((CpuRun::Amx, Output::Scaled(DType::F32)));
        let op = DTYPES.map(|dtype| (CpuRun::Op, Output::Scaled(dtype)));
        kernels.chain(amx).chain(op).collect()
    }

    fn run(&self, run: &CpuRun, case: &Case, output: Output) -> Result<Vec<u32>> {
        let Output::Scaled(dtype) = output else {
            bail!("the CPU runs the reference accumulators, nothing to compare")
        };
        let Shape { rows, k, out } = case.shape;
        match run {
            CpuRun::Kernel(_) | CpuRun::Amx => {
                let acts = QuantizedRows::new(&case.x, rows, k);
                let tiles = TernaryTiles::from_packed(&case.packed, k, out)?;
                let mut y = vec![f32::NAN; rows * out];
                match run {
                    CpuRun::Kernel(kernel) => {
                        bitlinear_with(*kernel, &acts, &tiles, case.w_div, &mut y)?
                    }
                    _ => bitlinear_amx(&acts, &tiles, case.w_div, &mut y)?,
                }
                Ok(bits(&y))
            }
            CpuRun::Op => {
                let dev = Device::Cpu;
                let y = bitlinear(
                    &case.x_tensor(dtype, &dev)?,
                    &case.w_tensor(&dev)?,
                    case.w_div,
                )?;
                assert_eq!((y.dims(), y.dtype()), (&[1, rows, out][..], dtype));
                tensor_bits(&y)
            }
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn every_kernel_and_dtype_matches_the_reference_bit_for_bit() -> Result<()> {
    println!(
        "kernels: {:?}, AMX: {:?}",
        Kernel::available(),
        AmxSupport::get()
    );
    amx_checked();
    check_bitlinear(&Cpu, Coverage::All, 1)
}

/// AMX multiplies groups of up to 16 tokens, up to four groups a task, 64 columns at a time,
/// eight chunks per decoded segment: token counts around each of those, on rows that end
/// inside a chunk and past a segment, odd widths, one thread (one task of many tiles, so the
/// decode buffer is reused) and the pool (tasks of few tiles, token blocks split evenly).
#[test]
fn amx_matches_the_reference_at_every_group_size() -> Result<()> {
    if !amx_checked() {
        return Ok(());
    }
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(candle_core::Error::wrap)?;
    let mut rng = StdRng::seed_from_u64(13);
    let rows = [
        1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 100, 129,
    ];
    for (k, out) in [(2560, 640), (577, 196), (1, 4), (65, 68), (1030, 132)] {
        for rows in rows {
            let case = Case::random(&mut rng, Shape { rows, k, out })?;
            check_case(&Cpu, &case)?;
            one.install(|| check_case(&Cpu, &case))?;
        }
    }
    Ok(())
}

/// The harness's reference is `quant.rs`'s, only faster.
#[test]
fn the_harness_reference_is_the_crate_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    for (rows, k, out) in [(1, 1, 4), (5, 65, 44), (9, 2568, 20)] {
        let case = Case::random(&mut rng, Shape { rows, k, out })?;
        let weights = candle_bitnet::quant::unpack_ternary(&case.packed, out, k);
        let want = bitlinear_reference(&case.x, rows, &case.packed, out, case.w_div);
        let got = reference(&case, &weights, Output::Scaled(DType::F32));
        assert_eq!(got, bits(&want), "rows {rows}, {k} → {out}");
    }
    Ok(())
}

#[test]
fn long_rows_match_the_reference_past_the_accumulator_flush() -> Result<()> {
    // 70 000 columns: more steps than the VNNI kernels sum before undoing the bit-field
    // scale, and thousands of AVX2 16-bit flushes; 3 rows, so the two-token kernels run both
    // their paths.
    let mut rng = StdRng::seed_from_u64(6);
    let shape = Shape {
        rows: 3,
        k: 70_000,
        out: 64,
    };
    check_case(&Cpu, &Case::random(&mut rng, shape)?)
}

#[test]
fn segments_share_one_quantization_and_match_each_reference() -> Result<()> {
    // Like q, k, v: one input, projections of different widths (not all multiples of a tile)
    // and scales, each matching its own reference bit for bit, side by side.
    let mut rng = StdRng::seed_from_u64(9);
    let dev = Device::Cpu;
    for &(n, k) in &[(1, 2568), (2, 130), (3, 65), (5, 64), (9, 3)] {
        let outs = [132, 44, 64, 8];
        let x = random_activations(&mut rng, n, k);
        let packed: Vec<Vec<u8>> = outs
            .iter()
            .map(|&out| random_packed(&mut rng, out, k))
            .collect::<Result<_>>()?;
        let w_divs: Vec<f32> = outs.iter().map(|_| rng.random_range(0.5..4.0)).collect();
        let refs: Vec<Vec<f32>> = (0..outs.len())
            .map(|s| bitlinear_reference(&x, n, &packed[s], outs[s], w_divs[s]))
            .collect();
        let total: usize = outs.iter().sum();
        let want: Vec<f32> = (0..n)
            .flat_map(|t| {
                refs.iter()
                    .zip(outs)
                    .flat_map(move |(r, out)| r[t * out..(t + 1) * out].to_vec())
            })
            .collect();
        let parts: Vec<(&[u8], usize)> = packed.iter().map(|p| &p[..]).zip(outs).collect();
        let tiles = TernaryTiles::from_segments(&parts, k)?;
        assert_eq!((tiles.out_features(), tiles.segments()), (total, &outs[..]));
        let acts = QuantizedRows::new(&x, n, k);
        for &kernel in Kernel::available() {
            let mut y = vec![f32::NAN; n * total];
            bitlinear_segments_with(kernel, &acts, &tiles, &w_divs, &mut y)?;
            assert_eq!(bits(&y), bits(&want), "{kernel:?} rows {n}, {k} → {outs:?}");
        }
        if amx_checked() {
            let mut y = vec![f32::NAN; n * total];
            bitlinear_segments_amx(&acts, &tiles, &w_divs, &mut y)?;
            assert_eq!(bits(&y), bits(&want), "AMX rows {n}, {k} → {outs:?}");
        }
        let tiles = std::sync::Arc::new(tiles);
        let xt = Tensor::from_vec(x.clone(), (n, k), &dev)?;
        let got = bitlinear_segments(&xt, &tiles, &w_divs)?;
        assert_eq!(got.dims(), &[n, total]);
        assert_eq!(bits(&got.flatten_all()?.to_vec1()?), bits(&want), "op");
        let err = bitlinear_segments(&xt, &tiles, &w_divs[1..]).unwrap_err();
        assert!(err.to_string().contains("3 weight scales for 4"), "{err}");
    }
    Ok(())
}

#[test]
fn rms_norm_fused_with_quantization_matches_the_norm_then_bitlinear() -> Result<()> {
    use candle_core::Module;
    let mut rng = StdRng::seed_from_u64(10);
    let dev = Device::Cpu;
    for &(n, k) in &[(1, 2560), (3, 130), (9, 65)] {
        let outs = [64, 132];
        let x = Tensor::from_vec(random_activations(&mut rng, n, k), (1, n, k), &dev)?;
        let gamma: Vec<f32> = (0..k).map(|_| rng.random_range(0.2..3.0)).collect();
        let gamma = Tensor::from_vec(gamma, k, &dev)?;
        let vb = candle_nn::VarBuilder::from_tensors(
            [("weight".to_string(), gamma.clone())].into(),
            DType::F32,
            &dev,
        );
        let norm = candle_bitnet::norm::RmsNorm::new(k, 1e-5, vb)?;
        let packed: Vec<Vec<u8>> = outs
            .iter()
            .map(|&out| random_packed(&mut rng, out, k))
            .collect::<Result<_>>()?;
        let parts: Vec<(&[u8], usize)> = packed.iter().map(|p| &p[..]).zip(outs).collect();
        let tiles = std::sync::Arc::new(TernaryTiles::from_segments(&parts, k)?);
        let w_divs = [1.5, 0.75];
        let want = bitlinear_segments(&norm.forward(&x)?, &tiles, &w_divs)?;
        let got = rms_norm_bitlinear(&x, &gamma, 1e-5, &tiles, &w_divs)?;
        assert_eq!(got.dims(), want.dims());
        let (got, want) = (
            got.flatten_all()?.to_vec1()?,
            want.flatten_all()?.to_vec1()?,
        );
        assert_eq!(bits(&got), bits(&want), "rows {n}, {k}");
    }
    let x = Tensor::zeros((2, 64), DType::F32, &dev)?;
    let tiles = std::sync::Arc::new(TernaryTiles::from_packed(&[0b01_01_01_01; 64], 64, 4)?);
    let short = Tensor::ones(32, DType::F32, &dev)?;
    assert!(rms_norm_bitlinear(&x, &short, 1e-5, &tiles, &[1.0]).is_err());
    let bf16 = x.to_dtype(DType::BF16)?;
    let ones = Tensor::ones(64, DType::F32, &dev)?;
    let err = rms_norm_bitlinear(&bf16, &ones, 1e-5, &tiles, &[1.0]).unwrap_err();
    assert!(err.to_string().contains("needs f32"), "{err}");
    Ok(())
}

#[test]
fn decode_walks_several_tiles_at_once_bit_for_bit() -> Result<()> {
    // One thread: four tasks of five 64-row tiles each (18 tiles, the last partial), so one
    // token streams 4 tiles and then 1, two tokens 2 + 2 + 1, at a real row length.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(candle_core::Error::wrap)?;
    let mut rng = StdRng::seed_from_u64(12);
    for rows in [1, 2, 3] {
        let case = Case::random(
            &mut rng,
            Shape {
                rows,
                k: 2568,
                out: 1100,
            },
        )?;
        pool.install(|| check_case(&Cpu, &case))?;
    }
    Ok(())
}

#[test]
fn bitlinear_with_refuses_mismatched_shapes() -> Result<()> {
    let acts = QuantizedRows::new(&[1.0; 6], 2, 3);
    let tiles = TernaryTiles::from_packed(&[0b01_01_01_01; 3], 3, 4)?;
    let wide = TernaryTiles::from_packed(&[0b01_01_01_01; 6], 6, 4)?;
    let mut y = vec![0f32; 8];
    assert!(bitlinear_with(Kernel::Portable, &acts, &tiles, 1.0, &mut y).is_ok());
    let err = bitlinear_with(Kernel::Portable, &acts, &tiles, 1.0, &mut y[..7]).unwrap_err();
    assert!(err.to_string().contains("7 outputs"), "{err}");
    assert!(bitlinear_with(Kernel::Portable, &acts, &wide, 1.0, &mut y).is_err());
    let err = bitlinear_amx(&acts, &tiles, 1.0, &mut y[..7]).unwrap_err();
    let want = match AmxSupport::get() {
        AmxSupport::Ready => "7 outputs",
        _ => "AMX is not available",
    };
    assert!(err.to_string().contains(want), "{err}");
    Ok(())
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

/// Per-row absmax int8 of `w: [vocab, hidden]`, written out independently of the crate:
/// `(values, scales)`.
fn int8_rows_reference(w: &[f32], hidden: usize) -> (Vec<i8>, Vec<f32>) {
    let mut values = Vec::with_capacity(w.len());
    let mut scales = Vec::new();
    for row in w.chunks_exact(hidden) {
        let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = if absmax > 0.0 { 127.0 / absmax } else { 0.0 };
        values.extend(row.iter().map(|&v| (v * s).round_ties_even() as i8));
        scales.push(absmax / 127.0);
    }
    (values, scales)
}

#[test]
fn int8_head_matches_a_pure_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    let dev = Device::Cpu;
    for &(n, vocab, hidden) in &[(1, 300, 2560), (3, 70, 33), (4, 129, 64), (9, 65, 100)] {
        let x: Vec<f32> = (0..n * hidden)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        // Rows of very different magnitudes, and one all-zero row (scale 0, logits 0).
        let mut w: Vec<f32> = (0..vocab * hidden)
            .map(|i| rng.random_range(-0.1..0.1) * (1 + i / hidden % 7) as f32)
            .collect();
        w[hidden..2 * hidden].fill(0.0);
        let head = Int8Head::from_f32(&w, hidden)?;
        let (values, scales) = int8_rows_reference(&w, hidden);
        assert_eq!(head.values(), &values[..], "values {vocab}×{hidden}");
        assert_eq!(
            bits(head.scales()),
            bits(&scales),
            "scales {vocab}×{hidden}"
        );
        // Rounding to nearest: each weight moves by at most half a step.
        for (i, &v) in w.iter().enumerate() {
            let s = scales[i / hidden];
            assert!(
                (values[i] as f32 * s - v).abs() <= 0.5001 * s,
                "w[{i}] = {v}"
            );
        }
        let dequantized: Vec<f32> = values
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * scales[i / hidden])
            .collect();
        for &kernel in Kernel::available() {
            let mut y = vec![f32::NAN; n * vocab];
            matmul_int8(kernel, &x, &head, &mut y)?;
            let what = format!("{kernel:?} {n}×{hidden}→{vocab}");
            assert_head_close(&y, &x, &dequantized, hidden, &what);
            assert!(y.iter().skip(1).step_by(vocab).all(|&v| v == 0.0), "{what}");
        }
        let head = std::sync::Arc::new(head);
        let xt = Tensor::from_vec(x.clone(), (1, n, hidden), &dev)?.to_dtype(DType::BF16)?;
        let got = matmul_int8_head(&xt, &head)?;
        assert_eq!((got.dims(), got.dtype()), (&[1, n, vocab][..], DType::F32));
        let x_bf16 = xt.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let got = got.flatten_all()?.to_vec1::<f32>()?;
        assert_head_close(&got, &x_bf16, &dequantized, hidden, "op");
    }
    Ok(())
}

/// The int8 head's logits in the order every SIMD head kernel shares, written out independently
/// of the crate: 32 lanes of fused multiply-adds over the full 32-wide chunks, the lanes summed
/// in order, then the tail's products, the sum times the row's scale.
fn int8_head_fma_reference(x: &[f32], values: &[i8], scales: &[f32], hidden: usize) -> Vec<f32> {
    let full = hidden / 32 * 32;
    let mut y = Vec::new();
    for x in x.chunks_exact(hidden) {
        for (w, &scale) in values.chunks_exact(hidden).zip(scales) {
            let mut lanes = [0f32; 32];
            for c in (0..full).step_by(32) {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    *lane = (w[c + l] as f32).mul_add(x[c + l], *lane);
                }
            }
            let tail = (full..hidden).map(|h| w[h] as f32 * x[h]);
            let dot: f32 = lanes.iter().copied().chain(tail).sum();
            y.push(dot * scale);
        }
    }
    y
}

/// The SIMD int8 head kernels give the bits of [`int8_head_fma_reference`]: every token count
/// of a register block and its leftovers, hidden sizes with and without tails, vocabularies
/// that leave rows over from every row block.
#[test]
fn int8_head_simd_kernels_match_the_fma_order_bit_for_bit() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(21);
    for &(vocab, hidden) in &[(1, 32), (7, 2560 + 7), (67, 33), (130, 96), (5, 31)] {
        let w: Vec<f32> = (0..vocab * hidden)
            .map(|_| rng.random_range(-0.1..0.1))
            .collect();
        let head = Int8Head::from_f32(&w, hidden)?;
        for n in [1, 2, 3, 4, 5, 16] {
            let x: Vec<f32> = (0..n * hidden)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let want = bits(&int8_head_fma_reference(
                &x,
                head.values(),
                head.scales(),
                hidden,
            ));
            assert!(want.iter().any(|&b| f32::from_bits(b) != 0.0));
            for &kernel in Kernel::available() {
                if kernel == Kernel::Portable {
                    continue;
                }
                let mut y = vec![f32::NAN; n * vocab];
                matmul_int8(kernel, &x, &head, &mut y)?;
                assert!(
                    bits(&y) == want,
                    "{kernel:?} {n}×{hidden}→{vocab} differs from the FMA order"
                );
            }
        }
    }
    Ok(())
}

/// The compact bf16 head ([`CompactBf16Head`], 12 bits a weight) gives the plain bf16 head's
/// bits on every SIMD kernel: rows of uniform weights (few escapes), of weights spanning 2⁶⁰ (most
/// chunks stored raw), zero rows, rows mixing both kinds; token counts that fill a register
/// block and leave some over; vocabularies that leave a row over and span several L2 slices.
#[test]
fn compact_head_gives_the_bf16_heads_bits() -> Result<()> {
    if !CompactBf16Head::is_supported(64) {
        eprintln!("SKIPPED: the compact head's kernels need AVX2, which this CPU lacks");
        return Ok(());
    }
    let mut rng = StdRng::seed_from_u64(22);
    for &(vocab, hidden) in &[(1usize, 64usize), (7, 128), (301, 320), (2000, 64)] {
        let w: Vec<bf16> = (0..vocab * hidden)
            .map(|i| {
                let (v, c) = (i / hidden, i % hidden);
                let uniform = rng.random_range(-0.05f32..0.05);
                let wide = rng.random_range(-1f32..1.0) * 2f32.powi(rng.random_range(-30..30));
                bf16::from_f32(match v % 4 {
                    0 => uniform,
                    1 => wide,
                    2 => 0.0,
                    _ if (c / 64).is_multiple_of(3) => wide,
                    _ => uniform,
                })
            })
            .collect();
        let head = CompactBf16Head::from_bf16(&w, hidden)?;
        assert!(head.escaped_chunks() > 0 || vocab < 2, "{head:?}");
        for n in [1, 2, 3, 4, 5, 9] {
            let x: Vec<f32> = (0..n * hidden)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            for &kernel in Kernel::available() {
                if kernel == Kernel::Portable {
                    assert!(matmul_compact(kernel, &x, &head, &mut [0.0; 0]).is_err());
                    continue;
                }
                let mut want = vec![f32::NAN; n * vocab];
                matmul_bf16(kernel, &x, &w, hidden, &mut want)?;
                assert!(want.iter().any(|&y| y != 0.0 && y.is_finite()));
                let mut got = vec![f32::NAN; n * vocab];
                matmul_compact(kernel, &x, &head, &mut got)?;
                let what = format!("{kernel:?} {n}×{hidden}→{vocab}, {head:?}");
                assert!(bits(&got) == bits(&want), "{what}");
            }
        }
    }
    Ok(())
}

#[test]
fn int8_head_refuses_bad_input() -> Result<()> {
    assert!(Int8Head::from_f32(&[1.0; 5], 2).is_err());
    assert!(Int8Head::from_f32(&[], 2).is_err());
    for bad in [f32::INFINITY, f32::NAN] {
        let err = Int8Head::from_f32(&[1.0, 1.0, 1.0, bad], 2).unwrap_err();
        assert!(err.to_string().contains("row 1"), "{err}");
    }
    let head = std::sync::Arc::new(Int8Head::from_f32(&[1.0; 6], 3)?);
    let x = Tensor::from_vec(vec![1.0f32; 4], (1, 4), &Device::Cpu)?;
    let err = matmul_int8_head(&x, &head).unwrap_err();
    assert!(
        err.to_string().contains("last dimension must be 3"),
        "{err}"
    );
    let mut y = vec![0f32; 3];
    assert!(matmul_int8(Kernel::Portable, &[1.0; 3], &head, &mut y).is_err());
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
    let tiles = TernaryTiles::from_packed(&packed, k, out)?;
    for &kernel in Kernel::available() {
        let mut y = vec![f32::NAN; rows.len() * out];
        bitlinear_with(kernel, &acts, &tiles, 1.5, &mut y)?;
        assert_eq!(bits(&y), want, "{kernel:?}");
    }
    if amx_checked() {
        let mut y = vec![f32::NAN; rows.len() * out];
        bitlinear_amx(&acts, &tiles, 1.5, &mut y)?;
        assert_eq!(bits(&y), want, "AMX");
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
    // The SIMD kernels (FMA, the same 32 lanes) agree with each other bit for bit.
    let mut fma_results: Vec<(Kernel, Vec<u32>)> = Vec::new();
    for &kernel in Kernel::available() {
        let mut alone = vec![f32::NAN; 17 * vocab];
        for (x, y) in x.chunks(hidden).zip(alone.chunks_mut(vocab)) {
            matmul_bf16(kernel, x, &w, hidden, y)?;
        }
        if kernel != Kernel::Portable {
            let bits: Vec<u32> = alone.iter().map(|v| v.to_bits()).collect();
            if let Some((first, want)) = fma_results.first() {
                assert!(bits == *want, "{kernel:?} differs from {first:?}");
            }
            fma_results.push((kernel, bits));
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
