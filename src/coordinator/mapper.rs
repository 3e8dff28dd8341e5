//! Builds MapResponses: the full first message of a map session and per-viewer deltas for each
//! [`Change`].
//!
//! Mirrors the roles of headscale `hscontrol/mapper/{mapper,builder}.go` and
//! `hscontrol/types/node.go` (`TailNode`). A delta touches only the nodes a change names, so one
//! change costs O(sessions), not O(sessions × nodes). Pure: the clock comes in as `now`.
//!
//! With an ACL policy ([`super::policy`]) each viewer gets its own PacketFilter and only the
//! peers it may reach or that may reach it; a node change then also carries the viewer's
//! recompiled filter (a new node's addresses may appear in it), a peer that is not visible is
//! sent as removed, and a change to the viewer itself resends its full map (its own visibility
//! may have moved). Without a policy, everything is allowed and every node is a peer.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use super::{
    policy::{Compiled, Member},
    state::{Change, State},
};
use crate::tailcfg::{self, DnsConfig, DnsRecord, FilterRule, MapResponse, Resolver, UserProfile};

fn fqdn(state: &State, given: &str) -> String {
    let d = &state.settings.base_domain;
    if d.is_empty() {
        format!("{given}.")
    } else {
        format!("{given}.{d}.")
    }
}

/// The tailcfg view of node `id` (self or peer), or `None` if it does not exist.
pub fn tail_node(state: &State, id: u64, primaries: &BTreeMap<String, u64>, now: i64) -> Option<tailcfg::Node> {
    let n = state.node(id)?;
    let mut addresses = Vec::with_capacity(2);
    if let Some(a) = n.ipv4 {
        addresses.push(format!("{a}/32"));
    }
    if let Some(a) = n.ipv6 {
        addresses.push(format!("{a}/128"));
    }
    let effective = State::effective_routes(n);
    let primary_routes: Vec<String> = primaries
        .iter()
        .filter(|(_, v)| **v == id)
        .map(|(k, _)| k.clone())
        .collect();
    let mut allowed = addresses.clone();
    allowed.extend(primary_routes.iter().cloned());
    let exit: Vec<&String> = effective.iter().filter(|r| *r == "0.0.0.0/0" || *r == "::/0").collect();
    if exit.len() == 2 {
        allowed.extend(exit.into_iter().cloned());
    }
    let online = state.is_online(id);
    let hostinfo = serde_json::from_str::<serde_json::Value>(&n.hostinfo)
        .ok()
        .filter(|v| v.is_object());
    Some(tailcfg::Node {
        id,
        stable_id: id.to_string(),
        name: fqdn(state, &n.given_name),
        user: n.user_id,
        key: n.node_key,
        key_expiry: tailcfg::format_opt_time(n.expiry),
        machine: n.machine_key,
        disco_key: n.disco_key,
        addresses,
        allowed_ips: allowed,
        endpoints: n.endpoints.clone(),
        home_derp: n.home_derp,
        derp: if n.home_derp > 0 {
            format!("{}:{}", tailcfg::DERP_MAGIC_IP, n.home_derp)
        } else {
            String::new()
        },
        hostinfo,
        created: tailcfg::format_time(n.created),
        cap: 0,
        tags: n.tags.clone(),
        primary_routes,
        online: Some(online),
        last_seen: if online {
            None
        } else {
            n.last_seen.map(tailcfg::format_time)
        },
        machine_authorized: true,
        cap_map: BTreeMap::new(),
        expired: n.expiry.is_some_and(|e| e <= now),
    })
}

fn profile(state: &State, uid: u64) -> Option<UserProfile> {
    state.user(uid).map(|u| UserProfile {
        id: u.id,
        login_name: format!("{}@", u.name),
        display_name: u.display_name.clone(),
    })
}

