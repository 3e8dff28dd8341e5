//! Address facts magicsock needs on both families: the canonical form of a UDP address, which
//! socket (IPv4 or IPv6) sends to it, and which of our IPv6 interface addresses are worth
//! publishing to peers as endpoints.
//!
//! Mirrors the facts of tailscale `wgengine/magicsock/magicsock.go` (one socket per family,
//! `sendUDP` picking `pconn4`/`pconn6` by the destination, un-mapping of received addresses)
//! and of `net/netmon` + `determineEndpoints` (which interface addresses become
//! `EndpointLocal` entries), not their code.
//!
//! The interface list comes from Linux's `/proc/net/if_inet6`, one address per line:
//!
//! ```text
//! 20010db8000100000000000000000002 03 40 00 80    ts-eth
//! └ address, 32 hex digits ──────┘ │  │  │  │     └ interface name
//!                         ifindex ─┘  │  │  └ IFA_F_* flags (hex)
//!                       prefix length ┘  └ scope (hex; 0 global, 0x20 link, 0x10 host)
//! ```
//!
//! Pure: the shell (`socket.rs`) reads the file and owns the sockets.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::wire::prefix::TAILSCALE_ULA_RANGE;

/// `IFA_F_DADFAILED`: duplicate address detection failed; the address is unusable.
const IFA_F_DADFAILED: u32 = 0x08;
/// `IFA_F_DEPRECATED`: preferred lifetime over; still works, but new flows should avoid it.
const IFA_F_DEPRECATED: u32 = 0x20;
/// `IFA_F_TENTATIVE`: duplicate address detection still running; binding to it fails.
const IFA_F_TENTATIVE: u32 = 0x40;

/// The two address families, one UDP socket each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 (`0.0.0.0:port`).
    V4,
    /// IPv6 (`[::]:port`, `IPV6_V6ONLY`).
    V6,
}

impl Family {
    /// The family of `addr` after [`canonical`] (a v4-mapped address is IPv4).
    pub fn of(addr: SocketAddr) -> Family {
        match canonical(addr) {
            SocketAddr::V4(_) => Family::V4,
            SocketAddr::V6(_) => Family::V6,
        }
    }
}

/// `addr` with an IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]:p`) turned into plain IPv4, so one
/// peer address has one spelling whichever socket or message it came through (Go `Unmap`).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Which socket sends to `dst`, and the address to hand it: `None` when `dst` is IPv6 and we have
/// no IPv6 socket (the host has no IPv6), or when `dst` can never be a peer (unspecified, port
/// 0, multicast).
pub fn send_family(dst: SocketAddr, have_v6: bool) -> Option<(Family, SocketAddr)> {
    let dst = canonical(dst);
    if dst.port() == 0 || dst.ip().is_unspecified() || dst.ip().is_multicast() {
        return None;
    }
    match Family::of(dst) {
        Family::V6 if !have_v6 => None,
        f => Some((f, dst)),
    }
}

/// True for an address in the tailnet's `fd7a:115c:a1e0::/48` (spec §10.1): tailnet addresses
/// live on the TUN device and are never a way to reach us from outside the tunnel.
pub fn is_tailnet_v6(ip: Ipv6Addr) -> bool {
    TAILSCALE_ULA_RANGE.contains(IpAddr::V6(ip))
}

/// One line of `/proc/net/if_inet6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr6 {
    /// The address.
    pub ip: Ipv6Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// `IFA_F_*` flags.
    pub flags: u32,
    /// The interface it is on.
    pub ifname: String,
}

/// Parses `/proc/net/if_inet6`; malformed lines are skipped.
pub fn parse_if_inet6(text: &str) -> Vec<IfAddr6> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [hex, _index, plen, _scope, flags, ifname] = f[..] else {
                return None;
            };
            if hex.len() != 32 {
                return None;
            }
            let ip = u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from)?;
            Some(IfAddr6 {
                ip,
                prefix_len: u8::from_str_radix(plen, 16).ok()?,
                flags: u32::from_str_radix(flags, 16).ok()?,
                ifname: ifname.to_string(),
            })
        })
        .collect()
}

/// Whether a peer outside the tunnel could reach us at `ip`: a global unicast or unique-local
/// (ULA) address. Loopback, unspecified, multicast, link-local (it would need a zone),
/// v4-mapped/compatible forms and the tailnet range are not.
pub fn is_publishable_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    let link_local = first & 0xffc0 == 0xfe80;
    let v4_embedded = ip.segments()[..6].iter().all(|s| *s == 0) || ip.to_ipv4_mapped().is_some();
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || link_local || v4_embedded || is_tailnet_v6(ip))
}

