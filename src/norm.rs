//! RMSNorm computed the way transformers' `LlamaRMSNorm` does: statistics in f32,
//! `x · (1 / sqrt(mean(x²) + eps))`, cast back, then times the weight.
//!
//! The order matters for BitNet: its inputs go straight into per-token int8 quantization, where
//! a one-ulp difference can flip a rounding (`shared/bitnet-format.md` §3.3). On the CPU one
//! fused pass replaces seven tensor ops (decode calls it four times per layer); other devices
//! run the same arithmetic as tensor ops.

use crate::ops::reference::sum_of_squares;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, DType, Device, Layout, Module, Result, Shape, Tensor, D,
};
use candle_nn::VarBuilder;
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    /// `[size]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if matches!(x.device(), Device::Cpu)
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
        {
            return x.contiguous()?.apply_op2_no_bwd(
                &self.weight,
                &FusedRmsNorm {
                    eps: self.eps as f32,
                },
            );
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        x.broadcast_mul(&inv_rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)
    }
}

/// f32 RMSNorm of `x: [.., n]` by `weight: [n]` on the CPU.
struct FusedRmsNorm {
    eps: f32,
}

impl CustomOp2 for FusedRmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-f32"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (x, w) else {
            bail!(
                "rms-norm-f32: expected f32 input and weight, found {:?} and {:?}",
                x.dtype(),
                w.dtype()
            )
        };
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            bail!("rms-norm-f32: input and weight must be contiguous")
        };
        let (x, w) = (&x[x0..x1], &w[w0..w1]);
        let n = w.len();
        if n == 0 {
            bail!("rms-norm-f32: empty weight")
        }
        if xl.dims().last() != Some(&n) {
            bail!(
                "rms-norm-f32: input shape {:?} does not end in the weight size {n}",
                xl.dims()
            )
        }
        let mut y = vec![0f32; x.len()];
        let eps = self.eps;
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .with_min_len(16)
            .for_each(|(y, x)| rms_norm_row(x, w, eps, y));
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }
}

/// One row of the f32 RMSNorm: `y = w · (x · (1 / sqrt(mean(x²) + eps)))`. Shared with the
/// fused RMSNorm → int8 quantization ([`crate::ops::cpu::QuantizedRows::from_rms_norm`]), so
/// that both round alike.
pub(crate) fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    // The CUDA kernel's order of summation, so that both devices round alike.
    let inv_rms = 1.0 / (sum_of_squares(x) / x.len() as f32 + eps).sqrt();
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = w * (x * inv_rms);
    }
}
