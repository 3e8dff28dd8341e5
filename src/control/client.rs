//! Control client shell: `/key`, the `/ts2021` upgrade, HTTP/2 over Noise, register and the map
//! long-poll.
//!
//! Mirrors the roles of tailscale `control/controlclient/direct.go` and `control/ts2021/client.go`
//! (one attempt to the configured URL, like tailscale-rs). We send `Compress:""`, so map messages
//! arrive as plain JSON (spec §4.3). Errors say whether a retry may help ([`Error::is_retryable`]).

use std::time::Duration;

use bytes::Bytes;
use rand_core::{OsRng, RngCore};
use tokio::io::AsyncWriteExt;

use crate::{
    platform::tls::{self, Stream},
    wire::{
        http1,
        keys::{MachinePrivate, MachinePublic},
        noise::{self, stream::NoiseStream},
        tailcfg::{self, MapRequest, MapResponse, OverTlsPublicKeyResponse, RegisterRequest, RegisterResponse},
    },
};

/// Dial + handshake budget (Go: ~10 s end to end).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Go's map watchdog: no message for this long means the stream is dead.
pub const MAP_WATCHDOG: Duration = Duration::from_secs(120);
/// Largest single map message we accept.
pub const MAX_MAP_MESSAGE: usize = 32 << 20;

/// A control-plane failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the control server {url}: {err}")]
    Unreachable { url: String, err: std::io::Error },
    #[error("control server {0} timed out")]
    Timeout(String),
    #[error("unsupported login server URL {0:?}: {1}")]
    BadUrl(String, &'static str),
    #[error("control protocol error: {0}")]
    Protocol(String),
    #[error("control server answered {status}: {text}")]
    Status { status: u16, text: String },
    /// `429`, or `503` with `Retry-After`: the server asks us to come back later.
    #[error("control server is busy ({status}), retry after {}s", retry_after.as_secs())]
    Busy { status: u16, retry_after: Duration },
    #[error("{0}")]
    Rejected(String),
}

impl Error {
    /// True when reconnecting later may succeed (network trouble, server restarts).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout(_) | Error::Protocol(_) | Error::Busy { .. } => true,
            Error::Status { status, .. } => *status >= 500,
            Error::BadUrl(..) | Error::Rejected(_) => false,
        }
    }

    /// How long to wait before the next attempt: the caller's `backoff`, but never less than
    /// the server's `Retry-After` (itself capped at `cap`). Not just `Retry-After`: a session
    /// costs several requests (`/key`, `/ts2021`, register) and `Retry-After` only says when one
    /// is allowed again, so a growing backoff lets the budget refill instead of spending each
    /// new unit on a session that fails at its next step.
    pub fn retry_delay(&self, backoff: Duration, cap: Duration) -> Duration {
        match self {
            Error::Busy { retry_after, .. } => backoff.max((*retry_after).min(cap)),
            _ => backoff,
        }
    }

    /// The error for a non-success `status` with the response's `Retry-After` (delay-seconds
    /// form; an HTTP date counts as absent) and body text.
    fn from_status(status: u16, retry_after: Option<&str>, text: &[u8]) -> Error {
        let secs = retry_after.and_then(|v| v.trim().parse::<u64>().ok());
        match (status, secs) {
            (429, _) | (503, Some(_)) => Error::Busy {
                status,
                retry_after: Duration::from_secs(secs.unwrap_or(1)),
            },
            _ => Error::Status {
                status,
                text: String::from_utf8_lossy(text).trim().to_string(),
            },
        }
    }
}

/// A parsed `http(s)://host[:port]` control URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlUrl {
    /// Original text without trailing slash.
    pub url: String,
    /// Host (no brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// `https://`: TLS around `/key` and `/ts2021`.
    pub tls: bool,
    /// `Host` header / `:authority` (the port only when the URL had one).
    host_header: String,
}

