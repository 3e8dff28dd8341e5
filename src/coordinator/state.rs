//! The coordinator's authoritative state: users, pre-auth keys, nodes, pending interactive
//! registrations and live map sessions, written through to the SQLite [`Store`].
//!
//! Mirrors the roles of headscale `hscontrol/state/state.go` and `hscontrol/auth.go`. Every
//! mutation returns the [`Change`]s it caused; map sessions turn those into per-viewer deltas
//! (`mapper.rs`), so touching one node never rebuilds every node's full map (headscale
//! `types/change`). Time and randomness come in as arguments.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{
    ipam::Ipam,
    model::{ApiKey, Node, PreAuthKey, User},
    policy::{Member, Policy},
    store::{Store, StoreError},
};
use crate::{
    wire::keys::{MachinePublic, NodePublic},
    wire::tailcfg::{self, DerpMap, HostinfoView, PeerChange, RegisterRequest, RegisterResponse},
};

/// How long an interactive registration waits for an admin (headscale: 15 min).
pub const PENDING_REGISTRATION_TTL: i64 = 15 * 60;
/// Interactive registrations waiting at once. Anyone who can reach the listener can start one
/// (each holds its Hostinfo), so the set is capped: at the cap the oldest is forgotten first
/// (its client asks again with a new link). A home tailnet approves a few at a time.
pub const MAX_PENDING_REGISTRATIONS: usize = 64;

/// What changed, for map sessions to turn into deltas.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The node's full record changed (key, name, routes, user...): send it whole.
    Node(u64),
    /// The node is gone.
    Removed(u64),
    /// Endpoint, disco key, home DERP or online state changed.
    Patch(PeerChange),
    /// Tailnet-wide change (DNS, DERP map, users): resend full maps.
    Full,
}

/// Coordinator-wide settings derived from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Public URL of this server (for AuthURLs).
    pub server_url: String,
    /// Address prefixes.
    pub ipam: Ipam,
    /// MagicDNS base domain (no trailing dot).
    pub base_domain: String,
    /// MagicDNS on/off.
    pub magic_dns: bool,
    /// Global resolvers.
    pub nameservers: Vec<String>,
    /// Split DNS: domain (no trailing dot) and its resolvers.
    pub split_dns: Vec<(String, Vec<String>)>,
    /// Extra MagicDNS records: name (no trailing dot) and address.
    pub extra_records: Vec<(String, std::net::IpAddr)>,
    /// DERP map sent to every node.
    pub derp_map: DerpMap,
    /// Ephemeral nodes are deleted after this many seconds offline.
    pub ephemeral_inactivity_timeout: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            server_url: "http://127.0.0.1:8080".into(),
            ipam: Ipam::default(),
            base_domain: "tailnet.internal".into(),
            magic_dns: true,
            nameservers: vec!["1.1.1.1".into()],
            split_dns: Vec::new(),
            extra_records: Vec::new(),
            derp_map: DerpMap::default(),
            ephemeral_inactivity_timeout: 30 * 60,
        }
    }
}

/// A failed coordinator operation; the text is safe to show to the requester.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("address space exhausted")]
    Exhausted,
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// An interactive registration waiting for `nodes register`.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Random id in the AuthURL.
    pub id: String,
    pub machine_key: MachinePublic,
    pub node_key: NodePublic,
    pub hostinfo: serde_json::Value,
    pub ephemeral: bool,
    /// Unix time after which it is forgotten.
    pub expires: i64,
    /// Set once an admin approved it.
    pub node_id: Option<u64>,
}

/// Result of a `/machine/register` request.
#[derive(Debug)]
pub enum RegisterOutcome {
    /// Answer now.
    Reply(RegisterResponse),
    /// Block until registration `id` completes or expires, then call [`State::followup`] again.
    Wait(String),
}

/// The coordinator state.
pub struct State {
    /// Settings.
    pub settings: Settings,
    users: BTreeMap<u64, User>,
    keys: BTreeMap<u64, PreAuthKey>,
    nodes: BTreeMap<u64, Node>,
    /// Ordered by id (a `Vec`: a handful of keys, and less code than a map).
    api_keys: Vec<ApiKey>,
    pending: HashMap<String, Pending>,
    sessions: HashMap<u64, u32>,
    primaries: BTreeMap<String, u64>,
    /// The ACL policy (its text as set, and parsed); `None` allows all.
    policy: Option<(String, Policy)>,
    /// The policy file (`policy_path`) the policy was loaded from; the admin socket cannot
    /// change it then.
    policy_file: Option<String>,
    store: Store,
    /// Pending registrations evicted because [`MAX_PENDING_REGISTRATIONS`] were waiting.
    pub pending_evicted: u64,
}

fn sanitize_label(host: &str) -> String {
    let mut s: String = host
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .collect();
    s = s.trim_matches('-').to_string();
    s.truncate(63);
    if s.is_empty() {
        "node".into()
    } else {
        s
    }
}

/// The stored form of an API key secret: BLAKE2s-256, already linked for Noise. A fast hash is
/// enough here (headscale uses bcrypt): the secret is 32 random bytes, not a password.
fn api_key_hash(secret: &str) -> [u8; 32] {
    use blake2::Digest;
    blake2::Blake2s256::digest(secret.as_bytes()).into()
}

/// Equality that takes the same time wherever the first difference is (Go
/// `subtle.ConstantTimeCompare`).
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Route text normalised for comparison (`10.0.0.0/24`).
fn is_exit_route(r: &str) -> bool {
    r == "0.0.0.0/0" || r == "::/0"
}

impl State {
    /// Loads everything from `store`.
    pub fn load(store: Store, settings: Settings) -> Result<State, CoordError> {
        let snap = store.load()?;
        let mut st = State {
            settings,
            users: snap.users.into_iter().map(|u| (u.id, u)).collect(),
            keys: snap.preauth_keys.into_iter().map(|k| (k.id, k)).collect(),
            nodes: snap.nodes.into_iter().map(|n| (n.id, n)).collect(),
            api_keys: snap.api_keys,
            pending: HashMap::new(),
            pending_evicted: 0,
            sessions: HashMap::new(),
            primaries: BTreeMap::new(),
            policy: None,
            policy_file: None,
            store,
        };
        if let Some(text) = st.store.get_policy()? {
            let pol = Policy::parse(&text).unwrap_or_else(|e| {
                // Fail closed: a stored policy this binary cannot read allows nothing until an
                // admin sets one it can.
                log::error!("stored ACL policy does not parse, denying all traffic until `server policy set`: {e}");
                Policy {
                    no_acls: false,
                    ..Policy::default()
                }
            });
            st.policy = Some((text, pol));
        }
        st.primaries = st.compute_primaries();
        Ok(st)
    }

    /// The store (for server secrets).
    pub fn store(&self) -> &Store {
        &self.store
    }

    // ---- queries ----

