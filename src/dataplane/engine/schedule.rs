//! [pure] When netcheck runs, and what follows a finished report: the engine's schedule,
//! decided on times passed in (Go `wgengine/magicsock` `ReSTUN` cadence and netcheck's HTTPS
//! fallback), and whether a report tells control anything new (Go `callNetInfoCallback` with
//! `NetInfo.BasicallyEqual`). The shell (`report`) starts the probes and the HTTPS
//! measurements and publishes.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use super::LocalEndpoints;

/// How often netcheck re-runs (Go: every 20-26 s while active).
pub(super) const NETCHECK_INTERVAL: Duration = Duration::from_secs(25);
/// How long HTTPS latencies rank regions before they are measured again (a TLS connection to
/// every region is not something to repeat with each 25 s report).
pub(super) const HTTPS_LATENCY_FRESH: Duration = Duration::from_secs(5 * 60);

/// Whether a new report starts at `now`: none is `running` and the next was `due` by now (a
/// new DERP map or new DERP addresses make it due at once).
pub(super) fn report_due(now: Instant, due: Instant, running: bool) -> bool {
    !running && now >= due
}

/// What a finished report leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterReport {
    /// UDP works (or latencies are being measured already): publish the report as it is.
    Apply,
    /// UDP is blocked and HTTPS latencies are fresh: rank the regions by them first.
    RankByHttps,
    /// UDP is blocked and no fresh HTTPS latencies: publish, and measure them.
    ApplyAndMeasure,
}

/// [`AfterReport`] for a report that found UDP working or not (`udp`), at `now`, with HTTPS
/// latencies last measured at `https_at` (if ever) and a measurement `measuring` now or not.
pub(super) fn after_report(udp: bool, https_at: Option<Instant>, now: Instant, measuring: bool) -> AfterReport {
    if udp {
        AfterReport::Apply
    } else if https_at.is_some_and(|at| now < at + HTTPS_LATENCY_FRESH) {
        AfterReport::RankByHttps
    } else if measuring {
        AfterReport::Apply
    } else {
        AfterReport::ApplyAndMeasure
    }
}

/// Whether `new` tells control something the last published `old` did not: endpoints, their
/// types or NetInfo, DERP latencies aside (they move with every report; Go's
/// `NetInfo.BasicallyEqual` ignores them too), so a steady node sends no lite map request per
/// report while a new home region or endpoint goes out at once.
pub(super) fn worth_publishing(old: &LocalEndpoints, new: &LocalEndpoints) -> bool {
    if old.endpoints != new.endpoints || old.types != new.types {
        return true;
    }
    let (a, b) = (&old.net_info, &new.net_info);
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let rest =
                |m: &serde_json::Map<String, serde_json::Value>| m.iter().filter(|(k, _)| *k != "DERPLatency").count();
            rest(a) != rest(b) || b.iter().any(|(k, v)| k != "DERPLatency" && a.get(k) != Some(v))
        }
        _ => a != b,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn derp_latency_alone_is_not_worth_a_map_request() {
        let eps = |home: i32, lat: f64, ep: &str| LocalEndpoints {
            endpoints: vec![ep.into()],
            types: vec![2],
            net_info: json!({"PreferredDERP": home, "WorkingUDP": true, "DERPLatency": {"1-v4": lat}}),
        };
        let last = eps(1, 0.012, "198.51.100.7:41641");
        assert!(
            !worth_publishing(&last, &eps(1, 0.019, "198.51.100.7:41641")),
            "latency jitter"
        );
        assert!(
            worth_publishing(&last, &eps(2, 0.012, "198.51.100.7:41641")),
            "the home moved"
        );
        assert!(
            worth_publishing(&last, &eps(1, 0.012, "198.51.100.7:41642")),
            "a new endpoint"
        );
        let mut typed = last.clone();
        typed.types = vec![1];
        assert!(worth_publishing(&last, &typed), "another endpoint type");
        let mut no_udp = last.clone();
        no_udp.net_info["WorkingUDP"] = json!(false);
        assert!(worth_publishing(&last, &no_udp), "UDP stopped working");
        let mut fewer = last.clone();
        fewer.net_info.as_object_mut().unwrap().remove("WorkingUDP");
        assert!(worth_publishing(&last, &fewer), "a field gone");
        assert!(worth_publishing(&LocalEndpoints::default(), &last), "the first report");
        assert!(!worth_publishing(&last, &last.clone()));
    }

    #[test]
    fn reports_start_when_due_and_not_running() {
        let t0 = Instant::now();
        let due = t0 + NETCHECK_INTERVAL;
        assert!(!report_due(t0, due, false), "not yet");
        assert!(report_due(due, due, false), "due");
        assert!(!report_due(due, due, true), "one at a time");
        assert!(report_due(t0, t0, false), "made due at once (new map)");
    }

    #[test]
    fn blocked_udp_ranks_by_fresh_https_latencies_or_measures_them() {
        use AfterReport::*;
        let t0 = Instant::now();
        let fresh = Some(t0);
        let later = t0 + HTTPS_LATENCY_FRESH;
        for (udp, at, now, measuring, want, why) in [
            (true, None, t0, false, Apply, "UDP works"),
            (true, fresh, t0, false, Apply, "UDP works: STUN latencies win"),
            (false, fresh, t0, false, RankByHttps, "blocked, fresh latencies"),
            (
                false,
                fresh,
                later,
                false,
                ApplyAndMeasure,
                "blocked, latencies 5 min old",
            ),
            (false, fresh, later, true, Apply, "blocked, a measurement under way"),
            (false, None, t0, false, ApplyAndMeasure, "blocked, never measured"),
            (false, None, t0, true, Apply, "blocked, first measurement under way"),
        ] {
            assert_eq!(after_report(udp, at, now, measuring), want, "{why}");
        }
    }
}
