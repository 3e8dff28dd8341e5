//! The client daemon's uci section: `config client 'client'` in `/etc/config/tinyscale`.
//!
//! ```text
//! config client 'client'
//!     option enabled '1'
//!     option login_server 'https://hs.example.com'
//!     option auth_key_file '/etc/tinyscale/authkey'
//!     option advertise_lan '1'            # the prefixes on lan_device (br-lan), followed live
//!     list advertise_routes '10.9.0.0/16'
//!     option snat_subnet_routes '1'
//! ```
//!
//! The options mirror `tailscale up` flags (`accept_routes` is `--accept-routes`), plus the
//! daemon's own `port`, `state_dir`, `tun`, `log_level`, and `advertise_lan`/`lan_device`,
//! which become `--advertise-lan=DEVICE`: the daemon turns the device's addresses into routes
//! with [`lan_prefixes`] (it runs `ip -o addr show dev D`) and follows their changes.
//!
//! Unlike the coordinator's section, an unknown option is a warning, not an error: LuCI and
//! older package versions may leave options behind, and a router that stops joining its tailnet
//! over a stray option is worse than a log line. A bad value is still an error (exit code 3)
//! naming the section, the option and the value.
//!
//! Pure: the caller reads the file (and runs `ip`) and passes the text.

#![forbid(unsafe_code)]

use std::{net::IpAddr, path::PathBuf};

use super::{parse, parse_bool, ConfigError, UciFile, UciOption};
use crate::{
    platform::{ipc::UpArgs, logger::LogLevel},
    wire::prefix::Prefix,
};

/// Section type of the client settings.
pub const CLIENT_SECTION_TYPE: &str = "client";

/// Default WireGuard/disco UDP port (tailscaled's 41641).
pub const DEFAULT_PORT: u16 = 41641;

/// Default TUN device name; the package's firewall zone names it.
pub const DEFAULT_TUN: &str = "tinyscale0";

/// Default device whose prefixes `advertise_lan` offers: OpenWrt's LAN bridge.
pub const DEFAULT_LAN_DEVICE: &str = "br-lan";

/// Options of `config client`: name and whether it is a `list`.
const CLIENT_OPTIONS: &[(&str, bool)] = &[
    ("enabled", false),
    ("login_server", false),
    ("auth_key", false),
    ("auth_key_file", false),
    ("hostname", false),
    ("advertise_lan", false),
    ("lan_device", false),
    ("advertise_routes", true),
    ("accept_routes", false),
    ("advertise_exit_node", false),
    ("exit_node", false),
    ("exit_node_allow_lan_access", false),
    ("snat_subnet_routes", false),
    ("shields_up", false),
    ("accept_dns", false),
    ("port", false),
    ("state_dir", false),
    ("log_level", false),
    ("tun", false),
    ("metrics_listen", false),
];

/// The typed `config client` section. Defaults are what `tailscale up` and tailscaled use,
/// except `advertise_lan` (a router is a subnet router unless told otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Whether the init script starts the daemon at all.
    pub enabled: bool,
    /// Control server URL (`--login-server`); `None` keeps what the daemon has.
    pub login_server: Option<String>,
    /// Pre-auth key given inline. Mutually exclusive with `auth_key_file`.
    pub auth_key: Option<String>,
    /// File holding the pre-auth key (keeps the key out of `uci show`).
    pub auth_key_file: Option<PathBuf>,
    /// Host name to register instead of the system one.
    pub hostname: Option<String>,
    /// Advertise the prefixes configured on `lan_device`.
    pub advertise_lan: bool,
    /// The device `advertise_lan` reads (default `br-lan`).
    pub lan_device: String,
    /// Extra subnet routes to advertise, host bits cleared.
    pub advertise_routes: Vec<Prefix>,
    /// `--accept-routes`.
    pub accept_routes: bool,
    /// `--advertise-exit-node`.
    pub advertise_exit_node: bool,
    /// `--exit-node`; `None` uses none.
    pub exit_node: Option<String>,
    /// `--exit-node-allow-lan-access`.
    pub exit_node_allow_lan_access: bool,
    /// `--snat-subnet-routes` (default on, as tailscale).
    pub snat_subnet_routes: bool,
    /// `--shields-up`.
    pub shields_up: bool,
    /// `--accept-dns` (default on, as tailscale).
    pub accept_dns: bool,
    /// UDP port for WireGuard and disco; 0 picks one.
    pub port: u16,
    /// Keys and prefs (tailscaled's `--statedir`).
    pub state_dir: PathBuf,
    /// Daemon log verbosity.
    pub log_level: LogLevel,
    /// TUN device name, or `none` for control only.
    pub tun: String,
    /// Where the daemon serves `GET /metrics` (`--metrics-listen`); `None` (default) is off.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            enabled: true,
            login_server: None,
            auth_key: None,
            auth_key_file: None,
            hostname: None,
            advertise_lan: true,
            lan_device: DEFAULT_LAN_DEVICE.into(),
            advertise_routes: Vec::new(),
            accept_routes: false,
            advertise_exit_node: false,
            exit_node: None,
            exit_node_allow_lan_access: false,
            snat_subnet_routes: true,
            shields_up: false,
            accept_dns: true,
            port: DEFAULT_PORT,
            state_dir: PathBuf::from(crate::daemon::DEFAULT_STATE_DIR),
            log_level: LogLevel::Info,
            tun: DEFAULT_TUN.into(),
            metrics_listen: None,
        }
    }
}

