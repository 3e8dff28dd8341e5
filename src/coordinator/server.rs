//! The coordinator's network shell: one TCP listener for `/key`, `/ts2021` (Noise + HTTP/2),
//! `/register/<id>` and `/health`, plus the admin unix socket and housekeeping timers.
//!
//! Mirrors the roles of headscale `hscontrol/{app,noise,poll,handlers}.go`. Decisions live in
//! `state.rs` and `mapper.rs`; this file converts bytes to calls and calls to bytes.

use std::{
    future::poll_fn,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use rand_core::{OsRng, RngCore};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{broadcast, watch},
};

use super::{
    api,
    mapper::{self, Action, Fanout, Update, Viewer},
    metrics::{FanOutTimer, Limited, Metrics, Registration},
    ratelimit::{self, RateLimiter, RateLimits, Verdict},
    state::{Change, CoordError, RegisterOutcome, State},
};
use crate::{
    platform::{
        connlimit::{self, ConnLimits, ListenLimits},
        tls::{self, Stream},
    },
    wire::{
        http1::{self, Head},
        keys::{hex_encode, MachinePrivate, MachinePublic},
        noise::{self, stream::NoiseStream},
        tailcfg::{self, MapRequest, MapResponse, OverTlsPublicKeyResponse, RegisterRequest},
        zstdframe,
    },
};

/// Map keep-alive cadence (headscale: 50 s + jitter; Go's watchdog fires at 120 s).
pub const MAP_KEEPALIVE: Duration = Duration::from_secs(55);
/// Largest request body inside Noise (headscale caps at 1 MiB).
pub const MAX_NOISE_BODY: usize = 1 << 20;
/// Changes buffered per session before it falls back to a full map.
const CHANGE_QUEUE: usize = 1024;
/// Queued updates a session sends in one write at most.
const MAX_BATCH: usize = 256;
/// Least time between two writes to one map session: an update arriving sooner waits for the
/// rest of the gap and goes out with whatever arrives meanwhile, so a burst of changes (many
/// nodes joining) costs each session a few writes per second, not one per change. A change
/// after a quiet spell goes out at once. (headscale batches every change by 800 ms.)
const MIN_WRITE_GAP: Duration = Duration::from_millis(200);

/// Shared coordinator context.
pub struct Coordinator {
    state: Mutex<State>,
    /// Prepares changes for the sessions; locked only while the state lock is held.
    fanout: Mutex<Fanout>,
    changes: broadcast::Sender<Published>,
    /// Bumped whenever an interactive registration completes, to wake Followup waiters.
    registrations: watch::Sender<u64>,
    noise_key: MachinePrivate,
    /// The embedded DERP relay, when `derp_server_enabled`.
    derp: std::sync::OnceLock<Arc<crate::derp::server::DerpServer>>,
    /// Admission and handshake budget of the HTTP listener.
    limits: Arc<ConnLimits>,
    /// Map streams, registrations and fan-out latency (`GET /metrics`).
    metrics: Arc<Metrics>,
    /// The per-source budget of `/key`, `/ts2021` and registrations.
    rate: Mutex<RateLimiter>,
}

/// A prepared update on its way to the map streams, with the timer of its fan-out (it observes
/// when the last session has handled the update). Derefs to the update.
#[derive(Clone)]
pub struct Published {
    update: Arc<Update>,
    _fanout: Arc<FanOutTimer>,
}

impl std::ops::Deref for Published {
    type Target = Update;
    fn deref(&self) -> &Update {
        &self.update
    }
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `n` random bytes as URL-safe text (lowercase hex).
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    OsRng.fill_bytes(&mut b);
    hex_encode(&b)
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    b
}

impl Coordinator {
    /// Wraps `state` with the default listener limits; loads or creates the server's Noise key
    /// in the store.
    pub fn new(state: State) -> Result<Arc<Coordinator>, CoordError> {
        Self::with_limits(state, ListenLimits::default())
    }

