//! Hostile model files and inputs (issue 12): one test per class of attack, each on a copy of
//! the fixture in a temporary directory. The CLI must answer with exit status 1 and one error
//! line naming the problem; memory classes run under an address-space limit (`prlimit --as`),
//! so an unbounded allocation fails the test instead of the machine.

mod common;

use anyhow::Result;
use common::fixture_dir;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Address space for runs that must not allocate much: the fixture model needs ~100 MiB, and
/// the limit stays well below the gigabytes the attacks used to take.
const MEMORY_LIMIT: u64 = 1 << 30;

struct Run<'a> {
    args: Vec<String>,
    env: Vec<(&'a str, String)>,
    stdin: Option<Vec<u8>>,
    memory_limit: Option<u64>,
}

impl<'a> Run<'a> {
    fn new(args: &[&str]) -> Self {
        Self {
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec![],
            stdin: None,
            memory_limit: Some(MEMORY_LIMIT),
        }
    }

    fn env(mut self, key: &'a str, value: &str) -> Self {
        self.env.push((key, value.into()));
        self
    }

    fn stdin(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(bytes);
        self
    }

    fn output(self) -> Result<Output> {
        let bin = env!("CARGO_BIN_EXE_bitnet");
        let mut cmd = match self.memory_limit {
            Some(limit) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--as={limit}")).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let hf_home = tempfile::tempdir()?;
        cmd.args(&self.args)
            .env("HF_HOME", hf_home.path())
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("RUST_BACKTRACE")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let mut stdin = child.stdin.take().expect("piped");
        let input = self.stdin.unwrap_or_default();
        let writer = std::thread::spawn(move || {
            // The child may exit before reading everything.
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output()?;
        writer.join().expect("stdin writer");
        Ok(out)
    }
}

/// `generate` on `model` with `extra` arguments, and unless they say otherwise a short text
/// prompt, greedy, 4 tokens.
fn generate(model: &Path, extra: &[&str]) -> Run<'static> {
    let model = model.display().to_string();
    let mut args = vec!["generate", "--model", &model, "--cpu"];
    args.extend(extra);
    let given = |flags: &[&str]| extra.iter().any(|a| flags.contains(a));
    if !given(&["--prompt", "--prompt-ids"]) {
        args.extend(["--prompt", "Hello"]);
    }
    if !given(&["--temperature"]) {
        args.extend(["--temperature", "0"]);
    }
    if !given(&["--max-tokens"]) {
        args.extend(["--max-tokens", "4"]);
    }
    Run::new(&args)
}

/// Exit status 1 and exactly one line on stderr, `error: …`, containing every one of `needles`;
/// returns the line.
#[track_caller]
fn assert_one_line_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {stderr}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    for needle in needles {
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
    }
    line.to_string()
}

#[track_caller]
fn assert_success(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bitnet failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A copy of the fixture, to damage.
fn fixture_copy() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for entry in std::fs::read_dir(fixture_dir())? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name()))?;
        }
    }
    Ok(dir)
}

fn edit_json(dir: &Path, file: &str, edit: impl FnOnce(&mut Value)) -> Result<()> {
    let path = dir.join(file);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v)?)?;
    Ok(())
}

#[test]
fn config_sizes_are_checked_before_anything_is_allocated() -> Result<()> {
    for (field, value) in [
        ("head_dim", json!(1u64 << 20)),
        ("head_dim", json!((1u64 << 62) + 2)),
        ("num_attention_heads", json!(1u64 << 40)),
        ("vocab_size", json!(u64::MAX)),
        ("max_position_embeddings", json!(1u64 << 32)),
    ] {
        let dir = fixture_copy()?;
        edit_json(dir.path(), "config.json", |v| v[field] = value.clone())?;
        let out = generate(dir.path(), &[]).output()?;
        assert_one_line_error(&out, &["config.json", field, &value.to_string()]);
    }
    Ok(())
}

