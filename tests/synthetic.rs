//! Synthetic models: presets with the documented shapes, built through the loading path,
//! deterministic per seed, and held at ~2 bits per ternary weight. Not timed.

use candle_bitnet::bench::{self, BenchOptions};
use candle_bitnet::config::{Config, ModelType};
use candle_bitnet::synthetic;
use candle_bitnet::Logits;
use candle_core::{DType, Device, Result, Tensor};

/// The `2b-4t` preset at toy sizes: same architecture, same code paths.
fn tiny_bitnet() -> Config {
    Config {
        hidden_size: 64,
        intermediate_size: 176,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(1),
        vocab_size: 300,
        ..Config::bitnet_b158_2b_4t()
    }
}

/// The `8b` preset (llama arch, untied head) at toy sizes.
fn tiny_llama() -> Result<Config> {
    Ok(Config {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        vocab_size: 200,
        ..synthetic::preset("8b")?
    })
}

fn logits(cfg: &Config, seed: u64) -> Result<Tensor> {
    let model = synthetic::build(cfg, seed, DType::F32, &Device::Cpu)?;
    let ids = synthetic::token_ids(9, cfg.vocab_size, 1);
    model.forward(&ids, &mut model.new_kv_cache(), Logits::All)
}

#[test]
fn preset_2b_4t_has_the_documented_shapes() -> Result<()> {
    let cfg = synthetic::preset("2b-4t")?;
    assert_eq!(cfg.model_type, ModelType::Bitnet);
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        ),
        (2560, 6912, 30)
    );
    assert_eq!(
        (cfg.num_attention_heads, cfg.num_key_value_heads()),
        (20, 5)
    );
    assert_eq!((cfg.vocab_size, cfg.head_dim()), (128256, 128));
    assert!(cfg.tie_word_embeddings && cfg.has_sub_norms());
    assert_eq!(synthetic::parameter_count(&cfg), 2_412_820_480);
    Ok(())
}

#[test]
fn tiny_models_build_and_give_finite_logits() -> Result<()> {
    for cfg in [tiny_bitnet(), tiny_llama()?] {
        let logits = logits(&cfg, 3)?;
        assert_eq!(logits.dims(), [9, cfg.vocab_size]);
        let values = logits.flatten_all()?.to_vec1::<f32>()?;
        assert!(values.iter().all(|v| v.is_finite()), "{}", cfg.model_type);
        // Random weights must not collapse to a constant output.
        assert!(logits.max_all()?.to_scalar::<f32>()? > logits.min_all()?.to_scalar::<f32>()?);
    }
    Ok(())
}

#[test]
fn same_seed_same_logits() -> Result<()> {
    let cfg = tiny_bitnet();
    let a = logits(&cfg, 42)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, logits(&cfg, 42)?.flatten_all()?.to_vec1::<f32>()?);
    assert_ne!(a, logits(&cfg, 43)?.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

#[test]
fn ternary_weights_take_two_bits_of_their_padded_shape() -> Result<()> {
    let cfg = tiny_bitnet();
    let model = synthetic::build(&cfg, 0, DType::F32, &Device::Cpu)?;
    let layers = model.bitlinears();
    assert_eq!(layers.len(), 7 * cfg.num_hidden_layers);
    // 2 bits a weight of the shapes the CPU tiles pad to (64 rows, 4 columns): 176 rows take 192.
    let padded: usize = (layers.iter())
        .map(|l| l.in_features().next_multiple_of(4) * l.out_features().next_multiple_of(64))
        .sum();
    let bytes: usize = layers.iter().map(|l| l.weight_bytes()).sum();
    assert_eq!(4 * bytes, padded);
    Ok(())
}

#[test]
fn bench_runs_on_a_config_json_and_writes_every_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = BenchOptions {
        preset: concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-bitnet/config.json"
        )
        .into(),
        prompt_lens: vec![4, 16],
        decode_tokens: 3,
        copy_bytes: 1 << 24,
        batch: vec![1, 3],
        batch_steps: 2,
        int8_head: true,
        ..Default::default()
    };
    let report = bench::run(&opts, &Device::Cpu)?;
    let json_path = dir.path().join("bench.json");
    report.write_json(&json_path)?;
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path)?)
        .map_err(candle_core::Error::wrap)?;
    for key in [
        "preset",
        "device",
        "threads",
        "decode_tokens_per_s",
        "dense_decode_tokens_per_s",
        "int8_head_decode_tokens_per_s",
        "int8_head_bytes_per_decoded_token",
        "ternary_bits_per_weight",
        "weight_bytes",
        "dense_weight_bytes",
        "bytes_per_decoded_token",
        "measured_bandwidth_bytes_per_s",
        "bandwidth_fraction",
    ] {
        assert!(
            json[key].is_number() || json[key].is_string(),
            "{key}: {}",
            json[key]
        );
    }
    for key in ["prefill_tokens_per_s", "dense_prefill_tokens_per_s"] {
        for len in ["4", "16"] {
            assert!(
                json[key][len].as_f64().is_some_and(|v| v > 0.0),
                "{key}.{len}"
            );
        }
    }
    assert!(json.get("peak_rss_bytes").is_some());
    if let (Some(after_load), Some(peak)) = (
        json["rss_after_load_bytes"].as_u64(),
        json["peak_rss_bytes"].as_u64(),
    ) {
        assert!(0 < after_load && after_load <= peak, "{after_load} {peak}");
    } else {
        assert!(json.get("rss_after_load_bytes").is_some());
    }
    let batches = json["batch_decode"].as_array().expect("batch_decode list");
    assert_eq!(batches.len(), 2);
    for (b, want) in batches.iter().zip([1, 3]) {
        assert_eq!(b["batch"], want);
        for key in ["aggregate_tokens_per_s", "per_sequence_tokens_per_s"] {
            assert!(b[key].as_f64().is_some_and(|v| v > 0.0), "{key}");
        }
        assert!(b["kv_cache_bytes"].as_u64().is_some_and(|v| v > 0));
    }
    assert!(report
        .dense
        .as_ref()
        .is_some_and(|d| d.weight_bytes > report.ternary.weight_bytes));
    // The tied bf16 head (512 × 128): plain, or compact (12 bits a weight, a 16-byte table and
    // an escape offset a row, few raw chunks); as int8, plus an f32 scale a row.
    let (plain, head) = (512 * 128 * 2, json["head_bytes_per_decoded_token"].as_u64());
    let head = head.expect("head bytes");
    assert!(
        head == plain || (head >= plain * 3 / 4 + 512 * 20 && head < plain * 9 / 10),
        "head bytes {head}"
    );
    assert_eq!(
        json["bytes_per_decoded_token"]
            .as_u64()
            .map(|b| b - head + 512 * 128 + 512 * 4),
        json["int8_head_bytes_per_decoded_token"].as_u64()
    );
    assert!(json["int8_head_decode_profile_ms"]["head"].is_number());
    assert!(report.table().contains("decode, batch 1"));
    assert!(report.table().contains("decode, batch 1, int8 head"));
    assert!(report.table().contains("| 3 |"));
    Ok(())
}
