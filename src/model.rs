//! BitNet b1.58 causal LM: Llama with ternary projections, sub-norms and relu².
//!
//! Reference: transformers `models/bitnet/modular_bitnet.py` (and `models/llama/modeling_llama.py`
//! for the llama-architecture BitNet checkpoints). Data flow per layer:
//! `x → RMSNorm → q/k/v BitLinear → RoPE → KV cache → attention (f32 softmax) → attn_sub_norm →
//! o_proj → +x → RMSNorm → relu²(gate)·up → ffn_sub_norm → down_proj → +x`, then the final norm
//! and the (tied) head. Sub-norms exist only for `model_type: "bitnet"`.

use crate::bitlinear::{BitLinear, BitLinearGroup};
use crate::config::Config;
use crate::norm::RmsNorm;
use crate::ops::cpu::{self, AttentionShape, SeqAttention};
use crate::profile::{timed, Stage};
use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::{Activation, Embedding, Init, VarBuilder};
use std::sync::{Arc, OnceLock};

mod decode;
#[cfg(feature = "cuda")]
mod graph;
#[cfg(feature = "cuda")]
pub use graph::CUDA_GRAPH_ENV;

/// KV-cache capacity is allocated in steps of this many positions.
const KV_CACHE_CHUNK: usize = 256;

#[derive(Debug, Clone)]
struct RotaryEmbedding {
    /// `[head_dim/2]`: each pair's angle per position.
    inv_freq: Vec<f32>,
    max_positions: usize,
    dtype: DType,
    device: Device,
    /// `[max_positions, head_dim/2]` cosines and sines in `dtype` for the tensor path (other
    /// devices), built on first use; the CPU path takes them per step from [`Self::angles`].
    tables: OnceLock<(Tensor, Tensor)>,
    /// The same side by side, `[max_positions, head_dim]` (`cos | sin`), for the fused ops.
    table: OnceLock<Tensor>,
}

impl RotaryEmbedding {
    fn new(cfg: &Config, dtype: DType, dev: &Device) -> Result<Self> {
        let dim = cfg.head_dim();
        let theta = cfg.rope_theta() as f32;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / dim as f32))
            .collect();
        let rotary = Self {
            inv_freq,
            max_positions: cfg.max_position_embeddings,
            dtype,
            device: dev.clone(),
            tables: OnceLock::new(),
            table: OnceLock::new(),
        };
        if !dev.is_cpu() {
            rotary.table()?;
        }
        Ok(rotary)
    }

    fn table(&self) -> Result<&Tensor> {
        if let Some(table) = self.table.get() {
            return Ok(table);
        }
        let (cos, sin) = self.tables()?;
        let table = Tensor::cat(&[cos, sin], 1)?;
        Ok(self.table.get_or_init(|| table))
    }

    fn tables(&self) -> Result<&(Tensor, Tensor)> {
        if let Some(tables) = self.tables.get() {
            return Ok(tables);
        }
        let positions: Vec<usize> = (0..self.max_positions).collect();
        let (cos, sin) = self.angles(&positions);
        let shape = (positions.len(), self.inv_freq.len());
        let tables = (
            Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?,
            Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?,
        );
        Ok(self.tables.get_or_init(|| tables))
    }

    /// Cosines and sines `[positions, head_dim/2]` of the angles at `positions`.
    fn angles(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let n = positions.len() * self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for &p in positions {
            for (c, s) in self.angles_at(p) {
                cos.push(c);
                sin.push(s);
            }
        }
        (cos, sin)
    }

    /// Each pair's (cosine, sine) at `position`.
    fn angles_at(&self, position: usize) -> impl Iterator<Item = (f32, f32)> + '_ {
        self.inv_freq.iter().map(move |&f| {
            let angle = position as f32 * f;
            (angle.cos(), angle.sin())
        })
    }

    /// Half-split ("rotate_half") rotary embedding of `x: (1, heads, seq, head_dim)` at
    /// positions `offset..offset + seq`.
    fn rotate(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables()?;
        let seq_len = x.dim(2)?;
        let cos = cos.narrow(0, offset, seq_len)?;
        let sin = sin.narrow(0, offset, seq_len)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

/// One sequence's keys and values for every layer. The caller owns it (one per sequence) and
/// passes it to each forward; [`BitnetModel::new_kv_cache`] makes an empty one.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    /// The buffers of [`BitnetModel::decode_step`], kept between steps.
    scratch: decode::ScratchSlot,
    /// CUDA: the one-token step captured for this cache's buffers.
    #[cfg(feature = "cuda")]
    graph: graph::GraphSlot,
}

/// One layer's keys and values.
#[derive(Debug, Clone)]
enum LayerKv {
    /// CPU: `[kv_heads, capacity, head_dim]` each (a head's positions contiguous, as
    /// attention streams them), appended in place.
    Host {
        k: HostRows,
        v: HostRows,
        capacity: usize,
    },
    /// Other devices: keys, then values, `[2, kv_heads, capacity, head_dim]` in the compute
    /// dtype (the layout of [`crate::ops::rope_kv_append`]), allocated on first use.
    Device(Option<Tensor>),
}

/// A CPU cache's keys or values in the model's [`crate::KvDtype`].
#[derive(Debug, Clone)]
enum HostRows {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl HostRows {
    fn new(dtype: crate::KvDtype) -> Self {
        match dtype {
            crate::KvDtype::F32 => HostRows::F32(vec![]),
            crate::KvDtype::F16 => HostRows::F16(vec![]),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            HostRows::F32(rows) => rows.capacity() * 4,
            HostRows::F16(rows) => rows.capacity() * 2,
        }
    }

    fn rows(&self) -> cpu::KvRows<'_> {
        match self {
            HostRows::F32(rows) => cpu::KvRows::F32(rows),
            HostRows::F16(rows) => cpu::KvRows::F16(rows),
        }
    }

