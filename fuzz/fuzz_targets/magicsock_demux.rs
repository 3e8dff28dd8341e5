//! One UDP datagram as magicsock receives it: classified by its first bytes, then handed to the
//! STUN, disco or WireGuard parser it was classified for.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::dataplane::magicsock::demux::{self, Kind};
use tinyscale::dataplane::wg::WgPeers;
use tinyscale::wire::keys::NodePrivate;
use tinyscale::{wire::disco, wire::stun};

fuzz_target!(|data: &[u8]| {
    match demux::classify(data) {
        Kind::Stun => {
            let _ = stun::parse_binding_response(data);
        }
        Kind::Disco => {
            let _ = disco::parse_header(data);
        }
        Kind::WireGuard => {
            let mut wg = WgPeers::new(&NodePrivate::from_random([9; 32]), 1);
            let _ = wg.decapsulate(None, data);
        }
    }
});
