//! Translation of a device's DMA addresses: one IOMMU domain's mapping table ([`DmaIommu`]) and
//! the view of guest memory that a device and virtio-queue access through ([`DmaMemory`]).
//!
//! Written here instead of vm-memory's `IommuMemory`/`Iotlb` because those were measured to be
//! the cost behind the IOMMU (`cargo bench -p bench --bench virtio_iommu`, perf): every access,
//! a hit included, took the IOTLB's `RwLock`, bumped a shared counter, walked its `BTreeMap` and
//! went through three nested iterators (~40 ns, about ten per block request). Here a snapshot
//! of the space keeps the last few mappings it used, so a hit is a compare and an add; only a
//! miss of that small cache reads the domain's table (under its lock, released at once).
//!
//! **Stale translations.** A cached mapping lives exactly as long as the snapshot that cached
//! it (one batch of a device's work). UNMAP and DETACH change the table first and then quiesce
//! the endpoint (take its device lock), which waits for that snapshot to be dropped: the same
//! rule that already covered host pointers taken before the change. A MAP needs nothing: a
//! new mapping is in no cache, and a cache miss reads the live table.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::iter::FusedIterator;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use arc_swap::Guard;
use vm_memory::bitmap::MS;
use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestMemoryResult, MemoryRegionAddress, Permissions, VolatileSlice,
};

use super::{DmaError, DmaFault, FaultKind, FaultReporter, PhysMemory, Slices, range_len};

/// Where a mapping goes: the value of a domain's table, keyed by the first IOVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    /// Last IOVA of the mapping (inclusive, so a mapping may end at the top of the space).
    last: u64,
    phys: u64,
    perm: Permissions,
}

/// One mapping as a snapshot caches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapped {
    start: u64,
    last: u64,
    phys: u64,
    perm: Permissions,
}

impl Mapped {
    /// Matches no address (start above last).
    const NONE: Mapped = Mapped {
        start: 1,
        last: 0,
        phys: 0,
        perm: Permissions::No,
    };

    /// The guest physical address of `addr` and how many of `len` bytes from there this
    /// mapping holds. `addr` is inside the mapping.
    fn piece(&self, addr: u64, len: usize) -> (u64, usize) {
        // last - addr + 1 cannot overflow: map() refuses ranges that reach past u64::MAX.
        let room = self.last - addr + 1;
        let n = usize::try_from(room).map_or(len, |room| room.min(len));
        (self.phys + (addr - self.start), n)
    }
}

/// A domain's mappings and how they were used.
#[derive(Debug, Default)]
struct Table {
    map: RwLock<BTreeMap<u64, Target>>,
    /// Translations asked for (one per access, or per mapping an access spans).
    lookups: AtomicU64,
    /// Of those, answered by a snapshot's cache of recently used mappings.
    cached: AtomicU64,
    /// Of those, refused (each one a fault reported).
    refused: AtomicU64,
}

/// One mapping of a domain: `[start, last]` (inclusive) to `phys` with `perm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMapping {
    pub start: u64,
    pub last: u64,
    pub phys: u64,
    pub perm: Permissions,
}

/// Who an endpoint-specific [`DmaIommu`] reports faults as.
#[derive(Clone)]
struct FaultTarget {
    endpoint: u32,
    reporter: Arc<dyn FaultReporter>,
    /// The endpoint is in no domain: every refusal is [`FaultKind::Detached`].
    detached: bool,
}

/// Translations done in an IOMMU domain: how many, how many from a snapshot's cache of recent
/// mappings, and how many were refused (a refusal is a fault: the table is complete, so a
/// lookup that finds nothing is never resolved later).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbStats {
    pub lookups: u64,
    pub cached: u64,
    pub misses: u64,
}

