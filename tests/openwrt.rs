//! The OpenWrt package's firewall script against fw4's default config: the uci batch that
//! `openwrt/files/tinyscale.uci-defaults` prints is applied with our uci parser (the same
//! commands `uci batch` runs on the router), and the result is checked: the `tailnet` zone and
//! its forwardings are added, user sections stay exactly as they were, the result is what
//! the real `uci` (recorded) made of the same batch, a second run changes nothing, and the
//! removal batch restores the original.

use std::process::Command;

use tinyscale::platform::uci::{
    batch::{apply, export},
    client::DEFAULT_TUN,
    parse, UciFile,
};

const FIREWALL: &str = include_str!("vectors/openwrt/firewall.default");
/// `uci export firewall` from the real uci (openwrt/uci) after the add batch; comment lines
/// at the top say how it was recorded.
const AFTER_ADD_REAL_UCI: &str = include_str!("vectors/openwrt/firewall.after-add");

/// The batch the script prints for `mode` (`add` or `remove`), run by `sh` as on the router.
fn script_batch(mode: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/openwrt/files/tinyscale.uci-defaults");
    let out = Command::new("sh")
        .arg(script)
        .env("TINYSCALE_FW_PRINT", mode)
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 batch")
}

fn applied(file: &UciFile, batch: &str) -> UciFile {
    let mut f = file.clone();
    apply(&mut f, "firewall", batch).expect("batch applies");
    f
}

#[test]
fn adds_the_tailnet_zone_and_forwardings_only() {
    let orig = parse(FIREWALL).expect("fw4 default parses");
    let f = applied(&orig, &script_batch("add"));
    // Every user section is untouched and in place; ours come after them.
    let n = orig.sections.len();
    assert_eq!(f.sections[..n], orig.sections[..]);
    let ours = UciFile {
        package: None,
        sections: f.sections[n..].to_vec(),
    };
    assert_eq!(
        export(&ours, "firewall"),
        format!(
            "package firewall\n\n\
             config zone 'tinyscale'\n\toption name 'tailnet'\n\toption device '{DEFAULT_TUN}'\n\
             \toption input 'ACCEPT'\n\toption output 'ACCEPT'\n\toption forward 'ACCEPT'\n\
             \toption masq '1'\n\toption mtu_fix '1'\n\n\
             config forwarding 'tinyscale_lan'\n\toption src 'tailnet'\n\toption dest 'lan'\n\n\
             config forwarding 'lan_tinyscale'\n\toption src 'lan'\n\toption dest 'tailnet'\n\n\
             config forwarding 'tinyscale_wan'\n\toption src 'tailnet'\n\toption dest 'wan'\n\n"
        )
    );
    // The forwardings name zones that exist.
    let zones: Vec<&str> = f
        .sections
        .iter()
        .filter(|s| s.kind == "zone")
        .filter_map(|s| s.options.iter().find(|o| o.name == "name").map(|o| o.value.as_str()))
        .collect();
    assert_eq!(zones, ["lan", "wan", "tailnet"]);
    for s in f.sections.iter().filter(|s| s.kind == "forwarding") {
        for o in s.options.iter().filter(|o| o.name == "src" || o.name == "dest") {
            assert!(zones.contains(&o.value.as_str()), "{:?} names no zone", o);
        }
    }
}

#[test]
fn matches_what_the_real_uci_made_of_it() {
    let orig = parse(FIREWALL).expect("fw4 default parses");
    let f = applied(&orig, &script_batch("add"));
    let want: String = AFTER_ADD_REAL_UCI
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(export(&f, "firewall"), want);
}

#[test]
fn running_twice_changes_nothing() {
    let orig = parse(FIREWALL).expect("fw4 default parses");
    let batch = script_batch("add");
    let once = applied(&orig, &batch);
    let twice = applied(&once, &batch);
    assert_eq!(export(&twice, "firewall"), export(&once, "firewall"));
}

#[test]
fn removal_restores_the_original() {
    let orig = parse(FIREWALL).expect("fw4 default parses");
    let added = applied(&orig, &script_batch("add"));
    let removed = applied(&added, &script_batch("remove"));
    assert_eq!(removed.sections, orig.sections);
    // Removing from a config that never had ours is harmless too.
    assert_eq!(applied(&orig, &script_batch("remove")).sections, orig.sections);
}
