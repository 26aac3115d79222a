//! A memory budget for rendering chat templates.
//!
//! minijinja's fuel counts instructions, but one instruction can double a value
//! (`{% set s = s ~ s %}`), so a few hundred instructions reach any size and the
//! process aborts on a failed allocation. Here every operation that makes a string,
//! list or map is charged, *before* it runs, an upper bound of the bytes the result
//! can take, counting shared parts once per reference (the "expanded" size; a nested
//! value is also refused past [`MAX_NESTING`] levels). The charges of one render add
//! up against its budget, and the charge that would pass it fails with
//! [`over_budget`] set instead of allocating.
//!
//! Charged: the operators `~ + *`, slices, list/map/keyword-argument literals,
//! attribute assignment, every built-in filter (through guarded replacements, so
//! filters that call filters, like `map`, are charged too), `dict()` and
//! `namespace()`, and every byte written to the output or to a capture (`{% set %}`
//! blocks, macro calls, `{% filter %}`), template text included. Since every value a
//! template creates was charged its expanded size, the size walks below, and the
//! walks inside minijinja (display, JSON, comparisons) never cover more than the
//! budget.

use minijinja::machinery::{CompiledTemplate, Instruction, Instructions};
use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use std::cell::Cell;
use std::collections::BTreeMap;

/// Values nested deeper than this are refused: minijinja formats, compares and drops
/// values recursively, so depth is stack.
pub const MAX_NESTING: u64 = 64;

/// Bytes charged per value besides its text: a `Value` is 24 bytes, plus its share of
/// the list or map holding it.
const PER_VALUE: u64 = 32;
/// Bound on the displayed text of anything but a string's bytes: numbers (an i128 is 40
/// digits), quotes, separators, `<macro name>`.
const SHOWN_PER_VALUE: u64 = 48;
/// Bound on how much escaping (HTML, JSON `\u003c`, Rust debug `\u{1b}`) grows a byte.
const ESCAPE_GROWTH: u64 = 6;
/// Bound on how much case mapping grows UTF-8 text ("ΐ" to "Ϊ́").
const CASE_GROWTH: u64 = 3;

thread_local! {
    /// Bytes left to the render running on this thread; `None` outside renders.
    static REMAINING: Cell<Option<u64>> = const { Cell::new(None) };
    static EXHAUSTED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `render` with `budget` bytes to spend; also says whether the budget ran out.
pub fn with_budget<R>(budget: u64, render: impl FnOnce() -> R) -> (R, bool) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            REMAINING.set(None);
        }
    }
    let _reset = Reset;
    REMAINING.set(Some(budget));
    EXHAUSTED.set(false);
    let rendered = render();
    (rendered, EXHAUSTED.get())
}

fn remaining() -> u64 {
    REMAINING.get().unwrap_or(0)
}

fn charge(bytes: u64) -> Result<(), Error> {
    match remaining().checked_sub(bytes) {
        Some(left) if REMAINING.get().is_some() => {
            REMAINING.set(Some(left));
            Ok(())
        }
        _ => {
            EXHAUSTED.set(true);
            REMAINING.set(Some(0));
            Err(Error::new(
                ErrorKind::InvalidOperation,
                "the template's memory budget is spent",
            ))
        }
    }
}

/// What a value holds, walked through shared parts as often as they are referenced.
#[derive(Clone, Copy, Default)]
struct Shape {
    text: u64,
    values: u64,
    depth: u64,
}

