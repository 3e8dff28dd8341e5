//! OpenWrt uci configuration: the file syntax, Go-style durations, and the typed coordinator
//! config built from `config server 'main'` in `/etc/config/tinyscale`.
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
//! value is. [`ServerConfig`] flattens headscale's `config-example.yaml` into uci options
//! (`dns.base_domain` becomes `base_domain`, `derp.server.region_id` becomes
//! `derp_server_region_id`, and so on) and validates them as headscale's
//! `hscontrol/types/config.go` does. Every error carries the line and the uci path
//! (`tinyscale.main.listen_addr`) and maps to exit code 3.
//!
//! The client daemon's `config client` section has its own schema in [`client`].
//!
//! Pure: the caller reads the file and passes its text.
#![forbid(unsafe_code)]

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

/// The uci package (file name under `/etc/config`) that holds tinyscale's settings.
pub const PACKAGE: &str = "tinyscale";

/// Default path of the config file; `--config` overrides it.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/config/tinyscale";

pub mod batch;
pub mod client;
pub mod dnsmasq;

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
fn valid_name(s: &str, package: bool) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || (package && c == b'-'))
}

/// libuci `uci_validate_type`: non-empty printable ASCII without spaces.
fn valid_type(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| (33..=126).contains(&c))
}

/// Byte cursor over the file text. Only ASCII bytes are interpreted; other bytes are copied,
/// so UTF-8 sequences pass through intact.
struct Lexer<'a> {
    b: &'a [u8],
    pos: usize,
    line: usize,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn peek_at(&self, off: usize) -> Option<u8> {
        self.b.get(self.pos + off).copied()
    }

    fn newline(&mut self) {
        self.pos += 1;
        self.line += 1;
    }

    /// C `isspace` minus the newline, which ends statements.
    fn is_inline_space(c: u8) -> bool {
        matches!(c, b' ' | b'\t' | b'\r' | 0x0b | 0x0c)
    }

    fn skip_inline_space(&mut self) {
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
    fn statement(&mut self) -> Result<Vec<String>, ConfigError> {
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

// ---------------------------------------------------------------------------------------------
// IP prefixes
// ---------------------------------------------------------------------------------------------

/// Why an IP prefix text failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// Not `address/length`.
    #[error("not in address/length form")]
    Syntax,
    /// The length is longer than the address.
    #[error("prefix length out of range")]
    Length,
    /// Bits after the prefix length are set, e.g. `100.64.0.1/10`.
    #[error("address has bits set beyond the prefix length")]
    HostBits,
}

macro_rules! ip_net {
    ($name:ident, $addr:ty, $bits:ty, $width:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name {
            addr: $addr,
            len: u8,
        }

        impl $name {
            /// The prefix `addr/len`; `None` if `len` is too long or `addr` has host bits set.
            pub const fn new(addr: $addr, len: u8) -> Option<Self> {
                if len > $width {
                    return None;
                }
                let bits = <$bits>::from_be_bytes(addr.octets());
                if bits & !Self::mask_bits(len) != 0 {
                    return None;
                }
                Some(Self { addr, len })
            }

            const fn mask_bits(len: u8) -> $bits {
                if len == 0 {
                    0
                } else {
                    <$bits>::MAX << ($width - len as u32)
                }
            }

            /// The network address (host bits are always zero).
            pub const fn addr(&self) -> $addr {
                self.addr
            }

            /// The prefix length in bits.
            pub const fn prefix_len(&self) -> u8 {
                self.len
            }

            /// The netmask as an integer, e.g. `0xffc0_0000` for a /10.
            pub const fn mask(&self) -> $bits {
                Self::mask_bits(self.len)
            }

            /// True if `ip` lies inside the prefix.
            pub fn contains(&self, ip: $addr) -> bool {
                <$bits>::from_be_bytes(ip.octets()) & self.mask() == <$bits>::from_be_bytes(self.addr.octets())
            }

            /// True if every address of `other` lies inside `self`.
            pub fn contains_net(&self, other: &Self) -> bool {
                other.len >= self.len && self.contains(other.addr)
            }
        }

        impl FromStr for $name {
            type Err = PrefixError;

            fn from_str(s: &str) -> Result<Self, PrefixError> {
                let (a, l) = s.split_once('/').ok_or(PrefixError::Syntax)?;
                let addr: $addr = a.parse().map_err(|_| PrefixError::Syntax)?;
                if l.is_empty() || l.len() > 3 || !l.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(PrefixError::Syntax);
                }
                let len: u8 = l.parse().map_err(|_| PrefixError::Length)?;
                if len > $width {
                    return Err(PrefixError::Length);
                }
                Self::new(addr, len).ok_or(PrefixError::HostBits)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}/{}", self.addr, self.len)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    };
}

ip_net!(Ipv4Net, Ipv4Addr, u32, 32, "An IPv4 prefix such as `100.64.0.0/10`.");
ip_net!(
    Ipv6Net,
    Ipv6Addr,
    u128,
    128,
    "An IPv6 prefix such as `fd7a:115c:a1e0::/48`."
);

/// Tailscale's IPv4 range, the CGNAT block (Go `tsaddr.CGNATRange`).
pub const CGNAT_RANGE: Ipv4Net = Ipv4Net {
    addr: Ipv4Addr::new(100, 64, 0, 0),
    len: 10,
};

/// Tailscale's IPv6 ULA range (Go `tsaddr.TailscaleULARange`).
pub const TAILSCALE_ULA_RANGE: Ipv6Net = Ipv6Net {
    addr: Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0),
    len: 48,
};

// ---------------------------------------------------------------------------------------------
// Typed coordinator config
// ---------------------------------------------------------------------------------------------

/// Log verbosity (`option log_level`), headscale's `log.level` minus `fatal`/`panic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogLevel {
    /// Only errors.
    Error,
    /// Errors and degradations.
    Warn,
    /// State transitions (the default).
    #[default]
    Info,
    /// Per-peer decisions (compiled out of release builds without feature `verbose`).
    Debug,
    /// Per packet (compiled out of release builds).
    Trace,
}

