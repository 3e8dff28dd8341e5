//! IP prefixes and the address ranges Tailscale gives a meaning to (Go `net/netip.Prefix` and
//! `net/tsaddr`): the one prefix type every layer uses (routes, AllowedIPs, ACL sources, uci
//! options, the allocator's ranges) and the tailnet ranges as constants.
//!
//! A [`Prefix`] is an address of either family and a length. Like Go's `netip.Prefix` it may keep
//! host bits (an interface address such as `100.64.0.1/10`); [`Prefix::masked`] clears them.
//! The text forms:
//!
//! ```text
//! "10.0.0.0/8", "fd7a:115c:a1e0::/48"   FromStr: length optional (bare address = /32 or /128),
//! "10.1.2.3/8" -> 10.0.0.0/8            host bits cleared; length is 1-3 ASCII digits
//! "100.64.0.0/10"                       Prefix::parse_exact: length required, host bits an error
//! Display: "<addr>/<bits>"              as Go's Prefix.String (IPv6 in RFC 5952 form)
//! ```
//!
//! Pure: no I/O; everything is `const` or a few integer operations.
#![forbid(unsafe_code)]

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// Why a prefix text failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// Not `address/length` (or, where allowed, a bare address).
    #[error("not in address/length form")]
    Syntax,
    /// The length is longer than the address.
    #[error("prefix length out of range")]
    Length,
    /// Bits after the prefix length are set, e.g. `100.64.0.1/10` ([`Prefix::parse_exact`]).
    #[error("address has bits set beyond the prefix length")]
    HostBits,
}

/// An IP prefix: an address and a length of at most 32 (IPv4) or 128 (IPv6) bits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    addr: IpAddr,
    bits: u8,
}

/// The address as an integer (IPv4 in the low 32 bits).
pub const fn ip_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => a.to_bits() as u128,
        IpAddr::V6(a) => a.to_bits(),
    }
}

/// The netmask of a `bits`-long prefix in `ip`'s family, in [`ip_bits`] form (all ones past
/// the width).
pub const fn mask_bits(ip: IpAddr, bits: u8) -> u128 {
    let ones = match ip {
        IpAddr::V4(_) => u32::MAX as u128,
        IpAddr::V6(_) => u128::MAX,
    };
    let host = match ones.checked_shr(bits as u32) {
        Some(v) => v,
        None => 0,
    };
    ones & !host
}

/// 32 for IPv4, 128 for IPv6.
const fn width(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl Prefix {
    /// `addr/bits` as given (host bits kept, as Go's `netip.PrefixFrom`); `None` if `bits`
    /// exceeds the address width.
    pub const fn new(addr: IpAddr, bits: u8) -> Option<Prefix> {
        if bits > width(&addr) {
            return None;
        }
        Some(Prefix { addr, bits })
    }

    /// `addr/bits` with host bits cleared; `None` if `bits` exceeds the address width.
    pub const fn new_masked(addr: IpAddr, bits: u8) -> Option<Prefix> {
        match Prefix::new(addr, bits) {
            Some(p) => Some(p.masked()),
            None => None,
        }
    }

    /// The host prefix of `addr` (/32 or /128).
    pub const fn host(addr: IpAddr) -> Prefix {
        Prefix {
            addr,
            bits: width(&addr),
        }
    }

    /// The address (with host bits unless built masked).
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub const fn bits(&self) -> u8 {
        self.bits
    }

    /// True for a zero-length prefix (`0.0.0.0/0`, `::/0`).
    pub const fn is_default(&self) -> bool {
        self.bits == 0
    }

    /// True for an IPv4 prefix.
    pub const fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// True for a /32 or /128.
    pub const fn is_single_ip(&self) -> bool {
        self.bits == width(&self.addr)
    }

    /// The netmask as an integer in the family's width (`0xffc0_0000` for an IPv4 /10).
    pub const fn mask(&self) -> u128 {
        mask_bits(self.addr, self.bits)
    }

    /// The same prefix with host bits cleared.
    pub const fn masked(&self) -> Prefix {
        let bits = ip_bits(self.addr) & self.mask();
        let addr = match self.addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from_bits(bits as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from_bits(bits)),
        };
        Prefix { addr, bits: self.bits }
    }

    /// True if `ip` (of the same family) lies inside; host bits of the prefix are ignored.
    pub const fn contains(&self, ip: IpAddr) -> bool {
        self.addr.is_ipv4() == ip.is_ipv4() && (ip_bits(ip) ^ ip_bits(self.addr)) & self.mask() == 0
    }

    /// True if every address of `other` lies inside `self`.
    pub const fn contains_prefix(&self, other: &Prefix) -> bool {
        other.bits >= self.bits && self.contains(other.addr)
    }

    /// True if the two prefixes share an address (one contains the other).
    pub const fn overlaps(&self, other: &Prefix) -> bool {
        self.contains_prefix(other) || other.contains_prefix(self)
    }

    /// Parses `addr/bits` strictly: the length is required and the address must have no host
    /// bits set (a configured range, `list ip_prefix`).
    pub fn parse_exact(s: &str) -> Result<Prefix, PrefixError> {
        let (a, l) = s.split_once('/').ok_or(PrefixError::Syntax)?;
        let p = parse_parts(a, Some(l))?;
        if p.masked() != p {
            return Err(PrefixError::HostBits);
        }
        Ok(p)
    }
}