/// The DNS configuration sent to every node (spec §10.2), as headscale's `generateDNSConfig`
/// builds it: global resolvers, search domains, split DNS routes and extra records; with
/// MagicDNS on, `Proxied` and empty routes (answered by MagicDNS alone) for the base domain and
/// the reverse zones of the address prefixes (headscale `app.go`).
pub fn dns_config(state: &State) -> DnsConfig {
    let s = &state.settings;
    let resolver = |a: &String| Resolver { addr: a.clone() };
    let mut dns = DnsConfig {
        resolvers: s.nameservers.iter().map(resolver).collect(),
        ..Default::default()
    };
    if !s.base_domain.is_empty() {
        dns.domains.push(s.base_domain.clone());
    }
    for (domain, resolvers) in &s.split_dns {
        dns.routes
            .insert(format!("{domain}."), resolvers.iter().map(resolver).collect());
    }
    if s.magic_dns && !s.base_domain.is_empty() {
        dns.proxied = true;
        // `[]` (not null): answer from MagicDNS only.
        dns.routes.insert(format!("{}.", s.base_domain), Vec::new());
        for zone in reverse_zones_v4(s.ipam.v4)
            .into_iter()
            .chain(reverse_zone_v6(s.ipam.v6))
        {
            dns.routes.insert(zone, Vec::new());
        }
    }
    dns.extra_records = s
        .extra_records
        .iter()
        // No Type: Go infers A or AAAA from the value, and its dialer (tsdial's dnsMap) reads
        // only records without a Type.
        .map(|(name, ip)| DnsRecord {
            name: name.clone(),
            r#type: String::new(),
            value: ip.to_string(),
        })
        .collect();
    dns
}

/// The policy resolved against the current nodes, for one message.
pub struct PolicyView {
    compiled: Compiled,
    /// Sorted by id (the state's node order).
    members: Vec<Member>,
}

impl PolicyView {
    /// `None` when no policy is set (allow all, every node a peer).
    pub fn new(state: &State) -> Option<PolicyView> {
        let (_, pol) = state.policy()?;
        let members: Vec<Member> = state.nodes().map(|n| state.member(n)).collect();
        Some(PolicyView {
            compiled: pol.compile(&members),
            members,
        })
    }

    fn member(&self, id: u64) -> Option<&Member> {
        self.members
            .binary_search_by_key(&id, |m| m.id)
            .ok()
            .and_then(|i| self.members.get(i))
    }

    /// Whether `viewer` gets `peer` in its netmap.
    pub fn visible(&self, viewer: u64, peer: u64) -> bool {
        match (self.member(viewer), self.member(peer)) {
            (Some(a), Some(b)) => self.compiled.visible(a, b),
            _ => false,
        }
    }

    /// The FilterRules `viewer` enforces.
    pub fn filter(&self, viewer: u64) -> Vec<FilterRule> {
        self.member(viewer)
            .map(|m| self.compiled.filter_for(m))
            .unwrap_or_default()
    }
}

/// The `PacketFilters` of a message for `viewer`: its whole filter as the one `base` chunk.
fn packet_filters(view: Option<&PolicyView>, viewer: u64) -> BTreeMap<String, Option<Vec<FilterRule>>> {
    let rules = view.map_or_else(FilterRule::allow_all, |v| v.filter(viewer));
    BTreeMap::from([("base".to_string(), Some(rules))])
}

/// The `in-addr.arpa.` zones covering an IPv4 prefix, one per /16 (100.64.0.0/10 gives
/// `64.100.in-addr.arpa.` … `127.100.in-addr.arpa.`, Go's `magicDNSRootDomains`); a prefix longer
/// than /16 gets its one /16 zone, which MagicDNS answers for the tailnet part only.
fn reverse_zones_v4((addr, len): (std::net::Ipv4Addr, u8)) -> Vec<String> {
    let o = addr.octets();
    let len = len.min(16);
    let count = 1u32 << (16 - u32::from(len));
    let first = u32::from(o[1]) & !(count - 1);
    (first..first + count)
        .map(|b| format!("{b}.{}.in-addr.arpa.", o[0]))
        .collect()
}

/// The `ip6.arpa.` zone of an IPv6 prefix, truncated to whole nibbles (fd7a:115c:a1e0::/48 gives
/// `0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.`).
fn reverse_zone_v6((addr, len): (std::net::Ipv6Addr, u8)) -> Option<String> {
    let nibbles = usize::from(len.min(128) / 4);
    if nibbles == 0 {
        return None;
    }
    let o = addr.octets();
    let mut zone = String::new();
    for i in (0..nibbles).rev() {
        let n = (o[i / 2] >> if i % 2 == 0 { 4 } else { 0 }) & 0xf;
        zone.push(char::from_digit(u32::from(n), 16).unwrap_or('0'));
        zone.push('.');
    }
    zone.push_str("ip6.arpa.");
    Some(zone)
}