/// Walks `value` until its size passes `limit` (then returns `None`, as for values
/// nested deeper than [`MAX_NESTING`]), so a walk costs at most what it reports.
fn shape(value: &Value, limit: u64) -> Option<Shape> {
    let mut shape = Shape::default();
    // Open containers: the container, its keys or items still to visit, whether it is a map.
    let mut open = Vec::new();
    let mut next = Some(value.clone());
    loop {
        if let Some(v) = next.take() {
            shape.values += 1;
            shape.text = shape.text.saturating_add(own_text(&v));
            if shape
                .text
                .saturating_add(shape.values.saturating_mul(PER_VALUE))
                > limit
            {
                return None;
            }
            if matches!(
                v.kind(),
                ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
            ) {
                if let Ok(items) = v.try_iter() {
                    let is_map = v.kind() == ValueKind::Map;
                    open.push((v, items, is_map, None::<Value>));
                    shape.depth = shape.depth.max(open.len() as u64);
                    if shape.depth > MAX_NESTING {
                        return None;
                    }
                }
            }
        }
        let Some((container, items, is_map, pending_value)) = open.last_mut() else {
            return Some(shape);
        };
        if let Some(v) = pending_value.take() {
            next = Some(v);
            continue;
        }
        match items.next() {
            Some(item) => {
                if *is_map {
                    *pending_value = Some(container.get_item(&item).unwrap_or_default());
                }
                next = Some(item);
            }
            None => {
                open.pop();
            }
        }
    }
}

fn own_text(v: &Value) -> u64 {
    match v.kind() {
        ValueKind::String => v.as_str().map_or(0, str::len) as u64,
        ValueKind::Bytes => v.as_bytes().map_or(0, <[u8]>::len) as u64 * 4,
        _ => 0,
    }
}

/// Upper bound of the memory a copy of `value` takes, expanded; `u64::MAX` past the budget.
fn footprint(value: &Value) -> u64 {
    shape(value, remaining()).map_or(u64::MAX, |s| {
        s.text.saturating_add(s.values.saturating_mul(PER_VALUE))
    })
}

/// Upper bound of the length of `value` displayed (as `{{ value }}`, `~` or `join` show it).
fn shown(value: &Value) -> u64 {
    if let Some(s) = value.as_str() {
        return s.len() as u64;
    }
    shape(value, remaining()).map_or(u64::MAX, |s| {
        s.text
            .saturating_mul(ESCAPE_GROWTH)
            .saturating_add(s.values.saturating_mul(SHOWN_PER_VALUE))
    })
}

/// Upper bound of `value` serialized or pretty-printed with `indent` spaces per level.
fn serialized(value: &Value, indent: u64) -> u64 {
    shape(value, remaining()).map_or(u64::MAX, |s| {
        let per_value = s
            .depth
            .saturating_add(1)
            .saturating_mul(indent)
            .saturating_add(SHOWN_PER_VALUE);
        s.text
            .saturating_mul(ESCAPE_GROWTH)
            .saturating_add(s.values.saturating_mul(per_value))
    })
}

/// The largest number among `args` and keyword arguments (widths, counts, indents):
/// what a filter may repeat something by.
fn largest_number(args: &[Value]) -> u64 {
    let magnitude = |v: &Value| -> u64 {
        match v.kind() {
            ValueKind::Number => f64::try_from(v.clone()).map_or(u64::MAX, |f| {
                // `as` saturates, and maps NaN to 0.
                f.abs().ceil() as u64
            }),
            ValueKind::Bool => u64::from(v.is_true()),
            _ => 0,
        }
    };
    let mut largest = 0;
    for arg in args {
        largest = largest.max(magnitude(arg));
        if arg.is_kwargs() {
            if let Ok(keys) = arg.try_iter() {
                for key in keys {
                    largest = largest.max(magnitude(&arg.get_item(&key).unwrap_or_default()));
                }
            }
        }
    }
    largest
}

fn total(bounds: impl IntoIterator<Item = u64>) -> u64 {
    bounds.into_iter().fold(0, u64::saturating_add)
}

fn footprints(values: &[Value]) -> u64 {
    total(values.iter().map(footprint))
}

