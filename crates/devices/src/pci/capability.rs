//! A capability before it is placed in a config space: its register image and which bits the
//! guest may write or clear. Offsets are relative to the capability's start, as in the specs;
//! the header (id and next pointer) is filled in by [`super::ConfigSpace`] when it is linked.

/// Standard capability ids (PCI Local Bus 3.0, PCIe 6.0 7.5.3).
pub mod cap_id {
    pub const POWER_MANAGEMENT: u8 = 0x01;
    pub const MSI: u8 = 0x05;
    pub const VENDOR: u8 = 0x09;
    pub const PCI_EXPRESS: u8 = 0x10;
    pub const MSIX: u8 = 0x11;
}

/// Extended capability ids (PCIe 6.0 7.6).
pub mod ext_cap_id {
    pub const ACS: u16 = 0x000d;
    pub const ARI: u16 = 0x000e;
    pub const SRIOV: u16 = 0x0010;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CapKind {
    Standard(u8),
    Extended { id: u16, version: u8 },
}

/// A capability's registers, writable mask and write-1-to-clear mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    pub(crate) kind: CapKind,
    pub(crate) regs: Vec<u8>,
    pub(crate) wmask: Vec<u8>,
    pub(crate) w1c: Vec<u8>,
}

impl Capability {
    /// A capability in the first 256 bytes; `len` counts the 2-byte header.
    pub fn standard(id: u8, len: usize) -> Self {
        Self::with_kind(CapKind::Standard(id), len)
    }

    /// An extended capability (offset 0x100 and up); `len` counts the 4-byte header.
    pub fn extended(id: u16, version: u8, len: usize) -> Self {
        Self::with_kind(CapKind::Extended { id, version }, len)
    }

    fn with_kind(kind: CapKind, len: usize) -> Self {
        Self {
            kind,
            regs: vec![0; len],
            wmask: vec![0; len],
            w1c: vec![0; len],
        }
    }

    pub fn len(&self) -> usize {
        self.regs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regs.is_empty()
    }

    pub(crate) fn header_len(&self) -> usize {
        match self.kind {
            CapKind::Standard(_) => 2,
            CapKind::Extended { .. } => 4,
        }
    }

    /// Store `width` little-endian bytes of `value` at `off` in `which`. Offsets come from the
    /// device's own constants, never from the guest; one out of range is a bug, caught in
    /// debug builds and ignored otherwise.
    fn put(which: &mut [u8], off: usize, width: usize, value: u32) {
        let slot = off
            .checked_add(width)
            .and_then(|end| which.get_mut(off..end));
        debug_assert!(
            slot.is_some(),
            "capability field {off:#x}+{width} out of range"
        );
        if let Some(slot) = slot {
            super::put_le(slot, u64::from(value));
        }
    }

    pub fn set_u8(&mut self, off: usize, value: u8) {
        Self::put(&mut self.regs, off, 1, value.into());
    }

    pub fn set_u16(&mut self, off: usize, value: u16) {
        Self::put(&mut self.regs, off, 2, value.into());
    }

    pub fn set_u32(&mut self, off: usize, value: u32) {
        Self::put(&mut self.regs, off, 4, value);
    }

    /// Bits of the `width`-byte register at `off` that the guest may write.
    pub fn writable(&mut self, off: usize, width: usize, mask: u32) {
        Self::put(&mut self.wmask, off, width, mask);
    }

    /// Bits of the `width`-byte register at `off` that a guest write of 1 clears.
    pub fn write_1_to_clear(&mut self, off: usize, width: usize, mask: u32) {
        Self::put(&mut self.w1c, off, width, mask);
    }

