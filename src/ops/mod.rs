//! The BitLinear custom op: `y = (int8(x) · W_ternary) / (w_div · s_x)` on packed weights.
//!
//! One op, one entry point ([`bitlinear`]), reached on every device: `cpu_fwd` runs
//! [`cpu::bitlinear`]; `cuda_fwd` runs the kernels in `kernels/`. Both quantize the activations
//! per token exactly like [`crate::quant::quantize_activations`] and accumulate in i32, so they
//! agree bit for bit before the final scale.

/// Runs `$body` with `$t` the Rust type of a float `DType`, or fails naming `$what`.
macro_rules! with_float {
    ($dtype:expr, $what:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => candle_core::bail!("{}: expected f32, bf16 or f16, found {other:?}", $what),
        }
    };
}

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod decode;
// Launch geometry and the BitLinear stages are test plumbing: public only with the `testing`
// feature, which the crate's own tests turn on (a dev-dependency on itself).
#[cfg(feature = "testing")]
pub mod launch;
#[cfg(all(feature = "cuda", not(feature = "testing")))]
mod launch;
mod launch_constants;
pub mod reference;
mod stages;

pub use cpu::Int8Head;
#[cfg(feature = "testing")]
pub use decode::decode_op_calls;
pub use decode::{
    argmax_first, bitlinear_quantized, bitlinear_quantized_tiles, decode_attention,
    relu2_rms_norm_quantize, rms_norm_quantize, rope_kv_append, QuantizedActivations, Segment,
};
pub(crate) use decode::{decode_attention_at, rope_kv_append_at, MAX_SEGMENTS};
pub(crate) use launch_constants::{ATTN_MAX_GROUP, ATTN_MAX_HEAD_DIM, GEMV_MAX_ROWS};
#[cfg(feature = "cuda")]
use stages::BitLinearKernelOp;
#[cfg(all(feature = "cuda", not(feature = "testing")))]
use stages::GpuKernel;
#[cfg(feature = "testing")]
pub use stages::{bitlinear_accumulate, bitlinear_with_kernel, GpuKernel};
pub use stages::{dequantize, quantize_activations};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::borrow::Cow;
use std::sync::Arc;

/// Packed ternary weights `[out/4, in]` (U8) times activations `[.., in]` (f32/bf16/f16).
#[derive(Debug, Clone, Copy)]
pub struct BitLinearOp {
    pub in_features: usize,
    pub out_features: usize,
    /// Divisor of the i32 accumulator besides the activation scale (see [`crate::quant`]).
    pub w_div: f32,
}

impl BitLinearOp {
    fn check(&self, x: &Layout, w: &Layout) -> Result<(usize, Shape)> {
        let (r, k) = w.shape().dims2()?;
        if r == 0 || k == 0 {
            bail!("bitlinear: empty packed weight {:?}", w.shape().dims())
        }
        if r * 4 != self.out_features || k != self.in_features {
            bail!(
                "bitlinear: packed weight shape {:?}, expected [{}, {}]",
                w.shape().dims(),
                self.out_features / 4,
                self.in_features
            )
        }
        let dims = x.shape().dims();
        if dims.last() != Some(&self.in_features) {
            bail!(
                "bitlinear: input shape {dims:?}, last dimension must be {}",
                self.in_features
            )
        }
        let n_rows = x.shape().elem_count() / self.in_features;
        let mut out = dims.to_vec();
        *out.last_mut().expect("checked non-empty above") = self.out_features;
        Ok((n_rows, Shape::from(out)))
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("input must be contiguous"),
    }
}

/// A float input as f32, borrowed when it already is.
fn to_f32<'a>(x: &'a CpuStorage, layout: &Layout) -> Result<Cow<'a, [f32]>> {
    Ok(match x {
        CpuStorage::F32(v) => contiguous(v, layout)?.into(),
        CpuStorage::BF16(v) => contiguous(v, layout)?.iter().map(|v| v.to_f32()).collect(),
        CpuStorage::F16(v) => contiguous(v, layout)?.iter().map(|v| v.to_f32()).collect(),
        other => bail!("input must be f32, bf16 or f16, found {:?}", other.dtype()),
    })
}

fn from_f32(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        other => bail!("dtype must be f32, bf16 or f16, found {other:?}"),
    })
}

