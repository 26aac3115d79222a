//! A bounded, seeded fuzz harness for the parsers of model files (issue 12): `config.json`,
//! `generation_config.json`, `tokenizer_config.json` with its chat template, the safetensors
//! index and `tokenizer.json`. Each input is the fixture's file mutated (values swapped for
//! hostile ones, keys dropped, template fragments spliced in, bytes flipped); every parser must
//! answer `Ok` or an `Err`, never panic, hang or allocate without bound.
//!
//! A few hundred inputs per parser run in `make test` in seconds; `FUZZ_SECS=600 FUZZ_SEED=7
//! cargo test --test fuzz_parsers -- --nocapture` runs each parser for ten minutes instead.

mod common;

use candle_bitnet::config::Config;
use candle_bitnet::generate::{ChatTemplate, Message};
use candle_bitnet::generation_config::GenerationConfig;
use candle_bitnet::tokenizer::Tokenizer;
use candle_bitnet::weights::shard_names;
use common::fixture_dir;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::Path;

/// How many inputs to try: `default`, or as many as fit in `FUZZ_SECS` seconds.
struct Budget {
    left: usize,
    until: Option<std::time::Instant>,
    done: usize,
}

impl Budget {
    fn new(default: usize) -> Self {
        let secs = std::env::var("FUZZ_SECS").ok().and_then(|v| v.parse().ok());
        Self {
            left: default,
            until: secs.map(|s| std::time::Instant::now() + std::time::Duration::from_secs(s)),
            done: 0,
        }
    }

    fn more(&mut self) -> bool {
        let more = match self.until {
            Some(t) => std::time::Instant::now() < t,
            None => self.left > 0,
        };
        self.left = self.left.saturating_sub(1);
        self.done += usize::from(more);
        more
    }
}

fn rng(salt: u64) -> StdRng {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EED);
    StdRng::seed_from_u64(seed ^ salt)
}

fn hostile_value(rng: &mut StdRng) -> Value {
    let deep = (0..rng.random_range(1..300)).fold(json!(1), |v, _| json!([v]));
    let choices = [
        json!(0),
        json!(-1),
        json!(1u64 << 53),
        json!(u64::MAX),
        json!((1u64 << 62) + 2),
        json!(1e308),
        json!(-1e308),
        json!(1e-45),
        json!(1e39),
        json!(0.5),
        json!(""),
        json!("\u{0}\r\u{1b}[2K\u{202e}"),
        json!("x".repeat(rng.random_range(0..20_000))),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!("bitnet"),
        json!("llama"),
        json!("relu2"),
        json!("autobitlinear"),
        json!("online"),
        json!("../x"),
        json!({"String": "", "Regex": ""}),
        deep,
    ];
    choices[rng.random_range(0..choices.len())].clone()
}

/// A random node of `v` (objects and arrays included), mutably.
fn pick<'a>(rng: &mut StdRng, v: &'a mut Value) -> &'a mut Value {
    let children = match &*v {
        Value::Object(map) => map.len(),
        Value::Array(list) => list.len(),
        _ => 0,
    };
    if children == 0 || !rng.random_bool(0.7) {
        return v;
    }
    let i = rng.random_range(0..children);
    match v {
        Value::Object(map) => pick(rng, map.values_mut().nth(i).expect("in range")),
        Value::Array(list) => pick(rng, &mut list[i]),
        _ => unreachable!("has children"),
    }
}

fn mutate(rng: &mut StdRng, v: &mut Value) {
    for _ in 0..rng.random_range(1..4) {
        let node = pick(rng, v);
        match rng.random_range(0..4) {
            0 => *node = hostile_value(rng),
            1 => {
                if let Some(map) = node.as_object_mut() {
                    if !map.is_empty() {
                        let key = map.keys().nth(rng.random_range(0..map.len())).cloned();
                        map.remove(&key.expect("in range"));
                    }
                }
            }
            2 => {
                if let Some(map) = node.as_object_mut() {
                    map.insert("\u{1b}[2Kkey".into(), hostile_value(rng));
                }
            }
            _ => {
                if let Some(list) = node.as_array_mut() {
                    let copies = list.clone();
                    list.extend(copies);
                }
            }
        }
    }
}

/// The text of `v`, sometimes with bytes flipped, cut or repeated.
fn to_bytes(rng: &mut StdRng, v: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(v).expect("serializable");
    if rng.random_bool(0.2) && !bytes.is_empty() {
        match rng.random_range(0..3) {
            0 => {
                for _ in 0..rng.random_range(1..8) {
                    let i = rng.random_range(0..bytes.len());
                    bytes[i] = rng.random();
                }
            }
            1 => bytes.truncate(rng.random_range(0..bytes.len())),
            _ => {
                let i = rng.random_range(0..bytes.len());
                let tail = bytes[i..].to_vec();
                bytes.extend(tail);
            }
        }
    }
    bytes
}

fn fixture_json(file: &str) -> Value {
    let text = std::fs::read_to_string(fixture_dir().join(file)).expect("fixture file");
    serde_json::from_str(&text).expect("fixture JSON")
}

