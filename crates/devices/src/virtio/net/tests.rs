//! virtio-net driven the way a guest driver would: both queues laid out in real guest memory,
//! frames going to and coming from a datagram socket that stands in for the tap (one datagram,
//! one frame with its vnet header), and a real tap in a network namespace when the tests run as
//! root.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::dma::PhysMemory;
use crate::virtio::features;
use crate::virtio::testutil::{Desc, RecordingInterrupt, XorShift, test_memory};

/// Rings: receive queue at 0, transmit queue at 0x4000; buffers from 0x10000.
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x4000;
const BUF: u64 = 0x10000;
/// An address in the hole between the two test memory regions.
const HOLE: u64 = 0x18_0000;

/// The driver's side of one split queue at `base`, laid out by hand: virtio-queue 0.18's
/// `MockSplitQueue` puts the used ring over the upper half of the available ring (its ring
/// `end()` counts elements as bytes), which breaks any test that posts more than half a queue.
struct Ring<'a> {
    mem: &'a PhysMemory,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a PhysMemory, base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        let ring = Self {
            mem,
            size,
            desc: base,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        };
        let end = used + 6 + 8 * u64::from(size);
        ring.write(base, &vec![0u8; (end - base) as usize]);
        ring
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn write_raw(&mut self, index: u16, d: Descriptor) {
        assert!(index < self.size);
        self.mem
            .write_obj(
                RawDescriptor::from(d),
                GuestAddress(self.desc + 16 * u64::from(index)),
            )
            .unwrap();
        if index >= self.next_desc {
            self.next_desc = (index + 1) % self.size;
        }
    }

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
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// Used ring entry `i`: (head, length).
    fn used(&self, i: u16) -> (u16, u32) {
        let addr = self.used + 4 + 8 * u64::from(i % self.size);
        let e: VirtqUsedElem = self.mem.read_obj(GuestAddress(addr)).unwrap();
        (e.id() as u16, e.len())
    }

    /// The device's `avail_event` (EVENT_IDX): the driver kicks when it passes this index.
    fn avail_event(&self) -> u16 {
        let addr = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(self.mem.read_obj(GuestAddress(addr)).unwrap())
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}

/// A datagram socket as the backend: the test holds the peer.
struct SockBackend {
    sock: UnixDatagram,
    reads: Arc<AtomicUsize>,
    offload: Arc<AtomicU32>,
    /// Offer the socket as `rx_fd`, as a tap does: the device receives into guest buffers.
    direct: bool,
    /// What `rx_frame_bound` answers (a tap: its MTU and headers), and how often it was asked.
    bound: Arc<AtomicUsize>,
    bound_asked: Arc<AtomicUsize>,
}

thread_local! {
    /// Backends made on this thread (one test) offer `rx_fd`.
    static DIRECT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The frame bound backends made on this thread start with.
    static BOUND: std::cell::Cell<usize> = const { std::cell::Cell::new(MAX_FRAME_LEN) };
}

/// Run a receive test with backends that the device reads straight into guest buffers (as a
/// tap), instead of through its own buffer. `reads` counts only the latter.
fn direct(test: fn()) {
    DIRECT.set(true);
    test();
}

impl AsRawFd for SockBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl NetBackend for SockBackend {
    fn read_frame(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.sock.recv(&mut bufs[0])
    }

    fn write_frame(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        self.sock.send(&all)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload.store(flags, Ordering::SeqCst);
        Ok(())
    }

    fn rx_fd(&self) -> Option<RawFd> {
        self.direct.then(|| self.sock.as_raw_fd())
    }

    fn rx_frame_bound(&mut self) -> usize {
        self.bound_asked.fetch_add(1, Ordering::SeqCst);
        self.bound.load(Ordering::SeqCst)
    }
}

struct Setup<'a> {
    rx: Ring<'a>,
    tx: Ring<'a>,
    dev: Net<SockBackend>,
    peer: UnixDatagram,
    irq: Arc<RecordingInterrupt>,
    reads: Arc<AtomicUsize>,
    offload: Arc<AtomicU32>,
}

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn device() -> (
    Net<SockBackend>,
    UnixDatagram,
    Arc<AtomicUsize>,
    Arc<AtomicU32>,
) {
    let (sock, peer) = UnixDatagram::pair().unwrap();
    sock.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let reads = Arc::new(AtomicUsize::new(0));
    let offload = Arc::new(AtomicU32::new(u32::MAX));
    let backend = SockBackend {
        sock,
        reads: reads.clone(),
        offload: offload.clone(),
        direct: DIRECT.get(),
        bound: Arc::new(AtomicUsize::new(BOUND.get())),
        bound_asked: Arc::new(AtomicUsize::new(0)),
    };
    let cfg = NetConfig {
        mac: Some(MAC),
        mtu: Some(1500),
    };
    (Net::new(backend, cfg), peer, reads, offload)
}

impl<'a> Setup<'a> {
    /// An active device with queues of `size` and `features` accepted (plus VERSION_1).
    fn new(mem: &'a PhysMemory, size: u16, features: u64) -> Self {
        let (mut dev, peer, reads, offload) = device();
        let rx = Ring::new(mem, RX_RING, size);
        let tx = Ring::new(mem, TX_RING, size);
        let irq = Arc::new(RecordingInterrupt::default());
        dev.ack_features(features | features::VERSION_1);
        dev.activate(
            vec![rx.queue(), tx.queue()],
            irq.clone(),
            DmaSpace::identity(mem.clone()),
        )
        .unwrap();
        Self {
            rx,
            tx,
            dev,
            peer,
            irq,
            reads,
            offload,
        }
    }

    /// Everything offered, or everything but MRG_RXBUF.
    fn with_mrg(mem: &'a PhysMemory, mrg: bool) -> Self {
        let (d, ..) = device();
        let mut f = d.offered_features();
        if !mrg {
            f &= !bit(VIRTIO_NET_F_MRG_RXBUF);
        }
        Self::new(mem, QUEUE_SIZE, f)
    }

