//! virtio-vsock (virtio 1.2, 5.10): stream sockets between the guest and host programs, with the
//! host side on Unix sockets in the style of Firecracker's hybrid vsock (see [`muxer`]).
//!
//! Queues: rx (0) carries packets to the guest, tx (1) packets from it, event (2) is left to
//! the driver (the only event, TRANSPORT_RESET, is for migration). The configuration space is
//! the guest's CID (le64).
//!
//! How the VMM drives it: besides the queue notifications of every virtio device, it watches
//! [`Vsock::backend_fd`] (one epoll fd covering the listening socket, every connection and a
//! timer; it stays the same while connections come and go) for readability and then calls
//! [`Vsock::process_backend`]. Both run under the device lock in the device event loop.
//!
//! ```ignore
//! let vsock = Arc::new(Mutex::new(Vsock::new(cid, &socket)?)); // is_bad_input(): status 2
//! let device: Arc<Mutex<dyn VirtioDevice>> = vsock.clone();    // to virtio-pci, as any device
//! // One more subscriber: EPOLLIN on `backend_fd()` -> `lock(&vsock).process_backend()`.
//! ```
//!
//! The device owns the socket file: it is removed when the device is dropped, so a VM that is
//! rebuilt (reset with `--on-reboot restart`) must drop the old device first.

mod conn;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;
mod unix;

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::Queue;

use super::dma::DmaSnapshot;
use super::queue::{Chain, QueueError, drain_until, fill, parse_chain};
use super::{ActivateError, DmaSpace, VirtioCommon, VirtioDevice, VirtioInterrupt};

pub use muxer::{CONN_BUF_SIZE, MAX_CONNECTIONS, MAX_PAYLOAD};
pub use packet::{HDR_LEN, HOST_CID, Header};

use muxer::Muxer;

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;
/// Largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most descriptors in one packet's chain. Linux uses two (header, payload).
const MAX_DESCRIPTORS: usize = 64;
/// Configuration space: `guest_cid` (le64).
const CONFIG_LEN: usize = 8;

/// CIDs 0-2 name the hypervisor, local loopback and the host; `u32::MAX` is `VMADDR_CID_ANY`.
/// The field is 64 bits wide but the upper 32 are reserved.
const MIN_GUEST_CID: u64 = 3;
const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("Guest CID {0} is reserved or out of range (3 to 4294967294)")]
    InvalidCid(u64),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("Socket {0} is in use by another program")]
    PathInUse(PathBuf),
    #[error("Cannot check socket path {path}")]
    Probe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot remove stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot set up the vsock backend's epoll set")]
    Epoll(#[source] std::io::Error),
    #[error("Cannot create the vsock backend's timer")]
    Timer(#[source] std::io::Error),
}

impl VsockError {
    /// The user's mistake (a reserved CID, a socket path that is taken or cannot be created),
    /// as opposed to the host running out of resources.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, Self::Epoll(_) | Self::Timer(_))
    }
}

pub struct Vsock {
    common: VirtioCommon,
    guest_cid: u64,
    config: [u8; CONFIG_LEN],
    muxer: Muxer,
    /// One packet from the guest's tx queue (payload only).
    tx_buf: Vec<u8>,
    /// One packet for the guest's rx queue (header and payload).
    rx_buf: Vec<u8>,
    /// tx processing paused on a reply backlog; resumed when rx drains.
    tx_stalled: bool,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("common", &self.common)
            .field("guest_cid", &self.guest_cid)
            .field("muxer", &self.muxer)
            .finish()
    }
}

