//! virtio-vsock driven as a guest driver would (queues in guest memory, laid out by
//! virtio-queue's mock) against real Unix sockets in a temporary directory.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::packet::{SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};
use super::*;
use crate::virtio::dma::PhysMemory;
use crate::virtio::features;
use crate::virtio::testutil::{RecordingInterrupt, XorShift, test_memory};

const CID: u64 = 42;
const RING: u16 = 16;
/// tx packets are written here (the device consumes them at once).
const TX_AREA: u64 = 0x40000;
/// rx buffer of descriptor `i` (up to 64 KiB each, in the second memory range).
const RX_AREA: u64 = 0x20_0000;
const RX_SLOT: u64 = 0x10000;

/// A directory under the system temp dir, removed with everything in it.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "manifold-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The driver's side of one split queue at `base`: descriptors, then the available ring at
/// +0x400 and the used ring at +0x800. (Written out rather than taken from
/// `virtio_queue::mock`, whose `MockSplitQueue` 0.18 places the used ring inside the available
/// ring: `SplitQueueRing::end` adds the element count, not the byte size, so with 16 entries
/// the device's used index aliases available entry 9.)
struct Ring {
    mem: &'static PhysMemory,
    base: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn new(mem: &'static PhysMemory, base: u64) -> Self {
        for off in [0x400, 0x800] {
            mem.write_obj(0u32, GuestAddress(base + off)).unwrap();
        }
        Self {
            mem,
            base,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn avail(&self) -> u64 {
        self.base + 0x400
    }

    fn used(&self) -> u64 {
        self.base + 0x800
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(RING).unwrap();
        q.set_size(RING);
        q.set_desc_table_address(Some(self.base as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail() as u32), Some(0));
        q.set_used_ring_address(Some(self.used() as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Chain `(addr, len, writable)` descriptors and make the chain available.
    fn add(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let index = (head + i as u16) % RING;
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let next = (index + 1) % RING;
            let raw = RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next));
            self.mem
                .write_obj(raw, GuestAddress(self.base + 16 * u64::from(index)))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % RING;
        let slot = u64::from(self.avail_idx % RING);
        self.mem
            .write_obj(head.to_le(), GuestAddress(self.avail() + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(self.avail() + 2))
            .unwrap();
        head
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.used() + 2)).unwrap())
    }

    /// Used entries not looked at yet: (head, length).
    fn take_used(&mut self) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        while self.used_seen != self.used_idx() {
            let at = self.used() + 4 + 8 * u64::from(self.used_seen % RING);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((u32::from_le(id) as u16, u32::from_le(len)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn outstanding(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_idx())
    }
}

struct H {
    _dir: TempDir,
    path: PathBuf,
    mem: &'static PhysMemory,
    dev: Vsock,
    irq: Arc<RecordingInterrupt>,
    rx: Ring,
    tx: Ring,
    /// rx head -> buffer address.
    rx_bufs: HashMap<u16, u64>,
    /// Top the rx queue up before every guest send and backend round.
    auto_fill: bool,
}

fn pkt(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: CONN_BUF_SIZE,
        fwd_cnt: 0,
    }
}

impl H {
    fn new() -> Self {
        let dir = TempDir::new();
        let path = dir.0.join("v.sock");
        let mem: &'static PhysMemory = Box::leak(Box::new(test_memory()));
        let mut dev = Vsock::new(CID, &path).expect("vsock");
        let irq = Arc::new(RecordingInterrupt::default());
        let rx = Ring::new(mem, 0);
        let tx = Ring::new(mem, 0x4000);
        let ev = Ring::new(mem, 0x8000);
        dev.ack_features(features::VERSION_1 | features::RING_EVENT_IDX);
        dev.activate(
            vec![rx.queue(), tx.queue(), ev.queue()],
            irq.clone(),
            DmaSpace::identity(mem.clone()),
        )
        .expect("activate");
        Self {
            _dir: dir,
            path,
            mem,
            dev,
            irq,
            rx,
            tx,
            rx_bufs: HashMap::new(),
            auto_fill: true,
        }
    }

    /// Make `n` rx buffers of `size` bytes available and kick.
    fn give_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let head = self.rx.next_desc;
            let addr = RX_AREA + u64::from(head) * RX_SLOT;
            self.rx.add(&[(addr, size, true)]);
            self.rx_bufs.insert(head, addr);
        }
        self.dev.process_queue(RX_QUEUE);
    }

    /// Top the rx queue up to a full ring of 4 KiB buffers.
    fn fill_rx(&mut self) {
        let n = RING - self.rx.outstanding();
        self.give_rx(usize::from(n), 4096);
    }

