//! The coordinator's Prometheus metrics: `GET /metrics` on `metrics_listen_addr` (uci option of
//! `config server 'main'`, `server serve --metrics-listen`; default 127.0.0.1:9090 as
//! headscale's, empty turns it off).
//!
//! Counters live where they happen and are plain atomics: [`Metrics`] (map streams,
//! registrations, map fan-out latency) in the [`super::server::Coordinator`], [`STORE_WRITES`]
//! process-wide (the store has no handle on the coordinator), the listener's refusals in
//! [`crate::platform::connlimit::ConnLimits`], the relay's in [`crate::derp::server::DerpStats`], STUN's in
//! [`crate::wire::stun::StunStats`]. The shell gathers them into a [`Snapshot`] and [`render`] (pure)
//! writes the text. Names follow headscale (`node_registrations_total`) and Go tailscale's
//! derper (`derp_bytes_received`, `derp_packets_dropped` by reason) under our `tinyscale_`
//! prefix.
//!
//! The fan-out histogram measures, per published change, the time from `publish` to the
//! moment the last map stream that received it has handled it (written its delta, or found
//! nothing to send): [`FanOutTimer`] travels with the change through the broadcast channel,
//! and the channel drops its last copy when the last receiver is done with it.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Instant,
};

use crate::platform::metrics::{Histogram, HistogramSnapshot, Writer};

/// Fan-out buckets, seconds: a small tailnet fans out in well under a millisecond; a slow
/// router with many nodes or a stuck stream shows up in the upper ones.
static FANOUT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// SQLite write buckets, seconds: a WAL commit with `synchronous=FULL` is one fsync, from
/// sub-millisecond on tmpfs to tens of milliseconds on a router's flash.
static STORE_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0,
];

/// SQLite write latency (one statement or transaction, lock wait included), for the whole
/// process: a process runs one coordinator.
pub static STORE_WRITES: Histogram = Histogram::new(&STORE_BUCKETS);

/// Times one store transaction into [`STORE_WRITES`] when dropped; `let _t =
/// StoreWriteTimer::start();` at the top of the writer thread's commit.
pub struct StoreWriteTimer(Instant);

impl StoreWriteTimer {
    /// Starts timing now.
    pub fn start() -> StoreWriteTimer {
        StoreWriteTimer(Instant::now())
    }
}

impl Drop for StoreWriteTimer {
    fn drop(&mut self) {
        STORE_WRITES.observe(self.0.elapsed().as_secs_f64());
    }
}

/// How a `/machine/register` request ended (label `status` of
/// `tinyscale_node_registrations_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// The node is authorized (pre-auth key, known node, approved interactive login).
    Success,
    /// Answered with an auth URL or a not-yet-authorized reply.
    NeedsAuth,
    /// Refused: bad, used or expired key, unknown user…
    Unauthorized,
    /// Any other failure (invalid request, store error).
    Error,
}

const REGISTRATION_LABELS: [&str; 4] = ["success", "needs_auth", "unauthorized", "error"];

/// A request the per-source rate limit applies to (label `request` of
/// `tinyscale_requests_rate_limited_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// `GET /key`.
    Key,
    /// The `/ts2021` upgrade.
    Ts2021,
    /// `/machine/register` inside a Noise session.
    Register,
}

const LIMITED_LABELS: [&str; 3] = ["key", "ts2021", "register"];

/// The coordinator's own counters.
#[derive(Debug)]
pub struct Metrics {
    map_streams: AtomicU32,
    registrations: [AtomicU32; 4],
    rate_limited: [AtomicU32; 3],
    /// Map fan-out latency, seconds.
    pub fanout: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            map_streams: AtomicU32::new(0),
            registrations: Default::default(),
            rate_limited: Default::default(),
            fanout: Histogram::new(&FANOUT_BUCKETS),
        }
    }
}

impl Metrics {
    /// Counts a map stream as open until the guard is dropped.
    pub fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        self.map_streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    /// Map streams open now.
    pub fn map_streams(&self) -> u32 {
        self.map_streams.load(Ordering::Relaxed)
    }

