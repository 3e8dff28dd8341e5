//! IP packets from the tunnel as the packet filter parses them (v4/v6, TCP/UDP/ICMP, fragments).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tinyscale::dataplane::filter::parse(data);
});