/// The mapping table of one IOMMU domain, shared by the devices attached to it.
///
/// Filled when the guest maps, emptied when it unmaps; a lookup never fills anything. A
/// translation a device cached before an unmap lasts until it drops its snapshot: the VMM
/// quiesces the endpoint's queues before it completes UNMAP/DETACH (module docs).
///
/// [`DmaIommu::for_endpoint`] gives a handle on the same table that reports refused accesses as
/// one endpoint's faults; the IOMMU device puts one such handle in each attached endpoint's
/// `DmaSpace`.
#[derive(Clone, Default)]
pub struct DmaIommu {
    table: Arc<Table>,
    fault: Option<FaultTarget>,
}

impl fmt::Debug for DmaIommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaIommu")
            .field("endpoint", &self.fault.as_ref().map(|t| t.endpoint))
            .field("stats", &self.stats())
            .finish()
    }
}

impl DmaIommu {
    pub fn new() -> Self {
        Self::default()
    }

    /// The same table, reporting refused accesses as `endpoint`'s faults.
    pub fn for_endpoint(&self, endpoint: u32, reporter: Arc<dyn FaultReporter>) -> Self {
        Self {
            table: self.table.clone(),
            fault: Some(FaultTarget {
                endpoint,
                reporter,
                detached: false,
            }),
        }
    }

    /// No mapping at all, for an endpoint attached to no domain: every access is refused and
    /// reported as [`FaultKind::Detached`].
    pub fn detached(endpoint: u32, reporter: Arc<dyn FaultReporter>) -> Self {
        Self {
            table: Arc::default(),
            fault: Some(FaultTarget {
                endpoint,
                reporter,
                detached: true,
            }),
        }
    }

