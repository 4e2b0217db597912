//! The embedded switch of a virtio-net PF with SR-IOV: every function (the PF and each VF) is a
//! port, and the PF's tap is the uplink. VF-to-VF (and PF-to-VF) frames are delivered inside
//! the VMM and never reach the tap.
//!
//! Written by hand: no crate does this (a learning bridge over in-process queues). It behaves
//! as an 802.1D learning bridge does:
//!
//! - **Learning**: a frame's source MAC is recorded against the port it came in on. Each guest
//!   port also has a **fixed** entry for the MAC assigned to it ([`vf_mac`]): never aged, never
//!   taken over by a frame from another port, so one VF cannot pull another's traffic to itself.
//! - **Forwarding**: unicast to a learned (or fixed) port; broadcast, multicast and unknown
//!   unicast are flooded to every port but the one they came in on. A frame is never sent back
//!   out of its own port.
//! - **Bounds**: each port learns at most [`Limits::macs_per_port`] addresses (the uplink
//!   [`Limits::uplink_macs`]); a new one past that evicts the port's oldest. Entries not seen for
//!   [`Limits::age`] are forgotten (Linux's bridge default, 300 s). A guest spraying random source
//!   MACs thus churns its own port's entries and grows nothing.
//! - **Queues**: each guest port has a bounded queue of frames for its device
//!   ([`Limits::queue_frames`], [`Limits::queue_bytes`]); a frame for a full queue is dropped and
//!   counted, as a real switch does, so a port whose guest does not read cannot hold up the rest.
//!
//! Frames carry the 12-byte `virtio_net_hdr_v1` like every [`NetBackend`] frame. Switch ports
//! offer no offloads ([`NetBackend::offloads`]), so frames are complete; the switch zeroes the
//! header of everything it forwards, so no offload request crosses from one port to another
//! whatever a port sent. Runts (no Ethernet header), oversized frames and frames with a group or
//! all-zero source address are refused and counted.
//!
//! Threads: one lock for the whole switch. A guest port's device transmits by
//! [`NetBackend::write_frame`] on its [`SwitchPort`] (under its own device lock, then the
//! switch's: the switch never takes a device lock); the switch pushes the frame to the target
//! port's queue and, when that queue was empty, writes the port's eventfd. The VMM watches that
//! eventfd (the port's [`AsRawFd`]) **edge-triggered** as it does a tap, or level-triggered
//! with [`SwitchPort::clear_wake`] first, and calls the device's `process_backend`, which reads
//! the queue while the guest has buffers. The uplink's
//! fd is watched **level-triggered** and [`Switch::uplink_input`] reads a bounded batch per call:
//! the switch reads the tap whatever the guests' buffers, and drops into full queues.

use std::collections::VecDeque;
use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::{ETH_HLEN, MAX_FRAME_LEN, NetBackend, VNET_HDR_LEN};
use crate::bus::lock;

/// A MAC address.
pub type Mac = [u8; 6];
/// A port's number: [`UPLINK`] or a guest port from [`Switch::add_port`].
pub type PortId = usize;
/// The uplink's port number.
pub const UPLINK: PortId = 0;
/// Most ports a switch has, uplink included: the PF and up to 255 VFs (ARI's limit on
/// functions).
pub const MAX_PORTS: usize = 257;
/// Frames read from the uplink per [`Switch::uplink_input`] call, so that a host flooding the
/// tap cannot keep the event loop from everything else.
pub const UPLINK_BUDGET: usize = 64;

/// Retired frame buffers kept for reuse.
const POOL_MAX: usize = 64;
/// Buffers bigger than this are not kept (a 64 KiB frame is rare on switch ports, which have no
/// segmentation offload).
const POOL_BUF_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("Switch has all its {MAX_PORTS} ports")]
    Full,
    #[error("Cannot create a port's eventfd")]
    EventFd(#[source] io::Error),
    #[error("MAC {0} is a group address or all zeros, not a port's address")]
    BadMac(MacFmt),
    #[error("MAC {mac} is already port {port}'s")]
    MacTaken { mac: MacFmt, port: PortId },
}

/// A MAC printed as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacFmt(pub Mac);

