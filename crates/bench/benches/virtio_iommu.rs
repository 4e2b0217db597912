//! virtio-iommu costs, measured in one run:
//!
//! 1. virtio-blk device-model throughput behind the IOMMU (the disk's rings, headers and data
//!    mapped at IOVAs 4 GiB above their GPAs, with 2 MiB or 4 KiB mappings) against the same
//!    device with the identity `DmaSpace`, interleaved round by round; plus the IOTLB hit rate
//!    of the translated runs (translations not refused) and how many were answered by a
//!    snapshot's cache of recent mappings rather than the domain's table. Same synthetic driver as `virtio_blk` (a queue of 256 in real
//!    guest memory, 64 requests of header + data + status per kick), page-cached image.
//! 2. The cost of one MAP and one UNMAP request (median over 2,000, each its own kick, through
//!    the request queue) and the heap the IOMMU holds per 1,000 live 4 KiB mappings (a
//!    counting allocator; IOVAs spaced so that the IOTLB cannot merge them).
//!
//! Run with `cargo bench -p bench --bench virtio_iommu`. `MANIFOLD_BENCH_ROUNDS` (default 9),
//! `MANIFOLD_BENCH_DIR` (where the 64 MiB image goes). Exits non-zero only when a request
//! fails.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::blk::{self, BATCH, DATA, DESC, DriverMem, Op, QSIZE, Workload};
use common::{Counting, IN_USE, NoInterrupt, queue};
use devices::virtio::block::{Block, BlockBackend, BlockOptions};
use devices::virtio::iommu::request::{MAP_F_READ, MAP_F_WRITE, T_ATTACH, T_MAP, T_UNMAP};
use devices::virtio::iommu::{Endpoint, IommuConfig, REQUEST_QUEUE, VirtioIommu, feature};
use devices::virtio::{DmaSpace, VirtioDevice, features};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Heap bytes in use, for memory per mapping.
#[global_allocator]
static ALLOC: Counting = Counting;

const IMAGE: u64 = 64 << 20;
/// The IOMMU's request queue and buffers (GPAs; it is not behind itself).
const IOMMU_RING: u64 = 0x8000;
const IOMMU_REQ: u64 = 0xc000;
const IOMMU_RESP: u64 = 0xc100;
/// Guest memory, and how much of it the disk's endpoint gets mapped.
const MEM: usize = 32 << 20;
const MAPPED: u64 = 16 << 20;
/// IOVA = GPA + this for the translated endpoint.
const IOVA_OFFSET: u64 = 1 << 32;
const GOAL: f64 = 0.9;

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// The guest's side of a split queue: descriptors, available and used rings by hand.
struct Ring {
    mem: GuestMemoryMmap,
    base: u64,
    size: u16,
    avail_idx: u16,
}

impl Ring {
    fn put<T: vm_memory::ByteValued>(&self, addr: u64, v: T) -> Result<(), String> {
        self.mem.put(addr, v)
    }

    fn get<T: vm_memory::ByteValued>(&self, addr: u64) -> Result<T, String> {
        self.mem.get(addr)
    }

    fn desc(&self, i: u64, addr: u64, len: u32, flags: u16, next: u16) -> Result<(), String> {
        self.mem.desc(self.base, i, addr, len, flags, next)
    }

    fn publish(&mut self, head: u16) -> Result<(), String> {
        let slot = u64::from(self.avail_idx % self.size);
        self.put(self.base + 0x1000 + 4 + 2 * slot, head)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::Release);
        self.put(self.base + 0x1000 + 2, self.avail_idx)
    }

    fn used_idx(&self) -> Result<u16, String> {
        self.get(self.base + 0x2000 + 2)
    }
}

/// The IOMMU and its guest driver.
struct Iommu {
    dev: VirtioIommu,
    ring: Ring,
}

impl Iommu {
    /// Send one request and check that it came back OK.
    fn send(&mut self, req: &[u8]) -> Result<(), String> {
        self.ring
            .mem
            .write_slice(req, GuestAddress(IOMMU_REQ))
            .map_err(err("guest memory"))?;
        self.ring.put(IOMMU_RESP, 0xffu8)?;
        self.ring.desc(0, IOMMU_REQ, req.len() as u32, 1, 1)?;
        self.ring.desc(1, IOMMU_RESP, 4, 2, 0)?;
        self.ring.publish(0)?;
        self.dev.process_queue(REQUEST_QUEUE);
        if self.ring.used_idx()? != self.ring.avail_idx {
            return Err("IOMMU request not returned".into());
        }
        match self.ring.get::<u8>(IOMMU_RESP)? {
            0 => Ok(()),
            s => Err(format!("IOMMU request {} failed with status {s}", req[0])),
        }
    }

