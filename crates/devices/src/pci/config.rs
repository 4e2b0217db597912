//! A function's configuration space: 4 KiB of registers where every byte has a writable mask and
//! a write-1-to-clear mask, so that read-only registers stay read-only whatever the guest writes.
//! BARs are ordinary masked registers (their writable bits are the address bits above the size),
//! which makes sizing fall out of the masks: all-ones written, the size mask read back.

use super::capability::{CapKind, Capability};
use super::{AddressSpace, BarChange, BarInfo, BarKind, ConfigEffects, PciError, le_value, put_le};

/// Bytes of configuration space per function (PCI Express; conventional PCI has 256).
pub const CONFIG_SPACE_SIZE: usize = 4096;
const LEGACY_SIZE: usize = 256;
/// Standard capabilities live between the end of the header and 0x100.
const CAP_START: usize = 0x40;
const EXT_CAP_START: usize = 0x100;

/// Header registers (PCI Local Bus 3.0 6.1, PCI-to-PCI Bridge 1.2 3.2).
pub(crate) mod reg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION: usize = 0x08;
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const SUBSYSTEM_ID: usize = 0x2e;
    pub const CAPABILITIES: usize = 0x34;
    pub const INTERRUPT_LINE: usize = 0x3c;
    // Type 1 (bridge) only.
    pub const PRIMARY_BUS: usize = 0x18;
    pub const IO_BASE: usize = 0x1c;
    pub const SECONDARY_STATUS: usize = 0x1e;
    pub const MEMORY_BASE: usize = 0x20;
    pub const PREF_MEMORY_BASE: usize = 0x24;
    pub const PREF_BASE_UPPER: usize = 0x28;
    pub const BRIDGE_CONTROL: usize = 0x3e;

    pub const COMMAND_IO: u16 = 1 << 0;
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    pub const COMMAND_MASTER: u16 = 1 << 2;
    /// I/O and memory decode, bus master, parity and SERR# response, INTx disable.
    pub const COMMAND_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400;
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Master data parity error, signalled/received target abort, received master abort,
    /// signalled system error, detected parity error.
    pub const STATUS_W1C: u16 = 0xf900;
    pub const HEADER_MULTIFUNCTION: u8 = 0x80;
}

/// Identity registers of a function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciIds {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Base class << 16 | sub-class << 8 | programming interface.
    pub class_code: u32,
    /// Type 0 headers only (a bridge has no subsystem registers).
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// The layout of the first 64 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderType {
    /// Type 0: an endpoint, six BARs.
    Endpoint,
    /// Type 1: a PCI-to-PCI bridge (a PCIe root port), two BARs, bus numbers and windows.
    Bridge,
}