    /// [`Coordinator::new`] with `limits` for [`serve_http`].
    pub fn with_limits(state: State, limits: ListenLimits) -> Result<Arc<Coordinator>, CoordError> {
        let noise_key = match state.store().get_kv("noise_private_key")? {
            Some(t) => MachinePrivate::from_key_str(&t)
                .map_err(|_| CoordError::Invalid("stored noise_private_key is corrupt".into()))?,
            None => {
                let k = MachinePrivate::from_random(random32());
                state.store().set_kv("noise_private_key", &k.to_key_str())?;
                k
            }
        };
        let (changes, _) = broadcast::channel(CHANGE_QUEUE);
        let (registrations, _) = watch::channel(0);
        Ok(Arc::new(Coordinator {
            state: Mutex::new(state),
            fanout: Mutex::new(Fanout::default()),
            changes,
            registrations,
            noise_key,
            derp: Default::default(),
            limits: ConnLimits::new(limits),
            metrics: Default::default(),
            rate: Mutex::new(RateLimiter::new(RateLimits::default())),
        }))
    }

    /// The listener's admission state and refusal counters.
    pub fn limits(&self) -> &Arc<ConnLimits> {
        &self.limits
    }

    /// Replaces the per-source rate limit (sources start with a whole budget).
    pub fn set_rate_limits(&self, limits: RateLimits) {
        *self.rate.lock().unwrap_or_else(|e| e.into_inner()) = RateLimiter::new(limits);
    }

    /// Charges one `what` request from `ip` to its budget: `None` to serve it, or the seconds
    /// to put in `Retry-After` of a `429` (counted, and logged once a minute per source).
    fn rate_check(&self, ip: IpAddr, what: Limited) -> Option<u64> {
        let v = self
            .rate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(ip, std::time::Instant::now());
        let Verdict::Limit { retry_after, log } = v else {
            return None;
        };
        self.metrics.note_rate_limited(what);
        if log {
            log::warn!("rate limit reached, answering 429 (logged once a minute) peer={ip} op={what:?}");
        }
        Some(ratelimit::retry_after_secs(retry_after))
    }

    /// The coordinator's own counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The embedded DERP relay, if any.
    pub fn derp(&self) -> Option<&Arc<crate::derp::server::DerpServer>> {
        self.derp.get()
    }

    /// Locks the state (a poisoned lock is still usable: panics abort the process anyway).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server's Noise public key.
    pub fn public_key(&self) -> MachinePublic {
        self.noise_key.public()
    }

    /// Publishes changes to every map session: each is prepared once, under the state lock so
    /// updates are queued in the order of the states they describe. Call without holding
    /// [`Coordinator::lock`].
    pub fn publish(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let st = self.lock();
        let mut fanout = self.fanout();
        if self.changes.receiver_count() == 0 {
            // Nobody is streaming; a session starting later begins with a full map.
            fanout.skip();
            return;
        }
        let now = unix_now();
        for c in mapper::coalesce(changes) {
            let timer = Arc::new(FanOutTimer::start(self.metrics.clone()));
            let _ = self.changes.send(Published {
                update: Arc::new(fanout.prepare(&st, c, now)),
                _fanout: timer,
            });
        }
    }

    fn fanout(&self) -> MutexGuard<'_, Fanout> {
        self.fanout.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The full map for `viewer` as of now (JSON, and the map without its peers), and the
    /// update sequence number it covers.
    fn full_map(&self, viewer: u64, now: i64) -> (Option<(Vec<u8>, MapResponse)>, u64) {
        let st = self.lock();
        let mut fanout = self.fanout();
        let view = mapper::PolicyView::new(&st);
        (fanout.full_map_json(&st, viewer, view.as_ref(), now), fanout.seq())
    }

    /// Installs the embedded DERP relay (once, at startup).
    pub fn set_derp(&self, d: Arc<crate::derp::server::DerpServer>) {
        let _ = self.derp.set(d);
    }

    /// Wakes Followup waiters after an interactive registration completed.
    pub fn registration_completed(&self) {
        self.registrations.send_modify(|g| *g += 1);
    }

    /// Runs periodic housekeeping (ephemeral GC, pending expiry) forever.
    pub async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(15));
        loop {
            tick.tick().await;
            let now = unix_now();
            let ch = {
                let mut st = self.lock();
                st.gc_pending(now);
                st.gc_ephemeral(now)
            };
            self.publish(ch);
        }
    }
}

/// Accepts connections on `listener`, with TLS when `tls` is given, each served on its own task.
/// Admission follows [`Coordinator::limits`]: over a cap the connection is refused (`503` with
/// `Retry-After` on plain HTTP) and counted; sessions already open are not touched.
pub async fn serve_http(coord: Arc<Coordinator>, listener: TcpListener, tls: Option<tls::Acceptor>) {
    loop {
        let (sock, peer, guard) = connlimit::accept(&listener, &coord.limits, tls.is_some(), "coordinator").await;
        let coord = coord.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _guard = guard;
            accept_conn(coord, sock, peer, tls).await;
        });
    }
}

