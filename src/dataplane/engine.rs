//! The data-plane shell: one event loop over the TUN device, the magicsock UDP sockets (one per
//! address family), DERP relay connections and a timer, gluing the sans-io cores together.
//!
//! Plays the role of tailscale `wgengine/userspace.go` + the I/O half of `wgengine/magicsock`.
//! Per packet: TUN → [`WgPeers::encapsulate_to`] → the peer's [`Endpoint`] picks UDP and/or
//! DERP; UDP/DERP → [`demux`] → STUN (netcheck), disco (path discovery) or WireGuard →
//! [`WgPeers::decapsulate_to`] → the packet [`Filter`] → TUN. This file holds the task, its
//! loop and the commands of [`EngineHandle`]; the rest has a room of its own:
//!
//! - `derp_dial`: one task per DERP region (the client needs `&mut` for both directions),
//!   connected to the loop by bounded channels, and the DERP host name cache shared with
//!   netcheck (lookups off the loop, each bounded);
//! - `derp_home` [pure]: which region is home after a report;
//! - `report`: netcheck orchestration (its probes, the HTTPS fallback, what a finished report
//!   changes) and the `tinyscale netcheck` JSON; `schedule` [pure]: when a report runs and
//!   what follows a finished one;
//! - `ping`: `tinyscale ping` rounds;
//! - `status`: the `status --json` part built on request, and the path fingerprint.
//!
//! Per wake-up, a branch drains a burst of up to `BURST` (64) packets. Data messages for UDP are
//! encrypted straight into a [`SendBatch`] that leaves in one `sendmmsg` with GSO at the end of
//! the iteration; decrypted packets collect in a [`Coalescer`] that merges TCP segments before
//! the TUN writes. No per-packet allocation on either path; the buffers are reused.
//!
//! Every decrypted packet passes the packet filter before it reaches the TUN, and every packet
//! read from the TUN is shown to it first, so replies to our own UDP flows get back in. The
//! filter's rules and local set follow the netmap; shields up is a preference set through the
//! handle.
//!
//! The caller supplies the netmap (a `watch`), receives endpoint/home-DERP updates for control
//! (another `watch`), and may query status or run CLI pings through [`EngineHandle`].

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use crate::{
    control::netmap::{node_matches, Netmap},
    dataplane::{
        apply::{Router, SystemRunner},
        filter::{Filter, LocalNets, Rules, Verdict},
        magicsock::{
            addr::{self, Family},
            batch::{self, SendBatch},
            demux::{self, Kind},
            endpoint::{self, DiscoOut, Endpoint, Path, SendPlan, TxId},
            socket::Sockets,
        },
        netcheck::{self, ReportState},
        routes::{ExitRoutes, RouterConfig, SubnetRouter},
        tun::{gro::Coalescer, Tun},
        udp,
        wg::{self, PeerConfig, WgPeers},
    },
    wire::{
        disco::{self, DiscoShared, Message},
        keys::{DiscoPrivate, DiscoPublic, NodePrivate, NodePublic},
        prefix::{Prefix, CGNAT_RANGE, TAILSCALE_ULA_RANGE},
        tailcfg::{DerpMap, FilterRule},
    },
};

mod derp_dial;
mod derp_home;
mod ping;
mod report;
mod schedule;
mod status;

pub use report::report_json;
pub use status::EngineStatus;

use derp_dial::{DerpConn, DnsCache};
use ping::Pings;
use status::{path_fingerprint, Drops};

/// Timer resolution of the loop (boringtun wants ≥ 4 Hz; netcheck probes retransmit at 100 ms).
const TICK: Duration = Duration::from_millis(100);
/// How often the peers' paths are compared for the daemon's change notification.
const PATH_CHECK: Duration = Duration::from_secs(1);
/// Largest datagram we read (WireGuard over a 1280 MTU plus overhead, with room to spare; a
/// UDP GRO read of coalesced datagrams is at most this too).
const MAX_DATAGRAM: usize = 65535;
/// Packets (or GRO reads) handled per wake-up of the TUN or UDP branch before the loop looks at
/// its other inputs. Draining a burst costs one reactor round trip instead of one per packet,
/// and lets a bulk flow's data messages leave in one batched send (see `magicsock::batch`).
const BURST: usize = 64;
/// Forwarded DNS queries in flight at once; more are dropped (the client retries), so a query
/// flood costs bounded memory and tasks.
const DNS_MAX_INFLIGHT: usize = 64;
/// How long one upstream resolver gets to answer a forwarded query before the next is tried.
const DNS_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Upstream resolvers tried per forwarded query (Go's forwarder also races a few, not all).
const DNS_UPSTREAM_TRIES: usize = 3;
/// Largest DNS answer relayed (EDNS allows up to 64 KiB; resolvers rarely exceed 4 KiB).
const DNS_MAX_ANSWER: usize = 4096;
/// The host's resolvers, read (never written) for queries outside every split-DNS route.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Settings for [`Engine::start`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// TUN device name.
    pub tun: String,
    /// UDP port for WireGuard/disco/STUN (0 = any).
    pub port: u16,
}

