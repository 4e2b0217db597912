//! The root complex: PCI bus 0 with a host bridge at 00:00.0, reached through configuration
//! mechanism #1 (ports 0xCF8/0xCFC) and ECAM. Both front doors funnel into one [`PciRoot`],
//! which is the only place where a BAR change reaches a bus.
//!
//! Locks: a config access holds the root, then the device; a BAR access holds only the device.
//! Bus maps are changed with the root held and no device held, and the bus releases its map
//! before it runs a device, so none of these can deadlock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use super::config::{ConfigSpace, PciIds};
use super::device::{BarRegion, IoEvent, IoEventRegistry, PciDevice};
use super::{AddressSpace, BarChange, BarInfo, Bdf, ConfigEffects, PciError, le_value};
use crate::bus::{Bus, BusDevice, lock};

/// Host bridge ids: an Intel vendor id with the device id Cloud Hypervisor uses for its
/// virtual host bridge; class 0x0600 (host bridge).
pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Enable, bus, device, function, dword register; reserved bits read as zero.
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;

/// The host bridge at 00:00.0: ids only.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::endpoint(&PciIds {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id: HOST_BRIDGE_DEVICE,
                class_code: 0x06_0000,
                ..Default::default()
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigEffects {
        self.config.write(offset, data)
    }

    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn bars(&self) -> Vec<BarInfo> {
        Vec::new()
    }
}

/// Where the root put one BAR, and the ioeventfds it registered there.
struct Mapping {
    space: AddressSpace,
    base: u64,
    ioevents: Vec<IoEvent>,
}

struct Slot {
    dev: Arc<Mutex<dyn PciDevice>>,
    mapped: [Option<Mapping>; 6],
}

/// PCI functions by address, and the buses their BARs go on.
pub struct PciRoot {
    slots: BTreeMap<Bdf, Slot>,
    /// Weak: the buses hold the root (through its front doors), and a strong reference back
    /// would keep a whole VM's devices alive after the VM is gone.
    mmio: Weak<Bus>,
    pio: Weak<Bus>,
    ioevents: Option<Arc<dyn IoEventRegistry>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("functions", &self.slots.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Whether a config access is one the root passes on: 1, 2 or 4 bytes within one dword of the
/// 4 KiB space (PCIe leaves the others undefined; we read all-ones and drop writes).
fn valid_access(offset: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4)
        && usize::from(offset & 3) + len <= 4
        && usize::from(offset) < super::CONFIG_SPACE_SIZE
}

impl PciRoot {
    /// A root with the host bridge at 00:00.0. BARs go on `mmio` (memory) and `pio` (I/O).
    pub fn new(mmio: &Arc<Bus>, pio: &Arc<Bus>) -> Self {
        let mut root = Self {
            slots: BTreeMap::new(),
            mmio: Arc::downgrade(mmio),
            pio: Arc::downgrade(pio),
            ioevents: None,
        };
        let bridge: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(HostBridge::new()));
        root.slots.insert(
            Bdf::default(),
            Slot {
                dev: bridge,
                mapped: Default::default(),
            },
        );
        root
    }

    /// Where devices' ioeventfds are registered when their BARs are mapped. Without one,
    /// notifications reach devices through BAR writes (an exit each).
    pub fn set_ioevent_registry(&mut self, registry: Arc<dyn IoEventRegistry>) {
        self.ioevents = Some(registry);
    }

    /// Put `dev` at `bdf`. Its BARs start unmapped; program them with [`Self::config_write`].
    /// A function other than 0 is found by the guest only if function 0 says multi-function.
    pub fn add_device(&mut self, bdf: Bdf, dev: Arc<Mutex<dyn PciDevice>>) -> Result<(), PciError> {
        if self.slots.contains_key(&bdf) {
            return Err(PciError::SlotTaken(bdf));
        }
        self.slots.insert(
            bdf,
            Slot {
                dev,
                mapped: Default::default(),
            },
        );
        Ok(())
    }

    /// The first device number on bus 0 with no function in it.
    pub fn free_device(&self) -> Option<u8> {
        (0..32u8).find(|&d| {
            self.slots
                .range(Bdf::new(0, d, 0)..=Bdf::new(0, d, 7))
                .next()
                .is_none()
        })
    }

