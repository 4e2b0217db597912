//! A driver-side model of a split virtqueue in real guest memory, and a recording interrupt:
//! enough to drive any device the way a guest would, without a transport.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::VirtioInterrupt;
use super::dma::PhysMemory;
use crate::bus::lock;

/// Guest memory for tests: 1 MiB at 0 (rings at 0, buffers from 0x10000), a hole, and 1 MiB at
/// 2 MiB.
pub fn test_memory() -> PhysMemory {
    PhysMemory::from_ranges(&[
        (GuestAddress(0), 0x10_0000),
        (GuestAddress(0x20_0000), 0x10_0000),
    ])
    .expect("test memory")
}

/// One descriptor as a driver would describe it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Desc {
    /// Device-readable.
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    /// Device-writable.
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// The driver's side of one split queue, laid out by hand (virtio 1.2, 2.7): descriptor table,
/// then the available ring (flags, idx, ring, used_event), then the used ring 4-byte aligned
/// (flags, idx, ring, avail_event). Not virtio-queue 0.18's `MockSplitQueue`: it places the
/// used ring at the available ring's end counted in entries rather than bytes, over the upper
/// half of the available ring and its `used_event`, which breaks any test that posts more than
/// half a queue or relies on EVENT_IDX.
pub struct TestDriver<'a> {
    mem: &'a PhysMemory,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> TestDriver<'a> {
    /// A queue with its descriptor table at guest address 0 (buffers go from 0x10000).
    pub fn new(mem: &'a PhysMemory, size: u16) -> Self {
        Self::at(mem, 0, size)
    }

    /// A queue with its descriptor table at `base`; the rings take
    /// [`TestDriver::rings_len`]`(size)` bytes from there.
    pub fn at(mem: &'a PhysMemory, base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let avail = base + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        // Flags, indexes and event fields start at 0.
        let len = usize::try_from(used + 6 + 8 * n - base).expect("ring length");
        mem.write_slice(&vec![0u8; len], GuestAddress(base))
            .expect("rings in test memory");
        Self {
            mem,
            size,
            desc: base,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Bytes the three rings of a queue of `size` take.
    pub fn rings_len(size: u16) -> u64 {
        let n = u64::from(size);
        (16 * n + 6 + 2 * n).next_multiple_of(4) + 6 + 8 * n
    }

    /// The device's view of the queue, ready, as a transport would hand it over.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    /// Guest addresses of the descriptor table, available ring and used ring, for a test that
    /// programs them through a transport.
    pub fn ring_addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    pub fn next_free(&self) -> u16 {
        self.next_desc
    }

    /// Store a raw descriptor at `index` of the table.
    pub fn write_raw(&mut self, index: u16, d: Descriptor) {
        assert!(index < self.size, "descriptor index");
        self.mem
            .write_obj(
                RawDescriptor::from(d),
                GuestAddress(self.desc + 16 * u64::from(index)),
            )
            .expect("descriptor");
        if index >= self.next_desc {
            self.next_desc = (index + 1) % self.size;
        }
    }

    /// Chain `descs` through consecutive free slots and make the chain available.
    pub fn add(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            let next = (index + 1) % self.size;
            self.write_raw(index, Descriptor::new(d.addr, d.len, flags as u16, next));
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Put `head` in the available ring and bump the index.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .expect("avail slot");
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .read_obj(GuestAddress(self.used + 2))
                .expect("used idx"),
        )
    }

    /// Used ring entry `i` (counting from the start): (head, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let addr = self.used + 4 + 8 * u64::from(i % self.size);
        let e: VirtqUsedElem = self.mem.read_obj(GuestAddress(addr)).expect("used slot");
        (e.id(), e.len())
    }

    /// The driver's `used_event` (EVENT_IDX): the device interrupts when it passes this index.
    pub fn set_used_event(&self, idx: u16) {
        let addr = self.avail + 4 + 2 * u64::from(self.size);
        self.mem
            .write_obj(idx.to_le(), GuestAddress(addr))
            .expect("used_event");
    }

    /// The device's `avail_event` (EVENT_IDX): the driver kicks when it passes this index.
    pub fn avail_event(&self) -> u16 {
        let addr = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(self.mem.read_obj(GuestAddress(addr)).expect("avail_event"))
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read");
        v
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("write");
    }
}

/// Records what a device signals.
#[derive(Default, Debug)]
pub struct RecordingInterrupt {
    pub queues: Mutex<Vec<u16>>,
    pub config: AtomicU32,
    pub needs_reset: AtomicBool,
}

impl RecordingInterrupt {
    pub fn take_queues(&self) -> Vec<u16> {
        std::mem::take(&mut *lock(&self.queues))
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn signal_queue(&self, queue: u16) {
        lock(&self.queues).push(queue);
    }

    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// xorshift64: reproducible randomness without a crate.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
