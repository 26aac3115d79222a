//! The decode step of one sequence on the CPU without a heap allocation: one new token runs
//! through buffers its [`KvCache`] keeps between steps, on slices instead of tensors (the
//! general path makes ~300 allocator calls a token on the 2-layer fixture). Each op is the
//! general path's own arithmetic in the same order — the fused RMSNorm → int8 quantization,
//! the same BitLinear and attention kernels, relu²·up as [`crate::ops::cpu::Relu2Product`]
//! computes it, the same head kernel — so the logits are the same bits.

use super::{BitnetModel, DecoderLayer, Embed, KvCache, LmHead, Logits, SeqInput};
use crate::bitlinear::BitLinearGroup;
use crate::norm::{rms_norm_row, RmsNorm};
use crate::ops::cpu::{self, AttentionWork, Kernel, QuantizedRows, SeqAttention};
use crate::profile::{timed, Stage};
use candle_core::{bail, CpuStorage, DType, Device, Result, Storage, Tensor};
use candle_nn::Activation;

/// Where a cache keeps its [`DecodeScratch`]. Buffers, not state: a clone of the cache
/// starts without them.
#[derive(Default)]
pub(super) struct ScratchSlot(Option<Box<DecodeScratch>>);

impl Clone for ScratchSlot {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for ScratchSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScratchSlot").finish_non_exhaustive()
    }
}

/// One decode step's buffers, sized on the first step and reused after.
#[derive(Default)]
struct DecodeScratch {
    /// The residual stream, `[hidden]`.
    hidden: Vec<f32>,
    /// A row after its RMSNorm, before it is quantized or reaches the head.
    normed: Vec<f32>,
    /// The int8 input of the next projection.
    acts: QuantizedRows,
    /// `q | k | v`, `[(heads + 2·kv_heads)·head_dim]`.
    qkv: Vec<f32>,
    /// Attention's output, `[heads·head_dim]`.
    attn: Vec<f32>,
    /// `gate | up`, `[2·intermediate]`; relu²(gate)·up overwrites the gate half.
    gate_up: Vec<f32>,
    /// The output of o_proj, then of down_proj, `[hidden]`.
    proj: Vec<f32>,
    /// RoPE at the step's position, `[head_dim / 2]` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    attention: AttentionWork,
    /// The final normed row laid out for the head kernel.
    head_rows: Vec<f32>,
    logits: Vec<f32>,
}

impl DecodeScratch {
    /// Every buffer at the size `model` needs (a no-op from the second step on).
    fn fit(&mut self, model: &BitnetModel) {
        let hidden = model.norm.weight().elem_count();
        let (mut qkv, mut q, mut inter, mut half) = (0, 0, 0, 0);
        for layer in &model.layers {
            let shape = layer.self_attn.shape();
            qkv = qkv.max(shape.q_width() + 2 * shape.kv_width());
            q = q.max(shape.q_width());
            half = half.max(shape.head_dim / 2);
            let gate_up: usize = (layer.mlp.gate_up.parts().iter())
                .map(|p| p.out_features())
                .sum();
            inter = inter.max(gate_up / 2);
        }
        self.hidden.resize(hidden, 0.0);
        self.normed.resize(hidden.max(q).max(inter), 0.0);
        self.qkv.resize(qkv, 0.0);
        self.attn.resize(q, 0.0);
        self.gate_up.resize(2 * inter, 0.0);
        self.proj.resize(hidden, 0.0);
        self.cos.resize(half, 0.0);
        self.sin.resize(half, 0.0);
        self.logits.resize(model.vocab_size, 0.0);
    }
}

