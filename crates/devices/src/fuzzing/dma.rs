//! DMA translation (`virtio/dma/translate.rs`): mappings and unmappings of any size and
//! alignment (overlapping, splitting, over the hole in guest memory), then accesses through a
//! translated `DmaSpace` both ways a device makes them: the `DmaSnapshot` copies (one pass,
//! checked whole) and the `GuestMemory` trait that virtio-queue uses (`Bytes`, `check_range`,
//! `get_slices`). Several accesses share a snapshot, so its cache of recent mappings is
//! exercised; a change to the table starts a new snapshot, as quiescing does for a device.
//!
//! The shadow is a byte map of the IOVA window (GPA and permissions per byte) and a copy of guest
//! memory. After every access: it succeeds exactly when every byte is mapped for the access and
//! lands in guest memory; a read returns the bytes at the mapped GPAs; a write changes exactly
//! those bytes and a refused one none; a fault is reported exactly when some byte is not mapped
//! for the access, at the first such byte, as `Permission` when a mapping covers it.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::Input;
use crate::virtio::dma::{
    DmaFault, DmaIommu, DmaSnapshot, DmaSpace, FaultKind, FaultReporter, PhysMemory,
};

/// IOVAs the harness maps and accesses: `[BASE, BASE + WINDOW)` (plus a little outside).
const BASE: u64 = 0x1_0000_0000;
const WINDOW: usize = 0x4000;
/// Guest memory: two regions with a hole between them.
const REGIONS: [(u64, usize); 2] = [(0, 0x3000), (0x4000, 0x2000)];
const MEM_END: u64 = 0x6000;

#[derive(Default)]
struct Recorder(Mutex<Vec<DmaFault>>);

impl FaultReporter for Recorder {
    fn report(&self, fault: DmaFault) {
        self.0.lock().expect("recorder").push(fault);
    }
}

/// The shadow: per IOVA byte of the window, its GPA and permissions.
struct Shadow {
    map: Vec<Option<(u64, Permissions)>>,
    mem: Vec<u8>,
}

impl Shadow {
    fn in_memory(gpa: u64) -> bool {
        REGIONS
            .iter()
            .any(|&(start, len)| gpa >= start && gpa < start + len as u64)
    }

    fn entry(&self, iova: u64) -> Option<(u64, Permissions)> {
        let i = iova.checked_sub(BASE)?;
        *self.map.get(usize::try_from(i).ok()?)?
    }

    /// Where a refusal is reported (first byte not mapped for `access`, and its kind), and
    /// whether the whole access is possible.
    fn predict(&self, addr: u64, len: usize, access: Permissions) -> (Option<(u64, bool)>, bool) {
        let mut fault = None;
        let mut ok = true;
        for k in 0..len as u64 {
            let iova = addr + k;
            match self.entry(iova) {
                Some((gpa, perm)) if perm.allow(access) => ok &= Self::in_memory(gpa),
                e => {
                    fault = Some((iova, e.is_some()));
                    ok = false;
                    break;
                }
            }
        }
        (fault, ok)
    }

    fn gpa(&self, iova: u64) -> usize {
        // Only called for bytes predict() found mapped into memory.
        self.entry(iova).map_or(0, |(gpa, _)| gpa as usize)
    }
}

struct Harness {
    phys: PhysMemory,
    iommu: DmaIommu,
    dma: DmaSpace,
    faults: Arc<Recorder>,
    shadow: Shadow,
}

impl Harness {
    fn check_memory(&self, what: &str) {
        let mut got = vec![0u8; MEM_END as usize];
        for &(start, len) in &REGIONS {
            let s = start as usize;
            self.phys
                .read_slice(&mut got[s..s + len], GuestAddress(start))
                .expect("guest memory");
        }
        if let Some(at) = (0..got.len()).find(|&i| got[i] != self.shadow.mem[i]) {
            panic!(
                "{what}: guest memory at {at:#x} is {:#x}, the shadow says {:#x}",
                got[at], self.shadow.mem[at]
            );
        }
    }

    fn take_faults(&self) -> Vec<DmaFault> {
        std::mem::take(&mut *self.faults.0.lock().expect("recorder"))
    }

