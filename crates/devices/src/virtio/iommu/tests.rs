//! virtio-iommu driven as a guest driver would, with virtio-blk endpoints behind it doing I/O
//! at IOVAs far from the guest physical addresses of their buffers.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::tempfile::TempFile;

use super::request::*;
use super::*;
use crate::virtio::block::{Block, BlockBackend, BlockOptions};
use crate::virtio::dma::{Access, PhysMemory};
use crate::virtio::testutil::{Desc, RecordingInterrupt, TestDriver, XorShift, test_memory};

/// The IOMMU's own queues and request buffers (guest physical: it is not behind itself).
const REQ_RING: u64 = 0x0;
const EVT_RING: u64 = 0x1000;
const REQ: u64 = 0x8000;
const RESP: u64 = 0x8800;
const EVENTS: u64 = 0x9000;
/// An endpoint's rings, request headers and data, in guest physical memory...
const BLK_RING: [u64; 2] = [0x4_0000, 0x4_4000];
const BLK_HDR: [u64; 2] = [0x4_2000, 0x4_6000];
const BLK_DATA: [u64; 2] = [0x5_0000, 0x6_0000];
/// ...and where the guest maps them for the device.
const RING_IOVA: u64 = 0x1_0000_0000;
const HDR_IOVA: u64 = 0x2_0000_0000;
const DATA_IOVA: u64 = 0x3_0000_0000;
const HOLE: u64 = 0x18_0000;
const RW: u32 = MAP_F_READ | MAP_F_WRITE;

fn attach_req(domain: u32, ep: u32, flags: u32) -> Vec<u8> {
    let mut r = vec![T_ATTACH, 0, 0, 0];
    r.extend(domain.to_le_bytes());
    r.extend(ep.to_le_bytes());
    r.extend(flags.to_le_bytes());
    r.extend([0u8; 4]);
    r
}

fn detach_req(domain: u32, ep: u32) -> Vec<u8> {
    let mut r = vec![T_DETACH, 0, 0, 0];
    r.extend(domain.to_le_bytes());
    r.extend(ep.to_le_bytes());
    r.extend([0u8; 8]);
    r
}

fn map_req(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Vec<u8> {
    let mut r = vec![T_MAP, 0, 0, 0];
    r.extend(domain.to_le_bytes());
    r.extend(start.to_le_bytes());
    r.extend(end.to_le_bytes());
    r.extend(phys.to_le_bytes());
    r.extend(flags.to_le_bytes());
    r
}

fn unmap_req(domain: u32, start: u64, end: u64) -> Vec<u8> {
    let mut r = vec![T_UNMAP, 0, 0, 0];
    r.extend(domain.to_le_bytes());
    r.extend(start.to_le_bytes());
    r.extend(end.to_le_bytes());
    r.extend([0u8; 4]);
    r
}

fn probe_req(ep: u32) -> Vec<u8> {
    let mut r = vec![T_PROBE, 0, 0, 0];
    r.extend(ep.to_le_bytes());
    r.extend([0u8; 64]);
    r
}

/// The guest's side of the IOMMU: its two queues.
struct Guest<'a> {
    req: TestDriver<'a>,
    evt: TestDriver<'a>,
    irq: Arc<RecordingInterrupt>,
}

impl<'a> Guest<'a> {
    /// Activate `dev` with `features` (plus VERSION_1) on queues of 16.
    fn new(mem: &'a PhysMemory, dev: &mut VirtioIommu, features: u64) -> Self {
        let req = TestDriver::at(mem, REQ_RING, 16);
        let evt = TestDriver::at(mem, EVT_RING, 16);
        let irq = Arc::new(RecordingInterrupt::default());
        dev.ack_features(features | crate::virtio::features::VERSION_1);
        dev.activate(
            vec![req.queue(), evt.queue()],
            irq.clone(),
            DmaSpace::identity(mem.clone()),
        )
        .unwrap();
        Self { req, evt, irq }
    }

    /// Send `req` with `wlen` writable bytes; returns (status byte, used length).
    fn send_with(&mut self, dev: &mut VirtioIommu, req: &[u8], wlen: u32) -> (u8, u32) {
        self.req.write(REQ, req);
        self.req.write(RESP, &vec![0xee; wlen as usize]);
        let before = self.req.used_idx();
        self.req
            .add(&[Desc::r(REQ, req.len() as u32), Desc::w(RESP, wlen)]);
        dev.process_queue(REQUEST_QUEUE);
        assert_eq!(
            self.req.used_idx(),
            before.wrapping_add(1),
            "request returned"
        );
        let (_, len) = self.req.used(before);
        let status = self.req.read(RESP + u64::from(wlen.max(4)) - 4, 1)[0];
        (status, len)
    }

    /// Send a request whose writable part is the tail; returns its status.
    fn send(&mut self, dev: &mut VirtioIommu, req: &[u8]) -> u8 {
        let (status, len) = self.send_with(dev, req, 4);
        assert_eq!(len, 4, "used length of a request with a tail");
        status
    }

    /// Make `n` event buffers available.
    fn add_event_buffers(&mut self, n: u64) {
        for i in 0..n {
            self.evt.add(&[Desc::w(EVENTS + 32 * i, 24)]);
        }
    }

