//! DERP relay server (feature `relay`): HTTP routes of a DERP host, the per-connection protocol,
//! and headscale's embedded-region generation.
//!
//! Mirrors the facts of tailscale `derp/derpserver/{derpserver,handler}.go` and headscale
//! `hscontrol/derp/server/derp_server.go` (`GenerateRegion`) (spec §5.2, §6), not their code.
//!
//! Layers:
//! * [`Registry`] (the core, no sockets or clock): node key → the connection's bounded send
//!   queue, who sent to whom (for PeerGone `Disconnected`), when each sender last heard
//!   PeerGone `NotHere` about each destination. Forwarding never waits: a full queue drops the
//!   packet and the caller counts it, so one slow client cannot stall the others.
//! * [`DerpServer`] (the shell): one task per connection running a reader and a writer
//!   concurrently. The reader handles frames and pushes into other clients' queues; the writer
//!   drains its own queue to the socket, batching, and sends KeepAlive every 60 s + 0-5 s.
//!
//! ```text
//!  client A ─► reader A ─► Registry::forward(A → B) ─try_send─► queue B (32) ─► writer B ─► client B
//!                                │ B absent and packet is disco: PeerGone(B, NotHere) ─► queue A
//!  A leaves ─► Registry::unregister(A) ─► PeerGone(A, Disconnected) ─► queues of those A sent to
//! ```
//!
//! One connection per node key: a second connection with the same key replaces the first (the
//! registry drops the old queue's only sender, so the old writer drains and the old connection
//! closes). Go keeps both and picks an active one; for a single-node relay the effect is the same.
//! Mesh frames (ForwardPacket, WatchConns, ClosePeer) close the connection: we have no mesh key.
//!
//! Plain-HTTP DERP (what [`run_standalone`] and the coordinator's `http://` listener offer) is
//! only used by Go clients started with `TS_DEBUG_USE_DERP_HTTP=1`; production clients speak TLS.
#![forbid(unsafe_code)]

use std::{
    collections::{HashMap, HashSet},
    fmt, io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use rand_core::{OsRng, RngCore};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, UdpSocket},
    sync::mpsc,
};

use super::frame::{
    self, Frame, FrameError, FrameReader, FrameType, PeerGoneReason, ServerInfo, KEEP_ALIVE, KEY_LEN, MAX_PACKET_SIZE,
};
use crate::{
    platform::{
        connlimit::{self, ConnLimits, ListenLimits},
        uci::derp::DerpConfig,
    },
    wire::{
        disco, http1,
        keys::{NodePrivate, NodePublic},
        tailcfg::{DerpNode, DerpRegion},
    },
};

/// Frames queued per client before new ones are dropped (Go `perClientSendQueueDepth`, 32):
/// at most 32 × 64 KiB held for a client that stopped reading.
pub const SEND_QUEUE_DEPTH: usize = 32;
/// A client's writer may block this long on one batch before the connection is closed (Go
/// `DefaultTCPWiteTimeout`, 2 s): a peer that stopped reading is dead weight.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Random extra added to each [`KEEP_ALIVE`] interval (Go: 0-5 s).
pub const KEEP_ALIVE_JITTER: Duration = Duration::from_secs(5);
/// At most one PeerGone(NotHere) per (sender, destination) in this interval. Go limits per
/// sender (1/s, burst 3); per pair keeps one chatty destination from hiding another.
pub const NOT_HERE_INTERVAL: Duration = Duration::from_secs(1);
/// Largest frame a client may send after the handshake: a full SendPacket (Go
/// `maxUnknownFrameLen`); anything longer closes the connection, even of an unknown type.
pub const MAX_CLIENT_FRAME: u32 = (MAX_PACKET_SIZE + KEY_LEN) as u32;
/// NotHere timestamps remembered per sender; past this, stale ones are pruned first.
const NOT_HERE_TRACKED: usize = 64;
/// Read buffer growth per socket read.
const READ_CHUNK: usize = 16 * 1024;
/// The writer stops batching queued frames past this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// Admission check run on every client key after its ClientInfo opened (spec §6.6); `false`
/// closes the connection. The coordinator passes "is this a known node key".
pub type Verifier = Arc<dyn Fn(&NodePublic) -> bool + Send + Sync>;

/// Something queued for one client's writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A RecvPacket from `src`.
    Packet {
        /// Sender's node key.
        src: NodePublic,
        /// The packet (an owned copy, so no reader buffer is pinned while it waits).
        data: Bytes,
    },
    /// A PeerGone frame.
    PeerGone {
        /// The peer concerned.
        key: NodePublic,
        /// Disconnected or NotHere.
        reason: PeerGoneReason,
    },
    /// The answer to the client's Ping.
    Pong([u8; frame::PING_LEN]),
}

impl Outbound {
    /// Appends the frame to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Outbound::Packet { src, data } => Frame::RecvPacket {
                src: *src,
                packet: data.clone(),
            }
            .encode(out),
            Outbound::PeerGone { key, reason } => Frame::PeerGone {
                key: *key,
                reason: *reason,
            }
            .encode(out),
            Outbound::Pong(d) => Frame::Pong(*d).encode(out),
        }
    }
}

/// What [`Registry::forward`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Queued for the destination.
    Delivered,
    /// The destination's queue was full (or its writer just ended): dropped.
    QueueFull,
    /// No such destination here: dropped. `notified` says whether the sender was queued a
    /// PeerGone(NotHere) (only for disco packets, rate-limited).
    NotHere {
        /// A PeerGone(NotHere) was queued to the sender.
        notified: bool,
    },
}

