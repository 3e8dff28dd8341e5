//! Coordinator records: users, pre-auth keys and nodes, as stored in SQLite and held in memory.
//!
//! Mirrors headscale `hscontrol/types/{users,preauth_key,node}.go`, reduced to what tinyscale
//! serves. Times are Unix seconds (UTC); `None` means "never"/"unset".
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::wire::keys::{DiscoPublic, MachinePublic, NodePublic};

/// A tailnet user (headscale `types.User`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Primary key, never reused.
    pub id: u64,
    /// Unique login name, e.g. `alice`.
    pub name: String,
    /// Display name (defaults to `name`).
    pub display_name: String,
    /// Creation time.
    pub created: i64,
}

/// A pre-auth key (headscale `types.PreAuthKey`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreAuthKey {
    /// Primary key, never reused.
    pub id: u64,
    /// The secret text the client presents (`tskey-auth-…` style), unique.
    pub key: String,
    /// Owner.
    pub user_id: u64,
    /// May register more than one node.
    pub reusable: bool,
    /// Nodes registered with it are ephemeral.
    pub ephemeral: bool,
    /// A single-use key that has been used.
    pub used: bool,
    /// ACL tags given to nodes registered with it (`tag:x`).
    pub tags: Vec<String>,
    /// Creation time.
    pub created: i64,
    /// Expiry time; `None` never expires.
    pub expiration: Option<i64>,
}

/// A registered node (headscale `types.Node`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Primary key, never reused (SQLite AUTOINCREMENT).
    pub id: u64,
    /// Long-term machine identity (the Noise static key).
    pub machine_key: MachinePublic,
    /// Current WireGuard/DERP key.
    pub node_key: NodePublic,
    /// Last disco key the node reported (changes every client restart).
    pub disco_key: DiscoPublic,
    /// Hostname the client reported.
    pub hostname: String,
    /// DNS label: sanitized, unique hostname; admins may rename it.
    pub given_name: String,
    /// Owner.
    pub user_id: u64,
    /// Tailnet IPv4 address.
    pub ipv4: Option<Ipv4Addr>,
    /// Tailnet IPv6 address.
    pub ipv6: Option<Ipv6Addr>,
    /// Last reported endpoints (`ip:port`).
    pub endpoints: Vec<String>,
    /// Last reported Hostinfo, as JSON text (kept verbatim for display and routes).
    pub hostinfo: String,
    /// Home DERP region reported in NetInfo.PreferredDERP (0 = unknown).
    pub home_derp: i32,
    /// ACL tags.
    pub tags: Vec<String>,
    /// Routes an admin approved (CIDR text).
    pub approved_routes: Vec<String>,
    /// Pre-auth key used to register, if any.
    pub auth_key_id: Option<u64>,
    /// Deleted after inactivity.
    pub ephemeral: bool,
    /// Node key expiry; `None` never expires.
    pub expiry: Option<i64>,
    /// Last time the node had a live map session.
    pub last_seen: Option<i64>,
    /// Registration time.
    pub created: i64,
}

/// An API key for the REST API (headscale `types.APIKey`). The secret is never stored: only
/// its hash, compared in constant time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Primary key, never reused.
    pub id: u64,
    /// The public part shown in lists and logs, unique (the text before the `.`).
    pub prefix: String,
    /// BLAKE2s-256 of the secret part (the text after the `.`).
    pub hash: [u8; 32],
    /// Creation time.
    pub created: i64,
    /// Expiry time; `None` never expires.
    pub expiration: Option<i64>,
    /// Last time the key was used, if recorded.
    pub last_seen: Option<i64>,
}
