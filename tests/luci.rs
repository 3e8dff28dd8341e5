//! Checks on the LuCI app (luci/luci-app-tinyscale): every view parses (`node --check`), every
//! `rpc.declare({object, method, params})` names a method of the daemon's ubus tables with
//! known arguments, the rpcd ACL grants each method on the side its table says (read or write)
//! and nothing else, menu.d and acl.d have the shape luci-base reads, and the views stay within
//! their size budget.
//!
//! `node` comes from the Debian package nodejs (scripts/prereqs.sh); without it the syntax
//! check says so and passes, unless `TINYSCALE_REQUIRE_NODE=1` (set by scripts/test.sh when it
//! is installed).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde_json::Value;
use tinyscale::platform::ubus_object;

/// Unminified JavaScript of all views together.
const JS_BUDGET: usize = 40 * 1024;
/// The ACL group the menu depends on.
const ACL_GROUP: &str = "luci-app-tinyscale";

fn app() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("luci/luci-app-tinyscale")
}

fn views_dir() -> PathBuf {
    app().join("htdocs/luci-static/resources/view/tinyscale")
}

/// (file name, text) of every view, sorted.
fn views() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(views_dir())
        .expect("views directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "js"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).expect("view"))
        })
        .collect();
    v.sort();
    v
}

