//! The data-plane shell: one event loop over the TUN device, the magicsock UDP sockets (one per
//! address family), DERP relay connections and a timer, gluing the sans-io cores together.
//!
//! Plays the role of tailscale `wgengine/userspace.go` + the I/O half of `wgengine/magicsock`.
//! Per packet: TUN → [`WgPeers::encapsulate_to`] → the peer's [`Endpoint`] picks UDP and/or
//! DERP; UDP/DERP → [`demux`] → STUN (netcheck), disco (path discovery) or WireGuard →
//! [`WgPeers::decapsulate_to`] → the packet [`Filter`] → TUN. Each DERP region gets its own
//! task (the client needs `&mut` for both directions), connected to the loop by bounded
//! channels. DERP host names without pinned addresses are resolved through one cache
//! (`DnsCache`) shared by netcheck and the DERP dials, off the loop, each lookup bounded by
//! `DNS_TIMEOUT`.
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
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
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
    dataplane::filter::{Filter, LocalNets, Rules, Verdict},
    dataplane::magicsock::{
        addr::{self, Family},
        batch::{self, SendBatch},
        demux::{self, Kind},
        endpoint::{self, DiscoOut, Endpoint, Path, PathStatus, SendPlan, TxId},
        socket::{self, Sockets},
    },
    dataplane::netcheck::{self, ProbePlan, ReportState},
    dataplane::router::{ExitRoutes, Prefix, Router, RouterConfig, SubnetRouter, SystemRunner, TAILNET_V4, TAILNET_V6},
    dataplane::tun::{gro::Coalescer, Tun},
    dataplane::udp,
    dataplane::wg::{self, PeerConfig, WgPeers},
    derp::{
        self,
        client::{self as derp_client, DerpEvent},
    },
    wire::disco::{self, DiscoShared, Message},
    wire::keys::{DiscoPrivate, DiscoPublic, NodePrivate, NodePublic},
    wire::stun,
    wire::tailcfg::{DerpMap, DerpNode, DerpRegion, FilterRule},
};

/// Timer resolution of the loop (boringtun wants ≥ 4 Hz; netcheck probes retransmit at 100 ms).
const TICK: Duration = Duration::from_millis(100);
/// How often the peers' paths are compared for the daemon's change notification.
const PATH_CHECK: Duration = Duration::from_secs(1);
/// How often netcheck re-runs (Go: every 20-26 s while active).
const NETCHECK_INTERVAL: Duration = Duration::from_secs(25);
/// With no relay address to route towards (a DERP map without relays), our IPv4 endpoint is the
/// source address of the default route, found by routing towards this address (TEST-NET-1;
/// connecting a UDP socket sends nothing).
const DEFAULT_ROUTE_PROBE: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)), 3478);
/// Packets queued towards one DERP region before new ones are dropped.
const DERP_QUEUE: usize = 256;
/// Largest datagram we read (WireGuard over a 1280 MTU plus overhead, with room to spare; a
/// UDP GRO read of coalesced datagrams is at most this too).
const MAX_DATAGRAM: usize = 65535;
/// Longest a DERP host name lookup may take; a dead resolver must not hold up netcheck or a dial.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a DERP host name answer is used before it is looked up again (the system resolver
/// gives us no TTL; DERP addresses change rarely).
const DNS_FRESH: Duration = Duration::from_secs(10 * 60);
/// How long a failed lookup waits before the next try.
const DNS_RETRY: Duration = Duration::from_secs(30);
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

/// Budget for one region's `GET /derp/latency-check` (connection, TLS and the request).
const HTTPS_LATENCY_BUDGET: Duration = Duration::from_secs(5);
/// How long HTTPS latencies rank regions before they are measured again (a TLS connection to
/// every region is not something to repeat with each 25 s report).
const HTTPS_LATENCY_FRESH: Duration = Duration::from_secs(5 * 60);

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
            .filter_map(|r| Prefix::parse_masked(r))
            .filter(|p| p.len > 0 && approved.contains(p))
            .collect();
        let exit = if self.advertise_exit_node { exit } else { [false; 2] };
        if routes.is_empty() && exit == [false; 2] {
            return None;
        }
        Some(SubnetRouter {
            v4: exit[0] || routes.iter().any(|p| p.addr.is_ipv4()),
            v6: exit[1] || routes.iter().any(|p| p.addr.is_ipv6()),
            snat: self.snat_subnet_routes || exit != [false; 2],
        })
    }
}