    fn table(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Target>> {
        self.table
            .map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Map `[iova, iova+len)` to guest physical `gpa` with `perm`, replacing older mappings
    /// of the range (which, like an unmap, needs the endpoints quiesced before it is relied
    /// on; the IOMMU device refuses overlapping MAPs instead).
    pub fn map(&self, iova: u64, gpa: u64, len: u64, perm: Permissions) -> Result<(), DmaError> {
        range_len(iova, len)?;
        gpa.checked_add(len)
            .ok_or(DmaError::Overflow { addr: gpa, len })?;
        if len == 0 {
            return Ok(());
        }
        let last = iova + (len - 1);
        let mut table = self.table();
        carve(&mut table, iova, last);
        table.insert(
            iova,
            Target {
                last,
                phys: gpa,
                perm,
            },
        );
        Ok(())
    }

    /// Remove every mapping in `[iova, iova+len)`; mappings that reach beyond keep the rest.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<(), DmaError> {
        range_len(iova, len)?;
        if len > 0 {
            carve(&mut self.table(), iova, iova + (len - 1));
        }
        Ok(())
    }

    /// How many mappings the table holds.
    pub fn len(&self) -> usize {
        self.table
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mappings that hold any of `[start, last]`, in address order.
    pub fn overlapping(&self, start: u64, last: u64) -> Vec<DmaMapping> {
        let table = self
            .table
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut hit: Vec<DmaMapping> = table
            .range(..=last)
            .rev()
            .take_while(|(_, t)| t.last >= start)
            .map(|(&s, t)| DmaMapping {
                start: s,
                last: t.last,
                phys: t.phys,
                perm: t.perm,
            })
            .collect();
        hit.reverse();
        hit
    }

    /// Every mapping, in address order.
    pub fn mappings(&self) -> Vec<DmaMapping> {
        self.overlapping(0, u64::MAX)
    }

    /// Lookups, cache answers and refusals since the table was made (all endpoints).
    pub fn stats(&self) -> IotlbStats {
        let t = &self.table;
        IotlbStats {
            lookups: t.lookups.load(Ordering::Relaxed),
            cached: t.cached.load(Ordering::Relaxed),
            misses: t.refused.load(Ordering::Relaxed),
        }
    }

    /// The mapping that holds `addr`.
    fn lookup(&self, addr: u64) -> Option<Mapped> {
        let table = self
            .table
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let (&start, t) = table.range(..=addr).next_back()?;
        (t.last >= addr).then_some(Mapped {
            start,
            last: t.last,
            phys: t.phys,
            perm: t.perm,
        })
    }

    fn report(&self, addr: u64, access: Permissions, kind: FaultKind) {
        let Some(target) = &self.fault else {
            return;
        };
        let kind = if target.detached {
            FaultKind::Detached
        } else {
            kind
        };
        target.reporter.report(DmaFault {
            endpoint: target.endpoint,
            addr,
            read: !matches!(access, Permissions::No | Permissions::Write),
            write: access.has_write(),
            kind,
        });
    }
}

/// Take `[start, last]` out of `table`: mappings inside go, mappings that reach in are cut
/// (their outer parts keep their translation).
fn carve(table: &mut BTreeMap<u64, Target>, start: u64, last: u64) {
    // Mappings are disjoint: walk down from the last one starting at or before `last` until one
    // ends before `start`.
    let hit: Vec<u64> = table
        .range(..=last)
        .rev()
        .take_while(|(_, t)| t.last >= start)
        .map(|(&s, _)| s)
        .collect();
    for s in hit {
        let Some(t) = table.remove(&s) else {
            continue;
        };
        if s < start {
            table.insert(
                s,
                Target {
                    last: start - 1,
                    ..t
                },
            );
        }
        if t.last > last {
            table.insert(
                last + 1,
                Target {
                    phys: t.phys + (last + 1 - s),
                    ..t
                },
            );
        }
    }
}

/// What a `DmaSpace` currently stands for: guest memory and, if translated, the domain.
pub(super) struct Space {
    pub(super) phys: PhysMemory,
    /// `None`: identity, the IOMMU is never consulted.
    pub(super) iommu: Option<DmaIommu>,
}

/// Mappings a snapshot keeps (a power of two): rings, headers, data and status of a request
/// fall in at most a handful with 2 MiB mappings.
const WAYS: usize = 8;

/// A device's view of its DMA space for one batch of work: a `GuestMemory` whose addresses are
/// IOVAs (translated and permission-checked, or identity). virtio-queue and the device access
/// guest memory through it only. Not `Sync`: it caches translations in cells, and each batch
/// takes its own.
pub struct DmaMemory {
    space: Guard<Arc<Space>>,
    cache: [Cell<Mapped>; WAYS],
    /// The way that answered last, tried first.
    last_hit: Cell<usize>,
    /// The way the next table lookup fills.
    victim: Cell<usize>,
    lookups: Cell<u64>,
    cached: Cell<u64>,
    refused: Cell<u64>,
    /// The guest memory region the last access fell in.
    region: Cell<Option<HostRegion>>,
}

/// A guest memory region as [`DmaMemory::phys_slice`] keeps it: where it starts in guest
/// physical memory, its length, and its host address.
#[derive(Clone, Copy)]
struct HostRegion {
    start: u64,
    len: u64,
    host: *mut u8,
}

impl fmt::Debug for DmaMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaMemory")
            .field("translated", &self.get_iommu_enabled())
            .finish()
    }
}

/// A refused translation, already reported as a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Refused {
    pub(super) addr: u64,
}

impl DmaMemory {
    pub(super) fn new(space: Guard<Arc<Space>>) -> Self {
        Self {
            space,
            cache: [const { Cell::new(Mapped::NONE) }; WAYS],
            last_hit: Cell::new(0),
            victim: Cell::new(0),
            lookups: Cell::new(0),
            cached: Cell::new(0),
            refused: Cell::new(0),
            region: Cell::new(None),
        }
    }

    /// Guest physical memory underneath.
    pub fn get_backend(&self) -> &PhysMemory {
        &self.space.phys
    }

    /// Whether addresses are translated (false: identity).
    pub fn get_iommu_enabled(&self) -> bool {
        self.space.iommu.is_some()
    }

    /// The guest physical address of `addr` and how many of the `len` bytes from there are
    /// contiguous in IOVA and GPA and allowed `access`; a refusal is reported as a fault.
    /// `[addr, addr+len)` must not wrap and `len` must not be 0.
    #[inline(always)]
    pub(super) fn translate(
        &self,
        addr: u64,
        len: usize,
        access: Permissions,
    ) -> Result<(u64, usize), Refused> {
        match &self.space.iommu {
            None => Ok((addr, len)),
            Some(iommu) => self.translate_in(iommu, addr, len, access),
        }
    }

