//! The fused ops of a decoded token on CUDA, each one kernel launch (or two): RMSNorm into int8
//! activations, BitLinear on activations quantized once for several projections (q/k/v or
//! gate/up stacked), RoPE with the KV-cache append, attention of one token against the cache,
//! and greedy argmax. On the CPU they run [`super::reference`], the arithmetic the kernels are
//! tested against, except BitLinear on a CPU model's tiles ([`bitlinear_quantized_tiles`]: its
//! SIMD kernels, the same bits); the CPU model decodes through its own path
//! (`model/decode.rs`). Launch counts: `docs/cuda-decode.md`.

use super::launch_constants::ACT_ALIGN;
use super::reference::{self, AttentionShape, Float};
use super::{contiguous, from_f32};
use crate::quant::{dequantize_accumulator, ternary_accumulate};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Result, Shape,
    Tensor,
};
use half::{bf16, f16};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Per-token int8 activations, quantized once and read by several BitLinears: one U8 tensor
/// holding the codes `[rows, k_pad]` (`k_pad` = in_features rounded up to 16, zero-padded),
/// then `rows` f32 scales `s_x`, then `rows` i32 sums of the codes: the buffers the BitLinear
/// kernels take.
#[derive(Debug, Clone)]
pub struct QuantizedActivations {
    data: Tensor,
    rows: usize,
    in_features: usize,
}

/// Bytes of [`QuantizedActivations`] for `rows` rows of `k_pad` codes.
fn quantized_bytes(rows: usize, k_pad: usize) -> usize {
    rows * (k_pad + 8)
}

impl QuantizedActivations {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The codes' row stride.
    pub fn padded_in_features(&self) -> usize {
        self.in_features.next_multiple_of(ACT_ALIGN)
    }

    /// The U8 tensor itself (on the device of the activations).
    pub fn data(&self) -> &Tensor {
        &self.data
    }

    /// Codes `[rows, k_pad]`, scales and sums, copied to the host.
    pub fn to_parts(&self) -> Result<(Vec<i8>, Vec<f32>, Vec<i32>)> {
        let bytes = self
            .data
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<u8>()?;
        Ok(split_parts(&bytes, self.rows, self.padded_in_features()))
    }
}

fn split_parts(bytes: &[u8], rows: usize, k_pad: usize) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
    let (codes, rest) = bytes.split_at(rows * k_pad);
    let (scales, sums) = rest.split_at(4 * rows);
    let word = |b: &[u8]| <[u8; 4]>::try_from(b).expect("4-byte chunks");
    (
        codes.iter().map(|&b| b as i8).collect(),
        scales
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(word(b)))
            .collect(),
        sums.chunks_exact(4)
            .map(|b| i32::from_le_bytes(word(b)))
            .collect(),
    )
}

fn join_parts(codes: &[i8], scales: &[f32], sums: &[i32]) -> Vec<u8> {
    let mut out: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
    out.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
    out.extend(sums.iter().flat_map(|s| s.to_le_bytes()));
    out
}

static CALLS: AtomicUsize = AtomicUsize::new(0);

/// One more call of an op of this module (one launch on CUDA, two for a split attention).
fn count_call() {
    CALLS.fetch_add(1, Ordering::Relaxed);
}

/// Test plumbing: calls of this module's ops so far, all threads together; the model tests
/// count a decoded token's with it.
#[cfg(feature = "testing")]
pub fn decode_op_calls() -> usize {
    CALLS.load(Ordering::Relaxed)
}

/// A float CPU storage as a slice of T (checked by the caller's dtype dispatch).
fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    contiguous(s.as_slice::<T>()?, l)
}

/// The RMSNorm → int8 op: `x: [rows, k]` (or `[rows, 2k]` gate | up with `relu2`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormQuantizeOp {
    pub eps: f32,
    pub relu2: bool,
}

impl RmsNormQuantizeOp {
    /// `(rows, k)` of the normalized rows.
    fn rows(&self, x: &Layout, weight: &Layout) -> Result<(usize, usize)> {
        let k = weight.shape().dims1()?;
        let width = if self.relu2 { 2 * k } else { k };
        let dims = x.shape().dims();
        if k == 0 || dims.last() != Some(&width) {
            bail!(
                "rms_norm_quantize: input shape {dims:?}, last dimension must be {width} \
                 (norm weight of {k})"
            )
        }
        Ok((x.shape().elem_count() / width, k))
    }
}

