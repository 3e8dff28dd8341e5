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
        let m: DerpMap =
            crate::tailcfg::from_slice_folded(&data).map_err(|e| format!("invalid DERP map {}: {e}", p.display()))?;
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

/// The relay's persistent key (store kv `derp_private_key`), created on first use.
fn derp_key(coord: &server::Coordinator) -> Result<crate::keys::NodePrivate, String> {
    let st = coord.lock();
    match st.store().get_kv("derp_private_key").map_err(|e| e.to_string())? {
        Some(t) => {
            crate::keys::NodePrivate::from_key_str(&t).map_err(|_| "stored derp_private_key is corrupt".to_string())
        }
        None => {
            let mut b = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
            let k = crate::keys::NodePrivate::from_random(b);
            st.store()
                .set_kv("derp_private_key", &k.to_key_str())
                .map_err(|e| e.to_string())?;
            Ok(k)
        }
    }
}

/// `tinyscale server serve`: runs until SIGTERM/SIGINT.
pub async fn run(cfg: &ServerConfig) -> Result<(), String> {
    let mut settings = settings_from_config(cfg)?;
    if cfg.derp.server_enabled {
        let region = crate::derp::server::embedded_region(&cfg.derp, &cfg.server_url);
        // The local region wins over same-id regions from files (headscale).
        settings.derp_map.regions.insert(region.region_id.to_string(), region);
        if cfg.server_url.starts_with("http://") {
            log::warn!("derp: server_url is http://, so only clients started with TS_DEBUG_USE_DERP_HTTP=1 can use the embedded relay until TLS is configured");
        }
    }
    if settings.derp_map.regions.is_empty() {
        log::warn!("the DERP map is empty: clients register but official clients never reach Running without a relay (set list derp_path or enable the embedded DERP server)");
    }
    let store =
        store::Store::open(&cfg.db_path).map_err(|e| format!("cannot open database {}: {e}", cfg.db_path.display()))?;
    let st = state::State::load(store, settings).map_err(|e| e.to_string())?;
    let coord = server::Coordinator::new(st).map_err(|e| e.to_string())?;
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(crate::tls::Acceptor::from_pem_files(cert, key)?),
        None => None,
    };
    if tls.is_none() && cfg.server_url.starts_with("https://") {
        log::info!("server_url is https:// but tls_cert_path is unset: expecting a TLS-terminating proxy in front");
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen_addr))?;
    log::info!(
        "coordinator listening addr={} tls={} url={} db={} admin={}",
        cfg.listen_addr,
        tls.is_some(),
        cfg.server_url,
        cfg.db_path.display(),
        cfg.unix_socket.display()
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
            std::sync::Arc::new(move |k: &crate::keys::NodePublic| {
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
    let stun = async {
        match stun_sock {
            Some(u) => crate::stun::serve_udp(u, Default::default()).await,
            None => std::future::pending().await,
        }
    };
    let admin_path: &Path = &cfg.unix_socket;
    tokio::select! {
        _ = server::serve_http(coord.clone(), listener, tls) => Ok(()),
        r = admin::serve_admin(coord.clone(), admin_path) => r.map_err(|e| format!("admin socket {}: {e}", admin_path.display())),
        _ = coord.clone().housekeeping() => Ok(()),
        r = stun => r.map_err(|e| format!("STUN socket {}: {e}", cfg.derp.server_stun_listen_addr)),
        _ = crate::shutdown_signal() => {
            let _ = std::fs::remove_file(admin_path);
            log::info!("coordinator stopped");
            Ok(())
        }
    }
}
