//! SR-IOV: virtio PFs behind root ports, and the lifecycle of their VFs.
//!
//! A PF's config write that sets or clears VF Enable (or moves a VF BAR) comes back from the PF
//! as `ConfigEffects`; the PCI root hands it to the PF's [`VfManager`] (a
//! `devices::pci::SriovHandler`) after releasing the PF's lock, with the root held, on the
//! thread that made the write: a vCPU. So the VFs exist, with their BARs mapped, ioeventfds and
//! irqfds registered, before the guest's next instruction runs: Linux reads a VF's config space
//! right after setting VF Enable (after its 100 ms wait, which a guest may skip). Nothing here
//! waits for the event loop: queue notifications of VFs reach it through [`DynamicEvents`], an
//! epoll set of our own that the event loop watches as one fd and that any thread may add to
//! or remove from (`epoll_ctl` is thread-safe), so a vCPU never blocks on the main thread (which
//! may itself be stopping and joining that vCPU).
//!
//! What a VF is made of is the PF's business: a [`VfFactory`] makes VF `i` (its virtio device
//! and the backend fds to watch); everything else (transport, MSI-X vectors as irqfds, BAR
//! mapping, IOMMU endpoint) is the same for every kind. Removing a VF undoes all of it: its fds
//! leave the epoll set, its BARs and ioeventfds leave the bus, the device is reset (queues
//! stopped, DMA space and interrupt handle dropped), its IOMMU endpoint is removed, and the
//! transport is dropped (its MSI-X irqfds unregistered, GSIs and routes released).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::pci::sriov::vf_routing_id;
use devices::pci::{
    AddressSpace, Bdf, PciDevice, PciRoot, SriovHandler, VfBarChange, VfEnableChange,
};
use devices::virtio::block::{Block, BlockBackend};
use devices::virtio::iommu::{Endpoint, VirtioIommu};
use devices::virtio::pci::{VirtioPciDevice, msix_vector_count};
use devices::virtio::{DmaSpace, VirtioDevice};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::interrupts::{GsiRouting, MsiVectors};

/// Called on the event loop when a watched fd is readable.
pub type FdHandler = Arc<dyn Fn() + Send + Sync>;

/// What a PF's factory makes for VF `i`.
pub struct VfParts {
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// Backend fds to watch (level-triggered readable) and what to do then, e.g. a net VF's
    /// switch port. Queue notifications are watched for every VF anyway.
    pub watch: Vec<(RawFd, FdHandler)>,
}

#[derive(Debug, thiserror::Error)]
pub enum VfError {
    #[error("VF {0}: the PF's backend cannot be split that way")]
    Backend(u16),
    #[error("VF {0}: {1}")]
    Other(u16, String),
}

/// Knows how to make the VFs of one PF (one per device kind: block here, net in the switch).
pub trait VfFactory: Send {
    /// VF `index` of `num_vfs` (VF Enable was just set with NumVFs = `num_vfs`).
    fn make(&mut self, index: u16, num_vfs: u16) -> Result<VfParts, VfError>;
}

/// virtio-blk VFs: the PF's image split in `num_vfs` equal regions, VF i on region i, all
/// through one open file (see `BlockBackend::region`).
pub struct BlockVfs {
    /// The whole image, shared with the PF.
    pub image: BlockBackend,
    /// The PF's serial, to derive each VF's ("<serial>-vf<i>", cut to 20 bytes).
    pub serial: String,
}

impl VfFactory for BlockVfs {
    fn make(&mut self, index: u16, num_vfs: u16) -> Result<VfParts, VfError> {
        let mut serial = format!("vf{index}-{}", self.serial);
        serial.truncate(devices::virtio::block::SERIAL_LEN);
        let region = self
            .image
            .region(index, num_vfs, &serial)
            .ok_or(VfError::Backend(index))?;
        Ok(VfParts {
            device: Arc::new(Mutex::new(Block::new(region))),
            watch: Vec::new(),
        })
    }
}

