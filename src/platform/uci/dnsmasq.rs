//! The router's dnsmasq and MagicDNS: the `uci batch` that makes dnsmasq forward the tailnet's
//! names to the resolver at 100.100.100.100 (`tinyscale debug dns-uci`), so LAN clients and
//! the router resolve `<host>.<suffix>` without tinyscale ever touching `/etc/resolv.conf`.
//!
//! OpenWrt's dnsmasq init script turns `list server '/a/b/IP'` into `server=/a/b/IP`
//! (conditional forwarding of every listed domain to IP) and `list rebind_domain 'a'` into
//! `rebind-domain-ok=/a/`: dnsmasq's rebind protection drops answers in private ranges, and
//! 100.64.0.0/10 counts as one. One `server` entry carries the MagicDNS suffix and the reverse
//! zones Go routes to MagicDNS (`magicDNSRootDomains`): `64.100.in-addr.arpa` …
//! `127.100.in-addr.arpa` and the `ip6.arpa` zone of fd7a:115c:a1e0::/48.
//!
//! Every `server` entry that forwards to 100.100.100.100 is ours: the batch deletes those that
//! differ from the wanted one (an old suffix, or all of them when MagicDNS is off), with the
//! `rebind_domain` entries naming their domains, and adds what is missing. Applying the batch
//! twice changes nothing the second time.
//!
//! Pure: the caller passes `/etc/config/dhcp`'s text and the wanted suffix.
#![forbid(unsafe_code)]

use super::{parse, quote, ConfigError};

/// Where dnsmasq forwards the tailnet's zones.
pub const SERVICE_IP: &str = "100.100.100.100";

/// The uci path of the first dnsmasq section (OpenWrt's default config has one, anonymous).
const SECTION: &str = "dhcp.@dnsmasq[0]";

/// The zones forwarded for MagicDNS suffix `suffix`: the suffix, then the reverse zones.
pub fn zones(suffix: &str) -> Vec<String> {
    let mut z = vec![suffix.trim_end_matches('.').to_ascii_lowercase()];
    z.extend((64..128).map(|b| format!("{b}.100.in-addr.arpa")));
    z.push("0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa".into());
    z
}

/// The `server` entry forwarding `zones` to the service address: `/z1/z2/…/100.100.100.100`.
pub fn server_entry(zones: &[String]) -> String {
    let mut s = String::new();
    for z in zones {
        s.push('/');
        s.push_str(z);
    }
    s.push('/');
    s.push_str(SERVICE_IP);
    s
}

/// The domains of a `server` entry of ours, `None` for anyone else's entry.
fn our_domains(entry: &str) -> Option<Vec<&str>> {
    let rest = entry.strip_prefix('/')?.strip_suffix(SERVICE_IP)?.strip_suffix('/')?;
    Some(rest.split('/').filter(|d| !d.is_empty()).collect())
}

/// The batch that brings `dhcp` (the text of `/etc/config/dhcp`) to MagicDNS suffix `suffix`
/// (`None`: MagicDNS off, remove ours). Empty when nothing needs to change, or when the file
/// has no dnsmasq section (nothing to configure).
pub fn batch(dhcp: &str, suffix: Option<&str>) -> Result<String, ConfigError> {
    let file = parse(dhcp)?;
    let Some(sec) = file.sections.iter().find(|s| s.kind == "dnsmasq") else {
        return Ok(String::new());
    };
    let list = |name: &str| -> Vec<&str> {
        sec.options
            .iter()
            .filter(|o| o.name == name)
            .map(|o| o.value.as_str())
            .collect()
    };
    let (servers, rebind) = (list("server"), list("rebind_domain"));
    let want = suffix
        .filter(|s| !s.is_empty())
        .map(|s| (server_entry(&zones(s)), zones(s)));
    let mut out = String::new();
    let mut ours_domains = Vec::new();
    for entry in &servers {
        let Some(domains) = our_domains(entry) else { continue };
        ours_domains.extend(domains);
        if want.as_ref().is_none_or(|(w, _)| w != entry) {
            out.push_str(&format!("del_list {SECTION}.server={}\n", quote(entry)));
        }
    }
    let want_rebind = want.as_ref().map(|(_, z)| z[0].as_str());
    for d in &rebind {
        if ours_domains.contains(d) && Some(*d) != want_rebind {
            out.push_str(&format!("del_list {SECTION}.rebind_domain={}\n", quote(d)));
        }
    }
    if let Some((entry, z)) = &want {
        if !servers.contains(&entry.as_str()) {
            out.push_str(&format!("add_list {SECTION}.server={}\n", quote(entry)));
        }
        if !rebind.contains(&z[0].as_str()) {
            out.push_str(&format!("add_list {SECTION}.rebind_domain={}\n", quote(&z[0])));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DHCP: &str = "config dnsmasq\n\toption domainneeded '1'\n\toption rebind_protection '1'\n\
                        \tlist server '/corp.example/10.0.0.53'\n\tlist rebind_domain 'corp.example'\n\
                        \noption local '/lan/'\n\nconfig dhcp 'lan'\n\toption interface 'lan'\n";

    #[test]
    fn service_ip_is_quad_100() {
        assert_eq!(SERVICE_IP, crate::wire::prefix::TAILSCALE_SERVICE_IP.to_string());
    }

    #[test]
    fn adds_the_forwarding_once() {
        let b = batch(DHCP, Some("ts.example")).unwrap();
        let entry = format!(
            "/ts.example/{}/0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa/100.100.100.100",
            (64..128)
                .map(|b| format!("{b}.100.in-addr.arpa"))
                .collect::<Vec<_>>()
                .join("/")
        );
        assert_eq!(
            b,
            format!(
                "add_list dhcp.@dnsmasq[0].server='{entry}'\nadd_list dhcp.@dnsmasq[0].rebind_domain='ts.example'\n"
            )
        );
        // Once applied, the same call asks for nothing.
        let applied = DHCP.replacen(
            "\tlist rebind_domain",
            &format!("\tlist server '{entry}'\n\tlist rebind_domain 'ts.example'\n\tlist rebind_domain"),
            1,
        );
        assert_eq!(batch(&applied, Some("ts.example")).unwrap(), "");
        // Off: ours go, the user's split domain stays.
        assert_eq!(
            batch(&applied, None).unwrap(),
            format!(
                "del_list dhcp.@dnsmasq[0].server='{entry}'\ndel_list dhcp.@dnsmasq[0].rebind_domain='ts.example'\n"
            )
        );
        // A new suffix replaces the old entry.
        let b = batch(&applied, Some("new.example")).unwrap();
        assert!(
            b.starts_with(&format!("del_list dhcp.@dnsmasq[0].server='{entry}'\n")),
            "{b}"
        );
        assert!(
            b.contains("del_list dhcp.@dnsmasq[0].rebind_domain='ts.example'\n"),
            "{b}"
        );
        assert!(
            b.contains("add_list dhcp.@dnsmasq[0].server='/new.example/64.100.in-addr.arpa/"),
            "{b}"
        );
        assert!(
            b.ends_with("add_list dhcp.@dnsmasq[0].rebind_domain='new.example'\n"),
            "{b}"
        );
    }

    #[test]
    fn nothing_without_dnsmasq_or_suffix() {
        assert_eq!(batch("config dhcp 'lan'\n", Some("ts.example")).unwrap(), "");
        assert_eq!(batch(DHCP, None).unwrap(), "");
        assert_eq!(batch(DHCP, Some("")).unwrap(), "");
        assert!(batch("config 'x\n", None).is_err());
    }
}
