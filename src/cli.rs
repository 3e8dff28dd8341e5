//! Command-line interface: the client verbs (`up`, `down`, `logout`, `status`, `ip`, `whois`,
//! `dns status|query`, `metrics`, `version`,
//! `debug …`),
//! `daemon`, and `server …` with headscale's admin verbs. Invoked as `headscale`, the binary
//! behaves as `tinyscale server`; as `tailscaled`, as `tinyscale daemon`. `argv` first rewrites
//! Go-style flags (`--flag=value`, `--flag=false`) and headscale's aliases into what argh parses.

use std::{path::PathBuf, time::Duration};

use argh::FromArgs;
use serde_json::Value;

use crate::{
    error::Failure,
    platform::ipc::{self, IpcRequest, UpArgs},
};

pub mod argv;
pub mod dns;

// Every argh type below also derives `ArgsInfo` in tests only: `argv::TREE`'s cross-check reads
// it, and the binary does not carry that metadata.
#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(
    note = "Flags take Go's forms, as in tailscale and headscale guides: --flag=value, --flag value, \
            -flag=value, -flag value; booleans: --flag, --flag=true, --flag=false. An empty value \
            (--exit-node=) clears a setting.",
    note = "Through a symlink named headscale the binary runs as `tinyscale server` (with headscale's \
            command aliases: namespaces/user = users, node/machines = nodes, route = routes, ls = list, \
            -n/--namespace = --user), named tailscale as this command, named tailscaled as \
            `tinyscale daemon`."
)]
/// tinyscale: a small Tailscale-compatible mesh VPN client, subnet router and coordinator for
/// OpenWrt routers.
///
/// Quick start: `tinyscale daemon &` then `tinyscale up --login-server=http://HOST:8080`.
pub struct Top {
    #[argh(subcommand)]
    pub cmd: Cmd,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum Cmd {
    Up(Up),
    Set(Set),
    Down(Down),
    Logout(Logout),
    Status(Status),
    Ip(Ip),
    Ping(Ping),
    Netcheck(Netcheck),
    Whois(Whois),
    Dns(DnsCmd),
    Metrics(MetricsCmd),
    Debug(DebugCmd),
    ExitNode(ExitNodeCmd),
    Version(Version),
    Daemon(DaemonCmd),
    Server(Server),
    Stun(Stun),
    Derp(DerpCmd),
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "derp")]
/// run a standalone DERP relay and an optional STUN server: over TLS with --tls-cert/--tls-key
/// (what clients expect), else plain HTTP (behind a TLS proxy, or for clients with
/// TS_DEBUG_USE_DERP_HTTP=1)
pub struct DerpCmd {
    /// TCP address for DERP (default 0.0.0.0:3340)
    #[argh(option, default = "std::net::SocketAddr::from(([0, 0, 0, 0], 3340))")]
    pub listen: std::net::SocketAddr,
    /// UDP address for STUN, e.g. 0.0.0.0:3478 (default: no STUN)
    #[argh(option)]
    pub stun: Option<std::net::SocketAddr>,
    /// PEM certificate chain for TLS (the name clients use must be in it)
    #[argh(option)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for --tls-cert
    #[argh(option)]
    pub tls_key: Option<std::path::PathBuf>,
    /// connections open at once; more are refused (default 768)
    #[argh(option, default = "768")]
    pub max_connections: u32,
    /// connections open at once from one address, or one IPv6 /64 (default 64)
    #[argh(option, default = "64")]
    pub max_connections_per_ip: u32,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(
    subcommand,
    name = "up",
    note = "Boolean flags: --accept-routes alone means true; --accept-dns=false turns off a setting \
            that defaults to true. Settings not given keep their current values (--reset restores \
            the defaults).",
    example = "tinyscale up --login-server=http://192.168.1.1:8080 --accept-routes \
               --accept-dns=false --advertise-routes=192.168.1.0/24"
)]
/// connect to the tailnet, logging in if needed (prints a login URL for interactive login)
pub struct Up {
    /// control server URL, e.g. http://192.168.1.1:8080 (headscale, tinyscale server)
    #[argh(option)]
    pub login_server: Option<String>,
    /// pre-auth key (tskey-auth-…) for unattended login; file:PATH reads it from a file
    /// (also --authkey)
    #[argh(option)]
    pub auth_key: Option<String>,
    /// hostname to use instead of the system one
    #[argh(option)]
    pub hostname: Option<String>,
    /// subnet routes to offer the tailnet, comma-separated CIDRs (e.g. 192.168.1.0/24)
    #[argh(option)]
    pub advertise_routes: Option<String>,
    /// also offer the subnets configured on this interface (e.g. br-lan), re-announced as its
    /// addresses change (--advertise-lan= stops)
    #[argh(option, arg_name = "iface")]
    pub advertise_lan: Option<String>,
    /// accept subnet routes other nodes advertise (default false)
    #[argh(option, arg_name = "bool")]
    pub accept_routes: Option<bool>,
    /// accept DNS settings from the tailnet, MagicDNS (default true; --accept-dns=false to
    /// refuse)
    #[argh(option, arg_name = "bool")]
    pub accept_dns: Option<bool>,
    /// offer this node as an exit node: advertises 0.0.0.0/0 and ::/0 (default false)
    #[argh(option, arg_name = "bool")]
    pub advertise_exit_node: Option<bool>,
    /// send internet traffic through this exit node: its tailnet IP or name, from `tinyscale
    /// exit-node list` (--exit-node= stops using one)
    #[argh(option)]
    pub exit_node: Option<String>,
    /// with --exit-node: reach this host's LANs directly, not through the exit node (default
    /// false)
    #[argh(option, arg_name = "bool")]
    pub exit_node_allow_lan_access: Option<bool>,
    /// ACL tags to request, comma-separated (tag:router,…)
    #[argh(option)]
    pub advertise_tags: Option<String>,
    /// start a new login even if already logged in
    #[argh(switch)]
    pub force_reauth: bool,
    /// reset settings not given on this command line to their defaults
    #[argh(switch)]
    pub reset: bool,
    /// block incoming connections from the tailnet (default false)
    #[argh(option, arg_name = "bool")]
    pub shields_up: Option<bool>,
    /// masquerade traffic to advertised subnets as this node (default true)
    #[argh(option, arg_name = "bool")]
    pub snat_subnet_routes: Option<bool>,
    /// give up after this long, e.g. 30s, 5m (default: wait for login indefinitely)
    #[argh(option)]
    pub timeout: Option<String>,
    /// also show the login URL as a QR code (scan it with a phone)
    #[argh(switch)]
    pub qr: bool,
    /// daemon socket (default /var/run/tinyscale.sock)
    #[argh(option)]
    pub socket: Option<PathBuf>,
    /// apply the prefs of the uci file's `config client` section (e.g. /etc/config/tinyscale)
    /// and return once the daemon took them; flags given beside it override the file
    #[argh(option)]
    pub config: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(
    subcommand,
    name = "set",
    note = "Unlike `up`, settings not given keep their values, and nothing logs in: a running node \
            applies them live (no new login, the tunnel stays), a stopped one keeps them for its next \
            `up`. Boolean flags: --shields-up alone means true, --shields-up=false turns it off.",
    example = "tinyscale set --accept-routes --exit-node=100.64.0.7 --exit-node-allow-lan-access"
)]
/// change settings of this node without logging in again
pub struct Set {
    /// hostname to use instead of the system one
    #[argh(option)]
    pub hostname: Option<String>,
    /// subnet routes to offer the tailnet, comma-separated CIDRs ("" offers none)
    #[argh(option)]
    pub advertise_routes: Option<String>,
    /// also offer the subnets configured on this interface (e.g. br-lan); "" stops
    #[argh(option, arg_name = "iface")]
    pub advertise_lan: Option<String>,
    /// accept subnet routes other nodes advertise
    #[argh(option, arg_name = "bool")]
    pub accept_routes: Option<bool>,
    /// accept DNS settings from the tailnet, MagicDNS
    #[argh(option, arg_name = "bool")]
    pub accept_dns: Option<bool>,
    /// offer this node as an exit node (advertises 0.0.0.0/0 and ::/0)
    #[argh(option, arg_name = "bool")]
    pub advertise_exit_node: Option<bool>,
    /// send internet traffic through this exit node (tailnet IP or name; "" stops)
    #[argh(option)]
    pub exit_node: Option<String>,
    /// with an exit node: reach this host's LANs directly
    #[argh(option, arg_name = "bool")]
    pub exit_node_allow_lan_access: Option<bool>,
    /// ACL tags to request, comma-separated (tag:router,…)
    #[argh(option)]
    pub advertise_tags: Option<String>,
    /// block incoming connections from the tailnet
    #[argh(option, arg_name = "bool")]
    pub shields_up: Option<bool>,
    /// masquerade traffic to advertised subnets as this node
    #[argh(option, arg_name = "bool")]
    pub snat_subnet_routes: Option<bool>,
    /// daemon socket (default /var/run/tinyscale.sock)
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

impl Set {
    /// The prefs this command changes (none given: `None`).
    pub fn up_args(self) -> Option<UpArgs> {
        let a = UpArgs {
            hostname: self.hostname,
            advertise_routes: self.advertise_routes.as_deref().map(split_list),
            advertise_lan: self.advertise_lan,
            accept_routes: self.accept_routes,
            accept_dns: self.accept_dns,
            advertise_exit_node: self.advertise_exit_node,
            exit_node: self.exit_node,
            exit_node_allow_lan_access: self.exit_node_allow_lan_access,
            advertise_tags: self.advertise_tags.as_deref().map(split_list),
            shields_up: self.shields_up,
            snat_subnet_routes: self.snat_subnet_routes,
            ..UpArgs::default()
        };
        (a != UpArgs::default()).then_some(a)
    }
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "down")]
/// disconnect from the tailnet (keeps the login)
pub struct Down {
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "logout")]
/// disconnect and expire this node's login (the next `up` logs in again)
pub struct Logout {
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "status")]
/// show this node and its peers
pub struct Status {
    /// print the full status as JSON
    #[argh(switch)]
    pub json: bool,
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "ip")]
/// print this node's tailnet addresses
pub struct Ip {
    /// only the IPv4 address
    #[argh(switch, short = '4')]
    pub v4: bool,
    /// only the IPv6 address
    #[argh(switch, short = '6')]
    pub v6: bool,
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "version")]
/// print the version
pub struct Version {}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "daemon")]
/// run the client daemon (keys, control session); procd starts it on OpenWrt
pub struct DaemonCmd {
    /// directory for keys and settings (default /etc/tinyscale; tailscaled's --statedir)
    #[argh(option)]
    pub state_dir: Option<PathBuf>,
    /// local API socket (default /var/run/tinyscale.sock)
    #[argh(option)]
    pub socket: Option<PathBuf>,
    /// TUN device name, or "none" for control only (default tinyscale0)
    #[argh(option)]
    pub tun: Option<String>,
    /// UDP port for WireGuard and path discovery (default 41641; 0 picks one)
    #[argh(option)]
    pub port: Option<u16>,
    /// uci file whose `config client` section gives port, state_dir, tun and log_level and
    /// the prefs applied at start (flags given beside it win)
    #[argh(option)]
    pub config: Option<PathBuf>,
    /// ubusd socket for the `tinyscale` object (default /var/run/ubus/ubus.sock; "none" for no
    /// ubus object)
    #[argh(option, default = "String::from(crate::platform::ubus_object::DEFAULT_SOCKET)")]
    pub ubus_socket: String,
    /// serve the `tinyscale metrics` text at GET /metrics on ip:port (default off; a bare
    /// :port or "" after = means 127.0.0.1, port 5252 if none; uci metrics_listen)
    #[argh(option)]
    pub metrics_listen: Option<String>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "ping")]
