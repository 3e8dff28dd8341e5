//! Admin API of the running coordinator over a root-only unix socket: JSON lines, one request
//! and one response per line. The `tinyscale server users|preauthkeys|nodes|routes|policy` verbs (and the
//! `headscale` alias) are clients of it.
//!
//! Plays the role of headscale's gRPC/CLI pair (`cmd/headscale/cli/*.go`), with the same verbs so
//! people's habits work. [`handle`] is the dispatcher; the listener and client are thin shells.
//!
//! The same requests back the ubus object `tinyscale.server` ([`SERVER_METHODS`], registered
//! by `tinyscale server serve --ubus-socket`), which LuCI's Coordinator page calls through rpcd.

use std::{future::Future, path::Path, sync::Arc};

use serde::Serialize;
use serde_json::{json, Value};

use super::{
    model::{ApiKey, Node},
    server::{random_hex, unix_now, Coordinator},
    state::{CoordError, State},
};
use crate::{
    platform::{
        ipc,
        ipc::IpcResponse,
        ubus_object::{self, Args, MethodDef, Object, PendingReply},
    },
    wire::{
        tailcfg,
        ubus::{blobmsg, Method},
    },
};

/// One admin request. On the wire: an object whose `cmd` names the variant in snake_case,
/// beside the variant's fields (serde's internally tagged shape, which the derived `Serialize`
/// writes). Reading goes through [`AdminRequest::from_json`], not the derive (see
/// [`ipc::Fields`] for why).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminRequest {
    UsersCreate {
        name: String,
    },
    UsersList,
    UsersRename {
        old: String,
        new: String,
    },
    UsersDestroy {
        name: String,
    },
    PreauthkeysCreate {
        user: String,
        reusable: bool,
        ephemeral: bool,
        expiration_secs: Option<u64>,
        tags: Vec<String>,
    },
    PreauthkeysList {
        user: Option<String>,
    },
    PreauthkeysExpire {
        key: String,
    },
    NodesRegister {
        user: String,
        key: String,
    },
    NodesList {
        user: Option<String>,
    },
    NodesDelete {
        id: u64,
    },
    NodesExpire {
        id: u64,
    },
    NodesRename {
        id: u64,
        name: String,
    },
    NodesMove {
        id: u64,
        user: String,
    },
    NodesApproveRoutes {
        id: u64,
        routes: Vec<String>,
    },
    RoutesList,
    RoutesEnable {
        id: u64,
        routes: Vec<String>,
    },
    PolicyGet,
    /// Replace the ACL policy with this HuJSON text (refused whole if it has errors).
    PolicySet {
        policy: String,
    },
    /// Remove the ACL policy: allow all again.
    PolicyClear,
    /// Check a policy without setting it: `{"valid", "errors": [{line, column, message}]}`.
    PolicyCheck {
        policy: String,
    },
    /// Replace a node's ACL tags.
    NodesSetTags {
        id: u64,
        tags: Vec<String>,
    },
    /// Approve (`enable`) or withdraw one route by the `id` of its row in `routes list`
    /// (headscale's pre-0.26 route ids, kept for old REST clients).
    RoutesSet {
        route: u64,
        enable: bool,
    },
    /// A new REST API key; the answer holds the whole key, shown this once.
    ApikeysCreate {
        expiration_secs: Option<u64>,
    },
    ApikeysList,
    ApikeysExpire {
        prefix: String,
    },
    ApikeysDelete {
        prefix: String,
    },
}

impl AdminRequest {
    /// The request in `v`, as the derived internally tagged `Deserialize` would read it.
    pub fn from_json(v: Value) -> Result<AdminRequest, String> {
        let (cmd, mut f) = ipc::Fields::tagged(v)?;
        Ok(match cmd.as_str() {
            "users_create" => R::UsersCreate {
                name: f.string("name")?,
            },
            "users_list" => R::UsersList,
            "users_rename" => R::UsersRename {
                old: f.string("old")?,
                new: f.string("new")?,
            },
            "users_destroy" => R::UsersDestroy {
                name: f.string("name")?,
            },
            "preauthkeys_create" => R::PreauthkeysCreate {
                user: f.string("user")?,
                reusable: f.bool("reusable")?,
                ephemeral: f.bool("ephemeral")?,
                expiration_secs: f.opt_u64("expiration_secs")?,
                tags: f.strings("tags")?,
            },
            "preauthkeys_list" => R::PreauthkeysList {
                user: f.opt_string("user")?,
            },
            "preauthkeys_expire" => R::PreauthkeysExpire { key: f.string("key")? },
            "nodes_register" => R::NodesRegister {
                user: f.string("user")?,
                key: f.string("key")?,
            },
            "nodes_list" => R::NodesList {
                user: f.opt_string("user")?,
            },
            "nodes_delete" => R::NodesDelete { id: f.u64("id")? },
            "nodes_expire" => R::NodesExpire { id: f.u64("id")? },
            "nodes_rename" => R::NodesRename {
                id: f.u64("id")?,
                name: f.string("name")?,
            },
            "nodes_move" => R::NodesMove {
                id: f.u64("id")?,
                user: f.string("user")?,
            },
            "nodes_approve_routes" => R::NodesApproveRoutes {
                id: f.u64("id")?,
                routes: f.strings("routes")?,
            },
            "routes_list" => R::RoutesList,
            "routes_enable" => R::RoutesEnable {
                id: f.u64("id")?,
                routes: f.strings("routes")?,
            },
            "policy_get" => R::PolicyGet,
            "policy_set" => R::PolicySet {
                policy: f.string("policy")?,
            },
            "policy_clear" => R::PolicyClear,
            "policy_check" => R::PolicyCheck {
                policy: f.string("policy")?,
            },
            "nodes_set_tags" => R::NodesSetTags {
                id: f.u64("id")?,
                tags: f.strings("tags")?,
            },
            "routes_set" => R::RoutesSet {
                route: f.u64("route")?,
                enable: f.bool("enable")?,
            },
            "apikeys_create" => R::ApikeysCreate {
                expiration_secs: f.opt_u64("expiration_secs")?,
            },
            "apikeys_list" => R::ApikeysList,
            "apikeys_expire" => R::ApikeysExpire {
                prefix: f.string("prefix")?,
            },
            "apikeys_delete" => R::ApikeysDelete {
                prefix: f.string("prefix")?,
            },
            other => return Err(ipc::unknown_cmd(other)),
        })
    }
}