/// A problem that does not stop the daemon, e.g. an unknown option. `Display` reads like a
/// [`ConfigError`]: `line 9: tinyscale.client.foo: unknown option (ignored)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// 1-based line.
    pub line: usize,
    /// Full uci path of the option.
    pub option: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.option, self.message)
    }
}

/// A loaded section and the warnings found on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLoad {
    /// The typed settings (all defaults when the file has no `client` section).
    pub config: ClientConfig,
    /// Unknown options, in file order.
    pub warnings: Vec<ConfigWarning>,
}

/// Builds option errors for one section path (`tinyscale.client` or `tinyscale.@client[0]`).
struct Section<'a> {
    path: &'a str,
}

impl Section<'_> {
    fn option_path(&self, name: &str) -> String {
        format!("{}.{name}", self.path)
    }

    fn invalid(&self, o: &UciOption, message: String) -> ConfigError {
        ConfigError::Invalid {
            line: o.line,
            option: self.option_path(&o.name),
            message,
        }
    }

    fn bool(&self, o: &UciOption) -> Result<bool, ConfigError> {
        parse_bool(&o.value).ok_or_else(|| {
            self.invalid(
                o,
                format!(
                    "invalid boolean {:?} (use 1/0, yes/no, on/off, true/false, enabled/disabled)",
                    o.value
                ),
            )
        })
    }

    /// A value without whitespace or control characters: names, URLs, device names.
    fn word(&self, o: &UciOption, what: &str) -> Result<String, ConfigError> {
        if o.value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.invalid(o, format!("invalid {what} {:?} (no spaces)", o.value)));
        }
        Ok(o.value.clone())
    }

    fn path(&self, o: &UciOption) -> Result<PathBuf, ConfigError> {
        if !o.value.starts_with('/') || o.value.contains('\0') {
            return Err(self.invalid(o, format!("invalid path {:?} (must be absolute)", o.value)));
        }
        Ok(PathBuf::from(&o.value))
    }
}

/// Linux `IFNAMSIZ` minus the NUL: the longest device name the kernel takes.
const MAX_IFNAME: usize = 15;

impl ClientConfig {
    /// Parses uci text and loads its `config client` section.
    pub fn from_uci_text(text: &str) -> Result<ClientLoad, ConfigError> {
        Self::from_uci(&parse(text)?)
    }

