//! The REST API under `/api/v1`, shaped as headscale 0.27 serves it through grpc-gateway
//! (`gen/openapiv2/headscale/v1/headscale.swagger.json`), so headscale web UIs and scripts can
//! point at the coordinator.
//!
//! Three steps, the first and last pure:
//! - [`route`]: method + target (path and query) + body → an [`AdminRequest`] and the [`Shape`]
//!   of the answer. Unknown paths are [`ApiError::NotFound`], bad JSON [`ApiError::BadRequest`]
//!   with the reason.
//! - [`admin::handle_value`]: the one code path the CLI, ubus and REST share.
//! - [`render`]: the admin JSON → headscale's field names (camelCase, ids as strings,
//!   RFC 3339 times; unset times are left out rather than sent as `null`).
//!
//! The caller (`server.rs`) reads the body (size-limited), checks `Authorization: Bearer` with
//! [`State::check_api_key`](super::state::State::check_api_key) first, and passes `now`.
//!
//! Compatibility notes: where a path takes a user id (0.26+) a user name is accepted too, as
//! older clients send names. The pre-0.26 route paths (`GET /api/v1/routes`,
//! `POST /api/v1/routes/{id}/enable|disable`, `GET /api/v1/node/{id}/routes`) are served as
//! aliases over route approvals; a route's id is `node id * 1024 + its row` in `routes list`.
//! `POST /api/v1/admin` (tinyscale's own) takes one [`AdminRequest`] as the admin socket does
//! and answers its JSON unchanged: `tinyscale server --remote URL` runs the verbs through it.
#![forbid(unsafe_code)]

use serde_json::{json, Map, Value};

use super::{
    admin::{self, AdminRequest as R},
    server::Coordinator,
    state::CoordError,
};
use crate::wire::tailcfg;

/// Default life of a pre-auth key made without `expiration` (as the CLI).
const DEFAULT_PREAUTH_SECS: u64 = 3600;
/// Default life of an API key made without `expiration` (headscale CLI: 90 days).
const DEFAULT_API_KEY_SECS: u64 = 90 * 86_400;

/// How to turn the admin answer into the REST answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// `{"user": …}`.
    User,
    /// `{"users": […]}`, optionally only the user with this id or name.
    Users { id: Option<String>, name: Option<String> },
    /// `{"node": …}`.
    Node,
    /// `{"node": …}` picked by id from the node list (404 if absent).
    OneNode(u64),
    /// `{"nodes": […]}`.
    Nodes,
    /// `{"preAuthKey": …}`.
    PreAuthKey,
    /// `{"preAuthKeys": […]}`.
    PreAuthKeys,
    /// `{"apiKey": "<prefix>.<secret>"}`.
    ApiKeyCreated,
    /// `{"apiKeys": […]}`.
    ApiKeys,
    /// `{"policy": text}`.
    Policy,
    /// `{"policy": text, "updatedAt": now}` after a set.
    PolicySet(String),
    /// `{"routes": […]}` (pre-0.26), optionally only one node's.
    Routes(Option<u64>),
    /// `{}`.
    Empty,
    /// The admin answer as it is (`/api/v1/admin`, for `tinyscale server --remote`).
    Raw,
}

/// One routed REST request.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiCall {
    /// What to ask the coordinator.
    pub req: R,
    /// How to answer.
    pub shape: Shape,
}

/// A request that never reaches the coordinator (or an answer that cannot be shaped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// No such path (or method on it): 404.
    NotFound,
    /// Bad id, bad JSON or a bad field: 400 with the reason.
    BadRequest(String),
}

/// `%XX` and `+` decoding of a query value or path segment; `None` if not UTF-8 or malformed.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The (decoded) value of query parameter `key`; empty values count as absent.
fn query(q: &str, key: &str) -> Result<Option<String>, ApiError> {
    for kv in q.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k == key {
            let v = percent_decode(v).ok_or_else(|| ApiError::BadRequest(format!("query {key}: bad encoding")))?;
            return Ok((!v.is_empty()).then_some(v));
        }
    }
    Ok(None)
}

fn id(s: &str, what: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("{what} {s:?} is not an id (a positive integer)")))
}

/// A request body: a JSON object (an empty body counts as `{}`). Fields are read by name with
/// proto3 JSON's rules: absent or `null` is the default, unknown fields are ignored
/// (grpc-gateway's `DiscardUnknown`). One `Value` parse instead of a typed struct per path keeps
/// the code small on the router.
struct Body(Map<String, Value>);

