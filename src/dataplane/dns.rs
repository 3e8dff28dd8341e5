//! MagicDNS: the resolver at the Tailscale service address (`100.100.100.100`,
//! `fd7a:115c:a1e0::53`), answered inside the data plane instead of going to WireGuard.
//!
//! Mirrors the roles of tailscale `net/dns/resolver/tsdns.go` (`Resolver.Query`: local names,
//! reverse lookups, split DNS forwarding) and `ipn/ipnlocal/node_backend.go`
//! (`dnsConfigForNetmap`: names from the netmap). Three layers, all pure:
//!
//! * **Codec**: the subset of RFC 1035 we need, by hand (no crate): a query's header and first
//!   question (names may use compression pointers; loops and overlong names are errors), and
//!   responses with A, AAAA and PTR answers whose owner name points back at the question.
//!
//!   ```text
//!   header  | id u16 | QR opcode(4) AA TC RD | RA Z(3) rcode(4) | qd u16 | an u16 | ns u16 | ar u16 |
//!   question| name (labels, 0xC0 pointers) | qtype u16 | qclass u16 |
//!   answer  | 0xC00C | type u16 | class u16 | ttl u32 | rdlen u16 | rdata |
//!   ```
//!
//! * **Answers** ([`Resolver`], built from the netmap): `<host>.<suffix>` and bare `<host>` of
//!   every node (A/AAAA), PTR for tailnet addresses (`in-addr.arpa` of 100.64.0.0/10,
//!   `ip6.arpa` of fd7a:115c:a1e0::/48), `ExtraRecords`, NXDOMAIN for anything else inside
//!   the MagicDNS zones. Other names go to the split-DNS resolvers of the longest matching route,
//!   else to the system resolvers ([`Decision::Forward`]), which the shell reads from
//!   `/etc/resolv.conf` ([`parse_resolv_conf`]) and never writes.
//! * **Packets**: IPv4/IPv6 + UDP in and out, and a stateless TCP responder small enough to
//!   write by hand (see [`handle_tcp`]); smoltcp would have cost a dependency and its TCP socket
//!   code for one request/response exchange per connection.
//!
//! The caller (the engine) supplies the packets read from the TUN, a random secret for the
//! TCP initial sequence numbers, and performs the forwards (marked sockets, bounded, timed).
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    control::netmap::Netmap,
    wire::{
        prefix::{is_tailnet_ip, TAILSCALE_SERVICE_IP, TAILSCALE_SERVICE_IPV6},
        tailcfg::DnsConfig,
    },
};

/// DNS port.
pub const PORT: u16 = 53;
/// TTL of MagicDNS answers (Go `tsdns.go` `defaultTTL`: 600 s).
pub const TTL: u32 = 600;

/// Record type A (IPv4 address).
pub const TYPE_A: u16 = 1;
/// Record type PTR (reverse lookup).
pub const TYPE_PTR: u16 = 12;
/// Record type AAAA (IPv6 address).
pub const TYPE_AAAA: u16 = 28;
/// Query type ANY.
pub const TYPE_ANY: u16 = 255;
/// Class IN.
pub const CLASS_IN: u16 = 1;

/// Response code: no error.
pub const RCODE_NOERROR: u8 = 0;
/// Response code: the query could not be read.
pub const RCODE_FORMERR: u8 = 1;
/// Response code: no upstream answered.
pub const RCODE_SERVFAIL: u8 = 2;
/// Response code: no such name.
pub const RCODE_NXDOMAIN: u8 = 3;
/// Response code: opcode not implemented.
pub const RCODE_NOTIMP: u8 = 4;

/// Longest name in wire form (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;
/// Compression pointers followed per name before it counts as a loop.
const MAX_POINTERS: usize = 16;

/// Why a message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Shorter than its header or a field says.
    TooShort,
    /// A label or pointer is malformed, loops, or the name is too long.
    BadName,
}

// ---------------------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------------------

/// The parts of a DNS header we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    /// Flags word: QR(15) opcode(11-14) AA(10) TC(9) RD(8) RA(7) rcode(0-3).
    pub flags: u16,
    pub qdcount: u16,
}

impl Header {
    /// Reads the 12-byte header.
    pub fn parse(msg: &[u8]) -> Result<Header, Error> {
        let b = msg.get(..12).ok_or(Error::TooShort)?;
        Ok(Header {
            id: u16::from_be_bytes([b[0], b[1]]),
            flags: u16::from_be_bytes([b[2], b[3]]),
            qdcount: u16::from_be_bytes([b[4], b[5]]),
        })
    }

    /// A response rather than a query.
    pub fn is_response(&self) -> bool {
        self.flags & 0x8000 != 0
    }

    /// The opcode (0 = standard query).
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0xf) as u8
    }

    /// The response code.
    pub fn rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }
}

/// A question: the name as sent (labels joined with `.`, no trailing dot), type and class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// Reads the name at `pos`, following compression pointers. Returns the name (labels joined
/// by `.`, as sent) and the position just after the name where it started (after the first
/// pointer, if any).
pub fn read_name(msg: &[u8], mut pos: usize) -> Result<(String, usize), Error> {
    let mut name = String::new();
    let mut end = None;
    let mut jumps = 0;
    let mut wire_len = 1;
    loop {
        let len = *msg.get(pos).ok_or(Error::TooShort)?;
        match len >> 6 {
            0 if len == 0 => {
                return Ok((name, end.unwrap_or(pos + 1)));
            }
            0 => {
                let label = msg.get(pos + 1..pos + 1 + usize::from(len)).ok_or(Error::TooShort)?;
                wire_len += 1 + label.len();
                // Only printable ASCII without '.' and '\\': anything else never names one of
                // ours, and keeping the text form unambiguous keeps matching simple.
                if wire_len > MAX_NAME || !label.iter().all(|&c| c.is_ascii_graphic() && c != b'.' && c != b'\\') {
                    return Err(Error::BadName);
                }
                if !name.is_empty() {
                    name.push('.');
                }
                name.extend(label.iter().map(|&c| char::from(c)));
                pos += 1 + label.len();
            }
            3 => {
                let lo = *msg.get(pos + 1).ok_or(Error::TooShort)?;
                jumps += 1;
                if jumps > MAX_POINTERS {
                    return Err(Error::BadName);
                }
                end.get_or_insert(pos + 2);
                pos = usize::from(u16::from_be_bytes([len & 0x3f, lo]));
            }
            // 0b01/0b10: extended label types (RFC 6891 retired them).
            _ => return Err(Error::BadName),
        }
    }
}

