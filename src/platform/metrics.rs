//! `tinyscale metrics`: the daemon's state in the Prometheus text exposition format (0.0.4),
//! the role of tailscale's `metrics print` (`usermetric`), written by hand.
//!
//! Built from the `status --json` object, so the CLI and any scraper see the same numbers:
//!
//! ```text
//! # HELP tinyscale_peer_rx_bytes_total Bytes received from the peer over WireGuard.
//! # TYPE tinyscale_peer_rx_bytes_total counter
//! tinyscale_peer_rx_bytes_total{peer="laptop",ip="100.64.0.3"} 1234
//! ```
//!
//! Every family gets `# HELP` and `# TYPE` once, before its samples; label values are escaped
//! (`\\`, `\"`, `\n`). Pure: the caller supplies the status.
//!
//! Also here, for the coordinator's exposition (`coordinator/metrics.rs`): the family
//! [`Writer`], a fixed-bucket [`Histogram`], the parser of a `--metrics-listen` address, and
//! the one shell of this file, [`listen::serve`], which answers `GET /metrics` over HTTP/1
//! (`tinyscale daemon --metrics-listen`, `server serve --metrics-listen`).
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use serde_json::Value;

/// The states a control session can be in (Go `ipn.State` names, as in `BackendState`).
const STATES: [&str; 5] = ["NoState", "NeedsLogin", "Stopped", "Starting", "Running"];

/// Appends `v` as a Prometheus label value: backslash, double quote and newline escaped.
fn escape(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `CamelCase` → `camel_case` (counter names as label values).
fn snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes metric families: [`Writer::family`] opens one, [`Writer::sample`] adds to it.
pub(crate) struct Writer {
    out: String,
    name: &'static str,
}

impl Writer {
    /// An empty exposition.
    pub(crate) fn new() -> Writer {
        Writer {
            out: String::new(),
            name: "",
        }
    }

    /// The text written so far.
    pub(crate) fn finish(self) -> String {
        self.out
    }

    /// Opens family `tinyscale_<name>` of `kind` (`counter`, `gauge`, `histogram`).
    pub(crate) fn family(&mut self, name: &'static str, kind: &str, help: &str) {
        self.name = name;
        let _ = writeln!(
            self.out,
            "# HELP tinyscale_{name} {help}\n# TYPE tinyscale_{name} {kind}"
        );
    }

    /// One sample of the open family.
    pub(crate) fn sample(&mut self, labels: &[(&str, &str)], value: f64) {
        self.sample_of("", labels, value);
    }

    /// One sample of the open family's series `<name><suffix>` (`_bucket`, `_sum`, `_count`).
    fn sample_of(&mut self, suffix: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.out, "tinyscale_{}{suffix}", self.name);
        for (i, (k, v)) in labels.iter().enumerate() {
            self.out.push(if i == 0 { '{' } else { ',' });
            let _ = write!(self.out, "{k}=\"");
            escape(&mut self.out, v);
            self.out.push('"');
        }
        if !labels.is_empty() {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

#[cfg(feature = "coordinator")]
impl Writer {
    /// A whole histogram family: cumulative `_bucket{le}` samples ending with `+Inf`, `_sum`
    /// and `_count`.
    pub(crate) fn histogram(&mut self, name: &'static str, help: &str, h: &HistogramSnapshot) {
        self.family(name, "histogram", help);
        let mut cum = 0;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cum += n;
            self.sample_of("_bucket", &[("le", &bound.to_string())], cum as f64);
        }
        self.sample_of("_bucket", &[("le", "+Inf")], h.count as f64);
        self.sample_of("_sum", &[], h.sum);
        self.sample_of("_count", &[], h.count as f64);
    }
}

/// Most buckets a [`Histogram`] has (besides `+Inf`).
#[cfg(feature = "coordinator")]
const MAX_BUCKETS: usize = 16;

/// A Prometheus histogram with fixed upper bounds (seconds or any unit), shared by the tasks
/// that observe and the one that renders. A `Mutex` rather than atomics: mips32 has no 64-bit
/// atomics and the sum is a float; an observation holds it for a few adds.
#[cfg(feature = "coordinator")]
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: std::sync::Mutex<HistState>,
}

#[cfg(feature = "coordinator")]
#[derive(Debug)]
struct HistState {
    /// Observations per bucket (not cumulative); beyond the last bound only `count` grows.
    counts: [u64; MAX_BUCKETS],
    sum: f64,
    count: u64,
}

/// A copy of a [`Histogram`]'s numbers, for rendering.
#[cfg(feature = "coordinator")]
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds, ascending.
    pub bounds: Vec<f64>,
    /// Observations per bucket, not cumulative.
    pub counts: Vec<u64>,
    /// Sum of all observations.
    pub sum: f64,
    /// Number of observations (including those above the last bound).
    pub count: u64,
}

