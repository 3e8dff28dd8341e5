//! A batch of outgoing UDP datagrams, laid out for one `sendmmsg(2)` with UDP generic
//! segmentation offload (GSO).
//!
//! With GSO (Linux ≥ 4.18, `UDP_SEGMENT`), one send hands the kernel a buffer of datagrams to the
//! same destination, all of one size except a shorter last one; routing, netfilter and the
//! forwarding path then see one large packet instead of dozens, and the split into wire-sized
//! datagrams happens as late as possible (in the NIC, or just before it). wireguard-go
//! (`conn/bind_std.go`, `coalesceMessages`) and tailscale magicsock batch the same way: a bulk
//! TCP flow through the tunnel produces runs of full-size data messages to one peer.
//!
//! ```text
//! buf   [ d0 1312 ][ d1 1312 ][ d2 1312 ][ d3 600 ][ e0 1312 ][ f0 92 ][ f1 92 ]
//! runs  { dst A, seg 1312, len 4536 }              { dst B ... }        { dst A, seg 92, len 184 }
//!        (d3 is shorter: it ends the run)           (another destination starts a new run)
//! ```
//!
//! Sans I/O: the caller writes each datagram straight into [`SendBatch::spare`] (WireGuard
//! encrypts into it, so nothing is copied), [`commit`](SendBatch::commit)s it with its
//! destination, and at the end of a burst sends every [`Run`] (the `udp` shell does it in one
//! system call) and [`clear`](SendBatch::clear)s the batch. The buffer is kept and reused.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

/// Most datagrams the kernel accepts in one GSO send (Linux `UDP_MAX_SEGMENTS`, 64 up to 6.x).
pub const MAX_SEGMENTS: usize = 64;

/// Most payload bytes in one GSO send: the IPv4 total-length limit less the IPv4 and UDP headers
/// (IPv6 allows slightly more; one bound for both keeps it simple).
pub const MAX_GSO_BYTES: usize = 65535 - 20 - 8;

/// Consecutive datagrams to one destination, sent with one GSO call: all `seg` bytes long except
/// possibly the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Where every datagram of the run goes.
    pub dst: SocketAddr,
    /// Offset of the first datagram in the batch buffer.
    pub start: usize,
    /// Total bytes of the run.
    pub len: usize,
    /// The segment size: the length of every datagram but the last.
    pub seg: usize,
}

impl Run {
    /// Number of datagrams in the run.
    pub fn segments(&self) -> usize {
        self.len.div_ceil(self.seg)
    }

    /// A shorter datagram ends a run: nothing can follow it in the same GSO send.
    fn closed(&self) -> bool {
        self.len % self.seg != 0
    }
}

/// Datagrams waiting to be sent, back to back in one reusable buffer.
#[derive(Debug, Clone)]
pub struct SendBatch {
    buf: Vec<u8>,
    used: usize,
    runs: Vec<Run>,
    max_segments: usize,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch::new(MAX_SEGMENTS)
    }
}

impl SendBatch {
    /// An empty batch whose runs hold at most `max_segments` datagrams (1: no GSO, every datagram
    /// its own run).
    pub fn new(max_segments: usize) -> SendBatch {
        SendBatch {
            buf: Vec::new(),
            used: 0,
            runs: Vec::new(),
            max_segments: max_segments.clamp(1, MAX_SEGMENTS),
        }
    }

    /// Limits later runs to `max_segments` datagrams (1 once the socket has refused GSO).
    pub fn set_max_segments(&mut self, max_segments: usize) {
        self.max_segments = max_segments.clamp(1, MAX_SEGMENTS);
    }

    /// At least `len` writable bytes after the committed datagrams, for the next one. The buffer
    /// grows if needed and never shrinks; what was there before is garbage.
    pub fn spare(&mut self, len: usize) -> &mut [u8] {
        let end = self.used + len;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[self.used..end]
    }

    /// Appends the first `len` bytes of [`spare`](Self::spare) as a datagram to `dst`. A zero
    /// length is ignored (UDP could send it, but WireGuard never produces one).
    pub fn commit(&mut self, dst: SocketAddr, len: usize) {
        if len == 0 {
            return;
        }
        let start = self.used;
        self.spare(len);
        self.used += len;
        if let Some(r) = self.runs.last_mut() {
            if r.dst == dst
                && !r.closed()
                && len <= r.seg
                && r.segments() < self.max_segments
                && r.len + len <= MAX_GSO_BYTES
            {
                r.len += len;
                return;
            }
        }
        self.runs.push(Run {
            dst,
            start,
            len,
            seg: len,
        });
    }

    /// Copies `datagram` in and commits it (for datagrams not built in place).
    pub fn push(&mut self, dst: SocketAddr, datagram: &[u8]) {
        self.spare(datagram.len()).copy_from_slice(datagram);
        self.commit(dst, datagram.len());
    }

    /// The runs, in commit order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// The bytes of one run of this batch.
    pub fn bytes(&self, run: &Run) -> &[u8] {
        &self.buf[run.start..run.start + run.len]
    }

    /// Number of datagrams committed.
    pub fn datagrams(&self) -> usize {
        self.runs.iter().map(Run::segments).sum()
    }

    /// True when nothing is committed.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Forgets the committed datagrams, keeping the buffer.
    pub fn clear(&mut self) {
        self.used = 0;
        self.runs.clear();
    }
}