    /// [`DmaMemory::translate`] through `iommu`: the cache, else the domain's table.
    fn translate_in(
        &self,
        iommu: &DmaIommu,
        addr: u64,
        len: usize,
        access: Permissions,
    ) -> Result<(u64, usize), Refused> {
        self.lookups.set(self.lookups.get() + 1);
        if let Some(m) = self.cached(addr, access) {
            return Ok(m.piece(addr, len));
        }
        match iommu.lookup(addr) {
            Some(m) if m.perm.allow(access) => {
                self.remember(m);
                Ok(m.piece(addr, len))
            }
            found => Err(self.refuse(iommu, addr, access, found.is_some())),
        }
    }

    /// The cached mapping that holds `addr` for `access`, counted as a cache answer.
    /// Always inlined: a call here cost the IOMMU path ~4 ns an access (`virtio_iommu` bench).
    #[inline(always)]
    fn cached(&self, addr: u64, access: Permissions) -> Option<Mapped> {
        let first = self.last_hit.get();
        for k in 0..WAYS {
            let way = (first + k) % WAYS;
            let m = self.cache[way].get();
            if m.start <= addr && addr <= m.last && m.perm.allow(access) {
                self.last_hit.set(way);
                self.cached.set(self.cached.get() + 1);
                return Some(m);
            }
        }
        None
    }

    fn remember(&self, m: Mapped) {
        let way = self.victim.get();
        self.victim.set((way + 1) % WAYS);
        self.cache[way].set(m);
        self.last_hit.set(way);
    }

    /// Translate `[at, at+left)` from the table, mapping after mapping, under one hold of its
    /// lock (a range over many small mappings: one search, then the next entries in order).
    /// Calls `each` per piece; the last mapping used goes into the cache.
    #[inline(never)]
    fn walk(
        &self,
        iommu: &DmaIommu,
        mut at: u64,
        mut left: usize,
        access: Permissions,
        each: &mut impl FnMut(u64, usize),
    ) -> Result<(), Refused> {
        let refusal = {
            let table = iommu
                .table
                .map
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let mut cur = table.range(..=at).next_back();
            // Entries after the one holding `at`, in order: the next piece's, if contiguous.
            let mut after = table.range(at.saturating_add(1)..);
            loop {
                let Some((&start, t)) = cur.filter(|(_, t)| t.last >= at) else {
                    break Some(false);
                };
                if !t.perm.allow(access) {
                    break Some(true);
                }
                let m = Mapped {
                    start,
                    last: t.last,
                    phys: t.phys,
                    perm: t.perm,
                };
                let (gpa, n) = m.piece(at, left);
                each(gpa, n);
                left -= n;
                if left == 0 {
                    self.remember(m);
                    break None;
                }
                // n <= last - at + 1 and the range does not wrap: at + n is the next IOVA.
                at += n as u64;
                self.lookups.set(self.lookups.get() + 1);
                cur = after.next().filter(|(s, _)| **s == at);
            }
        };
        // The report goes out with the table's lock released (the reporter takes its own).
        match refusal {
            None => Ok(()),
            Some(covered) => Err(self.refuse(iommu, at, access, covered)),
        }
    }

    /// Report a refusal at `addr`: a mapping holds it but not for `access` (`covered`), or
    /// none does.
    fn refuse(&self, iommu: &DmaIommu, addr: u64, access: Permissions, covered: bool) -> Refused {
        let kind = if covered {
            FaultKind::Permission
        } else {
            FaultKind::Unmapped
        };
        self.refused.set(self.refused.get() + 1);
        iommu.report(addr, access, kind);
        Refused { addr }
    }

