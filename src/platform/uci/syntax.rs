//! The uci file syntax, shared by every section schema, plus the value forms the schemas share
//! (booleans, Go-style durations).
//!
//! The file syntax follows libuci's `file.c` (`uci_parse_line`, `parse_str`, `parse_backslash`):
//!
//! ```text
//! # comment                      '#' outside quotes ends the line, even mid-word
//! package tinyscale              optional, before any section
//! config server 'main'           config <type> [<name>]   (no name: anonymous section)
//!     option listen_addr '0.0.0.0:8080'
//!     list ip_prefix "100.64.0.0/10"; list ip_prefix fd7a:115c:a1e0::/48
//! ```
//!
//! - Keywords may be abbreviated to their first letter (`c`, `o`, `l`, `p`), as libuci allows.
//! - A word is any mix of bare text, `'single'` (no escapes) and `"double"` quoted parts; a
//!   backslash escapes the next character in bare and double-quoted text (libuci does not decode
//!   `\n` and friends, so neither do we), and backslash-newline joins lines. Quoted text may span
//!   lines. `;` ends a statement. Extra arguments are an error (libuci's strict mode).
//! - Option and section names are `[A-Za-z0-9_]`; types are printable ASCII.
//!
//! [`parse`] keeps every statement with its line number, so later checks can say where a bad
//! value is; [`ConfigError`] carries the line and the uci path (`tinyscale.main.listen_addr`)
//! and maps to exit code 3.
//!
//! Pure: the caller reads the file and passes its text.
#![forbid(unsafe_code)]

use std::time::Duration;

use super::PACKAGE;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// An invalid config file. `Display` names the line and, for option errors, the uci path, e.g.
/// `line 7: tinyscale.main.listen_addr: invalid socket address "foo"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid uci syntax.
    #[error("line {line}: {reason}")]
    Syntax {
        /// 1-based line of the offending statement.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// An option this section does not know.
    #[error("line {line}: {option}: unknown option")]
    UnknownOption {
        /// 1-based line.
        line: usize,
        /// Full uci path, e.g. `tinyscale.main.foo`.
        option: String,
    },
    /// A single-valued option given twice.
    #[error("line {line}: {option}: set more than once (first on line {first})")]
    Repeated {
        /// 1-based line of the second occurrence.
        line: usize,
        /// Full uci path.
        option: String,
        /// 1-based line of the first occurrence.
        first: usize,
    },
    /// A list option written with `option`.
    #[error("line {line}: {option}: is a list; write `list {name} '...'`")]
    ExpectedList {
        /// 1-based line.
        line: usize,
        /// Full uci path.
        option: String,
        /// Bare option name.
        name: String,
    },
    /// A single-valued option written with `list`.
    #[error("line {line}: {option}: takes one value; write `option {name} '...'`")]
    ExpectedOption {
        /// 1-based line.
        line: usize,
        /// Full uci path.
        option: String,
        /// Bare option name.
        name: String,
    },
    /// A value that does not parse or fails validation.
    #[error("line {line}: {option}: {message}")]
    Invalid {
        /// 1-based line.
        line: usize,
        /// Full uci path.
        option: String,
        /// Why, including the offending value.
        message: String,
    },
    /// A section-level problem, e.g. a `config server` section not named `main`.
    #[error("line {line}: {section}: {message}")]
    Section {
        /// 1-based line of the `config` statement.
        line: usize,
        /// uci path of the section, e.g. `tinyscale.@server[0]`.
        section: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// Process exit code for an invalid config (STYLE §5: 3).
    pub fn exit_code(&self) -> u8 {
        3
    }

    /// The 1-based line the error refers to.
    pub fn line(&self) -> usize {
        match self {
            ConfigError::Syntax { line, .. }
            | ConfigError::UnknownOption { line, .. }
            | ConfigError::Repeated { line, .. }
            | ConfigError::ExpectedList { line, .. }
            | ConfigError::ExpectedOption { line, .. }
            | ConfigError::Invalid { line, .. }
            | ConfigError::Section { line, .. } => *line,
        }
    }

    /// The full uci path of the offending option, if the error is about one option.
    pub fn option(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownOption { option, .. }
            | ConfigError::Repeated { option, .. }
            | ConfigError::ExpectedList { option, .. }
            | ConfigError::ExpectedOption { option, .. }
            | ConfigError::Invalid { option, .. } => Some(option),
            ConfigError::Syntax { .. } | ConfigError::Section { .. } => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// uci file syntax
// ---------------------------------------------------------------------------------------------

/// One `option` or `list` statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UciOption {
    /// Option name (`[A-Za-z0-9_]+`).
    pub name: String,
    /// Unquoted value; empty when the statement had no value.
    pub value: String,
    /// Written with `list` rather than `option`.
    pub list: bool,
    /// 1-based line where the statement starts.
    pub line: usize,
}

/// One `config <type> [<name>]` block with its statements in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UciSection {
    /// Section type, e.g. `server`.
    pub kind: String,
    /// Section name; `None` for an anonymous section.
    pub name: Option<String>,
    /// 1-based line of the `config` statement.
    pub line: usize,
    /// `option`/`list` statements, in order. Repeats are kept, not merged.
    pub options: Vec<UciOption>,
}

/// A parsed uci file: statements as written, nothing merged or validated beyond syntax.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UciFile {
    /// Name from a `package` statement, if any.
    pub package: Option<String>,
    /// Sections in file order. Two sections with the same name are both kept; uci merges them.
    pub sections: Vec<UciSection>,
}

