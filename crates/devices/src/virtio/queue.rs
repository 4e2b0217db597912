//! Serving a split virtqueue: virtio-queue's `Queue` keeps the queue's configuration and
//! positions and turns notifications on and off; the per-request work (available entries,
//! descriptors, used entries) is done here through a [`Ring`], which resolves the three ring
//! areas to host slices once per batch instead of translating every access (vm-memory's generic
//! path costs ~40 ns an access here, and a request makes six or more).
//!
//! Everything in the rings is written by the guest and read here once, into a local value,
//! before it is checked and used: the driver may change ring memory at any time and can only
//! hurt itself by it. What is checked:
//!
//! - [`drain`] and [`fill`] read the available index and pop exactly that many heads; an index
//!   more than the queue size ahead, an unreadable ring or a head index outside the queue is a
//!   [`QueueError`] (virtio-queue's own iterator would make these look like an empty queue).
//! - A [`Chain`] walks descriptors with virtio-queue's rules: at most the table's size (a loop
//!   ends there), a `next` index inside the table, one level of indirect table whose length is
//!   a multiple of 16, under 4 GiB in total. It stops silently on those; [`parse_chain`] tells
//!   a proper end (last descriptor without NEXT) from a cut-short chain and checks that readable
//!   buffers come before writable ones. Buffer addresses are checked by the [`DmaSnapshot`]
//!   accessors when a buffer is used.
//! - With translation on, or a ring split over two memory regions or IOMMU mappings, the same
//!   accesses go through the [`DmaSnapshot`] one at a time (same checks, slower).

use std::marker::PhantomData;
use std::num::Wrapping;
use std::sync::atomic::{AtomicU16, Ordering, fence};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, VolatileSlice};

use super::dma::{Access, DmaSnapshot, SgList};

/// Descriptor table entry size (virtio 1.2, 2.7.5), and the alignment a table's host address
/// needs to be read in place (the ring's is 16-aligned; an indirect one need not be).
const DESC_SIZE: u64 = 16;
const DESC_ALIGN: usize = align_of::<Descriptor>();
/// Flags, index, and the trailing event field of the available and used rings (2.7.6, 2.7.8).
const RING_META: u64 = 6;
const AVAIL_ELEM: u64 = 2;
const USED_ELEM: u64 = 8;
/// Where the rings' entries start (after flags and index).
const RING_ENTRIES: u64 = 4;

/// A queue the device cannot serve any more: it needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("Cannot access the queue's rings")]
    Ring(#[source] virtio_queue::Error),
    #[error("Cannot access the queue's {0} ring")]
    RingAccess(&'static str),
    #[error("Driver made {pending} buffers available in a queue of {size}")]
    TooManyAvailable { pending: u16, size: u16 },
    #[error("Cannot read available ring entry {index}")]
    AvailEntry { index: u16 },
    #[error("Descriptor head {head} is outside a queue of {size}")]
    BadHead { head: u16, size: u16 },
}

/// A descriptor chain that cannot be used as it stands.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("Descriptor chain is empty or its head is unreadable")]
    Empty,
    #[error(
        "Descriptor chain is cut short (a loop, a bad next index or indirect table, an \
         unreadable descriptor, or over 4 GiB)"
    )]
    Truncated,
    #[error("Descriptor chain has more than {0} descriptors")]
    TooLong(usize),
    #[error("Descriptor chain has a readable descriptor after a writable one")]
    Order,
}

/// The buffers of a well-formed chain: driver-to-device bytes, then device-to-driver bytes.
#[derive(Debug, Default)]
pub struct ChainBuffers {
    pub readable: SgList,
    pub writable: SgList,
}

/// A chain refused by [`parse_chain`]. `status` is the last byte of the chain's last descriptor
/// when the chain ended properly on a writable descriptor: a device may report an error there.
#[derive(Debug)]
pub struct ChainFault {
    pub error: ChainError,
    pub status: Option<u64>,
}

