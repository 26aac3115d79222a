//! The stages of BitLinear as separate ops, on every device, so that tests can compare devices
//! stage by stage (int8 activations and scales, raw i32 accumulators, each CUDA kernel) and the
//! dense baseline can decode weights where they live. They run the same kernels as
//! [`super::bitlinear`]; on the CPU they run the reference arithmetic of [`crate::quant`].
//! The kernel choice and the raw accumulators are test plumbing, public with the `testing`
//! feature only.

#[cfg(any(feature = "cuda", feature = "testing"))]
use super::BitLinearOp;
use super::{contiguous, from_f32, to_f32};
use crate::quant::{quantize_activations as quantize_row, unpack_ternary};
use candle_core::backend::BackendStorage;
#[cfg(any(feature = "cuda", feature = "testing"))]
use candle_core::CustomOp2;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

#[cfg(any(feature = "cuda", feature = "testing"))]
/// Which BitLinear kernel runs on CUDA; the CPU ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Without `testing` only the model's choice (Auto) is made.
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
pub enum GpuKernel {
    /// Mat-vec up to 8 rows, tiled mat-mat beyond: what [`super::bitlinear`] runs.
    Auto,
    /// The mat-vec kernel (at most 8 rows).
    Gemv,
    /// The tiled mat-mat kernel (any number of rows).
    Gemm,
}

/// Which output of the activation quantization a [`QuantizeOp`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuantPart {
    /// The int8 values, widened to I32 `[.., in]`.
    Values,
    /// The per-token scales `s_x`, F32 `[..]`.
    Scales,
}

/// Per-token absmax int8 quantization of `x: [.., in]` (f32/bf16/f16).
#[derive(Debug, Clone, Copy)]
struct QuantizeOp {
    in_features: usize,
    part: QuantPart,
}

#[cfg(any(feature = "cuda", feature = "testing"))]
/// BitLinear through a chosen CUDA kernel, optionally stopping at the raw i32 accumulators.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BitLinearKernelOp {
    pub op: BitLinearOp,
    // Read by the CUDA forward only.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub kernel: GpuKernel,
    /// Output I32 `Σ W·x_q` instead of the scaled result in x's dtype.
    pub raw: bool,
}

/// Packed `[out/4, in]` U8 weights to dense `[out, in]` `dtype` values `W / w_div`.
#[derive(Debug, Clone, Copy)]
struct DequantizeOp {
    w_div: f32,
    dtype: DType,
}

fn rows_of(layout: &Layout, in_features: usize) -> Result<usize> {
    if in_features == 0 || layout.shape().dims().last() != Some(&in_features) {
        bail!(
            "input shape {:?}, last dimension must be {in_features}",
            layout.shape().dims()
        )
    }
    Ok(layout.shape().elem_count() / in_features)
}

/// Per-token int8 values and scales, by the reference.
fn quantize_cpu(x: &[f32], in_features: usize) -> (Vec<i8>, Vec<f32>) {
    let mut values = vec![0i8; x.len()];
    let scales = x
        .chunks_exact(in_features)
        .zip(values.chunks_exact_mut(in_features))
        .map(|(row, q)| quantize_row(row, q))
        .collect();
    (values, scales)
}

impl CustomOp1 for QuantizeOp {
    fn name(&self) -> &'static str {
        "bitnet-quantize"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        rows_of(layout, self.in_features)?;
        let (values, scales) = quantize_cpu(&to_f32(x, layout)?, self.in_features);
        Ok(match self.part {
            QuantPart::Values => (
                CpuStorage::I32(values.into_iter().map(i32::from).collect()),
                layout.shape().clone(),
            ),
            QuantPart::Scales => (CpuStorage::F32(scales), scales_shape(layout)?),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let n_rows = rows_of(layout, self.in_features)?;
        let out = super::cuda::quantize_fwd(x, layout, n_rows, self.in_features, self.part)?;
        let shape = match self.part {
            QuantPart::Values => layout.shape().clone(),
            QuantPart::Scales => scales_shape(layout)?,
        };
        Ok((out, shape))
    }
}

fn scales_shape(layout: &Layout) -> Result<Shape> {
    let dims = layout.shape().dims();
    Ok(Shape::from(&dims[..dims.len().saturating_sub(1)]))
}

#[cfg(any(feature = "cuda", feature = "testing"))]
impl CustomOp2 for BitLinearKernelOp {
    fn name(&self) -> &'static str {
        "bitlinear-kernel"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !self.raw {
            return self.op.cpu_fwd(x, x_layout, w, w_layout);
        }
        let (_, shape) = self.op.check(x_layout, w_layout)?;
        let CpuStorage::U8(w) = w else {
            bail!("packed weight must be U8, found {:?}", w.dtype())
        };
        let (k, out) = (self.op.in_features, self.op.out_features);
        let weights = unpack_ternary(contiguous(w, w_layout)?, out, k);
        let (values, _) = quantize_cpu(&to_f32(x, x_layout)?, k);
        let acc = values
            .chunks_exact(k)
            .flat_map(|x| {
                weights.chunks_exact(k).map(move |w| {
                    w.iter()
                        .zip(x)
                        .map(|(&w, &x)| w as i32 * x as i32)
                        .sum::<i32>()
                })
            })
            .collect();
        Ok((CpuStorage::I32(acc), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        w: &candle_core::CudaStorage,
        w_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::bitlinear_fwd(self, x, x_layout, w, w_layout)
    }
}

impl CustomOp1 for DequantizeOp {
    fn name(&self) -> &'static str {
        "bitnet-dequantize"
    }

