//! The coordinator's uci section, `config server 'main'` in `/etc/config/tinyscale`, as a
//! validated [`ServerConfig`].
//!
//! headscale's `config-example.yaml` flattened into uci options (`dns.base_domain` becomes
//! `base_domain`, `derp.server.region_id` becomes `derp_server_region_id`, and so on), validated
//! as headscale's `hscontrol/types/config.go` does. Unknown, repeated, mis-typed (`list` vs
//! `option`) and invalid options are errors that carry the line and the uci path
//! (`tinyscale.main.listen_addr`), exit code 3. The `derp_*` options fill the relay's
//! [`DerpConfig`]; `log_level` is a [`LogLevel`].
//!
//! Pure: the caller reads the file and passes its text (or a [`UciFile`] from
//! [`crate::platform::uci::parse`]).
#![forbid(unsafe_code)]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    platform::{
        logger::LogLevel,
        uci::{
            derp::DerpConfig, format_duration, parse, parse_bool, parse_duration, ConfigError, UciFile, UciOption,
            PACKAGE,
        },
    },
    wire::prefix::{Prefix, CGNAT_RANGE, TAILSCALE_ULA_RANGE},
};

/// The validated coordinator config from `config server 'main'`; every field has headscale's
/// meaning and a default, so a file without that section yields [`ServerConfig::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// URL clients use to reach us (`server_url`), without a trailing slash.
    pub server_url: String,
    /// HTTP listen address (`listen_addr`).
    pub listen_addr: SocketAddr,
    /// SQLite database file (`db_path`).
    pub db_path: PathBuf,
    /// Admin unix socket the CLI talks to (`unix_socket`).
    pub unix_socket: PathBuf,
    /// PEM certificate chain and private key (`tls_cert_path`, `tls_key_path`): when both are
    /// set the listener speaks TLS (control, `/key` and the embedded DERP relay).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// IPv4 allocation prefix inside 100.64.0.0/10 (`list ip_prefix`); `None` if only v6 is set.
    pub prefix_v4: Option<Prefix>,
    /// IPv6 allocation prefix inside fd7a:115c:a1e0::/48; `None` if only v4 is set.
    pub prefix_v6: Option<Prefix>,
    /// MagicDNS domain (`base_domain`), lowercase, no trailing dot.
    pub base_domain: String,
    /// MagicDNS on (`magic_dns`).
    pub magic_dns: bool,
    /// Global resolvers pushed to clients (`list nameserver`).
    pub nameservers: Vec<IpAddr>,
    /// Split DNS (`list split_dns 'domain=resolver'`): lowercase domain without trailing dot
    /// and its resolvers (`IP` or `IP:port`), domains in first-seen order.
    pub split_dns: Vec<(String, Vec<String>)>,
    /// Extra MagicDNS records (`list extra_records 'name=IP'`): lowercase name, address.
    pub extra_records: Vec<(String, IpAddr)>,
    /// Ephemeral nodes are deleted after this long offline
    /// (`ephemeral_node_inactivity_timeout`, more than 65 s).
    pub ephemeral_node_inactivity_timeout: Duration,
    /// Log verbosity (`log_level`).
    pub log_level: LogLevel,
    /// DERP options (`derp_*`).
    pub derp: DerpConfig,
    /// ACL policy file (`policy_path`, HuJSON), loaded at start; while set, the policy cannot
    /// be changed through the admin socket.
    pub policy_path: Option<PathBuf>,
    /// Connections open at once on the listener (`max_connections`, default 768).
    pub max_connections: u32,
    /// Connections open at once from one address or IPv6 /64 (`max_connections_per_ip`,
    /// default 64).
    pub max_connections_per_ip: u32,
    /// Budget from accept until TLS, the request head and the Noise handshake are done
    /// (`handshake_timeout`, default 10 s, 1 s to 5 min).
    pub handshake_timeout: Duration,
    /// Charged requests (`/key`, `/ts2021`, register) per second per address or IPv6 /64
    /// (`rate_limit`, default 10; 0 turns the limit off).
    pub rate_limit: u32,
    /// Charged requests one address may make at once (`rate_burst`, default 40).
    pub rate_burst: u32,
    /// Where `GET /metrics` is served (`metrics_listen_addr`, default 127.0.0.1:9090 as
    /// headscale's; empty turns it off; a bare port stays on loopback).
    pub metrics_listen_addr: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            server_url: "http://127.0.0.1:8080".to_owned(),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            db_path: PathBuf::from("/etc/tinyscale/db.sqlite"),
            unix_socket: PathBuf::from("/var/run/tinyscale-server.sock"),
            tls: None,
            prefix_v4: Some(CGNAT_RANGE),
            prefix_v6: Some(TAILSCALE_ULA_RANGE),
            base_domain: "tailnet.internal".to_owned(),
            magic_dns: true,
            nameservers: vec![IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1))],
            split_dns: Vec::new(),
            extra_records: Vec::new(),
            ephemeral_node_inactivity_timeout: Duration::from_secs(30 * 60),
            policy_path: None,
            log_level: LogLevel::Info,
            derp: DerpConfig::default(),
            max_connections: 768,
            max_connections_per_ip: 64,
            handshake_timeout: Duration::from_secs(10),
            rate_limit: 10,
            rate_burst: 40,
            metrics_listen_addr: Some(SocketAddr::from((
                [127, 0, 0, 1],
                crate::platform::metrics::DEFAULT_COORDINATOR_PORT,
            ))),
        }
    }
}

/// Section type and name that hold the coordinator settings.
const SERVER_SECTION_TYPE: &str = "server";
const SERVER_SECTION_NAME: &str = "main";

