//! A minimal HTTP/1.1 head parser and writer for the outer (pre-Noise) connection.
//!
//! The coordinator's public listener serves a handful of routes (`/key`, the `/ts2021` upgrade,
//! `/register/<id>`, `/health`, the embedded relay's `/derp` upgrade and probes), and the client
//! makes a few requests (`/key`, the `/ts2021` and `/derp` upgrades, DERP map fetches). A full HTTP stack would cost hundreds of KiB on a router for that, so this
//! module parses just the request/status line, headers and a `Content-Length` body, with hard
//! limits. Everything after the head (upgraded protocols) is handed back to the caller untouched.
//!
//! Request targets (RFC 9112 §3.2) come in four forms; [`parse_head`] hands routing the
//! origin-form whatever the client sent:
//!
//! ```text
//! origin-form     GET /key?v=130 HTTP/1.1                      kept as sent
//! absolute-form   GET http://127.0.0.1:18280/key?v=130 HTTP/1.1 -> /key?v=130 (Host is ignored)
//! asterisk-form   OPTIONS * HTTP/1.1                           kept, only for OPTIONS
//! authority-form  CONNECT 127.0.0.1:443 HTTP/1.1               400: we serve no CONNECT
//! ```
//!
//! A server MUST accept absolute-form (§3.2.2) and some Tailscale clients send it. Like Go's
//! `net/http` server, routing looks only at the path: the authority is checked for syntax, then
//! dropped, and percent-encoding is left as sent.
//!
//! [`parse_head`], [`origin_form`] and [`parse_url`] are pure; [`read_head`] and [`get`] (one-shot
//! GET for DERP maps, `list derp_url`) are the small async shells around them.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request/response head we accept (Go's default is 1 MiB; our heads are tiny).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request head our listeners accept: a ts2021 or DERP upgrade is under 1 KiB, a
/// browser opening a registration page a few KiB with cookies.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
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
    /// Request target in origin-form (path and query, or `*` for OPTIONS) even when the client
    /// sent absolute-form; empty for a response.
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
    /// The request target is in no form we serve; the text says which rule it broke.
    #[error("bad request target: {0}")]
    BadTarget(&'static str),
    #[error("HTTP head or body too large")]
    TooLarge,
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl HttpError {
    /// The body of the `400` a server answers with: what the client got wrong, nothing internal.
    pub fn bad_request_body(&self) -> String {
        match self {
            HttpError::BadTarget(why) => format!("bad request: {why}\n"),
            HttpError::TooLarge => "bad request: head too large\n".into(),
            _ => "bad request\n".into(),
        }
    }
}

/// The origin-form of a request target for routing (RFC 9112 §3.2): `/path?query`, or `*` for
/// a server-wide OPTIONS. The error says which rule the target broke.
///
/// - origin-form (`/…`) is returned untouched.
/// - absolute-form (`http://` or `https://`, any case) loses scheme and authority; the rest is
///   kept byte for byte. An empty path becomes `/`, except for an OPTIONS without a query, which
///   becomes `*`: §3.2.4 makes a proxy forward exactly that request as asterisk-form (Go's
///   server routes it as `/` instead).
/// - asterisk-form (`*`) is only valid for OPTIONS (Go's `ServeMux` answers other methods 400).
/// - authority-form (`host:port`) is only valid for CONNECT, which no listener of ours serves.
///
/// The authority must be well formed, not just present: RFC 9110 §4.2.1 says to reject an
/// empty host, and §4.2.4 to treat userinfo (`user@`) as an error, since its use is to disguise
/// the real host. Go's `url.ParseRequestURI` is more lenient on userinfo and scheme; no
/// Tailscale client needs either.
pub fn origin_form(method: &str, target: &str) -> Result<String, &'static str> {
    if target.starts_with('/') {
        return Ok(target.to_string());
    }
    if target == "*" {
        return match method {
            "OPTIONS" => Ok(target.to_string()),
            _ => Err("asterisk-form (*) is only valid for OPTIONS"),
        };
    }
    if let Some((scheme, rest)) = target.split_once("://").filter(|(s, _)| is_scheme(s)) {
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Err("absolute-form target must be http:// or https://");
        }
        let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        split_authority(authority)?;
        return Ok(match path {
            "" if method == "OPTIONS" => "*".to_string(),
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        });
    }
    match split_authority(target) {
        Ok((_, Some(_))) => Err("authority-form (host:port) is only valid for CONNECT, which is not served"),
        _ => Err("request target must be /path or http://host/path"),
    }
}

