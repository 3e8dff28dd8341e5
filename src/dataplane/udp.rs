//! Linux UDP socket calls that std and tokio do not offer, for the data-plane sockets: larger
//! kernel buffers, batched sends with UDP generic segmentation offload (GSO), and receives with
//! UDP generic receive offload (GRO).
//!
//! Buffers mirror the facts of wireguard-go `conn/controlfns_linux.go` and tailscale magicsock
//! `trySetSocketBuffer`: both ask for 7 MiB receive and send buffers, first with the
//! `SO_*BUFFORCE` options (which ignore `net.core.{r,w}mem_max` but need `CAP_NET_ADMIN`, which
//! the daemon has for its TUN), then with the plain options (capped by those sysctls). With the
//! Linux default of 208 KiB, a receive queue holds fewer than a hundred full-size WireGuard
//! datagrams: one burst from a TCP sender while the loop is busy writing to the TUN overflows it,
//! and every such drop costs the tunnelled TCP connection a retransmission and half its window.
//! The memory is only used while datagrams wait, and the kernel's `udp_mem` limits still apply.
//!
//! Sends: [`send_batch`] hands a whole [`SendBatch`] to one `sendmmsg(2)`, one message per run,
//! and a run of several datagrams carries a `UDP_SEGMENT` control message so the kernel treats it
//! as one packet until it must split it (Linux ≥ 4.18). A kernel or route that refuses GSO makes
//! the failed run go out datagram by datagram and turns GSO off for that socket, as wireguard-go
//! and tailscale do. Receives: with `UDP_GRO` on, one `recvmsg(2)` may return several datagrams
//! of one sender back to back plus their size ([`recv`]); `batch::segments` splits them.
//!
//! A thin shell: every function takes the socket, so each of several sockets (one per address
//! family) gets the same treatment. All `unsafe` here is a system call on a descriptor borrowed
//! for the duration of the call, or the C structures around it, each with its `SAFETY:`.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
};

use tokio::{io::Interest, net::UdpSocket};

use crate::dataplane::magicsock::batch::{Run, SendBatch};

/// Receive and send buffer size asked for (Go `socketBufferSize`, 7 MiB).
pub const SOCKET_BUFFER: usize = 7 << 20;

/// Raises the socket's receive and send buffers towards [`SOCKET_BUFFER`]. Best effort: returns
/// the sizes the kernel reports afterwards (it doubles the value asked for, for bookkeeping).
pub fn set_buffers(sock: &impl AsRawFd) -> (usize, usize) {
    let fd = sock.as_raw_fd();
    let size = libc::c_int::try_from(SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(fd, libc::SOL_SOCKET, force, size).is_err() {
            // Without CAP_NET_ADMIN: as much as the sysctl allows.
            let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, size);
        }
    }
    let get = |opt| getsockopt_int(fd, libc::SOL_SOCKET, opt).map_or(0, |v| usize::try_from(v).unwrap_or(0));
    (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF))
}

/// Messages per `sendmmsg(2)` call (the runs of a larger batch take several calls).
const MAX_MESSAGES: usize = 64;

/// Whether the kernel knows `UDP_SEGMENT` on this socket (reading it fails before Linux 4.18).
pub fn gso_supported(sock: &impl AsRawFd) -> bool {
    getsockopt_int(sock.as_raw_fd(), libc::SOL_UDP, libc::UDP_SEGMENT).is_ok()
}

/// Turns on UDP GRO (Linux ≥ 5.0); afterwards [`recv`] may return coalesced datagrams.
pub fn enable_gro(sock: &impl AsRawFd) -> bool {
    setsockopt_int(sock.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
}

/// What [`send_batch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendOutcome {
    /// Datagrams the kernel accepted.
    pub sent: usize,
    /// Datagrams dropped (full send buffer, unreachable destination, ...).
    pub dropped: usize,
    /// The socket refused GSO: send later batches with runs of one datagram.
    pub gso_refused: bool,
}

