//! OS network configuration for the TUN: link state and MTU, tailnet addresses, routes.
//!
//! Mirrors tailscale `wgengine/router/router.go` (`Router.Set(*Config)`, `Close`) and
//! `router_linux.go` (address/route diffing), with `router_fake.go` / `util/linuxfw/fake.go` as the
//! model for the test seam. Go talks netlink; we shell out to `ip` (iproute2 or busybox), which
//! every OpenWrt image has and which costs no binary size.
//!
//! Two layers in one file:
//! * [pure] [`plan`] turns (what is applied, what is wanted) into a list of [`Op`]s, each one `ip`
//!   command. Same input, same commands, in a fixed order: link first, then removals (routes
//!   before addresses), then additions (addresses before routes).
//! * [shell] [`Router`] keeps the applied state, runs each op through a [`CommandRunner`] and
//!   records it as applied only when the command succeeded, so `set` is idempotent (setting the
//!   same config twice runs nothing the second time) and a `set` after a partial failure retries
//!   only what is missing. [`SystemRunner`] spawns the real `ip`; [`RecordingRunner`] records
//!   argv lists for tests.
//!
//! Adds use `replace` (`ip addr replace`, `ip route replace`) so leftovers from a crashed run do
//! not fail with "File exists". Routes go into the main table; the TUN's kernel routes and
//! addresses also vanish on their own when the device closes.
//!
//! TODO(handle): nftables (`table inet tinyscale`: fw4 zone glue, subnet-router SNAT, packet
//! filter) and Go's policy routing (table 52 + `ip rule`s, so a CGNAT WAN cannot shadow
//! 100.64.0.0/10) belong here in a later issue.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
};

/// Go's default TUN MTU (`net/tstun/mtu.go` `DefaultTUNMTU`): 1280, the IPv6 minimum, so the
/// WireGuard-wrapped packet fits any path with a 1360+ byte MTU.
pub const DEFAULT_MTU: u16 = 1280;

/// The tailnet IPv4 range (Go `tsaddr.CGNATRange`), routed to the TUN.
pub const TAILNET_V4: (IpAddr, u8) = (IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)), 10);

/// The tailnet IPv6 range (Go `tsaddr.TailscaleULARange`), routed to the TUN.
pub const TAILNET_V6: (IpAddr, u8) = (IpAddr::V6(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0)), 48);

/// Errors from applying router configuration.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The command could not be started (e.g. `ip` is not installed).
    #[error("cannot run {cmd}: {err}")]
    Spawn { cmd: String, err: std::io::Error },
    /// The command ran and failed.
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    /// A prefix in the config is invalid (length beyond 32/128).
    #[error("invalid prefix {0}/{1}")]
    BadPrefix(IpAddr, u8),
    /// The config names no device.
    #[error("router config has an empty device name")]
    NoDevice,
}

impl RouterError {
    /// True when retrying later may help (a failed command, e.g. a device not up yet); false for
    /// a missing binary or a bad config.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RouterError::Failed { .. })
    }
}

/// The desired network state of the TUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// Interface name, e.g. `tinyscale0`.
    pub tun: String,
    /// Link MTU.
    pub mtu: u16,
    /// Our tailnet addresses with their prefix length (usually /32 and /128).
    pub addresses: Vec<(IpAddr, u8)>,
    /// Prefixes routed into the TUN (tailnet ranges plus peers' subnet routes). Host bits are
    /// ignored.
    pub routes: Vec<(IpAddr, u8)>,
}

impl RouterConfig {
    /// The usual config: `addresses` on `tun` at [`DEFAULT_MTU`], routes for the two tailnet
    /// ranges ([`TAILNET_V4`], [`TAILNET_V6`]). Push subnet routes onto `routes` as needed.
    pub fn new(tun: &str, addresses: Vec<(IpAddr, u8)>) -> RouterConfig {
        RouterConfig {
            tun: tun.to_string(),
            mtu: DEFAULT_MTU,
            addresses,
            routes: vec![TAILNET_V4, TAILNET_V6],
        }
    }
}