/// Splits a received buffer of datagrams coalesced by UDP GRO into the datagrams: `seg` bytes
/// each, the last possibly shorter. `seg` 0 (no GRO information) yields the buffer whole.
pub fn segments(buf: &[u8], seg: usize) -> std::slice::Chunks<'_, u8> {
    buf.chunks(if seg == 0 { buf.len().max(1) } else { seg })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    fn dgram(tag: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| tag.wrapping_add(i as u8)).collect()
    }

    /// Every run's datagrams, as (dst, bytes), in order.
    fn unbatch(b: &SendBatch) -> Vec<(SocketAddr, Vec<u8>)> {
        b.runs()
            .iter()
            .flat_map(|r| segments(b.bytes(r), r.seg).map(move |d| (r.dst, d.to_vec())))
            .collect()
    }

    #[test]
    fn equal_sizes_to_one_destination_make_one_run() {
        let mut b = SendBatch::default();
        for i in 0..10 {
            b.push(a(1), &dgram(i, 1312));
        }
        assert_eq!(
            b.runs(),
            &[Run {
                dst: a(1),
                start: 0,
                len: 13120,
                seg: 1312
            }]
        );
        assert_eq!(b.datagrams(), 10);
    }

    #[test]
    fn shorter_datagram_ends_the_run() {
        let mut b = SendBatch::default();
        b.push(a(1), &dgram(0, 1312));
        b.push(a(1), &dgram(1, 1312));
        b.push(a(1), &dgram(2, 600)); // joins as the short last one
        b.push(a(1), &dgram(3, 600)); // cannot follow a short one
        b.push(a(1), &dgram(4, 1312)); // longer than the run's segment: new run
        let shape: Vec<(usize, usize)> = b.runs().iter().map(|r| (r.seg, r.segments())).collect();
        assert_eq!(shape, vec![(1312, 3), (600, 1), (1312, 1)]);
    }

    #[test]
    fn destination_change_starts_a_run() {
        let mut b = SendBatch::default();
        b.push(a(1), &dgram(0, 100));
        b.push(a(2), &dgram(1, 100));
        b.push(a(1), &dgram(2, 100));
        assert_eq!(b.runs().len(), 3);
        assert_eq!(b.runs()[2].start, 200);
    }

    #[test]
    fn limits_segments_and_bytes() {
        let mut b = SendBatch::default();
        for i in 0..(MAX_SEGMENTS + 1) {
            b.push(a(1), &dgram(i as u8, 100));
        }
        let counts: Vec<usize> = b.runs().iter().map(Run::segments).collect();
        assert_eq!(counts, vec![MAX_SEGMENTS, 1]);

        let mut b = SendBatch::default();
        for i in 0..60 {
            b.push(a(1), &dgram(i, 1400));
        }
        assert!(b.runs().iter().all(|r| r.len <= MAX_GSO_BYTES));
        assert_eq!(b.runs()[0].segments(), MAX_GSO_BYTES / 1400);
        assert_eq!(b.datagrams(), 60);
    }

    #[test]
    fn without_gso_every_datagram_is_a_run() {
        let mut b = SendBatch::new(1);
        for i in 0..5 {
            b.push(a(1), &dgram(i, 1312));
        }
        assert_eq!(b.runs().len(), 5);
        assert!(b.runs().iter().all(|r| r.segments() == 1));
    }

    #[test]
    fn clear_reuses_the_buffer() {
        let mut b = SendBatch::default();
        for round in 0..3u8 {
            for i in 0..20u8 {
                let d = dgram(round.wrapping_mul(31).wrapping_add(i), 1000 + usize::from(i % 2) * 312);
                let len = d.len();
                b.spare(len + 32)[..len].copy_from_slice(&d);
                b.commit(a(1), len);
            }
            let cap = b.buf.len();
            assert_eq!(b.datagrams(), 20);
            let got = unbatch(&b);
            for (i, (_, d)) in got.iter().enumerate() {
                let i = i as u8;
                assert_eq!(
                    d,
                    &dgram(round.wrapping_mul(31).wrapping_add(i), 1000 + usize::from(i % 2) * 312)
                );
            }
            b.clear();
            assert!(b.is_empty());
            // A second round of the same shape needs no more memory.
            if round > 0 {
                assert_eq!(b.buf.len(), cap);
            }
        }
    }

    #[test]
    fn segments_splits_gro_buffers() {
        let buf = dgram(0, 250);
        let parts: Vec<usize> = segments(&buf, 100).map(<[u8]>::len).collect();
        assert_eq!(parts, vec![100, 100, 50]);
        assert_eq!(segments(&buf, 0).count(), 1);
        assert_eq!(segments(&[], 0).count(), 0);
    }

    proptest! {
        /// Whatever the sizes and destinations, unbatching gives back exactly what was pushed, in
        /// order, and every run is a valid GSO send.
        #[test]
        fn batch_round_trips(items in proptest::collection::vec((0u16..3, 1usize..1500, any::<u8>()), 0..200)) {
            let mut b = SendBatch::default();
            let mut want = Vec::new();
            for (port, len, tag) in items {
                let d = dgram(tag, len);
                b.push(a(port), &d);
                want.push((a(port), d));
            }
            prop_assert_eq!(unbatch(&b), want);
            for r in b.runs() {
                prop_assert!(r.segments() <= MAX_SEGMENTS);
                prop_assert!(r.len <= MAX_GSO_BYTES);
                let lens: Vec<usize> = segments(b.bytes(r), r.seg).map(<[u8]>::len).collect();
                prop_assert!(lens[..lens.len() - 1].iter().all(|&l| l == r.seg));
            }
        }
    }
}