    /// Events written so far (from the start of the event ring): (reason, flags, ep, addr).
    fn events(&self) -> Vec<(u8, u32, u32, u64)> {
        (0..self.evt.used_idx())
            .map(|i| {
                let (head, len) = self.evt.used(i);
                assert_eq!(len, 24);
                let b = self.evt.read(EVENTS + 32 * u64::from(head), 24);
                let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
                let addr = u64::from_le_bytes(b[16..24].try_into().unwrap());
                (b[0], u32_at(4), u32_at(8), addr)
            })
            .collect()
    }
}

/// A virtio-blk endpoint on a 1 MiB temporary disk, with its own queue at `BLK_RING[i]`.
struct Blk {
    dev: Arc<Mutex<Block>>,
    dma: DmaSpace,
    disk: TempFile,
    i: usize,
}

impl Blk {
    fn new(mem: &PhysMemory, i: usize) -> Self {
        let disk = TempFile::new().unwrap();
        disk.as_file().set_len(1 << 20).unwrap();
        let backend = BlockBackend::open(disk.as_path(), &BlockOptions::default()).unwrap();
        Self {
            dev: Arc::new(Mutex::new(Block::new(backend))),
            dma: DmaSpace::identity(mem.clone()),
            disk,
            i,
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::locked_by(self.dma.clone(), self.dev.clone())
    }

    /// Activate with its rings at `RING_IOVA + 0x10_0000 * i` (which the guest must have
    /// mapped to `BLK_RING[i]`).
    fn activate<'a>(&self, mem: &'a PhysMemory) -> TestDriver<'a> {
        let drv = TestDriver::at(mem, BLK_RING[self.i], 16);
        let (d, a, u) = drv.ring_addresses();
        let iova = |gpa: u64| gpa - BLK_RING[self.i] + self.ring_iova();
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        let split = |v: u64| (Some(v as u32), Some((v >> 32) as u32));
        let (lo, hi) = split(iova(d));
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(iova(a));
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(iova(u));
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        let mut dev = lock(&self.dev);
        let offered = dev.offered_features();
        dev.ack_features(offered);
        dev.activate(
            vec![q],
            Arc::new(RecordingInterrupt::default()),
            self.dma.clone(),
        )
        .unwrap();
        drv
    }

    fn ring_iova(&self) -> u64 {
        RING_IOVA + 0x10_0000 * self.i as u64
    }

    fn hdr_iova(&self) -> u64 {
        HDR_IOVA + 0x10_0000 * self.i as u64
    }

    /// One request: header at the mapped header page, `data` at IOVA `data`, status after
    /// the header. Returns the status byte (0xee if the device never wrote it).
    fn io(&self, drv: &mut TestDriver, kind: u32, sector: u64, data: u64, len: u32) -> u8 {
        let gpa_hdr = BLK_HDR[self.i];
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        drv.write(gpa_hdr, &h);
        drv.write(gpa_hdr + 0x100, &[0xee]);
        let data_desc = if kind == VIRTIO_BLK_T_IN {
            Desc::w(data, len)
        } else {
            Desc::r(data, len)
        };
        let before = drv.used_idx();
        drv.add(&[
            Desc::r(self.hdr_iova(), 16),
            data_desc,
            Desc::w(self.hdr_iova() + 0x100, 1),
        ]);
        lock(&self.dev).process_queue(0);
        assert_eq!(drv.used_idx(), before.wrapping_add(1), "request returned");
        drv.read(gpa_hdr + 0x100, 1)[0]
    }

    /// Map this endpoint's rings and header page in `domain`.
    fn map_control(&self, guest: &mut Guest, iommu: &mut VirtioIommu, domain: u32) {
        let ring = map_req(
            domain,
            self.ring_iova(),
            self.ring_iova() + 0xfff,
            BLK_RING[self.i],
            RW,
        );
        assert_eq!(guest.send(iommu, &ring), Status::Ok as u8);
        let hdr = map_req(
            domain,
            self.hdr_iova(),
            self.hdr_iova() + 0xfff,
            BLK_HDR[self.i],
            RW,
        );
        assert_eq!(guest.send(iommu, &hdr), Status::Ok as u8);
    }
}

fn all_features() -> u64 {
    feature::OFFERED
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[test]
fn config_space_and_features() {
    let mem = test_memory();
    let blk = Blk::new(&mem, 0);
    let dev = VirtioIommu::new(IommuConfig::default(), [(8, blk.endpoint())]).unwrap();
    assert_eq!(dev.device_type(), 23);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let f = dev.offered_features();
    assert_eq!(f & crate::virtio::features::ACCESS_PLATFORM, 0);
    assert_eq!(f & feature::OFFERED, feature::OFFERED);
    assert_eq!(f & (feature::BYPASS | feature::MMIO), 0);
    let mut c = [0u8; config::LEN];
    dev.read_config(0, &mut c);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), !0xfff);
    assert_eq!(u64::from_le_bytes(c[8..16].try_into().unwrap()), 0);
    assert_eq!(
        u64::from_le_bytes(c[16..24].try_into().unwrap()),
        (1 << 48) - 1
    );
    assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), u32::MAX);
    assert_eq!(
        u32::from_le_bytes(c[32..36].try_into().unwrap()),
        PROBE_SIZE
    );
    assert_eq!(c[36], 1);
    assert_eq!(dev.endpoint_ids().collect::<Vec<_>>(), vec![8]);
    // Bypass at boot: the endpoint reaches guest memory untranslated.
    assert!(!blk.dma.is_translated());

    let bad = |config: IommuConfig| VirtioIommu::new(config, []).unwrap_err();
    let d = IommuConfig::default();
    assert_eq!(
        bad(IommuConfig {
            page_size_mask: 0,
            ..d.clone()
        }),
        IommuError::NoPageSize
    );
    assert!(matches!(
        bad(IommuConfig {
            input_range: (0, u64::MAX),
            ..d.clone()
        }),
        IommuError::InputRange { .. }
    ));
    assert!(matches!(
        bad(IommuConfig {
            domain_range: (5, 4),
            ..d.clone()
        }),
        IommuError::DomainRange { .. }
    ));
    let e = VirtioIommu::new(d, [(8, blk.endpoint()), (8, blk.endpoint())]).unwrap_err();
    assert_eq!(e, IommuError::DuplicateEndpoint(8));
}

