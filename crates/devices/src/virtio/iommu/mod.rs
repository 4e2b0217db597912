//! virtio-iommu (virtio 1.2, 5.13): the guest programs which I/O virtual addresses each
//! endpoint (a PCI requester id) may reach, and every DMA of the devices behind it is translated
//! and permission-checked through their [`DmaSpace`].
//!
//! The device owns the mapping tables (one [`DmaIommu`] IOTLB per domain, filled eagerly at
//! MAP) and, per endpoint, the [`DmaSpace`] handle the endpoint's device was activated with
//! (the builder hands them over with [`Endpoint`]s). ATTACH points the endpoint's handle at its
//! domain's IOTLB; DETACH at "no access", or back to the identity when the `bypass` config bit
//! is set; MAP and UNMAP edit the domain's IOTLB in place, which every attached endpoint shares.
//!
//! **Quiescing.** A device may still hold host pointers translated before an UNMAP or DETACH
//! (an open `preadv` into guest memory, a snapshot of the old object). Devices serve requests
//! synchronously inside `process_queue` (and `process_backend`) under their own lock and drop
//! their snapshot before returning, so once the IOMMU has changed the translation, taking and
//! releasing that lock waits for the last access that could have used the old one; every later
//! access translates afresh. So each endpoint comes with a quiesce callback (usually
//! [`Endpoint::locked_by`] its device's lock), called after every change that takes access
//! away, before the request completes. Lock order: IOMMU device, then endpoint device; nothing
//! that holds an endpoint lock takes the IOMMU's (fault reports go through a leaf lock).
//!
//! **Faults.** A refused access is reported by the endpoint's [`DmaIommu`] through
//! [`FaultReporter`]: it is queued (bounded) and the fault notifier is called; the VMM then
//! calls `process_queue(EVENT_QUEUE)` under the device lock, which writes the pending faults
//! into the event queue's buffers. Request processing delivers pending faults too.

pub mod request;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use virtio_queue::Queue;
use vm_memory::Permissions;

use super::dma::{DmaFault, DmaIommu, DmaSnapshot, FaultKind, FaultReporter, IotlbStats};
use super::queue::{QueueError, fill, parse_chain};
use super::{DmaSpace, VirtioCommon, VirtioDevice, features};
use crate::bus::lock;

/// Virtio device id of the IOMMU.
pub const DEVICE_ID: u32 = 23;
pub const REQUEST_QUEUE: u16 = 0;
pub const EVENT_QUEUE: u16 = 1;
/// Largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of properties a PROBE request gets (QEMU's size, which Linux is tested against).
pub const PROBE_SIZE: u32 = 512;
/// The x86 MSI doorbell window, reserved in every endpoint's address space (PROBE reports it as
/// `RESV_MEM_T_MSI`; MAP refuses to cover it).
pub const MSI_START: u64 = 0xfee0_0000;
pub const MSI_END: u64 = 0xfeef_ffff;
/// Faults waiting for an event buffer; later ones are dropped (and counted).
pub const MAX_PENDING_FAULTS: usize = 64;

/// Feature bits of the IOMMU (virtio 1.2, 5.13.3), as masks.
pub mod feature {
    pub const INPUT_RANGE: u64 = 1 << 0;
    pub const DOMAIN_RANGE: u64 = 1 << 1;
    pub const MAP_UNMAP: u64 = 1 << 2;
    /// Legacy bypass; superseded by BYPASS_CONFIG and not offered.
    pub const BYPASS: u64 = 1 << 3;
    pub const PROBE: u64 = 1 << 4;
    /// MMIO mappings: not offered (device DMA here reaches guest RAM only).
    pub const MMIO: u64 = 1 << 5;
    pub const BYPASS_CONFIG: u64 = 1 << 6;

    pub const OFFERED: u64 = INPUT_RANGE | DOMAIN_RANGE | MAP_UNMAP | PROBE | BYPASS_CONFIG;
}

/// Offsets in the configuration space (`struct virtio_iommu_config`).
pub mod config {
    pub const PAGE_SIZE_MASK: usize = 0;
    pub const INPUT_START: usize = 8;
    pub const INPUT_END: usize = 16;
    pub const DOMAIN_START: usize = 24;
    pub const DOMAIN_END: usize = 28;
    pub const PROBE_SIZE: usize = 32;
    pub const BYPASS: usize = 36;
    pub const LEN: usize = 40;
}

