//! `tokenizer.json`, loaded defensively: the file comes from the model's repository, and some
//! options make the `tokenizers` crate panic or allocate without bound.
//!
//! - `truncation` and `padding` are ignored (set to none): generation takes the whole prompt
//!   and checks it against the model's context itself, and both options have values that
//!   crash the crate (`stride` ≥ `max_length`, a fixed padding of 2⁴⁰ tokens).
//! - `Replace` normalizers with an empty pattern are refused, and so is a normalizer that can
//!   grow the text more than [`MAX_NORMALIZER_GROWTH`] times (a chain of growing `Replace`s).
//! - A prompt is refused before tokenizing when it is longer than the context could hold
//!   ([`Tokenizer::encode`]), so the work per encode is bounded by the context.
//! - A panic inside the crate (e.g. on a corrupt `Precompiled` charsmap) becomes an error
//!   naming the tokenizer file.

use crate::error::{Error, ErrorKind, Result};
use crate::escape::escape_controls;
use crate::json;
use serde_json::Value;
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// How many times longer the normalizer may make a text (Llama 2's `Replace(" ", "▁")` and
/// `Prepend("▁")` together: 2).
pub const MAX_NORMALIZER_GROWTH: u64 = 64;
/// The bytes one token is assumed to cover at most when sizing the longest prompt a context
/// can hold (the longest vocabulary entry, up to this cap).
const LONGEST_TOKEN_CAP: usize = 256;

/// A `tokenizers::Tokenizer` loaded and called through the guards above.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The file it came from, for error messages.
    origin: String,
    /// Bytes of the longest vocabulary entry (capped at [`LONGEST_TOKEN_CAP`]).
    longest_token: usize,
}

impl Tokenizer {
    /// Reads (at most [`json::TOKENIZER_LIMIT`] bytes), checks and loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = json::read_limited(path, json::TOKENIZER_LIMIT)?;
        Self::from_bytes(&bytes, format!("tokenizer {}", path.display()))
    }

    /// Checks and loads the text of a `tokenizer.json`; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: String) -> Result<Self> {
        // Only the small parts that transform text are parsed as JSON values: the vocabulary
        // and merges would take ten times the file's size that way.
        let pipeline: Pipeline = json::parse("JSON", bytes)
            .map_err(|e| Error::model(format!("cannot load {origin}: {e}")))?;
        for part in [
            &pipeline.normalizer,
            &pipeline.pre_tokenizer,
            &pipeline.post_processor,
            &pipeline.decoder,
        ] {
            refuse_empty_replace_patterns(part, &origin)?;
        }
        let growth = growth(&pipeline.normalizer);
        if growth > MAX_NORMALIZER_GROWTH {
            return Err(Error::model(format!(
                "{origin}: the normalizer can make a text {growth} times longer (at most {MAX_NORMALIZER_GROWTH} is allowed)"
            )));
        }
        let mut inner = guarded(&origin, "loading", || {
            serde_json::from_slice::<tokenizers::Tokenizer>(bytes)
        })?
        .map_err(|e| Error::model(escape_controls(&format!("cannot load {origin}: {e}"))))?;
        inner
            .with_padding(None)
            .with_truncation(None)
            .map_err(|e| Error::model(format!("cannot load {origin}: {e}")))?;
        let longest_token = guarded(&origin, "loading", || {
            inner.get_vocab(true).keys().map(String::len).max()
        })?
        .unwrap_or(1)
        .clamp(1, LONGEST_TOKEN_CAP);
        Ok(Self {
            inner,
            origin,
            longest_token,
        })
    }

    /// The `tokenizers` tokenizer, for what this wrapper does not cover. Its calls are not
    /// guarded.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The most bytes a prompt of `max_tokens` tokens can have.
    pub fn max_bytes(&self, max_tokens: usize) -> usize {
        max_tokens.saturating_mul(self.longest_token)
    }

    /// Token ids of `text`, refused before tokenizing when `text` has more bytes than
    /// `max_tokens` tokens can cover (no token is longer than the vocabulary's longest entry).
    pub fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
        max_tokens: usize,
    ) -> Result<Vec<u32>> {
        let limit = self.max_bytes(max_tokens);
        if text.len() > limit {
            return Err(Error::input(format!(
                "the prompt is {} bytes, more than the {max_tokens} tokens of the context can hold (at most {limit} bytes: {} bytes per token at most)",
                text.len(),
                self.longest_token
            )));
        }
        guarded(&self.origin, "encoding", || {
            self.inner.encode(text, add_special_tokens)
        })?
        .map(|enc| enc.get_ids().to_vec())
        .map_err(|e| Error::input(escape_controls(&format!("cannot tokenize the prompt: {e}"))))
    }

    /// The text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        decode(&self.inner, ids)
    }
}

