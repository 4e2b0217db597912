//! virtio-iommu: request chains built from fuzz bytes (mostly well-formed requests with
//! interesting fields, sometimes raw bytes and odd framing), config writes, resets and event
//! buffers, with three endpoints behind the device.
//!
//! A shadow model of the spec's rules (domains, mappings, attachments, bypass) predicts the
//! used length and status of every request. After every step the device's tables must equal
//! the shadow's, each endpoint's `DmaSpace` must reach exactly the addresses the shadow says
//! (reading the same bytes as guest memory at the mapped GPA), an UNMAP or DETACH that took
//! access away must have quiesced the endpoints concerned, and fault events must be
//! well-formed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::Input;
use super::virtq::{HIGH, Interrupts, LOW, guest_memory};
use crate::virtio::dma::{Access, PhysMemory};
use crate::virtio::iommu::request::{
    ATTACH_F_BYPASS, MAP_F_READ, MAP_F_WRITE, T_ATTACH, T_DETACH, T_MAP, T_PROBE, T_UNMAP,
};
use crate::virtio::iommu::{
    EVENT_QUEUE, Endpoint, IommuConfig, MSI_END, MSI_START, PROBE_SIZE, REQUEST_QUEUE, Status,
    VirtioIommu, config, fault, feature,
};
use crate::virtio::{DmaSpace, VirtioDevice, features};

const QSIZE: u16 = 8;
const REQ: u64 = 0x1000;
const RESP: u64 = 0x2000;
const EVENTS: u64 = 0x3000;
const ENDPOINTS: [u32; 3] = [0, 8, 0x100];

/// A split queue of 8 laid out by hand.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn new(mem: &PhysMemory, base: u64) -> Self {
        let _ = mem.write_slice(&[0u8; 0x300], GuestAddress(base));
        Self {
            desc: base,
            avail: base + 0x100,
            used: base + 0x200,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).expect("queue size");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Chain `descs` (address, length, device-writable) and make it available.
    fn push(&mut self, mem: &PhysMemory, descs: &[(u64, u32, bool)]) {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let index = (head + i as u16) % QSIZE;
            let next = (index + 1) % QSIZE;
            let mut flags = if write { 2u16 } else { 0 };
            if i + 1 < descs.len() {
                flags |= 1;
            }
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            let _ = mem.write_slice(&d, GuestAddress(self.desc + 16 * u64::from(index)));
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        let slot = u64::from(self.avail_idx % QSIZE);
        let _ = mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
    }

    fn used_idx(&self, mem: &PhysMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0)
    }

    /// (head, length) of used entry `i`.
    fn used(&self, mem: &PhysMemory, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % QSIZE);
        let id = mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX);
        let len = mem.read_obj(GuestAddress(at + 4)).unwrap_or(u32::MAX);
        (id, len)
    }
}

fn in_ram(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    [LOW, HIGH]
        .iter()
        .any(|&(start, size)| addr >= start && end <= start + size)
}

/// start -> (end, phys, flags)
type Maps = BTreeMap<u64, (u64, u64, u32)>;

/// The spec's rules, written out again.
struct Shadow {
    config: IommuConfig,
    bypass: bool,
    acked: u64,
    attached: BTreeMap<u32, Option<u32>>,
    /// domain -> (bypass domain, start -> (end, phys, flags))
    domains: BTreeMap<u32, (bool, Maps)>,
}

/// What a request must come back with.
struct Expect {
    len: u32,
    status: Option<u8>,
    /// Endpoints that must have been quiesced.
    quiesced: Vec<u32>,
}

impl Shadow {
    fn count(&self) -> usize {
        self.domains.values().map(|(_, m)| m.len()).sum()
    }

    fn leave(&mut self, ep: u32) {
        if let Some(Some(old)) = self.attached.insert(ep, None) {
            if !self.attached.values().any(|d| *d == Some(old)) {
                self.domains.remove(&old);
            }
        }
    }

