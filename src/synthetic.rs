//! Synthetic BitNet models at real shapes: seeded random ternary weights built in memory.
//!
//! Benchmarks must not need a download, yet must run at the sizes users run. A preset
//! ([`preset`]) gives the `config.json` of a real checkpoint; [`tensors`] fills a map with the
//! checkpoint's own tensor names — packed `[out/4, in]` U8 codes and `weight_scale` per
//! projection (layout in [`crate::quant`]), random norms and embeddings — and [`build`] hands it to
//! `VarBuilder::from_tensors` → [`BitnetModel::new`], the code path real weights take once
//! their tensors exist. Every tensor is created once, on the target device, and the model keeps
//! the only reference (the tied head is the embedding itself).
//!
//! Presets (shapes checked against the hub `config.json` files):
//! - `2b-4t`: `microsoft/bitnet-b1.58-2B-4T` ([`Config::bitnet_b158_2b_4t`]);
//! - `large`: `1bitLLM/bitnet_b1_58-large` (0.7B, llama arch, SiLU, tied head);
//! - `8b`: `HF1BitLLM/Llama3-8B-1.58-100B-tokens` (Llama-3-8B shapes, untied `lm_head`).

use crate::config::{Config, EosTokenId, HiddenAct, ModelType, QuantMethod, QuantizationConfig};
use crate::model::BitnetModel;
use crate::LoadOptions;
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// The seed `bitnet bench` uses unless told otherwise.
pub const DEFAULT_SEED: u64 = 0x00B1_7E7E;

/// Named presets accepted by [`preset`] besides a `config.json` path.
pub const PRESETS: [&str; 3] = ["2b-4t", "large", "8b"];

