//! Many sequences at once on the bundled fixture: a sequence's logits in a batch equal its
//! logits alone, bit for bit (CPU), and the scheduler's admission, chunked prefill,
//! cancellation, stop strings and seeds.

mod common;

use anyhow::Result;
use candle_bitnet::engine::{EngineStats, Sink, TokenLogprob, Usage};
use candle_bitnet::{
    BitnetModel, Engine, EngineOptions, ErrorKind, Event, FinishReason, Generator, KvCache, Logits,
    Request, SamplingParams,
};
use candle_core::{Device, Tensor};
use common::fixture_dir;
use std::sync::{mpsc, Arc, Mutex};

fn generator() -> Result<Generator> {
    let dir = fixture_dir().display().to_string();
    Ok(Generator::from_pretrained(&dir, "main", &Device::Cpu)?)
}

/// Seeded ids below the fixture's vocabulary (512), none of them EOS (503).
fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 7) % 500)
        .collect()
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

/// A sequence fed chunk by chunk alone: the logits of the last position of each chunk.
fn alone(model: &BitnetModel, chunks: &[Vec<u32>]) -> Result<Vec<Vec<u32>>> {
    let mut cache = model.new_kv_cache();
    chunks
        .iter()
        .map(|c| bits(&model.forward(c, &mut cache, Logits::Last)?))
        .collect()
}

#[test]
fn a_sequence_gets_the_same_logits_bit_for_bit_in_a_batch() -> Result<()> {
    let gen = generator()?;
    let model = gen.model();
    // Three sequences with their own chunking: prompts of different lengths, then decodes.
    let plans: Vec<Vec<Vec<u32>>> = vec![
        vec![prompt(7, 1), vec![5], vec![9], vec![11], vec![13]],
        vec![prompt(23, 2), vec![17], prompt(4, 3), vec![19]],
        vec![prompt(2, 4), prompt(9, 5), vec![21], vec![23], vec![29]],
    ];
    let want: Vec<_> = plans
        .iter()
        .map(|p| alone(model, p))
        .collect::<Result<_>>()?;

    // Sequence 2 joins one step late, sequence 1 leaves early: steps mix prefill and decode.
    let starts: [usize; 3] = [0, 0, 1];
    let mut caches: Vec<KvCache> = (0..3).map(|_| model.new_kv_cache()).collect();
    let mut got: Vec<Vec<Vec<u32>>> = vec![vec![]; 3];
    for step in 0usize..6 {
        let active: Vec<(usize, &Vec<u32>)> = (0..3)
            .filter_map(|i| {
                let k = step.checked_sub(starts[i])?;
                plans[i].get(k).map(|chunk| (i, chunk))
            })
            .collect();
        if active.is_empty() {
            continue;
        }
        let mut cache_refs: Vec<Option<&mut KvCache>> = caches.iter_mut().map(Some).collect();
        let mut inputs = vec![];
        for (i, chunk) in &active {
            inputs.push(candle_bitnet::model::SeqInput {
                ids: chunk,
                cache: cache_refs[*i].take().expect("each sequence once"),
                logits: Logits::Last,
            });
        }
        let out = model.forward_batch(&mut inputs)?;
        for ((i, _), logits) in active.iter().zip(out) {
            got[*i].push(bits(&logits.expect("asked for"))?);
        }
    }
    for i in 0..3 {
        assert_eq!(got[i].len(), want[i].len(), "sequence {i}: steps");
        for (k, (g, w)) in got[i].iter().zip(&want[i]).enumerate() {
            assert!(
                g == w,
                "sequence {i}, chunk {k}: logits differ from the sequence alone"
            );
        }
    }
    Ok(())
}

