//! virtio-net (virtio 1.2, 5.1) with one receive/transmit queue pair over a tap.
//!
//! Frames keep the guest's 12-byte `virtio_net_hdr_v1` on the way through: the tap is opened
//! with a vnet header of that size, so checksum and segmentation offloads pass between the guest
//! and the host kernel untouched. The device copies each frame once, between guest buffers and
//! one reused buffer per direction, and never allocates per frame.
//!
//! How the VMM drives it, besides the transport ([`VirtioDevice`]):
//!
//! - Watch [`Net::backend_fd`] (the tap) for input, **edge-triggered**, and call
//!   [`Net::process_backend`] when it fires. The device reads the tap only while the guest has
//!   receive buffers, then stops with frames left in the kernel's queue: a level-triggered watch
//!   would spin.
//! - Queue notifications go to [`VirtioDevice::process_queue`] as for every device: queue 0
//!   (receive) means the guest posted buffers, and the device goes back to reading the tap.
//!
//! Receiving: a frame is read only when at least one receive chain is available. With
//! `VIRTIO_NET_F_MRG_RXBUF` a frame is spread over as many chains as it needs (their number goes
//! in the header's `num_buffers`); if the guest has not posted enough yet, the frame waits in
//! the device and the chains go back to the available ring until it posts more. Without it,
//! each chain must hold a whole frame; a frame bigger than the chain is dropped and the chain
//! serves the next one.

pub mod switch;
mod tap;
#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::offset_of;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_S_LINK_UP, virtio_net_config,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_queue::Queue;
use vm_memory::VolatileMemory;

pub use tap::{Tap, TapError};

use super::dma::{Access, DmaRange, SgList};
use super::features::bit;
use super::queue::{Chain, QueueError, Ring};
use super::{ActivateError, DmaSnapshot, DmaSpace, VirtioCommon, VirtioDevice, VirtioInterrupt};

/// Size of `virtio_net_hdr_v1`, the header before every frame (VERSION_1 layout, with
/// `num_buffers`), in guest buffers and on the tap alike.
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// An Ethernet header: anything shorter is not a frame.
const ETH_HLEN: usize = 14;
/// Largest header + frame in either direction: a 64 KiB segmentation-offload frame with its
/// Ethernet and VLAN headers (the figure QEMU, Firecracker and Cloud Hypervisor use).
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65550;

/// Queue indices.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
/// Largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Descriptors one chain may have (the iterator stops at the queue size anyway; an indirect
/// table could be longer).
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// Config space through `mtu`: `speed`, `duplex` and the RSS fields are for features not
/// offered.
const CONFIG_LEN: usize = offset_of!(virtio_net_config, speed);

/// Where a frame goes to and comes from. Frames start with a [`VNET_HDR_LEN`]-byte
/// `virtio_net_hdr_v1`. Reads and writes are nonblocking and move one frame each.
pub trait NetBackend: AsRawFd + Send {
    /// Read one frame; `WouldBlock` when there is none.
    fn read_frame(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize>;
    /// Write one frame.
    fn write_frame(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Which `TUN_F_*` offloads frames read from the backend may leave to the guest.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
    /// The longest frame (header included) a read on [`NetBackend::rx_fd`] can return now, as
    /// far as the backend knows (a tap: its MTU, without segmentation offloads). A receive
    /// buffer that holds this much is read into with one plain `read`; a shorter one takes a
    /// `readv` with a spill buffer behind it, which costs the kernel ~35 ns more a frame. Asked
    /// again when the offloads change and after a frame came back longer.
    fn rx_frame_bound(&mut self) -> usize {
        MAX_FRAME_LEN
    }
    /// A file descriptor on which one `write`/`writev` sends one frame (a tap): the device then
    /// transmits straight from guest memory, without copying. `None`: frames are gathered into
    /// a buffer and go through [`NetBackend::write_frame`].
    fn tx_fd(&self) -> Option<RawFd> {
        None
    }
    /// A file descriptor on which one `read`/`readv` receives one frame (a tap): the device
    /// then receives straight into guest buffers. `None`: frames come through
    /// [`NetBackend::read_frame`] into a buffer and are copied.
    fn rx_fd(&self) -> Option<RawFd> {
        None
    }
    /// Whether the device may offer checksum and segmentation offloads over this backend (a
    /// tap: the host kernel finishes frames). `false` (a switch port): frames are complete.
    fn offloads(&self) -> bool {
        true
    }
}

/// What the device shows the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address; without one the driver makes one up.
    pub mac: Option<[u8; 6]>,
    /// MTU to advise the driver (`VIRTIO_NET_F_MTU`), in bytes of Ethernet payload.
    pub mtu: Option<u16>,
}

/// Counters, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Malformed chains, refused offloads, backend write failures.
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames that could not fit the guest's buffers, or runts from the backend.
    pub rx_dropped: u64,
    /// Receive chains returned unused because they were malformed.
    pub rx_bad_chains: u64,
}

