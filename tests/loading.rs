//! Checkpoint loading: latent and sharded checkpoints, the llama-architecture variant, memory
//! per weight, and one clear error per kind of bad input.

mod common;

use candle_bitnet::quant::{pack_ternary, ternarize_absmean};
use candle_bitnet::weights::load_model_dir;
use candle_bitnet::{BitnetForCausalLM, BitnetModel, Config};
use candle_core::{DType, Device, Result, Tensor};
use common::fixture_dir;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

fn fixture_tensors() -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)
}

fn fixture_config() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("config.json")).expect("fixture config");
    serde_json::from_str(&text).expect("fixture config json")
}

/// Writes a checkpoint directory: `config.json` and a single `model.safetensors`.
fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::write(dir.join("config.json"), config.to_string())?;
    candle_core::safetensors::save(tensors, dir.join("model.safetensors"))
}

fn prompt() -> Result<Tensor> {
    Tensor::new(
        &[502u32, 225, 358, 31, 315, 501, 169, 7, 99][..],
        &Device::Cpu,
    )?
    .unsqueeze(0)
}

fn logits_of(dir: &Path) -> Result<Tensor> {
    let (_, mut model) = load_model_dir(dir, DType::F32, &Device::Cpu)?;
    model.forward_all(&prompt()?, 0)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
}

/// Replaces every projection of the fixture with random latent f32 weights `[out, in]` and
/// returns them with, beside, the packed checkpoint an offline converter would write for them.
fn latent_and_packed(seed: u64) -> Result<(HashMap<String, Tensor>, HashMap<String, Tensor>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut latent = fixture_tensors()?;
    let mut packed = latent.clone();
    let names: Vec<String> = latent
        .keys()
        .filter(|k| k.ends_with("_proj.weight"))
        .cloned()
        .collect();
    for name in names {
        let (r, inp) = latent[&name].dims2()?;
        let out = 4 * r;
        let w: Vec<f32> = (0..out * inp)
            .map(|_| rng.random_range(-0.05f32..0.05))
            .collect();
        let (values, scale) = ternarize_absmean(&w);
        packed.insert(
            name.clone(),
            Tensor::from_vec(pack_ternary(&values, out, inp)?, (r, inp), &Device::Cpu)?,
        );
        let scale_name = name.replace(".weight", ".weight_scale");
        packed.insert(scale_name.clone(), Tensor::new(&[scale], &Device::Cpu)?);
        latent.remove(&scale_name);
        latent.insert(name, Tensor::from_vec(w, (out, inp), &Device::Cpu)?);
    }
    Ok((latent, packed))
}

#[test]
fn latent_weights_are_ternarized_on_load_like_a_packed_checkpoint() -> Result<()> {
    let (latent, packed) = latent_and_packed(11)?;
    let (latent_dir, packed_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut cfg = fixture_config();
    write_checkpoint(packed_dir.path(), &cfg, &packed)?;
    cfg["quantization_config"] = serde_json::json!({
        "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"
    });
    write_checkpoint(latent_dir.path(), &cfg, &latent)?;
    let from_latent = logits_of(latent_dir.path())?;
    let from_packed = logits_of(packed_dir.path())?;
    // Same codes, same divisor, same kernel: identical bits.
    assert_eq!(max_abs_diff(&from_latent, &from_packed)?, 0.0);
    assert!(from_latent.abs()?.max_all()?.to_scalar::<f32>()? > 0.1);

    // bf16 latent weights load too (the `-bf16` hub checkpoint stores them so).
    let bf16: HashMap<String, Tensor> = latent
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::BF16)?)))
        .collect::<Result<_>>()?;
    write_checkpoint(latent_dir.path(), &cfg, &bf16)?;
    let from_bf16 = logits_of(latent_dir.path())?;
    assert!(from_bf16
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite()));
    Ok(())
}

