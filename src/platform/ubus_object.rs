//! The ubus object `tinyscale`: the daemon's local API for LuCI (through rpcd) and scripts, and
//! [`serve`], the shell that keeps any [`Object`] registered on ubusd (the coordinator's
//! `tinyscale.server` uses it too).
//!
//! Methods map onto [`IpcRequest`]s and return the same JSON as the local socket:
//! `status`, `peers`, `netcheck`, `ping {peer}` (read side), `up {login_server, auth_key,
//! hostname, ...}`, `set {prefs}`, `login`, `down`, `logout`, `reload` (write side; rpcd's ACL
//! decides who may call which, [`METHODS`] says which side each is on). Unknown arguments are
//! ignored, but `set` refuses them (a misspelt pref must not pass silently); `ubus_rpc_session`,
//! which rpcd adds to every call, is always accepted. A wrong argument answers
//! UBUS_STATUS_INVALID_ARGUMENT with `{"error": ...}`.
//!
//! Events, from status snapshots compared when the daemon reports a change (backend state,
//! prefs, netmap, or a peer's path in the data plane; [`Daemon::changes`]) and every
//! [`SAFETY_POLL`] anyway: `tinyscale.state` `{"state": "Running", "ips": [...]}` when the
//! backend state or our own addresses change, `tinyscale.peer` `{"action":
//! "added"|"removed"|"changed", "id", "name", "ip", "online", "path"}` when a peer comes, goes,
//! or changes online state or path (`direct`, `derp-N` or empty).
//!
//! [`request_for`] and [`peer_changes`] are pure; [`serve`] is the shell: it keeps a connection to
//! ubusd, reconnecting with back-off (ubusd may start after us or restart) and registering again.

use std::{future::Future, path::PathBuf, pin::Pin, sync::Arc, time::Duration};

use serde_json::{json, Map, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    sync::{mpsc, watch},
};

use crate::{
    daemon::Daemon,
    platform::ipc::{for_each_pref, Fields, IpcRequest, IpcResponse, UpArgs},
    wire::ubus::{self, blobmsg, Client, Event, Invoke, Method},
};

/// ubusd's socket on OpenWrt.
pub const DEFAULT_SOCKET: &str = "/var/run/ubus/ubus.sock";
/// Our object's name (not `tailscale`: a community LuCI app registers that one).
pub const OBJECT: &str = "tinyscale";
/// The event sent on backend state changes.
pub const STATE_EVENT: &str = "tinyscale.state";
/// The event sent when a peer comes, goes or changes.
pub const PEER_EVENT: &str = "tinyscale.peer";
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often [`Object::events`] runs for an object without [`Object::changes`].
const EVENT_POLL: Duration = Duration::from_secs(1);
/// How often it runs anyway for one with them.
const SAFETY_POLL: Duration = Duration::from_secs(30);
/// How long `login` waits for the control server to hand out a login URL.
const LOGIN_WAIT: Duration = Duration::from_secs(10);
/// The argument every call through rpcd carries.
pub const SESSION_ARG: &str = "ubus_rpc_session";

/// Argument list of a method: name and blobmsg type, as advertised in the signature.
pub type Args = &'static [(&'static str, u8)];

/// A ubus method: its signature, which side of the rpcd ACL it belongs to, and how its
/// arguments become a request `R` (`Err` is the message for INVALID_ARGUMENT).
pub struct MethodDef<R> {
    pub name: &'static str,
    pub args: Args,
    /// Changes something: goes in the ACL's `write` section (otherwise `read`).
    pub write: bool,
    pub map: fn(&Map<String, Value>) -> Result<R, String>,
}

/// The signatures of a method table (what `ubus list -v` shows).
pub fn signatures<R>(table: &[MethodDef<R>]) -> Vec<Method> {
    table
        .iter()
        .map(|m| Method {
            name: m.name,
            args: m.args.to_vec(),
        })
        .collect()
}

