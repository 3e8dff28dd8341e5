//! DERP ("Designated Encrypted Relay for Packets"), protocol version 2: the TCP/TLS relay that
//! carries WireGuard and disco packets between nodes addressed by node key, used until (or
//! instead of) a direct UDP path.
//!
//! Mirrors tailscale `derp/derp.go` (spec §6). A connection is an HTTP/1.1 upgrade on `/derp`
//! (`Upgrade: DERP`, reply `101` with `Derp-Version: 2`), then frames both ways:
//!
//! ```text
//! server                                   client
//!   | --- ServerKey  (magic + server key) --> |
//!   | <-- ClientInfo (client key + box)  ---- |   box: client priv -> server pub, JSON
//!   | --- ServerInfo (box)               --> |   box: server priv -> client pub, {"version":2}
//!   | <== SendPacket / NotePreferred / Ping == |
//!   | == RecvPacket / KeepAlive / PeerGone ==> |
//! ```
//!
//! [`frame`] holds the pure wire codec. Connection handling lives in the shells: [`client`]
//! (dial/upgrade, handshake, send/recv) and, with feature `relay`, `server` (accept, bounded
//! per-client queues, forwarding, peer-gone, the embedded region).
#![forbid(unsafe_code)]

pub mod client;
pub mod frame;
#[cfg(feature = "relay")]
pub mod server;
