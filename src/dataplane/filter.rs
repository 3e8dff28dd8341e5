//! The packet filter: which packets arriving from the tailnet may reach this node, and through
//! it (as a subnet router) the LANs it serves. Stateful, bounded, enforced on inbound packets.
//!
//! Mirrors tailscale `wgengine/filter` (`filter.go` `RunIn`/`RunOut`/`pre`, `match.go`,
//! `tailcfg.go` `MatchesFromFilterRules`/`parseIPSet`) and the packet facts it reads through
//! `net/packet` (`IsTCPSyn`, `IsEchoResponse`, `IsError`, the fragment rules of `decode4`).
//!
//! A packet from the tunnel ([`Filter::check_inbound`]) goes through, in order:
//! ```text
//!  parse        not IPv4/IPv6, truncated header or transport header   -> Drop(Malformed)
//!               IPv4 later fragment with offset < 80 bytes (RFC 1858) -> Drop(Fragment)
//!  unicast      multicast or link-local destination                   -> Drop(NotUnicast)
//!  local        destination outside this node's addresses and the
//!               subnet routes control approved for it                 -> Drop(NotLocal)
//!  fragment     a later fragment (no transport header to judge)       -> Accept
//!  stateful     TCP other than a bare SYN (SYN without ACK)            -> Accept
//!               UDP/SCTP matching a tracked outbound flow              -> Accept
//!               ICMP echo reply, or an ICMP error                      -> Accept
//!  shields up   anything else                                          -> Drop(ShieldsUp)
//!  rules        TCP/UDP/SCTP: protocol, source and destination:port    -> Accept
//!               ICMP: source and destination of any rule (Go: "if any
//!               port is open to an IP, allow ICMP to it")              -> Accept
//!               other protocols: listed, destination with all ports    -> Accept
//!               otherwise                                              -> Drop(NoRule)
//! ```
//! The local check comes first because a subnet router forwards what it accepts: without it a
//! peer could use this node to reach any address at all. Unlike Go, later fragments pass the
//! local check too (Go accepts them before it); the receiving kernel drops a fragment train
//! whose first fragment the filter refused, and none may leave towards a non-local address.
//!
//! TCP needs no connection table: a new connection starts with a bare SYN, which the rules
//! judge, and every other segment passes (Go does the same; it is also the cheapest path for
//! bulk traffic). UDP and SCTP have no such marker, so [`Filter::note_outbound`] records each
//! flow this side sends and a reply on the reversed tuple passes. The table ([`ConnTrack`]) is
//! set-associative: a fixed number of buckets of [`CONN_WAYS`] entries, least recently used
//! evicted within a bucket, idle entries expiring after [`CONN_IDLE`]. Its memory is fixed when
//! it is made, and only outbound packets insert, so an inbound flood cannot fill it.
//!
//! The caller supplies: the rules ([`Rules::compile`] over the netmap's filter chunks; none yet
//! means deny all new inbound flows, as Go's filter before the first map), the local set
//! ([`LocalNets::from_self_node`]), the shields-up preference, the clock through
//! [`Filter::handle_timeout`] on its timer tick (packets are stamped with that coarse clock, so
//! the hot path reads no clock), and a seed for the table's hash. Per packet, nothing is
//! allocated. Pure: no I/O, no clock, no randomness of its own.
//!
//! Not supported (such rules or entries grant nothing): `cap:` sources (peer node capabilities)
//! and `CapGrant` rules (application capabilities, not packets). TSMP (Tailscale's own protocol
//! 99) is judged like any other protocol.
#![forbid(unsafe_code)]

use std::{
    hash::Hasher,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{
    dataplane::wg::FastHasher,
    wire::{
        prefix::{Prefix, CGNAT_RANGE, TAILSCALE_ULA_RANGE},
        tailcfg::{FilterRule, Node},
    },
};

/// ICMP for IPv4.
pub const ICMP: u8 = 1;
/// TCP.
pub const TCP: u8 = 6;
/// UDP.
pub const UDP: u8 = 17;
/// ICMP for IPv6.
pub const ICMPV6: u8 = 58;
/// SCTP (ports like UDP; tracked like UDP).
pub const SCTP: u8 = 132;

/// The protocols of a rule without `IPProto` (Go `defaultProtos`).
const DEFAULT_PROTOS: [u8; 4] = [TCP, UDP, ICMP, ICMPV6];

/// IPv6 extension headers walked over to reach the transport header.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTH_HEADER: u8 = 51;
const DEST_OPTIONS: u8 = 60;
/// Extension headers followed before a packet counts as malformed (a real chain has a few).
const MAX_EXT_HEADERS: usize = 8;

/// Smallest offset, in 8-byte blocks, of an IPv4 fragment after the first (Go packet
/// `minFragBlks`, (60 + 20) / 8): a lower one could overwrite the first fragment's transport
/// header, the tiny/overlapping fragment attacks of RFC 1858.
const MIN_FRAG_BLOCKS: u16 = 10;

/// Entries per bucket of the connection table.
pub const CONN_WAYS: usize = 4;
/// Flows tracked at most (Go `lruMax` is 512; a router carries a LAN's flows, hence more).
/// 4096 entries take about 200 KiB, allocated once.
pub const CONN_CAPACITY: usize = 4096;
/// How long a tracked flow lives without a packet either way (Linux conntrack keeps a UDP
/// stream 120 s, `nf_conntrack_udp_timeout_stream`). Go's LRU has no expiry.
pub const CONN_IDLE: Duration = Duration::from_secs(120);

/// Why a packet was dropped; each has a counter (`tinyscale status --json`, `FilterDrop*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not IPv4 or IPv6, or a header cut short or inconsistent.
    Malformed,
    /// A multicast or link-local destination (Go `pre`).
    NotUnicast,
    /// A destination that is neither this node nor a subnet it routes.
    NotLocal,
    /// An IPv4 fragment overlapping the first fragment's transport header.
    Fragment,
    /// Shields up: no new inbound flow is accepted.
    ShieldsUp,
    /// No rule allows it.
    NoRule,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 6] = [
        DropReason::Malformed,
        DropReason::NotUnicast,
        DropReason::NotLocal,
        DropReason::Fragment,
        DropReason::ShieldsUp,
        DropReason::NoRule,
    ];

    /// The name used in counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "Malformed",
            DropReason::NotUnicast => "NotUnicast",
            DropReason::NotLocal => "NotLocal",
            DropReason::Fragment => "Fragment",
            DropReason::ShieldsUp => "ShieldsUp",
            DropReason::NoRule => "NoRule",
        }
    }
}

/// What to do with a packet from the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it.
    Accept,
    /// Drop it (and it was counted).
    Drop(DropReason),
}

// ---- addresses as integers ----

/// An inclusive range of addresses of one family (IPv4 in the low 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    lo: u128,
    hi: u128,
}

impl Range {
    fn contains(&self, a: u128) -> bool {
        self.lo <= a && a <= self.hi
    }
}

/// `ip` as (is IPv6, integer).
fn ip_bits(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

/// The host bits of a `len`-bit prefix (all ones past the prefix); `None` if `len` is too long.
fn host_mask(v6: bool, len: u8) -> Option<u128> {
    let len = u32::from(len);
    if v6 {
        (len <= 128).then(|| u128::MAX.checked_shr(len).unwrap_or(0))
    } else {
        (len <= 32).then(|| u128::from(u32::MAX.checked_shr(len).unwrap_or(0)))
    }
}

/// The range a prefix covers.
fn prefix_range(p: &Prefix) -> (bool, Range) {
    let (v6, lo) = ip_bits(p.masked().addr());
    let hi = lo | host_mask(v6, p.bits()).unwrap_or(0);
    (v6, Range { lo, hi })
}

fn addr_text(v6: bool, a: u128) -> String {
    if v6 {
        Ipv6Addr::from(a).to_string()
    } else {
        Ipv4Addr::from(a as u32).to_string()
    }
}

/// `r` as `a/len` when it is a prefix, a bare address when it is one, else `a-b`.
fn range_text(v6: bool, r: Range) -> String {
    if r.lo == r.hi {
        return addr_text(v6, r.lo);
    }
    let size = r.hi.wrapping_sub(r.lo).wrapping_add(1);
    let width: u32 = if v6 { 128 } else { 32 };
    // A whole family (size wraps to 0 for IPv6) or an aligned power of two is a prefix.
    let host_bits = if size == 0 {
        Some(128)
    } else if size.is_power_of_two() && r.lo & (size - 1) == 0 {
        Some(size.trailing_zeros())
    } else {
        None
    };
    match host_bits {
        Some(h) if h <= width => format!("{}/{}", addr_text(v6, r.lo), width - h),
        _ => format!("{}-{}", addr_text(v6, r.lo), addr_text(v6, r.hi)),
    }
}

/// One `SrcIPs` or `DstPorts[].IP` entry (Go `parseIPSet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// `*`: every address of both families.
    Any,
    /// An address, a CIDR or an `a-b` range.
    Range(bool, Range),
    /// `cap:<name>`: peers with that node capability (not supported: matches nothing).
    Cap,
}

/// Parses one entry; `None` if it is none of Go's forms (the entry is then skipped, as Go does).
fn parse_entry(s: &str) -> Option<Entry> {
    if s == "*" {
        return Some(Entry::Any);
    }
    if s.starts_with("cap:") {
        return Some(Entry::Cap);
    }
    if s.contains('/') {
        // Go refuses a CIDR with host bits set ("contains non-network bits set").
        let (v6, r) = prefix_range(&Prefix::parse_exact(s).ok()?);
        return Some(Entry::Range(v6, r));
    }
    if let Some((a, b)) = s.split_once('-') {
        let (v6a, lo) = ip_bits(a.parse().ok()?);
        let (v6b, hi) = ip_bits(b.parse().ok()?);
        return (v6a == v6b && lo <= hi).then_some(Entry::Range(v6a, Range { lo, hi }));
    }
    let (v6, a) = ip_bits(s.parse().ok()?);
    Some(Entry::Range(v6, Range { lo: a, hi: a }))
}