/// Looks `method` up in `table` and maps its arguments.
pub fn map_call<R>(table: &[MethodDef<R>], method: &str, args: &Map<String, Value>) -> Result<R, String> {
    let m = table
        .iter()
        .find(|m| m.name == method)
        .ok_or_else(|| format!("unknown method {method}"))?;
    (m.map)(args)
}

/// `Err` naming the first argument that is neither in `allowed` nor `ubus_rpc_session`.
pub fn only_known(method: &str, allowed: Args, args: &Map<String, Value>) -> Result<(), String> {
    match args
        .keys()
        .find(|k| *k != SESSION_ARG && !allowed.iter().any(|(n, _)| n == k))
    {
        Some(k) => {
            let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
            Err(format!(
                "{method}: unknown argument {k:?} (known: {})",
                names.join(", ")
            ))
        }
        None => Ok(()),
    }
}

/// The arguments named in `allowed` (others dropped), to be read by name. One non-generic
/// function: a generic one would compile its own copy of the map building (and its sort) per
/// caller.
pub fn known(allowed: Args, args: &Map<String, Value>) -> Fields {
    let mut known = Map::new();
    for (k, v) in args {
        if allowed.iter().any(|(n, _)| n == k) {
            known.insert(k.clone(), v.clone());
        }
    }
    Fields::new(known)
}

/// The [`UpArgs`] among the arguments named in `allowed`.
fn up_args(method: &str, allowed: Args, args: &Map<String, Value>) -> Result<UpArgs, String> {
    UpArgs::from_fields(&mut known(allowed, args)).map_err(|e| format!("{method}: {e}"))
}

macro_rules! up_args {
    ($($f:ident: $t:ident),*) => {
        &[
            ("login_server", blobmsg::STRING),
            ("auth_key", blobmsg::STRING),
            $((stringify!($f), blobmsg::$t),)*
            ("force_reauth", blobmsg::BOOL),
            ("reset", blobmsg::BOOL),
        ]
    };
}
macro_rules! set_args {
    ($($f:ident: $t:ident),*) => { &[$((stringify!($f), blobmsg::$t)),*] };
}
/// `up` arguments and their blobmsg types, as advertised in the signature.
const UP_ARGS: Args = for_each_pref!(up_args);
/// `set` arguments: the prefs of `up` (the uci option names), without login and reset.
const SET_ARGS: Args = for_each_pref!(set_args);

/// `login` arguments.
const LOGIN_ARGS: Args = &[("login_server", blobmsg::STRING), ("auth_key", blobmsg::STRING)];

/// What a `tinyscale` method call asks of the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Ipc(IpcRequest),
    /// The peer list of `status`.
    Peers,
    /// Return the pending login URL, or start a login and wait for one.
    Login(UpArgs),
}

fn ping(a: &Map<String, Value>) -> Result<Call, String> {
    match a.get("peer") {
        Some(Value::String(p)) if !p.is_empty() => Ok(Call::Ipc(IpcRequest::Ping { peer: p.clone() })),
        _ => Err("ping needs argument peer (a host name, FQDN or tailnet IP)".into()),
    }
}

/// The `tinyscale` object's methods.
pub const METHODS: &[MethodDef<Call>] = &[
    MethodDef {
        name: "status",
        args: &[],
        write: false,
        map: |_| Ok(Call::Ipc(IpcRequest::Status)),
    },
    MethodDef {
        name: "peers",
        args: &[],
        write: false,
        map: |_| Ok(Call::Peers),
    },
    MethodDef {
        name: "netcheck",
        args: &[],
        write: false,
        map: |_| Ok(Call::Ipc(IpcRequest::Netcheck)),
    },
    MethodDef {
        name: "ping",
        args: &[("peer", blobmsg::STRING)],
        write: false,
        map: ping,
    },
    MethodDef {
        name: "up",
        args: UP_ARGS,
        write: true,
        map: |a| Ok(Call::Ipc(IpcRequest::Up(up_args("up", UP_ARGS, a)?))),
    },
    MethodDef {
        name: "set",
        args: SET_ARGS,
        write: true,
        map: |a| {
            only_known("set", SET_ARGS, a)?;
            Ok(Call::Ipc(IpcRequest::Set(up_args("set", SET_ARGS, a)?)))
        },
    },
    MethodDef {
        name: "login",
        args: LOGIN_ARGS,
        write: true,
        map: |a| Ok(Call::Login(up_args("login", LOGIN_ARGS, a)?)),
    },
    MethodDef {
        name: "down",
        args: &[],
        write: true,
        map: |_| Ok(Call::Ipc(IpcRequest::Down)),
    },
    MethodDef {
        name: "logout",
        args: &[],
        write: true,
        map: |_| Ok(Call::Ipc(IpcRequest::Logout)),
    },
    MethodDef {
        name: "reload",
        args: &[],
        write: true,
        map: |_| Ok(Call::Ipc(IpcRequest::Reload)),
    },
];

