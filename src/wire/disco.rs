//! Disco: the small NaCl-boxed messages peers use to find and keep direct UDP paths (Ping, Pong,
//! CallMeMaybe). The same bytes travel over UDP and inside DERP Send/RecvPacket frames.
//!
//! Mirrors the facts of tailscale `disco/disco.go` (spec §7.1-7.3), not its code.
//!
//! ```text
//! packet:    | "TS💬" 54 53 F0 9F 92 AC (6) | sender disco pub (32) | nonce (24) | box (n+16) |
//!            0                              6                      38           62
//! box:       NaCl box (XSalsa20-Poly1305, tag first) keyed by X25519(my priv, peer pub)
//! plaintext: | type (1) | version (1, 0 today) | payload ... (receivers ignore extra bytes) |
//!
//! Ping        01 00 | tx id (12) | sender node key (32, omitted when zero) | zero padding (N)
//! Pong        02 00 | tx id (12) | source IP (16, IPv4 v4-mapped) | source port (2, BE)
//! CallMeMaybe 03 00 | N x ( IP (16, IPv4 v4-mapped) | port (2, BE) )
//! ```
//!
//! Types 4-9 (peer relays, Go 1.86+) decode as [`DiscoError::UnknownType`] and are skipped.
//!
//! The caller supplies the nonce (24 random bytes) and decides trust: [`parse_header`] yields the
//! claimed sender so the caller can look it up among its netmap peers, then opens the packet with
//! that peer's precomputed [`DiscoShared`]. Unknown senders and failed opens are dropped silently.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crypto_box::{
    aead::{generic_array::GenericArray, AeadInPlace},
    PublicKey, SalsaBox, SecretKey,
};

use crate::wire::keys::{DiscoPrivate, DiscoPublic, NodePublic};

/// The 6-byte magic that starts every disco packet: "TS💬".
pub const MAGIC: [u8; 6] = [0x54, 0x53, 0xF0, 0x9F, 0x92, 0xAC];
/// Raw key length.
pub const KEY_LEN: usize = 32;
/// NaCl box nonce length.
pub const NONCE_LEN: usize = 24;
/// Poly1305 tag length inside the box.
pub const TAG_LEN: usize = 16;
/// Magic + sender key + nonce: the cleartext part of a packet.
pub const HEADER_LEN: usize = MAGIC.len() + KEY_LEN + NONCE_LEN;

/// Ping message type.
pub const TYPE_PING: u8 = 0x01;
/// Pong message type.
pub const TYPE_PONG: u8 = 0x02;
/// CallMeMaybe message type.
pub const TYPE_CALL_ME_MAYBE: u8 = 0x03;

/// Message version we send (Go `v0`).
const VERSION: u8 = 0;
/// Transaction id length in Ping and Pong.
const TX_ID_LEN: usize = 12;
/// One endpoint on the wire: 16-byte IP + 2-byte port (Go `epLength`).
const ENDPOINT_LEN: usize = 18;
/// Pong payload: tx id + endpoint (Go `pongLen`).
const PONG_LEN: usize = TX_ID_LEN + ENDPOINT_LEN;

/// Why a disco packet or message was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiscoError {
    /// Shorter than the header, the box tag or the message it claims to be.
    #[error("disco packet too short")]
    TooShort,
    /// Does not start with `TS💬`.
    #[error("disco magic missing")]
    WrongMagic,
    /// The header's sender is not the peer this [`DiscoShared`] was built for.
    #[error("disco sender does not match the expected peer")]
    WrongSender,
    /// The box did not open (wrong key or tampered bytes).
    #[error("disco box failed to open")]
    CryptoFailed,
    /// A message type we do not implement; receivers skip it.
    #[error("unknown disco message type {0:#04x}")]
    UnknownType(u8),
}

/// A decrypted disco message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Path probe; answered with a [`Message::Pong`] over the path it arrived on.
    Ping {
        /// Random per-ping transaction id, echoed in the Pong.
        tx_id: [u8; 12],
        /// The sender's node key as it claims it (zero = absent, as old Go clients send).
        node_key: NodePublic,
        /// Count of trailing zero bytes, used for path-MTU probing.
        padding: usize,
    },
    /// Answer to a Ping: "free STUN", carrying where the ping came from.
    Pong {
        /// The ping's transaction id.
        tx_id: [u8; 12],
        /// The ping's source address as the responder saw it (v4-mapped addresses un-mapped).
        src: SocketAddr,
    },
    /// "Ping me back at these endpoints"; only valid when received via DERP.
    CallMeMaybe {
        /// The sender's current endpoints (empty if the list was malformed, as Go does).
        endpoints: Vec<SocketAddr>,
    },
}

