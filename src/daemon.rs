//! The client daemon (`tinyscale daemon`, the tailscaled of tinyscale): owns the keys and prefs in
//! the state dir, runs the control session (register, map long-poll, reconnect with backoff),
//! feeds each netmap to the data plane ([`crate::dataplane::engine`]: TUN, WireGuard, magicsock, DERP,
//! MagicDNS, routes and rules), and answers the CLI over the local socket ([`crate::platform::ipc`]) and,
//! when ubusd's socket is given, as the `tinyscale` ubus object ([`crate::platform::ubus_object`]).
//!
//! Mirrors the roles of tailscale `ipn/ipnlocal/local.go` (backend state machine and prefs) and
//! `control/controlclient/auto.go` (login/map loop).

use std::{
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::{
    control::{
        client::{self, ControlUrl},
        netmap::{node_matches, offers_exit_node, Netmap},
    },
    dataplane::engine::{Engine, EngineConfig, EngineHandle, LocalEndpoints, RoutePrefs},
    platform::ipc::{Fields, IpcRequest, IpcResponse, UpArgs},
    wire::{
        keys::{DiscoPrivate, MachinePrivate, NodePrivate, NodePublic},
        tailcfg::{self, MapRequest, RegisterAuth, RegisterRequest},
    },
};

/// Default state directory (keys and prefs, mode 0700/0600).
pub const DEFAULT_STATE_DIR: &str = "/etc/tinyscale";
/// State file name inside the state dir.
pub const STATE_FILE: &str = "tinyscale.state";
/// Longest reconnect backoff (Go: 30 s).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// User preferences, persisted (tailscale `ipn.Prefs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Prefs {
    pub login_server: String,
    pub hostname: String,
    pub advertise_routes: Vec<String>,
    /// Interface whose prefixes are advertised too, followed as they change ("" none).
    pub advertise_lan: String,
    pub accept_routes: bool,
    pub accept_dns: bool,
    pub advertise_exit_node: bool,
    pub exit_node: String,
    pub exit_node_allow_lan_access: bool,
    pub advertise_tags: Vec<String>,
    pub shields_up: bool,
    pub snat_subnet_routes: bool,
    /// `up` was run and `down` was not.
    pub want_running: bool,
}

impl Default for Prefs {
    fn default() -> Self {
        Prefs {
            login_server: String::new(),
            hostname: String::new(),
            advertise_routes: Vec::new(),
            advertise_lan: String::new(),
            accept_routes: false,
            accept_dns: true,
            advertise_exit_node: false,
            exit_node: String::new(),
            exit_node_allow_lan_access: false,
            advertise_tags: Vec::new(),
            shields_up: false,
            snat_subnet_routes: true,
            want_running: false,
        }
    }
}

/// The persisted state file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct StateFile {
    machine_key: String,
    node_key: String,
    /// A node key being rotated to: written before control hears of it, so a crash between
    /// control's answer and our next save cannot leave us with a key control has retired.
    #[serde(skip_serializing_if = "String::is_empty")]
    pending_node_key: String,
    prefs: Prefs,
}

/// Backend state (tailscale `ipn.State` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BackendState {
    NoState,
    NeedsLogin,
    Stopped,
    Starting,
    Running,
}

struct Shared {
    dir: PathBuf,
    machine: MachinePrivate,
    node: NodePrivate,
    /// The key [`Daemon::session`] is rotating `node` to, until control accepted it.
    pending_node: Option<NodePrivate>,
    prefs: Prefs,
    /// Auth key from the last `up`; never persisted, dropped after use.
    auth_key: Option<String>,
    force_reauth: bool,
    state: BackendState,
    auth_url: String,
    last_error: String,
    netmap: Netmap,
}

/// The daemon's shared context.
pub struct Daemon {
    shared: Mutex<Shared>,
    /// Bumped on every prefs change: the control loop restarts.
    generation: watch::Sender<u64>,
    disco: DiscoPrivate,
    /// Data-plane settings; `None` runs control only (`--tun none`).
    engine_cfg: Option<EngineConfig>,
    /// The latest netmap, for the data plane.
    netmap_tx: watch::Sender<Option<Arc<Netmap>>>,
    /// The prefs the data plane acts on (routes, forwarding), published on every save.
    route_prefs_tx: watch::Sender<RoutePrefs>,
    /// Our endpoints and home DERP, from the data plane, for control.
    endpoints_tx: watch::Sender<LocalEndpoints>,
    /// The prefixes on the `advertise_lan` interface, from [`Daemon::lan_loop`].
    lan_routes_tx: watch::Sender<Vec<String>>,
    /// Bumped when a pref changed what our Hostinfo says: the session sends it again.
    hostinfo_tx: watch::Sender<u64>,
    /// Bumped when what the ubus events report may have changed: backend state, prefs, the
    /// netmap (self addresses, peer set, online) and, from the data plane, peer paths.
    changes: watch::Sender<u64>,
    engine: Mutex<Option<RunningEngine>>,
    /// The node key for which the data plane failed to start (no retry storm on every map message).
    engine_failed_for: Mutex<Option<NodePublic>>,
    /// The uci file given with `--config`, read again on [`IpcRequest::Reload`].
    config: std::sync::OnceLock<PathBuf>,
}

struct RunningEngine {
    handle: EngineHandle,
    task: tokio::task::JoinHandle<()>,
    node: NodePublic,
}

impl Drop for RunningEngine {
    fn drop(&mut self) {
        // Dropping the engine closes the TUN fd; the kernel removes the device, its addresses and routes.
        self.task.abort();
    }
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    b
}

impl Prefs {
    /// The prefs of a state file: absent fields keep their defaults (files of older versions).
    /// Read by name rather than through a derived `Deserialize` (7 KB of mipsel code).
    fn from_fields(f: &mut Fields) -> Result<Prefs, String> {
        let d = Prefs::default();
        Ok(Prefs {
            login_server: f.opt_string("login_server")?.unwrap_or(d.login_server),
            hostname: f.opt_string("hostname")?.unwrap_or(d.hostname),
            advertise_routes: f.opt_strings("advertise_routes")?.unwrap_or(d.advertise_routes),
            advertise_lan: f.opt_string("advertise_lan")?.unwrap_or(d.advertise_lan),
            accept_routes: f.opt_bool("accept_routes")?.unwrap_or(d.accept_routes),
            accept_dns: f.opt_bool("accept_dns")?.unwrap_or(d.accept_dns),
            advertise_exit_node: f.opt_bool("advertise_exit_node")?.unwrap_or(d.advertise_exit_node),
            exit_node: f.opt_string("exit_node")?.unwrap_or(d.exit_node),
            exit_node_allow_lan_access: f
                .opt_bool("exit_node_allow_lan_access")?
                .unwrap_or(d.exit_node_allow_lan_access),
            advertise_tags: f.opt_strings("advertise_tags")?.unwrap_or(d.advertise_tags),
            shields_up: f.opt_bool("shields_up")?.unwrap_or(d.shields_up),
            snat_subnet_routes: f.opt_bool("snat_subnet_routes")?.unwrap_or(d.snat_subnet_routes),
            want_running: f.opt_bool("want_running")?.unwrap_or(d.want_running),
        })
    }
}

/// The keys and prefs of a state file that passed [`parse_state_file`].
#[derive(Debug)]
pub struct SavedState {
    pub machine: MachinePrivate,
    pub node: NodePrivate,
    /// A rotation in progress (see `StateFile::pending_node_key`).
    pub pending_node: Option<NodePrivate>,
    pub prefs: Prefs,
}

/// Checks the bytes of an existing state file. Every state file the daemon writes holds both
/// keys, so a file without them (empty, truncated, garbage, keys missing or malformed) is
/// damaged, not new: the caller refuses to start rather than log in again as a new node.
pub fn parse_state_file(bytes: &[u8]) -> Result<SavedState, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(format!("is empty ({} bytes), probably truncated", bytes.len()));
    }
    let invalid = |e: String| format!("is not valid state JSON: {e}");
    let Value::Object(m) = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))? else {
        return Err(invalid("not an object".into()));
    };
    // Read by name (see `Prefs::from_fields`); the layout is `StateFile`'s.
    let mut f = Fields::new(m);
    let machine_key = f.opt_string("machine_key").map_err(invalid)?.unwrap_or_default();
    let node_key = f.opt_string("node_key").map_err(invalid)?.unwrap_or_default();
    let pending_node_key = f.opt_string("pending_node_key").map_err(invalid)?.unwrap_or_default();
    let prefs = match f.take("prefs") {
        None => Prefs::default(),
        Some(Value::Object(p)) => Prefs::from_fields(&mut Fields::new(p)).map_err(invalid)?,
        Some(_) => return Err(invalid("invalid type for field `prefs`: expected an object".into())),
    };
    let machine = MachinePrivate::from_key_str(&machine_key).map_err(|e| format!("has a bad machine_key: {e}"))?;
    let node = NodePrivate::from_key_str(&node_key).map_err(|e| format!("has a bad node_key: {e}"))?;
    let pending_node = match pending_node_key.as_str() {
        "" => None,
        k => Some(NodePrivate::from_key_str(k).map_err(|e| format!("has a bad pending_node_key: {e}"))?),
    };
    Ok(SavedState {
        machine,
        node,
        pending_node,
        prefs,
    })
}

/// Writes `data` to `path` atomically with mode 0600 (tmp + fsync + rename + dir fsync).
pub fn write_private_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // A stale temp file left by a crash keeps its old mode; `mode` only applies on create.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Refuses an `up`/`set` whose arguments are malformed, naming the flag: the login server URL,
/// advertised routes (CIDRs), the `--advertise-lan` interface name and tags.
fn validate_up_args(a: &UpArgs) -> Result<(), String> {
    if let Some(u) = &a.login_server {
        ControlUrl::parse(u).map_err(|e| e.to_string())?;
    }
    for r in a.advertise_routes.iter().flatten() {
        if !tailcfg::is_valid_cidr(r) {
            return Err(format!(
                "invalid --advertise-routes entry {r:?}: expected a CIDR like 192.168.1.0/24"
            ));
        }
    }
    if let Some(i) = a.advertise_lan.as_deref().filter(|i| !i.is_empty()) {
        // Linux IFNAMSIZ: 15 bytes and a NUL; no '/' or whitespace.
        if i.len() > 15 || i.contains(['/', ' ', '\t', '\n']) {
            return Err(format!(
                "invalid --advertise-lan {i:?}: expected an interface name such as br-lan"
            ));
        }
    }
    for t in a.advertise_tags.iter().flatten() {
        if !t.starts_with("tag:") || t.len() < 5 {
            return Err(format!("invalid --advertise-tags entry {t:?}: tags look like tag:name"));
        }
    }
    Ok(())
}

/// What an `up`/`set` does with the control session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrefsChange {
    /// The node is not to run (a `set` on a stopped node): the prefs wait for the next `up`.
    SaveOnly,
    /// Nothing changed: the session and any pending login URL stay as they are.
    Unchanged,
    /// Only prefs that are the data plane's business or travel in Hostinfo changed on a running
    /// node: the session and its TCP connection stay.
    InSession,
    /// A new control session (registration) is needed.
    NewSession,
}

