//! Netcheck orchestration in the engine: when a report runs (every [`NETCHECK_INTERVAL`], at
//! once for a new DERP map or new DERP addresses), its STUN probes through the loop's socket,
//! the HTTPS latency fallback when UDP is blocked, and what a finished report changes: our
//! endpoints, NetInfo for control and the home DERP region ([`derp_home`]).
//!
//! The probe plan and the report itself are the pure `dataplane::netcheck`; this file is the
//! shell around it (Go `wgengine/magicsock` `updateNetInfo` + `determineEndpoints`).

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::time::Instant;

use super::{
    derp_dial::{derp_dial_addrs, derp_node, derp_server_name},
    derp_home, new_tx,
    schedule::{self, AfterReport},
    Engine, LocalEndpoints,
};
use crate::{
    dataplane::magicsock::{addr, socket},
    dataplane::netcheck::{self, ProbePlan, ReportState},
    derp::{self, client as derp_client},
    wire::stun,
    wire::tailcfg::DerpNode,
};

/// With no relay address to route towards (a DERP map without relays), our IPv4 endpoint is the
/// source address of the default route, found by routing towards this address (TEST-NET-1;
/// connecting a UDP socket sends nothing).
const DEFAULT_ROUTE_PROBE: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)), 3478);
/// Budget for one region's `GET /derp/latency-check` (connection, TLS and the request).
const HTTPS_LATENCY_BUDGET: Duration = Duration::from_secs(5);

impl Engine {
    /// DERP host names (of nodes without pinned addresses) whose cached answer is missing or
    /// old, with the region each serves.
    pub(super) fn stale_derp_hosts(&self, now: Instant) -> Vec<(String, i32)> {
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

    /// Runs the netcheck schedule: starts a report when one is due (host names first), sends
    /// its due probes, and applies it once both families are done.
    pub(super) fn netcheck_step(&mut self, now_t: Instant) {
        let now = now_t.into_std();
        if self.derp_map.regions.is_empty() {
            // Nothing to probe (control without DERP): the endpoints are still published, on the
            // same schedule, so peers can reach us directly.
            self.report = None;
            if now_t >= self.next_netcheck {
                self.next_netcheck = now_t + schedule::NETCHECK_INTERVAL;
                self.apply_report(netcheck::Report::default());
            }
            return;
        }
        if schedule::report_due(now, self.next_netcheck.into_std(), self.report.is_some()) {
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
                .with_home(self.home_derp, self.home_alive())
                .with_resolved(|host| dns.get(host));
            let deadline = now + netcheck::STUN_PROBE_TIMEOUT;
            // IPv6 probes only when they can leave: an IPv6 socket and an address to send from
            // (Go probes IPv6 only when the OS has it), else each report would wait them out.
            let have_v6 =
                self.sock.have_v6() && !addr::publishable_v6(&socket::interface_v6(), self.tun.name()).is_empty();
            let v6 = have_v6.then(|| ReportState::new(&plan, true, now, deadline));
            self.report = Some((ReportState::new(&plan, false, now, deadline), v6));
            self.next_netcheck = now_t + schedule::NETCHECK_INTERVAL;
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
                let https_at = self.https_latency.as_ref().map(|(at, _)| at.into_std());
                match schedule::after_report(r.udp, https_at, now, self.https_pending) {
                    AfterReport::Apply => self.apply_report(r),
                    AfterReport::RankByHttps => {
                        let lat = self.https_latency.as_ref().map(|(_, l)| l.clone()).unwrap_or_default();
                        let alive = self.home_alive();
                        let timing = netcheck::Timing::default();
                        self.apply_report(netcheck::with_https_latency(r, &lat, self.home_derp, alive, &timing));
                    }
                    AfterReport::ApplyAndMeasure => {
                        self.apply_report(r);
                        self.measure_https_latency();
                    }
                }
            }
        }
    }

    /// UDP is blocked: ranks the regions by `GET /derp/latency-check` instead (Go netcheck's
    /// HTTPS fallback), off the loop; the answers arrive in [`Self::on_https_latency`].
    pub(super) fn measure_https_latency(&mut self) {
        let plain_http = crate::platform::tls::derp_plain_http();
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

    /// The HTTPS latencies measured by [`Self::measure_https_latency`] arrived.
    pub(super) fn on_https_latency(&mut self, lat: &BTreeMap<i32, Duration>) {
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
        let prev_alive = self.home_alive();
        let r = netcheck::with_https_latency(r, lat, self.home_derp, prev_alive, &netcheck::Timing::default());
        self.apply_report(r);
    }

    /// Publishes what report `r` tells (our endpoints, NetInfo with the home region) and
    /// follows its home region.
    pub(super) fn apply_report(&mut self, mut r: netcheck::Report) {
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
        let home = derp_home::home_region(r.preferred_derp, self.home_derp, &self.derp_map);
        self.set_home_derp(home);
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
        if schedule::worth_publishing(&self.local, &local) {
            log::info!("endpoints {:?} home_derp={home}", local.endpoints);
            self.local = local.clone();
            let _ = self.endpoints_tx.send(local);
        }
        self.last_report = Some(r);
    }
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

/// The local source address the kernel would use towards `dst` (no packet is sent).
fn local_addr_towards(dst: SocketAddr) -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind(if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
    crate::dataplane::netns::mark(std::os::fd::AsRawFd::as_raw_fd(&s));
    s.connect(dst).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
