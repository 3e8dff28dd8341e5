//! The mini-coordinator (feature `coordinator`): a headscale-compatible control server with a
//! SQLite store, started by `tinyscale server serve` and administered over a unix socket.
//!
//! Layers: `config` (the uci section), `model` (records), `store` (SQLite), `ipam`, `policy` (ACLs), `state` (decisions +
//! write-through), `mapper` (MapResponses and deltas), `server` (TCP/Noise/HTTP2 shell), `admin`
//! (unix socket).

pub mod admin;
pub mod api;
pub mod ipam;
pub mod mapper;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod ratelimit;
pub mod server;
pub mod state;
pub mod store;

use std::{path::Path, sync::Arc, time::Duration};

use crate::{
    platform::uci::server::ServerConfig,
    wire::tailcfg::{DerpMap, DerpRegion},
};

/// How often `list derp_url` maps are fetched again (headscale's `update_frequency` default).
pub const DERP_MAP_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Budget for one DERP map download, and the largest map accepted.
const DERP_MAP_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
const DERP_MAP_MAX_BYTES: usize = 1 << 20;

/// The DERP map clients get, merged region by region with later sources winning, in headscale's
/// order: maps fetched from `list derp_url` (in list order), then the `list derp_path` files, then
/// the embedded relay's region.
pub fn merge_derp_maps<'a>(
    fetched: impl IntoIterator<Item = &'a DerpMap>,
    files: &'a DerpMap,
    embedded: Option<&DerpRegion>,
) -> DerpMap {
    let mut map = DerpMap::default();
    for m in fetched.into_iter().chain(std::iter::once(files)) {
        for (id, region) in &m.regions {
            map.regions.insert(id.clone(), region.clone());
        }
    }
    if let Some(r) = embedded {
        map.regions.insert(r.region_id.to_string(), r.clone());
    }
    map
}

/// Downloads and parses one DERP map (`list derp_url`).
pub async fn fetch_derp_map(url: &str) -> Result<DerpMap, String> {
    let body = crate::wire::http1::get(url, DERP_MAP_MAX_BYTES, DERP_MAP_FETCH_TIMEOUT).await?;
    let m: DerpMap =
        crate::wire::tailcfg::from_slice_folded(&body).map_err(|e| format!("{url}: not a DERP map: {e}"))?;
    if m.regions.is_empty() {
        return Err(format!("{url}: the DERP map has no regions"));
    }
    Ok(m)
}

/// The sources of the DERP map, kept for refreshes: the last good map of each URL.
struct DerpSources {
    urls: Vec<String>,
    fetched: Vec<Option<DerpMap>>,
    files: DerpMap,
    embedded: Option<DerpRegion>,
}

impl DerpSources {
    /// Fetches every URL once; a failure keeps that URL's last good map (none at start-up) and
    /// is logged, never fatal (headscale does the same).
    async fn refresh(&mut self) -> DerpMap {
        for (i, url) in self.urls.iter().enumerate() {
            match fetch_derp_map(url).await {
                Ok(m) => {
                    log::info!("derp map fetched url={url} regions={}", m.regions.len());
                    self.fetched[i] = Some(m);
                }
                Err(e) => log::warn!("derp map fetch failed, keeping the last good one err={e}"),
            }
        }
        merge_derp_maps(self.fetched.iter().flatten(), &self.files, self.embedded.as_ref())
    }
}

/// Fetches `list derp_url` again every [`DERP_MAP_REFRESH`]; a changed map goes to every node.
async fn refresh_derp_maps(coord: Arc<server::Coordinator>, mut sources: DerpSources) {
    if sources.urls.is_empty() {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(DERP_MAP_REFRESH).await;
        let map = sources.refresh().await;
        let changed = {
            let mut st = coord.lock();
            let changed = st.settings.derp_map != map;
            st.settings.derp_map = map;
            changed
        };
        if changed {
            log::info!("derp map changed: sending full maps");
            coord.publish(vec![state::Change::Full]);
        }
    }
}

/// Reads the DERP map files named by `list derp_path` (tailcfg JSON, keys case-insensitive) and
/// merges them region by region, later files winning (headscale semantics).
pub fn load_derp_map(paths: &[std::path::PathBuf]) -> Result<DerpMap, String> {
    let mut map = DerpMap::default();
    for p in paths {
        let data = std::fs::read(p).map_err(|e| format!("cannot read DERP map {}: {e}", p.display()))?;
        let m: DerpMap = crate::wire::tailcfg::from_slice_folded(&data)
            .map_err(|e| format!("invalid DERP map {}: {e}", p.display()))?;
        for (id, region) in m.regions {
            map.regions.insert(id, region);
        }
    }
    Ok(map)
}

