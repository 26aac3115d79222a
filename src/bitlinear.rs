//! `BitLinear`: a ternary projection held as packed 2-bit codes plus one scale.
//!
//! Whatever the checkpoint stores — packed U8 codes with `weight_scale` (offline) or latent
//! float weights (online, ternarized here once with per-tensor absmean) — the layer ends up in
//! the one layout documented in [`crate::quant`]: `[out/4, in]` U8 on the model's device. On
//! the CPU the layer converts them once to the tiles its kernels read
//! ([`crate::ops::cpu::TernaryTiles`]) and keeps only those: one copy of the codes, 2 bits a
//! weight, on every device.

use crate::config::{Config, LinearClass, QuantizationMode};
use crate::norm::RmsNorm;
use crate::ops::cpu::TernaryTiles;
use crate::quant::{check_packable, pack_ternary, ternarize_absmean};
use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct BitLinear {
    codes: Codes,
    /// The dense baseline only ([`Self::to_dense`]): `[out, in]` effective weights.
    dense: Option<Tensor>,
    /// Divisor of the i32 accumulator besides the activation scale.
    w_div: f32,
    in_features: usize,
    out_features: usize,
    /// `quantization_config.use_rms_norm`: an RMSNorm on the input before quantization.
    input_norm: Option<RmsNorm>,
    span: tracing::Span,
}

/// A layer's ternary codes, held once.
#[derive(Debug, Clone)]
enum Codes {
    /// `[out/4, in]` U8 packed codes, on a device other than the CPU.
    Packed(Tensor),
    /// On the CPU, the layout its kernels read: the layer's own tiles, or its view of the
    /// tiles it shares with the other projections of its input ([`BitLinearGroup`]).
    Tiles(Arc<TernaryTiles>),
}

impl Codes {
    /// Packed codes `[out/4, in]` U8 on `device`, as the device's kernels read them.
    fn new(packed: Tensor, device: &Device) -> Result<Self> {
        if !device.is_cpu() {
            return Ok(Self::Packed(packed.to_device(device)?));
        }
        let (r, in_features) = packed.dims2()?;
        let bytes = packed.flatten_all()?.to_vec1::<u8>()?;
        let tiles = TernaryTiles::from_packed(&bytes, in_features, 4 * r)?;
        Ok(Self::Tiles(Arc::new(tiles)))
    }