    /// The PCI Express capability (version 2, 0x3C bytes) for a function of kind `port`: a
    /// 2.5 GT/s x1 link, 128-byte payloads, no hot-plug, no power management beyond D0. Fields
    /// a guest may program (error reporting enables, payload and read request sizes, ASPM,
    /// ARI forwarding on root ports) are writable; status bits are write-1-to-clear.
    pub fn pci_express(port: PciExpressPort) -> Self {
        use pcie::*;
        let mut c = Self::standard(super::cap_id::PCI_EXPRESS, CAP_LEN);
        let (port_type, slot_implemented) = match port {
            PciExpressPort::Endpoint => (TYPE_ENDPOINT, false),
            PciExpressPort::RcEndpoint => (TYPE_RC_ENDPOINT, false),
            PciExpressPort::RootPort { slot, .. } => (TYPE_ROOT_PORT, slot.is_some()),
        };
        c.set_u16(
            CAPS,
            2 | (port_type << 4) | if slot_implemented { 1 << 8 } else { 0 },
        );
        // Role-based error reporting is required of every PCIe 1.1+ function.
        c.set_u32(DEVCAP, DEVCAP_RBER);
        c.set_u16(DEVCTL, DEVCTL_READRQ_512);
        c.writable(DEVCTL, 2, DEVCTL_WRITABLE);
        c.write_1_to_clear(DEVSTA, 2, DEVSTA_ERRORS);

        if let PciExpressPort::Endpoint | PciExpressPort::RootPort { .. } = port {
            // Root complex integrated endpoints have no link of their own.
            let port_number = match port {
                PciExpressPort::RootPort { port_number, .. } => port_number,
                _ => 0,
            };
            let mut lnkcap = LINK_SPEED_2_5 | LINK_WIDTH_X1;
            if let PciExpressPort::RootPort { .. } = port {
                // Lets the guest see that the link to the slot's device is up.
                lnkcap |= LNKCAP_DLLLARC;
            }
            c.set_u32(LNKCAP, lnkcap | (u32::from(port_number) << 24));
            c.writable(LNKCTL, 2, LNKCTL_WRITABLE);
            let mut lnksta = (LINK_SPEED_2_5 | LINK_WIDTH_X1) as u16;
            if let PciExpressPort::RootPort { .. } = port {
                lnksta |= LNKSTA_DLLLA;
            }
            c.set_u16(LNKSTA, lnksta);
            c.set_u32(LNKCAP2, LNKCAP2_SPEED_2_5);
            c.set_u16(LNKCTL2, LINK_SPEED_2_5 as u16);
            c.writable(LNKCTL2, 2, 0xf);
        }
        if let PciExpressPort::RootPort { slot, .. } = port {
            if let Some(slot) = slot {
                c.set_u32(SLTCAP, u32::from(slot) << 19);
                c.set_u16(SLTSTA, SLTSTA_PRESENCE);
            }
            c.writable(RTCTL, 2, RTCTL_WRITABLE);
            c.write_1_to_clear(RTSTA, 4, RTSTA_PME);
            c.set_u32(DEVCAP2, DEVCAP2_ARI_FORWARDING);
            c.writable(DEVCTL2, 2, DEVCTL2_WRITABLE | DEVCTL2_ARI_FORWARDING);
        } else {
            c.writable(DEVCTL2, 2, DEVCTL2_WRITABLE);
        }
        c
    }
}

impl Capability {
    /// The ARI extended capability (PCIe 6.0 7.8.7, 8 bytes): the function's number is 8 bits
    /// (device number 0 implied), so up to 256 functions fit behind a port with ARI
    /// Forwarding. `next_function` links the PFs of the device (0 ends the list; VFs are not
    /// in it). No MFVC or ACS function groups: the capability and control registers are
    /// read-only.
    pub fn ari(next_function: u8) -> Self {
        let mut c = Self::extended(super::ext_cap_id::ARI, 1, 8);
        c.set_u16(4, u16::from(next_function) << 8);
        c
    }
}

/// What kind of PCI Express function a [`Capability::pci_express`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciExpressPort {
    /// An endpoint below a root port.
    Endpoint,
    /// An endpoint integrated in the root complex (directly on bus 0, as QEMU's q35 makes
    /// devices on its root bus).
    RcEndpoint,
    /// A root port: a PCI-to-PCI bridge (header type 1) leading to one slot.
    RootPort {
        port_number: u8,
        /// The physical slot number, if the port has a slot.
        slot: Option<u16>,
    },
}

/// Register offsets and bits of the PCI Express capability (PCIe 6.0 7.5.3).
pub(crate) mod pcie {
    pub const CAP_LEN: usize = 0x3c;
    pub const CAPS: usize = 0x02;
    pub const DEVCAP: usize = 0x04;
    pub const DEVCTL: usize = 0x08;
    pub const DEVSTA: usize = 0x0a;
    pub const LNKCAP: usize = 0x0c;
    pub const LNKCTL: usize = 0x10;
    pub const LNKSTA: usize = 0x12;
    pub const SLTCAP: usize = 0x14;
    pub const SLTSTA: usize = 0x1a;
    pub const RTCTL: usize = 0x1c;
    pub const RTSTA: usize = 0x20;
    pub const DEVCAP2: usize = 0x24;
    pub const DEVCTL2: usize = 0x28;
    pub const LNKCAP2: usize = 0x2c;
    pub const LNKCTL2: usize = 0x30;

