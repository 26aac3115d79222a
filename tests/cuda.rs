//! The CUDA kernels against the reference (BitLinear, through the shared harness) and the CPU
//! ops (the rest), and the model on the GPU against the fixture.
//!
//! Every test prints "SKIPPED: <test>: <why>" (uncaptured, so it shows) and passes when the
//! build lacks the `cuda` feature or no GPU can be opened. With a GPU: fresh random inputs of
//! the shared table of shapes (`common/kernels.rs`), outputs poisoned before each launch
//! ([`candle_bitnet::ops::cuda::poison_outputs`]), every element compared bit for bit (int8
//! values, scales, i32 accumulators, scaled outputs in every dtype, decoded weights).

mod common;

use candle_bitnet::ops::{
    argmax_first, bitlinear, bitlinear_accumulate, bitlinear_quantized, bitlinear_with_kernel,
    decode_attention, dequantize, quantize_activations, relu2_rms_norm_quantize, rms_norm_quantize,
    rope_kv_append, GpuKernel, Segment,
};
use candle_bitnet::weights::load_model_dir;
use candle_core::{DType, Device, Result, Tensor};
use common::kernels::{
    activations, check_bitlinear, tensor_bits, Backend, Case, Coverage, Output, Shape, DTYPES,
    ROWS, SHAPES,
};
use common::{
    assert_batch_matches_single, assert_logits_within, fixture_dir, random_activations,
    random_packed, rel_l2, skipped, Expected, PROMPTS,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// GPU 0, or `None` after saying why `test` is skipped.
fn gpu(test: &str) -> Option<Device> {
    if !candle_core::utils::cuda_is_available() {
        skipped(
            test,
            "this build has no CUDA support (build with --features cuda)",
        );
        return None;
    }
    match Device::new_cuda(0).and_then(candle_bitnet::device::for_decoding) {
        Ok(dev) => {
            #[cfg(feature = "cuda")]
            candle_bitnet::ops::cuda::poison_outputs(true);
            Some(dev)
        }
        Err(e) => {
            // The first line: candle appends a backtrace.
            let e = e.to_string();
            let why = format!("no usable CUDA device: {}", e.lines().next().unwrap_or(""));
            skipped(test, &why);
            None
        }
    }
}

fn assert_same(got: &Tensor, want: &Tensor, what: &str) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    common::kernels::assert_same_bits(&tensor_bits(got)?, &tensor_bits(want)?, what);
    Ok(())
}

/// The GPU as a [`Backend`]: the op, each kernel it can choose for the rows, and each of those
/// again on weights 3 bytes into their buffer (in % 16 == 0 would allow 16-byte loads: the
/// guarded loads instead).
struct Cuda(Device);

#[derive(Debug, Clone, Copy)]
enum CudaRun {
    Op,
    Kernel(GpuKernel),
    OffsetWeights(GpuKernel),
}

impl Backend for Cuda {
    type Kernel = CudaRun;

    fn runs(&self, case: &Case) -> Vec<(CudaRun, Output)> {
        let mut kernels = vec![GpuKernel::Auto, GpuKernel::Gemm];
        if case.shape.rows <= 8 {
            kernels.push(GpuKernel::Gemv);
        }
        let mut runs: Vec<_> = DTYPES
            .iter()
            .map(|&dtype| (CudaRun::Op, Output::Scaled(dtype)))
            .collect();
        for kernel in kernels {
            runs.push((CudaRun::Kernel(kernel), Output::Accumulators));
            runs.extend(DTYPES.map(|dtype| (CudaRun::Kernel(kernel), Output::Scaled(dtype))));
            if case.shape.k.is_multiple_of(16) {
                runs.push((CudaRun::OffsetWeights(kernel), Output::Accumulators));
            }
        }
        runs
    }

