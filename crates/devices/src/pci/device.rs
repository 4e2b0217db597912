//! What a PCI function implements, and how the root asks the VMM to follow a moved BAR with the
//! function's ioeventfds.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::{AddressSpace, BarInfo, ConfigEffects, le_value};
use crate::bus::lock;

/// One PCI function. The root calls it with its own lock held; a BAR access comes straight from
/// the bus. Nothing here touches a bus: BAR moves are returned in [`ConfigEffects`] and the root
/// carries them out.
pub trait PciDevice: Send {
    /// A guest config read. The root guarantees `data.len()` is 1, 2 or 4, the access stays
    /// within one dword and `offset < 4096` (accesses through 0xCF8 stay below 256).
    fn config_read(&mut self, offset: u16, data: &mut [u8]);

    /// A guest config write, with the same guarantees. Returns what the root must do (BARs that
    /// moved or whose decoding changed).
    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigEffects;

    /// A guest access to BAR `bar` at `offset` from its start. `data` is what the vCPU did
    /// (1, 2, 4 or 8 bytes, any alignment): validate it. `offset` is below the BAR's size.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);

    /// The BARs the function declares (for the builder's address allocator).
    fn bars(&self) -> Vec<BarInfo>;

    /// Eventfds to be signalled in the kernel, without an exit, when the guest writes at a
    /// place in a BAR (virtio queue notifications). The root registers them wherever the BAR
    /// decodes and moves them with it. Called only when a BAR moves.
    fn ioevents(&self) -> Vec<IoEvent> {
        Vec::new()
    }
}

/// Sized config accessors, for the builder (programming BARs before boot) and for tests that
/// drive a device without a root or KVM.
pub trait PciDeviceExt: PciDevice {
    fn config_read_u8(&mut self, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        self.config_read(offset, &mut b);
        b[0]
    }

    fn config_read_u16(&mut self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    fn config_read_u32(&mut self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn config_write_u8(&mut self, offset: u16, value: u8) -> ConfigEffects {
        self.config_write(offset, &[value])
    }

    fn config_write_u16(&mut self, offset: u16, value: u16) -> ConfigEffects {
        self.config_write(offset, &value.to_le_bytes())
    }

    fn config_write_u32(&mut self, offset: u16, value: u32) -> ConfigEffects {
        self.config_write(offset, &value.to_le_bytes())
    }

    fn bar_read_u32(&mut self, bar: u8, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.bar_read(bar, offset, &mut b);
        le_value(&b) as u32
    }

    fn bar_write_u32(&mut self, bar: u8, offset: u64, value: u32) {
        self.bar_write(bar, offset, &value.to_le_bytes());
    }
}

impl<T: PciDevice + ?Sized> PciDeviceExt for T {}

/// Which writes an ioeventfd catches: any write at the address, or only writes of this width
/// and value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Datamatch {
    Any,
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
}

/// An ioeventfd a device wants at `offset` in BAR `bar`.
#[derive(Clone, Debug)]
pub struct IoEvent {
    pub bar: u8,
    pub offset: u64,
    pub datamatch: Datamatch,
    pub fd: Arc<EventFd>,
}

/// Registers ioeventfds with the hypervisor (KVM_IOEVENTFD in the vmm; a recorder in tests).
/// Unregister takes exactly what register was given.
pub trait IoEventRegistry: Send + Sync {
    fn register(
        &self,
        space: AddressSpace,
        addr: u64,
        datamatch: Datamatch,
        fd: &EventFd,
    ) -> io::Result<()>;

    fn unregister(
        &self,
        space: AddressSpace,
        addr: u64,
        datamatch: Datamatch,
        fd: &EventFd,
    ) -> io::Result<()>;
}

/// Keeps the set of registered ioeventfds: for tests.
#[derive(Default, Debug)]
pub struct RecordingIoEvents(Mutex<Vec<(AddressSpace, u64, Datamatch, i32)>>);

impl RecordingIoEvents {
    /// What is registered now: (space, address, datamatch, raw fd).
    pub fn registered(&self) -> Vec<(AddressSpace, u64, Datamatch, i32)> {
        lock(&self.0).clone()
    }
}

impl IoEventRegistry for RecordingIoEvents {
    fn register(
        &self,
        space: AddressSpace,
        addr: u64,
        datamatch: Datamatch,
        fd: &EventFd,
    ) -> io::Result<()> {
        let entry = (space, addr, datamatch, fd.as_raw_fd());
        let mut v = lock(&self.0);
        if v.contains(&entry) {
            // KVM refuses a duplicate too.
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        v.push(entry);
        Ok(())
    }

    fn unregister(
        &self,
        space: AddressSpace,
        addr: u64,
        datamatch: Datamatch,
        fd: &EventFd,
    ) -> io::Result<()> {
        let entry = (space, addr, datamatch, fd.as_raw_fd());
        let mut v = lock(&self.0);
        let i = v
            .iter()
            .position(|e| *e == entry)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        v.remove(i);
        Ok(())
    }
}

/// A BAR's range on a bus: forwards accesses to the device with the BAR's index.
pub(crate) struct BarRegion {
    pub dev: Arc<Mutex<dyn PciDevice>>,
    pub bar: u8,
}

impl crate::bus::BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).bar_write(self.bar, offset, data);
    }
}
