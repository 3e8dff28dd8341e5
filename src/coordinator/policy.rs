//! The ACL policy: headscale's policy file (HuJSON) parsed, checked, and compiled per node into
//! the PacketFilter rules it receives and the peers it may see.
//!
//! Mirrors headscale `hscontrol/policy/v2` (`types.go` parsing and validation, `filter.go`
//! `compileFilterRules`, `policyutil/reduce.go` `ReduceFilterRules`, `types/node.go`
//! `CanAccess`) and its `docs/ref/acls.md` format:
//!
//! ```text
//! {
//!   "groups":    { "group:admins": ["alice@"] },
//!   "hosts":     { "nas": "192.168.1.10/32" },
//!   "tagOwners": { "tag:router": ["group:admins"] },
//!   "acls": [
//!     { "action": "accept", "src": ["group:admins"], "dst": ["tag:router:22,80-90", "nas:*"] },
//!     { "action": "accept", "proto": "udp", "src": ["*"], "dst": ["*:53"] },
//!   ],
//!   "autoApprovers": {
//!     "routes":   { "192.168.0.0/16": ["tag:router"] },
//!     "exitNode": ["tag:router"],
//!   },
//! }
//! ```
//! Aliases: `*`, users (`name@`), `group:`, `tag:`, host names, IPs and CIDRs,
//! `autogroup:member`, `autogroup:tagged` and (destinations only) `autogroup:internet`, which
//! grants no packets here (exit traffic is routed, not filtered) but makes exit nodes visible.
//! A user or group means that user's untagged nodes; a tag means the nodes carrying it.
//! Top-level `ssh` is accepted and ignored (no Tailscale SSH); keys starting with `#` inside an
//! ACL entry are ignored (headscale does the same for admin tools' metadata); anything else
//! unknown is an error.
//!
//! The caller supplies the policy text and, per compile, the nodes as [`Member`]s (owner name,
//! tags, addresses, served routes). Pure: no I/O, no clock.
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, fmt, net::IpAddr};

use crate::wire::{
    prefix::Prefix,
    tailcfg::{FilterRule, NetPortRange, PortRange},
};

/// Deepest nesting of arrays and objects accepted (a policy needs 4).
const MAX_DEPTH: usize = 32;

/// IANA protocol numbers used below.
const TCP: i64 = 6;
const UDP: i64 = 17;
const SCTP: i64 = 132;

/// One problem in a policy, at a 1-based line and column of the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// Line (1-based).
    pub line: usize,
    /// Column (1-based, in characters).
    pub col: usize,
    /// What is wrong.
    pub msg: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.col, self.msg)
    }
}

/// All errors of a policy, one per line when shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

// ---- HuJSON ----

/// A parsed value and the byte offset where it starts.
#[derive(Debug, Clone, PartialEq)]
struct Val {
    at: usize,
    v: V,
}

#[derive(Debug, Clone, PartialEq)]
enum V {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Val>),
    /// Members in order: key, the key's offset, value.
    Obj(Vec<(String, usize, Val)>),
}

/// (line, column) of byte offset `at`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

type PResult<T> = Result<T, (usize, String)>;

impl Parser<'_> {
    /// Skips whitespace, `// line` and `/* block */` comments.
    fn skip(&mut self) -> PResult<()> {
        loop {
            match self.s.get(self.i) {
                Some(b' ' | b'\t' | b'\n' | b'\r') => self.i += 1,
                Some(b'/') if self.s.get(self.i + 1) == Some(&b'/') => {
                    while self.s.get(self.i).is_some_and(|c| *c != b'\n') {
                        self.i += 1;
                    }
                }
                Some(b'/') if self.s.get(self.i + 1) == Some(&b'*') => {
                    let start = self.i;
                    self.i += 2;
                    loop {
                        match self.s.get(self.i) {
                            None => return Err((start, "unterminated /* comment".into())),
                            Some(b'*') if self.s.get(self.i + 1) == Some(&b'/') => {
                                self.i += 2;
                                break;
                            }
                            Some(_) => self.i += 1,
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn value(&mut self, depth: usize) -> PResult<Val> {
        self.skip()?;
        let at = self.i;
        if depth > MAX_DEPTH {
            return Err((at, "nested too deeply".into()));
        }
        let v = match self.s.get(self.i) {
            None => return Err((at, "unexpected end of input, expected a value".into())),
            Some(b'{') => self.object(depth)?,
            Some(b'[') => self.array(depth)?,
            Some(b'"') => V::Str(self.string()?),
            Some(b'-' | b'0'..=b'9') => {
                while self
                    .s
                    .get(self.i)
                    .is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c))
                {
                    self.i += 1;
                }
                let t = String::from_utf8_lossy(&self.s[at..self.i]).into_owned();
                // Numbers only ever name a protocol, which checks them itself; no float parser
                // (its tables cost 14 KB on mipsel).
                if !t.bytes().any(|c| c.is_ascii_digit()) {
                    return Err((at, format!("invalid number {t:?}")));
                }
                V::Num(t)
            }
            Some(_) => {
                let word_end = (self.i..self.s.len())
                    .find(|&j| !self.s[j].is_ascii_alphanumeric())
                    .unwrap_or(self.s.len());
                let w = &self.s[self.i..word_end];
                let v = match w {
                    b"true" => V::Bool(true),
                    b"false" => V::Bool(false),
                    b"null" => V::Null,
                    _ => {
                        let c = text_at(self.s, self.i);
                        return Err((at, format!("unexpected {c}, expected a value")));
                    }
                };
                self.i = word_end;
                v
            }
        };
        Ok(Val { at, v })
    }

    fn string(&mut self) -> PResult<String> {
        let start = self.i;
        self.i += 1; // opening quote
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else {
                return Err((start, "unterminated string".into()));
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\n' => return Err((self.i - 1, "newline inside a string".into())),
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else {
                        return Err((start, "unterminated string".into()));
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xd800..0xdc00).contains(&hi) {
                                if self.s.get(self.i..self.i + 2) != Some(b"\\u") {
                                    return Err((self.i, "unpaired surrogate in \\u escape".into()));
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err((self.i, "unpaired surrogate in \\u escape".into()));
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            char::from_u32(cp).ok_or((self.i, "invalid \\u escape".to_string()))?
                        }
                        _ => return Err((self.i - 2, "invalid escape in string".into())),
                    };
                    let mut b = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                }
                c if c < 0x20 => return Err((self.i - 1, "control character inside a string".into())),
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| (start, "string is not valid UTF-8".into()))
    }

    fn hex4(&mut self) -> PResult<u32> {
        let h = self
            .s
            .get(self.i..self.i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or((self.i, "invalid \\u escape".to_string()))?;
        self.i += 4;
        Ok(h)
    }

    fn array(&mut self, depth: usize) -> PResult<V> {
        self.i += 1;
        let mut items = Vec::new();
        loop {
            self.skip()?;
            if self.s.get(self.i) == Some(&b']') {
                self.i += 1;
                return Ok(V::Arr(items));
            }
            items.push(self.value(depth + 1)?);
            self.skip()?;
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b']') => {}
                _ => {
                    return Err((
                        self.i,
                        format!("expected ',' or ']', found {}", text_at(self.s, self.i)),
                    ))
                }
            }
        }
    }

    fn object(&mut self, depth: usize) -> PResult<V> {
        self.i += 1;
        let mut members: Vec<(String, usize, Val)> = Vec::new();
        loop {
            self.skip()?;
            match self.s.get(self.i) {
                Some(b'}') => {
                    self.i += 1;
                    return Ok(V::Obj(members));
                }
                Some(b'"') => {}
                _ => {
                    return Err((
                        self.i,
                        format!("expected a \"key\" or '}}', found {}", text_at(self.s, self.i)),
                    ))
                }
            }
            let key_at = self.i;
            let key = self.string()?;
            if members.iter().any(|(k, _, _)| *k == key) {
                return Err((key_at, format!("duplicate key {key:?}")));
            }
            self.skip()?;
            if self.s.get(self.i) != Some(&b':') {
                return Err((
                    self.i,
                    format!("expected ':' after the key, found {}", text_at(self.s, self.i)),
                ));
            }
            self.i += 1;
            let v = self.value(depth + 1)?;
            members.push((key, key_at, v));
            self.skip()?;
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b'}') => {}
                _ => {
                    return Err((
                        self.i,
                        format!("expected ',' or '}}', found {}", text_at(self.s, self.i)),
                    ))
                }
            }
        }
    }
}