/// What [`Registry::unregister`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unregistered {
    /// The key left (false when the connection had already been replaced).
    pub removed: bool,
    /// PeerGone(Disconnected) notices queued.
    pub notified: u32,
    /// Notices dropped because the recipient's queue was full.
    pub dropped: u32,
}

/// One registered connection.
#[derive(Debug)]
struct Entry {
    /// Connection id, so a replaced connection's cleanup does not remove its successor.
    conn: u32,
    /// The only strong sender of the connection's queue.
    tx: mpsc::Sender<Outbound>,
    /// Keys this client sent packets to; they hear PeerGone(Disconnected) when it leaves.
    sent_to: HashSet<NodePublic>,
    /// Destination → when this client was last told it is NotHere.
    not_here: HashMap<NodePublic, Instant>,
    /// Client said this is its home region.
    preferred: bool,
}

/// The client registry: the decisions of the relay, without sockets or clock (time is an
/// argument). Queues are tokio mpsc senders used only through the non-blocking `try_send`.
#[derive(Debug, Default)]
pub struct Registry {
    clients: HashMap<NodePublic, Entry>,
    /// Packet bytes received from clients and queued to destinations (64-bit: they pass 4 GiB
    /// within days; under the registry lock, so no 64-bit atomics are needed).
    bytes: (u64, u64),
}

impl Registry {
    /// Adds `key`'s connection `conn`, whose writer reads `tx`'s queue. Returns true when it
    /// replaced an earlier connection with the same key (whose queue then closes). The
    /// replaced entry's "sent to" set carries over: the peers it talked to still care.
    pub fn register(&mut self, key: NodePublic, conn: u32, tx: mpsc::Sender<Outbound>) -> bool {
        let mut e = Entry {
            conn,
            tx,
            sent_to: HashSet::new(),
            not_here: HashMap::new(),
            preferred: false,
        };
        let old = self.clients.remove(&key);
        let replaced = old.is_some();
        if let Some(old) = old {
            e.sent_to = old.sent_to;
            e.not_here = old.not_here;
        }
        self.clients.insert(key, e);
        replaced
    }

    /// Removes `key` if `conn` is still its connection, and queues PeerGone(Disconnected) to
    /// every still-connected peer it had sent to.
    pub fn unregister(&mut self, key: &NodePublic, conn: u32) -> Unregistered {
        let mut r = Unregistered::default();
        match self.clients.get(key) {
            Some(e) if e.conn == conn => {}
            _ => return r,
        }
        let Some(gone) = self.clients.remove(key) else { return r };
        r.removed = true;
        for dst in &gone.sent_to {
            let Some(d) = self.clients.get(dst) else { continue };
            match d.tx.try_send(Outbound::PeerGone {
                key: *key,
                reason: PeerGoneReason::Disconnected,
            }) {
                Ok(()) => r.notified += 1,
                Err(_) => r.dropped += 1,
            }
        }
        // Nobody needs to notify `key` any more: keeps the sets bounded by live clients.
        for e in self.clients.values_mut() {
            e.sent_to.remove(key);
        }
        r
    }

    /// Queues `data` from `src` to `dst` without waiting. For an absent `dst` and a disco
    /// packet, queues PeerGone(dst, NotHere) to `src` at most once per [`NOT_HERE_INTERVAL`]
    /// (Go answers only disco: WireGuard to a stale key would otherwise echo a notice each).
    pub fn forward(&mut self, src: &NodePublic, dst: &NodePublic, data: &[u8], now: Instant) -> Forward {
        self.bytes.0 += data.len() as u64;
        if let Some(d) = self.clients.get(dst) {
            let r = d.tx.try_send(Outbound::Packet {
                src: *src,
                data: Bytes::copy_from_slice(data),
            });
            if r.is_ok() {
                self.bytes.1 += data.len() as u64;
            }
            if let Some(s) = self.clients.get_mut(src) {
                s.sent_to.insert(*dst);
            }
            return match r {
                Ok(()) => Forward::Delivered,
                Err(_) => Forward::QueueFull,
            };
        }
        let Some(s) = self.clients.get_mut(src) else {
            return Forward::NotHere { notified: false };
        };
        if !disco::looks_like_disco(data) {
            return Forward::NotHere { notified: false };
        }
        if s.not_here
            .get(dst)
            .is_some_and(|t| now.saturating_duration_since(*t) < NOT_HERE_INTERVAL)
        {
            return Forward::NotHere { notified: false };
        }
        if s.not_here.len() >= NOT_HERE_TRACKED {
            s.not_here
                .retain(|_, t| now.saturating_duration_since(*t) < NOT_HERE_INTERVAL);
            if s.not_here.len() >= NOT_HERE_TRACKED {
                // Probing this many absent keys a second: stay quiet rather than grow.
                return Forward::NotHere { notified: false };
            }
        }
        s.not_here.insert(*dst, now);
        let ok =
            s.tx.try_send(Outbound::PeerGone {
                key: *dst,
                reason: PeerGoneReason::NotHere,
            })
            .is_ok();
        Forward::NotHere { notified: ok }
    }

    /// Records a NotePreferred from `key`'s connection `conn`.
    pub fn note_preferred(&mut self, key: &NodePublic, conn: u32, preferred: bool) {
        if let Some(e) = self.clients.get_mut(key).filter(|e| e.conn == conn) {
            e.preferred = preferred;
        }
    }

    /// Connected keys.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// True when nobody is connected.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Whether `key` is connected.
    pub fn contains(&self, key: &NodePublic) -> bool {
        self.clients.contains_key(key)
    }

