//! The client's view of the tailnet, rebuilt from a stream of MapResponses.
//!
//! Mirrors tailscale `control/controlclient/map.go` (`updateStateFromResponse`): omitted fields
//! mean "unchanged", a non-empty `Peers` replaces the peer set, `PeersChanged` upserts by ID,
//! `PeersRemoved` deletes, `PeersChangedPatch` patches single fields, and the packet filter is
//! kept as named chunks: the legacy `PacketFilter` replaces the chunk `"base"`, then each
//! `PacketFilters` entry replaces its chunk (`null` deletes it, `"*": null` clears all first),
//! mirroring Go `mapSession.updateStateFromResponse`. Pure: no I/O, no clock.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use crate::tailcfg::{DerpMap, DnsConfig, FilterRule, MapResponse, Node, UserProfile};

/// The chunk the legacy `PacketFilter` field stands for.
const BASE_FILTER: &str = "base";
/// The `PacketFilters` key whose `null` value clears every chunk.
const ALL_FILTERS: &str = "*";

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
    /// Packet filter chunks by name (see [`Netmap::packet_filter`]). No chunk at all, as before
    /// control sends any filter, means no rule: new inbound connections are denied.
    pub filters: BTreeMap<String, Vec<FilterRule>>,
    /// Number of non-keepalive messages applied.
    pub updates: u64,
    /// Set by [`Netmap::begin_session`]: the next message that is not a keep-alive starts the
    /// session's per-session state afresh.
    new_session: bool,
}

impl Netmap {
    /// Applies one message. Keep-alives change nothing.
    pub fn apply(&mut self, m: MapResponse) {
        if m.keep_alive && m.node.is_none() && m.peers.is_none() && m.peers_changed.is_none() {
            return;
        }
        self.updates += 1;
        if std::mem::take(&mut self.new_session) {
            self.filters.clear();
        }
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
        // The older way, one list: it is the chunk "base" (Go keeps it under that name too).
        if let Some(rules) = m.packet_filter {
            self.filters.insert(BASE_FILTER.to_string(), rules);
        }
        if let Some(chunks) = m.packet_filters {
            if chunks.get(ALL_FILTERS).is_some_and(Option::is_none) {
                self.filters.clear();
            }
            for (name, rules) in chunks {
                match rules {
                    // A "*" with rules means nothing (Go skips it).
                    _ if name == ALL_FILTERS => {}
                    Some(rules) => {
                        self.filters.insert(name, rules);
                    }
                    None => {
                        self.filters.remove(&name);
                    }
                }
            }
        }
    }

    /// Starts a new map session. Go keeps the filter chunks per session (`mapSession`), so a
    /// chunk the server no longer sends must not outlive the stream that sent it: the new
    /// session's first message (keep-alives aside) states the filter afresh, and without one
    /// there is none (deny all). Until that message, and for the rest of the netmap, the old
    /// state stands.
    pub fn begin_session(&mut self) {
        self.new_session = true;
    }

