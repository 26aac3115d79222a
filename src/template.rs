//! `tokenizer_config.json`'s chat template, rendered with limits: a template is code from the
//! model's repository, so it runs on a budget of minijinja instructions ("fuel"), a recursion
//! limit, a budget of memory for the values it makes ([`budget`]), and a cap on the text it
//! may produce. An exhausted limit is an error naming the template's file and the limit.

mod budget;

use crate::error::{Error, ErrorKind, Result};
use crate::escape::escape_controls;
use crate::json;
use minijinja::machinery::{make_string_output, CompiledTemplate, TemplateConfig, Vm};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

/// Instructions one rendering may execute: Llama 3's template uses ~40 per message, so this
/// renders conversations of tens of thousands of messages and stops a runaway loop in well
/// under a second.
pub const TEMPLATE_FUEL: u64 = 5_000_000;
/// Nesting of loops, conditions and macro calls (minijinja's own default is 500).
pub const TEMPLATE_RECURSION_LIMIT: usize = 100;
/// Rendered text beyond the messages' own: the template's markup around them.
pub const TEMPLATE_OUTPUT_OVERHEAD: usize = 1 << 20;
/// Memory one rendering may allocate for the values it makes, as a multiple of its output
/// cap: real templates copy each message a few times (`+` chains, `trim`, slices).
pub const TEMPLATE_MEMORY_FACTOR: u64 = 32;
/// Values a template makes may nest this deep.
pub use budget::MAX_NESTING as TEMPLATE_MAX_NESTING;

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

/// `tokenizer_config.json`'s `chat_template`, checked, with the special tokens it refers to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// Compiled again for each render: the guarded instructions borrow it.
    source: String,
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
        budget::install(&mut env);
        if let Err(e) = compile(source, |_| Ok(())) {
            return Err(Error::model(escape_controls(&format!(
                "invalid chat template ({origin}): {e}"
            ))));
        }
        Ok(Self {
            env,
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            origin,
        })
    }

    /// The conversation as the model's prompt text. At most [`TEMPLATE_FUEL`] instructions
    /// run; the text may be [`TEMPLATE_OUTPUT_OVERHEAD`] bytes longer than twice the
    /// messages' own (the output cap); and the strings, lists and maps the template makes,
    /// its output included, may take [`TEMPLATE_MEMORY_FACTOR`] times the output cap in
    /// all, each charged an upper bound of its size before it is made (see [`budget`]).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let content: usize = messages
            .iter()
            .map(|m| m.content.len().saturating_add(m.role.len()))
            .fold(0, usize::saturating_add);
        let root = minijinja::Value::from_serialize(minijinja::context! {
            messages => messages,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            add_generation_prompt => add_generation_prompt,
        });
        self.render_root(root, content)
    }

    /// Renders with `root` as the variables, for `content` bytes of messages.
    fn render_root(&self, root: minijinja::Value, content: usize) -> Result<String> {
        let cap = content
            .saturating_mul(2)
            .saturating_add(TEMPLATE_OUTPUT_OVERHEAD);
        let memory = (cap as u64).saturating_mul(TEMPLATE_MEMORY_FACTOR);
        let (rendered, exhausted) = budget::with_budget(memory, || {
            compile(&self.source, |guarded| {
                let mut text = String::new();
                Vm::new(&self.env).eval(
                    &guarded.instructions,
                    root,
                    &guarded.blocks,
                    &mut make_string_output(&mut text),
                    minijinja::AutoEscape::None,
                )?;
                Ok(text)
            })
        });
        let origin = &self.origin;
        match rendered {
            Ok(text) if text.len() <= cap => Ok(text),
            Ok(_) => Err(Error::model(format!(
                "{origin} rendered more than {cap} bytes (twice the messages plus {} KiB), a runaway template",
                TEMPLATE_OUTPUT_OVERHEAD >> 10
            ))),
            Err(_) if exhausted => Err(Error::model(format!(
                "{origin} needed more than {} MiB for its values ({TEMPLATE_MEMORY_FACTOR} times \
                 twice the messages plus {} KiB, or nested deeper than {TEMPLATE_MAX_NESTING}), \
                 a runaway template",
                memory >> 20,
                TEMPLATE_OUTPUT_OVERHEAD >> 10
            ))),
            Err(CompileError::Invalid(e)) => Err(Error::model(escape_controls(&format!(
                "invalid chat template ({origin}): {e}"
            )))),
            Err(CompileError::Render(e)) => Err(render_failure(origin, &e)),
        }
    }
}

