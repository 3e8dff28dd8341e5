//! Local API between the CLI and the daemon: JSON lines over a unix socket, one request and one
//! response per line (`/var/run/tinyscale.sock` by default). The ubus object
//! ([`crate::platform::ubus_object`]) maps its methods onto the same requests.
//!
//! Plays the role of tailscale's LocalAPI. Message types are plain serde values; [`call`] is the
//! client shell, the listener lives in `daemon.rs`.

use std::{future::Future, os::unix::fs::PermissionsExt, path::Path};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
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

impl UpArgs {
    /// The settings among `f` (the derive's `#[serde(default)]` rules: absent is the default).
    pub fn from_fields(f: &mut Fields) -> Result<UpArgs, String> {
        let mut a = UpArgs {
            login_server: f.opt_string("login_server")?,
            auth_key: f.opt_string("auth_key")?,
            force_reauth: f.opt_bool("force_reauth")?.unwrap_or_default(),
            reset: f.opt_bool("reset")?.unwrap_or_default(),
            ..UpArgs::default()
        };
        macro_rules! read {
            ($($p:ident: $t:ident),*) => { $( a.$p = read!(@$t stringify!($p))?; )* };
            (@STRING $n:expr) => { f.opt_string($n) };
            (@ARRAY $n:expr) => { f.opt_strings($n) };
            (@BOOL $n:expr) => { f.opt_bool($n) };
        }
        for_each_pref!(read);
        Ok(a)
    }
}

/// A request to the daemon. On the wire: an object whose `cmd` names the variant in snake_case,
/// beside the variant's fields (serde's internally tagged shape, which the derived `Serialize`
/// writes). Reading goes through [`IpcRequest::from_json`] instead of the derive: see
/// [`Fields`].
#[derive(Debug, Clone, Serialize, PartialEq)]
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

impl IpcRequest {
    /// The request in `v`, as the derived internally tagged `Deserialize` would read it.
    pub fn from_json(v: Value) -> Result<IpcRequest, String> {
        let (cmd, mut f) = Fields::tagged(v)?;
        Ok(match cmd.as_str() {
            "up" => IpcRequest::Up(UpArgs::from_fields(&mut f)?),
            "down" => IpcRequest::Down,
            "logout" => IpcRequest::Logout,
            "status" => IpcRequest::Status,
            "ping" => IpcRequest::Ping {
                peer: f.string("peer")?,
            },
            "netcheck" => IpcRequest::Netcheck,
            "debug_filter" => IpcRequest::DebugFilter,
            "set" => IpcRequest::Set(UpArgs::from_fields(&mut f)?),
            "who_is" => IpcRequest::WhoIs(Lookup::from_fields(&mut f)?),
            "dns_query" => IpcRequest::DnsQuery(Lookup::from_fields(&mut f)?),
            "reload" => IpcRequest::Reload,
            other => return Err(unknown_cmd(other)),
        })
    }
}

/// The fields of one request object, read by name with the rules of serde's derive: an absent
/// or `null` field is `None` for an `Option` and an error otherwise, unknown fields are ignored.
///
/// Why not the derive: an internally tagged enum (`#[serde(tag = "cmd")]`) makes serde buffer
/// the object into its private `Content` tree and compile a deserializer for every variant
/// against it; the admin socket's 27 requests cost 50 KB of mipsel code that way. Parsing the
/// line into a `Value` (code every build has anyway) and reading fields here costs a few bytes
/// per field.
pub struct Fields(Map<String, Value>);

/// The error for a `cmd` no request has.
pub fn unknown_cmd(cmd: &str) -> String {
    format!("unknown request cmd `{cmd}`")
}

impl Fields {
    /// The fields of an object.
    pub fn new(m: Map<String, Value>) -> Fields {
        Fields(m)
    }

    /// Splits a request object into its `cmd` and the other fields.
    pub fn tagged(v: Value) -> Result<(String, Fields), String> {
        let Value::Object(m) = v else {
            return Err("a request is a JSON object".into());
        };
        let mut f = Fields(m);
        let cmd = f.string("cmd")?;
        Ok((cmd, f))
    }

    /// Field `k` as it is, unless absent or `null`.
    pub fn take(&mut self, k: &str) -> Option<Value> {
        self.0.remove(k).filter(|v| !v.is_null())
    }

    fn missing(k: &str) -> String {
        format!("missing field `{k}`")
    }

    fn invalid(k: &str, want: &str) -> String {
        format!("invalid type for field `{k}`: expected {want}")
    }

