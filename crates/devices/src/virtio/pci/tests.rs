//! The transport driven the way a guest driver drives it, through the `PciDevice` API only:
//! capabilities found by walking config space, registers reached through BAR 0, queues laid
//! out in real guest memory, interrupts seen on a recording MSI double.

#![allow(clippy::unwrap_used)] // tests: a failed setup should stop the test loudly

use std::os::unix::fs::FileExt;

use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::pci::PciDeviceExt;
use crate::pci::msix::{MsiEvent, RecordingMsi};
use crate::virtio::block::{Block, BlockBackend, BlockOptions};
use crate::virtio::dma::PhysMemory;
use crate::virtio::testutil::{Desc, TestDriver, test_memory};
use crate::virtio::{features, status};

const HDR: u64 = 0x8000;
const STATUS_BYTE: u64 = 0x8100;
const DATA: u64 = 0x10000;

/// Common config registers.
const DFSEL: u64 = 0x00;
const DF: u64 = 0x04;
const GFSEL: u64 = 0x08;
const GF: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const STATUS: u64 = 0x14;
const GENERATION: u64 = 0x15;
const QSEL: u64 = 0x16;
const QSIZE: u64 = 0x18;
const QVEC: u64 = 0x1a;
const QENABLE: u64 = 0x1c;
const QNOTIFY: u64 = 0x1e;
const QDESC: u64 = 0x20;
const QDRIVER: u64 = 0x28;
const QDEVICE: u64 = 0x30;

/// What a driver learns from the capability list.
#[derive(Debug, Default)]
struct Caps {
    common: u64,
    isr: u64,
    device: u64,
    notify: u64,
    multiplier: u32,
    pci_cfg: u16,
    msix: u16,
}

struct Rig {
    pci: VirtioPciDevice,
    msi: Arc<RecordingMsi>,
    disk: TempFile,
    caps: Caps,
}

fn rig(opts: &BlockOptions, mem: &PhysMemory) -> Rig {
    let disk = TempFile::new().unwrap();
    disk.as_file().set_len(1 << 20).unwrap();
    let block = Block::new(BlockBackend::open(disk.as_path(), opts).unwrap());
    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(block));
    let msi = RecordingMsi::new();
    let mut pci =
        VirtioPciDevice::new(device, DmaSpace::identity(mem.clone()), msi.clone()).unwrap();
    let caps = walk_caps(&mut pci);
    Rig {
        pci,
        msi,
        disk,
        caps,
    }
}

fn walk_caps(pci: &mut VirtioPciDevice) -> Caps {
    let mut caps = Caps::default();
    assert_ne!(pci.config_read_u16(6) & 0x10, 0, "capability list bit");
    let mut at = u16::from(pci.config_read_u8(0x34));
    let mut seen = 0;
    while at != 0 {
        seen += 1;
        assert!(seen < 16, "capability loop");
        let id = pci.config_read_u8(at);
        if id == cap_id::MSIX {
            caps.msix = at;
        } else if id == cap_id::VENDOR {
            let len = pci.config_read_u8(at + 2);
            let kind = pci.config_read_u8(at + 3);
            let bar = pci.config_read_u8(at + 4);
            let offset = u64::from(pci.config_read_u32(at + 8));
            let length = pci.config_read_u32(at + 12);
            if kind != cfg_type::PCI_CFG {
                assert_eq!(bar, 0);
                assert!(offset + u64::from(length) <= BAR_SIZE);
            }
            match kind {
                cfg_type::COMMON => {
                    assert!(length >= 0x38);
                    caps.common = offset;
                }
                cfg_type::ISR => caps.isr = offset,
                cfg_type::DEVICE => caps.device = offset,
                cfg_type::NOTIFY => {
                    assert_eq!(len, 20);
                    caps.notify = offset;
                    caps.multiplier = pci.config_read_u32(at + 16);
                }
                cfg_type::PCI_CFG => caps.pci_cfg = at,
                other => panic!("unknown cfg_type {other}"),
            }
        }
        at = u16::from(pci.config_read_u8(at + 1));
    }
    assert_ne!(caps.msix, 0);
    assert_ne!(caps.pci_cfg, 0);
    caps
}

