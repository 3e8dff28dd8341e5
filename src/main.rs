//! Multi-call entry point: `tinyscale <verb>`; through symlinks, `headscale <verb>` (behaves as
//! `tinyscale server <verb>`), `tailscale <verb>` (the client verbs) and `tailscaled` (behaves as
//! `tinyscale daemon`). Go-style flags are rewritten for argh first (`cli::argv`).
//! Exit codes: 0 ok, 1 runtime, 2 usage, 3 invalid config.

use std::{path::PathBuf, process::ExitCode};

use argh::FromArgs;
#[cfg(feature = "coordinator")]
use tinyscale::cli::ServerCmd;
use tinyscale::{
    cli::{self, argv, Cmd, Top},
    error::Failure,
};

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the runtime: {e}")))
}

fn run(top: Top) -> Result<(), Failure> {
    match top.cmd {
        Cmd::Version(_) => {
            println!("tinyscale {}", tinyscale::VERSION);
            println!(
                "  capability version {}",
                tinyscale::wire::tailcfg::CURRENT_CAPABILITY_VERSION
            );
            println!("  features: {}", tinyscale::FEATURES.join(" "));
            Ok(())
        }
        Cmd::Daemon(d) => {
            // With --config the section gives the defaults and the prefs applied at start
            // (procd runs it so); flags beside it win.
            let (cfg, initial) = match &d.config {
                Some(path) => {
                    tinyscale::platform::logger::init(log::LevelFilter::Info);
                    let cfg = cli::load_client_config(path)?;
                    tinyscale::platform::logger::init(cfg.log_level.to_level_filter());
                    let initial = cli::client_up_args(&cfg)?;
                    (cfg, Some(initial))
                }
                None => {
                    tinyscale::platform::logger::init(log::LevelFilter::Info);
                    (tinyscale::platform::uci::client::ClientConfig::default(), None)
                }
            };
            let dir = d.state_dir.unwrap_or(cfg.state_dir);
            let sock = d
                .socket
                .unwrap_or_else(|| PathBuf::from(tinyscale::platform::ipc::DEFAULT_SOCKET));
            let ubus = match d.ubus_socket.as_str() {
                "none" => None,
                p => Some(PathBuf::from(p)),
            };
            let tun = d.tun.unwrap_or(cfg.tun);
            let engine = match tun.as_str() {
                "none" => None,
                name => Some(tinyscale::dataplane::engine::EngineConfig {
                    tun: name.to_string(),
                    port: d.port.unwrap_or(cfg.port),
                }),
            };
            let metrics = tinyscale::platform::metrics::daemon_listen(d.metrics_listen.as_deref(), cfg.metrics_listen)
                .map_err(Failure::usage)?;
            runtime()?
                .block_on(tinyscale::daemon::run(
                    &dir, &sock, engine, initial, ubus, d.config, metrics,
                ))
                .map_err(Failure::runtime)
        }
        Cmd::Stun(s) => stun(s),
        Cmd::Derp(d) => derp(d),
        Cmd::Server(s) => server(s),
        other => {
            tinyscale::platform::logger::init(log::LevelFilter::Warn);
            runtime()?.block_on(cli::run_client(other))
        }
    }
}

#[cfg(feature = "relay")]
fn stun(s: cli::Stun) -> Result<(), Failure> {
    tinyscale::platform::logger::init(log::LevelFilter::Info);
    let addr = s.listen.unwrap_or_else(|| "0.0.0.0:3478".into());
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| Failure::usage(format!("--listen {addr:?} is not an ip:port")))?;
    runtime()?.block_on(async {
        let sock = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(|e| Failure::runtime(format!("cannot bind {addr}: {e}")))?;
        log::info!("stun server listening addr={addr}");
        tokio::select! {
            _ = tinyscale::wire::stun::serve_udp(sock, Default::default()) => Ok(()),
            _ = tinyscale::shutdown_signal() => Ok(()),
        }
    })
}

#[cfg(feature = "relay")]
fn derp(d: cli::DerpCmd) -> Result<(), Failure> {
    tinyscale::platform::logger::init(log::LevelFilter::Info);
    // A fresh key per start: clients learn it from the ServerKey frame; DERP maps do not pin it.
    let mut b = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    let key = tinyscale::wire::keys::NodePrivate::from_random(b);
    let tls = match (&d.tls_cert, &d.tls_key) {
        (Some(c), Some(k)) => Some(tinyscale::platform::tls::Acceptor::from_pem_files(c, k).map_err(Failure::config)?),
        (None, None) => None,
        _ => return Err(Failure::usage("--tls-cert and --tls-key go together")),
    };
    let limits = tinyscale::platform::connlimit::ListenLimits {
        max_connections: d.max_connections,
        max_connections_per_ip: d.max_connections_per_ip,
        ..Default::default()
    };
    runtime()?.block_on(async {
        tokio::select! {
            r = tinyscale::derp::server::run_standalone(d.listen, key, d.stun, tls, limits) => r.map_err(|e| Failure::runtime(e.to_string())),
            _ = tinyscale::shutdown_signal() => Ok(()),
        }
    })
}

#[cfg(not(feature = "relay"))]
fn derp(_: cli::DerpCmd) -> Result<(), Failure> {
    Err(Failure::usage(
        "this build has no DERP relay (built without the relay feature)",
    ))
}

