//! virtio-net packet rate: the device model driven in-process by a synthetic driver (both split
//! queues of 256 in real guest memory) to and from a tap, against raw `write`s and `read`s of
//! the same frames on the same tap, interleaved round by round (which goes first alternates).
//! Prints min/median/max packets per second of each, the ratio of the medians (device / raw),
//! the median of the per-round ratios, and the same ratio on the thread's CPU time (not
//! counting time the machine gave to other processes); asserts nothing about time.
//!
//! - TX (guest -> tap): `BATCH` one-descriptor chains (vnet header + frame) made available per
//!   kick, served by `process_queue(TX)`; raw: one `write` per frame on the tap's fd, from the
//!   same guest buffers in the same order (as the raw RX reads into rotating buffers). The
//!   device's time is the whole run's, the driver's ring updates included (an upper bound):
//!   timing only the `process_queue` calls would leave out the softirq work the tap defers
//!   between kicks, which the raw loop pays inside its timing (that gave the device > 1.0x).
//! - RX (tap -> guest): the frames are queued on the tap first (an AF_PACKET socket sends them
//!   out of the tap, untimed); timed is the device moving them into 2 KiB receive buffers
//!   (`process_backend`, MRG_RXBUF as Linux negotiates it) against one `read` per frame;
//!   wall-clock and CPU time of those steps only, on both sides. The `TSO` rows do the same
//!   with the device restarted with guest checksum and TSO offloads: then the tap may hand
//!   over 64 KiB frames, and the device reads each frame with a `readv` that has room behind
//!   the 2 KiB chain, where without them one plain `read` does (the tap's MTU bounds frames).
//!
//! The tap lives in a network namespace of the benchmark's own (`unshare(CLONE_NEWNET)`), which
//! goes away with the process. That needs root: without it the benchmark says so and skips.
//!
//! Run with `cargo bench -p bench --bench virtio_net`. Environment: `MANIFOLD_BENCH_ROUNDS`
//! (default 11), `MANIFOLD_BENCH_ONLY` (workloads whose name contains it, e.g. `TX`),
//! `MANIFOLD_BENCH_SIDE` (`raw` or `device`: run that side only and print no figures, for
//! `perf record` or `time`, whose user/system split shows where each side's time goes).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::net::{VIRTIO_NET_F_MRG_RXBUF, frame, last_err, own_namespace, tap_up};
use common::{Clock, NoInterrupt, Took, spread};
use devices::virtio::net::{Net, NetConfig, TX_QUEUE, Tap, VNET_HDR_LEN};
use devices::virtio::{DmaSpace, VirtioDevice, features};
use virtio_queue::Queue;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory, VolatileSlice,
};

const QSIZE: u16 = 256;
/// Transmit chains made available per kick.
const BATCH: u16 = 64;
/// Frames queued on the tap per receive step (under the tap's queue of 500).
const RX_STEP: u16 = 256;
/// Frames per round and direction.
const FRAMES: u32 = 16384;
/// Ring layout: receive queue, transmit queue, then buffers (2 KiB each).
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x4000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
const BUF_LEN: u64 = 2048;
const MEM: usize = 16 << 20;
const GOAL: f64 = 0.9;
/// GUEST_CSUM, GUEST_TSO4 and GUEST_TSO6, as Linux acks them (virtio 1.2, 5.1.3).
const GUEST_TSO: u64 = 1 << 1 | 1 << 7 | 1 << 8;
/// The frames' source; they go to the broadcast address.
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Offsets of one split queue's parts (virtio 1.2, 2.7).
#[derive(Clone, Copy)]
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
}

impl Ring {
    const fn at(base: u64) -> Self {
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    fn queue(&self) -> Result<Queue, String> {
        common::queue(self.desc, QSIZE, 0)
    }
}

/// The driver's side of both queues, through one slice over guest memory (as cheap as a
/// guest's plain stores, so that its work is not charged to the device).
struct Driver<'m> {
    mem: VolatileSlice<'m>,
    tx_avail: u16,
    tx_used: u16,
    rx_avail: u16,
    rx_used: u16,
    /// The device was started with guest TSO.
    tso: bool,
}

