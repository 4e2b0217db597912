//! PCI Express: configuration space with capability chains, BARs, MSI-X, and the root complex
//! (host bridge, ECAM and the 0xCF8 ports).
//!
//! The pieces, bottom up:
//! - [`ConfigSpace`]: 4 KiB of registers with per-byte writable and write-1-to-clear masks, BARs
//!   and capability chains. A guest write returns [`ConfigEffects`] (BARs that moved) instead of
//!   acting on anything itself.
//! - [`PciDevice`]: what a function implements (config access, BAR access, its BARs).
//! - [`Msix`]: the MSI-X capability, table and PBA, delivering through [`MsiInterrupts`].
//! - [`PciRoot`]: bus 0 with the host bridge and root ports ([`RootPort`]) leading to further
//!   buses; the one place where BAR changes are applied to the MMIO and PIO buses, and where
//!   SR-IOV VF changes are handed to their [`SriovHandler`]. [`PciConfigIo`] and [`PciEcam`] are its two front doors.

mod capability;
mod config;
mod device;
pub mod msix;
mod port;
mod root;
pub mod sriov;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod testutil;

pub use capability::{Capability, PciExpressPort, cap_id, ext_cap_id};
pub use config::{CONFIG_SPACE_SIZE, ConfigSpace, HeaderType, PciIds, touches};
pub use device::{Datamatch, IoEvent, IoEventRegistry, PciDevice, PciDeviceExt, RecordingIoEvents};
pub use msix::{BarLocation, MsiInterrupts, MsiMessage, Msix, MsixHandle};
pub use port::{PortRoute, RootPort};
pub use root::{HostBridge, PciConfigIo, PciEcam, PciRoot, SriovHandler};
pub use sriov::{SriovCap, SriovError, SriovParams, VfBar, VfBarChange, VfEnableChange};

/// A function's address: bus, device (0..32), function (0..8).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bdf(u16);

impl Bdf {
    /// `device` and `function` are truncated to 5 and 3 bits, as in the hardware encoding.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self(((bus as u16) << 8) | (((device & 0x1f) as u16) << 3) | ((function & 7) as u16))
    }

    /// From the 16-bit encoding `bus << 8 | device << 3 | function`.
    pub const fn from_raw(raw: u16) -> Self {
        Self(raw)
    }

    pub const fn raw(self) -> u16 {
        self.0
    }

    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }

    pub const fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }

    pub const fn function(self) -> u8 {
        (self.0 & 7) as u8
    }
}

impl std::fmt::Display for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

impl std::fmt::Debug for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Which bus a BAR decodes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressSpace {
    /// Port I/O.
    Io,
    /// Memory (MMIO).
    Memory,
}

/// The kind of a base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space, 4..=256 bytes.
    Io,
    /// 32-bit memory: decodes below 4 GiB.
    Mem32,
    /// 64-bit memory: takes this BAR register and the next.
    Mem64,
}

/// A BAR as the device declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    pub index: u8,
    pub kind: BarKind,
    /// A power of two.
    pub size: u64,
    /// Memory BARs only: reads have no side effects (a hint to the guest for its windows).
    pub prefetchable: bool,
}

impl BarInfo {
    pub fn space(&self) -> AddressSpace {
        match self.kind {
            BarKind::Io => AddressSpace::Io,
            BarKind::Mem32 | BarKind::Mem64 => AddressSpace::Memory,
        }
    }
}

/// Where a BAR decodes changed: the guest moved it, or turned decoding on or off. `None` means
/// "not decoded". The root applies it to the bus; a device only reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarChange {
    pub bar: u8,
    pub space: AddressSpace,
    pub size: u64,
    pub old: Option<u64>,
    pub new: Option<u64>,
}

/// What a config write asks of whoever owns the buses. A struct rather than a list so that later
/// kinds (SR-IOV VF enable, VF BARs) become new fields without touching every device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use = "BAR changes must reach the bus"]
pub struct ConfigEffects {
    pub bar_changes: Vec<BarChange>,
    /// SR-IOV VF Enable flipped: create or remove the PF's VFs.
    pub vf_enable: Option<VfEnableChange>,
    /// SR-IOV VF BAR apertures whose decoding changed (VF MSE, VF Enable or a VF BAR moved).
    pub vf_bar_changes: Vec<VfBarChange>,
}

impl ConfigEffects {
    pub fn is_empty(&self) -> bool {
        self.bar_changes.is_empty() && self.vf_enable.is_none() && self.vf_bar_changes.is_empty()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("BAR {0} does not exist or is taken")]
    BarIndex(u8),
    #[error("BAR {index} cannot be {size:#x} bytes")]
    BarSize { index: u8, size: u64 },
    #[error("No room for a {len}-byte capability")]
    CapabilitySpace { len: usize },
    #[error("A capability cannot be {0} bytes")]
    CapabilityLength(usize),
    #[error("{0} is taken")]
    SlotTaken(Bdf),
    #[error("MSI-X cannot have {0} vectors")]
    MsixVectors(u16),
    #[error("MSI-X {what} at BAR {bar} offset {offset:#x} does not fit")]
    MsixPlacement {
        what: &'static str,
        bar: u8,
        offset: u32,
    },
}

/// Little-endian value of up to 8 bytes.
pub(crate) fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .rev()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// Fill `data` with the little-endian bytes of `value`.
pub(crate) fn put_le(data: &mut [u8], value: u64) {
    for (i, b) in data.iter_mut().enumerate().take(8) {
        *b = (value >> (8 * i)) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_encoding() {
        let b = Bdf::new(3, 0x1f, 7);
        assert_eq!(b.raw(), 0x03ff);
        assert_eq!((b.bus(), b.device(), b.function()), (3, 0x1f, 7));
        assert_eq!(b.to_string(), "03:1f.7");
        assert_eq!(Bdf::new(0, 0x20, 8), Bdf::new(0, 0, 0));
    }

    #[test]
    fn le_helpers() {
        assert_eq!(le_value(&[0x78, 0x56, 0x34, 0x12]), 0x1234_5678);
        let mut b = [0u8; 3];
        put_le(&mut b, 0xaabb_ccdd);
        assert_eq!(b, [0xdd, 0xcc, 0xbb]);
        assert_eq!(le_value(&[]), 0);
    }
}