impl UciFile {
    /// The uci path of section `index` as `uci show` prints it: `tinyscale.main` for a named
    /// section, `tinyscale.@server[0]` for the first anonymous-or-not section of type `server`.
    pub fn section_path(&self, index: usize) -> String {
        let Some(s) = self.sections.get(index) else {
            return format!("{PACKAGE}.?");
        };
        match &s.name {
            Some(n) => format!("{PACKAGE}.{n}"),
            None => {
                let nth = self.sections[..index].iter().filter(|o| o.kind == s.kind).count();
                format!("{PACKAGE}.@{}[{nth}]", s.kind)
            }
        }
    }
}

/// Parses uci text into statements. Errors carry the line of the offending statement.
pub fn parse(text: &str) -> Result<UciFile, ConfigError> {
    let mut lx = Lexer {
        b: text.as_bytes(),
        pos: 0,
        line: 1,
    };
    let mut file = UciFile::default();
    loop {
        lx.skip_inline_space();
        match lx.peek() {
            None => break,
            Some(b'\n') => {
                lx.newline();
                continue;
            }
            _ => {}
        }
        let line = lx.line;
        let args = lx.statement()?;
        let Some(keyword) = args.first() else {
            continue; // blank statement: a comment, a lone `;` or a continuation
        };
        let syntax = |reason| ConfigError::Syntax { line, reason };
        match keyword.as_str() {
            "package" | "p" => {
                if args.len() != 2 {
                    return Err(syntax(if args.len() < 2 {
                        "package without name"
                    } else {
                        "too many arguments"
                    }));
                }
                if !valid_name(&args[1], true) {
                    return Err(syntax("invalid character in package name"));
                }
                if file.package.is_some() || !file.sections.is_empty() {
                    return Err(syntax("`package` must come once, before any section"));
                }
                file.package = Some(args[1].clone());
            }
            "config" | "c" => {
                if args.len() < 2 {
                    return Err(syntax("config without type"));
                }
                if args.len() > 3 {
                    return Err(syntax("too many arguments"));
                }
                if !valid_type(&args[1]) {
                    return Err(syntax("invalid character in type field"));
                }
                let name = match args.get(2) {
                    Some(n) if !n.is_empty() => {
                        if !valid_name(n, false) {
                            return Err(syntax("invalid character in name field"));
                        }
                        Some(n.clone())
                    }
                    _ => None,
                };
                // libuci (strict mode) refuses to merge sections of different types.
                if let Some(n) = &name {
                    if file
                        .sections
                        .iter()
                        .any(|s| s.name.as_ref() == Some(n) && s.kind != args[1])
                    {
                        return Err(syntax(
                            "section of different type overwrites prior section with same name",
                        ));
                    }
                }
                file.sections.push(UciSection {
                    kind: args[1].clone(),
                    name,
                    line,
                    options: Vec::new(),
                });
            }
            "option" | "o" | "list" | "l" => {
                let list = keyword.starts_with('l');
                let Some(section) = file.sections.last_mut() else {
                    return Err(syntax("option/list command found before the first section"));
                };
                if args.len() < 2 {
                    return Err(syntax("option without name"));
                }
                if args.len() > 3 {
                    return Err(syntax("too many arguments"));
                }
                if !valid_name(&args[1], false) {
                    return Err(syntax("invalid character in name field"));
                }
                section.options.push(UciOption {
                    name: args[1].clone(),
                    value: args.get(2).cloned().unwrap_or_default(),
                    list,
                    line,
                });
            }
            _ => return Err(syntax("invalid command")),
        }
    }
    Ok(file)
}

