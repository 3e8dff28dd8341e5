//! Replays traffic recorded against the real ubusd (tests/data/ubus/, see its README) through
//! the ubus codec, the client state machine and the `tinyscale` object's argument mapping.

use serde_json::{json, Map, Value};
use tinyscale::{
    platform::ubus_object,
    wire::ubus::{self, blobmsg, Client, Event, Invoke, Method},
};

/// The frames of a transcript: (from ubusd?, bytes).
fn frames(name: &str) -> Vec<(bool, Vec<u8>)> {
    let path = format!("{}/tests/data/ubus/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("transcript");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (dir, hex) = l.split_once(' ').expect("direction");
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                .collect();
            (dir == "<", bytes)
        })
        .collect()
}

fn data_of(m: &ubus::Msg<'_>) -> Value {
    Value::Object(blobmsg::table(m.attr(ubus::ATTR_DATA).expect("DATA")).expect("blobmsg"))
}

#[test]
fn every_recorded_frame_decodes() {
    for name in [
        "daemon.txt",
        "listen.txt",
        "list.txt",
        "call_status.txt",
        "call_status_session.txt",
        "call_ping_bad.txt",
        "call_down.txt",
        "send_event.txt",
        "call_peers.txt",
        "call_set_bad.txt",
        "server.txt",
        "list_server.txt",
        "call_server_user_add.txt",
        "call_server_users.txt",
        "call_server_route_bad.txt",
        "call_server_node_missing.txt",
        "listen_peer.txt",
    ] {
        for (_, f) in frames(name) {
            assert_eq!(ubus::frame_len(&f), Ok(f.len()), "{name}");
            let m = ubus::decode(&f).expect(name);
            if let Some(d) = m.attr(ubus::ATTR_DATA) {
                blobmsg::table(d).expect(name);
            }
            if let Some(d) = m.attr(ubus::ATTR_SIGNATURE) {
                blobmsg::table(d).expect(name);
            }
        }
    }
}

/// Plays an object's side of a recorded session: every frame our client sends must equal the
/// recorded one, which ubusd accepted. Replies to calls that `map` accepts reuse the recorded
/// DATA and status (the daemon's JSON is not rebuilt here); argument errors and events are
/// produced by our code. Returns the invocations seen.
fn replay(
    file: &str,
    name: &str,
    methods: Vec<Method>,
    map: impl Fn(&str, &Map<String, Value>) -> Result<(), String>,
) -> Vec<(String, Map<String, Value>)> {
    let mut c = Client::new(name, methods);
    let mut pending: Vec<Invoke> = Vec::new();
    let mut invokes = Vec::new();
    let rec = frames(file);
    // The object id ubusd assigned, from its DATA answer to ADD_OBJECT.
    let recorded_id = rec
        .iter()
        .find(|(u, b)| *u && b[1] == ubus::MSG_DATA)
        .and_then(|(_, b)| ubus::decode(b).ok()?.u32(ubus::ATTR_OBJID));
    for (i, (from_ubusd, f)) in rec.iter().enumerate() {
        if *from_ubusd {
            c.handle_frame(f).expect("frame from ubusd");
            while let Some(ev) = c.poll_event() {
                match ev {
                    Event::Registered { id } => assert_eq!(Some(id), recorded_id),
                    Event::RegisterFailed { status } => panic!("refused {status}"),
                    Event::Invoke(inv) => {
                        invokes.push((inv.method.clone(), inv.args.clone()));
                        match map(&inv.method, &inv.args) {
                            Err(msg) => c.reply(&inv, ubus::STATUS_INVALID_ARGUMENT, Some(&json!({ "error": msg }))),
                            Ok(()) => pending.push(inv),
                        }
                    }
                }
            }
            continue;
        }
        let mine = match c.poll_transmit() {
            Some(x) => x,
            None => {
                let m = ubus::decode(f).expect("recorded");
                match m.ty {
                    ubus::MSG_DATA => {
                        let inv = pending.remove(0);
                        let status = rec
                            .get(i + 1)
                            .and_then(|(_, b)| ubus::decode(b).ok()?.u32(ubus::ATTR_STATUS))
                            .expect("STATUS after DATA");
                        c.reply(&inv, status, Some(&data_of(&m)));
                    }
                    ubus::MSG_INVOKE => {
                        let d = data_of(&m);
                        let data = d["data"].as_object().cloned().unwrap_or_default();
                        c.send_event(d["id"].as_str().expect("id"), &data);
                    }
                    t => panic!("unexpected recorded frame type {t}"),
                }
                c.poll_transmit().expect("our frame")
            }
        };
        assert_eq!(hex(&mine), hex(f), "{file} frame {i}");
    }
    assert!(c.poll_transmit().is_none());
    invokes
}