impl std::fmt::Display for MacFmt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The MAC of VF `index` (0-based) of a PF whose MAC is `pf`: the PF's first three bytes with
/// the locally-administered bit set (and the group bit clear), then the PF's last three bytes
/// read as a number plus `index + 1`. Deterministic, distinct for every VF of a PF and from the
/// PF itself.
pub fn vf_mac(pf: Mac, index: u16) -> Mac {
    let low = u32::from_be_bytes([0, pf[3], pf[4], pf[5]]);
    let low = low.wrapping_add(u32::from(index) + 1) & 0xff_ffff;
    let [_, a, b, c] = low.to_be_bytes();
    [(pf[0] | 0x02) & !0x01, pf[1], pf[2], a, b, c]
}

/// A PF MAC for a tap when none is configured (VFs need one to derive theirs): `52:54:00` (the
/// locally-administered prefix QEMU uses) and three bytes of an FNV-1a hash of the tap's name.
pub fn default_pf_mac(tap: &str) -> Mac {
    let mut h: u32 = 0x811c_9dc5;
    for &b in tap.as_bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let [_, a, b, c] = h.to_be_bytes();
    [0x52, 0x54, 0x00, a, b, c]
}

fn is_group(mac: &Mac) -> bool {
    mac[0] & 0x01 != 0
}

/// Bounds of a switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Frames waiting for one guest port's device.
    pub queue_frames: usize,
    /// Bytes (headers included) waiting for one guest port's device.
    pub queue_bytes: usize,
    /// Addresses learned on one guest port (its fixed one aside).
    pub macs_per_port: usize,
    /// Addresses learned on the uplink (the hosts behind the tap).
    pub uplink_macs: usize,
    /// How long a learned address lasts without a frame from it.
    pub age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // A ring's worth, as a NIC's receive FIFO.
            queue_frames: 256,
            queue_bytes: 1 << 20,
            macs_per_port: 64,
            uplink_macs: 1024,
            age: Duration::from_secs(300),
        }
    }
}

/// Counters of the whole switch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwitchStats {
    /// Unicast frames sent to the one port their destination was learned on.
    pub forwarded: u64,
    /// Broadcast, multicast and unknown-unicast frames sent to every other port.
    pub flooded: u64,
    /// Frames whose destination is on the port they came from: dropped.
    pub filtered: u64,
    /// Runts, oversized frames, frames from a group or zero source address.
    pub invalid: u64,
    /// Frames the uplink refused or took short.
    pub uplink_errors: u64,
    /// Learned addresses evicted to make room on a full port.
    pub evicted: u64,
    /// Learned addresses forgotten after [`Limits::age`].
    pub aged: u64,
}

/// Counters of one port, seen from the port's side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames the port sent into the switch.
    pub tx_frames: u64,
    /// Frames queued for the port's device (or written to the uplink).
    pub rx_frames: u64,
    /// Frames for the port dropped because its queue was full (or the uplink failed).
    pub rx_dropped: u64,
}

/// One address in the forwarding database.
#[derive(Clone, Copy, Debug)]
struct FdbEntry {
    port: PortId,
    seen: Instant,
    /// A port's assigned address: not aged, not moved by learning, not evicted.
    fixed: bool,
    /// Tells this entry from an older one for the same address in a port's eviction queue.
    generation: u64,
}

/// The forwarding database: address -> port, bounded per port.
struct Fdb {
    map: HashMap<Mac, FdbEntry>,
    /// Per port: learned addresses in the order they were learned, with their generation (an
    /// address that has moved on or been relearned since is stale there and skipped).
    order: Vec<VecDeque<(Mac, u64)>>,
    next_generation: u64,
}

