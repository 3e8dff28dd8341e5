//! zstd frames from control (map responses), with the client's size limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::wire::zstdframe;

fuzz_target!(|data: &[u8]| {
    if let Ok(out) = zstdframe::decode(data, 1 << 20) {
        assert!(out.len() <= 1 << 20);
    }
});