/// Appends `name` (dot-separated, trailing dot optional) in wire form, uncompressed.
/// Returns `false` (appending nothing) for an empty label or one longer than 63 bytes.
pub fn write_name(out: &mut Vec<u8>, name: &str) -> bool {
    let name = name.trim_end_matches('.');
    let start = out.len();
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                out.truncate(start);
                return false;
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    if out.len() - start > MAX_NAME {
        out.truncate(start);
        return false;
    }
    true
}

/// Reads a query's header and first question.
pub fn parse_query(msg: &[u8]) -> Result<(Header, Question), Error> {
    let h = Header::parse(msg)?;
    if h.qdcount == 0 {
        return Err(Error::TooShort);
    }
    let (name, pos) = read_name(msg, 12)?;
    let t = msg.get(pos..pos + 4).ok_or(Error::TooShort)?;
    Ok((
        h,
        Question {
            name,
            qtype: u16::from_be_bytes([t[0], t[1]]),
            qclass: u16::from_be_bytes([t[2], t[3]]),
        },
    ))
}

/// Data of one answer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Ptr(String),
}

impl RData {
    fn rtype(&self) -> u16 {
        match self {
            RData::A(_) => TYPE_A,
            RData::Aaaa(_) => TYPE_AAAA,
            RData::Ptr(_) => TYPE_PTR,
        }
    }
}

/// Builds a response to query `h`: `question` echoed (if any), `answers` owned by the question
/// name (a pointer to offset 12), `aa` = authoritative (our own zones). RD is copied, RA set.
pub fn build_response(h: &Header, question: Option<&Question>, rcode: u8, aa: bool, answers: &[RData]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + answers.len() * 32);
    let mut qbytes = Vec::new();
    let question = question.filter(|q| write_name(&mut qbytes, &q.name));
    // QR, opcode copied, AA, RD copied, RA.
    let flags = 0x8000 | (h.flags & 0x7900) | if aa { 0x0400 } else { 0 } | 0x0080 | u16::from(rcode & 0xf);
    out.extend_from_slice(&h.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&u16::from(question.is_some()).to_be_bytes());
    let an = if question.is_some() { answers.len() } else { 0 };
    out.extend_from_slice(&(an as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    let Some(q) = question else { return out };
    out.extend_from_slice(&qbytes);
    out.extend_from_slice(&q.qtype.to_be_bytes());
    out.extend_from_slice(&q.qclass.to_be_bytes());
    for a in answers {
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(&a.rtype().to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        match a {
            RData::A(ip) => {
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&ip.octets());
            }
            RData::Aaaa(ip) => {
                out.extend_from_slice(&16u16.to_be_bytes());
                out.extend_from_slice(&ip.octets());
            }
            RData::Ptr(name) => {
                let mut n = Vec::new();
                if !write_name(&mut n, name) {
                    n = vec![0];
                }
                out.extend_from_slice(&(n.len() as u16).to_be_bytes());
                out.extend_from_slice(&n);
            }
        }
    }
    out
}

/// A SERVFAIL for `query` (an upstream did not answer), or `None` if it is no query.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let (h, q) = parse_query(query).ok()?;
    Some(build_response(&h, Some(&q), RCODE_SERVFAIL, false, &[]))
}

// ---------------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------------

/// Where a forwarded query goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The resolvers of a split-DNS route, in order.
    Resolvers(Vec<SocketAddr>),
    /// The host's resolvers (`/etc/resolv.conf`).
    System,
}

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send this response.
    Reply(Vec<u8>),
    /// Send the query, unchanged, to `Upstream` and relay its answer.
    Forward(Upstream),
}

/// The MagicDNS answer tables, built from a netmap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolver {
    /// MagicDNS on (`DNSConfig.Proxied`).
    pub magic: bool,
    /// The MagicDNS suffix (lowercase, no trailing dot), empty without MagicDNS.
    pub suffix: String,
    /// (lowercase FQDN without trailing dot, address): self, peers, extra records, in that
    /// order. A list, not maps: tailnets are small, and each map type costs code on the router.
    records: Vec<(String, IpAddr)>,
    /// Zones answered here alone (routes with no resolvers, plus the MagicDNS zones).
    local_zones: Vec<String>,
    /// Split DNS: suffix → resolvers.
    routes: Vec<(String, Vec<SocketAddr>)>,
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `name` equals `zone` or lies inside it (both normalized).
fn in_zone(name: &str, zone: &str) -> bool {
    zone.is_empty()
        || name == zone
        || (name.len() > zone.len() && name.ends_with(zone) && name.as_bytes()[name.len() - zone.len() - 1] == b'.')
}

/// A resolver address as `dnstype.Resolver.Addr` writes it: `IP` (port 53) or `IP:port`.
/// DoH and other URLs are not supported here (`None`).
pub fn resolver_addr(addr: &str) -> Option<SocketAddr> {
    addr.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, PORT))
        .or_else(|_| addr.parse::<SocketAddr>())
        .ok()
}