impl ControlUrl {
    /// Parses a login server URL: `http://` or `https://`, host, optional port, and an ignored
    /// path. `https://` needs a build with the `tls` feature.
    pub fn parse(s: &str) -> Result<ControlUrl, Error> {
        let s = s.trim().trim_end_matches('/');
        let u = http1::parse_url(s).map_err(|why| Error::BadUrl(s.into(), why))?;
        if u.tls && !cfg!(feature = "tls") {
            return Err(Error::BadUrl(
                s.into(),
                "this build has no TLS (cargo feature `tls`); use http:// (Noise encrypts control traffic end to end)",
            ));
        }
        Ok(ControlUrl {
            url: s.to_string(),
            host_header: u.host_header(),
            host: u.host,
            port: u.port,
            tls: u.tls,
        })
    }

    /// `host:port` to dial.
    fn authority(&self) -> String {
        tls::host_port(&self.host, self.port)
    }

    /// The `Host` header / `:authority`.
    fn host_header(&self) -> String {
        self.host_header.clone()
    }

    /// Writes `req` and flushes it (TLS holds bytes back until then).
    async fn send(&self, s: &mut Stream, req: &str) -> Result<(), Error> {
        let sent = async {
            s.write_all(req.as_bytes()).await?;
            s.flush().await
        };
        sent.await.map_err(|err| Error::Unreachable {
            url: self.url.clone(),
            err,
        })
    }

    async fn dial(&self) -> Result<Stream, Error> {
        let addr = self.authority();
        let fut = tls::connect(&addr, &self.host, self.tls);
        match tokio::time::timeout(DIAL_TIMEOUT, fut).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(err)) => Err(Error::Unreachable {
                url: self.url.clone(),
                err,
            }),
            Err(_) => Err(Error::Timeout(self.url.clone())),
        }
    }
}

/// `GET /key?v=<capver>`: the server's Noise public key.
pub async fn fetch_server_key(url: &ControlUrl) -> Result<MachinePublic, Error> {
    let fut = async {
        let mut s = url.dial().await?;
        let req = format!(
            "GET /key?v={} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            tailcfg::CURRENT_CAPABILITY_VERSION,
            url.host_header()
        );
        url.send(&mut s, &req).await?;
        let (head, left) = http1::read_head(&mut s)
            .await
            .map_err(|e| Error::Protocol(format!("/key: {e}")))?;
        let body = http1::read_body(&mut s, &head, left)
            .await
            .map_err(|e| Error::Protocol(format!("/key body: {e}")))?;
        if head.status != 200 {
            return Err(Error::from_status(head.status, head.header("retry-after"), &body));
        }
        let k: OverTlsPublicKeyResponse = serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("/key is not a Tailscale control server: {e}")))?;
        if k.public_key.is_zero() {
            return Err(Error::Protocol("control server is too old; no noise key".into()));
        }
        Ok(k.public_key)
    };
    tokio::time::timeout(DIAL_TIMEOUT, fut)
        .await
        .map_err(|_| Error::Timeout(url.url.clone()))?
}

