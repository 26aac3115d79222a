//! CUDA forward passes of the BitLinear ops: the PTX that `build.rs` compiles from `kernels/`,
//! launched on candle's stream. Packed layout and rounding rules: [`crate::quant`].
//!
//! A BitLinear forward is two launches: `quantize_i8_<x dtype>` writes the per-token int8
//! activations (rows zero-padded to `ACT_ALIGN` bytes), scales and row sums to scratch buffers, then
//! `bitlinear_gemv_<out>` (up to [`GEMV_MAX_ROWS`] rows) or `bitlinear_gemm_<out>` computes the
//! exact i32 products with the packed codes and applies both scales.

use super::launch::{self, Launch, ACT_ALIGN, GEMV_MAX_ROWS};
use super::{BitLinearKernelOp, GpuKernel, QuantPart};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};
use std::sync::atomic::{AtomicBool, Ordering};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

static POISON: AtomicBool = AtomicBool::new(false);

/// With `on`, every output buffer of these ops starts as NaN (floats) or `0x80808080` (ints,
/// outside the int8 range and unreachable by an accumulator) instead of whatever the stream
/// allocator hands back, so a test sees any element a kernel failed to write.
pub fn poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed)
}

trait Poison: DeviceRepr + Copy + 'static {
    const POISON: Self;
}
impl Poison for f32 {
    const POISON: Self = f32::NAN;
}
impl Poison for bf16 {
    const POISON: Self = bf16::NAN;
}
impl Poison for f16 {
    const POISON: Self = f16::NAN;
}
impl Poison for i32 {
    const POISON: Self = 0x8080_8080u32 as i32;
}
impl Poison for i8 {
    const POISON: Self = i8::MIN;
}

/// A device buffer that the next launch fills completely.
fn alloc_out<T: Poison>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is uninitialized; every caller passes it to a kernel that writes all
    // `len` elements before anything reads them (poison mode is how the tests check that).
    let mut out = unsafe { dev.alloc::<T>(len) }?;
    if POISON.load(Ordering::Relaxed) {
        dev.memcpy_htod(&vec![T::POISON; len], &mut out)?;
    }
    Ok(out)
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("bitlinear (cuda): {what} must be contiguous"),
    }
}

/// A contiguous float input and the dtype suffix of the kernels that read it.
enum FloatView<'a> {
    F32(CudaView<'a, f32>),
    BF16(CudaView<'a, bf16>),
    F16(CudaView<'a, f16>),
}

impl<'a> FloatView<'a> {
    fn new(s: &'a CudaStorage, l: &Layout) -> Result<Self> {
        Ok(match s.dtype() {
            DType::F32 => Self::F32(view(s, l, "input")?),
            DType::BF16 => Self::BF16(view(s, l, "input")?),
            DType::F16 => Self::F16(view(s, l, "input")?),
            other => bail!("bitlinear (cuda): input must be f32, bf16 or f16, found {other:?}"),
        })
    }

    fn push<'b>(&'b self, b: &mut LaunchArgs<'b>) {
        match self {
            Self::F32(v) => b.arg(v),
            Self::BF16(v) => b.arg(v),
            Self::F16(v) => b.arg(v),
        };
    }
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I32 => "i32",
        other => bail!("bitlinear (cuda): no kernel for {other:?}"),
    })
}

fn as_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("bitlinear (cuda): {what} {v} exceeds i32")))
}