impl Resolver {
    /// The answer tables for `nm`: names of the self node and peers, extra records, routes.
    pub fn from_netmap(nm: &Netmap) -> Resolver {
        let dns: &DnsConfig = &nm.dns;
        let mut r = Resolver {
            magic: dns.proxied,
            suffix: if dns.proxied {
                normalize(&nm.magic_dns_suffix())
            } else {
                String::new()
            },
            ..Default::default()
        };
        if r.magic {
            for n in nm.self_node.iter().chain(nm.peers.values()) {
                let ips: Vec<IpAddr> = n
                    .addresses
                    .iter()
                    .filter_map(|a| a.split('/').next()?.parse().ok())
                    .collect();
                r.add_host(&n.name, &ips);
            }
            for rec in &dns.extra_records {
                let Ok(ip) = rec.value.parse::<IpAddr>() else { continue };
                let wanted = match rec.r#type.as_str() {
                    "" => true,
                    "A" => ip.is_ipv4(),
                    "AAAA" => ip.is_ipv6(),
                    _ => false,
                };
                if wanted {
                    r.add_host(&rec.name, &[ip]);
                }
            }
            if !r.suffix.is_empty() {
                r.local_zones.push(r.suffix.clone());
            }
        }
        for (suffix, resolvers) in &dns.routes {
            let suffix = normalize(suffix);
            if resolvers.is_empty() {
                // MagicDNS-only zones mean something only with MagicDNS on.
                if r.magic {
                    r.local_zones.push(suffix);
                }
            } else {
                let addrs: Vec<SocketAddr> = resolvers.iter().filter_map(|x| resolver_addr(&x.addr)).collect();
                if !addrs.is_empty() {
                    r.routes.push((suffix, addrs));
                }
            }
        }
        r
    }

    fn add_host(&mut self, name: &str, ips: &[IpAddr]) {
        let fqdn = normalize(name);
        for ip in ips {
            if !fqdn.is_empty() && !self.records.iter().any(|(f, a)| *f == fqdn && a == ip) {
                self.records.push((fqdn.clone(), *ip));
            }
        }
    }

    /// The FQDN `name` stands for: itself if a record has it, else (for a single label) the
    /// one FQDN whose first label it is; `None` if unknown or if two names share the label.
    fn host(&self, name: &str) -> Option<&str> {
        let names = self.records.iter().map(|(f, _)| f.as_str());
        if let Some(f) = names.clone().find(|f| *f == name) {
            return Some(f);
        }
        if name.contains('.') {
            return None;
        }
        let mut bare = names.filter(|f| f.split_once('.').is_some_and(|(l, _)| l == name));
        let first = bare.next()?;
        bare.all(|f| f == first).then_some(first)
    }

    /// The split-DNS route for `name`: the longest matching suffix with resolvers.
    pub fn route(&self, name: &str) -> Option<&[SocketAddr]> {
        let name = normalize(name);
        self.routes
            .iter()
            .filter(|(s, _)| in_zone(&name, s))
            .max_by_key(|(s, _)| s.len())
            .map(|(_, a)| a.as_slice())
    }

    /// Decides about one DNS message sent to the service address. `None`: drop it (not a query).
    pub fn decide(&self, msg: &[u8]) -> Option<Decision> {
        let h = Header::parse(msg).ok()?;
        if h.is_response() {
            return None;
        }
        // One response built at the end: (question echoed, rcode, authoritative, answers).
        let (q, rcode, aa, answers) = if h.opcode() != 0 {
            (None, RCODE_NOTIMP, false, Vec::new())
        } else {
            let Ok((_, q)) = parse_query(msg) else {
                return Some(Decision::Reply(build_response(&h, None, RCODE_FORMERR, false, &[])));
            };
            match self.local_answer(&q) {
                Some((rcode, answers)) => (Some(q), rcode, true, answers),
                None => {
                    return Some(Decision::Forward(match self.route(&q.name) {
                        Some(a) => Upstream::Resolvers(a.to_vec()),
                        None => Upstream::System,
                    }))
                }
            }
        };
        Some(Decision::Reply(build_response(&h, q.as_ref(), rcode, aa, &answers)))
    }

    /// The answer MagicDNS gives itself (rcode and records), `None` for a name it forwards.
    fn local_answer(&self, q: &Question) -> Option<(u8, Vec<RData>)> {
        if !self.magic || q.qclass != CLASS_IN {
            return None;
        }
        let name = normalize(&q.name);
        if let Some(fqdn) = self.host(&name) {
            // No record of that type: NOERROR with no answer (NODATA).
            let answers = self
                .records
                .iter()
                .filter(|(f, _)| f == fqdn)
                .filter_map(|(_, ip)| match (ip, q.qtype) {
                    (IpAddr::V4(a), TYPE_A | TYPE_ANY) => Some(RData::A(*a)),
                    (IpAddr::V6(a), TYPE_AAAA | TYPE_ANY) => Some(RData::Aaaa(*a)),
                    _ => None,
                })
                .collect();
            return Some((RCODE_NOERROR, answers));
        }
        if let Some(ip) = reverse_addr(&name).filter(|ip| is_tailnet_ip(*ip)) {
            let found = self.records.iter().find(|(_, a)| *a == ip);
            return Some(match found {
                Some((f, _)) if matches!(q.qtype, TYPE_PTR | TYPE_ANY) => (RCODE_NOERROR, vec![RData::Ptr(f.clone())]),
                Some(_) => (RCODE_NOERROR, Vec::new()),
                None => (RCODE_NXDOMAIN, Vec::new()),
            });
        }
        if is_tailnet_reverse_zone(&name) || self.local_zones.iter().any(|z| in_zone(&name, z)) {
            let apex = name == self.suffix || self.local_zones.contains(&name);
            return Some((if apex { RCODE_NOERROR } else { RCODE_NXDOMAIN }, Vec::new()));
        }
        None
    }
}

/// A name inside the reverse zones MagicDNS owns (Go `magicDNSRootDomains`): the
/// `64-127.100.in-addr.arpa` zones and `0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa`.
fn is_tailnet_reverse_zone(name: &str) -> bool {
    if in_zone(name, "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa") {
        return true;
    }
    let Some(rest) = name.strip_suffix(".100.in-addr.arpa") else {
        return false;
    };
    let second = rest.rsplit('.').next().unwrap_or("");
    second.parse::<u8>().is_ok_and(|b| (64..128).contains(&b))
}

/// The address a full reverse name stands for (`4.3.2.1.in-addr.arpa` → 1.2.3.4; 32 nibbles
/// in `ip6.arpa`), `None` for a partial or malformed one.
pub fn reverse_addr(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let mut o = [0u8; 4];
        let labels: Vec<&str> = rest.split('.').collect();
        if labels.len() != 4 {
            return None;
        }
        for (i, l) in labels.iter().rev().enumerate() {
            // No leading zeros or signs: "010" is not how a reverse name is written.
            if l.is_empty()
                || l.len() > 3
                || (l.len() > 1 && l.starts_with('0'))
                || !l.bytes().all(|c| c.is_ascii_digit())
            {
                return None;
            }
            o[i] = l.parse().ok()?;
        }
        return Some(IpAddr::V4(Ipv4Addr::from(o)));
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let labels: Vec<&str> = rest.split('.').collect();
    if labels.len() != 32 {
        return None;
    }
    let mut o = [0u8; 16];
    for (i, l) in labels.iter().rev().enumerate() {
        let n = if l.len() == 1 {
            l.chars().next()?.to_digit(16)?
        } else {
            return None;
        };
        o[i / 2] |= (n as u8) << if i % 2 == 0 { 4 } else { 0 };
    }
    Some(IpAddr::V6(Ipv6Addr::from(o)))
}

/// The `nameserver` addresses of a resolv.conf, in order, without the MagicDNS service
/// addresses (forwarding to ourselves would loop).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (fe80::1%eth0) cannot be expressed without the scope id.
            let ip: IpAddr = w.next()?.parse().ok()?;
            (ip != IpAddr::V4(TAILSCALE_SERVICE_IP) && ip != IpAddr::V6(TAILSCALE_SERVICE_IPV6))
                .then(|| SocketAddr::new(ip, PORT))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// `tinyscale dns query`: a question built from text, an answer read back into text
// ---------------------------------------------------------------------------------------------