/// The scenario: probe, attach, map IOVAs far from the GPAs, I/O through them, unmap,
/// and the device can no longer reach the buffer, with a fault event to show for it.
#[test]
fn blk_behind_the_iommu_translates_and_faults_after_unmap() {
    let mem = test_memory();
    let blk = Blk::new(&mem, 0);
    let mut iommu = VirtioIommu::new(IommuConfig::default(), [(8, blk.endpoint())]).unwrap();
    let mut g = Guest::new(&mem, &mut iommu, all_features());
    g.add_event_buffers(4);

    // PROBE: the MSI window as a reserved MSI region, then zeros.
    let (status, len) = g.send_with(&mut iommu, &probe_req(8), PROBE_SIZE + 4);
    assert_eq!((status, len), (Status::Ok as u8, PROBE_SIZE + 4));
    let props = g.req.read(RESP, PROBE_SIZE as usize);
    assert_eq!(&props[0..4], &[1, 0, 20, 0]);
    assert_eq!(props[4], RESV_MEM_T_MSI);
    assert_eq!(
        u64::from_le_bytes(props[8..16].try_into().unwrap()),
        MSI_START
    );
    assert_eq!(
        u64::from_le_bytes(props[16..24].try_into().unwrap()),
        MSI_END
    );
    assert!(props[24..].iter().all(|&b| b == 0));

    assert_eq!(g.send(&mut iommu, &attach_req(1, 8, 0)), Status::Ok as u8);
    assert!(blk.dma.is_translated());
    assert_eq!(iommu.domain_of(8), Some(1));
    blk.map_control(&mut g, &mut iommu, 1);
    let data = map_req(1, DATA_IOVA, DATA_IOVA + 0x3fff, BLK_DATA[0], RW);
    assert_eq!(g.send(&mut iommu, &data), Status::Ok as u8);
    assert_eq!(iommu.mapping_count(), 3);

    let mut drv = blk.activate(&mem);
    let p = pattern(0x2000, 7);
    g.req.write(BLK_DATA[0], &p);
    // A write from IOVA DATA_IOVA lands on the disk with the bytes at GPA BLK_DATA.
    assert_eq!(blk.io(&mut drv, VIRTIO_BLK_T_OUT, 8, DATA_IOVA, 0x2000), 0);
    let mut on_disk = vec![0u8; 0x2000];
    blk.disk
        .as_file()
        .read_exact_at(&mut on_disk, 8 * 512)
        .unwrap();
    assert_eq!(on_disk, p);
    // A read into IOVA DATA_IOVA + 0x2000 fills GPA BLK_DATA + 0x2000.
    assert_eq!(
        blk.io(&mut drv, VIRTIO_BLK_T_IN, 8, DATA_IOVA + 0x2000, 0x2000),
        0
    );
    assert_eq!(g.req.read(BLK_DATA[0] + 0x2000, 0x2000), p);
    // GPAs are not IOVAs for this device.
    assert_eq!(blk.io(&mut drv, VIRTIO_BLK_T_IN, 8, BLK_DATA[0], 0x200), 1);
    iommu.process_queue(EVENT_QUEUE);
    assert_eq!(
        g.events(),
        vec![(
            fault::R_MAPPING,
            fault::F_WRITE | fault::F_ADDRESS,
            8,
            BLK_DATA[0]
        )]
    );

    // UNMAP, then the same read is refused and nothing reaches the old buffer.
    let unmap = unmap_req(1, DATA_IOVA, DATA_IOVA + 0x3fff);
    assert_eq!(g.send(&mut iommu, &unmap), Status::Ok as u8);
    g.req.write(BLK_DATA[0] + 0x2000, &[0u8; 0x2000]);
    assert_eq!(
        blk.io(&mut drv, VIRTIO_BLK_T_IN, 8, DATA_IOVA + 0x2000, 0x2000),
        1
    );
    assert!(
        g.req
            .read(BLK_DATA[0] + 0x2000, 0x2000)
            .iter()
            .all(|&b| b == 0)
    );
    // The event is delivered on its own (the notifier's path) as well as after requests.
    iommu.process_queue(EVENT_QUEUE);
    let events = g.events();
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[1],
        (
            fault::R_MAPPING,
            fault::F_WRITE | fault::F_ADDRESS,
            8,
            DATA_IOVA + 0x2000
        )
    );
    assert!(!g.irq.take_queues().is_empty());
    let stats = iommu.iotlb_stats(1).unwrap();
    assert!(stats.lookups > 10 && stats.misses >= 2, "{stats:?}");
    assert_eq!(iommu.stats().faults_delivered, 2);

    // DETACH: the endpoint is back in bypass (the config default), the domain is gone.
    assert_eq!(g.send(&mut iommu, &detach_req(1, 8)), Status::Ok as u8);
    assert!(!blk.dma.is_translated());
    assert_eq!(iommu.mapping_count(), 0);
    assert!(iommu.mappings(1).is_none());
}