/// Routes per node addressable by a `routes list` row id (`node id * ROUTE_IDS + index`).
pub const ROUTE_IDS: u64 = 1024;

fn time_or_null(t: Option<i64>) -> Value {
    t.map_or(Value::Null, |t| Value::String(tailcfg::format_time(t)))
}

/// JSON view of a node for `nodes list -o json`.
pub fn node_json(st: &State, n: &Node, now: i64) -> Value {
    let user = st.user(n.user_id).map(|u| u.name.clone()).unwrap_or_default();
    let mut ips = Vec::new();
    if let Some(a) = n.ipv4 {
        ips.push(a.to_string());
    }
    if let Some(a) = n.ipv6 {
        ips.push(a.to_string());
    }
    json!({
        "id": n.id,
        "name": n.hostname,
        "given_name": n.given_name,
        "user": user,
        "user_id": n.user_id,
        "ip_addresses": ips,
        "online": st.is_online(n.id),
        "last_seen": time_or_null(n.last_seen),
        "expiry": time_or_null(n.expiry),
        "expired": n.expiry.is_some_and(|e| e <= now),
        "ephemeral": n.ephemeral,
        "tags": n.tags,
        "machine_key": n.machine_key.to_string(),
        "node_key": n.node_key.to_string(),
        "disco_key": n.disco_key.to_string(),
        "created_at": tailcfg::format_time(n.created),
        "announced_routes": State::announced_routes(n),
        "approved_routes": n.approved_routes,
    })
}

fn user_id(st: &State, name: &Option<String>) -> Result<Option<u64>, CoordError> {
    match name {
        None => Ok(None),
        // A name, or (headscale 0.26+ REST clients) a user id.
        Some(n) => st
            .users()
            .find(|u| u.name == *n)
            .or_else(|| n.parse().ok().and_then(|id| st.user(id)))
            .map(|u| Some(u.id))
            .ok_or_else(|| CoordError::NotFound(format!("user {n:?} not found"))),
    }
}

fn routes_json(st: &State) -> Value {
    let primaries = st.primaries();
    let mut rows = Vec::new();
    for n in st.nodes() {
        let announced = State::announced_routes(n);
        let mut all: Vec<String> = announced.clone();
        all.extend(n.approved_routes.iter().filter(|r| !announced.contains(r)).cloned());
        for (i, r) in (0u64..).zip(all) {
            rows.push(json!({
                "id": n.id * ROUTE_IDS + i,
                "node_id": n.id,
                "node": n.given_name,
                "prefix": r,
                "advertised": announced.contains(&r),
                "enabled": n.approved_routes.contains(&r),
                "primary": primaries.get(&r) == Some(&n.id),
            }));
        }
    }
    Value::Array(rows)
}

/// Executes one request against the coordinator.
pub fn handle(coord: &Coordinator, req: AdminRequest) -> IpcResponse {
    IpcResponse::from_result(handle_value(coord, req).map_err(|e| e.to_string()))
}

fn api_key_json(k: &ApiKey, now: i64) -> Value {
    json!({
        "id": k.id,
        "prefix": k.prefix,
        "expiration": time_or_null(k.expiration),
        "expired": k.expiration.is_some_and(|e| e <= now),
        "created_at": tailcfg::format_time(k.created),
        "last_seen": time_or_null(k.last_seen),
    })
}