    fn tiles(&self) -> Option<&Arc<TernaryTiles>> {
        match self {
            Self::Tiles(tiles) => Some(tiles),
            Self::Packed(_) => None,
        }
    }
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
        // Codes are checked, and latent weights ternarized, on the host; only codes reach the device.
        let host = vb.clone().set_device(Device::Cpu);
        let (packed, w_div) = match cfg.quantization_mode() {
            QuantizationMode::Offline => {
                let packed = host.get_with_hints_dtype(
                    (out_features / 4, in_features),
                    "weight",
                    Init::Const(0.),
                    DType::U8,
                )?;
                check_codes(&packed, &vb.prefix())?;
                let scale = read_scalar(&vb, "weight_scale")?;
                let w_div = match cfg.linear_class() {
                    LinearClass::BitLinear => scale,
                    LinearClass::AutoBitLinear => 1.0 / scale,
                };
                (packed, w_div)
            }
            QuantizationMode::Online => {
                let latent = host
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
                let packed =
                    Tensor::from_vec(packed, (out_features / 4, in_features), &Device::Cpu)?;
                (packed, w_div)
            }
        };
        let codes = Codes::new(packed, vb.device())?;
        let input_norm = match cfg.bitlinear_input_norm_eps() {
            Some(eps) => Some(RmsNorm::new(in_features, eps, vb.pp("rms_norm"))?),
            None => None,
        };
        let span = tracing::span!(tracing::Level::TRACE, "bitlinear");
        Ok(Self {
            codes,
            dense: None,
            w_div,
            in_features,
            out_features,
            input_norm,
            span,
        })
    }

    /// Builds a layer from packed codes `[out/4, in]` (U8) and its accumulator divisor, on
    /// their device.
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
        let device = weight.device().clone();
        Ok(Self {
            codes: Codes::new(weight, &device)?,
            dense: None,
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

    /// The packed codes, `[out/4, in]` U8 on the layer's device. On the CPU they are
    /// rebuilt from the tiles the layer holds instead (a copy, for export and baselines).
    pub fn packed_weight(&self) -> Result<Tensor> {
        match &self.codes {
            Codes::Packed(weight) => Ok(weight.clone()),
            Codes::Tiles(tiles) => Tensor::from_vec(
                tiles.packed(),
                (self.out_features / 4, self.in_features),
                &Device::Cpu,
            ),
        }
    }

    pub fn w_div(&self) -> f32 {
        self.w_div
    }

    /// This layer as the baseline a user has without this crate: the same effective weights
    /// expanded to dense `dtype` floats on the layer's device, multiplied by candle's matmul after
    /// fake-quantizing the activations. For benchmarks; numerically close, not bit-identical.
    pub fn to_dense(&self, dtype: DType) -> Result<Self> {
        let dense = crate::ops::dequantize(&self.packed_weight()?, self.w_div, dtype)?;
        Ok(Self {
            dense: Some(dense),
            ..self.clone()
        })
    }

    /// Bytes of weights one forward reads: packed codes, or the dense matrix.
    pub fn weight_bytes(&self) -> usize {
        match &self.dense {
            Some(d) => d.elem_count() * d.dtype().size_in_bytes(),
            None => match &self.codes {
                Codes::Packed(weight) => weight.elem_count(),
                Codes::Tiles(tiles) => tiles.bytes(),
            },
        }
    }
}

/// Projections of one input (q, k and v; gate and up), run on the CPU as one op: the input is
/// quantized once and one parallel pass over their tiles serves them all. Elsewhere each part
/// runs on its own, except in the fused decode step, which reads the stacked codes
/// ([`Self::forward_quantized`]). With per-projection input norms, or dense weights, there is
/// nothing to share.
#[derive(Debug, Clone)]
pub struct BitLinearGroup {
    parts: Vec<BitLinear>,
    /// CPU: the parts' tiles side by side (each part holds its view of them).
    tiles: Option<Arc<TernaryTiles>>,
    /// Other devices: the parts' packed codes stacked, `[Σ out/4, in]`; each part's weight is
    /// a view of it.
    stacked: Option<Tensor>,
    /// Each part's `w_div`, in order.
    w_divs: Vec<f32>,
}

impl BitLinearGroup {
    pub fn new(mut parts: Vec<BitLinear>) -> Result<Self> {
        let fusable = parts
            .iter()
            .all(|p| p.input_norm.is_none() && p.dense.is_none());
        let tiles: Option<Vec<&TernaryTiles>> = parts
            .iter()
            .map(|p| p.codes.tiles().map(|t| &**t))
            .collect();
        let tiles = match tiles {
            Some(tiles) if fusable && parts.len() > 1 => {
                Some(Arc::new(TernaryTiles::concat(&tiles)?))
            }
            _ => None,
        };
        // The tiles the model keeps go on huge pages, once; a part's own are dropped for its
        // view of the joint ones.
        match &tiles {
            Some(tiles) => {
                tiles.back_with_huge_pages();
                for (i, p) in parts.iter_mut().enumerate() {
                    p.codes = Codes::Tiles(Arc::new(tiles.segment(i)?));
                }
            }
            None => (parts.iter().filter_map(|p| p.codes.tiles()))
                .for_each(|t| t.back_with_huge_pages()),
        }
        let packed: Option<Vec<&Tensor>> = (parts.iter())
            .map(|p| match &p.codes {
                Codes::Packed(weight) => Some(weight),
                Codes::Tiles(_) => None,
            })
            .collect();
        let stacked = match packed {
            Some(weights) if fusable => {
                let stacked = Tensor::cat(&weights, 0)?;
                let mut at = 0;
                for p in &mut parts {
                    let r = p.out_features / 4;
                    p.codes = Codes::Packed(stacked.narrow(0, at, r)?);
                    at += r;
                }
                Some(stacked)
            }
            _ => None,
        };
        let w_divs = parts.iter().map(|p| p.w_div).collect();
        Ok(Self {
            parts,
            tiles,
            stacked,
            w_divs,
        })
    }

    /// On the CPU, the tiles one kernel call runs the whole group on (the joint tiles, or a
    /// lone part's own) and each part's `w_div`; `None` with per-part input norms or dense
    /// weights, which run part by part.
    pub(crate) fn cpu_tiles(&self) -> Option<(&TernaryTiles, &[f32])> {
        if (self.parts.iter()).any(|p| p.input_norm.is_some() || p.dense.is_some()) {
            return None;
        }
        let tiles = match (&self.tiles, self.parts.as_slice()) {
            (Some(tiles), _) => &**tiles,
            (None, [part]) => &**part.codes.tiles()?,
            (None, _) => return None,
        };
        Some((tiles, &self.w_divs))
    }

    /// Whether [`Self::forward_quantized`] can run: stacked codes (on the CPU, one set of
    /// tiles), at most as many matrices as one launch takes.
    pub fn is_stacked(&self) -> bool {
        (self.stacked.is_some() || self.cpu_tiles().is_some())
            && self.parts.len() <= crate::ops::MAX_SEGMENTS
    }

    /// The parts' outputs side by side, `[rows, Σ out]` in `dtype`, from activations quantized
    /// once ([`crate::ops::rms_norm_quantize`]); with `residual: [rows, Σ out]`, `residual + y`.
    /// One launch on CUDA; on the CPU, the tile kernels.
    pub fn forward_quantized(
        &self,
        acts: &crate::ops::QuantizedActivations,
        residual: Option<&Tensor>,
        dtype: DType,
    ) -> Result<Tensor> {
        let segments: Vec<crate::ops::Segment> = (self.parts.iter())
            .map(|p| crate::ops::Segment {
                out_features: p.out_features,
                w_div: p.w_div,
            })
            .collect();
        crate::profile::timed(crate::profile::Stage::Projections, || {
            match (&self.stacked, self.cpu_tiles()) {
                (Some(stacked), _) => {
                    crate::ops::bitlinear_quantized(acts, stacked, &segments, residual, dtype)
                }
                (None, Some((tiles, w_divs))) => {
                    crate::ops::bitlinear_quantized_tiles(acts, tiles, w_divs, residual, dtype)
                }
                (None, None) => bail!("forward_quantized: the projections' codes are not stacked"),
            }
        })
    }

    /// The projections, in order.
    pub fn parts(&self) -> &[BitLinear] {
        &self.parts
    }

    /// Each part's output of `x: [.., in]`, in order.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let Some(tiles) = &self.tiles else {
            return self.parts.iter().map(|p| p.forward(x)).collect();
        };
        let y = crate::profile::timed(crate::profile::Stage::Projections, || {
            crate::ops::bitlinear_segments(x, tiles, &self.w_divs)
        })?;
        self.split(&y)
    }

    /// Each part's output of `norm(x)`. On the CPU in f32 the norm is fused with the
    /// activations' quantization (same bits, no normalized tensor; timed as a projection).
    pub fn forward_normed(&self, x: &Tensor, norm: &RmsNorm) -> Result<Vec<Tensor>> {
        match &self.tiles {
            Some(tiles) if x.dtype() == DType::F32 && norm.weight().dtype() == DType::F32 => {
                let y = crate::profile::timed(crate::profile::Stage::Projections, || {
                    crate::ops::rms_norm_bitlinear(
                        x,
                        norm.weight(),
                        norm.eps(),
                        tiles,
                        &self.w_divs,
                    )
                })?;
                self.split(&y)
            }
            _ => {
                let x = crate::profile::timed(crate::profile::Stage::Norms, || norm.forward(x))?;
                self.forward(&x)
            }
        }
    }

    /// The joint output `[.., Σ out]` cut into the parts' outputs.
    fn split(&self, y: &Tensor) -> Result<Vec<Tensor>> {
        if let [_] = self.parts.as_slice() {
            return Ok(vec![y.clone()]);
        }
        let mut at = 0;
        self.parts
            .iter()
            .map(|p| {
                at += p.out_features;
                y.narrow(D::Minus1, at - p.out_features, p.out_features)
            })
            .collect()
    }

    /// The dense baseline of every part ([`BitLinear::to_dense`]), run one by one.
    pub fn to_dense(&self, dtype: DType) -> Result<Self> {
        let parts = self
            .parts
            .iter()
            .map(|p| p.to_dense(dtype))
            .collect::<Result<_>>()?;
        Ok(Self {
            w_divs: self.w_divs.clone(),
            parts,
            tiles: None,
            stacked: None,
        })
    }
}

