//! tinyscale: a Tailscale-compatible mesh VPN client, subnet router and mini-coordinator in one
//! small static binary for OpenWrt routers.
//!
//! Layers, bottom up:
//! - pure codecs and state machines (no sockets, clock or files): `keys`, `noise`, `tailcfg`,
//!   `zstdframe`, `stun`, `disco`, `derp::frame`, `magicsock::{demux, endpoint, addr}`,
//!   `control::netmap`, `filter`, `dns`, `netmon::rtnl`, `ubus` (messages, `ubus::blobmsg`), `uci`,
//!   `metrics`;
//! - the network shells around them: `http1`, `tls`, `udp`, `control::client`, `derp::{client,
//!   server}`, `netcheck`, `magicsock::socket`, `tun`, `wg` (boringtun tunnels), `router` (routes,
//!   rules, nftables), `connlimit`;
//! - the data plane `engine` (one task owning TUN, sockets, tunnels, DERP and MagicDNS), the
//!   client `daemon` (control session, prefs, the `ipc` socket and the `ubus_object`), the
//!   optional `coordinator` (control server, SQLite store, ACL policy, admin API, embedded DERP
//!   relay and STUN), and the `cli` entry points.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
#[cfg(feature = "relay")]
pub mod connlimit;
pub mod control;
#[cfg(feature = "coordinator")]
pub mod coordinator;
pub mod daemon;
pub mod derp;
pub mod disco;
pub mod dns;
pub mod engine;
pub mod error;
pub mod filter;
pub mod http1;
pub mod ipc;
pub mod keys;
pub mod logger;
pub mod magicsock;
pub mod metrics;
pub mod netcheck;
pub mod netmon;
pub mod netns;
pub mod noise;
pub mod qr;
pub mod router;
pub mod stun;
pub mod tailcfg;
pub mod tls;
pub mod tun;
pub mod ubus;
pub mod ubus_object;
pub mod uci;
pub mod udp;
#[cfg(test)]
mod vectors;
pub mod wg;
pub mod zstdframe;

/// Release version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Optional parts compiled into this binary.
pub const FEATURES: &[&str] = &[
    "client",
    #[cfg(feature = "relay")]
    "relay",
    #[cfg(feature = "coordinator")]
    "coordinator",
];

/// Resolves on SIGTERM (procd stop) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
