//! Builds MapResponses: the full first message of a map session and per-viewer deltas for each
//! [`Change`].
//!
//! Mirrors the roles of headscale `hscontrol/mapper/{mapper,builder}.go` and
//! `hscontrol/types/node.go` (`TailNode`). A delta touches only the nodes a change names, so one
//! change costs O(sessions), not O(sessions × nodes). Pure: the clock comes in as `now`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use super::state::{Change, State};
use crate::tailcfg::{self, DnsConfig, FilterRule, MapResponse, Resolver, UserProfile};

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

/// The DNS configuration sent to every node (spec §10.2).
pub fn dns_config(state: &State) -> DnsConfig {
    let s = &state.settings;
    let mut dns = DnsConfig {
        resolvers: s.nameservers.iter().map(|a| Resolver { addr: a.clone() }).collect(),
        ..Default::default()
    };
    if !s.base_domain.is_empty() {
        dns.domains.push(s.base_domain.clone());
    }
    if s.magic_dns && !s.base_domain.is_empty() {
        dns.proxied = true;
        // `[]` (not null): answer from MagicDNS only.
        dns.routes.insert(format!("{}.", s.base_domain), Vec::new());
    }
    dns
}

/// The first message of a session for `viewer`.
pub fn full_map(state: &State, viewer: u64, now: i64) -> Option<MapResponse> {
    let primaries = state.primaries();
    let node = tail_node(state, viewer, primaries, now)?;
    let mut users = vec![node.user];
    let peers: Vec<tailcfg::Node> = state
        .nodes()
        .filter(|n| n.id != viewer)
        .filter_map(|n| tail_node(state, n.id, primaries, now))
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
        dns_config: Some(dns_config(state)),
        domain: Some(domain),
        packet_filters: Some(BTreeMap::from([("base".to_string(), Some(FilterRule::allow_all()))])),
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
