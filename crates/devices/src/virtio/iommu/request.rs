//! Requests on the request queue (virtio 1.2, 5.13.6): framing, validation and the effect of
//! ATTACH, DETACH, MAP, UNMAP and PROBE on the domains and the endpoints' DMA spaces.
//!
//! Framing: the readable part is the head and the request's fields (extra bytes are ignored:
//! future fields); the writable part ends with the 4-byte tail, and for PROBE starts with
//! exactly `probe_size` bytes of properties. A chain that cannot be parsed or has no room for
//! the tail, an unknown type and PROBE without its feature are returned unwritten (used length
//! 0), as the spec asks.

use vm_memory::Permissions;

use super::{Domain, MSI_END, MSI_START, PROBE_SIZE, QUEUE_SIZE, State, Status, feature};
use crate::virtio::dma::{DmaIommu, DmaSnapshot};
use crate::virtio::queue::{Chain, parse_chain};

pub const T_ATTACH: u8 = 1;
pub const T_DETACH: u8 = 2;
pub const T_MAP: u8 = 3;
pub const T_UNMAP: u8 = 4;
pub const T_PROBE: u8 = 5;

pub const ATTACH_F_BYPASS: u32 = 1 << 0;
pub const MAP_F_READ: u32 = 1 << 0;
pub const MAP_F_WRITE: u32 = 1 << 1;
pub const MAP_F_MMIO: u32 = 1 << 2;

pub const PROBE_T_RESV_MEM: u16 = 1;
pub const RESV_MEM_T_MSI: u8 = 1;

const TAIL_LEN: u64 = 4;
/// Readable bytes of each request type, head included.
const ATTACH_LEN: usize = 20;
const DETACH_LEN: usize = 20;
const MAP_LEN: usize = 36;
const UNMAP_LEN: usize = 28;
const PROBE_LEN: usize = 72;
/// Readable bytes read at most (the longest request).
const MAX_LEN: usize = PROBE_LEN;

/// What to return for a request.
enum Outcome {
    /// Nothing written, used length 0.
    Discard,
    Status(Status),
    /// Properties, then `OK` in the tail.
    Probe(Vec<u8>),
}

/// Little-endian fields of a request.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u32(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_le_bytes(b)
    }

    fn u64(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(b)
    }

    fn zero(&self, at: usize, len: usize) -> bool {
        self.0[at..at + len].iter().all(|&b| b == 0)
    }
}

/// Serve one request chain; returns the used length.
pub(super) fn handle_chain(
    state: &mut State,
    acked: u64,
    dma: &DmaSnapshot,
    chain: Chain<'_>,
) -> u32 {
    let head = chain.head_index();
    let bufs = match parse_chain(chain, usize::from(QUEUE_SIZE)) {
        Ok(b) => b,
        Err(fault) => {
            tracing::debug!(head, "virtio-iommu: request chain: {}", fault.error);
            return 0;
        }
    };
    let wlen = bufs.writable.len();
    if wlen < TAIL_LEN {
        tracing::debug!(head, wlen, "virtio-iommu: no room for the request's tail");
        return 0;
    }
    let mut req = [0u8; MAX_LEN];
    let rlen = usize::try_from(bufs.readable.len())
        .unwrap_or(MAX_LEN)
        .min(MAX_LEN);
    let outcome = match dma.read_sg(&bufs.readable, &mut req[..rlen]) {
        Ok(n) => execute(state, acked, &req[..n], wlen - TAIL_LEN),
        Err(e) => {
            tracing::debug!(head, "virtio-iommu: request: {e}");
            Outcome::Status(Status::IoErr)
        }
    };
    let status = match outcome {
        Outcome::Discard => return 0,
        Outcome::Status(s) => s,
        Outcome::Probe(props) => {
            if let Err(e) = dma.write_sg(&bufs.writable, &props) {
                tracing::debug!(head, "virtio-iommu: probe properties: {e}");
                return 0;
            }
            Status::Ok
        }
    };
    if status != Status::Ok {
        tracing::debug!(head, ?status, "virtio-iommu: request refused");
    }
    let mut tail = bufs.writable.clone();
    let tail = tail.split_off(wlen - TAIL_LEN);
    if let Err(e) = dma.write_sg(&tail, &[status as u8, 0, 0, 0]) {
        tracing::debug!(head, "virtio-iommu: request tail: {e}");
        return 0;
    }
    // The driver checks that the whole writable part came back.
    u32::try_from(wlen).unwrap_or(u32::MAX)
}

