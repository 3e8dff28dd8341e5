//! TCP receive coalescing for TUN writes (generic receive offload done by us): consecutive
//! segments of one TCP flow, decrypted in one burst, become a single large packet that the
//! kernel takes in one write and delivers (or re-segments, when forwarding) as one.
//!
//! Mirrors the facts behind wireguard-go `tun/offload_linux.go` and the kernel's own
//! `tcp_gro_receive`: with `IFF_VNET_HDR` every TUN packet is preceded by a 10-byte
//! `virtio_net_hdr`; a coalesced packet carries `gso_type` TCPV4/TCPV6, `gso_size` (the payload
//! of each original segment) and `NEEDS_CSUM` with the TCP checksum field holding only the
//! pseudo-header sum, as a NIC's GRO would hand it to the stack. Without it the receiving side
//! pays a system call, an skb, an IP/TCP receive and a reader wake-up per 1.2 KB segment.
//!
//! ```text
//! virtio_net_hdr  flags:1 gso_type:1 hdr_len:2 gso_size:2 csum_start:2 csum_offset:2
//!                 (native byte order: legacy virtio, which TUN uses unless told otherwise)
//! ```
//!
//! Only the plain case is merged, everything else passes through untouched: IPv4 without
//! options with DF and no fragmentation, or IPv6 with TCP as the first next header; identical
//! addresses, ports, TOS/TTL (traffic class, flow label, hop limit), ACK number, window and TCP
//! options; flags ACK (the last segment may add PSH); each segment starting where the previous
//! ended, all the size of the first but a shorter last one; at most 64 KiB in all. A packet is
//! only ever merged into the packet just before it, so order is kept exactly.
//!
//! Sans I/O: the caller [`push`](Coalescer::push)es decrypted packets, then
//! [`finish`](Coalescer::finish)es and writes each `(header, packet)` it yields, then clears.
#![forbid(unsafe_code)]

/// Size of the `virtio_net_hdr` that precedes every packet on an `IFF_VNET_HDR` TUN.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: checksum from `csum_start`, stored at `+csum_offset`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;

/// Largest coalesced packet (the IPv4 total-length limit; used for IPv6 too).
const MAX_COALESCED: usize = 65535;
/// TCP flag bits.
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// A `virtio_net_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM` or 0.
    pub flags: u8,
    /// `GSO_NONE`, `GSO_TCPV4`, `GSO_TCPV6`, ...
    pub gso_type: u8,
    /// Length of the IP and TCP headers.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (the TCP header).
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// The wire form (native byte order).
    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// Parses the wire form.
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> VnetHdr {
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }
}

/// Completes a partial checksum as the kernel asks with `F_NEEDS_CSUM` on a read: the one's
/// complement sum from `csum_start` to the end, stored at `csum_start + csum_offset`. Returns
/// false (packet left alone) if the offsets do not fit.
pub fn complete_checksum(pkt: &mut [u8], hdr: &VnetHdr) -> bool {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > pkt.len() {
        return false;
    }
    let c = !fold(sum(&pkt[start..], 0));
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// One's complement sum of `data` as big-endian 16-bit words, added to `acc` (unfolded).
fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The layout of a TCP packet that may be merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tcp {
    v6: bool,
    /// IP header length.
    iphl: usize,
    /// TCP header length.
    tcphl: usize,
    flags: u8,
    seq: u32,
    payload: usize,
}

/// Parses `pkt` as a mergeable TCP segment (see the module rules), or `None`.
fn parse(pkt: &[u8]) -> Option<Tcp> {
    let (v6, iphl) = match pkt.first()? >> 4 {
        4 => {
            // IHL 5 only, total length exact, protocol TCP, DF set, MF clear, offset 0.
            if pkt.len() < 20 || pkt[0] != 0x45 || usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) != pkt.len() {
                return None;
            }
            if pkt[9] != 6 || u16::from_be_bytes([pkt[6], pkt[7]]) != 0x4000 {
                return None;
            }
            (false, 20)
        }
        6 => {
            if pkt.len() < 40 || usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) + 40 != pkt.len() || pkt[6] != 6 {
                return None;
            }
            (true, 40)
        }
        _ => return None,
    };
    let tcp = pkt.get(iphl..iphl + 20)?;
    let tcphl = usize::from(tcp[12] >> 4) * 4;
    if tcphl < 20 || iphl + tcphl > pkt.len() || tcp[12] & 0x0f != 0 {
        return None;
    }
    let flags = tcp[13];
    if flags & !PSH != ACK || tcp[18..20] != [0, 0] {
        return None;
    }
    let payload = pkt.len() - iphl - tcphl;
    if payload == 0 {
        return None;
    }
    Some(Tcp {
        v6,
        iphl,
        tcphl,
        flags,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        payload,
    })
}

