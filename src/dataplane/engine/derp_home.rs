//! [pure] Which DERP region is home, and which DERP connections to keep: the decisions the
//! engine takes after each netcheck report and on its timer.
//!
//! Netcheck's report already carries its preferred region with hysteresis against the current
//! home (`dataplane::netcheck::choose_preferred_derp`); [`home_region`] decides what the engine
//! does with it (Go `wgengine/magicsock` `maybeSetNearestDERP` + `pickDERPFallback`). When the
//! home moves, the old home's connection stays while packets still go through it (peers whose
//! home it is) and closes once idle, as any region that is not home ([`is_idle`], Go
//! `cleanStaleDerp`). No I/O: the caller passes the report's choice, the DERP map, the current
//! home and the time.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use crate::wire::tailcfg::DerpMap;

/// How long a DERP connection that is not home may go without a packet queued to it before it
/// is closed (Go `derpInactiveCleanupTime`, 60 s): long enough for a peer's keepalives and disco
/// pings to keep a region in use open.
pub(super) const DERP_INACTIVE: Duration = Duration::from_secs(60);

/// The home region after a report that prefers `preferred` (0: no region answered): the
/// report's choice; else the current home (`current`, 0 for none); else, so that we stay
/// reachable over DERP, the lowest region ID of `map` (Go picks an arbitrary but stable one);
/// 0 for an empty map.
pub(super) fn home_region(preferred: i32, current: i32, map: &DerpMap) -> i32 {
    if preferred != 0 {
        preferred
    } else if current != 0 {
        current
    } else {
        map.regions.values().map(|r| r.region_id).min().unwrap_or(0)
    }
}

/// Whether to close `region`'s connection at `now`, a packet having last been queued to it at
/// `last_write`: unless it is `home`, once it has been unused for `idle` or more.
pub(super) fn is_idle(region: i32, last_write: Instant, home: i32, now: Instant, idle: Duration) -> bool {
    region != home && now.saturating_duration_since(last_write) >= idle
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tailcfg::DerpRegion;

    fn map(ids: &[i32]) -> DerpMap {
        let mut m = DerpMap::default();
        for &id in ids {
            let r = DerpRegion {
                region_id: id,
                ..DerpRegion::default()
            };
            m.regions.insert(id.to_string(), r);
        }
        m
    }

    #[test]
    fn home_region_table() {
        let m = map(&[7, 3, 12]);
        for (preferred, current, want, why) in [
            (
                12,
                3,
                12,
                "the report's choice wins (its hysteresis is already applied)",
            ),
            (12, 0, 12, "first home from the first report"),
            (0, 7, 7, "no answer: keep the home we have"),
            (0, 0, 3, "no answer and no home: the lowest region, to stay reachable"),
        ] {
            assert_eq!(home_region(preferred, current, &m), want, "{why}");
        }
        assert_eq!(home_region(0, 0, &DerpMap::default()), 0, "no regions, no home");
    }

    /// The regions of `conns` (region, last write) that [`is_idle`] closes, in order.
    fn idle_regions(conns: &[(i32, Instant)], home: i32, now: Instant) -> Vec<i32> {
        let mut v: Vec<i32> = conns
            .iter()
            .filter(|(r, at)| is_idle(*r, *at, home, now, DERP_INACTIVE))
            .map(|(r, _)| *r)
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn idle_regions_spare_the_home_and_the_busy() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let conns = [(1, at(0)), (2, at(0)), (3, at(50)), (4, at(100))];
        let idle = |home: i32, now: u64| idle_regions(&conns, home, at(now));
        assert_eq!(idle(1, 59), Vec::<i32>::new(), "nobody idle for 60 s yet");
        assert_eq!(idle(1, 60), [2], "the home stays however idle it is");
        assert_eq!(idle(4, 110), [1, 2, 3]);
        assert_eq!(idle(4, 109), [1, 2], "3 was written 59 s ago");
        assert_eq!(idle(0, 200), [1, 2, 3, 4], "no home: all idle ones go");
        // A clock that went backwards (a write stamped after `now`) is not idle.
        assert!(!is_idle(5, at(10), 1, at(0), DERP_INACTIVE));
    }

    /// The home follows the reports: a region only a little faster does not take over
    /// (netcheck's hysteresis), a clearly faster one does, and the old home then closes once
    /// no packet has gone through it for [`DERP_INACTIVE`].
    #[test]
    fn home_follows_reports_with_hysteresis() {
        use std::collections::BTreeMap;

        use crate::dataplane::netcheck::{choose_preferred_derp, Timing};
        let diff = Timing::default().preferred_derp_absolute_diff;
        let m = map(&[1, 2]);
        let ms = Duration::from_millis;
        let report = |l1: u64, l2: u64, home: i32| {
            let lat = BTreeMap::from([(1, ms(l1)), (2, ms(l2))]);
            home_region(choose_preferred_derp(&lat, home, true, diff), home, &m)
        };
        let mut home = report(20, 40, 0);
        assert_eq!(home, 1, "first report: fastest");
        home = report(30, 25, home);
        assert_eq!(home, 1, "2 only 5 ms faster: stay");
        home = report(60, 20, home);
        assert_eq!(home, 2, "2 clearly faster: move");
        let t0 = Instant::now();
        let conns = [(1, t0), (2, t0 + Duration::from_secs(30))];
        assert_eq!(idle_regions(&conns, home, t0 + ms(59_999)), Vec::<i32>::new());
        assert_eq!(idle_regions(&conns, home, t0 + DERP_INACTIVE), [1]);
    }
}
