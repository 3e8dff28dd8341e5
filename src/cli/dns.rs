//! `tinyscale dns status` and `dns query` output, laid out as tailscale 1.90 prints them
//! (`cmd/tailscale/cli/dns-status.go`, `dns-query.go`). Pure: the caller supplies the daemon's
//! answers and the text of `/etc/resolv.conf`.
#![forbid(unsafe_code)]

use serde_json::{json, Value};

/// The `nameserver` and `search` entries of a resolv.conf: what the MagicDNS resolver forwards
/// to for names outside every split-DNS route.
pub fn system_dns(resolv_conf: &str) -> (Vec<String>, Vec<String>) {
    let ns = crate::dataplane::dns::parse_resolv_conf(resolv_conf)
        .iter()
        .map(|a| a.ip().to_string())
        .collect();
    let search = resolv_conf
        .lines()
        .filter_map(|l| l.strip_prefix("search").or_else(|| l.strip_prefix("domain")))
        .filter(|rest| rest.starts_with([' ', '\t']))
        .flat_map(str::split_whitespace)
        .map(str::to_string)
        .collect();
    (ns, search)
}

/// `dns status --json`: the `DNS` object of `status --json` with what the text shows besides:
/// `AcceptDNS` (the pref), `SelfDNSName`, and the system's `Nameservers` and `SearchDomains`.
pub fn status_json(status: &Value, resolv_conf: &str) -> Value {
    let mut v = status["DNS"].clone();
    if !v.is_object() {
        v = json!({});
    }
    let (ns, search) = system_dns(resolv_conf);
    v["AcceptDNS"] = status["Prefs"]["accept_dns"].as_bool().unwrap_or(true).into();
    v["SelfDNSName"] = status["Self"]["DNSName"].as_str().unwrap_or("").into();
    v["System"] = json!({ "Nameservers": ns, "SearchDomains": search });
    v
}

/// One `Title:` section: the items as `  - x`, or `empty` when there are none.
fn section(out: &mut String, title: &str, items: &[String], empty: &str) {
    out.push_str(title);
    out.push('\n');
    if items.is_empty() {
        out.push_str(&format!("  ({empty})\n"));
    }
    for i in items {
        out.push_str(&format!("  - {i}\n"));
    }
    out.push('\n');
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect()
}

/// [pure] `dns status` text from [`status_json`]'s object.
pub fn render_status(v: &Value) -> String {
    render(v, false)
}

/// [pure] `dns status --all`: [`render_status`] plus fallback resolvers, nameservers,
/// certificate domains, extra records, the exit node filtered set and match domains, where
/// tailscale 1.90 prints them.
pub fn render_status_all(v: &Value) -> String {
    render(v, true)
}

fn render(v: &Value, all: bool) -> String {
    let mut out = String::from("\n=== 'Use Tailscale DNS' status ===\n\n");
    if v["AcceptDNS"] == true {
        out.push_str(
            "Tailscale DNS: enabled.\n\nTailscale is configured to handle DNS queries on this device.\n\
             Run 'tinyscale set --accept-dns=false' to revert to your system default DNS resolver.\n",
        );
    } else {
        out.push_str(
            "Tailscale DNS: disabled.\n\n(Run 'tinyscale set --accept-dns=true' to start sending DNS \
             queries to the Tailscale DNS resolver)\n",
        );
    }
    out.push_str("\n=== MagicDNS configuration ===\n\n");
    out.push_str("This is the DNS configuration provided by the coordination server to this device.\n\n");
    let suffix = v["MagicDNSSuffix"].as_str().unwrap_or("");
    if v["TailnetMagicDNS"] == true {
        out.push_str(&format!("MagicDNS: enabled tailnet-wide (suffix = {suffix})\n\n"));
        let me = v["SelfDNSName"].as_str().unwrap_or("");
        out.push_str(&format!(
            "Other devices in your tailnet can reach this device at {me}\n"
        ));
    } else {
        out.push_str("MagicDNS: disabled tailnet-wide.\n");
    }
    out.push('\n');
    section(
        &mut out,
        "Resolvers (in preference order):",
        &strs(&v["Resolvers"]),
        "no resolvers configured, system default will be used: see 'System DNS configuration' below",
    );
    // Go prints one line per (route, resolver); a route without resolvers (answered by
    // MagicDNS alone) has none.
    let mut routes = Vec::new();
    for (k, rs) in v["Routes"].as_object().into_iter().flatten() {
        for r in strs(rs) {
            routes.push(format!("{k:<30} -> {r}"));
        }
    }
    let no_routes = v["Routes"].as_object().is_none_or(|m| m.is_empty());
    out.push_str("Split DNS Routes:\n");
    if no_routes {
        out.push_str("  (no routes configured: split DNS disabled)\n");
    }
    for r in &routes {
        out.push_str(&format!("  - {r}\n"));
    }
    out.push('\n');
    if all {
        out.push_str("Fallback Resolvers:\n");
        let fallback = strs(&v["FallbackResolvers"]);
        if fallback.is_empty() {
            out.push_str("  (no fallback resolvers configured)\n");
        }
        for (i, r) in fallback.iter().enumerate() {
            out.push_str(&format!("  {i}: {r}\n"));
        }
        out.push('\n');
    }
    // Go sorts them; they are shown as control sent them here (a sort of Strings costs ~6 KB
    // on the router, and control sends one or two).
    section(
        &mut out,
        "Search Domains:",
        &strs(&v["Domains"]),
        "no search domains configured",
    );
    if all {
        section(
            &mut out,
            "Nameservers IP Addresses:",
            &strs(&v["Nameservers"]),
            "none were provided",
        );
        section(
            &mut out,
            "Certificate Domains:",
            &strs(&v["CertDomains"]),
            "no certificate domains are configured",
        );
        let records: Vec<String> = v["ExtraRecords"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let f = |k: &str| r[k].as_str().unwrap_or("");
                match f("Type") {
                    "" => format!("{:<50} -> {}", f("Name"), f("Value")),
                    t => format!("[{t}] {:<50} -> {}", f("Name"), f("Value")),
                }
            })
            .collect();
        section(
            &mut out,
            "Additional DNS Records:",
            &records,
            "no extra records are configured",
        );
        section(
            &mut out,
            "Filtered suffixes when forwarding DNS queries as an exit node:",
            &strs(&v["ExitNodeFilteredSet"]),
            "no suffixes are filtered",
        );
    }
    out.push_str("=== System DNS configuration ===\n\n");
    out.push_str(
        "This is the DNS configuration that the MagicDNS resolver forwards other names to\n\
         (/etc/resolv.conf), when no split DNS route matches.\n\n",
    );
    section(
        &mut out,
        "Nameservers:",
        &strs(&v["System"]["Nameservers"]),
        "no nameservers found, DNS queries might fail\nunless the coordination server is providing a nameserver",
    );
    section(
        &mut out,
        "Search domains:",
        &strs(&v["System"]["SearchDomains"]),
        "no search domains found",
    );
    if all {
        // resolv.conf has no per-domain servers: nothing is routed by domain at the OS level.
        section(&mut out, "Match domains:", &[], "no match domains found");
    }
    out
}

