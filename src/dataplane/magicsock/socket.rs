//! The magicsock UDP sockets: one per address family, on the same port when possible, carrying
//! WireGuard, disco and STUN together.
//!
//! Mirrors the facts of tailscale `wgengine/magicsock/magicsock.go` (`bindSocket` for `udp4`
//! and `udp6`, `sendUDP` by destination family; a host without IPv6 runs IPv4-only), not its
//! code. The IPv6 socket sets `IPV6_V6ONLY` before `bind`: otherwise Linux makes `[::]:port` a
//! dual-stack socket whose IPv4 half collides with the IPv4 socket on the same port. std and
//! tokio cannot set an option before binding, so that one socket is made with `libc` (the only
//! `unsafe` here, each block with its `SAFETY:`). Family choice and address checks are pure and
//! live in [`super::addr`].
//!
//! The caller supplies a tokio runtime (the sockets register with its reactor) and polls both
//! receive methods, e.g. as two `select!` branches with a buffer each.

use std::{
    io,
    net::{Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::net::UdpSocket;

use super::addr::{self, Family, IfAddr6};

/// Where Linux lists the host's IPv6 addresses.
const IF_INET6: &str = "/proc/net/if_inet6";

/// The two sockets. IPv4 is required; IPv6 is absent on hosts without it.
#[derive(Debug)]
pub struct Sockets {
    v4: UdpSocket,
    v6: Option<UdpSocket>,
}

impl Sockets {
    /// Binds `0.0.0.0:port` (a random port if that one is taken) and `[::]:<the same port>`
    /// (a random one if taken; none at all, logged once at info, if the host has no IPv6).
    /// Must be called inside a tokio runtime.
    pub fn bind(port: u16) -> io::Result<Sockets> {
        let v4 = match std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))) {
            Ok(s) => s,
            Err(e) if port != 0 => {
                log::warn!("UDP port {port} unavailable ({e}), using a random one");
                std::net::UdpSocket::bind("0.0.0.0:0")?
            }
            Err(e) => return Err(e),
        };
        v4.set_nonblocking(true)?;
        // WireGuard, disco and STUN datagrams take the physical route, never a peer's subnet
        // route or exit node (see crate::dataplane::netns).
        crate::dataplane::netns::mark(std::os::fd::AsRawFd::as_raw_fd(&v4));
        let v4 = UdpSocket::from_std(v4)?;
        let port4 = v4.local_addr()?.port();
        let v6 = match bind_v6_only(port4).or_else(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                log::info!("UDP port {port4} taken on IPv6 ({e}), using a random IPv6 port");
                bind_v6_only(0)
            } else {
                Err(e)
            }
        }) {
            Ok(s) => {
                crate::dataplane::netns::mark(std::os::fd::AsRawFd::as_raw_fd(&s));
                Some(UdpSocket::from_std(s)?)
            }
            Err(e) => {
                log::info!("no IPv6 UDP socket ({e}): running IPv4-only");
                None
            }
        };
        Ok(Sockets { v4, v6 })
    }

    /// The IPv4 socket's port.
    pub fn port(&self) -> u16 {
        self.v4.local_addr().map_or(0, |a| a.port())
    }

    /// The IPv6 socket's port, if there is one.
    pub fn port6(&self) -> Option<u16> {
        self.v6.as_ref().and_then(|s| s.local_addr().ok()).map(|a| a.port())
    }

    /// The IPv4 socket (for batched sends and receives, `crate::dataplane::udp`).
    pub fn v4(&self) -> &UdpSocket {
        &self.v4
    }

    /// The IPv6 socket, if there is one.
    pub fn v6(&self) -> Option<&UdpSocket> {
        self.v6.as_ref()
    }

    /// Whether an IPv6 socket exists.
    pub fn have_v6(&self) -> bool {
        self.v6.is_some()
    }

    /// Sends one datagram from the socket of `dst`'s family (a v4-mapped `dst` goes out as IPv4).
    /// Never blocks: a full send buffer is an error, as a congested link would drop the packet.
    pub fn try_send_to(&self, pkt: &[u8], dst: SocketAddr) -> io::Result<usize> {
        match addr::send_family(dst, self.have_v6()) {
            Some((Family::V4, dst)) => self.v4.try_send_to(pkt, dst),
            Some((Family::V6, dst)) => match &self.v6 {
                Some(s) => s.try_send_to(pkt, dst),
                None => Err(io::ErrorKind::AddrNotAvailable.into()),
            },
            None => Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no socket for this address",
            )),
        }
    }

    /// Receives on the IPv4 socket; the source is in canonical form.
    pub async fn recv4(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, src) = self.v4.recv_from(buf).await?;
        Ok((n, addr::canonical(src)))
    }

    /// Receives on the IPv6 socket (pending forever without one); the source is in canonical
    /// form, so a v4-mapped source is never mistaken for an IPv6 peer.
    pub async fn recv6(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match &self.v6 {
            Some(s) => {
                let (n, src) = s.recv_from(buf).await?;
                Ok((n, addr::canonical(src)))
            }
            None => std::future::pending().await,
        }
    }
}

