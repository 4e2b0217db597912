//! PCI configuration space through both front doors (0xCF8/0xCFC and ECAM) on real buses, with
//! BAR sizing and relocation, and accesses wherever the BARs went.
//!
//! Shadow model: which BARs the root should have on each bus (the bus refuses a range that
//! overlaps another, which the model predicts), checked after every step against the root, the
//! bus (a probe must land in the right BAR at the right offset) and the config space (read-only
//! registers keep their reset value whichever way the guest writes them).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{Input, le};
use crate::bus::{Bus, BusDevice, lock};
use crate::pci::msix::RecordingMsi;
use crate::pci::testutil::{msix_endpoint, test_ids};
use crate::pci::{
    AddressSpace, BarInfo, BarKind, Bdf, ConfigEffects, ConfigSpace, Msix, PciConfigIo, PciDevice,
    PciEcam, PciRoot,
};

const ECAM: u64 = 0xe000_0000;
const ECAM_LEN: u64 = 0x1000_0000;
const CF8: u64 = 0xcf8;
/// A fixed device on the port bus that I/O BARs can collide with.
const PIO_FIXED: u64 = 0xc040;

/// A function with a 32-bit, a 64-bit (MSI-X table and PBA) and an I/O BAR, or a bridge with
/// a 32-bit and an I/O BAR. It remembers the last BAR access, so the harness can tell where a
/// bus access landed.
struct FakeFunction {
    config: ConfigSpace,
    msix: Option<Msix>,
    last: Option<(u8, u64)>,
}

impl FakeFunction {
    fn endpoint(device_id: u16) -> Self {
        let (config, msix) = msix_endpoint(device_id, RecordingMsi::new())
            .expect("the endpoint's declaration is valid");
        Self {
            config,
            msix: Some(msix),
            last: None,
        }
    }

    fn bridge(device_id: u16) -> Self {
        let mut config = ConfigSpace::bridge(&test_ids(device_id));
        let _ = config.add_bar(0, BarKind::Mem32, 0x1000, false);
        let _ = config.add_bar(1, BarKind::Io, 0x10, false);
        Self {
            config,
            msix: None,
            last: None,
        }
    }
}