/// The character at `i` for an error message.
fn text_at(s: &[u8], i: usize) -> String {
    match s.get(i..).and_then(|r| String::from_utf8_lossy(r).chars().next()) {
        None => "end of input".into(),
        Some(c) => format!("{c:?}"),
    }
}

/// Parses HuJSON: JSON plus `//` and `/* */` comments and trailing commas.
fn parse_hujson(text: &str) -> PResult<Val> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    let v = p.value(0)?;
    p.skip()?;
    if p.i < p.s.len() {
        return Err((p.i, format!("unexpected {} after the policy", text_at(p.s, p.i))));
    }
    Ok(v)
}

// ---- the policy ----

/// Something a rule, tag owner or auto-approver names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alias {
    /// `*`: everything.
    All,
    /// `name@`: the user's untagged nodes (stored without the `@`).
    User(String),
    /// `group:x`.
    Group(String),
    /// `tag:x`.
    Tag(String),
    /// A name from `hosts`, already looked up.
    Host(String, Prefix),
    /// An IP or CIDR.
    Prefix(Prefix),
    /// `autogroup:member`: every untagged node.
    Member,
    /// `autogroup:tagged`: every tagged node.
    Tagged,
    /// `autogroup:internet` (destinations only): exit nodes, routed rather than filtered.
    Internet,
}

/// One `acls` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Acl {
    /// IANA protocol numbers; no `proto` means TCP and UDP (headscale v2).
    pub protos: Vec<i64>,
    /// Sources.
    pub src: Vec<Alias>,
    /// Destinations with their port ranges.
    pub dst: Vec<(Alias, Vec<PortRange>)>,
}

/// A parsed and checked policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// `group:x` -> user names (without `@`).
    pub groups: BTreeMap<String, Vec<String>>,
    /// Host names -> prefixes.
    pub hosts: BTreeMap<String, Prefix>,
    /// `tag:x` -> owners.
    pub tag_owners: BTreeMap<String, Vec<Alias>>,
    /// The rules, in file order.
    pub acls: Vec<Acl>,
    /// `autoApprovers.routes`: prefix -> who may have routes inside it approved automatically.
    pub route_approvers: Vec<(Prefix, Vec<Alias>)>,
    /// `autoApprovers.exitNode`.
    pub exit_approvers: Vec<Alias>,
    /// No `acls` section at all: allow everything (headscale: a nil ACL list is allow-all,
    /// while `"acls": []` allows nothing).
    pub no_acls: bool,
}

/// Collects errors with their positions while walking the parsed value.
struct Checker<'a> {
    text: &'a str,
    errs: Vec<PolicyError>,
}

impl Checker<'_> {
    fn err(&mut self, at: usize, msg: impl Into<String>) {
        let (line, col) = line_col(self.text, at);
        self.errs.push(PolicyError {
            line,
            col,
            msg: msg.into(),
        });
    }

    fn obj<'v>(&mut self, v: &'v Val, what: &str) -> &'v [(String, usize, Val)] {
        match &v.v {
            V::Obj(m) => m,
            _ => {
                self.err(v.at, format!("{what} must be an object"));
                &[]
            }
        }
    }

    fn arr<'v>(&mut self, v: &'v Val, what: &str) -> &'v [Val] {
        match &v.v {
            V::Arr(a) => a,
            V::Null => &[],
            _ => {
                self.err(v.at, format!("{what} must be an array"));
                &[]
            }
        }
    }

    fn strings<'v>(&mut self, v: &'v Val, what: &str) -> Vec<(&'v str, usize)> {
        let mut out = Vec::new();
        for item in self.arr(v, what) {
            match &item.v {
                V::Str(s) => out.push((s.as_str(), item.at)),
                _ => self.err(item.at, format!("{what} must hold strings")),
            }
        }
        out
    }
}

