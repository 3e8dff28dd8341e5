//! TS2021 control-plane crypto: the Noise IK handshake and the record layer that carries HTTP/2.
//!
//! Mirrors tailscale `control/controlbase/{handshake,conn,messages}.go` (spec §2.3–§2.5). This is
//! `Noise_IK_25519_ChaChaPoly_BLAKE2s` with a Tailscale prologue, fixed-size handshake messages
//! and one deliberate departure from the Noise spec: the transport nonce counter is
//! **big-endian**, so a generic Noise library will not interoperate.
//!
//! Sans I/O. The caller supplies the ephemeral key bytes (from its RNG), moves the handshake
//! messages (HTTP upgrade header, first bytes of the stream) and feeds received bytes to a
//! [`RecordReader`]. The async wrapper lives in [`stream`].
//!
//! ```text
//! initiation (client -> server, 101 bytes, base64 in X-Tailscale-Handshake)
//!   0      2     3      5                37                        85          101
//!   | ver  | 01  | 0060 | ephemeral pub  | enc(machine pub) + tag   | tag(empty) |
//!     u16 BE        u16 BE
//! response (server -> client, 51 bytes, first bytes after the 101 response)
//!   0    1      3                35            51
//!   | 02 | 0030 | ephemeral pub  | tag(empty)  |
//! error (server -> client, in place of the response; unauthenticated hint)
//!   | 03 | len u16 BE | ASCII text |
//! record (both directions after the handshake; whole frame <= 4096 bytes)
//!   | 04 | len u16 BE | ChaCha20-Poly1305(ciphertext + 16-byte tag) |
//!   nonce = 00 00 00 00 || counter u64 BE, ad empty, one counter per direction
//! ```
#![forbid(unsafe_code)]

pub mod stream;

use std::fmt;

use blake2::{Blake2s256, Digest};
use chacha20poly1305::{
    aead::{AeadInPlace, KeyInit},
    ChaCha20Poly1305, Key, Nonce, Tag,
};

use crate::wire::keys::{MachinePrivate, MachinePublic};

/// Noise protocol name; `BLAKE2s(name)` seeds both `h` and `ck` (Go `protocolName`).
pub const PROTOCOL_NAME: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Prologue prefix; the decimal client version is appended (Go `protocolVersionPrefix`).
pub const PROLOGUE_PREFIX: &str = "Tailscale Control Protocol v";
/// Every message starts with a type byte and a u16 BE length (Go `headerLen`).
pub const HEADER_LEN: usize = 3;
/// Poly1305 tag length appended to every ciphertext.
pub const TAG_LEN: usize = 16;
/// Largest record on the wire, header included (Go `maxMessageSize`). Readers reject more, so
/// a peer cannot make us buffer an unbounded frame.
pub const MAX_FRAME_SIZE: usize = 4096;
/// Largest ciphertext (with tag) one record carries (Go `maxCiphertextSize`).
pub const MAX_CIPHERTEXT_SIZE: usize = MAX_FRAME_SIZE - HEADER_LEN;
/// Largest plaintext one record carries; writers split at this size (Go `maxPlaintextSize`).
pub const MAX_PLAINTEXT_SIZE: usize = MAX_CIPHERTEXT_SIZE - TAG_LEN;
/// Size of the initiation message: 5-byte header + 96-byte payload.
pub const INITIATION_LEN: usize = 101;
/// Declared payload length of an initiation: ephemeral 32 + sealed static 48 + tag 16.
pub const INITIATION_PAYLOAD_LEN: usize = 96;
/// Size of the response message: 3-byte header + 48-byte payload.
pub const RESPONSE_LEN: usize = 51;
/// Declared payload length of a response: ephemeral 32 + tag 16.
pub const RESPONSE_PAYLOAD_LEN: usize = 48;
/// Message type of the client's initiation (Go `msgTypeInitiation`).
pub const MSG_TYPE_INITIATION: u8 = 0x01;
/// Message type of the server's response (Go `msgTypeResponse`).
pub const MSG_TYPE_RESPONSE: u8 = 0x02;
/// Message type of the server's plaintext refusal (Go `msgTypeError`).
pub const MSG_TYPE_ERROR: u8 = 0x03;
/// Message type of a transport record (Go `msgTypeRecord`).
pub const MSG_TYPE_RECORD: u8 = 0x04;
/// First plaintext bytes of the optional server early payload (Go `earlyPayloadMagic`). The
/// leading `FF` can never start an HTTP/2 frame the server would send first, so it is unambiguous.
pub const EARLY_PAYLOAD_MAGIC: [u8; 5] = [0xff, 0xff, 0xff, b'T', b'S'];
/// Magic plus the u32 BE JSON length: what a client must peek before starting HTTP/2.
pub const EARLY_PAYLOAD_HEADER_LEN: usize = 9;
/// Largest early-payload JSON we accept. Go allows 10 MiB and tailscale-rs 1 KiB; 1 MiB is
/// plenty for `{"nodeKeyChallenge":…}` while bounding memory on a router.
pub const MAX_EARLY_PAYLOAD_LEN: usize = 1 << 20;
/// How many bytes of a server's 0x03 error text we keep; it is only a hint.
pub const SERVER_ERROR_TEXT_CAP: usize = 64;

/// The counter value Go treats as invalid, so at most 2^64-1 records per direction.
const NONCE_LIMIT: u64 = u64::MAX;