/// The preferences the data plane acts on (from `up`/`set`), published by the daemon.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutePrefs {
    /// Subnet routes this node advertises (`--advertise-routes`): forwarding on for their
    /// families.
    pub advertise_routes: Vec<String>,
    /// Install peers' subnet routes (`--accept-routes`).
    pub accept_routes: bool,
    /// Masquerade forwarded tailnet traffic (`--snat-subnet-routes`).
    pub snat_subnet_routes: bool,
    /// Offer this node as an exit node (`--advertise-exit-node`).
    pub advertise_exit_node: bool,
    /// The exit node in use (`--exit-node`, its tailnet IP as the daemon resolved it), or "".
    pub exit_node: String,
    /// Keep the LAN out of the exit node's tunnel (`--exit-node-allow-lan-access`).
    pub exit_node_allow_lan_access: bool,
    /// Where the router keeps what it must restore after a crash (the state dir).
    pub state_dir: Option<std::path::PathBuf>,
    /// Answer MagicDNS at the service address (`--accept-dns`).
    pub accept_dns: bool,
}

impl RoutePrefs {
    /// Forwarding for the advertised routes that control approved (`approved`: the subnet
    /// routes in our own node's AllowedIPs), if any: forwarding stays off while a route only
    /// waits for approval. Exit-node routes are not subnet routes.
    ///
    /// An exit node (`exit`: its default routes approved, IPv4 and IPv6) forwards those families
    /// too, and always masquerades: its tailnet traffic leaves for the internet behind the
    /// router's own address (`--snat-subnet-routes=false` applies to subnet routes alone).
    fn subnet_router(&self, approved: &[Prefix], exit: [bool; 2]) -> Option<SubnetRouter> {
        let routes: Vec<Prefix> = self
            .advertise_routes
            .iter()
            .filter_map(|r| r.parse::<Prefix>().ok())
            .filter(|p| !p.is_default() && approved.contains(p))
            .collect();
        let exit = if self.advertise_exit_node { exit } else { [false; 2] };
        if routes.is_empty() && exit == [false; 2] {
            return None;
        }
        Some(SubnetRouter {
            v4: exit[0] || routes.iter().any(Prefix::is_ipv4),
            v6: exit[1] || routes.iter().any(|p| !p.is_ipv4()),
            snat: self.snat_subnet_routes || exit != [false; 2],
        })
    }
}