#[test]
fn read_only_mapping_refuses_device_writes() {
    let mem = test_memory();
    let blk = Blk::new(&mem, 0);
    let mut iommu = VirtioIommu::new(IommuConfig::default(), [(8, blk.endpoint())]).unwrap();
    let mut g = Guest::new(&mem, &mut iommu, all_features());
    g.add_event_buffers(2);
    assert_eq!(g.send(&mut iommu, &attach_req(1, 8, 0)), Status::Ok as u8);
    blk.map_control(&mut g, &mut iommu, 1);
    let ro = map_req(1, DATA_IOVA, DATA_IOVA + 0xfff, BLK_DATA[0], MAP_F_READ);
    assert_eq!(g.send(&mut iommu, &ro), Status::Ok as u8);
    let mut drv = blk.activate(&mem);
    let p = pattern(0x1000, 3);
    g.req.write(BLK_DATA[0], &p);
    // The device may read it (a disk write)...
    assert_eq!(blk.io(&mut drv, VIRTIO_BLK_T_OUT, 0, DATA_IOVA, 0x1000), 0);
    // ...but not write it (a disk read), and the buffer keeps its bytes.
    blk.disk.as_file().write_all_at(&[0x55; 0x1000], 0).unwrap();
    assert_eq!(blk.io(&mut drv, VIRTIO_BLK_T_IN, 0, DATA_IOVA, 0x1000), 1);
    assert_eq!(g.req.read(BLK_DATA[0], 0x1000), p);
    iommu.process_queue(EVENT_QUEUE);
    assert_eq!(
        g.events(),
        vec![(
            fault::R_MAPPING,
            fault::F_WRITE | fault::F_ADDRESS,
            8,
            DATA_IOVA
        )]
    );
}

#[test]
fn endpoints_in_two_domains_cannot_reach_each_other() {
    let mem = test_memory();
    let a = Blk::new(&mem, 0);
    let b = Blk::new(&mem, 1);
    let mut iommu = VirtioIommu::new(
        IommuConfig::default(),
        [(8, a.endpoint()), (16, b.endpoint())],
    )
    .unwrap();
    let mut g = Guest::new(&mem, &mut iommu, all_features());
    g.add_event_buffers(4);
    assert_eq!(g.send(&mut iommu, &attach_req(1, 8, 0)), Status::Ok as u8);
    assert_eq!(g.send(&mut iommu, &attach_req(2, 16, 0)), Status::Ok as u8);
    for (blk, domain) in [(&a, 1), (&b, 2)] {
        blk.map_control(&mut g, &mut iommu, domain);
    }
    // The same IOVA maps to each endpoint's own buffer; b's second buffer is mapped for b only.
    let map_a = map_req(1, DATA_IOVA, DATA_IOVA + 0xfff, BLK_DATA[0], RW);
    let map_b = map_req(2, DATA_IOVA, DATA_IOVA + 0xfff, BLK_DATA[1], RW);
    let map_b2 = map_req(
        2,
        DATA_IOVA + 0x10000,
        DATA_IOVA + 0x10fff,
        BLK_DATA[1] + 0x1000,
        RW,
    );
    for r in [map_a, map_b, map_b2] {
        assert_eq!(g.send(&mut iommu, &r), Status::Ok as u8);
    }
    let mut da = a.activate(&mem);
    let mut db = b.activate(&mem);
    a.disk.as_file().write_all_at(&[0xaa; 0x1000], 0).unwrap();
    b.disk.as_file().write_all_at(&[0xbb; 0x1000], 0).unwrap();
    assert_eq!(a.io(&mut da, VIRTIO_BLK_T_IN, 0, DATA_IOVA, 0x1000), 0);
    assert_eq!(b.io(&mut db, VIRTIO_BLK_T_IN, 0, DATA_IOVA, 0x1000), 0);
    assert_eq!(g.req.read(BLK_DATA[0], 0x1000), vec![0xaa; 0x1000]);
    assert_eq!(g.req.read(BLK_DATA[1], 0x1000), vec![0xbb; 0x1000]);
    // a cannot reach b's second buffer, nor b's rings.
    let before = g.req.read(BLK_DATA[1] + 0x1000, 0x1000);
    assert_eq!(
        a.io(&mut da, VIRTIO_BLK_T_IN, 0, DATA_IOVA + 0x10000, 0x1000),
        1
    );
    assert_eq!(g.req.read(BLK_DATA[1] + 0x1000, 0x1000), before);
    assert_eq!(a.io(&mut da, VIRTIO_BLK_T_IN, 0, b.ring_iova(), 0x200), 1);
    iommu.process_queue(EVENT_QUEUE);
    let ev = g.events();
    assert_eq!(ev.len(), 2);
    assert!(ev.iter().all(|e| e.2 == 8 && e.0 == fault::R_MAPPING));

    // Moving b into a's domain (ATTACH of an attached endpoint) drops domain 2 and its maps.
    assert_eq!(g.send(&mut iommu, &attach_req(1, 16, 0)), Status::Ok as u8);
    assert!(iommu.mappings(2).is_none());
    assert_eq!(iommu.mapping_count(), 3);
    assert_eq!(iommu.domain_of(16), Some(1));
}

