//! ubus messages (openwrt/ubus `ubusmsg.h`) and [`Client`], the state machine of a ubus client
//! that registers one object, answers its invocations and sends events (the parts of
//! `libubus.c`, `libubus-obj.c`, `libubus-req.c` that such a client uses).
//!
//! ```text
//! frame:  u8 version (0) | u8 type | be16 seq | be32 peer | blob attr id 0 (UBUS_ATTR_*)
//! ```
//!
//! The attrs inside the outer blob are plain (non-extended) blob attrs: STATUS, OBJID, OBJTYPE
//! are be32, OBJPATH and METHOD strings, SIGNATURE and DATA hold blobmsg.
//!
//! Conversation (ubusd speaks first):
//!
//! ```text
//! ubusd -> HELLO (peer = our client id)
//! us    -> ADD_OBJECT {OBJPATH, SIGNATURE {method: {arg: type}}}
//! ubusd -> DATA {OBJID, OBJTYPE}, STATUS {STATUS}              (same seq)
//! ubusd -> INVOKE {OBJID, METHOD, DATA, USER?, GROUP?, NO_REPLY?} (peer = the caller)
//! us    -> DATA {OBJID, DATA}, STATUS {STATUS, OBJID}          (same seq and peer)
//! us    -> INVOKE peer 1 {OBJID 1, METHOD "send", DATA {id, data}}   (an event)
//! ```
//!
//! The caller owns the socket: it feeds whole frames (sized with [`frame_len`]) to
//! [`Client::handle_frame`], writes what [`Client::poll_transmit`] returns, acts on
//! [`Client::poll_event`], and answers each [`Invoke`] with [`Client::reply`].
#![forbid(unsafe_code)]

pub mod blobmsg;

use std::collections::VecDeque;

pub use blobmsg::Error;
use blobmsg::{attrs, str_of, u32_of, BlobBuf};
use serde_json::{Map, Value};

/// Message types (`enum ubus_msg_type`).
pub const MSG_HELLO: u8 = 0;
pub const MSG_STATUS: u8 = 1;
pub const MSG_DATA: u8 = 2;
pub const MSG_PING: u8 = 3;
pub const MSG_LOOKUP: u8 = 4;
pub const MSG_INVOKE: u8 = 5;
pub const MSG_ADD_OBJECT: u8 = 6;
pub const MSG_REMOVE_OBJECT: u8 = 7;
pub const MSG_SUBSCRIBE: u8 = 8;
pub const MSG_UNSUBSCRIBE: u8 = 9;
pub const MSG_NOTIFY: u8 = 10;
pub const MSG_MONITOR: u8 = 11;

/// Message attributes (`enum ubus_msg_attr`).
pub const ATTR_STATUS: u8 = 1;
pub const ATTR_OBJPATH: u8 = 2;
pub const ATTR_OBJID: u8 = 3;
pub const ATTR_METHOD: u8 = 4;
pub const ATTR_OBJTYPE: u8 = 5;
pub const ATTR_SIGNATURE: u8 = 6;
pub const ATTR_DATA: u8 = 7;
pub const ATTR_TARGET: u8 = 8;
pub const ATTR_ACTIVE: u8 = 9;
pub const ATTR_NO_REPLY: u8 = 10;
pub const ATTR_SUBSCRIBERS: u8 = 11;
pub const ATTR_USER: u8 = 12;
pub const ATTR_GROUP: u8 = 13;
/// Highest attr id we keep (UBUS_ATTR_MAX - 1).
const ATTR_LAST: usize = 13;

/// Status codes (`enum ubus_msg_status`).
pub const STATUS_OK: u32 = 0;
pub const STATUS_INVALID_COMMAND: u32 = 1;
pub const STATUS_INVALID_ARGUMENT: u32 = 2;
pub const STATUS_METHOD_NOT_FOUND: u32 = 3;
pub const STATUS_NOT_FOUND: u32 = 4;
pub const STATUS_NO_DATA: u32 = 5;
pub const STATUS_PERMISSION_DENIED: u32 = 6;
pub const STATUS_TIMEOUT: u32 = 7;
pub const STATUS_NOT_SUPPORTED: u32 = 8;
pub const STATUS_UNKNOWN_ERROR: u32 = 9;

