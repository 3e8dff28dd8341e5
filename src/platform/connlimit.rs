//! Connection admission for the exposed listeners (feature `relay`): the coordinator's HTTP
//! listener and the standalone DERP relay each own one [`ConnLimits`], which caps the
//! connections open at once, in total and per source address, and counts what it refused.
//!
//! The accounting is pure (no sockets, no clock): [`ConnLimits::try_acquire`] takes the source
//! IP and returns a [`ConnGuard`] that gives the slot back when dropped, so every way a
//! connection task ends (error, timeout, cancellation) releases it. The shell at the bottom
//! ([`accept`]) runs the accept loop step: refuse over the cap (a `503` with `Retry-After` on
//! plain HTTP, a close under TLS), back off on `EMFILE`.
//!
//! IPv6 sources are counted per /64: one host usually owns a whole /64, so counting single
//! addresses would let it open the per-IP cap once per address. IPv4-mapped IPv6 counts as
//! the IPv4 address.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

/// Default cap on connections open at once per listener. procd starts services with the
/// kernel's default of 1024 open files; staying below it leaves room for the database, the
/// admin and ubus sockets and STUN, so an overload is refused cleanly instead of turning into
/// `EMFILE` on accept. An idle session (TLS state, read buffer, task) costs 10-30 KB, so the
/// cap also keeps a flood under ~25 MB on a 128 MB router.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 768;
/// Default cap per source address (per /64 for IPv6). A node holds one control session and
/// one DERP connection, plus short `/key` and registration requests, so this admits some 30
/// nodes behind one NAT address while one attacker takes at most a twelfth of the total.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 64;
/// Default budget from accept until the TLS handshake, the HTTP request head and the Noise or
/// DERP handshake are done: spec §6.2's DERP handshake deadline, counted from accept.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = crate::derp::frame::HANDSHAKE_TIMEOUT;
/// Seconds a refused client is asked to wait (`Retry-After`).
pub const RETRY_AFTER_SECS: u32 = 5;

/// Limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenLimits {
    /// Connections open at once, in total (`max_connections`).
    pub max_connections: u32,
    /// Connections open at once from one source (`max_connections_per_ip`).
    pub max_connections_per_ip: u32,
    /// Budget from accept until the handshakes are done (`handshake_timeout`).
    pub handshake_timeout: Duration,
}

impl Default for ListenLimits {
    fn default() -> Self {
        ListenLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener is at `max_connections`.
    Total,
    /// The source is at `max_connections_per_ip`.
    PerIp,
}

/// Open connections, in total and per source key.
#[derive(Debug, Default)]
struct Counts {
    total: u32,
    /// Only sources with at least one connection: the map is bounded by `total`.
    per_source: HashMap<IpAddr, u32>,
}

/// The admission state of one listener; shared by its accept loop and connection tasks.
#[derive(Debug)]
pub struct ConnLimits {
    limits: ListenLimits,
    counts: Mutex<Counts>,
    refused_total: AtomicU32,
    refused_per_ip: AtomicU32,
    timed_out: AtomicU32,
}

/// One admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnGuard {
    owner: Arc<ConnLimits>,
    source: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.owner.release(self.source);
    }
}

