//! The virtio-pci transport, modern only (virtio 1.2, 4.1): a PCI function whose BAR 0 holds
//! the common configuration, ISR status, device configuration, notification registers and the
//! MSI-X table and PBA, each found by the driver through a vendor-specific capability.
//!
//! The transport owns everything the driver programs before DRIVER_OK (features, queue
//! registers, vectors, status) and hands the device its queues, an interrupt handle and its
//! [`DmaSpace`] at DRIVER_OK. The device sits behind its own lock, shared with the VMM's event
//! loop: a queue notification caught by an ioeventfd is served there without touching the
//! transport (see [`VirtioPciDevice::device`] and [`VirtioPciDevice::notify_events`]). Lock
//! order: transport, then device; the device's interrupt handle takes neither (it reads the
//! vector map from atomics), so the event loop never waits for a vCPU.

mod common;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids;
use vmm_sys_util::eventfd::EventFd;

use super::{DmaSpace, VirtioDevice, VirtioInterrupt};
use crate::bus::lock;
use crate::pci::{
    BarInfo, BarKind, BarLocation, Capability, ConfigEffects, ConfigSpace, Datamatch, IoEvent,
    MsiInterrupts, Msix, MsixHandle, PciDevice, PciError, PciExpressPort, PciIds, SriovCap,
    SriovError, SriovParams, VfBar, cap_id,
};

pub use common::COMMON_CFG_LEN;

/// Red Hat, Inc.: the vendor of every virtio PCI function.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem id of a modern device (the spec asks for 0x40 or more).
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;
/// "No vector" in `msix_config` and `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// `cfg_type` of the vendor capabilities (virtio 1.2, 4.1.4).
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
}

/// BAR 0 layout: one 4 KiB page per structure, as QEMU lays it out, so that a guest can map
/// each with its own attributes.
pub const BAR_INDEX: u8 = 0;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_OFFSET: u64 = 0x2000;
pub const DEVICE_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_LEN: u64 = 0x1000;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
pub const BAR_SIZE: u64 = 0x8000;
/// Queue `q`'s notification register is at `NOTIFY_OFFSET + q * NOTIFY_OFF_MULTIPLIER`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Queues the notify page can address at that spacing.
const MAX_QUEUES: usize = (NOTIFY_LEN / NOTIFY_OFF_MULTIPLIER as u64) as usize;
/// Vectors the MSI-X page can hold (16 bytes each).
const MAX_VECTORS: usize = 0x1000 / 16;

/// virtio_pci_cap: vndr, next, len, cfg_type, bar, id, padding[2], offset, length.
const VIRTIO_CAP_LEN: usize = 16;
/// virtio_pci_notify_cap: virtio_pci_cap plus notify_off_multiplier.
const NOTIFY_CAP_LEN: usize = 20;
/// virtio_pci_cfg_cap: virtio_pci_cap plus the 4-byte data window.
const PCI_CFG_CAP_LEN: usize = 20;
const CAP_BAR: usize = 4;
const CAP_OFFSET: usize = 8;
const CAP_LENGTH: usize = 12;
const CFG_CAP_DATA: u16 = 16;

