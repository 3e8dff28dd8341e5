//! STUN (RFC 5389 subset) as Tailscale uses it: the 40-byte binding request netcheck sends, the
//! binding success response a DERP host's STUN port answers with, and the UDP demux test.
//!
//! Mirrors the facts of tailscale `net/stun/stun.go` (and headscale's `serverSTUNListener`), not
//! its code. Spec §7.1 (demux) and §8.
//!
//! Binding request, exactly as Tailscale sends it ([`binding_request`]):
//!
//! ```text
//!  0      2      4            8                        20
//! +------+------+------------+------------------------+
//! | 0001 | 0014 | 2112A442   | transaction id (12)    |   header: type, attr length 20, cookie
//! +------+------+------------+------------------------+
//! | 8022 | 0008 | "tailnode" (8 bytes, no padding)    |   SOFTWARE
//! +------+------+-------------------------------------+
//! | 8028 | 0004 | CRC-32(bytes 0..32) ^ 0x5354554E    |   FINGERPRINT
//! +------+------+-------------------------------------+  = 40 bytes
//! ```
//!
//! Binding success response ([`binding_response`]), one XOR-MAPPED-ADDRESS attribute:
//!
//! ```text
//! | 0101 | len | 2112A442 | txid (12) |
//! | 0020 | 0008 or 0014 | 00 | family 01/02 | port ^ 0x2112 | addr ^ (cookie ‖ txid) |
//! ```
//!
//! Differences from Go, on purpose:
//! * [`is_stun`] also requires byte 1 to be `0x01` (spec §7.1): that admits binding requests and
//!   success responses and can never match a WireGuard header (bytes 1..4 zero).
//! * [`parse_binding_request`] accepts any well-formed RFC 5389 binding request, so standard
//!   clients (coturn's `turnutils_stunclient`, browsers) get an answer; Go's server drops requests
//!   whose SOFTWARE is not `tailnode`. A FINGERPRINT, when present, must be last and valid.
//!
//! The codec is pure: the caller supplies transaction ids and source addresses. The optional
//! `serve_udp` shell at the bottom (feature `relay`) owns a socket and nothing else.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// RFC 5389 magic cookie, bytes 4..8 of every modern STUN message.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// STUN header length (type, length, cookie, transaction id).
pub const HEADER_LEN: usize = 20;
/// Length of the request [`binding_request`] builds.
pub const REQUEST_LEN: usize = 40;
/// SOFTWARE value Tailscale sends (Go `software`); 8 bytes, so no padding.
pub const SOFTWARE: &[u8; 8] = b"tailnode";
/// Default STUN port when a DERP node's `STUNPort` is 0 (spec §8.3).
pub const DEFAULT_PORT: u16 = 3478;

/// Binding request message type.
const TYPE_BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
/// Binding success response message type.
const TYPE_BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];
/// MAPPED-ADDRESS (RFC 5389 §15.1), the pre-XOR fallback.
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
/// XOR-MAPPED-ADDRESS (RFC 5389 §15.2).
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// The same attribute in the comprehension-optional range; some servers send it (Go accepts it).
const ATTR_XOR_MAPPED_ADDRESS_ALT: u16 = 0x8020;
/// SOFTWARE (RFC 5389 §15.10).
const ATTR_SOFTWARE: u16 = 0x8022;
/// FINGERPRINT (RFC 5389 §15.5).
const ATTR_FINGERPRINT: u16 = 0x8028;
/// XORed into the CRC-32 to form FINGERPRINT ("STUN" in ASCII).
const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// Bytes a FINGERPRINT attribute takes: 4-byte attribute header + 4-byte CRC.
const FINGERPRINT_ATTR_LEN: usize = 8;

/// A 12-byte STUN transaction id.
pub type TxId = [u8; 12];

/// Why a STUN message was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Too short, wrong cookie, top bits set or not a binding message.
    #[error("not a STUN packet")]
    NotStun,
    /// A STUN message, but not a binding request.
    #[error("STUN message is not a binding request")]
    NotBindingRequest,
    /// A STUN message, but not a binding success response.
    #[error("STUN message is not a binding success response")]
    NotSuccessResponse,
    /// Header length or attribute framing is inconsistent.
    #[error("STUN message has malformed attributes")]
    MalformedAttrs,
    /// FINGERPRINT present but not last, wrong size or wrong CRC.
    #[error("STUN message has a bad fingerprint")]
    BadFingerprint,
    /// A response without a usable (XOR-)MAPPED-ADDRESS.
    #[error("STUN response has no mapped address")]
    NoMappedAddress,
}