fn body(b: &[u8]) -> Result<Body, ApiError> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(Body(Map::new()));
    }
    match serde_json::from_slice(b) {
        Ok(Value::Object(m)) => Ok(Body(m)),
        Ok(_) => Err(bad_field("", "a JSON object")),
        Err(e) => Err(ApiError::BadRequest(format!("invalid JSON body: {e}"))),
    }
}

fn bad_field(k: &str, want: &str) -> ApiError {
    ApiError::BadRequest(format!("invalid JSON body: field {k:?}: expected {want}"))
}

impl Body {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn string(&self, k: &str) -> Result<String, ApiError> {
        match self.get(k) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(bad_field(k, "a string")),
        }
    }

    fn flag(&self, k: &str) -> Result<bool, ApiError> {
        match self.get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(bad_field(k, "true or false")),
        }
    }

    fn list(&self, k: &str) -> Result<Vec<String>, ApiError> {
        let bad = || bad_field(k, "a list of strings");
        match self.get(k) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string).ok_or_else(bad))
                .collect(),
            Some(_) => Err(bad()),
        }
    }

    /// `user`: a uint64 that proto3 JSON sends as a string (or a number), or a name; required.
    fn user(&self) -> Result<String, ApiError> {
        match self.get("user") {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::Number(n)) if n.is_u64() => Ok(n.to_string()),
            _ => Err(ApiError::BadRequest("user is required (an id or a name)".into())),
        }
    }
}

/// Seconds from `now` until the RFC 3339 `expiration` (0 if past); `default` when empty or
/// Go's zero time.
fn secs_until(expiration: &str, now: i64, default: u64) -> Result<u64, ApiError> {
    match tailcfg::parse_time(expiration) {
        Ok(Some(at)) => Ok(at.saturating_sub(now).max(0) as u64),
        Ok(None) => Ok(default),
        Err(_) => Err(ApiError::BadRequest(format!(
            "expiration {expiration:?} is not an RFC 3339 time"
        ))),
    }
}

fn required(v: String, what: &str) -> Result<String, ApiError> {
    if v.is_empty() {
        Err(ApiError::BadRequest(format!("{what} is required")))
    } else {
        Ok(v)
    }
}