/// [`handle`] with the error kept typed (the REST API maps it to a status).
pub fn handle_value(coord: &Coordinator, req: AdminRequest) -> Result<Value, CoordError> {
    let now = unix_now();
    {
        let mut st = coord.lock();
        Ok(match req {
            AdminRequest::UsersCreate { name } => {
                let u = st.create_user(&name, now)?;
                json!({"id": u.id, "name": u.name, "created_at": tailcfg::format_time(u.created)})
            }
            AdminRequest::UsersList => Value::Array(
                st.users()
                    .map(|u| json!({"id": u.id, "name": u.name, "display_name": u.display_name, "created_at": tailcfg::format_time(u.created)}))
                    .collect(),
            ),
            AdminRequest::UsersRename { old, new } => {
                let (u, ch) = st.rename_user(&old, &new)?;
                drop(st);
                coord.publish(ch);
                json!({"id": u.id, "name": u.name})
            }
            AdminRequest::UsersDestroy { name } => {
                st.destroy_user(&name)?;
                json!({"destroyed": name})
            }
            AdminRequest::PreauthkeysCreate { user, reusable, ephemeral, expiration_secs, tags } => {
                let exp = expiration_secs.map(|s| now + s as i64);
                let secret = format!("tskey-auth-{}", random_hex(24));
                let k = st.create_preauth_key(&user, reusable, ephemeral, exp, tags, secret, now)?;
                key_json(&st, &k, now)
            }
            AdminRequest::PreauthkeysList { user } => {
                let uid = user_id(&st, &user)?;
                Value::Array(st.preauth_keys().filter(|k| uid.is_none_or(|u| k.user_id == u)).map(|k| key_json(&st, k, now)).collect())
            }
            AdminRequest::PreauthkeysExpire { key } => {
                let k = st.expire_preauth_key(&key, now)?;
                key_json(&st, &k, now)
            }
            AdminRequest::NodesRegister { user, key } => {
                let (id, ch) = st.approve_pending(&key, &user, now)?;
                let v = st.node(id).map(|n| node_json(&st, n, now)).unwrap_or(Value::Null);
                drop(st);
                coord.publish(ch);
                coord.registration_completed();
                v
            }
            AdminRequest::NodesList { user } => {
                let uid = user_id(&st, &user)?;
                Value::Array(st.nodes().filter(|n| uid.is_none_or(|u| n.user_id == u)).map(|n| node_json(&st, n, now)).collect())
            }
            AdminRequest::NodesDelete { id } => {
                let ch = st.delete_node(id)?;
                drop(st);
                coord.publish(ch);
                json!({"deleted": id})
            }
            AdminRequest::NodesExpire { id } => {
                let ch = st.expire_node(id, now)?;
                let v = st.node(id).map(|n| node_json(&st, n, now)).unwrap_or(Value::Null);
                drop(st);
                coord.publish(ch);
                v
            }
            AdminRequest::NodesRename { id, name } => {
                let ch = st.rename_node(id, &name)?;
                let v = st.node(id).map(|n| node_json(&st, n, now)).unwrap_or(Value::Null);
                drop(st);
                coord.publish(ch);
                v
            }
            AdminRequest::NodesMove { id, user } => {
                let ch = st.move_node(id, &user)?;
                let v = st.node(id).map(|n| node_json(&st, n, now)).unwrap_or(Value::Null);
                drop(st);
                coord.publish(ch);
                v
            }
            AdminRequest::NodesApproveRoutes { id, routes } => {
                let ch = st.set_approved_routes(id, routes, true)?;
                let v = st.node(id).map(|n| node_json(&st, n, now)).unwrap_or(Value::Null);
                drop(st);
                coord.publish(ch);
                v
            }
            AdminRequest::RoutesEnable { id, routes } => {
                let ch = st.set_approved_routes(id, routes, false)?;
                let v = routes_json(&st);
                drop(st);
                coord.publish(ch);
                v
            }
            AdminRequest::RoutesList => routes_json(&st),
            AdminRequest::PolicyGet => json!({"policy": st.policy().map(|(t, _)| t.clone())}),
            AdminRequest::PolicySet { policy } => {
                let ch = st.set_policy(Some(&policy), now)?;
                drop(st);
                coord.publish(ch);
                json!({"policy": "set"})
            }
            AdminRequest::PolicyClear => {
                let ch = st.set_policy(None, now)?;
                drop(st);
                coord.publish(ch);
                json!({"policy": "cleared"})
            }
            AdminRequest::PolicyCheck { policy } => {
                let errors: Vec<Value> = match super::policy::Policy::parse(&policy) {
                    Ok(_) => Vec::new(),
                    Err(e) => e
                        .0
                        .iter()
                        .map(|e| json!({"line": e.line, "column": e.col, "message": e.msg}))
                        .collect(),
                };
                json!({"valid": errors.is_empty(), "errors": errors})
            }
            AdminRequest::NodesSetTags { id, tags } => {
                let ch = st.set_tags(id, tags)?;
                let v = st.node(id).map(|n| node_json(&st, n, now)).unwrap_or(Value::Null);
                drop(st);
                coord.publish(ch);
                v
            }
            AdminRequest::RoutesSet { route, enable } => {
                let rows = routes_json(&st);
                let row = rows
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["id"] == route)
                    .ok_or_else(|| CoordError::NotFound(format!("route {route} not found")))?;
                let id = row["node_id"].as_u64().unwrap_or(0);
                let prefix = row["prefix"].as_str().unwrap_or("").to_string();
                let ch = if enable {
                    st.set_approved_routes(id, vec![prefix], false)?
                } else {
                    let keep = st.node(id).map(|n| n.approved_routes.clone()).unwrap_or_default();
                    st.set_approved_routes(id, keep.into_iter().filter(|r| *r != prefix).collect(), true)?
                };
                let v = routes_json(&st);
                drop(st);
                coord.publish(ch);
                v
            }
            AdminRequest::ApikeysCreate { expiration_secs } => {
                let exp = expiration_secs.map(|s| now.saturating_add(s.min(i64::MAX as u64) as i64));
                let (prefix, secret) = (random_hex(5), random_hex(32));
                let k = st.create_api_key(&prefix, &secret, exp, now)?;
                let mut v = api_key_json(&k, now);
                v["key"] = Value::String(format!("{prefix}.{secret}"));
                log::info!("api key created prefix={prefix}");
                v
            }
            AdminRequest::ApikeysList => Value::Array(st.api_keys().map(|k| api_key_json(k, now)).collect()),
            AdminRequest::ApikeysExpire { prefix } => {
                let k = st.expire_api_key(&prefix, now)?;
                log::info!("api key expired prefix={prefix}");
                api_key_json(&k, now)
            }
            AdminRequest::ApikeysDelete { prefix } => {
                st.delete_api_key(&prefix)?;
                log::info!("api key deleted prefix={prefix}");
                json!({"deleted": prefix})
            }
        })
    }
}

