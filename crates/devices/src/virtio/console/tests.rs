//! virtio-console driven the way a guest driver would: both queues laid out in real guest
//! memory, output checked in a recording writer, input checked in
//! guest memory and in the used rings.

use std::sync::Mutex;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::bus::lock;
use crate::interrupt::CountingIrq;
use crate::virtio::dma::PhysMemory;
use crate::virtio::features;
use crate::virtio::testutil::{Desc, RecordingInterrupt, XorShift, test_memory};

/// Where each queue's rings live (the transmit queue at 0, the receive queue in the second
/// memory region), and buffers.
const TX_RINGS: u64 = 0;
const RX_RINGS: u64 = 0x2f_0000;
const BUF: u64 = 0x10000;
const RXBUF: u64 = 0x28_0000;
const HOLE: u64 = 0x18_0000;

/// The driver's side of one split queue at `base`, written straight into guest memory.
///
/// Not testutil's `TestDriver`: that one puts every queue at 0 (a console has two), and
/// virtio-queue 0.18's `MockSplitQueue` places the used ring right after the available ring's
/// entries counted in elements rather than bytes, so used entries overwrite the available
/// ring's `used_event` and EVENT_IDX interrupt decisions come out wrong.
struct Driver<'a> {
    mem: &'a PhysMemory,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a PhysMemory, base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let avail = base + 16 * n;
        // flags, idx, ring, used_event; the used ring is 4-byte aligned.
        let used = (avail + 6 + 2 * n + 3) & !3;
        // Zero the rings: flags, indexes and event fields start at 0.
        mem.write_slice(
            &vec![0u8; (used + 6 + 8 * n - base) as usize],
            GuestAddress(base),
        )
        .expect("rings in memory");
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

    /// The device's view of the queue, ready, as a transport would hand it over.
    fn queue(&self) -> Queue {
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

    fn next_free(&self) -> u16 {
        self.next_desc
    }

    fn write_raw(&mut self, index: u16, d: Descriptor) {
        assert!(index < self.size);
        self.mem
            .write_obj(
                RawDescriptor::from(d),
                GuestAddress(self.desc + 16 * u64::from(index)),
            )
            .expect("descriptor");
    }

    /// Chain `descs` through consecutive free slots and make the chain available.
    fn add(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let next = (index + 1) % self.size;
            self.write_raw(index, Descriptor::new(d.addr, d.len, flags as u16, next));
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .expect("avail slot");
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    fn read_u16(&self, addr: u64) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(addr)).expect("ring"))
    }

    fn used_idx(&self) -> u16 {
        self.read_u16(self.used + 2)
    }

    /// Used ring entry `i` (counting from the start): (head, length).
    fn used(&self, i: u16) -> (u32, u32) {
        let slot = u64::from(i % self.size);
        let e: VirtqUsedElem = self
            .mem
            .read_obj(GuestAddress(self.used + 4 + 8 * slot))
            .expect("used slot");
        (e.id(), e.len())
    }

    /// The used ring's flags (NO_NOTIFY).
    fn used_flags(&self) -> u16 {
        self.read_u16(self.used)
    }

    /// The used ring's avail_event (EVENT_IDX).
    fn avail_event(&self) -> u16 {
        self.read_u16(self.used + 4 + 8 * u64::from(self.size))
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read");
        v
    }

    fn write(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("write");
    }
}

/// A writer the test can look into, counting flushes.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<(Vec<u8>, usize)>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        lock(&self.0).1 += 1;
        Ok(())
    }
}

impl Shared {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut lock(&self.0).0)
    }
    fn flushes(&self) -> usize {
        lock(&self.0).1
    }
}

fn console(options: ConsoleOptions) -> (Console, Shared, Arc<CountingIrq>) {
    let out = Shared::default();
    let room = CountingIrq::new();
    let dev = Console::new(Box::new(out.clone()), Some(room.clone()), options);
    (dev, out, room)
}