/// One prefix; addresses keep host bits, routes are masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Prefix {
    /// Validates the length; `masked` clears host bits (for routes).
    pub fn new(addr: IpAddr, len: u8, masked: bool) -> Result<Prefix, RouterError> {
        let width = if addr.is_ipv4() { 32 } else { 128 };
        if len > width {
            return Err(RouterError::BadPrefix(addr, len));
        }
        let addr = if masked { mask(addr, len) } else { addr };
        Ok(Prefix { addr, len })
    }

    fn family_flag(&self) -> &'static str {
        if self.addr.is_ipv4() {
            "-4"
        } else {
            "-6"
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Clears the host bits of `addr` beyond `len`.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// What is currently applied to one device (or wanted for it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The device name; empty when nothing is applied.
    pub tun: String,
    /// The MTU set with the link up, if it has been.
    pub link: Option<u16>,
    /// Addresses present.
    pub addresses: BTreeSet<Prefix>,
    /// Routes present.
    pub routes: BTreeSet<Prefix>,
}

impl Applied {
    /// The state `cfg` asks for, validated and normalised (deduplicated, routes masked).
    pub fn from_config(cfg: &RouterConfig) -> Result<Applied, RouterError> {
        if cfg.tun.is_empty() {
            return Err(RouterError::NoDevice);
        }
        let addresses = cfg
            .addresses
            .iter()
            .map(|&(a, l)| Prefix::new(a, l, false))
            .collect::<Result<_, _>>()?;
        let routes = cfg
            .routes
            .iter()
            .map(|&(a, l)| Prefix::new(a, l, true))
            .collect::<Result<_, _>>()?;
        Ok(Applied {
            tun: cfg.tun.clone(),
            link: Some(cfg.mtu),
            addresses,
            routes,
        })
    }
}

/// One OS change: exactly one `ip` invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `ip link set dev D mtu M up`.
    LinkUp { dev: String, mtu: u16 },
    /// `ip -4|-6 addr replace A/L dev D`.
    AddrAdd { dev: String, addr: Prefix },
    /// `ip -4|-6 addr del A/L dev D`.
    AddrDel { dev: String, addr: Prefix },
    /// `ip -4|-6 route replace P/L dev D`.
    RouteAdd { dev: String, route: Prefix },
    /// `ip -4|-6 route del P/L dev D`.
    RouteDel { dev: String, route: Prefix },
}

impl Op {
    /// The argv to run.
    pub fn argv(&self) -> Vec<String> {
        let v = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match self {
            Op::LinkUp { dev, mtu } => v(&["ip", "link", "set", "dev", dev, "mtu", &mtu.to_string(), "up"]),
            Op::AddrAdd { dev, addr } => v(&[
                "ip",
                addr.family_flag(),
                "addr",
                "replace",
                &addr.to_string(),
                "dev",
                dev,
            ]),
            Op::AddrDel { dev, addr } => v(&["ip", addr.family_flag(), "addr", "del", &addr.to_string(), "dev", dev]),
            Op::RouteAdd { dev, route } => v(&[
                "ip",
                route.family_flag(),
                "route",
                "replace",
                &route.to_string(),
                "dev",
                dev,
            ]),
            Op::RouteDel { dev, route } => v(&[
                "ip",
                route.family_flag(),
                "route",
                "del",
                &route.to_string(),
                "dev",
                dev,
            ]),
        }
    }

    /// Records the op's effect in `state` (after it ran successfully).
    fn record(&self, state: &mut Applied) {
        match self {
            Op::LinkUp { dev, mtu } => {
                state.tun.clone_from(dev);
                state.link = Some(*mtu);
            }
            Op::AddrAdd { dev, addr } => {
                state.tun.clone_from(dev);
                state.addresses.insert(*addr);
            }
            Op::AddrDel { addr, .. } => {
                state.addresses.remove(addr);
            }
            Op::RouteAdd { dev, route } => {
                state.tun.clone_from(dev);
                state.routes.insert(*route);
            }
            Op::RouteDel { route, .. } => {
                state.routes.remove(route);
            }
        }
        if state.link.is_none() && state.addresses.is_empty() && state.routes.is_empty() {
            state.tun.clear();
        }
    }
}

