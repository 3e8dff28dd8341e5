//! The kernel TUN device: a layer-3 interface whose packets we read and write as plain IP.
//!
//! Mirrors tailscale `net/tstun/tun.go` (`New`: open `/dev/net/tun`, `TUNSETIFF` with
//! `IFF_TUN | IFF_NO_PI`) and the TUN half of boringtun `device/tun_linux.rs`. Like wireguard-go
//! it also sets `IFF_VNET_HDR`, so a write can carry a [`gro`]-coalesced TCP packet (see
//! [`Tun::send_with`]); reads strip the header. No offloads are enabled for reads
//! (`TUNSETOFFLOAD` is never called), so the kernel hands us ordinary single packets.
//!
//! This is a thin shell with `unsafe` for the `ioctl` and the reactor registration (the other
//! such shells: `magicsock::socket`, `udp`, `netns` and `netmon`, for socket options and the
//! netlink socket). Opening the device needs
//! `CAP_NET_ADMIN`. The interface exists while the returned [`Tun`] (its file descriptor) lives:
//! it is not made persistent, so the kernel removes it, with its addresses and routes, when the
//! process exits, even on a crash. Addresses, MTU, link state and routes are the router's job
//! (`crate::dataplane::routes`), not this module's.
//!
//! The caller supplies a tokio runtime with I/O enabled (`AsyncFd` registers with its reactor).
//! Each `recv` yields exactly one IP packet (no packet-information or virtio header); each
//! `send` writes exactly one.

pub mod gro;

use std::{
    fs::{File, OpenOptions},
    io::{self, IoSlice, IoSliceMut, Read, Write},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
};

use tokio::io::{unix::AsyncFd, Interest};

/// Default interface name (Go uses `tailscale0`; ours must not clash with it).
pub const DEFAULT_NAME: &str = "tinyscale0";

/// Path of the TUN clone device.
const CLONE_DEVICE: &str = "/dev/net/tun";

/// An open TUN interface, registered with the tokio reactor.
#[derive(Debug)]
pub struct Tun {
    fd: AsyncFd<File>,
    name: String,
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name`, non-blocking, without packet info.
    ///
    /// `name` must be 1..=15 bytes without NUL (`IFNAMSIZ - 1`); a `%d` pattern such as
    /// `tinyscale%d` lets the kernel pick the number, and [`Tun::name`] reports the result.
    /// Must be called inside a tokio runtime.
    pub fn open(name: &str) -> io::Result<Tun> {
        let mut req = ifreq_for(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(CLONE_DEVICE)?;
        // SAFETY: `file` is an open descriptor of /dev/net/tun that outlives the call, and `req`
        // is a fully initialised `libc::ifreq` on our stack. TUNSETIFF reads `ifr_name` and
        // `ifr_flags` and writes the chosen name back into `ifr_name` (at most IFNAMSIZ bytes,
        // NUL-terminated), which stays within `req`. The kernel keeps no pointer to it.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let name = name_from_ifreq(&req);
        // SAFETY: `file` owns its descriptor and moves into the AsyncFd, so the descriptor stays
        // open and `as_raw_fd()` returns that same value until the AsyncFd drops it; we never
        // expose the File mutably, nor replace or close the descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(file, Interest::READABLE | Interest::WRITABLE) }?;
        Ok(Tun { fd, name })
    }

    /// The interface name the kernel assigned (equal to the requested one unless it had `%d`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one IP packet into `buf`, waiting until one is available. A packet larger than
    /// `buf` is truncated by the kernel, so pass at least MTU bytes.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.fd.async_io(Interest::READABLE, |f| read_packet(f, buf)).await?;
        Ok(finish_read(buf, n))
    }

    /// Writes one IP packet, waiting while the device queue is full.
    pub async fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        self.send_with(gro::VnetHdr::default(), pkt).await
    }

    /// Writes one packet with its `virtio_net_hdr` (a [`gro::Coalescer`] output), waiting while
    /// the device queue is full. Returns the packet's length.
    pub async fn send_with(&self, hdr: gro::VnetHdr, pkt: &[u8]) -> io::Result<usize> {
        let h = hdr.to_bytes();
        let bufs = [IoSlice::new(&h), IoSlice::new(pkt)];
        let n = self
            .fd
            .async_io(Interest::WRITABLE, |mut f| f.write_vectored(&bufs))
            .await?;
        Ok(n.saturating_sub(gro::VNET_HDR_LEN))
    }

    /// Reads one packet if one is ready now; `WouldBlock` otherwise. Lets an event loop drain a
    /// burst without another trip through the reactor. A `WouldBlock` from the kernel clears the
    /// reactor's readiness, so the next [`recv`](Self::recv) waits without trying a read first.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.fd.try_io(Interest::READABLE, |f| read_packet(f, buf))?;
        Ok(finish_read(buf, n))
    }
}

/// One read (`readv`): the `virtio_net_hdr` into a stack array, the packet straight into `buf`.
/// Returns the header and the packet length.
fn read_packet(mut f: &File, buf: &mut [u8]) -> io::Result<(gro::VnetHdr, usize)> {
    let mut h = [0u8; gro::VNET_HDR_LEN];
    let n = f.read_vectored(&mut [IoSliceMut::new(&mut h), IoSliceMut::new(buf)])?;
    Ok((gro::VnetHdr::from_bytes(&h), n.saturating_sub(gro::VNET_HDR_LEN)))
}

/// Applies what the read's header asks: a partial checksum is completed here. A GSO packet
/// cannot come (no offloads were enabled); should one, it is reported as empty and dropped.
fn finish_read(buf: &mut [u8], (hdr, n): (gro::VnetHdr, usize)) -> usize {
    let n = n.min(buf.len());
    if hdr.gso_type != gro::GSO_NONE {
        log::debug!("tun: unexpected GSO packet dropped len={n}");
        return 0;
    }
    if hdr.flags & gro::F_NEEDS_CSUM != 0 {
        gro::complete_checksum(&mut buf[..n], &hdr);
    }
    n
}

/// Builds the TUNSETIFF request for `name` with `IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`.
fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "invalid interface name {name:?} (1..={} bytes, no NUL)",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    // An all-zero ifreq is a valid value (empty name, zero union), built without unsafe.
    let mut req = libc::ifreq {
        ifr_name: [0; libc::IFNAMSIZ],
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_ifindex: 0 },
    };
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // Writing a union field is safe; only reads are unsafe. ifru_ifindex (c_int) spans the
    // same bytes as ifru_flags (c_short) at offset 0, but flags must be written as c_short so
    // the value lands in the right half on big-endian (mips) targets.
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    Ok(req)
}

/// The NUL-terminated name the kernel wrote back.
fn name_from_ifreq(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_name_and_flags() {
        let req = ifreq_for("tinyscale0").unwrap();
        assert_eq!(name_from_ifreq(&req), "tinyscale0");
        // SAFETY: ifreq_for wrote ifru_flags last, so reading that same field is defined.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        assert_eq!(
            flags as libc::c_int,
            libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR
        );
    }

    #[test]
    fn rejects_bad_names() {
        assert!(ifreq_for("").is_err());
        assert!(ifreq_for("0123456789abcdef").is_err()); // 16 bytes: no room for the NUL
        assert!(ifreq_for("a\0b").is_err());
        assert!(ifreq_for("0123456789abcde").is_ok()); // 15 bytes fits
    }
}
