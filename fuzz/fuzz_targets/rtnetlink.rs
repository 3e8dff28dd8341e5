//! rtnetlink address messages read by the network monitor.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::dataplane::netmon::rtnl;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = rtnl::parse(data) {
        for e in events {
            let _ = e.lan_prefix();
        }
    }
});