/// ping a peer over the tailnet's path discovery and show whether the path is direct or relayed
pub struct Ping {
    /// peer host name, FQDN or tailnet IP
    #[argh(positional)]
    pub peer: String,
    /// number of pings (stops early once a direct path answers; default 10)
    #[argh(option, short = 'c', default = "10")]
    pub count: u32,
    /// keep pinging after a direct path answered
    #[argh(switch)]
    pub until_count: bool,
    /// stop once a direct path answers (default true; =false is --until-count)
    #[argh(option, arg_name = "bool")]
    pub until_direct: Option<bool>,
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "netcheck")]
/// show UDP reachability, the public address, NAT mapping behaviour and DERP latencies
pub struct Netcheck {
    /// print JSON
    #[argh(switch)]
    pub json: bool,
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "whois")]
/// show the machine and user behind a tailnet IP (v4 or v6), or behind an address in a subnet
/// route a node serves
pub struct Whois {
    /// IP, IP:port or [IPv6]:port
    #[argh(positional, arg_name = "ip[:port]")]
    pub addr: String,
    /// print JSON (Node, UserProfile), as `tailscale whois --json`
    #[argh(switch)]
    pub json: bool,
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "dns")]
/// MagicDNS on this node: its configuration, and what it answers for a name
pub struct DnsCmd {
    #[argh(subcommand)]
    pub cmd: DnsSub,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum DnsSub {
    Status(DnsStatus),
    Query(DnsQuery),
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "status")]
/// print the DNS settings: MagicDNS on/off, suffix, resolvers, split DNS routes, search
/// domains, and the system resolvers other names go to
pub struct DnsStatus {
    /// print JSON
    #[argh(switch)]
    pub json: bool,
    /// also print fallback resolvers, nameservers, certificate domains, extra records and the
    /// exit node filtered set (tailscale's --all)
    #[argh(switch)]
    pub all: bool,
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "query")]
/// ask this node's MagicDNS (100.100.100.100) for NAME, without sending anything: its records,
/// or where the query would be forwarded
pub struct DnsQuery {
    /// the name (for PTR also an IP)
    #[argh(positional)]
    pub name: String,
    /// record type: A (default), AAAA, PTR, CNAME, MX, NS, SRV, TXT, ANY
    #[argh(positional, arg_name = "type")]
    pub qtype: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub json: bool,
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "metrics")]
/// print the daemon's metrics in the Prometheus text format: per-peer bytes, handshake age and
/// path, DERP and control state, packet counts and drops (`metrics print` as in tailscale)
pub struct MetricsCmd {
    #[argh(subcommand)]
    pub cmd: Option<MetricsSub>,
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum MetricsSub {
    Print(MetricsPrint),
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "print")]
/// the same as `tinyscale metrics`
pub struct MetricsPrint {}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "exit-node")]
/// exit nodes of the tailnet
pub struct ExitNodeCmd {
    #[argh(subcommand)]
    pub cmd: ExitNodeSub,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum ExitNodeSub {
    List(ExitNodeList),
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "list")]
/// list the peers that offer themselves as exit nodes (approved for 0.0.0.0/0 and ::/0), as
/// `tailscale exit-node list` does
pub struct ExitNodeList {
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "debug")]
/// show the running daemon's internal state, for troubleshooting
pub struct DebugCmd {
    #[argh(subcommand)]
    pub cmd: DebugSub,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum DebugSub {
    Filter(DebugFilter),
    DnsUci(DebugDnsUci),
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "dns-uci")]
/// print the uci batch for dnsmasq to forward MagicDNS names to 100.100.100.100 (or to
/// remove that)
pub struct DebugDnsUci {
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
    /// remove our entries whatever the daemon says (the daemon is not asked)
    #[argh(switch)]
    pub remove: bool,
    /// dnsmasq's uci file (default /etc/config/dhcp)
    #[argh(option)]
    pub dhcp: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "filter")]
/// print the packet filter in force as JSON: the rules from control (as sent and as
/// compiled), the local set (this node's addresses and the subnet routes it serves), shields
/// up, tracked flows and drop counters
pub struct DebugFilter {
    /// daemon socket
    #[argh(option)]
    pub socket: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "stun")]
/// run a standalone STUN server
pub struct Stun {
    /// UDP address to listen on (default 0.0.0.0:3478)
    #[argh(option)]
    pub listen: Option<String>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "server")]
/// the coordinator: `serve` runs it; users/preauthkeys/nodes/routes/policy administer it
pub struct Server {
    /// uci config file (default /etc/config/tinyscale); may appear anywhere after `server`
    #[argh(option, short = 'c')]
    pub config: Option<PathBuf>,
    /// run the verb on the coordinator at this URL (https://host[:port]) through its REST API
    /// instead of the local admin socket
    #[cfg(feature = "coordinator")]
    #[argh(option)]
    pub remote: Option<String>,
    /// API key for --remote (default: the TINYSCALE_API_KEY environment variable, which keeps
    /// it out of the process list)
    #[cfg(feature = "coordinator")]
    #[argh(option)]
    pub api_key: Option<String>,
    #[argh(subcommand)]
    pub cmd: ServerCmd,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum ServerCmd {
    Serve(Serve),
    Users(Users),
    Preauthkeys(Preauthkeys),
    Nodes(Nodes),
    Routes(Routes),
    Policy(PolicyArgs),
    #[cfg(feature = "coordinator")]
    Apikeys(Apikeys),
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "serve")]
/// run the coordinator (control server) with the config's `config server 'main'` section; the
/// flags below replace the options of the same name in that section
pub struct Serve {
    /// ubusd socket for the `tinyscale.server` object (default /var/run/ubus/ubus.sock; "none"
    /// for no ubus object)
    #[argh(option, default = "String::from(crate::platform::ubus_object::DEFAULT_SOCKET)")]
    pub ubus_socket: String,
    /// turn MagicDNS on or off (uci magic_dns; default true)
    #[argh(option)]
    pub magic_dns: Option<bool>,
    /// the MagicDNS domain: nodes are <host>.<base-domain> (uci base_domain; default tailnet.internal)
    #[argh(option)]
    pub base_domain: Option<String>,
    /// global resolver pushed to clients, repeatable (uci list nameserver)
    #[argh(option)]
    pub nameserver: Vec<String>,
    /// split DNS: domain=resolver[,domain=resolver...], repeatable (uci list split_dns)
    #[argh(option)]
    pub split_dns: Vec<String>,
    /// extra MagicDNS records: name=IP[,name=IP...], repeatable (uci list extra_records)
    #[argh(option)]
    pub extra_records: Vec<String>,
    /// serve Prometheus metrics at GET /metrics on ip:port (uci metrics_listen_addr; default
    /// 127.0.0.1:9090; a bare :port stays on loopback; "" turns it off)
    #[argh(option)]
    pub metrics_listen: Option<String>,
}