/// An epoll set that any thread may add fds to, watched by the event loop as one fd
/// ([`DynamicEventsWatcher`]). Handlers are called on the event loop with no lock of ours held.
pub struct DynamicEvents {
    epoll: Epoll,
    handlers: Mutex<HashMap<u64, (RawFd, FdHandler)>>,
    next: AtomicU64,
}

impl std::fmt::Debug for DynamicEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicEvents")
            .field("watched", &lock(&self.handlers).len())
            .finish_non_exhaustive()
    }
}

impl DynamicEvents {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            epoll: Epoll::new()?,
            handlers: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }))
    }

    /// Watch `fd` for input; returns the token to [`Self::remove`] it with. The fd must stay
    /// open until then (the handler usually holds it).
    pub fn add(&self, fd: RawFd, handler: FdHandler) -> std::io::Result<u64> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.handlers).insert(token, (fd, handler));
        let ev = EpollEvent::new(EventSet::IN, token);
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
            lock(&self.handlers).remove(&token);
            return Err(e);
        }
        Ok(token)
    }

    /// Stop watching; the handler is dropped (once a dispatch running now has finished).
    pub fn remove(&self, token: u64) {
        if let Some((fd, _)) = lock(&self.handlers).remove(&token) {
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            {
                tracing::warn!(fd, "cannot stop watching a VF fd: {e}");
            }
        }
    }

    /// How many fds are watched.
    pub fn len(&self) -> usize {
        lock(&self.handlers).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Run the handlers of the fds that are ready now.
    fn dispatch(&self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("VF event wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                // Cloned out so that no lock is held while the device works: a vCPU adding
                // or removing VFs must not wait for I/O.
                let handler = lock(&self.handlers).get(&ev.data()).map(|(_, h)| h.clone());
                if let Some(h) = handler {
                    h();
                }
            }
            if n < events.len() {
                return;
            }
        }
    }
}

/// The event loop's side of [`DynamicEvents`].
pub struct DynamicEventsWatcher(pub Arc<DynamicEvents>);

impl MutEventSubscriber for DynamicEventsWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.0.dispatch();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.0.epoll.as_raw_fd(), EventSet::IN)) {
            tracing::error!(?e, "cannot watch the VF event set");
        }
    }
}

/// One live VF and what to release when it goes.
struct LiveVf {
    bdf: Bdf,
    device: Arc<Mutex<dyn VirtioDevice>>,
    tokens: Vec<u64>,
    behind_iommu: bool,
}

/// What a VF needs from the VM.
pub struct VfResources {
    pub routing: Arc<GsiRouting>,
    pub mem: GuestMemoryMmap,
    pub events: Arc<DynamicEvents>,
    /// The virtio-iommu, when the PF is behind it: each VF is then an endpoint of its own
    /// (endpoint id = its routing id as the builder numbered the bus).
    pub iommu: Option<Arc<Mutex<VirtioIommu>>>,
}

struct VfState {
    factory: Box<dyn VfFactory>,
    live: Vec<LiveVf>,
}

/// Carries out one PF's VF changes (see the module documentation).
pub struct VfManager {
    res: VfResources,
    state: Mutex<VfState>,
    first_offset: u16,
    stride: u16,
}

impl VfManager {
    pub fn new(
        factory: Box<dyn VfFactory>,
        res: VfResources,
        first_offset: u16,
        stride: u16,
    ) -> Self {
        Self {
            res,
            state: Mutex::new(VfState {
                factory,
                live: Vec::new(),
            }),
            first_offset,
            stride,
        }
    }

    /// How many VFs exist now.
    pub fn live(&self) -> usize {
        lock(&self.state).live.len()
    }

    fn create(&self, root: &mut PciRoot, pf: Bdf, st: &mut VfState, num_vfs: u16) {
        for i in 0..num_vfs {
            match self.create_one(root, pf, st, i, num_vfs) {
                Ok(vf) => st.live.push(vf),
                Err(e) => {
                    // The guest sees the functions that could be made; the rest read as
                    // absent (all-ones), which a driver handles as a failed VF.
                    tracing::error!(%pf, vf = i, "cannot create VF: {e}");
                    return;
                }
            }
        }
    }

