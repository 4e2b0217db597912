//! `DmaSpace`: the only way a device touches guest memory.
//!
//! Every address a device is given (ring addresses, descriptor buffers) is an I/O virtual address
//! in its DMA space: the identity (IOVA = guest physical address) unless the virtual IOMMU
//! translates it. What a device accesses is a [`DmaMemory`], a vm-memory [`GuestMemory`] whose
//! addresses are IOVAs (translation and its cache are in `dma/translate.rs`), so that
//!
//! - device code compiles only against the [`GuestMemory`] trait (IOVA-aware, permission-checked)
//!   and can never take a shortcut through guest physical memory; virtio-queue translates rings
//!   and descriptors through the same object with no per-device code;
//! - putting a device behind the virtual IOMMU is a runtime change
//!   ([`DmaSpace::set_translation`]), not a type change. Each device holds a [`DmaSpace`] handle
//!   over the current object (arc-swap): the IOMMU swaps it when the guest toggles
//!   translation or moves the endpoint between domains, and a device picks the new one up at its
//!   next [`DmaSpace::snapshot`].
//!
//! Accessors check bounds and permissions and return [`DmaError`]; no raw pointer leaves this
//! module. Vectored file I/O into and out of guest memory ([`DmaSnapshot::read_file`],
//! [`DmaSnapshot::write_file`]) is done here so that block devices need no `unsafe` and no copy.

use std::fmt;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use smallvec::SmallVec;

use vm_memory::bitmap::Bitmap;
use vm_memory::{ByteValued, GuestMemoryMmap, Permissions, VolatileSlice};

mod translate;

use translate::Space;
pub use translate::{DmaIommu, DmaMapping, DmaMemory, DmaSlices, IotlbStats};

/// Guest physical memory as the VMM maps it into KVM.
pub type PhysMemory = GuestMemoryMmap;

/// Direction of a device's access to guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device reads guest memory (a driver-to-device buffer).
    Read,
    /// The device writes guest memory (a device-to-driver buffer).
    Write,
}

impl Access {
    fn permissions(self) -> Permissions {
        match self {
            Access::Read => Permissions::Read,
            Access::Write => Permissions::Write,
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "readable",
            Access::Write => "writable",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error("DMA range {addr:#x}+{len:#x} is not {access} by the device")]
    Unreachable { addr: u64, len: u64, access: Access },
    #[error("DMA range {addr:#x}+{len:#x} wraps around the address space")]
    Overflow { addr: u64, len: u64 },
    #[error("Buffer is not aligned to {align} bytes for direct I/O")]
    Misaligned { align: usize },
    #[error("Host I/O failed")]
    Io(#[source] std::io::Error),
    #[error("Host I/O stopped after {done} of {len} bytes")]
    ShortIo { done: u64, len: u64 },
}

/// One contiguous range of a device's DMA space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaRange {
    pub addr: u64,
    pub len: u64,
}

/// Ranges an [`SgList`] holds without allocating: most requests have one to three buffers.
const SG_INLINE: usize = 4;

/// A scatter-gather list: the buffers of one request, in order. Bytes are addressed as if the
/// ranges were concatenated. Short lists live inline (no allocation per request).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SgList {
    ranges: SmallVec<[DmaRange; SG_INLINE]>,
    len: u64,
}

impl SgList {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a range; empty ranges are dropped.
    #[inline]
    pub fn push(&mut self, addr: u64, len: u64) {
        if len > 0 {
            self.ranges.push(DmaRange { addr, len });
            // Descriptor lengths are u32 and chains are bounded: this cannot saturate in
            // practice, and saturating keeps the sum an upper bound if it ever did.
            self.len = self.len.saturating_add(len);
        }
    }

    /// Total length in bytes.
    #[inline]
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn ranges(&self) -> &[DmaRange] {
        &self.ranges
    }

    /// Remove the last byte and return its address (a request's status byte); `None` if the
    /// list is empty or that byte would lie past the end of the address space.
    pub fn take_last_byte(&mut self) -> Option<u64> {
        let last = self.ranges.last_mut()?;
        let addr = last.addr.checked_add(last.len - 1)?;
        last.len -= 1;
        if last.len == 0 {
            self.ranges.pop();
        }
        self.len -= 1;
        Some(addr)
    }

    /// Keep the first `at` bytes in `self` and return the rest. `at` past the end keeps all.
    pub fn split_off(&mut self, at: u64) -> SgList {
        let mut rest = SgList::new();
        let mut pos = 0u64;
        let mut keep = self.ranges.len();
        for (i, r) in self.ranges.iter_mut().enumerate() {
            if pos >= at {
                keep = i;
                break;
            }
            let inside = at - pos;
            if inside < r.len {
                // A range that wraps around the address space has no address past the wrap:
                // saturate, so that the piece is unreachable rather than at a wrapped address.
                rest.push(r.addr.saturating_add(inside), r.len - inside);
                r.len = inside;
                keep = i + 1;
                break;
            }
            pos += r.len;
        }
        for r in self.ranges.drain(keep..) {
            rest.push(r.addr, r.len);
        }
        self.len -= rest.len;
        rest
    }
}

/// Why the IOMMU refused an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The endpoint is attached to no domain and not in bypass mode.
    Detached,
    /// No mapping covers the address.
    Unmapped,
    /// A mapping covers it, but not for this access.
    Permission,
}

