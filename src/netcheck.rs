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
//! ```
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
    stun::{self, TxId},
    tailcfg::{DerpMap, DerpNode},
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
            .map(|(key, r)| (if r.region_id != 0 { r.region_id } else { key.parse().unwrap_or(0) }, r))
            .filter(|(id, r)| *id > 0 && !r.no_measure_no_home)
            .collect();
        regions.sort_by_key(|(id, _)| *id);
        let mut probes = Vec::new();
        for (region_id, region) in regions {
            let nodes: Vec<(&DerpNode, u16)> =
                region.nodes.iter().filter_map(|n| stun_port(n).map(|p| (n, p))).collect();
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

    /// Sets the current home region and whether its DERP connection is alive (hysteresis input).
    pub fn with_home(mut self, previous_home: i32, home_alive: bool) -> ProbePlan {
        self.previous_home = previous_home;
        self.home_alive = home_alive;
        self
    }
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
    let field = if ipv6 { &n.ipv6 } else { &n.ipv4 };
    let of_family = |ip: IpAddr| ip.is_ipv6() == ipv6;
    if !field.is_empty() {
        return field.parse::<IpAddr>().ok().filter(|ip| of_family(*ip)).map(Some);
    }
    match n.host_name.parse::<IpAddr>() {
        Ok(ip) => of_family(ip).then_some(Some(ip)),
        Err(_) if !n.host_name.is_empty() => Some(None),
        Err(_) => None,
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
}

impl Report {
    /// `Hostinfo.NetInfo.DERPLatency`: `"<region>-v4"`/`"<region>-v6"` to seconds.
    pub fn derp_latency(&self) -> BTreeMap<String, f64> {
        let v4 = self.region_v4_latency.iter().map(|(r, d)| (format!("{r}-v4"), d.as_secs_f64()));
        let v6 = self.region_v6_latency.iter().map(|(r, d)| (format!("{r}-v6"), d.as_secs_f64()));
        v4.chain(v6).collect()
    }

    /// `Hostinfo.NetInfo` as Go marshals it (the fields we measure; unknown ones omitted).
    pub fn net_info(&self) -> Value {
        let mut m = Map::new();
        if let Some(v) = self.mapping_varies_by_dest_ip {
            m.insert("MappingVariesByDestIP".into(), json!(v));
        }
        m.insert("WorkingIPv6".into(), json!(self.ipv6));
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
    /// its region has no answer yet, or it is IPv4 and the mapping question is open). Call until
    /// `None`, sending each and reporting it with [`ReportState::note_sent`].
    pub fn poll_probe(&mut self, now: Instant) -> Option<Probe> {
        while let Some(p) = self.plan.probes.get(self.next) {
            if self.start + p.delay > now {
                return None;
            }
            self.next += 1;
            let region_open = !self.report.region_latency.contains_key(&p.region_id);
            let mapping_open = !p.ipv6 && self.report.mapping_varies_by_dest_ip.is_none();
            if region_open || mapping_open {
                return Some(p.clone());
            }
        }
        None
    }

    /// Records a binding request sent for `probe` to `dst` with transaction id `tx`.
    pub fn note_sent(&mut self, tx: TxId, probe: &Probe, dst: SocketAddr, now: Instant) {
        self.in_flight.insert(tx, InFlight { region_id: probe.region_id, dst, sent: now });
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

    /// True once nothing more is to be learned: the deadline passed, or every region answered
    /// and the mapping question is settled (or cannot be, and the last probe had its chance).
    pub fn is_done(&self, now: Instant) -> bool {
        if now >= self.deadline {
            return true;
        }
        let all_regions = self.regions.iter().all(|r| self.report.region_latency.contains_key(r));
        let mapping_settled = self.report.mapping_varies_by_dest_ip.is_some() || self.v4_servers < 2;
        let plan_spent = self.next >= self.plan.probes.len()
            && self.last_sent.is_none_or(|t| now >= t + self.plan.timing.retransmit_interval);
        all_regions && (mapping_settled || plan_spent)
    }

    /// When to wake up next: the next probe due, else the deadline.
    pub fn poll_timeout(&self) -> Instant {
        let next_probe = self.plan.probes.get(self.next).map(|p| self.start + p.delay);
        let spent_at = self.last_sent.map(|t| t + self.plan.timing.retransmit_interval);
        [next_probe, spent_at]
            .into_iter()
            .flatten()
            .filter(|t| *t > self.start)
            .fold(self.deadline, Instant::min)
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
                    let addrs = tokio::net::lookup_host((p.host.as_str(), p.port)).await;
                    let ip = addrs.ok().and_then(|mut a| a.find(|a| a.is_ipv6() == ipv6)).map(|a| a.ip());
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
            // ICMP errors from a probe surface here on some systems; keep listening.
            Ok(Err(e)) => log::debug!("netcheck: recv: {e}"),
            Err(_) => {}
        }
    }
    st.finish()
}

#[cfg(test)]
mod tests {
    // TESTS
}
