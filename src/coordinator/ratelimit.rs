//! Per-source rate limit on the requests that cost the coordinator work: `GET /key`, the
//! `/ts2021` upgrade (an X25519 Noise handshake) and `/machine/register` inside a Noise session
//! (a database write). One budget per source covers all three; map polls and keep-alives on an
//! open session are never charged, so sessions already up are unaffected.
//!
//! Pure (time comes in as `now`): [`RateLimiter::check`] is a token bucket written as GCRA
//! (one "theoretical arrival time" per source instead of a token count and a timestamp):
//! `rate_burst` requests at once, then `rate_limit` per second. Sources are keyed as
//! [`crate::platform::connlimit::source_key`] keys them (IPv4, IPv6 per /64, mapped IPv4 as IPv4).
//!
//! Memory is bounded: at most [`MAX_SOURCES`] buckets. A full bucket (a source idle long enough
//! to have its whole burst back) says nothing a fresh one would not, so when the table is full
//! those go first; if none is full, the one nearest to full goes (the source it belonged to
//! gains at most what it would have regained before it is next charged). headscale has no
//! such limit (it leaves it to a reverse proxy in front); Tailscale's own server is not public.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::platform::connlimit::source_key;

/// Default requests per second per source (`rate_limit`). A node's login costs three charged
/// requests (`/key`, `/ts2021`, register) and a reconnect the same, so 10/s lets three or more
/// nodes behind one NAT address log in every second, while one address cannot make the router
/// do more than ten X25519 handshakes plus database writes a second.
pub const DEFAULT_RATE: u32 = 10;
/// Default burst per source (`rate_burst`): every node of a ~13-node home network behind one
/// address reconnects at once (a coordinator restart) without waiting.
pub const DEFAULT_BURST: u32 = 40;
/// Most sources tracked at once: ~64 bytes each, so 256 KiB at worst.
pub const MAX_SOURCES: usize = 4096;
/// A limited source is logged at most once in this long.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// The configured budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Requests per second per source; 0 turns the limit off (`rate_limit`).
    pub rate: u32,
    /// Requests a source may make at once (`rate_burst`, at least 1).
    pub burst: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
        }
    }
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it (one unit of the source's budget is spent).
    Allow,
    /// Refuse it: the source has a unit again after `retry_after`. `log` is true for the first
    /// refusal of the source in [`LOG_EVERY`].
    Limit { retry_after: Duration, log: bool },
}

#[derive(Debug)]
struct Bucket {
    /// When the source's budget is whole again plus one interval per unit spent ("theoretical
    /// arrival time"); at or before now means the bucket is full.
    tat: Instant,
    /// When its refusal was last logged.
    logged: Option<Instant>,
}

/// Per-source token buckets.
#[derive(Debug)]
pub struct RateLimiter {
    limits: RateLimits,
    /// Time one unit takes to come back (rounded up, so never more than `rate` per second).
    interval: Duration,
    /// How far ahead of now `tat` may be and still admit: `burst - 1` intervals.
    tolerance: Duration,
    cap: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    /// A limiter with `limits` and room for [`MAX_SOURCES`] sources.
    pub fn new(limits: RateLimits) -> RateLimiter {
        Self::with_capacity(limits, MAX_SOURCES)
    }

    /// A limiter tracking at most `cap` (at least 1) sources.
    pub fn with_capacity(limits: RateLimits, cap: usize) -> RateLimiter {
        let interval = Duration::from_nanos(1_000_000_000u64.div_ceil(u64::from(limits.rate.max(1))));
        RateLimiter {
            limits,
            interval,
            tolerance: interval * limits.burst.max(1).saturating_sub(1),
            cap: cap.max(1),
            buckets: HashMap::new(),
        }
    }

    /// The configured budget.
    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Charges one request from `ip` at `now` (non-decreasing across calls), or refuses it.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        if self.limits.rate == 0 {
            return Verdict::Allow;
        }
        let key = source_key(ip);
        if self.buckets.len() >= self.cap && !self.buckets.contains_key(&key) {
            self.evict(now);
        }
        let b = self.buckets.entry(key).or_insert(Bucket { tat: now, logged: None });
        let tat = b.tat.max(now);
        let ahead = tat.duration_since(now);
        if ahead <= self.tolerance {
            b.tat = tat + self.interval;
            return Verdict::Allow;
        }
        let log = b.logged.is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY);
        if log {
            b.logged = Some(now);
        }
        Verdict::Limit {
            retry_after: ahead - self.tolerance,
            log,
        }
    }

    /// Makes room for one more source: full buckets first, else the one nearest to full.
    fn evict(&mut self, now: Instant) {
        self.buckets.retain(|_, b| b.tat > now);
        if self.buckets.len() >= self.cap {
            let nearest = self.buckets.iter().min_by_key(|(_, b)| b.tat).map(|(k, _)| *k);
            if let Some(k) = nearest {
                self.buckets.remove(&k);
            }
        }
    }
}

