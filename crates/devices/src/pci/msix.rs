//! MSI-X (PCI Local Bus 3.0 6.8.2, PCIe 6.0 7.7.2): the capability, the vector table and the
//! pending bit array, with per-vector and function masking.
//!
//! The device keeps the guest-visible state; delivery goes through [`MsiInterrupts`], which the
//! VMM implements with one irqfd and one GSI route per vector, so that a trigger is one eventfd
//! write. The state sits behind a lock shared with [`MsixHandle`]s, so a queue worker can raise
//! a vector while a vCPU masks it, and the two agree on the pending bit.

use std::io;
use std::sync::{Arc, Mutex};

use super::capability::Capability;
use super::{AddressSpace, ConfigSpace, PciError, cap_id, le_value, put_le};
use crate::bus::lock;
use crate::interrupt::IrqLine;

/// Bytes per table entry: message address low, high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// The most vectors a function can have.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// The capability's registers (relative to its offset).
const CONTROL: u16 = 2;
const TABLE: usize = 4;
const PBA: usize = 8;
const CAP_LEN: usize = 12;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// An MSI message: a memory write of `data` to `address` (on x86, 0xFEEx_xxxx: the local APIC).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// How MSI-X vectors reach the guest. The VMM implements it (an irqfd per vector, bound to a
/// GSI with an MSI route); tests record.
pub trait MsiInterrupts: Send + Sync {
    /// The route of `vector` changed: `Some` when it can be delivered with this message (MSI-X
    /// on, function and vector unmasked), `None` when it cannot. Called only on a change.
    fn update(&self, vector: u16, msg: Option<MsiMessage>) -> io::Result<()>;

    /// Raise `vector`. Only called for a vector whose last update was `Some`.
    fn trigger(&self, vector: u16) -> io::Result<()>;
}

/// Where a structure lives: BAR index and offset (8-byte aligned) in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarLocation {
    pub bar: u8,
    pub offset: u32,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
    /// What [`MsiInterrupts::update`] last accepted for this vector.
    routed: Option<MsiMessage>,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_lo) | (u64::from(self.addr_hi) << 32),
            data: self.data,
        }
    }
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

