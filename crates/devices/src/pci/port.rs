//! A PCI Express root port: a PCI-to-PCI bridge function (type 1 header) on bus 0 with the PCIe
//! capability of a root port, leading to one secondary bus. With ARI Forwarding Enable set in
//! its Device Control 2 register, an access to the secondary bus reaches functions 0..=255 of
//! device 0 (an ARI device's 8-bit function number); without it, only device 0's functions
//! 0..=7 (a PCIe link has one device).
//!
//! The port only holds registers: the guest's bus numbers and windows. [`super::PciRoot`] reads
//! them after every config write to the port ([`RootPort::route`]) and routes type 1 accesses
//! to the functions behind it.

use super::capability::pcie;
use super::{
    BarInfo, Capability, ConfigEffects, ConfigSpace, PciDevice, PciError, PciExpressPort, PciIds,
};

/// Red Hat's PCIe root port ids, as QEMU's `pcie-root-port`: Linux binds its port driver by
/// class, so any id would do; these are ones it has seen.
pub const ROOT_PORT_VENDOR: u16 = 0x1b36;
pub const ROOT_PORT_DEVICE: u16 = 0x000c;
/// Bridge, PCI-to-PCI.
const CLASS_PCI_BRIDGE: u32 = 0x06_0400;

/// Type 1 header registers the routing reads.
const PRIMARY_BUS: u16 = 0x18;
const SECONDARY_BUS: u16 = 0x19;
const SUBORDINATE_BUS: u16 = 0x1a;
const MEMORY_BASE: u16 = 0x20;
const PREF_MEMORY_BASE: u16 = 0x24;
const PREF_BASE_UPPER: u16 = 0x28;
const PREF_LIMIT_UPPER: u16 = 0x2c;

/// Where the port sends type 1 accesses, as the guest last programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRoute {
    pub secondary: u8,
    pub subordinate: u8,
    /// ARI Forwarding Enable: function numbers 8..=255 on the secondary bus are reachable.
    pub ari_forwarding: bool,
}

/// A root port (see the module documentation).
#[derive(Debug)]
pub struct RootPort {
    config: ConfigSpace,
    pcie: u16,
}

impl RootPort {
    /// Port `port_number` (its PCIe Link Capabilities' port number), without a hot-plug slot.
    pub fn new(port_number: u8) -> Result<Self, PciError> {
        let mut config = ConfigSpace::bridge(&PciIds {
            vendor_id: ROOT_PORT_VENDOR,
            device_id: ROOT_PORT_DEVICE,
            class_code: CLASS_PCI_BRIDGE,
            ..Default::default()
        });
        let pcie = config.add_capability(&Capability::pci_express(PciExpressPort::RootPort {
            port_number,
            slot: None,
        }))?;
        Ok(Self { config, pcie })
    }

    /// The routing the registers say now.
    pub fn route(&self) -> PortRoute {
        let devctl2 = self.config.read_u16(self.pcie + pcie::DEVCTL2 as u16);
        PortRoute {
            secondary: self.config.read_u8(SECONDARY_BUS),
            subordinate: self.config.read_u8(SUBORDINATE_BUS),
            ari_forwarding: u32::from(devctl2) & pcie::DEVCTL2_ARI_FORWARDING != 0,
        }
    }

    /// What firmware would leave: primary bus 0, secondary and subordinate `bus`, the memory
    /// window `[base, base + len)` (1 MiB granular) and the prefetchable window closed.
    pub fn preset(&mut self, bus: u8, window: Option<(u64, u64)>) {
        self.config.set_u8(PRIMARY_BUS, 0);
        self.config.set_u8(SECONDARY_BUS, bus);
        self.config.set_u8(SUBORDINATE_BUS, bus);
        match window {
            Some((base, len)) if len > 0 => {
                let last = base + len - 1;
                let reg = ((base >> 16) as u32 & 0xfff0) | ((last & 0xfff0_0000) as u32);
                self.config.set_u32(MEMORY_BASE, reg);
            }
            // Base above limit: closed.
            _ => self.config.set_u32(MEMORY_BASE, 0x0000_fff0),
        }
        self.config.set_u32(PREF_MEMORY_BASE, 0x0001_fff1);
        self.config.set_u32(PREF_BASE_UPPER, 0);
        self.config.set_u32(PREF_LIMIT_UPPER, 0);
    }

    /// The offset of the PCI Express capability.
    pub fn pcie_offset(&self) -> u16 {
        self.pcie
    }
}

impl PciDevice for RootPort {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigEffects {
        // A bridge header has no BARs here: nothing to report.
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::pci::{PciDeviceExt, cap_id};

    #[test]
    fn registers_and_route() {
        let mut p = RootPort::new(1).unwrap();
        assert_eq!(p.config_read_u32(0), 0x000c_1b36);
        assert_eq!(p.config_read_u32(0x08) >> 8, CLASS_PCI_BRIDGE);
        assert_eq!(p.config_read_u8(0x0e) & 0x7f, 1, "type 1 header");
        let cap = p.pcie_offset();
        assert_eq!(p.config_read_u8(cap), cap_id::PCI_EXPRESS);
        // Root port, ARI Forwarding Supported.
        assert_eq!((p.config_read_u16(cap + 2) >> 4) & 0xf, 4);
        assert_ne!(p.config_read_u32(cap + 0x24) & (1 << 5), 0);
        assert_eq!(p.route(), PortRoute::default());

        p.preset(3, Some((0xc000_0000, 0x20_0000)));
        assert_eq!(p.config_read_u32(0x18) & 0xff_ffff, 0x03_0300);
        assert_eq!(p.config_read_u32(0x20), 0xc010_c000);
        assert_eq!(
            p.route(),
            PortRoute {
                secondary: 3,
                subordinate: 3,
                ari_forwarding: false
            }
        );
        // The guest renumbers and turns on ARI forwarding.
        let _ = p.config_write_u32(0x18, 0x00_0705);
        let _ = p.config_write_u16(cap + 0x28, 1 << 5);
        assert_eq!(
            p.route(),
            PortRoute {
                secondary: 7,
                subordinate: 0,
                ari_forwarding: true
            }
        );
        assert_eq!(p.config_read_u8(0x18), 5);
    }
}
