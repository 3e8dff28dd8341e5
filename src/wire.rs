//! Wire formats, as pure codecs (no sockets, clock or files) shared by the client and the
//! coordinator: keys, the tailcfg JSON types, the TS2021 Noise handshake and records (`noise`,
//! with the stream adapter that runs HTTP/2 over them in `noise::stream`), zstd framing, disco
//! and STUN messages, HTTP/1 heads, the one IP prefix type and the tailnet ranges (`prefix`),
//! and the ubus/blobmsg messages (`ubus`).
pub mod disco;
pub mod http1;
pub mod keys;
pub mod noise;
pub mod prefix;
pub mod stun;
pub mod tailcfg;
pub mod ubus;
pub mod zstdframe;
