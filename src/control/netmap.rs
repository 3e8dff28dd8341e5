//! The client's view of the tailnet, rebuilt from a stream of MapResponses.
//!
//! Mirrors tailscale `control/controlclient/map.go` (`updateStateFromResponse`): omitted fields
//! mean "unchanged", a non-empty `Peers` replaces the peer set, `PeersChanged` upserts by ID,
//! `PeersRemoved` deletes, `PeersChangedPatch` patches single fields, and the packet filter is
//! kept as named chunks: the legacy `PacketFilter` replaces the chunk `"base"`, then each
//! `PacketFilters` entry replaces its chunk (`null` deletes it, `"*": null` clears all first),
//! mirroring Go `mapSession.updateStateFromResponse`. Pure: no I/O, no clock.
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, net::IpAddr};

use crate::wire::{
    prefix::Prefix,
    tailcfg::{DerpMap, DnsConfig, FilterRule, MapResponse, Node, UserProfile},
};

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

/// Why an `--exit-node` value cannot be used (Go `ipn.exitNodeIPOfArg` and
/// `checkExitNodePrefsLocked`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitNodeError {
    /// The value is this node's own tailnet IP or name.
    IsSelf(String),
    /// No peer has that tailnet IP or name.
    Unknown(String),
    /// More than one peer has that name.
    Ambiguous(String),
    /// The peer is there but control approved no default routes for it.
    NotOffered { arg: String, ip: String },
}

impl std::fmt::Display for ExitNodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitNodeError::IsSelf(a) => write!(
                f,
                "cannot use {a} as an exit node: it is this node; did you mean --advertise-exit-node?"
            ),
            ExitNodeError::Unknown(a) => write!(
                f,
                "invalid value {a:?} for --exit-node: no peer has that tailnet IP or name (see `tinyscale exit-node list`)"
            ),
            ExitNodeError::Ambiguous(a) => write!(
                f,
                "invalid value {a:?} for --exit-node: several peers have that name; use its tailnet IP"
            ),
            ExitNodeError::NotOffered { arg, ip } => write!(
                f,
                "node {arg} ({ip}) is not offering an exit node: it must run `up --advertise-exit-node` \
                 and the coordinator approve 0.0.0.0/0 and ::/0 (see `tinyscale exit-node list`)"
            ),
        }
    }
}

/// [pure] True if `arg` names `node`: one of its tailnet IPs, its base name, or its FQDN with
/// or without the final dot (case-insensitive, as Go compares names).
pub fn node_matches(node: &Node, arg: &str) -> bool {
    if arg.is_empty() {
        return false;
    }
    let fqdn = node.name.trim_end_matches('.');
    let base = fqdn.split('.').next().unwrap_or("");
    node.addresses.iter().any(|a| a.split('/').next() == Some(arg))
        || arg.trim_end_matches('.').eq_ignore_ascii_case(fqdn) && !fqdn.is_empty()
        || arg.eq_ignore_ascii_case(base) && !base.is_empty()
}

/// [pure] Go's `ExitNodeOption`: control approved both default routes for `node` (they are in
/// its AllowedIPs).
pub fn offers_exit_node(node: &Node) -> bool {
    ["0.0.0.0/0", "::/0"]
        .iter()
        .all(|d| node.allowed_ips.iter().any(|a| a == d))
}

impl Netmap {
    /// The peer `arg` (a tailnet IP or name) names, if any, and only if it is the one peer with
    /// that name.
    pub fn find_peer(&self, arg: &str) -> Option<&Node> {
        let mut it = self.peers.values().filter(|p| node_matches(p, arg));
        let first = it.next()?;
        it.next().is_none().then_some(first)
    }

