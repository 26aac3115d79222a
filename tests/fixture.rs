//! The model against HF transformers' logits and greedy ids on the bundled tiny fixture.

mod common;

use candle_bitnet::model::SeqInput;
use candle_bitnet::weights::load_model_dir;
use candle_bitnet::{KvCache, Logits};
use candle_core::{DType, Device, Result, Tensor};
use common::{assert_batch_matches_single, assert_logits_close, fixture_dir, Expected, PROMPTS};

fn ids_tensor(ids: &[u32]) -> Result<Tensor> {
    Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)
}

#[test]
fn full_forward_matches_reference_logits() -> Result<()> {
    let expected = Expected::load()?;
    let (_, mut model) = load_model_dir(&fixture_dir(), DType::F32, &Device::Cpu)?;
    for p in PROMPTS {
        let prompt = expected.ids(p, "prompt_ids");
        let greedy = expected.ids(p, "greedy_ids");
        model.clear_kv_cache();
        let logits = model.forward_all(&ids_tensor(&prompt)?, 0)?.squeeze(0)?;
        assert_logits_close(
            &format!("{p}.prompt"),
            &logits,
            expected.logits(&format!("{p}.prompt")),
        )?;

        let full: Vec<u32> = prompt.iter().chain(&greedy).copied().collect();
        model.clear_kv_cache();
        let logits = model.forward_all(&ids_tensor(&full)?, 0)?.squeeze(0)?;
        assert_logits_close(
            &format!("{p}.full"),
            &logits,
            expected.logits(&format!("{p}.full")),
        )?;
        // Greedy ids from one uncached forward: argmax at each position after the prompt.
        let argmax = logits.argmax(1)?.to_vec1::<u32>()?;
        assert_eq!(
            &argmax[prompt.len() - 1..full.len() - 1],
            &greedy[..],
            "{p}: greedy ids (full forward)"
        );
    }
    Ok(())
}

#[test]
fn prefill_then_cached_decode_matches_reference() -> Result<()> {
    let expected = Expected::load()?;
    let (_, mut model) = load_model_dir(&fixture_dir(), DType::F32, &Device::Cpu)?;
    for p in PROMPTS {
        let prompt = expected.ids(p, "prompt_ids");
        let greedy = expected.ids(p, "greedy_ids");
        let full_ref = expected.logits(&format!("{p}.full"));
        model.clear_kv_cache();
        let mut logits = model.forward(&ids_tensor(&prompt)?, 0)?.squeeze(0)?;
        let mut generated = vec![];
        let mut step_logits = vec![];
        for step in 0..greedy.len() {
            let next = logits.argmax(0)?.to_scalar::<u32>()?;
            generated.push(next);
            step_logits.push(logits);
            logits = model
                .forward(&ids_tensor(&[next])?, prompt.len() + step)?
                .squeeze(0)?;
        }
        // Step s predicts from position prompt_len - 1 + s of the uncached reference.
        let want = full_ref.narrow(0, prompt.len() - 1, greedy.len())?;
        assert_logits_close(
            &format!("{p} cached steps"),
            &Tensor::stack(&step_logits, 0)?,
            &want,
        )?;
        assert_eq!(generated, greedy, "{p}: greedy ids (KV-cached decode)");
    }
    Ok(())
}

#[test]
fn a_batch_of_prompts_matches_each_prompt_alone() -> Result<()> {
    let (_, mut model) = load_model_dir(&fixture_dir(), DType::F32, &Device::Cpu)?;
    assert_batch_matches_single(&mut model, 1e-5)
}

#[test]
fn the_op_chain_attention_of_other_devices_matches_the_cpu_path() -> Result<()> {
    // Other devices attend through candle ops on tensor caches; run that path here on the CPU
    // against the CPU's own, over a batch of two prompts then greedy decode steps.
    let expected = Expected::load()?;
    let (_, model) = load_model_dir(&fixture_dir(), DType::F32, &Device::Cpu)?;
    let model = model.model().clone();
    let prompts: Vec<Vec<u32>> = PROMPTS[..2]
        .iter()
        .map(|p| expected.ids(p, "prompt_ids"))
        .collect();
    let run = |caches: &mut Vec<KvCache>| -> Result<(Vec<f32>, Vec<Vec<u32>>)> {
        let mut logits = vec![];
        let mut ids: Vec<Vec<u32>> = prompts.clone();
        let mut generated = vec![vec![]; prompts.len()];
        for _ in 0..6 {
            let mut seqs: Vec<SeqInput> = ids
                .iter()
                .zip(caches.iter_mut())
                .map(|(ids, cache)| SeqInput {
                    ids,
                    cache,
                    logits: Logits::Last,
                })
                .collect();
            let out = model.forward_batch(&mut seqs)?;
            ids = vec![];
            for (l, g) in out.into_iter().zip(&mut generated) {
                let l = l.expect("logits were asked for");
                let next = l.argmax(0)?.to_scalar::<u32>()?;
                logits.extend(l.to_vec1::<f32>()?);
                g.push(next);
                ids.push(vec![next]);
            }
        }
        Ok((logits, generated))
    };
    let (host, host_ids) = run(&mut prompts.iter().map(|_| model.new_kv_cache()).collect())?;
    let (chain, chain_ids) = run(&mut prompts
        .iter()
        .map(|_| model.new_tensor_kv_cache())
        .collect())?;
    assert_eq!(host_ids, chain_ids);
    let max_diff = host
        .iter()
        .zip(&chain)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-4, "max |Δlogit| {max_diff}");
    assert!(host.iter().any(|&v| v != 0.0));
    Ok(())
}