/// A DMA access the IOMMU refused: reported to the guest as a fault event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaFault {
    /// The endpoint (PCI requester id) whose access was refused.
    pub endpoint: u32,
    /// First refused address of the access.
    pub addr: u64,
    pub read: bool,
    pub write: bool,
    pub kind: FaultKind,
}

/// Where a translated [`DmaSpace`] reports refused accesses (the virtual IOMMU's event queue).
/// Called from a device's queue processing with the device's lock held: it must not block on
/// anything a device or the IOMMU may hold (record and wake, nothing more).
pub trait FaultReporter: Send + Sync {
    fn report(&self, fault: DmaFault);
}

/// `len` as usize, if `[addr, addr+len)` does not wrap.
fn range_len(addr: u64, len: u64) -> Result<usize, DmaError> {
    addr.checked_add(len)
        .and_then(|_| usize::try_from(len).ok())
        .ok_or(DmaError::Overflow { addr, len })
}

/// A device's handle on its DMA space. Cheap to clone; all clones see a
/// [`DmaSpace::set_translation`].
#[derive(Clone)]
pub struct DmaSpace {
    shared: Arc<Shared>,
}

struct Shared {
    /// What the space stands for now; a snapshot holds the one it started with.
    current: ArcSwap<Space>,
    /// Serialises changes (a change reads the current object to build the next one).
    change: Mutex<()>,
}

impl fmt::Debug for DmaSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaSpace")
            .field("translated", &self.is_translated())
            .finish()
    }
}

impl DmaSpace {
    /// IOVA = guest physical address. The IOMMU is never consulted.
    pub fn identity(mem: PhysMemory) -> Self {
        Self::new(mem, None)
    }

    /// A space translated through `iommu` (the endpoint's domain).
    pub fn with_iommu(mem: PhysMemory, iommu: DmaIommu) -> Self {
        Self::new(mem, Some(iommu))
    }

    fn new(phys: PhysMemory, iommu: Option<DmaIommu>) -> Self {
        Self {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(Space { phys, iommu }),
                change: Mutex::new(()),
            }),
        }
    }

    /// Translate through `iommu` from now on, or with `None` go back to the identity (bypass),
    /// over the same guest physical memory. It does not reach an access already in progress
    /// (a snapshot keeps the object it started with): the caller quiesces the device before
    /// relying on it.
    pub fn set_translation(&self, iommu: Option<DmaIommu>) {
        let _change = self
            .shared
            .change
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let phys = self.shared.current.load().phys.clone();
        self.shared.current.store(Arc::new(Space { phys, iommu }));
    }

    /// Whether addresses are translated by an IOMMU (false: identity).
    pub fn is_translated(&self) -> bool {
        self.shared.current.load().iommu.is_some()
    }

    /// The current object, for one batch of work: a device takes one per queue notification,
    /// so a batch never mixes two translations.
    pub fn snapshot(&self) -> DmaSnapshot {
        DmaSnapshot {
            mem: DmaMemory::new(self.shared.current.load()),
        }
    }
}

/// Most `iovec`s one `preadv`/`pwritev` takes (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Host slices of guest memory kept inline: a range rarely spans more than a few memory
/// regions or IOMMU mappings.
type Slices<'a> = SmallVec<[VolatileSlice<'a, ()>; 8]>;

/// One consistent view of a DMA space. Every accessor checks the whole range and the access
/// direction before it touches memory.
pub struct DmaSnapshot {
    mem: DmaMemory,
}

impl DmaSnapshot {
    /// The memory object, for virtio-queue (which translates through it on its own).
    pub fn memory(&self) -> &DmaMemory {
        &self.mem
    }

    /// Whether `[addr, addr+len)` is reachable for `access`.
    pub fn check(&self, addr: u64, len: u64, access: Access) -> Result<(), DmaError> {
        if self.fast(addr, len, access)?.is_some() {
            return Ok(());
        }
        let mut slices = Slices::new();
        self.range_slices(addr, len, access, &mut slices)
    }

    pub fn read_obj<T: ByteValued>(&self, addr: u64) -> Result<T, DmaError> {
        let mut v = T::zeroed();
        self.read(addr, v.as_mut_slice())?;
        Ok(v)
    }

    pub fn write_obj<T: ByteValued>(&self, addr: u64, val: T) -> Result<(), DmaError> {
        self.write(addr, val.as_slice())
    }