    /// Check the outcome of one access of `[addr, addr+len)`.
    fn expect(&self, ok: bool, addr: u64, len: usize, access: Permissions, what: &str) {
        let (fault, possible) = self.shadow.predict(addr, len, access);
        assert_eq!(ok, possible, "{what} {addr:#x}+{len:#x}: outcome");
        let faults = self.take_faults();
        match fault {
            None => assert!(faults.is_empty(), "{what}: unexpected fault {faults:?}"),
            Some((at, covered)) => {
                assert_eq!(faults.len(), 1, "{what} {addr:#x}+{len:#x}: {faults:?}");
                let f = faults[0];
                assert_eq!(f.addr, at, "{what}: fault address");
                assert_eq!(f.endpoint, 7);
                let kind = if covered {
                    FaultKind::Permission
                } else {
                    FaultKind::Unmapped
                };
                assert_eq!(f.kind, kind, "{what}: fault kind");
                assert_eq!(f.write, access.has_write());
            }
        }
    }

    fn read(&self, snap: &DmaSnapshot, addr: u64, len: usize, via_trait: bool) {
        let mut buf = vec![0xeeu8; len];
        let ok = if via_trait {
            snap.memory()
                .read_slice(&mut buf, GuestAddress(addr))
                .is_ok()
        } else {
            snap.read(addr, &mut buf).is_ok()
        };
        self.expect(ok, addr, len, Permissions::Read, "read");
        if ok {
            for (k, &b) in buf.iter().enumerate() {
                let gpa = self.shadow.gpa(addr + k as u64);
                assert_eq!(b, self.shadow.mem[gpa], "read byte {k} (gpa {gpa:#x})");
            }
        }
    }

    fn write(&mut self, snap: &DmaSnapshot, addr: u64, data: &[u8], via_trait: bool) {
        let ok = if via_trait {
            snap.memory().write_slice(data, GuestAddress(addr)).is_ok()
        } else {
            snap.write(addr, data).is_ok()
        };
        let (fault, _) = self.shadow.predict(addr, data.len(), Permissions::Write);
        self.expect(ok, addr, data.len(), Permissions::Write, "write");
        // What reached memory: all of it; or, through vm-memory's `Bytes` (which copies slice
        // by slice) with translation passed but a GPA in the hole, the bytes before the hole.
        let written = if ok {
            data.len()
        } else if via_trait && fault.is_none() {
            (0..data.len())
                .find(|&k| !Shadow::in_memory(self.shadow.gpa(addr + k as u64) as u64))
                .unwrap_or(0)
        } else {
            0
        };
        for (k, &b) in data.iter().enumerate().take(written) {
            let gpa = self.shadow.gpa(addr + k as u64);
            self.shadow.mem[gpa] = b;
        }
        // A refused write moved no byte.
        self.check_memory(&format!(
            "write {addr:#x}+{:#x} (trait {via_trait}, ok {ok})",
            data.len()
        ));
    }

    fn check_range(&self, snap: &DmaSnapshot, addr: u64, len: usize, access: Permissions) {
        let ok = snap.memory().check_range(GuestAddress(addr), len, access);
        self.expect(ok, addr, len, access, "check_range");
        // get_slices: refused up front, or slices adding up to the length at the right GPAs.
        match snap.memory().get_slices(GuestAddress(addr), len, access) {
            Err(_) => assert!(!ok, "get_slices refused a reachable range"),
            Ok(iter) => {
                let mut total = 0usize;
                let mut failed = false;
                for s in iter {
                    match s {
                        Ok(s) => total += s.len(),
                        Err(_) => failed = true,
                    }
                }
                assert_eq!(!failed && total == len, ok, "get_slices");
            }
        }
        // get_slices found the same refusal again: one fault per refusal, as above.
        let again = self.take_faults();
        assert!(again.len() <= 1, "{again:?}");
    }
}

