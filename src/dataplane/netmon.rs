//! Watching this host's addresses (Go `net/netmon`, netmon_linux.go): a `NETLINK_ROUTE`
//! socket joined to the address multicast groups, so `--advertise-lan` re-announces an
//! interface's prefixes when they change instead of at the next `up`.
//!
//! [shell] The socket, raw `libc` (no netlink crate: two syscalls and a parser). The bytes are
//! decoded by [`rtnl`] [pure]. The caller re-reads the interface's prefixes when an event
//! names it; the events only say *when*.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::{unix::AsyncFd, Interest};

pub mod rtnl;

/// Receive buffer: the kernel's multicast datagrams are far smaller; a dump-sized buffer
/// (as iproute2 uses) never truncates one.
const RECV_BUF: usize = 16 * 1024;

/// A netlink socket subscribed to IPv4 and IPv6 address changes.
pub struct AddrWatcher {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl AddrWatcher {
    /// Opens the socket and joins [`rtnl::RTMGRP_IPV4_IFADDR`] and
    /// [`rtnl::RTMGRP_IPV6_IFADDR`]. Needs a tokio runtime.
    pub fn new() -> io::Result<AddrWatcher> {
        // SAFETY: plain socket(2); the result is checked before it is wrapped.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value (pid 0: the kernel
        // picks one).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        sa.nl_groups = rtnl::RTMGRP_IPV4_IFADDR | rtnl::RTMGRP_IPV6_IFADDR;
        // SAFETY: `sa` lives on the stack for the call and its size is passed along.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` owns its descriptor and moves into the AsyncFd, which keeps it open
        // until it is dropped; nothing else closes or replaces it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(AddrWatcher {
            fd,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Waits for the next datagram and returns its address events (possibly none: other
    /// messages). `ENOBUFS` (the kernel dropped events while we were slow) is an error the
    /// caller answers by re-reading everything.
    pub async fn next(&mut self) -> io::Result<Vec<rtnl::AddrEvent>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let fd = self.fd.get_ref().as_raw_fd();
            let buf = &mut self.buf;
            match guard.try_io(|_| {
                // SAFETY: `buf` is a live, writable buffer of the length passed.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => {
                    return rtnl::parse(&self.buf[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The index of interface `name`, or `None` when there is no such interface (yet).
pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}