impl NetStats {
    /// Add a batch's counts.
    fn add(&mut self, b: &NetStats) {
        self.tx_frames += b.tx_frames;
        self.tx_bytes += b.tx_bytes;
        self.tx_dropped += b.tx_dropped;
        self.rx_frames += b.rx_frames;
        self.rx_bytes += b.rx_bytes;
        self.rx_dropped += b.rx_dropped;
        self.rx_bad_chains += b.rx_bad_chains;
    }
}

/// The guest's feature choices that frame handling depends on.
#[derive(Clone, Copy, Debug)]
struct Negotiated {
    mrg_rxbuf: bool,
    guest_csum: bool,
    acked: u64,
}

pub struct Net<B: NetBackend = Tap> {
    common: VirtioCommon,
    backend: B,
    config: [u8; CONFIG_LEN],
    rx: Rx,
    stats: NetStats,
}

thread_local! {
    /// Where transmit frames are gathered from guest memory when the backend has no fd to
    /// write them from guest memory directly (a switch port): used within one transmit, so
    /// one per thread serves every device (devices are served on the event-loop thread),
    /// rather than 64 KiB per device (per SR-IOV VF). Allocated at the first such transmit.
    static TX_SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    /// Where frames are read from the backend (at most MAX_FRAME_LEN, hence this size); lent
    /// to one device's [`Rx::run`] at a time. A frame left waiting for guest buffers is kept
    /// in an exact-size `Rx::buf` instead (see [`Rx::run`]).
    static RX_SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Take a thread's scratch buffer, `MAX_FRAME_LEN` long (allocated when it is not: first use,
/// or lent out already).
fn take_scratch(key: &'static std::thread::LocalKey<Cell<Vec<u8>>>) -> Vec<u8> {
    let mut buf = key.with(Cell::take);
    if buf.len() < MAX_FRAME_LEN {
        buf = vec![0; MAX_FRAME_LEN];
    }
    buf
}

impl<B: NetBackend> std::fmt::Debug for Net<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("common", &self.common)
            .field("backend_fd", &self.backend.as_raw_fd())
            .field("stats", &self.stats)
            .finish()
    }
}

/// The `TUN_F_*` offloads to ask of the tap for the guest's receive features: what the guest
/// accepts with partial checksums or unsegmented.
fn tap_offload(acked: u64) -> u32 {
    let has = |f: u32| acked & bit(f) != 0;
    let mut flags = 0;
    // The kernel refuses TSO without checksum offload, as the spec makes GUEST_TSO depend on
    // GUEST_CSUM.
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

impl<B: NetBackend> Net<B> {
    pub fn new(backend: B, cfg: NetConfig) -> Self {
        let offloads = bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN);
        let mut features = bit(VIRTIO_NET_F_STATUS) | bit(VIRTIO_NET_F_MRG_RXBUF);
        if backend.offloads() {
            features |= offloads;
        }
        let mut config = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        if let Some(mac) = cfg.mac {
            features |= bit(VIRTIO_NET_F_MAC);
            put(offset_of!(virtio_net_config, mac), &mac);
        }
        if let Some(mtu) = cfg.mtu {
            features |= bit(VIRTIO_NET_F_MTU);
            put(offset_of!(virtio_net_config, mtu), &mtu.to_le_bytes());
        }
        // The link is up for as long as the tap is open.
        put(
            offset_of!(virtio_net_config, status),
            &(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes(),
        );
        put(
            offset_of!(virtio_net_config, max_virtqueue_pairs),
            &1u16.to_le_bytes(),
        );
        Self {
            common: VirtioCommon::new(VIRTIO_ID_NET, vec![QUEUE_SIZE; 2], features),
            backend,
            config,
            rx: Rx::new(),
            stats: NetStats::default(),
        }
    }

    /// The backend's fd (the tap): watch it for input, edge-triggered, and call
    /// [`Net::process_backend`].
    pub fn backend_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated {
            mrg_rxbuf: self.common.has_feature(bit(VIRTIO_NET_F_MRG_RXBUF)),
            guest_csum: self.common.has_feature(bit(VIRTIO_NET_F_GUEST_CSUM)),
            acked: self.common.acked_features(),
        }
    }

    /// The backend has input: move frames into the guest's receive buffers until the backend
    /// is empty or the guest has no buffers left. Does nothing while inactive.
    pub fn process_backend(&mut self) {
        self.process_rx();
    }

    fn process_rx(&mut self) {
        let neg = self.negotiated();
        let Self {
            common,
            backend,
            rx,
            stats,
            ..
        } = self;
        // The receive queue is not served chain by chain (a frame may take several chains, or
        // wait for them), so it is served here rather than through VirtioCommon::process_queue.
        // Counted on the stack and added once, as for transmit.
        let mut batch = NetStats::default();
        common.serve(RX_QUEUE, |queue, snapshot| {
            let mut used = false;
            rx.run(queue, snapshot, backend, neg, &mut batch, &mut used)?;
            Ok(used)
        });
        stats.add(&batch);
    }

    fn process_tx(&mut self) {
        let neg = self.negotiated();
        let Self {
            common,
            backend,
            stats,
            ..
        } = self;
        // Taken only if a frame has to be gathered (not on a tap, which writes from guest
        // memory); given back after the queue.
        let mut tx_buf = Vec::new();
        // Counted on the stack and added once: the device's own cache lines are often evicted
        // by the tap write's work in the kernel.
        let mut batch = NetStats::default();
        common.process_queue(TX_QUEUE, |dma, chain| {
            match transmit(dma, chain, &mut tx_buf, backend, neg) {
                Ok(len) => {
                    batch.tx_frames += 1;
                    batch.tx_bytes += len as u64;
                }
                Err(e) => {
                    batch.tx_dropped += 1;
                    tracing::debug!("virtio-net: transmit frame dropped: {e}");
                }
            }
            // The device writes nothing into a transmit chain.
            0
        });
        stats.add(&batch);
        if !tx_buf.is_empty() {
            TX_SCRATCH.with(|s| s.set(tx_buf));
        }
    }
}

