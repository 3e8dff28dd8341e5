//! The data-plane shell: one event loop over the TUN device, the magicsock UDP socket, DERP
//! relay connections and a timer, gluing the sans-io cores together.
//!
//! Plays the role of tailscale `wgengine/userspace.go` + the I/O half of `wgengine/magicsock`.
//! Per packet: TUN → [`WgPeers::encapsulate_to`] → the peer's [`Endpoint`] picks UDP and/or
//! DERP; UDP/DERP → [`demux`] → STUN (netcheck), disco (path discovery) or WireGuard →
//! [`WgPeers::decapsulate_to`] → TUN. Each DERP region gets its own task (the client needs `&mut`
//! for both directions), connected to the loop by bounded channels.
//!
//! Per wake-up, a branch drains a burst of up to `BURST` (64) packets. Data messages for UDP are
//! encrypted straight into a [`SendBatch`] that leaves in one `sendmmsg` with GSO at the end of
//! the iteration; decrypted packets collect in a [`Coalescer`] that merges TCP segments before
//! the TUN writes. No per-packet allocation on either path; the buffers are reused.
//!
//! The caller supplies the netmap (a `watch`), receives endpoint/home-DERP updates for control
//! (another `watch`), and may query status or run CLI pings through [`EngineHandle`].

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use crate::{
    control::netmap::Netmap,
    derp::client::{self as derp_client, DerpEvent},
    disco::{self, DiscoShared, Message},
    keys::{DiscoPrivate, DiscoPublic, NodePrivate, NodePublic},
    magicsock::{
        batch::{self, SendBatch},
        demux::{self, Kind},
        endpoint::{self, DiscoOut, Endpoint, Path, PathStatus, TxId},
    },
    netcheck::{self, ProbePlan, ReportState},
    router::{Router, RouterConfig, SystemRunner},
    stun,
    tailcfg::{DerpMap, DerpRegion},
    tun::{gro::Coalescer, Tun},
    udp,
    wg::{self, PeerConfig, WgPeers},
};

/// Timer resolution of the loop (boringtun wants ≥ 4 Hz; netcheck probes retransmit at 100 ms).
const TICK: Duration = Duration::from_millis(100);
/// How often netcheck re-runs (Go: every 20-26 s while active).
const NETCHECK_INTERVAL: Duration = Duration::from_secs(25);
/// Packets queued towards one DERP region before new ones are dropped.
const DERP_QUEUE: usize = 256;
/// Largest datagram we read (WireGuard over a 1280 MTU plus overhead, with room to spare; a
/// UDP GRO read of coalesced datagrams is at most this too).
const MAX_DATAGRAM: usize = 65535;
/// Packets (or GRO reads) handled per wake-up of the TUN or UDP branch before the loop looks at
/// its other inputs. Draining a burst costs one reactor round trip instead of one per packet,
/// and lets a bulk flow's data messages leave in one batched send (see `magicsock::batch`).
const BURST: usize = 64;

/// Settings for [`Engine::start`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// TUN device name.
    pub tun: String,
    /// UDP port for WireGuard/disco/STUN (0 = any).
    pub port: u16,
}

/// What control should publish about us (lite map request contents).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalEndpoints {
    /// `ip:port` strings.
    pub endpoints: Vec<String>,
    /// Go `EndpointType` per entry: 1 local, 2 STUN.
    pub types: Vec<i32>,
    /// `Hostinfo.NetInfo` JSON (PreferredDERP, DERPLatency, ...).
    pub net_info: Value,
}

/// One line of `tinyscale ping`.
#[derive(Debug, Clone, PartialEq)]
pub struct PingResult {
    /// Where the pong came from: `ip:port` or `DERP(<region>)`.
    pub via: String,
    /// Whether that is a direct path.
    pub direct: bool,
    /// Round-trip time.
    pub rtt: Duration,
}

enum Cmd {
    Ping(NodePublic, oneshot::Sender<Result<PingResult, String>>),
    Netcheck(oneshot::Sender<Value>),
}

/// A cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    cmds: mpsc::Sender<Cmd>,
    status: Arc<Mutex<HashMap<NodePublic, Value>>>,
}

