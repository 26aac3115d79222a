//! Strings from files (tensor names, JSON values, template text) made safe for one error line.
//!
//! A file can hold carriage returns, ANSI escapes or bidirectional overrides that would erase
//! or disguise the line they are printed in; [`escape_controls`] writes them as `\r`,
//! `\u{1b}`, … instead.

use std::borrow::Cow;

/// Characters that move the cursor, change the terminal's state or reorder text.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// `s` with its control and bidirectional-formatting characters escaped (`{:?}`-style); every
/// other character, non-ASCII text included, is kept.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn escapes_what_would_rewrite_the_line() {
        assert_eq!(
            escape_controls("a\r\u{1b}[2Kb\n\u{202e}é"),
            "a\\r\\u{1b}[2Kb\\n\\u{202e}é"
        );
        assert!(matches!(
            escape_controls("plain ✓"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