    /// Frames the device wrote to the backend so far.
    fn sent(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME_LEN + 100];
        while let Ok(n) = self.peer.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    /// Send one transmit chain and process it; returns (used length, frames on the backend).
    fn transmit(&mut self, descs: &[Desc]) -> (u32, Vec<Vec<u8>>) {
        let before = self.tx.used_idx();
        self.tx.add(descs);
        self.dev.process_queue(TX_QUEUE);
        assert_eq!(self.tx.used_idx(), before.wrapping_add(1), "chain returned");
        (self.tx.used(before).1, self.sent())
    }
}

/// A header with `flags` and `gso_type`, num_buffers 0.
fn hdr(flags: u8, gso_type: u8) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso_type;
    h
}

/// An Ethernet frame of `len` bytes: broadcast, an experimental ethertype, a pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&MAC);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

fn with_hdr(h: [u8; VNET_HDR_LEN], f: &[u8]) -> Vec<u8> {
    let mut v = h.to_vec();
    v.extend_from_slice(f);
    v
}

#[test]
fn config_space_and_features() {
    let (dev, ..) = device();
    assert_eq!(dev.device_type(), VIRTIO_ID_NET);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let offered = dev.offered_features();
    for f in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(offered & bit(f), 0, "feature {f}");
    }
    assert_eq!(offered & features::COMMON, features::COMMON);
    // No control queue, no multiqueue: the device has exactly one queue pair.
    assert_eq!(offered & bit(17), 0);
    assert_eq!(offered & bit(22), 0);

    let mut c = [0u8; 16];
    dev.read_config(0, &mut c);
    assert_eq!(&c[..6], &MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "LINK_UP");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1, "max_virtqueue_pairs");
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500, "mtu");
    assert_eq!(&c[12..], &[0; 4], "past the end reads zero");
    let mut one = [0u8; 1];
    dev.read_config(u64::MAX, &mut one);
    assert_eq!(one, [0]);

    // Writes change nothing.
    let mut dev = dev;
    dev.write_config(0, &[1, 2, 3, 4, 5, 6]);
    dev.read_config(0, &mut c);
    assert_eq!(&c[..6], &MAC);

    // Without a MAC or MTU, neither feature is offered.
    let (sock, _peer) = UnixDatagram::pair().unwrap();
    let plain = Net::new(
        SockBackend {
            sock,
            reads: Arc::default(),
            offload: Arc::default(),
            direct: false,
            bound: Arc::new(AtomicUsize::new(MAX_FRAME_LEN)),
            bound_asked: Arc::default(),
        },
        NetConfig::default(),
    );
    assert_eq!(plain.offered_features() & bit(VIRTIO_NET_F_MAC), 0);
    assert_eq!(plain.offered_features() & bit(VIRTIO_NET_F_MTU), 0);
}

#[test]
fn tap_offloads_follow_the_guests_receive_features() {
    let mem = test_memory();
    let all = Setup::with_mrg(&mem, true);
    assert_eq!(
        all.offload.load(Ordering::SeqCst),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
    );
    let mut s = Setup::new(
        &mem,
        16,
        bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO6),
    );
    assert_eq!(
        s.offload.load(Ordering::SeqCst),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );
    s.dev.reset();
    assert_eq!(s.offload.load(Ordering::SeqCst), 0);
    assert!(!s.dev.is_active());
    // TSO without checksum offload is not asked of the tap (the kernel would refuse it).
    assert_eq!(tap_offload(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    assert_eq!(
        tap_offload(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
        libc::TUN_F_CSUM
    );
}

#[test]
fn transmitted_frame_reaches_the_backend_intact() {
    let mem = test_memory();
    let mut s = Setup::with_mrg(&mem, true);
    let f = frame(1514, 3);
    // Header in its own descriptor, the frame split over two more.
    s.tx.write(BUF, &hdr(0, 0));
    s.tx.write(BUF + 0x1000, &f[..600]);
    s.tx.write(BUF + 0x3000, &f[600..]);
    let (len, sent) = s.transmit(&[
        Desc::r(BUF, 12),
        Desc::r(BUF + 0x1000, 600),
        Desc::r(BUF + 0x3000, 914),
    ]);
    assert_eq!(len, 0);
    assert_eq!(sent, vec![with_hdr(hdr(0, 0), &f)]);
    assert_eq!(s.irq.take_queues(), vec![TX_QUEUE]);

    // Header and frame in one buffer, with a checksum offload request (CSUM negotiated).
    let csum = with_hdr(hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0), &frame(60, 9));
    s.tx.write(BUF, &csum);
    let (_, sent) = s.transmit(&[Desc::r(BUF, csum.len() as u32)]);
    assert_eq!(sent, vec![csum]);

    // A TSO frame as big as they come.
    let big = with_hdr(
        hdr(
            VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        ),
        &frame(MAX_FRAME_LEN - VNET_HDR_LEN, 1),
    );
    s.tx.write(BUF, &big);
    let (_, sent) = s.transmit(&[Desc::r(BUF, big.len() as u32)]);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0], big);
    let st = s.dev.stats();
    assert_eq!((st.tx_frames, st.tx_dropped), (3, 0));
}