/// Why a transmit chain was not sent.
#[derive(Debug, thiserror::Error)]
enum TxDrop {
    #[error("empty chain")]
    Empty,
    #[error("chain cut short (loop, bad next index or indirect table)")]
    Truncated,
    #[error("writable descriptor in a transmit chain")]
    WrongDirection,
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("frame longer than {MAX_FRAME_LEN} bytes with its header")]
    TooLong,
    #[error("{0} bytes is too short for a header and an Ethernet frame")]
    TooShort(usize),
    #[error("buffer not readable")]
    Dma(#[source] super::DmaError),
    #[error("offload (flags {flags:#x}, gso_type {gso_type:#x}) the driver did not negotiate")]
    Offload { flags: u8, gso_type: u8 },
    #[error("backend write failed")]
    Backend(#[source] io::Error),
    #[error("backend took {written} of {len} bytes")]
    Short { written: usize, len: usize },
}

/// Whether the header asks for offloads the driver negotiated (virtio 1.2, 5.1.6.2.1).
#[inline]
fn offload_allowed(hdr: &[u8], acked: u64) -> bool {
    let has = |f: u32| acked & bit(f) != 0;
    let (flags, gso_type) = (u32::from(hdr[0]), u32::from(hdr[1]));
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !has(VIRTIO_NET_F_CSUM) {
        return false;
    }
    if gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 && !has(VIRTIO_NET_F_HOST_ECN) {
        return false;
    }
    match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
        // UDP fragmentation and segmentation offloads are not offered.
        _ => false,
    }
}

/// Send one transmit chain (header and frame, device-readable only) to the backend: straight
/// from guest memory when the backend has a [`NetBackend::tx_fd`], else gathered into `buf`
/// first (the thread's scratch, taken into `buf` when it is empty). Every buffer is checked
/// readable before the frame goes. Returns the frame's length with its header.
fn transmit<B: NetBackend>(
    dma: &DmaSnapshot,
    mut descs: Chain<'_>,
    buf: &mut Vec<u8>,
    backend: &mut B,
    neg: Negotiated,
) -> Result<usize, TxDrop> {
    let first = descs.next().ok_or(TxDrop::Empty)?;
    if first.is_write_only() {
        return Err(TxDrop::WrongDirection);
    }
    let (addr, first_len) = (first.addr().0, u64::from(first.len()));
    // One buffer in one host slice (a linear skb as Linux sends it) to a tap: translated once,
    // for the header and the write, and no list.
    if !first.has_next()
        && let Some(fd) = backend.tx_fd()
    {
        let len = frame_len(first_len)?;
        if let Some(one) = dma
            .single(addr, first_len, Access::Read)
            .map_err(TxDrop::Dma)?
        {
            // One volatile read: the slice holds len >= VNET_HDR_LEN bytes (frame_len).
            let hdr: [u8; VNET_HDR_LEN] = one.get_ref(0).map_err(|_| TxDrop::TooShort(len))?.load();
            check_offload(&hdr, neg)?;
            return sent(super::dma::write_fd_one(fd, &one), len);
        }
    }
    let mut sg = SgList::new();
    sg.push(addr, first_len);
    let mut count = 1usize;
    let mut has_next = first.has_next();
    for desc in descs {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(TxDrop::TooManyDescriptors);
        }
        has_next = desc.has_next();
        if desc.is_write_only() {
            return Err(TxDrop::WrongDirection);
        }
        sg.push(desc.addr().0, u64::from(desc.len()));
        if sg.len() > MAX_FRAME_LEN as u64 {
            return Err(TxDrop::TooLong);
        }
    }
    if has_next {
        return Err(TxDrop::Truncated);
    }
    let len = frame_len(sg.len())?;
    let mut hdr = [0u8; VNET_HDR_LEN];
    dma.read_sg(&sg, &mut hdr).map_err(TxDrop::Dma)?;
    check_offload(&hdr, neg)?;
    if let Some(fd) = backend.tx_fd() {
        return sent(dma.write_fd(fd, &sg), len);
    }
    if buf.is_empty() {
        *buf = take_scratch(&TX_SCRATCH);
    }
    // len <= MAX_FRAME_LEN (frame_len) = buf.len().
    let frame = &mut buf[..len];
    dma.read_sg(&sg, frame).map_err(TxDrop::Dma)?;
    loop {
        match backend.write_frame(&[IoSlice::new(frame)]) {
            Ok(written) if written == len => return Ok(len),
            Ok(written) => return Err(TxDrop::Short { written, len }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TxDrop::Backend(e)),
        }
    }
}