    /// An optional string.
    pub fn opt_string(&mut self, k: &str) -> Result<Option<String>, String> {
        match self.take(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Self::invalid(k, "a string")),
        }
    }

    /// A required string.
    pub fn string(&mut self, k: &str) -> Result<String, String> {
        self.opt_string(k)?.ok_or_else(|| Self::missing(k))
    }

    /// An optional unsigned integer.
    pub fn opt_u64(&mut self, k: &str) -> Result<Option<u64>, String> {
        match self.take(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| Self::invalid(k, "an unsigned integer")),
        }
    }

    /// A required unsigned integer.
    pub fn u64(&mut self, k: &str) -> Result<u64, String> {
        self.opt_u64(k)?.ok_or_else(|| Self::missing(k))
    }

    /// An optional boolean.
    pub fn opt_bool(&mut self, k: &str) -> Result<Option<bool>, String> {
        match self.take(k) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| Self::invalid(k, "a boolean")),
        }
    }

    /// A required boolean.
    pub fn bool(&mut self, k: &str) -> Result<bool, String> {
        self.opt_bool(k)?.ok_or_else(|| Self::missing(k))
    }

    /// An optional list of strings.
    pub fn opt_strings(&mut self, k: &str) -> Result<Option<Vec<String>>, String> {
        let bad = || Self::invalid(k, "a list of strings");
        match self.take(k) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .into_iter()
                .map(|x| match x {
                    Value::String(s) => Ok(s),
                    _ => Err(bad()),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(_) => Err(bad()),
        }
    }

    /// A required list of strings.
    pub fn strings(&mut self, k: &str) -> Result<Vec<String>, String> {
        self.opt_strings(k)?.ok_or_else(|| Self::missing(k))
    }
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

impl Lookup {
    fn from_fields(f: &mut Fields) -> Result<Lookup, String> {
        Ok(Lookup {
            arg: f.opt_string("arg")?.unwrap_or_default(),
            qtype: f.opt_string("qtype")?.unwrap_or_default(),
        })
    }
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

/// Serves JSON lines on `listener` forever: each line is parsed into a `Value`, read as a
/// request by `parse`, answered by `handler` with one line. Each connection gets its own task.
pub async fn serve_lines<Req, H, Fut>(
    listener: UnixListener,
    parse: fn(Value) -> Result<Req, String>,
    handler: H,
) -> std::io::Result<()>
where
    Req: Send + 'static,
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
                let req = serde_json::from_str(&line).map_err(|e| e.to_string()).and_then(parse);
                let resp = match req {
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
    // Read as a `Value` (code every build has) rather than through IpcResponse's derive.
    let mut resp: Value = serde_json::from_str(&resp).map_err(|e| format!("bad response: {e}"))?;
    match resp.get("error") {
        _ if !resp.is_object() => Err("bad response: not a JSON object".into()),
        Some(Value::String(e)) if !e.is_empty() => Err(e.clone()),
        _ => Ok(resp.get_mut("data").map(Value::take).unwrap_or_default()),
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// What the CLI writes (the derived `Serialize`) is what the daemon reads back.
    #[test]
    fn requests_roundtrip_through_their_json() {
        let up = UpArgs {
            login_server: Some("https://c.example".into()),
            advertise_routes: Some(vec!["10.0.0.0/24".into()]),
            accept_dns: Some(false),
            force_reauth: true,
            ..UpArgs::default()
        };
        let lookup = Lookup {
            arg: "100.64.0.1".into(),
            qtype: "AAAA".into(),
        };
        for req in [
            IpcRequest::Up(up.clone()),
            IpcRequest::Up(UpArgs::default()),
            IpcRequest::Down,
            IpcRequest::Logout,
            IpcRequest::Status,
            IpcRequest::Ping { peer: "gw".into() },
            IpcRequest::Netcheck,
            IpcRequest::DebugFilter,
            IpcRequest::Set(up),
            IpcRequest::WhoIs(lookup.clone()),
            IpcRequest::DnsQuery(lookup),
            IpcRequest::Reload,
        ] {
            let line = serde_json::to_string(&req).expect("serialize");
            let back = serde_json::from_str(&line)
                .map_err(|e| e.to_string())
                .and_then(IpcRequest::from_json);
            assert_eq!(back, Ok(req), "{line}");
        }
    }

    #[test]
    fn requests_read_like_the_derive() {
        assert_eq!(
            IpcRequest::from_json(json!({"cmd": "who_is", "arg": "a"})),
            Ok(IpcRequest::WhoIs(Lookup {
                arg: "a".into(),
                qtype: String::new()
            }))
        );
        assert_eq!(
            IpcRequest::from_json(json!({"cmd": "up", "hostname": "r1", "unknown": true})),
            Ok(IpcRequest::Up(UpArgs {
                hostname: Some("r1".into()),
                ..UpArgs::default()
            }))
        );
        for (v, needle) in [
            (json!({"cmd": "reboot"}), "reboot"),
            (json!({"peer": "gw"}), "cmd"),
            (json!({"cmd": "ping"}), "peer"),
            (json!({"cmd": "ping", "peer": 1}), "peer"),
            (json!({"cmd": "up", "accept_dns": "yes"}), "bool"),
            (json!({"cmd": "dns_query", "arg": ["x"]}), "arg"),
        ] {
            let e = IpcRequest::from_json(v.clone()).expect_err(&v.to_string());
            assert!(e.contains(needle), "{v}: {e}");
        }
    }
}
