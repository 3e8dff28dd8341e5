//! DERP client shell: the `Upgrade: DERP` HTTP request, the ServerKey → ClientInfo → ServerInfo
//! handshake, then packets both ways, generic over the byte stream (plain TCP or TLS).
//!
//! Mirrors the facts of tailscale `derp/derp_client.go` and `derp/derphttp/derphttp_client.go`
//! (spec §6.1-6.3), not their code. The wire codec is [`super::frame`]; this file only moves bytes.
//!
//! ```text
//! connect      ──► TCP/TLS ──► upgrade(): "GET /derp" + Upgrade: DERP ──► 101
//!              ──► DerpClient::handshake(): ServerKey ◄─ │ ─► ClientInfo │ ServerInfo ◄─
//!              ──► send() / note_preferred() / send_ping()   and   recv() -> DerpEvent
//! ```
//!
//! The caller's duties:
//! * drive [`DerpClient::recv`] continuously: it answers the server's pings and reports a dead
//!   connection (no frame for [`READ_TIMEOUT`], the Go client's value). `recv` and the send
//!   methods all take `&mut self`; run them from one `select!` loop. Every method is cancel-safe:
//!   partial reads stay in the frame reader and unwritten bytes in the write buffer, so a
//!   cancelled call loses nothing and the next call carries on.
//! * reconnect: one `DerpClient` is one connection. When a method fails the connection is done;
//!   [`Error::is_retryable`] says whether a new one may work and [`Backoff`] spaces the attempts
//!   (Go magicsock reconnects with backoff capped at 10 s).
//! * TLS: real regions only speak TLS (certificate checked for the node's `HostName`); plain
//!   HTTP is for loopback tests and for `TS_DEBUG_USE_DERP_HTTP=1` (see [`crate::platform::tls`]).
#![forbid(unsafe_code)]

use std::{fmt, io, time::Duration};

use bytes::Bytes;
use rand_core::{OsRng, RngCore};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::frame::{
    self, ClientInfo, Frame, FrameError, FrameReader, FrameType, PeerGoneReason, ServerInfo, KEY_LEN, MAX_PACKET_SIZE,
};
use crate::{
    platform::tls::{self, Stream},
    wire::{
        http1,
        keys::{NodePrivate, NodePublic},
    },
};

/// Budget for the TCP dial, and separately for upgrade + handshake (Go: 10 s each).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// No frame for this long means the connection is dead (Go derphttp read timeout, 120 s; the
/// server sends a KeepAlive every 60-65 s).
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// How much buffer space each socket read may fill.
const READ_CHUNK: usize = 16 * 1024;

/// What the client was doing when it failed (for logs and [`Error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// TCP connect.
    Dial,
    /// The TLS handshake (certificate verification included).
    Tls,
    /// The HTTP upgrade request and its 101 answer.
    Upgrade,
    /// ServerKey / ClientInfo / ServerInfo.
    Handshake,
    /// Reading frames after the handshake.
    Recv,
    /// Writing frames after the handshake.
    Send,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Dial => "dial",
            Op::Tls => "tls",
            Op::Upgrade => "upgrade",
            Op::Handshake => "handshake",
            Op::Recv => "recv",
            Op::Send => "send",
        })
    }
}

/// A DERP client failure. Everything except [`Error::PacketTooLarge`] ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket failed.
    #[error("DERP {op}: {err}")]
    Io {
        /// What we were doing.
        op: Op,
        /// The socket error.
        err: io::Error,
    },
    /// No progress within the op's deadline.
    #[error("DERP {0} timed out")]
    Timeout(Op),
    /// The server closed the connection (during the handshake this usually means it refused
    /// our key, e.g. verify-clients).
    #[error("DERP server closed the connection during {0}")]
    Closed(Op),
    /// The server answered the upgrade with something other than 101.
    #[error("DERP upgrade refused: HTTP {0}")]
    Status(u16),
    /// The server sent something the protocol does not allow there.
    #[error("DERP protocol error during {op}: {what}")]
    Protocol {
        /// What we were doing.
        op: Op,
        /// What was wrong.
        what: &'static str,
    },
    /// A frame failed to parse (bad length, body or box).
    #[error("DERP {op}: {err}")]
    Frame {
        /// What we were doing.
        op: Op,
        /// The codec error.
        err: FrameError,
    },
    /// A packet above [`MAX_PACKET_SIZE`] was not sent; the connection is still usable.
    #[error("DERP packet of {0} bytes exceeds the 64 KiB limit")]
    PacketTooLarge(usize),
}