/// A transmit chain's length with its header, if it can be a frame.
fn frame_len(len: u64) -> Result<usize, TxDrop> {
    if len > MAX_FRAME_LEN as u64 {
        return Err(TxDrop::TooLong);
    }
    // At most MAX_FRAME_LEN, checked above.
    let len = usize::try_from(len).map_err(|_| TxDrop::TooLong)?;
    if len < VNET_HDR_LEN + ETH_HLEN {
        return Err(TxDrop::TooShort(len));
    }
    Ok(len)
}

/// Refuse a header that asks for offloads the driver did not negotiate.
#[inline]
fn check_offload(hdr: &[u8; VNET_HDR_LEN], neg: Negotiated) -> Result<(), TxDrop> {
    if offload_allowed(hdr, neg.acked) {
        Ok(())
    } else {
        Err(TxDrop::Offload {
            flags: hdr[0],
            gso_type: hdr[1],
        })
    }
}

/// What became of a frame of `len` bytes written to a [`NetBackend::tx_fd`].
fn sent(written: Result<usize, super::DmaError>, len: usize) -> Result<usize, TxDrop> {
    match written {
        Ok(written) if written == len => Ok(len),
        Ok(written) => Err(TxDrop::Short { written, len }),
        Err(super::DmaError::Io(e)) => Err(TxDrop::Backend(e)),
        Err(e) => Err(TxDrop::Dma(e)),
    }
}

/// Why a receive chain was returned unused.
#[derive(Debug, thiserror::Error)]
enum RxChainError {
    #[error("empty chain")]
    Empty,
    #[error("chain cut short (loop, bad next index or indirect table)")]
    Truncated,
    #[error("readable descriptor in a receive chain")]
    WrongDirection,
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("{0} bytes cannot hold the {VNET_HDR_LEN}-byte header")]
    TooSmall(usize),
    #[error("buffer not writable")]
    Dma(#[source] super::DmaError),
}

/// One receive chain taken for the frame being delivered.
#[derive(Clone, Copy, Debug)]
struct RxChain {
    head: u16,
    /// Its buffers: `Rx::ranges[first..end]`.
    first: usize,
    end: usize,
    capacity: usize,
}

/// What became of the frame in `Rx::buf`.
enum Delivery {
    Done,
    /// Not enough buffers yet: the chains taken went back, the frame waits.
    Wait,
    Dropped(&'static str),
}

/// What [`Rx::receive_direct`] did with the frame.
enum Direct {
    /// Delivered or dropped (or a malformed chain returned): go on with the next.
    Done,
    /// A frame of this length longer than the chain waits in `Rx::buf`.
    Spilled(usize),
    /// The backend read failed (`WouldBlock`: nothing to receive).
    Failed(io::Error),
    /// Read this frame through `Rx::buf`.
    Bounce,
    /// A frame of this length came back longer than [`Rx::frame_bound`], cut short by a plain
    /// read (dropped): ask the backend again.
    Truncated(usize),
}

/// Receive-side state, all reused from frame to frame.
struct Rx {
    /// The frame read from the backend (header first). While [`Rx::run_with`] runs, the
    /// thread's `MAX_FRAME_LEN` scratch; between runs, empty, or the pending frame in a buffer
    /// of its exact size.
    buf: Vec<u8>,
    /// Length of the frame in `buf` waiting for guest buffers; 0 when there is none.
    pending: usize,
    chains: Vec<RxChain>,
    ranges: Vec<DmaRange>,
    /// Malformed chains found after the first good one of a frame: returned (length 0) when
    /// the frame is, so that the frame's chains stay together in the used ring.
    held_bad: Vec<u16>,
    /// [`NetBackend::rx_frame_bound`] as last asked.
    frame_bound: usize,
}

impl Rx {
    fn new() -> Self {
        Self {
            buf: Vec::new(),
            pending: 0,
            chains: Vec::new(),
            ranges: Vec::new(),
            held_bad: Vec::new(),
            frame_bound: MAX_FRAME_LEN,
        }
    }