/// headscale's floor for `ephemeral_node_inactivity_timeout`: the 60 s map keep-alive plus a
/// few seconds against races; the value must be strictly greater (config.go).
pub const MIN_EPHEMERAL_INACTIVITY_TIMEOUT: Duration = Duration::from_secs(65);

/// Options of `config server 'main'`: name and whether it is a `list`.
const SERVER_OPTIONS: &[(&str, bool)] = &[
    // Read by the init script (whether procd runs `server serve`); the server ignores it.
    ("enabled", false),
    ("server_url", false),
    ("listen_addr", false),
    ("db_path", false),
    ("unix_socket", false),
    ("tls_cert_path", false),
    ("tls_key_path", false),
    ("ip_prefix", true),
    ("base_domain", false),
    ("magic_dns", false),
    ("nameserver", true),
    ("split_dns", true),
    ("extra_records", true),
    ("ephemeral_node_inactivity_timeout", false),
    ("log_level", false),
    ("derp_server_enabled", false),
    ("derp_server_region_id", false),
    ("derp_server_region_code", false),
    ("derp_server_region_name", false),
    ("derp_server_stun_listen_addr", false),
    ("derp_server_verify_clients", false),
    ("derp_server_ipv4", false),
    ("derp_server_ipv6", false),
    ("derp_url", true),
    ("derp_path", true),
    ("policy_path", false),
    ("max_connections", false),
    ("max_connections_per_ip", false),
    ("handshake_timeout", false),
    ("metrics_listen_addr", false),
    ("rate_limit", false),
    ("rate_burst", false),
];

/// The `server 'main'` statements, sorted into single values and lists after the
/// unknown/repeated/kind checks.
struct ServerOptions<'a> {
    scalars: Vec<&'a UciOption>,
    lists: Vec<&'a UciOption>,
}

impl<'a> ServerOptions<'a> {
    /// The single value of `name`, unless unset or empty (uci treats `option x ''` as unset).
    fn get(&self, name: &str) -> Option<&'a UciOption> {
        self.scalars
            .iter()
            .copied()
            .find(|o| o.name == name && !o.value.is_empty())
    }

    /// All `list name` entries in file order.
    fn list(&self, name: &str) -> Vec<&'a UciOption> {
        self.lists.iter().copied().filter(|o| o.name == name).collect()
    }
}

fn option_path(name: &str) -> String {
    format!("{PACKAGE}.{SERVER_SECTION_NAME}.{name}")
}

fn invalid(o: &UciOption, message: String) -> ConfigError {
    ConfigError::Invalid {
        line: o.line,
        option: option_path(&o.name),
        message,
    }
}

fn parse_with<T>(o: &UciOption, what: &str, f: impl FnOnce(&str) -> Option<T>) -> Result<T, ConfigError> {
    f(&o.value).ok_or_else(|| invalid(o, format!("invalid {what} {:?}", o.value)))
}

fn bool_of(o: &UciOption) -> Result<bool, ConfigError> {
    parse_bool(&o.value).ok_or_else(|| {
        invalid(
            o,
            format!(
                "invalid boolean {:?} (use 1/0, yes/no, on/off, true/false, enabled/disabled)",
                o.value
            ),
        )
    })
}

fn socket_of(o: &UciOption) -> Result<SocketAddr, ConfigError> {
    parse_with(o, "socket address", |s| s.parse().ok())
}

fn path_of(o: &UciOption) -> Result<PathBuf, ConfigError> {
    if o.value.contains('\0') {
        return Err(invalid(o, format!("invalid path {:?}", o.value)));
    }
    Ok(PathBuf::from(&o.value))
}

impl ServerConfig {
    /// Parses uci text and builds the config from its `config server 'main'` section.
    pub fn from_uci_text(text: &str) -> Result<ServerConfig, ConfigError> {
        Self::from_uci(&parse(text)?)
    }

    /// Builds the config from a parsed file. Sections of other types are ignored; a `server`
    /// section not named `main` is an error, since its options would otherwise be silently
    /// dropped. Unknown, repeated, mis-typed (`list` vs `option`) and invalid options are errors.
    pub fn from_uci(file: &UciFile) -> Result<ServerConfig, ConfigError> {
        Self::from_uci_with(file, &[])
    }

    /// [`ServerConfig::from_uci`] with command-line values laid over the file: every option
    /// named in `overrides` replaces the file's values of that name (all of a list's entries),
    /// and is validated the same way. Give overrides line 0; [`ConfigError::line`] then says the
    /// value came from the command line.
    pub fn from_uci_with(file: &UciFile, overrides: &[UciOption]) -> Result<ServerConfig, ConfigError> {
        let mut opts = ServerOptions {
            scalars: Vec::new(),
            lists: Vec::new(),
        };
        for (i, s) in file.sections.iter().enumerate() {
            if s.kind != SERVER_SECTION_TYPE {
                continue;
            }
            if s.name.as_deref() != Some(SERVER_SECTION_NAME) {
                return Err(ConfigError::Section {
                    line: s.line,
                    section: file.section_path(i),
                    message: format!(
                        "the coordinator section must be named: config {SERVER_SECTION_TYPE} '{SERVER_SECTION_NAME}'"
                    ),
                });
            }
            // Same-named sections merge, as in uci.
            for o in &s.options {
                let Some(&(_, is_list)) = SERVER_OPTIONS.iter().find(|(n, _)| *n == o.name) else {
                    return Err(ConfigError::UnknownOption {
                        line: o.line,
                        option: option_path(&o.name),
                    });
                };
                match (is_list, o.list) {
                    (true, false) => {
                        return Err(ConfigError::ExpectedList {
                            line: o.line,
                            option: option_path(&o.name),
                            name: o.name.clone(),
                        })
                    }
                    (false, true) => {
                        return Err(ConfigError::ExpectedOption {
                            line: o.line,
                            option: option_path(&o.name),
                            name: o.name.clone(),
                        })
                    }
                    (true, true) => opts.lists.push(o),
                    (false, false) => {
                        if let Some(first) = opts.scalars.iter().find(|f| f.name == o.name) {
                            return Err(ConfigError::Repeated {
                                line: o.line,
                                option: option_path(&o.name),
                                first: first.line,
                            });
                        }
                        opts.scalars.push(o);
                    }
                }
            }
        }
        opts.scalars.retain(|o| !overrides.iter().any(|v| v.name == o.name));
        opts.lists.retain(|o| !overrides.iter().any(|v| v.name == o.name));
        for o in overrides {
            if o.list {
                opts.lists.push(o);
            } else {
                opts.scalars.push(o);
            }
        }
        Self::from_options(&opts)
    }