fn is_user(s: &str) -> bool {
    s.contains('@')
}

/// Looks like an address rather than a host name (so a typo gets "invalid IP" not "undefined host").
fn looks_like_ip(s: &str) -> bool {
    s.contains('/') || s.contains(':') || s.starts_with(|c: char| c.is_ascii_digit()) && s.contains('.')
}

/// Parses a protocol (`tcp`, `udp`, `icmp`, ... or a number 1-255) into IANA numbers.
fn parse_proto(p: &str) -> Result<Vec<i64>, String> {
    let p = p.to_ascii_lowercase();
    Ok(match p.as_str() {
        "" => vec![TCP, UDP],
        "icmp" => vec![1, 58],
        "igmp" => vec![2],
        "ipv4" | "ip-in-ip" => vec![4],
        "tcp" => vec![TCP],
        "egp" => vec![8],
        "igp" => vec![9],
        "udp" => vec![UDP],
        "gre" => vec![47],
        "esp" => vec![50],
        "ah" => vec![51],
        "ipv6-icmp" => vec![58],
        "sctp" => vec![SCTP],
        "*" => return Err("invalid protocol \"*\": leave proto out, or use a protocol name or number 1-255".into()),
        n if n.bytes().all(|b| b.is_ascii_digit()) && !n.starts_with('0') => match n.parse::<i64>() {
            Ok(v) if (1..=255).contains(&v) => vec![v],
            _ => return Err(format!("protocol number {n} is out of range 1-255")),
        },
        _ => {
            return Err(format!(
                "invalid protocol {p:?}: use tcp, udp, icmp, sctp, ... or a number 1-255"
            ))
        }
    })
}

/// Parses the ports of a destination: `*`, `22`, `80-90`, or a comma list of those.
fn parse_ports(s: &str) -> Result<Vec<PortRange>, String> {
    if s == "*" {
        return Ok(vec![PortRange { first: 0, last: 65535 }]);
    }
    let port = |t: &str| -> Result<u16, String> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid port {t:?}"));
        }
        t.parse::<u16>()
            .map_err(|_| format!("port {t} is out of range 0-65535"))
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(part)?;
                (p, p)
            }
        };
        if a > b {
            return Err(format!("invalid port range {part:?}: first is above last"));
        }
        out.push(PortRange { first: a, last: b });
    }
    Ok(out)
}

impl Policy {
    /// Parses and checks a policy; every problem found is returned, each with its position.
    pub fn parse(text: &str) -> Result<Policy, PolicyErrors> {
        let root = parse_hujson(text).map_err(|(at, msg)| {
            let (line, col) = line_col(text, at);
            PolicyErrors(vec![PolicyError { line, col, msg }])
        })?;
        let mut c = Checker { text, errs: Vec::new() };
        let mut pol = Policy::default();
        let top = c.obj(&root, "the policy");
        // Sections are read in dependency order, whatever their order in the file.
        let section = |name: &str| top.iter().find(|(k, _, _)| k.eq_ignore_ascii_case(name)).map(|m| &m.2);
        for (k, at, _) in top {
            let known = ["groups", "hosts", "tagowners", "acls", "autoapprovers", "ssh"];
            if !known.contains(&k.to_ascii_lowercase().as_str()) {
                c.err(
                    *at,
                    format!("unknown field {k:?} (known: groups, hosts, tagOwners, acls, autoApprovers)"),
                );
            }
        }
        if let Some(g) = section("groups") {
            for (name, at, members) in c.obj(g, "groups") {
                if !name.starts_with("group:") || name.len() <= 6 {
                    c.err(*at, format!("group name {name:?} must look like group:name"));
                    continue;
                }
                let mut users = Vec::new();
                for (m, mat) in c.strings(members, "a group") {
                    if m.starts_with("group:") {
                        c.err(mat, format!("{m:?}: nested groups are not allowed"));
                    } else if !is_user(m) {
                        c.err(mat, format!("{m:?} is not a user: users are written name@"));
                    } else {
                        users.push(m.trim_end_matches('@').to_string());
                    }
                }
                pol.groups.insert(name.clone(), users);
            }
        }
        if let Some(h) = section("hosts") {
            for (name, at, v) in c.obj(h, "hosts") {
                if name.is_empty() || name.contains(['@', ':', '/', '*']) {
                    c.err(*at, format!("invalid host name {name:?}"));
                    continue;
                }
                match &v.v {
                    V::Str(s) => match s.parse::<Prefix>() {
                        Ok(p) => {
                            pol.hosts.insert(name.clone(), p);
                        }
                        Err(_) => c.err(v.at, format!("host {name:?}: invalid IP or CIDR {s:?}")),
                    },
                    _ => c.err(v.at, format!("host {name:?} must be an IP or CIDR string")),
                }
            }
        }
        // Tag names first, so owners may name other tags in any order.
        let tag_section = section("tagOwners");
        if let Some(t) = tag_section {
            for (name, at, _) in c.obj(t, "tagOwners") {
                if !name.starts_with("tag:") || name.len() <= 4 {
                    c.err(*at, format!("tag name {name:?} must look like tag:name"));
                } else {
                    pol.tag_owners.insert(name.clone(), Vec::new());
                }
            }
        }
        if let Some(t) = tag_section {
            for (name, _, owners) in c.obj(t, "tagOwners") {
                let mut list = Vec::new();
                for (o, at) in c.strings(owners, "tag owners") {
                    if let Some(a) = pol.owner(&mut c, o, at) {
                        list.push(a);
                    }
                }
                if let Some(slot) = pol.tag_owners.get_mut(name) {
                    *slot = list;
                }
            }
        }
        pol.no_acls = section("acls").is_none();
        if let Some(a) = section("acls") {
            for entry in c.arr(a, "acls") {
                if let Some(acl) = pol.acl(&mut c, entry) {
                    pol.acls.push(acl);
                }
            }
        }
        if let Some(aa) = section("autoApprovers") {
            for (k, at, v) in c.obj(aa, "autoApprovers") {
                match k.to_ascii_lowercase().as_str() {
                    "routes" => {
                        for (prefix, pat, owners) in c.obj(v, "autoApprovers.routes") {
                            let Ok(p) = prefix.parse::<Prefix>() else {
                                c.err(*pat, format!("autoApprovers.routes: invalid CIDR {prefix:?}"));
                                continue;
                            };
                            let mut list = Vec::new();
                            for (o, oat) in c.strings(owners, "route approvers") {
                                if let Some(a) = pol.owner(&mut c, o, oat) {
                                    list.push(a);
                                }
                            }
                            pol.route_approvers.push((p, list));
                        }
                    }
                    "exitnode" => {
                        for (o, oat) in c.strings(v, "exitNode approvers") {
                            if let Some(a) = pol.owner(&mut c, o, oat) {
                                pol.exit_approvers.push(a);
                            }
                        }
                    }
                    _ => c.err(
                        *at,
                        format!("unknown field {k:?} in autoApprovers (known: routes, exitNode)"),
                    ),
                }
            }
        }
        if c.errs.is_empty() {
            Ok(pol)
        } else {
            Err(PolicyErrors(c.errs))
        }
    }