/// Why [`compile`] failed.
enum CompileError {
    Invalid(String),
    Render(minijinja::Error),
}

impl From<minijinja::Error> for CompileError {
    fn from(e: minijinja::Error) -> Self {
        Self::Render(e)
    }
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(e) => f.write_str(e),
            Self::Render(e) => f.write_str(&one_line(e)),
        }
    }
}

/// Compiles `source` with the Jinja settings `transformers` uses (trim and lstrip blocks),
/// guards it (see [`budget`]) and hands it to `run`.
fn compile<R>(
    source: &str,
    run: impl FnOnce(&budget::Guarded) -> std::result::Result<R, minijinja::Error>,
) -> std::result::Result<R, CompileError> {
    let config = TemplateConfig {
        syntax_config: Default::default(),
        ws_config: minijinja::machinery::WhitespaceConfig {
            keep_trailing_newline: false,
            lstrip_blocks: true,
            trim_blocks: true,
        },
        default_auto_escape: Arc::new(|_| minijinja::AutoEscape::None),
    };
    let compiled = CompiledTemplate::new("chat", source, &config)
        .map_err(|e| CompileError::Invalid(one_line(&e)))?;
    let guarded = budget::Guarded::new(&compiled).map_err(CompileError::Invalid)?;
    Ok(run(&guarded)?)
}