#[test]
fn autobitlinear_multiplies_by_the_weight_scale() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut tensors = fixture_tensors()?;
    for (k, v) in tensors.iter_mut() {
        if k.ends_with("weight_scale") {
            *v = v.to_dtype(DType::F32)?.recip()?;
        }
    }
    let mut cfg = fixture_config();
    cfg["quantization_config"]["linear_class"] = "autobitlinear".into();
    write_checkpoint(dir.path(), &cfg, &tensors)?;
    let auto = logits_of(dir.path())?;
    let reference = logits_of(&fixture_dir())?;
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
    // 1/(1/s) is s up to an ulp; a rare activation-rounding flip stays small.
    let rel = ((&auto - &reference)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()?
        .sqrt())
        / reference.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    assert!(rel < 1e-2, "rel-L2 {rel} (max |ref| {scale})");
    Ok(())
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tensors = fixture_tensors()?;
    let (mut first, mut second) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (k, v) in tensors {
        let shard = if k.contains("layers.1") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        weight_map.insert(k.clone(), shard.into());
        if shard.contains("00001") {
            first.insert(k, v)
        } else {
            second.insert(k, v)
        };
    }
    candle_core::safetensors::save(&first, dir.path().join("model-00001-of-00002.safetensors"))?;
    candle_core::safetensors::save(&second, dir.path().join("model-00002-of-00002.safetensors"))?;
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )?;
    std::fs::copy(
        fixture_dir().join("config.json"),
        dir.path().join("config.json"),
    )?;
    assert_eq!(
        max_abs_diff(&logits_of(dir.path())?, &logits_of(&fixture_dir())?)?,
        0.0
    );
    Ok(())
}

#[test]
fn llama_architecture_uses_silu_no_sub_norms_and_an_untied_head() -> Result<()> {
    let mut tensors = fixture_tensors()?;
    tensors.retain(|k, _| !k.contains("sub_norm"));
    let embed = tensors["model.embed_tokens.weight"].clone();
    let mut cfg = fixture_config();
    cfg["model_type"] = "llama".into();
    cfg["hidden_act"] = "silu".into();
    cfg["head_dim"] = 32.into();
    cfg["tie_word_embeddings"] = false.into();
    let tied_dir = tempfile::tempdir()?;
    let mut tied_cfg = cfg.clone();
    tied_cfg["tie_word_embeddings"] = true.into();
    write_checkpoint(tied_dir.path(), &tied_cfg, &tensors)?;

    // An untied head of twice the embedding must give exactly twice the logits.
    tensors.insert(
        "lm_head.weight".into(),
        (embed.to_dtype(DType::F32)? * 2.0)?,
    );
    let dir = tempfile::tempdir()?;
    write_checkpoint(dir.path(), &cfg, &tensors)?;
    let untied = logits_of(dir.path())?;
    let tied = logits_of(tied_dir.path())?;
    assert!(max_abs_diff(&untied, &(tied * 2.0)?)? < 1e-4);

    // Missing head in an untied checkpoint: named.
    tensors.remove("lm_head.weight");
    write_checkpoint(dir.path(), &cfg, &tensors)?;
    assert!(load_err(dir.path()).contains("lm_head.weight"));
    Ok(())
}

#[test]
fn ternary_weights_take_two_bits_each_at_the_2b_4t_shapes() -> Result<()> {
    // At the 2B-4T shapes the codes a CPU layer holds — its tiles, and nothing else — are 2
    // bits a weight.
    let mut rng = StdRng::seed_from_u64(3);
    for (out, inp) in [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)] {
        let values: Vec<i8> = (0..out * inp).map(|_| rng.random_range(-1..=1)).collect();
        let packed = Tensor::from_vec(
            pack_ternary(&values, out, inp)?,
            (out / 4, inp),
            &Device::Cpu,
        )?;
        let layer = candle_bitnet::BitLinear::from_packed(packed, 1.0)?;
        assert_eq!(8 * layer.weight_bytes(), 2 * out * inp, "{out}×{inp}");
    }
    // Other shapes pad the tiles to 64 rows and 4 columns: the fixture's 344-row gate and up
    // take 384.
    let (_, model) = load_model_dir(&fixture_dir(), DType::F32, &Device::Cpu)?;
    let layers = model.model().bitlinears();
    let weights: usize = (layers.iter())
        .map(|l| l.in_features() * l.out_features())
        .sum();
    let padded: usize = (layers.iter())
        .map(|l| l.in_features().next_multiple_of(4) * l.out_features().next_multiple_of(64))
        .sum();
    let bytes: usize = layers.iter().map(|l| l.weight_bytes()).sum();
    assert_eq!(4 * bytes, padded);
    let bits = 8.0 * bytes as f64 / weights as f64;
    eprintln!("fixture: {weights} ternary weights in {bytes} bytes = {bits:.4} bits/weight");
    Ok(())
}