/// Quotes `value` the way `uci export` does: single quotes, each `'` written as `'\''`.
/// [`parse`] reads the result back as `value`.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// libuci `uci_validate_str(name = true)`: `[A-Za-z0-9_]+`, plus `-` for package names.
pub(super) fn valid_name(s: &str, package: bool) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || (package && c == b'-'))
}

/// libuci `uci_validate_type`: non-empty printable ASCII without spaces.
pub(super) fn valid_type(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| (33..=126).contains(&c))
}

/// Byte cursor over the file text. Only ASCII bytes are interpreted; other bytes are copied,
/// so UTF-8 sequences pass through intact.
pub(super) struct Lexer<'a> {
    pub(super) b: &'a [u8],
    pub(super) pos: usize,
    pub(super) line: usize,
}

impl Lexer<'_> {
    pub(super) fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn peek_at(&self, off: usize) -> Option<u8> {
        self.b.get(self.pos + off).copied()
    }

    pub(super) fn newline(&mut self) {
        self.pos += 1;
        self.line += 1;
    }

    /// C `isspace` minus the newline, which ends statements.
    fn is_inline_space(c: u8) -> bool {
        matches!(c, b' ' | b'\t' | b'\r' | 0x0b | 0x0c)
    }

    pub(super) fn skip_inline_space(&mut self) {
        while self.peek().is_some_and(Self::is_inline_space) {
            self.pos += 1;
        }
    }

    /// With the cursor on a backslash: if it ends the line (`\` + LF, `\` + CRLF or `\` + EOF),
    /// consumes it and the line break and returns true (libuci `parse_backslash` fetching the
    /// next line). Otherwise consumes only the backslash and returns false.
    fn backslash(&mut self) -> bool {
        self.pos += 1;
        match (self.peek(), self.peek_at(1)) {
            (None, _) => true,
            (Some(b'\n'), _) => {
                self.newline();
                true
            }
            (Some(b'\r'), Some(b'\n')) => {
                self.pos += 1;
                self.newline();
                true
            }
            _ => false,
        }
    }

    fn skip_to_eol(&mut self) {
        while self.peek().is_some_and(|c| c != b'\n') {
            self.pos += 1;
        }
    }

    /// Reads the words of one statement, up to (not including) the newline, or through `;`.
    pub(super) fn statement(&mut self) -> Result<Vec<String>, ConfigError> {
        let mut args = Vec::new();
        loop {
            self.skip_inline_space();
            match self.peek() {
                None | Some(b'\n') => break,
                Some(b'#') => {
                    self.skip_to_eol();
                    break;
                }
                Some(b';') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\')
                    if matches!(self.peek_at(1), None | Some(b'\n'))
                        || (self.peek_at(1) == Some(b'\r') && self.peek_at(2) == Some(b'\n')) =>
                {
                    // Continuation between words: acts as whitespace.
                    self.backslash();
                }
                Some(_) => args.push(self.word()?),
            }
        }
        Ok(args)
    }

    /// Reads one word (libuci `parse_str`): bare and quoted parts up to whitespace, `;` or `#`.
    fn word(&mut self) -> Result<String, ConfigError> {
        let mut out: Vec<u8> = Vec::new();
        while let Some(c) = self.peek() {
            match c {
                b'\n' | b'#' | b';' => break,
                c if Self::is_inline_space(c) => break,
                b'\'' => {
                    let start = self.line;
                    self.pos += 1;
                    loop {
                        match self.peek() {
                            None => {
                                return Err(ConfigError::Syntax {
                                    line: start,
                                    reason: "EOF with unterminated '",
                                })
                            }
                            Some(b'\'') => {
                                self.pos += 1;
                                break;
                            }
                            Some(b'\n') => {
                                out.push(b'\n');
                                self.newline();
                            }
                            Some(c) => {
                                out.push(c);
                                self.pos += 1;
                            }
                        }
                    }
                }
                b'"' => {
                    let start = self.line;
                    self.pos += 1;
                    loop {
                        match self.peek() {
                            None => {
                                return Err(ConfigError::Syntax {
                                    line: start,
                                    reason: "EOF with unterminated \"",
                                })
                            }
                            Some(b'"') => {
                                self.pos += 1;
                                break;
                            }
                            Some(b'\\') => {
                                if !self.backslash() {
                                    if let Some(c) = self.peek() {
                                        out.push(c);
                                        self.pos += 1;
                                    }
                                }
                            }
                            Some(b'\n') => {
                                out.push(b'\n');
                                self.newline();
                            }
                            Some(c) => {
                                out.push(c);
                                self.pos += 1;
                            }
                        }
                    }
                }
                b'\\' => {
                    if !self.backslash() {
                        if let Some(c) = self.peek() {
                            // The escaped byte is literal, even a space, quote, `#` or `;`.
                            out.push(c);
                            self.pos += 1;
                        }
                    }
                }
                c => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        // Only whole ASCII bytes were dropped, so this is valid UTF-8; stay total anyway.
        Ok(String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }
}

/// Parses a uci boolean as OpenWrt's `config_get_bool` does:
/// `1 yes on true enabled` and `0 no off false disabled`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "yes" | "on" | "true" | "enabled" => Some(true),
        "0" | "no" | "off" | "false" | "disabled" => Some(false),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------------------------

/// Why a duration text failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Empty text.
    #[error("empty duration")]
    Empty,
    /// A leading `-`: durations here are never negative.
    #[error("negative duration")]
    Negative,
    /// A number without a unit, e.g. `30` (only `0` may omit it).
    #[error("missing unit in duration (use ns, us, ms, s, m or h, e.g. 30s, 5m, 24h)")]
    MissingUnit,
    /// A unit other than ns, us, µs, ms, s, m, h.
    #[error("unknown unit in duration (use ns, us, ms, s, m or h)")]
    UnknownUnit,
    /// Not of the form `1h30m`, `1.5h`, `500ms`.
    #[error("invalid duration")]
    Invalid,
    /// Longer than Go's limit of 2^63-1 ns (about 292 years).
    #[error("duration too long")]
    Overflow,
}

/// Go's `time.Duration` limit, in nanoseconds.
const MAX_DURATION_NANOS: u128 = i64::MAX as u128;

/// Parses a Go `time.ParseDuration` string: a sequence of decimal numbers, each with an optional
/// fraction and a unit (`ns`, `us`/`µs`/`μs`, `ms`, `s`, `m`, `h`), e.g. `30m`, `1h30m`, `1.5h`,
/// `500ms`; `0` alone needs no unit. A leading `+` is accepted; negatives are refused. Used by
/// uci options and CLI flags such as `--expiration 24h`.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.starts_with('-') {
        return Err(DurationError::Negative);
    }
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let b = s.as_bytes();
    let mut i = 0;
    let mut total: u128 = 0;
    while i < b.len() {
        // Integer part.
        let int_start = i;
        let mut int: u128 = 0;
        while i < b.len() && b[i].is_ascii_digit() {
            int = int
                .checked_mul(10)
                .and_then(|v| v.checked_add(u128::from(b[i] - b'0')))
                .filter(|v| *v <= MAX_DURATION_NANOS)
                .ok_or(DurationError::Overflow)?;
            i += 1;
        }
        let has_int = i > int_start;
        // Fraction part; digits past 18 cannot matter at nanosecond resolution and are dropped.
        let mut frac: u128 = 0;
        let mut scale: u128 = 1;
        let mut has_frac = false;
        if i < b.len() && b[i] == b'.' {
            i += 1;
            let frac_start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                if scale < 1_000_000_000_000_000_000 {
                    frac = frac * 10 + u128::from(b[i] - b'0');
                    scale *= 10;
                }
                i += 1;
            }
            has_frac = i > frac_start;
        }
        if !has_int && !has_frac {
            return Err(DurationError::Invalid);
        }
        // Unit: everything up to the next digit or dot.
        let unit_start = i;
        while i < b.len() && !b[i].is_ascii_digit() && b[i] != b'.' {
            i += 1;
        }
        let unit_nanos: u128 = match &s[unit_start..i] {
            "" => return Err(DurationError::MissingUnit),
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(DurationError::UnknownUnit),
        };
        let part = int
            .checked_mul(unit_nanos)
            .and_then(|v| v.checked_add(frac * unit_nanos / scale))
            .ok_or(DurationError::Overflow)?;
        total = total
            .checked_add(part)
            .filter(|v| *v <= MAX_DURATION_NANOS)
            .ok_or(DurationError::Overflow)?;
    }
    // total <= i64::MAX ns, so the seconds fit in u64 and the remainder in u32.
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| DurationError::Overflow)?;
    let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| DurationError::Overflow)?;
    Ok(Duration::new(secs, nanos))
}