/// The parts of `tokenizer.json` that transform text; the rest is skipped unparsed.
#[derive(serde::Deserialize)]
struct Pipeline {
    #[serde(default)]
    normalizer: Value,
    #[serde(default)]
    pre_tokenizer: Value,
    #[serde(default)]
    post_processor: Value,
    #[serde(default)]
    decoder: Value,
}

/// `tokenizer.decode(ids, true)` with a panic inside the crate turned into an error.
pub fn decode(tokenizer: &tokenizers::Tokenizer, ids: &[u32]) -> Result<String> {
    guarded("the tokenizer", "decoding", || tokenizer.decode(ids, true))?
        .map_err(|e| Error::model(escape_controls(&format!("cannot decode tokens: {e}"))))
}

/// Walks the whole file: an empty pattern makes `Replace` (a normalizer or a decoder) panic.
fn refuse_empty_replace_patterns(node: &Value, origin: &str) -> Result<()> {
    match node {
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some("Replace") {
                let pattern = &map.get("pattern").unwrap_or(&Value::Null);
                let text = pattern["String"].as_str().or(pattern["Regex"].as_str());
                if text.is_none_or(str::is_empty) {
                    return Err(Error::model(format!(
                        "{origin}: a Replace with an empty or missing pattern ({}) is not supported",
                        escape_controls(&pattern.to_string())
                    )));
                }
            }
            map.values()
                .try_for_each(|v| refuse_empty_replace_patterns(v, origin))
        }
        Value::Array(list) => list
            .iter()
            .try_for_each(|v| refuse_empty_replace_patterns(v, origin)),
        _ => Ok(()),
    }
}

/// An upper bound on how many times longer `normalizer` can make a text (saturating).
/// Unicode normalizations are counted as 1: they grow real text by a few percent at most.
fn growth(normalizer: &Value) -> u64 {
    let chars = |v: &Value| v.as_str().map_or(0, |s| s.chars().count() as u64);
    match normalizer["type"].as_str() {
        Some("Sequence") => normalizer["normalizers"].as_array().map_or(1, |list| {
            list.iter().map(growth).fold(1, u64::saturating_mul)
        }),
        Some("Replace") => {
            let content = chars(&normalizer["content"]);
            match chars(&normalizer["pattern"]["String"]) {
                // Each match of `pattern` becomes `content`.
                0 => content.saturating_add(1),
                pattern => content.div_ceil(pattern).max(1),
            }
        }
        // Once per piece of text, the shortest of which is one character.
        Some("Prepend") => chars(&normalizer["prepend"]).saturating_add(1),
        _ => 1,
    }
}

thread_local! {
    /// Set while a guarded call runs: its panics are reported as errors, not printed.
    static QUIET_PANICS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic into an error naming `origin`; the panic message is not printed
/// by the panic hook (other panics still are).
fn guarded<T>(origin: &str, doing: &str, f: impl FnOnce() -> T) -> Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(Cell::get) {
                previous(info)
            }
        }));
    });
    let was_quiet = QUIET_PANICS.with(|q| q.replace(true));
    let out = catch_unwind(AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was_quiet));
    out.map_err(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Error::new(
            ErrorKind::Model,
            escape_controls(&format!(
                "{origin}: the tokenizers library failed while {doing} ({})",
                msg.replace('\n', " ")
            )),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn growth_bounds_replace_chains() {
        let replace =
            |p: &str, c: &str| json!({"type": "Replace", "pattern": {"String": p}, "content": c});
        assert_eq!(growth(&replace(" ", "▁")), 1);
        assert_eq!(growth(&replace("a", "aaaa")), 4);
        let chain: Vec<Value> = (0..8).map(|_| replace("a", "aaaa")).collect();
        assert_eq!(
            growth(&json!({"type": "Sequence", "normalizers": chain})),
            1 << 16
        );
        let regex = json!({"type": "Replace", "pattern": {"Regex": "x*"}, "content": "yy"});
        assert_eq!(growth(&regex), 3);
        assert_eq!(growth(&json!({"type": "Prepend", "prepend": "▁"})), 2);
        assert_eq!(growth(&Value::Null), 1);
    }

    #[test]
    fn a_panic_becomes_an_error_naming_the_origin() {
        let e = guarded("tokenizer t.json", "encoding", || -> u32 {
            panic!("boom\r")
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "tokenizer t.json: the tokenizers library failed while encoding (boom\\r)"
        );
        assert_eq!(guarded("t", "x", || 7).unwrap(), 7);
    }
}