/// The error of a render that failed otherwise than by exhausting the memory budget or
/// the output cap.
fn render_failure(origin: &str, e: &minijinja::Error) -> Error {
    match e {
        e if e.kind() == minijinja::ErrorKind::OutOfFuel => Error::model(format!(
            "{origin} ran more than {TEMPLATE_FUEL} instructions, a runaway template"
        )),
        // The template refuses the conversation (e.g. roles that do not alternate).
        e if std::error::Error::source(e).is_some_and(|s| s.is::<Raised>()) => {
            Error::new(ErrorKind::Input, render_error(origin, e))
        }
        e => Error::model(render_error(origin, e)),
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
        let e = render_err("{% for i in range(100) %}{{ 'x' * 100000 }}{% endfor %}");
        assert!(
            e.contains("chat template") && e.contains("rendered more than"),
            "{e}"
        );
    }

    /// Templates that grow values geometrically (or by large factors) without writing them:
    /// each must stop on the memory budget, before allocating.
    const AMPLIFIERS: &[&str] = &[
        // `~`, `+` and capture doubling (through a namespace: a loop body's `set` is local
        // to its iteration).
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set s %}{{ ns.s }}{{ ns.s }}{% endset %}\
         {% set ns.s = s %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set s %}{% filter upper %}{{ ns.s }}\
         {{ ns.s }}{% endfilter %}{% endset %}{% set ns.s = s %}{% endfor %}",
        // Without a loop: a chain of sets.
        "{% set a = 'xxxxxxxx' %}{% set a = a~a~a~a~a~a~a~a %}{% set a = a~a~a~a~a~a~a~a %}\
         {% set a = a~a~a~a~a~a~a~a %}{% set a = a~a~a~a~a~a~a~a %}{% set a = a~a~a~a~a~a~a~a %}\
         {% set a = a~a~a~a~a~a~a~a %}{% set a = a~a~a~a~a~a~a~a %}{% set a = a~a~a~a~a~a~a~a %}",
        // Lists: `+` and `*` (lazy in minijinja) doubling, then expanded by a filter.
        "{% set ns = namespace(l=['x']) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}\
         {{ ns.l|join }}",
        "{% set ns = namespace(l=['x']) %}{% for i in range(64) %}{% set ns.l = ns.l * 2 %}{% endfor %}\
         {{ ns.l|list|length }}",
        "{{ (['x'] * 1000000000000)|join }}",
        "{{ 'x' * 100000000 }}",
        // Nesting shares parts: `[l, l]`, maps, dict() and namespaces, then serialized.
        "{% set ns = namespace(l=['x']) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}\
         {{ ns.l|tojson }}",
        "{% set ns = namespace(l=['x']) %}{% for i in range(200) %}{% set ns.l = [ns.l] %}{% endfor %}\
         {{ ns.l }}",
        "{% set ns = namespace(d='x') %}{% for i in range(40) %}{% set ns.d = {'a': ns.d, 'b': ns.d} %}\
         {% endfor %}{{ ns.d|pprint }}",
        "{% set ns = namespace(d='x') %}{% for i in range(40) %}{% set ns.d = dict(a=ns.d, b=ns.d) %}\
         {% endfor %}{{ ns.d|string }}",
        "{% set ns = namespace(v='x') %}{% for i in range(40) %}{% set n = namespace() %}\
         {% set n.a = ns.v %}{% set n.b = ns.v %}{% set ns.v = n %}{% endfor %}{{ ns.v|tojson }}",
        // Filters that grow their input, by a factor or by an argument.
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s|replace('x', 'xx') %}\
         {% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s|replace('', ns.s) %}\
         {% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = '%s%s'|format(ns.s, ns.s) %}\
         {% endfor %}",
        "{% set ns = namespace(s='\"') %}{% for i in range(64) %}{% set ns.s = ns.s|tojson %}{% endfor %}",
        "{% set ns = namespace(s='\"') %}{% for i in range(64) %}{% set ns.s = ns.s|pprint %}{% endfor %}",
        "{% set ns = namespace(s='x\nx') %}{% for i in range(64) %}\
         {% set ns.s = (ns.s ~ '\n' ~ ns.s)|indent(2) %}{% endfor %}",
        "{% set ns = namespace(l=['<']) %}{% for i in range(64) %}\
         {% set ns.l = ns.l|map('escape')|list + ns.l %}{% endfor %}",
        "{{ 'a\nb'|indent(1000000000000) }}",
        "{{ '%1000000000000s'|format('x') }}",
        "{{ [1]|tojson(indent=1000000000000) }}",
        "{{ [1]|batch(1000000000000, 'x') }}",
        "{{ [1]|slice(1000000000000) }}",
        // Macros: doubled arguments and doubled output.
        "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% endif %}{% endmacro %}\
         {{ d('x' * 1000000, 16) }}",
        "{% macro d(n) %}{% if n %}{% set s = d(n - 1) %}{{ s }}{{ s }}{% else %}{{ 'x' * 10000000 }}\
         {% endif %}{% endmacro %}{{ d(8)|length }}",
    ];

    #[test]
    fn values_that_grow_run_out_of_memory_budget() {
        for source in AMPLIFIERS {
            let t = ChatTemplate::new(source, "<s>", "</s>").expect("compiles");
            let e = t
                .render(&[Message::user("hi")], true)
                .expect_err(source)
                .to_string();
            assert!(
                e.contains("the chat template needed more than")
                    && e.contains("a runaway template"),
                "{source}: {e}"
            );
        }
    }

    #[test]
    fn cyclic_namespaces_are_refused() {
        let e = render_err("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}");
        assert!(e.contains("needed more than"), "{e}");
    }

    /// The chat templates of public models, rendered by minijinja as it comes.
    fn plain_render(source: &str, root: &minijinja::Value) -> String {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.render_str(source, root)
            .expect("renders without limits")
    }

    const REAL_TEMPLATES: &[(&str, &str)] = &[
        (
            "llama-3",
            include_str!("../tests/fixtures/chat-templates/llama-3.jinja"),
        ),
        (
            "llama-3.1",
            include_str!("../tests/fixtures/chat-templates/llama-3.1.jinja"),
        ),
        (
            "qwen-2.5",
            include_str!("../tests/fixtures/chat-templates/qwen-2.5.jinja"),
        ),
        (
            "mistral",
            include_str!("../tests/fixtures/chat-templates/mistral-instruct.jinja"),
        ),
        (
            "gemma-2",
            include_str!("../tests/fixtures/chat-templates/gemma-2.jinja"),
        ),
        (
            "phi-3",
            include_str!("../tests/fixtures/chat-templates/phi-3.jinja"),
        ),
        (
            "deepseek-v3",
            include_str!("../tests/fixtures/chat-templates/deepseek-v3.jinja"),
        ),
        (
            "falcon-3",
            include_str!("../tests/fixtures/chat-templates/falcon-3.jinja"),
        ),
        (
            "bitnet-2b-4t",
            include_str!("../tests/fixtures/chat-templates/bitnet-b1.58-2b-4t.jinja"),
        ),
    ];

    /// `turns` alternating user/assistant messages of `size` bytes (varied text with markup
    /// characters), after a system message unless the template refuses one.
    fn conversation(name: &str, turns: usize, size: usize) -> Vec<Message> {
        let text = |i: usize| {
            let line = format!("turn {i}: <b>\"quoted\" & 'single'</b> ünïcödé \\ {{ braces }}\n");
            line.repeat(size / line.len() + 1)[..size].to_string()
        };
        let mut messages = vec![];
        if name != "gemma-2" {
            messages.push(Message::system(&text(0)));
        }
        for i in 0..turns {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(Message::new(role, &text(i + 1)));
        }
        messages
    }

    #[test]
    fn real_templates_render_as_without_limits() -> Result<()> {
        for &(name, source) in REAL_TEMPLATES {
            let t = ChatTemplate::new(source, "<s>", "</s>")?;
            // A short chat, and a long one: 201 messages of 4 KiB, 800 KiB in all.
            for (turns, size) in [(3, 40), (201, 4096)] {
                let messages = conversation(name, turns, size);
                let content: usize = messages
                    .iter()
                    .map(|m| m.content.len() + m.role.len())
                    .sum();
                let root = minijinja::Value::from_serialize(minijinja::context! {
                    messages => &messages,
                    bos_token => "<s>",
                    eos_token => "</s>",
                    add_generation_prompt => true,
                });
                let rendered = t.render_root(root.clone(), content)?;
                assert_eq!(rendered, plain_render(source, &root), "{name}");
                assert!(rendered.contains(&messages[1].content), "{name}");
            }
        }
        Ok(())
    }

    #[test]
    fn real_templates_with_tools_render_as_without_limits() -> Result<()> {
        let tool = serde_json::json!({
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The <current> weather & more",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        });
        let messages = serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "{\"temperature\": 21}"},
        ]);
        for &(name, source) in REAL_TEMPLATES {
            if !source.contains("tools") {
                continue;
            }
            let t = ChatTemplate::new(source, "<s>", "</s>")?;
            let root = minijinja::Value::from_serialize(minijinja::context! {
                messages => &messages,
                tools => [&tool, &tool],
                bos_token => "<s>",
                eos_token => "</s>",
                add_generation_prompt => true,
            });
            let rendered = t.render_root(root.clone(), 200)?;
            assert_eq!(rendered, plain_render(source, &root), "{name}");
            assert!(rendered.contains("get_weather"), "{name}");
        }
        Ok(())
    }

    #[test]
    fn the_fixture_template_renders() -> Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-bitnet/tokenizer_config.json");
        let t = ChatTemplate::from_tokenizer_config(&path)?.expect("has a template");
        let out = t.render(&[Message::user("hi"), Message::assistant("yo")], true)?;
        assert!(
            out.contains("User: hi") && out.ends_with("Assistant: "),
            "{out}"
        );
        Ok(())
    }

    #[test]
    fn includes_and_splats_do_not_escape_the_guards() {
        // The guarded template is not in the environment: it cannot include itself unguarded.
        let e = render_err("{% include 'chat' %}");
        assert!(e.contains("cannot render the chat template"), "{e}");
        let e = render_err(
            "{% set a = ['x'] %}{% for i in range(64) %}{% set a = dict(*a, *a) %}{% endfor %}",
        );
        assert!(
            e.contains("cannot render") || e.contains("needed more than"),
            "{e}"
        );
        let e = render_err("{{ debug() }}");
        assert!(e.contains("cannot render the chat template"), "{e}");
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