#[test]
fn malformed_transmit_chains_are_dropped_and_returned() {
    let mem = test_memory();
    let mut s = Setup::new(&mem, QUEUE_SIZE, 0);
    let good = with_hdr(hdr(0, 0), &frame(64, 0));
    s.tx.write(BUF, &good);

    let cases: Vec<Vec<Desc>> = vec![
        // A writable descriptor.
        vec![Desc::r(BUF, 12), Desc::w(BUF + 12, 64)],
        // Too short for a header and an Ethernet header.
        vec![Desc::r(BUF, 25)],
        // Outside guest memory, and straddling the end of the first region.
        vec![Desc::r(BUF, 12), Desc::r(HOLE, 64)],
        vec![Desc::r(0xf_fff0, 64)],
        // Longer than any frame.
        vec![Desc::r(BUF, 40000), Desc::r(BUF, 40000)],
        vec![Desc::r(BUF, u32::MAX)],
    ];
    for descs in &cases {
        let (len, sent) = s.transmit(descs);
        assert_eq!(len, 0);
        assert!(sent.is_empty(), "{descs:?}");
    }
    // Offloads the driver did not negotiate (no CSUM, no HOST_TSO4).
    for h in [
        hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0),
        hdr(0, VIRTIO_NET_HDR_GSO_TCPV4 as u8),
        hdr(0, 3), // UDP
        hdr(0, 0x77),
    ] {
        s.tx.write(BUF, &with_hdr(h, &frame(64, 0)));
        let (_, sent) = s.transmit(&[Desc::r(BUF, good.len() as u32)]);
        assert!(sent.is_empty());
    }
    // A loop: 2 descriptors pointing at each other.
    let h = s.tx.next_desc;
    s.tx.write_raw(h, Descriptor::new(BUF, 40, VRING_DESC_F_NEXT as u16, h + 1));
    s.tx.write_raw(h + 1, Descriptor::new(BUF, 40, VRING_DESC_F_NEXT as u16, h));
    s.tx.publish(h);
    s.dev.process_queue(TX_QUEUE);
    assert!(s.sent().is_empty());
    assert_eq!(s.dev.stats().tx_dropped, cases.len() as u64 + 5);
    assert!(!s.irq.needs_reset());

    // The device is still fine.
    s.tx.write(BUF, &good);
    let (_, sent) = s.transmit(&[Desc::r(BUF, good.len() as u32)]);
    assert_eq!(sent, vec![good]);
}

#[test]
fn received_frame_lands_in_the_guests_buffer() {
    let mem = test_memory();
    let mut s = Setup::with_mrg(&mem, false);
    let f = frame(100, 5);
    s.peer
        .send(&with_hdr(hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0), &f))
        .unwrap();
    // Header and data in separate buffers, as older drivers post them.
    let head = s.rx.add(&[Desc::w(BUF, 12), Desc::w(BUF + 0x1000, 2048)]);
    s.dev.process_backend();
    assert_eq!(s.rx.used_idx(), 1);
    assert_eq!(s.rx.used(0), (head, 112));
    let mut want = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0);
    want[10] = 1; // num_buffers
    assert_eq!(s.rx.read(BUF, 12), want);
    assert_eq!(s.rx.read(BUF + 0x1000, 100), f);
    assert_eq!(s.irq.take_queues(), vec![RX_QUEUE]);
    let st = s.dev.stats();
    assert_eq!((st.rx_frames, st.rx_bytes), (1, 112));
}

#[test]
fn without_guest_csum_header_flags_are_cleared() {
    let mem = test_memory();
    let mut s = Setup::new(&mem, QUEUE_SIZE, 0);
    s.peer.send(&with_hdr(hdr(2, 0), &frame(60, 1))).unwrap();
    s.rx.add(&[Desc::w(BUF, 2048)]);
    s.dev.process_backend();
    assert_eq!(s.rx.read(BUF, 2), [0, 0]);
}

#[test]
fn mergeable_buffers_spread_a_frame_over_chains() {
    let mem = test_memory();
    let mut s = Setup::with_mrg(&mem, true);
    let heads = [
        s.rx.add(&[Desc::w(BUF, 1024)]),
        s.rx.add(&[Desc::w(BUF + 0x1000, 512), Desc::w(BUF + 0x2000, 512)]),
        s.rx.add(&[Desc::w(BUF + 0x3000, 1024)]),
        s.rx.add(&[Desc::w(BUF + 0x4000, 1024)]),
    ];
    let f = frame(3000, 7);
    let sent = with_hdr(hdr(0, 0), &f);
    s.peer.send(&sent).unwrap();
    s.dev.process_backend();
    assert_eq!(s.rx.used_idx(), 3);
    assert_eq!(s.rx.used(0), (heads[0], 1024));
    assert_eq!(s.rx.used(1), (heads[1], 1024));
    assert_eq!(s.rx.used(2), (heads[2], 3012 - 2048));
    let mut got = s.rx.read(BUF, 1024);
    got.extend(s.rx.read(BUF + 0x1000, 512));
    got.extend(s.rx.read(BUF + 0x2000, 512));
    got.extend(s.rx.read(BUF + 0x3000, 964));
    let mut want = sent.clone();
    want[10] = 3; // num_buffers
    assert_eq!(got, want);
    assert_eq!(s.irq.take_queues(), vec![RX_QUEUE]);

    // The fourth chain takes the next frame.
    s.peer.send(&with_hdr(hdr(0, 0), &frame(60, 1))).unwrap();
    s.dev.process_backend();
    assert_eq!(s.rx.used(3), (heads[3], 72));
    assert_eq!(s.rx.read(BUF + 0x4000 + 10, 2), [1, 0]);
}

/// Frames `lens` long (each with its header) sent to a direct device with MRG_RXBUF whose
/// backend bounds frames at `bound`, four 1 KiB chains posted; the device is run once.
fn bounded_receive<'m>(mem: &'m PhysMemory, bound: usize, lens: &[usize]) -> (Setup<'m>, Vec<u16>) {
    DIRECT.set(true);
    BOUND.set(bound);
    let mut s = Setup::with_mrg(mem, true);
    let heads = (0..4)
        .map(|i| s.rx.add(&[Desc::w(BUF + i * 0x1000, 1024)]))
        .collect();
    for (i, &len) in lens.iter().enumerate() {
        let f = with_hdr(hdr(0, 0), &frame(len - VNET_HDR_LEN, i as u8));
        s.peer.send(&f).unwrap();
    }
    (s, heads)
}