impl Error {
    /// True when a new connection may succeed (network trouble, restarts, a confused server);
    /// false for answers that will not change by retrying (e.g. 404: no DERP at that URL) and
    /// for caller errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { .. } | Error::Timeout(_) | Error::Closed(_) | Error::Protocol { .. } | Error::Frame { .. } => {
                true
            }
            Error::Status(s) => *s >= 500 || *s == 429 || *s == 408,
            Error::PacketTooLarge(_) => false,
        }
    }

    fn io(op: Op) -> impl FnOnce(io::Error) -> Error {
        // A TLS peer that goes away without close_notify is just a closed connection.
        move |err| match err.kind() {
            io::ErrorKind::UnexpectedEof => Error::Closed(op),
            _ => Error::Io { op, err },
        }
    }
}

/// What [`DerpClient::recv`] yields. Server pings are answered inside `recv` and not reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerpEvent {
    /// A packet relayed from `src` (WireGuard or disco, opaque here).
    Packet {
        /// Sender's node key.
        src: NodePublic,
        /// The packet.
        data: Bytes,
    },
    /// A peer left this server (`Disconnected`, after it had sent to us) or was never here
    /// (`NotHere`, after we sent it a disco packet).
    PeerGone {
        /// The peer.
        key: NodePublic,
        /// Why.
        reason: PeerGoneReason,
    },
    /// Server liveness (every 60-65 s).
    KeepAlive,
    /// Answer to our [`DerpClient::send_ping`].
    Pong([u8; frame::PING_LEN]),
    /// Server health text; empty means healthy again.
    Health {
        /// The problem, or empty.
        problem: String,
    },
    /// The server is restarting: reconnect after `reconnect_in`, keep trying for `try_for`.
    Restarting {
        /// Wait this long first.
        reconnect_in: Duration,
        /// Then keep trying this long.
        try_for: Duration,
    },
}

/// Where and how to reach one DERP node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    /// Resolved addresses of the node, tried in order.
    pub addrs: Vec<std::net::SocketAddr>,
    /// Name for SNI, certificate verification and the `Host` header (the node's `HostName`).
    pub host: String,
    /// TLS (the normal case) or plain HTTP.
    pub tls: bool,
}

/// Dials `host_port` over plain TCP, upgrades `path` (normally `/derp`) and runs the handshake
/// as `my`. Each phase has [`DIAL_TIMEOUT`].
pub async fn connect_http(host_port: &str, path: &str, my: &NodePrivate) -> Result<DerpClient<Stream>, Error> {
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::lookup_host(host_port)).await {
            Ok(r) => r.map_err(Error::io(Op::Dial))?.collect(),
            Err(_) => return Err(Error::Timeout(Op::Dial)),
        };
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let d = Dial {
        addrs,
        host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
        tls: false,
    };
    connect(&d, path, my).await
}

/// Dials `d` (its addresses in order until one connects, within one [`DIAL_TIMEOUT`]), runs TLS
/// when asked, upgrades `path` (normally `/derp`) and runs the handshake as `my`. The TLS
/// handshake and upgrade + DERP handshake each have [`DIAL_TIMEOUT`] too.
pub async fn connect(d: &Dial, path: &str, my: &NodePrivate) -> Result<DerpClient<Stream>, Error> {
    let mut sock = dial(d).await?;
    let work = async {
        let leftover = upgrade(&mut sock, &d.host_header(), path).await?;
        DerpClient::handshake(sock, &leftover, my).await
    };
    match tokio::time::timeout(DIAL_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout(Op::Handshake)),
    }
}