    /// Check that all of `[addr, addr+len)` translates for `access` (reporting the first
    /// refusal), calling `each` with every piece (GPA, length) in order; returns the first
    /// piece. `len` must not be 0.
    pub(super) fn translate_all(
        &self,
        addr: u64,
        len: usize,
        access: Permissions,
        mut each: impl FnMut(u64, usize),
    ) -> Result<(u64, usize), Refused> {
        let wraps = u64::try_from(len)
            .ok()
            .and_then(|n| addr.checked_add(n))
            .is_none();
        if wraps {
            if let Some(iommu) = &self.space.iommu {
                self.lookups.set(self.lookups.get() + 1);
                return Err(self.refuse(iommu, addr, access, false));
            }
            return Err(Refused { addr });
        }
        let first = self.translate(addr, len, access)?;
        each(first.0, first.1);
        let (mut at, mut left) = (addr + first.1 as u64, len - first.1);
        while left > 0 {
            let Some(iommu) = &self.space.iommu else {
                break;
            };
            self.lookups.set(self.lookups.get() + 1);
            match self.cached(at, access) {
                Some(m) => {
                    let (gpa, n) = m.piece(at, left);
                    each(gpa, n);
                    at += n as u64;
                    left -= n;
                }
                // The rest from the table in one pass.
                None => {
                    return self
                        .walk(iommu, at, left, access, &mut each)
                        .map(|()| first);
                }
            }
        }
        Ok(first)
    }

