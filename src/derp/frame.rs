//! DERP frames (protocol version 2): the header, one variant per frame body, a buffering
//! [`FrameReader`], and the NaCl-boxed ClientInfo/ServerInfo handshake bodies.
//!
//! Mirrors the facts of tailscale `derp/derp.go` and `derp/derp_client.go` (spec §6.2-6.3), not
//! their code. Pure: the caller supplies nonces and keys and moves the bytes.
//!
//! ```text
//! frame:       | type (1) | length (4, BE, payload only) | payload (length) |
//!
//! 01 ServerKey     | "DERP🔑" 44 45 52 50 F0 9F 94 91 | server node pub (32) | future bytes... |
//! 02 ClientInfo    | client node pub (32) | nonce (24) | box(JSON) client priv -> server pub |
//! 03 ServerInfo    | nonce (24) | box(JSON {"version":2}) server priv -> client pub |
//! 04 SendPacket    | destination node pub (32) | packet (<= 64 KiB) |
//! 05 RecvPacket    | source node pub (32) | packet (<= 64 KiB) |
//! 06 KeepAlive     | (empty) |
//! 07 NotePreferred | 01 = this is my home DERP, 00 = not |
//! 08 PeerGone      | node pub (32) | reason: 00 disconnected, 01 not here |
//! 09 PeerPresent   | node pub (32) | [ IP (16, v4-mapped) | port (2) | [ flags (1) ] ] |
//! 0a ForwardPacket | src node pub (32) | dst node pub (32) | packet |   (mesh)
//! 10 WatchConns    | (empty) |                                        (mesh)
//! 11 ClosePeer     | node pub (32) |                                  (mesh)
//! 12 Ping          | 8 bytes to echo |
//! 13 Pong          | the same 8 bytes |
//! 14 Health        | UTF-8 problem text, empty = healthy |
//! 15 Restarting    | reconnect in ms (4, BE) | try for ms (4, BE) |
//! ```
//!
//! A box here is the NaCl box wire form: 24-byte nonce, then tag ‖ ciphertext (XSalsa20-Poly1305).
//! Unknown frame types decode to [`Frame::Unknown`] so a receive loop can skip them.
#![forbid(unsafe_code)]

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use crypto_box::{
    aead::{generic_array::GenericArray, AeadInPlace},
    PublicKey, SalsaBox, SecretKey,
};

use crate::wire::keys::{hex_decode32, hex_encode, NodePrivate, NodePublic};

/// ServerKey magic, "DERP🔑" (Go `Magic`).
pub const MAGIC: [u8; 8] = [0x44, 0x45, 0x52, 0x50, 0xF0, 0x9F, 0x94, 0x91];
/// DERP protocol version we speak (Go `ProtocolVersion`); 2 = RecvPacket carries the source key.
pub const PROTOCOL_VERSION: u32 = 2;
/// Frame header: type byte + u32 BE payload length.
pub const FRAME_HEADER_LEN: usize = 5;
/// Raw node key length.
pub const KEY_LEN: usize = 32;
/// NaCl box nonce length.
pub const NONCE_LEN: usize = 24;
/// Poly1305 tag length inside a box.
pub const TAG_LEN: usize = 16;
/// Largest packet carried in Send/Recv/ForwardPacket (Go `MaxPacketSize`, 64 KiB).
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Largest frame the Go client accepts (1 MiB); the default [`FrameReader`] limit.
pub const MAX_FRAME_SIZE: u32 = 1 << 20;
/// Largest sealed ClientInfo/ServerInfo body (Go `MaxInfoLen`, 1 MiB).
pub const MAX_INFO_LEN: usize = 1 << 20;
/// Largest ClientInfo frame the Go server reads (256 KiB); a server's handshake reader limit.
pub const MAX_CLIENT_INFO_LEN: u32 = 256 << 10;
/// Largest Ping body the Go server accepts (1000 bytes); only the first 8 are echoed.
pub const MAX_PING_LEN: usize = 1000;
/// Ping/Pong body length.
pub const PING_LEN: usize = 8;
/// Server keepalive interval (Go `KeepAlive`, 60 s; the server adds 0-5 s of jitter).
pub const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Server deadline for the whole handshake (spec §6.2).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Frame type byte (Go `FrameType` constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// S→C first frame: magic + server key.
    ServerKey = 0x01,
    /// C→S second frame: client key + sealed JSON.
    ClientInfo = 0x02,
    /// S→C third frame: sealed JSON.
    ServerInfo = 0x03,
    /// C→S packet to a peer.
    SendPacket = 0x04,
    /// S→C packet from a peer.
    RecvPacket = 0x05,
    /// S→C liveness, empty.
    KeepAlive = 0x06,
    /// C→S "this is my home region" (stats only).
    NotePreferred = 0x07,
    /// S→C a peer left or was never here.
    PeerGone = 0x08,
    /// S→C (mesh watchers) a peer connected.
    PeerPresent = 0x09,
    /// Mesh C→S packet relayed between servers.
    ForwardPacket = 0x0A,
    /// Mesh C→S subscribe to PeerPresent/PeerGone.
    WatchConns = 0x10,
    /// Mesh C→S disconnect a peer.
    ClosePeer = 0x11,
    /// Either way: 8 bytes to echo.
    Ping = 0x12,
    /// Either way: the echoed 8 bytes.
    Pong = 0x13,
    /// S→C health problem text.
    Health = 0x14,
    /// S→C server is restarting.
    Restarting = 0x15,
}

impl FrameType {
    /// The frame type for a wire byte, or `None` if unknown.
    pub fn from_u8(b: u8) -> Option<FrameType> {
        use FrameType::*;
        Some(match b {
            0x01 => ServerKey,
            0x02 => ClientInfo,
            0x03 => ServerInfo,
            0x04 => SendPacket,
            0x05 => RecvPacket,
            0x06 => KeepAlive,
            0x07 => NotePreferred,
            0x08 => PeerGone,
            0x09 => PeerPresent,
            0x0A => ForwardPacket,
            0x10 => WatchConns,
            0x11 => ClosePeer,
            0x12 => Ping,
            0x13 => Pong,
            0x14 => Health,
            0x15 => Restarting,
            _ => return None,
        })
    }
}

