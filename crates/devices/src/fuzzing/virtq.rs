//! The driver side of split virtqueues for the virtio harnesses: a few pages of guest memory,
//! rings laid out and filled from fuzz bytes, and the shadow that checks a device after a kick.
//!
//! The shadow predicts only when it can: when no buffer the device may write overlaps a ring,
//! the descriptor table or an indirect table ("strict"), nothing the device does can change
//! the driver's structures, so the heads it must return and the bytes it may touch follow from
//! memory as it was before the kick.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::Input;
use crate::virtio::VirtioInterrupt;
use crate::virtio::dma::PhysMemory;

/// Guest memory: 64 KiB at 0, a hole, 8 KiB at 128 KiB.
pub const LOW: (u64, u64) = (0, 0x1_0000);
pub const HIGH: (u64, u64) = (0x2_0000, 0x2000);
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub fn guest_memory() -> PhysMemory {
    PhysMemory::from_ranges(&[
        (GuestAddress(LOW.0), LOW.1 as usize),
        (GuestAddress(HIGH.0), HIGH.1 as usize),
    ])
    .expect("fuzz guest memory")
}

/// Records what a device signals; `take` clears.
#[derive(Default)]
pub struct Interrupts {
    queues: AtomicU32,
    needs_reset: AtomicBool,
}

impl VirtioInterrupt for Interrupts {
    fn signal_queue(&self, queue: u16) {
        self.queues.fetch_or(1 << (queue % 32), Ordering::SeqCst);
    }

    fn signal_config(&self) {}

    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

impl Interrupts {
    /// (bitmap of signalled queues, whether a reset was asked for) since the last call.
    pub fn take(&self) -> (u32, bool) {
        (
            self.queues.swap(0, Ordering::SeqCst),
            self.needs_reset.swap(false, Ordering::SeqCst),
        )
    }
}

pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub fn read_desc(mem: &PhysMemory, at: u64) -> Option<Desc> {
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(at)).ok()?;
    Some(Desc {
        addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
        len: u32::from_le_bytes(b[8..12].try_into().ok()?),
        flags: u16::from_le_bytes([b[12], b[13]]),
        next: u16::from_le_bytes([b[14], b[15]]),
    })
}

pub fn read_u16(mem: &PhysMemory, at: u64) -> u16 {
    mem.read_obj::<u16>(GuestAddress(at)).unwrap_or(0)
}

pub fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

fn hits(ranges: &[(u64, u64)], at: u64) -> bool {
    ranges.iter().any(|&(a, l)| at >= a && at - a < l)
}

/// One queue as the driver set it up, and the shadow's view of the device's progress.
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    /// The driver's available index.
    pub avail_idx: u16,
    /// The device's next available index as the shadow predicts it; None once it cannot
    /// (until reset).
    pub next_avail: Option<u16>,
    /// The device asked for a reset: it serves nothing more.
    pub broken: bool,
    pub event_idx: bool,
    /// At its default place (inside memory, apart from everything else).
    pub default_place: bool,
}

impl Ring {
    pub fn at(desc: u64, avail: u64, used: u64, default_place: bool) -> Self {
        Self {
            desc,
            avail,
            used,
            size: 1,
            avail_idx: 0,
            next_avail: Some(0),
            broken: false,
            event_idx: false,
            default_place,
        }
    }

    pub fn used_range(&self) -> (u64, u64) {
        (self.used, 6 + 8 * u64::from(self.size))
    }

    pub fn avail_range(&self) -> (u64, u64) {
        (self.avail, 6 + 2 * u64::from(self.size))
    }

    /// The device's queue for this ring: `size` if the transport would take it (else the
    /// maximum stays), ready. Resets the shadow.
    pub fn queue(&mut self, max: u16, size: u16) -> Queue {
        let mut q = Queue::new(max).expect("max size is a power of two");
        // A size the transport refuses leaves the queue at its maximum.
        let _ = q.try_set_size(size);
        self.size = q.size();
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (l, h) = split(self.desc);
        q.set_desc_table_address(l, h);
        let (l, h) = split(self.avail);
        q.set_avail_ring_address(l, h);
        let (l, h) = split(self.used);
        q.set_used_ring_address(l, h);
        q.set_ready(true);
        self.avail_idx = 0;
        self.next_avail = Some(0);
        self.broken = false;
        q
    }
}