    /// Clients that call this their home region.
    pub fn home_clients(&self) -> usize {
        self.clients.values().filter(|e| e.preferred).count()
    }

    /// Packet bytes received from clients, and queued to destinations.
    pub fn bytes(&self) -> (u64, u64) {
        self.bytes
    }
}

/// Counters of a [`DerpServer`]; 32-bit (mips32 has no 64-bit atomics) and wrapping.
#[derive(Debug, Default)]
pub struct DerpStats {
    accepted: AtomicU32,
    rejected: AtomicU32,
    bad_frames: AtomicU32,
    forwarded: AtomicU32,
    dropped: AtomicU32,
    not_here: AtomicU32,
}

impl DerpStats {
    /// Connections that completed the handshake.
    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Clients refused by the verifier.
    pub fn rejected(&self) -> u32 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Connections closed for bad input: garbage or a wrong frame in the handshake, a box that
    /// did not open, a malformed or oversize frame, a mesh frame, a handshake timeout.
    pub fn bad_frames(&self) -> u32 {
        self.bad_frames.load(Ordering::Relaxed)
    }

    /// Packets queued to their destination.
    pub fn packets_forwarded(&self) -> u32 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Packets and notices dropped because a destination's queue was full.
    pub fn packets_dropped(&self) -> u32 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Packets dropped because their destination is not connected here.
    pub fn packets_not_here(&self) -> u32 {
        self.not_here.load(Ordering::Relaxed)
    }

    fn bump(c: &AtomicU32) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a connection ended (debug logs only).
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("timed out")]
    Timeout,
    #[error("closed by peer")]
    Closed,
    #[error("expected ClientInfo, got frame type {0:#04x}")]
    NotClientInfo(u8),
    #[error("client rejected by verifier")]
    Rejected,
    #[error("mesh frame {0:#04x} from a client without mesh key")]
    MeshFrame(u8),
}

impl ConnError {
    /// Whether this ending counts as bad input.
    fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ConnError::Frame(_) | ConnError::NotClientInfo(_) | ConnError::MeshFrame(_) | ConnError::Timeout
        )
    }
}

/// A DERP relay: accepts upgraded connections and forwards packets between them.
pub struct DerpServer {
    private: NodePrivate,
    public: NodePublic,
    verifier: Option<Verifier>,
    registry: Mutex<Registry>,
    stats: DerpStats,
    next_conn: AtomicU32,
    /// Admission and handshake budget of [`Self::serve`]'s listener.
    limits: Arc<ConnLimits>,
}

impl fmt::Debug for DerpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DerpServer")
            .field("public", &self.public)
            .field("verify_clients", &self.verifier.is_some())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Unregisters a connection however its task ends (error, replacement, cancellation).
struct Registration<'a> {
    server: &'a DerpServer,
    key: NodePublic,
    conn: u32,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let r = self.server.registry().unregister(&self.key, self.conn);
        for _ in 0..r.dropped {
            DerpStats::bump(&self.server.stats.dropped);
        }
        if r.removed {
            log::debug!("derp: client left peer={} notified={}", self.key.short(), r.notified);
        }
    }
}

impl DerpServer {
    /// A relay with node key `private`; with `verifier`, only keys it approves may connect.
    pub fn new(private: NodePrivate, verifier: Option<Verifier>) -> DerpServer {
        let public = private.public();
        DerpServer {
            private,
            public,
            verifier,
            registry: Mutex::new(Registry::default()),
            stats: DerpStats::default(),
            next_conn: AtomicU32::new(1),
            limits: ConnLimits::new(ListenLimits::default()),
        }
    }

    /// The same relay with other limits for [`Self::serve`] (the coordinator's embedded relay
    /// is governed by the coordinator's listener instead).
    pub fn with_limits(mut self, limits: ListenLimits) -> DerpServer {
        self.limits = ConnLimits::new(limits);
        self
    }

    /// The listener's admission state and refusal counters.
    pub fn limits(&self) -> &Arc<ConnLimits> {
        &self.limits
    }

    /// The server's public key (sent in ServerKey and `Derp-Public-Key`).
    pub fn public_key(&self) -> NodePublic {
        self.public
    }

    /// Counters.
    pub fn stats(&self) -> &DerpStats {
        &self.stats
    }

    /// Connected clients (distinct keys).
    pub fn client_count(&self) -> usize {
        self.registry().len()
    }

    /// Whether a client with `key` is connected.
    pub fn is_connected(&self, key: &NodePublic) -> bool {
        self.registry().contains(key)
    }

    /// Clients that sent NotePreferred(true).
    pub fn home_client_count(&self) -> usize {
        self.registry().home_clients()
    }

    /// Packet bytes received from clients, and queued to destinations.
    pub fn bytes(&self) -> (u64, u64) {
        self.registry().bytes()
    }