/// An established Noise + HTTP/2 control connection.
pub struct ControlConn {
    url: ControlUrl,
    h2: h2::client::SendRequest<Bytes>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for ControlConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Dials `/ts2021` and completes Noise IK as `machine`.
pub async fn connect(url: &ControlUrl, machine: &MachinePrivate, server: &MachinePublic) -> Result<ControlConn, Error> {
    let fut = async {
        let mut s = url.dial().await?;
        let mut eph = [0u8; 32];
        OsRng.fill_bytes(&mut eph);
        let (init_state, init) = noise::initiate(machine, server, tailcfg::CURRENT_CAPABILITY_VERSION as u16, eph);
        let req = format!(
            "POST /ts2021 HTTP/1.1\r\nHost: {}\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {}\r\nContent-Length: 0\r\n\r\n",
            url.host_header(),
            http1::base64_encode(&init)
        );
        url.send(&mut s, &req).await?;
        let (head, mut left) = http1::read_head(&mut s)
            .await
            .map_err(|e| Error::Protocol(format!("/ts2021: {e}")))?;
        if head.status != 101 {
            let body = http1::read_body(&mut s, &head, left).await.unwrap_or_default();
            return Err(Error::from_status(head.status, head.header("retry-after"), &body));
        }
        let msg = noise::stream::read_response_message(&mut s, &mut left)
            .await
            .map_err(|e| Error::Protocol(format!("noise response: {e}")))?;
        let transport = init_state
            .finish(&msg)
            .map_err(|e| Error::Protocol(format!("noise handshake: {e}")))?;
        let mut io = NoiseStream::new(s, transport, left);
        io.strip_early_payload()
            .await
            .map_err(|e| Error::Protocol(format!("early payload: {e}")))?;
        let (h2, conn) = h2::client::handshake(io)
            .await
            .map_err(|e| Error::Protocol(format!("http/2: {e}")))?;
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("control connection closed err={e}");
            }
        });
        Ok(ControlConn {
            url: url.clone(),
            h2,
            driver,
        })
    };
    tokio::time::timeout(DIAL_TIMEOUT * 2, fut)
        .await
        .map_err(|_| Error::Timeout(url.url.clone()))?
}

/// A streaming map response.
pub struct MapStream {
    body: h2::RecvStream,
    buf: Vec<u8>,
}