impl Message {
    /// Appends the plaintext form (type, version, payload) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Ping {
                tx_id,
                node_key,
                padding,
            } => {
                out.extend_from_slice(&[TYPE_PING, VERSION]);
                out.extend_from_slice(tx_id);
                // Go omits a zero key; old clients (< ~1.16) never sent one.
                if !node_key.is_zero() {
                    out.extend_from_slice(node_key.as_bytes());
                }
                out.resize(out.len() + padding, 0);
            }
            Message::Pong { tx_id, src } => {
                out.extend_from_slice(&[TYPE_PONG, VERSION]);
                out.extend_from_slice(tx_id);
                put_endpoint(out, src);
            }
            Message::CallMeMaybe { endpoints } => {
                out.extend_from_slice(&[TYPE_CALL_ME_MAYBE, VERSION]);
                for ep in endpoints {
                    put_endpoint(out, ep);
                }
            }
        }
    }

    /// Parses a plaintext message. Extra trailing bytes are ignored (forward compatibility).
    ///
    /// Mirrors Go's leniency: the version byte is ignored for Ping/Pong, and a CallMeMaybe whose
    /// version is not 0 or whose length is not a whole number of endpoints yields no endpoints.
    /// Note the Ping ambiguity Go has too: without a node key, 32+ padding bytes read as a zero key.
    pub fn decode(plain: &[u8]) -> Result<Message, DiscoError> {
        let [ty, ver, p @ ..] = plain else {
            return Err(DiscoError::TooShort);
        };
        match *ty {
            TYPE_PING => {
                let (tx, rest) = split_tx_id(p)?;
                match rest.split_first_chunk::<KEY_LEN>() {
                    Some((key, pad)) => Ok(Message::Ping {
                        tx_id: tx,
                        node_key: NodePublic(*key),
                        padding: pad.len(),
                    }),
                    None => Ok(Message::Ping {
                        tx_id: tx,
                        node_key: NodePublic::default(),
                        padding: rest.len(),
                    }),
                }
            }
            TYPE_PONG => {
                if p.len() < PONG_LEN {
                    return Err(DiscoError::TooShort);
                }
                let (tx, rest) = split_tx_id(p)?;
                Ok(Message::Pong {
                    tx_id: tx,
                    src: get_endpoint(rest),
                })
            }
            TYPE_CALL_ME_MAYBE => {
                let endpoints = if *ver != VERSION || p.len() % ENDPOINT_LEN != 0 {
                    Vec::new()
                } else {
                    p.chunks_exact(ENDPOINT_LEN).map(get_endpoint).collect()
                };
                Ok(Message::CallMeMaybe { endpoints })
            }
            other => Err(DiscoError::UnknownType(other)),
        }
    }
}

/// Splits the 12-byte tx id off a Ping/Pong payload.
fn split_tx_id(p: &[u8]) -> Result<([u8; TX_ID_LEN], &[u8]), DiscoError> {
    p.split_first_chunk::<TX_ID_LEN>()
        .map(|(t, rest)| (*t, rest))
        .ok_or(DiscoError::TooShort)
}

/// Appends an endpoint as 16-byte IP (IPv4 v4-mapped) + u16 BE port.
fn put_endpoint(out: &mut Vec<u8>, ep: &SocketAddr) {
    let ip16 = match ep.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip16.octets());
    out.extend_from_slice(&ep.port().to_be_bytes());
}

/// Reads an endpoint from at least [`ENDPOINT_LEN`] bytes (callers check), un-mapping IPv4.
fn get_endpoint(b: &[u8]) -> SocketAddr {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[..16]);
    let ip6 = Ipv6Addr::from(ip);
    let ip = ip6.to_ipv4_mapped().map_or(IpAddr::V6(ip6), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be_bytes([b[16], b[17]]))
}

/// True if `pkt` starts with the disco magic and is long enough for a header (Go
/// `LooksLikeDiscoWrapper`). Used by the UDP/DERP demux before any crypto.
pub fn looks_like_disco(pkt: &[u8]) -> bool {
    pkt.len() >= HEADER_LEN && pkt[..MAGIC.len()] == MAGIC
}