/// A ring part or descriptor table in one host slice, for one batch: `len` bytes at `base`,
/// checked for the part's access when resolved, and aligned as its fields need (the guest
/// addresses are, as virtio-queue enforces; the host pointer is checked too). Reads and writes
/// are bounds- and alignment-checked, volatile (the guest may change the ring at any time),
/// and cost a compare or two rather than vm-memory's generic checks (measured on the
/// virtio-net path: ~20 instructions an access).
#[derive(Clone, Copy)]
struct HostMem<'a> {
    base: *mut u8,
    len: usize,
    /// The memory stays mapped while the snapshot the slice came from is borrowed.
    _slice: PhantomData<VolatileSlice<'a, ()>>,
}

impl<'a> HostMem<'a> {
    /// `slice` if its host address is aligned to `align`. Guest memory here has no dirty
    /// bitmap (`PhysMemory` is `GuestMemoryMmap<()>`) and no Xen-style mapping, so the pointer
    /// is all there is to the slice.
    fn new(slice: VolatileSlice<'a, ()>, align: usize) -> Option<Self> {
        let base = slice.ptr_guard_mut().as_ptr();
        ((base as usize) % align == 0).then_some(Self {
            base,
            len: slice.len(),
            _slice: PhantomData,
        })
    }

    /// A pointer to the `T` at `offset`, if it lies inside and is aligned for `T`.
    #[inline]
    fn at<T>(&self, offset: usize) -> Option<*mut T> {
        let end = offset.checked_add(size_of::<T>())?;
        if end > self.len {
            return None;
        }
        // In bounds: offset < len, inside the host slice.
        let p = self.base.wrapping_add(offset).cast::<T>();
        p.is_aligned().then_some(p)
    }

    /// The `T` at `offset`, read once.
    #[inline]
    fn read<T: ByteValued>(&self, offset: usize) -> Option<T> {
        let p = self.at::<T>(offset)?;
        // SAFETY: `at` checked that the `T` lies inside the slice, which is mapped guest memory
        // while 'a lives, and that it is aligned; any bit pattern is a valid ByteValued.
        Some(unsafe { p.read_volatile() })
    }

    /// Write `v` at `offset`; false if it does not lie inside.
    #[inline]
    fn write<T: ByteValued>(&self, offset: usize, v: T) -> bool {
        let Some(p) = self.at::<T>(offset) else {
            return false;
        };
        // SAFETY: as in `read`; the part was checked writable when resolved.
        unsafe { p.write_volatile(v) };
        true
    }

    /// The `u16` at `offset` (an index the other side publishes): an atomic load or store.
    #[inline]
    fn index(&self, offset: usize) -> Option<&'a AtomicU16> {
        let p = self.at::<u16>(offset)?;
        // SAFETY: `at` checked bounds and alignment; the memory is mapped while 'a lives, and
        // every access to it from this side is atomic (the guest's are its own business).
        Some(unsafe { AtomicU16::from_ptr(p) })
    }
}

/// How a ring part or a descriptor table is reached, found out once per batch.
#[derive(Clone, Copy)]
enum Host<'a> {
    /// One host slice holds all of it.
    One(HostMem<'a>),
    /// It is split over memory regions or IOMMU mappings, or its host address is not aligned:
    /// each access is translated.
    Split,
    /// Not reachable for the access (a fault was reported once): every access fails.
    Refused,
}

impl<'a> Host<'a> {
    fn resolve(dma: &'a DmaSnapshot, addr: u64, len: u64, access: Access, align: usize) -> Self {
        match dma.single(addr, len, access) {
            Ok(Some(one)) => HostMem::new(one, align).map_or(Host::Split, Host::One),
            Ok(None) => Host::Split,
            Err(_) => Host::Refused,
        }
    }
}

/// A descriptor table (the ring's or an indirect one): its guest address and how it is reached.
#[derive(Clone, Copy)]
struct Table<'a> {
    addr: u64,
    host: Host<'a>,
}

impl Table<'_> {
    /// Entry `index`, read once. `None` if it cannot be read.
    #[inline(always)]
    fn read(&self, dma: &DmaSnapshot, index: u16) -> Option<Descriptor> {
        let offset = u64::from(index) * DESC_SIZE;
        match &self.host {
            Host::One(host) => host.read::<Descriptor>(offset as usize),
            Host::Split => self.read_split(dma, offset),
            Host::Refused => None,
        }
    }

    #[inline(never)]
    fn read_split(&self, dma: &DmaSnapshot, offset: u64) -> Option<Descriptor> {
        dma.read_obj(self.addr.checked_add(offset)?).ok()
    }
}

