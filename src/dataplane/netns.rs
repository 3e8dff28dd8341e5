//! Sockets of the daemon itself that must not be routed into the tunnel (Go `net/netns`).
//!
//! With `--accept-routes`, peers' subnet routes sit in routing table 53, consulted before the
//! main table (see [`crate::dataplane::routes`]). A route that covers the control server, a DERP relay or
//! a peer's UDP endpoint would send the tunnel's own packets into the tunnel. Every socket the
//! daemon opens towards those carries [`BYPASS_MARK`] (`SO_MARK`), and the router's rule at
//! priority 5211 sends marked packets to the main table first.
//!
//! Marking needs `CAP_NET_ADMIN`; without it (control-only runs as a user) the socket is used
//! unmarked, which is right there: no routes are installed either.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    sync::atomic::{AtomicBool, Ordering},
};

use tokio::net::{TcpSocket, TcpStream};

use crate::dataplane::routes::BYPASS_MARK;

static WARNED: AtomicBool = AtomicBool::new(false);

/// Sets [`BYPASS_MARK`] on `fd`; returns whether it took. A refusal is logged once, at debug.
pub fn mark(fd: RawFd) -> bool {
    let v: libc::c_int = BYPASS_MARK as libc::c_int;
    // SAFETY: `fd` is an open socket owned by the caller; the option value is a c_int on the
    // stack whose size is passed along.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 && !WARNED.swap(true, Ordering::Relaxed) {
        log::debug!(
            "netns: SO_MARK refused ({}); sockets stay unmarked",
            io::Error::last_os_error()
        );
    }
    r == 0
}

/// Connects a TCP socket marked with [`BYPASS_MARK`] to `addr`.
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    mark(s.as_raw_fd());
    s.connect(addr).await
}

/// Sends `datagram` to `addr` from a new UDP socket marked with [`BYPASS_MARK`] (an ephemeral
/// port of `addr`'s family, connected to it, so replies from anyone else are dropped by the
/// kernel) and returns the socket, registered with tokio, to read the answer from.
pub fn udp_send(addr: SocketAddr, datagram: &[u8]) -> io::Result<tokio::net::UdpSocket> {
    let any: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(any)?;
    mark(s.as_raw_fd());
    // A UDP connect only sets the peer, and one small send on a new socket does not block.
    s.connect(addr)?;
    s.send(datagram)?;
    s.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(s)
}

/// Resolves `host:port` with the system resolver and connects to the first address that
/// answers, in the resolver's order, with marked sockets.
pub async fn connect_host(addr: &str) -> io::Result<TcpStream> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        match connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"))))
}