    /// The guest sends one packet (header and payload in separate descriptors, as Linux does).
    fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        if self.auto_fill {
            self.fill_rx();
        }
        hdr.len = payload.len() as u32;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(TX_AREA))
            .unwrap();
        let data = TX_AREA + HDR_LEN as u64;
        self.mem.write_slice(payload, GuestAddress(data)).unwrap();
        if payload.is_empty() {
            self.tx.add(&[(TX_AREA, HDR_LEN as u32, false)]);
        } else {
            self.tx.add(&[
                (TX_AREA, HDR_LEN as u32, false),
                (data, payload.len() as u32, false),
            ]);
        }
        self.dev.process_queue(TX_QUEUE);
        assert_eq!(self.tx.outstanding(), 0);
    }

    /// Packets the device put in rx buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for (head, len) in self.rx.take_used() {
            let addr = self.rx_bufs[&head];
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            assert!(bytes.len() >= HDR_LEN, "short rx packet");
            let mut hb = [0u8; HDR_LEN];
            hb.copy_from_slice(&bytes[..HDR_LEN]);
            let hdr = Header::from_bytes(&hb);
            assert_eq!(hdr.len as usize, bytes.len() - HDR_LEN);
            assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, CID));
            out.push((hdr, bytes[HDR_LEN..].to_vec()));
        }
        out
    }

    /// Let the backend see everything the host did (each round is one epoll_wait).
    fn settle(&mut self) {
        if self.auto_fill {
            self.fill_rx();
        }
        for _ in 0..8 {
            self.dev.process_backend();
        }
    }

    fn host_connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).expect("connect to the vsock socket");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// A host-initiated connection to guest port `port`, accepted by the guest. Returns the
    /// host stream and the host-side port.
    fn host_initiated(&mut self, port: u32, guest_buf_alloc: u32) -> (UnixStream, u32) {
        let mut s = self.host_connect();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        if !self.auto_fill {
            self.give_rx(1, 4096);
        }
        self.settle();
        let got = self.received();
        assert_eq!(got.len(), 1, "{got:?}");
        let req = got[0].0;
        assert_eq!(req.op, op::REQUEST);
        assert_eq!(req.dst_port, port);
        assert_eq!(req.type_, TYPE_STREAM);
        let local = req.src_port;
        let mut resp = pkt(op::RESPONSE, port, local);
        resp.buf_alloc = guest_buf_alloc;
        self.send(resp, &[]);
        let line = format!("OK {local}\n");
        let mut buf = vec![0u8; line.len()];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(String::from_utf8(buf).unwrap(), line);
        (s, local)
    }
}

#[test]
fn device_identity_and_config() {
    let h = H::new();
    assert_eq!(h.dev.device_type(), 19);
    assert_eq!(h.dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    assert_eq!(h.dev.offered_features(), features::COMMON);
    let mut cfg = [0xffu8; 12];
    h.dev.read_config(0, &mut cfg);
    assert_eq!(cfg[..8], CID.to_le_bytes());
    assert_eq!(cfg[8..], [0; 4]);
    assert_eq!(h.dev.guest_cid(), CID);
    assert!(h.path.exists());
}

#[test]
fn host_initiated_connection_and_data() {
    let mut h = H::new();
    let (mut s, local) = h.host_initiated(1234, CONN_BUF_SIZE);
    assert!(local >= 1 << 30);
    assert_eq!(h.dev.connection_count(), 1);

    // Host -> guest.
    s.write_all(b"hello guest").unwrap();
    h.settle();
    let got = h.received();
    assert_eq!(got.len(), 1);
    let (hdr, data) = &got[0];
    assert_eq!(hdr.op, op::RW);
    assert_eq!((hdr.src_port, hdr.dst_port), (local, 1234));
    assert_eq!(hdr.buf_alloc, CONN_BUF_SIZE);
    assert_eq!(data, b"hello guest");
    assert!(h.irq.take_queues().contains(&RX_QUEUE));

    // Guest -> host.
    h.send(pkt(op::RW, 1234, local), b"hello host");
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
}

#[test]
fn data_sent_after_connect_line_is_kept() {
    let mut h = H::new();
    let mut s = h.host_connect();
    s.write_all(b"CONNECT 77\nearly").unwrap();
    h.fill_rx();
    h.settle();
    let got = h.received();
    assert_eq!(got.len(), 1);
    let local = got[0].0.src_port;
    h.send(pkt(op::RESPONSE, 77, local), &[]);
    h.settle();
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"early");
    let mut line = [0u8; 14];
    s.read_exact(&mut line).unwrap();
    assert_eq!(&line, format!("OK {local}\n").as_bytes());
}

#[test]
fn request_waits_for_rx_buffers() {
    let mut h = H::new();
    h.auto_fill = false;
    let mut s = h.host_connect();
    s.write_all(b"CONNECT 5\n").unwrap();
    h.settle();
    assert!(h.received().is_empty());
    h.give_rx(1, 4096);
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::REQUEST);
}