impl State {
    fn pending(&self, v: usize) -> bool {
        self.pending
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if let Some(w) = self.pending.get_mut(v / 64) {
            if on {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    fn active(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.entries.get(v).is_some_and(|e| !e.masked())
    }

    /// Bring vector `v`'s route in line with its state, and deliver it if it is pending and
    /// now unmasked (once: the pending bit is cleared).
    fn sync(&mut self, v: usize, irq: &dyn MsiInterrupts) {
        let active = self.active(v);
        let Some(e) = self.entries.get_mut(v) else {
            return;
        };
        let want = active.then(|| e.message());
        let vector = v as u16;
        if want != e.routed {
            match irq.update(vector, want) {
                Ok(()) => e.routed = want,
                Err(err) => tracing::warn!(vector, "MSI-X route update failed: {err}"),
            }
        }
        if active && self.pending(v) {
            self.set_pending(v, false);
            if let Err(err) = irq.trigger(vector) {
                tracing::warn!(vector, "MSI-X delivery failed: {err}");
            }
        }
    }

    fn trigger(&mut self, vector: u16, irq: &dyn MsiInterrupts) -> io::Result<()> {
        let v = usize::from(vector);
        if v >= self.entries.len() {
            tracing::debug!(vector, "trigger of a vector beyond the MSI-X table dropped");
            return Ok(());
        }
        if !self.enabled {
            // With MSI-X off a function would signal INTx instead; we have none, and a stale
            // pending bit would fire spuriously at the next enable.
            return Ok(());
        }
        if self.function_masked || self.entries[v].masked() {
            self.set_pending(v, true);
            return Ok(());
        }
        irq.trigger(vector)
    }
}

struct Shared {
    state: Mutex<State>,
    irq: Arc<dyn MsiInterrupts>,
}

/// The MSI-X capability, table and PBA of one function.
pub struct Msix {
    cap: u16,
    table: BarLocation,
    pba: BarLocation,
    vectors: u16,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("cap", &self.cap)
            .field("vectors", &self.vectors)
            .field("table", &self.table)
            .field("pba", &self.pba)
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// Add the capability to `config` for `vectors` vectors, with the table and PBA at the
    /// given places in memory BARs that `config` already declares.
    pub fn new(
        config: &mut ConfigSpace,
        vectors: u16,
        table: BarLocation,
        pba: BarLocation,
        irq: Arc<dyn MsiInterrupts>,
    ) -> Result<Self, PciError> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(PciError::MsixVectors(vectors));
        }
        let table_len = u64::from(vectors) * MSIX_ENTRY_SIZE;
        let pba_len = u64::from(vectors).div_ceil(64) * 8;
        let fits = |loc: BarLocation, len: u64| {
            loc.offset % 8 == 0
                && config.bar(loc.bar).is_some_and(|b| {
                    b.space() == AddressSpace::Memory && u64::from(loc.offset) + len <= b.size
                })
        };
        let placement = |what, loc: BarLocation| PciError::MsixPlacement {
            what,
            bar: loc.bar,
            offset: loc.offset,
        };
        if !fits(table, table_len) {
            return Err(placement("table", table));
        }
        let (t0, p0) = (u64::from(table.offset), u64::from(pba.offset));
        let overlap = table.bar == pba.bar && t0 < p0 + pba_len && p0 < t0 + table_len;
        if !fits(pba, pba_len) || overlap {
            return Err(placement("PBA", pba));
        }

        let mut cap = Capability::standard(cap_id::MSIX, CAP_LEN);
        cap.set_u16(CONTROL.into(), vectors - 1);
        cap.writable(
            CONTROL.into(),
            2,
            (CONTROL_ENABLE | CONTROL_FUNCTION_MASK).into(),
        );
        cap.set_u32(TABLE, table.offset | u32::from(table.bar));
        cap.set_u32(PBA, pba.offset | u32::from(pba.bar));
        let offset = config.add_capability(&cap)?;

        // Vectors start masked (the spec's reset value), so nothing fires before the guest
        // programs them.
        let entry = Entry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: VECTOR_MASKED,
            routed: None,
        };
        let state = State {
            entries: vec![entry; usize::from(vectors)],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            enabled: false,
            function_masked: false,
        };
        Ok(Self {
            cap: offset,
            table,
            pba,
            vectors,
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                irq,
            }),
        })
    }

    /// The capability's offset in config space.
    pub fn capability_offset(&self) -> u16 {
        self.cap
    }

    pub fn vectors(&self) -> u16 {
        self.vectors
    }

    /// A cloneable handle that raises vectors from any thread.
    pub fn handle(&self) -> MsixHandle {
        MsixHandle {
            shared: self.shared.clone(),
        }
    }

    /// Raise `vector` (or mark it pending if masked).
    pub fn trigger(&self, vector: u16) -> io::Result<()> {
        self.handle().trigger(vector)
    }

    pub fn enabled(&self) -> bool {
        lock(&self.shared.state).enabled
    }

    pub fn masked(&self, vector: u16) -> bool {
        !lock(&self.shared.state).active(usize::from(vector))
    }

    pub fn pending(&self, vector: u16) -> bool {
        lock(&self.shared.state).pending(usize::from(vector))
    }

    /// Call after every guest config write: picks up the enable and function-mask bits from
    /// the message control register, updating routes and delivering what became unmasked.
    pub fn config_written(&self, config: &ConfigSpace) {
        let control = config.read_u16(self.cap + CONTROL);
        let enabled = control & CONTROL_ENABLE != 0;
        let function_masked = control & CONTROL_FUNCTION_MASK != 0;
        let mut st = lock(&self.shared.state);
        if st.enabled == enabled && st.function_masked == function_masked {
            return;
        }
        st.enabled = enabled;
        st.function_masked = function_masked;
        for v in 0..st.entries.len() {
            st.sync(v, &*self.shared.irq);
        }
    }

    /// Serve a BAR read if it falls in the table or the PBA; returns whether it did.
    pub fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        if let Some(off) = self.within(self.table, self.table_len(), bar, offset) {
            self.table_read(off, data);
            true
        } else if let Some(off) = self.within(self.pba, self.pba_len(), bar, offset) {
            self.pba_read(off, data);
            true
        } else {
            false
        }
    }

    /// Serve a BAR write if it falls in the table or the PBA; returns whether it did.
    pub fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> bool {
        if let Some(off) = self.within(self.table, self.table_len(), bar, offset) {
            self.table_write(off, data);
            true
        } else {
            // The PBA is read-only.
            self.within(self.pba, self.pba_len(), bar, offset).is_some()
        }
    }

    fn table_len(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }

    fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }

    fn within(&self, loc: BarLocation, len: u64, bar: u8, offset: u64) -> Option<u64> {
        let off = offset.checked_sub(loc.offset.into())?;
        (bar == loc.bar && off < len).then_some(off)
    }

    /// A read at `offset` in the table. Only aligned dword and qword accesses are defined;
    /// others, and anything past the table, read as zero.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !aligned(offset, data.len()) {
            tracing::debug!(offset, len = data.len(), "misaligned MSI-X table read");
            return;
        }
        let st = lock(&self.shared.state);
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            let off = offset + 4 * k as u64;
            let Some(e) = usize::try_from(off / MSIX_ENTRY_SIZE)
                .ok()
                .and_then(|v| st.entries.get(v))
            else {
                continue;
            };
            let value = match off % MSIX_ENTRY_SIZE {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                _ => e.control,
            };
            put_le(chunk, value.into());
        }
    }

    /// A write at `offset` in the table: aligned dwords and qwords only, the rest is dropped.
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        if !aligned(offset, data.len()) {
            tracing::debug!(
                offset,
                len = data.len(),
                "misaligned MSI-X table write dropped"
            );
            return;
        }
        let mut st = lock(&self.shared.state);
        let mut touched = None;
        for (k, chunk) in data.chunks(4).enumerate() {
            let off = offset + 4 * k as u64;
            let Some(v) = usize::try_from(off / MSIX_ENTRY_SIZE)
                .ok()
                .filter(|&v| v < st.entries.len())
            else {
                tracing::debug!(offset, "MSI-X table write past the table dropped");
                continue;
            };
            let value = le_value(chunk) as u32;
            let e = &mut st.entries[v];
            match off % MSIX_ENTRY_SIZE {
                // The address is dword aligned: its low two bits are read-only zero.
                0 => e.addr_lo = value & !3,
                4 => e.addr_hi = value,
                8 => e.data = value,
                // Bits other than the mask are reserved.
                _ => e.control = value & VECTOR_MASKED,
            }
            touched = Some(v);
        }
        // A qword write stays within one entry, so at most one vector changed.
        if let Some(v) = touched {
            st.sync(v, &*self.shared.irq);
        }
    }

    /// A read at `offset` in the PBA (aligned dwords and qwords; the rest reads as zero).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !aligned(offset, data.len()) {
            return;
        }
        let st = lock(&self.shared.state);
        let word = usize::try_from(offset / 8)
            .ok()
            .and_then(|i| st.pending.get(i).copied())
            .unwrap_or(0);
        put_le(data, word >> (8 * (offset % 8)));
    }
}