fn load_err(dir: &Path) -> String {
    match load_model_dir(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A fixture copy whose tensors went through `edit`.
fn broken_checkpoint(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let mut tensors = fixture_tensors()?;
    edit(&mut tensors);
    write_checkpoint(dir.path(), &fixture_config(), &tensors)?;
    Ok(dir)
}

#[test]
fn missing_files_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    assert!(load_err(&dir.path().join("nope")).contains("does not exist"));
    assert!(load_err(dir.path()).contains("config.json"));
    std::fs::copy(
        fixture_dir().join("config.json"),
        dir.path().join("config.json"),
    )?;
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
    Ok(())
}

#[test]
fn truncated_or_corrupt_safetensors_is_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        fixture_dir().join("config.json"),
        dir.path().join("config.json"),
    )?;
    let bytes = std::fs::read(fixture_dir().join("model.safetensors"))?;
    let weights = dir.path().join("model.safetensors");
    std::fs::write(&weights, &bytes[..bytes.len() / 2])?;
    let e = load_err(dir.path());
    assert!(
        e.contains("safetensors") && e.contains("model.safetensors"),
        "{e}"
    );
    std::fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage")?;
    let e = load_err(dir.path());
    assert!(
        e.contains("safetensors") && e.contains("model.safetensors"),
        "{e}"
    );
    Ok(())
}

#[test]
fn missing_tensor_is_named() -> Result<()> {
    let dir = broken_checkpoint(|t| {
        t.remove("model.layers.1.mlp.down_proj.weight");
    })?;
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("missing"),
        "{e}"
    );
    let dir = broken_checkpoint(|t| {
        t.remove("model.layers.0.self_attn.attn_sub_norm.weight");
    })?;
    assert!(load_err(dir.path()).contains("model.layers.0.self_attn.attn_sub_norm.weight"));
    let dir = broken_checkpoint(|t| {
        t.remove("model.layers.0.self_attn.k_proj.weight_scale");
    })?;
    assert!(load_err(dir.path()).contains("model.layers.0.self_attn.k_proj.weight_scale"));
    Ok(())
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() -> Result<()> {
    let dir = broken_checkpoint(|t| {
        let bad = Tensor::ones((33, 128), DType::U8, &Device::Cpu).expect("tensor");
        t.insert("model.layers.0.self_attn.q_proj.weight".into(), bad);
    })?;
    let e = load_err(dir.path());
    assert!(e.contains("model.layers.0.self_attn.q_proj.weight"), "{e}");
    assert!(
        e.contains("expected shape [32, 128], found [33, 128]"),
        "{e}"
    );
    let dir = broken_checkpoint(|t| {
        let bad = Tensor::ones(127, DType::BF16, &Device::Cpu).expect("tensor");
        t.insert("model.norm.weight".into(), bad);
    })?;
    let e = load_err(dir.path());
    assert!(
        e.contains("model.norm.weight") && e.contains("[128]") && e.contains("[127]"),
        "{e}"
    );
    let dir = broken_checkpoint(|t| {
        let bad = Tensor::ones(2, DType::BF16, &Device::Cpu).expect("tensor");
        t.insert("model.layers.0.mlp.up_proj.weight_scale".into(), bad);
    })?;
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.0.mlp.up_proj.weight_scale") && e.contains("one element"),
        "{e}"
    );
    Ok(())
}

#[test]
fn wrong_dtype_names_tensor_expected_and_found() -> Result<()> {
    let dir = broken_checkpoint(|t| {
        let bad = Tensor::ones((32, 128), DType::F32, &Device::Cpu).expect("tensor");
        t.insert("model.layers.0.self_attn.q_proj.weight".into(), bad);
    })?;
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.weight")
            && e.contains("expected dtype U8")
            && e.contains("F32"),
        "{e}"
    );
    let dir = broken_checkpoint(|t| {
        let bad = Tensor::ones((512, 128), DType::U8, &Device::Cpu).expect("tensor");
        t.insert("model.embed_tokens.weight".into(), bad);
    })?;
    let e = load_err(dir.path());
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("float") && e.contains("U8"),
        "{e}"
    );
    Ok(())
}

