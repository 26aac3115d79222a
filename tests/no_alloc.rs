//! The CPU decode step ([`BitnetModel::decode_step`]) on the bundled fixture: once warm it
//! allocates nothing per token, and its logits are the general path's, bit for bit.
//!
//! A counting global allocator sees the test thread's allocations and those of rayon's workers
//! (the step's parallel ops run there); the tests take turns, so no other test's work is
//! counted, and the harness's own threads are not.

mod common;

use candle_bitnet::model::SeqInput;
use candle_bitnet::weights::{load_model, safetensors_files};
use candle_bitnet::{BitnetModel, Config, HeadDtype, KvCache, KvDtype, LoadOptions, Logits};
use candle_core::{DType, Device, Result};
use common::{fixture_dir, Expected, PROMPTS};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
/// Whether rayon's workers are being counted.
static COUNTING: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether this thread is the one measuring.
    static MEASURING: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    let counted = MEASURING.with(Cell::get)
        || (COUNTING.load(Ordering::Relaxed) && rayon::current_thread_index().is_some());
    if counted {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The tests run one at a time: the count covers every rayon worker.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn take_turn() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Allocations (and reallocations) made while `f` runs, on this thread and rayon's workers.
fn allocations_in<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    MEASURING.set(true);
    COUNTING.store(true, Ordering::SeqCst);
    let out = f();
    COUNTING.store(false, Ordering::SeqCst);
    MEASURING.set(false);
    (out, ALLOCATIONS.load(Ordering::SeqCst) - before)
}

fn load(head: HeadDtype) -> Result<BitnetModel> {
    let dir = fixture_dir();
    let cfg = Config::from_file(&dir.join("config.json")).map_err(candle_core::Error::wrap)?;
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        head,
        ..LoadOptions::new(&Device::Cpu)
    };
    let files = safetensors_files(&dir).map_err(candle_core::Error::wrap)?;
    load_model(&cfg, &files, &opts).map_err(candle_core::Error::wrap)
}

/// The index of the largest logit (the first of equals), without allocating.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A cache holding `prompt`, and the greedy token after it.
fn prefilled(model: &BitnetModel, prompt: &[u32]) -> Result<(KvCache, u32)> {
    let mut cache = model.new_kv_cache();
    let logits = model.forward(prompt, &mut cache, Logits::Last)?;
    let next = argmax(&logits.to_vec1::<f32>()?);
    Ok((cache, next))
}

/// Greedy decode steps from `token`; the last token.
fn greedy_steps(model: &BitnetModel, cache: &mut KvCache, mut token: u32, n: usize) -> Result<u32> {
    for _ in 0..n {
        token = argmax(model.decode_step(token, cache)?);
    }
    Ok(token)
}

/// Steps warming the buffers: the first sizes the cache's, the next ones reach every rayon
/// worker's lazily built state.
const WARM_UP: usize = 4;
/// Steps measured; prompt + warm-up + these stay inside the first 256-position KV chunk.
const STEPS: usize = 16;

/// The heads a CPU decode step can run: int8, the default (compact where the CPU has AVX-512,
/// else plain bf16) and, where the default is compact, plain bf16 too; and the default head
/// over an f16 KV cache.
fn every_head() -> Result<Vec<(&'static str, BitnetModel)>> {
    let exact = load(HeadDtype::Auto)?;
    assert_eq!(exact.embedding_dtype(), DType::BF16, "a bf16 head");
    let mut heads = vec![
        ("int8", load(HeadDtype::Int8)?),
        (
            "f16 KV cache, default",
            exact.clone().with_kv_dtype(KvDtype::F16)?,
        ),
    ];
    if exact.has_compact_head() {
        heads.push(("plain bf16", exact.clone().with_plain_head()?));
        heads.push(("compact bf16", exact));
    } else {
        heads.push(("plain bf16", exact));
    }
    Ok(heads)
}

