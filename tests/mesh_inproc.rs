//! Two data-plane nodes in one process, no root and no TUN: each is a WireGuard tunnel
//! ([`WgPeers`]), one peer [`Endpoint`] (path discovery) and the disco keys, glued the way the
//! engine glues them, exchanging datagrams over an in-memory network with UDP between the
//! nodes' addresses and one DERP region that relays by node key. Time is virtual.
//!
//! The engine itself owns real sockets and a TUN device, so this harness stands one layer below
//! it: it checks that the sans-io cores together carry a ping's ICMP packet from A to B over
//! the direct path once disco has confirmed it, and over DERP when UDP between the nodes is
//! blocked.

use std::{
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use tinyscale::{
    dataplane::{
        magicsock::{
            demux::{self, Kind},
            endpoint::{self, DiscoOut, Endpoint, Path, PathStatus},
        },
        wg::{Outgoing, PeerConfig, WgPeers},
    },
    wire::{
        disco::{DiscoShared, Message},
        keys::{DiscoPrivate, NodePrivate, NodePublic},
        tailcfg::Node,
    },
};

/// The one DERP region of the mesh.
const REGION: i32 = 1;

/// How a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    Udp { from: SocketAddr, to: SocketAddr },
    Derp { from: NodePublic, to: NodePublic },
}

/// One datagram on the wire, with how it went.
struct Datagram {
    via: Via,
    data: Vec<u8>,
}

/// One node: its tunnel, its view of the other node, and what reached its "TUN".
struct Mesh {
    nodes: [Peer; 2],
    /// Datagrams in flight.
    wire: VecDeque<Datagram>,
    /// UDP between the nodes is dropped (DERP still relays).
    udp_blocked: bool,
    /// Every WireGuard data message delivered, with its path.
    delivered_data: Vec<Via>,
    now: Instant,
    tx_seq: u8,
}

struct Peer {
    key: NodePublic,
    ip: Ipv4Addr,
    udp: SocketAddr,
    wg: WgPeers,
    ep: Endpoint,
    shared: DiscoShared,
    tun: Vec<Vec<u8>>,
}

/// A tailcfg node as control would send it: one address, one endpoint, home DERP [`REGION`].
fn node(key: NodePublic, disco: &DiscoPrivate, ip: Ipv4Addr, udp: SocketAddr) -> Node {
    Node {
        key,
        disco_key: disco.public(),
        addresses: vec![format!("{ip}/32")],
        allowed_ips: vec![format!("{ip}/32")],
        endpoints: vec![udp.to_string()],
        home_derp: REGION,
        ..Default::default()
    }
}

