//! DERP connections of the engine: one task per region ([`derp_task`]), dialled at the addresses
//! of the region's node ([`derp_node`], [`derp_dial_addrs`]), with DERP host names resolved
//! through one cache ([`DnsCache`]) that netcheck shares. Lookups run off the loop, each bounded by
//! [`DNS_TIMEOUT`].
//!
//! Mirrors the connection half of tailscale `wgengine/magicsock/derp.go`
//! (`derpWriteChanForRegion`, `runDerpReader`/`runDerpWriter`, `setNearestDERP`,
//! `cleanStaleDerp`). The loop keeps a [`DerpConn`] per region: the task's queue (bounded; a
//! full queue drops), its "connected" flag and its last use. Every task reads the home region
//! from one shared value and tells its server whether it is our home (NotePreferred) when it
//! connects and when the home moves, over the connection it has. A region that is not home
//! closes once idle; dropping its queue ends the task.

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicI32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use rand_core::{OsRng, RngCore};
use tokio::{sync::mpsc, time::Instant};

use super::{derp_home, Engine};
use crate::{
    dataplane::magicsock::addr,
    derp::{
        self,
        client::{self as derp_client, DerpEvent},
    },
    wire::keys::{NodePrivate, NodePublic},
    wire::tailcfg::{DerpNode, DerpRegion},
};

/// Packets queued towards one DERP region before new ones are dropped.
const DERP_QUEUE: usize = 256;
/// Longest a DERP host name lookup may take; a dead resolver must not hold up netcheck or a dial.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a DERP host name answer is used before it is looked up again (the system resolver
/// gives us no TTL; DERP addresses change rarely).
const DNS_FRESH: Duration = Duration::from_secs(10 * 60);
/// How long a failed lookup waits before the next try.
const DNS_RETRY: Duration = Duration::from_secs(30);