/// Activate with `features` and the two drivers' queues.
fn activate_with(
    dev: &mut Console,
    rx: &Driver,
    tx: &Driver,
    mem: &PhysMemory,
    features: u64,
) -> Arc<RecordingInterrupt> {
    let irq = Arc::new(RecordingInterrupt::default());
    dev.ack_features(features);
    dev.activate(
        vec![rx.queue(), tx.queue()],
        irq.clone(),
        DmaSpace::identity(mem.clone()),
    )
    .unwrap();
    irq
}

fn activate(
    dev: &mut Console,
    rx: &Driver,
    tx: &Driver,
    mem: &PhysMemory,
) -> Arc<RecordingInterrupt> {
    let f = dev.offered_features();
    activate_with(dev, rx, tx, mem, f)
}

/// Submit one transmit chain and process the queue; returns the used length.
fn transmit(dev: &mut Console, tx: &mut Driver, descs: &[Desc]) -> u32 {
    let before = tx.used_idx();
    tx.add(descs);
    dev.process_queue(TX_QUEUE);
    assert_eq!(tx.used_idx(), before.wrapping_add(1), "chain returned");
    tx.used(before).1
}

fn config_u16(dev: &Console, offset: u64) -> u16 {
    let mut b = [0u8; 2];
    dev.read_config(offset, &mut b);
    u16::from_le_bytes(b)
}