/// The config of a named preset, or of a `config.json` file (see [`packed_config`]).
pub fn preset(name: &str) -> Result<Config> {
    let cfg = match name {
        "2b-4t" => Config::bitnet_b158_2b_4t(),
        "large" => llama_bitnet(LlamaShape {
            hidden: 1536,
            intermediate: 4096,
            layers: 24,
            heads: 16,
            kv_heads: 16,
            vocab: 32002,
            max_positions: 2048,
            rope_theta: 10_000.0,
            tied: true,
            bos: 1,
            eos: 2,
        }),
        "8b" => llama_bitnet(LlamaShape {
            hidden: 4096,
            intermediate: 14336,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            vocab: 128256,
            max_positions: 8192,
            rope_theta: 500_000.0,
            tied: false,
            bos: 128000,
            eos: 128009,
        }),
        path if Path::new(path).is_file() => packed_config(Config::from_file(Path::new(path))?),
        other => bail!(
            "unknown preset {other:?}: expected one of {} or a config.json path",
            PRESETS.join(", ")
        ),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// `cfg` as a packed (offline) checkpoint. Checkpoints with latent weights (1bitLLM, or
/// `quantization_mode: "online"`) end up in this same packed layout after loading, so a
/// synthetic model generates that layout directly.
pub fn packed_config(mut cfg: Config) -> Config {
    let q = cfg
        .quantization_config
        .get_or_insert_with(|| QuantizationConfig {
            quant_method: QuantMethod::Bitnet,
            ..Default::default()
        });
    q.quantization_mode = None;
    cfg
}

struct LlamaShape {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    max_positions: usize,
    rope_theta: f64,
    tied: bool,
    bos: u32,
    eos: u32,
}

/// A llama-architecture BitNet config (SiLU MLP, no sub-norms).
fn llama_bitnet(s: LlamaShape) -> Config {
    Config {
        model_type: ModelType::Llama,
        hidden_size: s.hidden,
        intermediate_size: s.intermediate,
        num_hidden_layers: s.layers,
        num_attention_heads: s.heads,
        num_key_value_heads: Some(s.kv_heads),
        vocab_size: s.vocab,
        max_position_embeddings: s.max_positions,
        rope_theta: Some(s.rope_theta),
        hidden_act: HiddenAct::Silu,
        tie_word_embeddings: s.tied,
        bos_token_id: Some(s.bos),
        eos_token_id: Some(EosTokenId::Single(s.eos)),
        ..Config::bitnet_b158_2b_4t()
    }
}

/// `(name suffix, in_features, out_features)` of the seven ternary projections of a layer.
pub fn projections(cfg: &Config) -> [(&'static str, usize, usize); 7] {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.num_key_value_heads() * cfg.head_dim();
    [
        ("self_attn.q_proj", h, q),
        ("self_attn.k_proj", h, kv),
        ("self_attn.v_proj", h, kv),
        ("self_attn.o_proj", q, h),
        ("mlp.gate_proj", h, i),
        ("mlp.up_proj", h, i),
        ("mlp.down_proj", i, h),
    ]
}

/// `(name suffix, size)` of the RMSNorm weights of a layer, BitLinear input norms included.
fn layer_norms(cfg: &Config) -> Vec<(String, usize)> {
    let h = cfg.hidden_size;
    let mut norms = vec![
        ("input_layernorm".to_string(), h),
        ("post_attention_layernorm".to_string(), h),
    ];
    if cfg.has_sub_norms() {
        let q = cfg.num_attention_heads * cfg.head_dim();
        norms.push(("self_attn.attn_sub_norm".into(), q));
        norms.push(("mlp.ffn_sub_norm".into(), cfg.intermediate_size));
    }
    if cfg.bitlinear_input_norm_eps().is_some() {
        for (name, in_features, _) in projections(cfg) {
            norms.push((format!("{name}.rms_norm"), in_features));
        }
    }
    norms
}

/// Parameters of the model `cfg` describes, one per ternary or float weight; the tied head is
/// the embedding and counts once, the per-matrix `weight_scale` scalars do not count.
pub fn parameter_count(cfg: &Config) -> usize {
    let linear: usize = projections(cfg).iter().map(|(_, i, o)| i * o).sum();
    let norms: usize = layer_norms(cfg).iter().map(|(_, n)| n).sum();
    let embedding = cfg.vocab_size * cfg.hidden_size;
    let head = if cfg.tie_word_embeddings {
        0
    } else {
        embedding
    };
    cfg.num_hidden_layers * (linear + norms) + embedding + head + cfg.hidden_size
}

/// All tensors of a checkpoint shaped like `cfg`, under the checkpoint's names, on `device`:
/// packed ternary codes, `weight_scale = sqrt(in)` (keeps activations O(1) through the layers),
/// norms uniform in `1 ± 0.1`, embeddings uniform in `±0.05`. Norms are in `dtype`, the
/// embedding and head in [`embedding_dtype`], so that loading makes no second copy.
pub fn tensors(
    cfg: &Config,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::new();
    // One stream per tensor, numbered in insertion order: the bytes depend on the seed only.
    let mut stream = 0u64;
    let mut next_seed = || {
        stream += 1;
        mix(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let embed_dtype = embedding_dtype(dtype, device);
    let float = |n: usize, shape: &[usize], center: f32, half: f32, s: u64, dt: DType| {
        // Generated in the target dtype: an f32 staging copy of a 128k-row embedding would
        // show in the peak RSS the benchmark reports.
        match dt {
            DType::BF16 => Tensor::from_vec(
                uniform(n, s, center, half, half::bf16::from_f32),
                shape,
                device,
            ),
            _ => Tensor::from_vec(uniform(n, s, center, half, |v| v), shape, device)?.to_dtype(dt),
        }
    };
    map.insert(
        "model.embed_tokens.weight".into(),
        float(v * h, &[v, h], 0.0, 0.05, next_seed(), embed_dtype)?,
    );
    for l in 0..cfg.num_hidden_layers {
        let prefix = format!("model.layers.{l}");
        for (name, in_features, out_features) in projections(cfg) {
            let codes = ternary_codes(out_features / 4 * in_features, next_seed());
            let packed = Tensor::from_vec(codes, (out_features / 4, in_features), device)?;
            let scale =
                Tensor::new(&[(in_features as f32).sqrt()], device)?.to_dtype(DType::BF16)?;
            map.insert(format!("{prefix}.{name}.weight"), packed);
            map.insert(format!("{prefix}.{name}.weight_scale"), scale);
        }
        for (name, n) in layer_norms(cfg) {
            map.insert(
                format!("{prefix}.{name}.weight"),
                float(n, &[n], 1.0, 0.1, next_seed(), dtype)?,
            );
        }
    }
    map.insert(
        "model.norm.weight".into(),
        float(h, &[h], 1.0, 0.1, next_seed(), dtype)?,
    );
    if !cfg.tie_word_embeddings {
        map.insert(
            "lm_head.weight".into(),
            float(v * h, &[v, h], 0.0, 0.05, next_seed(), embed_dtype)?,
        );
    }
    Ok(map)
}

/// The dtype synthetic embeddings and heads are made and held in: stored as bf16, as hub
/// checkpoints store them, so held as [`LoadOptions::head_dtype`] holds those.
pub fn embedding_dtype(dtype: DType, device: &Device) -> DType {
    LoadOptions {
        dtype: Some(dtype),
        ..LoadOptions::new(device)
    }
    .head_dtype(DType::BF16)
}

/// A model shaped like `cfg` with seeded random weights, built through the loading path.
pub fn build(cfg: &Config, seed: u64, dtype: DType, device: &Device) -> Result<BitnetModel> {
    let map = tensors(cfg, seed, dtype, device)?;
    let vb = VarBuilder::from_tensors(map, dtype, device);
    let model = BitnetModel::new_with_head_dtype(cfg, vb, embedding_dtype(dtype, device))?;
    crate::ops::cpu::release_free_memory();
    crate::ops::cpu::wait_for_huge_pages();
    Ok(model)
}

/// `len` seeded random token ids below `vocab`: a prompt for benchmarks.
pub fn token_ids(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix(mix(seed));
    (0..len)
        .map(|_| (((rng.next() >> 32) * vocab as u64) >> 32) as u32)
        .collect()
}

/// splitmix64 finalizer: decorrelates nearby seeds.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// splitmix64 stream.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
}

/// Bytes generated per rayon task. Fixed, so the output does not depend on the thread count.
const CHUNK: usize = 1 << 16;

/// Fills `len` items in parallel chunks, each from its own stream derived from `seed`.
fn generate<T: Send + Default + Clone>(
    len: usize,
    seed: u64,
    per_word: usize,
    fill: impl Fn(u64, &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); len];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = SplitMix(mix(seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)));
            for items in chunk.chunks_mut(per_word) {
                fill(rng.next(), items)
            }
        });
    out
}