    fn from_options(opts: &ServerOptions<'_>) -> Result<ServerConfig, ConfigError> {
        let mut c = ServerConfig::default();

        if let Some(o) = opts.get("server_url") {
            http_url_host(&o.value).map_err(|why| invalid(o, format!("invalid URL {:?}: {why}", o.value)))?;
            // Paths such as `/register/<key>` are appended to it.
            c.server_url = o.value.trim_end_matches('/').to_owned();
        }
        if let Some(o) = opts.get("listen_addr") {
            c.listen_addr = socket_of(o)?;
        }
        if let Some(o) = opts.get("db_path") {
            c.db_path = path_of(o)?;
        }
        if let Some(o) = opts.get("unix_socket") {
            c.unix_socket = path_of(o)?;
        }
        if let Some(o) = opts.get("policy_path") {
            c.policy_path = Some(path_of(o)?);
        }
        match (opts.get("tls_cert_path"), opts.get("tls_key_path")) {
            (Some(cert), Some(key)) => c.tls = Some((path_of(cert)?, path_of(key)?)),
            (Some(o), None) => return Err(invalid(o, "tls_cert_path needs tls_key_path too".into())),
            (None, Some(o)) => return Err(invalid(o, "tls_key_path needs tls_cert_path too".into())),
            (None, None) => {}
        }

        let prefixes = opts.list("ip_prefix");
        if !prefixes.is_empty() {
            c.prefix_v4 = None;
            c.prefix_v6 = None;
            for o in prefixes {
                if o.value.contains(':') {
                    let p = Prefix::parse_exact(&o.value)
                        .map_err(|e| invalid(o, format!("invalid IPv6 prefix {:?}: {e}", o.value)))?;
                    if !TAILSCALE_ULA_RANGE.contains_prefix(&p) {
                        return Err(invalid(o, format!("IPv6 prefix {p} is outside {TAILSCALE_ULA_RANGE}")));
                    }
                    if c.prefix_v6.replace(p).is_some() {
                        return Err(invalid(o, "at most one IPv6 prefix may be set".to_owned()));
                    }
                } else {
                    let p = Prefix::parse_exact(&o.value)
                        .map_err(|e| invalid(o, format!("invalid IPv4 prefix {:?}: {e}", o.value)))?;
                    if !CGNAT_RANGE.contains_prefix(&p) {
                        return Err(invalid(o, format!("IPv4 prefix {p} is outside {CGNAT_RANGE}")));
                    }
                    if c.prefix_v4.replace(p).is_some() {
                        return Err(invalid(o, "at most one IPv4 prefix may be set".to_owned()));
                    }
                }
            }
        }

        let base_domain = opts.get("base_domain");
        if let Some(o) = base_domain {
            c.base_domain =
                validate_domain(&o.value).map_err(|why| invalid(o, format!("invalid domain {:?}: {why}", o.value)))?;
        }
        // headscale refuses a server_url inside the MagicDNS domain: clients would resolve the
        // control host through MagicDNS and lose the coordinator (and the embedded DERP).
        // Blame whichever of the two was set explicitly; the defaults never clash.
        if let Some(o) = base_domain.or_else(|| opts.get("server_url")) {
            let host = http_url_host(&c.server_url).unwrap_or("").to_ascii_lowercase();
            let host = host.trim_end_matches('.');
            if host == c.base_domain || host.ends_with(&format!(".{}", c.base_domain)) {
                let message = if base_domain.is_some() {
                    format!(
                        "{:?} must not equal or contain the server_url host {host:?}",
                        c.base_domain
                    )
                } else {
                    format!(
                        "host {host:?} must not equal or be inside base_domain {:?}",
                        c.base_domain
                    )
                };
                return Err(invalid(o, message));
            }
        }

        if let Some(o) = opts.get("magic_dns") {
            c.magic_dns = bool_of(o)?;
        }
        let nameservers = opts.list("nameserver");
        if !nameservers.is_empty() {
            c.nameservers = nameservers
                .iter()
                .map(|o| parse_with(o, "IP address", |s| s.parse().ok()))
                .collect::<Result<_, _>>()?;
        }
        for o in opts.list("split_dns") {
            for entry in o.value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let (domain, resolver) = split_dns_entry(entry).map_err(|why| invalid(o, why))?;
                if c.magic_dns && (domain == c.base_domain || domain.ends_with(&format!(".{}", c.base_domain))) {
                    return Err(invalid(
                        o,
                        format!(
                            "split DNS domain {domain:?} is inside base_domain {:?}, which MagicDNS answers itself",
                            c.base_domain
                        ),
                    ));
                }
                match c.split_dns.iter_mut().find(|(d, _)| *d == domain) {
                    Some((_, rs)) => rs.push(resolver),
                    None => c.split_dns.push((domain, vec![resolver])),
                }
            }
        }
        for o in opts.list("extra_records") {
            for entry in o.value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let (name, ip) = entry
                    .split_once('=')
                    .ok_or_else(|| invalid(o, format!("invalid record {entry:?}: expected name=IP")))?;
                let name = validate_domain(name.trim().trim_end_matches('.'))
                    .map_err(|why| invalid(o, format!("invalid record name {name:?}: {why}")))?;
                let ip: IpAddr = ip
                    .trim()
                    .parse()
                    .map_err(|_| invalid(o, format!("invalid record address {ip:?} in {entry:?}")))?;
                c.extra_records.push((name, ip));
            }
        }
        if let Some(o) = opts.get("ephemeral_node_inactivity_timeout") {
            let d = parse_duration(&o.value).map_err(|e| invalid(o, format!("{e}: {:?}", o.value)))?;
            if d <= MIN_EPHEMERAL_INACTIVITY_TIMEOUT {
                return Err(invalid(
                    o,
                    format!(
                        "{:?} is too low, must be more than {}",
                        o.value,
                        format_duration(MIN_EPHEMERAL_INACTIVITY_TIMEOUT)
                    ),
                ));
            }
            c.ephemeral_node_inactivity_timeout = d;
        }
        if let Some(o) = opts.get("log_level") {
            c.log_level = o.value.parse().map_err(|()| {
                invalid(
                    o,
                    format!(
                        "invalid log level {:?} (use error, warn, info, debug or trace)",
                        o.value
                    ),
                )
            })?;
        }

        let count = |name: &str, dflt: u32| match opts.get(name) {
            Some(o) => parse_with(o, "count (a positive integer)", |s| {
                s.parse::<u32>().ok().filter(|v| *v > 0)
            }),
            None => Ok(dflt),
        };
        c.max_connections = count("max_connections", c.max_connections)?;
        c.max_connections_per_ip = count("max_connections_per_ip", c.max_connections_per_ip)?;
        if let Some(o) = opts.get("handshake_timeout") {
            let d = parse_duration(&o.value).map_err(|e| invalid(o, format!("{e}: {:?}", o.value)))?;
            if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&d) {
                return Err(invalid(o, format!("{:?} is out of range (1s to 5m)", o.value)));
            }
            c.handshake_timeout = d;
        }
        if let Some(o) = opts.get("rate_limit") {
            let what = "rate (requests per second, 0 to 100000; 0 turns the limit off)";
            c.rate_limit = parse_with(o, what, |s| s.parse::<u32>().ok().filter(|v| *v <= 100_000))?;
        }
        if let Some(o) = opts.get("rate_burst") {
            let what = "burst (requests, 1 to 100000)";
            c.rate_burst = parse_with(o, what, |s| s.parse::<u32>().ok().filter(|v| (1..=100_000).contains(v)))?;
        }
        // Read raw: an empty value is "off" here, not "unset".
        if let Some(o) = opts.scalars.iter().find(|o| o.name == "metrics_listen_addr") {
            c.metrics_listen_addr =
                crate::platform::metrics::parse_listen(&o.value, crate::platform::metrics::DEFAULT_COORDINATOR_PORT)
                    .map_err(|e| invalid(o, e))?
                    .map(|(a, _)| a);
        }

        let d = &mut c.derp;
        if let Some(o) = opts.get("derp_server_enabled") {
            d.server_enabled = bool_of(o)?;
        }
        if let Some(o) = opts.get("derp_server_region_id") {
            d.server_region_id = parse_with(o, "region id (a positive integer)", |s| {
                s.parse::<i32>().ok().filter(|v| *v > 0)
            })?;
        }
        if let Some(o) = opts.get("derp_server_region_code") {
            d.server_region_code = parse_with(o, "region code (no spaces)", |s| {
                (!s.chars().any(char::is_whitespace)).then(|| s.to_owned())
            })?;
        }
        if let Some(o) = opts.get("derp_server_region_name") {
            d.server_region_name = o.value.clone();
        }
        if let Some(o) = opts.get("derp_server_stun_listen_addr") {
            d.server_stun_listen_addr = socket_of(o)?;
        }
        if let Some(o) = opts.get("derp_server_verify_clients") {
            d.server_verify_clients = bool_of(o)?;
        }
        if let Some(o) = opts.get("derp_server_ipv4") {
            d.server_ipv4 = Some(parse_with(o, "IPv4 address", |s| s.parse().ok())?);
        }
        if let Some(o) = opts.get("derp_server_ipv6") {
            d.server_ipv6 = Some(parse_with(o, "IPv6 address", |s| s.parse().ok())?);
        }
        for o in opts.list("derp_url") {
            http_url_host(&o.value).map_err(|why| invalid(o, format!("invalid URL {:?}: {why}", o.value)))?;
            d.urls.push(o.value.clone());
        }
        for o in opts.list("derp_path") {
            if o.value.is_empty() {
                return Err(invalid(o, "empty path".to_owned()));
            }
            d.paths.push(path_of(o)?);
        }
        Ok(c)
    }

    /// Host part of [`ServerConfig::server_url`] (brackets stripped from an IPv6 literal).
    pub fn server_host(&self) -> &str {
        http_url_host(&self.server_url).unwrap_or("")
    }
}

