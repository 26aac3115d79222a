//! Shared by the integration tests: the bundled reference fixture and its tolerances, and
//! ([`kernels`]) the kernel tests' table of shapes and harness.
#![allow(dead_code)]

pub mod kernels;

use candle_bitnet::BitnetForCausalLM;
use candle_core::{DType, Device, Result, Tensor};
use rand::{rngs::StdRng, Rng};
use std::collections::HashMap;
use std::path::PathBuf;

pub const PROMPTS: [&str; 3] = ["ids_len7", "ids_len23", "text"];

/// The checkout at run time when given (a test binary copied to a GPU machine), else at build time.
pub fn fixture_dir() -> PathBuf {
    let root = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(root).join("tests/fixtures/tiny-bitnet")
}

pub struct Expected {
    pub logits: HashMap<String, Tensor>,
    pub greedy: serde_json::Value,
}

impl Expected {
    pub fn load() -> Result<Self> {
        let dir = fixture_dir().join("expected");
        let logits = candle_core::safetensors::load(dir.join("logits.safetensors"), &Device::Cpu)?;
        let text = std::fs::read_to_string(dir.join("greedy.json"))?;
        let greedy = serde_json::from_str(&text).map_err(candle_core::Error::wrap)?;
        Ok(Self { logits, greedy })
    }

    pub fn ids(&self, prompt: &str, key: &str) -> Vec<u32> {
        self.greedy["prompts"][prompt][key]
            .as_array()
            .expect("fixture ids")
            .iter()
            .map(|v| v.as_u64().expect("fixture id") as u32)
            .collect()
    }

    pub fn logits(&self, name: &str) -> &Tensor {
        &self.logits[name]
    }
}

/// The fixture README's tolerance for an f32 engine: rel-L2 ≤ 3e-2, max-abs ≤ 5%·max|ref|,
/// and ≥ 20% of positions within 1e-4·max|ref| (activation rounding flips move a few positions).
pub fn assert_logits_close(name: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    assert_logits_within(name, got, want, 0.2)
}

/// As [`assert_logits_close`], with `min_close` the share of positions that must be within
/// 1e-4·max|ref|. A flipped int8 code at position p moves every later position (their
/// attention reads p's keys and values), so that share says where the first flip fell.
pub fn assert_logits_within(name: &str, got: &Tensor, want: &Tensor, min_close: f32) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let got = got.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let diff = (&got - want)?;
    let ref_max = want.abs()?.max_all()?.to_scalar::<f32>()?;
    let max_abs = diff.abs()?.max_all()?.to_scalar::<f32>()?;
    let rel_l2 = (diff.sqr()?.sum_all()?.to_scalar::<f32>()?
        / want.sqr()?.sum_all()?.to_scalar::<f32>()?)
    .sqrt();
    let per_pos = diff.abs()?.max(1)?.to_vec1::<f32>()?;
    let close =
        per_pos.iter().filter(|&&d| d <= 1e-4 * ref_max).count() as f32 / per_pos.len() as f32;
    let first_off = per_pos.iter().position(|&d| d > 1e-4 * ref_max);
    eprintln!(
        "{name}: rel_l2 {rel_l2:.2e}, max_abs {max_abs:.3e} (ref max {ref_max:.2}), {:.0}% positions within 1e-4, first off: {first_off:?}",
        close * 100.0
    );
    assert!(rel_l2 <= 3e-2, "{name}: rel-L2 {rel_l2}");
    assert!(
        max_abs <= 5e-2 * ref_max,
        "{name}: max-abs {max_abs} vs ref max {ref_max}"
    );
    assert!(
        close >= min_close,
        "{name}: only {close} of positions within 1e-4·max|ref|"
    );
    Ok(())
}

/// A batch of two equal-length prompts (prefill, then one KV-cached step) gives each row the
/// logits that prompt gives alone, within `tol` relative L2.
pub fn assert_batch_matches_single(model: &mut BitnetForCausalLM, tol: f32) -> Result<()> {
    let expected = Expected::load()?;
    let dev = model.model().device().clone();
    let a = expected.ids("ids_len7", "prompt_ids");
    let b: Vec<u32> = expected.ids("ids_len23", "prompt_ids")[..a.len()].to_vec();
    let next = [3u32, 5];
    let single = |model: &mut BitnetForCausalLM, ids: &[u32], next: u32| -> Result<Vec<Tensor>> {
        model.clear_kv_cache();
        let first = model.forward(&Tensor::new(ids, &dev)?.unsqueeze(0)?, 0)?;
        let second = model.forward(&Tensor::new(&[[next]], &dev)?, ids.len())?;
        Ok(vec![first.squeeze(0)?, second.squeeze(0)?])
    };
    let alone = [single(model, &a, next[0])?, single(model, &b, next[1])?];
    model.clear_kv_cache();
    let batch = Tensor::stack(&[Tensor::new(&a[..], &dev)?, Tensor::new(&b[..], &dev)?], 0)?;
    let steps = [
        model.forward(&batch, 0)?,
        model.forward(&Tensor::new(&next, &dev)?.unsqueeze(1)?, a.len())?,
    ];
    for (step, logits) in steps.iter().enumerate() {
        assert_eq!(
            logits.dims(),
            [2, model.model().vocab_size()],
            "batch logits shape"
        );
        for (row, single) in alone.iter().enumerate() {
            let got = logits.get(row)?.to_device(&Device::Cpu)?;
            let want = single[step].to_device(&Device::Cpu)?;
            let diff = (&got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
            let err = (diff / want.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt();
            assert!(
                err <= tol,
                "batch row {row}, step {step}: rel-L2 {err} > {tol}"
            );
        }
    }
    model.clear_kv_cache();
    Ok(())
}

/// Random activations `[n, k]`, never all zero: a few large values per row exercise the absmax
/// scale and ±127. Tests overwrite some rows with their own edge cases.
pub fn random_activations(rng: &mut StdRng, n: usize, k: usize) -> Vec<f32> {
    (0..n * k)
        .map(|i| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if i % 17 == 3 {
                v * 40.0
            } else {
                v + 1e-3
            }
        })
        .collect()
}

/// Random ternary `[out, k]` packed to `[out/4, k]` bytes by the reference packer.
pub fn random_packed(rng: &mut StdRng, out: usize, k: usize) -> Result<Vec<u8>> {
    let values: Vec<i8> = (0..out * k).map(|_| rng.random_range(-1..=1)).collect();
    candle_bitnet::quant::pack_ternary(&values, out, k)
}

/// Says loudly that a test did not run: straight to the process's stderr, which the test
/// harness does not capture, so the line shows in `cargo test` output even when it passes.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {test}: {why}");
}

/// `‖got − want‖ / ‖want‖`, with `got` brought to the CPU in f32 first (`want`: CPU f32).
pub fn rel_l2(got: &Tensor, want: &Tensor) -> Result<f32> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let diff = (&got - want)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
    Ok((diff / want.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt())
}
