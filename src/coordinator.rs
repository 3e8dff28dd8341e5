//! The mini-coordinator (feature `coordinator`): a headscale-compatible control server with a
//! SQLite store, started by `tinyscale server serve` and administered over a unix socket.
//!
//! Layers: `model` (records), `store` (SQLite), `ipam`, `state` (decisions + write-through),
//! `mapper` (MapResponses and deltas), `server` (TCP/Noise/HTTP2 shell), `admin` (unix socket).

pub mod admin;
pub mod ipam;
pub mod mapper;
pub mod model;
pub mod server;
pub mod state;
pub mod store;

use std::path::Path;

use crate::{tailcfg::DerpMap, uci::ServerConfig};

/// Reads the DERP map files named by `list derp_path` (tailcfg JSON, keys case-insensitive) and
/// merges them region by region, later files winning (headscale semantics).
pub fn load_derp_map(paths: &[std::path::PathBuf]) -> Result<DerpMap, String> {
    let mut map = DerpMap::default();
    for p in paths {
        let data = std::fs::read(p).map_err(|e| format!("cannot read DERP map {}: {e}", p.display()))?;
        let m: DerpMap = crate::tailcfg::from_slice_folded(&data).map_err(|e| format!("invalid DERP map {}: {e}", p.display()))?;
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
        ipam.v4 = (p.addr(), p.prefix_len());
    }
    if let Some(p) = cfg.prefix_v6 {
        ipam.v6 = (p.addr(), p.prefix_len());
    }
    Ok(state::Settings {
        server_url: cfg.server_url.clone(),
        ipam,
        base_domain: cfg.base_domain.clone(),
        magic_dns: cfg.magic_dns,
        nameservers: cfg.nameservers.iter().map(|a| a.to_string()).collect(),
        derp_map: load_derp_map(&cfg.derp.paths)?,
        ephemeral_inactivity_timeout: cfg.ephemeral_node_inactivity_timeout.as_secs() as i64,
    })
}

/// `tinyscale server serve`: runs until SIGTERM/SIGINT.
pub async fn run(cfg: &ServerConfig) -> Result<(), String> {
    let settings = settings_from_config(cfg)?;
    if settings.derp_map.regions.is_empty() {
        log::warn!("the DERP map is empty: clients register but official clients never reach Running without a relay (set list derp_path or enable the embedded DERP server)");
    }
    let store = store::Store::open(&cfg.db_path).map_err(|e| format!("cannot open database {}: {e}", cfg.db_path.display()))?;
    let st = state::State::load(store, settings).map_err(|e| e.to_string())?;
    let coord = server::Coordinator::new(st).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(cfg.listen_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen_addr))?;
    log::info!(
        "coordinator listening addr={} url={} db={} admin={}",
        cfg.listen_addr,
        cfg.server_url,
        cfg.db_path.display(),
        cfg.unix_socket.display()
    );
    let admin_path: &Path = &cfg.unix_socket;
    tokio::select! {
        _ = server::serve_http(coord.clone(), listener) => Ok(()),
        r = admin::serve_admin(coord.clone(), admin_path) => r.map_err(|e| format!("admin socket {}: {e}", admin_path.display())),
        _ = coord.clone().housekeeping() => Ok(()),
        _ = crate::shutdown_signal() => {
            let _ = std::fs::remove_file(admin_path);
            log::info!("coordinator stopped");
            Ok(())
        }
    }
}