/// RFC 3986 `scheme`: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
}

/// Splits an RFC 3986 `authority` without userinfo into host and optional port (`host:` gives
/// an empty port, as the grammar allows). IP literals must be IPv6, with an optional RFC 6874
/// zone (`[fe80::1%25eth0]`); other hosts are reg-names (IPv4 is one).
fn split_authority(a: &str) -> Result<(&str, Option<&str>), &'static str> {
    if a.contains('@') {
        return Err("userinfo (user@) is not allowed in a request target");
    }
    let (host, port) = if let Some(v6) = a.strip_prefix('[') {
        let (lit, after) = v6.split_once(']').ok_or("unterminated IPv6 literal")?;
        let (addr, zone) = match lit.split_once("%25") {
            Some((addr, zone)) => (addr, Some(zone)),
            None => (lit, None),
        };
        let zone_ok = zone.is_none_or(|z| !z.is_empty() && reg_name_chars(z, false));
        if addr.parse::<std::net::Ipv6Addr>().is_err() || !zone_ok {
            return Err("invalid IPv6 literal");
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("invalid port")?),
        };
        // The host keeps its brackets: `[` + literal + `]`.
        (&a[..lit.len() + 2], port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    if host.is_empty() {
        return Err("request target has no host");
    }
    if !host.starts_with('[') && !reg_name_chars(host, true) {
        return Err("invalid host");
    }
    if port.is_some_and(|p| !p.bytes().all(|b| b.is_ascii_digit())) {
        return Err("invalid port");
    }
    Ok((host, port))
}

/// `s` is unreserved characters and `%HH` escapes, plus sub-delims when `sub_delims`.
fn reg_name_chars(s: &str, sub_delims: bool) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            if !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit) && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += 3;
            continue;
        }
        let ok = c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'~')
            || (sub_delims
                && matches!(
                    c,
                    b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
                ));
        if !ok {
            return false;
        }
        i += 1;
    }
    true
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
        if a.is_empty() || !version.starts_with("HTTP/1.") {
            return Err(HttpError::Malformed);
        }
        head.target = origin_form(a, b).map_err(HttpError::BadTarget)?;
        head.method = a.to_string();
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
    read_head_max(io, MAX_HEAD).await
}

/// [`read_head`] for a listener: a head longer than [`MAX_REQUEST_HEAD`] is `TooLarge`.
pub async fn read_request_head<R: AsyncRead + Unpin>(io: &mut R) -> Result<(Head, Vec<u8>), HttpError> {
    read_head_max(io, MAX_REQUEST_HEAD).await
}