/// The descriptors of one chain, with virtio-queue's iteration rules (`DescriptorChain`): it
/// ends after a descriptor without NEXT, and stops early (silently; [`parse_chain`] tells) on
/// a loop, a `next` outside the table, an unreadable descriptor, a second level of indirect
/// table, an indirect table whose length is not a multiple of 16, or 4 GiB of buffers.
pub struct Chain<'a> {
    dma: &'a DmaSnapshot,
    table: Table<'a>,
    /// Entries in the table being walked.
    entries: u16,
    head: u16,
    next: u16,
    /// Descriptors that may still be read from this table (a loop runs out).
    ttl: u16,
    yielded: u32,
    indirect: bool,
}

impl<'a> Chain<'a> {
    /// The chain starting at descriptor `head` of the queue's table.
    fn new(dma: &'a DmaSnapshot, table: Table<'a>, entries: u16, head: u16) -> Self {
        Self {
            dma,
            table,
            entries,
            head,
            next: head,
            ttl: entries,
            yielded: 0,
            indirect: false,
        }
    }

    /// The chain's head index, which identifies it in the used ring.
    pub fn head_index(&self) -> u16 {
        self.head
    }

    /// Go on in the indirect table `desc` points at; `None` if it is not a valid one.
    fn enter_indirect(&mut self, desc: &Descriptor) -> Option<()> {
        if self.indirect || u64::from(desc.len()) % DESC_SIZE != 0 {
            return None;
        }
        let entries = u16::try_from(u64::from(desc.len()) / DESC_SIZE).ok()?;
        let addr = desc.addr().0;
        // One translation for the whole table; a table split over regions is read entry by
        // entry instead.
        let host = Host::resolve(
            self.dma,
            addr,
            u64::from(desc.len()),
            Access::Read,
            DESC_ALIGN,
        );
        self.table = Table { addr, host };
        self.entries = entries;
        self.next = 0;
        self.ttl = entries;
        self.indirect = true;
        Some(())
    }
}

impl Iterator for Chain<'_> {
    type Item = Descriptor;

    /// Inlined into the device's loop: per descriptor a bounds check and a load (an indirect
    /// table is entered out of line).
    #[inline(always)]
    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.entries {
            return None;
        }
        let desc = self.table.read(self.dma, self.next)?;
        if desc.refers_to_indirect_table() {
            return self.next_indirect(&desc);
        }
        self.yield_desc(desc)
    }
}