#[test]
fn malicious_requests_get_statuses() {
    let mem = test_memory();
    let blk = Blk::new(&mem, 0);
    let config = IommuConfig {
        domain_range: (1, 100),
        max_mappings: 6,
        ..IommuConfig::default()
    };
    let mut iommu = VirtioIommu::new(config, [(8, blk.endpoint())]).unwrap();
    let mut g = Guest::new(&mem, &mut iommu, all_features());
    let mut s = |r: &[u8]| g.send(&mut iommu, r);
    const OK: u8 = Status::Ok as u8;
    const INVAL: u8 = Status::Inval as u8;
    const RANGE: u8 = Status::Range as u8;
    const NOENT: u8 = Status::NoEnt as u8;

    // ATTACH.
    let mut reserved = attach_req(1, 8, 0);
    reserved[19] = 1;
    assert_eq!(s(&reserved), INVAL);
    assert_eq!(s(&attach_req(1, 8, 2)), INVAL, "unknown flag");
    assert_eq!(s(&attach_req(1, 9, 0)), NOENT);
    assert_eq!(s(&attach_req(0, 8, 0)), RANGE);
    assert_eq!(s(&attach_req(101, 8, 0)), RANGE);
    // MAP on a domain that does not exist yet.
    assert_eq!(s(&map_req(1, 0x1000, 0x1fff, 0x1_0000, RW)), NOENT);
    assert_eq!(s(&attach_req(1, 8, 0)), OK);
    assert_eq!(
        s(&attach_req(1, 8, ATTACH_F_BYPASS)),
        INVAL,
        "bypass mismatch"
    );

    // MAP.
    assert_eq!(s(&map_req(1, 0x1_0000, 0x1_ffff, 0x1_0000, RW)), OK);
    let cases: &[(&[u8], u8, &str)] = &[
        (
            &map_req(1, 0x2000, 0x1fff, 0, RW),
            INVAL,
            "end before start",
        ),
        (&map_req(1, 0x2000, 0x2000, 0, RW), RANGE, "one byte"),
        (&map_req(1, 0x2800, 0x37ff, 0, RW), RANGE, "unaligned start"),
        (
            &map_req(1, 0x2000, 0x2fff, 0x800, RW),
            RANGE,
            "unaligned phys",
        ),
        (
            &map_req(1, 1 << 48, (1 << 48) + 0xfff, 0, RW),
            RANGE,
            "above input",
        ),
        (&map_req(1, 0, u64::MAX, 0, RW), RANGE, "whole space"),
        (
            &map_req(1, 0x1000, 0x2fff, u64::MAX - 0xfff, RW),
            RANGE,
            "phys wraps",
        ),
        (
            &map_req(1, 0x1_8000, 0x2_7fff, 0x3_0000, RW),
            INVAL,
            "overlap",
        ),
        (
            &map_req(1, 0x0, 0xf_ffff, 0x3_0000, RW),
            INVAL,
            "covers one",
        ),
        (
            &map_req(1, 0x1_0000, 0x1_ffff, 0x3_0000, RW),
            INVAL,
            "same range",
        ),
        (
            &map_req(1, 0xfee0_0000, 0xfee0_0fff, 0x3_0000, RW),
            INVAL,
            "MSI window",
        ),
        (
            &map_req(1, 0x5000, 0x5fff, HOLE, RW),
            Status::Fault as u8,
            "not RAM",
        ),
        (
            &map_req(1, 0x2_0000_0000, 0x2_ffff_ffff, 0, RW),
            Status::Fault as u8,
            "absurd size",
        ),
        (
            &map_req(1, 0x5000, 0x5fff, 0, MAP_F_MMIO),
            INVAL,
            "MMIO not offered",
        ),
        (&map_req(1, 0x5000, 0x5fff, 0, 0x100), INVAL, "unknown flag"),
        (&map_req(2, 0x5000, 0x5fff, 0, RW), NOENT, "no domain 2"),
        (
            &map_req(1000, 0x5000, 0x5fff, 0, RW),
            RANGE,
            "domain out of range",
        ),
    ];
    for (req, want, what) in cases {
        assert_eq!(s(req), *want, "{what}");
    }
    // Up to max_mappings, then NOMEM.
    for i in 0..5u64 {
        let at = 0x10_0000 + i * 0x1000;
        assert_eq!(s(&map_req(1, at, at + 0xfff, 0x3_0000, MAP_F_READ)), OK);
    }
    assert_eq!(
        s(&map_req(1, 0x20_0000, 0x20_0fff, 0x3_0000, RW)),
        Status::NoMem as u8
    );

    // UNMAP: splitting refused, spilling over allowed, reserved bytes refused.
    assert_eq!(s(&unmap_req(1, 0x1_0000, 0x1_0fff)), RANGE);
    assert_eq!(s(&unmap_req(1, 0x1_1000, 0x1_ffff)), RANGE);
    assert_eq!(s(&unmap_req(1, 0x2000, 0x1fff)), INVAL);
    let mut reserved = unmap_req(1, 0, u64::MAX);
    reserved[27] = 1;
    assert_eq!(s(&reserved), INVAL);
    assert_eq!(s(&unmap_req(2, 0, 0xfff)), NOENT);
    assert_eq!(s(&unmap_req(1, 0x50_0000, 0x60_0000)), OK, "nothing there");
    assert_eq!(s(&unmap_req(1, 0x10_0000, 0x10_1fff)), OK, "two, exactly");
    assert_eq!(s(&unmap_req(1, 0, u64::MAX)), OK, "all the rest");

    // DETACH.
    assert_eq!(s(&detach_req(2, 8)), INVAL);
    assert_eq!(s(&detach_req(1, 9)), NOENT);
    assert_eq!(s(&detach_req(1, 8)), OK);
    assert_eq!(s(&detach_req(1, 8)), INVAL, "not attached any more");

    // Bypass domains: no MAP or UNMAP on them.
    assert_eq!(s(&attach_req(3, 8, ATTACH_F_BYPASS)), OK);
    assert_eq!(s(&map_req(3, 0x1000, 0x1fff, 0, RW)), INVAL);
    assert_eq!(s(&unmap_req(3, 0x1000, 0x1fff)), INVAL);
    assert_eq!(s(&attach_req(3, 8, 0)), INVAL);
    assert!(!blk.dma.is_translated());

    // Framing.
    let short_map = &map_req(3, 0x1000, 0x1fff, 0, RW)[..20];
    assert_eq!(g.send(&mut iommu, short_map), INVAL, "short MAP");
    assert_eq!(
        g.send(&mut iommu, &[T_MAP, 0]),
        Status::IoErr as u8,
        "no head"
    );
    assert_eq!(
        g.send_with(&mut iommu, &attach_req(3, 8, 1), 3).1,
        0,
        "no tail"
    );
    let (status, len) = g.send_with(&mut iommu, &[9, 0, 0, 0, 1, 2, 3, 4], 4);
    assert_eq!((status, len), (0xee, 0), "unknown type: untouched");
    // A longer tail part: the status goes in its last 4 bytes.
    let (status, len) = g.send_with(&mut iommu, &detach_req(3, 8), 16);
    assert_eq!((status, len), (OK, 16));
    // PROBE with the wrong room for properties, or of an unknown endpoint.
    assert_eq!(g.send_with(&mut iommu, &probe_req(8), 100 + 4).0, INVAL);
    assert_eq!(
        g.send_with(&mut iommu, &probe_req(7), PROBE_SIZE + 4).0,
        NOENT
    );
    assert_eq!(
        g.send_with(&mut iommu, &probe_req(8)[..40], PROBE_SIZE + 4)
            .0,
        INVAL
    );

    // Chains a driver should never send.
    let before = g.req.used_idx();
    g.req.write(RESP, &[0xee; 4]);
    g.req.add(&[Desc::w(RESP, 4), Desc::r(REQ, 20)]);
    g.req.add(&[Desc::r(REQ, 20)]);
    g.req.add(&[Desc::r(HOLE, 20), Desc::w(RESP, 4)]);
    g.req.add(&[Desc::r(REQ, 20), Desc::w(HOLE, 4)]);
    iommu.process_queue(REQUEST_QUEUE);
    assert_eq!(g.req.used_idx(), before.wrapping_add(4));
    let lens: Vec<u32> = (0..4).map(|i| g.req.used(before + i).1).collect();
    assert_eq!(lens, vec![0, 0, 4, 0]);
    assert_eq!(
        g.req.read(RESP, 1)[0],
        Status::IoErr as u8,
        "unreadable request"
    );
    assert!(!g.irq.needs_reset());
}

