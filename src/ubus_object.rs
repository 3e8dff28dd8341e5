//! The ubus object `tinyscale`: the daemon's local API for LuCI (through rpcd) and scripts.
//!
//! Methods map onto [`IpcRequest`]s and return the same JSON as the local socket:
//! `status`, `up {login_server, auth_key, hostname, ...}`, `down`, `logout`, `netcheck`,
//! `ping {peer}`. Unknown arguments (rpcd adds `ubus_rpc_session` to every call) are ignored;
//! a wrong argument answers UBUS_STATUS_INVALID_ARGUMENT with `{"error": ...}`. When the backend
//! state changes the object sends event `tinyscale.state` `{"state": "Running"}`.
//!
//! [`request_for`] is the pure mapping; [`run`] is the shell: it keeps a connection to ubusd,
//! reconnecting with back-off (ubusd may start after us or restart) and registering again.

use std::{path::PathBuf, sync::Arc, time::Duration};

use serde_json::{json, Map, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    sync::mpsc,
};

use crate::{
    daemon::Daemon,
    ipc::{IpcRequest, IpcResponse, UpArgs},
    ubus::{self, blobmsg, Client, Event, Invoke, Method},
};

/// ubusd's socket on OpenWrt.
pub const DEFAULT_SOCKET: &str = "/var/run/ubus/ubus.sock";
/// Our object's name (not `tailscale`: a community LuCI app registers that one).
pub const OBJECT: &str = "tinyscale";
/// The event sent on backend state changes.
pub const STATE_EVENT: &str = "tinyscale.state";
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the backend state is compared for [`STATE_EVENT`].
const STATE_POLL: Duration = Duration::from_secs(1);

/// `up` arguments and their blobmsg types, as advertised in the signature.
const UP_ARGS: &[(&str, u8)] = &[
    ("login_server", blobmsg::STRING),
    ("auth_key", blobmsg::STRING),
    ("hostname", blobmsg::STRING),
    ("advertise_routes", blobmsg::ARRAY),
    ("accept_routes", blobmsg::BOOL),
    ("accept_dns", blobmsg::BOOL),
    ("advertise_exit_node", blobmsg::BOOL),
    ("exit_node", blobmsg::STRING),
    ("exit_node_allow_lan_access", blobmsg::BOOL),
    ("advertise_tags", blobmsg::ARRAY),
    ("shields_up", blobmsg::BOOL),
    ("snat_subnet_routes", blobmsg::BOOL),
    ("force_reauth", blobmsg::BOOL),
    ("reset", blobmsg::BOOL),
];