/// One connection: TLS, the request head and the Noise handshake (with the HTTP/2 preface)
/// share one `handshake_timeout` budget from accept.
async fn accept_conn(coord: Arc<Coordinator>, tcp: TcpStream, peer: SocketAddr, tls: Option<tls::Acceptor>) {
    let budget = coord.limits.limits().handshake_timeout;
    let deadline = tokio::time::Instant::now() + budget;
    let Some(sock) = tls::accept(tls.as_ref(), tcp, budget, peer).await else {
        return;
    };
    handle_conn(coord, sock, peer, deadline).await;
}

async fn handle_conn(coord: Arc<Coordinator>, mut sock: Stream, peer: SocketAddr, deadline: tokio::time::Instant) {
    let head = tokio::time::timeout_at(deadline, http1::read_request_head(&mut sock)).await;
    let (head, leftover) = match head {
        Ok(Ok(x)) => x,
        // Closed before a whole head (some clients open a connection and close it unused):
        // nothing to report, not even at debug.
        Ok(Err(http1::HttpError::Closed)) => return,
        Ok(Err(e)) => {
            log::debug!("bad http request peer={peer} err={e}");
            let _ = http1::write_response(&mut sock, 400, "text/plain", e.bad_request_body().as_bytes()).await;
            return;
        }
        Err(_) => {
            coord.limits.note_timeout();
            log::debug!("request head timed out peer={peer}");
            return;
        }
    };
    let r = route(&coord, sock, &head, leftover, peer, deadline).await;
    if let Err(e) = r {
        log::debug!("connection ended peer={peer} path={} err={e}", head.path());
    }
}

fn json_bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec())
}