fn key_json(st: &State, k: &super::model::PreAuthKey, now: i64) -> Value {
    json!({
        "id": k.id,
        "key": k.key,
        "user": st.user(k.user_id).map(|u| u.name.clone()).unwrap_or_default(),
        "user_id": k.user_id,
        "reusable": k.reusable,
        "ephemeral": k.ephemeral,
        "used": k.used,
        "expiration": time_or_null(k.expiration),
        "expired": k.expiration.is_some_and(|e| e <= now),
        "created_at": tailcfg::format_time(k.created),
        "acl_tags": k.tags,
    })
}

/// The ubus object the coordinator registers.
pub const SERVER_OBJECT: &str = "tinyscale.server";

type R = AdminRequest;
type Map = serde_json::Map<String, Value>;

/// Checks the argument names of `method` and returns them to be read by name.
fn args_of(method: &str, allowed: Args, a: &Map) -> Result<ipc::Fields, String> {
    ubus_object::only_known(method, allowed, a)?;
    Ok(ubus_object::known(allowed, a))
}

/// Prefixes a field error with the method's name.
fn in_method<T>(method: &str, r: Result<T, String>) -> Result<T, String> {
    r.map_err(|e| format!("{method}: {e}"))
}

/// The one required string argument `name` of `method` (whose arguments are `allowed`).
fn string_arg(method: &str, allowed: Args, a: &Map, name: &str) -> Result<String, String> {
    in_method(method, args_of(method, allowed, a)?.string(name))
}

/// A node id: a number, or a string of digits (JSON-RPC clients send either).
fn id_arg(a: &Map, name: &str) -> Result<u64, String> {
    match a.get(name) {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("argument {name} must be a node id (a positive integer)"))
}

const ID: (&str, u8) = ("id", blobmsg::INT32);
const USER_ADD: Args = &[("name", blobmsg::STRING)];
const NODE_DELETE: Args = &[ID];
const NODE_RENAME: Args = &[ID, ("name", blobmsg::STRING)];
const ROUTE_APPROVE: Args = &[("node", blobmsg::INT32), ("routes", blobmsg::ARRAY)];
const KEY_ADD: Args = &[
    ("user", blobmsg::STRING),
    ("reusable", blobmsg::BOOL),
    ("ephemeral", blobmsg::BOOL),
    ("expiration", blobmsg::STRING),
    ("tags", blobmsg::ARRAY),
];
const KEYS: Args = &[("user", blobmsg::STRING)];
const KEY_EXPIRE: Args = &[("key", blobmsg::STRING)];
const POLICY: Args = &[("policy", blobmsg::STRING)];

/// The `policy` argument (HuJSON text) of `policy_set` / `policy_check`.
fn policy_arg(method: &str, a: &Map) -> Result<String, String> {
    string_arg(method, POLICY, a, "policy")
}

/// `preauthkey_add`: `user`, `reusable`, `ephemeral`, `tags` and `expiration` (a duration like
/// `24h`, or seconds; default 1h as in the CLI, `0` for none).
fn key_add(a: &Map) -> Result<R, String> {
    let m = "preauthkey_add";
    let mut f = args_of(m, KEY_ADD, a)?;
    let user = in_method(m, f.string("user"))?;
    let reusable = in_method(m, f.opt_bool("reusable"))?.unwrap_or_default();
    let ephemeral = in_method(m, f.opt_bool("ephemeral"))?.unwrap_or_default();
    let tags = in_method(m, f.opt_strings("tags"))?.unwrap_or_default();
    let secs = match &f.take("expiration") {
        None => 3600,
        Some(Value::Number(n)) => n.as_u64().ok_or("expiration: seconds must be a positive integer")?,
        Some(Value::String(s)) => crate::platform::uci::parse_duration(s)
            .map_err(|e| format!("expiration {s:?}: {e}"))?
            .as_secs(),
        Some(_) => return Err("expiration: a duration like 24h, or seconds".into()),
    };
    Ok(R::PreauthkeysCreate {
        user,
        reusable,
        ephemeral,
        expiration_secs: (secs > 0).then_some(secs),
        tags,
    })
}

