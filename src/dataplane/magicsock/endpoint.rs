//! One peer's path state: which UDP addresses might reach it, which one is best right now, and
//! when to fall back to DERP.
//!
//! Mirrors the concepts of tailscale `wgengine/magicsock/endpoint.go` (`endpoint`,
//! `endpointState`, `betterAddr`, `addrForSendLocked`, `sendDiscoPingsLocked`, `heartbeat`,
//! `handlePongConnLocked`, `handleCallMeMaybe`) and the timing block of `magicsock.go`
//! (spec §7.4), not its code.
//!
//! The algorithm in one paragraph: every packet to the peer asks [`Endpoint::handle_send`] where
//! to go. Without a trusted direct address it goes via the peer's home DERP region while disco
//! pings go to every candidate address (at most one per [`Timing::disco_ping_interval`] each),
//! plus a CallMeMaybe via DERP so the peer pings us back through its own NAT. A pong makes its
//! address `best_addr` (if [`better_addr`] says so) and trusts it for
//! [`Timing::trust_udp_addr_duration`]; while trusted, packets go direct only. While traffic
//! flows a heartbeat pings the best address every [`Timing::heartbeat_interval`] (extending the
//! trust) and re-runs full discovery every [`Timing::upgrade_udp_direct_interval`] unless the
//! path is already [`Timing::good_enough_latency`]. When pongs stop, trust lapses: packets go
//! both direct and via DERP, and once a ping to the untrusted best address times out it is
//! dropped and packets go via DERP only, until discovery finds a path again.
//!
//! ```text
//!            handle_send (no trusted best)                      pong from candidate
//!   [DERP only] ───────────────────────────► pings + CallMeMaybe ──────────────────► [direct]
//!        ▲                                                                              │
//!        │ ping to untrusted best times out          trust lapses (no pong for 6.5 s)  │
//!        └──────────────────────────── [direct + DERP] ◄────────────────────────────────┘
//! ```
//!
//! Sans-io: the caller supplies `now`, fresh disco transaction ids (a `&mut dyn FnMut() ->
//! TxId` drawing from its RNG), and does all I/O: it seals each [`DiscoOut`] with the peer's
//! `disco::DiscoShared` and a fresh nonce, sends it over UDP or DERP, opens received disco and
//! calls `handle_ping`/`handle_pong`/`handle_call_me_maybe` (CallMeMaybe only when it came via
//! DERP from the node key whose netmap disco key matches), and calls [`Endpoint::handle_timeout`]
//! at [`Endpoint::poll_timeout`]. Our own endpoints (for CallMeMaybe) come in through
//! [`Endpoint::set_my_endpoints`]. A peer without a disco key (e.g. the DERP-only tailscale-rs
//! client) gets no disco at all and is reached via DERP.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use super::addr::canonical;
use crate::{
    wire::disco::Message,
    wire::keys::{DiscoPublic, NodePublic},
    wire::tailcfg::Node,
};

/// A 12-byte disco transaction id (Ping/Pong).
pub type TxId = [u8; 12];

/// Go `tailcfg.DerpMagicIPAddr`: a DERP path written as an address is `127.3.3.40:<region>`.
/// A Pong to a ping that arrived via DERP reports this as the ping's source.
pub const DERP_MAGIC_IP: Ipv4Addr = Ipv4Addr::new(127, 3, 3, 40);

/// Most candidate addresses kept per peer. Go prunes stale ones once past 100
/// (`addCandidateEndpoint`); beyond that we refuse new learned ones, so a peer spraying pings
/// from many ports cannot grow our memory.
const MAX_CANDIDATES: usize = 100;

/// Most pings awaiting a pong per peer. Discovery is rate-limited per candidate, so this only
/// bites on a peer with very many candidates or a CLI ping storm; it bounds memory either way.
const MAX_SENT_PINGS: usize = 128;
/// Candidates that get a copy of a packet while no path is known (see [`SendPlan::spray`]).
pub const MAX_SPRAY: usize = 8;

/// Timing constants; `Default` gives Go's production values, tests shrink them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// Go `discoPingInterval` (5 s): least time between discovery pings to one address, except
    /// that a CallMeMaybe resets it (the first pings likely died at the peer's firewall).
    pub disco_ping_interval: Duration,
    /// Go `trustUDPAddrDuration` (6.5 s): how long a pong lets us use the best address alone,
    /// without also sending via DERP. Two heartbeats plus slack.
    pub trust_udp_addr_duration: Duration,
    /// Go `heartbeatInterval` (3 s): how often the best address is pinged while traffic flows.
    pub heartbeat_interval: Duration,
    /// Go `sessionActiveTimeout` (45 s): idle time after which heartbeats stop, and the age at
    /// which a candidate learned only from an inbound ping is forgotten.
    pub session_active_timeout: Duration,
    /// Go `upgradeUDPDirectInterval` (1 min): how often a working direct path still re-runs full
    /// discovery looking for a better one.
    pub upgrade_udp_direct_interval: Duration,
    /// Go `pingTimeoutDuration` (5 s, `tsconst.DefaultPingTimeout`): when an unanswered ping is
    /// given up.
    pub ping_timeout: Duration,
    /// Go `goodEnoughLatency` (5 ms): a best path this fast is not worth upgrading.
    pub good_enough_latency: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            disco_ping_interval: Duration::from_secs(5),
            trust_udp_addr_duration: Duration::from_millis(6500),
            heartbeat_interval: Duration::from_secs(3),
            session_active_timeout: Duration::from_secs(45),
            upgrade_udp_direct_interval: Duration::from_secs(60),
            ping_timeout: Duration::from_secs(5),
            good_enough_latency: Duration::from_millis(5),
        }
    }
}

/// A way to reach the peer: one of its UDP addresses, or a DERP region (relayed to its node key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    /// Direct UDP to this address.
    Udp(SocketAddr),
    /// Through this DERP region.
    Derp(i32),
}

impl Path {
    /// The source a Pong reports for a ping that arrived on this path: the UDP source, or Go's
    /// fake `127.3.3.40:<region>` for DERP.
    pub fn pong_src(&self) -> SocketAddr {
        match *self {
            Path::Udp(a) => a,
            // Region ids fit 16 bits in practice (Go packs them into the port the same way).
            Path::Derp(r) => SocketAddr::new(IpAddr::V4(DERP_MAGIC_IP), u16::try_from(r).unwrap_or(0)),
        }
    }
}

/// A disco message for the caller to seal (with the peer's `DiscoShared`) and send along `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoOut {
    /// Where to send it.
    pub to: Path,
    /// What to send.
    pub msg: Message,
}

/// Where one outgoing (WireGuard) packet goes, plus the disco traffic this send triggered.
/// Both `udp` and `derp` set means "send a copy each way" (the direct path is no longer
/// trusted but not yet given up). Neither set, `spray` lists the candidates that get a copy
/// each while discovery runs (a peer without a home DERP, whose path is not confirmed yet:
/// dropping the packet would lose a first handshake and cost WireGuard's 5 s retry); all
/// three empty means the peer is unreachable: drop the packet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendPlan {
    /// Send directly to this address.
    pub udp: Option<SocketAddr>,
    /// Send through this DERP region.
    pub derp: Option<i32>,
    /// No path known yet: send a copy to each of these candidates (at most [`MAX_SPRAY`]).
    pub spray: Vec<SocketAddr>,
    /// Disco messages to seal and send first.
    pub disco: Vec<DiscoOut>,
}

/// The path packets take right now, for `tinyscale ping`/`status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathStatus {
    /// A trusted direct address and its latest round-trip time.
    Direct {
        /// The peer's address.
        addr: SocketAddr,
        /// Latest pong round-trip time on it.
        rtt: Duration,
    },
    /// Relayed through this DERP region.
    Derp(i32),
    /// No direct address and no DERP region known.
    Unreachable,
}

/// A direct address and its measured round-trip time (Go `addrQuality`, without relay VNI and
/// path MTU, which we do not probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrQuality {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Round-trip time of the pong that measured it.
    pub latency: Duration,
}

/// Whether `a` is a better direct address than the current best `b` (Go `betterAddr`).
///
/// Each side scores the percentage by which it is faster than the slower one (0-100), plus a
/// bonus for locality (loopback 50, link-local 30, private 20: cheaper and on-segment) and 10
/// for IPv6 (more robust, no NAT). A lead of one point or less over a zero score does not count:
/// that stickiness keeps two near-equal addresses from flapping.
pub fn better_addr(a: &AddrQuality, b: Option<&AddrQuality>) -> bool {
    let Some(b) = b else { return true };
    if a.addr == b.addr {
        return false;
    }
    // The faster side scores how many percent faster it is than the slower one.
    let (al, bl) = (a.latency.as_nanos(), b.latency.as_nanos());
    let advantage = |fast: u128, slow: u128| (fast * 100).checked_div(slow).map_or(0, |pct| 100 - pct);
    let (mut ap, mut bp) = if al > bl {
        (0, advantage(bl, al))
    } else {
        (advantage(al, bl), 0)
    };
    ap += u128::from(addr_bonus(a.addr.ip()));
    bp += u128::from(addr_bonus(b.addr.ip()));
    if ap <= 1 && bp == 0 {
        return false;
    }
    ap > bp
}