impl PciDevice for FakeFunction {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigEffects {
        let effects = self.config.write(offset, data);
        if let Some(m) = &self.msix {
            m.config_written(&self.config);
        }
        effects
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.last = Some((bar, offset));
        if self
            .msix
            .as_ref()
            .is_some_and(|m| m.bar_read(bar, offset, data))
        {
            return;
        }
        data.fill(bar);
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.last = Some((bar, offset));
        if let Some(m) = &self.msix {
            let _ = m.bar_write(bar, offset, data);
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }
}

/// A plain device at a fixed place.
struct Fixed;

impl BusDevice for Fixed {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

struct Function {
    bdf: Bdf,
    dev: Arc<Mutex<FakeFunction>>,
    /// Config space at reset, for the read-only checks.
    initial: Vec<u8>,
    /// Bytes of `initial` no guest write may change.
    read_only: Vec<std::ops::Range<usize>>,
    bars: Vec<BarInfo>,
    /// Where each BAR decoded after the last step (config space's view).
    decoded: [Option<u64>; 6],
}

struct Platform {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    root: Arc<Mutex<PciRoot>>,
    funcs: Vec<Function>,
    /// Shadow: (function, BAR) -> (space, base, size) that the root should have on a bus.
    model: BTreeMap<(usize, u8), (AddressSpace, u64, u64)>,
}

fn fixed_ranges(space: AddressSpace) -> &'static [(u64, u64)] {
    match space {
        AddressSpace::Memory => &[(ECAM, ECAM_LEN)],
        AddressSpace::Io => &[(CF8, 8), (PIO_FIXED, 8)],
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

impl Platform {
    fn new() -> Self {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let mut root = PciRoot::new(&mmio, &pio);
        let mut funcs = Vec::new();
        let made = [
            (Bdf::new(0, 1, 0), FakeFunction::endpoint(0x1001)),
            (Bdf::new(0, 2, 0), FakeFunction::endpoint(0x1002)),
            (Bdf::new(0, 3, 0), FakeFunction::bridge(0x1003)),
        ];
        for (bdf, f) in made {
            let mut initial = vec![0u8; 4096];
            f.config.read(0, &mut initial);
            let bars = f.config.bars();
            let mut read_only = vec![0..4, 8..0x0c, 0x0e..0x0f, 0x34..0x35, 0x100..0x1000];
            if f.config.header_type() == crate::pci::HeaderType::Endpoint {
                read_only.push(0x2c..0x30);
            }
            if let Some(m) = &f.msix {
                let cap = usize::from(m.capability_offset());
                // Id, next pointer, table size (low 11 bits of control), table and PBA.
                read_only.extend([cap..cap + 3, cap + 4..cap + 12]);
            }
            let dev = Arc::new(Mutex::new(f));
            // Distinct addresses on a fresh root.
            let _ = root.add_device(bdf, dev.clone());
            funcs.push(Function {
                bdf,
                dev,
                initial,
                read_only,
                bars,
                decoded: [None; 6],
            });
        }
        let root = Arc::new(Mutex::new(root));
        let cf8: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
        let ecam: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(PciEcam::new(root.clone())));
        // Fixed, disjoint ranges on fresh buses.
        let _ = pio.insert(cf8, CF8, 8);
        let _ = pio.insert(Arc::new(Mutex::new(Fixed)), PIO_FIXED, 8);
        let _ = mmio.insert(ecam, ECAM, ECAM_LEN);
        Self {
            pio,
            mmio,
            root,
            funcs,
            model: BTreeMap::new(),
        }
    }

    /// Pull each function's BAR decoding from its config space and apply the changes to the
    /// model the way the root must: BAR by BAR, old range out, new range in unless it overlaps.
    fn update_model(&mut self) {
        for (fi, f) in self.funcs.iter_mut().enumerate() {
            let now: [Option<u64>; 6] = {
                let d = lock(&f.dev);
                std::array::from_fn(|i| d.config.bar_mapping(i as u8))
            };
            for bar in &f.bars {
                let i = usize::from(bar.index);
                if now[i] == f.decoded[i] {
                    continue;
                }
                self.model.remove(&(fi, bar.index));
                if let Some(base) = now[i] {
                    let space = bar.space();
                    let range = (base, bar.size);
                    let taken = fixed_ranges(space).iter().any(|&r| overlaps(r, range))
                        || self
                            .model
                            .values()
                            .any(|&(s, b, l)| s == space && overlaps((b, l), range));
                    if !taken {
                        self.model.insert((fi, bar.index), (space, base, bar.size));
                    }
                }
            }
            f.decoded = now;
        }
    }

    /// BAR sizing as a driver does it at `off` in ECAM: all-ones, read, restore. The model
    /// follows each write: the BAR may map while sized, and map again elsewhere when restored.
    fn size_bar(&mut self, off: u64) {
        let mut old = [0u8; 4];
        self.mmio.read(ECAM + off, &mut old);
        self.mmio.write(ECAM + off, &[0xff; 4]);
        self.update_model();
        let mut b = [0u8; 4];
        self.mmio.read(ECAM + off, &mut b);
        self.mmio.write(ECAM + off, &old);
    }

    fn bus(&self, space: AddressSpace) -> &Bus {
        match space {
            AddressSpace::Memory => &self.mmio,
            AddressSpace::Io => &self.pio,
        }
    }

    /// Every invariant; `probe` picks where in each mapped BAR the bus probe goes, `full` adds
    /// the extended config space.
    fn check(&mut self, probe: u64, full: bool) {
        self.update_model();
        let root = lock(&self.root);
        for (fi, f) in self.funcs.iter().enumerate() {
            // The root's mapping is the model's.
            for bar in &f.bars {
                let want = self.model.get(&(fi, bar.index)).map(|m| m.1);
                assert_eq!(
                    root.bar_mapping(f.bdf, bar.index),
                    want,
                    "{} BAR {}",
                    f.bdf,
                    bar.index
                );
            }
            // Read-only registers kept their value; BAR flag bits and address bits below the
            // size stay as declared.
            let d = lock(&f.dev);
            // The extended space (all read-only here) is large: look at it now and then.
            let len = if full { 4096 } else { 256 };
            let mut now = vec![0u8; len];
            d.config.read(0, &mut now);
            for r in f.read_only.iter().filter(|r| r.end <= len) {
                assert_eq!(
                    now[r.clone()],
                    f.initial[r.clone()],
                    "{} read-only {r:?}",
                    f.bdf
                );
            }
            for bar in &f.bars {
                let off = 0x10 + 4 * usize::from(bar.index);
                let reg = u32::from_le_bytes([now[off], now[off + 1], now[off + 2], now[off + 3]]);
                let low_mask = (bar.size - 1).min(0xffff_ffff) as u32;
                let flags = u32::from_le_bytes([
                    f.initial[off],
                    f.initial[off + 1],
                    f.initial[off + 2],
                    f.initial[off + 3],
                ]);
                assert_eq!(
                    reg & low_mask,
                    flags & low_mask,
                    "{} BAR {}",
                    f.bdf,
                    bar.index
                );
            }
        }
        drop(root);
        // Mapped ranges are disjoint from each other and the fixed devices, and the bus sends
        // an access inside one to that BAR at that offset.
        let mapped: Vec<_> = self.model.iter().map(|(&k, &v)| (k, v)).collect();
        for (i, &((fi, bar), (space, base, size))) in mapped.iter().enumerate() {
            for &(r, l) in fixed_ranges(space) {
                assert!(!overlaps((r, l), (base, size)));
            }
            for &(_, (s2, b2, l2)) in &mapped[i + 1..] {
                assert!(s2 != space || !overlaps((b2, l2), (base, size)));
            }
            let off = probe % size;
            let f = &self.funcs[fi];
            lock(&f.dev).last = None;
            let mut b = [0u8; 1];
            assert!(self.bus(space).read(base + off, &mut b), "nothing at BAR");
            assert_eq!(lock(&f.dev).last, Some((bar, off)), "{} BAR {bar}", f.bdf);
        }
        // Both mechanisms still see the right ids (0xCF8's address register is put back).
        for f in &self.funcs {
            let mut b = [0u8; 4];
            self.mmio
                .read(ECAM + (u64::from(f.bdf.raw()) << 12), &mut b);
            assert_eq!(b[..], f.initial[..4]);
            let mut saved = [0u8; 4];
            self.pio.read(CF8, &mut saved);
            let addr = 0x8000_0000u32 | (u32::from(f.bdf.raw()) << 8);
            self.pio.write(CF8, &addr.to_le_bytes());
            self.pio.read(CF8 + 4, &mut b);
            assert_eq!(b[..], f.initial[..4]);
            self.pio.write(CF8, &saved);
        }
    }
}

const BDFS: [u16; 8] = [
    0x0000, 0x0008, 0x0010, 0x0018, 0x0020, 0x0009, 0x0100, 0xffff,
];
const REGS: [u16; 12] = [
    0x04, 0x04, 0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x06, 0x3c, 0x0e, 0x34,
];

/// A config register offset: mostly the command and BAR registers, sometimes anywhere.
fn register(input: &mut Input) -> u16 {
    match input.u8() % 4 {
        0 | 1 => input.pick(&REGS),
        2 => u16::from(input.u8()),
        _ => input.u16() & 0xfff,
    }
}

/// A value for a config write: plausible BAR addresses in small windows (so that BARs collide
/// often), decode enables, all-ones for sizing, or anything.
fn value(input: &mut Input) -> u64 {
    match input.u8() % 8 {
        0 | 1 => 0xc000_0000 + (u64::from(input.u8() % 16) << 12),
        2 => 0xc000 + u64::from(input.u8() % 8) * 0x20,
        3 => input.pick(&[0, 1, 0xffff_ffff, 0xe000_0000, 0xffff_f000, 0xc040]),
        4 => u64::from(input.u8() & 7),
        _ => input.u64(),
    }
}

fn bdf(input: &mut Input) -> u16 {
    if input.u8() % 8 == 7 {
        input.u16()
    } else {
        input.pick(&BDFS)
    }
}

/// Drive the root complex: config accesses through 0xCF8/0xCFC and ECAM, BAR programming and
/// accesses all over the MMIO and port windows.
pub fn pci_config(data: &[u8]) {
    let mut input = Input::new(data);
    let mut p = Platform::new();
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        match input.u8() % 10 {
            0 => {
                // The address register, usually a proper dword.
                let addr = if input.bool() {
                    0x8000_0000
                        | (u32::from(bdf(&mut input)) << 8)
                        | u32::from(register(&mut input))
                } else {
                    input.u32()
                };
                p.pio.write(CF8, &addr.to_le_bytes());
            }
            1 => {
                // Any access at 0xCF8..0xCFF.
                let port = CF8 + u64::from(input.u8() % 8);
                let len = input.access_len(true);
                if input.bool() {
                    let v = value(&mut input);
                    p.pio.write(port, &le(v, len));
                } else {
                    let mut b = [0u8; 8];
                    p.pio.read(port, &mut b[..len]);
                }
            }
            2..=4 => {
                let off = (u64::from(bdf(&mut input)) << 12) | u64::from(register(&mut input));
                let len = input.access_len(true);
                let v = value(&mut input);
                p.mmio.write(ECAM + off, &le(v, len));
            }
            5 => {
                let off = if input.bool() {
                    u64::from(input.u32()) % ECAM_LEN
                } else {
                    (u64::from(bdf(&mut input)) << 12) | u64::from(register(&mut input))
                };
                let len = input.access_len(true);
                let mut b = [0u8; 8];
                p.mmio.read(ECAM + off, &mut b[..len]);
            }
            6 => {
                // BAR sizing as a driver does it: all-ones, read, restore.
                let off = (u64::from(bdf(&mut input)) << 12) | u64::from(input.pick(&REGS));
                p.size_bar(off);
            }
            7 | 8 => {
                // MMIO where BARs go: the 32-bit window, the first 64-bit one, or anywhere.
                let addr = match input.u8() % 4 {
                    0 | 1 => 0xc000_0000 + u64::from(input.u32() % 0x1_0000),
                    2 => 0x1_c000_0000 + u64::from(input.u32() % 0x1_0000),
                    _ => input.u64(),
                };
                let len = input.access_len(true);
                if input.bool() {
                    let v = input.u64();
                    p.mmio.write(addr, &le(v, len));
                } else {
                    let mut b = [0u8; 8];
                    p.mmio.read(addr, &mut b[..len]);
                }
            }
            _ => {
                let port = if input.bool() {
                    0xc000 + u64::from(input.u8())
                } else {
                    u64::from(input.u16())
                };
                let len = input.access_len(true);
                if input.bool() {
                    let v = input.u64();
                    p.pio.write(port, &le(v, len));
                } else {
                    let mut b = [0u8; 8];
                    p.pio.read(port, &mut b[..len]);
                }
            }
        }
        let probe = u64::from(input.u16());
        p.check(probe, steps % 32 == 0);
    }
    p.check(0, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzz target (a harness bug): 00:01.0 holds an address, 00:02.0's BAR is
    /// refused there; 00:01.0 stops decoding; sizing 00:02.0's BAR maps it at the sizing
    /// address and restoring it maps it where it was refused before. The model must follow
    /// each write of the sizing sequence, not only its end.
    #[test]
    fn sizing_remaps_a_refused_bar() {
        let mut p = Platform::new();
        let ecam = |bdf: u16, reg: u64| ECAM + (u64::from(bdf) << 12) + reg;
        for bdf in [0x08, 0x10] {
            p.mmio.write(ecam(bdf, 0x04), &[0x47]);
            p.mmio.write(ecam(bdf, 0x1c), &0x9000u16.to_le_bytes());
            p.check(0, false);
        }
        assert_eq!(p.model.len(), 1);
        p.mmio.write(ecam(0x08, 0x04), &[0]);
        p.check(0, false);
        // Sizing the upper half of 00:02.0's BAR 2 maps it high, then back at 0x9000_0000_0000.
        p.size_bar((0x10 << 12) | 0x1c);
        p.check(0, false);
        assert_eq!(p.model.get(&(1, 2)).map(|m| m.1), Some(0x9000_0000_0000));
    }

    #[test]
    fn random_inputs() {
        crate::fuzzing::tests::run(pci_config, 0x1234_5678_9abc_def1, 1000, 600);
    }

    /// A hand-written input: BAR 0 of 00:01.0 at 0xc000_1000, decoding on, then 00:02.0's BAR
    /// 0 onto the same place (refused), then moved away (mapped).
    #[test]
    fn overlap_then_move() {
        let mut p = Platform::new();
        let ecam = |bdf: u16, reg: u64| ECAM + (u64::from(bdf) << 12) + reg;
        p.mmio
            .write(ecam(0x08, 0x10), &0xc000_1000u32.to_le_bytes());
        p.mmio.write(ecam(0x08, 0x04), &2u16.to_le_bytes());
        p.mmio
            .write(ecam(0x10, 0x10), &0xc000_1000u32.to_le_bytes());
        p.mmio.write(ecam(0x10, 0x04), &2u16.to_le_bytes());
        p.check(5, true);
        assert_eq!(p.model.len(), 1);
        p.mmio
            .write(ecam(0x10, 0x10), &0xc000_2000u32.to_le_bytes());
        p.check(7, true);
        assert_eq!(p.model.len(), 2);
    }
}