/// [pure] A peer's subnet routes: its AllowedIPs beyond its own addresses, without the tailnet
/// ranges and default routes (exit-node routes are used only through `--exit-node`).
pub fn peer_subnet_routes(node: &crate::wire::tailcfg::Node) -> Vec<Prefix> {
    let own: Vec<Prefix> = node.addresses.iter().filter_map(|a| a.parse().ok()).collect();
    node.allowed_ips
        .iter()
        .filter_map(|a| a.parse::<Prefix>().ok())
        .filter(|p| {
            !p.is_default()
                && !own.contains(p)
                && ![CGNAT_RANGE, TAILSCALE_ULA_RANGE].iter().any(|t| t.contains_prefix(p))
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// [pure] The WireGuard config of one peer: its AllowedIPs, without its subnet routes unless
/// `accept_routes` (Go's netmap.AllowSubnetRoutes: neither routed to it nor accepted as sources
/// from it), and without the default routes unless it is the chosen `exit_node` (Go wgcfg/nmcfg
/// keeps exit routes for the selected exit node only).
pub fn peer_config(node: &crate::wire::tailcfg::Node, accept_routes: bool, exit_node: &str) -> PeerConfig {
    let mut cfg = PeerConfig::from_node(node);
    if !node_matches(node, exit_node) {
        cfg.allowed_ips.retain(|ip| !ip.is_default());
    }
    if !accept_routes {
        let subnets: Vec<String> = peer_subnet_routes(node).iter().map(|s| s.to_string()).collect();
        cfg.allowed_ips.retain(|ip| !subnets.contains(&ip.to_string()));
    }
    cfg
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
    Filter(oneshot::Sender<Value>),
    Status(oneshot::Sender<EngineStatus>),
}

/// A cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    cmds: mpsc::Sender<Cmd>,
    shields_up: Arc<AtomicBool>,
}

impl EngineHandle {
    /// Per-peer path status and counters as of now, built by the engine on this request.
    pub async fn status(&self) -> Result<EngineStatus, String> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Status(tx))
            .await
            .map_err(|_| "data plane is not running".to_string())?;
        rx.await.map_err(|_| "data plane stopped".to_string())
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

    /// Shields up (refuse every new inbound flow) or down. The engine applies it on its next
    /// timer tick and with every netmap; set it before the first netmap is published and no
    /// packet ever sees the old value.
    pub fn set_shields_up(&self, on: bool) {
        self.shields_up.store(on, Ordering::Relaxed);
    }

    /// The packet filter in force (`tinyscale debug filter`): rules, local set, shields,
    /// tracked flows, drops.
    pub async fn filter(&self) -> Result<Value, String> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Filter(tx))
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

/// The running data plane.
pub struct Engine {
    me: NodePublic,
    disco: DiscoPrivate,
    wg: WgPeers,
    tun: Tun,
    /// Decrypted packets for `tun`, TCP segments merged, written by [`Engine::flush_tun`].
    tun_out: Coalescer,
    router: Router<SystemRunner>,
    sock: Sockets,
    /// Datagrams for the IPv4 socket, sent at the end of each loop iteration by [`flush_udp`].
    /// WireGuard encrypts into its spare room, whatever the destination's family.
    out4: SendBatch,
    /// Datagrams for the IPv6 socket (copied over from `out4`'s spare room).
    out6: SendBatch,
    /// Looked up per packet sent (the path), hence the fast hasher.
    peers: wg::FastMap<NodePublic, Peer>,
    by_disco: HashMap<DiscoPublic, NodePublic>,
    derp_map: DerpMap,
    /// The home DERP region (0: none yet), chosen after each netcheck report.
    home_derp: i32,
    /// `home_derp` for the DERP tasks: each tells its server whether it is our home
    /// (NotePreferred) when it connects and whenever the home moves.
    home_shared: Arc<std::sync::atomic::AtomicI32>,
    /// The DERP regions with a connection task.
    derps: HashMap<i32, DerpConn>,
    derp_in_tx: mpsc::Sender<(i32, NodePublic, Bytes)>,
    /// Packets were queued towards a DERP task during this loop iteration.
    derp_queued: bool,
    my_private: NodePrivate,
    /// The netcheck in progress: one state per family (IPv6 only with an IPv6 socket).
    report: Option<(ReportState, Option<ReportState>)>,
    dns: DnsCache,
    /// DERP host names being looked up for netcheck (the loop hears back on `dns_done`).
    dns_pending: bool,
    dns_done_tx: mpsc::Sender<()>,
    /// Region latencies over HTTPS being measured (UDP blocked); they come back on `https_done`.
    https_pending: bool,
    https_done_tx: mpsc::Sender<BTreeMap<i32, Duration>>,
    /// The last HTTPS latencies and when they were measured (reused for [`HTTPS_LATENCY_FRESH`]).
    https_latency: Option<(Instant, BTreeMap<i32, Duration>)>,
    last_report: Option<netcheck::Report>,
    next_netcheck: Instant,
    local: LocalEndpoints,
    endpoints_tx: watch::Sender<LocalEndpoints>,
    /// Bumped when [`path_fingerprint`] changes (the daemon's ubus events wake on it).
    changes: watch::Sender<u64>,
    path_sum: u64,
    next_path_check: Instant,
    /// `tinyscale ping` rounds waiting for their first pong.
    pings: Pings,
    drops: Drops,
    addresses: Vec<Prefix>,
    route_prefs: RoutePrefs,
    /// The subnet routes of the last netmap's peers (empty without `--accept-routes`).
    accepted: Vec<Prefix>,
    /// Our own subnet routes that control approved (and made primary).
    approved: Vec<Prefix>,
    /// Our default routes approved (we are an exit node), IPv4 and IPv6.
    exit_approved: [bool; 2],
    /// The last configuration the router applied; `None` until it succeeds.
    router_cfg: Option<RouterConfig>,
    router_retry: Instant,
    /// Judges decrypted packets before the TUN, tracks the UDP flows we send.
    filter: Filter,
    /// The rules `filter` was compiled from (the netmap's chunks, concatenated).
    filter_rules: Vec<FilterRule>,
    /// The shields-up preference, written through [`EngineHandle::set_shields_up`].
    shields_up: Arc<AtomicBool>,
    /// MagicDNS answers for packets to the service address; `None` with `--accept-dns=false`
    /// (those packets then go the way of any other).
    resolver: Option<crate::dataplane::dns::Resolver>,
    /// Keys the TCP responder's sequence numbers.
    dns_secret: u64,
    /// Forwarded queries waiting for their upstream (at most [`DNS_MAX_INFLIGHT`]); the loop
    /// polls their sockets, the tick retires the late ones.
    dns_fwd: Vec<DnsForward>,
}

/// A forwarded DNS query waiting for its upstream's answer.
struct DnsForward {
    /// Connected to the upstream being asked.
    sock: tokio::net::UdpSocket,
    to: crate::dataplane::dns::ReplyTo,
    query: Vec<u8>,
    /// Upstreams still to try, the next one last.
    rest: Vec<SocketAddr>,
    deadline: Instant,
}

/// The file in the state dir keeping the forwarding sysctls found before we changed them.
pub const FORWARDING_SAVED: &str = "forwarding.saved";

/// How often a failed router configuration is retried.
const ROUTER_RETRY: Duration = Duration::from_secs(10);

/// A fresh disco transaction ID.
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

impl Engine {
    /// Opens the TUN device and UDP socket and spawns the loop. Fails (clearly) without
    /// CAP_NET_ADMIN or `/dev/net/tun`.
    pub async fn start(
        cfg: &EngineConfig,
        node: NodePrivate,
        disco: DiscoPrivate,
        netmap: watch::Receiver<Option<Arc<Netmap>>>,
        prefs: watch::Receiver<RoutePrefs>,
        endpoints_tx: watch::Sender<LocalEndpoints>,
        changes: watch::Sender<u64>,
    ) -> Result<(EngineHandle, tokio::task::JoinHandle<()>), String> {
        let tun = Tun::open(&cfg.tun).map_err(|e| format!("cannot open TUN device {}: {e}", cfg.tun))?;
        let sock = Sockets::bind(cfg.port).map_err(|e| format!("cannot bind UDP: {e}"))?;
        let port6 = sock.port6().map_or("none".to_string(), |p| p.to_string());
        let (rcvbuf, sndbuf) = udp::set_buffers(sock.v4());
        let gso = udp::gso_supported(sock.v4());
        let gro = udp::enable_gro(sock.v4());
        let gso6 = sock.v6().is_some_and(|s| {
            udp::set_buffers(s);
            udp::enable_gro(s);
            udp::gso_supported(s)
        });
        log::info!(
            "data plane up tun={} udp_port={} udp6_port={port6} rcvbuf={rcvbuf} sndbuf={sndbuf} gso={gso} gro={gro}",
            tun.name(),
            sock.port()
        );
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let (dns_done_tx, dns_done_rx) = mpsc::channel(1);
        let (https_done_tx, https_done_rx) = mpsc::channel(1);
        let (derp_in_tx, derp_in_rx) = mpsc::channel(1024);
        let shields_up = Arc::new(AtomicBool::new(false));
        let engine = Engine {
            me: node.public(),
            wg: WgPeers::new(&node, OsRng.next_u32()),
            disco,
            tun,
            tun_out: Coalescer::new(),
            router: Router::new(SystemRunner),
            sock,
            out4: SendBatch::new(if gso { batch::MAX_SEGMENTS } else { 1 }),
            out6: SendBatch::new(if gso6 { batch::MAX_SEGMENTS } else { 1 }),
            peers: wg::FastMap::default(),
            by_disco: HashMap::new(),
            derp_map: DerpMap::default(),
            home_derp: 0,
            home_shared: Arc::default(),
            derps: HashMap::new(),
            derp_in_tx,
            derp_queued: false,
            my_private: node,
            report: None,
            dns: DnsCache::default(),
            dns_pending: false,
            dns_done_tx,
            https_pending: false,
            https_done_tx,
            https_latency: None,
            last_report: None,
            next_netcheck: Instant::now(),
            local: LocalEndpoints::default(),
            endpoints_tx,
            changes,
            path_sum: 0,
            next_path_check: Instant::now(),
            pings: Pings::default(),
            drops: Drops::default(),
            addresses: Vec::new(),
            route_prefs: prefs.borrow().clone(),
            accepted: Vec::new(),
            approved: Vec::new(),
            exit_approved: [false; 2],
            router_cfg: None,
            router_retry: Instant::now(),
            // Until the first netmap: no rules and nothing local, so nothing gets in.
            filter: Filter::new(OsRng.next_u64()),
            filter_rules: Vec::new(),
            shields_up: shields_up.clone(),
            resolver: None,
            dns_secret: OsRng.next_u64(),
            dns_fwd: Vec::new(),
        };
        let mut engine = engine;
        if let Some(dir) = &engine.route_prefs.state_dir {
            engine
                .router
                .set_saved_path(&dir.join(FORWARDING_SAVED).to_string_lossy());
        }
        // Whatever a crashed run left (nftables table, rules, table 53, sysctls) goes first.
        engine.router.recover();
        let task = tokio::spawn(engine.run(netmap, prefs, cmd_rx, derp_in_rx, dns_done_rx, https_done_rx));
        Ok((
            EngineHandle {
                cmds: cmd_tx,
                shields_up,
            },
            task,
        ))
    }

    async fn run(
        mut self,
        mut netmap: watch::Receiver<Option<Arc<Netmap>>>,
        mut prefs: watch::Receiver<RoutePrefs>,
        mut cmds: mpsc::Receiver<Cmd>,
        mut derp_in: mpsc::Receiver<(i32, NodePublic, Bytes)>,
        mut dns_done: mpsc::Receiver<()>,
        mut https_done: mpsc::Receiver<BTreeMap<i32, Duration>>,
    ) {
        let mut tun_buf = vec![0u8; MAX_DATAGRAM];
        let mut udp_buf = vec![0u8; MAX_DATAGRAM];
        let mut udp6_buf = vec![0u8; MAX_DATAGRAM];
        // Decrypted packets on their way to the TUN (large enough for WgPeers to reuse it when
        // a handshake releases queued packets).
        let mut plain_buf = vec![0u8; wg::FLUSH_ROOM];
        let mut dns_buf = vec![0u8; DNS_MAX_ANSWER];
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
                r = self.sock.v4().readable() => match r {
                    Ok(()) => self.drain_udp(Family::V4, &mut udp_buf, &mut plain_buf).await,
                    Err(e) => log::debug!("udp recv err={e}"),
                },
                r = readable_v6(&self.sock) => match r {
                    Ok(()) => self.drain_udp(Family::V6, &mut udp6_buf, &mut plain_buf).await,
                    Err(e) => log::debug!("udp6 recv err={e}"),
                },
                Some(lat) = https_done.recv() => self.on_https_latency(&lat),
                Some((i, n)) = poll_dns(&self.dns_fwd, &mut dns_buf), if !self.dns_fwd.is_empty() => {
                    self.on_dns_answer(i, &dns_buf[..n]);
                }
                Some(()) = dns_done.recv() => {
                    // New DERP addresses: measure with them now rather than in 25 s.
                    self.dns_pending = false;
                    if self.report.is_none() {
                        self.next_netcheck = Instant::now();
                    }
                }
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
                r = prefs.changed() => {
                    if r.is_err() { break; }
                    let p = prefs.borrow_and_update().clone();
                    if p != self.route_prefs {
                        let accept_changed = p.accept_routes != self.route_prefs.accept_routes
                            || p.exit_node != self.route_prefs.exit_node
                            || p.accept_dns != self.route_prefs.accept_dns;
                        self.route_prefs = p;
                        match netmap.borrow().clone() {
                            // WireGuard's AllowedIPs depend on --accept-routes and --exit-node too,
                            // MagicDNS on --accept-dns.
                            Some(nm) if accept_changed => self.apply_netmap(&nm),
                            _ => self.apply_router(),
                        }
                    }
                }
                Some(cmd) = cmds.recv() => self.on_cmd(cmd),
            }
            flush_udp(self.sock.v4(), &mut self.out4);
            if let Some(v6) = self.sock.v6() {
                flush_udp(v6, &mut self.out6);
            }
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

    /// Brings the OS configuration (addresses, routes, forwarding, SNAT) to what the netmap
    /// and the prefs ask for. A failure is logged and retried at the next change or tick.
    fn apply_router(&mut self) {
        if self.addresses.is_empty() {
            return; // not configured before the first netmap with our addresses
        }
        let mut cfg = RouterConfig::new(self.tun.name(), self.addresses.clone());
        cfg.accepted_routes = self.accepted.clone();
        cfg.subnet_router = self.route_prefs.subnet_router(&self.approved, self.exit_approved);
        // While one is chosen, even before it is in the netmap or while it is offline: the
        // traffic waits in the tunnel rather than leaking around it (Go routerConfig).
        cfg.exit_node = (!self.route_prefs.exit_node.is_empty()).then_some(ExitRoutes {
            allow_lan: self.route_prefs.exit_node_allow_lan_access,
        });
        if self.router_cfg.as_ref() == Some(&cfg) {
            return;
        }
        match self.router.set(&cfg) {
            Ok(()) => {
                if self
                    .router_cfg
                    .as_ref()
                    .is_none_or(|c| c.accepted_routes != cfg.accepted_routes)
                {
                    log::info!(
                        "routes accepted from peers: {:?}",
                        self.accepted.iter().map(|p| p.to_string()).collect::<Vec<_>>()
                    );
                }
                self.router_cfg = Some(cfg);
            }
            Err(e) => {
                log::error!("configuring {} failed err={e}", self.tun.name());
                self.router_cfg = None;
            }
        }
    }

    fn apply_netmap(&mut self, nm: &Netmap) {
        let now = Instant::now().into_std();
        // Addresses of this node on the TUN.
        if let Some(me) = &nm.self_node {
            self.approved = peer_subnet_routes(me);
            self.exit_approved = ["0.0.0.0/0", "::/0"].map(|d| me.allowed_ips.iter().any(|a| a == d));
            self.addresses = me
                .addresses
                .iter()
                .filter_map(|a| {
                    let (ip, len) = a.split_once('/')?;
                    Prefix::new(ip.parse().ok()?, len.parse().ok()?)
                })
                .collect();
        }
        // WireGuard peers and per-peer path state.
        let peers: Vec<_> = nm
            .peers
            .values()
            .filter(|p| !p.key.is_zero() && p.key != self.me)
            .collect();
        let accept = self.route_prefs.accept_routes;
        let exit_node = &self.route_prefs.exit_node;
        let mut accepted = std::collections::BTreeSet::new();
        self.wg.set_peers(peers.iter().map(|p| {
            if accept {
                accepted.extend(peer_subnet_routes(p));
            }
            peer_config(p, accept, exit_node)
        }));
        self.accepted = accepted.into_iter().collect();
        self.apply_router();
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
        self.apply_filter(nm);
        self.apply_dns(nm);
    }

    /// Rebuilds the MagicDNS answer tables from `nm` (or drops them with `--accept-dns=false`).
    fn apply_dns(&mut self, nm: &Netmap) {
        let r = self
            .route_prefs
            .accept_dns
            .then(|| crate::dataplane::dns::Resolver::from_netmap(nm));
        let suffix = |r: &Option<crate::dataplane::dns::Resolver>| r.as_ref().map(|r| r.suffix.clone());
        if suffix(&r) != suffix(&self.resolver) {
            match suffix(&r) {
                Some(s) => log::info!("dns: answering at 100.100.100.100 and fd7a:115c:a1e0::53 suffix={s}"),
                None => log::info!("dns: off (accept-dns=false)"),
            }
        }
        self.resolver = r;
    }

    /// A packet from the TUN for the service address: answered here, or forwarded.
    fn on_dns_packet(&mut self, pkt: &[u8]) {
        use crate::dataplane::dns::{self, Decision, Inbound, ReplyTo, TcpAction};
        let Some(r) = &self.resolver else { return };
        let (query, to) = match dns::parse_packet(pkt) {
            Some(Inbound::Udp { src, dst, payload }) => (
                payload.to_vec(),
                ReplyTo::Udp {
                    client: src,
                    server: dst,
                },
            ),
            Some(Inbound::Tcp(seg)) => match dns::handle_tcp(&seg, self.dns_secret) {
                TcpAction::Send(p) => return self.tun_out.push(&p),
                TcpAction::Query(q, reply) => (q, ReplyTo::Tcp(reply)),
                TcpAction::None => return,
            },
            None => return,
        };
        match r.decide(&query) {
            Some(Decision::Reply(answer)) => {
                for p in to.packets(&answer) {
                    self.tun_out.push(&p);
                }
            }
            Some(Decision::Forward(up)) => self.forward_dns(up, query, to),
            None => {}
        }
    }

    /// Sends `query` to its upstream; [`poll_dns`] hears the answer. Past
    /// [`DNS_MAX_INFLIGHT`] the query is dropped (the client asks again).
    fn forward_dns(&mut self, up: crate::dataplane::dns::Upstream, query: Vec<u8>, to: crate::dataplane::dns::ReplyTo) {
        if self.dns_fwd.len() >= DNS_MAX_INFLIGHT {
            log::debug!("dns: {DNS_MAX_INFLIGHT} queries in flight, dropping one");
            return;
        }
        let servers = match up {
            crate::dataplane::dns::Upstream::Resolvers(s) => s,
            // A few lines of tmpfs: read per query, so a changed resolv.conf counts at once.
            crate::dataplane::dns::Upstream::System => std::fs::read_to_string(RESOLV_CONF)
                .map(|t| crate::dataplane::dns::parse_resolv_conf(&t))
                .unwrap_or_default(),
        };
        let rest = servers.into_iter().take(DNS_UPSTREAM_TRIES).rev().collect();
        self.dns_try(rest, query, to);
    }

    /// Asks the next upstream in `rest`, or answers SERVFAIL when none is left.
    fn dns_try(&mut self, mut rest: Vec<SocketAddr>, query: Vec<u8>, to: crate::dataplane::dns::ReplyTo) {
        while let Some(server) = rest.pop() {
            match crate::dataplane::netns::udp_send(server, &query) {
                Ok(sock) => {
                    let deadline = Instant::now() + DNS_UPSTREAM_TIMEOUT;
                    return self.dns_fwd.push(DnsForward {
                        sock,
                        to,
                        query,
                        rest,
                        deadline,
                    });
                }
                Err(e) => log::debug!("dns: upstream {server} err={e}"),
            }
        }
        for p in crate::dataplane::dns::servfail(&query)
            .map(|a| to.packets(&a))
            .unwrap_or_default()
        {
            self.tun_out.push(&p);
        }
    }

    /// The `i`th forward's socket read `answer` (empty on a read error): relay it if it answers
    /// the query, else ask the next upstream.
    fn on_dns_answer(&mut self, i: usize, answer: &[u8]) {
        let f = self.dns_fwd.swap_remove(i);
        if answer.len() >= 12 && answer[..2] == f.query[..2] {
            for p in f.to.packets(answer) {
                self.tun_out.push(&p);
            }
        } else {
            self.dns_try(f.rest, f.query, f.to);
        }
    }

    /// Forwards whose upstream stayed silent past its deadline go to the next upstream.
    fn expire_dns(&mut self, now: Instant) {
        while let Some(i) = self.dns_fwd.iter().position(|f| f.deadline <= now) {
            let f = self.dns_fwd.swap_remove(i);
            self.dns_try(f.rest, f.query, f.to);
        }
    }

    /// Brings the packet filter up to date with `nm`: its rules (recompiled only when they
    /// changed) and the local set from the self node, and the shields-up preference.
    fn apply_filter(&mut self, nm: &Netmap) {
        if !nm.packet_filter().eq(self.filter_rules.iter()) {
            self.filter_rules = nm.packet_filter().cloned().collect();
            let rules = Rules::compile(&self.filter_rules);
            for s in rules.skipped() {
                log::warn!("filter: ignoring rule entry: {s}");
            }
            log::info!("filter: rules={} chunks={}", self.filter_rules.len(), nm.filters.len());
            self.filter.set_rules(rules);
        }
        if let Some(me) = &nm.self_node {
            // An approved exit route serves the internet, never this host's own LANs.
            let exit = me.allowed_ips.iter().any(|a| a == "0.0.0.0/0" || a == "::/0");
            let lans: Vec<Prefix> = if exit {
                self.router.connected_prefixes(self.tun.name())
            } else {
                Vec::new()
            };
            let local = LocalNets::from_self_node(me, &lans);
            if local != *self.filter.local() {
                log::info!("filter: local nets {:?}", local.prefixes());
                self.filter.set_local(local);
            }
        }
        self.sync_shields_up();
    }

    /// Applies the shields-up preference the handle last set.
    fn sync_shields_up(&mut self) {
        let on = self.shields_up.load(Ordering::Relaxed);
        if on != self.filter.shields_up() {
            log::info!("filter: shields_up={on}");
            self.filter.set_shields_up(on);
        }
    }

    fn send_udp(&self, addr: SocketAddr, pkt: &[u8]) -> bool {
        match self.sock.try_send_to(pkt, addr) {
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
                // Without a socket of that family the ping is lost, not a sign of a bad address
                // (as Go treats IPv6 sends on a host without IPv6).
                let sendable = addr::send_family(a, self.sock.have_v6()).is_some();
                if !self.send_udp(a, &pkt) && sendable {
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.endpoint.handle_send_error(a);
                    }
                }
            }
            Path::Derp(r) => self.send_derp(r, peer, pkt),
        }
    }

    /// Where a datagram for `peer` goes (UDP address and/or DERP region, or every candidate
    /// while no path is known), sending the disco pings its endpoint wants on the way; `None`
    /// for an unknown peer.
    fn route(&mut self, peer: NodePublic) -> Option<SendPlan> {
        let now = Instant::now().into_std();
        let mut plan = self.peers.get_mut(&peer)?.endpoint.handle_send(now, &mut new_tx);
        for d in std::mem::take(&mut plan.disco) {
            self.send_disco(peer, d);
        }
        Some(plan)
    }

    /// Queues a copy of `datagram` for each of `addrs` (a peer whose path is still unknown).
    fn spray(&mut self, addrs: &[SocketAddr], datagram: &[u8]) {
        for &a in addrs {
            match addr::send_family(a, self.sock.have_v6()) {
                Some((Family::V4, a)) => self.out4.push(a, datagram),
                Some((Family::V6, a)) => self.out6.push(a, datagram),
                None => {}
            }
        }
    }

    /// Sends one WireGuard datagram to `peer` along the path its endpoint chooses.
    fn send_to_peer(&mut self, peer: NodePublic, datagram: Vec<u8>) {
        let Some(plan) = self.route(peer) else { return };
        self.spray(&plan.spray, &datagram);
        if let Some(a) = plan.udp {
            match addr::send_family(a, self.sock.have_v6()) {
                Some((Family::V4, a)) => self.out4.push(a, &datagram),
                Some((Family::V6, a)) => self.out6.push(a, &datagram),
                None => {}
            }
        }
        if let Some(r) = plan.derp {
            self.send_derp(r, peer, datagram);
        }
    }

    /// [`send_to_peer`](Self::send_to_peer) for the `len`-byte datagram WireGuard just wrote
    /// into `out4`'s spare room: IPv4 commits it to that batch in place, IPv6 and DERP take a copy.
    fn send_spare_to_peer(&mut self, peer: NodePublic, len: usize) {
        let Some(SendPlan { udp, derp, spray, .. }) = self.route(peer) else {
            return;
        };
        if !spray.is_empty() {
            // Rare (no path yet): copies, then the datagram stays in the spare room unused.
            let datagram = self.out4.spare(len)[..len].to_vec();
            self.spray(&spray, &datagram);
            return;
        }
        if let Some(r) = derp {
            let copy = self.out4.spare(len)[..len].to_vec();
            self.send_derp(r, peer, copy);
        }
        if let Some(a) = udp {
            match addr::send_family(a, self.sock.have_v6()) {
                Some((Family::V4, a)) => self.out4.commit(a, len),
                Some((Family::V6, a)) => {
                    let datagram = &self.out4.spare(len)[..len];
                    self.out6.push(a, datagram);
                }
                // No socket for that family: lost, as a send error would lose it.
                None => {}
            }
        }
    }

    fn on_tun(&mut self, pkt: &[u8]) {
        if self.resolver.is_some() && crate::dataplane::dns::is_for_service(pkt) {
            return self.on_dns_packet(pkt);
        }
        // Our UDP flows, so that their replies pass the filter.
        self.filter.note_outbound(pkt);
        let room = wg::encapsulate_room(pkt.len());
        match self.wg.encapsulate_to(pkt, self.out4.spare(room)) {
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

    /// Reads what the `family` socket has queued (up to [`BURST`] reads; one read may hold several
    /// datagrams coalesced by GRO) and handles each datagram.
    async fn drain_udp(&mut self, family: Family, buf: &mut [u8], plain: &mut [u8]) {
        for _ in 0..BURST {
            let sock = match family {
                Family::V4 => Some(self.sock.v4()),
                Family::V6 => self.sock.v6(),
            };
            let Some(sock) = sock else { return };
            match udp::recv(sock, buf) {
                Ok((n, src, seg)) => {
                    // A v4-mapped source is an IPv4 peer, never mistaken for an IPv6 one.
                    let src = addr::canonical(src);
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
                // Each state knows only its own transaction ids; anything else is unsolicited.
                let now = Instant::now().into_std();
                let ours = self.report.as_mut().is_some_and(|(r4, r6)| {
                    r4.handle_stun(pkt, now) || r6.as_mut().is_some_and(|r6| r6.handle_stun(pkt, now))
                });
                if !ours {
                    self.drops.stun_unsolicited += 1;
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
            let pkt = &plain[..n];
            match self.filter.check_inbound(pkt) {
                // Written at the end of the burst, merged with its neighbours where possible.
                Verdict::Accept => self.tun_out.push(pkt),
                // Counted by the filter (status "FilterDrop*").
                Verdict::Drop(why) => log::trace!("filter: dropped len={n} why={}", why.name()),
            }
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
                if hdr.gso_type != crate::dataplane::tun::gro::GSO_NONE && e.kind() == std::io::ErrorKind::InvalidInput
                {
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
        let Ok(sender) = disco::parse_header(pkt) else {
            self.drops.disco_malformed += 1;
            return;
        };
        let Some(&peer) = self.by_disco.get(&sender) else {
            log::trace!("disco from unknown key dropped");
            self.drops.disco_unknown_sender += 1;
            return;
        };
        // Via DERP, the relay's source node key must be the peer owning that disco key.
        if derp_src.is_some_and(|s| s != peer) {
            self.drops.disco_unknown_sender += 1;
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let Some(msg) = p.shared.as_ref().and_then(|s| s.open(pkt).ok()) else {
            self.drops.disco_undecryptable += 1;
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
                    self.pings.handle_pong(&tx_id, res.to, res.rtt);
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
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Ping(peer, reply) => self.start_ping(peer, reply),
            Cmd::Netcheck(reply) => {
                let v = self.last_report.as_ref().map_or(Value::Null, report_json);
                let _ = reply.send(v);
            }
            Cmd::Filter(reply) => {
                let mut v = self.filter.to_json();
                v["PacketFilter"] = json!(self.filter_rules);
                let _ = reply.send(v);
            }
            Cmd::Status(reply) => {
                let _ = reply.send(self.status(Instant::now().into_std()));
            }
        }
    }

    fn on_tick(&mut self) {
        let now_t = Instant::now();
        let now = now_t.into_std();
        self.expire_dns(now_t);
        if self.router_cfg.is_none() && now_t >= self.router_retry {
            // The last attempt failed (a device not up yet, nft refused): try again, gently.
            self.router_retry = now_t + ROUTER_RETRY;
            self.apply_router();
        }
        self.filter.handle_timeout(now);
        self.sync_shields_up();
        if now_t >= self.next_path_check {
            self.next_path_check = now_t + PATH_CHECK;
            self.close_idle_derps(now_t);
            let sum = path_fingerprint(self.peers.iter().map(|(k, p)| (k, p.endpoint.path(now))));
            if sum != self.path_sum {
                self.path_sum = sum;
                self.changes.send_modify(|g| *g = g.wrapping_add(1));
            }
        }
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
        self.pings.handle_timeout(now_t);
        self.netcheck_step(now_t);
    }
}

/// Resolves with (index, length) when the socket of one of `fwds` has a datagram for `buf`
/// (length 0 on a read error); never while none has.
fn poll_dns<'a>(
    fwds: &'a [DnsForward],
    buf: &'a mut [u8],
) -> impl std::future::Future<Output = Option<(usize, usize)>> + 'a {
    std::future::poll_fn(move |cx| {
        for (i, f) in fwds.iter().enumerate() {
            let mut rb = tokio::io::ReadBuf::new(buf);
            match f.sock.poll_recv(cx, &mut rb) {
                std::task::Poll::Ready(r) => {
                    let n = if r.is_ok() { rb.filled().len() } else { 0 };
                    return std::task::Poll::Ready(Some((i, n)));
                }
                std::task::Poll::Pending => {}
            }
        }
        std::task::Poll::Pending
    })
}

/// Resolves when the IPv6 socket has something to read (never, without one).
async fn readable_v6(sock: &Sockets) -> std::io::Result<()> {
    match sock.v6() {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}

/// Sends what `out` holds on `sock` (one system call for a typical burst) and empties it. A
/// socket that refuses GSO gets batches of single datagrams from then on.
fn flush_udp(sock: &tokio::net::UdpSocket, out: &mut SendBatch) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_subnet_routes_are_allowed_ips_beyond_addresses() {
        let n = crate::wire::tailcfg::Node {
            addresses: vec!["100.64.0.2/32".into(), "fd7a:115c:a1e0::2/128".into()],
            allowed_ips: vec![
                "100.64.0.2/32".into(),
                "fd7a:115c:a1e0::2/128".into(),
                "192.168.50.0/24".into(),
                "fd00:50::/64".into(),
                "0.0.0.0/0".into(),
                "::/0".into(),
                "100.64.0.0/24".into(),
                "junk".into(),
            ],
            ..Default::default()
        };
        let r: Vec<String> = peer_subnet_routes(&n).iter().map(|p| p.to_string()).collect();
        assert_eq!(r, ["192.168.50.0/24", "fd00:50::/64"]);
    }

    #[test]
    fn only_the_chosen_exit_node_carries_the_default_routes() {
        let node = |ip: &str, name: &str| crate::wire::tailcfg::Node {
            name: format!("{name}.ts.example."),
            addresses: vec![format!("{ip}/32")],
            allowed_ips: vec![
                format!("{ip}/32"),
                "192.168.7.0/24".into(),
                "0.0.0.0/0".into(),
                "::/0".into(),
            ],
            ..Default::default()
        };
        let (r1, r2) = (node("100.64.0.2", "r1"), node("100.64.0.3", "r2"));
        let ips = |c: PeerConfig| c.allowed_ips.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        // No exit node chosen: nobody carries them.
        assert_eq!(ips(peer_config(&r1, true, "")), ["100.64.0.2/32", "192.168.7.0/24"]);
        // r1 chosen (by IP, as the prefs keep it): r1 only.
        assert_eq!(
            ips(peer_config(&r1, false, "100.64.0.2")),
            ["100.64.0.2/32", "0.0.0.0/0", "::/0"]
        );
        assert_eq!(ips(peer_config(&r2, false, "100.64.0.2")), ["100.64.0.3/32"]);
        assert_eq!(
            ips(peer_config(&r2, true, "100.64.0.2")),
            ["100.64.0.3/32", "192.168.7.0/24"]
        );
    }

    #[test]
    fn an_approved_exit_node_forwards_and_always_masquerades() {
        let mut p = RoutePrefs::default(); // snat_subnet_routes off
        assert_eq!(
            p.subnet_router(&[], [true, true]),
            None,
            "approved but not advertised (any more)"
        );
        p.advertise_exit_node = true;
        assert_eq!(p.subnet_router(&[], [false; 2]), None, "advertised, not approved yet");
        assert_eq!(
            p.subnet_router(&[], [true, false]),
            Some(SubnetRouter {
                v4: true,
                v6: false,
                snat: true
            })
        );
    }

    #[test]
    fn route_prefs_ask_forwarding_per_family() {
        let mut p = RoutePrefs {
            snat_subnet_routes: true,
            ..Default::default()
        };
        let pfx = |s: &str| s.parse::<Prefix>().unwrap();
        let approved = [pfx("0.0.0.0/0"), pfx("192.168.1.0/24"), pfx("fd00::/64")];
        assert_eq!(p.subnet_router(&approved, [false; 2]), None);
        p.advertise_routes = vec!["0.0.0.0/0".into(), "::/0".into()];
        assert_eq!(
            p.subnet_router(&approved, [false; 2]),
            None,
            "exit-node routes are not subnet routes"
        );
        p.advertise_routes.push("192.168.1.0/24".into());
        assert_eq!(p.subnet_router(&[], [false; 2]), None, "not approved yet");
        assert_eq!(
            p.subnet_router(&approved, [false; 2]),
            Some(SubnetRouter {
                v4: true,
                v6: false,
                snat: true
            })
        );
        p.advertise_routes.push("fd00::/64".into());
        p.snat_subnet_routes = false;
        assert_eq!(
            p.subnet_router(&approved, [false; 2]),
            Some(SubnetRouter {
                v4: true,
                v6: true,
                snat: false
            })
        );
    }
}