/// [pure] `dns query` text from the daemon's answer (see `Daemon::dns_query`).
pub fn render_query(v: &Value) -> String {
    let name = v["Name"].as_str().unwrap_or("");
    let mut out = format!(
        "DNS query for {name:?} ({}) using internal resolver:\n\n",
        v["QueryType"].as_str().unwrap_or("")
    );
    if let Some(via) = v["Forward"].as_str() {
        let addrs: Vec<&str> = v["Resolvers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["Addr"].as_str())
            .collect();
        let whose = if via == "system" {
            "the system resolvers (/etc/resolv.conf)"
        } else {
            "the split DNS resolvers for its domain"
        };
        out.push_str(&format!("Not a MagicDNS name: it would be forwarded to {whose}:\n"));
        if addrs.is_empty() {
            out.push_str("  (none: the query would fail)\n");
        }
        for a in addrs {
            out.push_str(&format!("  - {a}\n"));
        }
        return out;
    }
    out.push_str("Answered by MagicDNS on this node (100.100.100.100).\n\n");
    out.push_str(&format!(
        "Response code: {}\n\n",
        v["ResponseCode"].as_str().unwrap_or("")
    ));
    let answers = v["Answers"].as_array().map_or(&[][..], Vec::as_slice);
    if answers.is_empty() {
        out.push_str("  (no answers found)\n");
        return out;
    }
    // Go: tabwriter with padding 2.
    let mut rows = vec![
        ["Name", "TTL", "Class", "Type", "Body"].map(String::from),
        ["----", "---", "-----", "----", "----"].map(String::from),
    ];
    for a in answers {
        let f = |k: &str| match &a[k] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        rows.push([f("Name"), f("TTL"), f("Class"), f("Type"), f("Body")]);
    }
    let mut w = [0usize; 4];
    for r in &rows {
        for (i, c) in r.iter().take(4).enumerate() {
            w[i] = w[i].max(c.len() + 2);
        }
    }
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            match w.get(i) {
                Some(&w) => out.push_str(&format!("{c:<w$}")),
                None => out.push_str(c),
            }
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_what_the_daemon_has() {
        let status = json!({
            "Prefs": {"accept_dns": true},
            "Self": {"DNSName": "router.ts.example."},
            "DNS": {"MagicDNS": true, "TailnetMagicDNS": true, "MagicDNSSuffix": "ts.example",
                    "Resolvers": ["1.1.1.1"], "Routes": {"corp.example": ["10.0.0.53"], "ts.example": []},
                    "Domains": ["z.example", "ts.example"]},
        });
        let conf = "# generated\nsearch lan home\nnameserver 127.0.0.1\nnameserver 100.100.100.100\n";
        let v = status_json(&status, conf);
        assert_eq!(v["System"]["Nameservers"], json!(["127.0.0.1"]), "never ourselves");
        assert_eq!(v["System"]["SearchDomains"], json!(["lan", "home"]));
        assert_eq!(v["AcceptDNS"], true);
        let t = render_status(&v);
        for want in [
            "Tailscale DNS: enabled.",
            "MagicDNS: enabled tailnet-wide (suffix = ts.example)",
            "can reach this device at router.ts.example.\n",
            "Resolvers (in preference order):\n  - 1.1.1.1\n",
            "  - corp.example                   -> 10.0.0.53\n",
            "Search Domains:\n  - z.example\n  - ts.example\n",
            "Nameservers:\n  - 127.0.0.1\n",
            "Search domains:\n  - lan\n  - home\n",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
        assert!(
            !t.contains("ts.example                     ->"),
            "a route without resolvers has no line"
        );
        // Off, and nothing from control.
        let v = status_json(&json!({"Prefs": {"accept_dns": false}}), "");
        let t = render_status(&v);
        for want in [
            "Tailscale DNS: disabled.",
            "MagicDNS: disabled tailnet-wide.",
            "(no resolvers configured",
            "(no routes configured: split DNS disabled)",
            "(no search domains configured)",
            "(no nameservers found",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
    }

    #[test]
    fn status_all_prints_the_whole_dns_config_as_tailscale_does() {
        let status = json!({
            "Prefs": {"accept_dns": true},
            "Self": {"DNSName": "router.ts.example."},
            "DNS": {"TailnetMagicDNS": true, "MagicDNSSuffix": "ts.example",
                    "Resolvers": ["1.1.1.1"], "Routes": {"corp.example": ["10.0.0.53"]},
                    "Domains": ["ts.example"], "FallbackResolvers": ["9.9.9.9", "8.8.8.8"],
                    "Nameservers": ["10.9.9.9"], "CertDomains": ["router.ts.example"],
                    "ExtraRecords": [{"Name": "grafana.ts.example", "Type": "", "Value": "100.64.0.9"},
                                     {"Name": "v6.ts.example", "Type": "AAAA", "Value": "fd7a:115c:a1e0::9"}],
                    "ExitNodeFilteredSet": [".internal"]},
        });
        let v = status_json(&status, "nameserver 192.168.1.1\n");
        let t = render_status_all(&v);
        let want = format!(
            "Split DNS Routes:\n  - corp.example                   -> 10.0.0.53\n\n\
             Fallback Resolvers:\n  0: 9.9.9.9\n  1: 8.8.8.8\n\n\
             Search Domains:\n  - ts.example\n\n\
             Nameservers IP Addresses:\n  - 10.9.9.9\n\n\
             Certificate Domains:\n  - router.ts.example\n\n\
             Additional DNS Records:\n  - {:<50} -> 100.64.0.9\n  - [AAAA] {:<50} -> fd7a:115c:a1e0::9\n\n\
             Filtered suffixes when forwarding DNS queries as an exit node:\n  - .internal\n\n\
             === System DNS configuration ===",
            "grafana.ts.example", "v6.ts.example"
        );
        assert!(t.contains(&want), "want\n{want}\nin\n{t}");
        assert!(
            t.ends_with(
                "Search domains:\n  (no search domains found)\n\nMatch domains:\n  (no match domains found)\n\n"
            ),
            "{t}"
        );
        // Without --all none of it; with --all and nothing from control, the empty notes.
        let plain = render_status(&v);
        assert!(!plain.contains("Fallback") && !plain.contains("Certificate") && !plain.contains("Match domains"));
        let t = render_status_all(&status_json(&json!({"Prefs": {"accept_dns": true}}), ""));
        for want in [
            "(no fallback resolvers configured)",
            "Nameservers IP Addresses:\n  (none were provided)",
            "(no certificate domains are configured)",
            "(no extra records are configured)",
            "(no suffixes are filtered)",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
    }

    #[test]
    fn query_answers_and_forwards() {
        let v = json!({"Name": "gonode", "QueryType": "A", "ResponseCode": "RCodeSuccess",
            "Answers": [{"Name": "gonode.", "TTL": 600, "Class": "ClassINET", "Type": "TypeA", "Body": "100.64.0.2"}]});
        assert_eq!(
            render_query(&v),
            "DNS query for \"gonode\" (A) using internal resolver:\n\n\
             Answered by MagicDNS on this node (100.100.100.100).\n\n\
             Response code: RCodeSuccess\n\n\
             Name     TTL  Class      Type   Body\n\
             ----     ---  -----      ----   ----\n\
             gonode.  600  ClassINET  TypeA  100.64.0.2\n\n"
        );
        let v = json!({"Name": "nobody.ts.example", "QueryType": "A", "ResponseCode": "RCodeNameError", "Answers": []});
        assert!(render_query(&v).ends_with("Response code: RCodeNameError\n\n  (no answers found)\n"));
        let v = json!({"Name": "x.corp.example", "QueryType": "A", "Forward": "split-dns",
                       "Resolvers": [{"Addr": "10.0.0.53:53"}]});
        let t = render_query(&v);
        assert!(
            t.contains("split DNS resolvers for its domain:\n  - 10.0.0.53:53\n"),
            "{t}"
        );
        assert!(!t.contains("Response code"), "{t}");
    }
}
