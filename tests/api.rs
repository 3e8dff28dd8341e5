//! The REST API (`/api/v1`) over real loopback HTTP/1: API key checks, status codes for bad
//! input, and every resource driven the way a headscale web UI drives it, including a node
//! registered interactively and approved through `POST /api/v1/node/register`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

mod common;

use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};
use tinyscale::{
    control::client::{self, ControlUrl},
    coordinator::{
        admin::{self, AdminRequest},
        server::{self, Coordinator},
        state::{Settings, State},
        store::Store,
    },
    wire::keys::{MachinePrivate, NodePrivate},
    wire::tailcfg::{self, RegisterRequest},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const DEADLINE: Duration = Duration::from_secs(10);

struct Harness {
    coord: Arc<Coordinator>,
    addr: SocketAddr,
}

async fn start() -> Harness {
    let (coord, addr) = common::start_coordinator().await;
    Harness { coord, addr }
}

impl Harness {
    /// A new API key made through the admin path (as `server apikeys create` does).
    fn api_key(&self) -> (String, String) {
        let v = admin::handle_value(&self.coord, AdminRequest::ApikeysCreate { expiration_secs: None }).unwrap();
        (v["key"].as_str().unwrap().into(), v["prefix"].as_str().unwrap().into())
    }

    /// One request; returns the status and the body (JSON when it parses, else a string).
    async fn call(&self, key: Option<&str>, method: &str, target: &str, body: &str) -> (u16, Value) {
        let auth = key
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        raw(self.addr, req.as_bytes()).await
    }
}

async fn raw(addr: SocketAddr, bytes: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("response")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    (status, v)
}

#[tokio::test(flavor = "current_thread")]
async fn missing_bad_and_expired_keys_get_the_same_short_401() {
    let h = start().await;
    let (key, prefix) = h.api_key();
    let (other, _) = h.api_key();
    let (st, v) = h.call(Some(&key), "GET", "/api/v1/user", "").await;
    assert_eq!((st, v), (200, json!({"users": []})));
    let secret_flipped = format!("{}x", &key[..key.len() - 1]);
    for bad in [
        None,
        Some(""),
        Some("nodot"),
        Some(secret_flipped.as_str()),
        Some("unknown.secret"),
    ] {
        for path in ["/api/v1/user", "/api/v1/nothing-here"] {
            let (st, v) = h.call(bad, "GET", path, "").await;
            assert_eq!((st, v), (401, json!("Unauthorized\n")), "{bad:?} {path}");
        }
    }
    // Not Bearer: refused too.
    let r = raw(
        h.addr,
        format!("GET /api/v1/user HTTP/1.1\r\nAuthorization: Basic {key}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.0, 401);
    // The scheme's case does not matter.
    let r = raw(
        h.addr,
        format!("GET /api/v1/user HTTP/1.1\r\nAuthorization: bearer {key}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.0, 200);
    // Expired through the API itself (with the other key), then refused.
    let (st, _) = h
        .call(
            Some(&other),
            "POST",
            "/api/v1/apikey/expire",
            &json!({ "prefix": prefix }).to_string(),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(h.call(Some(&key), "GET", "/api/v1/user", "").await.0, 401);
    assert_eq!(h.call(Some(&other), "GET", "/api/v1/user", "").await.0, 200);
}

#[tokio::test(flavor = "current_thread")]
async fn bad_input_gets_clear_statuses() {
    let h = start().await;
    let (key, _) = h.api_key();
    let k = Some(key.as_str());
    let (st, v) = h.call(k, "GET", "/api/v1/frobnicate", "").await;
    assert_eq!((st, &v["code"]), (404, &json!(5)), "{v}");
    assert_eq!(h.call(k, "PATCH", "/api/v1/user", "").await.0, 404);
    let (st, v) = h.call(k, "POST", "/api/v1/user", "{\"name\":").await;
    assert_eq!(st, 400);
    assert!(v["message"].as_str().unwrap().contains("invalid JSON body"), "{v}");
    let (st, v) = h.call(k, "DELETE", "/api/v1/node/abc", "").await;
    assert!(st == 400 && v["message"].as_str().unwrap().contains("\"abc\""), "{v}");
    let (st, v) = h.call(k, "DELETE", "/api/v1/node/42", "").await;
    assert_eq!((st, &v["code"]), (404, &json!(5)), "{v}");
    // Over the body limit: refused before anything is read or authenticated.
    let big = format!(
        "PUT /api/v1/policy HTTP/1.1\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n",
        tinyscale::wire::http1::MAX_BODY + 1
    );
    assert_eq!(raw(h.addr, big.as_bytes()).await.0, 413);
    // Duplicates are conflicts.
    assert_eq!(h.call(k, "POST", "/api/v1/user", r#"{"name":"a"}"#).await.0, 200);
    assert_eq!(h.call(k, "POST", "/api/v1/user", r#"{"name":"a"}"#).await.0, 409);
    // A policy with errors is refused whole, with the reason.
    let (st, v) = h
        .call(k, "PUT", "/api/v1/policy", r#"{"policy":"{\"acls\": [{}]}"}"#)
        .await;
    assert_eq!(st, 400, "{v}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_web_ui_session_end_to_end() {
    common::capture_logs();
    let h = start().await;
    let (key, prefix) = h.api_key();
    let k = Some(key.as_str());
    let call = |m: &'static str, t: String, b: Value| {
        let h = &h;
        async move {
            let body = if b.is_null() { String::new() } else { b.to_string() };
            let (st, v) = h.call(k, m, &t, &body).await;
            assert_eq!(st, 200, "{m} {t}: {v}");
            v
        }
    };

    // Users.
    let u = call("POST", "/api/v1/user".into(), json!({"name": "alice"})).await;
    let uid = u["user"]["id"].as_str().unwrap().to_string();
    assert_eq!(u["user"]["name"], "alice");
    call("POST", "/api/v1/user".into(), json!({"name": "bob"})).await;
    let v = call("GET", "/api/v1/user?name=bob".into(), Value::Null).await;
    assert_eq!(v["users"].as_array().unwrap().len(), 1);
    let v = call("POST", format!("/api/v1/user/{uid}/rename/carol"), Value::Null).await;
    assert_eq!(v["user"]["name"], "carol");

    // Pre-auth keys: the user by id (0.26+) or by name (older clients).
    let pk = call(
        "POST",
        "/api/v1/preauthkey".into(),
        json!({"user": uid, "reusable": true, "expiration": tailcfg::format_time(server::unix_now() + 3600), "aclTags": ["tag:web"]}),
    )
    .await;
    let pk = &pk["preAuthKey"];
    assert!(pk["key"].as_str().unwrap().starts_with("tskey-auth-"), "{pk}");
    assert_eq!(
        (pk["user"]["name"].as_str(), pk["aclTags"][0].as_str()),
        (Some("carol"), Some("tag:web"))
    );
    call("POST", "/api/v1/preauthkey".into(), json!({"user": "bob"})).await;
    let v = call("GET", format!("/api/v1/preauthkey?user={uid}"), Value::Null).await;
    assert_eq!(v["preAuthKeys"].as_array().unwrap().len(), 1);
    call(
        "POST",
        "/api/v1/preauthkey/expire".into(),
        json!({"user": uid, "key": pk["key"]}),
    )
    .await;
    let v = call("GET", "/api/v1/preauthkey?user=carol".into(), Value::Null).await;
    assert!(v["preAuthKeys"][0]["expiration"].is_string(), "{v}");

    // A node registered interactively and approved through the API.
    let url = ControlUrl::parse(&format!("http://{}", h.addr)).unwrap();
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    let machine = MachinePrivate::from_random(b);
    OsRng.fill_bytes(&mut b);
    let node = NodePrivate::from_random(b);
    let server_key = client::fetch_server_key(&url).await.unwrap();
    let mut conn = client::connect(&url, &machine, &server_key).await.unwrap();
    let mut req = RegisterRequest {
        version: tailcfg::CURRENT_CAPABILITY_VERSION,
        node_key: node.public(),
        expiry: tailcfg::ZERO_TIME.into(),
        hostinfo: Some(json!({"Hostname": "laptop", "OS": "linux", "RoutableIPs": ["10.9.0.0/24"]})),
        ..Default::default()
    };
    let r = conn.register(&req).await.unwrap();
    let reg_id = r.auth_url.rsplit('/').next().unwrap().to_string();
    req.followup = r.auth_url.clone();
    let waiter = tokio::spawn(async move { conn.register(&req).await });
    let v = call(
        "POST",
        format!("/api/v1/node/register?user=carol&key={reg_id}"),
        Value::Null,
    )
    .await;
    let n = &v["node"];
    let nid = n["id"].as_str().unwrap().to_string();
    assert_eq!(
        (n["user"]["name"].as_str(), n["name"].as_str()),
        (Some("carol"), Some("laptop"))
    );
    assert!(n["machineKey"].as_str().unwrap().starts_with("mkey:"), "{n}");
    assert!(n["ipAddresses"].as_array().is_some_and(|a| !a.is_empty()), "{n}");
    let done = tokio::time::timeout(DEADLINE, waiter).await.unwrap().unwrap().unwrap();
    assert!(done.machine_authorized);

    let v = call("GET", format!("/api/v1/node/{nid}"), Value::Null).await;
    assert_eq!(v["node"]["givenName"], "laptop");
    assert_eq!(h.call(k, "GET", "/api/v1/node/999", "").await.0, 404);
    let v = call("GET", "/api/v1/node?user=carol".into(), Value::Null).await;
    assert_eq!(v["nodes"].as_array().unwrap().len(), 1);
    let v = call("GET", "/api/v1/node?user=bob".into(), Value::Null).await;
    assert_eq!(v["nodes"], json!([]));
    let v = call("POST", format!("/api/v1/node/{nid}/rename/work-laptop"), Value::Null).await;
    assert_eq!(v["node"]["givenName"], "work-laptop");
    let v = call("POST", format!("/api/v1/node/{nid}/tags"), json!({"tags": ["tag:web"]})).await;
    assert_eq!(v["node"]["validTags"], json!(["tag:web"]));
    let v = call("POST", format!("/api/v1/node/{nid}/user"), json!({"user": "bob"})).await;
    assert_eq!(v["node"]["user"]["name"], "bob");

    // Routes: the 0.26+ approval, and the older route ids mapped onto it.
    let v = call("GET", format!("/api/v1/node/{nid}/routes"), Value::Null).await;
    let route = &v["routes"][0];
    assert_eq!(
        (route["prefix"].as_str(), route["enabled"].as_bool()),
        (Some("10.9.0.0/24"), Some(false))
    );
    let rid = route["id"].as_str().unwrap().to_string();
    call("POST", format!("/api/v1/routes/{rid}/enable"), Value::Null).await;
    let v = call("GET", format!("/api/v1/node/{nid}"), Value::Null).await;
    assert_eq!(v["node"]["approvedRoutes"], json!(["10.9.0.0/24"]));
    assert_eq!(v["node"]["subnetRoutes"], json!(["10.9.0.0/24"]));
    call("POST", format!("/api/v1/routes/{rid}/disable"), Value::Null).await;
    let v = call("GET", "/api/v1/routes".into(), Value::Null).await;
    assert_eq!(v["routes"][0]["enabled"], false);
    let v = call(
        "POST",
        format!("/api/v1/node/{nid}/approve_routes"),
        json!({"routes": ["10.9.0.0/24"]}),
    )
    .await;
    assert_eq!(v["node"]["approvedRoutes"], json!(["10.9.0.0/24"]));

    let v = call("POST", format!("/api/v1/node/{nid}/expire"), Value::Null).await;
    assert!(v["node"]["expiry"].is_string(), "{v}");

    // Policy.
    let pol = "// web\n{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:80\"]}]}\n";
    let v = call("PUT", "/api/v1/policy".into(), json!({ "policy": pol })).await;
    assert!(v["policy"] == pol && v["updatedAt"].is_string(), "{v}");
    let v = call("GET", "/api/v1/policy".into(), Value::Null).await;
    assert_eq!(v["policy"], pol);

    // API keys: made, listed (prefix only), the new one works, then deleted.
    let v = call("POST", "/api/v1/apikey".into(), json!({})).await;
    let second = v["apiKey"].as_str().unwrap().to_string();
    let v = call("GET", "/api/v1/apikey".into(), Value::Null).await;
    let listed = v["apiKeys"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        !v.to_string().contains(second.split_once('.').unwrap().1),
        "no secret in lists"
    );
    assert_eq!(h.call(Some(&second), "GET", "/api/v1/node", "").await.0, 200);
    let second_prefix = second.split_once('.').unwrap().0.to_string();
    call("DELETE", format!("/api/v1/apikey/{second_prefix}"), Value::Null).await;
    assert_eq!(h.call(Some(&second), "GET", "/api/v1/node", "").await.0, 401);

    // Deletes.
    call("DELETE", format!("/api/v1/node/{nid}"), Value::Null).await;
    call("DELETE", format!("/api/v1/user/{uid}"), Value::Null).await;
    let v = call("GET", "/api/v1/user".into(), Value::Null).await;
    assert_eq!(v["users"].as_array().unwrap().len(), 1);

    // Every mutation was logged with the key's prefix; reads were not.
    let logs = common::captured_logs();
    let api: Vec<&String> = logs
        .iter()
        .map(|(_, l)| l)
        .filter(|l| l.starts_with("api request"))
        .collect();
    assert!(api.iter().all(|l| l.contains(&format!("key={prefix}"))), "{api:?}");
    assert!(
        api.iter().any(|l| l.contains("method=DELETE path=/api/v1/node/")),
        "{api:?}"
    );
    assert!(!api.iter().any(|l| l.contains("method=GET")), "{api:?}");
}

const BIN: &str = env!("CARGO_BIN_EXE_tinyscale");

/// `tinyscale server --remote URL <args>` with the key in TINYSCALE_API_KEY (and `SSL_CERT_FILE`
/// = `ca`), run off the runtime thread so the in-process server keeps serving.
async fn remote(url: &str, key: &str, args: &[&str], ca: Option<&std::path::Path>) -> (bool, String) {
    let mut c = std::process::Command::new(BIN);
    c.args(["server", "--remote", url])
        .args(args)
        .env("TINYSCALE_API_KEY", key);
    if let Some(ca) = ca {
        c.env("SSL_CERT_FILE", ca);
    }
    let o = tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[tokio::test(flavor = "current_thread")]
async fn server_verbs_run_remotely_over_the_api() {
    let h = start().await;
    let (key, prefix) = h.api_key();
    let url = format!("http://{}", h.addr);
    let (ok, out) = remote(&url, &key, &["users", "create", "alice"], None).await;
    assert!(ok && out.contains("user alice"), "{out}");
    let (ok, out) = remote(&url, &key, &["users", "list", "-o", "json"], None).await;
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(ok && v[0]["name"] == "alice", "{out}");
    let (ok, out) = remote(
        &url,
        &key,
        &["preauthkeys", "create", "-u", "alice", "--reusable"],
        None,
    )
    .await;
    assert!(ok && out.starts_with("tskey-auth-"), "{out}");
    let (ok, out) = remote(&url, &key, &["apikeys", "list"], None).await;
    assert!(ok && out.contains(&prefix), "{out}");
    // The coordinator's own errors come back as they are.
    let (ok, out) = remote(&url, &key, &["nodes", "delete", "-i", "9"], None).await;
    assert!(!ok && out.contains("node 9 not found"), "{out}");
    // --api-key works too; a wrong key is refused with a clear message.
    let mut o = std::process::Command::new(BIN);
    o.args(["server", "--remote", &url, "--api-key", &key, "users", "list"])
        .env_remove("TINYSCALE_API_KEY");
    let o = tokio::task::spawn_blocking(move || o.output().unwrap()).await.unwrap();
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("alice"));
    let (ok, out) = remote(&url, "nope.nope", &["users", "list"], None).await;
    assert!(!ok && out.contains("API key was refused"), "{out}");
    let (ok, out) = remote(&url, "", &["users", "list"], None).await;
    assert!(!ok && out.contains("--api-key"), "{out}");
    // The change went through the coordinator itself.
    let users = admin::handle_value(&h.coord, AdminRequest::UsersList).unwrap();
    assert_eq!(users[0]["name"], "alice");
}

/// Over https the certificate is verified as the control client verifies it: a CA the client
/// does not trust fails the call.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "current_thread")]
async fn remote_verbs_verify_the_coordinators_certificate() {
    let dir = std::env::temp_dir().join(format!("tinyscale-api-tls-{}", std::process::id()));
    let Some(ca) = common::test_ca(&dir.join("ca")) else {
        return;
    };
    let Some(other) = common::test_ca(&dir.join("other")) else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let st = State::load(Store::open_in_memory().unwrap(), Settings::default()).unwrap();
    let coord = Coordinator::new(st).unwrap();
    let acceptor = tinyscale::platform::tls::Acceptor::from_pem_files(&ca.cert, &ca.key).unwrap();
    tokio::spawn(server::serve_http(coord.clone(), listener, Some(acceptor)));
    let key = admin::handle_value(&coord, AdminRequest::ApikeysCreate { expiration_secs: None }).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("https://{addr}");
    let (ok, out) = remote(&url, &key, &["users", "create", "bob"], Some(&ca.ca)).await;
    assert!(ok && out.contains("user bob"), "{out}");
    let (ok, out) = remote(&url, &key, &["users", "list"], Some(&other.ca)).await;
    assert!(!ok && out.to_lowercase().contains("certificate"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