/// Settings for the state machine from the validated config.
pub fn settings_from_config(cfg: &ServerConfig) -> Result<state::Settings, String> {
    let mut ipam = ipam::Ipam::default();
    if let Some(p) = cfg.prefix_v4 {
        ipam.v4 = p;
    }
    if let Some(p) = cfg.prefix_v6 {
        ipam.v6 = p;
    }
    Ok(state::Settings {
        server_url: cfg.server_url.clone(),
        ipam,
        base_domain: cfg.base_domain.clone(),
        magic_dns: cfg.magic_dns,
        nameservers: cfg.nameservers.iter().map(|a| a.to_string()).collect(),
        split_dns: cfg.split_dns.clone(),
        extra_records: cfg.extra_records.clone(),
        derp_map: load_derp_map(&cfg.derp.paths)?,
        ephemeral_inactivity_timeout: cfg.ephemeral_node_inactivity_timeout.as_secs() as i64,
    })
}

/// The HTTP listener's limits from the validated config.
pub fn limits_from_config(cfg: &ServerConfig) -> crate::platform::connlimit::ListenLimits {
    crate::platform::connlimit::ListenLimits {
        max_connections: cfg.max_connections,
        max_connections_per_ip: cfg.max_connections_per_ip,
        handshake_timeout: cfg.handshake_timeout,
    }
}

/// The per-source rate limit from the validated config.
pub fn rate_limits_from_config(cfg: &ServerConfig) -> ratelimit::RateLimits {
    ratelimit::RateLimits {
        rate: cfg.rate_limit,
        burst: cfg.rate_burst,
    }
}

/// Gathers every number of `GET /metrics` (the listener's refusals, the relay, STUN).
pub fn metrics_snapshot(coord: &server::Coordinator, stun: Option<&crate::wire::stun::StunStats>) -> metrics::Snapshot {
    use metrics::Registration as R;
    let m = coord.metrics();
    let (nodes, nodes_online, evicted) = {
        let st = coord.lock();
        let ids: Vec<u64> = st.nodes().map(|n| n.id).collect();
        let online = ids.iter().filter(|id| st.is_online(**id)).count();
        (ids.len() as u64, online as u64, st.pending_evicted)
    };
    let l = coord.limits();
    metrics::Snapshot {
        nodes,
        nodes_online,
        map_streams: u64::from(m.map_streams()),
        registrations: [R::Success, R::NeedsAuth, R::Unauthorized, R::Error].map(|r| u64::from(m.registrations(r))),
        fanout: m.fanout.snapshot(),
        store_writes: metrics::STORE_WRITES.snapshot(),
        derp: coord.derp().map(|d| {
            let (bytes_received, bytes_sent) = d.bytes();
            metrics::DerpSnapshot {
                clients: d.client_count() as u64,
                bytes_received,
                bytes_sent,
                dropped_queue_full: u64::from(d.stats().packets_dropped()),
                dropped_unknown_dest: u64::from(d.stats().packets_not_here()),
            }
        }),
        stun: stun.map(|s| (u64::from(s.served()), u64::from(s.dropped()))),
        refused: [
            u64::from(l.refused_total()),
            u64::from(l.refused_per_ip()),
            u64::from(l.timed_out()),
            evicted,
        ],
        rate_limited: [
            metrics::Limited::Key,
            metrics::Limited::Ts2021,
            metrics::Limited::Register,
        ]
        .map(|r| u64::from(m.rate_limited(r))),
    }
}

/// The relay's persistent key (store kv `derp_private_key`), created on first use.
fn derp_key(coord: &server::Coordinator) -> Result<crate::wire::keys::NodePrivate, String> {
    let st = coord.lock();
    match st.store().get_kv("derp_private_key").map_err(|e| e.to_string())? {
        Some(t) => crate::wire::keys::NodePrivate::from_key_str(&t)
            .map_err(|_| "stored derp_private_key is corrupt".to_string()),
        None => {
            let mut b = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
            let k = crate::wire::keys::NodePrivate::from_random(b);
            st.store()
                .set_kv("derp_private_key", &k.to_key_str())
                .map_err(|e| e.to_string())?;
            Ok(k)
        }
    }
}