/// The `tinyscale.server` methods. Each maps onto an [`AdminRequest`]; unknown argument names
/// are refused. `preauthkeys` is on the write side: the list holds the key secrets.
pub const SERVER_METHODS: &[MethodDef<AdminRequest>] = &[
    MethodDef {
        name: "users",
        args: &[],
        write: false,
        map: |a| args_of("users", &[], a).map(|_| R::UsersList),
    },
    MethodDef {
        name: "user_add",
        args: USER_ADD,
        write: true,
        map: |a| string_arg("user_add", USER_ADD, a, "name").map(|name| R::UsersCreate { name }),
    },
    MethodDef {
        name: "nodes",
        args: &[],
        write: false,
        map: |a| args_of("nodes", &[], a).map(|_| R::NodesList { user: None }),
    },
    MethodDef {
        name: "node_delete",
        args: NODE_DELETE,
        write: true,
        map: |a| {
            ubus_object::only_known("node_delete", NODE_DELETE, a)?;
            Ok(R::NodesDelete { id: id_arg(a, "id")? })
        },
    },
    MethodDef {
        name: "node_rename",
        args: NODE_RENAME,
        write: true,
        map: |a| {
            ubus_object::only_known("node_rename", NODE_RENAME, a)?;
            match a.get("name") {
                Some(Value::String(n)) if !n.is_empty() => Ok(R::NodesRename {
                    id: id_arg(a, "id")?,
                    name: n.clone(),
                }),
                _ => Err("node_rename needs argument name (the new name)".into()),
            }
        },
    },
    MethodDef {
        name: "routes",
        args: &[],
        write: false,
        map: |a| args_of("routes", &[], a).map(|_| R::RoutesList),
    },
    MethodDef {
        name: "route_approve",
        args: ROUTE_APPROVE,
        write: true,
        map: |a| {
            ubus_object::only_known("route_approve", ROUTE_APPROVE, a)?;
            let routes = match a.get("routes") {
                Some(Value::Array(rs)) => rs
                    .iter()
                    .map(|r| match r.as_str() {
                        Some(r) if tailcfg::is_valid_cidr(r) => Ok(r.to_string()),
                        _ => Err(format!("route_approve: {r} is not a prefix like 10.0.0.0/24")),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                _ => {
                    return Err(
                        "route_approve needs argument routes (the full list of approved prefixes; [] for none)".into(),
                    )
                }
            };
            Ok(R::NodesApproveRoutes {
                id: id_arg(a, "node")?,
                routes,
            })
        },
    },
    MethodDef {
        name: "preauthkey_add",
        args: KEY_ADD,
        write: true,
        map: key_add,
    },
    MethodDef {
        name: "preauthkeys",
        args: KEYS,
        write: true,
        map: |a| {
            let user = in_method("preauthkeys", args_of("preauthkeys", KEYS, a)?.opt_string("user"))?;
            Ok(R::PreauthkeysList { user })
        },
    },
    MethodDef {
        name: "preauthkey_expire",
        args: KEY_EXPIRE,
        write: true,
        map: |a| string_arg("preauthkey_expire", KEY_EXPIRE, a, "key").map(|key| R::PreauthkeysExpire { key }),
    },
    MethodDef {
        name: "policy_get",
        args: &[],
        write: false,
        map: |a| args_of("policy_get", &[], a).map(|_| R::PolicyGet),
    },
    MethodDef {
        name: "policy_check",
        args: POLICY,
        write: false,
        map: |a| policy_arg("policy_check", a).map(|policy| R::PolicyCheck { policy }),
    },
    MethodDef {
        name: "policy_set",
        args: POLICY,
        write: true,
        map: |a| policy_arg("policy_set", a).map(|policy| R::PolicySet { policy }),
    },
];

/// The coordinator as the ubus object [`SERVER_OBJECT`].
pub struct ServerObject(pub Arc<Coordinator>);

impl Object for ServerObject {
    type Snapshot = ();

    fn name(&self) -> &'static str {
        SERVER_OBJECT
    }

    fn methods(&self) -> Vec<Method> {
        ubus_object::signatures(SERVER_METHODS)
    }

    fn call(self: &Arc<Self>, method: &str, args: &Map) -> Result<PendingReply, String> {
        let req = ubus_object::map_call(SERVER_METHODS, method, args)?;
        let r = handle_durable(&self.0, req);
        let method = method.to_owned();
        Ok(Box::pin(async move {
            let r = r.await;
            // Lists are JSON arrays; a ubus reply is a table.
            let r = match r.data {
                Value::Array(a) if r.error.is_empty() => IpcResponse {
                    data: json!({ method: a }),
                    error: r.error,
                },
                _ => r,
            };
            ubus_object::reply_for(r)
        }))
    }
}

/// [`handle`], answering once its writes are durable (a created key must survive kill -9);
/// the wait does not block the runtime.
fn handle_durable(coord: &Coordinator, req: AdminRequest) -> impl Future<Output = IpcResponse> + Send + 'static {
    let since = coord.lock().store().mark();
    let reply = handle(coord, req);
    let durable = coord.lock().store().durable(since);
    async move {
        match durable.await {
            Ok(()) => reply,
            Err(e) => IpcResponse::from_result(Err(format!("store failure: {e}"))),
        }
    }
}

