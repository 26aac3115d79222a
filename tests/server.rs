//! `bitnet serve` end to end on the bundled fixture: each test starts the server on a free
//! loopback port, drives it with the official `openai` Python client (tests/server/client.py,
//! pinned in tests/server/requirements.txt, installed on first use into target/pyenv), then
//! stops it with SIGTERM and checks that it exits 0.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

const GREEDY_TOKENS: usize = 16;
const TEXT_PROMPT: &str = "The quick brown fox jumps over the lazy dog";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> String {
    common::fixture_dir().display().to_string()
}

/// The virtualenv's python, created and filled from requirements.txt once; a stamp (the
/// requirements it holds) makes later runs skip pip.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = root().join("target/pyenv");
        let requirements = root().join("tests/server/requirements.txt");
        let wanted = std::fs::read_to_string(&requirements).expect("tests/server/requirements.txt");
        let stamp = venv.join("installed-requirements.txt");
        let python = venv.join("bin/python");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            let run = |cmd: &mut Command, what: &str| {
                let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(
                    out.status.success(),
                    "{what} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            run(
                Command::new("python3").args(["-m", "venv"]).arg(&venv),
                "python3 -m venv target/pyenv",
            );
            run(
                Command::new(&python)
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                        "-r",
                    ])
                    .arg(&requirements),
                "pip install -r tests/server/requirements.txt",
            );
            std::fs::write(&stamp, &wanted).expect("write the venv stamp");
        }
        python
    })
}

/// A running `bitnet serve`; its log is collected for failure messages.
struct Server {
    child: Child,
    base_url: String,
    log: Arc<Mutex<String>>,
    /// Reads stderr into `log` until the server exits.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let fixture = fixture();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args(["serve", "--model", &fixture, "--cpu", "--port", "0"])
            .args(args)
            .envs(env.iter().copied())
            .env("HF_HUB_OFFLINE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bitnet serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, addr)) = line.split_once("listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let base_url = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("the server did not listen: {}", log.lock().unwrap()));
        Server {
            child,
            base_url,
            log,
            reader: Some(reader),
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM; the server must exit 0.
    fn stop(mut self) {
        signal_term(&self.child);
        let status = self.child.wait().expect("wait for the server");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the log reader");
        }
        let log = self.log();
        assert!(status.success(), "server exit {status}: {log}");
        assert!(log.contains("stopped"), "no clean stop in the log: {log}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal_term(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -TERM failed");
}

fn client_command(
    server: &Server,
    scenario: &str,
    expect: &Value,
    api_key: Option<&str>,
) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(root().join("tests/server/client.py"))
        .args([
            scenario,
            "--base-url",
            &server.base_url,
            "--model",
            &fixture(),
        ])
        .args(["--expect", &expect.to_string()]);
    if let Some(key) = api_key {
        cmd.args(["--api-key", key]);
    }
    cmd
}

fn assert_client_ok(server: &Server, out: Output) {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "client failed:\n{stdout}\n{stderr}\n--- server log ---\n{}",
        server.log()
    );
    eprint!("{stdout}");
}

/// Runs one scenario of client.py against a fresh server started with `args`.
fn scenario(name: &str, args: &[&str], expect: Value) {
    let server = Server::start(args, &[]);
    let out = client_command(&server, name, &expect, None)
        .output()
        .expect("run client.py");
    assert_client_ok(&server, out);
    server.stop();
}

/// `bitnet generate`'s greedy output (EOS ignored) for `prompt_args`: (prompt ids, text).
fn generate(prompt_args: &[&str]) -> (Vec<u64>, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let json_path = tmp.path().join("out.json");
    let fixture = fixture();
    let n = GREEDY_TOKENS.to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["generate", "--model", &fixture, "--cpu"])
        .args(prompt_args)
        .args(["--temperature", "0", "--ignore-eos", "--max-tokens", &n])
        .arg("--output-json")
        .arg(&json_path)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run bitnet generate");
    assert!(
        out.status.success(),
        "bitnet generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(json_path).expect("report")).expect("JSON");
    let ids = json["prompt_ids"]
        .as_array()
        .expect("prompt_ids")
        .iter()
        .map(|v| v.as_u64().expect("an id"))
        .collect();
    (ids, json["text"].as_str().expect("text").to_string())
}

#[test]
fn chat_and_completions_match_bitnet_generate() {
    let prompt_ids = [502u64, 17, 301, 45, 9, 260, 88];
    let ids_arg = prompt_ids.map(|i| i.to_string()).join(",");
    let (_, ids_text) = generate(&["--prompt-ids", &ids_arg]);
    let (_, text_text) = generate(&["--prompt", TEXT_PROMPT]);
    let (chat_ids, chat_text) = generate(&["--prompt", TEXT_PROMPT, "--chat"]);
    let expect = json!({
        "max_tokens": GREEDY_TOKENS,
        "prompt_ids": prompt_ids,
        "prompt": TEXT_PROMPT,
        "ids_text": ids_text,
        "text_text": text_text,
        "chat_text": chat_text,
        "chat_prompt_len": chat_ids.len(),
    });
    scenario("basic", &[], expect);
}

#[test]
fn concurrent_streams_match_their_solo_runs() {
    scenario("concurrent_streams", &["--max-batch", "16"], json!({}));
}

#[test]
fn load_of_300_requests_from_32_clients_loses_nothing() {
    scenario(
        "load",
        &["--max-batch", "16", "--max-queue", "64"],
        json!({}),
    );
}

#[test]
fn malformed_requests_get_4xx_naming_the_problem() {
    scenario("malformed", &[], json!({"context_len": 4096}));
}

#[test]
fn client_disconnect_cancels_and_frees_the_slot() {
    scenario("cancel", &["--max-batch", "1"], json!({}));
}

#[test]
fn full_queue_answers_429() {
    scenario(
        "overload",
        &["--max-batch", "1", "--max-queue", "1"],
        json!({}),
    );
}

#[test]
fn api_key_from_flag_and_env() {
    for (args, env) in [
        (&["--api-key", "s3cret"][..], &[][..]),
        (&[][..], &[("BITNET_API_KEY", "s3cret")][..]),
    ] {
        let server = Server::start(args, env);
        let out = client_command(&server, "auth", &json!({}), Some("s3cret"))
            .output()
            .expect("run client.py");
        assert_client_ok(&server, out);
        server.stop();
    }
}

#[test]
fn sigterm_ends_running_streams_and_exits_0() {
    let server = Server::start(&[], &[]);
    let mut client = client_command(&server, "shutdown", &json!({}), None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run client.py");
    let stdout: ChildStdout = client.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().and_then(Result::ok);
    assert_eq!(first.as_deref(), Some("streaming"), "{}", server.log());
    server.stop();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = client.wait_with_output().expect("client.py");
    assert!(
        out.status.success() && rest.iter().any(|l| l == "shutdown: ok"),
        "client: {rest:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