#[test]
fn every_position_logits_match_the_last_position_logits() -> Result<()> {
    let gen = generator()?;
    let model = gen.model();
    let ids = prompt(12, 7);
    let all = model.forward(&ids, &mut model.new_kv_cache(), Logits::All)?;
    assert_eq!(all.dims(), [12, 512]);
    let last = model.forward(&ids, &mut model.new_kv_cache(), Logits::Last)?;
    assert_eq!(bits(&all.get(11)?)?, bits(&last)?);
    Ok(())
}

/// Collects a request's events.
#[derive(Default)]
struct Collected {
    ids: Vec<u32>,
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<(FinishReason, Usage)>,
    error: Option<String>,
    events_after_end: usize,
}

fn collector() -> (Arc<Mutex<Collected>>, Sink) {
    let out = Arc::new(Mutex::new(Collected::default()));
    let sink_out = out.clone();
    let sink: Sink = Box::new(move |event| {
        let mut c = sink_out.lock().expect("collector lock");
        if c.finish.is_some() || c.error.is_some() {
            c.events_after_end += 1;
        }
        match event {
            Event::Token { id, text, logprob } => {
                c.ids.push(id);
                c.text.push_str(&text);
                c.logprobs.extend(logprob);
            }
            Event::Finished {
                reason,
                text,
                usage,
            } => {
                c.text.push_str(&text);
                c.finish = Some((reason, usage));
            }
            Event::Failed(e) => c.error = Some(e.to_string()),
        }
        true
    });
    (out, sink)
}

fn run_to_idle(engine: &mut Engine) -> Vec<EngineStats> {
    let mut stats = vec![];
    for _ in 0..10_000 {
        if engine.is_idle() {
            return stats;
        }
        engine.step();
        stats.push(engine.stats());
    }
    panic!("the engine did not become idle")
}

fn request(prompt_ids: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Request {
    Request {
        max_tokens,
        sampling,
        ..Request::new(prompt_ids)
    }
}

/// Each request alone in a fresh engine.
fn alone_results(gen: &Generator, requests: &[Request]) -> Result<Vec<Vec<u32>>> {
    requests
        .iter()
        .map(|r| {
            let mut engine = Engine::new(gen, EngineOptions::for_context(4096));
            let (out, sink) = collector();
            engine.submit(r.clone(), sink)?;
            run_to_idle(&mut engine);
            let ids = out.lock().expect("lock").ids.clone();
            Ok(ids)
        })
        .collect()
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: Some(40),
        top_p: Some(0.95),
        seed,
        ..SamplingParams::default()
    }
}

#[test]
fn requests_get_the_same_tokens_batched_as_alone_greedy_and_seeded() -> Result<()> {
    let gen = generator()?;
    let requests: Vec<Request> = (0..6)
        .map(|i| {
            let sampling = if i % 2 == 0 {
                SamplingParams::default()
            } else {
                sampled(1000 + i as u64)
            };
            request(prompt(3 + 7 * i, i as u32), 6 + i, sampling)
        })
        .collect();
    let want = alone_results(&gen, &requests)?;
    // Small batches and chunks: requests join as others leave, prompts span several steps.
    let mut engine = Engine::new(
        &gen,
        EngineOptions {
            max_batch: 3,
            prefill_chunk: 8,
            ..EngineOptions::for_context(4096)
        },
    );
    let outs: Vec<_> = requests
        .iter()
        .map(|r| {
            let (out, sink) = collector();
            engine.submit(r.clone(), sink).map(|_| out)
        })
        .collect::<std::result::Result<_, _>>()?;
    let stats = run_to_idle(&mut engine);
    assert!(stats.iter().all(|s| s.running <= 3), "max_batch respected");
    assert!(stats.iter().any(|s| s.running == 3), "the batch filled up");
    for (i, (out, want)) in outs.iter().zip(&want).enumerate() {
        let c = out.lock().expect("lock");
        assert_eq!(
            &c.ids, want,
            "request {i}: tokens differ from the request alone"
        );
        let (reason, usage) = c.finish.expect("finished");
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(usage.completion_tokens, requests[i].max_tokens);
        assert_eq!(usage.prompt_tokens, requests[i].prompt_ids.len());
        assert_eq!(c.events_after_end, 0);
    }
    Ok(())
}

