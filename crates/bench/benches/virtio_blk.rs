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

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

mod common;

use common::blk::{self, BATCH, Op, Workload};
use common::{Clock, Took, spread};
use devices::virtio::block::{Block, BlockBackend, BlockOptions};
use devices::virtio::{DmaSpace, VirtioDevice};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

const IMAGE: u64 = 256 << 20;
const MEM: usize = 16 << 20;
const GOAL: f64 = 0.9;

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

/// The driver side of the queue (`common::blk`). It reaches guest memory through one slice
/// over the whole region, so that the driver's own work is not charged to the device.
struct Driver<'m> {
    mem: VolatileSlice<'m>,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver<'_> {
    /// Make requests for `byte_offsets` available (one per chain slot), kick, check the
    /// results. Returns how long the device took to serve the kick.
    fn run_batch(&mut self, dev: &mut Block, byte_offsets: &[u64]) -> Result<Duration, String> {
        blk::make_available(&self.mem, &mut self.avail_idx, byte_offsets)?;
        let start = Instant::now();
        dev.process_queue(0);
        let took = start.elapsed();
        blk::check_used(&self.mem, &mut self.used_seen, byte_offsets.len())?;
        Ok(took)
    }
}

fn device_run(
    dev: &mut Block,
    drv: &mut Driver,
    w: &Workload,
    offsets: &[u64],
) -> Result<Took, String> {
    blk::lay_out(&drv.mem, w.op, w.len, 0)?;
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
    let rounds = common::rounds(11);
    common::with_image("blk", |path| measure(path, rounds))
}

fn measure(path: &std::path::Path, rounds: usize) -> Result<(), String> {
    let file = blk::image(path, IMAGE)?;
    let backend =
        BlockBackend::open(path, &BlockOptions::default()).map_err(|e| format!("backend: {e}"))?;
    let mut dev = Block::new(backend);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)])
        .map_err(|e| format!("guest memory: {e}"))?;
    blk::activate(&mut dev, 0, DmaSpace::identity(mem.clone()))?;
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
        let offs = blk::offsets(w, IMAGE);
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
    common::main("virtio_blk", run);
}
