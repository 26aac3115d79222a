//! The library API on the bundled fixture: greedy generation, chat template rendering, chat
//! with the KV cache kept across turns, streaming UTF-8, sampling settings and seeds, EOS ids.

mod common;

use anyhow::Result;
use candle_bitnet::generate::{ChatTemplate, StopReason, TokenOutputStream};
use candle_bitnet::{GenerationParams, Generator, Message};
use candle_core::Device;
use common::{fixture_dir, Expected};
use std::path::Path;

fn load(dir: &Path) -> Result<Generator> {
    Ok(Generator::from_pretrained(
        &dir.display().to_string(),
        "main",
        &Device::Cpu,
    )?)
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        temperature: 0.0,
        ignore_eos: true,
        ..Default::default()
    }
}

fn sampled(seed: u64) -> GenerationParams {
    GenerationParams {
        max_tokens: 16,
        temperature: 1.0,
        ignore_eos: true,
        seed: Some(seed),
        ..Default::default()
    }
}

#[test]
fn greedy_generation_and_streaming_match_the_fixture() -> Result<()> {
    let expected = Expected::load()?;
    let mut gen = load(&fixture_dir())?;
    let text = expected.greedy["text_prompt"]
        .as_str()
        .expect("text_prompt");
    assert_eq!(gen.encode(text)?, expected.ids("text", "prompt_ids"));
    let mut streamed = String::new();
    let out = gen.generate_stream(text, &greedy(16), |piece| {
        streamed.push_str(piece);
        Ok(())
    })?;
    assert_eq!(out.generated_ids, expected.ids("text", "greedy_ids"));
    assert_eq!(
        out.text,
        expected.greedy["generated_text"]["text"]
            .as_str()
            .expect("text")
    );
    assert_eq!(streamed, out.text);
    assert_eq!(out.stop, StopReason::MaxTokens);
    assert_eq!((out.prefill_tokens, out.decode_tokens), (38, 15));
    assert_eq!(gen.generate(text, &greedy(16))?, out.text);
    Ok(())
}

#[test]
fn defaults_come_from_generation_config() -> Result<()> {
    let gen = load(&fixture_dir())?;
    let p = gen.default_params();
    // do_sample true, temperature 0.6, top_p 0.9, no top_k (transformers' default 50); eos [503, 511].
    assert_eq!(
        (p.temperature, p.top_p, p.top_k),
        (0.6, Some(0.9), Some(50))
    );
    assert_eq!(gen.eos_token_ids(), &[503, 511]);
    Ok(())
}

#[test]
fn chat_template_renders_like_transformers() -> Result<()> {
    let cfg = fixture_dir().join("tokenizer_config.json");
    let t = ChatTemplate::from_tokenizer_config(&cfg)?.expect("the fixture has a chat template");
    // Expected strings rendered by Python jinja2 with transformers' settings.
    assert_eq!(
        t.render(&[Message::user("  Hello there! ")], true)?,
        "<|begin_of_text|>User: Hello there!<|eot_id|>Assistant: "
    );
    let conversation = [
        Message::system("Be brief."),
        Message::user("Hi"),
        Message::assistant("Hello."),
        Message::user("Héllo 日本"),
    ];
    assert_eq!(
        t.render(&conversation, false)?,
        "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: Hello.<|eot_id|>User: Héllo 日本<|eot_id|>"
    );
    // The template writes the BOS; tokenizing must not add a second one.
    let gen = load(&fixture_dir())?;
    let encode = |s: &str| {
        gen.tokenizer()
            .encode(s, false)
            .map(|e| e.get_ids().to_vec())
    };
    let (user, assistant) = (encode("User: Hi").unwrap(), encode("Assistant: ").unwrap());
    let want = [&[502][..], &user, &[511], &assistant].concat();
    assert_eq!(gen.chat_prompt_ids(&[Message::user("Hi")])?, want);
    Ok(())
}

#[test]
fn broken_chat_templates_are_errors() {
    let err = ChatTemplate::new("{% for %}", "", "")
        .err()
        .expect("a syntax error");
    assert!(err.to_string().contains("invalid chat template"), "{err}");
    let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "")
        .expect("compiles");
    let err = t.render(&[], true).expect_err("raises").to_string();
    assert!(err.contains("roles must alternate"), "{err}");
}

#[test]
fn chat_keeps_the_kv_cache_across_turns() -> Result<()> {
    let mut gen = load(&fixture_dir())?;
    let params = GenerationParams {
        max_tokens: 6,
        ..greedy(6)
    };
    let mut messages = vec![Message::user("Hello")];
    let first = gen.chat(&messages, &params, |_| Ok(()))?;
    assert_eq!(first.prefill_tokens, first.prompt_ids.len());
    messages.push(Message::assistant(&first.text));
    messages.push(Message::user("And then?"));
    let second = gen.chat(&messages, &params, |_| Ok(()))?;
    // Only the new part of the conversation was prefilled ...
    assert!(
        second.prefill_tokens < second.prompt_ids.len() / 2,
        "{} of {} prefilled",
        second.prefill_tokens,
        second.prompt_ids.len()
    );
    // ... and the reply is what a fresh prefill of the whole conversation gives.
    let mut fresh = load(&fixture_dir())?;
    let again = fresh.generate_ids(&second.prompt_ids, &params, |_| Ok(()))?;
    assert_eq!(second.generated_ids, again.generated_ids);
    // After a reset everything is prefilled again.
    gen.reset();
    let third = gen.chat(&messages, &params, |_| Ok(()))?;
    assert_eq!(third.prefill_tokens, third.prompt_ids.len());
    Ok(())
}