/// The 81 bytes whose four 2-bit codes are all valid ternary codes (0, 1, 2; never 3).
fn valid_packed_bytes() -> [u8; 81] {
    let mut table = [0u8; 81];
    for (i, b) in table.iter_mut().enumerate() {
        let (mut n, mut byte) = (i, 0u8);
        for k in 0..4 {
            byte |= ((n % 3) as u8) << (2 * k);
            n /= 3;
        }
        *b = byte;
    }
    table
}

/// `len` packed bytes with independent, uniform {-1, 0, +1} weights: four bytes per random word,
/// each picked among the 81 valid ones by a 16-bit lane (bias < 81/65536).
pub fn ternary_codes(len: usize, seed: u64) -> Vec<u8> {
    let table = valid_packed_bytes();
    generate(len, seed, 4, |word, bytes: &mut [u8]| {
        for (k, b) in bytes.iter_mut().enumerate() {
            let lane = (word >> (16 * k)) & 0xFFFF;
            *b = table[((lane * 81) >> 16) as usize];
        }
    })
}

/// `len` f32 uniform in `±half`: inputs for benchmarks.
pub fn uniform_f32(len: usize, seed: u64, half: f32) -> Vec<f32> {
    uniform(len, seed, 0.0, half, |v| v)
}

/// `len` floats uniform in `center ± half`, two per random word (24 bits each), as `T`.
fn uniform<T: Send + Default + Clone>(
    len: usize,
    seed: u64,
    center: f32,
    half: f32,
    to: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    generate(len, seed, 2, |word, vals: &mut [T]| {
        for (k, v) in vals.iter_mut().enumerate() {
            let u = ((word >> (32 * k + 8)) & 0xFF_FFFF) as f32 / (1u32 << 24) as f32;
            *v = to(center + half * (2.0 * u - 1.0));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::unpack_ternary;

    #[test]
    fn codes_are_valid_and_balanced() {
        let codes = ternary_codes(4 * 10_000, 7);
        let values = unpack_ternary(&codes, 16, 10_000);
        let mut counts = [0usize; 3];
        for v in values {
            assert!((-1..=1).contains(&v), "invalid code {v}");
            counts[(v + 1) as usize] += 1;
        }
        for c in counts {
            assert!(
                (c as f64 / 160_000.0 - 1.0 / 3.0).abs() < 0.01,
                "{counts:?}"
            );
        }
    }

    #[test]
    fn streams_depend_on_seed_only() {
        assert_eq!(ternary_codes(200_000, 3), ternary_codes(200_000, 3));
        assert_ne!(ternary_codes(1000, 3), ternary_codes(1000, 4));
        let u = uniform(100_001, 5, 1.0, 0.1, |v| v);
        assert!(u.iter().all(|v| (0.9..=1.1).contains(v)));
    }

    #[test]
    fn presets_match_the_hub_configs() -> Result<()> {
        let large = preset("large")?;
        assert_eq!(large.head_dim(), 96);
        assert!(large.tie_word_embeddings && !large.has_sub_norms());
        // Llama-3-8B: 8,030,261,248 parameters.
        assert_eq!(parameter_count(&preset("8b")?), 8_030_261_248);
        assert!(preset("nope").is_err());
        Ok(())
    }
}