/// [`PrefsChange`] for prefs going from `old` to `new` in backend `state`, for an `up`
/// (`bring_up`) or a `set`, with `--force-reauth` or not.
fn prefs_change(old: &Prefs, new: &Prefs, state: BackendState, bring_up: bool, force_reauth: bool) -> PrefsChange {
    if !new.want_running {
        return PrefsChange::SaveOnly;
    }
    // An `up` that changes nothing on a running node (the init script's reload, run on every
    // lan/wan interface event) must not restart the control session. Nor does a `set` that
    // changes nothing (it would drop a pending login URL).
    if !force_reauth && new == old && (state == BackendState::Running || !bring_up) {
        return PrefsChange::Unchanged;
    }
    // Prefs that are the data plane's business (exit node, accepting routes and DNS, SNAT,
    // shields) or reach control only through Hostinfo (advertised routes, exit node offer,
    // hostname): a changed Hostinfo goes out in the session, as Go sends it.
    let in_session = Prefs {
        exit_node: old.exit_node.clone(),
        exit_node_allow_lan_access: old.exit_node_allow_lan_access,
        accept_routes: old.accept_routes,
        accept_dns: old.accept_dns,
        snat_subnet_routes: old.snat_subnet_routes,
        shields_up: old.shields_up,
        advertise_routes: old.advertise_routes.clone(),
        advertise_exit_node: old.advertise_exit_node,
        hostname: old.hostname.clone(),
        ..new.clone()
    } == *old;
    if !force_reauth && state == BackendState::Running && in_session {
        PrefsChange::InSession
    } else {
        PrefsChange::NewSession
    }
}

/// The Hostinfo we send for `prefs`, with `routes` advertised (the exit node's default routes
/// added when it offers itself) and `host` as the host name.
fn hostinfo_json(prefs: &Prefs, mut routes: Vec<String>, host: String) -> Value {
    if prefs.advertise_exit_node {
        for r in ["0.0.0.0/0", "::/0"] {
            if !routes.iter().any(|x| x == r) {
                routes.push(r.to_string());
            }
        }
    }
    let mut hi = json!({
        "IPNVersion": crate::VERSION,
        "OS": "linux",
        "App": "tinyscale",
        "Hostname": host,
        "GoArch": std::env::consts::ARCH,
    });
    if !routes.is_empty() {
        hi["RoutableIPs"] = json!(routes);
    }
    if !prefs.advertise_tags.is_empty() {
        hi["RequestTags"] = json!(prefs.advertise_tags);
    }
    if prefs.shields_up {
        hi["ShieldsUp"] = json!(true);
    }
    hi
}

/// What to do after one RegisterResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RegisterStep {
    /// Control refused the login (its message).
    Refused(String),
    /// Our node key expired: register again with a new one.
    RotateExpired,
    /// A resumed rotation that control never took: go on with the key it knows.
    KeepPreviousKey,
    /// An interactive login is needed at this URL; register again with it as the follow-up.
    NeedsLogin(String),
    /// Logged in.
    Authorized,
    /// Neither authorized nor a way to become so.
    NotAuthorized,
}

/// The [`RegisterStep`] for `resp`. `first` is a request that was neither a login follow-up nor
/// carried an auth key (only then may an expired key rotate, or a resumed rotation fall back
/// to the `previous_key` control knows).
fn register_step(resp: &tailcfg::RegisterResponse, first: bool, previous_key: bool) -> RegisterStep {
    if !resp.error.is_empty() {
        RegisterStep::Refused(resp.error.clone())
    } else if resp.node_key_expired && first {
        RegisterStep::RotateExpired
    } else if !resp.auth_url.is_empty() && first && previous_key {
        RegisterStep::KeepPreviousKey
    } else if !resp.auth_url.is_empty() {
        RegisterStep::NeedsLogin(resp.auth_url.clone())
    } else if resp.machine_authorized {
        RegisterStep::Authorized
    } else {
        RegisterStep::NotAuthorized
    }
}

/// The backend state after a failed control session: a failure that will not fix itself
/// (`retryable` false: a refused key, a bad URL) needs a new login; otherwise a running node
/// is starting again and any other state stays.
fn state_after_failure(state: BackendState, retryable: bool) -> BackendState {
    match (retryable, state) {
        (false, _) => BackendState::NeedsLogin,
        (true, BackendState::Running) => BackendState::Starting,
        (true, st) => st,
    }
}

