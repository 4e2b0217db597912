//! The root driven the way a guest drives it: through the 0xCF8 ports and ECAM on real buses.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::legacy::testutil::XorShift;
use crate::pci::msix::{MsiEvent, RecordingMsi};
use crate::pci::testutil::{SriovPf, msix_endpoint};
use crate::pci::{
    BarKind, Datamatch, Msix, PciDeviceExt, RecordingIoEvents, RootPort, VfBarChange,
    VfEnableChange,
};

const ECAM: u64 = 0xe000_0000;
const ECAM_LEN: u64 = 0x1000_0000;

/// A function with a 4 KiB register BAR, a 64-bit BAR holding the MSI-X table, PBA and a
/// notify register with an ioeventfd, and an I/O BAR.
struct TestDev {
    config: ConfigSpace,
    msix: Msix,
    regs: Vec<u8>,
    io: [u8; 0x20],
    notify: Arc<EventFd>,
}

const NOTIFY: u64 = 0x3000;

impl TestDev {
    fn new(device_id: u16, irq: Arc<RecordingMsi>) -> Self {
        let (config, msix) = msix_endpoint(device_id, irq).unwrap();
        Self {
            config,
            msix,
            regs: (0..0x1000u32).map(|i| i as u8).collect(),
            io: [0x11; 0x20],
            notify: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        }
    }
}

impl PciDevice for TestDev {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigEffects {
        let effects = self.config.write(offset, data);
        self.msix.config_written(&self.config);
        effects
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if self.msix.bar_read(bar, offset, data) {
            return;
        }
        let store: &[u8] = match bar {
            0 => &self.regs,
            4 => &self.io,
            _ => &[],
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| store.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if self.msix.bar_write(bar, offset, data) {
            return;
        }
        let store: &mut [u8] = match bar {
            0 => &mut self.regs,
            4 => &mut self.io,
            _ => return,
        };
        for (i, &b) in data.iter().enumerate() {
            if let Some(s) = usize::try_from(offset)
                .ok()
                .and_then(|o| store.get_mut(o + i))
            {
                *s = b;
            }
        }
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn ioevents(&self) -> Vec<IoEvent> {
        vec![IoEvent {
            bar: 2,
            offset: NOTIFY,
            datamatch: Datamatch::Any,
            fd: self.notify.clone(),
        }]
    }
}

struct Platform {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    root: Arc<Mutex<PciRoot>>,
    ioevents: Arc<RecordingIoEvents>,
    irq: Arc<RecordingMsi>,
    devs: Vec<Arc<Mutex<TestDev>>>,
}

impl Platform {
    /// A root with `n` test devices at 00:01.0, 00:02.0, ...
    fn new(n: u8) -> Self {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let ioevents = Arc::new(RecordingIoEvents::default());
        let mut root = PciRoot::new(&mmio, &pio);
        root.set_ioevent_registry(ioevents.clone());
        let irq = RecordingMsi::new();
        let mut devs = Vec::new();
        for i in 0..n {
            let dev = Arc::new(Mutex::new(TestDev::new(0x1000 + u16::from(i), irq.clone())));
            let slot = root.free_device().unwrap();
            root.add_device(Bdf::new(0, slot, 0), dev.clone()).unwrap();
            devs.push(dev);
        }
        let root = Arc::new(Mutex::new(root));
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
            0xcf8,
            8,
        )
        .unwrap();
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(root.clone()))),
            ECAM,
            ECAM_LEN,
        )
        .unwrap();
        Self {
            pio,
            mmio,
            root,
            ioevents,
            irq,
            devs,
        }
    }

    fn cf8_read(&self, bdf: Bdf, reg: u16, len: usize) -> u32 {
        let addr = 0x8000_0000 | (u32::from(bdf.raw()) << 8) | u32::from(reg & 0xfc);
        self.pio.write(0xcf8, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        self.pio.read(0xcfc + u64::from(reg & 3), &mut b[..len]);
        le_value(&b[..len]) as u32
    }

    fn cf8_write(&self, bdf: Bdf, reg: u16, len: usize, value: u32) {
        let addr = 0x8000_0000 | (u32::from(bdf.raw()) << 8) | u32::from(reg & 0xfc);
        self.pio.write(0xcf8, &addr.to_le_bytes());
        self.pio
            .write(0xcfc + u64::from(reg & 3), &value.to_le_bytes()[..len]);
    }

    fn ecam_addr(bdf: Bdf, reg: u16) -> u64 {
        ECAM + (u64::from(bdf.raw()) << 12) + u64::from(reg)
    }

    fn ecam_read(&self, bdf: Bdf, reg: u16, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(Self::ecam_addr(bdf, reg), &mut b[..len]);
        le_value(&b[..len]) as u32
    }

    fn ecam_write(&self, bdf: Bdf, reg: u16, len: usize, value: u32) {
        self.mmio
            .write(Self::ecam_addr(bdf, reg), &value.to_le_bytes()[..len]);
    }

    fn mem_read32(&self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(addr, &mut b);
        u32::from_le_bytes(b)
    }

    fn mem_write32(&self, addr: u64, value: u32) {
        self.mmio.write(addr, &value.to_le_bytes());
    }
}

