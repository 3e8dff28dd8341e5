//! The coordinator's ACL policy file: HuJSON (comments, trailing commas) and its checks.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::coordinator::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = Policy::parse(s);
});