#[test]
fn guest_refuses_host_connection() {
    let mut h = H::new();
    let mut s = h.host_connect();
    s.write_all(b"CONNECT 9\n").unwrap();
    h.fill_rx();
    h.settle();
    let req = h.received()[0].0;
    h.send(pkt(op::RST, 9, req.src_port), &[]);
    assert_eq!(h.dev.connection_count(), 0);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
}

#[test]
fn bad_connect_lines_close_the_stream() {
    let mut h = H::new();
    for line in [
        &b"HELLO\n"[..],
        b"CONNECT x\n",
        b"CONNECT 99999999999\n",
        &[b'A'; 100],
    ] {
        let mut s = h.host_connect();
        s.write_all(line).unwrap();
        h.settle();
        let mut b = [0u8; 1];
        // Closed, with a reset if unread garbage was left behind.
        match s.read(&mut b) {
            Ok(n) => assert_eq!(n, 0, "{line:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{line:?}"),
        }
    }
    h.fill_rx();
    assert!(h.received().is_empty());
}

#[test]
fn guest_initiated_connection() {
    let mut h = H::new();
    let listener = UnixListener::bind(format!("{}_5000", h.path.display())).unwrap();
    h.fill_rx();
    h.send(pkt(op::REQUEST, 3000, 5000), &[]);
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::RESPONSE);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (5000, 3000));
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    h.send(pkt(op::RW, 3000, 5000), b"ping");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    h.settle();
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::RW);
    assert_eq!(got[0].1, b"pong");

    // No listener on port 5001: refused.
    h.send(pkt(op::REQUEST, 3001, 5001), &[]);
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::RST);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (5001, 3001));
    assert_eq!(h.dev.connection_count(), 1);
}

#[test]
fn unknown_connections_get_rst() {
    let mut h = H::new();
    h.fill_rx();
    for o in [
        op::RW,
        op::RESPONSE,
        op::SHUTDOWN,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
        99,
    ] {
        h.send(pkt(o, 11, 22), b"");
        let got = h.received();
        assert_eq!(got.len(), 1, "op {o}");
        assert_eq!(got[0].0.op, op::RST);
        assert_eq!((got[0].0.src_port, got[0].0.dst_port), (22, 11));
    }
    // Never an RST for an RST.
    h.send(pkt(op::RST, 11, 22), b"");
    assert!(h.received().is_empty());
    // Other socket types: RST in that type.
    let mut seq = pkt(op::REQUEST, 11, 22);
    seq.type_ = 2;
    h.send(seq, b"");
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.type_), (op::RST, 2));
}

#[test]
fn wrong_cids_and_lengths_are_dropped() {
    let mut h = H::new();
    let (_s, local) = h.host_initiated(1, CONN_BUF_SIZE);
    let mut bad = pkt(op::RW, 1, local);
    bad.src_cid = 7;
    h.send(bad, b"x");
    let mut bad = pkt(op::RW, 1, local);
    bad.dst_cid = 9;
    h.send(bad, b"x");
    assert!(h.received().is_empty());
    assert_eq!(h.dev.connection_count(), 1);

    // len beyond the chain: the connection is reset.
    let mut hdr = pkt(op::RW, 1, local);
    hdr.len = 100;
    h.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(TX_AREA))
        .unwrap();
    h.tx.add(&[(TX_AREA, HDR_LEN as u32, false), (TX_AREA + 44, 10, false)]);
    h.dev.process_queue(TX_QUEUE);
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::RST);
    assert_eq!(h.dev.connection_count(), 0);
    assert!(!h.irq.needs_reset());
}

#[test]
fn credit_limits_what_the_guest_gets() {
    let mut h = H::new();
    let (mut s, local) = h.host_initiated(80, 100);
    s.write_all(&[7u8; 300]).unwrap();
    h.settle();
    let got = h.received();
    let data: usize = got
        .iter()
        .filter(|(p, _)| p.op == op::RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(data, 100);
    assert!(
        got.iter().any(|(p, _)| p.op == op::CREDIT_REQUEST),
        "{got:?}"
    );
    // Nothing more however often the backend runs.
    h.settle();
    assert!(h.received().is_empty());

    // The guest read 100 bytes: 100 more.
    let mut upd = pkt(op::CREDIT_UPDATE, 80, local);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    h.send(upd, &[]);
    h.settle();
    let got = h.received();
    let data: usize = got
        .iter()
        .filter(|(p, _)| p.op == op::RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(data, 100);

    // A bigger buffer: the rest, within rx buffer sizes.
    let mut upd = pkt(op::CREDIT_UPDATE, 80, local);
    upd.buf_alloc = 10_000;
    upd.fwd_cnt = 200;
    h.send(upd, &[]);
    h.settle();
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.len(), 100);
}

#[test]
fn small_rx_buffers_split_data() {
    let mut h = H::new();
    h.auto_fill = false;
    let (mut s, _) = h.host_initiated(80, CONN_BUF_SIZE);
    s.write_all(&[1u8; 100]).unwrap();
    h.give_rx(4, HDR_LEN as u32 + 30);
    h.settle();
    let got = h.received();
    let sizes: Vec<usize> = got.iter().map(|(_, d)| d.len()).collect();
    assert_eq!(sizes, vec![30, 30, 30, 10]);
    // A buffer with room for a header only is returned empty when only data waits (a
    // zero-length read is not end of file), and so is one too small for a header.
    h.give_rx(1, HDR_LEN as u32);
    s.write_all(b"y").unwrap();
    h.settle();
    let used = h.rx.take_used();
    assert_eq!(used, vec![(used[0].0, 0)]);
    h.give_rx(1, 10);
    s.write_all(b"z").unwrap();
    h.settle();
    let used = h.rx.take_used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 0);
}