impl Mesh {
    fn new() -> Mesh {
        let now = Instant::now();
        let keys = [NodePrivate::from_random([1; 32]), NodePrivate::from_random([2; 32])];
        let discos = [DiscoPrivate::from_random([3; 32]), DiscoPrivate::from_random([4; 32])];
        let ips = [Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2)];
        let udps: [SocketAddr; 2] = [
            "192.0.2.1:41641".parse().unwrap(),
            "198.51.100.2:41641".parse().unwrap(),
        ];
        let nodes = [0, 1].map(|i| {
            let j = 1 - i;
            let other = node(keys[j].public(), &discos[j], ips[j], udps[j]);
            let mut wg = WgPeers::new(&keys[i], 7 + i as u32);
            wg.set_peers([PeerConfig::from_node(&other)]);
            let mut ep = Endpoint::new(keys[i].public(), endpoint::Timing::default());
            ep.handle_node(&other, now);
            ep.set_my_endpoints(&[udps[i]]);
            Peer {
                key: keys[i].public(),
                ip: ips[i],
                udp: udps[i],
                wg,
                ep,
                shared: DiscoShared::new(&discos[i], &discos[j].public()),
                tun: Vec::new(),
            }
        });
        Mesh {
            nodes,
            wire: VecDeque::new(),
            udp_blocked: false,
            delivered_data: Vec::new(),
            now,
            tx_seq: 0,
        }
    }

    /// Node `i` sends a disco message along `out.to`.
    fn send_disco(&mut self, i: usize, out: DiscoOut) {
        self.tx_seq = self.tx_seq.wrapping_add(1);
        let data = self.nodes[i].shared.seal([self.tx_seq; 24], &out.msg);
        self.send_path(i, out.to, data);
    }

    fn send_path(&mut self, i: usize, path: Path, data: Vec<u8>) {
        let (me, other) = (&self.nodes[i], &self.nodes[1 - i]);
        let via = match path {
            Path::Udp(to) => Via::Udp { from: me.udp, to },
            Path::Derp(_) => Via::Derp {
                from: me.key,
                to: other.key,
            },
        };
        self.wire.push_back(Datagram { via, data });
    }

    /// Node `i` sends a WireGuard datagram to its peer along the path its endpoint picks (as
    /// the engine's `send_to_peer` does).
    fn send_wg(&mut self, i: usize, datagram: Vec<u8>) {
        let plan = {
            let seq = &mut self.tx_seq;
            self.nodes[i].ep.handle_send(self.now, &mut || {
                *seq = seq.wrapping_add(1);
                [*seq; 12]
            })
        };
        for d in plan.disco {
            self.send_disco(i, d);
        }
        for a in plan.spray.iter().copied().chain(plan.udp) {
            self.send_path(i, Path::Udp(a), datagram.clone());
        }
        if let Some(r) = plan.derp {
            self.send_path(i, Path::Derp(r), datagram);
        }
    }

    /// Node `i`'s TUN hands it `packet`.
    fn tun_send(&mut self, i: usize, packet: &[u8]) {
        if let Some(Outgoing { datagram, .. }) = self.nodes[i].wg.encapsulate(packet).expect("routable") {
            self.send_wg(i, datagram);
        }
    }

    /// Delivers what is on the wire (and what that triggers) until it is quiet, the clock
    /// advancing 1 ms per datagram; each node's endpoint timers run as they fall due.
    fn run(&mut self) {
        for _ in 0..10_000 {
            for i in 0..2 {
                if self.nodes[i].ep.poll_timeout().is_some_and(|t| t <= self.now) {
                    let mut seq = self.tx_seq;
                    let outs = self.nodes[i].ep.handle_timeout(self.now, &mut || {
                        seq = seq.wrapping_add(1);
                        [seq; 12]
                    });
                    self.tx_seq = seq;
                    for o in outs {
                        self.send_disco(i, o);
                    }
                }
            }
            let Some(d) = self.wire.pop_front() else { return };
            self.now += Duration::from_millis(1);
            self.deliver(d);
        }
        panic!("the mesh never went quiet");
    }

    fn deliver(&mut self, d: Datagram) {
        let (to, path, src) = match d.via {
            Via::Udp { from, to } => {
                if self.udp_blocked {
                    return;
                }
                let Some(i) = self.nodes.iter().position(|n| n.udp == to) else {
                    return;
                };
                (i, Path::Udp(from), Some(from.ip()))
            }
            Via::Derp { to, .. } => {
                let Some(i) = self.nodes.iter().position(|n| n.key == to) else {
                    return;
                };
                (i, Path::Derp(REGION), None)
            }
        };
        match demux::classify(&d.data) {
            Kind::Stun => {}
            Kind::Disco => {
                let Ok(msg) = self.nodes[to].shared.open(&d.data) else {
                    return;
                };
                let now = self.now;
                match msg {
                    Message::Ping { tx_id, .. } => {
                        if let Some(reply) = self.nodes[to].ep.handle_ping(path, tx_id, now).reply {
                            self.send_disco(to, reply);
                        }
                    }
                    Message::Pong { tx_id, .. } => {
                        self.nodes[to].ep.handle_pong(tx_id, path, now);
                    }
                    Message::CallMeMaybe { endpoints } => {
                        let mut seq = self.tx_seq;
                        let outs = self.nodes[to].ep.handle_call_me_maybe(&endpoints, now, &mut || {
                            seq = seq.wrapping_add(1);
                            [seq; 12]
                        });
                        self.tx_seq = seq;
                        for o in outs {
                            self.send_disco(to, o);
                        }
                    }
                }
            }
            Kind::WireGuard => {
                // Type 4: a transport data message (handshakes are 1-3).
                if d.data.first() == Some(&4) {
                    self.delivered_data.push(d.via);
                }
                let r = self.nodes[to].wg.decapsulate(src, &d.data);
                if let Some(p) = r.to_tun {
                    self.nodes[to].tun.push(p);
                }
                if let Some(reply) = r.reply {
                    self.send_path(to, path, reply);
                }
                for o in r.to_peers {
                    self.send_wg(to, o.datagram);
                }
            }
        }
    }

    /// An ICMP echo request from node `i` to the other node, as its TUN would hand it over.
    fn icmp_echo(&self, i: usize, seq: u16) -> Vec<u8> {
        let (src, dst) = (self.nodes[i].ip.octets(), self.nodes[1 - i].ip.octets());
        let mut p = vec![0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 1, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let sum = checksum(&p);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut icmp = vec![8, 0, 0, 0, 0, 1];
        icmp.extend_from_slice(&seq.to_be_bytes());
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(&icmp);
        p
    }
}

