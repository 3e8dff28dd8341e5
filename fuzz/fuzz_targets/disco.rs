//! Disco: the cleartext header of a UDP/DERP disco packet and the decrypted message body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::wire::disco::{self, Message};

fuzz_target!(|data: &[u8]| {
    let _ = disco::looks_like_disco(data);
    let _ = disco::parse_header(data);
    if let Ok(m) = Message::decode(data) {
        let mut out = Vec::new();
        m.encode(&mut out);
    }
});