    /// Loads the one `config client` section (named or anonymous); other section types are
    /// ignored, a second `client` section is an error (its options would be silently
    /// dropped). Unknown options become warnings; repeated options, `list`/`option` mix-ups
    /// and bad values are errors.
    pub fn from_uci(file: &UciFile) -> Result<ClientLoad, ConfigError> {
        let mut load = ClientLoad {
            config: ClientConfig::default(),
            warnings: Vec::new(),
        };
        let mut found: Option<usize> = None;
        for (i, s) in file.sections.iter().enumerate() {
            if s.kind != CLIENT_SECTION_TYPE {
                continue;
            }
            match found {
                // Two statements of the same named section merge, as in uci.
                Some(f) if file.sections[f].name.is_some() && file.sections[f].name == s.name => {}
                Some(_) => {
                    return Err(ConfigError::Section {
                        line: s.line,
                        section: file.section_path(i),
                        message: format!("only one `config {CLIENT_SECTION_TYPE}` section is allowed"),
                    })
                }
                None => found = Some(i),
            }
        }
        let Some(first) = found else {
            return Ok(load);
        };
        let path = file.section_path(first);
        let sec = Section { path: &path };
        let options: Vec<&UciOption> = file
            .sections
            .iter()
            .filter(|s| s.kind == CLIENT_SECTION_TYPE)
            .flat_map(|s| s.options.iter())
            .collect();
        let mut seen: Vec<&UciOption> = Vec::new();
        let c = &mut load.config;
        for o in options {
            let Some(&(_, is_list)) = CLIENT_OPTIONS.iter().find(|(n, _)| *n == o.name) else {
                load.warnings.push(ConfigWarning {
                    line: o.line,
                    option: sec.option_path(&o.name),
                    message: "unknown option (ignored)".into(),
                });
                continue;
            };
            match (is_list, o.list) {
                (true, false) => {
                    return Err(ConfigError::ExpectedList {
                        line: o.line,
                        option: sec.option_path(&o.name),
                        name: o.name.clone(),
                    })
                }
                (false, true) => {
                    return Err(ConfigError::ExpectedOption {
                        line: o.line,
                        option: sec.option_path(&o.name),
                        name: o.name.clone(),
                    })
                }
                (false, false) => {
                    if let Some(f) = seen.iter().find(|f| f.name == o.name) {
                        return Err(ConfigError::Repeated {
                            line: o.line,
                            option: sec.option_path(&o.name),
                            first: f.line,
                        });
                    }
                    seen.push(o);
                }
                (true, true) => {}
            }
            // uci treats `option x ''` as unset: the default stays.
            if o.value.is_empty() {
                continue;
            }
            match o.name.as_str() {
                "enabled" => c.enabled = sec.bool(o)?,
                "login_server" => {
                    let v = sec.word(o, "URL")?;
                    if !(v.starts_with("http://") || v.starts_with("https://")) || v.len() < 9 {
                        return Err(sec.invalid(o, format!("invalid URL {v:?} (want http://HOST[:PORT] or https://…)")));
                    }
                    c.login_server = Some(v);
                }
                "auth_key" => c.auth_key = Some(sec.word(o, "auth key")?),
                "auth_key_file" => c.auth_key_file = Some(sec.path(o)?),
                "hostname" => {
                    let v = sec.word(o, "hostname")?;
                    if v.len() > 63
                        || !v
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                    {
                        return Err(sec.invalid(o, format!("invalid hostname {v:?} (letters, digits, '-', '.')")));
                    }
                    c.hostname = Some(v);
                }
                "advertise_lan" => c.advertise_lan = sec.bool(o)?,
                "lan_device" => c.lan_device = device(&sec, o)?,
                "advertise_routes" => {
                    let p = o
                        .value
                        .parse::<Prefix>()
                        .ok()
                        .filter(|_| o.value.contains('/'))
                        .ok_or_else(|| {
                            sec.invalid(
                                o,
                                format!("invalid prefix {:?} (want a CIDR like 192.168.2.0/24)", o.value),
                            )
                        })?;
                    if !c.advertise_routes.contains(&p) {
                        c.advertise_routes.push(p);
                    }
                }
                "accept_routes" => c.accept_routes = sec.bool(o)?,
                "advertise_exit_node" => c.advertise_exit_node = sec.bool(o)?,
                "exit_node" => c.exit_node = Some(sec.word(o, "exit node")?),
                "exit_node_allow_lan_access" => c.exit_node_allow_lan_access = sec.bool(o)?,
                "snat_subnet_routes" => c.snat_subnet_routes = sec.bool(o)?,
                "shields_up" => c.shields_up = sec.bool(o)?,
                "accept_dns" => c.accept_dns = sec.bool(o)?,
                "port" => {
                    c.port = o
                        .value
                        .parse()
                        .map_err(|_| sec.invalid(o, format!("invalid port {:?} (0-65535)", o.value)))?
                }
                "state_dir" => c.state_dir = sec.path(o)?,
                "log_level" => {
                    c.log_level = o.value.parse().map_err(|_| {
                        sec.invalid(
                            o,
                            format!("invalid log level {:?} (error, warn, info, debug, trace)", o.value),
                        )
                    })?
                }
                "tun" => c.tun = device(&sec, o)?,
                "metrics_listen" => {
                    c.metrics_listen =
                        crate::platform::metrics::parse_listen(&o.value, crate::platform::metrics::DEFAULT_DAEMON_PORT)
                            .map_err(|e| sec.invalid(o, e))?
                            .map(|(a, _)| a)
                }
                _ => {}
            }
        }
        if let (Some(_), Some(_)) = (&c.auth_key, &c.auth_key_file) {
            let o = seen.iter().find(|o| o.name == "auth_key_file").copied();
            if let Some(o) = o {
                return Err(sec.invalid(o, "set either auth_key or auth_key_file, not both".into()));
            }
        }
        Ok(load)
    }