impl LogLevel {
    /// The uci spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// The matching `log` crate filter.
    pub fn to_level_filter(&self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl FromStr for LogLevel {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "error" => LogLevel::Error,
            "warn" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return Err(()),
        })
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// DERP settings (headscale `derp.*`), consumed by the relay issue; validated now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerpConfig {
    /// Run the embedded DERP relay (`derp_server_enabled`, default off).
    pub server_enabled: bool,
    /// Region id of the embedded relay (`derp_server_region_id`, default 999).
    pub server_region_id: i32,
    /// Region code (`derp_server_region_code`, default `headscale`).
    pub server_region_code: String,
    /// Region name (`derp_server_region_name`, default `Headscale Embedded DERP`).
    pub server_region_name: String,
    /// STUN UDP listen address (`derp_server_stun_listen_addr`, default `0.0.0.0:3478`).
    pub server_stun_listen_addr: SocketAddr,
    /// Only relay for nodes of this tailnet (`derp_server_verify_clients`, default on).
    pub server_verify_clients: bool,
    /// Public IPv4 address pinned in the embedded region's node (`derp_server_ipv4`, headscale
    /// `derp.server.ipv4`; default none: clients use `HostName`).
    pub server_ipv4: Option<Ipv4Addr>,
    /// Public IPv6 address pinned likewise (`derp_server_ipv6`, headscale `derp.server.ipv6`).
    pub server_ipv6: Option<Ipv6Addr>,
    /// URLs of JSON DERP maps to fetch (`list derp_url`, default none).
    pub urls: Vec<String>,
    /// Local JSON DERP map files (`list derp_path`, default none).
    pub paths: Vec<PathBuf>,
}

impl Default for DerpConfig {
    fn default() -> Self {
        DerpConfig {
            server_enabled: false,
            server_region_id: 999,
            server_region_code: "headscale".to_owned(),
            server_region_name: "Headscale Embedded DERP".to_owned(),
            server_stun_listen_addr: SocketAddr::from(([0, 0, 0, 0], 3478)),
            server_verify_clients: true,
            server_ipv4: None,
            server_ipv6: None,
            urls: Vec::new(),
            paths: Vec::new(),
        }
    }
}

/// The validated coordinator config from `config server 'main'`; every field has headscale's
/// meaning and a default, so a file without that section yields [`ServerConfig::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// URL clients use to reach us (`server_url`), without a trailing slash.
    pub server_url: String,
    /// HTTP listen address (`listen_addr`).
    pub listen_addr: SocketAddr,
    /// SQLite database file (`db_path`).
    pub db_path: PathBuf,
    /// Admin unix socket the CLI talks to (`unix_socket`).
    pub unix_socket: PathBuf,
    /// PEM certificate chain and private key (`tls_cert_path`, `tls_key_path`): when both are
    /// set the listener speaks TLS (control, `/key` and the embedded DERP relay).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// IPv4 allocation prefix inside 100.64.0.0/10 (`list ip_prefix`); `None` if only v6 is set.
    pub prefix_v4: Option<Ipv4Net>,
    /// IPv6 allocation prefix inside fd7a:115c:a1e0::/48; `None` if only v4 is set.
    pub prefix_v6: Option<Ipv6Net>,
    /// MagicDNS domain (`base_domain`), lowercase, no trailing dot.
    pub base_domain: String,
    /// MagicDNS on (`magic_dns`).
    pub magic_dns: bool,
    /// Global resolvers pushed to clients (`list nameserver`).
    pub nameservers: Vec<IpAddr>,
    /// Split DNS (`list split_dns 'domain=resolver'`): lowercase domain without trailing dot
    /// and its resolvers (`IP` or `IP:port`), domains in first-seen order.
    pub split_dns: Vec<(String, Vec<String>)>,
    /// Extra MagicDNS records (`list extra_records 'name=IP'`): lowercase name, address.
    pub extra_records: Vec<(String, IpAddr)>,
    /// Ephemeral nodes are deleted after this long offline
    /// (`ephemeral_node_inactivity_timeout`, more than 65 s).
    pub ephemeral_node_inactivity_timeout: Duration,
    /// Log verbosity (`log_level`).
    pub log_level: LogLevel,
    /// DERP options (`derp_*`).
    pub derp: DerpConfig,
    /// ACL policy file (`policy_path`, HuJSON), loaded at start; while set, the policy cannot
    /// be changed through the admin socket.
    pub policy_path: Option<PathBuf>,
    /// Connections open at once on the listener (`max_connections`, default 768).
    pub max_connections: u32,
    /// Connections open at once from one address or IPv6 /64 (`max_connections_per_ip`,
    /// default 64).
    pub max_connections_per_ip: u32,
    /// Budget from accept until TLS, the request head and the Noise handshake are done
    /// (`handshake_timeout`, default 10 s, 1 s to 5 min).
    pub handshake_timeout: Duration,
    /// Where `GET /metrics` is served (`metrics_listen_addr`, default 127.0.0.1:9090 as
    /// headscale's; empty turns it off; a bare port stays on loopback).
    pub metrics_listen_addr: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            server_url: "http://127.0.0.1:8080".to_owned(),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            db_path: PathBuf::from("/etc/tinyscale/db.sqlite"),
            unix_socket: PathBuf::from("/var/run/tinyscale-server.sock"),
            tls: None,
            prefix_v4: Some(CGNAT_RANGE),
            prefix_v6: Some(TAILSCALE_ULA_RANGE),
            base_domain: "tailnet.internal".to_owned(),
            magic_dns: true,
            nameservers: vec![IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1))],
            split_dns: Vec::new(),
            extra_records: Vec::new(),
            ephemeral_node_inactivity_timeout: Duration::from_secs(30 * 60),
            policy_path: None,
            log_level: LogLevel::Info,
            derp: DerpConfig::default(),
            max_connections: 768,
            max_connections_per_ip: 64,
            handshake_timeout: Duration::from_secs(10),
            metrics_listen_addr: Some(SocketAddr::from((
                [127, 0, 0, 1],
                crate::daemon::metrics::DEFAULT_COORDINATOR_PORT,
            ))),
        }
    }
}

/// Section type and name that hold the coordinator settings.
const SERVER_SECTION_TYPE: &str = "server";
const SERVER_SECTION_NAME: &str = "main";

/// headscale's floor for `ephemeral_node_inactivity_timeout`: the 60 s map keep-alive plus a
/// few seconds against races; the value must be strictly greater (config.go).
pub const MIN_EPHEMERAL_INACTIVITY_TIMEOUT: Duration = Duration::from_secs(65);