impl Driver<'_> {
    /// One volatile store, as a guest's driver makes (`write_obj` would go through a
    /// byte-copy loop and charge the device ~70 instructions a frame it does not spend).
    fn put<T: vm_memory::ByteValued>(&self, addr: u64, v: T) -> Result<(), String> {
        self.mem
            .get_ref::<T>(addr as usize)
            .map(|r| r.store(v))
            .map_err(|e| format!("guest memory: {e}"))
    }

    fn get<T: vm_memory::ByteValued>(&self, addr: u64) -> Result<T, String> {
        self.mem
            .get_ref::<T>(addr as usize)
            .map(|r| r.load())
            .map_err(|e| format!("guest memory: {e}"))
    }

    fn desc(&self, ring: Ring, i: u64, addr: u64, len: u32, flags: u16) -> Result<(), String> {
        let at = ring.desc + 16 * i;
        self.put(at, addr)?;
        self.put(at + 8, len)?;
        self.put(at + 12, flags)?;
        self.put(at + 14, 0u16)
    }

    /// Transmit descriptors: one per buffer, header and frame together (as Linux sends a
    /// linear skb with its header in the headroom).
    fn lay_out_tx(&self, frame: &[u8]) -> Result<(), String> {
        let len = u32::try_from(VNET_HDR_LEN + frame.len()).map_err(|e| e.to_string())?;
        for i in 0..u64::from(QSIZE) {
            let buf = TX_BUFS + i * BUF_LEN;
            self.desc(Ring::at(TX_RING), i, buf, len, 0)?;
            self.mem
                .write_slice(&[0u8; VNET_HDR_LEN], buf as usize)
                .map_err(|e| e.to_string())?;
            self.mem
                .write_slice(frame, buf as usize + VNET_HDR_LEN)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Receive descriptors: one writable 2 KiB buffer per chain, all posted.
    fn lay_out_rx(&mut self) -> Result<(), String> {
        for i in 0..u64::from(QSIZE) {
            self.desc(
                Ring::at(RX_RING),
                i,
                RX_BUFS + i * BUF_LEN,
                BUF_LEN as u32,
                2,
            )?;
        }
        self.post_rx(QSIZE)
    }

    /// Make `n` more receive chains available (they are recycled in ring order).
    fn post_rx(&mut self, n: u16) -> Result<(), String> {
        let ring = Ring::at(RX_RING);
        for _ in 0..n {
            let slot = u64::from(self.rx_avail % QSIZE);
            self.put(ring.avail + 4 + 2 * slot, self.rx_avail % QSIZE)?;
            self.rx_avail = self.rx_avail.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.put(ring.avail + 2, self.rx_avail)
    }

    /// Transmit `n` frames: make chains available `BATCH` per kick.
    fn transmit(&mut self, dev: &mut Net<Tap>, n: u32) -> Result<(), String> {
        let ring = Ring::at(TX_RING);
        let mut left = n;
        while left > 0 {
            let k = left.min(u32::from(BATCH)) as u16;
            for _ in 0..k {
                let slot = u64::from(self.tx_avail % QSIZE);
                self.put(ring.avail + 4 + 2 * slot, self.tx_avail % QSIZE)?;
                self.tx_avail = self.tx_avail.wrapping_add(1);
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            self.put(ring.avail + 2, self.tx_avail)?;
            dev.process_queue(TX_QUEUE);
            let used: u16 = self.get(ring.used + 2)?;
            if used != self.tx_used.wrapping_add(k) {
                return Err(format!(
                    "TX: {} chains used, {k} expected",
                    used.wrapping_sub(self.tx_used)
                ));
            }
            self.tx_used = used;
            left -= u32::from(k);
        }
        Ok(())
    }

    /// Receive chains the device has used since the last call.
    fn rx_done(&mut self) -> Result<u16, String> {
        let used: u16 = self.get(Ring::at(RX_RING).used + 2)?;
        let n = used.wrapping_sub(self.rx_used);
        self.rx_used = used;
        Ok(n)
    }
}

/// An AF_PACKET socket on the tap: what it sends comes out of the tap's fd.
struct Injector {
    fd: std::os::fd::OwnedFd,
}

impl Injector {
    fn new(ifname: &str) -> Result<Self, String> {
        let name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated name that lives for the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(format!("if_nametoindex {ifname}: {}", last_err()));
        }
        // SAFETY: plain socket(2); the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if raw < 0 {
            return Err(format!("AF_PACKET socket: {}", last_err()));
        }
        // SAFETY: `raw` is a socket just opened and owned by nothing else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = i32::try_from(index).map_err(|e| e.to_string())?;
        // SAFETY: binds the socket to a sockaddr_ll that lives for the call, with its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(format!("bind AF_PACKET: {}", last_err()));
        }
        Ok(Self { fd })
    }

    fn send(&self, frame: &[u8], n: u16) -> Result<(), String> {
        for _ in 0..n {
            // SAFETY: sends `frame`, which lives for the call.
            let rc =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if rc < 0 {
                return Err(format!("AF_PACKET send: {}", last_err()));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Tx,
    Rx,
}

/// Raw TX: one write(2) per frame (header + frame) on the tap's fd, from the same transmit
/// buffers in guest memory that the device sends, in the same order (so that both sides copy
/// the same bytes from the same addresses: 2 KiB apart, they share few cache sets).
fn raw_tx(fd: RawFd, mem: &VolatileSlice<'_>, len: usize) -> Result<Took, String> {
    let start = Clock::now();
    for i in 0..FRAMES {
        let at = (TX_BUFS + u64::from(i % u32::from(QSIZE)) * BUF_LEN) as usize;
        let buf = mem.subslice(at, len).map_err(|e| e.to_string())?;
        let g = buf.ptr_guard();
        // SAFETY: writes from `len` bytes of guest memory, mapped for the benchmark's whole run,
        // to the tap's fd.
        let n = unsafe { libc::write(fd, g.as_ptr().cast(), len) };
        if usize::try_from(n).ok() != Some(len) {
            return Err(format!("tap write: {n}: {}", last_err()));
        }
    }
    Ok(start.elapsed())
}

/// Raw RX: frames queued on the tap (untimed), then one read per frame into as many 2 KiB
/// buffers as the device's ring has.
fn raw_rx(fd: RawFd, inj: &Injector, frame: &[u8], bufs: &mut [u8]) -> Result<Took, String> {
    let mut total = Took::ZERO;
    let mut slot = 0usize;
    let slots = bufs.len() / BUF_LEN as usize;
    for _ in 0..FRAMES / u32::from(RX_STEP) {
        inj.send(frame, RX_STEP)?;
        let start = Clock::now();
        for _ in 0..RX_STEP {
            let b = &mut bufs[slot * BUF_LEN as usize..][..BUF_LEN as usize];
            slot = (slot + 1) % slots;
            // SAFETY: reads into `b`, which lives for the call, at most its length.
            let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) };
            if usize::try_from(n).ok() != Some(VNET_HDR_LEN + frame.len()) {
                return Err(format!("tap read: {n}: {}", last_err()));
            }
        }
        total += start.elapsed();
    }
    Ok(total)
}

fn dev_rx(
    dev: &mut Net<Tap>,
    drv: &mut Driver<'_>,
    inj: &Injector,
    frame: &[u8],
) -> Result<Took, String> {
    let mut total = Took::ZERO;
    for _ in 0..FRAMES / u32::from(RX_STEP) {
        inj.send(frame, RX_STEP)?;
        let start = Clock::now();
        dev.process_backend();
        total += start.elapsed();
        let n = drv.rx_done()?;
        if n != RX_STEP {
            return Err(format!("RX: {n} frames delivered, {RX_STEP} expected"));
        }
        drv.post_rx(n)?;
    }
    Ok(total)
}

fn kpps(d: Duration) -> f64 {
    f64::from(FRAMES) / d.as_secs_f64() / 1000.0
}

/// A fresh network namespace for this process, with the tap in it, up. Ok(None): not root.
fn setup() -> Result<Option<Tap>, String> {
    if !own_namespace()? {
        return Ok(None);
    }
    tap_up("mbench%d").map(Some)
}

fn run() -> Result<(), String> {
    let rounds = common::rounds(11);
    let Some(tap) = setup()? else {
        println!("virtio_net: skipped: needs root (a network namespace and a tap of its own)");
        return Ok(());
    };
    let ifname = tap.name().to_owned();
    let inj = Injector::new(&ifname)?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)])
        .map_err(|e| format!("guest memory: {e}"))?;
    let mut dev = Net::new(tap, NetConfig::default());
    let slice = mem
        .get_slice(GuestAddress(0), MEM)
        .map_err(|e| format!("guest memory: {e}"))?;
    // (Re)start the device with `acked` and a fresh driver over the same memory.
    let start = |dev: &mut Net<Tap>, acked: u64| -> Result<Driver<'_>, String> {
        dev.reset();
        dev.ack_features(features::VERSION_1 | VIRTIO_NET_F_MRG_RXBUF | acked);
        dev.activate(
            vec![Ring::at(RX_RING).queue()?, Ring::at(TX_RING).queue()?],
            Arc::new(NoInterrupt),
            DmaSpace::identity(mem.clone()),
        )
        .map_err(|e| format!("activate: {e}"))?;
        let mut drv = Driver {
            mem: slice,
            tx_avail: 0,
            tx_used: 0,
            rx_avail: 0,
            rx_used: 0,
            tso: false,
        };
        drv.lay_out_rx()?;
        Ok(drv)
    };
    let mut drv = start(&mut dev, 0)?;
    let mut bufs = vec![0u8; usize::from(QSIZE) * BUF_LEN as usize];
    // The raw side uses the same open tap (a tap takes one opener at a time).
    let fd = dev.backend_fd();

    println!(
        "virtio-net device model vs raw tap read/write, {rounds} interleaved rounds of {FRAMES} \
         frames, tap {ifname} in a namespace of its own; kpps min/median/max; ratio = device \
         median / raw median, the median of the per-round ratios, and cpu = the median \
         per-round ratio of thread CPU time (raw / device)\n"
    );
    println!(
        "{:<16} {:>20} {:>20} {:>7} {:>9} {:>7}  goal",
        "workload", "raw kpps", "device kpps", "ratio", "per-round", "cpu"
    );
    let only = std::env::var("MANIFOLD_BENCH_ONLY").unwrap_or_default();
    let mut below = Vec::new();
    for (name, dir, len, tso) in [
        ("TX 64 B", Dir::Tx, 64usize, false),
        ("TX 1514 B", Dir::Tx, 1514, false),
        ("RX 64 B", Dir::Rx, 64, false),
        ("RX 1514 B", Dir::Rx, 1514, false),
        ("RX 64 B, TSO", Dir::Rx, 64, true),
        ("RX 1514 B, TSO", Dir::Rx, 1514, true),
    ] {
        if !name.contains(only.as_str()) {
            continue;
        }
        if tso && !drv.tso {
            // Guest TSO: the tap may hand over 64 KiB frames, so every receive chain has
            // room behind it (a readv) instead of a plain read.
            drv = start(&mut dev, GUEST_TSO)?;
            drv.tso = true;
        }
        let f = frame(len, [0xff; 6], MAC);
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        pkt.extend_from_slice(&f);
        if dir == Dir::Tx {
            drv.lay_out_tx(&f)?;
        }
        let mut one = |dev: &mut Net<Tap>, drv: &mut Driver<'_>, device: bool| match (dir, device) {
            (Dir::Tx, false) => raw_tx(fd, &drv.mem, pkt.len()),
            (Dir::Tx, true) => {
                let start = Clock::now();
                drv.transmit(dev, FRAMES)?;
                Ok(start.elapsed())
            }
            (Dir::Rx, false) => raw_rx(fd, &inj, &f, &mut bufs),
            (Dir::Rx, true) => dev_rx(dev, drv, &inj, &f),
        };
        // One unmeasured round each.
        one(&mut dev, &mut drv, false)?;
        one(&mut dev, &mut drv, true)?;
        if let Ok(side) = std::env::var("MANIFOLD_BENCH_SIDE") {
            // One side only, for a profiler or `time`: no figures.
            for _ in 0..rounds {
                one(&mut dev, &mut drv, side == "device")?;
            }
            println!("{name}: {rounds} rounds of the {side} side only");
            continue;
        }
        let (mut r, mut d, mut per, mut cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..rounds {
            let first = i % 2 == 1;
            let a = one(&mut dev, &mut drv, first)?;
            let b = one(&mut dev, &mut drv, !first)?;
            let (rr, dd) = if first { (b, a) } else { (a, b) };
            r.push(kpps(rr.wall));
            d.push(kpps(dd.wall));
            per.push(kpps(dd.wall) / kpps(rr.wall));
            cpu.push(rr.cpu.as_secs_f64() / dd.cpu.as_secs_f64());
        }
        let (r0, r1, r2) = spread(&r);
        let (d0, d1, d2) = spread(&d);
        let (_, p1, _) = spread(&per);
        let (_, c1, _) = spread(&cpu);
        let ratio = d1 / r1;
        let mark = if ratio >= GOAL { "ok" } else { "BELOW" };
        if ratio < GOAL {
            below.push(name);
        }
        println!(
            "{:<16} {:>20} {:>20} {:>6.2}x {:>8.2}x {:>6.2}x  >= {GOAL}x {mark}",
            name,
            format!("{r0:.0}/{r1:.0}/{r2:.0}"),
            format!("{d0:.0}/{d1:.0}/{d2:.0}"),
            ratio,
            p1,
            c1
        );
    }
    let s = dev.stats();
    if s.tx_dropped != 0 || s.rx_dropped != 0 || s.rx_bad_chains != 0 {
        return Err(format!("device dropped frames: {s:?}"));
    }
    if !below.is_empty() {
        println!("\nbelow the goal: {}", below.join(", "));
    }
    Ok(())
}

fn main() {
    common::main("virtio_net", run);
}