/// Why a frame was rejected. Any of these ends a DERP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A length above the reader limit, a packet above [`MAX_PACKET_SIZE`] or a body above its cap.
    #[error("DERP frame too large")]
    TooLarge,
    /// A body shorter than its fixed part.
    #[error("DERP frame too short")]
    TooShort,
    /// ServerKey without the `DERP🔑` magic.
    #[error("DERP server key magic missing")]
    BadMagic,
    /// A ClientInfo/ServerInfo box did not open.
    #[error("DERP info box failed to open")]
    CryptoFailed,
    /// The opened ClientInfo/ServerInfo is not the JSON object expected.
    #[error("DERP info JSON invalid")]
    BadJson,
}

/// Reason byte of a PeerGone frame (Go `PeerGoneReasonType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerGoneReason {
    /// 0x00: the peer disconnected (it had sent to us).
    Disconnected,
    /// 0x01: we sent to a peer that is not connected here.
    NotHere,
    /// Any other byte; the rs client treats these as errors, so servers must not send them.
    Other(u8),
}

impl PeerGoneReason {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            PeerGoneReason::Disconnected => 0,
            PeerGoneReason::NotHere => 1,
            PeerGoneReason::Other(b) => b,
        }
    }

    /// From the wire byte.
    pub fn from_u8(b: u8) -> Self {
        match b {
            0 => PeerGoneReason::Disconnected,
            1 => PeerGoneReason::NotHere,
            b => PeerGoneReason::Other(b),
        }
    }
}

/// PeerPresent flag: a regular client (Go `PeerPresentIsRegular`).
pub const PEER_PRESENT_IS_REGULAR: u8 = 0x01;
/// PeerPresent flag: a mesh peer.
pub const PEER_PRESENT_IS_MESH_PEER: u8 = 0x02;
/// PeerPresent flag: a prober.
pub const PEER_PRESENT_IS_PROBER: u8 = 0x04;
/// PeerPresent flag: connected to a non-ideal node.
pub const PEER_PRESENT_NOT_IDEAL: u8 = 0x08;

/// One decoded frame. Packet bodies share the reader's buffer ([`Bytes`]), so no copy is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Server's node key, first frame of a connection.
    ServerKey {
        /// The server's public key, used to seal ClientInfo.
        key: NodePublic,
    },
    /// Client's node key and sealed info; open with [`open_client_info`].
    ClientInfo {
        /// The client's node key (its address on this relay).
        key: NodePublic,
        /// Nonce ‖ box(JSON).
        sealed: Bytes,
    },
    /// Sealed server info; open with [`open_server_info`].
    ServerInfo {
        /// Nonce ‖ box(JSON).
        sealed: Bytes,
    },
    /// A packet for `dst`.
    SendPacket {
        /// Destination node key.
        dst: NodePublic,
        /// Opaque payload (WireGuard or disco).
        packet: Bytes,
    },
    /// A packet from `src`.
    RecvPacket {
        /// Source node key.
        src: NodePublic,
        /// Opaque payload.
        packet: Bytes,
    },
    /// Liveness from the server.
    KeepAlive,
    /// Whether this server is the client's home region.
    NotePreferred {
        /// True for the home region.
        preferred: bool,
    },
    /// A peer is gone.
    PeerGone {
        /// The peer's node key.
        key: NodePublic,
        /// Why (a 32-byte frame without a reason byte decodes as `Disconnected`, as Go does).
        reason: PeerGoneReason,
    },
    /// A peer connected (mesh watchers only).
    PeerPresent {
        /// The peer's node key.
        key: NodePublic,
        /// Its address as seen by the server, when sent.
        endpoint: Option<SocketAddr>,
        /// `PEER_PRESENT_*` bits, when sent (encoding them also writes an endpoint, `[::]:0` if none).
        flags: Option<u8>,
    },
    /// Mesh relay of a packet between servers.
    ForwardPacket {
        /// Original sender.
        src: NodePublic,
        /// Final destination.
        dst: NodePublic,
        /// Opaque payload.
        packet: Bytes,
    },
    /// Mesh subscription request.
    WatchConns,
    /// Mesh request to disconnect a peer.
    ClosePeer {
        /// The peer to disconnect.
        key: NodePublic,
    },
    /// Echo request (longer bodies are accepted; only 8 bytes matter).
    Ping([u8; PING_LEN]),
    /// Echo reply.
    Pong([u8; PING_LEN]),
    /// Server health problem; empty means healthy again.
    Health {
        /// Problem text (lossily decoded UTF-8).
        problem: String,
    },
    /// The server is restarting; reconnect after a while.
    Restarting {
        /// Wait this long before reconnecting.
        reconnect_in_ms: u32,
        /// Keep trying for this long.
        try_for_ms: u32,
    },
    /// A frame type this crate does not know; receive loops skip it.
    Unknown {
        /// The type byte.
        ty: u8,
        /// The raw payload.
        payload: Bytes,
    },
}

/// The 5-byte header for a frame of type `ty` with a `len`-byte payload.
pub fn header(ty: u8, len: u32) -> [u8; FRAME_HEADER_LEN] {
    let l = len.to_be_bytes();
    [ty, l[0], l[1], l[2], l[3]]
}

/// Splits a 32-byte key off the front of `b`.
fn take_key(b: &mut Bytes) -> Result<NodePublic, FrameError> {
    if b.len() < KEY_LEN {
        return Err(FrameError::TooShort);
    }
    let mut k = [0u8; KEY_LEN];
    b.copy_to_slice(&mut k);
    Ok(NodePublic(k))
}

/// The remaining bytes as a packet, capped at [`MAX_PACKET_SIZE`].
fn packet(b: Bytes) -> Result<Bytes, FrameError> {
    if b.len() > MAX_PACKET_SIZE {
        return Err(FrameError::TooLarge);
    }
    Ok(b)
}

/// The first 8 bytes of a ping/pong body.
fn ping_body(b: &[u8]) -> Result<[u8; PING_LEN], FrameError> {
    if b.len() > MAX_PING_LEN {
        return Err(FrameError::TooLarge);
    }
    b.first_chunk::<PING_LEN>().copied().ok_or(FrameError::TooShort)
}