impl EngineHandle {
    /// Per-peer path status (`CurAddr`, `Relay`, handshake age, bytes).
    pub fn peer_status(&self, key: &NodePublic) -> Option<Value> {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    /// Sends one disco ping round to `peer` and waits for the first pong (5 s).
    pub async fn ping(&self, peer: NodePublic) -> Result<PingResult, String> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Ping(peer, tx))
            .await
            .map_err(|_| "data plane is not running".to_string())?;
        rx.await.map_err(|_| "data plane stopped".to_string())?
    }

    /// The latest netcheck report as JSON.
    pub async fn netcheck(&self) -> Result<Value, String> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Netcheck(tx))
            .await
            .map_err(|_| "data plane is not running".to_string())?;
        rx.await.map_err(|_| "data plane stopped".to_string())
    }
}

struct Peer {
    endpoint: Endpoint,
    shared: Option<DiscoShared>,
    name: String,
}

/// One `tinyscale ping` round: the first pong to any of its pings answers it.
struct PendingPing {
    reply: oneshot::Sender<Result<PingResult, String>>,
    deadline: Instant,
}

/// The running data plane.
pub struct Engine {
    me: NodePublic,
    disco: DiscoPrivate,
    wg: WgPeers,
    tun: Tun,
    /// Decrypted packets for `tun`, TCP segments merged, written by [`Engine::flush_tun`].
    tun_out: Coalescer,
    router: Router<SystemRunner>,
    udp: UdpSocket,
    /// Datagrams for `udp`, sent at the end of each loop iteration by [`flush_udp`].
    udp_out: SendBatch,
    port: u16,
    /// Looked up per packet sent (the path), hence the fast hasher.
    peers: wg::FastMap<NodePublic, Peer>,
    by_disco: HashMap<DiscoPublic, NodePublic>,
    derp_map: DerpMap,
    home_derp: i32,
    derps: HashMap<i32, mpsc::Sender<(NodePublic, Vec<u8>)>>,
    derp_in_tx: mpsc::Sender<(i32, NodePublic, Bytes)>,
    /// Packets were queued towards a DERP task during this loop iteration.
    derp_queued: bool,
    my_private: NodePrivate,
    report: Option<ReportState>,
    last_report: Option<netcheck::Report>,
    next_netcheck: Instant,
    local: LocalEndpoints,
    endpoints_tx: watch::Sender<LocalEndpoints>,
    pending_pings: HashMap<TxId, u64>,
    rounds: HashMap<u64, PendingPing>,
    round: u64,
    status: Arc<Mutex<HashMap<NodePublic, Value>>>,
    addresses: Vec<(IpAddr, u8)>,
}

fn new_tx() -> TxId {
    let mut t = [0u8; 12];
    OsRng.fill_bytes(&mut t);
    t
}

fn nonce() -> [u8; 24] {
    let mut n = [0u8; 24];
    OsRng.fill_bytes(&mut n);
    n
}