/// The event object (UBUS_SYSTEM_OBJECT_EVENT): events are INVOKEs of its method "send".
pub const SYSTEM_OBJECT_EVENT: u32 = 1;
/// Header size (`struct ubus_msghdr`).
pub const HEADER_LEN: usize = 8;
/// Largest message ubusd accepts or sends (UBUS_MAX_MSGLEN, 1 MiB).
pub const MAX_MSG_LEN: usize = 1 << 20;

/// A decoded frame; `attrs` indexes the UBUS_ATTR_* payloads by id (the last one wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg<'a> {
    pub ty: u8,
    pub seq: u16,
    pub peer: u32,
    pub attrs: [Option<&'a [u8]>; ATTR_LAST + 1],
}

impl<'a> Msg<'a> {
    /// The payload of attr `id`.
    pub fn attr(&self, id: u8) -> Option<&'a [u8]> {
        self.attrs.get(id as usize).copied().flatten()
    }

    /// A be32 attr.
    pub fn u32(&self, id: u8) -> Option<u32> {
        self.attr(id).and_then(|d| u32_of(d).ok())
    }

    /// A string attr.
    pub fn str(&self, id: u8) -> Option<&'a str> {
        self.attr(id).and_then(|d| str_of(d).ok())
    }
}

/// Total frame size from its first 12 bytes (header + outer blob header), so the reader knows
/// how much to wait for.
pub fn frame_len(head: &[u8]) -> Result<usize, Error> {
    let h: [u8; 4] = head
        .get(8..12)
        .ok_or(Error::TooShort)?
        .try_into()
        .map_err(|_| Error::TooShort)?;
    let len = (u32::from_be_bytes(h) & 0x00ff_ffff) as usize;
    if !(4..=MAX_MSG_LEN).contains(&len) {
        return Err(Error::BadLength);
    }
    Ok(HEADER_LEN + len)
}

/// Decodes one whole frame.
pub fn decode(frame: &[u8]) -> Result<Msg<'_>, Error> {
    if frame.len() < HEADER_LEN + 4 {
        return Err(Error::TooShort);
    }
    if frame[0] != 0 {
        return Err(Error::BadValue);
    }
    let (outer, _) = blobmsg::split_attr(&frame[HEADER_LEN..])?;
    let mut m = Msg {
        ty: frame[1],
        seq: u16::from_be_bytes([frame[2], frame[3]]),
        peer: u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]),
        attrs: [None; ATTR_LAST + 1],
    };
    for a in attrs(outer.data) {
        let a = a?;
        if let Some(slot) = m.attrs.get_mut(a.id as usize) {
            *slot = Some(a.data);
        }
    }
    Ok(m)
}