impl Serve {
    /// The flags as uci options (line 0: from the command line) for
    /// [`crate::platform::uci::server::ServerConfig::from_uci_with`].
    pub fn uci_overrides(&self) -> Vec<crate::platform::uci::UciOption> {
        let opt = |name: &str, value: String, list: bool| crate::platform::uci::UciOption {
            name: name.into(),
            value,
            list,
            line: 0,
        };
        let mut v = Vec::new();
        if let Some(b) = self.magic_dns {
            v.push(opt("magic_dns", b.to_string(), false));
        }
        if let Some(d) = &self.base_domain {
            v.push(opt("base_domain", d.clone(), false));
        }
        if let Some(a) = &self.metrics_listen {
            v.push(opt("metrics_listen_addr", a.clone(), false));
        }
        let lists = [
            ("nameserver", &self.nameserver),
            ("split_dns", &self.split_dns),
            ("extra_records", &self.extra_records),
        ];
        for (name, values) in lists {
            v.extend(values.iter().map(|x| opt(name, x.clone(), true)));
        }
        v
    }
}

#[cfg(feature = "coordinator")]
#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "apikeys")]
/// manage the API keys of the REST API (/api/v1, `Authorization: Bearer KEY`)
pub struct Apikeys {
    #[argh(subcommand)]
    pub cmd: ApikeysCmd,
}

#[cfg(feature = "coordinator")]
#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum ApikeysCmd {
    Create(ApikeysCreate),
    List(ApikeysList),
    Expire(ApikeysExpire),
    Delete(ApikeysDelete),
}

#[cfg(feature = "coordinator")]
#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "create")]
/// create an API key; it is printed once and only its hash is kept
pub struct ApikeysCreate {
    /// validity, e.g. 90d (the default), 4w, 1y, 720h; 0 for none
    #[argh(option, short = 'e')]
    pub expiration: Option<String>,
    /// output format: json
    #[argh(option, short = 'o')]
    pub output: Option<String>,
}

#[cfg(feature = "coordinator")]
#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "list")]
/// list API keys (prefixes only)
pub struct ApikeysList {
    /// output format: json
    #[argh(option, short = 'o')]
    pub output: Option<String>,
}

#[cfg(feature = "coordinator")]
#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "expire")]
/// expire an API key now
pub struct ApikeysExpire {
    /// the key's prefix (as listed)
    #[argh(option, short = 'p')]
    pub prefix: String,
}

#[cfg(feature = "coordinator")]
#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "delete")]
/// delete an API key
pub struct ApikeysDelete {
    /// the key's prefix (as listed)
    #[argh(option, short = 'p')]
    pub prefix: String,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "users")]
/// manage users
pub struct Users {
    #[argh(subcommand)]
    pub cmd: UsersCmd,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum UsersCmd {
    Create(UsersCreate),
    List(UsersList),
    Rename(UsersRename),
    Destroy(UsersDestroy),
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "create")]
/// create a user
pub struct UsersCreate {
    /// user name
    #[argh(positional)]
    pub name: String,
    /// output format: json
    #[argh(option, short = 'o')]
    pub output: Option<String>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "list")]
/// list users
pub struct UsersList {
    /// output format: json
    #[argh(option, short = 'o')]
    pub output: Option<String>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "rename")]
/// rename a user: `users rename OLD NEW` or `--name OLD --new-name NEW`
pub struct UsersRename {
    /// old and new name
    #[argh(positional)]
    pub names: Vec<String>,
    /// current name
    #[argh(option)]
    pub name: Option<String>,
    /// new name
    #[argh(option)]
    pub new_name: Option<String>,
    /// output format: json
    #[argh(option, short = 'o')]
    pub output: Option<String>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "destroy")]
/// delete a user that owns no nodes
pub struct UsersDestroy {
    /// user name
    #[argh(positional)]
    pub user: Option<String>,
    /// user name
    #[argh(option)]
    pub name: Option<String>,
    /// do not ask for confirmation (accepted for headscale compatibility)
    #[argh(switch)]
    pub force: bool,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "preauthkeys")]
/// manage pre-auth keys
pub struct Preauthkeys {
    #[argh(subcommand)]
    pub cmd: KeysCmd,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum KeysCmd {
    Create(KeysCreate),
    List(KeysList),
    Expire(KeysExpire),
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "create")]
/// create a pre-auth key for unattended `up --authkey`
pub struct KeysCreate {
    /// owner
    #[argh(option, short = 'u')]
    pub user: String,
    /// usable for more than one node
    #[argh(switch)]
    pub reusable: bool,
    /// nodes registered with it are deleted after going offline
    #[argh(switch)]
    pub ephemeral: bool,
    /// validity, e.g. 1h, 24h, 90d-style 2160h (default 1h, as headscale)
    #[argh(option, short = 'e')]
    pub expiration: Option<String>,
    /// ACL tags for nodes registered with it, comma-separated (tag:server,…)
    #[argh(option)]
    pub tags: Option<String>,
    /// output format: json
    #[argh(option, short = 'o')]
    pub output: Option<String>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "list")]
/// list pre-auth keys
pub struct KeysList {
    /// only this user's keys
    #[argh(option, short = 'u')]
    pub user: Option<String>,
    /// output format: json
    #[argh(option, short = 'o')]
    pub output: Option<String>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "expire")]
/// expire a pre-auth key now
pub struct KeysExpire {
    /// the key text or its id
    #[argh(positional)]
    pub key: String,
    /// owner (accepted for headscale compatibility)
    #[argh(option, short = 'u')]
    pub user: Option<String>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "nodes")]
/// manage nodes
pub struct Nodes {
    #[argh(subcommand)]
    pub cmd: NodesCmd,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum NodesCmd {
    Register(NodesRegister),
    List(NodesList),
    Delete(NodesDelete),
    Expire(NodesExpire),
    Rename(NodesRename),
    Move(NodesMove),
    ApproveRoutes(NodesApproveRoutes),
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "register")]
/// approve a machine waiting at a /register/<key> login URL
pub struct NodesRegister {
    /// owner of the new node
    #[argh(option, short = 'u')]
    pub user: String,
    /// the key shown on the registration page (the last part of the login URL)
    #[argh(option, short = 'k')]
    pub key: String,
    /// output format: json
    #[argh(option, short = 'o')]
    pub output: Option<String>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "list")]
/// list nodes with addresses, user, online state and last seen
pub struct NodesList {
    /// only this user's nodes
    #[argh(option, short = 'u')]
    pub user: Option<String>,
    /// output format: json
    #[argh(option, short = 'o')]
    pub output: Option<String>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "delete")]
/// delete a node (peers drop it at once)
pub struct NodesDelete {
    /// node id
    #[argh(option, short = 'i')]
    pub identifier: u64,
    /// do not ask for confirmation (accepted for headscale compatibility)
    #[argh(switch)]
    pub force: bool,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "expire")]
/// expire a node's key now (it must log in again)
pub struct NodesExpire {
    /// node id
    #[argh(option, short = 'i')]
    pub identifier: u64,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "rename")]
/// set a node's DNS name
pub struct NodesRename {
    /// node id
    #[argh(option, short = 'i')]
    pub identifier: u64,
    /// new name (lowercase letters, digits, '-')
    #[argh(positional)]
    pub name: String,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "move")]
/// give a node to another user
pub struct NodesMove {
    /// node id
    #[argh(option, short = 'i')]
    pub identifier: u64,
    /// new owner
    #[argh(option, short = 'u')]
    pub user: String,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "approve-routes")]