impl Rig {
    fn rd(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.pci.bar_read(0, self.caps.common + off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn wr(&mut self, off: u64, len: usize, v: u64) {
        self.pci
            .bar_write(0, self.caps.common + off, &v.to_le_bytes()[..len]);
    }

    fn status(&mut self) -> u8 {
        self.rd(STATUS, 1) as u8
    }

    fn set_status(&mut self, s: u8) {
        self.wr(STATUS, 1, s.into());
    }

    fn features(&mut self) -> u64 {
        self.wr(DFSEL, 4, 0);
        let lo = self.rd(DF, 4);
        self.wr(DFSEL, 4, 1);
        let hi = self.rd(DF, 4);
        lo | (hi << 32)
    }

    fn set_driver_features(&mut self, f: u64) {
        self.wr(GFSEL, 4, 0);
        self.wr(GF, 4, f & 0xffff_ffff);
        self.wr(GFSEL, 4, 1);
        self.wr(GF, 4, f >> 32);
    }

    /// MSI-X on, vectors 0 and 1 unmasked and pointed at the local APIC.
    fn enable_msix(&mut self) {
        for v in 0..2u64 {
            let e = MSIX_TABLE_OFFSET + v * 16;
            self.pci.bar_write_u32(0, e, 0xfee0_0000);
            self.pci.bar_write_u32(0, e + 4, 0);
            self.pci.bar_write_u32(0, e + 8, 0x40 + v as u32);
            self.pci.bar_write_u32(0, e + 12, 0);
        }
        let _ = self.pci.config_write_u16(self.caps.msix + 2, 0x8000);
    }

    /// Up to FEATURES_OK with VERSION_1 and `extra`, queue 0 of `size` on `drv`'s rings.
    fn setup_queue(&mut self, drv: &TestDriver, size: u16) {
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.set_driver_features(features::VERSION_1);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(self.status() & status::FEATURES_OK, 0);
        self.wr(MSIX_CONFIG, 2, 0);
        self.wr(QSEL, 2, 0);
        self.wr(QSIZE, 2, size.into());
        let (desc, avail, used) = drv.ring_addresses();
        // Low and high halves, as Linux writes them.
        self.wr(QDESC, 4, desc & 0xffff_ffff);
        self.wr(QDESC + 4, 4, desc >> 32);
        self.wr(QDRIVER, 4, avail);
        self.wr(QDRIVER + 4, 4, 0);
        self.wr(QDEVICE, 8, used);
        self.wr(QVEC, 2, 1);
        assert_eq!(self.rd(QVEC, 2), 1);
        self.wr(QENABLE, 2, 1);
    }

    fn driver_ok(&mut self) {
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    fn notify(&mut self, queue: u16) {
        let off = self.caps.notify + u64::from(queue) * u64::from(self.caps.multiplier);
        self.pci.bar_write(0, off, &queue.to_le_bytes());
    }
}

fn blk_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

#[test]
fn identity_and_bar() {
    let mem = test_memory();
    let mut r = rig(&BlockOptions::default(), &mem);
    let p = &mut r.pci;
    assert_eq!(p.config_read_u16(0), 0x1af4);
    assert_eq!(p.config_read_u16(2), 0x1042);
    assert_eq!(p.config_read_u8(8), 1);
    assert_eq!(p.config_read_u32(8) >> 8, 0x01_8000);
    assert_eq!(p.config_read_u16(0x2c), 0x1af4);
    assert_eq!(p.config_read_u16(0x2e), 0x40);
    // BAR 0: 64-bit memory, 32 KiB.
    assert_eq!(p.config_read_u32(0x10), 0x4);
    let _ = p.config_write_u32(0x10, u32::MAX);
    let _ = p.config_write_u32(0x14, u32::MAX);
    assert_eq!(p.config_read_u32(0x10), 0xffff_8004);
    assert_eq!(p.config_read_u32(0x14), u32::MAX);
    assert_eq!(p.bars().len(), 1);
    assert_eq!(p.bars()[0].size, BAR_SIZE);
    // MSI-X: two vectors (one queue + config), table and PBA in BAR 0.
    let m = r.caps.msix;
    assert_eq!(p.config_read_u16(m + 2) & 0x7ff, 1);
    assert_eq!(p.config_read_u32(m + 4), MSIX_TABLE_OFFSET as u32);
    assert_eq!(p.config_read_u32(m + 8), MSIX_PBA_OFFSET as u32);
    assert_eq!(r.caps.multiplier, NOTIFY_OFF_MULTIPLIER);
    // One ioeventfd per queue, at the queue's notify register.
    let ev = p.ioevents();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].bar, ev[0].offset), (0, r.caps.notify));
    assert_eq!(ev[0].datamatch, Datamatch::Any);
    let n = p.notify_events();
    assert_eq!(n.len(), 1);
    assert!(Arc::ptr_eq(&n[0].1, &ev[0].fd));
}