impl Fdb {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            order: Vec::new(),
            next_generation: 0,
        }
    }

    /// Record that `mac` sent from `port` at `now`. Returns how many entries were evicted.
    fn learn(&mut self, mac: Mac, port: PortId, now: Instant, limit: usize) -> u64 {
        let generation = self.next_generation;
        match self.map.entry(mac) {
            MapEntry::Occupied(mut e) => {
                let entry = e.get_mut();
                if entry.fixed || entry.port == port {
                    // A port's own fixed address needs no learning; another port's is not
                    // taken over (anti-spoofing for forwarding).
                    if entry.port == port {
                        entry.seen = now;
                    }
                    return 0;
                }
                // Moved to another port (a guest changed ports, or a host behind the uplink
                // moved): learn it anew there.
                *entry = FdbEntry {
                    port,
                    seen: now,
                    fixed: false,
                    generation,
                };
            }
            MapEntry::Vacant(e) => {
                e.insert(FdbEntry {
                    port,
                    seen: now,
                    fixed: false,
                    generation,
                });
            }
        }
        self.next_generation += 1;
        if self.order.len() <= port {
            self.order.resize_with(port + 1, VecDeque::new);
        }
        let order = &mut self.order[port];
        order.push_back((mac, generation));
        let mut evicted = 0;
        while order.len() > limit {
            let Some((old, old_generation)) = order.pop_front() else {
                break;
            };
            if let MapEntry::Occupied(e) = self.map.entry(old) {
                let entry = e.get();
                if entry.port == port && !entry.fixed && entry.generation == old_generation {
                    e.remove();
                    evicted += 1;
                }
            }
        }
        evicted
    }

    /// The port `mac` was learned on, if it is still fresh; a stale entry is removed (the
    /// second value says so).
    fn lookup(&mut self, mac: &Mac, now: Instant, age: Duration) -> (Option<PortId>, bool) {
        let Some(entry) = self.map.get(mac) else {
            return (None, false);
        };
        if entry.fixed || now.saturating_duration_since(entry.seen) <= age {
            return (Some(entry.port), false);
        }
        self.map.remove(mac);
        (None, true)
    }

    fn add_fixed(&mut self, mac: Mac, port: PortId, now: Instant) {
        self.map.insert(
            mac,
            FdbEntry {
                port,
                seen: now,
                fixed: true,
                generation: 0,
            },
        );
    }

    /// Forget everything about `port`.
    fn remove_port(&mut self, port: PortId) {
        self.map.retain(|_, e| e.port != port);
        if let Some(order) = self.order.get_mut(port) {
            *order = VecDeque::new();
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// A guest port: its queue, its eventfd, its address.
struct GuestPort {
    queue: VecDeque<Vec<u8>>,
    bytes: usize,
    event: Arc<EventFd>,
    mac: Option<Mac>,
    stats: PortStats,
}

enum Port {
    Uplink {
        backend: Box<dyn NetBackend>,
        stats: PortStats,
    },
    Guest(GuestPort),
}

struct Inner {
    /// Index = port id; slot 0 is the uplink's (empty without one).
    ports: Vec<Option<Port>>,
    fdb: Fdb,
    limits: Limits,
    stats: SwitchStats,
    /// Retired frame buffers, reused for the next frames.
    pool: Vec<Vec<u8>>,
    /// Where uplink frames are read (allocated with the uplink).
    uplink_buf: Vec<u8>,
}

/// The switch. Shared (`Arc`) between its ports and the VMM.
pub struct Switch {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("Switch")
            .field("ports", &inner.ports.iter().filter(|p| p.is_some()).count())
            .field("fdb", &inner.fdb.len())
            .field("stats", &inner.stats)
            .finish()
    }
}

impl Switch {
    /// A switch with `uplink` (a tap) as port [`UPLINK`], or none. The uplink's offloads are
    /// turned off: its frames are forwarded to ports that offer none.
    pub fn new(uplink: Option<Box<dyn NetBackend>>, limits: Limits) -> Arc<Self> {
        let mut uplink_buf = Vec::new();
        let uplink = uplink.map(|mut backend| {
            if let Err(e) = backend.set_offload(0) {
                tracing::warn!("virtio-net switch: cannot clear the uplink's offloads: {e}");
            }
            uplink_buf = vec![0; MAX_FRAME_LEN];
            Port::Uplink {
                backend,
                stats: PortStats::default(),
            }
        });
        Arc::new(Self {
            inner: Mutex::new(Inner {
                ports: vec![uplink],
                fdb: Fdb::new(),
                limits,
                stats: SwitchStats::default(),
                pool: Vec::new(),
                uplink_buf,
            }),
        })
    }

    /// A new guest port with `mac` as its fixed address (frames to it go to this port from the
    /// start, and no other port can take it). The port goes away when the returned
    /// [`SwitchPort`] is dropped.
    pub fn add_port(self: &Arc<Self>, mac: Option<Mac>) -> Result<SwitchPort, SwitchError> {
        let mut inner = lock(&self.inner);
        if let Some(mac) = mac {
            if is_group(&mac) || mac == [0; 6] {
                return Err(SwitchError::BadMac(MacFmt(mac)));
            }
            if let Some(e) = inner.fdb.map.get(&mac).filter(|e| e.fixed) {
                return Err(SwitchError::MacTaken {
                    mac: MacFmt(mac),
                    port: e.port,
                });
            }
        }
        let id = match inner.ports.iter().skip(1).position(Option::is_none) {
            Some(free) => free + 1,
            None if inner.ports.len() < MAX_PORTS => {
                inner.ports.push(None);
                inner.ports.len() - 1
            }
            None => return Err(SwitchError::Full),
        };
        let event = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(SwitchError::EventFd)?);
        inner.ports[id] = Some(Port::Guest(GuestPort {
            queue: VecDeque::new(),
            bytes: 0,
            event: event.clone(),
            mac,
            stats: PortStats::default(),
        }));
        if let Some(mac) = mac {
            // A learned entry for it (from another port) gives way to the assignment.
            inner.fdb.add_fixed(mac, id, Instant::now());
        }
        Ok(SwitchPort {
            switch: self.clone(),
            id,
            event,
        })
    }

    fn remove_port(&self, id: PortId) {
        let mut inner = lock(&self.inner);
        if let Some(slot) = inner.ports.get_mut(id) {
            *slot = None;
        }
        inner.fdb.remove_port(id);
    }

    /// The uplink's fd (the tap): watch it level-triggered and call [`Switch::uplink_input`].
    pub fn uplink_fd(&self) -> Option<RawFd> {
        match lock(&self.inner).ports.first() {
            Some(Some(Port::Uplink { backend, .. })) => Some(backend.as_raw_fd()),
            _ => None,
        }
    }

    /// Read up to [`UPLINK_BUDGET`] frames from the uplink and forward them. Returns how many
    /// were read.
    pub fn uplink_input(&self) -> usize {
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        let mut frames = 0;
        while frames < UPLINK_BUDGET {
            let Inner {
                ports, uplink_buf, ..
            } = &mut *inner;
            let Some(Some(Port::Uplink { backend, stats })) = ports.first_mut() else {
                return frames;
            };
            let n = match backend.read_frame(&mut [IoSliceMut::new(uplink_buf)]) {
                Ok(0) => return frames,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return frames,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("virtio-net switch: uplink read failed: {e}");
                    return frames;
                }
            };
            stats.tx_frames += 1;
            frames += 1;
            // Taken out for the call, so that the rest of `inner` can be borrowed with it.
            let buf = std::mem::take(&mut inner.uplink_buf);
            inner.forward(UPLINK, &buf[..n], now);
            inner.uplink_buf = buf;
        }
        frames
    }

    /// Send `frame` (header and Ethernet frame) into the switch as if port `from` had sent it.
    /// What [`SwitchPort::write_frame`] does; for tests, fuzzing and benchmarks.
    pub fn input(&self, from: PortId, frame: &[u8]) {
        lock(&self.inner).input(from, frame, Instant::now());
    }

    pub fn stats(&self) -> SwitchStats {
        lock(&self.inner).stats
    }

    /// A port's counters; `None` for a port that does not exist.
    pub fn port_stats(&self, id: PortId) -> Option<PortStats> {
        match lock(&self.inner).ports.get(id)? {
            Some(Port::Uplink { stats, .. }) => Some(*stats),
            Some(Port::Guest(p)) => Some(p.stats),
            None => None,
        }
    }

    /// Addresses in the forwarding database, fixed ones included.
    pub fn fdb_len(&self) -> usize {
        lock(&self.inner).fdb.len()
    }

    /// The port `mac` would be forwarded to now (`None`: it would be flooded).
    pub fn lookup(&self, mac: Mac) -> Option<PortId> {
        let mut inner = lock(&self.inner);
        let age = inner.limits.age;
        inner.fdb.lookup(&mac, Instant::now(), age).0
    }

    /// Frames waiting in a guest port's queue.
    pub fn queued(&self, id: PortId) -> usize {
        match lock(&self.inner).ports.get(id) {
            Some(Some(Port::Guest(p))) => p.queue.len(),
            _ => 0,
        }
    }

    /// [`Switch::input`] at time `now` (tests and fuzzing move time on to age addresses).
    pub fn input_at(&self, from: PortId, frame: &[u8], now: Instant) {
        lock(&self.inner).input(from, frame, now);
    }
}

