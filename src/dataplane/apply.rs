//! [shell] Applies the commands [`crate::dataplane::routes`] plans: [`Router`] keeps the applied
//! state, runs each op through a [`CommandRunner`] and records it as applied only when the
//! command succeeded, so `set` is idempotent (setting the same config twice runs nothing the
//! second time) and a `set` after a partial failure retries only what is missing. It also
//! switches IP forwarding (keeping the values found in a file, so a restart after a crash
//! restores them) and removes what a crashed run left ([`Router::recover`]).
//! [`SystemRunner`] spawns the real `ip` and `nft`; [`RecordingRunner`] records argv lists for
//! tests (Go's `router_fake.go` / `util/linuxfw/fake.go` play that role upstream).

use std::process::Command;

use crate::{dataplane::routes::*, wire::prefix::Prefix};

/// Runs one external command. Implementations: [`SystemRunner`], [`RecordingRunner`].
pub trait CommandRunner {
    /// Runs `argv` (`argv[0]` is the program) and returns its stdout, or an error carrying
    /// stderr when it exits non-zero.
    fn run(&mut self, argv: &[String]) -> Result<String, RouterError>;
    /// [`CommandRunner::run`] with `input` on stdin.
    fn run_input(&mut self, argv: &[String], input: &str) -> Result<String, RouterError>;
    /// Reads a (sysctl) file.
    fn read_file(&mut self, path: &str) -> Result<String, RouterError>;
    /// Writes a (sysctl) file.
    fn write_file(&mut self, path: &str, data: &str) -> Result<(), RouterError>;
    /// Removes a file; a missing one is fine.
    fn remove_file(&mut self, path: &str);
}

impl<T: CommandRunner> CommandRunner for &mut T {
    fn run(&mut self, argv: &[String]) -> Result<String, RouterError> {
        (**self).run(argv)
    }
    fn run_input(&mut self, argv: &[String], input: &str) -> Result<String, RouterError> {
        (**self).run_input(argv, input)
    }
    fn read_file(&mut self, path: &str) -> Result<String, RouterError> {
        (**self).read_file(path)
    }
    fn write_file(&mut self, path: &str, data: &str) -> Result<(), RouterError> {
        (**self).write_file(path, data)
    }
    fn remove_file(&mut self, path: &str) {
        (**self).remove_file(path)
    }
}

/// Runs commands with `std::process::Command` (blocking; `ip` returns in milliseconds).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRunner;

impl CommandRunner for SystemRunner {
    fn run(&mut self, argv: &[String]) -> Result<String, RouterError> {
        self.run_input(argv, "")
    }