    /// The host memory behind `[addr, addr+len)`, checked for `access` (a refusal is reported
    /// once, as for any access): `Some` when it is one host slice, `None` when it is split over
    /// several memory regions or mappings (the caller then takes its general path, which
    /// translates again but cannot be refused).
    #[inline(always)]
    pub(crate) fn single(
        &self,
        addr: u64,
        len: u64,
        access: Access,
    ) -> Result<Option<VolatileSlice<'_, ()>>, DmaError> {
        if let Some(one) = self.fast(addr, len, access)? {
            return Ok(Some(one));
        }
        self.single_general(addr, len, access)
    }

    /// [`DmaSnapshot::single`] for a range `fast` could not place.
    #[inline(never)]
    fn single_general(
        &self,
        addr: u64,
        len: u64,
        access: Access,
    ) -> Result<Option<VolatileSlice<'_, ()>>, DmaError> {
        let mut slices = Slices::new();
        self.range_slices(addr, len, access, &mut slices)?;
        Ok(match slices.as_slice() {
            [one] => Some(*one),
            _ => None,
        })
    }

    /// The one host slice behind `[addr, addr+len)` found without lists (one mapping, one
    /// memory region: nearly every access), checked for `access`; `Ok(None)` when the general
    /// path must tell (it cannot be refused by translation then).
    #[inline(always)]
    fn fast(
        &self,
        addr: u64,
        len: u64,
        access: Access,
    ) -> Result<Option<VolatileSlice<'_, ()>>, DmaError> {
        let n = range_len(addr, len)?;
        self.mem
            .one_slice(addr, n, access.permissions())
            .map_err(|_| DmaError::Unreachable { addr, len, access })
    }

    /// The host slices behind `[addr, addr+len)`, appended to `out`, checked for `access`
    /// over the whole range in one pass of translation: an error means no slice was used.
    fn range_slices<'a>(
        &'a self,
        addr: u64,
        len: u64,
        access: Access,
        out: &mut Slices<'a>,
    ) -> Result<(), DmaError> {
        let n = range_len(addr, len)?;
        if self.mem.gather(addr, n, access.permissions(), out) {
            Ok(())
        } else {
            Err(DmaError::Unreachable { addr, len, access })
        }
    }

    /// A byte the device will write later (a request's status), checked for writing now.
    pub fn byte(&self, addr: u64) -> Result<DmaByte<'_>, DmaError> {
        if let Some(slice) = self.fast(addr, 1, Access::Write)? {
            return Ok(DmaByte { slice });
        }
        let mut slices = Slices::new();
        self.range_slices(addr, 1, Access::Write, &mut slices)?;
        match slices.into_iter().next() {
            Some(slice) => Ok(DmaByte { slice }),
            // range_slices returned slices adding up to one byte.
            None => Err(DmaError::Unreachable {
                addr,
                len: 1,
                access: Access::Write,
            }),
        }
    }

    /// Copy `buf.len()` bytes from the DMA space. The whole range is checked before any byte
    /// moves.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        if let Some(one) = self.fast(addr, buf.len() as u64, Access::Read)? {
            one.copy_to(buf);
            return Ok(());
        }
        let mut slices = Slices::new();
        self.range_slices(addr, buf.len() as u64, Access::Read, &mut slices)?;
        let mut done = 0usize;
        for s in &slices {
            // The slices add up to buf.len(): each copies all of itself.
            done += s.copy_to(&mut buf[done..]);
        }
        Ok(())
    }

    /// Copy `buf` into the DMA space. The whole range is checked before any byte moves.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), DmaError> {
        if let Some(one) = self.fast(addr, buf.len() as u64, Access::Write)? {
            // copy_from marks the pages dirty.
            one.copy_from(buf);
            return Ok(());
        }
        let mut slices = Slices::new();
        self.range_slices(addr, buf.len() as u64, Access::Write, &mut slices)?;
        let mut done = 0usize;
        for s in &slices {
            // The slices add up to buf.len(); copy_from marks the pages dirty.
            s.copy_from(&buf[done..done + s.len()]);
            done += s.len();
        }
        Ok(())
    }

    /// Gather up to `buf.len()` bytes from the start of `sg`; returns how many were copied.
    pub fn read_sg(&self, sg: &SgList, buf: &mut [u8]) -> Result<usize, DmaError> {
        let mut done = 0usize;
        for r in sg.ranges() {
            if done == buf.len() {
                break;
            }
            let n = usize::try_from(r.len)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            self.read(r.addr, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(done)
    }

    /// Scatter up to `buf.len()` bytes to the start of `sg`; returns how many were copied.
    pub fn write_sg(&self, sg: &SgList, buf: &[u8]) -> Result<usize, DmaError> {
        let mut done = 0usize;
        for r in sg.ranges() {
            if done == buf.len() {
                break;
            }
            let n = usize::try_from(r.len)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            self.write(r.addr, &buf[done..done + n])?;
            done += n;
        }
        Ok(done)
    }

    /// The host memory behind `sg`, checked for `access`. Fails before any byte moves.
    fn slices(&self, sg: &SgList, access: Access) -> Result<Slices<'_>, DmaError> {
        let mut out = Slices::new();
        for r in sg.ranges() {
            self.range_slices(r.addr, r.len, access, &mut out)?;
        }
        Ok(out)
    }

    /// Read `sg.len()` bytes of `file` at `offset` straight into the DMA space (`preadv`).
    /// With `align > 1` (O_DIRECT) every buffer's host address and length, and `offset`, must
    /// be multiples of `align`, else [`DmaError::Misaligned`] before any I/O.
    pub fn read_file(
        &self,
        file: &File,
        offset: u64,
        sg: &SgList,
        align: usize,
    ) -> Result<(), DmaError> {
        // One buffer in one host slice (a 4 KiB request): no list of slices to build.
        if let [r] = sg.ranges()
            && let Some(one) = self.single(r.addr, r.len, Access::Write)?
        {
            let result = file_io(file, offset, std::slice::from_ref(&one), align, true);
            one.bitmap().mark_dirty(0, one.len());
            return result;
        }
        let slices = self.slices(sg, Access::Write)?;
        let result = file_io(file, offset, &slices, align, true);
        // Dirty-page tracking (migration): the device wrote these through raw pointers.
        for s in &slices {
            s.bitmap().mark_dirty(0, s.len());
        }
        result
    }

    /// Write `sg.len()` bytes from the DMA space to `file` at `offset` (`pwritev`). Alignment as
    /// for [`DmaSnapshot::read_file`].
    pub fn write_file(
        &self,
        file: &File,
        offset: u64,
        sg: &SgList,
        align: usize,
    ) -> Result<(), DmaError> {
        if let [r] = sg.ranges()
            && let Some(one) = self.single(r.addr, r.len, Access::Read)?
        {
            return file_io(file, offset, std::slice::from_ref(&one), align, false);
        }
        let slices = self.slices(sg, Access::Read)?;
        file_io(file, offset, &slices, align, false)
    }

    /// Send the bytes of `sg` to `fd` in one `write`/`writev` straight from the DMA space (one
    /// packet on a tap or a datagram socket); returns what the call took. Every range is
    /// checked readable before the call. A frame in more host slices than one `writev` takes
    /// is refused ([`DmaError::ShortIo`] with nothing done).
    pub fn write_fd(&self, fd: RawFd, sg: &SgList) -> Result<usize, DmaError> {
        // One buffer in one host slice (a frame as Linux sends it): no lists to build.
        if let [r] = sg.ranges()
            && let Some(one) = self.single(r.addr, r.len, Access::Read)?
        {
            return write_fd_one(fd, &one);
        }
        let slices = self.slices(sg, Access::Read)?;
        if slices.len() > IOV_MAX {
            return Err(DmaError::ShortIo {
                done: 0,
                len: sg.len(),
            });
        }
        // The guards keep each host mapping in place while the kernel reads through it.
        let guards: SmallVec<[_; 8]> = slices.iter().map(|s| s.ptr_guard()).collect();
        let iovs: SmallVec<[libc::iovec; 8]> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr().cast_mut().cast(),
                iov_len: g.len(),
            })
            .collect();
        // At most IOV_MAX iovecs, checked above.
        let count = libc::c_int::try_from(iovs.len()).unwrap_or(libc::c_int::MAX);
        loop {
            let n = match iovs.as_slice() {
                // SAFETY: the iovec points into guest memory that `slices` (borrowed from the
                // snapshot, so mapped for its lifetime) checked as readable for its whole
                // length; write only reads it.
                [v] => unsafe { libc::write(fd, v.iov_base, v.iov_len) },
                // SAFETY: as above, every iovec describes checked, mapped guest memory, and
                // writev only reads it.
                _ => unsafe { libc::writev(fd, iovs.as_ptr(), count) },
            };
            match usize::try_from(n) {
                Ok(n) => return Ok(n),
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(DmaError::Io(e));
                    }
                }
            }
        }
    }

    /// Receive one packet from `fd` with one `readv` straight into the DMA space: into `sg`
    /// (every range checked writable first), then, past its end, into `tail` (host memory for
    /// the part of a packet longer than the guest's buffers). Returns the packet's length as
    /// the call gave it; an interrupted call is retried, any other failure (including
    /// `WouldBlock`) is [`DmaError::Io`] with nothing received.
    pub fn read_fd(&self, fd: RawFd, sg: &SgList, tail: &mut [u8]) -> Result<usize, DmaError> {
        // One buffer in one host slice (a receive buffer as Linux posts it): two iovecs on
        // the stack.
        if let [r] = sg.ranges()
            && let Some(one) = self.single(r.addr, r.len, Access::Write)?
        {
            return read_fd_one(fd, &one, tail);
        }
        let slices = self.slices(sg, Access::Write)?;
        if slices.len() >= IOV_MAX {
            return Err(DmaError::ShortIo {
                done: 0,
                len: sg.len(),
            });
        }
        // The guards keep each host mapping in place while the kernel writes through it.
        let guards: SmallVec<[_; 8]> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iovs: SmallVec<[libc::iovec; 8]> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: g.len(),
            })
            .collect();
        iovs.push(libc::iovec {
            iov_base: tail.as_mut_ptr().cast(),
            iov_len: tail.len(),
        });
        // At most IOV_MAX iovecs, checked above.
        let count = libc::c_int::try_from(iovs.len()).unwrap_or(libc::c_int::MAX);
        let result = loop {
            // SAFETY: every iovec but the last points into guest memory that `slices` (borrowed
            // from the snapshot, so mapped for its lifetime) checked as writable for its whole
            // length, the last into `tail`, borrowed mutably for the call; readv writes only
            // inside them.
            let n = unsafe { libc::readv(fd, iovs.as_ptr(), count) };
            match usize::try_from(n) {
                Ok(n) => break Ok(n),
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        break Err(DmaError::Io(e));
                    }
                }
            }
        };
        if let Ok(n) = result {
            // Dirty-page tracking (migration): the kernel wrote through raw pointers.
            let mut left = n;
            for s in &slices {
                let k = left.min(s.len());
                s.bitmap().mark_dirty(0, k);
                left -= k;
            }
        }
        result
    }
}