impl BitnetModel {
    /// Runs one new token `id` of the sequence in `cache` and appends it; returns the f32
    /// logits `[vocab]`, borrowed from the cache until its next step. The same bits as
    /// [`Self::forward`]`(&[id], cache, Logits::Last)`, which runs this in the same case.
    ///
    /// On the CPU in f32 with a CPU cache, the step runs on buffers the cache keeps: after the
    /// first step sizes them, a step allocates nothing while the KV cache has room (it grows
    /// 256 positions at a time). That takes every layer with both sub-norms, relu² and ternary
    /// weights on CPU tiles (BitNet b1.58 checkpoints); other models ([`Self::to_dense`], no
    /// sub-norms, another activation, a bf16 compute dtype, other devices) run the general
    /// path and copy its logits. A float head other than bf16 multiplies through candle,
    /// allocating as the general path does. Called from outside rayon's pool, a step enters
    /// it once, and rayon's job queue allocates a block every 63 entries; called from a pool
    /// thread, nothing.
    pub fn decode_step<'c>(&self, id: u32, cache: &'c mut KvCache) -> Result<&'c [f32]> {
        if self.decodes_in_place(cache) {
            return self.decode_in_place(id, cache);
        }
        let seq = SeqInput {
            ids: &[id],
            cache: &mut *cache,
            logits: Logits::Last,
        };
        let Some(logits) = self.forward_general(&mut [seq])?.pop().flatten() else {
            bail!("decode step: the forward returned no logits")
        };
        let scratch = cache.scratch.0.get_or_insert_with(Default::default);
        scratch.logits = logits.to_vec1::<f32>()?;
        Ok(&scratch.logits)
    }

    /// Whether [`Self::decode_in_place`] can take a step of `cache`.
    pub(super) fn decodes_in_place(&self, cache: &KvCache) -> bool {
        self.device.is_cpu()
            && self.dtype == DType::F32
            && cache.is_host()
            && self.norm.weight().dtype() == DType::F32
            && self.layers.iter().all(DecoderLayer::decodes_in_place)
    }

    /// The step on the cache's buffers; the caller checked [`Self::decodes_in_place`].
    pub(super) fn decode_in_place<'c>(&self, id: u32, cache: &'c mut KvCache) -> Result<&'c [f32]> {
        self.check_input(&[id], cache)?;
        if rayon::current_thread_index().is_none() {
            // As in `forward_batch`: inside the pool the workers stay awake between ops.
            rayon::scope(|_| self.decode_into_scratch(id, cache))?;
        } else {
            self.decode_into_scratch(id, cache)?;
        }
        match &cache.scratch.0 {
            Some(scratch) => Ok(&scratch.logits),
            None => bail!("decode step: the cache lost its buffers"),
        }
    }

    fn decode_into_scratch(&self, id: u32, cache: &mut KvCache) -> Result<()> {
        // Taken out while the layers append to the cache.
        let mut scratch = cache.scratch.0.take().unwrap_or_default();
        let done = self.decode_layers(id, cache, &mut scratch);
        cache.scratch.0 = Some(scratch);
        done
    }

    fn decode_layers(&self, id: u32, cache: &mut KvCache, s: &mut DecodeScratch) -> Result<()> {
        s.fit(self);
        self.embed_into(id, &mut s.hidden)?;
        let position = cache.len;
        let angles = s.cos.iter_mut().zip(s.sin.iter_mut());
        for ((cos, sin), (c, s)) in angles.zip(self.rotary.angles_at(position)) {
            (*cos, *sin) = (c, s);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            layer.decode(s, cache, i, position)?;
        }
        cache.len = position + 1;
        let hidden = s.hidden.len();
        let normed = &mut s.normed[..hidden];
        timed(Stage::Norms, || rms_norm(&self.norm, &s.hidden, normed))?;
        timed(Stage::Head, || {
            self.head_into(normed, &mut s.head_rows, &mut s.logits)
        })
    }

    /// The embedding row of `id` widened to f32, as the general path's lookup and cast.
    fn embed_into(&self, id: u32, out: &mut [f32]) -> Result<()> {
        let table = match &self.embed_tokens {
            Embed::Table(table) => table.embeddings(),
            Embed::Compact(head) => {
                head.row(id as usize, out);
                return Ok(());
            }
        };
        let (storage, layout) = table.storage_and_layout();
        let Some((start, _)) = layout.contiguous_offsets() else {
            bail!("decode step: the embedding matrix is not contiguous")
        };
        let row = start + id as usize * out.len()..start + (id as usize + 1) * out.len();
        match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => out.copy_from_slice(&v[row]),
            Storage::Cpu(CpuStorage::BF16(v)) => {
                for (o, e) in out.iter_mut().zip(&v[row]) {
                    *o = e.to_f32();
                }
            }
            Storage::Cpu(CpuStorage::F16(v)) => {
                for (o, e) in out.iter_mut().zip(&v[row]) {
                    *o = e.to_f32();
                }
            }
            _ => bail!(
                "decode step: embeddings in {:?} on {:?}",
                table.dtype(),
                table.device().location()
            ),
        }
        Ok(())
    }

    /// `y = head · x`, the kernel the general path's `project_to_vocab` runs.
    fn head_into(&self, x: &[f32], rows: &mut Vec<f32>, y: &mut [f32]) -> Result<()> {
        let w = match &self.lm_head {
            LmHead::Int8(head) => return cpu::matmul_int8(Kernel::best(), x, head, y),
            LmHead::Compact(head) => {
                return cpu::matmul_compact_in(Kernel::best(), x, head, y, rows)
            }
            LmHead::Float(w) => w,
        };
        {
            let (storage, layout) = w.storage_and_layout();
            if let (Storage::Cpu(CpuStorage::BF16(w)), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            {
                return cpu::matmul_bf16_in(Kernel::best(), x, &w[start..end], x.len(), y, rows);
            }
        }
        // Another float head multiplies through candle, as in the general path.
        let x = Tensor::from_slice(x, (1, x.len()), &Device::Cpu)?;
        let logits = self.project_to_vocab(&x)?.flatten_all()?.to_vec1::<f32>()?;
        if logits.len() != y.len() {
            bail!(
                "decode step: {} logits for a vocabulary of {}",
                logits.len(),
                y.len()
            )
        }
        y.copy_from_slice(&logits);
        Ok(())
    }
}