impl Chain<'_> {
    /// Enter the indirect table `desc` points at and yield its first descriptor.
    #[inline(never)]
    fn next_indirect(&mut self, desc: &Descriptor) -> Option<Descriptor> {
        self.enter_indirect(desc)?;
        if self.entries == 0 {
            return None;
        }
        let desc = self.table.read(self.dma, self.next)?;
        // A second level of indirection ends the chain (2.7.5.3.1).
        if desc.refers_to_indirect_table() {
            return None;
        }
        self.yield_desc(desc)
    }

    /// Account for `desc` and move to the next one.
    #[inline(always)]
    fn yield_desc(&mut self, desc: Descriptor) -> Option<Descriptor> {
        // A chain over 4 GiB is illegal (2.7.5.2): stop there.
        self.yielded = self.yielded.checked_add(desc.len())?;
        if desc.has_next() {
            self.next = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}

/// One queue's rings for one batch of work: the descriptor table, available ring and used ring
/// resolved to host slices once (each checked whole for its access), falling back to one
/// checked access at a time through the [`DmaSnapshot`] for a part that is not one slice.
/// Positions stay in virtio-queue's `Queue` (`next_avail`, `next_used`).
pub struct Ring<'a, 'q> {
    queue: &'q mut Queue,
    dma: &'a DmaSnapshot,
    size: u16,
    desc: Table<'a>,
    avail: u64,
    avail_host: Host<'a>,
    used: u64,
    used_host: Host<'a>,
    /// The driver's available index as last read.
    avail_seen: Option<u16>,
    /// The queue's positions, kept here while the batch runs (on the stack, likelier in the
    /// cache than the queue after a system call) and written back by [`Ring::sync`] and on drop.
    next_avail: u16,
    next_used: u16,
}

impl Drop for Ring<'_, '_> {
    fn drop(&mut self) {
        self.sync();
    }
}

impl<'a, 'q> Ring<'a, 'q> {
    pub fn new(queue: &'q mut Queue, dma: &'a DmaSnapshot) -> Self {
        let size = queue.size();
        let n = u64::from(size);
        let desc = queue.desc_table();
        let (avail, used) = (queue.avail_ring(), queue.used_ring());
        let (next_avail, next_used) = (queue.next_avail(), queue.next_used());
        Self {
            desc: Table {
                addr: desc,
                host: Host::resolve(dma, desc, n * DESC_SIZE, Access::Read, DESC_ALIGN),
            },
            avail_host: Host::resolve(dma, avail, RING_META + n * AVAIL_ELEM, Access::Read, 2),
            used_host: Host::resolve(dma, used, RING_META + n * USED_ELEM, Access::Write, 4),
            avail,
            used,
            size,
            queue,
            dma,
            avail_seen: None,
            next_avail,
            next_used,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Write the positions back to the queue.
    fn sync(&mut self) {
        self.queue.set_next_avail(self.next_avail);
        self.queue.set_next_used(self.next_used);
    }

    /// `index & mask` is `index % size`: virtio-queue only takes sizes that are powers of two
    /// (and not 0), and a mask spares a division per access.
    #[inline]
    fn mask(&self) -> u16 {
        self.size.wrapping_sub(1)
    }

    #[inline]
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Move the available position back to `index` (chains popped since then are served
    /// again later).
    pub fn rewind(&mut self, index: u16) {
        self.next_avail = index;
    }

    /// The driver's available index (acquire: entries it published before are visible).
    #[inline(always)]
    fn avail_idx(&self) -> Result<u16, QueueError> {
        let v = match &self.avail_host {
            Host::One(h) => h.index(2).map(|i| i.load(Ordering::Acquire)),
            Host::Split => self.avail.checked_add(2).and_then(|a| {
                self.dma
                    .memory()
                    .load(GuestAddress(a), Ordering::Acquire)
                    .ok()
            }),
            Host::Refused => None,
        };
        v.map(u16::from_le)
            .ok_or(QueueError::RingAccess("available"))
    }

    /// Chains made available and not yet popped, checked against the queue size.
    #[inline(always)]
    pub fn pending(&mut self) -> Result<u16, QueueError> {
        let next = self.next_avail;
        // Chains seen available at the last look and not popped yet: no need to read the
        // driver's index (a cache line it keeps writing) again until they are used up.
        if let Some(seen) = self.avail_seen {
            let known = seen.wrapping_sub(next);
            if known != 0 && known <= self.size {
                return Ok(known);
            }
        }
        let avail = self.avail_idx()?;
        self.avail_seen = Some(avail);
        let pending = avail.wrapping_sub(self.next_avail);
        if pending > self.size {
            return Err(QueueError::TooManyAvailable {
                pending,
                size: self.size,
            });
        }
        Ok(pending)
    }

    /// Take the next available chain (the caller checked [`Ring::pending`]). Its head index
    /// is read once and checked against the queue size.
    #[inline(always)]
    pub fn pop(&mut self) -> Result<Chain<'a>, QueueError> {
        let index = self.next_avail;
        let offset = RING_ENTRIES + u64::from(index & self.mask()) * AVAIL_ELEM;
        let head = match &self.avail_host {
            Host::One(h) => h.read::<u16>(offset as usize),
            Host::Split => self
                .avail
                .checked_add(offset)
                .and_then(|a| self.dma.read_obj::<u16>(a).ok()),
            Host::Refused => None,
        }
        .map(u16::from_le)
        .ok_or(QueueError::AvailEntry { index })?;
        if head >= self.size {
            return Err(QueueError::BadHead {
                head,
                size: self.size,
            });
        }
        self.next_avail = index.wrapping_add(1);
        Ok(Chain::new(self.dma, self.desc, self.size, head))
    }

    /// Return chain `head` to the driver with `len` bytes written: the used element, then the
    /// used index (release: the element and the buffers' contents are visible first).
    #[inline(always)]
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        let next = self.next_used;
        let offset = RING_ENTRIES + u64::from(next & self.mask()) * USED_ELEM;
        // virtq_used_elem: le32 id, le32 len.
        let (head_le, len_le) = (u32::from(head).to_le(), len.to_le());
        let elem = (u64::from(len) << 32 | u64::from(head)).to_le();
        let new = next.wrapping_add(1);
        let ok = match &self.used_host {
            // The element as two u32s: the used ring is only 4-byte aligned.
            Host::One(h) => {
                h.write(offset as usize, [head_le, len_le])
                    && h.index(2)
                        .map(|i| i.store(new.to_le(), Ordering::Release))
                        .is_some()
            }
            Host::Refused => false,
            Host::Split => {
                let mem = self.dma.memory();
                self.used.checked_add(offset).is_some_and(|a| {
                    mem.write_obj(elem, GuestAddress(a)).is_ok()
                        && mem
                            .store(new.to_le(), GuestAddress(self.used + 2), Ordering::Release)
                            .is_ok()
                })
            }
        };
        if !ok {
            return Err(QueueError::RingAccess("used"));
        }
        self.next_used = new;
        Ok(())
    }

    /// Ask the driver to notify when it makes chains available; returns whether some arrived
    /// meanwhile (look again before sleeping).
    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        // virtio-queue publishes the avail event from the queue's position.
        self.sync();
        self.queue
            .enable_notification(self.dma.memory())
            .map_err(QueueError::Ring)
    }

    /// Ask the driver not to notify (without EVENT_IDX; with it, notifications stay off until
    /// re-enabled anyway).
    pub fn disable_notification(&mut self) -> Result<(), QueueError> {
        self.sync();
        self.queue
            .disable_notification(self.dma.memory())
            .map_err(QueueError::Ring)
    }
}

/// Whether the driver wants an interrupt for the chains returned since the used index was
/// `old_used` (virtio 1.2, 2.7.10): always without EVENT_IDX, else if its `used_event` lies in
/// `[old_used, next_used)` (the same window test as Linux's `vring_need_event`).
pub fn needs_notification(
    queue: &Queue,
    dma: &DmaSnapshot,
    old_used: u16,
) -> Result<bool, QueueError> {
    // The used ring's writes come before the read of used_event.
    fence(Ordering::SeqCst);
    if !queue.event_idx_enabled() {
        return Ok(true);
    }
    let at = queue
        .avail_ring()
        .checked_add(RING_ENTRIES + u64::from(queue.size()) * AVAIL_ELEM)
        .ok_or(QueueError::RingAccess("available"))?;
    let used_event: u16 = dma
        .memory()
        .load(GuestAddress(at), Ordering::Relaxed)
        .map(u16::from_le)
        .map_err(|_| QueueError::RingAccess("available"))?;
    let new = Wrapping(queue.next_used());
    Ok(new - Wrapping(used_event) - Wrapping(1) < new - Wrapping(old_used))
}

/// Walk a chain (following an indirect table) into its readable and writable buffers. At most
/// `max_descriptors` are read. Buffer addresses are not checked here: every later access goes
/// through a [`DmaSnapshot`], which does.
pub fn parse_chain(chain: Chain<'_>, max_descriptors: usize) -> Result<ChainBuffers, ChainFault> {
    let mut out = ChainBuffers::default();
    parse_chain_into(chain, max_descriptors, &mut out)?;
    Ok(out)
}

/// [`parse_chain`] into `out` (emptied first), for a caller that keeps the lists in place
/// rather than moving them around (they are ~90 bytes each: on the per-request path the
/// copies show).
pub fn parse_chain_into(
    chain: Chain<'_>,
    max_descriptors: usize,
    out: &mut ChainBuffers,
) -> Result<(), ChainFault> {
    out.readable = SgList::new();
    out.writable = SgList::new();
    let mut count = 0usize;
    let mut last = None;
    let mut order_broken = false;
    for desc in chain {
        count += 1;
        if count > max_descriptors {
            return Err(ChainFault {
                error: ChainError::TooLong(max_descriptors),
                status: None,
            });
        }
        let (addr, len) = (desc.addr().0, u64::from(desc.len()));
        if desc.is_write_only() {
            out.writable.push(addr, len);
        } else {
            order_broken |= !out.writable.is_empty() || last.is_some_and(|(_, _, w, _)| w);
            out.readable.push(addr, len);
        }
        last = Some((addr, len, desc.is_write_only(), desc.has_next()));
    }
    let Some((addr, len, writable, has_next)) = last else {
        return Err(ChainFault {
            error: ChainError::Empty,
            status: None,
        });
    };
    if has_next {
        return Err(ChainFault {
            error: ChainError::Truncated,
            status: None,
        });
    }
    if order_broken {
        // No status byte in a buffer that wraps around the address space.
        let status = (writable && len > 0)
            .then_some(())
            .and_then(|()| addr.checked_add(len - 1));
        return Err(ChainFault {
            error: ChainError::Order,
            status,
        });
    }
    Ok(())
}

/// Serve every chain the driver made available on `queue`, then re-arm notifications and loop
/// while more arrived. `handle` returns the number of bytes it wrote into the chain's writable
/// buffers (the used length). Returns whether any chain was returned to the driver.
pub fn drain(
    queue: &mut Queue,
    dma: &DmaSnapshot,
    mut handle: impl FnMut(Chain<'_>) -> u32,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    drain_until(
        queue,
        dma,
        &mut (),
        &mut used_any,
        |_| false,
        |_, chain| handle(chain),
    )?;
    Ok(used_any)
}

/// [`drain`], asking `stop` before each chain: once it says so, the rest stays in the ring with
/// notifications off, and this returns `true`. `used` is set when a chain is returned to the
/// driver.
pub fn drain_until<S>(
    queue: &mut Queue,
    dma: &DmaSnapshot,
    state: &mut S,
    used: &mut bool,
    mut stop: impl FnMut(&mut S) -> bool,
    mut handle: impl FnMut(&mut S, Chain<'_>) -> u32,
) -> Result<bool, QueueError> {
    let mut ring = Ring::new(queue, dma);
    loop {
        // With EVENT_IDX, notifications stay off until re-armed below; without it, the
        // NO_NOTIFY flag keeps the driver from kicking while we work.
        ring.disable_notification()?;
        let pending = ring.pending()?;
        for _ in 0..pending {
            if stop(state) {
                return Ok(true);
            }
            let chain = ring.pop()?;
            let head = chain.head_index();
            let len = handle(state, chain);
            ring.add_used(head, len)?;
            *used = true;
        }
        // enable_notification reports buffers that arrived since we last looked.
        if !ring.enable_notification()? {
            return Ok(false);
        }
    }
}

/// Why [`fill`] stopped without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillEnd {
    /// `want` had nothing more to put in a chain.
    Satisfied,
    /// No chain is available; notifications are on, so the driver kicks when it adds one.
    OutOfBuffers,
    /// `handle` gave its chain back (it stays first in the ring for next time).
    PutBack,
}

/// Pop chains one at a time while `want` has something for them (for a device that fills the
/// driver's buffers when it has data, not when the driver kicks), with the same ring checks as
/// [`drain`]. `want` is asked before each chain and its answer goes to `handle` with the chain;
/// `handle` returns the used length, or `None` to put the chain back and stop. Out of chains,
/// notifications are re-armed (and the ring looked at again if buffers arrived meanwhile).
/// `used` is set when a chain is returned to the driver.
pub fn fill<S, T>(
    queue: &mut Queue,
    dma: &DmaSnapshot,
    state: &mut S,
    used: &mut bool,
    mut want: impl FnMut(&mut S) -> Option<T>,
    mut handle: impl FnMut(&mut S, T, Chain<'_>) -> Option<u32>,
) -> Result<FillEnd, QueueError> {
    let mut ring = Ring::new(queue, dma);
    loop {
        let Some(item) = want(state) else {
            return Ok(FillEnd::Satisfied);
        };
        if ring.pending()? == 0 {
            // enable_notification reports buffers posted since we looked.
            if ring.enable_notification()? {
                continue;
            }
            return Ok(FillEnd::OutOfBuffers);
        }
        let index = ring.next_avail();
        let chain = ring.pop()?;
        let head = chain.head_index();
        let Some(len) = handle(state, item, chain) else {
            ring.rewind(index);
            return Ok(FillEnd::PutBack);
        };
        ring.add_used(head, len)?;
        *used = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::dma::{DmaSpace, PhysMemory};
    use crate::virtio::testutil::{Desc, TestDriver, test_memory};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::GuestAddress;

    #[test]
    fn proper_and_broken_chains() {
        let mem = test_memory();
        let mut drv = TestDriver::new(&mem, 16);
        let dma = DmaSpace::identity(mem.clone());
        let mut q = drv.queue();
        let snap = dma.snapshot();
        let mut results = Vec::new();

        drv.add(&[
            Desc::r(0x10000, 16),
            Desc::w(0x11000, 0x200),
            Desc::w(0x12000, 1),
        ]);
        // Readable after writable.
        drv.add(&[
            Desc::r(0x10000, 16),
            Desc::w(0x11000, 4),
            Desc::r(0x12000, 1),
            Desc::w(0x13000, 2),
        ]);
        // A loop: 3 -> 4 -> 3.
        let h = drv.next_free();
        drv.write_raw(h, Descriptor::new(0x10000, 16, 1, h + 1));
        drv.write_raw(h + 1, Descriptor::new(0x11000, 16, 1, h));
        drv.publish(h);
        // next index outside the queue.
        let h = drv.next_free();
        drv.write_raw(h, Descriptor::new(0x10000, 16, 1, 200));
        drv.publish(h);
        // An indirect table inside an indirect table, and an empty indirect table.
        let table = 0x20000;
        mem_write_desc(&mem, table, 0, Descriptor::new(0x30000, 32, 4, 0));
        let h = drv.next_free();
        drv.write_raw(h, Descriptor::new(table, 16, 4, 0));
        drv.publish(h);
        let h = drv.next_free();
        drv.write_raw(h, Descriptor::new(table, 0, 4, 0));
        drv.publish(h);

        let used = drain(&mut q, &snap, |chain| {
            results.push(parse_chain(chain, 64).map(|b| (b.readable.len(), b.writable.len())));
            0
        })
        .unwrap();
        assert!(used);
        assert_eq!(results[0].as_ref().unwrap(), &(16, 0x201));
        let e = results[1].as_ref().unwrap_err();
        assert_eq!(e.error, ChainError::Order);
        assert_eq!(e.status, Some(0x13001));
        for r in &results[2..] {
            let e = r.as_ref().unwrap_err();
            assert!(
                matches!(e.error, ChainError::Truncated | ChainError::Empty),
                "{e:?}"
            );
            assert_eq!(e.status, None);
        }
        assert_eq!(results.len(), 6);
        assert_eq!(drv.used_idx(), 6);
    }

    #[test]
    fn chain_length_cap() {
        let mem = test_memory();
        let mut drv = TestDriver::new(&mem, 16);
        let dma = DmaSpace::identity(mem.clone());
        let mut q = drv.queue();
        let descs: Vec<_> = (0..10).map(|i| Desc::r(0x10000 + i * 16, 16)).collect();
        drv.add(&descs);
        let mut res = None;
        drain(&mut q, &dma.snapshot(), |c| {
            res = Some(parse_chain(c, 8).map(|_| ()));
            0
        })
        .unwrap();
        assert_eq!(res.unwrap().unwrap_err().error, ChainError::TooLong(8));
    }

    #[test]
    fn ring_faults_are_errors_not_empty_queues() {
        let mem = test_memory();
        let mut drv = TestDriver::new(&mem, 16);
        let dma = DmaSpace::identity(mem.clone());
        let mut q = drv.queue();
        // The driver claims 17 new buffers in a queue of 16.
        drv.set_avail_idx(17);
        let err = drain(&mut q, &dma.snapshot(), |_| 0).unwrap_err();
        assert!(matches!(
            err,
            QueueError::TooManyAvailable {
                pending: 17,
                size: 16
            }
        ));

        // A head index outside the queue.
        let mut drv = TestDriver::new(&mem, 16);
        let mut q = drv.queue();
        drv.publish(40);
        let err = drain(&mut q, &dma.snapshot(), |_| 0).unwrap_err();
        assert!(matches!(err, QueueError::BadHead { head: 40, size: 16 }));

        // Rings outside guest memory.
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0xf000_0000), Some(0));
        q.set_avail_ring_address(Some(0xf000_1000), Some(0));
        q.set_used_ring_address(Some(0xf000_2000), Some(0));
        q.set_ready(true);
        assert!(matches!(
            drain(&mut q, &dma.snapshot(), |_| 0).unwrap_err(),
            QueueError::Ring(_)
        ));
    }

    /// Rings and an indirect table that straddle two memory regions (two host mappings, so no
    /// one slice holds them) are served through the snapshot access by access, with the same
    /// results as rings in one region; a translated space likewise.
    #[test]
    fn rings_not_in_one_slice_are_served_the_same() {
        use crate::virtio::dma::DmaIommu;
        use vm_memory::Permissions;
        // Regions that touch at 0x4000 and 0x8000: contiguous guest addresses, separate
        // mappings.
        let mem = PhysMemory::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x4000), 0x4000),
            (GuestAddress(0x8000), 0x10_0000),
        ])
        .unwrap();
        let size = 16u16;
        let n = u64::from(size);
        // The descriptor table, the available ring, the used ring across the boundary, then
        // everything in one region.
        // (virtio-queue takes only aligned ring addresses: 16 for the table, 4 for the used ring.)
        let bases = [0x4000 - 8 * 16, 0x4000 - 16 * n - 16, 0x4000 - 320, 0x9000];
        let mut all = Vec::new();
        for (i, &base) in bases.iter().enumerate() {
            let mut drv = TestDriver::at(&mem, base, size);
            let mut q = drv.queue();
            let translated = i == 1;
            let dma = if translated {
                // IOVA = GPA through 4 KiB mappings: every ring part spans two of them.
                let iommu = DmaIommu::new();
                for page in 0..0x30 {
                    iommu
                        .map(page << 12, page << 12, 0x1000, Permissions::ReadWrite)
                        .unwrap();
                }
                DmaSpace::with_iommu(mem.clone(), iommu)
            } else {
                DmaSpace::identity(mem.clone())
            };
            let snap = dma.snapshot();
            let in_one = {
                let ring = Ring::new(&mut q, &snap);
                [ring.desc.host, ring.avail_host, ring.used_host].map(|h| matches!(h, Host::One(_)))
            };
            if i < 3 {
                assert!(in_one.contains(&false), "base {base:#x}: {in_one:?}");
            } else {
                assert_eq!(in_one, [true; 3]);
            }
            drv.add(&[
                Desc::r(0x10000, 16),
                Desc::w(0x11000, 0x200),
                Desc::w(0x12000, 1),
            ]);
            // An indirect table across the region boundary (identity) or two mappings.
            let table = 0x8000 - 32;
            mem_write_desc(&mem, table, 0, Descriptor::new(0x20000, 8, 1, 1));
            mem_write_desc(&mem, table, 1, Descriptor::new(0x21000, 4, 3, 2));
            mem_write_desc(&mem, table, 2, Descriptor::new(0x22000, 1, 2, 0));
            let h = drv.next_free();
            drv.write_raw(h, Descriptor::new(table, 48, 4, 0));
            drv.publish(h);
            // A loop.
            let h = drv.next_free();
            drv.write_raw(h, Descriptor::new(0x10000, 16, 1, h));
            drv.publish(h);
            let mut got = Vec::new();
            let used = drain(&mut q, &snap, |chain| {
                got.push(
                    parse_chain(chain, 64)
                        .map(|b| (b.readable.ranges().to_vec(), b.writable.ranges().to_vec()))
                        .map_err(|e| e.error),
                );
                7
            })
            .unwrap();
            assert!(used);
            assert_eq!(drv.used_idx(), 3, "base {base:#x}");
            for k in 0..3 {
                assert_eq!(drv.used(k).1, 7);
            }
            all.push(got);
        }
        assert!(all.windows(2).all(|w| w[0] == w[1]), "{all:?}");
        assert_eq!(all[0][1].as_ref().unwrap().1.len(), 2);
        assert_eq!(all[0][0].as_ref().unwrap().1.len(), 2);
        assert_eq!(all[0][2], Err(ChainError::Truncated));
    }

    fn mem_write_desc(mem: &crate::virtio::dma::PhysMemory, table: u64, i: u64, d: Descriptor) {
        use vm_memory::{Bytes, GuestAddress};
        mem.write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i))
            .unwrap();
    }
}
