//! blob and blobmsg TLV encoding (libubox `blob.h`, `blob.c`, `blobmsg.h`, `blobmsg.c`,
//! `blobmsg_json.c`), and its mapping to and from JSON values.
//!
//! ```text
//! blob attr:   be32 id_len | payload | zero padding to a 4-byte boundary
//!              id_len bit 31     = extended (set for blobmsg)
//!              id_len bits 24-30 = id (blobmsg: the type)
//!              id_len bits 0-23  = length incl. the 4-byte header, excl. padding
//! blobmsg:     be16 namelen | name | NUL | zero padding to 4 (counted from the payload start,
//!              i.e. pad4(2 + namelen + 1)) | value
//! ```
//!
//! A nested attr's length covers its children with their padding. Integers are big-endian,
//! strings carry their NUL, a bool is an int8, a double is the big-endian IEEE bit pattern.
//! Array elements have empty names. JSON numbers that fit in i32 become INT32, other integers
//! INT64 (as `blobmsg_add_json_element` does); `null` becomes UNSPEC.
//!
//! Pure: callers hand in bytes and get values back.
#![forbid(unsafe_code)]

use serde_json::{Map, Number, Value};

/// blobmsg types (`enum blobmsg_type`).
pub const UNSPEC: u8 = 0;
pub const ARRAY: u8 = 1;
pub const TABLE: u8 = 2;
pub const STRING: u8 = 3;
pub const INT64: u8 = 4;
pub const INT32: u8 = 5;
pub const INT16: u8 = 6;
/// INT8, also BLOBMSG_TYPE_BOOL.
pub const INT8: u8 = 7;
pub const BOOL: u8 = INT8;
pub const DOUBLE: u8 = 8;

/// Bit 31 of `id_len` (BLOB_ATTR_EXTENDED).
const EXTENDED: u32 = 0x8000_0000;
/// Bits 0-23 of `id_len` (BLOB_ATTR_LEN_MASK).
const LEN_MASK: u32 = 0x00ff_ffff;
/// Deepest nesting we decode; blobmsg from ubusd is shallow, this only stops hostile input.
const MAX_DEPTH: usize = 32;

/// Decoding failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Fewer bytes than a header or its declared length.
    TooShort,
    /// A length below the header size, or a blobmsg name that overruns its attr.
    BadLength,
    /// A value whose size does not fit its type, or an unknown type.
    BadValue,
    /// A name or string that is not NUL-terminated UTF-8.
    BadString,
    /// Nesting deeper than [`MAX_DEPTH`].
    TooDeep,
}

/// Rounds up to the 4-byte blob alignment (BLOB_ATTR_ALIGN).
pub(crate) fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// One attr as found in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    pub id: u8,
    pub extended: bool,
    /// The payload, without header and padding.
    pub data: &'a [u8],
}

/// Iterates over the attrs packed in `buf`; yields `Err` once and stops on malformed input.
pub struct Attrs<'a> {
    buf: &'a [u8],
    failed: bool,
}