/// Record types by their usual names (the ones `dig` and `tailscale dns query` take).
const TYPE_NAMES: &[(&str, u16)] = &[
    ("A", TYPE_A),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("PTR", TYPE_PTR),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", TYPE_AAAA),
    ("SRV", 33),
    ("ANY", TYPE_ANY),
];

/// A record type from its name (any case) or number (`65`, `TYPE65`).
pub fn qtype_from_name(s: &str) -> Option<u16> {
    let up = s.to_ascii_uppercase();
    TYPE_NAMES
        .iter()
        .find(|(n, _)| *n == up)
        .map(|(_, t)| *t)
        .or_else(|| up.strip_prefix("TYPE").unwrap_or(&up).parse().ok())
}

/// A record type's name (`TYPE65` for one without).
pub fn qtype_name(t: u16) -> String {
    match TYPE_NAMES.iter().find(|(_, n)| *n == t) {
        Some((name, _)) => name.to_string(),
        None => format!("TYPE{t}"),
    }
}

/// The reverse-lookup name of `ip` (`1.2.3.4` → `4.3.2.1.in-addr.arpa`, nibbles for IPv6).
pub fn reverse_name(ip: IpAddr) -> String {
    let mut labels: Vec<String> = match ip {
        IpAddr::V4(a) => a.octets().iter().map(u8::to_string).collect(),
        IpAddr::V6(a) => a
            .octets()
            .iter()
            .flat_map(|b| [b >> 4, b & 0xf])
            .map(|n| format!("{n:x}"))
            .collect(),
    };
    labels.reverse();
    labels.push(if ip.is_ipv4() { "in-addr.arpa" } else { "ip6.arpa" }.into());
    labels.join(".")
}

/// A standard recursive query for `name` (id 0), or `None` if the name cannot be encoded.
pub fn query_message(name: &str, qtype: u16) -> Option<Vec<u8>> {
    let mut m = vec![0, 0, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    write_name(&mut m, name).then_some(())?;
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    Some(m)
}

/// One answer record read back from a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Owner name with a trailing dot.
    pub name: String,
    pub rtype: u16,
    pub ttl: u32,
    /// A/AAAA: the address; PTR: the name (trailing dot); other types: the rdata in hex.
    pub body: String,
}

/// Reads a response's rcode and answer records (the questions are skipped).
pub fn parse_response(msg: &[u8]) -> Result<(u8, Vec<Answer>), Error> {
    let h = Header::parse(msg)?;
    let u16_at = |p: usize| {
        msg.get(p..p + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(Error::TooShort)
    };
    let mut pos = 12;
    for _ in 0..h.qdcount {
        pos = read_name(msg, pos)?.1 + 4;
        if pos > msg.len() {
            return Err(Error::TooShort);
        }
    }
    let mut out = Vec::new();
    for _ in 0..u16_at(6)? {
        let (name, p) = read_name(msg, pos)?;
        let rtype = u16_at(p)?;
        let ttl = (u32::from(u16_at(p + 4)?) << 16) | u32::from(u16_at(p + 6)?);
        let len = usize::from(u16_at(p + 8)?);
        let data = msg.get(p + 10..p + 10 + len).ok_or(Error::TooShort)?;
        let body = match (rtype, data.len()) {
            (TYPE_A, 4) => Ipv4Addr::from([data[0], data[1], data[2], data[3]]).to_string(),
            (TYPE_AAAA, 16) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(data);
                Ipv6Addr::from(o).to_string()
            }
            (TYPE_PTR, _) => read_name(msg, p + 10)?.0 + ".",
            _ => data.iter().map(|b| format!("{b:02x}")).collect(),
        };
        out.push(Answer {
            name: name + ".",
            rtype,
            ttl,
            body,
        });
        pos = p + 10 + len;
    }
    Ok((h.rcode(), out))
}

// ---------------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------------

/// TCP flag FIN.
pub const FIN: u8 = 0x01;
/// TCP flag SYN.
pub const SYN: u8 = 0x02;
/// TCP flag RST.
pub const RST: u8 = 0x04;
/// TCP flag PSH.
pub const PSH: u8 = 0x08;
/// TCP flag ACK.
pub const ACK: u8 = 0x10;

/// Segment size we send (no MSS option is read: the RFC 9293 defaults, 536 for IPv4 and
/// 1220 for IPv6, always fit).
const MSS_V4: usize = 536;
const MSS_V6: usize = 1220;

/// A packet for the service address, split into what we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<'a> {
    Udp {
        src: SocketAddr,
        dst: SocketAddr,
        payload: &'a [u8],
    },
    Tcp(TcpSegment<'a>),
}

/// One TCP segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: &'a [u8],
}

/// Quick test on a packet read from the TUN: is it addressed to the service address, port 53?
pub fn is_for_service(pkt: &[u8]) -> bool {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => pkt.get(16..20) == Some(&TAILSCALE_SERVICE_IP.octets()[..]),
        Some(6) => pkt.get(24..40) == Some(&TAILSCALE_SERVICE_IPV6.octets()[..]),
        _ => false,
    }
}

/// Splits an IPv4/IPv6 packet carrying UDP or TCP to port 53. Fragments, IPv6 extension
/// headers and anything else give `None` (dropped).
pub fn parse_packet(pkt: &[u8]) -> Option<Inbound<'_>> {
    let (src, dst, proto, l4) = match pkt.first()? >> 4 {
        4 => {
            let ihl = usize::from(pkt[0] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([*pkt.get(2)?, *pkt.get(3)?]));
            if ihl < 20 || total < ihl || total > pkt.len() {
                return None;
            }
            // More fragments, or not the first fragment.
            if u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0 {
                return None;
            }
            let s: [u8; 4] = pkt.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), pkt[9], &pkt[ihl..total])
        }
        6 => {
            let plen = usize::from(u16::from_be_bytes([*pkt.get(4)?, *pkt.get(5)?]));
            let s: [u8; 16] = pkt.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), pkt[6], pkt.get(40..40 + plen)?)
        }
        _ => return None,
    };
    let port = |i: usize| Some(u16::from_be_bytes([*l4.get(i)?, *l4.get(i + 1)?]));
    let (sp, dp) = (port(0)?, port(2)?);
    if dp != PORT {
        return None;
    }
    let (src, dst) = (SocketAddr::new(src, sp), SocketAddr::new(dst, dp));
    match proto {
        17 => {
            let len = usize::from(port(4)?);
            if len < 8 || len > l4.len() {
                return None;
            }
            Some(Inbound::Udp {
                src,
                dst,
                payload: &l4[8..len],
            })
        }
        6 => {
            let off = usize::from(*l4.get(12)? >> 4) * 4;
            if off < 20 || off > l4.len() {
                return None;
            }
            let word = |i: usize| u32::from_be_bytes([l4[i], l4[i + 1], l4[i + 2], l4[i + 3]]);
            Some(Inbound::Tcp(TcpSegment {
                src,
                dst,
                seq: word(4),
                ack: word(8),
                flags: l4[13],
                payload: &l4[off..],
            }))
        }
        _ => None,
    }
}