    /// Resolves an `--exit-node` value to the peer's first tailnet IP, the form kept in the
    /// prefs ("" stays ""). Before the first netmap the value is kept as given (the daemon
    /// applies its uci section at start, before control answers): the data plane matches it
    /// by IP or name once peers arrive, and the next `up` resolves it. Go's CLI refuses a name
    /// there; a router booting with `option exit_node 'name'` must not lose all its prefs.
    pub fn resolve_exit_node(&self, arg: &str) -> Result<String, ExitNodeError> {
        if arg.is_empty() {
            return Ok(String::new());
        }
        let Some(me) = &self.self_node else {
            return Ok(arg.to_string());
        };
        if node_matches(me, arg) {
            return Err(ExitNodeError::IsSelf(arg.to_string()));
        }
        let mut it = self.peers.values().filter(|p| node_matches(p, arg));
        let peer = match (it.next(), it.next()) {
            (Some(p), None) => p,
            (Some(_), Some(_)) => return Err(ExitNodeError::Ambiguous(arg.to_string())),
            (None, _) => return Err(ExitNodeError::Unknown(arg.to_string())),
        };
        let ip = peer
            .addresses
            .first()
            .and_then(|a| a.split('/').next())
            .unwrap_or_default()
            .to_string();
        if !offers_exit_node(peer) {
            return Err(ExitNodeError::NotOffered {
                arg: arg.to_string(),
                ip,
            });
        }
        Ok(ip)
    }
}