impl CustomOp2 for BitLinearOp {
    fn name(&self) -> &'static str {
        "bitlinear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n_rows, out_shape) = self.check(x_layout, w_layout)?;
        let CpuStorage::U8(w) = w else {
            bail!("bitlinear: packed weight must be U8, found {:?}", w.dtype())
        };
        let w = cpu::TernaryTiles::from_packed(
            contiguous(w, w_layout)?,
            self.in_features,
            self.out_features,
        )?;
        let y = cpu::bitlinear_storage(x, x_layout, n_rows, &w, &[self.w_div])?;
        Ok((y, out_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        w: &candle_core::CudaStorage,
        w_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let op = BitLinearKernelOp {
            op: *self,
            kernel: GpuKernel::Auto,
            raw: false,
        };
        cuda::bitlinear_fwd(&op, x, x_layout, w, w_layout)
    }
}

/// BitLinear of `x: [.., in]` with packed `weight: [out/4, in]` (U8): `[.., out]` in x's dtype.
/// The CPU converts the weight to [`cpu::TernaryTiles`] on every call: layers hold the tiles
/// and call [`bitlinear_tiles`].
pub fn bitlinear(x: &Tensor, weight: &Tensor, w_div: f32) -> Result<Tensor> {
    let (r, in_features) = weight.dims2()?;
    if weight.dtype() != DType::U8 {
        bail!(
            "bitlinear: packed weight must be U8, found {:?}",
            weight.dtype()
        )
    }
    let op = BitLinearOp {
        in_features,
        out_features: 4 * r,
        w_div,
    };
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &op)
}

/// BitLinear of a CPU `x: [.., in]` (f32/bf16/f16) with weights in the CPU tile layout:
/// `[.., out]` in x's dtype.
pub fn bitlinear_tiles(x: &Tensor, w: &Arc<cpu::TernaryTiles>, w_div: f32) -> Result<Tensor> {
    bitlinear_segments(x, w, &[w_div])
}

/// Several projections of the same CPU `x: [.., in]` in one op, weights from
/// [`cpu::TernaryTiles::from_segments`], one `w_div` each: `x` is quantized once, and the
/// outputs come side by side, `[.., Σ out]` in x's dtype (split them with `narrow`).
pub fn bitlinear_segments(
    x: &Tensor,
    w: &Arc<cpu::TernaryTiles>,
    w_divs: &[f32],
) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&cpu::BitLinearTilesOp {
        w: w.clone(),
        w_divs: w_divs.to_vec(),
    })
}

/// RMSNorm of a CPU f32 `x: [.., in]` by `norm_weight: [in]` (f32), fused with the int8
/// quantization of [`bitlinear_segments`]: bit for bit the same as [`crate::norm::RmsNorm`]
/// followed by it, without the normalized tensor.
pub fn rms_norm_bitlinear(
    x: &Tensor,
    norm_weight: &Tensor,
    eps: f64,
    w: &Arc<cpu::TernaryTiles>,
    w_divs: &[f32],
) -> Result<Tensor> {
    let op = cpu::RmsNormBitLinearOp {
        eps: eps as f32,
        w: w.clone(),
        w_divs: w_divs.to_vec(),
    };
    x.contiguous()?
        .apply_op2_no_bwd(&norm_weight.contiguous()?, &op)
}

/// The LM head through an [`Int8Head`] (opt-in, per-row int8 weights): `x: [.., hidden]`
/// (f32/bf16/f16) to `[.., vocab]` f32 logits. CPU only.
pub fn matmul_int8_head(x: &Tensor, head: &Arc<Int8Head>) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&cpu::MatmulInt8Head(head.clone()))
}

/// The LM head through a [`cpu::CompactBf16Head`] (the bf16 head's bits, 3/4 of its bytes):
/// `x: [.., hidden]` f32 to `[.., vocab]` f32 logits. CPU with AVX2 or AVX-512 only.
pub fn matmul_compact_head(x: &Tensor, head: &Arc<cpu::CompactBf16Head>) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1_no_bwd(&cpu::MatmulCompactHead(head.clone()))
}

/// The LM head `x: [.., hidden]` (f32) times `w: [vocab, hidden]` (bf16) transposed:
/// `[.., vocab]` f32, streaming the bf16 matrix. CPU only ([`cpu::MatmulBf16Weight`]); on CUDA
/// use `x.to_dtype(DType::BF16)?.matmul(&w.t()?)`.
pub fn matmul_bf16_weight(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &cpu::MatmulBf16Weight)
}

/// A tensor's values widened to f32, as bits: what the unit tests compare kernels by.
#[cfg(test)]
pub(crate) fn f32_bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

/// `n` floats in `[-scale / 2, scale / 2)` from a small LCG seeded with `seed`: test inputs
/// without a dev-dependency.
#[cfg(test)]
pub(crate) fn random_floats(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}
