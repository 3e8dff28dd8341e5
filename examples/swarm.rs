//! Simulated nodes for `scripts/bench-coordinator.sh`: N light clients join a running coordinator
//! over real TS2021 (Noise + HTTP/2, pre-auth key registration, one map stream each), then one of
//! them changes its endpoints several times and each change is timed until every other stream has
//! received it. Not part of any release binary.
//!
//! Usage: swarm URL AUTHKEY N [--changes K] [--threads T] [--pid PID] [--db PATH]
//!
//! Nodes are spread over T OS threads, each a current-thread tokio runtime driving its share of
//! nodes (one task per node). Prints progress lines, then one `RESULT` line of `key=value` pairs:
//! registration rate, time until every stream had its first map, p50/p99 (over the K changes) of
//! the time until the last stream received the change, and, with `--pid`/`--db`, the coordinator's
//! CPU seconds per change, resident memory and database size.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use rand_core::{OsRng, RngCore};
use tinyscale::{
    control::client::{self, ControlConn, ControlUrl},
    wire::keys::{MachinePrivate, MachinePublic, NodePrivate},
    wire::tailcfg::{self, MapRequest, RegisterAuth, RegisterRequest},
};

/// In-flight limits per thread: registrations (enough to keep the coordinator busy, few enough
/// not to pile up behind its accept queue) and stream starts (each full map is O(N) bytes, all
/// of them queued in the coordinator until read, so this bounds its memory peak).
struct Gates {
    join: tokio::sync::Semaphore,
    stream: tokio::sync::Semaphore,
}

/// What node tasks report to the main thread.
enum Event {
    Registered,
    FirstMap,
    /// Node saw the marker of change `rep`.
    Saw(usize, u32),
    Failed(usize, String),
}

struct Shared {
    url: ControlUrl,
    server: MachinePublic,
    authkey: String,
    /// The change being measured (0 = none yet); nodes look for its marker.
    rep: AtomicU32,
    /// Bumped by the main thread to let registered nodes open their streams.
    go: tokio::sync::watch::Sender<bool>,
    /// Bumped by the main thread to make node 0 announce change `n`.
    change: tokio::sync::watch::Sender<u32>,
}

fn marker(rep: u32) -> String {
    format!("198.51.100.{}:{}", rep % 250 + 1, 40000 + rep)
}

fn random_key() -> [u8; 32] {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    b
}

fn map_request(node: &NodePrivate, endpoints: Vec<String>, stream: bool, i: usize) -> MapRequest {
    MapRequest {
        version: tailcfg::CURRENT_CAPABILITY_VERSION,
        node_key: node.public(),
        endpoints,
        hostinfo: Some(serde_json::json!({"Hostname": format!("sim{i}")})),
        stream,
        omit_peers: !stream,
        ..Default::default()
    }
}

async fn join(sh: &Shared, i: usize, machine: &MachinePrivate, node: &NodePrivate) -> Result<ControlConn, String> {
    let mut conn = client::connect(&sh.url, machine, &sh.server)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = RegisterRequest {
        version: tailcfg::CURRENT_CAPABILITY_VERSION,
        node_key: node.public(),
        auth: Some(RegisterAuth {
            auth_key: sh.authkey.clone(),
        }),
        expiry: tailcfg::ZERO_TIME.into(),
        hostinfo: Some(serde_json::json!({"Hostname": format!("sim{i}")})),
        ..Default::default()
    };
    let r = conn.register(&req).await.map_err(|e| format!("register: {e}"))?;
    if !r.machine_authorized {
        return Err(format!("not authorized: {}", r.error));
    }
    Ok(conn)
}

