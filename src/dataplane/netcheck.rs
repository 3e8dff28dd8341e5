//! netcheck: what the network between us and the DERP servers looks like. Is UDP usable, what
//! address do we have on the outside, does the NAT map us differently per destination (a "hard"
//! NAT, where direct paths rarely work), and how far away each DERP region is (which picks our
//! home region).
//!
//! Mirrors the facts of tailscale `net/netcheck/netcheck.go` (`makeProbePlanInitial`,
//! `probeWouldHelp`, `addNodeLatency`, `addReportHistoryAndSetPreferredDERP`, `nodeAddrPort`)
//! and the `DERPLatency` keys of `wgengine/magicsock/magicsock.go` (spec §8), not its code.
//!
//! ```text
//! ProbePlan::new(derp map)      per region, up to 3 tries 100 ms apart, rotating over its STUN
//!                               nodes (STUNPort != -1; 0 means 3478), IPv4 and IPv6 targets
//! ReportState::poll_probe(now)  next due probe that would still tell us something
//!   shell: resolve the host if the probe has no IP, send stun::binding_request(random tx)
//!          from the magicsock socket, then note_sent(tx, probe, dst, now)
//! ReportState::handle_stun      binding response -> latency, mapped address, mapping check
//! ReportState::finish           Report, with the home region chosen with hysteresis
//! finish_both(v4, v6)           the same over two states run side by side, one per socket family
//! ```
//!
//! A shell that resolves DERP host names ahead of time (from a cache) fills the plan with
//! `ProbePlan::with_resolved`; `"none"` in a node's `IPv4`/`IPv6` keeps that family unprobed
//! ([`crate::derp::node_addr`]).
//!
//! The core is pure: the caller supplies `now`, transaction ids and DNS answers. Not mirrored:
//! HTTPS and ICMP latency fallbacks when UDP is blocked, incremental plans from the last report,
//! report history, port mapping probes and `HomeParams.RegionScore` (our `DerpMap` does not
//! carry it). The [`run`] shell at the bottom (after `// ---- shell ----`) drives one report
//! from a tokio UDP socket.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use serde_json::{json, Map, Value};

use crate::{
    derp::{self, NodeAddr},
    wire::stun::{self, TxId},
    wire::tailcfg::{DerpMap, DerpNode},
};

/// Go `stunProbeTimeout` (3 s): how long STUN probing may take before UDP is deemed blocked; the
/// `timeout` to give [`run`] (Go's whole report budget, `ReportTimeout`, is 5 s).
pub const STUN_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Timing and tuning; `Default` gives Go's production values, tests shrink them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// Go `defaultInitialRetransmitTime` (100 ms): the gap between tries to one region.
    pub retransmit_interval: Duration,
    /// Tries per region (3 in Go's initial plan); later tries are skipped once answered.
    pub tries_per_region: usize,
    /// Go `enoughRegions` (3): once this many regions answered, wait at most twice the slowest
    /// latency for the rest instead of the full timeout.
    pub enough_regions: usize,
    /// Go `preferredDERPAbsoluteDiff` (10 ms): a new home region must be at least this much
    /// faster than the current one (and a third faster), so near-equal regions do not flap.
    pub preferred_derp_absolute_diff: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            retransmit_interval: Duration::from_millis(100),
            tries_per_region: 3,
            enough_regions: 3,
            preferred_derp_absolute_diff: Duration::from_millis(10),
        }
    }
}

/// One STUN binding request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The DERP region measured.
    pub region_id: i32,
    /// The DERP node's `Name`.
    pub node: String,
    /// The node's `HostName`, for the shell to resolve when `ip` is `None`.
    pub host: String,
    /// The target IP, when the DERP map gives one (`IPv4`/`IPv6`, or an IP literal `HostName`).
    pub ip: Option<IpAddr>,
    /// The STUN port.
    pub port: u16,
    /// An IPv6 probe (send from the IPv6 socket; resolve AAAA).
    pub ipv6: bool,
    /// When to send it, after the start of the run.
    pub delay: Duration,
}

impl Probe {
    /// The target address, if no DNS lookup is needed.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.ip.map(|ip| SocketAddr::new(ip, self.port))
    }
}

/// Which STUN requests to send for one report (Go `probePlan`), in send order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbePlan {
    /// The probes, ordered by `delay`, then region.
    pub probes: Vec<Probe>,
    /// The current home region (0 = none), kept unless another is clearly better.
    pub previous_home: i32,
    /// Whether the current home's DERP connection is alive (Go: a frame heard recently); then
    /// it stays home even if its STUN probe got no answer.
    pub home_alive: bool,
    /// Tuning.
    pub timing: Timing,
}

impl ProbePlan {
    /// Plans a full report over every region of `derp_map` except `NoMeasureNoHome` ones (Go
    /// `makeProbePlanInitial`).
    pub fn new(derp_map: &DerpMap, timing: Timing) -> ProbePlan {
        let mut regions: Vec<_> = derp_map
            .regions
            .iter()
            // The map key is the id too; trust the field, fall back to the key.
            .map(|(key, r)| (if r.region_id != 0 { r.region_id } else { parse_id(key) }, r))
            .filter(|(id, r)| *id > 0 && !r.no_measure_no_home)
            .collect();
        regions.sort_by_key(|(id, _)| *id);
        let mut probes = Vec::new();
        for (region_id, region) in regions {
            let nodes: Vec<(&DerpNode, u16)> = region
                .nodes
                .iter()
                .filter_map(|n| stun_port(n).map(|p| (n, p)))
                .collect();
            if nodes.is_empty() {
                continue;
            }
            for attempt in 0..timing.tries_per_region {
                let (node, port) = nodes[attempt % nodes.len()];
                let delay = timing.retransmit_interval * u32::try_from(attempt).unwrap_or(u32::MAX);
                for ipv6 in [false, true] {
                    if let Some(ip) = node_target(node, ipv6) {
                        probes.push(Probe {
                            region_id,
                            node: node.name.clone(),
                            host: node.host_name.clone(),
                            ip,
                            port,
                            ipv6,
                            delay,
                        });
                    }
                }
            }
        }
        probes.sort_by_key(|p| p.delay);
        ProbePlan {
            probes,
            previous_home: 0,
            home_alive: false,
            timing,
        }
    }

