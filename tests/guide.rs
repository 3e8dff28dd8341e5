//! A typical headscale + tailscale self-hosting guide, typed verbatim: `headscale …` through a
//! symlink named `headscale`, `tinyscale up` with Go-style `--flag=value` flags, and the client
//! daemon started through a symlink named `tailscaled` (`--tun=none`: control only, no root).
//! Everything runs on loopback; each step's effect is checked, not only its exit code.
//!
//! The only additions to the guide's lines: headscale's own `--config FILE` (a uci file in a
//! temporary directory) and `TINYSCALE_SOCKET` in the environment for the client commands.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

mod common;

use common::{free_port, Proc};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tinyscale");
const DEADLINE: Duration = Duration::from_secs(30);

fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    common::eventually(what, DEADLINE, f)
}

/// A temporary directory with the coordinator's config and the multi-call symlinks.
struct Guide {
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    url: String,
}

impl Guide {
    fn new(tag: &str) -> Guide {
        let dir = std::env::temp_dir().join(format!("tinyscale-test-guide-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["headscale", "tailscale", "tailscaled"] {
            std::os::unix::fs::symlink(BIN, dir.join(name)).unwrap();
        }
        let port = free_port();
        let config = dir.join("tinyscale.conf");
        std::fs::write(
            &config,
            format!(
                "config server 'main'\n\toption server_url 'http://127.0.0.1:{port}'\n\
                 \toption listen_addr '127.0.0.1:{port}'\n\toption db_path '{d}/db.sqlite'\n\
                 \toption unix_socket '{d}/admin.sock'\n\toption base_domain 'guide.test'\n",
                d = dir.display()
            ),
        )
        .unwrap();
        Guide {
            socket: dir.join("tinyscale.sock"),
            url: format!("http://127.0.0.1:{port}"),
            dir,
            config,
        }
    }

    /// One guide line as a command: words split as the shell would (double quotes removed),
    /// the program found in the temporary directory (`tinyscale` is the built binary).
    fn command(&self, line: &str) -> Command {
        let words: Vec<String> = line.split_whitespace().map(|w| w.replace('"', "")).collect();
        let prog: PathBuf = match words[0].as_str() {
            "tinyscale" => PathBuf::from(BIN),
            name => self.dir.join(name),
        };
        let mut cmd = Command::new(prog);
        cmd.args(&words[1..]);
        if words[0] == "headscale" {
            cmd.arg("--config").arg(&self.config);
        } else {
            cmd.env("TINYSCALE_SOCKET", &self.socket);
        }
        cmd
    }

    /// Runs a guide line to completion.
    fn run(&self, line: &str) -> Output {
        self.command(line).output().unwrap()
    }

    /// Runs a guide line that must succeed; returns its stdout.
    fn ok(&self, line: &str) -> String {
        let out = self.run(line);
        assert!(
            out.status.success(),
            "`{line}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn json(&self, line: &str) -> Value {
        serde_json::from_str(&self.ok(line)).unwrap_or_else(|e| panic!("`{line}`: {e}"))
    }
}

impl Drop for Guide {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The table rows (whitespace-separated cells) of a list command's output, header skipped.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn headscale_guide_runs_verbatim() {
    let g = Guide::new("steps");

    // headscale serve (in the background), ready once its admin socket answers.
    let serve = Proc::spawn(g.command("headscale serve"));
    eventually("coordinator admin socket", || {
        g.run("headscale users list").status.success().then_some(())
    });

    // headscale namespaces create default
    let out = g.ok("headscale namespaces create default");
    assert!(out.contains("default"), "{out}");
    // headscale namespaces list
    let users = rows(&g.ok("headscale namespaces list"));
    assert!(
        users.iter().any(|r| r.get(1).map(String::as_str) == Some("default")),
        "{users:?}"
    );
    // headscale user create default: the user exists, and headscale refuses a second one too.
    let out = g.run("headscale user create default");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    // headscale user list: still the one user.
    let users = rows(&g.ok("headscale user list"));
    assert_eq!(users.len(), 1, "{users:?}");
    assert_eq!(users[0][1], "default", "{users:?}");

    // The client daemon, started by its tailscale name with Go-style flags.
    let state = g.dir.join("state");
    let daemon = Proc::spawn(g.command(&format!(
        "tailscaled --tun=none --statedir={} --socket={}",
        state.display(),
        g.socket.display()
    )));
    eventually("daemon socket", || {
        g.run("tailscale status --json").status.success().then_some(())
    });

    // tinyscale up … prints the register URL and waits for the admin.
    let up_line = format!(
        "tinyscale up --login-server={} --accept-routes=true --accept-dns=false --advertise-routes=192.168.188.0/24",
        g.url
    );
    let mut up = Proc::spawn(g.command(&up_line));
    let prefix = format!("{}/register/", g.url);
    let key = eventually("register URL printed by up", || {
        up.log()
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()).map(str::to_string))
    });
    assert!(!key.is_empty(), "{}", up.log());

