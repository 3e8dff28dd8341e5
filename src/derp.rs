//! DERP ("Designated Encrypted Relay for Packets"), protocol version 2: the TCP/TLS relay that
//! carries WireGuard and disco packets between nodes addressed by node key, used until (or
//! instead of) a direct UDP path.
//!
//! Mirrors tailscale `derp/derp.go` (spec §6). A connection is an HTTP/1.1 upgrade on `/derp`
//! (`Upgrade: DERP`, reply `101` with `Derp-Version: 2`), then frames both ways:
//!
//! ```text
//! server                                   client
//!   | --- ServerKey  (magic + server key) --> |
//!   | <-- ClientInfo (client key + box)  ---- |   box: client priv -> server pub, JSON
//!   | --- ServerInfo (box)               --> |   box: server priv -> client pub, {"version":2}
//!   | <== SendPacket / NotePreferred / Ping == |
//!   | == RecvPacket / KeepAlive / PeerGone ==> |
//! ```
//!
//! [`frame`] holds the pure wire codec. Connection handling lives in the shells: [`client`]
//! (dial/upgrade, handshake, send/recv) and, with feature `relay`, `server` (accept, bounded
//! per-client queues, forwarding, peer-gone, the embedded region). [`node_addr`] and
//! [`dial_addrs`] (pure) say where a DERP map node is reached, for the dial and for netcheck.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use crate::wire::tailcfg::DerpNode;

pub mod client;
pub mod frame;
#[cfg(feature = "relay")]
pub mod server;

/// How one DERP node is reached over one address family (spec §5.1, the `IPv4`/`IPv6` fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAddr {
    /// At this address: the family's field, or an IP-literal `HostName` of that family.
    Ip(IpAddr),
    /// At whatever the DNS name `HostName` resolves to in this family.
    Dns,
    /// Not over this family: the field holds `"none"` (any text that is not an address of the
    /// family), or there is nothing to go on.
    Off,
}

/// Where node `n` is reached over IPv6 (`ipv6`) or IPv4 (Go `nodeAddrPort` / derphttp
/// `dialNode` facts): a non-empty field wins (an address of the family, else the family is
/// off); an empty field falls back to `HostName`, used directly if it is an IP literal (of this
/// family, else off) and resolved otherwise.
pub fn node_addr(n: &DerpNode, ipv6: bool) -> NodeAddr {
    let field = if ipv6 { &n.ipv6 } else { &n.ipv4 };
    let of_family = |ip: &IpAddr| ip.is_ipv6() == ipv6;
    if !field.is_empty() {
        return field
            .parse::<IpAddr>()
            .ok()
            .filter(of_family)
            .map_or(NodeAddr::Off, NodeAddr::Ip);
    }
    match n.host_name.parse::<IpAddr>() {
        Ok(ip) if of_family(&ip) => NodeAddr::Ip(ip),
        Ok(_) => NodeAddr::Off,
        Err(_) if n.host_name.is_empty() => NodeAddr::Off,
        Err(_) => NodeAddr::Dns,
    }
}

/// Whether reaching `n` needs a DNS answer for its `HostName` in either family.
pub fn needs_dns(n: &DerpNode) -> bool {
    node_addr(n, false) == NodeAddr::Dns || node_addr(n, true) == NodeAddr::Dns
}

