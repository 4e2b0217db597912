//! A driver-side model of a split virtqueue in real guest memory, and a recording interrupt:
//! enough to drive any device the way a guest would, without a transport.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::mock::MockSplitQueue;
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

/// The driver's side of one split queue laid out at guest address 0 by virtio-queue's mock.
pub struct TestDriver<'a> {
    mem: &'a PhysMemory,
    mock: MockSplitQueue<'a, PhysMemory>,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> TestDriver<'a> {
    pub fn new(mem: &'a PhysMemory, size: u16) -> Self {
        Self {
            mem,
            mock: MockSplitQueue::new(mem, size),
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device's view of the queue, ready, as a transport would hand it over.
    pub fn queue(&self) -> Queue {
        self.mock.create_queue().expect("mock queue")
    }

    /// Guest addresses of the descriptor table, available ring and used ring, for a test that
    /// programs them through a transport.
    pub fn ring_addresses(&self) -> (u64, u64, u64) {
        (
            self.mock.desc_table_addr().0,
            self.mock.avail_addr().0,
            self.mock.used_addr().0,
        )
    }

    pub fn next_free(&self) -> u16 {
        self.next_desc
    }

    /// Store a raw descriptor at `index` of the table.
    pub fn write_raw(&mut self, index: u16, d: Descriptor) {
        self.mock
            .desc_table()
            .store(index, RawDescriptor::from(d))
            .expect("descriptor index");
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
        let slot = usize::from(self.avail_idx % self.size);
        self.mock
            .avail()
            .ring()
            .ref_at(slot)
            .expect("avail slot")
            .store(head.to_le());
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mock.avail().idx().store(idx.to_le());
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mock.used().idx().load())
    }

    /// Used ring entry `i` (counting from the start): (head, length).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let e: VirtqUsedElem = self
            .mock
            .used()
            .ring()
            .ref_at(usize::from(i % self.size))
            .expect("used slot")
            .load();
        (e.id(), e.len())
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
