//! TS2021 Noise: the server's view of a client initiation, the client's view of the server's
//! reply, the early-payload header, and transport records (length framing + AEAD open).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tinyscale::wire::keys::MachinePrivate;
use tinyscale::wire::noise::{self, CipherState, RecordReader};

fuzz_target!(|data: &[u8]| {
    let server = MachinePrivate::from_random([1; 32]);
    let _ = noise::respond(&server, data, [2; 32]);
    let client = MachinePrivate::from_random([3; 32]);
    let (init, _) = noise::initiate(&client, &server.public(), 1, [4; 32]);
    let _ = init.finish(data);
    let _ = noise::parse_early_payload_header(data);
    // Records split at an input-chosen point, as the socket may deliver them.
    let cut = data.first().map_or(0, |&b| b as usize).min(data.len());
    let mut reader = RecordReader::new();
    let mut cipher = CipherState::new([5; 32]);
    for part in [&data[..cut], &data[cut..]] {
        reader.push(part);
        while let Ok(Some(_)) = reader.next_plaintext(&mut cipher) {}
    }
});