impl CustomOp2 for RmsNormQuantizeOp {
    fn name(&self) -> &'static str {
        "rms-norm-quantize"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = self.rows(xl, wl)?;
        if x.dtype() != w.dtype() {
            bail!(
                "rms_norm_quantize: input {:?}, weight {:?}",
                x.dtype(),
                w.dtype()
            )
        }
        let k_pad = k.next_multiple_of(ACT_ALIGN);
        let (mut codes, mut scales, mut sums) = (vec![0i8; rows * k_pad], vec![], vec![]);
        with_float!(x.dtype(), "rms_norm_quantize", T => {
            let (x, w) = (slice::<T>(x, xl)?, slice::<T>(w, wl)?);
            let width = if self.relu2 { 2 * k } else { k };
            for (t, row) in x.chunks_exact(width).enumerate() {
                let values: Vec<f32> = if self.relu2 {
                    row[..k].iter().zip(&row[k..]).map(|(&g, &u)| reference::relu2_mul(g, u)).collect()
                } else {
                    row.iter().map(|v| v.to_f32()).collect()
                };
                let q = &mut codes[t * k_pad..t * k_pad + k];
                scales.push(reference::rms_norm_quantize(&values, w, self.eps, q));
                sums.push(q.iter().map(|&c| c as i32).sum());
            }
        });
        let bytes = join_parts(&codes, &scales, &sums);
        let n = bytes.len();
        Ok((CpuStorage::U8(bytes), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, k) = self.rows(xl, wl)?;
        let out = super::cuda::rms_norm_quantize_fwd(self, x, xl, w, wl, rows, k)?;
        Ok((
            out,
            Shape::from(quantized_bytes(rows, k.next_multiple_of(ACT_ALIGN))),
        ))
    }
}

fn norm_quantize(
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    relu2: bool,
) -> Result<QuantizedActivations> {
    count_call();
    let op = RmsNormQuantizeOp { eps, relu2 };
    let x = x.contiguous()?;
    let (rows, k) = op.rows(x.layout(), weight.layout())?;
    let data = x.apply_op2_no_bwd(&weight.contiguous()?, &op)?;
    Ok(QuantizedActivations {
        data,
        rows,
        in_features: k,
    })
}

/// RMSNorm of `x: [.., k]` by `weight: [k]` (same float dtype) straight into int8 activations,
/// one launch on CUDA. The arithmetic: [`reference::rms_norm_quantize`].
pub fn rms_norm_quantize(x: &Tensor, weight: &Tensor, eps: f32) -> Result<QuantizedActivations> {
    norm_quantize(x, weight, eps, false)
}

/// `relu²(gate)·up`, its RMSNorm and the int8 quantization, one launch on CUDA:
/// `gate_up: [.., 2k]` is the output of the stacked gate/up BitLinear (gate, then up).
pub fn relu2_rms_norm_quantize(
    gate_up: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<QuantizedActivations> {
    norm_quantize(gate_up, weight, eps, true)
}

/// One matrix of a stacked BitLinear weight: its output features and its `w_div`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Segment {
    pub out_features: usize,
    pub w_div: f32,
}

/// At most this many matrices stacked in one launch (q/k/v).
pub(crate) const MAX_SEGMENTS: usize = 3;

/// BitLinear on pre-quantized activations with stacked packed weights.
#[derive(Debug, Clone)]
pub(crate) struct BitLinearQuantizedOp {
    pub rows: usize,
    pub in_features: usize,
    pub segments: Vec<Segment>,
    pub dtype: DType,
}

impl BitLinearQuantizedOp {
    pub fn out_features(&self) -> usize {
        self.segments.iter().map(|s| s.out_features).sum()
    }

    /// Checks the weight `[Σ out/4, in]` and the activation bytes.
    fn check(&self, acts: &Layout, w: &Layout) -> Result<Shape> {
        let (r, k) = w.shape().dims2()?;
        if k != self.in_features || 4 * r != self.out_features() {
            bail!(
                "bitlinear_quantized: packed weight {:?}, expected [{}, {}]",
                w.shape().dims(),
                self.out_features() / 4,
                self.in_features
            )
        }
        let k_pad = k.next_multiple_of(ACT_ALIGN);
        if acts.shape().dims1()? != quantized_bytes(self.rows, k_pad) {
            bail!(
                "bitlinear_quantized: activations of {:?} bytes",
                acts.shape().dims()
            )
        }
        Ok(Shape::from((self.rows, self.out_features())))
    }