    fn run(&self, run: &CudaRun, case: &Case, output: Output) -> Result<Vec<u32>> {
        let Shape { rows, k, out } = case.shape;
        let w = match run {
            CudaRun::OffsetWeights(_) => {
                let mut buf = vec![0u8; 3];
                buf.extend_from_slice(&case.packed);
                Tensor::from_vec(buf, 3 + out / 4 * k, &self.0)?
                    .narrow(0, 3, out / 4 * k)?
                    .reshape((out / 4, k))?
            }
            _ => case.w_tensor(&self.0)?,
        };
        let y = match (run, output) {
            (CudaRun::Op, Output::Scaled(dtype)) => {
                bitlinear(&case.x_tensor(dtype, &self.0)?, &w, case.w_div)?
            }
            (CudaRun::Kernel(kernel), Output::Scaled(dtype)) => {
                bitlinear_with_kernel(&case.x_tensor(dtype, &self.0)?, &w, case.w_div, *kernel)?
            }
            (CudaRun::Kernel(kernel) | CudaRun::OffsetWeights(kernel), Output::Accumulators) => {
                bitlinear_accumulate(&case.x_tensor(DType::F32, &self.0)?, &w, *kernel)?
            }
            _ => candle_core::bail!("{run:?} does not give {output:?}"),
        };
        let dtype = match output {
            Output::Accumulators => DType::I32,
            Output::Scaled(dtype) => dtype,
        };
        assert_eq!((y.dims(), y.dtype()), (&[1, rows, out][..], dtype));
        tensor_bits(&y)
    }
}

#[test]
fn quantization_matches_the_cpu_bit_for_bit() -> Result<()> {
    let Some(gpu) = gpu("quantization_matches_the_cpu_bit_for_bit") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(11);
    for &(k, _) in &SHAPES {
        for &n in &ROWS {
            let x = Tensor::from_vec(activations(&mut rng, n, k), (n, k), &Device::Cpu)?;
            for dtype in DTYPES {
                let x = x.to_dtype(dtype)?;
                let (want_q, want_s) = quantize_activations(&x)?;
                let (got_q, got_s) = quantize_activations(&x.to_device(&gpu)?)?;
                let what = format!("quantize {dtype:?} [{n}, {k}]");
                assert_same(&got_q, &want_q, &format!("{what} values"))?;
                assert_same(&got_s, &want_s, &format!("{what} scales"))?;
            }
        }
    }
    Ok(())
}

/// The shared table through the op and every kernel: raw accumulators and outputs in every
/// dtype, against the reference.
#[test]
fn bitlinear_matches_the_reference_bit_for_bit() -> Result<()> {
    let Some(gpu) = gpu("bitlinear_matches_the_reference_bit_for_bit") else {
        return Ok(());
    };
    check_bitlinear(&Cuda(gpu), Coverage::All, 12)
}

/// No rows in, no rows out, on both devices.
#[test]
fn empty_input_gives_an_empty_output() -> Result<()> {
    let Some(gpu) = gpu("empty_input_gives_an_empty_output") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(17);
    let (k, out) = (44, 12);
    let w = Tensor::from_vec(random_packed(&mut rng, out, k)?, (out / 4, k), &Device::Cpu)?;
    let x = Tensor::zeros((0, k), DType::F32, &Device::Cpu)?;
    let want = bitlinear(&x, &w, 1.5)?;
    let got = bitlinear(&x.to_device(&gpu)?, &w.to_device(&gpu)?, 1.5)?;
    assert_eq!(want.dims(), [0, out]);
    assert_eq!(got.dims(), [0, out]);
    Ok(())
}

#[test]
fn dequantize_matches_the_cpu_bit_for_bit() -> Result<()> {
    let Some(gpu) = gpu("dequantize_matches_the_cpu_bit_for_bit") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(15);
    for &(k, out) in &SHAPES {
        let w = Tensor::from_vec(random_packed(&mut rng, out, k)?, (out / 4, k), &Device::Cpu)?;
        let w_div: f32 = rng.random_range(0.5..4.0);
        for dtype in DTYPES {
            let want = dequantize(&w, w_div, dtype)?;
            let got = dequantize(&w.to_device(&gpu)?, w_div, dtype)?;
            assert_same(&got, &want, &format!("dequantize {dtype:?} [{out}, {k}]"))?;
        }
    }
    Ok(())
}