    fn create_one(
        &self,
        root: &mut PciRoot,
        pf: Bdf,
        st: &mut VfState,
        index: u16,
        num_vfs: u16,
    ) -> Result<LiveVf, String> {
        let bdf =
            vf_routing_id(pf, self.first_offset, self.stride, index).map_err(|e| e.to_string())?;
        let parts = st.factory.make(index, num_vfs).map_err(|e| e.to_string())?;
        let device = parts.device;
        let queues = lock(&device).queue_max_sizes().len();
        let msi = MsiVectors::new(&self.res.routing, msix_vector_count(queues))
            .map_err(|e| e.to_string())?;
        let dma = DmaSpace::identity(self.res.mem.clone());
        let mut transport = VirtioPciDevice::new(device.clone(), dma.clone(), Arc::new(msi))
            .map_err(|e| e.to_string())?;
        transport.make_vf().map_err(|e| e.to_string())?;
        let behind_iommu = self.res.iommu.is_some();
        if behind_iommu {
            transport.require_access_platform();
        }
        let notify = transport.notify_events();
        let function: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(transport));
        root.add_device(bdf, function).map_err(|e| e.to_string())?;
        let mut vf = LiveVf {
            bdf,
            device: device.clone(),
            tokens: Vec::new(),
            behind_iommu: false,
        };
        if let Some(iommu) = &self.res.iommu {
            if let Err(e) = lock(iommu).add_endpoint(
                u32::from(bdf.raw()),
                Endpoint::locked_by(dma, device.clone()),
            ) {
                self.destroy(root, vf);
                return Err(e.to_string());
            }
            vf.behind_iommu = true;
        }
        let mut watch = parts.watch;
        for (queue, evt) in notify {
            let device = device.clone();
            let fd = evt.as_raw_fd();
            let handler: FdHandler = Arc::new(move || {
                // The count only says "look"; the device drains the whole ring.
                let _ = evt.read();
                lock(&device).process_queue(queue);
            });
            watch.push((fd, handler));
        }
        for (fd, handler) in watch {
            match self.res.events.add(fd, handler) {
                Ok(t) => vf.tokens.push(t),
                Err(e) => {
                    self.destroy(root, vf);
                    return Err(format!("cannot watch fd {fd}: {e}"));
                }
            }
        }
        Ok(vf)
    }

    /// Undo [`Self::create_one`].
    fn destroy(&self, root: &mut PciRoot, vf: LiveVf) {
        for t in &vf.tokens {
            self.res.events.remove(*t);
        }
        // BARs, ioeventfds and the function leave the root; then the queues stop.
        let function = root.remove_device(vf.bdf);
        lock(&vf.device).reset();
        if vf.behind_iommu {
            if let Some(iommu) = &self.res.iommu {
                if let Err(e) = lock(iommu).remove_endpoint(u32::from(vf.bdf.raw())) {
                    tracing::warn!(bdf = %vf.bdf, "cannot remove the VF's IOMMU endpoint: {e}");
                }
            }
        }
        // The transport goes with its last reference (a vCPU in the middle of a BAR access
        // may still hold one): MSI-X irqfds unregistered, GSIs released.
        drop(function);
    }

    fn map_bars(&self, root: &mut PciRoot, st: &VfState, change: &VfBarChange) {
        for (i, vf) in st.live.iter().enumerate() {
            let at = change
                .new
                .and_then(|base| base.checked_add(change.size.checked_mul(i as u64)?));
            root.map_bar(vf.bdf, change.bar, AddressSpace::Memory, change.size, at);
        }
    }
}