/// Options of `config server 'main'`: name and whether it is a `list`.
const SERVER_OPTIONS: &[(&str, bool)] = &[
    // Read by the init script (whether procd runs `server serve`); the server ignores it.
    ("enabled", false),
    ("server_url", false),
    ("listen_addr", false),
    ("db_path", false),
    ("unix_socket", false),
    ("tls_cert_path", false),
    ("tls_key_path", false),
    ("ip_prefix", true),
    ("base_domain", false),
    ("magic_dns", false),
    ("nameserver", true),
    ("split_dns", true),
    ("extra_records", true),
    ("ephemeral_node_inactivity_timeout", false),
    ("log_level", false),
    ("derp_server_enabled", false),
    ("derp_server_region_id", false),
    ("derp_server_region_code", false),
    ("derp_server_region_name", false),
    ("derp_server_stun_listen_addr", false),
    ("derp_server_verify_clients", false),
    ("derp_server_ipv4", false),
    ("derp_server_ipv6", false),
    ("derp_url", true),
    ("derp_path", true),
    ("policy_path", false),
    ("max_connections", false),
    ("max_connections_per_ip", false),
    ("handshake_timeout", false),
    ("metrics_listen_addr", false),
];

/// The `server 'main'` statements, sorted into single values and lists after the
/// unknown/repeated/kind checks.
struct ServerOptions<'a> {
    scalars: Vec<&'a UciOption>,
    lists: Vec<&'a UciOption>,
}

impl<'a> ServerOptions<'a> {
    /// The single value of `name`, unless unset or empty (uci treats `option x ''` as unset).
    fn get(&self, name: &str) -> Option<&'a UciOption> {
        self.scalars
            .iter()
            .copied()
            .find(|o| o.name == name && !o.value.is_empty())
    }

    /// All `list name` entries in file order.
    fn list(&self, name: &str) -> Vec<&'a UciOption> {
        self.lists.iter().copied().filter(|o| o.name == name).collect()
    }
}

fn option_path(name: &str) -> String {
    format!("{PACKAGE}.{SERVER_SECTION_NAME}.{name}")
}

fn invalid(o: &UciOption, message: String) -> ConfigError {
    ConfigError::Invalid {
        line: o.line,
        option: option_path(&o.name),
        message,
    }
}

fn parse_with<T>(o: &UciOption, what: &str, f: impl FnOnce(&str) -> Option<T>) -> Result<T, ConfigError> {
    f(&o.value).ok_or_else(|| invalid(o, format!("invalid {what} {:?}", o.value)))
}

fn bool_of(o: &UciOption) -> Result<bool, ConfigError> {
    parse_bool(&o.value).ok_or_else(|| {
        invalid(
            o,
            format!(
                "invalid boolean {:?} (use 1/0, yes/no, on/off, true/false, enabled/disabled)",
                o.value
            ),
        )
    })
}

fn socket_of(o: &UciOption) -> Result<SocketAddr, ConfigError> {
    parse_with(o, "socket address", |s| s.parse().ok())
}

fn path_of(o: &UciOption) -> Result<PathBuf, ConfigError> {
    if o.value.contains('\0') {
        return Err(invalid(o, format!("invalid path {:?}", o.value)));
    }
    Ok(PathBuf::from(&o.value))
}

impl ServerConfig {
    /// Parses uci text and builds the config from its `config server 'main'` section.
    pub fn from_uci_text(text: &str) -> Result<ServerConfig, ConfigError> {
        Self::from_uci(&parse(text)?)
    }

    /// Builds the config from a parsed file. Sections of other types are ignored; a `server`
    /// section not named `main` is an error, since its options would otherwise be silently
    /// dropped. Unknown, repeated, mis-typed (`list` vs `option`) and invalid options are errors.
    pub fn from_uci(file: &UciFile) -> Result<ServerConfig, ConfigError> {
        Self::from_uci_with(file, &[])
    }

    /// [`ServerConfig::from_uci`] with command-line values laid over the file: every option
    /// named in `overrides` replaces the file's values of that name (all of a list's entries),
    /// and is validated the same way. Give overrides line 0; [`ConfigError::line`] then says the
    /// value came from the command line.
    pub fn from_uci_with(file: &UciFile, overrides: &[UciOption]) -> Result<ServerConfig, ConfigError> {
        let mut opts = ServerOptions {
            scalars: Vec::new(),
            lists: Vec::new(),
        };
        for (i, s) in file.sections.iter().enumerate() {
            if s.kind != SERVER_SECTION_TYPE {
                continue;
            }
            if s.name.as_deref() != Some(SERVER_SECTION_NAME) {
                return Err(ConfigError::Section {
                    line: s.line,
                    section: file.section_path(i),
                    message: format!(
                        "the coordinator section must be named: config {SERVER_SECTION_TYPE} '{SERVER_SECTION_NAME}'"
                    ),
                });
            }
            // Same-named sections merge, as in uci.
            for o in &s.options {
                let Some(&(_, is_list)) = SERVER_OPTIONS.iter().find(|(n, _)| *n == o.name) else {
                    return Err(ConfigError::UnknownOption {
                        line: o.line,
                        option: option_path(&o.name),
                    });
                };
                match (is_list, o.list) {
                    (true, false) => {
                        return Err(ConfigError::ExpectedList {
                            line: o.line,
                            option: option_path(&o.name),
                            name: o.name.clone(),
                        })
                    }
                    (false, true) => {
                        return Err(ConfigError::ExpectedOption {
                            line: o.line,
                            option: option_path(&o.name),
                            name: o.name.clone(),
                        })
                    }
                    (true, true) => opts.lists.push(o),
                    (false, false) => {
                        if let Some(first) = opts.scalars.iter().find(|f| f.name == o.name) {
                            return Err(ConfigError::Repeated {
                                line: o.line,
                                option: option_path(&o.name),
                                first: first.line,
                            });
                        }
                        opts.scalars.push(o);
                    }
                }
            }
        }
        opts.scalars.retain(|o| !overrides.iter().any(|v| v.name == o.name));
        opts.lists.retain(|o| !overrides.iter().any(|v| v.name == o.name));
        for o in overrides {
            if o.list {
                opts.lists.push(o);
            } else {
                opts.scalars.push(o);
            }
        }
        Self::from_options(&opts)
    }