/// Upper bound of the bytes that built-in filter `name` allocates for its result.
fn filter_cost(name: &str, args: &[Value]) -> u64 {
    let value = args.first().cloned().unwrap_or_default();
    let rest = args.get(1..).unwrap_or_default();
    let text = || shown(&value);
    let items = || value.len().unwrap_or(0) as u64;
    // A list of copies of `value`'s parts, or of its characters.
    let rearranged = || {
        footprint(&value)
            .saturating_mul(2)
            .saturating_add(text().saturating_mul(PER_VALUE))
    };
    let cost = match name {
        "length" | "count" | "round" | "abs" | "int" | "float" | "bool" | "first" | "last"
        | "min" | "max" | "default" | "d" | "attr" | "sum" => 0,
        "safe" | "string" | "trim" => text(),
        "escape" | "e" => text().saturating_mul(ESCAPE_GROWTH),
        "lower" | "upper" | "title" | "capitalize" => text().saturating_mul(CASE_GROWTH),
        "replace" => {
            let from = rest.first().map_or(0, shown);
            let to = rest.get(1).map_or(0, shown);
            // An empty pattern matches between every two characters.
            let matches = text() / from.max(1) + 1;
            text().saturating_add(matches.saturating_mul(to))
        }
        "join" => {
            let separator = rest.first().map_or(0, shown);
            let mut joined = 0u64;
            if let Ok(iter) = value.try_iter() {
                for item in iter {
                    joined = total([joined, shown(&item), separator, PER_VALUE]);
                    if joined > remaining() {
                        break;
                    }
                }
            }
            joined
        }
        "indent" => {
            let lines = value
                .as_str()
                .map_or(1, |s| s.matches('\n').count() as u64 + 1);
            let width = largest_number(rest).max(4);
            text().saturating_add((lines + 1).saturating_mul(width.saturating_add(1)))
        }
        "format" => {
            // Each `%` may print the largest argument padded to the largest width.
            let specifiers = value.as_str().map_or(0, |s| s.matches('%').count() as u64);
            let widths = value
                .as_str()
                .map_or(0, largest_digit_run)
                .max(largest_number(rest));
            let widest = rest.iter().map(shown).max().unwrap_or(0);
            text().saturating_add(specifiers.saturating_mul(total([
                widest,
                widths,
                SHOWN_PER_VALUE,
            ])))
        }
        "tojson" => {
            // serde_json's text, then a copy with `<>&'` escaped.
            serialized(&value, largest_number(rest).max(2)).saturating_mul(2)
        }
        "pprint" => serialized(&value, 4),
        "split" | "lines" | "list" | "reverse" | "sort" | "unique" | "dictsort" | "items"
        | "select" | "reject" | "selectattr" | "rejectattr" | "groupby" => {
            rearranged().saturating_mul(if name == "groupby" { 2 } else { 1 })
        }
        "map" => {
            // Filters it applies charge for themselves; a `default=` fills every item.
            rearranged().saturating_add(items().saturating_mul(footprints(rest)))
        }
        "chain" | "zip" => footprints(args).saturating_mul(3),
        "batch" | "slice" => {
            // `count` lists, each padded with up to `count` copies of `fill_with`.
            let count = rest
                .first()
                .map_or(0, |c| largest_number(std::slice::from_ref(c)));
            let fill = rest.get(1).map_or(0, footprint);
            rearranged().saturating_add(count.saturating_mul(total([
                2 * PER_VALUE,
                fill,
                if name == "batch" { PER_VALUE } else { 0 },
            ])))
        }
        _ => u64::MAX,
    };
    cost.saturating_add(PER_VALUE)
}

/// The largest decimal number written in `s` (printf widths and precisions).
fn largest_digit_run(s: &str) -> u64 {
    s.split(|c: char| !c.is_ascii_digit())
        .map(|run| {
            run.parse::<u64>()
                .unwrap_or(if run.is_empty() { 0 } else { u64::MAX })
        })
        .max()
        .unwrap_or(0)
}

/// The built-in filters, each replaced by itself behind its charge.
macro_rules! guard_filters {
    ($env:ident: $($name:literal => $filter:path),* $(,)?) => {$(
        let builtin = Value::from_function($filter);
        $env.add_filter($name, move |state: &State, args: &[Value]| {
            charge(filter_cost($name, args))?;
            builtin.call(state, args)
        });
    )*};
}

/// Names of the guard functions the rewritten instructions call; not identifiers, so a
/// template can neither call nor shadow them.
const GUARD_CONCAT: &str = "budget:~";
const GUARD_ADD: &str = "budget:+";
const GUARD_MUL: &str = "budget:*";
const GUARD_COPY: &str = "budget:copy";
const GUARD_BUILD: &str = "budget:build";

