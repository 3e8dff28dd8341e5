//! [pure] OS network configuration for the TUN, as commands: link state and MTU, tailnet
//! addresses, routes, policy rules and the nftables table. [`crate::dataplane::apply`] runs them.
//!
//! Mirrors tailscale `wgengine/router/router.go` (`Router.Set(*Config)`, `Close`) and
//! `router_linux.go` (address/route diffing), with `router_fake.go` / `util/linuxfw/fake.go` as the
//! model for the test seam. Go talks netlink; we shell out to `ip` (iproute2 or busybox), which
//! every OpenWrt image has and which costs no binary size.
//!
//! [`plan`] turns (what is applied, what is wanted) into a list of [`Op`]s, each one `ip`
//! command. Same input, same commands, in a fixed order: link first, then removals (routes
//! before addresses), then additions (addresses before routes). The shell that runs them and
//! keeps what is applied is `dataplane::apply` (`Router`).
//!
//! Adds use `replace` (`ip addr replace`, `ip route replace`) so leftovers from a crashed run do
//! not fail with "File exists". The tailnet ranges go into the main table; the TUN's kernel
//! routes and addresses also vanish on their own when the device closes.
//!
//! Subnet routing, both sides (Go `router_linux.go` and `util/linuxfw`):
//! * **Accepted routes** (`--accept-routes`): peers' subnet routes go into routing table
//!   [`ROUTE_TABLE`] (53), consulted by an `ip rule` at priority [`RULE_PRIORITY_TABLE`] (5271),
//!   before the main table. The daemon's own sockets carry [`BYPASS_MARK`] (0x80000, `SO_MARK`)
//!   and a rule at [`RULE_PRIORITY_BYPASS`] (5211) sends marked packets to the main table first
//!   (and one at [`RULE_PRIORITY_UNREACHABLE`] (5251) stops those the main table has no route
//!   for, Go's rule 5250, rather than letting them fall into table 53):
//!   without it a peer's route covering the control server, a DERP relay or a peer's UDP
//!   endpoint would pull the tunnel's own packets into the tunnel (a routing loop). Unlike Go,
//!   a prefix directly connected on this router is never shadowed: a connected prefix inside an
//!   accepted route gets a `throw` route in table 53 (the lookup falls through to main), and an
//!   accepted route inside a connected prefix is not installed.
//! * **Advertised routes** (`--advertise-routes`): IP forwarding is switched on for the families
//!   advertised (the values found are restored on close, and kept in a file so a restart after
//!   a crash restores them too), and with SNAT (`--snat-subnet-routes`, default on) the nftables
//!   table `inet tinyscale` marks packets forwarded from the TUN ([`SUBNET_ROUTE_MARK`]) and
//!   masquerades them on their way out, so LAN hosts need no route back to the tailnet. The
//!   table is ours alone: created, replaced atomically and deleted as a whole, never touching
//!   fw4's or anybody else's tables. Which destinations are served at all is the packet
//!   filter's decision (approved routes only), before a packet reaches the TUN.
//! * **Exit node, client side** (`--exit-node`): while one is chosen, table 53 also holds the
//!   default routes `0.0.0.0/0` and `::/0` via the TUN (Go `ipnlocal` `routerConfig` adds both
//!   even when the exit node offers only one, so nothing leaks). The daemon's own sockets keep
//!   the physical route through the bypass rule. This host's directly connected prefixes
//!   follow Go on Linux: without `--exit-node-allow-lan-access` they are routed into the TUN
//!   too (Go appends the "external" interface prefixes to `Routes`: the LAN is reached through
//!   the exit node or not at all, so nothing leaks around it); with it they get `throw` routes
//!   (Go `LocalRoutes`) and stay directly reachable.
//! * `Router::recover` removes what a crashed run left (nftables table, rules, routing
//!   table, sysctls).
#![forbid(unsafe_code)]

use std::{collections::BTreeSet, net::IpAddr};

use crate::wire::prefix::{Prefix, ALL_IPV4, ALL_IPV6, CGNAT_RANGE, TAILSCALE_ULA_RANGE};

