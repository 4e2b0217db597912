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
use super::port::{PortRoute, RootPort};
use super::sriov::{VfBarChange, VfEnableChange};
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

/// A root port on bus 0 and the functions behind it.
struct Port {
    port: Arc<Mutex<RootPort>>,
    /// The bus number the builder gave the functions behind the port (their slots' keys and
    /// their IOMMU endpoint ids): what firmware programs at reset. The guest may renumber; its
    /// number is in `route`.
    bus: u8,
    route: PortRoute,
}

/// Carries out what an SR-IOV PF's config write asked for: create or remove its VFs
/// ([`VfEnableChange`]) and map or unmap their BARs ([`VfBarChange`]). Called by the root after
/// the PF's own lock is released, with the root held (`root`), on the thread of the write (a
/// vCPU): when the write completes, the VFs exist, so the next config access finds them.
pub trait SriovHandler: Send + Sync {
    fn carry_out(
        &self,
        root: &mut PciRoot,
        pf: Bdf,
        enable: Option<VfEnableChange>,
        bars: &[VfBarChange],
    );
}

/// PCI functions by address, and the buses their BARs go on.
///
/// Functions behind a root port are kept at `Bdf::new(port bus, ..)`, `port bus` being the
/// number the builder gave the port ([`Self::add_root_port`]); a guest access names the bus
/// number the guest programmed in the port and is translated ([`Self::resolve`]).
pub struct PciRoot {
    slots: BTreeMap<Bdf, Slot>,
    /// Root ports by their address on bus 0.
    ports: BTreeMap<Bdf, Port>,
    /// SR-IOV PFs (by their key in `slots`) and who carries out their VF changes.
    sriov: BTreeMap<Bdf, Arc<dyn SriovHandler>>,
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
            ports: BTreeMap::new(),
            sriov: BTreeMap::new(),
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

    /// Put a root port at `bdf` on bus 0; the functions behind it are added at
    /// `Bdf::new(bus, ..)`. The port starts programmed as firmware would leave it: secondary
    /// and subordinate bus `bus`, memory window `window` (base, length).
    pub fn add_root_port(
        &mut self,
        bdf: Bdf,
        mut port: RootPort,
        bus: u8,
        window: Option<(u64, u64)>,
    ) -> Result<(), PciError> {
        if bdf.bus() != 0 || bus == 0 || self.ports.values().any(|p| p.bus == bus) {
            return Err(PciError::SlotTaken(Bdf::new(bus, 0, 0)));
        }
        port.preset(bus, window);
        let route = port.route();
        let port = Arc::new(Mutex::new(port));
        self.add_device(bdf, port.clone())?;
        self.ports.insert(bdf, Port { port, bus, route });
        Ok(())
    }

    /// Let `handler` carry out the VF changes of the SR-IOV PF at `pf` (its key).
    pub fn set_sriov_handler(&mut self, pf: Bdf, handler: Arc<dyn SriovHandler>) {
        self.sriov.insert(pf, handler);
    }

    /// Where a guest's config access to `guest` goes: bus 0 as is; a root port's secondary bus
    /// to the functions behind it (device 0 only, functions 0..=255 with ARI Forwarding and
    /// 0..=7 without); anything else (a bus no port leads to, buses behind the secondary one,
    /// where there are no bridges) nowhere.
    pub fn resolve(&self, guest: Bdf) -> Option<Bdf> {
        if guest.bus() == 0 {
            return Some(guest);
        }
        let devfn = guest.raw() as u8;
        self.ports
            .values()
            .find(|p| p.route.secondary == guest.bus())
            .filter(|p| p.route.ari_forwarding || devfn < 8)
            .map(|p| Bdf::from_raw(u16::from(p.bus) << 8 | u16::from(devfn)))
    }

    /// Remove the function at `bdf` (its key): its BARs leave the buses and its ioeventfds
    /// are unregistered. Returns it, so that the caller can release what it holds.
    pub fn remove_device(&mut self, bdf: Bdf) -> Option<Arc<Mutex<dyn PciDevice>>> {
        let mapped: Vec<(u8, AddressSpace)> = self
            .slots
            .get(&bdf)?
            .mapped
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.as_ref().map(|m| (i as u8, m.space)))
            .collect();
        for (bar, space) in mapped {
            self.map_bar(bdf, bar, space, 0, None);
        }
        self.sriov.remove(&bdf);
        self.slots.remove(&bdf).map(|s| s.dev)
    }

    /// Map BAR `bar` of the function at `bdf` at `base` (`size` bytes), or unmap it with
    /// `None`: for BARs the function does not decode itself (a VF's, which its PF's VF BARs
    /// place). Ioeventfds follow as for any BAR.
    pub fn map_bar(
        &mut self,
        bdf: Bdf,
        bar: u8,
        space: AddressSpace,
        size: u64,
        base: Option<u64>,
    ) {
        let old = self.bar_mapping(bdf, bar);
        if old == base && base.is_some() {
            return;
        }
        self.apply(
            bdf,
            BarChange {
                bar,
                space,
                size,
                old,
                new: base,
            },
        );
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

    /// A config read at the guest's address `bdf`; absent functions and undefined accesses
    /// read as all-ones.
    pub fn config_read(&self, bdf: Bdf, offset: u16, data: &mut [u8]) {
        match self.resolve(bdf).and_then(|b| self.slots.get(&b)) {
            Some(slot) if valid_access(offset, data.len()) => {
                lock(&slot.dev).config_read(offset, data);
            }
            _ => data.fill(0xff),
        }
    }

    /// A config write at the guest's address `bdf`; BAR changes it causes are applied to the
    /// buses here, VF changes handed to the PF's [`SriovHandler`] once the PF's lock is released.
    pub fn config_write(&mut self, bdf: Bdf, offset: u16, data: &[u8]) {
        if !valid_access(offset, data.len()) {
            tracing::debug!(%bdf, offset, len = data.len(), "config write not within a dword dropped");
            return;
        }
        let Some((bdf, slot)) = self
            .resolve(bdf)
            .and_then(|b| self.slots.get(&b).map(|s| (b, s)))
        else {
            return;
        };
        let effects = lock(&slot.dev).config_write(offset, data);
        if let Some(p) = self.ports.get_mut(&bdf) {
            p.route = lock(&p.port).route();
        }
        for change in effects.bar_changes {
            self.apply(bdf, change);
        }
        if effects.vf_enable.is_some() || !effects.vf_bar_changes.is_empty() {
            match self.sriov.get(&bdf).cloned() {
                Some(h) => h.carry_out(self, bdf, effects.vf_enable, &effects.vf_bar_changes),
                None => tracing::warn!(%bdf, "SR-IOV change of a function without a handler"),
            }
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
