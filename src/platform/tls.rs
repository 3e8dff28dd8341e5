//! One byte stream for every TCP connection we make or accept: plain, or TLS when the `tls`
//! feature is built in.
//!
//! Who needs TLS (spec §1, §6.1):
//! * the control client, for `https://` login servers (`/key` and the `/ts2021` upgrade; Noise
//!   runs inside the TLS stream exactly as it runs inside plain TCP);
//! * the DERP client: real regions only speak TLS on `DERPPort` (default 443). Like the Go client,
//!   plain HTTP is used only when `TS_DEBUG_USE_DERP_HTTP=1` is set;
//! * the coordinator's listener when `tls_cert_path`/`tls_key_path` are set (headscale's names),
//!   which also puts the embedded relay behind TLS, and `tinyscale derp --tls-cert/--tls-key`.
//!
//! Certificates are verified against the system's CA bundle, never a bundled one: `SSL_CERT_FILE`
//! if set, else the first bundle file found (`/etc/ssl/certs/ca-certificates.crt` is where
//! OpenWrt's `ca-bundle` and Debian put it), else the `*.crt`/`*.pem` files of `SSL_CERT_DIR` or
//! `/etc/ssl/certs` (OpenWrt's `ca-certificates`). Routers often boot with the clock in 1970 until
//! NTP answers; a "not valid yet" certificate error says so.
//!
//! The caller supplies host, port and whether to use TLS; this module does the dial (bounded by
//! the caller's timeout), SNI from the host name (or an IP-address SAN check for IP literals), and
//! hands back a [`Stream`] that is `AsyncRead + AsyncWrite`.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// Whether DERP connections use plain HTTP: only when `TS_DEBUG_USE_DERP_HTTP` is set to a true
/// value (`1`, `true`), the Go client's debug knob of the same name.
pub fn derp_plain_http() -> bool {
    std::env::var("TS_DEBUG_USE_DERP_HTTP").is_ok_and(|v| env_true(&v))
}

fn env_true(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// A connected TCP stream, maybe wrapped in TLS (client or server side).
pub enum Stream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    #[cfg(feature = "tls")]
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            #[cfg(feature = "tls")]
            Stream::Client(s) => s.get_ref().0,
            #[cfg(feature = "tls")]
            Stream::Server(s) => s.get_ref().0,
        }
    }

    /// Whether the stream is TLS.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $e,
            #[cfg(feature = "tls")]
            Stream::Client($s) => $e,
            #[cfg(feature = "tls")]
            Stream::Server($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// `host:port` with brackets around IPv6 literals.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Dials `addr` (`host:port`, resolved by the system) and, when `tls` is set, runs a TLS
/// handshake verifying the certificate for `server_name` (a DNS name or an IP literal).
pub async fn connect(addr: &str, server_name: &str, tls: bool) -> io::Result<Stream> {
    let tcp = crate::dataplane::netns::connect_host(addr).await?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        return Ok(Stream::Plain(tcp));
    }
    client_handshake(tcp, server_name).await
}

/// Runs the client side of TLS on a connected socket, verifying the certificate for
/// `server_name` against the system roots.
#[cfg(not(feature = "tls"))]
pub async fn client_handshake(_tcp: TcpStream, _server_name: &str) -> io::Result<Stream> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "this build has no TLS (cargo feature `tls`); use an http:// server or TS_DEBUG_USE_DERP_HTTP=1",
    ))
}

/// Runs the client side of TLS on a connected socket, verifying the certificate for
/// `server_name` against the system roots.
#[cfg(feature = "tls")]
pub async fn client_handshake(tcp: TcpStream, server_name: &str) -> io::Result<Stream> {
    let config = imp::client_config()?;
    let name = imp::server_name(server_name)?;
    let s = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| imp::explain(e, server_name))?;
    Ok(Stream::Client(Box::new(s)))
}

/// Wraps a socket a listener accepted: TLS when `acceptor` is given (the handshake bounded by
/// `timeout`), else plain. `None`, logged at debug with `peer`, when the handshake fails or
/// times out.
pub async fn accept(
    acceptor: Option<&Acceptor>,
    tcp: TcpStream,
    timeout: std::time::Duration,
    peer: std::net::SocketAddr,
) -> Option<Stream> {
    let Some(a) = acceptor else {
        return Some(Stream::Plain(tcp));
    };
    match tokio::time::timeout(timeout, a.accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            log::debug!("tls handshake failed peer={peer} err={e}");
            None
        }
        Err(_) => None,
    }
}

/// Accepts TLS connections with one certificate chain and key (PEM files).
#[derive(Clone)]
pub struct Acceptor {
    #[cfg(feature = "tls")]
    inner: tokio_rustls::TlsAcceptor,
}

impl Acceptor {
    /// Loads the certificate chain (leaf first) and private key (PKCS#8, PKCS#1 or SEC1).
    /// Errors name the file and what is wrong with it.
    #[cfg(feature = "tls")]
    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Acceptor, String> {
        imp::acceptor(cert, key).map(|inner| Acceptor { inner })
    }

    #[cfg(not(feature = "tls"))]
    pub fn from_pem_files(_cert: &std::path::Path, _key: &std::path::Path) -> Result<Acceptor, String> {
        Err("this build has no TLS (cargo feature `tls`); remove tls_cert_path/tls_key_path or use a TLS proxy".into())
    }

    /// Runs the server side of the handshake on an accepted socket.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Stream> {
        #[cfg(feature = "tls")]
        {
            Ok(Stream::Server(Box::new(self.inner.accept(tcp).await?)))
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = tcp;
            Err(io::ErrorKind::Unsupported.into())
        }
    }
}