/// A 16-byte IP (v4-mapped for IPv4) + u16 BE port, un-mapped.
fn endpoint_from(b: &[u8]) -> SocketAddr {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[..16]);
    let ip6 = Ipv6Addr::from(ip);
    let ip = ip6.to_ipv4_mapped().map_or(IpAddr::V6(ip6), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be_bytes([b[16], b[17]]))
}

/// Appends an endpoint as 16-byte IP (v4-mapped) + u16 BE port.
fn put_endpoint(out: &mut Vec<u8>, ep: &SocketAddr) {
    let ip16 = match ep.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip16.octets());
    out.extend_from_slice(&ep.port().to_be_bytes());
}

impl Frame {
    /// The type byte this frame is sent with.
    pub fn frame_type(&self) -> u8 {
        let t = match self {
            Frame::ServerKey { .. } => FrameType::ServerKey,
            Frame::ClientInfo { .. } => FrameType::ClientInfo,
            Frame::ServerInfo { .. } => FrameType::ServerInfo,
            Frame::SendPacket { .. } => FrameType::SendPacket,
            Frame::RecvPacket { .. } => FrameType::RecvPacket,
            Frame::KeepAlive => FrameType::KeepAlive,
            Frame::NotePreferred { .. } => FrameType::NotePreferred,
            Frame::PeerGone { .. } => FrameType::PeerGone,
            Frame::PeerPresent { .. } => FrameType::PeerPresent,
            Frame::ForwardPacket { .. } => FrameType::ForwardPacket,
            Frame::WatchConns => FrameType::WatchConns,
            Frame::ClosePeer { .. } => FrameType::ClosePeer,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::Health { .. } => FrameType::Health,
            Frame::Restarting { .. } => FrameType::Restarting,
            Frame::Unknown { ty, .. } => return *ty,
        };
        t as u8
    }

    /// Decodes the body of a frame of type `ty`, as yielded by [`FrameReader::next_frame`].
    ///
    /// Lenient where Go is: extra bytes after fixed-size bodies are ignored (ServerKey "future
    /// bytes", long pings), and unknown types become [`Frame::Unknown`]. Packets above
    /// [`MAX_PACKET_SIZE`] are refused.
    pub fn decode(ty: u8, mut p: Bytes) -> Result<Frame, FrameError> {
        let Some(t) = FrameType::from_u8(ty) else {
            return Ok(Frame::Unknown { ty, payload: p });
        };
        Ok(match t {
            FrameType::ServerKey => {
                if p.len() < MAGIC.len() + KEY_LEN {
                    return Err(FrameError::TooShort);
                }
                if p[..MAGIC.len()] != MAGIC {
                    return Err(FrameError::BadMagic);
                }
                p.advance(MAGIC.len());
                Frame::ServerKey { key: take_key(&mut p)? }
            }
            FrameType::ClientInfo => {
                let key = take_key(&mut p)?;
                if p.len() < NONCE_LEN + TAG_LEN {
                    return Err(FrameError::TooShort);
                }
                Frame::ClientInfo { key, sealed: p }
            }
            FrameType::ServerInfo => {
                if p.len() < NONCE_LEN + TAG_LEN {
                    return Err(FrameError::TooShort);
                }
                Frame::ServerInfo { sealed: p }
            }
            FrameType::SendPacket => {
                let dst = take_key(&mut p)?;
                Frame::SendPacket {
                    dst,
                    packet: packet(p)?,
                }
            }
            FrameType::RecvPacket => {
                let src = take_key(&mut p)?;
                Frame::RecvPacket {
                    src,
                    packet: packet(p)?,
                }
            }
            FrameType::KeepAlive => Frame::KeepAlive,
            FrameType::NotePreferred => {
                let b = *p.first().ok_or(FrameError::TooShort)?;
                Frame::NotePreferred { preferred: b != 0 }
            }
            FrameType::PeerGone => {
                let key = take_key(&mut p)?;
                let reason = p
                    .first()
                    .map_or(PeerGoneReason::Disconnected, |&b| PeerGoneReason::from_u8(b));
                Frame::PeerGone { key, reason }
            }
            FrameType::PeerPresent => {
                let key = take_key(&mut p)?;
                let endpoint = (p.len() >= 18).then(|| endpoint_from(&p));
                let flags = p.get(18).copied();
                Frame::PeerPresent { key, endpoint, flags }
            }
            FrameType::ForwardPacket => {
                let src = take_key(&mut p)?;
                let dst = take_key(&mut p)?;
                Frame::ForwardPacket {
                    src,
                    dst,
                    packet: packet(p)?,
                }
            }
            FrameType::WatchConns => Frame::WatchConns,
            FrameType::ClosePeer => Frame::ClosePeer { key: take_key(&mut p)? },
            FrameType::Ping => Frame::Ping(ping_body(&p)?),
            FrameType::Pong => Frame::Pong(ping_body(&p)?),
            FrameType::Health => Frame::Health {
                problem: String::from_utf8_lossy(&p).into_owned(),
            },
            FrameType::Restarting => {
                let b = p.first_chunk::<8>().ok_or(FrameError::TooShort)?;
                Frame::Restarting {
                    reconnect_in_ms: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                    try_for_ms: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                }
            }
        })
    }