/// [pure] A peer's subnet routes: its AllowedIPs beyond its own addresses, without the tailnet
/// ranges and default routes (exit-node routes are used only through `--exit-node`).
pub fn peer_subnet_routes(node: &crate::wire::tailcfg::Node) -> Vec<Prefix> {
    let own: Vec<Prefix> = node.addresses.iter().filter_map(|a| Prefix::parse_masked(a)).collect();
    let tailnet = [
        Prefix::new(TAILNET_V4.0, TAILNET_V4.1, true).expect("valid"),
        Prefix::new(TAILNET_V6.0, TAILNET_V6.1, true).expect("valid"),
    ];
    node.allowed_ips
        .iter()
        .filter_map(|a| Prefix::parse_masked(a))
        .filter(|p| p.len > 0 && !own.contains(p) && !tailnet.iter().any(|t| t.contains(p)))
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
        cfg.allowed_ips.retain(|ip| !ip.is_empty());
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

/// What the data plane knows for `status --json`, built when asked (never per packet).
#[derive(Debug, Default)]
pub struct EngineStatus {
    /// Per-peer path status (`CurAddr`, `Relay`, handshake age, bytes).
    pub peers: HashMap<NodePublic, Value>,
    /// Engine-wide counters ("Counters"): what was dropped and why.
    pub counters: Value,
    /// DERP regions with a connection task: region ID → `{"Connected", "Home"}`.
    pub derp: Value,
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
    home_derp: i32,
    derps: HashMap<i32, mpsc::Sender<(NodePublic, Vec<u8>)>>,
    /// Per region with a task: whether its connection is up now (set by the task).
    derp_up: HashMap<i32, Arc<AtomicBool>>,
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
    pending_pings: HashMap<TxId, u64>,
    rounds: HashMap<u64, PendingPing>,
    round: u64,
    drops: Drops,
    addresses: Vec<(IpAddr, u8)>,
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

/// A region's DERP server: its first node that is not STUN-only, and the port to dial: `DERPPort`,
/// else 443 for TLS or 80 for plain HTTP (`TS_DEBUG_USE_DERP_HTTP=1`), as the Go client does.
fn derp_node(region: &DerpRegion, plain_http: bool) -> Option<(DerpNode, u16)> {
    let n = region.nodes.iter().find(|n| !n.stun_only)?;
    let default = if plain_http { 80 } else { 443 };
    let port = u16::try_from(n.derp_port).ok().filter(|p| *p > 0).unwrap_or(default);
    Some((n.clone(), port))
}

/// DERP host names resolved to addresses (both families), shared by netcheck and the DERP
/// tasks. Answers stay [`DNS_FRESH`]; a failure is retried after [`DNS_RETRY`] and meanwhile the
/// last good answer, if any, is still used. `resolve` is the system resolver (tests give their
/// own, so no test depends on this machine's DNS).
#[derive(Clone)]
struct DnsCache {
    entries: Arc<Mutex<HashMap<String, DnsEntry>>>,
    resolve: Resolve,
}

/// Looks up a host name (the port of each answer is ignored).
type Resolve = fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;

fn system_resolve(host: String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
    Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), 0)).await?.collect()) })
}

impl Default for DnsCache {
    fn default() -> Self {
        DnsCache {
            entries: Arc::default(),
            resolve: system_resolve,
        }
    }
}

#[derive(Clone)]
struct DnsEntry {
    addrs: Vec<IpAddr>,
    /// When the last lookup (good or failed) finished.
    at: Instant,
    failed: bool,
}

impl DnsCache {
    /// The cached answer for `host` (empty if none).
    fn get(&self, host: &str) -> Vec<IpAddr> {
        let m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        m.get(host).map(|e| e.addrs.clone()).unwrap_or_default()
    }