/// Checks `http://host[:port][/path]` or `https://…` and returns the host (IPv6 brackets
/// stripped). No userinfo; the port, if present, must be 1-65535.
fn http_url_host(url: &str) -> Result<&str, &'static str> {
    let strip = |p: &str| {
        url.get(..p.len())
            .filter(|head| head.eq_ignore_ascii_case(p))
            .and_then(|_| url.get(p.len()..))
    };
    let rest = strip("http://")
        .or_else(|| strip("https://"))
        .ok_or("must start with http:// or https://")?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.contains('@') {
        return Err("must not contain user information");
    }
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let (h, after) = inner.split_once(']').ok_or("unclosed '[' in host")?;
        h.parse::<Ipv6Addr>().map_err(|_| "invalid IPv6 address in host")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after ']'")?),
        };
        (h, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("missing host");
    }
    if !authority.starts_with('[')
        && !host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
    {
        return Err("invalid character in host");
    }
    if let Some(p) = port {
        if !p.bytes().all(|c| c.is_ascii_digit()) || !matches!(p.parse::<u16>(), Ok(v) if v != 0) {
            return Err("invalid port");
        }
    }
    Ok(host)
}

/// Validates a DNS domain (labels of `[a-z0-9-]`, 1-63 chars, not starting or ending with `-`,
/// at most 253 chars, no trailing dot) and returns it lowercased.
/// One `domain=resolver` of `split_dns`: the domain (validated, lowercase, without trailing
/// dot) and the resolver as `IP` or `IP:port` (Go accepts both in `dnstype.Resolver.Addr`).
fn split_dns_entry(entry: &str) -> Result<(String, String), String> {
    let (domain, resolver) = entry
        .split_once('=')
        .ok_or_else(|| format!("invalid split DNS entry {entry:?}: expected domain=resolver"))?;
    let domain = validate_domain(domain.trim().trim_end_matches('.'))
        .map_err(|why| format!("invalid split DNS domain {domain:?}: {why}"))?;
    let resolver = resolver.trim();
    let ok = resolver.parse::<IpAddr>().is_ok() || resolver.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0);
    if !ok {
        return Err(format!(
            "invalid split DNS resolver {resolver:?} for {domain:?}: expected IP or IP:port"
        ));
    }
    Ok((domain, resolver.to_owned()))
}