fn aligned(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset % len as u64 == 0
}

/// Raises vectors of one function's MSI-X from any thread (a queue worker, the event loop).
#[derive(Clone)]
pub struct MsixHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MsixHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixHandle").finish_non_exhaustive()
    }
}

impl MsixHandle {
    /// Deliver `vector`, or set its pending bit if it (or the function) is masked. Dropped when
    /// MSI-X is off or the vector does not exist (virtio's NO_VECTOR, 0xFFFF, among them).
    pub fn trigger(&self, vector: u16) -> io::Result<()> {
        lock(&self.shared.state).trigger(vector, &*self.shared.irq)
    }

    /// One vector as an [`IrqLine`].
    pub fn line(&self, vector: u16) -> MsixLine {
        MsixLine {
            handle: self.clone(),
            vector,
        }
    }
}

/// One MSI-X vector as an [`IrqLine`].
#[derive(Clone, Debug)]
pub struct MsixLine {
    handle: MsixHandle,
    vector: u16,
}

impl IrqLine for MsixLine {
    fn trigger(&self) -> io::Result<()> {
        self.handle.trigger(self.vector)
    }
}

/// What a [`RecordingMsi`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiEvent {
    Update(u16, Option<MsiMessage>),
    Trigger(u16),
}

/// Records every update and trigger: the test double for [`MsiInterrupts`].
#[derive(Default, Debug)]
pub struct RecordingMsi(Mutex<Vec<MsiEvent>>);

impl RecordingMsi {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Everything seen since the last call.
    pub fn take(&self) -> Vec<MsiEvent> {
        std::mem::take(&mut *lock(&self.0))
    }
}