    /// Whether `host` has no answer worth using without a new lookup.
    fn stale(&self, host: &str, now: Instant) -> bool {
        let m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        m.get(host)
            .is_none_or(|e| now >= e.at + if e.failed { DNS_RETRY } else { DNS_FRESH })
    }

    /// `host`'s addresses: cached if fresh, else looked up (bounded by [`DNS_TIMEOUT`]).
    /// Failures are logged once per outage with the region (`derp=`) and are not fatal: the
    /// previous answer, or nothing, is returned.
    async fn lookup(&self, host: &str, region: i32) -> Vec<IpAddr> {
        if !self.stale(host, Instant::now()) {
            return self.get(host);
        }
        let res = tokio::time::timeout(DNS_TIMEOUT, (self.resolve)(host.to_string())).await;
        let found: Result<Vec<IpAddr>, String> = match res {
            Ok(Ok(it)) => {
                let mut v: Vec<IpAddr> = Vec::new();
                for a in it {
                    let ip = addr::canonical(a).ip();
                    if !v.contains(&ip) {
                        v.push(ip);
                    }
                }
                if v.is_empty() {
                    Err("no addresses".into())
                } else {
                    Ok(v)
                }
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("timed out after {}s", DNS_TIMEOUT.as_secs())),
        };
        let mut m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let prev = m.get(host).cloned();
        let entry = match found {
            Ok(addrs) => {
                if prev.as_ref().is_none_or(|p| p.failed || p.addrs != addrs) {
                    log::info!("derp host resolved derp={region} host={host} addrs={addrs:?}");
                }
                DnsEntry {
                    addrs,
                    at: Instant::now(),
                    failed: false,
                }
            }
            Err(e) => {
                if prev.as_ref().is_none_or(|p| !p.failed) {
                    log::warn!("derp host lookup failed derp={region} host={host} err={e}");
                }
                DnsEntry {
                    addrs: prev.map(|p| p.addrs).unwrap_or_default(),
                    at: Instant::now(),
                    failed: true,
                }
            }
        };
        let addrs = entry.addrs.clone();
        m.insert(host.to_string(), entry);
        addrs
    }
}

/// The addresses to dial for DERP `node` on `port`: its pinned `IPv4`/`IPv6`, else what its
/// `HostName` resolves to, per family, with `"none"` honoured ([`derp::dial_addrs`]).
async fn derp_dial_addrs(node: &DerpNode, port: u16, dns: &DnsCache) -> Vec<SocketAddr> {
    let resolved = if derp::needs_dns(node) {
        dns.lookup(&node.host_name, node.region_id).await
    } else {
        Vec::new()
    };
    derp::dial_addrs(node, port, &resolved)
}

/// The name the DERP node's certificate must carry (SNI) and the `Host` header: its `HostName`,
/// else the address dialled.
fn derp_server_name(node: &DerpNode, addrs: &[SocketAddr]) -> String {
    if node.host_name.is_empty() {
        addrs.first().map(|a| a.ip().to_string()).unwrap_or_default()
    } else {
        node.host_name.clone()
    }
}