    fn from_options(opts: &ServerOptions<'_>) -> Result<ServerConfig, ConfigError> {
        let mut c = ServerConfig::default();

        if let Some(o) = opts.get("server_url") {
            http_url_host(&o.value).map_err(|why| invalid(o, format!("invalid URL {:?}: {why}", o.value)))?;
            // Paths such as `/register/<key>` are appended to it.
            c.server_url = o.value.trim_end_matches('/').to_owned();
        }
        if let Some(o) = opts.get("listen_addr") {
            c.listen_addr = socket_of(o)?;
        }
        if let Some(o) = opts.get("db_path") {
            c.db_path = path_of(o)?;
        }
        if let Some(o) = opts.get("unix_socket") {
            c.unix_socket = path_of(o)?;
        }
        if let Some(o) = opts.get("policy_path") {
            c.policy_path = Some(path_of(o)?);
        }
        match (opts.get("tls_cert_path"), opts.get("tls_key_path")) {
            (Some(cert), Some(key)) => c.tls = Some((path_of(cert)?, path_of(key)?)),
            (Some(o), None) => return Err(invalid(o, "tls_cert_path needs tls_key_path too".into())),
            (None, Some(o)) => return Err(invalid(o, "tls_key_path needs tls_cert_path too".into())),
            (None, None) => {}
        }

        let prefixes = opts.list("ip_prefix");
        if !prefixes.is_empty() {
            c.prefix_v4 = None;
            c.prefix_v6 = None;
            for o in prefixes {
                if o.value.contains(':') {
                    let p: Ipv6Net = o
                        .value
                        .parse()
                        .map_err(|e| invalid(o, format!("invalid IPv6 prefix {:?}: {e}", o.value)))?;
                    if !TAILSCALE_ULA_RANGE.contains_net(&p) {
                        return Err(invalid(o, format!("IPv6 prefix {p} is outside {TAILSCALE_ULA_RANGE}")));
                    }
                    if c.prefix_v6.replace(p).is_some() {
                        return Err(invalid(o, "at most one IPv6 prefix may be set".to_owned()));
                    }
                } else {
                    let p: Ipv4Net = o
                        .value
                        .parse()
                        .map_err(|e| invalid(o, format!("invalid IPv4 prefix {:?}: {e}", o.value)))?;
                    if !CGNAT_RANGE.contains_net(&p) {
                        return Err(invalid(o, format!("IPv4 prefix {p} is outside {CGNAT_RANGE}")));
                    }
                    if c.prefix_v4.replace(p).is_some() {
                        return Err(invalid(o, "at most one IPv4 prefix may be set".to_owned()));
                    }
                }
            }
        }

        let base_domain = opts.get("base_domain");
        if let Some(o) = base_domain {
            c.base_domain =
                validate_domain(&o.value).map_err(|why| invalid(o, format!("invalid domain {:?}: {why}", o.value)))?;
        }
        // headscale refuses a server_url inside the MagicDNS domain: clients would resolve the
        // control host through MagicDNS and lose the coordinator (and the embedded DERP).
        // Blame whichever of the two was set explicitly; the defaults never clash.
        if let Some(o) = base_domain.or_else(|| opts.get("server_url")) {
            let host = http_url_host(&c.server_url).unwrap_or("").to_ascii_lowercase();
            let host = host.trim_end_matches('.');
            if host == c.base_domain || host.ends_with(&format!(".{}", c.base_domain)) {
                let message = if base_domain.is_some() {
                    format!(
                        "{:?} must not equal or contain the server_url host {host:?}",
                        c.base_domain
                    )
                } else {
                    format!(
                        "host {host:?} must not equal or be inside base_domain {:?}",
                        c.base_domain
                    )
                };
                return Err(invalid(o, message));
            }
        }

        if let Some(o) = opts.get("magic_dns") {
            c.magic_dns = bool_of(o)?;
        }
        let nameservers = opts.list("nameserver");
        if !nameservers.is_empty() {
            c.nameservers = nameservers
                .iter()
                .map(|o| parse_with(o, "IP address", |s| s.parse().ok()))
                .collect::<Result<_, _>>()?;
        }
        for o in opts.list("split_dns") {
            for entry in o.value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let (domain, resolver) = split_dns_entry(entry).map_err(|why| invalid(o, why))?;
                if c.magic_dns && (domain == c.base_domain || domain.ends_with(&format!(".{}", c.base_domain))) {
                    return Err(invalid(
                        o,
                        format!(
                            "split DNS domain {domain:?} is inside base_domain {:?}, which MagicDNS answers itself",
                            c.base_domain
                        ),
                    ));
                }
                match c.split_dns.iter_mut().find(|(d, _)| *d == domain) {
                    Some((_, rs)) => rs.push(resolver),
                    None => c.split_dns.push((domain, vec![resolver])),
                }
            }
        }
        for o in opts.list("extra_records") {
            for entry in o.value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let (name, ip) = entry
                    .split_once('=')
                    .ok_or_else(|| invalid(o, format!("invalid record {entry:?}: expected name=IP")))?;
                let name = validate_domain(name.trim().trim_end_matches('.'))
                    .map_err(|why| invalid(o, format!("invalid record name {name:?}: {why}")))?;
                let ip: IpAddr = ip
                    .trim()
                    .parse()
                    .map_err(|_| invalid(o, format!("invalid record address {ip:?} in {entry:?}")))?;
                c.extra_records.push((name, ip));
            }
        }
        if let Some(o) = opts.get("ephemeral_node_inactivity_timeout") {
            let d = parse_duration(&o.value).map_err(|e| invalid(o, format!("{e}: {:?}", o.value)))?;
            if d <= MIN_EPHEMERAL_INACTIVITY_TIMEOUT {
                return Err(invalid(
                    o,
                    format!(
                        "{:?} is too low, must be more than {}",
                        o.value,
                        format_duration(MIN_EPHEMERAL_INACTIVITY_TIMEOUT)
                    ),
                ));
            }
            c.ephemeral_node_inactivity_timeout = d;
        }
        if let Some(o) = opts.get("log_level") {
            c.log_level = o.value.parse().map_err(|()| {
                invalid(
                    o,
                    format!(
                        "invalid log level {:?} (use error, warn, info, debug or trace)",
                        o.value
                    ),
                )
            })?;
        }

        let count = |name: &str, dflt: u32| match opts.get(name) {
            Some(o) => parse_with(o, "count (a positive integer)", |s| {
                s.parse::<u32>().ok().filter(|v| *v > 0)
            }),
            None => Ok(dflt),
        };
        c.max_connections = count("max_connections", c.max_connections)?;
        c.max_connections_per_ip = count("max_connections_per_ip", c.max_connections_per_ip)?;
        if let Some(o) = opts.get("handshake_timeout") {
            let d = parse_duration(&o.value).map_err(|e| invalid(o, format!("{e}: {:?}", o.value)))?;
            if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&d) {
                return Err(invalid(o, format!("{:?} is out of range (1s to 5m)", o.value)));
            }
            c.handshake_timeout = d;
        }
        // Read raw: an empty value is "off" here, not "unset".
        if let Some(o) = opts.scalars.iter().find(|o| o.name == "metrics_listen_addr") {
            c.metrics_listen_addr =
                crate::daemon::metrics::parse_listen(&o.value, crate::daemon::metrics::DEFAULT_COORDINATOR_PORT)
                    .map_err(|e| invalid(o, e))?
                    .map(|(a, _)| a);
        }

        let d = &mut c.derp;
        if let Some(o) = opts.get("derp_server_enabled") {
            d.server_enabled = bool_of(o)?;
        }
        if let Some(o) = opts.get("derp_server_region_id") {
            d.server_region_id = parse_with(o, "region id (a positive integer)", |s| {
                s.parse::<i32>().ok().filter(|v| *v > 0)
            })?;
        }
        if let Some(o) = opts.get("derp_server_region_code") {
            d.server_region_code = parse_with(o, "region code (no spaces)", |s| {
                (!s.chars().any(char::is_whitespace)).then(|| s.to_owned())
            })?;
        }
        if let Some(o) = opts.get("derp_server_region_name") {
            d.server_region_name = o.value.clone();
        }
        if let Some(o) = opts.get("derp_server_stun_listen_addr") {
            d.server_stun_listen_addr = socket_of(o)?;
        }
        if let Some(o) = opts.get("derp_server_verify_clients") {
            d.server_verify_clients = bool_of(o)?;
        }
        if let Some(o) = opts.get("derp_server_ipv4") {
            d.server_ipv4 = Some(parse_with(o, "IPv4 address", |s| s.parse().ok())?);
        }
        if let Some(o) = opts.get("derp_server_ipv6") {
            d.server_ipv6 = Some(parse_with(o, "IPv6 address", |s| s.parse().ok())?);
        }
        for o in opts.list("derp_url") {
            http_url_host(&o.value).map_err(|why| invalid(o, format!("invalid URL {:?}: {why}", o.value)))?;
            d.urls.push(o.value.clone());
        }
        for o in opts.list("derp_path") {
            if o.value.is_empty() {
                return Err(invalid(o, "empty path".to_owned()));
            }
            d.paths.push(path_of(o)?);
        }
        Ok(c)
    }

    /// Host part of [`ServerConfig::server_url`] (brackets stripped from an IPv6 literal).
    pub fn server_host(&self) -> &str {
        http_url_host(&self.server_url).unwrap_or("")
    }
}