    /// Writes `rows` (`[t, kv_heads · head_dim]`) at positions `len..` of each of the
    /// `kv_heads` heads, first moving the heads from `capacity` to `grown` positions apart when
    /// that is larger.
    fn append(
        &mut self,
        rows: &[f32],
        len: usize,
        capacity: usize,
        grown: usize,
        head: (usize, usize),
    ) {
        match self {
            HostRows::F32(cache) => append_rows(
                cache,
                rows,
                len,
                capacity,
                grown,
                head,
                <[f32]>::copy_from_slice,
            ),
            // F16C where the CPU has it (`half` detects it), 8 values an instruction.
            HostRows::F16(cache) => {
                append_rows(cache, rows, len, capacity, grown, head, |to, from| {
                    half::slice::HalfFloatSliceExt::convert_from_f32_slice(to, from)
                })
            }
        }
    }
}

/// [`HostRows::append`] for one element type; `convert` rounds a head's row into it.
fn append_rows<E: Copy + Default>(
    cache: &mut Vec<E>,
    rows: &[f32],
    len: usize,
    capacity: usize,
    grown: usize,
    (kv_heads, head_dim): (usize, usize),
    convert: impl Fn(&mut [E], &[f32]),
) {
    if grown > capacity {
        let mut bigger = vec![E::default(); kv_heads * grown * head_dim];
        for g in 0..kv_heads {
            bigger[g * grown * head_dim..][..len * head_dim]
                .copy_from_slice(&cache[g * capacity * head_dim..][..len * head_dim]);
        }
        *cache = bigger;
    }
    let capacity = capacity.max(grown);
    for (i, row) in rows.chunks_exact(kv_heads * head_dim).enumerate() {
        for (g, head) in row.chunks_exact(head_dim).enumerate() {
            convert(
                &mut cache[(g * capacity + len + i) * head_dim..][..head_dim],
                head,
            );
        }
    }
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the positions and keeps the allocation for the next sequence.
    pub fn clear(&mut self) {
        self.len = 0
    }

    /// Bytes allocated for keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|layer| match layer {
                LayerKv::Host { k, v, .. } => k.bytes() + v.bytes(),
                LayerKv::Device(kv) => kv
                    .as_ref()
                    .map_or(0, |kv| kv.elem_count() * kv.dtype().size_in_bytes()),
            })
            .sum()
    }

    /// Writes the rows `k`, `v`: `[t, kv_heads · head_dim]` at positions `len..len + t` of a
    /// CPU `layer`. Capacity grows a chunk of positions at a time.
    fn append_host(
        &mut self,
        layer: usize,
        k_rows: &[f32],
        v_rows: &[f32],
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let LayerKv::Host { k, v, capacity } = &mut self.layers[layer] else {
            bail!("KV cache of layer {layer} is not on the CPU")
        };
        let width = kv_heads * head_dim;
        let (len, needed) = (self.len, self.len + k_rows.len() / width);
        let grown = if needed > *capacity {
            needed.next_multiple_of(KV_CACHE_CHUNK)
        } else {
            *capacity
        };
        k.append(k_rows, len, *capacity, grown, (kv_heads, head_dim));
        v.append(v_rows, len, *capacity, grown, (kv_heads, head_dim));
        *capacity = grown;
        Ok(())
    }

    /// A CPU layer's keys, values and capacity (the rows appended in this forward included).
    fn host(&self, layer: usize) -> Result<(cpu::KvRows<'_>, cpu::KvRows<'_>, usize)> {
        match &self.layers[layer] {
            LayerKv::Host { k, v, capacity } => Ok((k.rows(), v.rows(), *capacity)),
            LayerKv::Device(_) => bail!("KV cache of layer {layer} is not on the CPU"),
        }
    }

    /// Whether the layers are the CPU's host buffers.
    fn is_host(&self) -> bool {
        matches!(self.layers.first(), Some(LayerKv::Host { .. }))
    }

    /// A device `layer`'s cache `[2, kv_heads, capacity, head_dim]` with room for `needed`
    /// positions: it grows a chunk at a time, keeping the positions held.
    fn device_layer(
        &mut self,
        layer: usize,
        needed: usize,
        (kv_heads, head_dim): (usize, usize),
        like: &Tensor,
    ) -> Result<Tensor> {
        let len = self.len;
        let LayerKv::Device(slot) = &mut self.layers[layer] else {
            bail!("KV cache of layer {layer} is on the CPU, the activations are not")
        };
        let capacity = slot.as_ref().map_or(0, |kv| kv.dim(2).unwrap_or(0));
        if needed > capacity {
            let capacity = needed.next_multiple_of(KV_CACHE_CHUNK);
            let shape = (2, kv_heads, capacity, head_dim);
            let grown = Tensor::zeros(shape, like.dtype(), like.device())?;
            if let Some(old) = slot.as_ref().filter(|_| len > 0) {
                grown.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(grown);
        }
        match slot {
            Some(kv) => Ok(kv.clone()),
            None => bail!("KV cache of layer {layer} was not allocated"),
        }
    }
}

/// Where one sequence's rows sit in a batch, and its first position.
#[derive(Debug, Clone, Copy)]
struct SeqRows {
    start: usize,
    len: usize,
    offset: usize,
}

/// What every layer of one batched forward shares.
struct Step {
    seqs: Vec<SeqRows>,
    /// The caches are the CPU's host buffers (every sequence's: checked once per step).
    host: bool,
    /// A decode step on device caches: layers that can run the fused ops of
    /// [`crate::ops`] do (about ten launches a layer on CUDA; `docs/cuda-decode.md`).
    fused: bool,
    /// CPU: each row's RoPE cosines and sines, `[rows, head_dim/2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// A step captured in a CUDA graph: the device addresses of the position (an i32) and the
    /// attention length the fused attention ops read, instead of the rows' offsets.
    positions: Option<(u64, u64)>,
}

