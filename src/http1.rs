//! A minimal HTTP/1.1 head parser and writer for the outer (pre-Noise) connection.
//!
//! The coordinator's public listener serves a handful of routes (`/key`, `/ts2021` upgrade,
//! `/register/<id>`, `/health`, later `/derp`), and the client makes two requests (`/key`, the
//! `/ts2021` upgrade). A full HTTP stack would cost hundreds of KiB on a router for that, so this
//! module parses just the request/status line, headers and a `Content-Length` body, with hard
//! limits. Everything after the head (upgraded protocols) is handed back to the caller untouched.
//!
//! [`parse_head`] and [`parse_url`] are pure; [`read_head`] and [`get`] (one-shot GET for DERP
//! maps, `list derp_url`) are the small async shells around them.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request/response head we accept (Go's default is 1 MiB; our heads are tiny).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest body we read on the outer listener.
pub const MAX_BODY: usize = 64 * 1024;

/// An `http://` or `https://` URL, split for dialling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https`.
    pub tls: bool,
    /// Host without brackets.
    pub host: String,
    /// Port (80/443 when the URL has none).
    pub port: u16,
    /// The URL named a port.
    pub explicit_port: bool,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Url {
    /// `Host` header value: the port only when the URL had one.
    pub fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.explicit_port {
            format!("{h}:{}", self.port)
        } else {
            h
        }
    }
}

/// Splits an `http(s)://host[:port][/path]` URL; the error says what is wrong.
pub fn parse_url(s: &str) -> Result<Url, &'static str> {
    let s = s.trim();
    let (rest, tls) = if let Some(r) = s.strip_prefix("http://") {
        (r, false)
    } else if let Some(r) = s.strip_prefix("https://") {
        (r, true)
    } else {
        return Err("expected http://host[:port] or https://host[:port]");
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let path = path.split('#').next().unwrap_or("");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or("unterminated [IPv6]")?;
        (h, p.strip_prefix(':').unwrap_or(""))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => (authority, ""),
        }
    };
    if host.is_empty() || host.contains('@') {
        return Err("missing host");
    }
    let explicit_port = !port.is_empty();
    let port = match (explicit_port, tls) {
        (true, _) => port.parse().map_err(|_| "invalid port")?,
        (false, true) => 443,
        (false, false) => 80,
    };
    Ok(Url {
        tls,
        host: host.to_string(),
        port,
        explicit_port,
        path: if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        },
    })
}

/// A parsed request or response head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    /// Request method, or empty for a response.
    pub method: String,
    /// Request target (path and query), or empty for a response.
    pub target: String,
    /// Response status, or 0 for a request.
    pub status: u16,
    /// Header (name, value) pairs in order; names as sent.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// First header value whose name matches case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// Value of query parameter `key`, undecoded.
    pub fn query(&self, key: &str) -> Option<&str> {
        let q = self.target.split_once('?')?.1;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then_some(v)
        })
    }

    /// `Content-Length`, if present and valid.
    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length").and_then(|v| v.trim().parse().ok())
    }
}

/// A head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("malformed HTTP head")]
    Malformed,
    #[error("HTTP head or body too large")]
    TooLarge,
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Parses a complete head (`buf` must contain the terminating blank line). Returns the head and
/// the number of bytes it used, or `Ok(None)` when more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err(HttpError::TooLarge)
        } else {
            Ok(None)
        };
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::Malformed)?;
    let mut lines = text.split("\r\n");
    let first = lines.next().ok_or(HttpError::Malformed)?;
    let mut head = Head::default();
    let mut parts = first.splitn(3, ' ');
    let (a, b) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if a.starts_with("HTTP/1.") {
        head.status = b.parse().map_err(|_| HttpError::Malformed)?;
    } else {
        let version = parts.next().unwrap_or("");
        if a.is_empty() || !b.starts_with('/') || !version.starts_with("HTTP/1.") {
            return Err(HttpError::Malformed);
        }
        head.method = a.to_string();
        head.target = b.to_string();
    }
    for line in lines {
        let (k, v) = line.split_once(':').ok_or(HttpError::Malformed)?;
        if k.is_empty() || k.contains(' ') {
            return Err(HttpError::Malformed);
        }
        head.headers.push((k.to_string(), v.trim().to_string()));
    }
    Ok(Some((head, end + 4)))
}