/// [pure] The application capabilities `src` has towards any of `dsts` (our addresses), from
/// the `CapGrant` rules of `rules`: Go's `PeerCaps` (`filter.CapsWithValues` over the self
/// addresses). Values of a capability granted by several rules are concatenated, in rule order.
pub fn peer_caps<'a>(
    rules: impl Iterator<Item = &'a FilterRule>,
    src: IpAddr,
    dsts: &[IpAddr],
) -> serde_json::Map<String, Value> {
    // A JSON map of arrays from the start: the map type the rest of the binary already uses.
    let mut out = serde_json::Map::new();
    let covers = |entry: &str, ip: IpAddr| {
        let (v6, a) = ip_bits(ip);
        parse_entry(entry)
            .and_then(|e| entry_range(e, v6))
            .is_some_and(|r| r.contains(a))
    };
    for r in rules.filter(|r| !r.cap_grant.is_empty()) {
        if !r.src_ips.iter().any(|s| covers(s, src)) {
            continue;
        }
        for g in &r.cap_grant {
            let mut gd = g["Dsts"].as_array().into_iter().flatten().filter_map(Value::as_str);
            if gd.any(|d| dsts.iter().any(|ip| covers(d, *ip))) {
                for (cap, vals) in g["CapMap"].as_object().into_iter().flatten() {
                    let vals = vals.as_array().map_or(&[][..], Vec::as_slice);
                    if let Value::Array(a) = out.entry(cap.as_str()).or_insert_with(|| Value::Array(Vec::new())) {
                        a.extend(vals.iter().cloned());
                    }
                }
            }
        }
    }
    out
}

/// The range `e` covers in family `v6`, if any.
fn entry_range(e: Entry, v6: bool) -> Option<Range> {
    match e {
        Entry::Any => Some(Range {
            lo: 0,
            hi: if v6 { u128::MAX } else { u128::from(u32::MAX) },
        }),
        Entry::Range(f, r) if f == v6 => Some(r),
        _ => None,
    }
}

// ---- compiled rules ----

/// A set of IP protocol numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ProtoSet([u64; 4]);

impl ProtoSet {
    fn insert(&mut self, p: u8) {
        self.0[usize::from(p >> 6)] |= 1 << (p & 63);
    }

    fn contains(&self, p: u8) -> bool {
        self.0[usize::from(p >> 6)] & (1 << (p & 63)) != 0
    }

    fn list(&self) -> Vec<u8> {
        (0..=255u8).filter(|p| self.contains(*p)).collect()
    }
}

/// A destination of a rule: addresses and an inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dst {
    net: Range,
    first: u16,
    last: u16,
}

impl Dst {
    fn all_ports(&self) -> bool {
        self.first == 0 && self.last == u16::MAX
    }
}

/// One rule restricted to one address family (Go `filtertype.Match` after `matchesFamily`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Match {
    protos: ProtoSet,
    srcs: Vec<Range>,
    dsts: Vec<Dst>,
}

impl Match {
    fn src_contains(&self, a: u128) -> bool {
        self.srcs.iter().any(|r| r.contains(a))
    }
}

/// FilterRules compiled for matching: per family, each rule's protocols as a bit set and its
/// addresses as integer ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    v4: Vec<Match>,
    v6: Vec<Match>,
    /// Entries that grant nothing (malformed, or `cap:`), for `tinyscale debug filter`.
    skipped: Vec<String>,
}

impl Rules {
    /// Compiles the filter in force (Go `MatchesFromFilterRules`): an empty `IPProto` means TCP,
    /// UDP, ICMPv4 and ICMPv6, numbers outside 0-255 are ignored, and an entry that does not
    /// parse is skipped (the rest of its rule stands). A rule keeps, per family, the sources
    /// and destinations of that family, and exists in a family only with both.
    pub fn compile<'a>(rules: impl IntoIterator<Item = &'a FilterRule>) -> Rules {
        let mut out = Rules::default();
        for r in rules {
            let mut protos = ProtoSet::default();
            if r.ip_proto.is_empty() {
                DEFAULT_PROTOS.iter().for_each(|p| protos.insert(*p));
            }
            for p in r.ip_proto.iter().filter_map(|p| u8::try_from(*p).ok()) {
                protos.insert(p);
            }
            let mut srcs = Vec::with_capacity(r.src_ips.len());
            for s in &r.src_ips {
                match parse_entry(s) {
                    Some(Entry::Cap) => out.skipped.push(format!("source {s}: capabilities are not supported")),
                    Some(e) => srcs.push(e),
                    None => out.skipped.push(format!("source {s}: not an IP, CIDR, range or *")),
                }
            }
            let mut dsts = Vec::with_capacity(r.dst_ports.len());
            for d in &r.dst_ports {
                match parse_entry(&d.ip) {
                    Some(Entry::Cap) | None => out
                        .skipped
                        .push(format!("destination {}: not an IP, CIDR, range or *", d.ip)),
                    Some(e) => dsts.push((e, d.ports.first, d.ports.last)),
                }
            }
            for v6 in [false, true] {
                let m = Match {
                    protos,
                    srcs: srcs.iter().filter_map(|e| entry_range(*e, v6)).collect(),
                    dsts: dsts
                        .iter()
                        .filter_map(|&(e, first, last)| {
                            Some(Dst {
                                net: entry_range(e, v6)?,
                                first,
                                last,
                            })
                        })
                        .collect(),
                };
                if !m.srcs.is_empty() && !m.dsts.is_empty() {
                    if v6 {
                        out.v6.push(m);
                    } else {
                        out.v4.push(m);
                    }
                }
            }
        }
        out
    }

    /// Entries that grant nothing, with the reason.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// True when no rule grants anything (deny all new inbound flows).
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn family(&self, v6: bool) -> &[Match] {
        if v6 {
            &self.v6
        } else {
            &self.v4
        }
    }

    /// Go `matches.match`: protocol, source, destination address and port.
    fn match_ports(&self, p: &Parsed) -> bool {
        self.family(p.v6).iter().any(|m| {
            m.protos.contains(p.proto)
                && m.src_contains(p.src)
                && m.dsts
                    .iter()
                    .any(|d| d.net.contains(p.dst) && d.first <= p.dst_port && p.dst_port <= d.last)
        })
    }

    /// Go `matches.matchIPsOnly` (for ICMP): source and destination address; the rule's
    /// protocols and ports do not matter.
    fn match_ips_only(&self, p: &Parsed) -> bool {
        self.family(p.v6)
            .iter()
            .any(|m| m.src_contains(p.src) && m.dsts.iter().any(|d| d.net.contains(p.dst)))
    }

    /// Go `matches.matchProtoAndIPsOnlyIfAllPorts` (protocols without ports): protocol,
    /// source, and a destination open on every port.
    fn match_all_ports(&self, p: &Parsed) -> bool {
        self.family(p.v6).iter().any(|m| {
            m.protos.contains(p.proto)
                && m.src_contains(p.src)
                && m.dsts.iter().any(|d| d.all_ports() && d.net.contains(p.dst))
        })
    }

    fn to_json(&self) -> Value {
        let side = |v6: bool, ms: &[Match]| -> Vec<Value> {
            ms.iter()
                .map(|m| {
                    let dsts: Vec<String> = m
                        .dsts
                        .iter()
                        .map(|d| {
                            let net = range_text(v6, d.net);
                            match (d.first, d.last) {
                                _ if d.all_ports() => format!("{net}:*"),
                                (a, b) if a == b => format!("{net}:{a}"),
                                (a, b) => format!("{net}:{a}-{b}"),
                            }
                        })
                        .collect();
                    json!({
                        "Family": if v6 { "IPv6" } else { "IPv4" },
                        "Srcs": m.srcs.iter().map(|r| range_text(v6, *r)).collect::<Vec<_>>(),
                        "Dsts": dsts,
                        "IPProto": m.protos.list(),
                    })
                })
                .collect()
        };
        let mut all = side(false, &self.v4);
        all.extend(side(true, &self.v6));
        Value::Array(all)
    }
}

// ---- the local set ----

/// The destinations this node accepts packets for: its own addresses and the subnet routes it
/// serves (Go `localNets`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalNets {
    prefixes: Vec<Prefix>,
    v4: Vec<Range>,
    v6: Vec<Range>,
}

impl LocalNets {
    /// Exactly these prefixes.
    pub fn new(prefixes: impl IntoIterator<Item = Prefix>) -> LocalNets {
        let mut out = LocalNets {
            prefixes: prefixes.into_iter().collect(),
            ..LocalNets::default()
        };
        out.prefixes.sort_unstable();
        out.prefixes.dedup();
        for p in &out.prefixes {
            let (v6, r) = prefix_range(p);
            if v6 {
                out.v6.push(r);
            } else {
                out.v4.push(r);
            }
        }
        out
    }

    /// From the self node: its `Addresses`, plus the `AllowedIPs` and `PrimaryRoutes` control
    /// gives it, which hold the subnet routes approved for (and served by) this node. A default
    /// route there (an approved exit node) makes the rest of the internet local, but not
    /// `lans` (this host's connected prefixes) nor the tailnet ranges; see
    /// [`default_route_local_nets`]. The LANs are local only when approved as subnet routes.
    pub fn from_self_node(node: &Node, lans: &[Prefix]) -> LocalNets {
        let mut out = Vec::new();
        for s in node
            .addresses
            .iter()
            .chain(&node.allowed_ips)
            .chain(&node.primary_routes)
        {
            match s.parse::<Prefix>() {
                Ok(p) if p.is_default() => out.extend(default_route_local_nets(p, lans)),
                Ok(p) => out.push(p),
                Err(_) => log::warn!("filter: ignoring bad self address or route {s:?}"),
            }
        }
        LocalNets::new(out)
    }

    /// The prefixes, sorted.
    pub fn prefixes(&self) -> &[Prefix] {
        &self.prefixes
    }

    /// Whether `ip` (IPv6 if `v6`) is local. A linear scan: the set holds a few prefixes.
    fn contains(&self, v6: bool, ip: u128) -> bool {
        let set = if v6 { &self.v6 } else { &self.v4 };
        set.iter().any(|r| r.contains(ip))
    }
}

