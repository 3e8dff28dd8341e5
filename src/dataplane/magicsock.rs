//! magicsock: how packets to a peer find their way, directly over UDP or relayed through DERP.
//!
//! Mirrors the concepts of tailscale `wgengine/magicsock` (spec §7), split sans-io style:
//! [`demux`] sorts a received datagram into STUN, disco or WireGuard; [`endpoint`] holds one
//! peer's path state (candidates, pings, pongs, best address, trust window, DERP fallback) and
//! says where each packet goes; [`addr`] knows address families and which of our addresses to
//! publish. The sockets ([`socket`], one per family), DERP clients, sealing and the clock live
//! in the data-plane shell ([`crate::dataplane::engine`]), which feeds these cores `now` and fresh
//! transaction ids. The pure modules each forbid `unsafe`; `socket` needs it for socket
//! options.

pub mod addr;
pub mod batch;
pub mod demux;
pub mod endpoint;
pub mod socket;