#[test]
fn huge_json_files_are_refused_unread() -> Result<()> {
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "tokenizer.json",
    ] {
        let dir = fixture_copy()?;
        // Sparse: 5 GiB on paper, nothing on disk.
        std::fs::File::create(dir.path().join(file))?.set_len(5 << 30)?;
        let out = generate(dir.path(), &[]).output()?;
        assert_one_line_error(&out, &[file, "5368709120 bytes", "MiB"]);
    }
    // 100 MB within tokenizer.json's limit, in a key the tokenizers crate refuses: parsed
    // without building a JSON value of ten times its size (the 1 GiB limit would abort that).
    let dir = fixture_copy()?;
    let path = dir.path().join("tokenizer.json");
    let text = std::fs::read_to_string(&path)?;
    let mut padded = String::with_capacity(text.len() + 100_000_000);
    padded.push_str("{\"x\": [");
    padded.push_str(&"0,".repeat(50_000_000));
    padded.push_str("0],");
    padded.push_str(&text[1..]);
    std::fs::write(&path, padded)?;
    let out = generate(dir.path(), &[]).output()?;
    assert_one_line_error(&out, &["cannot load tokenizer", "tokenizer.json"]);
    Ok(())
}

#[test]
fn sharded_index_names_stay_in_the_model_directory() -> Result<()> {
    let dir = fixture_copy()?;
    std::fs::remove_file(dir.path().join("model.safetensors"))?;
    let index = json!({"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )?;
    let out = generate(dir.path(), &[]).output()?;
    assert_one_line_error(&out, &["invalid shard name", "../../etc/passwd"]);
    Ok(())
}

#[test]
fn tokenizer_options_that_crash_the_tokenizers_crate() -> Result<()> {
    let plain = assert_success(&generate(&fixture_dir(), &[]).output()?);
    // Truncation and padding are ignored: the output is the plain fixture's.
    for (key, value) in [
        (
            "truncation",
            json!({"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 5}),
        ),
        (
            "padding",
            json!({"strategy": {"Fixed": 1u64 << 40}, "direction": "Right", "pad_to_multiple_of": null,
                   "pad_id": 0, "pad_type_id": 0, "pad_token": "!"}),
        ),
    ] {
        let dir = fixture_copy()?;
        edit_json(dir.path(), "tokenizer.json", |v| v[key] = value)?;
        let out = generate(dir.path(), &[]).output()?;
        assert_eq!(assert_success(&out), plain, "{key}");
    }
    let replace = |pattern: &str, content: &str| json!({"type": "Replace", "pattern": {"String": pattern}, "content": content});
    let growing: Vec<Value> = (0..12).map(|_| replace("l", "llll")).collect();
    for (normalizer, needles) in [
        (replace("", "x"), vec!["tokenizer", "empty"]),
        (
            json!({"type": "Sequence", "normalizers": growing}),
            vec!["tokenizer", "16777216 times longer"],
        ),
        (
            json!({"type": "Precompiled", "precompiled_charsmap": "AAAAAAAAAAAAAAAAAAAA/////w=="}),
            vec!["tokenizer", "tokenizer.json"],
        ),
    ] {
        let dir = fixture_copy()?;
        edit_json(dir.path(), "tokenizer.json", |v| {
            v["normalizer"] = normalizer.clone()
        })?;
        let out = generate(dir.path(), &[]).output()?;
        assert_one_line_error(&out, &needles);
    }
    Ok(())
}

#[test]
fn chat_templates_run_within_limits() -> Result<()> {
    for (template, needle) in [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "instructions",
        ),
        (
            "{% for i in range(100) %}{{ 'x' * 100000 }}{% endfor %}",
            "rendered more than",
        ),
        (
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "recursion",
        ),
    ] {
        let dir = fixture_copy()?;
        edit_json(dir.path(), "tokenizer_config.json", |v| {
            v["chat_template"] = template.into()
        })?;
        let out = generate(dir.path(), &["--chat"]).output()?;
        assert_one_line_error(&out, &["chat template", "tokenizer_config.json", needle]);
    }
    Ok(())
}

/// Templates that grow a value geometrically, or by a huge argument, without writing it: each
/// stops on the template's memory budget, well inside the address-space limit.
#[test]
fn chat_templates_that_grow_values_stop_on_their_budget() -> Result<()> {
    for template in [
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set s %}{{ ns.s }}{{ ns.s }}{% endset %}\
         {% set ns.s = s %}{% endfor %}",
        "{% set a = 'xxxxxxxx' %}{% set a = a~a~a~a~a~a~a~a %}{% set a = a~a~a~a~a~a~a~a %}\
         {% set a = a~a~a~a~a~a~a~a %}{% set a = a~a~a~a~a~a~a~a %}{% set a = a~a~a~a~a~a~a~a %}\
         {% set a = a~a~a~a~a~a~a~a %}{% set a = a~a~a~a~a~a~a~a %}{% set a = a~a~a~a~a~a~a~a %}",
        "{% set ns = namespace(l=['x']) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}\
         {{ ns.l|join }}",
        "{{ (['x'] * 1000000000000)|join }}",
        "{% set ns = namespace(l=['x']) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}\
         {{ ns.l|tojson }}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s|replace('x', 'xx') %}\
         {% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = '%s%s'|format(ns.s, ns.s) %}\
         {% endfor %}",
        "{{ 'a\nb'|indent(1000000000000) }}",
        "{{ [1]|batch(1000000000000, 'x') }}",
        "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% endif %}{% endmacro %}\
         {{ d('x' * 1000000, 16) }}",
    ] {
        let dir = fixture_copy()?;
        edit_json(dir.path(), "tokenizer_config.json", |v| {
            v["chat_template"] = template.into()
        })?;
        let out = generate(dir.path(), &["--chat"]).output()?;
        assert_one_line_error(
            &out,
            &["chat template", "tokenizer_config.json", "needed more than", "runaway"],
        );
    }
    Ok(())
}

#[test]
fn input_is_sized_against_the_context_before_tokenizing() -> Result<()> {
    let model = fixture_dir().display().to_string();
    // One 32 MB line: refused before the tokenizer sees it; a line that is not UTF-8: skipped.
    let mut input = vec![b'a'; 32 << 20];
    input.extend_from_slice(b"\n\xff\xfe\n");
    let out = Run::new(&["chat", "--model", &model, "--cpu", "--max-tokens", "2"])
        .stdin(input)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(errors[1].contains("not UTF-8"), "{stderr}");
    assert!(
        errors[0].contains("the prompt is 335544") && errors[0].contains("4096 tokens"),
        "{stderr}"
    );
    // A command-line prompt longer than a small context can hold: exit status 1.
    let dir = fixture_copy()?;
    edit_json(dir.path(), "config.json", |v| {
        v["max_position_embeddings"] = 64.into()
    })?;
    let long = "word ".repeat(20_000);
    let out = generate(dir.path(), &["--prompt", &long]).output()?;
    assert_one_line_error(&out, &["the prompt is 100000 bytes", "64 tokens"]);
    Ok(())
}

#[test]
fn length_arithmetic_saturates() -> Result<()> {
    let dir = fixture_copy()?;
    edit_json(dir.path(), "config.json", |v| {
        v["max_position_embeddings"] = 24.into()
    })?;
    let json_path = dir.path().join("out.json");
    let json_arg = json_path.display().to_string();
    let out = generate(
        dir.path(),
        &[
            "--prompt-ids",
            "502,225,358",
            "--max-tokens",
            "18446744073709551613",
            "--truncate",
            "--ignore-eos",
            "--output-json",
            &json_arg,
        ],
    )
    .output()?;
    assert_success(&out);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json_path)?)?;
    assert_eq!(
        report["generated_ids"].as_array().map(Vec::len),
        Some(24 - 3)
    );

    let out = Run::new(&["bench", "--decode-tokens", "18446744073709551615"]).output()?;
    assert_one_line_error(&out, &["18446744073709551615 tokens", "context"]);
    Ok(())
}