/// The key a source is counted under: IPv4 as is (also when mapped into IPv6), IPv6 by /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl ConnLimits {
    /// Fresh accounting with `limits`.
    pub fn new(limits: ListenLimits) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            limits,
            counts: Mutex::default(),
            refused_total: AtomicU32::new(0),
            refused_per_ip: AtomicU32::new(0),
            timed_out: AtomicU32::new(0),
        })
    }

    /// The configured limits.
    pub fn limits(&self) -> ListenLimits {
        self.limits
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // A poisoned lock is still consistent: panics abort the process anyway.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `ip`, or says which cap it hit (and counts the refusal).
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refusal> {
        let source = source_key(ip);
        let mut c = self.counts();
        if c.total >= self.limits.max_connections {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Total);
        }
        if c.per_source.get(&source).copied().unwrap_or(0) >= self.limits.max_connections_per_ip {
            self.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::PerIp);
        }
        *c.per_source.entry(source).or_insert(0) += 1;
        c.total += 1;
        Ok(ConnGuard {
            owner: self.clone(),
            source,
        })
    }

    fn release(&self, source: IpAddr) {
        let mut c = self.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_source.remove(&source);
            }
        }
    }

    /// Connections open now.
    pub fn active(&self) -> u32 {
        self.counts().total
    }

    /// Connections open now from `ip` (its /64 for IPv6).
    pub fn active_from(&self, ip: IpAddr) -> u32 {
        self.counts().per_source.get(&source_key(ip)).copied().unwrap_or(0)
    }

    /// Connections refused because the listener was full (wrapping 32-bit counter).
    pub fn refused_total(&self) -> u32 {
        self.refused_total.load(Ordering::Relaxed)
    }

    /// Connections refused because their source was at its cap.
    pub fn refused_per_ip(&self) -> u32 {
        self.refused_per_ip.load(Ordering::Relaxed)
    }

    /// Connections closed because their handshakes outlasted `handshake_timeout`.
    pub fn timed_out(&self) -> u32 {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// Counts a connection closed by the handshake budget.
    pub fn note_timeout(&self) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether the `n`th refusal of a kind is logged: the 1st, 2nd, 4th, 8th… so a flood leaves a
/// handful of lines with the running count instead of one per connection.
pub fn log_refusal(n: u32) -> bool {
    n.is_power_of_two()
}

// ---- shell ----

/// The answer a refused plain-HTTP client gets before the socket is closed.
fn busy_response() -> String {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {RETRY_AFTER_SECS}\r\nContent-Type: text/plain\r\n\
         Content-Length: 12\r\nConnection: close\r\n\r\ntoo busy...\n"
    )
}

