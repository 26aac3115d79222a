//! RMSNorm computed the way transformers' `LlamaRMSNorm` does: statistics in f32,
//! `x · (1 / sqrt(mean(x²) + eps))`, cast back, then times the weight.
//!
//! The order matters for BitNet: its inputs go straight into per-token int8 quantization, where
//! a one-ulp difference can flip a rounding (`shared/bitnet-format.md` §3.3).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

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
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