/// One's-complement sum of `data` added to `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IP packet from `src` to `dst` (same family) carrying the transport segment `l4` of
/// protocol `proto`, whose checksum field sits at `csum_at`; fills in every checksum.
fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, mut l4: Vec<u8>, csum_at: usize) -> Vec<u8> {
    let len = l4.len();
    let mut pseudo = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum16(sum16(0, &s.octets()), &d.octets()),
        (s, d) => sum16(sum16(0, &ip_octets(s)), &ip_octets(d)),
    };
    pseudo += u32::from(proto) + len as u32;
    let c = fold(sum16(pseudo, &l4));
    // A UDP checksum of zero means "none"; it is sent as all ones (RFC 768).
    let c = if c == 0 && proto == 17 { 0xffff } else { c };
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    let mut p = Vec::with_capacity(40 + len);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + len) as u16;
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&total.to_be_bytes());
            // ID 0 with DF (RFC 6864: atomic datagrams), TTL 64.
            p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            let hc = fold(sum16(0, &p));
            p[10..12].copy_from_slice(&hc.to_be_bytes());
        }
        (s, d) => {
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
            p.extend_from_slice(&[proto, 64]);
            p.extend_from_slice(&ip_octets(s));
            p.extend_from_slice(&ip_octets(d));
        }
    }
    p.extend_from_slice(&l4);
    p
}

/// 16 bytes of an address (IPv4 mapped), for the IPv6 header and pseudo-header.
fn ip_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// A UDP packet from `src` to `dst` carrying `payload`.
pub fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(8 + payload.len());
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    ip_packet(src.ip(), dst.ip(), 17, l4, 6)
}

/// A TCP segment (no options, window 65535).
pub fn tcp_packet(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(20 + payload.len());
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(&ack.to_be_bytes());
    l4.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    l4.extend_from_slice(payload);
    ip_packet(src.ip(), dst.ip(), 6, l4, 16)
}

// ---------------------------------------------------------------------------------------------
// TCP responder
// ---------------------------------------------------------------------------------------------

/// Where the answer to a query that came over TCP goes: the connection and our next sequence
/// number and acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpReply {
    /// The client.
    pub client: SocketAddr,
    /// The service address it connected to.
    pub server: SocketAddr,
    /// Our sequence number for the first byte of the answer.
    pub seq: u32,
    /// What we acknowledge (the client's query and FIN, if it came along).
    pub ack: u32,
}

/// What the TCP responder wants done with one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpAction {
    /// Nothing to send.
    None,
    /// Send these packets (SYN-ACK, ACK of a FIN, RST).
    Send(Vec<u8>),
    /// A whole query arrived (without its length prefix): answer it through [`tcp_answer`].
    Query(Vec<u8>, TcpReply),
}

/// Our initial sequence number for a connection: a keyed hash of its addresses, so the
/// responder keeps no per-connection state (like a SYN cookie).
fn isn(secret: u64, client: SocketAddr, server: SocketAddr) -> u32 {
    // FNV-1a over the secret and the addresses; unpredictable without the secret, which is
    // all a sequence number must be here.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h = (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(&secret.to_le_bytes());
    eat(&ip_octets(client.ip()));
    eat(&client.port().to_be_bytes());
    eat(&ip_octets(server.ip()));
    eat(&server.port().to_be_bytes());
    (h ^ (h >> 32)) as u32
}

/// The stateless TCP responder: one DNS query per connection (RFC 7766 allows more; clients
/// such as `dig +tcp` and glibc send one and close). A SYN gets a SYN-ACK whose sequence
/// number is a keyed hash of the connection; a segment that acknowledges it and carries a
/// whole length-prefixed query becomes [`TcpAction::Query`]; the answer goes out with FIN.
/// A query split over several segments is not reassembled: the client times out (our
/// segments advertise a full window, so a client has no reason to split 2 + ≤512 bytes).
pub fn handle_tcp(seg: &TcpSegment<'_>, secret: u64) -> TcpAction {
    let (client, server) = (seg.src, seg.dst);
    let ours = isn(secret, client, server);
    if seg.flags & RST != 0 {
        return TcpAction::None;
    }
    if seg.flags & SYN != 0 {
        if seg.flags & ACK != 0 {
            return TcpAction::None;
        }
        return TcpAction::Send(tcp_packet(
            server,
            client,
            ours,
            seg.seq.wrapping_add(1),
            SYN | ACK,
            &[],
        ));
    }
    if seg.flags & ACK == 0 {
        return TcpAction::None;
    }
    let fin = u32::from(seg.flags & FIN != 0);
    let their_next = seg.seq.wrapping_add(seg.payload.len() as u32).wrapping_add(fin);
    // The client's ack is our ISN + 1 (before our answer) or later (acknowledging it).
    let acked = seg.ack.wrapping_sub(ours.wrapping_add(1));
    if acked > 1 << 20 {
        // Not a connection we accepted (or from before a restart): reset it.
        return TcpAction::Send(tcp_packet(server, client, seg.ack, their_next, RST | ACK, &[]));
    }
    if !seg.payload.is_empty() && acked == 0 {
        let p = seg.payload;
        let len = usize::from(u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)]));
        if p.len() >= 2 && p.len() == 2 + len {
            let reply = TcpReply {
                client,
                server,
                seq: seg.ack,
                ack: their_next,
            };
            return TcpAction::Query(p[2..].to_vec(), reply);
        }
        return TcpAction::None;
    }
    if fin == 1 {
        return TcpAction::Send(tcp_packet(server, client, seg.ack, their_next, ACK, &[]));
    }
    TcpAction::None
}

/// Where the answer to a forwarded query goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyTo {
    /// A UDP query from `client` to the service address `server`.
    Udp { client: SocketAddr, server: SocketAddr },
    /// A query on a TCP connection.
    Tcp(TcpReply),
}

impl ReplyTo {
    /// The IP packets carrying `answer` back to the client.
    pub fn packets(&self, answer: &[u8]) -> Vec<Vec<u8>> {
        match self {
            ReplyTo::Udp { client, server } => vec![udp_packet(*server, *client, answer)],
            ReplyTo::Tcp(r) => tcp_answer(r, answer),
        }
    }
}