/// A chain longer than the backend's bound (a tap's MTU) is read with a plain read. A frame
/// that comes back longer (the MTU was raised) is cut short: dropped, counted, and the bound
/// asked again, so that the next one is spread over chains.
#[test]
fn direct_receive_trusts_the_backends_frame_bound_until_a_frame_exceeds_it() {
    let mem = test_memory();
    let (mut s, heads) = bounded_receive(&mem, 600, &[512]);
    assert_eq!(
        s.dev.backend().bound_asked.load(Ordering::SeqCst),
        1,
        "asked at activation"
    );
    s.dev.process_backend();
    assert_eq!(s.rx.used_idx(), 1);
    assert_eq!(s.rx.used(0), (heads[0], 512));
    let mut want = with_hdr(hdr(0, 0), &frame(500, 0));
    want[10] = 1; // num_buffers
    assert_eq!(s.rx.read(BUF, 512), want);

    // The MTU goes up: the next frame is longer than a chain.
    s.dev.backend().bound.store(2000, Ordering::SeqCst);
    for seed in [1, 2] {
        let f = with_hdr(hdr(0, 0), &frame(1500, seed));
        s.peer.send(&f).unwrap();
    }
    s.dev.process_backend();
    assert_eq!(s.dev.stats().rx_dropped, 1, "the frame cut short");
    assert_eq!(s.dev.backend().bound_asked.load(Ordering::SeqCst), 2);
    // The second one goes over chains 1 and 2 (a readv with room behind the chain).
    assert_eq!(s.rx.used_idx(), 3);
    assert_eq!(s.rx.used(1), (heads[1], 1024));
    assert_eq!(s.rx.used(2), (heads[2], 1512 - 1024));
    let mut got = s.rx.read(BUF + 0x1000, 1024);
    got.extend(s.rx.read(BUF + 0x2000, 1512 - 1024));
    let mut want = with_hdr(hdr(0, 0), &frame(1500, 2));
    want[10] = 2;
    assert_eq!(got, want);
}

/// A backend whose bound a frame exceeds without the bound changing is not trusted again:
/// every later frame has room behind its chain.
#[test]
fn direct_receive_stops_trusting_a_wrong_frame_bound() {
    let mem = test_memory();
    let (mut s, heads) = bounded_receive(&mem, 600, &[1500, 1500]);
    s.dev.process_backend();
    assert_eq!(s.dev.stats().rx_dropped, 1);
    assert_eq!(s.rx.used_idx(), 2);
    assert_eq!(s.rx.used(0), (heads[0], 1024));
    assert_eq!(s.rx.used(1), (heads[1], 1500 - 1024));
    // Small frames still arrive whole.
    s.peer.send(&with_hdr(hdr(0, 0), &frame(100, 9))).unwrap();
    s.dev.process_backend();
    assert_eq!(s.rx.used(2), (heads[2], 112));
    assert_eq!(s.dev.stats().rx_frames, 2);
}

#[test]
fn no_receive_buffers_means_no_read() {
    let mem = test_memory();
    let mut s = Setup::new(&mem, QUEUE_SIZE, features::RING_EVENT_IDX);
    let f = with_hdr(hdr(0, 0), &frame(80, 2));
    s.peer.send(&f).unwrap();
    s.dev.process_backend();
    s.dev.process_queue(RX_QUEUE);
    assert_eq!(s.reads.load(Ordering::SeqCst), 0, "tap not read");
    assert_eq!(s.rx.used_idx(), 0);
    // The driver is asked to kick at its next buffer.
    assert_eq!(s.rx.avail_event(), 0);

    // The guest posts a buffer and kicks: the frame arrives.
    let head = s.rx.add(&[Desc::w(BUF, 2048)]);
    s.dev.process_queue(RX_QUEUE);
    assert_eq!(s.rx.used(0), (head, f.len() as u32));
    assert_eq!(&s.rx.read(BUF + 12, 80), &f[12..]);
    // And the tap was read until empty, then the ring was found empty again.
    assert_eq!(s.rx.avail_event(), 1);
    assert_eq!(s.dev.stats().rx_dropped, 0);
}

#[test]
fn mergeable_frame_waits_for_enough_buffers() {
    let mem = test_memory();
    let mut s = Setup::new(
        &mem,
        QUEUE_SIZE,
        bit(VIRTIO_NET_F_MRG_RXBUF) | features::RING_EVENT_IDX,
    );
    let sent = with_hdr(hdr(0, 0), &frame(3000, 4));
    s.peer.send(&sent).unwrap();
    let first = s.rx.add(&[Desc::w(BUF, 1024)]);
    s.dev.process_backend();
    // Read into the device's buffer, or into the chain and then copied there.
    let direct = DIRECT.get();
    let reads = |n: usize| if direct { 0 } else { n };
    assert_eq!(s.reads.load(Ordering::SeqCst), reads(1));
    assert_eq!(s.rx.used_idx(), 0, "frame waits");
    assert_eq!(s.rx.avail_event(), 1, "kick wanted at the next buffer");
    // Held at its own size, not in a MAX_FRAME_LEN buffer (the thread's scratch went back).
    assert_eq!(s.dev.rx.buf.len(), sent.len());
    // More input does not get read while the frame waits.
    s.peer.send(&with_hdr(hdr(0, 0), &frame(60, 1))).unwrap();
    s.dev.process_backend();
    assert_eq!(s.reads.load(Ordering::SeqCst), reads(1));

    let second = s.rx.add(&[Desc::w(BUF + 0x1000, 1024)]);
    s.dev.process_queue(RX_QUEUE);
    assert_eq!(s.rx.used_idx(), 0, "still not enough");
    let third = s.rx.add(&[Desc::w(BUF + 0x2000, 1024)]);
    s.dev.process_queue(RX_QUEUE);
    assert_eq!(s.rx.used_idx(), 3);
    assert_eq!(
        [s.rx.used(0), s.rx.used(1), s.rx.used(2)],
        [(first, 1024), (second, 1024), (third, 964)]
    );
    assert_eq!(s.rx.read(BUF + 10, 2), [3, 0]);
    assert_eq!(s.rx.read(BUF + 0x2000, 964), &sent[2048..]);
    assert!(s.dev.rx.buf.is_empty(), "nothing held once delivered");
    // The second frame stays in the backend until there is a buffer for it.
    assert_eq!(s.reads.load(Ordering::SeqCst), reads(1));
    s.rx.add(&[Desc::w(BUF + 0x3000, 1024)]);
    s.dev.process_queue(RX_QUEUE);
    // One read for it, and none after: no buffers are left.
    assert_eq!(s.reads.load(Ordering::SeqCst), reads(2));
    assert_eq!(s.rx.used_idx(), 4);
    assert_eq!(s.rx.read(BUF + 0x3000 + 12, 60), frame(60, 1));
    assert_eq!(s.dev.stats().rx_frames, 2);
}

