//! `BitLinear`: a ternary projection held as packed 2-bit codes plus one scale.
//!
//! Whatever the checkpoint stores — packed U8 codes with `weight_scale` (offline) or latent
//! float weights (online, ternarized here once with per-tensor absmean) — the layer ends up in
//! the one layout documented in [`crate::quant`]: `[out/4, in]` U8 on the model's device.

use crate::config::{Config, LinearClass, QuantizationMode};
use crate::norm::RmsNorm;
use crate::quant::{check_packable, pack_ternary, ternarize_absmean, unpack_ternary};
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

#[derive(Debug, Clone)]
pub struct BitLinear {
    /// `[out/4, in]` U8 packed codes.
    weight: Tensor,
    /// Divisor of the i32 accumulator besides the activation scale.
    w_div: f32,
    in_features: usize,
    out_features: usize,
    /// `quantization_config.use_rms_norm`: an RMSNorm on the input before quantization.
    input_norm: Option<RmsNorm>,
    span: tracing::Span,
}

impl BitLinear {
    /// Loads `weight` (and `weight_scale` for packed checkpoints) under `vb`.
    pub fn new(
        in_features: usize,
        out_features: usize,
        cfg: &Config,
        vb: VarBuilder,
    ) -> Result<Self> {
        if let Err(e) = check_packable(out_features) {
            bail!("{}.weight: {e}", vb.prefix())
        }
        let (weight, w_div) = match cfg.quantization_mode()? {
            QuantizationMode::Offline => {
                let weight = vb.get_with_hints_dtype(
                    (out_features / 4, in_features),
                    "weight",
                    Init::Const(0.),
                    DType::U8,
                )?;
                let scale = read_scalar(&vb, "weight_scale")?;
                let w_div = match cfg.linear_class()? {
                    LinearClass::BitLinear => scale,
                    LinearClass::AutoBitLinear => 1.0 / scale,
                };
                (weight, w_div)
            }
            QuantizationMode::Online => {
                let latent = vb
                    .get_with_hints_dtype(
                        (out_features, in_features),
                        "weight",
                        Init::Const(0.),
                        DType::F32,
                    )?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let (values, w_div) = ternarize_absmean(&latent);
                let packed = pack_ternary(&values, out_features, in_features)?;
                (
                    Tensor::from_vec(packed, (out_features / 4, in_features), vb.device())?,
                    w_div,
                )
            }
        };
        let input_norm = match cfg.bitlinear_input_norm_eps() {
            Some(eps) => Some(RmsNorm::new(in_features, eps, vb.pp("rms_norm"))?),
            None => None,
        };
        let span = tracing::span!(tracing::Level::TRACE, "bitlinear");
        Ok(Self {
            weight,
            w_div,
            in_features,
            out_features,
            input_norm,
            span,
        })
    }

    /// Builds a layer from packed codes `[out/4, in]` (U8) and its accumulator divisor.
    pub fn from_packed(weight: Tensor, w_div: f32) -> Result<Self> {
        let (r, in_features) = weight.dims2()?;
        if weight.dtype() != DType::U8 {
            bail!(
                "packed ternary weight must be U8, found {:?}",
                weight.dtype()
            )
        }
        if !(w_div.is_finite() && w_div != 0.0) {
            bail!("weight scale divisor {w_div} must be finite and non-zero")
        }
        let span = tracing::span!(tracing::Level::TRACE, "bitlinear");
        Ok(Self {
            weight,
            w_div,
            in_features,
            out_features: 4 * r,
            input_norm: None,
            span,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The packed codes, `[out/4, in]` U8.
    pub fn packed_weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn w_div(&self) -> f32 {
        self.w_div
    }

    /// The effective dense weights `W_t / w_div`, `[out, in]` f32 on the CPU: for tests and the
    /// dense baseline, never on the inference path.
    pub fn dequantize(&self) -> Result<Tensor> {
        let packed = self
            .weight
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<u8>()?;
        let values = unpack_ternary(&packed, self.out_features, self.in_features);
        let dense: Vec<f32> = values.into_iter().map(|v| v as f32 / self.w_div).collect();
        Tensor::from_vec(dense, (self.out_features, self.in_features), &Device::Cpu)
    }
}

impl Module for BitLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        match &self.input_norm {
            Some(norm) => crate::ops::bitlinear(&norm.forward(x)?, &self.weight, self.w_div),
            None => crate::ops::bitlinear(x, &self.weight, self.w_div),
        }
    }
}

/// Reads a one-element float tensor (`weight_scale` is `[1]` or `[]` depending on the converter).
fn read_scalar(vb: &VarBuilder, name: &str) -> Result<f32> {
    let t = vb.get_unchecked_dtype(name, DType::F32)?;
    if t.elem_count() != 1 {
        bail!(
            "{}.{name}: expected one element, found shape {:?}",
            vb.prefix(),
            t.dims()
        )
    }
    let v = t.flatten_all()?.to_vec1::<f32>()?[0];
    if !(v.is_finite() && v != 0.0) {
        bail!(
            "{}.{name}: scale {v} must be finite and non-zero",
            vb.prefix()
        )
    }
    Ok(v)
}