/// Maps `method` + `target` (origin-form: path and query) + `body` onto an admin request.
pub fn route(method: &str, target: &str, b: &[u8], now: i64) -> Result<ApiCall, ApiError> {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let rest = path.strip_prefix("/api/v1/").ok_or(ApiError::NotFound)?;
    let segs: Vec<String> = rest
        .trim_end_matches('/')
        .split('/')
        .map(|s| percent_decode(s).ok_or_else(|| ApiError::BadRequest("bad path encoding".into())))
        .collect::<Result<_, _>>()?;
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let node = |n: &str| id(n, "node");
    let (req, shape) = match (method, segs.as_slice()) {
        ("GET", ["user"]) => (
            R::UsersList,
            Shape::Users {
                id: query(q, "id")?,
                name: query(q, "name")?,
            },
        ),
        ("POST", ["user"]) => (
            R::UsersCreate {
                name: required(body(b)?.string("name")?, "name")?,
            },
            Shape::User,
        ),
        ("DELETE", ["user", user]) => (R::UsersDestroy { name: user.to_string() }, Shape::Empty),
        ("POST", ["user", old, "rename", new]) => (
            R::UsersRename {
                old: old.to_string(),
                new: new.to_string(),
            },
            Shape::User,
        ),
        ("GET", ["node"]) => (
            R::NodesList {
                user: query(q, "user")?,
            },
            Shape::Nodes,
        ),
        ("POST", ["node", "register"]) => (
            R::NodesRegister {
                user: required(query(q, "user")?.unwrap_or_default(), "user")?,
                key: required(query(q, "key")?.unwrap_or_default(), "key")?,
            },
            Shape::Node,
        ),
        ("GET", ["node", n]) => (R::NodesList { user: None }, Shape::OneNode(node(n)?)),
        ("DELETE", ["node", n]) => (R::NodesDelete { id: node(n)? }, Shape::Empty),
        ("POST", ["node", n, "expire"]) => (R::NodesExpire { id: node(n)? }, Shape::Node),
        ("POST", ["node", n, "rename", name]) => (
            R::NodesRename {
                id: node(n)?,
                name: name.to_string(),
            },
            Shape::Node,
        ),
        ("POST", ["node", n, "user"]) => (
            R::NodesMove {
                id: node(n)?,
                user: body(b)?.user()?,
            },
            Shape::Node,
        ),
        ("POST", ["node", n, "tags"]) => (
            R::NodesSetTags {
                id: node(n)?,
                tags: body(b)?.list("tags")?,
            },
            Shape::Node,
        ),
        ("POST", ["node", n, "approve_routes"]) => (
            R::NodesApproveRoutes {
                id: node(n)?,
                routes: body(b)?.list("routes")?,
            },
            Shape::Node,
        ),
        ("GET", ["node", n, "routes"]) => (R::RoutesList, Shape::Routes(Some(node(n)?))),
        ("GET", ["preauthkey"]) => (
            R::PreauthkeysList {
                user: query(q, "user")?,
            },
            Shape::PreAuthKeys,
        ),
        ("POST", ["preauthkey"]) => {
            let k = body(b)?;
            let secs = secs_until(&k.string("expiration")?, now, DEFAULT_PREAUTH_SECS)?;
            (
                R::PreauthkeysCreate {
                    user: k.user()?,
                    reusable: k.flag("reusable")?,
                    ephemeral: k.flag("ephemeral")?,
                    // 0 would mean "never" to the coordinator; a past time means "already expired".
                    expiration_secs: Some(secs),
                    tags: k.list("aclTags")?,
                },
                Shape::PreAuthKey,
            )
        }
        ("POST", ["preauthkey", "expire"]) => (
            R::PreauthkeysExpire {
                key: required(body(b)?.string("key")?, "key")?,
            },
            Shape::Empty,
        ),
        ("GET", ["apikey"]) => (R::ApikeysList, Shape::ApiKeys),
        ("POST", ["apikey"]) => {
            let secs = secs_until(&body(b)?.string("expiration")?, now, DEFAULT_API_KEY_SECS)?;
            (
                R::ApikeysCreate {
                    expiration_secs: Some(secs),
                },
                Shape::ApiKeyCreated,
            )
        }
        ("POST", ["apikey", "expire"]) => (
            R::ApikeysExpire {
                prefix: required(body(b)?.string("prefix")?, "prefix")?,
            },
            Shape::Empty,
        ),
        ("DELETE", ["apikey", prefix]) => (
            R::ApikeysDelete {
                prefix: prefix.to_string(),
            },
            Shape::Empty,
        ),
        ("GET", ["policy"]) => (R::PolicyGet, Shape::Policy),
        ("PUT", ["policy"]) => {
            let policy = required(body(b)?.string("policy")?, "policy")?;
            (R::PolicySet { policy: policy.clone() }, Shape::PolicySet(policy))
        }
        ("GET", ["routes"]) => (R::RoutesList, Shape::Routes(None)),
        ("POST", ["routes", r, action @ ("enable" | "disable")]) => (
            R::RoutesSet {
                route: id(r, "route")?,
                enable: *action == "enable",
            },
            Shape::Empty,
        ),
        // tinyscale's own: one admin request as the socket takes it (`server --remote`).
        ("POST", ["admin"]) => {
            let text = std::str::from_utf8(b).map_err(|_| ApiError::BadRequest("body is not UTF-8".into()))?;
            let req = serde_json::from_str(text)
                .map_err(|e| e.to_string())
                .and_then(R::from_json)
                .map_err(|e| ApiError::BadRequest(format!("invalid admin request: {e}")))?;
            (req, Shape::Raw)
        }
        _ => return Err(ApiError::NotFound),
    };
    Ok(ApiCall { req, shape })
}

/// Copies `v[from]` into `out[to]` unless it is absent or null.
fn put(out: &mut Map<String, Value>, to: &str, v: &Value, from: &str) {
    if let Some(x) = v.get(from).filter(|x| !x.is_null()) {
        out.insert(to.into(), x.clone());
    }
}

/// A number as proto3 JSON's uint64 (a string).
fn id_str(v: &Value) -> Value {
    match v {
        Value::Number(n) => Value::String(n.to_string()),
        v => v.clone(),
    }
}

fn user(v: &Value) -> Value {
    let mut o = Map::new();
    o.insert("id".into(), id_str(&v["id"]));
    put(&mut o, "name", v, "name");
    put(&mut o, "createdAt", v, "created_at");
    put(&mut o, "displayName", v, "display_name");
    Value::Object(o)
}

fn owner(v: &Value) -> Value {
    json!({"id": id_str(&v["user_id"]), "name": v["user"]})
}