/// What an approved default route (`0.0.0.0/0` or `::/0`: this node is an exit node) adds to
/// the local set, as Go's `shrinkDefaultRoute` does: the whole family minus this node's own
/// LANs (`lans`), the tailnet ranges and space that is never routed on the internet (loopback,
/// link-local, multicast, IPv4 "this network"). An exit node is a "guest wifi": the internet,
/// and its LANs only when they are approved subnet routes. A few dozen prefixes at most.
pub fn default_route_local_nets(default_route: Prefix, lans: &[Prefix]) -> Vec<Prefix> {
    let v6 = default_route.addr().is_ipv6();
    let (tailnet, fixed): (Prefix, &[&str]) = if v6 {
        (TAILSCALE_ULA_RANGE, &["::1/128", "fe80::/10", "ff00::/8", "::/128"])
    } else {
        (
            CGNAT_RANGE,
            &["127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3", "0.0.0.0/8"],
        )
    };
    let mut exclude: Vec<Prefix> = std::iter::once(tailnet)
        .chain(fixed.iter().filter_map(|s| s.parse().ok()))
        .collect();
    exclude.extend(lans.iter().filter(|p| p.addr().is_ipv6() == v6).copied());
    let mut out = vec![default_route];
    for x in &exclude {
        out = out.into_iter().flat_map(|p| subtract(p, x)).collect();
    }
    out
}

/// `p` without the addresses of `x`: `p` itself, nothing, or the halves of `p` that miss `x`
/// (at most one prefix per bit between the two lengths).
fn subtract(p: Prefix, x: &Prefix) -> Vec<Prefix> {
    if !p.overlaps(x) {
        return vec![p];
    }
    if x.bits() <= p.bits() {
        return Vec::new(); // x covers p
    }
    let mut out = Vec::new();
    let mut cur = p;
    while cur.bits() < x.bits() {
        let (a, b) = halves(cur);
        if a.contains(x.addr()) {
            out.push(b);
            cur = a;
        } else {
            out.push(a);
            cur = b;
        }
    }
    out
}

/// The two halves of a prefix shorter than its family's width.
fn halves(p: Prefix) -> (Prefix, Prefix) {
    let len = p.bits() + 1;
    let lo = Prefix::new_masked(p.addr(), len).expect("shorter than the width");
    let hi_addr = match p.addr() {
        std::net::IpAddr::V4(a) => std::net::IpAddr::V4((u32::from(a) | (1u32 << (32 - u32::from(len)))).into()),
        std::net::IpAddr::V6(a) => std::net::IpAddr::V6((u128::from(a) | (1u128 << (128 - u32::from(len)))).into()),
    };
    (lo, Prefix::new_masked(hi_addr, len).expect("shorter than the width"))
}

// ---- packets ----

/// What the filter reads from a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// Source address (IPv4 in the low 32 bits).
    pub src: u128,
    /// Destination address.
    pub dst: u128,
    /// The transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// TCP/UDP/SCTP source port, else 0.
    pub src_port: u16,
    /// TCP/UDP/SCTP destination port, else 0.
    pub dst_port: u16,
    /// A TCP SYN without ACK: the start of a new connection.
    pub tcp_syn: bool,
    /// An ICMP echo reply or error (Go `IsEchoResponse || IsError`).
    pub icmp_response: bool,
    /// A fragment after the first: it carries no transport header.
    pub later_fragment: bool,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be128(b: &[u8], at: usize) -> Option<u128> {
    Some(u128::from_be_bytes(b.get(at..at + 16)?.try_into().ok()?))
}

/// Reads an IP packet's addresses, protocol and, when present, ports and flags.
pub fn parse(pkt: &[u8]) -> Result<Parsed, DropReason> {
    let first = *pkt.first().ok_or(DropReason::Malformed)?;
    match first >> 4 {
        4 => parse4(pkt).ok_or(DropReason::Malformed)?,
        6 => parse6(pkt).ok_or(DropReason::Malformed),
        _ => Err(DropReason::Malformed),
    }
}

/// IPv4 (RFC 791). The outer `Option` is "malformed"; the inner result carries the fragment
/// verdict.
fn parse4(pkt: &[u8]) -> Option<Result<Parsed, DropReason>> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    let total = usize::from(be16(pkt, 2)?);
    if ihl < 20 || total < ihl || total > pkt.len() {
        return None;
    }
    // Bytes past the total length are link padding, not payload.
    let pkt = &pkt[..total];
    let frag = be16(pkt, 6)?;
    let offset = frag & 0x1fff;
    let mut p = Parsed {
        v6: false,
        src: u128::from(be32(pkt, 12)?),
        dst: u128::from(be32(pkt, 16)?),
        proto: pkt[9],
        src_port: 0,
        dst_port: 0,
        tcp_syn: false,
        icmp_response: false,
        later_fragment: offset != 0,
    };
    if p.later_fragment {
        if offset < MIN_FRAG_BLOCKS {
            return Some(Err(DropReason::Fragment));
        }
        return Some(Ok(p));
    }
    // An unfragmented packet or a first fragment: either must hold the whole transport header.
    transport(&mut p, &pkt[ihl..])?;
    Some(Ok(p))
}

/// IPv6 (RFC 8200), walking the extension headers to the transport header.
fn parse6(pkt: &[u8]) -> Option<Parsed> {
    let end = 40 + usize::from(be16(pkt, 4)?);
    if end > pkt.len() {
        return None;
    }
    let pkt = &pkt[..end];
    let mut p = Parsed {
        v6: true,
        src: be128(pkt, 8)?,
        dst: be128(pkt, 24)?,
        proto: pkt[6],
        src_port: 0,
        dst_port: 0,
        tcp_syn: false,
        icmp_response: false,
        later_fragment: false,
    };
    let mut at = 40;
    for _ in 0..MAX_EXT_HEADERS {
        let len = match p.proto {
            HOP_BY_HOP | ROUTING | DEST_OPTIONS => (usize::from(*pkt.get(at + 1)?) + 1) * 8,
            AUTH_HEADER => (usize::from(*pkt.get(at + 1)?) + 2) * 4,
            FRAGMENT => {
                // A later fragment has no transport header; RFC 8200 requires the first to
                // carry the whole header chain, so it is judged like any packet.
                p.later_fragment = be16(pkt, at + 2)? >> 3 != 0;
                8
            }
            _ => {
                transport(&mut p, &pkt[at..])?;
                return Some(p);
            }
        };
        p.proto = *pkt.get(at)?;
        at += len;
        if at > pkt.len() {
            return None;
        }
        if p.later_fragment {
            return Some(p);
        }
    }
    None
}

/// Reads ports and flags from the transport header `l4`; `None` if it is cut short.
fn transport(p: &mut Parsed, l4: &[u8]) -> Option<()> {
    let icmp = if p.v6 { ICMPV6 } else { ICMP };
    match p.proto {
        TCP | UDP | SCTP => {
            let need = match p.proto {
                TCP => 20,
                UDP => 8,
                _ => 12,
            };
            if l4.len() < need {
                return None;
            }
            p.src_port = be16(l4, 0)?;
            p.dst_port = be16(l4, 2)?;
            if p.proto == TCP {
                let flags = l4[13];
                p.tcp_syn = flags & 0x02 != 0 && flags & 0x10 == 0;
            }
        }
        x if x == icmp => {
            if l4.len() < 8 {
                return None;
            }
            let (ty, code) = (l4[0], l4[1]);
            p.icmp_response = if p.v6 {
                // Echo reply; destination unreachable, packet too big, time exceeded, parameter problem.
                (ty == 129 && code == 0) || matches!(ty, 1..=4)
            } else {
                // Echo reply; destination unreachable, time exceeded, parameter problem.
                (ty == 0 && code == 0) || matches!(ty, 3 | 11 | 12)
            };
        }
        _ => {}
    }
    Some(())
}

/// Multicast and link-local destinations never come from the tunnel (Go `pre`); the GCP
/// metadata address, which Go lets through, is the one link-local exception.
fn not_unicast(v6: bool, dst: u128) -> bool {
    if v6 {
        dst >> 120 == 0xff || dst >> 118 == 0xfe80 >> 6
    } else {
        let a = dst as u32;
        a >> 28 == 0xe || (a >> 16 == 0xa9fe && a != 0xa9fe_a9fe)
    }
}

// ---- the connection table ----

/// A flow as the reply to an outbound packet will look: its source is the remote side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct FlowKey {
    src: u128,
    dst: u128,
    src_port: u16,
    dst_port: u16,
    proto: u8,
    v6: bool,
}

impl FlowKey {
    /// The inbound packet `p`'s flow.
    fn of(p: &Parsed) -> FlowKey {
        FlowKey {
            src: p.src,
            dst: p.dst,
            src_port: p.src_port,
            dst_port: p.dst_port,
            proto: p.proto,
            v6: p.v6,
        }
    }