/// The claimed sender of a disco packet, for the caller to look up among its netmap peers.
pub fn parse_header(pkt: &[u8]) -> Result<DiscoPublic, DiscoError> {
    if pkt.len() < MAGIC.len() || pkt[..MAGIC.len()] != MAGIC {
        return Err(DiscoError::WrongMagic);
    }
    if pkt.len() < HEADER_LEN {
        return Err(DiscoError::TooShort);
    }
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&pkt[MAGIC.len()..MAGIC.len() + KEY_LEN]);
    Ok(DiscoPublic(k))
}

/// The precomputed NaCl box between our disco key and one peer's (Go `DiscoShared`): build one
/// per peer when the netmap changes, then seal/open without an X25519 per packet.
pub struct DiscoShared {
    me: DiscoPublic,
    peer: DiscoPublic,
    cipher: SalsaBox,
}

impl std::fmt::Debug for DiscoShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiscoShared({:?} <-> {:?})", self.me, self.peer)
    }
}

impl DiscoShared {
    /// Derives the shared box key (X25519 + HSalsa20) for `my` and `peer`.
    pub fn new(my: &DiscoPrivate, peer: &DiscoPublic) -> Self {
        let secret = SecretKey::from(my.to_bytes());
        let cipher = SalsaBox::new(&PublicKey::from(peer.0), &secret);
        DiscoShared {
            me: my.public(),
            peer: *peer,
            cipher,
        }
    }

    /// The peer this box talks to.
    pub fn peer(&self) -> DiscoPublic {
        self.peer
    }

    /// Builds the full packet (magic, our key, `nonce`, box) carrying `msg` to the peer.
    /// `nonce` must be fresh random bytes from the caller.
    pub fn seal(&self, nonce: [u8; NONCE_LEN], msg: &Message) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + TAG_LEN + 64);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(self.me.as_bytes());
        out.extend_from_slice(&nonce);
        let tag_at = out.len();
        out.resize(tag_at + TAG_LEN, 0);
        msg.encode(&mut out);
        let (head, plain) = out.split_at_mut(tag_at + TAG_LEN);
        let tag = self
            .cipher
            .encrypt_in_place_detached(GenericArray::from_slice(&nonce), b"", plain)
            // Fails only for non-empty associated data, and we pass none.
            .expect("XSalsa20Poly1305 without AAD cannot fail");
        head[tag_at..].copy_from_slice(&tag);
        out
    }

    /// Opens a packet from the peer. Bytes past the expected payload are ignored.
    pub fn open(&self, pkt: &[u8]) -> Result<Message, DiscoError> {
        if parse_header(pkt)? != self.peer {
            return Err(DiscoError::WrongSender);
        }
        let nonce = &pkt[MAGIC.len() + KEY_LEN..HEADER_LEN];
        let boxed = &pkt[HEADER_LEN..];
        if boxed.len() < TAG_LEN {
            return Err(DiscoError::TooShort);
        }
        let (tag, ct) = boxed.split_at(TAG_LEN);
        let mut plain = ct.to_vec();
        self.cipher
            .decrypt_in_place_detached(
                GenericArray::from_slice(nonce),
                b"",
                &mut plain,
                GenericArray::from_slice(tag),
            )
            .map_err(|_| DiscoError::CryptoFailed)?;
        Message::decode(&plain)
    }
}

/// One-shot seal: the full packet carrying `msg` from `my` to `peer`. Prefer a cached
/// [`DiscoShared`] on hot paths.
pub fn seal(my: &DiscoPrivate, peer: &DiscoPublic, nonce: [u8; NONCE_LEN], msg: &Message) -> Vec<u8> {
    DiscoShared::new(my, peer).seal(nonce, msg)
}

