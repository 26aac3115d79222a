//! The hub path through the real hf-hub code, against a fake hub cache the tests build
//! (`models--org--name/{refs,snapshots}/…`): offline, cache-first with an unreachable endpoint,
//! sharded weights, revisions, and the error line when files are not cached. Without the
//! `download` feature the same cache lookups hold, and a missing file says the build cannot
//! download.

mod common;

use anyhow::Result;
use candle_bitnet::hub::{HubOptions, ModelFiles};
use candle_bitnet::{GenerationParams, Generator};
use candle_core::Device;
use common::{fixture_dir, Expected};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const REPO: &str = "test-org/tiny-bitnet";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Writes the fixture into `hub/models--test-org--tiny-bitnet/snapshots/<commit>/`, with
/// `refs/<reference>` pointing at it; `sharded` splits the weights into two files + index.
fn fake_cache(hub: &Path, reference: &str, commit: &str, sharded: bool) -> Result<PathBuf> {
    let repo = hub.join("models--test-org--tiny-bitnet");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot)?;
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs").join(reference), commit)?;
    for name in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture_dir().join(name), snapshot.join(name))?;
    }
    let weights = fixture_dir().join("model.safetensors");
    if !sharded {
        std::fs::copy(weights, snapshot.join("model.safetensors"))?;
        return Ok(snapshot);
    }
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    let mut shards: [HashMap<String, candle_core::Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (name, t) in tensors {
        let i = usize::from(name.contains("layers.1") || name.contains("norm.weight"));
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        weight_map.insert(name.clone(), file.into());
        shards[i].insert(name, t);
    }
    for (i, shard) in shards.iter().enumerate() {
        let file = snapshot.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        candle_core::safetensors::save(shard, file)?;
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        snapshot.join("model.safetensors.index.json"),
        index.to_string(),
    )?;
    Ok(snapshot)
}

fn options(hub: &Path, offline: bool) -> HubOptions {
    HubOptions {
        cache_dir: hub.to_path_buf(),
        offline,
        // Nothing listens there: any download attempt fails at once.
        endpoint: Some("http://127.0.0.1:9".into()),
        token: None,
        progress: false,
    }
}

fn greedy_ids(files: &ModelFiles) -> Result<Vec<u32>> {
    let mut gen = Generator::load(files, &Device::Cpu)?;
    let params = GenerationParams {
        max_tokens: 16,
        ignore_eos: true,
        ..Default::default()
    };
    let prompt = Expected::load()?.ids("ids_len7", "prompt_ids");
    Ok(gen
        .generate_ids(&prompt, &params, |_| Ok(()))?
        .generated_ids)
}

#[test]
fn offline_single_file_snapshot() -> Result<()> {
    let hub = tempfile::tempdir()?;
    let snapshot = fake_cache(hub.path(), "main", COMMIT, false)?;
    let files = ModelFiles::fetch_with(REPO, "main", &options(hub.path(), true))?;
    assert_eq!(files.name, REPO);
    assert_eq!(files.config, snapshot.join("config.json"));
    assert_eq!(files.weights, vec![snapshot.join("model.safetensors")]);
    assert!(files.tokenizer_config.is_some() && files.generation_config.is_some());
    assert_eq!(
        greedy_ids(&files)?,
        Expected::load()?.ids("ids_len7", "greedy_ids")
    );
    Ok(())
}

#[test]
fn sharded_snapshot_follows_the_index() -> Result<()> {
    let hub = tempfile::tempdir()?;
    let snapshot = fake_cache(hub.path(), "main", COMMIT, true)?;
    let files = ModelFiles::fetch_with(REPO, "main", &options(hub.path(), true))?;
    assert_eq!(
        files.weights,
        vec![
            snapshot.join("model-00001-of-00002.safetensors"),
            snapshot.join("model-00002-of-00002.safetensors")
        ]
    );
    assert_eq!(
        greedy_ids(&files)?,
        Expected::load()?.ids("ids_len7", "greedy_ids")
    );
    Ok(())
}

#[test]
fn cached_files_are_used_when_the_hub_is_unreachable() -> Result<()> {
    let hub = tempfile::tempdir()?;
    let snapshot = fake_cache(hub.path(), "main", COMMIT, false)?;
    let files = ModelFiles::fetch_with(REPO, "main", &options(hub.path(), false))?;
    assert_eq!(files.weights, vec![snapshot.join("model.safetensors")]);
    Ok(())
}

#[test]
fn revisions_by_name_and_by_commit() -> Result<()> {
    let hub = tempfile::tempdir()?;
    let other = "fedcba9876543210fedcba9876543210fedcba98";
    fake_cache(hub.path(), "main", COMMIT, false)?;
    let v1 = fake_cache(hub.path(), "v1", other, false)?;
    let opts = options(hub.path(), true);
    assert_eq!(
        ModelFiles::fetch_with(REPO, "v1", &opts)?.config,
        v1.join("config.json")
    );
    assert_eq!(
        ModelFiles::fetch_with(REPO, other, &opts)?.config,
        v1.join("config.json")
    );
    let err = ModelFiles::fetch_with(REPO, "v2", &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at revision v2"), "{err}");
    Ok(())
}

#[test]
fn missing_files_are_one_clear_line() -> Result<()> {
    let hub = tempfile::tempdir()?;
    let snapshot = fake_cache(hub.path(), "main", COMMIT, false)?;
    std::fs::remove_file(snapshot.join("model.safetensors"))?;
    for offline in [true, false] {
        let err = ModelFiles::fetch_with(REPO, "main", &options(hub.path(), offline))
            .unwrap_err()
            .to_string();
        let first = err.lines().next().unwrap_or_default();
        for part in [
            REPO,
            "model.safetensors",
            "not in the hf-hub cache",
            "--model DIR",
        ] {
            assert!(first.contains(part), "{part:?} missing from: {first}");
        }
        let why = if offline {
            "HF_HUB_OFFLINE"
        } else if cfg!(feature = "download") {
            "downloading it failed"
        } else {
            "this build cannot download"
        };
        assert!(first.contains(why), "{first}");
    }
    Ok(())
}

/// The cache found through `HF_HOME` (its `hub/`) and through `HF_HUB_CACHE` (anywhere).
#[cfg(feature = "cli")]
#[test]
fn cli_runs_a_hub_id_from_the_cache() -> Result<()> {
    let home = tempfile::tempdir()?;
    let elsewhere = tempfile::tempdir()?;
    fake_cache(&home.path().join("hub"), "main", COMMIT, true)?;
    fake_cache(elsewhere.path(), "main", COMMIT, false)?;
    let want = Expected::load()?.greedy["generated_text"]["ids_len7"]
        .as_str()
        .expect("text")
        .to_string();
    for (var, dir) in [("HF_HOME", home.path()), ("HF_HUB_CACHE", elsewhere.path())] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args([
                "generate",
                "--model",
                REPO,
                "--prompt-ids",
                "502,225,358,31,315,501,169",
            ])
            .args(["--temperature", "0", "--ignore-eos", "--max-tokens", "16"])
            .env_remove("HF_HOME")
            .env_remove("HF_HUB_CACHE")
            .env(var, dir)
            .env("HF_HUB_OFFLINE", "1")
            .output()?;
        assert!(
            out.status.success(),
            "{var}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8(out.stdout)?, want.clone() + "\n", "{var}");
    }
    Ok(())
}