    /// A tag owner or auto-approver: a user, group or tag.
    fn owner(&self, c: &mut Checker, s: &str, at: usize) -> Option<Alias> {
        let a = self.alias(c, s, at)?;
        match a {
            Alias::User(_) | Alias::Group(_) | Alias::Tag(_) => Some(a),
            _ => {
                c.err(
                    at,
                    format!("{s:?} cannot own tags or approve routes: use a user (name@), group: or tag:"),
                );
                None
            }
        }
    }

    /// Parses one alias and checks that what it names is defined.
    fn alias(&self, c: &mut Checker, s: &str, at: usize) -> Option<Alias> {
        let a = if s == "*" {
            Alias::All
        } else if let Some(g) = s.strip_prefix("autogroup:") {
            match g {
                "member" => Alias::Member,
                "tagged" => Alias::Tagged,
                "internet" => Alias::Internet,
                _ => {
                    c.err(
                        at,
                        format!(
                            "{s:?}: supported autogroups are autogroup:member, autogroup:tagged, autogroup:internet"
                        ),
                    );
                    return None;
                }
            }
        } else if s.starts_with("group:") {
            if !self.groups.contains_key(s) {
                c.err(at, format!("group {s:?} is not defined in groups"));
                return None;
            }
            Alias::Group(s.to_string())
        } else if s.starts_with("tag:") {
            if !self.tag_owners.contains_key(s) {
                c.err(at, format!("tag {s:?} is not defined in tagOwners"));
                return None;
            }
            Alias::Tag(s.to_string())
        } else if is_user(s) {
            Alias::User(s.trim_end_matches('@').to_string())
        } else if let Some(p) = self.hosts.get(s) {
            Alias::Host(s.to_string(), *p)
        } else if looks_like_ip(s) {
            match s.parse::<Prefix>() {
                Ok(p) => Alias::Prefix(p),
                Err(_) => {
                    c.err(at, format!("invalid IP or CIDR {s:?}"));
                    return None;
                }
            }
        } else {
            c.err(
                at,
                format!("host {s:?} is not defined in hosts (users are written name@)"),
            );
            return None;
        };
        Some(a)
    }

    fn acl(&self, c: &mut Checker, entry: &Val) -> Option<Acl> {
        let members = c.obj(entry, "an acls entry");
        let mut action = None;
        let mut acl = Acl {
            protos: vec![TCP, UDP],
            src: Vec::new(),
            dst: Vec::new(),
        };
        let mut src_seen = false;
        let mut dst_seen = false;
        let mut ok = true;
        let mut specific_ports_at = None;
        let mut proto_named = None;
        let errs_before = c.errs.len();
        for (k, at, v) in members {
            if k.starts_with('#') {
                continue;
            }
            match k.to_ascii_lowercase().as_str() {
                "action" => match &v.v {
                    V::Str(s) if s == "accept" => action = Some(()),
                    _ => {
                        c.err(v.at, "action must be \"accept\"");
                        ok = false;
                    }
                },
                "proto" => {
                    let text = match &v.v {
                        V::Str(s) => s.clone(),
                        V::Num(n) => n.clone(),
                        _ => {
                            c.err(v.at, "proto must be a string");
                            ok = false;
                            continue;
                        }
                    };
                    match parse_proto(&text) {
                        Ok(p) => {
                            if !text.is_empty() {
                                proto_named = Some((text, v.at));
                            }
                            acl.protos = p;
                        }
                        Err(e) => {
                            c.err(v.at, e);
                            ok = false;
                        }
                    }
                }
                "src" => {
                    src_seen = true;
                    for (s, sat) in c.strings(v, "src") {
                        match self.alias(c, s, sat) {
                            Some(Alias::Internet) => c.err(sat, "autogroup:internet can only be a destination"),
                            Some(a) => acl.src.push(a),
                            None => {}
                        }
                    }
                }
                "dst" => {
                    dst_seen = true;
                    for (s, sat) in c.strings(v, "dst") {
                        let Some((host, ports)) = s.rsplit_once(':') else {
                            c.err(
                                sat,
                                format!("destination {s:?} must be alias:ports (e.g. tag:web:80,443 or *:*)"),
                            );
                            continue;
                        };
                        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
                        let ports = match parse_ports(ports) {
                            Ok(p) => p,
                            Err(e) => {
                                c.err(sat, format!("destination {s:?}: {e}"));
                                continue;
                            }
                        };
                        if !(ports.len() == 1 && ports[0].first == 0 && ports[0].last == 65535) {
                            specific_ports_at.get_or_insert(sat);
                        }
                        if let Some(a) = self.alias(c, host, sat) {
                            acl.dst.push((a, ports));
                        }
                    }
                }
                _ => {
                    c.err(
                        *at,
                        format!("unknown field {k:?} in an acls entry (known: action, src, dst, proto)"),
                    );
                    ok = false;
                }
            }
        }
        if matches!(entry.v, V::Obj(_)) {
            if action.is_none() && ok {
                c.err(entry.at, "acls entry without \"action\": \"accept\"");
            }
            if !src_seen {
                c.err(entry.at, "acls entry without src");
            }
            if !dst_seen {
                c.err(entry.at, "acls entry without dst");
            }
        }
        if let (Some((name, _)), Some(at)) = (&proto_named, specific_ports_at) {
            if !acl.protos.iter().all(|p| [TCP, UDP, SCTP].contains(p)) {
                c.err(at, format!("protocol {name:?} has no ports: use alias:*"));
            }
        }
        (c.errs.len() == errs_before).then_some(acl)
    }