/// `addr` and the optional length text, host bits kept.
fn parse_parts(a: &str, l: Option<&str>) -> Result<Prefix, PrefixError> {
    let addr: IpAddr = a.parse().map_err(|_| PrefixError::Syntax)?;
    let bits = match l {
        None => width(&addr),
        Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|c| c.is_ascii_digit()) => {
            l.parse().map_err(|_| PrefixError::Length)?
        }
        Some(_) => return Err(PrefixError::Syntax),
    };
    Prefix::new(addr, bits).ok_or(PrefixError::Length)
}

impl FromStr for Prefix {
    type Err = PrefixError;

    /// Parses `addr/bits` or a bare address (a host prefix), host bits cleared.
    fn from_str(s: &str) -> Result<Prefix, PrefixError> {
        let p = match s.split_once('/') {
            Some((a, l)) => parse_parts(a, Some(l))?,
            None => parse_parts(s, None)?,
        };
        Ok(p.masked())
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `a.b.c.d/bits` as a constant (the ranges below are valid by inspection).
const fn v4(a: [u8; 4], bits: u8) -> Prefix {
    Prefix {
        addr: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
        bits,
    }
}

/// An IPv6 constant from its eight groups.
const fn v6(s: [u16; 8], bits: u8) -> Prefix {
    Prefix {
        addr: IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])),
        bits,
    }
}

/// Tailscale's IPv4 range, the CGNAT block 100.64.0.0/10 (Go `tsaddr.CGNATRange`): nodes get
/// their IPv4 from it and it is routed into the TUN.
pub const CGNAT_RANGE: Prefix = v4([100, 64, 0, 0], 10);

/// Tailscale's IPv6 ULA range fd7a:115c:a1e0::/48 (Go `tsaddr.TailscaleULARange`).
pub const TAILSCALE_ULA_RANGE: Prefix = v6([0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0], 48);

/// The part of [`CGNAT_RANGE`] ChromeOS uses for its VMs, 100.115.92.0/23 (Go
/// `tsaddr.ChromeOSVMRange`); never allocated.
pub const CHROMEOS_VM_RANGE: Prefix = v4([100, 115, 92, 0], 23);

/// 4via6 subnet routes, fd7a:115c:a1e0:b1a::/64 (Go `tsaddr.TailscaleViaRange`); never
/// allocated.
pub const TAILSCALE_VIA_RANGE: Prefix = v6([0xfd7a, 0x115c, 0xa1e0, 0xb1a, 0, 0, 0, 0], 64);

/// Addresses of ephemeral IPv6-only nodes, fd7a:115c:a1e0:efe3::/64; never allocated.
pub const TAILSCALE_EPHEMERAL6_RANGE: Prefix = v6([0xfd7a, 0x115c, 0xa1e0, 0xefe3, 0, 0, 0, 0], 64);

/// IPv4 addresses mapped into IPv6, fd7a:115c:a1e0:ab12:4843:cd96:6200::/104 (Go
/// `tsaddr.Tailscale4To6Range`); never allocated.
pub const TAILSCALE_4TO6_RANGE: Prefix = v6([0xfd7a, 0x115c, 0xa1e0, 0xab12, 0x4843, 0xcd96, 0x6200, 0], 104);

/// Every IPv4 address, 0.0.0.0/0 (Go `tsaddr.AllIPv4`): the default route.
pub const ALL_IPV4: Prefix = v4([0, 0, 0, 0], 0);

/// Every IPv6 address, ::/0 (Go `tsaddr.AllIPv6`).
pub const ALL_IPV6: Prefix = v6([0; 8], 0);