    /// Counts one registration outcome.
    pub fn note_registration(&self, r: Registration) {
        self.registrations[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Registrations with outcome `r` so far.
    pub fn registrations(&self, r: Registration) -> u32 {
        self.registrations[r as usize].load(Ordering::Relaxed)
    }

    /// Counts one request refused by the rate limit.
    pub fn note_rate_limited(&self, r: Limited) {
        self.rate_limited[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests of kind `r` refused by the rate limit so far.
    pub fn rate_limited(&self, r: Limited) -> u32 {
        self.rate_limited[r as usize].load(Ordering::Relaxed)
    }
}

/// One open map stream; dropping it closes the count.
#[derive(Debug)]
pub struct StreamGuard(Arc<Metrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.map_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Rides with one published change; its drop (the last stream done with the change) records
/// the fan-out latency.
#[derive(Debug)]
pub struct FanOutTimer {
    published: Instant,
    metrics: Arc<Metrics>,
}

impl FanOutTimer {
    /// Starts timing a change published now.
    pub fn start(metrics: Arc<Metrics>) -> FanOutTimer {
        FanOutTimer {
            published: Instant::now(),
            metrics,
        }
    }
}

impl Drop for FanOutTimer {
    fn drop(&mut self) {
        self.metrics.fanout.observe(self.published.elapsed().as_secs_f64());
    }
}

/// The embedded relay's numbers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DerpSnapshot {
    /// Clients connected now.
    pub clients: u64,
    /// Packet bytes received from clients (SendPacket payloads).
    pub bytes_received: u64,
    /// Packet bytes queued to destinations.
    pub bytes_sent: u64,
    /// Packets dropped because the destination's queue was full.
    pub dropped_queue_full: u64,
    /// Packets dropped because the destination is not connected here.
    pub dropped_unknown_dest: u64,
}

/// Every number of one exposition, gathered by the shell.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Registered nodes.
    pub nodes: u64,
    /// Nodes with a map stream open.
    pub nodes_online: u64,
    /// Map streams open.
    pub map_streams: u64,
    /// Registrations by outcome, in [`Registration`] order.
    pub registrations: [u64; 4],
    /// Map fan-out latency.
    pub fanout: HistogramSnapshot,
    /// SQLite write latency.
    pub store_writes: HistogramSnapshot,
    /// The embedded relay, when enabled.
    pub derp: Option<DerpSnapshot>,
    /// STUN binding requests answered and datagrams dropped, when the STUN listener runs.
    pub stun: Option<(u64, u64)>,
    /// Listener refusals: over `max_connections`, over `max_connections_per_ip`, handshake
    /// timeouts; and pending registrations evicted because the table was full.
    pub refused: [u64; 4],
    /// Requests refused by the per-source rate limit, in [`Limited`] order.
    pub rate_limited: [u64; 3],
}

const REFUSAL_LABELS: [&str; 4] = [
    "max_connections",
    "max_connections_per_ip",
    "handshake_timeout",
    "pending_registrations",
];

/// [pure] The exposition text of `s`.
pub fn render(s: &Snapshot) -> String {
    let mut w = Writer::new();
    w.family("nodes", "gauge", "Registered nodes.");
    w.sample(&[], s.nodes as f64);
    w.family("nodes_online", "gauge", "Nodes with an open map stream.");
    w.sample(&[], s.nodes_online as f64);
    w.family("map_streams", "gauge", "Map streams (long-poll sessions) open.");
    w.sample(&[], s.map_streams as f64);
    w.family(
        "node_registrations_total",
        "counter",
        "Registration requests by outcome (headscale's node_registrations_total).",
    );
    for (label, n) in REGISTRATION_LABELS.iter().zip(s.registrations) {
        w.sample(&[("status", label)], n as f64);
    }
    w.histogram(
        "map_fanout_seconds",
        "Time from a change to the last map stream having handled it.",
        &s.fanout,
    );
    w.histogram(
        "store_write_seconds",
        "SQLite write latency (one statement or transaction).",
        &s.store_writes,
    );
    w.family(
        "connections_refused_total",
        "counter",
        "Connections refused or closed by the listener's limits, and pending registrations evicted, by reason.",
    );
    for (label, n) in REFUSAL_LABELS.iter().zip(s.refused) {
        w.sample(&[("reason", label)], n as f64);
    }
    w.family(
        "requests_rate_limited_total",
        "counter",
        "Requests refused with 429 by the per-source rate limit (rate_limit, rate_burst), by request.",
    );
    for (label, n) in LIMITED_LABELS.iter().zip(s.rate_limited) {
        w.sample(&[("request", label)], n as f64);
    }
    if let Some(d) = &s.derp {
        w.family(
            "derp_current_connections",
            "gauge",
            "Clients connected to the embedded DERP relay.",
        );
        w.sample(&[], d.clients as f64);
        w.family(
            "derp_bytes_received_total",
            "counter",
            "Packet bytes the relay received from clients.",
        );
        w.sample(&[], d.bytes_received as f64);
        w.family(
            "derp_bytes_sent_total",
            "counter",
            "Packet bytes the relay queued to destinations.",
        );
        w.sample(&[], d.bytes_sent as f64);
        w.family(
            "derp_packets_dropped_total",
            "counter",
            "Packets the relay dropped, by reason.",
        );
        w.sample(&[("reason", "queue_full")], d.dropped_queue_full as f64);
        w.sample(&[("reason", "unknown_dest")], d.dropped_unknown_dest as f64);
    }
    if let Some((served, dropped)) = s.stun {
        w.family(
            "stun_requests_total",
            "counter",
            "STUN datagrams: binding requests answered, or dropped (not a request, send failed).",
        );
        w.sample(&[("result", "served")], served as f64);
        w.sample(&[("result", "dropped")], dropped as f64);
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::metrics::tests::{get, parse};

    #[test]
    fn exposition_parses_and_carries_every_family() {
        let m = Arc::new(Metrics::default());
        m.note_registration(Registration::Success);
        m.note_registration(Registration::Success);
        m.note_registration(Registration::Unauthorized);
        m.note_rate_limited(Limited::Ts2021);
        m.note_rate_limited(Limited::Register);
        m.note_rate_limited(Limited::Register);
        let g1 = m.stream_opened();
        let g2 = m.stream_opened();
        drop(g1);
        m.fanout.observe(0.002);
        let s = Snapshot {
            nodes: 5,
            nodes_online: 2,
            map_streams: u64::from(m.map_streams()),
            registrations: [
                Registration::Success,
                Registration::NeedsAuth,
                Registration::Unauthorized,
                Registration::Error,
            ]
            .map(|r| u64::from(m.registrations(r))),
            fanout: m.fanout.snapshot(),
            store_writes: Histogram::new(&STORE_BUCKETS).snapshot(),
            derp: Some(DerpSnapshot {
                clients: 3,
                bytes_received: 5_000_000_000,
                bytes_sent: 4_000,
                dropped_queue_full: 1,
                dropped_unknown_dest: 2,
            }),
            stun: Some((7, 1)),
            refused: [1, 2, 3, 4],
            rate_limited: [Limited::Key, Limited::Ts2021, Limited::Register].map(|r| u64::from(m.rate_limited(r))),
        };
        let text = render(&s);
        let p = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(get(&p, "tinyscale_nodes", &[]), Some(5.0));
        assert_eq!(get(&p, "tinyscale_nodes_online", &[]), Some(2.0));
        assert_eq!(get(&p, "tinyscale_map_streams", &[]), Some(1.0), "one guard dropped");
        drop(g2);
        assert_eq!(m.map_streams(), 0);
        let reg = |st: &str| get(&p, "tinyscale_node_registrations_total", &[("status", st)]);
        assert_eq!(
            (reg("success"), reg("unauthorized"), reg("error")),
            (Some(2.0), Some(1.0), Some(0.0))
        );
        assert_eq!(get(&p, "tinyscale_map_fanout_seconds_count", &[]), Some(1.0));
        assert_eq!(
            get(&p, "tinyscale_map_fanout_seconds_bucket", &[("le", "0.0025")]),
            Some(1.0)
        );
        assert_eq!(
            get(&p, "tinyscale_map_fanout_seconds_bucket", &[("le", "0.001")]),
            Some(0.0)
        );
        assert_eq!(get(&p, "tinyscale_store_write_seconds_count", &[]), Some(0.0));
        let refused = |r: &str| get(&p, "tinyscale_connections_refused_total", &[("reason", r)]);
        assert_eq!(refused("max_connections_per_ip"), Some(2.0));
        assert_eq!(refused("pending_registrations"), Some(4.0));
        let limited = |r: &str| get(&p, "tinyscale_requests_rate_limited_total", &[("request", r)]);
        assert_eq!(
            (limited("key"), limited("ts2021"), limited("register")),
            (Some(0.0), Some(1.0), Some(2.0))
        );
        assert_eq!(get(&p, "tinyscale_derp_current_connections", &[]), Some(3.0));
        assert_eq!(
            get(&p, "tinyscale_derp_bytes_received_total", &[]),
            Some(5e9),
            "past 32 bits"
        );
        assert_eq!(
            get(
                &p,
                "tinyscale_derp_packets_dropped_total",
                &[("reason", "unknown_dest")]
            ),
            Some(2.0)
        );
        assert_eq!(
            get(&p, "tinyscale_stun_requests_total", &[("result", "served")]),
            Some(7.0)
        );
    }

    #[test]
    fn without_relay_its_families_are_absent() {
        let text = render(&Snapshot::default());
        let p = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(get(&p, "tinyscale_nodes", &[]), Some(0.0));
        assert!(!text.contains("derp_") && !text.contains("stun_"), "{text}");
    }

    #[test]
    fn fan_out_is_recorded_when_the_last_copy_is_dropped() {
        let m = Arc::new(Metrics::default());
        let t = Arc::new(FanOutTimer::start(m.clone()));
        let (a, b) = (t.clone(), t.clone());
        drop(t);
        drop(a);
        assert_eq!(m.fanout.snapshot().count, 0, "a stream still holds the change");
        drop(b);
        assert_eq!(m.fanout.snapshot().count, 1);
    }

    #[test]
    fn store_write_timer_observes_on_drop() {
        let before = STORE_WRITES.snapshot().count;
        drop(StoreWriteTimer::start());
        // Other tests write to the store in parallel: at least ours counted.
        assert!(STORE_WRITES.snapshot().count > before);
    }
}