/// Guest memory and the rings in it.
pub struct Driver {
    pub mem: PhysMemory,
    pub rings: Vec<Ring>,
}

/// Memory as one flat array: LOW then HIGH.
pub fn address_of(i: usize) -> u64 {
    let i = i as u64;
    if i < LOW.1 {
        LOW.0 + i
    } else {
        HIGH.0 + i - LOW.1
    }
}

/// What the shadow saw before a kick of one ring.
pub struct Before {
    pub memory: Vec<u8>,
    pub writable: Vec<(u64, u64)>,
    pub strict: bool,
    pub used_idx: u16,
    pub used_event: u16,
    pub avail_idx: u16,
    pub heads: Vec<u16>,
}

impl Driver {
    /// A driver write. One that reaches a used ring (the device's side) ends the shadow's
    /// predictions for that ring until reset.
    pub fn write(&mut self, at: u64, bytes: &[u8]) {
        // The guest writing into the hole writes nothing.
        let _ = self.mem.write_slice(bytes, GuestAddress(at));
        for r in &mut self.rings {
            if overlaps(r.used_range(), (at, bytes.len() as u64)) {
                r.next_avail = None;
            }
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; (LOW.1 + HIGH.1) as usize];
        let (lo, hi) = v.split_at_mut(LOW.1 as usize);
        let _ = self.mem.read_slice(lo, GuestAddress(LOW.0));
        let _ = self.mem.read_slice(hi, GuestAddress(HIGH.0));
        v
    }

    /// Entries of the indirect table a descriptor points at (bounded by guest memory).
    pub fn indirect(&self, d: &Desc) -> Vec<Desc> {
        let n = (u64::from(d.len) / 16).min(0x2000 / 16);
        (0..n)
            .map_while(|i| read_desc(&self.mem, d.addr.checked_add(16 * i)?))
            .collect()
    }

    /// Every buffer any device may write, and whether none of them overlaps a ring, a
    /// descriptor table or an indirect table.
    fn writable_and_strict(&self) -> (Vec<(u64, u64)>, bool) {
        let mut writable = Vec::new();
        let mut protected = Vec::new();
        for r in &self.rings {
            protected.extend([
                (r.desc, 16 * u64::from(r.size)),
                r.avail_range(),
                r.used_range(),
            ]);
            for i in 0..u64::from(r.size) {
                let Some(d) = read_desc(&self.mem, r.desc.wrapping_add(16 * i)) else {
                    continue;
                };
                if d.flags & F_INDIRECT != 0 {
                    protected.push((d.addr, u64::from(d.len)));
                    for e in self.indirect(&d) {
                        if e.flags & F_WRITE != 0 && e.len > 0 {
                            writable.push((e.addr, u64::from(e.len)));
                        }
                    }
                }
                if d.flags & F_WRITE != 0 && d.len > 0 {
                    writable.push((d.addr, u64::from(d.len)));
                }
            }
        }
        let strict = writable
            .iter()
            .all(|&w| protected.iter().all(|&p| !overlaps(w, p)));
        (writable, strict)
    }

    /// The buffers of the chain at `head`, as the device may see them: (addr, len, writable),
    /// following `next` and one indirect table. Over-approximates odd chains.
    pub fn chain(&self, q: usize, head: u16) -> Vec<(u64, u32, bool)> {
        let r = &self.rings[q];
        let mut out = Vec::new();
        let mut index = head;
        for _ in 0..=r.size {
            let Some(d) = read_desc(&self.mem, r.desc.wrapping_add(16 * u64::from(index))) else {
                break;
            };
            if d.flags & F_INDIRECT != 0 {
                for e in self.indirect(&d) {
                    out.push((e.addr, e.len, e.flags & F_WRITE != 0));
                }
                break;
            }
            out.push((d.addr, d.len, d.flags & F_WRITE != 0));
            if d.flags & F_NEXT == 0 || d.next >= r.size {
                break;
            }
            index = d.next;
        }
        out
    }

