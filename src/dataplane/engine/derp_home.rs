//! [pure] Which DERP region is home: the decision the engine takes after each netcheck report.
//!
//! Netcheck's report already carries its preferred region with hysteresis against the current
//! home (`dataplane::netcheck::choose_preferred_derp`); this file decides what the engine does
//! with it (Go `wgengine/magicsock` `maybeSetNearestDERP` + `pickDERPFallback`). No I/O: the
//! caller passes the report's choice, the current home and the DERP map.
#![forbid(unsafe_code)]

use crate::wire::tailcfg::DerpMap;

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
}