impl HeaderType {
    fn bar_count(self) -> u8 {
        match self {
            HeaderType::Endpoint => 6,
            HeaderType::Bridge => 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Empty,
    Bar(BarInfo),
    /// The upper half of the 64-bit BAR before it.
    Upper,
}

/// The configuration space of one function.
pub struct ConfigSpace {
    regs: Box<[u8; CONFIG_SPACE_SIZE]>,
    wmask: Box<[u8; CONFIG_SPACE_SIZE]>,
    w1c: Box<[u8; CONFIG_SPACE_SIZE]>,
    header: HeaderType,
    bars: [BarSlot; 6],
    /// Last capability in each chain (to link the next one) and the next free offset.
    last_cap: Option<usize>,
    next_cap: usize,
    last_ext_cap: Option<usize>,
    next_ext_cap: usize,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor", &format_args!("{:#06x}", self.read_u16(0)))
            .field("device", &format_args!("{:#06x}", self.read_u16(2)))
            .field("header", &self.header)
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    pub fn new(header: HeaderType, ids: &PciIds) -> Self {
        let mut c = Self {
            regs: Box::new([0; CONFIG_SPACE_SIZE]),
            wmask: Box::new([0; CONFIG_SPACE_SIZE]),
            w1c: Box::new([0; CONFIG_SPACE_SIZE]),
            header,
            bars: [BarSlot::Empty; 6],
            last_cap: None,
            next_cap: CAP_START,
            last_ext_cap: None,
            next_ext_cap: EXT_CAP_START,
        };
        c.set(reg::VENDOR_ID, 2, ids.vendor_id.into());
        c.set(reg::DEVICE_ID, 2, ids.device_id.into());
        c.set(
            reg::REVISION,
            4,
            u32::from(ids.revision) | (ids.class_code << 8),
        );
        c.mask(reg::COMMAND, 2, reg::COMMAND_WRITABLE.into());
        c.mask_w1c(reg::STATUS, 2, reg::STATUS_W1C.into());
        c.mask(reg::CACHE_LINE_SIZE, 1, 0xff);
        c.mask(reg::INTERRUPT_LINE, 1, 0xff);
        match header {
            HeaderType::Endpoint => {
                c.set(reg::SUBSYSTEM_VENDOR_ID, 2, ids.subsystem_vendor_id.into());
                c.set(reg::SUBSYSTEM_ID, 2, ids.subsystem_id.into());
            }
            HeaderType::Bridge => {
                c.set(reg::HEADER_TYPE, 1, 1);
                // Primary, secondary and subordinate bus numbers.
                c.mask(reg::PRIMARY_BUS, 3, 0x00ff_ffff);
                // 16-bit I/O window, 4 KiB granular.
                c.mask(reg::IO_BASE, 2, 0xf0f0);
                c.mask_w1c(reg::SECONDARY_STATUS, 2, reg::STATUS_W1C.into());
                // Memory window, 1 MiB granular.
                c.mask(reg::MEMORY_BASE, 4, 0xfff0_fff0);
                // Prefetchable window, 64-bit capable.
                c.set(reg::PREF_MEMORY_BASE, 4, 0x0001_0001);
                c.mask(reg::PREF_MEMORY_BASE, 4, 0xfff0_fff0);
                c.mask(reg::PREF_BASE_UPPER, 4, 0xffff_ffff);
                c.mask(reg::PREF_BASE_UPPER + 4, 4, 0xffff_ffff);
                // Parity/SERR response, ISA/VGA, master abort, secondary reset, ...; bit 10
                // (discard timer status) is write-1-to-clear.
                c.mask(reg::BRIDGE_CONTROL, 2, 0x0bff);
                c.mask_w1c(reg::BRIDGE_CONTROL, 2, 0x0400);
            }
        }
        c
    }

    /// A type 0 header.
    pub fn endpoint(ids: &PciIds) -> Self {
        Self::new(HeaderType::Endpoint, ids)
    }

    /// A type 1 header.
    pub fn bridge(ids: &PciIds) -> Self {
        Self::new(HeaderType::Bridge, ids)
    }

    pub fn header_type(&self) -> HeaderType {
        self.header
    }

    /// Function 0 of a multi-function device says so in its header type.
    pub fn set_multifunction(&mut self, on: bool) {
        let h = self.regs[reg::HEADER_TYPE] & !reg::HEADER_MULTIFUNCTION;
        self.regs[reg::HEADER_TYPE] = h | if on { reg::HEADER_MULTIFUNCTION } else { 0 };
    }

    // Device-side access: plain values, no masks. Offsets out of range read as all-ones and
    // are ignored on write (they come from device constants, not from the guest).

    fn set(&mut self, off: usize, width: usize, value: u32) {
        if let Some(b) = self.regs.get_mut(off..off.saturating_add(width)) {
            put_le(b, value.into());
        }
    }

    fn mask(&mut self, off: usize, width: usize, value: u32) {
        if let Some(b) = self.wmask.get_mut(off..off.saturating_add(width)) {
            put_le(b, value.into());
        }
    }

    fn mask_w1c(&mut self, off: usize, width: usize, value: u32) {
        if let Some(b) = self.w1c.get_mut(off..off.saturating_add(width)) {
            put_le(b, value.into());
        }
    }

    fn get(&self, off: usize, width: usize) -> u32 {
        match self.regs.get(off..off.saturating_add(width)) {
            Some(b) => le_value(b) as u32,
            None => u32::MAX
                .checked_shr(32 - 8 * width.min(4) as u32)
                .unwrap_or(0),
        }
    }

    pub fn read_u8(&self, off: u16) -> u8 {
        self.get(off.into(), 1) as u8
    }

    pub fn read_u16(&self, off: u16) -> u16 {
        self.get(off.into(), 2) as u16
    }

    pub fn read_u32(&self, off: u16) -> u32 {
        self.get(off.into(), 4)
    }

    /// Set a register as the device (status bits, link state), bypassing the guest masks.
    pub fn set_u8(&mut self, off: u16, value: u8) {
        self.set(off.into(), 1, value.into());
    }

    pub fn set_u16(&mut self, off: u16, value: u16) {
        self.set(off.into(), 2, value.into());
    }

    pub fn set_u32(&mut self, off: u16, value: u32) {
        self.set(off.into(), 4, value);
    }

    pub fn command(&self) -> u16 {
        self.read_u16(reg::COMMAND as u16)
    }

    /// Whether the guest lets the function master the bus (DMA and MSI writes).
    pub fn bus_master(&self) -> bool {
        self.command() & reg::COMMAND_MASTER != 0
    }

    // Guest access.

    /// A guest read. Bytes beyond the space read as all-ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self
                .regs
                .get(usize::from(offset) + i)
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// A guest write: only writable bits change, written ones clear write-1-to-clear bits,
    /// bytes beyond the space are dropped. Returns the BARs whose decoding changed.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> ConfigEffects {
        let start = usize::from(offset);
        let end = start.saturating_add(data.len()).min(CONFIG_SPACE_SIZE);
        let bar_regs = reg::BAR0..reg::BAR0 + 4 * usize::from(self.header.bar_count());
        let touches_decode = start < end
            && (overlaps(start..end, reg::COMMAND..reg::COMMAND + 2)
                || overlaps(start..end, bar_regs));
        let before = touches_decode.then(|| self.mappings());

        let mut read_only = false;
        for (i, &v) in data.iter().enumerate().take(end.saturating_sub(start)) {
            let o = start + i;
            let (old, w, c) = (self.regs[o], self.wmask[o], self.w1c[o]);
            read_only |= (v ^ old) & !(w | c) != 0;
            self.regs[o] = ((old & !w) | (v & w)) & !(v & c);
        }
        if read_only {
            tracing::debug!(
                offset,
                ?data,
                "config write to read-only bits ignored (vendor {:#06x} device {:#06x})",
                self.read_u16(0),
                self.read_u16(2)
            );
        }

        let mut effects = ConfigEffects::default();
        if let Some(before) = before {
            let after = self.mappings();
            for (i, (old, new)) in before.into_iter().zip(after).enumerate() {
                if old == new {
                    continue;
                }
                if let BarSlot::Bar(info) = self.bars[i] {
                    effects.bar_changes.push(BarChange {
                        bar: info.index,
                        space: info.space(),
                        size: info.size,
                        old,
                        new,
                    });
                }
            }
        }
        effects
    }

    // BARs.

    /// Declare BAR `index`. Memory BARs are 16 bytes or more, I/O BARs 4 to 256 bytes, both
    /// powers of two; a 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(
        &mut self,
        index: u8,
        kind: BarKind,
        size: u64,
        prefetchable: bool,
    ) -> Result<(), PciError> {
        let i = usize::from(index);
        let n = usize::from(self.header.bar_count());
        let regs = if kind == BarKind::Mem64 { 2 } else { 1 };
        if i + regs > n || self.bars[i..i + regs].iter().any(|b| *b != BarSlot::Empty) {
            return Err(PciError::BarIndex(index));
        }
        let (min, max) = match kind {
            BarKind::Io => (4, 256),
            BarKind::Mem32 => (16, 1 << 31),
            BarKind::Mem64 => (16, 1 << 63),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciError::BarSize { index, size });
        }
        let prefetchable = prefetchable && kind != BarKind::Io;
        let off = reg::BAR0 + 4 * i;
        let address_mask = !(size - 1);
        let type_bits: u32 = match kind {
            BarKind::Io => 0x1,
            BarKind::Mem32 => 0x0,
            BarKind::Mem64 => 0x4,
        } | if prefetchable { 0x8 } else { 0 };
        let low_flags: u64 = if kind == BarKind::Io { 0x3 } else { 0xf };
        self.set(off, 4, type_bits);
        self.mask(off, 4, (address_mask & !low_flags) as u32);
        if kind == BarKind::Mem64 {
            self.mask(off + 4, 4, (address_mask >> 32) as u32);
            self.bars[i + 1] = BarSlot::Upper;
        }
        self.bars[i] = BarSlot::Bar(BarInfo {
            index,
            kind,
            size,
            prefetchable,
        });
        Ok(())
    }