/// The attrs packed in `buf` (a nested attr's payload, or a message body).
pub fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { buf, failed: false }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() || self.failed {
            return None;
        }
        let r = split_attr(self.buf);
        match r {
            Ok((a, rest)) => {
                self.buf = rest;
                Some(Ok(a))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Reads the attr at the front of `buf`; returns it and the bytes after its padding.
pub fn split_attr(buf: &[u8]) -> Result<(Attr<'_>, &[u8]), Error> {
    let head: [u8; 4] = buf
        .get(..4)
        .ok_or(Error::TooShort)?
        .try_into()
        .map_err(|_| Error::TooShort)?;
    let id_len = u32::from_be_bytes(head);
    let len = (id_len & LEN_MASK) as usize;
    if len < 4 {
        return Err(Error::BadLength);
    }
    let data = buf.get(4..len).ok_or(Error::TooShort)?;
    let next = pad4(len).min(buf.len());
    Ok((
        Attr {
            id: ((id_len >> 24) & 0x7f) as u8,
            extended: id_len & EXTENDED != 0,
            data,
        },
        &buf[next..],
    ))
}

/// A blobmsg attr split into name and value bytes.
pub fn split_msg<'a>(a: &Attr<'a>) -> Result<(&'a str, &'a [u8]), Error> {
    let d = a.data;
    let n = u16::from_be_bytes([*d.first().ok_or(Error::BadLength)?, *d.get(1).ok_or(Error::BadLength)?]) as usize;
    let hdr = pad4(2 + n + 1);
    if d.len() < hdr {
        return Err(Error::BadLength);
    }
    if d[2 + n] != 0 {
        return Err(Error::BadString);
    }
    let name = std::str::from_utf8(&d[2..2 + n]).map_err(|_| Error::BadString)?;
    Ok((name, &d[hdr..]))
}

/// The text of a NUL-terminated blob string.
pub fn str_of(d: &[u8]) -> Result<&str, Error> {
    match d.split_last() {
        Some((0, s)) => std::str::from_utf8(s).map_err(|_| Error::BadString),
        _ => Err(Error::BadString),
    }
}

/// A big-endian u32 payload (blob_get_u32).
pub fn u32_of(d: &[u8]) -> Result<u32, Error> {
    Ok(u32::from_be_bytes(d.try_into().map_err(|_| Error::BadValue)?))
}

/// Converts one blobmsg value of type `ty` to JSON (blobmsg_format_json's choices: INT8 is a
/// bool, integers are signed, UNSPEC is null, NaN/infinite doubles are null).
pub fn value_of(ty: u8, d: &[u8]) -> Result<Value, Error> {
    value_at(ty, d, 0)
}

fn value_at(ty: u8, d: &[u8], depth: usize) -> Result<Value, Error> {
    if depth > MAX_DEPTH {
        return Err(Error::TooDeep);
    }
    let fixed = |n: usize| -> Result<&[u8], Error> {
        if d.len() == n {
            Ok(d)
        } else {
            Err(Error::BadValue)
        }
    };
    Ok(match ty {
        UNSPEC => Value::Null,
        ARRAY => {
            let mut out = Vec::new();
            for a in attrs(d) {
                let a = a?;
                if !a.extended {
                    return Err(Error::BadValue);
                }
                let (_, v) = split_msg(&a)?;
                out.push(value_at(a.id, v, depth + 1)?);
            }
            Value::Array(out)
        }
        TABLE => Value::Object(table_at(d, depth + 1)?),
        STRING => Value::String(str_of(d)?.to_string()),
        INT64 => Value::from(i64::from_be_bytes(fixed(8)?.try_into().map_err(|_| Error::BadValue)?)),
        INT32 => Value::from(i32::from_be_bytes(fixed(4)?.try_into().map_err(|_| Error::BadValue)?)),
        INT16 => Value::from(i16::from_be_bytes(fixed(2)?.try_into().map_err(|_| Error::BadValue)?)),
        INT8 => Value::Bool(fixed(1)?[0] != 0),
        DOUBLE => {
            let f = f64::from_bits(u64::from_be_bytes(fixed(8)?.try_into().map_err(|_| Error::BadValue)?));
            Number::from_f64(f).map_or(Value::Null, Value::Number)
        }
        _ => return Err(Error::BadValue),
    })
}

/// Decodes packed blobmsg attrs (a table's payload, or UBUS_ATTR_DATA) into a JSON object.
/// Non-extended attrs are skipped; a repeated name keeps the last value.
pub fn table(d: &[u8]) -> Result<Map<String, Value>, Error> {
    table_at(d, 0)
}

fn table_at(d: &[u8], depth: usize) -> Result<Map<String, Value>, Error> {
    let mut out = Map::new();
    for a in attrs(d) {
        let a = a?;
        if !a.extended {
            continue;
        }
        let (name, v) = split_msg(&a)?;
        out.insert(name.to_string(), value_at(a.id, v, depth)?);
    }
    Ok(out)
}

/// A growing blob buffer (libubox `struct blob_buf`, without the outer head attr).
#[derive(Debug, Default, Clone)]
pub struct BlobBuf {
    pub buf: Vec<u8>,
}

impl BlobBuf {
    /// Starts an attr; returns the cookie for [`BlobBuf::close`]. `name` makes it a blobmsg.
    pub fn open(&mut self, id: u8, name: Option<&str>) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        if let Some(n) = name {
            // Names are short (method and key names); longer ones are cut at u16::MAX.
            let n = &n.as_bytes()[..n.len().min(u16::MAX as usize)];
            self.buf.extend_from_slice(&(n.len() as u16).to_be_bytes());
            self.buf.extend_from_slice(n);
            self.buf.push(0);
            self.align();
        }
        // The extended bit doubles as "this is a blobmsg" until close writes the length.
        let ext = if name.is_some() { EXTENDED } else { 0 };
        self.buf[start..start + 4].copy_from_slice(&(ext | (u32::from(id & 0x7f)) << 24).to_be_bytes());
        start
    }

    /// Ends the attr started at `start`: writes its length, then pads.
    pub fn close(&mut self, start: usize) {
        let len = ((self.buf.len() - start) as u32).min(LEN_MASK);
        let mut h = [0u8; 4];
        h.copy_from_slice(&self.buf[start..start + 4]);
        let id_len = (u32::from_be_bytes(h) & !LEN_MASK) | len;
        self.buf[start..start + 4].copy_from_slice(&id_len.to_be_bytes());
        self.align();
    }

    fn align(&mut self) {
        self.buf.resize(pad4(self.buf.len()), 0);
    }

    /// Adds a leaf attr with `data` as payload.
    pub fn put(&mut self, id: u8, name: Option<&str>, data: &[u8]) {
        let s = self.open(id, name);
        self.buf.extend_from_slice(data);
        self.close(s);
    }

    /// A plain blob u32 (blob_put_int32).
    pub fn put_u32(&mut self, id: u8, v: u32) {
        self.put(id, None, &v.to_be_bytes());
    }

    /// A plain blob string with its NUL (blob_put_string).
    pub fn put_str(&mut self, id: u8, s: &str) {
        let at = self.open(id, None);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.close(at);
    }

    /// Adds JSON `v` as a blobmsg named `name` (blobmsg_add_json_element).
    pub fn put_json(&mut self, name: &str, v: &Value) {
        match v {
            Value::Null => self.put(UNSPEC, Some(name), &[]),
            Value::Bool(b) => self.put(BOOL, Some(name), &[u8::from(*b)]),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    match i32::try_from(i) {
                        Ok(i) => self.put(INT32, Some(name), &i.to_be_bytes()),
                        Err(_) => self.put(INT64, Some(name), &i.to_be_bytes()),
                    }
                } else {
                    // u64 above i64::MAX and true floats.
                    let f = n.as_f64().unwrap_or(0.0);
                    self.put(DOUBLE, Some(name), &f.to_bits().to_be_bytes())
                }
            }
            Value::String(s) => {
                let at = self.open(STRING, Some(name));
                self.buf.extend_from_slice(s.as_bytes());
                self.buf.push(0);
                self.close(at);
            }
            Value::Array(a) => {
                let at = self.open(ARRAY, Some(name));
                for e in a {
                    self.put_json("", e);
                }
                self.close(at);
            }
            Value::Object(m) => {
                let at = self.open(TABLE, Some(name));
                self.put_fields(m);
                self.close(at);
            }
        }
    }

    /// Adds each field of `m` as a blobmsg (a table's children, or UBUS_ATTR_DATA's).
    pub fn put_fields(&mut self, m: &Map<String, Value>) {
        for (k, v) in m {
            self.put_json(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::vectors::hex;

    fn enc(m: &Value) -> Vec<u8> {
        let mut b = BlobBuf::default();
        b.put_fields(m.as_object().expect("object"));
        b.buf
    }

    #[test]
    fn string_and_int_layout() {
        // blobmsg_add_string(b, "id", "x"); blobmsg_add_u32(b, "n", 7)
        let b = enc(&json!({"id": "x", "n": 7}));
        assert_eq!(
            b,
            hex("83 00 00 0e  00 02 69 64 00 00 00 00  78 00 00 00 \
                 85 00 00 0c  00 01 6e 00  00 00 00 07")
        );
        assert_eq!(Value::Object(table(&b).expect("decode")), json!({"id": "x", "n": 7}));
    }

    #[test]
    fn nested_and_kinds() {
        let v = json!({"a": [1, "two", true, null, 2.5], "t": {"big": 1_i64 << 40, "neg": -3}, "e": {}, "s": ""});
        assert_eq!(Value::Object(table(&enc(&v)).expect("decode")), v);
    }

    #[test]
    fn int16_and_plain_attrs() {
        let mut b = BlobBuf::default();
        b.put(INT16, Some("h"), &(-2i16).to_be_bytes());
        b.put_u32(3, 9); // plain attr: skipped in a table
        assert_eq!(Value::Object(table(&b.buf).expect("decode")), json!({"h": -2}));
    }

    #[test]
    fn malformed() {
        assert_eq!(table(&[0x83, 0, 0, 2]), Err(Error::BadLength));
        assert_eq!(table(&[0x83, 0, 0, 9, 0]), Err(Error::TooShort));
        // a string without its NUL
        assert_eq!(table(&hex("83 00 00 09 00 01 61 00 62")), Err(Error::BadString));
        // an int32 with 2 bytes
        assert_eq!(table(&hex("85 00 00 0a 00 01 61 00 00 01")), Err(Error::BadValue));
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
            "[^\u{0}]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn prop_roundtrip(m in prop::collection::btree_map("[a-z_]{0,8}", json_value(), 0..6)) {
            let v = Value::Object(m.into_iter().collect());
            let back = table(&enc(&v)).expect("decode");
            prop_assert_eq!(Value::Object(back), v);
        }

        #[test]
        fn prop_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = table(&bytes);
            for ty in 0..10u8 {
                let _ = value_of(ty, &bytes);
            }
        }
    }
}