    pub const TYPE_ENDPOINT: u16 = 0x0;
    pub const TYPE_ROOT_PORT: u16 = 0x4;
    pub const TYPE_RC_ENDPOINT: u16 = 0x9;

    pub const DEVCAP_RBER: u32 = 1 << 15;
    /// Correctable/non-fatal/fatal/unsupported-request reporting, relaxed ordering, max
    /// payload, extended tags, no snoop, max read request.
    pub const DEVCTL_WRITABLE: u32 = 0x000f | 0x0010 | 0x00e0 | 0x0100 | 0x0800 | 0x7000;
    pub const DEVCTL_READRQ_512: u16 = 2 << 12;
    pub const DEVSTA_ERRORS: u32 = 0xf;
    pub const LINK_SPEED_2_5: u32 = 1;
    pub const LINK_WIDTH_X1: u32 = 1 << 4;
    pub const LNKCAP_DLLLARC: u32 = 1 << 20;
    /// ASPM control, common clock, extended synch.
    pub const LNKCTL_WRITABLE: u32 = 0x3 | 0x40 | 0x80;
    pub const LNKSTA_DLLLA: u16 = 1 << 13;
    pub const SLTSTA_PRESENCE: u16 = 1 << 6;
    pub const RTCTL_WRITABLE: u32 = 0x1f;
    pub const RTSTA_PME: u32 = 1 << 16;
    pub const DEVCAP2_ARI_FORWARDING: u32 = 1 << 5;
    /// Completion timeout value and disable.
    pub const DEVCTL2_WRITABLE: u32 = 0x1f;
    pub const DEVCTL2_ARI_FORWARDING: u32 = 1 << 5;
    pub const LNKCAP2_SPEED_2_5: u32 = 1 << 1;
}

#[cfg(test)]
mod tests {
    use super::pcie::*;
    use super::*;

    fn u16_at(c: &Capability, off: usize) -> u16 {
        u16::from_le_bytes([c.regs[off], c.regs[off + 1]])
    }

    fn u32_at(v: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([v[off], v[off + 1], v[off + 2], v[off + 3]])
    }

    #[test]
    fn fields_and_masks() {
        let mut c = Capability::standard(cap_id::VENDOR, 8);
        c.set_u8(2, 8);
        c.set_u16(4, 0xbeef);
        c.writable(4, 2, 0x00ff);
        c.write_1_to_clear(6, 1, 0x80);
        assert_eq!(c.regs, [0, 0, 8, 0, 0xef, 0xbe, 0, 0]);
        assert_eq!(c.wmask, [0, 0, 0, 0, 0xff, 0, 0, 0]);
        assert_eq!(c.w1c, [0, 0, 0, 0, 0, 0, 0x80, 0]);
        assert_eq!(c.len(), 8);
        assert_eq!(c.header_len(), 2);
        assert_eq!(Capability::extended(0x10, 1, 0x40).header_len(), 4);
    }

    #[test]
    fn pcie_endpoint_and_root_port() {
        let ep = Capability::pci_express(PciExpressPort::Endpoint);
        assert_eq!(ep.len(), CAP_LEN);
        assert_eq!(u16_at(&ep, CAPS), 0x0002);
        assert_eq!(u16_at(&ep, LNKSTA), 0x0011);
        assert_eq!(u32_at(&ep.wmask, DEVCTL2) & (1 << 5), 0);

        let rc = Capability::pci_express(PciExpressPort::RcEndpoint);
        assert_eq!(u16_at(&rc, CAPS), 0x0092);
        assert_eq!(u32_at(&rc.regs, LNKCAP), 0);

        let rp = Capability::pci_express(PciExpressPort::RootPort {
            port_number: 3,
            slot: Some(5),
        });
        assert_eq!(u16_at(&rp, CAPS), 0x0142);
        assert_eq!(u32_at(&rp.regs, LNKCAP) >> 24, 3);
        assert_eq!(u32_at(&rp.regs, SLTCAP) >> 19, 5);
        assert_eq!(u16_at(&rp, LNKSTA) & LNKSTA_DLLLA, LNKSTA_DLLLA);
        assert_eq!(u32_at(&rp.w1c, RTSTA), RTSTA_PME);
        assert_ne!(u32_at(&rp.wmask, DEVCTL2) & (1 << 5), 0);
    }
}