/// Binds the admin socket (mode 0600, removing a stale one) and serves it forever.
pub async fn serve_admin(coord: Arc<Coordinator>, path: &Path) -> std::io::Result<()> {
    let listener = ipc::bind_private(path).await?;
    ipc::serve_lines(listener, AdminRequest::from_json, move |req| {
        handle_durable(&coord, req)
    })
    .await
}

/// Sends one request to the coordinator at `path` (client side of the CLI).
pub async fn call(path: &Path, req: &AdminRequest) -> Result<Value, String> {
    ipc::call_lines(
        path,
        req,
        "(is `tinyscale server serve` running with this --config, and are you root?)",
    )
    .await
}

/// Where the admin verbs go: this machine's admin socket, or a coordinator's REST API.
pub enum AdminTarget {
    /// The unix socket of `server serve` (root only).
    Socket(std::path::PathBuf),
    /// `POST <url>/api/v1/admin` with `Authorization: Bearer <key>`.
    Remote { url: String, key: String },
}

impl AdminTarget {
    /// Sends one request; the answer is the same JSON either way.
    pub async fn call(&self, req: &AdminRequest) -> Result<Value, String> {
        match self {
            AdminTarget::Socket(p) => call(p, req).await,
            AdminTarget::Remote { url, key } => call_remote(url, key, req).await,
        }
    }
}

