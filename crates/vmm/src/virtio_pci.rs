//! Virtio devices on the PCI root: each gets a slot on bus 0, MSI-X vectors backed by irqfds,
//! BARs assigned in the PCI windows (as firmware would leave them; a guest may move them), and
//! an event-loop subscriber that serves its queue notifications.
//!
//! A guest kick is a write to a queue's notify register, which KVM turns into an eventfd
//! signal (the PCI root registers one ioeventfd per queue wherever BAR 0 is mapped, and moves
//! them with it). [`QueueNotifier`] reads the eventfd in the main event loop and calls the
//! device's `process_queue` under the device's own lock, so the vCPU never leaves the guest
//! for a kick and never waits for I/O.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::pci::{BarInfo, BarKind, Bdf, PciDevice, PciError, PciRoot};
use devices::virtio::block::{Block, BlockBackend, BlockError, BlockOptions};
use devices::virtio::pci::{VirtioPciDevice, VirtioPciError, msix_vector_count};
use devices::virtio::{DmaSpace, VirtioDevice};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupts::{GsiRouting, InterruptError, MsiVectors};
use crate::layout;

/// PCI config registers the builder programs (type 0 header).
const COMMAND: u16 = 0x04;
const BAR0: u16 = 0x10;
const COMMAND_MEMORY: u16 = 1 << 1;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciWiringError {
    #[error("Cannot open disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: BlockError,
    },
    #[error("No free PCI slot on bus 0")]
    NoSlot,
    #[error("No room for a {size:#x}-byte BAR in the PCI windows")]
    NoBarSpace { size: u64 },
    #[error("Cannot create the MSI-X vectors")]
    Interrupts(#[from] InterruptError),
    #[error("Cannot build the virtio-pci function")]
    Transport(#[from] VirtioPciError),
    #[error("Cannot put the function on the PCI root")]
    Pci(#[from] PciError),
    #[error("Cannot set up the virtio-iommu")]
    Iommu(#[source] devices::virtio::iommu::IommuError),
    #[error("Cannot create the virtio-iommu fault eventfd")]
    FaultEvent(#[source] std::io::Error),
    #[error("A device asks for the IOMMU but there is none")]
    NoIommu,
    #[error("Cannot set up SR-IOV")]
    Sriov(#[from] crate::sriov::SriovWiringError),
}

impl VirtioPciWiringError {
    /// A disk image that cannot be opened (missing, no permission, serial too long) is the
    /// user's mistake.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Self::Disk { .. })
    }
}

/// Hands out BAR addresses: naturally aligned, bottom up, in the 32-bit window first (every
/// guest and firmware reaches it; 64-bit BARs go there too while it has room), then in the
/// 64-bit window above RAM.
#[derive(Debug)]
pub struct BarAllocator {
    low: (u64, u64),
    high: (u64, u64),
}

impl BarAllocator {
    pub fn new(mem_size: u64) -> Self {
        let (high_start, high_size) = layout::pci_mmio64(mem_size);
        Self {
            low: (
                layout::PCI_MMIO32_START,
                layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE,
            ),
            high: (high_start, high_start + high_size),
        }
    }

    fn take(window: &mut (u64, u64), size: u64) -> Option<u64> {
        let base = window.0.checked_next_multiple_of(size)?;
        let end = base.checked_add(size)?;
        if end > window.1 {
            return None;
        }
        window.0 = end;
        Some(base)
    }

    /// An address for `bar`, or `None` if it does not fit (I/O BARs are not handed out: no
    /// virtio device has one).
    pub fn allocate(&mut self, bar: &BarInfo) -> Option<u64> {
        match bar.kind {
            BarKind::Io => None,
            BarKind::Mem32 => Self::take(&mut self.low, bar.size),
            BarKind::Mem64 => {
                Self::take(&mut self.low, bar.size).or_else(|| Self::take(&mut self.high, bar.size))
            }
        }
    }
}

/// What putting virtio devices on PCI needs, for the builder.
pub struct VirtioPci<'a> {
    pub root: &'a Arc<Mutex<PciRoot>>,
    pub routing: &'a Arc<GsiRouting>,
    pub mem: &'a GuestMemoryMmap,
    pub bars: &'a mut BarAllocator,
    /// The virtio-iommu and its address, once [`Self::add_iommu`] created it.
    pub iommu: Option<(Bdf, Arc<Mutex<devices::virtio::iommu::VirtioIommu>>)>,
    /// SR-IOV PFs: root ports, bus numbers, the VFs' event set (see `sriov.rs`).
    pub sriov: crate::sriov::SriovWiring,
}

impl VirtioPci<'_> {
    /// Put `device` in the next free slot of bus 0 with its BARs assigned and memory decoding
    /// on; returns its address and the subscriber that serves its queue notifications.
    pub fn add(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(Bdf, QueueNotifier), VirtioPciWiringError> {
        // Identity DMA for now; the IOMMU will hand each endpoint its own space.
        let dma = DmaSpace::identity(self.mem.clone());
        self.add_with_dma(device, dma)
    }

    /// [`Self::add`] with the device reaching guest memory through `dma`: the handle an IOMMU
    /// translates for this endpoint (the builder keeps a clone to swap the mapping).
    pub fn add_with_dma(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        dma: DmaSpace,
    ) -> Result<(Bdf, QueueNotifier), VirtioPciWiringError> {
        self.add_function(device, dma, false)
    }

    /// Build the transport (requiring ACCESS_PLATFORM of the driver when `translated`) and put
    /// it on bus 0.
    pub(crate) fn add_function(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        dma: DmaSpace,
        translated: bool,
    ) -> Result<(Bdf, QueueNotifier), VirtioPciWiringError> {
        let (transport, notifier) = self.transport(device, dma, translated)?;
        let slot = lock(self.root)
            .free_device()
            .ok_or(VirtioPciWiringError::NoSlot)?;
        let bdf = Bdf::new(0, slot, 0);
        let bars = transport.bars();
        let function: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(transport));
        lock(self.root).add_device(bdf, function)?;
        let addrs = bars
            .iter()
            .map(|bar| {
                self.bars
                    .allocate(bar)
                    .ok_or(VirtioPciWiringError::NoBarSpace { size: bar.size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        program_bars(&mut lock(self.root), bdf, &bars, &addrs);
        Ok((bdf, notifier))
    }

    /// A virtio-pci transport for `device` and the subscriber serving its queue kicks.
    pub(crate) fn transport(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        dma: DmaSpace,
        translated: bool,
    ) -> Result<(VirtioPciDevice, QueueNotifier), VirtioPciWiringError> {
        let queues = lock(&device).queue_max_sizes().len();
        let msi = MsiVectors::new(self.routing, msix_vector_count(queues))?;
        let mut transport = VirtioPciDevice::new(device.clone(), dma, Arc::new(msi))?;
        if translated {
            transport.require_access_platform();
        }
        let notifier = QueueNotifier {
            device,
            events: transport.notify_events(),
        };
        Ok((transport, notifier))
    }

    /// One virtio-blk device per configured disk.
    pub fn add_disks(
        &mut self,
        disks: &[api::DiskConfig],
    ) -> Result<Vec<QueueNotifier>, VirtioPciWiringError> {
        let mut notifiers = Vec::with_capacity(disks.len());
        for (index, disk) in disks.iter().enumerate() {
            let opts = BlockOptions {
                read_only: disk.readonly,
                direct: disk.direct,
                serial: disk.serial.clone(),
            };
            let backend = BlockBackend::open(&disk.path, &opts)
                .map_err(|source| VirtioPciWiringError::Disk { index, source })?;
            if disk.vfs > 0 {
                let notifier = self.add_block_pf(backend, disk.vfs, disk.iommu)?;
                notifiers.push(notifier);
                continue;
            }
            let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Block::new(backend)));
            let (bdf, notifier) = self.add_endpoint(device, disk.iommu)?;
            tracing::debug!(%bdf, path = %disk.path.display(), "virtio-blk");
            notifiers.push(notifier);
        }
        Ok(notifiers)
    }
}

/// Program `bars` of the function at `bdf` at `addrs` and turn memory decoding on, through the
/// root as firmware would, so that mappings and ioeventfds follow from the same code path as a
/// guest's own assignment.
pub(crate) fn program_bars(root: &mut PciRoot, bdf: Bdf, bars: &[BarInfo], addrs: &[u64]) {
    for (bar, &addr) in bars.iter().zip(addrs) {
        let reg = BAR0 + 4 * u16::from(bar.index);
        // The low bits hold the BAR's read-only type flags: write them back unchanged.
        let mut flags = [0u8; 4];
        root.config_read(bdf, reg, &mut flags);
        let low = (addr as u32) | (u32::from_le_bytes(flags) & 0xf);
        root.config_write(bdf, reg, &low.to_le_bytes());
        if bar.kind == BarKind::Mem64 {
            root.config_write(bdf, reg + 4, &((addr >> 32) as u32).to_le_bytes());
        }
    }
    root.config_write(bdf, COMMAND, &COMMAND_MEMORY.to_le_bytes());
}

/// Serves one device's queue notifications in the event loop: an eventfd per queue, signalled
/// by KVM on the guest's notify write.
pub struct QueueNotifier {
    device: Arc<Mutex<dyn VirtioDevice>>,
    events: Vec<(u16, Arc<EventFd>)>,
}

impl MutEventSubscriber for QueueNotifier {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Ok(queue) = u16::try_from(events.data()) else {
            return;
        };
        if let Some((_, evt)) = self.events.iter().find(|(q, _)| *q == queue) {
            // The count only says "look"; the device drains the whole ring.
            let _ = evt.read();
        }
        lock(&self.device).process_queue(queue);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (queue, evt) in &self.events {
            let ev = Events::with_data_raw(evt.as_raw_fd(), u32::from(*queue), EventSet::IN);
            if let Err(e) = ops.add(ev) {
                tracing::error!(queue, ?e, "cannot watch a queue notification eventfd");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed setup should stop the test loudly

    use super::*;

    fn bar(index: u8, kind: BarKind, size: u64) -> BarInfo {
        BarInfo {
            index,
            kind,
            size,
            prefetchable: false,
        }
    }

    #[test]
    fn bars_aligned_low_then_high() {
        let mut a = BarAllocator::new(1 << 30);
        let b0 = a.allocate(&bar(0, BarKind::Mem64, 0x8000)).unwrap();
        assert_eq!(b0, layout::PCI_MMIO32_START);
        let b1 = a.allocate(&bar(0, BarKind::Mem32, 0x1000)).unwrap();
        assert_eq!(b1, b0 + 0x8000);
        let b2 = a.allocate(&bar(0, BarKind::Mem64, 0x10000)).unwrap();
        assert_eq!(b2 % 0x10000, 0);
        assert!(b2 > b1);
        assert_eq!(a.allocate(&bar(0, BarKind::Io, 0x20)), None);
        // The low window fills up: 64-bit BARs move above RAM, 32-bit ones fail.
        let big = bar(0, BarKind::Mem64, layout::PCI_MMIO32_SIZE);
        let high = a.allocate(&big).unwrap();
        assert_eq!(high, layout::pci_mmio64(1 << 30).0);
        assert_eq!(
            a.allocate(&bar(0, BarKind::Mem32, layout::PCI_MMIO32_SIZE)),
            None
        );
    }
}