/// The host's IPv6 interface addresses (empty where `/proc/net/if_inet6` is missing: no IPv6).
pub fn interface_v6() -> Vec<IfAddr6> {
    std::fs::read_to_string(IF_INET6)
        .map(|t| addr::parse_if_inet6(&t))
        .unwrap_or_default()
}

/// A non-blocking `[::]:port` UDP socket with `IPV6_V6ONLY` set before `bind`.
fn bind_v6_only(port: u16) -> io::Result<std::net::UdpSocket> {
    // SAFETY: socket(2) takes no pointers; a negative result is an error, anything else a new
    // descriptor that nothing else owns.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is the fresh, open descriptor from above and is owned by nothing else; the
    // OwnedFd closes it on every error path below.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: `owned` is an open socket; the option value points to a live c_int and the length
    // passed is exactly its size. The kernel copies the value and keeps no pointer.
    let rc = unsafe {
        libc::setsockopt(
            owned.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&one as *const libc::c_int).cast(),
            socklen_of::<libc::c_int>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let sa = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: port.to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: Ipv6Addr::UNSPECIFIED.octets(),
        },
        sin6_scope_id: 0,
    };
    // SAFETY: `owned` is an open socket; `sa` is a fully initialised sockaddr_in6 on our stack
    // and the length is its exact size. bind(2) only reads it during the call.
    let rc = unsafe {
        libc::bind(
            owned.as_raw_fd(),
            (&sa as *const libc::sockaddr_in6).cast(),
            socklen_of::<libc::sockaddr_in6>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::net::UdpSocket::from(owned))
}

/// `size_of::<T>()` as a `socklen_t` (the structs passed here are a few dozen bytes).
fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPv6 socket is v6-only, so it shares the IPv4 socket's port, and each family's
    /// datagrams arrive on their own socket. Skipped (with a note) on a host without IPv6.
    #[tokio::test]
    async fn one_socket_per_family_on_the_same_port() {
        let s = Sockets::bind(0).unwrap();
        let Some(port6) = s.port6() else {
            eprintln!("no IPv6 on this host: only the IPv4 half is checked");
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.try_send_to(b"x", peer.local_addr().unwrap()).unwrap();
            assert!(s.try_send_to(b"x", "[::1]:9".parse().unwrap()).is_err());
            return;
        };
        assert_eq!(port6, s.port(), "same port on both families");
        let p4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
        p4.send_to(b"four", ("127.0.0.1", s.port())).unwrap();
        p6.send_to(b"six", ("::1", port6)).unwrap();
        let mut b4 = [0u8; 16];
        let mut b6 = [0u8; 16];
        let (n, src) = s.recv4(&mut b4).await.unwrap();
        assert_eq!((&b4[..n], src), (&b"four"[..], p4.local_addr().unwrap()));
        let (n, src) = s.recv6(&mut b6).await.unwrap();
        assert_eq!((&b6[..n], src), (&b"six"[..], p6.local_addr().unwrap()));
        // Sending picks the socket by family: the replies come from our port on each.
        s.try_send_to(b"r4", p4.local_addr().unwrap()).unwrap();
        s.try_send_to(b"r6", p6.local_addr().unwrap()).unwrap();
        let (n, from) = p4.recv_from(&mut b4).unwrap();
        assert_eq!(
            (&b4[..n], from),
            (&b"r4"[..], SocketAddr::from(([127, 0, 0, 1], s.port())))
        );
        let (n, from) = p6.recv_from(&mut b6).unwrap();
        assert_eq!(
            (&b6[..n], from),
            (&b"r6"[..], SocketAddr::from((Ipv6Addr::LOCALHOST, port6)))
        );
        // A v4-mapped destination goes out of the IPv4 socket (the v6-only one would refuse it).
        let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", p4.local_addr().unwrap().port())
            .parse()
            .unwrap();
        s.try_send_to(b"m", mapped).unwrap();
        let (n, _) = p4.recv_from(&mut b4).unwrap();
        assert_eq!(&b4[..n], b"m");
    }

    #[test]
    fn v6_only_socket_does_not_take_the_ipv4_port() {
        let Ok(s6) = bind_v6_only(0) else {
            eprintln!("no IPv6 on this host");
            return;
        };
        let port = s6.local_addr().unwrap().port();
        // A dual-stack [::]:port would make this bind fail with EADDRINUSE.
        std::net::UdpSocket::bind(("0.0.0.0", port)).unwrap();
    }
}
