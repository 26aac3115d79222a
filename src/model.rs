//! BitNet b1.58 causal LM: Llama with ternary projections, sub-norms and relu².
//!
//! Reference: transformers `models/bitnet/modular_bitnet.py` (and `models/llama/modeling_llama.py`
//! for the llama-architecture BitNet checkpoints). Data flow per layer:
//! `x → RMSNorm → q/k/v BitLinear → RoPE → KV cache → attention (f32 softmax) → attn_sub_norm →
//! o_proj → +x → RMSNorm → relu²(gate)·up → ffn_sub_norm → down_proj → +x`, then the final norm
//! and the (tied) head. Sub-norms exist only for `model_type: "bitnet"`.

use crate::bitlinear::BitLinear;
use crate::config::Config;
use crate::norm::RmsNorm;
use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Activation, Embedding, Init, VarBuilder};
use std::sync::Arc;

/// Initial KV-cache capacity in positions; the cache grows by this much when full.
const KV_CACHE_CHUNK: usize = 512;

#[derive(Debug, Clone)]
struct RotaryEmbedding {
    /// `[max_positions, head_dim/2]`
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    fn new(cfg: &Config, dtype: DType, dev: &Device) -> Result<Self> {
        let dim = cfg.head_dim();
        let theta = cfg.rope_theta() as f32;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / dim as f32))
            .collect();
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), dev)?;
        let positions = Tensor::arange(0u32, cfg.max_position_embeddings as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    /// Half-split ("rotate_half") rotary embedding of `q`, `k`: `(b, heads, seq, head_dim)`.
    fn apply(&self, q: &Tensor, k: &Tensor, offset: usize) -> Result<(Tensor, Tensor)> {
        let seq_len = q.dim(2)?;
        let cos = self.cos.narrow(0, offset, seq_len)?;
        let sin = self.sin.narrow(0, offset, seq_len)?;
        let q = candle_nn::rotary_emb::rope(&q.contiguous()?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&k.contiguous()?, &cos, &sin)?;
        Ok((q, k))
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: BitLinear,
    k_proj: BitLinear,
    v_proj: BitLinear,
    o_proj: BitLinear,
    attn_sub_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rotary: Arc<RotaryEmbedding>,
    kv_cache: KvCache,
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
            q_proj: BitLinear::new(h, n_h * hd, cfg, vb.pp("q_proj"))?,
            k_proj: BitLinear::new(h, n_kv * hd, cfg, vb.pp("k_proj"))?,
            v_proj: BitLinear::new(h, n_kv * hd, cfg, vb.pp("v_proj"))?,
            o_proj: BitLinear::new(n_h * hd, h, cfg, vb.pp("o_proj"))?,
            attn_sub_norm,
            num_heads: n_h,
            num_kv_heads: n_kv,
            head_dim: hd,
            rotary,
            kv_cache: KvCache::new(2, KV_CACHE_CHUNK),
        })
    }

    fn forward(&mut self, x: &Tensor, mask: Option<&Tensor>, offset: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        // (b, t, heads·hd) → (b, heads, t, hd)
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, self.num_heads, self.head_dim))?
            .transpose(1, 2)?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, self.num_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, self.num_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let (q, k) = self.rotary.apply(&q, &k, offset)?;
        let (k, v) = self.kv_cache.append(&k.contiguous()?, &v.contiguous()?)?;
        let n_rep = self.num_heads / self.num_kv_heads;
        let total = k.dim(2)?;
        // Query heads sharing a KV head are adjacent: group them instead of copying K and V
        // n_rep times. (b, heads, t, hd) → (b, n_kv, n_rep·t, hd)
        let q = q.reshape((b, self.num_kv_heads, n_rep * t, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // (b, n_kv, n_rep·t, T), softmax statistics in f32
        let att = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let att = match mask {
            // (b, n_kv, n_rep, t, T) + (t, T)
            Some(mask) => att
                .reshape((b, self.num_kv_heads, n_rep, t, total))?
                .broadcast_add(mask)?
                .reshape((b, self.num_kv_heads, n_rep * t, total))?,
            None => att,
        };
        // Normalize after the product with V, like PyTorch's CPU flash attention (what
        // transformers' sdpa runs): the rounding then matches the reference more often.
        let exp = att.broadcast_sub(&att.max_keepdim(D::Minus1)?)?.exp()?;
        let inv_sum = exp.sum_keepdim(D::Minus1)?.recip()?;
        let y = exp
            .to_dtype(v.dtype())?
            .matmul(&v)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&inv_sum)?;
        // (b, n_kv, n_rep·t, hd) → (b, heads, t, hd) → (b, t, heads·hd)
        let y = y
            .to_dtype(v.dtype())?
            .reshape((b, self.num_heads, t, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?;
        let y = match &self.attn_sub_norm {
            Some(norm) => norm.forward(&y)?,
            None => y,
        };
        self.o_proj.forward(&y)
    }

    fn clear_kv_cache(&mut self) {
        self.kv_cache.reset()
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: BitLinear,
    up_proj: BitLinear,
    down_proj: BitLinear,
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
            gate_proj: BitLinear::new(h, i, cfg, vb.pp("gate_proj"))?,
            up_proj: BitLinear::new(h, i, cfg, vb.pp("up_proj"))?,
            down_proj: BitLinear::new(i, h, cfg, vb.pp("down_proj"))?,
            ffn_sub_norm,
            act: cfg.activation(),
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.apply(&self.act)?;
        let y = (gate * self.up_proj.forward(x)?)?;
        let y = match &self.ffn_sub_norm {
            Some(norm) => norm.forward(&y)?,
            None => y,
        };
        self.down_proj.forward(&y)
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

    fn forward(&mut self, x: &Tensor, mask: Option<&Tensor>, offset: usize) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, mask, offset)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + h
    }
}