/// Accepts the next connection `limits` admits, with its guard. A refused connection never
/// costs a task: what it already sent is drained without waiting, a plain-HTTP one (`tls`
/// false) gets a `503` with `Retry-After` written without waiting (it fits any socket buffer),
/// then it is closed. Accept errors (`EMFILE` and friends) back off 100 ms instead of spinning.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    limits: &Arc<ConnLimits>,
    tls: bool,
    what: &str,
) -> (tokio::net::TcpStream, std::net::SocketAddr, ConnGuard) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::warn!("{what}: accept failed err={e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match limits.try_acquire(peer.ip()) {
            Ok(guard) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, peer, guard);
            }
            Err(why) => {
                let (n, cap) = match why {
                    Refusal::Total => (limits.refused_total(), "max_connections"),
                    Refusal::PerIp => (limits.refused_per_ip(), "max_connections_per_ip"),
                };
                if log_refusal(n) {
                    log::warn!("{what}: connection refused, {cap} reached peer={peer} refused={n}");
                }
                // Reading what already arrived makes a reset (which could discard our answer
                // at the client) less likely when the socket closes.
                let mut sink = [0u8; 2048];
                let _ = tcp.try_read(&mut sink);
                if !tls {
                    let _ = tcp.try_write(busy_response().as_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn lim(total: u32, per_ip: u32) -> Arc<ConnLimits> {
        ConnLimits::new(ListenLimits {
            max_connections: total,
            max_connections_per_ip: per_ip,
            ..ListenLimits::default()
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_ip_cap_then_total_cap_and_release_on_drop() {
        let l = lim(3, 2);
        let a1 = l.try_acquire(ip("192.0.2.1")).unwrap();
        let _a2 = l.try_acquire(ip("192.0.2.1")).unwrap();
        assert_eq!(l.try_acquire(ip("192.0.2.1")).unwrap_err(), Refusal::PerIp);
        let _b1 = l.try_acquire(ip("192.0.2.2")).unwrap();
        assert_eq!(l.try_acquire(ip("192.0.2.3")).unwrap_err(), Refusal::Total);
        assert_eq!((l.refused_per_ip(), l.refused_total()), (1, 1));
        assert_eq!((l.active(), l.active_from(ip("192.0.2.1"))), (3, 2));
        drop(a1);
        assert_eq!((l.active(), l.active_from(ip("192.0.2.1"))), (2, 1));
        // The freed slot is usable again, by anyone under their own cap.
        let _c1 = l.try_acquire(ip("192.0.2.3")).unwrap();
        assert_eq!(l.active_from(ip("192.0.2.3")), 1);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let l = lim(10, 1);
        let _a = l.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(l.try_acquire(ip("2001:db8:1:2::ffff")).unwrap_err(), Refusal::PerIp);
        let _b = l.try_acquire(ip("2001:db8:1:3::1")).unwrap();
        let _c = l.try_acquire(ip("198.51.100.7")).unwrap();
        assert_eq!(l.try_acquire(ip("::ffff:198.51.100.7")).unwrap_err(), Refusal::PerIp);
        assert_eq!(source_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn zero_caps_refuse_everything_and_refusals_are_logged_sparsely() {
        let l = lim(0, 5);
        assert_eq!(l.try_acquire(ip("192.0.2.1")).unwrap_err(), Refusal::Total);
        assert_eq!(l.active(), 0);
        let logged: Vec<u32> = (1..=20).filter(|n| log_refusal(*n)).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16]);
        assert!(busy_response().starts_with("HTTP/1.1 503 "));
        let body = busy_response().split_once("\r\n\r\n").unwrap().1.len();
        assert!(busy_response().contains(&format!("Content-Length: {body}\r\n")));
    }

    #[test]
    fn derp_flags_default_to_these_limits() {
        use argh::FromArgs;
        let d = crate::cli::DerpCmd::from_args(&["derp"], &[]).unwrap();
        assert_eq!(
            (d.max_connections, d.max_connections_per_ip),
            (DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_IP)
        );
        let d = crate::cli::DerpCmd::from_args(&["derp"], &["--max-connections-per-ip", "3"]).unwrap();
        assert_eq!(d.max_connections_per_ip, 3);
    }

    proptest! {
        /// Random acquire/release sequences: counts match a model, never exceed a cap, never
        /// wrap below zero, and end at zero once every guard is dropped.
        #[test]
        fn caps_hold_and_counts_balance(
            total in 0u32..6,
            per_ip in 0u32..4,
            ops in proptest::collection::vec((any::<bool>(), 0u8..4), 0..80),
        ) {
            let l = lim(total, per_ip);
            let mut held: Vec<(u8, ConnGuard)> = Vec::new();
            for (acquire, who) in ops {
                let addr = IpAddr::from([10, 0, 0, who]);
                if acquire {
                    let mine = held.iter().filter(|(w, _)| *w == who).count() as u32;
                    let want_ok = (held.len() as u32) < total && mine < per_ip;
                    match l.try_acquire(addr) {
                        Ok(g) => { prop_assert!(want_ok); held.push((who, g)); }
                        Err(_) => prop_assert!(!want_ok),
                    }
                } else if let Some(i) = held.iter().position(|(w, _)| *w == who) {
                    held.swap_remove(i);
                }
                prop_assert_eq!(l.active(), held.len() as u32);
                prop_assert!(l.active() <= total);
                for w in 0..4u8 {
                    let n = l.active_from(IpAddr::from([10, 0, 0, w]));
                    prop_assert!(n <= per_ip);
                    prop_assert_eq!(n as usize, held.iter().filter(|(x, _)| *x == w).count());
                }
            }
            held.clear();
            prop_assert_eq!(l.active(), 0);
            prop_assert!(l.counts().per_source.is_empty());
        }
    }
}
