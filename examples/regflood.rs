//! Registration load generator for the coordinator's load and crash tests
//! (`scripts/netns-load.sh`): many machines, each on its own `/ts2021` connection, built on the
//! crate's control client. Not part of the release binary.
//!
//! Machine and node keys derive from `--seed` and the machine's index, so a later run can come
//! back as the same machines without storing private keys.
//!
//! ```text
//! regflood register URL COUNT CONCURRENCY SEED [AUTHKEY]
//!     registers machines 0..COUNT; prints `reg INDEX NODEKEY` for every successful register
//!     response as it arrives, then `ok INDEX NODEKEY ADDR,ADDR` with the addresses from the
//!     map request that follows, or `err INDEX TEXT`; the last line on stderr is
//!     `registered N failed N` (N registered = `ok` lines)
//! regflood verify URL CONCURRENCY SEED FILE
//!     for every `reg` line in FILE: the same machine registers again without an auth key and
//!     must be authorized at once (no new login), with the addresses of its `ok` line if it
//!     has one; those must be unique across FILE; prints `verified N mismatched N`, exits 1
//!     on any mismatch
//! ```
//! Exit status 2 on bad arguments.
//!
//! A busy answer (`429` from the rate limit, `503` from the connection caps) is waited out and
//! retried as the daemon does (after its `Retry-After` or a doubling backoff, at most [`BUSY_RETRIES`] times per machine);
//! with `REGFLOOD_NO_RETRY=1` it is printed as that machine's `err` line instead, as a client
//! that ignores `Retry-After` would see it.

use std::{collections::HashMap, rc::Rc, sync::Arc};

use tinyscale::{
    control::client::{self, ControlUrl},
    wire::keys::{MachinePrivate, NodePrivate},
    wire::tailcfg::{self, MapRequest, RegisterAuth, RegisterRequest},
};
use tokio::sync::Semaphore;

/// Busy answers waited out per machine (and for the server key) before giving up.
const BUSY_RETRIES: u32 = 60;

/// Runs `op` again while it fails with a busy answer, after the server's `Retry-After` (unless
/// `REGFLOOD_NO_RETRY` is set).
async fn patiently<T, F: std::future::Future<Output = Result<T, client::Error>>>(
    mut op: impl FnMut() -> F,
) -> Result<T, client::Error> {
    let retry = std::env::var_os("REGFLOOD_NO_RETRY").is_none();
    let (mut tries, mut backoff) = (0, std::time::Duration::from_secs(1));
    let cap = std::time::Duration::from_secs(30);
    loop {
        match op().await {
            Err(e @ client::Error::Busy { .. }) if retry && tries < BUSY_RETRIES => {
                tries += 1;
                tokio::time::sleep(e.retry_delay(backoff, cap)).await;
                backoff = (backoff * 2).min(cap);
            }
            r => return r,
        }
    }
}

/// The key of machine `index`: seed, index and kind, so node and machine keys differ.
fn key_bytes(seed: u64, index: u64, kind: u8) -> [u8; 32] {
    let mut b = [0x5a; 32];
    b[..8].copy_from_slice(&seed.to_le_bytes());
    b[8..16].copy_from_slice(&index.to_le_bytes());
    b[16] = kind;
    b
}

struct Machine {
    index: u64,
    machine: MachinePrivate,
    node: NodePrivate,
}

impl Machine {
    fn new(seed: u64, index: u64) -> Machine {
        Machine {
            index,
            machine: MachinePrivate::from_random(key_bytes(seed, index, 1)),
            node: NodePrivate::from_random(key_bytes(seed, index, 2)),
        }
    }