    /// The flow of the replies to the outbound packet `p`.
    fn reply_to(p: &Parsed) -> FlowKey {
        FlowKey {
            src: p.dst,
            dst: p.src,
            src_port: p.dst_port,
            dst_port: p.src_port,
            proto: p.proto,
            v6: p.v6,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    key: FlowKey,
    /// The coarse clock (seconds) at the flow's last packet.
    last: u32,
    used: bool,
}

/// Recently seen outbound UDP/SCTP flows, so their replies pass: a fixed-size set-associative
/// table (a bucket per hash, [`CONN_WAYS`] entries each, least recently used replaced first).
/// Entries idle longer than the idle time are dead and are reused first.
#[derive(Debug, Clone)]
pub struct ConnTrack {
    slots: Vec<Slot>,
    /// Bucket count minus one (a power of two minus one).
    mask: usize,
    idle: u32,
    seed: u64,
    used: usize,
}

impl ConnTrack {
    /// A table of `capacity` entries (rounded up to whole power-of-two buckets of
    /// [`CONN_WAYS`]), whose entries expire after `idle`. `seed` keys the hash so that flows
    /// cannot be chosen to collide.
    pub fn new(capacity: usize, idle: Duration, seed: u64) -> ConnTrack {
        let buckets = capacity.div_ceil(CONN_WAYS).max(1).next_power_of_two();
        ConnTrack {
            slots: vec![Slot::default(); buckets * CONN_WAYS],
            mask: buckets - 1,
            idle: u32::try_from(idle.as_secs()).unwrap_or(u32::MAX),
            seed,
            used: 0,
        }
    }

    /// Entries the table can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Entries in use, live or expired but not yet reused (never more than the capacity).
    pub fn len(&self) -> usize {
        self.used
    }

    /// True when no flow was ever tracked.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Entries not yet expired at `now` (a scan of the table: for status, not per packet).
    pub fn live(&self, now: u32) -> usize {
        self.slots.iter().filter(|s| self.alive(s, now)).count()
    }

    fn alive(&self, s: &Slot, now: u32) -> bool {
        s.used && now.saturating_sub(s.last) <= self.idle
    }

    fn bucket(&self, k: &FlowKey) -> std::ops::Range<usize> {
        let mut h = FastHasher::default();
        h.write_u64(self.seed);
        h.write_u128(k.src);
        h.write_u128(k.dst);
        h.write_u64(
            u64::from(k.src_port) | u64::from(k.dst_port) << 16 | u64::from(k.proto) << 32 | u64::from(k.v6) << 40,
        );
        // The multiply leaves the high half best mixed.
        let b = (h.finish() >> 32) as usize & self.mask;
        b * CONN_WAYS..(b + 1) * CONN_WAYS
    }

    /// Whether `k` is a live flow; a hit counts as activity and keeps it alive.
    fn lookup_refresh(&mut self, k: &FlowKey, now: u32) -> bool {
        let idle = self.idle;
        let range = self.bucket(k);
        for s in &mut self.slots[range] {
            if s.used && s.key == *k && now.saturating_sub(s.last) <= idle {
                s.last = now;
                return true;
            }
        }
        false
    }

    /// Records (or refreshes) flow `k`, replacing the bucket's free, expired or least recently
    /// used entry.
    fn insert(&mut self, k: FlowKey, now: u32) {
        let range = self.bucket(&k);
        let mut victim = range.start;
        let mut victim_rank = (u8::MAX, u32::MAX);
        for i in range {
            let s = &self.slots[i];
            if s.used && s.key == k {
                self.slots[i].last = now;
                return;
            }
            // Free entries first, then expired ones, then the least recently used.
            let rank = if !s.used {
                (0, 0)
            } else if !self.alive(s, now) {
                (1, s.last)
            } else {
                (2, s.last)
            };
            if rank < victim_rank {
                victim = i;
                victim_rank = rank;
            }
        }
        if !self.slots[victim].used {
            self.used += 1;
        }
        self.slots[victim] = Slot {
            key: k,
            last: now,
            used: true,
        };
    }
}

// ---- the filter ----

/// The stateful packet filter of one node (Go `filter.Filter`, with the shields-up variant as a
/// flag rather than a separate filter).
#[derive(Debug, Clone)]
pub struct Filter {
    rules: Rules,
    local: LocalNets,
    shields_up: bool,
    conns: ConnTrack,
    drops: [u64; DropReason::ALL.len()],
    /// The instant the coarse clock counts from (the first [`Filter::handle_timeout`]).
    epoch: Option<Instant>,
    /// Seconds since `epoch`, as of the last [`Filter::handle_timeout`].
    clock: u32,
}

impl Filter {
    /// A filter that accepts nothing yet (no rules, nothing local), with a connection table of
    /// [`CONN_CAPACITY`] entries keyed by `seed`.
    pub fn new(seed: u64) -> Filter {
        Filter::with_conn_track(ConnTrack::new(CONN_CAPACITY, CONN_IDLE, seed))
    }

    /// As [`Filter::new`], with the given table (tests shrink it).
    pub fn with_conn_track(conns: ConnTrack) -> Filter {
        Filter {
            rules: Rules::default(),
            local: LocalNets::default(),
            shields_up: false,
            conns,
            drops: [0; DropReason::ALL.len()],
            epoch: None,
            clock: 0,
        }
    }

    /// Replaces the rules. Tracked flows survive (Go shares the state across filters).
    pub fn set_rules(&mut self, rules: Rules) {
        self.rules = rules;
    }

    /// The rules in force.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Replaces the local set.
    pub fn set_local(&mut self, local: LocalNets) {
        self.local = local;
    }

    /// The local set in force.
    pub fn local(&self) -> &LocalNets {
        &self.local
    }

    /// Shields up: no new inbound flow, whatever the rules; replies still pass.
    pub fn set_shields_up(&mut self, on: bool) {
        self.shields_up = on;
    }

    /// Whether shields are up.
    pub fn shields_up(&self) -> bool {
        self.shields_up
    }

    /// Advances the coarse clock that stamps tracked flows; call it on a timer (a second's
    /// precision is all the table needs).
    pub fn handle_timeout(&mut self, now: Instant) {
        let epoch = *self.epoch.get_or_insert(now);
        self.clock = u32::try_from(now.saturating_duration_since(epoch).as_secs()).unwrap_or(u32::MAX);
    }

    /// Judges a packet that arrived from the tunnel, counting drops by reason.
    pub fn check_inbound(&mut self, pkt: &[u8]) -> Verdict {
        let v = self.judge(pkt);
        if let Verdict::Drop(r) = v {
            self.drops[r as usize] += 1;
        }
        v
    }

    fn judge(&mut self, pkt: &[u8]) -> Verdict {
        let p = match parse(pkt) {
            Ok(p) => p,
            Err(r) => return Verdict::Drop(r),
        };
        if not_unicast(p.v6, p.dst) {
            return Verdict::Drop(DropReason::NotUnicast);
        }
        if !self.local.contains(p.v6, p.dst) {
            return Verdict::Drop(DropReason::NotLocal);
        }
        if p.later_fragment {
            return Verdict::Accept;
        }
        let icmp = if p.v6 { ICMPV6 } else { ICMP };
        let allowed = match p.proto {
            // Replies and established flows.
            TCP if !p.tcp_syn => true,
            UDP | SCTP if self.conns.lookup_refresh(&FlowKey::of(&p), self.clock) => true,
            x if x == icmp && p.icmp_response => true,
            // A new inbound flow.
            _ if self.shields_up => return Verdict::Drop(DropReason::ShieldsUp),
            TCP | UDP | SCTP => self.rules.match_ports(&p),
            x if x == icmp => self.rules.match_ips_only(&p),
            _ => self.rules.match_all_ports(&p),
        };
        if allowed {
            Verdict::Accept
        } else {
            Verdict::Drop(DropReason::NoRule)
        }
    }

    /// Notes a packet this node sends into the tunnel (read from the TUN): a UDP or SCTP flow is
    /// tracked so that its replies pass. Nothing is dropped here.
    pub fn note_outbound(&mut self, pkt: &[u8]) {
        let Ok(p) = parse(pkt) else { return };
        if matches!(p.proto, UDP | SCTP) && !p.later_fragment && !not_unicast(p.v6, p.dst) {
            self.conns.insert(FlowKey::reply_to(&p), self.clock);
        }
    }

    /// Packets dropped so far, per reason.
    pub fn drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.drops[*r as usize]))
    }

    /// The connection table.
    pub fn conn_track(&self) -> &ConnTrack {
        &self.conns
    }

    /// Everything `tinyscale debug filter` shows.
    pub fn to_json(&self) -> Value {
        // Inserted one by one: `collect()` into a map compiles a sort per call site.
        let mut drops = serde_json::Map::new();
        for (r, n) in self.drops() {
            drops.insert(r.name().into(), json!(n));
        }
        json!({
            "ShieldsUp": self.shields_up,
            "LocalNets": self.local.prefixes().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "Rules": self.rules.to_json(),
            "Skipped": self.rules.skipped(),
            "ConnTrack": {
                "Live": self.conns.live(self.clock),
                "Capacity": self.conns.capacity(),
                "IdleSecs": self.conns.idle,
            },
            "Drops": drops,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::tailcfg::{NetPortRange, PortRange};

    // ---- packet builders ----

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    /// An IP packet from `src` to `dst` carrying `l4` as protocol `proto` (IPv4 or IPv6 after
    /// the addresses' family).
    fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut p = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, proto, 0, 0];
                p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(l4);
                p
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut p = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
                p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(l4);
                p
            }
            _ => panic!("mixed families"),
        }
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
        let mut h = [0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 0x50;
        h[13] = flags;
        ip_packet(ip(src), ip(dst), TCP, &h)
    }

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
        ports_packet(ip(src), sport, ip(dst), dport, UDP)
    }

    /// A TCP SYN, UDP or SCTP packet (or another protocol with a 20-byte payload).
    fn ports_packet(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> Vec<u8> {
        let mut h = [0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        if proto == TCP {
            h[12] = 0x50;
            h[13] = SYN;
        }
        ip_packet(src, dst, proto, &h)
    }

    fn icmp(src: &str, dst: &str, ty: u8) -> Vec<u8> {
        let proto = if ip(src).is_ipv6() { ICMPV6 } else { ICMP };
        ip_packet(ip(src), ip(dst), proto, &[ty, 0, 0, 0, 0, 1, 0, 1])
    }

    fn rule(srcs: &[&str], dsts: &[(&str, u16, u16)], protos: &[i64]) -> FilterRule {
        FilterRule {
            src_ips: srcs.iter().map(|s| s.to_string()).collect(),
            dst_ports: dsts
                .iter()
                .map(|(ip, first, last)| NetPortRange {
                    ip: ip.to_string(),
                    ports: PortRange {
                        first: *first,
                        last: *last,
                    },
                })
                .collect(),
            ip_proto: protos.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn peer_caps_come_from_cap_grants_towards_our_addresses() {
        let rules: Vec<FilterRule> = serde_json::from_value(json!([
            {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]},
            {"SrcIPs": ["100.64.0.0/24"], "CapGrant": [
                {"Dsts": ["100.64.0.1/32"], "CapMap": {"example.com/cap/admin": [{"level": 1}]}},
                {"Dsts": ["100.64.0.99/32"], "CapMap": {"example.com/cap/other": null}}]},
            {"SrcIPs": ["100.64.0.2-100.64.0.3"], "CapGrant": [
                {"Dsts": ["fd7a:115c:a1e0::1/128", "100.64.0.0/10"],
                 "CapMap": {"example.com/cap/admin": [{"level": 2}], "example.com/cap/ping": []}}]},
            {"SrcIPs": ["100.64.0.9"], "CapGrant": [
                {"Dsts": ["*"], "CapMap": {"example.com/cap/nine": []}}]},
            {"SrcIPs": ["*"], "CapGrant": [{"Dsts": "100.64.0.1/32", "CapMap": 5}, 7, null]},
        ]))
        .unwrap();
        let me = [ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")];
        let caps = peer_caps(rules.iter(), ip("100.64.0.2"), &me);
        assert_eq!(
            serde_json::to_value(&caps).unwrap(),
            json!({"example.com/cap/admin": [{"level": 1}, {"level": 2}], "example.com/cap/ping": []}),
            "both grants merge in rule order; a grant to another destination is not ours"
        );
        let caps = peer_caps(rules.iter(), ip("100.64.0.9"), &me);
        assert_eq!(
            caps.keys().collect::<Vec<_>>(),
            ["example.com/cap/admin", "example.com/cap/nine"]
        );
        assert!(
            peer_caps(rules.iter(), ip("100.64.1.2"), &me).is_empty(),
            "outside every source"
        );
        assert!(
            peer_caps(rules.iter(), ip("100.64.0.2"), &[]).is_empty(),
            "no self address"
        );
    }

    const ME4: &str = "100.64.0.1";
    const ME6: &str = "fd7a:115c:a1e0::1";
    const PEER4: &str = "100.64.0.2";
    const PEER6: &str = "fd7a:115c:a1e0::2";

    fn local() -> LocalNets {
        LocalNets::new(
            ["100.64.0.1/32", "fd7a:115c:a1e0::1/128", "192.168.1.0/24"]
                .iter()
                .map(|s| s.parse().expect("prefix")),
        )
    }

    fn filter(rules: &[FilterRule]) -> Filter {
        let mut f = Filter::new(7);
        f.set_rules(Rules::compile(rules));
        f.set_local(local());
        f
    }

    fn dropped(r: DropReason) -> Verdict {
        Verdict::Drop(r)
    }

    use Verdict::Accept;

    // ---- rule forms ----

    #[test]
    fn entry_forms() {
        let r = |lo: &str, hi: &str| {
            let (v6, lo) = ip_bits(ip(lo));
            Entry::Range(
                v6,
                Range {
                    lo,
                    hi: ip_bits(ip(hi)).1,
                },
            )
        };
        assert_eq!(parse_entry("*"), Some(Entry::Any));
        assert_eq!(parse_entry("cap:https://example.com/cap"), Some(Entry::Cap));
        assert_eq!(parse_entry("100.64.0.5"), Some(r("100.64.0.5", "100.64.0.5")));
        assert_eq!(parse_entry("100.64.0.0/10"), Some(r("100.64.0.0", "100.127.255.255")));
        assert_eq!(parse_entry("0.0.0.0/0"), Some(r("0.0.0.0", "255.255.255.255")));
        assert_eq!(parse_entry("10.0.0.7/32"), Some(r("10.0.0.7", "10.0.0.7")));
        assert_eq!(
            parse_entry("fd7a:115c:a1e0::/48"),
            Some(r("fd7a:115c:a1e0::", "fd7a:115c:a1e0:ffff:ffff:ffff:ffff:ffff"))
        );
        assert_eq!(
            parse_entry("::/0"),
            Some(r("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"))
        );
        assert_eq!(
            parse_entry("100.64.0.10-100.64.0.20"),
            Some(r("100.64.0.10", "100.64.0.20"))
        );
        assert_eq!(
            parse_entry("2001:db8::1-2001:db8::800"),
            Some(r("2001:db8::1", "2001:db8::800"))
        );
        for bad in [
            "100.64.0.1/10", // host bits set (Go refuses)
            "100.64.0.0/33", // too long
            "100.64.0.0/",   // no length
            "100.64.0.0/+8", // not digits
            "100.64.0.20-100.64.0.10",
            "100.64.0.1-fd7a::1",
            "1-2-3",
            "host.example",
            "",
        ] {
            assert_eq!(parse_entry(bad), None, "{bad}");
        }
    }

    #[test]
    fn compile_skips_bad_entries_and_keeps_the_rest() {
        let r = Rules::compile(&[rule(
            &["bogus", "cap:x", PEER4],
            &[("nonsense", 0, 65535), (ME4, 22, 22)],
            &[],
        )]);
        assert_eq!(r.v4.len(), 1);
        assert!(r.v6.is_empty(), "no IPv6 source or destination");
        assert_eq!(r.skipped().len(), 3, "{:?}", r.skipped());
        let f = |rules: &Rules| {
            let mut f = Filter::new(1);
            f.set_rules(rules.clone());
            f.set_local(local());
            f
        };
        assert_eq!(f(&r).check_inbound(&tcp(PEER4, 1000, ME4, 22, SYN)), Accept);
        // A rule whose every source is unusable grants nothing.
        let r = Rules::compile(&[rule(&["cap:x"], &[("*", 0, 65535)], &[])]);
        assert!(r.is_empty());
    }

    #[test]
    fn tcp_syn_by_destination_port() {
        let mut f = filter(&[rule(
            &["100.64.0.0/10"],
            &[(ME4, 22, 22), ("192.168.1.0/24", 80, 443)],
            &[],
        )]);
        assert_eq!(f.check_inbound(&tcp(PEER4, 40000, ME4, 22, SYN)), Accept);
        assert_eq!(
            f.check_inbound(&tcp(PEER4, 40000, ME4, 23, SYN)),
            dropped(DropReason::NoRule)
        );
        assert_eq!(f.check_inbound(&tcp(PEER4, 40000, "192.168.1.9", 443, SYN)), Accept);
        assert_eq!(
            f.check_inbound(&tcp(PEER4, 40000, "192.168.1.9", 22, SYN)),
            dropped(DropReason::NoRule)
        );
        // The source must be in SrcIPs.
        assert_eq!(
            f.check_inbound(&tcp("10.0.0.1", 40000, ME4, 22, SYN)),
            dropped(DropReason::NoRule)
        );
        // Segments of established connections (ours or theirs) pass: only a bare SYN opens one.
        assert_eq!(f.check_inbound(&tcp(PEER4, 40000, ME4, 23, ACK)), Accept);
        assert_eq!(f.check_inbound(&tcp(PEER4, 40000, ME4, 23, SYN | ACK)), Accept);
        assert_eq!(f.check_inbound(&tcp(PEER4, 40000, ME4, 23, 0x04)), Accept, "RST");
    }

    #[test]
    fn ip_ranges_and_wildcards() {
        let mut f = filter(&[rule(&["100.64.0.10-100.64.0.20", PEER6], &[("*", 0, 65535)], &[])]);
        assert_eq!(f.check_inbound(&tcp("100.64.0.10", 1, ME4, 5, SYN)), Accept);
        assert_eq!(f.check_inbound(&tcp("100.64.0.20", 1, ME4, 5, SYN)), Accept);
        assert_eq!(
            f.check_inbound(&tcp("100.64.0.21", 1, ME4, 5, SYN)),
            dropped(DropReason::NoRule)
        );
        assert_eq!(f.check_inbound(&tcp(PEER6, 1, ME6, 5, SYN)), Accept);
        assert_eq!(
            f.check_inbound(&tcp("fd7a:115c:a1e0::3", 1, ME6, 5, SYN)),
            dropped(DropReason::NoRule)
        );
    }

    #[test]
    fn protocols_listed_or_default() {
        let mut f = filter(&[
            rule(&[PEER4], &[(ME4, 53, 53)], &[17]),
            rule(&[PEER4], &[(ME4, 7000, 7000)], &[132]),
        ]);
        assert_eq!(f.check_inbound(&udp(PEER4, 5353, ME4, 53)), Accept);
        assert_eq!(
            f.check_inbound(&tcp(PEER4, 5353, ME4, 53, SYN)),
            dropped(DropReason::NoRule)
        );
        assert_eq!(
            f.check_inbound(&ports_packet(ip(PEER4), 1, ip(ME4), 7000, SCTP)),
            Accept
        );
        assert_eq!(
            f.check_inbound(&ports_packet(ip(PEER4), 1, ip(ME4), 7001, SCTP)),
            dropped(DropReason::NoRule)
        );
        // The default set is TCP, UDP, ICMP: SCTP needs to be listed.
        let mut f = filter(&[rule(&[PEER4], &[(ME4, 0, 65535)], &[])]);
        assert_eq!(f.check_inbound(&udp(PEER4, 1, ME4, 9)), Accept);
        assert_eq!(
            f.check_inbound(&ports_packet(ip(PEER4), 1, ip(ME4), 9, SCTP)),
            dropped(DropReason::NoRule)
        );
        // Numbers outside 0-255 are ignored, not wrapped (300 is not 44).
        let mut f = filter(&[rule(&[PEER4], &[(ME4, 0, 65535)], &[300, -1, 17])]);
        assert_eq!(f.rules.v4[0].protos.list(), vec![17]);
        assert_eq!(
            f.check_inbound(&tcp(PEER4, 1, ME4, 9, SYN)),
            dropped(DropReason::NoRule)
        );
    }

    #[test]
    fn icmp_needs_any_open_port_and_replies_always_pass() {
        // A TCP-only rule for port 22 still lets pings through (Go matchIPsOnly).
        let mut f = filter(&[rule(&[PEER4, PEER6], &[(ME4, 22, 22), (ME6, 22, 22)], &[6])]);
        assert_eq!(f.check_inbound(&icmp(PEER4, ME4, 8)), Accept, "echo request");
        assert_eq!(f.check_inbound(&icmp(PEER6, ME6, 128)), Accept, "echo request v6");
        assert_eq!(
            f.check_inbound(&icmp("100.64.0.3", ME4, 8)),
            dropped(DropReason::NoRule)
        );
        assert_eq!(
            f.check_inbound(&icmp("fd7a:115c:a1e0::3", ME6, 128)),
            dropped(DropReason::NoRule)
        );
        // Echo replies and errors need no rule.
        for ty in [0, 3, 11, 12] {
            assert_eq!(f.check_inbound(&icmp("100.64.0.3", ME4, ty)), Accept, "type {ty}");
        }
        for ty in [129, 1, 2, 3, 4] {
            assert_eq!(
                f.check_inbound(&icmp("fd7a:115c:a1e0::3", ME6, ty)),
                Accept,
                "v6 type {ty}"
            );
        }
        // Other ICMP types are new flows.
        assert_eq!(
            f.check_inbound(&icmp("100.64.0.3", ME4, 13)),
            dropped(DropReason::NoRule)
        );
        // ICMPv4's number inside IPv6 is just another protocol.
        let p = ip_packet(ip(PEER6), ip(ME6), ICMP, &[0; 8]);
        assert_eq!(f.check_inbound(&p), dropped(DropReason::NoRule));
    }

    #[test]
    fn portless_protocols_need_all_ports() {
        let gre = 47;
        let mut f = filter(&[
            rule(&[PEER4], &[(ME4, 0, 65535)], &[47]),
            rule(&["100.64.0.3"], &[(ME4, 1, 65535)], &[47]),
        ]);
        assert_eq!(f.check_inbound(&ip_packet(ip(PEER4), ip(ME4), gre, &[0; 4])), Accept);
        assert_eq!(
            f.check_inbound(&ip_packet(ip("100.64.0.3"), ip(ME4), gre, &[0; 4])),
            dropped(DropReason::NoRule)
        );
        // Not in the default set.
        let mut f = filter(&FilterRule::allow_all());
        assert_eq!(
            f.check_inbound(&ip_packet(ip(PEER4), ip(ME4), gre, &[0; 4])),
            dropped(DropReason::NoRule)
        );
    }

    // ---- state ----

    #[test]
    fn udp_replies_to_our_flows_pass() {
        let mut f = filter(&[]);
        let t0 = Instant::now();
        f.handle_timeout(t0);
        assert_eq!(
            f.check_inbound(&udp(PEER4, 53, ME4, 40000)),
            dropped(DropReason::NoRule)
        );
        f.note_outbound(&udp(ME4, 40000, PEER4, 53));
        assert_eq!(f.check_inbound(&udp(PEER4, 53, ME4, 40000)), Accept);
        // Only that exact flow.
        assert_eq!(
            f.check_inbound(&udp(PEER4, 54, ME4, 40000)),
            dropped(DropReason::NoRule)
        );
        assert_eq!(
            f.check_inbound(&udp(PEER4, 53, ME4, 40001)),
            dropped(DropReason::NoRule)
        );
        assert_eq!(
            f.check_inbound(&udp("100.64.0.3", 53, ME4, 40000)),
            dropped(DropReason::NoRule)
        );
        // Replies keep it alive; silence lets it expire.
        f.handle_timeout(t0 + CONN_IDLE);
        assert_eq!(f.check_inbound(&udp(PEER4, 53, ME4, 40000)), Accept);
        f.handle_timeout(t0 + CONN_IDLE * 2 + Duration::from_secs(1));
        assert_eq!(
            f.check_inbound(&udp(PEER4, 53, ME4, 40000)),
            dropped(DropReason::NoRule)
        );
        // IPv6 and SCTP too; a subnet host's flow as well (the router forwards its replies).
        f.note_outbound(&udp(ME6, 1, PEER6, 2));
        assert_eq!(f.check_inbound(&udp(PEER6, 2, ME6, 1)), Accept);
        f.note_outbound(&ports_packet(ip("192.168.1.7"), 9, ip(PEER4), 7000, SCTP));
        assert_eq!(
            f.check_inbound(&ports_packet(ip(PEER4), 7000, ip("192.168.1.7"), 9, SCTP)),
            Accept
        );
        // A tracked UDP flow says nothing about TCP SYNs on the same ports.
        assert_eq!(
            f.check_inbound(&tcp(PEER6, 2, ME6, 1, SYN)),
            dropped(DropReason::NoRule)
        );
    }

    #[test]
    fn flows_survive_rule_changes() {
        let mut f = filter(&[]);
        f.note_outbound(&udp(ME4, 5000, PEER4, 6000));
        f.set_rules(Rules::compile(&FilterRule::allow_all()));
        f.set_rules(Rules::default());
        assert_eq!(f.check_inbound(&udp(PEER4, 6000, ME4, 5000)), Accept);
    }

    #[test]
    fn shields_up_drops_new_flows_only() {
        let mut f = filter(&FilterRule::allow_all());
        f.note_outbound(&udp(ME4, 40000, PEER4, 53));
        f.set_shields_up(true);
        assert_eq!(
            f.check_inbound(&tcp(PEER4, 1, ME4, 22, SYN)),
            dropped(DropReason::ShieldsUp)
        );
        assert_eq!(f.check_inbound(&udp(PEER4, 1, ME4, 53)), dropped(DropReason::ShieldsUp));
        assert_eq!(f.check_inbound(&icmp(PEER4, ME4, 8)), dropped(DropReason::ShieldsUp));
        assert_eq!(
            f.check_inbound(&tcp(PEER6, 1, ME6, 22, SYN)),
            dropped(DropReason::ShieldsUp)
        );
        // Replies to our own flows.
        assert_eq!(f.check_inbound(&udp(PEER4, 53, ME4, 40000)), Accept);
        assert_eq!(f.check_inbound(&tcp(PEER4, 22, ME4, 1, SYN | ACK)), Accept);
        assert_eq!(f.check_inbound(&icmp(PEER4, ME4, 0)), Accept);
        // The local check still comes first.
        assert_eq!(
            f.check_inbound(&tcp(PEER4, 22, "10.9.9.9", 1, ACK)),
            dropped(DropReason::NotLocal)
        );
        f.set_shields_up(false);
        assert_eq!(f.check_inbound(&tcp(PEER4, 1, ME4, 22, SYN)), Accept);
        let counted: Vec<(DropReason, u64)> = f.drops().filter(|(_, n)| *n > 0).collect();
        assert_eq!(counted, vec![(DropReason::NotLocal, 1), (DropReason::ShieldsUp, 4)]);
    }

    // ---- the local set ----

    #[test]
    fn non_local_destinations_are_dropped_whatever_the_rules() {
        // Allow-all rules, yet a peer cannot use a subnet router to reach other addresses.
        let mut f = filter(&FilterRule::allow_all());
        assert_eq!(f.check_inbound(&tcp(PEER4, 1, "192.168.1.20", 80, SYN)), Accept);
        assert_eq!(
            f.check_inbound(&tcp(PEER4, 1, "192.168.2.20", 80, SYN)),
            dropped(DropReason::NotLocal)
        );
        assert_eq!(
            f.check_inbound(&tcp(PEER4, 1, "8.8.8.8", 443, ACK)),
            dropped(DropReason::NotLocal)
        );
        assert_eq!(
            f.check_inbound(&udp(PEER4, 1, "100.64.0.9", 53)),
            dropped(DropReason::NotLocal)
        );
        assert_eq!(
            f.check_inbound(&udp(PEER6, 1, "2001:db8::1", 53)),
            dropped(DropReason::NotLocal)
        );
        // Not even as replies to flows we track.
        f.note_outbound(&udp("192.168.2.20", 5, PEER4, 6));
        assert_eq!(
            f.check_inbound(&udp(PEER4, 6, "192.168.2.20", 5)),
            dropped(DropReason::NotLocal)
        );
        // Multicast and link-local are refused before anything else.
        assert_eq!(
            f.check_inbound(&udp(PEER4, 1, "224.0.0.251", 5353)),
            dropped(DropReason::NotUnicast)
        );
        assert_eq!(
            f.check_inbound(&udp(PEER4, 1, "169.254.1.1", 5353)),
            dropped(DropReason::NotUnicast)
        );
        assert_eq!(
            f.check_inbound(&udp(PEER6, 1, "ff02::fb", 5353)),
            dropped(DropReason::NotUnicast)
        );
        assert_eq!(
            f.check_inbound(&udp(PEER6, 1, "fe80::1", 5353)),
            dropped(DropReason::NotUnicast)
        );
        // The GCP metadata address is link-local but allowed past that check (then it is not local).
        assert_eq!(
            f.check_inbound(&udp(PEER4, 1, "169.254.169.254", 80)),
            dropped(DropReason::NotLocal)
        );
        // No local set at all (no self node yet): everything is dropped.
        let mut f = Filter::new(1);
        f.set_rules(Rules::compile(&FilterRule::allow_all()));
        assert_eq!(
            f.check_inbound(&tcp(PEER4, 1, ME4, 22, ACK)),
            dropped(DropReason::NotLocal)
        );
    }

    #[test]
    fn local_nets_from_the_self_node() {
        let me = Node {
            addresses: vec!["100.64.0.1/32".into(), "fd7a:115c:a1e0::1/128".into()],
            allowed_ips: vec![
                "100.64.0.1/32".into(),
                "fd7a:115c:a1e0::1/128".into(),
                "192.168.1.0/24".into(),
                "0.0.0.0/0".into(),
                "::/0".into(),
            ],
            primary_routes: vec!["192.168.1.0/24".into(), "10.1.0.0/16".into(), "junk".into()],
            ..Node::default()
        };
        let lans: Vec<Prefix> = vec!["192.168.1.0/24".parse().unwrap(), "192.168.7.0/24".parse().unwrap()];
        let l = LocalNets::from_self_node(&me, &lans);
        let local = |a: &str| {
            let (v6, bits) = ip_bits(ip(a));
            l.contains(v6, bits)
        };
        // Approved subnet routes are local, an approved LAN too.
        assert!(local("10.1.200.3") && local("192.168.1.9") && local("100.64.0.1"));
        // An approved exit node makes the internet local, both families...
        assert!(local("8.8.8.8") && local("198.51.100.1") && local("2001:db8::1"));
        // ...but not a LAN that is not approved, nor the tailnet, loopback or link-local.
        for a in [
            "192.168.7.1",
            "100.64.0.9",
            "127.0.0.1",
            "169.254.1.1",
            "fd7a:115c:a1e0::9",
            "fe80::1",
        ] {
            assert!(!local(a), "{a} must not be local");
        }
        let no_exit = Node {
            allowed_ips: me.allowed_ips[..3].to_vec(),
            ..me.clone()
        };
        let l = LocalNets::from_self_node(&no_exit, &lans);
        let text: Vec<String> = l.prefixes().iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "10.1.0.0/16",
                "100.64.0.1/32",
                "192.168.1.0/24",
                "fd7a:115c:a1e0::1/128"
            ],
            "without an approved exit route only the subnet routes count"
        );
        assert!(!l.contains(false, ip_bits(ip("8.8.8.8")).1));
        // AllowedIPs null (absent) = Addresses.
        let bare = Node {
            addresses: vec!["100.64.0.1/32".into()],
            ..Node::default()
        };
        assert_eq!(LocalNets::from_self_node(&bare, &[]).prefixes().len(), 1);
    }

    #[test]
    fn no_rules_denies_new_inbound_flows() {
        // Before control sends a filter (or after `[]`): Go's deny-all.
        let mut f = filter(&[]);
        assert_eq!(
            f.check_inbound(&tcp(PEER4, 1, ME4, 22, SYN)),
            dropped(DropReason::NoRule)
        );
        assert_eq!(f.check_inbound(&icmp(PEER4, ME4, 8)), dropped(DropReason::NoRule));
        assert_eq!(f.check_inbound(&tcp(PEER4, 22, ME4, 1, SYN | ACK)), Accept);
    }

    // ---- parsing ----

    #[test]
    fn malformed_packets_are_dropped() {
        let mut f = filter(&FilterRule::allow_all());
        let good = tcp(PEER4, 1, ME4, 22, SYN);
        assert_eq!(f.check_inbound(&good), Accept);
        assert_eq!(f.check_inbound(&[]), dropped(DropReason::Malformed));
        assert_eq!(f.check_inbound(&good[..19]), dropped(DropReason::Malformed));
        assert_eq!(
            f.check_inbound(&good[..30]),
            dropped(DropReason::Malformed),
            "total length beyond data"
        );
        let mut bad = good.clone();
        bad[0] = 0x44; // IHL 16 bytes
        assert_eq!(f.check_inbound(&bad), dropped(DropReason::Malformed));
        let mut bad = good.clone();
        bad[0] = 0x55;
        assert_eq!(f.check_inbound(&bad), dropped(DropReason::Malformed));
        // A TCP header cut short (consistent IP lengths).
        let short = ip_packet(ip(PEER4), ip(ME4), TCP, &[0; 12]);
        assert_eq!(f.check_inbound(&short), dropped(DropReason::Malformed));
        let short = ip_packet(ip(PEER6), ip(ME6), UDP, &[0; 7]);
        assert_eq!(f.check_inbound(&short), dropped(DropReason::Malformed));
        let short = ip_packet(ip(PEER4), ip(ME4), ICMP, &[8, 0, 0]);
        assert_eq!(f.check_inbound(&short), dropped(DropReason::Malformed));
        // Trailing padding past the total length is fine.
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(f.check_inbound(&padded), Accept);
        let v6 = tcp(PEER6, 1, ME6, 22, SYN);
        assert_eq!(f.check_inbound(&v6[..50]), dropped(DropReason::Malformed));
        assert_eq!(f.drops().map(|(_, n)| n).sum::<u64>(), 9);
    }

    /// IPv4 with fragment offset `offset` (8-byte blocks) and the MF flag.
    fn frag4(offset: u16, more: bool, l4: &[u8]) -> Vec<u8> {
        let mut p = ip_packet(ip(PEER4), ip(ME4), UDP, l4);
        let v = offset | if more { 0x2000 } else { 0 };
        p[6..8].copy_from_slice(&v.to_be_bytes());
        p
    }

    #[test]
    fn ipv4_fragments() {
        let mut f = filter(&[rule(&[PEER4], &[(ME4, 53, 53)], &[])]);
        let mut udp_hdr = [0u8; 8];
        udp_hdr[2..4].copy_from_slice(&53u16.to_be_bytes());
        let mut big = udp_hdr.to_vec();
        big.extend_from_slice(&[0; 100]);
        // The first fragment is judged like a whole packet.
        assert_eq!(f.check_inbound(&frag4(0, true, &big)), Accept);
        udp_hdr[2..4].copy_from_slice(&54u16.to_be_bytes());
        assert_eq!(f.check_inbound(&frag4(0, true, &udp_hdr)), dropped(DropReason::NoRule));
        assert_eq!(
            f.check_inbound(&frag4(0, true, &udp_hdr[..4])),
            dropped(DropReason::Malformed)
        );
        // Later fragments pass (to local addresses), except those overlapping the transport header.
        assert_eq!(f.check_inbound(&frag4(MIN_FRAG_BLOCKS, false, &[0; 40])), Accept);
        assert_eq!(
            f.check_inbound(&frag4(1, true, &[0; 40])),
            dropped(DropReason::Fragment)
        );
        let mut elsewhere = frag4(200, false, &[0; 40]);
        elsewhere[16..20].copy_from_slice(&[10, 9, 9, 9]);
        assert_eq!(f.check_inbound(&elsewhere), dropped(DropReason::NotLocal));
    }

    /// IPv6 with the given extension headers (each `(type, bytes)`) before `proto`'s `l4`.
    fn ext6(headers: &[(u8, Vec<u8>)], proto: u8, l4: &[u8], dst: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, (_, bytes)) in headers.iter().enumerate() {
            let next = headers.get(i + 1).map_or(proto, |h| h.0);
            let mut b = bytes.clone();
            b[0] = next;
            body.extend_from_slice(&b);
        }
        body.extend_from_slice(l4);
        let first = headers.first().map_or(proto, |h| h.0);
        ip_packet(ip(PEER6), ip(dst), first, &body)
    }

    #[test]
    fn ipv6_extension_headers_and_fragments() {
        let mut f = filter(&[rule(&[PEER6], &[(ME6, 22, 22)], &[])]);
        let syn22 = &tcp(PEER6, 1000, ME6, 22, SYN)[40..];
        let syn23 = &tcp(PEER6, 1000, ME6, 23, SYN)[40..];
        let hop = (HOP_BY_HOP, vec![0u8; 8]);
        let dest = (DEST_OPTIONS, vec![0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            f.check_inbound(&ext6(&[hop.clone(), dest.clone()], TCP, syn22, ME6)),
            Accept
        );
        assert_eq!(
            f.check_inbound(&ext6(&[hop.clone(), dest.clone()], TCP, syn23, ME6)),
            dropped(DropReason::NoRule)
        );
        // A first fragment carries the transport header; later ones pass if local.
        let frag = |offset: u16, more: bool| {
            let v = offset << 3 | u16::from(more);
            let mut h = vec![0u8; 8];
            h[2..4].copy_from_slice(&v.to_be_bytes());
            (FRAGMENT, h)
        };
        assert_eq!(f.check_inbound(&ext6(&[frag(0, true)], TCP, syn22, ME6)), Accept);
        assert_eq!(
            f.check_inbound(&ext6(&[frag(0, true)], TCP, syn23, ME6)),
            dropped(DropReason::NoRule)
        );
        assert_eq!(
            f.check_inbound(&ext6(&[hop.clone(), frag(100, false)], TCP, &[0; 16], ME6)),
            Accept
        );
        assert_eq!(
            f.check_inbound(&ext6(&[frag(100, false)], TCP, &[0; 16], "fd7a:115c:a1e0::9")),
            dropped(DropReason::NotLocal)
        );
        // Headers past the end, or an endless chain, are malformed.
        let mut cut = ext6(std::slice::from_ref(&dest), TCP, &[], ME6);
        cut.truncate(44);
        cut[4..6].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(f.check_inbound(&cut), dropped(DropReason::Malformed));
        let many: Vec<(u8, Vec<u8>)> = (0..MAX_EXT_HEADERS + 1).map(|_| (DEST_OPTIONS, vec![0u8; 8])).collect();
        assert_eq!(
            f.check_inbound(&ext6(&many, TCP, syn22, ME6)),
            dropped(DropReason::Malformed)
        );
    }

    // ---- the connection table ----

    fn key(n: u16) -> FlowKey {
        FlowKey {
            src: 1,
            dst: 2,
            src_port: n,
            dst_port: 53,
            proto: UDP,
            v6: false,
        }
    }

    #[test]
    fn conn_track_evicts_least_recently_used_within_a_bucket() {
        // One bucket: plain LRU over four entries.
        let mut t = ConnTrack::new(CONN_WAYS, Duration::from_secs(100), 0);
        assert_eq!(t.capacity(), CONN_WAYS);
        for n in 0..4 {
            t.insert(key(n), u32::from(n));
        }
        assert!(t.lookup_refresh(&key(0), 10), "refreshed: now the most recent");
        t.insert(key(9), 11);
        assert!(!t.lookup_refresh(&key(1), 11), "the least recently used went");
        for n in [0, 2, 3, 9] {
            assert!(t.lookup_refresh(&key(n), 12), "{n}");
        }
        assert_eq!(t.len(), 4);
        // Expired entries are reused before live ones.
        t.insert(key(2), 200);
        t.insert(key(20), 201);
        assert!(t.lookup_refresh(&key(2), 201));
        assert_eq!(t.live(201), 2);
        assert_eq!(ConnTrack::new(4095, CONN_IDLE, 0).capacity(), 4096);
        assert_eq!(ConnTrack::new(0, CONN_IDLE, 0).capacity(), CONN_WAYS);
    }

    #[test]
    fn debug_json_shows_rules_local_nets_and_counters() {
        let mut f = filter(&[
            rule(
                &["100.64.0.10-100.64.0.20", "*"],
                &[(ME4, 22, 22), ("192.168.1.0/24", 0, 65535)],
                &[6],
            ),
            rule(&["cap:x"], &[("*", 0, 65535)], &[]),
        ]);
        f.check_inbound(&[0]);
        let v = f.to_json();
        assert_eq!(v["ShieldsUp"], false);
        assert_eq!(
            v["LocalNets"],
            json!(["100.64.0.1/32", "192.168.1.0/24", "fd7a:115c:a1e0::1/128"])
        );
        assert_eq!(
            v["Rules"][0],
            json!({"Family": "IPv4", "Srcs": ["100.64.0.10-100.64.0.20", "0.0.0.0/0"],
                   "Dsts": ["100.64.0.1:22", "192.168.1.0/24:*"], "IPProto": [6]})
        );
        assert_eq!(v["Rules"].as_array().map(Vec::len), Some(1), "{v}");
        assert_eq!(v["Skipped"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["Drops"]["Malformed"], 1);
        assert_eq!(v["ConnTrack"]["Capacity"], CONN_CAPACITY);
        assert_eq!(range_text(true, Range { lo: 0, hi: u128::MAX }), "::/0");
    }

    // ---- properties ----

    /// Addresses per family in the pool.
    const POOL: u8 = 4;

    /// A small address pool per family, so random rules and packets meet often.
    fn pool(v6: bool, i: u8) -> IpAddr {
        if v6 {
            IpAddr::from([0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, i])
        } else {
            IpAddr::from([100, 64, 0, i])
        }
    }

    /// What a generated entry means, for the reference matcher.
    #[derive(Debug, Clone)]
    enum RefSet {
        Any,
        Range(bool, u8, u8),
    }

    impl RefSet {
        fn text(&self) -> String {
            match *self {
                RefSet::Any => "*".into(),
                RefSet::Range(v6, a, b) if a == b => pool(v6, a).to_string(),
                RefSet::Range(v6, a, b) => {
                    // Aligned power-of-two blocks are written as CIDRs, the rest as ranges.
                    let size = u32::from(b - a) + 1;
                    if size.is_power_of_two() && u32::from(a) % size == 0 {
                        let len = if v6 { 128 } else { 32 } - size.trailing_zeros();
                        format!("{}/{len}", pool(v6, a))
                    } else {
                        format!("{}-{}", pool(v6, a), pool(v6, b))
                    }
                }
            }
        }

        fn contains(&self, v6: bool, i: u8) -> bool {
            match *self {
                RefSet::Any => true,
                RefSet::Range(f, a, b) => f == v6 && a <= i && i <= b,
            }
        }
    }

    fn ref_set() -> impl Strategy<Value = RefSet> {
        prop_oneof![
            2 => Just(RefSet::Any),
            5 => (any::<bool>(), 0u8..POOL, 0u8..POOL).prop_map(|(v6, a, b)| RefSet::Range(v6, a.min(b), a.max(b))),
        ]
    }

    #[derive(Debug, Clone)]
    struct RefRule {
        srcs: Vec<RefSet>,
        dsts: Vec<(RefSet, u16, u16)>,
        protos: Vec<i64>,
    }

    impl RefRule {
        fn to_rule(&self) -> FilterRule {
            FilterRule {
                src_ips: self.srcs.iter().map(RefSet::text).collect(),
                dst_ports: self
                    .dsts
                    .iter()
                    .map(|(s, first, last)| NetPortRange {
                        ip: s.text(),
                        ports: PortRange {
                            first: *first,
                            last: *last,
                        },
                    })
                    .collect(),
                ip_proto: self.protos.clone(),
                ..Default::default()
            }
        }

        fn has_proto(&self, p: u8) -> bool {
            if self.protos.is_empty() {
                DEFAULT_PROTOS.contains(&p)
            } else {
                self.protos.contains(&i64::from(p))
            }
        }
    }

    fn port() -> impl Strategy<Value = u16> {
        prop_oneof![
            3 => prop_oneof![Just(0u16), Just(22), Just(53), Just(443), Just(65535)],
            1 => any::<u16>(),
        ]
    }

    fn ref_rule() -> impl Strategy<Value = RefRule> {
        (
            prop::collection::vec(ref_set(), 0..4),
            // Port ranges: mostly ordered, sometimes reversed (they then match nothing).
            prop::collection::vec(
                (ref_set(), port(), port())
                    .prop_map(|(s, a, b)| if a % 7 == 0 { (s, b, a) } else { (s, a.min(b), a.max(b)) }),
                0..4,
            ),
            prop::collection::vec(
                prop_oneof![Just(6i64), Just(17), Just(1), Just(58), Just(132), Just(47), Just(300)],
                0..3,
            ),
        )
            .prop_map(|(srcs, dsts, protos)| RefRule { srcs, dsts, protos })
    }

    /// The straightforward reading of spec §9 and Go's `runIn4`/`runIn6` for a new inbound flow.
    fn reference(rules: &[RefRule], v6: bool, src: u8, dst: u8, proto: u8, dport: u16) -> bool {
        let icmp = if v6 { ICMPV6 } else { ICMP };
        rules.iter().any(|r| {
            r.srcs.iter().any(|s| s.contains(v6, src))
                && r.dsts.iter().any(|(d, first, last)| {
                    d.contains(v6, dst)
                        && match proto {
                            TCP | UDP | SCTP => r.has_proto(proto) && *first <= dport && dport <= *last,
                            x if x == icmp => true,
                            _ => r.has_proto(proto) && *first == 0 && *last == 65535,
                        }
                })
        })
    }

    proptest! {
        /// The compiled filter accepts a new inbound flow iff some rule matches it.
        #[test]
        fn compiled_rules_match_the_reference(
            rules in prop::collection::vec(ref_rule(), 0..6),
            packets in prop::collection::vec(
                (any::<bool>(), 0u8..POOL, 0u8..POOL, prop_oneof![Just(6u8), Just(17), Just(132), Just(1), Just(58), Just(47)], port()),
                1..20,
            ),
        ) {
            let wire: Vec<FilterRule> = rules.iter().map(RefRule::to_rule).collect();
            let mut f = Filter::new(3);
            f.set_rules(Rules::compile(&wire));
            f.set_local(LocalNets::new(["0.0.0.0/0", "::/0"].iter().map(|s| s.parse().expect("prefix"))));
            prop_assert!(f.rules().skipped().is_empty(), "{:?}", f.rules().skipped());
            for (v6, src, dst, proto, dport) in packets {
                let (s, d) = (pool(v6, src), pool(v6, dst));
                let pkt = if proto == ICMP || proto == ICMPV6 {
                    // An echo request of the packet's own family (else "just a protocol").
                    let ty = if proto == ICMPV6 { 128 } else { 8 };
                    ip_packet(s, d, proto, &[ty, 0, 0, 0, 0, 1, 0, 1])
                } else {
                    ports_packet(s, 40000, d, dport, proto)
                };
                let want = reference(&rules, v6, src, dst, proto, dport);
                let got = f.check_inbound(&pkt);
                prop_assert_eq!(got == Verdict::Accept, want, "packet {:?} {} -> {}:{} proto {} rules {:?}", v6, s, d, dport, proto, wire);
                if !want {
                    prop_assert_eq!(got, Verdict::Drop(DropReason::NoRule));
                }
            }
        }

        /// Whatever flows are fed, in whatever order and timing, the table holds at most its
        /// capacity, and the flow just noted is always found.
        #[test]
        fn conn_track_stays_within_capacity(
            buckets in 1usize..8,
            ops in prop::collection::vec((any::<bool>(), 0u16..64, 0u32..3), 1..400),
        ) {
            let mut t = ConnTrack::new(buckets * CONN_WAYS, Duration::from_secs(5), 11);
            let cap = t.capacity();
            let mut now = 0u32;
            for (insert, n, dt) in ops {
                now += dt;
                if insert {
                    t.insert(key(n), now);
                    prop_assert!(t.lookup_refresh(&key(n), now));
                } else {
                    t.lookup_refresh(&key(n), now);
                }
                prop_assert!(t.len() <= cap);
                prop_assert!(t.live(now) <= t.len());
            }
        }

        /// The same through the filter, with random outbound packets of every kind.
        #[test]
        fn filter_table_is_bounded(pkts in prop::collection::vec((any::<bool>(), any::<u16>(), any::<u16>(), 0u8..16), 1..300)) {
            let mut f = Filter::with_conn_track(ConnTrack::new(8, CONN_IDLE, 5));
            for (v6, sport, dport, peer) in pkts {
                f.note_outbound(&ports_packet(pool(v6, 1), sport, pool(v6, peer), dport, UDP));
                prop_assert!(f.conn_track().len() <= f.conn_track().capacity());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..120)) {
            let mut f = filter(&FilterRule::allow_all());
            let _ = f.check_inbound(&b);
            f.note_outbound(&b);
            let mut v4 = b.clone();
            if let Some(x) = v4.first_mut() { *x = 0x45 }
            let _ = f.check_inbound(&v4);
            let mut v6 = b;
            if let Some(x) = v6.first_mut() { *x = 0x60 }
            let _ = f.check_inbound(&v6);
        }

        /// Subtracting prefixes leaves exactly the addresses outside them, as disjoint prefixes.
        #[test]
        fn subtract_leaves_exactly_the_rest(
            holes in prop::collection::vec((any::<u32>(), 0u8..=32), 0..4),
            probes in prop::collection::vec(any::<u32>(), 1..32),
        ) {
            let holes: Vec<Prefix> = holes
                .iter()
                .map(|&(a, l)| Prefix::new(std::net::IpAddr::from(a.to_be_bytes()), l).unwrap())
                .collect();
            let mut out = vec!["0.0.0.0/0".parse::<Prefix>().unwrap()];
            for h in &holes {
                out = out.into_iter().flat_map(|p| subtract(p, h)).collect();
            }
            for a in probes.iter().copied().chain(holes.iter().map(|h| match h.addr() {
                std::net::IpAddr::V4(v) => u32::from(v),
                _ => 0,
            })) {
                let addr = std::net::IpAddr::from(a.to_be_bytes());
                let covering = out.iter().filter(|p| p.contains(addr)).count();
                let in_hole = holes.iter().any(|h| h.contains(addr));
                prop_assert_eq!(covering, usize::from(!in_hole), "{} holes {:?} out {:?}", addr, holes, out);
            }
        }
    }
}