/// The object's methods and argument policies (what `ubus list -v tinyscale` shows).
pub fn methods() -> Vec<Method> {
    let m = |name, args: Vec<(&'static str, u8)>| Method { name, args };
    vec![
        m("status", vec![]),
        m("up", UP_ARGS.to_vec()),
        m("down", vec![]),
        m("logout", vec![]),
        m("netcheck", vec![]),
        m("ping", vec![("peer", blobmsg::STRING)]),
    ]
}

/// Maps a method call to a daemon request; `Err` is the message for an invalid argument.
pub fn request_for(method: &str, args: &Map<String, Value>) -> Result<IpcRequest, String> {
    Ok(match method {
        "status" => IpcRequest::Status,
        "down" => IpcRequest::Down,
        "logout" => IpcRequest::Logout,
        "netcheck" => IpcRequest::Netcheck,
        "ping" => match args.get("peer") {
            Some(Value::String(p)) if !p.is_empty() => IpcRequest::Ping { peer: p.clone() },
            _ => return Err("ping needs argument peer (a host name, FQDN or tailnet IP)".into()),
        },
        "up" => {
            let known: Map<String, Value> = args
                .iter()
                .filter(|(k, _)| UP_ARGS.iter().any(|(n, _)| n == k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let up: UpArgs = serde_json::from_value(Value::Object(known)).map_err(|e| format!("up: {e}"))?;
            IpcRequest::Up(up)
        }
        other => return Err(format!("unknown method {other}")),
    })
}

/// The status code and DATA for a daemon answer.
pub fn reply_for(r: IpcResponse) -> (u32, Value) {
    if r.error.is_empty() {
        (ubus::STATUS_OK, r.data)
    } else {
        (ubus::STATUS_UNKNOWN_ERROR, json!({ "error": r.error }))
    }
}

/// Keeps `tinyscale` registered on the ubusd at `path` for the daemon's lifetime.
pub async fn run(d: Arc<Daemon>, path: PathBuf) {
    let mut backoff = Duration::from_secs(1);
    let mut said_absent = false;
    loop {
        match UnixStream::connect(&path).await {
            Ok(sock) => {
                said_absent = false;
                match session(&d, sock).await {
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

/// One connection: register, answer calls, send state events. `Ok(registered)` when ubusd
/// closes the socket.
async fn session(d: &Arc<Daemon>, mut sock: UnixStream) -> std::io::Result<bool> {
    let mut c = Client::new(OBJECT, methods());
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 4096];
    let (done_tx, mut done_rx) = mpsc::channel::<(Invoke, u32, Value)>(16);
    let mut registered = false;
    let mut last_state = d.backend_state();
    let mut tick = tokio::time::interval(STATE_POLL);
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
                            log::info!("ubus object registered name={OBJECT} id={id:#x}");
                            registered = true;
                            last_state = d.backend_state();
                        }
                        Event::RegisterFailed { status } => {
                            log::warn!("ubus refused object name={OBJECT} status={status}");
                            return Ok(false);
                        }
                        Event::Invoke(inv) => match request_for(&inv.method, &inv.args) {
                            Err(msg) => c.reply(&inv, ubus::STATUS_INVALID_ARGUMENT, Some(&json!({ "error": msg }))),
                            Ok(req) => {
                                let (d, tx) = (d.clone(), done_tx.clone());
                                tokio::spawn(async move {
                                    let (status, data) = reply_for(d.handle(req).await);
                                    let _ = tx.send((inv, status, data)).await;
                                });
                            }
                        },
                    }
                }
            }
            Some((inv, status, data)) = done_rx.recv() => c.reply(&inv, status, Some(&data)),
            _ = tick.tick() => {
                let now = d.backend_state();
                if now != last_state && registered {
                    last_state = now;
                    let mut m = Map::new();
                    m.insert("state".into(), serde_json::to_value(now).unwrap_or_default());
                    c.send_event(STATE_EVENT, &m);
                }
            }
        }
    }
}

fn bad_data(e: ubus::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn unknown_args_ignored() {
        let a = args(json!({"ubus_rpc_session": "0123", "x": 1}));
        assert_eq!(request_for("status", &a), Ok(IpcRequest::Status));
        let up = request_for(
            "up",
            &args(json!({"ubus_rpc_session": "s", "hostname": "r1", "accept_routes": true})),
        );
        let Ok(IpcRequest::Up(u)) = up else { panic!("{up:?}") };
        assert_eq!((u.hostname.as_deref(), u.accept_routes), (Some("r1"), Some(true)));
    }

    #[test]
    fn bad_args_are_errors() {
        assert!(request_for("ping", &args(json!({}))).is_err());
        assert!(request_for("ping", &args(json!({"peer": 3}))).is_err());
        assert!(request_for("up", &args(json!({"accept_routes": "yes"}))).is_err());
        assert_eq!(
            request_for("ping", &args(json!({"peer": "r2", "ubus_rpc_session": "s"}))),
            Ok(IpcRequest::Ping { peer: "r2".into() })
        );
    }

    #[test]
    fn every_method_maps() {
        for m in methods() {
            let a = if m.name == "ping" {
                args(json!({"peer": "p"}))
            } else {
                Map::new()
            };
            assert!(request_for(m.name, &a).is_ok(), "{}", m.name);
        }
    }
}