    /// Registers (with `auth_key` if given) and reads its own addresses from a map request.
    async fn register(
        &self,
        url: &ControlUrl,
        server: &tinyscale::wire::keys::MachinePublic,
        auth_key: Option<&str>,
        announce: bool,
    ) -> Result<Vec<String>, String> {
        let hostinfo = serde_json::json!({"Hostname": format!("flood-{}", self.index), "OS": "linux"});
        let req = RegisterRequest {
            version: tailcfg::CURRENT_CAPABILITY_VERSION,
            node_key: self.node.public(),
            auth: auth_key.map(|k| RegisterAuth { auth_key: k.into() }),
            expiry: tailcfg::ZERO_TIME.into(),
            hostinfo: Some(hostinfo.clone()),
            ..Default::default()
        };
        let (mut conn, resp) = patiently(|| async {
            let mut conn = client::connect(url, &self.machine, server).await?;
            let resp = conn.register(&req).await?;
            Ok((conn, resp))
        })
        .await
        .map_err(|e| e.to_string())?;
        if !resp.error.is_empty() {
            return Err(format!("refused: {}", resp.error));
        }
        if !resp.machine_authorized || !resp.auth_url.is_empty() {
            return Err("not authorized (would need a login)".into());
        }
        // Printed at once: a crash right after this answer must not lose the machine.
        if announce {
            println!("reg {} {}", self.index, self.node.public());
        }
        let map = MapRequest {
            version: tailcfg::CURRENT_CAPABILITY_VERSION,
            node_key: self.node.public(),
            hostinfo: Some(hostinfo),
            ..Default::default()
        };
        let mut stream = conn.map_stream(&map).await.map_err(|e| e.to_string())?;
        match stream.next().await.map_err(|e| e.to_string())? {
            Some(m) => Ok(m.node.map(|n| n.addresses).unwrap_or_default()),
            None => Err("empty map response".into()),
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: regflood register URL COUNT CONCURRENCY SEED [AUTHKEY]");
    eprintln!("       regflood verify URL CONCURRENCY SEED FILE");
    std::process::exit(2)
}

fn num(s: Option<&String>) -> u64 {
    s.and_then(|s| s.parse().ok()).unwrap_or_else(|| usage())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async {
        let url = ControlUrl::parse(args.get(1).map_or("", String::as_str)).unwrap_or_else(|_| usage());
        let server = match patiently(|| client::fetch_server_key(&url)).await {
            Ok(k) => k,
            Err(e) => {
                eprintln!("cannot fetch the server key: {e}");
                return 1;
            }
        };
        match args.first().map(String::as_str) {
            Some("register") => {
                register_all(
                    url,
                    server,
                    num(args.get(2)),
                    num(args.get(3)),
                    num(args.get(4)),
                    args.get(5).cloned(),
                )
                .await
            }
            Some("verify") => {
                let file = args.get(4).unwrap_or_else(|| usage());
                let text = std::fs::read_to_string(file).unwrap_or_else(|e| {
                    eprintln!("{file}: {e}");
                    std::process::exit(2)
                });
                verify_all(url, server, num(args.get(2)), num(args.get(3)), &text).await
            }
            _ => usage(),
        }
    });
    std::process::exit(code)
}

async fn register_all(
    url: ControlUrl,
    server: tinyscale::wire::keys::MachinePublic,
    count: u64,
    concurrency: u64,
    seed: u64,
    auth_key: Option<String>,
) -> i32 {
    let gate = Arc::new(Semaphore::new(concurrency.max(1) as usize));
    let (url, auth_key) = (Rc::new(url), Rc::new(auth_key));
    let local = tokio::task::LocalSet::new();
    let results = local
        .run_until(async {
            let mut tasks = Vec::new();
            for index in 0..count {
                let (gate, url, auth_key) = (gate.clone(), url.clone(), auth_key.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let _permit = gate.acquire_owned().await.ok()?;
                    let m = Machine::new(seed, index);
                    let r = m.register(&url, &server, auth_key.as_deref(), true).await;
                    match &r {
                        Ok(addrs) => println!("ok {index} {} {}", m.node.public(), addrs.join(",")),
                        Err(e) => println!("err {index} {e}"),
                    }
                    Some(r.is_ok())
                }));
            }
            let mut ok = 0;
            for t in tasks {
                if let Ok(Some(true)) = t.await {
                    ok += 1;
                }
            }
            ok
        })
        .await;
    eprintln!("registered {results} failed {}", count - results);
    0
}

async fn verify_all(
    url: ControlUrl,
    server: tinyscale::wire::keys::MachinePublic,
    concurrency: u64,
    seed: u64,
    text: &str,
) -> i32 {
    let mut regs: Vec<u64> = Vec::new();
    let mut addrs_of: HashMap<u64, Vec<String>> = HashMap::new();
    let mut owner: HashMap<String, u64> = HashMap::new();
    let mut mismatched = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = f.get(1).and_then(|i| i.parse::<u64>().ok()) else {
            continue;
        };
        match (f.first(), f.get(3)) {
            (Some(&"reg"), _) => regs.push(i),
            (Some(&"ok"), Some(addrs)) => {
                let addrs: Vec<String> = addrs.split(',').map(str::to_owned).collect();
                for a in &addrs {
                    if let Some(other) = owner.insert(a.clone(), i) {
                        println!("duplicate address {a}: machines {other} and {i}");
                        mismatched += 1;
                    }
                }
                addrs_of.insert(i, addrs);
            }
            _ => {}
        }
    }
    let want: Vec<(u64, Option<Vec<String>>)> = regs.iter().map(|i| (*i, addrs_of.get(i).cloned())).collect();
    let gate = Arc::new(Semaphore::new(concurrency.max(1) as usize));
    let url = Rc::new(url);
    let local = tokio::task::LocalSet::new();
    let bad = local
        .run_until(async {
            let mut tasks = Vec::new();
            for (index, addrs) in want.iter().cloned() {
                let (gate, url) = (gate.clone(), url.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let _permit = gate.acquire_owned().await.ok()?;
                    let got = Machine::new(seed, index).register(&url, &server, None, false).await;
                    match got {
                        Ok(got) if addrs.as_ref().is_none_or(|a| *a == got) => Some(true),
                        Ok(got) => {
                            let was = addrs.unwrap_or_default().join(",");
                            println!("machine {index}: addresses {was} now {}", got.join(","));
                            Some(false)
                        }
                        Err(e) => {
                            println!("machine {index}: {e}");
                            Some(false)
                        }
                    }
                }));
            }
            let mut bad = 0;
            for t in tasks {
                if !matches!(t.await, Ok(Some(true))) {
                    bad += 1;
                }
            }
            bad
        })
        .await;
    mismatched += bad;
    println!("verified {} mismatched {mismatched}", want.len() - bad);
    i32::from(mismatched > 0)
}
