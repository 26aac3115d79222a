//! CUDA forward passes of the ops: the PTX that `build.rs` compiles from `kernels/`, launched on
//! candle's stream, every launch's result checked. Packed layout and rounding rules:
//! [`crate::quant`].
//!
//! A BitLinear forward is two launches: `quantize_i8_<x dtype>` writes the per-token int8
//! activations (rows zero-padded to `ACT_ALIGN` bytes), scales and row sums to scratch buffers, then
//! `bitlinear_gemv_<out>` (up to `GEMV_MAX_ROWS` rows) or `bitlinear_gemm_<out>` computes the
//! exact i32 products with the packed codes and applies both scales. The decode ops
//! (`ops::decode`) are one launch each (attention over a long cache: two).

use super::decode::{BitLinearQuantizedOp, DecodeAttentionOp, RmsNormQuantizeOp, RopeKvAppendOp};
use super::launch::{self, Launch, ACT_ALIGN, GEMV_MAX_ROWS};
use super::stages::QuantPart;
use super::{BitLinearKernelOp, GpuKernel};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaGraph, CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};
use std::sync::atomic::{AtomicBool, Ordering};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

static POISON: AtomicBool = AtomicBool::new(false);

/// Records the work `record` issues on `device`'s stream as a CUDA graph, instantiated to free
/// what it allocates at each launch. Nothing runs while recording. Kernels must be loaded and
/// pool memory at hand beforehand: neither may happen during a capture.
pub fn capture_graph(
    device: &CudaDevice,
    record: impl FnOnce() -> Result<()>,
) -> Result<CudaGraph> {
    device.synchronize()?;
    let stream = device.cuda_stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(candle_core::Error::wrap)?;
    let recorded = record();
    // Always end the capture, or the stream stays in capture mode.
    let graph = stream.end_capture(
        sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
    );
    recorded?;
    match graph.map_err(candle_core::Error::wrap)? {
        Some(graph) => Ok(graph),
        None => bail!("the CUDA graph capture recorded no work"),
    }
}

/// Test plumbing: with `on`, every output buffer of these ops starts as NaN (floats: all bytes
/// 0xFF) or `0x80` in every byte (ints: `0x80808080` is outside the int8 range and unreachable by
/// an accumulator) instead of whatever the stream allocator hands back, so a test sees any
/// element a kernel failed to write. A memset on the stream: a CUDA graph captures it too.
#[cfg(feature = "testing")]
pub fn poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed)
}

trait Poison: DeviceRepr + Copy + 'static {
    const POISON_BYTE: u8;
}
impl Poison for f32 {
    const POISON_BYTE: u8 = 0xFF;
}
impl Poison for bf16 {
    const POISON_BYTE: u8 = 0xFF;
}
impl Poison for f16 {
    const POISON_BYTE: u8 = 0xFF;
}
impl Poison for i32 {
    const POISON_BYTE: u8 = 0x80;
}
impl Poison for i8 {
    const POISON_BYTE: u8 = 0x80;
}
impl Poison for u8 {
    const POISON_BYTE: u8 = 0x80;
}
impl Poison for u32 {
    const POISON_BYTE: u8 = 0xFF;
}

/// A device buffer that the next launch fills completely.
fn alloc_out<T: Poison>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the memory is uninitialized; every caller passes it to a kernel that writes all
    // `len` elements before anything reads them (poison mode is how the tests check that).
    let mut out = unsafe { dev.alloc::<T>(len) }?;
    if POISON.load(Ordering::Relaxed) && len > 0 {
        use candle_core::cuda_backend::cudarc::driver::{result, DevicePtrMut};
        let stream = dev.cuda_stream();
        let (ptr, _written) = out.device_ptr_mut(&stream);
        // SAFETY: ptr addresses the len·size_of::<T>() bytes just allocated on this stream.
        unsafe {
            result::memset_d8_async(
                ptr,
                T::POISON_BYTE,
                len * size_of::<T>(),
                stream.cu_stream(),
            )
        }
        .w()?;
    }
    Ok(out)
}