/// Sends every run of `batch` without waiting: one `sendmmsg(2)` per `MAX_MESSAGES` (64) runs. A
/// full send buffer drops the rest of the batch, as a congested link would; other errors drop
/// only the run they hit (or resend it datagram by datagram if the error means "no GSO here").
pub fn send_batch(sock: &UdpSocket, batch: &SendBatch) -> SendOutcome {
    let runs = batch.runs();
    let mut out = SendOutcome::default();
    let mut i = 0;
    while i < runs.len() {
        let chunk = &runs[i..runs.len().min(i + MAX_MESSAGES)];
        match sock.try_io(Interest::WRITABLE, || sendmmsg(sock.as_raw_fd(), batch, chunk)) {
            Ok(n) => {
                // The kernel accepted the first n runs (n ≥ 1 on success).
                let n = n.clamp(1, chunk.len());
                out.sent += chunk[..n].iter().map(Run::segments).sum::<usize>();
                i += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                out.dropped += runs[i..].iter().map(Run::segments).sum::<usize>();
                break;
            }
            Err(e) => {
                let r = &runs[i];
                match gso_error(&e) {
                    Some(disable) if r.segments() > 1 => {
                        log::debug!("udp: GSO send failed, sending datagrams singly ep={} err={e}", r.dst);
                        out.gso_refused |= disable;
                        for d in batch.bytes(r).chunks(r.seg) {
                            match sock.try_send_to(d, r.dst) {
                                Ok(_) => out.sent += 1,
                                Err(_) => out.dropped += 1,
                            }
                        }
                    }
                    _ => {
                        log::trace!("udp: send failed ep={} err={e}", r.dst);
                        out.dropped += r.segments();
                    }
                }
                i += 1;
            }
        }
    }
    out
}

/// Whether a failed GSO send should be retried datagram by datagram, and if so whether GSO is
/// unusable on this socket for good: `Some(true)` when the kernel or route cannot do it at all
/// (no checksum offload on the route: EIO; a kernel without UDP_SEGMENT: ENOPROTOOPT or
/// EOPNOTSUPP), `Some(false)` when only this run was unsuitable (a segment over this path's MTU:
/// EINVAL or EMSGSIZE), `None` for errors that single sends would hit too.
fn gso_error(e: &io::Error) -> Option<bool> {
    match e.raw_os_error() {
        Some(libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP) => Some(true),
        Some(libc::EINVAL | libc::EMSGSIZE) => Some(false),
        _ => None,
    }
}

/// Receives one datagram, or with GRO several of one sender back to back, without waiting
/// (`WouldBlock` when none is queued; await `sock.readable()` then). Returns the byte count, the
/// sender, and the size of each coalesced datagram (0 if the kernel did not coalesce).
pub fn recv(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    sock.try_io(Interest::READABLE, || recvmsg(sock.as_raw_fd(), buf))
}

/// A socket address in the C layout the kernel reads and writes.
#[repr(C)]
#[derive(Clone, Copy)]
union RawAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl RawAddr {
    /// All zeroes (family AF_UNSPEC), for the kernel to fill in.
    fn empty() -> RawAddr {
        RawAddr {
            v6: libc::sockaddr_in6 {
                sin6_family: 0,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
                sin6_scope_id: 0,
            },
        }
    }