    /// The one host slice behind `[addr, addr+len)`, translated and checked for `access`, when
    /// one mapping and one memory region hold all of it (nearly every access): a cache hit and
    /// a region lookup, no lists. `Ok(None)`: not so (empty, wrapping, split, or not memory);
    /// the caller takes [`DmaMemory::gather`]. `Err`: refused, and reported.
    #[inline(always)]
    pub(super) fn one_slice(
        &self,
        addr: u64,
        len: usize,
        access: Permissions,
    ) -> Result<Option<VolatileSlice<'_, ()>>, Refused> {
        if len == 0 || addr.checked_add(len as u64).is_none() {
            return Ok(None);
        }
        let (gpa, n) = self.translate(addr, len, access)?;
        if n != len {
            return Ok(None);
        }
        Ok(self.phys_slice(gpa, len))
    }

    /// The host slice of guest physical `[gpa, gpa+n)` when one memory region holds all of it.
    /// The region found last is kept: the accesses of a batch nearly all fall in one, and
    /// reaching it through the memory object's region list costs several dependent loads.
    #[inline(always)]
    fn phys_slice(&self, gpa: u64, n: usize) -> Option<VolatileSlice<'_, ()>> {
        let r = match self.region.get() {
            Some(r) if gpa >= r.start && gpa - r.start < r.len => r,
            _ => {
                let region = self.space.phys.find_region(GuestAddress(gpa))?;
                let r = HostRegion {
                    start: region.start_addr().0,
                    len: region.len(),
                    host: region.get_host_address(MemoryRegionAddress(0)).ok()?,
                };
                self.region.set(Some(r));
                r
            }
        };
        let offset = gpa - r.start;
        if n as u64 > r.len - offset {
            // Runs past the region's end: the general path splits it.
            return None;
        }
        // SAFETY: `[offset, offset+n)` lies inside the region (checked above), whose mapping
        // lives as long as `self.space` holds the memory object, so for the slice's lifetime;
        // the memory has no dirty bitmap (`PhysMemory` is `GuestMemoryMmap<()>`).
        Some(unsafe { VolatileSlice::new(r.host.add(offset as usize), n) })
    }

    /// Append the host slices of guest physical `[gpa, gpa+n)`; false if it is not all memory.
    #[inline]
    fn push_phys<'a>(&'a self, gpa: u64, n: usize, out: &mut Slices<'a>) -> bool {
        // One region holds it (nearly always): no iterator.
        if let Some(s) = self.phys_slice(gpa, n) {
            out.push(s);
            return true;
        }
        let mut got = 0usize;
        for s in GuestMemoryBackend::get_slices(&self.space.phys, GuestAddress(gpa), n) {
            match s {
                Ok(s) => {
                    got += s.len();
                    out.push(s);
                }
                Err(_) => return false,
            }
        }
        got == n
    }

    /// Append the host slices behind `[addr, addr+len)` to `out`, translated and checked for
    /// `access` in one pass; false if any part is refused (reported) or not guest memory, and
    /// then the caller must not use `out`. The path of every copy: per piece a cache hit, a
    /// binary search of the memory regions and a bounds check.
    pub(super) fn gather<'a>(
        &'a self,
        addr: u64,
        len: usize,
        access: Permissions,
        out: &mut Slices<'a>,
    ) -> bool {
        if len == 0 {
            return true;
        }
        if self.space.iommu.is_none() {
            // Identity: nothing to translate or count.
            return self.push_phys(addr, len, out);
        }
        // One piece (nearly always): its slice, with no run to keep. Several: below, the
        // first again (now from the cache).
        let wraps = u64::try_from(len)
            .ok()
            .and_then(|n| addr.checked_add(n))
            .is_none();
        if !wraps {
            match self.translate(addr, len, access) {
                Ok((gpa, n)) if n == len => return self.push_phys(gpa, len, out),
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        // Pieces that follow each other in guest physical memory too (small mappings of a
        // contiguous buffer) become one run: one host slice, so one iovec rather than many.
        let mut run: Option<(u64, usize)> = None;
        let mut in_memory = true;
        let translated = self.translate_all(addr, len, access, |gpa, n| match &mut run {
            Some((start, m)) if start.checked_add(*m as u64) == Some(gpa) => *m += n,
            pending => {
                if let Some((start, m)) = pending.replace((gpa, n)) {
                    in_memory = in_memory && self.push_phys(start, m, out);
                }
            }
        });
        if let Some((start, m)) = run {
            in_memory = in_memory && self.push_phys(start, m, out);
        }
        translated.is_ok() && in_memory
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        // Counted in cells while the snapshot lives, added to the domain's counters once.
        if let Some(iommu) = &self.space.iommu {
            let t = &iommu.table;
            t.lookups.fetch_add(self.lookups.get(), Ordering::Relaxed);
            t.cached.fetch_add(self.cached.get(), Ordering::Relaxed);
            t.refused.fetch_add(self.refused.get(), Ordering::Relaxed);
        }
    }
}

fn refused_error(r: Refused) -> GuestMemoryError {
    GuestMemoryError::InvalidGuestAddress(GuestAddress(r.addr))
}

impl GuestMemory for DmaMemory {
    type PhysicalMemory = PhysMemory;
    type Bitmap = <<PhysMemory as GuestMemoryBackend>::R as GuestMemoryRegion>::B;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        let phys = &self.space.phys;
        if self.space.iommu.is_none() {
            return GuestMemoryBackend::check_range(phys, addr, count);
        }
        if count == 0 {
            return u64::try_from(count)
                .ok()
                .and_then(|n| addr.0.checked_add(n))
                .is_some();
        }
        // Every piece must also be guest memory.
        let mut in_memory = true;
        let translated = self.translate_all(addr.0, count, access, |gpa, n| {
            in_memory &= GuestMemoryBackend::check_range(phys, GuestAddress(gpa), n);
        });
        translated.is_ok() && in_memory
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, MS<'a, PhysMemory>>> {
        let phys = &self.space.phys;
        if self.space.iommu.is_none() || count == 0 {
            return Ok(DmaSlices {
                mem: self,
                access,
                next: addr.0,
                left: 0,
                current: GuestMemoryBackend::get_slices(phys, addr, count),
            });
        }
        // Translated whole before the first slice: a refused access moves no byte.
        let (gpa, n) = self
            .translate_all(addr.0, count, access, |_, _| ())
            .map_err(refused_error)?;
        Ok(DmaSlices {
            mem: self,
            access,
            next: addr.0 + n as u64,
            left: count - n,
            current: GuestMemoryBackend::get_slices(phys, GuestAddress(gpa), n),
        })
    }

    fn physical_memory(&self) -> Option<&PhysMemory> {
        match self.space.iommu {
            None => Some(&self.space.phys),
            Some(_) => None,
        }
    }
}