    /// Appends the whole frame (header + payload) to `out`.
    ///
    /// The caller keeps packets within [`MAX_PACKET_SIZE`]: receivers refuse larger ones.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&header(self.frame_type(), 0));
        match self {
            Frame::ServerKey { key } => {
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(key.as_bytes());
            }
            Frame::ClientInfo { key, sealed } => {
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(sealed);
            }
            Frame::ServerInfo { sealed } => out.extend_from_slice(sealed),
            Frame::SendPacket { dst: k, packet } | Frame::RecvPacket { src: k, packet } => {
                out.extend_from_slice(k.as_bytes());
                out.extend_from_slice(packet);
            }
            Frame::KeepAlive | Frame::WatchConns => {}
            Frame::NotePreferred { preferred } => out.push(u8::from(*preferred)),
            Frame::PeerGone { key, reason } => {
                out.extend_from_slice(key.as_bytes());
                out.push(reason.to_u8());
            }
            Frame::PeerPresent { key, endpoint, flags } => {
                out.extend_from_slice(key.as_bytes());
                match (endpoint, flags) {
                    (Some(ep), _) => put_endpoint(out, ep),
                    (None, Some(_)) => out.extend_from_slice(&[0u8; 18]),
                    (None, None) => {}
                }
                if let Some(f) = flags {
                    out.push(*f);
                }
            }
            Frame::ForwardPacket { src, dst, packet } => {
                out.extend_from_slice(src.as_bytes());
                out.extend_from_slice(dst.as_bytes());
                out.extend_from_slice(packet);
            }
            Frame::ClosePeer { key } => out.extend_from_slice(key.as_bytes()),
            Frame::Ping(d) | Frame::Pong(d) => out.extend_from_slice(d),
            Frame::Health { problem } => out.extend_from_slice(problem.as_bytes()),
            Frame::Restarting {
                reconnect_in_ms,
                try_for_ms,
            } => {
                out.extend_from_slice(&reconnect_in_ms.to_be_bytes());
                out.extend_from_slice(&try_for_ms.to_be_bytes());
            }
            Frame::Unknown { payload, .. } => out.extend_from_slice(payload),
        }
        // Bodies are bounded far below 4 GiB by construction; saturate rather than wrap.
        let len = u32::try_from(out.len() - start - FRAME_HEADER_LEN).unwrap_or(u32::MAX);
        out[start + 1..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    }

    /// The whole frame as a new buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// Buffers stream bytes and yields whole frames.
///
/// Feed it with [`FrameReader::push`] or read straight into [`FrameReader::buf_mut`] (tokio
/// `read_buf`), then call [`FrameReader::next_frame`] until it returns `Ok(None)`. A length above
/// the limit is refused as soon as its header arrives, before the body is buffered; after any
/// error the connection must be closed (the reader stays stuck on the bad header).
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    max_len: u32,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader::new(MAX_FRAME_SIZE)
    }
}

impl FrameReader {
    /// A reader that refuses payloads longer than `max_len` bytes.
    pub fn new(max_len: u32) -> Self {
        FrameReader {
            buf: BytesMut::new(),
            max_len,
        }
    }

    /// Changes the limit, e.g. [`MAX_CLIENT_INFO_LEN`] during a server handshake, then
    /// [`MAX_FRAME_SIZE`].
    pub fn set_max_len(&mut self, max_len: u32) {
        self.max_len = max_len;
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The internal buffer, for reading into directly.
    pub fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame as `(type, payload)`, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<(u8, Bytes)>, FrameError> {
        let Some(h) = self.buf.first_chunk::<FRAME_HEADER_LEN>() else {
            return Ok(None);
        };
        let ty = h[0];
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        if len > self.max_len {
            return Err(FrameError::TooLarge);
        }
        // len <= max_len (a u32), which fits usize on every target we build for.
        let len = len as usize;
        if self.buf.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(FRAME_HEADER_LEN);
        Ok(Some((ty, self.buf.split_to(len).freeze())))
    }
}

/// A DERP mesh pre-shared key (32 bytes, 64 hex digits on the wire). `Debug` is redacted and
/// equality is constant-time.
#[derive(Clone, Copy, Eq)]
pub struct MeshKey(pub [u8; 32]);

impl MeshKey {
    /// Parses 64 hex digits; anything else (including rs's `"none"`) is `None`.
    pub fn from_hex(s: &str) -> Option<MeshKey> {
        hex_decode32(s).ok().map(MeshKey)
    }

    /// Lowercase hex, as sent in ClientInfo.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }
}

impl PartialEq for MeshKey {
    fn eq(&self, other: &Self) -> bool {
        // Constant-time, as Go's subtle.ConstantTimeCompare: a server compares untrusted keys.
        self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshKey(redacted)")
    }
}

/// The JSON inside ClientInfo (Go `ClientInfo`): `{"version":2,"CanAckPings":true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientInfo {
    /// Protocol version (Go sends 2; 0 = absent).
    pub version: u32,
    /// Mesh key, only for servers meshing with each other.
    pub mesh_key: Option<MeshKey>,
    /// Client answers server pings.
    pub can_ack_pings: bool,
    /// Client is a prober (monitoring).
    pub is_prober: bool,
}

/// The JSON inside ServerInfo (Go `ServerInfo`): `{"version":2}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerInfo {
    /// Protocol version; the rs client requires exactly 2.
    pub version: u32,
    /// Client send rate limit in bytes/s (0 = none).
    pub token_bucket_bytes_per_second: u32,
    /// Client send burst in bytes (0 = none).
    pub token_bucket_bytes_burst: u32,
}

/// Parses a JSON object and calls `f(key, value)` for each member. Go matches field names
/// case-insensitively, so callers compare with `eq_ignore_ascii_case`.
fn json_fields(
    json: &[u8],
    mut f: impl FnMut(&str, &serde_json::Value) -> Result<(), FrameError>,
) -> Result<(), FrameError> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|_| FrameError::BadJson)?;
    let obj = v.as_object().ok_or(FrameError::BadJson)?;
    for (k, v) in obj {
        f(k, v)?;
    }
    Ok(())
}

/// A JSON number as u32, `null` as 0 (Go leaves the zero value).
fn json_u32(v: &serde_json::Value) -> Result<u32, FrameError> {
    if v.is_null() {
        return Ok(0);
    }
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(FrameError::BadJson)
}

/// A JSON bool, `null` as false.
fn json_bool(v: &serde_json::Value) -> Result<bool, FrameError> {
    if v.is_null() {
        return Ok(false);
    }
    v.as_bool().ok_or(FrameError::BadJson)
}

impl ClientInfo {
    /// What our client sends: version 2, can ack pings.
    pub fn ours() -> ClientInfo {
        ClientInfo {
            version: PROTOCOL_VERSION,
            mesh_key: None,
            can_ack_pings: true,
            is_prober: false,
        }
    }