/// Run one input; panics when the translation disagrees with the shadow.
pub fn dma(data: &[u8]) {
    let mut input = Input::new(data);
    let regions: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(s, l)| (GuestAddress(s), l)).collect();
    let phys = PhysMemory::from_ranges(&regions).expect("guest memory");
    let mut mem = vec![0u8; MEM_END as usize];
    for (i, b) in mem.iter_mut().enumerate() {
        // The hole reads as zero in check_memory.
        if Shadow::in_memory(i as u64) {
            *b = (i * 7 + i / 251) as u8;
        }
    }
    for &(start, len) in &REGIONS {
        let s = start as usize;
        phys.write_slice(&mem[s..s + len], GuestAddress(start))
            .expect("guest memory");
    }
    let faults = Arc::new(Recorder::default());
    let domain = DmaIommu::new();
    let iommu = domain.for_endpoint(7, faults.clone());
    let dma = DmaSpace::with_iommu(phys.clone(), iommu.clone());
    let mut h = Harness {
        phys,
        iommu,
        dma,
        faults,
        shadow: Shadow {
            map: vec![None; WINDOW],
            mem,
        },
    };
    let mut snap = h.dma.snapshot();
    // Mapped ranges, most recent last: accesses mostly start in one of them.
    let mut mapped: Vec<(u64, u64)> = Vec::new();
    // An address in a recently mapped range, or around the window (sometimes just outside).
    let addr = |i: &mut Input, mapped: &[(u64, u64)]| {
        let pick = usize::from(i.u8());
        match mapped.len().checked_sub(1 + pick % 4) {
            Some(k) if pick & 0x80 == 0 => {
                let (start, n) = mapped[k];
                start + u64::from(i.u16()) % n.max(1)
            }
            _ => BASE
                .wrapping_add(u64::from(i.u16() % 0x4400))
                .wrapping_sub(0x200),
        }
    };
    let len = |i: &mut Input| match i.u8() % 4 {
        0 => i.access_len(true),
        1 => usize::from(i.u16() % 0x1800),
        _ => usize::from(i.u8()),
    };
    let mut steps = 0;
    while !input.is_empty() && steps < 64 {
        steps += 1;
        match input.u8() % 8 {
            0 | 1 => {
                // MAP: a range of the window to anywhere around guest memory.
                let off = u64::from(input.u16()) % WINDOW as u64;
                let n = (u64::from(input.u16()) % 0x1800).min(WINDOW as u64 - off);
                let gpa = u64::from(input.u16()) % (MEM_END + 0x1000);
                let perm = input.pick(&[
                    Permissions::Read,
                    Permissions::Write,
                    Permissions::ReadWrite,
                    Permissions::No,
                ]);
                // A change to the table: the device is quiesced (its snapshot dropped) first.
                drop(snap);
                h.iommu
                    .map(BASE + off, gpa, n, perm)
                    .expect("map inside the window");
                for k in 0..n {
                    h.shadow.map[(off + k) as usize] = Some((gpa + k, perm));
                }
                mapped.push((BASE + off, n));
                snap = h.dma.snapshot();
            }
            2 => {
                let off = u64::from(input.u16()) % WINDOW as u64;
                let n = (u64::from(input.u16()) % 0x1800).min(WINDOW as u64 - off);
                drop(snap);
                h.iommu
                    .unmap(BASE + off, n)
                    .expect("unmap inside the window");
                for k in 0..n {
                    h.shadow.map[(off + k) as usize] = None;
                }
                snap = h.dma.snapshot();
            }
            3 => {
                let (a, n, t) = (addr(&mut input, &mapped), len(&mut input), input.bool());
                h.read(&snap, a, n, t);
            }
            4 | 5 => {
                let (a, t) = (addr(&mut input, &mapped), input.bool());
                let n = len(&mut input);
                let fill = input.u8();
                let data: Vec<u8> = (0..n).map(|k| fill.wrapping_add(k as u8)).collect();
                h.write(&snap, a, &data, t);
            }
            6 => {
                let (a, n) = (addr(&mut input, &mapped), len(&mut input));
                let access = input.pick(&[
                    Permissions::Read,
                    Permissions::Write,
                    Permissions::ReadWrite,
                ]);
                h.check_range(&snap, a, n, access);
            }
            _ => {
                // A new batch: a fresh snapshot with an empty cache.
                drop(snap);
                snap = h.dma.snapshot();
            }
        }
    }
    drop(snap);
    let stats = h.iommu.stats();
    assert!(stats.cached <= stats.lookups && stats.misses <= stats.lookups);
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_inputs() {
        super::super::tests::run(super::dma, 0x5eed_d0a1, 500, 600);
    }
}