#[test]
fn long_prompts_are_chunked_without_stalling_running_decodes() -> Result<()> {
    let gen = generator()?;
    let mut engine = Engine::new(
        &gen,
        EngineOptions {
            prefill_chunk: 16,
            ..EngineOptions::for_context(4096)
        },
    );
    let (decoding, sink) = collector();
    engine.submit(request(prompt(4, 1), 40, SamplingParams::default()), sink)?;
    engine.step(); // its prefill
    let (long, sink) = collector();
    engine.submit(request(prompt(200, 2), 2, SamplingParams::default()), sink)?;
    // 200 prompt tokens at 16 per step: 13 steps, each also decoding the first request.
    for step in 1..=13 {
        let before = decoding.lock().expect("lock").ids.len();
        assert_eq!(
            engine.step(),
            1 + 16.min(200 - 16 * (step - 1)),
            "rows in step {step}"
        );
        assert_eq!(
            decoding.lock().expect("lock").ids.len(),
            before + 1,
            "step {step}"
        );
    }
    run_to_idle(&mut engine);
    assert_eq!(long.lock().expect("lock").ids.len(), 2);
    Ok(())
}

#[test]
fn admission_respects_the_kv_budget_and_the_queue_limit() -> Result<()> {
    let gen = generator()?;
    let mut engine = Engine::new(
        &gen,
        EngineOptions {
            max_batch: 8,
            max_queue: 3,
            kv_budget_tokens: 40,
            prefill_chunk: 64,
        },
    );
    // 10 + 10 positions each: two fit the budget of 40, the third waits.
    for seed in 0..3 {
        engine.submit(
            request(prompt(10, seed), 10, SamplingParams::default()),
            collector().1,
        )?;
    }
    engine.step();
    assert_eq!((engine.stats().running, engine.stats().queued), (2, 1));
    assert!(engine.stats().kv_tokens <= 40);
    for seed in 3..5 {
        engine.submit(
            request(prompt(10, seed), 10, SamplingParams::default()),
            collector().1,
        )?;
    }
    let full = engine
        .submit(
            request(prompt(10, 8), 10, SamplingParams::default()),
            collector().1,
        )
        .unwrap_err();
    assert_eq!(full.kind(), ErrorKind::Overloaded, "{full}");
    // A request that can never fit is refused as bad input, naming the budget.
    let too_big = engine
        .submit(
            request(prompt(30, 1), 20, SamplingParams::default()),
            collector().1,
        )
        .unwrap_err();
    assert_eq!(too_big.kind(), ErrorKind::Input);
    assert!(
        too_big.to_string().contains("KV-cache budget of 40"),
        "{too_big}"
    );
    let stats = run_to_idle(&mut engine);
    assert!(stats.iter().all(|s| s.kv_tokens <= 40 && s.running <= 2));
    Ok(())
}

#[test]
fn bad_requests_are_refused_naming_the_problem() -> Result<()> {
    let gen = generator()?;
    let mut engine = Engine::new(&gen, EngineOptions::for_context(4096));
    let cases = [
        (
            request(vec![], 4, SamplingParams::default()),
            "prompt is empty",
        ),
        (
            request(vec![1, 512], 4, SamplingParams::default()),
            "token id 512",
        ),
        (
            request(prompt(8, 1), 0, SamplingParams::default()),
            "max_tokens",
        ),
        (
            request(prompt(8, 1), 4090, SamplingParams::default()),
            "context of 4096",
        ),
        (
            request(
                prompt(8, 1),
                4,
                SamplingParams {
                    top_p: Some(0.0),
                    ..sampled(1)
                },
            ),
            "top-p",
        ),
        (
            request(
                prompt(8, 1),
                4,
                SamplingParams {
                    presence_penalty: 3.0,
                    ..sampled(1)
                },
            ),
            "presence penalty",
        ),
        (
            Request {
                logprobs: Some(21),
                ..request(prompt(8, 1), 4, SamplingParams::default())
            },
            "logprobs",
        ),
        (
            Request {
                stop_strings: vec![String::new()],
                ..request(prompt(8, 1), 4, SamplingParams::default())
            },
            "stop strings",
        ),
    ];
    for (req, needle) in cases {
        let e = engine.submit(req, collector().1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Input, "{e}");
        assert!(e.to_string().contains(needle), "{e:?} should name {needle}");
    }
    assert!(engine.is_idle());
    Ok(())
}