#[test]
fn host_credit_updates_and_overrun() {
    let mut h = H::new();
    let (mut s, local) = h.host_initiated(80, CONN_BUF_SIZE);
    // 70000 bytes forwarded at once: past the update threshold, the guest is told.
    let chunk = vec![3u8; 35_000];
    h.send(pkt(op::RW, 80, local), &chunk);
    h.send(pkt(op::RW, 80, local), &chunk);
    let got = h.received();
    let upd = got
        .iter()
        .find(|(p, _)| p.op == op::CREDIT_UPDATE)
        .expect("credit update");
    assert_eq!(upd.0.fwd_cnt, 70_000);
    assert_eq!(upd.0.buf_alloc, CONN_BUF_SIZE);
    let mut buf = vec![0u8; 70_000];
    s.read_exact(&mut buf).unwrap();

    // A CREDIT_REQUEST is answered.
    h.send(pkt(op::CREDIT_REQUEST, 80, local), &[]);
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::CREDIT_UPDATE);

    // The host stops reading; the guest ignores its credit and is reset.
    let big = vec![5u8; MAX_PAYLOAD];
    let mut sent = 0usize;
    for _ in 0..64 {
        h.send(pkt(op::RW, 80, local), &big);
        if h.dev.connection_count() == 0 {
            break;
        }
        sent += big.len();
    }
    assert_eq!(h.dev.connection_count(), 0, "never reset");
    assert!(sent >= CONN_BUF_SIZE as usize);
    assert!(h.received().iter().any(|(p, _)| p.op == op::RST));
}

#[test]
fn buffered_data_drains_when_the_host_reads() {
    let mut h = H::new();
    let (mut s, local) = h.host_initiated(80, CONN_BUF_SIZE);
    // Fill the socket buffer, then some.
    let big = vec![9u8; MAX_PAYLOAD];
    let mut sent = 0usize;
    let mut fwd = 0u32;
    for _ in 0..4 {
        h.send(pkt(op::RW, 80, local), &big);
        sent += big.len();
    }
    for (p, _) in h.received() {
        fwd = fwd.max(p.fwd_cnt);
    }
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while got < sent {
        match s.read(&mut buf) {
            Ok(n) => got += n,
            Err(_) => h.settle(),
        }
    }
    assert_eq!(got, sent);
    h.settle();
    for (p, _) in h.received() {
        fwd = fwd.max(p.fwd_cnt);
    }
    assert_eq!(fwd as usize, sent);
}

#[test]
fn shutdowns() {
    let mut h = H::new();
    let (mut s, local) = h.host_initiated(80, CONN_BUF_SIZE);
    // The guest will send no more: the host reads end of file, and can still send.
    let mut sd = pkt(op::SHUTDOWN, 80, local);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[]);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    s.write_all(b"late").unwrap();
    h.settle();
    assert_eq!(h.received()[0].1, b"late");
    // Data after SHUTDOWN(SEND) is a protocol error.
    h.send(pkt(op::RW, 80, local), b"x");
    assert_eq!(h.received()[0].0.op, op::RST);
    assert_eq!(h.dev.connection_count(), 0);

    // Both directions: RST completes the close.
    let (s, local) = h.host_initiated(81, CONN_BUF_SIZE);
    let mut sd = pkt(op::SHUTDOWN, 81, local);
    sd.flags = SHUTDOWN_RCV;
    h.send(sd, &[]);
    assert!(h.received().is_empty());
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::RST);
    assert_eq!(h.dev.connection_count(), 0);
    drop(s);

    // The host closes: the guest gets SHUTDOWN(SEND), then closes with its own SHUTDOWN.
    let (s, local) = h.host_initiated(82, CONN_BUF_SIZE);
    drop(s);
    h.settle();
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
    let mut sd = pkt(op::SHUTDOWN, 82, local);
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    assert_eq!(h.received()[0].0.op, op::RST);
    assert_eq!(h.dev.connection_count(), 0);

    // The host closed and the guest writes anyway: EPIPE resets the connection (and no
    // SIGPIPE reaches the VMM).
    let (s, local) = h.host_initiated(83, CONN_BUF_SIZE);
    drop(s);
    h.settle();
    assert_eq!(h.received()[0].0.op, op::SHUTDOWN);
    h.send(pkt(op::RW, 83, local), b"anyone?");
    assert_eq!(h.received()[0].0.op, op::RST);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn unanswered_request_times_out() {
    let mut h = H::new();
    let mut s = h.host_connect();
    s.write_all(b"CONNECT 3\n").unwrap();
    h.fill_rx();
    h.settle();
    assert_eq!(h.received()[0].0.op, op::REQUEST);
    std::thread::sleep(Duration::from_millis(2200));
    h.settle();
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, op::RST);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    assert_eq!(h.dev.connection_count(), 0);
}

