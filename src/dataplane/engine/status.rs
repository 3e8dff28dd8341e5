//! The engine's part of `tinyscale status --json`: per-peer paths and traffic, counters of what
//! was dropped and why, and the DERP connections, built on request and never per packet; and
//! the fingerprint of the peers' paths that wakes the daemon's `tinyscale.peer` events.

use std::{collections::HashMap, sync::atomic::Ordering};

use serde_json::{json, Value};

use super::Engine;
use crate::{dataplane::magicsock::endpoint::PathStatus, wire::keys::NodePublic};

/// What the data plane knows for `status --json`, built when asked (never per packet).
#[derive(Debug, Default)]
pub struct EngineStatus {
    /// Per-peer path status (`CurAddr`, `Relay`, handshake age, bytes).
    pub peers: HashMap<NodePublic, Value>,
    /// Engine-wide counters ("Counters"): what was dropped and why.
    pub counters: Value,
    /// DERP regions with a connection task: region ID → `{"Connected", "Home"}`.
    pub derp: Value,
}

impl Engine {
    /// Status as of `now`: per-peer paths, counters and DERP connections.
    pub(super) fn status(&self, now: std::time::Instant) -> EngineStatus {
        let w = self.wg.stats();
        let d = &self.drops;
        let mut counters = json!({
            "DiscoMalformed": d.disco_malformed,
            "DiscoUnknownSender": d.disco_unknown_sender,
            "DiscoUndecryptable": d.disco_undecryptable,
            "StunUnsolicited": d.stun_unsolicited,
            "WireGuardMalformed": w.malformed,
            "WireGuardUnknownPeer": w.unknown_peer,
            "WireGuardRejected": w.rejected,
            "WireGuardBadSource": w.bad_source,
            "WireGuardNoRoute": w.no_route,
            "WireGuardRxPackets": w.rx_packets,
            "WireGuardTxDatagrams": w.tx_datagrams,
        });
        for (why, n) in self.filter.drops() {
            counters[format!("FilterDrop{}", why.name()).as_str()] = json!(n);
        }
        let mut peers = HashMap::with_capacity(self.peers.len());
        for (k, p) in &self.peers {
            let (cur, relay) = match p.endpoint.path(now) {
                PathStatus::Direct { addr, .. } => (addr.to_string(), String::new()),
                PathStatus::Derp(r) => (String::new(), r.to_string()),
                PathStatus::Unreachable => (String::new(), String::new()),
            };
            let ws = self.wg.peer_stats(k);
            peers.insert(
                *k,
                json!({
                    "CurAddr": cur,
                    "Relay": relay,
                    "RxBytes": ws.map_or(0, |s| s.rx_bytes),
                    "TxBytes": ws.map_or(0, |s| s.tx_bytes),
                    "LastHandshakeSecs": ws.and_then(|s| s.since_handshake).map(|d| d.as_secs()),
                    "Name": p.name,
                }),
            );
        }
        let mut derp = serde_json::Map::new();
        for (region, c) in &self.derps {
            derp.insert(
                region.to_string(),
                json!({"Connected": c.up.load(Ordering::Relaxed), "Home": *region == self.home_derp}),
            );
        }
        EngineStatus {
            peers,
            counters,
            derp: Value::Object(derp),
        }
    }
}

/// Inbound datagrams dropped by the engine itself (WireGuard keeps its own [`wg::WgStats`]).
#[derive(Debug, Default)]
pub(super) struct Drops {
    /// Disco magic but too short for the header.
    pub(super) disco_malformed: u64,
    /// Disco from a key no peer has, or relayed by a node that does not own that key.
    pub(super) disco_unknown_sender: u64,
    /// Disco whose box does not open with the sender's shared key.
    pub(super) disco_undecryptable: u64,
    /// STUN that answers no probe of ours.
    pub(super) stun_unsolicited: u64,
}

/// [pure] One number for the peers' paths as the `tinyscale.peer` event reports them (direct,
/// a DERP region or none): a sum of per-peer hashes, so the map's order does not matter.
pub(super) fn path_fingerprint<'a>(paths: impl Iterator<Item = (&'a NodePublic, PathStatus)>) -> u64 {
    use std::hash::{Hash, Hasher};
    paths.fold(0, |sum, (k, p)| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.hash(&mut h);
        match p {
            PathStatus::Direct { .. } => (1u8, 0),
            PathStatus::Derp(r) => (2, r),
            PathStatus::Unreachable => (0, 0),
        }
        .hash(&mut h);
        sum.wrapping_add(h.finish())
    })
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use super::*;
    use crate::wire::keys::NodePrivate;

    #[test]
    fn path_fingerprint_changes_only_with_the_reported_path() {
        let a = NodePrivate::from_random([1; 32]).public();
        let b = NodePrivate::from_random([2; 32]).public();
        let direct = |port: u16, ms: u64| PathStatus::Direct {
            addr: SocketAddr::from(([192, 0, 2, 1], port)),
            rtt: Duration::from_millis(ms),
        };
        let f = |v: &[(&NodePublic, PathStatus)]| path_fingerprint(v.iter().copied());
        let base = f(&[(&a, PathStatus::Derp(1)), (&b, direct(41641, 5))]);
        // Order, latency and the direct address itself do not count.
        assert_eq!(base, f(&[(&b, direct(41642, 9)), (&a, PathStatus::Derp(1))]));
        // Another region, direct, no path, or a peer more or less do.
        for other in [
            f(&[(&a, PathStatus::Derp(2)), (&b, direct(41641, 5))]),
            f(&[(&a, direct(1, 1)), (&b, direct(41641, 5))]),
            f(&[(&a, PathStatus::Unreachable), (&b, direct(41641, 5))]),
            f(&[(&b, direct(41641, 5))]),
        ] {
            assert_ne!(base, other);
        }
    }
}