/// Locality and family points for [`better_addr`].
fn addr_bonus(ip: IpAddr) -> u32 {
    let locality = match ip {
        IpAddr::V4(v4) if v4.is_loopback() => 50,
        IpAddr::V6(v6) if v6.is_loopback() => 50,
        IpAddr::V4(v4) if v4.is_link_local() => 30,
        IpAddr::V6(v6) if v6.is_unicast_link_local() => 30,
        IpAddr::V4(v4) if v4.is_private() => 20,
        IpAddr::V6(v6) if v6.is_unique_local() => 20,
        _ => 0,
    };
    locality + if ip.is_ipv6() { 10 } else { 0 }
}

/// Whether to ping every candidate now (Go `wantFullPingLocked`): always without a trusted
/// direct path, never when the current one is good enough, else every upgrade interval.
fn want_full_ping(
    best: Option<&AddrQuality>,
    trusted: bool,
    last_full_ping: Option<Instant>,
    now: Instant,
    timing: &Timing,
) -> bool {
    let (Some(best), Some(last)) = (best, last_full_ping) else {
        return true;
    };
    if !trusted {
        return true;
    }
    if best.latency <= timing.good_enough_latency {
        return false;
    }
    now.saturating_duration_since(last) >= timing.upgrade_udp_direct_interval
}

/// What a received Ping produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingOutcome {
    /// The Pong to send back over the path the ping came on; `None` for a duplicate.
    pub reply: Option<DiscoOut>,
    /// A UDP address we did not know the peer by, now a candidate.
    pub learned: Option<SocketAddr>,
}

/// What a Pong answering one of our pings told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PongResult {
    /// Where the ping went.
    pub to: Path,
    /// Round-trip time.
    pub rtt: Duration,
    /// True if this answered a [`Endpoint::ping_cli`] ping.
    pub cli: bool,
}

/// Why a ping was sent (Go `discoPingPurpose`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Is this candidate reachable?
    Discovery,
    /// Keep the best path alive and trusted.
    Heartbeat,
    /// `tinyscale ping`; may go via DERP and ignores rate limits.
    Cli,
}

/// A ping awaiting its pong (Go `sentPing`).
#[derive(Debug, Clone, Copy)]
struct SentPing {
    to: Path,
    at: Instant,
    purpose: Purpose,
}

/// What we know about one candidate address (Go `endpointState`).
#[derive(Debug, Clone, Default)]
struct Candidate {
    /// Listed in the peer's netmap `Endpoints`.
    in_netmap: bool,
    /// Listed in the peer's latest CallMeMaybe.
    call_me_maybe: bool,
    /// Learned from an inbound ping (not from the netmap): when it last pinged us.
    last_got_ping: Option<Instant>,
    /// Tx id of the last inbound ping from here, to drop duplicates.
    last_got_ping_tx: Option<TxId>,
    /// When we last pinged it (for the discovery rate limit).
    last_ping: Option<Instant>,
    /// Latest pong round-trip time.
    latency: Option<Duration>,
}

impl Candidate {
    /// Go `shouldDeleteLocked`: kept while CallMeMaybe or the netmap lists it, or while a
    /// learned address keeps pinging us.
    fn should_delete(&self, now: Instant, timing: &Timing) -> bool {
        if self.call_me_maybe || self.in_netmap {
            return false;
        }
        match self.last_got_ping {
            Some(t) => now.saturating_duration_since(t) > timing.session_active_timeout,
            None => true,
        }
    }
}

/// Path state for one peer (Go `endpoint`). See the module docs for the caller's duties.
#[derive(Debug)]
pub struct Endpoint {
    timing: Timing,
    /// Our node key, carried in every Ping.
    me: NodePublic,
    /// Our current endpoints, carried in CallMeMaybe.
    my_endpoints: Vec<SocketAddr>,
    /// The peer's disco key; zero means it speaks no disco (DERP only).
    disco_key: DiscoPublic,
    /// The peer's home DERP region from the netmap; 0 = none.
    home_derp: i32,
    /// The region the peer last reached us through, used when `home_derp` is 0.
    derp_fallback: i32,
    candidates: BTreeMap<SocketAddr, Candidate>,
    sent: BTreeMap<TxId, SentPing>,
    best: Option<AddrQuality>,
    /// `best` alone carries traffic until then.
    trust_until: Option<Instant>,
    last_full_ping: Option<Instant>,
    /// Last outgoing traffic (Go `lastSendExt`): keeps the heartbeat going.
    last_send: Option<Instant>,
    /// Next heartbeat; `None` while the session is idle.
    heartbeat_at: Option<Instant>,
}

impl Endpoint {
    /// A peer with no known paths yet; `me` is our node key (sent in pings).
    pub fn new(me: NodePublic, timing: Timing) -> Self {
        Endpoint {
            timing,
            me,
            my_endpoints: Vec::new(),
            disco_key: DiscoPublic::default(),
            home_derp: 0,
            derp_fallback: 0,
            candidates: BTreeMap::new(),
            sent: BTreeMap::new(),
            best: None,
            trust_until: None,
            last_full_ping: None,
            last_send: None,
            heartbeat_at: None,
        }
    }

    /// Our own current endpoints (local + STUN), sent in CallMeMaybe. Call on every change.
    pub fn set_my_endpoints(&mut self, endpoints: &[SocketAddr]) {
        self.my_endpoints.clear();
        self.my_endpoints.extend_from_slice(endpoints);
    }

    /// The peer's netmap entry changed (Go `updateFromNode`): its endpoints, disco key and home
    /// region. A new disco key means the peer restarted: all probing state is reset. Candidates
    /// dropped from the netmap are forgotten unless CallMeMaybe or recent pings vouch for them.
    pub fn handle_netmap(&mut self, endpoints: &[SocketAddr], disco_key: DiscoPublic, home_derp: i32, now: Instant) {
        if disco_key != self.disco_key {
            log::debug!(
                "magicsock: peer disco key changed to {}, resetting paths",
                disco_key.short()
            );
            self.disco_key = disco_key;
            self.reset();
        }
        self.home_derp = home_derp.max(0);
        for (addr, c) in self.candidates.iter_mut() {
            c.in_netmap = endpoints.contains(addr);
        }
        // Prune before adding, so stale entries do not take the places of new ones.
        self.prune(now);
        for ep in endpoints {
            if !self.candidates.contains_key(ep) && self.candidates.len() < MAX_CANDIDATES {
                let c = Candidate {
                    in_netmap: true,
                    ..Candidate::default()
                };
                self.candidates.insert(*ep, c);
            }
        }
    }

    /// [`Endpoint::handle_netmap`] from a `tailcfg::Node`: unparsable endpoints are skipped, and
    /// the legacy `DERP: "127.3.3.40:<region>"` field stands in for a missing `HomeDERP`.
    pub fn handle_node(&mut self, node: &Node, now: Instant) {
        let eps = parse_endpoints(&node.endpoints);
        let home = if node.home_derp != 0 {
            node.home_derp
        } else {
            legacy_derp_region(&node.derp)
        };
        self.handle_netmap(&eps, node.disco_key, home, now);
    }

    /// An outgoing packet (Go `endpoint.send`): where it goes, and the discovery it triggers
    /// when there is no trusted direct path. Also notes traffic, which starts the heartbeat.
    pub fn handle_send(&mut self, now: Instant, new_tx: &mut dyn FnMut() -> TxId) -> SendPlan {
        let (udp, derp) = self.addr_for_send(now);
        let mut disco = Vec::new();
        if udp.is_none() || !self.trusted(now) {
            self.send_disco_pings(now, true, new_tx, &mut disco);
        }
        self.last_send = Some(now);
        if self.heartbeat_at.is_none() {
            self.heartbeat_at = Some(now + self.timing.heartbeat_interval);
        }
        let spray = match (udp, derp) {
            (None, None) => self.candidates.keys().take(MAX_SPRAY).copied().collect(),
            _ => Vec::new(),
        };
        SendPlan {
            udp,
            derp,
            spray,
            disco,
        }
    }

    /// A Ping from the peer arrived via `from` (Go `handlePingLocked`). A UDP source we did not
    /// know becomes a candidate; the reply goes back the way the ping came. A repeat of the last
    /// tx id from the same address (seen twice by two sockets) gets no second reply.
    pub fn handle_ping(&mut self, from: Path, tx_id: TxId, now: Instant) -> PingOutcome {
        let mut learned = None;
        match from {
            Path::Udp(addr) => {
                if let Some(c) = self.candidates.get_mut(&addr) {
                    if c.last_got_ping_tx == Some(tx_id) {
                        return PingOutcome {
                            reply: None,
                            learned: None,
                        };
                    }
                    c.last_got_ping_tx = Some(tx_id);
                    // Only learned addresses age out; netmap/CallMeMaybe ones have no clock.
                    if c.last_got_ping.is_some() {
                        c.last_got_ping = Some(now);
                    }
                } else {
                    if self.candidates.len() >= MAX_CANDIDATES {
                        self.prune(now);
                    }
                    if self.candidates.len() < MAX_CANDIDATES {
                        log::debug!("magicsock: disco: learned candidate ep={addr} from a ping");
                        let c = Candidate {
                            last_got_ping: Some(now),
                            last_got_ping_tx: Some(tx_id),
                            ..Candidate::default()
                        };
                        self.candidates.insert(addr, c);
                        learned = Some(addr);
                    }
                }
            }
            Path::Derp(region) => self.derp_fallback = region,
        }
        let reply = DiscoOut {
            to: from,
            msg: Message::Pong {
                tx_id,
                src: from.pong_src(),
            },
        };
        PingOutcome {
            reply: Some(reply),
            learned,
        }
    }

