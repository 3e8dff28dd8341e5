//! The coordinator's HTTP/2 server inside a Noise session: input bytes (after the client
//! preface, which the harness sends) go to the same code `/ts2021` runs once the handshake is
//! done (h2 frames, then the /machine/* handlers: register, map, set-dns, ...), over an
//! in-memory pipe. The session must end when the input does, without a panic.
#![no_main]
use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use tinyscale::{
    coordinator::{
        server::{self, Coordinator},
        state::{Settings, State},
        store::Store,
    },
    wire::keys::MachinePrivate,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn coordinator() -> Arc<Coordinator> {
    static C: OnceLock<Arc<Coordinator>> = OnceLock::new();
    C.get_or_init(|| {
        let settings = Settings {
            server_url: "http://127.0.0.1:1".into(),
            ..Settings::default()
        };
        let st = State::load(Store::open_in_memory().expect("in-memory store"), settings).expect("state");
        let c = Coordinator::new(st).expect("coordinator");
        // Thousands of inputs a second from one "peer": without this every register after the
        // first few would be answered 429 and the handler never reached.
        c.set_rate_limits(tinyscale::coordinator::ratelimit::RateLimits { rate: 0, burst: 1 });
        c
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    // One runtime per input: whatever the input left waiting (a map long-poll) is dropped with it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let coord = coordinator();
    let machine = MachinePrivate::from_random([7; 32]).public();
    rt.block_on(async move {
        let (mut client, srv) = tokio::io::duplex(1 << 16);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let session = tokio::spawn(server::serve_h2(coord, srv, machine, std::net::Ipv4Addr::LOCALHOST.into(), deadline));
        let mut sink = Vec::new();
        let talk = async {
            client.write_all(PREFACE).await?;
            client.write_all(data).await?;
            client.shutdown().await?;
            client.read_to_end(&mut sink).await
        };
        // Virtual time: the server's timeouts fire at once when nothing else can run.
        let _ = tokio::time::timeout(Duration::from_secs(30), talk).await;
        let _ = tokio::time::timeout(Duration::from_secs(30), session).await;
    });
});