#[test]
fn features_not_negotiated() {
    let mem = test_memory();
    let blk = Blk::new(&mem, 0);
    let mut iommu = VirtioIommu::new(IommuConfig::default(), [(8, blk.endpoint())]).unwrap();
    let mut g = Guest::new(&mem, &mut iommu, 0);
    assert_eq!(g.send(&mut iommu, &attach_req(1, 8, 0)), Status::Ok as u8);
    assert_eq!(
        g.send(&mut iommu, &attach_req(2, 8, ATTACH_F_BYPASS)),
        Status::Inval as u8
    );
    let map = map_req(1, 0x1000, 0x1fff, 0x1000, RW);
    assert_eq!(g.send(&mut iommu, &map), Status::Unsupp as u8);
    assert_eq!(
        g.send(&mut iommu, &unmap_req(1, 0, 0xfff)),
        Status::Unsupp as u8
    );
    // PROBE without the feature is returned unwritten.
    let (status, len) = g.send_with(&mut iommu, &probe_req(8), PROBE_SIZE + 4);
    assert_eq!((status, len), (0xee, 0));
    // Without BYPASS_CONFIG the bypass field cannot be written.
    iommu.write_config(config::BYPASS as u64, &[0]);
    assert!(iommu.bypass());
}

#[test]
fn bypass_config_detached_endpoints_and_reset() {
    let mem = test_memory();
    let blk = Blk::new(&mem, 0);
    let mut iommu = VirtioIommu::new(IommuConfig::default(), [(8, blk.endpoint())]).unwrap();
    let notified = Arc::new(AtomicBool::new(false));
    let n = notified.clone();
    iommu.set_fault_notifier(move || n.store(true, Ordering::SeqCst));
    let mut g = Guest::new(&mem, &mut iommu, all_features());
    g.add_event_buffers(2);
    assert!(!blk.dma.is_translated());
    // Only 0 and 1, one byte at the field.
    iommu.write_config(config::BYPASS as u64, &[2]);
    iommu.write_config(config::BYPASS as u64, &[0, 0]);
    assert!(iommu.bypass());
    iommu.write_config(config::BYPASS as u64, &[0]);
    assert!(!iommu.bypass());
    // Unattached without bypass: no access, reported as a DOMAIN fault.
    assert!(blk.dma.is_translated());
    let s = blk.dma.snapshot();
    assert!(s.check(0x1000, 4, Access::Read).is_err());
    drop(s);
    assert!(notified.load(Ordering::SeqCst));
    iommu.process_queue(EVENT_QUEUE);
    assert_eq!(
        g.events(),
        vec![(fault::R_DOMAIN, fault::F_READ | fault::F_ADDRESS, 8, 0x1000)]
    );
    // Attached to a bypass domain: identity again.
    assert_eq!(
        g.send(&mut iommu, &attach_req(4, 8, ATTACH_F_BYPASS)),
        Status::Ok as u8
    );
    assert!(!blk.dma.is_translated());
    // A device reset detaches everything; bypass stays as the driver left it.
    iommu.reset();
    assert_eq!(iommu.domain_of(8), None);
    assert!(!iommu.bypass());
    assert!(blk.dma.is_translated());
    // Removing the endpoint (a VF going away) leaves it with no access.
    let ep = iommu.remove_endpoint(8).unwrap();
    assert!(ep.dma().is_translated());
    assert_eq!(
        iommu.remove_endpoint(8).unwrap_err(),
        IommuError::UnknownEndpoint(8)
    );
    iommu.add_endpoint(8, ep).unwrap();
}