    // headscale nodes register --user default --key <key from the URL>
    let out = g.ok(&format!("headscale nodes register --user default --key {key}"));
    assert!(out.contains("registered"), "{out}");
    let status = eventually("up to return", || up.child.try_wait().unwrap());
    assert!(status.success(), "up failed: {}", up.log());
    // The flags reached the daemon's prefs, `=false` included.
    let st = g.json("tailscale status --json");
    assert_eq!(st["BackendState"], "Running", "{st}");
    assert_eq!(st["Prefs"]["login_server"], g.url.as_str(), "{st}");
    assert_eq!(st["Prefs"]["accept_routes"], true, "{st}");
    assert_eq!(st["Prefs"]["accept_dns"], false, "{st}");
    assert_eq!(
        st["Prefs"]["advertise_routes"],
        serde_json::json!(["192.168.188.0/24"]),
        "{st}"
    );

    // headscale nodes list: node 1, owned by default.
    let nodes = rows(&g.ok("headscale nodes list"));
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0][0], "1", "{nodes:?}");
    assert_eq!(nodes[0][2], "default", "{nodes:?}");

    // The advertised route arrives with the client's Hostinfo; headscale lists it, not enabled.
    eventually("route advertised", || {
        let r = g.json("headscale routes list -o json");
        r.as_array()?
            .iter()
            .any(|r| r["prefix"] == "192.168.188.0/24" && r["advertised"] == true && r["enabled"] == false)
            .then_some(())
    });
    // headscale routes enable -i 1 -r "192.168.188.0/24"
    g.ok("headscale routes enable -i 1 -r \"192.168.188.0/24\"");
    // headscale routes list: enabled now.
    let routes = rows(&g.ok("headscale routes list"));
    let row = routes
        .iter()
        .find(|r| r.get(2).map(String::as_str) == Some("192.168.188.0/24"))
        .unwrap_or_else(|| panic!("{routes:?}"));
    assert_eq!(row[0], "1", "{routes:?}");
    assert_eq!(row[3], "true", "advertised: {routes:?}");
    assert_eq!(row[4], "true", "enabled: {routes:?}");

    // headscale nodes delete -i 1
    g.ok("headscale nodes delete -i 1");
    let nodes = g.json("headscale nodes list -o json");
    assert_eq!(nodes, serde_json::json!([]), "{nodes}");
    assert!(rows(&g.ok("headscale routes list")).is_empty());

    drop(up);
    drop(daemon);
    drop(serve);
}

/// The wrong spellings still fail as usage errors that name the flag.
#[test]
fn guide_typos_name_the_flag() {
    let g = Guide::new("typos");
    for (line, needle) in [
        ("tinyscale up --login-server", "--login-server needs a value"),
        ("tinyscale up --accept-routes=yes", "--accept-routes"),
        ("tinyscale up --acept-routes", "unknown flag --acept-routes"),
        ("headscale nodes register --usr=default", "unknown flag --usr"),
        ("tailscale up --login-sever=http://x", "unknown flag --login-sever"),
    ] {
        let out = g.run(line);
        assert_eq!(out.status.code(), Some(2), "`{line}`: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "`{line}`: {err}");
        assert!(err.contains("--help"), "`{line}`: {err}");
    }
    assert!(Path::new(BIN).exists());
}

/// `tinyscale --help | head -1`: the reader closes the pipe before the help is written. That is
/// no error: exit 0, no panic message.
#[test]
fn help_into_a_closed_pipe_is_not_a_panic() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two new descriptors; each is wrapped in an OwnedFd exactly once.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read); // the reader is gone before anything is written
    for args in [&["--help"][..], &["up", "--help"][..]] {
        let out = std::process::Command::new(BIN)
            .args(args)
            .stdout(std::process::Stdio::from(write.try_clone().unwrap()))
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// `tinyscale version` into a closed pipe (`| head -c0`): a one-shot verb ends quietly on
/// SIGPIPE, as C tools do, instead of panicking in the middle of its output.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::{
        fd::{FromRawFd, OwnedFd},
        unix::process::ExitStatusExt,
    };
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two new descriptors; each is wrapped in an OwnedFd exactly once.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let out = std::process::Command::new(BIN)
        .arg("version")
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?} {err}", out.status);
}