/// The local source address the kernel would use towards `dst` (no packet is sent).
fn local_addr_towards(dst: SocketAddr) -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind(if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
    crate::dataplane::netns::mark(std::os::fd::AsRawFd::as_raw_fd(&s));
    s.connect(dst).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// Runs one DERP region connection: reconnects with backoff, forwards both ways.
async fn derp_task(
    region: i32,
    (node, port, tls): (DerpNode, u16, bool),
    dns: DnsCache,
    me: NodePrivate,
    // Whether it is the home region, and the flag this task keeps saying if it is connected.
    (home, up): (bool, Arc<AtomicBool>),
    mut out_rx: mpsc::Receiver<(NodePublic, Vec<u8>)>,
    in_tx: mpsc::Sender<(i32, NodePublic, Bytes)>,
) {
    let mut backoff = derp_client::Backoff::default();
    loop {
        // Resolved afresh (through the cache) on every attempt: the node may have moved.
        let addrs = derp_dial_addrs(&node, port, &dns).await;
        let dial = derp_client::Dial {
            host: derp_server_name(&node, &addrs),
            addrs,
            tls,
        };
        let conn = if dial.addrs.is_empty() {
            Err(format!(
                "no address for host {} (IPv4/IPv6 \"none\" or DNS failed)",
                node.host_name
            ))
        } else {
            derp_client::connect(&dial, "/derp", &me)
                .await
                .map_err(|e| e.to_string())
        };
        let addr = dial.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
        match conn {
            Ok(mut c) => {
                backoff.reset();
                log::info!("derp connected region={region} addr={addr} tls={tls} home={home}");
                up.store(true, Ordering::Relaxed);
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
                up.store(false, Ordering::Relaxed);
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
            derps: HashMap::new(),
            derp_up: HashMap::new(),
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
            pending_pings: HashMap::new(),
            rounds: HashMap::new(),
            round: 0,
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
        cfg.accepted_routes = self.accepted.iter().map(|p| (p.addr, p.len)).collect();
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
                    Some((ip.parse().ok()?, len.parse().ok()?))
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
            let lans: Vec<wg::IpPrefix> = if exit {
                self.router
                    .connected_prefixes(self.tun.name())
                    .iter()
                    .filter_map(|p| wg::IpPrefix::new(p.addr, p.len))
                    .collect()
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

    fn derp_sender(&mut self, region: i32) -> Option<&mpsc::Sender<(NodePublic, Vec<u8>)>> {
        if !self.derps.contains_key(&region) {
            let r = self.derp_map.regions.get(&region.to_string())?;
            let plain_http = crate::wire::tls::derp_plain_http();
            let node = derp_node(r, plain_http)?;
            let (tx, rx) = mpsc::channel(DERP_QUEUE);
            let up = Arc::new(AtomicBool::new(false));
            self.derp_up.insert(region, up.clone());
            tokio::spawn(derp_task(
                region,
                (node.0, node.1, !plain_http),
                self.dns.clone(),
                self.my_private.clone(),
                (region == self.home_derp, up),
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
    }

    /// DERP host names (of nodes without pinned addresses) whose cached answer is missing or
    /// old, with the region each serves.
    fn stale_derp_hosts(&self, now: Instant) -> Vec<(String, i32)> {
        let mut seen = HashSet::new();
        self.derp_map
            .regions
            .values()
            .flat_map(|r| r.nodes.iter())
            .filter(|n| derp::needs_dns(n) && self.dns.stale(&n.host_name, now))
            .filter(|n| seen.insert(n.host_name.clone()))
            .map(|n| (n.host_name.clone(), n.region_id))
            .collect()
    }

    fn netcheck_step(&mut self, now_t: Instant) {
        let now = now_t.into_std();
        if self.derp_map.regions.is_empty() {
            // Nothing to probe (control without DERP): the endpoints are still published, on the
            // same schedule, so peers can reach us directly.
            self.report = None;
            if now_t >= self.next_netcheck {
                self.next_netcheck = now_t + NETCHECK_INTERVAL;
                self.apply_report(netcheck::Report::default());
            }
            return;
        }
        if self.report.is_none() && now_t >= self.next_netcheck {
            // Names first, off the loop; `dns_done` brings us back here.
            let stale = self.stale_derp_hosts(now_t);
            if !stale.is_empty() && !self.dns_pending {
                self.dns_pending = true;
                let (dns, done) = (self.dns.clone(), self.dns_done_tx.clone());
                tokio::spawn(async move {
                    for (host, region) in stale {
                        dns.lookup(&host, region).await;
                    }
                    let _ = done.send(()).await;
                });
                return;
            }
            if self.dns_pending {
                return;
            }
            let dns = self.dns.clone();
            let plan = ProbePlan::new(&self.derp_map, netcheck::Timing::default())
                .with_home(self.home_derp, self.derps.contains_key(&self.home_derp))
                .with_resolved(|host| dns.get(host));
            let deadline = now + netcheck::STUN_PROBE_TIMEOUT;
            // IPv6 probes only when they can leave: an IPv6 socket and an address to send from
            // (Go probes IPv6 only when the OS has it), else each report would wait them out.
            let have_v6 =
                self.sock.have_v6() && !addr::publishable_v6(&socket::interface_v6(), self.tun.name()).is_empty();
            let v6 = have_v6.then(|| ReportState::new(&plan, true, now, deadline));
            self.report = Some((ReportState::new(&plan, false, now, deadline), v6));
            self.next_netcheck = now_t + NETCHECK_INTERVAL;
        }
        let Some((r4, r6)) = self.report.as_mut() else { return };
        let mut sends = Vec::new();
        for rs in std::iter::once(r4).chain(r6.as_mut()) {
            while let Some(p) = rs.poll_probe(now) {
                if let Some(dst) = p.addr() {
                    let tx = new_tx();
                    rs.note_sent(tx, &p, dst, now);
                    sends.push((dst, stun::binding_request(tx)));
                }
            }
        }
        for (dst, req) in sends {
            self.send_udp(dst, &req);
        }
        let done = self
            .report
            .as_ref()
            .is_some_and(|(r4, r6)| r4.is_done(now) && r6.as_ref().is_none_or(|r| r.is_done(now)));
        if done {
            if let Some((r4, r6)) = self.report.take() {
                let r = match r6 {
                    Some(r6) => netcheck::finish_both(r4, r6),
                    None => r4.finish(),
                };
                let fresh = self
                    .https_latency
                    .as_ref()
                    .filter(|(at, _)| now_t < *at + HTTPS_LATENCY_FRESH)
                    .map(|(_, lat)| lat.clone());
                match (r.udp, fresh) {
                    (true, _) => self.apply_report(r),
                    (false, Some(lat)) => {
                        let alive = self.derps.contains_key(&self.home_derp);
                        let timing = netcheck::Timing::default();
                        self.apply_report(netcheck::with_https_latency(r, &lat, self.home_derp, alive, &timing));
                    }
                    (false, None) => {
                        self.apply_report(r);
                        if !self.https_pending {
                            self.measure_https_latency();
                        }
                    }
                }
            }
        }
    }

    /// UDP is blocked: ranks the regions by `GET /derp/latency-check` instead (Go netcheck's
    /// HTTPS fallback), off the loop; the answers arrive in [`Self::on_https_latency`].
    fn measure_https_latency(&mut self) {
        let plain_http = crate::wire::tls::derp_plain_http();
        let targets: Vec<(i32, (DerpNode, u16))> = self
            .derp_map
            .regions
            .values()
            .filter(|r| r.region_id > 0 && !r.no_measure_no_home)
            .filter_map(|r| Some((r.region_id, derp_node(r, plain_http)?)))
            .collect();
        if targets.is_empty() {
            return;
        }
        self.https_pending = true;
        let (dns, done) = (self.dns.clone(), self.https_done_tx.clone());
        tokio::spawn(async move {
            let mut set = tokio::task::JoinSet::new();
            for (region, (node, port)) in targets {
                let dns = dns.clone();
                set.spawn(async move {
                    let addrs = derp_dial_addrs(&node, port, &dns).await;
                    let dial = derp_client::Dial {
                        host: derp_server_name(&node, &addrs),
                        addrs,
                        tls: !plain_http,
                    };
                    if dial.addrs.is_empty() {
                        return None;
                    }
                    match derp_client::latency_check(&dial, HTTPS_LATENCY_BUDGET).await {
                        Ok(d) => Some((region, d)),
                        Err(e) => {
                            log::debug!("netcheck: https latency failed derp={region} err={e}");
                            None
                        }
                    }
                });
            }
            let mut lat = BTreeMap::new();
            while let Some(r) = set.join_next().await {
                if let Ok(Some((region, d))) = r {
                    lat.insert(region, d);
                }
            }
            let _ = done.send(lat).await;
        });
    }

    fn on_https_latency(&mut self, lat: &BTreeMap<i32, Duration>) {
        self.https_pending = false;
        // Nothing answered (relays down, or no TCP either): measure again with the next report.
        self.https_latency = (!lat.is_empty()).then(|| (Instant::now(), lat.clone()));
        let Some(r) = self.last_report.clone() else { return };
        if r.udp {
            return;
        }
        log::info!(
            "netcheck: UDP blocked, DERP latency over HTTPS {:?}",
            lat.iter().map(|(r, d)| (r, d.as_millis())).collect::<Vec<_>>()
        );
        let prev_alive = self.derps.contains_key(&self.home_derp);
        let r = netcheck::with_https_latency(r, lat, self.home_derp, prev_alive, &netcheck::Timing::default());
        self.apply_report(r);
    }

    fn apply_report(&mut self, mut r: netcheck::Report) {
        // Our endpoints: STUN-mapped, the local IPv4 address towards a relay, and our global/ULA
        // IPv6 interface addresses on the IPv6 socket's port.
        let towards = self
            .derp_map
            .regions
            .values()
            .flat_map(|reg| reg.nodes.iter())
            .flat_map(|n| derp::dial_addrs(n, 3478, &self.dns.get(&n.host_name)))
            .find(SocketAddr::is_ipv4)
            .unwrap_or(DEFAULT_ROUTE_PROBE);
        let local_v4 = local_addr_towards(towards).map(|ip| SocketAddr::new(ip, self.sock.port()));
        let v6 = addr::publishable_v6(&socket::interface_v6(), self.tun.name());
        let stun: Vec<SocketAddr> = [r.global_v4, r.global_v6].into_iter().flatten().collect();
        let eps = addr::local_endpoints(&stun, local_v4, &v6, self.sock.port6());
        r.os_has_ipv6 = self.sock.have_v6() && !v6.is_empty();
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

    fn status(&self, now: std::time::Instant) -> EngineStatus {
        let w = self.wg.stats();
        let d = &self.drops;
        let mut counters = json!({
            "DiscoMalformed": d.disco_malformed,
            "DiscoUnknownSender": d.disco_unknown_sender,
            "DiscoUndecryptable": d.disco_undecryptable,
            "StunUnsolicited": d.stun_unsolicited,
            "WireGuardMalformed": w.malformed,
            "WireGuardUnknownPeer": w.unknown_peer,
            "WireGuardRejected": w.rejected,
            "WireGuardBadSource": w.bad_source,
            "WireGuardNoRoute": w.no_route,
            "WireGuardRxPackets": w.rx_packets,
            "WireGuardTxDatagrams": w.tx_datagrams,
        });
        for (why, n) in self.filter.drops() {
            counters[format!("FilterDrop{}", why.name()).as_str()] = json!(n);
        }
        let mut peers = HashMap::with_capacity(self.peers.len());
        for (k, p) in &self.peers {
            let (cur, relay) = match p.endpoint.path(now) {
                PathStatus::Direct { addr, .. } => (addr.to_string(), String::new()),
                PathStatus::Derp(r) => (String::new(), r.to_string()),
                PathStatus::Unreachable => (String::new(), String::new()),
            };
            let ws = self.wg.peer_stats(k);
            peers.insert(
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
        let mut derp = serde_json::Map::new();
        for (region, up) in &self.derp_up {
            derp.insert(
                region.to_string(),
                json!({"Connected": up.load(Ordering::Relaxed), "Home": *region == self.home_derp}),
            );
        }
        EngineStatus {
            peers,
            counters,
            derp: Value::Object(derp),
        }
    }
}

/// Inbound datagrams dropped by the engine itself (WireGuard keeps its own [`wg::WgStats`]).
#[derive(Debug, Default)]
struct Drops {
    /// Disco magic but too short for the header.
    disco_malformed: u64,
    /// Disco from a key no peer has, or relayed by a node that does not own that key.
    disco_unknown_sender: u64,
    /// Disco whose box does not open with the sender's shared key.
    disco_undecryptable: u64,
    /// STUN that answers no probe of ours.
    stun_unsolicited: u64,
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

/// `tinyscale netcheck` JSON.
pub fn report_json(r: &netcheck::Report) -> Value {
    // Inserted one by one: `collect()` into a map compiles a sort per call site.
    let mut lat = serde_json::Map::new();
    for (k, v) in &r.region_latency {
        lat.insert(k.to_string(), json!(v.as_secs_f64() * 1000.0));
    }
    json!({
        "UDP": r.udp,
        "IPv4": r.ipv4,
        "GlobalV4": r.global_v4.map(|a| a.to_string()),
        "IPv6": r.ipv6,
        "GlobalV6": r.global_v6.map(|a| a.to_string()),
        "OSHasIPv6": r.os_has_ipv6,
        "MappingVariesByDestIP": r.mapping_varies_by_dest_ip,
        "PreferredDERP": r.preferred_derp,
        "RegionLatencyMs": lat,
        "LatencyVia": if r.latency_over_https { "https" } else { "stun" },
    })
}

/// [pure] One number for the peers' paths as the `tinyscale.peer` event reports them (direct,
/// a DERP region or none): a sum of per-peer hashes, so the map's order does not matter.
fn path_fingerprint<'a>(paths: impl Iterator<Item = (&'a NodePublic, PathStatus)>) -> u64 {
    use std::hash::{Hash, Hasher};
    paths.fold(0, |sum, (k, p)| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.hash(&mut h);
        match p {
            PathStatus::Direct { .. } => (1u8, 0),
            PathStatus::Derp(r) => (2, r),
            PathStatus::Unreachable => (0, 0),
        }
        .hash(&mut h);
        sum.wrapping_add(h.finish())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::derp::tests::node;

    #[test]
    fn path_fingerprint_changes_only_with_the_reported_path() {
        let a = NodePrivate::from_random([1; 32]).public();
        let b = NodePrivate::from_random([2; 32]).public();
        let direct = |port: u16, ms: u64| PathStatus::Direct {
            addr: SocketAddr::from(([192, 0, 2, 1], port)),
            rtt: Duration::from_millis(ms),
        };
        let f = |v: &[(&NodePublic, PathStatus)]| path_fingerprint(v.iter().copied());
        let base = f(&[(&a, PathStatus::Derp(1)), (&b, direct(41641, 5))]);
        // Order, latency and the direct address itself do not count.
        assert_eq!(base, f(&[(&b, direct(41642, 9)), (&a, PathStatus::Derp(1))]));
        // Another region, direct, no path, or a peer more or less do.
        for other in [
            f(&[(&a, PathStatus::Derp(2)), (&b, direct(41641, 5))]),
            f(&[(&a, direct(1, 1)), (&b, direct(41641, 5))]),
            f(&[(&a, PathStatus::Unreachable), (&b, direct(41641, 5))]),
            f(&[(&b, direct(41641, 5))]),
        ] {
            assert_ne!(base, other);
        }
    }

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
        let pfx = |s: &str| Prefix::parse_masked(s).unwrap();
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

    #[test]
    fn netcheck_json_has_both_families() {
        let r = netcheck::Report {
            udp: true,
            ipv4: true,
            ipv6: true,
            os_has_ipv6: true,
            global_v4: Some("198.51.100.7:41641".parse().unwrap()),
            global_v6: Some("[2001:db8:1::2]:41641".parse().unwrap()),
            ..netcheck::Report::default()
        };
        let v = report_json(&r);
        assert_eq!(
            (&v["IPv4"], &v["GlobalV4"], &v["IPv6"], &v["GlobalV6"], &v["OSHasIPv6"]),
            (
                &json!(true),
                &json!("198.51.100.7:41641"),
                &json!(true),
                &json!("[2001:db8:1::2]:41641"),
                &json!(true)
            )
        );
        let v = report_json(&netcheck::Report::default());
        assert_eq!((&v["IPv6"], &v["GlobalV6"]), (&json!(false), &Value::Null));
    }

    #[test]
    fn derp_node_port_and_server_name() {
        let mut n = node("derp.example", "", "");
        let r = DerpRegion {
            region_id: 1,
            nodes: vec![
                DerpNode {
                    stun_only: true,
                    ..node("stun.example", "", "")
                },
                n.clone(),
            ],
            ..DerpRegion::default()
        };
        assert_eq!(
            derp_node(&r, false),
            Some((n.clone(), 443)),
            "STUN-only skipped; TLS on 443"
        );
        assert_eq!(derp_node(&r, true), Some((n.clone(), 80)), "plain HTTP on 80");
        n.derp_port = 3340;
        let r = DerpRegion {
            nodes: vec![n.clone()],
            ..r
        };
        assert_eq!(derp_node(&r, false), Some((n.clone(), 3340)), "DERPPort wins");
        let a: Vec<SocketAddr> = vec!["192.0.2.1:3340".parse().unwrap()];
        assert_eq!(derp_server_name(&n, &a), "derp.example");
        assert_eq!(derp_server_name(&node("", "192.0.2.1", ""), &a), "192.0.2.1");
    }

    /// A resolver that knows `localhost`, never answers for `slow.invalid` and fails the rest.
    fn fake_resolve(host: String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> {
        Box::pin(async move {
            match host.as_str() {
                "localhost" => Ok(vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()]),
                "slow.invalid" => std::future::pending().await,
                _ => Err(std::io::ErrorKind::NotFound.into()),
            }
        })
    }

    /// Host names are resolved (cached) and families honour "none"; a name that cannot resolve,
    /// or whose lookup hangs, yields nothing after at most [`DNS_TIMEOUT`], without failing, and
    /// the failure is remembered until [`DNS_RETRY`]. Virtual time: no wall clock, no real DNS.
    #[tokio::test(start_paused = true)]
    async fn derp_dial_addrs_resolve_names() {
        let dns = DnsCache {
            resolve: fake_resolve,
            ..DnsCache::default()
        };
        let got = derp_dial_addrs(&node("localhost", "", "none"), 3340, &dns).await;
        assert_eq!(got, vec!["127.0.0.1:3340".parse::<SocketAddr>().unwrap()]);
        assert!(!dns.stale("localhost", Instant::now()), "the answer is cached");
        assert!(dns.get("localhost").contains(&IpAddr::from([127, 0, 0, 1])));
        let got = derp_dial_addrs(&node("localhost", "none", "none"), 3340, &dns).await;
        assert!(got.is_empty(), "both families off: {got:?}");
        // Pinned addresses need no lookup at all.
        let got = derp_dial_addrs(&node("pinned.invalid", "192.0.2.1", "2001:db8::1"), 3340, &dns).await;
        assert_eq!(got.len(), 2);
        assert!(dns.stale("pinned.invalid", Instant::now()), "never looked up");
        // A failed lookup: empty at once, remembered as failed until the retry time.
        let t = Instant::now();
        let got = derp_dial_addrs(&node("no-such-host.invalid", "", ""), 3340, &dns).await;
        assert!(got.is_empty());
        assert_eq!(t.elapsed(), Duration::ZERO, "a refusal is not a timeout");
        assert!(
            !dns.stale("no-such-host.invalid", Instant::now()),
            "failure cached until retry"
        );
        assert!(dns.stale("no-such-host.invalid", Instant::now() + DNS_RETRY));
        // A hanging lookup ends at the timeout.
        let t = Instant::now();
        let got = derp_dial_addrs(&node("slow.invalid", "", ""), 3340, &dns).await;
        assert!(got.is_empty());
        assert_eq!(t.elapsed(), DNS_TIMEOUT);
        // After a failure the last good answer is kept: localhost refreshed while "down".
        let down = DnsCache {
            entries: dns.entries.clone(),
            resolve: |_| Box::pin(async { Err(std::io::ErrorKind::NotFound.into()) }),
        };
        tokio::time::advance(DNS_FRESH).await;
        assert!(down.stale("localhost", Instant::now()));
        let got = derp_dial_addrs(&node("localhost", "", "none"), 3340, &down).await;
        assert_eq!(
            got,
            vec!["127.0.0.1:3340".parse::<SocketAddr>().unwrap()],
            "last good answer"
        );
    }
}