#[test]
fn reset_drops_connections() {
    let mut h = H::new();
    let (mut s, _) = h.host_initiated(80, CONN_BUF_SIZE);
    h.dev.reset();
    assert!(!h.dev.is_active());
    assert_eq!(h.dev.connection_count(), 0);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    // Still listening.
    let _s = h.host_connect();
}

#[test]
fn socket_path_rules() {
    let dir = TempDir::new();
    let path = dir.0.join("v.sock");
    assert!(matches!(
        Vsock::new(2, &path),
        Err(VsockError::InvalidCid(2))
    ));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), &path),
        Err(VsockError::InvalidCid(_))
    ));

    // A regular file is left alone.
    std::fs::write(&path, b"data").unwrap();
    assert!(matches!(
        Vsock::new(3, &path),
        Err(VsockError::NotASocket(_))
    ));
    std::fs::remove_file(&path).unwrap();

    // A live socket is in use; a dead one is replaced.
    let live = UnixListener::bind(&path).unwrap();
    assert!(matches!(
        Vsock::new(3, &path),
        Err(VsockError::PathInUse(_))
    ));
    drop(live);
    let dev = Vsock::new(3, &path).expect("stale socket replaced");
    assert!(path.exists());
    drop(dev);
    assert!(!path.exists());

    // No such directory.
    let err = Vsock::new(3, dir.0.join("nope/v.sock")).unwrap_err();
    assert!(matches!(err, VsockError::Bind { .. }), "{err}");
    assert!(err.is_bad_input());
}

#[test]
fn random_packets_never_panic() {
    for seed in [0x9e37_79b9_7f4a_7c15, 1, 0xdead_beef] {
        random_session(seed, 5000);
    }
}