/// The MagicDNS resolver's IPv4 address, quad-100 (Go `tsaddr.TailscaleServiceIP`).
pub const TAILSCALE_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);

/// The MagicDNS resolver's IPv6 address, fd7a:115c:a1e0::53 (Go `tsaddr.TailscaleServiceIPv6`).
pub const TAILSCALE_SERVICE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0x53);

/// True for an address in [`CGNAT_RANGE`] or [`TAILSCALE_ULA_RANGE`] (Go's
/// `tsaddr.IsTailscaleIP` without the ChromeOS exclusion).
pub const fn is_tailnet_ip(ip: IpAddr) -> bool {
    CGNAT_RANGE.contains(ip) || TAILSCALE_ULA_RANGE.contains(ip)
}

/// True for addresses the allocator never hands out: the ChromeOS VM range and the service
/// address in IPv4; the service address, the 4via6, ephemeral and 4-to-6 ranges in IPv6.
pub const fn is_reserved(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => CHROMEOS_VM_RANGE.contains(ip) || a.to_bits() == TAILSCALE_SERVICE_IP.to_bits(),
        IpAddr::V6(a) => {
            a.to_bits() == TAILSCALE_SERVICE_IPV6.to_bits()
                || TAILSCALE_VIA_RANGE.contains(ip)
                || TAILSCALE_EPHEMERAL6_RANGE.contains(ip)
                || TAILSCALE_4TO6_RANGE.contains(ip)
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn text_forms() {
        assert_eq!(p("100.64.0.0/10"), CGNAT_RANGE);
        assert_eq!(CGNAT_RANGE.to_string(), "100.64.0.0/10");
        assert_eq!(TAILSCALE_ULA_RANGE.to_string(), "fd7a:115c:a1e0::/48");
        assert_eq!(TAILSCALE_VIA_RANGE.to_string(), "fd7a:115c:a1e0:b1a::/64");
        assert_eq!(
            TAILSCALE_4TO6_RANGE.to_string(),
            "fd7a:115c:a1e0:ab12:4843:cd96:6200:0/104"
        );
        // FromStr: bare addresses are host prefixes, host bits are cleared.
        assert_eq!(p("10.1.2.3").to_string(), "10.1.2.3/32");
        assert_eq!(p("::1").to_string(), "::1/128");
        assert_eq!(p("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(p("10.1.2.3/0").to_string(), "0.0.0.0/0");
        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/0008",
            "10.0.0.0/8/8",
            "x/8",
        ] {
            assert_eq!(bad.parse::<Prefix>(), Err(PrefixError::Syntax), "{bad}");
        }
        assert_eq!("10.0.0.0/33".parse::<Prefix>(), Err(PrefixError::Length));
        assert_eq!("::/129".parse::<Prefix>(), Err(PrefixError::Length));
        assert_eq!("::/999".parse::<Prefix>(), Err(PrefixError::Length));
        // parse_exact: the uci form.
        assert_eq!(Prefix::parse_exact("100.64.0.0/10"), Ok(CGNAT_RANGE));
        assert_eq!(Prefix::parse_exact("100.64.0.1/10"), Err(PrefixError::HostBits));
        assert_eq!(Prefix::parse_exact("100.64.0.0/33"), Err(PrefixError::Length));
        assert_eq!(Prefix::parse_exact("100.64.0.0"), Err(PrefixError::Syntax));
        assert_eq!(Prefix::parse_exact("100.64.0.0/+5"), Err(PrefixError::Syntax));
        assert_eq!(Prefix::parse_exact("::/129"), Err(PrefixError::Length));
    }

    #[test]
    fn host_bits_kept_or_cleared() {
        let a = Prefix::new("100.64.0.7".parse().unwrap(), 10).unwrap();
        assert_eq!(a.to_string(), "100.64.0.7/10");
        assert_eq!(a.masked(), CGNAT_RANGE);
        assert_eq!(Prefix::new_masked(a.addr(), 10), Some(CGNAT_RANGE));
        assert!(a.contains("100.127.0.1".parse().unwrap()), "host bits are ignored");
        assert_eq!(Prefix::new("::".parse().unwrap(), 129), None);
        assert_eq!(Prefix::new("0.0.0.0".parse().unwrap(), 33), None);
        assert!(Prefix::host("10.0.0.1".parse().unwrap()).is_single_ip());
        assert!(p("::/0").is_default() && !p("::/0").is_ipv4());
        assert_eq!(CGNAT_RANGE.mask(), 0xffc0_0000);
        assert_eq!(p("0.0.0.0/0").mask(), 0);
        assert_eq!(p("::/0").mask(), 0);
        assert_eq!(p("::1").mask(), u128::MAX);
    }

    #[test]
    fn containment() {
        assert!(CGNAT_RANGE.contains("100.127.255.255".parse().unwrap()));
        assert!(!CGNAT_RANGE.contains("100.128.0.0".parse().unwrap()));
        assert!(!p("0.0.0.0/0").contains("::".parse().unwrap()), "families never mix");
        let q = p("fd7a:115c:a1e0:ab12::/64");
        assert!(TAILSCALE_ULA_RANGE.contains_prefix(&q));
        assert!(!q.contains_prefix(&TAILSCALE_ULA_RANGE));
        assert!(q.overlaps(&TAILSCALE_ULA_RANGE) && TAILSCALE_ULA_RANGE.overlaps(&q));
        assert!(!p("10.0.0.0/9").overlaps(&p("10.128.0.0/9")));
        assert!(!p("::/0").overlaps(&p("0.0.0.0/0")));
    }

    #[test]
    fn tailnet_and_reserved_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(is_tailnet_ip(ip("100.64.0.1")) && is_tailnet_ip(ip("fd7a:115c:a1e0::1")));
        assert!(!is_tailnet_ip(ip("100.128.0.1")) && !is_tailnet_ip(ip("fd7a:115c:a1e1::1")));
        for r in [
            "100.115.92.1",
            "100.115.93.255",
            "100.100.100.100",
            "fd7a:115c:a1e0::53",
        ] {
            assert!(is_reserved(ip(r)), "{r}");
        }
        for r in [
            "fd7a:115c:a1e0:b1a::1",
            "fd7a:115c:a1e0:efe3::9",
            "fd7a:115c:a1e0:ab12:4843:cd96:6264:1",
        ] {
            assert!(is_reserved(ip(r)), "{r}");
        }
        for r in [
            "100.115.94.0",
            "100.64.0.1",
            "fd7a:115c:a1e0::54",
            "fd7a:115c:a1e0:ab12:4843:cd96:6300:1",
        ] {
            assert!(!is_reserved(ip(r)), "{r}");
        }
    }

    fn any_prefix() -> impl Strategy<Value = (IpAddr, u8)> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, b)| (IpAddr::V4(Ipv4Addr::from(a)), b)),
            (any::<u128>(), 0u8..=128).prop_map(|(a, b)| (IpAddr::V6(Ipv6Addr::from(a)), b)),
        ]
    }

    proptest! {
        #[test]
        fn display_parse_roundtrip((a, b) in any_prefix()) {
            let q = Prefix::new(a, b).unwrap();
            // FromStr masks; parse_exact accepts exactly the masked forms.
            prop_assert_eq!(q.to_string().parse::<Prefix>(), Ok(q.masked()));
            prop_assert_eq!(Prefix::parse_exact(&q.masked().to_string()), Ok(q.masked()));
            if q.masked() != q {
                prop_assert_eq!(Prefix::parse_exact(&q.to_string()), Err(PrefixError::HostBits));
            }
        }

        /// `contains` against a reference on u128: the top `b` bits of the family's width agree.
        #[test]
        fn contains_matches_reference((a, b) in any_prefix(), x in any::<u128>()) {
            let q = Prefix::new(a, b).unwrap();
            let (ip, w) = match a {
                IpAddr::V4(_) => (IpAddr::V4(Ipv4Addr::from(x as u32)), 32u32),
                IpAddr::V6(_) => (IpAddr::V6(Ipv6Addr::from(x)), 128),
            };
            let shift = w - u32::from(b);
            let top = |v: u128| if shift >= 128 { 0 } else { v >> shift };
            prop_assert_eq!(q.contains(ip), top(ip_bits(ip)) == top(ip_bits(a)));
            // The prefix's own first address is inside, and so is any sub-prefix of it.
            prop_assert!(q.contains(q.masked().addr()));
            let sub = Prefix::new_masked(ip, b.saturating_add(1).min(w as u8)).unwrap();
            prop_assert_eq!(q.contains_prefix(&sub), q.contains(ip));
            prop_assert_eq!(sub.overlaps(&q), q.contains(ip));
        }

        #[test]
        fn arbitrary_text_never_panics(s in any::<String>()) {
            let _ = s.parse::<Prefix>();
            let _ = Prefix::parse_exact(&s);
        }
    }
}