    /// A Pong arrived via `from` (Go `handlePongConnLocked`). Returns `None` if it answers no
    /// ping of ours. A direct pong records the round-trip time, may promote its address to best
    /// (always when the current best is no longer trusted), and renews the trust window when it
    /// is the best.
    pub fn handle_pong(&mut self, tx_id: TxId, from: Path, now: Instant) -> Option<PongResult> {
        let sp = self.sent.remove(&tx_id)?;
        let rtt = now.saturating_duration_since(sp.at);
        let result = PongResult {
            to: sp.to,
            rtt,
            cli: sp.purpose == Purpose::Cli,
        };
        let (Path::Udp(_), Path::Udp(addr)) = (from, sp.to) else {
            return Some(result);
        };
        let Some(c) = self.candidates.get_mut(&addr) else {
            // No longer an address we care about.
            return Some(result);
        };
        c.latency = Some(rtt);
        let this = AddrQuality { addr, latency: rtt };
        if better_addr(&this, self.best.as_ref()) || !self.trusted(now) {
            if self.best.map(|b| b.addr) != Some(addr) {
                log::info!("magicsock: disco: now using direct ep={addr} rtt={rtt:?}");
            }
            self.best = Some(this);
        }
        if let Some(best) = self.best.as_mut().filter(|b| b.addr == addr) {
            best.latency = rtt;
            self.trust_until = Some(now + self.timing.trust_udp_addr_duration);
        }
        Some(result)
    }

    /// A CallMeMaybe from the peer, received via DERP (Go `handleCallMeMaybe`): the peer has just
    /// pinged us, so its NAT is open toward us; ping all its listed endpoints now, ignoring the
    /// rate limit. Addresses from an earlier CallMeMaybe that are no longer listed are forgotten
    /// unless the netmap or recent pings still vouch for them. IPv6 link-local addresses are
    /// skipped (they would need a zone).
    pub fn handle_call_me_maybe(
        &mut self,
        endpoints: &[SocketAddr],
        now: Instant,
        new_tx: &mut dyn FnMut() -> TxId,
    ) -> Vec<DiscoOut> {
        let usable = |ep: &SocketAddr| !matches!(ep.ip(), IpAddr::V6(v6) if v6.is_unicast_link_local());
        let endpoints: Vec<SocketAddr> = endpoints.iter().copied().map(canonical).collect();
        let endpoints = &endpoints[..];
        for (addr, c) in self.candidates.iter_mut() {
            c.call_me_maybe = endpoints.contains(addr) && usable(addr);
        }
        self.prune(now);
        for ep in endpoints.iter().filter(|ep| usable(ep)) {
            if !self.candidates.contains_key(ep) && self.candidates.len() < MAX_CANDIDATES {
                let c = Candidate {
                    call_me_maybe: true,
                    ..Candidate::default()
                };
                self.candidates.insert(*ep, c);
            }
        }
        for c in self.candidates.values_mut() {
            c.last_ping = None;
        }
        let mut out = Vec::new();
        self.send_disco_pings(now, false, new_tx, &mut out);
        out
    }

    /// `tinyscale ping` (Go `discoPing`): via DERP when the direct path is not trusted, and to
    /// the trusted best address or else to every candidate. The first [`PongResult`] with
    /// `cli` set answers it.
    pub fn ping_cli(&mut self, now: Instant, new_tx: &mut dyn FnMut() -> TxId) -> Vec<DiscoOut> {
        let mut out = Vec::new();
        let (udp, derp) = self.addr_for_send(now);
        if let Some(region) = derp {
            self.start_ping(Path::Derp(region), now, Purpose::Cli, new_tx, &mut out);
        }
        match udp {
            Some(addr) if self.trusted(now) => {
                self.start_ping(Path::Udp(addr), now, Purpose::Cli, new_tx, &mut out);
            }
            _ => {
                let all: Vec<SocketAddr> = self.candidates.keys().copied().collect();
                let mut sent_any = false;
                for addr in all {
                    sent_any |= self.start_ping(Path::Udp(addr), now, Purpose::Cli, new_tx, &mut out);
                }
                // Like discovery: our direct pings likely die at the peer's NAT, so ask the peer
                // (via DERP) to ping us back, which opens both mappings.
                if let (true, Some(region)) = (sent_any, derp) {
                    out.push(DiscoOut {
                        to: Path::Derp(region),
                        msg: Message::CallMeMaybe {
                            endpoints: self.my_endpoints.clone(),
                        },
                    });
                }
            }
        }
        out
    }

    /// Sending to `addr` failed in a way that says it is unusable (Go `noteBadEndpoint`, e.g.
    /// host unreachable): stop trusting it until a new pong.
    pub fn handle_send_error(&mut self, addr: SocketAddr) {
        if self.best.is_some_and(|b| b.addr == addr) {
            self.clear_best();
        }
        if let Some(c) = self.candidates.get_mut(&addr) {
            c.last_ping = None;
            c.latency = None;
        }
    }

    /// Our network changed (link up/down, new address; Go `noteConnectivityChange`): earlier
    /// path measurements no longer hold.
    pub fn handle_connectivity_change(&mut self) {
        self.clear_best();
        for c in self.candidates.values_mut() {
            c.last_ping = None;
            c.latency = None;
        }
    }