    pub fn device(&self, bdf: Bdf) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.slots.get(&bdf).map(|s| s.dev.clone())
    }

    /// Where the root mapped BAR `bar` of `bdf` (None if unmapped, refused or absent).
    pub fn bar_mapping(&self, bdf: Bdf, bar: u8) -> Option<u64> {
        let slot = self.slots.get(&bdf)?;
        slot.mapped.get(usize::from(bar))?.as_ref().map(|m| m.base)
    }

    /// A config read; absent functions and undefined accesses read as all-ones.
    pub fn config_read(&self, bdf: Bdf, offset: u16, data: &mut [u8]) {
        match self.slots.get(&bdf) {
            Some(slot) if valid_access(offset, data.len()) => {
                lock(&slot.dev).config_read(offset, data);
            }
            _ => data.fill(0xff),
        }
    }

    /// A config write; BAR changes it causes are applied to the buses here.
    pub fn config_write(&mut self, bdf: Bdf, offset: u16, data: &[u8]) {
        if !valid_access(offset, data.len()) {
            tracing::debug!(%bdf, offset, len = data.len(), "config write not within a dword dropped");
            return;
        }
        let Some(slot) = self.slots.get(&bdf) else {
            return;
        };
        let effects = lock(&slot.dev).config_write(offset, data);
        for change in effects.bar_changes {
            self.apply(bdf, change);
        }
    }

    /// Move one BAR on its bus. A range the bus refuses (the guest put two BARs on top of each
    /// other, or on another device) stays unmapped until the guest moves it again.
    fn apply(&mut self, bdf: Bdf, change: BarChange) {
        let Some(slot) = self.slots.get_mut(&bdf) else {
            return;
        };
        let Some(entry) = slot.mapped.get_mut(usize::from(change.bar)) else {
            tracing::warn!(%bdf, bar = change.bar, "BAR change for a BAR that cannot exist");
            return;
        };
        // A bus that is gone means the VM is being torn down: nothing left to map.
        let bus_of = |space| match space {
            AddressSpace::Memory => self.mmio.upgrade(),
            AddressSpace::Io => self.pio.upgrade(),
        };
        if let Some(old) = entry.take() {
            if let Some(bus) = bus_of(old.space) {
                bus.remove(old.base);
            }
            if let Some(reg) = &self.ioevents {
                for ev in &old.ioevents {
                    if let Err(e) =
                        reg.unregister(old.space, old.base + ev.offset, ev.datamatch, &ev.fd)
                    {
                        tracing::warn!(%bdf, bar = change.bar, "cannot remove ioeventfd: {e}");
                    }
                }
            }
        }
        let Some(base) = change.new else {
            return;
        };
        let region = Arc::new(Mutex::new(BarRegion {
            dev: slot.dev.clone(),
            bar: change.bar,
        }));
        let Some(bus) = bus_of(change.space) else {
            return;
        };
        if let Err(e) = bus.insert(region, base, change.size) {
            tracing::warn!(
                %bdf,
                bar = change.bar,
                "BAR at {base:#x} (+{:#x}) left unmapped until moved: {e}",
                change.size
            );
            return;
        }
        let mut ioevents = Vec::new();
        if let Some(reg) = &self.ioevents {
            let wanted = lock(&slot.dev).ioevents();
            for ev in wanted
                .into_iter()
                .filter(|ev| ev.bar == change.bar && ev.offset < change.size)
            {
                match reg.register(change.space, base + ev.offset, ev.datamatch, &ev.fd) {
                    Ok(()) => ioevents.push(ev),
                    Err(e) => tracing::warn!(%bdf, bar = change.bar, "cannot add ioeventfd: {e}"),
                }
            }
        }
        *entry = Some(Mapping {
            space: change.space,
            base,
            ioevents,
        });
    }
}

/// Configuration mechanism #1: the address register at 0xCF8 (32-bit accesses only: byte
/// accesses to 0xCF8..0xCFB belong to other chipset registers) and the data window at
/// 0xCFC..0xCFF. Insert at 0xCF8 with length 8.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root, address: 0 }
    }

    /// The function and register the data window points at, if enabled and the access stays
    /// within the window.
    fn target(&self, offset: u64, len: usize) -> Option<(Bdf, u16)> {
        let k = offset.checked_sub(4)?;
        if self.address & CONFIG_ADDRESS_ENABLE == 0 || k + len as u64 > 4 {
            return None;
        }
        let bdf = Bdf::from_raw((self.address >> 8) as u16);
        Some((bdf, (self.address & 0xfc) as u16 + k as u16))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
        } else if let Some((bdf, reg)) = self.target(offset, data.len()) {
            lock(&self.root).config_read(bdf, reg, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            self.address = le_value(data) as u32 & CONFIG_ADDRESS_MASK;
        } else if let Some((bdf, reg)) = self.target(offset, data.len()) {
            lock(&self.root).config_write(bdf, reg, data);
        }
    }
}

/// PCI Express enhanced configuration access: 4 KiB per function, 1 MiB per bus, the offset
/// is `bus << 20 | device << 15 | function << 12 | register`. Insert at the ECAM base with
/// the window's length (256 MiB for buses 0..=255).
pub struct PciEcam {
    root: Arc<Mutex<PciRoot>>,
}

impl PciEcam {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }

    fn decode(offset: u64) -> Option<(Bdf, u16)> {
        let bdf = u16::try_from(offset >> 12).ok()?;
        Some((Bdf::from_raw(bdf), (offset & 0xfff) as u16))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset) {
            Some((bdf, reg)) => lock(&self.root).config_read(bdf, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bdf, reg)) = Self::decode(offset) {
            lock(&self.root).config_write(bdf, reg, data);
        }
    }
}

#[cfg(test)]
mod tests;
