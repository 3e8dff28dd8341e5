//! The client daemon (`tinyscale daemon`, the tailscaled of tinyscale): owns the keys and prefs in
//! the state dir, runs the control session (register, map long-poll, reconnect with backoff) and
//! answers the CLI over the local socket.
//!
//! Mirrors the roles of tailscale `ipn/ipnlocal/local.go` (backend state machine) and
//! `control/controlclient/auto.go` (login/map loop). The data plane joins this loop later.

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
        netmap::Netmap,
    },
    engine::{Engine, EngineConfig, EngineHandle, LocalEndpoints, RoutePrefs},
    ipc::{IpcRequest, IpcResponse, UpArgs},
    keys::{DiscoPrivate, MachinePrivate, NodePrivate, NodePublic},
    tailcfg::{self, MapRequest, RegisterAuth, RegisterRequest},
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
    engine: Mutex<Option<RunningEngine>>,
    /// The node key for which the data plane failed to start (no retry storm on every map message).
    engine_failed_for: Mutex<Option<NodePublic>>,
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
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Daemon {
    /// Loads (or creates) the state in `dir`.
    pub fn load(dir: &Path, engine_cfg: Option<EngineConfig>) -> Result<Arc<Daemon>, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create state dir {}: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let path = dir.join(STATE_FILE);
        let file: StateFile = match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|e| format!("state file {} is corrupt: {e}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let machine =
            MachinePrivate::from_key_str(&file.machine_key).unwrap_or_else(|_| MachinePrivate::from_random(random32()));
        let node = NodePrivate::from_key_str(&file.node_key).unwrap_or_else(|_| NodePrivate::from_random(random32()));
        let state = if file.prefs.want_running {
            BackendState::Starting
        } else if file.prefs.login_server.is_empty() {
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
                prefs: file.prefs,
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
            engine: Mutex::new(None),
            engine_failed_for: Mutex::new(None),
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
            prefs: s.prefs.clone(),
        };
        let rp = RoutePrefs {
            advertise_routes: s.prefs.advertise_routes.clone(),
            accept_routes: s.prefs.accept_routes,
            snat_subnet_routes: s.prefs.snat_subnet_routes,
            advertise_exit_node: s.prefs.advertise_exit_node,
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

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn hostinfo(&self, prefs: &Prefs) -> Value {
        let host = if prefs.hostname.is_empty() {
            system_hostname()
        } else {
            prefs.hostname.clone()
        };
        let mut routes = prefs.advertise_routes.clone();
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
        };
        IpcResponse::from_result(r)
    }

    fn up(&self, a: UpArgs) -> Result<Value, String> {
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
        for t in a.advertise_tags.iter().flatten() {
            if !t.starts_with("tag:") || t.len() < 5 {
                return Err(format!("invalid --advertise-tags entry {t:?}: tags look like tag:name"));
            }
        }
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
                }
                p.login_server = v.trim_end_matches('/').to_string();
            }
            if p.login_server.is_empty() {
                return Err("no login server configured: pass --login-server http://HOST:PORT".into());
            }
            macro_rules! set {
                ($($f:ident),*) => { $( if let Some(v) = a.$f { p.$f = v; } )* };
            }
            set!(
                hostname,
                advertise_routes,
                accept_routes,
                accept_dns,
                advertise_exit_node,
                exit_node,
                exit_node_allow_lan_access,
                advertise_tags,
                shields_up,
                snat_subnet_routes
            );
            p.want_running = true;
            // An `up` that changes nothing on a running node (the init script's reload, run on
            // every lan/wan interface event) must not restart the control session.
            if !a.force_reauth && s.state == BackendState::Running && p == s.prefs {
                return Ok(json!({"state": "Running"}));
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
            s.prefs.want_running = false;
            s.state = BackendState::NeedsLogin;
            s.netmap = Netmap::default();
            s.auth_url.clear();
        }
        self.save()?;
        self.bump();
        Ok(json!({"state": "NeedsLogin", "note": note}))
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
                });
                if let Some(e) = engine.as_ref().and_then(|e| e.peers.get(&p.key)) {
                    for k in ["CurAddr", "Relay", "RxBytes", "TxBytes", "LastHandshakeSecs"] {
                        v[k] = e[k].clone();
                    }
                }
                v
            })
            .collect();
        json!({
            "BackendState": s.state,
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
        let mut s = self.lock();
        s.state = st;
        if let Some(e) = err {
            s.last_error = e;
        }
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
                    if !retry {
                        // A rejected key or bad URL will not fix itself: wait for a new `up`.
                        {
                            let mut s = self.lock();
                            s.prefs.want_running = false;
                        }
                        self.set_state(BackendState::NeedsLogin, Some(e.to_string()));
                        continue;
                    }
                    {
                        let mut s = self.lock();
                        s.last_error = e.to_string();
                        if s.state == BackendState::Running {
                            s.state = BackendState::Starting;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {},
                        _ = gen.changed() => {},
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn session(self: &Arc<Self>) -> Result<(), client::Error> {
        let (url, machine, mut node, prefs, auth_key, force) = {
            let s = self.lock();
            (
                s.prefs.login_server.clone(),
                s.machine.clone(),
                s.node.clone(),
                s.prefs.clone(),
                s.auth_key.clone(),
                s.force_reauth,
            )
        };
        let url = ControlUrl::parse(&url)?;
        let server_key = client::fetch_server_key(&url).await?;
        let mut conn = client::connect(&url, &machine, &server_key).await?;
        let hostinfo = self.hostinfo(&prefs);
        let mut old = crate::keys::NodePublic::default();
        if force {
            old = node.public();
            node = NodePrivate::from_random(random32());
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
            if !resp.error.is_empty() {
                return Err(client::Error::Rejected(format!(
                    "login refused by control server: {}",
                    resp.error
                )));
            }
            if resp.node_key_expired && req.followup.is_empty() && req.auth.is_none() {
                // Our key expired: rotate it and log in again (interactive unless a key is given).
                log::info!("node key expired, rotating");
                req.old_node_key = node.public();
                node = NodePrivate::from_random(random32());
                req.node_key = node.public();
                continue;
            }
            if !resp.auth_url.is_empty() {
                log::info!("login required url={}", resp.auth_url);
                {
                    let mut s = self.lock();
                    s.auth_url = resp.auth_url.clone();
                    s.state = BackendState::NeedsLogin;
                }
                req.followup = resp.auth_url;
                continue;
            }
            if resp.machine_authorized {
                break;
            }
            return Err(client::Error::Rejected(
                "control server did not authorize this machine".into(),
            ));
        }
        {
            let mut s = self.lock();
            s.node = node.clone();
            s.auth_key = None;
            s.force_reauth = false;
            s.auth_url.clear();
            s.last_error.clear();
        }
        if let Err(e) = self.save() {
            log::error!("persisting keys failed err={e}");
        }
        let mut ep_rx = self.endpoints_tx.subscribe();
        let map_req = |ep: &LocalEndpoints, stream: bool| {
            let mut hi = hostinfo.clone();
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
                }
                r = ep_rx.changed() => {
                    if r.is_err() { continue; }
                    let req = map_req(&ep_rx.borrow_and_update(), false);
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
/// `ubus` is ubusd's socket for the `tinyscale` object (`None`: no ubus object).
pub async fn run(
    state_dir: &Path,
    socket: &Path,
    engine: Option<EngineConfig>,
    initial: Option<UpArgs>,
    ubus: Option<PathBuf>,
) -> Result<(), String> {
    if engine.is_some() {
        // What a crashed run left (nftables table, rules, routing table, forwarding) goes at
        // once, not when control first answers: a router restarting with its uplink down must
        // not keep forwarding for routes nobody approved any more.
        let mut r = crate::router::Router::new(crate::router::SystemRunner);
        r.set_saved_path(&state_dir.join(crate::engine::FORWARDING_SAVED).to_string_lossy());
        r.recover();
    }
    let d = Daemon::load(state_dir, engine)?;
    if let Some(args) = initial {
        match d.up(args) {
            Ok(_) => log::info!("prefs from config applied"),
            Err(e) => log::warn!("prefs from config not applied err={e}"),
        }
    }
    let listener = crate::ipc::bind_private(socket)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    log::info!(
        "daemon started state_dir={} socket={}",
        state_dir.display(),
        socket.display()
    );
    tokio::spawn(d.clone().control_loop());
    if let Some(path) = ubus {
        tokio::spawn(crate::ubus_object::run(d.clone(), path));
    }
    let dd = d.clone();
    let accept = crate::ipc::serve_lines(listener, move |req: IpcRequest| {
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
    m.insert("Resolvers".into(), addrs(&nm.dns.resolvers));
    m.insert("Routes".into(), Value::Object(routes));
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
        // A changed pref restarts the session.
        d.up(UpArgs {
            accept_routes: Some(false),
            ..args.clone()
        })
        .expect("changed up");
        assert_eq!(generation(&d), 2);
        assert_eq!(d.lock().state, BackendState::Starting);
        // Same prefs but not running (e.g. after an error): try again.
        d.up(UpArgs {
            accept_routes: Some(false),
            ..args.clone()
        })
        .expect("retry up");
        assert_eq!(generation(&d), 3);
        // --force-reauth always restarts.
        d.lock().state = BackendState::Running;
        d.up(UpArgs {
            accept_routes: Some(false),
            force_reauth: true,
            ..args
        })
        .expect("reauth up");
        assert_eq!(generation(&d), 4);
    }
}