#[test]
fn malformed_receive_chains_are_returned_unused() {
    let mem = test_memory();
    let mut s = Setup::with_mrg(&mem, true);
    let bad = [
        s.rx.add(&[Desc::r(BUF, 1024)]),
        s.rx.add(&[Desc::w(BUF, 512), Desc::r(BUF + 512, 512)]),
        s.rx.add(&[Desc::w(HOLE, 1024)]),
        s.rx.add(&[Desc::w(BUF, 8)]),
    ];
    let good = s.rx.add(&[Desc::w(BUF + 0x1000, 2048)]);
    let sent = with_hdr(hdr(0, 0), &frame(500, 8));
    s.peer.send(&sent).unwrap();
    s.dev.process_backend();
    assert_eq!(s.rx.used_idx(), 5);
    for (i, &h) in bad.iter().enumerate() {
        assert_eq!(s.rx.used(i as u16), (h, 0));
    }
    assert_eq!(s.rx.used(4), (good, 512));
    assert_eq!(s.rx.read(BUF + 0x1000 + 12, 500), &sent[12..]);
    assert_eq!(s.dev.stats().rx_bad_chains, 4);

    // A bad chain between two good ones of the same frame goes back before them, so the
    // frame's chains stay together.
    let a = s.rx.add(&[Desc::w(BUF, 1024)]);
    let b = s.rx.add(&[Desc::r(BUF, 1024)]);
    let c = s.rx.add(&[Desc::w(BUF + 0x1000, 1024)]);
    let sent = with_hdr(hdr(0, 0), &frame(1500, 9));
    s.peer.send(&sent).unwrap();
    s.dev.process_backend();
    assert_eq!(s.rx.used_idx(), 8);
    assert_eq!(
        [s.rx.used(5), s.rx.used(6), s.rx.used(7)],
        [(b, 0), (a, 1024), (c, 1512 - 1024)]
    );
    assert_eq!(s.rx.read(BUF + 10, 2), [2, 0]);
    assert!(!s.irq.needs_reset());
}

#[test]
fn frame_too_big_for_a_buffer_is_dropped_and_the_buffer_kept() {
    let mem = test_memory();
    let mut s = Setup::with_mrg(&mem, false);
    let head = s.rx.add(&[Desc::w(BUF, 1526)]);
    s.peer.send(&with_hdr(hdr(0, 0), &frame(4000, 1))).unwrap();
    let small = with_hdr(hdr(0, 0), &frame(100, 2));
    s.peer.send(&small).unwrap();
    s.dev.process_backend();
    assert_eq!(s.rx.used_idx(), 1);
    assert_eq!(s.rx.used(0), (head, 112));
    assert_eq!(s.rx.read(BUF + 12, 100), &small[12..]);
    let st = s.dev.stats();
    assert_eq!((st.rx_frames, st.rx_dropped), (1, 1));
}

#[test]
fn mergeable_frame_larger_than_the_ring_is_dropped() {
    let mem = test_memory();
    let mut s = Setup::new(&mem, 4, bit(VIRTIO_NET_F_MRG_RXBUF));
    for i in 0..4 {
        s.rx.add(&[Desc::w(BUF + i * 0x100, 64)]);
    }
    s.peer.send(&with_hdr(hdr(0, 0), &frame(300, 1))).unwrap();
    // A runt from the backend is dropped too.
    s.peer.send(&[0u8; 20]).unwrap();
    let small = with_hdr(hdr(0, 0), &frame(100, 2));
    s.peer.send(&small).unwrap();
    s.dev.process_backend();
    assert_eq!(s.rx.used_idx(), 2);
    assert_eq!(s.rx.used(0).1, 64);
    assert_eq!(s.rx.used(1).1, 112 - 64);
    assert_eq!(s.dev.stats().rx_dropped, 2);
}

#[test]
fn receive_ring_faults_need_a_reset() {
    let mem = test_memory();
    let mut s = Setup::with_mrg(&mem, true);
    s.peer.send(&with_hdr(hdr(0, 0), &frame(100, 2))).unwrap();
    s.rx.set_avail_idx(1000);
    s.dev.process_backend();
    assert!(s.irq.needs_reset());
    assert_eq!(s.reads.load(Ordering::SeqCst), 0);
    // Broken until reset: nothing more is read.
    s.rx.set_avail_idx(0);
    s.rx.add(&[Desc::w(BUF, 2048)]);
    s.dev.process_queue(RX_QUEUE);
    assert_eq!(s.rx.used_idx(), 0);

    // A head index outside the queue.
    let mut s = Setup::with_mrg(&mem, true);
    s.peer.send(&with_hdr(hdr(0, 0), &frame(100, 2))).unwrap();
    s.rx.publish(300);
    s.dev.process_backend();
    assert!(s.irq.needs_reset());
}