    /// Fills in the target of every probe that needs DNS from `answers(host)` (what the host
    /// name resolved to, any families), taking the first address of the probe's family. Probes
    /// still without a target are dropped: their family has no answer (yet), so sending is
    /// impossible and waiting for them would only delay the report. For a shell that resolves
    /// ahead of time from a cache (the engine); [`run`] resolves as it goes instead.
    pub fn with_resolved(mut self, answers: impl Fn(&str) -> Vec<IpAddr>) -> ProbePlan {
        for p in self.probes.iter_mut().filter(|p| p.ip.is_none()) {
            p.ip = answers(&p.host).into_iter().find(|ip| ip.is_ipv6() == p.ipv6);
        }
        self.probes.retain(|p| p.ip.is_some());
        self
    }

    /// Sets the current home region and whether its DERP connection is alive (hysteresis input).
    pub fn with_home(mut self, previous_home: i32, home_alive: bool) -> ProbePlan {
        self.previous_home = previous_home;
        self.home_alive = home_alive;
        self
    }
}

/// A region id from its decimal map key; 0 (skipped) when malformed.
fn parse_id(key: &str) -> i32 {
    key.parse().unwrap_or(0)
}

/// A node's STUN port: `STUNPort` 0 means 3478, -1 (or anything out of range) means none.
fn stun_port(n: &DerpNode) -> Option<u16> {
    match n.stun_port {
        0 => Some(stun::DEFAULT_PORT),
        p => u16::try_from(p).ok().filter(|p| *p != 0),
    }
}

/// A node's STUN target for one family (Go `nodeAddrPort`): `None` = no probe of this family,
/// `Some(None)` = resolve `HostName`, `Some(Some(ip))` = use `ip`. A non-empty `IPv4`/`IPv6`
/// field that is not an address of that family (Go's `"none"`) disables the family.
fn node_target(n: &DerpNode, ipv6: bool) -> Option<Option<IpAddr>> {
    match derp::node_addr(n, ipv6) {
        NodeAddr::Ip(ip) => Some(Some(ip)),
        NodeAddr::Dns => Some(None),
        NodeAddr::Off => None,
    }
}

/// The result of one netcheck (Go `netcheck.Report`, the parts we measure).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// A STUN round trip completed.
    pub udp: bool,
    /// An IPv4 STUN round trip completed.
    pub ipv4: bool,
    /// An IPv6 STUN round trip completed.
    pub ipv6: bool,
    /// Our IPv4 address and port as the first STUN server saw them.
    pub global_v4: Option<SocketAddr>,
    /// Our IPv6 address and port as the first STUN server saw them.
    pub global_v6: Option<SocketAddr>,
    /// The host has IPv6 to offer (an IPv6 socket and a global or ULA address; Go `OSHasIPv6`).
    /// Not measured by STUN: the shell sets it.
    pub os_has_ipv6: bool,
    /// Whether different STUN servers saw different IPv4 mappings (a NAT that maps per
    /// destination: "hard NAT"); `None` until two servers answered.
    pub mapping_varies_by_dest_ip: Option<bool>,
    /// Lowest STUN round trip per region, any family.
    pub region_latency: BTreeMap<i32, Duration>,
    /// Lowest IPv4 round trip per region.
    pub region_v4_latency: BTreeMap<i32, Duration>,
    /// Lowest IPv6 round trip per region.
    pub region_v6_latency: BTreeMap<i32, Duration>,
    /// The home region to use (0 = none).
    pub preferred_derp: i32,
    /// The latencies were measured over HTTPS (UDP blocked), not STUN.
    pub latency_over_https: bool,
}

impl Report {
    /// `Hostinfo.NetInfo.DERPLatency`: `"<region>-v4"`/`"<region>-v6"` to seconds.
    pub fn derp_latency(&self) -> BTreeMap<String, f64> {
        // Inserted one by one: `collect()` into a BTreeMap compiles a stable sort per call site.
        let mut out = BTreeMap::new();
        for (fam, lat) in [("v4", &self.region_v4_latency), ("v6", &self.region_v6_latency)] {
            for (r, d) in lat {
                out.insert(format!("{r}-{fam}"), d.as_secs_f64());
            }
        }
        out
    }

    /// `Hostinfo.NetInfo` as Go marshals it (the fields we measure; unknown ones omitted).
    pub fn net_info(&self) -> Value {
        let mut m = Map::new();
        if let Some(v) = self.mapping_varies_by_dest_ip {
            m.insert("MappingVariesByDestIP".into(), json!(v));
        }
        m.insert("WorkingIPv6".into(), json!(self.ipv6));
        m.insert("OSHasIPv6".into(), json!(self.os_has_ipv6));
        m.insert("WorkingUDP".into(), json!(self.udp));
        if self.preferred_derp != 0 {
            m.insert("PreferredDERP".into(), json!(self.preferred_derp));
        }
        let lat = self.derp_latency();
        if !lat.is_empty() {
            m.insert("DERPLatency".into(), json!(lat));
        }
        Value::Object(m)
    }
}

/// Picks the home region (Go `addReportHistoryAndSetPreferredDERP`, without history and
/// scores): the lowest latency (ties to the lower id), but the previous home stays while it is
/// reachable (answered STUN, or `prev_alive` over DERP) unless the best is both `min_diff`
/// faster and under two thirds of its latency. With no latency at all, a live previous home
/// stays and otherwise there is none.
pub fn choose_preferred_derp(
    latency: &BTreeMap<i32, Duration>,
    prev: i32,
    prev_alive: bool,
    min_diff: Duration,
) -> i32 {
    let Some((&best, &best_lat)) = latency.iter().min_by_key(|(id, d)| (**d, **id)) else {
        return if prev != 0 && prev_alive { prev } else { 0 };
    };
    if prev == 0 || prev == best {
        return best;
    }
    match latency.get(&prev) {
        // Reachable only over DERP: Go compares against a zero latency, which always keeps it.
        None if prev_alive => prev,
        None => best,
        Some(&old) => {
            let small_gain = old.saturating_sub(best_lat) < min_diff;
            let similar = best_lat > old / 3 * 2;
            if small_gain || similar {
                prev
            } else {
                best
            }
        }
    }
}

/// A STUN request awaiting its answer.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    region_id: i32,
    dst: SocketAddr,
    sent: Instant,
}