/// The device address of element `i` of a contiguous U32 CUDA tensor: what a kernel's
/// `const int*` argument reads, for values a CUDA graph's replays take from device memory.
pub(crate) fn u32_address(t: &candle_core::Tensor, i: usize) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        bail!("u32_address: not a CUDA tensor")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) if start + i < end => {
            let stream = s.device.cuda_stream();
            let (ptr, _read) = s.as_cuda_slice::<u32>()?.device_ptr(&stream);
            Ok(ptr + ((start + i) * size_of::<u32>()) as u64)
        }
        _ => bail!(
            "u32_address: element {i} of a {:?} tensor",
            layout.shape().dims()
        ),
    }
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

thread_local! {
    static LAUNCHES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Kernels of this crate launched by the calling thread so far (candle launches on the thread
/// that runs the op, so a forward's count is the difference around it). Each launch takes its
/// config from [`launch_cfg`], which counts it.
pub fn kernel_launches() -> usize {
    LAUNCHES.with(|n| n.get())
}

fn launch_cfg(launch: Launch) -> Result<LaunchConfig> {
    LAUNCHES.with(|n| n.set(n.get() + 1));
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
        as_i32(r, "packed rows")?;
        let name = launch::gemv_kernel(n_rows);
        (name, "candle_bitnet_gemv", ptx::BITLINEAR_GEMV, cfg)
    } else {
        let cfg = launch_cfg(launch::gemm(r, n_rows)?)?;
        (
            "bitlinear_gemm",
            "candle_bitnet_gemm",
            ptx::BITLINEAR_GEMM,
            cfg,
        )
    };
    let func =
        dev.get_or_load_custom_func(&format!("{name}_{}", suffix(out_dtype)?), module, ptx)?;
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
    // The gemv's single segment and no residual.
    let (no_residual, r_i) = (0u64, args.1);
    macro_rules! launch {
        ($t:ty) => {{
            let mut y = alloc_out::<$t>(&dev, len)?;
            let mut b = func.builder();
            b.arg(&w).arg(&q.xq).arg(&q.scale).arg(&q.sum).arg(&mut y);
            if use_gemv {
                b.arg(&no_residual);
            }
            b.arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3);
            if use_gemv {
                b.arg(&r_i).arg(&r_i).arg(&args.4).arg(&args.4);
            }
            b.arg(&args.4);
            // SAFETY: argument types and order match `bitlinear_gemv`/`bitlinear_gemm` in
            // kernels/ (a null residual is a 0 pointer); w is [r, in] (checked by
            // BitLinearOp::check), xq/scale/sum come from `quantize` for these n_rows and
            // k_pad, y holds n_rows·out elements.
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

/// `rms_norm_quantize_<T>` / `relu2_rms_norm_quantize_<T>`: the [`super::QuantizedActivations`]
/// bytes (codes, scales, sums) of `rows` rows.
pub(super) fn rms_norm_quantize_fwd(
    op: &RmsNormQuantizeOp,
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    rows: usize,
    k: usize,
) -> Result<CudaStorage> {
    let dev = x.device.clone();
    if w.dtype() != x.dtype() {
        bail!(
            "rms_norm_quantize (cuda): input {:?}, weight {:?}",
            x.dtype(),
            w.dtype()
        )
    }
    let k_pad = k.next_multiple_of(ACT_ALIGN);
    let mut out = alloc_out::<u8>(&dev, rows * (k_pad + 8))?;
    if rows == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(out, dev));
    }
    let prefix = if op.relu2 { "relu2_" } else { "" };
    let name = format!("{prefix}rms_norm_quantize_{}", suffix(x.dtype())?);
    let func = dev.get_or_load_custom_func(
        &name,
        "candle_bitnet_rms_norm_quantize",
        ptx::RMS_NORM_QUANTIZE,
    )?;
    let (k_i, k_pad_i) = (as_i32(k, "norm size")?, as_i32(k_pad, "norm size")?);
    as_i32(2 * rows * k, "input elements")?;
    {
        let (mut codes, mut rest) = out.split_at_mut(rows * k_pad);
        let (mut scales, mut sums) = rest.split_at_mut(4 * rows);
        with_float!(x.dtype(), "rms_norm_quantize (cuda)", T => {
            let (xv, wv) = (view::<T>(x, xl, "input")?, view::<T>(w, wl, "norm weight")?);
            let mut b = func.builder();
            b.arg(&xv).arg(&wv).arg(&mut codes).arg(&mut scales).arg(&mut sums);
            b.arg(&k_i).arg(&k_pad_i).arg(&op.eps);
            // SAFETY: argument types and order match RMS_NORM_QUANTIZE_OP in
            // kernels/rms_norm_quantize.cu (the byte views are the i8 codes, f32 scales and
            // i32 sums of `rows` rows, 4-byte aligned as rows·k_pad is a multiple of 16); x
            // holds rows·k (rows·2k for relu2) elements, checked by RmsNormQuantizeOp::rows.
            unsafe { b.launch(launch_cfg(launch::rms_norm_quantize(rows))?) }.w()?;
        });
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `bitlinear_gemv(1)_<dtype>`: up to [`GEMV_MAX_ROWS`] rows (decode; prefill keeps
/// [`super::bitlinear`]), every segment in one launch.
pub(super) fn bitlinear_quantized_fwd(
    op: &BitLinearQuantizedOp,
    acts: &CudaStorage,
    al: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    residual: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    let dev = acts.device.clone();
    let rows = op.rows;
    if rows > GEMV_MAX_ROWS {
        bail!("bitlinear_quantized (cuda): at most {GEMV_MAX_ROWS} rows (decode), got {rows}")
    }
    let (k, out) = (op.in_features, op.out_features());
    let (k_pad, r) = (k.next_multiple_of(ACT_ALIGN), out / 4);
    let len = rows * out;
    if rows == 0 {
        return dev.zeros_impl(&Shape::from((0, out)), op.dtype);
    }
    let bytes = view::<u8>(acts, al, "quantized activations")?;
    let (codes, scales, sums) = (
        bytes.slice(..rows * k_pad),
        bytes.slice(rows * k_pad..rows * (k_pad + 4)),
        bytes.slice(rows * (k_pad + 4)..),
    );
    let w = view::<u8>(w, wl, "packed weight")?;
    let func = dev.get_or_load_custom_func(
        &format!("{}_{}", launch::gemv_kernel(rows), suffix(op.dtype)?),
        "candle_bitnet_gemv",
        ptx::BITLINEAR_GEMV,
    )?;
    as_i32(out, "out_features")?;
    let (rows_i, r_i, k_i, k_pad_i) = (
        as_i32(rows, "rows")?,
        as_i32(r, "packed rows")?,
        as_i32(k, "in_features")?,
        as_i32(k_pad, "in_features")?,
    );
    // Segment ends in packed rows, and each segment's w_div (unused ones repeat the last).
    let mut ends = [r_i; 2];
    let mut w_divs = [op.segments[op.segments.len() - 1].w_div; 3];
    let mut end = 0;
    for (i, seg) in op.segments.iter().enumerate() {
        end += seg.out_features / 4;
        if i < 2 {
            ends[i] = as_i32(end, "packed rows")?;
        }
        w_divs[i] = seg.w_div;
    }
    let null = 0u64;
    with_float!(op.dtype, "bitlinear_quantized (cuda)", T => {
        let mut y = alloc_out::<T>(&dev, len)?;
        let res = residual.map(|(s, l)| view::<T>(s, l, "residual")).transpose()?;
        let mut b = func.builder();
        b.arg(&w).arg(&codes).arg(&scales).arg(&sums).arg(&mut y);
        match &res {
            Some(res) => b.arg(res),
            None => b.arg(&null),
        };
        b.arg(&rows_i).arg(&r_i).arg(&k_i).arg(&k_pad_i).arg(&ends[0]).arg(&ends[1]);
        b.arg(&w_divs[0]).arg(&w_divs[1]).arg(&w_divs[2]);
        // SAFETY: argument types and order match GEMV_OP in kernels/bitlinear_gemv.cu; w is
        // [r, k] and the activation bytes hold rows·k_pad codes, rows scales and rows sums
        // (BitLinearQuantizedOp::check), the residual (or null) and y rows·4r elements.
        unsafe { b.launch(launch_cfg(launch::gemv(r))?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

/// `rope_kv_append_<T>`: writes the rotated keys and the values into `cache` in place.
pub(super) fn rope_kv_append_fwd(
    op: &RopeKvAppendOp,
    cache: &mut CudaStorage,
    cl: &Layout,
    qkv: &CudaStorage,
    ql: &Layout,
    rope: &CudaStorage,
    rl: &Layout,
) -> Result<()> {
    if op.n_tok == 0 {
        return Ok(());
    }
    let dev = qkv.device.clone();
    let dtype = cache.dtype();
    if qkv.dtype() != dtype || rope.dtype() != dtype {
        bail!("rope_kv_append (cuda): cache, qkv and rope must share a dtype")
    }
    let func = dev.get_or_load_custom_func(
        &format!("rope_kv_append_{}", suffix(dtype)?),
        "candle_bitnet_rope_kv",
        ptx::ROPE_KV,
    )?;
    let args = [
        as_i32(op.n_heads, "heads")?,
        as_i32(op.n_kv_heads, "KV heads")?,
        as_i32(op.head_dim, "head_dim")?,
        as_i32(op.capacity, "cache capacity")?,
        as_i32(op.pos0, "position")?,
    ];
    as_i32(cl.shape().elem_count(), "cache elements")?;
    let cfg = launch_cfg(launch::rope_kv_append(op.n_kv_heads, op.n_tok)?)?;
    let Some((c0, c1)) = cl.contiguous_offsets() else {
        bail!("rope_kv_append (cuda): the KV cache must be contiguous")
    };
    with_float!(dtype, "rope_kv_append (cuda)", T => {
        let (qv, rv) = (view::<T>(qkv, ql, "qkv")?, view::<T>(rope, rl, "rope table")?);
        let mut cv = cache.as_cuda_slice_mut::<T>()?.slice_mut(c0..c1);
        let mut b = func.builder();
        b.arg(&qv).arg(&rv).arg(&mut cv);
        for a in &args {
            b.arg(a);
        }
        let pos0_at = op.pos0_at.unwrap_or(0);
        b.arg(&pos0_at);
        // SAFETY: argument types and order match ROPE_KV_OP in kernels/rope_kv.cu; the cache
        // is [2, n_kv, cap, hd], qkv n_tok rows of (n_h + 2 n_kv)·hd and the rope table covers
        // positions pos0..pos0 + n_tok < cap (RopeKvAppendOp::check; with pos0_at, an i32 in
        // device memory, its writer keeps it below the capacity).
        unsafe { b.launch(cfg) }.w()?;
    });
    Ok(())
}

/// `attention_decode_<T>`, and `attention_combine_<T>` when the cache is split.
pub(super) fn decode_attention_fwd(
    op: &DecodeAttentionOp,
    qkv: &CudaStorage,
    ql: &Layout,
    cache: &CudaStorage,
    cl: &Layout,
    rope: &CudaStorage,
    rl: &Layout,
) -> Result<CudaStorage> {
    use super::launch_constants::{ATTN_MAX_GROUP, ATTN_MAX_HEAD_DIM};
    let dev = qkv.device.clone();
    let s = op.shape;
    let dtype = qkv.dtype();
    if cache.dtype() != dtype || rope.dtype() != dtype {
        bail!("decode_attention (cuda): qkv, cache and rope must share a dtype")
    }
    let group = s.n_heads / s.n_kv_heads;
    if group > ATTN_MAX_GROUP || s.head_dim > ATTN_MAX_HEAD_DIM || !s.head_dim.is_multiple_of(2) {
        bail!(
            "decode_attention (cuda): {group} query heads per KV head (at most {ATTN_MAX_GROUP}), \
             head_dim {} (even, at most {ATTN_MAX_HEAD_DIM})",
            s.head_dim
        )
    }
    // With len in device memory, splits over the whole capacity: any len fits the launch.
    let (splits, split_len) = launch::attention_splits(match op.len_at {
        Some(_) => s.capacity,
        None => s.len,
    });
    let suffix = suffix(dtype)?;
    let decode = dev.get_or_load_custom_func(
        &format!("attention_decode_{suffix}"),
        "candle_bitnet_attention",
        ptx::ATTENTION,
    )?;
    as_i32(cl.shape().elem_count(), "cache elements")?;
    let ints = [
        as_i32(s.n_heads, "heads")?,
        as_i32(s.n_kv_heads, "KV heads")?,
        as_i32(s.head_dim, "head_dim")?,
        as_i32(s.capacity, "cache capacity")?,
        as_i32(s.len, "positions")?,
        as_i32(split_len, "split")?,
    ];
    let n = s.n_heads * s.head_dim;
    let null = 0u64;
    with_float!(dtype, "decode_attention (cuda)", T => {
        let (qv, cv, rv) = (
            view::<T>(qkv, ql, "qkv")?,
            view::<T>(cache, cl, "KV cache")?,
            view::<T>(rope, rl, "rope table")?,
        );
        let mut y = alloc_out::<T>(&dev, n)?;
        let mut part = (splits > 1)
            .then(|| alloc_out::<f32>(&dev, s.n_heads * splits * (s.head_dim + 2)))
            .transpose()?;
        {
            let mut b = decode.builder();
            b.arg(&qv).arg(&cv).arg(&rv);
            match &mut part {
                // One split writes y; several write their partial results only.
                None => b.arg(&mut y).arg(&null),
                Some(part) => b.arg(&null).arg(part),
            };
            for a in &ints {
                b.arg(a);
            }
            let len_at = op.len_at.unwrap_or(0);
            b.arg(&op.scale).arg(&len_at);
            // SAFETY: argument types and order match ATTENTION_OP in kernels/attention.cu;
            // shapes checked by DecodeAttentionOp::check and above (group, head_dim); y holds
            // n_h·hd elements, part n_h·splits·(hd + 2); len_at, when set, is an i32 in device
            // memory that its writer keeps within 1..=capacity.
            unsafe { b.launch(launch_cfg(launch::attention_decode(s.n_kv_heads, splits))?) }.w()?;
        }
        if let Some(part) = &part {
            let combine = dev.get_or_load_custom_func(
                &format!("attention_combine_{suffix}"),
                "candle_bitnet_attention",
                ptx::ATTENTION,
            )?;
            let (hd_i, splits_i) = (ints[2], as_i32(splits, "splits")?);
            let mut b = combine.builder();
            b.arg(part).arg(&mut y).arg(&hd_i).arg(&splits_i);
            // SAFETY: argument types and order match ATTENTION_OP's combine kernel; part was
            // written by the launch above for these shapes.
            unsafe { b.launch(launch_cfg(launch::attention_combine(s.n_heads))?) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

/// `argmax_<T>` over `rows` rows of `n`: U32 ids.
pub(super) fn argmax_fwd(
    x: &CudaStorage,
    l: &Layout,
    rows: usize,
    n: usize,
) -> Result<CudaStorage> {
    let dev = x.device.clone();
    let mut ids = alloc_out::<u32>(&dev, rows)?;
    if rows == 0 {
        return Ok(CudaStorage::wrap_cuda_slice(ids, dev));
    }
    let func = dev.get_or_load_custom_func(
        &format!("argmax_{}", suffix(x.dtype())?),
        "candle_bitnet_argmax",
        ptx::ARGMAX,
    )?;
    let n_i = as_i32(n, "row length")?;
    let input = FloatView::new(x, l)?;
    let mut b = func.builder();
    input.push(&mut b);
    b.arg(&mut ids).arg(&n_i);
    // SAFETY: argument types and order match ARGMAX_OP in kernels/argmax.cu; x holds rows·n
    // elements, ids rows.
    unsafe { b.launch(launch_cfg(launch::argmax(rows))?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(ids, dev))
}