    /// Locks the registry (a poisoned lock is still usable: panics abort the process anyway).
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves one DERP-host HTTP request whose head was already read: `/derp` (any method,
    /// `Upgrade: DERP` → 101 then [`Self::accept`]; no upgrade → 426), `/derp/probe` and
    /// `/derp/latency-check` (200 for GET/HEAD, CORS open; else 405), `/generate_204` (captive
    /// portal check, spec §6.5), `OPTIONS *` 200, anything else 404. Errors end the connection
    /// and are logged. `deadline` bounds the DERP handshake (the budget started at accept).
    pub async fn handle_http<S>(
        self: &Arc<Self>,
        mut sock: S,
        head: &http1::Head,
        leftover: Vec<u8>,
        deadline: tokio::time::Instant,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let r = match head.path() {
            "/derp" => {
                let wants_derp = head
                    .header("upgrade")
                    .is_some_and(|u| u.split(',').any(|t| t.trim().eq_ignore_ascii_case("derp")));
                if wants_derp {
                    let resp = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\
                         Derp-Version: {}\r\nDerp-Public-Key: {}\r\n\r\n",
                        frame::PROTOCOL_VERSION,
                        self.public.untyped_hex()
                    );
                    match sock.write_all(resp.as_bytes()).await {
                        Ok(()) => {
                            self.accept(sock, leftover, deadline).await;
                            return;
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    // WebSocket DERP (browsers) is not supported; it gets the same answer.
                    respond(&mut sock, 426, &[], b"DERP requires connection upgrade", false).await
                }
            }
            "/derp/probe" | "/derp/latency-check" => match head.method.as_str() {
                "GET" | "HEAD" => {
                    respond(
                        &mut sock,
                        200,
                        &[("Access-Control-Allow-Origin", "*")],
                        b"",
                        head.method == "HEAD",
                    )
                    .await
                }
                _ => respond(&mut sock, 405, &[], b"bogus probe method\n", false).await,
            },
            "/generate_204" => {
                let answer = head.header("x-tailscale-challenge").and_then(challenge_response);
                let mut extra = vec![(
                    "Cache-Control",
                    "no-cache, no-store, must-revalidate, no-transform, max-age=0",
                )];
                if let Some(a) = &answer {
                    extra.push(("X-Tailscale-Response", a.as_str()));
                }
                respond(&mut sock, 204, &extra, b"", true).await
            }
            // `OPTIONS *` (the parser lets `*` through for OPTIONS only): 200, as Go's server does.
            "*" => respond(&mut sock, 200, &[], b"", false).await,
            _ => respond(&mut sock, 404, &[], b"not found\n", false).await,
        };
        if let Err(e) = r {
            log::debug!("derp: http request path={} err={e}", head.path());
        }
    }

    /// Runs the DERP protocol on a connection whose `101` was already written; `leftover` is
    /// what was read past the request head. Returns when the connection ends.
    ///
    /// ServerKey, then ClientInfo by `deadline` (the listener's handshake budget from accept,
    /// [`frame::HANDSHAKE_TIMEOUT`] by default), verification, registration, ServerInfo, then
    /// the reader/writer pair until either side fails or the connection is replaced by a newer
    /// one with the same key.
    pub async fn accept<S>(self: &Arc<Self>, io: S, leftover: Vec<u8>, deadline: tokio::time::Instant)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut reader = FrameReader::new(frame::MAX_CLIENT_INFO_LEN);
        reader.push(&leftover);
        let hs = tokio::time::timeout_at(deadline, self.handshake(&mut rd, &mut wr, &mut reader)).await;
        let key = match hs.unwrap_or(Err(ConnError::Timeout)) {
            Ok(k) => k,
            Err(e) => {
                if matches!(e, ConnError::Rejected) {
                    DerpStats::bump(&self.stats.rejected);
                } else if e.is_bad_input() {
                    DerpStats::bump(&self.stats.bad_frames);
                }
                log::debug!("derp: handshake failed err={e}");
                return;
            }
        };
        reader.set_max_len(MAX_CLIENT_FRAME);
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(SEND_QUEUE_DEPTH);
        // The reader holds only a weak sender (for pongs): the registry's is the one whose
        // drop closes this connection when a newer one takes the key.
        let own = tx.downgrade();
        let replaced = self.registry().register(key, conn, tx);
        let _registration = Registration {
            server: self,
            key,
            conn,
        };
        DerpStats::bump(&self.stats.accepted);
        log::debug!("derp: client connected peer={} replaced={replaced}", key.short());

        let r = async {
            let mut nonce = [0u8; frame::NONCE_LEN];
            OsRng.fill_bytes(&mut nonce);
            let info = frame::seal_server_info(&self.private, &key, nonce, &ServerInfo::ours()).to_vec();
            write_timed(&mut wr, &info).await?;
            tokio::select! {
                r = self.read_loop(&mut rd, &mut reader, key, conn, &own) => r,
                r = write_loop(&mut wr, &mut rx) => r,
            }
        }
        .await;
        match r {
            Ok(()) => log::debug!("derp: connection closed peer={}", key.short()),
            Err(e) => {
                if e.is_bad_input() {
                    DerpStats::bump(&self.stats.bad_frames);
                }
                log::debug!("derp: connection ended peer={} err={e}", key.short());
            }
        }
    }

    /// ServerKey out, ClientInfo in (opened and verified). Returns the client's key.
    async fn handshake<R, W>(&self, rd: &mut R, wr: &mut W, reader: &mut FrameReader) -> Result<NodePublic, ConnError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        wr.write_all(&Frame::ServerKey { key: self.public }.to_vec()).await?;
        wr.flush().await?;
        let (ty, payload) = loop {
            if let Some(f) = reader.next_frame()? {
                break f;
            }
            reader.buf_mut().reserve(READ_CHUNK);
            if rd.read_buf(reader.buf_mut()).await? == 0 {
                return Err(ConnError::Closed);
            }
        };
        if ty != FrameType::ClientInfo as u8 {
            return Err(ConnError::NotClientInfo(ty));
        }
        let Frame::ClientInfo { key, sealed } = Frame::decode(ty, payload)? else {
            return Err(ConnError::NotClientInfo(ty));
        };
        // The box proves the client holds the private half of `key`.
        let _info = frame::open_client_info(&self.private, &key, &sealed)?;
        if let Some(v) = &self.verifier {
            if !v(&key) {
                return Err(ConnError::Rejected);
            }
        }
        Ok(key)
    }