/// [`DmaSnapshot::write_fd`] for one host slice that [`DmaSnapshot::single`] gave for
/// reading: one `write`.
#[inline(always)]
pub(crate) fn write_fd_one(fd: RawFd, one: &VolatileSlice<'_, ()>) -> Result<usize, DmaError> {
    let g = one.ptr_guard();
    // SAFETY: the pointer and length describe guest memory that `single` checked as readable,
    // mapped while the snapshot (borrowed by `one`) lives; write only reads it.
    retry_io(|| unsafe { libc::write(fd, g.as_ptr().cast(), g.len()) })
}

/// [`DmaSnapshot::read_fd`] for one host slice that [`DmaSnapshot::single`] gave for writing:
/// one `readv` into it and then `tail`, or a plain `read` when `tail` is empty (the kernel's
/// `readv` path costs ~35 ns more on a tap).
#[inline]
pub(crate) fn read_fd_one(
    fd: RawFd,
    one: &VolatileSlice<'_, ()>,
    tail: &mut [u8],
) -> Result<usize, DmaError> {
    let g = one.ptr_guard_mut();
    if tail.is_empty() {
        // SAFETY: the pointer and length describe guest memory that `single` checked as
        // writable, mapped while the snapshot (borrowed by `one`) lives; read writes only
        // inside it.
        let n = retry_io(|| unsafe { libc::read(fd, g.as_ptr().cast(), g.len()) })?;
        one.bitmap().mark_dirty(0, n.min(one.len()));
        return Ok(n);
    }
    let iovs = [
        libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        },
        libc::iovec {
            iov_base: tail.as_mut_ptr().cast(),
            iov_len: tail.len(),
        },
    ];
    // SAFETY: the first iovec describes guest memory that `single` checked as writable,
    // mapped while the snapshot (borrowed by `one`) lives; the second `tail`, borrowed mutably
    // for the call; readv writes only inside them.
    let n = retry_io(|| unsafe { libc::readv(fd, iovs.as_ptr(), 2) })?;
    one.bitmap().mark_dirty(0, n.min(one.len()));
    Ok(n)
}

