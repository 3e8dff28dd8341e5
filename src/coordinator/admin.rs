//! Admin API of the running coordinator over a root-only unix socket: JSON lines, one request
//! and one response per line. The `tinyscale server users|preauthkeys|nodes|routes|policy` verbs (and the
//! `headscale` alias) are clients of it.
//!
//! Plays the role of headscale's gRPC/CLI pair (`cmd/headscale/cli/*.go`), with the same verbs so
//! people's habits work. [`handle`] is the dispatcher; the listener and client are thin shells.

use std::{path::Path, sync::Arc};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    model::Node,
    server::{random_hex, unix_now, Coordinator},
    state::{CoordError, State},
};
use crate::{ipc, ipc::IpcResponse, tailcfg};

/// One admin request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
}

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
        "ip_addresses": ips,
        "online": st.is_online(n.id),
        "last_seen": time_or_null(n.last_seen),
        "expiry": time_or_null(n.expiry),
        "expired": n.expiry.is_some_and(|e| e <= now),
        "ephemeral": n.ephemeral,
        "tags": n.tags,
        "machine_key": n.machine_key.to_string(),
        "node_key": n.node_key.to_string(),
        "created_at": tailcfg::format_time(n.created),
        "announced_routes": State::announced_routes(n),
        "approved_routes": n.approved_routes,
    })
}

fn user_id(st: &State, name: &Option<String>) -> Result<Option<u64>, CoordError> {
    match name {
        None => Ok(None),
        Some(n) => st
            .users()
            .find(|u| u.name == *n)
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
        for r in all {
            rows.push(json!({
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
    let now = unix_now();
    let r: Result<Value, CoordError> = (|| {
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
        })
    })();
    IpcResponse::from_result(r.map_err(|e| e.to_string()))
}

fn key_json(st: &State, k: &super::model::PreAuthKey, now: i64) -> Value {
    json!({
        "id": k.id,
        "key": k.key,
        "user": st.user(k.user_id).map(|u| u.name.clone()).unwrap_or_default(),
        "reusable": k.reusable,
        "ephemeral": k.ephemeral,
        "used": k.used,
        "expiration": time_or_null(k.expiration),
        "expired": k.expiration.is_some_and(|e| e <= now),
        "created_at": tailcfg::format_time(k.created),
        "acl_tags": k.tags,
    })
}

/// Binds the admin socket (mode 0600, removing a stale one) and serves it forever.
pub async fn serve_admin(coord: Arc<Coordinator>, path: &Path) -> std::io::Result<()> {
    let listener = ipc::bind_private(path).await?;
    ipc::serve_lines(listener, move |req: AdminRequest| {
        let coord = coord.clone();
        async move { handle(&coord, req) }
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