/// Largest answer read from a remote coordinator (a node list of a big tailnet fits).
const REMOTE_MAX_BODY: usize = 4 << 20;
/// Budget for one remote admin call, connect to last byte.
const REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One request to a coordinator's `/api/v1/admin` (TLS verified against the system roots, as
/// the control client does); errors say what the server answered.
pub async fn call_remote(url: &str, key: &str, req: &AdminRequest) -> Result<Value, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let u = crate::wire::http1::parse_url(url).map_err(|e| format!("--remote {url}: {e}"))?;
    let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    let work = async {
        let mut io =
            crate::platform::tls::connect(&crate::platform::tls::host_port(&u.host, u.port), &u.host, u.tls).await?;
        let head = format!(
            "POST {}/api/v1/admin HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            u.path.split('?').next().unwrap_or("").trim_end_matches('/'),
            u.host_header(),
            body.len()
        );
        io.write_all(head.as_bytes()).await?;
        io.write_all(&body).await?;
        io.flush().await?;
        let (head, mut out) = crate::wire::http1::read_head(&mut io)
            .await
            .map_err(std::io::Error::other)?;
        let mut chunk = [0u8; 4096];
        while out.len() <= REMOTE_MAX_BODY {
            match io.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        if let Some(n) = head.content_length() {
            out.truncate(n);
        }
        Ok((head.status, out))
    };
    let (status, out) = match tokio::time::timeout(REMOTE_TIMEOUT, work).await {
        Err(_) => return Err(format!("{url}: timed out")),
        Ok(Err(e)) => return Err(format!("{url}: {e}")),
        Ok(Ok(x)) => x,
    };
    let v: Option<Value> = serde_json::from_slice(&out).ok();
    match (status, v) {
        (200, Some(v)) => Ok(v),
        (401, _) => Err(format!("{url}: the API key was refused (unknown or expired)")),
        (_, Some(v)) if v["message"].is_string() => Err(v["message"].as_str().unwrap_or("").to_string()),
        (s, _) => Err(format!("{url}: HTTP {s} (is it a tinyscale coordinator?)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(method: &str, v: Value) -> Result<AdminRequest, String> {
        ubus_object::map_call(SERVER_METHODS, method, v.as_object().expect("object"))
    }

    #[test]
    fn server_methods_map_onto_admin_requests() {
        let s = "ubus_rpc_session";
        assert_eq!(call("users", json!({ s: "x" })), Ok(R::UsersList));
        assert_eq!(
            call("user_add", json!({"name": "alice", s: "x"})),
            Ok(R::UsersCreate { name: "alice".into() })
        );
        assert_eq!(call("nodes", json!({})), Ok(R::NodesList { user: None }));
        assert_eq!(call("node_delete", json!({"id": 7})), Ok(R::NodesDelete { id: 7 }));
        assert_eq!(call("node_delete", json!({"id": "7"})), Ok(R::NodesDelete { id: 7 }));
        assert_eq!(
            call("node_rename", json!({"id": 3, "name": "gw"})),
            Ok(R::NodesRename {
                id: 3,
                name: "gw".into()
            })
        );
        assert_eq!(call("routes", json!({})), Ok(R::RoutesList));
        assert_eq!(
            call(
                "route_approve",
                json!({"node": 2, "routes": ["10.0.0.0/24", "0.0.0.0/0"]})
            ),
            Ok(R::NodesApproveRoutes {
                id: 2,
                routes: vec!["10.0.0.0/24".into(), "0.0.0.0/0".into()]
            })
        );
        assert_eq!(
            call("route_approve", json!({"node": 2, "routes": []})),
            Ok(R::NodesApproveRoutes { id: 2, routes: vec![] })
        );
        assert_eq!(
            call(
                "preauthkey_add",
                json!({"user": "alice", "reusable": true, "expiration": "24h"})
            ),
            Ok(R::PreauthkeysCreate {
                user: "alice".into(),
                reusable: true,
                ephemeral: false,
                expiration_secs: Some(86400),
                tags: vec![]
            })
        );
        let Ok(R::PreauthkeysCreate { expiration_secs, .. }) = call("preauthkey_add", json!({"user": "a"})) else {
            panic!("default expiration")
        };
        assert_eq!(expiration_secs, Some(3600));
        let Ok(R::PreauthkeysCreate { expiration_secs, .. }) =
            call("preauthkey_add", json!({"user": "a", "expiration": 0}))
        else {
            panic!("no expiration")
        };
        assert_eq!(expiration_secs, None);
        assert_eq!(call("preauthkeys", json!({})), Ok(R::PreauthkeysList { user: None }));
        assert_eq!(
            call("preauthkey_expire", json!({"key": "tskey-auth-x"})),
            Ok(R::PreauthkeysExpire {
                key: "tskey-auth-x".into()
            })
        );
    }

    /// Every request survives the wire: what the derived `Serialize` writes (the CLI, `--remote`)
    /// is what `from_json` reads back (the socket, `POST /api/v1/admin`).
    #[test]
    fn admin_requests_roundtrip_through_their_json() {
        let s = |x: &str| x.to_string();
        let all = [
            R::UsersCreate { name: s("a") },
            R::UsersList,
            R::UsersRename {
                old: s("a"),
                new: s("b"),
            },
            R::UsersDestroy { name: s("a") },
            R::PreauthkeysCreate {
                user: s("a"),
                reusable: true,
                ephemeral: false,
                expiration_secs: Some(60),
                tags: vec![s("tag:x")],
            },
            R::PreauthkeysCreate {
                user: s("a"),
                reusable: false,
                ephemeral: true,
                expiration_secs: None,
                tags: vec![],
            },
            R::PreauthkeysList { user: Some(s("a")) },
            R::PreauthkeysList { user: None },
            R::PreauthkeysExpire { key: s("k") },
            R::NodesRegister {
                user: s("a"),
                key: s("k"),
            },
            R::NodesList { user: None },
            R::NodesDelete { id: 1 },
            R::NodesExpire { id: 2 },
            R::NodesRename { id: 3, name: s("n") },
            R::NodesMove { id: 4, user: s("b") },
            R::NodesApproveRoutes {
                id: 5,
                routes: vec![s("10.0.0.0/24")],
            },
            R::RoutesList,
            R::RoutesEnable { id: 6, routes: vec![] },
            R::PolicyGet,
            R::PolicySet { policy: s("{}") },
            R::PolicyClear,
            R::PolicyCheck { policy: s("{}") },
            R::NodesSetTags {
                id: 7,
                tags: vec![s("tag:a"), s("tag:b")],
            },
            R::RoutesSet {
                route: 2049,
                enable: true,
            },
            R::ApikeysCreate {
                expiration_secs: Some(u64::MAX),
            },
            R::ApikeysList,
            R::ApikeysExpire { prefix: s("p") },
            R::ApikeysDelete { prefix: s("p") },
        ];
        for req in all {
            let line = serde_json::to_string(&req).expect("serialize");
            let back = serde_json::from_str(&line)
                .map_err(|e| e.to_string())
                .and_then(AdminRequest::from_json);
            assert_eq!(back, Ok(req), "{line}");
        }
    }

    /// Reading follows the derive's rules: optional fields may be absent or null, unknown ones
    /// are ignored, required ones and wrong types are refused with the field's name.
    #[test]
    fn admin_requests_read_like_the_derive() {
        let read = |v: Value| AdminRequest::from_json(v);
        assert_eq!(
            read(json!({"cmd": "nodes_list", "user": null, "extra": 1})),
            Ok(R::NodesList { user: None })
        );
        assert_eq!(
            read(json!({"cmd": "apikeys_create"})),
            Ok(R::ApikeysCreate { expiration_secs: None })
        );
        for (v, needle) in [
            (json!({}), "cmd"),
            (json!({"cmd": 5}), "cmd"),
            (json!(["users_list"]), "object"),
            (json!({"cmd": "format_disk"}), "format_disk"),
            (json!({"cmd": "users_create"}), "name"),
            (json!({"cmd": "nodes_delete", "id": "7"}), "id"),
            (json!({"cmd": "nodes_delete", "id": -1}), "id"),
            (json!({"cmd": "routes_set", "route": 1, "enable": "yes"}), "enable"),
            (json!({"cmd": "nodes_set_tags", "id": 1, "tags": ["a", 2]}), "tags"),
            (
                json!({"cmd": "preauthkeys_create", "user": "a", "reusable": true, "ephemeral": false}),
                "tags",
            ),
        ] {
            let e = read(v.clone()).expect_err(&v.to_string());
            assert!(e.contains(needle), "{v}: {e}");
        }
    }

    #[test]
    fn server_methods_refuse_bad_arguments() {
        for (m, v, needle) in [
            ("users", json!({"all": true}), "\"all\""),
            ("user_add", json!({}), "name"),
            ("user_add", json!({"name": 5}), "user_add"),
            ("node_delete", json!({"id": -1}), "id"),
            ("node_delete", json!({"id": "x"}), "id"),
            ("node_delete", json!({"node": 1}), "\"node\""),
            ("node_rename", json!({"id": 1}), "name"),
            ("route_approve", json!({"node": 1}), "routes"),
            ("route_approve", json!({"node": 1, "routes": ["10.0.0.1"]}), "10.0.0.1"),
            ("route_approve", json!({"routes": []}), "node"),
            ("preauthkey_add", json!({"reusable": true}), "user"),
            (
                "preauthkey_add",
                json!({"user": "a", "expiration": "soon"}),
                "expiration",
            ),
            ("preauthkey_add", json!({"user": "a", "expiry": "1h"}), "\"expiry\""),
            ("preauthkey_expire", json!({}), "key"),
            ("policy_get", json!({"policy": "{}"}), "\"policy\""),
            ("policy_set", json!({}), "policy"),
            ("policy_check", json!({"policy": 5}), "policy_check"),
            ("policy_delete", json!({}), "unknown method"),
        ] {
            let e = call(m, v.clone()).expect_err(&format!("{m} {v}"));
            assert!(e.contains(needle), "{m} {v}: {e}");
        }
    }

    #[test]
    fn server_signatures_and_acl_sides() {
        let sig = ubus_object::signatures(SERVER_METHODS);
        assert_eq!(sig.len(), SERVER_METHODS.len());
        let read: Vec<&str> = SERVER_METHODS.iter().filter(|m| !m.write).map(|m| m.name).collect();
        assert_eq!(read, ["users", "nodes", "routes", "policy_get", "policy_check"]);
        let ra = sig.iter().find(|m| m.name == "route_approve").expect("route_approve");
        assert_eq!(ra.args, [("node", blobmsg::INT32), ("routes", blobmsg::ARRAY)]);
    }

    /// The object against a real (in-memory) coordinator: lists come back as tables named after
    /// the method, failures of the coordinator as UNKNOWN_ERROR with its message.
    #[tokio::test]
    async fn server_object_answers_from_the_coordinator() {
        use crate::{
            coordinator::{state::Settings, store::Store},
            wire::ubus,
        };
        let st = State::load(Store::open_in_memory().expect("db"), Settings::default()).expect("state");
        let obj = Arc::new(ServerObject(Coordinator::new(st).expect("coordinator")));
        let call = |m: &str, v: Value| {
            let a = v.as_object().cloned().unwrap_or_default();
            obj.call(m, &a)
        };
        let session = "ubus_rpc_session";
        let (st, v) = call("user_add", json!({"name": "alice", session: "s"}))
            .expect("user_add")
            .await;
        assert_eq!((st, v["name"].as_str()), (ubus::STATUS_OK, Some("alice")));
        let (st, v) = call("users", json!({})).expect("users").await;
        assert_eq!((st, v["users"][0]["name"].as_str()), (ubus::STATUS_OK, Some("alice")));
        let (_, k) = call(
            "preauthkey_add",
            json!({"user": "alice", "reusable": true, "expiration": "24h"}),
        )
        .expect("key")
        .await;
        let key = k["key"].as_str().expect("key").to_string();
        assert!(key.starts_with("tskey-auth-") && k["reusable"] == true && k["expiration"].is_string());
        let (_, v) = call("preauthkeys", json!({"user": "alice"})).expect("keys").await;
        assert_eq!(v["preauthkeys"][0]["key"], key.as_str());
        let (_, v) = call("preauthkey_expire", json!({ "key": key })).expect("expire").await;
        assert_eq!(v["expired"], true);
        let (_, v) = call("nodes", json!({})).expect("nodes").await;
        assert_eq!(v, json!({"nodes": []}));
        let (st, v) = call("node_delete", json!({"id": 42})).expect("delete").await;
        assert_eq!(st, ubus::STATUS_UNKNOWN_ERROR);
        assert!(v["error"].as_str().is_some_and(|e| e.contains("42")), "{v}");
        let (st, v) = call("user_add", json!({"name": "alice"})).expect("duplicate").await;
        assert_eq!(st, ubus::STATUS_UNKNOWN_ERROR, "{v}");
        assert!(call("route_approve", json!({"node": 1, "routes": ["x"]})).is_err());

        // The policy: checked with its errors' lines, refused whole when bad, set when good.
        let bad = "{\n  \"acls\": [\n    {\"action\": \"accept\" \"src\": [\"*\"]},\n  ],\n}\n";
        let (st, v) = call("policy_check", json!({ "policy": bad })).expect("check").await;
        assert_eq!((st, &v["valid"]), (ubus::STATUS_OK, &json!(false)), "{v}");
        assert_eq!(v["errors"][0]["line"], 3, "{v}");
        let (st, v) = call("policy_set", json!({ "policy": bad })).expect("set bad").await;
        assert_eq!(st, ubus::STATUS_UNKNOWN_ERROR, "{v}");
        let good = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}"#;
        let (_, v) = call("policy_check", json!({ "policy": good })).expect("check").await;
        assert_eq!(v, json!({"valid": true, "errors": []}));
        let (_, v) = call("policy_get", json!({})).expect("get").await;
        assert_eq!(v["policy"], Value::Null, "no policy yet: the bad one was not taken");
        let (st, _) = call("policy_set", json!({ "policy": good })).expect("set").await;
        assert_eq!(st, ubus::STATUS_OK);
        let (_, v) = call("policy_get", json!({})).expect("get").await;
        assert_eq!(v["policy"], good);
    }
}
