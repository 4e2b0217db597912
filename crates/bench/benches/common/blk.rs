//! The virtio-blk benchmarks' workloads, image and synthetic driver: one split queue of
//! `QSIZE` at `DESC` in guest memory, `BATCH` chains of header + data + status laid out once
//! and made available per kick (virtio 1.2, 2.7 and 5.2).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use devices::virtio::block::Block;
use devices::virtio::{DmaSpace, VirtioDevice, features};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

use super::{NoInterrupt, queue};

pub const QSIZE: u16 = 256;
/// Requests made available per kick (3 descriptors each).
pub const BATCH: u64 = 64;
/// The queue, the request headers, the status bytes and the data (GPAs).
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const HDRS: u64 = 0x3000;
pub const STATUS: u64 = 0x4000;
pub const DATA: u64 = 0x10_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub op: Op,
    pub len: u64,
    pub random: bool,
    pub requests: u64,
}

/// Offsets of a workload's requests in an image of `image` bytes: a fixed xorshift sequence
/// (random) or consecutive.
pub fn offsets(w: &Workload, image: u64) -> Vec<u64> {
    let slots = image / w.len;
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

/// An image of `size` bytes at `path`, written once, so that reads hit cached pages and
/// writes overwrite allocated blocks.
pub fn image(path: &Path, size: u64) -> Result<File, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("image {}: {e}", path.display()))?;
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..size >> 20 {
        file.write_all_at(&chunk, i << 20)
            .map_err(|e| format!("image: {e}"))?;
    }
    Ok(file)
}

/// Activate `dev` on the queue at `DESC`, reached through `dma` at GPA + `offset`.
pub fn activate(dev: &mut Block, offset: u64, dma: DmaSpace) -> Result<(), String> {
    dev.ack_features(features::VERSION_1);
    dev.activate(
        vec![queue(DESC, QSIZE, offset)?],
        Arc::new(NoInterrupt),
        dma,
    )
    .map_err(|e| format!("activate: {e}"))
}

/// How the driver reaches guest memory (GPAs).
pub trait DriverMem {
    fn put<T: ByteValued>(&self, addr: u64, v: T) -> Result<(), String>;
    fn get<T: ByteValued>(&self, addr: u64) -> Result<T, String>;

    /// Descriptor `i` of the table at `table`: address, length, flags, next.
    fn desc(
        &self,
        table: u64,
        i: u64,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), String> {
        let at = table + 16 * i;
        self.put(at, addr)?;
        self.put(at + 8, len)?;
        self.put(at + 12, flags)?;
        self.put(at + 14, next)
    }
}

/// One slice over the whole region (bounds-checked, volatile), as cheap as a guest driver's
/// plain stores.
impl DriverMem for VolatileSlice<'_> {
    fn put<T: ByteValued>(&self, addr: u64, v: T) -> Result<(), String> {
        self.write_obj(v, addr as usize)
            .map_err(|e| format!("guest memory: {e}"))
    }

    fn get<T: ByteValued>(&self, addr: u64) -> Result<T, String> {
        self.read_obj(addr as usize)
            .map_err(|e| format!("guest memory: {e}"))
    }
}

impl DriverMem for GuestMemoryMmap {
    fn put<T: ByteValued>(&self, addr: u64, v: T) -> Result<(), String> {
        self.write_obj(v, GuestAddress(addr))
            .map_err(|e| format!("guest memory: {e}"))
    }

    fn get<T: ByteValued>(&self, addr: u64) -> Result<T, String> {
        self.read_obj(GuestAddress(addr))
            .map_err(|e| format!("guest memory: {e}"))
    }
}

/// Chains for `BATCH` requests of `len` bytes: header, data, status; the device sees them at
/// GPA + `offset`.
pub fn lay_out(mem: &impl DriverMem, op: Op, len: u64, offset: u64) -> Result<(), String> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let data_flags = NEXT | if op == Op::Read { WRITE } else { 0 };
    let kind: u32 = if op == Op::Read { 0 } else { 1 };
    let len32 = u32::try_from(len).map_err(|e| e.to_string())?;
    let o = offset;
    for r in 0..BATCH {
        let d = (3 * r) as u16;
        mem.desc(DESC, 3 * r, HDRS + 16 * r + o, 16, NEXT, d + 1)?;
        mem.desc(
            DESC,
            3 * r + 1,
            DATA + r * len + o,
            len32,
            data_flags,
            d + 2,
        )?;
        mem.desc(DESC, 3 * r + 2, STATUS + r + o, 1, WRITE, 0)?;
        mem.put(HDRS + 16 * r, kind)?;
        mem.put(HDRS + 16 * r + 4, 0u32)?;
    }
    Ok(())
}

/// Make requests at `byte_offsets` available, one per chain slot (the device is kicked next).
pub fn make_available(
    mem: &impl DriverMem,
    avail_idx: &mut u16,
    byte_offsets: &[u64],
) -> Result<(), String> {
    for (r, &off) in byte_offsets.iter().enumerate() {
        let r = r as u64;
        mem.put(HDRS + 16 * r + 8, off / 512)?;
        mem.put(STATUS + r, 0xffu8)?;
        let slot = u64::from(*avail_idx % QSIZE);
        mem.put(AVAIL + 4 + 2 * slot, (3 * r) as u16)?;
        *avail_idx = avail_idx.wrapping_add(1);
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    mem.put(AVAIL + 2, *avail_idx)
}

/// After the kick: all `n` requests used, each with status OK.
pub fn check_used(mem: &impl DriverMem, used_seen: &mut u16, n: usize) -> Result<(), String> {
    let used: u16 = mem.get(USED + 2)?;
    let k = n as u16;
    if used != used_seen.wrapping_add(k) {
        return Err(format!(
            "{} requests used, {k} expected",
            used.wrapping_sub(*used_seen)
        ));
    }
    *used_seen = used;
    for r in 0..n as u64 {
        let s: u8 = mem.get(STATUS + r)?;
        if s != 0 {
            return Err(format!("request status {s}"));
        }
    }
    Ok(())
}
