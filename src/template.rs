//! `tokenizer_config.json`'s chat template, rendered with limits: a template is code from the
//! model's repository, so it runs on a budget of minijinja instructions ("fuel"), a recursion
//! limit, and a cap on the text it may produce. An exhausted limit is an error naming the
//! template's file and the limit.

use crate::error::{Error, ErrorKind, Result};
use crate::escape::escape_controls;
use crate::json;
use serde::Serialize;
use std::path::Path;

/// Instructions one rendering may execute: Llama 3's template uses ~40 per message, so this
/// renders conversations of tens of thousands of messages and stops a runaway loop in well
/// under a second.
pub const TEMPLATE_FUEL: u64 = 5_000_000;
/// Nesting of loops, conditions and macro calls (minijinja's own default is 500).
pub const TEMPLATE_RECURSION_LIMIT: usize = 100;
/// Rendered text beyond the messages' own: the template's markup around them.
pub const TEMPLATE_OUTPUT_OVERHEAD: usize = 1 << 20;

/// One chat message, as chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: &str) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: &str) -> Self {
        Self::new("assistant", content)
    }
}

/// `tokenizer_config.json`'s `chat_template`, compiled, with the special tokens it refers to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for error messages.
    origin: String,
}

impl ChatTemplate {
    /// `None` when the file has no `chat_template`.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        let json: serde_json::Value = json::read(path, json::SMALL_FILE_LIMIT)?;
        let origin = format!("the chat template of {}", path.display());
        // A plain string, or (newer configs) a list of named templates.
        let source = match &json["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(list) => match list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
            {
                Some(s) => s.to_string(),
                None => {
                    return Err(Error::model(format!(
                        "{}: no \"default\" chat template",
                        path.display()
                    )))
                }
            },
            _ => return Ok(None),
        };
        // Special tokens are strings, or {"content": ...} objects in older configs.
        let token = |key: &str| {
            let v = &json[key];
            v.as_str()
                .or_else(|| v["content"].as_str())
                .unwrap_or_default()
                .to_string()
        };
        Self::with_origin(&source, &token("bos_token"), &token("eos_token"), origin).map(Some)
    }

    /// Compiles `source` with the Jinja settings `transformers` uses (trim and lstrip blocks,
    /// `raise_exception`).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        Self::with_origin(source, bos_token, eos_token, "the chat template".into())
    }

    fn with_origin(source: &str, bos_token: &str, eos_token: &str, origin: String) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(
                    minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg)
                        .with_source(Raised),
                )
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| {
                Error::model(escape_controls(&format!(
                    "invalid chat template ({origin}): {}",
                    one_line(&e)
                )))
            })?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            origin,
        })
    }

    /// The conversation as the model's prompt text. At most [`TEMPLATE_FUEL`] instructions
    /// run, and the text may be [`TEMPLATE_OUTPUT_OVERHEAD`] bytes longer than twice the
    /// messages' own.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let content: usize = messages
            .iter()
            .map(|m| m.content.len().saturating_add(m.role.len()))
            .fold(0, usize::saturating_add);
        let cap = content
            .saturating_mul(2)
            .saturating_add(TEMPLATE_OUTPUT_OVERHEAD);
        let mut out = CappedWriter {
            bytes: Vec::new(),
            cap,
            overflowed: false,
        };
        let rendered = self.env.get_template("chat").and_then(|t| {
            t.render_captured_to(
                minijinja::context! {
                    messages => messages,
                    bos_token => &self.bos_token,
                    eos_token => &self.eos_token,
                    add_generation_prompt => add_generation_prompt,
                },
                &mut out,
            )
            .map(drop)
        });
        let origin = &self.origin;
        match rendered {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|_| Error::model(format!("{origin} rendered invalid UTF-8"))),
            Err(_) if out.overflowed => Err(Error::model(format!(
                "{origin} rendered more than {cap} bytes (twice the messages plus {} KiB), a runaway template",
                TEMPLATE_OUTPUT_OVERHEAD >> 10
            ))),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(Error::model(format!(
                "{origin} ran more than {TEMPLATE_FUEL} instructions, a runaway template"
            ))),
            // The template refuses the conversation (e.g. roles that do not alternate).
            Err(e) if std::error::Error::source(&e).is_some_and(|s| s.is::<Raised>()) => {
                Err(Error::new(ErrorKind::Input, render_error(origin, &e)))
            }
            Err(e) => Err(Error::model(render_error(origin, &e))),
        }
    }
}

/// Marks the errors of `raise_exception`: the conversation is at fault, not the template.
#[derive(Debug)]
struct Raised;

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

fn render_error(origin: &str, e: &minijinja::Error) -> String {
    escape_controls(&format!("cannot render {origin}: {}", one_line(e))).into_owned()
}

/// minijinja's message and the causes it wraps, without its multi-line source excerpt.
fn one_line(e: &minijinja::Error) -> String {
    let mut line = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    line.replace('\n', " ")
}

/// Collects rendered text and fails the write that would take it past `cap`.
struct CappedWriter {
    bytes: Vec<u8>,
    cap: usize,
    overflowed: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.cap {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered text too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_err(source: &str) -> String {
        let t = ChatTemplate::new(source, "<s>", "</s>").expect("compiles");
        let e = t.render(&[Message::user("hi")], true).expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::Model);
        e.to_string()
    }

    #[test]
    fn runaway_loops_run_out_of_fuel() {
        let e = render_err(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        assert!(
            e.contains("chat template") && e.contains("instructions"),
            "{e}"
        );
    }

    #[test]
    fn runaway_output_is_capped() {
        let e = render_err("{% for i in range(1000) %}{{ 'x' * 100000000 }}{% endfor %}");
        assert!(
            e.contains("chat template") && e.contains("rendered more than"),
            "{e}"
        );
    }

    #[test]
    fn deep_recursion_is_refused() {
        let e = render_err("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
        assert!(e.contains("cannot render the chat template"), "{e}");
    }

    #[test]
    fn raise_exception_blames_the_conversation() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "")
            .expect("compiles");
        let e = t.render(&[], true).expect_err("raises");
        assert_eq!(e.kind(), ErrorKind::Input);
        assert!(e.to_string().contains("roles must alternate"), "{e}");
    }

    #[test]
    fn a_normal_conversation_renders() -> Result<()> {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
            "<s>",
            "</s>",
        )?;
        let out = t.render(&[Message::user("hi"), Message::assistant("yo")], true)?;
        assert_eq!(out, "<s>user: hi\nassistant: yo\n");
        Ok(())
    }
}