fn mkfifo(path: &Path) -> Result<()> {
    let status = Command::new("mkfifo").arg(path).status()?;
    anyhow::ensure!(status.success(), "mkfifo {}", path.display());
    Ok(())
}

#[test]
fn outputs_never_replace_special_files() -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let tmp = tempfile::tempdir()?;
    let fifo = tmp.path().join("report.fifo");
    mkfifo(&fifo)?;
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo))
    };
    let target = tmp.path().join("target.json");
    std::fs::write(&target, "old")?;
    let link = tmp.path().join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link)?;
    let (fifo_arg, link_arg) = (fifo.display().to_string(), link.display().to_string());
    let out = generate(
        &fixture_dir(),
        &["--output-json", &fifo_arg, "--dump-logits", &link_arg],
    )
    .output()?;
    assert_success(&out);
    let report: Value = serde_json::from_str(&reader.join().expect("reader")?)?;
    assert!(report["generated_ids"].is_array(), "{report}");
    assert!(std::fs::symlink_metadata(&fifo)?.file_type().is_fifo());
    assert!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());
    let logits = candle_core::safetensors::load(&target, &candle_core::Device::Cpu)?;
    assert!(logits.contains_key("logits"));

    let dir_arg = tmp.path().display().to_string();
    let out = generate(&fixture_dir(), &["--output-json", &dir_arg]).output()?;
    assert_one_line_error(&out, &["directory"]);
    Ok(())
}