    fn from_socket_addr(a: SocketAddr) -> (RawAddr, libc::socklen_t) {
        let mut r = RawAddr::empty();
        match a {
            SocketAddr::V4(a) => {
                r.v4 = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                (r, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
            }
            SocketAddr::V6(a) => {
                r.v6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                (r, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
            }
        }
    }

    fn to_socket_addr(self) -> Option<SocketAddr> {
        // SAFETY: every variant is plain old data made only of integers, and the union was
        // created whole (RawAddr::empty), so each byte read here is initialised whichever
        // variant the kernel wrote; the family field sits at the same offset in both.
        let family = unsafe { self.v4.sin_family };
        match i32::from(family) {
            libc::AF_INET => {
                // SAFETY: as above; the kernel wrote an IPv4 address (family AF_INET).
                let a = unsafe { self.v4 };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: as above; the kernel wrote an IPv6 address (family AF_INET6).
                let a = unsafe { self.v6 };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// Room for one control message carrying a `u16` or `c_int` (`CMSG_SPACE(4)` is 16 or 24 bytes),
/// aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgBuf([u8; 32]);

/// One `sendmmsg(2)` for `runs` (at most [`MAX_MESSAGES`]), all inside `batch`'s buffer.
fn sendmmsg(fd: libc::c_int, batch: &SendBatch, runs: &[Run]) -> io::Result<usize> {
    let runs = &runs[..runs.len().min(MAX_MESSAGES)];
    let mut addrs = [(RawAddr::empty(), 0 as libc::socklen_t); MAX_MESSAGES];
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_MESSAGES];
    let mut cmsgs = [CmsgBuf([0; 32]); MAX_MESSAGES];
    // SAFETY: mmsghdr is a C struct of integers and raw pointers (plus, on some libcs, private
    // padding), for which all-zero bytes are a valid value: null pointers, zero lengths.
    let mut msgs: [libc::mmsghdr; MAX_MESSAGES] = unsafe { std::mem::zeroed() };
    for (i, r) in runs.iter().enumerate() {
        addrs[i] = RawAddr::from_socket_addr(r.dst);
        let data = batch.bytes(r);
        // The kernel only reads through iov_base for a send; the cast to *mut is what the C
        // signature wants.
        iovs[i] = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let h = &mut msgs[i].msg_hdr;
        h.msg_name = (&mut addrs[i].0 as *mut RawAddr).cast();
        h.msg_namelen = addrs[i].1;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        if r.segments() > 1 {
            let seg = u16::try_from(r.seg).unwrap_or(u16::MAX);
            h.msg_control = cmsgs[i].0.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is arithmetic on its argument only.
            h.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as _;
            // SAFETY: msg_control points to `cmsgs[i]`, 32 aligned bytes, and msg_controllen
            // (CMSG_SPACE(2), at most 24) fits in them, so CMSG_FIRSTHDR returns a pointer to its
            // start, valid for a cmsghdr plus 2 data bytes; we write only those fields.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            }
        }
    }
    // SAFETY: `msgs[..runs.len()]` are initialised headers whose name, iovec and control
    // pointers refer to `addrs`, `iovs`, `cmsgs` and `batch`'s buffer, all alive and unmoved
    // until the call returns; the kernel only reads them (it writes msg_len, an integer field).
    let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), runs.len() as _, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `recvmsg(2)` into `buf`, reading the GRO segment size from the control data.
fn recvmsg(fd: libc::c_int, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    let mut addr = RawAddr::empty();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = CmsgBuf([0; 32]);
    // SAFETY: msghdr is a C struct of integers and raw pointers (plus, on some libcs, private
    // padding), for which all-zero bytes are a valid value.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_name = (&mut addr as *mut RawAddr).cast();
    h.msg_namelen = std::mem::size_of::<RawAddr>() as libc::socklen_t;
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = cmsg.0.as_mut_ptr().cast();
    h.msg_controllen = cmsg.0.len() as _;
    // SAFETY: `h` points to `addr`, `iov` (which covers exactly `buf`) and `cmsg`, all alive and
    // exclusively borrowed for the call; the kernel writes at most msg_namelen, iov_len and
    // msg_controllen bytes into them.
    let n = unsafe { libc::recvmsg(fd, &mut h, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let src = addr
        .to_socket_addr()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram without an IP source"))?;
    let mut seg = 0;
    // SAFETY: after recvmsg, msg_control/msg_controllen describe the control messages the
    // kernel wrote into `cmsg`; CMSG_FIRSTHDR/CMSG_NXTHDR stay within that length and return
    // null at its end, and a UDP_GRO message carries one c_int, read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                seg = usize::try_from(v).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(&h, c);
        }
    }
    Ok((n as usize, src, seg))
}

fn setsockopt_int(fd: libc::c_int, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is borrowed from a live socket for this call; the option value points to a
    // c_int on our stack and the length passed is exactly its size. The kernel copies the value
    // and keeps no pointer.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn getsockopt_int(fd: libc::c_int, level: libc::c_int, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is borrowed from a live socket for this call; `val` and `len` are live locals
    // and `len` holds `val`'s size, so the kernel writes at most that many bytes into it.
    let rc = unsafe { libc::getsockopt(fd, level, opt, (&mut val as *mut libc::c_int).cast(), &mut len) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(val)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::magicsock::batch::{self, MAX_SEGMENTS};

    async fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (a, b)
    }

    fn dgram(tag: u16, len: usize) -> Vec<u8> {
        let mut d: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7)).collect();
        d[..2].copy_from_slice(&tag.to_be_bytes());
        d
    }

    /// Receives until `want` datagrams arrived (each GRO read split by its segment size).
    async fn recv_all(sock: &UdpSocket, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65535];
        while got.len() < want {
            tokio::time::timeout(std::time::Duration::from_secs(5), sock.readable())
                .await
                .expect("datagrams arrive")
                .unwrap();
            while let Ok((n, src, seg)) = recv(sock, &mut buf) {
                got.extend(batch::segments(&buf[..n], seg).map(|d| (src, d.to_vec())));
            }
        }
        got
    }

    /// A batch with GSO runs, a short last datagram, a second destination and a lone datagram
    /// arrives intact and in order, whether or not the receiver coalesces with GRO.
    #[tokio::test]
    async fn batch_send_and_receive_over_loopback() {
        for gro in [false, true] {
            let (a, b) = pair().await;
            let (_, c) = pair().await;
            set_buffers(&b);
            if gro {
                enable_gro(&b);
            }
            let gso = gso_supported(&a);
            let mut out = SendBatch::new(if gso { MAX_SEGMENTS } else { 1 });
            let (b_addr, c_addr) = (b.local_addr().unwrap(), c.local_addr().unwrap());
            let mut want_b = Vec::new();
            for i in 0..60u16 {
                let len = if i == 30 { 300 } else { 1312 };
                let d = dgram(i, len);
                out.push(b_addr, &d);
                want_b.push(d);
                if i == 45 {
                    out.push(c_addr, &dgram(999, 64));
                }
            }
            // A fresh socket is writable once the reactor has seen it.
            a.writable().await.unwrap();
            let r = send_batch(&a, &out);
            assert_eq!((r.sent, r.dropped), (61, 0), "gro={gro} gso={gso}");
            let got: Vec<Vec<u8>> = recv_all(&b, 60).await.into_iter().map(|(_, d)| d).collect();
            assert_eq!(got, want_b, "gro={gro}");
            let got_c = recv_all(&c, 1).await;
            assert_eq!(got_c, vec![(a.local_addr().unwrap(), dgram(999, 64))]);
        }
    }

    #[test]
    fn gso_errors_decide_the_fallback() {
        let e = io::Error::from_raw_os_error;
        assert_eq!(gso_error(&e(libc::EIO)), Some(true));
        assert_eq!(gso_error(&e(libc::ENOPROTOOPT)), Some(true));
        assert_eq!(gso_error(&e(libc::EMSGSIZE)), Some(false));
        assert_eq!(gso_error(&e(libc::EINVAL)), Some(false));
        assert_eq!(gso_error(&e(libc::ENETUNREACH)), None);
        assert_eq!(gso_error(&io::ErrorKind::WouldBlock.into()), None);
    }

    #[test]
    fn raw_addr_round_trip() {
        for a in ["192.0.2.7:41641", "[2001:db8::1]:3478", "[::ffff:192.0.2.1]:1"] {
            let a: SocketAddr = a.parse().unwrap();
            let (raw, len) = RawAddr::from_socket_addr(a);
            assert!(len as usize <= std::mem::size_of::<RawAddr>());
            assert_eq!(raw.to_socket_addr(), Some(a));
        }
        assert_eq!(RawAddr::empty().to_socket_addr(), None);
    }

    #[test]
    fn buffers_grow() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = getsockopt_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap();
        let (rcv, snd) = set_buffers(&s);
        // Unprivileged and with a tiny rmem_max this may not grow, but it must never shrink.
        assert!(rcv >= usize::try_from(before).unwrap());
        assert!(snd > 0);
    }
}