fn random_tensor(rng: &mut StdRng, dims: &[usize], dtype: DType) -> Result<Tensor> {
    let k = dims.last().copied().unwrap_or(1);
    let rows = dims.iter().product::<usize>() / k.max(1);
    Tensor::from_vec(random_activations(rng, rows, k), dims, &Device::Cpu)?.to_dtype(dtype)
}

#[test]
fn rms_norm_quantize_matches_the_cpu_bit_for_bit() -> Result<()> {
    let Some(gpu) = gpu("rms_norm_quantize_matches_the_cpu_bit_for_bit") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(16);
    for dtype in DTYPES {
        for (n, k) in [(1, 1), (3, 257), (1, 2560), (2, 6912), (1, 8200)] {
            let w = random_tensor(&mut rng, &[k], dtype)?;
            for relu2 in [false, true] {
                let width = if relu2 { 2 * k } else { k };
                let x = random_tensor(&mut rng, &[n, width], dtype)?;
                let run = |x: &Tensor, w: &Tensor| match relu2 {
                    false => rms_norm_quantize(x, w, 1e-5),
                    true => relu2_rms_norm_quantize(x, w, 1e-5),
                };
                let want = run(&x, &w)?.to_parts()?;
                let got = run(&x.to_device(&gpu)?, &w.to_device(&gpu)?)?.to_parts()?;
                let what = format!("{dtype:?} [{n}, {k}], relu2 {relu2}");
                assert_eq!(got.0, want.0, "{what}: codes");
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.1), bits(&want.1), "{what}: scales");
                assert_eq!(got.2, want.2, "{what}: sums");
            }
        }
    }
    Ok(())
}

#[test]
fn stacked_bitlinear_with_a_residual_matches_the_cpu_bit_for_bit() -> Result<()> {
    let Some(gpu) = gpu("stacked_bitlinear_with_a_residual_matches_the_cpu_bit_for_bit") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(17);
    // The 2B model's q/k/v and gate/up, and odd sizes.
    let cases: [(usize, &[usize]); 3] = [
        (2560, &[2560, 640, 640]),
        (2560, &[6912, 6912]),
        (130, &[44, 8]),
    ];
    for dtype in DTYPES {
        for (k, outs) in cases {
            let packed: Vec<u8> = outs
                .iter()
                .map(|&o| random_packed(&mut rng, o, k))
                .collect::<Result<Vec<_>>>()?
                .concat();
            let total: usize = outs.iter().sum();
            let w = Tensor::from_vec(packed, (total / 4, k), &Device::Cpu)?;
            let segments: Vec<Segment> = outs
                .iter()
                .map(|&out_features| Segment {
                    out_features,
                    w_div: rng.random_range(0.5..4.0),
                })
                .collect();
            for n in [1, 3] {
                let x = random_tensor(&mut rng, &[n, k], dtype)?;
                let norm = random_tensor(&mut rng, &[k], dtype)?;
                let res = random_tensor(&mut rng, &[n, total], dtype)?;
                let acts = rms_norm_quantize(&x, &norm, 1e-6)?;
                let acts_gpu =
                    rms_norm_quantize(&x.to_device(&gpu)?, &norm.to_device(&gpu)?, 1e-6)?;
                let w_gpu = w.to_device(&gpu)?;
                let what = format!("{dtype:?} rows {n}, {k} → {outs:?}");
                let want = bitlinear_quantized(&acts, &w, &segments, None, dtype)?;
                let got = bitlinear_quantized(&acts_gpu, &w_gpu, &segments, None, dtype)?;
                assert_same(&got, &want, &what)?;
                let want = bitlinear_quantized(&acts, &w, &segments, Some(&res), dtype)?;
                let res_gpu = res.to_device(&gpu)?;
                let got = bitlinear_quantized(&acts_gpu, &w_gpu, &segments, Some(&res_gpu), dtype)?;
                assert_same(&got, &want, &format!("{what} + residual"))?;
            }
        }
    }
    Ok(())
}