impl DecoderLayer {
    /// Whether [`Self::decode`] can run this layer (see [`BitnetModel::decode_step`]).
    fn decodes_in_place(&self) -> bool {
        let (a, m) = (&self.self_attn, &self.mlp);
        let norms = [&self.input_layernorm, &self.post_attention_layernorm]
            .into_iter()
            .chain(&a.attn_sub_norm)
            .chain(&m.ffn_sub_norm);
        let groups = [&a.qkv, &a.o_proj, &m.gate_up, &m.down_proj];
        a.attn_sub_norm.is_some()
            && m.ffn_sub_norm.is_some()
            && m.act == Activation::Relu2
            && norms.into_iter().all(|n| n.weight().dtype() == DType::F32)
            && groups.iter().all(|g| g.cpu_tiles().is_some())
    }

    /// The layer on the hidden row in `s`: the general path's ops, on slices.
    fn decode(
        &self,
        s: &mut DecodeScratch,
        cache: &mut KvCache,
        layer: usize,
        position: usize,
    ) -> Result<()> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let (Some(attn_sub_norm), Some(ffn_sub_norm)) = (&a.attn_sub_norm, &m.ffn_sub_norm) else {
            bail!("layer {layer}: the decode step needs both sub-norms")
        };
        let shape = a.shape();
        let (hidden, qw, kw, hd) = (
            s.hidden.len(),
            shape.q_width(),
            shape.kv_width(),
            shape.head_dim,
        );
        let inter = ffn_sub_norm.weight().elem_count();
        let qkv = &mut s.qkv[..qw + 2 * kw];
        project(
            &a.qkv,
            (&self.input_layernorm, Stage::Projections),
            &s.hidden,
            (&mut s.normed, &mut s.acts),
            qkv,
        )?;
        let attn = &mut s.attn[..qw];
        timed(Stage::Attention, || {
            let (q, kv) = qkv.split_at_mut(qw);
            let (k, v) = kv.split_at_mut(kw);
            cpu::rope_in_place(q, hd, &s.cos, &s.sin);
            cpu::rope_in_place(k, hd, &s.cos, &s.sin);
            cache.append_host(layer, k, v, shape.kv_heads, hd)?;
            let (k, v, capacity) = cache.host(layer)?;
            let seq = SeqAttention {
                q,
                k,
                v,
                keys: position + 1,
                capacity,
            };
            cpu::attend_in(&mut s.attention, shape, &[seq], attn);
            Ok::<_, candle_core::Error>(())
        })?;
        let proj = &mut s.proj[..hidden];
        project(
            &a.o_proj,
            (attn_sub_norm, Stage::Norms),
            attn,
            (&mut s.normed, &mut s.acts),
            proj,
        )?;
        add_in_place(&mut s.hidden, proj);
        let gate_up = &mut s.gate_up[..2 * inter];
        project(
            &m.gate_up,
            (&self.post_attention_layernorm, Stage::Projections),
            &s.hidden,
            (&mut s.normed, &mut s.acts),
            gate_up,
        )?;
        let (gate, up) = gate_up.split_at_mut(inter);
        // `Relu2Product`'s arithmetic: relu(g)·relu(g)·u, left to right.
        for (g, &u) in gate.iter_mut().zip(&*up) {
            let r = if *g > 0.0 { *g } else { 0.0 };
            *g = r * r * u;
        }
        project(
            &m.down_proj,
            (ffn_sub_norm, Stage::Norms),
            gate,
            (&mut s.normed, &mut s.acts),
            proj,
        )?;
        add_in_place(&mut s.hidden, proj);
        Ok(())
    }
}

/// `group(norm(x))` into `y`: the RMSNorm and int8 quantization of
/// [`QuantizedRows::from_rms_norm`] (through `normed` and `acts`), then the group's kernel.
/// The norm is timed as `norm_stage`: the general path times the norm it fuses with the
/// quantization as a projection, the others as norms.
fn project(
    group: &BitLinearGroup,
    (norm, norm_stage): (&RmsNorm, Stage),
    x: &[f32],
    (normed, acts): (&mut [f32], &mut QuantizedRows),
    y: &mut [f32],
) -> Result<()> {
    let Some((tiles, w_divs)) = group.cpu_tiles() else {
        bail!("decode step: a projection without CPU tiles")
    };
    let normed = &mut normed[..x.len()];
    timed(norm_stage, || rms_norm(norm, x, normed))?;
    timed(Stage::Projections, || {
        acts.requantize(normed, 1, x.len());
        cpu::bitlinear_segments(acts, tiles, w_divs, y)
    })
}

/// One row of an f32 RMSNorm, read in place from the norm's weight.
fn rms_norm(norm: &RmsNorm, x: &[f32], y: &mut [f32]) -> Result<()> {
    let w = norm.weight();
    let (storage, layout) = w.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) if end - start == x.len() => {
            rms_norm_row(x, &v[start..end], norm.eps() as f32, y);
            Ok(())
        }
        _ => bail!(
            "decode step: an RMSNorm weight {:?} in {:?} for {} features",
            w.dims(),
            w.dtype(),
            x.len()
        ),
    }
}

/// The residual connection: `x += y`, as the general path's `x + y`.
fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (x, &y) in x.iter_mut().zip(y) {
        *x += y;
    }
}
