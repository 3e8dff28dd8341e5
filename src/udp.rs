//! Linux UDP socket calls that std and tokio do not offer, for the data-plane sockets: larger
//! kernel buffers.
//!
//! Mirrors the facts of wireguard-go `conn/controlfns_linux.go` and tailscale magicsock
//! `trySetSocketBuffer`: both ask for 7 MiB receive and send buffers, first with the
//! `SO_*BUFFORCE` options (which ignore `net.core.{r,w}mem_max` but need `CAP_NET_ADMIN`, which
//! the daemon has for its TUN), then with the plain options (capped by those sysctls). With the
//! Linux default of 208 KiB, a receive queue holds fewer than a hundred full-size WireGuard
//! datagrams: one burst from a TCP sender while the loop is busy writing to the TUN overflows it,
//! and every such drop costs the tunnelled TCP connection a retransmission and half its window.
//! The memory is only used while datagrams wait, and the kernel's `udp_mem` limits still apply.
//!
//! A thin shell: every function takes the socket, so each of several sockets (one per address
//! family) gets the same treatment. All `unsafe` here is a `setsockopt(2)` call on a descriptor
//! borrowed for the duration of the call.

use std::{io, os::fd::AsRawFd};

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