/// Random but mostly well-aimed traffic: half the packets name a connection the device knows,
/// with ops weighted towards data and credit; the rest are random headers and chain shapes.
/// Host programs connect, write, read and hang up at random. Nothing may panic or break a
/// ring, and the traffic must reach the interesting states (checked at the end).
fn random_session(seed: u64, rounds: u32) {
    let mut h = H::new();
    h.auto_fill = false;
    let mut rng = XorShift(seed);
    let listener = UnixListener::bind(format!("{}_5000", h.path.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut hosts: Vec<UnixStream> = Vec::new();
    // Connections as the guest sees them: (device-side port, guest port).
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    let mut stats = std::collections::BTreeMap::new();
    for round in 0..rounds {
        if let Ok((s, _)) = listener.accept() {
            hosts.push(s);
        }
        match rng.below(12) {
            0 => {
                if hosts.len() < 16 {
                    if let Ok(mut s) = UnixStream::connect(&h.path) {
                        let _ =
                            s.write_all(format!("CONNECT {}\n", rng.below(3) + 1233).as_bytes());
                        hosts.push(s);
                    }
                }
            }
            1 | 2 if !hosts.is_empty() => {
                let i = rng.below(hosts.len() as u64) as usize;
                let _ = hosts[i].set_nonblocking(true);
                let _ = hosts[i].write(&vec![round as u8; rng.below(5000) as usize]);
                let _ = hosts[i].read(&mut [0u8; 8192]);
                if rng.below(30) == 0 {
                    hosts.swap_remove(i);
                }
            }
            3 => {
                let n = rng.below(16) as usize;
                let room = RING - h.rx.outstanding();
                for _ in 0..n.min(usize::from(room)) {
                    let head = h.rx.next_desc;
                    let addr = match rng.below(16) {
                        0 => 0xf000_0000,
                        _ => RX_AREA + u64::from(head) * RX_SLOT,
                    };
                    let len = match rng.below(4) {
                        0 => rng.below(RX_SLOT) as u32,
                        _ => 4096,
                    };
                    h.rx.add(&[(addr, len, rng.below(16) != 0)]);
                    h.rx_bufs.insert(head, addr);
                }
                h.dev.process_queue(RX_QUEUE);
            }
            4 => h.dev.process_backend(),
            _ => {
                let known = !pairs.is_empty() && rng.below(4) != 0;
                let (src_port, dst_port) = if known {
                    let (local, peer) = pairs[rng.below(pairs.len() as u64) as usize];
                    (peer, local)
                } else {
                    let dst = match rng.below(3) {
                        0 => rng.next() as u32,
                        _ => 5000,
                    };
                    (rng.below(64) as u32 + 3000, dst)
                };
                // Known connections mostly get traffic that keeps them alive.
                let op = match (known, rng.below(100)) {
                    (true, 0..=59) => op::RW,
                    (true, 60..=79) => op::CREDIT_UPDATE,
                    (true, 80..=91) => op::CREDIT_REQUEST,
                    (true, 92..=93) => op::RESPONSE,
                    (true, 94..=95) => op::SHUTDOWN,
                    (true, 96) => op::RST,
                    (false, 0..=39) => op::REQUEST,
                    _ => rng.below(9) as u16,
                };
                if op == op::REQUEST {
                    pairs.push((dst_port, src_port));
                }
                let mut hdr = Header {
                    src_cid: if rng.below(40) == 0 { rng.next() } else { CID },
                    dst_cid: if rng.below(40) == 0 {
                        rng.next()
                    } else {
                        HOST_CID
                    },
                    src_port,
                    dst_port,
                    len: 0,
                    type_: if rng.below(40) == 0 {
                        rng.next() as u16
                    } else {
                        TYPE_STREAM
                    },
                    op,
                    flags: rng.below(4) as u32,
                    buf_alloc: match rng.below(4) {
                        0 => rng.next() as u32,
                        _ => CONN_BUF_SIZE,
                    },
                    fwd_cnt: match rng.below(8) {
                        0 => rng.next() as u32,
                        _ => 0,
                    },
                };
                let payload_len = if op == op::RW {
                    rng.below(3000) as usize
                } else {
                    0
                };
                hdr.len = match rng.below(20) {
                    0 => rng.next() as u32,
                    1 => payload_len as u32 + 1,
                    _ => payload_len as u32,
                };
                h.mem
                    .write_slice(&hdr.to_bytes(), GuestAddress(TX_AREA))
                    .unwrap();
                // Random chain shapes: split header, short, writable, unreachable.
                let split = rng.below(HDR_LEN as u64 + 1) as u32;
                let mut descs = vec![];
                match rng.below(20) {
                    0 => descs.push((TX_AREA, split, false)),
                    1 => {
                        descs.push((TX_AREA, split, false));
                        descs.push((TX_AREA + u64::from(split), HDR_LEN as u32 - split, false));
                        descs.push((TX_AREA + 44, payload_len as u32, false));
                    }
                    2 => {
                        descs.push((TX_AREA, HDR_LEN as u32, false));
                        descs.push((0xf000_0000, payload_len as u32, false));
                    }
                    3 => {
                        descs.push((TX_AREA, HDR_LEN as u32, false));
                        descs.push((TX_AREA + 44, payload_len as u32, true));
                    }
                    _ => {
                        descs.push((TX_AREA, HDR_LEN as u32, false));
                        descs.push((TX_AREA + 44, payload_len as u32, false));
                    }
                }
                // A paused tx queue keeps its chains: the driver may not reuse their
                // descriptors until they come back.
                if h.tx.outstanding() == 0 {
                    h.tx.add(&descs);
                }
                h.dev.process_queue(TX_QUEUE);
                h.tx.take_used();
            }
        }
        for (p, _) in h.received_raw() {
            *stats.entry(p.op).or_insert(0usize) += 1;
            if !pairs.contains(&(p.src_port, p.dst_port)) {
                pairs.push((p.src_port, p.dst_port));
            }
        }
        if pairs.len() > 64 {
            pairs.drain(..32);
        }
        assert!(!h.irq.needs_reset(), "seed {seed:#x} round {round}");
    }
    assert!(h.dev.connection_count() <= MAX_CONNECTIONS);
    for o in [op::REQUEST, op::RESPONSE, op::RST, op::RW] {
        assert!(
            stats.get(&o).copied().unwrap_or(0) > 0,
            "seed {seed:#x}: op {o} never seen: {stats:?}"
        );
    }
}

impl H {
    /// Like `received`, without the checks (random tests hand out odd buffers).
    fn received_raw(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for (head, len) in self.rx.take_used() {
            let addr = self.rx_bufs[&head];
            let mut bytes = vec![0u8; len as usize];
            if self.mem.read_slice(&mut bytes, GuestAddress(addr)).is_err() || bytes.len() < 44 {
                continue;
            }
            let mut hb = [0u8; HDR_LEN];
            hb.copy_from_slice(&bytes[..HDR_LEN]);
            out.push((Header::from_bytes(&hb), bytes[HDR_LEN..].to_vec()));
        }
        out
    }
}

/// Whether the backend fd would wake the VMM's event loop now.
fn backend_ready(dev: &Vsock) -> bool {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let ep = Epoll::new().unwrap();
    ep.ctl(
        ControlOperation::Add,
        dev.backend_fd(),
        EpollEvent::new(EventSet::IN, 0),
    )
    .unwrap();
    let mut ev = [EpollEvent::default(); 1];
    ep.wait(0, &mut ev).unwrap() == 1
}

#[test]
fn idle_backend_does_not_wake_the_vmm() {
    let mut h = H::new();
    assert!(!backend_ready(&h.dev));
    let mut s = h.host_connect();
    assert!(backend_ready(&h.dev));
    s.write_all(b"CONNECT 80\n").unwrap();
    h.settle();
    assert!(!backend_ready(&h.dev));
    let local = h.received()[0].0.src_port;
    let mut resp = pkt(op::RESPONSE, 80, local);
    resp.buf_alloc = 100;
    h.send(resp, &[]);
    let mut line = vec![0u8; format!("OK {local}\n").len()];
    s.read_exact(&mut line).unwrap();

    // Blocked on guest credit: the stream leaves the epoll set.
    s.write_all(&[1u8; 300]).unwrap();
    h.settle();
    assert_eq!(
        h.received().iter().map(|(_, d)| d.len()).sum::<usize>(),
        100
    );
    assert!(!backend_ready(&h.dev));

    // Blocked on rx buffers.
    h.auto_fill = false;
    let mut upd = pkt(op::CREDIT_UPDATE, 80, local);
    upd.buf_alloc = CONN_BUF_SIZE;
    upd.fwd_cnt = 100;
    h.send(upd, &[]);
    // Use up the rx buffers with data.
    for _ in 0..100 {
        if h.rx.outstanding() == 0 {
            break;
        }
        s.write_all(&[2u8; 10]).unwrap();
        h.settle();
    }
    assert_eq!(h.rx.outstanding(), 0);
    h.received();
    s.write_all(&[3u8; 10]).unwrap();
    h.settle();
    assert!(!backend_ready(&h.dev));
    // Buffers arrive: the data moves.
    h.give_rx(1, 4096);
    assert_eq!(h.received().len(), 1);
}

#[test]
fn guest_initiated_host_speaks_first() {
    let mut h = H::new();
    let listener = UnixListener::bind(format!("{}_6000", h.path.display())).unwrap();
    let mut req = pkt(op::REQUEST, 4000, 6000);
    req.buf_alloc = 1000;
    h.send(req, &[]);
    assert_eq!(h.received()[0].0.op, op::RESPONSE);
    let (mut s, _) = listener.accept().unwrap();
    s.write_all(b"banner").unwrap();
    h.settle();
    let got = h.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"banner");
}

#[test]
fn shutdown_waits_for_buffered_data() {
    let mut h = H::new();
    let (mut s, local) = h.host_initiated(80, CONN_BUF_SIZE);
    // More than the socket buffer takes: some stays in the device.
    let big = vec![4u8; MAX_PAYLOAD];
    for _ in 0..6 {
        h.send(pkt(op::RW, 80, local), &big);
    }
    h.received();
    let mut sd = pkt(op::SHUTDOWN, 80, local);
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    assert!(h.received().iter().all(|(p, _)| p.op != op::RST));
    assert_eq!(h.dev.connection_count(), 1);
    // The host reads it all, then end of file; the guest gets its RST.
    let mut total = 0usize;
    let mut buf = vec![0u8; 65536];
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(_) => h.settle(),
        }
    }
    assert_eq!(total, 6 * MAX_PAYLOAD);
    assert!(h.received().iter().any(|(p, _)| p.op == op::RST));
    assert_eq!(h.dev.connection_count(), 0);

    // A host that never reads: RST at the deadline.
    let (_s, local) = h.host_initiated(81, CONN_BUF_SIZE);
    for _ in 0..6 {
        h.send(pkt(op::RW, 81, local), &big);
    }
    sd.src_port = 81;
    sd.dst_port = local;
    h.send(sd, &[]);
    h.received();
    assert_eq!(h.dev.connection_count(), 1);
    std::thread::sleep(Duration::from_millis(2200));
    assert!(backend_ready(&h.dev));
    h.settle();
    assert!(h.received().iter().any(|(p, _)| p.op == op::RST));
    assert_eq!(h.dev.connection_count(), 0);
}