/// `tinyscale server serve`: runs until SIGTERM/SIGINT; with `ubus` (ubusd's socket) it keeps
/// the `tinyscale.server` object registered there.
pub async fn run(cfg: &ServerConfig, ubus: Option<std::path::PathBuf>) -> Result<(), String> {
    let mut settings = settings_from_config(cfg)?;
    let embedded = cfg
        .derp
        .server_enabled
        .then(|| crate::derp::server::embedded_region(&cfg.derp, &cfg.server_url));
    if embedded.is_some() && cfg.server_url.starts_with("http://") {
        log::warn!("derp: server_url is http://, so only clients started with TS_DEBUG_USE_DERP_HTTP=1 can use the embedded relay (set tls_cert_path/tls_key_path and an https:// server_url)");
    }
    let mut derp_sources = DerpSources {
        urls: cfg.derp.urls.clone(),
        fetched: vec![None; cfg.derp.urls.len()],
        files: std::mem::take(&mut settings.derp_map),
        embedded,
    };
    settings.derp_map = derp_sources.refresh().await;
    if settings.derp_map.regions.is_empty() {
        log::warn!("the DERP map is empty: clients register but official clients never reach Running without a relay (set list derp_path or enable the embedded DERP server)");
    }
    let store =
        store::Store::open(&cfg.db_path).map_err(|e| format!("cannot open database {}: {e}", cfg.db_path.display()))?;
    let mut st = state::State::load(store, settings).map_err(|e| e.to_string())?;
    if let Some(p) = &cfg.policy_path {
        let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read policy_path {}: {e}", p.display()))?;
        st.use_policy_file(&p.display().to_string(), &text)
            .map_err(|e| format!("policy_path {e}"))?;
        log::info!("acl policy loaded from {}", p.display());
    }
    let coord = server::Coordinator::with_limits(st, limits_from_config(cfg)).map_err(|e| e.to_string())?;
    coord.set_rate_limits(rate_limits_from_config(cfg));
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(crate::platform::tls::Acceptor::from_pem_files(cert, key)?),
        None => None,
    };
    if tls.is_none() && cfg.server_url.starts_with("https://") {
        log::info!("server_url is https:// but tls_cert_path is unset: expecting a TLS-terminating proxy in front");
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen_addr))?;
    log::info!(
        "coordinator listening addr={} tls={} url={} db={} admin={} max_connections={} max_connections_per_ip={} rate_limit={} rate_burst={}",
        cfg.listen_addr,
        tls.is_some(),
        cfg.server_url,
        cfg.db_path.display(),
        cfg.unix_socket.display(),
        cfg.max_connections,
        cfg.max_connections_per_ip,
        cfg.rate_limit,
        cfg.rate_burst
    );
    let stun_sock = if cfg.derp.server_enabled {
        let a = cfg.derp.server_stun_listen_addr;
        Some(
            tokio::net::UdpSocket::bind(a)
                .await
                .map_err(|e| format!("cannot listen for STUN on {a}: {e}"))?,
        )
    } else {
        None
    };
    if cfg.derp.server_enabled {
        let key = derp_key(&coord)?;
        let verifier = cfg.derp.server_verify_clients.then(|| {
            // Weak: coordinator -> relay -> verifier would otherwise be a cycle.
            let weak = std::sync::Arc::downgrade(&coord);
            std::sync::Arc::new(move |k: &crate::wire::keys::NodePublic| {
                weak.upgrade()
                    .is_some_and(|c| c.lock().nodes().any(|n| n.node_key == *k))
            }) as crate::derp::server::Verifier
        });
        coord.set_derp(std::sync::Arc::new(crate::derp::server::DerpServer::new(key, verifier)));
        log::info!(
            "embedded DERP relay on /derp, STUN on {}",
            cfg.derp.server_stun_listen_addr
        );
    }
    let stun_stats = stun_sock
        .as_ref()
        .map(|_| std::sync::Arc::new(crate::wire::stun::StunStats::default()));
    if let Some(addr) = cfg.metrics_listen_addr {
        if !addr.ip().is_loopback() {
            log::warn!("metrics_listen_addr {addr} is not loopback: anyone who reaches it reads the node counts and traffic figures");
        }
        // Metrics are not worth the tailnet: a taken port (the default 9090 is a popular one)
        // leaves them off with a warning instead of stopping the coordinator.
        match crate::platform::metrics::listen::bind(addr).await {
            Ok(listener) => {
                log::info!("metrics listening addr={addr} path=/metrics");
                let (coord, stun_stats) = (coord.clone(), stun_stats.clone());
                tokio::spawn(crate::platform::metrics::listen::serve(listener, move || {
                    std::future::ready(metrics::render(&metrics_snapshot(&coord, stun_stats.as_deref())))
                }));
            }
            Err(e) => log::warn!(
                "metrics_listen_addr {addr}: cannot listen ({e}); metrics are off (pick another address, or '' to turn them off)"
            ),
        }
    }
    let stun = async {
        match (stun_sock, stun_stats) {
            (Some(u), Some(stats)) => crate::wire::stun::serve_udp(u, stats).await,
            _ => std::future::pending().await,
        }
    };
    if let Some(path) = ubus {
        tokio::spawn(crate::platform::ubus_object::serve(
            std::sync::Arc::new(admin::ServerObject(coord.clone())),
            path,
        ));
    }
    let admin_path: &Path = &cfg.unix_socket;
    tokio::select! {
        _ = server::serve_http(coord.clone(), listener, tls) => Ok(()),
        r = admin::serve_admin(coord.clone(), admin_path) => r.map_err(|e| format!("admin socket {}: {e}", admin_path.display())),
        _ = coord.clone().housekeeping() => Ok(()),
        _ = refresh_derp_maps(coord.clone(), derp_sources) => Ok(()),
        r = stun => r.map_err(|e| format!("STUN socket {}: {e}", cfg.derp.server_stun_listen_addr)),
        _ = crate::shutdown_signal() => {
            let _ = std::fs::remove_file(admin_path);
            log::info!("coordinator stopped");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uci_defaults_are_the_listener_defaults() {
        assert_eq!(
            limits_from_config(&ServerConfig::default()),
            crate::platform::connlimit::ListenLimits::default()
        );
        assert_eq!(
            rate_limits_from_config(&ServerConfig::default()),
            ratelimit::RateLimits::default()
        );
    }
}