/// Checks `http://host[:port][/path]` or `https://…` and returns the host (IPv6 brackets
/// stripped). No userinfo; the port, if present, must be 1-65535.
fn http_url_host(url: &str) -> Result<&str, &'static str> {
    let strip = |p: &str| {
        url.get(..p.len())
            .filter(|head| head.eq_ignore_ascii_case(p))
            .and_then(|_| url.get(p.len()..))
    };
    let rest = strip("http://")
        .or_else(|| strip("https://"))
        .ok_or("must start with http:// or https://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains('@') {
        return Err("must not contain user information");
    }
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let (h, after) = inner.split_once(']').ok_or("unclosed '[' in host")?;
        h.parse::<Ipv6Addr>().map_err(|_| "invalid IPv6 address in host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after ']'")?),
        };
        (h, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("missing host");
    }
    if !authority.starts_with('[')
        && !host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
    {
        return Err("invalid character in host");
    }
    if let Some(p) = port {
        if !p.bytes().all(|c| c.is_ascii_digit()) || !matches!(p.parse::<u16>(), Ok(v) if v != 0) {
            return Err("invalid port");
        }
    }
    Ok(host)
}

/// Validates a DNS domain (labels of `[a-z0-9-]`, 1-63 chars, not starting or ending with `-`,
/// at most 253 chars, no trailing dot) and returns it lowercased.
/// One `domain=resolver` of `split_dns`: the domain (validated, lowercase, without trailing
/// dot) and the resolver as `IP` or `IP:port` (Go accepts both in `dnstype.Resolver.Addr`).
fn split_dns_entry(entry: &str) -> Result<(String, String), String> {
    let (domain, resolver) = entry
        .split_once('=')
        .ok_or_else(|| format!("invalid split DNS entry {entry:?}: expected domain=resolver"))?;
    let domain = validate_domain(domain.trim().trim_end_matches('.'))
        .map_err(|why| format!("invalid split DNS domain {domain:?}: {why}"))?;
    let resolver = resolver.trim();
    let ok = resolver.parse::<IpAddr>().is_ok() || resolver.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0);
    if !ok {
        return Err(format!(
            "invalid split DNS resolver {resolver:?} for {domain:?}: expected IP or IP:port"
        ));
    }
    Ok((domain, resolver.to_owned()))
}