impl MsiInterrupts for RecordingMsi {
    fn update(&self, vector: u16, msg: Option<MsiMessage>) -> io::Result<()> {
        lock(&self.0).push(MsiEvent::Update(vector, msg));
        Ok(())
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        lock(&self.0).push(MsiEvent::Trigger(vector));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::testutil::XorShift;
    use crate::pci::{BarKind, PciIds};
    use MsiEvent::{Trigger, Update};

    const TABLE_BAR: u8 = 0;

    fn setup(vectors: u16) -> (ConfigSpace, Msix, Arc<RecordingMsi>) {
        let mut c = ConfigSpace::endpoint(&PciIds::default());
        c.add_bar(TABLE_BAR, BarKind::Mem64, 0x4000, false).unwrap();
        let rec = RecordingMsi::new();
        let m = Msix::new(
            &mut c,
            vectors,
            BarLocation {
                bar: TABLE_BAR,
                offset: 0x2000,
            },
            BarLocation {
                bar: TABLE_BAR,
                offset: 0x3000,
            },
            rec.clone(),
        )
        .unwrap();
        (c, m, rec)
    }

    fn control(c: &mut ConfigSpace, m: &Msix, value: u16) {
        let _ = c.write(m.capability_offset() + CONTROL, &value.to_le_bytes());
        m.config_written(c);
    }

    fn program(m: &Msix, v: u16, addr: u32, data: u32, masked: bool) {
        let base = u64::from(v) * 16;
        m.table_write(base, &addr.to_le_bytes());
        m.table_write(base + 4, &0u32.to_le_bytes());
        m.table_write(base + 8, &data.to_le_bytes());
        m.table_write(base + 12, &u32::from(masked).to_le_bytes());
    }

    fn msg(addr: u32, data: u32) -> Option<MsiMessage> {
        Some(MsiMessage {
            address: addr.into(),
            data,
        })
    }

    fn rd32(m: &Msix, off: u64) -> u32 {
        let mut b = [0u8; 4];
        m.table_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn capability_bytes() {
        let (c, m, _) = setup(3);
        let cap = m.capability_offset();
        assert_eq!(c.find_capability(cap_id::MSIX), Some(cap));
        assert_eq!(c.read_u32(cap), 0x0002_0011);
        assert_eq!(c.read_u32(cap + 4), 0x2000);
        assert_eq!(c.read_u32(cap + 8), 0x3000);
        // Table size is read-only; only enable and function mask are writable.
        let mut c = c;
        let _ = c.write(cap + 2, &[0xff, 0xff]);
        assert_eq!(c.read_u16(cap + 2), 0xc002);
        let _ = c.write(cap + 4, &[0xff; 8]);
        assert_eq!(c.read_u32(cap + 4), 0x2000);
    }

    #[test]
    fn placement_checked() {
        let mut c = ConfigSpace::endpoint(&PciIds::default());
        c.add_bar(0, BarKind::Mem32, 0x1000, false).unwrap();
        c.add_bar(1, BarKind::Io, 0x100, false).unwrap();
        let rec: Arc<dyn MsiInterrupts> = RecordingMsi::new();
        let at = |bar, offset| BarLocation { bar, offset };
        let mut try_new = |n, t, p| Msix::new(&mut c, n, t, p, rec.clone()).map(|_| ());
        assert_eq!(
            try_new(0, at(0, 0), at(0, 0x800)),
            Err(PciError::MsixVectors(0))
        );
        assert!(try_new(2049, at(0, 0), at(0, 0x800)).is_err());
        // Table past the BAR, in a missing BAR, in an I/O BAR, misaligned.
        assert!(try_new(129, at(0, 0), at(0, 0x800)).is_err());
        assert!(try_new(1, at(2, 0), at(0, 0x800)).is_err());
        assert!(try_new(1, at(1, 0), at(0, 0x800)).is_err());
        assert!(try_new(1, at(0, 4), at(0, 0x800)).is_err());
        // PBA overlapping the table.
        assert!(try_new(4, at(0, 0), at(0, 0x38)).is_err());
        try_new(4, at(0, 0), at(0, 0x40)).unwrap();
    }

    #[test]
    fn table_bytes_and_reset_state() {
        let (_c, m, rec) = setup(2);
        // Every vector starts masked with a zero message.
        assert_eq!(rd32(&m, 12), 1);
        assert_eq!(rd32(&m, 16 + 12), 1);
        program(&m, 1, 0xfee0_1003, 0x4041, false);
        assert_eq!(rd32(&m, 16), 0xfee0_1000);
        assert_eq!(rd32(&m, 24), 0x4041);
        assert_eq!(rd32(&m, 28), 0);
        // Reserved control bits stay zero.
        m.table_write(28, &0xffff_fffeu32.to_le_bytes());
        assert_eq!(rd32(&m, 28), 0);
        // A qword access.
        m.table_write(16, &0x0000_0001_fee0_2000u64.to_le_bytes());
        let mut q = [0u8; 8];
        m.table_read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x0000_0001_fee0_2000);
        // MSI-X is off: no routes yet.
        assert_eq!(rec.take(), []);
    }

    #[test]
    fn masking_pending_and_unmask_delivery() {
        let (mut c, m, rec) = setup(4);
        program(&m, 0, 0xfee0_0000, 0x30, false);
        program(&m, 1, 0xfee0_0000, 0x31, true);
        // Off: a trigger is dropped, nothing pending.
        m.trigger(0).unwrap();
        assert!(!m.pending(0));
        assert_eq!(rec.take(), []);

        // Enable with the function masked (what Linux does), then unmask the function.
        control(&mut c, &m, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert_eq!(rec.take(), []);
        m.trigger(0).unwrap();
        assert!(m.pending(0));
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 1);
        control(&mut c, &m, CONTROL_ENABLE);
        assert_eq!(rec.take(), [Update(0, msg(0xfee0_0000, 0x30)), Trigger(0)]);
        assert!(!m.pending(0));
        // Delivered once only.
        control(&mut c, &m, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        control(&mut c, &m, CONTROL_ENABLE);
        assert_eq!(
            rec.take(),
            [Update(0, None), Update(0, msg(0xfee0_0000, 0x30))]
        );

        // Unmasked: straight through.
        m.trigger(0).unwrap();
        assert_eq!(rec.take(), [Trigger(0)]);

        // A masked vector gets its pending bit; unmasking it delivers once.
        m.trigger(1).unwrap();
        m.trigger(1).unwrap();
        assert!(m.pending(1));
        assert_eq!(rec.take(), []);
        m.table_write(16 + 12, &0u32.to_le_bytes());
        assert_eq!(rec.take(), [Update(1, msg(0xfee0_0000, 0x31)), Trigger(1)]);
        m.table_write(16 + 12, &0u32.to_le_bytes());
        assert_eq!(rec.take(), []);

        // A new message on an unmasked vector re-routes it.
        m.table_write(16 + 8, &0x41u32.to_le_bytes());
        assert_eq!(rec.take(), [Update(1, msg(0xfee0_0000, 0x41))]);

        // Masking the vector: route off, trigger pends.
        m.table_write(12, &1u32.to_le_bytes());
        m.trigger(0).unwrap();
        assert_eq!(rec.take(), [Update(0, None)]);
        assert!(m.pending(0));

        // Disabling MSI-X stops delivery: routes go, triggers are dropped.
        control(&mut c, &m, 0);
        assert_eq!(rec.take(), [Update(1, None)]);
        m.trigger(1).unwrap();
        assert_eq!(rec.take(), []);
        assert!(!m.enabled());

        // Out-of-range vectors are dropped.
        control(&mut c, &m, CONTROL_ENABLE);
        rec.take();
        m.trigger(4).unwrap();
        m.trigger(0xffff).unwrap();
        assert_eq!(rec.take(), []);
    }

    #[test]
    fn handle_and_line_from_another_thread() {
        let (mut c, m, rec) = setup(2);
        program(&m, 1, 0xfee0_0000, 0x22, false);
        control(&mut c, &m, CONTROL_ENABLE);
        rec.take();
        let line = m.handle().line(1);
        std::thread::spawn(move || line.trigger().unwrap())
            .join()
            .unwrap();
        assert_eq!(rec.take(), [Trigger(1)]);
    }

    #[test]
    fn odd_accesses_ignored() {
        let (_c, m, _rec) = setup(2);
        program(&m, 0, 0xfee0_0000, 0x30, false);
        let before: Vec<u32> = (0..8).map(|i| rd32(&m, i * 4)).collect();
        // Misaligned, wrong sizes, past the table.
        m.table_write(1, &[0xff; 4]);
        m.table_write(4, &[0xff; 8]);
        m.table_write(0, &[0xff; 2]);
        m.table_write(0, &[0xff; 1]);
        m.table_write(0, &[]);
        m.table_write(32, &[0xff; 4]);
        m.table_write(u64::MAX - 3, &[0xff; 4]);
        let after: Vec<u32> = (0..8).map(|i| rd32(&m, i * 4)).collect();
        assert_eq!(before, after);
        let mut b = [0xaau8; 4];
        m.table_read(2, &mut b);
        assert_eq!(b, [0; 4]);
        let mut b = [0xaau8; 2];
        m.table_read(0, &mut b);
        assert_eq!(b, [0; 2]);
        let mut b = [0xaau8; 4];
        m.table_read(1 << 40, &mut b);
        assert_eq!(b, [0; 4]);
        m.pba_read(u64::MAX - 7, &mut b);
        assert_eq!(b, [0; 4]);
        // Through the BAR dispatch: inside the BAR but outside both structures is not ours.
        assert!(!m.bar_read(TABLE_BAR, 0x1000, &mut b));
        assert!(!m.bar_read(1, 0x2000, &mut b));
        assert!(m.bar_read(TABLE_BAR, 0x2000, &mut b));
        assert!(m.bar_write(TABLE_BAR, 0x3000, &[0xff; 8]));
        assert!(!m.bar_write(TABLE_BAR, 0x2020, &[0xff; 4]));
    }

    #[test]
    fn pba_words() {
        let (mut c, m, _rec) = setup(70);
        control(&mut c, &m, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(1).unwrap();
        m.trigger(33).unwrap();
        m.trigger(69).unwrap();
        let mut b = [0u8; 4];
        m.pba_read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2);
        m.pba_read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2);
        let mut q = [0u8; 8];
        m.pba_read(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 1 << 5);
        m.pba_read(16, &mut q);
        assert_eq!(q, [0; 8]);
    }

    /// A shadow model checked against random table, PBA and control accesses: every trigger
    /// either reaches the recorder (unmasked) or sets the pending bit, and an unmask delivers a
    /// pending vector exactly once.
    #[test]
    fn random_accesses_match_model() {
        let (mut c, m, rec) = setup(9);
        let mut rng = XorShift(0x5eed_1234_abcd_0001);
        let mut masked = [true; 9];
        let (mut enabled, mut fmask) = (false, false);
        let mut pending = [false; 9];
        let mut late = 0;
        for _ in 0..20_000 {
            match rng.below(6) {
                0 => {
                    let v = rng.below(12) as u16;
                    m.trigger(v).unwrap();
                    let vi = usize::from(v);
                    let got = rec.take();
                    if vi >= 9 || !enabled {
                        assert!(got.is_empty());
                    } else if fmask || masked[vi] {
                        assert!(got.is_empty());
                        pending[vi] = true;
                    } else {
                        assert_eq!(got, [Trigger(v)]);
                    }
                }
                1 => {
                    let v = rng.below(9) as usize;
                    let mask = rng.below(2) == 0;
                    m.table_write(v as u64 * 16 + 12, &u32::from(mask).to_le_bytes());
                    masked[v] = mask;
                    let delivered = rec.take().contains(&Trigger(v as u16));
                    let expect = enabled && !fmask && !mask && pending[v];
                    assert_eq!(delivered, expect);
                    if expect {
                        pending[v] = false;
                        late += 1;
                    }
                }
                2 => {
                    let value = rng.next() as u16 & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
                    control(&mut c, &m, value);
                    enabled = value & CONTROL_ENABLE != 0;
                    fmask = value & CONTROL_FUNCTION_MASK != 0;
                    let got = rec.take();
                    for v in 0..9 {
                        let delivered = got.contains(&Trigger(v as u16));
                        let expect = enabled && !fmask && !masked[v] && pending[v];
                        assert_eq!(delivered, expect);
                        if expect {
                            pending[v] = false;
                            late += 1;
                        }
                    }
                }
                3 => {
                    // Random junk anywhere in the BAR.
                    let off = rng.below(0x4100);
                    let len = [0, 1, 2, 3, 4, 8][rng.below(6) as usize];
                    let data = rng.next().to_le_bytes();
                    // Writes stay off the vector control dwords, which the model tracks.
                    if off % 16 + len as u64 <= 12 {
                        let _ = m.bar_write(TABLE_BAR, off, &data[..len]);
                    } else {
                        let mut buf = [0u8; 8];
                        let _ = m.bar_read(TABLE_BAR, off, &mut buf[..len]);
                    }
                    rec.take();
                }
                _ => {
                    let mut q = [0u8; 8];
                    m.pba_read(0, &mut q);
                    let bits = u64::from_le_bytes(q);
                    for (v, p) in pending.iter().enumerate() {
                        assert_eq!(bits & (1 << v) != 0, *p, "vector {v}");
                    }
                }
            }
        }
        assert!(late > 100, "only {late} pending deliveries");
    }
}