    /// The readable bytes of a plain chain (direct descriptors, no loop, proper end, every
    /// buffer readable and in memory), or None.
    pub fn plain_readable(&self, q: usize, head: u16, max: usize) -> Option<Vec<u8>> {
        let r = &self.rings[q];
        let mut out = Vec::new();
        let mut seen = vec![false; usize::from(r.size)];
        let mut index = head;
        loop {
            let slot = seen.get_mut(usize::from(index))?;
            if *slot {
                return None;
            }
            *slot = true;
            let d = read_desc(&self.mem, r.desc.wrapping_add(16 * u64::from(index)))?;
            if d.flags & (F_INDIRECT | F_WRITE) != 0 {
                return None;
            }
            let n = usize::try_from(d.len).ok()?;
            if out.len() + n > max {
                return None;
            }
            let start = out.len();
            out.resize(start + n, 0);
            self.mem
                .read_slice(&mut out[start..], GuestAddress(d.addr))
                .ok()?;
            if d.flags & F_NEXT == 0 {
                return Some(out);
            }
            index = d.next;
        }
    }

    /// Total writable bytes of the chain at `head` (an upper bound on its used length).
    pub fn writable_bound(&self, q: usize, head: u16) -> u64 {
        self.chain(q, head)
            .iter()
            .filter(|c| c.2)
            .map(|c| u64::from(c.1))
            .sum()
    }

    fn avail_entry(&self, q: usize, i: u16) -> u16 {
        let r = &self.rings[q];
        read_u16(
            &self.mem,
            r.avail.wrapping_add(4 + 2 * u64::from(i % r.size.max(1))),
        )
    }

    pub fn used_entry(&self, q: usize, i: u16) -> (u16, u32) {
        let r = &self.rings[q];
        let at = r.used.wrapping_add(4 + 8 * u64::from(i % r.size.max(1)));
        let id = self.mem.read_obj::<u32>(GuestAddress(at)).unwrap_or(0);
        let len = self
            .mem
            .read_obj::<u32>(GuestAddress(at.wrapping_add(4)))
            .unwrap_or(0);
        // Ids above u16 are wrong anyway; keep them visible as such.
        (u16::try_from(id).unwrap_or(u16::MAX), len)
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        read_u16(&self.mem, self.rings[q].used.wrapping_add(2))
    }

    /// Look at everything before kicking queue `q` of a device that is `active`.
    pub fn before(&self, q: usize, active: bool) -> Before {
        let r = &self.rings[q];
        let (writable, strict) = self.writable_and_strict();
        Before {
            memory: self.snapshot(),
            writable,
            strict: strict && active && self.rings.iter().all(|r| r.default_place),
            used_idx: self.used_idx(q),
            used_event: read_u16(&self.mem, r.avail.wrapping_add(4 + 2 * u64::from(r.size))),
            avail_idx: read_u16(&self.mem, r.avail.wrapping_add(2)),
            heads: (0..r.size).map(|i| self.avail_entry(q, i)).collect(),
        }
    }

    /// The device wrote only into writable buffers and used rings.
    pub fn check_writes(&self, before: &Before) {
        let after = self.snapshot();
        let used: Vec<_> = self.rings.iter().map(Ring::used_range).collect();
        const CHUNK: usize = 256;
        let chunks = before.memory.chunks(CHUNK).zip(after.chunks(CHUNK));
        for (c, (a, b)) in chunks.enumerate() {
            if a == b {
                continue;
            }
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let at = address_of(c * CHUNK + i);
                assert!(
                    x == y || hits(&before.writable, at) || hits(&used, at),
                    "device wrote {at:#x}"
                );
            }
        }
    }

    /// After a kick of ring `q` served in available order (one used entry per chain, in
    /// order, as `VirtioCommon::process_queue` does): check heads, lengths, the reset request,
    /// the interrupt and where the device wrote. Returns the heads served under the shadow.
    pub fn check_in_order(
        &mut self,
        q: usize,
        before: &Before,
        signalled: bool,
        needs_reset: bool,
    ) -> Vec<u16> {
        let Some(next) = self.rings[q].next_avail.filter(|_| before.strict) else {
            let r = &mut self.rings[q];
            r.next_avail = None;
            r.broken |= needs_reset;
            return Vec::new();
        };
        let r = &self.rings[q];
        let size = r.size;
        // The pending heads in order, up to the first one outside the queue.
        let pending = before.avail_idx.wrapping_sub(next);
        let (consumed, fault) = if r.broken {
            (0, false)
        } else if pending > size {
            (0, true)
        } else {
            let valid = (0..pending)
                .take_while(|&k| before.heads[usize::from(next.wrapping_add(k) % size)] < size)
                .count() as u16;
            (valid, valid < pending)
        };
        assert_eq!(needs_reset, !r.broken && fault, "needs reset");
        let used_after = self.used_idx(q);
        assert_eq!(
            used_after.wrapping_sub(before.used_idx),
            consumed,
            "used entries"
        );
        let mut served = Vec::new();
        for k in 0..consumed {
            let head = before.heads[usize::from(next.wrapping_add(k) % size)];
            let (id, len) = self.used_entry(q, before.used_idx.wrapping_add(k));
            assert_eq!(id, head, "used entry {k}");
            assert!(
                u64::from(len) <= self.writable_bound(q, head),
                "used length {len} for head {head}"
            );
            served.push(head);
        }
        let notify = if r.event_idx {
            used_after.wrapping_sub(before.used_event).wrapping_sub(1) < consumed
        } else {
            true
        };
        let want_signal = consumed > 0 && !fault && !r.broken && notify;
        assert_eq!(signalled, want_signal, "queue interrupt");
        self.check_writes(before);
        let r = &mut self.rings[q];
        r.next_avail = Some(next.wrapping_add(consumed));
        r.broken |= needs_reset;
        served
    }
}

