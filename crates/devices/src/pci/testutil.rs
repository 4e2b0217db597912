//! Functions the unit tests and the fuzz harnesses both put on a bus: built here once so that
//! they stay the same on both sides.

use std::sync::Arc;

use super::sriov::{SriovCap, SriovError, SriovParams};
use super::{
    BarInfo, BarKind, BarLocation, Capability, ConfigEffects, ConfigSpace, MsiInterrupts, Msix,
    PciDevice, PciError, PciExpressPort, PciIds,
};

/// Ids of a test function: class 0xff, vendor and subsystem 0x1af4.
pub(crate) fn test_ids(device_id: u16) -> PciIds {
    PciIds {
        vendor_id: 0x1af4,
        device_id,
        revision: 1,
        class_code: 0xff_0000,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 1,
    }
}

/// Ids of a test network PF (class 0x02, Ethernet), device 0x1041.
pub(crate) fn net_pf_ids() -> PciIds {
    PciIds {
        device_id: 0x1041,
        class_code: 0x02_0000,
        ..test_ids(0x1041)
    }
}

/// The config space of a test endpoint with [`test_ids`]: a 4 KiB 32-bit BAR 0, a 64-bit
/// prefetchable BAR 2 of 16 KiB holding the MSI-X table (4 vectors, at 0) and PBA (at 0x800), an
/// I/O BAR 4 of 0x20 ports, and the PCIe capability of a root-complex integrated endpoint.
pub(crate) fn msix_endpoint(
    device_id: u16,
    irq: Arc<dyn MsiInterrupts>,
) -> Result<(ConfigSpace, Msix), PciError> {
    let mut config = ConfigSpace::endpoint(&test_ids(device_id));
    config.add_bar(0, BarKind::Mem32, 0x1000, false)?;
    config.add_bar(2, BarKind::Mem64, 0x4000, true)?;
    config.add_bar(4, BarKind::Io, 0x20, false)?;
    config.add_capability(&Capability::pci_express(PciExpressPort::RcEndpoint))?;
    let msix = Msix::new(
        &mut config,
        4,
        BarLocation { bar: 2, offset: 0 },
        BarLocation {
            bar: 2,
            offset: 0x800,
        },
        irq,
    )?;
    Ok((config, msix))
}

/// An SR-IOV PF with no BARs of its own: the PCIe capability of an endpoint, ARI, then SR-IOV
/// with `params`.
pub(crate) struct SriovPf {
    pub config: ConfigSpace,
    pub sriov: SriovCap,
}

impl SriovPf {
    pub fn new(ids: &PciIds, params: SriovParams) -> Result<Self, SriovError> {
        let mut config = ConfigSpace::endpoint(ids);
        config.add_capability(&Capability::pci_express(PciExpressPort::Endpoint))?;
        // Something before SR-IOV in the extended chain, so a walk has a step to take.
        config.add_capability(&Capability::ari(0))?;
        let sriov = SriovCap::new(&mut config, params)?;
        Ok(Self { config, sriov })
    }
}

impl PciDevice for SriovPf {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigEffects {
        let mut effects = self.config.write(offset, data);
        self.sriov
            .config_written(&mut self.config, offset, data.len(), &mut effects);
        effects
    }

    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn bars(&self) -> Vec<BarInfo> {
        Vec::new()
    }
}