/// One report in progress (Go `reportState`): which probes are due, what came back.
#[derive(Debug)]
pub struct ReportState {
    plan: ProbePlan,
    next: usize,
    start: Instant,
    deadline: Instant,
    /// Regions with at least one probe of our family.
    regions: BTreeSet<i32>,
    /// Distinct IPv4 STUN targets planned (hosts counted by name), to know whether the mapping
    /// question can be answered at all.
    v4_servers: usize,
    in_flight: BTreeMap<TxId, InFlight>,
    last_sent: Option<Instant>,
    /// The first mapped IPv4 address per STUN server answering.
    v4_mapped: BTreeMap<SocketAddr, SocketAddr>,
    report: Report,
}

impl ReportState {
    /// Starts a report at `now` that gives up at `deadline`, keeping only the probes of one
    /// family (that of the socket they will be sent from).
    pub fn new(plan: &ProbePlan, ipv6: bool, now: Instant, deadline: Instant) -> ReportState {
        let mut plan = plan.clone();
        plan.probes.retain(|p| p.ipv6 == ipv6);
        let regions = plan.probes.iter().map(|p| p.region_id).collect();
        let v4_servers = plan
            .probes
            .iter()
            .filter(|p| !p.ipv6)
            .map(|p| (p.ip.map(|ip| ip.to_string()).unwrap_or_else(|| p.host.clone()), p.port))
            .collect::<BTreeSet<_>>()
            .len();
        ReportState {
            plan,
            next: 0,
            start: now,
            deadline,
            regions,
            v4_servers,
            in_flight: BTreeMap::new(),
            last_sent: None,
            v4_mapped: BTreeMap::new(),
            report: Report::default(),
        }
    }

    /// The next probe due at `now` that would still tell us something (Go `probeWouldHelp`:
    /// its region has no answer yet, or it is IPv4 to a server not yet heard from while the
    /// mapping question is open). Call until `None`, sending each and reporting it with
    /// [`ReportState::note_sent`].
    pub fn poll_probe(&mut self, now: Instant) -> Option<Probe> {
        while let Some(p) = self.plan.probes.get(self.next) {
            if self.start + p.delay > now {
                return None;
            }
            self.next += 1;
            let region_open = !self.report.region_latency.contains_key(&p.region_id);
            // A server that already answered cannot tell us whether others see us differently.
            let new_server = p.addr().is_none_or(|a| !self.v4_mapped.contains_key(&a));
            let mapping_open = !p.ipv6 && self.report.mapping_varies_by_dest_ip.is_none() && new_server;
            if region_open || mapping_open {
                return Some(p.clone());
            }
        }
        None
    }

    /// Records a binding request sent for `probe` to `dst` with transaction id `tx`.
    pub fn note_sent(&mut self, tx: TxId, probe: &Probe, dst: SocketAddr, now: Instant) {
        self.in_flight.insert(
            tx,
            InFlight {
                region_id: probe.region_id,
                dst,
                sent: now,
            },
        );
        self.last_sent = Some(now);
    }

    /// Feeds a received datagram; true if it answered one of our requests (Go
    /// `addNodeLatency`). Anything else is ignored.
    pub fn handle_stun(&mut self, pkt: &[u8], now: Instant) -> bool {
        let Ok((tx, mapped)) = stun::parse_binding_response(pkt) else {
            return false;
        };
        let Some(sent) = self.in_flight.remove(&tx) else {
            return false;
        };
        let rtt = now.saturating_duration_since(sent.sent);
        let r = &mut self.report;
        r.udp = true;
        keep_min(&mut r.region_latency, sent.region_id, rtt);
        if mapped.is_ipv6() {
            r.ipv6 = true;
            keep_min(&mut r.region_v6_latency, sent.region_id, rtt);
            r.global_v6.get_or_insert(mapped);
        } else {
            r.ipv4 = true;
            keep_min(&mut r.region_v4_latency, sent.region_id, rtt);
            r.global_v4.get_or_insert(mapped);
            // Endpoint-dependent mapping: compare what distinct servers (ip:port) saw.
            self.v4_mapped.entry(sent.dst).or_insert(mapped);
            if self.v4_mapped.len() >= 2 {
                let mut seen = self.v4_mapped.values();
                let first = seen.next().copied();
                r.mapping_varies_by_dest_ip = Some(seen.any(|m| Some(*m) != first));
            }
        }
        // Enough regions answered: give the stragglers twice the slowest latency, not the rest.
        if r.region_latency.len() == self.plan.timing.enough_regions {
            if let Some(max) = r.region_latency.values().max() {
                self.deadline = self.deadline.min(now + *max * 2);
            }
        }
        true
    }

    /// True once nothing more is to be learned: the deadline passed; or every probe went out
    /// and every one sent was answered (or none could be sent); or every region answered and the
    /// mapping question is settled (or cannot be, and the last probe had its chance).
    pub fn is_done(&self, now: Instant) -> bool {
        if now >= self.deadline {
            return true;
        }
        let exhausted = self.next >= self.plan.probes.len();
        if exhausted && self.in_flight.is_empty() {
            return true;
        }
        let mapping_settled = self.report.mapping_varies_by_dest_ip.is_some() || self.v4_servers < 2;
        let last_had_its_chance = exhausted
            && self
                .last_sent
                .is_none_or(|t| now >= t + self.plan.timing.retransmit_interval);
        self.all_regions_answered() && (mapping_settled || last_had_its_chance)
    }

    /// When to wake up next: the next probe due; or, with all regions in, when the last probe
    /// has had its chance; else the deadline. (Never a time at which `is_done` would still be
    /// false with nothing to do, so a caller sleeping until then does not spin.)
    pub fn poll_timeout(&self) -> Instant {
        let retransmit = self.plan.timing.retransmit_interval;
        let wake = match (self.plan.probes.get(self.next), self.last_sent) {
            (Some(p), _) => Some(self.start + p.delay),
            (None, Some(t)) if self.all_regions_answered() => Some(t + retransmit),
            _ => None,
        };
        wake.map_or(self.deadline, |t| t.min(self.deadline))
    }

    fn all_regions_answered(&self) -> bool {
        self.regions.iter().all(|r| self.report.region_latency.contains_key(r))
    }

    /// The report, with the home region chosen against the plan's previous home.
    pub fn finish(self) -> Report {
        let mut r = self.report;
        r.preferred_derp = choose_preferred_derp(
            &r.region_latency,
            self.plan.previous_home,
            self.plan.home_alive,
            self.plan.timing.preferred_derp_absolute_diff,
        );
        r
    }
}