    /// Routes of `announced` this node may have approved without an admin (autoApprovers):
    /// a route inside an approver prefix whose owners include the node, an exit route when
    /// `exitNode` includes it.
    pub fn auto_approved(&self, node: &Member, announced: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for r in announced {
            let Ok(p) = r.parse::<Prefix>() else { continue };
            let ok = if p.is_default() {
                self.exit_approvers.iter().any(|a| self.names(a, node))
            } else {
                self.route_approvers.iter().any(|(space, owners)| {
                    space.bits() <= p.bits() && space.contains(p.addr()) && owners.iter().any(|a| self.names(a, node))
                })
            };
            if ok {
                out.push(r.clone());
            }
        }
        out
    }

    /// Whether alias `a` names `node` itself (users, groups, tags, autogroups, addresses).
    fn names(&self, a: &Alias, node: &Member) -> bool {
        let tagged = !node.tags.is_empty();
        match a {
            Alias::All => true,
            Alias::User(u) => !tagged && node.user == *u,
            Alias::Group(g) => !tagged && self.groups.get(g).is_some_and(|us| us.contains(&node.user)),
            Alias::Tag(t) => node.tags.contains(t),
            Alias::Member => !tagged,
            Alias::Tagged => tagged,
            Alias::Host(_, p) | Alias::Prefix(p) => node.ips.iter().any(|ip| p.contains(*ip)),
            Alias::Internet => false,
        }
    }

    /// The addresses alias `a` stands for, given the nodes.
    fn resolve(&self, a: &Alias, nodes: &[Member]) -> Set {
        let mut s = Set::default();
        match a {
            Alias::All => s.all = true,
            Alias::Internet => s.internet = true,
            Alias::Host(_, p) | Alias::Prefix(p) => {
                s.nets.push(*p);
                // Naming one address of a node means the node: add its other family too.
                for n in nodes.iter().filter(|n| n.ips.iter().any(|ip| p.contains(*ip))) {
                    s.add_node(n);
                }
            }
            _ => {
                for n in nodes.iter().filter(|n| self.names(a, n)) {
                    s.add_node(n);
                }
            }
        }
        s.nets.sort_unstable();
        s.nets.dedup();
        s
    }

    /// Resolves every rule against `nodes` (headscale `compileFilterRules`).
    pub fn compile(&self, nodes: &[Member]) -> Compiled {
        if self.no_acls {
            return Compiled {
                grants: vec![Grant {
                    src: Set {
                        all: true,
                        ..Set::default()
                    },
                    protos: Vec::new(),
                    dst: vec![(
                        Set {
                            all: true,
                            ..Set::default()
                        },
                        vec![PortRange { first: 0, last: 65535 }],
                    )],
                }],
            };
        }
        let mut grants = Vec::with_capacity(self.acls.len());
        for acl in &self.acls {
            let mut src = Set::default();
            for a in &acl.src {
                src.union(self.resolve(a, nodes));
            }
            if src.is_empty() {
                continue;
            }
            let dst = acl
                .dst
                .iter()
                .map(|(a, ports)| (self.resolve(a, nodes), ports.clone()))
                .collect();
            grants.push(Grant {
                src,
                protos: acl.protos.clone(),
                dst,
            });
        }
        Compiled { grants }
    }
}

/// A node as the policy sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Member {
    /// Node id.
    pub id: u64,
    /// Owner's user name.
    pub user: String,
    /// ACL tags (`tag:x`).
    pub tags: Vec<String>,
    /// Tailnet addresses.
    pub ips: Vec<IpAddr>,
    /// Approved and announced subnet routes (not exit routes).
    pub routes: Vec<Prefix>,
    /// Serves approved exit routes.
    pub exit: bool,
}

/// A set of addresses: everything, or some prefixes (plus the `autogroup:internet` marker).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Set {
    all: bool,
    internet: bool,
    nets: Vec<Prefix>,
}

impl Set {
    fn add_node(&mut self, n: &Member) {
        self.nets.extend(n.ips.iter().map(|ip| Prefix::host(*ip)));
    }

    fn union(&mut self, o: Set) {
        self.all |= o.all;
        self.internet |= o.internet;
        self.nets.extend(o.nets);
    }

    fn is_empty(&self) -> bool {
        !self.all && self.nets.is_empty()
    }

    fn contains_any(&self, ips: &[IpAddr]) -> bool {
        self.all || ips.iter().any(|ip| self.nets.iter().any(|p| p.contains(*ip)))
    }

    fn overlaps_any(&self, routes: &[Prefix]) -> bool {
        !routes.is_empty() && (self.all || routes.iter().any(|r| self.nets.iter().any(|p| p.overlaps(r))))
    }
}

/// One rule resolved to addresses.
#[derive(Debug, Clone, PartialEq)]
struct Grant {
    src: Set,
    protos: Vec<i64>,
    dst: Vec<(Set, Vec<PortRange>)>,
}

/// The policy resolved against the current nodes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    grants: Vec<Grant>,
}