const DEV1: Bdf = Bdf::new(0, 1, 0);
const DEV2: Bdf = Bdf::new(0, 2, 0);

#[test]
fn host_bridge_through_both_mechanisms() {
    let p = Platform::new(0);
    let hb = Bdf::default();
    for read in [Platform::cf8_read, Platform::ecam_read] {
        assert_eq!(read(&p, hb, 0, 4), 0x0d57_8086);
        assert_eq!(read(&p, hb, 0, 2), 0x8086);
        assert_eq!(read(&p, hb, 2, 2), 0x0d57);
        assert_eq!(read(&p, hb, 0, 1), 0x86);
        assert_eq!(read(&p, hb, 1, 1), 0x80);
        assert_eq!(read(&p, hb, 2, 1), 0x57);
        assert_eq!(read(&p, hb, 3, 1), 0x0d);
        assert_eq!(read(&p, hb, 8, 4), 0x0600_0000);
        assert_eq!(read(&p, hb, 0x0b, 1), 0x06);
        assert_eq!(read(&p, hb, 0x0e, 1), 0);
        // Absent functions, devices and buses read all-ones.
        assert_eq!(read(&p, Bdf::new(0, 0, 1), 0, 4), 0xffff_ffff);
        assert_eq!(read(&p, Bdf::new(0, 5, 0), 0, 2), 0xffff);
        assert_eq!(read(&p, Bdf::new(1, 0, 0), 0, 1), 0xff);
    }
    assert_eq!(p.ecam_read(Bdf::new(255, 31, 7), 0xffc, 4), 0xffff_ffff);
}