/// Ends a report measured by two [`ReportState`]s side by side, one per family (made with
/// `ipv6` false and true from the same plan, fed the same STUN packets: each ignores answers to
/// the other's requests). IPv4 facts come from `v4`, IPv6 facts from `v6`, latencies from both,
/// and the home region is chosen over the merged latencies (Go runs both families in one
/// report; our per-family states keep each family's retries and deadlines independent).
pub fn finish_both(v4: ReportState, v6: ReportState) -> Report {
    let plan = v4.plan.clone();
    let (mut r, r6) = (v4.report, v6.report);
    r.udp |= r6.udp;
    r.ipv6 = r6.ipv6;
    r.global_v6 = r6.global_v6;
    for (region, d) in r6.region_latency {
        keep_min(&mut r.region_latency, region, d);
    }
    r.region_v6_latency = r6.region_v6_latency;
    r.preferred_derp = choose_preferred_derp(
        &r.region_latency,
        plan.previous_home,
        plan.home_alive,
        plan.timing.preferred_derp_absolute_diff,
    );
    r
}

/// Go netcheck's fallback when no STUN probe was answered (UDP blocked): region latencies
/// measured over HTTPS (`GET /derp/latency-check`) rank the regions instead, so the home region
/// is still the nearest one rather than an arbitrary one. `report` keeps `udp: false`; only its
/// latencies and home choice change (with the usual hysteresis against `prev`).
pub fn with_https_latency(
    mut report: Report,
    latency: &BTreeMap<i32, Duration>,
    prev: i32,
    prev_alive: bool,
    timing: &Timing,
) -> Report {
    for (&region, &d) in latency {
        keep_min(&mut report.region_latency, region, d);
    }
    report.latency_over_https = !latency.is_empty();
    report.preferred_derp = choose_preferred_derp(
        &report.region_latency,
        prev,
        prev_alive,
        timing.preferred_derp_absolute_diff,
    );
    report
}

/// Inserts `d` for `region` unless a lower value is there.
fn keep_min(m: &mut BTreeMap<i32, Duration>, region: i32, d: Duration) {
    let e = m.entry(region).or_insert(d);
    *e = (*e).min(d);
}

// ---- shell ----

