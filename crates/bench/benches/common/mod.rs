//! What the device benchmarks share: a clock that reads wall-clock and thread CPU time,
//! min/median/max of a sample, the `MANIFOLD_BENCH_*` settings, `main`'s skip and failure
//! handling, a counting allocator, a split queue's set-up, and the synthetic drivers' parts
//! (`blk`, `net`). Each benchmark uses a part of it.

#![allow(dead_code)]

pub mod blk;
pub mod net;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use devices::virtio::VirtioInterrupt;
use virtio_queue::{Queue, QueueT};

/// Wall-clock and this thread's CPU time.
#[derive(Clone, Copy)]
pub struct Clock {
    wall: Instant,
    cpu: Duration,
}

/// Elapsed wall-clock and CPU time of one side's run.
#[derive(Clone, Copy)]
pub struct Took {
    pub wall: Duration,
    pub cpu: Duration,
}

impl Clock {
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec, which lives for the call.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Self {
            wall: Instant::now(),
            // The clock counts up from 0: both fields are non-negative.
            cpu: Duration::new(
                u64::try_from(ts.tv_sec).unwrap_or(0),
                u32::try_from(ts.tv_nsec).unwrap_or(0),
            ),
        }
    }

    pub fn elapsed(&self) -> Took {
        let now = Self::now();
        Took {
            wall: now.wall - self.wall,
            cpu: now.cpu.saturating_sub(self.cpu),
        }
    }
}

impl std::ops::AddAssign for Took {
    fn add_assign(&mut self, other: Self) {
        self.wall += other.wall;
        self.cpu += other.cpu;
    }
}

impl Took {
    pub const ZERO: Took = Took {
        wall: Duration::ZERO,
        cpu: Duration::ZERO,
    };
}

/// Min, median and max of a sample.
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// `MANIFOLD_BENCH_ROUNDS`, or `default` when unset, not a number or 0.
pub fn rounds(default: usize) -> usize {
    std::env::var("MANIFOLD_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// A bench's `main`: measure with `run`, exit non-zero when it fails.
pub fn main(name: &str, run: impl FnOnce() -> Result<(), String>) {
    // `cargo test --all-targets` runs this binary without `--bench`: skip the measuring.
    if !std::env::args().any(|a| a == "--bench") {
        println!("{name}: skipped (run it with `cargo bench -p bench --bench {name}`)");
        return;
    }
    if let Err(e) = run() {
        eprintln!("{name} bench: FAILED: {e}");
        std::process::exit(1);
    }
}

/// Run `f` on a fresh image path `manifold-bench-{tag}-<pid>.img` in `MANIFOLD_BENCH_DIR`
/// (default the system temp directory), and remove the file afterwards, whatever happened.
pub fn with_image(tag: &str, f: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), String> {
    let dir = std::env::var_os("MANIFOLD_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("manifold-bench-{tag}-{}.img", std::process::id()));
    let result = f(&path);
    let _ = std::fs::remove_file(&path);
    result
}

/// Heap bytes in use, for memory per VF or per mapping. A bench that wants it installs
/// `#[global_allocator] static ALLOC: Counting = Counting;` (the others keep the plain one).
pub struct Counting;

pub static IN_USE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        IN_USE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// The synthetic drivers' interrupts are not wanted: they poll the used rings.
pub struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn signal_queue(&self, _queue: u16) {}
    fn signal_config(&self) {}
    fn set_needs_reset(&self) {}
}

/// A split queue of `size` at `base` (descriptors, then the available ring at +0x1000, the
/// used ring at +0x2000), as seen by a device that adds `offset` to every address.
pub fn queue(base: u64, size: u16, offset: u64) -> Result<Queue, String> {
    let mut q = Queue::new(size).map_err(|e| format!("queue: {e}"))?;
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(base + offset);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(base + 0x1000 + offset);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(base + 0x2000 + offset);
    q.set_used_ring_address(lo, hi);
    q.set_ready(true);
    Ok(q)
}