/// A region's DERP server: its first node that is not STUN-only, and the port to dial: `DERPPort`,
/// else 443 for TLS or 80 for plain HTTP (`TS_DEBUG_USE_DERP_HTTP=1`), as the Go client does.
pub(super) fn derp_node(region: &DerpRegion, plain_http: bool) -> Option<(DerpNode, u16)> {
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
pub(super) struct DnsCache {
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
    pub(super) fn get(&self, host: &str) -> Vec<IpAddr> {
        let m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        m.get(host).map(|e| e.addrs.clone()).unwrap_or_default()
    }

    /// Whether `host` has no answer worth using without a new lookup.
    pub(super) fn stale(&self, host: &str, now: Instant) -> bool {
        let m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        m.get(host)
            .is_none_or(|e| now >= e.at + if e.failed { DNS_RETRY } else { DNS_FRESH })
    }

    /// `host`'s addresses: cached if fresh, else looked up (bounded by [`DNS_TIMEOUT`]).
    /// Failures are logged once per outage with the region (`derp=`) and are not fatal: the
    /// previous answer, or nothing, is returned.
    pub(super) async fn lookup(&self, host: &str, region: i32) -> Vec<IpAddr> {
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
pub(super) async fn derp_dial_addrs(node: &DerpNode, port: u16, dns: &DnsCache) -> Vec<SocketAddr> {
    let resolved = if derp::needs_dns(node) {
        dns.lookup(&node.host_name, node.region_id).await
    } else {
        Vec::new()
    };
    derp::dial_addrs(node, port, &resolved)
}

/// The name the DERP node's certificate must carry (SNI) and the `Host` header: its `HostName`,
/// else the address dialled.
pub(super) fn derp_server_name(node: &DerpNode, addrs: &[SocketAddr]) -> String {
    if node.host_name.is_empty() {
        addrs.first().map(|a| a.ip().to_string()).unwrap_or_default()
    } else {
        node.host_name.clone()
    }
}

/// Runs one DERP region connection: reconnects with backoff, forwards both ways.
async fn derp_task(
    region: i32,
    (node, port, tls): (DerpNode, u16, bool),
    dns: DnsCache,
    me: NodePrivate,
    // The home region as the engine follows it (read on connecting and with each item of the
    // queue), and the flag this task keeps saying whether it is connected.
    (home, up): (Arc<AtomicI32>, Arc<AtomicBool>),
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
                let mut preferred = home.load(Ordering::Relaxed) == region;
                log::info!("derp connected region={region} addr={addr} tls={tls} home={preferred}");
                up.store(true, Ordering::Relaxed);
                if preferred {
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
                                // The home moved: tell this server whether it is ours now (Go
                                // setNearestDERP notifies every active connection), without
                                // reconnecting. An empty packet is the engine's wake-up for
                                // this (DERP payloads are never empty), not sent.
                                let now = home.load(Ordering::Relaxed) == region;
                                let r = if now != preferred {
                                    preferred = now;
                                    c.note_preferred(now).await
                                } else {
                                    Ok(())
                                };
                                let r = match r {
                                    Ok(()) if !pkt.is_empty() => c.send(dst, &pkt).await,
                                    r => r,
                                };
                                if let Err(e) = r {
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

/// The engine's side of one region's DERP task. Dropping it ends the task (its queue closes)
/// and so the connection.
pub(super) struct DerpConn {
    tx: mpsc::Sender<(NodePublic, Vec<u8>)>,
    /// Whether the connection is up now (set by the task).
    pub(super) up: Arc<AtomicBool>,
    /// When a packet was last queued towards it (Go `activeDerp.lastWrite`): a region that is
    /// not home closes once idle (see `derp_home::is_idle`).
    pub(super) last_write: Instant,
}

impl Engine {
    /// `region`'s DERP connection, its task spawned on first use; `None` for a region the map
    /// does not have (or one with only STUN nodes).
    pub(super) fn derp_conn(&mut self, region: i32) -> Option<&mut DerpConn> {
        if !self.derps.contains_key(&region) {
            let r = self.derp_map.regions.get(&region.to_string())?;
            let plain_http = crate::platform::tls::derp_plain_http();
            let node = derp_node(r, plain_http)?;
            let (tx, rx) = mpsc::channel(DERP_QUEUE);
            let up = Arc::new(AtomicBool::new(false));
            tokio::spawn(derp_task(
                region,
                (node.0, node.1, !plain_http),
                self.dns.clone(),
                self.my_private.clone(),
                (self.home_shared.clone(), up.clone()),
                rx,
                self.derp_in_tx.clone(),
            ));
            let last_write = Instant::now();
            self.derps.insert(region, DerpConn { tx, up, last_write });
        }
        self.derps.get_mut(&region)
    }

    /// Queues `pkt` for `dst` through `region` (dropped when that queue is full).
    pub(super) fn send_derp(&mut self, region: i32, dst: NodePublic, pkt: Vec<u8>) {
        if let Some(c) = self.derp_conn(region) {
            // Full queue: drop, as a congested link would.
            let _ = c.tx.try_send((dst, pkt));
            c.last_write = Instant::now();
            self.derp_queued = true;
        }
    }

    /// Whether the home region's connection is up (netcheck keeps a live home unless another
    /// region is clearly faster).
    pub(super) fn home_alive(&self) -> bool {
        self.derps
            .get(&self.home_derp)
            .is_some_and(|c| c.up.load(Ordering::Relaxed))
    }

    /// Makes `home` the home region: every DERP task hears it (the old home's server learns it
    /// is no longer preferred, the new one that it is) and the new home connects now, as Go's
    /// `setNearestDERP` does. A task whose queue is full hears it with its next packet.
    pub(super) fn set_home_derp(&mut self, home: i32) {
        if home == self.home_derp {
            return;
        }
        log::info!("home DERP region={home} was={}", self.home_derp);
        self.home_derp = home;
        self.home_shared.store(home, Ordering::Relaxed);
        for c in self.derps.values() {
            let _ = c.tx.try_send((NodePublic::default(), Vec::new()));
        }
        if let Some(c) = self.derp_conn(home) {
            // Connecting counts as use, so the new home is not idle at once.
            c.last_write = Instant::now();
        }
    }

    /// Closes the DERP connections that are neither home nor written to within
    /// [`derp_home::DERP_INACTIVE`] (Go `cleanStaleDerp`).
    pub(super) fn close_idle_derps(&mut self, now: Instant) {
        let home = self.home_derp;
        self.derps.retain(|&r, c| {
            let idle = derp_home::is_idle(
                r,
                c.last_write.into_std(),
                home,
                now.into_std(),
                derp_home::DERP_INACTIVE,
            );
            if idle {
                log::info!("derp closing idle region={r}");
            }
            !idle
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::derp::tests::node;

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

    /// Two relays on loopback, a DERP task for each (as the engine runs them) and the home
    /// moving from the first to the second: each server hears NotePreferred as the home moves,
    /// over the connection it already has (no reconnect); closing a region's queue (the engine
    /// closing an idle region) ends its connection. Polls with a deadline, no sleeps.
    #[cfg(feature = "relay")]
    #[tokio::test]
    async fn home_moves_between_two_relays_without_reconnecting() {
        use crate::derp::server::DerpServer;
        async fn relay() -> (Arc<DerpServer>, u16) {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            let srv = Arc::new(DerpServer::new(NodePrivate::from_random([9; 32]), None));
            let s = srv.clone();
            tokio::spawn(async move { s.serve(l, None).await });
            (srv, port)
        }
        async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !cond() {
                assert!(Instant::now() < deadline, "timed out waiting for: {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let me = NodePrivate::from_random([1; 32]);
        let key = me.public();
        let home = Arc::new(AtomicI32::new(1));
        let (in_tx, _in_rx) = mpsc::channel(8);
        let mut queues = Vec::new();
        let mut servers = Vec::new();
        for region in [1, 2] {
            let (srv, port) = relay().await;
            let (tx, rx) = mpsc::channel(DERP_QUEUE);
            let up = Arc::new(AtomicBool::new(false));
            tokio::spawn(derp_task(
                region,
                (node("", "127.0.0.1", "none"), port, false),
                DnsCache::default(),
                me.clone(),
                (home.clone(), up),
                rx,
                in_tx.clone(),
            ));
            queues.push(tx);
            servers.push(srv);
        }
        let (s1, s2) = (servers[0].clone(), servers[1].clone());
        eventually("region 1 is home, region 2 connected but not home", || {
            s1.home_client_count() == 1 && s2.is_connected(&key) && s2.home_client_count() == 0
        })
        .await;
        // As the engine's set_home_derp does: the new home, then a wake-up to each task.
        let set_home = |r: i32| {
            home.store(r, Ordering::Relaxed);
            for q in &queues {
                q.try_send((NodePublic::default(), Vec::new())).unwrap();
            }
        };
        set_home(2);
        eventually("the home moved to region 2", || {
            s1.home_client_count() == 0 && s2.home_client_count() == 1
        })
        .await;
        assert!(s1.is_connected(&key), "the old home stays connected while in use");
        assert_eq!((s1.stats().accepted(), s2.stats().accepted()), (1, 1), "no reconnect");
        // Back again: both flip once more.
        set_home(1);
        eventually("the home moved back to region 1", || {
            s1.home_client_count() == 1 && s2.home_client_count() == 0
        })
        .await;
        // The engine closes an idle region by dropping its queue.
        queues.remove(1);
        eventually("region 2's connection closed", || !s2.is_connected(&key)).await;
        assert!(s1.is_connected(&key));
    }
}