/// CRC-32/IEEE (reflected, polynomial 0xEDB88320), bitwise: STUN messages are tiny, so the
/// 1 KiB table is not worth its bytes in the router binary.
fn crc32_ieee(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// RFC 5389 FINGERPRINT value over `msg` (everything before the FINGERPRINT attribute).
fn fingerprint(msg: &[u8]) -> u32 {
    crc32_ieee(msg) ^ FINGERPRINT_XOR
}

/// Builds the 40-byte binding request Tailscale sends: SOFTWARE `tailnode` + FINGERPRINT.
///
/// Go's DERP/headscale STUN servers answer nothing else, so this is the only request shape our
/// client should emit. `txid` must be random (caller's RNG).
pub fn binding_request(txid: TxId) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..2].copy_from_slice(&TYPE_BINDING_REQUEST);
    // Attribute bytes after the header: SOFTWARE (4 + 8) + FINGERPRINT (4 + 4) = 20.
    b[2..4].copy_from_slice(&20u16.to_be_bytes());
    b[4..8].copy_from_slice(&MAGIC_COOKIE);
    b[8..20].copy_from_slice(&txid);
    b[20..22].copy_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    b[22..24].copy_from_slice(&8u16.to_be_bytes());
    b[24..32].copy_from_slice(SOFTWARE);
    b[32..34].copy_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    b[34..36].copy_from_slice(&4u16.to_be_bytes());
    let fp = fingerprint(&b[..32]);
    b[36..40].copy_from_slice(&fp.to_be_bytes());
    b
}

/// The UDP demux rule of spec §7.1: at least a STUN header, top two bits of byte 0 clear,
/// byte 1 `0x01` (binding request or success response) and the magic cookie at bytes 4..8.
///
/// Everything that is neither STUN nor disco on the magicsock port is WireGuard.
pub fn is_stun(pkt: &[u8]) -> bool {
    pkt.len() >= HEADER_LEN && pkt[0] & 0xC0 == 0 && pkt[1] == 0x01 && pkt[4..8] == MAGIC_COOKIE
}

/// One attribute: type and value (without padding).
struct Attr<'a> {
    ty: u16,
    /// Offset of the attribute header inside the whole message.
    offset: usize,
    value: &'a [u8],
}

/// Walks the attributes of `msg[HEADER_LEN..end]`, honouring 4-byte padding.
fn for_each_attr<'a>(
    msg: &'a [u8],
    end: usize,
    mut f: impl FnMut(Attr<'a>) -> Result<(), StunError>,
) -> Result<(), StunError> {
    let mut off = HEADER_LEN;
    while off < end {
        let hdr = msg
            .get(off..off + 4)
            .filter(|_| off + 4 <= end)
            .ok_or(StunError::MalformedAttrs)?;
        let ty = u16::from_be_bytes([hdr[0], hdr[1]]);
        let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        let padded = (len + 3) & !3;
        let start = off + 4;
        if start + padded > end {
            return Err(StunError::MalformedAttrs);
        }
        f(Attr {
            ty,
            offset: off,
            value: &msg[start..start + len],
        })?;
        off = start + padded;
    }
    Ok(())
}

/// Checks the header of a STUN message and returns the end of its attributes. Bytes past the
/// declared length are ignored, as Go does for responses.
fn message_end(pkt: &[u8]) -> Result<usize, StunError> {
    if !is_stun(pkt) {
        return Err(StunError::NotStun);
    }
    let len = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if len % 4 != 0 || HEADER_LEN + len > pkt.len() {
        return Err(StunError::MalformedAttrs);
    }
    Ok(HEADER_LEN + len)
}