    /// The declared BARs.
    pub fn bars(&self) -> Vec<BarInfo> {
        self.bars
            .iter()
            .filter_map(|b| match b {
                BarSlot::Bar(info) => Some(*info),
                _ => None,
            })
            .collect()
    }

    pub fn bar(&self, index: u8) -> Option<BarInfo> {
        match self.bars.get(usize::from(index)) {
            Some(BarSlot::Bar(info)) => Some(*info),
            _ => None,
        }
    }

    /// The address programmed in BAR `index`, whether or not it decodes.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let info = self.bar(index)?;
        let off = reg::BAR0 + 4 * usize::from(index);
        let low = u64::from(self.get(off, 4));
        Some(match info.kind {
            BarKind::Io => low & !0x3,
            BarKind::Mem32 => low & !0xf,
            BarKind::Mem64 => (low & !0xf) | (u64::from(self.get(off + 4, 4)) << 32),
        })
    }

    /// Where BAR `index` decodes now: `None` when its decoding is off in the command register,
    /// when it is unassigned (address 0), or when it reaches the top of its address space (4 GiB
    /// for a 32-bit BAR, 64 KiB for I/O): that is what sizing with decoding on leaves behind,
    /// and no real assignment goes there (QEMU draws the same line).
    pub fn bar_mapping(&self, index: u8) -> Option<u64> {
        let info = self.bar(index)?;
        let decode = match info.space() {
            AddressSpace::Io => reg::COMMAND_IO,
            AddressSpace::Memory => reg::COMMAND_MEMORY,
        };
        if self.command() & decode == 0 {
            return None;
        }
        let addr = self.bar_address(index).filter(|&a| a != 0)?;
        let last = addr.checked_add(info.size - 1)?;
        let limit = match info.kind {
            BarKind::Io => 0xffff,
            BarKind::Mem32 => u64::from(u32::MAX),
            BarKind::Mem64 => u64::MAX,
        };
        (last < limit).then_some(addr)
    }

    fn mappings(&self) -> [Option<u64>; 6] {
        std::array::from_fn(|i| self.bar_mapping(i as u8))
    }

    /// Turn this type 0 header into an SR-IOV virtual function's (PCIe base spec, SR-IOV
    /// 9.3.4): Vendor and Device ID read 0xFFFF (software takes them from the PF), the BARs read
    /// zero and ignore writes (a VF's BARs are the PF's VF BARs: the owner maps them), and
    /// Memory and I/O Space Enable are read-only zero (the PF's VF MSE decides). The BARs stay
    /// declared, so [`Self::bars`] still tells the owner their sizes.
    pub fn make_virtual_function(&mut self) {
        self.set(reg::VENDOR_ID, 4, u32::MAX);
        let bars = reg::BAR0..reg::BAR0 + 4 * usize::from(self.header.bar_count());
        self.regs[bars.clone()].fill(0);
        self.wmask[bars].fill(0);
        let command = self.get(reg::COMMAND, 2) & !u32::from(reg::COMMAND_IO | reg::COMMAND_MEMORY);
        self.set(reg::COMMAND, 2, command);
        let wmask = u32::from(reg::COMMAND_WRITABLE & !(reg::COMMAND_IO | reg::COMMAND_MEMORY));
        self.mask(reg::COMMAND, 2, wmask);
    }

    // Capabilities.

    /// Link `cap` into its chain (standard caps from 0x40, extended caps from 0x100, each
    /// dword-aligned) and return its offset, so that the device can find its registers.
    pub fn add_capability(&mut self, cap: &Capability) -> Result<u16, PciError> {
        let len = cap.len();
        if len < cap.header_len() {
            return Err(PciError::CapabilityLength(len));
        }
        let (start, limit) = match cap.kind {
            CapKind::Standard(_) => (self.next_cap, LEGACY_SIZE),
            CapKind::Extended { .. } => (self.next_ext_cap, CONFIG_SPACE_SIZE),
        };
        let end = start + len;
        if end > limit {
            return Err(PciError::CapabilitySpace { len });
        }
        self.regs[start..end].copy_from_slice(&cap.regs);
        self.wmask[start..end].copy_from_slice(&cap.wmask);
        self.w1c[start..end].copy_from_slice(&cap.w1c);
        // The header is read-only whatever the capability said.
        let header = start..start + cap.header_len();
        self.wmask[header.clone()].fill(0);
        self.w1c[header].fill(0);
        let next_free = end.next_multiple_of(4);
        match cap.kind {
            CapKind::Standard(id) => {
                self.regs[start] = id;
                self.regs[start + 1] = 0;
                // `start` < 0x100 here, so it fits the 8-bit pointer.
                match self.last_cap {
                    Some(last) => self.regs[last + 1] = start as u8,
                    None => {
                        self.regs[reg::CAPABILITIES] = start as u8;
                        let status = self.read_u16(reg::STATUS as u16) | reg::STATUS_CAP_LIST;
                        self.set_u16(reg::STATUS as u16, status);
                    }
                }
                self.last_cap = Some(start);
                self.next_cap = next_free;
            }
            CapKind::Extended { id, version } => {
                let header = u32::from(id) | (u32::from(version & 0xf) << 16);
                self.set(start, 4, header);
                if let Some(last) = self.last_ext_cap {
                    let prev = self.get(last, 4) & 0x000f_ffff;
                    self.set(last, 4, prev | ((start as u32) << 20));
                }
                self.last_ext_cap = Some(start);
                self.next_ext_cap = next_free;
            }
        }
        Ok(start as u16)
    }

    /// The offset of the first standard capability with this id.
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        let mut at = usize::from(self.regs[reg::CAPABILITIES]);
        // The chain is device-built, but bound the walk anyway.
        for _ in 0..48 {
            if at < CAP_START {
                return None;
            }
            if self.regs[at] == id {
                return Some(at as u16);
            }
            at = usize::from(self.regs[at + 1]);
        }
        None
    }

    /// The offset of the first extended capability with this id.
    pub fn find_extended_capability(&self, id: u16) -> Option<u16> {
        let mut at = EXT_CAP_START;
        for _ in 0..(CONFIG_SPACE_SIZE - EXT_CAP_START) / 4 {
            let header = self.get(at, 4);
            if header == 0 {
                return None;
            }
            if header & 0xffff == u32::from(id) {
                return Some(at as u16);
            }
            at = (header >> 20) as usize;
            if at < EXT_CAP_START {
                return None;
            }
        }
        None
    }
}

