//! Standard zstd frames (RFC 8878) made of raw (stored) blocks.
//!
//! The Go client asks for `Compress:"zstd"` on every map request and zstd-decodes every message
//! (spec §4.3); an uncompressed reply kills its session. Any valid frame will do, and a frame of
//! raw blocks is valid, costs ~20 lines instead of a compressor in the binary, and adds 3 bytes per
//! 128 KiB. Mirrors the role of tailscale `util/zstdframe`, not its code.
//!
//! ```text
//! 28 B5 2F FD | FHD=0xA0 (single segment, 4-byte content size) | size u32 LE
//! { block header u24 LE: last(1) | type=raw(2) | size(21) } { size bytes } ...
//! ```
//! [`decode`] reads frames of raw and RLE blocks (what [`encode`] and simple encoders emit) and
//! reports compressed blocks as unsupported: tinyscale's own client never asks for zstd.
#![forbid(unsafe_code)]

/// zstd frame magic, little-endian 0xFD2FB528.
pub const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// RFC 8878 Block_Maximum_Size.
pub const MAX_BLOCK: usize = 128 * 1024;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ZstdError {
    #[error("not a zstd frame")]
    BadMagic,
    #[error("truncated zstd frame")]
    Truncated,
    #[error("zstd block type not supported")]
    Unsupported,
    #[error("zstd frame larger than the limit")]
    TooLarge,
}

/// Wraps `data` in one zstd frame of raw blocks.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 9 + 3 * (data.len() / MAX_BLOCK + 1));
    out.extend_from_slice(&MAGIC);
    out.push(0xA0);
    // Content size > u32 never happens for a map message; saturate rather than lie silently.
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
    let mut chunks = data.chunks(MAX_BLOCK).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0]); // empty last raw block
    }
    while let Some(c) = chunks.next() {
        let last = u32::from(chunks.peek().is_none());
        // len <= 128 KiB fits the 21-bit size field.
        let hdr = last | ((c.len() as u32) << 3);
        out.extend_from_slice(&hdr.to_le_bytes()[..3]);
        out.extend_from_slice(c);
    }
    out
}

/// Decodes concatenated frames of raw/RLE blocks, refusing output above `limit` bytes.
pub fn decode(mut src: &[u8], limit: usize) -> Result<Vec<u8>, ZstdError> {
    let mut out = Vec::new();
    while !src.is_empty() {
        if src.len() < 5 || src[..4] != MAGIC {
            return Err(ZstdError::BadMagic);
        }
        let fhd = src[4];
        let fcs_flag = fhd >> 6;
        let single = fhd & 0x20 != 0;
        let dict_len = [0usize, 1, 2, 4][usize::from(fhd & 3)];
        let fcs_len = match (fcs_flag, single) {
            (0, true) => 1,
            (0, false) => 0,
            (1, _) => 2,
            (2, _) => 4,
            _ => 8,
        };
        let has_checksum = fhd & 4 != 0;
        let hdr_len = 5 + usize::from(!single) + dict_len + fcs_len;
        src = src.get(hdr_len..).ok_or(ZstdError::Truncated)?;
        loop {
            let h = src.get(..3).ok_or(ZstdError::Truncated)?;
            let h = u32::from(h[0]) | u32::from(h[1]) << 8 | u32::from(h[2]) << 16;
            src = &src[3..];
            let size = (h >> 3) as usize;
            match (h >> 1) & 3 {
                0 => {
                    let b = src.get(..size).ok_or(ZstdError::Truncated)?;
                    if out.len() + size > limit {
                        return Err(ZstdError::TooLarge);
                    }
                    out.extend_from_slice(b);
                    src = &src[size..];
                }
                1 => {
                    let b = *src.first().ok_or(ZstdError::Truncated)?;
                    if out.len() + size > limit {
                        return Err(ZstdError::TooLarge);
                    }
                    out.resize(out.len() + size, b);
                    src = &src[1..];
                }
                _ => return Err(ZstdError::Unsupported),
            }
            if h & 1 == 1 {
                break;
            }
        }
        if has_checksum {
            src = src.get(4..).ok_or(ZstdError::Truncated)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn keepalive_vector() {
        let f = encode(br#"{"KeepAlive":true}"#);
        assert_eq!(&f[..9], &[0x28, 0xB5, 0x2F, 0xFD, 0xA0, 18, 0, 0, 0]);
        // last=1, raw, size 18 -> 18<<3|1 = 0x91
        assert_eq!(&f[9..12], &[0x91, 0, 0]);
        assert_eq!(decode(&f, 1 << 20).unwrap(), br#"{"KeepAlive":true}"#);
    }

    #[test]
    fn empty_and_multi_block() {
        assert_eq!(decode(&encode(b""), 10).unwrap(), b"");
        let big = vec![7u8; MAX_BLOCK * 2 + 5];
        let f = encode(&big);
        assert_eq!(f.len(), 9 + big.len() + 9);
        assert_eq!(decode(&f, big.len()).unwrap(), big);
        assert_eq!(decode(&f, big.len() - 1), Err(ZstdError::TooLarge));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode(b"{}", 10), Err(ZstdError::BadMagic));
        let f = encode(b"hello");
        assert_eq!(decode(&f[..f.len() - 1], 10), Err(ZstdError::Truncated));
    }

    proptest! {
        #[test]
        fn roundtrip(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            prop_assert_eq!(decode(&encode(&data), usize::MAX).unwrap(), data);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut d = MAGIC.to_vec();
            d.extend_from_slice(&data);
            let _ = decode(&d, 1 << 16);
            let _ = decode(&data, 1 << 16);
        }
    }
}