/// Runs one report: sends the plan's probes of `socket`'s family from `socket` (the magicsock
/// socket, so the mapped address is our WireGuard endpoint), resolves host names as needed, and
/// collects answers until done or `timeout`. It reads the socket itself, so anything else that
/// arrives meanwhile is dropped: the daemon, whose loop owns the socket, should instead drive a
/// [`ReportState`] with the STUN packets its demux finds.
pub async fn run(socket: &tokio::net::UdpSocket, plan: &ProbePlan, timeout: Duration) -> Report {
    use std::io::ErrorKind;

    use rand_core::RngCore;
    let ipv6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
    let start = Instant::now();
    let mut st = ReportState::new(plan, ipv6, start, start + timeout);
    let mut resolved: BTreeMap<String, Option<IpAddr>> = BTreeMap::new();
    let mut buf = [0u8; 1500];
    while !st.is_done(Instant::now()) {
        while let Some(p) = st.poll_probe(Instant::now()) {
            let ip = match p.ip {
                Some(ip) => Some(ip),
                None if resolved.contains_key(&p.host) => resolved.get(&p.host).copied().flatten(),
                None => {
                    // Bounded by the report's deadline: a dead resolver must not stall us.
                    let lookup = tokio::net::lookup_host((p.host.as_str(), p.port));
                    let addrs = tokio::time::timeout_at((start + timeout).into(), lookup).await;
                    let found = addrs.ok().and_then(Result::ok);
                    let ip = found.and_then(|mut a| a.find(|a| a.is_ipv6() == ipv6)).map(|a| a.ip());
                    log::debug!("netcheck: resolved {} to {ip:?}", p.host);
                    resolved.insert(p.host.clone(), ip);
                    ip
                }
            };
            let Some(ip) = ip else { continue };
            let mut tx = [0u8; 12];
            rand_core::OsRng.fill_bytes(&mut tx);
            let dst = SocketAddr::new(ip, p.port);
            match socket.send_to(&stun::binding_request(tx), dst).await {
                Ok(_) => st.note_sent(tx, &p, dst, Instant::now()),
                Err(e) => log::debug!("netcheck: probe to ep={dst} derp={} failed: {e}", p.region_id),
            }
        }
        let wake = tokio::time::Instant::from_std(st.poll_timeout());
        match tokio::time::timeout_at(wake, socket.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                st.handle_stun(&buf[..n], Instant::now());
            }
            // ICMP errors from a probe surface here on some systems; keep listening. Anything
            // else means the socket is unusable: return what we have rather than spin.
            Ok(Err(e)) if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset) => {}
            Ok(Err(e)) => {
                log::debug!("netcheck: recv: {e}");
                break;
            }
            Err(_) => {}
        }
    }
    st.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tailcfg::DerpRegion;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn node(name: &str, region: i32, host: &str, ipv4: &str, ipv6: &str, stun_port: i32) -> DerpNode {
        DerpNode {
            name: name.into(),
            region_id: region,
            host_name: host.into(),
            ipv4: ipv4.into(),
            ipv6: ipv6.into(),
            stun_port,
            ..DerpNode::default()
        }
    }

    fn map(regions: Vec<(i32, bool, Vec<DerpNode>)>) -> DerpMap {
        DerpMap {
            regions: regions
                .into_iter()
                .map(|(id, no_home, nodes)| {
                    let r = DerpRegion {
                        region_id: id,
                        region_code: format!("r{id}"),
                        region_name: format!("Region {id}"),
                        no_measure_no_home: no_home,
                        nodes,
                    };
                    (id.to_string(), r)
                })
                .collect(),
            omit_default_regions: false,
        }
    }

    /// (region, node, target, port, ipv6, delay ms) of a probe, for compact comparisons.
    type Shape = (i32, String, String, u16, bool, u64);

    fn shape(plan: &ProbePlan) -> Vec<Shape> {
        plan.probes
            .iter()
            .map(|p| {
                let target = p.ip.map_or(format!("dns:{}", p.host), |ip| ip.to_string());
                (
                    p.region_id,
                    p.node.clone(),
                    target,
                    p.port,
                    p.ipv6,
                    p.delay.as_millis() as u64,
                )
            })
            .collect()
    }

    #[test]
    fn probe_plan_table() {
        let s = |x: &str| x.to_string();
        let cases: Vec<(&str, DerpMap, Vec<Shape>)> = vec![
            (
                "IPv4 field, default port, three tries 100 ms apart",
                map(vec![(
                    1,
                    false,
                    vec![node("1a", 1, "derp1.example", "192.0.2.1", "none", 0)],
                )]),
                vec![
                    (1, s("1a"), s("192.0.2.1"), 3478, false, 0),
                    (1, s("1a"), s("192.0.2.1"), 3478, false, 100),
                    (1, s("1a"), s("192.0.2.1"), 3478, false, 200),
                ],
            ),
            (
                "tries rotate over nodes; STUNPort -1 nodes skipped; explicit port",
                map(vec![(
                    2,
                    false,
                    vec![
                        node("2a", 2, "a.example", "192.0.2.10", "none", 3479),
                        node("2x", 2, "x.example", "192.0.2.99", "none", -1),
                        node("2b", 2, "b.example", "192.0.2.11", "none", 3479),
                    ],
                )]),
                vec![
                    (2, s("2a"), s("192.0.2.10"), 3479, false, 0),
                    (2, s("2b"), s("192.0.2.11"), 3479, false, 100),
                    (2, s("2a"), s("192.0.2.10"), 3479, false, 200),
                ],
            ),
            (
                "IP literal HostName (v6 only), hostnames for DNS in both families",
                map(vec![
                    (3, false, vec![node("3a", 3, "2001:db8::3", "", "", 0)]),
                    (4, false, vec![node("4a", 4, "derp4.example", "", "", 0)]),
                ]),
                vec![
                    (3, s("3a"), s("2001:db8::3"), 3478, true, 0),
                    (4, s("4a"), s("dns:derp4.example"), 3478, false, 0),
                    (4, s("4a"), s("dns:derp4.example"), 3478, true, 0),
                    (3, s("3a"), s("2001:db8::3"), 3478, true, 100),
                    (4, s("4a"), s("dns:derp4.example"), 3478, false, 100),
                    (4, s("4a"), s("dns:derp4.example"), 3478, true, 100),
                    (3, s("3a"), s("2001:db8::3"), 3478, true, 200),
                    (4, s("4a"), s("dns:derp4.example"), 3478, false, 200),
                    (4, s("4a"), s("dns:derp4.example"), 3478, true, 200),
                ],
            ),
            (
                "NoMeasureNoHome, node-less and STUN-less regions, bogus ports are not probed",
                map(vec![
                    (5, true, vec![node("5a", 5, "", "192.0.2.5", "", 0)]),
                    (6, false, vec![]),
                    (7, false, vec![node("7a", 7, "", "192.0.2.7", "", -1)]),
                    (
                        8,
                        false,
                        vec![
                            node("8a", 8, "", "192.0.2.8", "", 70000),
                            node("8b", 8, "", "192.0.2.8", "", -2),
                        ],
                    ),
                ]),
                vec![],
            ),
            (
                "explicit IPv6 field; an IPv4 field of the wrong family disables v4",
                map(vec![(
                    9,
                    false,
                    vec![node("9a", 9, "derp9.example", "2001:db8::9", "2001:db8::9", 0)],
                )]),
                vec![
                    (9, s("9a"), s("2001:db8::9"), 3478, true, 0),
                    (9, s("9a"), s("2001:db8::9"), 3478, true, 100),
                    (9, s("9a"), s("2001:db8::9"), 3478, true, 200),
                ],
            ),
        ];
        for (why, m, want) in cases {
            assert_eq!(shape(&ProbePlan::new(&m, Timing::default())), want, "{why}");
        }
        // Regions sort numerically, not as their string keys.
        let m = map(vec![
            (10, false, vec![node("10a", 10, "", "192.0.2.10", "none", 0)]),
            (9, false, vec![node("9a", 9, "", "192.0.2.9", "none", 0)]),
        ]);
        let plan = ProbePlan::new(
            &m,
            Timing {
                tries_per_region: 1,
                ..Timing::default()
            },
        );
        assert_eq!(plan.probes.iter().map(|p| p.region_id).collect::<Vec<_>>(), vec![9, 10]);
        assert_eq!(plan.probes[0].addr(), Some("192.0.2.9:3478".parse().unwrap()));
    }

    #[test]
    fn https_latency_ranks_regions_when_udp_is_blocked() {
        let ms = Duration::from_millis;
        let blocked = Report::default();
        let lat: BTreeMap<i32, Duration> = [(1, ms(90)), (2, ms(20)), (3, ms(25))].into_iter().collect();
        let r = with_https_latency(blocked.clone(), &lat, 0, false, &Timing::default());
        assert_eq!((r.udp, r.preferred_derp, r.region_latency.len()), (false, 2, 3));
        // A live home that is only a little slower stays home (hysteresis as for STUN).
        let r = with_https_latency(blocked.clone(), &lat, 3, true, &Timing::default());
        assert_eq!(r.preferred_derp, 3);
        // Nothing answered: no latency, and the previous home only if it is alive.
        let none = BTreeMap::new();
        assert_eq!(
            with_https_latency(blocked.clone(), &none, 3, true, &Timing::default()).preferred_derp,
            3
        );
        assert_eq!(
            with_https_latency(blocked, &none, 3, false, &Timing::default()).preferred_derp,
            0
        );
    }

    #[test]
    fn preferred_derp_hysteresis_table() {
        let lat = |pairs: &[(i32, u64)]| pairs.iter().map(|(r, m)| (*r, ms(*m))).collect::<BTreeMap<_, _>>();
        let diff = Timing::default().preferred_derp_absolute_diff;
        let cases = [
            // (latencies, previous home, previous alive over DERP, want, why)
            (lat(&[(1, 30), (2, 20)]), 0, false, 2, "no previous home: fastest"),
            (lat(&[(1, 20), (2, 20)]), 0, false, 1, "tie: lower region id"),
            (lat(&[(1, 30), (2, 20)]), 2, false, 2, "previous is fastest"),
            (
                lat(&[(1, 30), (2, 25)]),
                1,
                false,
                1,
                "5 ms faster: below the absolute threshold",
            ),
            (
                lat(&[(1, 100), (2, 80)]),
                1,
                false,
                1,
                "20 ms but only 20% faster: keep",
            ),
            (lat(&[(1, 100), (2, 60)]), 1, false, 2, "40% and 40 ms faster: switch"),
            (lat(&[(1, 15), (2, 4)]), 1, false, 2, "11 ms and 73% faster: switch"),
            (lat(&[(1, 15), (2, 6)]), 1, false, 1, "9 ms faster: keep"),
            (lat(&[(2, 20)]), 1, false, 2, "previous unreachable: move"),
            (
                lat(&[(2, 20)]),
                1,
                true,
                1,
                "previous silent on STUN but alive over DERP: keep",
            ),
            (lat(&[]), 1, true, 1, "no UDP at all, DERP alive: keep"),
            (lat(&[]), 1, false, 0, "no UDP at all, previous dead: none"),
            (lat(&[]), 0, true, 0, "nothing known"),
        ];
        for (l, prev, alive, want, why) in cases {
            assert_eq!(choose_preferred_derp(&l, prev, alive, diff), want, "{why}");
        }
    }

    #[test]
    fn report_json_forms() {
        let r = Report {
            udp: true,
            ipv4: true,
            mapping_varies_by_dest_ip: Some(false),
            region_v4_latency: [(1, ms(12)), (900, Duration::from_micros(1500))].into_iter().collect(),
            region_v6_latency: [(1, ms(20))].into_iter().collect(),
            preferred_derp: 900,
            ..Report::default()
        };
        let lat = r.derp_latency();
        assert_eq!(lat.keys().collect::<Vec<_>>(), ["1-v4", "1-v6", "900-v4"]);
        assert_eq!((lat["1-v4"], lat["900-v4"], lat["1-v6"]), (0.012, 0.0015, 0.02));
        assert_eq!(
            r.net_info(),
            json!({"MappingVariesByDestIP": false, "WorkingIPv6": false, "OSHasIPv6": false, "WorkingUDP": true,
                   "PreferredDERP": 900, "DERPLatency": {"1-v4": 0.012, "1-v6": 0.02, "900-v4": 0.0015}})
        );
        assert_eq!(
            Report::default().net_info(),
            json!({"WorkingIPv6": false, "OSHasIPv6": false, "WorkingUDP": false})
        );
        let r6 = Report {
            udp: true,
            ipv6: true,
            os_has_ipv6: true,
            global_v6: Some("[2001:db8:1::2]:41641".parse().unwrap()),
            ..Report::default()
        };
        assert_eq!(
            r6.net_info(),
            json!({"WorkingIPv6": true, "OSHasIPv6": true, "WorkingUDP": true})
        );
    }

    /// Drives a [`ReportState`] with a scripted network: `answer(probe) -> Option<(rtt, mapped)>`.
    fn drive(
        plan: &ProbePlan,
        answer: impl Fn(&Probe, SocketAddr) -> Option<(Duration, SocketAddr)>,
    ) -> (Report, Duration, usize) {
        let t0 = Instant::now();
        let mut st = ReportState::new(plan, false, t0, t0 + STUN_PROBE_TIMEOUT);
        let mut now = t0;
        let mut pending: Vec<(Instant, Vec<u8>)> = Vec::new();
        let mut sent = 0u32;
        while !st.is_done(now) {
            while let Some(p) = st.poll_probe(now) {
                sent += 1;
                let tx = {
                    let mut t = [0u8; 12];
                    t[..4].copy_from_slice(&sent.to_be_bytes());
                    t
                };
                let dst = p.addr().expect("test plans use IPs");
                st.note_sent(tx, &p, dst, now);
                if let Some((rtt, mapped)) = answer(&p, dst) {
                    pending.push((now + rtt, stun::binding_response(tx, mapped)));
                }
            }
            let wake = pending.iter().map(|(t, _)| *t).fold(st.poll_timeout(), Instant::min);
            assert!(wake > now || st.is_done(wake), "would spin at {:?}", now - t0);
            now = wake;
            pending.retain(|(t, pkt)| {
                if *t <= now {
                    assert!(st.handle_stun(pkt, now));
                    false
                } else {
                    true
                }
            });
        }
        (st.finish(), now - t0, sent as usize)
    }

    /// Like [`drive`], with one [`ReportState`] per family fed the same answers, merged by
    /// [`finish_both`]. Returns the report and when both states were done.
    fn drive_both(
        plan: &ProbePlan,
        answer: impl Fn(&Probe, SocketAddr) -> Option<(Duration, SocketAddr)>,
    ) -> (Report, Duration) {
        let t0 = Instant::now();
        let deadline = t0 + STUN_PROBE_TIMEOUT;
        let mut st = [
            ReportState::new(plan, false, t0, deadline),
            ReportState::new(plan, true, t0, deadline),
        ];
        let mut now = t0;
        let mut pending: Vec<(Instant, Vec<u8>)> = Vec::new();
        let mut sent = 0u32;
        while !st.iter().all(|s| s.is_done(now)) {
            for s in st.iter_mut().filter(|s| !s.is_done(now)) {
                while let Some(p) = s.poll_probe(now) {
                    sent += 1;
                    let mut tx = [0u8; 12];
                    tx[..4].copy_from_slice(&sent.to_be_bytes());
                    let dst = p.addr().expect("test plans use IPs");
                    s.note_sent(tx, &p, dst, now);
                    if let Some((rtt, mapped)) = answer(&p, dst) {
                        pending.push((now + rtt, stun::binding_response(tx, mapped)));
                    }
                }
            }
            let wake = st
                .iter()
                .filter(|s| !s.is_done(now))
                .map(|s| s.poll_timeout())
                .chain(pending.iter().map(|(t, _)| *t))
                .min()
                .expect("a state still running has a timeout");
            assert!(wake > now || st.iter().all(|s| s.is_done(wake)), "would spin");
            now = wake;
            pending.retain(|(t, pkt)| {
                if *t > now {
                    return true;
                }
                // Exactly one of the two states knows each answer.
                let known = st.iter_mut().map(|s| s.handle_stun(pkt, now)).filter(|k| *k).count();
                assert_eq!(known, 1);
                false
            });
        }
        let [v4, v6] = st;
        (finish_both(v4, v6), now - t0)
    }

    fn dual_stack_regions() -> ProbePlan {
        let m = map(vec![
            (1, false, vec![node("1a", 1, "", "192.0.2.1", "2001:db8:ff::1", 0)]),
            (2, false, vec![node("2a", 2, "", "192.0.2.2", "2001:db8:ff::2", 0)]),
        ]);
        ProbePlan::new(&m, Timing::default())
    }

    #[test]
    fn dual_stack_report() {
        let me4: SocketAddr = "198.51.100.7:41641".parse().unwrap();
        let me6: SocketAddr = "[2001:db8:1::2]:41641".parse().unwrap();
        // Region 1: 20 ms on v4, 30 ms on v6. Region 2: 40 ms on v4 but 10 ms on v6.
        let (r, took) = drive_both(&dual_stack_regions(), |p, _| {
            let rtt = match (p.region_id, p.ipv6) {
                (1, false) => 20,
                (1, true) => 30,
                (2, false) => 40,
                _ => 10,
            };
            Some((ms(rtt), if p.ipv6 { me6 } else { me4 }))
        });
        assert!(r.udp && r.ipv4 && r.ipv6);
        assert_eq!((r.global_v4, r.global_v6), (Some(me4), Some(me6)));
        assert_eq!(r.mapping_varies_by_dest_ip, Some(false), "from the two IPv4 servers");
        assert_eq!(r.region_v4_latency, [(1, ms(20)), (2, ms(40))].into_iter().collect());
        assert_eq!(r.region_v6_latency, [(1, ms(30)), (2, ms(10))].into_iter().collect());
        assert_eq!(r.region_latency, [(1, ms(20)), (2, ms(10))].into_iter().collect());
        assert_eq!(r.preferred_derp, 2, "fastest over either family");
        assert_eq!(
            r.derp_latency().keys().collect::<Vec<_>>(),
            ["1-v4", "1-v6", "2-v4", "2-v6"]
        );
        assert_eq!(r.net_info()["WorkingIPv6"], json!(true));
        assert_eq!(took, ms(40), "done when the slowest family answered");
    }

    #[test]
    fn dual_stack_report_with_ipv6_blocked() {
        let me4: SocketAddr = "198.51.100.7:41641".parse().unwrap();
        let (r, took) = drive_both(&dual_stack_regions(), |p, _| (!p.ipv6).then_some((ms(20), me4)));
        assert!(r.udp && r.ipv4 && !r.ipv6);
        assert_eq!((r.global_v4, r.global_v6), (Some(me4), None));
        assert!(r.region_v6_latency.is_empty());
        assert_eq!(r.preferred_derp, 1);
        assert_eq!(r.net_info()["WorkingIPv6"], json!(false));
        assert_eq!(took, STUN_PROBE_TIMEOUT, "IPv6 probes wait out the timeout");
        // And the other way round: an IPv6-only network still measures and picks a home.
        let me6: SocketAddr = "[2001:db8:1::2]:41641".parse().unwrap();
        let (r, _) = drive_both(&dual_stack_regions(), |p, _| p.ipv6.then_some((ms(5), me6)));
        assert!(r.udp && !r.ipv4 && r.ipv6);
        assert_eq!((r.global_v4, r.global_v6), (None, Some(me6)));
        assert_eq!(r.preferred_derp, 1);
    }

    #[test]
    fn plan_with_resolved_host_names() {
        let m = map(vec![
            (1, false, vec![node("1a", 1, "derp1.example", "", "", 0)]),
            (2, false, vec![node("2a", 2, "derp2.example", "none", "", 0)]),
            (3, false, vec![node("3a", 3, "derp3.example", "192.0.2.3", "", 0)]),
            (4, false, vec![node("4a", 4, "unresolvable.example", "", "", 0)]),
        ]);
        let plan = ProbePlan::new(
            &m,
            Timing {
                tries_per_region: 1,
                ..Timing::default()
            },
        )
        .with_resolved(|host| match host {
            "derp1.example" | "derp2.example" => vec!["2001:db8::1".parse().unwrap(), "192.0.2.1".parse().unwrap()],
            // Only an A record: the v6 probe has nowhere to go.
            "derp3.example" => vec!["192.0.2.33".parse().unwrap()],
            _ => vec![],
        });
        let s = |x: &str| x.to_string();
        assert_eq!(
            shape(&plan),
            vec![
                (1, s("1a"), s("192.0.2.1"), 3478, false, 0),
                (1, s("1a"), s("2001:db8::1"), 3478, true, 0),
                // "none": no IPv4 probe even though DNS has an A record.
                (2, s("2a"), s("2001:db8::1"), 3478, true, 0),
                // The pinned IPv4 is kept, not replaced by DNS.
                (3, s("3a"), s("192.0.2.3"), 3478, false, 0),
            ]
        );
    }

    fn three_regions() -> ProbePlan {
        let m = map(vec![
            (1, false, vec![node("1a", 1, "", "192.0.2.1", "none", 0)]),
            (2, false, vec![node("2a", 2, "", "192.0.2.2", "none", 0)]),
            (3, false, vec![node("3a", 3, "", "192.0.2.3", "none", 0)]),
        ]);
        ProbePlan::new(&m, Timing::default())
    }

    #[test]
    fn easy_nat_report() {
        let me: SocketAddr = "198.51.100.7:41641".parse().unwrap();
        let rtt = |p: &Probe| ms(10 * p.region_id as u64);
        let (r, took, sent) = drive(&three_regions(), |p, _| Some((rtt(p), me)));
        assert!(r.udp && r.ipv4 && !r.ipv6);
        assert_eq!(r.global_v4, Some(me));
        assert_eq!(r.mapping_varies_by_dest_ip, Some(false));
        assert_eq!(
            r.region_latency,
            [(1, ms(10)), (2, ms(20)), (3, ms(30))].into_iter().collect()
        );
        assert_eq!(r.region_v4_latency, r.region_latency);
        assert_eq!(r.preferred_derp, 1);
        // Answered regions get no retries; done as soon as the slowest answered.
        assert_eq!((took, sent), (ms(30), 3));
    }

    #[test]
    fn hard_nat_report() {
        // A new external port per destination (endpoint-dependent mapping).
        let (r, took, _) = drive(&three_regions(), |p, _| {
            Some((
                ms(10),
                SocketAddr::new("198.51.100.7".parse().unwrap(), 40000 + p.region_id as u16),
            ))
        });
        assert_eq!(r.mapping_varies_by_dest_ip, Some(true));
        assert_eq!(
            r.global_v4,
            Some("198.51.100.7:40001".parse().unwrap()),
            "the first answer"
        );
        assert_eq!(took, ms(10));
    }

    #[test]
    fn single_server_cannot_tell_mapping_and_retries_do_not_stall() {
        let m = map(vec![(1, false, vec![node("1a", 1, "", "192.0.2.1", "none", 0)])]);
        let plan = ProbePlan::new(&m, Timing::default());
        let me: SocketAddr = "198.51.100.7:41641".parse().unwrap();
        let (r, took, sent) = drive(&plan, |_, _| Some((ms(5), me)));
        assert_eq!(r.mapping_varies_by_dest_ip, None);
        assert_eq!(r.preferred_derp, 1);
        assert_eq!((took, sent), (ms(5), 1), "one server: nothing more to learn");
        // Two servers in one region: retries continue (to the second node) to settle mapping.
        let m = map(vec![(
            1,
            false,
            vec![
                node("1a", 1, "", "192.0.2.1", "none", 0),
                node("1b", 1, "", "192.0.2.2", "none", 0),
            ],
        )]);
        let plan = ProbePlan::new(&m, Timing::default());
        let (r, took, sent) = drive(&plan, |_, _| Some((ms(5), me)));
        assert_eq!(r.mapping_varies_by_dest_ip, Some(false));
        assert_eq!((took, sent), (ms(105), 2));
    }

    #[test]
    fn lost_probes_are_retried_and_a_dead_region_times_out() {
        // Region 2 drops its first try; region 3 never answers.
        let me: SocketAddr = "198.51.100.7:41641".parse().unwrap();
        let (r, took, sent) = drive(&three_regions(), |p, _| match (p.region_id, p.delay.as_millis()) {
            (3, _) | (2, 0) => None,
            _ => Some((ms(10), me)),
        });
        assert_eq!(r.region_latency.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(r.region_latency[&2], ms(10), "latency of the try that got through");
        // 3 first tries + region 2 and 3 retried at 100 ms + region 3 again at 200 ms.
        assert_eq!(
            sent, 6,
            "no retry to region 1: the same server cannot settle the mapping"
        );
        assert_eq!(took, STUN_PROBE_TIMEOUT);
        // With enough regions answering, stragglers only get twice the slowest latency.
        let plan = ProbePlan::new(
            &map((1..=4)
                .map(|i| (i, false, vec![node("n", i, "", &format!("192.0.2.{i}"), "none", 0)]))
                .collect()),
            Timing::default(),
        );
        let (r, took, _) = drive(&plan, |p, _| {
            (p.region_id != 4).then_some((ms(10 * p.region_id as u64), me))
        });
        assert_eq!(r.region_latency.len(), 3);
        assert_eq!(took, ms(30 + 60));
        // UDP blocked entirely: nothing, after the timeout; the previous home stays if alive.
        let (r, took, _) = drive(&three_regions().with_home(2, true), |_, _| None);
        assert_eq!(
            (r.udp, r.global_v4, r.preferred_derp, took),
            (false, None, 2, STUN_PROBE_TIMEOUT)
        );
    }

    #[test]
    fn junk_and_strangers_are_ignored() {
        let t0 = Instant::now();
        let plan = three_regions();
        let mut st = ReportState::new(&plan, false, t0, t0 + STUN_PROBE_TIMEOUT);
        let p = st.poll_probe(t0).unwrap();
        st.note_sent([1; 12], &p, p.addr().unwrap(), t0);
        let me: SocketAddr = "198.51.100.7:41641".parse().unwrap();
        assert!(!st.handle_stun(b"not stun", t0));
        assert!(!st.handle_stun(&stun::binding_response([2; 12], me), t0), "unknown tx");
        assert!(
            !st.handle_stun(&stun::binding_request([1; 12]), t0),
            "a request, not a response"
        );
        assert!(st.handle_stun(&stun::binding_response([1; 12], me), t0 + ms(3)));
        assert!(
            !st.handle_stun(&stun::binding_response([1; 12], me), t0 + ms(4)),
            "answered once"
        );
        // IPv6 plans only keep IPv6 probes.
        let st6 = ReportState::new(&plan, true, t0, t0 + STUN_PROBE_TIMEOUT);
        assert!(st6.is_done(t0), "no IPv6 targets: nothing to do");
    }

    proptest::proptest! {
        #[test]
        fn prop_handle_stun_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let t0 = Instant::now();
            let mut st = ReportState::new(&three_regions(), false, t0, t0 + STUN_PROBE_TIMEOUT);
            let _ = st.handle_stun(&bytes, t0);
        }
    }

    /// The shell against two of our own STUN servers (two regions, one by IP field, one by
    /// IP-literal host name) plus a third region reached by DNS name (`localhost`).
    #[cfg(feature = "relay")]
    #[tokio::test]
    async fn run_against_our_stun_servers() {
        use std::sync::Arc;

        use tokio::net::UdpSocket;

        let mut ports = Vec::new();
        for _ in 0..2 {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            ports.push(i32::from(s.local_addr().unwrap().port()));
            tokio::spawn(stun::serve_udp(s, Arc::new(stun::StunStats::default())));
        }
        let m = map(vec![
            (
                901,
                false,
                vec![node("901a", 901, "stun1.invalid", "127.0.0.1", "none", ports[0])],
            ),
            (902, false, vec![node("902a", 902, "127.0.0.1", "", "", ports[1])]),
            (903, false, vec![node("903a", 903, "localhost", "", "", ports[1])]),
        ]);
        let plan = ProbePlan::new(&m, Timing::default()).with_home(902, true);
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // The report ends when every region has answered, not at the deadline: with a one-minute
        // deadline the run must be over long before it (no wall-clock race on a busy machine).
        let deadline = Duration::from_secs(60);
        let r = tokio::time::timeout(deadline / 2, run(&sock, &plan, deadline))
            .await
            .expect("the report waited for its deadline instead of ending when all regions answered");
        assert!(r.udp && r.ipv4);
        assert_eq!(r.global_v4, Some(sock.local_addr().unwrap()));
        assert_eq!(r.mapping_varies_by_dest_ip, Some(false));
        assert_eq!(
            r.region_latency.keys().copied().collect::<Vec<_>>(),
            vec![901, 902, 903]
        );
        assert_eq!(r.region_v4_latency, r.region_latency);
        // Which region wins depends on the machine's load (loopback latencies differ by
        // scheduling alone); the home's hysteresis is checked on fixed latencies in
        // `preferred_derp_hysteresis_table`.
        assert!([901, 902, 903].contains(&r.preferred_derp));
        assert!(r.derp_latency().contains_key("901-v4"));
    }
}
