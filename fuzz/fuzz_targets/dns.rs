//! DNS: queries MagicDNS answers, responses from upstream resolvers, whole IP/UDP/TCP packets
//! seen on the tunnel, and resolv.conf.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::dataplane::dns;

fuzz_target!(|data: &[u8]| {
    let _ = dns::parse_query(data);
    let _ = dns::parse_response(data);
    let _ = dns::parse_packet(data);
    let _ = dns::servfail(data);
    if data.len() > 2 {
        let _ = dns::read_name(data, data[0] as usize);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = dns::parse_resolv_conf(s);
        let _ = dns::reverse_addr(s);
    }
});