/// The round trip of one `GET /derp/latency-check` on a fresh connection to `d` (connection and
/// TLS set-up excluded): Go netcheck's way of ranking regions when UDP is blocked. The whole
/// call is bounded by `budget`.
pub async fn latency_check(d: &Dial, budget: Duration) -> Result<Duration, Error> {
    let work = async {
        let mut sock = dial(d).await?;
        let req = format!(
            "GET /derp/latency-check HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            d.host_header()
        );
        let start = std::time::Instant::now();
        sock.write_all(req.as_bytes()).await.map_err(Error::io(Op::Upgrade))?;
        sock.flush().await.map_err(Error::io(Op::Upgrade))?;
        let (head, _) = http1::read_head(&mut sock).await.map_err(|e| match e {
            http1::HttpError::Io(err) => Error::Io { op: Op::Upgrade, err },
            _ => Error::Closed(Op::Upgrade),
        })?;
        let rtt = start.elapsed();
        if head.status != 200 {
            return Err(Error::Status(head.status));
        }
        Ok(rtt)
    };
    tokio::time::timeout(budget, work)
        .await
        .unwrap_or(Err(Error::Timeout(Op::Upgrade)))
}

impl Dial {
    /// `Host` header value: the host name, bracketed if an IPv6 literal.
    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// Head start of each address over the next in [`connect_staggered`].
const DIAL_STAGGER: Duration = Duration::from_millis(250);

/// Connects to the first of `addrs` that answers: each attempt starts [`DIAL_STAGGER`] after the
/// previous one (or at once when it failed), and the first connection wins, so an address that
/// silently drops packets (a broken IPv4 or IPv6 path) costs a quarter second, not the budget.
async fn connect_staggered(addrs: &[std::net::SocketAddr]) -> io::Result<TcpStream> {
    let mut pending = addrs.iter().copied();
    let mut set = tokio::task::JoinSet::new();
    let mut last_err = None;
    loop {
        if let Some(a) = pending.next() {
            set.spawn(crate::dataplane::netns::connect(a));
        }
        if set.is_empty() {
            return Err(last_err.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address to dial")));
        }
        let more = pending.len() > 0;
        let next = tokio::select! {
            r = set.join_next() => r,
            _ = tokio::time::sleep(DIAL_STAGGER), if more => continue,
        };
        match next {
            Some(Ok(Ok(s))) => return Ok(s),
            Some(Ok(Err(e))) => last_err = Some(e),
            _ => {}
        }
    }
}

/// TCP to the first of `d.addrs` that answers, then TLS when asked; each bounded by
/// [`DIAL_TIMEOUT`].
async fn dial(d: &Dial) -> Result<Stream, Error> {
    let tcp = match tokio::time::timeout(DIAL_TIMEOUT, connect_staggered(&d.addrs)).await {
        Ok(r) => r.map_err(Error::io(Op::Dial))?,
        Err(_) => return Err(Error::Timeout(Op::Dial)),
    };
    // DERP is latency-sensitive small packets; Go sets TCP_NODELAY too.
    let _ = tcp.set_nodelay(true);
    if !d.tls {
        return Ok(Stream::Plain(tcp));
    }
    match tokio::time::timeout(DIAL_TIMEOUT, tls::client_handshake(tcp, &d.host)).await {
        Ok(r) => r.map_err(Error::io(Op::Tls)),
        Err(_) => Err(Error::Timeout(Op::Tls)),
    }
}

/// Sends the upgrade request for `path` with `Host: host` and waits for `101`. Returns the bytes
/// that arrived after the response head (the start of the DERP stream).
pub async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, host: &str, path: &str) -> Result<Vec<u8>, Error> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n");
    io.write_all(req.as_bytes()).await.map_err(Error::io(Op::Upgrade))?;
    io.flush().await.map_err(Error::io(Op::Upgrade))?;
    let (head, leftover) = http1::read_head(io).await.map_err(|e| match e {
        http1::HttpError::Io(err) => Error::Io { op: Op::Upgrade, err },
        http1::HttpError::Closed => Error::Closed(Op::Upgrade),
        http1::HttpError::Malformed | http1::HttpError::TooLarge | http1::HttpError::BadTarget(_) => Error::Protocol {
            op: Op::Upgrade,
            what: "malformed HTTP response",
        },
    })?;
    if head.status != 101 {
        return Err(Error::Status(head.status));
    }
    Ok(leftover)
}