/// Run a `read`/`write`-style call until it is not interrupted; a negative result is the
/// call's error.
#[inline(always)]
pub(crate) fn retry_io(mut call: impl FnMut() -> isize) -> Result<usize, DmaError> {
    loop {
        match usize::try_from(call()) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(DmaError::Io(e));
                }
            }
        }
    }
}

/// One writable byte of a [`DmaSnapshot`], checked when it was taken: writing it cannot fail.
pub struct DmaByte<'a> {
    slice: VolatileSlice<'a, ()>,
}

impl DmaByte<'_> {
    pub fn write(&self, v: u8) {
        // A one-byte slice of guest memory: the copy writes exactly that byte.
        self.slice.copy_from(&[v]);
    }
}

/// [`file_io`] for one slice (a 4 KiB request): `pread`/`pwrite`, no iovec lists.
fn file_io_one(
    file: &File,
    offset: u64,
    slice: &VolatileSlice<'_, ()>,
    align: usize,
    into_memory: bool,
) -> Result<(), DmaError> {
    let g = slice.ptr_guard_mut();
    let (base, len) = (g.as_ptr(), g.len());
    if align > 1 {
        let aligned = |v: usize| v % align == 0;
        if !(usize::try_from(offset).is_ok_and(aligned) && aligned(base as usize) && aligned(len)) {
            return Err(DmaError::Misaligned { align });
        }
    }
    let fd = file.as_raw_fd();
    let mut done = 0usize;
    while done < len {
        let short = DmaError::ShortIo {
            done: done as u64,
            len: len as u64,
        };
        let off = offset
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or(short)?;
        let (p, left) = (base.wrapping_add(done), len - done);
        let n = retry_io(|| {
            if into_memory {
                // SAFETY: `p..p+left` lies in the guest memory `slice` covers (done < len),
                // checked writable and mapped while the snapshot lives; pread writes only there.
                unsafe { libc::pread(fd, p.cast(), left, off) }
            } else {
                // SAFETY: as above, checked readable; pwrite only reads it.
                unsafe { libc::pwrite(fd, p.cast(), left, off) }
            }
        })?;
        if n == 0 {
            return Err(DmaError::ShortIo {
                done: done as u64,
                len: len as u64,
            });
        }
        done += n;
    }
    Ok(())
}

