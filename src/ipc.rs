//! Local API between the CLI (and later LuCI/ubus) and the daemon: JSON lines over a unix socket,
//! one request and one response per line (`/var/run/tinyscale.sock` by default).
//!
//! Plays the role of tailscale's LocalAPI. Message types are plain serde values; [`call`] is the
//! client shell, the listener lives in `daemon.rs`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

/// Default daemon socket.
pub const DEFAULT_SOCKET: &str = "/var/run/tinyscale.sock";

/// `tinyscale up` settings; `None` keeps the current preference.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct UpArgs {
    pub login_server: Option<String>,
    pub auth_key: Option<String>,
    pub hostname: Option<String>,
    pub advertise_routes: Option<Vec<String>>,
    pub accept_routes: Option<bool>,
    pub accept_dns: Option<bool>,
    pub advertise_exit_node: Option<bool>,
    pub exit_node: Option<String>,
    pub exit_node_allow_lan_access: Option<bool>,
    pub advertise_tags: Option<Vec<String>>,
    pub shields_up: Option<bool>,
    pub snat_subnet_routes: Option<bool>,
    /// Start a new interactive login even if logged in.
    pub force_reauth: bool,
    /// Unspecified settings go back to their defaults.
    pub reset: bool,
}

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum IpcRequest {
    Up(UpArgs),
    Down,
    Logout,
    Status,
    /// One disco ping round to a peer (host name, FQDN or tailnet IP).
    Ping {
        peer: String,
    },
    /// The latest netcheck report.
    Netcheck,
}

/// The daemon's answer: `data` on success, `error` otherwise.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IpcResponse {
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Sends one request to the daemon at `socket`.
pub async fn call(socket: &Path, req: &IpcRequest) -> Result<Value, String> {
    let sock = UnixStream::connect(socket).await.map_err(|e| {
        format!(
            "cannot talk to the tinyscale daemon at {}: {e}\n(is `tinyscale daemon` running? start it with `/etc/init.d/tinyscale start` or `tinyscale daemon`)",
            socket.display()
        )
    })?;
    let (r, mut w) = sock.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    w.write_all(&line).await.map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(r).lines();
    let resp = lines
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the daemon closed the connection")?;
    let resp: IpcResponse = serde_json::from_str(&resp).map_err(|e| format!("bad daemon response: {e}"))?;
    if resp.error.is_empty() {
        Ok(resp.data)
    } else {
        Err(resp.error)
    }
}