#[test]
fn faults_wait_for_buffers_and_overflow_is_counted() {
    let mem = test_memory();
    let blk = Blk::new(&mem, 0);
    let config = IommuConfig {
        bypass: false,
        ..IommuConfig::default()
    };
    let mut iommu = VirtioIommu::new(config, [(8, blk.endpoint())]).unwrap();
    let mut g = Guest::new(&mem, &mut iommu, all_features());
    let s = blk.dma.snapshot();
    for i in 0..(MAX_PENDING_FAULTS as u64 + 5) {
        assert!(s.check(i * 0x1000, 1, Access::Write).is_err());
    }
    drop(s);
    iommu.process_queue(EVENT_QUEUE);
    assert!(g.events().is_empty());
    // A bad buffer (too small) is returned empty; the fault waits for the next good one.
    g.evt.add(&[Desc::w(EVENTS, 8)]);
    g.add_event_buffers(3);
    iommu.process_queue(EVENT_QUEUE);
    assert_eq!(g.evt.used_idx(), 4);
    assert_eq!(g.evt.used(0).1, 0);
    let st = iommu.stats();
    assert_eq!(st.faults_delivered, 3);
    assert_eq!(st.faults_dropped, 5);
    assert_eq!(st.faults_reported, MAX_PENDING_FAULTS as u64 + 5);
}

/// UNMAP does not complete while the endpoint's device is inside a request that may have
/// translated the old mapping (the endpoint's lock is held).
#[test]
fn unmap_waits_for_the_endpoint_to_quiesce() {
    let mem = test_memory();
    let blk = Blk::new(&mem, 0);
    let mut iommu = VirtioIommu::new(IommuConfig::default(), [(8, blk.endpoint())]).unwrap();
    let mut g = Guest::new(&mem, &mut iommu, all_features());
    assert_eq!(g.send(&mut iommu, &attach_req(1, 8, 0)), Status::Ok as u8);
    let map = map_req(1, DATA_IOVA, DATA_IOVA + 0xfff, BLK_DATA[0], RW);
    assert_eq!(g.send(&mut iommu, &map), Status::Ok as u8);

    let dev = blk.dev.clone();
    let dma = blk.dma.clone();
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let d = done.clone();
    let t = std::thread::spawn(move || {
        // An "in-flight request": translated while mapped, finishing after a while.
        let guard = lock(&dev);
        let s = dma.snapshot();
        s.check(DATA_IOVA, 0x1000, Access::Write).unwrap();
        tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        d.store(true, Ordering::SeqCst);
        drop(s);
        drop(guard);
    });
    rx.recv().unwrap();
    let unmap = unmap_req(1, DATA_IOVA, DATA_IOVA + 0xfff);
    assert_eq!(g.send(&mut iommu, &unmap), Status::Ok as u8);
    assert!(
        done.load(Ordering::SeqCst),
        "UNMAP completed while the device was still inside a request"
    );
    t.join().unwrap();
    assert!(
        blk.dma
            .snapshot()
            .check(DATA_IOVA, 1, Access::Read)
            .is_err()
    );
}