#[test]
fn daemon_session_replays_byte_for_byte() {
    let invokes = replay("daemon.txt", ubus_object::OBJECT, ubus_object::methods(), |m, a| {
        ubus_object::request_for(m, a).map(|_| ())
    });
    let session = json!("c0ffee00c0ffee00c0ffee00c0ffee00");
    let names: Vec<&str> = invokes.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(names, ["status", "status", "ping", "peers", "set", "down"]);
    assert_eq!(invokes[1].1.get("ubus_rpc_session"), Some(&session));
    assert_eq!(invokes[2].1.get("peer"), Some(&json!(5)));
    assert_eq!(invokes[4].1.get("accept_route"), Some(&json!(true)));
}

/// The coordinator's object, registered and called through the real ubusd.
#[cfg(feature = "coordinator")]
#[test]
fn server_session_replays_byte_for_byte() {
    use tinyscale::coordinator::admin;
    let invokes = replay(
        "server.txt",
        admin::SERVER_OBJECT,
        ubus_object::signatures(admin::SERVER_METHODS),
        |m, a| ubus_object::map_call(admin::SERVER_METHODS, m, a).map(|_| ()),
    );
    let names: Vec<&str> = invokes.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(names, ["user_add", "users", "route_approve", "node_delete"]);
    // What the callers saw: the new user in the list, our messages for the two failures.
    let reply = |file: &str| {
        let f = frames(file);
        let status = f
            .iter()
            .rev()
            .find(|(u, b)| *u && b[1] == ubus::MSG_STATUS)
            .and_then(|(_, b)| ubus::decode(b).ok()?.u32(ubus::ATTR_STATUS));
        let data = f
            .iter()
            .find(|(u, b)| *u && is_call_data(b))
            .map(|(_, b)| data_of(&ubus::decode(b).expect("decode")));
        (status, data.unwrap_or(Value::Null))
    };
    let (st, users) = reply("call_server_users.txt");
    assert_eq!((st, users["users"][0]["name"].as_str()), (Some(0), Some("alice")));
    let (st, e) = reply("call_server_route_bad.txt");
    assert_eq!(st, Some(ubus::STATUS_INVALID_ARGUMENT));
    assert!(e["error"].as_str().expect("error").contains("10.0.0.1"), "{e}");
    let (st, e) = reply("call_server_node_missing.txt");
    assert_eq!(st, Some(ubus::STATUS_UNKNOWN_ERROR));
    assert!(e["error"].as_str().expect("error").contains("42"), "{e}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Our event frame equals libubus's `ubus_send_event` frame for the same event, but for seq.
#[test]
fn event_matches_libubus() {
    let libubus = frames("send_event.txt").remove(1).1;
    let mut c = Client::new(ubus_object::OBJECT, ubus_object::methods());
    for (from_ubusd, f) in frames("daemon.txt").into_iter().take(4) {
        if from_ubusd {
            c.handle_frame(&f).expect("frame");
        }
    }
    let _ = c.poll_transmit();
    let mut data = Map::new();
    data.insert("state".into(), json!("Stopped"));
    c.send_event(ubus_object::STATE_EVENT, &data);
    let ours = c.poll_transmit().expect("event");
    assert_eq!((&ours[..2], &ours[4..]), (&libubus[..2], &libubus[4..]));
}

/// ubusd keeps our signature verbatim: `ubus list -v` receives exactly the bytes we registered.
#[test]
fn list_shows_our_signature() {
    let f = frames("list.txt");
    let reply = f.iter().find(|(u, b)| *u && b[1] == ubus::MSG_DATA).expect("DATA");
    let m = ubus::decode(&reply.1).expect("decode");
    assert_eq!(m.str(ubus::ATTR_OBJPATH), Some("tinyscale"));
    let body = ubus::add_object_body(ubus_object::OBJECT, &ubus_object::methods());
    let frame = ubus::encode(ubus::MSG_ADD_OBJECT, 1, 0, &body);
    let ours = ubus::decode(&frame).expect("ours");
    assert_eq!(m.attr(ubus::ATTR_SIGNATURE), ours.attr(ubus::ATTR_SIGNATURE));
    let sig = Value::Object(blobmsg::table(m.attr(ubus::ATTR_SIGNATURE).expect("sig")).expect("table"));
    assert_eq!(sig["ping"], json!({"peer": blobmsg::STRING}));
    assert_eq!(sig["up"]["accept_routes"], json!(blobmsg::BOOL));
    assert_eq!(sig["set"]["exit_node"], json!(blobmsg::STRING));
    assert_eq!(sig["peers"], json!({}));
}

#[cfg(feature = "coordinator")]
#[test]
fn list_shows_the_server_signature() {
    use tinyscale::coordinator::admin;
    let f = frames("list_server.txt");
    let reply = f.iter().find(|(u, b)| *u && b[1] == ubus::MSG_DATA).expect("DATA");
    let m = ubus::decode(&reply.1).expect("decode");
    assert_eq!(m.str(ubus::ATTR_OBJPATH), Some(admin::SERVER_OBJECT));
    let body = ubus::add_object_body(admin::SERVER_OBJECT, &ubus_object::signatures(admin::SERVER_METHODS));
    let ours = ubus::encode(ubus::MSG_ADD_OBJECT, 1, 0, &body);
    assert_eq!(
        m.attr(ubus::ATTR_SIGNATURE),
        ubus::decode(&ours).expect("ours").attr(ubus::ATTR_SIGNATURE)
    );
}

/// What the listener receives: an INVOKE of method "tinyscale.state" with our data.
#[test]
fn listener_receives_event() {
    let delivered: Vec<_> = frames("listen.txt")
        .into_iter()
        .filter(|(u, b)| *u && b[1] == ubus::MSG_INVOKE)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(delivered.len(), 2);
    for f in delivered {
        let m = ubus::decode(&f).expect("decode");
        assert_eq!(m.str(ubus::ATTR_METHOD), Some(ubus_object::STATE_EVENT));
        assert_eq!(data_of(&m), json!({"state": "Stopped"}));
    }
}

/// Peer events from a real tailnet, as a listener on the real ubusd received them.
#[test]
fn listener_receives_peer_events() {
    let delivered: Vec<Value> = frames("listen_peer.txt")
        .into_iter()
        .filter(|(u, b)| *u && b[1] == ubus::MSG_INVOKE)
        .map(|(_, b)| {
            let m = ubus::decode(&b).expect("decode");
            assert_eq!(m.str(ubus::ATTR_METHOD), Some(ubus_object::PEER_EVENT));
            data_of(&m)
        })
        .collect();
    let want = |action: &str| json!({"action": action, "id": 2, "ip": "100.64.0.2", "name": "branch-office", "online": true, "path": ""});
    assert_eq!(delivered, [want("added"), want("removed")]);
}

/// A DATA frame carrying a method's answer (not the LOOKUP answer before it).
fn is_call_data(b: &[u8]) -> bool {
    b[1] == ubus::MSG_DATA && ubus::decode(b).is_ok_and(|m| m.attr(ubus::ATTR_DATA).is_some())
}

/// The caller's view: status JSON, and INVALID_ARGUMENT with our message for a bad argument.
#[test]
fn caller_sees_replies() {
    let f = frames("call_status_session.txt");
    let data = f.iter().find(|(u, b)| *u && is_call_data(b)).expect("DATA");
    let v = data_of(&ubus::decode(&data.1).expect("decode"));
    assert_eq!(v["BackendState"], "NeedsLogin");
    let f = frames("call_ping_bad.txt");
    let status = f
        .iter()
        .rev()
        .find(|(u, b)| *u && b[1] == ubus::MSG_STATUS)
        .expect("STATUS");
    let m = ubus::decode(&status.1).expect("decode");
    assert_eq!(m.u32(ubus::ATTR_STATUS), Some(ubus::STATUS_INVALID_ARGUMENT));
    let data = f.iter().find(|(u, b)| *u && is_call_data(b)).expect("DATA");
    let v = data_of(&ubus::decode(&data.1).expect("decode"));
    assert!(v["error"].as_str().expect("error").contains("peer"));
}

/// Reads one whole frame.
async fn read_frame(s: &mut tokio::net::UnixStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut f = vec![0u8; 12];
    s.read_exact(&mut f).await.expect("frame head");
    let len = ubus::frame_len(&f).expect("frame length");
    f.resize(len, 0);
    s.read_exact(&mut f[12..]).await.expect("frame body");
    f
}

/// The daemon's shell against a scripted ubusd speaking the recorded frames: it registers the
/// recorded way, answers status (ignoring `ubus_rpc_session`) and a bad argument, sends the
/// state event after `down`, and registers again after ubusd drops the connection.
#[tokio::test]
async fn daemon_shell_against_scripted_ubusd() {
    use std::time::Duration;

    use tokio::{io::AsyncWriteExt, time::timeout};

    let dir = std::env::temp_dir().join(format!("tinyscale-ubus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let sock = dir.join("ubus.sock");
    let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
    let d = tinyscale::daemon::Daemon::load(&dir.join("state"), None).expect("daemon");
    tokio::spawn(ubus_object::run(d, sock.clone()));

    let rec = frames("daemon.txt");
    let from_ubusd: Vec<&Vec<u8>> = rec.iter().filter(|(u, _)| *u).map(|(_, b)| b).collect();
    let to_ubusd: Vec<&Vec<u8>> = rec.iter().filter(|(u, _)| !*u).map(|(_, b)| b).collect();
    let step = Duration::from_secs(5);
    for round in 0..2 {
        let (mut s, _) = timeout(step, listener.accept())
            .await
            .expect("connect")
            .expect("accept");
        s.write_all(from_ubusd[0]).await.expect("hello");
        let add = timeout(step, read_frame(&mut s)).await.expect("add_object");
        assert_eq!(hex(&add), hex(to_ubusd[0]), "round {round}");
        s.write_all(from_ubusd[1]).await.expect("data");
        s.write_all(from_ubusd[2]).await.expect("status");
        // status with ubus_rpc_session
        s.write_all(from_ubusd[4]).await.expect("invoke");
        let data = ubus::decode(&timeout(step, read_frame(&mut s)).await.expect("data")).map(|m| data_of(&m));
        let want = if round == 0 { "NeedsLogin" } else { "Stopped" };
        assert_eq!(data.expect("decode")["BackendState"], want);
        let st = timeout(step, read_frame(&mut s)).await.expect("status");
        assert_eq!(ubus::decode(&st).expect("decode").u32(ubus::ATTR_STATUS), Some(0));
        if round == 1 {
            break;
        }
        // ping {"peer": 5}: INVALID_ARGUMENT with a message
        s.write_all(from_ubusd[5]).await.expect("invoke");
        let _ = timeout(step, read_frame(&mut s)).await.expect("data");
        let st = timeout(step, read_frame(&mut s)).await.expect("status");
        assert_eq!(ubus::decode(&st).expect("decode").u32(ubus::ATTR_STATUS), Some(2));
        // set {"accept_route": true}: a misspelt pref is INVALID_ARGUMENT naming it
        s.write_all(from_ubusd[7]).await.expect("invoke");
        let data = ubus::decode(&timeout(step, read_frame(&mut s)).await.expect("data")).map(|m| data_of(&m));
        assert!(data.expect("decode")["error"]
            .as_str()
            .expect("error")
            .contains("accept_route"));
        let st = timeout(step, read_frame(&mut s)).await.expect("status");
        assert_eq!(ubus::decode(&st).expect("decode").u32(ubus::ATTR_STATUS), Some(2));
        // down: its data and status, and the state event, pushed by the change itself, so it
        // may reach ubusd before, between or after the call's replies.
        s.write_all(from_ubusd[8]).await.expect("invoke");
        let mut frames = Vec::new();
        for _ in 0..3 {
            frames.push(timeout(step, read_frame(&mut s)).await.expect("frame"));
        }
        let mut msgs: Vec<_> = frames.iter().map(|f| ubus::decode(f).expect("decode")).collect();
        msgs.sort_by_key(|m| m.ty);
        let m = msgs.pop().expect("event");
        assert_eq!(
            msgs.iter().map(|m| m.ty).collect::<Vec<_>>(),
            vec![ubus::MSG_STATUS, ubus::MSG_DATA],
            "down's replies"
        );
        assert_eq!(msgs[0].u32(ubus::ATTR_STATUS), Some(0), "down's status");
        assert_eq!((m.ty, m.peer), (ubus::MSG_INVOKE, ubus::SYSTEM_OBJECT_EVENT));
        assert_eq!(
            data_of(&m),
            json!({"id": "tinyscale.state", "data": {"state": "Stopped", "ips": []}})
        );
        drop(s); // ubusd goes away; the shell reconnects and registers again
    }
    let _ = std::fs::remove_dir_all(&dir);
}
