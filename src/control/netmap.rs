//! The client's view of the tailnet, rebuilt from a stream of MapResponses.
//!
//! Mirrors tailscale `control/controlclient/map.go` (`updateStateFromResponse`): omitted fields
//! mean "unchanged", a non-empty `Peers` replaces the peer set, `PeersChanged` upserts by ID,
//! `PeersRemoved` deletes, `PeersChangedPatch` patches single fields, and `PacketFilters` chunks
//! merge by name (`null` deletes, `"*": null` clears). Pure: no I/O, no clock.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use crate::tailcfg::{DerpMap, DnsConfig, FilterRule, MapResponse, Node, UserProfile};

/// Everything the client knows from control.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Netmap {
    /// This node.
    pub self_node: Option<Node>,
    /// Peers by node ID.
    pub peers: BTreeMap<u64, Node>,
    /// Relay map.
    pub derp_map: DerpMap,
    /// DNS settings.
    pub dns: DnsConfig,
    /// Tailnet display name.
    pub domain: String,
    /// Users by ID.
    pub users: BTreeMap<u64, UserProfile>,
    /// Packet filter chunks by name.
    pub filters: BTreeMap<String, Vec<FilterRule>>,
    /// Number of non-keepalive messages applied.
    pub updates: u64,
}

impl Netmap {
    /// Applies one message. Keep-alives change nothing.
    pub fn apply(&mut self, m: MapResponse) {
        if m.keep_alive && m.node.is_none() && m.peers.is_none() && m.peers_changed.is_none() {
            return;
        }
        self.updates += 1;
        if let Some(n) = m.node {
            self.self_node = Some(n);
        }
        if let Some(d) = m.derp_map {
            // A DERPMap without regions only carries HomeParams: keep the regions.
            if !d.regions.is_empty() {
                self.derp_map = d;
            }
        }
        if let Some(peers) = m.peers {
            // Go ignores an empty list here; removal goes through PeersRemoved.
            if !peers.is_empty() {
                self.peers = peers.into_iter().map(|p| (p.id, p)).collect();
            }
        }
        for p in m.peers_changed.into_iter().flatten() {
            self.peers.insert(p.id, p);
        }
        for id in m.peers_removed.into_iter().flatten() {
            self.peers.remove(&id);
        }
        for pc in m.peers_changed_patch.into_iter().flatten() {
            let Some(p) = self.peers.get_mut(&pc.node_id) else {
                continue;
            };
            if let Some(r) = pc.derp_region {
                p.home_derp = r;
            }
            if let Some(e) = pc.endpoints {
                p.endpoints = e;
            }
            if let Some(k) = pc.key {
                p.key = k;
            }
            if let Some(k) = pc.disco_key {
                p.disco_key = k;
            }
            if let Some(o) = pc.online {
                p.online = Some(o);
            }
            if let Some(t) = pc.last_seen {
                p.last_seen = Some(t);
            }
            if let Some(t) = pc.key_expiry {
                p.key_expiry = t;
            }
        }
        for (id, online) in m.online_change.into_iter().flatten() {
            if let Some(p) = id.parse().ok().and_then(|id: u64| self.peers.get_mut(&id)) {
                p.online = Some(online);
            }
        }
        if let Some(d) = m.dns_config {
            self.dns = d;
        }
        if let Some(d) = m.domain {
            self.domain = d;
        }
        for u in m.user_profiles.into_iter().flatten() {
            self.users.insert(u.id, u);
        }
        if let Some(f) = m.packet_filters {
            if f.get("*").is_some_and(|v| v.is_empty()) {
                self.filters.clear();
            }
            for (k, v) in f {
                if k != "*" {
                    self.filters.insert(k, v);
                }
            }
        }
    }

    /// The MagicDNS suffix: the self name minus its first label (`a.ts.example.` → `ts.example`).
    pub fn magic_dns_suffix(&self) -> String {
        let name = self.self_node.as_ref().map(|n| n.name.as_str()).unwrap_or("");
        name.trim_end_matches('.')
            .split_once('.')
            .map(|x| x.1.to_string())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tailcfg::PeerChange;

    fn peer(id: u64, name: &str) -> Node {
        Node {
            id,
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn full_then_deltas() {
        let mut nm = Netmap::default();
        nm.apply(MapResponse {
            node: Some(peer(1, "me.ts.example.")),
            peers: Some(vec![peer(2, "b."), peer(3, "c.")]),
            ..Default::default()
        });
        assert_eq!(nm.peers.len(), 2);
        assert_eq!(nm.magic_dns_suffix(), "ts.example");
        // Empty Peers is ignored (Go semantics).
        nm.apply(MapResponse {
            peers: Some(vec![]),
            ..Default::default()
        });
        assert_eq!(nm.peers.len(), 2);
        nm.apply(MapResponse {
            peers_removed: Some(vec![2]),
            peers_changed: Some(vec![peer(4, "d.")]),
            ..Default::default()
        });
        assert_eq!(nm.peers.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
        nm.apply(MapResponse {
            peers_changed_patch: Some(vec![PeerChange {
                node_id: 3,
                endpoints: Some(vec!["1.2.3.4:5".into()]),
                online: Some(true),
                derp_region: Some(999),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let c = &nm.peers[&3];
        assert_eq!(c.endpoints, vec!["1.2.3.4:5".to_string()]);
        assert_eq!((c.online, c.home_derp), (Some(true), 999));
        let before = nm.updates;
        nm.apply(MapResponse {
            keep_alive: true,
            ..Default::default()
        });
        assert_eq!(nm.updates, before);
    }

    #[test]
    fn filters_merge_and_clear() {
        let mut nm = Netmap::default();
        nm.apply(MapResponse {
            packet_filters: Some(BTreeMap::from([("base".into(), FilterRule::allow_all())])),
            ..Default::default()
        });
        assert_eq!(nm.filters.len(), 1);
        nm.apply(MapResponse {
            packet_filters: Some(BTreeMap::from([("*".into(), vec![])])),
            ..Default::default()
        });
        assert!(nm.filters.is_empty());
    }
}
