//! Wire formats and the transports that carry them, shared by the client and the coordinator:
//! keys, the tailcfg JSON types, the TS2021 Noise handshake and stream, zstd framing, disco and
//! STUN messages (pure codecs), IP prefixes and the tailnet address ranges (`tsaddr`), and the
//! small shells every TCP connection goes through (HTTP/1 heads, optional TLS, listener
//! admission).
#[cfg(feature = "relay")]
pub mod connlimit;
pub mod disco;
pub mod http1;
pub mod keys;
pub mod noise;
pub mod stun;
pub mod tailcfg;
pub mod tls;
pub mod tsaddr;
pub mod zstdframe;