/// A `[max_pos, hd]` table of `cos | sin` rows in `dtype`.
fn rope_table(max_pos: usize, hd: usize, dtype: DType) -> Result<Tensor> {
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let inv = Tensor::from_vec(inv, (1, hd / 2), &Device::Cpu)?;
    let pos = Tensor::arange(0u32, max_pos as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((max_pos, 1))?;
    let freqs = pos.matmul(&inv)?;
    Tensor::cat(&[freqs.cos()?, freqs.sin()?], 1)?.to_dtype(dtype)
}

#[test]
fn rope_kv_append_and_decode_attention_match_the_cpu() -> Result<()> {
    let Some(gpu) = gpu("rope_kv_append_and_decode_attention_match_the_cpu") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(18);
    // (query heads, KV heads, head_dim, capacity, position): the 2B model's heads, one split
    // and many.
    for dtype in DTYPES {
        for (n_h, n_kv, hd, cap, pos) in [
            (20, 5, 128, 64, 10),
            (20, 5, 128, 4096, 3000),
            (4, 4, 6, 9, 8),
        ] {
            let table = rope_table(cap, hd, dtype)?;
            let qkv = random_tensor(&mut rng, &[1, (n_h + 2 * n_kv) * hd], dtype)?;
            let cache = random_tensor(&mut rng, &[2, n_kv, cap, hd], dtype)?;
            let cache_gpu = cache.to_device(&gpu)?.copy()?;
            let cache = cache.copy()?;
            let (qkv_gpu, table_gpu) = (qkv.to_device(&gpu)?, table.to_device(&gpu)?);
            rope_kv_append(&cache, &qkv, &table, n_h, pos)?;
            rope_kv_append(&cache_gpu, &qkv_gpu, &table_gpu, n_h, pos)?;
            let what = format!("{dtype:?} heads {n_h}/{n_kv}, hd {hd}, position {pos}");
            assert_same(&cache_gpu, &cache, &format!("rope_kv_append {what}"))?;

            let scale = 1.0 / (hd as f32).sqrt();
            let want = decode_attention(&qkv, &cache, &table, n_h, pos + 1, scale)?;
            let got = decode_attention(&qkv_gpu, &cache_gpu, &table_gpu, n_h, pos + 1, scale)?;
            let (got, want) = (
                got.to_device(&Device::Cpu)?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?,
                want.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            );
            let v_max = cache
                .get(1)?
                .abs()?
                .to_dtype(DType::F32)?
                .max_all()?
                .to_scalar::<f32>()? as f64;
            // The CPU op rounds the exact result to the dtype: up to two ulps apart.
            let ulp = match dtype {
                DType::F32 => f32::EPSILON as f64,
                DType::BF16 => 1.0 / 128.0,
                _ => 1.0 / 1024.0,
            };
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-5 * v_max + 2.0 * ulp * w.abs();
                assert!(
                    (g - w).abs() <= tol,
                    "decode_attention {what}: element {i} {g} vs {w}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn argmax_first_matches_the_cpu() -> Result<()> {
    let Some(gpu) = gpu("argmax_first_matches_the_cpu") else {
        return Ok(());
    };
    let mut rng = StdRng::seed_from_u64(19);
    for dtype in DTYPES {
        for n in [1, 1000, 128_256] {
            let mut x = random_activations(&mut rng, 3, n);
            // Ties far apart in row 0, a NaN before the maximum in row 1, all -inf in row 2.
            x[n / 3] = 50.0;
            x[n - 1] = 50.0;
            x[n] = f32::NAN;
            x[2 * n - 1] = 60.0;
            x[2 * n..].fill(f32::NEG_INFINITY);
            let x = Tensor::from_vec(x, (3, n), &Device::Cpu)?.to_dtype(dtype)?;
            let want = argmax_first(&x)?;
            let got = argmax_first(&x.to_device(&gpu)?)?;
            assert_eq!(
                got.to_device(&Device::Cpu)?.to_vec1::<u32>()?,
                want.to_vec1::<u32>()?,
                "{dtype:?} rows of {n}"
            );
        }
    }
    Ok(())
}

fn ids_tensor(ids: &[u32], dev: &Device) -> Result<Tensor> {
    Tensor::new(ids, dev)?.unsqueeze(0)
}

/// Greedy ids from a prefill then KV-cached single-token steps, and the logits of each step.
fn cached_greedy(
    model: &mut candle_bitnet::BitnetForCausalLM,
    prompt: &[u32],
    steps: usize,
) -> Result<(Vec<u32>, Tensor)> {
    let dev = model.model().device().clone();
    model.clear_kv_cache();
    let mut logits = model.forward(&ids_tensor(prompt, &dev)?, 0)?.squeeze(0)?;
    let (mut ids, mut all) = (vec![], vec![]);
    for step in 0..steps {
        let next = logits.argmax(0)?.to_scalar::<u32>()?;
        ids.push(next);
        all.push(logits.to_device(&Device::Cpu)?);
        logits = model
            .forward(&ids_tensor(&[next], &dev)?, prompt.len() + step)?
            .squeeze(0)?;
    }
    Ok((ids, Tensor::stack(&all, 0)?))
}

/// The logits of a prefill then of KV-cached single-token steps fed `ids` (teacher-forced:
/// every step has the reference's context), and the argmax of each.
fn forced_steps(
    model: &mut candle_bitnet::BitnetForCausalLM,
    prompt: &[u32],
    ids: &[u32],
) -> Result<(Vec<u32>, Tensor)> {
    let dev = model.model().device().clone();
    model.clear_kv_cache();
    let mut logits = model.forward(&ids_tensor(prompt, &dev)?, 0)?.squeeze(0)?;
    let (mut argmax, mut all) = (vec![], vec![]);
    for (step, &next) in ids.iter().enumerate() {
        argmax.push(logits.argmax(0)?.to_scalar::<u32>()?);
        all.push(logits.to_device(&Device::Cpu)?);
        logits = model
            .forward(&ids_tensor(&[next], &dev)?, prompt.len() + step)?
            .squeeze(0)?;
    }
    Ok((argmax, Tensor::stack(&all, 0)?))
}

/// f32 on the GPU: the fixture's f32 tolerances (less the share of exact positions, below),
/// and greedy ids (uncached argmax and KV-cached decode) equal to the CPU path's and to
/// transformers'.
#[test]
fn f32_model_on_cuda_matches_the_cpu_greedy_ids() -> Result<()> {
    let Some(gpu) = gpu("f32_model_on_cuda_matches_the_cpu_greedy_ids") else {
        return Ok(());
    };
    let expected = Expected::load()?;
    let (_, mut cpu_model) = load_model_dir(&fixture_dir(), DType::F32, &Device::Cpu)?;
    let (_, mut model) = load_model_dir(&fixture_dir(), DType::F32, &gpu)?;
    for p in PROMPTS {
        let prompt = expected.ids(p, "prompt_ids");
        let greedy = expected.ids(p, "greedy_ids");
        let full: Vec<u32> = prompt.iter().chain(&greedy).copied().collect();
        model.clear_kv_cache();
        let logits = model
            .forward_all(&ids_tensor(&full, &gpu)?, 0)?
            .squeeze(0)?;
        let logits = logits.to_device(&Device::Cpu)?;
        // The prefill's attention runs through cuBLAS, whose products sum in another order
        // than PyTorch's CPU kernels (which the CPU path follows), so int8 flips come more
        // often and may fall early, moving every later position: no share of exact positions
        // is required, rel-L2, max-abs and the greedy ids hold it.
        assert_logits_within(
            &format!("{p}.full cuda f32"),
            &logits,
            expected.logits(&format!("{p}.full")),
            0.0,
        )?;
        let argmax = logits.argmax(1)?.to_vec1::<u32>()?;
        assert_eq!(
            &argmax[prompt.len() - 1..full.len() - 1],
            &greedy[..],
            "{p}: uncached greedy"
        );

        let (cpu_ids, _) = cached_greedy(&mut cpu_model, &prompt, greedy.len())?;
        let (gpu_ids, step_logits) = cached_greedy(&mut model, &prompt, greedy.len())?;
        let want =
            expected
                .logits(&format!("{p}.full"))
                .narrow(0, prompt.len() - 1, greedy.len())?;
        assert_logits_within(
            &format!("{p} cached steps cuda f32"),
            &step_logits,
            &want,
            0.0,
        )?;
        assert_eq!(gpu_ids, cpu_ids, "{p}: KV-cached greedy ids, CUDA vs CPU");
        assert_eq!(gpu_ids, greedy, "{p}: KV-cached greedy ids vs transformers");
    }
    Ok(())
}

/// bf16 on the GPU (the CUDA compute dtype): logits within the fixture's bf16 tolerance
/// (rel-L2 ≤ 0.15 against the f32 reference). Its greedy ids may legitimately leave the f32
/// ones after a few steps (transformers' own bf16 run does on two of three prompts), so they are
/// printed next to the CPU bf16 path's, and the f32 test above holds the ids to equality.
#[test]
fn bf16_model_on_cuda_is_within_the_bf16_tolerance() -> Result<()> {
    let Some(gpu) = gpu("bf16_model_on_cuda_is_within_the_bf16_tolerance") else {
        return Ok(());
    };
    let expected = Expected::load()?;
    let (_, mut cpu_model) = load_model_dir(&fixture_dir(), DType::BF16, &Device::Cpu)?;
    let (_, mut model) = load_model_dir(&fixture_dir(), DType::BF16, &gpu)?;
    for p in PROMPTS {
        let prompt = expected.ids(p, "prompt_ids");
        let greedy = expected.ids(p, "greedy_ids");
        for (what, ids) in [
            ("prompt", prompt.clone()),
            ("full", [&prompt[..], &greedy[..]].concat()),
        ] {
            model.clear_kv_cache();
            let logits = model.forward_all(&ids_tensor(&ids, &gpu)?, 0)?.squeeze(0)?;
            let err = rel_l2(&logits, expected.logits(&format!("{p}.{what}")))?;
            println!("{p}.{what} cuda bf16: rel_l2 {err:.3e}");
            assert!(err <= 0.15, "{p}.{what}: rel-L2 {err} > 0.15");
        }
        let (_, step_logits) = forced_steps(&mut model, &prompt, &greedy)?;
        let want =
            expected
                .logits(&format!("{p}.full"))
                .narrow(0, prompt.len() - 1, greedy.len())?;
        let err = rel_l2(&step_logits, &want)?;
        assert!(err <= 0.15, "{p} cached steps: rel-L2 {err} > 0.15");
        let (gpu_ids, _) = cached_greedy(&mut model, &prompt, greedy.len())?;
        let (cpu_ids, _) = cached_greedy(&mut cpu_model, &prompt, greedy.len())?;
        let agree = gpu_ids
            .iter()
            .zip(&cpu_ids)
            .take_while(|(a, b)| a == b)
            .count();
        println!(
            "{p}: cuda bf16 greedy {gpu_ids:?}\n{p}: cpu  bf16 greedy {cpu_ids:?} (first {agree} of {} agree)",
            greedy.len()
        );
    }
    Ok(())
}

/// Two prompts in one batch on the GPU, each row against the same prompt alone (strided rows
/// reach the head here, which cuBLAS refuses unless made contiguous).
#[test]
fn a_batch_of_prompts_on_cuda_matches_each_prompt_alone() -> Result<()> {
    let Some(gpu) = gpu("a_batch_of_prompts_on_cuda_matches_each_prompt_alone") else {
        return Ok(());
    };
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
        let (_, mut model) = load_model_dir(&fixture_dir(), dtype, &gpu)?;
        assert_batch_matches_single(&mut model, tol)?;
    }
    Ok(())
}

/// A decoded token runs the fused ops (`docs/cuda-decode.md`): ten launches of ours per layer on
/// a short context, recorded once into a CUDA graph and replayed after, and the same logits as
/// the fused ops' CPU arithmetic on device caches (`new_tensor_kv_cache`) up to f32 rounding
/// (attention sums in another order; a flipped int8 rounding moves a logit by ~1% of the
/// largest), launch by launch and from the graph.
#[test]
// Without the cuda feature `gpu` finds none and the counting below is not compiled.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn a_decoded_token_launches_ten_kernels_a_layer_then_replays_a_graph() -> Result<()> {
    let Some(gpu) = gpu("a_decoded_token_launches_ten_kernels_a_layer_then_replays_a_graph") else {
        return Ok(());
    };
    #[cfg(feature = "cuda")]
    {
        use candle_bitnet::ops::cuda::kernel_launches;
        use candle_bitnet::{model::SeqInput, Logits};
        let expected = Expected::load()?;
        let prompt = expected.ids(PROMPTS[0], "prompt_ids");
        let greedy = expected.ids(PROMPTS[0], "greedy_ids");
        let (cfg, model) = load_model_dir(&fixture_dir(), DType::F32, &gpu)?;
        let (_, cpu_model) = load_model_dir(&fixture_dir(), DType::F32, &Device::Cpu)?;
        let (model, cpu_model) = (model.model().clone(), cpu_model.model().clone());
        let (mut cache, mut cpu_cache) = (model.new_kv_cache(), cpu_model.new_tensor_kv_cache());
        model.forward(&prompt, &mut cache, Logits::Last)?;
        cpu_model.forward(&prompt, &mut cpu_cache, Logits::Last)?;
        // Launch by launch (the step without its CUDA graph), then through the graph: the
        // cache's first graph step runs launch by launch too (warming what the capture needs),
        // the second is captured (its launches recorded), the later ones replay (none).
        for (i, &next) in greedy[..8].iter().enumerate() {
            let before = kernel_launches();
            let logits = if i < 4 {
                let mut seq = [SeqInput {
                    ids: &[next],
                    cache: &mut cache,
                    logits: Logits::Last,
                }];
                model
                    .forward_batch_general(&mut seq)?
                    .remove(0)
                    .expect("logits")
            } else {
                model.forward(&[next], &mut cache, Logits::Last)?
            };
            let launches = kernel_launches() - before;
            println!(
                "decoded token {i}: {launches} launches of ours for {} layers",
                cfg.num_hidden_layers
            );
            // The captured attention reads its length from device memory, so its grid covers
            // the whole capacity and always splits: one combine launch more a layer.
            let want_launches = match i {
                0..=4 => 10 * cfg.num_hidden_layers,
                5 => 11 * cfg.num_hidden_layers,
                _ => 0,
            };
            assert_eq!(launches, want_launches, "launches of token {i}");
            let want = cpu_model.forward(&[next], &mut cpu_cache, Logits::Last)?;
            let err = rel_l2(&logits.to_device(&Device::Cpu)?, &want)?;
            println!("  vs the fused ops' CPU arithmetic: rel-L2 {err:.2e}");
            assert!(
                err <= 1e-2,
                "fused decode on CUDA vs its CPU arithmetic: rel-L2 {err}"
            );
        }
    }
    Ok(())
}