#[test]
fn inactive_device_ignores_everything() {
    let (mut dev, peer, reads, _) = device();
    peer.send(&with_hdr(hdr(0, 0), &frame(100, 2))).unwrap();
    dev.process_backend();
    dev.process_queue(RX_QUEUE);
    dev.process_queue(TX_QUEUE);
    dev.process_queue(7);
    assert_eq!(reads.load(Ordering::SeqCst), 0);
}

/// Random descriptors, frames and kicks: nothing panics, every used length fits its chain,
/// and a ring the device gave up on stays given up on.
#[test]
fn random_chains_and_frames_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let addrs = [
        BUF,
        BUF + 0x8000,
        0xf_fff0,
        HOLE,
        0x20_0000,
        0x2f_ff00,
        u64::MAX - 8,
    ];
    let lens = [
        0u32,
        1,
        11,
        12,
        25,
        26,
        64,
        1514,
        1526,
        4096,
        70000,
        u32::MAX,
    ];
    let frame_lens = [0usize, 5, 25, 26, 60, 1514, 3000, 65536, MAX_FRAME_LEN];
    let offered = device().0.offered_features();
    for _round in 0..400 {
        // Fresh memory: rings of another size must not find the last round's bytes.
        let mem = test_memory();
        let size = 1u16 << (1 + rng.below(6));
        let features = rng.next() & offered;
        let mut s = Setup::new(&mem, size, features);
        // Writable capacity and descriptor slots of each receive chain as last posted.
        let mut rx_cap = std::collections::HashMap::new();
        let mut checked = 0u16;
        for _step in 0..80 {
            let pick = |rng: &mut XorShift, xs: &[u64]| xs[rng.below(xs.len() as u64) as usize];
            match rng.below(6) {
                0 | 1 => {
                    let rx = rng.below(2) == 0;
                    let n = 1 + rng.below(4) as usize;
                    let descs: Vec<Desc> = (0..n)
                        .map(|_| {
                            let addr = pick(&mut rng, &addrs).saturating_add(rng.below(64));
                            let len = lens[rng.below(lens.len() as u64) as usize];
                            // Mostly the right direction for the queue.
                            let write = (rng.below(8) != 0) == rx;
                            Desc { addr, len, write }
                        })
                        .collect();
                    if rx {
                        let cap: u64 = descs
                            .iter()
                            .filter(|d| d.write)
                            .map(|d| u64::from(d.len))
                            .sum();
                        let head = s.rx.add(&descs);
                        let slots: Vec<u16> = (0..n as u16).map(|i| (head + i) % size).collect();
                        // Chains whose descriptors this one overwrote are no longer known.
                        rx_cap.retain(|_, (_, old): &mut (u64, Vec<u16>)| {
                            !old.iter().any(|i| slots.contains(i))
                        });
                        rx_cap.insert(head, (cap, slots));
                    } else {
                        s.tx.add(&descs);
                    }
                }
                2 => {
                    // A raw descriptor with random flags (NEXT, WRITE, INDIRECT) and next.
                    let ring = if rng.below(2) == 0 {
                        &mut s.rx
                    } else {
                        &mut s.tx
                    };
                    let index = rng.below(u64::from(size)) as u16;
                    let d = Descriptor::new(
                        pick(&mut rng, &addrs),
                        lens[rng.below(lens.len() as u64) as usize],
                        rng.below(8) as u16,
                        rng.below(u64::from(size) + 2) as u16,
                    );
                    ring.write_raw(index, d);
                    if rng.below(2) == 0 {
                        ring.publish(index);
                    }
                    rx_cap.retain(|_, (_, slots): &mut (u64, Vec<u16>)| !slots.contains(&index));
                }
                3 => {
                    let len = frame_lens[rng.below(frame_lens.len() as u64) as usize];
                    let mut f = vec![0u8; len];
                    for b in f.iter_mut().take(VNET_HDR_LEN) {
                        *b = rng.next() as u8;
                    }
                    let _ = s.peer.send(&f);
                }
                4 => s.dev.process_backend(),
                _ => s.dev.process_queue(rng.below(3) as u16),
            }
            let used = s.rx.used_idx();
            while checked != used {
                let (head, len) = s.rx.used(checked);
                if let Some(&(cap, _)) = rx_cap.get(&head) {
                    assert!(u64::from(len) <= cap, "head {head}: {len} > {cap}");
                }
                assert!(len as usize <= MAX_FRAME_LEN, "head {head}: {len}");
                checked = checked.wrapping_add(1);
            }
            let _ = s.sent();
        }
        if s.irq.needs_reset() {
            // Nothing is served until reset. (The rings may hold anything by now: compare
            // after the driver's own writes.)
            s.rx.add(&[Desc::w(BUF, 2048)]);
            s.tx.add(&[Desc::r(BUF, 100)]);
            let before = (s.rx.used_idx(), s.tx.used_idx());
            s.dev.process_queue(RX_QUEUE);
            s.dev.process_queue(TX_QUEUE);
            s.dev.process_backend();
            assert_eq!((s.rx.used_idx(), s.tx.used_idx()), before);
        }
    }
}

/// A real tap in a network namespace of its own. Needs root and /dev/net/tun.
mod real_tap {
    use std::ffi::CString;
    use std::process::Command;

    use super::*;

    /// Removes the namespace on drop, even after a panic.
    struct Netns(String);

    impl Netns {
        fn new(tag: &str) -> Option<Self> {
            let name = format!("mf-{tag}-{}", std::process::id());
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| Self(name))
        }