#[cfg(feature = "coordinator")]
impl Histogram {
    /// A histogram with `bounds` (ascending; at most 16; more are a build-time error when used
    /// in a `static`).
    pub const fn new(bounds: &'static [f64]) -> Histogram {
        assert!(bounds.len() <= MAX_BUCKETS, "too many histogram buckets");
        Histogram {
            bounds,
            state: std::sync::Mutex::new(HistState {
                counts: [0; MAX_BUCKETS],
                sum: 0.0,
                count: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HistState> {
        // A poisoned lock still holds consistent numbers: panics abort the process anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one observation. NaN and negative values count as 0 (durations never are).
    pub fn observe(&self, v: f64) {
        let v = if v.is_nan() { 0.0 } else { v.max(0.0) };
        let mut s = self.state();
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            s.counts[i] += 1;
        }
        s.sum += v;
        s.count += 1;
    }

    /// The numbers now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let s = self.state();
        HistogramSnapshot {
            bounds: self.bounds.to_vec(),
            counts: s.counts[..self.bounds.len()].to_vec(),
            sum: s.sum,
            count: s.count,
        }
    }
}

/// Default port of the coordinator's `metrics_listen_addr` (headscale's 127.0.0.1:9090).
pub const DEFAULT_COORDINATOR_PORT: u16 = 9090;
/// Default port of `tinyscale daemon --metrics-listen` given without one. tailscaled's
/// `--debug` listener has no default; 5252 is the port tailscale's web client uses on the
/// tailnet address, which this daemon does not serve, and it keeps clear of the coordinator's
/// 9090 on a router that runs both.
pub const DEFAULT_DAEMON_PORT: u16 = 5252;

/// Where a metrics listener binds, from `--metrics-listen`/uci: `""` is off (`None`); a bare
/// port (`9090` or `:9090`) is that port on 127.0.0.1 (never every interface by accident, as
/// Go's `:9090` would be); otherwise an `ip:port`. The flag says whether the address is not
/// loopback, which the caller allows (it was given explicitly) but warns about.
pub fn parse_listen(s: &str, default_port: u16) -> Result<Option<(std::net::SocketAddr, bool)>, String> {
    use std::net::{Ipv4Addr, SocketAddr};
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let port = s.strip_prefix(':').unwrap_or(s);
    if port.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = match port {
            "" => default_port,
            p => p.parse().map_err(|_| format!("invalid port {p:?}"))?,
        };
        return Ok(Some((SocketAddr::from((Ipv4Addr::LOCALHOST, port)), false)));
    }
    let a: SocketAddr = s
        .parse()
        .map_err(|_| format!("invalid address {s:?} (use ip:port, [ipv6]:port, :port or empty for off)"))?;
    Ok(Some((a, !a.ip().is_loopback())))
}

/// `tinyscale daemon`'s metrics address: `--metrics-listen` when given (alone or empty: the
/// loopback default), else the uci `metrics_listen` (`uci`); `None` is off.
pub fn daemon_listen(
    flag: Option<&str>,
    uci: Option<std::net::SocketAddr>,
) -> Result<Option<std::net::SocketAddr>, String> {
    match flag {
        Some(f) => {
            let f = if f.trim().is_empty() { ":" } else { f };
            Ok(parse_listen(f, DEFAULT_DAEMON_PORT)
                .map_err(|e| format!("--metrics-listen: {e}"))?
                .map(|(a, _)| a))
        }
        None => Ok(uci),
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// [pure] The exposition for a `status --json` object.
pub fn render(status: &Value) -> String {
    let mut w = Writer::new();
    let state = status["BackendState"].as_str().unwrap_or("NoState");
    w.family(
        "backend_state",
        "gauge",
        "Control session state: 1 for the current one (Running = logged in, map stream up).",
    );
    for s in STATES {
        w.sample(&[("state", s)], f64::from(u8::from(s == state)));
    }
    w.family(
        "data_plane_up",
        "gauge",
        "1 while the data plane (TUN, UDP, WireGuard) runs.",
    );
    w.sample(&[], f64::from(u8::from(status["DataPlane"] == true)));

    let peers = status["Peer"].as_array().map_or(&[][..], Vec::as_slice);
    w.family("peers", "gauge", "Peers in the netmap.");
    w.sample(&[], peers.len() as f64);
    // (name, first tailnet IP) of each peer, the labels of the per-peer families.
    let ids: Vec<(&str, &str)> = peers
        .iter()
        .map(|p| {
            (
                p["HostName"].as_str().unwrap_or(""),
                p["TailscaleIPs"][0].as_str().unwrap_or(""),
            )
        })
        .collect();
    let per_peer = |w: &mut Writer, name, kind, help, f: &dyn Fn(&Value) -> Option<f64>| {
        w.family(name, kind, help);
        for (p, (peer, ip)) in peers.iter().zip(&ids) {
            if let Some(v) = f(p) {
                w.sample(&[("peer", peer), ("ip", ip)], v);
            }
        }
    };
    per_peer(
        &mut w,
        "peer_online",
        "gauge",
        "1 if control reports the peer online.",
        &|p| Some(f64::from(u8::from(p["Online"] == true))),
    );
    per_peer(
        &mut w,
        "peer_rx_bytes_total",
        "counter",
        "Bytes received from the peer over WireGuard.",
        &|p| p.get("RxBytes").map(num),
    );
    per_peer(
        &mut w,
        "peer_tx_bytes_total",
        "counter",
        "Bytes sent to the peer over WireGuard.",
        &|p| p.get("TxBytes").map(num),
    );
    per_peer(
        &mut w,
        "peer_last_handshake_seconds",
        "gauge",
        "Seconds since the last WireGuard handshake with the peer (absent before the first).",
        &|p| p["LastHandshakeSecs"].as_f64(),
    );
    w.family(
        "peer_path",
        "gauge",
        "The path to the peer: 1 on the label in use (direct, derp or none).",
    );
    for (p, (peer, ip)) in peers.iter().zip(&ids) {
        let non_empty = |k: &str| p[k].as_str().is_some_and(|s| !s.is_empty());
        let cur = if non_empty("CurAddr") {
            "direct"
        } else if non_empty("Relay") {
            "derp"
        } else {
            "none"
        };
        for path in ["direct", "derp", "none"] {
            w.sample(
                &[("peer", peer), ("ip", ip), ("path", path)],
                f64::from(u8::from(path == cur)),
            );
        }
    }

    w.family(
        "derp_connected",
        "gauge",
        "1 while the connection to the DERP region is up; home=\"true\" marks the home region.",
    );
    for (region, d) in status["DERP"].as_object().into_iter().flatten() {
        let home = if d["Home"] == true { "true" } else { "false" };
        w.sample(
            &[("region", region), ("home", home)],
            f64::from(u8::from(d["Connected"] == true)),
        );
    }

    // The engine's counters: packets through magicsock, and drops by reason.
    let counters = status["Counters"].as_object();
    let counter = |k: &str| counters.and_then(|c| c.get(k)).map(num);
    w.family(
        "magicsock_rx_packets_total",
        "counter",
        "WireGuard packets received (over UDP and DERP).",
    );
    w.sample(&[], counter("WireGuardRxPackets").unwrap_or(0.0));
    w.family(
        "magicsock_tx_datagrams_total",
        "counter",
        "WireGuard datagrams sent (over UDP and DERP).",
    );
    w.sample(&[], counter("WireGuardTxDatagrams").unwrap_or(0.0));
    w.family(
        "dropped_packets_total",
        "counter",
        "Packets dropped, by reason (the Counters of status --json).",
    );
    for (k, v) in counters.into_iter().flatten() {
        if k != "WireGuardRxPackets" && k != "WireGuardTxDatagrams" {
            w.sample(&[("reason", &snake(k))], num(v));
        }
    }
    w.finish()
}

/// The metrics listener shell: `GET /metrics` over HTTP/1, one connection at a time.
pub mod listen {
    use std::{future::Future, net::SocketAddr, time::Duration};

    use tokio::net::TcpListener;

    use crate::wire::http1;

    /// Budget for reading one request and writing its answer: a scraper is quick, and one
    /// connection at a time keeps a stuck client from piling up tasks.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

    /// The exposition format's content type (text 0.0.4).
    pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

    /// Binds `addr`.
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
        TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))
    }

    /// Answers `GET /metrics` with `body()` forever; other paths get 404, other methods 405.
    pub async fn serve<F, Fut>(listener: TcpListener, body: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = String>,
    {
        loop {
            let (mut sock, _) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("metrics: accept failed err={e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            };
            let answer = async {
                let (head, _) = http1::read_request_head(&mut sock).await.ok()?;
                let (status, text) = match (head.method.as_str(), head.path()) {
                    ("GET", "/metrics") => (200, body().await),
                    (_, "/metrics") => (405, "GET only\n".to_string()),
                    _ => (404, "not found: try /metrics\n".to_string()),
                };
                let ct = if status == 200 { CONTENT_TYPE } else { "text/plain" };
                http1::write_response(&mut sock, status, ct, text.as_bytes()).await.ok()
            };
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer).await;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::json;

    use super::*;

    /// One parsed sample: metric name, labels, value.
    pub(crate) type Sample = (String, BTreeMap<String, String>, f64);

    /// A strict reader of the text exposition format: `# HELP`/`# TYPE` lines (once per
    /// family, TYPE before its samples), and samples `name{k="v",…} value` with escaped label
    /// values. Any other line, an undeclared family or a repeated series is an error.
    /// Histogram series (`_bucket` with `le`, `_sum`, `_count`) belong to their family.
    pub(crate) fn parse(text: &str) -> Result<Vec<Sample>, String> {
        let mut types = BTreeMap::new();
        let mut helps = BTreeSet::new();
        let mut series = BTreeSet::new();
        let mut out = Vec::new();
        let is_name = |n: &str| {
            !n.is_empty()
                && !n.starts_with(|c: char| c.is_ascii_digit())
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        for (no, line) in text.lines().enumerate() {
            let err = |what: &str| format!("line {}: {what}: {line:?}", no + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').ok_or_else(|| err("HELP without text"))?;
                if !is_name(name) || help.is_empty() || !helps.insert(name.to_string()) {
                    return Err(err("bad or repeated HELP"));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| err("TYPE without kind"))?;
                if !is_name(name) || !matches!(kind, "counter" | "gauge" | "histogram") {
                    return Err(err("bad TYPE"));
                }
                if types.insert(name.to_string(), kind.to_string()).is_some() {
                    return Err(err("repeated TYPE"));
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).ok_or_else(|| err("no value"))?;
            let name = &line[..name_end];
            if !is_name(name) {
                return Err(err("bad metric name"));
            }
            let hist_base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| types.get(*b).is_some_and(|k| k == "histogram"));
            let kind = match hist_base {
                Some(_) => "histogram",
                None => types.get(name).ok_or_else(|| err("sample before its TYPE"))?,
            };
            if kind == "histogram" && hist_base.is_none() {
                return Err(err("histogram sample without _bucket/_sum/_count"));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(err("counter without _total"));
            }
            let mut labels = BTreeMap::new();
            let mut rest = &line[name_end..];
            if let Some(body) = rest.strip_prefix('{') {
                let mut chars = body.char_indices().peekable();
                loop {
                    let (start, _) = *chars.peek().ok_or_else(|| err("unterminated labels"))?;
                    let eq = body[start..].find('=').ok_or_else(|| err("label without ="))? + start;
                    let key = &body[start..eq];
                    if !is_name(key) || !body[eq + 1..].starts_with('"') {
                        return Err(err("bad label"));
                    }
                    while chars.peek().is_some_and(|(i, _)| *i <= eq + 1) {
                        chars.next();
                    }
                    let mut val = String::new();
                    loop {
                        match chars.next().ok_or_else(|| err("unterminated value"))?.1 {
                            '"' => break,
                            '\\' => match chars.next().ok_or_else(|| err("dangling escape"))?.1 {
                                '\\' => val.push('\\'),
                                '"' => val.push('"'),
                                'n' => val.push('\n'),
                                _ => return Err(err("bad escape")),
                            },
                            '\n' => return Err(err("raw newline")),
                            c => val.push(c),
                        }
                    }
                    if labels.insert(key.to_string(), val).is_some() {
                        return Err(err("repeated label"));
                    }
                    match chars.next().ok_or_else(|| err("unterminated labels"))? {
                        (_, ',') => {}
                        (i, '}') => {
                            rest = &body[i + 1..];
                            break;
                        }
                        _ => return Err(err("expected , or }")),
                    }
                }
            }
            let value = rest.strip_prefix(' ').ok_or_else(|| err("no space before value"))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().map_err(|_| err("value is not a number"))?,
            };
            if name.ends_with("_bucket") && hist_base.is_some() && !labels.contains_key("le") {
                return Err(err("bucket without le"));
            }
            if !series.insert(format!("{name}{labels:?}")) {
                return Err(err("repeated series"));
            }
            out.push((name.to_string(), labels, value));
        }
        for name in types.keys() {
            if !helps.contains(name) {
                return Err(format!("{name} has a TYPE but no HELP"));
            }
        }
        Ok(out)
    }

    pub(crate) fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(v)))
            .map(|s| s.2)
    }

    fn status() -> Value {
        json!({
            "BackendState": "Running",
            "DataPlane": true,
            "Peer": [
                {"HostName": "laptop", "TailscaleIPs": ["100.64.0.3", "fd7a:115c:a1e0::3"], "Online": true,
                 "CurAddr": "192.0.2.7:41641", "Relay": "", "RxBytes": 1234, "TxBytes": 99, "LastHandshakeSecs": 17},
                {"HostName": "odd \"name\"\\x\ny", "TailscaleIPs": ["100.64.0.4"], "Online": false,
                 "CurAddr": "", "Relay": "fra", "RxBytes": 0, "TxBytes": 5, "LastHandshakeSecs": null},
                {"HostName": "never", "TailscaleIPs": ["100.64.0.5"], "CurAddr": "", "Relay": ""},
            ],
            "DERP": {"1": {"Connected": true, "Home": true}, "7": {"Connected": false, "Home": false}},
            "Counters": {"WireGuardRxPackets": 40, "WireGuardTxDatagrams": 41, "DiscoMalformed": 2,
                         "FilterDropNoRule": 3},
        })
    }

    #[test]
    fn exposition_parses_and_carries_the_status() {
        let text = render(&status());
        let s = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(get(&s, "tinyscale_backend_state", &[("state", "Running")]), Some(1.0));
        assert_eq!(
            get(&s, "tinyscale_backend_state", &[("state", "NeedsLogin")]),
            Some(0.0)
        );
        assert_eq!(get(&s, "tinyscale_data_plane_up", &[]), Some(1.0));
        assert_eq!(get(&s, "tinyscale_peers", &[]), Some(3.0));
        let laptop = [("peer", "laptop"), ("ip", "100.64.0.3")];
        assert_eq!(get(&s, "tinyscale_peer_rx_bytes_total", &laptop), Some(1234.0));
        assert_eq!(get(&s, "tinyscale_peer_tx_bytes_total", &laptop), Some(99.0));
        assert_eq!(get(&s, "tinyscale_peer_last_handshake_seconds", &laptop), Some(17.0));
        assert_eq!(get(&s, "tinyscale_peer_online", &laptop), Some(1.0));
        let path = |peer: &str, p: &str| get(&s, "tinyscale_peer_path", &[("peer", peer), ("path", p)]);
        assert_eq!(
            (path("laptop", "direct"), path("laptop", "derp")),
            (Some(1.0), Some(0.0))
        );
        // The escaped name comes back intact, and its path is DERP.
        let odd = "odd \"name\"\\x\ny";
        assert_eq!((path(odd, "derp"), path(odd, "direct")), (Some(1.0), Some(0.0)));
        assert_eq!(path("never", "none"), Some(1.0));
        // No handshake yet: no sample rather than a made-up age.
        assert_eq!(get(&s, "tinyscale_peer_last_handshake_seconds", &[("peer", odd)]), None);
        assert_eq!(get(&s, "tinyscale_peer_rx_bytes_total", &[("peer", "never")]), None);
        assert_eq!(
            get(&s, "tinyscale_derp_connected", &[("region", "1"), ("home", "true")]),
            Some(1.0)
        );
        assert_eq!(get(&s, "tinyscale_derp_connected", &[("region", "7")]), Some(0.0));
        assert_eq!(get(&s, "tinyscale_magicsock_rx_packets_total", &[]), Some(40.0));
        assert_eq!(get(&s, "tinyscale_magicsock_tx_datagrams_total", &[]), Some(41.0));
        let drop = |r: &str| get(&s, "tinyscale_dropped_packets_total", &[("reason", r)]);
        assert_eq!(drop("disco_malformed"), Some(2.0));
        assert_eq!(drop("filter_drop_no_rule"), Some(3.0));
        assert_eq!(drop("wire_guard_rx_packets"), None, "traffic is not a drop");
    }

    #[test]
    fn a_stopped_daemon_still_gives_a_valid_exposition() {
        let text = render(&json!({"BackendState": "NeedsLogin", "Peer": [], "DataPlane": false}));
        let s = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            get(&s, "tinyscale_backend_state", &[("state", "NeedsLogin")]),
            Some(1.0)
        );
        assert_eq!(get(&s, "tinyscale_data_plane_up", &[]), Some(0.0));
        assert_eq!(get(&s, "tinyscale_peers", &[]), Some(0.0));
    }