/// set the routes approved for a node (replaces the approved set; "" approves none)
pub struct NodesApproveRoutes {
    /// node id
    #[argh(option, short = 'i')]
    pub identifier: u64,
    /// comma-separated CIDRs, e.g. 192.168.1.0/24,0.0.0.0/0,::/0
    #[argh(option, short = 'r')]
    pub routes: String,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "routes")]
/// list and enable subnet routes
pub struct Routes {
    #[argh(subcommand)]
    pub cmd: RoutesCmd,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum RoutesCmd {
    List(RoutesList),
    Enable(RoutesEnable),
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "list")]
/// list advertised and approved routes
pub struct RoutesList {
    /// only this node's routes (node id)
    #[argh(option, short = 'i')]
    pub identifier: Option<u64>,
    /// output format: json
    #[argh(option, short = 'o')]
    pub output: Option<String>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "enable")]
/// approve routes for a node (adds to the approved set; headscale's `routes enable -i ID -r CIDR`)
pub struct RoutesEnable {
    /// node id
    #[argh(option, short = 'i')]
    pub identifier: u64,
    /// CIDR(s), comma-separated or repeated
    #[argh(option, short = 'r')]
    pub route: Vec<String>,
    /// all the routes the node advertises
    #[argh(switch, short = 'a')]
    pub all: bool,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "policy")]
/// show, set, check or clear the ACL policy (headscale's HuJSON policy format)
pub struct PolicyArgs {
    #[argh(subcommand)]
    pub cmd: PolicyCmd,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand)]
pub enum PolicyCmd {
    Get(PolicyGet),
    Set(PolicySet),
    Check(PolicyCheck),
    Clear(PolicyClear),
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "get")]
/// print the policy in force, as it was set
pub struct PolicyGet {}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "set")]
/// replace the policy with FILE; a policy with errors is refused and the old one stays
pub struct PolicySet {
    /// the policy file (HuJSON)
    #[argh(positional, arg_name = "FILE")]
    pub input: Option<PathBuf>,
    /// the policy file (headscale's spelling)
    #[argh(option, short = 'f')]
    pub file: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "check")]
/// check FILE without applying it: prints each error with its line (no server needed)
pub struct PolicyCheck {
    /// the policy file (HuJSON)
    #[argh(positional, arg_name = "FILE")]
    pub input: Option<PathBuf>,
    /// the policy file (headscale's spelling)
    #[argh(option, short = 'f')]
    pub file: Option<PathBuf>,
}

#[derive(FromArgs, Debug)]
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[argh(subcommand, name = "clear")]
/// remove the policy: all traffic is allowed again
pub struct PolicyClear {}

/// Reads the policy file named by a positional or `-f`.
#[cfg(feature = "coordinator")]
fn read_policy_file(file: Option<PathBuf>, path: Option<PathBuf>) -> Result<(PathBuf, String), Failure> {
    let Some(p) = file.or(path) else {
        return Err(Failure::usage("which policy file? (policy set|check FILE)"));
    };
    let text = std::fs::read_to_string(&p).map_err(|e| Failure::config(format!("cannot read {}: {e}", p.display())))?;
    Ok((p, text))
}

