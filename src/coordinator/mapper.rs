//! Builds MapResponses: the full first message of a map session, and the incremental updates
//! that follow it.
//!
//! Mirrors the roles of headscale `hscontrol/mapper/{mapper,builder}.go` and
//! `hscontrol/types/node.go` (`TailNode`). Pure: the clock comes in as `now`.
//!
//! Fan-out: each [`Change`] is prepared once ([`Fanout::prepare`]) into messages shared by every
//! session (`PeersChanged`, `PeersRemoved` or `PeersChangedPatch` naming only the changed node,
//! each serialised once per encoding); a session's [`Viewer`] then picks what it gets in O(1),
//! so one change costs O(sessions), never O(sessions × nodes). The rule for full maps: a session
//! gets one at its start, after it fell behind the change queue, on a tailnet-wide change
//! ([`Change::Full`]: policy, users, DNS) and, under a policy, when its own node's membership
//! (addresses, user, tags, routes) changed, since then its whole visible peer set may move.
//!
//! With an ACL policy ([`super::policy`]) each viewer gets its own PacketFilter and only the
//! peers it may reach or that may reach it. The compiled policy is kept between changes and
//! rebuilt only when some node's membership changed; only then is each viewer's filter
//! recomputed, and it is sent only if it differs from the one the viewer has. A node whose
//! membership changed is sent as removed to the viewers that may no longer see it. Without a
//! policy, everything is allowed and every node is a peer.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, OnceLock},
};

use bytes::Bytes;

use super::{
    policy::{Compiled, Member},
    state::{Change, State},
};
use crate::wire::{
    prefix::Prefix,
    tailcfg::{self, DnsConfig, DnsRecord, FilterRule, MapResponse, Resolver, UserProfile},
};

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

/// The filter chunk the whole filter is sent as.
const BASE_FILTER: &str = "base";

/// The policy resolved against the current nodes.
#[derive(Debug)]
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
    BTreeMap::from([(BASE_FILTER.to_string(), Some(rules))])
}

/// The `in-addr.arpa.` zones covering an IPv4 prefix, one per /16 (100.64.0.0/10 gives
/// `64.100.in-addr.arpa.` … `127.100.in-addr.arpa.`, Go's `magicDNSRootDomains`); a prefix longer
/// than /16 gets its one /16 zone, which MagicDNS answers for the tailnet part only.
fn reverse_zones_v4(prefix: Prefix) -> Vec<String> {
    let std::net::IpAddr::V4(addr) = prefix.addr() else {
        return Vec::new();
    };
    let o = addr.octets();
    let len = prefix.bits().min(16);
    let count = 1u32 << (16 - u32::from(len));
    let first = u32::from(o[1]) & !(count - 1);
    (first..first + count)
        .map(|b| format!("{b}.{}.in-addr.arpa.", o[0]))
        .collect()
}

/// The `ip6.arpa.` zone of an IPv6 prefix, truncated to whole nibbles (fd7a:115c:a1e0::/48 gives
/// `0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.`).
fn reverse_zone_v6(prefix: Prefix) -> Option<String> {
    let std::net::IpAddr::V6(addr) = prefix.addr() else {
        return None;
    };
    let nibbles = usize::from(prefix.bits() / 4);
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
    full_map_with(state, viewer, PolicyView::new(state).as_ref(), now)
}

/// [`full_map`] with the policy view already resolved (`None` when no policy is set).
pub fn full_map_with(state: &State, viewer: u64, view: Option<&PolicyView>, now: i64) -> Option<MapResponse> {
    let (mut m, visible) = full_map_head(state, viewer, view, now)?;
    let primaries = state.primaries();
    let peers: Vec<tailcfg::Node> = visible
        .into_iter()
        .filter_map(|id| tail_node(state, id, primaries, now))
        .collect();
    // Go ignores an empty Peers list, so omit it instead.
    m.peers = (!peers.is_empty()).then_some(peers);
    Some(m)
}