/// The TCP addresses to dial for node `n` on `port`, IPv4 first, then IPv6 (each tried in turn
/// until one connects). `resolved` is what `HostName` resolved to (any families, any order; empty
/// if it was not or could not be resolved): only the families [`node_addr`] sends to DNS take
/// addresses from it, so `"none"` keeps a family out even when DNS has an answer for it.
pub fn dial_addrs(n: &DerpNode, port: u16, resolved: &[IpAddr]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for ipv6 in [false, true] {
        match node_addr(n, ipv6) {
            NodeAddr::Ip(ip) => out.push(SocketAddr::new(ip, port)),
            NodeAddr::Dns => out.extend(
                resolved
                    .iter()
                    .filter(|ip| ip.is_ipv6() == ipv6)
                    .map(|ip| SocketAddr::new(*ip, port)),
            ),
            NodeAddr::Off => {}
        }
    }
    out.dedup();
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Node `1a` of region 1 with these host name and pinned addresses (also used by the
    /// engine's tests).
    pub(crate) fn node(host: &str, ipv4: &str, ipv6: &str) -> DerpNode {
        DerpNode {
            name: "1a".into(),
            region_id: 1,
            host_name: host.into(),
            ipv4: ipv4.into(),
            ipv6: ipv6.into(),
            ..DerpNode::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn node_addr_table() {
        use NodeAddr::*;
        let cases = [
            // (HostName, IPv4, IPv6, want v4, want v6, why)
            (
                "derp.example",
                "192.0.2.1",
                "2001:db8::1",
                Ip(ip("192.0.2.1")),
                Ip(ip("2001:db8::1")),
                "both pinned",
            ),
            ("derp.example", "", "", Dns, Dns, "both from DNS"),
            ("derp.example", "none", "", Off, Dns, "\"none\" turns IPv4 off"),
            (
                "derp.example",
                "192.0.2.1",
                "none",
                Ip(ip("192.0.2.1")),
                Off,
                "\"none\" turns IPv6 off",
            ),
            (
                "derp.example",
                "2001:db8::1",
                "",
                Off,
                Dns,
                "an IPv6 address in IPv4 is not IPv4",
            ),
            (
                "derp.example",
                "banana",
                "192.0.2.1",
                Off,
                Off,
                "junk and wrong family are off",
            ),
            (
                "192.0.2.9",
                "",
                "",
                Ip(ip("192.0.2.9")),
                Off,
                "IPv4 literal HostName: no DNS",
            ),
            (
                "2001:db8::9",
                "",
                "",
                Off,
                Ip(ip("2001:db8::9")),
                "IPv6 literal HostName: no DNS",
            ),
            (
                "192.0.2.9",
                "",
                "2001:db8::1",
                Ip(ip("192.0.2.9")),
                Ip(ip("2001:db8::1")),
                "literal plus field",
            ),
            ("", "", "", Off, Off, "nothing to go on"),
        ];
        for (host, v4, v6, want4, want6, why) in cases {
            let n = node(host, v4, v6);
            assert_eq!((node_addr(&n, false), node_addr(&n, true)), (want4, want6), "{why}");
            assert_eq!(needs_dns(&n), want4 == Dns || want6 == Dns, "{why}");
        }
    }

    #[test]
    fn dial_addrs_table() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let dns = [ip("2001:db8::53"), ip("198.51.100.53"), ip("198.51.100.54")];
        let cases: [(DerpNode, &[IpAddr], Vec<SocketAddr>, &str); 7] = [
            (
                node("derp.example", "", ""),
                &dns,
                vec![
                    sa("198.51.100.53:443"),
                    sa("198.51.100.54:443"),
                    sa("[2001:db8::53]:443"),
                ],
                "all DNS answers, IPv4 first",
            ),
            (node("derp.example", "", ""), &[], vec![], "DNS failed: nothing to dial"),
            (
                node("derp.example", "none", ""),
                &dns,
                vec![sa("[2001:db8::53]:443")],
                "\"none\" drops the IPv4 answers",
            ),
            (
                node("derp.example", "", "none"),
                &dns,
                vec![sa("198.51.100.53:443"), sa("198.51.100.54:443")],
                "\"none\" drops the IPv6 answers",
            ),
            (
                node("derp.example", "192.0.2.1", ""),
                &dns,
                vec![sa("192.0.2.1:443"), sa("[2001:db8::53]:443")],
                "a pinned IPv4 replaces the A answers, AAAA still used",
            ),
            (
                node("derp.example", "192.0.2.1", "2001:db8::1"),
                &dns,
                vec![sa("192.0.2.1:443"), sa("[2001:db8::1]:443")],
                "both pinned: DNS ignored",
            ),
            (node("derp.example", "none", "none"), &dns, vec![], "both families off"),
        ];
        for (n, resolved, want, why) in cases {
            assert_eq!(dial_addrs(&n, 443, resolved), want, "{why}");
        }
    }
}