/// A buffer address: mostly in the data area, sometimes in the second region, a ring, the
/// hole or anywhere.
pub fn address(input: &mut Input, data: u64) -> u64 {
    match input.u8() % 10 {
        0..=5 => data + u64::from(input.u16()) % (LOW.1 - data),
        6 => HIGH.0 + u64::from(input.u16()) % HIGH.1,
        7 => input.pick(&[0, 0x1000, 0x2000, LOW.1 - 1, HIGH.0 + HIGH.1 - 8, 0x1_8000]),
        _ => input.u64(),
    }
}

pub fn length(input: &mut Input) -> u32 {
    match input.u8() % 8 {
        0 => 16,
        1 => 1,
        2 => 512 * u32::from(input.u8() % 9),
        3 => 32,
        4 | 5 => u32::from(input.u16()),
        _ => input.u32(),
    }
}

pub fn descriptor(input: &mut Input, size: u16, data: u64) -> [u8; 16] {
    let addr = address(input, data);
    let len = length(input);
    let flags = if input.u8() % 16 == 0 {
        input.u16()
    } else {
        u16::from(input.u8() & 7)
    };
    let next = if input.u8() % 16 == 0 {
        input.u16()
    } else {
        input.u16() % size.max(1)
    };
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// The driver operations every virtio harness shares, on ring `q`: `op` in 0..8. Returns
/// false for an `op` it does not know.
pub fn driver_op(drv: &mut Driver, q: usize, op: u8, input: &mut Input, data: u64) -> bool {
    let size = drv.rings[q].size;
    match op {
        // A descriptor in the table.
        0..=2 => {
            let i = if input.u8() % 16 == 0 {
                input.u16()
            } else {
                input.u16() % size
            };
            let d = descriptor(input, size, data);
            let at = drv.rings[q].desc.wrapping_add(16 * u64::from(i));
            drv.write(at, &d);
        }
        // Publish a head.
        3 | 4 => {
            let head = if input.u8() % 16 == 0 {
                input.u16()
            } else {
                input.u16() % size
            };
            let r = &mut drv.rings[q];
            let slot = r.avail.wrapping_add(4 + 2 * u64::from(r.avail_idx % size));
            r.avail_idx = r.avail_idx.wrapping_add(1);
            let (idx_at, idx) = (r.avail.wrapping_add(2), r.avail_idx);
            drv.write(slot, &head.to_le_bytes());
            drv.write(idx_at, &idx.to_le_bytes());
        }
        // An indirect table.
        5 => {
            let at = address(input, data);
            let n = input.u8() % 8 + 1;
            for k in 0..u64::from(n) {
                let d = descriptor(input, u16::from(n), data);
                drv.write(at.wrapping_add(16 * k), &d);
            }
        }
        // Raw bytes anywhere, rings included.
        6 => {
            let at = address(input, data);
            let bytes = input.bytes(32);
            drv.write(at, bytes);
        }
        // The available index or used_event, as anything.
        7 => {
            let r = &mut drv.rings[q];
            if input.bool() {
                r.avail_idx = input.u16();
                let (at, idx) = (r.avail.wrapping_add(2), r.avail_idx);
                drv.write(at, &idx.to_le_bytes());
            } else {
                let at = r.avail.wrapping_add(4 + 2 * u64::from(size));
                let v = input.u16();
                drv.write(at, &v.to_le_bytes());
            }
        }
        _ => return false,
    }
    true
}