    /// The packet filter in force: every chunk's rules, chunks in name order (Go sorts the
    /// names before concatenating).
    pub fn packet_filter(&self) -> impl Iterator<Item = &FilterRule> + Clone {
        self.filters.values().flatten()
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
    use crate::tailcfg::{NetPortRange, PeerChange, PortRange};

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

    /// Applies one MapResponse given as JSON, as the map stream delivers it.
    fn apply_json(nm: &mut Netmap, json: &str) {
        nm.apply(serde_json::from_str(json).expect("MapResponse JSON"));
    }

    fn rule(src: &str) -> FilterRule {
        FilterRule {
            src_ips: vec![src.into()],
            dst_ports: vec![NetPortRange {
                ip: "*".into(),
                ports: PortRange { first: 0, last: 65535 },
            }],
            ip_proto: Vec::new(),
        }
    }

    fn srcs(nm: &Netmap) -> Vec<String> {
        nm.packet_filter().map(|r| r.src_ips.join(",")).collect()
    }

    #[test]
    fn filters_merge_and_clear() {
        let mut nm = Netmap::default();
        nm.apply(MapResponse {
            packet_filters: Some(BTreeMap::from([("base".into(), Some(FilterRule::allow_all()))])),
            ..Default::default()
        });
        assert_eq!(nm.filters.len(), 1);
        // "*" with a list is not a clear (Go requires null).
        nm.apply(MapResponse {
            packet_filters: Some(BTreeMap::from([("*".into(), Some(vec![]))])),
            ..Default::default()
        });
        assert_eq!(nm.filters.len(), 1);
        nm.apply(MapResponse {
            packet_filters: Some(BTreeMap::from([("*".into(), None)])),
            ..Default::default()
        });
        assert!(nm.filters.is_empty());
    }

    /// The official control server deletes a chunk with `null`; that used to fail the whole
    /// message.
    #[test]
    fn null_chunk_deletes_it() {
        let mut nm = Netmap::default();
        apply_json(
            &mut nm,
            r#"{"PacketFilters":{"base":[{"SrcIPs":["100.64.0.2"],"DstPorts":[{"IP":"*","Ports":{"First":22,"Last":22}}]}],
                "extra":[{"SrcIPs":["100.64.0.3"],"DstPorts":[{"IP":"*","Ports":{"First":0,"Last":65535}}],"IPProto":[17]}]}}"#,
        );
        assert_eq!(srcs(&nm), ["100.64.0.2", "100.64.0.3"]);
        assert_eq!(nm.filters["extra"][0].ip_proto, vec![17]);
        apply_json(&mut nm, r#"{"PacketFilters":{"base":null}}"#);
        assert_eq!(srcs(&nm), ["100.64.0.3"]);
        // Deleting a chunk that does not exist is fine.
        apply_json(&mut nm, r#"{"PacketFilters":{"nope":null}}"#);
        assert_eq!(srcs(&nm), ["100.64.0.3"]);
    }

    #[test]
    fn chunks_replace_by_name_and_concatenate_in_name_order() {
        let mut nm = Netmap::default();
        apply_json(
            &mut nm,
            r#"{"PacketFilters":{"b":[{"SrcIPs":["2.2.2.2"],"DstPorts":[]}],"a":[{"SrcIPs":["1.1.1.1"],"DstPorts":[]}]}}"#,
        );
        assert_eq!(srcs(&nm), ["1.1.1.1", "2.2.2.2"]);
        apply_json(
            &mut nm,
            r#"{"PacketFilters":{"a":[{"SrcIPs":["3.3.3.3"],"DstPorts":[]},{"SrcIPs":["4.4.4.4"],"DstPorts":[]}]}}"#,
        );
        assert_eq!(srcs(&nm), ["3.3.3.3", "4.4.4.4", "2.2.2.2"]);
        // "*": null clears first, then the other entries of the same message apply.
        apply_json(
            &mut nm,
            r#"{"PacketFilters":{"*":null,"c":[{"SrcIPs":["5.5.5.5"],"DstPorts":[]}]}}"#,
        );
        assert_eq!(srcs(&nm), ["5.5.5.5"]);
        // An empty map changes nothing.
        apply_json(&mut nm, r#"{"PacketFilters":{}}"#);
        assert_eq!(srcs(&nm), ["5.5.5.5"]);
    }

    #[test]
    fn absent_filter_fields_leave_the_filter_alone() {
        let mut nm = Netmap::default();
        nm.apply(MapResponse {
            packet_filters: Some(BTreeMap::from([("base".into(), Some(vec![rule("*")]))])),
            ..Default::default()
        });
        apply_json(&mut nm, r#"{"PeersRemoved":[7]}"#);
        apply_json(&mut nm, r#"{"PacketFilter":null,"DNSConfig":{}}"#);
        assert_eq!(srcs(&nm), ["*"]);
        apply_json(&mut nm, r#"{"KeepAlive":true}"#);
        assert_eq!(srcs(&nm), ["*"]);
    }

    /// The legacy field is the chunk "base": `[]` there denies all (if it is the only chunk).
    #[test]
    fn legacy_packet_filter_is_the_base_chunk() {
        let mut nm = Netmap::default();
        apply_json(
            &mut nm,
            r#"{"PacketFilter":[{"SrcIPs":["100.64.0.0/10"],"DstPorts":[{"IP":"*","Ports":{"First":0,"Last":65535}}]}]}"#,
        );
        assert_eq!(srcs(&nm), ["100.64.0.0/10"]);
        apply_json(
            &mut nm,
            r#"{"PacketFilters":{"zz":[{"SrcIPs":["9.9.9.9"],"DstPorts":[]}]}}"#,
        );
        apply_json(&mut nm, r#"{"PacketFilter":[{"SrcIPs":["1.2.3.4"],"DstPorts":[]}]}"#);
        assert_eq!(srcs(&nm), ["1.2.3.4", "9.9.9.9"]);
        apply_json(&mut nm, r#"{"PacketFilter":[],"PacketFilters":{"zz":null}}"#);
        assert_eq!(nm.packet_filter().count(), 0);
        assert!(nm.filters.contains_key("base"), "an empty base chunk is kept");
    }

    #[test]
    fn a_new_session_forgets_the_old_chunks() {
        let mut nm = Netmap::default();
        apply_json(
            &mut nm,
            r#"{"PacketFilters":{"base":[{"SrcIPs":["*"],"DstPorts":[]}],"old":[{"SrcIPs":["1.1.1.1"],"DstPorts":[]}]}}"#,
        );
        nm.begin_session();
        apply_json(&mut nm, r#"{"KeepAlive":true}"#);
        assert_eq!(srcs(&nm), ["*", "1.1.1.1"], "a keep-alive is not the first message");
        apply_json(
            &mut nm,
            r#"{"PacketFilters":{"base":[{"SrcIPs":["2.2.2.2"],"DstPorts":[]}]}}"#,
        );
        assert_eq!(srcs(&nm), ["2.2.2.2"]);
        // A session whose first message has no filter has none.
        nm.begin_session();
        apply_json(&mut nm, r#"{"Domain":"x"}"#);
        assert_eq!(nm.packet_filter().count(), 0);
    }

    /// Go writes nil slices as `null`, and CapGrant rules carry no DstPorts; neither may fail
    /// the message.
    #[test]
    fn go_nulls_and_cap_grants_parse() {
        let mut nm = Netmap::default();
        apply_json(
            &mut nm,
            r#"{"PacketFilters":{"base":[
                {"SrcIPs":["*"],"DstPorts":[{"IP":"100.64.0.1","Ports":null}],"IPProto":null},
                {"SrcIPs":["100.64.0.9"],"CapGrant":[{"Dsts":["100.64.0.1/32"],"CapMap":{"example.com/cap/x":[{}]}}]},
                {"SrcIPs":null,"DstPorts":null,"IPProto":[6,4294967296]}]}}"#,
        );
        let r: Vec<&FilterRule> = nm.packet_filter().collect();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].dst_ports[0].ports, PortRange::default());
        assert!(r[1].dst_ports.is_empty());
        assert_eq!(r[2].ip_proto, vec![6, 4_294_967_296]);
    }
}
