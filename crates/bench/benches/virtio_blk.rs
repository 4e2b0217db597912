//! virtio-blk throughput: the device model driven in-process by a synthetic driver (a split
//! queue of 256 in real guest memory, requests of header + data + status, 64 made available
//! per kick, as a guest with a deep queue does) against plain `pread`/`pwrite` of the same
//! file with the same request sizes, interleaved round by round so that machine noise hits both
//! alike (which goes first alternates). Prints min/median/max MiB/s of each, the ratio of the
//! medians (device / raw), the median of the per-round ratios, and the same ratio on the
//! thread's CPU time (what each side costs while it runs, not counting time the machine gave
//! to other processes: on a shared, loaded machine the wall-clock figures swing by 2x);
//! asserts nothing about time. Exits non-zero only when a request fails.
//!
//! The device's wall-clock time is that of its `process_queue` calls only: in a VM the driver
//! runs on the vCPU, not on the device's thread, so the driver's ring set-up and result checks
//! here are not the device's cost. Its CPU time is the whole run's, driver included (an upper
//! bound on the device's cost).
//!
//! Run with `cargo bench -p bench --bench virtio_blk`. Environment:
//! - `MANIFOLD_BENCH_ROUNDS`: rounds, default 11.
//! - `MANIFOLD_BENCH_DIR`: where the 256 MiB image goes, default the system temp directory.
//! - `MANIFOLD_BENCH_ONLY`: run only the workloads whose name contains this (e.g. `random read`).
//! - `MANIFOLD_BENCH_SIDE`: `raw` or `device`: run that side only and print no figures, for
//!   `perf record` or `time`, whose user/system split shows where each side's time goes.
//!
//! Workloads: 4 KiB random reads and writes, 128 KiB sequential reads and writes, all through
//! the host page cache (the image is written once first, so reads hit cached pages): what is
//! measured is the device's own cost per request (ring parsing, translation, `preadv`/`pwritev`
//! straight into guest memory) against a bare system call per request.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{Clock, Took, spread};
use devices::virtio::block::{Block, BlockBackend, BlockOptions};
use devices::virtio::{DmaSpace, VirtioDevice, VirtioInterrupt, features};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

const IMAGE: u64 = 256 << 20;
const QSIZE: u16 = 256;
/// Requests made available per kick (3 descriptors each).
const BATCH: u64 = 64;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDRS: u64 = 0x3000;
const STATUS: u64 = 0x4000;
const DATA: u64 = 0x10_0000;
const MEM: usize = 16 << 20;
const GOAL: f64 = 0.9;

/// The driver's interrupts are not wanted: it polls the used ring.
struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn signal_queue(&self, _queue: u16) {}
    fn signal_config(&self) {}
    fn set_needs_reset(&self) {}
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    op: Op,
    len: u64,
    random: bool,
    requests: u64,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4 KiB random read",
        op: Op::Read,
        len: 4 << 10,
        random: true,
        requests: 32768,
    },
    Workload {
        name: "4 KiB random write",
        op: Op::Write,
        len: 4 << 10,
        random: true,
        requests: 8192,
    },
    Workload {
        name: "128 KiB seq read",
        op: Op::Read,
        len: 128 << 10,
        random: false,
        requests: 4096,
    },
    Workload {
        name: "128 KiB seq write",
        op: Op::Write,
        len: 128 << 10,
        random: false,
        requests: 2048,
    },
];

/// Offsets of a workload's requests: a fixed xorshift sequence (random) or consecutive.
fn offsets(w: &Workload) -> Vec<u64> {
    let slots = IMAGE / w.len;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..w.requests)
        .map(|i| {
            let slot = if w.random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % slots
            } else {
                i % slots
            };
            slot * w.len
        })
        .collect()
}

/// The baseline: one system call per request, into (or from) as many distinct buffers as the
/// device's batch uses, so that both touch the same amount of memory.
fn raw(file: &File, w: &Workload, offsets: &[u64], buf: &mut [u8]) -> Result<Took, String> {
    let len = usize::try_from(w.len).map_err(|e| e.to_string())?;
    let slots = (buf.len() / len).min(BATCH as usize);
    let start = Clock::now();
    for (i, &off) in offsets.iter().enumerate() {
        let b = &mut buf[(i % slots) * len..][..len];
        match w.op {
            Op::Read => file.read_exact_at(b, off),
            Op::Write => file.write_all_at(b, off),
        }
        .map_err(|e| format!("raw I/O: {e}"))?;
    }
    Ok(start.elapsed())
}