    /// The prefs for the daemon's `up` path, given the key read from `auth_key_file` (if any).
    /// `advertise_lan` becomes `--advertise-lan=lan_device`: the daemon reads the device's
    /// prefixes ([`lan_prefixes`]) and follows their changes. Every setting is stated, so the
    /// section is the whole truth: an option removed from the file goes back to its default on
    /// the next reload. `reset` also clears what the section cannot express
    /// (`--advertise-tags`).
    pub fn up_args(&self, file_key: Option<String>) -> UpArgs {
        let mut routes: Vec<String> = Vec::new();
        for p in &self.advertise_routes {
            let s = p.to_string();
            if !routes.contains(&s) {
                routes.push(s);
            }
        }
        let lan = if self.advertise_lan {
            self.lan_device.as_str()
        } else {
            ""
        };
        UpArgs {
            login_server: self.login_server.clone(),
            auth_key: self.auth_key.clone().or(file_key),
            hostname: self.hostname.clone(),
            advertise_routes: Some(routes),
            advertise_lan: Some(lan.to_string()),
            accept_routes: Some(self.accept_routes),
            accept_dns: Some(self.accept_dns),
            advertise_exit_node: Some(self.advertise_exit_node),
            exit_node: Some(self.exit_node.clone().unwrap_or_default()),
            exit_node_allow_lan_access: Some(self.exit_node_allow_lan_access),
            advertise_tags: None,
            shields_up: Some(self.shields_up),
            snat_subnet_routes: Some(self.snat_subnet_routes),
            force_reauth: false,
            reset: true,
        }
    }
}

fn device(sec: &Section<'_>, o: &UciOption) -> Result<String, ConfigError> {
    let v = sec.word(o, "device name")?;
    if v.len() > MAX_IFNAME || v.contains('/') || v == "." || v == ".." {
        return Err(sec.invalid(
            o,
            format!("invalid device name {v:?} (at most {MAX_IFNAME} characters, no '/')"),
        ));
    }
    Ok(v)
}