        fn ip(&self, args: &[&str]) {
            let st = Command::new("ip")
                .args(["-n", &self.0])
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}");
        }

        /// Move the calling thread into the namespace.
        fn enter(&self) {
            let f = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
            // SAFETY: setns on a namespace fd we hold; it changes only this thread.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// Whether the test can run; otherwise say why. CI runs as root, so there a missing
    /// capability is a failure, not a skip.
    fn can_run() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let tun = std::path::Path::new("/dev/net/tun").exists();
        if root && tun {
            return true;
        }
        let why = if root { "no /dev/net/tun" } else { "not root" };
        assert!(
            std::env::var_os("CI").is_none(),
            "real-tap test cannot run in CI: {why}"
        );
        eprintln!("SKIPPED: real-tap test needs root and /dev/net/tun ({why})");
        false
    }

    /// An AF_PACKET socket bound to `ifname` in the calling thread's namespace.
    struct Packet(std::os::fd::OwnedFd);

    impl Packet {
        fn bind(ifname: &str) -> Self {
            use std::os::fd::FromRawFd;
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket creation.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
            // SAFETY: a new fd nothing else owns.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            let cname = CString::new(ifname).unwrap();
            // SAFETY: a valid NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            assert_ne!(index, 0);
            // SAFETY: sockaddr_ll is plain data; zero is valid.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto;
            sa.sll_ifindex = i32::try_from(index).unwrap();
            // SAFETY: sa is a sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sa).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 10,
                tv_usec: 0,
            };
            // SAFETY: SO_RCVTIMEO takes a timeval of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            assert_eq!(rc, 0);
            Self(fd)
        }

        fn send(&self, frame: &[u8]) {
            // SAFETY: the buffer is valid for its length; the socket is bound to the device.
            let n =
                unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(
                usize::try_from(n).ok(),
                Some(frame.len()),
                "{}",
                io::Error::last_os_error()
            );
        }

        /// The next frame with our ethertype (the kernel sends its own frames too).
        fn recv_ours(&self) -> Vec<u8> {
            let mut buf = vec![0u8; 65536];
            loop {
                // SAFETY: the buffer is valid for writes of its length.
                let n = unsafe {
                    libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                let n = usize::try_from(n)
                    .unwrap_or_else(|_| panic!("recv: {}", io::Error::last_os_error()));
                if n >= 14 && buf[12..14] == [0x88, 0xb5] {
                    return buf[..n].to_vec();
                }
            }
        }
    }

    /// Drop CAP_NET_ADMIN from the calling thread's effective set (capabilities are per
    /// thread in Linux, so the rest of the test process keeps it).
    fn drop_net_admin() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_NET_ADMIN: u32 = 12;
        let mut h = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut d = [Data::default(); 2];
        // SAFETY: capget fills two Data entries for version 3; both pointers are valid.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut h, d.as_mut_ptr()) };
        assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
        d[0].effective &= !(1 << CAP_NET_ADMIN);
        // SAFETY: capset reads the header and two Data entries; pid 0 is this thread.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut h, d.as_ptr()) };
        assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
    }

    /// Wait until `fd` is readable (a bounded wait, so a broken test ends).
    fn wait_readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 10_000) == 1 }
    }

    #[test]
    fn frames_cross_a_real_tap_both_ways() {
        if !can_run() {
            return;
        }
        let ns = Netns::new("tap").expect("ip netns add");
        std::thread::scope(|t| {
            t.spawn(|| {
                ns.enter();
                let tap = Tap::open("mftap0").expect("open tap");
                assert_eq!(tap.name(), "mftap0");
                ns.ip(&["link", "set", "mftap0", "up"]);
                ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "mftap0"]);
                let pkt = Packet::bind("mftap0");

                let mem = test_memory();
                let mut dev = Net::new(
                    tap,
                    NetConfig {
                        mac: Some(MAC),
                        mtu: None,
                    },
                );
                let mut rx = Ring::new(&mem, RX_RING, QUEUE_SIZE);
                let mut tx = Ring::new(&mem, TX_RING, QUEUE_SIZE);
                let irq = Arc::new(RecordingInterrupt::default());
                dev.ack_features(dev.offered_features());
                dev.activate(
                    vec![rx.queue(), tx.queue()],
                    irq.clone(),
                    DmaSpace::identity(mem.clone()),
                )
                .unwrap();

                // Guest -> tap: the header is consumed by the kernel, the frame arrives as sent.
                let f = frame(200, 42);
                tx.write(BUF, &with_hdr(hdr(0, 0), &f));
                tx.add(&[Desc::r(BUF, 212)]);
                dev.process_queue(TX_QUEUE);
                assert_eq!(dev.stats().tx_frames, 1, "{:?}", dev.stats());
                assert_eq!(pkt.recv_ours(), f);

                // Tap -> guest.
                for i in 0..8 {
                    rx.add(&[Desc::w(BUF + 0x1000 * (i + 1), 2048)]);
                }
                dev.process_queue(RX_QUEUE);
                let back = frame(300, 24);
                pkt.send(&back);
                let mut found = None;
                for _ in 0..50 {
                    if !wait_readable(dev.backend_fd()) {
                        break;
                    }
                    dev.process_backend();
                    for i in 0..rx.used_idx() {
                        let (head, len) = rx.used(i);
                        let addr = BUF + 0x1000 * (u64::from(head) + 1);
                        let got = rx.read(addr, len as usize);
                        if got.len() >= 26 && got[24..26] == [0x88, 0xb5] {
                            found = Some(got);
                        }
                    }
                    if found.is_some() {
                        break;
                    }
                }
                let got = found.expect("frame reached the guest");
                assert_eq!(&got[12..], &back);
                assert_eq!(&got[10..12], &[1, 0], "num_buffers");
                assert!(!irq.needs_reset());
            })
            .join()
            .unwrap();
        });
        drop(ns);
    }

    /// Without offloads the device trusts the tap's MTU and reads with a plain `read`; when
    /// the MTU goes up, the first longer frame is lost (counted), and the next spreads over
    /// two chains.
    #[test]
    fn a_raised_tap_mtu_costs_one_frame() {
        if !can_run() {
            return;
        }
        let ns = Netns::new("mtu").expect("ip netns add");
        std::thread::scope(|t| {
            t.spawn(|| {
                ns.enter();
                let mut tap = Tap::open("mftap2").expect("open tap");
                ns.ip(&["link", "set", "mftap2", "up"]);
                // MTU 1500 + Ethernet header, two VLAN tags and the vnet header.
                assert_eq!(tap.rx_frame_bound(), 1500 + 14 + 8 + 12);
                let pkt = Packet::bind("mftap2");
                let mem = test_memory();
                let mut dev = Net::new(tap, NetConfig::default());
                let mut rx = Ring::new(&mem, RX_RING, QUEUE_SIZE);
                let tx = Ring::new(&mem, TX_RING, QUEUE_SIZE);
                dev.ack_features(features::VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF));
                dev.activate(
                    vec![rx.queue(), tx.queue()],
                    Arc::new(RecordingInterrupt::default()),
                    DmaSpace::identity(mem.clone()),
                )
                .unwrap();
                for i in 0..16 {
                    rx.add(&[Desc::w(BUF + 0x1000 * (i + 1), 2048)]);
                }
                // Our frames as the guest got them (header first), chains put back together.
                let mut seen = 0;
                let mut ours = |dev: &mut Net<Tap>, want: usize| {
                    let mut got = Vec::new();
                    for _ in 0..50 {
                        if got.len() == want || !wait_readable(dev.backend_fd()) {
                            break;
                        }
                        dev.process_backend();
                        while seen < rx.used_idx() {
                            let (head, len) = rx.used(seen);
                            let addr = BUF + 0x1000 * (u64::from(head) + 1);
                            let mut f = rx.read(addr, len as usize);
                            let extra = u16::from_le_bytes([f[10], f[11]]) - 1;
                            for _ in 0..extra {
                                seen += 1;
                                let (head, len) = rx.used(seen);
                                let addr = BUF + 0x1000 * (u64::from(head) + 1);
                                f.extend(rx.read(addr, len as usize));
                            }
                            seen += 1;
                            if f.len() >= 26 && f[24..26] == [0x88, 0xb5] {
                                got.push(f[12..].to_vec());
                            }
                        }
                    }
                    got
                };
                let small = frame(300, 1);
                pkt.send(&small);
                assert_eq!(ours(&mut dev, 1), vec![small]);

                ns.ip(&["link", "set", "mftap2", "mtu", "4000"]);
                let (lost, big) = (frame(3000, 2), frame(3000, 3));
                pkt.send(&lost);
                pkt.send(&big);
                assert_eq!(ours(&mut dev, 1), vec![big]);
                assert_eq!(dev.stats().rx_dropped, 1, "{:?}", dev.stats());
            })
            .join()
            .unwrap();
        });
        drop(ns);
    }

    #[test]
    fn tap_open_errors_are_typed() {
        if !can_run() {
            return;
        }
        let ns = Netns::new("tun").expect("ip netns add");
        ns.ip(&["tuntap", "add", "dev", "mftun0", "mode", "tun"]);
        ns.ip(&[
            "tuntap", "add", "dev", "mftap1", "mode", "tap", "user", "54321",
        ]);
        std::thread::scope(|t| {
            t.spawn(|| {
                ns.enter();
                // A tun, and an interface that is no tun/tap at all.
                for name in ["mftun0", "lo"] {
                    let e = Tap::open(name).unwrap_err();
                    assert!(matches!(e, TapError::Invalid(_)), "{name}: {e}");
                }
                // A pattern name gets a kernel-chosen name.
                let tap = Tap::open("mft%d").unwrap();
                assert!(tap.name().starts_with("mft"), "{}", tap.name());
                tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
                    .unwrap();
                // A tap already open elsewhere (not multi-queue) is busy.
                let e = Tap::open(tap.name()).unwrap_err();
                assert!(matches!(e, TapError::Busy(_)), "{e}");
            })
            .join()
            .unwrap();
            // Without CAP_NET_ADMIN a tap can be neither created nor attached to.
            t.spawn(|| {
                ns.enter();
                drop_net_admin();
                let e = Tap::open("mftap9").unwrap_err();
                assert!(matches!(e, TapError::PermissionDenied(_)), "{e}");
                let e = Tap::open("mftap1").unwrap_err();
                assert!(matches!(e, TapError::PermissionDenied(_)), "{e}");
            })
            .join()
            .unwrap();
        });
    }
}