async fn run_node(sh: Arc<Shared>, i: usize, tx: mpsc::Sender<Event>, gates: Arc<Gates>) {
    let machine = MachinePrivate::from_random(random_key());
    let node = NodePrivate::from_random(random_key());
    let permit = gates.join.acquire().await;
    let mut conn = match join(&sh, i, &machine, &node).await {
        Ok(c) => c,
        Err(e) => return drop(tx.send(Event::Failed(i, e))),
    };
    drop(permit);
    let _ = tx.send(Event::Registered);
    let mut go = sh.go.subscribe();
    if go.wait_for(|g| *g).await.is_err() {
        return;
    }
    let permit = gates.stream.acquire().await;
    let ep = vec![format!("127.0.0.1:{}", 10000 + i % 50000)];
    let mut stream = match conn.map_stream(&map_request(&node, ep, true, i)).await {
        Ok(s) => s,
        Err(e) => return drop(tx.send(Event::Failed(i, format!("map: {e}")))),
    };
    match stream.next_json().await {
        Ok(Some(_)) => {}
        r => return drop(tx.send(Event::Failed(i, format!("first map: {:?}", r.err())))),
    }
    drop(permit);
    let _ = tx.send(Event::FirstMap);
    let mut change = sh.change.subscribe();
    let mut seen = 0u32;
    loop {
        tokio::select! {
            msg = stream.next_json() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    r => return drop(tx.send(Event::Failed(i, format!("stream ended: {:?}", r.err())))),
                };
                let rep = sh.rep.load(Ordering::Acquire);
                if rep > seen {
                    let m = marker(rep);
                    if msg.windows(m.len()).any(|w| w == m.as_bytes()) {
                        seen = rep;
                        let _ = tx.send(Event::Saw(i, rep));
                    }
                }
            }
            // Node 0 announces the changes (a lite map request, as a client's endpoint update).
            r = change.changed(), if i == 0 => {
                if r.is_err() { return; }
                let rep = *change.borrow_and_update();
                let req = map_request(&node, vec![marker(rep)], false, i);
                if let Err(e) = conn.map_lite(&req).await {
                    return drop(tx.send(Event::Failed(i, format!("endpoint update: {e}"))));
                }
            }
        }
    }
}

fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(url), Some(authkey), Some(n)) = (args.first(), args.get(1), args.get(2).and_then(|n| n.parse().ok()))
    else {
        eprintln!("usage: swarm URL AUTHKEY N [--changes K] [--threads T] [--pid PID] [--db PATH]");
        std::process::exit(2);
    };
    let n: usize = n;
    let changes: u32 = opt("--changes").and_then(|v| v.parse().ok()).unwrap_or(10);
    let threads: usize = opt("--threads").and_then(|v| v.parse().ok()).unwrap_or(2).max(1);
    let pid: Option<u32> = opt("--pid").and_then(|v| v.parse().ok());
    let db = opt("--db");
    let url = ControlUrl::parse(url).unwrap_or_else(|e| {
        eprintln!("swarm: bad URL: {e}");
        std::process::exit(2)
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt.block_on(client::fetch_server_key(&url)).unwrap_or_else(|e| {
        eprintln!("swarm: server key: {e}");
        std::process::exit(1)
    });
    let (go, _) = tokio::sync::watch::channel(false);
    let (change, _) = tokio::sync::watch::channel(0u32);
    let sh = Arc::new(Shared {
        url,
        server,
        authkey: authkey.clone(),
        rep: AtomicU32::new(0),
        go,
        change,
    });
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    for t in 0..threads {
        let sh = sh.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let local = tokio::task::LocalSet::new();
            let gates = Arc::new(Gates {
                join: tokio::sync::Semaphore::new(32),
                stream: tokio::sync::Semaphore::new(4),
            });
            local.block_on(&rt, async move {
                let mut tasks = Vec::new();
                for i in (t..n).step_by(threads) {
                    tasks.push(tokio::task::spawn_local(run_node(
                        sh.clone(),
                        i,
                        tx.clone(),
                        gates.clone(),
                    )));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
    }
    drop(tx);
    let fail = |what: &str| -> ! {
        eprintln!("swarm: {what}");
        std::process::exit(1)
    };
    let wait = |want: &dyn Fn(&Event) -> bool, count: usize, deadline: Duration, what: &str| {
        let t0 = Instant::now();
        let until = t0 + deadline;
        let mut got = 0;
        while got < count {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Event::Failed(i, e)) => fail(&format!("node {i}: {e}")),
                Ok(e) if want(&e) => {
                    got += 1;
                    // Progress every tenth, so a run cut short still shows its pace.
                    if count >= 1000 && got % (count / 10) == 0 {
                        eprintln!(
                            "swarm: {what}: {got} of {count} after {:.1} s",
                            t0.elapsed().as_secs_f64()
                        );
                    }
                }
                Ok(_) => {}
                Err(_) => fail(&format!("{what}: {got} of {count} after {deadline:?}")),
            }
        }
    };
    wait(
        &|e| matches!(e, Event::Registered),
        n,
        Duration::from_secs(600),
        "registration",
    );
    let reg_secs = start.elapsed().as_secs_f64();
    eprintln!("swarm: {n} nodes registered in {reg_secs:.1} s");
    let t = Instant::now();
    sh.go.send_replace(true);
    wait(
        &|e| matches!(e, Event::FirstMap),
        n,
        Duration::from_secs(3600),
        "map streams",
    );
    let streams_secs = t.elapsed().as_secs_f64();
    eprintln!("swarm: {n} map streams up in {streams_secs:.1} s");
    let others = n.saturating_sub(1);
    // Warm-up change: once every stream has it, the join storm before it has drained too.
    let measure = |rep: u32, deadline: Duration| -> (f64, Vec<f64>) {
        sh.rep.store(rep, Ordering::Release);
        let t0 = Instant::now();
        sh.change.send_replace(rep);
        let mut each = Vec::with_capacity(others);
        let until = t0 + deadline;
        while each.len() < others {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Event::Saw(i, r)) if r == rep && i != 0 => each.push(t0.elapsed().as_secs_f64()),
                Ok(Event::Failed(i, e)) => fail(&format!("node {i}: {e}")),
                Ok(_) => {}
                Err(_) => fail(&format!(
                    "change {rep}: {} of {others} streams after {deadline:?}",
                    each.len()
                )),
            }
        }
        (t0.elapsed().as_secs_f64(), each)
    };
    let (warm, _) = measure(1, Duration::from_secs(1800));
    eprintln!("swarm: warm-up change reached every stream in {warm:.2} s");
    let cpu0 = pid.and_then(proc_cpu_seconds);
    let mut all = Vec::new();
    let mut per_stream = Vec::new();
    for k in 0..changes {
        // Changes a second apart, as endpoint changes come: each finds the sessions quiet (a
        // session writes at most every 200 ms, batching what arrives meanwhile).
        std::thread::sleep(Duration::from_secs(1));
        let (t, each) = measure(k + 2, Duration::from_secs(120));
        eprintln!("swarm: change {}: last stream after {:.3} s", k + 1, t);
        all.push(t);
        per_stream.extend(each);
    }
    let cpu1 = pid.and_then(proc_cpu_seconds);
    all.sort_by(f64::total_cmp);
    per_stream.sort_by(f64::total_cmp);
    let cpu_per_change = match (cpu0, cpu1) {
        (Some(a), Some(b)) => format!("{:.4}", (b - a) / f64::from(changes.max(1))),
        _ => "-".into(),
    };
    let mib = |k: Option<u64>| k.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0));
    let rss = mib(pid.and_then(|p| proc_status_kib(p, "VmRSS:")));
    let hwm = mib(pid.and_then(|p| proc_status_kib(p, "VmHWM:")));
    let db_size = db.map_or("-".into(), |p| {
        let size = |s: &str| std::fs::metadata(format!("{p}{s}")).map_or(0, |m| m.len());
        format!("{:.1}", (size("") + size("-wal")) as f64 / (1 << 20) as f64)
    });
    println!(
        "RESULT nodes={n} reg_rate={:.0} streams_s={streams_secs:.1} all_p50_ms={:.0} all_p99_ms={:.0} stream_p99_ms={:.0} cpu_s_per_change={cpu_per_change} rss_mib={rss} peak_rss_mib={hwm} db_mib={db_size}",
        n as f64 / reg_secs,
        percentile(&all, 50.0) * 1000.0,
        percentile(&all, 99.0) * 1000.0,
        percentile(&per_stream, 99.0) * 1000.0,
    );
    std::process::exit(0);
}