    fn cpu(&self, acts: &CpuStorage, al: &Layout, w: &CpuStorage, wl: &Layout) -> Result<Vec<f32>> {
        let k = self.in_features;
        let k_pad = k.next_multiple_of(ACT_ALIGN);
        let (codes, scales, _) = split_parts(slice::<u8>(acts, al)?, self.rows, k_pad);
        let w = slice::<u8>(w, wl)?;
        let mut y = Vec::with_capacity(self.rows * self.out_features());
        for (t, &scale) in scales.iter().enumerate() {
            let mut start = 0;
            for seg in &self.segments {
                let packed = &w[start * k..(start + seg.out_features / 4) * k];
                let acc =
                    ternary_accumulate(&codes[t * k_pad..t * k_pad + k], packed, seg.out_features);
                y.extend(
                    acc.into_iter()
                        .map(|a| dequantize_accumulator(a, scale, seg.w_div)),
                );
                start += seg.out_features / 4;
            }
        }
        Ok(y)
    }
}

impl CustomOp2 for BitLinearQuantizedOp {
    fn name(&self) -> &'static str {
        "bitlinear-quantized"
    }

    fn cpu_fwd(
        &self,
        acts: &CpuStorage,
        al: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = self.check(al, wl)?;
        Ok((from_f32(self.cpu(acts, al, w, wl)?, self.dtype)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acts: &candle_core::CudaStorage,
        al: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = self.check(al, wl)?;
        let y = super::cuda::bitlinear_quantized_fwd(self, acts, al, w, wl, None)?;
        Ok((y, shape))
    }
}

impl CustomOp3 for BitLinearQuantizedOp {
    fn name(&self) -> &'static str {
        "bitlinear-quantized-residual"
    }

    fn cpu_fwd(
        &self,
        acts: &CpuStorage,
        al: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        res: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = self.check(al, wl)?;
        let y = self.cpu(acts, al, w, wl)?;
        let out = with_float!(self.dtype, "bitlinear_quantized", T => {
            let res = slice::<T>(res, rl)?;
            let sum: Vec<f32> = y.iter().zip(res).map(|(&y, &r)| {
                <T as Float>::round(r.to_f32() + <T as Float>::round(y).to_f32()).to_f32()
            }).collect();
            from_f32(sum, self.dtype)?
        });
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acts: &candle_core::CudaStorage,
        al: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        res: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = self.check(al, wl)?;
        let y = super::cuda::bitlinear_quantized_fwd(self, acts, al, w, wl, Some((res, rl)))?;
        Ok((y, shape))
    }
}

/// BitLinear of activations quantized once ([`rms_norm_quantize`]) with up to three packed
/// matrices stacked along their packed rows (`weight: [Σ out_s/4, in]`, e.g. q, k, v: one
/// launch on CUDA): `[rows, Σ out_s]` in `dtype`, segment s in its own columns, each with its
/// own `w_div`. With `residual: [rows, Σ out_s]` (of `dtype`), returns `residual + y` rounded
/// as candle adds two tensors.
pub fn bitlinear_quantized(
    acts: &QuantizedActivations,
    weight: &Tensor,
    segments: &[Segment],
    residual: Option<&Tensor>,
    dtype: DType,
) -> Result<Tensor> {
    count_call();
    if segments.is_empty() || segments.len() > MAX_SEGMENTS {
        bail!(
            "bitlinear_quantized: 1 to {MAX_SEGMENTS} segments, got {}",
            segments.len()
        )
    }
    if let Some(s) = segments
        .iter()
        .find(|s| s.out_features == 0 || !s.out_features.is_multiple_of(4))
    {
        bail!(
            "bitlinear_quantized: segment of {} outputs, not a positive multiple of 4",
            s.out_features
        )
    }
    if weight.dtype() != DType::U8 {
        bail!(
            "bitlinear_quantized: packed weight must be U8, found {:?}",
            weight.dtype()
        )
    }
    let op = BitLinearQuantizedOp {
        rows: acts.rows,
        in_features: acts.in_features,
        segments: segments.to_vec(),
        dtype,
    };
    let weight = weight.contiguous()?;
    match residual {
        None => acts.data.apply_op2_no_bwd(&weight, &op),
        Some(res) => {
            if res.dtype() != dtype || res.dims() != [op.rows, op.out_features()] {
                bail!(
                    "bitlinear_quantized: residual {:?} {:?}, expected {dtype:?} [{}, {}]",
                    res.dtype(),
                    res.dims(),
                    op.rows,
                    op.out_features()
                )
            }
            acts.data.apply_op3_no_bwd(&weight, &res.contiguous()?, &op)
        }
    }
}