/// Request status codes (`virtio_iommu_req_tail.status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
    DevErr = 3,
    Inval = 4,
    Range = 5,
    NoEnt = 6,
    Fault = 7,
    NoMem = 8,
}

/// Fault reasons and flags of an event (`struct virtio_iommu_fault`).
pub mod fault {
    pub const R_UNKNOWN: u8 = 0;
    pub const R_DOMAIN: u8 = 1;
    pub const R_MAPPING: u8 = 2;
    pub const F_READ: u32 = 1 << 0;
    pub const F_WRITE: u32 = 1 << 1;
    pub const F_ADDRESS: u32 = 1 << 8;
    /// Bytes of one event.
    pub const LEN: usize = 24;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IommuError {
    #[error("Page size mask is empty")]
    NoPageSize,
    #[error("Input range {start:#x}-{end:#x} is empty or reaches the top of the address space")]
    InputRange { start: u64, end: u64 },
    #[error("Domain range {start}-{end} is empty")]
    DomainRange { start: u32, end: u32 },
    #[error("Endpoint {0:#x} is already behind the IOMMU")]
    DuplicateEndpoint(u32),
    #[error("Endpoint {0:#x} is not behind the IOMMU")]
    UnknownEndpoint(u32),
}

/// What the device advertises and its limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuConfig {
    /// Page sizes that can be mapped; the lowest set bit is the granule.
    pub page_size_mask: u64,
    /// IOVAs that can be mapped (inclusive). The end must be below `u64::MAX` so that every
    /// mapping's length fits a u64.
    pub input_range: (u64, u64),
    /// Domain ids the driver may use (inclusive).
    pub domain_range: (u32, u32),
    /// The `bypass` field after a system reset: unattached endpoints reach guest memory
    /// untranslated (firmware and guests without the driver keep working).
    pub bypass: bool,
    /// Most mappings alive at once over all domains; MAP beyond gets NOMEM.
    pub max_mappings: usize,
}

impl Default for IommuConfig {
    fn default() -> Self {
        Self {
            page_size_mask: !0xfff,
            // 48 bits, as a 4-level VT-d page table.
            input_range: (0, (1 << 48) - 1),
            domain_range: (0, u32::MAX),
            bypass: true,
            max_mappings: 1 << 18,
        }
    }
}

impl IommuConfig {
    fn validate(&self) -> Result<(), IommuError> {
        if self.page_size_mask == 0 {
            return Err(IommuError::NoPageSize);
        }
        let (start, end) = self.input_range;
        if start > end || end == u64::MAX {
            return Err(IommuError::InputRange { start, end });
        }
        let (start, end) = self.domain_range;
        if start > end {
            return Err(IommuError::DomainRange { start, end });
        }
        Ok(())
    }

    /// The mapping granule: the lowest page size.
    fn granule(&self) -> u64 {
        1 << self.page_size_mask.trailing_zeros()
    }
}

type Callback = Arc<dyn Fn() + Send + Sync>;

/// A device behind the IOMMU, as the builder hands it over.
#[derive(Clone)]
pub struct Endpoint {
    /// The handle the device was (or will be) activated with; the IOMMU swaps what is behind
    /// it.
    dma: DmaSpace,
    /// Returns once no access translated before the call can still be in progress.
    quiesce: Callback,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("dma", &self.dma).finish()
    }
}

impl Endpoint {
    pub fn new(dma: DmaSpace, quiesce: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            dma,
            quiesce: Arc::new(quiesce),
        }
    }

    /// An endpoint whose device serves DMA only under `device`'s lock (every virtio device,
    /// see the module docs): quiescing takes and releases that lock. Never the IOMMU's own.
    pub fn locked_by<D: ?Sized + Send + 'static>(dma: DmaSpace, device: Arc<Mutex<D>>) -> Self {
        Self::new(dma, move || drop(lock(&device)))
    }

    pub fn dma(&self) -> &DmaSpace {
        &self.dma
    }
}

/// Refused accesses waiting for an event buffer.
#[derive(Default)]
struct Faults {
    pending: Mutex<VecDeque<DmaFault>>,
    dropped: AtomicU64,
    reported: AtomicU64,
    notify: OnceLock<Callback>,
}