#[derive(Debug, Clone)]
struct Attention {
    /// q, k and v.
    qkv: BitLinearGroup,
    o_proj: BitLinearGroup,
    attn_sub_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rotary: Arc<RotaryEmbedding>,
}

impl Attention {
    fn new(cfg: &Config, rotary: Arc<RotaryEmbedding>, vb: VarBuilder) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (n_h, n_kv) = (cfg.num_attention_heads, cfg.num_key_value_heads());
        let attn_sub_norm = if cfg.has_sub_norms() || vb.contains_tensor("attn_sub_norm.weight") {
            Some(RmsNorm::new(
                n_h * hd,
                cfg.rms_norm_eps,
                vb.pp("attn_sub_norm"),
            )?)
        } else {
            None
        };
        Ok(Self {
            qkv: BitLinearGroup::new(vec![
                BitLinear::new(h, n_h * hd, cfg, vb.pp("q_proj"))?,
                BitLinear::new(h, n_kv * hd, cfg, vb.pp("k_proj"))?,
                BitLinear::new(h, n_kv * hd, cfg, vb.pp("v_proj"))?,
            ])?,
            o_proj: BitLinearGroup::new(vec![BitLinear::new(n_h * hd, h, cfg, vb.pp("o_proj"))?])?,
            attn_sub_norm,
            num_heads: n_h,
            num_kv_heads: n_kv,
            head_dim: hd,
            rotary,
        })
    }

    /// `x: (1, rows, hidden)` holding every sequence's rows, before `input_norm`; each sequence
    /// attends over its own cache, so its result does not depend on the others in the batch.
    fn forward(
        &self,
        x: &Tensor,
        input_norm: &RmsNorm,
        step: &Step,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        // (1, rows, heads·hd), projected once for the whole batch.
        let [q, k, v] = outputs(self.qkv.forward_normed(x, input_norm)?)?;
        let y = timed(Stage::Attention, || {
            if step.host {
                self.attend_host(&q, &k, &v, step, caches, layer)
            } else {
                self.attend_device(&q, &k, &v, &step.seqs, caches, layer)
            }
        })?;
        let [y] = outputs(project(&self.o_proj, &y, self.attn_sub_norm.as_ref())?)?;
        Ok(y)
    }

    fn shape(&self) -> AttentionShape {
        AttentionShape {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// The CPU path: RoPE, cache appends and attention of every row in one pass over f32
    /// buffers ([`cpu::attend`]); `(1, rows, heads·hd)` in q's dtype.
    fn attend_host(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        step: &Step,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        let shape = self.shape();
        let (qw, kw, hd) = (shape.q_width(), shape.kv_width(), self.head_dim);
        let host = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let (mut q_rows, mut k_rows, v_rows) = (host(q)?, host(k)?, host(v)?);
        let half = hd / 2;
        let angles = step.cos.chunks_exact(half).zip(step.sin.chunks_exact(half));
        for ((q, k), (cos, sin)) in q_rows
            .chunks_exact_mut(qw)
            .zip(k_rows.chunks_exact_mut(kw))
            .zip(angles)
        {
            cpu::rope_in_place(q, hd, cos, sin);
            cpu::rope_in_place(k, hd, cos, sin);
        }
        for (s, cache) in step.seqs.iter().zip(caches.iter_mut()) {
            let rows = s.start * kw..(s.start + s.len) * kw;
            cache.append_host(
                layer,
                &k_rows[rows.clone()],
                &v_rows[rows],
                shape.kv_heads,
                hd,
            )?;
        }
        let seqs = step
            .seqs
            .iter()
            .zip(caches.iter())
            .map(|(s, cache)| {
                let (k, v, capacity) = cache.host(layer)?;
                Ok(SeqAttention {
                    q: &q_rows[s.start * qw..(s.start + s.len) * qw],
                    k,
                    v,
                    keys: s.offset + s.len,
                    capacity,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut y = vec![0f32; q_rows.len()];
        cpu::attend(shape, &seqs, &mut y);
        let rows = q.dim(1)?;
        Tensor::from_vec(y, (1, rows, qw), &Device::Cpu)?.to_dtype(q.dtype())
    }

    /// Other devices: each sequence's keys are rotated and appended to its cache with the
    /// values in one op, then its rows attend through candle ops.
    fn attend_device(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seqs: &[SeqRows],
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        let (n_h, hd) = (self.num_heads, self.head_dim);
        // (rows, (n_h + 2 n_kv)·hd): the layout the fused ops read.
        let qkv = Tensor::cat(&[q, k, v], D::Minus1)?.squeeze(0)?;
        let table = self.rotary.table()?;
        let ys = seqs
            .iter()
            .zip(caches.iter_mut())
            .map(|(s, cache)| {
                let qkv = qkv.narrow(0, s.start, s.len)?;
                let total = s.offset + s.len;
                let kv = cache.device_layer(layer, total, (self.num_kv_heads, hd), &qkv)?;
                crate::ops::rope_kv_append(&kv, &qkv, table, n_h, s.offset)?;
                // (t, n_h·hd) → (1, n_h, t, hd)
                let q = (qkv.narrow(1, 0, n_h * hd)?)
                    .reshape((1, s.len, n_h, hd))?
                    .transpose(1, 2)?;
                let q = self.rotary.rotate(&q, s.offset)?;
                // (1, n_kv, total, hd) views of the cache
                let plane = |i: usize| kv.get(i)?.narrow(1, 0, total)?.unsqueeze(0);
                self.attend(&q, &plane(0)?, &plane(1)?, s)
            })
            .collect::<Result<Vec<_>>>()?;
        match ys.as_slice() {
            [y] => Ok(y.clone()),
            _ => Tensor::cat(&ys, 1),
        }
    }

    /// The fused decode step's attention: `qkv: [rows, (n_h + 2 n_kv)·hd]`, one row per
    /// sequence; each row's key and value appended to its cache and its queries attending
    /// over the cache, two ops a sequence. `[rows, n_h·hd]`.
    fn attend_decode(
        &self,
        qkv: &Tensor,
        step: &Step,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        let table = self.rotary.table()?;
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let (pos_at, len_at) = step.positions.unzip();
        let ys = (step.seqs.iter())
            .zip(caches.iter_mut())
            .map(|(s, cache)| {
                let row = qkv.narrow(0, s.start, 1)?;
                let shape = (self.num_kv_heads, self.head_dim);
                let kv = cache.device_layer(layer, s.offset + 1, shape, &row)?;
                let n_h = self.num_heads;
                crate::ops::rope_kv_append_at(&kv, &row, table, n_h, s.offset, pos_at)?;
                crate::ops::decode_attention_at(&row, &kv, table, n_h, s.offset + 1, scale, len_at)
            })
            .collect::<Result<Vec<_>>>()?;
        match ys.as_slice() {
            [y] => y.unsqueeze(0),
            _ => Tensor::stack(&ys, 0),
        }
    }

    /// Whether the fused decode ops take this attention (the kernel's head limits).
    fn can_fuse(&self) -> bool {
        self.qkv.is_stacked()
            && self.o_proj.is_stacked()
            && self.attn_sub_norm.is_some()
            && self.num_heads / self.num_kv_heads <= crate::ops::ATTN_MAX_GROUP
            && self.head_dim <= crate::ops::ATTN_MAX_HEAD_DIM
    }

    /// `q: (1, heads, t, hd)` against `k`, `v`: `(1, kv_heads, T, hd)` → `(1, t, heads·hd)`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, s: &SeqRows) -> Result<Tensor> {
        let (t, total) = (s.len, k.dim(2)?);
        let n_rep = self.num_heads / self.num_kv_heads;
        // Query heads sharing a KV head are adjacent: group them instead of copying K and V
        // n_rep times. (1, heads, t, hd) → (1, n_kv, n_rep·t, hd)
        let q = q.reshape((1, self.num_kv_heads, n_rep * t, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // (1, n_kv, n_rep·t, T), softmax statistics in f32
        let att = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let att = if t > 1 {
            // (1, n_kv, n_rep, t, T) + (t, T)
            att.reshape((1, self.num_kv_heads, n_rep, t, total))?
                .broadcast_add(&causal_mask(t, s.offset, q.device())?)?
                .reshape((1, self.num_kv_heads, n_rep * t, total))?
        } else {
            att
        };
        // Normalize after the product with V, like PyTorch's CPU flash attention (what
        // transformers' sdpa runs): the rounding then matches the reference more often.
        let exp = att.broadcast_sub(&att.max_keepdim(D::Minus1)?)?.exp()?;
        let inv_sum = exp.sum_keepdim(D::Minus1)?.recip()?;
        let y = exp
            .to_dtype(v.dtype())?
            .matmul(v)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&inv_sum)?;
        // (1, n_kv, n_rep·t, hd) → (1, heads, t, hd) → (1, t, heads·hd)
        y.to_dtype(v.dtype())?
            .reshape((1, self.num_heads, t, self.head_dim))?
            .transpose(1, 2)?
            .reshape((1, t, self.num_heads * self.head_dim))
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    /// gate and up.
    gate_up: BitLinearGroup,
    down_proj: BitLinearGroup,
    ffn_sub_norm: Option<RmsNorm>,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let ffn_sub_norm = if cfg.has_sub_norms() || vb.contains_tensor("ffn_sub_norm.weight") {
            Some(RmsNorm::new(i, cfg.rms_norm_eps, vb.pp("ffn_sub_norm"))?)
        } else {
            None
        };
        Ok(Self {
            gate_up: BitLinearGroup::new(vec![
                BitLinear::new(h, i, cfg, vb.pp("gate_proj"))?,
                BitLinear::new(h, i, cfg, vb.pp("up_proj"))?,
            ])?,
            down_proj: BitLinearGroup::new(vec![BitLinear::new(i, h, cfg, vb.pp("down_proj"))?])?,
            ffn_sub_norm,
            act: cfg.activation(),
        })
    }
}

impl Mlp {
    /// `x` before `input_norm`.
    fn forward(&self, x: &Tensor, input_norm: &RmsNorm) -> Result<Tensor> {
        let [gate, up] = outputs(self.gate_up.forward_normed(x, input_norm)?)?;
        let y = match self.act {
            Activation::Relu2 if gate.device().is_cpu() => {
                gate.apply_op2_no_bwd(&up, &cpu::Relu2Product)?
            }
            _ => (gate.apply(&self.act)? * up)?,
        };
        let [y] = outputs(project(&self.down_proj, &y, self.ffn_sub_norm.as_ref())?)?;
        Ok(y)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &Config, rotary: Arc<RotaryEmbedding>, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::new(cfg, rotary, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: RmsNorm::new(h, eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(h, eps, vb.pp("post_attention_layernorm"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        step: &Step,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        if step.fused && self.can_fuse() {
            return self.forward_fused(x, step, caches, layer);
        }
        let h = (self.self_attn).forward(x, &self.input_layernorm, step, caches, layer)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&x, &self.post_attention_layernorm)?;
        x + h
    }

    fn can_fuse(&self) -> bool {
        let m = &self.mlp;
        self.self_attn.can_fuse()
            && m.gate_up.is_stacked()
            && m.down_proj.is_stacked()
            && m.ffn_sub_norm.is_some()
            && m.act == Activation::Relu2
    }

    /// One token per sequence through the fused ops: each RMSNorm quantizes straight to int8
    /// for the projections after it, q/k/v and gate/up are one stacked BitLinear each, the
    /// residuals are added by the projections before them, relu²·up by the norm after it.
    /// `x: (1, rows, hidden)`.
    fn forward_fused(
        &self,
        x: &Tensor,
        step: &Step,
        caches: &mut [&mut KvCache],
        layer: usize,
    ) -> Result<Tensor> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let (Some(attn_sub_norm), Some(ffn_sub_norm)) = (&a.attn_sub_norm, &m.ffn_sub_norm) else {
            bail!("layer {layer}: the fused decode step needs both sub-norms")
        };
        let dtype = x.dtype();
        let x = x.squeeze(0)?;
        let qkv =
            a.qkv
                .forward_quantized(&quantize_normed(&x, &self.input_layernorm)?, None, dtype)?;
        let y = timed(Stage::Attention, || {
            a.attend_decode(&qkv, step, caches, layer)
        })?;
        let acts = quantize_normed(&y, attn_sub_norm)?;
        let x = a.o_proj.forward_quantized(&acts, Some(&x), dtype)?;
        let acts = quantize_normed(&x, &self.post_attention_layernorm)?;
        let gate_up = m.gate_up.forward_quantized(&acts, None, dtype)?;
        let acts = timed(Stage::Norms, || {
            crate::ops::relu2_rms_norm_quantize(
                &gate_up,
                ffn_sub_norm.weight(),
                ffn_sub_norm.eps() as f32,
            )
        })?;
        m.down_proj
            .forward_quantized(&acts, Some(&x), dtype)?
            .unsqueeze(0)
    }
}

/// `norm(x)` quantized to int8 in one op ([`crate::ops::rms_norm_quantize`]).
fn quantize_normed(x: &Tensor, norm: &RmsNorm) -> Result<crate::ops::QuantizedActivations> {
    timed(Stage::Norms, || {
        crate::ops::rms_norm_quantize(x, norm.weight(), norm.eps() as f32)
    })
}

/// Which logits a sequence wants from a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prompt chunk that does not end the prompt).
    None,
    /// The last position's: `(vocab,)`.
    Last,
    /// Every position's: `(len, vocab)`.
    All,
}

/// One sequence's part of a batched forward: new token ids after what `cache` holds.
pub struct SeqInput<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
    pub logits: Logits,
}

/// The LM head's weights.
#[derive(Debug, Clone)]
enum LmHead {
    /// `[vocab, hidden]`: the embedding matrix when tied.
    Float(Tensor),
    /// A bf16 head stored in 12 bits a weight (CPU with AVX-512, f32 activations): the same
    /// logits, bit for bit, from 3/4 of the bytes.
    Compact(Arc<cpu::CompactBf16Head>),
    /// Per-row int8 ([`crate::HeadDtype::Int8`]), CPU only.
    Int8(Arc<crate::ops::Int8Head>),
}

/// The token embedding table.
#[derive(Debug, Clone)]
enum Embed {
    Table(Embedding),
    /// The tied head's compact storage, read a row at a time: no second copy of the matrix.
    Compact(Arc<cpu::CompactBf16Head>),
}

impl Embed {
    /// `(1, ids, hidden)` in the table's dtype.
    fn forward(&self, ids: Vec<u32>, dev: &Device) -> Result<Tensor> {
        let n = ids.len();
        match self {
            Embed::Table(table) => table.forward(&Tensor::from_vec(ids, (1, n), dev)?),
            Embed::Compact(head) => {
                let h = head.hidden();
                let mut rows = vec![half::bf16::ZERO; n * h];
                for (row, &id) in rows.chunks_exact_mut(h).zip(&ids) {
                    head.row(id as usize, row);
                }
                Tensor::from_vec(rows, (1, n, h), dev)
            }
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Embed::Table(table) => table.embeddings().dtype(),
            Embed::Compact(_) => DType::BF16,
        }
    }
}

/// Set to `0` to keep a CPU's bf16 head as it is in the checkpoint instead of the compact
/// storage ([`cpu::CompactBf16Head`]): same logits, more bytes per token (for comparisons).
pub const COMPACT_HEAD_ENV: &str = "CANDLE_BITNET_COMPACT_HEAD";

/// The weights of a BitNet b1.58 causal LM: immutable, `Send + Sync`, shared (`Arc`) by every
/// sequence; each sequence's state is its own [`KvCache`].
#[derive(Debug, Clone)]
pub struct BitnetModel {
    embed_tokens: Embed,
    layers: Vec<DecoderLayer>,
    rotary: Arc<RotaryEmbedding>,
    norm: RmsNorm,
    lm_head: LmHead,
    vocab_size: usize,
    max_position_embeddings: usize,
    dtype: DType,
    device: Device,
    kv_dtype: crate::KvDtype,
}

impl BitnetModel {
    /// Builds the model from `vb` (rooted at the checkpoint's top level: `model.*`, `lm_head.*`).
    /// Norms, embeddings and the head load in `vb.dtype()`; ternary projections stay packed.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let dtype = vb.dtype();
        Self::new_with_head_dtype(cfg, vb, dtype)
    }

    /// Like [`Self::new`], with the embedding and head held in `head_dtype`
    /// ([`crate::LoadOptions`] picks it).
    pub fn new_with_head_dtype(cfg: &Config, vb: VarBuilder, head_dtype: DType) -> Result<Self> {
        cfg.validate()?;
        let vb_m = vb.pp("model");
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed =
            vb_m.get_with_hints_dtype((v, h), "embed_tokens.weight", Init::Const(0.), head_dtype)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            vb.get_with_hints_dtype((v, h), "lm_head.weight", Init::Const(0.), head_dtype)?
        };
        let compact = vb.device().is_cpu()
            && vb.dtype() == DType::F32
            && lm_head.dtype() == DType::BF16
            && cpu::CompactBf16Head::is_supported(h)
            && std::env::var_os(COMPACT_HEAD_ENV).is_none_or(|v| v != "0");
        // Built before the layers, so that the bf16 matrix a compact head replaces is freed
        // before their codes arrive: at 2B-4T the two were resident together.
        let (embed_tokens, lm_head) =
            embedding_and_head(embed, lm_head, cfg.tie_word_embeddings, compact)?;
        let rotary = Arc::new(RotaryEmbedding::new(cfg, vb.dtype(), vb.device())?);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let layer = DecoderLayer::new(cfg, rotary.clone(), vb_m.pp(format!("layers.{i}")))?;
                // A CPU layer frees the packed codes it converted, and glibc keeps such holes
                // resident unless asked: at 2B-4T they added 0.35 GB to the peak at load.
                if vb.device().is_cpu() {
                    cpu::release_free_memory();
                }
                Ok(layer)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?;
        Ok(Self {
            embed_tokens,
            layers,
            rotary,
            norm,
            lm_head,
            vocab_size: cfg.vocab_size,
            max_position_embeddings: cfg.max_position_embeddings,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            kv_dtype: crate::KvDtype::F32,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype of norms and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype the embedding matrix (and a float head) is held in.
    pub fn embedding_dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The head quantized per row to int8, when the model uses one ([`Self::with_int8_head`]).
    pub fn int8_head(&self) -> Option<&Arc<crate::ops::Int8Head>> {
        match &self.lm_head {
            LmHead::Int8(head) => Some(head),
            LmHead::Float(_) | LmHead::Compact(_) => None,
        }
    }

    /// The same model with its LM head quantized per row to int8 ([`crate::HeadDtype::Int8`]):
    /// the embedding lookup is unchanged; an untied float head is dropped. CPU only: on another
    /// device this is an error naming the problem.
    pub fn with_int8_head(mut self) -> Result<Self> {
        crate::HeadDtype::Int8
            .check_device(&self.device.location())
            .map_err(candle_core::Error::wrap)?;
        let int8 = match &self.lm_head {
            LmHead::Float(w) => crate::ops::Int8Head::from_tensor(w)?,
            LmHead::Compact(head) => {
                crate::ops::Int8Head::from_bf16(&head.to_bf16(), head.hidden())?
            }
            LmHead::Int8(_) => return Ok(self),
        };
        self.lm_head = LmHead::Int8(Arc::new(int8));
        Ok(self)
    }

    /// The same model with its CPU caches ([`Self::new_kv_cache`]) holding `kv_dtype`; an f16
    /// cache on another device is an error naming the problem.
    pub fn with_kv_dtype(mut self, kv_dtype: crate::KvDtype) -> Result<Self> {
        kv_dtype
            .check_device(&self.device.location())
            .map_err(candle_core::Error::wrap)?;
        self.kv_dtype = kv_dtype;
        Ok(self)
    }

    /// What the caches this model makes hold ([`Self::with_kv_dtype`]).
    pub fn kv_dtype(&self) -> crate::KvDtype {
        self.kv_dtype
    }

    /// Bytes of head weights one decoded token reads.
    pub fn head_bytes(&self) -> usize {
        match &self.lm_head {
            LmHead::Float(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LmHead::Compact(head) => head.bytes(),
            LmHead::Int8(head) => head.bytes(),
        }
    }

    /// Whether the head is the compact bf16 one ([`cpu::CompactBf16Head`]).
    pub fn has_compact_head(&self) -> bool {
        matches!(self.lm_head, LmHead::Compact(_))
    }

    /// The same model with a compact head stored back as a plain bf16 matrix (and a tied
    /// embedding with it): the same logits, from 4/3 of the bytes — the baseline to compare
    /// the compact head with.
    pub fn with_plain_head(mut self) -> Result<Self> {
        let LmHead::Compact(head) = &self.lm_head else {
            return Ok(self);
        };
        let (vocab, hidden) = (head.vocab(), head.hidden());
        let w = Tensor::from_vec(head.to_bf16(), (vocab, hidden), &self.device)?;
        back_with_huge_pages(&w);
        if let Embed::Compact(_) = self.embed_tokens {
            self.embed_tokens = Embed::Table(Embedding::new(w.clone(), hidden));
        }
        self.lm_head = LmHead::Float(w);
        Ok(self)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    /// An empty cache for one sequence; it allocates as positions arrive.
    pub fn new_kv_cache(&self) -> KvCache {
        self.kv_cache(self.device.is_cpu())
    }

    /// A cache for the op-chain attention other devices run, on any device: the CPU tests
    /// check that path against the CPU's own.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn new_tensor_kv_cache(&self) -> KvCache {
        self.kv_cache(false)
    }

    fn kv_cache(&self, host: bool) -> KvCache {
        let layer = if host {
            LayerKv::Host {
                k: HostRows::new(self.kv_dtype),
                v: HostRows::new(self.kv_dtype),
                capacity: 0,
            }
        } else {
            LayerKv::Device(None)
        };
        KvCache {
            layers: vec![layer; self.layers.len()],
            len: 0,
            scratch: Default::default(),
            #[cfg(feature = "cuda")]
            graph: Default::default(),
        }
    }

    /// The ternary projections of every layer, in checkpoint order.
    pub fn bitlinears(&self) -> Vec<&BitLinear> {
        self.layers
            .iter()
            .flat_map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                (a.qkv.parts().iter())
                    .chain(a.o_proj.parts())
                    .chain(m.gate_up.parts())
                    .chain(m.down_proj.parts())
            })
            .collect()
    }

    /// The same model with every ternary projection expanded to dense `dtype` weights (the
    /// benchmark baseline; see [`BitLinear::to_dense`]).
    pub fn to_dense(&self, dtype: DType) -> Result<Self> {
        let mut dense = self.clone();
        for layer in &mut dense.layers {
            let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
            a.qkv = a.qkv.to_dense(dtype)?;
            m.gate_up = m.gate_up.to_dense(dtype)?;
            a.o_proj = a.o_proj.to_dense(dtype)?;
            m.down_proj = m.down_proj.to_dense(dtype)?;
        }
        Ok(dense)
    }

    /// Runs `ids` at the positions after `cache` and appends them to it; the f32 logits of
    /// the last position `(vocab,)`, or of every position `(len, vocab)` with [`Logits::All`].
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let mut out = self.forward_batch(&mut [SeqInput { ids, cache, logits }])?;
        match out.pop().flatten() {
            Some(l) => Ok(l),
            None => bail!("no logits were asked for"),
        }
    }

    /// One step over several sequences: every projection and the head run once over all their
    /// rows together, attention runs per sequence on its own cache. Returns each sequence's
    /// logits as asked for by [`SeqInput::logits`]. On the CPU a sequence's logits are the
    /// same, bit for bit, whatever else is in the batch. One sequence's next token, its last
    /// logits asked for, runs [`Self::decode_step`] where it can.
    pub fn forward_batch(&self, seqs: &mut [SeqInput]) -> Result<Vec<Option<Tensor>>> {
        if let [s] = seqs {
            if let ([id], Logits::Last) = (s.ids, s.logits) {
                if self.decodes_in_place(s.cache) {
                    let logits = self.decode_in_place(*id, s.cache)?;
                    return Ok(vec![Some(Tensor::from_slice(
                        logits,
                        logits.len(),
                        &Device::Cpu,
                    )?)]);
                }
                #[cfg(feature = "cuda")]
                if self.decodes_with_graph(s.cache) {
                    if let Some(logits) = self.decode_graph(*id, s.cache)? {
                        return Ok(vec![Some(logits)]);
                    }
                }
            }
        }
        self.forward_general(seqs)
    }

    /// [`Self::forward_batch`] without the decode step, for the tests that compare the two.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn forward_batch_general(&self, seqs: &mut [SeqInput]) -> Result<Vec<Option<Tensor>>> {
        self.forward_general(seqs)
    }

    /// [`Self::forward_batch`] through tensor ops, for any batch on any device.
    fn forward_general(&self, seqs: &mut [SeqInput]) -> Result<Vec<Option<Tensor>>> {
        if self.device.is_cpu() && rayon::current_thread_index().is_none() {
            // From a pool thread, the step's parallel ops keep the workers awake between them;
            // called from outside, every op would put the caller to sleep and wake it again.
            return rayon::scope(|_| self.forward_general(seqs));
        }
        let mut rows = Vec::with_capacity(seqs.len());
        let mut ids = Vec::new();
        for s in seqs.iter() {
            self.check_input(s.ids, s.cache)?;
            rows.push(SeqRows {
                start: ids.len(),
                len: s.ids.len(),
                offset: s.cache.len,
            });
            ids.extend_from_slice(s.ids);
        }
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let n = ids.len();
        let (cos, sin) = if self.device.is_cpu() {
            let positions: Vec<usize> = (rows.iter())
                .flat_map(|s| s.offset..s.offset + s.len)
                .collect();
            self.rotary.angles(&positions)
        } else {
            (vec![], vec![])
        };
        let host = seqs[0].cache.is_host();
        if seqs.iter().any(|s| s.cache.is_host() != host) {
            bail!("a batch mixes CPU and device KV caches: make them all with new_kv_cache()")
        }
        let fused =
            !host && rows.len() <= crate::ops::GEMV_MAX_ROWS && rows.iter().all(|s| s.len == 1);
        let step = Step {
            seqs: rows,
            host,
            fused,
            cos,
            sin,
            positions: None,
        };
        let rows = &step.seqs;
        let mut caches: Vec<&mut KvCache> = seqs.iter_mut().map(|s| &mut *s.cache).collect();
        let mut x = (self.embed_tokens.forward(ids, &self.device)?).to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &step, &mut caches, i)?;
        }
        for (cache, r) in caches.iter_mut().zip(rows) {
            cache.len = r.offset + r.len;
        }
        // Only the rows whose logits are wanted reach the head, in one product.
        let mut picked = Vec::new();
        for (s, r) in seqs.iter().zip(rows) {
            match s.logits {
                Logits::None => {}
                Logits::Last => picked.push((r.start + r.len - 1) as u32),
                Logits::All => picked.extend((r.start..r.start + r.len).map(|i| i as u32)),
            }
        }
        if picked.is_empty() {
            return Ok(vec![None; seqs.len()]);
        }
        let n_picked = picked.len();
        let x = x.squeeze(0)?;
        let x = if n_picked == n {
            x
        } else {
            x.index_select(&Tensor::from_vec(picked, n_picked, &self.device)?, 0)?
        };
        let x = norm(&self.norm, &x)?;
        let logits = timed(Stage::Head, || self.project_to_vocab(&x))?; // (n_picked, vocab)
        let mut at = 0;
        seqs.iter()
            .zip(rows)
            .map(|(s, r)| {
                Ok(match s.logits {
                    Logits::None => None,
                    Logits::Last => {
                        at += 1;
                        Some(logits.get(at - 1)?)
                    }
                    Logits::All => {
                        at += r.len;
                        Some(logits.narrow(0, at - r.len, r.len)?)
                    }
                })
            })
            .collect()
    }

    /// Token ids are checked here, on the host, before anything reaches the device.
    fn check_input(&self, ids: &[u32], cache: &KvCache) -> Result<()> {
        if ids.is_empty() {
            bail!("empty input: at least one token id is needed")
        }
        if cache.layers.len() != self.layers.len() {
            bail!(
                "KV cache has {} layers, the model {}: make it with new_kv_cache()",
                cache.layers.len(),
                self.layers.len()
            )
        }
        let positions = cache.len.saturating_add(ids.len());
        if positions > self.max_position_embeddings {
            bail!(
                "sequence of {positions} positions exceeds max_position_embeddings {}",
                self.max_position_embeddings
            )
        }
        if let Some(id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            bail!(
                "token id {id} is out of range for vocab_size {}",
                self.vocab_size
            )
        }
        Ok(())
    }

    /// `x: [rows, hidden]` → f32 logits `[rows, vocab]`.
    fn project_to_vocab(&self, x: &Tensor) -> Result<Tensor> {
        let w = match &self.lm_head {
            LmHead::Int8(head) => return crate::ops::matmul_int8_head(x, head),
            LmHead::Compact(head) => return crate::ops::matmul_compact_head(x, head),
            LmHead::Float(w) => w,
        };
        if w.dtype() == DType::BF16 && x.dtype() == DType::F32 && self.device.is_cpu() {
            return crate::ops::matmul_bf16_weight(x, w);
        }
        x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32)
    }
}

