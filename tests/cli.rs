//! The `bitnet` binary end to end on the bundled fixture, offline: greedy ids, text prompts,
//! dumped logits, the JSON report, chat, and one test per bad input (exit code + one-line error).

mod common;

use anyhow::Result;
use common::{assert_logits_close, fixture_dir, Expected, PROMPTS};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn bitnet(args: &[&str], hf_home: &Path) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .env("HF_HOME", hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .output()?)
}

fn fixture() -> String {
    fixture_dir().display().to_string()
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

/// Runs greedy generation; returns the JSON report and the dumped logits.
fn greedy(prompt: &[&str], tmp: &Path) -> Result<(serde_json::Value, candle_core::Tensor)> {
    let (json, logits) = (tmp.join("out.json"), tmp.join("logits.safetensors"));
    let fixture = fixture();
    let mut args = vec!["generate", "--model", &fixture, "--cpu"];
    args.extend(prompt);
    args.extend(["--temperature", "0", "--ignore-eos", "--max-tokens", "16"]);
    let (j, l) = (json.display().to_string(), logits.display().to_string());
    args.extend(["--output-json", &j, "--dump-logits", &l]);
    let out = bitnet(&args, tmp)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bitnet failed: {stderr}");
    assert!(
        stderr.contains("tokens/s prefill") && stderr.contains("tokens/s decode"),
        "{stderr}"
    );
    assert!(stderr.contains("device cpu"), "{stderr}");
    let mut tensors = candle_core::safetensors::load(&logits, &candle_core::Device::Cpu)?;
    let logits = tensors.remove("logits").expect("a `logits` tensor");
    assert_eq!(tensors.len(), 0, "only `logits` in the dump");
    Ok((read_json(&json)?, logits))
}

#[test]
fn prompt_ids_reproduce_greedy_ids_and_logits() -> Result<()> {
    let expected = Expected::load()?;
    for p in PROMPTS {
        let tmp = tempfile::tempdir()?;
        let prompt = expected.ids(p, "prompt_ids");
        let (json, logits) = greedy(&["--prompt-ids", &ids_arg(&prompt)], tmp.path())?;
        assert_eq!(
            json_ids(&json["prompt_ids"]),
            prompt,
            "{p}: ids used as given"
        );
        assert_eq!(
            json_ids(&json["generated_ids"]),
            expected.ids(p, "greedy_ids"),
            "{p}"
        );
        assert_eq!(json["text"], expected.greedy["generated_text"][p], "{p}");
        assert_eq!(logits.dims(), &[prompt.len(), 512]);
        assert_logits_close(
            &format!("{p}.prompt"),
            &logits,
            expected.logits(&format!("{p}.prompt")),
        )?;
    }
    Ok(())
}

#[test]
fn text_prompt_reproduces_prompt_ids_and_greedy_ids() -> Result<()> {
    let expected = Expected::load()?;
    let tmp = tempfile::tempdir()?;
    let text = expected.greedy["text_prompt"]
        .as_str()
        .expect("text_prompt");
    let (json, _) = greedy(&["--prompt", text], tmp.path())?;
    assert_eq!(
        json_ids(&json["prompt_ids"]),
        expected.ids("text", "prompt_ids")
    );
    assert_eq!(
        json_ids(&json["generated_ids"]),
        expected.ids("text", "greedy_ids")
    );
    assert_eq!(json["text"], expected.greedy["generated_text"]["text"]);
    Ok(())
}

#[test]
fn output_json_has_every_field() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (json, _) = greedy(&["--prompt-ids", "502,225,358"], tmp.path())?;
    let obj = json.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "decode_tokens",
            "decode_tokens_per_s",
            "device",
            "generated_ids",
            "model",
            "prefill_tokens",
            "prefill_tokens_per_s",
            "prompt_ids",
            "text"
        ]
    );
    assert_eq!(json["model"], fixture());
    assert_eq!(json["device"], "cpu");
    assert_eq!(json["prefill_tokens"], 3);
    // 16 tokens: the first from the prefill, 15 from single-token decode steps.
    assert_eq!(json["decode_tokens"], 15);
    assert!(json["prefill_tokens_per_s"].as_f64().expect("a number") > 0.0);
    assert!(json["decode_tokens_per_s"].as_f64().expect("a number") > 0.0);
    assert!(json["text"].is_string());
    Ok(())
}

#[test]
fn chat_flag_applies_the_template() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let json = tmp.path().join("out.json");
    let j = json.display().to_string();
    let fixture = fixture();
    let args = [
        "generate",
        "--model",
        &fixture,
        "--prompt",
        "Hi",
        "--chat",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
        "--output-json",
        &j,
    ];
    let out = bitnet(&args, tmp.path())?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids = json_ids(&read_json(&json)?["prompt_ids"]);
    // <|begin_of_text|>User: Hi<|eot_id|>Assistant: — BOS once, from the template.
    assert_eq!(ids.iter().filter(|&&id| id == 502).count(), 1);
    assert_eq!(ids[0], 502);
    assert!(ids.contains(&511));
    Ok(())
}

#[test]
fn interactive_chat_with_reset_and_exit() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "chat",
            "--model",
            &fixture(),
            "--max-tokens",
            "4",
            "--seed",
            "7",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmp.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"Hello\nHow are you?\n/reset\nHi\n/exit\nnot read\n")?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("tokens/s decode").count(), 3, "{stderr}");
    assert!(stderr.contains("(new conversation)"), "{stderr}");
    Ok(())
}

/// Runs `bitnet generate …` expecting failure; returns the one error line.
fn fails(args: &[&str]) -> Result<String> {
    let tmp = tempfile::tempdir()?;
    let out = bitnet(args, tmp.path())?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: not one line: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    Ok(stderr)
}