/// `server policy check`: every error of the file, one per line, prefixed with the file name.
#[cfg(feature = "coordinator")]
pub fn policy_check(path: &std::path::Path, text: &str) -> Result<(), Failure> {
    match crate::coordinator::policy::Policy::parse(text) {
        Ok(_) => {
            println!("{}: policy is valid", path.display());
            Ok(())
        }
        Err(errs) => {
            for e in &errs.0 {
                eprintln!("{}: {e}", path.display());
            }
            Err(Failure::config(format!(
                "{}: {} error(s), policy refused",
                path.display(),
                errs.0.len()
            )))
        }
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

fn socket_or_default(s: Option<PathBuf>) -> PathBuf {
    s.or_else(|| std::env::var_os("TINYSCALE_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(ipc::DEFAULT_SOCKET))
}

#[cfg_attr(not(feature = "coordinator"), allow(dead_code))]
fn want_json(o: &Option<String>) -> Result<bool, Failure> {
    match o.as_deref() {
        None | Some("") => Ok(false),
        Some("json") | Some("json-line") => Ok(true),
        Some(x) => Err(Failure::usage(format!("unknown output format {x:?}: use -o json"))),
    }
}

/// Renders rows as an aligned text table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) if x.is_empty() => "-".into(),
        Value::String(x) => x.clone(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Runs a client verb.
pub async fn run_client(cmd: Cmd) -> Result<(), Failure> {
    match cmd {
        Cmd::Up(u) => up(u).await,
        Cmd::Set(st) => {
            let socket = socket_or_default(st.socket.clone());
            let args = st
                .up_args()
                .ok_or_else(|| Failure::usage("set: no setting given (`tinyscale set --help` lists them)"))?;
            ipc::call(&socket, &IpcRequest::Set(args)).await?;
            Ok(())
        }
        Cmd::Down(d) => {
            ipc::call(&socket_or_default(d.socket), &IpcRequest::Down).await?;
            Ok(())
        }
        Cmd::Logout(l) => {
            let v = ipc::call(&socket_or_default(l.socket), &IpcRequest::Logout).await?;
            if let Some(note) = v.get("note").and_then(Value::as_str).filter(|n| !n.is_empty()) {
                eprintln!("logged out locally; {note}");
            }
            Ok(())
        }
        Cmd::Status(st) => {
            let v = ipc::call(&socket_or_default(st.socket), &IpcRequest::Status).await?;
            if st.json {
                print_json(&v);
            } else {
                print!("{}", render_status(&v));
            }
            Ok(())
        }
        Cmd::Ip(ip) => {
            let v = ipc::call(&socket_or_default(ip.socket), &IpcRequest::Status).await?;
            let ips: Vec<String> = v["Self"]["TailscaleIPs"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            if ips.is_empty() {
                return Err(Failure::runtime("no tailnet address yet: run `tinyscale up` first"));
            }
            for a in ips {
                let is4 = !a.contains(':');
                if (!ip.v4 && !ip.v6) || (ip.v4 && is4) || (ip.v6 && !is4) {
                    println!("{a}");
                }
            }
            Ok(())
        }
        Cmd::Ping(p) => {
            let socket = socket_or_default(p.socket);
            // tailscale spells --until-count as --until-direct=false.
            let keep_going = p.until_count || p.until_direct == Some(false);
            let mut any = false;
            for i in 0..p.count.max(1) {
                match ipc::call(&socket, &IpcRequest::Ping { peer: p.peer.clone() }).await {
                    Ok(v) => {
                        any = true;
                        println!(
                            "pong from {} ({}) via {} in {:.0}ms",
                            s(&v["Name"]),
                            s(&v["IP"]),
                            s(&v["Via"]),
                            v["LatencyMs"].as_f64().unwrap_or(0.0)
                        );
                        if v["Direct"] == true && !keep_going {
                            return Ok(());
                        }
                    }
                    Err(e) if e.starts_with("no peer") || e.contains("not running") => return Err(Failure::runtime(e)),
                    Err(e) => println!("ping {}: {e}", i + 1),
                }
            }
            if any {
                if !keep_going {
                    println!("direct connection not established");
                }
                Ok(())
            } else {
                Err(Failure::runtime(format!("no reply from {}", p.peer)))
            }
        }
        Cmd::Netcheck(n) => {
            let v = ipc::call(&socket_or_default(n.socket), &IpcRequest::Netcheck).await?;
            if n.json {
                print_json(&v);
                return Ok(());
            }
            if v.is_null() {
                return Err(Failure::runtime("no netcheck report yet; try again in a few seconds"));
            }
            println!("Report:");
            println!("\t* UDP: {}", v["UDP"]);
            println!(
                "\t* IPv4: {}",
                if v["IPv4"] == true {
                    format!("yes, {}", s(&v["GlobalV4"]))
                } else {
                    "no".into()
                }
            );
            println!("\t* IPv6: {}", ipv6_line(&v));
            let mv = match v["MappingVariesByDestIP"].as_bool() {
                Some(true) => "true (hard NAT: direct paths need the peer's help)",
                Some(false) => "false",
                None => "unknown (fewer than two STUN servers answered)",
            };
            println!("\t* MappingVariesByDestIP: {mv}");
            println!("\t* Nearest DERP: {}", s(&v["PreferredDERP"]));
            if v["LatencyVia"] == "https" {
                println!("\t* DERP latency (over HTTPS; UDP is blocked):");
            } else {
                println!("\t* DERP latency:");
            }
            if let Some(m) = v["RegionLatencyMs"].as_object() {
                for (r, ms) in m {
                    println!("\t\t- {r}: {:.1}ms", ms.as_f64().unwrap_or(0.0));
                }
            }
            Ok(())
        }
        Cmd::Whois(_) | Cmd::Dns(_) | Cmd::Metrics(_) => {
            // One daemon call site for these verbs (each await site costs code on the router).
            let (socket, req, json, shape, text) = lookup_plan(cmd);
            let v = shape(ipc::call(&socket_or_default(socket), &req).await?);
            if json {
                print_json(&v);
            } else {
                print!("{}", text(&v));
            }
            Ok(())
        }
        Cmd::ExitNode(e) => match e.cmd {
            ExitNodeSub::List(l) => {
                let v = ipc::call(&socket_or_default(l.socket), &IpcRequest::Status).await?;
                print!("{}", render_exit_nodes(&v));
                Ok(())
            }
        },
        Cmd::Debug(d) => match d.cmd {
            DebugSub::Filter(f) => {
                let v = ipc::call(&socket_or_default(f.socket), &IpcRequest::DebugFilter).await?;
                print_json(&v);
                Ok(())
            }
            DebugSub::DnsUci(d) => debug_dns_uci(d).await,
        },
        _ => Err(Failure::usage("not a client command")),
    }
}

/// `debug dns-uci`: the MagicDNS suffix the daemon answers for, turned into the dnsmasq batch
/// for the current `/etc/config/dhcp`. Fails (and prints nothing) while the daemon is not
/// Running, so a caller can retry until it is.
async fn debug_dns_uci(d: DebugDnsUci) -> Result<(), Failure> {
    let suffix = if d.remove {
        None
    } else {
        let v = ipc::call(&socket_or_default(d.socket), &IpcRequest::Status).await?;
        if v["BackendState"] != "Running" {
            return Err(Failure::runtime("the daemon is not Running yet"));
        }
        magic_dns_suffix(&v)
    };
    let path = d.dhcp.unwrap_or_else(|| PathBuf::from("/etc/config/dhcp"));
    // No dhcp file: no dnsmasq to configure (an empty batch).
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let batch = crate::platform::uci::dnsmasq::batch(&text, suffix.as_deref())
        .map_err(|e| Failure::config(format!("{}: {e}", path.display())))?;
    print!("{batch}");
    Ok(())
}

/// The suffix dnsmasq should forward, from `status --json`: only while this node answers
/// MagicDNS (control turned it on and `--accept-dns` is on).
pub fn magic_dns_suffix(status: &Value) -> Option<String> {
    let dns = &status["DNS"];
    (dns["MagicDNS"] == true)
        .then(|| dns["MagicDNSSuffix"].as_str().unwrap_or("").to_string())
        .filter(|s| !s.is_empty())
}

/// The `IPv6:` line of `netcheck` (as Go words it): the global address when IPv6 UDP works,
/// else whether the host has IPv6 at all.
fn ipv6_line(v: &Value) -> String {
    if v["IPv6"] == true {
        format!("yes, {}", v["GlobalV6"].as_str().unwrap_or("?"))
    } else if v["OSHasIPv6"] == true {
        "no, but OS has support".into()
    } else {
        "no, unavailable in OS".into()
    }
}

/// Human-readable `status`.
pub fn render_status(v: &Value) -> String {
    let state = v["BackendState"].as_str().unwrap_or("NoState");
    let mut out = String::new();
    if state != "Running" {
        out.push_str(&format!("state: {state}\n"));
        if let Some(u) = v["AuthURL"].as_str().filter(|u| !u.is_empty()) {
            out.push_str(&format!("Log in at: {u}\n"));
        }
        if let Some(e) = v["Error"].as_str().filter(|e| !e.is_empty()) {
            out.push_str(&format!("last error: {e}\n"));
        }
    }
    let mut rows = Vec::new();
    let row = |n: &Value, me: bool| -> Vec<String> {
        let ips = n["TailscaleIPs"].as_array().cloned().unwrap_or_default();
        let path = match (n["CurAddr"].as_str().unwrap_or(""), n["Relay"].as_str().unwrap_or("")) {
            ("", "") => String::new(),
            ("", relay) => format!("; relay \"{relay}\""),
            (direct, _) => format!("; direct {direct}"),
        };
        // Go's status words for exit nodes.
        let exit = if n["ExitNode"] == true {
            "; exit node"
        } else if n["ExitNodeOption"] == true {
            "; offers exit node"
        } else {
            ""
        };
        let online = if me {
            "-".to_string()
        } else if n["Online"].as_bool().unwrap_or(false) {
            format!("online{exit}{path}")
        } else {
            match n["LastSeen"].as_str() {
                Some(t) => format!("offline{exit}, last seen {t}"),
                None => format!("offline{exit}"),
            }
        };
        vec![
            ips.first().map(s).unwrap_or_default(),
            ips.get(1).map(s).unwrap_or_default(),
            s(&n["HostName"]),
            s(&n["User"]),
            s(&n["OS"]),
            online,
        ]
    };
    if !v["Self"].is_null() {
        rows.push(row(&v["Self"], true));
    }
    for p in v["Peer"].as_array().into_iter().flatten() {
        rows.push(row(p, false));
    }
    if !rows.is_empty() {
        out.push_str(&table(&["IPV4", "IPV6", "NAME", "USER", "OS", "STATUS"], &rows));
    }
    out
}

/// [pure] `exit-node list`: the peers whose AllowedIPs hold both default routes (control
/// approved them as exit nodes), in tailscale's columns; no location data (`-`). STATUS says
/// `offline` or, for the one in use (`ExitNode`), `selected`.
pub fn render_exit_nodes(v: &Value) -> String {
    let s = |x: &Value| x.as_str().unwrap_or("").to_string();
    let mut rows = Vec::new();
    for p in v["Peer"].as_array().into_iter().flatten() {
        let allowed: Vec<&str> = p["AllowedIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !(allowed.contains(&"0.0.0.0/0") && allowed.contains(&"::/0")) {
            continue;
        }
        let ip = p["TailscaleIPs"][0].as_str().unwrap_or("").to_string();
        let name = s(&p["HostName"]);
        let status = if p["ExitNode"] == true {
            "selected"
        } else if p["Online"].as_bool() == Some(false) {
            "offline"
        } else {
            "-"
        };
        rows.push(vec![ip, name, "-".into(), "-".into(), status.to_string()]);
    }
    if rows.is_empty() {
        return "no exit nodes found (a node offers itself with `up --advertise-exit-node`; the \
                coordinator approves 0.0.0.0/0 and ::/0)\n"
            .to_string();
    }
    table(&["IP", "HOSTNAME", "COUNTRY", "CITY", "STATUS"], &rows)
}

/// What `whois`, `dns status|query` and `metrics` ask the daemon, whether to print JSON, how the
/// answer is shaped for printing and how it reads as text.
type LookupPlan = (
    Option<PathBuf>,
    IpcRequest,
    bool,
    fn(Value) -> Value,
    fn(&Value) -> String,
);

fn lookup_plan(cmd: Cmd) -> LookupPlan {
    fn same(v: Value) -> Value {
        v
    }
    fn dns_status(v: Value) -> Value {
        let conf = std::fs::read_to_string(crate::dataplane::engine::RESOLV_CONF).unwrap_or_default();
        dns::status_json(&v, &conf)
    }
    let lookup = |arg: String, qtype: Option<String>| ipc::Lookup {
        arg,
        qtype: qtype.unwrap_or_default(),
    };
    match cmd {
        Cmd::Whois(w) => (
            w.socket,
            IpcRequest::WhoIs(lookup(w.addr, None)),
            w.json,
            same,
            render_whois,
        ),
        Cmd::Dns(DnsCmd {
            cmd: DnsSub::Status(st),
        }) => {
            let render = if st.all {
                dns::render_status_all
            } else {
                dns::render_status
            };
            (st.socket, IpcRequest::Status, st.json, dns_status, render)
        }
        Cmd::Dns(DnsCmd { cmd: DnsSub::Query(q) }) => {
            let t = Some(q.qtype.unwrap_or_else(|| "A".into()));
            (
                q.socket,
                IpcRequest::DnsQuery(lookup(q.name, t)),
                q.json,
                same,
                dns::render_query,
            )
        }
        // Metrics, the only other caller.
        other => {
            let socket = match other {
                Cmd::Metrics(m) => m.socket,
                _ => None,
            };
            (
                socket,
                IpcRequest::Status,
                false,
                same,
                crate::platform::metrics::render,
            )
        }
    }
}

/// Lines of `(label, value)` with the values in one column, as Go's
/// `tabwriter.NewWriter(w, 10, 5, 5, ' ', 0)` lays them out (cell = widest label + 5, at least 10).
fn label_block(out: &mut String, lines: &[(&str, String)]) {
    let w = lines.iter().map(|(l, _)| l.len() + 5).max().unwrap_or(0).max(10);
    for (l, v) in lines {
        out.push_str(&format!("{l:<w$}{v}\n"));
    }
}

/// Go's `%s` of a slice: `[a b c]`.
fn go_list(v: &[Value]) -> String {
    let items: Vec<&str> = v.iter().filter_map(Value::as_str).collect();
    format!("[{}]", items.join(" "))
}

/// [pure] `whois` as tailscale prints it: the machine (name, stable ID, addresses, further
/// AllowedIPs, OS), then its tags or its user.
pub fn render_whois(v: &Value) -> String {
    let n = &v["Node"];
    let mut m = vec![
        (
            "  Name:",
            n["Name"].as_str().unwrap_or("").trim_end_matches('.').to_string(),
        ),
        ("  ID:", n["StableID"].as_str().unwrap_or("").to_string()),
        (
            "  Addresses:",
            go_list(n["Addresses"].as_array().map_or(&[], Vec::as_slice)),
        ),
    ];
    // The first two AllowedIPs are the node's own addresses (Go prints the rest).
    if let Some(more) = n["AllowedIPs"]
        .as_array()
        .and_then(|a| a.get(2..))
        .filter(|a| !a.is_empty())
    {
        m.push(("  AllowedIPs:", go_list(more)));
    }
    if let Some(os) = n["Hostinfo"]["OS"].as_str().filter(|o| !o.is_empty()) {
        m.push(("  OS:", os.to_string()));
    }
    let tags: Vec<&str> = n["Tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut out = String::from("Machine:\n");
    if !tags.is_empty() {
        m.push(("  Tags:", tags.join(", ")));
        label_block(&mut out, &m);
    } else {
        label_block(&mut out, &m);
        out.push_str("User:\n");
        let u = &v["UserProfile"];
        label_block(
            &mut out,
            &[
                ("  Name:", u["LoginName"].as_str().unwrap_or("").to_string()),
                ("  ID:", u["ID"].to_string()),
            ],
        );
    }
    // Capabilities as Go prints them: the name, then its values as indented JSON lined up
    // under it (a bare name when it has none). Names sorted (Go's map order is random).
    if let Some(caps) = v["CapMap"].as_object().filter(|c| !c.is_empty()) {
        out.push_str("Capabilities:\n");
        for (cap, vals) in caps {
            match vals.as_array().filter(|a| !a.is_empty()) {
                Some(_) => {
                    let json = serde_json::to_string_pretty(vals).unwrap_or_default();
                    out.push_str(&format!("  - {cap}:\n      {}\n", json.replace('\n', "\n      ")));
                }
                None => out.push_str(&format!("  - {cap}\n")),
            }
        }
    }
    out
}

/// Reads and validates the `config client` section of `path`; unknown options are logged as
/// warnings, a missing file yields the defaults, errors exit with code 3.
pub fn load_client_config(path: &std::path::Path) -> Result<crate::platform::uci::client::ClientConfig, Failure> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log::warn!("config {} not found, using defaults", path.display());
            String::new()
        }
        Err(e) => return Err(Failure::config(format!("cannot read {}: {e}", path.display()))),
    };
    let load = crate::platform::uci::client::ClientConfig::from_uci_text(&text)
        .map_err(|e| Failure::config(format!("{}: {e}", path.display())))?;
    for w in &load.warnings {
        log::warn!("{}: {w}", path.display());
    }
    Ok(load.config)
}

/// The prefs a `config client` section asks for: reads `auth_key_file`. `advertise_lan`
/// names `lan_device` to the daemon, which reads and follows its prefixes.
pub fn client_up_args(c: &crate::platform::uci::client::ClientConfig) -> Result<UpArgs, Failure> {
    let file_key = match &c.auth_key_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| Failure::config(format!("cannot read auth_key_file {}: {e}", p.display())))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    Ok(c.up_args(file_key))
}

/// `base` with every setting `flags` states replacing it (command-line flags beside
/// `--config` win).
fn overlay(mut base: UpArgs, flags: UpArgs) -> UpArgs {
    macro_rules! take {
        ($($f:ident: $t:ident),*) => { $( if flags.$f.is_some() { base.$f = flags.$f; } )* };
    }
    take!(login_server: STRING, auth_key: STRING);
    crate::platform::ipc::for_each_pref!(take);
    base.force_reauth |= flags.force_reauth;
    base
}

async fn up(u: Up) -> Result<(), Failure> {
    let socket = socket_or_default(u.socket);
    let timeout = match &u.timeout {
        Some(t) => {
            Some(crate::platform::uci::parse_duration(t).map_err(|e| Failure::usage(format!("--timeout {t:?}: {e}")))?)
        }
        None => None,
    };
    let auth_key = match u.auth_key {
        Some(k) if k.starts_with("file:") => Some(
            std::fs::read_to_string(&k[5..])
                .map_err(|e| Failure::usage(format!("cannot read auth key file {}: {e}", &k[5..])))?
                .trim()
                .to_string(),
        ),
        k => k,
    };
    let flags = UpArgs {
        login_server: u.login_server,
        auth_key,
        hostname: u.hostname,
        advertise_routes: u.advertise_routes.as_deref().map(split_list),
        advertise_lan: u.advertise_lan,
        accept_routes: u.accept_routes,
        accept_dns: u.accept_dns,
        advertise_exit_node: u.advertise_exit_node,
        exit_node: u.exit_node,
        exit_node_allow_lan_access: u.exit_node_allow_lan_access,
        advertise_tags: u.advertise_tags.as_deref().map(split_list),
        shields_up: u.shields_up,
        snat_subnet_routes: u.snat_subnet_routes,
        force_reauth: u.force_reauth,
        reset: u.reset,
    };
    if flags.exit_node.as_deref() == Some("") && flags.exit_node_allow_lan_access == Some(true) {
        // Go's up: LAN access is a property of using an exit node.
        return Err(Failure::usage(
            "--exit-node-allow-lan-access can only be used with --exit-node",
        ));
    }
    let args = match &u.config {
        Some(path) => overlay(client_up_args(&load_client_config(path)?)?, flags),
        None => flags,
    };
    ipc::call(&socket, &IpcRequest::Up(args)).await?;
    // From the init script (reload): the daemon has the prefs; it logs in on its own.
    if let (Some(path), None) = (&u.config, timeout) {
        eprintln!(
            "prefs from {} applied; `tinyscale status` shows progress",
            path.display()
        );
        return Ok(());
    }
    // Poll the daemon (with a deadline when --timeout is set) until Running or a hard failure.
    let start = tokio::time::Instant::now();
    let mut shown_url = String::new();
    let mut last_err = String::new();
    loop {
        let v = ipc::call(&socket, &IpcRequest::Status).await?;
        let state = v["BackendState"].as_str().unwrap_or("");
        let url = v["AuthURL"].as_str().unwrap_or("");
        let err = v["Error"].as_str().unwrap_or("");
        let want = v["Prefs"]["want_running"].as_bool().unwrap_or(true);
        if state == "Running" {
            if !shown_url.is_empty() {
                eprintln!("Success.");
            }
            return Ok(());
        }
        if !url.is_empty() && url != shown_url {
            eprintln!("\nTo authenticate, visit:\n\n\t{url}\n");
            if u.qr {
                match crate::platform::qr::encode(url.as_bytes()) {
                    Ok(code) => eprintln!("{}", crate::platform::qr::render_terminal(&code)),
                    Err(e) => eprintln!("(no QR code: {e})"),
                }
            }
            shown_url = url.to_string();
        }
        if !want && !err.is_empty() {
            return Err(Failure::runtime(err.to_string()));
        }
        if !err.is_empty() && err != last_err {
            eprintln!("waiting: {err}");
            last_err = err.to_string();
        }
        if let Some(t) = timeout {
            if start.elapsed() >= t {
                return Err(Failure::runtime(format!(
                    "timed out after {} waiting for the node to come up (state {state})",
                    crate::platform::uci::format_duration(t)
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(feature = "coordinator")]
/// An API key validity: headscale's `90d`, `4w`, `1y`, or a Go duration (`720h`); seconds.
fn api_key_days(s: &str) -> Result<u64, String> {
    let unit = match s.as_bytes().last() {
        Some(b'd') => 86_400,
        Some(b'w') => 7 * 86_400,
        Some(b'y') => 365 * 86_400,
        _ => {
            return crate::platform::uci::parse_duration(s)
                .map(|d| d.as_secs())
                .map_err(|e| e.to_string())
        }
    };
    s[..s.len() - 1]
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| "expected a duration like 90d, 4w, 1y or 720h".into())
}

#[cfg(feature = "coordinator")]
/// Runs an admin verb against the coordinator's socket or, with `--remote`, its REST API.
pub async fn run_admin(target: &crate::coordinator::admin::AdminTarget, cmd: ServerCmd) -> Result<(), Failure> {
    use crate::coordinator::admin::AdminRequest as R;
    // `routes list -i ID`: headscale's per-node view.
    let mut only_node = None;
    let (req, json, kind) = match cmd {
        ServerCmd::Serve(_) => return Err(Failure::usage("serve is not an admin verb")),
        ServerCmd::Users(u) => match u.cmd {
            UsersCmd::Create(c) => (R::UsersCreate { name: c.name }, want_json(&c.output)?, "user"),
            UsersCmd::List(c) => (R::UsersList, want_json(&c.output)?, "users"),
            UsersCmd::Rename(c) => {
                let old = c.name.or_else(|| c.names.first().cloned());
                let new = c.new_name.or_else(|| c.names.get(1).cloned());
                let (Some(old), Some(new)) = (old, new) else {
                    return Err(Failure::usage(
                        "usage: users rename OLD NEW (or --name OLD --new-name NEW)",
                    ));
                };
                (R::UsersRename { old, new }, want_json(&c.output)?, "user")
            }
            UsersCmd::Destroy(c) => {
                let Some(name) = c.name.or(c.user) else {
                    return Err(Failure::usage("usage: users destroy NAME"));
                };
                (R::UsersDestroy { name }, false, "done")
            }
        },
        ServerCmd::Preauthkeys(k) => match k.cmd {
            KeysCmd::Create(c) => {
                let exp = c.expiration.as_deref().unwrap_or("1h");
                let d = crate::platform::uci::parse_duration(exp)
                    .map_err(|e| Failure::usage(format!("--expiration {exp:?}: {e}")))?;
                let expiration_secs = (!d.is_zero()).then_some(d.as_secs());
                let tags = c.tags.as_deref().map(split_list).unwrap_or_default();
                (
                    R::PreauthkeysCreate {
                        user: c.user,
                        reusable: c.reusable,
                        ephemeral: c.ephemeral,
                        expiration_secs,
                        tags,
                    },
                    want_json(&c.output)?,
                    "key",
                )
            }
            KeysCmd::List(c) => (R::PreauthkeysList { user: c.user }, want_json(&c.output)?, "keys"),
            KeysCmd::Expire(c) => (R::PreauthkeysExpire { key: c.key }, false, "done"),
        },
        ServerCmd::Nodes(n) => match n.cmd {
            NodesCmd::Register(c) => (
                R::NodesRegister {
                    user: c.user,
                    key: c.key,
                },
                want_json(&c.output)?,
                "registered",
            ),
            NodesCmd::List(c) => (R::NodesList { user: c.user }, want_json(&c.output)?, "nodes"),
            NodesCmd::Delete(c) => (R::NodesDelete { id: c.identifier }, false, "done"),
            NodesCmd::Expire(c) => (R::NodesExpire { id: c.identifier }, false, "done"),
            NodesCmd::Rename(c) => (
                R::NodesRename {
                    id: c.identifier,
                    name: c.name,
                },
                false,
                "done",
            ),
            NodesCmd::Move(c) => (
                R::NodesMove {
                    id: c.identifier,
                    user: c.user,
                },
                false,
                "done",
            ),
            NodesCmd::ApproveRoutes(c) => (
                R::NodesApproveRoutes {
                    id: c.identifier,
                    routes: split_list(&c.routes),
                },
                false,
                "done",
            ),
        },
        ServerCmd::Policy(p) => match p.cmd {
            PolicyCmd::Get(_) => (R::PolicyGet, false, "policy"),
            PolicyCmd::Set(c) => {
                let (_, policy) = read_policy_file(c.input, c.file)?;
                (R::PolicySet { policy }, false, "done")
            }
            PolicyCmd::Check(c) => {
                let (path, text) = read_policy_file(c.input, c.file)?;
                return policy_check(&path, &text);
            }
            PolicyCmd::Clear(_) => (R::PolicyClear, false, "done"),
        },
        ServerCmd::Apikeys(a) => match a.cmd {
            ApikeysCmd::Create(c) => {
                let exp = c.expiration.as_deref().unwrap_or("90d");
                let secs = api_key_days(exp).map_err(|e| Failure::usage(format!("--expiration {exp:?}: {e}")))?;
                (
                    R::ApikeysCreate {
                        expiration_secs: (secs > 0).then_some(secs),
                    },
                    want_json(&c.output)?,
                    "apikey",
                )
            }
            ApikeysCmd::List(c) => (R::ApikeysList, want_json(&c.output)?, "apikeys"),
            ApikeysCmd::Expire(c) => (R::ApikeysExpire { prefix: c.prefix }, false, "done"),
            ApikeysCmd::Delete(c) => (R::ApikeysDelete { prefix: c.prefix }, false, "done"),
        },
        ServerCmd::Routes(r) => match r.cmd {
            RoutesCmd::List(c) => {
                only_node = c.identifier;
                (R::RoutesList, want_json(&c.output)?, "routes")
            }
            RoutesCmd::Enable(c) => {
                let mut routes: Vec<String> = c.route.iter().flat_map(|r| split_list(r)).collect();
                if c.all {
                    let all = target.call(&R::RoutesList).await?;
                    let advertised = all
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|r| r["node_id"] == c.identifier && r["advertised"] == true)
                        .filter_map(|r| r["prefix"].as_str().map(str::to_string));
                    routes.extend(advertised);
                }
                if routes.is_empty() {
                    return Err(Failure::usage(if c.all {
                        format!("node {} advertises no routes", c.identifier)
                    } else {
                        "routes enable needs -r CIDR (or -a for all the node advertises)".to_string()
                    }));
                }
                (
                    R::RoutesEnable {
                        id: c.identifier,
                        routes,
                    },
                    false,
                    "routes",
                )
            }
        },
    };
    let mut v = target.call(&req).await?;
    if let (Some(id), Value::Array(rows)) = (only_node, &mut v) {
        rows.retain(|r| r["node_id"] == id);
    }
    if json {
        print_json(&v);
        return Ok(());
    }
    let rows = |v: &Value, cols: &[&str]| -> Vec<Vec<String>> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|r| cols.iter().map(|c| s(&r[*c])).collect())
            .collect()
    };
    match kind {
        "user" => println!("user {} (id {})", s(&v["name"]), s(&v["id"])),
        "users" => print!(
            "{}",
            table(&["ID", "NAME", "CREATED"], &rows(&v, &["id", "name", "created_at"]))
        ),
        "key" | "apikey" => println!("{}", s(&v["key"])),
        "apikeys" => print!(
            "{}",
            table(
                &["ID", "PREFIX", "EXPIRATION", "CREATED", "EXPIRED"],
                &rows(&v, &["id", "prefix", "expiration", "created_at", "expired"])
            )
        ),
        "keys" => print!(
            "{}",
            table(
                &[
                    "ID",
                    "KEY",
                    "USER",
                    "REUSABLE",
                    "EPHEMERAL",
                    "USED",
                    "EXPIRATION",
                    "TAGS"
                ],
                &rows(
                    &v,
                    &[
                        "id",
                        "key",
                        "user",
                        "reusable",
                        "ephemeral",
                        "used",
                        "expiration",
                        "acl_tags"
                    ]
                )
            )
        ),
        "registered" => println!(
            "node {} registered as {} (id {}, {})",
            s(&v["name"]),
            s(&v["given_name"]),
            s(&v["id"]),
            s(&v["ip_addresses"])
        ),
        "nodes" => {
            let mut r = rows(
                &v,
                &[
                    "id",
                    "given_name",
                    "user",
                    "ip_addresses",
                    "online",
                    "last_seen",
                    "expiry",
                ],
            );
            for row in &mut r {
                row[4] = if row[4] == "true" {
                    "online".into()
                } else {
                    "offline".into()
                };
            }
            print!(
                "{}",
                table(
                    &["ID", "NAME", "USER", "IP ADDRESSES", "CONNECTED", "LAST SEEN", "EXPIRY"],
                    &r
                )
            )
        }
        "policy" => match v["policy"].as_str() {
            Some(t) => print!("{t}{}", if t.ends_with('\n') { "" } else { "\n" }),
            None => eprintln!("no ACL policy is set: all traffic is allowed"),
        },
        "routes" => print!(
            "{}",
            table(
                &["NODE ID", "NODE", "PREFIX", "ADVERTISED", "ENABLED", "PRIMARY"],
                &rows(&v, &["node_id", "node", "prefix", "advertised", "enabled", "primary"])
            )
        ),
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "coordinator")]
    #[test]
    fn api_key_validity_takes_headscale_units() {
        assert_eq!(api_key_days("90d"), Ok(90 * 86_400));
        assert_eq!(api_key_days("2w"), Ok(14 * 86_400));
        assert_eq!(api_key_days("1y"), Ok(365 * 86_400));
        assert_eq!(api_key_days("36h"), Ok(36 * 3600));
        assert_eq!(api_key_days("0"), Ok(0));
        for bad in ["d", "xd", "-1d", "1.5d", "soon", ""] {
            assert!(api_key_days(bad).is_err(), "{bad}");
        }
        let a = Top::from_args(&["tinyscale"], &["server", "apikeys", "expire", "--prefix", "ab12"]).unwrap();
        let Cmd::Server(Server {
            cmd: ServerCmd::Apikeys(Apikeys {
                cmd: ApikeysCmd::Expire(e),
            }),
            ..
        }) = a.cmd
        else {
            panic!("parsed {a:?}");
        };
        assert_eq!(e.prefix, "ab12");
    }

    #[cfg(feature = "coordinator")]
    #[test]
    fn policy_check_refuses_with_the_config_exit_code() {
        let p = std::path::Path::new("p.hujson");
        assert!(policy_check(p, "// ok\n{\"acls\": [],}").is_ok());
        let e = policy_check(p, "{\n  \"acls\": [\n    {\"action\": \"drop\"}]}").unwrap_err();
        assert_eq!(e.code, crate::error::EXIT_CONFIG);
        assert!(e.message.contains("error(s)"), "{}", e.message);
        // `policy set` and `check` take the file positionally or as -f (headscale).
        let a = Top::from_args(&["tinyscale"], &["server", "policy", "set", "-f", "x.hujson"]).unwrap();
        let Cmd::Server(Server {
            cmd: ServerCmd::Policy(PolicyArgs {
                cmd: PolicyCmd::Set(s), ..
            }),
            ..
        }) = a.cmd
        else {
            panic!("parsed {a:?}");
        };
        assert_eq!((s.input, s.file), (None, Some(PathBuf::from("x.hujson"))));
    }

    #[test]
    fn flags_beside_config_win() {
        let cfg = crate::platform::uci::client::ClientConfig::from_uci_text(
            "config client\n\toption login_server 'http://10.0.0.1:8080'\n\toption accept_routes '1'\n",
        )
        .expect("valid")
        .config;
        let base = cfg.up_args(None);
        let flags = UpArgs {
            accept_routes: Some(false),
            hostname: Some("edge".into()),
            force_reauth: true,
            ..UpArgs::default()
        };
        let a = overlay(base.clone(), flags);
        assert_eq!(a.accept_routes, Some(false));
        assert_eq!(a.hostname.as_deref(), Some("edge"));
        assert!(a.force_reauth && a.reset);
        // What the flags leave unset comes from the file.
        assert_eq!(a.login_server, base.login_server);
        assert_eq!(a.snat_subnet_routes, Some(true));
        assert_eq!(overlay(base.clone(), UpArgs::default()), base);
    }

    #[test]
    fn exit_node_list_shows_approved_exit_nodes_only() {
        let exit = |ip: &str, name: &str, online: bool| {
            serde_json::json!({"TailscaleIPs": [ip], "HostName": name, "Online": online,
                "AllowedIPs": [format!("{ip}/32"), "0.0.0.0/0", "::/0"]})
        };
        let mut v = serde_json::json!({
            "Prefs": {"exit_node": ""},
            "Peer": [
                exit("100.64.0.1", "router", true),
                exit("100.64.0.3", "cellar", false),
                {"TailscaleIPs": ["100.64.0.2"], "HostName": "laptop", "Online": true,
                 "AllowedIPs": ["100.64.0.2/32", "192.168.9.0/24", "0.0.0.0/0"]},
            ]
        });
        let out = render_exit_nodes(&v);
        let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[0], ["IP", "HOSTNAME", "COUNTRY", "CITY", "STATUS"]);
        assert_eq!(lines[1], ["100.64.0.1", "router", "-", "-", "-"]);
        assert_eq!(lines[2], ["100.64.0.3", "cellar", "-", "-", "offline"]);
        assert_eq!(
            lines.len(),
            3,
            "a peer with only one default route is no exit node: {out}"
        );
        v["Peer"][0]["ExitNode"] = true.into();
        assert!(render_exit_nodes(&v).lines().nth(1).unwrap().ends_with("selected"));
        assert!(!render_exit_nodes(&v).lines().nth(2).unwrap().ends_with("selected"));
        // `status` says the same in the peer's column, as Go words it.
        v["Peer"][1]["ExitNodeOption"] = true.into();
        let st = render_status(&v);
        assert!(st.contains("online; exit node"), "{st}");
        assert!(st.contains("offline; offers exit node"), "{st}");
        v["Peer"] = serde_json::json!([]);
        assert!(render_exit_nodes(&v).starts_with("no exit nodes found"));
    }

    #[test]
    fn table_aligns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }

    #[test]
    fn netcheck_ipv6_line() {
        use serde_json::json;
        let cases = [
            (
                json!({"IPv6": true, "GlobalV6": "[2001:db8:1::2]:41641", "OSHasIPv6": true}),
                "yes, [2001:db8:1::2]:41641",
            ),
            (
                json!({"IPv6": false, "GlobalV6": null, "OSHasIPv6": true}),
                "no, but OS has support",
            ),
            (
                json!({"IPv6": false, "GlobalV6": null, "OSHasIPv6": false}),
                "no, unavailable in OS",
            ),
            (json!({"UDP": true}), "no, unavailable in OS"),
        ];
        for (v, want) in cases {
            assert_eq!(ipv6_line(&v), want, "{v}");
        }
    }

    #[test]
    fn status_render_lists_peers() {
        let v = serde_json::json!({
            "BackendState": "Running",
            "Self": {"TailscaleIPs": ["100.64.0.1", "fd7a:115c:a1e0::1"], "HostName": "me", "User": "a@", "OS": "linux"},
            "Peer": [{"TailscaleIPs": ["100.64.0.2"], "HostName": "go", "User": "a@", "OS": "linux", "Online": true}]
        });
        let out = render_status(&v);
        assert!(
            out.contains("100.64.0.2") && out.contains("go") && out.contains("online"),
            "{out}"
        );
        assert!(!out.contains("state:"));
    }

    #[test]
    fn whois_text_is_laid_out_as_tailscale_does() {
        let v = serde_json::json!({
            "Node": {"Name": "laptop.ts.example.", "StableID": "nX3", "Tags": [],
                     "Addresses": ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"],
                     "AllowedIPs": ["100.64.0.3/32", "fd7a:115c:a1e0::3/128", "192.168.5.0/24"],
                     "Hostinfo": {"OS": "linux"}},
            "UserProfile": {"ID": 7, "LoginName": "alice@example.com"},
        });
        assert_eq!(
            render_whois(&v),
            "Machine:\n  \
             Name:           laptop.ts.example\n  \
             ID:             nX3\n  \
             Addresses:      [100.64.0.3/32 fd7a:115c:a1e0::3/128]\n  \
             AllowedIPs:     [192.168.5.0/24]\n  \
             OS:             linux\n\
             User:\n  \
             Name:     alice@example.com\n  \
             ID:       7\n"
        );
        // A tagged node shows its tags instead of a user; no extra AllowedIPs, no OS, so the
        // column is `  Addresses:` + 5 wide.
        let v = serde_json::json!({
            "Node": {"Name": "srv.ts.example.", "StableID": "nY", "Tags": ["tag:a", "tag:b"],
                     "Addresses": ["100.64.0.4/32"], "AllowedIPs": ["100.64.0.4/32"]},
            "UserProfile": {"ID": 1, "LoginName": "tagged-devices"},
        });
        let out = render_whois(&v);
        assert!(out.contains("  Tags:          tag:a, tag:b\n"), "{out}");
        assert!(
            !out.contains("User:") && !out.contains("AllowedIPs") && !out.contains("OS:"),
            "{out}"
        );
    }

    #[test]
    fn whois_prints_the_cap_map_as_tailscale_does() {
        let v = serde_json::json!({
            "Node": {"Name": "srv.ts.example.", "StableID": "nY", "Tags": ["tag:a"],
                     "Addresses": ["100.64.0.4/32"], "AllowedIPs": ["100.64.0.4/32"]},
            "CapMap": {"example.com/cap/web": [{"path": "/admin", "n": [1, 2]}], "example.com/cap/ping": []},
        });
        let out = render_whois(&v);
        let caps = out
            .split_once("Capabilities:\n")
            .map(|x| x.1)
            .unwrap_or_else(|| panic!("{out}"));
        assert_eq!(
            caps,
            "  - example.com/cap/ping\n  \
             - example.com/cap/web:\n      \
             [\n        \
               {\n          \
                 \"n\": [\n            \
                   1,\n            \
                   2\n          \
                 ],\n          \
                 \"path\": \"/admin\"\n        \
               }\n      \
             ]\n"
        );
        assert!(!render_whois(&serde_json::json!({"Node": {}, "CapMap": {}})).contains("Capabilities"));
    }
}
