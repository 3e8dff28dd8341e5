//! The HTTP/1 request/response head parser (control /key and /ts2021 upgrade, DERP upgrade,
//! admin endpoints), URL parsing and the base64 decoder used for the Noise handshake header.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::wire::http1;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, used))) = http1::parse_head(data) {
        assert!(used <= data.len());
        let _ = head.path();
        let _ = head.query("k");
        let _ = head.content_length();
        let _ = head.header("upgrade");
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = http1::parse_url(s);
        let _ = http1::base64_decode(s);
        let _ = http1::origin_form("GET", s);
    }
});