/// Why a handshake or record failed. Every variant is fatal for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoiseError {
    /// The initiation was not exactly [`INITIATION_LEN`] bytes.
    #[error("wrong handshake initiation size")]
    WrongInitiationSize,
    /// A message or record had an unexpected type byte.
    #[error("unexpected message type {0:#04x}")]
    UnexpectedType(u8),
    /// A handshake message declared (or had) the wrong payload length.
    #[error("wrong handshake message length")]
    WrongLength,
    /// A handshake message ended before its header did.
    #[error("handshake message truncated")]
    Truncated,
    /// A Diffie-Hellman result was all zeros (low-order peer key), which Go also refuses.
    #[error("peer public key is of low order")]
    WeakKey,
    /// AEAD authentication failed: wrong key, tampering, or lost sync.
    #[error("decryption failed")]
    Decrypt,
    /// A record header declared a ciphertext shorter than a tag or a frame over 4096 bytes.
    #[error("record length {0} out of range")]
    BadRecordLength(u16),
    /// The nonce counter for this direction is used up.
    #[error("cipher nonce counter exhausted")]
    CipherExhausted,
    /// The server answered the initiation with a 0x03 error message.
    #[error("server refused handshake: {0}")]
    ServerError(ServerErrorText),
}

impl NoiseError {
    /// Text a server should send back in a 0x03 frame ([`error_message`]) for this failure, or
    /// `None` when it should just close. Like Go, only framing faults are answered; crypto
    /// failures get no oracle.
    pub fn reply_text(&self) -> Option<&'static str> {
        match self {
            Self::WrongInitiationSize => Some("handshake initiation has the wrong size"),
            Self::UnexpectedType(_) => Some("handshake initiation has the wrong type"),
            Self::WrongLength => Some("handshake initiation has the wrong length"),
            _ => None,
        }
    }
}

/// The start of a server's unauthenticated 0x03 error text, kept inline so [`NoiseError`]
/// stays `Copy`. Displayed with non-printable bytes escaped, since anyone on path can forge it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ServerErrorText {
    len: u8,
    bytes: [u8; SERVER_ERROR_TEXT_CAP],
}

impl ServerErrorText {
    /// Keeps the first [`SERVER_ERROR_TEXT_CAP`] bytes of `text`.
    pub fn new(text: &[u8]) -> Self {
        let n = text.len().min(SERVER_ERROR_TEXT_CAP);
        let mut bytes = [0u8; SERVER_ERROR_TEXT_CAP];
        bytes[..n].copy_from_slice(&text[..n]);
        // n <= 64, so the cast cannot truncate.
        Self { len: n as u8, bytes }
    }

    /// The raw (possibly truncated) text bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Display for ServerErrorText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.as_bytes().escape_ascii())
    }
}

impl fmt::Debug for ServerErrorText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

// ---------------------------------------------------------------------------------------------
// Primitives: BLAKE2s, HMAC-BLAKE2s, HKDF, one-shot AEAD.