    /// Go's JSON form, in Go's field order; `version` and `IsProber` omitted when zero.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        if let Some(k) = &self.mesh_key {
            s.push_str(&format!("\"meshKey\":\"{}\",", k.to_hex()));
        }
        if self.version != 0 {
            s.push_str(&format!("\"version\":{},", self.version));
        }
        s.push_str(&format!("\"CanAckPings\":{}", self.can_ack_pings));
        if self.is_prober {
            s.push_str(",\"IsProber\":true");
        }
        s.push('}');
        s
    }

    /// Parses ClientInfo JSON the way Go does: names match case-insensitively and unknown keys
    /// (such as the rs client's `can_ack_pings`, `mesh_key`) are ignored. A `meshKey` that is not
    /// 64 hex digits counts as no mesh key (Go would reject the connection instead).
    pub fn from_json(json: &[u8]) -> Result<ClientInfo, FrameError> {
        let mut ci = ClientInfo::default();
        json_fields(json, |k, v| {
            if k.eq_ignore_ascii_case("version") {
                ci.version = json_u32(v)?;
            } else if k.eq_ignore_ascii_case("meshKey") {
                ci.mesh_key = v.as_str().and_then(MeshKey::from_hex);
            } else if k.eq_ignore_ascii_case("CanAckPings") {
                ci.can_ack_pings = json_bool(v)?;
            } else if k.eq_ignore_ascii_case("IsProber") {
                ci.is_prober = json_bool(v)?;
            }
            Ok(())
        })?;
        Ok(ci)
    }
}

impl ServerInfo {
    /// What our server sends: `{"version":2}`.
    pub fn ours() -> ServerInfo {
        ServerInfo {
            version: PROTOCOL_VERSION,
            ..ServerInfo::default()
        }
    }

    /// Go's JSON form; zero fields omitted.
    pub fn to_json(&self) -> String {
        let mut parts = Vec::new();
        if self.version != 0 {
            parts.push(format!("\"version\":{}", self.version));
        }
        if self.token_bucket_bytes_per_second != 0 {
            parts.push(format!(
                "\"TokenBucketBytesPerSecond\":{}",
                self.token_bucket_bytes_per_second
            ));
        }
        if self.token_bucket_bytes_burst != 0 {
            parts.push(format!("\"TokenBucketBytesBurst\":{}", self.token_bucket_bytes_burst));
        }
        format!("{{{}}}", parts.join(","))
    }

    /// Parses ServerInfo JSON (case-insensitive names, unknown keys ignored).
    pub fn from_json(json: &[u8]) -> Result<ServerInfo, FrameError> {
        let mut si = ServerInfo::default();
        json_fields(json, |k, v| {
            if k.eq_ignore_ascii_case("version") {
                si.version = json_u32(v)?;
            } else if k.eq_ignore_ascii_case("TokenBucketBytesPerSecond") {
                si.token_bucket_bytes_per_second = json_u32(v)?;
            } else if k.eq_ignore_ascii_case("TokenBucketBytesBurst") {
                si.token_bucket_bytes_burst = json_u32(v)?;
            }
            Ok(())
        })?;
        Ok(si)
    }
}

/// NaCl box `my -> peer` in wire form: nonce ‖ tag ‖ ciphertext (Go `SealTo`).
fn seal_box(my: &NodePrivate, peer: &NodePublic, nonce: [u8; NONCE_LEN], plain: &[u8]) -> Vec<u8> {
    let cipher = SalsaBox::new(&PublicKey::from(peer.0), &SecretKey::from(my.to_bytes()));
    let mut out = Vec::with_capacity(NONCE_LEN + TAG_LEN + plain.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&[0u8; TAG_LEN]);
    out.extend_from_slice(plain);
    let (head, body) = out.split_at_mut(NONCE_LEN + TAG_LEN);
    let tag = cipher
        .encrypt_in_place_detached(GenericArray::from_slice(&nonce), b"", body)
        // Fails only for non-empty associated data, and we pass none.
        .expect("XSalsa20Poly1305 without AAD cannot fail");
    head[NONCE_LEN..].copy_from_slice(&tag);
    out
}

/// Opens a [`seal_box`] body sent by `peer` to `my` (Go `OpenFrom`).
fn open_box(my: &NodePrivate, peer: &NodePublic, sealed: &[u8]) -> Result<Vec<u8>, FrameError> {
    if sealed.len() > MAX_INFO_LEN {
        return Err(FrameError::TooLarge);
    }
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(FrameError::TooShort);
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (tag, ct) = rest.split_at(TAG_LEN);
    let cipher = SalsaBox::new(&PublicKey::from(peer.0), &SecretKey::from(my.to_bytes()));
    let mut plain = ct.to_vec();
    cipher
        .decrypt_in_place_detached(
            GenericArray::from_slice(nonce),
            b"",
            &mut plain,
            GenericArray::from_slice(tag),
        )
        .map_err(|_| FrameError::CryptoFailed)?;
    Ok(plain)
}

/// Client side: the ClientInfo frame, `info` sealed from `client` to `server` with `nonce`.
pub fn seal_client_info(client: &NodePrivate, server: &NodePublic, nonce: [u8; NONCE_LEN], info: &ClientInfo) -> Frame {
    let sealed = seal_box(client, server, nonce, info.to_json().as_bytes());
    Frame::ClientInfo {
        key: client.public(),
        sealed: Bytes::from(sealed),
    }
}

/// Server side: opens a ClientInfo `sealed` body from `client` (the key in the same frame).
pub fn open_client_info(server: &NodePrivate, client: &NodePublic, sealed: &[u8]) -> Result<ClientInfo, FrameError> {
    ClientInfo::from_json(&open_box(server, client, sealed)?)
}

/// Server side: the ServerInfo frame, `info` sealed from `server` to `client` with `nonce`.
pub fn seal_server_info(server: &NodePrivate, client: &NodePublic, nonce: [u8; NONCE_LEN], info: &ServerInfo) -> Frame {
    let sealed = seal_box(server, client, nonce, info.to_json().as_bytes());
    Frame::ServerInfo {
        sealed: Bytes::from(sealed),
    }
}

