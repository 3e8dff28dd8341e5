//! Tailnet address allocation: one IPv4 from 100.64.0.0/10 and one IPv6 from fd7a:115c:a1e0::/48
//! per node (spec §10.1), skipping the addresses Tailscale reserves.
//!
//! Mirrors the behaviour of headscale `hscontrol/db/ip.go` (sequential strategy): the lowest free
//! address of the configured prefix. Addresses of existing nodes are never handed out again, so
//! an address is only reused after its node was deleted. The caller supplies the used set.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::wire::prefix::{is_reserved, Prefix, CGNAT_RANGE, TAILSCALE_ULA_RANGE};

/// The allocator's prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipam {
    /// IPv4 prefix (default [`CGNAT_RANGE`]); no IPv4 is handed out if it is not IPv4.
    pub v4: Prefix,
    /// IPv6 prefix (default [`TAILSCALE_ULA_RANGE`]); no IPv6 is handed out if it is not IPv6.
    pub v6: Prefix,
}

impl Default for Ipam {
    fn default() -> Self {
        Ipam {
            v4: CGNAT_RANGE,
            v6: TAILSCALE_ULA_RANGE,
        }
    }
}

impl Ipam {
    /// Lowest free IPv4 address, skipping network/broadcast and reserved ones.
    pub fn next_v4(&self, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let IpAddr::V4(start) = self.v4.masked().addr() else {
            return None;
        };
        let size = 1u64 << (32 - u32::from(self.v4.bits()));
        (1..size.saturating_sub(1)).find_map(|off| {
            let a = Ipv4Addr::from(u32::from(start).wrapping_add(off as u32));
            (!used.contains(&a) && !is_reserved(IpAddr::V4(a))).then_some(a)
        })
    }

    /// Lowest free IPv6 address (searching the first 2^32 of the prefix), skipping reserved ones.
    pub fn next_v6(&self, used: &BTreeSet<Ipv6Addr>) -> Option<Ipv6Addr> {
        let IpAddr::V6(start) = self.v6.masked().addr() else {
            return None;
        };
        let len = self.v6.bits();
        let span = if len >= 96 {
            1u128 << (128 - u32::from(len))
        } else {
            1u128 << 32
        };
        (1..span).find_map(|off| {
            let a = Ipv6Addr::from(u128::from(start) + off);
            (!used.contains(&a) && !is_reserved(IpAddr::V6(a))).then_some(a)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_and_skips_used() {
        let ipam = Ipam::default();
        let mut used = BTreeSet::new();
        assert_eq!(ipam.next_v4(&used), Some(Ipv4Addr::new(100, 64, 0, 1)));
        used.insert(Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(ipam.next_v4(&used), Some(Ipv4Addr::new(100, 64, 0, 2)));
        let mut used6 = BTreeSet::new();
        assert_eq!(ipam.next_v6(&used6), Some("fd7a:115c:a1e0::1".parse().unwrap()));
        used6.insert("fd7a:115c:a1e0::1".parse().unwrap());
        assert_eq!(ipam.next_v6(&used6), Some("fd7a:115c:a1e0::2".parse().unwrap()));
    }

    #[test]
    fn reserved_are_skipped() {
        assert!(is_reserved(Ipv4Addr::new(100, 115, 93, 7).into()));
        assert!(is_reserved(Ipv4Addr::new(100, 100, 100, 100).into()));
        assert!(!is_reserved(Ipv4Addr::new(100, 64, 0, 1).into()));
        assert!(is_reserved("fd7a:115c:a1e0::53".parse().unwrap()));
        let ipam = Ipam {
            v4: "100.100.100.96/28".parse().unwrap(),
            ..Ipam::default()
        };
        let used: BTreeSet<_> = (97..100).map(|i| Ipv4Addr::new(100, 100, 100, i)).collect();
        assert_eq!(ipam.next_v4(&used), Some(Ipv4Addr::new(100, 100, 100, 101)));
        let ipam6 = Ipam {
            v6: "fd7a:115c:a1e0::50/124".parse().unwrap(),
            ..Ipam::default()
        };
        let used6: BTreeSet<Ipv6Addr> = (0x51..0x53)
            .map(|i| Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, i))
            .collect();
        assert_eq!(ipam6.next_v6(&used6), Some("fd7a:115c:a1e0::54".parse().unwrap()));
    }

    #[test]
    fn exhaustion_returns_none() {
        let ipam = Ipam {
            v4: "100.64.0.0/30".parse().unwrap(),
            ..Ipam::default()
        };
        let used: BTreeSet<_> = [Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)].into();
        assert_eq!(ipam.next_v4(&used), None);
    }
}