async fn read_head_max<R: AsyncRead + Unpin>(io: &mut R, max: usize) -> Result<(Head, Vec<u8>), HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some((head, used)) = parse_head(&buf)? {
            if used > max {
                return Err(HttpError::TooLarge);
            }
            return Ok((head, buf.split_off(used)));
        }
        if buf.len() > max {
            return Err(HttpError::TooLarge);
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
        let addr = crate::platform::tls::host_port(&u.host, u.port);
        let mut io = crate::platform::tls::connect(&addr, &u.host, u.tls).await?;
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
    fn absolute_form_is_routed_by_its_path() {
        // What an independent Tailscale client sends for the server key.
        let raw = b"GET http://127.0.0.1:18280/key?v=130 HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n";
        let (h, used) = parse_head(raw).unwrap().unwrap();
        assert_eq!((h.method.as_str(), h.target.as_str()), ("GET", "/key?v=130"));
        assert_eq!((h.path(), h.query("v")), ("/key", Some("130")));
        assert_eq!(used, raw.len());
        let (h, _) = parse_head(b"OPTIONS * HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.target, "*");
        for bad in [
            &b"GET * HTTP/1.1\r\n\r\n"[..],
            b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n",
            b"GET key HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad), Err(HttpError::BadTarget(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let e = parse_head(b"GET * HTTP/1.1\r\n\r\n").unwrap_err();
        assert_eq!(
            e.bad_request_body(),
            "bad request: asterisk-form (*) is only valid for OPTIONS\n"
        );
        assert_eq!(HttpError::Malformed.bad_request_body(), "bad request\n");
    }

    #[test]
    fn request_target_forms() {
        for (method, target, want) in [
            // origin-form, untouched
            ("GET", "/key?v=130", "/key?v=130"),
            ("GET", "/", "/"),
            ("GET", "/a%2Fb%20c?q=%3D&r=a+b", "/a%2Fb%20c?q=%3D&r=a+b"),
            // absolute-form, with and without port, any scheme case
            ("GET", "http://127.0.0.1:18280/key?v=130", "/key?v=130"),
            ("GET", "http://127.0.0.1/key", "/key"),
            ("POST", "HTTPS://Coord.Example:443/ts2021", "/ts2021"),
            ("GET", "hTTp://localhost:80/derp/probe", "/derp/probe"),
            ("GET", "http://h:/generate_204", "/generate_204"),
            // IPv6 literals, with a zone
            ("GET", "http://[::1]:18280/derp", "/derp"),
            ("GET", "https://[2001:db8::1]/health", "/health"),
            ("GET", "http://[fe80::1%25eth0]:80/derp", "/derp"),
            ("GET", "http://[::ffff:192.0.2.1]/", "/"),
            // empty path
            ("GET", "http://example.com", "/"),
            ("HEAD", "http://example.com:8080", "/"),
            ("GET", "http://example.com?v=130", "/?v=130"),
            ("OPTIONS", "http://example.com", "*"),
            ("OPTIONS", "http://example.com/", "/"),
            ("OPTIONS", "http://example.com?x", "/?x"),
            ("OPTIONS", "*", "*"),
            // percent-encoding and odd paths stay as sent
            ("GET", "http://h/a%2Fb%20c?q=%3D&r=a+b", "/a%2Fb%20c?q=%3D&r=a+b"),
            ("GET", "http://h//double/./dot/../", "//double/./dot/../"),
            ("GET", "http://h/p?next=http://x/y", "/p?next=http://x/y"),
            ("GET", "http://h/k@y", "/k@y"), // an @ after the authority is no userinfo
            ("GET", "http://%68ost.example/p", "/p"),
            ("GET", "http://a-b_c~d.!$&'()*+,;=/p", "/p"),
        ] {
            assert_eq!(origin_form(method, target).as_deref(), Ok(want), "{method} {target}");
        }
        for (method, target, why) in [
            ("GET", "*", "only valid for OPTIONS"),
            ("POST", "*", "only valid for OPTIONS"),
            ("CONNECT", "127.0.0.1:443", "only valid for CONNECT"),
            ("GET", "example.com:80", "only valid for CONNECT"),
            ("GET", "[::1]:443", "only valid for CONNECT"),
            ("GET", "http://user:pw@h/key", "userinfo"),
            ("GET", "http://user@h:80/key", "userinfo"),
            ("GET", "http://@h/key", "userinfo"),
            ("GET", "http:///key", "no host"),
            ("GET", "http://:80/key", "no host"),
            ("GET", "http://?v=1", "no host"),
            ("GET", "https://", "no host"),
            ("GET", "ftp://h/key", "http:// or https://"),
            ("GET", "ws://h/derp", "http:// or https://"),
            ("GET", "http://h:8o/", "invalid port"),
            ("GET", "http://h:-1/", "invalid port"),
            ("GET", "http://[::1]x/", "invalid port"),
            ("GET", "http://[::1/", "unterminated"),
            ("GET", "http://[zz::1]/", "IPv6"),
            ("GET", "http://[127.0.0.1]/", "IPv6"),
            ("GET", "http://[fe80::1%eth0]/", "IPv6"),
            ("GET", "http://[fe80::1%25]/", "IPv6"),
            ("GET", "http://[v1.x]/", "IPv6"),
            ("GET", "http://a:b:80/", "invalid host"),
            ("GET", "http://h#frag", "invalid host"),
            ("GET", "http://h%zz/", "invalid host"),
            ("GET", "http://h%4/", "invalid host"),
            ("GET", "http://h\u{e9}/", "invalid host"),
            ("GET", "http://h\\x/", "invalid host"),
            ("GET", "key", "must be /path"),
            ("GET", "", "must be /path"),
            ("GET", "http:/key", "must be /path"),
            ("GET", "?v=1", "must be /path"),
            ("GET", "1http://h/", "must be /path"),
            ("GET", "example.com", "must be /path"),
        ] {
            let e = origin_form(method, target).unwrap_err();
            assert!(e.contains(why), "{method} {target}: {e}");
        }
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

        /// Absolute-form routes exactly like the origin-form it names, whatever the authority.
        #[test]
        fn absolute_form_routes_like_origin_form(
            scheme in prop::sample::select(vec!["http", "https", "HTTP", "Https", "hTtP"]),
            host in prop_oneof![
                "[a-z0-9-]{1,10}(\\.[a-z0-9-]{1,10}){0,3}",
                any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
                any::<std::net::Ipv6Addr>().prop_map(|a| format!("[{a}]")),
            ],
            port in proptest::option::of(any::<u16>()),
            pq in "(/[a-zA-Z0-9%._~!$&'()*+,;=:@-]{0,8}){0,4}(\\?[a-zA-Z0-9%=&/?:+-]{0,16})?",
            method in prop::sample::select(vec!["GET", "POST", "HEAD", "OPTIONS"]),
        ) {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let abs = format!("{scheme}://{host}{port}{pq}");
            let want = match pq.as_str() {
                "" if method == "OPTIONS" => "*".to_string(),
                "" => "/".to_string(),
                p if p.starts_with('?') => format!("/{p}"),
                p => p.to_string(),
            };
            prop_assert_eq!(origin_form(method, &abs), Ok(want.clone()));
            let raw = format!("{method} {abs} HTTP/1.1\r\nHost: elsewhere\r\n\r\n");
            let (h, _) = parse_head(raw.as_bytes()).unwrap().unwrap();
            prop_assert_eq!(h.target, want);
        }

        /// Origin-form is never rewritten.
        #[test]
        fn origin_form_is_untouched(t in "/[!-~]{0,40}") {
            prop_assert_eq!(origin_form("GET", &t), Ok(t.clone()));
        }

        /// Whatever the target, routing gets origin-form (or `*` for OPTIONS) or an error.
        #[test]
        fn any_target_yields_origin_form_or_an_error(
            method in prop::sample::select(vec!["GET", "OPTIONS", "CONNECT"]),
            t in prop_oneof!["\\PC{0,40}", "[hH][tT][tT][pP][sS]?://\\PC{0,30}", "\\[[0-9a-f:%.]{0,20}\\][:0-9]{0,4}"],
        ) {
            if let Ok(o) = origin_form(method, &t) {
                prop_assert!(o.starts_with('/') || (o == "*" && method == "OPTIONS"), "{} {} -> {}", method, t, o);
            }
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
