//! tinyscale: a Tailscale-compatible mesh VPN client, subnet router and mini-coordinator in one
//! small static binary for OpenWrt routers.
//!
//! One folder per layer, bottom up (each folder's `NAME.rs` beside it says what it is for):
//! - `wire`: codecs, pure: keys, the tailcfg types, the TS2021 Noise handshake (and the stream
//!   that carries HTTP/2 over it), zstd framing, disco, STUN, HTTP/1 heads, the one IP prefix
//!   type with the tailnet ranges (`wire::prefix`), and ubus/blobmsg messages;
//! - `derp`: the relay protocol (`derp::frame`, pure), its client and (feature `relay`) server;
//! - `control`: the control client (`control::client`) and the sans-io netmap it keeps;
//! - `dataplane`: the `engine` task owning TUN, sockets (`magicsock`, `udp`), WireGuard tunnels
//!   (`wg`), the packet `filter`, MagicDNS (`dns`), routes/rules/nftables
//!   (planned in `routes`, run by `apply`), network
//!   monitoring (`netmon`), `netcheck` and sockets kept out of the tunnel (`netns`);
//! - `platform`: the glue to the system around it: `uci` (the syntax and one schema per
//!   component), the `ubus_object`, the local API socket (`ipc`), `tls`, listener admission
//!   (`connlimit`), the Prometheus text (`metrics`), the `logger` and the login QR code (`qr`);
//! - `coordinator` (feature): control server, SQLite store, ACL policy, admin and REST APIs,
//!   embedded DERP relay and STUN;
//! - at the top, the shells: the client `daemon` (control session, prefs, state file) and the
//!   `cli` entry points.
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