fn overlaps(a: std::ops::Range<usize>, b: std::ops::Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Whether an access of `len` bytes at `offset` overlaps the register `[reg, reg + reg_len)`:
/// lets a device react only to writes that reach one of its registers.
pub fn touches(offset: u16, len: usize, reg: u16, reg_len: usize) -> bool {
    let start = usize::from(offset);
    overlaps(
        start..start.saturating_add(len),
        usize::from(reg)..usize::from(reg) + reg_len,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{PciExpressPort, cap_id, ext_cap_id};

    fn ids() -> PciIds {
        PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class_code: 0x01_8000,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    fn rd(c: &ConfigSpace, off: u16, len: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b[..len]);
        le_value(&b[..len]) as u32
    }

    fn wr(c: &mut ConfigSpace, off: u16, len: usize, v: u32) -> ConfigEffects {
        c.write(off, &v.to_le_bytes()[..len])
    }

    #[test]
    fn header_bytes() {
        let c = ConfigSpace::endpoint(&ids());
        let mut b = [0u8; 0x40];
        c.read(0, &mut b);
        assert_eq!(&b[0..4], &[0xf4, 0x1a, 0x42, 0x10]);
        assert_eq!(&b[8..12], &[0x01, 0x00, 0x80, 0x01]);
        assert_eq!(b[0x0e], 0);
        assert_eq!(&b[0x2c..0x30], &[0xf4, 0x1a, 0x40, 0x00]);
        assert_eq!(b[0x34], 0);
        assert_eq!(rd(&c, 6, 2) & u32::from(reg::STATUS_CAP_LIST), 0);
        let mut tail = [0u8; 4];
        c.read(4094, &mut tail);
        assert_eq!(tail, [0, 0, 0xff, 0xff]);
    }

    #[test]
    fn read_only_registers_stay() {
        let mut c = ConfigSpace::endpoint(&ids());
        let mut before = [0u8; CONFIG_SPACE_SIZE];
        c.read(0, &mut before);
        // Ids, class, header type, capability pointer, subsystem, interrupt pin.
        for off in [0u16, 2, 8, 0x0e, 0x2c, 0x34, 0x3d] {
            let _ = wr(&mut c, off, 1, 0x5a);
        }
        let _ = wr(&mut c, 0, 4, 0xffff_ffff);
        let _ = wr(&mut c, 0x100, 4, 0xffff_ffff);
        let mut after = [0u8; CONFIG_SPACE_SIZE];
        c.read(0, &mut after);
        assert_eq!(before, after);
        // Writable ones do change.
        let _ = wr(&mut c, 0x0c, 1, 0x10);
        let _ = wr(&mut c, 0x3c, 1, 0x0b);
        assert_eq!(rd(&c, 0x0c, 1), 0x10);
        assert_eq!(rd(&c, 0x3c, 1), 0x0b);
        // Command: only the defined bits.
        let _ = wr(&mut c, 4, 2, 0xffff);
        assert_eq!(rd(&c, 4, 2), 0x0547);
        // Writes past the end are dropped, not a panic.
        let _ = c.write(4095, &[1, 2, 3, 4]);
        let _ = c.write(u16::MAX, &[1, 2, 3, 4]);
    }

    #[test]
    fn status_write_1_to_clear() {
        let mut c = ConfigSpace::endpoint(&ids());
        c.set_u16(6, 0xf910);
        // Writing zeroes clears nothing; ones clear only the W1C bits.
        let _ = wr(&mut c, 6, 2, 0);
        assert_eq!(rd(&c, 6, 2), 0xf910);
        let _ = wr(&mut c, 6, 2, 0x2000);
        assert_eq!(rd(&c, 6, 2), 0xd910);
        let _ = wr(&mut c, 4, 4, 0xffff_0000);
        assert_eq!(rd(&c, 6, 2), 0x0010);
        // A command write with zeroes in the status half leaves status alone.
        c.set_u16(6, 0x8010);
        let _ = wr(&mut c, 4, 4, 0x0000_0006);
        assert_eq!(rd(&c, 4, 4), 0x8010_0006);
    }

    #[test]
    fn bar_sizing_32_and_64() {
        let mut c = ConfigSpace::endpoint(&ids());
        c.add_bar(0, BarKind::Mem32, 0x1000, false).unwrap();
        c.add_bar(2, BarKind::Mem64, 0x2_0000_0000, true).unwrap();
        c.add_bar(4, BarKind::Io, 0x20, false).unwrap();
        assert_eq!(rd(&c, 0x10, 4), 0);
        assert_eq!(rd(&c, 0x18, 4), 0xc);
        assert_eq!(rd(&c, 0x20, 4), 1);
        for off in (0x10..0x28).step_by(4) {
            let _ = wr(&mut c, off, 4, 0xffff_ffff);
        }
        assert_eq!(rd(&c, 0x10, 4), 0xffff_f000);
        assert_eq!(rd(&c, 0x14, 4), 0); // unimplemented BAR
        assert_eq!(rd(&c, 0x18, 4), 0x0000_000c);
        assert_eq!(rd(&c, 0x1c, 4), 0xffff_fffe);
        assert_eq!(rd(&c, 0x20, 4), 0xffff_ffe1);
        assert_eq!(rd(&c, 0x24, 4), 0);
        // Byte by byte, as some firmware does.
        let _ = wr(&mut c, 0x10, 4, 0);
        for i in 0..4 {
            let _ = wr(&mut c, 0x10 + i, 1, 0xff);
        }
        assert_eq!(rd(&c, 0x10, 4), 0xffff_f000);
        assert_eq!(rd(&c, 0x11, 1), 0xf0);

        let _ = wr(&mut c, 0x18, 4, 0x1234_5678);
        let _ = wr(&mut c, 0x1c, 4, 0x9);
        assert_eq!(c.bar_address(2), Some(0x8_0000_0000));
        assert_eq!(c.bars().len(), 3);
        assert_eq!(c.bar(3), None);
    }

    #[test]
    fn bar_declarations_checked() {
        let mut c = ConfigSpace::endpoint(&ids());
        assert_eq!(
            c.add_bar(5, BarKind::Mem64, 0x1000, false),
            Err(PciError::BarIndex(5))
        );
        assert_eq!(
            c.add_bar(6, BarKind::Mem32, 0x1000, false),
            Err(PciError::BarIndex(6))
        );
        assert!(c.add_bar(0, BarKind::Mem32, 0x1800, false).is_err());
        assert!(c.add_bar(0, BarKind::Mem32, 8, false).is_err());
        assert!(c.add_bar(0, BarKind::Io, 512, false).is_err());
        c.add_bar(0, BarKind::Mem64, 0x4000, false).unwrap();
        assert_eq!(
            c.add_bar(1, BarKind::Mem32, 0x1000, false),
            Err(PciError::BarIndex(1))
        );
        let mut b = ConfigSpace::bridge(&ids());
        assert!(b.add_bar(2, BarKind::Mem32, 0x1000, false).is_err());
        b.add_bar(0, BarKind::Mem64, 0x1000, false).unwrap();
    }

    #[test]
    fn relocation_reports_changes() {
        let mut c = ConfigSpace::endpoint(&ids());
        c.add_bar(0, BarKind::Mem32, 0x1000, false).unwrap();
        c.add_bar(1, BarKind::Mem64, 0x4000, false).unwrap();
        c.add_bar(3, BarKind::Io, 0x10, false).unwrap();
        // Addresses with decoding off: nothing to map.
        assert!(wr(&mut c, 0x10, 4, 0xc000_0000).is_empty());
        assert!(wr(&mut c, 0x14, 4, 0xc001_0000).is_empty());
        assert!(wr(&mut c, 0x18, 4, 1).is_empty());
        assert!(wr(&mut c, 0x1c, 4, 0xc100).is_empty());
        // Memory decoding on: both memory BARs appear, the I/O one does not.
        let e = wr(&mut c, 4, 2, 0x2);
        assert_eq!(
            e.bar_changes,
            vec![
                BarChange {
                    bar: 0,
                    space: AddressSpace::Memory,
                    size: 0x1000,
                    old: None,
                    new: Some(0xc000_0000)
                },
                BarChange {
                    bar: 1,
                    space: AddressSpace::Memory,
                    size: 0x4000,
                    old: None,
                    new: Some(0x1_c001_0000)
                },
            ]
        );
        // Rewriting the same command changes nothing.
        assert!(wr(&mut c, 4, 2, 0x2).is_empty());
        let e = wr(&mut c, 4, 2, 0x3);
        assert_eq!(e.bar_changes.len(), 1);
        assert_eq!(e.bar_changes[0].new, Some(0xc100));
        // Moving a BAR with decoding on.
        let e = wr(&mut c, 0x10, 4, 0xd000_0000);
        assert_eq!(e.bar_changes[0].old, Some(0xc000_0000));
        assert_eq!(e.bar_changes[0].new, Some(0xd000_0000));
        // Sizing a 32-bit BAR with decoding on leaves it past 4 GiB: unmapped until restored.
        let e = wr(&mut c, 0x10, 4, 0xffff_ffff);
        assert_eq!(e.bar_changes[0].new, None);
        let e = wr(&mut c, 0x10, 4, 0xd000_0000);
        assert_eq!(e.bar_changes[0].new, Some(0xd000_0000));
        // Address 0 means unassigned.
        let e = wr(&mut c, 0x10, 4, 0);
        assert_eq!(e.bar_changes[0].new, None);
        // Decoding off: everything goes.
        let e = wr(&mut c, 4, 2, 0);
        assert_eq!(e.bar_changes.len(), 2);
        assert!(e.bar_changes.iter().all(|c| c.new.is_none()));
    }

    #[test]
    fn capability_chains() {
        let mut c = ConfigSpace::endpoint(&ids());
        let mut vendor = Capability::standard(cap_id::VENDOR, 5);
        vendor.set_u8(2, 5);
        vendor.writable(4, 1, 0x0f);
        let a = c.add_capability(&vendor).unwrap();
        let b = c
            .add_capability(&Capability::pci_express(PciExpressPort::RcEndpoint))
            .unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(rd(&c, 0x34, 1), 0x40);
        assert_eq!(rd(&c, 6, 2) & 0x10, 0x10);
        assert_eq!(rd(&c, 0x40, 4), 0x0005_4809);
        assert_eq!(rd(&c, 0x48, 2), 0x0010);
        // Header read-only, body per the capability's masks.
        let _ = wr(&mut c, 0x40, 4, 0xffff_ffff);
        assert_eq!(rd(&c, 0x40, 4), 0x0005_4809);
        let _ = wr(&mut c, 0x44, 1, 0xff);
        assert_eq!(rd(&c, 0x44, 1), 0x0f);
        assert_eq!(c.find_capability(cap_id::PCI_EXPRESS), Some(0x48));
        assert_eq!(c.find_capability(cap_id::MSIX), None);

        let e1 = c
            .add_capability(&Capability::extended(ext_cap_id::ARI, 1, 8))
            .unwrap();
        let e2 = c
            .add_capability(&Capability::extended(ext_cap_id::SRIOV, 1, 0x40))
            .unwrap();
        assert_eq!((e1, e2), (0x100, 0x108));
        assert_eq!(rd(&c, 0x100, 4), 0x1081_000e);
        assert_eq!(rd(&c, 0x108, 4), 0x0001_0010);
        assert_eq!(c.find_extended_capability(ext_cap_id::SRIOV), Some(0x108));
        assert_eq!(c.find_extended_capability(ext_cap_id::ACS), None);

        // Space runs out cleanly.
        assert_eq!(
            c.add_capability(&Capability::standard(cap_id::VENDOR, 0xb0)),
            Err(PciError::CapabilitySpace { len: 0xb0 })
        );
        assert_eq!(
            c.add_capability(&Capability::standard(cap_id::VENDOR, 1)),
            Err(PciError::CapabilityLength(1))
        );
        assert!(
            c.add_capability(&Capability::extended(1, 1, 0x1000))
                .is_err()
        );
        // The standard chain ends at the last capability that fit.
        let last = c.add_capability(&Capability::standard(0x01, 8)).unwrap();
        assert_eq!(rd(&c, 0x49, 1), u32::from(last));
        assert_eq!(rd(&c, last + 1, 1), 0);
    }

    #[test]
    fn bridge_header() {
        let mut c = ConfigSpace::bridge(&ids());
        assert_eq!(rd(&c, 0x0e, 1), 1);
        c.set_multifunction(true);
        assert_eq!(rd(&c, 0x0e, 1), 0x81);
        let _ = wr(&mut c, 0x18, 4, 0xffff_ffff);
        assert_eq!(rd(&c, 0x18, 4), 0x00ff_ffff);
        let _ = wr(&mut c, 0x1c, 2, 0xffff);
        assert_eq!(rd(&c, 0x1c, 2), 0xf0f0);
        let _ = wr(&mut c, 0x20, 4, 0xffff_ffff);
        assert_eq!(rd(&c, 0x20, 4), 0xfff0_fff0);
        let _ = wr(&mut c, 0x24, 4, 0xffff_ffff);
        assert_eq!(rd(&c, 0x24, 4), 0xfff1_fff1);
        // No subsystem registers in a type 1 header: 0x2c is the prefetchable limit upper.
        let _ = wr(&mut c, 0x2c, 4, 0x12);
        assert_eq!(rd(&c, 0x2c, 4), 0x12);
        let _ = wr(&mut c, 0x34, 1, 0x80);
        assert_eq!(rd(&c, 0x34, 1), 0);
    }

    #[test]
    fn touches_registers() {
        assert!(touches(0x40, 4, 0x42, 2));
        assert!(!touches(0x40, 2, 0x42, 2));
        assert!(touches(0x43, 1, 0x42, 2));
        assert!(!touches(u16::MAX, 4, 0x42, 2));
    }
}