/// Encodes a frame whose outer blob holds `body` (already packed attrs).
pub fn encode(ty: u8, seq: u16, peer: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + body.len());
    out.extend_from_slice(&[0, ty]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&peer.to_be_bytes());
    out.extend_from_slice(&((4 + body.len()) as u32 & 0x00ff_ffff).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Argument types for a method signature (what `ubus list -v` prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method {
    pub name: &'static str,
    /// Argument name and blobmsg type ([`blobmsg::STRING`] etc.).
    pub args: Vec<(&'static str, u8)>,
}

/// The ADD_OBJECT body: OBJPATH and SIGNATURE (ubus_add_object, ubus_push_method_data).
pub fn add_object_body(name: &str, methods: &[Method]) -> Vec<u8> {
    let mut b = BlobBuf::default();
    b.put_str(ATTR_OBJPATH, name);
    let sig = b.open(ATTR_SIGNATURE, None);
    for m in methods {
        let t = b.open(blobmsg::TABLE, Some(m.name));
        for (arg, ty) in &m.args {
            b.put(blobmsg::INT32, Some(arg), &u32::from(*ty).to_be_bytes());
        }
        b.close(t);
    }
    b.close(sig);
    b.buf
}

/// Where the client is in its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connected, waiting for ubusd's HELLO.
    WaitHello,
    /// ADD_OBJECT sent with this seq.
    Registering(u16),
    /// The object is registered under this id.
    Ready(u32),
    /// Registration refused with this status; the caller reconnects later.
    Failed(u32),
}

/// A method call for our object; answer it with [`Client::reply`] (unless `no_reply`).
#[derive(Debug, Clone, PartialEq)]
pub struct Invoke {
    pub seq: u16,
    pub peer: u32,
    pub method: String,
    /// The arguments as a JSON object (unknown ones included; callers ignore them).
    pub args: Map<String, Value>,
    pub no_reply: bool,
}

/// What the caller acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The object is registered (again, after a reconnect).
    Registered {
        id: u32,
    },
    /// ubusd refused the object (e.g. the name is taken).
    RegisterFailed {
        status: u32,
    },
    Invoke(Invoke),
}

/// A ubus client owning one object. See the module doc for the caller's duties.
#[derive(Debug)]
pub struct Client {
    name: String,
    methods: Vec<Method>,
    state: State,
    /// Our client id from HELLO.
    peer: u32,
    seq: u16,
    tx: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
}

impl Client {
    /// A client that will register `name` with `methods` once ubusd says hello.
    pub fn new(name: &str, methods: Vec<Method>) -> Client {
        Client {
            name: name.to_string(),
            methods,
            state: State::WaitHello,
            peer: 0,
            seq: 0,
            tx: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Our client id (0 before HELLO).
    pub fn peer(&self) -> u32 {
        self.peer
    }

    fn next_seq(&mut self) -> u16 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Feeds one whole frame from ubusd. Malformed frames are an error (the caller drops the
    /// connection); messages we do not use are ignored.
    pub fn handle_frame(&mut self, frame: &[u8]) -> Result<(), Error> {
        let m = decode(frame)?;
        match (m.ty, self.state) {
            (MSG_HELLO, State::WaitHello) => {
                self.peer = m.peer;
                let seq = self.next_seq();
                self.tx.push_back(encode(
                    MSG_ADD_OBJECT,
                    seq,
                    0,
                    &add_object_body(&self.name, &self.methods),
                ));
                self.state = State::Registering(seq);
            }
            (MSG_DATA, State::Registering(seq)) if m.seq == seq => {
                if let Some(id) = m.u32(ATTR_OBJID) {
                    self.state = State::Ready(id);
                    self.events.push_back(Event::Registered { id });
                }
            }
            (MSG_STATUS, State::Registering(seq)) if m.seq == seq => {
                let status = m.u32(ATTR_STATUS).unwrap_or(STATUS_UNKNOWN_ERROR);
                // Success comes with DATA first, so any STATUS seen here is a refusal.
                self.state = State::Failed(status);
                self.events.push_back(Event::RegisterFailed { status });
            }
            (MSG_INVOKE, State::Ready(id)) => self.handle_invoke(&m, id),
            // Replies to our events, NOTIFY (subscriber changes), and anything else.
            _ => {}
        }
        Ok(())
    }

    fn handle_invoke(&mut self, m: &Msg<'_>, id: u32) {
        let no_reply = m
            .attr(ATTR_NO_REPLY)
            .is_some_and(|d| d.first().is_some_and(|b| *b != 0));
        let status = |c: &mut Client, s: u32, obj: u32| {
            if !no_reply {
                c.push_status(m.seq, m.peer, obj, s);
            }
        };
        let obj = m.u32(ATTR_OBJID).unwrap_or(0);
        if obj != id {
            return status(self, STATUS_NOT_FOUND, obj);
        }
        let Some(method) = m.str(ATTR_METHOD) else {
            return status(self, STATUS_INVALID_ARGUMENT, id);
        };
        if !self.methods.iter().any(|x| x.name == method) {
            return status(self, STATUS_METHOD_NOT_FOUND, id);
        }
        // ubus_process_invoke: a call without DATA is refused before the handler.
        let Some(args) = m.attr(ATTR_DATA).and_then(|d| blobmsg::table(d).ok()) else {
            return status(self, STATUS_INVALID_ARGUMENT, id);
        };
        self.events.push_back(Event::Invoke(Invoke {
            seq: m.seq,
            peer: m.peer,
            method: method.to_string(),
            args,
            no_reply,
        }));
    }

    fn push_status(&mut self, seq: u16, peer: u32, obj: u32, status: u32) {
        let mut b = BlobBuf::default();
        b.put_u32(ATTR_STATUS, status);
        b.put_u32(ATTR_OBJID, obj);
        self.tx.push_back(encode(MSG_STATUS, seq, peer, &b.buf));
    }

    /// Answers `inv`: DATA with `data` (a JSON object; anything else is wrapped as
    /// `{"result": v}`) when given, then STATUS (ubus_send_reply + ubus_complete_deferred_request).
    pub fn reply(&mut self, inv: &Invoke, status: u32, data: Option<&Value>) {
        let State::Ready(id) = self.state else { return };
        if inv.no_reply {
            return;
        }
        if let Some(v) = data {
            let mut b = BlobBuf::default();
            b.put_u32(ATTR_OBJID, id);
            let d = b.open(ATTR_DATA, None);
            match v {
                Value::Object(m) => b.put_fields(m),
                other => b.put_json("result", other),
            }
            b.close(d);
            let frame = encode(MSG_DATA, inv.seq, inv.peer, &b.buf);
            if frame.len() <= MAX_MSG_LEN {
                self.tx.push_back(frame);
            } else {
                return self.push_status(inv.seq, inv.peer, id, STATUS_UNKNOWN_ERROR);
            }
        }
        self.push_status(inv.seq, inv.peer, id, status);
    }

    /// Queues event `id` with `data` (ubus_send_event); only once registered.
    pub fn send_event(&mut self, id: &str, data: &Map<String, Value>) {
        if !matches!(self.state, State::Ready(_)) {
            return;
        }
        let mut b = BlobBuf::default();
        b.put_u32(ATTR_OBJID, SYSTEM_OBJECT_EVENT);
        b.put_str(ATTR_METHOD, "send");
        let d = b.open(ATTR_DATA, None);
        b.put_json("id", &Value::String(id.to_string()));
        let t = b.open(blobmsg::TABLE, Some("data"));
        b.put_fields(data);
        b.close(t);
        b.close(d);
        let seq = self.next_seq();
        self.tx.push_back(encode(MSG_INVOKE, seq, SYSTEM_OBJECT_EVENT, &b.buf));
    }

    /// The next frame to write.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.tx.pop_front()
    }

    /// The next thing for the caller to act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn methods() -> Vec<Method> {
        vec![
            Method {
                name: "status",
                args: vec![],
            },
            Method {
                name: "ping",
                args: vec![("peer", blobmsg::STRING)],
            },
        ]
    }

    fn ready() -> Client {
        let mut c = Client::new("tinyscale", methods());
        c.handle_frame(&encode(MSG_HELLO, 0, 0x1234, &[])).expect("hello");
        assert_eq!(c.peer(), 0x1234);
        let add = c.poll_transmit().expect("add_object");
        let m = decode(&add).expect("decode");
        assert_eq!((m.ty, m.str(ATTR_OBJPATH)), (MSG_ADD_OBJECT, Some("tinyscale")));
        let sig = blobmsg::table(m.attr(ATTR_SIGNATURE).expect("sig")).expect("sig table");
        assert_eq!(Value::Object(sig), json!({"status": {}, "ping": {"peer": 3}}));
        let mut b = BlobBuf::default();
        b.put_u32(ATTR_OBJID, 0x77);
        b.put_u32(ATTR_OBJTYPE, 0x78);
        c.handle_frame(&encode(MSG_DATA, m.seq, 0x1234, &b.buf)).expect("data");
        assert_eq!(c.poll_event(), Some(Event::Registered { id: 0x77 }));
        c
    }

    fn invoke(obj: u32, method: &str, args: Value) -> Vec<u8> {
        let mut b = BlobBuf::default();
        b.put_u32(ATTR_OBJID, obj);
        b.put_str(ATTR_METHOD, method);
        let d = b.open(ATTR_DATA, None);
        b.put_fields(args.as_object().expect("object"));
        b.close(d);
        encode(MSG_INVOKE, 9, 0x55, &b.buf)
    }

    #[test]
    fn invoke_and_reply() {
        let mut c = ready();
        c.handle_frame(&invoke(0x77, "ping", json!({"peer": "a", "ubus_rpc_session": "x"})))
            .expect("invoke");
        let Some(Event::Invoke(inv)) = c.poll_event() else {
            panic!("no invoke")
        };
        assert_eq!((inv.seq, inv.peer, inv.method.as_str()), (9, 0x55, "ping"));
        assert_eq!(inv.args["peer"], "a");
        c.reply(&inv, STATUS_OK, Some(&json!({"ok": true})));
        let d = c.poll_transmit().expect("data");
        let m = decode(&d).expect("decode");
        assert_eq!(
            (m.ty, m.seq, m.peer, m.u32(ATTR_OBJID)),
            (MSG_DATA, 9, 0x55, Some(0x77))
        );
        assert_eq!(
            Value::Object(blobmsg::table(m.attr(ATTR_DATA).expect("data")).expect("t")),
            json!({"ok": true})
        );
        let s = c.poll_transmit().expect("status");
        let m = decode(&s).expect("decode");
        assert_eq!(
            (m.ty, m.u32(ATTR_STATUS), m.u32(ATTR_OBJID)),
            (MSG_STATUS, Some(0), Some(0x77))
        );
    }

    #[test]
    fn unknown_method_and_object_answered_by_the_machine() {
        let mut c = ready();
        c.handle_frame(&invoke(0x77, "nope", json!({}))).expect("invoke");
        c.handle_frame(&invoke(0x70, "status", json!({}))).expect("invoke");
        assert_eq!(c.poll_event(), None);
        let a = c.poll_transmit().expect("status");
        assert_eq!(decode(&a).expect("d").u32(ATTR_STATUS), Some(STATUS_METHOD_NOT_FOUND));
        let b = c.poll_transmit().expect("status");
        assert_eq!(decode(&b).expect("d").u32(ATTR_STATUS), Some(STATUS_NOT_FOUND));
    }

    #[test]
    fn refused_registration() {
        let mut c = Client::new("tinyscale", methods());
        c.handle_frame(&encode(MSG_HELLO, 0, 5, &[])).expect("hello");
        let add = c.poll_transmit().expect("add");
        let mut b = BlobBuf::default();
        b.put_u32(ATTR_STATUS, STATUS_INVALID_ARGUMENT);
        c.handle_frame(&encode(MSG_STATUS, decode(&add).expect("d").seq, 5, &b.buf))
            .expect("status");
        assert_eq!(c.poll_event(), Some(Event::RegisterFailed { status: 2 }));
        assert_eq!(c.state(), State::Failed(2));
    }

    #[test]
    fn event_layout() {
        let mut c = ready();
        let mut data = Map::new();
        data.insert("state".into(), json!("Running"));
        c.send_event("tinyscale.state", &data);
        let f = c.poll_transmit().expect("event");
        let m = decode(&f).expect("decode");
        assert_eq!(
            (m.ty, m.peer, m.u32(ATTR_OBJID), m.str(ATTR_METHOD)),
            (MSG_INVOKE, 1, Some(1), Some("send"))
        );
        assert_eq!(
            Value::Object(blobmsg::table(m.attr(ATTR_DATA).expect("data")).expect("t")),
            json!({"id": "tinyscale.state", "data": {"state": "Running"}})
        );
    }

    proptest! {
        #[test]
        fn prop_random_frames_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..160), ty in 0..12u8) {
            let _ = frame_len(&bytes);
            let _ = decode(&bytes);
            let mut c = ready();
            let _ = c.handle_frame(&bytes);
            let _ = c.handle_frame(&encode(ty, 9, 3, &bytes));
        }
    }
}