/// ISR status bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("A device with {0} queues does not fit the transport")]
    TooManyQueues(usize),
    #[error("Cannot create a queue notification eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("Cannot build the PCI function")]
    Pci(#[from] PciError),
    #[error("Cannot build the SR-IOV capability")]
    Sriov(#[from] SriovError),
}

/// The number of MSI-X vectors a transport has for a device with `queues` queues: one per
/// queue and one for configuration changes. The VMM makes that many irqfds before building it.
pub fn msix_vector_count(queues: usize) -> u16 {
    u16::try_from(queues.saturating_add(1).min(MAX_VECTORS)).unwrap_or(u16::MAX)
}

/// PCI class code for a virtio device type.
fn class_code(device_type: u32) -> u32 {
    match device_type {
        virtio_ids::VIRTIO_ID_NET => 0x02_0000,   // network, Ethernet
        virtio_ids::VIRTIO_ID_BLOCK => 0x01_8000, // mass storage, other
        virtio_ids::VIRTIO_ID_CONSOLE => 0x07_8000, // communication, other
        virtio_ids::VIRTIO_ID_RNG => 0x10_8000,   // encryption/decryption, other
        virtio_ids::VIRTIO_ID_IOMMU => 0x08_0600, // system peripheral, IOMMU
        virtio_ids::VIRTIO_ID_VSOCK => 0x02_8000, // network, other
        _ => 0xff_0000,
    }
}

/// What the transport and the device's interrupt handle share: the vector map, ISR status and
/// the device's request for a reset. Atomics, so that the handle takes no lock of the
/// transport's (the event loop holds the device lock when it signals).
#[derive(Debug)]
struct Shared {
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    isr: AtomicU8,
    needs_reset: AtomicBool,
    config_generation: AtomicU8,
}

impl Shared {
    fn new(queues: usize) -> Self {
        Self {
            queue_vectors: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU8::new(0),
        }
    }
}

/// The device's [`VirtioInterrupt`]: queues and configuration changes to MSI-X vectors.
struct PciInterrupt {
    shared: Arc<Shared>,
    msix: MsixHandle,
}

impl PciInterrupt {
    fn raise(&self, vector: u16) {
        if vector == VIRTIO_MSI_NO_VECTOR {
            return;
        }
        if let Err(e) = self.msix.trigger(vector) {
            tracing::warn!(vector, "virtio-pci: MSI-X delivery failed: {e}");
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: u16) {
        // For a driver without MSI-X (which would use INTx; ours has none) the ISR says why.
        self.shared.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        let vector = self
            .shared
            .queue_vectors
            .get(usize::from(queue))
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::SeqCst));
        self.raise(vector);
    }

    fn signal_config(&self) {
        // The device changed its configuration: a driver reading it sees a new generation.
        self.shared.config_generation.fetch_add(1, Ordering::SeqCst);
        self.shared.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        self.raise(self.shared.config_vector.load(Ordering::SeqCst));
    }

    fn set_needs_reset(&self) {
        self.shared.needs_reset.store(true, Ordering::SeqCst);
        self.shared.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        self.raise(self.shared.config_vector.load(Ordering::SeqCst));
    }
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    config: ConfigSpace,
    msix: Msix,
    device: Arc<Mutex<dyn VirtioDevice>>,
    dma: DmaSpace,
    shared: Arc<Shared>,
    common: common::CommonConfig,
    /// One per queue, signalled by KVM when the guest writes the queue's notify register.
    notify: Vec<Arc<EventFd>>,
    /// Offset of the PCI_CFG capability (the window into BAR 0 through config space).
    pci_cfg_cap: u16,
    /// An SR-IOV PF's capability ([`Self::make_pf`]).
    sriov: Option<SriovCap>,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("config", &self.config)
            .field("common", &self.common)
            .finish_non_exhaustive()
    }
}