/// One-shot open: returns the (authenticated) sender and the message. The caller still decides
/// whether that sender is a netmap peer.
pub fn open(my: &DiscoPrivate, pkt: &[u8]) -> Result<(DiscoPublic, Message), DiscoError> {
    let sender = parse_header(pkt)?;
    let msg = DiscoShared::new(my, &sender).open(pkt)?;
    Ok((sender, msg))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::vectors::hex;

    const TX: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn go_node_key() -> NodePublic {
        let mut k = [0u8; 32];
        k[1] = 1;
        k[2] = 2;
        k[30] = 30;
        k[31] = 31;
        NodePublic(k)
    }

    fn enc(m: &Message) -> Vec<u8> {
        let mut v = Vec::new();
        m.encode(&mut v);
        v
    }

    /// Plaintext vectors from Go's `disco/disco_test.go` TestMarshalAndParse.
    #[test]
    fn go_plaintext_vectors() {
        let cases = [
            (
                Message::Ping { tx_id: TX, node_key: NodePublic::default(), padding: 0 },
                "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c",
            ),
            (
                Message::Ping { tx_id: TX, node_key: go_node_key(), padding: 0 },
                "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 01 02 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 1e 1f",
            ),
            (
                Message::Ping { tx_id: TX, node_key: NodePublic::default(), padding: 3 },
                "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 00 00",
            ),
            (
                Message::Ping { tx_id: TX, node_key: go_node_key(), padding: 3 },
                "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 01 02 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 1e 1f 00 00 00",
            ),
            (
                Message::Pong { tx_id: TX, src: "2.3.4.5:1234".parse().unwrap() },
                "02 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 00 00 00 00 00 00 00 00 00 ff ff 02 03 04 05 04 d2",
            ),
            (
                Message::Pong { tx_id: TX, src: "[fed0::12]:6666".parse().unwrap() },
                "02 00 01 02 03 04 05 06 07 08 09 0a 0b 0c fe d0 00 00 00 00 00 00 00 00 00 00 00 00 00 12 1a 0a",
            ),
            (Message::CallMeMaybe { endpoints: vec![] }, "03 00"),
            (
                Message::CallMeMaybe {
                    endpoints: vec!["1.2.3.4:567".parse().unwrap(), "[2001::3456]:789".parse().unwrap()],
                },
                "03 00 00 00 00 00 00 00 00 00 00 00 ff ff 01 02 03 04 02 37 20 01 00 00 00 00 00 00 00 00 00 00 00 00 34 56 03 15",
            ),
        ];
        for (m, want) in cases {
            let got = enc(&m);
            assert_eq!(got, hex(want), "{m:?}");
            assert_eq!(Message::decode(&got), Ok(m));
        }
    }

    #[test]
    fn decode_leniency() {
        // Trailing bytes after a Pong are ignored.
        let mut p = enc(&Message::Pong {
            tx_id: TX,
            src: "2.3.4.5:1234".parse().unwrap(),
        });
        p.extend_from_slice(b"future");
        assert!(matches!(Message::decode(&p), Ok(Message::Pong { .. })));
        // Short Ping/Pong, empty plaintext, unknown types.
        assert_eq!(Message::decode(&hex("01 00 0102")), Err(DiscoError::TooShort));
        assert_eq!(Message::decode(&p[..31]), Err(DiscoError::TooShort));
        assert_eq!(Message::decode(&[1]), Err(DiscoError::TooShort));
        assert_eq!(Message::decode(&hex("04 00")), Err(DiscoError::UnknownType(4)));
        // Malformed CallMeMaybe: Go yields an empty list.
        let odd = hex("03 00 00 01 02");
        assert_eq!(Message::decode(&odd), Ok(Message::CallMeMaybe { endpoints: vec![] }));
        let mut v1 = enc(&Message::CallMeMaybe {
            endpoints: vec!["1.2.3.4:5".parse().unwrap()],
        });
        v1[1] = 1;
        assert_eq!(Message::decode(&v1), Ok(Message::CallMeMaybe { endpoints: vec![] }));
    }

    fn alice() -> DiscoPrivate {
        DiscoPrivate::from_random([0x11; 32])
    }
    fn bob() -> DiscoPrivate {
        DiscoPrivate::from_random([0x22; 32])
    }
    const NONCE: [u8; 24] = [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
    ];

    /// Sealed with fixed keys and nonce; the box bytes were computed independently with PyNaCl
    /// (`nacl.public.Box(alice_priv, bob_pub).encrypt(plaintext, nonce)`, libsodium).
    #[test]
    fn sealed_vector() {
        let msg = Message::Ping {
            tx_id: TX,
            node_key: go_node_key(),
            padding: 0,
        };
        let pkt = seal(&alice(), &bob().public(), NONCE, &msg);
        let want = hex(
            "54 53 f0 9f 92 ac                                                  # magic TS💬
             7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13   # alice disco pub
             000102030405060708090a0b0c0d0e0f1011121314151617                   # nonce
             80f1223baaadc5f14fbbedb52ff80e7f                                   # Poly1305 tag
             5a8c18945d97ffce3da53ca6da5d72bbe7d51274b43d0179a3f502666fe1ce9e   # ciphertext
             484d3480aa8e504b80ab5cc63d35",
        );
        assert_eq!(hex_str(&pkt), hex_str(&want));
        assert_eq!(pkt.len(), HEADER_LEN + TAG_LEN + 2 + 12 + 32);
        assert_eq!(open(&bob(), &pkt), Ok((alice().public(), msg)));
    }

    fn hex_str(b: &[u8]) -> String {
        crate::wire::keys::hex_encode(b)
    }

    #[test]
    fn wrong_key_tamper_and_sender_checks() {
        let msg = Message::CallMeMaybe {
            endpoints: vec!["1.2.3.4:41641".parse().unwrap()],
        };
        let pkt = seal(&alice(), &bob().public(), NONCE, &msg);
        assert!(looks_like_disco(&pkt));
        assert_eq!(parse_header(&pkt), Ok(alice().public()));
        // A third party cannot open it.
        let eve = DiscoPrivate::from_random([0x33; 32]);
        assert_eq!(open(&eve, &pkt), Err(DiscoError::CryptoFailed));
        // Tampering anywhere in nonce or box fails.
        for i in [40, HEADER_LEN, pkt.len() - 1] {
            let mut t = pkt.clone();
            t[i] ^= 0x80;
            assert_eq!(open(&bob(), &t), Err(DiscoError::CryptoFailed), "byte {i}");
        }
        // A shared box for a different peer refuses the packet before any crypto.
        let shared_with_eve = DiscoShared::new(&bob(), &eve.public());
        assert_eq!(shared_with_eve.open(&pkt), Err(DiscoError::WrongSender));
        // The precomputed box agrees with the one-shot path, both ways.
        let ab = DiscoShared::new(&alice(), &bob().public());
        let ba = DiscoShared::new(&bob(), &alice().public());
        assert_eq!(ab.seal(NONCE, &msg), pkt);
        assert_eq!(ba.open(&pkt), Ok(msg));
        // Headers.
        assert!(!looks_like_disco(&pkt[..HEADER_LEN - 1]));
        assert_eq!(parse_header(b"TS"), Err(DiscoError::WrongMagic));
        assert_eq!(parse_header(&pkt[..40]), Err(DiscoError::TooShort));
        assert_eq!(open(&bob(), &pkt[..HEADER_LEN + 15]), Err(DiscoError::TooShort));
        let mut wg = pkt.clone();
        wg[0] = 4;
        assert!(!looks_like_disco(&wg));
        assert_eq!(open(&bob(), &wg), Err(DiscoError::WrongMagic));
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| {
            // The wire form cannot tell ::ffff:a.b.c.d from a.b.c.d; receivers un-map.
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            SocketAddr::new(ip, port)
        })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            // A zero key is omitted on the wire, so then keep padding below a key's length.
            (any::<[u8; 12]>(), any::<[u8; 32]>(), 0usize..1400).prop_map(|(tx_id, k, padding)| {
                let node_key = NodePublic(k);
                let padding = if node_key.is_zero() { padding % 32 } else { padding };
                Message::Ping {
                    tx_id,
                    node_key,
                    padding,
                }
            }),
            (any::<[u8; 12]>(), arb_addr()).prop_map(|(tx_id, src)| Message::Pong { tx_id, src }),
            proptest::collection::vec(arb_addr(), 0..20).prop_map(|endpoints| Message::CallMeMaybe { endpoints }),
        ]
    }

    proptest! {
        #[test]
        fn prop_plaintext_roundtrip(m in arb_message()) {
            prop_assert_eq!(Message::decode(&enc(&m)), Ok(m));
        }

        #[test]
        fn prop_seal_open_roundtrip(m in arb_message(), nonce in any::<[u8; 24]>(), a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            let (a, b) = (DiscoPrivate::from_random(a), DiscoPrivate::from_random(b));
            let pkt = seal(&a, &b.public(), nonce, &m);
            prop_assert!(looks_like_disco(&pkt));
            prop_assert_eq!(open(&b, &pkt), Ok((a.public(), m)));
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(&bytes);
            let _ = looks_like_disco(&bytes);
            let _ = parse_header(&bytes);
            let _ = open(&bob(), &bytes);
            let mut pkt = MAGIC.to_vec();
            pkt.extend_from_slice(&bytes);
            let _ = open(&bob(), &pkt);
        }
    }
}
