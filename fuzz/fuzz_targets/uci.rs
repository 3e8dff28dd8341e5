//! UCI config files (/etc/config/tinyscale, dhcp, network) and the option value parsers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::platform::uci;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = uci::parse(s);
    let _ = uci::parse_bool(s);
    let _ = uci::parse_duration(s);
});