/// The host slices of an access: those of the current piece in guest physical memory, then
/// the next piece's translation.
pub struct DmaSlices<'a> {
    mem: &'a DmaMemory,
    access: Permissions,
    /// IOVA of the next piece and bytes left after the current one.
    next: u64,
    left: usize,
    current: GuestMemoryBackendSliceIterator<'a, PhysMemory>,
}

impl<'a> Iterator for DmaSlices<'a> {
    type Item = GuestMemoryResult<VolatileSlice<'a, MS<'a, PhysMemory>>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.current.next() {
                Some(Ok(s)) => return Some(Ok(s)),
                Some(Err(e)) => {
                    // The current iterator stops after an error; so do the pieces after it.
                    self.left = 0;
                    return Some(Err(e));
                }
                None => {}
            }
            if self.left == 0 {
                return None;
            }
            match self.mem.translate(self.next, self.left, self.access) {
                Ok((gpa, n)) => {
                    self.current =
                        GuestMemoryBackend::get_slices(&self.mem.space.phys, GuestAddress(gpa), n);
                    self.next += n as u64;
                    self.left -= n;
                }
                Err(r) => {
                    self.left = 0;
                    return Some(Err(refused_error(r)));
                }
            }
        }
    }
}

impl FusedIterator for DmaSlices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, MS<'a, PhysMemory>> for DmaSlices<'a> {}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::Bytes;

    use super::*;
    use crate::virtio::dma::DmaSpace;

    #[derive(Default)]
    struct Faults(Mutex<Vec<DmaFault>>);

    impl FaultReporter for Faults {
        fn report(&self, fault: DmaFault) {
            self.0.lock().unwrap().push(fault);
        }
    }

    impl Faults {
        fn take(&self) -> Vec<(u64, FaultKind)> {
            let v = std::mem::take(&mut *self.0.lock().unwrap());
            v.into_iter().map(|f| (f.addr, f.kind)).collect()
        }
    }

    fn phys() -> PhysMemory {
        PhysMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn table(iommu: &DmaIommu) -> Vec<(u64, u64, u64)> {
        let t = iommu.table.map.read().unwrap();
        t.iter().map(|(&s, t)| (s, t.last, t.phys)).collect()
    }

    #[test]
    fn map_replaces_and_unmap_cuts() {
        let iommu = DmaIommu::new();
        iommu
            .map(0x1000, 0x8000, 0x3000, Permissions::Read)
            .unwrap();
        // Over the middle page: the outer pages keep their translation.
        iommu
            .map(0x2000, 0x100, 0x1000, Permissions::ReadWrite)
            .unwrap();
        assert_eq!(
            table(&iommu),
            [
                (0x1000, 0x1fff, 0x8000),
                (0x2000, 0x2fff, 0x100),
                (0x3000, 0x3fff, 0xa000)
            ]
        );
        // Across two mappings' edges.
        iommu.unmap(0x1800, 0x2000).unwrap();
        assert_eq!(
            table(&iommu),
            [(0x1000, 0x17ff, 0x8000), (0x3800, 0x3fff, 0xa800)]
        );
        iommu.unmap(0, 0x10000).unwrap();
        assert!(table(&iommu).is_empty());
        // Up to the top of the address space, and refusals of wrapping ranges.
        iommu
            .map(u64::MAX - 0xfff, 0, 0x1000, Permissions::Read)
            .unwrap_err();
        iommu
            .map(u64::MAX - 0x1000, 0, 0x1000, Permissions::Read)
            .unwrap();
        assert!(iommu.map(1, 0, u64::MAX, Permissions::Read).is_err());
        assert!(iommu.unmap(2, u64::MAX).is_err());
        iommu.map(0, 0, 0, Permissions::Read).unwrap();
        assert_eq!(table(&iommu).len(), 1);
    }

    #[test]
    fn a_snapshot_caches_until_dropped_and_sees_new_mappings() {
        let phys = phys();
        phys.write_obj(0x1122u16, GuestAddress(0x2000)).unwrap();
        phys.write_obj(0x3344u16, GuestAddress(0x3000)).unwrap();
        let faults = Arc::new(Faults::default());
        let domain = DmaIommu::new();
        let iommu = domain.for_endpoint(9, faults.clone());
        let dma = DmaSpace::with_iommu(phys, iommu.clone());
        domain
            .map(0x10_0000, 0x2000, 0x1000, Permissions::Read)
            .unwrap();
        let s = dma.snapshot();
        assert_eq!(s.read_obj::<u16>(0x10_0000).unwrap(), 0x1122);
        // Mapped after the snapshot was taken: a cache miss reads the live table.
        domain
            .map(0x20_0000, 0x3000, 0x1000, Permissions::Read)
            .unwrap();
        assert_eq!(s.read_obj::<u16>(0x20_0000).unwrap(), 0x3344);
        // Unmapped while the snapshot lives: it keeps what it cached (the quiesce rule covers
        // it: UNMAP completes only once the device has dropped its snapshot) ...
        domain.unmap(0x10_0000, 0x1000).unwrap();
        assert_eq!(s.read_obj::<u16>(0x10_0000).unwrap(), 0x1122);
        assert!(faults.take().is_empty());
        drop(s);
        // ... and the next snapshot is refused, with a fault.
        let s = dma.snapshot();
        assert!(s.read_obj::<u16>(0x10_0000).is_err());
        assert_eq!(faults.take(), [(0x10_0000, FaultKind::Unmapped)]);
        // Not writable: a permission fault at the first byte.
        assert!(s.write_obj(0x20_0ffe, 0u16).is_err());
        assert_eq!(faults.take(), [(0x20_0ffe, FaultKind::Permission)]);
        // Runs off the mapping: refused whole, the fault where it runs off.
        assert!(s.read_obj::<u32>(0x20_0ffe).is_err());
        assert_eq!(faults.take(), [(0x20_1000, FaultKind::Unmapped)]);
        drop(s);
        let st = iommu.stats();
        assert_eq!(st.misses, 3, "{st:?}");
        assert!(st.cached >= 1 && st.lookups > st.cached, "{st:?}");

        // Detached: every access a DOMAIN fault.
        let detached = DmaSpace::with_iommu(self::phys(), DmaIommu::detached(3, faults.clone()));
        assert!(detached.snapshot().read_obj::<u8>(0x2000).is_err());
        let f = faults.0.lock().unwrap().pop().unwrap();
        assert_eq!(
            (f.endpoint, f.kind, f.read, f.write),
            (3, FaultKind::Detached, true, false)
        );
    }

    #[test]
    fn more_mappings_than_the_cache_holds() {
        let phys = phys();
        let iommu = DmaIommu::new();
        let dma = DmaSpace::with_iommu(phys.clone(), iommu.clone());
        // 3 x WAYS one-page mappings, in reverse GPA order; each page holds its index.
        let n = 3 * WAYS as u64;
        for i in 0..n {
            let gpa = (n - 1 - i) * 0x400;
            phys.write_obj(i, GuestAddress(gpa)).unwrap();
            iommu
                .map(0x100_0000 + i * 0x1000, gpa, 0x400, Permissions::ReadWrite)
                .unwrap();
        }
        let s = dma.snapshot();
        for round in 0..3 {
            for i in 0..n {
                let at = 0x100_0000 + i * 0x1000;
                assert_eq!(s.read_obj::<u64>(at).unwrap(), i, "round {round}");
                // Through the trait too (virtio-queue's way).
                assert_eq!(s.memory().read_obj::<u64>(GuestAddress(at)).unwrap(), i);
            }
        }
        // Between two mappings (not contiguous in IOVA): refused.
        assert!(s.read_obj::<u64>(0x100_0000 + 0x3fc).is_err());
    }
}