impl SriovHandler for VfManager {
    fn carry_out(
        &self,
        root: &mut PciRoot,
        pf: Bdf,
        enable: Option<VfEnableChange>,
        bars: &[VfBarChange],
    ) {
        let mut st = lock(&self.state);
        match enable {
            Some(e) if e.enabled => {
                self.create(root, pf, &mut st, e.num_vfs);
                tracing::debug!(%pf, vfs = st.live.len(), "VFs enabled");
            }
            _ => {}
        }
        for change in bars {
            self.map_bars(root, &st, change);
        }
        if let Some(e) = enable.filter(|e| !e.enabled) {
            for vf in std::mem::take(&mut st.live) {
                self.destroy(root, vf);
            }
            tracing::debug!(%pf, num_vfs = e.num_vfs, "VFs disabled");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SriovWiringError {
    #[error("No free PCI slot on bus 0 for a root port")]
    NoSlot,
    #[error("No bus number left for another root port")]
    NoBus,
    #[error("No room for a {0:#x}-byte root port window in the PCI windows")]
    NoWindow(u64),
    #[error("Cannot create the VF event set")]
    Events(#[source] std::io::Error),
    #[error("Cannot build the PF")]
    Transport(#[from] devices::virtio::pci::VirtioPciError),
    #[error("Cannot put the PF on PCI")]
    Pci(#[from] devices::pci::PciError),
    #[error("Cannot make the PF an IOMMU endpoint")]
    Iommu(#[from] devices::virtio::iommu::IommuError),
    #[error("The image is too small for {0} VFs of at least 4 KiB")]
    ImageTooSmall(u16),
}

/// The builder's SR-IOV state: the next bus number for a root port, the VFs' event set, and
/// the routing ids VFs may take behind the IOMMU (for the VIOT, built before any VF exists).
#[derive(Debug, Default)]
pub struct SriovWiring {
    next_bus: u8,
    pub events: Option<Arc<DynamicEvents>>,
    pub vf_endpoints: Vec<Bdf>,
}

impl crate::virtio_pci::VirtioPci<'_> {
    /// A virtio-blk PF with up to `vfs` VFs on a root port of its own: the PF at function 0
    /// of the port's bus, its BAR and the VF BAR aperture (TotalVFs x 32 KiB) preassigned in
    /// the port's memory window as firmware would leave them.
    pub fn add_block_pf(
        &mut self,
        backend: BlockBackend,
        vfs: u16,
        behind_iommu: bool,
    ) -> Result<crate::virtio_pci::QueueNotifier, crate::virtio_pci::VirtioPciWiringError> {
        let serial_bytes = backend.serial();
        let len = serial_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(serial_bytes.len());
        let serial = String::from_utf8_lossy(&serial_bytes[..len]).into_owned();
        BlockBackend::region_size(backend.size(), vfs)
            .ok_or(SriovWiringError::ImageTooSmall(vfs))?;
        let image = backend
            .region(0, 1, &serial)
            .ok_or(SriovWiringError::ImageTooSmall(vfs))?;
        let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Block::new(backend)));
        lock(&device)
            .common_mut()
            .offer(devices::virtio::features::SR_IOV);
        let factory = Box::new(BlockVfs { image, serial });
        self.add_pf(device, factory, vfs, behind_iommu)
    }

    /// Put `device` on a new root port as an SR-IOV PF whose VFs `factory` makes.
    pub fn add_pf(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        factory: Box<dyn VfFactory>,
        vfs: u16,
        behind_iommu: bool,
    ) -> Result<crate::virtio_pci::QueueNotifier, crate::virtio_pci::VirtioPciWiringError> {
        use devices::pci::{BarInfo, BarKind, RootPort};
        use devices::virtio::pci::BAR_SIZE;

        let iommu = match (behind_iommu, &self.iommu) {
            (false, _) => None,
            (true, Some((_, iommu))) => Some(iommu.clone()),
            (true, None) => return Err(crate::virtio_pci::VirtioPciWiringError::NoIommu),
        };
        let dma = DmaSpace::identity(self.mem.clone());
        let (mut transport, notifier) =
            self.transport(device.clone(), dma.clone(), behind_iommu)?;
        transport.make_pf(vfs).map_err(SriovWiringError::from)?;
        let cap = transport
            .sriov()
            .map(|(s, _)| s.offset())
            .ok_or(SriovWiringError::ImageTooSmall(vfs))?;
        let bars = transport.bars();

        self.sriov.next_bus = self.sriov.next_bus.max(1);
        let bus = self.sriov.next_bus;
        self.sriov.next_bus = bus.checked_add(1).ok_or(SriovWiringError::NoBus)?;
        // The PF's BAR, then the VF aperture, in one window (1 MiB granular, naturally aligned).
        let need = BAR_SIZE * (1 + u64::from(vfs));
        let window = need.next_power_of_two().max(1 << 20);
        let base = self
            .bars
            .allocate(&BarInfo {
                index: 0,
                kind: BarKind::Mem32,
                size: window,
                prefetchable: false,
            })
            .ok_or(SriovWiringError::NoWindow(window))?;
        let events = match &self.sriov.events {
            Some(e) => e.clone(),
            None => {
                let e = DynamicEvents::new().map_err(SriovWiringError::Events)?;
                self.sriov.events = Some(e.clone());
                e
            }
        };
        let manager = Arc::new(VfManager::new(
            factory,
            VfResources {
                routing: self.routing.clone(),
                mem: self.mem.clone(),
                events,
                iommu: iommu.clone(),
            },
            1,
            1,
        ));

        let mut root = lock(self.root);
        let slot = root.free_device().ok_or(SriovWiringError::NoSlot)?;
        let port = Bdf::new(0, slot, 0);
        root.add_root_port(
            port,
            RootPort::new(bus).map_err(SriovWiringError::from)?,
            bus,
            Some((base, window)),
        )
        .map_err(SriovWiringError::from)?;
        let pf = Bdf::new(bus, 0, 0);
        let function: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(transport));
        root.add_device(pf, function)
            .map_err(SriovWiringError::from)?;
        root.set_sriov_handler(pf, manager);
        crate::virtio_pci::program_bars(&mut root, pf, &bars, &[base]);
        let vf_base = base + BAR_SIZE;
        root.config_write(pf, cap + 0x24, &(vf_base as u32).to_le_bytes());
        root.config_write(pf, cap + 0x28, &((vf_base >> 32) as u32).to_le_bytes());
        drop(root);

        if let Some(iommu) = iommu {
            lock(&iommu)
                .add_endpoint(u32::from(pf.raw()), Endpoint::locked_by(dma, device))
                .map_err(SriovWiringError::from)?;
            for i in 0..vfs {
                if let Ok(rid) = vf_routing_id(pf, 1, 1, i) {
                    self.sriov.vf_endpoints.push(rid);
                }
            }
        }
        tracing::debug!(%port, %pf, vfs, "SR-IOV PF");
        Ok(notifier)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed setup should stop the test loudly

    use std::sync::atomic::AtomicUsize;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    /// Fds added from any thread are served by dispatch until removed; a removed fd's handler
    /// is dropped and never called again.
    #[test]
    fn dynamic_events_add_dispatch_remove() {
        let events = DynamicEvents::new().unwrap();
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let (e, c) = (evt.clone(), calls.clone());
        let token = std::thread::spawn({
            let events = events.clone();
            move || {
                events
                    .add(
                        e.as_raw_fd(),
                        Arc::new(move || {
                            let _ = e.read();
                            c.fetch_add(1, Ordering::SeqCst);
                        }),
                    )
                    .unwrap()
            }
        })
        .join()
        .unwrap();
        assert_eq!(events.len(), 1);
        events.dispatch();
        assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing ready yet");
        evt.write(1).unwrap();
        events.dispatch();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        events.remove(token);
        assert!(events.is_empty());
        // Only the test's reference is left: the handler (and its clone of the fd) is gone.
        assert_eq!(Arc::strong_count(&evt), 1);
        evt.write(1).unwrap();
        events.dispatch();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Removing twice, or a token never given, is harmless.
        events.remove(token);
        events.remove(12345);
        // An fd epoll refuses (not open) is an error, and leaves nothing behind.
        assert!(events.add(-1, Arc::new(|| {})).is_err());
        assert!(events.is_empty());
    }
}