fn config_u32(dev: &Console, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_config(offset, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn identity_features_and_config() {
    let (dev, _, _) = console(ConsoleOptions::default());
    assert_eq!(dev.device_type(), 3);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(dev.offered_features(), features::COMMON);
    assert_eq!(config_u16(&dev, 0), 0);
    assert_eq!(config_u16(&dev, 2), 0);
    assert_eq!(config_u32(&dev, 4), 1);
    assert_eq!(config_u32(&dev, 8), 0);
    assert_eq!(config_u32(&dev, 12), 0, "past the end");

    let (dev, _, _) = console(ConsoleOptions {
        size: Some((132, 43)),
        emerg_write: true,
    });
    assert_eq!(
        dev.offered_features(),
        features::COMMON | bit(VIRTIO_CONSOLE_F_SIZE) | bit(VIRTIO_CONSOLE_F_EMERG_WRITE)
    );
    assert_eq!(config_u16(&dev, 0), 132);
    assert_eq!(config_u16(&dev, 2), 43);
    let mut b = [0u8; 1];
    dev.read_config(2, &mut b);
    assert_eq!(b[0], 43);
    // MULTIPORT is never offered.
    assert_eq!(dev.offered_features() & bit(1), 0);
}

#[test]
fn resize_signals_a_config_change_only_when_negotiated() {
    let mem = test_memory();
    let (rx, tx) = (
        Driver::new(&mem, RX_RINGS, 16),
        Driver::new(&mem, TX_RINGS, 16),
    );
    let (mut dev, _, _) = console(ConsoleOptions {
        size: Some((80, 24)),
        emerg_write: false,
    });
    let irq = activate(&mut dev, &rx, &tx, &mem);
    dev.set_size(100, 30);
    assert_eq!((config_u16(&dev, 0), config_u16(&dev, 2)), (100, 30));
    assert_eq!(irq.config.load(std::sync::atomic::Ordering::SeqCst), 1);
    dev.set_size(100, 30);
    assert_eq!(
        irq.config.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no change"
    );

    // The driver did not take SIZE: the fields change, no interrupt.
    let (mut dev, _, _) = console(ConsoleOptions {
        size: Some((80, 24)),
        emerg_write: false,
    });
    let irq = activate_with(&mut dev, &rx, &tx, &mem, features::VERSION_1);
    dev.set_size(90, 20);
    assert_eq!(config_u16(&dev, 0), 90);
    assert_eq!(irq.config.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn emergency_write() {
    let (mut dev, out, _) = console(ConsoleOptions {
        size: None,
        emerg_write: true,
    });
    // Works before negotiation and activation.
    dev.write_config(8, &u32::from(b'h').to_le_bytes());
    dev.write_config(8, b"i");
    // Upper bytes of emerg_wr, and the read-only fields, are ignored.
    dev.write_config(9, b"x");
    dev.write_config(0, &[1, 2, 3, 4]);
    dev.write_config(u64::MAX, b"x");
    assert_eq!(out.take(), b"hi");
    assert_eq!(out.flushes(), 2);
    assert_eq!(config_u16(&dev, 0), 0);
    assert_eq!(config_u32(&dev, 8), 0, "emerg_wr reads as zero");
    // A wide write that covers emerg_wr.
    dev.write_config(4, &[9, 9, 9, 9, b'!', 0, 0, 0]);
    assert_eq!(out.take(), b"!");

    let (mut dev, out, _) = console(ConsoleOptions::default());
    dev.write_config(8, &[b'x', 0, 0, 0]);
    assert!(out.take().is_empty(), "not offered");
}

#[test]
fn transmit_reaches_the_output_intact() {
    let mem = test_memory();
    let (rx, mut tx) = (
        Driver::new(&mem, RX_RINGS, 16),
        Driver::new(&mem, TX_RINGS, 16),
    );
    let (mut dev, out, _) = console(ConsoleOptions::default());
    let irq = activate(&mut dev, &rx, &tx, &mem);

    tx.write(BUF, b"hello, ");
    tx.write(0x20_8000, b"world");
    tx.write(BUF + 0x100, b"\r\n");
    let used = transmit(
        &mut dev,
        &mut tx,
        &[
            Desc::r(BUF, 7),
            Desc::r(0x20_8000, 5),
            Desc::r(BUF + 0x100, 0),
            Desc::r(BUF + 0x100, 2),
        ],
    );
    assert_eq!(used, 0);
    assert_eq!(out.take(), b"hello, world\r\n");
    assert_eq!(out.flushes(), 1);
    assert_eq!(irq.take_queues(), vec![TX_QUEUE]);

    // Several chains in one batch: one flush; a prompt without a newline goes out too.
    tx.write(BUF, b"$ ");
    tx.add(&[Desc::r(BUF, 1)]);
    tx.add(&[Desc::r(BUF + 1, 1)]);
    dev.process_queue(TX_QUEUE);
    assert_eq!(out.take(), b"$ ");
    assert_eq!(out.flushes(), 2);
    // An empty batch does not flush.
    dev.process_queue(TX_QUEUE);
    assert_eq!(out.flushes(), 2);

    // A large buffer, bigger than the copy chunk, byte for byte.
    let big: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i * 7 + 3) as u8).collect();
    tx.write(BUF, &big);
    transmit(&mut dev, &mut tx, &[Desc::r(BUF, big.len() as u32)]);
    assert_eq!(out.take(), big);
    assert!(!irq.needs_reset());
}

#[test]
fn malformed_transmit_chains_are_dropped_whole() {
    let mem = test_memory();
    let (rx, mut tx) = (
        Driver::new(&mem, RX_RINGS, 16),
        Driver::new(&mem, TX_RINGS, 16),
    );
    let (mut dev, out, _) = console(ConsoleOptions::default());
    let irq = activate(&mut dev, &rx, &tx, &mem);
    tx.write(BUF, b"abcdefgh");

    // A buffer in the hole after a good one: nothing goes out.
    assert_eq!(
        transmit(&mut dev, &mut tx, &[Desc::r(BUF, 4), Desc::r(HOLE, 4)]),
        0
    );
    // Straddling the end of the first region.
    assert_eq!(transmit(&mut dev, &mut tx, &[Desc::r(0xf_fffc, 8)]), 0);
    // Readable after writable.
    assert_eq!(
        transmit(&mut dev, &mut tx, &[Desc::w(BUF, 4), Desc::r(BUF, 4)]),
        0
    );
    assert!(out.take().is_empty());
    // Writable bytes after the data are ignored, the data goes out.
    assert_eq!(
        transmit(
            &mut dev,
            &mut tx,
            &[Desc::r(BUF, 4), Desc::w(BUF + 0x100, 4)]
        ),
        0
    );
    assert_eq!(out.take(), b"abcd");
    // A loop.
    let h = tx.next_free();
    let n = VRING_DESC_F_NEXT as u16;
    tx.write_raw(h, Descriptor::new(BUF, 2, n, h + 1));
    tx.write_raw(h + 1, Descriptor::new(BUF, 2, n, h));
    tx.next_desc = h + 2;
    let before = tx.used_idx();
    tx.publish(h);
    dev.process_queue(TX_QUEUE);
    assert_eq!(tx.used(before), (u32::from(h), 0));
    assert!(out.take().is_empty());
    assert!(!irq.needs_reset());

    // Notifications for queues that do not exist are ignored.
    dev.process_queue(2);
    dev.process_queue(u16::MAX);

    // A broken ring: reset requested, then silence until reset.
    tx.set_avail_idx(tx.avail_idx.wrapping_add(40));
    dev.process_queue(TX_QUEUE);
    assert!(irq.needs_reset());
}

#[test]
fn receive_fills_posted_buffers_and_asks_for_more() {
    let mem = test_memory();
    let (mut rx, tx) = (
        Driver::new(&mem, RX_RINGS, 16),
        Driver::new(&mem, TX_RINGS, 16),
    );
    let (mut dev, _, room) = console(ConsoleOptions::default());

    // Before the driver is ready nothing is taken, and the caller is told when to retry.
    assert_eq!(dev.enqueue(b"early"), 0);
    assert!(dev.input_wanted());
    let irq = activate(&mut dev, &rx, &tx, &mem);
    assert_eq!(room.count(), 1, "activation wakes the input pump");
    assert!(!dev.input_wanted());
    // No buffers yet.
    assert_eq!(dev.enqueue(b"early"), 0);
    assert_eq!(rx.avail_event(), 0, "EVENT_IDX: kick on the next buffer");

    // Two buffers of 4 bytes, one of them split in two descriptors.
    rx.add(&[Desc::w(RXBUF, 4)]);
    rx.add(&[Desc::w(RXBUF + 0x100, 1), Desc::w(RXBUF + 0x200, 3)]);
    dev.process_queue(RX_QUEUE);
    assert_eq!(room.count(), 2, "buffers posted while input waits");
    assert_eq!(dev.enqueue(b"early input"), 8);
    assert_eq!(rx.used_idx(), 2);
    assert_eq!(rx.used(0), (0, 4));
    assert_eq!(rx.used(1), (1, 4));
    assert_eq!(rx.read(RXBUF, 4), b"earl");
    assert_eq!(rx.read(RXBUF + 0x100, 1), b"y");
    assert_eq!(rx.read(RXBUF + 0x200, 3), b" in");
    assert_eq!(irq.take_queues(), vec![RX_QUEUE]);
    assert!(dev.input_wanted());
    assert_eq!(rx.avail_event(), 2, "EVENT_IDX: kick when buffer 2 arrives");

    // The driver posts one more: the pump is woken once, takes the rest.
    rx.add(&[Desc::w(RXBUF + 0x300, 64)]);
    dev.process_queue(RX_QUEUE);
    assert_eq!(room.count(), 3);
    dev.process_queue(RX_QUEUE);
    assert_eq!(room.count(), 3, "only when input waits");
    assert_eq!(dev.enqueue(b"put"), 3);
    assert!(!dev.input_wanted());
    assert_eq!(rx.used(2), (3, 3));
    assert_eq!(rx.read(RXBUF + 0x300, 3), b"put");
    // Nothing offered, nothing taken.
    assert_eq!(dev.enqueue(b""), 0);
    assert!(!dev.input_wanted());
    assert!(!irq.needs_reset());
}

#[test]
fn receive_without_event_idx_toggles_no_notify() {
    let mem = test_memory();
    let (mut rx, tx) = (
        Driver::new(&mem, RX_RINGS, 16),
        Driver::new(&mem, TX_RINGS, 16),
    );
    let (mut dev, _, room) = console(ConsoleOptions::default());
    activate_with(&mut dev, &rx, &tx, &mem, features::VERSION_1);
    let no_notify = VRING_USED_F_NO_NOTIFY as u16;
    rx.add(&[Desc::w(RXBUF, 8)]);
    assert_eq!(dev.enqueue(b"ab"), 2);
    assert_eq!(rx.used_flags() & no_notify, no_notify, "nobody waits");
    assert_eq!(dev.enqueue(b"abc"), 0);
    assert_eq!(rx.used_flags() & no_notify, 0, "input waits for buffers");
    rx.add(&[Desc::w(RXBUF, 8)]);
    dev.process_queue(RX_QUEUE);
    assert_eq!(room.count(), 1);
    assert_eq!(dev.enqueue(b"abc"), 3);
    assert_eq!(rx.used_flags() & no_notify, no_notify);
}

#[test]
fn malformed_receive_chains_keep_the_bytes() {
    let mem = test_memory();
    let (mut rx, tx) = (
        Driver::new(&mem, RX_RINGS, 16),
        Driver::new(&mem, TX_RINGS, 16),
    );
    let (mut dev, _, _) = console(ConsoleOptions::default());
    let irq = activate(&mut dev, &rx, &tx, &mem);

    // Readable only; in the hole; writable then readable; an empty indirect table: each is
    // returned empty and the bytes stay with the caller.
    rx.add(&[Desc::r(RXBUF, 8)]);
    rx.add(&[Desc::w(HOLE, 8)]);
    rx.add(&[Desc::w(RXBUF, 8), Desc::r(RXBUF, 8)]);
    let h = rx.next_free();
    rx.write_raw(
        h,
        Descriptor::new(RXBUF, 0, VRING_DESC_F_INDIRECT as u16, 0),
    );
    rx.next_desc = h + 1;
    rx.publish(h);
    assert_eq!(dev.enqueue(b"data"), 0);
    assert_eq!(rx.used_idx(), 4);
    for i in 0..4 {
        assert_eq!(rx.used(i).1, 0);
    }
    // Readable then writable: the readable part is ignored. A second buffer in the hole: the
    // first one's bytes count, the rest stays.
    rx.add(&[Desc::r(RXBUF, 8), Desc::w(RXBUF + 0x100, 2)]);
    rx.add(&[Desc::w(RXBUF + 0x200, 1), Desc::w(HOLE, 8)]);
    assert_eq!(dev.enqueue(b"data"), 3);
    assert_eq!(rx.read(RXBUF + 0x100, 2), b"da");
    assert_eq!(rx.read(RXBUF + 0x200, 1), b"t");
    assert_eq!((rx.used(4).1, rx.used(5).1), (2, 1));
    assert!(!irq.needs_reset());

    // A head index outside the queue: the device asks for a reset and takes nothing more.
    rx.publish(40);
    assert_eq!(dev.enqueue(b"a"), 0);
    assert!(irq.needs_reset());
    rx.add(&[Desc::w(RXBUF, 8)]);
    assert_eq!(dev.enqueue(b"a"), 0);
    // After a reset and a fresh activation it works again.
    dev.reset();
    let (mut rx, tx) = (
        Driver::new(&mem, RX_RINGS, 16),
        Driver::new(&mem, TX_RINGS, 16),
    );
    let irq = activate(&mut dev, &rx, &tx, &mem);
    rx.add(&[Desc::w(RXBUF, 8)]);
    assert_eq!(dev.enqueue(b"a"), 1);
    assert!(!irq.needs_reset());

    // Too many buffers claimed.
    rx.set_avail_idx(rx.avail_idx.wrapping_add(17));
    assert_eq!(dev.enqueue(b"a"), 0);
    assert!(irq.needs_reset());
}

/// Random input in random pieces against random valid receive buffers: the guest gets the
/// stream byte for byte, in order, with nothing lost or repeated, and the pump is woken exactly
/// when it waits and buffers arrive.
#[test]
fn random_input_arrives_in_order() {
    let mem = test_memory();
    let size = 64u16;
    let (mut rx, tx) = (
        Driver::new(&mem, RX_RINGS, size),
        Driver::new(&mem, TX_RINGS, 16),
    );
    let (mut dev, _, room) = console(ConsoleOptions::default());
    let irq = activate(&mut dev, &rx, &tx, &mem);
    let mut rng = XorShift(0xdead_beef_cafe_f00d);
    let input: Vec<u8> = (0..20_000).map(|_| rng.next() as u8).collect();
    let (mut offered, mut received) = (0usize, Vec::new());
    // Chains posted and not yet returned, oldest first: (head, descriptors).
    let mut outstanding: std::collections::VecDeque<(u16, Vec<Desc>)> = Default::default();
    let mut outstanding_descs = 0usize;
    let mut seen_used = 0u16;
    let mut wakeups = 0u64;
    while received.len() < input.len() {
        // Post a few chains of 1..3 writable buffers; each descriptor slot has its own
        // 0x100-byte area, so outstanding chains never share memory.
        for _ in 0..rng.below(4) {
            let n = 1 + rng.below(3) as usize;
            if outstanding_descs + n > usize::from(size) {
                break;
            }
            let head = rx.next_free();
            let descs: Vec<Desc> = (0..n)
                .map(|i| {
                    let slot = (u64::from(head) + i as u64) % u64::from(size);
                    Desc::w(RXBUF + slot * 0x100, 1 + rng.below(0x100) as u32)
                })
                .collect();
            rx.add(&descs);
            outstanding.push_back((head, descs));
            outstanding_descs += n;
        }
        let wanted = dev.input_wanted();
        dev.process_queue(RX_QUEUE);
        if wanted {
            wakeups += 1;
        }
        assert_eq!(room.count(), wakeups);
        // Offer a random piece of what is left.
        let left = input.len() - offered;
        let piece = 1 + rng.below(left.min(700) as u64) as usize;
        let took = dev.enqueue(&input[offered..offered + piece]);
        assert!(took <= piece);
        offered += took;
        assert_eq!(dev.input_wanted(), took < piece);
        // Collect what the guest got, chain by chain.
        let mut got = 0usize;
        while seen_used != rx.used_idx() {
            let (id, len) = rx.used(seen_used);
            let (head, descs) = outstanding.pop_front().expect("a chain was outstanding");
            assert_eq!(id, u32::from(head));
            outstanding_descs -= descs.len();
            let mut left = len as usize;
            for d in &descs {
                let n = left.min(d.len as usize);
                received.extend(rx.read(d.addr, n));
                left -= n;
            }
            assert_eq!(left, 0, "used length within the chain");
            got += len as usize;
            seen_used = seen_used.wrapping_add(1);
        }
        assert_eq!(got, took);
        assert_eq!(received.len(), offered);
    }
    assert_eq!(received, input);
    assert!(!irq.needs_reset());
}

/// Random garbage on both queues: random addresses (in memory, in the hole, near the top of
/// the address space), lengths, flags and next indexes. The device never panics, returns
/// every chain it pops, accounts for every input byte it takes, and never writes outside the
/// buffers it is given.
#[test]
fn random_chains_never_panic() {
    let mem = test_memory();
    let size = 32u16;
    let mut rng = XorShift(0x0123_4567_89ab_cdef);
    let (mut rx, mut tx) = (
        Driver::new(&mem, RX_RINGS, size),
        Driver::new(&mem, TX_RINGS, size),
    );
    let (mut dev, out, _) = console(ConsoleOptions::default());
    let irq = activate(&mut dev, &rx, &tx, &mem);
    let sentinel = 0x8_0000;
    rx.write(sentinel, &[0x5a; 0x1000]);
    let addrs = [
        BUF,
        RXBUF,
        HOLE,
        0x20_8000,
        0xf_fff0,
        u64::MAX - 8,
        0x1f_fff8,
    ];
    let random_chain = |drv: &mut Driver, rng: &mut XorShift| {
        let count = 1 + rng.below(6) as u16;
        let head = rng.below(u64::from(size)) as u16;
        for i in 0..count {
            let addr =
                addrs[rng.below(addrs.len() as u64) as usize].saturating_add(rng.below(4) * 512);
            let len = match rng.below(4) {
                0 => 16,
                1 => rng.next() as u32,
                2 => 0x1_0000,
                _ => rng.below(2000) as u32,
            };
            let mut flags = 0u16;
            if i + 1 < count || rng.below(8) == 0 {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            if rng.below(2) == 0 {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if rng.below(16) == 0 {
                flags |= VRING_DESC_F_INDIRECT as u16;
            }
            let next = if rng.below(8) == 0 {
                rng.below(64) as u16
            } else {
                (head + i + 1) % size
            };
            drv.write_raw((head + i) % size, Descriptor::new(addr, len, flags, next));
        }
        drv.publish(head);
    };
    let (mut rx_seen, mut tx_seen) = (0u16, 0u16);
    let (mut delivered, mut refused) = (0, 0);
    let input = [0xa5u8; 5000];
    for _ in 0..2000 {
        if rng.below(2) == 0 {
            random_chain(&mut tx, &mut rng);
            dev.process_queue(TX_QUEUE);
            tx_seen = tx_seen.wrapping_add(1);
            assert_eq!(tx.used_idx(), tx_seen);
            assert_eq!(tx.used(tx_seen.wrapping_sub(1)).1, 0);
        } else {
            random_chain(&mut rx, &mut rng);
            dev.process_queue(RX_QUEUE);
            let took = dev.enqueue(&input[..1 + rng.below(input.len() as u64) as usize]);
            let mut sum = 0usize;
            while rx_seen != rx.used_idx() {
                sum += rx.used(rx_seen).1 as usize;
                rx_seen = rx_seen.wrapping_add(1);
            }
            assert_eq!(sum, took);
            if took == 0 {
                refused += 1;
            } else {
                delivered += 1;
            }
        }
        assert!(!irq.needs_reset());
    }
    // Bytes that went out were guest memory contents; the exact stream is not checked here.
    let _ = out.take();
    assert_eq!(rx.read(sentinel, 0x1000), vec![0x5a; 0x1000]);
    assert!(
        delivered > 50 && refused > 50,
        "{delivered} delivered, {refused} refused"
    );
}

/// Random output in random valid chains (1..4 buffers, some through an indirect table): the
/// writer gets the guest's bytes in order, byte for byte.
#[test]
fn random_output_arrives_intact() {
    let mem = test_memory();
    let size = 32u16;
    let (rx, mut tx) = (
        Driver::new(&mem, RX_RINGS, 16),
        Driver::new(&mem, TX_RINGS, size),
    );
    let (mut dev, out, _) = console(ConsoleOptions::default());
    let irq = activate(&mut dev, &rx, &tx, &mem);
    let mut rng = XorShift(0x5151_7e7e_abab_0101);
    let mut expected = Vec::new();
    let table = 0x9_0000;
    for round in 0..500u64 {
        let parts = 1 + rng.below(4) as usize;
        let mut descs = Vec::new();
        for p in 0..parts {
            let len = rng.below(3000) as usize;
            let addr = BUF + p as u64 * 0x1_0000 + rng.below(0x100);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            tx.write(addr, &data);
            expected.extend_from_slice(&data);
            descs.push(Desc::r(addr, len as u32));
        }
        if round % 3 == 0 {
            // The same buffers through an indirect table.
            for (i, d) in descs.iter().enumerate() {
                let last = i + 1 == descs.len();
                let flags = if last { 0 } else { VRING_DESC_F_NEXT as u16 };
                let raw = RawDescriptor::from(Descriptor::new(d.addr, d.len, flags, i as u16 + 1));
                mem.write_obj(raw, GuestAddress(table + 16 * i as u64))
                    .unwrap();
            }
            let h = tx.next_free();
            let len = 16 * descs.len() as u32;
            tx.write_raw(
                h,
                Descriptor::new(table, len, VRING_DESC_F_INDIRECT as u16, 0),
            );
            tx.next_desc = (h + 1) % size;
            let before = tx.used_idx();
            tx.publish(h);
            dev.process_queue(TX_QUEUE);
            assert_eq!(tx.used_idx(), before.wrapping_add(1));
        } else {
            transmit(&mut dev, &mut tx, &descs);
        }
        assert_eq!(out.take(), expected, "round {round}");
        expected.clear();
    }
    assert!(!irq.needs_reset());
}

/// Behind an IOMMU: buffers are I/O virtual addresses, and the mapping's permissions hold.
#[test]
fn buffers_through_an_iommu() {
    use crate::virtio::dma::DmaIommu;
    use vm_memory::Permissions;

    let mem = test_memory();
    let (mut rx, mut tx) = (
        Driver::new(&mem, RX_RINGS, 16),
        Driver::new(&mem, TX_RINGS, 16),
    );
    let iommu = DmaIommu::new();
    // The rings at IOVA = GPA; buffers elsewhere.
    iommu
        .map(TX_RINGS, TX_RINGS, 0x2000, Permissions::ReadWrite)
        .unwrap();
    iommu
        .map(RX_RINGS, RX_RINGS, 0x2000, Permissions::ReadWrite)
        .unwrap();
    let (tx_iova, rx_ro_iova, rx_iova) = (0x1000_0000u64, 0x2000_0000u64, 0x3000_0000u64);
    iommu.map(tx_iova, BUF, 0x1000, Permissions::Read).unwrap();
    iommu
        .map(rx_ro_iova, RXBUF, 0x1000, Permissions::Read)
        .unwrap();
    iommu
        .map(rx_iova, RXBUF + 0x1000, 0x1000, Permissions::ReadWrite)
        .unwrap();
    let (mut dev, out, _) = console(ConsoleOptions::default());
    let irq = Arc::new(RecordingInterrupt::default());
    dev.ack_features(dev.offered_features());
    dev.activate(
        vec![rx.queue(), tx.queue()],
        irq.clone(),
        DmaSpace::with_iommu(mem.clone(), iommu),
    )
    .unwrap();

    tx.write(BUF, b"mapped");
    transmit(&mut dev, &mut tx, &[Desc::r(tx_iova, 6)]);
    assert_eq!(out.take(), b"mapped");
    // The guest physical address is not an I/O virtual address.
    transmit(&mut dev, &mut tx, &[Desc::r(BUF, 6)]);
    assert!(out.take().is_empty());

    // A receive buffer mapped read-only gets nothing; a writable one gets the bytes.
    rx.add(&[Desc::w(rx_ro_iova, 8)]);
    assert_eq!(dev.enqueue(b"key"), 0);
    assert_eq!(rx.read(RXBUF, 3), vec![0; 3]);
    rx.add(&[Desc::w(rx_iova, 8)]);
    assert_eq!(dev.enqueue(b"key"), 3);
    assert_eq!(rx.read(RXBUF + 0x1000, 3), b"key");
    assert!(!irq.needs_reset());
}