    fn attach(&mut self, domain: u32, ep: u32) -> Result<(), String> {
        let mut r = vec![T_ATTACH, 0, 0, 0];
        r.extend(domain.to_le_bytes());
        r.extend(ep.to_le_bytes());
        r.extend([0u8; 8]);
        self.send(&r)
    }

    fn map(&mut self, domain: u32, iova: u64, gpa: u64, len: u64) -> Result<(), String> {
        let mut r = vec![T_MAP, 0, 0, 0];
        r.extend(domain.to_le_bytes());
        r.extend(iova.to_le_bytes());
        r.extend((iova + len - 1).to_le_bytes());
        r.extend(gpa.to_le_bytes());
        r.extend((MAP_F_READ | MAP_F_WRITE).to_le_bytes());
        self.send(&r)
    }

    fn unmap(&mut self, domain: u32, iova: u64, len: u64) -> Result<(), String> {
        let mut r = vec![T_UNMAP, 0, 0, 0];
        r.extend(domain.to_le_bytes());
        r.extend(iova.to_le_bytes());
        r.extend((iova + len - 1).to_le_bytes());
        r.extend([0u8; 4]);
        self.send(&r)
    }
}

/// An IOMMU in front of `dma` (endpoint 8), driven through its queue at IOMMU_RING.
fn iommu(mem: &GuestMemoryMmap, dma: &DmaSpace, dev: Arc<Mutex<Block>>) -> Result<Iommu, String> {
    let ep = Endpoint::locked_by(dma.clone(), dev);
    let mut dev = VirtioIommu::new(IommuConfig::default(), [(8, ep)]).map_err(err("iommu"))?;
    let ring = Ring {
        mem: mem.clone(),
        base: IOMMU_RING,
        size: 16,
        avail_idx: 0,
    };
    for page in 0..3 {
        ring.mem
            .write_slice(&[0u8; 0x1000], GuestAddress(IOMMU_RING + page * 0x1000))
            .map_err(err("guest memory"))?;
    }
    dev.ack_features(features::VERSION_1 | feature::OFFERED);
    let q = queue(IOMMU_RING, 16, 0)?;
    let idle = Queue::new(16).map_err(err("queue"))?;
    let mut idle = idle;
    idle.set_size(16);
    dev.activate(
        vec![q, idle],
        Arc::new(NoInterrupt),
        DmaSpace::identity(mem.clone()),
    )
    .map_err(err("iommu activate"))?;
    Ok(Iommu { dev, ring })
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "4 KiB random read",
        op: Op::Read,
        len: 4 << 10,
        random: true,
        requests: 16384,
    },
    Workload {
        name: "4 KiB random write",
        op: Op::Write,
        len: 4 << 10,
        random: true,
        requests: 16384,
    },
    Workload {
        name: "128 KiB seq read",
        op: Op::Read,
        len: 128 << 10,
        random: false,
        requests: 2048,
    },
];

/// One virtio-blk device and its driver; `offset` is what the device adds to every GPA.
struct Disk {
    dev: Arc<Mutex<Block>>,
    ring: Ring,
    offset: u64,
    used_seen: u16,
}

impl Disk {
    /// All of `offsets`, `BATCH` per kick; the time includes the driver's work.
    fn run(&mut self, w: &Workload, offsets: &[u64]) -> Result<Duration, String> {
        blk::lay_out(&self.ring.mem, w.op, w.len, self.offset)?;
        let start = Instant::now();
        for batch in offsets.chunks(BATCH as usize) {
            blk::make_available(&self.ring.mem, &mut self.ring.avail_idx, batch)?;
            self.dev
                .lock()
                .map_err(|_| "device lock poisoned".to_string())?
                .process_queue(0);
            blk::check_used(&self.ring.mem, &mut self.used_seen, batch.len())?;
        }
        Ok(start.elapsed())
    }
}