    /// All users by id.
    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }
    /// All pre-auth keys.
    pub fn preauth_keys(&self) -> impl Iterator<Item = &PreAuthKey> {
        self.keys.values()
    }
    /// All nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }
    /// One node.
    pub fn node(&self, id: u64) -> Option<&Node> {
        self.nodes.get(&id)
    }
    /// One user.
    pub fn user(&self, id: u64) -> Option<&User> {
        self.users.get(&id)
    }
    /// Whether the node has a live map session.
    pub fn is_online(&self, id: u64) -> bool {
        self.sessions.get(&id).is_some_and(|c| *c > 0)
    }
    /// Pending registration by id.
    pub fn pending(&self, id: &str) -> Option<&Pending> {
        self.pending.get(id)
    }

    fn user_by_name(&self, name: &str) -> Result<&User, CoordError> {
        let name = name.trim_end_matches('@');
        self.users
            .values()
            .find(|u| u.name == name)
            .or_else(|| name.parse::<u64>().ok().and_then(|id| self.users.get(&id)))
            .ok_or_else(|| CoordError::NotFound(format!("user {name:?} not found")))
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut Node, CoordError> {
        self.nodes
            .get_mut(&id)
            .ok_or_else(|| CoordError::NotFound(format!("node {id} not found")))
    }

    /// Routes the node announces in Hostinfo.RoutableIPs.
    pub fn announced_routes(n: &Node) -> Vec<String> {
        serde_json::from_str::<serde_json::Value>(&n.hostinfo)
            .map(|v| HostinfoView(&v).routable_ips())
            .unwrap_or_default()
    }

    /// Announced ∩ approved.
    pub fn effective_routes(n: &Node) -> Vec<String> {
        // Most nodes route nothing: skip parsing their Hostinfo (primaries scan every node).
        if n.approved_routes.is_empty() {
            return Vec::new();
        }
        Self::announced_routes(n)
            .into_iter()
            .filter(|r| n.approved_routes.contains(r))
            .collect()
    }

    /// Primary router per subnet prefix (cached; recomputed when routes, nodes or online state change).
    pub fn primaries(&self) -> &BTreeMap<String, u64> {
        &self.primaries
    }

    /// Primary router per subnet prefix (HA subnet routers): the current primary while it is
    /// online and still serves the prefix; otherwise the lowest-id online node serving it, else
    /// the lowest id. A primary that comes back does not take over again: the one that took
    /// over stays (headscale `routes/primary.go`, no flapping).
    fn compute_primaries(&self) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, (bool, bool, u64)> = BTreeMap::new();
        for n in self.nodes.values() {
            for r in Self::effective_routes(n).into_iter().filter(|r| !is_exit_route(r)) {
                let online = self.is_online(n.id);
                // Rank: staying primary (online) first, then online, then the lowest id.
                let sticky = online && self.primaries.get(&r) == Some(&n.id);
                let cand = (sticky, online, n.id);
                out.entry(r)
                    .and_modify(|cur| {
                        if (cand.0, cand.1, std::cmp::Reverse(cand.2)) > (cur.0, cur.1, std::cmp::Reverse(cur.2)) {
                            *cur = cand;
                        }
                    })
                    .or_insert(cand);
            }
        }
        // Inserted one by one: `collect()` into a BTreeMap compiles a stable sort per call site.
        let mut primaries = BTreeMap::new();
        for (k, (_, _, id)) in out {
            primaries.insert(k, id);
        }
        primaries
    }

    /// Recomputes the primaries and returns a full-node change for every node whose role moved.
    fn node_changes_for_primaries(&mut self, before: &BTreeMap<String, u64>) -> Vec<Change> {
        self.primaries = self.compute_primaries();
        let after = &self.primaries;
        let mut ids = BTreeSet::new();
        for (k, v) in before {
            if after.get(k) != Some(v) {
                ids.insert(*v);
                if let Some(a) = after.get(k) {
                    ids.insert(*a);
                }
            }
        }
        for (k, v) in after {
            if !before.contains_key(k) {
                ids.insert(*v);
            }
        }
        ids.into_iter()
            .filter(|id| self.nodes.contains_key(id))
            .map(Change::Node)
            .collect()
    }

    // ---- policy ----

    /// The ACL policy in force (text as set, parsed), or `None` (allow all).
    pub fn policy(&self) -> Option<&(String, Policy)> {
        self.policy.as_ref()
    }

    /// Replaces the ACL policy (`None` clears it: allow all). A policy that does not parse or
    /// check is refused with every error and its line, and the old one stays. Auto-approvers of
    /// the new policy apply to every node's announced routes at once.
    pub fn set_policy(&mut self, text: Option<&str>, now: i64) -> Result<Vec<Change>, CoordError> {
        if let Some(f) = &self.policy_file {
            return Err(CoordError::Conflict(format!(
                "the policy comes from the file {f} (option policy_path): edit it and restart the server, or remove the option to manage the policy here"
            )));
        }
        let parsed = match text {
            Some(t) => Some((
                t.to_string(),
                Policy::parse(t).map_err(|e| CoordError::Invalid(e.to_string()))?,
            )),
            None => None,
        };
        self.store.set_policy(text, now)?;
        self.policy = parsed;
        log::info!(
            "acl policy {}",
            if self.policy.is_some() {
                "set"
            } else {
                "cleared (allow all)"
            }
        );
        let before = self.primaries.clone();
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.auto_approve(id)?;
        }
        let mut ch = vec![Change::Full];
        ch.extend(self.node_changes_for_primaries(&before));
        Ok(ch)
    }

    /// Uses the policy in `text`, read from the file `path` (`policy_path`), instead of the
    /// stored one, and refuses later changes through [`State::set_policy`].
    pub fn use_policy_file(&mut self, path: &str, text: &str) -> Result<(), CoordError> {
        let pol = Policy::parse(text).map_err(|e| CoordError::Invalid(format!("{path}:\n{e}")))?;
        self.policy = Some((text.to_string(), pol));
        self.policy_file = Some(path.to_string());
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.auto_approve(id)?;
        }
        self.primaries = self.compute_primaries();
        Ok(())
    }

    /// The node as the policy sees it.
    pub fn member(&self, n: &Node) -> Member {
        let effective = Self::effective_routes(n);
        Member {
            id: n.id,
            user: self.users.get(&n.user_id).map(|u| u.name.clone()).unwrap_or_default(),
            tags: n.tags.clone(),
            ips: n
                .ipv4
                .map(std::net::IpAddr::V4)
                .into_iter()
                .chain(n.ipv6.map(std::net::IpAddr::V6))
                .collect(),
            routes: effective
                .iter()
                .filter(|r| !is_exit_route(r))
                .filter_map(|r| r.parse().ok())
                .collect(),
            exit: effective.iter().any(|r| is_exit_route(r)),
        }
    }

    /// Adds the node's announced routes that the policy's autoApprovers cover to its approved
    /// routes (never removes any); true if that changed them.
    fn auto_approve(&mut self, id: u64) -> Result<bool, CoordError> {
        let (Some((_, pol)), Some(n)) = (&self.policy, self.nodes.get(&id)) else {
            return Ok(false);
        };
        let announced = Self::announced_routes(n);
        let new: Vec<String> = pol
            .auto_approved(&self.member(n), &announced)
            .into_iter()
            .filter(|r| !n.approved_routes.contains(r))
            .collect();
        if new.is_empty() {
            return Ok(false);
        }
        log::info!("routes auto-approved by policy node={id} routes={}", new.join(","));
        let n = self.node_mut(id)?;
        n.approved_routes.extend(new);
        n.approved_routes.sort();
        let n = n.clone();
        self.store.update_node(&n)?;
        Ok(true)
    }

    // ---- users ----

    /// `users create`.
    pub fn create_user(&mut self, name: &str, now: i64) -> Result<User, CoordError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 63 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(CoordError::Invalid(format!(
                "invalid user name {name:?}: use 1-63 letters, digits, '-', '_' or '.'"
            )));
        }
        if self.users.values().any(|u| u.name == name) {
            return Err(CoordError::Conflict(format!("user {name:?} already exists")));
        }
        let mut u = User {
            id: 0,
            name: name.into(),
            display_name: name.into(),
            created: now,
        };
        u.id = self.store.insert_user(&u)?;
        self.users.insert(u.id, u.clone());
        Ok(u)
    }

    /// `users rename`.
    pub fn rename_user(&mut self, old: &str, new: &str) -> Result<(User, Vec<Change>), CoordError> {
        if self.users.values().any(|u| u.name == new) {
            return Err(CoordError::Conflict(format!("user {new:?} already exists")));
        }
        let id = self.user_by_name(old)?.id;
        let probe = self.create_user_check(new)?;
        let mut u = self.users[&id].clone();
        u.name = probe.clone();
        u.display_name = probe;
        self.store.update_user(&u)?;
        self.users.insert(id, u.clone());
        Ok((u, vec![Change::Full]))
    }

    fn create_user_check(&self, name: &str) -> Result<String, CoordError> {
        if name.is_empty() || name.len() > 63 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(CoordError::Invalid(format!("invalid user name {name:?}")));
        }
        Ok(name.to_string())
    }

    /// `users destroy`: refused while the user owns nodes (headscale behaviour).
    pub fn destroy_user(&mut self, name: &str) -> Result<(), CoordError> {
        let id = self.user_by_name(name)?.id;
        let owned = self.nodes.values().filter(|n| n.user_id == id).count();
        if owned > 0 {
            return Err(CoordError::Conflict(format!(
                "user {name:?} still owns {owned} node(s); delete or move them first"
            )));
        }
        for k in self
            .keys
            .values()
            .filter(|k| k.user_id == id)
            .map(|k| k.id)
            .collect::<Vec<_>>()
        {
            self.keys.remove(&k);
        }
        self.store.delete_user(id)?;
        self.users.remove(&id);
        Ok(())
    }

    // ---- API keys ----

    /// All REST API keys by id.
    pub fn api_keys(&self) -> impl Iterator<Item = &ApiKey> {
        self.api_keys.iter()
    }

    /// `apikeys create`: stores `prefix` and the hash of `secret` (both random text supplied by
    /// the caller; the key the client presents is `<prefix>.<secret>`).
    pub fn create_api_key(
        &mut self,
        prefix: &str,
        secret: &str,
        expiration: Option<i64>,
        now: i64,
    ) -> Result<ApiKey, CoordError> {
        if self.api_keys.iter().any(|k| k.prefix == prefix) {
            return Err(CoordError::Conflict(format!(
                "API key prefix {prefix:?} already exists"
            )));
        }
        let mut k = ApiKey {
            id: 0,
            prefix: prefix.to_string(),
            hash: api_key_hash(secret),
            created: now,
            expiration,
            last_seen: None,
        };
        k.id = self.store.insert_api_key(&k)?;
        self.api_keys.push(k.clone());
        Ok(k)
    }

    fn api_key_pos(&self, prefix: &str) -> Result<usize, CoordError> {
        self.api_keys
            .iter()
            .position(|k| k.prefix == prefix)
            .ok_or_else(|| CoordError::NotFound(format!("api key with prefix {prefix:?} not found")))
    }

    /// `apikeys expire`: the key stops working now.
    pub fn expire_api_key(&mut self, prefix: &str, now: i64) -> Result<ApiKey, CoordError> {
        let i = self.api_key_pos(prefix)?;
        let mut k = self.api_keys[i].clone();
        k.expiration = Some(k.expiration.map_or(now, |e| e.min(now)));
        self.store.update_api_key(&k)?;
        self.api_keys[i] = k.clone();
        Ok(k)
    }

    /// `apikeys delete`.
    pub fn delete_api_key(&mut self, prefix: &str) -> Result<(), CoordError> {
        let i = self.api_key_pos(prefix)?;
        self.store.delete_api_key(self.api_keys[i].id)?;
        self.api_keys.remove(i);
        Ok(())
    }

    /// Checks a presented `<prefix>.<secret>`; returns the key's prefix (for logs). Unknown,
    /// malformed and expired keys all give the same [`CoordError::Unauthorized`].
    pub fn check_api_key(&self, presented: &str, now: i64) -> Result<&str, CoordError> {
        let refused = || CoordError::Unauthorized("invalid or expired api key".into());
        let (prefix, secret) = presented.split_once('.').ok_or_else(refused)?;
        let k = self.api_keys.iter().find(|k| k.prefix == prefix).ok_or_else(refused)?;
        let ok = ct_eq(&k.hash, &api_key_hash(secret)) & k.expiration.is_none_or(|e| e > now);
        ok.then_some(k.prefix.as_str()).ok_or_else(refused)
    }

    // ---- pre-auth keys ----

    /// `preauthkeys create`; `secret` is random text supplied by the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn create_preauth_key(
        &mut self,
        user: &str,
        reusable: bool,
        ephemeral: bool,
        expiration: Option<i64>,
        tags: Vec<String>,
        secret: String,
        now: i64,
    ) -> Result<PreAuthKey, CoordError> {
        let user_id = self.user_by_name(user)?.id;
        for t in &tags {
            if !t.starts_with("tag:") || t.len() < 5 {
                return Err(CoordError::Invalid(format!(
                    "invalid tag {t:?}: tags look like tag:name"
                )));
            }
        }
        let mut k = PreAuthKey {
            id: 0,
            key: secret,
            user_id,
            reusable,
            ephemeral,
            used: false,
            tags,
            created: now,
            expiration,
        };
        k.id = self.store.insert_preauth_key(&k)?;
        self.keys.insert(k.id, k.clone());
        Ok(k)
    }

    /// `preauthkeys expire`.
    pub fn expire_preauth_key(&mut self, key_or_id: &str, now: i64) -> Result<PreAuthKey, CoordError> {
        let id = self
            .keys
            .values()
            .find(|k| k.key == key_or_id || k.id.to_string() == key_or_id)
            .map(|k| k.id)
            .ok_or_else(|| CoordError::NotFound("pre-auth key not found".into()))?;
        let mut k = self.keys[&id].clone();
        k.expiration = Some(now);
        self.store.update_preauth_key(&k)?;
        self.keys.insert(id, k.clone());
        Ok(k)
    }

    fn check_key(&self, text: &str, now: i64) -> Result<PreAuthKey, CoordError> {
        let k = self
            .keys
            .values()
            .find(|k| k.key == text)
            .ok_or_else(|| CoordError::Unauthorized("invalid auth key".into()))?;
        if k.expiration.is_some_and(|e| e <= now) {
            return Err(CoordError::Unauthorized("auth key expired".into()));
        }
        if k.used && !k.reusable {
            return Err(CoordError::Unauthorized("auth key already used".into()));
        }
        Ok(k.clone())
    }

    // ---- nodes ----

    fn unique_given_name(&self, host: &str, except: Option<u64>) -> String {
        let base = sanitize_label(host);
        let taken = |n: &str| self.nodes.values().any(|x| Some(x.id) != except && x.given_name == n);
        if !taken(&base) {
            return base;
        }
        (1..).map(|i| format!("{base}-{i}")).find(|n| !taken(n)).unwrap_or(base)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_node(
        &mut self,
        machine_key: MachinePublic,
        node_key: NodePublic,
        hostinfo: &serde_json::Value,
        user_id: u64,
        ephemeral: bool,
        tags: Vec<String>,
        auth_key_id: Option<u64>,
        now: i64,
    ) -> Result<(u64, Vec<Change>), CoordError> {
        if self.nodes.values().any(|n| n.node_key == node_key) {
            return Err(CoordError::Conflict(
                "node key already registered to another machine".into(),
            ));
        }
        let used4: BTreeSet<_> = self.nodes.values().filter_map(|n| n.ipv4).collect();
        let used6: BTreeSet<_> = self.nodes.values().filter_map(|n| n.ipv6).collect();
        let ipv4 = self.settings.ipam.next_v4(&used4).ok_or(CoordError::Exhausted)?;
        let ipv6 = self.settings.ipam.next_v6(&used6).ok_or(CoordError::Exhausted)?;
        let hostname = HostinfoView(hostinfo).hostname().to_string();
        let before = self.primaries.clone();
        let mut n = Node {
            id: 0,
            machine_key,
            node_key,
            disco_key: Default::default(),
            given_name: self.unique_given_name(&hostname, None),
            hostname,
            user_id,
            ipv4: Some(ipv4),
            ipv6: Some(ipv6),
            endpoints: Vec::new(),
            hostinfo: hostinfo.to_string(),
            home_derp: HostinfoView(hostinfo).preferred_derp(),
            tags,
            approved_routes: Vec::new(),
            auth_key_id,
            ephemeral,
            expiry: None,
            last_seen: None,
            created: now,
        };
        n.id = self.store.insert_node(&n)?;
        let id = n.id;
        log::info!("node registered node={id} name={} user={user_id}", n.given_name);
        self.nodes.insert(id, n);
        self.auto_approve(id)?;
        let mut ch = vec![Change::Node(id)];
        ch.extend(self.node_changes_for_primaries(&before));
        Ok((id, ch))
    }

    fn authorized_response(&self, node_id: u64, now: i64) -> RegisterResponse {
        let n = &self.nodes[&node_id];
        let u = self.users.get(&n.user_id);
        let name = u.map(|u| u.name.clone()).unwrap_or_default();
        RegisterResponse {
            user: tailcfg::UserJson {
                id: n.user_id,
                display_name: name.clone(),
            },
            login: tailcfg::Login {
                id: n.user_id,
                provider: String::new(),
                login_name: format!("{name}@"),
                display_name: name,
            },
            node_key_expired: n.expiry.is_some_and(|e| e <= now),
            machine_authorized: true,
            auth_url: String::new(),
            error: String::new(),
        }
    }

    fn new_pending(&mut self, machine: MachinePublic, req: &RegisterRequest, id: String, now: i64) -> RegisterResponse {
        self.pending.retain(|_, p| p.expires > now && p.machine_key != machine);
        while self.pending.len() >= MAX_PENDING_REGISTRATIONS {
            let oldest = self
                .pending
                .values()
                .min_by(|a, b| (a.expires, &a.id).cmp(&(b.expires, &b.id)))
                .map(|p| p.id.clone());
            let Some(oldest) = oldest else { break };
            self.pending.remove(&oldest);
            self.pending_evicted += 1;
        }
        let url = format!("{}/register/{id}", self.settings.server_url.trim_end_matches('/'));
        self.pending.insert(
            id.clone(),
            Pending {
                id,
                machine_key: machine,
                node_key: req.node_key,
                hostinfo: req.hostinfo.clone().unwrap_or(serde_json::Value::Null),
                ephemeral: req.ephemeral,
                expires: now + PENDING_REGISTRATION_TTL,
                node_id: None,
            },
        );
        RegisterResponse {
            auth_url: url,
            ..Default::default()
        }
    }

    /// `POST /machine/register` from the Noise peer `machine`. `new_id` makes a random AuthURL id.
    pub fn register(
        &mut self,
        machine: MachinePublic,
        req: &RegisterRequest,
        now: i64,
        new_id: impl FnOnce() -> String,
    ) -> Result<(RegisterOutcome, Vec<Change>), CoordError> {
        if req.version < tailcfg::MIN_SUPPORTED_CAPABILITY_VERSION {
            return Err(CoordError::Invalid(format!(
                "client capability version {} is too old (need {} = Tailscale 1.80 or newer)",
                req.version,
                tailcfg::MIN_SUPPORTED_CAPABILITY_VERSION
            )));
        }
        if req.node_key.is_zero() {
            return Err(CoordError::Invalid("NodeKey is missing".into()));
        }
        // A node key bound to another machine is never accepted (headscale machineKeyMismatch).
        if self
            .nodes
            .values()
            .any(|n| n.node_key == req.node_key && n.machine_key != machine)
        {
            return Err(CoordError::Unauthorized("node key belongs to another machine".into()));
        }
        let existing = self.nodes.values().find(|n| n.machine_key == machine).map(|n| n.id);
        let expiry = tailcfg::parse_time(&req.expiry).map_err(|_| CoordError::Invalid("invalid Expiry".into()))?;

        // Logout: an expiry in the past for the current key.
        if let (Some(t), Some(id)) = (expiry, existing) {
            if t <= now {
                let n = &self.nodes[&id];
                if n.node_key != req.node_key {
                    return Err(CoordError::Unauthorized("logout for an unknown node key".into()));
                }
                let mut resp = self.authorized_response(id, now);
                resp.node_key_expired = true;
                let changes = if n.ephemeral {
                    self.delete_node(id)?
                } else {
                    self.expire_node(id, now)?
                };
                log::info!("node logged out node={id}");
                return Ok((RegisterOutcome::Reply(resp), changes));
            }
        }

        if !req.followup.is_empty() {
            let id = req.followup.rsplit('/').next().unwrap_or("").to_string();
            return match self.pending.get(&id) {
                Some(p) if p.machine_key == machine => match p.node_id {
                    Some(node) if self.nodes.contains_key(&node) => {
                        self.pending.remove(&id);
                        Ok((RegisterOutcome::Reply(self.authorized_response(node, now)), vec![]))
                    }
                    _ if p.expires > now => Ok((RegisterOutcome::Wait(id), vec![])),
                    _ => Ok((
                        RegisterOutcome::Reply(self.new_pending(machine, req, new_id(), now)),
                        vec![],
                    )),
                },
                _ => Ok((
                    RegisterOutcome::Reply(self.new_pending(machine, req, new_id(), now)),
                    vec![],
                )),
            };
        }

        let hostinfo = req.hostinfo.clone().unwrap_or(serde_json::Value::Null);
        if let Some(auth) = req.auth.as_ref().filter(|a| !a.auth_key.is_empty()) {
            // Same machine, same key, not expired: a container re-running `up --authkey`.
            if let Some(id) = existing {
                let n = &self.nodes[&id];
                if n.node_key == req.node_key && n.expiry.is_none_or(|e| e > now) {
                    return Ok((RegisterOutcome::Reply(self.authorized_response(id, now)), vec![]));
                }
            }
            let key = self.check_key(&auth.auth_key, now)?;
            let changes = if let Some(id) = existing {
                self.reauth(id, req.node_key, &hostinfo, key.user_id, Some(key.tags.clone()))?
            } else {
                let (_, ch) = self.create_node(
                    machine,
                    req.node_key,
                    &hostinfo,
                    key.user_id,
                    key.ephemeral || req.ephemeral,
                    key.tags.clone(),
                    Some(key.id),
                    now,
                )?;
                ch
            };
            if !key.used {
                let mut k = key.clone();
                k.used = true;
                self.store.update_preauth_key(&k)?;
                self.keys.insert(k.id, k);
            }
            let id = self
                .nodes
                .values()
                .find(|n| n.machine_key == machine)
                .map(|n| n.id)
                .ok_or(CoordError::Exhausted)?;
            return Ok((RegisterOutcome::Reply(self.authorized_response(id, now)), changes));
        }

        if let Some(id) = existing {
            if self.nodes[&id].node_key == req.node_key {
                // Restart of a registered node: report its state (expired or not).
                return Ok((RegisterOutcome::Reply(self.authorized_response(id, now)), vec![]));
            }
        }
        Ok((
            RegisterOutcome::Reply(self.new_pending(machine, req, new_id(), now)),
            vec![],
        ))
    }

    /// Re-authentication of an existing machine with a (possibly new) node key; keeps the IPs.
    fn reauth(
        &mut self,
        id: u64,
        node_key: NodePublic,
        hostinfo: &serde_json::Value,
        user_id: u64,
        tags: Option<Vec<String>>,
    ) -> Result<Vec<Change>, CoordError> {
        let n = self.node_mut(id)?;
        n.node_key = node_key;
        n.user_id = user_id;
        n.expiry = None;
        if !hostinfo.is_null() {
            n.hostinfo = hostinfo.to_string();
        }
        if let Some(t) = tags {
            n.tags = t;
        }
        let n = n.clone();
        self.store.update_node(&n)?;
        log::info!("node re-authenticated node={id}");
        let before = self.primaries.clone();
        self.auto_approve(id)?;
        let mut ch = vec![Change::Node(id)];
        ch.extend(self.node_changes_for_primaries(&before));
        Ok(ch)
    }

    /// `nodes register --user U --key ID`: approves a pending interactive registration.
    pub fn approve_pending(&mut self, id: &str, user: &str, now: i64) -> Result<(u64, Vec<Change>), CoordError> {
        let id = id.rsplit('/').next().unwrap_or(id);
        let p = self
            .pending
            .get(id)
            .filter(|p| p.expires > now)
            .cloned()
            .ok_or_else(|| {
                CoordError::NotFound(format!(
                    "no pending registration with key {id:?} (expired or never requested)"
                ))
            })?;
        if p.node_id.is_some() {
            return Err(CoordError::Conflict("registration already approved".into()));
        }
        let user_id = self.user_by_name(user)?.id;
        let existing = self
            .nodes
            .values()
            .find(|n| n.machine_key == p.machine_key)
            .map(|n| n.id);
        let (node_id, changes) = match existing {
            Some(nid) => (nid, self.reauth(nid, p.node_key, &p.hostinfo, user_id, None)?),
            None => self.create_node(
                p.machine_key,
                p.node_key,
                &p.hostinfo,
                user_id,
                p.ephemeral,
                vec![],
                None,
                now,
            )?,
        };
        if let Some(pm) = self.pending.get_mut(id) {
            pm.node_id = Some(node_id);
        }
        Ok((node_id, changes))
    }

    /// `nodes delete`.
    pub fn delete_node(&mut self, id: u64) -> Result<Vec<Change>, CoordError> {
        if !self.nodes.contains_key(&id) {
            return Err(CoordError::NotFound(format!("node {id} not found")));
        }
        let before = self.primaries.clone();
        self.store.delete_node(id)?;
        self.nodes.remove(&id);
        self.sessions.remove(&id);
        log::info!("node deleted node={id}");
        let mut ch = vec![Change::Removed(id)];
        ch.extend(self.node_changes_for_primaries(&before));
        Ok(ch)
    }

    /// `nodes expire`: the node key expires now (the client must log in again).
    pub fn expire_node(&mut self, id: u64, now: i64) -> Result<Vec<Change>, CoordError> {
        let n = self.node_mut(id)?;
        n.expiry = Some(now);
        let n = n.clone();
        self.store.update_node(&n)?;
        Ok(vec![Change::Node(id)])
    }

    /// `nodes rename`.
    pub fn rename_node(&mut self, id: u64, name: &str) -> Result<Vec<Change>, CoordError> {
        let label = sanitize_label(name);
        if label != name {
            return Err(CoordError::Invalid(format!(
                "invalid node name {name:?}: use lowercase letters, digits and '-' (e.g. {label:?})"
            )));
        }
        if self.nodes.values().any(|n| n.id != id && n.given_name == label) {
            return Err(CoordError::Conflict(format!("node name {label:?} is taken")));
        }
        let n = self.node_mut(id)?;
        n.given_name = label;
        let n = n.clone();
        self.store.update_node(&n)?;
        Ok(vec![Change::Node(id)])
    }

    /// `nodes move`.
    pub fn move_node(&mut self, id: u64, user: &str) -> Result<Vec<Change>, CoordError> {
        let uid = self.user_by_name(user)?.id;
        let n = self.node_mut(id)?;
        n.user_id = uid;
        let n = n.clone();
        self.store.update_node(&n)?;
        Ok(vec![Change::Node(id)])
    }

    /// `nodes tag`: replaces the node's ACL tags (`tag:name` each). Tags change what the
    /// policy grants, so every map is rebuilt.
    pub fn set_tags(&mut self, id: u64, mut tags: Vec<String>) -> Result<Vec<Change>, CoordError> {
        for t in &tags {
            if !t.starts_with("tag:") || t.len() < 5 {
                return Err(CoordError::Invalid(format!(
                    "invalid tag {t:?}: tags look like tag:name"
                )));
            }
        }
        tags.sort();
        tags.dedup();
        let n = self.node_mut(id)?;
        n.tags = tags;
        let n = n.clone();
        self.store.update_node(&n)?;
        Ok(vec![Change::Full])
    }

    /// `nodes approve-routes` (replaces the approved set) / `routes enable` (adds).
    pub fn set_approved_routes(
        &mut self,
        id: u64,
        routes: Vec<String>,
        replace: bool,
    ) -> Result<Vec<Change>, CoordError> {
        for r in &routes {
            if !tailcfg::is_valid_cidr(r) {
                return Err(CoordError::Invalid(format!(
                    "invalid route {r:?}: expected a CIDR like 192.168.1.0/24"
                )));
            }
        }
        let before = self.primaries.clone();
        let n = self.node_mut(id)?;
        if replace {
            n.approved_routes = routes;
        } else {
            for r in routes {
                if !n.approved_routes.contains(&r) {
                    n.approved_routes.push(r);
                }
            }
        }
        n.approved_routes.sort();
        let n = n.clone();
        self.store.update_node(&n)?;
        let mut ch = vec![Change::Node(id)];
        ch.extend(self.node_changes_for_primaries(&before));
        ch.dedup();
        Ok(ch)
    }

    /// Applies a `/machine/map` request from machine `machine`; returns the node id.
    pub fn apply_map_request(
        &mut self,
        machine: MachinePublic,
        req: &tailcfg::MapRequest,
        _now: i64,
    ) -> Result<(u64, Vec<Change>), CoordError> {
        if req.version < tailcfg::MIN_SUPPORTED_CAPABILITY_VERSION {
            return Err(CoordError::Invalid(format!(
                "client capability version {} is too old",
                req.version
            )));
        }
        let id = self
            .nodes
            .values()
            .find(|n| n.node_key == req.node_key)
            .map(|n| n.id)
            .ok_or_else(|| CoordError::NotFound("unknown node key".into()))?;
        let before = self.primaries.clone();
        let n = self.nodes.get_mut(&id).ok_or(CoordError::Exhausted)?;
        if n.machine_key != machine {
            return Err(CoordError::Unauthorized("node key belongs to another machine".into()));
        }
        let mut patch = PeerChange {
            node_id: id,
            ..Default::default()
        };
        let mut full = false;
        let mut routes_changed = false;
        if !req.disco_key.is_zero() && req.disco_key != n.disco_key {
            n.disco_key = req.disco_key;
            patch.disco_key = Some(req.disco_key);
        }
        if !req.endpoints.is_empty() && req.endpoints != n.endpoints {
            n.endpoints = req.endpoints.clone();
            patch.endpoints = Some(req.endpoints.clone());
        }
        if let Some(hi) = req.hostinfo.as_ref().filter(|h| h.is_object()) {
            let view = HostinfoView(hi);
            let derp = view.preferred_derp();
            if derp != 0 && derp != n.home_derp {
                n.home_derp = derp;
                patch.derp_region = Some(derp);
            }
            let text = hi.to_string();
            if text != n.hostinfo {
                let old_routes = serde_json::from_str::<serde_json::Value>(&n.hostinfo)
                    .map(|v| HostinfoView(&v).routable_ips())
                    .unwrap_or_default();
                let host_changed = view.hostname() != n.hostname;
                routes_changed = old_routes != view.routable_ips();
                full |= routes_changed || host_changed;
                if host_changed {
                    n.hostname = view.hostname().to_string();
                }
                n.hostinfo = text;
            }
        }
        let changed = patch.disco_key.is_some() || patch.endpoints.is_some() || patch.derp_region.is_some() || full;
        let mut ch = Vec::new();
        if changed {
            let n = n.clone();
            self.store.update_node(&n)?;
            if routes_changed {
                self.auto_approve(id)?;
            }
            if full {
                ch.push(Change::Node(id));
            } else {
                ch.push(Change::Patch(patch));
            }
            ch.extend(self.node_changes_for_primaries(&before));
        }
        Ok((id, ch))
    }

    /// A map stream for `id` started.
    pub fn session_start(&mut self, id: u64, now: i64) -> Vec<Change> {
        let before = self.primaries.clone();
        let c = self.sessions.entry(id).or_insert(0);
        *c += 1;
        if *c != 1 {
            return vec![];
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            n.last_seen = Some(now);
        }
        let mut ch = vec![Change::Patch(PeerChange {
            node_id: id,
            online: Some(true),
            ..Default::default()
        })];
        ch.extend(self.node_changes_for_primaries(&before));
        ch
    }

    /// A map stream for `id` ended.
    pub fn session_end(&mut self, id: u64, now: i64) -> Vec<Change> {
        let before = self.primaries.clone();
        let Some(c) = self.sessions.get_mut(&id) else {
            return vec![];
        };
        *c = c.saturating_sub(1);
        if *c > 0 {
            return vec![];
        }
        self.sessions.remove(&id);
        let Some(n) = self.nodes.get_mut(&id) else {
            return vec![];
        };
        n.last_seen = Some(now);
        let n = n.clone();
        if let Err(e) = self.store.update_node(&n) {
            log::warn!("saving last seen failed node={id} err={e}");
        }
        let mut ch = vec![Change::Patch(PeerChange {
            node_id: id,
            online: Some(false),
            last_seen: Some(tailcfg::format_time(now)),
            ..Default::default()
        })];
        ch.extend(self.node_changes_for_primaries(&before));
        ch
    }

    /// Deletes ephemeral nodes offline for longer than the inactivity timeout.
    pub fn gc_ephemeral(&mut self, now: i64) -> Vec<Change> {
        let timeout = self.settings.ephemeral_inactivity_timeout;
        let stale: Vec<u64> = self
            .nodes
            .values()
            .filter(|n| n.ephemeral && !self.is_online(n.id))
            .filter(|n| n.last_seen.unwrap_or(n.created) + timeout <= now)
            .map(|n| n.id)
            .collect();
        let mut ch = Vec::new();
        for id in stale {
            log::info!("ephemeral node inactive, removing node={id}");
            match self.delete_node(id) {
                Ok(c) => ch.extend(c),
                Err(e) => log::warn!("removing ephemeral node failed node={id} err={e}"),
            }
        }
        ch
    }

    /// Forgets expired pending registrations.
    pub fn gc_pending(&mut self, now: i64) {
        self.pending
            .retain(|_, p| p.expires > now || p.node_id.is_some() && p.expires + 60 > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        coordinator::mapper::{self, Action},
        wire::keys::{DiscoPrivate, MachinePrivate, NodePrivate},
        wire::tailcfg::{MapRequest, RegisterAuth},
    };

    fn state() -> State {
        State::load(Store::open_in_memory().unwrap(), Settings::default()).unwrap()
    }

    #[test]
    fn api_keys_check_hash_expiry_and_delete() {
        let mut st = state();
        let k = st.create_api_key("pfx1", "s3cret", Some(1000), 10).unwrap();
        assert_ne!(k.hash, [0; 32]);
        assert_eq!(st.check_api_key("pfx1.s3cret", 999).unwrap(), "pfx1");
        for bad in ["pfx1.s3creT", "pfx1.", "pfx1", "pfx2.s3cret", "", ".s3cret"] {
            assert!(
                matches!(st.check_api_key(bad, 999), Err(CoordError::Unauthorized(_))),
                "{bad}"
            );
        }
        assert!(
            st.check_api_key("pfx1.s3cret", 1000).is_err(),
            "expired at its expiration"
        );
        st.create_api_key("pfx2", "other", None, 10).unwrap();
        assert!(st.check_api_key("pfx2.other", i64::MAX).is_ok(), "no expiry");
        let e = st.expire_api_key("pfx2", 50).unwrap();
        assert_eq!(e.expiration, Some(50));
        assert!(st.check_api_key("pfx2.other", 51).is_err());
        // The secret is not stored anywhere; a reload keeps the hash and the expiry.
        let snap = st.store().load().unwrap();
        assert_eq!(snap.api_keys.len(), 2);
        assert_eq!(snap.api_keys[1].expiration, Some(50));
        st.delete_api_key("pfx1").unwrap();
        assert!(st.check_api_key("pfx1.s3cret", 0).is_err());
        assert!(matches!(st.delete_api_key("pfx1"), Err(CoordError::NotFound(_))));
        assert!(matches!(
            st.create_api_key("pfx2", "x", None, 0),
            Err(CoordError::Conflict(_))
        ));
    }

    #[test]
    fn set_tags_validates_and_replaces() {
        let mut st = state();
        let key = with_key(&mut st, false);
        let (m, n) = mk(1);
        register(&mut st, m, &req(&n, Some(&key), "a"), 1);
        let id = st.nodes().next().unwrap().id;
        assert_eq!(
            st.set_tags(id, vec!["tag:b".into(), "tag:a".into(), "tag:b".into()])
                .unwrap(),
            vec![Change::Full]
        );
        assert_eq!(st.node(id).unwrap().tags, ["tag:a", "tag:b"]);
        assert!(matches!(
            st.set_tags(id, vec!["web".into()]),
            Err(CoordError::Invalid(_))
        ));
        assert!(matches!(st.set_tags(99, vec![]), Err(CoordError::NotFound(_))));
        assert_eq!(st.store().load().unwrap().nodes[0].tags, ["tag:a", "tag:b"]);
    }

    fn mk(b: u8) -> (MachinePublic, NodePrivate) {
        (
            MachinePrivate::from_random([b; 32]).public(),
            NodePrivate::from_random([b.wrapping_add(100); 32]),
        )
    }

    fn req(node: &NodePrivate, key: Option<&str>, host: &str) -> RegisterRequest {
        RegisterRequest {
            version: 130,
            node_key: node.public(),
            auth: key.map(|k| RegisterAuth { auth_key: k.into() }),
            expiry: tailcfg::ZERO_TIME.into(),
            hostinfo: Some(serde_json::json!({"Hostname": host})),
            ..Default::default()
        }
    }

    fn register(st: &mut State, m: MachinePublic, r: &RegisterRequest, now: i64) -> RegisterResponse {
        match st.register(m, r, now, || "pending1".into()).unwrap().0 {
            RegisterOutcome::Reply(r) => r,
            RegisterOutcome::Wait(id) => panic!("unexpected wait {id}"),
        }
    }

    fn with_key(st: &mut State, ephemeral: bool) -> String {
        if st.users().next().is_none() {
            st.create_user("u", 0).unwrap();
        }
        st.create_preauth_key(
            "u",
            true,
            ephemeral,
            None,
            vec![],
            format!("k{}", st.preauth_keys().count()),
            0,
        )
        .unwrap()
        .key
    }

    #[test]
    fn pending_registrations_are_capped_oldest_first() {
        let mut st = state();
        let mut n = 0u32;
        let mut start = |st: &mut State, now: i64| {
            n += 1;
            let mut b = [9u8; 32];
            b[1..5].copy_from_slice(&n.to_le_bytes());
            let m = MachinePrivate::from_random(b).public();
            b[5] = 1;
            let node = NodePrivate::from_random(b);
            let id = format!("p{n}");
            match st.register(m, &req(&node, None, "h"), now, || id.clone()).unwrap().0 {
                RegisterOutcome::Reply(r) => assert!(r.auth_url.ends_with(&id)),
                RegisterOutcome::Wait(w) => panic!("unexpected wait {w}"),
            }
        };
        for i in 0..MAX_PENDING_REGISTRATIONS as i64 {
            start(&mut st, 1000 + i);
        }
        assert!(st.pending("p1").is_some());
        assert_eq!(st.pending.len(), MAX_PENDING_REGISTRATIONS);
        // One more: the oldest two go in order, the newest stay, the size holds.
        start(&mut st, 1100);
        assert!(st.pending("p1").is_none() && st.pending("p2").is_some());
        start(&mut st, 1101);
        assert!(st.pending("p2").is_none() && st.pending("p3").is_some());
        let last = format!("p{}", MAX_PENDING_REGISTRATIONS + 2);
        assert!(st.pending(&last).is_some());
        assert_eq!(st.pending.len(), MAX_PENDING_REGISTRATIONS);
        assert_eq!(st.pending_evicted, 2, "each eviction is counted for the metrics");
    }

    #[test]
    fn ephemeral_nodes_are_removed_after_inactivity_only() {
        let mut st = state();
        let k = with_key(&mut st, true);
        let (m, n) = mk(1);
        assert!(register(&mut st, m, &req(&n, Some(&k), "eph"), 100).machine_authorized);
        let id = st.nodes().next().unwrap().id;
        assert!(st.node(id).unwrap().ephemeral);
        st.session_start(id, 100);
        // Online nodes are never collected, whatever the clock says.
        assert!(st.gc_ephemeral(100 + 10 * 3600).is_empty());
        st.session_end(id, 200);
        assert!(st.gc_ephemeral(200 + 30 * 60 - 1).is_empty());
        assert_eq!(st.gc_ephemeral(200 + 30 * 60), vec![Change::Removed(id)]);
        assert!(st.node(id).is_none());
    }

    #[test]
    fn logout_expires_and_reauth_keeps_addresses() {
        let mut st = state();
        let k = with_key(&mut st, false);
        let (m, n) = mk(2);
        register(&mut st, m, &req(&n, Some(&k), "box"), 10);
        let before = st.nodes().next().unwrap().clone();
        let mut out = req(&n, None, "box");
        out.expiry = tailcfg::format_time(123);
        let r = register(&mut st, m, &out, 1000);
        assert!(r.node_key_expired);
        assert_eq!(st.node(before.id).unwrap().expiry, Some(1000));
        // Restart with the expired key reports it expired.
        assert!(register(&mut st, m, &req(&n, None, "box"), 1060).node_key_expired);
        // A new node key without auth starts an interactive login...
        let n2 = NodePrivate::from_random([77; 32]);
        let r = register(&mut st, m, &req(&n2, None, "box"), 1070);
        assert!(r.auth_url.ends_with("/register/pending1"));
        // ...and with a key re-authenticates the same node, same IPs, new node key.
        let r = register(&mut st, m, &req(&n2, Some(&k), "box"), 1080);
        assert!(r.machine_authorized && !r.node_key_expired);
        let after = st.node(before.id).unwrap();
        assert_eq!((after.ipv4, after.ipv6), (before.ipv4, before.ipv6));
        assert_eq!(after.node_key, n2.public());
        assert_eq!(st.nodes().count(), 1);
    }

    #[test]
    fn given_names_are_unique_and_sanitized() {
        let mut st = state();
        let k = with_key(&mut st, false);
        for b in 3..6 {
            let (m, n) = mk(b);
            register(&mut st, m, &req(&n, Some(&k), "My Laptop!"), 0);
        }
        let names: Vec<_> = st.nodes().map(|n| n.given_name.clone()).collect();
        assert_eq!(names, vec!["my-laptop", "my-laptop-1", "my-laptop-2"]);
        let id = st.nodes().next().unwrap().id;
        assert!(st.rename_node(id, "Bad Name").is_err());
        assert!(st.rename_node(id, "my-laptop-1").is_err());
        st.rename_node(id, "desk").unwrap();
    }

    #[test]
    fn routes_need_approval_and_elect_an_online_primary() {
        let mut st = state();
        let k = with_key(&mut st, false);
        let mut ids = vec![];
        for b in [7u8, 8] {
            let (m, n) = mk(b);
            let mut r = req(&n, Some(&k), &format!("r{b}"));
            r.hostinfo = Some(
                serde_json::json!({"Hostname": format!("r{b}"), "RoutableIPs": ["10.0.0.0/24", "0.0.0.0/0", "::/0"]}),
            );
            register(&mut st, m, &r, 0);
            ids.push(st.nodes().last().unwrap().id);
        }
        assert!(st.primaries().is_empty(), "announced but not approved");
        st.set_approved_routes(ids[0], vec!["10.0.0.0/24".into()], true)
            .unwrap();
        let ch = st
            .set_approved_routes(
                ids[1],
                vec!["10.0.0.0/24".into(), "0.0.0.0/0".into(), "::/0".into()],
                true,
            )
            .unwrap();
        assert!(ch.contains(&Change::Node(ids[1])));
        assert_eq!(st.primaries()["10.0.0.0/24"], ids[0], "lowest id when none is online");
        // Node 2 comes online: it takes over, and both nodes' views change.
        let ch = st.session_start(ids[1], 1);
        assert_eq!(st.primaries()["10.0.0.0/24"], ids[1]);
        assert!(ch.contains(&Change::Node(ids[0])) && ch.contains(&Change::Node(ids[1])));
        let p = st.primaries().clone();
        let view = mapper::tail_node(&st, ids[1], &p, 1).unwrap();
        assert_eq!(view.primary_routes, vec!["10.0.0.0/24".to_string()]);
        assert!(view.allowed_ips.contains(&"0.0.0.0/0".to_string()) && view.allowed_ips.contains(&"::/0".to_string()));
        let other = mapper::tail_node(&st, ids[0], &p, 1).unwrap();
        assert_eq!(
            other.allowed_ips.len(),
            2,
            "not primary, no exit routes: {:?}",
            other.allowed_ips
        );
        assert!(st.set_approved_routes(ids[0], vec!["nonsense".into()], true).is_err());
    }

    #[test]
    fn auto_approvers_apply_at_registration_reannounce_and_policy_set() {
        let mut st = state();
        let k = with_key(&mut st, false);
        st.set_policy(
            Some(r#"{"autoApprovers": {"routes": {"10.0.0.0/8": ["u@"]}, "exitNode": ["u@"]}}"#),
            0,
        )
        .unwrap();
        // Registration announcing a covered route and one outside: only the covered one.
        let (m, n) = mk(20);
        let mut r = req(&n, Some(&k), "r");
        r.hostinfo = Some(serde_json::json!({"Hostname": "r", "RoutableIPs": ["10.1.0.0/16", "192.168.9.0/24"]}));
        register(&mut st, m, &r, 0);
        let id = st.nodes().last().unwrap().id;
        assert_eq!(st.node(id).unwrap().approved_routes, vec!["10.1.0.0/16"]);
        assert_eq!(st.primaries().get("10.1.0.0/16"), Some(&id));
        // Re-announcing through a map request (exit routes now too) approves the new ones.
        let mr = MapRequest {
            version: 130,
            node_key: n.public(),
            hostinfo: Some(
                serde_json::json!({"Hostname": "r", "RoutableIPs": ["10.1.0.0/16", "10.2.0.0/16", "192.168.9.0/24", "0.0.0.0/0", "::/0"]}),
            ),
            ..Default::default()
        };
        let (_, ch) = st.apply_map_request(m, &mr, 1).unwrap();
        assert!(ch.contains(&Change::Node(id)));
        assert_eq!(
            st.node(id).unwrap().approved_routes,
            vec!["0.0.0.0/0", "10.1.0.0/16", "10.2.0.0/16", "::/0"]
        );
        // A policy set later approves what the node already announces.
        st.set_policy(Some(r#"{"autoApprovers": {"routes": {"192.168.0.0/16": ["u@"]}}}"#), 2)
            .unwrap();
        let after = &st.node(id).unwrap().approved_routes;
        assert!(after.contains(&"192.168.9.0/24".to_string()), "{after:?}");
        // Without a policy nothing is approved automatically.
        st.set_policy(None, 3).unwrap();
        let (m2, n2) = mk(21);
        let mut r = req(&n2, Some(&k), "r2");
        r.hostinfo = Some(serde_json::json!({"Hostname": "r2", "RoutableIPs": ["10.3.0.0/16"]}));
        register(&mut st, m2, &r, 4);
        assert!(st.nodes().last().unwrap().approved_routes.is_empty());
        // From a file (policy_path): in force, and the admin socket cannot change it.
        st.use_policy_file("/etc/p.hujson", r#"{"acls": []}"#).unwrap();
        assert!(st.policy().is_some());
        assert!(matches!(st.set_policy(None, 5), Err(CoordError::Conflict(e)) if e.contains("/etc/p.hujson")));
        st.policy_file = None;
        st.set_policy(None, 5).unwrap();
        assert!(st
            .use_policy_file("/etc/p.hujson", "{\n  \"acls\": 1}")
            .unwrap_err()
            .to_string()
            .contains("line 2"));
        // A bad policy is refused and changes nothing.
        assert!(matches!(st.set_policy(Some("{\"acls\": [}"), 5), Err(CoordError::Invalid(e)) if e.contains("line 1")));
        assert!(st.policy().is_none());
    }

    #[test]
    fn ha_primary_fails_over_and_the_new_one_stays() {
        let mut st = state();
        let k = with_key(&mut st, false);
        let mut ids = vec![];
        for b in [30u8, 31, 32] {
            let (m, n) = mk(b);
            let mut r = req(&n, Some(&k), &format!("ha{b}"));
            r.hostinfo = Some(serde_json::json!({"Hostname": format!("ha{b}"), "RoutableIPs": ["10.9.0.0/24"]}));
            register(&mut st, m, &r, 0);
            let id = st.nodes().last().unwrap().id;
            st.set_approved_routes(id, vec!["10.9.0.0/24".into()], true).unwrap();
            ids.push(id);
        }
        let primary = |st: &State| st.primaries()["10.9.0.0/24"];
        assert_eq!(primary(&st), ids[0], "none online: the lowest id");
        st.session_start(ids[2], 1);
        st.session_start(ids[1], 1);
        assert_eq!(primary(&st), ids[2], "the first online router took over and stays");
        // The primary goes offline: the lowest-id online router takes over, and both hear it.
        let ch = st.session_end(ids[2], 2);
        assert_eq!(primary(&st), ids[1]);
        assert!(
            ch.contains(&Change::Node(ids[1])) && ch.contains(&Change::Node(ids[2])),
            "{ch:?}"
        );
        // The old primary comes back: no flap, the new primary stays.
        let ch = st.session_start(ids[2], 3);
        assert_eq!(primary(&st), ids[1]);
        assert!(!ch.iter().any(|c| matches!(c, Change::Node(_))), "{ch:?}");
        // A lower id coming online does not take over either.
        st.session_start(ids[0], 4);
        assert_eq!(primary(&st), ids[1]);
        // The primary stops serving the route (approval revoked): the lowest-id online one.
        st.set_approved_routes(ids[1], vec![], true).unwrap();
        assert_eq!(primary(&st), ids[0]);
        let p = st.primaries().clone();
        assert_eq!(
            mapper::tail_node(&st, ids[0], &p, 5).unwrap().primary_routes,
            vec!["10.9.0.0/24"]
        );
        assert!(mapper::tail_node(&st, ids[2], &p, 5).unwrap().primary_routes.is_empty());
    }

    #[test]
    fn map_requests_produce_patches_not_full_nodes() {
        let mut st = state();
        let k = with_key(&mut st, false);
        let (m, n) = mk(9);
        register(&mut st, m, &req(&n, Some(&k), "a"), 0);
        let (m2, n2) = mk(10);
        register(&mut st, m2, &req(&n2, Some(&k), "b"), 0);
        let (a, b) = (st.nodes().next().unwrap().id, st.nodes().nth(1).unwrap().id);
        let disco = DiscoPrivate::from_random([5; 32]).public();
        let mr = MapRequest {
            version: 130,
            node_key: n.public(),
            disco_key: disco,
            endpoints: vec!["1.2.3.4:5".into()],
            ..Default::default()
        };
        let (id, ch) = st.apply_map_request(m, &mr, 1).unwrap();
        assert_eq!(id, a);
        let Change::Patch(p) = &ch[0] else { panic!("{ch:?}") };
        assert_eq!(
            (p.disco_key, p.endpoints.clone()),
            (Some(disco), Some(vec!["1.2.3.4:5".to_string()]))
        );
        // Same request again: nothing changed, nothing sent.
        assert!(st.apply_map_request(m, &mr, 2).unwrap().1.is_empty());
        // The patch goes to B, not back to A.
        let u = mapper::Fanout::default().prepare(&st, ch[0].clone(), 2);
        assert!(matches!(mapper::Viewer::new(a).action(&u), Action::None));
        assert!(matches!(
            mapper::Viewer::new(b).action(&u),
            Action::Send { filter: None, msg: Some(m) } if m.msg.peers_changed_patch.is_some()
        ));
        // Wrong machine for this node key.
        assert!(matches!(
            st.apply_map_request(m2, &mr, 3),
            Err(CoordError::Unauthorized(_))
        ));
        // Old clients are refused.
        let old = MapRequest { version: 100, ..mr };
        assert!(matches!(st.apply_map_request(m, &old, 3), Err(CoordError::Invalid(_))));
    }

    #[test]
    fn addresses_survive_reload_and_are_not_reused_while_nodes_exist() {
        let dir = std::env::temp_dir().join(format!("ts-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("db.sqlite");
        let (a_ip, b_id) = {
            let mut st = State::load(Store::open(&path).unwrap(), Settings::default()).unwrap();
            let k = with_key(&mut st, false);
            for b in [11u8, 12] {
                let (m, n) = mk(b);
                register(&mut st, m, &req(&n, Some(&k), "x"), 0);
            }
            let a = st.nodes().next().unwrap().clone();
            let b = st.nodes().nth(1).unwrap().id;
            st.delete_node(a.id).unwrap();
            (a.ipv4, b)
        };
        let mut st = State::load(Store::open(&path).unwrap(), Settings::default()).unwrap();
        assert_eq!(st.nodes().count(), 1);
        let b_ip = st.node(b_id).unwrap().ipv4;
        let k = with_key(&mut st, false);
        let (m, n) = mk(13);
        register(&mut st, m, &req(&n, Some(&k), "y"), 0);
        let c = st.nodes().last().unwrap();
        assert_ne!(c.ipv4, b_ip, "an address in use is never handed out");
        assert_eq!(c.ipv4, a_ip, "the deleted node's address is free again");
        assert!(c.id > b_id, "ids are never reused");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
