//! WireGuard for every peer of the netmap: one boringtun [`Tunn`] per peer, cryptokey routing
//! in both directions, and the periodic timer tick.
//!
//! Mirrors boringtun `device/mod.rs` (peer table, `peers_by_idx` demux by `receiver_idx >> 8`,
//! `parse_handshake_anon` for handshake initiations, the shared handshake [`RateLimiter`], the
//! 250 ms `update_timers` tick) and the parts of wireguard-go `device/{allowedips,receive}.go`
//! that Tailscale relies on (longest-prefix AllowedIPs; an inbound packet is accepted only if
//! its source address routes back to the peer that sent it). Tailscale's wgengine feeds it the
//! netmap: each peer's node key is its WireGuard static key, the PSK is zero (none), and there is
//! no persistent keepalive (magicsock's disco heartbeats keep paths warm).
//!
//! Pure glue, sans I/O: nothing here touches a socket or the TUN. The caller
//! * feeds packets read from the TUN to [`WgPeers::encapsulate`] and sends the returned
//!   [`Outgoing`] datagram to `peer` over whatever path magicsock picks (UDP or DERP: the
//!   transport is chosen by peer key, never by address);
//! * feeds every WireGuard datagram from UDP or DERP to [`WgPeers::decapsulate`], writes
//!   [`RecvResult::to_tun`] to the TUN, sends [`RecvResult::to_peers`], and sends
//!   [`RecvResult::reply`] (a cookie under load) back on the path the datagram came in on;
//! * on the per-packet path, may use [`WgPeers::encapsulate_to`] and [`WgPeers::decapsulate_to`]
//!   instead, which write the data message or the decrypted packet into a buffer the caller
//!   owns and reuses (boringtun's own contract), so a packet costs no heap allocation;
//! * calls [`WgPeers::update_timers`] every [`TIMER_TICK`] and sends what it returns;
//! * applies netmap changes with [`WgPeers::set_peers`] (sessions of unchanged peers survive).
//!
//! boringtun keeps its own monotonic clock (`sleepyinstant`) and draws handshake ephemerals from
//! `OsRng` internally; those are the only clock and randomness used, and they stay inside it.
//! The index seed comes in from the caller.
//!
//! Wire types (WireGuard whitepaper §5.4, little-endian; `receiver_idx >> 8` selects the peer
//! because boringtun builds indices as `peer_index << 8 | session`):
//! ```text
//! type 1 initiation  148 B  [1,0,0,0][sender:4][ephemeral:32][static:48][timestamp:28][mac1:16][mac2:16]
//! type 2 response     92 B  [2,0,0,0][sender:4][receiver:4][ephemeral:32][empty:16][mac1:16][mac2:16]
//! type 3 cookie       64 B  [3,0,0,0][receiver:4][nonce:24][cookie:32]
//! type 4 data       >=32 B  [4,0,0,0][receiver:4][counter:8][ciphertext + tag:16]
//! ```
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    hash::{BuildHasherDefault, Hasher},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use boringtun::{
    noise::{
        errors::WireGuardError, handshake::parse_handshake_anon, rate_limiter::RateLimiter, Packet, Tunn, TunnResult,
    },
    x25519::{PublicKey, StaticSecret},
};

use crate::wire::{
    keys::{NodePrivate, NodePublic},
    prefix::{ip_bits, mask_bits, Prefix},
    tailcfg::Node,
};

/// How often [`WgPeers::update_timers`] should run (boringtun device `TIMERS_TICK`, 250 ms):
/// WireGuard's timers have one-second granularity, so a quarter second is precise enough.
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// Handshake messages per second across all peers before we demand cookies (boringtun device
/// `HANDSHAKE_RATE_LIMIT`, 100). Each one costs several X25519 operations.
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Largest IP packet accepted for encryption (the IPv4/IPv6 total-length field maximum).
pub const MAX_PACKET: usize = 65535;

/// Data message overhead: 16-byte header plus the 16-byte Poly1305 tag.
pub const DATA_OVERHEAD: usize = 32;

/// A handshake initiation's size, the smallest scratch buffer boringtun accepts.
pub const MIN_BUF: usize = 148;

/// A buffer for [`WgPeers::decapsulate_to`] of at least this size also serves to release the
/// packets queued during a handshake without a scratch allocation of our own.
pub const FLUSH_ROOM: usize = MAX_PACKET + DATA_OVERHEAD;

/// The buffer [`WgPeers::encapsulate_to`] needs for an IP packet of `len` bytes: the data
/// message, or a handshake initiation if no session exists yet.
pub fn encapsulate_room(len: usize) -> usize {
    (len + DATA_OVERHEAD).max(MIN_BUF)
}

/// Peer indices are 24 bits; the low 8 bits of a wire index number the peer's sessions.
const INDEX_MASK: u32 = 0x00ff_ffff;

/// A hash map for the lookups made per packet (receiver index, AllowedIPs, peer key).
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// A multiply-rotate hasher (the FxHash construction) for [`FastMap`]: a few instructions per
/// word where std's SipHash-1-3 spends dozens, and SipHash showed as 5% of the data plane's
/// user-space instructions (callgrind, receiving side). SipHash's keyed flooding resistance
/// buys nothing here: the keys inserted into these maps come from the netmap and from our own
/// index allocation, never from the wire; wire values are only looked up.
#[derive(Debug, Clone, Copy, Default)]
pub struct FastHasher(u64);

impl FastHasher {
    /// The FxHash seed (a 64-bit odd constant derived from pi).
    const K: u64 = 0x517c_c1b7_2722_0a95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_u128(&mut self, n: u128) {
        self.add(n as u64);
        self.add((n >> 64) as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A longest-prefix-match table from IP prefixes to values (wireguard-go `AllowedIPs`).
///
/// One hash map per distinct prefix length, longest first: a lookup costs at most one probe per
/// length in use (a handful in a tailnet: /32, /128, a few subnet lengths), without the code of
/// a trie. Inserting a prefix that is already present replaces its value, as in wireguard-go.
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    /// `[IPv4, IPv6]`, each sorted by prefix length, longest first.
    levels: [Vec<(u8, FastMap<u128, T>)>; 2],
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            levels: [Vec::new(), Vec::new()],
        }
    }
}