/// A guest that follows the protocol moves 1 MiB each way through 4 KiB rx buffers with a
/// small receive buffer: every byte arrives in order and the device never exceeds the credit.
#[test]
fn streams_both_ways_within_credit() {
    const GUEST_BUF: u32 = 16 * 1024;
    const SIZE: usize = 1 << 20;
    let mut h = H::new();
    let (mut s, local) = h.host_initiated(90, GUEST_BUF);
    s.set_nonblocking(true).unwrap();
    let to_guest: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    let to_host: Vec<u8> = (0..SIZE).map(|i| (i * 13 % 253) as u8).collect();
    let (mut host_sent, mut host_got) = (0usize, Vec::new());
    let (mut guest_got, mut guest_sent) = (Vec::new(), 0usize);
    // What the guest told the device it consumed, and what the device told the guest.
    let mut reported_fwd = 0u32;
    let (mut dev_buf_alloc, mut dev_fwd) = (CONN_BUF_SIZE, 0u32);
    let mut credit_requested = false;
    let mut rng = XorShift(7);
    let mut buf = vec![0u8; 65536];
    for _ in 0..20_000 {
        if host_got.len() == SIZE && guest_got.len() == SIZE {
            break;
        }
        // Host side.
        if host_sent < SIZE {
            let end = (host_sent + 1 + rng.below(20_000) as usize).min(SIZE);
            match s.write(&to_guest[host_sent..end]) {
                Ok(n) => host_sent += n,
                Err(e) => assert_eq!(e.kind(), ErrorKind::WouldBlock),
            }
        }
        match s.read(&mut buf) {
            Ok(n) => host_got.extend_from_slice(&buf[..n]),
            Err(e) => assert_eq!(e.kind(), ErrorKind::WouldBlock),
        }
        h.settle();
        // Guest side: take what arrived.
        for (p, data) in h.received() {
            assert_eq!((p.src_port, p.dst_port), (local, 90));
            dev_buf_alloc = p.buf_alloc;
            dev_fwd = p.fwd_cnt;
            match p.op {
                op::RW => guest_got.extend_from_slice(&data),
                op::CREDIT_UPDATE => {}
                op::CREDIT_REQUEST => credit_requested = true,
                o => panic!("unexpected op {o}"),
            }
            let in_flight = guest_got.len() as u32 - reported_fwd;
            assert!(in_flight <= GUEST_BUF, "device overran the guest's credit");
        }
        let consumed = guest_got.len() as u32;
        let pkt_credit = |p: &mut Header| {
            p.buf_alloc = GUEST_BUF;
            p.fwd_cnt = consumed;
        };
        if credit_requested || consumed - reported_fwd >= GUEST_BUF / 2 {
            credit_requested = false;
            let mut upd = pkt(op::CREDIT_UPDATE, 90, local);
            pkt_credit(&mut upd);
            h.send(upd, &[]);
            reported_fwd = consumed;
        }
        // Guest sends within the device's credit.
        let credit = dev_buf_alloc - (guest_sent as u32 - dev_fwd);
        if guest_sent < SIZE && credit > 0 {
            let n = (1 + rng.below(8000) as usize)
                .min(credit as usize)
                .min(SIZE - guest_sent);
            let mut rw = pkt(op::RW, 90, local);
            pkt_credit(&mut rw);
            h.send(rw, &to_host[guest_sent..guest_sent + n]);
            reported_fwd = consumed;
            guest_sent += n;
        }
    }
    assert_eq!(guest_got.len(), SIZE);
    assert!(guest_got == to_guest, "host -> guest stream corrupted");
    assert_eq!(host_got.len(), SIZE);
    assert!(host_got == to_host, "guest -> host stream corrupted");
    assert!(!h.irq.needs_reset());
}