/// Random MAP/UNMAP/ATTACH/DETACH against a shadow of the tables; after each step the statuses
/// match and both endpoints reach exactly what the shadow says, at the right GPA.
#[test]
fn random_requests_match_a_shadow_model() {
    let mem = test_memory();
    let eps = [Blk::new(&mem, 0), Blk::new(&mem, 1)];
    let ids = [8u32, 16];
    let config = IommuConfig {
        domain_range: (1, 3),
        max_mappings: 12,
        bypass: false,
        ..IommuConfig::default()
    };
    let mut iommu = VirtioIommu::new(
        config,
        [(ids[0], eps[0].endpoint()), (ids[1], eps[1].endpoint())],
    )
    .unwrap();
    let mut g = Guest::new(&mem, &mut iommu, all_features());
    // Shadow: domain -> mappings (start -> (end, phys, flags)); endpoint -> domain.
    let mut domains: BTreeMap<u32, BTreeMap<u64, (u64, u64, u32)>> = BTreeMap::new();
    let mut attached: [Option<u32>; 2] = [None, None];
    let mut rng = XorShift(0x10_4444_abcd);
    const PAGE: u64 = 0x1000;
    const PAGES: u64 = 32;
    for step in 0..3000 {
        let domain = 1 + rng.below(4) as u32; // 4 is out of range
        let e = rng.below(2) as usize;
        let (req, want) = match rng.below(10) {
            0 | 1 => {
                let want = if domain > 3 {
                    Status::Range
                } else {
                    Status::Ok
                };
                if want == Status::Ok && attached[e] != Some(domain) {
                    if let Some(old) = attached[e].take() {
                        if !attached.contains(&Some(old)) {
                            domains.remove(&old);
                        }
                    }
                    domains.entry(domain).or_default();
                    attached[e] = Some(domain);
                }
                (attach_req(domain, ids[e], 0), want)
            }
            2 => {
                let want = if attached[e] == Some(domain) {
                    attached[e] = None;
                    if !attached.contains(&Some(domain)) {
                        domains.remove(&domain);
                    }
                    Status::Ok
                } else {
                    Status::Inval
                };
                (detach_req(domain, ids[e]), want)
            }
            3..=6 => {
                let start = rng.below(PAGES) * PAGE;
                let end = start + (1 + rng.below(4)) * PAGE - 1;
                let phys = 0x10_0000 - 4 * PAGE + rng.below(8) * PAGE - 0x8_0000;
                let flags = rng.below(4) as u32;
                let count: usize = domains.values().map(BTreeMap::len).sum();
                let want = if domain > 3 {
                    Status::Range
                } else if let Some(m) = domains.get_mut(&domain) {
                    if m.iter().any(|(&s, &(en, _, _))| s <= end && start <= en) {
                        Status::Inval
                    } else if count >= 12 {
                        Status::NoMem
                    } else {
                        m.insert(start, (end, phys, flags));
                        Status::Ok
                    }
                } else {
                    Status::NoEnt
                };
                (map_req(domain, start, end, phys, flags), want)
            }
            _ => {
                let start = rng.below(PAGES) * PAGE;
                let end = start + rng.below(6) * PAGE + PAGE - 1;
                let want = if domain > 3 {
                    Status::Range
                } else if let Some(m) = domains.get_mut(&domain) {
                    let hit: Vec<u64> = m
                        .iter()
                        .filter(|&(&s, &(en, _, _))| s <= end && start <= en)
                        .map(|(&s, _)| s)
                        .collect();
                    if hit.iter().any(|s| *s < start || m[s].0 > end) {
                        Status::Range
                    } else {
                        for s in hit {
                            m.remove(&s);
                        }
                        Status::Ok
                    }
                } else {
                    Status::NoEnt
                };
                (unmap_req(domain, start, end), want)
            }
        };
        assert_eq!(g.send(&mut iommu, &req), want as u8, "step {step}: {req:?}");
        for (i, blk) in eps.iter().enumerate() {
            assert_eq!(iommu.domain_of(ids[i]), attached[i]);
            let snap = blk.dma.snapshot();
            let addr = rng.below(PAGES + 4) * PAGE + rng.below(PAGE);
            let mapping = attached[i].and_then(|d| {
                domains[&d]
                    .range(..=addr)
                    .next_back()
                    .filter(|(_, m)| m.0 >= addr)
                    .map(|(&s, &m)| (s, m))
            });
            let readable = mapping.is_some_and(|(_, m)| m.2 & MAP_F_READ != 0);
            let writable = mapping.is_some_and(|(_, m)| m.2 & MAP_F_WRITE != 0);
            assert_eq!(snap.check(addr, 1, Access::Read).is_ok(), readable);
            assert_eq!(snap.check(addr, 1, Access::Write).is_ok(), writable);
            if let (true, Some((s, m))) = (readable, mapping) {
                let gpa = m.1 + (addr - s);
                assert_eq!(snap.read_obj::<u8>(addr).unwrap(), g.req.read(gpa, 1)[0]);
            }
        }
        for (d, m) in &domains {
            let got = iommu.mappings(*d).unwrap();
            assert_eq!(got.len(), m.len());
        }
        // Keep the pending-fault queue from filling with the probes' refusals.
        lock(&iommu.state.faults.pending).clear();
    }
}