/// Per-token absmax int8 fake quantization with candle ops (`x_q / s_x`), for the dense baseline.
fn fake_quantize(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let scale = (x
        .abs()?
        .max_keepdim(D::Minus1)?
        .clamp(crate::quant::ACT_ABSMAX_EPS, f32::MAX)?
        .recip()?
        * 127.0)?;
    x.broadcast_mul(&scale)?
        .round()?
        .clamp(-128f32, 127f32)?
        .broadcast_div(&scale)?
        .to_dtype(dtype)
}

impl Module for BitLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        crate::profile::timed(crate::profile::Stage::Projections, || self.project(x))
    }
}

impl BitLinear {
    fn project(&self, x: &Tensor) -> Result<Tensor> {
        let normed;
        let x = match &self.input_norm {
            Some(norm) => {
                normed = norm.forward(x)?;
                &normed
            }
            None => x,
        };
        match &self.dense {
            Some(w) => fake_quantize(x)?.broadcast_matmul(&w.t()?),
            None => match &self.codes {
                Codes::Tiles(tiles) => crate::ops::bitlinear_tiles(x, tiles, self.w_div),
                Codes::Packed(weight) => crate::ops::bitlinear(x, weight, self.w_div),
            },
        }
    }
}

/// Refuses packed bytes holding the code 3, which no packer writes: a corrupt file.
fn check_codes(packed: &Tensor, prefix: &str) -> Result<()> {
    let bytes = packed.flatten_all()?.to_vec1::<u8>()?;
    if let Some(i) = bytes.iter().position(|&b| b & (b >> 1) & 0x55 != 0) {
        bail!(
            "{prefix}.weight: byte {i} holds the invalid ternary code 3 (0x{:02x}): corrupt checkpoint",
            bytes[i]
        )
    }
    Ok(())
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