    /// Serve the receive queue with the thread's scratch as `buf`; afterwards keep only the
    /// frame left pending (exact size: a device waiting for guest buffers holds its frame, not
    /// 64 KiB).
    fn run<B: NetBackend>(
        &mut self,
        queue: &mut Queue,
        dma: &DmaSnapshot,
        backend: &mut B,
        neg: Negotiated,
        stats: &mut NetStats,
        used: &mut bool,
    ) -> Result<(), QueueError> {
        let mut scratch = take_scratch(&RX_SCRATCH);
        // pending <= buf.len() (a frame read into the scratch, at most MAX_FRAME_LEN).
        scratch[..self.pending].copy_from_slice(&self.buf[..self.pending]);
        self.buf = scratch;
        let result = self.run_with(queue, dma, backend, neg, stats, used);
        let scratch = std::mem::take(&mut self.buf);
        if self.pending > 0 {
            self.buf = scratch[..self.pending].to_vec();
        }
        RX_SCRATCH.with(|s| s.set(scratch));
        result
    }

    fn run_with<B: NetBackend>(
        &mut self,
        queue: &mut Queue,
        dma: &DmaSnapshot,
        backend: &mut B,
        neg: Negotiated,
        stats: &mut NetStats,
        used: &mut bool,
    ) -> Result<(), QueueError> {
        let mut ring = Ring::new(queue, dma);
        // Kicks are only wanted when the device runs out of buffers (see buffers_available).
        ring.disable_notification()?;
        // Receive in place only without an IOMMU: behind one, receive buffers are mapped
        // write-only (Linux: DMA_FROM_DEVICE), and a frame longer than its chain would have to
        // be read back from it (a refused access, a fault in the guest's log).
        let direct_fd = backend
            .rx_fd()
            .filter(|_| !dma.memory().get_iommu_enabled());
        loop {
            if self.pending == 0 {
                // Read only what the guest can take: frames stay in the kernel's queue.
                if !buffers_available(&mut ring)? {
                    return Ok(());
                }
                let read = match direct_fd {
                    Some(fd) => match self.receive_direct(&mut ring, dma, fd, neg, stats, used)? {
                        Direct::Done => continue,
                        Direct::Spilled(n) => Ok(n),
                        Direct::Failed(e) => Err(e),
                        Direct::Bounce => backend.read_frame(&mut [IoSliceMut::new(&mut self.buf)]),
                        Direct::Truncated(n) => {
                            // The backend's bound was out of date (an MTU raised), or wrong:
                            // then no bound is trusted until the next activation.
                            let bound = backend.rx_frame_bound();
                            self.frame_bound = if bound > n { bound } else { MAX_FRAME_LEN };
                            continue;
                        }
                    },
                    None => backend.read_frame(&mut [IoSliceMut::new(&mut self.buf)]),
                };
                match read {
                    Ok(0) => return Ok(()),
                    Ok(n) if n < VNET_HDR_LEN + ETH_HLEN => {
                        stats.rx_dropped += 1;
                        tracing::debug!(len = n, "virtio-net: runt frame from the backend dropped");
                        continue;
                    }
                    Ok(n) => self.pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("virtio-net: backend read failed: {e}");
                        return Ok(());
                    }
                }
                if !neg.guest_csum {
                    // Without GUEST_CSUM the header flags must be zero (5.1.6.4).
                    self.buf[0] = 0;
                }
            }
            match self.deliver(&mut ring, dma, neg.mrg_rxbuf, stats, used)? {
                Delivery::Done => {
                    stats.rx_frames += 1;
                    stats.rx_bytes += self.pending as u64;
                    self.pending = 0;
                }
                Delivery::Wait => return Ok(()),
                Delivery::Dropped(why) => {
                    stats.rx_dropped += 1;
                    tracing::debug!(
                        len = self.pending,
                        "virtio-net: received frame dropped: {why}"
                    );
                    self.pending = 0;
                }
            }
        }
    }