#[cfg(not(feature = "relay"))]
fn stun(_: cli::Stun) -> Result<(), Failure> {
    Err(Failure::usage(
        "this build has no STUN server (built without the relay feature)",
    ))
}

#[cfg(feature = "coordinator")]
fn server(s: cli::Server) -> Result<(), Failure> {
    use tinyscale::coordinator::admin::AdminTarget;
    if let Some(url) = s.remote {
        if matches!(s.cmd, ServerCmd::Serve(_)) {
            return Err(Failure::usage("--remote runs admin verbs; serve runs here"));
        }
        let key = s
            .api_key
            .or_else(|| std::env::var("TINYSCALE_API_KEY").ok())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Failure::usage("--remote needs --api-key KEY (or TINYSCALE_API_KEY)"))?;
        tinyscale::platform::logger::init(log::LevelFilter::Warn);
        return runtime()?.block_on(cli::run_admin(&AdminTarget::Remote { url, key }, s.cmd));
    }
    let path = s.config.unwrap_or_else(|| {
        std::env::var_os("TINYSCALE_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(tinyscale::platform::uci::DEFAULT_CONFIG_PATH))
    });
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        // No config file: headscale-like defaults, as documented.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && matches!(s.cmd, ServerCmd::Serve(_)) => {
            eprintln!("note: {} not found, using defaults", path.display());
            String::new()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Failure::config(format!("cannot read {}: {e}", path.display()))),
    };
    let overrides = match &s.cmd {
        ServerCmd::Serve(serve) => serve.uci_overrides(),
        _ => Vec::new(),
    };
    let cfg = tinyscale::platform::uci::parse(&text)
        .and_then(|f| tinyscale::platform::uci::server::ServerConfig::from_uci_with(&f, &overrides))
        .map_err(|e| match e.line() {
            // A value from a flag: no file line to point at.
            0 => Failure::config(format!(
                "command line: {}",
                e.to_string().trim_start_matches("line 0: ")
            )),
            _ => Failure::config(format!("{}: {e}", path.display())),
        })?;
    match s.cmd {
        ServerCmd::Serve(sv) => {
            tinyscale::platform::logger::init(cfg.log_level.to_level_filter());
            let ubus = (sv.ubus_socket != "none").then(|| PathBuf::from(sv.ubus_socket));
            runtime()?
                .block_on(tinyscale::coordinator::run(&cfg, ubus))
                .map_err(Failure::runtime)
        }
        cmd => {
            tinyscale::platform::logger::init(log::LevelFilter::Warn);
            runtime()?.block_on(cli::run_admin(&AdminTarget::Socket(cfg.unix_socket.clone()), cmd))
        }
    }
}

#[cfg(not(feature = "coordinator"))]
fn server(_: cli::Server) -> Result<(), Failure> {
    Err(Failure::usage(
        "this build has no coordinator (built without the coordinator feature)",
    ))
}

/// The verbs that keep running and serve others (daemon, coordinator, relay, STUN).
fn is_service(cmd: &Cmd) -> bool {
    match cmd {
        Cmd::Daemon(_) | Cmd::Stun(_) | Cmd::Derp(_) => true,
        #[cfg(feature = "coordinator")]
        Cmd::Server(s) => matches!(s.cmd, ServerCmd::Serve(_)),
        _ => false,
    }
}

/// A one-shot verb piped into `head` ends quietly when the reader goes away, as C tools do,
/// instead of panicking in `println!`. Services keep Rust's ignored SIGPIPE: a client closing
/// its socket must not kill them.
fn quiet_broken_pipe() {
    // SAFETY: resetting a signal disposition to its default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let mut raw = std::env::args();
    let prog = raw.next().unwrap_or_default();
    let args: Vec<String> = argv::multi_call(&prog)
        .iter()
        .map(|v| v.to_string())
        .chain(raw)
        .collect();
    let usage_hint = |path: &[&str]| {
        let verbs: String = path.iter().map(|v| format!(" {v}")).collect();
        format!("Run `tinyscale{verbs} --help` for usage.")
    };
    let args = match argv::normalize(&args) {
        Ok(n) => n,
        Err(r) => {
            let verbs: String = r.path.iter().map(|v| format!(" {v}")).collect();
            eprintln!("tinyscale{verbs}: {}", r.error);
            eprintln!("{}", usage_hint(&r.path));
            return ExitCode::from(tinyscale::error::EXIT_USAGE);
        }
    };
    let strs: Vec<&str> = args.args.iter().map(String::as_str).collect();
    let top = match Top::from_args(&["tinyscale"], &strs) {
        Ok(t) => t,
        Err(early) => {
            return match early.status {
                Ok(()) => {
                    // `tinyscale --help | head` closes the pipe early: not an error, no panic.
                    use std::io::Write;
                    let _ = writeln!(std::io::stdout(), "{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    eprintln!("{}", early.output);
                    eprintln!("{}", usage_hint(&args.path));
                    ExitCode::from(tinyscale::error::EXIT_USAGE)
                }
            };
        }
    };
    if !is_service(&top.cmd) {
        quiet_broken_pipe();
    }
    match run(top) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("tinyscale: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
