//! A bus maps address ranges to devices. The vCPU loop hands every port I/O and MMIO exit to one
//! of two buses and knows nothing else about devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

/// A device reachable on a bus. `offset` is relative to the start of the range it was inserted
/// at; `data` is the access (1, 2, 4 or 8 bytes, guest-chosen: validate before trusting it).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("Range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("Range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

type Map = BTreeMap<u64, Entry>;

/// Address ranges to devices. Unmapped reads return all-ones, unmapped writes are dropped, as on
/// real hardware. Devices can be added, moved (a guest relocating a PCI BAR) and removed while
/// vCPUs use the bus: a change publishes a new map (read-copy-update), so an access takes no lock
/// on the map and a device may change the bus from inside an access.
#[derive(Default)]
pub struct Bus {
    /// base -> (len, device)
    ranges: ArcSwap<Map>,
    /// Serialises changes; accesses never take it.
    writer: Mutex<()>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.map().iter().map(|(b, (l, _))| (*b, *l)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> arc_swap::Guard<Arc<Map>> {
        self.ranges.load()
    }

    /// Apply `change` to a copy of the map and publish it if it succeeds.
    fn update<T>(&self, change: impl FnOnce(&mut Map) -> T) -> T {
        let _w = lock(&self.writer);
        let mut map = Map::clone(&self.ranges.load());
        let r = change(&mut map);
        self.ranges.store(Arc::new(map));
        r
    }

    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        self.update(|ranges| {
            // The previous range must end at or before `base`, the next must start at or after `end`.
            let prev_overlaps = ranges
                .range(..=base)
                .next_back()
                .is_some_and(|(b, (l, _))| b + l > base);
            let next_overlaps = ranges.range(base..end).next().is_some();
            if prev_overlaps || next_overlaps {
                return Err(BusError::Overlap { base, len });
            }
            ranges.insert(base, (len, device));
            Ok(())
        })
    }

    /// Remove the device whose range starts at `base`.
    pub fn remove(&self, base: u64) -> Option<Arc<Mutex<dyn BusDevice>>> {
        self.update(|ranges| ranges.remove(&base).map(|(_, d)| d))
    }

    /// Run `access` on the device at `addr` with the offset into it. The map snapshot stays alive
    /// for the access (so a device that removes itself is not freed under it) but locks nothing:
    /// a device access may itself change the bus.
    fn with_device<R>(
        &self,
        addr: u64,
        access: impl FnOnce(&mut dyn BusDevice, u64) -> R,
    ) -> Option<R> {
        let map = self.map();
        // The last range starting at or below `addr`.
        let (base, (len, dev)) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < *len).then(|| access(&mut *lock(dev), offset))
    }

    /// Read; returns false (and fills all-ones) when nothing is mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let found = self
            .with_device(addr, |dev, offset| dev.read(offset, data))
            .is_some();
        if !found {
            data.fill(0xff);
        }
        found
    }

    /// Write; returns false when nothing is mapped at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.with_device(addr, |dev, offset| dev.write(offset, data))
            .is_some()
    }
}

/// Lock a device, going on if a previous holder panicked: device state is plain data that each
/// access leaves consistent, and one device's bug must not take the whole VM down.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_unmapped() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff]);
        assert!(!bus.read(0x3f7, &mut b));
        assert!(bus.write(0x3ff, &[7]));
        assert!(!bus.write(0x3f7, &[7]));
        assert_eq!(dev.lock().unwrap().last, vec![(7, vec![7])]);
    }

    #[test]
    fn overlaps_refused() {
        let bus = Bus::new();
        let d = || Arc::new(Mutex::new(Reg::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(d(), 0x10, 0x10).unwrap();
        assert!(bus.insert(d(), 0x18, 0x10).is_err());
        assert!(bus.insert(d(), 0x08, 0x09).is_err());
        assert!(bus.insert(d(), 0x00, 0x100).is_err());
        assert!(bus.insert(d(), 0x20, 0).is_err());
        assert!(bus.insert(d(), u64::MAX, 2).is_err());
        bus.insert(d(), 0x08, 0x08).unwrap();
        bus.insert(d(), 0x20, 0x08).unwrap();
        assert!(bus.remove(0x20).is_some());
        bus.insert(d(), 0x20, 0x08).unwrap();
    }
}