/// The Internet checksum.
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn a_ping_goes_direct_once_disco_confirms_the_path() {
    let mut m = Mesh::new();
    let first = m.icmp_echo(0, 1);
    m.tun_send(0, &first);
    m.run();
    assert_eq!(
        m.nodes[1].tun,
        [first],
        "the first echo arrives (queued during the handshake)"
    );
    let b_udp = m.nodes[1].udp;
    assert!(
        matches!(m.nodes[0].ep.path(m.now), PathStatus::Direct { addr, .. } if addr == b_udp),
        "disco confirmed the direct path: {:?}",
        m.nodes[0].ep.path(m.now)
    );
    m.delivered_data.clear();
    let second = m.icmp_echo(0, 2);
    m.tun_send(0, &second);
    m.run();
    assert_eq!(m.nodes[1].tun.last(), Some(&second));
    assert_eq!(
        m.delivered_data,
        [Via::Udp {
            from: m.nodes[0].udp,
            to: b_udp
        }],
        "one copy, over UDP only"
    );
}

#[test]
fn a_ping_goes_over_derp_while_udp_is_blocked() {
    let mut m = Mesh::new();
    m.udp_blocked = true;
    let first = m.icmp_echo(0, 1);
    m.tun_send(0, &first);
    m.run();
    assert_eq!(m.nodes[1].tun, [first], "the echo arrives through the relay");
    assert_eq!(m.nodes[0].ep.path(m.now), PathStatus::Derp(REGION));
    m.delivered_data.clear();
    let second = m.icmp_echo(0, 2);
    m.tun_send(0, &second);
    m.run();
    assert_eq!(m.nodes[1].tun.last(), Some(&second));
    let (a, b) = (m.nodes[0].key, m.nodes[1].key);
    assert_eq!(
        m.delivered_data,
        [Via::Derp { from: a, to: b }],
        "relayed, never direct"
    );
}

#[test]
fn a_direct_path_that_breaks_falls_back_to_derp() {
    let mut m = Mesh::new();
    let first = m.icmp_echo(0, 1);
    m.tun_send(0, &first);
    m.run();
    assert!(matches!(m.nodes[0].ep.path(m.now), PathStatus::Direct { .. }));
    // UDP between the nodes goes dark; once the direct address is no longer trusted
    // (Go trustUDPAddrDuration), packets take the relay again.
    m.udp_blocked = true;
    m.now += endpoint::Timing::default().trust_udp_addr_duration + Duration::from_secs(1);
    m.run();
    m.delivered_data.clear();
    let second = m.icmp_echo(0, 2);
    m.tun_send(0, &second);
    m.run();
    assert_eq!(m.nodes[1].tun.last(), Some(&second), "the echo still arrives");
    let (a, b) = (m.nodes[0].key, m.nodes[1].key);
    assert_eq!(m.delivered_data, [Via::Derp { from: a, to: b }], "through the relay");
}