#[test]
fn cancelling_frees_the_slot_at_once() -> Result<()> {
    let gen = generator()?;
    let mut engine = Engine::new(
        &gen,
        EngineOptions {
            max_batch: 1,
            ..EngineOptions::for_context(4096)
        },
    );
    let (first, sink) = collector();
    let id = engine.submit(request(prompt(5, 1), 100, SamplingParams::default()), sink)?;
    let (second, sink) = collector();
    let queued = engine.submit(request(prompt(5, 2), 3, SamplingParams::default()), sink)?;
    engine.step();
    engine.step();
    assert_eq!((engine.stats().running, engine.stats().queued), (1, 1));
    assert!(engine.stats().kv_bytes > 0);
    engine.cancel(id);
    assert_eq!(
        engine.stats().running,
        0,
        "the slot is free before the next step"
    );
    assert_eq!(engine.stats().kv_bytes, 0);
    let (reason, usage) = first.lock().expect("lock").finish.expect("finished");
    assert_eq!(reason, FinishReason::Cancelled);
    assert_eq!(usage.completion_tokens, 2);
    run_to_idle(&mut engine);
    assert_eq!(second.lock().expect("lock").ids.len(), 3);
    // Cancelling a queued request or an unknown id is harmless.
    engine.cancel(queued);
    engine.cancel(12345);

    // A sink that stops listening cancels its request.
    let mut calls = 0;
    engine.submit(
        request(prompt(5, 3), 50, SamplingParams::default()),
        Box::new(move |_| {
            calls += 1;
            calls < 3
        }),
    )?;
    let stats = run_to_idle(&mut engine);
    assert!(
        stats.len() <= 4,
        "stopped after the listener left: {} steps",
        stats.len()
    );
    Ok(())
}

#[test]
fn stop_strings_end_generation_across_token_boundaries_and_are_never_emitted() -> Result<()> {
    let gen = generator()?;
    let ids = prompt(6, 3);
    let alone = gen
        .decode(&alone_results(&gen, &[request(ids.clone(), 24, SamplingParams::default())])?[0])?;
    // A stop string made of the end of one token's text and the start of later ones.
    let chars: Vec<char> = alone.chars().collect();
    assert!(
        chars.len() > 12,
        "the fixture writes enough text: {alone:?}"
    );
    let stop: String = chars[5..9].iter().collect();
    let expected: String = chars[..alone.find(&stop).map_or(0, |b| alone[..b].chars().count())]
        .iter()
        .collect();
    let mut engine = Engine::new(&gen, EngineOptions::for_context(4096));
    let (out, sink) = collector();
    engine.submit(
        Request {
            stop_strings: vec!["never appears \u{1}".into(), stop.clone()],
            ..request(ids, 24, SamplingParams::default())
        },
        sink,
    )?;
    run_to_idle(&mut engine);
    let c = out.lock().expect("lock");
    assert_eq!(c.finish.map(|f| f.0), Some(FinishReason::Stop));
    assert_eq!(c.text, expected, "stop {stop:?} in {alone:?}");
    assert!(!c.text.contains(&stop));
    Ok(())
}