impl Inner {
    /// A frame from a guest port (or the uplink, through [`Switch::input`]).
    fn input(&mut self, from: PortId, frame: &[u8], now: Instant) {
        match self.ports.get_mut(from) {
            Some(Some(Port::Guest(p))) => p.stats.tx_frames += 1,
            Some(Some(Port::Uplink { stats, .. })) => stats.tx_frames += 1,
            // A port removed under its handle: nothing to send from.
            _ => return,
        }
        self.forward(from, frame, now);
    }

    fn forward(&mut self, from: PortId, frame: &[u8], now: Instant) {
        if frame.len() < VNET_HDR_LEN + ETH_HLEN || frame.len() > MAX_FRAME_LEN {
            self.stats.invalid += 1;
            tracing::debug!(
                port = from,
                len = frame.len(),
                "virtio-net switch: runt or oversized frame dropped"
            );
            return;
        }
        let eth = &frame[VNET_HDR_LEN..];
        let (dst, src) = (mac_at(eth, 0), mac_at(eth, 6));
        if is_group(&src) || src == [0; 6] {
            self.stats.invalid += 1;
            tracing::debug!(
                port = from,
                src = %MacFmt(src),
                "virtio-net switch: frame from a group or zero address dropped"
            );
            return;
        }
        let limit = if from == UPLINK {
            self.limits.uplink_macs
        } else {
            self.limits.macs_per_port
        };
        self.stats.evicted += self.fdb.learn(src, from, now, limit);
        if is_group(&dst) {
            self.flood(from, frame);
            return;
        }
        let (port, aged) = self.fdb.lookup(&dst, now, self.limits.age);
        if aged {
            self.stats.aged += 1;
        }
        match port {
            Some(to) if to == from => self.stats.filtered += 1,
            Some(to) => {
                self.stats.forwarded += 1;
                self.deliver(to, frame);
            }
            None => self.flood(from, frame),
        }
    }