fn validate_domain(s: &str) -> Result<String, &'static str> {
    if s.ends_with('.') {
        return Err("must not end with a dot");
    }
    if s.len() > 253 {
        return Err("longer than 253 characters");
    }
    let lower = s.to_ascii_lowercase();
    for label in lower.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1-63 characters");
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            return Err("labels may hold only letters, digits and '-'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("labels must not start or end with '-'");
        }
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn server_defaults() {
        let want = ServerConfig::default();
        assert_eq!(ServerConfig::from_uci_text("").unwrap(), want);
        assert_eq!(
            ServerConfig::from_uci_text("config client\n\toption whatever 'x'\n").unwrap(),
            want
        );
        assert_eq!(ServerConfig::from_uci_text("config server 'main'\n").unwrap(), want);
        assert_eq!(want.server_url, "http://127.0.0.1:8080");
        assert_eq!(want.server_host(), "127.0.0.1");
        assert_eq!(want.listen_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(want.db_path, PathBuf::from("/etc/tinyscale/db.sqlite"));
        assert_eq!(want.unix_socket, PathBuf::from("/var/run/tinyscale-server.sock"));
        assert_eq!(want.tls, None);
        assert_eq!(want.prefix_v4.unwrap().to_string(), "100.64.0.0/10");
        assert_eq!(want.prefix_v6.unwrap().to_string(), "fd7a:115c:a1e0::/48");
        assert_eq!(want.base_domain, "tailnet.internal");
        assert!(want.magic_dns);
        assert_eq!(want.nameservers, vec!["1.1.1.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(want.ephemeral_node_inactivity_timeout, Duration::from_secs(1800));
        assert_eq!(want.log_level, LogLevel::Info);
        assert_eq!(want.log_level.to_level_filter(), log::LevelFilter::Info);
        let d = &want.derp;
        assert!(!d.server_enabled);
        assert_eq!(d.server_region_id, 999);
        assert_eq!(d.server_region_code, "headscale");
        assert_eq!(d.server_region_name, "Headscale Embedded DERP");
        assert_eq!(d.server_stun_listen_addr.to_string(), "0.0.0.0:3478");
        assert!(d.server_verify_clients);
        assert!(d.urls.is_empty() && d.paths.is_empty());
    }

    #[test]
    fn server_full() {
        let text = r#"
config server 'main'
	option server_url 'https://hs.example.com:8443/'
	option listen_addr '[::]:443'
	option db_path '/srv/ts/db.sqlite'
	option unix_socket '/tmp/ts.sock'
	option tls_cert_path '/etc/tinyscale/cert.pem'
	option tls_key_path '/etc/tinyscale/key.pem'
	list ip_prefix '100.100.0.0/16'
	list ip_prefix 'fd7a:115c:a1e0:1::/64'
	option base_domain 'Ts.Example.NET'
	option magic_dns 'off'
	list nameserver '9.9.9.9'
	list nameserver '2620:fe::fe'
	option ephemeral_node_inactivity_timeout '1h30m'
	option log_level 'debug'
	option derp_server_enabled 'yes'
	option derp_server_region_id '900'
	option derp_server_region_code 'home'
	option derp_server_region_name 'Home router'
	option derp_server_stun_listen_addr '0.0.0.0:3479'
	option derp_server_verify_clients 'disabled'
	option derp_server_ipv4 '198.51.100.1'
	option derp_server_ipv6 '2001:db8::1'
	list derp_url 'https://controlplane.tailscale.com/derpmap/default'
	list derp_path '/etc/tinyscale/derp.json'
	option policy_path '/etc/tinyscale/policy.hujson'
	option max_connections '200'
	option max_connections_per_ip '16'
	option handshake_timeout '5s'
	option rate_limit '0'
	option rate_burst '5'

config client
	option anything 'ignored here'
"#;
        let c = ServerConfig::from_uci_text(text).unwrap();
        assert_eq!(c.server_url, "https://hs.example.com:8443");
        assert_eq!(c.server_host(), "hs.example.com");
        assert_eq!(c.listen_addr, "[::]:443".parse().unwrap());
        assert_eq!(c.db_path, PathBuf::from("/srv/ts/db.sqlite"));
        assert_eq!(c.unix_socket, PathBuf::from("/tmp/ts.sock"));
        assert_eq!(
            c.tls,
            Some((
                PathBuf::from("/etc/tinyscale/cert.pem"),
                PathBuf::from("/etc/tinyscale/key.pem")
            ))
        );
        assert_eq!(c.prefix_v4, "100.100.0.0/16".parse().ok());
        assert_eq!(c.prefix_v6, "fd7a:115c:a1e0:1::/64".parse().ok());
        assert_eq!(c.base_domain, "ts.example.net");
        assert!(!c.magic_dns);
        assert_eq!(
            c.nameservers,
            vec!["9.9.9.9".parse::<IpAddr>().unwrap(), "2620:fe::fe".parse().unwrap()]
        );
        assert_eq!(c.ephemeral_node_inactivity_timeout, Duration::from_secs(5400));
        assert_eq!(c.log_level, LogLevel::Debug);
        assert!(c.derp.server_enabled);
        assert_eq!(c.derp.server_region_id, 900);
        assert_eq!(c.derp.server_region_code, "home");
        assert_eq!(c.derp.server_region_name, "Home router");
        assert_eq!(c.derp.server_stun_listen_addr.port(), 3479);
        assert!(!c.derp.server_verify_clients);
        assert_eq!(c.derp.server_ipv4, "198.51.100.1".parse().ok());
        assert_eq!(c.derp.server_ipv6, "2001:db8::1".parse().ok());
        assert_eq!(c.derp.urls.len(), 1);
        assert_eq!(c.derp.paths, vec![PathBuf::from("/etc/tinyscale/derp.json")]);
        assert_eq!(c.policy_path, Some(PathBuf::from("/etc/tinyscale/policy.hujson")));
        assert_eq!((c.max_connections, c.max_connections_per_ip), (200, 16));
        assert_eq!(c.handshake_timeout, Duration::from_secs(5));
        assert_eq!((c.rate_limit, c.rate_burst), (0, 5));
    }

    #[test]
    fn server_partial_prefixes_and_empty_values() {
        let c = ServerConfig::from_uci_text(
            "config server 'main'\n list ip_prefix 100.64.0.0/10\n option listen_addr ''\n",
        )
        .unwrap();
        assert_eq!(c.prefix_v4, Some(CGNAT_RANGE));
        assert_eq!(c.prefix_v6, None);
        // `option x ''` means unset in uci, so the default stands.
        assert_eq!(c.listen_addr, ServerConfig::default().listen_addr);
        let c = ServerConfig::from_uci_text("config server main\nlist ip_prefix fd7a:115c:a1e0::/48\n").unwrap();
        assert_eq!((c.prefix_v4, c.prefix_v6), (None, Some(TAILSCALE_ULA_RANGE)));
        // Two `config server 'main'` blocks merge as in uci.
        let c = ServerConfig::from_uci_text(
            "config server 'main'\noption log_level warn\nconfig server 'main'\noption magic_dns 0\n",
        )
        .unwrap();
        assert_eq!((c.log_level, c.magic_dns), (LogLevel::Warn, false));
    }

    #[test]
    fn server_metrics_listen_addr() {
        let get = |text: &str| {
            ServerConfig::from_uci_text(&format!("config server 'main'\n{text}"))
                .unwrap()
                .metrics_listen_addr
        };
        assert_eq!(get(""), Some("127.0.0.1:9090".parse().unwrap()), "headscale's default");
        assert_eq!(get("\toption metrics_listen_addr ''\n"), None, "empty is off");
        assert_eq!(
            get("\toption metrics_listen_addr ':9100'\n"),
            Some("127.0.0.1:9100".parse().unwrap())
        );
        assert_eq!(
            get("\toption metrics_listen_addr '0.0.0.0:9100'\n"),
            Some("0.0.0.0:9100".parse().unwrap()),
            "explicit: allowed (warned at start)"
        );
    }

    /// Each invalid input: (option line, expected path, expected message fragment).
    #[test]
    fn server_errors_name_option_and_line() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "option listen_addr 'foo'",
                "listen_addr",
                r#"invalid socket address "foo""#,
            ),
            ("option bogus '1'", "bogus", "unknown option"),
            ("list listen_addr '127.0.0.1:1'", "listen_addr", "takes one value"),
            ("option ip_prefix '100.64.0.0/10'", "ip_prefix", "is a list"),
            ("option server_url 'ftp://x'", "server_url", "http:// or https://"),
            ("option server_url 'http://'", "server_url", "missing host"),
            ("option server_url 'http://a:0'", "server_url", "invalid port"),
            ("option server_url 'http://a b'", "server_url", "invalid character"),
            ("option server_url 'http://u@h'", "server_url", "user information"),
            ("option server_url 'http://[::1'", "server_url", "unclosed"),
            ("list ip_prefix '10.0.0.0/8'", "ip_prefix", "outside 100.64.0.0/10"),
            ("list ip_prefix '100.0.0.0/8'", "ip_prefix", "outside 100.64.0.0/10"),
            ("list ip_prefix 'fd00::/8'", "ip_prefix", "outside fd7a:115c:a1e0::/48"),
            ("list ip_prefix '100.64.0.1/10'", "ip_prefix", "bits set"),
            ("list ip_prefix 'nope'", "ip_prefix", "invalid IPv4 prefix"),
            ("option base_domain 'example.com.'", "base_domain", "dot"),
            ("option base_domain 'ex_ample.com'", "base_domain", "letters, digits"),
            ("option base_domain '-a.com'", "base_domain", "start or end"),
            ("option base_domain 'a..com'", "base_domain", "1-63"),
            ("option magic_dns 'maybe'", "magic_dns", "invalid boolean"),
            ("list nameserver 'dns.google'", "nameserver", "invalid IP address"),
            ("list split_dns 'corp.example'", "split_dns", "expected domain=resolver"),
            (
                "list split_dns 'corp_x.example=10.0.0.1'",
                "split_dns",
                "invalid split DNS domain",
            ),
            (
                "list split_dns 'corp.example=dns.corp'",
                "split_dns",
                "expected IP or IP:port",
            ),
            (
                "list split_dns 'corp.example=10.0.0.1:0'",
                "split_dns",
                "expected IP or IP:port",
            ),
            (
                "list split_dns 'x.tailnet.internal=10.0.0.1'",
                "split_dns",
                "inside base_domain \"tailnet.internal\"",
            ),
            ("list extra_records 'grafana'", "extra_records", "expected name=IP"),
            (
                "list extra_records 'graf ana=100.64.0.9'",
                "extra_records",
                "invalid record name",
            ),
            (
                "list extra_records 'grafana=100.64.0.999'",
                "extra_records",
                "invalid record address",
            ),
            (
                "option ephemeral_node_inactivity_timeout '65s'",
                "ephemeral_node_inactivity_timeout",
                "must be more than 1m5s",
            ),
            (
                "option ephemeral_node_inactivity_timeout '30'",
                "ephemeral_node_inactivity_timeout",
                "missing unit",
            ),
            ("option log_level 'loud'", "log_level", "invalid log level"),
            ("option max_connections '0'", "max_connections", "invalid count"),
            (
                "option max_connections_per_ip '-1'",
                "max_connections_per_ip",
                "invalid count",
            ),
            ("option handshake_timeout '0s'", "handshake_timeout", "out of range"),
            ("option handshake_timeout '10'", "handshake_timeout", "missing unit"),
            ("option rate_limit '-1'", "rate_limit", "invalid rate"),
            ("option rate_limit '100001'", "rate_limit", "0 turns the limit off"),
            (
                "option rate_burst '0'",
                "rate_burst",
                "invalid burst (requests, 1 to 100000)",
            ),
            ("option rate_burst '1.5'", "rate_burst", "invalid burst"),
            (
                "option metrics_listen_addr 'localhost:9090'",
                "metrics_listen_addr",
                "invalid address",
            ),
            (
                "option derp_server_enabled '2'",
                "derp_server_enabled",
                "invalid boolean",
            ),
            (
                "option derp_server_region_id '0'",
                "derp_server_region_id",
                "invalid region id",
            ),
            (
                "option derp_server_region_id 'x'",
                "derp_server_region_id",
                "invalid region id",
            ),
            (
                "option derp_server_region_code 'a b'",
                "derp_server_region_code",
                "invalid region code",
            ),
            (
                "option derp_server_stun_listen_addr ':3478'",
                "derp_server_stun_listen_addr",
                "invalid socket address",
            ),
            (
                "option derp_server_verify_clients 'y'",
                "derp_server_verify_clients",
                "invalid boolean",
            ),
            ("list derp_url 'derp.example.com'", "derp_url", "invalid URL"),
            ("list derp_path ''", "derp_path", "empty path"),
            ("option tls_cert_path '/c.pem'", "tls_cert_path", "needs tls_key_path"),
            ("option tls_key_path '/k.pem'", "tls_key_path", "needs tls_cert_path"),
        ];
        for (stmt, name, fragment) in cases {
            let text = format!("# comment\nconfig server 'main'\n\tlist nameserver '1.1.1.1'\n\t{stmt}\n");
            let e = ServerConfig::from_uci_text(&text).unwrap_err();
            let path = format!("tinyscale.main.{name}");
            assert_eq!(e.line(), 4, "{stmt}: {e}");
            assert_eq!(e.option(), Some(path.as_str()), "{stmt}: {e}");
            let shown = e.to_string();
            assert!(shown.starts_with(&format!("line 4: {path}: ")), "{shown}");
            assert!(shown.contains(fragment), "{stmt}: {shown}");
            assert_eq!(e.exit_code(), 3);
        }
    }

    #[test]
    fn exact_message_example() {
        let e =
            ServerConfig::from_uci_text("\n\nconfig server 'main'\n\n\n\n\toption listen_addr 'foo'\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"line 7: tinyscale.main.listen_addr: invalid socket address "foo""#
        );
    }

    #[test]
    fn repeated_and_section_errors() {
        let e = ServerConfig::from_uci_text("config server 'main'\noption log_level info\noption log_level debug\n")
            .unwrap_err();
        assert_eq!(
            e,
            ConfigError::Repeated {
                line: 3,
                option: "tinyscale.main.log_level".into(),
                first: 2
            }
        );
        assert!(e.to_string().contains("first on line 2"));
        // A repeat across merged sections is still a repeat.
        let e = ServerConfig::from_uci_text(
            "config server 'main'\noption magic_dns 1\nconfig server 'main'\noption magic_dns 0\n",
        )
        .unwrap_err();
        assert_eq!(e.line(), 4);
        // Lists may repeat.
        assert!(ServerConfig::from_uci_text(
            "config server 'main'\nlist ip_prefix 100.64.0.0/10\nlist ip_prefix 100.64.0.0/11\n"
        )
        .unwrap_err()
        .to_string()
        .contains("at most one IPv4"));
        let e = ServerConfig::from_uci_text("config client\nconfig server\noption x y\n").unwrap_err();
        assert_eq!(e.line(), 2);
        assert_eq!(e.option(), None);
        assert!(e.to_string().starts_with("line 2: tinyscale.@server[0]: "), "{e}");
        // Syntax errors come through from_uci_text too.
        assert!(matches!(
            ServerConfig::from_uci_text("config server 'main'\noption a 'b\n"),
            Err(ConfigError::Syntax { line: 2, .. })
        ));
    }

    #[test]
    fn split_dns_and_extra_records() {
        let c = ServerConfig::from_uci_text(
            "config server 'main'\n\
             \tlist split_dns 'Corp.Example.=10.0.0.53, lab.example=10.9.0.1:5353'\n\
             \tlist split_dns 'corp.example=fd00::53'\n\
             \tlist extra_records 'grafana.tailnet.internal=100.64.0.9,v6.tailnet.internal=fd7a:115c:a1e0::9'\n",
        )
        .unwrap();
        assert_eq!(
            c.split_dns,
            vec![
                (
                    "corp.example".to_string(),
                    vec!["10.0.0.53".to_string(), "fd00::53".to_string()]
                ),
                ("lab.example".to_string(), vec!["10.9.0.1:5353".to_string()]),
            ]
        );
        assert_eq!(
            c.extra_records,
            vec![
                ("grafana.tailnet.internal".to_string(), "100.64.0.9".parse().unwrap()),
                ("v6.tailnet.internal".to_string(), "fd7a:115c:a1e0::9".parse().unwrap()),
            ]
        );
        // With MagicDNS off, a split domain inside the base domain is no conflict.
        let off = "config server 'main'\n\toption magic_dns 0\n\tlist split_dns 'x.tailnet.internal=10.0.0.1'\n";
        assert_eq!(ServerConfig::from_uci_text(off).unwrap().split_dns.len(), 1);
    }

    #[test]
    fn command_line_overrides_replace_file_values() {
        let file = parse(
            "config server 'main'\n\toption base_domain 'file.example'\n\tlist nameserver '9.9.9.9'\n\
             \tlist nameserver '8.8.8.8'\n\toption magic_dns '1'\n",
        )
        .unwrap();
        let over = |name: &str, value: &str, list: bool| UciOption {
            name: name.into(),
            value: value.into(),
            list,
            line: 0,
        };
        let c = ServerConfig::from_uci_with(
            &file,
            &[
                over("base_domain", "flag.example", false),
                over("nameserver", "1.0.0.1", true),
                over("magic_dns", "false", false),
            ],
        )
        .unwrap();
        assert_eq!(c.base_domain, "flag.example");
        assert_eq!(c.nameservers, vec!["1.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(!c.magic_dns);
        let e = ServerConfig::from_uci_with(&file, &[over("base_domain", "bad_domain", false)]).unwrap_err();
        assert_eq!(e.line(), 0);
        assert!(e.to_string().contains("tinyscale.main.base_domain"), "{e}");
    }

    #[test]
    fn base_domain_must_not_contain_server_host() {
        for (url, dom, ok) in [
            ("https://hs.example.com", "example.com", false),
            ("https://example.com", "example.com", false),
            ("https://HS.Example.com", "example.com", false),
            ("https://hs.example.com", "ts.example.com", true),
            ("https://myexample.com", "example.com", true),
            ("https://example.com", "hs.example.com", true),
        ] {
            let text = format!("config server 'main'\noption server_url '{url}'\noption base_domain '{dom}'\n");
            let r = ServerConfig::from_uci_text(&text);
            assert_eq!(r.is_ok(), ok, "{url} {dom}: {r:?}");
            if let Err(e) = r {
                assert_eq!(e.option(), Some("tinyscale.main.base_domain"));
                assert_eq!(e.line(), 3);
            }
        }
        // With the default base_domain the error points at server_url.
        let e = ServerConfig::from_uci_text("config server 'main'\noption server_url 'http://hs.tailnet.internal'\n")
            .unwrap_err();
        assert_eq!(e.option(), Some("tinyscale.main.server_url"));
    }

    #[test]
    fn server_url_forms() {
        for url in [
            "http://127.0.0.1:8080",
            "https://[::1]:443/",
            "HTTPS://hs.example.com",
            "http://hs.example.com/prefix?x#y",
        ] {
            let text = format!("config server 'main'\noption server_url '{url}'\n");
            assert!(ServerConfig::from_uci_text(&text).is_ok(), "{url}");
        }
        assert_eq!(http_url_host("https://[::1]:443/"), Ok("::1"));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in any::<String>()) {
            let _ = ServerConfig::from_uci_text(&s);
        }

        #[test]
        fn uci_shaped_text_never_panics(s in crate::platform::uci::uci_shaped_text()) {
            let _ = ServerConfig::from_uci_text(&s);
        }
    }
}