    fn exec(&mut self, req: &[u8], wlen: u64) -> Expect {
        let discard = Expect {
            len: 0,
            status: None,
            quiesced: Vec::new(),
        };
        if wlen < 4 {
            return discard;
        }
        let mut quiesced = Vec::new();
        let status = self.status(req, wlen - 4, &mut quiesced);
        match status {
            None => discard,
            Some(s) => Expect {
                len: u32::try_from(wlen).unwrap_or(u32::MAX),
                status: Some(s as u8),
                quiesced,
            },
        }
    }

    fn status(&mut self, req: &[u8], props: u64, quiesced: &mut Vec<u32>) -> Option<Status> {
        if req.len() < 4 {
            return Some(Status::IoErr);
        }
        let need = match req[0] {
            T_ATTACH | T_DETACH => 20,
            T_MAP => 36,
            T_UNMAP => 28,
            T_PROBE if self.acked & feature::PROBE != 0 => 72,
            _ => return None,
        };
        if req.len() < need {
            return Some(Status::Inval);
        }
        let u32_at = |at: usize| u32::from_le_bytes(req[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_le_bytes(req[at..at + 8].try_into().unwrap_or([0; 8]));
        let (dmin, dmax) = self.config.domain_range;
        let in_range = |d: u32| d >= dmin && d <= dmax;
        let map_unmap = self.acked & feature::MAP_UNMAP != 0;
        Some(match req[0] {
            T_ATTACH => {
                let (domain, ep, flags) = (u32_at(4), u32_at(8), u32_at(12));
                let known = if self.acked & feature::BYPASS_CONFIG != 0 {
                    ATTACH_F_BYPASS
                } else {
                    0
                };
                let bypass = flags & ATTACH_F_BYPASS != 0;
                if req[16..20] != [0; 4] || flags & !known != 0 {
                    Status::Inval
                } else if !self.attached.contains_key(&ep) {
                    Status::NoEnt
                } else if !in_range(domain) {
                    Status::Range
                } else if self.domains.get(&domain).is_some_and(|d| d.0 != bypass) {
                    Status::Inval
                } else {
                    if self.attached[&ep] != Some(domain) {
                        self.leave(ep);
                        self.domains
                            .entry(domain)
                            .or_insert((bypass, BTreeMap::new()));
                        self.attached.insert(ep, Some(domain));
                        quiesced.push(ep);
                    }
                    Status::Ok
                }
            }
            T_DETACH => {
                let (domain, ep) = (u32_at(4), u32_at(8));
                match self.attached.get(&ep) {
                    None => Status::NoEnt,
                    Some(d) if *d != Some(domain) => Status::Inval,
                    Some(_) => {
                        self.leave(ep);
                        quiesced.push(ep);
                        Status::Ok
                    }
                }
            }
            T_MAP => {
                let (domain, start, end, phys, flags) =
                    (u32_at(4), u64_at(8), u64_at(16), u64_at(24), u32_at(32));
                let granule = 1u64 << self.config.page_size_mask.trailing_zeros();
                let (imin, imax) = self.config.input_range;
                let count = self.count();
                if !map_unmap {
                    Status::Unsupp
                } else if flags & !(MAP_F_READ | MAP_F_WRITE) != 0 || end < start {
                    Status::Inval
                } else if !in_range(domain) {
                    Status::Range
                } else {
                    match self.domains.get_mut(&domain) {
                        None => Status::NoEnt,
                        Some((true, _)) => Status::Inval,
                        Some((false, maps)) => {
                            let len = end.wrapping_sub(start).wrapping_add(1);
                            if start % granule != 0
                                || phys % granule != 0
                                || end.wrapping_add(1) % granule != 0
                                || start < imin
                                || end > imax
                                || phys.checked_add(len - 1).is_none()
                            {
                                Status::Range
                            } else if start <= MSI_END && MSI_START <= end
                                || maps.iter().any(|(&s, m)| s <= end && start <= m.0)
                            {
                                Status::Inval
                            } else if count >= self.config.max_mappings {
                                Status::NoMem
                            } else if !in_ram(phys, len) {
                                Status::Fault
                            } else {
                                maps.insert(start, (end, phys, flags));
                                Status::Ok
                            }
                        }
                    }
                }
            }
            T_UNMAP => {
                let (domain, start, end) = (u32_at(4), u64_at(8), u64_at(16));
                let attached: Vec<u32> = self
                    .attached
                    .iter()
                    .filter(|(_, d)| **d == Some(domain))
                    .map(|(&e, _)| e)
                    .collect();
                if !map_unmap {
                    Status::Unsupp
                } else if req[24..28] != [0; 4] || end < start {
                    Status::Inval
                } else if !in_range(domain) {
                    Status::Range
                } else {
                    match self.domains.get_mut(&domain) {
                        None => Status::NoEnt,
                        Some((true, _)) => Status::Inval,
                        Some((false, maps)) => {
                            let hit: Vec<u64> = maps
                                .iter()
                                .filter(|(s, m)| **s <= end && start <= m.0)
                                .map(|(&s, _)| s)
                                .collect();
                            if hit.iter().any(|s| *s < start || maps[s].0 > end) {
                                Status::Range
                            } else {
                                if !hit.is_empty() {
                                    quiesced.extend(attached);
                                }
                                for s in hit {
                                    maps.remove(&s);
                                }
                                Status::Ok
                            }
                        }
                    }
                }
            }
            _ => {
                if props != u64::from(PROBE_SIZE) {
                    Status::Inval
                } else if !self.attached.contains_key(&u32_at(4)) {
                    Status::NoEnt
                } else {
                    Status::Ok
                }
            }
        })
    }

    /// Whether endpoint `ep` may access `addr` (one byte), and the GPA it reaches.
    fn reach(&self, ep: u32, addr: u64, access: Access) -> Option<u64> {
        let identity = in_ram(addr, 1).then_some(addr);
        match self.attached.get(&ep).copied().flatten() {
            None if self.bypass => identity,
            None => None,
            Some(d) => match self.domains.get(&d) {
                Some((true, _)) => identity,
                Some((false, maps)) => {
                    let (&s, &(end, phys, flags)) = maps.range(..=addr).next_back()?;
                    let want = match access {
                        Access::Read => MAP_F_READ,
                        Access::Write => MAP_F_WRITE,
                    };
                    (addr <= end && flags & want != 0).then(|| phys + (addr - s))
                }
                None => None,
            },
        }
    }
}

/// An IOVA: mostly a small page number, sometimes anything.
fn iova(input: &mut Input, granule: u64) -> u64 {
    match input.u8() % 16 {
        0 => input.u64(),
        1 => MSI_START,
        2 => (1 << 48) - granule,
        n => u64::from(n % 12) * granule.max(0x1000),
    }
}

/// A guest physical address: mostly a page of RAM.
fn phys(input: &mut Input) -> u64 {
    match input.u8() % 8 {
        0 => input.u64() & !0xfff,
        1 => HIGH.0 + 0x1000 * u64::from(input.u8() % 3),
        2 => 0x1_8000,
        _ => 0x1000 * u64::from(input.u8() % 18),
    }
}

fn request(input: &mut Input, granule: u64) -> Vec<u8> {
    let domain = u32::from(input.u8() % 6);
    let ep = if input.u8() % 8 == 0 {
        input.u32()
    } else {
        ENDPOINTS[usize::from(input.u8()) % 3]
    };
    let kind = input.pick(&[
        T_ATTACH, T_DETACH, T_MAP, T_MAP, T_MAP, T_UNMAP, T_UNMAP, T_PROBE,
    ]);
    let mut r = vec![kind, 0, 0, 0];
    if input.u8() % 16 == 0 {
        r[1] = input.u8();
    }
    match kind {
        T_ATTACH => {
            r.extend(domain.to_le_bytes());
            r.extend(ep.to_le_bytes());
            let flags = if input.u8() % 4 == 0 {
                u32::from(input.u8() % 4)
            } else {
                0
            };
            r.extend(flags.to_le_bytes());
            r.extend([0, 0, 0, u8::from(input.u8() % 16 == 0)]);
        }
        T_DETACH => {
            r.extend(domain.to_le_bytes());
            r.extend(ep.to_le_bytes());
            r.extend([u8::from(input.u8() % 8 == 0); 8]);
        }
        T_MAP | T_UNMAP => {
            r.extend(domain.to_le_bytes());
            let start = iova(input, granule);
            let pages = u64::from(input.u8() % 5);
            let end = match input.u8() % 8 {
                0 => input.u64(),
                1 => start.wrapping_add(granule * pages),
                _ => start.wrapping_add(granule * (pages + 1)).wrapping_sub(1),
            };
            r.extend(start.to_le_bytes());
            r.extend(end.to_le_bytes());
            if kind == T_MAP {
                r.extend(phys(input).to_le_bytes());
                let flags = if input.u8() % 16 == 0 {
                    input.u32()
                } else {
                    u32::from(input.u8() % 4)
                };
                r.extend(flags.to_le_bytes());
            } else {
                r.extend([0, 0, u8::from(input.u8() % 16 == 0), 0]);
            }
        }
        _ => {
            r.extend(ep.to_le_bytes());
            r.extend([0u8; 64]);
        }
    }
    r
}

/// Drive virtio-iommu from the input.
pub fn virtio_iommu(data: &[u8]) {
    run(data);
}

/// The harness; returns the number of requests that came back OK.
fn run(data: &[u8]) -> usize {
    let mut input = Input::new(data);
    let opts = input.u8();
    let dmin = u32::from(input.u8() % 3);
    let config = IommuConfig {
        page_size_mask: [!0xfff, !0, 0x20_1000][usize::from(opts >> 5) % 3],
        domain_range: (dmin, dmin + u32::from(input.u8() % 6)),
        bypass: opts & 1 != 0,
        max_mappings: 1 + usize::from(input.u8() % 12),
        ..IommuConfig::default()
    };
    let granule = 1u64 << config.page_size_mask.trailing_zeros();
    let acked = if opts & 2 != 0 { input.u64() } else { u64::MAX }
        & (feature::OFFERED | features::RING_EVENT_IDX)
        | features::VERSION_1;
    let mem = guest_memory();
    let quiesces: Vec<Arc<AtomicU32>> = ENDPOINTS.iter().map(|_| Arc::default()).collect();
    let spaces: Vec<DmaSpace> = ENDPOINTS
        .iter()
        .map(|_| DmaSpace::identity(mem.clone()))
        .collect();
    let endpoints = ENDPOINTS
        .iter()
        .zip(&spaces)
        .zip(&quiesces)
        .map(|((&id, dma), q)| {
            let q = q.clone();
            let ep = Endpoint::new(dma.clone(), move || {
                q.fetch_add(1, Ordering::SeqCst);
            });
            (id, ep)
        });
    let Ok(mut dev) = VirtioIommu::new(config.clone(), endpoints) else {
        panic!("a valid config was refused");
    };
    let mut shadow = Shadow {
        bypass: config.bypass,
        config,
        acked: acked & dev.offered_features(),
        attached: ENDPOINTS.iter().map(|&e| (e, None)).collect(),
        domains: BTreeMap::new(),
    };
    let irq = Arc::new(Interrupts::default());
    let activate = |dev: &mut VirtioIommu| {
        let req = Ring::new(&mem, 0);
        let evt = Ring::new(&mem, 0x400);
        dev.ack_features(acked);
        dev.activate(
            vec![req.queue(), evt.queue()],
            irq.clone(),
            DmaSpace::identity(mem.clone()),
        )
        .expect("activation");
        (req, evt)
    };
    let (mut req_ring, mut evt_ring) = activate(&mut dev);
    let mut events_seen = 0u16;
    let mut ok = 0;
    let mut steps = 0;
    while !input.is_empty() && steps < 128 {
        steps += 1;
        let before: Vec<u32> = quiesces.iter().map(|q| q.load(Ordering::SeqCst)).collect();
        let mut must_quiesce = Vec::new();
        match input.u8() % 10 {
            0..=5 => {
                // A request: mostly well-formed, sometimes raw bytes or odd lengths.
                let bytes = if input.u8() % 8 == 0 {
                    input.bytes(80).to_vec()
                } else {
                    request(&mut input, granule)
                };
                let rlen = match input.u8() % 8 {
                    0 => bytes.len().saturating_sub(usize::from(input.u8() % 8)),
                    _ => bytes.len(),
                };
                let natural = if bytes.first() == Some(&T_PROBE) {
                    u64::from(PROBE_SIZE) + 4
                } else {
                    4
                };
                let wlen = match input.u8() % 8 {
                    0 => u64::from(input.u8() % 9),
                    1 => natural + u64::from(input.u8() % 8),
                    _ => natural,
                };
                let _ = mem.write_slice(&bytes[..rlen], GuestAddress(REQ));
                let _ = mem.write_slice(&[0xee; 0x300], GuestAddress(RESP));
                let mut chain = vec![(REQ, rlen as u32, false)];
                if wlen > 0 {
                    chain.push((RESP, wlen as u32, true));
                }
                let before_used = req_ring.used_idx(&mem);
                req_ring.push(&mem, &chain);
                dev.process_queue(REQUEST_QUEUE);
                let expect = shadow.exec(&bytes[..rlen.min(72)], wlen);
                assert_eq!(req_ring.used_idx(&mem), before_used.wrapping_add(1));
                let (_, len) = req_ring.used(&mem, before_used);
                assert_eq!(len, expect.len, "used length of {bytes:02x?}");
                let mut tail = [0u8; 4];
                if wlen >= 4 {
                    let _ = mem.read_slice(&mut tail, GuestAddress(RESP + wlen - 4));
                }
                match expect.status {
                    Some(s) => {
                        assert_eq!(tail, [s, 0, 0, 0], "status of {bytes:02x?}");
                        ok += usize::from(s == 0);
                        if bytes.first() == Some(&T_PROBE) && s == 0 {
                            let mut p = [0u8; 24];
                            let _ = mem.read_slice(&mut p, GuestAddress(RESP));
                            assert_eq!(p[0..4], [1, 0, 20, 0], "probe property");
                        }
                    }
                    None if wlen >= 4 => assert_eq!(tail, [0xee; 4], "untouched tail"),
                    None => {}
                }
                must_quiesce = expect.quiesced;
            }
            6 => {
                let v = input.u8() % 3;
                let len = if input.u8() % 4 == 0 { 2 } else { 1 };
                dev.write_config(config::BYPASS as u64, &[v, 0][..len]);
                if len == 1 && v <= 1 && shadow.acked & feature::BYPASS_CONFIG != 0 {
                    shadow.bypass = v == 1;
                }
            }
            7 => {
                // Event buffers, sometimes too small or readable.
                for _ in 0..=input.u8() % 3 {
                    // A driver never has more buffers out than the queue holds.
                    if evt_ring.avail_idx.wrapping_sub(evt_ring.used_idx(&mem)) >= QSIZE {
                        break;
                    }
                    let i = u64::from(evt_ring.next_desc);
                    let (len, write) = match input.u8() % 8 {
                        0 => (8, true),
                        1 => (24, false),
                        _ => (24, true),
                    };
                    evt_ring.push(&mem, &[(EVENTS + 32 * i, len, write)]);
                }
                dev.process_queue(EVENT_QUEUE);
            }
            8 => {
                dev.reset();
                shadow.domains.clear();
                for d in shadow.attached.values_mut() {
                    *d = None;
                }
                must_quiesce = ENDPOINTS.to_vec();
                (req_ring, evt_ring) = activate(&mut dev);
                events_seen = 0;
            }
            _ => {
                // Probe endpoints' DMA at addresses from the input (checked below too).
                let addr = iova(&mut input, granule);
                for (i, dma) in spaces.iter().enumerate() {
                    let s = dma.snapshot();
                    let want = shadow.reach(ENDPOINTS[i], addr, Access::Write).is_some();
                    assert_eq!(s.check(addr, 1, Access::Write).is_ok(), want);
                }
            }
        }
        assert!(!irq.take().1, "the IOMMU asked for a reset");
        // Tables and attachments as the shadow has them.
        assert_eq!(dev.bypass(), shadow.bypass);
        for &ep in &ENDPOINTS {
            assert_eq!(dev.domain_of(ep), shadow.attached[&ep], "domain of {ep}");
        }
        assert_eq!(dev.mapping_count(), shadow.count());
        for (d, (_, maps)) in &shadow.domains {
            let got = dev.mappings(*d).expect("domain exists");
            let got: Vec<_> = got
                .iter()
                .map(|(&s, m)| (s, m.end, m.phys, m.flags))
                .collect();
            let want: Vec<_> = maps.iter().map(|(&s, m)| (s, m.0, m.1, m.2)).collect();
            assert_eq!(got, want, "mappings of domain {d}");
        }
        for (i, &ep) in ENDPOINTS.iter().enumerate() {
            if must_quiesce.contains(&ep) {
                assert!(
                    quiesces[i].load(Ordering::SeqCst) > before[i],
                    "endpoint {ep} not quiesced"
                );
            }
        }
        // Each endpoint reaches what the shadow says, and the right bytes.
        let addrs = [
            iova(&mut input, granule),
            iova(&mut input, granule).wrapping_add(0x7ff),
        ];
        for (i, dma) in spaces.iter().enumerate() {
            let s = dma.snapshot();
            for &addr in &addrs {
                let read = shadow.reach(ENDPOINTS[i], addr, Access::Read);
                assert_eq!(s.check(addr, 1, Access::Read).is_ok(), read.is_some());
                if let Some(gpa) = read {
                    let want: u8 = mem.read_obj(GuestAddress(gpa)).expect("mapped RAM");
                    assert_eq!(s.read_obj::<u8>(addr).ok(), Some(want));
                }
                let write = shadow.reach(ENDPOINTS[i], addr, Access::Write).is_some();
                assert_eq!(s.check(addr, 1, Access::Write).is_ok(), write);
            }
        }
        // Events written are well-formed.
        let used = evt_ring.used_idx(&mem);
        while events_seen != used {
            let (head, len) = evt_ring.used(&mem, events_seen);
            events_seen = events_seen.wrapping_add(1);
            if len == 0 {
                continue;
            }
            assert_eq!(len, fault::LEN as u32);
            let mut e = [0u8; 24];
            let _ = mem.read_slice(&mut e, GuestAddress(EVENTS + 32 * u64::from(head)));
            assert!(e[0] == fault::R_DOMAIN || e[0] == fault::R_MAPPING);
            let flags = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            assert!(flags & fault::F_ADDRESS != 0 && flags & !0x103 == 0);
            let ep = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
            assert!(ENDPOINTS.contains(&ep), "fault from endpoint {ep}");
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_inputs() {
        crate::fuzzing::tests::run(virtio_iommu, 0x10_3333_0000_0001, 800, 600);
    }

    /// The shadow is not vacuous: random inputs get requests through with its checks on.
    #[test]
    fn requests_succeed_under_the_shadow() {
        let mut ok = 0;
        for data in crate::fuzzing::tests::inputs(0x5eed_1003, 300, 500) {
            ok += run(&data);
        }
        assert!(ok > 300, "{ok} requests OK under the shadow");
    }
}