/// Our IPv6 addresses worth publishing as `EndpointLocal` endpoints (Go publishes every usable
/// interface address with the socket's port): [`is_publishable_v6`] addresses that are usable
/// now (not tentative, failed or deprecated) and not on the TUN device `tun`. In file order,
/// without duplicates.
pub fn publishable_v6(addrs: &[IfAddr6], tun: &str) -> Vec<Ipv6Addr> {
    let mut out = Vec::new();
    for a in addrs {
        let unusable = a.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED | IFA_F_DEPRECATED) != 0;
        if a.ifname == tun || unusable || !is_publishable_v6(a.ip) || out.contains(&a.ip) {
            continue;
        }
        out.push(a.ip);
    }
    out
}

/// Go `tailcfg.EndpointLocal`: an interface address of ours.
pub const ENDPOINT_LOCAL: i32 = 1;
/// Go `tailcfg.EndpointSTUN`: our address as a STUN server saw it.
pub const ENDPOINT_STUN: i32 = 2;

/// Our endpoints for control and CallMeMaybe, with their Go `EndpointType` (after Go
/// `determineEndpoints`): the STUN-mapped addresses first (both families), then the local IPv4
/// address (already paired with the IPv4 socket's port), then each publishable IPv6 interface
/// address on the IPv6 socket's port (none without an IPv6 socket). An address listed twice
/// keeps its first type: on IPv6 without NAT the STUN answer is the interface address.
pub fn local_endpoints(
    stun: &[SocketAddr],
    local_v4: Option<SocketAddr>,
    v6: &[Ipv6Addr],
    port6: Option<u16>,
) -> Vec<(SocketAddr, i32)> {
    let stun = stun.iter().map(|a| (canonical(*a), ENDPOINT_STUN));
    let v4 = local_v4.map(|a| (canonical(a), ENDPOINT_LOCAL));
    let v6 = port6.into_iter().flat_map(|p| {
        v6.iter()
            .map(move |ip| (SocketAddr::new(IpAddr::V6(*ip), p), ENDPOINT_LOCAL))
    });
    let mut out: Vec<(SocketAddr, i32)> = Vec::new();
    for (a, t) in stun.chain(v4).chain(v6) {
        if !out.iter().any(|(e, _)| *e == a) {
            out.push((a, t));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_mapped_addresses_are_normalised() {
        assert_eq!(canonical(sa("[::ffff:198.51.100.7]:41641")), sa("198.51.100.7:41641"));
        assert_eq!(canonical(sa("198.51.100.7:41641")), sa("198.51.100.7:41641"));
        assert_eq!(canonical(sa("[2001:db8::1]:41641")), sa("[2001:db8::1]:41641"));
        // v4-compatible (deprecated ::a.b.c.d) is not v4-mapped: it stays IPv6.
        assert_eq!(canonical(sa("[::198.51.100.7]:1")), sa("[::198.51.100.7]:1"));
        assert_eq!(Family::of(sa("[::ffff:10.0.0.1]:1")), Family::V4);
        assert_eq!(Family::of(sa("[2001:db8::1]:1")), Family::V6);
    }

    #[test]
    fn send_family_table() {
        let cases = [
            // (destination, have an IPv6 socket, want)
            ("198.51.100.7:41641", true, Some((Family::V4, "198.51.100.7:41641"))),
            ("198.51.100.7:41641", false, Some((Family::V4, "198.51.100.7:41641"))),
            ("[2001:db8::7]:41641", true, Some((Family::V6, "[2001:db8::7]:41641"))),
            ("[2001:db8::7]:41641", false, None),
            // A v4-mapped peer address goes out of the IPv4 socket, as plain IPv4.
            (
                "[::ffff:198.51.100.7]:41641",
                false,
                Some((Family::V4, "198.51.100.7:41641")),
            ),
            (
                "[::ffff:198.51.100.7]:41641",
                true,
                Some((Family::V4, "198.51.100.7:41641")),
            ),
            ("0.0.0.0:41641", true, None),
            ("[::]:41641", true, None),
            ("198.51.100.7:0", true, None),
            ("[ff02::1]:41641", true, None),
        ];
        for (dst, have_v6, want) in cases {
            let want = want.map(|(f, a)| (f, sa(a)));
            assert_eq!(send_family(sa(dst), have_v6), want, "{dst} have_v6={have_v6}");
        }
    }

    #[test]
    fn tailnet_range() {
        assert!(is_tailnet_v6("fd7a:115c:a1e0::1".parse().unwrap()));
        assert!(is_tailnet_v6(
            "fd7a:115c:a1e0:ab12:4843:cd96:6258:b240".parse().unwrap()
        ));
        assert!(!is_tailnet_v6("fd7a:115c:a1e1::1".parse().unwrap()));
        assert!(!is_tailnet_v6("fd00::1".parse().unwrap()));
    }

    /// A `/proc/net/if_inet6` as a dual-stack router with a tailnet TUN shows it.
    const IF_INET6: &str = "\
00000000000000000000000000000001 01 80 10 80       lo
fe800000000000000000000000000001 03 40 20 80   ts-eth
20010db8000100000000000000000002 03 40 00 80   ts-eth
fd000000000000000000000000000002 04 40 00 80     eth1
20010db8000100000000000000000099 03 40 00 c0   ts-eth
20010db80001000000000000000000aa 03 40 00 20   ts-eth
20010db80001000000000000000000bb 03 40 00 08   ts-eth
fd7a115ca1e000000000000000000005 05 80 00 80 tinyscale0
20010db8000900000000000000000001 05 80 00 80 tinyscale0
fe80000000000000a1b2c3fffed4e5f6 05 40 20 80 tinyscale0
ff020000000000000000000000000001 03 80 20 80   ts-eth
00000000000000000000ffffc0000201 03 80 00 80   ts-eth
20010db8000100000000000000000002 06 40 00 80     eth2
not a line
20010db80001000000000000000000zz 03 40 00 80   ts-eth
";

    #[test]
    fn if_inet6_parses() {
        let a = parse_if_inet6(IF_INET6);
        assert_eq!(a.len(), 13, "two malformed lines skipped");
        assert_eq!(
            a[2],
            IfAddr6 {
                ip: "2001:db8:1::2".parse().unwrap(),
                prefix_len: 64,
                flags: 0x80,
                ifname: "ts-eth".into()
            }
        );
        assert_eq!(a[7].ifname, "tinyscale0");
        assert_eq!(a[7].prefix_len, 128);
    }

    #[test]
    fn only_global_and_ula_addresses_off_the_tun_are_published() {
        let got = publishable_v6(&parse_if_inet6(IF_INET6), "tinyscale0");
        let want: Vec<Ipv6Addr> = ["2001:db8:1::2", "fd00::2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // Global and ULA kept. Skipped: loopback, link-local, tentative (::99), deprecated (::aa), DAD failed (::bb),
        // everything on the TUN (tailnet address and even a global one), multicast, v4-mapped,
        // and the same address seen again on a second interface.
        assert_eq!(got, want);
        // Without a TUN name match, a global address routed to the TUN would be published, but
        // the tailnet address never is.
        let got = publishable_v6(&parse_if_inet6(IF_INET6), "other0");
        assert!(got.contains(&"2001:db8:9::1".parse().unwrap()));
        assert!(!got.iter().any(|ip| is_tailnet_v6(*ip)));
    }

    #[test]
    fn endpoints_for_control() {
        let g4 = sa("198.51.100.7:41641");
        let g6 = sa("[2001:db8:1::2]:41641");
        let l4 = sa("10.0.1.2:41641");
        let v6: Vec<Ipv6Addr> = ["2001:db8:1::2", "fd00::2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            local_endpoints(&[g4, g6], Some(l4), &v6, Some(41641)),
            vec![
                (g4, ENDPOINT_STUN),
                (g6, ENDPOINT_STUN),
                (l4, ENDPOINT_LOCAL),
                // The STUN answer already named 2001:db8:1::2 (no NAT on IPv6): listed once.
                (sa("[fd00::2]:41641"), ENDPOINT_LOCAL),
            ]
        );
        // The IPv6 socket got another port: the interface addresses carry that one.
        assert_eq!(
            local_endpoints(&[g4], Some(l4), &v6, Some(50000)),
            vec![
                (g4, ENDPOINT_STUN),
                (l4, ENDPOINT_LOCAL),
                (sa("[2001:db8:1::2]:50000"), ENDPOINT_LOCAL),
                (sa("[fd00::2]:50000"), ENDPOINT_LOCAL),
            ]
        );
        // No IPv6 socket: no IPv6 endpoints, whatever the interfaces say.
        assert_eq!(
            local_endpoints(&[g4], Some(l4), &v6, None),
            vec![(g4, ENDPOINT_STUN), (l4, ENDPOINT_LOCAL)]
        );
        // No NAT on IPv4 either: the local address is the STUN answer. v4-mapped input is unmapped.
        assert_eq!(
            local_endpoints(&[sa("[::ffff:10.0.1.2]:41641")], Some(l4), &[], None),
            vec![(l4, ENDPOINT_STUN)]
        );
    }

    #[test]
    fn publishable_v6_table() {
        let cases = [
            ("2001:db8::1", true),
            ("2606:4700::1111", true),
            ("fd12:3456::1", true),
            ("fc00::1", true),
            ("fd7a:115c:a1e0::1", false),
            ("fe80::1", false),
            ("febf::1", false),
            ("::1", false),
            ("::", false),
            ("ff02::1", false),
            ("::ffff:192.0.2.1", false),
            ("::192.0.2.1", false),
        ];
        for (ip, want) in cases {
            assert_eq!(is_publishable_v6(ip.parse().unwrap()), want, "{ip}");
        }
    }
}