/// Client side: opens a ServerInfo `sealed` body from `server` (key from the ServerKey frame).
pub fn open_server_info(client: &NodePrivate, server: &NodePublic, sealed: &[u8]) -> Result<ServerInfo, FrameError> {
    ServerInfo::from_json(&open_box(client, server, sealed)?)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::vectors::hex;

    fn k(b: u8) -> NodePublic {
        NodePublic([b; 32])
    }

    fn client_priv() -> NodePrivate {
        NodePrivate::from_random([0x44; 32])
    }
    fn server_priv() -> NodePrivate {
        NodePrivate::from_random([0x55; 32])
    }
    const NONCE: [u8; 24] = [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
    ];

    /// Encodes, checks the bytes, reads them back through a reader and decodes.
    fn check(f: Frame, want: &str) {
        let bytes = f.to_vec();
        assert_eq!(keys_hex(&bytes), keys_hex(&hex(want)), "{f:?}");
        let mut r = FrameReader::default();
        r.push(&bytes);
        let (ty, payload) = r.next_frame().unwrap().unwrap();
        assert_eq!(r.buffered(), 0);
        assert_eq!(Frame::decode(ty, payload), Ok(f));
    }

    fn keys_hex(b: &[u8]) -> String {
        hex_encode(b)
    }

    const K11: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const K22: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn frame_vectors() {
        check(
            Frame::ServerKey { key: k(0x11) },
            &format!("01 00000028 4445525 0f09f9491 {K11}"),
        );
        check(
            Frame::SendPacket {
                dst: k(0x11),
                packet: Bytes::from_static(b"hi"),
            },
            &format!("04 00000022 {K11} 6869"),
        );
        check(
            Frame::RecvPacket {
                src: k(0x22),
                packet: Bytes::from_static(b"hi"),
            },
            &format!("05 00000022 {K22} 6869"),
        );
        check(Frame::KeepAlive, "06 00000000");
        check(Frame::NotePreferred { preferred: true }, "07 00000001 01");
        check(Frame::NotePreferred { preferred: false }, "07 00000001 00");
        check(
            Frame::PeerGone {
                key: k(0x11),
                reason: PeerGoneReason::Disconnected,
            },
            &format!("08 00000021 {K11} 00"),
        );
        check(
            Frame::PeerGone {
                key: k(0x11),
                reason: PeerGoneReason::NotHere,
            },
            &format!("08 00000021 {K11} 01"),
        );
        check(
            Frame::PeerPresent {
                key: k(0x11),
                endpoint: Some("1.2.3.4:41641".parse().unwrap()),
                flags: Some(PEER_PRESENT_IS_REGULAR),
            },
            &format!("09 00000033 {K11} 00000000000000000000ffff01020304 a2a9 01"),
        );
        check(
            Frame::ForwardPacket {
                src: k(0x11),
                dst: k(0x22),
                packet: Bytes::from_static(b"x"),
            },
            &format!("0a 00000041 {K11} {K22} 78"),
        );
        check(Frame::WatchConns, "10 00000000");
        check(Frame::ClosePeer { key: k(0x22) }, &format!("11 00000020 {K22}"));
        check(Frame::Ping([1, 2, 3, 4, 5, 6, 7, 8]), "12 00000008 0102030405060708");
        check(Frame::Pong([1, 2, 3, 4, 5, 6, 7, 8]), "13 00000008 0102030405060708");
        check(Frame::Health { problem: "bad".into() }, "14 00000003 626164");
        check(
            Frame::Restarting {
                reconnect_in_ms: 1000,
                try_for_ms: 60000,
            },
            "15 00000008 000003e8 0000ea60",
        );
        check(
            Frame::Unknown {
                ty: 0x7f,
                payload: Bytes::from_static(b"?"),
            },
            "7f 00000001 3f",
        );
    }

    #[test]
    fn decode_leniency_and_limits() {
        let d = |ty: FrameType, b: &[u8]| Frame::decode(ty as u8, Bytes::copy_from_slice(b));
        // ServerKey: future bytes allowed; wrong magic and short refused.
        let mut sk = MAGIC.to_vec();
        sk.extend_from_slice(&[0x11; 32]);
        sk.extend_from_slice(b"future");
        assert_eq!(d(FrameType::ServerKey, &sk), Ok(Frame::ServerKey { key: k(0x11) }));
        sk[0] = b'X';
        assert_eq!(d(FrameType::ServerKey, &sk), Err(FrameError::BadMagic));
        assert_eq!(d(FrameType::ServerKey, &sk[..39]), Err(FrameError::TooShort));
        // PeerGone without a reason byte is "disconnected" (Go); an unknown reason is kept.
        assert_eq!(
            d(FrameType::PeerGone, &[0x11; 32]),
            Ok(Frame::PeerGone {
                key: k(0x11),
                reason: PeerGoneReason::Disconnected
            })
        );
        let mut pg = vec![0x11; 32];
        pg.push(0xF0);
        assert_eq!(
            d(FrameType::PeerGone, &pg),
            Ok(Frame::PeerGone {
                key: k(0x11),
                reason: PeerGoneReason::Other(0xF0)
            })
        );
        assert_eq!(d(FrameType::PeerGone, &[0x11; 31]), Err(FrameError::TooShort));
        // PeerPresent: bare key (old servers) or with endpoint only.
        assert_eq!(
            d(FrameType::PeerPresent, &[0x11; 32]),
            Ok(Frame::PeerPresent {
                key: k(0x11),
                endpoint: None,
                flags: None
            })
        );
        // Packets: a 64 KiB packet passes, one byte more is refused.
        let mut sp = vec![0x11; 32];
        sp.resize(32 + MAX_PACKET_SIZE, 0);
        assert!(d(FrameType::SendPacket, &sp).is_ok());
        sp.push(0);
        assert_eq!(d(FrameType::SendPacket, &sp), Err(FrameError::TooLarge));
        assert_eq!(d(FrameType::RecvPacket, &[0; 31]), Err(FrameError::TooShort));
        // Ping: long bodies echo their first 8 bytes, up to Go's 1000-byte cap.
        let mut ping = (1..=8).collect::<Vec<u8>>();
        ping.extend_from_slice(&[9; 100]);
        assert_eq!(d(FrameType::Ping, &ping), Ok(Frame::Ping([1, 2, 3, 4, 5, 6, 7, 8])));
        assert_eq!(d(FrameType::Ping, &[0; 7]), Err(FrameError::TooShort));
        assert_eq!(d(FrameType::Pong, &[0; 1001]), Err(FrameError::TooLarge));
        assert_eq!(d(FrameType::NotePreferred, &[]), Err(FrameError::TooShort));
        assert_eq!(d(FrameType::ClientInfo, &[0; 32 + 39]), Err(FrameError::TooShort));
        assert_eq!(d(FrameType::ServerInfo, &[0; 39]), Err(FrameError::TooShort));
        assert_eq!(d(FrameType::Restarting, &[0; 7]), Err(FrameError::TooShort));
        // Every known type byte maps back to itself.
        for b in 0..=255u8 {
            if let Some(t) = FrameType::from_u8(b) {
                assert_eq!(t as u8, b);
            }
        }
    }

    #[test]
    fn reader_partial_chunks_and_oversize() {
        let a = Frame::SendPacket {
            dst: k(0x11),
            packet: Bytes::from_static(b"hello"),
        };
        let b = Frame::KeepAlive;
        let c = Frame::Ping(*b"12345678");
        let mut stream = a.to_vec();
        stream.extend(b.to_vec());
        stream.extend(c.to_vec());
        // Byte by byte: frames appear exactly when complete.
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        for &byte in &stream {
            r.push(&[byte]);
            while let Some((ty, p)) = r.next_frame().unwrap() {
                got.push(Frame::decode(ty, p).unwrap());
            }
        }
        assert_eq!(got, vec![a.clone(), b, c]);
        assert_eq!(r.buffered(), 0);
        // Header split across pushes.
        let mut r = FrameReader::default();
        r.push(&stream[..3]);
        assert_eq!(r.next_frame(), Ok(None));
        r.buf_mut().extend_from_slice(&stream[3..10]);
        assert_eq!(r.next_frame(), Ok(None));
        r.push(&stream[10..]);
        assert_eq!(
            r.next_frame().unwrap().map(|(t, _)| t),
            Some(FrameType::SendPacket as u8)
        );
        // Oversize is refused from the header alone, and stays refused.
        let mut r = FrameReader::new(1024);
        r.push(&header(FrameType::SendPacket as u8, 1025));
        assert_eq!(r.next_frame(), Err(FrameError::TooLarge));
        assert_eq!(r.next_frame(), Err(FrameError::TooLarge));
        let mut r = FrameReader::default();
        r.push(&header(FrameType::RecvPacket as u8, MAX_FRAME_SIZE + 1));
        assert_eq!(r.next_frame(), Err(FrameError::TooLarge));
        r.set_max_len(u32::MAX);
        assert_eq!(r.next_frame(), Ok(None));
    }

    /// ClientInfo sealed with fixed keys and nonce; box bytes computed independently with PyNaCl
    /// (`Box(client_priv, server_pub).encrypt(json, nonce)`).
    #[test]
    fn client_info_sealed_vector() {
        let (c, s) = (client_priv(), server_priv());
        assert_eq!(ClientInfo::ours().to_json(), r#"{"version":2,"CanAckPings":true}"#);
        let f = seal_client_info(&c, &s.public(), NONCE, &ClientInfo::ours());
        let want = hex(
            "02 00000068                                                          # ClientInfo, 104 bytes
             ff2ee45601ec1b67310c7790404585ae697331eee1c1f8cf2419731c1fff3e6b     # client node pub
             000102030405060708090a0b0c0d0e0f1011121314151617                     # nonce
             1ec4283755d5511a434629c987ee474c                                     # tag
             265b8552c20a3da8cedeb142bf918ca1059e728095785edc65a3fda96c0a868c     # box(JSON)",
        );
        assert_eq!(keys_hex(&f.to_vec()), keys_hex(&want));
        let Frame::ClientInfo { key, sealed } = f else { panic!() };
        assert_eq!(key, c.public());
        assert_eq!(open_client_info(&s, &key, &sealed), Ok(ClientInfo::ours()));
        // Wrong server key or tampered box.
        let other = NodePrivate::from_random([0x66; 32]);
        assert_eq!(open_client_info(&other, &key, &sealed), Err(FrameError::CryptoFailed));
        let mut t = sealed.to_vec();
        t[30] ^= 1;
        assert_eq!(open_client_info(&s, &key, &t), Err(FrameError::CryptoFailed));
        assert_eq!(open_client_info(&s, &key, &t[..39]), Err(FrameError::TooShort));
    }

    /// ServerInfo sealed with fixed keys and nonce (PyNaCl, as above).
    #[test]
    fn server_info_sealed_vector() {
        let (c, s) = (client_priv(), server_priv());
        assert_eq!(ServerInfo::ours().to_json(), r#"{"version":2}"#);
        let f = seal_server_info(&s, &c.public(), NONCE, &ServerInfo::ours());
        let want = hex(
            "03 00000035                                                          # ServerInfo, 53 bytes
             000102030405060708090a0b0c0d0e0f1011121314151617                     # nonce
             e39c0b9bc44bba9e6e890b11a8da4b93                                     # tag
             265b8552c20a3da8cedeb142ee                                           # box({\"version\":2})",
        );
        assert_eq!(keys_hex(&f.to_vec()), keys_hex(&want));
        let Frame::ServerInfo { sealed } = f else { panic!() };
        assert_eq!(open_server_info(&c, &s.public(), &sealed), Ok(ServerInfo::ours()));
        let other = NodePrivate::from_random([0x66; 32]);
        assert_eq!(
            open_server_info(&other, &s.public(), &sealed),
            Err(FrameError::CryptoFailed)
        );
    }

    /// The rs client's snake_case ClientInfo, sealed by PyNaCl: opens, and `mesh_key:"none"` is
    /// no mesh key.
    #[test]
    fn rs_client_info_is_accepted() {
        let sealed = hex(
            "070707070707070707070707070707070707070707070707a9f5f877d445996d7cab5396cb4035e5b362
             03498d7dfecc8461222c52424e8e560420c74d1b382b302fff78a3bb594b8ddf190f10ca10c59d50ee09
             4f6b9439914a5d67b85cd35158eae21598c48ee9ba9392d6cd0194",
        );
        let got = open_client_info(&server_priv(), &client_priv().public(), &sealed).unwrap();
        assert_eq!(
            got,
            ClientInfo {
                version: 2,
                mesh_key: None,
                can_ack_pings: false,
                is_prober: false
            }
        );
    }

    #[test]
    fn info_json_rules() {
        let mk = "ab".repeat(32);
        let ci = ClientInfo::from_json(
            format!(r#"{{"MESHKEY":"{mk}","Version":2,"canackpings":true,"isProber":true,"AppName":"x","extra":[1]}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(ci.version, 2);
        assert_eq!(ci.mesh_key, Some(MeshKey([0xab; 32])));
        assert!(ci.can_ack_pings && ci.is_prober);
        assert_eq!(ClientInfo::from_json(ci.to_json().as_bytes()), Ok(ci));
        assert!(ci.to_json().starts_with(&format!(r#"{{"meshKey":"{mk}","version":2,"#)));
        assert!(!format!("{ci:?}").contains("abab"));
        assert_eq!(ClientInfo::from_json(br#"{"meshKey":"none"}"#).unwrap().mesh_key, None);
        assert_eq!(ClientInfo::from_json(br#"{"version":null}"#).unwrap().version, 0);
        assert_eq!(ClientInfo::from_json(b"[]"), Err(FrameError::BadJson));
        assert_eq!(ClientInfo::from_json(b"{"), Err(FrameError::BadJson));
        assert_eq!(ClientInfo::from_json(br#"{"version":"2"}"#), Err(FrameError::BadJson));
        assert_eq!(ClientInfo::from_json(br#"{"CanAckPings":1}"#), Err(FrameError::BadJson));
        let si = ServerInfo {
            version: 2,
            token_bucket_bytes_per_second: 1000,
            token_bucket_bytes_burst: 5,
        };
        assert_eq!(
            si.to_json(),
            r#"{"version":2,"TokenBucketBytesPerSecond":1000,"TokenBucketBytesBurst":5}"#
        );
        assert_eq!(ServerInfo::from_json(si.to_json().as_bytes()), Ok(si));
        assert_eq!(ServerInfo::from_json(br#"{"version":-1}"#), Err(FrameError::BadJson));
        assert_eq!(MeshKey([1; 32]), MeshKey([1; 32]));
        assert_ne!(MeshKey([1; 32]), MeshKey([2; 32]));
    }

    fn arb_key() -> impl Strategy<Value = NodePublic> {
        any::<[u8; 32]>().prop_map(NodePublic)
    }

    fn arb_packet() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
    }

    fn arb_endpoint() -> impl Strategy<Value = SocketAddr> {
        (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            SocketAddr::new(ip, port)
        })
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            arb_key().prop_map(|key| Frame::ServerKey { key }),
            (arb_key(), proptest::collection::vec(any::<u8>(), 40..200))
                .prop_map(|(key, s)| { Frame::ClientInfo { key, sealed: s.into() } }),
            proptest::collection::vec(any::<u8>(), 40..200).prop_map(|s| Frame::ServerInfo { sealed: s.into() }),
            (arb_key(), arb_packet()).prop_map(|(dst, packet)| Frame::SendPacket { dst, packet }),
            (arb_key(), arb_packet()).prop_map(|(src, packet)| Frame::RecvPacket { src, packet }),
            Just(Frame::KeepAlive),
            any::<bool>().prop_map(|preferred| Frame::NotePreferred { preferred }),
            (arb_key(), any::<u8>()).prop_map(|(key, r)| Frame::PeerGone {
                key,
                reason: PeerGoneReason::from_u8(r)
            }),
            (
                arb_key(),
                proptest::option::of((arb_endpoint(), proptest::option::of(any::<u8>())))
            )
                .prop_map(|(key, rest)| Frame::PeerPresent {
                    key,
                    endpoint: rest.map(|r| r.0),
                    flags: rest.and_then(|r| r.1),
                }),
            (arb_key(), arb_key(), arb_packet()).prop_map(|(src, dst, packet)| Frame::ForwardPacket {
                src,
                dst,
                packet
            }),
            Just(Frame::WatchConns),
            arb_key().prop_map(|key| Frame::ClosePeer { key }),
            any::<[u8; 8]>().prop_map(Frame::Ping),
            any::<[u8; 8]>().prop_map(Frame::Pong),
            ".{0,40}".prop_map(|problem| Frame::Health { problem }),
            (any::<u32>(), any::<u32>()).prop_map(|(reconnect_in_ms, try_for_ms)| {
                Frame::Restarting {
                    reconnect_in_ms,
                    try_for_ms,
                }
            }),
            (0x16u8.., arb_packet()).prop_map(|(ty, payload)| Frame::Unknown { ty, payload }),
        ]
    }

    proptest! {
        #[test]
        fn prop_frame_roundtrip_through_reader(frames in proptest::collection::vec(arb_frame(), 1..6), cut in 1usize..64) {
            let mut stream = Vec::new();
            for f in &frames {
                f.encode(&mut stream);
            }
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(cut) {
                r.push(chunk);
                while let Some((ty, p)) = r.next_frame().unwrap() {
                    got.push(Frame::decode(ty, p).unwrap());
                }
            }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn prop_info_seal_open(ci_ver in any::<u32>(), ack in any::<bool>(), prober in any::<bool>(),
                               mesh in proptest::option::of(any::<[u8; 32]>()), nonce in any::<[u8; 24]>()) {
            let (c, s) = (client_priv(), server_priv());
            let ci = ClientInfo { version: ci_ver, mesh_key: mesh.map(MeshKey), can_ack_pings: ack, is_prober: prober };
            let Frame::ClientInfo { key, sealed } = seal_client_info(&c, &s.public(), nonce, &ci) else {
                panic!("not ClientInfo");
            };
            prop_assert_eq!(open_client_info(&s, &key, &sealed), Ok(ci));
            let si = ServerInfo { version: ci_ver, token_bucket_bytes_per_second: ci_ver / 2, token_bucket_bytes_burst: 7 };
            let Frame::ServerInfo { sealed } = seal_server_info(&s, &c.public(), nonce, &si) else {
                panic!("not ServerInfo");
            };
            prop_assert_eq!(open_server_info(&c, &s.public(), &sealed), Ok(si));
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), limit in 0u32..512) {
            let mut r = FrameReader::new(limit);
            r.push(&bytes);
            while let Ok(Some((ty, p))) = r.next_frame() {
                let _ = Frame::decode(ty, p);
            }
            for ty in 0..=0x16u8 {
                let _ = Frame::decode(ty, Bytes::copy_from_slice(&bytes));
            }
            let _ = open_client_info(&server_priv(), &client_priv().public(), &bytes);
            let _ = open_server_info(&client_priv(), &server_priv().public(), &bytes);
            let _ = ClientInfo::from_json(&bytes);
            let _ = ServerInfo::from_json(&bytes);
        }
    }
}