/// Charges, then hands its arguments back (reversed, as `UnpackList` pushes them).
fn guard(cost: fn(&[Value]) -> u64) -> impl Fn(&[Value]) -> Result<Value, Error> {
    move |args| {
        charge(cost(args))?;
        Ok(Value::from(args.iter().rev().cloned().collect::<Vec<_>>()))
    }
}

/// Sets `env` up for budgeted renders: guarded filters and functions, the guards, and
/// a formatter that charges what it writes.
pub fn install(env: &mut Environment<'static>) {
    use minijinja::filters::*;
    guard_filters!(env:
        "safe" => safe, "escape" => escape, "e" => escape, "lower" => lower,
        "upper" => upper, "title" => title, "capitalize" => capitalize,
        "replace" => replace, "length" => length, "count" => length,
        "dictsort" => dictsort, "items" => items, "reverse" => reverse, "trim" => trim,
        "join" => join, "split" => split, "lines" => lines, "default" => default,
        "d" => default, "round" => round, "abs" => abs, "int" => int, "float" => float,
        "attr" => attr, "first" => first, "last" => last, "min" => min, "max" => max,
        "sort" => sort, "list" => list, "string" => string, "bool" => bool,
        "batch" => batch, "slice" => slice, "sum" => sum, "indent" => indent,
        "select" => select, "reject" => reject, "selectattr" => selectattr,
        "rejectattr" => rejectattr, "map" => map, "groupby" => groupby,
        "unique" => unique, "chain" => chain, "zip" => zip, "pprint" => pprint,
        "format" => format, "tojson" => tojson,
    );
    // Present only when some crate enables minijinja's `urlencode`; unguarded otherwise.
    env.remove_filter("urlencode");
    // `debug()` prints every variable, unguarded.
    env.remove_global("debug");
    for (name, builtin) in [
        ("dict", Value::from_function(minijinja::functions::dict)),
        (
            "namespace",
            Value::from_function(minijinja::functions::namespace),
        ),
    ] {
        env.add_function(name, move |state: &State, args: &[Value]| {
            charge(footprints(args).saturating_add(PER_VALUE))?;
            builtin.call(state, args)
        });
    }
    env.add_function(
        GUARD_CONCAT,
        guard(|args| total(args.iter().map(shown)).saturating_add(PER_VALUE)),
    );
    env.add_function(GUARD_ADD, guard(add_cost));
    env.add_function(GUARD_MUL, guard(mul_cost));
    env.add_function(
        GUARD_COPY,
        guard(|args| args.first().map_or(0, footprint).saturating_add(PER_VALUE)),
    );
    env.add_function(
        GUARD_BUILD,
        guard(|args| footprints(args).saturating_add(PER_VALUE)),
    );
    env.set_formatter(|out, state, value| {
        charge(shown(value))?;
        minijinja::escape_formatter(out, state, value)
    });
}

fn is_container(v: &Value) -> bool {
    matches!(
        v.kind(),
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Map
    )
}

fn add_cost(args: &[Value]) -> u64 {
    let cost = if args.iter().any(is_container) {
        footprints(args)
    } else if args.iter().all(|a| a.as_str().is_some()) {
        total(args.iter().map(shown))
    } else {
        0
    };
    cost.saturating_add(PER_VALUE)
}

fn mul_cost(args: &[Value]) -> u64 {
    let [a, b] = args else { return u64::MAX };
    let (repeated, times) = if b.kind() == ValueKind::Number {
        (a, b)
    } else {
        (b, a)
    };
    let each = if is_container(repeated) || repeated.as_str().is_some() {
        footprint(repeated)
    } else {
        0
    };
    let times = largest_number(std::slice::from_ref(times));
    each.saturating_mul(times).saturating_add(PER_VALUE)
}

/// A compiled template whose value-making instructions go through the guards
/// [`install`] defines, and whose template text goes through the charging formatter.
pub struct Guarded<'source> {
    pub instructions: Instructions<'source>,
    pub blocks: BTreeMap<&'source str, Instructions<'source>>,
}