/// A BitNet b1.58 causal language model holding its KV cache.
#[derive(Debug, Clone)]
pub struct BitnetForCausalLM {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`: the embedding matrix when tied.
    lm_head: Tensor,
    vocab_size: usize,
    max_position_embeddings: usize,
    dtype: DType,
    device: Device,
}

impl BitnetForCausalLM {
    /// Builds the model from `vb` (rooted at the checkpoint's top level: `model.*`, `lm_head.*`).
    /// Norms, embeddings and the head load in `vb.dtype()`; ternary projections stay packed.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let dtype = vb.dtype();
        Self::new_with_embedding_dtype(cfg, vb, dtype)
    }

    /// Like [`Self::new`], with the embedding and head held in `embed_dtype`: see
    /// [`embedding_dtype`] for the one choice that is both exact and faster.
    pub fn new_with_embedding_dtype(
        cfg: &Config,
        vb: VarBuilder,
        embed_dtype: DType,
    ) -> Result<Self> {
        cfg.validate()?;
        let vb_m = vb.pp("model");
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed =
            vb_m.get_with_hints_dtype((v, h), "embed_tokens.weight", Init::Const(0.), embed_dtype)?;
        let rotary = Arc::new(RotaryEmbedding::new(cfg, vb.dtype(), vb.device())?);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, rotary.clone(), vb_m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb_m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            vb.get_with_hints_dtype((v, h), "lm_head.weight", Init::Const(0.), embed_dtype)?
        };
        Ok(Self {
            embed_tokens: Embedding::new(embed, cfg.hidden_size),
            layers,
            norm,
            lm_head,
            vocab_size: cfg.vocab_size,
            max_position_embeddings: cfg.max_position_embeddings,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    /// The ternary projections of every layer, in checkpoint order.
    pub fn bitlinears(&self) -> Vec<&BitLinear> {
        self.layers
            .iter()
            .flat_map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
            })
            .collect()
    }

    /// The same model with every ternary projection expanded to dense `dtype` weights (the
    /// benchmark baseline; see [`BitLinear::to_dense`]). The KV cache starts empty.
    pub fn to_dense(&self, dtype: DType) -> Result<Self> {
        let mut dense = self.clone();
        dense.clear_kv_cache();
        for layer in &mut dense.layers {
            let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
            for p in [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ] {
                *p = p.to_dense(dtype)?;
            }
        }
        Ok(dense)
    }

    fn hidden_states(&mut self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, seq_len) = ids.dims2()?;
        if seq_len == 0 {
            bail!("empty input: at least one token id is needed")
        }
        if offset + seq_len > self.max_position_embeddings {
            bail!(
                "sequence of {} positions exceeds max_position_embeddings {}",
                offset + seq_len,
                self.max_position_embeddings
            )
        }
        let cached = self
            .layers
            .first()
            .map_or(0, |l| l.self_attn.kv_cache.current_seq_len());
        if offset != cached {
            bail!(
                "offset {offset} does not match the {cached} positions in the KV cache \
                 (call clear_kv_cache() to start a new sequence)"
            )
        }
        let max_id = ids
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::U32)?
            .to_scalar::<u32>()?;
        if max_id as usize >= self.vocab_size {
            bail!(
                "token id {max_id} is out of range for vocab_size {}",
                self.vocab_size
            )
        }
        let mask = (seq_len > 1)
            .then(|| causal_mask(seq_len, offset, &self.device))
            .transpose()?;
        let mut x = self.embed_tokens.forward(ids)?.to_dtype(self.dtype)?;
        for layer in &mut self.layers {
            x = layer.forward(&x, mask.as_ref(), offset)?;
        }
        self.norm.forward(&x)
    }

    /// Runs `ids: (b, seq)` at positions `offset..offset+seq` and returns the f32 logits of the
    /// last position, `(b, vocab)`.
    pub fn forward(&mut self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let x = self.hidden_states(ids, offset)?;
        // Contiguous: with b > 1 the narrowed rows are strided, which CUDA's matmul refuses.
        let last = x.narrow(1, x.dim(1)? - 1, 1)?.squeeze(1)?.contiguous()?;
        self.project_to_vocab(&last)
    }

    /// Like [`Self::forward`] but returns the logits of every position, `(b, seq, vocab)` f32.
    pub fn forward_all(&mut self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        let x = self.hidden_states(ids, offset)?;
        self.project_to_vocab(&x)
    }

    /// `x: [.., hidden]` → f32 logits `[.., vocab]`.
    fn project_to_vocab(&self, x: &Tensor) -> Result<Tensor> {
        if self.lm_head.dtype() == DType::BF16 && x.dtype() == DType::F32 && self.device.is_cpu() {
            return crate::ops::matmul_bf16_weight(x, &self.lm_head);
        }
        x.to_dtype(self.lm_head.dtype())?
            .broadcast_matmul(&self.lm_head.t()?)?
            .to_dtype(DType::F32)
    }

    pub fn clear_kv_cache(&mut self) {
        for layer in &mut self.layers {
            layer.self_attn.clear_kv_cache()
        }
    }
}

/// The dtype to hold the embedding and head in, given the dtype they are stored in: bf16 when
/// they are stored in bf16 (hub checkpoints are) and the CPU computes in f32, since the head is
/// the largest matrix read per decoded token and bf16 holds those values exactly; otherwise the
/// compute dtype.
pub fn embedding_dtype(stored: DType, compute: DType, device: &Device) -> DType {
    if device.is_cpu() && compute == DType::F32 && stored == DType::BF16 {
        DType::BF16
    } else {
        compute
    }
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