    /// When [`Endpoint::handle_timeout`] wants to run next: the next heartbeat or ping timeout.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ping_deadline = self.sent.values().map(|sp| sp.at + self.timing.ping_timeout).min();
        match (self.heartbeat_at, ping_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs due timers: unanswered pings time out (dropping an untrusted best address whose
    /// ping went unanswered, Go `discoPingTimeout`), and the heartbeat (Go `heartbeat`) pings the
    /// best address and, when wanted, every candidate plus a CallMeMaybe. Heartbeats stop after
    /// [`Timing::session_active_timeout`] without traffic.
    pub fn handle_timeout(&mut self, now: Instant, new_tx: &mut dyn FnMut() -> TxId) -> Vec<DiscoOut> {
        let timeout = self.timing.ping_timeout;
        let expired: Vec<TxId> = self
            .sent
            .iter()
            .filter(|(_, sp)| sp.at + timeout <= now)
            .map(|(tx, _)| *tx)
            .collect();
        for tx in expired {
            let Some(sp) = self.sent.remove(&tx) else { continue };
            let to_best = matches!(sp.to, Path::Udp(a) if self.best.is_some_and(|b| b.addr == a));
            if to_best && !self.trusted(now) {
                log::debug!("magicsock: disco: best path stopped answering, falling back to DERP");
                self.clear_best();
            }
        }

        let mut out = Vec::new();
        if self.heartbeat_at.is_some_and(|t| t <= now) {
            self.heartbeat(now, new_tx, &mut out);
        }
        out
    }

    /// The path packets take at `now`.
    pub fn path(&self, now: Instant) -> PathStatus {
        match (self.best, self.derp_region()) {
            (Some(b), _) if self.trusted(now) => PathStatus::Direct {
                addr: b.addr,
                rtt: b.latency,
            },
            (_, Some(region)) => PathStatus::Derp(region),
            // An untrusted best address without DERP is still where packets go.
            (Some(b), None) => PathStatus::Direct {
                addr: b.addr,
                rtt: b.latency,
            },
            (None, None) => PathStatus::Unreachable,
        }
    }

    /// The current best direct address, trusted or not.
    pub fn best_addr(&self) -> Option<AddrQuality> {
        self.best
    }

    /// All candidate addresses, with their latest round-trip time if measured.
    pub fn candidates(&self) -> impl Iterator<Item = (SocketAddr, Option<Duration>)> + '_ {
        self.candidates.iter().map(|(a, c)| (*a, c.latency))
    }

    /// The peer's disco key (zero when it has none).
    pub fn disco_key(&self) -> DiscoPublic {
        self.disco_key
    }

    /// The peer's home DERP region from the netmap (0 = none).
    pub fn home_derp(&self) -> i32 {
        self.home_derp
    }

    // ---- internals ----

    /// The DERP region to use: the peer's home, else the one it last reached us through.
    fn derp_region(&self) -> Option<i32> {
        [self.home_derp, self.derp_fallback].into_iter().find(|r| *r > 0)
    }

    /// True while the best address may carry traffic alone.
    fn trusted(&self, now: Instant) -> bool {
        self.best.is_some() && self.trust_until.is_some_and(|t| now <= t)
    }

    /// Go `addrForSendLocked`: the trusted best alone, else the best (if any) and DERP.
    fn addr_for_send(&self, now: Instant) -> (Option<SocketAddr>, Option<i32>) {
        let udp = self.best.map(|b| b.addr);
        if udp.is_some() && self.trusted(now) {
            (udp, None)
        } else {
            (udp, self.derp_region())
        }
    }

    /// Go `heartbeat`.
    fn heartbeat(&mut self, now: Instant, new_tx: &mut dyn FnMut() -> TxId, out: &mut Vec<DiscoOut>) {
        self.heartbeat_at = None;
        let Some(last) = self.last_send else { return };
        if now.saturating_duration_since(last) > self.timing.session_active_timeout {
            log::debug!("magicsock: disco: session idle, heartbeats stop");
            return;
        }
        if let Some(addr) = self.best.map(|b| b.addr) {
            self.start_ping(Path::Udp(addr), now, Purpose::Heartbeat, new_tx, out);
        }
        if want_full_ping(
            self.best.as_ref(),
            self.trusted(now),
            self.last_full_ping,
            now,
            &self.timing,
        ) {
            self.send_disco_pings(now, true, new_tx, out);
        }
        self.heartbeat_at = Some(now + self.timing.heartbeat_interval);
    }

    /// Go `sendDiscoPingsLocked`: ping every candidate not pinged within the interval; if any
    /// ping went out and `call_me_maybe`, also ask the peer via DERP to ping us back.
    fn send_disco_pings(
        &mut self,
        now: Instant,
        call_me_maybe: bool,
        new_tx: &mut dyn FnMut() -> TxId,
        out: &mut Vec<DiscoOut>,
    ) {
        if self.disco_key.is_zero() {
            return;
        }
        self.last_full_ping = Some(now);
        self.prune(now);
        let interval = self.timing.disco_ping_interval;
        let due: Vec<SocketAddr> = self
            .candidates
            .iter()
            .filter(|(_, c)| c.last_ping.is_none_or(|t| now.saturating_duration_since(t) >= interval))
            .map(|(a, _)| *a)
            .collect();
        let mut sent_any = false;
        for addr in due {
            sent_any |= self.start_ping(Path::Udp(addr), now, Purpose::Discovery, new_tx, out);
        }
        if let (true, true, Some(region)) = (sent_any, call_me_maybe, self.derp_region()) {
            out.push(DiscoOut {
                to: Path::Derp(region),
                msg: Message::CallMeMaybe {
                    endpoints: self.my_endpoints.clone(),
                },
            });
        }
    }

    /// Go `startDiscoPingLocked`: records and emits one ping; false if none was sent.
    fn start_ping(
        &mut self,
        to: Path,
        now: Instant,
        purpose: Purpose,
        new_tx: &mut dyn FnMut() -> TxId,
        out: &mut Vec<DiscoOut>,
    ) -> bool {
        if self.disco_key.is_zero() || self.sent.len() >= MAX_SENT_PINGS {
            return false;
        }
        if let (Path::Udp(addr), false) = (to, purpose == Purpose::Cli) {
            let Some(c) = self.candidates.get_mut(&addr) else {
                return false;
            };
            c.last_ping = Some(now);
        }
        let tx_id = new_tx();
        self.sent.insert(tx_id, SentPing { to, at: now, purpose });
        out.push(DiscoOut {
            to,
            msg: Message::Ping {
                tx_id,
                node_key: self.me,
                padding: 0,
            },
        });
        true
    }

    /// Forgets candidates nothing vouches for any more (and the best address if among them).
    fn prune(&mut self, now: Instant) {
        let timing = &self.timing;
        let before = self.candidates.len();
        self.candidates.retain(|_, c| !c.should_delete(now, timing));
        if self.candidates.len() != before && self.best.is_some_and(|b| !self.candidates.contains_key(&b.addr)) {
            self.clear_best();
        }
    }

    fn clear_best(&mut self) {
        self.best = None;
        self.trust_until = None;
    }

    /// Go `resetLocked`: back to DERP only, nothing in flight, heartbeat stopped.
    fn reset(&mut self) {
        self.clear_best();
        self.sent.clear();
        self.last_full_ping = None;
        self.last_send = None;
        self.heartbeat_at = None;
        for c in self.candidates.values_mut() {
            c.last_ping = None;
        }
    }
}

/// Parses netmap `Endpoints` strings (`ip:port`, `[v6]:port`), skipping bad ones as Go does.
/// A v4-mapped `[::ffff:a.b.c.d]:port` becomes plain IPv4, the form received packets have.
pub fn parse_endpoints(endpoints: &[String]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in endpoints.iter().filter_map(|s| s.parse().ok()).map(canonical) {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// The region in a legacy `DERP: "127.3.3.40:<region>"` node field, 0 if absent or malformed.
fn legacy_derp_region(derp: &str) -> i32 {
    match derp.parse::<SocketAddr>() {
        Ok(a) if a.ip() == IpAddr::V4(DERP_MAGIC_IP) => i32::from(a.port()),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{wire::disco::DiscoShared, wire::keys::DiscoPrivate};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn q(addr: &str, ms: u64) -> AddrQuality {
        AddrQuality {
            addr: sa(addr),
            latency: Duration::from_millis(ms),
        }
    }

    fn qus(addr: &str, us: u64) -> AddrQuality {
        AddrQuality {
            addr: sa(addr),
            latency: Duration::from_micros(us),
        }
    }

    /// Counter-based tx ids: reproducible and unique.
    fn tx_counter() -> impl FnMut() -> TxId {
        let mut n = 0u32;
        move || {
            n += 1;
            let mut t = [0u8; 12];
            t[..4].copy_from_slice(&n.to_be_bytes());
            t
        }
    }

    #[test]
    fn better_addr_table() {
        let cases = [
            // (a, b, a better than b?, why)
            (q("1.1.1.1:1", 10), None, true, "anything beats nothing"),
            (
                q("1.1.1.1:1", 10),
                Some(q("1.1.1.1:1", 5)),
                false,
                "same address never wins",
            ),
            (q("1.1.1.1:1", 10), Some(q("2.2.2.2:1", 20)), true, "half the latency"),
            (
                q("1.1.1.1:1", 20),
                Some(q("2.2.2.2:1", 10)),
                false,
                "double the latency",
            ),
            (
                q("1.1.1.1:1", 99),
                Some(q("2.2.2.2:1", 100)),
                false,
                "1% faster: sticky",
            ),
            (q("1.1.1.1:1", 98), Some(q("2.2.2.2:1", 100)), true, "2% faster"),
            (
                q("1.1.1.1:1", 10),
                Some(q("2.2.2.2:1", 10)),
                false,
                "equal: keep current",
            ),
            (
                q("[2001:db8::1]:1", 10),
                Some(q("2.2.2.2:1", 10)),
                true,
                "IPv6 preferred at equal latency",
            ),
            (
                qus("[2001:db8::1]:1", 10_000),
                Some(qus("2.2.2.2:1", 9_500)),
                true,
                "IPv6 worth under 10% latency",
            ),
            (
                q("[2001:db8::1]:1", 10),
                Some(q("2.2.2.2:1", 9)),
                false,
                "10% slower: a tie keeps current",
            ),
            (
                q("[2001:db8::1]:1", 20),
                Some(q("2.2.2.2:1", 10)),
                false,
                "but not double",
            ),
            (
                q("2.2.2.2:1", 10),
                Some(q("[2001:db8::1]:1", 10)),
                false,
                "IPv4 does not displace IPv6",
            ),
            (
                q("192.168.1.2:1", 12),
                Some(q("2.2.2.2:1", 10)),
                true,
                "private beats public when close",
            ),
            (
                q("192.168.1.2:1", 30),
                Some(q("2.2.2.2:1", 10)),
                false,
                "private loses when much slower",
            ),
            (
                q("169.254.1.1:1", 10),
                Some(q("192.168.1.2:1", 10)),
                true,
                "link-local beats private",
            ),
            (
                q("127.0.0.1:1", 10),
                Some(q("169.254.1.1:1", 10)),
                true,
                "loopback beats link-local",
            ),
            (
                q("[fd7a::1]:1", 10),
                Some(q("10.0.0.1:1", 10)),
                true,
                "ULA v6 beats private v4",
            ),
            (
                q("[fe80::1]:1", 10),
                Some(q("[fd7a::1]:1", 10)),
                true,
                "v6 link-local beats ULA",
            ),
            (
                q("1.1.1.1:1", 0),
                Some(q("2.2.2.2:1", 0)),
                false,
                "zero latencies: keep current",
            ),
            (
                q("1.1.1.1:1", 0),
                Some(q("2.2.2.2:1", 1)),
                true,
                "instant beats anything",
            ),
        ];
        for (a, b, want, why) in cases {
            assert_eq!(better_addr(&a, b.as_ref()), want, "{why}: {a:?} vs {b:?}");
        }
    }

    #[test]
    fn want_full_ping_table() {
        let t = Timing::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let slow = q("1.1.1.1:1", 30);
        let fast = q("1.1.1.1:1", 5);
        let cases = [
            // (best, trusted, last full ping, now, want, why)
            (None, false, Some(at(0)), at(1), true, "no direct path"),
            (Some(slow), true, None, at(1), true, "never did full discovery"),
            (Some(slow), false, Some(at(0)), at(1), true, "best no longer trusted"),
            (
                Some(fast),
                true,
                Some(at(0)),
                at(600),
                false,
                "good enough latency: never upgrade",
            ),
            (
                Some(slow),
                true,
                Some(at(0)),
                at(59),
                false,
                "upgrade interval not yet up",
            ),
            (Some(slow), true, Some(at(0)), at(60), true, "upgrade interval up"),
        ];
        for (best, trusted, last, now, want, why) in cases {
            assert_eq!(want_full_ping(best.as_ref(), trusted, last, now, &t), want, "{why}");
        }
    }

    fn peer_disco() -> DiscoPublic {
        DiscoPrivate::from_random([9; 32]).public()
    }

    fn me() -> NodePublic {
        NodePublic([7; 32])
    }

    /// An endpoint for a peer with the given netmap endpoints and home region 2.
    fn endpoint(eps: &[&str], now: Instant) -> Endpoint {
        let mut ep = Endpoint::new(me(), Timing::default());
        let eps: Vec<SocketAddr> = eps.iter().map(|s| sa(s)).collect();
        ep.handle_netmap(&eps, peer_disco(), 2, now);
        ep.set_my_endpoints(&[sa("198.51.100.1:41641")]);
        ep
    }

    fn ping_tx(out: &DiscoOut) -> Option<(Path, TxId)> {
        match out.msg {
            Message::Ping { tx_id, padding, .. } => {
                assert_eq!(padding, 0);
                Some((out.to, tx_id))
            }
            _ => None,
        }
    }

    fn pings(outs: &[DiscoOut]) -> Vec<(Path, TxId)> {
        outs.iter().filter_map(ping_tx).collect()
    }

    #[test]
    fn first_send_goes_via_derp_and_starts_discovery() {
        let t0 = Instant::now();
        let mut tx = tx_counter();
        let mut ep = endpoint(&["203.0.113.2:41641", "10.0.0.2:41641"], t0);
        assert_eq!(ep.path(t0), PathStatus::Derp(2));
        let plan = ep.handle_send(t0, &mut tx);
        assert_eq!((plan.udp, plan.derp), (None, Some(2)));
        let p = pings(&plan.disco);
        assert_eq!(
            p.iter().map(|(to, _)| *to).collect::<Vec<_>>(),
            vec![Path::Udp(sa("10.0.0.2:41641")), Path::Udp(sa("203.0.113.2:41641"))]
        );
        assert!(matches!(plan.disco[0].msg, Message::Ping { node_key, .. } if node_key == me()));
        assert_eq!(
            plan.disco.last(),
            Some(&DiscoOut {
                to: Path::Derp(2),
                msg: Message::CallMeMaybe {
                    endpoints: vec![sa("198.51.100.1:41641")]
                }
            })
        );
        // Within the ping interval, more packets trigger no new disco.
        let plan = ep.handle_send(t0 + Duration::from_secs(1), &mut tx);
        assert!(plan.disco.is_empty());
        assert_eq!(plan.derp, Some(2));

        // A pong makes the address best and trusted: direct only.
        let at = t0 + Duration::from_millis(1030);
        let r = ep.handle_pong(p[1].1, Path::Udp(sa("203.0.113.2:41641")), at).unwrap();
        assert_eq!(
            r,
            PongResult {
                to: p[1].0,
                rtt: Duration::from_millis(1030),
                cli: false
            }
        );
        assert_eq!(
            ep.path(at),
            PathStatus::Direct {
                addr: sa("203.0.113.2:41641"),
                rtt: r.rtt
            }
        );
        let plan = ep.handle_send(at, &mut tx);
        assert_eq!(
            (plan.udp, plan.derp, plan.disco.len()),
            (Some(sa("203.0.113.2:41641")), None, 0)
        );
        // The same pong again is unknown.
        assert_eq!(ep.handle_pong(p[1].1, Path::Udp(sa("203.0.113.2:41641")), at), None);
        // Trust lapses 6.5 s after the pong: both ways, plus rediscovery.
        let later = at + Duration::from_millis(6501);
        let plan = ep.handle_send(later, &mut tx);
        assert_eq!((plan.udp, plan.derp), (Some(sa("203.0.113.2:41641")), Some(2)));
        assert_eq!(pings(&plan.disco).len(), 2);
    }

    #[test]
    fn dual_stack_peer_is_pinged_on_both_families_and_ipv6_wins_a_close_race() {
        let t0 = Instant::now();
        let mut tx = tx_counter();
        let (v4, v6) = (sa("203.0.113.2:41641"), sa("[2001:db8:2::2]:41641"));
        // The netmap spells the IPv4 endpoint v4-mapped (and also plainly): one candidate.
        let eps = parse_endpoints(&[
            "[::ffff:203.0.113.2]:41641".into(),
            "203.0.113.2:41641".into(),
            "[2001:db8:2::2]:41641".into(),
        ]);
        assert_eq!(eps, vec![v4, v6]);
        let mut ep = Endpoint::new(me(), Timing::default());
        ep.handle_netmap(&eps, peer_disco(), 2, t0);
        let p = pings(&ep.handle_send(t0, &mut tx).disco);
        let to: BTreeSet<Path> = p.iter().map(|(to, _)| *to).collect();
        assert_eq!(to, [Path::Udp(v4), Path::Udp(v6)].into_iter().collect());
        let tx_of = |a: SocketAddr| p.iter().find(|(to, _)| *to == Path::Udp(a)).map(|(_, t)| *t).unwrap();
        // IPv4 answers first (10 ms), IPv6 a little later (10.5 ms): IPv6 takes over.
        ep.handle_pong(tx_of(v4), Path::Udp(v4), t0 + Duration::from_millis(10))
            .unwrap();
        assert!(matches!(ep.path(t0 + Duration::from_millis(10)), PathStatus::Direct { addr, .. } if addr == v4));
        let at = t0 + Duration::from_micros(10_500);
        ep.handle_pong(tx_of(v6), Path::Udp(v6), at).unwrap();
        assert!(matches!(ep.path(at), PathStatus::Direct { addr, .. } if addr == v6));
        assert_eq!(ep.handle_send(at, &mut tx).udp, Some(v6));

        // IPv4 UDP blocked: only the IPv6 pong comes back, and that is the direct path.
        let mut ep = Endpoint::new(me(), Timing::default());
        ep.handle_netmap(&eps, peer_disco(), 2, t0);
        let p = pings(&ep.handle_send(t0, &mut tx).disco);
        let (_, t6) = p.iter().find(|(to, _)| *to == Path::Udp(v6)).unwrap();
        let at = t0 + Duration::from_millis(30);
        ep.handle_pong(*t6, Path::Udp(v6), at).unwrap();
        assert_eq!(
            ep.path(at),
            PathStatus::Direct {
                addr: v6,
                rtt: Duration::from_millis(30)
            }
        );
        let plan = ep.handle_send(at, &mut tx);
        assert_eq!((plan.udp, plan.derp), (Some(v6), None));
    }

    #[test]
    fn without_home_derp_or_best_address_packets_go_to_every_candidate() {
        let t0 = Instant::now();
        let mut tx = tx_counter();
        let mut ep = Endpoint::new(me(), Timing::default());
        let (a, b) = (sa("203.0.113.2:41641"), sa("192.168.1.2:41641"));
        ep.handle_netmap(&[a, b], peer_disco(), 0, t0);
        let plan = ep.handle_send(t0, &mut tx);
        assert_eq!((plan.udp, plan.derp), (None, None));
        let mut spray = plan.spray.clone();
        spray.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(spray, want, "the first handshake must not be dropped");
        assert_eq!(plan.disco.len(), 2, "discovery pings every candidate");
        // Many candidates: the copies are bounded.
        let many: Vec<SocketAddr> = (1..=40).map(|i| sa(&format!("198.51.100.{i}:41641"))).collect();
        ep.handle_netmap(&many, peer_disco(), 0, t0);
        assert_eq!(ep.handle_send(t0, &mut tx).spray.len(), MAX_SPRAY);
        // Once a pong confirms a path, that path alone is used.
        ep.handle_netmap(&[a, b], peer_disco(), 0, t0);
        let tx_a = ep
            .handle_send(t0 + Duration::from_secs(6), &mut tx)
            .disco
            .iter()
            .find_map(|d| match (&d.to, &d.msg) {
                (Path::Udp(x), Message::Ping { tx_id, .. }) if *x == a => Some(*tx_id),
                _ => None,
            });
        let Some(tx_a) = tx_a else { panic!("no ping to {a}") };
        let now = t0 + Duration::from_secs(6) + Duration::from_millis(20);
        ep.handle_pong(tx_a, Path::Udp(a), now);
        let plan = ep.handle_send(now, &mut tx);
        assert_eq!((plan.udp, plan.derp, plan.spray), (Some(a), None, vec![]));
    }

    #[test]
    fn peer_without_disco_is_derp_only() {
        let t0 = Instant::now();
        let mut tx = tx_counter();
        let mut ep = Endpoint::new(me(), Timing::default());
        ep.handle_netmap(&[sa("203.0.113.2:41641")], DiscoPublic::default(), 5, t0);
        let plan = ep.handle_send(t0, &mut tx);
        assert_eq!(
            plan,
            SendPlan {
                udp: None,
                derp: Some(5),
                spray: vec![],
                disco: vec![]
            }
        );
        assert!(ep.handle_timeout(t0 + Duration::from_secs(3), &mut tx).is_empty());
        assert!(ep.ping_cli(t0, &mut tx).is_empty());
        // Nothing at all known: unreachable, and the plan says drop.
        let mut lost = Endpoint::new(me(), Timing::default());
        assert_eq!(lost.path(t0), PathStatus::Unreachable);
        assert_eq!(lost.handle_send(t0, &mut tx), SendPlan::default());
    }

    #[test]
    fn inbound_pings_learn_candidates_and_are_answered_on_their_path() {
        let t0 = Instant::now();
        let mut ep = Endpoint::new(me(), Timing::default());
        ep.handle_netmap(&[sa("203.0.113.2:41641")], peer_disco(), 0, t0);
        // Via DERP: answered via DERP with Go's magic source; the region becomes the fallback.
        let o = ep.handle_ping(Path::Derp(7), [1; 12], t0);
        assert_eq!(
            o,
            PingOutcome {
                reply: Some(DiscoOut {
                    to: Path::Derp(7),
                    msg: Message::Pong {
                        tx_id: [1; 12],
                        src: sa("127.3.3.40:7")
                    }
                }),
                learned: None
            }
        );
        assert_eq!(ep.path(t0), PathStatus::Derp(7));
        // From an unknown address: learned, answered there.
        let o = ep.handle_ping(Path::Udp(sa("203.0.113.2:5555")), [2; 12], t0);
        assert_eq!(o.learned, Some(sa("203.0.113.2:5555")));
        assert_eq!(
            o.reply.unwrap().msg,
            Message::Pong {
                tx_id: [2; 12],
                src: sa("203.0.113.2:5555")
            }
        );
        // The same ping again (seen on a second socket): no second answer.
        assert_eq!(
            ep.handle_ping(Path::Udp(sa("203.0.113.2:5555")), [2; 12], t0).reply,
            None
        );
        // From a known netmap address: answered, nothing learned.
        let o = ep.handle_ping(Path::Udp(sa("203.0.113.2:41641")), [3; 12], t0);
        assert_eq!((o.reply.is_some(), o.learned), (true, None));
        assert_eq!(ep.candidates().count(), 2);
        // A learned address that stops pinging is forgotten after the session timeout.
        let mut tx = tx_counter();
        let late = t0 + Duration::from_secs(46);
        let plan = ep.handle_send(late, &mut tx);
        assert_eq!(
            ep.candidates().map(|(a, _)| a).collect::<Vec<_>>(),
            vec![sa("203.0.113.2:41641")]
        );
        assert_eq!(pings(&plan.disco).len(), 1);
    }

    #[test]
    fn learned_candidates_are_bounded() {
        let t0 = Instant::now();
        let mut ep = endpoint(&[], t0);
        for port in 1..=300u16 {
            let o = ep.handle_ping(Path::Udp(SocketAddr::new([192, 0, 2, 1].into(), port)), [0; 12], t0);
            assert!(o.reply.is_some(), "every ping is still answered");
        }
        assert_eq!(ep.candidates().count(), MAX_CANDIDATES);
        // Once they age out, room frees up again.
        let late = t0 + Duration::from_secs(50);
        let o = ep.handle_ping(Path::Udp(sa("192.0.2.2:1")), [0; 12], late);
        assert_eq!(o.learned, Some(sa("192.0.2.2:1")));
        assert_eq!(ep.candidates().count(), 1);
    }

    #[test]
    fn call_me_maybe_replaces_its_list_and_pings_at_once() {
        let t0 = Instant::now();
        let mut tx = tx_counter();
        let mut ep = endpoint(&["203.0.113.2:41641"], t0);
        // Discovery just ran, so the netmap address is rate-limited...
        let _ = ep.handle_send(t0, &mut tx);
        let t1 = t0 + Duration::from_secs(1);
        assert!(ep.handle_send(t1, &mut tx).disco.is_empty());
        // ...but a CallMeMaybe pings everything now, without sending one back.
        let cmm = [
            sa("203.0.113.2:41641"),
            sa("203.0.113.2:9999"),
            sa("[fe80::1]:41641"),
            sa("[2001:db8::2]:41641"),
        ];
        let outs = ep.handle_call_me_maybe(&cmm, t1, &mut tx);
        let to: Vec<Path> = pings(&outs).into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            to,
            vec![
                Path::Udp(sa("203.0.113.2:9999")),
                Path::Udp(sa("203.0.113.2:41641")),
                Path::Udp(sa("[2001:db8::2]:41641")),
            ],
            "link-local v6 skipped"
        );
        assert!(outs.iter().all(|o| !matches!(o.msg, Message::CallMeMaybe { .. })));
        // A newer CallMeMaybe drops addresses only the old one listed; netmap ones stay.
        let outs = ep.handle_call_me_maybe(&[sa("203.0.113.2:7777")], t1, &mut tx);
        let mut have: Vec<SocketAddr> = ep.candidates().map(|(a, _)| a).collect();
        have.sort();
        assert_eq!(have, vec![sa("203.0.113.2:7777"), sa("203.0.113.2:41641")]);
        assert_eq!(pings(&outs).len(), 2);
    }

    #[test]
    fn netmap_changes() {
        let t0 = Instant::now();
        let mut tx = tx_counter();
        let mut ep = endpoint(&["203.0.113.2:41641", "203.0.113.2:1"], t0);
        let plan = ep.handle_send(t0, &mut tx);
        let p = pings(&plan.disco);
        let to_41641 = p
            .iter()
            .find(|(to, _)| *to == Path::Udp(sa("203.0.113.2:41641")))
            .unwrap()
            .1;
        ep.handle_pong(to_41641, Path::Udp(sa("203.0.113.2:41641")), t0)
            .unwrap();
        assert!(matches!(ep.path(t0), PathStatus::Direct { .. }));
        // Same key, best address dropped from the netmap: best goes, DERP region follows.
        ep.handle_netmap(&[sa("203.0.113.2:1")], peer_disco(), 3, t0);
        assert_eq!(ep.path(t0), PathStatus::Derp(3));
        assert_eq!(ep.best_addr(), None);
        // A new disco key (the peer restarted): in-flight pings are forgotten.
        let plan = ep.handle_send(t0 + Duration::from_secs(10), &mut tx);
        let (_, txid) = pings(&plan.disco)[0];
        ep.handle_netmap(
            &[sa("203.0.113.2:1")],
            DiscoPrivate::from_random([8; 32]).public(),
            3,
            t0,
        );
        assert_eq!(ep.handle_pong(txid, Path::Udp(sa("203.0.113.2:1")), t0), None);
        assert_eq!(ep.poll_timeout(), None, "reset stops heartbeat and ping timers");
        // tailcfg::Node form, with the legacy DERP field.
        let node = Node {
            endpoints: vec!["203.0.113.9:41641".into(), "bogus".into()],
            derp: "127.3.3.40:9".into(),
            disco_key: peer_disco(),
            ..Node::default()
        };
        ep.handle_node(&node, t0);
        assert_eq!(ep.home_derp(), 9);
        assert_eq!(ep.disco_key(), peer_disco());
        assert_eq!(
            ep.candidates().map(|(a, _)| a).collect::<Vec<_>>(),
            vec![sa("203.0.113.9:41641")]
        );
    }

    #[test]
    fn heartbeat_runs_while_active_and_stops_when_idle() {
        let t0 = Instant::now();
        let mut tx = tx_counter();
        let mut ep = endpoint(&["203.0.113.2:41641"], t0);
        assert_eq!(ep.poll_timeout(), None);
        let plan = ep.handle_send(t0, &mut tx);
        let (_, txid) = pings(&plan.disco)[0];
        let rtt = Duration::from_millis(30);
        ep.handle_pong(txid, Path::Udp(sa("203.0.113.2:41641")), t0 + rtt)
            .unwrap();
        // Heartbeats every 3 s ping the best address and keep it trusted without traffic.
        let mut now = t0;
        for _ in 0..14 {
            now = ep.poll_timeout().unwrap();
            let outs = ep.handle_timeout(now, &mut tx);
            for (to, txid) in pings(&outs) {
                assert_eq!(to, Path::Udp(sa("203.0.113.2:41641")));
                ep.handle_pong(txid, to, now + rtt);
            }
            assert!(matches!(ep.path(now), PathStatus::Direct { .. }));
        }
        assert_eq!(now, t0 + Duration::from_secs(42));
        // After 45 s without traffic the heartbeat stops and nothing is scheduled.
        let now = ep.poll_timeout().unwrap();
        assert_eq!(pings(&ep.handle_timeout(now, &mut tx)).len(), 1);
        let now = ep.poll_timeout().unwrap();
        assert_eq!(now, t0 + Duration::from_secs(48));
        assert!(ep.handle_timeout(now, &mut tx).is_empty());
        assert!(ep.poll_timeout().is_some(), "the t=45 ping still awaits its timeout");
        let now = ep.poll_timeout().unwrap();
        assert!(ep.handle_timeout(now, &mut tx).is_empty());
        assert_eq!(ep.poll_timeout(), None);
    }

    #[test]
    fn slow_direct_path_rediscovers_every_minute_fast_one_does_not() {
        for (rtt_ms, want_rounds) in [(30u64, 1usize), (2, 0)] {
            let t0 = Instant::now();
            let mut tx = tx_counter();
            let mut ep = endpoint(&["203.0.113.2:41641", "203.0.113.2:2"], t0);
            let rtt = Duration::from_millis(rtt_ms);
            let mut rounds = 0;
            let mut now = t0;
            let mut outs = ep.handle_send(now, &mut tx).disco;
            loop {
                // Only the netmap's public address answers.
                for (to, txid) in pings(&outs) {
                    if to == Path::Udp(sa("203.0.113.2:41641")) {
                        ep.handle_pong(txid, to, now + rtt);
                    }
                }
                now = ep.poll_timeout().unwrap();
                if now > t0 + Duration::from_secs(61) {
                    break;
                }
                // Traffic keeps flowing (over the trusted path: no disco from sends).
                assert!(ep.handle_send(now, &mut tx).disco.is_empty());
                outs = ep.handle_timeout(now, &mut tx);
                if outs.iter().any(|o| matches!(o.msg, Message::CallMeMaybe { .. })) {
                    rounds += 1;
                }
            }
            assert_eq!(rounds, want_rounds, "rtt {rtt_ms} ms");
        }
    }

    #[test]
    fn cli_ping() {
        let t0 = Instant::now();
        let mut tx = tx_counter();
        let mut ep = endpoint(&["203.0.113.2:41641", "203.0.113.2:2"], t0);
        // No trusted path: DERP plus every candidate, ignoring rate limits.
        let _ = ep.handle_send(t0, &mut tx);
        let outs = ep.ping_cli(t0, &mut tx);
        let p = pings(&outs);
        assert_eq!(
            p.iter().map(|(to, _)| *to).collect::<Vec<_>>(),
            vec![
                Path::Derp(2),
                Path::Udp(sa("203.0.113.2:2")),
                Path::Udp(sa("203.0.113.2:41641")),
            ]
        );
        // ...plus a CallMeMaybe via DERP, so the peer's pings open its NAT towards us.
        assert!(
            outs.iter()
                .any(|o| o.to == Path::Derp(2) && matches!(o.msg, Message::CallMeMaybe { .. })),
            "{outs:?}"
        );
        let r = ep
            .handle_pong(p[0].1, Path::Derp(2), t0 + Duration::from_millis(80))
            .unwrap();
        assert_eq!(
            r,
            PongResult {
                to: Path::Derp(2),
                rtt: Duration::from_millis(80),
                cli: true
            }
        );
        assert_eq!(ep.best_addr(), None, "a DERP pong is no direct path");
        ep.handle_pong(
            p[2].1,
            Path::Udp(sa("203.0.113.2:41641")),
            t0 + Duration::from_millis(90),
        );
        // Trusted path: only that one.
        let p = pings(&ep.ping_cli(t0 + Duration::from_secs(1), &mut tx));
        assert_eq!(
            p.iter().map(|(to, _)| *to).collect::<Vec<_>>(),
            vec![Path::Udp(sa("203.0.113.2:41641"))]
        );
    }

    #[test]
    fn send_error_and_connectivity_change_drop_the_best_path() {
        let t0 = Instant::now();
        let mut tx = tx_counter();
        for connectivity in [false, true] {
            let mut ep = endpoint(&["203.0.113.2:41641"], t0);
            let (_, txid) = pings(&ep.handle_send(t0, &mut tx).disco)[0];
            ep.handle_pong(txid, Path::Udp(sa("203.0.113.2:41641")), t0).unwrap();
            if connectivity {
                ep.handle_connectivity_change();
            } else {
                ep.handle_send_error(sa("203.0.113.2:41641"));
            }
            assert_eq!(ep.path(t0), PathStatus::Derp(2));
            // And rediscovery is not rate-limited away.
            assert_eq!(pings(&ep.handle_send(t0, &mut tx).disco).len(), 1);
        }
    }

    // ---- pair harness: two endpoints, a fake network, a virtual clock ----

    const A: usize = 0;
    const B: usize = 1;
    const UDP_DELAY: Duration = Duration::from_millis(10);
    const DERP_DELAY: Duration = Duration::from_millis(40);

    /// One node: its endpoint for the other node, plus what the network knows about it.
    struct Side {
        ep: Endpoint,
        addr: SocketAddr,
        home: i32,
        node_key: NodePublic,
        shared: DiscoShared,
        /// Stateful firewall: the remote addresses this side has sent UDP to.
        opened: BTreeSet<SocketAddr>,
        /// Sends a packet to the peer every second.
        traffic: bool,
        /// Plans of those sends, with their time in seconds.
        plans: Vec<(f64, SendPlan)>,
        /// Disco this side sent, with time and destination.
        sent: Vec<(f64, DiscoOut)>,
    }

    struct InFlight {
        at: Instant,
        to: usize,
        /// The path as the receiver sees it.
        via: Path,
        pkt: Vec<u8>,
    }

    struct Pair {
        t0: Instant,
        now: Instant,
        s: [Side; 2],
        wire: Vec<InFlight>,
        next_tick: Instant,
        /// Drop all direct UDP between the two.
        drop_udp: bool,
        /// Apply the stateful firewalls.
        firewalls: bool,
        /// Deliver CallMeMaybe (off: the peer never hears it).
        deliver_cmm: bool,
        tx: u32,
        nonce: u64,
    }

    impl Pair {
        /// A at 198.51.100.1 (home region 1), B at 203.0.113.2 (home region 2). A's netmap lists
        /// B's public address and an unreachable private one; B's lists A's unless `b_knows_a`
        /// is false.
        fn new(b_knows_a: bool) -> Pair {
            let t0 = Instant::now();
            let keys = [
                DiscoPrivate::from_random([0xA; 32]),
                DiscoPrivate::from_random([0xB; 32]),
            ];
            let addrs = [sa("198.51.100.1:41641"), sa("203.0.113.2:41641")];
            let homes = [1, 2];
            let node_keys = [NodePublic([0xA1; 32]), NodePublic([0xB1; 32])];
            let side = |i: usize| {
                let peer = 1 - i;
                let mut ep = Endpoint::new(node_keys[i], Timing::default());
                let eps: Vec<SocketAddr> = match i {
                    A => vec![addrs[B], sa("10.0.0.2:41641")],
                    _ if b_knows_a => vec![addrs[A]],
                    _ => vec![],
                };
                ep.handle_netmap(&eps, keys[peer].public(), homes[peer], t0);
                ep.set_my_endpoints(&[addrs[i]]);
                Side {
                    ep,
                    addr: addrs[i],
                    home: homes[i],
                    node_key: node_keys[i],
                    shared: DiscoShared::new(&keys[i], &keys[peer].public()),
                    opened: BTreeSet::new(),
                    traffic: true,
                    plans: Vec::new(),
                    sent: Vec::new(),
                }
            };
            Pair {
                t0,
                now: t0,
                s: [side(A), side(B)],
                wire: Vec::new(),
                next_tick: t0,
                drop_udp: false,
                firewalls: false,
                deliver_cmm: true,
                tx: 0,
                nonce: 0,
            }
        }

        fn at(&self, secs: f64) -> Instant {
            self.t0 + Duration::from_secs_f64(secs)
        }

        fn secs(&self) -> f64 {
            (self.now - self.t0).as_secs_f64()
        }

        fn path(&self, i: usize) -> PathStatus {
            self.s[i].ep.path(self.now)
        }

        /// The last send plan of side `i`.
        fn last_plan(&self, i: usize) -> &SendPlan {
            &self.s[i].plans.last().unwrap().1
        }

        /// Runs every event (deliveries, timers, traffic ticks) up to `secs`, in time order.
        fn run_until(&mut self, secs: f64) {
            let end = self.at(secs);
            loop {
                let next = self
                    .wire
                    .iter()
                    .map(|p| p.at)
                    .chain(self.s.iter().filter_map(|s| s.ep.poll_timeout()))
                    .chain([self.next_tick])
                    .min()
                    .unwrap();
                if next > end {
                    break;
                }
                self.now = self.now.max(next);
                while let Some(i) = (0..self.wire.len()).find(|&i| self.wire[i].at <= self.now) {
                    let p = self.wire.remove(i);
                    self.deliver(p);
                }
                for i in [A, B] {
                    if self.s[i].ep.poll_timeout().is_some_and(|t| t <= self.now) {
                        let mut n = self.tx;
                        let outs = self.s[i].ep.handle_timeout(self.now, &mut || {
                            n += 1;
                            pair_tx(n)
                        });
                        self.tx = n;
                        outs.into_iter().for_each(|o| self.transmit(i, o));
                    }
                }
                if self.next_tick <= self.now {
                    self.next_tick += Duration::from_secs(1);
                    for i in [A, B] {
                        if !self.s[i].traffic {
                            continue;
                        }
                        let mut n = self.tx;
                        let plan = self.s[i].ep.handle_send(self.now, &mut || {
                            n += 1;
                            pair_tx(n)
                        });
                        self.tx = n;
                        plan.disco.iter().cloned().for_each(|o| self.transmit(i, o));
                        let t = self.secs();
                        self.s[i].plans.push((t, plan));
                    }
                }
            }
            self.now = end;
        }

        /// Seals `out` and puts it on the fake network, unless the network drops it.
        fn transmit(&mut self, from: usize, out: DiscoOut) {
            let to = 1 - from;
            self.nonce += 1;
            let mut nonce = [0u8; 24];
            nonce[..8].copy_from_slice(&self.nonce.to_be_bytes());
            let pkt = self.s[from].shared.seal(nonce, &out.msg);
            let t = self.secs();
            self.s[from].sent.push((t, out.clone()));
            let (at, via) = match out.to {
                Path::Udp(dst) => {
                    self.s[from].opened.insert(dst);
                    let src = self.s[from].addr;
                    if dst != self.s[to].addr || self.drop_udp || (self.firewalls && !self.s[to].opened.contains(&src))
                    {
                        return;
                    }
                    (self.now + UDP_DELAY, Path::Udp(src))
                }
                Path::Derp(region) => {
                    // We hold connections to our home and to regions we sent to.
                    assert!(
                        region == self.s[to].home || region == self.s[from].home,
                        "DERP region {region}"
                    );
                    if !self.deliver_cmm && matches!(out.msg, Message::CallMeMaybe { .. }) {
                        return;
                    }
                    (self.now + DERP_DELAY, Path::Derp(region))
                }
            };
            self.wire.push(InFlight { at, to, via, pkt });
        }

        /// Opens a packet at its receiver and feeds the endpoint.
        fn deliver(&mut self, p: InFlight) {
            let msg = self.s[p.to].shared.open(&p.pkt).expect("sealed by the peer");
            let now = self.now;
            let peer_key = self.s[1 - p.to].node_key;
            let mut n = self.tx;
            let mut tx = || {
                n += 1;
                pair_tx(n)
            };
            let ep = &mut self.s[p.to].ep;
            let outs = match msg {
                Message::Ping { tx_id, node_key, .. } => {
                    assert_eq!(node_key, peer_key);
                    ep.handle_ping(p.via, tx_id, now).reply.into_iter().collect()
                }
                Message::Pong { tx_id, src } => {
                    // Free STUN: the responder saw our public address (or DERP's magic one).
                    if let Path::Udp(_) = p.via {
                        assert_eq!(src, self.s[p.to].addr);
                    }
                    ep.handle_pong(tx_id, p.via, now);
                    vec![]
                }
                Message::CallMeMaybe { endpoints } => {
                    assert!(matches!(p.via, Path::Derp(_)), "CallMeMaybe is only valid via DERP");
                    ep.handle_call_me_maybe(&endpoints, now, &mut tx)
                }
            };
            self.tx = n;
            outs.into_iter().for_each(|o| self.transmit(p.to, o));
        }
    }

    /// The pair's tx ids: a counter, so runs reproduce.
    fn pair_tx(n: u32) -> TxId {
        let mut t = [0xEE; 12];
        t[..4].copy_from_slice(&n.to_be_bytes());
        t
    }

    fn direct(addr: &str) -> impl Fn(&PathStatus) -> bool + '_ {
        move |p| matches!(p, PathStatus::Direct { addr: a, .. } if *a == sa(addr))
    }

    /// (a) Traffic starts on DERP at once and moves to the direct path after one ping/pong.
    #[test]
    fn pair_starts_on_derp_then_upgrades_to_direct() {
        let mut p = Pair::new(true);
        p.run_until(0.0);
        let plan = p.last_plan(A).clone();
        assert_eq!(
            (plan.udp, plan.derp),
            (None, Some(2)),
            "first packet via B's home region"
        );
        assert_eq!(pings(&plan.disco).len(), 2, "pings to both of B's netmap endpoints");
        assert!(plan
            .disco
            .iter()
            .any(|o| o.to == Path::Derp(2) && matches!(o.msg, Message::CallMeMaybe { .. })));

        // Ping out (10 ms) + pong back (10 ms).
        p.run_until(0.019);
        assert_eq!(p.path(A), PathStatus::Derp(2));
        p.run_until(0.021);
        assert_eq!(
            p.path(A),
            PathStatus::Direct {
                addr: sa("203.0.113.2:41641"),
                rtt: 2 * UDP_DELAY
            }
        );
        assert!(direct("198.51.100.1:41641")(&p.path(B)));

        // Next packets go direct only, and stay there with heartbeats.
        p.run_until(30.0);
        for i in [A, B] {
            for (t, plan) in p.s[i].plans.iter().filter(|(t, _)| *t >= 1.0) {
                assert!(plan.udp.is_some() && plan.derp.is_none(), "side {i} at {t}: {plan:?}");
            }
        }
        // The unreachable private candidate never won and discovery stays quiet: a 20 ms path
        // is not good enough, so one full round per minute at most (none yet after 30 s).
        let cmm = p.s[A]
            .sent
            .iter()
            .filter(|(_, o)| matches!(o.msg, Message::CallMeMaybe { .. }))
            .count();
        assert_eq!(cmm, 1);
    }

    /// Drives the pair to a direct path, then drops UDP at t=10.
    fn dropped_at_10() -> Pair {
        let mut p = Pair::new(true);
        p.run_until(10.0);
        assert!(direct("203.0.113.2:41641")(&p.path(A)));
        p.drop_udp = true;
        p
    }

    /// (b) With direct UDP gone, packets go via DERP as well once the trust window lapses, and
    /// via DERP only once the unanswered ping times out.
    #[test]
    fn pair_falls_back_to_derp_when_direct_dies() {
        let mut p = dropped_at_10();
        let t = Timing::default();
        let trust = t.trust_udp_addr_duration.as_secs_f64();
        p.run_until(30.0);
        let after_drop = || p.s[A].plans.iter().filter(|(t, _)| *t > 10.0);
        let first_derp = after_drop().find(|(_, pl)| pl.derp.is_some()).unwrap().0;
        assert!(
            first_derp > 10.0 && first_derp <= 10.0 + trust + 1.0,
            "DERP used at {first_derp}, trust window {trust} s after the drop (+1 s tick)"
        );
        let derp_only = after_drop()
            .find(|(_, pl)| pl.udp.is_none() && pl.derp.is_some())
            .unwrap()
            .0;
        let limit = 10.0 + trust + t.ping_timeout.as_secs_f64() + 1.0;
        assert!(derp_only <= limit, "DERP only at {derp_only} (limit {limit})");
        // No packet went nowhere, and it stays on DERP while UDP is blocked.
        assert!(p.s[A].plans.iter().all(|(_, pl)| pl.udp.is_some() || pl.derp.is_some()));
        assert_eq!(p.path(A), PathStatus::Derp(2));
        assert_eq!(p.path(B), PathStatus::Derp(1));
        assert!(p.s[A]
            .plans
            .iter()
            .filter(|(t, _)| *t > derp_only)
            .all(|(_, pl)| pl.udp.is_none()));
        // Meanwhile discovery keeps trying, rate-limited to one ping per address per 5 s.
        let pings_to_b: Vec<f64> = p.s[A]
            .sent
            .iter()
            .filter(|(t, o)| *t > 20.0 && o.to == Path::Udp(sa("203.0.113.2:41641")))
            .map(|(t, _)| *t)
            .collect();
        assert!(pings_to_b.len() >= 2, "{pings_to_b:?}");
        assert!(
            pings_to_b.windows(2).all(|w| w[1] - w[0] >= 5.0 - 1e-9),
            "{pings_to_b:?}"
        );
    }

    /// (c) When UDP comes back, the next discovery round finds the direct path again.
    #[test]
    fn pair_reupgrades_when_direct_returns() {
        let mut p = dropped_at_10();
        p.run_until(40.0);
        assert_eq!(p.path(A), PathStatus::Derp(2));
        p.drop_udp = false;
        let t = Timing::default();
        let limit = 40.0 + t.disco_ping_interval.as_secs_f64() + 1.0;
        p.run_until(limit);
        assert!(direct("203.0.113.2:41641")(&p.path(A)), "{:?}", p.path(A));
        assert!(direct("198.51.100.1:41641")(&p.path(B)), "{:?}", p.path(B));
        p.run_until(limit + 1.0);
        let plan = p.last_plan(A);
        assert_eq!((plan.udp, plan.derp), (Some(sa("203.0.113.2:41641")), None));
    }

    /// (d) Behind stateful firewalls, and with B not knowing A's endpoints: A's first ping dies
    /// at B's firewall, but A's CallMeMaybe makes B ping A, which opens B's side; B goes direct
    /// at once, A on its next discovery round. Without the CallMeMaybe neither ever does.
    #[test]
    fn pair_call_me_maybe_makes_the_other_side_ping() {
        for deliver_cmm in [true, false] {
            let mut p = Pair::new(false);
            p.firewalls = true;
            p.deliver_cmm = deliver_cmm;
            p.s[B].traffic = false;
            assert_eq!(p.s[B].ep.candidates().count(), 0);
            p.run_until(0.039);
            assert!(p.s[B].sent.is_empty());
            p.run_until(0.041);
            if !deliver_cmm {
                p.run_until(30.0);
                assert_eq!(p.path(A), PathStatus::Derp(2));
                assert!(p.s[B].sent.is_empty(), "B never learns where A is");
                continue;
            }
            // The CallMeMaybe (40 ms via DERP) arrived: B pings A's listed endpoint right away.
            let b_sent: Vec<&DiscoOut> = p.s[B].sent.iter().map(|(_, o)| o).collect();
            assert_eq!(b_sent.len(), 1);
            assert!(matches!(b_sent[0].msg, Message::Ping { .. }));
            assert_eq!(b_sent[0].to, Path::Udp(sa("198.51.100.1:41641")));
            // A's firewall lets it in (A pinged B first) and A's pong passes B's (B just pinged A).
            p.run_until(0.061);
            assert!(direct("198.51.100.1:41641")(&p.path(B)));
            assert_eq!(p.path(A), PathStatus::Derp(2));
            // A's own pings resume after the 5 s interval, now through the open firewall.
            p.run_until(4.9);
            assert_eq!(p.path(A), PathStatus::Derp(2));
            p.run_until(5.1);
            assert!(direct("203.0.113.2:41641")(&p.path(A)), "{:?}", p.path(A));
        }
    }
}
