//! STUN binding requests (the relay's STUN server) and responses (netcheck, magicsock).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::wire::stun;

fuzz_target!(|data: &[u8]| {
    let _ = stun::is_stun(data);
    let _ = stun::parse_binding_request(data);
    let _ = stun::parse_binding_response(data);
});
