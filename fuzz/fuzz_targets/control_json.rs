//! Control-plane JSON bodies: what the coordinator parses from clients (RegisterRequest,
//! MapRequest) and what the client parses from control (RegisterResponse, MapResponse, DERP map),
//! all through the key-folding decoder both sides use, and the framing of the map stream.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::wire::tailcfg::{self, DerpMap, MapRequest, MapResponse, RegisterRequest, RegisterResponse};

fuzz_target!(|data: &[u8]| {
    let _ = tailcfg::from_slice_folded::<RegisterRequest>(data);
    let _ = tailcfg::from_slice_folded::<MapRequest>(data);
    let _ = tailcfg::from_slice_folded::<RegisterResponse>(data);
    let _ = tailcfg::from_slice_folded::<DerpMap>(data);
    if let Ok(m) = serde_json::from_slice::<MapResponse>(data) {
        let mut nm = tinyscale::control::netmap::Netmap::default();
        nm.apply(m);
    }
    // The map long-poll body: length-prefixed JSON or zstd messages back to back.
    let mut stream = data.to_vec();
    while let Ok(Some(_)) = tinyscale::control::client::next_map_message(&mut stream) {}
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = tailcfg::parse_time(s);
        let _ = tailcfg::is_valid_cidr(s);
    }
});