impl<T> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn family(ip: &IpAddr) -> usize {
        usize::from(ip.is_ipv6())
    }

    /// Maps `prefix` (host bits ignored) to `value`, returning the value it replaced.
    pub fn insert(&mut self, prefix: Prefix, value: T) -> Option<T> {
        let (addr, len) = (prefix.masked().addr(), prefix.bits());
        let levels = &mut self.levels[Self::family(&addr)];
        let pos = match levels.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(p) => p,
            Err(p) => {
                levels.insert(p, (len, FastMap::default()));
                p
            }
        };
        levels[pos].1.insert(ip_bits(addr), value)
    }

    /// The value of the longest prefix containing `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        let bits = ip_bits(ip);
        self.levels[Self::family(&ip)]
            .iter()
            .find_map(|(len, map)| map.get(&(bits & mask_bits(ip, *len))))
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.levels = [Vec::new(), Vec::new()];
    }

    /// Number of prefixes.
    pub fn len(&self) -> usize {
        self.levels.iter().flatten().map(|(_, m)| m.len()).sum()
    }

    /// True when no prefix is present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What WireGuard needs to know about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's node key, its WireGuard static public key.
    pub key: NodePublic,
    /// Prefixes routed to this peer and accepted as source addresses from it.
    pub allowed_ips: Vec<Prefix>,
}

impl PeerConfig {
    /// From a netmap peer: `Key` and `AllowedIPs` (falling back to `Addresses` if control sent
    /// none). Unparsable prefixes are skipped with a warning rather than losing the whole peer.
    pub fn from_node(node: &Node) -> PeerConfig {
        let src = if node.allowed_ips.is_empty() {
            &node.addresses
        } else {
            &node.allowed_ips
        };
        let allowed_ips = src
            .iter()
            .filter_map(|s| match s.parse() {
                Ok(p) => Some(p),
                Err(_) => {
                    log::warn!("wg: peer={} ignoring bad allowed IP {s:?}", node.key.short());
                    None
                }
            })
            .collect();
        PeerConfig {
            key: node.key,
            allowed_ips,
        }
    }
}

/// A datagram to send to `peer` over the path magicsock chooses for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The destination peer.
    pub peer: NodePublic,
    /// The WireGuard message.
    pub datagram: Vec<u8>,
}

/// Why a packet or datagram was dropped (also the keys of [`WgStats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WgError {
    /// Not a WireGuard message, or an inner packet that is not IP.
    #[error("malformed packet")]
    Malformed,
    /// No configured peer owns this handshake key or receiver index.
    #[error("unknown peer")]
    UnknownPeer,
    /// Failed authentication, replay, stale timestamp, or no session for it.
    #[error("rejected by WireGuard")]
    Rejected,
    /// The decrypted packet's source address does not route back to its sender.
    #[error("source address not allowed for peer")]
    BadSource,
    /// Handshake rate limit hit and no address to send a cookie to.
    #[error("handshake rate limit")]
    UnderLoad,
    /// No peer's AllowedIPs contain the destination.
    #[error("no route to destination")]
    NoRoute,
    /// The packet exceeds [`MAX_PACKET`].
    #[error("packet too big")]
    TooBig,
}

impl From<WireGuardError> for WgError {
    fn from(e: WireGuardError) -> WgError {
        match e {
            WireGuardError::InvalidPacket
            | WireGuardError::IncorrectPacketLength
            | WireGuardError::WrongPacketType
            | WireGuardError::DestinationBufferTooSmall => WgError::Malformed,
            WireGuardError::UnderLoad => WgError::UnderLoad,
            _ => WgError::Rejected,
        }
    }
}

/// Drop and traffic counters (plain integers: one owner, no atomics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WgStats {
    /// Inner packets delivered to the TUN.
    pub rx_packets: u64,
    /// Datagrams produced for peers (data, handshakes, keepalives).
    pub tx_datagrams: u64,
    /// Dropped: malformed input.
    pub malformed: u64,
    /// Dropped: unknown peer.
    pub unknown_peer: u64,
    /// Dropped: rejected by WireGuard.
    pub rejected: u64,
    /// Dropped: cryptokey routing (source not allowed for the sending peer).
    pub bad_source: u64,
    /// Dropped: under load without a cookie path.
    pub under_load: u64,
    /// Dropped outbound: no route.
    pub no_route: u64,
    /// Dropped outbound: too big.
    pub too_big: u64,
}

impl WgStats {
    fn count(&mut self, e: WgError) {
        let c = match e {
            WgError::Malformed => &mut self.malformed,
            WgError::UnknownPeer => &mut self.unknown_peer,
            WgError::Rejected => &mut self.rejected,
            WgError::BadSource => &mut self.bad_source,
            WgError::UnderLoad => &mut self.under_load,
            WgError::NoRoute => &mut self.no_route,
            WgError::TooBig => &mut self.too_big,
        };
        *c += 1;
    }
}

/// Everything that came out of one inbound datagram. `P` is the decrypted packet: an owned
/// `Vec<u8>` from [`WgPeers::decapsulate`], or its length at the start of the caller's buffer
/// (`usize`) from [`WgPeers::decapsulate_to`].
#[derive(Debug, PartialEq, Eq)]
pub struct RecvResult<P = Vec<u8>> {
    /// The peer the datagram was attributed to (after authentication for handshakes).
    pub peer: Option<NodePublic>,
    /// A decrypted IP packet for the TUN (already checked against the peer's AllowedIPs).
    pub to_tun: Option<P>,
    /// Datagrams for the peer: handshake response, keepalive, packets queued during the handshake.
    pub to_peers: Vec<Outgoing>,
    /// A cookie reply (rate limit) to send back on the path the datagram arrived on.
    pub reply: Option<Vec<u8>>,
    /// Why the datagram was dropped, if it was.
    pub dropped: Option<WgError>,
}

impl<P> Default for RecvResult<P> {
    fn default() -> Self {
        RecvResult {
            peer: None,
            to_tun: None,
            to_peers: Vec::new(),
            reply: None,
            dropped: None,
        }
    }
}

/// Per-peer status, for `tinyscale status`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerStats {
    /// Time since the current session's handshake; `None` without a session.
    pub since_handshake: Option<Duration>,
    /// Inner bytes sent.
    pub tx_bytes: usize,
    /// Inner bytes received.
    pub rx_bytes: usize,
}

/// What [`WgPeers::set_peers`] changed, for logging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerChanges {
    /// New peers.
    pub added: usize,
    /// Peers whose AllowedIPs changed (sessions kept).
    pub updated: usize,
    /// Peers gone.
    pub removed: usize,
}