/// Takes the next complete map message's JSON off the front of `buf` (a 4-byte little-endian
/// length, then JSON or a zstd frame of JSON); `Ok(None)` while it is incomplete.
pub fn next_map_json(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, Error> {
    let Some(head) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(*head) as usize;
    if len > MAX_MAP_MESSAGE {
        return Err(Error::Protocol(format!("map message of {len} bytes is too large")));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let mut msg: Vec<u8> = buf.drain(..4 + len).skip(4).collect();
    // A full map can be megabytes: do not keep its room for the keep-alives.
    if buf.is_empty() && buf.capacity() > 64 << 10 {
        *buf = Vec::new();
    }
    // Only if we asked for zstd; raw-block frames decode without a decompressor.
    if msg.starts_with(&crate::wire::zstdframe::MAGIC) {
        msg = crate::wire::zstdframe::decode(&msg, MAX_MAP_MESSAGE)
            .map_err(|e| Error::Protocol(format!("map message: {e}")))?;
    }
    Ok(Some(msg))
}

/// [`next_map_json`], parsed.
pub fn next_map_message(buf: &mut Vec<u8>) -> Result<Option<MapResponse>, Error> {
    let Some(msg) = next_map_json(buf)? else {
        return Ok(None);
    };
    serde_json::from_slice(&msg)
        .map(Some)
        .map_err(|e| Error::Protocol(format!("map message: {e}")))
}

impl MapStream {
    /// The next message, `Ok(None)` at end of stream. Fails after [`MAP_WATCHDOG`] of silence.
    pub async fn next(&mut self) -> Result<Option<MapResponse>, Error> {
        match self.next_json().await? {
            Some(msg) => serde_json::from_slice(&msg)
                .map(Some)
                .map_err(|e| Error::Protocol(format!("map message: {e}"))),
            None => Ok(None),
        }
    }

    /// The next message's JSON, unparsed (as [`MapStream::next`]).
    pub async fn next_json(&mut self) -> Result<Option<Vec<u8>>, Error> {
        loop {
            if let Some(m) = next_map_json(&mut self.buf)? {
                return Ok(Some(m));
            }
            let chunk = tokio::time::timeout(MAP_WATCHDOG, self.body.data())
                .await
                .map_err(|_| Error::Protocol("no map message for 120 s".into()))?;
            match chunk {
                None => return Ok(None),
                Some(Err(e)) => return Err(Error::Protocol(format!("map stream: {e}"))),
                Some(Ok(c)) => {
                    let _ = self.body.flow_control().release_capacity(c.len());
                    self.buf.extend_from_slice(&c);
                }
            }
        }
    }
}

impl ControlConn {
    async fn post(&mut self, path: &str, body: Vec<u8>) -> Result<h2::RecvStream, Error> {
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("https://{}{path}", self.url.host_header()))
            .header("content-type", "application/json")
            .body(())
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let mut h2 = self
            .h2
            .clone()
            .ready()
            .await
            .map_err(|e| Error::Protocol(format!("http/2: {e}")))?;
        let (resp, mut send) = h2
            .send_request(req, false)
            .map_err(|e| Error::Protocol(format!("http/2: {e}")))?;
        send.send_data(Bytes::from(body), true)
            .map_err(|e| Error::Protocol(format!("http/2: {e}")))?;
        let resp = resp.await.map_err(|e| Error::Protocol(format!("http/2: {e}")))?;
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get(http::header::RETRY_AFTER).cloned();
        let mut body = resp.into_body();
        if status != 200 {
            let text = read_all(&mut body, 64 * 1024).await.unwrap_or_default();
            let retry_after = retry_after.as_ref().and_then(|v| v.to_str().ok());
            return Err(Error::from_status(status, retry_after, &text));
        }
        Ok(body)
    }

    /// Posts raw bytes to `path` inside Noise and returns the response body (tools, tests).
    pub async fn post_bytes(&mut self, path: &str, body: Vec<u8>) -> Result<Vec<u8>, Error> {
        let mut r = self.post(path, body).await?;
        read_all(&mut r, 1 << 20).await
    }

    /// `POST /machine/register`.
    pub async fn register(&mut self, req: &RegisterRequest) -> Result<RegisterResponse, Error> {
        let body = serde_json::to_vec(req).map_err(|e| Error::Protocol(e.to_string()))?;
        let mut resp = self.post("/machine/register", body).await?;
        let data = read_all(&mut resp, 1 << 20).await?;
        serde_json::from_slice(&data).map_err(|e| Error::Protocol(format!("RegisterResponse: {e}")))
    }

    /// `POST /machine/map` with `Stream:true`.
    pub async fn map_stream(&mut self, req: &MapRequest) -> Result<MapStream, Error> {
        let body = serde_json::to_vec(req).map_err(|e| Error::Protocol(e.to_string()))?;
        let resp = self.post("/machine/map", body).await?;
        Ok(MapStream {
            body: resp,
            buf: Vec::new(),
        })
    }

    /// A lite update (`Stream:false, OmitPeers:true`): endpoints/hostinfo changes.
    pub async fn map_lite(&mut self, req: &MapRequest) -> Result<(), Error> {
        let body = serde_json::to_vec(req).map_err(|e| Error::Protocol(e.to_string()))?;
        let mut resp = self.post("/machine/map", body).await?;
        read_all(&mut resp, 1 << 20).await.map(|_| ())
    }
}

async fn read_all(body: &mut h2::RecvStream, limit: usize) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    while let Some(c) = body.data().await {
        let c = c.map_err(|e| Error::Protocol(format!("http/2 body: {e}")))?;
        let _ = body.flow_control().release_capacity(c.len());
        if out.len() + c.len() > limit {
            return Err(Error::Protocol("response too large".into()));
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_messages_are_split_from_the_stream() {
        let framed = |body: &[u8]| {
            let mut v = (body.len() as u32).to_le_bytes().to_vec();
            v.extend_from_slice(body);
            v
        };
        let mut buf = framed(br#"{"KeepAlive":true}"#);
        buf.extend(framed(&crate::wire::zstdframe::encode(br#"{"Domain":"ts.example"}"#)));
        let second_len = buf.len();
        buf.truncate(second_len - 3);
        let m = next_map_message(&mut buf).unwrap().expect("first message is complete");
        assert!(m.keep_alive);
        // The second is three bytes short: nothing yet, nothing consumed.
        let before = buf.len();
        assert!(next_map_message(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), before);
        let mut full = framed(&crate::wire::zstdframe::encode(br#"{"Domain":"ts.example"}"#));
        full.extend(framed(b"{"));
        buf = full;
        assert_eq!(
            next_map_message(&mut buf).unwrap().unwrap().domain.as_deref(),
            Some("ts.example")
        );
        assert!(matches!(next_map_message(&mut buf), Err(Error::Protocol(e)) if e.contains("map message")));
        let mut huge = ((MAX_MAP_MESSAGE + 1) as u32).to_le_bytes().to_vec();
        assert!(matches!(next_map_message(&mut huge), Err(Error::Protocol(e)) if e.contains("too large")));
        assert!(next_map_message(&mut vec![1, 0]).unwrap().is_none());
    }

    #[test]
    fn busy_answers_are_retried_after_their_retry_after_capped() {
        let cap = Duration::from_secs(30);
        let backoff = Duration::from_secs(2);
        let e = Error::from_status(429, Some(" 7"), b"slow down");
        assert!(matches!(e, Error::Busy { status: 429, .. }) && e.is_retryable());
        assert_eq!(e.retry_delay(backoff, cap), Duration::from_secs(7));
        assert_eq!(e.retry_delay(Duration::from_secs(16), cap), Duration::from_secs(16));
        assert_eq!(
            Error::from_status(429, Some("3600"), b"").retry_delay(backoff, cap),
            cap
        );
        // Without a usable Retry-After a 429 waits a second, or the backoff if longer.
        let date = Error::from_status(429, Some("Wed, 21 Oct 2026 07:28:00 GMT"), b"");
        assert!(matches!(date, Error::Busy { retry_after, .. } if retry_after == Duration::from_secs(1)));
        assert_eq!(date.retry_delay(backoff, cap), backoff);
        // The connection caps' 503 carries Retry-After too; a bare 503 keeps the backoff.
        let busy = Error::from_status(503, Some("5"), b"too busy");
        assert_eq!(busy.retry_delay(backoff, cap), Duration::from_secs(5));
        let bare = Error::from_status(503, None, b"down");
        assert!(matches!(&bare, Error::Status { status: 503, text } if text == "down"));
        assert!(bare.is_retryable());
        assert_eq!(bare.retry_delay(backoff, cap), backoff);
        let denied = Error::from_status(403, Some("5"), b"no");
        assert!(!denied.is_retryable());
    }

    #[test]
    fn control_url_parsing() {
        let u = ControlUrl::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.url.as_str()),
            ("127.0.0.1", 8080, "http://127.0.0.1:8080")
        );
        assert_eq!(ControlUrl::parse("http://example.com").unwrap().port, 80);
        let v6 = ControlUrl::parse("http://[::1]:9").unwrap();
        assert_eq!((v6.host.as_str(), v6.authority()), ("::1", "[::1]:9".to_string()));
        assert!(matches!(ControlUrl::parse("ftp://x"), Err(Error::BadUrl(..))));
        let s = ControlUrl::parse("https://example.com");
        if cfg!(feature = "tls") {
            let s = s.unwrap();
            assert_eq!((s.port, s.tls, s.host_header()), (443, true, "example.com".to_string()));
            let p = ControlUrl::parse("https://example.com:8443/x").unwrap();
            assert_eq!(
                (p.port, p.authority(), p.host_header()),
                (8443, "example.com:8443".into(), "example.com:8443".into())
            );
        } else {
            assert!(matches!(s, Err(Error::BadUrl(..))));
        }
        let h = ControlUrl::parse("http://example.com").unwrap();
        assert_eq!(
            (h.tls, h.host_header(), h.authority()),
            (false, "example.com".into(), "example.com:80".into())
        );
        assert!(matches!(ControlUrl::parse("http://:80"), Err(Error::BadUrl(..))));
        assert!(matches!(ControlUrl::parse("http://x:notaport"), Err(Error::BadUrl(..))));
    }
}
