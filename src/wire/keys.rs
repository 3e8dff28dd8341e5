//! Curve25519 key types in Tailscale's text forms (`mkey:`, `nodekey:`, `discokey:`, `privkey:`).
//!
//! Mirrors tailscale `types/key/{machine,node,disco}.go`. Private keys have no `Display` and a
//! redacted `Debug`; their text comes only from [`MachinePrivate::to_key_str`] and friends, so a
//! stray `{}` can never print a secret. Public keys log short, as `[ab12c]`.
//!
//! The caller supplies randomness (`from_random`) so the module stays free of I/O.
#![forbid(unsafe_code)]

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use x25519_dalek::{PublicKey, StaticSecret};

/// Why a key text failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key has the wrong prefix")]
    WrongPrefix,
    #[error("key hex part is not 64 hex digits")]
    BadHex,
}

/// Lowercase hex of `b`.
pub fn hex_encode(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(HEX[(x >> 4) as usize] as char);
        s.push(HEX[(x & 15) as usize] as char);
    }
    s
}

/// Decodes exactly 64 hex digits (either case) into 32 bytes.
pub fn hex_decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return Err(KeyError::BadHex);
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = hex_val(b[2 * i]).ok_or(KeyError::BadHex)?;
        let lo = hex_val(b[2 * i + 1]).ok_or(KeyError::BadHex)?;
        *o = (hi << 4) | lo;
    }
    Ok(out)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Clamps a Curve25519 scalar as Go's `key.NewNode()` does.
pub fn clamp(mut b: [u8; 32]) -> [u8; 32] {
    b[0] &= 248;
    b[31] = (b[31] & 127) | 64;
    b
}

macro_rules! public_key {
    ($name:ident, $prefix:literal) => {
        #[doc = concat!("A public key whose text form is `", $prefix, "<64 hex>`.")]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The text prefix, including the colon.
            pub const PREFIX: &'static str = $prefix;

            /// Raw 32 bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// True for the all-zero key, which Go sends to mean "absent".
            pub fn is_zero(&self) -> bool {
                self.0 == [0u8; 32]
            }

            /// Parses `prefix:<hex>`; the prefix must match exactly.
            pub fn parse(s: &str) -> Result<Self, KeyError> {
                let hex = s.strip_prefix($prefix).ok_or(KeyError::WrongPrefix)?;
                hex_decode32(hex).map(Self)
            }

            /// Hex without the prefix (headscale's DERP `Derp-Public-Key` style).
            pub fn untyped_hex(&self) -> String {
                hex_encode(&self.0)
            }

            /// Short log form `[abcde]`: the first five base64 characters, as Go's ShortString.
            pub fn short(&self) -> String {
                let h = hex_encode(&self.0[..3]);
                format!("[{}]", &h[..5])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str($prefix)?;
                f.write_str(&hex_encode(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", stringify!($name), self.short())
            }
        }

        impl std::str::FromStr for $name {
            type Err = KeyError;
            fn from_str(s: &str) -> Result<Self, KeyError> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                // Go marshals a zero key as the typed zero string; an empty string is tolerated.
                if s.is_empty() {
                    return Ok(Self::default());
                }
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

macro_rules! private_key {
    ($name:ident, $public:ident) => {
        #[doc = concat!("A private key (text form `privkey:<hex>`) whose public half is [`", stringify!($public), "`].")]
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name([u8; 32]);

        impl $name {
            /// A new clamped key from 32 random bytes supplied by the caller.
            pub fn from_random(bytes: [u8; 32]) -> Self {
                Self(clamp(bytes))
            }

            /// Raw secret bytes; callers must not log them.
            pub fn to_bytes(&self) -> [u8; 32] {
                self.0
            }

            /// The public half.
            pub fn public(&self) -> $public {
                let s = StaticSecret::from(self.0);
                $public(PublicKey::from(&s).to_bytes())
            }

            /// X25519 shared secret with `peer`.
            pub fn shared(&self, peer: &$public) -> [u8; 32] {
                self.dh(&peer.0)
            }

            /// X25519 with raw public bytes (Noise `DH`).
            pub fn dh(&self, peer: &[u8; 32]) -> [u8; 32] {
                let s = StaticSecret::from(self.0);
                s.diffie_hellman(&PublicKey::from(*peer)).to_bytes()
            }

            /// The only way to get text: `privkey:<hex>`, for the state file.
            pub fn to_key_str(&self) -> String {
                format!("privkey:{}", hex_encode(&self.0))
            }

            /// Parses `privkey:<hex>`.
            pub fn from_key_str(s: &str) -> Result<Self, KeyError> {
                let hex = s.strip_prefix("privkey:").ok_or(KeyError::WrongPrefix)?;
                hex_decode32(hex).map(Self)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "{}(redacted, public {})",
                    stringify!($name),
                    self.public().short()
                )
            }
        }
    };
}

public_key!(MachinePublic, "mkey:");
public_key!(NodePublic, "nodekey:");
public_key!(DiscoPublic, "discokey:");
private_key!(MachinePrivate, MachinePublic);
private_key!(NodePrivate, NodePublic);
private_key!(DiscoPrivate, DiscoPublic);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_roundtrip_and_prefix_checks() {
        let k = NodePrivate::from_random([7u8; 32]);
        let p = k.public();
        let s = p.to_string();
        assert!(s.starts_with("nodekey:") && s.len() == 8 + 64);
        assert_eq!(NodePublic::parse(&s).unwrap(), p);
        assert_eq!(
            NodePublic::parse(&s.to_uppercase().replace("NODEKEY:", "nodekey:")).unwrap(),
            p
        );
        assert_eq!(MachinePublic::parse(&s), Err(KeyError::WrongPrefix));
        assert_eq!(NodePublic::parse("nodekey:abc"), Err(KeyError::BadHex));
        let t = k.to_key_str();
        assert_eq!(NodePrivate::from_key_str(&t).unwrap(), k);
        assert!(!format!("{k:?}").contains(&t[8..]));
    }

    #[test]
    fn clamped_and_dh_agrees() {
        let a = MachinePrivate::from_random([1u8; 32]);
        let b = MachinePrivate::from_random([2u8; 32]);
        assert_eq!(a.to_bytes()[0] & 7, 0);
        assert_eq!(a.to_bytes()[31] & 0xc0, 0x40);
        assert_eq!(a.shared(&b.public()), b.shared(&a.public()));
    }

    #[test]
    fn rfc7748_public_vector() {
        // RFC 7748 §6.1 Alice's key pair.
        let sk = hex_decode32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a").unwrap();
        let k = NodePrivate(sk);
        assert_eq!(
            k.public().untyped_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn serde_zero_and_typed() {
        let z: NodePublic = serde_json::from_str(&format!("\"nodekey:{}\"", "0".repeat(64))).unwrap();
        assert!(z.is_zero());
        let e: NodePublic = serde_json::from_str("\"\"").unwrap();
        assert!(e.is_zero());
        assert!(serde_json::from_str::<DiscoPublic>("\"nodekey:00\"").is_err());
    }
}
