//! rtnetlink address messages: what the kernel multicasts to `NETLINK_ROUTE` listeners of the
//! groups [`RTMGRP_IPV4_IFADDR`] and [`RTMGRP_IPV6_IFADDR`] when an address is added
//! (`RTM_NEWADDR`) or removed (`RTM_DELADDR`).
//!
//! Go tailscale's `net/netmon` (netmon_linux.go) listens to the same groups through
//! mdlayher/netlink; this is the few bytes of it we need. Pure: the caller reads the datagrams
//! (see `netmon.rs`) and passes them in. All integers are in host byte order.
//!
//! ```text
//! nlmsghdr   len u32 | type u16 | flags u16 | seq u32 | pid u32        16 bytes
//! ifaddrmsg  family u8 | prefixlen u8 | flags u8 | scope u8 | index u32  8 bytes
//! rtattr*    len u16 | type u16 | data, padded to 4 bytes
//! ```
//! One datagram may hold several messages, each padded to 4 bytes.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::wire::prefix::Prefix;

/// Multicast group of IPv4 address changes (`<linux/rtnetlink.h>`).
pub const RTMGRP_IPV4_IFADDR: u32 = 0x10;
/// Multicast group of IPv6 address changes.
pub const RTMGRP_IPV6_IFADDR: u32 = 0x100;
/// Message type: an address was added (or changed).
pub const RTM_NEWADDR: u16 = 20;
/// Message type: an address was removed.
pub const RTM_DELADDR: u16 = 21;

const NLMSG_HDR: usize = 16;
const IFADDRMSG: usize = 8;
const RTA_HDR: usize = 4;
/// `IFA_ADDRESS`: the address (the peer's on point-to-point links).
const IFA_ADDRESS: u16 = 1;
/// `IFA_LOCAL`: the local address, when it differs from `IFA_ADDRESS`.
const IFA_LOCAL: u16 = 2;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// `RT_SCOPE_UNIVERSE`: a global address (link and host scopes are 253 and 254).
const SCOPE_UNIVERSE: u8 = 0;

/// A malformed datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A header or attribute runs past the end of the datagram.
    #[error("truncated netlink message")]
    Truncated,
    /// A length field smaller than its header.
    #[error("bad netlink length field")]
    BadLength,
}

/// One address added to or removed from an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrEvent {
    /// `RTM_NEWADDR` (true) or `RTM_DELADDR`.
    pub added: bool,
    /// The interface index.
    pub ifindex: u32,
    /// The address (host bits kept).
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// `RT_SCOPE_*`: 0 global, 253 link, 254 host.
    pub scope: u8,
}

impl AddrEvent {
    /// The subnet this address puts on a LAN, as `advertise_lan` offers it: the network
    /// address of a global IPv4 or IPv6 (ULA/GUA) address; none for link-local, loopback,
    /// multicast and single-host (/32, /128) addresses, as `uci::client::lan_prefixes` skips.
    pub fn lan_prefix(&self) -> Option<Prefix> {
        let special = match self.addr {
            IpAddr::V4(a) => a.is_loopback() || a.is_link_local() || a.is_multicast() || self.prefix_len >= 32,
            IpAddr::V6(a) => {
                (a.segments()[0] & 0xffc0) == 0xfe80 || a.is_loopback() || a.is_multicast() || self.prefix_len >= 128
            }
        };
        if special || self.scope != SCOPE_UNIVERSE {
            return None;
        }
        Prefix::new_masked(self.addr, self.prefix_len)
    }
}

