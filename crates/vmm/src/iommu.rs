//! The virtio-iommu on PCI and the devices behind it.
//!
//! [`VirtioPci::add_iommu`] puts the IOMMU on bus 0 first; every later device added with
//! [`VirtioPci::add_endpoint`] and `behind = true` gets a `DmaSpace` of its own, which the IOMMU
//! then owns the translation of (identity while the `bypass` config bit is set, nothing at all
//! once the guest clears it, its domain's IOTLB once attached), keyed by its PCI requester id
//! (`bus << 8 | device << 3 | function`, the id the VIOT gives the guest). The quiesce hook is the
//! device's own lock: a device serves DMA only under it, so taking it waits out any access that
//! used a translation the guest just took away. Devices not behind it keep an identity space of
//! their own, untouched by the IOMMU.
//!
//! Faults are reported from inside an endpoint's request processing (under the endpoint's lock),
//! so the notifier only signals an eventfd; [`FaultWatcher`] then delivers them into the event
//! queue from the event loop, taking the IOMMU's lock with no endpoint lock held.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::pci::Bdf;
use devices::virtio::iommu::{EVENT_QUEUE, Endpoint, IommuConfig, IommuError, VirtioIommu};
use devices::virtio::{DmaSpace, VirtioDevice};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::virtio_pci::{QueueNotifier, VirtioPci, VirtioPciWiringError};

/// The PCI functions behind the IOMMU, for the VIOT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuTopology {
    /// The virtio-iommu's own function.
    pub iommu: Bdf,
    /// Requester ids of the endpoints, ascending.
    pub endpoints: Vec<Bdf>,
}

impl VirtioPci<'_> {
    /// Create the virtio-iommu on the next free slot; later `add_endpoint(.., true)` calls put
    /// devices behind it. Returns its queue notifier and the fault watcher.
    pub fn add_iommu(
        &mut self,
    ) -> Result<(Bdf, QueueNotifier, FaultWatcher), VirtioPciWiringError> {
        let iommu = Arc::new(Mutex::new(VirtioIommu::new(
            IommuConfig::default(),
            std::iter::empty(),
        )?));
        let evt =
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioPciWiringError::FaultEvent)?);
        let signal = evt.clone();
        lock(&iommu).set_fault_notifier(move || {
            // Only fails when the counter would overflow: the watcher is behind anyway.
            let _ = signal.write(1);
        });
        let device: Arc<Mutex<dyn VirtioDevice>> = iommu.clone();
        let (bdf, notifier) = self.add(device)?;
        tracing::debug!(%bdf, "virtio-iommu");
        self.iommu = Some((bdf, iommu.clone()));
        Ok((bdf, notifier, FaultWatcher { evt, iommu }))
    }

    /// Put `device` on PCI, behind the IOMMU if `behind` (which [`Self::add_iommu`] must have
    /// created: the config validation refuses `iommu=on` without `--iommu`).
    pub fn add_endpoint(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
        behind: bool,
    ) -> Result<(Bdf, QueueNotifier), VirtioPciWiringError> {
        if !behind {
            return self.add(device);
        }
        let iommu = match &self.iommu {
            Some((_, iommu)) => iommu.clone(),
            None => return Err(VirtioPciWiringError::NoIommu),
        };
        // The IOMMU sets what is behind this handle as soon as it takes the endpoint, before
        // the guest can run.
        let dma = DmaSpace::identity(self.mem.clone());
        let (bdf, notifier) = self.add_function(device.clone(), dma.clone(), true)?;
        lock(&iommu).add_endpoint(u32::from(bdf.raw()), Endpoint::locked_by(dma, device))?;
        tracing::debug!(%bdf, "behind the virtio-iommu");
        Ok((bdf, notifier))
    }

    /// What the VIOT describes, if there is an IOMMU.
    pub fn iommu_topology(&self) -> Option<IommuTopology> {
        let (bdf, iommu) = self.iommu.as_ref()?;
        // VFs become endpoints only when the guest enables them; the VIOT names them up front.
        let mut endpoints: Vec<Bdf> = lock(iommu)
            .endpoint_ids()
            .filter_map(|id| u16::try_from(id).ok().map(Bdf::from_raw))
            .chain(self.sriov.vf_endpoints.iter().copied())
            .collect();
        endpoints.sort();
        endpoints.dedup();
        Some(IommuTopology {
            iommu: *bdf,
            endpoints,
        })
    }
}

impl From<IommuError> for VirtioPciWiringError {
    fn from(e: IommuError) -> Self {
        Self::Iommu(e)
    }
}

/// Delivers pending fault events into the IOMMU's event queue from the event loop.
pub struct FaultWatcher {
    evt: Arc<EventFd>,
    iommu: Arc<Mutex<VirtioIommu>>,
}

impl MutEventSubscriber for FaultWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        lock(&self.iommu).process_queue(EVENT_QUEUE);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.evt.as_raw_fd(), EventSet::IN)) {
            tracing::error!(?e, "cannot watch the virtio-iommu fault eventfd");
        }
    }
}