// The receive tests again, with a backend that the device reads straight into the guest's
// buffers (as a tap): a frame that fits one chain lands there without a copy; a longer one is
// put together in the device's buffer (mergeable) or dropped, as on the copying path.

#[test]
fn direct_received_frame_lands_in_the_guests_buffer() {
    direct(received_frame_lands_in_the_guests_buffer);
}

#[test]
fn direct_without_guest_csum_header_flags_are_cleared() {
    direct(without_guest_csum_header_flags_are_cleared);
}

#[test]
fn direct_mergeable_buffers_spread_a_frame_over_chains() {
    direct(mergeable_buffers_spread_a_frame_over_chains);
}

#[test]
fn direct_mergeable_frame_waits_for_enough_buffers() {
    direct(mergeable_frame_waits_for_enough_buffers);
}

#[test]
fn direct_malformed_receive_chains_are_returned_unused() {
    direct(malformed_receive_chains_are_returned_unused);
}

#[test]
fn direct_frame_too_big_for_a_buffer_is_dropped_and_the_buffer_kept() {
    direct(frame_too_big_for_a_buffer_is_dropped_and_the_buffer_kept);
}

#[test]
fn direct_mergeable_frame_larger_than_the_ring_is_dropped() {
    direct(mergeable_frame_larger_than_the_ring_is_dropped);
}

#[test]
fn direct_random_chains_and_frames_never_panic() {
    direct(random_chains_and_frames_never_panic);
}