    fn flood(&mut self, from: PortId, frame: &[u8]) {
        self.stats.flooded += 1;
        for to in 0..self.ports.len() {
            if to != from {
                self.deliver(to, frame);
            }
        }
    }

    /// Hand `frame` to port `to`, its header zeroed.
    fn deliver(&mut self, to: PortId, frame: &[u8]) {
        let Inner {
            ports,
            limits,
            stats,
            pool,
            ..
        } = self;
        match ports.get_mut(to) {
            Some(Some(Port::Uplink {
                backend,
                stats: port,
            })) => {
                let zero = [0u8; VNET_HDR_LEN];
                let bufs = [IoSlice::new(&zero), IoSlice::new(&frame[VNET_HDR_LEN..])];
                loop {
                    match backend.write_frame(&bufs) {
                        Ok(n) if n == frame.len() => {
                            port.rx_frames += 1;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Ok(_) | Err(_) => {
                            // A full tap queue (EAGAIN) or a tap gone down: the frame is lost,
                            // as on a wire.
                            port.rx_dropped += 1;
                            stats.uplink_errors += 1;
                            break;
                        }
                    }
                }
            }
            Some(Some(Port::Guest(port))) => {
                if port.queue.len() >= limits.queue_frames
                    || port.bytes + frame.len() > limits.queue_bytes
                {
                    port.stats.rx_dropped += 1;
                    return;
                }
                let mut buf = pool.pop().unwrap_or_default();
                buf.clear();
                buf.resize(VNET_HDR_LEN, 0);
                buf.extend_from_slice(&frame[VNET_HDR_LEN..]);
                port.bytes += buf.len();
                port.queue.push_back(buf);
                port.stats.rx_frames += 1;
                if port.queue.len() == 1 {
                    // Empty to not empty: wake the device. It drains the queue (or runs out of
                    // guest buffers and waits for the guest's kick), so later frames need no
                    // wake-up of their own.
                    if let Err(e) = port.event.write(1) {
                        tracing::warn!(port = to, "virtio-net switch: cannot wake a port: {e}");
                    }
                }
            }
            _ => {}
        }
    }

    /// Take the next frame queued for guest port `id`.
    fn take(&mut self, id: PortId) -> Option<Vec<u8>> {
        let Some(Some(Port::Guest(port))) = self.ports.get_mut(id) else {
            return None;
        };
        let frame = port.queue.pop_front()?;
        port.bytes -= frame.len();
        Some(frame)
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < POOL_MAX && buf.capacity() <= POOL_BUF_MAX {
            self.pool.push(buf);
        }
    }
}

fn mac_at(eth: &[u8], offset: usize) -> Mac {
    let mut mac = [0; 6];
    mac.copy_from_slice(&eth[offset..offset + 6]);
    mac
}

/// One guest port of a [`Switch`]: the backend of that function's virtio-net device.
pub struct SwitchPort {
    switch: Arc<Switch>,
    id: PortId,
    event: Arc<EventFd>,
}

impl std::fmt::Debug for SwitchPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchPort")
            .field("id", &self.id)
            .field("event", &self.event.as_raw_fd())
            .finish()
    }
}