/// The first message of a session for `viewer`.
pub fn full_map(state: &State, viewer: u64, now: i64) -> Option<MapResponse> {
    let primaries = state.primaries();
    let node = tail_node(state, viewer, primaries, now)?;
    let view = PolicyView::new(state);
    let mut users = vec![node.user];
    let (visible, hidden): (Vec<u64>, Vec<u64>) = state
        .nodes()
        .map(|n| n.id)
        .filter(|id| *id != viewer)
        .partition(|id| view.as_ref().is_none_or(|v| v.visible(viewer, *id)));
    let peers: Vec<tailcfg::Node> = visible
        .into_iter()
        .filter_map(|id| tail_node(state, id, primaries, now))
        .collect();
    users.extend(peers.iter().map(|p| p.user));
    users.sort_unstable();
    users.dedup();
    let domain = state
        .settings
        .server_url
        .split("://")
        .nth(1)
        .and_then(|r| r.split(['/', ':']).next())
        .unwrap_or("")
        .to_string();
    Some(MapResponse {
        node: Some(node),
        derp_map: Some(state.settings.derp_map.clone()),
        // Go ignores an empty Peers list, so omit it instead.
        peers: (!peers.is_empty()).then_some(peers),
        // A full map with no peers changes no peers in Go, so peers the policy now hides are
        // removed explicitly (harmless for ones the viewer never had).
        peers_removed: (!hidden.is_empty()).then_some(hidden),
        dns_config: Some(dns_config(state)),
        domain: Some(domain),
        packet_filters: Some(packet_filters(view.as_ref(), viewer)),
        user_profiles: Some(users.into_iter().filter_map(|u| profile(state, u)).collect()),
        collect_services: Some(false),
        control_time: Some(tailcfg::format_time(now)),
        ..Default::default()
    })
}

/// What a session for `viewer` should do about `change`.
#[derive(Debug, PartialEq)]
pub enum Delta {
    /// Nothing for this viewer.
    None,
    /// Send this message.
    Send(Box<MapResponse>),
    /// The viewer itself was deleted: end the session.
    End,
}

/// Turns one change into the delta for `viewer`.
pub fn delta(state: &State, viewer: u64, change: &Change, now: i64) -> Delta {
    let base = MapResponse {
        control_time: Some(tailcfg::format_time(now)),
        ..Default::default()
    };
    if state.policy().is_some() {
        return policy_delta(state, viewer, change, base, now);
    }
    match change {
        Change::Full => full_map(state, viewer, now).map_or(Delta::End, |m| Delta::Send(Box::new(m))),
        Change::Removed(id) if *id == viewer => Delta::End,
        Change::Removed(id) => Delta::Send(Box::new(MapResponse {
            peers_removed: Some(vec![*id]),
            ..base
        })),
        Change::Node(id) => {
            let Some(n) = tail_node(state, *id, state.primaries(), now) else {
                return Delta::None;
            };
            let profiles = profile(state, n.user).into_iter().collect();
            if *id == viewer {
                Delta::Send(Box::new(MapResponse {
                    node: Some(n),
                    user_profiles: Some(profiles),
                    ..base
                }))
            } else {
                Delta::Send(Box::new(MapResponse {
                    peers_changed: Some(vec![n]),
                    user_profiles: Some(profiles),
                    ..base
                }))
            }
        }
        Change::Patch(p) if p.node_id == viewer => Delta::None,
        Change::Patch(p) => Delta::Send(Box::new(MapResponse {
            peers_changed_patch: Some(vec![p.clone()]),
            ..base
        })),
    }
}