#[test]
fn config_address_register() {
    let p = Platform::new(0);
    // Linux's probe: a byte write to 0xCFB must not disturb the address register, and a
    // dword written to 0xCF8 reads back.
    p.pio.write(0xcf8, &0x8000_1234u32.to_le_bytes());
    p.pio.write(0xcfb, &[0x01]);
    let mut b = [0u8; 4];
    p.pio.read(0xcf8, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x8000_1234);
    p.pio.write(0xcf8, &0xffff_ffffu32.to_le_bytes());
    p.pio.read(0xcf8, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
    let mut byte = [0u8; 1];
    p.pio.read(0xcf8, &mut byte);
    assert_eq!(byte, [0xff]);
    let mut w = [0u8; 2];
    p.pio.read(0xcfa, &mut w);
    assert_eq!(w, [0xff, 0xff]);

    // Enable bit clear: the data window reads all-ones and ignores writes.
    p.pio.write(0xcf8, &0x0000_0000u32.to_le_bytes());
    p.pio.read(0xcfc, &mut b);
    assert_eq!(b, [0xff; 4]);
    p.pio.write(0xcfc, &[0x42]);
    assert_eq!(p.cf8_read(Bdf::default(), 0x0c, 1), 0);
    // Accesses crossing the end of the window are dropped.
    p.pio.write(0xcf8, &0x8000_000cu32.to_le_bytes());
    p.pio.write(0xcfe, &[0x10, 0x20, 0x30, 0x40]);
    p.pio.read(0xcfe, &mut b);
    assert_eq!(b, [0xff; 4]);
    assert_eq!(p.cf8_read(Bdf::default(), 0x0c, 4), 0);
    // A word at 0xCFE reaches register + 2.
    p.cf8_write(Bdf::default(), 0x3e, 2, 0);
    assert_eq!(p.cf8_read(Bdf::default(), 0x3c, 4) & 0xffff, 0);
    p.cf8_write(Bdf::default(), 0x3c, 1, 0x0a);
    assert_eq!(p.cf8_read(Bdf::default(), 0x3c, 1), 0x0a);
    assert_eq!(p.ecam_read(Bdf::default(), 0x3c, 1), 0x0a);
}

#[test]
fn extended_config_only_through_ecam() {
    let p = Platform::new(1);
    // 0xCF8 reaches 256 bytes; the PCIe capability says 4 KiB exist, and ECAM shows them.
    assert_eq!(p.ecam_read(DEV1, 0x100, 4), 0);
    assert_eq!(p.ecam_read(DEV1, 0xffc, 4), 0);
    let pcie = lock(&p.devs[0])
        .config
        .find_capability(crate::pci::cap_id::PCI_EXPRESS)
        .unwrap();
    assert_eq!(p.cf8_read(DEV1, pcie, 2), 0x0010 | (0x7c << 8));
    // Misaligned ECAM accesses that cross a dword read all-ones and are dropped.
    assert_eq!(p.ecam_read(DEV1, 0x0e, 4), 0xffff_ffff);
    assert_eq!(p.ecam_read(DEV1, 0x03, 2), 0xffff);
    p.ecam_write(DEV1, 0x0b, 2, 0xffff);
    assert_eq!(p.ecam_read(DEV1, 0x0c, 1), 0);
    let mut q = [0u8; 8];
    p.mmio.read(Platform::ecam_addr(DEV1, 0), &mut q);
    assert_eq!(q, [0xff; 8]);
    // Unaligned but within a dword is fine.
    assert_eq!(p.ecam_read(DEV1, 0x01, 2), 0x001a);
}

#[test]
fn bar_sizing_through_ecam() {
    let p = Platform::new(1);
    for reg in (0x10..0x28).step_by(4) {
        p.ecam_write(DEV1, reg, 4, 0xffff_ffff);
    }
    let sized: Vec<u32> = (0x10..0x28)
        .step_by(4)
        .map(|r| p.ecam_read(DEV1, r, 4))
        .collect();
    assert_eq!(
        sized,
        [0xffff_f000, 0, 0xffff_c00c, 0xffff_ffff, 0xffff_ffe1, 0]
    );
    // Decoding was off: nothing mapped anywhere.
    assert_eq!(lock(&p.root).bar_mapping(DEV1, 0), None);
    assert_eq!(
        lock(&p.root)
            .device(DEV1)
            .unwrap()
            .lock()
            .unwrap()
            .bars()
            .len(),
        3
    );
}

#[test]
fn relocation_moves_the_device_on_the_bus() {
    let p = Platform::new(1);
    p.ecam_write(DEV1, 0x10, 4, 0xc000_0000);
    assert_eq!(p.mem_read32(0xc000_0000), 0xffff_ffff);
    p.ecam_write(DEV1, 0x04, 2, 0x2);
    assert_eq!(p.mem_read32(0xc000_0004), 0x0706_0504);
    assert_eq!(lock(&p.root).bar_mapping(DEV1, 0), Some(0xc000_0000));

    // Move it with decoding on.
    p.ecam_write(DEV1, 0x10, 4, 0xc010_0000);
    assert_eq!(p.mem_read32(0xc000_0004), 0xffff_ffff);
    assert_eq!(p.mem_read32(0xc010_0004), 0x0706_0504);
    p.mem_write32(0xc010_0010, 0xdead_beef);
    assert_eq!(lock(&p.devs[0]).regs[0x10..0x14], [0xef, 0xbe, 0xad, 0xde]);

    // Decoding off: gone; on again: back where the BAR says.
    p.cf8_write(DEV1, 0x04, 2, 0);
    assert_eq!(p.mem_read32(0xc010_0010), 0xffff_ffff);
    p.cf8_write(DEV1, 0x04, 2, 0x2);
    assert_eq!(p.mem_read32(0xc010_0010), 0xdead_beef);

    // I/O BARs go on the port bus with I/O decoding.
    p.cf8_write(DEV1, 0x20, 4, 0xc000);
    let mut b = [0u8; 1];
    assert!(!p.pio.read(0xc000, &mut b));
    p.cf8_write(DEV1, 0x04, 2, 0x3);
    assert!(p.pio.read(0xc01f, &mut b));
    assert_eq!(b, [0x11]);
    assert!(!p.pio.read(0xc020, &mut b));
}

#[test]
fn overlapping_bars_refused_without_crash() {
    let p = Platform::new(2);
    p.ecam_write(DEV1, 0x10, 4, 0xc000_0000);
    p.ecam_write(DEV1, 0x04, 2, 0x2);
    p.ecam_write(DEV2, 0x10, 4, 0xc000_1000);
    p.ecam_write(DEV2, 0x04, 2, 0x2);
    lock(&p.devs[1]).regs[0] = 0x99;
    assert_eq!(p.mem_read32(0xc000_1000) & 0xff, 0x99);

    // The guest moves device 2's BAR onto device 1's: refused, device 1 keeps the range.
    p.ecam_write(DEV2, 0x10, 4, 0xc000_0000);
    assert_eq!(lock(&p.root).bar_mapping(DEV2, 0), None);
    assert_eq!(p.mem_read32(0xc000_0000) & 0xff, 0x00);
    assert_eq!(p.mem_read32(0xc000_1000), 0xffff_ffff);
    // Onto ECAM itself, likewise.
    p.ecam_write(DEV2, 0x10, 4, 0xe000_0000);
    assert_eq!(lock(&p.root).bar_mapping(DEV2, 0), None);
    assert_eq!(p.ecam_read(DEV1, 0, 2), 0x1af4);
    // Moved away again, it maps.
    p.ecam_write(DEV2, 0x10, 4, 0xc000_2000);
    assert_eq!(lock(&p.root).bar_mapping(DEV2, 0), Some(0xc000_2000));
    assert_eq!(p.mem_read32(0xc000_2000) & 0xff, 0x99);
    // Device 1 turning decoding off and on again while device 2 is clear works too.
    p.ecam_write(DEV1, 0x04, 2, 0);
    p.ecam_write(DEV1, 0x04, 2, 2);
    assert_eq!(lock(&p.root).bar_mapping(DEV1, 0), Some(0xc000_0000));
}

#[test]
fn ioeventfds_follow_the_bar() {
    let p = Platform::new(1);
    let fd = lock(&p.devs[0]).notify.as_raw_fd();
    p.ecam_write(DEV1, 0x18, 4, 0x0010_0000);
    p.ecam_write(DEV1, 0x1c, 4, 0x1);
    assert!(p.ioevents.registered().is_empty());
    p.ecam_write(DEV1, 0x04, 2, 0x2);
    let at = |a| vec![(AddressSpace::Memory, a, Datamatch::Any, fd)];
    assert_eq!(p.ioevents.registered(), at(0x1_0010_0000 + NOTIFY));
    // Moving the upper half moves the ioeventfd.
    p.ecam_write(DEV1, 0x1c, 4, 0x2);
    assert_eq!(p.ioevents.registered(), at(0x2_0010_0000 + NOTIFY));
    p.ecam_write(DEV1, 0x04, 2, 0);
    assert!(p.ioevents.registered().is_empty());
}

#[test]
fn msix_through_the_bar() {
    let p = Platform::new(1);
    let table = 0x1_0000_0000u64;
    p.ecam_write(DEV1, 0x18, 4, table as u32);
    p.ecam_write(DEV1, 0x1c, 4, (table >> 32) as u32);
    p.ecam_write(DEV1, 0x04, 2, 0x6);
    let cap = lock(&p.devs[0]).msix.capability_offset();
    // Enable masked, program vector 2, unmask the function.
    p.ecam_write(DEV1, cap + 2, 2, 0xc000);
    p.mem_write32(table + 0x20, 0xfee0_0000);
    p.mem_write32(table + 0x28, 0x0000_0045);
    p.mem_write32(table + 0x2c, 0);
    assert_eq!(p.mem_read32(table + 0x28), 0x45);
    lock(&p.devs[0]).msix.trigger(2).unwrap();
    assert_eq!(p.mem_read32(table + 0x800), 0b100);
    assert_eq!(p.irq.take(), []);
    p.ecam_write(DEV1, cap + 3, 1, 0x80);
    let msg = crate::pci::MsiMessage {
        address: 0xfee0_0000,
        data: 0x45,
    };
    assert_eq!(
        p.irq.take(),
        [MsiEvent::Update(2, Some(msg)), MsiEvent::Trigger(2)]
    );
    assert_eq!(p.mem_read32(table + 0x800), 0);
    // Out of range table access through the bus: ignored, reads zero.
    p.mem_write32(table + 0x7fc, 0xffff_ffff);
    assert_eq!(p.mem_read32(table + 0x7fc), 0);
}

#[test]
fn no_reference_cycle_through_the_buses() {
    let p = Platform::new(1);
    p.ecam_write(DEV1, 0x10, 4, 0xc000_0000);
    p.ecam_write(DEV1, 0x04, 2, 0x2);
    let root = Arc::downgrade(&p.root);
    let dev = Arc::downgrade(&p.devs[0]);
    drop(p);
    assert!(root.upgrade().is_none());
    assert!(dev.upgrade().is_none());
}

#[test]
fn slots() {
    let p = Platform::new(2);
    let mut root = lock(&p.root);
    assert_eq!(root.free_device(), Some(3));
    let dev = root.device(DEV1).unwrap();
    assert_eq!(
        root.add_device(DEV1, dev.clone()),
        Err(PciError::SlotTaken(DEV1))
    );
    root.add_device(Bdf::new(0, 3, 1), dev).unwrap();
    assert_eq!(root.free_device(), Some(4));
    assert!(format!("{root:?}").contains("00:03.1"));
}

#[test]
fn device_driven_without_a_root() {
    let irq = RecordingMsi::new();
    let mut d = TestDev::new(7, irq);
    assert_eq!(d.config_read_u16(2), 7);
    assert!(d.config_write_u32(0x10, 0xc000_0000).is_empty());
    let e = d.config_write_u16(4, 2);
    assert_eq!(e.bar_changes[0].new, Some(0xc000_0000));
    assert_eq!(d.bar_read_u32(0, 4), 0x0706_0504);
    d.bar_write_u32(0, 4, 0);
    assert_eq!(d.bar_read_u32(0, 4), 0);
}

/// Random config accesses through both mechanisms and random MMIO/port accesses all over the
/// windows: nothing panics, read-only ids survive, and every BAR the root mapped is where the
/// device's config says it decodes.
#[test]
fn random_accesses() {
    let p = Platform::new(3);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let bdfs = [
        Bdf::default(),
        DEV1,
        DEV2,
        Bdf::new(0, 3, 0),
        Bdf::new(0, 4, 0),
    ];
    let (mut mapped, mut refused) = (0, 0);
    for round in 0..30_000 {
        let bdf = bdfs[rng.below(bdfs.len() as u64) as usize];
        // Often the command and BAR registers, otherwise anywhere in the header or the space.
        let (reg, len) = match rng.below(4) {
            0 | 1 => ([0x04, 0x10, 0x18, 0x1c, 0x20][rng.below(5) as usize], 4),
            2 => (rng.below(0x40) as u16, [1, 2, 4][rng.below(3) as usize]),
            _ => (
                rng.below(0x1000) as u16,
                [1, 2, 4, 3, 8, 0][rng.below(6) as usize],
            ),
        };
        // Plausible BAR addresses in a small window (so that BARs collide often), zero upper
        // halves, decode enables, and junk.
        let value = match rng.below(6) {
            0 | 1 => 0xc000_0000 + (rng.below(4) << 12),
            2 => 0,
            3 => 0x7,
            _ => rng.next(),
        };
        let bytes = value.to_le_bytes();
        match rng.below(6) {
            0 => {
                let addr = 0x8000_0000 | (u32::from(bdf.raw()) << 8) | u32::from(reg & 0xfc);
                p.pio.write(0xcf8, &addr.to_le_bytes());
                p.pio.write(0xcfc + u64::from(reg & 3), &bytes[..len]);
            }
            1 => {
                p.mmio.write(Platform::ecam_addr(bdf, reg), &bytes[..len]);
            }
            2 => {
                let mut b = [0u8; 8];
                p.mmio.read(Platform::ecam_addr(bdf, reg), &mut b[..len]);
            }
            3 => {
                let addr = 0xc000_0000 + rng.below(0x9000);
                if rng.below(2) == 0 {
                    p.mmio.write(addr, &bytes[..len]);
                } else {
                    let mut b = [0u8; 8];
                    p.mmio.read(addr, &mut b[..len]);
                }
            }
            4 => {
                let port = rng.below(0x1_0000);
                p.pio.write(port, &bytes[..len]);
            }
            _ => {
                let mut b = [0u8; 8];
                p.pio.read(0xcf8 + rng.below(8), &mut b[..len]);
            }
        }
        if round % 64 == 0 {
            let root = lock(&p.root);
            for (i, dev) in p.devs.iter().enumerate() {
                let bdf = Bdf::new(0, i as u8 + 1, 0);
                let d = lock(dev);
                assert_eq!(d.config.read_u16(0), 0x1af4);
                for bar in [0u8, 2, 4] {
                    match (root.bar_mapping(bdf, bar), d.config.bar_mapping(bar)) {
                        (Some(base), want) => {
                            assert_eq!(want, Some(base), "{bdf} BAR {bar}");
                            mapped += 1;
                        }
                        (None, Some(_)) => refused += 1,
                        (None, None) => {}
                    }
                }
            }
        }
    }
    // The run exercised both outcomes.
    assert!(
        mapped > 100 && refused > 10,
        "mapped {mapped}, refused {refused}"
    );
    // The host bridge is still itself.
    assert_eq!(p.ecam_read(Bdf::default(), 0, 4), 0x0d57_8086);
}

/// A PF with ARI and the SR-IOV capability: one 64-bit VF BAR 0 of 16 KiB.
fn pf_dev(total: u16) -> SriovPf {
    let ids = PciIds {
        vendor_id: 0x1af4,
        device_id: 0x1042,
        class_code: 0x01_8000,
        ..Default::default()
    };
    let params = crate::pci::SriovParams {
        initial_vfs: total,
        total_vfs: total,
        first_vf_offset: 1,
        vf_stride: 1,
        vf_device_id: 0x1042,
        supported_page_sizes: 1,
        vf_bars: vec![crate::pci::VfBar {
            index: 0,
            kind: BarKind::Mem64,
            size: 0x4000,
            prefetchable: false,
        }],
    };
    SriovPf::new(&ids, params).unwrap()
}

/// Makes each VF a TestDev (device id 0x2000 + i) turned into a VF, and maps VF BAR 0 as the PF
/// says; records what it was asked.
struct VfMaker {
    irq: Arc<RecordingMsi>,
    calls: Mutex<Vec<(Option<VfEnableChange>, Vec<VfBarChange>)>>,
}

impl SriovHandler for VfMaker {
    fn carry_out(
        &self,
        root: &mut PciRoot,
        pf: Bdf,
        enable: Option<VfEnableChange>,
        bars: &[VfBarChange],
    ) {
        self.calls.lock().unwrap().push((enable, bars.to_vec()));
        let rid = |i: u16| crate::pci::sriov::vf_routing_id(pf, 1, 1, i).unwrap();
        if let Some(e) = enable.filter(|e| e.enabled) {
            for i in 0..e.num_vfs {
                let mut dev = TestDev::new(0x2000 + i, self.irq.clone());
                dev.config.make_virtual_function();
                root.add_device(rid(i), Arc::new(Mutex::new(dev))).unwrap();
            }
        }
        for b in bars {
            for i in 0..b.num_vfs {
                let at = b.new.map(|base| base + u64::from(i) * b.size);
                root.map_bar(rid(i), b.bar, b.space, 0x1000, at);
            }
        }
        if let Some(e) = enable.filter(|e| !e.enabled) {
            for i in 0..e.num_vfs {
                root.remove_device(rid(i)).unwrap();
            }
        }
    }
}

#[test]
fn root_port_routes_to_its_secondary_bus() {
    let p = Platform::new(0);
    let pf = Arc::new(Mutex::new(pf_dev(12)));
    {
        let mut root = p.root.lock().unwrap();
        root.add_root_port(Bdf::new(0, 1, 0), RootPort::new(1).unwrap(), 1, None)
            .unwrap();
        root.add_device(Bdf::new(1, 0, 0), pf.clone()).unwrap();
        // Taken bus numbers and ports off bus 0 are refused.
        assert!(
            root.add_root_port(Bdf::new(0, 2, 0), RootPort::new(2).unwrap(), 1, None)
                .is_err()
        );
    }
    let port = Bdf::new(0, 1, 0);
    assert_eq!(p.ecam_read(port, 0, 4), 0x000c_1b36);
    assert_eq!(p.cf8_read(port, 0x18, 4) & 0xff_ffff, 0x01_0100);
    // The PF on bus 1, through both mechanisms; nothing on bus 2 or at device 1 of bus 1.
    assert_eq!(p.ecam_read(Bdf::new(1, 0, 0), 0, 4), 0x1042_1af4);
    assert_eq!(p.cf8_read(Bdf::new(1, 0, 0), 0, 4), 0x1042_1af4);
    assert_eq!(p.ecam_read(Bdf::new(2, 0, 0), 0, 4), u32::MAX);
    assert_eq!(p.ecam_read(Bdf::new(1, 1, 0), 0, 4), u32::MAX);

    // The guest renumbers the port: the PF moves to bus 4, bus 1 is empty.
    p.ecam_write(port, 0x18, 4, 0x00_0404);
    assert_eq!(p.ecam_read(Bdf::new(4, 0, 0), 0, 4), 0x1042_1af4);
    assert_eq!(p.ecam_read(Bdf::new(1, 0, 0), 0, 4), u32::MAX);
    // A write through the new number reaches the PF.
    p.ecam_write(Bdf::new(4, 0, 0), 0x0c, 1, 0x10);
    assert_eq!(p.ecam_read(Bdf::new(4, 0, 0), 0x0c, 1), 0x10);
    // Writes to a bus no port leads to go nowhere.
    p.ecam_write(Bdf::new(9, 0, 0), 0x0c, 1, 0x20);
}

#[test]
fn vf_enable_creates_functions_before_the_write_returns() {
    let p = Platform::new(0);
    let pf = Arc::new(Mutex::new(pf_dev(12)));
    let maker = Arc::new(VfMaker {
        irq: p.irq.clone(),
        calls: Mutex::default(),
    });
    let pf_bdf = Bdf::new(1, 0, 0);
    {
        let mut root = p.root.lock().unwrap();
        root.add_root_port(Bdf::new(0, 1, 0), RootPort::new(1).unwrap(), 1, None)
            .unwrap();
        root.add_device(pf_bdf, pf.clone()).unwrap();
        root.set_sriov_handler(pf_bdf, maker.clone());
    }
    let cap = pf.lock().unwrap().sriov.offset();
    let port = Bdf::new(0, 1, 0);
    let vf_bdf = |i: u8| Bdf::from_raw(0x100 + u16::from(i) + 1);
    // NumVFs 10, VF BAR 0 at 0xc000_0000, VF Enable + VF MSE.
    p.ecam_write(pf_bdf, cap + 0x10, 2, 10);
    p.ecam_write(pf_bdf, cap + 0x24, 4, 0xc000_0004);
    p.ecam_write(pf_bdf, cap + 0x28, 4, 0);
    p.ecam_write(pf_bdf, cap + 0x08, 2, 0x9);
    assert_eq!(maker.calls.lock().unwrap().len(), 1);
    // VF 0..6 sit at functions 1..7 of device 0 and are reachable; VFs 7.. are at function
    // numbers 8.. which need ARI forwarding in the port.
    assert_eq!(
        p.ecam_read(vf_bdf(0), 0, 4),
        u32::MAX,
        "a VF's ids read 0xFFFF"
    );
    assert_eq!(p.ecam_read(vf_bdf(0), 0x08, 4) >> 8, 0xff_0000, "class");
    assert_eq!(p.ecam_read(vf_bdf(9), 0x08, 4), u32::MAX);
    let devctl2 = 0x40 + 0x28;
    p.ecam_write(port, devctl2, 2, 1 << 5);
    assert_eq!(p.ecam_read(vf_bdf(9), 0x08, 4) >> 8, 0xff_0000);
    // Past NumVFs there is nothing.
    assert_eq!(p.ecam_read(vf_bdf(10), 0x08, 4), u32::MAX);
    // Each VF's BAR 0 (a VF BAR slice of 16 KiB, the TestDev's 4 KiB register BAR in it).
    for i in [0u8, 9] {
        let base = 0xc000_0000 + u64::from(i) * 0x4000;
        assert_eq!(p.mem_read32(base + 4), 0x0706_0504);
    }
    // VF BAR written while enabled: the VFs move.
    p.ecam_write(pf_bdf, cap + 0x24, 4, 0xd000_0004);
    assert_eq!(p.mem_read32(0xc000_0004), u32::MAX);
    assert_eq!(p.mem_read32(0xd000_4004), 0x0706_0504);
    // VF Enable off: the VFs and their BARs are gone.
    p.ecam_write(pf_bdf, cap + 0x08, 2, 0x8);
    assert_eq!(p.ecam_read(vf_bdf(0), 0x08, 4), u32::MAX);
    assert_eq!(p.mem_read32(0xd000_4004), u32::MAX);
    assert!(p.ioevents.registered().is_empty());
    // Enabled again with another count.
    p.ecam_write(pf_bdf, cap + 0x10, 2, 3);
    p.ecam_write(pf_bdf, cap + 0x08, 2, 0x9);
    assert_ne!(p.ecam_read(vf_bdf(2), 0x08, 4), u32::MAX);
    assert_eq!(p.ecam_read(vf_bdf(3), 0x08, 4), u32::MAX);
    assert_eq!(maker.calls.lock().unwrap().len(), 4);
}