async fn route(
    coord: &Arc<Coordinator>,
    mut sock: Stream,
    head: &Head,
    leftover: Vec<u8>,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> std::io::Result<()> {
    if head.path() == "/ts2021" {
        return ts2021(coord, sock, head, leftover, peer, deadline).await;
    }
    if matches!(
        head.path(),
        "/derp" | "/derp/probe" | "/derp/latency-check" | "/generate_204"
    ) {
        if let Some(derp) = coord.derp.get() {
            derp.handle_http(sock, head, leftover, deadline).await;
            return Ok(());
        }
    }
    let sock = &mut sock;
    if head.path().starts_with("/api/v1/") || head.path() == "/api/v1" {
        return api_http(coord, sock, head, leftover, deadline).await;
    }
    match head.path() {
        "/key" => {
            if let Some(secs) = coord.rate_check(peer.ip(), Limited::Key) {
                return too_many_requests(sock, secs).await;
            }
            let v: Option<u32> = head.query("v").and_then(|v| v.parse().ok());
            match v {
                None => http1::write_response(sock, 400, "text/plain", b"missing or invalid v parameter\n").await,
                Some(_) => {
                    let body = json_bytes(&OverTlsPublicKeyResponse {
                        legacy_public_key: MachinePublic::default(),
                        public_key: coord.public_key(),
                    });
                    http1::write_response(sock, 200, "application/json", &body).await
                }
            }
        }
        "/health" => http1::write_response(sock, 200, "application/json", br#"{"status":"pass"}"#).await,
        // `OPTIONS *` (the parser lets `*` through for OPTIONS only): 200, as Go's server does.
        "*" => http1::write_response(sock, 200, "text/plain", b"").await,
        p if p.starts_with("/register/") => {
            let id = &p["/register/".len()..];
            let (status, body) = register_page(coord, id);
            http1::write_response(sock, status, "text/html; charset=utf-8", body.as_bytes()).await
        }
        "/" => {
            http1::write_response(
                sock,
                200,
                "text/plain",
                b"tinyscale coordinator: point a Tailscale client's login server here\n",
            )
            .await
        }
        _ => http1::write_response(sock, 404, "text/plain", b"not found\n").await,
    }
}

/// `/api/v1/…`: the body (at most [`http1::MAX_BODY`], read within the connection's
/// `deadline`), then `Authorization: Bearer <api key>`, then [`api::serve`]. A missing, unknown
/// or expired key gets one short generic 401 whatever the path.
async fn api_http(
    coord: &Coordinator,
    sock: &mut Stream,
    head: &Head,
    leftover: Vec<u8>,
    deadline: tokio::time::Instant,
) -> std::io::Result<()> {
    let json = "application/json";
    let body = match tokio::time::timeout_at(deadline, http1::read_body(sock, head, leftover)).await {
        Ok(Ok(b)) => b,
        Ok(Err(http1::HttpError::TooLarge)) => {
            return http1::write_response(sock, 413, "text/plain", b"request body too large\n").await
        }
        Ok(Err(e)) => return Err(std::io::Error::other(e.to_string())),
        Err(_) => {
            coord.limits.note_timeout();
            return Ok(());
        }
    };
    let now = unix_now();
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let token = head
        .header("authorization")
        .and_then(|a| a.split_once(' '))
        .and_then(|(scheme, t)| scheme.eq_ignore_ascii_case("bearer").then_some(t));
    let key = token.and_then(|t| coord.lock().check_api_key(t.trim(), now).ok().map(str::to_string));
    let Some(key) = key else {
        return http1::write_response(sock, 401, "text/plain", b"Unauthorized\n").await;
    };
    // As on the admin socket: answer once the request's writes are durable.
    let since = coord.lock().store().mark();
    let (mut status, mut out) = api::serve(coord, &head.method, &head.target, &body, &key, now);
    let durable = coord.lock().store().durable(since);
    if let Err(e) = durable.await {
        log::error!("api request not stored path={} err={e}", head.path());
        (status, out) = (500, api::error_body(13, "internal error"));
    }
    http1::write_response(sock, status, json, &out).await
}

/// A `429` with `Retry-After: secs` on plain HTTP/1 (the connection then closes).
async fn too_many_requests(sock: &mut Stream, secs: u64) -> std::io::Result<()> {
    let body = "too many requests from this address\n";
    let resp = format!(
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: {secs}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(resp.as_bytes()).await?;
    sock.flush().await
}

fn register_page(coord: &Coordinator, id: &str) -> (u16, String) {
    // Only ids we could have issued are echoed back (no markup injection).
    let valid =
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let st = coord.lock();
    let pending = valid.then(|| st.pending(id)).flatten();
    match pending {
        Some(p) => {
            let host = tailcfg::HostinfoView(&p.hostinfo).hostname().to_string();
            let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect();
            (
                200,
                format!(
                    "<!DOCTYPE html>\n<html><head><title>tinyscale: register {host}</title></head><body>\n\
                     <h1>Machine registration</h1>\n<p>The machine <b>{host}</b> asks to join the tailnet.</p>\n\
                     <p>Run this command on the coordinator to add it:</p>\n\
                     <pre>tinyscale server nodes register --user USERNAME --key {id}</pre>\n\
                     <p>(<code>headscale nodes register --user USERNAME --key {id}</code> works too.)</p>\n</body></html>\n"
                ),
            )
        }
        None => (404, "<!DOCTYPE html>\n<html><body><h1>Unknown or expired registration</h1>\n<p>Run <code>tinyscale up</code> again for a new link.</p></body></html>\n".into()),
    }
}

async fn ts2021(
    coord: &Arc<Coordinator>,
    mut sock: Stream,
    head: &Head,
    leftover: Vec<u8>,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
) -> std::io::Result<()> {
    // Charged before the handshake's X25519 work.
    if let Some(secs) = coord.rate_check(peer.ip(), Limited::Ts2021) {
        return too_many_requests(&mut sock, secs).await;
    }
    let upgrade_ok = head
        .header("upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case("tailscale-control-protocol"));
    let init = head.header("x-tailscale-handshake").and_then(http1::base64_decode);
    let (true, Some(init)) = (upgrade_ok, init) else {
        return http1::write_response(
            &mut sock,
            400,
            "text/plain",
            b"ts2021 needs Upgrade: tailscale-control-protocol and X-Tailscale-Handshake\n",
        )
        .await;
    };
    let accepted = match noise::respond(&coord.noise_key, &init, random32()) {
        Ok(a) => a,
        Err(e) => {
            log::debug!("noise handshake failed peer={peer} err={e}");
            return http1::write_response(
                &mut sock,
                400,
                "text/plain",
                format!("noise handshake failed: {e}\n").as_bytes(),
            )
            .await;
        }
    };
    let machine = accepted.peer;
    let version = accepted.version;
    let mut transport = accepted.transport;
    let mut out =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\r\n"
            .to_vec();
    out.extend_from_slice(&accepted.response);
    // Early payload: tiny (tailscale-rs accepts ≤ 1024 bytes); clients ignore the challenge.
    let challenge = format!("{{\"nodeKeyChallenge\":\"chalpub:{}\"}}", hex_encode(&random32()));
    if transport
        .seal(&noise::early_payload(challenge.as_bytes()), &mut out)
        .is_err()
    {
        return Ok(());
    }
    sock.write_all(&out).await?;
    sock.flush().await?;
    log::debug!(
        "noise session up peer={peer} machine={} capver={version}",
        machine.short()
    );
    let io = NoiseStream::new(sock, transport, leftover);
    serve_h2(coord.clone(), io, machine, peer.ip(), deadline).await;
    Ok(())
}

/// The HTTP/2 side of a Noise session from `machine` at `peer` (whose budget its registrations
/// are charged to): what `/ts2021` runs once the handshake is done, over the Noise stream.
/// Public (and generic over the byte stream) for the fuzz target, which drives it over an
/// in-memory pipe; the binary instantiates it once.
#[doc(hidden)]
pub async fn serve_h2<T>(
    coord: Arc<Coordinator>,
    io: T,
    machine: MachinePublic,
    peer: IpAddr,
    deadline: tokio::time::Instant,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = h2::server::Builder::new()
        .max_concurrent_streams(32)
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout_at(deadline, conn).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            log::debug!("h2 handshake failed machine={} err={e}", machine.short());
            return;
        }
        Err(_) => {
            coord.limits.note_timeout();
            log::debug!("h2 preface timed out machine={}", machine.short());
            return;
        }
    };
    while let Some(req) = conn.accept().await {
        match req {
            Ok((req, respond)) => {
                tokio::spawn(handle_noise_request(coord.clone(), machine, peer, req, respond));
            }
            Err(e) => {
                log::debug!("h2 connection error machine={} err={e}", machine.short());
                break;
            }
        }
    }
}

async fn read_h2_body(body: &mut h2::RecvStream) -> Result<Vec<u8>, u16> {
    let mut buf = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|_| 400u16)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > MAX_NOISE_BODY {
            return Err(413);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

fn respond_now(mut respond: h2::server::SendResponse<Bytes>, status: u16, body: Vec<u8>) {
    let mut resp = http::Response::new(());
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let ct = if body.first() == Some(&b'{') {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    if let Ok(v) = http::HeaderValue::from_str(ct) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    if let Ok(mut s) = respond.send_response(resp, body.is_empty()) {
        if !body.is_empty() {
            let _ = s.send_data(Bytes::from(body), true);
        }
    }
}

/// A `429` with `Retry-After: secs` inside the Noise HTTP/2 session (which stays up).
fn respond_too_many(mut respond: h2::server::SendResponse<Bytes>, secs: u64) {
    let mut resp = http::Response::new(());
    *resp.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
    resp.headers_mut().insert(http::header::RETRY_AFTER, secs.into());
    if let Ok(mut s) = respond.send_response(resp, false) {
        let _ = s.send_data(Bytes::from_static(b"too many requests from this address\n"), true);
    }
}

impl From<&CoordError> for u16 {
    fn from(e: &CoordError) -> u16 {
        match e {
            CoordError::NotFound(_) => 404,
            CoordError::Conflict(_) => 409,
            CoordError::Invalid(_) => 400,
            CoordError::Unauthorized(_) => 401,
            CoordError::Exhausted | CoordError::Store(_) => 500,
        }
    }
}

fn error_text(e: &CoordError) -> Vec<u8> {
    match e {
        // Internal details stay in the log.
        CoordError::Store(inner) => {
            log::error!("store failure err={inner}");
            b"internal error\n".to_vec()
        }
        e => format!("{e}\n").into_bytes(),
    }
}

async fn handle_noise_request(
    coord: Arc<Coordinator>,
    machine: MachinePublic,
    peer: IpAddr,
    req: http::Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
) {
    let path = req.uri().path().to_string();
    let mut body = req.into_body();
    let data = match read_h2_body(&mut body).await {
        Ok(d) => d,
        Err(status) => return respond_now(respond, status, b"request body too large or broken\n".to_vec()),
    };
    match path.as_str() {
        "/machine/register" => match coord.rate_check(peer, Limited::Register) {
            Some(secs) => respond_too_many(respond, secs),
            None => register(coord, machine, &data, respond).await,
        },
        "/machine/map" => map(coord, machine, &data, respond).await,
        p if p.starts_with("/machine/") => respond_now(respond, 501, b"not implemented\n".to_vec()),
        _ => respond_now(respond, 404, b"not found\n".to_vec()),
    }
}

async fn register(
    coord: Arc<Coordinator>,
    machine: MachinePublic,
    data: &[u8],
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let req: RegisterRequest = match tailcfg::from_slice_folded(data) {
        Ok(r) => r,
        Err(e) => {
            return respond_now(
                respond,
                400,
                format!("invalid RegisterRequest JSON: {e}\n").into_bytes(),
            )
        }
    };
    let mut waiter = coord.registrations.subscribe();
    loop {
        let now = unix_now();
        let (r, durable) = {
            let mut st = coord.lock();
            let since = st.store().mark();
            let r = st.register(machine, &req, now, || random_hex(12));
            // Covers every write queued so far, also an admin's approval of this machine.
            (r, st.store().durable(since))
        };
        match r {
            Ok((RegisterOutcome::Reply(resp), changes)) => {
                // A node told it is registered must still be registered after kill -9.
                // NOTE(store): the in-memory state is not rolled back when the disk fails here;
                // the client gets a 500 and the failure is logged at error level.
                if let Err(e) = durable.await {
                    return respond_now(respond, 500, error_text(&CoordError::Store(e)));
                }
                coord.metrics.note_registration(if resp.machine_authorized {
                    Registration::Success
                } else {
                    Registration::NeedsAuth
                });
                coord.publish(changes);
                return respond_now(respond, 200, json_bytes(&resp));
            }
            Ok((RegisterOutcome::Wait(id), _)) => {
                let expires = coord.lock().pending(&id).map_or(now, |p| p.expires);
                let left = Duration::from_secs(expires.saturating_sub(now).max(1) as u64);
                // Block until an admin approves, the entry expires, or the client goes away.
                tokio::select! {
                    r = waiter.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(left) => {}
                    // The client reset the stream (gave up or went away): stop waiting for it.
                    _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
                }
            }
            Err(e) => {
                log::info!("registration refused machine={} err={e}", machine.short());
                coord.metrics.note_registration(match e {
                    CoordError::Unauthorized(_) => Registration::Unauthorized,
                    _ => Registration::Error,
                });
                // Auth failures are reported in-band (200 + Error) as Go clients expect.
                let resp = tailcfg::RegisterResponse {
                    error: e.to_string(),
                    ..Default::default()
                };
                return match e {
                    CoordError::Unauthorized(_) => respond_now(respond, 200, json_bytes(&resp)),
                    e => respond_now(respond, u16::from(&e), error_text(&e)),
                };
            }
        }
    }
}

/// Frames one map message: u32 LE length + JSON (zstd-framed when asked).
pub fn frame_map_message(msg: &MapResponse, zstd: bool) -> Bytes {
    frame_map_json(json_bytes(msg), zstd)
}

/// [`frame_map_message`] for a message already serialised.
fn frame_map_json(json: Vec<u8>, zstd: bool) -> Bytes {
    let payload = if zstd { zstdframe::encode(&json) } else { json };
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    Bytes::from(out)
}

async fn map(
    coord: Arc<Coordinator>,
    machine: MachinePublic,
    data: &[u8],
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let req: MapRequest = match tailcfg::from_slice_folded(data) {
        Ok(r) => r,
        Err(e) => return respond_now(respond, 400, format!("invalid MapRequest JSON: {e}\n").into_bytes()),
    };
    let zstd = req.compress == "zstd";
    let now = unix_now();
    // Subscribe before applying, so no change between the full map and the loop is lost.
    let mut rx = coord.changes.subscribe();
    let applied = coord.lock().apply_map_request(machine, &req, now);
    let (id, mut changes) = match applied {
        Ok(x) => x,
        Err(e) => return respond_now(respond, u16::from(&e), error_text(&e)),
    };
    if !req.stream {
        coord.publish(changes);
        if req.omit_peers {
            return respond_now(respond, 200, Vec::new());
        }
        let msg = mapper::full_map(&coord.lock(), id, now);
        return match msg {
            Some(m) => respond_now(respond, 200, frame_map_message(&m, zstd).to_vec()),
            None => respond_now(respond, 404, b"node not found\n".to_vec()),
        };
    }

    let mut resp = http::Response::new(());
    *resp.status_mut() = http::StatusCode::OK;
    let mut send = match respond.send_response(resp, false) {
        Ok(s) => s,
        Err(_) => return coord.publish(changes),
    };
    let _stream = coord.metrics.stream_opened();
    // Published together: the endpoint patch and the online patch go out as one.
    changes.extend(coord.lock().session_start(id, now));
    coord.publish(changes);
    log::info!("map session started node={id}");
    let mut viewer = Viewer::new(id);
    let (first, seq) = coord.full_map(id, now);
    if let Some((json, m)) = first {
        viewer.sent_full(&m, seq);
        if send.send_data(frame_map_json(json, zstd), false).is_err() {
            end_session(&coord, id);
            return;
        }
    }
    let keepalive = frame_map_message(
        &MapResponse {
            keep_alive: true,
            ..Default::default()
        },
        zstd,
    );
    let mut last_write = tokio::time::Instant::now();
    let mut deadline = last_write + MAP_KEEPALIVE;
    loop {
        tokio::select! {
            u = rx.recv() => {
                let quiet = last_write.elapsed();
                if quiet < MIN_WRITE_GAP {
                    tokio::time::sleep(MIN_WRITE_GAP - quiet).await;
                }
                // Everything queued goes out in one write.
                let mut out = Vec::new();
                let mut next = Some(u);
                let mut taken = 0;
                let mut end = false;
                while let Some(u) = next.take() {
                    match u {
                        Ok(u) => match session_output(&coord, &mut viewer, &u, zstd) {
                            Some(o) => out.extend(o),
                            None => end = true,
                        },
                        // Fell behind: resynchronise with a full map (what came before is moot).
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            log::debug!("map session fell behind node={id} skipped={n}");
                            out.clear();
                            let (m, seq) = coord.full_map(id, unix_now());
                            match m {
                                Some((json, m)) => {
                                    viewer.sent_full(&m, seq);
                                    out.push(frame_map_json(json, zstd));
                                }
                                None => end = true,
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => end = true,
                    }
                    taken += 1;
                    if !end && taken < MAX_BATCH {
                        next = match rx.try_recv() {
                            Ok(u) => Some(Ok(u)),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(broadcast::error::RecvError::Lagged(n))),
                            Err(_) => None,
                        };
                    }
                }
                if end {
                    break;
                }
                let out = match out.len() {
                    0 => continue,
                    1 => out.pop().unwrap_or_default(),
                    _ => Bytes::from(out.concat()),
                };
                if send.send_data(out, false).is_err() {
                    break;
                }
                last_write = tokio::time::Instant::now();
                deadline = last_write + MAP_KEEPALIVE;
            }
            _ = tokio::time::sleep_until(deadline) => {
                if send.send_data(keepalive.clone(), false).is_err() { break; }
                deadline = tokio::time::Instant::now() + MAP_KEEPALIVE;
            }
            _ = poll_fn(|cx| send.poll_reset(cx)) => break,
        }
    }
    end_session(&coord, id);
}

/// The framed messages `viewer` gets for `u` (often none), or `None` to end the session.
fn session_output(coord: &Coordinator, viewer: &mut Viewer, u: &Update, zstd: bool) -> Option<Vec<Bytes>> {
    match viewer.action(u) {
        Action::None => Some(Vec::new()),
        Action::End => None,
        Action::Full(view) => {
            let st = coord.lock();
            let (json, m) = coord.fanout().full_map_json(&st, viewer.id, view, unix_now())?;
            drop(st);
            viewer.sent_full(&m, u.seq);
            Some(vec![frame_map_json(json, zstd)])
        }
        Action::Send { filter, msg } => {
            let mut out = Vec::with_capacity(2);
            if let Some(mut f) = filter {
                f.control_time = Some(tailcfg::format_time(unix_now()));
                out.push(frame_map_message(&f, zstd));
            }
            if let Some(m) = msg {
                out.push(m.framed(zstd, frame_map_message));
            }
            Some(out)
        }
    }
}

fn end_session(coord: &Coordinator, id: u64) {
    log::info!("map session ended node={id}");
    let ch = coord.lock().session_end(id, unix_now());
    coord.publish(ch);
}