fn node(v: &Value) -> Value {
    let mut o = Map::new();
    o.insert("id".into(), id_str(&v["id"]));
    for (to, from) in [
        ("machineKey", "machine_key"),
        ("nodeKey", "node_key"),
        ("discoKey", "disco_key"),
        ("ipAddresses", "ip_addresses"),
        ("name", "name"),
        ("lastSeen", "last_seen"),
        ("expiry", "expiry"),
        ("createdAt", "created_at"),
        ("forcedTags", "tags"),
        ("validTags", "tags"),
        ("givenName", "given_name"),
        ("online", "online"),
        ("approvedRoutes", "approved_routes"),
        ("availableRoutes", "announced_routes"),
    ] {
        put(&mut o, to, v, from);
    }
    o.insert("user".into(), owner(v));
    o.insert("invalidTags".into(), json!([]));
    // Served routes: announced and approved.
    let approved = v["approved_routes"].as_array().cloned().unwrap_or_default();
    let subnet: Vec<Value> = v["announced_routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| approved.contains(r))
        .cloned()
        .collect();
    o.insert("subnetRoutes".into(), Value::Array(subnet));
    Value::Object(o)
}

fn preauth_key(v: &Value) -> Value {
    let mut o = Map::new();
    o.insert("user".into(), owner(v));
    o.insert("id".into(), id_str(&v["id"]));
    for (to, from) in [
        ("key", "key"),
        ("reusable", "reusable"),
        ("ephemeral", "ephemeral"),
        ("used", "used"),
        ("expiration", "expiration"),
        ("createdAt", "created_at"),
        ("aclTags", "acl_tags"),
    ] {
        put(&mut o, to, v, from);
    }
    Value::Object(o)
}

fn api_key(v: &Value) -> Value {
    let mut o = Map::new();
    o.insert("id".into(), id_str(&v["id"]));
    for (to, from) in [
        ("prefix", "prefix"),
        ("expiration", "expiration"),
        ("createdAt", "created_at"),
        ("lastSeen", "last_seen"),
    ] {
        put(&mut o, to, v, from);
    }
    Value::Object(o)
}

fn route_row(v: &Value) -> Value {
    json!({
        "id": id_str(&v["id"]),
        "node": {"id": id_str(&v["node_id"]), "givenName": v["node"]},
        "prefix": v["prefix"],
        "advertised": v["advertised"],
        "enabled": v["enabled"],
        "isPrimary": v["primary"],
    })
}

fn list(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// Shapes the admin answer `v` as headscale does; `now` stamps a policy set.
pub fn render(shape: &Shape, v: &Value, now: i64) -> Result<Value, ApiError> {
    Ok(match shape {
        Shape::User => json!({"user": user(v)}),
        Shape::Users { id, name } => {
            let keep = |u: &&Value| {
                id.as_ref().is_none_or(|i| i.parse::<u64>().ok() == u["id"].as_u64())
                    && name.as_ref().is_none_or(|n| u["name"].as_str() == Some(n))
            };
            json!({"users": list(v).filter(keep).map(user).collect::<Vec<_>>()})
        }
        Shape::Node => json!({"node": node(v)}),
        Shape::OneNode(id) => {
            let n = list(v).find(|n| n["id"] == *id).ok_or(ApiError::NotFound)?;
            json!({"node": node(n)})
        }
        Shape::Nodes => json!({"nodes": list(v).map(node).collect::<Vec<_>>()}),
        Shape::PreAuthKey => json!({"preAuthKey": preauth_key(v)}),
        Shape::PreAuthKeys => json!({"preAuthKeys": list(v).map(preauth_key).collect::<Vec<_>>()}),
        Shape::ApiKeyCreated => json!({"apiKey": v["key"]}),
        Shape::ApiKeys => json!({"apiKeys": list(v).map(api_key).collect::<Vec<_>>()}),
        Shape::Policy => json!({"policy": v["policy"].as_str().unwrap_or("")}),
        Shape::PolicySet(p) => json!({"policy": p, "updatedAt": tailcfg::format_time(now)}),
        Shape::Routes(only) => {
            let rows = list(v).filter(|r| only.is_none_or(|n| r["node_id"] == n));
            json!({"routes": rows.map(route_row).collect::<Vec<_>>()})
        }
        Shape::Empty => json!({}),
        Shape::Raw => v.clone(),
    })
}

// ---- shell ----
// Below: the glue to the running coordinator (locks and logs); everything above is pure.

/// grpc-gateway's error body: `{"code", "message", "details": []}` with the gRPC code.
pub(crate) fn error_body(grpc: u8, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"code": grpc, "message": message, "details": []})).unwrap_or_default()
}