fn disk(
    path: &std::path::Path,
    mem: &GuestMemoryMmap,
) -> Result<(Arc<Mutex<Block>>, DmaSpace), String> {
    let backend = BlockBackend::open(path, &BlockOptions::default()).map_err(err("backend"))?;
    Ok((
        Arc::new(Mutex::new(Block::new(backend))),
        DmaSpace::identity(mem.clone()),
    ))
}

fn activate(d: &Disk, dma: DmaSpace) -> Result<(), String> {
    let mut dev = d
        .dev
        .lock()
        .map_err(|_| "device lock poisoned".to_string())?;
    blk::activate(&mut dev, d.offset, dma)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1_048_576.0 / d.as_secs_f64()
}

fn measure(path: &std::path::Path, rounds: usize) -> Result<(), String> {
    // Written once, open for the run; the devices open it themselves.
    let _file = blk::image(path, IMAGE)?;
    let ring = |mem: &GuestMemoryMmap| Ring {
        mem: mem.clone(),
        base: DESC,
        size: QSIZE,
        avail_idx: 0,
    };

    // Identity, and two devices behind IOMMUs mapping the first MAPPED bytes at IOVA_OFFSET in
    // 2 MiB and 4 KiB pieces. Each device gets its own guest memory (same layout).
    let mut disks = Vec::new();
    let mut iommus = Vec::new();
    for piece in [0u64, 2 << 20, 4 << 10] {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).map_err(err("memory"))?;
        let (dev, dma) = disk(path, &mem)?;
        let offset = if piece == 0 { 0 } else { IOVA_OFFSET };
        if piece != 0 {
            let mut io = iommu(&mem, &dma, dev.clone())?;
            io.attach(1, 8)?;
            for at in (0..MAPPED).step_by(piece as usize) {
                io.map(1, at + IOVA_OFFSET, at, piece)?;
            }
            iommus.push(io);
        }
        let d = Disk {
            dev,
            ring: ring(&mem),
            offset,
            used_seen: 0,
        };
        activate(&d, dma)?;
        disks.push(d);
    }

    println!(
        "virtio-blk device model behind virtio-iommu vs the same device with identity DMA, \
         {rounds} interleaved rounds, 64 MiB image (page cache), MiB/s medians\n"
    );
    println!(
        "{:<20} {:>10} {:>12} {:>7} {:>12} {:>7}  goal (2 MiB)",
        "workload", "identity", "iommu 2 MiB", "ratio", "iommu 4 KiB", "ratio"
    );
    let mut below = false;
    for w in &WORKLOADS {
        let offs = blk::offsets(w, IMAGE);
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); disks.len()];
        for d in disks.iter_mut() {
            d.run(w, &offs)?;
        }
        for round in 0..rounds {
            // Rotate who goes first so that drift hits all alike.
            for k in 0..disks.len() {
                let i = (k + round) % disks.len();
                times[i].push(disks[i].run(w, &offs)?);
            }
        }
        let bytes = w.len * w.requests;
        let rate: Vec<f64> = times.iter_mut().map(|t| mib_s(bytes, median(t))).collect();
        let (r2, r4) = (rate[1] / rate[0], rate[2] / rate[0]);
        let mark = if r2 >= GOAL { "ok" } else { "BELOW" };
        below |= r2 < GOAL;
        println!(
            "{:<20} {:>10.0} {:>12.0} {:>6.2}x {:>12.0} {:>6.2}x  >= {GOAL}x {mark}",
            w.name, rate[0], rate[1], r2, rate[2], r4
        );
    }
    for (io, name) in iommus.iter().zip(["2 MiB", "4 KiB"]) {
        if let Some(s) = io.dev.iotlb_stats(1) {
            let hit = 100.0 * (s.lookups - s.misses) as f64 / s.lookups.max(1) as f64;
            let cached = 100.0 * s.cached as f64 / s.lookups.max(1) as f64;
            println!(
                "IOTLB ({name} mappings, {} mappings): {} lookups, {} misses, hit rate {hit:.3}%; \
                 {cached:.1}% answered by the snapshot's cache of recent mappings, the rest \
                 from the domain's table",
                io.dev.mapping_count(),
                s.lookups,
                s.misses
            );
        }
    }
    if below {
        println!("below the goal with 2 MiB mappings");
    }

    access_cost(rounds)?;

    // MAP and UNMAP cost, and memory per mapping: a fresh IOMMU and endpoint.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).map_err(err("memory"))?;
    let (dev, dma) = disk(path, &mem)?;
    let mut io = iommu(&mem, &dma, dev)?;
    io.attach(1, 8)?;
    const N: u64 = 2000;
    // 4 KiB mappings 8 KiB apart (never merged), to distinct GPAs.
    let iova = |i: u64| (1 << 32) + i * 0x2000;
    let gpa = |i: u64| 0x10_0000 + (i % 4096) * 0x1000;
    let mut map_t = Vec::with_capacity(N as usize);
    let heap_before = IN_USE.load(Ordering::Relaxed);
    for i in 0..N {
        let t = Instant::now();
        io.map(1, iova(i), gpa(i), 0x1000)?;
        map_t.push(t.elapsed());
        if i == 999 {
            let heap = IN_USE.load(Ordering::Relaxed).wrapping_sub(heap_before);
            println!(
                "\nheap per 1,000 live 4 KiB mappings: {:.1} KiB ({} bytes per mapping)",
                heap as f64 / 1024.0,
                heap / 1000
            );
        }
    }
    let mut unmap_t = Vec::with_capacity(N as usize);
    for i in 0..N {
        let t = Instant::now();
        io.unmap(1, iova(i), 0x1000)?;
        unmap_t.push(t.elapsed());
    }
    println!(
        "MAP request: median {:?} (with {N} mappings live at the end); UNMAP request: median {:?}",
        median(&mut map_t),
        median(&mut unmap_t)
    );
    Ok(())
}