/// [`bitlinear_quantized`] on the CPU's tiles ([`super::cpu::TernaryTiles::from_segments`],
/// one `w_div` per segment) instead of stacked packed codes: the kernels' sums are exact, so
/// the outputs are the same bits.
pub fn bitlinear_quantized_tiles(
    acts: &QuantizedActivations,
    tiles: &super::cpu::TernaryTiles,
    w_divs: &[f32],
    residual: Option<&Tensor>,
    dtype: DType,
) -> Result<Tensor> {
    count_call();
    if !acts.data.device().is_cpu() {
        bail!("bitlinear_quantized_tiles: the activations are not on the CPU")
    }
    let (codes, scales, sums) = acts.to_parts()?;
    let k = acts.in_features;
    let rows =
        super::cpu::QuantizedRows::from_parts(&codes, acts.padded_in_features(), k, scales, sums)?;
    let out = tiles.out_features();
    let mut y = vec![0f32; acts.rows * out];
    super::cpu::bitlinear_segments(&rows, tiles, w_divs, &mut y)?;
    let y = Tensor::from_vec(y, (acts.rows, out), &candle_core::Device::Cpu)?.to_dtype(dtype)?;
    match residual {
        Some(res) => res + y,
        None => Ok(y),
    }
}

/// RoPE of the new keys and the KV-cache append.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RopeKvAppendOp {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    pub pos0: usize,
    pub n_tok: usize,
    /// CUDA: the address of an i32 in device memory read as pos0 instead (graph replays).
    pub pos0_at: Option<u64>,
}

impl RopeKvAppendOp {
    fn check(&self, cache: &Layout, qkv: &Layout, rope: &Layout) -> Result<()> {
        let (hd, n_kv) = (self.head_dim, self.n_kv_heads);
        if cache.shape().dims() != [2, n_kv, self.capacity, hd] || !cache.is_contiguous() {
            bail!(
                "rope_kv_append: cache {:?}, expected contiguous [2, {n_kv}, cap, {hd}]",
                cache.shape().dims()
            )
        }
        let width = (self.n_heads + 2 * n_kv) * hd;
        if qkv.shape().elem_count() != self.n_tok * width {
            bail!(
                "rope_kv_append: qkv {:?}, expected [{}, {width}]",
                qkv.shape().dims(),
                self.n_tok
            )
        }
        let (max_pos, rope_hd) = rope.shape().dims2()?;
        if !hd.is_multiple_of(2)
            || rope_hd != hd
            || self.pos0 + self.n_tok > max_pos.min(self.capacity)
        {
            bail!(
                "rope_kv_append: positions {}..{} with a rope table {:?} and a cache of {} (head_dim {hd})",
                self.pos0,
                self.pos0 + self.n_tok,
                rope.shape().dims(),
                self.capacity
            )
        }
        Ok(())
    }
}