#[test]
fn streaming_never_splits_a_utf8_character() -> Result<()> {
    let gen = load(&fixture_dir())?;
    let text = "héllo 日本語 — naïve 🦀 crab 🎉!";
    let ids = gen
        .tokenizer()
        .encode(text, false)
        .expect("encodes")
        .get_ids()
        .to_vec();
    // The fixture's byte-level BPE has almost no merges: multi-byte characters span tokens.
    let split = ids
        .iter()
        .filter(|&&id| gen.decode(&[id]).expect("decodes").contains('\u{FFFD}'))
        .count();
    assert!(
        split >= 4,
        "expected characters split across tokens, got {split}"
    );
    let mut stream = TokenOutputStream::new(gen.tokenizer());
    let mut pieces = vec![];
    for &id in &ids {
        pieces.extend(stream.next_token(id)?);
    }
    pieces.extend(stream.flush()?);
    for p in &pieces {
        assert!(!p.contains('\u{FFFD}'), "broken character in piece {p:?}");
    }
    assert_eq!(pieces.concat(), text);
    Ok(())
}

#[test]
fn sampling_is_reproducible_with_a_seed() -> Result<()> {
    let mut gen = load(&fixture_dir())?;
    let prompt = [502, 225, 358];
    let mut run = |p: &GenerationParams| {
        gen.generate_ids(&prompt, p, |_| Ok(()))
            .map(|g| g.generated_ids)
    };
    let a = run(&sampled(42))?;
    assert_eq!(a, run(&sampled(42))?);
    assert_ne!(a, run(&sampled(43))?);
    let top = GenerationParams {
        top_k: Some(20),
        top_p: Some(0.8),
        min_p: Some(0.05),
        repeat_penalty: 1.3,
        ..sampled(42)
    };
    assert_eq!(run(&top)?, run(&top)?);
    Ok(())
}

#[test]
fn degenerate_sampling_settings_are_greedy() -> Result<()> {
    let expected = Expected::load()?;
    let mut gen = load(&fixture_dir())?;
    let prompt = expected.ids("ids_len7", "prompt_ids");
    let want = expected.ids("ids_len7", "greedy_ids");
    for p in [
        GenerationParams {
            top_k: Some(1),
            ..sampled(1)
        },
        GenerationParams {
            min_p: Some(1.0),
            ..sampled(2)
        },
        GenerationParams {
            top_p: Some(1e-6),
            ..sampled(3)
        },
    ] {
        let got = gen.generate_ids(&prompt, &p, |_| Ok(()))?.generated_ids;
        assert_eq!(got, want, "{p:?}");
    }
    Ok(())
}

#[test]
fn repeat_penalty_discourages_repeats_in_the_window() -> Result<()> {
    let mut gen = load(&fixture_dir())?;
    let prompt = [502, 225, 358, 31, 315, 501, 169];
    let plain = gen
        .generate_ids(&prompt, &greedy(16), |_| Ok(()))?
        .generated_ids;
    let distinct = |ids: &[u32]| ids.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(
        distinct(&plain) < plain.len(),
        "the fixture's greedy output repeats"
    );
    let p = GenerationParams {
        repeat_penalty: 1000.0,
        repeat_last_n: 64,
        ..greedy(16)
    };
    let penalized = gen.generate_ids(&prompt, &p, |_| Ok(()))?.generated_ids;
    assert_eq!(distinct(&penalized), penalized.len(), "{penalized:?}");
    assert!(penalized.iter().all(|id| !prompt.contains(id)));
    Ok(())
}

#[test]
fn stops_on_every_eos_id_of_generation_config() -> Result<()> {
    // A copy of the fixture whose second EOS id is the second greedy token of `ids_len7`.
    let dir = tempfile::tempdir()?;
    for entry in std::fs::read_dir(fixture_dir())? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name()))?;
        }
    }
    let gc = r#"{"eos_token_id": [503, 201], "do_sample": false}"#;
    std::fs::write(dir.path().join("generation_config.json"), gc)?;
    let mut gen = load(dir.path())?;
    let prompt = [502, 225, 358, 31, 315, 501, 169];
    let params = GenerationParams {
        ignore_eos: false,
        ..greedy(16)
    };
    let out = gen.generate_ids(&prompt, &params, |_| Ok(()))?;
    assert_eq!((out.generated_ids, out.stop), (vec![432], StopReason::Eos));
    let out = gen.generate_ids(&prompt, &greedy(16), |_| Ok(()))?;
    assert_eq!(out.generated_ids.len(), 16, "--ignore-eos goes on");
    Ok(())
}

#[test]
fn prompt_logits_come_from_one_prefill() -> Result<()> {
    let expected = Expected::load()?;
    let mut gen = load(&fixture_dir())?;
    let prompt = expected.ids("ids_len23", "prompt_ids");
    let params = GenerationParams {
        prompt_logits: true,
        ..greedy(16)
    };
    let out = gen.generate_ids(&prompt, &params, |_| Ok(()))?;
    let logits = out.prompt_logits.expect("asked for");
    common::assert_logits_close(
        "ids_len23.prompt",
        &logits,
        expected.logits("ids_len23.prompt"),
    )?;
    assert_eq!(out.generated_ids, expected.ids("ids_len23", "greedy_ids"));
    Ok(())
}

#[test]
fn readme_library_example_is_examples_generate_rs() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let example = std::fs::read_to_string(root.join("examples/generate.rs"))?;
    let library = readme
        .split("## Library")
        .nth(1)
        .expect("a Library section");
    let snippet = library
        .split("```rust\n")
        .nth(1)
        .and_then(|s| s.split("```").next());
    // The example file starts with one `//!` line the README leaves out.
    let code = example.split_once('\n').map(|(_, rest)| rest);
    assert_eq!(snippet, code, "README and examples/generate.rs differ");
    assert!(example.lines().count() < 20);
    Ok(())
}
