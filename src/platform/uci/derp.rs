//! The DERP relay's settings (headscale `derp.*`): whether the coordinator runs the embedded
//! relay, its region, its STUN listener and where other DERP maps come from. The values are read
//! from the `derp_*` options of the coordinator's uci section (`coordinator::config`); the relay
//! itself (`derp::server`) only needs this type.
//!
//! Pure: plain data with headscale's defaults.
#![forbid(unsafe_code)]

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

/// DERP settings (headscale `derp.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerpConfig {
    /// Run the embedded DERP relay (`derp_server_enabled`, default off).
    pub server_enabled: bool,
    /// Region id of the embedded relay (`derp_server_region_id`, default 999).
    pub server_region_id: i32,
    /// Region code (`derp_server_region_code`, default `headscale`).
    pub server_region_code: String,
    /// Region name (`derp_server_region_name`, default `Headscale Embedded DERP`).
    pub server_region_name: String,
    /// STUN UDP listen address (`derp_server_stun_listen_addr`, default `0.0.0.0:3478`).
    pub server_stun_listen_addr: SocketAddr,
    /// Only relay for nodes of this tailnet (`derp_server_verify_clients`, default on).
    pub server_verify_clients: bool,
    /// Public IPv4 address pinned in the embedded region's node (`derp_server_ipv4`, headscale
    /// `derp.server.ipv4`; default none: clients use `HostName`).
    pub server_ipv4: Option<Ipv4Addr>,
    /// Public IPv6 address pinned likewise (`derp_server_ipv6`, headscale `derp.server.ipv6`).
    pub server_ipv6: Option<Ipv6Addr>,
    /// URLs of JSON DERP maps to fetch (`list derp_url`, default none).
    pub urls: Vec<String>,
    /// Local JSON DERP map files (`list derp_path`, default none).
    pub paths: Vec<PathBuf>,
}

impl Default for DerpConfig {
    fn default() -> Self {
        DerpConfig {
            server_enabled: false,
            server_region_id: 999,
            server_region_code: "headscale".to_owned(),
            server_region_name: "Headscale Embedded DERP".to_owned(),
            server_stun_listen_addr: SocketAddr::from(([0, 0, 0, 0], 3478)),
            server_verify_clients: true,
            server_ipv4: None,
            server_ipv6: None,
            urls: Vec::new(),
            paths: Vec::new(),
        }
    }
}
