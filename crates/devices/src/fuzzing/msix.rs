//! MSI-X: table and PBA accesses, capability control writes (enable, function mask) through
//! config space, and triggers.
//!
//! Shadow model: each vector's message and mask, the pending bits, enable and function mask,
//! and the route last given to [`MsiInterrupts::update`]. After every step the model predicts
//! exactly which updates and deliveries the recorder saw, and what table and PBA reads return.
//!
//! [`MsiInterrupts::update`]: crate::pci::MsiInterrupts::update

use super::{Input, le};
use crate::pci::msix::{MSIX_ENTRY_SIZE, MsiEvent, RecordingMsi};
use crate::pci::{BarKind, BarLocation, ConfigSpace, MsiMessage, Msix, PciIds};

const TABLE_BAR: u8 = 0;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;

#[derive(Clone, Copy, Default)]
struct Vector {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    masked: bool,
    pending: bool,
    routed: Option<MsiMessage>,
}

struct Model {
    vectors: Vec<Vector>,
    enabled: bool,
    function_masked: bool,
}

impl Model {
    fn active(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && !self.vectors[v].masked
    }

    /// What the device must report after a state change: for every vector in order, a route
    /// update if deliverability or the message changed, then a delivery if it is pending and
    /// now deliverable.
    fn sync(&mut self) -> Vec<MsiEvent> {
        let mut events = Vec::new();
        for v in 0..self.vectors.len() {
            let active = self.active(v);
            let e = &mut self.vectors[v];
            let want = active.then_some(MsiMessage {
                address: u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32),
                data: e.data,
            });
            if want != e.routed {
                events.push(MsiEvent::Update(v as u16, want));
                e.routed = want;
            }
            if active && e.pending {
                e.pending = false;
                events.push(MsiEvent::Trigger(v as u16));
            }
        }
        events
    }

    /// Apply a guest write of `data` at `offset` of the table (aligned dwords and qwords only).
    fn table_write(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || offset % data.len() as u64 != 0 {
            return;
        }
        for (k, chunk) in data.chunks(4).enumerate() {
            let off = offset + 4 * k as u64;
            let Some(e) = usize::try_from(off / MSIX_ENTRY_SIZE)
                .ok()
                .and_then(|v| self.vectors.get_mut(v))
            else {
                continue;
            };
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            match off % MSIX_ENTRY_SIZE {
                0 => e.addr_lo = value & !3,
                4 => e.addr_hi = value,
                8 => e.data = value,
                _ => e.masked = value & 1 != 0,
            }
        }
    }

    /// What a table read returns.
    fn table_read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        if !matches!(len, 4 | 8) || offset % len as u64 != 0 {
            return out;
        }
        for (k, chunk) in out.chunks_mut(4).enumerate() {
            let off = offset + 4 * k as u64;
            let Some(e) = usize::try_from(off / MSIX_ENTRY_SIZE)
                .ok()
                .and_then(|v| self.vectors.get(v))
            else {
                continue;
            };
            let value = match off % MSIX_ENTRY_SIZE {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                _ => u32::from(e.masked),
            };
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        out
    }

    fn pba_read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        if !matches!(len, 4 | 8) || offset % len as u64 != 0 {
            return out;
        }
        for (i, b) in out.iter_mut().enumerate() {
            let first = (offset + i as u64).saturating_mul(8);
            for bit in 0..8 {
                let v = first.saturating_add(bit);
                if usize::try_from(v)
                    .ok()
                    .and_then(|v| self.vectors.get(v))
                    .is_some_and(|e| e.pending)
                {
                    *b |= 1 << bit;
                }
            }
        }
        out
    }
}

/// The message control bits a config write of `data` at `offset` leaves in a control register
/// at `control_off` that held `old` (only enable and function mask are writable).
fn control_after(old: u16, control_off: u16, offset: u16, data: &[u8]) -> u16 {
    let mut bytes = old.to_le_bytes();
    for (i, &b) in data.iter().enumerate() {
        let at = usize::from(offset) + i;
        if let Some(k) = at.checked_sub(usize::from(control_off)).filter(|&k| k < 2) {
            bytes[k] = b;
        }
    }
    let written = u16::from_le_bytes(bytes);
    (old & !(CONTROL_ENABLE | CONTROL_FUNCTION_MASK))
        | (written & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK))
}