#[test]
fn eos_ends_a_request_and_logprobs_come_with_each_token() -> Result<()> {
    let gen = generator()?;
    let ids = prompt(9, 4);
    let tokens = &alone_results(&gen, &[request(ids.clone(), 8, SamplingParams::default())])?[0];
    let mut engine = Engine::new(&gen, EngineOptions::for_context(4096));
    let (out, sink) = collector();
    engine.submit(
        Request {
            stop_token_ids: vec![tokens[3]],
            logprobs: Some(5),
            ..request(ids, 8, SamplingParams::default())
        },
        sink,
    )?;
    run_to_idle(&mut engine);
    let c = out.lock().expect("lock");
    let first = tokens
        .iter()
        .position(|t| *t == tokens[3])
        .expect("present");
    assert_eq!(c.ids, tokens[..first]);
    assert_eq!(c.finish.map(|f| f.0), Some(FinishReason::Eos));
    assert_eq!(c.logprobs.len(), c.ids.len());
    for (lp, id) in c.logprobs.iter().zip(&c.ids) {
        // Greedy: the chosen token is the most likely one.
        assert_eq!(lp.top.len(), 5);
        assert_eq!(lp.top[0].0, *id);
        assert!(lp.logprob <= 0.0 && (lp.logprob - lp.top[0].1).abs() < 1e-6);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
    Ok(())
}

#[test]
fn a_spawned_engine_serves_handles_from_other_threads() -> Result<()> {
    let gen = generator()?;
    let handle = Engine::new(&gen, EngineOptions::for_context(4096)).spawn();
    let receivers: Vec<_> = (0..4)
        .map(|i| {
            let (tx, rx) = mpsc::channel();
            let h = handle.clone();
            let req = request(prompt(5 + i, i as u32), 5, SamplingParams::default());
            std::thread::spawn(move || h.submit(req, move |e| tx.send(e).is_ok()))
                .join()
                .expect("submit thread")
                .map(|_| rx)
        })
        .collect::<std::result::Result<_, _>>()?;
    for rx in receivers {
        let events: Vec<Event> = rx
            .iter()
            .take_while(|e| !matches!(e, Event::Finished { .. }))
            .collect();
        assert_eq!(events.len(), 5);
    }
    // A receiver dropped mid-way cancels its request; the engine goes on serving.
    let (tx, rx) = mpsc::channel();
    handle.submit(
        request(prompt(5, 9), 3000, SamplingParams::default()),
        move |e| tx.send(e).is_ok(),
    )?;
    assert_eq!(rx.iter().take(2).count(), 2);
    drop(rx);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while handle.stats().running > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        handle.stats().running,
        0,
        "the abandoned request was cancelled"
    );
    handle.shutdown();
    let e = (0..100)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            handle
                .submit(request(prompt(5, 1), 2, SamplingParams::default()), |_| {
                    true
                })
                .err()
        })
        .expect("a stopped engine refuses requests");
    assert!(e.to_string().contains("not running"), "{e}");
    Ok(())
}

#[test]
fn errors_say_whose_fault_they_are() -> Result<()> {
    let missing = Generator::from_pretrained("/no/such/model/dir", "main", &Device::Cpu)
        .err()
        .expect("no such model");
    // Naming a model that is neither a directory nor a hub id is the caller's mistake.
    assert_eq!(missing.kind(), ErrorKind::Input, "{missing}");
    let dir = tempfile::tempdir()?;
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture_dir().join(f), dir.path().join(f))?;
    }
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )?;
    let corrupt =
        Generator::from_pretrained(&dir.path().display().to_string(), "main", &Device::Cpu)
            .err()
            .expect("corrupt weights");
    assert_eq!(corrupt.kind(), ErrorKind::Model, "{corrupt}");
    let gen = generator()?;
    let empty = gen.encode("").unwrap_err();
    assert_eq!(empty.kind(), ErrorKind::Input, "{empty}");
    Ok(())
}