#[test]
fn a_warm_decode_step_allocates_nothing_with_every_head() -> Result<()> {
    let _turn = take_turn();
    let expected = Expected::load()?;
    for (head, model) in every_head()? {
        for p in PROMPTS {
            let (mut cache, token) = prefilled(&model, &expected.ids(p, "prompt_ids"))?;
            // Inside the pool, as a serving loop on a rayon thread runs: no entry into it per
            // step.
            let (token, allocations) = rayon::scope(|_| -> Result<_> {
                let token = greedy_steps(&model, &mut cache, token, WARM_UP)?;
                Ok(allocations_in(|| {
                    greedy_steps(&model, &mut cache, token, STEPS)
                }))
            })?;
            let token = token?;
            assert_eq!(
                allocations, 0,
                "{head} head, {p}: allocations in {STEPS} warm decode steps"
            );
            // From outside the pool each step enters it once: rayon's job queue (crossbeam's
            // injector) allocates a block per 63 entries, nothing else does.
            let outside = 126;
            let (token, allocations) =
                allocations_in(|| greedy_steps(&model, &mut cache, token, outside));
            let token = token?;
            assert!(
                allocations <= outside / 63 + 1,
                "{head} head, {p}: {allocations} allocations in {outside} steps from outside the pool"
            );
            assert!(cache.len() < 256, "the steps stayed in one KV chunk");
            // The counter sees the work: the general path's step allocates.
            let mut seq = [SeqInput {
                ids: &[token],
                cache: &mut cache,
                logits: Logits::Last,
            }];
            let (out, general) = allocations_in(|| model.forward_batch_general(&mut seq));
            out?;
            assert!(
                general > 0,
                "{head} head, {p}: the general path's step allocated nothing?"
            );
        }
    }
    Ok(())
}

/// Bit patterns, so that NaNs compare too.
fn bits(logits: &[f32]) -> Vec<u32> {
    logits.iter().map(|l| l.to_bits()).collect()
}

#[test]
fn decode_steps_match_the_general_path_bit_for_bit() -> Result<()> {
    let _turn = take_turn();
    let expected = Expected::load()?;
    let mut heads = every_head()?;
    heads.push(("f32", load(HeadDtype::Compute)?));
    for (head, model) in heads {
        for (n, p) in PROMPTS.iter().enumerate() {
            let prompt = expected.ids(p, "prompt_ids");
            let greedy = expected.ids(p, "greedy_ids");
            let (mut cache, mut token) = prefilled(&model, &prompt)?;
            let (mut general, general_token) = prefilled(&model, &prompt)?;
            assert_eq!(token, general_token);
            let mut generated = vec![token];
            // Past the first 256 positions once: the KV cache grows and attention splits the
            // keys in two parts.
            let steps = if n == 0 { 300 - prompt.len() } else { 40 };
            for step in 0..steps {
                let logits = model.decode_step(token, &mut cache)?.to_vec();
                let mut seq = [SeqInput {
                    ids: &[token],
                    cache: &mut general,
                    logits: Logits::Last,
                }];
                let want = model.forward_batch_general(&mut seq)?;
                let want = want[0].as_ref().expect("logits").to_vec1::<f32>()?;
                assert_eq!(
                    bits(&logits),
                    bits(&want),
                    "{head} head, {p} step {step}: decode step vs general path"
                );
                assert!(logits.iter().all(|l| l.is_finite()));
                token = argmax(&logits);
                generated.push(token);
            }
            assert_eq!(cache.len(), prompt.len() + steps);
            if head != "int8" {
                assert_eq!(
                    &generated[..greedy.len()],
                    &greedy[..],
                    "{head} head, {p}: greedy ids"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn forward_and_a_cloned_cache_give_the_decode_steps_logits() -> Result<()> {
    let _turn = take_turn();
    let expected = Expected::load()?;
    let model = load(HeadDtype::Auto)?;
    let prompt = expected.ids(PROMPTS[1], "prompt_ids");
    let (mut cache, token) = prefilled(&model, &prompt)?;
    let token = greedy_steps(&model, &mut cache, token, 3)?;
    // The clone starts without the buffers (they are not state) and carries on alike.
    let mut clone = cache.clone();
    let mut via_forward = cache.clone();
    let stepped = model.decode_step(token, &mut cache)?.to_vec();
    let cloned = model.decode_step(token, &mut clone)?.to_vec();
    let forward = model
        .forward(&[token], &mut via_forward, Logits::Last)?
        .to_vec1::<f32>()?;
    assert_eq!(bits(&stepped), bits(&cloned));
    assert_eq!(bits(&stepped), bits(&forward));
    // The caches of other devices' path run the general path through `decode_step` too.
    let mut tensor_cache = model.new_tensor_kv_cache();
    model.forward(&prompt, &mut tensor_cache, Logits::Last)?;
    let mut host_cache = model.new_kv_cache();
    model.forward(&prompt, &mut host_cache, Logits::Last)?;
    let general = model.decode_step(token, &mut tensor_cache)?.to_vec();
    let in_place = model.decode_step(token, &mut host_cache)?.to_vec();
    let rel = rel_l2(&general, &in_place);
    assert!(rel < 1e-5, "op-chain attention vs the CPU's: rel-L2 {rel}");
    assert!(model.decode_step(9999, &mut host_cache).is_err());
    Ok(())
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(a, b)| (a - b) * (a - b)).sum();
    let norm: f32 = b.iter().map(|b| b * b).sum();
    (diff / norm).sqrt()
}