/// A guest that sends without taking replies: tx pauses at the reply backlog (the rest waits in
/// the ring) and resumes as rx buffers arrive. No reply is lost.
#[test]
fn reply_backlog_pauses_tx() {
    let mut h = H::new();
    h.auto_fill = false;
    let mut hdr = pkt(op::RW, 1, 1);
    hdr.len = 0;
    h.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(TX_AREA))
        .unwrap();
    // Every packet is for no connection: each one makes an RST.
    let total = 400usize;
    let mut queued = 0usize;
    while queued < total {
        let room = usize::from(RING - h.tx.outstanding()).min(total - queued);
        if room == 0 {
            break;
        }
        for _ in 0..room {
            h.tx.add(&[(TX_AREA, HDR_LEN as u32, false)]);
        }
        queued += room;
        h.dev.process_queue(TX_QUEUE);
    }
    // Paused with a full ring behind the backlog.
    assert!(queued < total);
    assert_eq!(h.tx.outstanding(), RING);
    let mut rsts = 0usize;
    for _ in 0..1000 {
        if rsts == total {
            break;
        }
        // Keep the tx ring topped up while the guest takes replies.
        let room = usize::from(RING - h.tx.outstanding()).min(total - queued);
        for _ in 0..room {
            h.tx.add(&[(TX_AREA, HDR_LEN as u32, false)]);
        }
        queued += room;
        if room > 0 {
            h.dev.process_queue(TX_QUEUE);
        }
        h.give_rx(usize::from(RING - h.rx.outstanding()), 64);
        rsts += h.received().iter().filter(|(p, _)| p.op == op::RST).count();
    }
    assert_eq!(queued, total);
    assert_eq!(rsts, total);
    assert_eq!(h.tx.outstanding(), 0);
    assert!(!h.irq.needs_reset());
}