fn u16_at(b: &[u8], i: usize) -> Result<u16, Error> {
    let s = b.get(i..i + 2).ok_or(Error::Truncated)?;
    Ok(u16::from_ne_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], i: usize) -> Result<u32, Error> {
    let s = b.get(i..i + 4).ok_or(Error::Truncated)?;
    Ok(u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// [pure] The address events in one datagram; other message types (errors, `NLMSG_DONE`,
/// link or route messages) are skipped, as are address messages of other families.
pub fn parse(buf: &[u8]) -> Result<Vec<AddrEvent>, Error> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDR <= buf.len() {
        let len = u32_at(buf, off)? as usize;
        let kind = u16_at(buf, off + 4)?;
        if len < NLMSG_HDR {
            return Err(Error::BadLength);
        }
        let msg = buf.get(off..off + len).ok_or(Error::Truncated)?;
        if kind == RTM_NEWADDR || kind == RTM_DELADDR {
            if let Some(ev) = parse_addr(kind == RTM_NEWADDR, &msg[NLMSG_HDR..])? {
                out.push(ev);
            }
        }
        off += align4(len);
    }
    Ok(out)
}

/// One `ifaddrmsg` with its attributes.
fn parse_addr(added: bool, body: &[u8]) -> Result<Option<AddrEvent>, Error> {
    let hdr = body.get(..IFADDRMSG).ok_or(Error::Truncated)?;
    let (family, prefix_len, scope) = (hdr[0], hdr[1], hdr[3]);
    let ifindex = u32_at(hdr, 4)?;
    let width = match family {
        AF_INET => 4,
        AF_INET6 => 16,
        _ => return Ok(None),
    };
    let (mut address, mut local) = (None, None);
    let mut off = IFADDRMSG;
    while off + RTA_HDR <= body.len() {
        let len = usize::from(u16_at(body, off)?);
        let kind = u16_at(body, off + 2)?;
        if len < RTA_HDR {
            return Err(Error::BadLength);
        }
        let data = body.get(off + RTA_HDR..off + len).ok_or(Error::Truncated)?;
        let ip = match (width, data.len()) {
            (4, 4) => Some(IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3]))),
            (16, 16) => {
                let mut a = [0u8; 16];
                a.copy_from_slice(data);
                Some(IpAddr::V6(Ipv6Addr::from(a)))
            }
            _ => None,
        };
        match kind {
            IFA_ADDRESS => address = ip,
            IFA_LOCAL => local = ip,
            _ => {}
        }
        off += align4(len);
    }
    // On point-to-point links IFA_ADDRESS is the far end; IFA_LOCAL is ours.
    Ok(local.or(address).map(|addr| AddrEvent {
        added,
        ifindex,
        addr,
        prefix_len,
        scope,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vectors::hex;

    /// `ip addr add 192.168.60.1/24 dev ts-sub` (ifindex 7), as the kernel multicasts it on a
    /// little-endian host: header, ifaddrmsg, IFA_ADDRESS, IFA_LOCAL, IFA_LABEL "ts-sub".
    #[cfg(target_endian = "little")]
    const NEWADDR_V4: &str = "
        58000000 1400 0000 00000000 00000000   # len 88, RTM_NEWADDR, flags, seq, pid
        02 18 80 00 07000000                   # AF_INET, /24, IFA_F_PERMANENT, universe, ifindex 7
        0800 0100 c0a83c01                     # IFA_ADDRESS 192.168.60.1
        0800 0200 c0a83c01                     # IFA_LOCAL 192.168.60.1
        0800 0400 c0a83cff                     # IFA_BROADCAST
        0b00 0300 74732d73756200 00            # IFA_LABEL \"ts-sub\\0\", padded
        0800 0800 80000000                     # IFA_FLAGS
        1400 0600 ffffffff ffffffff 2c010000 2c010000 # IFA_CACHEINFO
    ";

    /// `ip -6 addr del fd00:60::1/64 dev ts-sub` followed by a link-local add, in one datagram.
    #[cfg(target_endian = "little")]
    const DELADDR_V6_AND_LINKLOCAL: &str = "
        2c000000 1500 0000 00000000 00000000   # len 44, RTM_DELADDR
        0a 40 80 00 07000000                   # AF_INET6, /64, permanent, universe, ifindex 7
        1400 0100 fd000060000000000000000000000001 # IFA_ADDRESS fd00:60::1
        2c000000 1400 0000 00000000 00000000   # len 44, RTM_NEWADDR
        0a 40 80 fd 07000000                   # AF_INET6, /64, scope link
        1400 0100 fe800000000000000000000000000001 # IFA_ADDRESS fe80::1
    ";

    #[test]
    #[cfg(target_endian = "little")]
    fn kernel_messages_parse() {
        let ev = parse(&hex(NEWADDR_V4)).unwrap();
        assert_eq!(
            ev,
            [AddrEvent {
                added: true,
                ifindex: 7,
                addr: "192.168.60.1".parse().unwrap(),
                prefix_len: 24,
                scope: 0,
            }]
        );
        assert_eq!(ev[0].lan_prefix().unwrap().to_string(), "192.168.60.0/24");
        let ev = parse(&hex(DELADDR_V6_AND_LINKLOCAL)).unwrap();
        assert_eq!(ev.len(), 2);
        assert!(!ev[0].added);
        assert_eq!(ev[0].lan_prefix().unwrap().to_string(), "fd00:60::/64");
        assert!(ev[1].added);
        assert_eq!(ev[1].lan_prefix(), None, "link-local is no LAN prefix");
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn point_to_point_uses_the_local_address_and_other_messages_are_skipped() {
        let b = hex("
            30000000 1400 0000 00000000 00000000   # len 48, RTM_NEWADDR
            02 20 80 00 03000000                   # AF_INET /32, ifindex 3
            0800 0100 0a000002                     # IFA_ADDRESS 10.0.0.2 (the far end)
            0800 0200 0a000001                     # IFA_LOCAL 10.0.0.1
            0800 0100 0a000009                     # (a second IFA_ADDRESS, ignored by LOCAL)
            14000000 1000 0000 00000000 00000000   # len 20, RTM_NEWLINK: skipped
            00000000
            18000000 1400 0000 00000000 00000000   # len 24, RTM_NEWADDR, AF_PACKET: skipped
            11 00 00 00 03000000
        ");
        let ev = parse(&b).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].addr, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(ev[0].lan_prefix(), None, "a /32 is no subnet");
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        assert_eq!(parse(&[]), Ok(vec![]));
        let mut b = vec![0u8; 16];
        b[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(parse(&b), Err(Error::BadLength));
        b[..4].copy_from_slice(&64u32.to_ne_bytes());
        assert_eq!(parse(&b), Err(Error::Truncated));
        // An address message cut inside its ifaddrmsg or an attribute.
        let mut m = Vec::new();
        m.extend_from_slice(&28u32.to_ne_bytes());
        m.extend_from_slice(&RTM_NEWADDR.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[2, 24, 0, 0, 1, 0, 0, 0]);
        m.extend_from_slice(&12u16.to_ne_bytes());
        m.extend_from_slice(&IFA_ADDRESS.to_ne_bytes());
        assert_eq!(parse(&m), Err(Error::Truncated));
        // Every prefix of a good datagram, and arbitrary bytes.
        let mut seed = 0x2545f491u32;
        for n in 0..200 {
            let v: Vec<u8> = (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let _ = parse(&v);
        }
        #[cfg(target_endian = "little")]
        {
            let good = hex(NEWADDR_V4);
            for n in 0..good.len() {
                let _ = parse(&good[..n]);
            }
        }
    }
}