/// The fixture's weights with `edit` applied to the named tensor.
fn edit_tensor(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&candle_core::Tensor) -> candle_core::Tensor,
) -> Result<()> {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
    let t = tensors.get(name).expect("tensor in the fixture");
    let edited = edit(t);
    tensors.insert(name.into(), edited);
    candle_core::safetensors::save(&tensors, &path)?;
    Ok(())
}

#[test]
fn non_finite_logits_are_named() -> Result<()> {
    let dir = fixture_copy()?;
    edit_tensor(dir.path(), "model.embed_tokens.weight", |t| {
        (t.ones_like().unwrap() * f64::NAN).unwrap()
    })?;
    let out = generate(dir.path(), &["--temperature", "1", "--seed", "1"]).output()?;
    assert_one_line_error(&out, &["the model produced non-finite logits", "corrupt"]);

    let out = generate(&fixture_dir(), &["--repeat-penalty", "1e-45"]).output()?;
    assert_one_line_error(&out, &["repeat penalty", "non-finite logits"]);
    Ok(())
}

/// A safetensors file whose header names a tensor with terminal control characters and gives
/// it offsets that leave a gap before it.
fn malicious_safetensors(path: &Path) -> Result<()> {
    let name = "\r\u{1b}[2Kall is well";
    let header = json!({name: {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}});
    let header = header.to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(path, bytes)?;
    Ok(())
}

#[test]
fn strings_from_files_are_escaped_in_error_lines() -> Result<()> {
    let dir = fixture_copy()?;
    malicious_safetensors(&dir.path().join("model.safetensors"))?;
    let out = generate(dir.path(), &[]).output()?;
    let line = assert_one_line_error(&out, &["safetensors", "\\r\\u{1b}[2Kall is well"]);
    assert!(!line.contains(['\r', '\u{1b}']), "{line:?}");

    let dir = fixture_copy()?;
    edit_json(dir.path(), "config.json", |v| {
        v["hidden_act"] = "\r\u{1b}[2Krelu".into()
    })?;
    let out = generate(dir.path(), &[]).output()?;
    let line = assert_one_line_error(&out, &["hidden_act", "\\r\\u{1b}[2Krelu"]);
    assert!(!line.contains(['\r', '\u{1b}']), "{line:?}");
    Ok(())
}

#[test]
fn thread_pool_start_up_is_checked() -> Result<()> {
    let model = fixture_dir().display().to_string();
    for value in ["100000", "many", "0"] {
        let out = Run::new(&["generate", "--model", &model, "--prompt", "Hi"])
            .env("RAYON_NUM_THREADS", value)
            .output()?;
        assert_one_line_error(&out, &["RAYON_NUM_THREADS", value, "1 to 1024"]);
    }
    // 1000 threads of 2 MiB stacks do not fit in the 1 GiB address space of the run.
    let out = Run::new(&["generate", "--model", &model, "--prompt", "Hi"])
        .env("RAYON_NUM_THREADS", "1000")
        .output()?;
    assert_one_line_error(&out, &["cannot start 1000 worker threads"]);
    Ok(())
}

#[test]
fn generation_config_values_name_their_file() -> Result<()> {
    for (key, value, shown) in [
        ("repetition_penalty", json!(1e39), "repetition_penalty 1e39"),
        ("temperature", json!(-2.0), "temperature -2"),
        ("top_p", json!(7), "top_p 7"),
    ] {
        let dir = fixture_copy()?;
        edit_json(dir.path(), "generation_config.json", |v| v[key] = value)?;
        let out = generate(dir.path(), &[]).output()?;
        assert_one_line_error(&out, &["generation_config.json", shown, "out of range"]);
    }
    Ok(())
}