fn config_err(edit: impl FnOnce(&mut serde_json::Value)) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let mut cfg = fixture_config();
    edit(&mut cfg);
    write_checkpoint(dir.path(), &cfg, &fixture_tensors()?)?;
    Ok(load_err(dir.path()))
}

#[test]
fn unsupported_config_values_are_named() -> Result<()> {
    // serde names the field's path and the unknown value: `model_type: unknown variant `gpt2``.
    let e = config_err(|c| c["model_type"] = "gpt2".into())?;
    assert!(e.contains("model_type: unknown variant `gpt2`"), "{e}");
    let e = config_err(|c| c["hidden_act"] = "gelu_new".into())?;
    assert!(e.contains("hidden_act: unknown variant `gelu_new`"), "{e}");
    assert!(
        config_err(|c| c["intermediate_size"] = 342.into())?.contains("intermediate_size = 342")
    );
    Ok(())
}

#[test]
fn out_features_not_divisible_by_4_is_refused() -> Result<()> {
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    let cfg = Config::from_file(&fixture_dir().join("config.json"))?;
    let e = candle_bitnet::BitLinear::new(128, 6, &cfg, vb.pp("proj"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("proj.weight") && e.contains("out_features 6"),
        "{e}"
    );
    Ok(())
}

#[test]
fn bad_token_ids_and_over_long_sequences_are_errors() -> Result<()> {
    let (_, mut model) = load_model_dir(&fixture_dir(), DType::F32, &Device::Cpu)?;
    let ids = Tensor::new(&[[502u32, 512]], &Device::Cpu)?;
    let e = model.forward(&ids, 0).unwrap_err().to_string();
    assert!(
        e.contains("token id 512") && e.contains("vocab_size 512"),
        "{e}"
    );
    let empty = Tensor::zeros((1, 0), DType::U32, &Device::Cpu)?;
    assert!(model
        .forward(&empty, 0)
        .unwrap_err()
        .to_string()
        .contains("empty"));

    let dir = tempfile::tempdir()?;
    let mut cfg = fixture_config();
    cfg["max_position_embeddings"] = 8.into();
    write_checkpoint(dir.path(), &cfg, &fixture_tensors()?)?;
    let (_, mut model) = load_model_dir(dir.path(), DType::F32, &Device::Cpu)?;
    let ids = Tensor::new(&[[502u32, 1, 2, 3, 4, 5, 6, 7, 8]], &Device::Cpu)?;
    let e = model.forward(&ids, 0).unwrap_err().to_string();
    assert!(
        e.contains("9 positions") && e.contains("max_position_embeddings 8"),
        "{e}"
    );
    // Decoding past the limit is refused the same way.
    model.forward(&ids.narrow(1, 0, 8)?, 0)?;
    let e = model
        .forward(&Tensor::new(&[[9u32]], &Device::Cpu)?, 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_position_embeddings 8"), "{e}");
    Ok(())
}

#[test]
fn model_builds_from_a_var_builder_of_in_memory_tensors() -> Result<()> {
    let cfg = Config::from_file(&fixture_dir().join("config.json"))?;
    let reference = logits_of(&fixture_dir())?;
    // The loader keeps the bf16-stored head in bf16: the same choice gives the same bits.
    let vb = candle_nn::VarBuilder::from_tensors(fixture_tensors()?, DType::F32, &Device::Cpu);
    let model = BitnetModel::new_with_head_dtype(&cfg, vb, DType::BF16)?;
    let mut model = BitnetForCausalLM::from_model(model.into());
    assert_eq!(
        max_abs_diff(&model.forward_all(&prompt()?, 0)?, &reference)?,
        0.0
    );
    // Plain `new` holds the head in f32: the same values, summed in another order.
    let vb = candle_nn::VarBuilder::from_tensors(fixture_tensors()?, DType::F32, &Device::Cpu);
    let mut model = BitnetForCausalLM::new(&cfg, vb)?;
    assert!(max_abs_diff(&model.forward_all(&prompt()?, 0)?, &reference)? < 1e-4);
    Ok(())
}

#[test]
fn an_offset_that_disagrees_with_the_kv_cache_is_an_error() -> Result<()> {
    let (_, mut model) = load_model_dir(&fixture_dir(), DType::F32, &Device::Cpu)?;
    model.forward(&prompt()?, 0)?;
    let e = model.forward(&prompt()?, 0).unwrap_err().to_string();
    assert!(
        e.contains("offset 0") && e.contains("9 positions") && e.contains("clear_kv_cache"),
        "{e}"
    );
    let next = Tensor::new(&[[5u32]], &Device::Cpu)?;
    assert!(model.forward(&next, 3).is_err());
    model.forward(&next, 9)?;
    model.clear_kv_cache();
    model.forward(&prompt()?, 0)?;
    Ok(())
}

#[test]
fn corrupt_ternary_codes_are_refused() -> Result<()> {
    let dir = broken_checkpoint(|t| {
        let name = "model.layers.1.self_attn.v_proj.weight";
        let mut bytes = t[name]
            .flatten_all()
            .and_then(|w| w.to_vec1::<u8>())
            .expect("codes");
        bytes[77] = 0b0011_0101; // code 3 in bit field 2
        t.insert(
            name.into(),
            Tensor::from_vec(bytes, t[name].shape(), &Device::Cpu).expect("tensor"),
        );
    })?;
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.1.self_attn.v_proj.weight")
            && e.contains("byte 77")
            && e.contains("code 3"),
        "{e}"
    );
    Ok(())
}

#[test]
fn use_rms_norm_adds_a_norm_on_every_bitlinear_input() -> Result<()> {
    let mut cfg = fixture_config();
    cfg["quantization_config"]["use_rms_norm"] = true.into();
    let mut tensors = fixture_tensors()?;
    let dir = tempfile::tempdir()?;
    write_checkpoint(dir.path(), &cfg, &tensors)?;
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.rms_norm.weight"),
        "{e}"
    );

    let mut rng = StdRng::seed_from_u64(3);
    let projections: Vec<(String, usize)> = tensors
        .iter()
        .filter(|(k, _)| k.ends_with("_proj.weight"))
        .map(|(k, v)| {
            (
                k.replace(".weight", ".rms_norm.weight"),
                v.dim(1).expect("in"),
            )
        })
        .collect();
    for (name, n) in projections {
        let w: Vec<f32> = (0..n).map(|_| rng.random_range(0.5f32..1.5)).collect();
        tensors.insert(name, Tensor::from_vec(w, n, &Device::Cpu)?);
    }
    write_checkpoint(dir.path(), &cfg, &tensors)?;
    let normed = logits_of(dir.path())?;
    let plain = logits_of(&fixture_dir())?;
    assert!(normed
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite()));
    assert!(max_abs_diff(&normed, &plain)? > 1e-3);
    Ok(())
}