/// [`full_map_with`] as the JSON a session sends, its peer records copied from `cache` instead
/// of built and serialised anew; with it the map without its peers (for [`Viewer::sent_full`]).
pub fn full_map_json(
    state: &State,
    viewer: u64,
    view: Option<&PolicyView>,
    now: i64,
    cache: &mut PeerCache,
) -> Option<(Vec<u8>, MapResponse)> {
    let (head, visible) = full_map_head(state, viewer, view, now)?;
    let body = serde_json::to_vec(&head).ok()?;
    let primaries = state.primaries();
    let mut out = Vec::with_capacity(body.len() + visible.len() * cache.typical_len());
    out.push(b'{');
    let mut any = false;
    for id in visible {
        if let Some(rec) = cache.record(state, id, primaries, now) {
            if any {
                out.push(b',');
            } else {
                out.extend_from_slice(b"\"Peers\":[");
            }
            out.extend_from_slice(rec);
            any = true;
        }
    }
    let rest = body.get(1..).unwrap_or_default();
    if any {
        out.push(b']');
        if rest != b"}" {
            out.push(b',');
        }
    }
    out.extend_from_slice(rest);
    Some((out, head))
}

/// Everything of a full map but its `Peers`, and the ids of the peers it lists.
fn full_map_head(state: &State, viewer: u64, view: Option<&PolicyView>, now: i64) -> Option<(MapResponse, Vec<u64>)> {
    let primaries = state.primaries();
    let node = tail_node(state, viewer, primaries, now)?;
    let mut users = vec![node.user];
    let (visible, hidden): (Vec<u64>, Vec<u64>) = state
        .nodes()
        .map(|n| n.id)
        .filter(|id| *id != viewer)
        .partition(|id| view.is_none_or(|v| v.visible(viewer, *id)));
    users.extend(visible.iter().filter_map(|id| state.node(*id)).map(|n| n.user_id));
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
    let head = MapResponse {
        node: Some(node),
        derp_map: Some(state.settings.derp_map.clone()),
        // A full map with no peers changes no peers in Go, so peers the policy now hides are
        // removed explicitly (harmless for ones the viewer never had).
        peers_removed: (!hidden.is_empty()).then_some(hidden),
        dns_config: Some(dns_config(state)),
        domain: Some(domain),
        packet_filters: Some(packet_filters(view, viewer)),
        user_profiles: Some(users.into_iter().filter_map(|u| profile(state, u)).collect()),
        collect_services: Some(false),
        control_time: Some(tailcfg::format_time(now)),
        ..Default::default()
    };
    Some((head, visible))
}

/// Each node's peer record ([`tail_node`]) as JSON, serialised once and reused by every full
/// map that lists the node until it changes, so a full map costs a copy of its N peers' bytes
/// rather than N records built and serialised anew. [`Fanout`] keeps it and forgets a node's
/// record whenever it prepares a change about that node.
#[derive(Debug, Default)]
pub struct PeerCache {
    records: HashMap<u64, CachedPeer>,
    /// Bytes of all records, to size a full map's buffer.
    bytes: usize,
}

#[derive(Debug)]
struct CachedPeer {
    json: Box<[u8]>,
    /// `Expired` as serialised: the one field that moves with the clock alone.
    expired: bool,
}

impl PeerCache {
    /// Node `id`'s peer record as JSON, built now if not cached (or if its key expired since).
    fn record(&mut self, state: &State, id: u64, primaries: &BTreeMap<String, u64>, now: i64) -> Option<&[u8]> {
        let expired = state.node(id)?.expiry.is_some_and(|e| e <= now);
        if self.records.get(&id).is_none_or(|c| c.expired != expired) {
            let json: Box<[u8]> = serde_json::to_vec(&tail_node(state, id, primaries, now)?).ok()?.into();
            self.bytes += json.len();
            if let Some(old) = self.records.insert(id, CachedPeer { json, expired }) {
                self.bytes -= old.json.len();
            }
        }
        self.records.get(&id).map(|c| &*c.json)
    }

    fn forget(&mut self, id: u64) {
        if let Some(old) = self.records.remove(&id) {
            self.bytes -= old.json.len();
        }
    }

    fn clear(&mut self) {
        self.records = HashMap::new();
        self.bytes = 0;
    }

    /// Mean record length (a guess before any is cached).
    fn typical_len(&self) -> usize {
        self.bytes.checked_div(self.records.len()).unwrap_or(512) + 1
    }
}