    /// Receive one frame from `fd` for the next receive chain: straight into its buffers when
    /// it holds any frame the backend can give (one `read`), else into `self.buf` and copied
    /// (a chain of one buffer) or with one `readv` into its buffers and then `self.buf` (a
    /// chain of several). A frame that fits is finished in place (header flags, `num_buffers`
    /// = 1) and returned to the driver. One that does not fit is put together in `self.buf`
    /// (its front copied back from the chain after a `readv`; the chain goes back to the
    /// available ring) for [`Rx::deliver`] to spread over several chains, or dropped without
    /// MRG_RXBUF, as on the copying path.
    #[inline]
    fn receive_direct(
        &mut self,
        ring: &mut Ring<'_, '_>,
        dma: &DmaSnapshot,
        fd: RawFd,
        neg: Negotiated,
        stats: &mut NetStats,
        used: &mut bool,
    ) -> Result<Direct, QueueError> {
        let start = ring.next_avail();
        let chain = ring.pop()?;
        let head = chain.head_index();
        self.ranges.clear();
        // read_fd checks the buffers (one translation for the check and the call).
        let capacity = match parse_rx_chain(chain, None, &mut self.ranges) {
            Ok(c) => c,
            Err(e) => {
                stats.rx_bad_chains += 1;
                tracing::debug!(head, "virtio-net: receive chain returned unused: {e}");
                ring.add_used(head, 0)?;
                *used = true;
                return Ok(Direct::Done);
            }
        };
        // A chain longer than any frame the backend can give now is read into with a plain
        // `read`, and a frame that fills it was cut short (whichever length the kernel reports
        // for it). A shorter one in one host slice (Linux's mergeable buffers with guest TSO)
        // gets the frame through `self.buf` and a copy: measured cheaper than a `readv` with
        // room behind the chain (RX 64 B 0.80x -> 0.91x, 1514 B the same; README), and a
        // frame longer than the chain is then already whole for `deliver`. A chain of several
        // buffers gets that `readv`. capacity <= MAX_FRAME_LEN: header and frame together stay
        // within MAX_FRAME_LEN, as on the copying path.
        let plain = capacity > self.frame_bound;
        // One buffer in one host slice (a receive buffer as Linux posts it): translated once,
        // for the read and the header.
        let one = match self.ranges.as_slice() {
            [r] => dma.single(r.addr, r.len, Access::Write),
            _ => Ok(None),
        };
        let (one, read) = match one {
            Ok(Some(one)) if plain => (Some(one), super::dma::read_fd_one(fd, &one, &mut [])),
            Ok(Some(one)) => (Some(one), read_host(fd, &mut self.buf)),
            Ok(None) => {
                let tail_len = if plain { 0 } else { MAX_FRAME_LEN - capacity };
                let tail = &mut self.buf[..tail_len];
                (None, dma.read_fd(fd, &sg_of(&self.ranges), tail))
            }
            Err(e) => (None, Err(e)),
        };
        let bounced = one.is_some() && !plain;
        let n = match read {
            Ok(n) => n,
            Err(super::DmaError::Io(e)) => {
                ring.rewind(start);
                return Ok(Direct::Failed(e));
            }
            // A buffer the device may not write, or one that wraps around the address space.
            Err(e @ (super::DmaError::Unreachable { .. } | super::DmaError::Overflow { .. })) => {
                stats.rx_bad_chains += 1;
                tracing::debug!(head, "virtio-net: receive chain returned unused: {e}");
                ring.add_used(head, 0)?;
                *used = true;
                return Ok(Direct::Done);
            }
            Err(e) => {
                // More host pieces than one readv takes (a chain of many small buffers behind
                // an IOMMU): this frame takes the copying path.
                tracing::debug!(head, "virtio-net: receive without a copy: {e}");
                ring.rewind(start);
                return Ok(Direct::Bounce);
            }
        };
        if plain && n >= capacity {
            ring.rewind(start);
            stats.rx_dropped += 1;
            tracing::warn!(
                len = n,
                bound = self.frame_bound,
                "virtio-net: received frame longer than the backend's bound dropped"
            );
            return Ok(Direct::Truncated(n));
        }
        if n > capacity {
            ring.rewind(start);
            if !neg.mrg_rxbuf {
                // The driver sized its buffers for the largest frame it accepts; the chain is
                // fine for the next one.
                stats.rx_dropped += 1;
                tracing::debug!(
                    len = n,
                    "virtio-net: received frame dropped: larger than the receive buffer"
                );
                return Ok(Direct::Done);
            }
            if !bounced {
                // The tail is at the front of buf: move it behind the front, which the chain
                // holds.
                self.buf.copy_within(..n - capacity, capacity);
                if let Err(e) = dma.read_sg(&sg_of(&self.ranges), &mut self.buf[..capacity]) {
                    // Checked writable in this snapshot, hence readable: cannot happen.
                    tracing::debug!(head, "virtio-net: receive buffer read back failed: {e}");
                }
            }
            return Ok(Direct::Spilled(n));
        }
        if n < VNET_HDR_LEN + ETH_HLEN {
            ring.rewind(start);
            stats.rx_dropped += 1;
            tracing::debug!(len = n, "virtio-net: runt frame from the backend dropped");
            return Ok(Direct::Done);
        }
        if bounced && let Some(one) = &one {
            // n <= capacity, the slice's length.
            one.copy_from(&self.buf[..n]);
        }
        // The header as the backend wrote it, finished for the guest: num_buffers, and
        // without GUEST_CSUM the flags must be zero (5.1.6.4).
        let finished = match &one {
            // The slice holds the frame, n >= VNET_HDR_LEN bytes.
            // One volatile store each (write_obj would go through a byte-copy loop).
            Some(one) => one
                .get_ref::<u16>(NUM_BUFFERS_OFFSET)
                .map(|r| r.store(1u16.to_le()))
                .and_then(|()| match neg.guest_csum {
                    true => Ok(()),
                    false => one.get_ref::<u8>(0).map(|r| r.store(0)),
                })
                .map_err(|e| e.to_string()),
            None => {
                let sg = sg_of(&self.ranges);
                write_at(dma, &sg, NUM_BUFFERS_OFFSET as u64, &1u16.to_le_bytes())
                    .and_then(|()| match neg.guest_csum {
                        true => Ok(()),
                        false => write_at(dma, &sg, 0, &[0]),
                    })
                    .map_err(|e| e.to_string())
            }
        };
        if let Err(e) = finished {
            // Checked writable in this snapshot: cannot happen.
            tracing::debug!(head, "virtio-net: receive header: {e}");
        }
        // n <= MAX_FRAME_LEN.
        ring.add_used(head, u32::try_from(n).unwrap_or(u32::MAX))?;
        *used = true;
        stats.rx_frames += 1;
        stats.rx_bytes += n as u64;
        Ok(Direct::Done)
    }

