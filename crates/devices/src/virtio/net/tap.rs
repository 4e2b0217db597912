//! A Linux tap device opened through `/dev/net/tun`, as virtio-net's backend.
//!
//! Written on libc directly: no maintained rust-vmm crate has a tap (Cloud Hypervisor's
//! `net_util` is not published; `vmm-sys-util` has none; `tun-tap` knows no vnet header). The
//! tap is opened with `IFF_VNET_HDR` and a 12-byte `virtio_net_hdr_v1`, so every frame read or
//! written starts with exactly the header the guest driver uses: the device passes it through
//! and the kernel does checksum and segmentation work on either side.

use std::cell::Cell;
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{ETH_HLEN, MAX_FRAME_LEN, NetBackend, VNET_HDR_LEN};

/// An 802.1Q tag.
const VLAN_HLEN: usize = 4;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("Tap name {0:?} is empty, too long (15 bytes at most) or holds a NUL byte")]
    BadName(String),
    #[error("Cannot open {TUN_PATH}")]
    OpenTun(#[source] io::Error),
    #[error("Not allowed to create or attach to tap {0:?} (needs CAP_NET_ADMIN or ownership)")]
    PermissionDenied(String),
    #[error("Tap {0:?} is busy (another process has it open)")]
    Busy(String),
    #[error(
        "Cannot attach to {0:?}: not a tap (or a multi-queue one), or a name the kernel refuses"
    )]
    Invalid(String),
    #[error("Cannot set up tap {name:?}: {what}")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An open tap: nonblocking, no packet-information prefix, 12-byte vnet headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// The `TUN_F_*` offloads last set.
    offload: Cell<libc::c_uint>,
}

/// `struct ifreq` with the interface name and flags, the part TUNSETIFF uses.
fn ifreq(name: &str, flags: libc::c_int) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(TapError::BadName(name.to_owned()));
    }
    // SAFETY: ifreq is plain data (arrays, integers, a union of those and a pointer); all zero
    // is a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, &s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    // The flags are 16 bits in the kernel's ifreq; every IFF_* used here fits.
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    Ok(req)
}

impl Tap {
    /// Open tap `name`, creating it if it does not exist (which needs CAP_NET_ADMIN in the
    /// caller's network namespace). The name may be a pattern such as `tap%d`; [`Tap::name`]
    /// tells the one the kernel chose. Offloads start off: see [`Tap::set_offload`].
    pub fn open(name: &str) -> Result<Self, TapError> {
        let mut req = ifreq(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, and `req` is one that lives
        // for the call; the fd is the tun control device just opened.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            let name = name.to_owned();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied(name),
                Some(libc::EBUSY) => TapError::Busy(name),
                Some(libc::EINVAL) => TapError::Invalid(name),
                _ => TapError::Ioctl {
                    name,
                    what: "TUNSETIFF",
                    source: e,
                },
            });
        }
        // SAFETY: the kernel NUL-terminates ifr_name within IFNAMSIZ, and the bytes live in
        // `req` for this borrow.
        let chosen = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let tap = Self {
            file,
            name: chosen,
            offload: Cell::new(0),
        };
        const _: () = assert!(VNET_HDR_LEN == 12);
        let hdr_len: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid for the call.
        let rc = unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if rc < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn ioctl_error(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    /// Which offloads the kernel may leave to the reader: `TUN_F_*` bits (checksum, TSO,
    /// ECN). Frames written to the tap may always carry offload requests.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes the flags as the ioctl argument itself, not through a pointer.
        // SAFETY: no memory is passed; the fd is our tap.
        let rc = unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if rc < 0 {
            return Err(self.ioctl_error("TUNSETOFFLOAD"));
        }
        self.offload.set(flags);
        Ok(())
    }

    /// The tap's MTU (`SIOCGIFMTU`, asked through a socket in this process's network
    /// namespace: fails if the tap was moved out of it).
    pub fn mtu(&self) -> io::Result<usize> {
        let mut req = ifreq(&self.name, 0).map_err(io::Error::other)?;
        // SAFETY: plain socket(2); the result is checked and owned below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a socket just opened and owned by nothing else.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into `req`, which lives
        // for the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: SIOCGIFMTU filled the union's MTU member.
        let mtu = unsafe { req.ifr_ifru.ifru_mtu };
        usize::try_from(mtu).map_err(|_| io::Error::other(format!("MTU {mtu}")))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}

/// `read`/`write` on a nonblocking fd with an `isize` result turned into `io::Result`.
fn io_result(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl NetBackend for Tap {
    fn read_frame(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        if let [one] = bufs {
            // A plain read: the kernel's readv path costs more.
            // SAFETY: reads at most `one.len()` bytes into `one`, borrowed mutably for the call.
            return io_result(unsafe { libc::read(self.fd(), one.as_mut_ptr().cast(), one.len()) });
        }
        let count = libc::c_int::try_from(bufs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: IoSliceMut is ABI-compatible with iovec; each points to memory borrowed
        // mutably for the call, and readv writes only inside them.
        io_result(unsafe { libc::readv(self.fd(), bufs.as_ptr().cast(), count) })
    }

    fn write_frame(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let count = libc::c_int::try_from(bufs.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: IoSlice is ABI-compatible with iovec; each points to memory borrowed for
        // the call, which writev only reads.
        io_result(unsafe { libc::writev(self.fd(), bufs.as_ptr().cast(), count) })
    }

    fn tx_fd(&self) -> Option<RawFd> {
        // A tap takes one frame per write(v).
        Some(self.fd())
    }

    fn rx_fd(&self) -> Option<RawFd> {
        // A tap gives one frame per read(v), cut to the buffers' length.
        Some(self.fd())
    }

    /// Without segmentation offloads the kernel gives the tap no frame longer than its MTU
    /// with an Ethernet header and two VLAN tags (one in the frame, one it may insert).
    fn rx_frame_bound(&mut self) -> usize {
        if self.offload.get() & !libc::TUN_F_CSUM != 0 {
            return MAX_FRAME_LEN;
        }
        match self.mtu() {
            Ok(mtu) => mtu
                .saturating_add(VNET_HDR_LEN + ETH_HLEN + 2 * VLAN_HLEN)
                .min(MAX_FRAME_LEN),
            Err(e) => {
                tracing::debug!(tap = %self.name, "tap MTU unknown, no bound on frames: {e}");
                MAX_FRAME_LEN
            }
        }
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags).map_err(|e| match e {
            TapError::Ioctl { source, .. } => source,
            other => io::Error::other(other),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in ["", "sixteen-bytes-xx", "a\0b"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
        let req = ifreq("tap0", libc::IFF_TAP).unwrap();
        // SAFETY: ifreq() NUL-terminated the name inside the array.
        let name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) };
        assert_eq!(name.to_bytes(), b"tap0");
    }
}