    /// Reads and handles frames until the client closes or misbehaves.
    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        reader: &mut FrameReader,
        key: NodePublic,
        conn: u32,
        own: &mpsc::WeakSender<Outbound>,
    ) -> Result<(), ConnError> {
        loop {
            while let Some((ty, payload)) = reader.next_frame()? {
                self.handle_frame(ty, payload, key, conn, own)?;
            }
            reader.buf_mut().reserve(READ_CHUNK);
            if rd.read_buf(reader.buf_mut()).await? == 0 {
                return Ok(());
            }
        }
    }

    /// One client frame. Types a client has no business sending (and unknown ones) are skipped
    /// without decoding, as Go does; mesh frames end the connection.
    fn handle_frame(
        &self,
        ty: u8,
        payload: Bytes,
        key: NodePublic,
        conn: u32,
        own: &mpsc::WeakSender<Outbound>,
    ) -> Result<(), ConnError> {
        match FrameType::from_u8(ty) {
            Some(FrameType::SendPacket | FrameType::NotePreferred | FrameType::Ping) => {}
            Some(FrameType::ForwardPacket | FrameType::WatchConns | FrameType::ClosePeer) => {
                return Err(ConnError::MeshFrame(ty))
            }
            _ => return Ok(()),
        }
        match Frame::decode(ty, payload)? {
            Frame::SendPacket { dst, packet } => {
                let r = self.registry().forward(&key, &dst, &packet, Instant::now());
                let c = match r {
                    Forward::Delivered => &self.stats.forwarded,
                    Forward::QueueFull => &self.stats.dropped,
                    Forward::NotHere { .. } => &self.stats.not_here,
                };
                DerpStats::bump(c);
                if r == Forward::QueueFull {
                    log::trace!(
                        "derp: queue full, dropped packet peer={} dst={}",
                        key.short(),
                        dst.short()
                    );
                }
            }
            Frame::NotePreferred { preferred } => self.registry().note_preferred(&key, conn, preferred),
            Frame::Ping(d) => {
                // A full queue drops the pong; the client's ping simply times out, as for loss.
                if let Some(tx) = own.upgrade() {
                    let _ = tx.try_send(Outbound::Pong(d));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Accepts DERP-host HTTP(S) connections on `listener` forever (one task each): `/derp`,
    /// probes and `/generate_204` via [`Self::handle_http`]; TLS first when `tls` is given.
    /// Admission follows [`Self::limits`]; TLS, the request head and the DERP handshake share
    /// one `handshake_timeout` budget from accept.
    pub async fn serve(self: &Arc<Self>, listener: TcpListener, tls: Option<crate::platform::tls::Acceptor>) {
        let budget = self.limits.limits().handshake_timeout;
        loop {
            let (tcp, peer, guard) = connlimit::accept(&listener, &self.limits, tls.is_some(), "derp").await;
            let server = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _guard = guard;
                let deadline = tokio::time::Instant::now() + budget;
                let Some(mut sock) = crate::platform::tls::accept(tls.as_ref(), tcp, budget, peer).await else {
                    return;
                };
                let head = tokio::time::timeout_at(deadline, http1::read_request_head(&mut sock)).await;
                match head {
                    Ok(Ok((head, leftover))) => server.handle_http(sock, &head, leftover, deadline).await,
                    // Closed before a whole head (some clients open a connection and close it
                    // unused): nothing to report.
                    Ok(Err(http1::HttpError::Closed)) => {}
                    Err(_) => {
                        server.limits.note_timeout();
                        log::debug!("derp: request head timed out peer={peer}");
                    }
                    Ok(Err(e)) => {
                        log::debug!("derp: bad http request peer={peer} err={e}");
                        let body = e.bad_request_body();
                        let _ = respond(&mut sock, 400, &[], body.as_bytes(), false).await;
                    }
                }
            });
        }
    }
}

/// Drains `rx` to the socket in batches, with a KeepAlive every [`KEEP_ALIVE`] + jitter.
/// Returns `Ok` when the queue closes (the connection was replaced).
async fn write_loop<W: AsyncWrite + Unpin>(wr: &mut W, rx: &mut mpsc::Receiver<Outbound>) -> Result<(), ConnError> {
    let mut buf = Vec::with_capacity(4096);
    let mut next_keepalive = tokio::time::Instant::now() + keep_alive_interval();
    loop {
        buf.clear();
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { return Ok(()) };
                m.encode(&mut buf);
                while buf.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(m) => m.encode(&mut buf),
                        Err(_) => break,
                    }
                }
            }
            _ = tokio::time::sleep_until(next_keepalive) => {
                Frame::KeepAlive.encode(&mut buf);
                next_keepalive = tokio::time::Instant::now() + keep_alive_interval();
            }
        }
        write_timed(wr, &buf).await?;
    }
}

/// [`KEEP_ALIVE`] plus a random 0-5 s, so clients connected together do not tick together.
fn keep_alive_interval() -> Duration {
    let jitter_ms = u64::from(OsRng.next_u32()) % (KEEP_ALIVE_JITTER.as_millis() as u64 + 1);
    KEEP_ALIVE + Duration::from_millis(jitter_ms)
}

/// Writes and flushes `data` within [`WRITE_TIMEOUT`].
async fn write_timed<W: AsyncWrite + Unpin>(wr: &mut W, data: &[u8]) -> Result<(), ConnError> {
    let work = async {
        wr.write_all(data).await?;
        wr.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, work).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ConnError::Timeout),
    }
}