fn on_fixture<'a>(extra: &[&'a str], fixture: &'a str) -> Vec<&'a str> {
    let mut args = vec!["generate", "--model", fixture];
    args.extend(extra);
    args
}

#[test]
fn empty_prompt_is_an_error() -> Result<()> {
    let f = fixture();
    assert!(fails(&on_fixture(&["--prompt", ""], &f))?.contains("the prompt is empty"));
    assert!(fails(&on_fixture(&["--prompt-ids", ""], &f))?.contains("the prompt is empty"));
    assert!(fails(&on_fixture(&["--prompt-ids", "1,x"], &f))?.contains("invalid token id \"x\""));
    Ok(())
}

#[test]
fn prompt_over_context_is_an_error_unless_truncating() -> Result<()> {
    let f = fixture();
    let err = fails(&on_fixture(
        &["--prompt", "Hello", "--max-tokens", "5000"],
        &f,
    ))?;
    assert!(
        err.contains("exceeds the model's context of 4096 positions"),
        "{err}"
    );
    assert!(err.contains("--truncate"), "{err}");

    let tmp = tempfile::tempdir()?;
    let ids = ids_arg(&vec![65; 4090]);
    let json = tmp.path().join("out.json").display().to_string();
    let args = on_fixture(
        &[
            "--prompt-ids",
            &ids,
            "--max-tokens",
            "100",
            "--truncate",
            "--ignore-eos",
            "--temperature",
            "0",
            "--output-json",
            &json,
        ],
        &f,
    );
    let out = bitnet(&args, tmp.path())?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = read_json(Path::new(&json))?;
    assert_eq!(
        json_ids(&report["generated_ids"]).len(),
        6,
        "stops at the context"
    );
    Ok(())
}

#[test]
fn prompt_id_out_of_vocab_is_an_error() -> Result<()> {
    let err = fails(&on_fixture(&["--prompt-ids", "502,511,512"], &fixture()))?;
    assert!(
        err.contains("token id 512 is out of range") && err.contains("512 tokens"),
        "{err}"
    );
    Ok(())
}

#[test]
fn unknown_hub_id_offline_is_an_error() -> Result<()> {
    let err = fails(&[
        "generate",
        "--model",
        "no-such-org/no-such-model",
        "--prompt",
        "Hi",
    ])?;
    for part in [
        "no-such-org/no-such-model",
        "config.json",
        "not in the hf-hub cache",
        "--model DIR",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    Ok(())
}

#[test]
fn missing_directory_is_an_error() -> Result<()> {
    let err = fails(&["generate", "--model", "./no/such/dir", "--prompt", "Hi"])?;
    assert!(err.contains("no such directory"), "{err}");
    Ok(())
}

#[test]
fn device_without_cuda_is_an_error() -> Result<()> {
    let has_gpu = candle_core::Device::new_cuda(0).is_ok();
    if has_gpu {
        eprintln!("skipped: a CUDA device is present, so --device 0 is not an error here");
        return Ok(());
    }
    let err = fails(&on_fixture(
        &["--prompt", "Hi", "--device", "0"],
        &fixture(),
    ))?;
    if candle_core::utils::cuda_is_available() {
        assert!(
            err.starts_with("error: CUDA device 0 is not available"),
            "{err}"
        );
    } else {
        assert_eq!(
            err.trim_end(),
            "error: this build has no CUDA support; rebuild with --features cuda"
        );
    }
    Ok(())
}

#[test]
fn unreadable_tokenizer_is_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for entry in std::fs::read_dir(fixture_dir())? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name()))?;
        }
    }
    std::fs::write(dir.path().join("tokenizer.json"), "{ not a tokenizer")?;
    let d = dir.path().display().to_string();
    let err = fails(&["generate", "--model", &d, "--prompt", "Hi"])?;
    assert!(
        err.contains("cannot load tokenizer") && err.contains("tokenizer.json"),
        "{err}"
    );
    Ok(())
}

#[test]
fn bad_sampling_settings_are_errors() -> Result<()> {
    let f = fixture();
    let err = fails(&on_fixture(&["--prompt", "Hi", "--top-p", "1.5"], &f))?;
    assert!(err.contains("top-p must be in (0, 1]"), "{err}");
    let err = fails(&on_fixture(&["--prompt", "Hi", "--temperature=-1"], &f))?;
    assert!(err.contains("temperature"), "{err}");
    Ok(())
}

#[test]
fn opt_in_approximations_decode_the_reference_greedy_ids() -> Result<()> {
    // The fixture's greedy ids survive the int8 head and the f16 KV cache (tests/fixture.rs
    // measures their logits).
    let expected = Expected::load()?;
    let prompt = expected.ids("ids_len23", "prompt_ids");
    for option in [["--head", "int8"], ["--kv-dtype", "f16"]] {
        let tmp = tempfile::tempdir()?;
        let json = tmp.path().join("out.json");
        let (f, ids, j) = (fixture(), ids_arg(&prompt), json.display().to_string());
        let mut args = vec!["generate", "--model", &f, "--cpu", "--prompt-ids", &ids];
        args.extend(option);
        args.extend(["--temperature", "0", "--ignore-eos", "--max-tokens", "16"]);
        args.extend(["--output-json", &j]);
        let out = bitnet(&args, tmp.path())?;
        assert!(
            out.status.success(),
            "{option:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            json_ids(&read_json(&json)?["generated_ids"]),
            expected.ids("ids_len23", "greedy_ids"),
            "{option:?}"
        );
    }
    Ok(())
}