    fn cpu_fwd(&self, w: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, k) = layout.shape().dims2()?;
        let CpuStorage::U8(w) = w else {
            bail!("packed weight must be U8, found {:?}", w.dtype())
        };
        let values = unpack_ternary(contiguous(w, layout)?, 4 * r, k);
        let dense = values.into_iter().map(|v| v as f32 / self.w_div).collect();
        Ok((from_f32(dense, self.dtype)?, Shape::from((4 * r, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (r, k) = layout.shape().dims2()?;
        let out = super::cuda::dequantize_fwd(w, layout, self.w_div, self.dtype)?;
        Ok((out, Shape::from((4 * r, k))))
    }
}

/// Per-token int8 quantization of `x: [.., in]`: the values (I32 `[.., in]`, in -128..=127) and
/// the scales `s_x` (F32 `[..]`), bit-identical on every device.
pub fn quantize_activations(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let in_features = x.dim(candle_core::D::Minus1)?;
    let x = x.contiguous()?;
    let op = |part| QuantizeOp { in_features, part };
    Ok((
        x.apply_op1_no_bwd(&op(QuantPart::Values))?,
        x.apply_op1_no_bwd(&op(QuantPart::Scales))?,
    ))
}

#[cfg(feature = "testing")]
fn kernel_op(
    x: &Tensor,
    weight: &Tensor,
    w_div: f32,
    kernel: GpuKernel,
    raw: bool,
) -> Result<Tensor> {
    let (r, in_features) = weight.dims2()?;
    if weight.dtype() != DType::U8 {
        bail!("packed weight must be U8, found {:?}", weight.dtype())
    }
    let op = BitLinearKernelOp {
        op: BitLinearOp {
            in_features,
            out_features: 4 * r,
            w_div,
        },
        kernel,
        raw,
    };
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &op)
}

/// The exact i32 accumulators `Σ_c W[o, c]·x_q[t, c]` of BitLinear: I32 `[.., out]`, before
/// any scale, so that devices and kernels can be compared bit for bit.
#[cfg(feature = "testing")]
pub fn bitlinear_accumulate(x: &Tensor, weight: &Tensor, kernel: GpuKernel) -> Result<Tensor> {
    kernel_op(x, weight, 1.0, kernel, true)
}

/// [`super::bitlinear`] through a chosen CUDA kernel (the same result on the CPU).
#[cfg(feature = "testing")]
pub fn bitlinear_with_kernel(
    x: &Tensor,
    weight: &Tensor,
    w_div: f32,
    kernel: GpuKernel,
) -> Result<Tensor> {
    kernel_op(x, weight, w_div, kernel, false)
}

/// Packed `[out/4, in]` U8 weights to dense `[out, in]` `dtype` (f32/bf16/f16) values
/// `W / w_div`, on the weights' device.
pub fn dequantize(weight: &Tensor, w_div: f32, dtype: DType) -> Result<Tensor> {
    if weight.dtype() != DType::U8 {
        bail!("packed weight must be U8, found {:?}", weight.dtype())
    }
    weight
        .contiguous()?
        .apply_op1_no_bwd(&DequantizeOp { w_div, dtype })
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::quant::{dequantize_accumulator, pack_ternary};
    use candle_core::Device;

    /// The stages recompose into the op: scales·accumulators = bitlinear, dequantize = unpack.
    #[test]
    fn stages_recompose_into_bitlinear() -> Result<()> {
        let (n, k, out, w_div) = (3, 37, 8, 1.7f32);
        let values: Vec<i8> = (0..out * k).map(|i| (i % 3) as i8 - 1).collect();
        let w = Tensor::from_vec(pack_ternary(&values, out, k)?, (out / 4, k), &Device::Cpu)?;
        let x: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 101) as f32 - 50.3)
            .collect();
        let x = Tensor::from_vec(x, (n, k), &Device::Cpu)?;

        let (q, s) = quantize_activations(&x)?;
        assert_eq!((q.dims(), s.dims()), (&[n, k][..], &[n][..]));
        let acc = bitlinear_accumulate(&x, &w, GpuKernel::Auto)?.to_vec2::<i32>()?;
        let (q, s) = (q.to_vec2::<i32>()?, s.to_vec1::<f32>()?);
        let y = super::super::bitlinear(&x, &w, w_div)?.to_vec2::<f32>()?;
        for t in 0..n {
            for o in 0..out {
                let dot: i32 = (0..k).map(|c| values[o * k + c] as i32 * q[t][c]).sum();
                assert_eq!(acc[t][o], dot);
                assert_eq!(y[t][o], dequantize_accumulator(dot, s[t], w_div));
            }
        }
        let dense = dequantize(&w, w_div, DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want: Vec<f32> = values.iter().map(|&v| v as f32 / w_div).collect();
        assert_eq!(dense, want);
        Ok(())
    }
}