/// [`delta`] under an ACL policy (see the module doc).
fn policy_delta(state: &State, viewer: u64, change: &Change, base: MapResponse, now: i64) -> Delta {
    match change {
        Change::Removed(id) if *id == viewer => Delta::End,
        Change::Full => full_map(state, viewer, now).map_or(Delta::End, |m| Delta::Send(Box::new(m))),
        Change::Node(id) if *id == viewer => {
            full_map(state, viewer, now).map_or(Delta::End, |m| Delta::Send(Box::new(m)))
        }
        Change::Removed(id) => {
            let view = PolicyView::new(state);
            Delta::Send(Box::new(MapResponse {
                peers_removed: Some(vec![*id]),
                packet_filters: Some(packet_filters(view.as_ref(), viewer)),
                ..base
            }))
        }
        Change::Node(id) => {
            let Some(n) = tail_node(state, *id, state.primaries(), now) else {
                return Delta::None;
            };
            let view = PolicyView::new(state);
            let filters = Some(packet_filters(view.as_ref(), viewer));
            if view.as_ref().is_some_and(|v| v.visible(viewer, *id)) {
                let profiles = profile(state, n.user).into_iter().collect();
                Delta::Send(Box::new(MapResponse {
                    peers_changed: Some(vec![n]),
                    user_profiles: Some(profiles),
                    packet_filters: filters,
                    ..base
                }))
            } else {
                // Removing a peer the viewer never had is harmless (Go deletes by id).
                Delta::Send(Box::new(MapResponse {
                    peers_removed: Some(vec![*id]),
                    packet_filters: filters,
                    ..base
                }))
            }
        }
        Change::Patch(p) if p.node_id == viewer => Delta::None,
        Change::Patch(p) => {
            if !PolicyView::new(state).is_some_and(|v| v.visible(viewer, p.node_id)) {
                return Delta::None;
            }
            Delta::Send(Box::new(MapResponse {
                peers_changed_patch: Some(vec![p.clone()]),
                ..base
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::{state::Settings, store::Store};

    fn state(settings: Settings) -> State {
        State::load(Store::open_in_memory().unwrap(), settings).unwrap()
    }

    #[test]
    fn dns_config_json_has_go_field_names() {
        let st = state(Settings {
            base_domain: "ts.example".into(),
            nameservers: vec!["9.9.9.9".into()],
            split_dns: vec![("corp.example".into(), vec!["10.0.0.53".into(), "10.0.0.54:5353".into()])],
            extra_records: vec![
                ("grafana.ts.example".into(), "100.64.0.9".parse().unwrap()),
                ("v6.ts.example".into(), "fd7a:115c:a1e0::9".parse().unwrap()),
            ],
            ..Settings::default()
        });
        let v = serde_json::to_value(dns_config(&st)).unwrap();
        assert_eq!(v["Proxied"], true);
        assert_eq!(v["Domains"], serde_json::json!(["ts.example"]));
        assert_eq!(v["Resolvers"], serde_json::json!([{"Addr": "9.9.9.9"}]));
        assert_eq!(
            v["Routes"]["corp.example."],
            serde_json::json!([{"Addr": "10.0.0.53"}, {"Addr": "10.0.0.54:5353"}])
        );
        // MagicDNS zones: `[]`, never null (Go's clone drops null routes).
        assert_eq!(v["Routes"]["ts.example."], serde_json::json!([]));
        assert_eq!(v["Routes"]["64.100.in-addr.arpa."], serde_json::json!([]));
        assert_eq!(v["Routes"]["127.100.in-addr.arpa."], serde_json::json!([]));
        assert!(v["Routes"].get("128.100.in-addr.arpa.").is_none());
        assert_eq!(v["Routes"]["0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa."], serde_json::json!([]));
        assert_eq!(v["Routes"].as_object().unwrap().len(), 1 + 1 + 64 + 1);
        assert_eq!(
            v["ExtraRecords"],
            serde_json::json!([
                {"Name": "grafana.ts.example", "Value": "100.64.0.9"},
                {"Name": "v6.ts.example", "Value": "fd7a:115c:a1e0::9"}
            ])
        );
        // And it reads back as what was sent.
        let back: DnsConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, dns_config(&st));
    }

    #[test]
    fn magic_dns_off_sends_no_magic_routes() {
        let st = state(Settings {
            magic_dns: false,
            split_dns: vec![("corp.example".into(), vec!["10.0.0.53".into()])],
            ..Settings::default()
        });
        let d = dns_config(&st);
        assert!(!d.proxied);
        assert_eq!(d.routes.keys().collect::<Vec<_>>(), ["corp.example."]);
        assert!(d.extra_records.is_empty());
    }

    #[test]
    fn reverse_zones_follow_the_prefix() {
        use std::net::{Ipv4Addr, Ipv6Addr};
        assert_eq!(
            reverse_zones_v4((Ipv4Addr::new(100, 100, 0, 0), 15)),
            ["100.100.in-addr.arpa.", "101.100.in-addr.arpa."]
        );
        assert_eq!(
            reverse_zones_v4((Ipv4Addr::new(100, 64, 5, 0), 24)),
            ["64.100.in-addr.arpa."]
        );
        assert_eq!(
            reverse_zone_v6((Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0xab00, 0, 0, 0, 0), 56)).unwrap(),
            "b.a.0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa."
        );
    }
}