impl Compiled {
    /// The FilterRules `node` receives: the rules with a destination that is one of its
    /// addresses or overlaps a subnet route it serves, reduced to those destinations
    /// (headscale `ReduceFilterRules`).
    pub fn filter_for(&self, node: &Member) -> Vec<FilterRule> {
        let mut out = Vec::new();
        for g in &self.grants {
            let mut dst_ports = Vec::new();
            for (set, ports) in &g.dst {
                if set.all {
                    dst_ports.extend(ports.iter().map(|p| NetPortRange {
                        ip: "*".into(),
                        ports: *p,
                    }));
                    continue;
                }
                for net in &set.nets {
                    let mine =
                        node.ips.iter().any(|ip| net.contains(*ip)) || node.routes.iter().any(|r| net.overlaps(r));
                    if mine {
                        dst_ports.extend(ports.iter().map(|p| NetPortRange {
                            ip: net.to_string(),
                            ports: *p,
                        }));
                    }
                }
            }
            if dst_ports.is_empty() {
                continue;
            }
            let src_ips = if g.src.all {
                vec!["*".to_string()]
            } else {
                g.src.nets.iter().map(|p| p.to_string()).collect()
            };
            out.push(FilterRule {
                src_ips,
                dst_ports,
                ip_proto: g.protos.clone(),
                ..Default::default()
            });
        }
        out
    }

    /// Whether `a` may open connections to `b` or the subnets `b` serves (headscale
    /// `CanAccess`); `autogroup:internet` reaches exit nodes.
    pub fn can_access(&self, a: &Member, b: &Member) -> bool {
        self.grants.iter().any(|g| {
            g.src.contains_any(&a.ips)
                && g.dst
                    .iter()
                    .any(|(d, _)| d.contains_any(&b.ips) || d.overlaps_any(&b.routes) || d.internet && b.exit)
        })
    }

