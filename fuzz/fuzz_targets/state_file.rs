//! The client's state file (keys + prefs) as the daemon checks it at start.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tinyscale::daemon::parse_state_file(data);
});