/// HTTP status and grpc code of a coordinator failure (internal details stay in the log).
fn coord_error(e: &CoordError) -> (u16, Vec<u8>) {
    match e {
        CoordError::NotFound(m) => (404, error_body(5, m)),
        CoordError::Conflict(m) => (409, error_body(6, m)),
        CoordError::Invalid(m) => (400, error_body(3, m)),
        CoordError::Unauthorized(m) => (401, error_body(16, m)),
        CoordError::Store(super::store::StoreError::Conflict(m)) => {
            (409, error_body(6, &format!("already exists: {m}")))
        }
        CoordError::Exhausted => (500, error_body(13, "address space exhausted")),
        CoordError::Store(inner) => {
            log::error!("store failure err={inner}");
            (500, error_body(13, "internal error"))
        }
    }
}

/// Answers one authenticated request (`key` is the caller's API key prefix, for the log):
/// status and JSON body.
pub fn serve(coord: &Coordinator, method: &str, target: &str, b: &[u8], key: &str, now: i64) -> (u16, Vec<u8>) {
    let path = target.split('?').next().unwrap_or("");
    let routed = route(method, target, b, now);
    let op = routed.as_ref().ok().and_then(|c| serde_json::to_value(&c.req).ok());
    let op = op.as_ref().and_then(|v| v["cmd"].as_str()).unwrap_or("-").to_string();
    let (status, out) = match routed {
        Err(ApiError::NotFound) => (404, error_body(5, "Not Found")),
        Err(ApiError::BadRequest(m)) => (400, error_body(3, &m)),
        Ok(call) => match admin::handle_value(coord, call.req) {
            Err(e) => coord_error(&e),
            Ok(v) => match render(&call.shape, &v, now) {
                Ok(v) => (200, serde_json::to_vec(&v).unwrap_or_default()),
                Err(_) => (404, error_body(5, "Not Found")),
            },
        },
    };
    if method != "GET" {
        log::info!("api request method={method} path={path} op={op} key={key} status={status}");
    }
    (status, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn r(method: &str, target: &str, b: &str) -> Result<ApiCall, ApiError> {
        route(method, target, b.as_bytes(), NOW)
    }

    fn ok(method: &str, target: &str, b: &str) -> (R, Shape) {
        let c = r(method, target, b).unwrap_or_else(|e| panic!("{method} {target}: {e:?}"));
        (c.req, c.shape)
    }

    #[test]
    fn every_path_maps_onto_an_admin_request() {
        let s = |x: &str| x.to_string();
        let table: Vec<(&str, &str, &str, R, Shape)> = vec![
            (
                "GET",
                "/api/v1/user",
                "",
                R::UsersList,
                Shape::Users { id: None, name: None },
            ),
            (
                "GET",
                "/api/v1/user?name=al%40ice&id=",
                "",
                R::UsersList,
                Shape::Users {
                    id: None,
                    name: Some(s("al@ice")),
                },
            ),
            (
                "POST",
                "/api/v1/user",
                r#"{"name":"bob","displayName":"B"}"#,
                R::UsersCreate { name: s("bob") },
                Shape::User,
            ),
            (
                "DELETE",
                "/api/v1/user/3",
                "",
                R::UsersDestroy { name: s("3") },
                Shape::Empty,
            ),
            (
                "POST",
                "/api/v1/user/3/rename/carol",
                "",
                R::UsersRename {
                    old: s("3"),
                    new: s("carol"),
                },
                Shape::User,
            ),
            ("GET", "/api/v1/node", "{}", R::NodesList { user: None }, Shape::Nodes),
            (
                "GET",
                "/api/v1/node?user=bob",
                "",
                R::NodesList { user: Some(s("bob")) },
                Shape::Nodes,
            ),
            (
                "POST",
                "/api/v1/node/register?user=bob&key=abc123",
                "",
                R::NodesRegister {
                    user: s("bob"),
                    key: s("abc123"),
                },
                Shape::Node,
            ),
            (
                "GET",
                "/api/v1/node/7",
                "",
                R::NodesList { user: None },
                Shape::OneNode(7),
            ),
            ("DELETE", "/api/v1/node/7", "", R::NodesDelete { id: 7 }, Shape::Empty),
            (
                "POST",
                "/api/v1/node/7/expire",
                "",
                R::NodesExpire { id: 7 },
                Shape::Node,
            ),
            (
                "POST",
                "/api/v1/node/7/rename/gw",
                "",
                R::NodesRename { id: 7, name: s("gw") },
                Shape::Node,
            ),
            (
                "POST",
                "/api/v1/node/7/user",
                r#"{"user":"2"}"#,
                R::NodesMove { id: 7, user: s("2") },
                Shape::Node,
            ),
            (
                "POST",
                "/api/v1/node/7/user",
                r#"{"user":2}"#,
                R::NodesMove { id: 7, user: s("2") },
                Shape::Node,
            ),
            (
                "POST",
                "/api/v1/node/7/tags",
                r#"{"tags":["tag:a"]}"#,
                R::NodesSetTags {
                    id: 7,
                    tags: vec![s("tag:a")],
                },
                Shape::Node,
            ),
            (
                "POST",
                "/api/v1/node/7/approve_routes",
                r#"{"routes":["10.0.0.0/24"]}"#,
                R::NodesApproveRoutes {
                    id: 7,
                    routes: vec![s("10.0.0.0/24")],
                },
                Shape::Node,
            ),
            (
                "GET",
                "/api/v1/node/7/routes",
                "",
                R::RoutesList,
                Shape::Routes(Some(7)),
            ),
            (
                "GET",
                "/api/v1/preauthkey?user=1",
                "",
                R::PreauthkeysList { user: Some(s("1")) },
                Shape::PreAuthKeys,
            ),
            (
                "GET",
                "/api/v1/preauthkey",
                "",
                R::PreauthkeysList { user: None },
                Shape::PreAuthKeys,
            ),
            (
                "POST",
                "/api/v1/preauthkey",
                r#"{"user":"1","reusable":true,"expiration":"2027-01-15T09:00:00Z","aclTags":["tag:x"]}"#,
                R::PreauthkeysCreate {
                    user: s("1"),
                    reusable: true,
                    ephemeral: false,
                    expiration_secs: Some(3600),
                    tags: vec![s("tag:x")],
                },
                Shape::PreAuthKey,
            ),
            (
                "POST",
                "/api/v1/preauthkey/expire",
                r#"{"user":"1","key":"tskey-auth-x"}"#,
                R::PreauthkeysExpire { key: s("tskey-auth-x") },
                Shape::Empty,
            ),
            (
                "POST",
                "/api/v1/preauthkey",
                r#"{"user":"alice","reusable":null,"ephemeral":false,"expiration":null,"aclTags":null}"#,
                R::PreauthkeysCreate {
                    user: s("alice"),
                    reusable: false,
                    ephemeral: false,
                    expiration_secs: Some(DEFAULT_PREAUTH_SECS),
                    tags: vec![],
                },
                Shape::PreAuthKey,
            ),
            ("GET", "/api/v1/apikey", "", R::ApikeysList, Shape::ApiKeys),
            (
                "POST",
                "/api/v1/apikey",
                r#"{"expiration":"2027-01-15T10:00:00Z"}"#,
                R::ApikeysCreate {
                    expiration_secs: Some(7200),
                },
                Shape::ApiKeyCreated,
            ),
            (
                "POST",
                "/api/v1/apikey",
                "",
                R::ApikeysCreate {
                    expiration_secs: Some(DEFAULT_API_KEY_SECS),
                },
                Shape::ApiKeyCreated,
            ),
            (
                "POST",
                "/api/v1/apikey/expire",
                r#"{"prefix":"abc"}"#,
                R::ApikeysExpire { prefix: s("abc") },
                Shape::Empty,
            ),
            (
                "DELETE",
                "/api/v1/apikey/abc",
                "",
                R::ApikeysDelete { prefix: s("abc") },
                Shape::Empty,
            ),
            ("GET", "/api/v1/policy", "", R::PolicyGet, Shape::Policy),
            (
                "PUT",
                "/api/v1/policy",
                r#"{"policy":"{}"}"#,
                R::PolicySet { policy: s("{}") },
                Shape::PolicySet(s("{}")),
            ),
            ("GET", "/api/v1/routes", "", R::RoutesList, Shape::Routes(None)),
            (
                "POST",
                "/api/v1/routes/2049/enable",
                "",
                R::RoutesSet {
                    route: 2049,
                    enable: true,
                },
                Shape::Empty,
            ),
            (
                "POST",
                "/api/v1/routes/2049/disable",
                "",
                R::RoutesSet {
                    route: 2049,
                    enable: false,
                },
                Shape::Empty,
            ),
            (
                "POST",
                "/api/v1/admin",
                r#"{"cmd":"nodes_list","user":null}"#,
                R::NodesList { user: None },
                Shape::Raw,
            ),
        ];
        for (m, t, b, req, shape) in table {
            assert_eq!(ok(m, t, b), (req, shape), "{m} {t}");
        }
    }

    /// NOW is 2027-01-15T08:00:00Z: a pre-auth key with no expiration lives an hour, one in the
    /// past is created already expired (not "never").
    #[test]
    fn expirations_are_relative_to_now() {
        assert_eq!(tailcfg::format_time(NOW), "2027-01-15T08:00:00Z");
        let secs = |b: &str| match ok("POST", "/api/v1/preauthkey", b).0 {
            R::PreauthkeysCreate { expiration_secs, .. } => expiration_secs,
            other => panic!("{other:?}"),
        };
        assert_eq!(secs(r#"{"user":"a"}"#), Some(DEFAULT_PREAUTH_SECS));
        assert_eq!(
            secs(r#"{"user":"a","expiration":"0001-01-01T00:00:00Z"}"#),
            Some(DEFAULT_PREAUTH_SECS)
        );
        assert_eq!(secs(r#"{"user":"a","expiration":"2020-01-01T00:00:00Z"}"#), Some(0));
    }

    #[test]
    fn bad_requests_say_why_and_unknown_paths_are_404() {
        for (m, t, b, needle) in [
            ("POST", "/api/v1/user", "{", "invalid JSON"),
            ("POST", "/api/v1/user", "{}", "name"),
            ("POST", "/api/v1/user", r#"{"name": 5}"#, "invalid JSON"),
            ("GET", "/api/v1/node/x", "", "\"x\""),
            ("DELETE", "/api/v1/node/-1", "", "node"),
            ("POST", "/api/v1/node/register?user=bob", "", "key"),
            ("POST", "/api/v1/node/1/user", "{}", "user"),
            ("POST", "/api/v1/node/1/tags", r#"{"tags":"tag:a"}"#, "invalid JSON"),
            ("POST", "/api/v1/preauthkey", r#"{"reusable":true}"#, "user"),
            (
                "POST",
                "/api/v1/preauthkey",
                r#"{"user":"1","expiration":"tomorrow"}"#,
                "RFC 3339",
            ),
            ("POST", "/api/v1/apikey/expire", "{}", "prefix"),
            ("PUT", "/api/v1/policy", "{}", "policy"),
            ("POST", "/api/v1/routes/abc/enable", "", "route"),
            ("POST", "/api/v1/admin", "{}", "cmd"),
            ("POST", "/api/v1/admin", r#"{"cmd":"format_disk"}"#, "format_disk"),
            ("GET", "/api/v1/user?name=%zz", "", "name"),
        ] {
            match r(m, t, b) {
                Err(ApiError::BadRequest(e)) => assert!(e.contains(needle), "{m} {t}: {e}"),
                other => panic!("{m} {t}: {other:?}"),
            }
        }
        for (m, t) in [
            ("GET", "/api/v1"),
            ("GET", "/api/v1/"),
            ("GET", "/api/v1/nodes"),
            ("PUT", "/api/v1/user"),
            ("POST", "/api/v1/node/1/frobnicate"),
            ("GET", "/api/v2/user"),
            ("POST", "/api/v1/routes/1/toggle"),
            ("DELETE", "/api/v1/policy"),
        ] {
            assert_eq!(r(m, t, ""), Err(ApiError::NotFound), "{m} {t}");
        }
    }

    #[test]
    fn render_uses_headscale_names_string_ids_and_drops_unset_times() {
        let n = json!({
            "id": 7, "name": "OpenWrt", "given_name": "gw", "user": "bob", "user_id": 2,
            "ip_addresses": ["100.64.0.1"], "online": true, "last_seen": null,
            "expiry": "2027-01-01T00:00:00Z", "tags": ["tag:r"], "machine_key": "mkey:aa",
            "node_key": "nodekey:bb", "disco_key": "discokey:cc", "created_at": "2026-01-01T00:00:00Z",
            "announced_routes": ["10.0.0.0/24", "10.1.0.0/24"], "approved_routes": ["10.0.0.0/24"],
        });
        let v = render(&Shape::Node, &n, NOW).unwrap();
        let node = &v["node"];
        assert_eq!(node["id"], "7");
        assert_eq!(node["user"], json!({"id": "2", "name": "bob"}));
        assert_eq!(node["givenName"], "gw");
        assert_eq!(node["machineKey"], "mkey:aa");
        assert_eq!(node["discoKey"], "discokey:cc");
        assert_eq!(node["expiry"], "2027-01-01T00:00:00Z");
        assert!(node.get("lastSeen").is_none(), "unset time left out");
        assert_eq!(node["availableRoutes"], json!(["10.0.0.0/24", "10.1.0.0/24"]));
        assert_eq!(node["subnetRoutes"], json!(["10.0.0.0/24"]));
        assert_eq!(node["validTags"], json!(["tag:r"]));
        let list = json!([n.clone(), {"id": 8}]);
        assert_eq!(render(&Shape::OneNode(7), &list, NOW).unwrap()["node"]["id"], "7");
        assert_eq!(render(&Shape::OneNode(9), &list, NOW), Err(ApiError::NotFound));
        assert_eq!(render(&Shape::Nodes, &list, NOW).unwrap()["nodes"][1]["id"], "8");

        let users = json!([{"id": 1, "name": "a", "created_at": "2026-01-01T00:00:00Z"}, {"id": 2, "name": "b"}]);
        let all = render(&Shape::Users { id: None, name: None }, &users, NOW).unwrap();
        assert_eq!(
            all["users"][0],
            json!({"id": "1", "name": "a", "createdAt": "2026-01-01T00:00:00Z"})
        );
        let one = render(
            &Shape::Users {
                id: Some("2".into()),
                name: None,
            },
            &users,
            NOW,
        )
        .unwrap();
        assert_eq!(one, json!({"users": [{"id": "2", "name": "b"}]}));

        let k = json!({"id": 4, "key": "tskey-auth-x", "user": "a", "user_id": 1, "reusable": false,
            "ephemeral": true, "used": false, "expiration": null, "created_at": "2026-01-01T00:00:00Z", "acl_tags": []});
        let v = render(&Shape::PreAuthKey, &k, NOW).unwrap();
        assert_eq!(
            v,
            json!({"preAuthKey": {"user": {"id": "1", "name": "a"}, "id": "4", "key": "tskey-auth-x",
                "reusable": false, "ephemeral": true, "used": false, "createdAt": "2026-01-01T00:00:00Z", "aclTags": []}})
        );
        let a = json!([{"id": 1, "prefix": "p", "expiration": "2027-01-01T00:00:00Z", "created_at": "2026-01-01T00:00:00Z", "last_seen": null, "expired": false}]);
        assert_eq!(
            render(&Shape::ApiKeys, &a, NOW).unwrap(),
            json!({"apiKeys": [{"id": "1", "prefix": "p", "expiration": "2027-01-01T00:00:00Z", "createdAt": "2026-01-01T00:00:00Z"}]})
        );
        assert_eq!(
            render(&Shape::ApiKeyCreated, &json!({"key": "p.s"}), NOW).unwrap(),
            json!({"apiKey": "p.s"})
        );
        let routes = json!([
            {"id": 7168, "node_id": 7, "node": "gw", "prefix": "10.0.0.0/24", "advertised": true, "enabled": true, "primary": true},
            {"id": 8192, "node_id": 8, "node": "x", "prefix": "10.2.0.0/24", "advertised": true, "enabled": false, "primary": false},
        ]);
        let v = render(&Shape::Routes(Some(7)), &routes, NOW).unwrap();
        assert_eq!(
            v,
            json!({"routes": [{"id": "7168", "node": {"id": "7", "givenName": "gw"}, "prefix": "10.0.0.0/24",
                "advertised": true, "enabled": true, "isPrimary": true}]})
        );
        assert_eq!(
            render(&Shape::Routes(None), &routes, NOW).unwrap()["routes"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
        assert_eq!(
            render(&Shape::Policy, &json!({"policy": null}), NOW).unwrap(),
            json!({"policy": ""})
        );
        assert_eq!(
            render(&Shape::Raw, &json!([{"id": 1}]), NOW).unwrap(),
            json!([{"id": 1}])
        );
        assert_eq!(
            render(&Shape::PolicySet("{}".into()), &json!({}), NOW).unwrap(),
            json!({"policy": "{}", "updatedAt": "2027-01-15T08:00:00Z"})
        );
    }
}