/// The object's signatures (what `ubus list -v tinyscale` shows).
pub fn methods() -> Vec<Method> {
    signatures(METHODS)
}

/// Maps a method call to what the daemon does; `Err` is the message for an invalid argument.
pub fn request_for(method: &str, args: &Map<String, Value>) -> Result<Call, String> {
    map_call(METHODS, method, args)
}

/// The status code and DATA for a daemon answer.
pub fn reply_for(r: IpcResponse) -> (u32, Value) {
    if r.error.is_empty() {
        (ubus::STATUS_OK, r.data)
    } else {
        (ubus::STATUS_UNKNOWN_ERROR, json!({ "error": r.error }))
    }
}

/// A method's answer: status code and DATA.
pub type Reply = (u32, Value);
/// A call being answered.
pub type PendingReply = Pin<Box<dyn Future<Output = Reply> + Send>>;
/// Events to send: name and data.
pub type Events = Vec<(&'static str, Map<String, Value>)>;
/// Events being computed.
pub type PendingEvents<'a> = Pin<Box<dyn Future<Output = Events> + Send + 'a>>;

/// What [`serve`] needs of a ubus object.
pub trait Object: Send + Sync + 'static {
    /// What [`Object::events`] compares against; reset on every registration.
    type Snapshot: Default + Send;
    /// The object's name.
    fn name(&self) -> &'static str;
    /// Its signatures.
    fn methods(&self) -> Vec<Method>;
    /// Starts answering a call; `Err` is the message for INVALID_ARGUMENT.
    fn call(self: &Arc<Self>, method: &str, args: &Map<String, Value>) -> Result<PendingReply, String>;
    /// The events since `snap` (and updates it). `announce` is false for the first call after
    /// a registration, which only takes the baseline.
    fn events<'a>(&'a self, _snap: &'a mut Self::Snapshot, _announce: bool) -> PendingEvents<'a> {
        Box::pin(async { Vec::new() })
    }
    /// A receiver that changes when [`Object::events`] may find something; `None` polls every
    /// [`EVENT_POLL`].
    fn changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// One peer as [`peer_changes`] compares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub id: u64,
    pub name: String,
    pub ip: String,
    pub online: bool,
    /// `direct`, `derp-N` (the relay region) or empty (no path yet).
    pub path: String,
}

impl PeerView {
    /// The view of one entry of status's `Peer` list.
    pub fn from_status(p: &Value) -> PeerView {
        let s = |k: &str| p[k].as_str().unwrap_or("").to_string();
        let path = if !s("CurAddr").is_empty() {
            "direct".to_string()
        } else if !s("Relay").is_empty() {
            format!("derp-{}", s("Relay"))
        } else {
            String::new()
        };
        PeerView {
            id: p["ID"].as_u64().unwrap_or(0),
            name: s("HostName"),
            ip: p["TailscaleIPs"][0].as_str().unwrap_or("").to_string(),
            online: p["Online"].as_bool().unwrap_or(false),
            path,
        }
    }
}