/// Runs `parse` on mutations of `base`; returns how many were tried and how many accepted.
fn fuzz(
    salt: u64,
    base: &Value,
    default: usize,
    mut parse: impl FnMut(&[u8]) -> bool,
) -> (usize, usize) {
    let mut rng = rng(salt);
    let mut budget = Budget::new(default);
    let mut accepted = 0;
    while budget.more() {
        let mut v = base.clone();
        mutate(&mut rng, &mut v);
        let bytes = to_bytes(&mut rng, &v);
        accepted += usize::from(parse(&bytes));
    }
    (budget.done, accepted)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("temp file");
    path
}

#[test]
fn config_json() {
    let base = fixture_json("config.json");
    let (tried, accepted) = fuzz(1, &base, 2000, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        match Config::from_json(&text) {
            // Whatever is accepted is within the bounds the model relies on.
            Ok(cfg) => {
                assert!(cfg.head_dim() * cfg.num_attention_heads <= 1 << 18);
                assert!(cfg.max_position_embeddings * cfg.head_dim() <= 1 << 27);
                true
            }
            Err(e) => {
                assert!(!e.to_string().contains(['\r', '\u{1b}']), "{e}");
                false
            }
        }
    });
    eprintln!("config.json: {tried} tried, {accepted} accepted");
}

#[test]
fn generation_config_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = fixture_json("generation_config.json");
    let (tried, accepted) = fuzz(2, &base, 1000, |bytes| {
        let path = write(dir.path(), "generation_config.json", bytes);
        match GenerationConfig::from_file(&path) {
            Ok(cfg) => {
                cfg.params()
                    .validate()
                    .expect("accepted defaults are valid");
                true
            }
            Err(_) => false,
        }
    });
    eprintln!("generation_config.json: {tried} tried, {accepted} accepted");
}

const TEMPLATE_FRAGMENTS: [&str; 12] = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(1000) %}{{ 'x' * 100000000 }}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ messages[0]['content'] * 1000 }}",
    "{{ raise_exception('no') }}",
    "{% for m in messages %}{{ m.role }}{% endfor %}",
    "{{ messages[99] }}",
    "{% if %}",
    "{{ bos_token ~ eos_token }}",
    "{% set x = namespace(a=[]) %}{% for i in range(5000) %}{% set x.a = x.a + [i] %}{% endfor %}",
    "{{ (messages | tojson) * 100 }}",
    "{% include 'other' %}",
];

#[test]
fn tokenizer_config_and_chat_template() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut base = fixture_json("tokenizer_config.json");
    let template = base["chat_template"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut rng = rng(3);
    let messages = [
        Message::system("be brief"),
        Message::user("hi \u{1b}[2K"),
        Message::assistant("hello"),
    ];
    let mut rendered = 0;
    let mut budget = Budget::new(100);
    while budget.more() {
        // Splice a fragment into the template at a random character boundary.
        let cut = template
            .char_indices()
            .map(|(i, _)| i)
            .nth(rng.random_range(0..template.chars().count().max(1)))
            .unwrap_or(0);
        let fragment = TEMPLATE_FRAGMENTS[rng.random_range(0..TEMPLATE_FRAGMENTS.len())];
        base["chat_template"] =
            format!("{}{fragment}{}", &template[..cut], &template[cut..]).into();
        let mut v = base.clone();
        if rng.random_bool(0.3) {
            mutate(&mut rng, &mut v);
        }
        let bytes = to_bytes(&mut rng, &v);
        let path = write(dir.path(), "tokenizer_config.json", &bytes);
        if let Ok(Some(t)) = ChatTemplate::from_tokenizer_config(&path) {
            if let Ok(text) = t.render(&messages, true) {
                assert!(text.len() <= 2 * 64 + (1 << 20));
                rendered += 1;
            }
        }
    }
    eprintln!("chat templates: {} tried, {rendered} rendered", budget.done);
}

#[test]
fn safetensors_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = json!({
        "metadata": {"total_size": 1234},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors"
        }
    });
    let (tried, accepted) = fuzz(4, &base, 1000, |bytes| {
        let path = write(dir.path(), "model.safetensors.index.json", bytes);
        match shard_names(&path) {
            Ok(names) => {
                for n in &names {
                    assert!(!n.contains('/') && n != ".." && !n.is_empty(), "{n:?}");
                }
                true
            }
            Err(_) => false,
        }
    });
    eprintln!("safetensors index: {tried} tried, {accepted} accepted");
}

#[test]
fn tokenizer_json() {
    let base = fixture_json("tokenizer.json");
    let prompts = [
        "Hello, world!",
        "",
        " \u{1b}[2K\r\n",
        "ééé 123 <|begin_of_text|>",
    ];
    let mut encoded = 0;
    let (tried, accepted) = fuzz(5, &base, 60, |bytes| {
        let Ok(tok) = Tokenizer::from_bytes(bytes, "fuzzed tokenizer".into()) else {
            return false;
        };
        for p in prompts {
            if let Ok(ids) = tok.encode(p, true, 4096) {
                let _ = tok.decode(&ids);
                encoded += 1;
            }
        }
        true
    });
    eprintln!("tokenizer.json: {tried} tried, {accepted} loaded, {encoded} prompts encoded");
}