/// `retry_after` as whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(retry_after: Duration) -> u64 {
    (retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn lim(rate: u32, burst: u32, cap: usize) -> RateLimiter {
        RateLimiter::with_capacity(RateLimits { rate, burst }, cap)
    }

    fn allowed(v: Verdict) -> bool {
        v == Verdict::Allow
    }

    #[test]
    fn burst_then_rate_with_retry_after_and_sparse_logging() {
        let t0 = Instant::now();
        let mut l = lim(10, 4, 16);
        let a = ip("192.0.2.1");
        for _ in 0..4 {
            assert!(allowed(l.check(a, t0)));
        }
        // The fifth waits one interval (100 ms); only the first refusal is logged.
        assert_eq!(
            l.check(a, t0),
            Verdict::Limit {
                retry_after: Duration::from_millis(100),
                log: true
            }
        );
        assert_eq!(
            l.check(a, t0 + Duration::from_millis(40)),
            Verdict::Limit {
                retry_after: Duration::from_millis(60),
                log: false
            }
        );
        // Another source has its own budget.
        assert!(allowed(l.check(ip("192.0.2.2"), t0)));
        // One unit back after 100 ms, then refused again.
        let t1 = t0 + Duration::from_millis(100);
        assert!(allowed(l.check(a, t1)));
        assert!(!allowed(l.check(a, t1)));
        // Logged again only after LOG_EVERY.
        let t2 = t0 + LOG_EVERY;
        for _ in 0..4 {
            assert!(allowed(l.check(a, t2)));
        }
        assert!(matches!(l.check(a, t2), Verdict::Limit { log: true, .. }));
        assert_eq!(retry_after_secs(Duration::from_millis(100)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn sources_are_keyed_like_connlimit_and_zero_rate_is_off() {
        let t0 = Instant::now();
        let mut l = lim(1, 1, 16);
        assert!(allowed(l.check(ip("2001:db8:1:2::1"), t0)));
        assert!(!allowed(l.check(ip("2001:db8:1:2::ffff"), t0)), "same /64");
        assert!(allowed(l.check(ip("2001:db8:1:3::1"), t0)));
        assert!(allowed(l.check(ip("198.51.100.7"), t0)));
        assert!(!allowed(l.check(ip("::ffff:198.51.100.7"), t0)), "mapped IPv4");
        let mut off = lim(0, 1, 16);
        for _ in 0..1000 {
            assert!(allowed(off.check(ip("192.0.2.1"), t0)));
        }
        assert!(off.is_empty());
    }

    #[test]
    fn a_full_table_drops_full_buckets_first_then_the_nearest_to_full() {
        let t0 = Instant::now();
        let mut l = lim(1, 2, 2);
        let (a, b, c, d) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"), ip("192.0.2.4"));
        // a spends its whole burst; b one unit, and is full again a second later.
        assert!(allowed(l.check(a, t0)) && allowed(l.check(a, t0)));
        assert!(allowed(l.check(b, t0)));
        let t1 = t0 + Duration::from_secs(1);
        assert!(allowed(l.check(c, t1)));
        assert_eq!(l.len(), 2);
        // b went (it was full); a kept its spent budget: one unit back, then refused.
        assert!(allowed(l.check(a, t1)));
        assert!(!allowed(l.check(a, t1)));
        // No full bucket now: d takes the place of c, the nearest to full (a is further out).
        assert!(allowed(l.check(d, t1)));
        assert_eq!(l.len(), 2);
        assert!(!allowed(l.check(a, t1)), "a was kept");
        // c comes back as a fresh source with its whole burst.
        assert!(allowed(l.check(c, t1)) && allowed(l.check(c, t1)));
        assert_eq!(l.len(), 2);
    }

    proptest! {
        /// Whatever the arrival pattern, no source is admitted more than `burst + rate * w`
        /// times in any window of length `w`, and the table never holds more than its cap.
        #[test]
        fn admissions_stay_within_burst_plus_rate_and_memory_is_capped(
            rate in 1u32..20,
            burst in 1u32..10,
            cap in 1usize..6,
            ops in proptest::collection::vec((0u8..8, 0u64..400), 1..300),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            // Sources 0..cap fit the table: their bound must hold exactly.
            let mut l = lim(rate, burst, 8);
            let mut small = lim(rate, burst, cap);
            let mut admitted: Vec<Vec<Duration>> = vec![Vec::new(); 8];
            for (who, dt_ms) in ops {
                now += Duration::from_millis(dt_ms);
                let addr = IpAddr::from([10, 0, 0, who]);
                if allowed(l.check(addr, now)) {
                    admitted[usize::from(who)].push(now - t0);
                }
                let _ = small.check(addr, now);
                prop_assert!(small.len() <= cap);
                prop_assert!(l.len() <= 8);
            }
            for times in &admitted {
                for i in 0..times.len() {
                    for j in i..times.len() {
                        let w = (times[j] - times[i]).as_secs_f64();
                        let n = (j - i + 1) as f64;
                        prop_assert!(n <= f64::from(burst) + f64::from(rate) * w + 1e-9,
                            "{n} admitted in {w} s (rate {rate}, burst {burst})");
                    }
                }
            }
        }
    }
}