fn blake2s(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// HMAC (RFC 2104) over BLAKE2s with its 64-byte block. Keys here are always 32 bytes, so the
/// "hash long keys first" branch of HMAC never applies.
fn hmac_blake2s(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let mut inner = Blake2s256::new();
    inner.update(ipad);
    for p in parts {
        inner.update(p);
    }
    let inner: [u8; 32] = inner.finalize().into();
    blake2s(&[&opad, &inner])
}

/// Noise `HKDF(ck, ikm)` with two outputs (RFC 5869 with salt = ck, empty info).
fn hkdf2(ck: &[u8; 32], ikm: &[u8]) -> ([u8; 32], [u8; 32]) {
    let prk = hmac_blake2s(ck, &[ikm]);
    let t1 = hmac_blake2s(&prk, &[&[1]]);
    let t2 = hmac_blake2s(&prk, &[&t1, &[2]]);
    (t1, t2)
}

/// The transport nonce: 4 zero bytes then the counter BIG-endian (Noise says little-endian;
/// Tailscale does not, see Go `nonce.Increment`).
fn transport_nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

/// Running Noise `h` and `ck` during a handshake (Noise §5.2 SymmetricState).
struct SymmetricState {
    h: [u8; 32],
    ck: [u8; 32],
}

impl SymmetricState {
    /// Initialises from the protocol name and mixes in the versioned prologue and the server's
    /// static key (the IK pre-message `<- s`).
    fn new(version: u16, server: &MachinePublic) -> Self {
        // The name is 33 bytes, longer than HASHLEN, so Noise hashes it rather than padding.
        let h = blake2s(&[PROTOCOL_NAME.as_bytes()]);
        let mut s = Self { h, ck: h };
        s.mix_hash(format!("{PROLOGUE_PREFIX}{version}").as_bytes());
        s.mix_hash(server.as_bytes());
        s
    }

    fn mix_hash(&mut self, data: &[u8]) {
        self.h = blake2s(&[&self.h, data]);
    }

    /// `MixKey(DH(..))`: returns the single-use handshake key, or `WeakKey` for a zero DH result.
    fn mix_dh(&mut self, dh: [u8; 32]) -> Result<[u8; 32], NoiseError> {
        if dh == [0u8; 32] {
            return Err(NoiseError::WeakKey);
        }
        let (ck, k) = hkdf2(&self.ck, &dh);
        self.ck = ck;
        Ok(k)
    }

    /// Seals `buf` in place under `key` with the zero nonce and `ad = h`; returns the tag and
    /// mixes the ciphertext into `h`.
    fn encrypt_and_hash(&mut self, key: &[u8; 32], buf: &mut [u8]) -> [u8; TAG_LEN] {
        let aead = ChaCha20Poly1305::new(Key::from_slice(key));
        // A one-shot key with an empty/short buffer cannot exceed ChaCha20's length limit.
        let tag = aead
            .encrypt_in_place_detached(&Nonce::default(), &self.h, buf)
            .unwrap_or_default();
        let tag: [u8; TAG_LEN] = tag.into();
        self.h = blake2s(&[&self.h, buf, &tag]);
        tag
    }

    /// Opens `ciphertext || tag` into plaintext with `ad = h`, then mixes the ciphertext.
    fn decrypt_and_hash(&mut self, key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let body_len = sealed.len().checked_sub(TAG_LEN).ok_or(NoiseError::Decrypt)?;
        let (body, tag) = sealed.split_at(body_len);
        let mut plain = body.to_vec();
        let aead = ChaCha20Poly1305::new(Key::from_slice(key));
        aead.decrypt_in_place_detached(&Nonce::default(), &self.h, &mut plain, Tag::from_slice(tag))
            .map_err(|_| NoiseError::Decrypt)?;
        self.mix_hash(sealed);
        Ok(plain)
    }

    /// Noise `Split`: `(k1, k2)`; the initiator sends with k1.
    fn split(&self) -> ([u8; 32], [u8; 32]) {
        hkdf2(&self.ck, &[])
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake.

/// Client handshake state between sending the initiation and reading the response.
pub struct Initiator {
    state: SymmetricState,
    machine: MachinePrivate,
    ephemeral: MachinePrivate,
    server: MachinePublic,
    version: u16,
    /// Set when `es` or `ss` was all zeros; reported by [`Initiator::finish`] so that
    /// [`initiate`] stays infallible.
    weak: bool,
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initiator")
            .field("server", &self.server)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Builds the client's 101-byte initiation (`-> e, es, s, ss`) for control server `server`.
///
/// `version` is the client capver; it goes in the header and the prologue. `ephemeral` must be
/// 32 fresh random bytes (clamped here). Send the message base64-encoded in the
/// `X-Tailscale-Handshake` header, then pass the server's reply to [`Initiator::finish`].
pub fn initiate(
    machine: &MachinePrivate,
    server: &MachinePublic,
    version: u16,
    ephemeral: [u8; 32],
) -> (Initiator, [u8; INITIATION_LEN]) {
    let ephemeral = MachinePrivate::from_random(ephemeral);
    let mut s = SymmetricState::new(version, server);
    let mut msg = [0u8; INITIATION_LEN];
    msg[0..2].copy_from_slice(&version.to_be_bytes());
    msg[2] = MSG_TYPE_INITIATION;
    // 96 fits in a u16.
    msg[3..5].copy_from_slice(&(INITIATION_PAYLOAD_LEN as u16).to_be_bytes());

    // e
    let e_pub = ephemeral.public();
    msg[5..37].copy_from_slice(e_pub.as_bytes());
    s.mix_hash(e_pub.as_bytes());
    let mut weak = false;
    // es, then s sealed under it. A zero DH still yields a well-formed (useless) message; the
    // failure surfaces in finish() so the caller's flow stays the same.
    let k = s.mix_dh(ephemeral.dh(server.as_bytes())).unwrap_or_else(|_| {
        weak = true;
        [0u8; 32]
    });
    msg[37..69].copy_from_slice(machine.public().as_bytes());
    let tag = s.encrypt_and_hash(&k, &mut msg[37..69]);
    msg[69..85].copy_from_slice(&tag);
    // ss, then the empty payload's tag.
    let k = s.mix_dh(machine.dh(server.as_bytes())).unwrap_or_else(|_| {
        weak = true;
        [0u8; 32]
    });
    let tag = s.encrypt_and_hash(&k, &mut []);
    msg[85..101].copy_from_slice(&tag);

    let init = Initiator {
        state: s,
        machine: machine.clone(),
        ephemeral,
        server: *server,
        version,
        weak,
    };
    (init, msg)
}

impl Initiator {
    /// The protocol version sent in the initiation.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Completes the handshake with the server's reply (`<- e, ee, se`).
    ///
    /// `response` is the whole message including its 3-byte header, as returned by
    /// [`stream::read_response_message`]. A 0x03 error message yields
    /// [`NoiseError::ServerError`] with the server's text.
    pub fn finish(self, response: &[u8]) -> Result<Transport, NoiseError> {
        let Initiator {
            mut state,
            machine,
            ephemeral,
            weak,
            ..
        } = self;
        let header = response.get(..HEADER_LEN).ok_or(NoiseError::Truncated)?;
        let declared = usize::from(u16::from_be_bytes([header[1], header[2]]));
        match header[0] {
            MSG_TYPE_RESPONSE => {}
            MSG_TYPE_ERROR => {
                // Tolerate a short body: the text is a hint and we are failing anyway.
                let end = response.len().min(HEADER_LEN + declared);
                return Err(NoiseError::ServerError(ServerErrorText::new(
                    &response[HEADER_LEN..end],
                )));
            }
            t => return Err(NoiseError::UnexpectedType(t)),
        }
        if declared != RESPONSE_PAYLOAD_LEN || response.len() != RESPONSE_LEN {
            return Err(NoiseError::WrongLength);
        }
        if weak {
            return Err(NoiseError::WeakKey);
        }
        let mut re = [0u8; 32];
        re.copy_from_slice(&response[3..35]);
        state.mix_hash(&re);
        state.mix_dh(ephemeral.dh(&re))?; // ee
        let k = state.mix_dh(machine.dh(&re))?; // se
        state.decrypt_and_hash(&k, &response[35..51])?;
        let (k1, k2) = state.split();
        Ok(Transport::new(k1, k2, state.h))
    }
}

/// A handshake the server accepted.
#[derive(Debug)]
pub struct Accepted {
    /// Record layer keyed for the server side (sends with k2, receives with k1).
    pub transport: Transport,
    /// The client's machine key, decrypted from the initiation. Every request on this
    /// connection must be checked against it.
    pub peer: MachinePublic,
    /// The client's protocol version (capver) from the initiation header.
    pub version: u16,
    /// The 51-byte response to write right after the HTTP 101 headers.
    pub response: [u8; RESPONSE_LEN],
}

/// Server side: validates and answers a client initiation (`init` is the decoded
/// `X-Tailscale-Handshake` header). `ephemeral` must be 32 fresh random bytes.
///
/// On `Err`, send [`error_message`] with [`NoiseError::reply_text`] if it has one, then close.
pub fn respond(server: &MachinePrivate, init: &[u8], ephemeral: [u8; 32]) -> Result<Accepted, NoiseError> {
    if init.len() != INITIATION_LEN {
        return Err(NoiseError::WrongInitiationSize);
    }
    if init[2] != MSG_TYPE_INITIATION {
        return Err(NoiseError::UnexpectedType(init[2]));
    }
    if usize::from(u16::from_be_bytes([init[3], init[4]])) != INITIATION_PAYLOAD_LEN {
        return Err(NoiseError::WrongLength);
    }
    // The prologue uses the client's version, not ours: Go leaves version policy to callers.
    let version = u16::from_be_bytes([init[0], init[1]]);
    let mut s = SymmetricState::new(version, &server.public());

    let mut ie = [0u8; 32];
    ie.copy_from_slice(&init[5..37]);
    s.mix_hash(&ie);
    let k = s.mix_dh(server.dh(&ie))?; // es
    let peer_bytes = s.decrypt_and_hash(&k, &init[37..85])?;
    let mut peer = [0u8; 32];
    peer.copy_from_slice(&peer_bytes);
    let k = s.mix_dh(server.dh(&peer))?; // ss
    s.decrypt_and_hash(&k, &init[85..101])?;

    let ephemeral = MachinePrivate::from_random(ephemeral);
    let e_pub = ephemeral.public();
    let mut response = [0u8; RESPONSE_LEN];
    response[0] = MSG_TYPE_RESPONSE;
    // 48 fits in a u16.
    response[1..3].copy_from_slice(&(RESPONSE_PAYLOAD_LEN as u16).to_be_bytes());
    response[3..35].copy_from_slice(e_pub.as_bytes());
    s.mix_hash(e_pub.as_bytes());
    s.mix_dh(ephemeral.dh(&ie))?; // ee
    let k = s.mix_dh(ephemeral.dh(&peer))?; // se
    let tag = s.encrypt_and_hash(&k, &mut []);
    response[35..51].copy_from_slice(&tag);

    let (k1, k2) = s.split();
    Ok(Accepted {
        transport: Transport::new(k2, k1, s.h),
        peer: MachinePublic(peer),
        version,
        response,
    })
}

/// A 0x03 error frame carrying `text`, truncated to 65535 bytes. Send it instead of a response
/// when refusing a handshake; never put attacker-supplied input in it.
pub fn error_message(text: &str) -> Vec<u8> {
    let body = &text.as_bytes()[..text.len().min(usize::from(u16::MAX))];
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(MSG_TYPE_ERROR);
    // body.len() <= u16::MAX by construction.
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The early-payload plaintext (spec §2.5): magic, u32 BE length, then `json` (normally
/// `{"nodeKeyChallenge":"chalpub:<hex>"}`). A server seals it as the first plaintext, before
/// HTTP/2 starts.
pub fn early_payload(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(EARLY_PAYLOAD_HEADER_LEN + json.len());
    out.extend_from_slice(&EARLY_PAYLOAD_MAGIC);
    // Payloads are tiny; saturate rather than wrap if a caller ever passes >4 GiB.
    out.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(json);
    out
}

/// Parses the first [`EARLY_PAYLOAD_HEADER_LEN`] plaintext bytes: the JSON length if they carry
/// the early-payload magic, `None` if they are something else (the start of HTTP/2).
pub fn parse_early_payload_header(first: &[u8]) -> Option<usize> {
    if first.len() < EARLY_PAYLOAD_HEADER_LEN || first[..5] != EARLY_PAYLOAD_MAGIC {
        return None;
    }
    usize::try_from(u32::from_be_bytes([first[5], first[6], first[7], first[8]])).ok()
}

// ---------------------------------------------------------------------------------------------
// Transport.

/// One direction's ChaCha20-Poly1305 key and big-endian nonce counter. Deliberately not
/// `Clone`: two copies would reuse nonces.
pub struct CipherState {
    aead: ChaCha20Poly1305,
    nonce: u64,
    /// Set after a failed decryption: the stream is out of sync and must not be used again
    /// (Go drops its cipher for the same reason).
    failed: bool,
}

impl fmt::Debug for CipherState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CipherState")
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl CipherState {
    /// A cipher keyed with `key`, counter at zero.
    pub fn new(key: [u8; 32]) -> Self {
        Self {
            aead: ChaCha20Poly1305::new(Key::from_slice(&key)),
            nonce: 0,
            failed: false,
        }
    }

    /// The counter the next operation will use.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// How many more messages this direction may carry.
    fn remaining(&self) -> u64 {
        NONCE_LIMIT - self.nonce
    }

    /// Seals `buf` in place and returns the tag, advancing the counter.
    fn seal_in_place(&mut self, buf: &mut [u8]) -> Result<[u8; TAG_LEN], NoiseError> {
        if self.nonce == NONCE_LIMIT {
            return Err(NoiseError::CipherExhausted);
        }
        let n = transport_nonce(self.nonce);
        let tag = self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(&n), &[], buf)
            // Only fails for buffers beyond ChaCha20's 256 GiB limit; records are <= 4077 bytes.
            .map_err(|_| NoiseError::CipherExhausted)?;
        self.nonce += 1;
        Ok(tag.into())
    }

    /// Opens `ciphertext || tag`, advancing the counter. A failure poisons this cipher.
    pub fn decrypt(&mut self, sealed: &[u8]) -> Result<Vec<u8>, NoiseError> {
        if self.failed {
            return Err(NoiseError::Decrypt);
        }
        if self.nonce == NONCE_LIMIT {
            return Err(NoiseError::CipherExhausted);
        }
        let body_len = sealed.len().checked_sub(TAG_LEN).ok_or(NoiseError::Decrypt)?;
        let (body, tag) = sealed.split_at(body_len);
        let mut plain = body.to_vec();
        let n = transport_nonce(self.nonce);
        // The counter advances even on failure, as in Go; the poison flag makes it moot.
        self.nonce += 1;
        match self
            .aead
            .decrypt_in_place_detached(Nonce::from_slice(&n), &[], &mut plain, Tag::from_slice(tag))
        {
            Ok(()) => Ok(plain),
            Err(_) => {
                self.failed = true;
                Err(NoiseError::Decrypt)
            }
        }
    }
}

/// The post-handshake record layer: one cipher per direction.
#[derive(Debug)]
pub struct Transport {
    send: CipherState,
    recv: CipherState,
    handshake_hash: [u8; 32],
}

impl Transport {
    fn new(send: [u8; 32], recv: [u8; 32], handshake_hash: [u8; 32]) -> Self {
        Self {
            send: CipherState::new(send),
            recv: CipherState::new(recv),
            handshake_hash,
        }
    }

    /// The final Noise `h`, usable for channel binding (Go `Conn.HandshakeHash`).
    pub fn handshake_hash(&self) -> [u8; 32] {
        self.handshake_hash
    }

    /// Appends `plaintext` to `out` as 0x04 records of at most [`MAX_FRAME_SIZE`] bytes each.
    /// An empty plaintext produces one empty record (legal, 19 bytes). Fails without appending
    /// anything if the send counter cannot cover every record.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), NoiseError> {
        let records = plaintext.len().div_ceil(MAX_PLAINTEXT_SIZE).max(1);
        if u64::try_from(records).map_or(true, |r| r > self.send.remaining()) {
            return Err(NoiseError::CipherExhausted);
        }
        out.reserve(plaintext.len() + records * (HEADER_LEN + TAG_LEN));
        let mut chunks = plaintext.chunks(MAX_PLAINTEXT_SIZE);
        let mut next = Some(chunks.next().unwrap_or(&[]));
        while let Some(chunk) = next {
            out.push(MSG_TYPE_RECORD);
            // chunk.len() + 16 <= 4093 fits in a u16.
            out.extend_from_slice(&((chunk.len() + TAG_LEN) as u16).to_be_bytes());
            let start = out.len();
            out.extend_from_slice(chunk);
            let tag = self.send.seal_in_place(&mut out[start..])?;
            out.extend_from_slice(&tag);
            next = chunks.next();
        }
        Ok(())
    }

    /// Decrypts the next whole record buffered in `reader`; shorthand for
    /// `reader.next_plaintext(transport.receiver())`.
    pub fn open(&mut self, reader: &mut RecordReader) -> Result<Option<Vec<u8>>, NoiseError> {
        reader.next_plaintext(&mut self.recv)
    }

    /// The send-direction cipher (client: k1, server: k2).
    pub fn sender(&mut self) -> &mut CipherState {
        &mut self.send
    }

    /// The receive-direction cipher (client: k2, server: k1).
    pub fn receiver(&mut self) -> &mut CipherState {
        &mut self.recv
    }
}

/// Reassembles 0x04 records from arbitrary byte chunks (partial records across reads).
///
/// Call [`RecordReader::push`] with whatever arrived, then [`RecordReader::next_plaintext`]
/// until it returns `Ok(None)`. After any error the reader stays failed.
#[derive(Debug, Default)]
pub struct RecordReader {
    buf: Vec<u8>,
    /// Offset of the first unconsumed byte; compacted lazily to avoid quadratic copying.
    start: usize,
    failed: Option<NoiseError>,
}

impl RecordReader {
    /// An empty reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Buffers received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= MAX_FRAME_SIZE && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Frees the buffer's room if every byte was consumed and it grew past `keep` bytes (an idle
    /// connection then holds no read buffer).
    pub fn release_if_empty(&mut self, keep: usize) {
        if self.start == self.buf.len() && self.buf.capacity() > keep {
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    /// Bytes received but not yet consumed as whole records. Non-zero at EOF means the peer
    /// stopped mid-record.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next record's plaintext, `Ok(None)` if no whole record is buffered yet. Zero-length
    /// plaintexts are returned as empty vectors. Header faults are reported as soon as the
    /// 3-byte header is in, without waiting for the body.
    pub fn next_plaintext(&mut self, cipher: &mut CipherState) -> Result<Option<Vec<u8>>, NoiseError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let pending = &self.buf[self.start..];
        let Some(header) = pending.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u16::from_be_bytes([header[1], header[2]]);
        let result = if header[0] != MSG_TYPE_RECORD {
            Err(NoiseError::UnexpectedType(header[0]))
        } else if usize::from(len) > MAX_CIPHERTEXT_SIZE || usize::from(len) < TAG_LEN {
            Err(NoiseError::BadRecordLength(len))
        } else {
            let total = HEADER_LEN + usize::from(len);
            match pending.get(HEADER_LEN..total) {
                None => return Ok(None),
                Some(sealed) => {
                    let r = cipher.decrypt(sealed);
                    self.start += total;
                    r
                }
            }
        };
        match result {
            Ok(p) => Ok(Some(p)),
            Err(e) => {
                self.failed = Some(e);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chacha20poly1305::aead::Aead;
    use proptest::prelude::*;

    use super::*;
    use crate::wire::keys::hex_encode;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn keys() -> (MachinePrivate, MachinePrivate) {
        (
            MachinePrivate::from_random([0x11; 32]),
            MachinePrivate::from_random([0x22; 32]),
        )
    }

    /// Runs a full handshake with fixed keys: (client transport, server accepted).
    fn pair() -> (Transport, Accepted) {
        let (machine, server) = keys();
        let (init, msg) = initiate(&machine, &server.public(), 130, [0x33; 32]);
        let acc = respond(&server, &msg, [0x44; 32]).unwrap();
        let client = init.finish(&acc.response).unwrap();
        (client, acc)
    }

    /// Pushes `wire` into a reader and collects every plaintext.
    fn open_all(t: &mut Transport, wire: &[u8]) -> Vec<u8> {
        let mut r = RecordReader::new();
        r.push(wire);
        let mut out = Vec::new();
        while let Some(p) = t.open(&mut r).unwrap() {
            out.extend_from_slice(&p);
        }
        assert_eq!(r.buffered(), 0);
        out
    }

    // Known-answer vector. Derived with an independent Python implementation of spec §2.3/§2.4
    // (hashlib.blake2s + hmac for HKDF, pyca/cryptography X25519 and ChaCha20Poly1305), keys:
    // machine = clamp(11*32), server = clamp(22*32), client eph = clamp(33*32),
    // server eph = clamp(44*32), version 130.
    const KAT_NAME_HASH: &str = "bbea022b948cf3bc5857d70804229179e1116bc40cb8cc074835349c464bca36";
    const KAT_INIT: &str = "
        0082 01 0060
        7b0d47d93427f8311160781c7c733fd89f88970aef490d8aa0ee19a4cb8a1b14
        61d2949213e755bc180b5d5dbbd8c50a2a1beb69f8940d24cab4606a34cd5d41 d3436702f1e655d68edaf704e1f548b7
        14f83a929d0d0448498ccd808f757285";
    const KAT_RESP: &str = "
        02 0030
        ff2ee45601ec1b67310c7790404585ae697331eee1c1f8cf2419731c1fff3e6b
        e3f6ce89a1966bab3d8310c9a165b36e";
    const KAT_HASH: &str = "bd97436042c7e17fae7dd82ba2dc22014f3e6da0bbe89fb6575a037d73c408f3";
    const KAT_K1: &str = "eca6bee256efc1368a5af89be3a82cc3e7954223faf3d6b4e67ed66c671a814e";
    const KAT_K2: &str = "df92698929c58533e6973a3e010a3c8e4e1d394f1c9c198788b496512c6bb48a";
    /// Client records "hello" (counter 0) and "world" (counter 1) under k1.
    const KAT_C2S: &str =
        "0400158dbec8f77738728dd69aca7e58427c2321d84a26dd 040015853ef0a1ac5262a8d877069b1424e751ed97c812fc";
    /// Server record "ok" (counter 0) under k2.
    const KAT_S2C: &str = "0400120bd70c0623f14bd2df40715115c84746006f";

    #[test]
    fn known_answer_vector() {
        assert_eq!(hex_encode(&blake2s(&[PROTOCOL_NAME.as_bytes()])), KAT_NAME_HASH);
        let (machine, server) = keys();
        let (init, msg) = initiate(&machine, &server.public(), 130, [0x33; 32]);
        assert_eq!(msg.to_vec(), unhex(KAT_INIT));

        let mut acc = respond(&server, &msg, [0x44; 32]).unwrap();
        assert_eq!(acc.response.to_vec(), unhex(KAT_RESP));
        assert_eq!(acc.peer, machine.public());
        assert_eq!(acc.version, 130);
        assert_eq!(hex_encode(&acc.transport.handshake_hash()), KAT_HASH);

        let mut client = init.finish(&acc.response).unwrap();
        assert_eq!(hex_encode(&client.handshake_hash()), KAT_HASH);
        let mut wire = Vec::new();
        client.seal(b"hello", &mut wire).unwrap();
        client.seal(b"world", &mut wire).unwrap();
        assert_eq!(wire, unhex(KAT_C2S));
        assert_eq!(open_all(&mut acc.transport, &wire), b"helloworld");

        let mut wire = Vec::new();
        acc.transport.seal(b"ok", &mut wire).unwrap();
        assert_eq!(wire, unhex(KAT_S2C));
        assert_eq!(open_all(&mut client, &wire), b"ok");
    }

    #[test]
    fn nonce_is_big_endian_and_client_sends_with_k1() {
        // Decrypt the client's SECOND record (counter 1) directly with the AEAD crate: at
        // counter 0 big- and little-endian nonces coincide, so only counter 1 tells them apart.
        let (mut client, _acc) = pair();
        let mut wire = Vec::new();
        client.seal(b"first", &mut wire).unwrap();
        let first_len = wire.len();
        client.seal(b"second", &mut wire).unwrap();
        let rec = &wire[first_len..];
        assert_eq!(rec[0], MSG_TYPE_RECORD);
        assert_eq!(usize::from(u16::from_be_bytes([rec[1], rec[2]])), 6 + TAG_LEN);

        let k1 = unhex(KAT_K1);
        let aead = ChaCha20Poly1305::new(Key::from_slice(&k1));
        let be = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let le = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(aead.decrypt(Nonce::from_slice(&be), &rec[3..]).unwrap(), b"second");
        assert!(aead.decrypt(Nonce::from_slice(&le), &rec[3..]).is_err());
        // And the client does not send with k2.
        let k2 = ChaCha20Poly1305::new(Key::from_slice(&unhex(KAT_K2)));
        assert!(k2.decrypt(Nonce::from_slice(&be), &rec[3..]).is_err());
    }

    #[test]
    fn hmac_blake2s_matches_rfc2104_shape() {
        // HMAC with a key equal to one full block of zeros in our 32-byte form must equal
        // BLAKE2s((0x5c*64) || BLAKE2s((0x36*64) || m)).
        let key = [0u8; 32];
        let inner = blake2s(&[&[0x36u8; 64], b"msg"]);
        assert_eq!(hmac_blake2s(&key, &[b"m", b"sg"]), blake2s(&[&[0x5cu8; 64], &inner]));
    }

    #[test]
    fn full_handshake_and_bidirectional_transport() {
        let (mut client, mut acc) = pair();
        assert_eq!(client.handshake_hash(), acc.transport.handshake_hash());
        for size in [
            0usize,
            1,
            MAX_PLAINTEXT_SIZE,
            MAX_PLAINTEXT_SIZE + 1,
            3 * MAX_PLAINTEXT_SIZE,
            10_000,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
            let mut wire = Vec::new();
            client.seal(&data, &mut wire).unwrap();
            assert_eq!(open_all(&mut acc.transport, &wire), data);
            let mut wire = Vec::new();
            acc.transport.seal(&data, &mut wire).unwrap();
            assert_eq!(open_all(&mut client, &wire), data);
        }
    }

    #[test]
    fn seal_splits_records_at_the_frame_limit() {
        let (mut client, _) = pair();
        let mut wire = Vec::new();
        client.seal(&vec![0u8; MAX_PLAINTEXT_SIZE], &mut wire).unwrap();
        assert_eq!(wire.len(), MAX_FRAME_SIZE);
        let mut wire = Vec::new();
        client.seal(&vec![0u8; MAX_PLAINTEXT_SIZE + 1], &mut wire).unwrap();
        assert_eq!(wire.len(), MAX_FRAME_SIZE + HEADER_LEN + 1 + TAG_LEN);
        assert_eq!(&wire[MAX_FRAME_SIZE..MAX_FRAME_SIZE + 3], &[4, 0, 17]);
        let mut wire = Vec::new();
        client.seal(&[], &mut wire).unwrap();
        assert_eq!(wire.len(), HEADER_LEN + TAG_LEN);
    }

    #[test]
    fn wrong_server_key_is_refused() {
        let (machine, server) = keys();
        let other = MachinePrivate::from_random([0x55; 32]);
        let (_init, msg) = initiate(&machine, &other.public(), 130, [0x33; 32]);
        assert_eq!(respond(&server, &msg, [0x44; 32]).unwrap_err(), NoiseError::Decrypt);
    }

    #[test]
    fn every_corrupted_initiation_byte_is_refused() {
        let (machine, server) = keys();
        let (_init, msg) = initiate(&machine, &server.public(), 130, [0x33; 32]);
        for i in 0..INITIATION_LEN {
            let mut bad = msg;
            bad[i] ^= 0x01;
            let err = respond(&server, &bad, [0x44; 32]).unwrap_err();
            match i {
                // The version is mixed into the prologue, so changing it breaks decryption.
                0 | 1 => assert_eq!(err, NoiseError::Decrypt),
                2 => assert_eq!(err, NoiseError::UnexpectedType(0)),
                3 | 4 => assert_eq!(err, NoiseError::WrongLength),
                _ => assert!(
                    matches!(err, NoiseError::Decrypt | NoiseError::WeakKey),
                    "byte {i}: {err}"
                ),
            }
        }
        assert_eq!(
            respond(&server, &msg[..100], [0; 32]).unwrap_err(),
            NoiseError::WrongInitiationSize
        );
        assert_eq!(
            respond(&server, &[], [0; 32]).unwrap_err(),
            NoiseError::WrongInitiationSize
        );
        assert!(NoiseError::WrongInitiationSize.reply_text().is_some());
        assert!(NoiseError::Decrypt.reply_text().is_none());
    }

    #[test]
    fn low_order_ephemeral_is_refused() {
        let (machine, server) = keys();
        let (_init, mut msg) = initiate(&machine, &server.public(), 130, [0x33; 32]);
        msg[5..37].fill(0); // the all-zero point has order 1
        assert_eq!(respond(&server, &msg, [0x44; 32]).unwrap_err(), NoiseError::WeakKey);
        // A client handed a zero server key (e.g. a too-old /key) fails at finish().
        let (init, _) = initiate(&machine, &MachinePublic([0; 32]), 130, [0x33; 32]);
        let resp = respond(&server, &initiate(&machine, &server.public(), 130, [1; 32]).1, [2; 32]).unwrap();
        assert_eq!(init.finish(&resp.response).unwrap_err(), NoiseError::WeakKey);
    }

    #[test]
    fn finish_rejects_bad_responses() {
        let (machine, server) = keys();
        let (_, msg) = initiate(&machine, &server.public(), 130, [0x33; 32]);
        let acc = respond(&server, &msg, [0x44; 32]).unwrap();
        let fresh = || initiate(&machine, &server.public(), 130, [0x33; 32]).0;
        assert_eq!(fresh().finish(&[]).unwrap_err(), NoiseError::Truncated);
        assert_eq!(
            fresh().finish(&acc.response[..50]).unwrap_err(),
            NoiseError::WrongLength
        );
        assert_eq!(fresh().finish(&[9, 0, 48]).unwrap_err(), NoiseError::UnexpectedType(9));
        let mut bad = acc.response;
        bad[50] ^= 1;
        assert_eq!(fresh().finish(&bad).unwrap_err(), NoiseError::Decrypt);
        // A response for a different initiation (other ephemeral) does not verify.
        let (_, msg2) = initiate(&machine, &server.public(), 130, [0x66; 32]);
        let acc2 = respond(&server, &msg2, [0x44; 32]).unwrap();
        assert_eq!(fresh().finish(&acc2.response).unwrap_err(), NoiseError::Decrypt);
    }

    #[test]
    fn server_error_message_roundtrip() {
        let (machine, server) = keys();
        let (init, _) = initiate(&machine, &server.public(), 130, [0x33; 32]);
        let frame = error_message("no\nthanks");
        assert_eq!(&frame[..3], &[3, 0, 9]);
        match init.finish(&frame).unwrap_err() {
            NoiseError::ServerError(t) => {
                assert_eq!(t.as_bytes(), b"no\nthanks");
                assert_eq!(t.to_string(), "\"no\\nthanks\"");
            }
            e => panic!("unexpected {e}"),
        }
        let long = "x".repeat(200);
        let (init, _) = initiate(&machine, &server.public(), 130, [0x33; 32]);
        let NoiseError::ServerError(t) = init.finish(&error_message(&long)).unwrap_err() else {
            panic!()
        };
        assert_eq!(t.as_bytes().len(), SERVER_ERROR_TEXT_CAP);
        assert_eq!(error_message(&"y".repeat(70_000)).len(), HEADER_LEN + 65_535);
    }

    #[test]
    fn reader_rejects_bad_headers_and_stays_failed() {
        let (_, mut acc) = pair();
        let mut r = RecordReader::new();
        r.push(&[0x05, 0x00, 0x10]);
        assert_eq!(acc.transport.open(&mut r).unwrap_err(), NoiseError::UnexpectedType(5));
        assert_eq!(acc.transport.open(&mut r).unwrap_err(), NoiseError::UnexpectedType(5));

        for len in [0u16, 15, 4094, u16::MAX] {
            let mut r = RecordReader::new();
            r.push(&[4]);
            r.push(&len.to_be_bytes());
            assert_eq!(
                acc.transport.open(&mut r).unwrap_err(),
                NoiseError::BadRecordLength(len)
            );
        }
        // A length of exactly 4093 (frame 4096) is acceptable and simply waits for the body.
        let mut r = RecordReader::new();
        r.push(&[4, 0x0f, 0xfd]);
        assert_eq!(acc.transport.open(&mut r).unwrap(), None);
    }

    #[test]
    fn tampered_record_is_fatal() {
        let (mut client, mut acc) = pair();
        let mut wire = Vec::new();
        client.seal(b"abc", &mut wire).unwrap();
        client.seal(b"def", &mut wire).unwrap();
        wire[4] ^= 0x80;
        let mut r = RecordReader::new();
        r.push(&wire);
        assert_eq!(acc.transport.open(&mut r).unwrap_err(), NoiseError::Decrypt);
        // The second record is intact, but the connection is dead.
        assert_eq!(acc.transport.open(&mut r).unwrap_err(), NoiseError::Decrypt);
        assert_eq!(
            acc.transport.receiver().decrypt(&wire[22..]).unwrap_err(),
            NoiseError::Decrypt
        );
    }

    #[test]
    fn replayed_or_reordered_records_fail() {
        let (mut client, mut acc) = pair();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        client.seal(b"one", &mut a).unwrap();
        client.seal(b"two", &mut b).unwrap();
        let mut r = RecordReader::new();
        r.push(&b);
        assert_eq!(acc.transport.open(&mut r).unwrap_err(), NoiseError::Decrypt);
    }

    #[test]
    fn counter_exhaustion_is_an_error() {
        let (mut client, mut acc) = pair();
        client.send.nonce = NONCE_LIMIT - 1;
        let mut wire = Vec::new();
        // Two records do not fit: nothing is appended.
        assert_eq!(
            client.seal(&[0; MAX_PLAINTEXT_SIZE + 1], &mut wire),
            Err(NoiseError::CipherExhausted)
        );
        assert!(wire.is_empty());
        client.seal(b"last", &mut wire).unwrap();
        assert_eq!(client.seal(b"more", &mut wire), Err(NoiseError::CipherExhausted));
        acc.transport.recv.nonce = NONCE_LIMIT - 1;
        assert_eq!(open_all(&mut acc.transport, &wire), b"last");
        assert_eq!(acc.transport.recv.decrypt(&[0; 16]), Err(NoiseError::CipherExhausted));
    }

    #[test]
    fn early_payload_layout() {
        let json = br#"{"nodeKeyChallenge":"chalpub:00"}"#;
        let p = early_payload(json);
        assert_eq!(&p[..5], b"\xff\xff\xffTS");
        assert_eq!(&p[5..9], &(json.len() as u32).to_be_bytes());
        assert_eq!(parse_early_payload_header(&p), Some(json.len()));
        assert_eq!(
            parse_early_payload_header(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00"),
            None
        );
        assert_eq!(parse_early_payload_header(&p[..8]), None);
    }

    proptest! {
        #[test]
        fn roundtrip_random_sizes_and_chunking(
            size in 0usize..20_000,
            writes in proptest::collection::vec(1usize..9000, 1..4),
            chunks in proptest::collection::vec(1usize..5000, 1..50),
            seed in any::<u8>(),
        ) {
            let (mut client, mut acc) = pair();
            let data: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            // Seal in a few writes of random sizes, as a stream writer would.
            let mut wire = Vec::new();
            let mut rest = &data[..];
            let mut w = writes.iter().cycle();
            while !rest.is_empty() {
                let n = (*w.next().unwrap()).min(rest.len());
                client.seal(&rest[..n], &mut wire).unwrap();
                rest = &rest[n..];
            }
            // Deliver the wire bytes in random chunk sizes.
            let mut r = RecordReader::new();
            let mut got = Vec::new();
            let mut off = 0;
            let mut c = chunks.iter().cycle();
            while off < wire.len() {
                let n = (*c.next().unwrap()).min(wire.len() - off);
                r.push(&wire[off..off + n]);
                off += n;
                while let Some(p) = acc.transport.open(&mut r).unwrap() {
                    got.extend_from_slice(&p);
                }
            }
            prop_assert_eq!(r.buffered(), 0);
            prop_assert_eq!(got, data);
        }

        #[test]
        fn respond_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (_, server) = keys();
            let _ = respond(&server, &bytes, [7; 32]);
        }

        #[test]
        fn respond_never_panics_on_well_framed_garbage(body in proptest::collection::vec(any::<u8>(), 96)) {
            let (_, server) = keys();
            let mut msg = vec![0, 130, 1, 0, 96];
            msg.extend_from_slice(&body);
            prop_assert!(respond(&server, &msg, [7; 32]).is_err());
        }

        #[test]
        fn finish_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let (machine, server) = keys();
            let (init, _) = initiate(&machine, &server.public(), 130, [0x33; 32]);
            let _ = init.finish(&bytes);
        }

        #[test]
        fn reader_never_panics(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
        ) {
            let (_, mut acc) = pair();
            let mut r = RecordReader::new();
            for c in &chunks {
                r.push(c);
                while let Ok(Some(_)) = acc.transport.open(&mut r) {}
            }
        }
    }
}