/// Go's default TUN MTU (`net/tstun/mtu.go` `DefaultTUNMTU`): 1280, the IPv6 minimum, so the
/// WireGuard-wrapped packet fits any path with a 1360+ byte MTU.
pub const DEFAULT_MTU: u16 = 1280;

/// Routing table for peers' subnet routes. Go uses table 52 with rules at 5210-5270; ours sit
/// right beside them (53, 5211, 5271) so that a tailscaled on the same host (a developer's
/// machine) and tinyscale never delete each other's rules or flush each other's table.
pub const ROUTE_TABLE: u32 = 53;
/// `ip rule` priority of the lookup in [`ROUTE_TABLE`].
pub const RULE_PRIORITY_TABLE: u32 = 5271;
/// `ip rule` priority of the bypass: marked packets look up the main table first.
pub const RULE_PRIORITY_BYPASS: u32 = 5211;
/// `ip rule` priority of `unreachable` for marked packets the main table did not route (no
/// uplink): they fail at once instead of looping into the tunnel through table 53's default
/// route (Go's base rule 50, `RTN_UNREACHABLE`).
pub const RULE_PRIORITY_UNREACHABLE: u32 = 5251;
/// The three rules of a family, in the order they are added (removed in reverse).
pub(super) const RULES: [u32; 3] = [RULE_PRIORITY_BYPASS, RULE_PRIORITY_UNREACHABLE, RULE_PRIORITY_TABLE];
/// `SO_MARK` of the daemon's own sockets (Go `TailscaleBypassMark`).
pub const BYPASS_MARK: u32 = 0x80000;
/// The bits of the packet mark we own (Go `TailscaleFwmarkMask`).
pub const MARK_MASK: u32 = 0xff0000;
/// Mark of packets forwarded from the TUN, masqueraded on the way out (Go
/// `TailscaleSubnetRouteMark`).
pub const SUBNET_ROUTE_MARK: u32 = 0x40000;
/// Our nftables table, family `inet`.
pub const NFT_TABLE: &str = "tinyscale";
/// The sysctls of IP forwarding, IPv4 and IPv6.
pub const FORWARD_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

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
    /// The config names no device.
    #[error("router config has an empty device name")]
    NoDevice,
    /// A file (sysctl) could not be read or written.
    #[error("{path}: {err}")]
    File { path: String, err: std::io::Error },
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
    /// Our tailnet addresses with their prefix length (usually /32 and /128), host bits kept.
    pub addresses: Vec<Prefix>,
    /// Prefixes routed into the TUN in the main table (the tailnet ranges). Host bits are
    /// ignored.
    pub routes: Vec<Prefix>,
    /// Peers' subnet routes to reach through the TUN (table [`ROUTE_TABLE`]); empty unless
    /// `--accept-routes`. Host bits are ignored.
    pub accepted_routes: Vec<Prefix>,
    /// Set while this node advertises subnet routes: forwarding and SNAT.
    pub subnet_router: Option<SubnetRouter>,
    /// Set while an exit node is chosen: default routes into the TUN (table [`ROUTE_TABLE`]).
    pub exit_node: Option<ExitRoutes>,
}

/// Routing through a chosen exit node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitRoutes {
    /// Keep this host's directly connected prefixes out of the tunnel
    /// (`--exit-node-allow-lan-access`).
    pub allow_lan: bool,
}

/// Forwarding for the subnet routes this node advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetRouter {
    /// IPv4 forwarding (an IPv4 route is advertised).
    pub v4: bool,
    /// IPv6 forwarding (an IPv6 route is advertised).
    pub v6: bool,
    /// Masquerade forwarded tailnet traffic behind the router's own address.
    pub snat: bool,
}

