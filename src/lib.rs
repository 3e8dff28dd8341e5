//! tinyscale: a Tailscale-compatible mesh VPN client, subnet router and mini-coordinator in one
//! small static binary for OpenWrt routers.
//!
//! Layers, bottom up: pure codecs and state machines (`keys`, `noise`, `tailcfg`, `zstdframe`,
//! `stun`, `disco`, `derp::frame`, `uci`), then the control client and coordinator shells
//! (`control`, `coordinator`), then the process entry points (`daemon`, `cli`).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod error;
pub mod keys;
pub mod logger;
pub mod noise;
pub mod tailcfg;
pub mod uci;
pub mod zstdframe;
pub mod stun;
pub mod disco;
pub mod derp;
#[cfg(feature = "coordinator")]
pub mod coordinator;