/// One translated access on its own: an 8-byte read through a snapshot (a device's copy) and
/// through the `GuestMemory` trait (what a ring access is), identity against 2 MiB and 4 KiB
/// mappings; 64 distinct pages, one read each in turn. Nanoseconds per access, median of rounds.
fn access_cost(rounds: usize) -> Result<(), String> {
    use devices::virtio::dma::DmaIommu;
    use vm_memory::Permissions;
    const N: u64 = 1 << 20;
    const PAGES: u64 = 64;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).map_err(err("memory"))?;
    let mut spaces = vec![(DmaSpace::identity(mem.clone()), 0u64)];
    for piece in [2u64 << 20, 4 << 10] {
        let iommu = DmaIommu::new();
        for at in (0..MAPPED).step_by(piece as usize) {
            iommu
                .map(at + IOVA_OFFSET, at, piece, Permissions::ReadWrite)
                .map_err(err("map"))?;
        }
        spaces.push((DmaSpace::with_iommu(mem.clone(), iommu), IOVA_OFFSET));
    }
    let mut ns = vec![[Vec::new(), Vec::new()]; spaces.len()];
    for _ in 0..rounds {
        for (i, (dma, offset)) in spaces.iter().enumerate() {
            for (way, out) in ns[i].iter_mut().enumerate() {
                let snap = dma.snapshot();
                let start = Instant::now();
                let mut sum = 0u64;
                for k in 0..N {
                    let addr = offset + DATA + (k % PAGES) * 0x1000 + (k / PAGES % 512) * 8;
                    sum = sum.wrapping_add(if way == 0 {
                        snap.read_obj::<u64>(addr).map_err(err("read"))?
                    } else {
                        snap.memory()
                            .read_obj::<u64>(GuestAddress(addr))
                            .map_err(err("read"))?
                    });
                }
                std::hint::black_box(sum);
                out.push(start.elapsed());
                drop(snap);
            }
        }
    }
    let m = |v: &mut Vec<Duration>| median(v).as_secs_f64() * 1e9 / N as f64;
    println!(
        "\none 8-byte read, ns (median of {rounds} rounds of {N}, 64 pages in turn): \
         DmaSnapshot::read / GuestMemory::read_obj"
    );
    for (i, name) in ["identity", "iommu 2 MiB", "iommu 4 KiB"]
        .iter()
        .enumerate()
    {
        let [a, b] = &mut ns[i];
        println!("{name:<12} {:>6.1} / {:>6.1}", m(a), m(b));
    }
    Ok(())
}

fn main() {
    common::main("virtio_iommu", || {
        let rounds = common::rounds(9);
        common::with_image("iommu", |path| measure(path, rounds))
    });
}