/// The driver side of one queue, laid out by hand (virtio 1.2, 2.7). It reaches guest memory
/// through one slice over the whole region (bounds-checked, volatile), as cheaply as a guest
/// driver's plain stores, so that the driver's own work is not charged to the device.
struct Driver<'m> {
    mem: VolatileSlice<'m>,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver<'_> {
    fn put<T: vm_memory::ByteValued>(&self, addr: u64, v: T) -> Result<(), String> {
        self.mem
            .write_obj(v, addr as usize)
            .map_err(|e| format!("guest memory: {e}"))
    }

    fn get<T: vm_memory::ByteValued>(&self, addr: u64) -> Result<T, String> {
        self.mem
            .read_obj(addr as usize)
            .map_err(|e| format!("guest memory: {e}"))
    }

    /// Descriptor `i`: address, length, flags, next.
    fn desc(&self, i: u64, addr: u64, len: u32, flags: u16, next: u16) -> Result<(), String> {
        let at = DESC + 16 * i;
        self.put(at, addr)?;
        self.put(at + 8, len)?;
        self.put(at + 12, flags)?;
        self.put(at + 14, next)
    }

    /// Chains for `BATCH` requests of `len` bytes: header, data, status.
    fn lay_out(&self, op: Op, len: u64) -> Result<(), String> {
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let data_flags = NEXT | if op == Op::Read { WRITE } else { 0 };
        let kind: u32 = if op == Op::Read { 0 } else { 1 };
        let len32 = u32::try_from(len).map_err(|e| e.to_string())?;
        for r in 0..BATCH {
            let d = (3 * r) as u16;
            self.desc(3 * r, HDRS + 16 * r, 16, NEXT, d + 1)?;
            self.desc(3 * r + 1, DATA + r * len, len32, data_flags, d + 2)?;
            self.desc(3 * r + 2, STATUS + r, 1, WRITE, 0)?;
            self.put(HDRS + 16 * r, kind)?;
            self.put(HDRS + 16 * r + 4, 0u32)?;
        }
        Ok(())
    }

    /// Make requests for `sectors` available (one per chain slot), kick, check the results.
    /// Returns how long the device took to serve the kick.
    fn run_batch(&mut self, dev: &mut Block, byte_offsets: &[u64]) -> Result<Duration, String> {
        for (r, &off) in byte_offsets.iter().enumerate() {
            let r = r as u64;
            self.put(HDRS + 16 * r + 8, off / 512)?;
            self.put(STATUS + r, 0xffu8)?;
            let slot = u64::from(self.avail_idx % QSIZE);
            self.put(AVAIL + 4 + 2 * slot, (3 * r) as u16)?;
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.put(AVAIL + 2, self.avail_idx)?;
        let start = Instant::now();
        dev.process_queue(0);
        let took = start.elapsed();
        let used: u16 = self.get(USED + 2)?;
        let n = byte_offsets.len() as u16;
        if used != self.used_seen.wrapping_add(n) {
            return Err(format!(
                "{} requests used, {n} expected",
                used.wrapping_sub(self.used_seen)
            ));
        }
        self.used_seen = used;
        for r in 0..byte_offsets.len() as u64 {
            let s: u8 = self.get(STATUS + r)?;
            if s != 0 {
                return Err(format!("request status {s}"));
            }
        }
        Ok(took)
    }
}

fn device_run(
    dev: &mut Block,
    drv: &mut Driver,
    w: &Workload,
    offsets: &[u64],
) -> Result<Took, String> {
    drv.lay_out(w.op, w.len)?;
    let start = Clock::now();
    let mut wall = Duration::ZERO;
    for batch in offsets.chunks(BATCH as usize) {
        wall += drv.run_batch(dev, batch)?;
    }
    Ok(Took {
        wall,
        cpu: start.elapsed().cpu,
    })
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1_048_576.0 / d.as_secs_f64()
}

fn run() -> Result<(), String> {
    let rounds: usize = std::env::var("MANIFOLD_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(11);
    let dir = std::env::var_os("MANIFOLD_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("manifold-bench-blk-{}.img", std::process::id()));
    let result = measure(&path, rounds);
    let _ = std::fs::remove_file(&path);
    result
}

fn measure(path: &std::path::Path, rounds: usize) -> Result<(), String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("image {}: {e}", path.display()))?;
    // Written once, so that reads hit cached pages and writes overwrite allocated blocks.
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..IMAGE >> 20 {
        file.write_all_at(&chunk, i << 20)
            .map_err(|e| format!("image: {e}"))?;
    }
    let backend =
        BlockBackend::open(path, &BlockOptions::default()).map_err(|e| format!("backend: {e}"))?;
    let mut dev = Block::new(backend);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)])
        .map_err(|e| format!("guest memory: {e}"))?;
    let mut q = Queue::new(QSIZE).map_err(|e| format!("queue: {e}"))?;
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    dev.ack_features(features::VERSION_1);
    dev.activate(
        vec![q],
        Arc::new(NoInterrupt),
        DmaSpace::identity(mem.clone()),
    )
    .map_err(|e| format!("activate: {e}"))?;
    let mut drv = Driver {
        mem: mem
            .get_slice(GuestAddress(0), MEM)
            .map_err(|e| format!("guest memory: {e}"))?,
        avail_idx: 0,
        used_seen: 0,
    };
    let mut buf = vec![0xa5u8; (BATCH << 17) as usize];

    println!(
        "virtio-blk device model vs pread/pwrite, {rounds} interleaved rounds, 256 MiB image \
         (page cache); MiB/s min/median/max; ratio = device median / raw median, the median \
         of the per-round ratios, and cpu = the median per-round ratio of thread CPU time \
         (raw / device)\n"
    );
    println!(
        "{:<20} {:>22} {:>22} {:>7} {:>9} {:>7}  goal",
        "workload", "raw MiB/s", "device MiB/s", "ratio", "per-round", "cpu"
    );
    let mut below = Vec::new();
    let only = std::env::var("MANIFOLD_BENCH_ONLY").unwrap_or_default();
    for w in WORKLOADS.iter().filter(|w| w.name.contains(only.as_str())) {
        let offs = offsets(w);
        let bytes = w.len * w.requests;
        let (mut r, mut d, mut per_round, mut cpu) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // One unmeasured round each to warm caches.
        raw(&file, w, &offs, &mut buf)?;
        device_run(&mut dev, &mut drv, w, &offs)?;
        if let Ok(side) = std::env::var("MANIFOLD_BENCH_SIDE") {
            // One side only, for a profiler or `time`: no figures.
            for _ in 0..rounds {
                if side == "device" {
                    device_run(&mut dev, &mut drv, w, &offs)?;
                } else {
                    raw(&file, w, &offs, &mut buf)?;
                }
            }
            println!("{}: {rounds} rounds of the {side} side only", w.name);
            continue;
        }
        for i in 0..rounds {
            // Alternate which goes first, so that neither always follows the other.
            let (rr, dd) = if i % 2 == 0 {
                let rr = raw(&file, w, &offs, &mut buf)?;
                (rr, device_run(&mut dev, &mut drv, w, &offs)?)
            } else {
                let dd = device_run(&mut dev, &mut drv, w, &offs)?;
                (raw(&file, w, &offs, &mut buf)?, dd)
            };
            r.push(mib_s(bytes, rr.wall));
            d.push(mib_s(bytes, dd.wall));
            per_round.push(mib_s(bytes, dd.wall) / mib_s(bytes, rr.wall));
            cpu.push(rr.cpu.as_secs_f64() / dd.cpu.as_secs_f64());
        }
        let (r_min, r_med, r_max) = spread(&r);
        let (d_min, d_med, d_max) = spread(&d);
        let ratio = d_med / r_med;
        let (_, round_med, _) = spread(&per_round);
        let (_, cpu_med, _) = spread(&cpu);
        let mark = if ratio >= GOAL { "ok" } else { "BELOW" };
        if ratio < GOAL {
            below.push(w.name);
        }
        println!(
            "{:<20} {:>22} {:>22} {:>6.2}x {:>8.2}x {:>6.2}x  >= {GOAL}x {mark}",
            w.name,
            format!("{r_min:.0}/{r_med:.0}/{r_max:.0}"),
            format!("{d_min:.0}/{d_med:.0}/{d_max:.0}"),
            ratio,
            round_med,
            cpu_med
        );
    }
    if !below.is_empty() {
        println!("\nbelow the goal: {}", below.join(", "));
    }
    Ok(())
}

fn main() {
    // `cargo test --all-targets` runs this binary without `--bench`: skip the measuring.
    if !std::env::args().any(|a| a == "--bench") {
        println!("virtio_blk: skipped (run it with `cargo bench -p bench --bench virtio_blk`)");
        return;
    }
    if let Err(e) = run() {
        eprintln!("virtio_blk bench: FAILED: {e}");
        std::process::exit(1);
    }
}
