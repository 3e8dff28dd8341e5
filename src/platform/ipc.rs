//! Local API between the CLI and the daemon: JSON lines over a unix socket, one request and one
//! response per line (`/var/run/tinyscale.sock` by default). The ubus object
//! ([`crate::platform::ubus_object`]) maps its methods onto the same requests.
//!
//! Plays the role of tailscale's LocalAPI. Message types are plain serde values; [`call`] is the
//! client shell, the listener lives in `daemon.rs`.

use std::{future::Future, os::unix::fs::PermissionsExt, path::Path};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
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
    /// Interface whose prefixes are advertised, kept current ("" stops).
    pub advertise_lan: Option<String>,
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

/// The prefs `up` and `set` carry, listed once for every place that walks them (the daemon's
/// merge, the CLI's `--config` overlay, the ubus signatures): calls `$m!` with each pref as
/// `field: blobmsg type` (the type of its ubus argument), in the ubus signature's order. Each is
/// an `Option` field of [`UpArgs`] and a plain field of the daemon's `Prefs`.
macro_rules! for_each_pref {
    ($m:ident) => {
        $m!(
            hostname: STRING,
            advertise_routes: ARRAY,
            advertise_lan: STRING,
            accept_routes: BOOL,
            accept_dns: BOOL,
            advertise_exit_node: BOOL,
            exit_node: STRING,
            exit_node_allow_lan_access: BOOL,
            advertise_tags: ARRAY,
            shields_up: BOOL,
            snat_subnet_routes: BOOL
        )
    };
}
pub(crate) use for_each_pref;

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
    /// The packet filter in force (`tinyscale debug filter`).
    DebugFilter,
    /// Change prefs without bringing the node up or down (tailscale `set`); `login_server`,
    /// `auth_key`, `force_reauth` and `reset` are not taken.
    Set(UpArgs),
    /// The node that owns `arg` (`tinyscale whois`): `IP`, `IP:port` or `[IPv6]:port`.
    WhoIs(Lookup),
    /// Ask this node's MagicDNS answer logic for the name `arg` (`tinyscale dns query`),
    /// without the network: names it does not answer say where they would be forwarded.
    DnsQuery(Lookup),
    /// Apply the `config client` section again (the daemon runs with `--config`).
    Reload,
}

/// What `whois` and `dns query` ask about (one type for both: each request shape costs
/// deserializer code on the router).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Lookup {
    /// The address or name.
    pub arg: String,
    /// `dns query`: the record type (A, AAAA, PTR, …).
    pub qtype: String,
}

/// The daemon's answer: `data` on success, `error` otherwise.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IpcResponse {
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl IpcResponse {
    /// A reply from a handler's result.
    pub fn from_result(r: Result<Value, String>) -> IpcResponse {
        match r {
            Ok(data) => IpcResponse {
                data,
                error: String::new(),
            },
            Err(error) => IpcResponse {
                data: Value::Null,
                error,
            },
        }
    }
}

/// Binds a root-only (0600) unix socket at `path`. A live server already answering there is an
/// error; a stale file left by a crash is removed.
pub async fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another instance is already listening on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves JSON lines on `listener` forever: each line is parsed as `Req`, answered by `handler`
/// with one line. Each connection gets its own task.
pub async fn serve_lines<Req, H, Fut>(listener: UnixListener, handler: H) -> std::io::Result<()>
where
    Req: DeserializeOwned + Send + 'static,
    H: Fn(Req) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = IpcResponse> + Send,
{
    loop {
        let (sock, _) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<Req>(&line) {
                    Ok(req) => handler(req).await,
                    Err(e) => IpcResponse {
                        data: Value::Null,
                        error: format!("bad request: {e}"),
                    },
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Sends one JSON-line request to the server at `socket`; `Err` carries the server's error
/// text, or the connection failure followed by `hint`.
pub async fn call_lines<Req: Serialize>(socket: &Path, req: &Req, hint: &str) -> Result<Value, String> {
    let sock = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}\n{hint}", socket.display()))?;
    let (r, mut w) = sock.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    w.write_all(&line).await.map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(r).lines();
    let resp = lines
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the server closed the connection")?;
    let resp: IpcResponse = serde_json::from_str(&resp).map_err(|e| format!("bad response: {e}"))?;
    if resp.error.is_empty() {
        Ok(resp.data)
    } else {
        Err(resp.error)
    }
}

/// Sends one request to the daemon at `socket`.
pub async fn call(socket: &Path, req: &IpcRequest) -> Result<Value, String> {
    call_lines(
        socket,
        req,
        "(is `tinyscale daemon` running? start it with `/etc/init.d/tinyscale start` or `tinyscale daemon`)",
    )
    .await
}