/// Merges adjacent patches of the same node into one (later fields win), so a session start
/// (endpoints, then online) costs each viewer one message.
pub fn coalesce(changes: Vec<Change>) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::with_capacity(changes.len());
    for c in changes {
        if let (Some(Change::Patch(prev)), Change::Patch(p)) = (out.last_mut(), &c) {
            if prev.node_id == p.node_id {
                let p = p.clone();
                prev.derp_region = p.derp_region.or(prev.derp_region);
                prev.endpoints = p.endpoints.or(prev.endpoints.take());
                prev.key = p.key.or(prev.key);
                prev.disco_key = p.disco_key.or(prev.disco_key);
                prev.online = p.online.or(prev.online);
                prev.last_seen = p.last_seen.or(prev.last_seen.take());
                prev.key_expiry = p.key_expiry.or(prev.key_expiry.take());
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// One message shared by every session it goes to: serialised at most once per encoding.
#[derive(Debug)]
pub struct Shared {
    /// The message.
    pub msg: MapResponse,
    /// Framed bytes, plain and zstd, made on first use.
    framed: [OnceLock<Bytes>; 2],
}

impl Shared {
    fn new(msg: MapResponse) -> Shared {
        Shared {
            msg,
            framed: Default::default(),
        }
    }

    /// The message framed by `frame` (called once per encoding, whatever the number of sessions).
    pub fn framed(&self, zstd: bool, frame: impl FnOnce(&MapResponse, bool) -> Bytes) -> Bytes {
        self.framed[usize::from(zstd)]
            .get_or_init(|| frame(&self.msg, zstd))
            .clone()
    }
}

/// One [`Change`] made ready for every session, once, in [`Fanout::prepare`].
#[derive(Debug)]
pub struct Update {
    /// Preparation order; a session skips updates not newer than its last full map.
    pub seq: u64,
    change: Change,
    /// For viewers other than the node the change is about.
    peer: Option<Shared>,
    /// For the node itself (its own record changed).
    own: Option<Shared>,
    /// Under a policy whose view moved: for viewers that may no longer see the node.
    removed: Option<Shared>,
    /// The policy view this update was prepared with.
    view: Option<Arc<PolicyView>>,
    /// Policy membership (addresses, user, tags, routes) or the policy itself changed:
    /// visibility and packet filters may differ for any viewer.
    moved: bool,
}

/// Prepares each change once for all sessions, keeping the policy view between changes so an
/// endpoint or online patch costs no policy compilation. Lives with the state, under its lock.
#[derive(Default)]
pub struct Fanout {
    seq: u64,
    view: Option<Arc<PolicyView>>,
    cache: PeerCache,
}

impl Fanout {
    /// The sequence number of the newest prepared update (a full map taken now covers it).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Forgets the policy view (changes were made without preparing them); the next change
    /// rebuilds it.
    pub fn skip(&mut self) {
        self.view = None;
        self.cache.clear();
    }

    /// [`full_map_json`] with the cached peer records.
    pub fn full_map_json(
        &mut self,
        state: &State,
        viewer: u64,
        view: Option<&PolicyView>,
        now: i64,
    ) -> Option<(Vec<u8>, MapResponse)> {
        full_map_json(state, viewer, view, now, &mut self.cache)
    }

    fn rebuild(&mut self, state: &State) -> Option<Arc<PolicyView>> {
        self.view = PolicyView::new(state).map(Arc::new);
        self.view.clone()
    }

    /// Turns `change` into the messages every session needs; O(1) in the number of nodes
    /// unless the policy view must be rebuilt (a node's membership changed).
    pub fn prepare(&mut self, state: &State, change: Change, now: i64) -> Update {
        self.seq += 1;
        let base = || MapResponse {
            control_time: Some(tailcfg::format_time(now)),
            ..Default::default()
        };
        let policy = state.policy().is_some();
        match &change {
            Change::Full => self.cache.clear(),
            Change::Node(id) | Change::Removed(id) => self.cache.forget(*id),
            Change::Patch(p) => self.cache.forget(p.node_id),
        }
        let mut u = Update {
            seq: self.seq,
            change: change.clone(),
            peer: None,
            own: None,
            removed: None,
            view: None,
            moved: false,
        };
        match change {
            Change::Full => {
                u.view = self.rebuild(state);
                u.moved = true;
            }
            Change::Removed(id) => {
                if policy {
                    u.view = self.rebuild(state);
                    u.moved = true;
                }
                u.peer = Some(Shared::new(MapResponse {
                    peers_removed: Some(vec![id]),
                    ..base()
                }));
            }
            Change::Node(id) => {
                let Some(n) = tail_node(state, id, state.primaries(), now) else {
                    return u;
                };
                if policy {
                    let member = state.node(id).map(|n| state.member(n));
                    let cached = self.view.as_ref().map(|v| v.member(id).cloned());
                    u.moved = cached != Some(member);
                    u.view = if u.moved {
                        self.rebuild(state)
                    } else {
                        self.view.clone()
                    };
                    if u.moved {
                        u.removed = Some(Shared::new(MapResponse {
                            peers_removed: Some(vec![id]),
                            ..base()
                        }));
                    }
                }
                let profiles: Vec<UserProfile> = profile(state, n.user).into_iter().collect();
                u.own = Some(Shared::new(MapResponse {
                    node: Some(n.clone()),
                    user_profiles: Some(profiles.clone()),
                    ..base()
                }));
                u.peer = Some(Shared::new(MapResponse {
                    peers_changed: Some(vec![n]),
                    user_profiles: Some(profiles),
                    ..base()
                }));
            }
            Change::Patch(p) => {
                if policy {
                    u.view = match &self.view {
                        Some(v) => Some(v.clone()),
                        None => self.rebuild(state),
                    };
                }
                u.peer = Some(Shared::new(MapResponse {
                    peers_changed_patch: Some(vec![p]),
                    ..base()
                }));
            }
        }
        u
    }
}

/// What a session does with one [`Update`].
#[derive(Debug)]
pub enum Action<'a> {
    /// Nothing for this viewer.
    None,
    /// The viewer itself was deleted: end the session.
    End,
    /// Resend the full map ([`full_map_with`] with [`Action::Full`]'s view), then call
    /// [`Viewer::sent_full`] with the update's `seq`.
    Full(Option<&'a PolicyView>),
    /// Send `filter` (if any, first: the viewer's new PacketFilters), then `msg` (if any).
    Send {
        filter: Option<Box<MapResponse>>,
        msg: Option<&'a Shared>,
    },
}

/// One map session's memory of what it sent: enough to skip stale updates and unchanged
/// packet filters.
#[derive(Debug)]
pub struct Viewer {
    /// The node the session is for.
    pub id: u64,
    since: u64,
    filter: Option<Vec<FilterRule>>,
}

impl Viewer {
    /// A session for node `id` before its first message.
    pub fn new(id: u64) -> Viewer {
        Viewer {
            id,
            since: 0,
            filter: None,
        }
    }

    /// Records a full map sent for the state as of update `seq`.
    pub fn sent_full(&mut self, msg: &MapResponse, seq: u64) {
        self.since = seq;
        self.filter = base_filter(msg);
    }

    /// What to send for `u`; O(1) in the number of nodes (a moved policy view costs one
    /// filter compilation for this viewer).
    pub fn action<'a>(&mut self, u: &'a Update) -> Action<'a> {
        if u.seq <= self.since {
            return Action::None;
        }
        let view = u.view.as_deref();
        match &u.change {
            Change::Full => Action::Full(view),
            Change::Removed(id) if *id == self.id => Action::End,
            Change::Node(id) if *id == self.id => {
                if u.moved {
                    Action::Full(view)
                } else {
                    self.send(None, u.own.as_ref())
                }
            }
            Change::Patch(p) if p.node_id == self.id => Action::None,
            Change::Removed(_) | Change::Node(_) | Change::Patch(_) => {
                let Some(view) = view else {
                    return self.send(None, u.peer.as_ref());
                };
                let subject = match &u.change {
                    Change::Removed(id) | Change::Node(id) => *id,
                    Change::Patch(p) => p.node_id,
                    Change::Full => return Action::None,
                };
                let filter = if u.moved { self.filter_update(view) } else { None };
                let msg = match &u.change {
                    Change::Removed(_) => u.peer.as_ref(),
                    _ if view.visible(self.id, subject) => u.peer.as_ref(),
                    // Removing a peer the viewer never had is harmless (Go deletes by id).
                    Change::Node(_) if u.moved => u.removed.as_ref(),
                    _ => None,
                };
                self.send(filter, msg)
            }
        }
    }

    fn send<'a>(&self, filter: Option<Box<MapResponse>>, msg: Option<&'a Shared>) -> Action<'a> {
        if filter.is_none() && msg.is_none() {
            Action::None
        } else {
            Action::Send { filter, msg }
        }
    }

    /// The viewer's filter under `view` as a message, if it differs from the one it has.
    fn filter_update(&mut self, view: &PolicyView) -> Option<Box<MapResponse>> {
        let rules = view.filter(self.id);
        if self.filter.as_ref() == Some(&rules) {
            return None;
        }
        self.filter = Some(rules.clone());
        Some(Box::new(MapResponse {
            packet_filters: Some(BTreeMap::from([(BASE_FILTER.to_string(), Some(rules))])),
            ..Default::default()
        }))
    }
}