fn launch_cfg(launch: Launch) -> Result<LaunchConfig> {
    let Launch { grid, block } = launch;
    Ok(LaunchConfig {
        grid_dim: (
            as_i32(grid.0, "grid")? as u32,
            as_i32(grid.1, "grid")? as u32,
            1,
        ),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Per-token quantized activations: `xq [n_rows, k_pad]` (Q = i8 for the matmuls, i32 for
/// tests), `scale [n_rows]`, `sum [n_rows]` (Σ xq, turning Σ code·x into Σ value·x).
struct Quantized<Q> {
    xq: CudaSlice<Q>,
    scale: CudaSlice<f32>,
    sum: CudaSlice<i32>,
    k_pad: usize,
}

fn quantize<Q: Poison>(
    x: &CudaStorage,
    x_layout: &Layout,
    n_rows: usize,
    k: usize,
    q_name: &str,
) -> Result<Quantized<Q>> {
    if n_rows == 0 {
        bail!("bitlinear (cuda): empty input")
    }
    let dev = &x.device;
    let k_pad = k.next_multiple_of(ACT_ALIGN);
    let input = FloatView::new(x, x_layout)?;
    let mut out = Quantized {
        xq: alloc_out::<Q>(dev, n_rows * k_pad)?,
        scale: alloc_out::<f32>(dev, n_rows)?,
        sum: alloc_out::<i32>(dev, n_rows)?,
        k_pad,
    };
    let name = format!("quantize_{q_name}_{}", suffix(x.dtype())?);
    let func = dev.get_or_load_custom_func(&name, "candle_bitnet_quantize", ptx::QUANTIZE)?;
    let (k_i, k_pad_i) = (as_i32(k, "in_features")?, as_i32(k_pad, "in_features")?);
    let mut b = func.builder();
    input.push(&mut b);
    b.arg(&mut out.xq)
        .arg(&mut out.scale)
        .arg(&mut out.sum)
        .arg(&k_i)
        .arg(&k_pad_i);
    // SAFETY: argument types and order match `quantize_rows` in kernels/quantize.cu; x holds
    // n_rows·k elements, the outputs the sizes allocated above; one block per row.
    unsafe { b.launch(launch_cfg(launch::quantize(n_rows))?) }.w()?;
    Ok(out)
}

/// `quantize_activations` on CUDA: the int8 values widened to I32 `[n_rows, in]` (padding
/// dropped) or the F32 scales `[n_rows]`.
pub(super) fn quantize_fwd(
    x: &CudaStorage,
    x_layout: &Layout,
    n_rows: usize,
    in_features: usize,
    part: QuantPart,
) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let q = quantize::<i32>(x, x_layout, n_rows, in_features, "i32")?;
    Ok(match part {
        QuantPart::Scales => CudaStorage::wrap_cuda_slice(q.scale, dev),
        QuantPart::Values if q.k_pad == in_features => CudaStorage::wrap_cuda_slice(q.xq, dev),
        QuantPart::Values => {
            // Drop the padding columns; dtod rows keep every kernel-written element checked.
            let mut values = alloc_out::<i32>(&dev, n_rows * in_features)?;
            for t in 0..n_rows {
                let src = q.xq.slice(t * q.k_pad..t * q.k_pad + in_features);
                let mut dst = values.slice_mut(t * in_features..(t + 1) * in_features);
                dev.memcpy_dtod(&src, &mut dst)?;
            }
            CudaStorage::wrap_cuda_slice(values, dev)
        }
    })
}

/// BitLinear on CUDA through `op.kernel`: `[.., out]` in x's dtype, or the raw i32
/// accumulators when `op.raw`.
pub(super) fn bitlinear_fwd(
    op: &BitLinearKernelOp,
    x: &CudaStorage,
    x_layout: &Layout,
    w: &CudaStorage,
    w_layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (n_rows, shape) = op.op.check(x_layout, w_layout)?;
    let (kernel, raw, op) = (op.kernel, op.raw, op.op);
    let dev = x.device.clone();
    let out_dtype = if raw { DType::I32 } else { x.dtype() };
    if n_rows == 0 {
        // No rows in, no rows out, as on the CPU.
        return Ok((dev.zeros_impl(&shape, out_dtype)?, shape));
    }
    let w = view::<u8>(w, w_layout, "packed weight")?;
    let use_gemv = match kernel {
        GpuKernel::Auto => n_rows <= GEMV_MAX_ROWS,
        GpuKernel::Gemv if n_rows > GEMV_MAX_ROWS => {
            bail!("bitlinear (cuda): the gemv kernel takes at most {GEMV_MAX_ROWS} rows, got {n_rows}")
        }
        GpuKernel::Gemv => true,
        GpuKernel::Gemm => false,
    };
    let q = quantize::<i8>(x, x_layout, n_rows, op.in_features, "i8")?;
    let r = op.out_features / 4;
    let (name, module, ptx, cfg) = if use_gemv {
        let cfg = launch_cfg(launch::gemv(r))?;
        ("gemv", "candle_bitnet_gemv", ptx::BITLINEAR_GEMV, cfg)
    } else {
        let cfg = launch_cfg(launch::gemm(r, n_rows)?)?;
        ("gemm", "candle_bitnet_gemm", ptx::BITLINEAR_GEMM, cfg)
    };
    let func = dev.get_or_load_custom_func(
        &format!("bitlinear_{name}_{}", suffix(out_dtype)?),
        module,
        ptx,
    )?;
    let len = n_rows * op.out_features;
    // The kernels index an output row (< out_features) as int.
    as_i32(op.out_features, "out_features")?;
    let args = (
        as_i32(n_rows, "rows")?,
        as_i32(r, "out_features / 4")?,
        as_i32(op.in_features, "in_features")?,
        as_i32(q.k_pad, "in_features")?,
        op.w_div,
    );
    macro_rules! launch {
        ($t:ty) => {{
            let mut y = alloc_out::<$t>(&dev, len)?;
            let mut b = func.builder();
            b.arg(&w).arg(&q.xq).arg(&q.scale).arg(&q.sum).arg(&mut y);
            b.arg(&args.0)
                .arg(&args.1)
                .arg(&args.2)
                .arg(&args.3)
                .arg(&args.4);
            // SAFETY: argument types and order match `bitlinear_gemv`/`bitlinear_gemm` in
            // kernels/; w is [r, in] (checked by BitLinearOp::check), xq/scale/sum come from
            // `quantize` for these n_rows and k_pad, y holds n_rows·out elements.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    let y = match out_dtype {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        DType::I32 => launch!(i32),
        other => bail!("bitlinear (cuda): no output kernel for {other:?}"),
    };
    Ok((y, shape))
}

/// Packed `[r, in]` to dense `[4r, in]` `dtype` weights, `value / w_div`.
pub(super) fn dequantize_fwd(
    w: &CudaStorage,
    w_layout: &Layout,
    w_div: f32,
    dtype: DType,
) -> Result<CudaStorage> {
    let dev = w.device.clone();
    let (r, k) = w_layout.shape().dims2()?;
    let w = view::<u8>(w, w_layout, "packed weight")?;
    let cfg = launch_cfg(launch::dequant(r, k))?;
    // The kernel indexes output rows (< 4r) as int.
    let (r_i, k_i) = (as_i32(r, "packed rows")?, as_i32(k, "in_features")?);
    as_i32(4 * r, "out_features")?;
    macro_rules! launch {
        ($t:ty) => {{
            let func = dev.get_or_load_custom_func(
                &format!("dequant_{}", suffix(dtype)?),
                "candle_bitnet_dequant",
                ptx::DEQUANT,
            )?;
            let mut out = alloc_out::<$t>(&dev, 4 * r * k)?;
            let mut b = func.builder();
            b.arg(&w).arg(&mut out).arg(&r_i).arg(&k_i).arg(&w_div);
            // SAFETY: argument types and order match `dequant` in kernels/dequant.cu; w holds
            // r·k bytes and out 4·r·k elements.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(match dtype {
        DType::F32 => launch!(f32),
        DType::BF16 => launch!(bf16),
        DType::F16 => launch!(f16),
        other => bail!("dequantize (cuda): dtype must be f32, bf16 or f16, found {other:?}"),
    })
}