/// Formats `d` like Go's `Duration.String`: `1h30m0s`, `1m5s`, `1.5s`, `500ms`, `0s`.
/// [`parse_duration`] reads the result back exactly (up to Go's 292-year limit).
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    if nanos < 1_000_000_000 {
        let (unit, div) = if nanos < 1_000 {
            ("ns", 1)
        } else if nanos < 1_000_000 {
            ("\u{b5}s", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{unit}", decimal(nanos, div));
    }
    let secs_total = nanos / 1_000_000_000;
    let (h, m) = (secs_total / 3600, (secs_total / 60) % 60);
    let secs = decimal(nanos % 60_000_000_000, 1_000_000_000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&secs);
    out.push('s');
    out
}

/// `n / div` as a decimal with trailing fractional zeros trimmed.
fn decimal(n: u128, div: u128) -> String {
    let (int, rem) = (n / div, n % div);
    if rem == 0 {
        return int.to_string();
    }
    let width = div.to_string().len() - 1;
    let frac = format!("{rem:0width$}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

/// Text made of uci keywords, quotes, separators and short words, for "never panics" tests of
/// the parser and of each section schema.
#[cfg(test)]
pub(crate) fn uci_shaped_text() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    proptest::collection::vec(
        prop_oneof![
            Just("config ".to_owned()),
            Just("server ".to_owned()),
            Just("'main'".to_owned()),
            Just("option ".to_owned()),
            Just("list ".to_owned()),
            Just("package ".to_owned()),
            Just("ip_prefix ".to_owned()),
            Just("listen_addr ".to_owned()),
            Just("base_domain ".to_owned()),
            Just("'".to_owned()),
            Just("\"".to_owned()),
            Just("\\".to_owned()),
            Just("\n".to_owned()),
            Just("\r\n".to_owned()),
            Just("#".to_owned()),
            Just(";".to_owned()),
            Just(" ".to_owned()),
            "[a-z0-9:./_-]{0,6}".prop_map(|s| s),
            any::<char>().prop_map(|c| c.to_string()),
        ],
        0..40,
    )
    .prop_map(|v| v.concat())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn opt(name: &str, value: &str, list: bool, line: usize) -> UciOption {
        UciOption {
            name: name.into(),
            value: value.into(),
            list,
            line,
        }
    }

    #[test]
    fn parses_all_syntaxes() {
        let text = "# leading comment\n\
                    package tinyscale\n\
                    \n\
                    config server 'main'\n\
                    \toption a 'single quoted'\n\
                    \toption b \"double \\\"quoted\\\" \\\\ \\$\"\n\
                    \toption c bare\n\
                    \toption d bare\\ with\\ space\n\
                    \toption e 'it'\\''s'\n\
                    \toption f mix'ed'\"parts\"\n\
                    \toption g value # trailing comment\n\
                    \toption h ''\n\
                    \toption i\n\
                    \tlist j one; list j 'two'\n\
                    \toption k 'multi\n\
                    line'\n\
                    \toption l \"joined \\\n\
                    here\"\n\
                    \toption m word#comment\n\
                    config client\n\
                    c other named\n\
                    o n 'x'\n";
        let f = parse(text).unwrap();
        assert_eq!(f.package.as_deref(), Some("tinyscale"));
        assert_eq!(f.sections.len(), 3);
        let s = &f.sections[0];
        assert_eq!(
            (s.kind.as_str(), s.name.as_deref(), s.line),
            ("server", Some("main"), 4)
        );
        let got: Vec<(&str, &str, bool, usize)> = s
            .options
            .iter()
            .map(|o| (o.name.as_str(), o.value.as_str(), o.list, o.line))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", "single quoted", false, 5),
                ("b", "double \"quoted\" \\ $", false, 6),
                ("c", "bare", false, 7),
                ("d", "bare with space", false, 8),
                ("e", "it's", false, 9),
                ("f", "mixedparts", false, 10),
                ("g", "value", false, 11),
                ("h", "", false, 12),
                ("i", "", false, 13),
                ("j", "one", true, 14),
                ("j", "two", true, 14),
                ("k", "multi\nline", false, 15),
                ("l", "joined here", false, 17),
                ("m", "word", false, 19),
            ]
        );
        assert_eq!(f.sections[1].kind, "client");
        assert_eq!(f.sections[1].name, None);
        assert_eq!(f.sections[1].line, 20);
        assert_eq!(f.sections[2].name.as_deref(), Some("named"));
        assert_eq!(f.sections[2].options, vec![opt("n", "x", false, 22)]);
        assert_eq!(f.section_path(0), "tinyscale.main");
        assert_eq!(f.section_path(1), "tinyscale.@client[0]");
    }

    #[test]
    fn crlf_and_continuation_between_words() {
        let f = parse("config server 'main'\r\n\toption a \\\r\n 'b'\r\n\toption c d\r\n").unwrap();
        let o = &f.sections[0].options;
        assert_eq!(o[0], opt("a", "b", false, 2));
        assert_eq!(o[1], opt("c", "d", false, 4));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("\n\noption a b\n", 3, "before the first section"),
            ("config x\n\tfoo a b\n", 2, "invalid command"),
            ("config x\n\toption a 'b\n", 2, "unterminated '"),
            ("config x\n\toption a \"b\n\n", 2, "unterminated \""),
            ("config x\n\toption a b c\n", 2, "too many arguments"),
            ("config\n", 1, "config without type"),
            ("config x\noption\n", 2, "option without name"),
            ("config x\noption a-b c\n", 2, "invalid character in name field"),
            ("config x 'a b'\n", 1, "invalid character in name field"),
            ("config x y\nconfig z y\n", 2, "different type"),
            ("config x\npackage p\n", 2, "`package` must come once"),
        ];
        for (text, line, reason) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line(), *line, "{text:?}: {e}");
            assert!(e.to_string().contains(reason), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("line {line}: ")));
            assert_eq!(e.exit_code(), 3);
        }
    }

    #[test]
    fn quote_roundtrip() {
        for v in ["", "plain", "it's", "''", "a\nb", "#;\\\"", " spaced "] {
            let f = parse(&format!("config t\noption o {}\n", quote(v))).unwrap();
            assert_eq!(f.sections[0].options[0].value, v);
        }
    }

    #[test]
    fn durations() {
        let ok: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("30m", Duration::from_secs(1800)),
            ("24h", Duration::from_secs(86400)),
            ("1h30m", Duration::from_secs(5400)),
            ("90s", Duration::from_secs(90)),
            ("500ms", Duration::from_millis(500)),
            ("1.5h", Duration::from_secs(5400)),
            (".5s", Duration::from_millis(500)),
            ("1.s", Duration::from_secs(1)),
            ("+5s", Duration::from_secs(5)),
            ("1us", Duration::from_micros(1)),
            ("1µs", Duration::from_micros(1)),
            ("1μs", Duration::from_micros(1)),
            ("7ns", Duration::from_nanos(7)),
            ("1h1m1s1ms", Duration::from_millis(3_661_001)),
            ("2562047h47m16.854775807s", Duration::new(9_223_372_036, 854_775_807)),
        ];
        for (s, d) in ok {
            assert_eq!(parse_duration(s), Ok(*d), "{s}");
        }
        let bad: &[(&str, DurationError)] = &[
            ("", DurationError::Empty),
            ("-5s", DurationError::Negative),
            ("30", DurationError::MissingUnit),
            ("1h30", DurationError::MissingUnit),
            ("5d", DurationError::UnknownUnit),
            ("5 s", DurationError::UnknownUnit),
            ("h", DurationError::Invalid),
            (".s", DurationError::Invalid),
            ("2562047h47m16.854775808s", DurationError::Overflow),
            ("99999999999999999999999h", DurationError::Overflow),
        ];
        for (s, e) in bad {
            assert_eq!(parse_duration(s), Err(*e), "{s}");
        }
    }

    #[test]
    fn format_durations_like_go() {
        let cases: &[(Duration, &str)] = &[
            (Duration::ZERO, "0s"),
            (Duration::from_secs(65), "1m5s"),
            (Duration::from_secs(5400), "1h30m0s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_micros(3), "3µs"),
            (Duration::from_nanos(1_500), "1.5µs"),
            (Duration::from_nanos(12), "12ns"),
        ];
        for (d, s) in cases {
            assert_eq!(format_duration(*d), *s);
        }
    }

    #[test]
    fn bools() {
        for (s, b) in [
            ("1", true),
            ("yes", true),
            ("on", true),
            ("true", true),
            ("enabled", true),
            ("0", false),
            ("no", false),
            ("off", false),
            ("false", false),
            ("disabled", false),
        ] {
            assert_eq!(parse_bool(s), Some(b));
        }
        assert_eq!(parse_bool("maybe"), None);
        assert_eq!(parse_bool("TRUE"), None);
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in any::<String>()) {
            let _ = parse(&s);
            let _ = parse_duration(&s);
        }

        #[test]
        fn uci_shaped_text_never_panics(s in uci_shaped_text()) {
            if let Err(e) = parse(&s) {
                // Error lines always point into the text.
                prop_assert!(e.line() >= 1 && e.line() <= s.matches('\n').count() + 1);
            }
        }

        #[test]
        fn exported_values_roundtrip(vals in proptest::collection::vec(any::<String>(), 1..5)) {
            let mut text = String::from("config t 'n'\n");
            for v in &vals {
                text.push_str(&format!("\tlist v {}\n", quote(v)));
            }
            let f = parse(&text).unwrap();
            let got: Vec<&str> = f.sections[0].options.iter().map(|o| o.value.as_str()).collect();
            prop_assert_eq!(got, vals.iter().map(String::as_str).collect::<Vec<_>>());
        }

        #[test]
        fn duration_format_roundtrip(n in 0u64..=(i64::MAX as u64)) {
            let d = Duration::from_nanos(n);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