/// A coalesced (or passed-through) packet in the buffer.
#[derive(Debug, Clone, Copy)]
struct Item {
    start: usize,
    len: usize,
    /// Set while more segments may join: the flow's layout and expectations.
    group: Option<Group>,
}

#[derive(Debug, Clone, Copy)]
struct Group {
    tcp: Tcp,
    gso_size: usize,
    segments: usize,
    next_seq: u32,
    open: bool,
}

/// Packets waiting to be written to the TUN, merged where the rules allow.
#[derive(Debug, Clone, Default)]
pub struct Coalescer {
    buf: Vec<u8>,
    items: Vec<Item>,
    disabled: bool,
}

impl Coalescer {
    /// An empty coalescer that merges.
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    /// Stops merging (each packet passes through alone), e.g. after the kernel refused a
    /// coalesced write.
    pub fn disable(&mut self) {
        self.disabled = true;
    }

    /// Adds one IP packet, merging it into the previous one if it continues the same flow.
    pub fn push(&mut self, pkt: &[u8]) {
        let tcp = if self.disabled { None } else { parse(pkt) };
        if let Some(t) = tcp {
            if self.try_merge(pkt, t) {
                return;
            }
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(pkt);
        let group = tcp.map(|t| Group {
            tcp: t,
            gso_size: t.payload,
            segments: 1,
            next_seq: t.seq.wrapping_add(t.payload as u32),
            open: t.flags & PSH == 0,
        });
        self.items.push(Item {
            start,
            len: pkt.len(),
            group,
        });
    }

    fn try_merge(&mut self, pkt: &[u8], t: Tcp) -> bool {
        let Some(last) = self.items.last_mut() else {
            return false;
        };
        let Some(g) = last.group.as_mut() else { return false };
        let head = &self.buf[last.start..last.start + g.tcp.iphl + g.tcp.tcphl];
        let same_ip = if t.v6 {
            // Version/traffic class/flow label, next header, hop limit and addresses.
            head[0..4] == pkt[0..4] && head[6..40] == pkt[6..40]
        } else {
            // Version/IHL/TOS, flags/offset/TTL/protocol and addresses (not ID, length, sum).
            head[0..2] == pkt[0..2] && head[6..10] == pkt[6..10] && head[12..20] == pkt[12..20]
        };
        let (h, p) = (&head[g.tcp.iphl..], &pkt[t.iphl..]);
        // Ports, ACK number, data offset, window, urgent pointer and options must be equal.
        let same_tcp =
            h[0..4] == p[0..4] && h[8..13] == p[8..13] && h[14..16] == p[14..16] && h[18..] == p[18..t.tcphl];
        let fits = g.open
            && t.v6 == g.tcp.v6
            && t.tcphl == g.tcp.tcphl
            && t.seq == g.next_seq
            && t.payload <= g.gso_size
            && last.len + t.payload <= MAX_COALESCED;
        if !(fits && same_ip && same_tcp) {
            return false;
        }
        self.buf.extend_from_slice(&pkt[t.iphl + t.tcphl..]);
        last.len += t.payload;
        g.segments += 1;
        g.next_seq = g.next_seq.wrapping_add(t.payload as u32);
        if t.payload < g.gso_size || t.flags & PSH != 0 {
            g.open = false;
        }
        if t.flags & PSH != 0 {
            // PSH of the last segment applies to the whole.
            self.buf[last.start + g.tcp.iphl + 13] |= PSH;
        }
        true
    }

    /// Bytes waiting (the caller flushes past about one coalesced packet's worth, so a burst
    /// of GRO reads does not pile up megabytes).
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Number of packets to write.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Fixes the headers of merged packets (lengths, IPv4 header checksum, TCP pseudo-header
    /// sum) and returns every packet with the `virtio_net_hdr` to write before it: all zero for
    /// a packet that was not merged (the kernel checks it as any other), GSO for merged ones.
    pub fn finish(&mut self) -> impl Iterator<Item = (VnetHdr, &[u8])> {
        for it in &mut self.items {
            if let Some(g) = it.group.as_ref().filter(|g| g.segments > 1) {
                let p = &mut self.buf[it.start..it.start + it.len];
                let t = g.tcp;
                let tcp_len = it.len - t.iphl;
                let pseudo = if t.v6 {
                    p[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
                    sum(&p[8..40], 6 + tcp_len as u64)
                } else {
                    p[2..4].copy_from_slice(&(it.len as u16).to_be_bytes());
                    p[10..12].copy_from_slice(&[0, 0]);
                    let c = !fold(sum(&p[..20], 0));
                    p[10..12].copy_from_slice(&c.to_be_bytes());
                    sum(&p[12..20], 6 + tcp_len as u64)
                };
                // NEEDS_CSUM: the field holds the pseudo-header sum, not complemented.
                p[t.iphl + 16..t.iphl + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
            }
        }
        let buf = &self.buf;
        self.items.iter().map(move |it| {
            let hdr = match it.group {
                Some(g) if g.segments > 1 => VnetHdr {
                    flags: F_NEEDS_CSUM,
                    gso_type: if g.tcp.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                    hdr_len: (g.tcp.iphl + g.tcp.tcphl) as u16,
                    gso_size: g.gso_size as u16,
                    csum_start: g.tcp.iphl as u16,
                    csum_offset: 16,
                },
                _ => VnetHdr::default(),
            };
            (hdr, &buf[it.start..it.start + it.len])
        })
    }

    /// Forgets the packets, keeping the buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A TCP segment with correct checksums. `v6` picks the family; `id` is the IPv4 ID.
    fn seg(v6: bool, seq: u32, flags: u8, payload: &[u8], id: u16, opts: &[u8]) -> Vec<u8> {
        let tcphl = 20 + opts.len();
        let mut tcp = vec![0u8; tcphl];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&777u32.to_be_bytes());
        tcp[12] = ((tcphl / 4) as u8) << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
        tcp[20..].copy_from_slice(opts);
        tcp.extend_from_slice(payload);
        let mut p = if v6 {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            h.extend_from_slice(&[6, 64]);
            h.extend_from_slice(&[0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            h.extend_from_slice(&[0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            h
        } else {
            let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 100, 64, 0, 1, 100, 64, 0, 2];
            h[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&id.to_be_bytes());
            let c = !fold(sum(&h, 0));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h
        };
        let iphl = p.len();
        p.extend_from_slice(&tcp);
        let c = !fold(sum(&p[iphl..], pseudo_sum(&p, iphl)));
        p[iphl + 16..iphl + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn pseudo_sum(p: &[u8], iphl: usize) -> u64 {
        let len = (p.len() - iphl) as u64;
        if iphl == 40 {
            sum(&p[8..40], 6 + len)
        } else {
            sum(&p[12..20], 6 + len)
        }
    }

    /// What the kernel does with a GSO packet: complete the checksum, then split it into
    /// `gso_size` segments with their own lengths, IPv4 IDs (incrementing), sequence numbers,
    /// PSH on the last only, and full checksums.
    fn resegment(hdr: VnetHdr, pkt: &[u8]) -> Vec<Vec<u8>> {
        if hdr.gso_type == GSO_NONE {
            return vec![pkt.to_vec()];
        }
        let mut whole = pkt.to_vec();
        assert!(complete_checksum(&mut whole, &hdr));
        let iphl = usize::from(hdr.csum_start);
        assert_eq!(
            fold(sum(&whole[iphl..], pseudo_sum(&whole, iphl))),
            0xffff,
            "valid whole checksum"
        );
        let hl = usize::from(hdr.hdr_len);
        let v6 = hdr.gso_type == GSO_TCPV6;
        let seq0 = u32::from_be_bytes(whole[iphl + 4..iphl + 8].try_into().unwrap());
        let id0 = u16::from_be_bytes([whole[4], whole[5]]);
        let flags = whole[iphl + 13];
        let chunks: Vec<&[u8]> = whole[hl..].chunks(usize::from(hdr.gso_size)).collect();
        let n = chunks.len();
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut s = whole[..hl].to_vec();
                s.extend_from_slice(c);
                let seq = seq0.wrapping_add((i * usize::from(hdr.gso_size)) as u32);
                s[iphl + 4..iphl + 8].copy_from_slice(&seq.to_be_bytes());
                s[iphl + 13] = if i + 1 == n { flags } else { flags & !PSH };
                if v6 {
                    let l = (s.len() - 40) as u16;
                    s[4..6].copy_from_slice(&l.to_be_bytes());
                } else {
                    let l = s.len() as u16;
                    s[2..4].copy_from_slice(&l.to_be_bytes());
                    s[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
                    s[10..12].copy_from_slice(&[0, 0]);
                    let c = !fold(sum(&s[..20], 0));
                    s[10..12].copy_from_slice(&c.to_be_bytes());
                }
                s[iphl + 16..iphl + 18].copy_from_slice(&[0, 0]);
                let c = !fold(sum(&s[iphl..], pseudo_sum(&s, iphl)));
                s[iphl + 16..iphl + 18].copy_from_slice(&c.to_be_bytes());
                s
            })
            .collect()
    }

    fn run(c: &mut Coalescer, pkts: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
        for p in pkts {
            c.push(p);
        }
        let out = c.finish().map(|(h, p)| (h, p.to_vec())).collect();
        c.clear();
        out
    }

    fn stream(v6: bool, n: usize, size: usize, last: usize, psh_last: bool) -> Vec<Vec<u8>> {
        let opts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // NOP NOP timestamps
        (0..n)
            .map(|i| {
                let len = if i + 1 == n { last } else { size };
                let payload: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
                let flags = if i + 1 == n && psh_last { ACK | PSH } else { ACK };
                seg(v6, 1000 + (i * size) as u32, flags, &payload, 100 + i as u16, &opts)
            })
            .collect()
    }

    #[test]
    fn bulk_stream_becomes_one_gso_packet_and_resegments_exactly() {
        for v6 in [false, true] {
            let pkts = stream(v6, 40, 1228, 700, true);
            let mut c = Coalescer::new();
            let out = run(&mut c, &pkts);
            assert_eq!(out.len(), 1, "v6={v6}");
            let (h, p) = &out[0];
            assert_eq!(h.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            assert_eq!((h.flags, h.gso_size, h.csum_offset), (F_NEEDS_CSUM, 1228, 16));
            assert_eq!(usize::from(h.hdr_len), if v6 { 40 } else { 20 } + 32);
            assert_eq!(p.len(), pkts[0].len() + 39 * 1228 - 1228 + 700);
            assert_eq!(resegment(*h, p), pkts, "v6={v6}");
        }
    }

    #[test]
    fn too_big_splits_into_several() {
        let pkts = stream(false, 120, 1228, 1228, false);
        let mut c = Coalescer::new();
        let out = run(&mut c, &pkts);
        assert!(out.len() >= 3);
        assert!(out.iter().all(|(_, p)| p.len() <= MAX_COALESCED));
        let back: Vec<Vec<u8>> = out.iter().flat_map(|(h, p)| resegment(*h, p)).collect();
        assert_eq!(back, pkts);
    }

    #[test]
    fn non_mergeable_pass_through_in_order() {
        let opts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let a = seg(false, 1000, ACK, &[1; 500], 1, &opts);
        let gap = seg(false, 1600, ACK, &[2; 500], 2, &opts); // seq gap
        let fin = seg(false, 2100, ACK | 0x01, &[3; 500], 3, &opts); // FIN
        let other_opts = seg(false, 2600, ACK, &[4; 500], 4, &[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 2]);
        let bigger = seg(false, 3100, ACK, &[5; 600], 5, &opts); // starts a new group
        let pure_ack = seg(false, 3700, ACK, &[], 6, &opts);
        let mut no_df = seg(false, 3700, ACK, &[6; 100], 7, &opts);
        no_df[6] = 0;
        let udp = {
            let mut u = a.clone();
            u[9] = 17;
            u
        };
        let pkts = vec![a, gap, fin, other_opts, bigger, pure_ack, no_df, udp];
        let mut c = Coalescer::new();
        let out = run(&mut c, &pkts);
        assert!(out.iter().all(|(h, _)| *h == VnetHdr::default()));
        let back: Vec<Vec<u8>> = out.into_iter().map(|(_, p)| p).collect();
        assert_eq!(back, pkts, "untouched, in order");
    }

    #[test]
    fn flows_interleaved_keep_order() {
        let s1 = stream(false, 4, 1000, 1000, false);
        let s2 = stream(true, 4, 1000, 1000, false);
        let mixed: Vec<Vec<u8>> = s1.iter().zip(&s2).flat_map(|(a, b)| [a.clone(), b.clone()]).collect();
        let mut c = Coalescer::new();
        let out = run(&mut c, &mixed);
        let back: Vec<Vec<u8>> = out.iter().flat_map(|(h, p)| resegment(*h, p)).collect();
        assert_eq!(back, mixed);
        // Two runs of the same flow back to back do merge.
        let mut c = Coalescer::new();
        let out = run(&mut c, &s1);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn psh_ends_a_group_and_disable_stops_merging() {
        let mut pkts = stream(false, 3, 1000, 1000, false);
        pkts[1][20 + 13] |= PSH; // middle one pushes (checksum no longer matters here)
        let mut c = Coalescer::new();
        for p in &pkts {
            c.push(p);
        }
        assert_eq!(c.len(), 2);
        c.clear();
        c.disable();
        let out = run(&mut c, &stream(false, 5, 1000, 1000, false));
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn vnet_hdr_round_trip_and_partial_checksum() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1228,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::from_bytes(&h.to_bytes()), h);
        // A packet whose checksum field holds the pseudo sum completes to the real checksum.
        let p = seg(false, 5, ACK, &[9; 333], 1, &[]);
        let mut partial = p.clone();
        let ps = fold(pseudo_sum(&p, 20));
        partial[36..38].copy_from_slice(&ps.to_be_bytes());
        assert!(complete_checksum(&mut partial, &h));
        assert_eq!(partial, p);
        assert!(!complete_checksum(&mut [0u8; 30], &h));
    }

    proptest! {
        /// Any mix of stream segments, resegmented, gives back exactly what went in.
        #[test]
        fn coalesce_then_resegment_is_identity(
            sizes in proptest::collection::vec(1usize..1400, 1..60),
            v6 in any::<bool>(),
            psh_every in 1usize..20,
        ) {
            let mut seq = 7u32;
            let pkts: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| {
                let flags = if i % psh_every == psh_every - 1 { ACK | PSH } else { ACK };
                let p = seg(v6, seq, flags, &vec![i as u8; n], i as u16, &[]);
                seq = seq.wrapping_add(n as u32);
                p
            }).collect();
            let mut c = Coalescer::new();
            let out = run(&mut c, &pkts);
            let back: Vec<Vec<u8>> = out.iter().flat_map(|(h, p)| resegment(*h, p)).collect();
            prop_assert_eq!(back, pkts);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..8)) {
            let mut c = Coalescer::new();
            for d in &data {
                c.push(d);
            }
            let n = c.len();
            prop_assert!(n <= data.len());
            prop_assert_eq!(c.finish().count(), n);
        }
    }
}
