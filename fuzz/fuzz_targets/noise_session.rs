//! TS2021 Noise past the encryption, with the real handshake as the oracle: a random fuzz input
//! almost never forms a valid initiation or record, so this target builds them and lets the
//! input choose what happens to them.
//!
//! - Handshake: a valid initiation with one input-chosen byte changed must be refused (every byte
//!   is either the prologue's version, a header field, or covered by a MAC); unchanged, it must
//!   be accepted and both sides must agree on the handshake hash.
//! - Records: the input, split into plaintexts at input-chosen lengths, is sealed by the client and
//!   read by the server across input-chosen socket cuts. Untouched, every plaintext comes back
//!   intact and in order, with nothing left over; with one byte of the stream changed, what comes
//!   back before the error is a prefix of what was sent, and nothing forged is ever returned.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::wire::keys::MachinePrivate;
use tinyscale::wire::noise::{self, RecordReader};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let server = MachinePrivate::from_random([1; 32]);
    let client = MachinePrivate::from_random([3; 32]);
    let (init, msg) = noise::initiate(&client, &server.public(), 1 + u16::from(ctl), [4; 32]);

    // Handshake: flip one byte (position and mask from the input) or none.
    if let Some((&pos, &mask)) = rest.first().zip(rest.get(1)) {
        let mut bad = msg.to_vec();
        let i = usize::from(pos) % bad.len();
        bad[i] ^= mask;
        if mask != 0 {
            assert!(
                noise::respond(&server, &bad, [2; 32]).is_err(),
                "a changed initiation (byte {i}) was accepted"
            );
        }
    }
    let accepted = noise::respond(&server, &msg, [2; 32]).expect("a valid initiation is accepted");
    let mut client_t = init
        .finish(&accepted.response)
        .expect("the server's response is accepted");
    let mut server_t = accepted.transport;
    assert_eq!(client_t.handshake_hash(), server_t.handshake_hash());

    // Plaintexts: each takes a length byte from the input (times 17, so records up to the
    // 4,077-byte maximum and splits across several records happen), then that many bytes.
    let mut sent = Vec::new();
    let mut stream = Vec::new();
    let mut input = rest.get(2..).unwrap_or(&[]);
    while let Some((&n, tail)) = input.split_first() {
        let n = (usize::from(n) * 17).min(tail.len());
        let (p, tail) = tail.split_at(n);
        client_t.seal(p, &mut stream).expect("sealing within the nonce budget");
        // seal splits a plaintext over records of at most MAX_PLAINTEXT_SIZE.
        if p.is_empty() {
            sent.push(Vec::new());
        }
        sent.extend(p.chunks(noise::MAX_PLAINTEXT_SIZE).map(<[u8]>::to_vec));
        input = tail;
    }

    // Optionally corrupt one byte of the stream (ctl's low bit decides, data picks where).
    let corrupt = ctl & 1 == 1 && !stream.is_empty();
    if corrupt {
        let i = usize::from(ctl >> 1) * 31 % stream.len();
        stream[i] ^= 0x80;
    }

    // Deliver in cuts whose sizes come from the stream itself.
    let mut reader = RecordReader::new();
    let mut got = Vec::new();
    let mut err = None;
    let mut at = 0;
    while at < stream.len() && err.is_none() {
        let step = 1 + usize::from(stream[at]) * 13 % 4099;
        let end = (at + step).min(stream.len());
        reader.push(&stream[at..end]);
        at = end;
        loop {
            match server_t.open(&mut reader) {
                Ok(Some(p)) => got.push(p),
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
    }
    assert!(got.len() <= sent.len());
    assert_eq!(got[..], sent[..got.len()], "a record came back changed");
    if !corrupt {
        assert!(err.is_none(), "an untouched stream failed: {err:?}");
        assert_eq!(got.len(), sent.len());
        assert_eq!(reader.buffered(), 0);
    } else {
        assert!(
            err.is_some() || reader.buffered() > 0 || got.len() < sent.len(),
            "a corrupted stream read back in full"
        );
    }
});