/// The candle-transformers-style model: shared weights plus the KV caches of one batch of
/// equal-length sequences, `forward(&mut self, ids, offset)`. Serving code uses
/// [`BitnetModel`] with a [`KvCache`] per sequence instead.
#[derive(Debug, Clone)]
pub struct BitnetForCausalLM {
    model: Arc<BitnetModel>,
    /// One per row of the batch.
    caches: Vec<KvCache>,
}

impl BitnetForCausalLM {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self::from_model(Arc::new(BitnetModel::new(cfg, vb)?)))
    }

    pub fn from_model(model: Arc<BitnetModel>) -> Self {
        Self {
            model,
            caches: vec![],
        }
    }

    /// The shared weights.
    pub fn model(&self) -> &Arc<BitnetModel> {
        &self.model
    }

    /// Runs `ids: (b, seq)` at positions `offset..offset+seq` and returns the f32 logits of the
    /// last position, `(b, vocab)`. The ids are read back to the host (a device sync on CUDA).
    pub fn forward(&mut self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        self.run(ids, offset, Logits::Last)
    }

    /// Like [`Self::forward`] but returns the logits of every position, `(b, seq, vocab)` f32.
    pub fn forward_all(&mut self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        self.run(ids, offset, Logits::All)
    }

    pub fn clear_kv_cache(&mut self) {
        self.caches.clear()
    }

    fn run(&mut self, ids: &Tensor, offset: usize, logits: Logits) -> Result<Tensor> {
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let cached = self.caches.first().map_or(0, KvCache::len);
        if offset != cached {
            bail!(
                "offset {offset} does not match the {cached} positions in the KV cache \
                 (call clear_kv_cache() to start a new sequence)"
            )
        }
        if offset == 0 {
            self.caches = vec![self.model.new_kv_cache(); rows.len()];
        } else if rows.len() != self.caches.len() {
            bail!(
                "batch of {} sequences, the KV cache holds {}",
                rows.len(),
                self.caches.len()
            )
        }
        let mut seqs: Vec<SeqInput> = rows
            .iter()
            .zip(self.caches.iter_mut())
            .map(|(ids, cache)| SeqInput { ids, cache, logits })
            .collect();
        let out = self.model.forward_batch(&mut seqs)?;
        let out = out.into_iter().flatten().collect::<Vec<_>>();
        if out.is_empty() {
            bail!("empty input: at least one sequence is needed")
        }
        Tensor::stack(&out, 0)
    }
}