    /// Whether `viewer` gets `peer` in its netmap: either may reach the other.
    pub fn visible(&self, viewer: &Member, peer: &Member) -> bool {
        self.can_access(viewer, peer) || self.can_access(peer, viewer)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::dataplane::filter::{Filter, LocalNets, Rules, Verdict};

    fn errs(text: &str) -> Vec<PolicyError> {
        Policy::parse(text).expect_err("policy should be refused").0
    }

    fn member(id: u64, user: &str, tags: &[&str]) -> Member {
        Member {
            id,
            user: user.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ips: vec![
                format!("100.64.0.{id}").parse().unwrap(),
                format!("fd7a:115c:a1e0::{id}").parse().unwrap(),
            ],
            routes: vec![],
            exit: false,
        }
    }

    #[test]
    fn hujson_comments_and_trailing_commas() {
        let p = Policy::parse(
            r#"
            // a line comment
            {
              /* a block
                 comment */
              "groups": { "group:admins": ["alice@", "bob@",], },
              "acls": [
                { "action": "accept", "src": ["group:admins"], "dst": ["*:22"], }, // trailing
              ],
            }
            "#,
        )
        .unwrap();
        assert_eq!(p.groups["group:admins"], vec!["alice", "bob"]);
        assert_eq!(p.acls.len(), 1);
        assert_eq!(p.acls[0].dst[0].1, vec![PortRange { first: 22, last: 22 }]);
        // A `//` inside a string is text, not a comment.
        let p = Policy::parse(
            r##"{"hosts": {"h": "10.0.0.1"}, "acls": [{"action": "accept", "src": ["h"], "dst": ["h:*"], "#c": "a // b"}]}"##,
        )
        .unwrap();
        assert_eq!(p.hosts["h"], "10.0.0.1/32".parse().unwrap());
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let e = errs("{\n  \"acls\": [\n    {\"action\": \"accept\" \"src\": []}\n  ]\n}");
        assert_eq!((e[0].line, e[0].col), (3, 25), "{e:?}");
        assert!(e[0].msg.contains("expected ',' or '}'"), "{}", e[0].msg);
        let e = errs("{\n\n  \"acls\": [\n");
        assert_eq!(e[0].line, 4, "{e:?}");
        let e = errs("{ /* never closed");
        assert_eq!((e[0].line, e[0].col), (1, 3));
        assert!(e[0].msg.contains("unterminated"));
        let e = errs("{\"a\": 1} x");
        assert!(e[0].msg.contains("after the policy"));
        let e = errs("{\"groups\": {}, \"groups\": {}}");
        assert!(e[0].msg.contains("duplicate"));
        // Never panics on deep nesting.
        let deep = "[".repeat(10_000);
        assert!(errs(&deep)[0].msg.contains("nested too deeply"));
    }

    #[test]
    fn semantic_errors_name_the_problem_and_its_line() {
        let text = r#"{
  "groups": {"group:a": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["group:nope"], "dst": ["*:22"]},
    {"action": "deny", "src": ["*"], "dst": ["*:*"]},
    {"action": "accept", "src": ["tag:x"], "dst": ["server:80"]},
    {"action": "accept", "src": ["*"], "dst": ["*:99999"]},
    {"action": "accept", "src": ["10.0.0.0/33"], "dst": ["*:*"]},
    {"action": "accept", "src": ["*"], "dst": ["*:*"], "port": 1},
    {"action": "accept", "proto": "icmp", "src": ["*"], "dst": ["*:22"]},
    {"action": "accept", "proto": "bogus", "src": ["*"], "dst": ["*:*"]},
  ],
  "autoApprovers": {"routes": {"10.0.0.0/40": ["alice@"]}},
  "tests": [],
}"#;
        let e = errs(text);
        let find = |needle: &str| {
            e.iter()
                .find(|x| x.msg.contains(needle))
                .unwrap_or_else(|| panic!("no error with {needle:?} in {e:#?}"))
                .line
        };
        assert_eq!(find("group \"group:nope\" is not defined"), 4);
        assert_eq!(find("action must be \"accept\""), 5);
        assert_eq!(find("tag \"tag:x\" is not defined"), 6);
        assert_eq!(find("host \"server\" is not defined"), 6);
        assert_eq!(find("out of range"), 7);
        assert_eq!(find("invalid IP or CIDR \"10.0.0.0/33\""), 8);
        assert_eq!(find("unknown field \"port\""), 9);
        assert_eq!(find("has no ports"), 10);
        assert_eq!(find("invalid protocol \"bogus\""), 11);
        assert_eq!(find("invalid CIDR \"10.0.0.0/40\""), 13);
        assert_eq!(find("unknown field \"tests\""), 14);
        let shown = PolicyErrors(e.clone()).to_string();
        assert!(
            shown.lines().count() == e.len() && shown.starts_with("line "),
            "{shown}"
        );
    }

    #[test]
    fn ports_and_protocols() {
        assert_eq!(
            parse_ports("22,80-90").unwrap(),
            vec![PortRange { first: 22, last: 22 }, PortRange { first: 80, last: 90 }]
        );
        assert!(parse_ports("90-80").is_err());
        assert!(parse_ports("").is_err());
        assert!(parse_ports("2a").is_err());
        assert!(parse_ports("65536").is_err());
        assert_eq!(parse_proto("").unwrap(), vec![TCP, UDP]);
        assert_eq!(parse_proto("ICMP").unwrap(), vec![1, 58]);
        assert_eq!(parse_proto("47").unwrap(), vec![47]);
        assert!(parse_proto("047").is_err() && parse_proto("256").is_err() && parse_proto("*").is_err());
    }

    #[test]
    fn compile_reduces_rules_to_the_destination_node() {
        let p = Policy::parse(
            r#"{
              "groups": {"group:ops": ["alice@"]},
              "tagOwners": {"tag:srv": ["group:ops"]},
              "hosts": {"lan": "192.168.1.0/24"},
              "acls": [
                {"action": "accept", "src": ["group:ops"], "dst": ["tag:srv:22"]},
                {"action": "accept", "proto": "udp", "src": ["autogroup:member"], "dst": ["lan:53"]},
              ],
            }"#,
        )
        .unwrap();
        let alice = member(1, "alice", &[]);
        let srv = member(2, "bob", &["tag:srv"]);
        let mut router = member(3, "bob", &[]);
        router.routes = vec!["192.168.1.0/24".parse().unwrap()];
        let nodes = [alice.clone(), srv.clone(), router.clone()];
        let c = p.compile(&nodes);
        let f = c.filter_for(&srv);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].src_ips, vec!["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]);
        assert_eq!(f[0].dst_ports.len(), 2);
        assert_eq!(f[0].dst_ports[0].ip, "100.64.0.2/32");
        assert_eq!(f[0].ip_proto, vec![TCP, UDP]);
        // The subnet router gets the LAN rule; untagged nodes of every user are members.
        let f = c.filter_for(&router);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].dst_ports[0].ip, "192.168.1.0/24");
        assert_eq!(f[0].ip_proto, vec![UDP]);
        assert!(f[0].src_ips.contains(&"100.64.0.3/32".to_string()));
        assert!(
            !f[0].src_ips.contains(&"100.64.0.2/32".to_string()),
            "tagged is not a member"
        );
        // Alice is a destination of nothing.
        assert!(c.filter_for(&alice).is_empty());
        // Visibility: alice<->srv, alice/router<->router (LAN), srv sees router (it is a member? no:
        // srv is tagged, so it reaches no one and no one reaches it but alice).
        assert!(c.visible(&alice, &srv) && c.visible(&srv, &alice));
        assert!(c.visible(&alice, &router));
        assert!(!c.visible(&srv, &router) && !c.visible(&router, &srv));
    }

    #[test]
    fn wildcard_and_internet() {
        let p = Policy::parse(
            r#"{"acls": [
              {"action": "accept", "src": ["*"], "dst": ["*:*"]},
              {"action": "accept", "src": ["alice@"], "dst": ["autogroup:internet:*"]},
            ]}"#,
        )
        .unwrap();
        let a = member(1, "alice", &[]);
        let mut exit = member(2, "bob", &[]);
        exit.exit = true;
        let c = p.compile(&[a.clone(), exit.clone()]);
        let f = c.filter_for(&a);
        assert_eq!(
            (f[0].src_ips.clone(), f[0].dst_ports.clone()),
            (vec!["*".to_string()], FilterRule::allow_all()[0].dst_ports.clone())
        );
        assert_eq!(f[0].ip_proto, vec![TCP, UDP], "no proto: TCP and UDP (headscale v2)");
        // No acls section at all is allow-all, as in headscale; an empty one allows nothing.
        let open = Policy::parse("{}").unwrap().compile(std::slice::from_ref(&a));
        assert_eq!(open.filter_for(&a), FilterRule::allow_all());
        let shut = Policy::parse(r#"{"acls": []}"#)
            .unwrap()
            .compile(&[a.clone(), exit.clone()]);
        assert!(shut.filter_for(&a).is_empty() && !shut.visible(&a, &exit));
        let only_internet =
            Policy::parse(r#"{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["autogroup:internet:*"]}]}"#)
                .unwrap()
                .compile(&[a.clone(), exit.clone()]);
        assert!(
            only_internet.filter_for(&exit).is_empty(),
            "internet is routed, not filtered"
        );
        assert!(only_internet.visible(&a, &exit));
        exit.exit = false;
        assert!(!only_internet.visible(&a, &exit));
    }

    #[test]
    fn auto_approvers() {
        let p = Policy::parse(
            r#"{
              "groups": {"group:net": ["alice@"]},
              "tagOwners": {"tag:router": ["alice@"]},
              "autoApprovers": {
                "routes": {"10.0.0.0/8": ["tag:router"], "192.168.0.0/16": ["group:net"]},
                "exitNode": ["tag:router"],
              },
            }"#,
        )
        .unwrap();
        let routes: Vec<String> = [
            "10.1.0.0/16",
            "192.168.1.0/24",
            "172.16.0.0/12",
            "0.0.0.0/0",
            "::/0",
            "10.0.0.0/7",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let tagged = member(1, "bob", &["tag:router"]);
        assert_eq!(
            p.auto_approved(&tagged, &routes),
            vec!["10.1.0.0/16", "0.0.0.0/0", "::/0"]
        );
        let alice = member(2, "alice", &[]);
        assert_eq!(p.auto_approved(&alice, &routes), vec!["192.168.1.0/24"]);
        assert!(p.auto_approved(&member(3, "carol", &[]), &routes).is_empty());
    }

    // ---- property: compiled rules in the client's filter == direct evaluation ----

    const USERS: [&str; 2] = ["alice", "bob"];
    const TAGS: [&str; 2] = ["tag:a", "tag:b"];

    /// Four nodes: alice, bob, bob tagged tag:a, alice tagged tag:b.
    fn world() -> Vec<Member> {
        vec![
            member(1, "alice", &[]),
            member(2, "bob", &[]),
            member(3, "bob", &["tag:a"]),
            member(4, "alice", &["tag:b"]),
        ]
    }

    fn alias_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("*".to_string()),
            (0..USERS.len()).prop_map(|i| format!("{}@", USERS[i])),
            Just("group:g".to_string()),
            (0..TAGS.len()).prop_map(|i| TAGS[i].to_string()),
            (1u8..=4).prop_map(|i| format!("100.64.0.{i}")),
            Just("100.64.0.0/30".to_string()),
            Just("h".to_string()),
            Just("autogroup:member".to_string()),
            Just("autogroup:tagged".to_string()),
        ]
    }

    fn ports_text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("*".to_string()),
            (1u16..6).prop_map(|p| p.to_string()),
            (1u16..6, 0u16..3).prop_map(|(a, n)| format!("{a}-{}", a + n)),
            (1u16..6, 1u16..6).prop_map(|(a, b)| format!("{a},{b}")),
        ]
    }

    #[derive(Debug, Clone)]
    struct RefAcl {
        proto: Option<&'static str>,
        src: Vec<String>,
        dst: Vec<(String, String)>,
    }

    fn acl_strategy() -> impl Strategy<Value = RefAcl> {
        (
            prop_oneof![Just(None), Just(Some("tcp")), Just(Some("udp"))],
            proptest::collection::vec(alias_text(), 1..3),
            proptest::collection::vec((alias_text(), ports_text()), 1..3),
        )
            .prop_map(|(proto, src, dst)| RefAcl { proto, src, dst })
    }

    fn policy_text(acls: &[RefAcl]) -> String {
        let entries: Vec<String> = acls
            .iter()
            .map(|a| {
                let proto = a.proto.map(|p| format!("\"proto\": \"{p}\", ")).unwrap_or_default();
                let src: Vec<String> = a.src.iter().map(|s| format!("\"{s}\"")).collect();
                let dst: Vec<String> = a.dst.iter().map(|(h, p)| format!("\"{h}:{p}\"")).collect();
                format!(
                    "{{\"action\": \"accept\", {proto}\"src\": [{}], \"dst\": [{}]}}",
                    src.join(", "),
                    dst.join(", ")
                )
            })
            .collect();
        format!(
            "{{\"groups\": {{\"group:g\": [\"bob@\"]}}, \"hosts\": {{\"h\": \"100.64.0.3\"}},\n\"tagOwners\": {{\"tag:a\": [\"bob@\"], \"tag:b\": []}},\n\"acls\": [{}]}}",
            entries.join(",\n")
        )
    }

    /// The reference: does alias text `a` name node `n`? Written from the documented meaning,
    /// independently of `resolve`.
    fn ref_names(a: &str, n: &Member) -> bool {
        let tagged = !n.tags.is_empty();
        let v4 = n.ips[0].to_string();
        match a {
            "*" => true,
            "group:g" => !tagged && n.user == "bob",
            "autogroup:member" => !tagged,
            "autogroup:tagged" => tagged,
            "h" => v4 == "100.64.0.3",
            "100.64.0.0/30" => ["100.64.0.1", "100.64.0.2", "100.64.0.3"].contains(&v4.as_str()),
            t if t.starts_with("tag:") => n.tags.iter().any(|x| x == t),
            u if u.ends_with('@') => !tagged && n.user == u.trim_end_matches('@'),
            ip => v4 == ip,
        }
    }

    fn ref_port(spec: &str, port: u16) -> bool {
        spec == "*"
            || spec.split(',').any(|part| match part.split_once('-') {
                Some((a, b)) => a.parse::<u16>().unwrap() <= port && port <= b.parse::<u16>().unwrap(),
                None => part.parse::<u16>().unwrap() == port,
            })
    }

    fn ref_allows(acls: &[RefAcl], src: &Member, dst: &Member, udp: bool, port: u16) -> bool {
        acls.iter().any(|a| {
            let proto_ok = match a.proto {
                None => true,
                Some(p) => (p == "udp") == udp,
            };
            proto_ok
                && a.src.iter().any(|s| ref_names(s, src))
                && a.dst.iter().any(|(h, p)| ref_names(h, dst) && ref_port(p, port))
        })
    }

    /// An IPv4 TCP SYN or UDP datagram.
    fn packet(src: IpAddr, dst: IpAddr, udp: bool, dport: u16) -> Vec<u8> {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
            unreachable!()
        };
        let l4 = if udp { 8 } else { 20 };
        let total = 20 + l4;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = if udp { 17 } else { 6 };
        p[12..16].copy_from_slice(&s.octets());
        p[16..20].copy_from_slice(&d.octets());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        if udp {
            p[24..26].copy_from_slice(&8u16.to_be_bytes());
        } else {
            p[32] = 0x50; // data offset 5 words
            p[33] = 0x02; // SYN
        }
        p
    }

    proptest! {
        #[test]
        fn compiled_filter_matches_reference(
            acls in proptest::collection::vec(acl_strategy(), 0..4),
            packets in proptest::collection::vec((0usize..4, 0usize..4, any::<bool>(), 0u16..8), 1..12),
        ) {
            let text = policy_text(&acls);
            let pol = Policy::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            let nodes = world();
            let compiled = pol.compile(&nodes);
            for (si, di, udp, port) in packets {
                let (src, dst) = (&nodes[si], &nodes[di]);
                let rules = compiled.filter_for(dst);
                let mut f = Filter::new(7);
                f.set_rules(Rules::compile(&rules));
                f.set_local(LocalNets::new(dst.ips.iter().map(|ip| Prefix::host(*ip))));
                let got = f.check_inbound(&packet(src.ips[0], dst.ips[0], udp, port)) == Verdict::Accept;
                let want = ref_allows(&acls, src, dst, udp, port);
                prop_assert_eq!(got, want, "{} -> {} udp={} port={}\n{}\n{:?}", src.id, dst.id, udp, port, text, rules);
                // Whoever may send is a visible peer, both ways.
                if want && si != di {
                    prop_assert!(compiled.visible(src, dst) && compiled.visible(dst, src));
                }
            }
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,200}") {
            let _ = Policy::parse(&s);
        }
    }
}