impl InplaceOp3 for RopeKvAppendOp {
    fn name(&self) -> &'static str {
        "rope-kv-append"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        qkv: &CpuStorage,
        ql: &Layout,
        rope: &CpuStorage,
        rl: &Layout,
    ) -> Result<()> {
        self.check(cl, ql, rl)?;
        if self.pos0_at.is_some() {
            bail!("rope_kv_append: a position in device memory needs a CUDA cache")
        }
        let (hd, n_kv, cap) = (self.head_dim, self.n_kv_heads, self.capacity);
        let width = (self.n_heads + 2 * n_kv) * hd;
        with_float!(cache.dtype(), "rope_kv_append", T => {
            let (qkv, rope) = (slice::<T>(qkv, ql)?, slice::<T>(rope, rl)?);
            let cache = cache_slice_mut::<T>(cache, cl)?;
            for t in 0..self.n_tok {
                let pos = self.pos0 + t;
                let cs = &rope[pos * hd..(pos + 1) * hd];
                for h in 0..n_kv {
                    let src = |plane: usize| {
                        let at = t * width + (self.n_heads + plane * n_kv + h) * hd;
                        &qkv[at..at + hd]
                    };
                    let dst = |plane: usize| ((plane * n_kv + h) * cap + pos) * hd;
                    let k = reference::rope_head(src(0), cs);
                    cache[dst(0)..dst(0) + hd].copy_from_slice(&k);
                    cache[dst(1)..dst(1) + hd].copy_from_slice(src(1));
                }
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &Layout,
        qkv: &candle_core::CudaStorage,
        ql: &Layout,
        rope: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<()> {
        self.check(cl, ql, rl)?;
        super::cuda::rope_kv_append_fwd(self, cache, cl, qkv, ql, rope, rl)
    }
}

/// Mutable access to a float CPU storage (candle has only the shared one).
trait StorageMut: Sized {
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! storage_mut {
    ($t:ty, $variant:ident) => {
        impl StorageMut for $t {
            fn storage_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
storage_mut!(f32, F32);
storage_mut!(bf16, BF16);
storage_mut!(f16, F16);

fn cache_slice_mut<'a, T: StorageMut>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [T]> {
    let dtype = s.dtype();
    match (l.contiguous_offsets(), T::storage_mut(s)) {
        (Some((start, end)), Some(v)) => Ok(&mut v[start..end]),
        (None, _) => bail!("rope_kv_append: the KV cache must be contiguous"),
        (_, None) => bail!("rope_kv_append: KV cache of {dtype:?}"),
    }
}

/// RoPE of `n_tok` new tokens' keys and their append, with the values, to the cache:
/// `qkv: [n_tok, (n_h + 2 n_kv)·hd]` (the stacked q/k/v BitLinear's output), `cache: [2, n_kv,
/// cap, hd]` (keys, then values; written in place at positions `pos0..pos0 + n_tok`), `rope:
/// [max_pos, hd]` (`cos | sin` per position, `hd/2` each). One launch on CUDA; the queries are
/// rotated by [`decode_attention`].
pub fn rope_kv_append(
    cache: &Tensor,
    qkv: &Tensor,
    rope: &Tensor,
    n_heads: usize,
    pos0: usize,
) -> Result<()> {
    rope_kv_append_at(cache, qkv, rope, n_heads, pos0, None)
}

/// [`rope_kv_append`]; with `pos0_at` (CUDA), the kernel reads the position from that i32 in
/// device memory, and `pos0` only bounds the checks (a CUDA graph captures the launch once).
pub(crate) fn rope_kv_append_at(
    cache: &Tensor,
    qkv: &Tensor,
    rope: &Tensor,
    n_heads: usize,
    pos0: usize,
    pos0_at: Option<u64>,
) -> Result<()> {
    count_call();
    let (_, n_kv_heads, capacity, head_dim) = cache.dims4()?;
    if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        bail!("rope_kv_append: {n_heads} query heads for {n_kv_heads} KV heads")
    }
    let width = (n_heads + 2 * n_kv_heads) * head_dim;
    let n_tok = qkv.elem_count() / width.max(1);
    if qkv.dtype() != cache.dtype() || rope.dtype() != cache.dtype() {
        bail!("rope_kv_append: cache, qkv and rope must share a dtype")
    }
    let op = RopeKvAppendOp {
        n_heads,
        n_kv_heads,
        head_dim,
        capacity,
        pos0,
        n_tok,
        pos0_at,
    };
    cache.inplace_op3(&qkv.contiguous()?, &rope.contiguous()?, &op)
}

/// Attention of one token against the cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecodeAttentionOp {
    pub shape: AttentionShape,
    pub scale: f32,
    /// CUDA: the address of an i32 in device memory read as `shape.len` instead (graph
    /// replays); the launch then covers the whole capacity.
    pub len_at: Option<u64>,
}

impl DecodeAttentionOp {
    fn check(&self, qkv: &Layout, cache: &Layout, rope: &Layout) -> Result<()> {
        let AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
            capacity,
            len,
        } = self.shape;
        if qkv.shape().elem_count() != (n_heads + 2 * n_kv_heads) * hd {
            bail!(
                "decode_attention: qkv {:?} is not one token's q, k, v",
                qkv.shape().dims()
            )
        }
        if cache.shape().dims() != [2, n_kv_heads, capacity, hd] {
            bail!("decode_attention: cache {:?}", cache.shape().dims())
        }
        let (max_pos, rope_hd) = rope.shape().dims2()?;
        if len == 0 || len > capacity || len > max_pos || rope_hd != hd || !hd.is_multiple_of(2) {
            bail!(
                "decode_attention: {len} positions, cache of {capacity}, rope table {:?}",
                rope.shape().dims()
            )
        }
        Ok(())
    }
}

impl CustomOp3 for DecodeAttentionOp {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        ql: &Layout,
        cache: &CpuStorage,
        cl: &Layout,
        rope: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(ql, cl, rl)?;
        if self.len_at.is_some() {
            bail!("decode_attention: a length in device memory needs a CUDA cache")
        }
        let y = with_float!(qkv.dtype(), "decode_attention", T => {
            let (qkv, cache, rope) = (slice::<T>(qkv, ql)?, slice::<T>(cache, cl)?, slice::<T>(rope, rl)?);
            reference::decode_attention(qkv, cache, rope, self.shape, self.scale)
        });
        let y = y.into_iter().map(|v| v as f32).collect();
        let n = self.shape.n_heads * self.shape.head_dim;
        Ok((from_f32(y, qkv.dtype())?, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        ql: &Layout,
        cache: &candle_core::CudaStorage,
        cl: &Layout,
        rope: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check(ql, cl, rl)?;
        let y = super::cuda::decode_attention_fwd(self, qkv, ql, cache, cl, rope, rl)?;
        Ok((y, Shape::from(self.shape.n_heads * self.shape.head_dim)))
    }
}

/// Attention of one token (`qkv: [(n_h + 2 n_kv)·hd]`, its queries rotated here at `len - 1`)
/// against the first `len` positions of `cache: [2, n_kv, cap, hd]` (the token's own key and
/// value appended by [`rope_kv_append`]), softmax of `q·k·scale` in f32: `[n_h·hd]` in the
/// cache's dtype. GQA: query head h reads KV head `h / (n_h / n_kv)`. One launch on CUDA, two
/// past `ATTN_MIN_SPLIT_LEN` (a launch constant) positions (split over the cache).
pub fn decode_attention(
    qkv: &Tensor,
    cache: &Tensor,
    rope: &Tensor,
    n_heads: usize,
    len: usize,
    scale: f32,
) -> Result<Tensor> {
    decode_attention_at(qkv, cache, rope, n_heads, len, scale, None)
}

/// [`decode_attention`]; with `len_at` (CUDA), the kernel reads the length from that i32 in
/// device memory, and `len` only bounds the checks (a CUDA graph captures the launch once).
pub(crate) fn decode_attention_at(
    qkv: &Tensor,
    cache: &Tensor,
    rope: &Tensor,
    n_heads: usize,
    len: usize,
    scale: f32,
    len_at: Option<u64>,
) -> Result<Tensor> {
    count_call();
    let (_, n_kv_heads, capacity, head_dim) = cache.dims4()?;
    if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        bail!("decode_attention: {n_heads} query heads for {n_kv_heads} KV heads")
    }
    if qkv.dtype() != cache.dtype() || rope.dtype() != cache.dtype() {
        bail!("decode_attention: qkv, cache and rope must share a dtype")
    }
    let shape = AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        capacity,
        len,
    };
    let op = DecodeAttentionOp {
        shape,
        scale,
        len_at,
    };
    qkv.contiguous()?
        .apply_op3_no_bwd(&cache.contiguous()?, &rope.contiguous()?, &op)
}

/// First-maximum argmax of each row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ArgmaxFirstOp;

impl CustomOp1 for ArgmaxFirstOp {
    fn name(&self) -> &'static str {
        "argmax-first"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = *l.shape().dims().last().unwrap_or(&0);
        if n == 0 {
            bail!("argmax_first: empty rows in {:?}", l.shape().dims())
        }
        let ids = with_float!(x.dtype(), "argmax_first", T => {
            let x = slice::<T>(x, l)?;
            x.chunks_exact(n)
                .map(|row| reference::argmax_first(&row.iter().map(|v| v.to_f32()).collect::<Vec<_>>()))
                .collect::<Vec<u32>>()
        });
        let dims = l.shape().dims();
        Ok((CpuStorage::U32(ids), Shape::from(&dims[..dims.len() - 1])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = l.shape().dims();
        let n = *dims.last().unwrap_or(&0);
        if n == 0 {
            bail!("argmax_first: empty rows in {dims:?}")
        }
        let ids = super::cuda::argmax_fwd(x, l, l.shape().elem_count() / n, n)?;
        Ok((ids, Shape::from(&dims[..dims.len() - 1])))
    }
}

/// Greedy decoding's argmax over the last dimension: the FIRST index of the largest value, as
/// torch and the CPU pick (candle's CUDA argmax picks the last of equal maxima); NaN never
/// wins. U32 `[..]`; one launch on CUDA, the ids staying on the device.
pub fn argmax_first(logits: &Tensor) -> Result<Tensor> {
    count_call();
    logits.contiguous()?.apply_op1_no_bwd(&ArgmaxFirstOp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{f32_bits, random_floats};
    use crate::quant::pack_ternary;
    use candle_core::{Device, D};

    /// The fused path (norm → int8 → stacked BitLinear + residual) equals candle ops for the
    /// norm in the reference's arithmetic followed by `ops::bitlinear` per matrix.
    #[test]
    fn fused_cpu_path_equals_norm_then_bitlinear() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, outs) = (3, 300, [8usize, 12]);
        for dtype in [DType::F32, DType::BF16] {
            let x =
                Tensor::from_vec(random_floats(n * k, 1, 8.0), (n, k), &dev)?.to_dtype(dtype)?;
            let w = Tensor::from_vec(random_floats(k, 2, 2.0), k, &dev)?.to_dtype(dtype)?;
            let eps = 1e-6;
            // transformers' RMSNorm with the reference's sum of squares
            let xf = x.to_dtype(DType::F32)?;
            let inv: Vec<f32> = xf
                .to_vec2::<f32>()?
                .iter()
                .map(|row| 1.0 / (reference::sum_of_squares(row) / k as f32 + eps).sqrt())
                .collect();
            let inv = Tensor::from_vec(inv, (n, 1), &dev)?;
            let y = xf.broadcast_mul(&inv)?.to_dtype(dtype)?.broadcast_mul(&w)?;

            let values: Vec<Vec<i8>> = outs
                .iter()
                .enumerate()
                .map(|(i, &o)| {
                    random_floats(o * k, 3 + i as u64, 3.0)
                        .iter()
                        .map(|v| v.round().clamp(-1.0, 1.0) as i8)
                        .collect()
                })
                .collect();
            let packed: Vec<Tensor> = values
                .iter()
                .zip(outs)
                .map(|(v, o)| Tensor::from_vec(pack_ternary(v, o, k)?, (o / 4, k), &dev))
                .collect::<Result<_>>()?;
            let segments = [
                Segment {
                    out_features: 8,
                    w_div: 1.5,
                },
                Segment {
                    out_features: 12,
                    w_div: 0.7,
                },
            ];
            let want = Tensor::cat(
                &[
                    super::super::bitlinear(&y, &packed[0], 1.5)?,
                    super::super::bitlinear(&y, &packed[1], 0.7)?,
                ],
                D::Minus1,
            )?;
            let acts = rms_norm_quantize(&x, &w, eps)?;
            let stacked = Tensor::cat(&packed, 0)?;
            // The CPU layers hold tiles instead of the stacked codes: the same bits.
            let bytes: Vec<Vec<u8>> = (packed.iter())
                .map(|p| p.flatten_all()?.to_vec1::<u8>())
                .collect::<Result<_>>()?;
            let parts: Vec<(&[u8], usize)> = bytes.iter().map(|b| &b[..]).zip(outs).collect();
            let tiles = crate::ops::cpu::TernaryTiles::from_segments(&parts, k)?;
            let w_divs = segments.map(|s| s.w_div);
            let res =
                Tensor::from_vec(random_floats(n * 20, 9, 4.0), (n, 20), &dev)?.to_dtype(dtype)?;
            for residual in [None, Some(&res)] {
                let want = match residual {
                    Some(res) => (&want + res)?,
                    None => want.clone(),
                };
                let got = bitlinear_quantized(&acts, &stacked, &segments, residual, dtype)?;
                let what = format!("{dtype:?}, residual {}", residual.is_some());
                assert_eq!(f32_bits(&got)?, f32_bits(&want)?, "{what}");
                let got = bitlinear_quantized_tiles(&acts, &tiles, &w_divs, residual, dtype)?;
                assert_eq!(f32_bits(&got)?, f32_bits(&want)?, "tiles, {what}");
            }
        }
        let rows = |codes: &[i8], stride| {
            crate::ops::cpu::QuantizedRows::from_parts(codes, stride, 4, vec![1.0], vec![0])
        };
        assert!(rows(&[1; 8], 8).is_ok());
        assert!(rows(&[1; 5], 4).is_err() && rows(&[1; 3], 3).is_err());
        Ok(())
    }

    /// `rope_kv_append` + `decode_attention` on the CPU against candle's rope and softmax
    /// attention in f32.
    #[test]
    fn cpu_attention_matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (n_h, n_kv, hd, cap, pos) = (4, 2, 8, 6, 4);
        let half = hd / 2;
        let angles: Vec<f32> = (0..cap * half)
            .map(|i| (i / half) as f32 / (1.0 + (i % half) as f32))
            .collect();
        let angles = Tensor::from_vec(angles, (cap, half), &dev)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let table = Tensor::cat(&[&cos, &sin], 1)?;
        let cache = Tensor::from_vec(
            random_floats(2 * n_kv * cap * hd, 4, 2.0),
            (2, n_kv, cap, hd),
            &dev,
        )?;
        let qkv = Tensor::from_vec(
            random_floats((n_h + 2 * n_kv) * hd, 5, 2.0),
            (1, (n_h + 2 * n_kv) * hd),
            &dev,
        )?;
        rope_kv_append(&cache, &qkv, &table, n_h, pos)?;

        let heads = |from: usize, count: usize| {
            qkv.narrow(1, from * hd, count * hd)?
                .reshape((1, count, 1, hd))
        };
        let (c, s) = (cos.narrow(0, pos, 1)?, sin.narrow(0, pos, 1)?);
        let k_new = candle_nn::rotary_emb::rope(&heads(n_h, n_kv)?, &c, &s)?;
        let v_new = heads(n_h + n_kv, n_kv)?;
        let keys = cache.get(0)?.narrow(1, 0, pos + 1)?;
        let values = cache.get(1)?.narrow(1, 0, pos + 1)?;
        assert_eq!(
            keys.narrow(1, pos, 1)?.flatten_all()?.to_vec1::<f32>()?,
            k_new.flatten_all()?.to_vec1::<f32>()?
        );
        assert_eq!(
            values.narrow(1, pos, 1)?.flatten_all()?.to_vec1::<f32>()?,
            v_new.flatten_all()?.to_vec1::<f32>()?
        );

        let scale = 1.0 / (hd as f32).sqrt();
        let got = decode_attention(&qkv, &cache, &table, n_h, pos + 1, scale)?.to_vec1::<f32>()?;
        let q = candle_nn::rotary_emb::rope(&heads(0, n_h)?, &c, &s)?.reshape((
            n_kv,
            n_h / n_kv,
            hd,
        ))?;
        let att = (q.matmul(&keys.t()?)? * scale as f64)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let want = att.matmul(&values)?.flatten_all()?.to_vec1::<f32>()?;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5, "{g} vs {w}");
        }
        Ok(())
    }

    /// Positions in device memory are for CUDA graphs: on the CPU they are an error, not an
    /// address read.
    #[test]
    fn device_positions_on_the_cpu_are_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let (n_h, n_kv, hd, cap) = (2, 1, 4, 8);
        let cache = Tensor::zeros((2, n_kv, cap, hd), DType::F32, &dev)?;
        let qkv = Tensor::ones((1, (n_h + 2 * n_kv) * hd), DType::F32, &dev)?;
        let table = Tensor::ones((cap, hd), DType::F32, &dev)?;
        let err = rope_kv_append_at(&cache, &qkv, &table, n_h, 0, Some(64)).unwrap_err();
        assert!(err.to_string().contains("needs a CUDA cache"), "{err}");
        let err = decode_attention_at(&qkv, &cache, &table, n_h, 1, 0.5, Some(64)).unwrap_err();
        assert!(err.to_string().contains("needs a CUDA cache"), "{err}");
        Ok(())
    }

    #[test]
    fn argmax_first_picks_the_first_of_ties() -> Result<()> {
        let x = Tensor::new(&[[1f32, 3.0, f32::NAN, 3.0], [f32::NAN; 4]], &Device::Cpu)?;
        assert_eq!(argmax_first(&x)?.to_vec1::<u32>()?, [1, 0]);
        Ok(())
    }
}