/// [pure] The ops that take `cur` to `want`, in this order: route removals, address removals,
/// link (MTU + up), address additions, route additions. If the device name changes, everything
/// on the old device is removed first. The link op is not undone on removal: the device is ours and goes
/// away with its file descriptor.
pub fn plan(cur: &Applied, want: &Applied) -> Vec<Op> {
    let mut ops = Vec::new();
    let same_dev = cur.tun == want.tun;
    let empty = Applied::default();
    // On a rename, diff the new device against nothing and the old device against nothing.
    let (base, old) = if same_dev { (cur, cur) } else { (&empty, cur) };

    // Removals first: on a rename the old device must be clean before the new one is recorded.
    let keep = |set: &BTreeSet<Prefix>, p: &Prefix| same_dev && set.contains(p);
    for r in old.routes.iter().filter(|r| !keep(&want.routes, r)) {
        ops.push(Op::RouteDel {
            dev: old.tun.clone(),
            route: *r,
        });
    }
    for a in old.addresses.iter().filter(|a| !keep(&want.addresses, a)) {
        ops.push(Op::AddrDel {
            dev: old.tun.clone(),
            addr: *a,
        });
    }
    if let Some(mtu) = want.link.filter(|_| !want.tun.is_empty() && base.link != want.link) {
        ops.push(Op::LinkUp {
            dev: want.tun.clone(),
            mtu,
        });
    }
    for a in want.addresses.iter().filter(|a| !base.addresses.contains(a)) {
        ops.push(Op::AddrAdd {
            dev: want.tun.clone(),
            addr: *a,
        });
    }
    for r in want.routes.iter().filter(|r| !base.routes.contains(r)) {
        ops.push(Op::RouteAdd {
            dev: want.tun.clone(),
            route: *r,
        });
    }
    ops
}

/// Runs one external command. Implementations: [`SystemRunner`], [`RecordingRunner`].
pub trait CommandRunner {
    /// Runs `argv` (`argv[0]` is the program) and returns its stdout, or an error carrying
    /// stderr when it exits non-zero.
    fn run(&mut self, argv: &[String]) -> Result<String, RouterError>;
}

/// Runs commands with `std::process::Command` (blocking; `ip` returns in milliseconds).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRunner;

impl CommandRunner for SystemRunner {
    fn run(&mut self, argv: &[String]) -> Result<String, RouterError> {
        let cmd = argv.join(" ");
        let (prog, args) = argv.split_first().ok_or_else(|| RouterError::Failed {
            cmd: String::new(),
            status: "not run".into(),
            stderr: "empty command".into(),
        })?;
        let out = Command::new(prog)
            .args(args)
            .output()
            .map_err(|err| RouterError::Spawn { cmd: cmd.clone(), err })?;
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
}

/// Test runner: records every argv, answers `Ok("")`, and fails commands that contain
/// `fail_on` as one argument (to exercise partial failures).
#[derive(Debug, Default, Clone)]
pub struct RecordingRunner {
    /// Every command run, in order.
    pub calls: Vec<Vec<String>>,
    /// If set, any command with this exact argument fails.
    pub fail_on: Option<String>,
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
            _ => Ok(String::new()),
        }
    }
}

/// Applies [`RouterConfig`]s through a [`CommandRunner`], remembering what it applied.
#[derive(Debug)]
pub struct Router<R: CommandRunner> {
    runner: R,
    applied: Applied,
}

impl<R: CommandRunner> Router<R> {
    /// A router that has applied nothing yet.
    pub fn new(runner: R) -> Router<R> {
        Router {
            runner,
            applied: Applied::default(),
        }
    }

    /// Brings the system to `cfg`, running only the commands needed. Idempotent. Stops at the
    /// first failing command; what succeeded before it stays recorded, so the next `set`
    /// retries only the rest.
    pub fn set(&mut self, cfg: &RouterConfig) -> Result<(), RouterError> {
        let want = Applied::from_config(cfg)?;
        for op in plan(&self.applied, &want) {
            self.runner.run(&op.argv())?;
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
            if let Err(e) = self.runner.run(&op.argv()) {
                log::warn!("router: cleanup op={:?} failed: {e}", op.argv().join(" "));
                first_err.get_or_insert(e);
            }
        }
        self.applied = Applied::default();
        first_err.map_or(Ok(()), Err)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cfg() -> RouterConfig {
        RouterConfig::new(
            "tinyscale0",
            vec![(ip("100.64.0.1"), 32), (ip("fd7a:115c:a1e0::1"), 128)],
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
        c.routes.push((ip("10.0.0.0"), 24));
        r.set(&c).unwrap();
        r.runner_mut().calls.clear();

        let mut c2 = cfg();
        c2.addresses = vec![(ip("100.64.0.2"), 32), (ip("fd7a:115c:a1e0::1"), 128)];
        c2.routes.push((ip("192.168.5.77"), 24)); // host bits are masked
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
        c.routes.push(TAILNET_V4);
        c.routes.push((ip("100.64.1.1"), 10)); // same /10 once masked
        r.set(&c).unwrap();
        assert_eq!(r.runner().calls.len(), 5);
        c.routes.push((ip("10.0.0.0"), 33));
        assert!(matches!(r.set(&c), Err(RouterError::BadPrefix(_, 33))));
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