impl Daemon {
    /// Loads (or creates) the state in `dir`.
    pub fn load(dir: &Path, engine_cfg: Option<EngineConfig>) -> Result<Arc<Daemon>, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create state dir {}: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let path = dir.join(STATE_FILE);
        let saved = match std::fs::read(&path) {
            Ok(b) => parse_state_file(&b).map_err(|e| {
                format!(
                    "state file {} {e}; refusing to start as a new node (restore it, or remove it to log in again)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SavedState {
                machine: MachinePrivate::from_random(random32()),
                node: NodePrivate::from_random(random32()),
                pending_node: None,
                prefs: Prefs::default(),
            },
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let SavedState {
            machine,
            node,
            pending_node,
            prefs,
        } = saved;
        let state = if prefs.want_running {
            BackendState::Starting
        } else if prefs.login_server.is_empty() {
            BackendState::NeedsLogin
        } else {
            BackendState::Stopped
        };
        let (generation, _) = watch::channel(0);
        let d = Arc::new(Daemon {
            shared: Mutex::new(Shared {
                dir: dir.to_path_buf(),
                machine,
                node,
                pending_node,
                prefs,
                auth_key: None,
                force_reauth: false,
                state,
                auth_url: String::new(),
                last_error: String::new(),
                netmap: Netmap::default(),
            }),
            generation,
            disco: DiscoPrivate::from_random(random32()),
            engine_cfg,
            netmap_tx: watch::channel(None).0,
            route_prefs_tx: watch::channel(RoutePrefs::default()).0,
            endpoints_tx: watch::channel(LocalEndpoints::default()).0,
            lan_routes_tx: watch::channel(Vec::new()).0,
            hostinfo_tx: watch::channel(0).0,
            changes: watch::channel(0).0,
            engine: Mutex::new(None),
            engine_failed_for: Mutex::new(None),
            config: std::sync::OnceLock::new(),
        });
        d.save()?;
        Ok(d)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self) -> Result<(), String> {
        let s = self.lock();
        let f = StateFile {
            machine_key: s.machine.to_key_str(),
            node_key: s.node.to_key_str(),
            pending_node_key: s.pending_node.as_ref().map(NodePrivate::to_key_str).unwrap_or_default(),
            prefs: s.prefs.clone(),
        };
        let rp = RoutePrefs {
            advertise_routes: self.advertised(&s.prefs),
            accept_routes: s.prefs.accept_routes,
            snat_subnet_routes: s.prefs.snat_subnet_routes,
            advertise_exit_node: s.prefs.advertise_exit_node,
            exit_node: s.prefs.exit_node.clone(),
            exit_node_allow_lan_access: s.prefs.exit_node_allow_lan_access,
            state_dir: Some(s.dir.clone()),
            accept_dns: s.prefs.accept_dns,
        };
        self.route_prefs_tx.send_if_modified(|cur| {
            let changed = *cur != rp;
            *cur = rp;
            changed
        });
        let data = serde_json::to_vec_pretty(&f).map_err(|e| e.to_string())?;
        let path = s.dir.join(STATE_FILE);
        write_private_file(&path, &data).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// `--advertise-routes` plus the prefixes found on the `--advertise-lan` interface.
    fn advertised(&self, prefs: &Prefs) -> Vec<String> {
        let mut routes = prefs.advertise_routes.clone();
        if !prefs.advertise_lan.is_empty() {
            for r in self.lan_routes_tx.borrow().iter() {
                if !routes.contains(r) {
                    routes.push(r.clone());
                }
            }
        }
        routes
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
        self.note_change();
    }

    fn note_change(&self) {
        self.changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Changes when the backend state, prefs, netmap or a peer's path may have changed (the
    /// ubus object compares its snapshot then instead of polling).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn hostinfo(&self, prefs: &Prefs) -> Value {
        let host = if prefs.hostname.is_empty() {
            system_hostname()
        } else {
            prefs.hostname.clone()
        };
        hostinfo_json(prefs, self.advertised(prefs), host)
    }

    /// Handles one local API request.
    pub async fn handle(self: &Arc<Self>, req: IpcRequest) -> IpcResponse {
        let r = match req {
            IpcRequest::Status => Ok(self.status_json().await),
            IpcRequest::Up(args) => self.up(args),
            IpcRequest::Down => {
                self.stop_engine();
                {
                    let mut s = self.lock();
                    s.prefs.want_running = false;
                    s.state = BackendState::Stopped;
                    s.auth_url.clear();
                }
                self.bump();
                self.save().map(|_| json!({"state": "Stopped"}))
            }
            IpcRequest::Logout => self.logout().await,
            IpcRequest::Ping { peer } => self.ping(&peer).await,
            IpcRequest::Netcheck => match self.engine_handle() {
                Some(h) => h.netcheck().await,
                None => Err("the data plane is not running (is the node up?)".into()),
            },
            IpcRequest::DebugFilter => match self.engine_handle() {
                Some(h) => h.filter().await,
                None => Err("the data plane is not running (is the node up?)".into()),
            },
            IpcRequest::Set(args) => self.apply_prefs(
                UpArgs {
                    login_server: None,
                    auth_key: None,
                    force_reauth: false,
                    reset: false,
                    ..args
                },
                false,
            ),
            IpcRequest::WhoIs(l) => self.whois(&l.arg),
            IpcRequest::DnsQuery(l) => self.dns_query(&l.arg, &l.qtype),
            IpcRequest::Reload => match self.config.get() {
                // The init script's reload does the same through `tinyscale up --config`.
                Some(path) => crate::cli::load_client_config(path)
                    .and_then(|c| crate::cli::client_up_args(&c))
                    .map_err(|f| f.message)
                    .and_then(|a| self.up(a)),
                None => Err("the daemon runs without --config: there is no config to reload".into()),
            },
        };
        IpcResponse::from_result(r)
    }

    fn up(&self, a: UpArgs) -> Result<Value, String> {
        self.apply_prefs(a, true)
    }

    /// `up` (`bring_up`: want running, a login server is required) or `set` (prefs only: a
    /// stopped node stays stopped, a running one restarts its session if a pref changed).
    fn apply_prefs(&self, a: UpArgs, bring_up: bool) -> Result<Value, String> {
        validate_up_args(&a)?;
        {
            let mut s = self.lock();
            let mut p = if a.reset {
                Prefs {
                    login_server: s.prefs.login_server.clone(),
                    ..Prefs::default()
                }
            } else {
                s.prefs.clone()
            };
            if let Some(v) = a.login_server {
                if v != p.login_server && !p.login_server.is_empty() {
                    // A different control server knows nothing of our node key.
                    s.node = NodePrivate::from_random(random32());
                    s.pending_node = None;
                }
                p.login_server = v.trim_end_matches('/').to_string();
            }
            if p.login_server.is_empty() && bring_up {
                return Err("no login server configured: pass --login-server http://HOST:PORT".into());
            }
            let exit_given = a.exit_node.is_some();
            macro_rules! set {
                ($($f:ident: $t:ident),*) => { $( if let Some(v) = a.$f { p.$f = v; } )* };
            }
            crate::platform::ipc::for_each_pref!(set);
            p.want_running |= bring_up;
            if exit_given {
                let arg = p.exit_node.as_str();
                // The exit node in use, named again (the uci section on every reload, by name
                // or IP), stays without a new check: its approval may be gone for now, and
                // that must not refuse every other pref of the command.
                let cur = &s.prefs.exit_node;
                let same =
                    arg == cur || !cur.is_empty() && s.netmap.find_peer(arg).is_some_and(|n| node_matches(n, cur));
                p.exit_node = if same {
                    cur.clone()
                } else {
                    s.netmap.resolve_exit_node(arg).map_err(|e| e.to_string())?
                };
            }
            if !p.exit_node.is_empty() && p.advertise_exit_node {
                // Go checkExitNodePrefsLocked.
                return Err("cannot advertise an exit node and use an exit node at the same time".into());
            }
            match prefs_change(&s.prefs, &p, s.state, bring_up, a.force_reauth) {
                PrefsChange::SaveOnly => {
                    s.prefs = p;
                    let state = s.state;
                    drop(s);
                    self.save()?;
                    return Ok(json!({ "state": state }));
                }
                PrefsChange::Unchanged => return Ok(json!({ "state": s.state })),
                PrefsChange::InSession => {
                    if p.shields_up != s.prefs.shields_up {
                        if let Some(h) = self.engine_handle() {
                            h.set_shields_up(p.shields_up);
                        }
                    }
                    let hostinfo_changed = self.hostinfo(&p) != self.hostinfo(&s.prefs);
                    s.prefs = p;
                    drop(s);
                    self.save()?;
                    if hostinfo_changed {
                        self.hostinfo_tx.send_modify(|g| *g += 1);
                    }
                    self.note_change();
                    return Ok(json!({"state": "Running"}));
                }
                PrefsChange::NewSession => {}
            }
            // Shields take effect at once, without waiting for the new session's netmap.
            if let Some(h) = self.engine_handle() {
                h.set_shields_up(p.shields_up);
            }
            s.prefs = p;
            if a.auth_key.as_deref().is_some_and(|k| !k.is_empty()) {
                s.auth_key = a.auth_key;
            }
            s.force_reauth = a.force_reauth;
            s.last_error.clear();
            s.state = BackendState::Starting;
        }
        self.save()?;
        self.bump();
        Ok(json!({"state": "Starting"}))
    }

    async fn logout(self: &Arc<Self>) -> Result<Value, String> {
        let (url, machine, node) = {
            let s = self.lock();
            (s.prefs.login_server.clone(), s.machine.clone(), s.node.clone())
        };
        // Tell control first (Expiry in the past = logout); local state is cleared either way.
        let mut note = String::new();
        if !url.is_empty() {
            let r = async {
                let url = ControlUrl::parse(&url)?;
                let key = client::fetch_server_key(&url).await?;
                let mut conn = client::connect(&url, &machine, &key).await?;
                let req = RegisterRequest {
                    version: tailcfg::CURRENT_CAPABILITY_VERSION,
                    node_key: node.public(),
                    expiry: tailcfg::format_time(123),
                    hostinfo: None,
                    ..Default::default()
                };
                conn.register(&req).await
            };
            if let Err(e) = r.await {
                note = format!("control server not told: {e}");
            }
        }
        self.stop_engine();
        {
            let mut s = self.lock();
            s.node = NodePrivate::from_random(random32());
            s.pending_node = None;
            s.prefs.want_running = false;
            s.state = BackendState::NeedsLogin;
            s.netmap = Netmap::default();
            s.auth_url.clear();
        }
        self.save()?;
        self.bump();
        Ok(json!({"state": "NeedsLogin", "note": note}))
    }

    /// `whois`: Go's `apitype.WhoIsResponse`: `Node`, `UserProfile`, and `CapMap`, the
    /// application capabilities the address has towards this node from the filter's
    /// `CapGrant` rules (omitted when empty, as Go does).
    fn whois(&self, arg: &str) -> Result<Value, String> {
        let ip = crate::control::netmap::whois_addr(arg)
            .ok_or_else(|| format!("invalid address {arg:?}: give a tailnet IP, IP:port or [IPv6]:port"))?;
        let s = self.lock();
        let n = s.netmap.whois(ip).ok_or_else(|| {
            format!("no match for {arg}: no node in the netmap has this address or serves a subnet route holding it")
        })?;
        // By hand, the fields whois users read, with Go's names: a derived serialization of the
        // whole Node cost ~5 KB on the router.
        let list = |v: &[String]| Value::Array(v.iter().map(|x| Value::from(x.as_str())).collect());
        let mut node = serde_json::Map::new();
        node.insert("ID".into(), n.id.into());
        node.insert("StableID".into(), n.stable_id.as_str().into());
        node.insert("Name".into(), n.name.as_str().into());
        node.insert("User".into(), n.user.into());
        node.insert("Key".into(), n.key.to_string().into());
        node.insert("KeyExpiry".into(), n.key_expiry.as_str().into());
        node.insert("Addresses".into(), list(&n.addresses));
        node.insert("AllowedIPs".into(), list(&n.allowed_ips));
        node.insert("PrimaryRoutes".into(), list(&n.primary_routes));
        node.insert("Tags".into(), list(&n.tags));
        node.insert("Hostinfo".into(), n.hostinfo.clone().unwrap_or_default());
        node.insert("Online".into(), n.online.into());
        node.insert("LastSeen".into(), n.last_seen.clone().into());
        let u = s.netmap.users.get(&n.user);
        let mut user = serde_json::Map::new();
        user.insert("ID".into(), n.user.into());
        user.insert("LoginName".into(), u.map_or("", |u| u.login_name.as_str()).into());
        user.insert("DisplayName".into(), u.map_or("", |u| u.display_name.as_str()).into());
        let mut m = serde_json::Map::new();
        m.insert("Node".into(), Value::Object(node));
        m.insert("UserProfile".into(), Value::Object(user));
        let me: Vec<std::net::IpAddr> = s
            .netmap
            .self_node
            .iter()
            .flat_map(|n| &n.addresses)
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect();
        let caps = crate::dataplane::filter::peer_caps(s.netmap.packet_filter(), ip, &me);
        if !caps.is_empty() {
            m.insert("CapMap".into(), Value::Object(caps));
        }
        Ok(Value::Object(m))
    }

    /// `dns query`: the question put to [`crate::dataplane::dns::Resolver`] as the data plane builds it from
    /// the netmap, answered in the shape of Go's `jsonoutput.DNSQueryResult` (`Name`,
    /// `QueryType`, `ResponseCode`, `Answers`), or for a forwarded name `Forward` (`split-dns`
    /// or `system`) and the `Resolvers` it would go to. Nothing is sent.
    fn dns_query(&self, name: &str, qtype: &str) -> Result<Value, String> {
        use crate::dataplane::dns::{self, Decision, Upstream};
        let t = dns::qtype_from_name(qtype).ok_or_else(|| {
            format!("unknown record type {qtype:?}: use A, AAAA, PTR, CNAME, MX, NS, SRV, TXT, ANY or a number")
        })?;
        // PTR of an address: its reverse name, so `dns query 100.64.0.2 PTR` works.
        let qname = match (t, name.parse()) {
            (dns::TYPE_PTR, Ok(ip)) => dns::reverse_name(ip),
            _ => name.trim_end_matches('.').to_string(),
        };
        let msg = dns::query_message(&qname, t).ok_or_else(|| format!("invalid DNS name {name:?}"))?;
        let resolver = {
            let s = self.lock();
            if !s.prefs.accept_dns {
                return Err(
                    "MagicDNS is off on this node (--accept-dns=false): 100.100.100.100 does not answer".into(),
                );
            }
            dns::Resolver::from_netmap(&s.netmap)
        };
        let mut out = json!({ "Name": qname, "QueryType": dns::qtype_name(t) });
        match resolver.decide(&msg) {
            Some(Decision::Reply(resp)) => {
                let (rcode, answers) = dns::parse_response(&resp).map_err(|e| format!("unreadable answer: {e:?}"))?;
                // Go's dnsmessage names.
                let rcodes = [
                    "Success",
                    "FormatError",
                    "ServerFailure",
                    "NameError",
                    "NotImplemented",
                    "Refused",
                ];
                out["ResponseCode"] = match rcodes.get(usize::from(rcode)) {
                    Some(n) => format!("RCode{n}"),
                    None => rcode.to_string(),
                }
                .into();
                out["Answers"] = answers
                    .into_iter()
                    .map(|a| {
                        json!({"Name": a.name, "TTL": a.ttl, "Class": "ClassINET",
                               "Type": format!("Type{}", dns::qtype_name(a.rtype)), "Body": a.body})
                    })
                    .collect();
            }
            Some(Decision::Forward(up)) => {
                let (via, addrs) = match up {
                    Upstream::Resolvers(a) => ("split-dns", a),
                    Upstream::System => (
                        "system",
                        std::fs::read_to_string(crate::dataplane::engine::RESOLV_CONF)
                            .map(|t| dns::parse_resolv_conf(&t))
                            .unwrap_or_default(),
                    ),
                };
                out["Forward"] = via.into();
                out["Resolvers"] = addrs.iter().map(|a| json!({ "Addr": a.to_string() })).collect();
            }
            None => return Err("the query was not taken".into()),
        }
        Ok(out)
    }

    /// `status --json` body.
    pub async fn status_json(&self) -> Value {
        // Asked first, without the state lock held: the engine builds it now.
        let engine = match self.engine_handle() {
            Some(h) => h.status().await.ok(),
            None => None,
        };
        let s = self.lock();
        let nm = &s.netmap;
        let ips = |n: &tailcfg::Node| -> Vec<String> {
            n.addresses
                .iter()
                .map(|a| a.split('/').next().unwrap_or("").to_string())
                .collect()
        };
        let user = |id: u64| nm.users.get(&id).map(|u| u.login_name.clone()).unwrap_or_default();
        let os = |n: &tailcfg::Node| {
            n.hostinfo
                .as_ref()
                .map(|h| tailcfg::HostinfoView(h).os().to_string())
                .unwrap_or_default()
        };
        let self_node = nm.self_node.as_ref().map(|n| {
            json!({
                "ID": n.id, "HostName": n.name.split('.').next().unwrap_or(""), "DNSName": n.name,
                "TailscaleIPs": ips(n), "User": user(n.user), "OS": "linux", "Online": s.state == BackendState::Running,
                "KeyExpiry": n.key_expiry, "PrimaryRoutes": n.primary_routes,
            })
        });
        let peers: Vec<Value> = nm
            .peers
            .values()
            .map(|p| {
                let mut v = json!({
                    "ID": p.id, "HostName": p.name.split('.').next().unwrap_or(""), "DNSName": p.name,
                    "TailscaleIPs": ips(p), "User": user(p.user), "OS": os(p), "Online": p.online.unwrap_or(false),
                    "LastSeen": p.last_seen, "Endpoints": p.endpoints, "HomeDERP": p.home_derp,
                    "AllowedIPs": p.allowed_ips, "PrimaryRoutes": p.primary_routes,
                    "CurAddr": "", "Relay": "",
                    "ExitNode": node_matches(p, &s.prefs.exit_node), "ExitNodeOption": offers_exit_node(p),
                });
                if let Some(e) = engine.as_ref().and_then(|e| e.peers.get(&p.key)) {
                    for k in ["CurAddr", "Relay", "RxBytes", "TxBytes", "LastHandshakeSecs"] {
                        v[k] = e[k].clone();
                    }
                }
                v
            })
            .collect();
        // Go ipnstate.ExitNodeStatus: the chosen exit node, when it is in the netmap.
        let exit_status = nm
            .find_peer(&s.prefs.exit_node)
            .map(|p| json!({"ID": p.stable_id, "Online": p.online.unwrap_or(false), "TailscaleIPs": p.addresses}));
        json!({
            "BackendState": s.state,
            "ExitNodeStatus": exit_status,
            "AuthURL": s.auth_url,
            "Error": s.last_error,
            "LoginServer": s.prefs.login_server,
            "Self": self_node,
            "Peer": peers,
            "MagicDNSSuffix": nm.magic_dns_suffix(),
            // Go's ipnstate.TailnetStatus.
            "CurrentTailnet": {
                "Name": nm.domain,
                "MagicDNSSuffix": nm.magic_dns_suffix(),
                "MagicDNSEnabled": nm.dns.proxied,
            },
            "DNS": dns_status(nm, s.prefs.accept_dns),
            "DataPlane": engine.is_some(),
            "DERP": engine.as_ref().map(|e| e.derp.clone()),
            "Counters": engine.map(|e| e.counters),
            "Prefs": s.prefs,
        })
    }

    fn engine_handle(&self) -> Option<EngineHandle> {
        self.engine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|e| e.handle.clone())
    }

    fn stop_engine(&self) {
        self.engine.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = self.netmap_tx.send(None);
        self.note_change();
    }

    /// Starts the data plane for `node` unless it already runs with that key.
    async fn ensure_engine(&self, node: &NodePrivate) {
        let Some(cfg) = self.engine_cfg.clone() else { return };
        if self
            .engine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|e| e.node == node.public() && !e.task.is_finished())
        {
            return;
        }
        if *self.engine_failed_for.lock().unwrap_or_else(|e| e.into_inner()) == Some(node.public()) {
            return;
        }
        self.stop_engine();
        match Engine::start(
            &cfg,
            node.clone(),
            self.disco.clone(),
            self.netmap_tx.subscribe(),
            self.route_prefs_tx.subscribe(),
            self.endpoints_tx.clone(),
            self.changes.clone(),
        )
        .await
        {
            Ok((handle, task)) => {
                // Before the first netmap reaches the engine, so no packet sees shields down.
                handle.set_shields_up(self.lock().prefs.shields_up);
                *self.engine.lock().unwrap_or_else(|e| e.into_inner()) = Some(RunningEngine {
                    handle,
                    task,
                    node: node.public(),
                });
            }
            Err(e) => {
                *self.engine_failed_for.lock().unwrap_or_else(|e| e.into_inner()) = Some(node.public());
                log::error!("data plane unavailable, running control only: {e}");
                self.lock().last_error = format!("data plane unavailable: {e}");
            }
        }
    }

    /// `tinyscale ping`: one disco ping round to a peer named by host name, FQDN or tailnet IP.
    async fn ping(&self, who: &str) -> Result<Value, String> {
        let peer = {
            let s = self.lock();
            s.netmap
                .peers
                .values()
                .find(|p| {
                    p.name.trim_end_matches('.') == who.trim_end_matches('.')
                        || p.name.split('.').next() == Some(who)
                        || p.addresses.iter().any(|a| a.split('/').next() == Some(who))
                })
                .map(|p| {
                    (
                        p.key,
                        p.name.split('.').next().unwrap_or("").to_string(),
                        p.addresses.first().cloned().unwrap_or_default(),
                    )
                })
        };
        let Some((key, name, addr)) = peer else {
            return Err(format!("no peer named {who:?} in the netmap (see `tinyscale status`)"));
        };
        let h = self
            .engine_handle()
            .ok_or("the data plane is not running (is the node up?)")?;
        let r = h.ping(key).await?;
        Ok(json!({
            "Name": name,
            "IP": addr.split('/').next().unwrap_or(""),
            "Via": r.via,
            "Direct": r.direct,
            "LatencyMs": r.rtt.as_secs_f64() * 1000.0,
        }))
    }

    /// The current backend state (for the ubus state event).
    pub fn backend_state(&self) -> BackendState {
        self.lock().state
    }

    fn set_state(&self, st: BackendState, err: Option<String>) {
        {
            let mut s = self.lock();
            s.state = st;
            if let Some(e) = err {
                s.last_error = e;
            }
        }
        self.note_change();
    }

    /// The control loop: (re)connects while `want_running`, restarts on prefs changes.
    pub async fn control_loop(self: Arc<Self>) {
        let mut gen = self.generation.subscribe();
        let mut backoff = Duration::from_secs(1);
        loop {
            gen.borrow_and_update();
            let want = self.lock().prefs.want_running;
            if !want {
                if gen.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let outcome = tokio::select! {
                r = self.session() => Some(r),
                _ = gen.changed() => None,
            };
            match outcome {
                None => backoff = Duration::from_secs(1),
                Some(Ok(())) => backoff = Duration::from_secs(1),
                Some(Err(e)) => {
                    let retry = e.is_retryable();
                    log::warn!("control session failed err={e}");
                    {
                        let mut s = self.lock();
                        s.last_error = e.to_string();
                        s.state = state_after_failure(s.state, retry);
                        // A rejected key or bad URL will not fix itself: wait for a new `up`.
                        s.prefs.want_running &= retry;
                    }
                    self.note_change();
                    if !retry {
                        continue;
                    }
                    // A busy server (429, 503) says when to come back; anything else backs off.
                    tokio::select! {
                        _ = tokio::time::sleep(e.retry_delay(backoff, MAX_BACKOFF)) => {},
                        _ = gen.changed() => {},
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Follows the `--advertise-lan` interface: reads its prefixes when the pref is set and
    /// again whenever the kernel reports an address change on it (rtnetlink), and publishes
    /// them for control (a lite map request) and the data plane (forwarding). Without netlink
    /// (no permission, or an old kernel) the prefixes are read once per prefs change.
    pub async fn lan_loop(self: Arc<Self>) {
        let mut gen = self.generation.subscribe();
        let mut watcher = None;
        loop {
            gen.borrow_and_update();
            let iface = self.lock().prefs.advertise_lan.clone();
            if iface.is_empty() {
                watcher = None;
                self.set_lan_routes(Vec::new());
            } else {
                if watcher.is_none() {
                    watcher = crate::dataplane::netmon::AddrWatcher::new()
                        .map_err(|e| log::warn!("advertise_lan: cannot watch address changes err={e}"))
                        .ok();
                }
                self.refresh_lan(&iface);
            }
            loop {
                let ev = tokio::select! {
                    r = gen.changed() => {
                        if r.is_err() { return; }
                        break;
                    }
                    r = async {
                        match watcher.as_mut() {
                            Some(w) => w.next().await,
                            None => std::future::pending().await,
                        }
                    } => r,
                };
                match ev {
                    Ok(evs) => {
                        // The index is looked up each time: the device may come and go.
                        let idx = crate::dataplane::netmon::if_index(&iface);
                        if evs.iter().any(|e| Some(e.ifindex) == idx) {
                            self.refresh_lan(&iface);
                        }
                    }
                    // ENOBUFS: the kernel dropped events while we were slow; a datagram we could
                    // not parse: either way, read afresh.
                    Err(e)
                        if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == std::io::ErrorKind::InvalidData =>
                    {
                        self.refresh_lan(&iface)
                    }
                    // Anything else would fail again at once: stop watching (no busy loop);
                    // the next prefs change opens a new socket.
                    Err(e) => {
                        log::warn!("advertise_lan: stopped watching address changes err={e}");
                        watcher = None;
                        self.refresh_lan(&iface);
                    }
                }
            }
        }
    }

    /// Reads the prefixes on `iface` (`ip -o addr show dev IFACE`) and publishes them.
    fn refresh_lan(&self, iface: &str) {
        use crate::dataplane::apply::CommandRunner;
        let argv: Vec<String> = ["ip", "-o", "addr", "show", "dev", iface]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let routes = match crate::dataplane::apply::SystemRunner.run(&argv) {
            Ok(out) => crate::platform::uci::client::lan_prefixes(&out)
                .iter()
                .map(|p| p.to_string())
                .collect(),
            Err(e) => {
                log::warn!("advertise_lan: cannot read {iface} addresses err={e}");
                Vec::new()
            }
        };
        self.set_lan_routes(routes);
    }

    fn set_lan_routes(&self, routes: Vec<String>) {
        let changed = self.lan_routes_tx.send_if_modified(|cur| {
            let changed = *cur != routes;
            *cur = routes.clone();
            changed
        });
        if changed {
            log::info!("advertise_lan: prefixes {routes:?}");
            // The data plane's forwarding follows the advertised routes.
            if let Err(e) = self.save() {
                log::warn!("advertise_lan: err={e}");
            }
        }
    }

    /// Persists `next` as the key being rotated to, before control hears of it.
    fn note_rotation(&self, next: &NodePrivate) -> Result<(), client::Error> {
        self.lock().pending_node = Some(next.clone());
        self.save()
            .map_err(|e| client::Error::Rejected(format!("cannot persist the new node key: {e}")))
    }

    async fn session(self: &Arc<Self>) -> Result<(), client::Error> {
        let (url, machine, mut node, pending, prefs, auth_key, force) = {
            let s = self.lock();
            (
                s.prefs.login_server.clone(),
                s.machine.clone(),
                s.node.clone(),
                s.pending_node.clone(),
                s.prefs.clone(),
                s.auth_key.clone(),
                s.force_reauth,
            )
        };
        let url = ControlUrl::parse(&url)?;
        let server_key = client::fetch_server_key(&url).await?;
        let mut conn = client::connect(&url, &machine, &server_key).await?;
        let hostinfo = self.hostinfo(&prefs);
        let mut old = crate::wire::keys::NodePublic::default();
        // The key control knew before a resumed rotation, in case control never took the new one.
        let mut fallback = None;
        if let Some(p) = pending {
            // A rotation cut short (crash, lost answer): ask for the same one again. Control
            // either did it already (it knows the new key) or does it now.
            log::info!("node key rotation resumed");
            old = node.public();
            fallback = Some(std::mem::replace(&mut node, p));
        } else if force {
            old = node.public();
            node = NodePrivate::from_random(random32());
            self.note_rotation(&node)?;
        }
        let mut req = RegisterRequest {
            version: tailcfg::CURRENT_CAPABILITY_VERSION,
            node_key: node.public(),
            old_node_key: old,
            auth: auth_key.map(|k| RegisterAuth { auth_key: k }),
            expiry: tailcfg::ZERO_TIME.into(),
            hostinfo: Some(hostinfo.clone()),
            ..Default::default()
        };
        loop {
            let resp = conn.register(&req).await?;
            let first = req.followup.is_empty() && req.auth.is_none();
            match register_step(&resp, first, fallback.is_some()) {
                RegisterStep::Refused(e) => {
                    return Err(client::Error::Rejected(format!("login refused by control server: {e}")));
                }
                RegisterStep::RotateExpired => {
                    // Rotate and log in again (interactive unless a key is given).
                    log::info!("node key expired, rotating");
                    req.old_node_key = node.public();
                    node = NodePrivate::from_random(random32());
                    self.note_rotation(&node)?;
                    req.node_key = node.public();
                }
                RegisterStep::KeepPreviousKey => {
                    log::info!("node key rotation not known to control; keeping the current key");
                    if let Some(prev) = fallback.take() {
                        node = prev;
                    }
                    req.node_key = node.public();
                    req.old_node_key = crate::wire::keys::NodePublic::default();
                    self.lock().pending_node = None;
                    if let Err(e) = self.save() {
                        log::warn!("persisting keys failed err={e}");
                    }
                }
                RegisterStep::NeedsLogin(url) => {
                    log::info!("login required url={url}");
                    {
                        let mut s = self.lock();
                        s.auth_url = url.clone();
                        s.state = BackendState::NeedsLogin;
                    }
                    self.note_change();
                    req.followup = url;
                }
                RegisterStep::Authorized => break,
                RegisterStep::NotAuthorized => {
                    return Err(client::Error::Rejected(
                        "control server did not authorize this machine".into(),
                    ));
                }
            }
        }
        {
            let mut s = self.lock();
            s.node = node.clone();
            s.pending_node = None;
            s.auth_key = None;
            s.force_reauth = false;
            s.auth_url.clear();
            s.last_error.clear();
        }
        if let Err(e) = self.save() {
            log::error!("persisting keys failed err={e}");
        }
        let mut ep_rx = self.endpoints_tx.subscribe();
        let mut lan_rx = self.lan_routes_tx.subscribe();
        lan_rx.borrow_and_update();
        let mut hostinfo_rx = self.hostinfo_tx.subscribe();
        hostinfo_rx.borrow_and_update();
        let map_req = |ep: &LocalEndpoints, stream: bool| {
            // Built per request: the LAN prefixes and the prefs in Hostinfo change under a
            // session.
            let cur = self.lock().prefs.clone();
            let mut hi = self.hostinfo(&cur);
            if !ep.net_info.is_null() {
                hi["NetInfo"] = ep.net_info.clone();
            }
            MapRequest {
                version: tailcfg::CURRENT_CAPABILITY_VERSION,
                keep_alive: true,
                node_key: node.public(),
                disco_key: self.disco.public(),
                endpoints: ep.endpoints.clone(),
                endpoint_types: ep.types.clone(),
                hostinfo: Some(hi),
                stream,
                omit_peers: !stream,
                ..Default::default()
            }
        };
        let first_req = map_req(&ep_rx.borrow_and_update(), true);
        let mut stream = conn.map_stream(&first_req).await?;
        // The filter chunks are per session (the data plane keeps the old ones until the first
        // message of this one).
        self.lock().netmap.begin_session();
        let mut first = true;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg? else { break };
                    let nm = {
                        let mut s = self.lock();
                        s.netmap.apply(msg);
                        if first && s.netmap.self_node.is_some() {
                            first = false;
                            s.state = BackendState::Running;
                            let n = s.netmap.self_node.as_ref().map(|n| n.name.clone()).unwrap_or_default();
                            log::info!("running name={n} peers={}", s.netmap.peers.len());
                        }
                        if s.netmap.self_node.as_ref().is_some_and(|me| me.expired) {
                            drop(s);
                            self.set_state(
                                BackendState::NeedsLogin,
                                Some("node key expired: run `tinyscale up` to log in again".into()),
                            );
                            return Ok(());
                        }
                        Arc::new(s.netmap.clone())
                    };
                    if !first {
                        self.ensure_engine(&node).await;
                    }
                    let _ = self.netmap_tx.send(Some(nm));
                    self.note_change();
                }
                r = ep_rx.changed() => {
                    if r.is_err() { continue; }
                    let req = map_req(&ep_rx.borrow_and_update(), false);
                    conn.map_lite(&req).await?;
                }
                r = lan_rx.changed() => {
                    if r.is_err() { continue; }
                    lan_rx.borrow_and_update();
                    // New RoutableIPs, as Go sends a changed Hostinfo: no new session.
                    let req = map_req(&ep_rx.borrow(), false);
                    conn.map_lite(&req).await?;
                }
                r = hostinfo_rx.changed() => {
                    if r.is_err() { continue; }
                    hostinfo_rx.borrow_and_update();
                    // New RoutableIPs, as Go sends a changed Hostinfo: no new session.
                    let req = map_req(&ep_rx.borrow(), false);
                    conn.map_lite(&req).await?;
                }
            }
        }
        Err(client::Error::Protocol("control server ended the map stream".into()))
    }
}

/// The kernel hostname (uts), trimmed.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "openwrt".into())
}

/// Runs the daemon until SIGTERM/SIGINT. `initial` prefs (from the uci `client` section) are
/// applied as an `up` before the local API opens; if they are refused (say, no login server
/// yet) the daemon still runs, so `tinyscale up` can finish the job.
/// `ubus` is ubusd's socket for the `tinyscale` object (`None`: no ubus object); `config` is
/// the uci file `initial` came from, read again on a reload request.
pub async fn run(
    state_dir: &Path,
    socket: &Path,
    engine: Option<EngineConfig>,
    initial: Option<UpArgs>,
    ubus: Option<PathBuf>,
    config: Option<PathBuf>,
    metrics: Option<std::net::SocketAddr>,
) -> Result<(), String> {
    if engine.is_some() {
        // What a crashed run left (nftables table, rules, routing table, forwarding) goes at
        // once, not when control first answers: a router restarting with its uplink down must
        // not keep forwarding for routes nobody approved any more.
        let mut r = crate::dataplane::apply::Router::new(crate::dataplane::apply::SystemRunner);
        r.set_saved_path(
            &state_dir
                .join(crate::dataplane::engine::FORWARDING_SAVED)
                .to_string_lossy(),
        );
        r.recover();
    }
    let d = Daemon::load(state_dir, engine)?;
    if let Some(p) = config {
        let _ = d.config.set(p);
    }
    if let Some(args) = initial {
        match d.up(args) {
            Ok(_) => log::info!("prefs from config applied"),
            Err(e) => log::warn!("prefs from config not applied err={e}"),
        }
    }
    let listener = crate::platform::ipc::bind_private(socket)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    log::info!(
        "daemon started state_dir={} socket={}",
        state_dir.display(),
        socket.display()
    );
    if let Some(addr) = metrics {
        if !addr.ip().is_loopback() {
            log::warn!(
                "metrics listen addr={addr} is not loopback: anyone who reaches it reads peer names and traffic"
            );
        }
        let listener = crate::platform::metrics::listen::bind(addr).await?;
        log::info!("metrics listening addr={addr} path=/metrics");
        let dm = d.clone();
        tokio::spawn(crate::platform::metrics::listen::serve(listener, move || {
            let d = dm.clone();
            async move { crate::platform::metrics::render(&d.status_json().await) }
        }));
    }
    tokio::spawn(d.clone().control_loop());
    tokio::spawn(d.clone().lan_loop());
    if let Some(path) = ubus {
        tokio::spawn(crate::platform::ubus_object::run(d.clone(), path));
    }
    let dd = d.clone();
    let accept = crate::platform::ipc::serve_lines(listener, IpcRequest::from_json, move |req| {
        let d = dd.clone();
        async move { d.handle(req).await }
    });
    tokio::select! {
        r = accept => if let Err(e) = r { log::error!("local API socket failed err={e}") },
        _ = crate::shutdown_signal() => {}
    }
    d.stop_engine();
    let _ = std::fs::remove_file(socket);
    log::info!("daemon stopped");
    Ok(())
}

/// The `DNS` object of `status --json`: what the MagicDNS resolver in this node does, for the
/// OpenWrt glue (`tinyscale debug dns-uci`) and LuCI. `MagicDNS` is true when this node answers
/// names at the service address (control turned MagicDNS on and `--accept-dns` is on).
pub fn dns_status(nm: &Netmap, accept_dns: bool) -> Value {
    // Built by hand: `json!` would serialize each map again through serde (bytes on the router).
    let addrs = |rs: &[tailcfg::Resolver]| Value::Array(rs.iter().map(|r| Value::from(r.addr.as_str())).collect());
    let mut routes = serde_json::Map::new();
    for (k, v) in &nm.dns.routes {
        routes.insert(k.trim_end_matches('.').to_string(), addrs(v));
    }
    let suffix = nm.magic_dns_suffix();
    let mut m = serde_json::Map::new();
    // `--accept-dns` itself is under Prefs.
    m.insert(
        "MagicDNS".into(),
        Value::Bool(accept_dns && nm.dns.proxied && !suffix.is_empty()),
    );
    m.insert("MagicDNSSuffix".into(), Value::String(suffix));
    // Control's switch, whatever this node does with it (`dns status` tells the two apart).
    m.insert("TailnetMagicDNS".into(), Value::Bool(nm.dns.proxied));
    m.insert("Resolvers".into(), addrs(&nm.dns.resolvers));
    m.insert("Routes".into(), Value::Object(routes));
    let strs = |v: &[String]| Value::Array(v.iter().map(|d| Value::from(d.as_str())).collect());
    m.insert("Domains".into(), strs(&nm.dns.domains));
    // The rest of control's DNSConfig, for `dns status --all`.
    m.insert("FallbackResolvers".into(), addrs(&nm.dns.fallback_resolvers));
    m.insert("Nameservers".into(), strs(&nm.dns.nameservers));
    m.insert("CertDomains".into(), strs(&nm.dns.cert_domains));
    let records = nm.dns.extra_records.iter().map(|r| {
        let mut e = serde_json::Map::new();
        e.insert("Name".into(), r.name.as_str().into());
        e.insert("Type".into(), r.r#type.as_str().into());
        e.insert("Value".into(), r.value.as_str().into());
        Value::Object(e)
    });
    m.insert("ExtraRecords".into(), Value::Array(records.collect()));
    m.insert("ExitNodeFilteredSet".into(), strs(&nm.dns.exit_node_filtered_set));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_status_for_the_openwrt_glue() {
        let mut nm = Netmap::default();
        nm.apply(tailcfg::MapResponse {
            node: Some(tailcfg::Node {
                name: "router.ts.example.".into(),
                ..Default::default()
            }),
            dns_config: Some(tailcfg::DnsConfig {
                proxied: true,
                routes: [
                    ("ts.example.".to_string(), vec![]),
                    (
                        "corp.example.".to_string(),
                        vec![tailcfg::Resolver {
                            addr: "10.0.0.53".into(),
                        }],
                    ),
                ]
                .into_iter()
                .collect(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let v = dns_status(&nm, true);
        assert_eq!(v["MagicDNS"], true);
        assert_eq!(v["MagicDNSSuffix"], "ts.example");
        assert_eq!(v["Routes"], json!({"corp.example": ["10.0.0.53"], "ts.example": []}));
        assert_eq!(
            crate::cli::magic_dns_suffix(&json!({ "DNS": v })).as_deref(),
            Some("ts.example")
        );
        // accept-dns off: the resolver is off, so dnsmasq must not forward to it.
        let off = dns_status(&nm, false);
        assert_eq!(off["MagicDNS"], false);
        assert_eq!(crate::cli::magic_dns_suffix(&json!({ "DNS": off })), None);
        nm.dns.proxied = false;
        assert_eq!(dns_status(&nm, true)["MagicDNS"], false);
        // The rest of control's DNSConfig, as sent, for `dns status --all`.
        nm.apply(
            serde_json::from_value(json!({"DNSConfig": {"Resolvers": [{"Addr": "1.1.1.1"}],
                "FallbackResolvers": [{"Addr": "9.9.9.9"}], "Nameservers": ["10.9.9.9"],
                "CertDomains": ["router.ts.example"], "ExitNodeFilteredSet": null,
                "ExtraRecords": [{"Name": "grafana.ts.example.", "Value": "100.64.0.9"}]}}))
            .expect("MapResponse"),
        );
        let v = dns_status(&nm, true);
        assert_eq!(v["FallbackResolvers"], json!(["9.9.9.9"]));
        assert_eq!(v["Nameservers"], json!(["10.9.9.9"]));
        assert_eq!(v["CertDomains"], json!(["router.ts.example"]));
        assert_eq!(v["ExitNodeFilteredSet"], json!([]));
        assert_eq!(
            v["ExtraRecords"],
            json!([{"Name": "grafana.ts.example.", "Type": "", "Value": "100.64.0.9"}])
        );
    }

    #[test]
    fn up_args_are_checked_flag_by_flag() {
        let ok = UpArgs {
            login_server: Some("http://ctl.example:8080".into()),
            advertise_routes: Some(vec!["192.168.1.0/24".into(), "fd00::/64".into()]),
            advertise_lan: Some("br-lan".into()),
            advertise_tags: Some(vec!["tag:router".into()]),
            ..UpArgs::default()
        };
        assert_eq!(validate_up_args(&ok), Ok(()));
        assert_eq!(
            validate_up_args(&UpArgs::default()),
            Ok(()),
            "nothing given, nothing wrong"
        );
        let lan = |i: &str| UpArgs {
            advertise_lan: Some(i.into()),
            ..UpArgs::default()
        };
        assert_eq!(validate_up_args(&lan("")), Ok(()), "\"\" stops following an interface");
        for (bad, flag) in [
            (
                UpArgs {
                    login_server: Some("ftp://ctl.example".into()),
                    ..UpArgs::default()
                },
                "ftp://ctl.example",
            ),
            (
                UpArgs {
                    advertise_routes: Some(vec!["192.168.1.0/24".into(), "192.168.1.1".into()]),
                    ..UpArgs::default()
                },
                "--advertise-routes",
            ),
            (lan("a-very-long-ifname0"), "--advertise-lan"),
            (lan("br/lan"), "--advertise-lan"),
            (lan("br lan"), "--advertise-lan"),
            (
                UpArgs {
                    advertise_tags: Some(vec!["router".into()]),
                    ..UpArgs::default()
                },
                "--advertise-tags",
            ),
            (
                UpArgs {
                    advertise_tags: Some(vec!["tag:".into()]),
                    ..UpArgs::default()
                },
                "--advertise-tags",
            ),
        ] {
            let err = validate_up_args(&bad).expect_err(&format!("{bad:?} accepted"));
            assert!(err.contains(flag), "{err}");
        }
    }

    #[test]
    fn prefs_change_decides_about_the_session() {
        use BackendState::*;
        let running = Prefs {
            login_server: "https://ctl.example".into(),
            want_running: true,
            ..Prefs::default()
        };
        let with = |f: fn(&mut Prefs)| {
            let mut p = running.clone();
            f(&mut p);
            p
        };
        let cases: Vec<(Prefs, BackendState, bool, bool, PrefsChange, &str)> = vec![
            (
                running.clone(),
                Running,
                true,
                false,
                PrefsChange::Unchanged,
                "reload: same up",
            ),
            (
                running.clone(),
                Running,
                false,
                false,
                PrefsChange::Unchanged,
                "same set",
            ),
            (
                running.clone(),
                NeedsLogin,
                false,
                false,
                PrefsChange::Unchanged,
                "set keeps a pending login URL",
            ),
            (
                running.clone(),
                NeedsLogin,
                true,
                false,
                PrefsChange::NewSession,
                "up while waiting: try again",
            ),
            (
                running.clone(),
                Starting,
                true,
                false,
                PrefsChange::NewSession,
                "up while starting",
            ),
            (
                running.clone(),
                Running,
                true,
                true,
                PrefsChange::NewSession,
                "--force-reauth",
            ),
            (
                with(|p| p.exit_node = "100.64.0.9".into()),
                Running,
                false,
                false,
                PrefsChange::InSession,
                "exit node",
            ),
            (
                with(|p| p.accept_routes = true),
                Running,
                true,
                false,
                PrefsChange::InSession,
                "accept routes",
            ),
            (
                with(|p| p.shields_up = true),
                Running,
                false,
                false,
                PrefsChange::InSession,
                "shields",
            ),
            (
                with(|p| p.hostname = "gw".into()),
                Running,
                false,
                false,
                PrefsChange::InSession,
                "hostname",
            ),
            (
                with(|p| p.advertise_routes = vec!["10.0.0.0/8".into()]),
                Running,
                false,
                false,
                PrefsChange::InSession,
                "advertised routes travel in Hostinfo",
            ),
            (
                with(|p| p.exit_node = "100.64.0.9".into()),
                Starting,
                false,
                false,
                PrefsChange::NewSession,
                "not running yet",
            ),
            (
                with(|p| p.advertise_tags = vec!["tag:a".into()]),
                Running,
                false,
                false,
                PrefsChange::NewSession,
                "tags re-register",
            ),
            (
                with(|p| p.login_server = "https://other.example".into()),
                Running,
                true,
                false,
                PrefsChange::NewSession,
                "another control server",
            ),
            (
                with(|p| p.advertise_lan = "br-lan".into()),
                Running,
                false,
                false,
                PrefsChange::NewSession,
                "advertise_lan",
            ),
            (
                with(|p| p.want_running = false),
                Running,
                false,
                false,
                PrefsChange::SaveOnly,
                "set on a stopped node",
            ),
            (
                with(|p| p.want_running = false),
                Stopped,
                false,
                true,
                PrefsChange::SaveOnly,
                "even with --force-reauth",
            ),
        ];
        for (new, state, up, force, want, why) in cases {
            assert_eq!(prefs_change(&running, &new, state, up, force), want, "{why}");
        }
    }

    #[test]
    fn hostinfo_carries_routes_exit_offer_tags_and_shields() {
        let p = Prefs::default();
        let hi = hostinfo_json(&p, Vec::new(), "gw".into());
        assert_eq!(
            (&hi["Hostname"], &hi["OS"], &hi["App"]),
            (&json!("gw"), &json!("linux"), &json!("tinyscale"))
        );
        for absent in ["RoutableIPs", "RequestTags", "ShieldsUp"] {
            assert!(hi.get(absent).is_none(), "{absent} without a reason");
        }
        let p = Prefs {
            advertise_exit_node: true,
            advertise_tags: vec!["tag:router".into()],
            shields_up: true,
            ..Prefs::default()
        };
        let hi = hostinfo_json(&p, vec!["192.168.1.0/24".into(), "::/0".into()], "gw".into());
        assert_eq!(
            hi["RoutableIPs"],
            json!(["192.168.1.0/24", "::/0", "0.0.0.0/0"]),
            "default routes once each"
        );
        assert_eq!(hi["RequestTags"], json!(["tag:router"]));
        assert_eq!(hi["ShieldsUp"], json!(true));
    }

    #[test]
    fn register_steps_follow_the_response() {
        let r = |f: fn(&mut tailcfg::RegisterResponse)| {
            let mut r = tailcfg::RegisterResponse::default();
            f(&mut r);
            r
        };
        let url = "https://ctl.example/register/abc";
        let login = r(|r| r.auth_url = "https://ctl.example/register/abc".into());
        let ok = r(|r| r.machine_authorized = true);
        let expired = r(|r| {
            r.node_key_expired = true;
            r.auth_url = "https://ctl.example/register/abc".into();
        });
        let refused = r(|r| {
            r.error = "invalid auth key".into();
            r.machine_authorized = true;
        });
        for (resp, first, prev, want, why) in [
            (&ok, true, false, RegisterStep::Authorized, "logged in"),
            (&ok, false, true, RegisterStep::Authorized, "after a follow-up"),
            (
                &refused,
                true,
                false,
                RegisterStep::Refused("invalid auth key".into()),
                "an error wins",
            ),
            (
                &login,
                true,
                false,
                RegisterStep::NeedsLogin(url.into()),
                "interactive login",
            ),
            (
                &login,
                false,
                false,
                RegisterStep::NeedsLogin(url.into()),
                "a new URL on the follow-up",
            ),
            (
                &login,
                true,
                true,
                RegisterStep::KeepPreviousKey,
                "resumed rotation control never took",
            ),
            (
                &login,
                false,
                true,
                RegisterStep::NeedsLogin(url.into()),
                "no fallback on a follow-up",
            ),
            (
                &expired,
                true,
                false,
                RegisterStep::RotateExpired,
                "expired key rotates first",
            ),
            (
                &expired,
                false,
                false,
                RegisterStep::NeedsLogin(url.into()),
                "an auth key or follow-up logs in",
            ),
            (
                &tailcfg::RegisterResponse::default(),
                true,
                false,
                RegisterStep::NotAuthorized,
                "nothing to go on",
            ),
        ] {
            assert_eq!(register_step(resp, first, prev), want, "{why}");
        }
    }

    #[test]
    fn failed_sessions_move_the_backend_state() {
        use BackendState::*;
        for (state, retry, want) in [
            (Running, true, Starting),
            (Starting, true, Starting),
            (NeedsLogin, true, NeedsLogin),
            (Running, false, NeedsLogin),
            (Starting, false, NeedsLogin),
        ] {
            assert_eq!(state_after_failure(state, retry), want, "{state:?} retryable={retry}");
        }
    }

    #[test]
    fn state_file_keeps_a_pending_rotation_and_defaults_missing_prefs() {
        let m = MachinePrivate::from_random([3; 32]);
        let n = NodePrivate::from_random([4; 32]);
        let pending = NodePrivate::from_random([5; 32]);
        // Written by an older version: no pending key, prefs without the newer fields.
        let old = json!({
            "machine_key": m.to_key_str(),
            "node_key": n.to_key_str(),
            "prefs": {"login_server": "https://ctl.example", "want_running": true},
        });
        let st = parse_state_file(old.to_string().as_bytes()).expect("old file loads");
        assert_eq!(st.machine.public(), m.public());
        assert_eq!(st.node.public(), n.public());
        assert!(st.pending_node.is_none());
        assert!(st.prefs.want_running && st.prefs.accept_dns && st.prefs.snat_subnet_routes);
        assert_eq!(st.prefs.login_server, "https://ctl.example");
        // What the daemon writes comes back, the rotation in progress included.
        let f = StateFile {
            machine_key: m.to_key_str(),
            node_key: n.to_key_str(),
            pending_node_key: pending.to_key_str(),
            prefs: Prefs {
                exit_node: "100.64.0.9".into(),
                ..Prefs::default()
            },
        };
        let st = parse_state_file(&serde_json::to_vec_pretty(&f).unwrap()).expect("own file loads");
        assert_eq!(st.pending_node.map(|k| k.public()), Some(pending.public()));
        assert_eq!(st.prefs.exit_node, "100.64.0.9");
        let bad = json!({"machine_key": m.to_key_str(), "node_key": n.to_key_str(), "pending_node_key": "privkey:00"});
        let err = parse_state_file(bad.to_string().as_bytes()).expect_err("bad pending key");
        assert!(err.contains("pending_node_key"), "{err}");
    }

    /// A fresh state dir under the system temp dir, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let d = std::env::temp_dir().join(format!("tinyscale-daemon-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn generation(d: &Daemon) -> u64 {
        *d.generation.borrow()
    }

    #[test]
    fn unchanged_up_on_a_running_node_keeps_the_session() {
        let dir = TempDir::new("up");
        let d = Daemon::load(&dir.0, None).expect("state dir loads");
        let args = UpArgs {
            login_server: Some("http://127.0.0.1:9".into()),
            accept_routes: Some(true),
            advertise_routes: Some(vec!["192.168.1.0/24".into()]),
            reset: true,
            ..UpArgs::default()
        };
        d.up(args.clone()).expect("first up");
        assert_eq!(generation(&d), 1);
        d.lock().state = BackendState::Running;
        // Same prefs while running: no restart, still Running.
        d.up(args.clone()).expect("repeated up");
        assert_eq!(generation(&d), 1);
        assert_eq!(d.lock().state, BackendState::Running);
        // Routes, accepting routes, the exit node offer, hostname, shields: the session stays;
        // what changes Hostinfo is sent again within it.
        let hi = *d.hostinfo_tx.borrow();
        d.up(UpArgs {
            accept_routes: Some(false),
            ..args.clone()
        })
        .expect("accept-routes off");
        assert_eq!((generation(&d), *d.hostinfo_tx.borrow()), (1, hi), "data plane only");
        d.up(UpArgs {
            accept_routes: Some(false),
            advertise_routes: Some(vec!["192.168.1.0/24".into(), "10.9.0.0/16".into()]),
            hostname: Some("router2".into()),
            ..args.clone()
        })
        .expect("new routes");
        assert_eq!((generation(&d), *d.hostinfo_tx.borrow()), (1, hi + 1), "Hostinfo again");
        assert_eq!(d.lock().state, BackendState::Running);
        assert_eq!(d.lock().prefs.advertise_routes.len(), 2);
        let on_disk = std::fs::read_to_string(dir.0.join(STATE_FILE)).expect("state file");
        assert!(on_disk.contains("10.9.0.0/16"), "saved: {on_disk}");
        // A pref control must hear at registration (tags) restarts the session.
        let args = UpArgs {
            accept_routes: Some(false),
            advertise_routes: Some(vec!["192.168.1.0/24".into(), "10.9.0.0/16".into()]),
            hostname: Some("router2".into()),
            ..args
        };
        d.up(UpArgs {
            advertise_tags: Some(vec!["tag:router".into()]),
            ..args.clone()
        })
        .expect("changed up");
        assert_eq!(generation(&d), 2);
        assert_eq!(d.lock().state, BackendState::Starting);
        // Same prefs but not running (e.g. after an error): try again.
        d.up(UpArgs {
            advertise_tags: Some(vec!["tag:router".into()]),
            ..args.clone()
        })
        .expect("retry up");
        assert_eq!(generation(&d), 3);
        // --force-reauth always restarts.
        d.lock().state = BackendState::Running;
        d.up(UpArgs {
            advertise_tags: Some(vec!["tag:router".into()]),
            force_reauth: true,
            ..args
        })
        .expect("reauth up");
        assert_eq!(generation(&d), 4);
    }

    #[test]
    fn lan_prefixes_join_the_advertised_routes_while_advertise_lan_is_set() {
        let dir = TempDir::new("lan");
        let d = Daemon::load(&dir.0, None).expect("state dir loads");
        let up = |lan: &str| UpArgs {
            login_server: Some("http://127.0.0.1:9".into()),
            advertise_routes: Some(vec!["10.9.0.0/16".into()]),
            advertise_lan: Some(lan.into()),
            ..UpArgs::default()
        };
        let e = d.up(up("br/lan")).expect_err("bad name");
        assert!(e.contains("interface name"), "{e}");
        d.up(up("br-lan")).expect("up");
        d.set_lan_routes(vec!["192.168.1.0/24".into(), "10.9.0.0/16".into()]);
        let prefs = d.lock().prefs.clone();
        assert_eq!(
            d.hostinfo(&prefs)["RoutableIPs"],
            json!(["10.9.0.0/16", "192.168.1.0/24"])
        );
        assert_eq!(
            d.route_prefs_tx.borrow().advertise_routes,
            ["10.9.0.0/16", "192.168.1.0/24"],
            "the data plane forwards for them once approved"
        );
        // Off: the interface's prefixes are no longer offered, even before the watcher clears them.
        d.up(up("")).expect("off");
        let prefs = d.lock().prefs.clone();
        assert_eq!(d.hostinfo(&prefs)["RoutableIPs"], json!(["10.9.0.0/16"]));
        assert_eq!(d.route_prefs_tx.borrow().advertise_routes, ["10.9.0.0/16"]);
    }

    #[test]
    fn exit_node_is_checked_resolved_and_keeps_the_session() {
        let dir = TempDir::new("exit");
        let d = Daemon::load(&dir.0, None).expect("state dir loads");
        let node = |id: u64, name: &str, exit: bool| {
            let addresses = vec![format!("100.64.0.{id}/32")];
            let mut allowed_ips = addresses.clone();
            if exit {
                allowed_ips.extend(["0.0.0.0/0".to_string(), "::/0".to_string()]);
            }
            tailcfg::Node {
                id,
                name: format!("{name}.ts.example."),
                addresses,
                allowed_ips,
                ..Default::default()
            }
        };
        d.lock().netmap.apply(tailcfg::MapResponse {
            node: Some(node(1, "me", false)),
            peers: Some(vec![node(2, "router", true), node(3, "laptop", false)]),
            ..Default::default()
        });
        let up = |exit: &str| UpArgs {
            login_server: Some("http://127.0.0.1:9".into()),
            exit_node: Some(exit.into()),
            ..UpArgs::default()
        };
        for (arg, want) in [
            ("nobody", "no peer has that tailnet IP or name"),
            ("laptop", "is not offering an exit node"),
            ("me", "it is this node"),
        ] {
            let e = d.up(up(arg)).expect_err(arg);
            assert!(e.contains(want), "{arg}: {e}");
        }
        d.up(up("router")).expect("exit node by name");
        assert_eq!(d.lock().prefs.exit_node, "100.64.0.2", "kept as the peer's IP");
        assert_eq!(
            d.route_prefs_tx.borrow().exit_node,
            "100.64.0.2",
            "published to the data plane"
        );
        let e = d
            .up(UpArgs {
                advertise_exit_node: Some(true),
                ..up("router")
            })
            .expect_err("both");
        assert!(e.contains("at the same time"), "{e}");
        // Running: changing or clearing the exit node keeps the control session.
        d.lock().state = BackendState::Running;
        let g = generation(&d);
        d.up(UpArgs {
            exit_node_allow_lan_access: Some(true),
            ..up("100.64.0.2")
        })
        .expect("lan access");
        assert!(d.route_prefs_tx.borrow().exit_node_allow_lan_access);
        d.up(up("router")).expect("the same exit node, by name");
        assert_eq!(d.lock().prefs.exit_node, "100.64.0.2");
        d.up(up("")).expect("cleared");
        assert_eq!(d.route_prefs_tx.borrow().exit_node, "");
        assert_eq!(generation(&d), g);
        assert_eq!(d.lock().state, BackendState::Running);
        // Its approval revoked while in use: other prefs still change and naming it again is
        // no error (a uci reload); choosing it anew is.
        d.up(up("router")).expect("chosen again");
        d.lock().netmap.peers.get_mut(&2).unwrap().allowed_ips.truncate(1);
        d.up(UpArgs {
            accept_routes: Some(true),
            ..UpArgs::default()
        })
        .expect("other prefs");
        d.up(up("100.64.0.2")).expect("the same exit node, by IP");
        d.up(up("")).expect("cleared");
        let e = d.up(up("router")).expect_err("not offering any more");
        assert!(e.contains("is not offering an exit node"), "{e}");
    }

    #[tokio::test]
    async fn set_changes_prefs_without_bringing_the_node_up() {
        let dir = TempDir::new("set");
        let d = Daemon::load(&dir.0, None).expect("state dir loads");
        // A stopped node without a login server: saved for the next `up`, nothing starts, and
        // login settings passed along are not taken.
        let set = |a: UpArgs| d.handle(IpcRequest::Set(a));
        let r = set(UpArgs {
            shields_up: Some(true),
            login_server: Some("http://127.0.0.1:9".into()),
            ..UpArgs::default()
        })
        .await;
        assert_eq!(r.error, "");
        assert_eq!(generation(&d), 0);
        {
            let s = d.lock();
            assert!(s.prefs.shields_up && !s.prefs.want_running);
            assert_eq!(s.prefs.login_server, "");
        }
        let saved = std::fs::read_to_string(dir.0.join(STATE_FILE)).expect("state file");
        assert!(saved.contains("\"shields_up\": true"), "{saved}");
        // Bad input is refused as by `up`.
        let r = set(UpArgs {
            advertise_routes: Some(vec!["10.0.0.0".into()]),
            ..UpArgs::default()
        })
        .await;
        assert!(r.error.contains("advertise-routes"), "{}", r.error);
        // On a running node an unchanged pref keeps the session, a changed one restarts it.
        d.up(UpArgs {
            login_server: Some("http://127.0.0.1:9".into()),
            ..UpArgs::default()
        })
        .expect("up");
        let g = generation(&d);
        d.lock().state = BackendState::NeedsLogin;
        let same = UpArgs {
            shields_up: Some(true),
            ..UpArgs::default()
        };
        assert_eq!(set(same).await.error, "");
        assert_eq!(generation(&d), g);
        assert_eq!(d.lock().state, BackendState::NeedsLogin);
        let changed = UpArgs {
            accept_routes: Some(true),
            ..UpArgs::default()
        };
        assert_eq!(set(changed).await.error, "");
        assert_eq!(generation(&d), g + 1);
        assert!(d.lock().prefs.want_running);
        // Without --config there is nothing to reload.
        assert!(d.handle(IpcRequest::Reload).await.error.contains("--config"));
    }

    #[tokio::test]
    async fn reload_reads_the_config_again() {
        let dir = TempDir::new("reload");
        let d = Daemon::load(&dir.0.join("state"), None).expect("state dir loads");
        let cfg = dir.0.join("tinyscale");
        let write = |accept: &str| {
            let text = format!(
                "config client 'client'\n\toption login_server 'http://127.0.0.1:9'\n\toption advertise_lan '0'\n\toption accept_routes '{accept}'\n"
            );
            std::fs::write(&cfg, text).expect("config")
        };
        write("1");
        let _ = d.config.set(cfg.clone());
        assert_eq!(d.handle(IpcRequest::Reload).await.error, "");
        assert!(d.lock().prefs.accept_routes && d.lock().prefs.want_running);
        write("0");
        assert_eq!(d.handle(IpcRequest::Reload).await.error, "");
        assert!(!d.lock().prefs.accept_routes);
        std::fs::write(&cfg, "config client 'client'\n\toption accept_routes 'maybe'\n").expect("config");
        assert!(d.handle(IpcRequest::Reload).await.error.contains("accept_routes"));
    }

    #[tokio::test]
    async fn whois_answers_with_node_and_user_profile() {
        let dir = TempDir::new("whois");
        let d = Daemon::load(&dir.0, None).expect("state dir loads");
        d.lock().netmap.apply(tailcfg::MapResponse {
            node: Some(tailcfg::Node {
                id: 1,
                name: "me.ts.example.".into(),
                addresses: vec!["100.64.0.1/32".into()],
                ..Default::default()
            }),
            peers: Some(vec![tailcfg::Node {
                id: 2,
                stable_id: "nPeer".into(),
                name: "gw.ts.example.".into(),
                user: 5,
                addresses: vec!["100.64.0.2/32".into()],
                primary_routes: vec!["192.168.1.0/24".into()],
                tags: vec!["tag:gw".into()],
                ..Default::default()
            }]),
            user_profiles: Some(vec![tailcfg::UserProfile {
                id: 5,
                login_name: "bob@example.com".into(),
                display_name: "Bob".into(),
            }]),
            ..Default::default()
        });
        let r = d
            .handle(IpcRequest::WhoIs(crate::platform::ipc::Lookup {
                arg: "192.168.1.20:80".into(),
                ..Default::default()
            }))
            .await;
        assert_eq!(r.error, "");
        assert_eq!(r.data["Node"]["StableID"], "nPeer");
        assert_eq!(r.data["Node"]["Tags"], json!(["tag:gw"]));
        assert_eq!(r.data["UserProfile"]["LoginName"], "bob@example.com");
        assert!(r.data.get("CapMap").is_none(), "Go omits an empty CapMap");
        let r = d
            .handle(IpcRequest::WhoIs(crate::platform::ipc::Lookup {
                arg: "100.64.0.9".into(),
                ..Default::default()
            }))
            .await;
        assert!(r.error.starts_with("no match for 100.64.0.9"), "{}", r.error);
        let r = d
            .handle(IpcRequest::WhoIs(crate::platform::ipc::Lookup {
                arg: "gw".into(),
                ..Default::default()
            }))
            .await;
        assert!(r.error.starts_with("invalid address"), "{}", r.error);
        // A CapGrant from the peer's address towards ours shows up as its CapMap.
        d.lock().netmap.apply(
            serde_json::from_value(json!({"PacketFilter": [{"SrcIPs": ["100.64.0.2"], "CapGrant": [
                {"Dsts": ["100.64.0.1/32"], "CapMap": {"example.com/cap/web": [{"path": "/admin"}]}}]}]}))
            .expect("MapResponse"),
        );
        let r = d
            .handle(IpcRequest::WhoIs(crate::platform::ipc::Lookup {
                arg: "100.64.0.2".into(),
                ..Default::default()
            }))
            .await;
        assert_eq!(r.data["CapMap"], json!({"example.com/cap/web": [{"path": "/admin"}]}));
    }

    #[tokio::test]
    async fn dns_query_uses_the_magic_dns_answers() {
        let dir = TempDir::new("dnsq");
        let d = Daemon::load(&dir.0, None).expect("state dir loads");
        d.lock().netmap.apply(tailcfg::MapResponse {
            node: Some(tailcfg::Node {
                id: 1,
                name: "me.ts.example.".into(),
                addresses: vec!["100.64.0.1/32".into()],
                ..Default::default()
            }),
            peers: Some(vec![tailcfg::Node {
                id: 2,
                name: "gw.ts.example.".into(),
                addresses: vec!["100.64.0.2/32".into(), "fd7a:115c:a1e0::2/128".into()],
                ..Default::default()
            }]),
            dns_config: Some(tailcfg::DnsConfig {
                proxied: true,
                routes: [(
                    "corp.example.".to_string(),
                    vec![tailcfg::Resolver {
                        addr: "10.0.0.53".into(),
                    }],
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let q = |name: &str, qtype: &str| {
            d.handle(IpcRequest::DnsQuery(crate::platform::ipc::Lookup {
                arg: name.into(),
                qtype: qtype.into(),
            }))
        };
        let r = q("gw", "aaaa").await;
        assert_eq!(r.error, "");
        assert_eq!(r.data["ResponseCode"], "RCodeSuccess");
        assert_eq!(r.data["QueryType"], "AAAA");
        assert_eq!(
            r.data["Answers"],
            json!([{"Name": "gw.", "TTL": 600, "Class": "ClassINET", "Type": "TypeAAAA", "Body": "fd7a:115c:a1e0::2"}])
        );
        let r = q("100.64.0.2", "PTR").await;
        assert_eq!(r.data["Name"], "2.0.64.100.in-addr.arpa");
        assert_eq!(r.data["Answers"][0]["Body"], "gw.ts.example.");
        assert_eq!(q("nope.ts.example", "A").await.data["ResponseCode"], "RCodeNameError");
        let r = q("intranet.corp.example", "A").await;
        assert_eq!(r.data["Forward"], "split-dns");
        assert_eq!(r.data["Resolvers"], json!([{"Addr": "10.0.0.53:53"}]));
        assert!(r.data.get("Answers").is_none(), "nothing was sent");
        assert!(q("gw", "BOGUS").await.error.starts_with("unknown record type"));
        d.lock().prefs.accept_dns = false;
        assert!(q("gw", "A").await.error.contains("--accept-dns=false"));
    }

    /// The state file's prefs come back as written; a file of an older version that lacks a
    /// field gets that field's default, and a field of the wrong type is damage.
    #[test]
    fn state_file_prefs_roundtrip_and_default() {
        let prefs = Prefs {
            login_server: "https://c.example".into(),
            hostname: "r1".into(),
            advertise_routes: vec!["10.0.0.0/24".into()],
            advertise_lan: "br-lan".into(),
            accept_routes: true,
            accept_dns: false,
            advertise_exit_node: true,
            exit_node: "100.64.0.7".into(),
            exit_node_allow_lan_access: true,
            advertise_tags: vec!["tag:r".into()],
            shields_up: true,
            snat_subnet_routes: false,
            want_running: true,
        };
        let m = MachinePrivate::from_random(random32()).to_key_str();
        let n = NodePrivate::from_random(random32()).to_key_str();
        let file = StateFile {
            machine_key: m.clone(),
            node_key: n.clone(),
            pending_node_key: String::new(),
            prefs: prefs.clone(),
        };
        let saved = parse_state_file(&serde_json::to_vec_pretty(&file).expect("json")).expect("parses");
        assert_eq!((saved.prefs, saved.pending_node.is_none()), (prefs, true));
        let old = json!({"machine_key": m, "node_key": n, "prefs": {"hostname": "r2", "want_running": true}});
        let saved = parse_state_file(old.to_string().as_bytes()).expect("older file parses");
        assert_eq!(
            saved.prefs,
            Prefs {
                hostname: "r2".into(),
                want_running: true,
                ..Prefs::default()
            }
        );
        assert!(saved.prefs.accept_dns && saved.prefs.snat_subnet_routes);
        for bad in [
            json!({"machine_key": m, "node_key": n, "prefs": {"accept_dns": "no"}}),
            json!({"machine_key": m, "node_key": n, "prefs": []}),
            json!({"machine_key": 1, "node_key": n}),
            json!([m, n]),
        ] {
            let e = parse_state_file(bad.to_string().as_bytes()).expect_err(&bad.to_string());
            assert!(e.contains("not valid state JSON"), "{bad}: {e}");
        }
    }

    #[test]
    fn damaged_state_file_is_refused_and_left_untouched() {
        let dir = TempDir::new("corrupt");
        let path = dir.0.join(STATE_FILE);
        let good = {
            let d = Daemon::load(&dir.0, None).expect("fresh state dir loads");
            let s = d.lock();
            (s.machine.public(), s.node.public())
        };
        let text = std::fs::read(&path).expect("state file written");
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), "is empty"),
            ("blank", b"\n\n".to_vec(), "is empty"),
            ("truncated", text[..text.len() / 2].to_vec(), "not valid state JSON"),
            ("garbage", vec![0xff, 0x00, 0x13, 0x37], "not valid state JSON"),
            ("no keys", b"{}".to_vec(), "bad machine_key"),
            (
                "bad node key",
                String::from_utf8_lossy(&text)
                    .replace("\"node_key\": \"privkey:", "\"node_key\": \"privkey:zz")
                    .into_bytes(),
                "bad node_key",
            ),
        ];
        for (what, bytes, want) in cases {
            std::fs::write(&path, &bytes).expect("write damaged file");
            let err = Daemon::load(&dir.0, None)
                .err()
                .unwrap_or_else(|| panic!("{what}: loaded"));
            assert!(err.contains(&path.display().to_string()), "{what}: {err}");
            assert!(err.contains(want), "{what}: {err}");
            assert!(err.contains("refusing to start"), "{what}: {err}");
            assert_eq!(
                std::fs::read(&path).expect("still there"),
                bytes,
                "{what}: file was rewritten"
            );
        }
        // Restored, the same identity comes back.
        std::fs::write(&path, &text).expect("restore");
        let d = Daemon::load(&dir.0, None).expect("restored state loads");
        let s = d.lock();
        assert_eq!((s.machine.public(), s.node.public()), good);
    }

    #[test]
    fn state_file_permissions_and_unreadable_path() {
        let dir = TempDir::new("perm");
        let path = dir.0.join(STATE_FILE);
        let first = Daemon::load(&dir.0, None).expect("fresh").lock().node.public();
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        // Opened up by hand, and a stale world-readable temp file from a crashed write: the
        // state is kept and both end up private.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, b"stale").expect("tmp");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).expect("chmod tmp");
        let d = Daemon::load(&dir.0, None).expect("reloads");
        assert_eq!(d.lock().node.public(), first);
        assert_eq!(mode(&path), 0o600);
        assert!(!tmp.exists(), "temp file renamed over the state file");
        drop(d);
        // A state path that cannot be read as a file is an error naming it, not a new identity.
        std::fs::remove_file(&path).expect("rm");
        std::fs::create_dir(&path).expect("dir in the way");
        let err = Daemon::load(&dir.0, None).err().expect("refused");
        assert!(
            err.contains("cannot read") && err.contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn write_private_file_replaces_atomically() {
        let dir = TempDir::new("atomic");
        std::fs::create_dir_all(&dir.0).expect("dir");
        let path = dir.0.join("f");
        write_private_file(&path, b"one").expect("write");
        write_private_file(&path, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert!(!path.with_extension("tmp").exists());
        // A failed write (the parent is gone) leaves no partial file behind and reports the error.
        let gone = dir.0.join("missing/f");
        assert!(write_private_file(&gone, b"x").is_err());
        assert!(!gone.exists());
    }
}