/// `host:port` of a region's first DERP node, over plain HTTP (TLS is a later step).
fn derp_addr(region: &DerpRegion) -> Option<String> {
    let n = region.nodes.iter().find(|n| !n.stun_only)?;
    let host = if !n.ipv4.is_empty() && n.ipv4.parse::<IpAddr>().is_ok() {
        n.ipv4.clone()
    } else {
        n.host_name.clone()
    };
    let port = if n.derp_port > 0 { n.derp_port as u16 } else { 80 };
    Some(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// The local source address the kernel would use towards `dst` (no packet is sent).
fn local_addr_towards(dst: SocketAddr) -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind(if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
    s.connect(dst).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// Runs one DERP region connection: reconnects with backoff, forwards both ways.
async fn derp_task(
    region: i32,
    addr: String,
    me: NodePrivate,
    home: bool,
    mut out_rx: mpsc::Receiver<(NodePublic, Vec<u8>)>,
    in_tx: mpsc::Sender<(i32, NodePublic, Bytes)>,
) {
    let mut backoff = derp_client::Backoff::default();
    loop {
        match derp_client::connect_http(&addr, "/derp", &me).await {
            Ok(mut c) => {
                backoff.reset();
                log::info!("derp connected region={region} addr={addr} home={home}");
                if home {
                    let _ = c.note_preferred(true).await;
                }
                loop {
                    tokio::select! {
                        ev = c.recv() => match ev {
                            Ok(DerpEvent::Packet { src, data }) => {
                                if in_tx.send((region, src, data)).await.is_err() { return; }
                            }
                            Ok(_) => {}
                            Err(e) => { log::warn!("derp connection lost region={region} err={e}"); break; }
                        },
                        out = out_rx.recv() => match out {
                            Some((dst, pkt)) => {
                                if let Err(e) = c.send(dst, &pkt).await {
                                    log::warn!("derp send failed region={region} err={e}");
                                    break;
                                }
                            }
                            None => return,
                        },
                    }
                }
            }
            Err(e) => log::warn!("derp connect failed region={region} addr={addr} err={e}"),
        }
        let delay = backoff.next_delay(OsRng.next_u32());
        // Keep draining the queue while waiting so senders never block on a dead region.
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                m = out_rx.recv() => if m.is_none() { return },
            }
        }
    }
}

impl Engine {
    /// Opens the TUN device and UDP socket and spawns the loop. Fails (clearly) without
    /// CAP_NET_ADMIN or `/dev/net/tun`.
    pub async fn start(
        cfg: &EngineConfig,
        node: NodePrivate,
        disco: DiscoPrivate,
        netmap: watch::Receiver<Option<Arc<Netmap>>>,
        endpoints_tx: watch::Sender<LocalEndpoints>,
    ) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), String> {
        let tun = Tun::open(&cfg.tun).map_err(|e| format!("cannot open TUN device {}: {e}", cfg.tun))?;
        let udp = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], cfg.port)))
            .await
            .or_else(|e| {
                log::warn!("UDP port {} unavailable ({e}), using a random one", cfg.port);
                std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
                    s.set_nonblocking(true)?;
                    UdpSocket::from_std(s)
                })
            })
            .map_err(|e| format!("cannot bind UDP: {e}"))?;
        let port = udp.local_addr().map(|a| a.port()).unwrap_or(0);
        let (rcvbuf, sndbuf) = udp::set_buffers(&udp);
        let gso = udp::gso_supported(&udp);
        let gro = udp::enable_gro(&udp);
        log::info!(
            "data plane up tun={} udp_port={port} rcvbuf={rcvbuf} sndbuf={sndbuf} gso={gso} gro={gro}",
            tun.name()
        );
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let (derp_in_tx, derp_in_rx) = mpsc::channel(1024);
        let status = Arc::new(Mutex::new(HashMap::new()));
        let engine = Engine {
            me: node.public(),
            wg: WgPeers::new(&node, OsRng.next_u32()),
            disco,
            tun,
            tun_out: Coalescer::new(),
            router: Router::new(SystemRunner),
            udp,
            udp_out: SendBatch::new(if gso { batch::MAX_SEGMENTS } else { 1 }),
            port,
            peers: wg::FastMap::default(),
            by_disco: HashMap::new(),
            derp_map: DerpMap::default(),
            home_derp: 0,
            derps: HashMap::new(),
            derp_in_tx,
            derp_queued: false,
            my_private: node,
            report: None,
            last_report: None,
            next_netcheck: Instant::now(),
            local: LocalEndpoints::default(),
            endpoints_tx,
            pending_pings: HashMap::new(),
            rounds: HashMap::new(),
            round: 0,
            status: status.clone(),
            addresses: Vec::new(),
        };
        let task = tokio::spawn(engine.run(netmap, cmd_rx, derp_in_rx));
        Ok((EngineHandle { cmds: cmd_tx, status }, task))
    }

    async fn run(
        mut self,
        mut netmap: watch::Receiver<Option<Arc<Netmap>>>,
        mut cmds: mpsc::Receiver<Cmd>,
        mut derp_in: mpsc::Receiver<(i32, NodePublic, Bytes)>,
    ) {
        let mut tun_buf = vec![0u8; MAX_DATAGRAM];
        let mut udp_buf = vec![0u8; MAX_DATAGRAM];
        // Decrypted packets on their way to the TUN (large enough for WgPeers to reuse it when
        // a handshake releases queued packets).
        let mut plain_buf = vec![0u8; wg::FLUSH_ROOM];
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Some(nm) = netmap.borrow_and_update().clone() {
            self.apply_netmap(&nm);
        }
        loop {
            tokio::select! {
                r = self.tun.recv(&mut tun_buf) => match r {
                    Ok(n) => {
                        self.on_tun(&tun_buf[..n]);
                        self.drain_tun(&mut tun_buf);
                    }
                    Err(e) => { log::error!("TUN read failed err={e}"); break; }
                },
                r = self.udp.readable() => match r {
                    Ok(()) => self.drain_udp(&mut udp_buf, &mut plain_buf).await,
                    Err(e) => log::debug!("udp recv err={e}"),
                },
                Some((region, src, data)) = derp_in.recv() => {
                    self.on_derp(region, src, &data, &mut plain_buf).await;
                    // The rest of a burst relayed to us, as for the TUN and UDP branches.
                    for _ in 1..BURST {
                        let Ok((region, src, data)) = derp_in.try_recv() else { break };
                        self.on_derp(region, src, &data, &mut plain_buf).await;
                        self.flush_tun_if_full().await;
                    }
                }
                _ = tick.tick() => self.on_tick(),
                r = netmap.changed() => {
                    if r.is_err() { break; }
                    let nm = netmap.borrow_and_update().clone();
                    if let Some(nm) = nm { self.apply_netmap(&nm); }
                }
                Some(cmd) = cmds.recv() => self.on_cmd(cmd),
            }
            flush_udp(&self.udp, &mut self.udp_out);
            self.flush_tun().await;
            // A burst can queue dozens of packets for a DERP task on this same thread; let it
            // write them out before the next burst instead of overflowing its queue.
            if std::mem::take(&mut self.derp_queued) {
                tokio::task::yield_now().await;
            }
        }
        let _ = self.router.close();
        log::info!("data plane stopped");
    }

    fn apply_netmap(&mut self, nm: &Netmap) {
        let now = Instant::now().into_std();
        // Addresses of this node on the TUN.
        if let Some(me) = &nm.self_node {
            let addrs: Vec<(IpAddr, u8)> = me
                .addresses
                .iter()
                .filter_map(|a| {
                    let (ip, len) = a.split_once('/')?;
                    Some((ip.parse().ok()?, len.parse().ok()?))
                })
                .collect();
            if addrs != self.addresses {
                let cfg = RouterConfig::new(self.tun.name(), addrs.clone());
                match self.router.set(&cfg) {
                    Ok(()) => self.addresses = addrs,
                    Err(e) => log::error!("configuring {} failed err={e}", self.tun.name()),
                }
            }
        }
        // WireGuard peers and per-peer path state.
        let peers: Vec<_> = nm
            .peers
            .values()
            .filter(|p| !p.key.is_zero() && p.key != self.me)
            .collect();
        self.wg.set_peers(peers.iter().map(|p| PeerConfig::from_node(p)));
        let keep: std::collections::HashSet<NodePublic> = peers.iter().map(|p| p.key).collect();
        self.peers.retain(|k, _| keep.contains(k));
        self.by_disco.clear();
        for p in &peers {
            let e = self.peers.entry(p.key).or_insert_with(|| Peer {
                endpoint: Endpoint::new(self.me, endpoint::Timing::default()),
                shared: None,
                name: String::new(),
            });
            e.endpoint.handle_node(p, now);
            e.name = p.name.split('.').next().unwrap_or("").to_string();
            if !p.disco_key.is_zero() {
                if e.shared.as_ref().is_none_or(|s| s.peer() != p.disco_key) {
                    e.shared = Some(DiscoShared::new(&self.disco, &p.disco_key));
                }
                self.by_disco.insert(p.disco_key, p.key);
            } else {
                e.shared = None;
            }
        }
        let my: Vec<SocketAddr> = self.local.endpoints.iter().filter_map(|s| s.parse().ok()).collect();
        for p in self.peers.values_mut() {
            p.endpoint.set_my_endpoints(&my);
        }
        if nm.derp_map != self.derp_map {
            self.derp_map = nm.derp_map.clone();
            // A new map: measure again now.
            self.next_netcheck = Instant::now();
        }
    }

    fn derp_sender(&mut self, region: i32) -> Option<&mpsc::Sender<(NodePublic, Vec<u8>)>> {
        if !self.derps.contains_key(&region) {
            let r = self.derp_map.regions.get(&region.to_string())?;
            let addr = derp_addr(r)?;
            let (tx, rx) = mpsc::channel(DERP_QUEUE);
            tokio::spawn(derp_task(
                region,
                addr,
                self.my_private.clone(),
                region == self.home_derp,
                rx,
                self.derp_in_tx.clone(),
            ));
            self.derps.insert(region, tx);
        }
        self.derps.get(&region)
    }

    fn send_derp(&mut self, region: i32, dst: NodePublic, pkt: Vec<u8>) {
        if let Some(tx) = self.derp_sender(region) {
            // Full queue: drop, as a congested link would.
            let _ = tx.try_send((dst, pkt));
            self.derp_queued = true;
        }
    }

    fn send_udp(&self, addr: SocketAddr, pkt: &[u8]) -> bool {
        match self.udp.try_send_to(pkt, addr) {
            Ok(_) => true,
            Err(e) => {
                log::trace!("udp send failed ep={addr} err={e}");
                false
            }
        }
    }

    fn send_disco(&mut self, peer: NodePublic, out: DiscoOut) {
        let Some(pkt) = self
            .peers
            .get(&peer)
            .and_then(|p| p.shared.as_ref())
            .map(|s| s.seal(nonce(), &out.msg))
        else {
            return;
        };
        match out.to {
            Path::Udp(a) => {
                if !self.send_udp(a, &pkt) {
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.endpoint.handle_send_error(a);
                    }
                }
            }
            Path::Derp(r) => self.send_derp(r, peer, pkt),
        }
    }

    /// Sends one WireGuard datagram to `peer` along the path its endpoint chooses.
    fn send_to_peer(&mut self, peer: NodePublic, datagram: Vec<u8>) {
        let now = Instant::now().into_std();
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let plan = p.endpoint.handle_send(now, &mut new_tx);
        for d in plan.disco {
            self.send_disco(peer, d);
        }
        if let Some(a) = plan.udp {
            self.udp_out.push(a, &datagram);
        }
        if let Some(r) = plan.derp {
            self.send_derp(r, peer, datagram);
        }
    }

    /// [`send_to_peer`](Self::send_to_peer) for the `len`-byte datagram WireGuard just wrote
    /// into `udp_out`'s spare room: UDP commits it to the batch in place, DERP takes a copy.
    fn send_spare_to_peer(&mut self, peer: NodePublic, len: usize) {
        let now = Instant::now().into_std();
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let plan = p.endpoint.handle_send(now, &mut new_tx);
        for d in plan.disco {
            self.send_disco(peer, d);
        }
        if let Some(r) = plan.derp {
            let copy = self.udp_out.spare(len)[..len].to_vec();
            self.send_derp(r, peer, copy);
        }
        if let Some(a) = plan.udp {
            self.udp_out.commit(a, len);
        }
    }

    fn on_tun(&mut self, pkt: &[u8]) {
        let room = wg::encapsulate_room(pkt.len());
        match self.wg.encapsulate_to(pkt, self.udp_out.spare(room)) {
            Ok(Some((peer, len))) => self.send_spare_to_peer(peer, len),
            Ok(None) => {}
            Err(e) => log::trace!("tun packet dropped err={e}"),
        }
    }

    /// Handles the packets already queued on the TUN after the one that woke us (up to
    /// [`BURST`] in all), so their datagrams share one batched send.
    fn drain_tun(&mut self, buf: &mut [u8]) {
        for _ in 1..BURST {
            match self.tun.try_recv(buf) {
                Ok(n) => self.on_tun(&buf[..n]),
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        log::debug!("TUN read failed err={e}");
                    }
                    break;
                }
            }
        }
    }

    /// Reads what the UDP socket has queued (up to [`BURST`] reads; one read may hold several
    /// datagrams coalesced by GRO) and handles each datagram.
    async fn drain_udp(&mut self, buf: &mut [u8], plain: &mut [u8]) {
        for _ in 0..BURST {
            match udp::recv(&self.udp, buf) {
                Ok((n, src, seg)) => {
                    for d in batch::segments(&buf[..n], seg) {
                        self.on_udp(d, src, plain).await;
                    }
                    self.flush_tun_if_full().await;
                }
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        log::debug!("udp recv err={e}");
                    }
                    break;
                }
            }
        }
    }

    async fn on_udp(&mut self, pkt: &[u8], src: SocketAddr, plain: &mut [u8]) {
        match demux::classify(pkt) {
            Kind::Stun => {
                if let Some(r) = self.report.as_mut() {
                    r.handle_stun(pkt, Instant::now().into_std());
                }
            }
            Kind::Disco => self.on_disco(pkt, Path::Udp(src), None),
            Kind::WireGuard => self.on_wireguard(pkt, Some(src.ip()), Path::Udp(src), plain).await,
        }
    }

    async fn on_derp(&mut self, region: i32, src: NodePublic, data: &[u8], plain: &mut [u8]) {
        if disco::looks_like_disco(data) {
            self.on_disco(data, Path::Derp(region), Some(src));
        } else {
            self.on_wireguard(data, None, Path::Derp(region), plain).await;
        }
    }

    /// Decrypts one WireGuard datagram into `plain` (at least as long as `pkt`) and writes the
    /// packet to the TUN; handshake traffic goes back to the peer.
    async fn on_wireguard(&mut self, pkt: &[u8], src: Option<IpAddr>, path: Path, plain: &mut [u8]) {
        let r = self.wg.decapsulate_to(src, pkt, plain);
        if let Some(reply) = r.reply {
            match (path, r.peer) {
                (Path::Udp(a), _) => {
                    self.send_udp(a, &reply);
                }
                (Path::Derp(reg), Some(peer)) => self.send_derp(reg, peer, reply),
                _ => {}
            }
        }
        if let Some(n) = r.to_tun {
            // Written at the end of the burst, merged with its neighbours where possible.
            self.tun_out.push(&plain[..n]);
        }
        for o in r.to_peers {
            self.send_to_peer(o.peer, o.datagram);
        }
    }

    /// Flushes early once about one full coalesced packet waits, bounding the buffer (a burst of
    /// 64 GRO reads would otherwise hold up to 4 MiB).
    async fn flush_tun_if_full(&mut self) {
        if self.tun_out.pending_bytes() >= MAX_DATAGRAM {
            self.flush_tun().await;
        }
    }

    /// Writes the packets decrypted during this iteration to the TUN. If the kernel refuses a
    /// merged one, merging stops for good (the packets then go one by one).
    async fn flush_tun(&mut self) {
        if self.tun_out.is_empty() {
            return;
        }
        let mut refused = false;
        for (hdr, pkt) in self.tun_out.finish() {
            if let Err(e) = self.tun.send_with(hdr, pkt).await {
                if hdr.gso_type != crate::tun::gro::GSO_NONE && e.kind() == std::io::ErrorKind::InvalidInput {
                    refused = true;
                }
                log::debug!("TUN write failed len={} gso={} err={e}", pkt.len(), hdr.gso_type);
            }
        }
        self.tun_out.clear();
        if refused {
            log::info!("tun: the kernel refused a coalesced write; writing packets one by one");
            self.tun_out.disable();
        }
    }

    fn on_disco(&mut self, pkt: &[u8], path: Path, derp_src: Option<NodePublic>) {
        let now = Instant::now().into_std();
        let Ok(sender) = disco::parse_header(pkt) else { return };
        let Some(&peer) = self.by_disco.get(&sender) else {
            log::trace!("disco from unknown key dropped");
            return;
        };
        // Via DERP, the relay's source node key must be the peer owning that disco key.
        if derp_src.is_some_and(|s| s != peer) {
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let Some(msg) = p.shared.as_ref().and_then(|s| s.open(pkt).ok()) else {
            return;
        };
        let mut outs = Vec::new();
        match msg {
            Message::Ping { tx_id, .. } => {
                let o = p.endpoint.handle_ping(path, tx_id, now);
                outs.extend(o.reply);
            }
            Message::Pong { tx_id, .. } => {
                if let Some(res) = p.endpoint.handle_pong(tx_id, path, now) {
                    if let Some(round) = self.pending_pings.remove(&tx_id) {
                        let (via, direct) = match res.to {
                            Path::Udp(a) => (a.to_string(), true),
                            Path::Derp(r) => (format!("DERP({r})"), false),
                        };
                        // Other pings of the same round are now moot.
                        self.pending_pings.retain(|_, r| *r != round);
                        if let Some(pp) = self.rounds.remove(&round) {
                            let _ = pp.reply.send(Ok(PingResult {
                                via,
                                direct,
                                rtt: res.rtt,
                            }));
                        }
                    }
                }
            }
            Message::CallMeMaybe { endpoints } => {
                if matches!(path, Path::Derp(_)) {
                    outs.extend(p.endpoint.handle_call_me_maybe(&endpoints, now, &mut new_tx));
                }
            }
        }
        for o in outs {
            self.send_disco(peer, o);
        }
        // A pong may have changed the path: let status (and a CLI ping's caller) see it at once.
        self.publish_status(now);
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Ping(peer, reply) => {
                let now = Instant::now().into_std();
                let Some(p) = self.peers.get_mut(&peer) else {
                    let _ = reply.send(Err("no such peer in the netmap".into()));
                    return;
                };
                let mut txs = Vec::new();
                let outs = p.endpoint.ping_cli(now, &mut || {
                    let t = new_tx();
                    txs.push(t);
                    t
                });
                if outs.is_empty() {
                    let _ = reply.send(Err("peer has no DERP region and no known endpoints".into()));
                    return;
                }
                self.round += 1;
                let round = self.round;
                for t in txs {
                    self.pending_pings.insert(t, round);
                }
                self.rounds.insert(
                    round,
                    PendingPing {
                        reply,
                        deadline: Instant::now() + Duration::from_secs(5),
                    },
                );
                for o in outs {
                    self.send_disco(peer, o);
                }
            }
            Cmd::Netcheck(reply) => {
                let v = self.last_report.as_ref().map_or(Value::Null, report_json);
                let _ = reply.send(v);
            }
        }
    }

    fn on_tick(&mut self) {
        let now_t = Instant::now();
        let now = now_t.into_std();
        for o in self.wg.update_timers() {
            self.send_to_peer(o.peer, o.datagram);
        }
        let keys: Vec<NodePublic> = self.peers.keys().copied().collect();
        for k in keys {
            let due = self
                .peers
                .get(&k)
                .and_then(|p| p.endpoint.poll_timeout())
                .is_some_and(|t| t <= now);
            if due {
                let outs = self
                    .peers
                    .get_mut(&k)
                    .map(|p| p.endpoint.handle_timeout(now, &mut new_tx))
                    .unwrap_or_default();
                for o in outs {
                    self.send_disco(k, o);
                }
            }
        }
        // CLI pings that timed out.
        let expired: Vec<u64> = self
            .rounds
            .iter()
            .filter(|(_, p)| p.deadline <= now_t)
            .map(|(r, _)| *r)
            .collect();
        for r in expired {
            self.pending_pings.retain(|_, x| *x != r);
            if let Some(p) = self.rounds.remove(&r) {
                let _ = p.reply.send(Err("no pong within 5s".into()));
            }
        }
        self.netcheck_step(now_t);
        self.publish_status(now);
    }

    fn netcheck_step(&mut self, now_t: Instant) {
        let now = now_t.into_std();
        if self.report.is_none() && now_t >= self.next_netcheck && !self.derp_map.regions.is_empty() {
            let plan = ProbePlan::new(&self.derp_map, netcheck::Timing::default())
                .with_home(self.home_derp, self.derps.contains_key(&self.home_derp));
            self.report = Some(ReportState::new(&plan, false, now, now + netcheck::STUN_PROBE_TIMEOUT));
            self.next_netcheck = now_t + NETCHECK_INTERVAL;
        }
        let Some(rs) = self.report.as_mut() else { return };
        let mut sends = Vec::new();
        while let Some(p) = rs.poll_probe(now) {
            if let Some(dst) = p.addr() {
                let tx = new_tx();
                rs.note_sent(tx, &p, dst, now);
                sends.push((dst, stun::binding_request(tx)));
            }
        }
        for (dst, req) in sends {
            self.send_udp(dst, &req);
        }
        if self.report.as_ref().is_some_and(|r| r.is_done(now)) {
            if let Some(rs) = self.report.take() {
                self.apply_report(rs.finish());
            }
        }
    }

    fn apply_report(&mut self, r: netcheck::Report) {
        // Our endpoints: the STUN-mapped address plus the local address towards the relay.
        let mut eps: Vec<(SocketAddr, i32)> = Vec::new();
        if let Some(g) = r.global_v4 {
            eps.push((g, 2));
        }
        let towards = self
            .derp_map
            .regions
            .values()
            .flat_map(|reg| reg.nodes.iter())
            .find_map(|n| n.ipv4.parse::<IpAddr>().ok().or_else(|| n.host_name.parse().ok()));
        if let Some(ip) = towards.and_then(|ip| local_addr_towards(SocketAddr::new(ip, 3478))) {
            let a = SocketAddr::new(ip, self.port);
            if !eps.iter().any(|(e, _)| *e == a) {
                eps.push((a, 1));
            }
        }
        let home = if r.preferred_derp != 0 {
            r.preferred_derp
        } else if self.home_derp != 0 {
            self.home_derp
        } else {
            // No STUN answer: fall back to the first region so we are reachable over DERP.
            self.derp_map.regions.values().map(|r| r.region_id).min().unwrap_or(0)
        };
        if home != self.home_derp {
            log::info!("home DERP region={home}");
            self.home_derp = home;
            // Reconnect as home (NotePreferred) on the next send.
            self.derps.remove(&home);
            let _ = self.derp_sender(home);
        }
        let mut net_info = r.net_info();
        net_info["PreferredDERP"] = json!(home);
        let local = LocalEndpoints {
            endpoints: eps.iter().map(|(a, _)| a.to_string()).collect(),
            types: eps.iter().map(|(_, t)| *t).collect(),
            net_info,
        };
        let my: Vec<SocketAddr> = eps.iter().map(|(a, _)| *a).collect();
        for p in self.peers.values_mut() {
            p.endpoint.set_my_endpoints(&my);
        }
        if local != self.local {
            log::info!("endpoints {:?} home_derp={home}", local.endpoints);
            self.local = local.clone();
            let _ = self.endpoints_tx.send(local);
        }
        self.last_report = Some(r);
    }

    fn publish_status(&self, now: std::time::Instant) {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.clear();
        for (k, p) in &self.peers {
            let (cur, relay) = match p.endpoint.path(now) {
                PathStatus::Direct { addr, .. } => (addr.to_string(), String::new()),
                PathStatus::Derp(r) => (String::new(), r.to_string()),
                PathStatus::Unreachable => (String::new(), String::new()),
            };
            let ws = self.wg.peer_stats(k);
            st.insert(
                *k,
                json!({
                    "CurAddr": cur,
                    "Relay": relay,
                    "RxBytes": ws.map_or(0, |s| s.rx_bytes),
                    "TxBytes": ws.map_or(0, |s| s.tx_bytes),
                    "LastHandshakeSecs": ws.and_then(|s| s.since_handshake).map(|d| d.as_secs()),
                    "Name": p.name,
                }),
            );
        }
    }
}

/// Sends what `out` holds on `sock` (one system call for a typical burst) and empties it. A
/// socket that refuses GSO gets batches of single datagrams from then on.
fn flush_udp(sock: &UdpSocket, out: &mut SendBatch) {
    if out.is_empty() {
        return;
    }
    let r = udp::send_batch(sock, out);
    if r.dropped > 0 {
        log::trace!("udp: dropped {} of {} datagrams", r.dropped, r.dropped + r.sent);
    }
    if r.gso_refused {
        log::info!("udp: the kernel refused GSO; sending datagrams one by one");
        out.set_max_segments(1);
    }
    out.clear();
}

/// `tinyscale netcheck` JSON.
pub fn report_json(r: &netcheck::Report) -> Value {
    let lat: serde_json::Map<String, Value> = r
        .region_latency
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.as_secs_f64() * 1000.0)))
        .collect();
    json!({
        "UDP": r.udp,
        "IPv4": r.ipv4,
        "GlobalV4": r.global_v4.map(|a| a.to_string()),
        "MappingVariesByDestIP": r.mapping_varies_by_dest_ip,
        "PreferredDERP": r.preferred_derp,
        "RegionLatencyMs": lat,
    })
}