fn validate_domain(s: &str) -> Result<String, &'static str> {
    if s.ends_with('.') {
        return Err("must not end with a dot");
    }
    if s.len() > 253 {
        return Err("longer than 253 characters");
    }
    let lower = s.to_ascii_lowercase();
    for label in lower.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1-63 characters");
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            return Err("labels may hold only letters, digits and '-'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("labels must not start or end with '-'");
        }
    }
    Ok(lower)
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
    fn prefixes() {
        let p: Ipv4Net = "100.64.0.0/10".parse().unwrap();
        assert_eq!(p, CGNAT_RANGE);
        assert_eq!(p.to_string(), "100.64.0.0/10");
        assert_eq!(p.mask(), 0xffc0_0000);
        assert!(p.contains(Ipv4Addr::new(100, 127, 255, 255)));
        assert!(!p.contains(Ipv4Addr::new(100, 128, 0, 0)));
        let q: Ipv6Net = "fd7a:115c:a1e0:ab12::/64".parse().unwrap();
        assert!(TAILSCALE_ULA_RANGE.contains_net(&q));
        assert!(!q.contains_net(&TAILSCALE_ULA_RANGE));
        assert_eq!("0.0.0.0/0".parse::<Ipv4Net>().unwrap().mask(), 0);
        assert_eq!("100.64.0.1/10".parse::<Ipv4Net>(), Err(PrefixError::HostBits));
        assert_eq!("100.64.0.0/33".parse::<Ipv4Net>(), Err(PrefixError::Length));
        assert_eq!("100.64.0.0".parse::<Ipv4Net>(), Err(PrefixError::Syntax));
        assert_eq!("100.64.0.0/+5".parse::<Ipv4Net>(), Err(PrefixError::Syntax));
        assert_eq!("::/129".parse::<Ipv6Net>(), Err(PrefixError::Length));
    }

    #[test]
    fn server_defaults() {
        let want = ServerConfig::default();
        assert_eq!(ServerConfig::from_uci_text("").unwrap(), want);
        assert_eq!(
            ServerConfig::from_uci_text("config client\n\toption whatever 'x'\n").unwrap(),
            want
        );
        assert_eq!(ServerConfig::from_uci_text("config server 'main'\n").unwrap(), want);
        assert_eq!(want.server_url, "http://127.0.0.1:8080");
        assert_eq!(want.server_host(), "127.0.0.1");
        assert_eq!(want.listen_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(want.db_path, PathBuf::from("/etc/tinyscale/db.sqlite"));
        assert_eq!(want.unix_socket, PathBuf::from("/var/run/tinyscale-server.sock"));
        assert_eq!(want.tls, None);
        assert_eq!(want.prefix_v4.unwrap().to_string(), "100.64.0.0/10");
        assert_eq!(want.prefix_v6.unwrap().to_string(), "fd7a:115c:a1e0::/48");
        assert_eq!(want.base_domain, "tailnet.internal");
        assert!(want.magic_dns);
        assert_eq!(want.nameservers, vec!["1.1.1.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(want.ephemeral_node_inactivity_timeout, Duration::from_secs(1800));
        assert_eq!(want.log_level, LogLevel::Info);
        assert_eq!(want.log_level.to_level_filter(), log::LevelFilter::Info);
        let d = &want.derp;
        assert!(!d.server_enabled);
        assert_eq!(d.server_region_id, 999);
        assert_eq!(d.server_region_code, "headscale");
        assert_eq!(d.server_region_name, "Headscale Embedded DERP");
        assert_eq!(d.server_stun_listen_addr.to_string(), "0.0.0.0:3478");
        assert!(d.server_verify_clients);
        assert!(d.urls.is_empty() && d.paths.is_empty());
    }

    #[test]
    fn server_full() {
        let text = r#"
config server 'main'
	option server_url 'https://hs.example.com:8443/'
	option listen_addr '[::]:443'
	option db_path '/srv/ts/db.sqlite'
	option unix_socket '/tmp/ts.sock'
	option tls_cert_path '/etc/tinyscale/cert.pem'
	option tls_key_path '/etc/tinyscale/key.pem'
	list ip_prefix '100.100.0.0/16'
	list ip_prefix 'fd7a:115c:a1e0:1::/64'
	option base_domain 'Ts.Example.NET'
	option magic_dns 'off'
	list nameserver '9.9.9.9'
	list nameserver '2620:fe::fe'
	option ephemeral_node_inactivity_timeout '1h30m'
	option log_level 'debug'
	option derp_server_enabled 'yes'
	option derp_server_region_id '900'
	option derp_server_region_code 'home'
	option derp_server_region_name 'Home router'
	option derp_server_stun_listen_addr '0.0.0.0:3479'
	option derp_server_verify_clients 'disabled'
	option derp_server_ipv4 '198.51.100.1'
	option derp_server_ipv6 '2001:db8::1'
	list derp_url 'https://controlplane.tailscale.com/derpmap/default'
	list derp_path '/etc/tinyscale/derp.json'
	option policy_path '/etc/tinyscale/policy.hujson'
	option max_connections '200'
	option max_connections_per_ip '16'
	option handshake_timeout '5s'

config client
	option anything 'ignored here'
"#;
        let c = ServerConfig::from_uci_text(text).unwrap();
        assert_eq!(c.server_url, "https://hs.example.com:8443");
        assert_eq!(c.server_host(), "hs.example.com");
        assert_eq!(c.listen_addr, "[::]:443".parse().unwrap());
        assert_eq!(c.db_path, PathBuf::from("/srv/ts/db.sqlite"));
        assert_eq!(c.unix_socket, PathBuf::from("/tmp/ts.sock"));
        assert_eq!(
            c.tls,
            Some((
                PathBuf::from("/etc/tinyscale/cert.pem"),
                PathBuf::from("/etc/tinyscale/key.pem")
            ))
        );
        assert_eq!(c.prefix_v4, "100.100.0.0/16".parse().ok());
        assert_eq!(c.prefix_v6, "fd7a:115c:a1e0:1::/64".parse().ok());
        assert_eq!(c.base_domain, "ts.example.net");
        assert!(!c.magic_dns);
        assert_eq!(
            c.nameservers,
            vec!["9.9.9.9".parse::<IpAddr>().unwrap(), "2620:fe::fe".parse().unwrap()]
        );
        assert_eq!(c.ephemeral_node_inactivity_timeout, Duration::from_secs(5400));
        assert_eq!(c.log_level, LogLevel::Debug);
        assert!(c.derp.server_enabled);
        assert_eq!(c.derp.server_region_id, 900);
        assert_eq!(c.derp.server_region_code, "home");
        assert_eq!(c.derp.server_region_name, "Home router");
        assert_eq!(c.derp.server_stun_listen_addr.port(), 3479);
        assert!(!c.derp.server_verify_clients);
        assert_eq!(c.derp.server_ipv4, "198.51.100.1".parse().ok());
        assert_eq!(c.derp.server_ipv6, "2001:db8::1".parse().ok());
        assert_eq!(c.derp.urls.len(), 1);
        assert_eq!(c.derp.paths, vec![PathBuf::from("/etc/tinyscale/derp.json")]);
        assert_eq!(c.policy_path, Some(PathBuf::from("/etc/tinyscale/policy.hujson")));
        assert_eq!((c.max_connections, c.max_connections_per_ip), (200, 16));
        assert_eq!(c.handshake_timeout, Duration::from_secs(5));
    }

    #[test]
    fn server_partial_prefixes_and_empty_values() {
        let c = ServerConfig::from_uci_text(
            "config server 'main'\n list ip_prefix 100.64.0.0/10\n option listen_addr ''\n",
        )
        .unwrap();
        assert_eq!(c.prefix_v4, Some(CGNAT_RANGE));
        assert_eq!(c.prefix_v6, None);
        // `option x ''` means unset in uci, so the default stands.
        assert_eq!(c.listen_addr, ServerConfig::default().listen_addr);
        let c = ServerConfig::from_uci_text("config server main\nlist ip_prefix fd7a:115c:a1e0::/48\n").unwrap();
        assert_eq!((c.prefix_v4, c.prefix_v6), (None, Some(TAILSCALE_ULA_RANGE)));
        // Two `config server 'main'` blocks merge as in uci.
        let c = ServerConfig::from_uci_text(
            "config server 'main'\noption log_level warn\nconfig server 'main'\noption magic_dns 0\n",
        )
        .unwrap();
        assert_eq!((c.log_level, c.magic_dns), (LogLevel::Warn, false));
    }

    #[test]
    fn server_metrics_listen_addr() {
        let get = |text: &str| {
            ServerConfig::from_uci_text(&format!("config server 'main'\n{text}"))
                .unwrap()
                .metrics_listen_addr
        };
        assert_eq!(get(""), Some("127.0.0.1:9090".parse().unwrap()), "headscale's default");
        assert_eq!(get("\toption metrics_listen_addr ''\n"), None, "empty is off");
        assert_eq!(
            get("\toption metrics_listen_addr ':9100'\n"),
            Some("127.0.0.1:9100".parse().unwrap())
        );
        assert_eq!(
            get("\toption metrics_listen_addr '0.0.0.0:9100'\n"),
            Some("0.0.0.0:9100".parse().unwrap()),
            "explicit: allowed (warned at start)"
        );
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

    /// Each invalid input: (option line, expected path, expected message fragment).
    #[test]
    fn server_errors_name_option_and_line() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "option listen_addr 'foo'",
                "listen_addr",
                r#"invalid socket address "foo""#,
            ),
            ("option bogus '1'", "bogus", "unknown option"),
            ("list listen_addr '127.0.0.1:1'", "listen_addr", "takes one value"),
            ("option ip_prefix '100.64.0.0/10'", "ip_prefix", "is a list"),
            ("option server_url 'ftp://x'", "server_url", "http:// or https://"),
            ("option server_url 'http://'", "server_url", "missing host"),
            ("option server_url 'http://a:0'", "server_url", "invalid port"),
            ("option server_url 'http://a b'", "server_url", "invalid character"),
            ("option server_url 'http://u@h'", "server_url", "user information"),
            ("option server_url 'http://[::1'", "server_url", "unclosed"),
            ("list ip_prefix '10.0.0.0/8'", "ip_prefix", "outside 100.64.0.0/10"),
            ("list ip_prefix '100.0.0.0/8'", "ip_prefix", "outside 100.64.0.0/10"),
            ("list ip_prefix 'fd00::/8'", "ip_prefix", "outside fd7a:115c:a1e0::/48"),
            ("list ip_prefix '100.64.0.1/10'", "ip_prefix", "bits set"),
            ("list ip_prefix 'nope'", "ip_prefix", "invalid IPv4 prefix"),
            ("option base_domain 'example.com.'", "base_domain", "dot"),
            ("option base_domain 'ex_ample.com'", "base_domain", "letters, digits"),
            ("option base_domain '-a.com'", "base_domain", "start or end"),
            ("option base_domain 'a..com'", "base_domain", "1-63"),
            ("option magic_dns 'maybe'", "magic_dns", "invalid boolean"),
            ("list nameserver 'dns.google'", "nameserver", "invalid IP address"),
            ("list split_dns 'corp.example'", "split_dns", "expected domain=resolver"),
            (
                "list split_dns 'corp_x.example=10.0.0.1'",
                "split_dns",
                "invalid split DNS domain",
            ),
            (
                "list split_dns 'corp.example=dns.corp'",
                "split_dns",
                "expected IP or IP:port",
            ),
            (
                "list split_dns 'corp.example=10.0.0.1:0'",
                "split_dns",
                "expected IP or IP:port",
            ),
            (
                "list split_dns 'x.tailnet.internal=10.0.0.1'",
                "split_dns",
                "inside base_domain \"tailnet.internal\"",
            ),
            ("list extra_records 'grafana'", "extra_records", "expected name=IP"),
            (
                "list extra_records 'graf ana=100.64.0.9'",
                "extra_records",
                "invalid record name",
            ),
            (
                "list extra_records 'grafana=100.64.0.999'",
                "extra_records",
                "invalid record address",
            ),
            (
                "option ephemeral_node_inactivity_timeout '65s'",
                "ephemeral_node_inactivity_timeout",
                "must be more than 1m5s",
            ),
            (
                "option ephemeral_node_inactivity_timeout '30'",
                "ephemeral_node_inactivity_timeout",
                "missing unit",
            ),
            ("option log_level 'loud'", "log_level", "invalid log level"),
            ("option max_connections '0'", "max_connections", "invalid count"),
            (
                "option max_connections_per_ip '-1'",
                "max_connections_per_ip",
                "invalid count",
            ),
            ("option handshake_timeout '0s'", "handshake_timeout", "out of range"),
            ("option handshake_timeout '10'", "handshake_timeout", "missing unit"),
            (
                "option metrics_listen_addr 'localhost:9090'",
                "metrics_listen_addr",
                "invalid address",
            ),
            (
                "option derp_server_enabled '2'",
                "derp_server_enabled",
                "invalid boolean",
            ),
            (
                "option derp_server_region_id '0'",
                "derp_server_region_id",
                "invalid region id",
            ),
            (
                "option derp_server_region_id 'x'",
                "derp_server_region_id",
                "invalid region id",
            ),
            (
                "option derp_server_region_code 'a b'",
                "derp_server_region_code",
                "invalid region code",
            ),
            (
                "option derp_server_stun_listen_addr ':3478'",
                "derp_server_stun_listen_addr",
                "invalid socket address",
            ),
            (
                "option derp_server_verify_clients 'y'",
                "derp_server_verify_clients",
                "invalid boolean",
            ),
            ("list derp_url 'derp.example.com'", "derp_url", "invalid URL"),
            ("list derp_path ''", "derp_path", "empty path"),
            ("option tls_cert_path '/c.pem'", "tls_cert_path", "needs tls_key_path"),
            ("option tls_key_path '/k.pem'", "tls_key_path", "needs tls_cert_path"),
        ];
        for (stmt, name, fragment) in cases {
            let text = format!("# comment\nconfig server 'main'\n\tlist nameserver '1.1.1.1'\n\t{stmt}\n");
            let e = ServerConfig::from_uci_text(&text).unwrap_err();
            let path = format!("tinyscale.main.{name}");
            assert_eq!(e.line(), 4, "{stmt}: {e}");
            assert_eq!(e.option(), Some(path.as_str()), "{stmt}: {e}");
            let shown = e.to_string();
            assert!(shown.starts_with(&format!("line 4: {path}: ")), "{shown}");
            assert!(shown.contains(fragment), "{stmt}: {shown}");
            assert_eq!(e.exit_code(), 3);
        }
    }

    #[test]
    fn exact_message_example() {
        let e =
            ServerConfig::from_uci_text("\n\nconfig server 'main'\n\n\n\n\toption listen_addr 'foo'\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"line 7: tinyscale.main.listen_addr: invalid socket address "foo""#
        );
    }

    #[test]
    fn repeated_and_section_errors() {
        let e = ServerConfig::from_uci_text("config server 'main'\noption log_level info\noption log_level debug\n")
            .unwrap_err();
        assert_eq!(
            e,
            ConfigError::Repeated {
                line: 3,
                option: "tinyscale.main.log_level".into(),
                first: 2
            }
        );
        assert!(e.to_string().contains("first on line 2"));
        // A repeat across merged sections is still a repeat.
        let e = ServerConfig::from_uci_text(
            "config server 'main'\noption magic_dns 1\nconfig server 'main'\noption magic_dns 0\n",
        )
        .unwrap_err();
        assert_eq!(e.line(), 4);
        // Lists may repeat.
        assert!(ServerConfig::from_uci_text(
            "config server 'main'\nlist ip_prefix 100.64.0.0/10\nlist ip_prefix 100.64.0.0/11\n"
        )
        .unwrap_err()
        .to_string()
        .contains("at most one IPv4"));
        let e = ServerConfig::from_uci_text("config client\nconfig server\noption x y\n").unwrap_err();
        assert_eq!(e.line(), 2);
        assert_eq!(e.option(), None);
        assert!(e.to_string().starts_with("line 2: tinyscale.@server[0]: "), "{e}");
        // Syntax errors come through from_uci_text too.
        assert!(matches!(
            ServerConfig::from_uci_text("config server 'main'\noption a 'b\n"),
            Err(ConfigError::Syntax { line: 2, .. })
        ));
    }

    #[test]
    fn split_dns_and_extra_records() {
        let c = ServerConfig::from_uci_text(
            "config server 'main'\n\
             \tlist split_dns 'Corp.Example.=10.0.0.53, lab.example=10.9.0.1:5353'\n\
             \tlist split_dns 'corp.example=fd00::53'\n\
             \tlist extra_records 'grafana.tailnet.internal=100.64.0.9,v6.tailnet.internal=fd7a:115c:a1e0::9'\n",
        )
        .unwrap();
        assert_eq!(
            c.split_dns,
            vec![
                (
                    "corp.example".to_string(),
                    vec!["10.0.0.53".to_string(), "fd00::53".to_string()]
                ),
                ("lab.example".to_string(), vec!["10.9.0.1:5353".to_string()]),
            ]
        );
        assert_eq!(
            c.extra_records,
            vec![
                ("grafana.tailnet.internal".to_string(), "100.64.0.9".parse().unwrap()),
                ("v6.tailnet.internal".to_string(), "fd7a:115c:a1e0::9".parse().unwrap()),
            ]
        );
        // With MagicDNS off, a split domain inside the base domain is no conflict.
        let off = "config server 'main'\n\toption magic_dns 0\n\tlist split_dns 'x.tailnet.internal=10.0.0.1'\n";
        assert_eq!(ServerConfig::from_uci_text(off).unwrap().split_dns.len(), 1);
    }

    #[test]
    fn command_line_overrides_replace_file_values() {
        let file = parse(
            "config server 'main'\n\toption base_domain 'file.example'\n\tlist nameserver '9.9.9.9'\n\
             \tlist nameserver '8.8.8.8'\n\toption magic_dns '1'\n",
        )
        .unwrap();
        let over = |name: &str, value: &str, list: bool| UciOption {
            name: name.into(),
            value: value.into(),
            list,
            line: 0,
        };
        let c = ServerConfig::from_uci_with(
            &file,
            &[
                over("base_domain", "flag.example", false),
                over("nameserver", "1.0.0.1", true),
                over("magic_dns", "false", false),
            ],
        )
        .unwrap();
        assert_eq!(c.base_domain, "flag.example");
        assert_eq!(c.nameservers, vec!["1.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(!c.magic_dns);
        let e = ServerConfig::from_uci_with(&file, &[over("base_domain", "bad_domain", false)]).unwrap_err();
        assert_eq!(e.line(), 0);
        assert!(e.to_string().contains("tinyscale.main.base_domain"), "{e}");
    }

    #[test]
    fn base_domain_must_not_contain_server_host() {
        for (url, dom, ok) in [
            ("https://hs.example.com", "example.com", false),
            ("https://example.com", "example.com", false),
            ("https://HS.Example.com", "example.com", false),
            ("https://hs.example.com", "ts.example.com", true),
            ("https://myexample.com", "example.com", true),
            ("https://example.com", "hs.example.com", true),
        ] {
            let text = format!("config server 'main'\noption server_url '{url}'\noption base_domain '{dom}'\n");
            let r = ServerConfig::from_uci_text(&text);
            assert_eq!(r.is_ok(), ok, "{url} {dom}: {r:?}");
            if let Err(e) = r {
                assert_eq!(e.option(), Some("tinyscale.main.base_domain"));
                assert_eq!(e.line(), 3);
            }
        }
        // With the default base_domain the error points at server_url.
        let e = ServerConfig::from_uci_text("config server 'main'\noption server_url 'http://hs.tailnet.internal'\n")
            .unwrap_err();
        assert_eq!(e.option(), Some("tinyscale.main.server_url"));
    }

    #[test]
    fn server_url_forms() {
        for url in [
            "http://127.0.0.1:8080",
            "https://[::1]:443/",
            "HTTPS://hs.example.com",
            "http://hs.example.com/prefix?x#y",
        ] {
            let text = format!("config server 'main'\noption server_url '{url}'\n");
            assert!(ServerConfig::from_uci_text(&text).is_ok(), "{url}");
        }
        assert_eq!(http_url_host("https://[::1]:443/"), Ok("::1"));
    }

    fn uci_alphabet() -> impl Strategy<Value = String> {
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

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in any::<String>()) {
            let _ = parse(&s);
            let _ = ServerConfig::from_uci_text(&s);
            let _ = parse_duration(&s);
            let _ = s.parse::<Ipv4Net>();
            let _ = s.parse::<Ipv6Net>();
        }

        #[test]
        fn uci_shaped_text_never_panics(s in uci_alphabet()) {
            if let Err(e) = parse(&s) {
                // Error lines always point into the text.
                prop_assert!(e.line() >= 1 && e.line() <= s.matches('\n').count() + 1);
            }
            let _ = ServerConfig::from_uci_text(&s);
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