#[cfg(feature = "tls")]
mod imp {
    use std::{
        io,
        path::{Path, PathBuf},
        sync::{Arc, OnceLock},
    };

    use rustls::{
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
        ClientConfig, RootCertStore, ServerConfig,
    };

    /// Bundle files tried in order when `SSL_CERT_FILE` is not set.
    const BUNDLES: &[&str] = &[
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/ssl/cert.pem",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ];
    const CERT_DIR: &str = "/etc/ssl/certs";

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The client configuration, built from the system roots on first success and kept for the
    /// process (a failure, e.g. no CA bundle installed yet, is retried on the next connection).
    pub fn client_config() -> io::Result<Arc<ClientConfig>> {
        static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
        if let Some(c) = CONFIG.get() {
            return Ok(c.clone());
        }
        let (roots, from) = system_roots().map_err(io::Error::other)?;
        let n = roots.len();
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
            .map_err(io::Error::other)?;
        if CONFIG.set(config.clone()).is_ok() {
            log::info!("tls: {n} CA certificates from {from}");
        }
        Ok(config)
    }

    /// Where the CA certificates come from, in order (see the module doc).
    pub(super) fn root_sources(env_file: Option<PathBuf>, env_dir: Option<PathBuf>) -> Vec<PathBuf> {
        if let Some(f) = env_file {
            return vec![f];
        }
        let mut v: Vec<PathBuf> = BUNDLES
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .take(1)
            .collect();
        if v.is_empty() {
            v.push(env_dir.unwrap_or_else(|| PathBuf::from(CERT_DIR)));
        }
        v
    }

    fn system_roots() -> Result<(RootCertStore, String), String> {
        let sources = root_sources(
            std::env::var_os("SSL_CERT_FILE").map(PathBuf::from),
            std::env::var_os("SSL_CERT_DIR").map(PathBuf::from),
        );
        let mut roots = RootCertStore::empty();
        let mut names = Vec::new();
        for src in &sources {
            let files: Vec<PathBuf> = if src.is_dir() {
                let mut f: Vec<PathBuf> = std::fs::read_dir(src)
                    .map_err(|e| format!("cannot read {}: {e}", src.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "crt" || x == "pem"))
                    .collect();
                f.sort();
                f
            } else {
                vec![src.clone()]
            };
            for f in files {
                add_pem_file(&mut roots, &f)?;
            }
            names.push(src.display().to_string());
        }
        if roots.is_empty() {
            return Err(format!(
                "no CA certificates found in {}: install the CA bundle (OpenWrt: opkg install ca-bundle) or set SSL_CERT_FILE",
                names.join(", ")
            ));
        }
        Ok((roots, names.join(", ")))
    }

    /// Adds every certificate of a PEM file; unparsable certificates are skipped (bundles carry
    /// old roots webpki rejects), an unreadable file is an error.
    pub(super) fn add_pem_file(roots: &mut RootCertStore, path: &Path) -> Result<usize, String> {
        let iter = CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let certs: Vec<CertificateDer<'static>> = iter.filter_map(Result::ok).collect();
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        Ok(added)
    }

    pub fn server_name(host: &str) -> io::Result<ServerName<'static>> {
        let h = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(h.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host:?} is not a valid TLS server name"),
            )
        })
    }

    /// Adds the likely cause to certificate errors (the rest pass through unchanged).
    pub fn explain(e: io::Error, host: &str) -> io::Error {
        let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return e;
        };
        let hint = match inner {
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYet) => {
                " (is the system clock right? routers without a battery start in the past until NTP answers)"
            }
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                " (the issuing CA is not in the system bundle; set SSL_CERT_FILE to add a private CA)"
            }
            rustls::Error::InvalidCertificate(_) => {
                " (check the server's certificate chain, and the CA bundle or SSL_CERT_FILE here)"
            }
            _ => return e,
        };
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TLS certificate of {host} rejected: {inner}{hint}"),
        )
    }

    pub fn acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| format!("tls_cert_path {}: {e}", cert.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("tls_cert_path {}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("tls_cert_path {}: no CERTIFICATE block", cert.display()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("tls_key_path {}: {e}", key.display()))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("tls_cert_path/tls_key_path: {e}"))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derp_http_knob_values() {
        for v in ["1", "true", "TRUE", " yes "] {
            assert!(env_true(v), "{v}");
        }
        for v in ["", "0", "false", "no", "2"] {
            assert!(!env_true(v), "{v}");
        }
    }

    #[test]
    fn host_port_brackets_v6() {
        assert_eq!(host_port("derp.example.com", 443), "derp.example.com:443");
        assert_eq!(host_port("192.0.2.1", 80), "192.0.2.1:80");
        assert_eq!(host_port("2001:db8::1", 443), "[2001:db8::1]:443");
        assert_eq!(host_port("[2001:db8::1]", 443), "[2001:db8::1]:443");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn root_source_order() {
        use std::path::PathBuf;
        let f = PathBuf::from("/x/ca.pem");
        assert_eq!(imp::root_sources(Some(f.clone()), None), vec![f]);
        let v = imp::root_sources(None, Some(PathBuf::from("/nonexistent-dir")));
        assert_eq!(v.len(), 1);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn server_names() {
        assert!(imp::server_name("derp.example.com").is_ok());
        assert!(imp::server_name("127.0.0.1").is_ok());
        assert!(imp::server_name("[::1]").is_ok());
        assert!(imp::server_name("bad name!").is_err());
    }
}