impl FaultReporter for Faults {
    fn report(&self, fault: DmaFault) {
        self.reported.fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = lock(&self.pending);
            if pending.len() >= MAX_PENDING_FAULTS {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            pending.push_back(fault);
        }
        if let Some(notify) = self.notify.get() {
            notify();
        }
    }
}

/// One mapping of a domain: `[start, end]` (inclusive, the map's key is `start`) to `phys`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub end: u64,
    pub phys: u64,
    /// `request::MAP_F_*`.
    pub flags: u32,
}

#[derive(Debug)]
struct Domain {
    bypass: bool,
    /// The domain's mappings: the one table, which devices translate through too.
    iotlb: DmaIommu,
    endpoints: BTreeSet<u32>,
}

#[derive(Debug)]
struct EndpointState {
    handle: Endpoint,
    domain: Option<u32>,
}

/// Counters for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuStats {
    pub requests: u64,
    /// Faults reported by endpoints, delivered or not.
    pub faults_reported: u64,
    pub faults_delivered: u64,
    /// Faults dropped because [`MAX_PENDING_FAULTS`] were waiting.
    pub faults_dropped: u64,
}

/// Everything but the transport-facing part, so that requests can be served while
/// `VirtioCommon` holds the queue.
struct State {
    config: IommuConfig,
    /// The config field: unattached endpoints bypass the IOMMU. Survives a device reset.
    bypass: bool,
    endpoints: BTreeMap<u32, EndpointState>,
    domains: BTreeMap<u32, Domain>,
    mapping_count: usize,
    faults: Arc<Faults>,
    requests: u64,
    delivered: u64,
}

pub struct VirtioIommu {
    common: VirtioCommon,
    state: State,
}

impl std::fmt::Debug for VirtioIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioIommu")
            .field("common", &self.common)
            .field("endpoints", &self.state.endpoints.len())
            .field("domains", &self.state.domains.len())
            .field("mappings", &self.state.mapping_count)
            .finish()
    }
}

impl VirtioIommu {
    /// An IOMMU in front of `endpoints` (PCI requester id -> handle). Their DMA spaces are set
    /// at once: identity with `config.bypass`, else no access until the guest attaches them.
    pub fn new(
        config: IommuConfig,
        endpoints: impl IntoIterator<Item = (u32, Endpoint)>,
    ) -> Result<Self, IommuError> {
        config.validate()?;
        let mut common =
            VirtioCommon::new(DEVICE_ID, vec![QUEUE_SIZE, QUEUE_SIZE], feature::OFFERED);
        // The IOMMU's own rings and buffers are guest physical: it is never behind itself.
        common.offered &= !features::ACCESS_PLATFORM;
        let mut state = State {
            bypass: config.bypass,
            config,
            endpoints: BTreeMap::new(),
            domains: BTreeMap::new(),
            mapping_count: 0,
            faults: Arc::default(),
            requests: 0,
            delivered: 0,
        };
        for (id, handle) in endpoints {
            state.add_endpoint(id, handle)?;
        }
        Ok(Self { common, state })
    }

    /// Called (from any thread, with device locks held) when a fault is waiting: the VMM wakes
    /// its event loop, which calls `process_queue(EVENT_QUEUE)`. Set once; later calls are
    /// ignored.
    pub fn set_fault_notifier(&self, notify: impl Fn() + Send + Sync + 'static) {
        if self.state.faults.notify.set(Arc::new(notify)).is_err() {
            tracing::debug!("virtio-iommu: fault notifier already set");
        }
    }

    /// Put another endpoint behind the IOMMU (an SR-IOV VF appearing), unattached.
    pub fn add_endpoint(&mut self, id: u32, endpoint: Endpoint) -> Result<(), IommuError> {
        self.state.add_endpoint(id, endpoint)
    }

    /// Take an endpoint away (a VF disappearing): detached, quiesced, left with no access.
    pub fn remove_endpoint(&mut self, id: u32) -> Result<Endpoint, IommuError> {
        self.state.remove_endpoint(id)
    }