/// The segments carrying `answer` (length-prefixed) on the connection `r`, the last with FIN.
pub fn tcp_answer(r: &TcpReply, answer: &[u8]) -> Vec<Vec<u8>> {
    let mut data = Vec::with_capacity(2 + answer.len());
    data.extend_from_slice(&(answer.len().min(0xffff) as u16).to_be_bytes());
    data.extend_from_slice(&answer[..answer.len().min(0xffff)]);
    let mss = if r.client.is_ipv4() { MSS_V4 } else { MSS_V6 };
    let mut seq = r.seq;
    let mut out = Vec::new();
    for chunk in data.chunks(mss) {
        out.push(tcp_packet(r.server, r.client, seq, r.ack, ACK | PSH, chunk));
        seq = seq.wrapping_add(chunk.len() as u32);
    }
    out.push(tcp_packet(r.server, r.client, seq, r.ack, FIN | ACK, &[]));
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::vectors::hex;
    use crate::wire::tailcfg::{DnsRecord, MapResponse, Node, Resolver as TsResolver};

    /// `dig @100.100.100.100 gonode.ts.example A` as sent (id 0x1234, RD, no EDNS).
    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut m = hex("1234 0100 0001 0000 0000 0000");
        assert!(write_name(&mut m, name));
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m
    }

    fn node(id: u64, name: &str, v4: &str, v6: &str) -> Node {
        Node {
            id,
            name: name.into(),
            addresses: vec![format!("{v4}/32"), format!("{v6}/128")],
            ..Default::default()
        }
    }

    fn netmap() -> Netmap {
        let mut nm = Netmap::default();
        nm.apply(MapResponse {
            node: Some(node(1, "router.ts.example.", "100.64.0.1", "fd7a:115c:a1e0::1")),
            peers: Some(vec![
                node(2, "gonode.ts.example.", "100.64.0.2", "fd7a:115c:a1e0::2"),
                node(3, "Laptop.ts.example.", "100.64.0.3", "fd7a:115c:a1e0::3"),
            ]),
            dns_config: Some(DnsConfig {
                proxied: true,
                routes: [
                    ("ts.example.".to_string(), vec![]),
                    (
                        "corp.example.".to_string(),
                        vec![TsResolver {
                            addr: "10.0.0.53".into(),
                        }],
                    ),
                    (
                        "lab.corp.example.".to_string(),
                        vec![TsResolver {
                            addr: "10.9.0.1:5353".into(),
                        }],
                    ),
                ]
                .into_iter()
                .collect(),
                extra_records: vec![DnsRecord {
                    name: "grafana.ts.example".into(),
                    r#type: String::new(),
                    value: "100.64.0.9".into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        });
        nm
    }

    fn reply(r: &Resolver, msg: &[u8]) -> Vec<u8> {
        match r.decide(msg) {
            Some(Decision::Reply(b)) => b,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// The answers' rdata, parsed back (type, bytes).
    fn answers(resp: &[u8]) -> (u8, Vec<(u16, Vec<u8>)>) {
        let h = Header::parse(resp).unwrap();
        let (_, mut pos) = read_name(resp, 12).unwrap();
        pos += 4;
        let an = u16::from_be_bytes([resp[6], resp[7]]);
        let mut out = Vec::new();
        for _ in 0..an {
            let (_, p) = read_name(resp, pos).unwrap();
            let t = u16::from_be_bytes([resp[p], resp[p + 1]]);
            let len = usize::from(u16::from_be_bytes([resp[p + 8], resp[p + 9]]));
            out.push((t, resp[p + 10..p + 10 + len].to_vec()));
            pos = p + 10 + len;
        }
        (h.rcode(), out)
    }

    #[test]
    fn response_bytes_for_an_a_query() {
        let r = Resolver::from_netmap(&netmap());
        let resp = reply(&r, &query("gonode.ts.example", TYPE_A));
        let want = hex(
            "1234 8580 0001 0001 0000 0000                  # id; QR AA RD RA NOERROR; 1 question, 1 answer
             06 676f6e6f6465 02 7473 07 6578616d706c65 00   # gonode.ts.example
             0001 0001                                      # A IN
             c00c 0001 0001 00000258 0004 64400002          # pointer to the question, A IN, TTL 600, 100.64.0.2",
        );
        assert_eq!(resp, want);
    }

    #[test]
    fn names_case_bare_hosts_aaaa_and_extra_records() {
        let r = Resolver::from_netmap(&netmap());
        let (rc, a) = answers(&reply(&r, &query("LAPTOP.ts.Example.", TYPE_AAAA)));
        assert_eq!(rc, RCODE_NOERROR);
        assert_eq!(
            a,
            vec![(
                TYPE_AAAA,
                "fd7a:115c:a1e0::3".parse::<Ipv6Addr>().unwrap().octets().to_vec()
            )]
        );
        let (_, a) = answers(&reply(&r, &query("gonode", TYPE_A)));
        assert_eq!(a, vec![(TYPE_A, vec![100, 64, 0, 2])]);
        let (_, a) = answers(&reply(&r, &query("router.ts.example", TYPE_ANY)));
        assert_eq!(a.len(), 2, "self node answers too, both families");
        let (_, a) = answers(&reply(&r, &query("grafana.ts.example", TYPE_A)));
        assert_eq!(a, vec![(TYPE_A, vec![100, 64, 0, 9])]);
        // NODATA: the name exists, the type does not.
        let (rc, a) = answers(&reply(&r, &query("grafana.ts.example", TYPE_AAAA)));
        assert_eq!((rc, a.len()), (RCODE_NOERROR, 0));
        let (rc, _) = answers(&reply(&r, &query("nobody.ts.example", TYPE_A)));
        assert_eq!(rc, RCODE_NXDOMAIN);
        let (rc, _) = answers(&reply(&r, &query("ts.example", TYPE_A)));
        assert_eq!(rc, RCODE_NOERROR, "the zone apex exists");
    }

    #[test]
    fn a_bare_label_two_names_share_is_not_answered() {
        let mut nm = netmap();
        nm.dns.extra_records.push(DnsRecord {
            name: "gonode.lab.ts.example".into(),
            r#type: String::new(),
            value: "100.64.0.8".into(),
        });
        let r = Resolver::from_netmap(&nm);
        // gonode.ts.example or gonode.lab.ts.example? Not ours to say: forwarded.
        assert_eq!(
            r.decide(&query("gonode", TYPE_A)),
            Some(Decision::Forward(Upstream::System))
        );
        let (_, a) = answers(&reply(&r, &query("gonode.lab.ts.example", TYPE_A)));
        assert_eq!(a, vec![(TYPE_A, vec![100, 64, 0, 8])]);
    }

    #[test]
    fn ptr_for_tailnet_addresses() {
        let r = Resolver::from_netmap(&netmap());
        let (rc, a) = answers(&reply(&r, &query("2.0.64.100.in-addr.arpa", TYPE_PTR)));
        assert_eq!(rc, RCODE_NOERROR);
        let mut want = Vec::new();
        write_name(&mut want, "gonode.ts.example.");
        assert_eq!(a, vec![(TYPE_PTR, want.clone())]);
        // fd7a:115c:a1e0::3: 20 host nibbles, then the /48's 12.
        let v6 = format!("3.{}0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa", "0.".repeat(19));
        let (_, a) = answers(&reply(&r, &query(&v6, TYPE_PTR)));
        let mut want = Vec::new();
        write_name(&mut want, "laptop.ts.example.");
        assert_eq!(a, vec![(TYPE_PTR, want)]);
        let (rc, _) = answers(&reply(&r, &query("77.0.64.100.in-addr.arpa", TYPE_PTR)));
        assert_eq!(rc, RCODE_NXDOMAIN);
        let (rc, _) = answers(&reply(&r, &query("9.9.127.100.in-addr.arpa", TYPE_PTR)));
        assert_eq!(rc, RCODE_NXDOMAIN, "the whole 100.64.0.0/10 is ours");
        // Outside the tailnet: forwarded.
        assert_eq!(
            r.decide(&query("1.1.168.192.in-addr.arpa", TYPE_PTR)),
            Some(Decision::Forward(Upstream::System))
        );
        assert_eq!(reverse_addr("1.2.3.in-addr.arpa"), None);
        assert_eq!(reverse_addr("01.2.3.4.in-addr.arpa"), None);
    }

    #[test]
    fn split_routes_longest_match_else_system() {
        let r = Resolver::from_netmap(&netmap());
        let to = |a: &str| Some(Decision::Forward(Upstream::Resolvers(vec![a.parse().unwrap()])));
        assert_eq!(r.decide(&query("git.corp.example", TYPE_A)), to("10.0.0.53:53"));
        assert_eq!(r.decide(&query("corp.example", TYPE_A)), to("10.0.0.53:53"));
        assert_eq!(r.decide(&query("x.lab.corp.example", TYPE_A)), to("10.9.0.1:5353"));
        assert_eq!(
            r.decide(&query("notcorp.example", TYPE_A)),
            Some(Decision::Forward(Upstream::System))
        );
        assert_eq!(
            r.decide(&query("example.test", TYPE_A)),
            Some(Decision::Forward(Upstream::System))
        );
    }

    #[test]
    fn magic_dns_off_forwards_everything() {
        let mut nm = netmap();
        nm.dns.proxied = false;
        let r = Resolver::from_netmap(&nm);
        assert_eq!(
            r.decide(&query("gonode.ts.example", TYPE_A)),
            Some(Decision::Forward(Upstream::System))
        );
    }

    #[test]
    fn bad_queries_get_errors_responses_are_dropped() {
        let r = Resolver::from_netmap(&netmap());
        let mut q = query("gonode.ts.example", TYPE_A);
        q[2] |= 0x80; // a response
        assert_eq!(r.decide(&q), None);
        assert_eq!(r.decide(&q[..5]), None);
        let mut q = query("gonode.ts.example", TYPE_A);
        q[2] = 0x28; // opcode 5 (UPDATE)
        assert_eq!(Header::parse(&reply(&r, &q)).unwrap().rcode(), RCODE_NOTIMP);
        let q = hex("1234 0100 0001 0000 0000 0000 c00c 0001 0001"); // pointer to itself
        let resp = reply(&r, &q);
        assert_eq!(resp, hex("1234 8181 0000 0000 0000 0000"), "FORMERR without a question");
    }

    #[test]
    fn names_with_compression_pointers() {
        // Header, then "ts.example" at 12, then "gonode" + pointer to 12 at 24.
        let m = hex("0000 0000 0000 0000 0000 0000  02 7473 07 6578616d706c65 00  06 676f6e6f6465 c00c  0001");
        assert_eq!(read_name(&m, 12).unwrap(), ("ts.example".to_string(), 24));
        assert_eq!(read_name(&m, 24).unwrap(), ("gonode.ts.example".to_string(), 33));
        // Loops and truncation are errors.
        assert_eq!(read_name(&hex("c000"), 0), Err(Error::BadName));
        assert_eq!(read_name(&hex("05 6162"), 0), Err(Error::TooShort));
        assert_eq!(read_name(&hex("40"), 0), Err(Error::BadName));
        let long: Vec<u8> = std::iter::repeat_n([63u8].into_iter().chain([b'a'; 63]), 5)
            .flatten()
            .collect();
        assert_eq!(read_name(&long, 0), Err(Error::BadName));
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# generated\nsearch lan\nnameserver 127.0.0.1\nnameserver ::1\nnameserver 100.100.100.100\n\
                    nameserver fe80::1%eth0\noptions ndots:1\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "127.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    fn ones_complement_ok(data: &[u8], pseudo: u32) -> bool {
        fold(sum16(pseudo, data)) == 0
    }

    #[test]
    fn udp_round_trip_with_valid_checksums() {
        let src: SocketAddr = "100.64.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "100.100.100.100:53".parse().unwrap();
        let p = udp_packet(src, dst, b"hello");
        assert!(is_for_service(&p));
        assert!(ones_complement_ok(&p[..20], 0), "IPv4 header checksum");
        let pseudo = sum16(sum16(0, &p[12..20]), &[0, 17]) + 13;
        assert!(ones_complement_ok(&p[20..], pseudo), "UDP checksum");
        assert_eq!(
            parse_packet(&p),
            Some(Inbound::Udp {
                src,
                dst,
                payload: b"hello"
            })
        );
        let src6: SocketAddr = "[fd7a:115c:a1e0::1]:40000".parse().unwrap();
        let dst6 = SocketAddr::new(IpAddr::V6(TAILSCALE_SERVICE_IPV6), 53);
        let p = udp_packet(src6, dst6, b"hi");
        assert!(is_for_service(&p));
        let pseudo = sum16(sum16(0, &p[8..40]), &[0, 17]) + 10;
        assert!(ones_complement_ok(&p[40..], pseudo));
        assert!(matches!(parse_packet(&p), Some(Inbound::Udp { payload: b"hi", .. })));
    }

    #[test]
    fn tcp_exchange() {
        let client: SocketAddr = "100.64.0.1:40000".parse().unwrap();
        let server: SocketAddr = "100.100.100.100:53".parse().unwrap();
        let secret = 7;
        let seg = |seq, ack, flags, payload: &'static [u8]| TcpSegment {
            src: client,
            dst: server,
            seq,
            ack,
            flags,
            payload,
        };
        // SYN → SYN-ACK acknowledging seq+1.
        let TcpAction::Send(p) = handle_tcp(&seg(1000, 0, SYN, b""), secret) else {
            panic!()
        };
        let Some(Inbound::Tcp(sa)) = parse_packet_any(&p) else {
            panic!()
        };
        assert_eq!((sa.flags, sa.ack), (SYN | ACK, 1001));
        let isn = sa.seq;
        // The bare ACK completing the handshake: nothing.
        assert_eq!(handle_tcp(&seg(1001, isn + 1, ACK, b""), secret), TcpAction::None);
        // The query in one segment.
        let q: &'static [u8] = b"\x00\x03abc";
        let TcpAction::Query(msg, r) = handle_tcp(&seg(1001, isn + 1, ACK | PSH, q), secret) else {
            panic!()
        };
        assert_eq!(msg, b"abc");
        assert_eq!((r.seq, r.ack), (isn + 1, 1006));
        let out = tcp_answer(&r, &[7u8; 600]);
        assert_eq!(out.len(), 3, "602 bytes in two 536-byte segments, then FIN");
        let Some(Inbound::Tcp(last)) = parse_packet_any(&out[2]) else {
            panic!()
        };
        assert_eq!((last.flags, last.seq), (FIN | ACK, isn + 1 + 602));
        // The client's FIN is acknowledged.
        let TcpAction::Send(p) = handle_tcp(&seg(1006, isn + 604, FIN | ACK, b""), secret) else {
            panic!()
        };
        let Some(Inbound::Tcp(a)) = parse_packet_any(&p) else {
            panic!()
        };
        assert_eq!((a.flags, a.ack), (ACK, 1007));
        // A segment of a connection we never accepted is reset.
        let TcpAction::Send(p) = handle_tcp(&seg(5, isn.wrapping_add(1 << 24), ACK, b"\x00\x01x"), secret) else {
            panic!()
        };
        let Some(Inbound::Tcp(rst)) = parse_packet_any(&p) else {
            panic!()
        };
        assert_eq!(rst.flags, RST | ACK);
    }

    /// `parse_packet` for packets we built (source port 53): swap the ports' roles.
    fn parse_packet_any(p: &[u8]) -> Option<Inbound<'_>> {
        let off = if p[0] >> 4 == 4 { 20 } else { 40 };
        let mut q = p.to_vec();
        q.swap(off, off + 2);
        q.swap(off + 1, off + 3);
        match parse_packet(&q)? {
            Inbound::Tcp(t) => Some(Inbound::Tcp(TcpSegment {
                src: t.src,
                dst: t.dst,
                seq: t.seq,
                ack: t.ack,
                flags: t.flags,
                payload: Box::leak(t.payload.to_vec().into_boxed_slice()),
            })),
            Inbound::Udp { src, dst, payload } => Some(Inbound::Udp {
                src,
                dst,
                payload: Box::leak(payload.to_vec().into_boxed_slice()),
            }),
        }
    }

    #[test]
    fn dns_query_text_round_trip() {
        assert_eq!(qtype_from_name("aaaa"), Some(TYPE_AAAA));
        assert_eq!(qtype_from_name("PTR"), Some(TYPE_PTR));
        assert_eq!(qtype_from_name("TYPE65"), Some(65));
        assert_eq!(qtype_from_name("65"), Some(65));
        assert_eq!(qtype_from_name("BOGUS"), None);
        assert_eq!(qtype_name(TYPE_A), "A");
        assert_eq!(qtype_name(65), "TYPE65");
        assert_eq!(reverse_name("100.64.0.2".parse().unwrap()), "2.0.64.100.in-addr.arpa");
        let v6 = reverse_name("fd7a:115c:a1e0::2".parse().unwrap());
        assert_eq!(reverse_addr(&v6), Some("fd7a:115c:a1e0::2".parse().unwrap()));
        assert!(query_message("a..b", TYPE_A).is_none());

        let r = Resolver::from_netmap(&netmap());
        let resp = reply(&r, &query_message("gonode", TYPE_ANY).unwrap());
        let (rcode, ans) = parse_response(&resp).unwrap();
        assert_eq!(rcode, RCODE_NOERROR);
        let got: Vec<(&str, u16, u32, &str)> = ans
            .iter()
            .map(|a| (a.name.as_str(), a.rtype, a.ttl, a.body.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("gonode.", TYPE_A, TTL, "100.64.0.2"),
                ("gonode.", TYPE_AAAA, TTL, "fd7a:115c:a1e0::2")
            ]
        );
        let resp = reply(&r, &query_message(&v6, TYPE_PTR).unwrap());
        let (_, ans) = parse_response(&resp).unwrap();
        assert_eq!(ans[0].body, "gonode.ts.example.");
        let resp = reply(&r, &query_message("nobody.ts.example", TYPE_A).unwrap());
        assert_eq!(parse_response(&resp).unwrap(), (RCODE_NXDOMAIN, vec![]));
        assert_eq!(parse_response(&resp[..resp.len() - 1]), Err(Error::TooShort));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_response(&data);
            let r = Resolver::from_netmap(&netmap());
            let _ = r.decide(&data);
            let _ = parse_query(&data);
            for i in 0..data.len().min(40) {
                let _ = read_name(&data, i);
            }
            if let Some(Inbound::Tcp(t)) = parse_packet(&data) {
                let _ = handle_tcp(&t, 1);
            }
            let _ = is_for_service(&data);
            let _ = servfail(&data);
        }

        #[test]
        fn queries_round_trip(labels in proptest::collection::vec("[a-z0-9-]{1,20}", 1..6), qtype in any::<u16>()) {
            let name = labels.join(".");
            let q = query(&name, qtype);
            let (h, parsed) = parse_query(&q).unwrap();
            prop_assert_eq!(h.id, 0x1234);
            prop_assert_eq!(&parsed.name, &name);
            prop_assert_eq!(parsed.qtype, qtype);
            let resp = build_response(&h, Some(&parsed), RCODE_NXDOMAIN, true, &[RData::Ptr(name.clone())]);
            let (h2, back) = parse_query(&resp).unwrap();
            prop_assert!(h2.is_response());
            prop_assert_eq!(h2.rcode(), RCODE_NXDOMAIN);
            prop_assert_eq!(back, parsed);
        }
    }
}
