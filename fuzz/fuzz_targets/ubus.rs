//! ubus: message framing, blob/blobmsg attrs and values, and the client state machine fed a
//! stream of frames from ubusd.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::wire::ubus::{self, blobmsg, Client, Method};

fuzz_target!(|data: &[u8]| {
    for a in blobmsg::attrs(data).flatten() {
        if let Ok((_, v)) = blobmsg::split_msg(&a) {
            let _ = blobmsg::value_of(a.id, v);
        }
    }
    let _ = blobmsg::table(data);
    let _ = ubus::decode(data);
    let mut client = Client::new(
        "tinyscale",
        vec![Method {
            name: "status",
            args: vec![("peers", blobmsg::BOOL)],
        }],
    );
    let mut rest = data;
    while let Ok(n) = ubus::frame_len(rest) {
        let Some(frame) = rest.get(..n) else { break };
        if n == 0 || client.handle_frame(frame).is_err() {
            break;
        }
        rest = &rest[n..];
        while client.poll_transmit().is_some() {}
        while client.poll_event().is_some() {}
    }
});