/// An offset in the table: mostly a field of a vector (sometimes one past the end), else
/// anything.
fn table_offset(input: &mut Input, vectors: u16) -> u64 {
    match input.u8() % 4 {
        0..=2 => {
            let v = u64::from(input.u16() % (vectors + 2));
            v * MSIX_ENTRY_SIZE + u64::from(input.u8() % 4) * 4
        }
        _ => input.u64(),
    }
}

/// Drive one function's MSI-X: the input first chooses the vector count and where the table
/// and PBA live, then a sequence of table, PBA, control and trigger operations.
pub fn msix_table(data: &[u8]) {
    let mut input = Input::new(data);
    let vectors = match input.u8() % 8 {
        0 => 1,
        1 => 64,
        2 => 65,
        3 => 2048,
        _ => u16::from(input.u8() % 20) + 1,
    };
    let mut config = ConfigSpace::endpoint(&PciIds::default());
    // A valid declaration on a fresh config space.
    let _ = config.add_bar(TABLE_BAR, BarKind::Mem64, 0x10000, false);
    let table = BarLocation {
        bar: TABLE_BAR,
        offset: 0,
    };
    // The PBA usually after the table, sometimes at a place the constructor must refuse.
    let pba_offset = if input.u8() % 16 == 0 {
        u32::from(input.u16())
    } else {
        (u32::from(vectors) * 16).next_multiple_of(0x1000)
    };
    let pba = BarLocation {
        bar: TABLE_BAR,
        offset: pba_offset,
    };
    let rec = RecordingMsi::new();
    let Ok(msix) = Msix::new(&mut config, vectors, table, pba, rec.clone()) else {
        return;
    };
    let cap = msix.capability_offset();
    let control_off = cap + 2;
    let mut model = Model {
        vectors: vec![
            Vector {
                masked: true,
                ..Default::default()
            };
            usize::from(vectors)
        ],
        enabled: false,
        function_masked: false,
    };
    let pba_len = u64::from(vectors).div_ceil(64) * 8;

    let mut steps = 0;
    while !input.is_empty() && steps < 1024 {
        steps += 1;
        let expected = match input.u8() % 9 {
            0 | 1 => {
                // A trigger from the device side, through a handle or a line.
                let v = if input.u8() % 8 == 0 {
                    input.u16()
                } else {
                    input.u16() % (vectors + 1)
                };
                match input.u8() % 3 {
                    0 => msix.trigger(v),
                    1 => msix.handle().trigger(v),
                    _ => crate::interrupt::IrqLine::trigger(&msix.handle().line(v)),
                }
                .expect("the recorder never fails");
                let vi = usize::from(v);
                if vi < model.vectors.len() && model.enabled {
                    if model.active(vi) {
                        vec![MsiEvent::Trigger(v)]
                    } else {
                        model.vectors[vi].pending = true;
                        Vec::new()
                    }
                } else {
                    Vec::new()
                }
            }
            2 | 3 => {
                let off = table_offset(&mut input, vectors);
                let len = input.access_len(true);
                let v = match input.u8() % 4 {
                    0 => u64::from(input.u8() & 1),
                    1 => 0xfee0_0000 | u64::from(input.u16()),
                    _ => input.u64(),
                };
                let bytes = le(v, len);
                msix.table_write(off, &bytes);
                model.table_write(off, &bytes);
                model.sync()
            }
            4 => {
                let off = table_offset(&mut input, vectors);
                let len = input.access_len(true);
                let mut b = [0xa5u8; 8];
                msix.table_read(off, &mut b[..len]);
                assert_eq!(
                    b[..len],
                    model.table_read(off, len)[..],
                    "table read {off:#x}"
                );
                Vec::new()
            }
            5 => {
                let off = if input.bool() {
                    u64::from(input.u8()) % (pba_len + 8)
                } else {
                    input.u64()
                };
                let len = input.access_len(true);
                let mut b = [0xa5u8; 8];
                msix.pba_read(off, &mut b[..len]);
                assert_eq!(b[..len], model.pba_read(off, len)[..], "PBA read {off:#x}");
                Vec::new()
            }
            6 | 7 => {
                // Message control through config space, the way a driver writes it (a word at
                // +2, a byte at +3) or any access nearby.
                let (off, len) = match input.u8() % 4 {
                    0 | 1 => (control_off, 2),
                    2 => (control_off + 1, 1),
                    _ => (cap + u16::from(input.u8() % 12), input.access_len(false)),
                };
                let v = match input.u8() % 2 {
                    0 => (u64::from(input.u8() & 0xc0) << 8) | u64::from(input.u8() & 0xc0),
                    _ => input.u64(),
                };
                let bytes = le(v, len);
                let old = config.read_u16(control_off);
                let _ = config.write(off, &bytes);
                msix.config_written(&config);
                let new = control_after(old, control_off, off, &bytes);
                assert_eq!(config.read_u16(control_off), new, "message control");
                model.enabled = new & CONTROL_ENABLE != 0;
                model.function_masked = new & CONTROL_FUNCTION_MASK != 0;
                model.sync()
            }
            _ => {
                // Anywhere in the BAR through the device's dispatch: table, PBA or neither.
                let bar = if input.u8() % 8 == 0 { 1 } else { TABLE_BAR };
                let off = match input.u8() % 3 {
                    0 => u64::from(input.u16()) % (u64::from(pba_offset) + pba_len + 16),
                    1 => u64::from(pba_offset) + u64::from(input.u8()) % (pba_len + 8),
                    _ => input.u64(),
                };
                let len = input.access_len(true);
                let in_table = bar == TABLE_BAR && off < u64::from(vectors) * 16;
                let in_pba = bar == TABLE_BAR
                    && off
                        .checked_sub(u64::from(pba_offset))
                        .is_some_and(|o| o < pba_len);
                if input.bool() {
                    let bytes = le(input.u64(), len);
                    assert_eq!(msix.bar_write(bar, off, &bytes), in_table || in_pba);
                    if in_table {
                        model.table_write(off, &bytes);
                    }
                    model.sync()
                } else {
                    let mut b = [0xa5u8; 8];
                    assert_eq!(msix.bar_read(bar, off, &mut b[..len]), in_table || in_pba);
                    if in_table {
                        assert_eq!(b[..len], model.table_read(off, len)[..]);
                    } else if in_pba {
                        let want = model.pba_read(off - u64::from(pba_offset), len);
                        assert_eq!(b[..len], want[..]);
                    }
                    Vec::new()
                }
            }
        };
        assert_eq!(rec.take(), expected);
        assert_eq!(msix.enabled(), model.enabled);
        let v = usize::from(input.u16() % vectors);
        assert_eq!(
            msix.pending(v as u16),
            model.vectors[v].pending,
            "vector {v}"
        );
        assert_eq!(msix.masked(v as u16), !model.active(v), "vector {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_inputs() {
        crate::fuzzing::tests::run(msix_table, 0x0bad_cafe_f00d_0001, 3000, 800);
    }

    #[test]
    fn control_bits() {
        assert_eq!(control_after(0x0003, 2, 2, &[0xff, 0xff]), 0xc003);
        assert_eq!(control_after(0xc003, 2, 3, &[0x40]), 0x4003);
        assert_eq!(control_after(0xc003, 2, 0, &[0, 0, 0, 0]), 0x0003);
        assert_eq!(control_after(0x0003, 2, 4, &[0xff]), 0x0003);
    }

    #[test]
    fn model_sees_pending_delivery() {
        let mut m = Model {
            vectors: vec![Vector::default(); 2],
            enabled: true,
            function_masked: true,
        };
        m.vectors[1].pending = true;
        m.function_masked = false;
        let msg = Some(MsiMessage::default());
        assert_eq!(
            m.sync(),
            [
                MsiEvent::Update(0, msg),
                MsiEvent::Update(1, msg),
                MsiEvent::Trigger(1)
            ]
        );
    }
}