/// The `X-Tailscale-Response` value for a captive-portal challenge: `response <challenge>` when
/// the challenge is at most 64 characters of `[A-Za-z0-9._:-]`, else none (Go `ServeNoContent`).
pub fn challenge_response(challenge: &str) -> Option<String> {
    let ok = !challenge.is_empty()
        && challenge.len() <= 64
        && challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    ok.then(|| format!("response {challenge}"))
}

/// A complete `Connection: close` response with extra headers; `head_only` omits the body (HEAD,
/// 204) but still announces its length for HEAD.
async fn respond<W: AsyncWrite + Unpin>(
    io: &mut W,
    status: u16,
    extra: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", http1::reason(status));
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if status != 204 {
        out.push_str(&format!(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    io.write_all(&out).await?;
    io.flush().await
}

/// `tinyscale derp`: a standalone relay at `listen`, over TLS when `tls` is given, else plain
/// HTTP (for clients with `TS_DEBUG_USE_DERP_HTTP=1`, or behind a TLS-terminating proxy that
/// passes the upgrade), plus a STUN server on `stun` if given. Runs until an error; the caller
/// adds signal handling. `limits` governs the DERP listener.
pub async fn run_standalone(
    listen: SocketAddr,
    private: NodePrivate,
    stun: Option<SocketAddr>,
    tls: Option<crate::platform::tls::Acceptor>,
    limits: ListenLimits,
) -> io::Result<()> {
    let server = Arc::new(DerpServer::new(private, None).with_limits(limits));
    let listener = TcpListener::bind(listen).await?;
    let udp = match stun {
        Some(a) => Some(UdpSocket::bind(a).await?),
        None => None,
    };
    log::info!(
        "derp: relay listening addr={} tls={} stun={} key={} max_connections={} max_connections_per_ip={}",
        listener.local_addr().unwrap_or(listen),
        tls.is_some(),
        udp.as_ref()
            .and_then(|u| u.local_addr().ok())
            .map_or("off".to_string(), |a| a.to_string()),
        server.public_key().short(),
        limits.max_connections,
        limits.max_connections_per_ip
    );
    let stun_task = async {
        match udp {
            Some(u) => crate::wire::stun::serve_udp(u, Arc::new(crate::wire::stun::StunStats::default())).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = server.serve(listener, tls) => Ok(()),
        r = stun_task => r,
    }
}

/// headscale's embedded DERP region (`GenerateRegion`): region id/code/name from `cfg`, one node
/// named after the region id whose `HostName` and `DERPPort` come from `server_url` (port, else
/// 80 for `http`, 443 otherwise) and whose `STUNPort` is the port of the STUN listen address.
/// `IPv4`/`IPv6` carry the configured public addresses, if any (headscale `derp.server.ipv4`/
/// `ipv6`), so clients need no DNS and know the relay speaks IPv6.
///
/// An `http://` server URL yields a region only Go clients with `TS_DEBUG_USE_DERP_HTTP=1` can
/// use: clients speak TLS to `DERPPort` unless told otherwise. `InsecureForTests` stays false.
pub fn embedded_region(cfg: &DerpConfig, server_url: &str) -> DerpRegion {
    let (host, port) = url_host_port(server_url);
    DerpRegion {
        region_id: cfg.server_region_id,
        region_code: cfg.server_region_code.clone(),
        region_name: cfg.server_region_name.clone(),
        no_measure_no_home: false,
        nodes: vec![DerpNode {
            name: cfg.server_region_id.to_string(),
            region_id: cfg.server_region_id,
            host_name: host,
            derp_port: i32::from(port),
            stun_port: i32::from(cfg.server_stun_listen_addr.port()),
            ipv4: cfg.server_ipv4.map(|a| a.to_string()).unwrap_or_default(),
            ipv6: cfg.server_ipv6.map(|a| a.to_string()).unwrap_or_default(),
            ..DerpNode::default()
        }],
    }
}

/// Host (brackets removed) and port of an `http(s)://` URL, the port defaulting by scheme.
fn url_host_port(url: &str) -> (String, u16) {
    let (scheme, rest) = url.trim().split_once("://").unwrap_or(("https", url.trim()));
    let default = if scheme.eq_ignore_ascii_case("http") { 80 } else { 443 };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, tail) = v6.split_once(']').unwrap_or((v6, ""));
        let port = tail.strip_prefix(':').and_then(|p| p.parse().ok()).unwrap_or(default);
        return (host.to_string(), port);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => match p.parse() {
            Ok(port) => (h.to_string(), port),
            Err(_) => (authority.to_string(), default),
        },
        None => (authority.to_string(), default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> NodePublic {
        NodePublic([b; 32])
    }

    /// A minimal disco-looking packet (magic + sender key + nonce + a little box).
    fn disco_pkt() -> Vec<u8> {
        let mut p = disco::MAGIC.to_vec();
        p.extend_from_slice(&[7; 32 + 24 + 16 + 2]);
        p
    }

    fn client(r: &mut Registry, key: NodePublic, conn: u32, depth: usize) -> mpsc::Receiver<Outbound> {
        let (tx, rx) = mpsc::channel(depth);
        r.register(key, conn, tx);
        rx
    }

    fn drain(rx: &mut mpsc::Receiver<Outbound>) -> Vec<Outbound> {
        let mut v = Vec::new();
        while let Ok(m) = rx.try_recv() {
            v.push(m);
        }
        v
    }

    #[test]
    fn forward_delivers_and_full_queue_drops() {
        let now = Instant::now();
        let mut r = Registry::default();
        let _a = client(&mut r, k(1), 1, 4);
        let mut b = client(&mut r, k(2), 2, 2);
        assert_eq!(r.forward(&k(1), &k(2), b"one", now), Forward::Delivered);
        assert_eq!(r.forward(&k(1), &k(2), b"two", now), Forward::Delivered);
        // Queue of 2 is full: the third is dropped, the sender is not blocked.
        assert_eq!(r.forward(&k(1), &k(2), b"three", now), Forward::QueueFull);
        assert_eq!(
            drain(&mut b),
            vec![
                Outbound::Packet {
                    src: k(1),
                    data: Bytes::from_static(b"one")
                },
                Outbound::Packet {
                    src: k(1),
                    data: Bytes::from_static(b"two")
                },
            ]
        );
        assert_eq!(r.forward(&k(1), &k(2), b"four", now), Forward::Delivered);
        // A receiver that went away (writer ended) counts as a full queue, never a panic.
        drop(b);
        assert_eq!(r.forward(&k(1), &k(2), b"five", now), Forward::QueueFull);
        // In: every packet; out: only the queued ones ("one", "two", "four").
        assert_eq!(r.bytes(), (3 + 3 + 5 + 4 + 4, 3 + 3 + 4));
    }

    #[test]
    fn peer_gone_disconnected_goes_to_those_it_sent_to() {
        let now = Instant::now();
        let mut r = Registry::default();
        let mut a = client(&mut r, k(1), 1, 8);
        let mut b = client(&mut r, k(2), 2, 8);
        let mut c = client(&mut r, k(3), 3, 8);
        // A sent to B only; C sent to A.
        assert_eq!(r.forward(&k(1), &k(2), b"x", now), Forward::Delivered);
        assert_eq!(r.forward(&k(3), &k(1), b"y", now), Forward::Delivered);
        drain(&mut a);
        drain(&mut b);
        let u = r.unregister(&k(1), 1);
        assert_eq!(
            u,
            Unregistered {
                removed: true,
                notified: 1,
                dropped: 0
            }
        );
        assert_eq!(
            drain(&mut b),
            vec![Outbound::PeerGone {
                key: k(1),
                reason: PeerGoneReason::Disconnected
            }]
        );
        assert!(drain(&mut c).is_empty());
        // C's "sent to A" was pruned: C leaving notifies nobody.
        assert_eq!(
            r.unregister(&k(3), 3),
            Unregistered {
                removed: true,
                notified: 0,
                dropped: 0
            }
        );
        // Unknown key / wrong connection: no-op.
        assert_eq!(r.unregister(&k(9), 1), Unregistered::default());
        assert_eq!(r.unregister(&k(2), 99), Unregistered::default());
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn peer_gone_to_full_queue_is_counted_as_dropped() {
        let now = Instant::now();
        let mut r = Registry::default();
        let _a = client(&mut r, k(1), 1, 8);
        let _b = client(&mut r, k(2), 2, 1);
        assert_eq!(r.forward(&k(1), &k(2), b"fills B", now), Forward::Delivered);
        assert_eq!(
            r.unregister(&k(1), 1),
            Unregistered {
                removed: true,
                notified: 0,
                dropped: 1
            }
        );
    }

    #[test]
    fn not_here_only_for_disco_and_rate_limited_per_pair() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        let mut a = client(&mut r, k(1), 1, 8);
        // WireGuard-looking packet to an absent key: silently dropped.
        assert_eq!(
            r.forward(&k(1), &k(5), &[4, 0, 0, 0, 1, 2, 3], t0),
            Forward::NotHere { notified: false }
        );
        assert!(drain(&mut a).is_empty());
        let d = disco_pkt();
        assert_eq!(r.forward(&k(1), &k(5), &d, t0), Forward::NotHere { notified: true });
        assert_eq!(
            r.forward(&k(1), &k(5), &d, t0 + Duration::from_millis(500)),
            Forward::NotHere { notified: false }
        );
        // Another destination has its own budget.
        assert_eq!(
            r.forward(&k(1), &k(6), &d, t0 + Duration::from_millis(500)),
            Forward::NotHere { notified: true }
        );
        assert_eq!(
            r.forward(&k(1), &k(5), &d, t0 + Duration::from_secs(1)),
            Forward::NotHere { notified: true }
        );
        assert_eq!(
            drain(&mut a),
            vec![
                Outbound::PeerGone {
                    key: k(5),
                    reason: PeerGoneReason::NotHere
                },
                Outbound::PeerGone {
                    key: k(6),
                    reason: PeerGoneReason::NotHere
                },
                Outbound::PeerGone {
                    key: k(5),
                    reason: PeerGoneReason::NotHere
                },
            ]
        );
        // The tracking map stays bounded: a flood of absent keys within a second goes quiet.
        let t1 = t0 + Duration::from_secs(10);
        let mut notified = 0;
        for i in 0..200u8 {
            let mut key = [i; 32];
            key[0] = 0xEE;
            if r.forward(&k(1), &NodePublic(key), &d, t1) == (Forward::NotHere { notified: true }) {
                notified += 1;
            }
            drain(&mut a);
        }
        assert_eq!(notified, NOT_HERE_TRACKED);
        // A second later the budget is back.
        assert_eq!(
            r.forward(&k(1), &k(7), &d, t1 + NOT_HERE_INTERVAL),
            Forward::NotHere { notified: true }
        );
        // An unregistered sender gets nothing.
        assert_eq!(r.forward(&k(8), &k(9), &d, t1), Forward::NotHere { notified: false });
    }

    #[test]
    fn duplicate_key_replaces_and_old_queue_closes() {
        let now = Instant::now();
        let mut r = Registry::default();
        let _a = client(&mut r, k(1), 1, 8);
        let mut b_old = client(&mut r, k(2), 2, 8);
        assert_eq!(r.forward(&k(2), &k(1), b"from old B", now), Forward::Delivered);
        let (tx, mut b_new) = mpsc::channel(8);
        assert!(r.register(k(2), 3, tx));
        assert_eq!(r.len(), 2);
        // The old queue has no sender left: its writer sees the end and closes the connection.
        assert!(matches!(b_old.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)));
        // Packets go to the newest connection.
        assert_eq!(r.forward(&k(1), &k(2), b"hi", now), Forward::Delivered);
        assert_eq!(
            drain(&mut b_new),
            vec![Outbound::Packet {
                src: k(1),
                data: Bytes::from_static(b"hi")
            }]
        );
        // The old connection's cleanup does not remove the new one.
        assert_eq!(r.unregister(&k(2), 2), Unregistered::default());
        assert!(r.contains(&k(2)));
        // The "sent to" set carried over: A still hears that B left.
        let mut a = client(&mut r, k(1), 1, 8);
        assert_eq!(
            r.unregister(&k(2), 3),
            Unregistered {
                removed: true,
                notified: 1,
                dropped: 0
            }
        );
        assert_eq!(
            drain(&mut a),
            vec![Outbound::PeerGone {
                key: k(2),
                reason: PeerGoneReason::Disconnected
            }]
        );
    }

    #[test]
    fn preferred_is_recorded_for_the_current_connection_only() {
        let mut r = Registry::default();
        let _a = client(&mut r, k(1), 1, 8);
        r.note_preferred(&k(1), 1, true);
        r.note_preferred(&k(1), 7, false);
        assert_eq!(r.home_clients(), 1);
        r.note_preferred(&k(1), 1, false);
        assert_eq!(r.home_clients(), 0);
    }

    #[test]
    fn embedded_region_follows_headscale() {
        let cfg = DerpConfig {
            server_stun_listen_addr: "0.0.0.0:3479".parse().unwrap(),
            ..DerpConfig::default()
        };
        let r = embedded_region(&cfg, "https://hs.example.com");
        assert_eq!((r.region_id, r.region_code.as_str()), (999, "headscale"));
        assert_eq!(r.region_name, "Headscale Embedded DERP");
        let n = &r.nodes[0];
        assert_eq!(
            (n.name.as_str(), n.region_id, n.host_name.as_str()),
            ("999", 999, "hs.example.com")
        );
        assert_eq!((n.derp_port, n.stun_port, n.insecure_for_tests), (443, 3479, false));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["Nodes"][0]["DERPPort"], 443);
        assert_eq!(json["Nodes"][0]["STUNPort"], 3479);
        assert_eq!(json["Nodes"][0]["Name"], "999");
        assert!(json["Nodes"][0].get("IPv4").is_none() && json["Nodes"][0].get("IPv6").is_none());
        let cfg = DerpConfig {
            server_ipv4: "198.51.100.1".parse().ok(),
            server_ipv6: "2001:db8::1".parse().ok(),
            ..cfg
        };
        let json = serde_json::to_value(embedded_region(&cfg, "https://hs.example.com")).unwrap();
        assert_eq!(
            (&json["Nodes"][0]["IPv4"], &json["Nodes"][0]["IPv6"]),
            (&serde_json::json!("198.51.100.1"), &serde_json::json!("2001:db8::1"))
        );
        for (url, host, port) in [
            ("http://127.0.0.1:8080", "127.0.0.1", 8080),
            ("http://router.lan", "router.lan", 80),
            ("https://h:8443/base/", "h", 8443),
            ("https://[2001:db8::1]:444", "2001:db8::1", 444),
            ("http://[::1]", "::1", 80),
            ("https://user@h.example", "h.example", 443),
        ] {
            assert_eq!(url_host_port(url), (host.to_string(), port), "{url}");
        }
    }

    #[test]
    fn challenge_rule() {
        assert_eq!(
            challenge_response("abc.DEF_1:2-3").as_deref(),
            Some("response abc.DEF_1:2-3")
        );
        assert_eq!(challenge_response(&"a".repeat(64)).map(|s| s.len()), Some(64 + 9));
        assert_eq!(challenge_response(&"a".repeat(65)), None);
        assert_eq!(challenge_response("a b"), None);
        assert_eq!(challenge_response("a\r\nX: y"), None);
        assert_eq!(challenge_response(""), None);
    }

    #[test]
    fn outbound_encodes_as_frames() {
        let mut out = Vec::new();
        Outbound::Pong(*b"12345678").encode(&mut out);
        Outbound::PeerGone {
            key: k(3),
            reason: PeerGoneReason::NotHere,
        }
        .encode(&mut out);
        Outbound::Packet {
            src: k(4),
            data: Bytes::from_static(b"p"),
        }
        .encode(&mut out);
        let mut r = FrameReader::default();
        r.push(&out);
        let mut got = Vec::new();
        while let Some((ty, p)) = r.next_frame().unwrap() {
            got.push(Frame::decode(ty, p).unwrap());
        }
        assert_eq!(
            got,
            vec![
                Frame::Pong(*b"12345678"),
                Frame::PeerGone {
                    key: k(3),
                    reason: PeerGoneReason::NotHere
                },
                Frame::RecvPacket {
                    src: k(4),
                    packet: Bytes::from_static(b"p")
                },
            ]
        );
    }
}