/// Reads one head from `io`. Bytes read past the head are returned as leftover.
pub async fn read_head<R: AsyncRead + Unpin>(io: &mut R) -> Result<(Head, Vec<u8>), HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some((head, used)) = parse_head(&buf)? {
            return Ok((head, buf.split_off(used)));
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads a `Content-Length` body (none → empty), starting with `leftover`.
pub async fn read_body<R: AsyncRead + Unpin>(
    io: &mut R,
    head: &Head,
    mut leftover: Vec<u8>,
) -> Result<Vec<u8>, HttpError> {
    let len = head.content_length().unwrap_or(0);
    if len > MAX_BODY {
        return Err(HttpError::TooLarge);
    }
    if leftover.len() < len {
        let have = leftover.len();
        leftover.resize(len, 0);
        io.read_exact(&mut leftover[have..]).await?;
    }
    leftover.truncate(len);
    Ok(leftover)
}

/// `GET url` over HTTP/1.0 (so the body ends at EOF, never chunked), TLS for `https://`.
/// Returns the body of a 200; other statuses, bodies over `limit` and slow servers are errors.
pub async fn get(url: &str, limit: usize, timeout: std::time::Duration) -> Result<Vec<u8>, String> {
    let u = parse_url(url).map_err(|e| format!("{url}: {e}"))?;
    let work = async {
        let addr = crate::tls::host_port(&u.host, u.port);
        let mut io = crate::tls::connect(&addr, &u.host, u.tls).await?;
        let req = format!(
            "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: tinyscale/{}\r\nAccept: application/json\r\n\r\n",
            u.path,
            u.host_header(),
            env!("CARGO_PKG_VERSION")
        );
        io.write_all(req.as_bytes()).await?;
        io.flush().await?;
        let (head, mut body) = read_head(&mut io).await.map_err(std::io::Error::other)?;
        let mut chunk = [0u8; 4096];
        loop {
            if body.len() > limit {
                return Err(std::io::Error::other(format!("body over {limit} bytes")));
            }
            match io.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
                // Servers that close TLS without close_notify: the length check below decides.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        if let Some(n) = head.content_length() {
            if body.len() < n {
                return Err(std::io::Error::other("body shorter than Content-Length"));
            }
            body.truncate(n);
        }
        Ok((head.status, body))
    };
    match tokio::time::timeout(timeout, work).await {
        Err(_) => Err(format!("{url}: timed out")),
        Ok(Err(e)) => Err(format!("{url}: {e}")),
        Ok(Ok((200, body))) => Ok(body),
        Ok(Ok((status, _))) => Err(format!("{url}: HTTP {status}")),
    }
}

/// Reason phrase for the statuses we send.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Writes a complete response with `Content-Length` and `Connection: close`.
pub async fn write_response<W: AsyncWrite + Unpin>(
    io: &mut W,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    io.write_all(&out).await?;
    io.flush().await
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (the `X-Tailscale-Handshake` header encoding).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` on any invalid character.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in s.as_bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    // 6 leftover bits mean a single dangling character: not valid base64.
    (bits < 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn urls_split_for_dialling() {
        let u = parse_url("https://controlplane.tailscale.com/derpmap/default").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str(), u.host_header()),
            (
                true,
                "controlplane.tailscale.com",
                443,
                "/derpmap/default",
                "controlplane.tailscale.com".into()
            )
        );
        let u = parse_url("http://[2001:db8::1]:8080?x=1#frag").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str(), u.host_header()),
            (false, "2001:db8::1", 8080, "/?x=1", "[2001:db8::1]:8080".into())
        );
        assert_eq!(parse_url("http://h").unwrap().port, 80);
        assert_eq!(parse_url("http://h").unwrap().path, "/");
        for (bad, why) in [
            ("ftp://h", "expected"),
            ("h:80", "expected"),
            ("http://", "missing host"),
            ("http://:80/", "missing host"),
            ("http://u@h/", "missing host"),
            ("http://h:x/", "invalid port"),
            ("http://h:99999/", "invalid port"),
            ("http://[::1/", "unterminated"),
        ] {
            assert!(parse_url(bad).unwrap_err().contains(why), "{bad}");
        }
    }

    #[test]
    fn parses_upgrade_request() {
        let raw = b"POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: AAAA\r\n\r\nrest";
        let (h, used) = parse_head(raw).unwrap().unwrap();
        assert_eq!(h.method, "POST");
        assert_eq!(h.path(), "/ts2021");
        assert_eq!(h.header("upgrade"), Some("tailscale-control-protocol"));
        assert_eq!(&raw[used..], b"rest");
    }

    #[test]
    fn parses_status_and_query() {
        let (h, _) = parse_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.status, 101);
        let (h, _) = parse_head(b"GET /key?v=130&x HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.query("v"), Some("130"));
        assert_eq!(h.query("x"), Some(""));
        assert_eq!(h.query("y"), None);
    }

    #[test]
    fn incomplete_malformed_and_oversize() {
        assert!(parse_head(b"GET / HTTP/1.1\r\n").unwrap().is_none());
        assert!(matches!(parse_head(b"GARBAGE\r\n\r\n"), Err(HttpError::Malformed)));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nnocolon\r\n\r\n"),
            Err(HttpError::Malformed)
        ));
        assert!(matches!(
            parse_head(&vec![b'a'; MAX_HEAD + 1]),
            Err(HttpError::TooLarge)
        ));
    }

    #[test]
    fn base64_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_decode("Zm9vYg==").unwrap(), b"foob");
        assert_eq!(base64_decode("Zm9vYg").unwrap(), b"foob");
        assert!(base64_decode("Zm9v!").is_none());
        assert!(base64_decode("Z").is_none());
    }

    proptest! {
        #[test]
        fn base64_roundtrip(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert_eq!(base64_decode(&base64_encode(&data)).unwrap(), data);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_head(&data);
            let mut d = data.clone();
            d.extend_from_slice(b"\r\n\r\n");
            let _ = parse_head(&d);
        }
    }
}