struct Peer {
    tunn: Tunn,
    index: u32,
    allowed_ips: Vec<Prefix>,
}

/// The WireGuard peer table of one node.
pub struct WgPeers {
    secret: StaticSecret,
    public: PublicKey,
    peers: BTreeMap<NodePublic, Peer>,
    by_index: FastMap<u32, NodePublic>,
    allowed: AllowedIps<NodePublic>,
    /// Mixes index allocation so the wire does not reveal the peer count (boringtun `IndexLfsr`).
    index_seed: u32,
    index_counter: u32,
    limiter: Arc<RateLimiter>,
    /// Scratch for boringtun's output; grows to the largest packet seen, never shrinks.
    buf: Vec<u8>,
    stats: WgStats,
}

impl fmt::Debug for WgPeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WgPeers")
            .field("public", &self.public_key())
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl WgPeers {
    /// A table for the node with private key `private`. `index_seed` should be random; it
    /// scrambles the 24-bit session indices this node hands out.
    pub fn new(private: &NodePrivate, index_seed: u32) -> WgPeers {
        let secret = StaticSecret::from(private.to_bytes());
        let public = PublicKey::from(&secret);
        WgPeers {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            peers: BTreeMap::new(),
            by_index: FastMap::default(),
            allowed: AllowedIps::new(),
            index_seed,
            index_counter: 0,
            buf: vec![0; 2048],
            stats: WgStats::default(),
        }
    }

    /// Our node key.
    pub fn public_key(&self) -> NodePublic {
        NodePublic(self.public.to_bytes())
    }

    /// Replaces the peer set: new peers are added, vanished peers removed, and peers that stay
    /// keep their sessions (only their AllowedIPs are updated). Our own key is ignored. If two
    /// peers claim the same prefix, the one with the larger key wins (deterministic; control
    /// does not send such netmaps).
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = PeerConfig>) -> PeerChanges {
        let me = self.public_key();
        // Inserted one by one: `collect()` into a BTreeMap compiles a stable sort per call site.
        let mut want: BTreeMap<NodePublic, Vec<Prefix>> = BTreeMap::new();
        for p in peers {
            if p.key != me && !p.key.is_zero() {
                want.insert(p.key, p.allowed_ips);
            }
        }
        let mut changes = PeerChanges::default();
        let gone: Vec<NodePublic> = self.peers.keys().filter(|k| !want.contains_key(k)).copied().collect();
        for k in gone {
            self.drop_peer(&k);
            changes.removed += 1;
        }
        for (key, allowed_ips) in want {
            match self.peers.get_mut(&key) {
                Some(p) if p.allowed_ips == allowed_ips => {}
                Some(p) => {
                    p.allowed_ips = allowed_ips;
                    changes.updated += 1;
                }
                None => {
                    self.add_peer(key, allowed_ips);
                    changes.added += 1;
                }
            }
        }
        self.rebuild_allowed();
        changes
    }

    /// Adds `cfg.key` or updates its AllowedIPs (keeping its sessions). Returns true if new.
    pub fn upsert_peer(&mut self, cfg: PeerConfig) -> bool {
        if cfg.key == self.public_key() || cfg.key.is_zero() {
            return false;
        }
        let new = match self.peers.get_mut(&cfg.key) {
            Some(p) => {
                p.allowed_ips = cfg.allowed_ips;
                false
            }
            None => {
                self.add_peer(cfg.key, cfg.allowed_ips);
                true
            }
        };
        self.rebuild_allowed();
        new
    }

    /// Removes a peer and its sessions. Returns true if it was present.
    pub fn remove_peer(&mut self, key: &NodePublic) -> bool {
        let found = self.drop_peer(key);
        if found {
            self.rebuild_allowed();
        }
        found
    }

    /// True if `key` is a configured peer.
    pub fn contains(&self, key: &NodePublic) -> bool {
        self.peers.contains_key(key)
    }

    /// The configured peers, in key order.
    pub fn peer_keys(&self) -> impl Iterator<Item = &NodePublic> {
        self.peers.keys()
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True without peers.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The peer whose AllowedIPs best match `dst` (longest prefix).
    pub fn lookup(&self, dst: IpAddr) -> Option<NodePublic> {
        self.allowed.lookup(dst).copied()
    }

    /// Counters since creation.
    pub fn stats(&self) -> WgStats {
        self.stats
    }

    /// Session and byte counters of one peer.
    pub fn peer_stats(&self, key: &NodePublic) -> Option<PeerStats> {
        self.peers.get(key).map(|p| {
            let (since_handshake, tx_bytes, rx_bytes, _loss, _rtt) = p.tunn.stats();
            PeerStats {
                since_handshake,
                tx_bytes,
                rx_bytes,
            }
        })
    }

    /// Encrypts one IP packet read from the TUN for the peer that owns its destination.
    ///
    /// `Ok(Some)` is a datagram to send: the data message, or a handshake initiation when there
    /// is no session yet (the packet then waits inside boringtun and comes out of a later
    /// [`decapsulate`](Self::decapsulate) as part of `to_peers`). `Ok(None)`: queued behind a
    /// handshake already in progress.
    pub fn encapsulate(&mut self, packet: &[u8]) -> Result<Option<Outgoing>, WgError> {
        let mut buf = std::mem::take(&mut self.buf);
        grow(&mut buf, encapsulate_room(packet.len()));
        let r = self.encapsulate_to(packet, &mut buf).map(|o| {
            o.map(|(peer, n)| Outgoing {
                peer,
                datagram: buf[..n].to_vec(),
            })
        });
        self.buf = buf;
        r
    }

    /// [`encapsulate`](Self::encapsulate) without allocating: the datagram is written to the
    /// start of `out`, and `Ok(Some((peer, len)))` gives its destination and length. `out` must
    /// hold at least [`encapsulate_room`]`(packet.len())` bytes, else the packet is dropped as
    /// [`WgError::TooBig`].
    pub fn encapsulate_to(&mut self, packet: &[u8], out: &mut [u8]) -> Result<Option<(NodePublic, usize)>, WgError> {
        let r = self.encapsulate_inner(packet, out);
        match &r {
            Ok(Some(_)) => self.stats.tx_datagrams += 1,
            Ok(None) => {}
            Err(e) => self.stats.count(*e),
        }
        r
    }

    fn encapsulate_inner(&mut self, packet: &[u8], out: &mut [u8]) -> Result<Option<(NodePublic, usize)>, WgError> {
        // boringtun panics on a short buffer; refuse instead.
        if packet.len() > MAX_PACKET || out.len() < encapsulate_room(packet.len()) {
            return Err(WgError::TooBig);
        }
        let dst = Tunn::dst_address(packet).ok_or(WgError::Malformed)?;
        let key = *self.allowed.lookup(dst).ok_or(WgError::NoRoute)?;
        let peer = self.peers.get_mut(&key).ok_or(WgError::NoRoute)?;
        match peer.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(d) => Ok(Some((key, d.len()))),
            TunnResult::Done => Ok(None),
            TunnResult::Err(e) => Err(e.into()),
            // encapsulate never yields tunnel writes.
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Err(WgError::Malformed),
        }
    }

    /// Handles one WireGuard datagram from UDP or DERP. `src` is the UDP source address (`None`
    /// via DERP); it only matters for cookies under load.
    pub fn decapsulate(&mut self, src: Option<IpAddr>, datagram: &[u8]) -> RecvResult {
        let mut buf = vec![0; datagram.len().max(MIN_BUF)];
        let r = self.decapsulate_to(src, datagram, &mut buf);
        RecvResult {
            peer: r.peer,
            to_tun: r.to_tun.map(|n| buf[..n].to_vec()),
            to_peers: r.to_peers,
            reply: r.reply,
            dropped: r.dropped,
        }
    }

    /// [`decapsulate`](Self::decapsulate) without allocating for data messages: a decrypted
    /// packet is written to the start of `out` and [`RecvResult::to_tun`] is its length. `out`
    /// must hold at least `datagram.len()` bytes (and [`MIN_BUF`]), else the datagram is dropped
    /// as [`WgError::Malformed`]. Handshake traffic still comes back as owned datagrams.
    pub fn decapsulate_to(&mut self, src: Option<IpAddr>, datagram: &[u8], out: &mut [u8]) -> RecvResult<usize> {
        let mut res = RecvResult::default();
        if let Err(e) = self.decapsulate_inner(src, datagram, out, &mut res) {
            log::trace!("wg: drop datagram len={} peer={:?}: {e}", datagram.len(), res.peer);
            self.stats.count(e);
            res.dropped = Some(e);
        }
        self.stats.tx_datagrams += res.to_peers.len() as u64;
        if res.to_tun.is_some() {
            self.stats.rx_packets += 1;
        }
        res
    }

    fn decapsulate_inner(
        &mut self,
        src: Option<IpAddr>,
        datagram: &[u8],
        out: &mut [u8],
        res: &mut RecvResult<usize>,
    ) -> Result<(), WgError> {
        if datagram.is_empty() {
            // boringtun reads an empty datagram as "flush the queue"; that is not input.
            return Err(WgError::Malformed);
        }
        // boringtun panics on a short buffer; refuse instead.
        if out.len() < datagram.len().max(MIN_BUF) {
            return Err(WgError::Malformed);
        }
        grow(&mut self.buf, datagram.len());
        // Check mac1 and the global handshake rate before anything costly (boringtun device).
        let key = match self.limiter.verify_packet(src, datagram, &mut self.buf) {
            Ok(Packet::HandshakeInit(p)) => parse_handshake_anon(&self.secret, &self.public, &p)
                .map(|h| NodePublic(h.peer_static_public))
                .map_err(|_| WgError::UnknownPeer)?,
            Ok(Packet::HandshakeResponse(p)) => self.key_for_index(p.receiver_idx)?,
            Ok(Packet::PacketCookieReply(p)) => self.key_for_index(p.receiver_idx)?,
            Ok(Packet::PacketData(p)) => self.key_for_index(p.receiver_idx)?,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                res.reply = Some(cookie.to_vec());
                return Ok(());
            }
            Err(TunnResult::Err(e)) => return Err(e.into()),
            Err(_) => return Err(WgError::Malformed),
        };
        let peer = self.peers.get_mut(&key).ok_or(WgError::UnknownPeer)?;
        res.peer = Some(key);
        let to_peer = |d: &[u8]| Outgoing {
            peer: key,
            datagram: d.to_vec(),
        };
        // boringtun decrypts in place at the start of `out` (Session::receive_packet_data).
        match peer.tunn.decapsulate(src, datagram, out) {
            TunnResult::Done => Ok(()),
            TunnResult::Err(e) => Err(e.into()),
            TunnResult::WriteToNetwork(d) => {
                res.to_peers.push(to_peer(d));
                // A new session may release packets queued during the handshake: any size up to
                // MAX_PACKET, so the scratch must hold the largest data message. The caller's
                // buffer usually does (and its untouched pages cost no memory); else ours grows.
                let scratch: &mut [u8] = if out.len() >= FLUSH_ROOM {
                    out
                } else {
                    grow(&mut self.buf, FLUSH_ROOM);
                    &mut self.buf
                };
                while let TunnResult::WriteToNetwork(d) = peer.tunn.decapsulate(None, &[], scratch) {
                    res.to_peers.push(to_peer(d));
                }
                Ok(())
            }
            TunnResult::WriteToTunnelV4(pkt, ip) => {
                check_source(&self.allowed, &key, IpAddr::V4(ip))?;
                res.to_tun = Some(pkt.len());
                Ok(())
            }
            TunnResult::WriteToTunnelV6(pkt, ip) => {
                check_source(&self.allowed, &key, IpAddr::V6(ip))?;
                res.to_tun = Some(pkt.len());
                Ok(())
            }
        }
    }

    /// Runs every peer's WireGuard timers (handshake retries, rekeys, keepalives) and returns the
    /// datagrams they produce. Call every [`TIMER_TICK`].
    pub fn update_timers(&mut self) -> Vec<Outgoing> {
        self.limiter.reset_count();
        let mut out = Vec::new();
        for (key, peer) in &mut self.peers {
            match peer.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(d) => out.push(Outgoing {
                    peer: *key,
                    datagram: d.to_vec(),
                }),
                // ConnectionExpired after REKEY_ATTEMPT_TIME: boringtun already dropped the
                // queue; the next outbound packet starts a fresh handshake.
                TunnResult::Err(_) | TunnResult::Done => {}
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
        self.stats.tx_datagrams += out.len() as u64;
        out
    }

    fn key_for_index(&self, receiver_idx: u32) -> Result<NodePublic, WgError> {
        self.by_index
            .get(&(receiver_idx >> 8))
            .copied()
            .ok_or(WgError::UnknownPeer)
    }

    fn add_peer(&mut self, key: NodePublic, allowed_ips: Vec<Prefix>) {
        let index = self.alloc_index();
        // Zero PSK (Tailscale uses none) and no persistent keepalive (magicsock heartbeats);
        // `None` rate limiter: each Tunn rate-limits its own handshakes as well.
        let tunn = Tunn::new(self.secret.clone(), PublicKey::from(key.0), None, None, index, None);
        self.by_index.insert(index, key);
        self.peers.insert(
            key,
            Peer {
                tunn,
                index,
                allowed_ips,
            },
        );
        log::debug!("wg: peer={} added", key.short());
    }

    fn drop_peer(&mut self, key: &NodePublic) -> bool {
        match self.peers.remove(key) {
            Some(p) => {
                self.by_index.remove(&p.index);
                log::debug!("wg: peer={} removed", key.short());
                true
            }
            None => false,
        }
    }

    /// A fresh 24-bit index: a counter through a bijection of 2^24 (odd multiply, xor seed),
    /// skipping indices still in use.
    fn alloc_index(&mut self) -> u32 {
        loop {
            let i = (self.index_counter.wrapping_mul(0x9e37_79b1) ^ self.index_seed) & INDEX_MASK;
            self.index_counter = self.index_counter.wrapping_add(1) & INDEX_MASK;
            if !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    fn rebuild_allowed(&mut self) {
        self.allowed.clear();
        for (key, p) in &self.peers {
            for pfx in &p.allowed_ips {
                self.allowed.insert(*pfx, *key);
            }
        }
    }
}

/// Cryptokey routing, inbound (wireguard-go `RoutineSequentialReceiver`): the source must route
/// back to the peer that sent the packet.
fn check_source(allowed: &AllowedIps<NodePublic>, peer: &NodePublic, src: IpAddr) -> Result<(), WgError> {
    if allowed.lookup(src) == Some(peer) {
        Ok(())
    } else {
        Err(WgError::BadSource)
    }
}

fn grow(buf: &mut Vec<u8>, need: usize) {
    let need = need.max(MIN_BUF);
    if buf.len() < need {
        buf.resize(need, 0);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::*;

    fn pfx(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A minimal IPv4 packet (UDP protocol number, no checksum) with `payload`.
    fn ipv4(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (ip(src), ip(dst)) else {
            panic!("v4 only")
        };
        let total = (20 + payload.len()) as u16;
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&s.octets());
        p.extend_from_slice(&d.octets());
        p.extend_from_slice(payload);
        p
    }

    /// A minimal IPv6 packet (next header UDP) with `payload`.
    fn ipv6(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
        let (IpAddr::V6(s), IpAddr::V6(d)) = (ip(src), ip(dst)) else {
            panic!("v6 only")
        };
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[17, 64]);
        p.extend_from_slice(&s.octets());
        p.extend_from_slice(&d.octets());
        p.extend_from_slice(payload);
        p
    }

    fn key(n: u8) -> NodePrivate {
        NodePrivate::from_random([n; 32])
    }

    /// Two nodes and the wires between them (ts_tunnel `EndpointPair` style).
    struct Pair {
        a: WgPeers,
        b: WgPeers,
        /// Datagrams in flight, tagged with their destination node (true = b).
        wire: VecDeque<(bool, Vec<u8>)>,
        a_tun: Vec<Vec<u8>>,
        b_tun: Vec<Vec<u8>>,
        /// When true, datagrams are lost instead of delivered.
        cut: bool,
    }

    impl Pair {
        /// a = 100.64.0.1 + fd7a:115c:a1e0::1; b = 100.64.0.2 + fd7a:115c:a1e0::2 + 10.0.0.0/24.
        fn new() -> Pair {
            let (ka, kb) = (key(1), key(2));
            let mut a = WgPeers::new(&ka, 0x1234);
            let mut b = WgPeers::new(&kb, 0x1234); // same seed: indices collide across nodes, fine
            a.set_peers([PeerConfig {
                key: kb.public(),
                allowed_ips: vec![pfx("100.64.0.2/32"), pfx("fd7a:115c:a1e0::2/128"), pfx("10.0.0.0/24")],
            }]);
            b.set_peers([PeerConfig {
                key: ka.public(),
                allowed_ips: vec![pfx("100.64.0.1/32"), pfx("fd7a:115c:a1e0::1/128")],
            }]);
            Pair {
                a,
                b,
                wire: VecDeque::new(),
                a_tun: vec![],
                b_tun: vec![],
                cut: false,
            }
        }

        fn queue(&mut self, to_b: bool, outs: impl IntoIterator<Item = Outgoing>) {
            let dst_key = if to_b { self.b.public_key() } else { self.a.public_key() };
            for o in outs {
                assert_eq!(o.peer, dst_key, "datagram addressed to the wrong peer");
                if !self.cut {
                    self.wire.push_back((to_b, o.datagram));
                }
            }
        }

        /// Sends a packet from a's (or b's) TUN.
        fn send(&mut self, from_a: bool, pkt: &[u8]) -> Result<(), WgError> {
            let node = if from_a { &mut self.a } else { &mut self.b };
            let out = node.encapsulate(pkt)?;
            self.queue(from_a, out);
            Ok(())
        }

        /// Delivers until the wire is empty; returns the drop reasons seen.
        fn pump(&mut self) -> Vec<WgError> {
            let mut drops = vec![];
            let mut steps = 0;
            while let Some((to_b, d)) = self.wire.pop_front() {
                steps += 1;
                assert!(steps < 100, "ping-pong loop on the wire");
                let node = if to_b { &mut self.b } else { &mut self.a };
                let r = node.decapsulate(Some(ip("192.0.2.1")), &d);
                drops.extend(r.dropped);
                assert!(r.reply.is_none());
                if let Some(p) = r.to_tun {
                    if to_b { &mut self.b_tun } else { &mut self.a_tun }.push(p);
                }
                self.queue(!to_b, r.to_peers);
            }
            drops
        }
    }

    #[test]
    fn handshake_then_data_both_ways() {
        let mut t = Pair::new();
        let p1 = ipv4("100.64.0.1", "100.64.0.2", b"hello");
        t.send(true, &p1).unwrap();
        // No session yet: the first datagram is a handshake initiation (type 1, 148 bytes).
        assert_eq!(t.wire[0].1[0], 1);
        assert_eq!(t.wire[0].1.len(), 148);
        assert!(t.pump().is_empty());
        assert_eq!(t.b_tun, vec![p1.clone()], "queued packet released after the handshake");

        let p2 = ipv6("fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1", b"back");
        t.send(false, &p2).unwrap();
        assert_eq!(t.wire[0].1[0], 4, "session exists: data message");
        assert!(t.pump().is_empty());
        assert_eq!(t.a_tun, vec![p2]);

        // Subnet route: a reaches 10.0.0.7 through b; b answers from inside its subnet.
        let p3 = ipv4("100.64.0.1", "10.0.0.7", b"subnet");
        t.send(true, &p3).unwrap();
        t.pump();
        assert_eq!(t.b_tun.last(), Some(&p3));
        let p4 = ipv4("10.0.0.7", "100.64.0.1", b"from subnet");
        t.send(false, &p4).unwrap();
        assert!(t.pump().is_empty());
        assert_eq!(t.a_tun.last(), Some(&p4));

        let s = t.a.peer_stats(&t.b.public_key()).unwrap();
        assert!(s.since_handshake.is_some());
        assert!(s.rx_bytes > 0 && s.tx_bytes > 0);
        assert_eq!(t.a.stats().rx_packets, 2);
    }

    /// The allocation-free calls with one reused buffer per direction (as the engine uses them):
    /// many packets of varying sizes, both ways, each arrives exactly as sent although every
    /// packet overwrites the previous one's bytes in the same buffers.
    #[test]
    fn reused_buffers_round_trip_many_packets() {
        let mut t = Pair::new();
        // Handshake first through the allocating calls.
        t.send(true, &ipv4("100.64.0.1", "100.64.0.2", b"hi")).unwrap();
        assert!(t.pump().is_empty());
        let mut wire_buf = vec![0u8; 2048];
        let mut plain_buf = vec![0u8; 2048];
        for i in 0..500usize {
            let from_a = i % 3 != 0;
            let payload: Vec<u8> = (0..(i * 37) % 1400).map(|j| (i + j) as u8).collect();
            let pkt = if from_a {
                ipv4("100.64.0.1", "100.64.0.2", &payload)
            } else {
                ipv6("fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1", &payload)
            };
            let (tx, rx) = if from_a {
                (&mut t.a, &mut t.b)
            } else {
                (&mut t.b, &mut t.a)
            };
            let (peer, n) = tx.encapsulate_to(&pkt, &mut wire_buf).unwrap().expect("session exists");
            assert_eq!(peer, rx.public_key());
            assert_eq!(n, pkt.len() + DATA_OVERHEAD);
            let r = rx.decapsulate_to(Some(ip("192.0.2.1")), &wire_buf[..n], &mut plain_buf);
            assert_eq!(r.dropped, None);
            assert!(r.to_peers.is_empty() && r.reply.is_none());
            assert_eq!(&plain_buf[..r.to_tun.expect("delivered")], &pkt[..], "packet {i}");
        }
        assert_eq!(t.a.stats().rx_packets + t.b.stats().rx_packets, 501);
    }

    /// Packets queued during the handshake come out of the initiator's decapsulate_to of the
    /// response, released through the caller's buffer when it is FLUSH_ROOM long.
    #[test]
    fn queued_packets_released_through_the_callers_buffer() {
        let mut t = Pair::new();
        let pkts: Vec<Vec<u8>> = (0..3u8)
            .map(|i| ipv4("100.64.0.1", "100.64.0.2", &vec![i; 100 + usize::from(i) * 500]))
            .collect();
        let mut wire = vec![0u8; 2048];
        let (_, n) = t.a.encapsulate_to(&pkts[0], &mut wire).unwrap().unwrap();
        let init = wire[..n].to_vec();
        for p in &pkts[1..] {
            assert_eq!(
                t.a.encapsulate_to(p, &mut wire),
                Ok(None),
                "queued behind the handshake"
            );
        }
        let mut big = vec![0u8; FLUSH_ROOM];
        let resp = t.b.decapsulate_to(None, &init, &mut big);
        assert_eq!(resp.to_peers.len(), 1);
        let r = t.a.decapsulate_to(None, &resp.to_peers[0].datagram, &mut big);
        assert_eq!(r.dropped, None);
        // A keepalive confirming the session, then the three queued packets in order.
        assert_eq!(r.to_peers.len(), 4);
        let ka = t.b.decapsulate_to(None, &r.to_peers[0].datagram, &mut big);
        assert_eq!((ka.to_tun, ka.dropped), (None, None));
        for (o, p) in r.to_peers[1..].iter().zip(&pkts) {
            let got = t.b.decapsulate_to(None, &o.datagram, &mut big);
            assert_eq!(&big[..got.to_tun.expect("data")], &p[..]);
        }
        assert!(t.a.buf.len() < FLUSH_ROOM, "no scratch growth of our own");
    }

    /// The fast hasher keeps typical keys apart: tailnet addresses, receiver indices (whose low
    /// 8 bits are always zero here) and their top 7 bits, which hashbrown uses as tag bytes.
    #[test]
    fn fast_hasher_spreads_keys() {
        use std::{collections::HashSet, hash::BuildHasher};
        let b = BuildHasherDefault::<FastHasher>::default();
        let addrs: HashSet<u64> = (0..65536u32).map(|i| b.hash_one(u128::from(0x6440_0000 | i))).collect();
        assert_eq!(addrs.len(), 65536);
        let idx: Vec<u64> = (0..4096u32).map(|i| b.hash_one(i << 8)).collect();
        assert_eq!(idx.iter().collect::<HashSet<_>>().len(), 4096);
        assert_eq!(idx.iter().map(|h| h >> 57).collect::<HashSet<_>>().len(), 128);
        let mut m = FastMap::default();
        for i in 0..1000u32 {
            m.insert(i << 8, i);
        }
        assert!((0..1000u32).all(|i| m.get(&(i << 8)) == Some(&i)));
    }

    /// Buffers too small for boringtun are refused with an error instead of its panic.
    #[test]
    fn short_buffers_are_refused() {
        let mut t = Pair::new();
        let pkt = ipv4("100.64.0.1", "100.64.0.2", &[7; 200]);
        let mut small = vec![0u8; pkt.len() + DATA_OVERHEAD - 1];
        assert_eq!(t.a.encapsulate_to(&pkt, &mut small), Err(WgError::TooBig));
        assert_eq!(t.a.encapsulate_to(&pkt[..20], &mut [0u8; 100]), Err(WgError::TooBig));
        let mut big = vec![0u8; encapsulate_room(pkt.len())];
        let (_, n) = t.a.encapsulate_to(&pkt, &mut big).unwrap().unwrap();
        assert_eq!(n, MIN_BUF, "no session: a handshake initiation");
        let r = t.b.decapsulate_to(None, &big[..n], &mut [0u8; 100]);
        assert_eq!(r.dropped, Some(WgError::Malformed));
        assert_eq!(t.b.decapsulate_to(None, &big[..n], &mut [0u8; 148]).dropped, None);
    }

    #[test]
    fn packets_queued_during_handshake_all_arrive() {
        let mut t = Pair::new();
        let pkts: Vec<_> = (0..5u8).map(|i| ipv4("100.64.0.1", "100.64.0.2", &[i; 10])).collect();
        for p in &pkts {
            t.send(true, p).unwrap();
        }
        assert_eq!(t.wire.len(), 1, "one initiation; the rest wait");
        t.pump();
        assert_eq!(t.b_tun, pkts);
    }

    #[test]
    fn wrong_source_is_dropped_and_counted() {
        let mut t = Pair::new();
        t.send(true, &ipv4("100.64.0.1", "100.64.0.2", b"x")).unwrap();
        t.pump();
        // b sends with a source a has not allowed for b.
        t.send(false, &ipv4("100.64.0.99", "100.64.0.1", b"spoof")).unwrap();
        assert_eq!(t.pump(), vec![WgError::BadSource]);
        // A source owned by another peer (c) is also refused: it must route back to b.
        let c = key(3).public();
        t.a.upsert_peer(PeerConfig {
            key: c,
            allowed_ips: vec![pfx("100.64.0.3/32")],
        });
        t.send(false, &ipv4("100.64.0.3", "100.64.0.1", b"spoof")).unwrap();
        assert_eq!(t.pump(), vec![WgError::BadSource]);
        assert!(t.a_tun.is_empty());
        assert_eq!(t.a.stats().bad_source, 2);
    }

    #[test]
    fn removed_peer_gets_nothing() {
        let mut t = Pair::new();
        t.send(true, &ipv4("100.64.0.1", "100.64.0.2", b"x")).unwrap();
        t.pump();
        let bk = t.b.public_key();
        assert!(t.a.remove_peer(&bk));
        assert!(!t.a.remove_peer(&bk));
        assert_eq!(
            t.a.encapsulate(&ipv4("100.64.0.1", "100.64.0.2", b"x")),
            Err(WgError::NoRoute)
        );
        t.send(false, &ipv4("100.64.0.2", "100.64.0.1", b"late")).unwrap();
        assert_eq!(t.pump(), vec![WgError::UnknownPeer]);
        // A new initiation from b is refused too: its key is no longer configured.
        let mut b2 = WgPeers::new(&key(2), 7);
        b2.set_peers([PeerConfig {
            key: t.a.public_key(),
            allowed_ips: vec![pfx("100.64.0.1/32")],
        }]);
        let init = b2
            .encapsulate(&ipv4("100.64.0.2", "100.64.0.1", b"x"))
            .unwrap()
            .unwrap();
        assert_eq!(
            t.a.decapsulate(None, &init.datagram).dropped,
            Some(WgError::UnknownPeer)
        );
        assert_eq!(t.a.stats().unknown_peer, 2);
        assert_eq!(t.a.stats().no_route, 1);
    }

    #[test]
    fn set_peers_keeps_sessions_of_unchanged_peers() {
        let mut t = Pair::new();
        t.send(true, &ipv4("100.64.0.1", "100.64.0.2", b"x")).unwrap();
        t.pump();
        let bk = t.b.public_key();
        let c = key(3).public();
        let ch = t.a.set_peers([
            PeerConfig {
                key: bk,
                allowed_ips: vec![pfx("100.64.0.2/32"), pfx("10.9.0.0/16")],
            },
            PeerConfig {
                key: c,
                allowed_ips: vec![pfx("100.64.0.3/32")],
            },
            PeerConfig {
                key: t.a.public_key(),
                allowed_ips: vec![pfx("100.64.0.1/32")],
            }, // self: ignored
        ]);
        assert_eq!(
            ch,
            PeerChanges {
                added: 1,
                updated: 1,
                removed: 0
            }
        );
        assert_eq!(t.a.len(), 2);
        // Still a data message (type 4), no new handshake.
        let o = t.a.encapsulate(&ipv4("100.64.0.1", "10.9.1.1", b"x")).unwrap().unwrap();
        assert_eq!((o.peer, o.datagram[0]), (bk, 4));
        assert_eq!(t.a.lookup(ip("10.0.0.1")), None, "old subnet gone");
        assert_eq!(t.a.lookup(ip("100.64.0.3")), Some(c));
        let ch = t.a.set_peers([PeerConfig {
            key: bk,
            allowed_ips: vec![pfx("100.64.0.2/32"), pfx("10.9.0.0/16")],
        }]);
        assert_eq!(
            ch,
            PeerChanges {
                added: 0,
                updated: 0,
                removed: 1
            }
        );
    }

    #[test]
    fn handshake_rate_limit_answers_with_cookie_or_drops() {
        let mut t = Pair::new();
        t.send(true, &ipv4("100.64.0.1", "100.64.0.2", b"x")).unwrap();
        let init = t.wire.pop_front().unwrap().1;
        let mut cookies = 0;
        for _ in 0..(HANDSHAKE_RATE_LIMIT + 5) {
            let r = t.b.decapsulate(Some(ip("192.0.2.1")), &init);
            if let Some(c) = r.reply {
                assert_eq!((c[0], c.len()), (3, 64));
                cookies += 1;
            }
        }
        assert_eq!(cookies, 5);
        // Without a source address (DERP) there is nowhere to send a cookie.
        assert_eq!(t.b.decapsulate(None, &init).dropped, Some(WgError::UnderLoad));
    }

    #[test]
    fn garbage_and_unroutable_are_counted() {
        let mut t = Pair::new();
        assert_eq!(t.a.encapsulate(&[0x45; 3]), Err(WgError::Malformed));
        assert_eq!(
            t.a.encapsulate(&ipv4("100.64.0.1", "8.8.8.8", b"")),
            Err(WgError::NoRoute)
        );
        assert_eq!(t.a.encapsulate(&vec![0x45; MAX_PACKET + 1]), Err(WgError::TooBig));
        assert_eq!(t.a.decapsulate(None, &[]).dropped, Some(WgError::Malformed));
        assert_eq!(
            t.a.decapsulate(None, &[9, 9, 9, 9, 9]).dropped,
            Some(WgError::Malformed)
        );
        let mut bogus_data = vec![4, 0, 0, 0];
        bogus_data.extend_from_slice(&[0xab; 60]);
        assert_eq!(t.a.decapsulate(None, &bogus_data).dropped, Some(WgError::UnknownPeer));
        let mut bogus_init = vec![1, 0, 0, 0];
        bogus_init.extend_from_slice(&[0; 144]);
        assert_eq!(
            t.a.decapsulate(None, &bogus_init).dropped,
            Some(WgError::Rejected),
            "bad mac1"
        );
        assert!(t.a.update_timers().is_empty());
        let s = t.a.stats();
        assert_eq!(
            (s.malformed, s.no_route, s.too_big, s.unknown_peer, s.rejected),
            (3, 1, 1, 1, 1)
        );
    }

    #[test]
    fn allowed_ips_longest_prefix_match() {
        let mut t = AllowedIps::new();
        assert!(t.is_empty());
        t.insert(pfx("0.0.0.0/0"), "default");
        t.insert(pfx("100.64.0.0/10"), "cgnat");
        t.insert(pfx("100.64.0.7/32"), "host");
        t.insert(pfx("10.1.2.3/16"), "masked"); // host bits cleared on parse
        t.insert(pfx("fd7a:115c:a1e0::/48"), "ula");
        t.insert(pfx("fd7a:115c:a1e0::5"), "ula-host"); // bare address = /128
        assert_eq!(t.len(), 6);
        let cases = [
            ("100.64.0.7", Some("host")),
            ("100.64.0.8", Some("cgnat")),
            ("100.127.255.255", Some("cgnat")),
            ("100.128.0.0", Some("default")),
            ("10.1.99.1", Some("masked")),
            ("1.1.1.1", Some("default")),
            ("fd7a:115c:a1e0::5", Some("ula-host")),
            ("fd7a:115c:a1e0:1::5", Some("ula")),
            ("fd7a:115c:a1e1::", None),
            ("::ffff:100.64.0.7", None), // v4-mapped v6 is not v4
        ];
        for (a, want) in cases {
            assert_eq!(t.lookup(ip(a)).copied(), want, "{a}");
        }
        assert_eq!(t.insert(pfx("100.64.0.7/32"), "replaced"), Some("host"));
        assert_eq!(t.lookup(ip("100.64.0.7")), Some(&"replaced"));
        t.clear();
        assert_eq!(t.lookup(ip("1.1.1.1")), None);
    }

    #[test]
    fn prefix_parse_and_contains() {
        assert_eq!(pfx("100.64.1.2/10").to_string(), "100.64.0.0/10");
        assert_eq!(pfx("::/0").bits(), 0);
        assert!(pfx("::/0").is_default());
        for bad in [
            "100.64.0.0/33",
            "fd7a::/129",
            "100.64.0.0/",
            "x/8",
            "1.2.3.4/+8",
            "1.2.3.4/0008",
        ] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
        assert!(pfx("100.64.0.0/10").contains(ip("100.100.1.1")));
        assert!(!pfx("100.64.0.0/10").contains(ip("100.128.0.0")));
        assert!(!pfx("0.0.0.0/0").contains(ip("::1")));
        assert!(pfx("::/0").contains(ip("::1")));
    }

    #[test]
    fn peer_config_from_node() {
        let node = Node {
            key: key(9).public(),
            addresses: vec!["100.64.0.9/32".into()],
            allowed_ips: vec!["100.64.0.9/32".into(), "bogus".into(), "192.168.1.0/24".into()],
            ..Default::default()
        };
        let c = PeerConfig::from_node(&node);
        assert_eq!(c.allowed_ips, vec![pfx("100.64.0.9/32"), pfx("192.168.1.0/24")]);
        let node = Node {
            allowed_ips: vec![],
            ..node
        };
        assert_eq!(PeerConfig::from_node(&node).allowed_ips, vec![pfx("100.64.0.9/32")]);
    }

    #[test]
    fn indices_are_unique_24_bit() {
        let mut w = WgPeers::new(&key(1), 0xdead_beef);
        let mut seen = std::collections::HashSet::new();
        for n in 0..300u32 {
            let i = w.alloc_index();
            assert!(i <= INDEX_MASK && seen.insert(i), "index {i} at {n}");
            w.by_index.insert(i, key(2).public());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut t = Pair::new();
            let _ = t.a.decapsulate(Some(ip("192.0.2.1")), &data);
            let _ = t.a.decapsulate(None, &data);
            let _ = t.a.encapsulate(&data);
        }

        #[test]
        fn typed_datagrams_never_panic(
            ty in 1u8..=4,
            len in prop_oneof![Just(148usize), Just(92), Just(64), 32usize..200],
            fill in any::<u8>(),
            idx in any::<u32>(),
        ) {
            let mut t = Pair::new();
            // Establish a session so data messages reach a real Tunn.
            t.send(true, &ipv4("100.64.0.1", "100.64.0.2", b"x")).unwrap();
            t.pump();
            let mut d = vec![fill; len];
            d[..4].copy_from_slice(&[ty, 0, 0, 0]);
            d[4..8].copy_from_slice(&idx.to_le_bytes());
            let r = t.b.decapsulate(None, &d);
            prop_assert!(r.to_tun.is_none());
        }

        #[test]
        fn tampered_data_is_never_delivered(pos in 0usize..60, flip in 1u8..=255) {
            let mut t = Pair::new();
            t.send(true, &ipv4("100.64.0.1", "100.64.0.2", b"x")).unwrap();
            t.pump();
            let mut d = t.a.encapsulate(&ipv4("100.64.0.1", "100.64.0.2", &[7; 20])).unwrap().unwrap().datagram;
            let pos = pos % d.len();
            d[pos] ^= flip;
            let r = t.b.decapsulate(None, &d);
            prop_assert!(r.to_tun.is_none() && r.dropped.is_some(), "byte {} ^ {:#x} got through", pos, flip);
        }
    }
}