/// Decode and carry out one request. `props_len` is the writable room before the tail.
fn execute(state: &mut State, acked: u64, req: &[u8], props_len: u64) -> Outcome {
    let Some(&kind) = req.first() else {
        return Outcome::Status(Status::IoErr);
    };
    if req.len() < 4 {
        return Outcome::Status(Status::IoErr);
    }
    let need = match kind {
        T_ATTACH => ATTACH_LEN,
        T_DETACH => DETACH_LEN,
        T_MAP => MAP_LEN,
        T_UNMAP => UNMAP_LEN,
        T_PROBE if acked & feature::PROBE != 0 => PROBE_LEN,
        _ => {
            tracing::debug!(kind, "virtio-iommu: unknown request type");
            return Outcome::Discard;
        }
    };
    if req.len() < need {
        return Outcome::Status(Status::Inval);
    }
    let f = Fields(req);
    let status = match kind {
        T_ATTACH => state.attach(acked, f.u32(4), f.u32(8), f.u32(12), f.zero(16, 4)),
        T_DETACH => state.detach(f.u32(4), f.u32(8)),
        T_MAP => state.map(acked, f.u32(4), f.u64(8), f.u64(16), f.u64(24), f.u32(32)),
        T_UNMAP => state.unmap(acked, f.u32(4), f.u64(8), f.u64(16), f.zero(24, 4)),
        _ => return state.probe(f.u32(4), props_len),
    };
    Outcome::Status(status)
}

fn ranges_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

fn permissions(flags: u32) -> Permissions {
    match (flags & MAP_F_READ != 0, flags & MAP_F_WRITE != 0) {
        (true, true) => Permissions::ReadWrite,
        (true, false) => Permissions::Read,
        (false, true) => Permissions::Write,
        (false, false) => Permissions::No,
    }
}

impl State {
    fn domain_in_range(&self, domain: u32) -> bool {
        let (start, end) = self.config.domain_range;
        (start..=end).contains(&domain)
    }

    fn attach(
        &mut self,
        acked: u64,
        domain: u32,
        endpoint: u32,
        flags: u32,
        reserved_zero: bool,
    ) -> Status {
        let known = if acked & feature::BYPASS_CONFIG != 0 {
            ATTACH_F_BYPASS
        } else {
            0
        };
        if !reserved_zero || flags & !known != 0 {
            return Status::Inval;
        }
        let Some(current) = self.endpoints.get(&endpoint).map(|e| e.domain) else {
            return Status::NoEnt;
        };
        if !self.domain_in_range(domain) {
            return Status::Range;
        }
        let bypass = flags & ATTACH_F_BYPASS != 0;
        if let Some(d) = self.domains.get(&domain) {
            if d.bypass != bypass {
                return Status::Inval;
            }
        }
        if current == Some(domain) {
            return Status::Ok;
        }
        // As a DETACH followed by the ATTACH (the old domain goes if this was its last one).
        self.leave_domain(endpoint);
        let d = self.domains.entry(domain).or_insert_with(|| Domain {
            bypass,
            iotlb: DmaIommu::new(),
            endpoints: Default::default(),
        });
        d.endpoints.insert(endpoint);
        if let Some(e) = self.endpoints.get_mut(&endpoint) {
            e.domain = Some(domain);
        }
        self.apply(endpoint);
        Status::Ok
    }

    fn detach(&mut self, domain: u32, endpoint: u32) -> Status {
        let Some(e) = self.endpoints.get(&endpoint) else {
            return Status::NoEnt;
        };
        if e.domain != Some(domain) {
            return Status::Inval;
        }
        self.leave_domain(endpoint);
        self.apply(endpoint);
        Status::Ok
    }