    /// The endpoints behind the IOMMU, in order (for the VIOT table).
    pub fn endpoint_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.state.endpoints.keys().copied()
    }

    /// The domain `endpoint` is attached to.
    pub fn domain_of(&self, endpoint: u32) -> Option<u32> {
        self.state.endpoints.get(&endpoint)?.domain
    }

    /// The mappings of `domain`, by start address (a copy, for tests and inspection).
    pub fn mappings(&self, domain: u32) -> Option<BTreeMap<u64, Mapping>> {
        let d = self.state.domains.get(&domain)?;
        Some(
            d.iotlb
                .mappings()
                .into_iter()
                .map(|m| {
                    let flags = match m.perm {
                        Permissions::No => 0,
                        Permissions::Read => request::MAP_F_READ,
                        Permissions::Write => request::MAP_F_WRITE,
                        Permissions::ReadWrite => request::MAP_F_READ | request::MAP_F_WRITE,
                    };
                    let mapping = Mapping {
                        end: m.last,
                        phys: m.phys,
                        flags,
                    };
                    (m.start, mapping)
                })
                .collect(),
        )
    }

    pub fn mapping_count(&self) -> usize {
        self.state.mapping_count
    }

    /// IOTLB lookups and refusals of `domain`.
    pub fn iotlb_stats(&self, domain: u32) -> Option<IotlbStats> {
        self.state.domains.get(&domain).map(|d| d.iotlb.stats())
    }

    pub fn bypass(&self) -> bool {
        self.state.bypass
    }

    pub fn stats(&self) -> IommuStats {
        let f = &self.state.faults;
        IommuStats {
            requests: self.state.requests,
            faults_reported: f.reported.load(Ordering::Relaxed),
            faults_delivered: self.state.delivered,
            faults_dropped: f.dropped.load(Ordering::Relaxed),
        }
    }

    fn config_bytes(&self) -> [u8; config::LEN] {
        let c = &self.state.config;
        let mut b = [0u8; config::LEN];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(config::PAGE_SIZE_MASK, &c.page_size_mask.to_le_bytes());
        put(config::INPUT_START, &c.input_range.0.to_le_bytes());
        put(config::INPUT_END, &c.input_range.1.to_le_bytes());
        put(config::DOMAIN_START, &c.domain_range.0.to_le_bytes());
        put(config::DOMAIN_END, &c.domain_range.1.to_le_bytes());
        put(config::PROBE_SIZE, &PROBE_SIZE.to_le_bytes());
        put(config::BYPASS, &[u8::from(self.state.bypass)]);
        b
    }

    /// Write pending faults into the event queue's buffers, as many as there are buffers.
    fn deliver_faults(&mut self) {
        let Self { common, state } = self;
        common.serve(EVENT_QUEUE, |queue, snapshot| {
            let mut used = false;
            deliver(queue, snapshot, state, &mut used)?;
            Ok(used)
        });
    }
}

/// The event as the guest reads it.
fn fault_bytes(f: &DmaFault) -> [u8; fault::LEN] {
    let reason = match f.kind {
        FaultKind::Detached => fault::R_DOMAIN,
        FaultKind::Unmapped | FaultKind::Permission => fault::R_MAPPING,
    };
    let mut flags = fault::F_ADDRESS;
    if f.read {
        flags |= fault::F_READ;
    }
    if f.write {
        flags |= fault::F_WRITE;
    }
    let mut b = [0u8; fault::LEN];
    b[0] = reason;
    b[4..8].copy_from_slice(&flags.to_le_bytes());
    b[8..12].copy_from_slice(&f.endpoint.to_le_bytes());
    b[16..24].copy_from_slice(&f.addr.to_le_bytes());
    b
}

/// Pop event buffers while faults are pending. A malformed buffer (readable, too small, a bad
/// chain) is returned unwritten and the fault waits for the next. Out of buffers, ask the
/// driver to kick when it adds one.
fn deliver(
    queue: &mut Queue,
    dma: &DmaSnapshot,
    state: &mut State,
    used: &mut bool,
) -> Result<(), QueueError> {
    fill(
        queue,
        dma,
        state,
        used,
        |state| lock(&state.faults.pending).front().copied(),
        |state, next, chain| {
            let head = chain.head_index();
            Some(match parse_chain(chain, usize::from(QUEUE_SIZE)) {
                Ok(b) if b.readable.is_empty() && b.writable.len() >= fault::LEN as u64 => {
                    match dma.write_sg(&b.writable, &fault_bytes(&next)) {
                        Ok(_) => {
                            lock(&state.faults.pending).pop_front();
                            state.delivered += 1;
                            fault::LEN as u32
                        }
                        Err(e) => {
                            tracing::debug!(head, "virtio-iommu: event buffer: {e}");
                            0
                        }
                    }
                }
                Ok(_) => {
                    tracing::debug!(head, "virtio-iommu: event buffer is not 24 writable bytes");
                    0
                }
                Err(fault) => {
                    tracing::debug!(head, "virtio-iommu: event buffer: {}", fault.error);
                    0
                }
            })
        },
    )?;
    Ok(())
}