    fn run_input(&mut self, argv: &[String], input: &str) -> Result<String, RouterError> {
        use std::io::Write;
        let cmd = argv.join(" ");
        let (prog, args) = argv.split_first().ok_or_else(|| RouterError::Failed {
            cmd: String::new(),
            status: "not run".into(),
            stderr: "empty command".into(),
        })?;
        let spawn_err = |err| RouterError::Spawn { cmd: cmd.clone(), err };
        let mut child = Command::new(prog)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A program that exits without reading its input is judged by its status below.
            let _ = stdin.write_all(input.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(RouterError::Failed {
                cmd,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    fn read_file(&mut self, path: &str) -> Result<String, RouterError> {
        std::fs::read_to_string(path).map_err(|err| RouterError::File { path: path.into(), err })
    }

    /// Sysctls are written in place; any other file (the saved forwarding values) atomically,
    /// so a crash mid-write never leaves a torn file for [`Router::recover`] to misread.
    fn write_file(&mut self, path: &str, data: &str) -> Result<(), RouterError> {
        let r = if path.starts_with("/proc/") {
            std::fs::write(path, data)
        } else {
            crate::daemon::write_private_file(std::path::Path::new(path), data.as_bytes())
        };
        r.map_err(|err| RouterError::File { path: path.into(), err })
    }

    fn remove_file(&mut self, path: &str) {
        let _ = std::fs::remove_file(path);
    }
}

/// Test runner: records every argv, answers from `outputs` (by the joined command line) or
/// `Ok("")`, and fails commands that contain `fail_on` as one argument (to exercise partial
/// failures). Files live in `files`; writes are recorded as `write PATH DATA` calls, stdin as
/// a `<<< INPUT` call after its command.
#[derive(Debug, Default, Clone)]
pub struct RecordingRunner {
    /// Every command run, in order.
    pub calls: Vec<Vec<String>>,
    /// If set, any command with this exact argument fails.
    pub fail_on: Option<String>,
    /// Canned stdout per command line.
    pub outputs: std::collections::HashMap<String, String>,
    /// The file system as the runner sees it.
    pub files: std::collections::BTreeMap<String, String>,
}

impl CommandRunner for RecordingRunner {
    fn run(&mut self, argv: &[String]) -> Result<String, RouterError> {
        self.calls.push(argv.to_vec());
        match &self.fail_on {
            Some(f) if argv.iter().any(|a| a == f) => Err(RouterError::Failed {
                cmd: argv.join(" "),
                status: "exit status: 2".into(),
                stderr: "RTNETLINK answers: injected failure".into(),
            }),
            _ => Ok(self.outputs.get(&argv.join(" ")).cloned().unwrap_or_default()),
        }
    }

    fn run_input(&mut self, argv: &[String], input: &str) -> Result<String, RouterError> {
        let r = self.run(argv);
        self.calls.push(vec!["<<<".into(), input.into()]);
        r
    }

    fn read_file(&mut self, path: &str) -> Result<String, RouterError> {
        self.files.get(path).cloned().ok_or_else(|| RouterError::File {
            path: path.into(),
            err: std::io::ErrorKind::NotFound.into(),
        })
    }

    fn write_file(&mut self, path: &str, data: &str) -> Result<(), RouterError> {
        self.calls
            .push(vec!["write".into(), path.into(), data.trim_end().into()]);
        self.files.insert(path.into(), data.into());
        Ok(())
    }

    fn remove_file(&mut self, path: &str) {
        self.files.remove(path);
    }
}

/// Applies [`RouterConfig`]s through a [`CommandRunner`], remembering what it applied.
#[derive(Debug)]
pub struct Router<R: CommandRunner> {
    runner: R,
    applied: Applied,
    /// Forwarding sysctl values found before we switched them on (IPv4, IPv6).
    saved_forward: [Option<String>; 2],
    /// Where the saved values are kept across a crash (`forwarding.saved` in the state dir).
    saved_path: Option<String>,
}

impl<R: CommandRunner> Router<R> {
    /// A router that has applied nothing yet.
    pub fn new(runner: R) -> Router<R> {
        Router {
            runner,
            applied: Applied::default(),
            saved_forward: [None, None],
            saved_path: None,
        }
    }

    /// Keeps the forwarding values found in `path`, so that [`Router::recover`] after a crash
    /// restores them.
    pub fn set_saved_path(&mut self, path: &str) {
        self.saved_path = Some(path.to_string());
    }

    /// Removes what a previous run may have left behind after a crash: our nftables table,
    /// our policy rules, routing table 53, and forwarding switched on by us (restored from the
    /// saved file). Quiet and best effort: on a clean system every step finds nothing.
    pub fn recover(&mut self) {
        if let Some(path) = self.saved_path.clone() {
            if let Ok(saved) = self.runner.read_file(&path) {
                for line in saved.lines() {
                    if let Some((k, v)) = line.split_once('=') {
                        if FORWARD_SYSCTLS.contains(&k) {
                            match self.runner.write_file(k, &format!("{}\n", v.trim())) {
                                Ok(()) => log::info!("router: restored {k}={} left by an earlier run", v.trim()),
                                Err(e) => log::warn!("router: cannot restore {k}: {e}"),
                            }
                        }
                    }
                }
                self.runner.remove_file(&path);
            }
        }
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        if self
            .runner
            .run(&argv(&["nft", "delete", "table", "inet", NFT_TABLE]))
            .is_ok()
        {
            log::info!("router: removed nftables table inet {NFT_TABLE} left by an earlier run");
        }
        for v6 in [false, true] {
            for prio in RULES {
                // One rule per run at most; a few more in case of repeated crashes.
                for _ in 0..4 {
                    if self.runner.run(&Op::RuleDel { v6, priority: prio }.argv()).is_err() {
                        break;
                    }
                }
            }
            let _ = self.runner.run(&argv(&[
                "ip",
                fam(v6),
                "route",
                "flush",
                "table",
                &ROUTE_TABLE.to_string(),
            ]));
        }
    }

    /// Brings the system to `cfg`, running only the commands needed. Idempotent. Stops at the
    /// first failing command; what succeeded before it stays recorded, so the next `set`
    /// retries only the rest.
    pub fn set(&mut self, cfg: &RouterConfig) -> Result<(), RouterError> {
        let connected = if cfg.accepted_routes.is_empty() && cfg.exit_node.is_none() {
            Vec::new()
        } else {
            self.connected(&cfg.tun)
        };
        let want = Applied::with_connected(cfg, &connected)?;
        for op in plan(&self.applied, &want) {
            self.exec(&op)?;
            op.record(&mut self.applied);
        }
        Ok(())
    }

    /// Removes every route and address this router added (on `down` and at exit). Best effort:
    /// runs every removal and returns the first error. Afterwards the router has nothing
    /// applied, so a later `set` starts from scratch.
    pub fn close(&mut self) -> Result<(), RouterError> {
        let mut first_err = None;
        for op in plan(&self.applied, &Applied::default()) {
            if let Err(e) = self.exec(&op) {
                log::warn!("router: cleanup op={:?} failed: {e}", op.argv().join(" "));
                first_err.get_or_insert(e);
            }
        }
        self.applied = Applied::default();
        first_err.map_or(Ok(()), Err)
    }

    /// The host's connected prefixes (see [`parse_connected`]); none if `ip` cannot tell.
    pub fn connected_prefixes(&mut self, tun: &str) -> Vec<Prefix> {
        self.connected(tun)
    }

    fn connected(&mut self, tun: &str) -> Vec<Prefix> {
        let mut v = Vec::new();
        for f in ["-4", "-6"] {
            let argv: Vec<String> = ["ip", "-o", f, "route", "show", "table", "main"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            match self.runner.run(&argv) {
                Ok(out) => v.extend(parse_connected(&out, tun)),
                Err(e) => log::warn!("router: cannot list connected routes: {e}"),
            }
        }
        v
    }

    fn exec(&mut self, op: &Op) -> Result<(), RouterError> {
        match op {
            Op::NftSet { tun } => self
                .runner
                .run_input(&op.argv(), &nft_script(tun))
                .map(drop)
                .map_err(nft_hint),
            Op::NftDel => match self.runner.run(&op.argv()) {
                // Already gone (deleted by hand, or by `nft flush ruleset`): the goal is reached.
                Err(RouterError::Failed { stderr, .. }) if stderr.contains("No such file") => Ok(()),
                r => r.map(drop),
            },
            Op::Forward { v6, on } => self.forward(*v6, *on),
            _ => self.runner.run(&op.argv()).map(drop),
        }
    }

    fn forward(&mut self, v6: bool, on: bool) -> Result<(), RouterError> {
        let i = usize::from(v6);
        let path = FORWARD_SYSCTLS[i];
        if on {
            let found = self.runner.read_file(path)?.trim().to_string();
            if found != "1" {
                self.saved_forward[i] = Some(found);
                self.persist_saved();
                self.runner.write_file(path, "1\n")?;
                log::info!("router: forwarding on ({path}=1)");
            }
        } else if let Some(v) = self.saved_forward[i].take() {
            self.runner.write_file(path, &format!("{v}\n"))?;
            log::info!("router: forwarding restored ({path}={v})");
            self.persist_saved();
        }
        Ok(())
    }

    fn persist_saved(&mut self) {
        let Some(p) = self.saved_path.clone() else { return };
        let body: String = self
            .saved_forward
            .iter()
            .zip(FORWARD_SYSCTLS)
            .filter_map(|(v, k)| v.as_ref().map(|v| format!("{k}={v}\n")))
            .collect();
        if body.is_empty() {
            self.runner.remove_file(&p);
        } else if let Err(e) = self.runner.write_file(&p, &body) {
            log::warn!("router: cannot keep the forwarding values found: {e}");
        }
    }

    /// What is currently applied.
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// The runner (tests read a [`RecordingRunner`]'s calls through this).
    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// Mutable access to the runner (tests clear recorded calls or inject failures).
    pub fn runner_mut(&mut self) -> &mut R {
        &mut self.runner
    }
}

impl<R: CommandRunner> Drop for Router<R> {
    /// A router dropped with state applied (the data plane's task aborted on `down`) cleans up
    /// like [`Router::close`]: the TUN's own routes go with the device, but rules, the nftables
    /// table and sysctls would not.
    fn drop(&mut self) {
        if !self.applied.is_empty() {
            let _ = self.close();
        }
    }
}

/// Names the missing piece when nftables cannot build our table.
fn nft_hint(e: RouterError) -> RouterError {
    match e {
        RouterError::Spawn { cmd, err } if err.kind() == std::io::ErrorKind::NotFound => RouterError::Failed {
            cmd,
            status: "not run".into(),
            stderr: "nft not found: subnet routing with SNAT needs nftables (Debian: nftables; OpenWrt: nftables, part of fw4)".into(),
        },
        RouterError::Failed { cmd, status, stderr } if stderr.contains("No such file") || stderr.contains("not supported") => {
            RouterError::Failed {
                cmd,
                status,
                stderr: format!(
                    "{stderr} (the kernel lacks nftables NAT or mark support: modules nf_tables, nft_nat, nft_masq, nft_chain_nat; OpenWrt: kmod-nft-nat)"
                ),
            }
        }
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    use crate::wire::prefix::CGNAT_RANGE;

    /// The saved forwarding values replace the old file whole (temp file + rename, as the
    /// state file): no temp file is left, the content is the new one, the mode the state's.
    #[test]
    fn system_runner_replaces_saved_files_whole() {
        let dir = std::env::temp_dir().join(format!("tinyscale-router-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("forwarding.saved");
        let p = path.to_str().unwrap();
        let mut r = SystemRunner;
        r.write_file(p, "a=0\n").unwrap();
        r.write_file(p, "b=1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "b=1\n");
        // Written through the state file's writer (temp file, fsync, rename): mode 0600.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["forwarding.saved"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cfg() -> RouterConfig {
        RouterConfig::new(
            "tinyscale0",
            vec![pl(ip("100.64.0.1"), 32), pl(ip("fd7a:115c:a1e0::1"), 128)],
        )
    }

    fn calls(r: &Router<RecordingRunner>) -> Vec<String> {
        r.runner().calls.iter().map(|c| c.join(" ")).collect()
    }

    #[test]
    fn first_set_runs_exact_commands() {
        let mut r = Router::new(RecordingRunner::default());
        r.set(&cfg()).unwrap();
        assert_eq!(
            calls(&r),
            [
                "ip link set dev tinyscale0 mtu 1280 up",
                "ip -4 addr replace 100.64.0.1/32 dev tinyscale0",
                "ip -6 addr replace fd7a:115c:a1e0::1/128 dev tinyscale0",
                "ip -4 route replace 100.64.0.0/10 dev tinyscale0",
                "ip -6 route replace fd7a:115c:a1e0::/48 dev tinyscale0",
            ]
        );
    }

    #[test]
    fn same_config_twice_runs_nothing() {
        let mut r = Router::new(RecordingRunner::default());
        r.set(&cfg()).unwrap();
        r.runner_mut().calls.clear();
        r.set(&cfg()).unwrap();
        assert!(r.runner().calls.is_empty());
    }

    #[test]
    fn diff_adds_and_removes_only_changes() {
        let mut r = Router::new(RecordingRunner::default());
        let mut c = cfg();
        c.routes.push(pl(ip("10.0.0.0"), 24));
        r.set(&c).unwrap();
        r.runner_mut().calls.clear();

        let mut c2 = cfg();
        c2.addresses = vec![pl(ip("100.64.0.2"), 32), pl(ip("fd7a:115c:a1e0::1"), 128)];
        c2.routes.push(pl(ip("192.168.5.77"), 24)); // host bits are masked
        c2.mtu = 1400;
        r.set(&c2).unwrap();
        assert_eq!(
            calls(&r),
            [
                "ip -4 route del 10.0.0.0/24 dev tinyscale0",
                "ip -4 addr del 100.64.0.1/32 dev tinyscale0",
                "ip link set dev tinyscale0 mtu 1400 up",
                "ip -4 addr replace 100.64.0.2/32 dev tinyscale0",
                "ip -4 route replace 192.168.5.0/24 dev tinyscale0",
            ]
        );
    }

    #[test]
    fn close_removes_what_was_added() {
        let mut r = Router::new(RecordingRunner::default());
        r.set(&cfg()).unwrap();
        r.runner_mut().calls.clear();
        r.close().unwrap();
        assert_eq!(
            calls(&r),
            [
                "ip -4 route del 100.64.0.0/10 dev tinyscale0",
                "ip -6 route del fd7a:115c:a1e0::/48 dev tinyscale0",
                "ip -4 addr del 100.64.0.1/32 dev tinyscale0",
                "ip -6 addr del fd7a:115c:a1e0::1/128 dev tinyscale0",
            ]
        );
        assert_eq!(r.applied(), &Applied::default());
        // Closing twice is a no-op.
        r.runner_mut().calls.clear();
        r.close().unwrap();
        assert!(r.runner().calls.is_empty());
    }

    #[test]
    fn partial_failure_retries_only_the_rest() {
        let mut r = Router::new(RecordingRunner {
            fail_on: Some("fd7a:115c:a1e0::1/128".into()),
            ..Default::default()
        });
        let err = r.set(&cfg()).unwrap_err();
        assert!(err.is_retryable());
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert_eq!(r.runner().calls.len(), 3);
        r.runner_mut().fail_on = None;
        r.runner_mut().calls.clear();
        r.set(&cfg()).unwrap();
        assert_eq!(
            calls(&r),
            [
                "ip -6 addr replace fd7a:115c:a1e0::1/128 dev tinyscale0",
                "ip -4 route replace 100.64.0.0/10 dev tinyscale0",
                "ip -6 route replace fd7a:115c:a1e0::/48 dev tinyscale0",
            ]
        );
    }

    #[test]
    fn rename_moves_everything() {
        let mut r = Router::new(RecordingRunner::default());
        let mut c = cfg();
        c.routes.truncate(1);
        c.addresses.truncate(1);
        r.set(&c).unwrap();
        r.runner_mut().calls.clear();
        c.tun = "ts1".into();
        r.set(&c).unwrap();
        assert_eq!(
            calls(&r),
            [
                "ip -4 route del 100.64.0.0/10 dev tinyscale0",
                "ip -4 addr del 100.64.0.1/32 dev tinyscale0",
                "ip link set dev ts1 mtu 1280 up",
                "ip -4 addr replace 100.64.0.1/32 dev ts1",
                "ip -4 route replace 100.64.0.0/10 dev ts1",
            ]
        );
        assert_eq!(r.applied().tun, "ts1");
    }

    #[test]
    fn duplicates_collapse_and_bad_prefix_rejected() {
        let mut r = Router::new(RecordingRunner::default());
        let mut c = cfg();
        c.routes.push(CGNAT_RANGE);
        c.routes.push(pl(ip("100.64.1.1"), 10)); // same /10 once masked
        r.set(&c).unwrap();
        assert_eq!(r.runner().calls.len(), 5);
        // A length beyond the family's width never makes it into a config.
        assert_eq!(Prefix::new(ip("10.0.0.0"), 33), None);
    }

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    /// `a/l`, host bits kept (as an address is).
    fn pl(a: IpAddr, l: u8) -> Prefix {
        Prefix::new(a, l).unwrap()
    }

    #[test]
    fn connected_prefixes_from_ip_route_output() {
        let v4 = "default via 10.0.0.1 dev eth0 proto dhcp src 10.0.0.2 metric 100\n\
                  10.0.0.0/24 dev eth0 proto kernel scope link src 10.0.0.2\n\
                  100.64.0.0/10 dev tinyscale0 scope link\n\
                  169.254.0.0/16 dev eth0 scope link metric 1000\n\
                  192.168.50.0/24 dev br-lan proto kernel scope link src 192.168.50.1\n\
                  172.16.0.0/12 via 10.0.0.9 dev eth0\n\
                  10.9.9.9 dev wg0 scope link\n";
        assert_eq!(
            parse_connected(v4, "tinyscale0"),
            [p("10.0.0.0/24"), p("10.9.9.9/32"), p("192.168.50.0/24")]
        );
        let v6 = "fd00:1::/64 dev br-lan proto kernel metric 256 pref medium\n\
                  fe80::/64 dev br-lan proto kernel metric 256 pref medium\n\
                  default via fe80::1 dev eth0 proto ra metric 1024\n";
        assert_eq!(parse_connected(v6, "tinyscale0"), [p("fd00:1::/64")]);
    }

    #[test]
    fn accepted_routes_go_to_table_52_without_shadowing_the_lan() {
        let mut runner = RecordingRunner::default();
        runner.outputs.insert(
            "ip -o -4 route show table main".into(),
            "192.168.1.0/24 dev br-lan proto kernel scope link src 192.168.1.1\n".into(),
        );
        let mut r = Router::new(runner);
        let mut c = cfg();
        c.routes.truncate(1);
        c.addresses.truncate(1);
        // 192.168.0.0/16 covers the LAN: a throw keeps the LAN in main. 192.168.1.128/25 is
        // inside the LAN: not installed. 10.1.0.0/16 and fd00:5::/64 are plain.
        c.accepted_routes = vec![
            pl(ip("192.168.0.0"), 16),
            pl(ip("192.168.1.128"), 25),
            pl(ip("10.1.0.0"), 16),
            pl(ip("fd00:5::"), 64),
        ];
        r.set(&c).unwrap();
        assert_eq!(
            calls(&r),
            [
                "ip -o -4 route show table main",
                "ip -o -6 route show table main",
                "ip link set dev tinyscale0 mtu 1280 up",
                "ip -4 addr replace 100.64.0.1/32 dev tinyscale0",
                "ip -4 route replace 100.64.0.0/10 dev tinyscale0",
                "ip -4 route replace throw 192.168.1.0/24 table 53",
                "ip -4 route replace 10.1.0.0/16 dev tinyscale0 table 53",
                "ip -4 route replace 192.168.0.0/16 dev tinyscale0 table 53",
                "ip -6 route replace fd00:5::/64 dev tinyscale0 table 53",
                "ip -4 rule add priority 5211 fwmark 0x80000/0xff0000 table main",
                "ip -4 rule add priority 5251 fwmark 0x80000/0xff0000 type unreachable",
                "ip -4 rule add priority 5271 table 53",
                "ip -6 rule add priority 5211 fwmark 0x80000/0xff0000 table main",
                "ip -6 rule add priority 5251 fwmark 0x80000/0xff0000 type unreachable",
                "ip -6 rule add priority 5271 table 53",
            ]
        );
        // The route moves away (peer offline, approval revoked): everything of it goes.
        r.runner_mut().calls.clear();
        c.accepted_routes.clear();
        r.set(&c).unwrap();
        assert_eq!(
            calls(&r),
            [
                "ip -4 rule del priority 5271",
                "ip -4 rule del priority 5251",
                "ip -4 rule del priority 5211",
                "ip -6 rule del priority 5271",
                "ip -6 rule del priority 5251",
                "ip -6 rule del priority 5211",
                "ip -4 route del 10.1.0.0/16 dev tinyscale0 table 53",
                "ip -4 route del 192.168.0.0/16 dev tinyscale0 table 53",
                "ip -6 route del fd00:5::/64 dev tinyscale0 table 53",
                "ip -4 route del throw 192.168.1.0/24 table 53",
            ]
        );
    }

    /// A router with the LAN 192.168.1.0/24 (and fd00:1::/64) connected, for the exit node.
    fn lan_router() -> Router<RecordingRunner> {
        let mut runner = RecordingRunner::default();
        runner.outputs.insert(
            "ip -o -4 route show table main".into(),
            "default via 192.168.1.254 dev br-lan\n192.168.1.0/24 dev br-lan proto kernel scope link src 192.168.1.1\n"
                .into(),
        );
        runner.outputs.insert(
            "ip -o -6 route show table main".into(),
            "fd00:1::/64 dev br-lan proto kernel metric 256 pref medium\n".into(),
        );
        let mut r = Router::new(runner);
        r.set(&cfg()).unwrap();
        r.runner_mut().calls.clear();
        r
    }

    /// The table-53 and rule commands among the calls (the route listings left out).
    fn table_calls(r: &Router<RecordingRunner>) -> Vec<String> {
        calls(r)
            .into_iter()
            .filter(|c| !c.contains("show table main"))
            .collect()
    }

    #[test]
    fn exit_node_routes_everything_and_the_lan_into_the_tunnel() {
        let mut r = lan_router();
        let mut c = cfg();
        c.exit_node = Some(ExitRoutes { allow_lan: false });
        r.set(&c).unwrap();
        assert_eq!(
            table_calls(&r),
            [
                "ip -4 route replace 0.0.0.0/0 dev tinyscale0 table 53",
                "ip -4 route replace 192.168.1.0/24 dev tinyscale0 table 53",
                "ip -6 route replace ::/0 dev tinyscale0 table 53",
                "ip -6 route replace fd00:1::/64 dev tinyscale0 table 53",
                "ip -4 rule add priority 5211 fwmark 0x80000/0xff0000 table main",
                "ip -4 rule add priority 5251 fwmark 0x80000/0xff0000 type unreachable",
                "ip -4 rule add priority 5271 table 53",
                "ip -6 rule add priority 5211 fwmark 0x80000/0xff0000 table main",
                "ip -6 rule add priority 5251 fwmark 0x80000/0xff0000 type unreachable",
                "ip -6 rule add priority 5271 table 53",
            ]
        );
        // Cleared: everything of it goes, the default routes before anything else in the table.
        r.runner_mut().calls.clear();
        c.exit_node = None;
        r.set(&c).unwrap();
        assert_eq!(
            calls(&r),
            [
                "ip -4 rule del priority 5271",
                "ip -4 rule del priority 5251",
                "ip -4 rule del priority 5211",
                "ip -6 rule del priority 5271",
                "ip -6 rule del priority 5251",
                "ip -6 rule del priority 5211",
                "ip -4 route del 0.0.0.0/0 dev tinyscale0 table 53",
                "ip -4 route del 192.168.1.0/24 dev tinyscale0 table 53",
                "ip -6 route del ::/0 dev tinyscale0 table 53",
                "ip -6 route del fd00:1::/64 dev tinyscale0 table 53",
            ]
        );
        assert_eq!(r.applied().table_routes.len(), 0);
    }

    #[test]
    fn exit_node_with_lan_access_throws_the_lan_and_switches_in_place() {
        let mut r = lan_router();
        let mut c = cfg();
        c.exit_node = Some(ExitRoutes { allow_lan: true });
        r.set(&c).unwrap();
        assert_eq!(
            table_calls(&r),
            [
                "ip -4 route replace throw 192.168.1.0/24 table 53",
                "ip -6 route replace throw fd00:1::/64 table 53",
                "ip -4 route replace 0.0.0.0/0 dev tinyscale0 table 53",
                "ip -6 route replace ::/0 dev tinyscale0 table 53",
                "ip -4 rule add priority 5211 fwmark 0x80000/0xff0000 table main",
                "ip -4 rule add priority 5251 fwmark 0x80000/0xff0000 type unreachable",
                "ip -4 rule add priority 5271 table 53",
                "ip -6 rule add priority 5211 fwmark 0x80000/0xff0000 table main",
                "ip -6 rule add priority 5251 fwmark 0x80000/0xff0000 type unreachable",
                "ip -6 rule add priority 5271 table 53",
            ]
        );
        // LAN access off: the throws become tunnel routes; default routes and rules stay.
        r.runner_mut().calls.clear();
        c.exit_node = Some(ExitRoutes { allow_lan: false });
        r.set(&c).unwrap();
        assert_eq!(
            table_calls(&r),
            [
                "ip -4 route del throw 192.168.1.0/24 table 53",
                "ip -6 route del throw fd00:1::/64 table 53",
                "ip -4 route replace 192.168.1.0/24 dev tinyscale0 table 53",
                "ip -6 route replace fd00:1::/64 dev tinyscale0 table 53",
            ]
        );
        // `down`: nothing of ours stays.
        r.runner_mut().calls.clear();
        r.close().unwrap();
        assert!(r.applied().is_empty());
        assert!(calls(&r).contains(&"ip -6 route del ::/0 dev tinyscale0 table 53".to_string()));
    }

    #[test]
    fn subnet_router_forwards_masquerades_and_restores() {
        let mut runner = RecordingRunner::default();
        runner.files.insert(FORWARD_SYSCTLS[0].into(), "0\n".into());
        runner.files.insert(FORWARD_SYSCTLS[1].into(), "1\n".into());
        let mut r = Router::new(runner);
        r.set_saved_path("/state/forwarding.saved");
        let mut c = cfg();
        c.routes.truncate(1);
        c.addresses.truncate(1);
        r.set(&c).unwrap();
        r.runner_mut().calls.clear();
        c.subnet_router = Some(SubnetRouter {
            v4: true,
            v6: true,
            snat: true,
        });
        r.set(&c).unwrap();
        let script = nft_script("tinyscale0");
        assert_eq!(
            calls(&r),
            [
                "nft -f -".to_string(),
                format!("<<< {script}"),
                "write /state/forwarding.saved /proc/sys/net/ipv4/ip_forward=0".into(),
                "write /proc/sys/net/ipv4/ip_forward 1".into(),
            ]
        );
        assert!(script.contains("iifname \"tinyscale0\" meta mark set meta mark | 0x40000"));
        assert!(script.contains("oifname != \"tinyscale0\" meta mark & 0xff0000 == 0x40000 masquerade"));
        // IPv6 forwarding was on already: nothing saved for it, nothing to restore.
        r.runner_mut().calls.clear();
        c.subnet_router = Some(SubnetRouter {
            v4: true,
            v6: true,
            snat: false,
        });
        r.set(&c).unwrap();
        assert_eq!(calls(&r), ["nft delete table inet tinyscale"]);
        r.runner_mut().calls.clear();
        r.close().unwrap();
        let c = calls(&r);
        assert_eq!(&c[..1], ["write /proc/sys/net/ipv4/ip_forward 0"]);
        assert_eq!(r.runner().files[FORWARD_SYSCTLS[0]], "0\n");
        assert_eq!(r.runner().files[FORWARD_SYSCTLS[1]], "1\n");
        assert!(!r.runner().files.contains_key("/state/forwarding.saved"));
    }

    #[test]
    fn recover_after_a_crash_restores_and_removes_leftovers() {
        let mut runner = RecordingRunner::default();
        runner
            .files
            .insert("/state/forwarding.saved".into(), format!("{}=0\n", FORWARD_SYSCTLS[0]));
        runner.files.insert(FORWARD_SYSCTLS[0].into(), "1\n".into());
        runner.fail_on = Some("5271".into()); // no rule left at that priority
        let mut r = Router::new(runner);
        r.set_saved_path("/state/forwarding.saved");
        r.recover();
        assert_eq!(r.runner().files[FORWARD_SYSCTLS[0]], "0\n");
        assert!(!r.runner().files.contains_key("/state/forwarding.saved"));
        let c = calls(&r);
        assert!(c.contains(&"nft delete table inet tinyscale".to_string()), "{c:?}");
        assert!(c.contains(&"ip -4 route flush table 53".to_string()), "{c:?}");
        assert!(c.contains(&"ip -6 rule del priority 5211".to_string()), "{c:?}");
        // Deleting stops at the first failure per priority, and is bounded otherwise.
        assert_eq!(c.iter().filter(|l| l.ends_with("rule del priority 5271")).count(), 2);
        assert_eq!(c.iter().filter(|l| l.ends_with("rule del priority 5211")).count(), 8);
        assert_eq!(c.iter().filter(|l| l.ends_with("rule del priority 5251")).count(), 8);
    }

    #[test]
    fn dropping_a_router_cleans_up() {
        let mut runner = RecordingRunner::default();
        runner.files.insert(FORWARD_SYSCTLS[0].into(), "0\n".into());
        {
            let mut r = Router::new(&mut runner);
            let mut c = cfg();
            c.subnet_router = Some(SubnetRouter {
                v4: true,
                v6: false,
                snat: true,
            });
            r.set(&c).unwrap();
            assert_eq!(r.runner().files[FORWARD_SYSCTLS[0]], "1\n");
            r.runner_mut().calls.clear();
        } // dropped with everything applied, as when the data plane's task is aborted
        assert_eq!(runner.files[FORWARD_SYSCTLS[0]], "0\n");
        let c: Vec<String> = runner.calls.iter().map(|c| c.join(" ")).collect();
        assert!(c.contains(&"nft delete table inet tinyscale".to_string()), "{c:?}");
        assert!(
            c.contains(&"ip -4 addr del 100.64.0.1/32 dev tinyscale0".to_string()),
            "{c:?}"
        );
    }

    #[test]
    fn prefix_contains() {
        assert!(p("192.168.0.0/16").contains_prefix(&p("192.168.1.0/24")));
        assert!(p("192.168.1.0/24").contains_prefix(&p("192.168.1.0/24")));
        assert!(!p("192.168.1.0/24").contains_prefix(&p("192.168.0.0/16")));
        assert!(!p("0.0.0.0/0").contains_prefix(&p("::/0")));
        assert!(p("::/0").contains_prefix(&p("fd00::/8")));
        assert_eq!(p("192.168.1.77/24"), p("192.168.1.0/24"));
        assert_eq!(p("10.0.0.1"), p("10.0.0.1/32"));
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
    }

    #[test]
    fn system_runner_reports_stderr_and_spawn_errors() {
        let mut s = SystemRunner;
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(s.run(&argv(&["sh", "-c", "echo hi"])).unwrap(), "hi\n");
        let e = s.run(&argv(&["sh", "-c", "echo boom >&2; exit 3"])).unwrap_err();
        assert!(e.to_string().contains("boom") && e.to_string().contains("sh -c"), "{e}");
        let e = s.run(&argv(&["/nonexistent/ip"])).unwrap_err();
        assert!(matches!(e, RouterError::Spawn { .. }) && !e.is_retryable());
    }
}