/// Server-side acceptance of a binding request; returns its transaction id.
///
/// Accepts any well-formed RFC 5389 binding request, with or without SOFTWARE and FINGERPRINT
/// (Tailscale's 40-byte request, coturn's `turnutils_stunclient`, browsers). Unknown attributes
/// are ignored. When FINGERPRINT is present it must be the last attribute and match, else the
/// request is rejected. Requests without the magic cookie (RFC 3489) are not STUN here.
pub fn parse_binding_request(pkt: &[u8]) -> Result<TxId, StunError> {
    let end = message_end(pkt)?;
    if pkt[0..2] != TYPE_BINDING_REQUEST {
        return Err(StunError::NotBindingRequest);
    }
    let mut fp: Option<(usize, &[u8])> = None;
    for_each_attr(pkt, end, |a| {
        if fp.is_some() {
            // RFC 5389 §15.5: FINGERPRINT is always the last attribute.
            return Err(StunError::BadFingerprint);
        }
        if a.ty == ATTR_FINGERPRINT {
            fp = Some((a.offset, a.value));
        }
        Ok(())
    })?;
    if let Some((offset, value)) = fp {
        let got = <[u8; 4]>::try_from(value).map_err(|_| StunError::BadFingerprint)?;
        // The CRC covers the message up to the attribute, with the header length as sent
        // (which already counts the FINGERPRINT attribute).
        if offset + FINGERPRINT_ATTR_LEN != end || u32::from_be_bytes(got) != fingerprint(&pkt[..offset]) {
            return Err(StunError::BadFingerprint);
        }
    }
    Ok(txid_of(pkt))
}

/// Bytes 8..20 of a message already checked by [`message_end`].
fn txid_of(pkt: &[u8]) -> TxId {
    let mut tx = [0u8; 12];
    tx.copy_from_slice(&pkt[8..20]);
    tx
}

/// Builds a binding success response telling the client it was seen from `src`.
///
/// An IPv4-mapped IPv6 source (dual-stack server socket) is un-mapped and sent as family 1, so
/// clients see the IPv4 address they really have. The result is 32 (IPv4) or 44 (IPv6) bytes.
pub fn binding_response(txid: TxId, src: SocketAddr) -> Vec<u8> {
    let ip = unmap(src.ip());
    let (family, addr_len) = match ip {
        IpAddr::V4(_) => (1u8, 4usize),
        IpAddr::V6(_) => (2u8, 16usize),
    };
    let attr_len = 4 + addr_len;
    let mut b = Vec::with_capacity(HEADER_LEN + 4 + attr_len);
    b.extend_from_slice(&TYPE_BINDING_SUCCESS);
    // attr_len is 8 or 20, so these casts are exact.
    b.extend_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    b.extend_from_slice(&MAGIC_COOKIE);
    b.extend_from_slice(&txid);
    b.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    b.extend_from_slice(&(attr_len as u16).to_be_bytes());
    b.push(0);
    b.push(family);
    b.extend_from_slice(&(src.port() ^ 0x2112).to_be_bytes());
    let key = xor_key(&txid);
    match ip {
        IpAddr::V4(v4) => b.extend(v4.octets().iter().zip(key).map(|(a, k)| a ^ k)),
        IpAddr::V6(v6) => b.extend(v6.octets().iter().zip(key).map(|(a, k)| a ^ k)),
    }
    b
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; everything else is unchanged.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The XOR pad for XOR-MAPPED-ADDRESS: cookie ‖ txid (IPv4 uses the first 4 bytes).
fn xor_key(txid: &TxId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&MAGIC_COOKIE);
    k[4..].copy_from_slice(txid);
    k
}