/// The routable prefixes configured on a device, from `ip -o addr show dev D` output: IPv4
/// and IPv6 ULA/global addresses with their host bits cleared. Link-local (`scope link`,
/// 169.254/16, fe80::/10), loopback, multicast and single-host (/32, /128: SLAAC and DHCPv6
/// leases) addresses are skipped: they are no subnet to route.
pub fn lan_prefixes(ip_addr_output: &str) -> Vec<Prefix> {
    let mut v: Vec<Prefix> = Vec::new();
    for line in ip_addr_output.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = w.iter().position(|t| *t == "inet" || *t == "inet6") else {
            continue;
        };
        let Some(cidr) = w.get(i + 1) else { continue };
        let scoped_out = w.windows(2).any(|p| p == ["scope", "link"] || p == ["scope", "host"]);
        if scoped_out || !cidr.contains('/') {
            continue;
        }
        let Ok(p) = cidr.parse::<Prefix>() else { continue };
        let special = match p.addr() {
            IpAddr::V4(a) => a.is_loopback() || a.is_link_local() || a.is_multicast(),
            IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80 || a.is_loopback() || a.is_multicast(),
        };
        let special = special || p.is_single_ip();
        if !special && !v.contains(&p) {
            v.push(p);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packaged default file (openwrt/files/tinyscale.config).
    const PACKAGED: &str = include_str!("../../../openwrt/files/tinyscale.config");

    fn load(text: &str) -> ClientLoad {
        ClientConfig::from_uci_text(text).expect("valid config")
    }

    fn err(text: &str) -> String {
        ClientConfig::from_uci_text(text)
            .expect_err("invalid config")
            .to_string()
    }

    #[test]
    fn packaged_file_loads_with_defaults_and_no_warnings() {
        let l = load(PACKAGED);
        assert_eq!(l.warnings, vec![]);
        let c = l.config;
        assert!(c.enabled);
        assert!(c.advertise_lan && c.snat_subnet_routes && c.accept_dns);
        assert!(!c.accept_routes && !c.shields_up && !c.advertise_exit_node);
        assert_eq!(
            (c.port, c.tun.as_str(), c.lan_device.as_str()),
            (41641, "tinyscale0", "br-lan")
        );
        assert_eq!(c.state_dir, PathBuf::from("/etc/tinyscale"));
        // The coordinator section in the same file is valid for the server schema too.
        #[cfg(feature = "coordinator")]
        {
            let s = crate::platform::uci::server::ServerConfig::from_uci_text(PACKAGED).expect("server section valid");
            assert_eq!(s.listen_addr.port(), 8080);
        }
    }

    #[test]
    fn openwrt_quoting_forms() {
        let l = load(
            "# tinyscale\n\
             config client 'client'\n\
             \toption hostname \"edge-1\" # trailing comment\n\
             \toption login_server 'https://hs.example.com:8443'\n\
             \toption exit_node 100.64.0.7\n\
             \tlist advertise_routes '10.9.0.0/16'\n\
             \tlist advertise_routes \"192.168.7.1/24\"\n\
             \tlist advertise_routes fd00:1::/64\n\
             \toption accept_routes yes\n\
             \toption shields_up 'on'\n\
             \toption accept_dns 'false'\n\
             \toption log_level 'debug'\n\
             \toption port '0'\n",
        );
        let c = l.config;
        assert_eq!(c.hostname.as_deref(), Some("edge-1"));
        assert_eq!(c.login_server.as_deref(), Some("https://hs.example.com:8443"));
        assert_eq!(c.exit_node.as_deref(), Some("100.64.0.7"));
        let r: Vec<String> = c.advertise_routes.iter().map(|p| p.to_string()).collect();
        assert_eq!(r, ["10.9.0.0/16", "192.168.7.0/24", "fd00:1::/64"]);
        assert!(c.accept_routes && c.shields_up && !c.accept_dns);
        assert_eq!((c.log_level, c.port), (LogLevel::Debug, 0));
    }

    #[test]
    fn anonymous_section_and_empty_values_keep_defaults() {
        let c = load("config client\n\toption port ''\n\toption tun 'wg9'\n").config;
        assert_eq!((c.port, c.tun.as_str()), (41641, "wg9"));
    }

    #[test]
    fn metrics_listen_is_off_unless_set_and_stays_on_loopback_for_a_bare_port() {
        assert_eq!(load("config client\n").config.metrics_listen, None);
        assert_eq!(
            load("config client\n\toption metrics_listen ''\n")
                .config
                .metrics_listen,
            None
        );
        let c = load("config client\n\toption metrics_listen ':'\n").config;
        assert_eq!(c.metrics_listen, Some("127.0.0.1:5252".parse().unwrap()));
        let c = load("config client\n\toption metrics_listen '192.168.1.1:9100'\n").config;
        assert_eq!(c.metrics_listen, Some("192.168.1.1:9100".parse().unwrap()));
        let e = ClientConfig::from_uci_text("config client\n\toption metrics_listen 'x:y'\n").unwrap_err();
        assert!(e.to_string().contains("metrics_listen"), "{e}");
    }

    #[test]
    fn no_client_section_means_defaults() {
        assert_eq!(load("config server 'main'\n").config, ClientConfig::default());
    }

    #[test]
    fn unknown_option_is_a_warning_naming_it() {
        let l = load("config client 'client'\n\toption port '1'\n\toption colour 'blue'\n");
        assert_eq!(l.config.port, 1);
        assert_eq!(l.warnings.len(), 1);
        assert_eq!(
            l.warnings[0].to_string(),
            "line 3: tinyscale.client.colour: unknown option (ignored)"
        );
    }

    #[test]
    fn bad_values_name_section_option_and_value() {
        let cases = [
            (
                "option port '70000'",
                "line 2: tinyscale.client.port: invalid port \"70000\"",
            ),
            (
                "option accept_routes 'maybe'",
                "tinyscale.client.accept_routes: invalid boolean \"maybe\"",
            ),
            (
                "option login_server 'hs.example.com'",
                "tinyscale.client.login_server: invalid URL \"hs.example.com\"",
            ),
            (
                "list advertise_routes '10.0.0.0'",
                "tinyscale.client.advertise_routes: invalid prefix \"10.0.0.0\"",
            ),
            ("list advertise_routes '10.0.0.0/33'", "invalid prefix \"10.0.0.0/33\""),
            (
                "option state_dir 'relative'",
                "tinyscale.client.state_dir: invalid path \"relative\"",
            ),
            (
                "option tun 'a-very-long-device-name'",
                "tinyscale.client.tun: invalid device name",
            ),
            (
                "option log_level 'loud'",
                "tinyscale.client.log_level: invalid log level \"loud\"",
            ),
            (
                "option hostname 'my host'",
                "tinyscale.client.hostname: invalid hostname \"my host\"",
            ),
            (
                "option advertise_routes '10.0.0.0/8'",
                "tinyscale.client.advertise_routes: is a list",
            ),
            ("list port '1'", "tinyscale.client.port: takes one value"),
        ];
        for (line, want) in cases {
            let e = err(&format!("config client 'client'\n\t{line}\n"));
            assert!(e.contains(want), "{line}: got {e:?}, want {want:?}");
        }
        let e = ClientConfig::from_uci_text("config client 'client'\n\toption port 'x'\n").expect_err("bad");
        assert_eq!(e.exit_code(), 3);
    }

    #[test]
    fn section_level_errors() {
        let e = err("config client 'client'\n\toption port '1'\n\toption port '2'\n");
        assert_eq!(e, "line 3: tinyscale.client.port: set more than once (first on line 2)");
        let e = err("config client 'a'\nconfig client 'b'\n");
        assert!(e.contains("only one `config client` section"), "{e}");
        let e = err("config client\n\toption auth_key 'k'\n\toption auth_key_file '/etc/k'\n");
        assert!(
            e.starts_with("line 3: tinyscale.@client[0].auth_key_file: set either"),
            "{e}"
        );
        // Same-named sections merge, as uci does.
        let c = load("config client 'client'\n\toption port '5'\nconfig client 'client'\n\toption tun 'x0'\n").config;
        assert_eq!((c.port, c.tun.as_str()), (5, "x0"));
    }

    #[test]
    fn up_args_state_every_pref() {
        let c = load(
            "config client 'client'\n\toption login_server 'http://10.0.0.1:8080'\n\
             \tlist advertise_routes '10.9.0.0/16'\n\tlist advertise_routes '192.168.1.0/24'\n",
        )
        .config;
        let a = c.up_args(Some("tskey-file".into()));
        assert_eq!(a.login_server.as_deref(), Some("http://10.0.0.1:8080"));
        assert_eq!(a.auth_key.as_deref(), Some("tskey-file"));
        // The list as given; the LAN device is the daemon's to read (and follow).
        assert_eq!(
            a.advertise_routes,
            Some(vec!["10.9.0.0/16".into(), "192.168.1.0/24".into()])
        );
        assert_eq!(a.advertise_lan.as_deref(), Some("br-lan"));
        assert_eq!(a.snat_subnet_routes, Some(true));
        assert_eq!(a.exit_node.as_deref(), Some(""));
        assert!(a.reset && !a.force_reauth);
        let off = ClientConfig {
            advertise_lan: false,
            ..c
        };
        // Without advertise_lan: stated as off.
        assert_eq!(off.up_args(None).advertise_lan.as_deref(), Some(""));
    }

    #[test]
    fn lan_prefixes_skip_link_local_and_host_routes() {
        // `ip -o addr show dev br-lan` from an OpenWrt 23.05 router (iproute2 and busybox
        // print the same fields).
        let out = "\
6: br-lan    inet 192.168.1.1/24 brd 192.168.1.255 scope global br-lan\\       valid_lft forever preferred_lft forever
6: br-lan    inet 169.254.3.1/16 scope link br-lan\\       valid_lft forever preferred_lft forever
6: br-lan    inet6 fd9c:1b2e:55aa::1/60 scope global noprefixroute \\       valid_lft forever preferred_lft forever
6: br-lan    inet6 2001:db8:42:10::1/64 scope global dynamic noprefixroute \\       valid_lft 86000sec preferred_lft 14000sec
6: br-lan    inet6 2001:db8:42:10::77/128 scope global dynamic \\       valid_lft 86000sec preferred_lft 14000sec
6: br-lan    inet6 fe80::20c:43ff:fe26:1/64 scope link \\       valid_lft forever preferred_lft forever
";
        let got: Vec<String> = lan_prefixes(out).iter().map(|p| p.to_string()).collect();
        assert_eq!(got, ["192.168.1.0/24", "fd9c:1b2e:55aa::/60", "2001:db8:42:10::/64"]);
        assert!(lan_prefixes("").is_empty());
    }
}