    fn map(
        &mut self,
        acked: u64,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
    ) -> Status {
        if acked & feature::MAP_UNMAP == 0 {
            return Status::Unsupp;
        }
        // MMIO is a flag of a feature not offered: unrecognised like any other.
        if flags & !(MAP_F_READ | MAP_F_WRITE) != 0 || virt_end < virt_start {
            return Status::Inval;
        }
        if !self.domain_in_range(domain) {
            return Status::Range;
        }
        let Some(d) = self.domains.get(&domain) else {
            return Status::NoEnt;
        };
        if d.bypass {
            return Status::Inval;
        }
        let granule = self.config.granule();
        // virt_end + 1 wraps to 0 (aligned) only at u64::MAX, which the input range refuses.
        let aligned = |v: u64| v % granule == 0;
        if !aligned(virt_start) || !aligned(phys_start) || !aligned(virt_end.wrapping_add(1)) {
            return Status::Range;
        }
        let (in_start, in_end) = self.config.input_range;
        if virt_start < in_start || virt_end > in_end {
            return Status::Range;
        }
        // Inside the input range, whose end is below u64::MAX: the length fits.
        let len = virt_end - virt_start + 1;
        if phys_start.checked_add(len - 1).is_none() {
            return Status::Range;
        }
        if ranges_overlap((virt_start, virt_end), (MSI_START, MSI_END)) {
            return Status::Inval;
        }
        if !d.iotlb.overlapping(virt_start, virt_end).is_empty() {
            return Status::Inval;
        }
        if self.mapping_count >= self.config.max_mappings {
            return Status::NoMem;
        }
        let Some(ep) = d.endpoints.first().and_then(|id| self.endpoints.get(id)) else {
            return Status::DevErr;
        };
        // Only guest RAM can be mapped (MMIO mappings are not offered). Checked in the IOMMU's
        // own view of guest memory: any endpoint's handle has the same physical memory.
        if !phys_is_ram(&ep.handle, phys_start, len) {
            return Status::Fault;
        }
        if let Err(e) = d.iotlb.map(virt_start, phys_start, len, permissions(flags)) {
            tracing::warn!("virtio-iommu: table refused a checked mapping: {e}");
            return Status::DevErr;
        }
        self.mapping_count += 1;
        Status::Ok
    }

    fn unmap(
        &mut self,
        acked: u64,
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        reserved_zero: bool,
    ) -> Status {
        if acked & feature::MAP_UNMAP == 0 {
            return Status::Unsupp;
        }
        if !reserved_zero || virt_end < virt_start {
            return Status::Inval;
        }
        if !self.domain_in_range(domain) {
            return Status::Range;
        }
        let Some(d) = self.domains.get_mut(&domain) else {
            return Status::NoEnt;
        };
        if d.bypass {
            return Status::Inval;
        }
        // Every mapping the range touches; refuse before removing any if one would be split.
        let hit = d.iotlb.overlapping(virt_start, virt_end);
        if hit
            .iter()
            .any(|m| m.start < virt_start || m.last > virt_end)
        {
            return Status::Range;
        }
        if hit.is_empty() {
            return Status::Ok;
        }
        // Each mapping is within the input range, so its length fits and does not wrap (the
        // request's range may run to u64::MAX, and so may not).
        for m in &hit {
            if let Err(e) = d.iotlb.unmap(m.start, m.last - m.start + 1) {
                tracing::warn!("virtio-iommu: table refused an unmap: {e}");
            }
        }
        self.mapping_count -= hit.len();
        // The table no longer translates the range; wait for accesses that already did.
        let ids: Vec<u32> = d.endpoints.iter().copied().collect();
        for id in ids {
            if let Some(e) = self.endpoints.get(&id) {
                (e.handle.quiesce)();
            }
        }
        Status::Ok
    }

    fn probe(&self, endpoint: u32, props_len: u64) -> Outcome {
        if props_len != u64::from(PROBE_SIZE) {
            return Outcome::Status(Status::Inval);
        }
        if !self.endpoints.contains_key(&endpoint) {
            return Outcome::Status(Status::NoEnt);
        }
        // One RESV_MEM property (4-byte header, 20 bytes of value): the MSI doorbells. The
        // rest stays zero, which ends the list.
        let mut props = vec![0u8; PROBE_SIZE as usize];
        props[0..2].copy_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
        props[2..4].copy_from_slice(&20u16.to_le_bytes());
        props[4] = RESV_MEM_T_MSI;
        props[8..16].copy_from_slice(&MSI_START.to_le_bytes());
        props[16..24].copy_from_slice(&MSI_END.to_le_bytes());
        Outcome::Probe(props)
    }
}

/// Whether `[phys, phys+len)` is guest RAM, seen through the endpoint's guest memory.
fn phys_is_ram(endpoint: &super::Endpoint, phys: u64, len: u64) -> bool {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let snapshot = endpoint.dma.snapshot();
    let phys_mem = snapshot.memory().get_backend();
    usize::try_from(len).is_ok_and(|n| phys_mem.check_range(GuestAddress(phys), n))
}