impl Vsock {
    /// A device for guest `guest_cid` listening on the Unix socket `path` (created here,
    /// removed when the device is dropped; a stale socket left by a dead VMM is replaced).
    pub fn new(guest_cid: u64, path: impl AsRef<Path>) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let muxer = Muxer::new(path.as_ref(), guest_cid)?;
        Ok(Self {
            // No device features: VIRTIO_VSOCK_F_SEQPACKET is not offered.
            common: VirtioCommon::new(VIRTIO_ID_VSOCK, vec![QUEUE_SIZE; 3], 0),
            guest_cid,
            config: guest_cid.to_le_bytes(),
            muxer,
            tx_buf: vec![0; MAX_PAYLOAD],
            rx_buf: vec![0; HDR_LEN + MAX_PAYLOAD],
            tx_stalled: false,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The listening socket's path.
    pub fn path(&self) -> &Path {
        self.muxer.path()
    }

    /// The one file descriptor the VMM watches for readability (EPOLLIN) on the device's
    /// behalf; then it calls [`Vsock::process_backend`]. It never changes.
    pub fn backend_fd(&self) -> RawFd {
        self.muxer.epoll_fd()
    }

    /// Open guest connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Serve the host side: new host connections, data from host streams, room in them, and
    /// timeouts; then move what is ready to the guest.
    pub fn process_backend(&mut self) {
        self.muxer.process_events();
        self.pump();
    }

    /// Move what is ready to the guest; when that frees the reply backlog, serve the tx packets
    /// left waiting (which may make more replies).
    fn pump(&mut self) {
        loop {
            self.pump_rx();
            if !self.tx_stalled || self.muxer.backlogged() {
                return;
            }
            self.process_tx();
        }
    }

    /// Fill rx buffers with what the muxer has for the guest, one packet per chain.
    fn pump_rx(&mut self) {
        let Self {
            common,
            muxer,
            rx_buf,
            ..
        } = self;
        if !muxer.has_rx() {
            return;
        }
        common.serve(RX_QUEUE, |queue, snapshot| {
            let mut used_any = false;
            fill_rx(queue, snapshot, muxer, rx_buf, &mut used_any)?;
            Ok(used_any)
        });
    }

    /// Serve the tx queue until it is empty or replies pile up ([`Muxer::backlogged`]); in the
    /// latter case the rest waits in the ring, notifications off, until rx drains.
    fn process_tx(&mut self) {
        let Self {
            common,
            muxer,
            tx_buf,
            guest_cid,
            tx_stalled,
            ..
        } = self;
        common.serve(TX_QUEUE, |queue, snapshot| {
            let mut used_any = false;
            let drained = drain_tx(
                queue,
                snapshot,
                muxer,
                tx_buf,
                *guest_cid,
                &mut used_any,
                tx_stalled,
            );
            muxer.arm_timer();
            drained.map(|()| used_any)
        });
    }
}

/// Pop rx chains while the muxer has packets. A chain the muxer has nothing for goes back.
fn fill_rx(
    queue: &mut Queue,
    dma: &DmaSnapshot,
    muxer: &mut Muxer,
    buf: &mut [u8],
    used_any: &mut bool,
) -> Result<(), QueueError> {
    fill(
        queue,
        dma,
        muxer,
        used_any,
        |muxer| muxer.has_rx().then_some(()),
        |muxer, (), chain| fill_rx_chain(dma, muxer, buf, chain),
    )?;
    Ok(())
}

/// One rx chain: the used length, or `None` (put it back) when the muxer has nothing for it.
fn fill_rx_chain(
    dma: &DmaSnapshot,
    muxer: &mut Muxer,
    buf: &mut [u8],
    chain: Chain<'_>,
) -> Option<u32> {
    let head = chain.head_index();
    let writable = match parse_chain(chain, MAX_DESCRIPTORS) {
        Ok(b) => b.writable,
        Err(fault) => {
            tracing::debug!(head, "virtio-vsock: rx chain: {}", fault.error);
            return Some(0);
        }
    };
    let room = usize::try_from(writable.len())
        .unwrap_or(usize::MAX)
        .min(buf.len());
    // A buffer with no room for data would sit at the head of the queue and hold up every
    // data packet: unless a control packet can use it, it goes back empty.
    if room < HDR_LEN || (room == HDR_LEN && !muxer.has_control()) {
        tracing::debug!(head, room, "virtio-vsock: rx buffer too small");
        return Some(0);
    }
    let n = muxer.next_rx(&mut buf[..room])?;
    Some(match dma.write_sg(&writable, &buf[..n]) {
        Ok(_) => u32::try_from(n).unwrap_or(0),
        Err(e) => {
            tracing::debug!(head, "virtio-vsock: rx buffer: {e}");
            let mut hb = [0u8; HDR_LEN];
            hb.copy_from_slice(&buf[..HDR_LEN]);
            muxer.rx_failed(&Header::from_bytes(&hb));
            0
        }
    })
}

/// [`super::queue::drain`], with a stop when replies pile up.
fn drain_tx(
    queue: &mut Queue,
    dma: &DmaSnapshot,
    muxer: &mut Muxer,
    buf: &mut [u8],
    guest_cid: u64,
    used_any: &mut bool,
    stalled: &mut bool,
) -> Result<(), QueueError> {
    // Not stalled after a ring fault either.
    *stalled = false;
    *stalled = drain_until(
        queue,
        dma,
        muxer,
        used_any,
        |muxer| muxer.backlogged(),
        |muxer, chain| handle_tx(muxer, buf, guest_cid, dma, chain),
    )?;
    Ok(())
}

/// One packet from the tx queue: header in the first [`HDR_LEN`] readable bytes, payload in
/// the next `len`. Returns the used length (always 0: nothing is written back).
fn handle_tx(
    muxer: &mut Muxer,
    buf: &mut [u8],
    guest_cid: u64,
    dma: &DmaSnapshot,
    chain: Chain<'_>,
) -> u32 {
    let head = chain.head_index();
    let mut header_sg = match parse_chain(chain, MAX_DESCRIPTORS) {
        Ok(b) => b.readable,
        Err(fault) => {
            tracing::debug!(head, "virtio-vsock: tx chain: {}", fault.error);
            return 0;
        }
    };
    if header_sg.len() < HDR_LEN as u64 {
        tracing::debug!(head, "virtio-vsock: tx chain shorter than a header");
        return 0;
    }
    let payload_sg = header_sg.split_off(HDR_LEN as u64);
    let mut hb = [0u8; HDR_LEN];
    if let Err(e) = dma.read_sg(&header_sg, &mut hb) {
        tracing::debug!(head, "virtio-vsock: tx header: {e}");
        return 0;
    }
    let hdr = Header::from_bytes(&hb);
    if hdr.src_cid != guest_cid || hdr.dst_cid != HOST_CID {
        // Not addressed from this guest to the host: nobody to answer.
        tracing::debug!(
            head,
            src = hdr.src_cid,
            dst = hdr.dst_cid,
            "virtio-vsock: tx packet with wrong CIDs dropped"
        );
        return 0;
    }
    let len = usize::try_from(hdr.len).unwrap_or(usize::MAX);
    if len > MAX_PAYLOAD.min(buf.len()) || u64::from(hdr.len) > payload_sg.len() {
        tracing::debug!(
            head,
            len = hdr.len,
            room = payload_sg.len(),
            "virtio-vsock: tx packet length out of range"
        );
        muxer.guest_fault(&hdr);
        return 0;
    }
    let payload = &mut buf[..len];
    match dma.read_sg(&payload_sg, payload) {
        Ok(n) if n == len => muxer.guest_packet(&hdr, payload),
        Ok(_) => muxer.guest_fault(&hdr),
        Err(e) => {
            tracing::debug!(head, "virtio-vsock: tx payload: {e}");
            muxer.guest_fault(&hdr);
        }
    }
    0
}

impl AsRawFd for Vsock {
    fn as_raw_fd(&self) -> RawFd {
        self.backend_fd()
    }
}

impl VirtioDevice for Vsock {
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
        tracing::debug!(
            offset,
            len = data.len(),
            "virtio-vsock: config write ignored"
        );
    }

    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        dma: DmaSpace,
    ) -> Result<(), ActivateError> {
        self.common.activate(queues, interrupt, dma)?;
        // Host connections may have asked for the guest before its driver was up.
        self.pump();
        Ok(())
    }

    fn reset(&mut self) {
        self.common.reset();
        self.muxer.reset();
        self.tx_stalled = false;
    }

    fn process_queue(&mut self, queue: u16) {
        match queue {
            RX_QUEUE => {}
            TX_QUEUE => self.process_tx(),
            EVENT_QUEUE => return,
            _ => {
                tracing::debug!(queue, "virtio-vsock: notification for an unknown queue");
                return;
            }
        }
        // New rx buffers, or replies and credit from the tx packets.
        self.pump();
    }
}