fn base_filter(m: &MapResponse) -> Option<Vec<FilterRule>> {
    m.packet_filters.as_ref()?.get(BASE_FILTER)?.clone()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        control::netmap::Netmap,
        coordinator::{state::Settings, store::Store},
    };

    fn state(settings: Settings) -> State {
        State::load(Store::open_in_memory().unwrap(), settings).unwrap()
    }

    /// One step of the fan-out property test, on the node at slot `.0` (of [`SLOTS`]).
    #[derive(Debug, Clone)]
    enum Op {
        Register(usize),
        Delete(usize),
        Endpoints(usize, u16),
        Online(usize, bool),
        Rename(usize, u8),
        Move(usize),
        Routes(usize),
        Policy(Option<usize>),
    }

    const SLOTS: usize = 4;
    const POLICIES: [&str; 4] = [
        r#"{"acls": [{"action": "accept", "src": ["a@"], "dst": ["b@:22"]}]}"#,
        r#"{"acls": []}"#,
        r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#,
        r#"{"acls": [{"action": "accept", "src": ["b@"], "dst": ["10.0.0.0/16:*"]}]}"#,
    ];

    fn op() -> impl Strategy<Value = Op> {
        let slot = 0..SLOTS;
        prop_oneof![
            3 => slot.clone().prop_map(Op::Register),
            1 => slot.clone().prop_map(Op::Delete),
            2 => (slot.clone(), 1u16..4).prop_map(|(s, p)| Op::Endpoints(s, p)),
            2 => (slot.clone(), any::<bool>()).prop_map(|(s, o)| Op::Online(s, o)),
            1 => (slot.clone(), 0u8..3).prop_map(|(s, n)| Op::Rename(s, n)),
            2 => slot.clone().prop_map(Op::Move),
            2 => slot.prop_map(Op::Routes),
            2 => prop::option::of(0..POLICIES.len()).prop_map(Op::Policy),
        ]
    }

    fn keys(slot: usize) -> (crate::wire::keys::MachinePublic, crate::wire::keys::NodePrivate) {
        let b = slot as u8 + 1;
        (
            crate::wire::keys::MachinePrivate::from_random([b; 32]).public(),
            crate::wire::keys::NodePrivate::from_random([b + 100; 32]),
        )
    }

    fn id_of(st: &State, slot: usize) -> Option<u64> {
        let key = keys(slot).1.public();
        st.nodes().find(|n| n.node_key == key).map(|n| n.id)
    }

    /// Applies `op` to the state; the changes it caused (none if it was refused).
    fn run(st: &mut State, op: &Op, now: i64) -> Vec<Change> {
        use crate::wire::tailcfg::{MapRequest, RegisterAuth, RegisterRequest};
        let map_req = |slot: usize, endpoints: Vec<String>, hostinfo: Option<serde_json::Value>| MapRequest {
            version: 130,
            node_key: keys(slot).1.public(),
            endpoints,
            hostinfo,
            ..Default::default()
        };
        let id = |st: &State, slot: usize| id_of(st, slot).ok_or(());
        let r: Result<Vec<Change>, ()> = match *op {
            Op::Register(slot) => {
                let (m, n) = keys(slot);
                let key = if slot % 2 == 0 { "ka" } else { "kb" };
                let req = RegisterRequest {
                    version: 130,
                    node_key: n.public(),
                    auth: Some(RegisterAuth { auth_key: key.into() }),
                    expiry: tailcfg::ZERO_TIME.into(),
                    hostinfo: Some(serde_json::json!({"Hostname": format!("n{slot}")})),
                    ..Default::default()
                };
                st.register(m, &req, now, || "pending".into())
                    .map(|r| r.1)
                    .map_err(drop)
            }
            Op::Delete(slot) => id(st, slot).and_then(|i| st.delete_node(i).map_err(drop)),
            Op::Endpoints(slot, port) => {
                let req = map_req(slot, vec![format!("192.0.2.{slot}:{port}")], None);
                st.apply_map_request(keys(slot).0, &req, now).map(|r| r.1).map_err(drop)
            }
            Op::Online(slot, true) => id(st, slot).map(|i| st.session_start(i, now)),
            Op::Online(slot, false) => id(st, slot).map(|i| st.session_end(i, now)),
            Op::Rename(slot, n) => id(st, slot).and_then(|i| st.rename_node(i, &format!("r{slot}-{n}")).map_err(drop)),
            Op::Move(slot) => id(st, slot).and_then(|i| {
                let to = if st
                    .node(i)
                    .is_some_and(|n| st.user(n.user_id).is_some_and(|u| u.name == "a"))
                {
                    "b"
                } else {
                    "a"
                };
                st.move_node(i, to).map_err(drop)
            }),
            Op::Routes(slot) => {
                let route = format!("10.0.{slot}.0/24");
                let hi = serde_json::json!({"Hostname": format!("n{slot}"), "RoutableIPs": [route]});
                let req = map_req(slot, Vec::new(), Some(hi));
                st.apply_map_request(keys(slot).0, &req, now)
                    .map_err(drop)
                    .and_then(|(i, mut ch)| {
                        ch.extend(st.set_approved_routes(i, vec![route], true).map_err(drop)?);
                        Ok(ch)
                    })
            }
            Op::Policy(p) => st.set_policy(p.map(|p| POLICIES[p]), now).map_err(drop),
        };
        r.unwrap_or_default()
    }

    /// A peer as compared: `LastSeen` of an online peer is not shown in a full map, and a
    /// patch that brings it online leaves the old one behind (so does Go's client).
    fn normalized(mut n: tailcfg::Node) -> tailcfg::Node {
        if n.online == Some(true) {
            n.last_seen = None;
        }
        n
    }

    /// As compared: what a node reports itself (online state, endpoints, disco key, home DERP:
    /// patches) is not echoed back to it; everything control decides about it is.
    fn view_of(nm: &Netmap) -> (Option<tailcfg::Node>, Vec<tailcfg::Node>, Vec<FilterRule>) {
        (
            nm.self_node.clone().map(|n| tailcfg::Node {
                online: None,
                last_seen: None,
                endpoints: Vec::new(),
                disco_key: Default::default(),
                home_derp: 0,
                derp: String::new(),
                ..n
            }),
            nm.peers.values().cloned().map(normalized).collect(),
            nm.packet_filter().cloned().collect(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Every session that applies its updates ends where a fresh full map would put it: same
        /// self node, peers and packet filter, whatever the sequence of changes.
        #[test]
        fn incremental_updates_match_a_fresh_full_map(ops in prop::collection::vec(op(), 1..50)) {
            let mut st = state(Settings::default());
            for (user, key) in [("a", "ka"), ("b", "kb")] {
                st.create_user(user, 0).unwrap();
                st.create_preauth_key(user, true, false, None, vec![], key.into(), 0).unwrap();
            }
            let mut fanout = Fanout::default();
            let mut sessions: BTreeMap<u64, (Viewer, Netmap)> = BTreeMap::new();
            let now = 1000;
            for op in &ops {
                for change in coalesce(run(&mut st, op, now)) {
                    let u = fanout.prepare(&st, change, now);
                    let mut ended = Vec::new();
                    for (id, (viewer, nm)) in sessions.iter_mut() {
                        match viewer.action(&u) {
                            Action::None => {}
                            Action::End => ended.push(*id),
                            Action::Full(view) => {
                                // As sessions send it: the cached peer records spliced in.
                                let (json, head) = fanout.full_map_json(&st, *id, view, now).unwrap();
                                viewer.sent_full(&head, u.seq);
                                nm.apply(serde_json::from_slice(&json).unwrap());
                            }
                            Action::Send { filter, msg } => {
                                if let Some(f) = filter {
                                    nm.apply(*f);
                                }
                                if let Some(m) = msg {
                                    // What the session sends: the shared bytes, as a client parses them.
                                    let bytes = m.framed(false, |m, _| Bytes::from(serde_json::to_vec(m).unwrap()));
                                    nm.apply(serde_json::from_slice(&bytes).unwrap());
                                }
                            }
                        }
                    }
                    for id in ended {
                        sessions.remove(&id);
                    }
                }
                // Nodes without a session open one: a full map as of the newest update.
                for n in st.nodes() {
                    sessions.entry(n.id).or_insert_with(|| {
                        let view = PolicyView::new(&st);
                        let (json, head) = fanout.full_map_json(&st, n.id, view.as_ref(), now).unwrap();
                        let mut viewer = Viewer::new(n.id);
                        viewer.sent_full(&head, fanout.seq());
                        let mut nm = Netmap::default();
                        nm.apply(serde_json::from_slice(&json).unwrap());
                        (viewer, nm)
                    });
                }
            }
            prop_assert_eq!(sessions.len(), st.nodes().count(), "deleted nodes' sessions ended");
            for (id, (_, nm)) in &sessions {
                let mut fresh = Netmap::default();
                fresh.apply(full_map(&st, *id, now).unwrap());
                prop_assert_eq!(view_of(nm), view_of(&fresh), "node {} after {:?}", id, ops);
                // A full map from the cache is the one built afresh.
                let view = PolicyView::new(&st);
                let (json, _) = fanout.full_map_json(&st, *id, view.as_ref(), now).unwrap();
                let fresh_json = serde_json::to_value(full_map(&st, *id, now).unwrap()).unwrap();
                prop_assert_eq!(serde_json::from_slice::<serde_json::Value>(&json).unwrap(), fresh_json);
            }
        }
    }

    #[test]
    fn a_cached_peer_record_follows_its_key_expiry() {
        let mut st = state(Settings::default());
        st.create_user("a", 0).unwrap();
        st.create_preauth_key("a", true, false, None, vec![], "ka".into(), 0)
            .unwrap();
        run(&mut st, &Op::Register(0), 1);
        run(&mut st, &Op::Register(2), 1);
        let (viewer, peer) = (id_of(&st, 0).unwrap(), id_of(&st, 2).unwrap());
        // The peer's key expires at 100; nothing announces it, only the clock moves.
        let ch = st.expire_node(peer, 100).unwrap();
        let mut fanout = Fanout::default();
        for c in ch {
            fanout.prepare(&st, c, 50);
        }
        let expired = |fanout: &mut Fanout, now| {
            let (json, _) = fanout.full_map_json(&st, viewer, None, now).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            v["Peers"][0]["Expired"].as_bool().unwrap_or(false)
        };
        assert!(!expired(&mut fanout, 50));
        assert!(
            expired(&mut fanout, 150),
            "the cached record was rebuilt once the key expired"
        );
    }

    #[test]
    fn adjacent_patches_of_one_node_merge() {
        let p = |id, online, ep: Option<&str>| {
            Change::Patch(tailcfg::PeerChange {
                node_id: id,
                online,
                endpoints: ep.map(|e| vec![e.to_string()]),
                ..Default::default()
            })
        };
        let merged = coalesce(vec![
            p(1, None, Some("a:1")),
            p(1, Some(true), None),
            p(2, Some(true), None),
            Change::Node(1),
            p(1, None, Some("b:2")),
        ]);
        assert_eq!(
            merged,
            vec![
                p(1, Some(true), Some("a:1")),
                p(2, Some(true), None),
                Change::Node(1),
                p(1, None, Some("b:2"))
            ]
        );
    }

    #[test]
    fn patches_cost_no_policy_rebuild_and_filters_are_sent_only_when_they_change() {
        let mut st = state(Settings::default());
        for (user, key) in [("a", "ka"), ("b", "kb")] {
            st.create_user(user, 0).unwrap();
            st.create_preauth_key(user, true, false, None, vec![], key.into(), 0)
                .unwrap();
        }
        run(&mut st, &Op::Policy(Some(0)), 1);
        for slot in 0..3 {
            run(&mut st, &Op::Register(slot), 1);
        }
        let ids: Vec<u64> = (0..3).map(|s| id_of(&st, s).unwrap()).collect();
        let mut fanout = Fanout::default();
        let mut viewer = Viewer::new(ids[1]);
        viewer.sent_full(&full_map(&st, ids[1], 1).unwrap(), fanout.seq());
        // An endpoint change of a visible peer: the shared patch, no filter, the cached view.
        let ch = run(&mut st, &Op::Endpoints(0, 1), 2);
        let u = fanout.prepare(&st, ch[0].clone(), 2);
        let cached = u.view.clone().unwrap();
        assert!(
            matches!(viewer.action(&u), Action::Send { filter: None, msg: Some(m) } if m.msg.peers_changed_patch.is_some())
        );
        let ch = run(&mut st, &Op::Endpoints(0, 2), 3);
        let u = fanout.prepare(&st, ch[0].clone(), 3);
        assert!(
            Arc::ptr_eq(&cached, u.view.as_ref().unwrap()),
            "a patch reuses the compiled policy"
        );
        // A rename is not a membership change: the peer record, still no filter.
        let ch = run(&mut st, &Op::Rename(0, 1), 4);
        let u = fanout.prepare(&st, ch[0].clone(), 4);
        assert!(!u.moved);
        assert!(
            matches!(viewer.action(&u), Action::Send { filter: None, msg: Some(m) } if m.msg.peers_changed.is_some())
        );
        // Nodes 0 and 2 (user a) reach node 1 (user b). Node 0 moves to b: node 1 no longer
        // sees it, and its filter keeps node 2 only.
        let ch = run(&mut st, &Op::Move(0), 5);
        let u = fanout.prepare(&st, ch[0].clone(), 5);
        assert!(u.moved);
        let node2 = st.node(ids[2]).unwrap().ipv4.unwrap();
        match viewer.action(&u) {
            Action::Send {
                filter: Some(f),
                msg: Some(m),
            } => {
                let f = base_filter(&f).unwrap();
                assert_eq!(f.len(), 1);
                assert_eq!(f[0].src_ips[0], format!("{node2}/32"));
                assert_eq!(m.msg.peers_removed, Some(vec![ids[0]]));
            }
            a => panic!("{a:?}"),
        }
        // Node 2 moves too: node 1's filter becomes empty.
        let ch = run(&mut st, &Op::Move(2), 6);
        let u = fanout.prepare(&st, ch[0].clone(), 6);
        assert!(
            matches!(viewer.action(&u), Action::Send { filter: Some(f), .. } if base_filter(&f) == Some(Vec::new()))
        );
        // The moved node itself gets a full map; an update older than a full map is skipped.
        let mut own = Viewer::new(ids[2]);
        assert!(matches!(own.action(&u), Action::Full(Some(_))));
        own.sent_full(&full_map(&st, ids[2], 6).unwrap(), u.seq);
        assert!(matches!(own.action(&u), Action::None));
        // Node 0 gains a route: its membership moved, node 1's filter (still empty) is not resent.
        let ch = run(&mut st, &Op::Routes(0), 7);
        let u = fanout.prepare(&st, ch.last().unwrap().clone(), 7);
        assert!(u.moved);
        assert!(
            matches!(viewer.action(&u), Action::Send { filter: None, .. } | Action::None),
            "the unchanged filter is not resent"
        );
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
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        assert_eq!(
            reverse_zones_v4(p("100.100.0.0/15")),
            ["100.100.in-addr.arpa.", "101.100.in-addr.arpa."]
        );
        assert_eq!(reverse_zones_v4(p("100.64.5.0/24")), ["64.100.in-addr.arpa."]);
        assert_eq!(
            reverse_zone_v6(p("fd7a:115c:a1e0:ab00::/56")).unwrap(),
            "b.a.0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa."
        );
    }
}