impl<'source> Guarded<'source> {
    pub fn new(compiled: &CompiledTemplate<'source>) -> Result<Self, String> {
        Ok(Self {
            instructions: rewrite(&compiled.instructions)?,
            blocks: compiled
                .blocks
                .iter()
                .map(|(name, block)| Ok((*name, rewrite(block)?)))
                .collect::<Result<_, String>>()?,
        })
    }
}

/// The guard an instruction needs, with the number of stack values it checks.
fn guard_for(instruction: &Instruction) -> Result<Option<(&'static str, usize)>, String> {
    Ok(match instruction {
        Instruction::StringConcat => Some((GUARD_CONCAT, 2)),
        Instruction::Add => Some((GUARD_ADD, 2)),
        Instruction::Mul => Some((GUARD_MUL, 2)),
        // The sliced value is the lowest of the four.
        Instruction::Slice => Some((GUARD_COPY, 4)),
        // The assigned value is below the namespace.
        Instruction::SetAttr(_) => Some((GUARD_COPY, 2)),
        Instruction::BuildList(Some(n)) => Some((GUARD_BUILD, *n)),
        Instruction::BuildMap(n) | Instruction::BuildKwargs(n) => Some((GUARD_BUILD, 2 * n)),
        Instruction::MergeKwargs(n) | Instruction::UnpackLists(n) => Some((GUARD_BUILD, *n)),
        _ => None,
    }
    .filter(|&(_, n)| n > 0))
}

/// `instructions` with a guard call before each value-making instruction (the guard
/// takes its operands and `UnpackList` puts them back) and template text emitted as a
/// constant (so the formatter sees it); jump targets follow.
fn rewrite<'source>(instructions: &Instructions<'source>) -> Result<Instructions<'source>, String> {
    let old: Vec<&Instruction> = (0..instructions.len() as u32)
        .map(|pc| instructions.get(pc).expect("pc below len"))
        .collect();
    let mut new_pc = Vec::with_capacity(old.len() + 1);
    let mut pc = 0u32;
    for instruction in &old {
        new_pc.push(pc);
        pc += match (instruction, guard_for(instruction)?) {
            (Instruction::EmitRaw(_), _) => 2,
            (_, Some(_)) => 3,
            (_, None) => 1,
        };
    }
    new_pc.push(pc);
    let target = |t: &u32| new_pc[*t as usize];
    let mut out = Instructions::new(instructions.name(), instructions.source());
    for (old_pc, instruction) in old.iter().enumerate() {
        let span = instructions.get_span(old_pc as u32);
        let line = instructions.get_line(old_pc as u32);
        let mut add = |i: Instruction<'source>| match (span, line) {
            (Some(span), _) => out.add_with_span(i, span),
            (None, Some(line)) => out.add_with_line(i, line as u16),
            (None, None) => out.add(i),
        };
        if let Some((name, n)) = guard_for(instruction)? {
            let n16 = u16::try_from(n)
                .map_err(|_| format!("a literal or call with {n} items (at most 65535)"))?;
            add(Instruction::CallFunction(name, Some(n16)));
            add(Instruction::UnpackList(n));
        }
        if let Instruction::EmitRaw(text) = instruction {
            add(Instruction::LoadConst(Value::from_safe_string(
                text.to_string(),
            )));
        }
        add(match instruction {
            Instruction::EmitRaw(_) => Instruction::Emit,
            Instruction::Jump(t) => Instruction::Jump(target(t)),
            Instruction::JumpIfFalse(t) => Instruction::JumpIfFalse(target(t)),
            Instruction::JumpIfFalseOrPop(t) => Instruction::JumpIfFalseOrPop(target(t)),
            Instruction::JumpIfTrueOrPop(t) => Instruction::JumpIfTrueOrPop(target(t)),
            Instruction::Iterate(t) => Instruction::Iterate(target(t)),
            Instruction::BuildMacro(name, t, flags) => {
                Instruction::BuildMacro(name, target(t), *flags)
            }
            other => (*other).clone(),
        });
    }
    Ok(out)
}