/// [pure] The `tinyscale.peer` events between two peer lists.
pub fn peer_changes(old: &[PeerView], new: &[PeerView]) -> Vec<Map<String, Value>> {
    let ev = |action: &str, p: &PeerView| {
        let v = json!({"action": action, "id": p.id, "name": p.name, "ip": p.ip, "online": p.online, "path": p.path});
        v.as_object().cloned().unwrap_or_default()
    };
    let mut out = Vec::new();
    for p in new {
        match old.iter().find(|o| o.id == p.id) {
            None => out.push(ev("added", p)),
            Some(o) if o != p => out.push(ev("changed", p)),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|p| p.id == o.id) {
            out.push(ev("removed", o));
        }
    }
    out
}

/// `login`: the pending login URL, or start a login (an `up` with the given server and key)
/// and wait up to [`LOGIN_WAIT`] for a URL, Running or an error.
async fn login(d: Arc<Daemon>, a: UpArgs) -> Reply {
    let summary = |v: &Value| {
        let url = v["AuthURL"].as_str().unwrap_or("");
        json!({"BackendState": v["BackendState"], "AuthURL": url, "Error": v["Error"], "QR": qr_rows(url)})
    };
    let settled = |v: &Value| v["AuthURL"] != "" || v["BackendState"] == "Running";
    let v = d.status_json().await;
    if settled(&v) {
        return (ubus::STATUS_OK, summary(&v));
    }
    let r = d.handle(IpcRequest::Up(a)).await;
    if !r.error.is_empty() {
        return reply_for(r);
    }
    let deadline = tokio::time::Instant::now() + LOGIN_WAIT;
    loop {
        let v = d.status_json().await;
        if settled(&v) || v["Error"] != "" || tokio::time::Instant::now() >= deadline {
            return (ubus::STATUS_OK, summary(&v));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The login URL as QR rows of `0`/`1` (dark) modules, for LuCI to draw; empty without a URL.
pub fn qr_rows(url: &str) -> Vec<String> {
    match crate::platform::qr::encode(url.as_bytes()) {
        Ok(q) if !url.is_empty() => (0..q.size)
            .map(|y| (0..q.size).map(|x| if q.get(x, y) { '1' } else { '0' }).collect())
            .collect(),
        _ => Vec::new(),
    }
}

/// What the daemon's events compare: backend state, our own addresses, the peers.
pub type DaemonSnapshot = (Option<crate::daemon::BackendState>, Vec<String>, Vec<PeerView>);

impl Object for Daemon {
    type Snapshot = DaemonSnapshot;

    fn name(&self) -> &'static str {
        OBJECT
    }

    fn methods(&self) -> Vec<Method> {
        methods()
    }

    fn call(self: &Arc<Self>, method: &str, args: &Map<String, Value>) -> Result<PendingReply, String> {
        let d = self.clone();
        Ok(match request_for(method, args)? {
            Call::Ipc(req) => Box::pin(async move { reply_for(d.handle(req).await) }),
            Call::Peers => Box::pin(async move {
                let v = d.status_json().await;
                (ubus::STATUS_OK, json!({ "Peer": v["Peer"] }))
            }),
            Call::Login(a) => Box::pin(login(d, a)),
        })
    }

    fn events<'a>(&'a self, snap: &'a mut Self::Snapshot, announce: bool) -> PendingEvents<'a> {
        Box::pin(async move {
            let status = self.status_json().await;
            let state = self.backend_state();
            let ips: Vec<String> = status["Self"]["TailscaleIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            let peers: Vec<PeerView> = status["Peer"]
                .as_array()
                .into_iter()
                .flatten()
                .map(PeerView::from_status)
                .collect();
            let mut out = Vec::new();
            if announce {
                if snap.0 != Some(state) || snap.1 != ips {
                    let mut m = Map::new();
                    m.insert("state".into(), serde_json::to_value(state).unwrap_or_default());
                    m.insert("ips".into(), json!(ips));
                    out.push((STATE_EVENT, m));
                }
                out.extend(peer_changes(&snap.2, &peers).into_iter().map(|m| (PEER_EVENT, m)));
            }
            *snap = (Some(state), ips, peers);
            out
        })
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(Daemon::changes(self))
    }
}

/// Keeps the daemon's `tinyscale` object registered on the ubusd at `path`.
pub async fn run(d: Arc<Daemon>, path: PathBuf) {
    serve(d, path).await
}

/// Keeps `obj` registered on the ubusd at `path` for the process's lifetime.
pub async fn serve<O: Object>(obj: Arc<O>, path: PathBuf) {
    let mut backoff = Duration::from_secs(1);
    let mut said_absent = false;
    loop {
        match UnixStream::connect(&path).await {
            Ok(sock) => {
                said_absent = false;
                match session(&obj, sock).await {
                    // A session that got registered resets the back-off.
                    Ok(true) => backoff = Duration::from_secs(1),
                    Ok(false) => {}
                    Err(e) => log::warn!("ubus connection failed socket={} err={e}", path.display()),
                }
                log::info!("ubus disconnected socket={}; reconnecting", path.display());
            }
            Err(e) => {
                if !said_absent {
                    log::info!("ubus not available socket={} err={e}; retrying", path.display());
                    said_absent = true;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection: register, answer calls, send events. `Ok(registered)` when ubusd closes
/// the socket.
async fn session<O: Object>(obj: &Arc<O>, mut sock: UnixStream) -> std::io::Result<bool> {
    let name = obj.name();
    let mut c = Client::new(name, obj.methods());
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 4096];
    let (done_tx, mut done_rx) = mpsc::channel::<(Invoke, u32, Value)>(16);
    let mut registered = false;
    let mut snap = O::Snapshot::default();
    let mut changes = obj.changes();
    let mut tick = tokio::time::interval(if changes.is_some() { SAFETY_POLL } else { EVENT_POLL });
    loop {
        while let Some(f) = c.poll_transmit() {
            sock.write_all(&f).await?;
        }
        tokio::select! {
            n = sock.read(&mut chunk) => {
                let n = n?;
                if n == 0 {
                    return Ok(registered);
                }
                buf.extend_from_slice(&chunk[..n]);
                while buf.len() >= ubus::HEADER_LEN + 4 {
                    let len = ubus::frame_len(&buf).map_err(bad_data)?;
                    if buf.len() < len {
                        break;
                    }
                    c.handle_frame(&buf[..len]).map_err(bad_data)?;
                    buf.drain(..len);
                }
                while let Some(ev) = c.poll_event() {
                    match ev {
                        Event::Registered { id } => {
                            log::info!("ubus object registered name={name} id={id:#x}");
                            registered = true;
                            if let Some(rx) = changes.as_mut() {
                                rx.borrow_and_update();
                            }
                            obj.events(&mut snap, false).await;
                        }
                        Event::RegisterFailed { status } => {
                            log::warn!("ubus refused object name={name} status={status}");
                            return Ok(false);
                        }
                        Event::Invoke(inv) => match obj.call(&inv.method, &inv.args) {
                            Err(msg) => c.reply(&inv, ubus::STATUS_INVALID_ARGUMENT, Some(&json!({ "error": msg }))),
                            Ok(fut) => {
                                let tx = done_tx.clone();
                                tokio::spawn(async move {
                                    let (status, data) = fut.await;
                                    let _ = tx.send((inv, status, data)).await;
                                });
                            }
                        },
                    }
                }
            }
            Some((inv, status, data)) = done_rx.recv() => c.reply(&inv, status, Some(&data)),
            r = changed(&mut changes) => {
                if r.is_err() {
                    changes = None;
                } else if registered {
                    for (id, data) in obj.events(&mut snap, true).await {
                        c.send_event(id, &data);
                    }
                }
            }
            _ = tick.tick() => {
                if registered {
                    for (id, data) in obj.events(&mut snap, true).await {
                        c.send_event(id, &data);
                    }
                }
            }
        }
    }
}

/// The next change on `rx`; never, without one.
async fn changed(rx: &mut Option<watch::Receiver<u64>>) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

fn bad_data(e: ubus::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ubus signatures name every field of `UpArgs` (`set`: all but login and reset), so
    /// a pref added to `UpArgs` but not to `for_each_pref!` fails here.
    #[test]
    fn signatures_cover_every_pref() {
        let Value::Object(fields) = serde_json::to_value(UpArgs::default()).unwrap() else {
            panic!("UpArgs is an object");
        };
        let mut all: Vec<&str> = fields.keys().map(String::as_str).collect();
        all.sort_unstable();
        let names = |a: Args| {
            let mut v: Vec<&str> = a.iter().map(|(n, _)| *n).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(names(UP_ARGS), all);
        all.retain(|n| !["login_server", "auth_key", "force_reauth", "reset"].contains(n));
        assert_eq!(names(SET_ARGS), all);
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn unknown_args_ignored() {
        let a = args(json!({"ubus_rpc_session": "0123", "x": 1}));
        assert_eq!(request_for("status", &a), Ok(Call::Ipc(IpcRequest::Status)));
        assert_eq!(request_for("peers", &a), Ok(Call::Peers));
        let up = request_for(
            "up",
            &args(json!({"ubus_rpc_session": "s", "hostname": "r1", "accept_routes": true})),
        );
        let Ok(Call::Ipc(IpcRequest::Up(u))) = up else {
            panic!("{up:?}")
        };
        assert_eq!((u.hostname.as_deref(), u.accept_routes), (Some("r1"), Some(true)));
    }

    #[test]
    fn bad_args_are_errors() {
        assert!(request_for("ping", &args(json!({}))).is_err());
        assert!(request_for("ping", &args(json!({"peer": 3}))).is_err());
        assert!(request_for("up", &args(json!({"accept_routes": "yes"}))).is_err());
        assert_eq!(
            request_for("ping", &args(json!({"peer": "r2", "ubus_rpc_session": "s"}))),
            Ok(Call::Ipc(IpcRequest::Ping { peer: "r2".into() }))
        );
    }

    #[test]
    fn set_takes_prefs_and_refuses_unknown_names() {
        let r = request_for(
            "set",
            &args(
                json!({"ubus_rpc_session": "s", "exit_node": "100.64.0.7", "shields_up": true,
                "advertise_routes": ["10.0.0.0/24"], "snat_subnet_routes": false}),
            ),
        );
        let Ok(Call::Ipc(IpcRequest::Set(u))) = r else {
            panic!("{r:?}")
        };
        assert_eq!(u.exit_node.as_deref(), Some("100.64.0.7"));
        assert_eq!((u.shields_up, u.snat_subnet_routes), (Some(true), Some(false)));
        assert_eq!(u.advertise_routes, Some(vec!["10.0.0.0/24".to_string()]));
        assert_eq!(u.accept_routes, None);
        // A misspelt pref names itself; login settings are not prefs.
        let e = request_for("set", &args(json!({"accept_route": true}))).unwrap_err();
        assert!(e.contains("\"accept_route\""), "{e}");
        assert!(request_for("set", &args(json!({"auth_key": "k"}))).is_err());
        assert!(request_for("set", &args(json!({"shields_up": "1"}))).is_err());
    }

    #[test]
    fn login_qr_rows() {
        let rows = qr_rows("http://127.0.0.1:8080/register/abc");
        let q = crate::platform::qr::encode(b"http://127.0.0.1:8080/register/abc").expect("qr");
        assert_eq!(rows.len(), q.size);
        assert!(rows.iter().all(|r| r.len() == q.size));
        // The finder pattern's corner is dark, the module inside its ring light.
        assert!(rows[0].starts_with("1111111") && rows[1].starts_with("1000001"));
        assert!(qr_rows("").is_empty());
    }

    #[test]
    fn login_and_reload_map() {
        let r = request_for(
            "login",
            &args(json!({"login_server": "http://h:1", "ubus_rpc_session": "s"})),
        );
        let Ok(Call::Login(u)) = r else { panic!("{r:?}") };
        assert_eq!(u.login_server.as_deref(), Some("http://h:1"));
        assert_eq!(request_for("reload", &Map::new()), Ok(Call::Ipc(IpcRequest::Reload)));
        assert!(request_for("nope", &Map::new()).is_err());
    }

    #[test]
    fn every_method_maps_and_sides_are_as_documented() {
        for m in METHODS {
            let a = if m.name == "ping" {
                args(json!({"peer": "p"}))
            } else {
                Map::new()
            };
            assert!(request_for(m.name, &a).is_ok(), "{}", m.name);
        }
        let read: Vec<&str> = METHODS.iter().filter(|m| !m.write).map(|m| m.name).collect();
        assert_eq!(read, ["status", "peers", "netcheck", "ping"]);
        assert_eq!(methods().len(), METHODS.len());
    }

    /// A state change notifies once and gives exactly one `tinyscale.state` event; an unchanged
    /// daemon notifies nothing, and a repeated request that changes nothing sends no event.
    #[tokio::test]
    async fn state_change_pushes_one_event_and_no_change_none() {
        let dir = std::env::temp_dir().join(format!("tinyscale-ubus-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = Daemon::load(&dir, None).expect("state dir loads");
        let mut rx = Object::changes(&*d).expect("the daemon reports changes");
        let mut snap = DaemonSnapshot::default();
        assert!(
            d.events(&mut snap, false).await.is_empty(),
            "the baseline sends nothing"
        );
        assert!(!rx.has_changed().expect("sender alive"), "nothing happened yet");
        assert!(d.events(&mut snap, true).await.is_empty());

        let r = d.handle(IpcRequest::Down).await;
        assert!(r.error.is_empty(), "{}", r.error);
        assert!(rx.has_changed().expect("sender alive"), "down notifies");
        rx.borrow_and_update();
        let ev = d.events(&mut snap, true).await;
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].0, STATE_EVENT);
        assert_eq!(Value::Object(ev[0].1.clone()), json!({"state": "Stopped", "ips": []}));
        assert!(
            d.events(&mut snap, true).await.is_empty(),
            "the same state again: no event"
        );

        // Down while already down: it may notify, but nothing changed, so no event.
        let _ = d.handle(IpcRequest::Down).await;
        assert!(d.events(&mut snap, true).await.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn peer(id: u64, online: bool, cur: &str, relay: &str) -> Value {
        json!({"ID": id, "HostName": format!("h{id}"), "TailscaleIPs": [format!("100.64.0.{id}")],
            "Online": online, "CurAddr": cur, "Relay": relay})
    }

    #[test]
    fn peer_events_from_snapshots() {
        let v = |ps: &[Value]| ps.iter().map(PeerView::from_status).collect::<Vec<_>>();
        let a = v(&[peer(1, true, "", "1"), peer(2, true, "192.0.2.1:41641", "1")]);
        assert_eq!((a[0].path.as_str(), a[1].path.as_str()), ("derp-1", "direct"));
        assert!(peer_changes(&a, &a).is_empty());
        // 1 goes direct, 2 leaves, 3 arrives.
        let b = v(&[peer(1, true, "198.51.100.2:41641", "1"), peer(3, false, "", "")]);
        let ev = peer_changes(&a, &b);
        let got: Vec<(String, u64, String)> = ev
            .iter()
            .map(|m| {
                (
                    m["action"].as_str().unwrap_or("").to_string(),
                    m["id"].as_u64().unwrap_or(0),
                    m["path"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("changed".to_string(), 1, "direct".to_string()),
                ("added".to_string(), 3, String::new()),
                ("removed".to_string(), 2, "direct".to_string())
            ]
        );
        assert_eq!(ev[1]["ip"], "100.64.0.3");
        // Going offline is a change too.
        let c = v(&[peer(1, false, "198.51.100.2:41641", "1"), peer(3, false, "", "")]);
        assert_eq!(peer_changes(&b, &c).len(), 1);
    }
}
