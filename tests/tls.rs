//! TLS around DERP, in-process: the standalone relay with a certificate from a throwaway CA, our
//! DERP client verifying it through `SSL_CERT_FILE`, and the ways it must refuse.
//!
//! One test in this binary on purpose: it sets `SSL_CERT_FILE` for the whole process before the
//! first TLS connection reads it (the client configuration is built once per process).

use std::{path::Path, time::Duration};

mod common;

use rand_core::{OsRng, RngCore};
use tinyscale::{
    derp::{
        client::{self, DerpEvent, Dial},
        server,
    },
    platform::tls::Acceptor,
    wire::keys::NodePrivate,
};
use tokio::net::TcpListener;

const DEADLINE: Duration = Duration::from_secs(20);

fn node_key() -> NodePrivate {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    NodePrivate::from_random(b)
}

fn dial(port: u16, host: &str, tls: bool) -> Dial {
    Dial {
        addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))],
        host: host.to_string(),
        tls,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn derp_over_tls_verifies_the_relay_certificate() {
    let dir = std::env::temp_dir().join(format!("tinyscale-test-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let Some(ca) = common::test_ca(&dir) else { return };
    // Only this test runs in this binary, and no TLS connection has been made yet.
    std::env::set_var("SSL_CERT_FILE", &ca.ca);
    std::env::remove_var("SSL_CERT_DIR");

    // Bad key material is refused at start-up, naming the option and the file.
    let swapped = Acceptor::from_pem_files(&ca.key, &ca.cert).err().unwrap();
    assert!(swapped.contains("tls_cert_path"), "{swapped}");
    let missing = Acceptor::from_pem_files(&ca.cert, Path::new("/nonexistent/key.pem"))
        .err()
        .unwrap();
    assert!(
        missing.contains("tls_key_path") && missing.contains("/nonexistent/key.pem"),
        "{missing}"
    );

    let acceptor = Acceptor::from_pem_files(&ca.cert, &ca.key).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let relay = std::sync::Arc::new(server::DerpServer::new(node_key(), None));
    let r = relay.clone();
    tokio::spawn(async move { r.serve(listener, Some(acceptor)).await });

    // Two clients over TLS, by IP (IP SAN) and by name (DNS SAN); a packet goes through.
    let (ka, kb) = (node_key(), node_key());
    let mut a = client::connect(&dial(port, "127.0.0.1", true), "/derp", &ka)
        .await
        .unwrap();
    let mut b = client::connect(&dial(port, "localhost", true), "/derp", &kb)
        .await
        .unwrap();
    assert_eq!(a.server_key(), relay.public_key());
    let start = std::time::Instant::now();
    while !relay.is_connected(&kb.public()) {
        assert!(start.elapsed() < DEADLINE, "b never registered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.send(kb.public(), b"over tls").await.unwrap();
    let got = tokio::time::timeout(DEADLINE, async {
        loop {
            if let DerpEvent::Packet { src, data } = b.recv().await.unwrap() {
                return (src, data);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!((got.0, &got.1[..]), (ka.public(), &b"over tls"[..]));

    // Go netcheck's HTTPS fallback: the latency-check request round trip, over TLS.
    let rtt = client::latency_check(&dial(port, "localhost", true), DEADLINE)
        .await
        .unwrap();
    assert!(rtt < DEADLINE, "{rtt:?}");
    // A name the certificate does not carry is refused, and says why.
    let e = client::connect(&dial(port, "derp.example.com", true), "/derp", &node_key())
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("DERP tls") && e.contains("certificate"), "{e}");
    // Plain HTTP to the TLS port gets no DERP session.
    assert!(client::connect(&dial(port, "127.0.0.1", false), "/derp", &node_key())
        .await
        .is_err());
    // The refused handshakes did not disturb the sessions already up. (A client that does not
    // trust the CA is refused too: tests/go_client.rs, untrusted_certificate_is_refused_with_a_hint.)
    assert!(relay.is_connected(&ka.public()) && relay.is_connected(&kb.public()));
    let _ = std::fs::remove_dir_all(&dir);
}
