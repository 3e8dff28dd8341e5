//! Tailnet address allocation: one IPv4 from 100.64.0.0/10 and one IPv6 from fd7a:115c:a1e0::/48
//! per node (spec §10.1), skipping the addresses Tailscale reserves.
//!
//! Mirrors the behaviour of headscale `hscontrol/db/ip.go` (sequential strategy): the lowest free
//! address of the configured prefix. Addresses of existing nodes are never handed out again, so
//! an address is only reused after its node was deleted. The caller supplies the used set.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};

/// Default IPv4 prefix (Tailscale CGNAT range).
pub const DEFAULT_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);
/// Default IPv6 prefix (Tailscale ULA).
pub const DEFAULT_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0), 48);

/// The allocator's prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipam {
    /// IPv4 prefix (address, length).
    pub v4: (Ipv4Addr, u8),
    /// IPv6 prefix (address, length).
    pub v6: (Ipv6Addr, u8),
}

impl Default for Ipam {
    fn default() -> Self {
        Ipam {
            v4: DEFAULT_V4,
            v6: DEFAULT_V6,
        }
    }
}

/// True for IPv4 addresses Tailscale reserves inside 100.64.0.0/10.
pub fn reserved_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    // 100.115.92.0/23: ChromeOS VMs; 100.100.100.100: quad-100 (MagicDNS).
    (o[0] == 100 && o[1] == 115 && (o[2] & 0xfe) == 92) || a == Ipv4Addr::new(100, 100, 100, 100)
}

/// True for IPv6 addresses and subranges Tailscale reserves inside fd7a:115c:a1e0::/48.
pub fn reserved_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    let in_ula = s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0;
    in_ula
        && (a == Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0x53)
            || s[3] == 0x0b1a // 4via6
            || s[3] == 0xefe3 // ephemeral v6-only
            || (s[3] == 0xab12 && s[4] == 0x4843 && s[5] == 0xcd96 && (s[6] >> 8) == 0x62))
}

impl Ipam {
    /// Lowest free IPv4 address, skipping network/broadcast and reserved ones.
    pub fn next_v4(&self, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let (base, len) = self.v4;
        let size = 1u64 << (32 - u32::from(len.min(32)));
        let start = u32::from(base) & (u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0));
        (1..size.saturating_sub(1)).find_map(|off| {
            let a = Ipv4Addr::from(start.wrapping_add(off as u32));
            (!used.contains(&a) && !reserved_v4(a)).then_some(a)
        })
    }

    /// Lowest free IPv6 address (searching the first 2^32 of the prefix), skipping reserved ones.
    pub fn next_v6(&self, used: &BTreeSet<Ipv6Addr>) -> Option<Ipv6Addr> {
        let (base, len) = self.v6;
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        let start = u128::from(base) & mask;
        let span = if len >= 96 {
            1u128 << (128 - u32::from(len))
        } else {
            1u128 << 32
        };
        (1..span).find_map(|off| {
            let a = Ipv6Addr::from(start + off);
            (!used.contains(&a) && !reserved_v6(a)).then_some(a)
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
        assert!(reserved_v4(Ipv4Addr::new(100, 115, 93, 7)));
        assert!(reserved_v4(Ipv4Addr::new(100, 100, 100, 100)));
        assert!(!reserved_v4(Ipv4Addr::new(100, 64, 0, 1)));
        assert!(reserved_v6("fd7a:115c:a1e0::53".parse().unwrap()));
        let ipam = Ipam {
            v4: (Ipv4Addr::new(100, 100, 100, 96), 28),
            ..Ipam::default()
        };
        let used: BTreeSet<_> = (97..100).map(|i| Ipv4Addr::new(100, 100, 100, i)).collect();
        assert_eq!(ipam.next_v4(&used), Some(Ipv4Addr::new(100, 100, 100, 101)));
        let ipam6 = Ipam {
            v6: ("fd7a:115c:a1e0::50".parse().unwrap(), 124),
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
            v4: (Ipv4Addr::new(100, 64, 0, 0), 30),
            ..Ipam::default()
        };
        let used: BTreeSet<_> = [Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)].into();
        assert_eq!(ipam.next_v4(&used), None);
    }
}