impl SwitchPort {
    pub fn id(&self) -> PortId {
        self.id
    }

    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    /// Reset the port's eventfd. With a level-triggered watch, call it before the device's
    /// `process_backend`: that reads the queue only while the guest has buffers, and frames
    /// left then wait for the guest's receive kick, not for the eventfd.
    pub fn clear_wake(&self) {
        match self.event.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!(port = self.id, "virtio-net switch: eventfd read: {e}"),
        }
    }

    /// The address assigned to the port.
    pub fn mac(&self) -> Option<Mac> {
        match lock(&self.switch.inner).ports.get(self.id) {
            Some(Some(Port::Guest(p))) => p.mac,
            _ => None,
        }
    }
}

impl Drop for SwitchPort {
    fn drop(&mut self) {
        self.switch.remove_port(self.id);
    }
}

impl AsRawFd for SwitchPort {
    /// The port's eventfd: readable when frames arrive in an empty queue. Watch it
    /// edge-triggered (or see [`SwitchPort::clear_wake`]).
    fn as_raw_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

impl NetBackend for SwitchPort {
    fn read_frame(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let mut inner = lock(&self.switch.inner);
        let frame = match inner.take(self.id) {
            Some(frame) => frame,
            None => {
                // Reset the wake-up, then look again: a frame queued between the two would
                // otherwise wait for the next one. (Queueing happens under the lock held here,
                // so there is none; the order is what keeps this right if that changes.)
                match self.event.read() {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                inner
                    .take(self.id)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?
            }
        };
        // A datagram: what does not fit the buffers is cut off.
        let mut done = 0;
        for b in bufs.iter_mut() {
            let n = b.len().min(frame.len() - done);
            b[..n].copy_from_slice(&frame[done..done + n]);
            done += n;
        }
        inner.recycle(frame);
        Ok(done)
    }

    fn write_frame(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let mut inner = lock(&self.switch.inner);
        let now = Instant::now();
        if let [one] = bufs {
            inner.input(self.id, one, now);
        } else {
            let mut buf = inner.pool.pop().unwrap_or_default();
            buf.clear();
            for b in bufs {
                buf.extend_from_slice(b);
            }
            inner.input(self.id, &buf, now);
            inner.recycle(buf);
        }
        // A switch takes every frame, as a wire does; what it drops it counts.
        Ok(len)
    }

    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        // No offloads are offered (see offloads()), so the driver can ack none.
        Ok(())
    }

    fn offloads(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests;