impl RouterConfig {
    /// The usual config: `addresses` on `tun` at [`DEFAULT_MTU`], routes for the two tailnet
    /// ranges ([`CGNAT_RANGE`], [`TAILSCALE_ULA_RANGE`]). Push subnet routes onto `routes` as
    /// needed.
    pub fn new(tun: &str, addresses: Vec<Prefix>) -> RouterConfig {
        RouterConfig {
            tun: tun.to_string(),
            mtu: DEFAULT_MTU,
            addresses,
            routes: vec![CGNAT_RANGE, TAILSCALE_ULA_RANGE],
            accepted_routes: Vec::new(),
            subnet_router: None,
            exit_node: None,
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
    /// Accepted subnet routes present in table [`ROUTE_TABLE`].
    pub table_routes: BTreeSet<Prefix>,
    /// `throw` routes in table [`ROUTE_TABLE`]: connected prefixes inside accepted routes.
    pub throws: BTreeSet<Prefix>,
    /// Policy rules present, IPv4 and IPv6 (bypass and table lookup together).
    pub rules: [bool; 2],
    /// The nftables table with the SNAT rules is present.
    pub snat: bool,
    /// Forwarding switched on by us, IPv4 and IPv6.
    pub forward: [bool; 2],
}

impl Applied {
    /// The state `cfg` asks for, validated and normalised (deduplicated, routes masked), given
    /// the prefixes directly connected on this host (never shadowed by accepted routes).
    pub fn from_config(cfg: &RouterConfig) -> Result<Applied, RouterError> {
        Applied::with_connected(cfg, &[])
    }

    /// [`Applied::from_config`] with the host's connected prefixes.
    pub fn with_connected(cfg: &RouterConfig, connected: &[Prefix]) -> Result<Applied, RouterError> {
        if cfg.tun.is_empty() {
            return Err(RouterError::NoDevice);
        }
        let addresses = cfg.addresses.iter().copied().collect();
        let routes = cfg.routes.iter().map(Prefix::masked).collect();
        let mut table_routes = BTreeSet::new();
        for r in cfg.accepted_routes.iter().map(Prefix::masked) {
            if let Some(c) = connected.iter().find(|c| c.contains_prefix(&r)) {
                log::debug!("router: not installing accepted route {r}: inside connected {c}");
            } else {
                table_routes.insert(r);
            }
        }
        if let Some(exit) = cfg.exit_node {
            table_routes.insert(ALL_IPV4);
            table_routes.insert(ALL_IPV6);
            if !exit.allow_lan {
                // Go: "explicitly add routes to the local network so that we do not leak".
                table_routes.extend(connected.iter().copied());
            }
        }
        let throws: BTreeSet<Prefix> = connected
            .iter()
            .filter(|c| {
                !table_routes.contains(c) && table_routes.iter().any(|r| r.bits() < c.bits() && r.contains_prefix(c))
            })
            .copied()
            .collect();
        let family = |v6: bool| table_routes.iter().any(|r| r.is_ipv4() != v6);
        let sr = cfg.subnet_router;
        Ok(Applied {
            tun: cfg.tun.clone(),
            link: Some(cfg.mtu),
            addresses,
            routes,
            rules: [family(false), family(true)],
            table_routes,
            throws,
            snat: sr.is_some_and(|s| s.snat),
            forward: [sr.is_some_and(|s| s.v4), sr.is_some_and(|s| s.v6)],
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.link.is_none()
            && self.addresses.is_empty()
            && self.routes.is_empty()
            && self.table_routes.is_empty()
            && self.throws.is_empty()
            && self.rules == [false; 2]
            && !self.snat
            && self.forward == [false; 2]
    }
}

/// The nftables script that (re)creates our table atomically: the first line makes sure the
/// table exists so that `delete` cannot fail, the rest is one transaction.
pub fn nft_script(tun: &str) -> String {
    format!(
        "table inet {NFT_TABLE}\n\
         delete table inet {NFT_TABLE}\n\
         table inet {NFT_TABLE} {{\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{tun}\" meta mark set meta mark | {SUBNET_ROUTE_MARK:#x}\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname != \"{tun}\" meta mark & {MARK_MASK:#x} == {SUBNET_ROUTE_MARK:#x} masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// [pure] The prefixes directly connected on this host, from `ip -o route show table main`
/// output: link-scope routes (and IPv6 kernel routes) of every device but `tun`, without
/// link-local and multicast ranges.
pub fn parse_connected(out: &str, tun: &str) -> Vec<Prefix> {
    let mut v = Vec::new();
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let Some(first) = w.first() else { continue };
        let dev = w.iter().position(|t| *t == "dev").and_then(|i| w.get(i + 1));
        if dev.is_none_or(|d| *d == tun) || w.contains(&"via") {
            continue;
        }
        let link = w.windows(2).any(|p| p == ["scope", "link"] || p == ["proto", "kernel"]);
        if !link {
            continue;
        }
        let Ok(p) = first.parse::<Prefix>() else { continue };
        let special = match p.addr() {
            IpAddr::V4(a) => a.is_link_local() || a.is_multicast(),
            IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80 || a.is_multicast(),
        };
        if !special {
            v.push(p);
        }
    }
    v.sort();
    v.dedup();
    v
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
    /// `ip -4|-6 route replace P/L dev D table 53`.
    TableRouteAdd { dev: String, route: Prefix },
    /// `ip -4|-6 route del P/L dev D table 53`.
    TableRouteDel { dev: String, route: Prefix },
    /// `ip -4|-6 route replace throw P/L table 53`.
    ThrowAdd { route: Prefix },
    /// `ip -4|-6 route del throw P/L table 53`.
    ThrowDel { route: Prefix },
    /// `ip -4|-6 rule add priority P …`: the bypass rule or the table lookup.
    RuleAdd { v6: bool, priority: u32 },
    /// `ip -4|-6 rule del priority P`.
    RuleDel { v6: bool, priority: u32 },
    /// `nft -f -` with [`nft_script`].
    NftSet { tun: String },
    /// `nft delete table inet tinyscale`.
    NftDel,
    /// Forwarding sysctl on (saving the value found) or back to the saved value.
    Forward { v6: bool, on: bool },
}

impl Op {
    /// The argv to run.
    pub fn argv(&self) -> Vec<String> {
        let v = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match self {
            Op::LinkUp { dev, mtu } => v(&["ip", "link", "set", "dev", dev, "mtu", &mtu.to_string(), "up"]),
            Op::AddrAdd { dev, addr } => v(&[
                "ip",
                fam(!addr.is_ipv4()),
                "addr",
                "replace",
                &addr.to_string(),
                "dev",
                dev,
            ]),
            Op::AddrDel { dev, addr } => v(&["ip", fam(!addr.is_ipv4()), "addr", "del", &addr.to_string(), "dev", dev]),
            Op::RouteAdd { dev, route } => route_argv("replace", route, Some(dev), false),
            Op::RouteDel { dev, route } => route_argv("del", route, Some(dev), false),
            Op::TableRouteAdd { dev, route } => route_argv("replace", route, Some(dev), true),
            Op::TableRouteDel { dev, route } => route_argv("del", route, Some(dev), true),
            Op::ThrowAdd { route } => route_argv("replace", route, None, true),
            Op::ThrowDel { route } => route_argv("del", route, None, true),
            Op::RuleAdd { v6, priority } => {
                let mut a = v(&["ip", fam(*v6), "rule", "add", "priority", &priority.to_string()]);
                if *priority == RULE_PRIORITY_BYPASS || *priority == RULE_PRIORITY_UNREACHABLE {
                    a.extend(v(&["fwmark", &format!("{BYPASS_MARK:#x}/{MARK_MASK:#x}")]));
                    if *priority == RULE_PRIORITY_BYPASS {
                        a.extend(v(&["table", "main"]));
                    } else {
                        a.extend(v(&["type", "unreachable"]));
                    }
                } else {
                    a.extend(v(&["table", &ROUTE_TABLE.to_string()]));
                }
                a
            }
            Op::RuleDel { v6, priority } => v(&["ip", fam(*v6), "rule", "del", "priority", &priority.to_string()]),
            Op::NftSet { .. } => v(&["nft", "-f", "-"]),
            Op::NftDel => v(&["nft", "delete", "table", "inet", NFT_TABLE]),
            Op::Forward { v6, on } => v(&[
                "sysctl",
                FORWARD_SYSCTLS[usize::from(*v6)],
                if *on { "on" } else { "restore" },
            ]),
        }
    }

    /// Records the op's effect in `state` (after it ran successfully).
    pub(super) fn record(&self, state: &mut Applied) {
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
            Op::TableRouteAdd { dev, route } => {
                state.tun.clone_from(dev);
                state.table_routes.insert(*route);
            }
            Op::TableRouteDel { route, .. } => {
                state.table_routes.remove(route);
            }
            Op::ThrowAdd { route } => {
                state.throws.insert(*route);
            }
            Op::ThrowDel { route } => {
                state.throws.remove(route);
            }
            // The two rules of a family are added and removed together, lookup last on add.
            Op::RuleAdd { v6, priority } => state.rules[usize::from(*v6)] = *priority == RULE_PRIORITY_TABLE,
            Op::RuleDel { v6, .. } => state.rules[usize::from(*v6)] = false,
            Op::NftSet { tun } => {
                state.tun.clone_from(tun);
                state.snat = true;
            }
            Op::NftDel => state.snat = false,
            Op::Forward { v6, on } => state.forward[usize::from(*v6)] = *on,
        }
        if state.is_empty() {
            state.tun.clear();
        }
    }
}

/// `ip -4|-6 route VERB [throw] P/L [dev D] [table 53]`: a route on `dev` or, without one, a
/// `throw` route; in our table or the main one.
fn route_argv(verb: &str, route: &Prefix, dev: Option<&str>, table: bool) -> Vec<String> {
    let mut a: Vec<String> = vec!["ip".into(), fam(!route.is_ipv4()).into(), "route".into(), verb.into()];
    if dev.is_none() {
        a.push("throw".into());
    }
    a.push(route.to_string());
    if let Some(d) = dev {
        a.extend(["dev".into(), d.to_string()]);
    }
    if table {
        a.extend(["table".into(), ROUTE_TABLE.to_string()]);
    }
    a
}

pub(super) fn fam(v6: bool) -> &'static str {
    if v6 {
        "-6"
    } else {
        "-4"
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
    for v6 in [false, true] {
        let i = usize::from(v6);
        if old.forward[i] && !(same_dev && want.forward[i]) {
            ops.push(Op::Forward { v6, on: false });
        }
    }
    if old.snat && !(same_dev && want.snat) {
        ops.push(Op::NftDel);
    }
    for v6 in [false, true] {
        let i = usize::from(v6);
        if old.rules[i] && !(same_dev && want.rules[i]) {
            for priority in RULES.into_iter().rev() {
                ops.push(Op::RuleDel { v6, priority });
            }
        }
    }
    // Routes before the throws that carve holes in them: no moment where a route (the exit
    // node's default) shadows the LAN.
    for r in old.table_routes.iter().filter(|r| !keep(&want.table_routes, r)) {
        ops.push(Op::TableRouteDel {
            dev: old.tun.clone(),
            route: *r,
        });
    }
    for r in old.throws.iter().filter(|r| !keep(&want.throws, r)) {
        ops.push(Op::ThrowDel { route: *r });
    }
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
    // Throws before the routes they carve holes in, rules after both: no moment where an
    // accepted route shadows the LAN or the lookup finds a half-built table.
    for r in want.throws.iter().filter(|r| !base.throws.contains(r)) {
        ops.push(Op::ThrowAdd { route: *r });
    }
    for r in want.table_routes.iter().filter(|r| !base.table_routes.contains(r)) {
        ops.push(Op::TableRouteAdd {
            dev: want.tun.clone(),
            route: *r,
        });
    }
    for v6 in [false, true] {
        let i = usize::from(v6);
        if want.rules[i] && !base.rules[i] {
            for priority in RULES {
                ops.push(Op::RuleAdd { v6, priority });
            }
        }
    }
    if want.snat && !base.snat {
        ops.push(Op::NftSet { tun: want.tun.clone() });
    }
    for v6 in [false, true] {
        let i = usize::from(v6);
        if want.forward[i] && !base.forward[i] {
            ops.push(Op::Forward { v6, on: true });
        }
    }
    ops
}