/// `preadv` (`into_memory`) or `pwritev` over `slices`, resuming after short transfers.
fn file_io(
    file: &File,
    mut offset: u64,
    slices: &[VolatileSlice<'_, ()>],
    align: usize,
    into_memory: bool,
) -> Result<(), DmaError> {
    if let [one] = slices {
        return file_io_one(file, offset, one, align, into_memory);
    }
    // The guards keep each host mapping in place while the kernel uses the pointers (they matter
    // for Xen-style mappings; for mmap-backed memory the snapshot already does).
    let guards: SmallVec<[_; 8]> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iovs: SmallVec<[libc::iovec; 8]> = guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        })
        .collect();
    if align > 1 {
        let aligned = |v: usize| v % align == 0;
        let ok = usize::try_from(offset).is_ok_and(aligned)
            && iovs
                .iter()
                .all(|v| aligned(v.iov_base as usize) && aligned(v.iov_len));
        if !ok {
            return Err(DmaError::Misaligned { align });
        }
    }
    let total: u64 = iovs.iter().map(|v| v.iov_len as u64).sum();
    let mut done = 0u64;
    let mut first = 0usize;
    while first < iovs.len() {
        let batch = &iovs[first..iovs.len().min(first + IOV_MAX)];
        let count = libc::c_int::try_from(batch.len()).unwrap_or(libc::c_int::MAX);
        let off =
            libc::off_t::try_from(offset).map_err(|_| DmaError::ShortIo { done, len: total })?;
        let fd = file.as_raw_fd();
        // One buffer (the common 4 KiB request): pread/pwrite, which spare the kernel copying
        // and walking an iovec array.
        let n = match (into_memory, batch) {
            // SAFETY: the iovec points into guest memory that `slices` (borrowed from the
            // snapshot, so mapped for its lifetime) checked as writable for its whole length;
            // the kernel writes only there.
            (true, [v]) => unsafe { libc::pread(fd, v.iov_base, v.iov_len, off) },
            // SAFETY: as above, checked and mapped guest memory; pwrite only reads it.
            (false, [v]) => unsafe { libc::pwrite(fd, v.iov_base, v.iov_len, off) },
            // SAFETY: every iovec points into guest memory that `slices` (borrowed from the
            // snapshot, so mapped for its lifetime) checked as writable for its whole length;
            // the kernel writes only there.
            (true, _) => unsafe { libc::preadv(fd, batch.as_ptr(), count, off) },
            // SAFETY: as above, the iovecs describe checked, mapped guest memory; pwritev only
            // reads it.
            (false, _) => unsafe { libc::pwritev(fd, batch.as_ptr(), count, off) },
        };
        let n = match u64::try_from(n) {
            Ok(0) => return Err(DmaError::ShortIo { done, len: total }),
            Ok(n) => n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DmaError::Io(e));
            }
        };
        done += n;
        offset += n;
        // Drop what was transferred: whole iovecs, then the front of a partial one.
        let mut left = n;
        while first < iovs.len() && left >= iovs[first].iov_len as u64 {
            left -= iovs[first].iov_len as u64;
            first += 1;
        }
        if left > 0 {
            let v = &mut iovs[first];
            // `left` < v.iov_len, a usize.
            let l = usize::try_from(left).unwrap_or(v.iov_len);
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(l).cast();
            v.iov_len -= l;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> PhysMemory {
        PhysMemory::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)])
            .unwrap()
    }

    #[test]
    fn sglist_split() {
        let mut sg = SgList::new();
        sg.push(0x100, 0x10);
        sg.push(0x200, 0);
        sg.push(0x300, 0x20);
        assert_eq!(sg.ranges().len(), 2);
        assert_eq!(sg.len(), 0x30);
        let rest = sg.split_off(0x18);
        assert_eq!(
            sg.ranges(),
            &[
                DmaRange {
                    addr: 0x100,
                    len: 0x10
                },
                DmaRange {
                    addr: 0x300,
                    len: 0x8
                }
            ]
        );
        assert_eq!(
            rest.ranges(),
            &[DmaRange {
                addr: 0x308,
                len: 0x18
            }]
        );
        assert_eq!((sg.len(), rest.len()), (0x18, 0x18));
        let mut sg2 = sg.clone();
        assert!(sg2.split_off(0x18).is_empty());
        assert_eq!(sg2, sg);
        let all = sg2.split_off(0);
        assert!(sg2.is_empty());
        assert_eq!(all, sg);
        let mut sg3 = sg.clone();
        let tail = sg3.split_off(0x10);
        assert_eq!(
            tail.ranges(),
            &[DmaRange {
                addr: 0x300,
                len: 0x8
            }]
        );
    }

    #[test]
    fn identity_bounds() {
        let dma = DmaSpace::identity(mem());
        assert!(!dma.is_translated());
        let s = dma.snapshot();
        s.write_obj(0xfff0u64, 0x1122_3344_5566_7788u64).unwrap();
        assert_eq!(s.read_obj::<u64>(0xfff0).unwrap(), 0x1122_3344_5566_7788);
        // Straddles the end of the first region into the hole.
        assert!(matches!(
            s.write_obj(0xfffcu64, 0u64),
            Err(DmaError::Unreachable { .. })
        ));
        assert!(s.read_obj::<u8>(0x18000).is_err());
        assert!(matches!(
            s.check(u64::MAX - 1, 4, Access::Read),
            Err(DmaError::Overflow { .. })
        ));
        s.check(0x20000, 0x10000, Access::Write).unwrap();
        assert!(s.check(0x20000, 0x10001, Access::Write).is_err());
    }

    #[test]
    fn translated_space_checks_mappings_and_permissions() {
        let phys = mem();
        let iommu = DmaIommu::new();
        // IOVA 0x1000_0000 -> GPA 0x2000, read-only; IOVA 0x2000_0000 -> GPA 0x20000, RW.
        iommu
            .map(0x1000_0000, 0x2000, 0x1000, Permissions::Read)
            .unwrap();
        iommu
            .map(0x2000_0000, 0x20000, 0x1000, Permissions::ReadWrite)
            .unwrap();
        let dma = DmaSpace::with_iommu(phys.clone(), iommu.clone());
        assert!(dma.is_translated());
        let s = dma.snapshot();
        phys.write_obj(0xabcdu16, GuestAddress(0x2010)).unwrap();
        assert_eq!(s.read_obj::<u16>(0x1000_0010).unwrap(), 0xabcd);
        assert!(s.write_obj(0x1000_0010, 1u16).is_err(), "read-only mapping");
        s.write_obj(0x2000_0ff8, 7u64).unwrap();
        assert_eq!(phys.read_obj::<u64>(GuestAddress(0x20ff8)).unwrap(), 7);
        assert!(
            s.read_obj::<u64>(0x2000_0ffc).is_err(),
            "runs past the mapping"
        );
        assert!(s.read_obj::<u8>(0x2010).is_err(), "GPA is not an IOVA");
        assert!(s.read_obj::<u8>(u64::MAX).is_err());
        drop(s);
        iommu.unmap(0x2000_0000, 0x1000).unwrap();
        assert!(dma.snapshot().read_obj::<u8>(0x2000_0000).is_err());
        // Back to identity through the handle: every clone sees it.
        let clone = dma.clone();
        dma.set_translation(None);
        assert!(!clone.is_translated());
        assert_eq!(clone.snapshot().read_obj::<u16>(0x2010).unwrap(), 0xabcd);
    }

    #[test]
    fn copies_check_the_whole_range_before_a_byte_moves() {
        let phys = mem();
        let dma = DmaSpace::identity(phys.clone());
        let s = dma.snapshot();
        // Runs from the end of the first region into the hole: nothing is written or read.
        phys.write_slice(&[0x11; 8], GuestAddress(0xfff8)).unwrap();
        assert!(matches!(
            s.write(0xfff8, &[0x22; 16]),
            Err(DmaError::Unreachable { .. })
        ));
        let mut back = [0u8; 8];
        phys.read_slice(&mut back, GuestAddress(0xfff8)).unwrap();
        assert_eq!(back, [0x11; 8]);
        let mut buf = [0x33u8; 16];
        assert!(s.read(0xfff8, &mut buf).is_err());
        assert_eq!(buf, [0x33; 16]);
        assert!(s.read_obj::<u64>(0xfffc).is_err());
        // Up to the last byte of a region works, in both directions.
        s.write(0xfff8, &[0x44; 8]).unwrap();
        s.read(0xfff8, &mut back).unwrap();
        assert_eq!(back, [0x44; 8]);
        // Empty copies are fine anywhere that does not wrap.
        s.write(0x18000, &[]).unwrap();
        // A status byte: checked when taken, then written.
        let b = s.byte(0x2_ffff).unwrap();
        b.write(0x5a);
        assert_eq!(phys.read_obj::<u8>(GuestAddress(0x2_ffff)).unwrap(), 0x5a);
        assert!(s.byte(0x3_0000).is_err());
        assert!(s.byte(0x18000).is_err());
        assert!(matches!(s.byte(u64::MAX), Err(DmaError::Overflow { .. })));
    }

    #[test]
    fn translated_copies_and_status_bytes_respect_permissions() {
        let phys = mem();
        let iommu = DmaIommu::new();
        iommu
            .map(0x1000_0000, 0x2000, 0x1000, Permissions::Read)
            .unwrap();
        // Two IOVA pages that are contiguous but map to different regions.
        iommu
            .map(0x2000_0000, 0xf000, 0x1000, Permissions::ReadWrite)
            .unwrap();
        iommu
            .map(0x2000_1000, 0x20000, 0x1000, Permissions::ReadWrite)
            .unwrap();
        let dma = DmaSpace::with_iommu(phys.clone(), iommu);
        let s = dma.snapshot();
        assert!(s.byte(0x1000_0010).is_err(), "read-only mapping");
        s.byte(0x2000_0010).unwrap().write(9);
        assert_eq!(phys.read_obj::<u8>(GuestAddress(0xf010)).unwrap(), 9);
        // A copy across the two mappings lands in both regions.
        s.write(0x2000_0ffc, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(
            phys.read_obj::<u32>(GuestAddress(0xfffc)).unwrap(),
            0x0403_0201
        );
        assert_eq!(
            phys.read_obj::<u32>(GuestAddress(0x20000)).unwrap(),
            0x0807_0605
        );
        assert_eq!(
            s.read_obj::<u64>(0x2000_0ffc).unwrap(),
            0x0807_0605_0403_0201
        );
        // Past the second mapping: refused whole.
        assert!(s.write(0x2000_1ffc, &[0; 8]).is_err());
        assert_eq!(phys.read_obj::<u32>(GuestAddress(0x20ffc)).unwrap(), 0);
    }

    #[test]
    fn write_fd_sends_one_packet_checked_first() {
        let dma = DmaSpace::identity(mem());
        let s = dma.snapshot();
        let (tx, rx) = std::os::unix::net::UnixDatagram::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        s.write(0xfff0, &[1; 16]).unwrap();
        s.write(0x20000, &[2; 8]).unwrap();
        // Two buffers in two regions: one datagram (writev).
        let mut sg = SgList::new();
        sg.push(0xfff0, 16);
        sg.push(0x20000, 8);
        assert_eq!(s.write_fd(tx.as_raw_fd(), &sg).unwrap(), 24);
        let mut got = [0u8; 64];
        assert_eq!(rx.recv(&mut got).unwrap(), 24);
        assert_eq!(&got[..16], &[1; 16]);
        assert_eq!(&got[16..24], &[2; 8]);
        // One buffer (write).
        let mut one = SgList::new();
        one.push(0x20000, 8);
        assert_eq!(s.write_fd(tx.as_raw_fd(), &one).unwrap(), 8);
        assert_eq!(rx.recv(&mut got).unwrap(), 8);
        // A buffer in the hole: refused, nothing sent.
        let mut bad = SgList::new();
        bad.push(0x100, 8);
        bad.push(0x18000, 8);
        assert!(matches!(
            s.write_fd(tx.as_raw_fd(), &bad),
            Err(DmaError::Unreachable { .. })
        ));
        assert!(rx.recv(&mut got).is_err(), "nothing may have been sent");
        // A host failure is an I/O error.
        drop(rx);
        assert!(matches!(
            s.write_fd(tx.as_raw_fd(), &one),
            Err(DmaError::Io(_))
        ));
    }

    #[test]
    fn read_fd_receives_one_packet_into_guest_buffers_then_the_tail() {
        let phys = mem();
        let dma = DmaSpace::identity(phys.clone());
        let s = dma.snapshot();
        let (tx, rx) = std::os::unix::net::UnixDatagram::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        // Two buffers in two regions, 24 bytes, then a host tail.
        let mut sg = SgList::new();
        sg.push(0xfff0, 16);
        sg.push(0x20000, 8);
        let pkt: Vec<u8> = (0..40u8).collect();
        tx.send(&pkt).unwrap();
        let mut tail = [0u8; 64];
        assert_eq!(s.read_fd(rx.as_raw_fd(), &sg, &mut tail).unwrap(), 40);
        let mut got = [0u8; 24];
        s.read_sg(&sg, &mut got).unwrap();
        assert_eq!(&got[..], &pkt[..24]);
        assert_eq!(&tail[..16], &pkt[24..]);
        // Nothing waiting: WouldBlock, as an I/O error.
        match s.read_fd(rx.as_raw_fd(), &sg, &mut tail) {
            Err(DmaError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
            other => panic!("{other:?}"),
        }
        // A buffer in the hole: refused before the call, the packet stays queued.
        tx.send(&pkt).unwrap();
        let mut bad = SgList::new();
        bad.push(0x18000, 8);
        assert!(matches!(
            s.read_fd(rx.as_raw_fd(), &bad, &mut tail),
            Err(DmaError::Unreachable { .. })
        ));
        assert_eq!(s.read_fd(rx.as_raw_fd(), &sg, &mut tail).unwrap(), 40);
    }

    #[test]
    fn file_io_roundtrip_across_regions() {
        let dma = DmaSpace::identity(mem());
        let s = dma.snapshot();
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        let pattern: Vec<u8> = (0..0x3000u32).map(|i| (i * 7) as u8).collect();
        file.write_all(&pattern).unwrap();
        // Three buffers in two regions, out of address order.
        let mut sg = SgList::new();
        sg.push(0xf000, 0x1000);
        sg.push(0x20000, 0x1800);
        sg.push(0x100, 0x800);
        s.read_file(&file, 0, &sg, 1).unwrap();
        let mut got = vec![0u8; 0x3000];
        assert_eq!(s.read_sg(&sg, &mut got).unwrap(), 0x3000);
        assert_eq!(got, pattern);
        // Write it back shifted by 0x200 in the file.
        s.write_file(&file, 0x200, &sg, 1).unwrap();
        let mut back = vec![0u8; 0x3000];
        file.seek(SeekFrom::Start(0x200)).unwrap();
        file.read_exact(&mut back).unwrap();
        assert_eq!(back, pattern);
        // Past EOF is a short read, not a hang or a panic.
        assert!(matches!(
            s.read_file(&file, 0x3000, &sg, 1),
            Err(DmaError::ShortIo { .. })
        ));
        // A buffer in the hole fails before any I/O.
        let mut bad = SgList::new();
        bad.push(0x100, 0x10);
        bad.push(0x18000, 0x10);
        assert!(matches!(
            s.read_file(&file, 0, &bad, 1),
            Err(DmaError::Unreachable { .. })
        ));
        let mut odd = SgList::new();
        odd.push(0x101, 0x200);
        assert!(matches!(
            s.read_file(&file, 0, &odd, 512),
            Err(DmaError::Misaligned { align: 512 })
        ));
    }

    #[test]
    fn many_iovecs_are_batched() {
        let dma = DmaSpace::identity(mem());
        let s = dma.snapshot();
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.set_len(0x10000).unwrap();
        let mut sg = SgList::new();
        for i in 0..(IOV_MAX as u64 + 300) {
            sg.push(i * 8, 4);
        }
        s.write(0, &[0xaa; 0x3000]).unwrap();
        s.write_file(&file, 0, &sg, 1).unwrap();
        s.write(0, &[0; 0x3000]).unwrap();
        s.read_file(&file, 0, &sg, 1).unwrap();
        let mut b = [0u8; 8];
        s.read(8 * 1300, &mut b).unwrap();
        assert_eq!(b, [0xaa, 0xaa, 0xaa, 0xaa, 0, 0, 0, 0]);
    }
}