impl State {
    fn add_endpoint(&mut self, id: u32, handle: Endpoint) -> Result<(), IommuError> {
        if self.endpoints.contains_key(&id) {
            return Err(IommuError::DuplicateEndpoint(id));
        }
        self.endpoints.insert(
            id,
            EndpointState {
                handle,
                domain: None,
            },
        );
        self.apply(id);
        Ok(())
    }

    fn remove_endpoint(&mut self, id: u32) -> Result<Endpoint, IommuError> {
        self.leave_domain(id);
        let e = self
            .endpoints
            .remove(&id)
            .ok_or(IommuError::UnknownEndpoint(id))?;
        // An IOTLB nobody maps into and no reporter: every access refused, silently.
        e.handle.dma.set_translation(Some(DmaIommu::new()));
        (e.handle.quiesce)();
        Ok(e.handle)
    }

    /// What endpoint `id` translates through in its current state (`None`: identity).
    fn translation(&self, id: u32, domain: Option<u32>) -> Option<DmaIommu> {
        let reporter: Arc<dyn FaultReporter> = self.faults.clone();
        match domain.and_then(|d| self.domains.get(&d)) {
            Some(d) if d.bypass => None,
            Some(d) => Some(d.iotlb.for_endpoint(id, reporter)),
            None if self.bypass => None,
            None => Some(DmaIommu::detached(id, reporter)),
        }
    }

    /// Point endpoint `id`'s DMA space at what its state says, then wait until nothing can
    /// use the old translation.
    fn apply(&self, id: u32) {
        let Some(e) = self.endpoints.get(&id) else {
            return;
        };
        e.handle.dma.set_translation(self.translation(id, e.domain));
        (e.handle.quiesce)();
    }

    /// Take `id` out of its domain (state only), dropping the domain if it was the last one.
    fn leave_domain(&mut self, id: u32) {
        let Some(e) = self.endpoints.get_mut(&id) else {
            return;
        };
        let Some(old) = e.domain.take() else {
            return;
        };
        if let Some(d) = self.domains.get_mut(&old) {
            d.endpoints.remove(&id);
            if d.endpoints.is_empty() {
                self.mapping_count -= d.iotlb.len();
                self.domains.remove(&old);
            }
        }
    }

    fn set_bypass(&mut self, bypass: bool) {
        if bypass == self.bypass {
            return;
        }
        self.bypass = bypass;
        let unattached: Vec<u32> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.domain.is_none())
            .map(|(&id, _)| id)
            .collect();
        for id in unattached {
            self.apply(id);
        }
    }

    /// Device reset: every endpoint detached, every domain gone, pending faults dropped.
    fn reset(&mut self) {
        self.domains.clear();
        self.mapping_count = 0;
        let ids: Vec<u32> = self.endpoints.keys().copied().collect();
        for id in ids {
            if let Some(e) = self.endpoints.get_mut(&id) {
                e.domain = None;
            }
            self.apply(id);
        }
        lock(&self.faults.pending).clear();
    }
}

impl VirtioDevice for VirtioIommu {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `bypass` is writable, with BYPASS_CONFIG, and only to 0 or 1.
        let bypass_write = offset == config::BYPASS as u64 && data.len() == 1;
        if !bypass_write || !self.common.has_feature(feature::BYPASS_CONFIG) || data[0] > 1 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-iommu: config write ignored"
            );
            return;
        }
        self.state.set_bypass(data[0] == 1);
    }

    fn reset(&mut self) {
        self.common.reset();
        self.state.reset();
    }

    fn process_queue(&mut self, queue: u16) {
        if queue == REQUEST_QUEUE {
            let acked = self.common.acked_features();
            let Self { common, state } = self;
            common.process_queue(queue, |dma, chain| {
                state.requests += 1;
                request::handle_chain(state, acked, dma, chain)
            });
        }
        // Faults may be waiting whichever queue was kicked (or none: the fault notifier).
        self.deliver_faults();
    }
}