#[test]
fn driver_round_trip_with_msix() {
    let mem = test_memory();
    let mut r = rig(&BlockOptions::default(), &mem);
    let offered = r.features();
    assert_ne!(offered & features::VERSION_1, 0);
    assert_eq!(r.rd(NUM_QUEUES, 2), 1);
    assert_eq!(r.rd(QSIZE, 2), 256);
    r.enable_msix();
    r.msi.take();

    let mut drv = TestDriver::new(&mem, 16);
    r.setup_queue(&drv, 16);
    assert_eq!(r.rd(QSIZE, 2), 16);
    assert_eq!(r.rd(QENABLE, 2), 1);
    assert_eq!(r.rd(QNOTIFY, 2), 0);
    let (desc, avail, used) = drv.ring_addresses();
    assert_eq!(r.rd(QDESC, 8), desc);
    assert_eq!(r.rd(QDRIVER, 4), avail);
    assert_eq!(r.rd(QDEVICE + 4, 4), used >> 32);
    r.driver_ok();
    assert_eq!(r.status(), 0x0f);
    assert!(lock(&r.pci.device()).is_active());

    // A write of one sector at sector 3, then a notify: served, used, vector 1 raised.
    let data: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    drv.write(HDR, &blk_header(1, 3));
    drv.write(DATA, &data);
    drv.write(STATUS_BYTE, &[0xee]);
    drv.add(&[
        Desc::r(HDR, 16),
        Desc::r(DATA, 512),
        Desc::w(STATUS_BYTE, 1),
    ]);
    r.notify(0);
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.read(STATUS_BYTE, 1), [0]);
    let mut on_disk = vec![0u8; 512];
    r.disk
        .as_file()
        .read_exact_at(&mut on_disk, 3 * 512)
        .unwrap();
    assert_eq!(on_disk, data);
    let events = r.msi.take();
    assert!(events.contains(&MsiEvent::Trigger(1)), "{events:?}");
    // ISR: read to clear.
    let mut isr = [0u8];
    r.pci.bar_read(0, r.caps.isr, &mut isr);
    assert_eq!(isr[0] & 1, 1);
    r.pci.bar_read(0, r.caps.isr, &mut isr);
    assert_eq!(isr[0], 0);

    // Device config: capacity in sectors.
    let mut cap = [0u8; 8];
    r.pci.bar_read(0, r.caps.device, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);

    // The ring broken by the driver: the device asks for a reset through the config vector.
    drv.set_avail_idx(100);
    r.notify(0);
    assert_ne!(r.status() & status::DEVICE_NEEDS_RESET, 0);
    assert!(r.msi.take().contains(&MsiEvent::Trigger(0)));

    // Reset: everything back to its initial state.
    r.set_status(0);
    assert_eq!(r.status(), 0);
    assert!(!lock(&r.pci.device()).is_active());
    assert_eq!(r.rd(QSIZE, 2), 256);
    assert_eq!(r.rd(QENABLE, 2), 0);
    assert_eq!(r.rd(QDESC, 8), 0);
    assert_eq!(r.rd(QVEC, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    assert_eq!(r.rd(MSIX_CONFIG, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    // And the driver can start over.
    let mut drv = TestDriver::new(&mem, 16);
    r.setup_queue(&drv, 16);
    r.driver_ok();
    drv.write(HDR, &blk_header(4, 0)); // FLUSH
    drv.add(&[Desc::r(HDR, 16), Desc::w(STATUS_BYTE, 1)]);
    r.notify(0);
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.read(STATUS_BYTE, 1), [0]);
}

#[test]
fn malformed_queue_writes() {
    let mem = test_memory();
    let mut r = rig(&BlockOptions::default(), &mem);
    // Sizes that are zero, not a power of two or above the maximum are refused.
    for bad in [0u64, 3, 100, 512, 0xffff] {
        r.wr(QSIZE, 2, bad);
        assert_eq!(r.rd(QSIZE, 2), 256, "size {bad}");
    }
    r.wr(QSIZE, 2, 64);
    assert_eq!(r.rd(QSIZE, 2), 64);
    // A misaligned descriptor table is refused.
    r.wr(QDESC, 4, 0x1008);
    assert_eq!(r.rd(QDESC, 4), 0);

    // queue_select past the last queue: reads zeros, writes go nowhere.
    r.wr(QSEL, 2, 5);
    assert_eq!(r.rd(QSEL, 2), 5);
    for reg in [QSIZE, QVEC, QENABLE, QNOTIFY] {
        assert_eq!(r.rd(reg, 2), 0, "register {reg:#x}");
    }
    assert_eq!(r.rd(QDESC, 8), 0);
    r.wr(QSIZE, 2, 16);
    r.wr(QENABLE, 2, 1);
    r.wr(QDESC, 8, 0x1000);
    r.wr(QVEC, 2, 0);
    r.wr(QSEL, 2, 0);
    assert_eq!(r.rd(QSIZE, 2), 64);
    assert_eq!(r.rd(QENABLE, 2), 0);

    // Read-only fields keep their values.
    let before = r.features();
    r.wr(DFSEL, 4, 0);
    r.wr(DF, 4, 0);
    r.wr(NUM_QUEUES, 2, 9);
    r.wr(GENERATION, 1, 9);
    r.wr(QNOTIFY, 2, 9);
    assert_eq!(r.features(), before);
    assert_eq!(r.rd(NUM_QUEUES, 2), 1);
    assert_eq!(r.rd(GENERATION, 1), 0);
    assert_eq!(r.rd(QNOTIFY, 2), 0);
    // Feature words past the second read zero.
    r.wr(DFSEL, 4, 2);
    assert_eq!(r.rd(DF, 4), 0);

    // Odd widths and offsets: zeros, dropped writes, no panic.
    assert_eq!(r.rd(DF, 1), 0);
    assert_eq!(r.rd(QSIZE, 4), 0);
    r.wr(STATUS, 2, 0x0f);
    assert_eq!(r.status(), 0);
    r.wr(QDESC + 2, 4, 0x1000);
    r.wr(0x37, 1, 0xff);
    let mut b = [0u8; 4];
    r.pci.bar_read(0, 0x7ffc, &mut b);
    r.pci.bar_write(0, 0x7ffc, &b);
    r.pci.bar_read(3, 0, &mut b);
    assert_eq!(b, [0xff; 4]);
    r.pci.bar_write(0, ISR_OFFSET, &[1]);

    // Vectors beyond the table are refused: the driver reads NO_VECTOR back.
    r.wr(MSIX_CONFIG, 2, 2);
    assert_eq!(r.rd(MSIX_CONFIG, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    r.wr(QVEC, 2, 7);
    assert_eq!(r.rd(QVEC, 2), u64::from(VIRTIO_MSI_NO_VECTOR));

    // Queue enable only takes 1; once enabled, the queue's registers are frozen.
    r.wr(QENABLE, 2, 2);
    assert_eq!(r.rd(QENABLE, 2), 0);
    r.wr(QENABLE, 2, 1);
    r.wr(QSIZE, 2, 16);
    r.wr(QDESC, 4, 0x2000);
    assert_eq!(r.rd(QSIZE, 2), 64);
    assert_eq!(r.rd(QDESC, 4), 0);
    r.wr(QENABLE, 2, 0);
    assert_eq!(r.rd(QENABLE, 2), 1);

    // A notify before DRIVER_OK, or for a missing queue, is ignored.
    r.notify(0);
    r.notify(9);
    r.pci.bar_write(0, NOTIFY_OFFSET + 2, &[0, 0]);
}

#[test]
fn feature_and_status_negotiation() {
    let mem = test_memory();
    let mut r = rig(&BlockOptions::default(), &mem);
    let offered = r.features();
    r.set_status(status::ACKNOWLEDGE | status::DRIVER);

    // FEATURES_OK without VERSION_1 is refused: the bit reads back clear.
    r.set_driver_features(offered & !features::VERSION_1);
    r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_eq!(r.status(), status::ACKNOWLEDGE | status::DRIVER);
    // Features that were not offered are refused too.
    r.set_driver_features(features::VERSION_1 | (1 << 63));
    r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_eq!(r.status() & status::FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK is refused.
    r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
    assert_eq!(r.status(), status::ACKNOWLEDGE | status::DRIVER);
    assert!(!lock(&r.pci.device()).is_active());
    // Clearing bits without a reset is refused.
    r.set_status(status::ACKNOWLEDGE);
    assert_eq!(r.status(), status::ACKNOWLEDGE | status::DRIVER);

    r.set_driver_features(offered);
    assert_eq!(r.rd(GF, 4), offered >> 32);
    r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_ne!(r.status() & status::FEATURES_OK, 0);
    assert_eq!(lock(&r.pci.device()).acked_features(), offered);
    // Features are frozen after FEATURES_OK.
    r.set_driver_features(features::VERSION_1);
    r.wr(GFSEL, 4, 0);
    assert_eq!(r.rd(GF, 4), offered & 0xffff_ffff);

    // DRIVER_OK with an enabled queue whose rings are outside guest memory: the device cannot
    // start and says it needs a reset.
    r.wr(QSIZE, 2, 16);
    r.wr(QDESC, 8, 0x18_0000);
    r.wr(QDRIVER, 8, 0x18_1000);
    r.wr(QDEVICE, 8, 0x18_2000);
    r.wr(QENABLE, 2, 1);
    r.driver_ok();
    let s = r.status();
    assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
    assert!(!lock(&r.pci.device()).is_active());
    // Writing back what was read does not clear or set DEVICE_NEEDS_RESET.
    r.set_status(s);
    assert_eq!(r.status(), s);
    r.set_status(0);
    assert_eq!(r.status(), 0);
}

#[test]
fn pci_cfg_window_reaches_bar() {
    let mem = test_memory();
    let mut r = rig(&BlockOptions::default(), &mem);
    let c = r.caps.pci_cfg;
    // num_queues (2 bytes) through the window.
    let _ = r.pci.config_write_u8(c + 4, 0);
    let _ = r
        .pci
        .config_write_u32(c + 8, (r.caps.common + NUM_QUEUES) as u32);
    let _ = r.pci.config_write_u32(c + 12, 2);
    assert_eq!(r.pci.config_read_u16(c + 16), 1);
    // A write through the window: device_status.
    let _ = r
        .pci
        .config_write_u32(c + 8, (r.caps.common + STATUS) as u32);
    let _ = r.pci.config_write_u32(c + 12, 1);
    let _ = r.pci.config_write_u8(c + 16, status::ACKNOWLEDGE);
    assert_eq!(r.status(), status::ACKNOWLEDGE);
    // A window past the BAR, a bad length or a mismatched access: zeros, nothing written.
    let _ = r.pci.config_write_u32(c + 8, BAR_SIZE as u32);
    assert_eq!(r.pci.config_read_u8(c + 16), 0);
    let _ = r
        .pci
        .config_write_u32(c + 8, (r.caps.common + STATUS) as u32);
    let _ = r.pci.config_write_u32(c + 12, 3);
    assert_eq!(r.pci.config_read_u8(c + 16), 0);
    let _ = r.pci.config_write_u32(c + 12, 1);
    assert_eq!(r.pci.config_read_u32(c + 16), 0);
    let _ = r.pci.config_write_u32(c + 16, 0);
    assert_eq!(r.status(), status::ACKNOWLEDGE);
}

#[test]
fn read_only_disk_refuses_writes_over_pci() {
    let mem = test_memory();
    let opts = BlockOptions {
        read_only: true,
        ..Default::default()
    };
    let mut r = rig(&opts, &mem);
    let mut drv = TestDriver::new(&mem, 16);
    let offered = r.features();
    r.set_status(status::ACKNOWLEDGE | status::DRIVER);
    r.set_driver_features(offered);
    r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    r.wr(QSIZE, 2, 16);
    let (desc, avail, used) = drv.ring_addresses();
    r.wr(QDESC, 8, desc);
    r.wr(QDRIVER, 8, avail);
    r.wr(QDEVICE, 8, used);
    r.wr(QENABLE, 2, 1);
    r.driver_ok();
    drv.write(HDR, &blk_header(1, 0));
    drv.add(&[
        Desc::r(HDR, 16),
        Desc::r(DATA, 512),
        Desc::w(STATUS_BYTE, 1),
    ]);
    r.notify(0);
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.read(STATUS_BYTE, 1), [1]); // IOERR
    // MSI-X is off: no interrupt, but the ISR says a queue was used.
    assert!(!r.msi.take().contains(&MsiEvent::Trigger(1)));
    let mut isr = [0u8];
    r.pci.bar_read(0, r.caps.isr, &mut isr);
    assert_eq!(isr[0], 1);
}

/// A device with two queues that signals what it is told to: queue 0 a used buffer, queue 1 a
/// configuration change.
struct Signaller {
    common: crate::virtio::VirtioCommon,
}

impl VirtioDevice for Signaller {
    fn common(&self) -> &crate::virtio::VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut crate::virtio::VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&[1, 2, 3, 4], offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        queues: Vec<virtio_queue::Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        dma: DmaSpace,
    ) -> Result<(), crate::virtio::ActivateError> {
        self.common.activate(queues, interrupt, dma)
    }
    fn reset(&mut self) {
        self.common.reset();
    }
    fn process_queue(&mut self, queue: u16) {
        if let Some(irq) = self.common.interrupt() {
            match queue {
                0 => irq.signal_queue(0),
                _ => irq.signal_config(),
            }
        }
    }
}

fn signaller(mem: &PhysMemory) -> (VirtioPciDevice, Arc<RecordingMsi>, Caps) {
    let dev = Signaller {
        common: crate::virtio::VirtioCommon::new(0x7f, vec![16, 16], 0),
    };
    let msi = RecordingMsi::new();
    let mut pci = VirtioPciDevice::new(
        Arc::new(Mutex::new(dev)),
        DmaSpace::identity(mem.clone()),
        msi.clone(),
    )
    .unwrap();
    let caps = walk_caps(&mut pci);
    (pci, msi, caps)
}

#[test]
fn vectors_per_queue_and_config_generation() {
    let mem = test_memory();
    let (pci, msi, caps) = signaller(&mem);
    let disk = TempFile::new().unwrap();
    let mut r = Rig {
        pci,
        msi,
        disk,
        caps,
    };
    assert_eq!(r.pci.config_read_u16(2), 0x1040 + 0x7f);
    assert_eq!(r.pci.config_read_u32(8) >> 8, 0xff_0000);
    assert_eq!(r.rd(NUM_QUEUES, 2), 2);
    // Three vectors: two queues and the configuration.
    assert_eq!(r.pci.config_read_u16(r.caps.msix + 2) & 0x7ff, 2);
    let ev = r.pci.ioevents();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1].offset, NOTIFY_OFFSET + 4);
    r.wr(QSEL, 2, 1);
    assert_eq!(r.rd(QNOTIFY, 2), 1);

    // Vector 2 for queue 0, none for queue 1, vector 0 for the configuration.
    for v in 0..3u64 {
        let e = MSIX_TABLE_OFFSET + v * 16;
        r.pci.bar_write_u32(0, e, 0xfee0_0000);
        r.pci.bar_write_u32(0, e + 8, 0x50 + v as u32);
        r.pci.bar_write_u32(0, e + 12, 0);
    }
    let _ = r.pci.config_write_u16(r.caps.msix + 2, 0x8000);
    r.msi.take();
    r.set_status(status::ACKNOWLEDGE | status::DRIVER);
    r.set_driver_features(features::VERSION_1);
    r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    r.wr(MSIX_CONFIG, 2, 0);
    r.wr(QSEL, 2, 0);
    r.wr(QVEC, 2, 2);
    r.wr(QSEL, 2, 1);
    r.wr(QVEC, 2, u64::from(VIRTIO_MSI_NO_VECTOR));
    r.driver_ok();
    assert_eq!(r.status() & status::DEVICE_NEEDS_RESET, 0);

    r.notify(0);
    assert_eq!(r.msi.take(), [MsiEvent::Trigger(2)]);
    let generation = r.rd(GENERATION, 1);
    r.notify(1);
    assert_eq!(r.msi.take(), [MsiEvent::Trigger(0)]);
    assert_eq!(r.rd(GENERATION, 1), generation + 1);
    let mut isr = [0u8];
    r.pci.bar_read(0, r.caps.isr, &mut isr);
    assert_eq!(isr[0], 3);
    // The config vector moved to "none": a change is still visible in the ISR and generation.
    r.wr(MSIX_CONFIG, 2, u64::from(VIRTIO_MSI_NO_VECTOR));
    r.notify(1);
    assert_eq!(r.msi.take(), []);
    assert_eq!(r.rd(GENERATION, 1), generation + 2);
    r.pci.bar_read(0, r.caps.isr, &mut isr);
    assert_eq!(isr[0], 2);
    // Device config reads reach the device.
    let mut cfg = [0u8; 4];
    r.pci.bar_read(0, r.caps.device, &mut cfg);
    assert_eq!(cfg, [1, 2, 3, 4]);
}

/// Random guest accesses of every width anywhere in config space and BAR 0, with the device in
/// random states, never panic (the fuzzing of DESIGN.md, in-process and reproducible).
#[test]
fn random_accesses_never_panic() {
    let mem = test_memory();
    let mut rng = crate::virtio::testutil::XorShift(0x9e37_79b9_7f4a_7c15);
    let mut r = rig(&BlockOptions::default(), &mem);
    let drv = TestDriver::new(&mem, 16);
    for round in 0..200_000u32 {
        if round % 5000 == 0 {
            // Now and then a proper bring-up, so that the live paths are exercised too.
            r.set_status(0);
            r.setup_queue(&drv, 16);
            r.driver_ok();
        }
        let len = [1usize, 2, 3, 4, 8][rng.below(5) as usize];
        let value = rng.next().to_le_bytes();
        let mut buf = [0u8; 8];
        match rng.below(6) {
            0 => {
                // Mostly the common config, where the state machine is.
                let off = rng.below(COMMON_CFG_LEN + 8);
                r.pci.bar_write(0, off, &value[..len]);
            }
            1 => {
                let off = rng.below(BAR_SIZE + 16);
                r.pci.bar_write(0, off, &value[..len]);
            }
            2 => {
                let off = rng.below(BAR_SIZE + 16);
                r.pci.bar_read(0, off, &mut buf[..len]);
            }
            3 => {
                // Config space within a dword, as the root guarantees; skip the BAR and
                // command registers so that the function stays reachable.
                let off = 0x40 + rng.below(0xfc0) as u16;
                let len = len.min(4 - usize::from(off & 3)).max(1);
                let _ = r.pci.config_write(off, &value[..len]);
            }
            4 => {
                let off = rng.below(0x1000) as u16;
                let len = len.min(4 - usize::from(off & 3)).max(1);
                r.pci.config_read(off, &mut buf[..len]);
            }
            _ => r.notify(rng.below(3) as u16),
        }
    }
}

#[test]
fn behind_an_iommu_features_ok_needs_access_platform() {
    let mem = test_memory();
    let mut r = rig(&BlockOptions::default(), &mem);
    r.pci.require_access_platform();
    let offered = r.features();
    assert_ne!(offered & features::ACCESS_PLATFORM, 0);
    r.set_status(status::ACKNOWLEDGE | status::DRIVER);
    // A driver that would hand out guest physical addresses is refused.
    r.set_driver_features(features::VERSION_1);
    r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_eq!(r.status() & status::FEATURES_OK, 0);
    r.set_driver_features(features::VERSION_1 | features::ACCESS_PLATFORM);
    r.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_ne!(r.status() & status::FEATURES_OK, 0);
}
