//! DERP: the frame reader (type + big-endian length framing) and every frame decoder, plus the
//! client/server info JSON carried inside the handshake frames.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tinyscale::derp::frame::{ClientInfo, Frame, FrameReader, ServerInfo};

fuzz_target!(|data: &[u8]| {
    let mut reader = FrameReader::new(64 << 10);
    reader.push(data);
    while let Ok(Some((ty, payload))) = reader.next_frame() {
        if let Ok(f) = Frame::decode(ty, payload) {
            let _ = f.to_vec();
        }
    }
    if let Some((&ty, rest)) = data.split_first() {
        let _ = Frame::decode(ty, Bytes::copy_from_slice(rest));
    }
    let _ = ClientInfo::from_json(data);
    let _ = ServerInfo::from_json(data);
});