    #[test]
    fn the_parser_rejects_what_prometheus_would() {
        for bad in [
            "tinyscale_x 1",                                                            // no TYPE
            "# TYPE tinyscale_x gauge\n# HELP tinyscale_x h\ntinyscale_x{a=\"b} 1",     // unterminated
            "# TYPE tinyscale_x gauge\n# HELP tinyscale_x h\ntinyscale_x{a=\"\\q\"} 1", // bad escape
            "# TYPE tinyscale_x gauge\n# HELP tinyscale_x h\ntinyscale_x one",
            "# TYPE tinyscale_x gauge\n# HELP tinyscale_x h\ntinyscale_x 1\ntinyscale_x 2",
            "# TYPE tinyscale_x counter\n# HELP tinyscale_x h\ntinyscale_x 1",
            "# TYPE tinyscale_x gauge\ntinyscale_x 1", // no HELP
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listen_addresses() {
        let lo = |p: u16| Some((std::net::SocketAddr::from(([127, 0, 0, 1], p)), false));
        assert_eq!(parse_listen("", 9090), Ok(None), "empty is off");
        assert_eq!(parse_listen("  ", 9090), Ok(None));
        assert_eq!(parse_listen(":", 9090), Ok(lo(9090)), "no port: the default");
        assert_eq!(
            parse_listen(":9100", 9090),
            Ok(lo(9100)),
            "a bare port stays on loopback"
        );
        assert_eq!(parse_listen("9100", 9090), Ok(lo(9100)));
        assert_eq!(parse_listen("127.0.0.1:9100", 9090), Ok(lo(9100)));
        assert_eq!(
            parse_listen("[::1]:9100", 9090),
            Ok(Some(("[::1]:9100".parse().unwrap(), false)))
        );
        assert_eq!(
            parse_listen("0.0.0.0:9100", 9090),
            Ok(Some(("0.0.0.0:9100".parse().unwrap(), true))),
            "explicit: allowed, flagged for a warning"
        );
        for bad in ["99999", ":x", "localhost:9090", "1.2.3.4", "[::1]"] {
            assert!(parse_listen(bad, 9090).is_err(), "{bad}");
        }
    }

    #[test]
    fn daemon_listen_flag_wins_and_alone_means_the_default() {
        let uci = Some("127.0.0.1:9999".parse().unwrap());
        let lo = Some("127.0.0.1:5252".parse().unwrap());
        assert_eq!(daemon_listen(None, None), Ok(None), "off by default");
        assert_eq!(daemon_listen(None, uci), Ok(uci));
        assert_eq!(daemon_listen(Some(""), uci), Ok(lo), "--metrics-listen= alone");
        assert_eq!(
            daemon_listen(Some(":7000"), uci),
            Ok(Some("127.0.0.1:7000".parse().unwrap()))
        );
        assert!(daemon_listen(Some("nope"), None)
            .unwrap_err()
            .starts_with("--metrics-listen: "));
    }

    #[cfg(feature = "coordinator")]
    #[test]
    fn histogram_buckets_sum_and_exposition() {
        static BOUNDS: [f64; 3] = [0.01, 0.1, 1.0];
        let h = Histogram::new(&BOUNDS);
        for v in [0.005, 0.01, 0.05, 0.5, 7.0, f64::NAN, -1.0] {
            h.observe(v);
        }
        let snap = h.snapshot();
        // 0.005, 0.01 (bound inclusive), NaN and -1 (as 0) | 0.05 | 0.5 | 7 above every bound.
        assert_eq!(snap.counts, vec![4, 1, 1]);
        assert_eq!(snap.count, 7);
        assert!((snap.sum - 7.565).abs() < 1e-9, "{}", snap.sum);
        let mut w = Writer::new();
        w.histogram("x_seconds", "A test histogram.", &snap);
        let text = w.finish();
        let s = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let bucket = |le: &str| get(&s, "tinyscale_x_seconds_bucket", &[("le", le)]);
        assert_eq!(
            (bucket("0.01"), bucket("0.1"), bucket("1"), bucket("+Inf")),
            (Some(4.0), Some(5.0), Some(6.0), Some(7.0)),
            "cumulative"
        );
        assert_eq!(get(&s, "tinyscale_x_seconds_count", &[]), Some(7.0));
        assert_eq!(get(&s, "tinyscale_x_seconds_sum", &[]), Some(snap.sum));
    }
}