fn json_file(rel: &str) -> Value {
    let p = app().join(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", p.display()))
}

fn menu() -> Value {
    json_file("root/usr/share/luci/menu.d/luci-app-tinyscale.json")
}

fn acl() -> Value {
    json_file("root/usr/share/rpcd/acl.d/luci-app-tinyscale.json")
}

/// The quoted string after `key:` in `s`.
fn quoted_after(s: &str, key: &str) -> Option<String> {
    let rest = s[s.find(key)? + key.len()..].trim_start();
    let q = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let body = &rest[1..];
    Some(body[..body.find(q)?].to_string())
}

/// One `rpc.declare({...})`: object, method, params.
#[derive(Debug)]
struct Declare {
    object: String,
    method: String,
    params: Vec<String>,
}

fn declares(js: &str) -> Vec<Declare> {
    let mut out = Vec::new();
    let mut rest = js;
    while let Some(i) = rest.find("rpc.declare(") {
        rest = &rest[i + "rpc.declare(".len()..];
        let body = &rest[..rest.find(')').expect("rpc.declare( is closed")];
        let params = match body.find("params:") {
            Some(p) => {
                let list = &body[p..];
                let list = &list[list.find('[').expect("[")..=list.find(']').expect("]")];
                list.split(',')
                    .filter_map(|x| {
                        let x = x.trim_matches(|c: char| c == '[' || c == ']' || c.is_whitespace());
                        (!x.is_empty()).then(|| x.trim_matches(|c| c == '\'' || c == '"').to_string())
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        out.push(Declare {
            object: quoted_after(body, "object:").unwrap_or_else(|| panic!("declare without object: {body}")),
            method: quoted_after(body, "method:").unwrap_or_else(|| panic!("declare without method: {body}")),
            params,
        });
    }
    out
}

/// Every ubus method the daemon registers: object -> method -> (argument names, write side).
fn tables() -> BTreeMap<&'static str, BTreeMap<&'static str, (Vec<&'static str>, bool)>> {
    let mut t = BTreeMap::new();
    t.insert(
        ubus_object::OBJECT,
        ubus_object::METHODS
            .iter()
            .map(|m| (m.name, (m.args.iter().map(|a| a.0).collect(), m.write)))
            .collect(),
    );
    #[cfg(feature = "coordinator")]
    {
        use tinyscale::coordinator::admin;
        t.insert(
            admin::SERVER_OBJECT,
            admin::SERVER_METHODS
                .iter()
                .map(|m| (m.name, (m.args.iter().map(|a| a.0).collect(), m.write)))
                .collect(),
        );
    }
    t
}

#[test]
fn views_parse() {
    let have_node = std::process::Command::new("node").arg("--version").output().is_ok();
    if !have_node {
        assert_ne!(
            std::env::var("TINYSCALE_REQUIRE_NODE").as_deref(),
            Ok("1"),
            "node not found (Debian package nodejs)"
        );
        eprintln!("skipped: node not found, the views' syntax is not checked");
        return;
    }
    let views = views();
    assert!(views.len() >= 3, "{views:?}");
    for (name, _) in views {
        let out = std::process::Command::new("node")
            .arg("--check")
            .arg(views_dir().join(&name))
            .output()
            .expect("node");
        assert!(
            out.status.success(),
            "node --check {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn views_fit_the_size_budget() {
    let total: usize = views().iter().map(|(_, t)| t.len()).sum();
    assert!(total <= JS_BUDGET, "views are {total} bytes, budget {JS_BUDGET}");
}

#[test]
fn declared_methods_exist_with_known_arguments() {
    let t = tables();
    let mut seen = 0;
    for (name, js) in views() {
        for d in declares(&js) {
            seen += 1;
            #[cfg(not(feature = "coordinator"))]
            if d.object != ubus_object::OBJECT {
                continue;
            }
            let methods = t
                .get(d.object.as_str())
                .unwrap_or_else(|| panic!("{name}: no ubus object {}", d.object));
            let (args, _) = methods
                .get(d.method.as_str())
                .unwrap_or_else(|| panic!("{name}: {} has no method {}", d.object, d.method));
            for p in &d.params {
                assert!(
                    args.contains(&p.as_str()),
                    "{name}: {}.{} has no argument {p}",
                    d.object,
                    d.method
                );
            }
            seen += 1;
        }
    }
    assert!(seen >= 10, "only {seen} rpc.declare found");
}

/// The ACL's ubus map on one side: object -> methods.
fn acl_side(side: &str) -> BTreeMap<String, BTreeSet<String>> {
    let g = &acl()[ACL_GROUP][side];
    let ubus = g["ubus"]
        .as_object()
        .unwrap_or_else(|| panic!("acl.d {side}.ubus is not an object"));
    ubus.iter()
        .map(|(obj, ms)| {
            let ms = ms
                .as_array()
                .unwrap_or_else(|| panic!("acl.d {side}.ubus.{obj} is not a list"));
            let set = ms
                .iter()
                .map(|m| {
                    m.as_str()
                        .unwrap_or_else(|| panic!("acl.d {side}.ubus.{obj}: {m} is not a string"))
                        .to_string()
                })
                .collect();
            (obj.clone(), set)
        })
        .collect()
}

#[test]
fn acl_grants_each_method_on_its_side() {
    let (read, write) = (acl_side("read"), acl_side("write"));
    for (obj, methods) in tables() {
        for (m, (_, is_write)) in methods {
            let (want, other) = if is_write { (&write, &read) } else { (&read, &write) };
            let side = if is_write { "write" } else { "read" };
            assert!(
                want.get(obj).is_some_and(|s| s.contains(m)),
                "acl.d: {obj}.{m} missing from {side}"
            );
            assert!(
                !other.get(obj).is_some_and(|s| s.contains(m)),
                "acl.d: {obj}.{m} is a {side} method but also on the other side"
            );
        }
    }
    // Nothing granted that the daemon does not have.
    let t = tables();
    for (side, map) in [("read", &read), ("write", &write)] {
        for (obj, ms) in map {
            #[cfg(not(feature = "coordinator"))]
            if obj != ubus_object::OBJECT {
                continue;
            }
            let known = t
                .get(obj.as_str())
                .unwrap_or_else(|| panic!("acl.d {side}: no ubus object {obj}"));
            for m in ms {
                assert!(known.contains_key(m.as_str()), "acl.d {side}: {obj} has no method {m}");
            }
        }
    }
}

#[test]
fn acl_has_the_shape_rpcd_reads() {
    let a = acl();
    let groups = a.as_object().expect("acl.d is an object of groups");
    assert_eq!(groups.keys().collect::<Vec<_>>(), [ACL_GROUP]);
    let g = &a[ACL_GROUP];
    assert!(g["description"].as_str().is_some_and(|d| !d.is_empty()), "description");
    for side in ["read", "write"] {
        let uci = g[side]["uci"]
            .as_array()
            .unwrap_or_else(|| panic!("{side}.uci is a list"));
        assert!(uci.iter().any(|c| c == "tinyscale"), "{side}.uci grants tinyscale");
        for k in g[side].as_object().expect("side").keys() {
            assert!(
                ["ubus", "uci", "file", "cgi-io"].contains(&k.as_str()),
                "{side}.{k}: unknown scope"
            );
        }
    }
}

#[test]
fn menu_has_the_shape_luci_reads() {
    let m = menu();
    let entries = m.as_object().expect("menu.d is an object of paths");
    let acl_groups: Vec<String> = acl().as_object().expect("acl").keys().cloned().collect();
    let mut views_in_menu = BTreeSet::new();
    for (path, e) in entries {
        assert!(path.starts_with("admin/vpn/tinyscale"), "{path}");
        assert!(e["title"].as_str().is_some_and(|t| !t.is_empty()), "{path}: title");
        assert!(e["order"].is_u64(), "{path}: order");
        match e["action"]["type"].as_str() {
            Some("view") => {
                let v = e["action"]["path"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{path}: action.path"));
                let file = v.strip_prefix("tinyscale/").unwrap_or_else(|| panic!("{path}: {v}"));
                assert!(
                    views_dir().join(format!("{file}.js")).is_file(),
                    "{path}: no view {v}.js"
                );
                views_in_menu.insert(format!("{file}.js"));
            }
            Some("firstchild") => {}
            t => panic!("{path}: action type {t:?}"),
        }
        if let Some(d) = e.get("depends") {
            for k in d.as_object().expect("depends").keys() {
                assert!(["acl", "uci", "fs"].contains(&k.as_str()), "{path}: depends.{k}");
            }
            for g in d["acl"].as_array().into_iter().flatten() {
                assert!(acl_groups.iter().any(|a| g == a), "{path}: depends on unknown acl {g}");
            }
            if let Some(u) = d.get("uci") {
                assert!(
                    u.as_object().is_some_and(|o| o.contains_key("tinyscale")),
                    "{path}: depends.uci"
                );
            }
        }
    }
    // The top entry needs the ACL; the Coordinator page shows only with the server enabled.
    let top = &m["admin/vpn/tinyscale"]["depends"];
    assert_eq!(top["acl"], serde_json::json!([ACL_GROUP]));
    assert_eq!(
        m["admin/vpn/tinyscale/coordinator"]["depends"]["uci"]["tinyscale"]["main"]["enabled"],
        "1"
    );
    let files: BTreeSet<String> = views().into_iter().map(|(n, _)| n).collect();
    assert_eq!(views_in_menu, files, "every view has a menu entry");
}

#[test]
fn declare_scanner() {
    let d = declares("var a = rpc.declare({ object: 'x.y', method: \"m\", params: [ 'a', \"b\" ] });\nrpc.declare({object:'o',method:'n'})");
    assert_eq!(d.len(), 2);
    assert_eq!((d[0].object.as_str(), d[0].method.as_str()), ("x.y", "m"));
    assert_eq!(d[0].params, ["a", "b"]);
    assert!(d[1].params.is_empty());
}