#[test]
fn bitlinear_from_packed_codes_matches_the_loaded_layer() -> Result<()> {
    use candle_core::Module;
    let (_, model) = load_model_dir(&fixture_dir(), DType::F32, &Device::Cpu)?;
    // The CPU keeps only its tiles: the codes they give back are the checkpoint's, byte for byte.
    let tensors = fixture_tensors()?;
    let names = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    ]
    .into_iter()
    .chain(["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]);
    let layers = model.model().bitlinears();
    for (i, (layer, name)) in layers.iter().zip(names.cycle()).enumerate() {
        let name = format!("model.layers.{}.{name}.weight", i / 7);
        let packed = layer.packed_weight()?;
        assert_eq!(packed.dtype(), DType::U8);
        assert_eq!(
            packed.flatten_all()?.to_vec1::<u8>()?,
            tensors[&name].flatten_all()?.to_vec1::<u8>()?,
            "{name}"
        );
    }
    let loaded = layers[4];
    let rebuilt = candle_bitnet::BitLinear::from_packed(loaded.packed_weight()?, loaded.w_div())?;
    let mut rng = StdRng::seed_from_u64(9);
    let x: Vec<f32> = (0..3 * loaded.in_features())
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    let x = Tensor::from_vec(x, (3, loaded.in_features()), &Device::Cpu)?;
    assert_eq!(
        max_abs_diff(&loaded.forward(&x)?, &rebuilt.forward(&x)?)?,
        0.0
    );
    assert_eq!(rebuilt.out_features(), loaded.out_features());
    let bad = Tensor::zeros((4, 8), DType::F32, &Device::Cpu)?;
    assert!(candle_bitnet::BitLinear::from_packed(bad, 1.0).is_err());
    assert!(candle_bitnet::BitLinear::from_packed(loaded.packed_weight()?, 0.0).is_err());
    Ok(())
}