    /// Put the pending frame into the guest's receive chains.
    fn deliver(
        &mut self,
        ring: &mut Ring<'_, '_>,
        dma: &DmaSnapshot,
        mrg_rxbuf: bool,
        stats: &mut NetStats,
        used: &mut bool,
    ) -> Result<Delivery, QueueError> {
        let size = ring.size();
        let frame_len = self.pending;
        self.chains.clear();
        self.ranges.clear();
        self.held_bad.clear();
        // Where to rewind the available ring if the frame cannot go now.
        let mut start = ring.next_avail();
        let mut capacity = 0usize;
        while capacity < frame_len {
            if (Wrapping(ring.next_avail()) - Wrapping(start)).0 >= size {
                // Every buffer the ring can hold is not enough: the frame can never go.
                ring.rewind(start);
                return Ok(Delivery::Dropped("larger than the whole receive ring"));
            }
            if !buffers_available(ring)? {
                ring.rewind(start);
                return Ok(Delivery::Wait);
            }
            let chain = ring.pop()?;
            let head = chain.head_index();
            let first = self.ranges.len();
            match parse_rx_chain(chain, Some(dma), &mut self.ranges) {
                Err(e) => {
                    self.ranges.truncate(first);
                    stats.rx_bad_chains += 1;
                    tracing::debug!(head, "virtio-net: receive chain returned unused: {e}");
                    if self.chains.is_empty() {
                        ring.add_used(head, 0)?;
                        *used = true;
                        start = ring.next_avail();
                    } else {
                        self.held_bad.push(head);
                    }
                }
                Ok(chain_capacity) => {
                    if !mrg_rxbuf && chain_capacity < frame_len {
                        // The driver sized its buffers for the largest frame it accepts; the
                        // chain is fine for the next one.
                        ring.rewind(start);
                        return Ok(Delivery::Dropped("larger than the receive buffer"));
                    }
                    self.chains.push(RxChain {
                        head,
                        first,
                        end: self.ranges.len(),
                        capacity: chain_capacity,
                    });
                    capacity = capacity.saturating_add(chain_capacity);
                }
            }
        }

        // At most a queue's worth of chains: num_buffers fits.
        let num_buffers = u16::try_from(self.chains.len()).unwrap_or(u16::MAX);
        self.buf[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
        for &head in &self.held_bad {
            ring.add_used(head, 0)?;
        }
        let mut offset = 0usize;
        for c in &self.chains {
            let take = c.capacity.min(frame_len - offset);
            let mut pos = offset;
            let end = offset + take;
            for r in &self.ranges[c.first..c.end] {
                if pos == end {
                    break;
                }
                let n = usize::try_from(r.len).unwrap_or(usize::MAX).min(end - pos);
                // parse_rx_chain checked the range in this snapshot: this cannot fail.
                if let Err(e) = dma.write(r.addr, &self.buf[pos..pos + n]) {
                    tracing::debug!("virtio-net: receive buffer write failed: {e}");
                }
                pos += n;
            }
            // take <= MAX_FRAME_LEN.
            let len = u32::try_from(take).unwrap_or(u32::MAX);
            ring.add_used(c.head, len)?;
            offset = end;
        }
        *used = true;
        Ok(Delivery::Done)
    }
}

/// Whether the driver has made a chain available. When it has not, ask it to notify the device
/// when it does (with EVENT_IDX: at the next buffer), then look once more, since it may have
/// added one before it could see the request.
#[inline]
fn buffers_available(ring: &mut Ring<'_, '_>) -> Result<bool, QueueError> {
    if ring.pending()? > 0 {
        return Ok(true);
    }
    if ring.enable_notification()? {
        ring.disable_notification()?;
        return Ok(true);
    }
    Ok(false)
}

/// Read one frame from `fd` into host memory (a nonblocking `read`, retried if interrupted).
fn read_host(fd: RawFd, buf: &mut [u8]) -> Result<usize, super::DmaError> {
    // SAFETY: reads at most `buf.len()` bytes into `buf`, borrowed mutably for the call.
    super::dma::retry_io(|| unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
}

/// The buffers of a receive chain as a list (for the paths that take one: a chain of several
/// buffers, or a frame longer than the chain).
fn sg_of(ranges: &[DmaRange]) -> SgList {
    let mut sg = SgList::new();
    for r in ranges {
        sg.push(r.addr, r.len);
    }
    sg
}

/// Write `bytes` at `offset` into the buffers of `sg` (the header of a frame received in
/// place; nearly always inside the first buffer).
fn write_at(
    dma: &DmaSnapshot,
    sg: &SgList,
    mut offset: u64,
    mut bytes: &[u8],
) -> Result<(), super::DmaError> {
    for r in sg.ranges() {
        if bytes.is_empty() {
            break;
        }
        if offset >= r.len {
            offset -= r.len;
            continue;
        }
        // offset < r.len, so the piece is at least one byte and fits a usize.
        let n = usize::try_from(r.len - offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        dma.write(r.addr + offset, &bytes[..n])?;
        bytes = &bytes[n..];
        offset = 0;
    }
    Ok(())
}

/// Check a receive chain (device-writable buffers only; with `dma`, every one reachable) and
/// append its buffers to `ranges`. Returns its capacity, counted up to [`MAX_FRAME_LEN`].
#[inline]
fn parse_rx_chain(
    chain: Chain<'_>,
    dma: Option<&DmaSnapshot>,
    ranges: &mut Vec<DmaRange>,
) -> Result<usize, RxChainError> {
    let mut capacity = 0usize;
    let mut count = 0usize;
    let mut has_next = false;
    for desc in chain {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(RxChainError::TooManyDescriptors);
        }
        has_next = desc.has_next();
        if !desc.is_write_only() {
            return Err(RxChainError::WrongDirection);
        }
        if capacity >= MAX_FRAME_LEN || desc.len() == 0 {
            // Buffers past what any frame needs are never written: no need to check them.
            continue;
        }
        let len = u64::from(desc.len()).min((MAX_FRAME_LEN - capacity) as u64);
        let addr = desc.addr().0;
        if let Some(dma) = dma {
            dma.check(addr, len, Access::Write)
                .map_err(RxChainError::Dma)?;
        }
        ranges.push(DmaRange { addr, len });
        // len <= MAX_FRAME_LEN - capacity.
        capacity += usize::try_from(len).unwrap_or(MAX_FRAME_LEN);
    }
    if count == 0 {
        return Err(RxChainError::Empty);
    }
    if has_next {
        return Err(RxChainError::Truncated);
    }
    if capacity < VNET_HDR_LEN {
        return Err(RxChainError::TooSmall(capacity));
    }
    Ok(capacity)
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only by legacy drivers; every other field is read-only.
        tracing::debug!(offset, len = data.len(), "virtio-net: config write ignored");
    }

    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        dma: DmaSpace,
    ) -> Result<(), ActivateError> {
        self.common.activate(queues, interrupt, dma)?;
        let flags = tap_offload(self.common.acked_features());
        if let Err(e) = self.backend.set_offload(flags) {
            // Offloads only permit the kernel to hand over unfinished frames; without them it
            // finishes each one itself, which the guest accepts too.
            tracing::warn!(
                flags,
                "virtio-net: cannot set tap offloads, going without: {e}"
            );
        }
        self.rx.frame_bound = self.backend.rx_frame_bound();
        Ok(())
    }

    fn reset(&mut self) {
        self.common.reset();
        self.rx.pending = 0;
        self.rx.buf = Vec::new();
        if let Err(e) = self.backend.set_offload(0) {
            tracing::debug!("virtio-net: cannot clear tap offloads: {e}");
        }
    }

    fn process_queue(&mut self, queue: u16) {
        match queue {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => tracing::debug!(
                queue,
                "virtio-net: notification for a queue that does not exist"
            ),
        }
    }
}
