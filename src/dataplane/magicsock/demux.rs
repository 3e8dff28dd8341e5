//! Demultiplexing of the one UDP port that carries STUN, disco and WireGuard together.
//!
//! Mirrors the rule of tailscale `wgengine/magicsock/magicsock.go` `packetLooksLike` (spec §7.1):
//!
//! ```text
//! STUN       first byte's top 2 bits 0, byte 1 == 0x01 (binding), bytes 4..8 = 21 12 A4 42
//! disco      starts with "TS💬" (54 53 F0 9F 92 AC) and is at least a disco header long
//! WireGuard  everything else (types 1..4 followed by three zero bytes; junk included)
//! ```
//!
//! The three shapes cannot collide: disco's first byte 0x54 has top bits `01`, and WireGuard's
//! byte 1 is always zero. Junk is classed as WireGuard, as Go does; the WireGuard layer drops it.
//! Peer-relay Geneve encapsulation (Go ≥ 1.86, only used when control grants relay
//! capabilities) is not recognised: such datagrams fall through to WireGuard and are dropped.
#![forbid(unsafe_code)]

use crate::{wire::disco, wire::stun};

/// What a received UDP datagram looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A STUN binding message (for us: a binding response to a netcheck probe).
    Stun,
    /// A disco packet: look up the sender key, then open it.
    Disco,
    /// Anything else: hand it to WireGuard.
    WireGuard,
}

/// Classifies `pkt` by its first bytes, before any crypto (Go `packetLooksLike`).
pub fn classify(pkt: &[u8]) -> Kind {
    if stun::is_stun(pkt) {
        Kind::Stun
    } else if disco::looks_like_disco(pkt) {
        Kind::Disco
    } else {
        Kind::WireGuard
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::wire::keys::DiscoPrivate;

    #[test]
    fn table() {
        let stun_req = stun::binding_request([7; 12]).to_vec();
        let stun_resp = stun::binding_response([7; 12], "192.0.2.1:41641".parse().unwrap());
        let disco_pkt = disco::seal(
            &DiscoPrivate::from_random([1; 32]),
            &DiscoPrivate::from_random([2; 32]).public(),
            [0; 24],
            &disco::Message::CallMeMaybe { endpoints: vec![] },
        );
        // WireGuard handshake initiation (type 1), response, cookie, transport data.
        let wg = |ty: u8, len: usize| {
            let mut v = vec![0u8; len];
            v[0] = ty;
            v
        };
        // A STUN-shaped header whose method byte is not binding (e.g. 0x0003 allocate).
        let mut stun_alloc = stun_req.clone();
        stun_alloc[1] = 0x03;
        // The disco magic but cut short of a full header.
        let short_disco = disco_pkt[..disco::HEADER_LEN - 1].to_vec();

        let cases: &[(&str, &[u8], Kind)] = &[
            ("stun request", &stun_req, Kind::Stun),
            ("stun response", &stun_resp, Kind::Stun),
            ("stun header only", &stun_req[..stun::HEADER_LEN], Kind::Stun),
            ("stun non-binding method", &stun_alloc, Kind::WireGuard),
            ("stun cut short", &stun_req[..stun::HEADER_LEN - 1], Kind::WireGuard),
            ("disco", &disco_pkt, Kind::Disco),
            ("disco header only", &disco_pkt[..disco::HEADER_LEN], Kind::Disco),
            ("disco cut short", &short_disco, Kind::WireGuard),
            ("wg initiation", &wg(1, 148), Kind::WireGuard),
            ("wg response", &wg(2, 92), Kind::WireGuard),
            ("wg cookie", &wg(3, 64), Kind::WireGuard),
            ("wg data", &wg(4, 32), Kind::WireGuard),
            ("empty", &[], Kind::WireGuard),
        ];
        for (name, pkt, want) in cases {
            assert_eq!(classify(pkt), *want, "{name}");
        }
    }

    proptest! {
        #[test]
        fn prop_never_panics_and_wireguard_headers_stay_wireguard(
            ty in 1u8..=4, body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let _ = classify(&body);
            let mut wg = vec![ty, 0, 0, 0];
            wg.extend_from_slice(&body);
            prop_assert_eq!(classify(&wg), Kind::WireGuard);
        }
    }
}