/// [pure] The address a `whois` argument names: `IP`, `IP:port` or `[IPv6]:port` (the forms
/// `tailscale whois` takes). `None` for anything else.
pub fn whois_addr(arg: &str) -> Option<IpAddr> {
    arg.parse::<IpAddr>()
        .ok()
        .or_else(|| arg.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

impl Netmap {
    /// [pure] The node that owns `ip` (Go `LocalBackend.WhoIs`): the self node or a peer with it
    /// among its addresses, else the node serving the longest primary subnet route that holds
    /// it (so traffic from a LAN host behind a subnet router names that router).
    pub fn whois(&self, ip: IpAddr) -> Option<&Node> {
        let nodes = || self.self_node.iter().chain(self.peers.values());
        nodes()
            .find(|n| {
                n.addresses
                    .iter()
                    .any(|a| a.split('/').next().and_then(|x| x.parse().ok()) == Some(ip))
            })
            .or_else(|| {
                nodes()
                    .filter_map(|n| {
                        let best = n
                            .primary_routes
                            .iter()
                            .filter_map(|r| r.parse::<Prefix>().ok())
                            .filter(|r| r.contains(ip))
                            .map(|r| r.bits())
                            .max()?;
                        Some((best, n))
                    })
                    .max_by_key(|(len, _)| *len)
                    .map(|(_, n)| n)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tailcfg::{NetPortRange, PeerChange, PortRange};

    fn peer(id: u64, name: &str) -> Node {
        Node {
            id,
            name: name.into(),
            ..Default::default()
        }
    }

    fn exit_net() -> Netmap {
        let node = |id: u64, name: &str, ip: &str, exit: bool| {
            let mut n = peer(id, name);
            n.addresses = vec![format!("{ip}/32"), format!("fd7a:115c:a1e0::{id}/128")];
            n.allowed_ips = n.addresses.clone();
            if exit {
                n.allowed_ips.extend(["0.0.0.0/0".to_string(), "::/0".to_string()]);
            }
            n
        };
        let mut nm = Netmap::default();
        nm.apply(MapResponse {
            node: Some(node(1, "me.ts.example.", "100.64.0.1", false)),
            peers: Some(vec![
                node(2, "router.ts.example.", "100.64.0.2", true),
                node(3, "laptop.ts.example.", "100.64.0.3", false),
                node(4, "twin.ts.example.", "100.64.0.4", true),
                node(5, "twin.ts.example.", "100.64.0.5", true),
            ]),
            ..Default::default()
        });
        nm
    }

    #[test]
    fn exit_node_resolves_by_ip_or_name_to_the_peer_ip() {
        let nm = exit_net();
        for arg in [
            "100.64.0.2",
            "fd7a:115c:a1e0::2",
            "router",
            "ROUTER",
            "router.ts.example",
            "router.ts.example.",
        ] {
            assert_eq!(nm.resolve_exit_node(arg), Ok("100.64.0.2".to_string()), "{arg}");
        }
        assert_eq!(nm.resolve_exit_node(""), Ok(String::new()));
        assert_eq!(nm.resolve_exit_node("100.64.0.4"), Ok("100.64.0.4".to_string()));
    }

    #[test]
    fn exit_node_errors_name_the_problem() {
        let nm = exit_net();
        assert_eq!(nm.resolve_exit_node("me"), Err(ExitNodeError::IsSelf("me".into())));
        assert_eq!(
            nm.resolve_exit_node("100.64.0.1"),
            Err(ExitNodeError::IsSelf("100.64.0.1".into()))
        );
        assert_eq!(
            nm.resolve_exit_node("nobody"),
            Err(ExitNodeError::Unknown("nobody".into()))
        );
        assert_eq!(
            nm.resolve_exit_node("100.64.0.9"),
            Err(ExitNodeError::Unknown("100.64.0.9".into()))
        );
        assert_eq!(
            nm.resolve_exit_node("twin"),
            Err(ExitNodeError::Ambiguous("twin".into()))
        );
        let e = nm.resolve_exit_node("laptop").unwrap_err();
        assert_eq!(
            e,
            ExitNodeError::NotOffered {
                arg: "laptop".into(),
                ip: "100.64.0.3".into()
            }
        );
        assert!(e.to_string().contains("not offering an exit node"), "{e}");
        // One default route alone is no exit node (Go ContainsExitRoutes wants both).
        let mut nm = nm;
        nm.peers.get_mut(&3).unwrap().allowed_ips.push("0.0.0.0/0".into());
        assert!(matches!(
            nm.resolve_exit_node("laptop"),
            Err(ExitNodeError::NotOffered { .. })
        ));
        // Before the first netmap: kept as given, matched once peers arrive.
        let empty = Netmap::default();
        assert_eq!(empty.resolve_exit_node("100.64.0.2"), Ok("100.64.0.2".to_string()));
        assert_eq!(empty.resolve_exit_node("router"), Ok("router".to_string()));
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
            ..Default::default()
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

    #[test]
    fn whois_finds_owners_of_addresses_and_routes() {
        let mut nm = exit_net();
        let mut lan = peer(6, "gw.ts.example.");
        lan.addresses = vec!["100.64.0.6/32".into()];
        lan.primary_routes = vec!["192.168.0.0/16".into()];
        lan.allowed_ips = vec!["100.64.0.6/32".into(), "192.168.0.0/16".into(), "10.1.0.0/16".into()];
        let mut narrow = peer(7, "gw2.ts.example.");
        narrow.addresses = vec!["100.64.0.7/32".into()];
        narrow.primary_routes = vec!["192.168.5.0/24".into(), "fd00:5::/64".into()];
        nm.apply(MapResponse {
            peers_changed: Some(vec![lan, narrow]),
            ..Default::default()
        });
        let who = |a: &str| whois_addr(a).and_then(|ip| nm.whois(ip)).map(|n| n.id);
        assert_eq!(who("100.64.0.3"), Some(3));
        assert_eq!(who("100.64.0.3:22"), Some(3));
        assert_eq!(who("[fd7a:115c:a1e0:0::2]:443"), Some(2), "v6, written another way");
        assert_eq!(who("100.64.0.1"), Some(1), "self");
        assert_eq!(who("192.168.1.9"), Some(6), "subnet route");
        assert_eq!(who("192.168.5.9"), Some(7), "the longest route wins");
        assert_eq!(who("fd00:5::1"), Some(7));
        // In the peer's AllowedIPs but not among its primary routes: not its.
        assert_eq!(who("10.1.2.3"), None);
        assert_eq!(who("100.64.0.99"), None, "no node has it");
        assert_eq!(whois_addr("laptop"), None);
        assert_eq!(whois_addr("100.64.0.3:x"), None);
        assert_eq!(whois_addr(""), None);
    }
}