impl VirtioPciDevice {
    /// Put `device` on PCI. `msi` delivers its MSI-X vectors (there are
    /// [`msix_vector_count`]`(queues)` of them); `dma` is the address space its queues and
    /// buffers are taken in.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        dma: DmaSpace,
        msi: Arc<dyn MsiInterrupts>,
    ) -> Result<Self, VirtioPciError> {
        let (device_type, max_sizes) = {
            let d = lock(&device);
            (d.device_type(), d.queue_max_sizes().to_vec())
        };
        if max_sizes.len() > MAX_QUEUES || max_sizes.len() >= MAX_VECTORS {
            return Err(VirtioPciError::TooManyQueues(max_sizes.len()));
        }
        let ids = PciIds {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
            revision: 1,
            class_code: class_code(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        };
        let mut config = ConfigSpace::endpoint(&ids);
        // 64-bit so that it can go above 4 GiB; not prefetchable: it holds the MSI-X table and
        // registers with side effects.
        config.add_bar(BAR_INDEX, BarKind::Mem64, BAR_SIZE, false)?;

        let region_cap = |t: u8, offset: u64, len: u64, cap_len: usize| {
            let mut c = Capability::standard(cap_id::VENDOR, cap_len);
            c.set_u8(2, cap_len as u8);
            c.set_u8(3, t);
            c.set_u8(CAP_BAR, BAR_INDEX);
            c.set_u32(CAP_OFFSET, offset as u32);
            c.set_u32(CAP_LENGTH, len as u32);
            c
        };
        let region = |t, offset, len| region_cap(t, offset, len, VIRTIO_CAP_LEN);
        let queues = max_sizes.len();
        config.add_capability(&region(cfg_type::COMMON, COMMON_OFFSET, COMMON_CFG_LEN))?;
        config.add_capability(&region(cfg_type::ISR, ISR_OFFSET, 1))?;
        config.add_capability(&region(cfg_type::DEVICE, DEVICE_OFFSET, DEVICE_LEN))?;
        let mut notify = region_cap(
            cfg_type::NOTIFY,
            NOTIFY_OFFSET,
            (queues as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)).max(4),
            NOTIFY_CAP_LEN,
        );
        notify.set_u32(VIRTIO_CAP_LEN, NOTIFY_OFF_MULTIPLIER);
        config.add_capability(&notify)?;
        // The PCI_CFG window: the driver picks bar, offset and length, then accesses the data.
        let mut cfg = Capability::standard(cap_id::VENDOR, PCI_CFG_CAP_LEN);
        cfg.set_u8(2, PCI_CFG_CAP_LEN as u8);
        cfg.set_u8(3, cfg_type::PCI_CFG);
        cfg.writable(CAP_BAR, 1, 0xff);
        cfg.writable(CAP_OFFSET, 4, u32::MAX);
        cfg.writable(CAP_LENGTH, 4, u32::MAX);
        cfg.writable(usize::from(CFG_CAP_DATA), 4, u32::MAX);
        let pci_cfg_cap = config.add_capability(&cfg)?;

        let msix = Msix::new(
            &mut config,
            msix_vector_count(queues),
            BarLocation {
                bar: BAR_INDEX,
                offset: MSIX_TABLE_OFFSET as u32,
            },
            BarLocation {
                bar: BAR_INDEX,
                offset: MSIX_PBA_OFFSET as u32,
            },
            msi,
        )?;
        let notify = (0..queues)
            .map(|_| {
                EventFd::new(libc::EFD_NONBLOCK)
                    .map(Arc::new)
                    .map_err(VirtioPciError::EventFd)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            msix,
            device,
            dma,
            shared: Arc::new(Shared::new(queues)),
            common: common::CommonConfig::new(&max_sizes),
            notify,
            pci_cfg_cap,
            sriov: None,
        })
    }

    /// Make this function an SR-IOV physical function with up to `total_vfs` VFs of the same
    /// kind: the PCI Express capability (an endpoint below a root port), ARI (so that VFs past
    /// function 7 are reachable) and SR-IOV with VF 0 at routing id + 1, stride 1, VF Device ID
    /// this function's, 4 KiB pages and one VF BAR 0 laid out like this function's BAR 0.
    /// The owner offers VIRTIO_F_SR_IOV on the device and carries out the VF changes config
    /// writes report.
    pub fn make_pf(&mut self, total_vfs: u16) -> Result<(), VirtioPciError> {
        self.config
            .add_capability(&Capability::pci_express(PciExpressPort::Endpoint))?;
        self.config.add_capability(&Capability::ari(0))?;
        let params = SriovParams {
            initial_vfs: total_vfs,
            total_vfs,
            first_vf_offset: 1,
            vf_stride: 1,
            vf_device_id: self.config.read_u16(2),
            supported_page_sizes: crate::pci::sriov::reg::PAGE_4K,
            vf_bars: vec![VfBar {
                index: BAR_INDEX,
                kind: BarKind::Mem64,
                size: BAR_SIZE,
                prefetchable: false,
            }],
        };
        self.sriov = Some(SriovCap::new(&mut self.config, params)?);
        Ok(())
    }

    /// Make this function an SR-IOV virtual function: PCI Express and ARI capabilities as its
    /// PF's, ids reading 0xFFFF, BARs and memory decoding left to the PF's VF BARs (the owner
    /// maps BAR 0 with [`crate::pci::PciRoot::map_bar`]).
    pub fn make_vf(&mut self) -> Result<(), VirtioPciError> {
        self.config
            .add_capability(&Capability::pci_express(PciExpressPort::Endpoint))?;
        self.config.add_capability(&Capability::ari(0))?;
        self.config.make_virtual_function();
        Ok(())
    }

    /// The PF's SR-IOV capability and the config space it lives in.
    pub fn sriov(&self) -> Option<(&SriovCap, &ConfigSpace)> {
        self.sriov.as_ref().map(|s| (s, &self.config))
    }

    /// The device, shared with whoever serves its queue notifications.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// The device is behind an IOMMU: a driver must accept ACCESS_PLATFORM (which every device
    /// offers) for FEATURES_OK to hold.
    pub fn require_access_platform(&mut self) {
        self.common.require_access_platform = true;
    }

    /// Queue index and eventfd of every queue's notification register: the VMM watches each
    /// and calls [`VirtioDevice::process_queue`] when it fires. The PCI root registers them
    /// with KVM wherever BAR 0 is mapped ([`PciDevice::ioevents`]).
    pub fn notify_events(&self) -> Vec<(u16, Arc<EventFd>)> {
        self.notify
            .iter()
            .enumerate()
            .map(|(q, fd)| (u16::try_from(q).unwrap_or(u16::MAX), fd.clone()))
            .collect()
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u8 {
        self.common.status(&self.shared)
    }

    /// The PCI_CFG window: an access to its data field reaches BAR 0 at the offset and with the
    /// length the driver wrote into the capability. Returns `None` when the access is not to
    /// the window or the window is not set up sensibly.
    fn pci_cfg_target(&self, offset: u16, len: usize) -> Option<(u64, usize)> {
        let data = self.pci_cfg_cap + CFG_CAP_DATA;
        if !crate::pci::touches(offset, len, data, 4) {
            return None;
        }
        let cap = self.pci_cfg_cap;
        let bar = self.config.read_u8(cap + CAP_BAR as u16);
        let bar_offset = u64::from(self.config.read_u32(cap + CAP_OFFSET as u16));
        let length = self.config.read_u32(cap + CAP_LENGTH as u16) as usize;
        let ok = offset == data
            && len == length
            && bar == BAR_INDEX
            && matches!(length, 1 | 2 | 4)
            && bar_offset % length as u64 == 0
            && bar_offset + length as u64 <= BAR_SIZE;
        if !ok {
            tracing::debug!(
                offset,
                len,
                bar,
                bar_offset,
                length,
                "virtio-pci: PCI_CFG window access ignored"
            );
        }
        Some((bar_offset, if ok { length } else { 0 }))
    }

    fn notify_write(&mut self, offset: u64, data: &[u8]) {
        // Reaches us only when no ioeventfd caught it (none registered, or an odd width).
        let queue = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        if offset % u64::from(NOTIFY_OFF_MULTIPLIER) != 0 || queue >= self.notify.len() as u64 {
            tracing::debug!(offset, len = data.len(), "virtio-pci: notify write ignored");
            return;
        }
        if self.common.driver_ok() {
            // The slow path (an exit per kick): worth seeing when ioeventfds were expected.
            tracing::debug!(queue, "virtio-pci: queue notify through an MMIO exit");
            lock(&self.device).process_queue(queue as u16);
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        match self.pci_cfg_target(offset, data.len()) {
            Some((bar_offset, len)) if len > 0 => self.bar_read(BAR_INDEX, bar_offset, data),
            Some(_) => data.fill(0),
            None => self.config.read(offset, data),
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigEffects {
        if let Some((bar_offset, len)) = self.pci_cfg_target(offset, data.len()) {
            if len > 0 {
                self.bar_write(BAR_INDEX, bar_offset, data);
            }
            return ConfigEffects::default();
        }
        let mut effects = self.config.write(offset, data);
        self.msix.config_written(&self.config);
        if let Some(sriov) = &mut self.sriov {
            sriov.config_written(&mut self.config, offset, data.len(), &mut effects);
        }
        effects
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar != BAR_INDEX {
            data.fill(0xff);
            return;
        }
        if self.msix.bar_read(bar, offset, data) {
            return;
        }
        data.fill(0);
        match offset {
            o if o < COMMON_OFFSET + COMMON_CFG_LEN => {
                self.common
                    .read(o - COMMON_OFFSET, data, &self.shared, &self.device);
            }
            ISR_OFFSET if data.len() == 1 => {
                // Read to clear: the driver acknowledges what it saw.
                data[0] = self.shared.isr.swap(0, Ordering::SeqCst);
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                lock(&self.device).read_config(o - DEVICE_OFFSET, data);
            }
            _ => {
                tracing::debug!(offset, len = data.len(), "virtio-pci: BAR read of nothing");
            }
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != BAR_INDEX || self.msix.bar_write(bar, offset, data) {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_CFG_LEN => {
                let vectors = self.msix.vectors();
                let handle = self.msix.handle();
                let ctx = common::WriteContext {
                    shared: &self.shared,
                    device: &self.device,
                    dma: &self.dma,
                    msix_vectors: vectors,
                    interrupt: &|| {
                        Arc::new(PciInterrupt {
                            shared: self.shared.clone(),
                            msix: handle.clone(),
                        }) as Arc<dyn VirtioInterrupt>
                    },
                };
                self.common.write(o - COMMON_OFFSET, data, &ctx);
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                lock(&self.device).write_config(o - DEVICE_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                self.notify_write(o - NOTIFY_OFFSET, data);
            }
            _ => {
                tracing::debug!(offset, len = data.len(), "virtio-pci: BAR write to nothing");
            }
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn ioevents(&self) -> Vec<IoEvent> {
        self.notify
            .iter()
            .enumerate()
            .map(|(q, fd)| IoEvent {
                bar: BAR_INDEX,
                offset: NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                // Linux writes the queue index, other drivers may write anything: any write.
                datamatch: Datamatch::Any,
                fd: fd.clone(),
            })
            .collect()
    }
}