/// The embedding table and the head from their `[vocab, hidden]` matrices (one tensor twice
/// when tied), as compact storage or as they are; consumes them, so a replaced matrix is freed
/// on return.
fn embedding_and_head(
    embed: Tensor,
    lm_head: Tensor,
    tied: bool,
    compact: bool,
) -> Result<(Embed, LmHead)> {
    let hidden = embed.dim(1)?;
    if !compact {
        back_with_huge_pages(&lm_head);
        return Ok((
            Embed::Table(Embedding::new(embed, hidden)),
            LmHead::Float(lm_head),
        ));
    }
    let head = Arc::new(cpu::CompactBf16Head::from_tensor(&lm_head.contiguous()?)?);
    let embed = if tied {
        Embed::Compact(head.clone())
    } else {
        Embed::Table(Embedding::new(embed, hidden))
    };
    Ok((embed, LmHead::Compact(head)))
}

/// A CPU tensor's memory on huge pages ([`cpu::back_with_huge_pages`]): the head, which a
/// decoded token streams whole.
fn back_with_huge_pages(t: &Tensor) {
    use candle_core::{CpuStorage, Storage};
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::BF16(v)) => cpu::back_with_huge_pages(v),
        Storage::Cpu(CpuStorage::F16(v)) => cpu::back_with_huge_pages(v),
        Storage::Cpu(CpuStorage::F32(v)) => cpu::back_with_huge_pages(v),
        _ => {}
    }
}

/// A group's outputs of `x`, through `norm` first when there is one.
fn project(group: &BitLinearGroup, x: &Tensor, norm: Option<&RmsNorm>) -> Result<Vec<Tensor>> {
    match norm {
        Some(norm) => group.forward_normed(x, norm),
        None => group.forward(x),
    }
}

/// A group's outputs as an array of the size the caller knows it has.
fn outputs<const N: usize>(ys: Vec<Tensor>) -> Result<[Tensor; N]> {
    let n = ys.len();
    <[Tensor; N]>::try_from(ys)
        .map_err(|_| candle_core::Error::Msg(format!("{n} projections, expected {N}")))
}

/// An RMSNorm outside the projections, timed as [`Stage::Norms`].
fn norm(norm: &RmsNorm, x: &Tensor) -> Result<Tensor> {
    timed(Stage::Norms, || norm.forward(x))
}

/// Additive mask `(seq, offset + seq)`: position `i` sees keys `0..=offset + i`.
fn causal_mask(seq_len: usize, offset: usize, dev: &Device) -> Result<Tensor> {
    let total = offset + seq_len;
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (seq_len, total), dev)
}