/// Decodes a (XOR-)MAPPED-ADDRESS value; `xor` carries the pad for the XOR form.
fn decode_address(value: &[u8], xor: Option<&[u8; 16]>) -> Result<SocketAddr, StunError> {
    if value.len() < 4 {
        return Err(StunError::MalformedAttrs);
    }
    let zero = [0u8; 16];
    let pad = xor.unwrap_or(&zero);
    let port_pad = if xor.is_some() { 0x2112 } else { 0 };
    let port = u16::from_be_bytes([value[2], value[3]]) ^ port_pad;
    let raw = &value[4..];
    let ip = match value[1] {
        1 if raw.len() >= 4 => {
            let mut o = [0u8; 4];
            for (i, x) in o.iter_mut().enumerate() {
                *x = raw[i] ^ pad[i];
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        2 if raw.len() >= 16 => {
            let mut o = [0u8; 16];
            for (i, x) in o.iter_mut().enumerate() {
                *x = raw[i] ^ pad[i];
            }
            unmap(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => return Err(StunError::MalformedAttrs),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Parses a binding success response into its transaction id and the mapped address.
///
/// XOR-MAPPED-ADDRESS (or the `0x8020` variant some servers send) wins; MAPPED-ADDRESS is the
/// fallback. A v4-mapped IPv6 answer is un-mapped. The caller matches the id against its
/// outstanding requests.
pub fn parse_binding_response(pkt: &[u8]) -> Result<(TxId, SocketAddr), StunError> {
    let end = message_end(pkt)?;
    if pkt[0..2] != TYPE_BINDING_SUCCESS {
        return Err(StunError::NotSuccessResponse);
    }
    let txid = txid_of(pkt);
    let pad = xor_key(&txid);
    let mut xor_addr = None;
    let mut mapped = None;
    for_each_attr(pkt, end, |a| {
        match a.ty {
            ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_ALT => {
                xor_addr = Some(decode_address(a.value, Some(&pad))?);
            }
            ATTR_MAPPED_ADDRESS => mapped = Some(decode_address(a.value, None)?),
            _ => {}
        }
        Ok(())
    })?;
    xor_addr.or(mapped).map(|a| (txid, a)).ok_or(StunError::NoMappedAddress)
}

#[cfg(feature = "relay")]
pub use shell::{serve_udp, StunStats};

/// The STUN server shell: one UDP socket, answer binding requests, count the rest.
#[cfg(feature = "relay")]
mod shell {
    use std::{
        io,
        sync::{
            atomic::{AtomicU32, Ordering},
            Arc,
        },
    };

    use tokio::net::UdpSocket;

    /// Counters of [`serve_udp`]; 32-bit (mips32 has no 64-bit atomics) and wrapping.
    #[derive(Debug, Default)]
    pub struct StunStats {
        served: AtomicU32,
        dropped: AtomicU32,
    }

    impl StunStats {
        /// Binding requests answered.
        pub fn served(&self) -> u32 {
            self.served.load(Ordering::Relaxed)
        }

        /// Datagrams ignored (not a binding request) or answers that failed to send.
        pub fn dropped(&self) -> u32 {
            self.dropped.load(Ordering::Relaxed)
        }
    }

    /// Answers STUN binding requests on `socket` forever; anything else is dropped and counted.
    ///
    /// Returns only on a receive error that is not transient (the socket is unusable).
    pub async fn serve_udp(socket: UdpSocket, stats: Arc<StunStats>) -> io::Result<()> {
        // Requests are tiny; a longer datagram is truncated and then fails to parse.
        let mut buf = [0u8; 1500];
        loop {
            let (n, src) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                // ICMP errors surfaced on the socket and signals are not fatal.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            let Ok(txid) = super::parse_binding_request(&buf[..n]) else {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                log::trace!("stun: dropped {n} bytes from ep={src}");
                continue;
            };
            let resp = super::binding_response(txid, src);
            match socket.send_to(&resp, src).await {
                Ok(_) => {
                    stats.served.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    log::debug!("stun: reply to ep={src} failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::vectors::hex;

    const TX: TxId = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    #[test]
    fn crc32_check_value() {
        // The standard CRC-32/ISO-HDLC check value.
        assert_eq!(crc32_ieee(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32_ieee(b""), 0);
    }

    #[test]
    fn binding_request_vector() {
        // CRC computed independently: python3 zlib.crc32(bytes 0..32) ^ 0x5354554e.
        let want = hex("0001 0014 2112a442            # binding request, 20 attr bytes, cookie
             0102030405060708090a0b0c      # txid
             8022 0008 7461696c6e6f6465    # SOFTWARE \"tailnode\"
             8028 0004 b32c370f            # FINGERPRINT");
        let got = binding_request(TX);
        assert_eq!(got.len(), 40);
        assert_eq!(got.to_vec(), want);
        assert_eq!(parse_binding_request(&got), Ok(TX));
        assert!(is_stun(&got));
    }

    #[test]
    fn request_acceptance_rules() {
        let good = binding_request(TX);
        // Bare RFC 5389 request, no attributes (what many standard clients send).
        let bare = hex("0001 0000 2112a442 0102030405060708090a0b0c");
        assert_eq!(parse_binding_request(&bare), Ok(TX));
        // Other SOFTWARE, padded, no FINGERPRINT.
        let sw = hex("0001 0008 2112a442 0102030405060708090a0b0c 8022 0003 616263 00");
        assert_eq!(parse_binding_request(&sw), Ok(TX));
        // Corrupt fingerprint.
        let mut bad = good;
        bad[39] ^= 1;
        assert_eq!(parse_binding_request(&bad), Err(StunError::BadFingerprint));
        // Corrupt covered byte.
        let mut bad = good;
        bad[25] ^= 1;
        assert_eq!(parse_binding_request(&bad), Err(StunError::BadFingerprint));
        // FINGERPRINT not last.
        let mut v = hex("0001 0010 2112a442 0102030405060708090a0b0c");
        let fp = fingerprint(&v);
        v.extend_from_slice(&hex("8028 0004"));
        v.extend_from_slice(&fp.to_be_bytes());
        v.extend_from_slice(&hex("8022 0004 61626364"));
        assert_eq!(parse_binding_request(&v), Err(StunError::BadFingerprint));
        // Length beyond the datagram; attribute overrunning the length; odd length.
        assert_eq!(parse_binding_request(&good[..36]), Err(StunError::MalformedAttrs));
        let over = hex("0001 0004 2112a442 0102030405060708090a0b0c 8022 0008");
        assert_eq!(parse_binding_request(&over), Err(StunError::MalformedAttrs));
        let odd = hex("0001 0001 2112a442 0102030405060708090a0b0c 00");
        assert_eq!(parse_binding_request(&odd), Err(StunError::MalformedAttrs));
        // A response is not a request; a non-STUN packet is not STUN.
        let resp = binding_response(TX, "1.2.3.4:5".parse().unwrap());
        assert_eq!(parse_binding_request(&resp), Err(StunError::NotBindingRequest));
        assert_eq!(parse_binding_request(&[1, 0, 0, 0]), Err(StunError::NotStun));
    }

    #[test]
    fn is_stun_demux() {
        let cookie = "2112a442";
        let z12 = "000000000000000000000000";
        assert!(!is_stun(b""));
        assert!(!is_stun(&[0u8; 20]));
        assert!(!is_stun(&hex(&format!("0001 0000 {cookie} 0000000000000000000000"))));
        assert!(is_stun(&hex(&format!("0001 0000 {cookie} {z12}"))));
        assert!(is_stun(&hex(&format!("0101 0000 {cookie} {z12} 666f6f"))));
        // High bits set.
        assert!(!is_stun(&hex(&format!("c001 0000 {cookie} {z12}"))));
        assert!(!is_stun(&hex(&format!("4001 0000 {cookie} {z12}"))));
        // A WireGuard handshake whose sender index happens to equal the cookie.
        assert!(!is_stun(&hex(&format!("0100 0000 {cookie} {z12}"))));
    }

    #[test]
    fn response_vector_v4() {
        let got = binding_response(TX, "1.2.3.4:254".parse().unwrap());
        let want = hex("0101 000c 2112a442 0102030405060708090a0b0c
             0020 0008 00 01 21ec   # port 254 ^ 0x2112
             20 10 a7 46            # 1.2.3.4 ^ cookie");
        assert_eq!(got, want);
        assert_eq!(parse_binding_response(&got), Ok((TX, "1.2.3.4:254".parse().unwrap())));
    }

    #[test]
    fn response_roundtrip_v6_and_mapped() {
        let v6: SocketAddr = "[1::4]:257".parse().unwrap();
        let r = binding_response(TX, v6);
        assert_eq!(r.len(), 44);
        assert_eq!(&r[20..26], &hex("0020 0014 0002"));
        assert_eq!(parse_binding_response(&r), Ok((TX, v6)));
        // A dual-stack socket reports ::ffff:10.0.0.1; the client must see family 1.
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:41641".parse().unwrap();
        let r = binding_response(TX, mapped);
        assert_eq!(r.len(), 32);
        assert_eq!(r[25], 1);
        assert_eq!(parse_binding_response(&r), Ok((TX, "10.0.0.1:41641".parse().unwrap())));
    }

    /// Captured server responses from Go's `net/stun/stun_test.go` table.
    #[test]
    fn go_response_vectors() {
        let cases: [(&str, &str, &str); 4] = [
            (
                "google: XOR-MAPPED-ADDRESS",
                "0101000c2112a4422360b11e3ec68ffa93e08007 00200008 0001c786 6957856f",
                "72.69.33.45:59028",
            ),
            (
                "sipgate: MAPPED, others, 0x8020, SOFTWARE",
                "010100442112a442482eb64715e8b28eaead6444 00010008 0001e4ab 4845212d
                 00040008 00012710 d90a4498 00050008 00012711 d9747a8a 80200008 0001c5b9 6957856f
                 80220010 566f7669 64612e6f 72672030 2e393600",
                "72.69.33.45:58539",
            ),
            (
                "powervoip: MAPPED-ADDRESS only",
                "010100242112a4427e57966829f444609d1deaa6 00010008 0001e9d3 4845212d
                 00040008 00010d96 4d48a9d4 00050008 00010d97 4d48a9d5",
                "72.69.33.45:59859",
            ),
            (
                "stuntman ipv6: MAPPED, 0x802b, XOR",
                "010100482112a44206f56685d28af3e69ce341e2 00010014 000290ce 260200d1 b4cfc100
                 38b231ff feef96f6 802b0014 00020d96 2604a880 000200d1 00000000 00c57001
                 00200014 0002b1dc 0710a493 b23aa785 ea38c219 620cd714",
                "[2602:d1:b4cf:c100:38b2:31ff:feef:96f6]:37070",
            ),
        ];
        for (name, pkt, want) in cases {
            let (_, addr) = parse_binding_response(&hex(pkt)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(addr, want.parse::<SocketAddr>().unwrap(), "{name}");
        }
        // pion: SOFTWARE with padding, XOR, FINGERPRINT, then trailing bytes past the length.
        let pion = hex(
            "010100242112a442ebc2d36ef471217c4f3e308e 8022000a 656e6470 6f696e74 65720000
             00200008 0001ce66 5e12a443 80280004 b699bb02 01010024 2112a442",
        );
        let (tx, addr) = parse_binding_response(&pion).unwrap();
        assert_eq!(tx, hex("ebc2d36ef471217c4f3e308e")[..]);
        assert_eq!(addr, "127.0.0.1:61300".parse().unwrap());
    }

    #[test]
    fn response_rejections() {
        let r = binding_response(TX, "1.2.3.4:254".parse().unwrap());
        assert_eq!(
            parse_binding_response(&binding_request(TX)),
            Err(StunError::NotSuccessResponse)
        );
        assert_eq!(parse_binding_response(&r[..31]), Err(StunError::MalformedAttrs));
        let no_addr = hex("0101 0000 2112a442 0102030405060708090a0b0c");
        assert_eq!(parse_binding_response(&no_addr), Err(StunError::NoMappedAddress));
        let bad_family = hex("0101 000c 2112a442 0102030405060708090a0b0c 0020 0008 0003 0000 00000000");
        assert_eq!(parse_binding_response(&bad_family), Err(StunError::MalformedAttrs));
    }

    proptest! {
        #[test]
        fn prop_request_roundtrip(tx in any::<[u8; 12]>()) {
            let req = binding_request(tx);
            prop_assert!(is_stun(&req));
            prop_assert_eq!(parse_binding_request(&req), Ok(tx));
            prop_assert_eq!(&req[36..], &fingerprint(&req[..32]).to_be_bytes()[..]);
        }

        #[test]
        fn prop_response_roundtrip(tx in any::<[u8; 12]>(), ip in any::<IpAddr>(), port in any::<u16>()) {
            let src = SocketAddr::new(ip, port);
            let r = binding_response(tx, src);
            prop_assert!(is_stun(&r));
            prop_assert_eq!(parse_binding_response(&r), Ok((tx, SocketAddr::new(unmap(ip), port))));
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = is_stun(&b);
            let _ = parse_binding_request(&b);
            let _ = parse_binding_response(&b);
        }

        #[test]
        fn prop_stun_shaped_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..96), ty in 0u8..2, len in any::<u16>()) {
            let mut b = vec![0, 1];
            b[0] = ty;
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&MAGIC_COOKIE);
            b.extend_from_slice(&tail);
            let _ = parse_binding_request(&b);
            let _ = parse_binding_response(&b);
        }
    }

    #[cfg(feature = "relay")]
    #[tokio::test]
    async fn serve_udp_round_trip() {
        use std::{sync::Arc, time::Duration};

        use tokio::net::UdpSocket;

        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let stats = Arc::new(StunStats::default());
        let task = tokio::spawn(serve_udp(server, stats.clone()));

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = client.local_addr().unwrap();
        // Junk first: dropped and counted, no answer.
        client.send_to(b"not stun at all", server_addr).await.unwrap();
        client.send_to(&binding_request(TX), server_addr).await.unwrap();
        let mut buf = [0u8; 128];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("no STUN answer")
            .unwrap();
        assert_eq!(from, server_addr);
        assert_eq!(parse_binding_response(&buf[..n]), Ok((TX, me)));
        // A bare standard request is answered too.
        let bare = hex("0001 0000 2112a442 0c0b0a090807060504030201");
        client.send_to(&bare, server_addr).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("no STUN answer")
            .unwrap();
        assert_eq!(parse_binding_response(&buf[..n]).unwrap().1, me);
        assert_eq!(stats.served(), 2);
        assert_eq!(stats.dropped(), 1);
        task.abort();
    }
}