/// One DERP connection after the HTTP upgrade. See the module doc for the caller's duties.
pub struct DerpClient<S> {
    io: S,
    reader: FrameReader,
    /// Encoded frames not yet accepted by the socket; survives cancellation.
    wbuf: Vec<u8>,
    server_key: NodePublic,
    server_info: ServerInfo,
}

impl<S> fmt::Debug for DerpClient<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DerpClient")
            .field("server_key", &self.server_key)
            .field("server_info", &self.server_info)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> DerpClient<S> {
    /// Runs the handshake on an upgraded stream: reads ServerKey, sends our sealed ClientInfo
    /// (`{"version":2,"CanAckPings":true}`), reads and opens ServerInfo. `leftover` is what
    /// [`upgrade`] read past the HTTP head. The caller bounds the time (see [`connect`]).
    pub async fn handshake(io: S, leftover: &[u8], my: &NodePrivate) -> Result<Self, Error> {
        let mut c = DerpClient {
            io,
            reader: FrameReader::default(),
            wbuf: Vec::new(),
            server_key: NodePublic::default(),
            server_info: ServerInfo::default(),
        };
        c.reader.push(leftover);
        let server_key = match c.read_frame(Op::Handshake).await? {
            Frame::ServerKey { key } => key,
            _ => {
                return Err(Error::Protocol {
                    op: Op::Handshake,
                    what: "first frame is not ServerKey",
                })
            }
        };
        let mut nonce = [0u8; frame::NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        frame::seal_client_info(my, &server_key, nonce, &ClientInfo::ours()).encode(&mut c.wbuf);
        c.flush_op(Op::Handshake).await?;
        let sealed = match c.read_frame(Op::Handshake).await? {
            Frame::ServerInfo { sealed } => sealed,
            _ => {
                return Err(Error::Protocol {
                    op: Op::Handshake,
                    what: "expected ServerInfo",
                })
            }
        };
        c.server_info =
            frame::open_server_info(my, &server_key, &sealed).map_err(|err| Error::Frame { op: Op::Handshake, err })?;
        c.server_key = server_key;
        Ok(c)
    }

    /// The server's node key (from its ServerKey frame).
    pub fn server_key(&self) -> NodePublic {
        self.server_key
    }

    /// The server's ServerInfo (version, optional send rate limit).
    pub fn server_info(&self) -> ServerInfo {
        self.server_info
    }

    /// Sends `packet` to the peer `dst` via the server.
    pub async fn send(&mut self, dst: NodePublic, packet: &[u8]) -> Result<(), Error> {
        if packet.len() > MAX_PACKET_SIZE {
            return Err(Error::PacketTooLarge(packet.len()));
        }
        // Encoded in place (no Bytes copy): header, key, packet. Length fits: ≤ 64 KiB + 32.
        let len = (KEY_LEN + packet.len()) as u32;
        self.wbuf
            .extend_from_slice(&frame::header(FrameType::SendPacket as u8, len));
        self.wbuf.extend_from_slice(dst.as_bytes());
        self.wbuf.extend_from_slice(packet);
        self.flush_op(Op::Send).await
    }

    /// Tells the server whether it is our home region (stats only, but Go clients send it).
    pub async fn note_preferred(&mut self, preferred: bool) -> Result<(), Error> {
        Frame::NotePreferred { preferred }.encode(&mut self.wbuf);
        self.flush_op(Op::Send).await
    }

    /// Sends a Ping; the server's Pong arrives as [`DerpEvent::Pong`] from [`Self::recv`].
    pub async fn send_ping(&mut self, data: [u8; frame::PING_LEN]) -> Result<(), Error> {
        Frame::Ping(data).encode(&mut self.wbuf);
        self.flush_op(Op::Send).await
    }

    /// Writes out anything left over from a cancelled send.
    pub async fn flush(&mut self) -> Result<(), Error> {
        self.flush_op(Op::Send).await
    }

    /// The next event. Answers server pings itself; skips frames a client has no use for
    /// (unknown types, PeerPresent, a late ServerKey after fast start), as Go does.
    pub async fn recv(&mut self) -> Result<DerpEvent, Error> {
        loop {
            let f = match tokio::time::timeout(READ_TIMEOUT, self.read_frame(Op::Recv)).await {
                Ok(r) => r?,
                Err(_) => return Err(Error::Timeout(Op::Recv)),
            };
            let ev = match f {
                Frame::RecvPacket { src, packet } => DerpEvent::Packet { src, data: packet },
                Frame::PeerGone { key, reason } => DerpEvent::PeerGone { key, reason },
                Frame::KeepAlive => DerpEvent::KeepAlive,
                Frame::Pong(d) => DerpEvent::Pong(d),
                Frame::Health { problem } => DerpEvent::Health { problem },
                Frame::Restarting {
                    reconnect_in_ms,
                    try_for_ms,
                } => DerpEvent::Restarting {
                    reconnect_in: Duration::from_millis(u64::from(reconnect_in_ms)),
                    try_for: Duration::from_millis(u64::from(try_for_ms)),
                },
                Frame::Ping(d) => {
                    Frame::Pong(d).encode(&mut self.wbuf);
                    self.flush_op(Op::Send).await?;
                    continue;
                }
                _ => continue,
            };
            return Ok(ev);
        }
    }

    /// Reads until one whole frame is buffered and decodes it.
    async fn read_frame(&mut self, op: Op) -> Result<Frame, Error> {
        loop {
            if let Some((ty, payload)) = self.reader.next_frame().map_err(|err| Error::Frame { op, err })? {
                return Frame::decode(ty, payload).map_err(|err| Error::Frame { op, err });
            }
            self.reader.buf_mut().reserve(READ_CHUNK);
            let n = self.io.read_buf(self.reader.buf_mut()).await.map_err(Error::io(op))?;
            if n == 0 {
                return Err(Error::Closed(op));
            }
        }
    }

    /// Writes the whole write buffer, recording progress so a cancelled call resumes exactly.
    async fn flush_op(&mut self, op: Op) -> Result<(), Error> {
        while !self.wbuf.is_empty() {
            let n = self.io.write(&self.wbuf).await.map_err(Error::io(op))?;
            if n == 0 {
                return Err(Error::Closed(op));
            }
            self.wbuf.drain(..n);
        }
        self.io.flush().await.map_err(Error::io(op))
    }
}

/// Reconnect delays for a caller's retry loop: 100 ms doubling to [`Backoff::MAX`], each scaled
/// by a random factor in [0.5, 1.5) so a fleet that lost its relay at once does not return at
/// once (Go `util/backoff`, capped at 10 s as magicsock's DERP reconnects are).
///
/// Pure: the caller supplies the randomness and does the sleeping.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// First delay before jitter.
    pub const MIN: Duration = Duration::from_millis(100);
    /// Largest delay before jitter.
    pub const MAX: Duration = Duration::from_secs(10);

    /// The delay before the next attempt; `random` is any uniformly random u32.
    pub fn next_delay(&mut self, random: u32) -> Duration {
        let base = Self::MIN.saturating_mul(1u32 << self.attempt.min(16)).min(Self::MAX);
        self.attempt = self.attempt.saturating_add(1);
        // factor = 0.5 + random / 2^32, in thousandths to stay in integer math.
        let milli = 500 + ((u64::from(random) * 1000) >> 32);
        let ms = base.as_millis() as u64 * milli / 1000;
        Duration::from_millis(ms)
    }

    /// Call after a connection succeeded (e.g. the first frame after the handshake arrived).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn key(b: u8) -> NodePrivate {
        NodePrivate::from_random([b; 32])
    }

    /// A scripted server on the other end of an in-memory pipe: sends ServerKey, checks our
    /// ClientInfo opens, answers ServerInfo, then runs `rest`.
    async fn scripted_server(
        mut s: tokio::io::DuplexStream,
        server: NodePrivate,
        client: NodePublic,
    ) -> tokio::io::DuplexStream {
        s.write_all(&Frame::ServerKey { key: server.public() }.to_vec())
            .await
            .unwrap();
        let mut r = FrameReader::default();
        let f = loop {
            if let Some((ty, p)) = r.next_frame().unwrap() {
                break Frame::decode(ty, p).unwrap();
            }
            let mut b = [0u8; 512];
            let n = s.read(&mut b).await.unwrap();
            r.push(&b[..n]);
        };
        let Frame::ClientInfo { key, sealed } = f else {
            panic!("{f:?}")
        };
        assert_eq!(key, client);
        assert_eq!(frame::open_client_info(&server, &key, &sealed), Ok(ClientInfo::ours()));
        s.write_all(&frame::seal_server_info(&server, &client, [9; 24], &ServerInfo::ours()).to_vec())
            .await
            .unwrap();
        s
    }

    #[tokio::test]
    async fn handshake_then_events_and_auto_pong() {
        let (a, b) = duplex(1 << 20);
        let (me, srv) = (key(1), key(2));
        let (mine, srv_pub) = (me.public(), srv.public());
        let server = tokio::spawn(async move {
            let mut s = scripted_server(b, srv, mine).await;
            let mut out = Vec::new();
            Frame::Ping(*b"pingpong").encode(&mut out);
            Frame::Unknown {
                ty: 0x7f,
                payload: Bytes::from_static(b"skip me"),
            }
            .encode(&mut out);
            Frame::RecvPacket {
                src: key(3).public(),
                packet: Bytes::from_static(b"hi"),
            }
            .encode(&mut out);
            Frame::PeerGone {
                key: key(4).public(),
                reason: PeerGoneReason::NotHere,
            }
            .encode(&mut out);
            Frame::KeepAlive.encode(&mut out);
            s.write_all(&out).await.unwrap();
            // Our pong, then a SendPacket.
            let mut got = vec![0u8; 13 + 5 + 32 + 3];
            s.read_exact(&mut got).await.unwrap();
            got
        });
        let mut c = DerpClient::handshake(a, &[], &me).await.unwrap();
        assert_eq!(c.server_key(), srv_pub);
        assert_eq!(c.server_info().version, 2);
        assert_eq!(
            c.recv().await.unwrap(),
            DerpEvent::Packet {
                src: key(3).public(),
                data: Bytes::from_static(b"hi")
            }
        );
        assert_eq!(
            c.recv().await.unwrap(),
            DerpEvent::PeerGone {
                key: key(4).public(),
                reason: PeerGoneReason::NotHere
            }
        );
        assert_eq!(c.recv().await.unwrap(), DerpEvent::KeepAlive);
        c.send(key(5).public(), b"abc").await.unwrap();
        let got = server.await.unwrap();
        assert_eq!(&got[..13], &Frame::Pong(*b"pingpong").to_vec()[..]);
        let mut want = Vec::new();
        Frame::SendPacket {
            dst: key(5).public(),
            packet: Bytes::from_static(b"abc"),
        }
        .encode(&mut want);
        assert_eq!(&got[13..], &want[..]);
        assert!(matches!(
            c.send(key(5).public(), &vec![0; MAX_PACKET_SIZE + 1]).await,
            Err(Error::PacketTooLarge(_))
        ));
    }

    #[tokio::test]
    async fn handshake_failures_are_classified() {
        // Wrong first frame.
        let (a, mut b) = duplex(4096);
        b.write_all(&Frame::KeepAlive.to_vec()).await.unwrap();
        let e = DerpClient::handshake(a, &[], &key(1)).await.unwrap_err();
        assert!(
            matches!(e, Error::Protocol { op: Op::Handshake, .. }) && e.is_retryable(),
            "{e}"
        );
        // Server hangs up after ServerKey (e.g. verify-clients refused us).
        let (a, mut b) = duplex(4096);
        b.write_all(&Frame::ServerKey { key: key(2).public() }.to_vec())
            .await
            .unwrap();
        drop(b);
        let e = DerpClient::handshake(a, &[], &key(1)).await.unwrap_err();
        assert!(matches!(e, Error::Closed(Op::Handshake) | Error::Io { .. }), "{e}");
        // ServerInfo sealed by someone else.
        let (a, b) = duplex(4096);
        let me = key(1);
        let mine = me.public();
        tokio::spawn(async move {
            let mut s = b;
            s.write_all(&Frame::ServerKey { key: key(2).public() }.to_vec())
                .await
                .unwrap();
            let mut buf = [0u8; 200];
            let _ = s.read(&mut buf).await;
            s.write_all(&frame::seal_server_info(&key(9), &mine, [1; 24], &ServerInfo::ours()).to_vec())
                .await
                .unwrap();
            let _ = s.read(&mut buf).await;
        });
        let e = DerpClient::handshake(a, &[], &me).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::Frame {
                    err: FrameError::CryptoFailed,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!Error::Status(404).is_retryable());
        assert!(Error::Status(503).is_retryable());
        assert!(!Error::PacketTooLarge(1).is_retryable());
    }

    #[tokio::test]
    async fn upgrade_reads_101_and_keeps_leftover() {
        let (mut a, mut b) = duplex(4096);
        let srv = tokio::spawn(async move {
            let (head, _) = http1::read_head(&mut b).await.unwrap();
            assert_eq!(head.path(), "/derp");
            assert!(head.header("upgrade").unwrap().eq_ignore_ascii_case("derp"));
            b.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n\x01\x00")
                .await
                .unwrap();
            b
        });
        let left = upgrade(&mut a, "h:1", "/derp").await.unwrap();
        assert_eq!(left, b"\x01\x00");
        drop(srv.await.unwrap());
        let (mut a, mut b) = duplex(4096);
        tokio::spawn(async move {
            let _ = http1::read_head(&mut b).await;
            b.write_all(b"HTTP/1.1 426 Upgrade Required\r\n\r\n").await.unwrap();
        });
        assert!(matches!(upgrade(&mut a, "h:1", "/derp").await, Err(Error::Status(426))));
    }

    #[tokio::test]
    async fn staggered_dial_skips_dead_addresses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = listener.local_addr().unwrap();
        // A port nobody listens on (bound, then closed): refused at once.
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let s = connect_staggered(&[dead, dead, good]).await.unwrap();
        assert_eq!(s.peer_addr().unwrap(), good);
        let e = connect_staggered(&[dead]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(
            connect_staggered(&[]).await.unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::default();
        // random = 2^31 → factor 1.0.
        let mid = 1u32 << 31;
        assert_eq!(b.next_delay(mid), Duration::from_millis(100));
        assert_eq!(b.next_delay(mid), Duration::from_millis(200));
        assert_eq!(b.next_delay(0), Duration::from_millis(200)); // 400 × 0.5
        for _ in 0..40 {
            assert!(b.next_delay(u32::MAX) < Duration::from_secs(15));
        }
        assert_eq!(b.next_delay(mid), Backoff::MAX);
        b.reset();
        assert_eq!(b.next_delay(mid), Duration::from_millis(100));
    }
}
