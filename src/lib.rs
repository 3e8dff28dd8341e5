//! tinyscale: a Tailscale-compatible mesh VPN client, subnet router and mini-coordinator in one
//! small static binary for OpenWrt routers.
//!
//! One folder per layer, bottom up:
//! - `wire`: keys, the tailcfg types, the TS2021 Noise handshake and stream, zstd framing, disco
//!   and STUN (pure codecs), IP prefixes and the tailnet ranges (`tsaddr`), and the shells every TCP connection passes (HTTP/1 heads, TLS,
//!   listener admission);
//! - `derp`: the relay protocol (`derp::frame`, pure), its client and its server;
//! - `control`: the control client (`control::client`) and the sans-io netmap it keeps;
//! - `dataplane`: the `engine` task owning TUN, sockets (`magicsock`, `udp`), WireGuard tunnels
//!   (`wg`), the packet `filter`, MagicDNS (`dns`), routes/rules/nftables (`router`), network
//!   monitoring (`netmon`), `netcheck` and sockets kept out of the tunnel (`netns`);
//! - `daemon`: the client daemon (control session, prefs), its `ipc` socket and `metrics`;
//! - `platform`: OpenWrt glue: `uci` files, the `ubus` codec and the `ubus_object`;
//! - `coordinator` (feature): control server, SQLite store, ACL policy, admin and REST APIs,
//!   embedded DERP relay and STUN;
//! - `cli`: the command-line entry points.
//!
//! Pure modules (no sockets, clock or files; `scripts/check-purity.sh` lists them) hold the
//! protocol logic; the tokio shells around them stay thin.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod control;
#[cfg(feature = "coordinator")]
pub mod coordinator;
pub mod daemon;
pub mod dataplane;
pub mod derp;
pub mod error;
pub mod logger;
pub mod platform;
#[cfg(test)]
mod vectors;
pub mod wire;

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
